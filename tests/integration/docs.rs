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

#[test]
fn every_flag_in_help_is_in_the_man_page_and_the_reverse() {
    let out = Command::new(binary()).arg("--help").output().unwrap();
    let help = flags(&String::from_utf8(out.stdout).unwrap());
    let man = flags(&manifest("man/whippet.8"));
    assert!(help.len() >= 20, "{help:?}");
    assert_eq!(help, man);
}

#[test]
fn the_systemd_unit_verifies_and_runs_the_built_binary() {
    // systemd-analyze checks that ExecStart exists: point it at the binary under test.
    let dir = TempDir::new();
    let unit = manifest("packaging/whippet.service").replace("/usr/bin/whippet", binary());
    let path = dir.path("whippet.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (CI installs the systemd package)");
    let err = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("whippet.service"))
        .collect();
    assert!(out.status.success() && complaints.is_empty(), "{err}");
}
