//! Starting, stopping and signals: startup errors name the flag, stale sockets are replaced,
//! SIGTERM drains and flushes everything, SIGUSR1 logs telemetry.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;

use crate::support::{binary, wait_with_deadline, TempDir, Whippet, ONE_BUCKET};

/// Runs whippet expecting it to fail at startup; returns (exit code, stderr).
fn fails(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(binary())
        .arg("--allow-root")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut child);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code().unwrap_or(-1), err)
}

#[test]
fn sigterm_when_idle_exits_zero_and_removes_the_socket_files() {
    let w = Whippet::start(&[]);
    let (socket, stream) = (w.socket.clone().unwrap(), w.stream_socket.clone().unwrap());
    assert!(socket.exists() && stream.exists());
    let s = w.stop();
    assert_eq!(s.status.code(), Some(0), "{:?}", s.stderr);
    assert!(!socket.exists() && !stream.exists());
    assert_eq!(
        s.stderr.last().map(String::as_str),
        Some("whippet: stopped")
    );
    assert!(s.stdout.is_empty(), "{:?}", s.stdout);
}

#[test]
fn sigint_stops_like_sigterm() {
    let w = Whippet::start(&[]);
    w.send_udp(b"x:1|c");
    // SIGINT through the same path as SIGTERM: `stop` sends SIGTERM, so send SIGINT first.
    w.signal(Signal::SIGINT);
    let s = w.stop();
    assert_eq!(s.status.code(), Some(0));
    assert_eq!(s.one("series", "x", "").f64("value"), 1.0 / 1e9);
}

#[test]
fn the_open_bucket_is_flushed_at_shutdown_with_data_still_in_a_stream_connection() {
    let w = Whippet::start(&[]);
    // A client that wrote and is still connected when SIGTERM arrives.
    let mut client =
        std::os::unix::net::UnixStream::connect(w.stream_socket.as_ref().unwrap()).unwrap();
    let payload = b"held:5|g";
    crate::support::write_frame(&mut client, payload);
    let s = w.stop();
    drop(client);
    assert_eq!(s.one("series", "held", "").f64("value"), 5.0);
}

