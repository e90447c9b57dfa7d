//! Captures through the real binary (docs/capture.md): SIGUSR2 records what arrives on every
//! transport, `whippet-blast replay` sends it to another whippet, which aggregates exactly
//! the same; and a slow or full disk leaves packets out of the capture without holding them.

use std::os::unix::net::UnixDatagram;
use std::process::Command;

use nix::sys::signal::Signal;

use crate::support::{TempDir, Whippet};

/// A known mix: every metric type, over the three transports, plus an event and a check.
const UDP: &[&[u8]] = &[
    b"mix.c:1|c|#env:dev\nmix.c:2|c|#env:dev|@0.5",
    b"mix.g:5|g\nmix.s:a|s\nmix.s:b|s\nmix.s:a|s",
    b"_e{5,4}:title|text|#x\n_sc|check|1",
];
const UNIX: &[&[u8]] = &[
    b"mix.h:1:2:3|h|#t:1",
    b"mix.d:10|d\nmix.d:20|d\nmix.ms:7|ms",
];
const STREAM: &[&[u8]] = &[b"mix.c:4|c|#env:dev\nmix.g:6|g"];
/// Samples the mix makes: 3 counts, 2 gauges, 3 sets, 3 + 1 histogram and timer, 2 sketches.
const SAMPLES: u64 = 3 + 2 + 3 + 4 + 2;

fn sorted_lines(s: &crate::support::Stopped) -> Vec<String> {
    let mut lines: Vec<String> = s
        .stdout
        .iter()
        .filter(|l| l.starts_with("series ") || l.starts_with("sketch "))
        .cloned()
        .collect();
    lines.sort();
    lines
}

#[test]
fn a_capture_replays_to_the_same_aggregates() {
    let captures = TempDir::new();
    let dir = captures.path("caps");
    let dir_arg = dir.display().to_string();
    // One worker each: the mix sets a gauge twice, in two packets, and with two workers the
    // packets may be parsed side by side, so that either value is the last.
    let w = Whippet::start(&["--capture-dir", &dir_arg, "--workers", "1"]);
    w.signal(Signal::SIGUSR2);
    w.wait_for_stderr("whippet: capture 1 started");
    for p in UDP {
        w.send_udp(p);
    }
    for p in UNIX {
        w.send_unix(p);
    }
    w.send_stream(STREAM);
    w.wait_for_telemetry("whippet_samples_total", SAMPLES);
    w.signal(Signal::SIGUSR2);
    let done = w.wait_for_new_stderr("whippet: capture 1 written to ");
    assert!(
        done.ends_with(": 6 packets, 279 bytes; 0 packets left out"),
        "{done}"
    );
    let original = w.stop();
    assert!(original.status.success());
    assert_eq!(
        original.telemetry(r#"whippet_capture_packets_total{result="written"}"#),
        6
    );
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 1);
    let file = files[0].path();

    let again = Whippet::start(&["--workers", "1"]);
    let target = format!("unix:{}", again.socket.as_ref().unwrap().display());
    let out = Command::new(env!("CARGO_BIN_EXE_whippet-blast"))
        .args(["replay", "--speed", "max", "--target", &target, "--capture"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.starts_with("replayed 6 packets (14 messages, 193 bytes) of 6 in "),
        "{report}"
    );
    again.wait_for_telemetry("whippet_samples_total", SAMPLES);
    let replayed = again.stop();
    assert!(replayed.status.success());
    let lines = sorted_lines(&original);
    assert_eq!(lines.len(), 14, "{lines:#?}");
    assert_eq!(sorted_lines(&replayed), lines);
    assert_eq!(
        replayed.telemetry(r#"whippet_messages_total{kind="event"}"#),
        1
    );
}

/// Peak resident memory of `pid`, in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_capture_on_a_slow_or_full_disk_leaves_packets_out_instead_of_holding_them() {
    for fault in ["capture-slow", "capture-full"] {
        let captures = TempDir::new();
        let dir = captures.path("caps").display().to_string();
        let dir_arg = dir.as_str();
        let w = Whippet::start_env(
            &["--capture-dir", dir_arg, "--capture-memory", "262144"],
            &[("WHIPPET_FAULT_INJECT", fault)],
        );
        let before = peak_kib(w.pid());
        w.signal(Signal::SIGUSR2);
        w.wait_for_stderr("whippet: capture 1 started");
        // 64 MiB in 8 KiB datagrams: far more than the capture may hold.
        const PACKETS: u64 = 8192;
        let line = b"load.c:1|c|#k:v\n";
        let packet: Vec<u8> = line.repeat(8192 / line.len());
        let s = UnixDatagram::unbound().unwrap();
        let socket = w.socket.clone().unwrap();
        for _ in 0..PACKETS {
            // Blocking sends: whippet's reader pushes back, nothing is lost before it.
            s.send_to(&packet, &socket).unwrap();
        }
        let messages = PACKETS * (8192 / line.len()) as u64;
        w.wait_for_telemetry("whippet_samples_total", messages);
        w.signal(Signal::SIGUSR2);
        w.wait_for_new_stderr("whippet: capture 1 written to ");
        let peak = peak_kib(w.pid());
        let stopped = w.stop();
        assert!(stopped.status.success(), "{fault}");
        let written = stopped.telemetry(r#"whippet_capture_packets_total{result="written"}"#);
        let skipped = stopped.telemetry(r#"whippet_capture_packets_total{result="skipped"}"#);
        assert_eq!(written + skipped, PACKETS, "{fault}");
        assert!(skipped > 0, "{fault}: the disk kept up?");
        if fault == "capture-full" {
            assert_eq!(written, 0);
        }
        // The copies may hold 512 KiB; whippet's own buffers a few MiB more. Held instead,
        // 64 MiB of packets would show.
        assert!(
            peak < before + 24 * 1024,
            "{fault}: peak RSS {peak} KiB, {before} KiB before the capture"
        );
    }
}
