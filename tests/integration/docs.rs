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
        // DOCKER_HOST is Docker's own variable, read as Docker's tools read it.
        .filter(|v| v.starts_with("DD_") || v.starts_with("WHIPPET_") || *v == "DOCKER_HOST")
        .collect();
    assert_eq!(vars.len(), whippet::config::SETTINGS.len(), "{help}");
    for v in vars {
        assert!(
            man.contains(&format!("Variable: {v}.")),
            "{v} missing from whippet.8"
        );
    }
}

/// The text of a roff fragment, as a reader sees it: macros dropped, their arguments kept,
/// escapes turned into characters, white space folded.
fn roff_text(roff: &str) -> String {
    let mut out = Vec::new();
    for line in roff.lines() {
        let Some(macro_line) = line.strip_prefix('.') else {
            out.push(line.to_string());
            continue;
        };
        let (name, args) = macro_line.split_once(' ').unwrap_or((macro_line, ""));
        let args: Vec<String> = roff_args(args);
        match name {
            "B" | "I" => out.push(args.join(" ")),
            "BR" | "RB" | "BI" | "IB" | "IR" | "RI" => out.push(args.concat()),
            _ => {}
        }
    }
    let text = out
        .join(" ")
        .replace("\\-", "-")
        .replace("\\(mu", "×")
        .replace("\\e", "\\")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\fB", "");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A macro's arguments: words, or "quoted strings".
fn roff_args(args: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = args.trim();
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            out.push(quoted[..end].to_string());
            rest = quoted[(end + 1).min(quoted.len())..].trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            rest = rest[end..].trim_start();
        }
    }
    out
}

/// The man page's description of `--flag`, as text.
fn man_entry(page: &str, flag: &str) -> String {
    let options = options_section(page);
    let head = format!("\\-\\-{}", flag.replace('-', "\\-"));
    let entries: Vec<&str> = options.split("\n.TP\n").collect();
    let entry = entries
        .iter()
        .find(|e| {
            let first = e.lines().next().unwrap_or("");
            first
                .split_whitespace()
                .nth(1)
                .is_some_and(|w| w.trim_matches('"') == head)
        })
        .unwrap_or_else(|| panic!("no entry for --{flag} in whippet.8"));
    roff_text(entry)
}

/// `--help`'s description of `--flag`, as text: its line and the lines that continue it.
fn help_entry(help: &str, flag: &str) -> String {
    let lines: Vec<&str> = help.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with(&format!("--{flag} ")))
        .unwrap_or_else(|| panic!("no --{flag} in --help"));
    // Continuation lines are indented deeper than the option's own line.
    let indent = |l: &str| l.len() - l.trim_start().len();
    let end = lines[start + 1..]
        .iter()
        .position(|l| indent(l) <= indent(lines[start]))
        .map_or(lines.len(), |n| start + 1 + n);
    lines[start..end]
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn every_setting_documents_its_declared_default_in_help_man_page_config_and_readme() {
    use whippet::config::settings::DefaultValue;
    let help = help_of(binary());
    let page = manifest("man/whippet.8");
    let conf = manifest("packaging/whippet.conf");
    let readme = manifest("README.md");
    let mut wrong = Vec::new();
    for s in whippet::config::SETTINGS {
        let tail = s.tail();
        let h = help_entry(&help, s.flag);
        if !h.contains(&tail) {
            wrong.push(format!("--help for --{}: {h:?} lacks {tail:?}", s.flag));
        }
        let m = man_entry(&page, s.flag);
        if !m.contains(&tail) || !m.contains(&format!("Variable: {}.", s.var)) {
            wrong.push(format!(
                "whippet.8 for --{}: {m:?} lacks {tail:?} or its variable",
                s.flag
            ));
        }
        let line = match s.default {
            DefaultValue::Value(v) => format!("# {}={v}", s.var),
            DefaultValue::Unset(_) => format!("# {}=", s.var),
            DefaultValue::Derived(t) => format!("# {}=({t})", s.var),
        };
        if !conf.lines().any(|l| l == line) {
            wrong.push(format!("packaging/whippet.conf lacks the line {line:?}"));
        }
        let row = readme.lines().find(|l| {
            l.starts_with(&format!("| `--{} ", s.flag))
                || l.starts_with(&format!("| `--{}` ", s.flag))
        });
        let shown = row
            .and_then(|r| r.split(" | ").nth(1))
            .map(|c| c.trim_matches('`'));
        if shown != Some(s.default.text()) {
            wrong.push(format!(
                "README.md's settings table shows {shown:?} for --{}, not {:?}",
                s.flag,
                s.default.text()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
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
