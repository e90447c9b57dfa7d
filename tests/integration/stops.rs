//! Hard stops: SIGTERM ends whippet within `--shutdown-timeout` plus a small constant
//! whatever the intake or stdout does, and what could not be delivered by then waits in
//! `--retry-dir` (or is counted as dropped).

use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use whippet::intake::store::PointRecord;
use whippet::intake::IntakeConfig;

use crate::support::{binary, intake, poll_until, TempDir, Whippet, DEADLINE};

/// Increments of `count` tagged `phase:<phase>` that arrived.
fn increments(points: &[PointRecord], phase: &str) -> f64 {
    let tag = format!("phase:{phase}");
    points
        .iter()
        .filter(|p| p.metric == "stop.count" && p.tags.contains(&tag))
        .map(|p| p.value * p.interval as f64)
        .sum()
}

fn send(w: &Whippet, phase: &str, n: u32) {
    let msg = format!("stop.count:1|c|#phase:{phase}");
    for _ in 0..n {
        w.send_unix(msg.as_bytes());
    }
}

#[test]
fn a_request_in_flight_at_sigterm_does_not_hold_the_stop_and_its_payload_waits_on_disk() {
    // The intake keeps the first request a minute; requests may take two.
    let slow = intake(IntakeConfig {
        delay: Duration::from_secs(60),
        slow_requests: 1,
        ..IntakeConfig::default()
    });
    let state = TempDir::new();
    let retry_dir = state.path("retry");
    let retry_dir = retry_dir.to_str().unwrap();
    let args = |url: &str| -> Vec<String> {
        [
            "--dd-url",
            url,
            "--bucket-seconds",
            "1",
            "--request-timeout-ms",
            "120000",
            "--shutdown-timeout",
            "1s",
            "--retry-dir",
            retry_dir,
            "--forwarder-threads",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a = args(&slow.url());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let w = Whippet::start(&a);
    send(&w, "a", 500);
    let store = slow.store().clone();
    poll_until("a request in flight", DEADLINE, || {
        !store.payloads(Some("/api/v2/series")).is_empty()
    });
    // These wait behind the request in flight.
    send(&w, "b", 500);
    let stopping = Instant::now();
    let s = w.stop();
    let took = stopping.elapsed();
    assert!(s.status.success(), "{:?}", s.stderr);
    // Not a speed check: without the bound the stop takes the intake's whole minute.
    assert!(took < Duration::from_secs(20), "{took:?}");
    let spilled = s.telemetry(
        r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="spilled",status="disk"}"#,
    );
    assert!(
        spilled >= 2,
        "{spilled}: the one in flight and the ones behind it"
    );
    assert!(
        !s.stderr.iter().any(|l| l.contains(r#"outcome="dropped""#)),
        "{:?}",
        s.stderr
    );

    // The next start sends all of it (the slow intake also kept the copy it held:
    // delivery after a timeout is at least once).
    let fresh = intake(IntakeConfig::default());
    let b = args(&fresh.url());
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    let w = Whippet::start(&b);
    let store = fresh.store().clone();
    poll_until("every increment at the intake", DEADLINE, || {
        let points = store.points();
        increments(&points, "a") >= 500.0 && increments(&points, "b") >= 500.0
    });
    let s = w.stop();
    assert!(s.status.success());
    let points = fresh.store().points();
    assert_eq!(increments(&points, "a"), 500.0);
    assert_eq!(increments(&points, "b"), 500.0);
    fresh.stop();
    // `slow` is left running: stopping it would wait out its minute-long answer.
    std::mem::forget(slow);
}

#[test]
fn sigterm_ends_whippet_even_when_nobody_reads_its_stdout() {
    let dir = TempDir::new();
    let fifo = dir.path("stdout.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // Opened for reading and never read: once its 64 KiB are full, writes block.
    let _unread = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let socket = dir.path("dsd.socket");
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(format!(
        "exec {} --allow-root --udp 127.0.0.1:0 --socket {} --shutdown-timeout 1s >{}",
        binary(),
        socket.display(),
        fifo.display()
    ));
    let w = Whippet::spawn_command(&mut command, &[], dir);
    // About 3 MB of console lines for the final flush.
    for i in 0..2000 {
        let packet: String = (0..20)
            .map(|j| format!("blocked.stdout.metric.{i}.{j}:1|c\n"))
            .collect();
        w.send_unix(packet.as_bytes());
    }
    let stopping = Instant::now();
    let s = w.stop();
    let took = stopping.elapsed();
    assert_eq!(s.status.code(), Some(1), "{:?}", s.stderr);
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(
        s.stderr
            .iter()
            .any(|l| l.contains("shutdown overran --shutdown-timeout by 5 s")),
        "{:?}",
        s.stderr
    );
}

#[test]
fn a_final_flush_bigger_than_the_retry_queue_reaches_a_slow_intake_whole() {
    // Each answer is held 300 ms and one request goes at a time, while payloads may wait for
    // 512 KiB: the final flush of 60,000 contexts (about 1.5 MB of payloads, some 240 KB for
    // each chunk of 10,000) fits only if it waits for the intake as it goes. Without that, it
    // queues every chunk at once and the oldest payloads are pushed out.
    let slow = intake(IntakeConfig {
        delay: Duration::from_millis(300),
        ..IntakeConfig::default()
    });
    let w = Whippet::to_intake(
        &slow.url(),
        &[
            "--retry-queue-bytes",
            "524288",
            "--forwarder-threads",
            "1",
            "--shutdown-timeout",
            "60s",
        ],
    );
    const CONTEXTS: u64 = 60_000;
    // Tags a compressor cannot shrink much: 16 random bytes in hex each (xorshift).
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let lines: Vec<String> = (0..CONTEXTS)
        .map(|i| {
            format!(
                "final.flush:1|g|#id:{i},r:{:016x}{:016x}\n",
                random(),
                random()
            )
        })
        .collect();
    for packet in lines.chunks(100) {
        w.send_unix(packet.concat().as_bytes());
    }
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    for endpoint in ["/api/v2/series", "/api/beta/sketches"] {
        let key = format!(
            r#"whippet_payloads_total{{endpoint="{endpoint}",outcome="dropped",status="retry_queue_full"}}"#
        );
        assert_eq!(s.telemetry_or_zero(&key), 0, "{endpoint}");
    }
    let points = slow.store().points();
    let flushed = points.iter().filter(|p| p.metric == "final.flush").count();
    assert_eq!(flushed as u64, CONTEXTS);
    slow.stop();
}