#[test]
fn sigusr1_logs_the_telemetry_while_running() {
    let w = Whippet::start(&[]);
    w.send_unix(b"a:1|c\nnot-a-metric");
    // The datagram may still be in flight when the first snapshot is taken.
    w.wait_for_telemetry(r#"whippet_packets_total{transport="unix"}"#, 1);
    let s = w.stop();
    assert_eq!(
        s.telemetry("whippet_parse_errors_total{kind=\"metric\",reason=\"missing_type\"}"),
        1
    );
}

#[test]
fn unix_sockets_get_the_configured_mode() {
    for (flag, want) in [(None, 0o722), (Some("0700"), 0o700)] {
        let mut extra = vec![];
        if let Some(mode) = flag {
            extra = vec!["--socket-mode", mode];
        }
        let w = Whippet::start(&extra);
        for path in [
            w.socket.as_ref().unwrap(),
            w.stream_socket.as_ref().unwrap(),
        ] {
            let meta = std::fs::metadata(path).unwrap();
            assert!(meta.file_type().is_socket());
            assert_eq!(
                meta.permissions().mode() & 0o777,
                want,
                "{}",
                path.display()
            );
        }
        w.stop();
    }
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = TempDir::new();
    let path = dir.path("stale.socket");
    drop(UnixDatagram::bind(&path).unwrap()); // leaves the file, nobody listening
    assert!(path.exists());
    let args = vec![
        "--udp".into(),
        "off".into(),
        "--socket".into(),
        path.display().to_string(),
        "--bucket-seconds".into(),
        ONE_BUCKET.into(),
    ];
    let w = Whippet::spawn(args, dir);
    w.send_unix(b"fresh:1|g");
    let s = w.stop();
    assert_eq!(s.one("series", "fresh", "").f64("value"), 1.0);
}

#[test]
fn startup_errors_name_the_flag_and_exit_nonzero() {
    let dir = TempDir::new();
    let file = dir.path("plain-file");
    std::fs::write(&file, b"not a socket").unwrap();
    let live = dir.path("live.socket");
    let _listener = UnixDatagram::bind(&live).unwrap();
    let file_s = file.display().to_string();
    let live_s = live.display().to_string();
    let missing_dir = dir.path("no/such/dir/s.socket").display().to_string();
    let cases: Vec<(Vec<&str>, i32, String)> = vec![
        (vec!["--udp", "off", "--socket", &file_s], 1, format!("{file_s} exists and is not a socket; remove it or choose another path with --socket")),
        (vec!["--udp", "off", "--stream-socket", &file_s], 1, "choose another path with --stream-socket".into()),
        (vec!["--udp", "off", "--socket", &live_s], 1, "another process is listening".into()),
        (vec!["--udp", "off", "--socket", &missing_dir], 1, "cannot bind".into()),
        (vec!["--buffer-size", "1000000"], 2, "--buffer-size: 1000000 is outside 512..=65536".into()),
        (vec!["--udp", "nope"], 2, "--udp: 'nope' is not an address".into()),
        (vec!["--udp", "off"], 2, "no listener: --udp is off and neither --socket nor --stream-socket is set".into()),
        (
            vec!["--udp", "127.0.0.1:0", "--dd-url", "http://127.0.0.1:9", "--retry-dir", &file_s],
            1,
            format!("--retry-dir {file_s}: cannot create the directory"),
        ),
    ];
    for (args, code, message) in cases {
        let (got, err) = fails(&args);
        assert_eq!(got, code, "{args:?}: {err}");
        assert!(err.contains(&message), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
}

#[test]
fn udp_port_in_use_is_a_startup_error_naming_the_flag() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = fails(&["--udp", &addr]);
    // SO_REUSEPORT lets only sockets of the same user share a port; another owner's plain
    // bind (as here) makes ours fail.
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("(--udp)"), "{err}");
}

#[test]
fn help_lists_every_flag_and_version_prints_the_version() {
    let out = Command::new(binary()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--udp",
        "--udp-readers",
        "--so-rcvbuf",
        "--socket",
        "--socket-mode",
        "--stream-socket",
        "--buffer-size",
        "--queue-size",
        "--workers",
        "--shards",
        "--tags",
        "--hostname",
        "--bucket-seconds",
        "--histogram-aggregates",
        "--histogram-percentiles",
        "--expiry-seconds",
        "--context-expiry-seconds",
    ] {
        assert!(
            help.contains(&format!("{flag} ")),
            "{flag} missing from --help"
        );
    }
    let out = Command::new(binary()).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("whippet {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn closed_buckets_are_flushed_while_running_and_counters_then_report_zero() {
    let w = Whippet::start(&["--bucket-seconds", "1", "--expiry-seconds", "3"]);
    w.send_udp(b"live.count:5|c\nlive.gauge:2|g");
    let first = w.wait_for_stdout(|l| l.starts_with("series live.count rate "));
    assert!(first.contains(" value=5 interval=1 "), "{first}");
    let gauge = w.wait_for_stdout(|l| l.starts_with("series live.gauge gauge "));
    assert!(gauge.contains(" value=2 "), "{gauge}");
    // The next closed buckets carry a zero for the counter, and nothing for the gauge.
    let zero =
        w.wait_for_stdout(|l| l.starts_with("series live.count rate ") && l.contains(" value=0 "));
    let ts = |line: &str| -> i64 {
        line.split(" ts=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(ts(&zero) > ts(&first), "{first} / {zero}");
    let s = w.stop();
    assert!(s.status.success());
    let gauges = s
        .stdout
        .iter()
        .filter(|l| l.starts_with("series live.gauge "))
        .count();
    assert_eq!(gauges, 1, "gauges are not zero-filled: {:?}", s.stdout);
}
