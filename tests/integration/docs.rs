//! The documentation that ships with whippet matches the program.

use std::collections::BTreeSet;
use std::process::Command;

use crate::support::{binary, TempDir};

fn manifest(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// `--long-flag` words in a text (roff escapes the hyphens as `\-`).
fn flags(text: &str) -> BTreeSet<String> {
    let text = text.replace("\\-", "-");
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect()
}

/// The OPTIONS section of a man page: where each flag is documented.
fn options_section(page: &str) -> String {
    let start = page.find(".SH OPTIONS").expect("an OPTIONS section");
    let rest = &page[start + 3..];
    rest[..rest.find("\n.SH ").unwrap_or(rest.len())].to_string()
}

fn help_of(binary: &str) -> String {
    let out = Command::new(binary).arg("--help").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_flag_in_help_is_in_the_man_page_and_the_reverse() {
    let pages = [
        (binary(), "man/whippet.8", 35),
        (
            env!("CARGO_BIN_EXE_whippet-intake"),
            "man/whippet-intake.1",
            7,
        ),
        (
            env!("CARGO_BIN_EXE_whippet-blast"),
            "man/whippet-blast.1",
            13,
        ),
    ];
    for (bin, page, at_least) in pages {
        let help = flags(&help_of(bin));
        let man = flags(&options_section(&manifest(page)));
        assert!(help.len() >= at_least, "{page}: {help:?}");
        assert_eq!(help, man, "{page}");
    }
}

#[test]
fn every_variable_in_help_is_in_the_man_page() {
    let help = help_of(binary());
    // Words only: the page wraps lines anywhere.
    let man = manifest("man/whippet.8")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let vars: Vec<&str> = help
        .split(['[', ']'])
        .skip(1)
        .step_by(2)
        .filter(|v| v.starts_with("DD_") || v.starts_with("WHIPPET_"))
        .collect();
    assert_eq!(vars.len(), whippet::config::SETTINGS.len(), "{help}");
    for v in vars {
        assert!(
            man.contains(&format!("Variable: {v}.")),
            "{v} missing from whippet.8"
        );
    }
}

#[test]
fn man_pages_are_mandoc_lint_clean() {
    for page in [
        "man/whippet.8",
        "man/whippet-intake.1",
        "man/whippet-blast.1",
    ] {
        let out = Command::new("mandoc")
            .args(["-T", "lint"])
            .arg(format!("{}/{page}", env!("CARGO_MANIFEST_DIR")))
            .output()
            .expect("mandoc is installed (CI installs the mandoc package)");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.is_empty(), "{page}: {text}");
    }
}

#[test]
fn the_systemd_unit_verifies_and_runs_the_built_binary() {
    // systemd-analyze checks that ExecStart exists: point it at the binary under test.
    let dir = TempDir::new();
    let unit = manifest("packaging/whippet.service").replace("/usr/bin/whippet", binary());
    let path = dir.path("whippet.service");
    std::fs::write(&path, unit).unwrap();
    std::fs::write(
        dir.path("whippet.socket"),
        manifest("packaging/whippet.socket"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .arg(dir.path("whippet.socket"))
        .output()
        .expect("systemd-analyze is installed (CI installs the systemd package)");
    let err = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("whippet.service") || l.contains("whippet.socket"))
        .collect();
    assert!(out.status.success() && complaints.is_empty(), "{err}");
}

#[test]
fn the_packaged_config_lists_every_setting_and_sets_only_the_retry_dir_and_parses() {
    let text = manifest("packaging/whippet.conf");
    for s in whippet::config::SETTINGS {
        let line = format!("# {}=", s.var);
        assert!(
            text.contains(&line),
            "{} missing from packaging/whippet.conf",
            s.var
        );
    }
    // The one packaged choice: payloads wait on disk in the service's state directory.
    let set: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(set, ["WHIPPET_RETRY_DIR=/var/lib/whippet/retry"]);
    // Uncommented, each example value is valid (placeholders in parentheses aside).
    let dir = TempDir::new();
    let conf = dir.path("whippet.conf");
    let active: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.split('=')
                .next()
                .is_some_and(|k| k.starts_with("DD_") || k.starts_with("WHIPPET_"))
        })
        .filter(|l| !l.contains("=(") && !l.ends_with('='))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&conf, &active).unwrap();
    let out = Command::new(binary())
        .env_clear()
        .args(["--config", conf.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
