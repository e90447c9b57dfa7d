//! Faults outside and inside whippet: an intake that is down, failing, slow or resetting
//! connections; an outage longer than memory with a restart in the middle; a panic. Every
//! point sent is asserted to arrive exactly once, or to be in a named counter.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use whippet::intake::store::PointRecord;
use whippet::intake::{Intake, IntakeConfig};

use crate::support::{
    binary, intake, poll_until, wait_with_deadline, Stopped, TempDir, Whippet, DEADLINE,
};

/// A loopback address nothing listens on (yet).
fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Σ value × interval of the count points named `metric` tagged `tag`: the number of
/// increments that arrived.
fn increments(points: &[PointRecord], metric: &str, tag: &str) -> f64 {
    points
        .iter()
        .filter(|p| p.metric == metric && p.tags.iter().any(|t| t == tag))
        .map(|p| p.value * p.interval as f64)
        .sum()
}

/// Sends `n` increments of `outage.count` tagged `phase` over the Unix datagram socket (no
/// loss: the sender blocks when whippet is busy), spread over `span`.
fn send_increments(w: &Whippet, phase: &str, n: u32, span: Duration) {
    let msg = format!("outage.count:1|c|#phase:{phase}");
    let start = Instant::now();
    for i in 0..n {
        w.send_unix(msg.as_bytes());
        // Spread over several buckets (paced, not timed: any pace gives the same totals).
        let due = span.mul_f64(f64::from(i + 1) / f64::from(n));
        if let Some(rest) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// Waits until the intake holds `n` increments of every `(phase, n)`, stops whippet, and
/// checks that exactly that many arrived: nothing lost, nothing twice.
fn stop_once_delivered(w: Whippet, intake: &Intake, phases: &[(&str, u32)]) -> Stopped {
    let tag = |phase: &str| format!("phase:{phase}");
    let store = intake.store().clone();
    poll_until("every increment at the intake", DEADLINE * 2, || {
        let points = store.points();
        phases
            .iter()
            .all(|(p, n)| increments(&points, "outage.count", &tag(p)) >= f64::from(*n))
    });
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let points = store.points();
    for (p, n) in phases {
        assert_eq!(
            increments(&points, "outage.count", &tag(p)),
            f64::from(*n),
            "{p}"
        );
    }
    s
}

#[test]
fn an_outage_longer_than_memory_spills_to_disk_survives_a_restart_and_loses_nothing() {
    let addr = free_addr();
    let url = format!("http://{addr}");
    let state = TempDir::new();
    let retry_dir = state.path("retry");
    let retry_dir = retry_dir.to_str().unwrap();
    // One-second buckets compress ten-second ones tenfold; one byte of memory queue sends
    // every payload to disk at once.
    let args = [
        "--dd-url",
        &url,
        "--bucket-seconds",
        "1",
        "--retry-queue-bytes",
        "1",
        "--retry-dir",
        retry_dir,
        "--retry-base-ms",
        "50",
        "--shutdown-timeout",
        "200ms",
        // One sender, so arrival order is send order and "oldest first" can be checked.
        "--forwarder-threads",
        "1",
    ];
    let first = Whippet::start(&args);
    send_increments(&first, "before", 1500, Duration::from_secs(15));
    let s1 = first.stop();
    assert!(s1.status.success(), "{:?}", s1.stderr);
    let spilled1 = s1.telemetry(
        r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="spilled",status="disk"}"#,
    );
    assert!(spilled1 >= 15, "{spilled1} payloads spilled");
    let on_disk = std::fs::read_dir(retry_dir)
        .unwrap()
        .filter(|f| f.as_ref().unwrap().path().extension() == Some("payload".as_ref()))
        .count() as u64;
    assert_eq!(on_disk, spilled1, "every spilled payload is a file");

    // Restarted mid-outage: the payloads from before wait, new ones join them.
    let second = Whippet::start(&args);
    second.wait_for_stderr(&format!(
        "whippet: retry dir {retry_dir}: {spilled1} payload(s)"
    ));
    send_increments(&second, "after", 1500, Duration::from_secs(15));

    // The intake returns: everything arrives, oldest first, exactly once.
    let intake = intake(IntakeConfig {
        listen: addr,
        ..IntakeConfig::default()
    });
    let s2 = stop_once_delivered(second, &intake, &[("before", 1500), ("after", 1500)]);
    let points = intake.store().points();
    let first_after = points
        .iter()
        .position(|p| p.tags.iter().any(|t| t == "phase:after"))
        .unwrap();
    assert!(
        points[first_after..]
            .iter()
            .all(|p| !p.tags.iter().any(|t| t == "phase:before")),
        "the older payloads were replayed first"
    );
    for s in [&s1, &s2] {
        let dropped = s
            .stderr
            .iter()
            .filter(|l| l.contains(r#"outcome="dropped""#))
            .collect::<Vec<_>>();
        assert!(dropped.is_empty(), "{dropped:?}");
    }
    assert_eq!(s2.telemetry("whippet_retry_dir_bytes"), 0);
    intake.stop();
}

#[test]
fn an_intake_down_at_start_gets_everything_once_when_it_comes_up() {
    let addr = free_addr();
    let url = format!("http://{addr}");
    let w = Whippet::to_intake(&url, &["--retry-base-ms", "20", "--bucket-seconds", "1"]);
    send_increments(&w, "down", 500, Duration::from_secs(3));
    w.wait_for_stderr("whippet: cannot reach the intake");
    let intake = intake(IntakeConfig {
        listen: addr,
        ..IntakeConfig::default()
    });
    stop_once_delivered(w, &intake, &[("down", 500)]);
    intake.stop();
}

#[test]
fn a_minute_of_503_then_recovery_loses_nothing_and_duplicates_nothing() {
    let intake = intake(IntakeConfig {
        fail_for: Some((503, Duration::from_secs(60))),
        ..IntakeConfig::default()
    });
    let url = intake.url();
    let w = Whippet::to_intake(&url, &["--retry-base-ms", "200", "--bucket-seconds", "1"]);
    send_increments(&w, "503", 6000, Duration::from_secs(60));
    let s = stop_once_delivered(w, &intake, &[("503", 6000)]);
    let retried = s.telemetry(
        r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="retried",status="5xx"}"#,
    );
    let rejected = intake
        .store()
        .rejected()
        .get("injected_503")
        .copied()
        .unwrap_or(0);
    assert!(retried > 0);
    assert_eq!(
        retried, rejected,
        "every 503 answered was retried, nothing else"
    );
    intake.stop();
}

#[test]
fn a_slow_intake_times_out_and_every_timed_out_payload_is_retried_at_least_once() {
    // The intake stores each body before it answers, then answers late: a timed-out request
    // was stored, and its retry is stored again. The duplicates are exactly the timeouts.
    let intake = intake(IntakeConfig {
        delay: Duration::from_millis(600),
        slow_requests: 3,
        ..IntakeConfig::default()
    });
    let url = intake.url();
    let w = Whippet::to_intake(
        &url,
        &[
            "--request-timeout-ms",
            "200",
            "--retry-base-ms",
            "20",
            "--forwarder-threads",
            "1",
        ],
    );
    w.send_unix(b"slow.gauge:5|g");
    let s = w.stop();
    assert!(s.status.success());
    let timeouts = s.telemetry(
        r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="retried",status="network"}"#,
    );
    assert_eq!(timeouts, 3, "routes: {:?}", intake.store().routes());
    let cause = r#"whippet_network_errors_total{endpoint="/api/v2/series",cause="timeout"}"#;
    assert_eq!(s.telemetry(cause), 3);
    let points = intake.store().points();
    assert_eq!(points.len() as u64, 1 + timeouts);
    assert!(points
        .iter()
        .all(|p| p.metric == "slow.gauge" && p.value == 5.0));
    intake.stop();
}

/// A front for the intake that resets the first `resets` connections (accepted, then closed
/// with RST before a byte is read) and relays the rest.
fn resetting_proxy(target: SocketAddr, resets: u32) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut left = resets;
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if left > 0 {
                left -= 1;
                let _ = nix::sys::socket::setsockopt(
                    &client,
                    nix::sys::socket::sockopt::Linger,
                    &nix::libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    },
                );
                drop(client);
                continue;
            }
            let Ok(upstream) = TcpStream::connect(target) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                (upstream, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

#[test]
fn connection_resets_are_retried_and_everything_arrives_once() {
    let intake = intake(IntakeConfig::default());
    let front = resetting_proxy(intake.addr(), 4);
    let url = format!("http://{front}");
    let w = Whippet::to_intake(&url, &["--retry-base-ms", "20", "--forwarder-threads", "1"]);
    // The first reset meets the API key check at start (not retried); the other three meet
    // the payloads flushed at shutdown.
    w.wait_for_stderr("whippet: API key check failed");
    w.send_unix(b"reset.count:3|c\nreset.gauge:9|g\n_sc|reset.check|0");
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let points = intake.store().points();
    let count: Vec<_> = points
        .iter()
        .filter(|p| p.metric == "reset.count")
        .collect();
    assert_eq!(count.len(), 1);
    assert_eq!(count[0].value * count[0].interval as f64, 3.0);
    let gauge: Vec<_> = points
        .iter()
        .filter(|p| p.metric == "reset.gauge")
        .collect();
    assert_eq!(gauge.len(), 1);
    assert_eq!(gauge[0].value, 9.0);
    assert_eq!(intake.store().payloads(Some("/api/v1/check_run")).len(), 1);
    let retried: u64 = ["/api/v2/series", "/api/v1/check_run"]
        .iter()
        .map(|e| {
            s.telemetry(&format!(
                r#"whippet_payloads_total{{endpoint="{e}",outcome="retried",status="network"}}"#
            ))
        })
        .sum();
    assert_eq!(retried, 3, "each reset of a payload was one retry");
    let broken: u64 = ["/api/v2/series", "/api/v1/check_run"]
        .iter()
        .map(|e| {
            s.telemetry_or_zero(&format!(
                r#"whippet_network_errors_total{{endpoint="{e}",cause="io"}}"#
            ))
        })
        .sum();
    assert_eq!(broken, 3, "a reset is a broken connection");
    intake.stop();
}

#[test]
fn a_panic_in_any_thread_ends_the_process_with_a_failure_status() {
    // The hidden switch exists only in debug builds (what `cargo test` runs); a release
    // build ignores the variable.
    for thread in ["worker", "flusher", "unix"] {
        let dir = TempDir::new();
        let socket = dir.path("dsd.socket");
        let mut child = std::process::Command::new(binary())
            .env_clear()
            .env("WHIPPET_FAULT_INJECT", format!("panic:{thread}"))
            .args([
                "--allow-root",
                "--udp",
                "127.0.0.1:0",
                "--bucket-seconds",
                "1",
            ])
            .args(["--socket", socket.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        poll_until("the socket file", DEADLINE, || socket.exists());
        let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
        // Enough traffic to reach the worker (here the Unix reader's own: one datagram is a
        // trickle it parses itself) and the flusher.
        let _ = s.send_to(b"trigger:1|c", &socket);
        let status = wait_with_deadline(&mut child);
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        // panic = "abort": the process dies by SIGABRT, which systemd reports and restarts.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(6), "{thread}: {status:?}");
        assert!(
            err.contains(&format!("injected fault in {thread}")),
            "{thread}: {err}"
        );
    }
}

#[test]
fn sigterm_under_full_load_loses_nothing_the_socket_accepted() {
    // Two senders blast the Unix datagram socket as fast as it takes datagrams; SIGTERM lands
    // mid-stream. Every send that succeeded was accepted by the kernel into whippet's queue
    // and must be aggregated; after the stop, sends fail instead of vanishing.
    let w = Whippet::start(&["--udp", "off"]);
    let socket = w.socket.clone().unwrap();
    let started = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let senders: Vec<_> = (0..2)
        .map(|_| {
            let (socket, started) = (socket.clone(), started.clone());
            std::thread::spawn(move || {
                let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
                let packet = b"term.c:1|c\nterm.c:1|c\nterm.c:1|c\nterm.c:1|c\nterm.c:1|c";
                let mut accepted = 0u64;
                while s.send_to(packet, &socket).is_ok() {
                    accepted += 5;
                    started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                accepted
            })
        })
        .collect();
    // Under load for real: thousands of datagrams in before the signal.
    poll_until("load", DEADLINE * 2, || {
        started.load(std::sync::atomic::Ordering::Relaxed) >= 20_000
    });
    let s = w.stop();
    let accepted: u64 = senders.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(s.status.success());
    assert_eq!(s.telemetry("whippet_samples_total"), accepted);
    let value = s.one("series", "term.c", "").f64("value");
    assert_eq!((value * 1e9).round() as u64, accepted);
}

#[test]
fn an_intake_with_an_untrusted_certificate_is_refused_not_trusted() {
    // A self-signed TLS server (openssl s_server) at --dd-url https://…: whippet must refuse
    // the handshake (no setting turns verification off), retry, and never send a payload.
    let dir = TempDir::new();
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (the tests need it; .ci/run installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let addr = free_addr();
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-www", "-accept"])
        .arg(addr.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    poll_until("the TLS server", DEADLINE * 2, || {
        TcpStream::connect(addr).is_ok()
    });
    let url = format!("https://{addr}");
    let w = Whippet::to_intake(
        &url,
        &["--retry-base-ms", "20", "--shutdown-timeout", "300ms"],
    );
    let refused = w.wait_for_stderr("whippet: API key check failed");
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    w.send_unix(b"tls.gauge:1|g");
    let s = w.stop();
    let _ = server.kill();
    let _ = server.wait();
    assert!(s.status.success());
    let key = |outcome: &str, status: &str| {
        format!(
            r#"whippet_payloads_total{{endpoint="/api/v2/series",outcome="{outcome}",status="{status}"}}"#
        )
    };
    let cause = |cause: &str| {
        s.telemetry_or_zero(&format!(
            r#"whippet_network_errors_total{{endpoint="/api/v2/series",cause="{cause}"}}"#
        ))
    };
    // Every try failed its handshake, except that one still on the way at SIGTERM may run
    // out of the time left before the shutdown deadline, which bounds its timeout.
    assert!(cause("tls") >= 1);
    assert!(cause("timeout") <= 1, "{}", cause("timeout"));
    assert_eq!(
        s.telemetry(&key("retried", "network")),
        cause("tls") + cause("timeout")
    );
    assert_eq!(s.telemetry(&key("dropped", "shutdown")), 1);
    assert!(!s.stderr.iter().any(|l| l.contains(r#"outcome="sent""#)));
}

#[test]
fn a_redirecting_intake_never_gets_the_key_to_a_second_host_and_its_3xx_is_retried() {
    // 301 would turn the POST into a body-less GET; 307 would resend it, key and all.
    for status in [301u16, 307] {
        let elsewhere = intake(IntakeConfig::default());
        let redirecting = intake(IntakeConfig {
            redirect: Some((status, elsewhere.url())),
            ..IntakeConfig::default()
        });
        let w = Whippet::to_intake(
            &redirecting.url(),
            &[
                "--api-key",
                "the-key",
                "--retry-base-ms",
                "10",
                "--shutdown-timeout",
                "200ms",
            ],
        );
        w.send_udp(b"moved:1|g");
        // The bucket flushes at the stop, then retries until --shutdown-timeout.
        let s = w.stop();
        assert!(s.status.success());
        let retried =
            r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="retried",status="3xx"}"#;
        assert!(s.telemetry(retried) >= 1);
        assert_eq!(elsewhere.store().routes(), Default::default(), "{status}");
        let routes = redirecting.store().routes();
        assert_eq!(routes.get("/api/v1/validate"), Some(&1), "{status}");
        // Every request answered 3xx is counted once. One still on the way at SIGTERM may
        // reach the intake and then run out of the time left before the shutdown deadline.
        let timeouts = s.telemetry_or_zero(
            r#"whippet_network_errors_total{endpoint="/api/v2/series",cause="timeout"}"#,
        );
        assert!(timeouts <= 1, "{status}: {timeouts}");
        let requests = routes.get("/api/v2/series").copied().unwrap_or(0);
        assert!(
            (s.telemetry(retried)..=s.telemetry(retried) + timeouts).contains(&requests),
            "{status}: {requests} requests, {} answered 3xx, {timeouts} timed out",
            s.telemetry(retried)
        );
        assert!(redirecting.store().payloads(None).is_empty());
        assert_eq!(
            s.telemetry(r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="dropped",status="shutdown"}"#),
            1
        );
        assert_eq!(
            s.telemetry_or_zero(
                r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="sent",status="2xx"}"#
            ),
            0
        );
        let warned: Vec<_> = s
            .stderr
            .iter()
            .filter(|l| l.contains("never follows redirects"))
            .collect();
        assert!(
            warned.iter().any(|l| l.contains(&elsewhere.url())),
            "{status}: {:?}",
            s.stderr
        );
        elsewhere.stop();
        redirecting.stop();
    }
}

/// libfaketime, which .ci/run installs: it moves the wall clock by the offset written in a
/// file, leaving the monotonic clock alone.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn a_wall_clock_step_neither_silences_the_output_nor_merges_buckets() {
    let state = TempDir::new();
    let offset = state.path("offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let offset_file = offset.to_str().unwrap();
    let env = [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME_TIMESTAMP_FILE", offset_file),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let w = Whippet::start_env(&["--bucket-seconds", "1"], &env);
    let ts = |line: &str| -> i64 {
        let field = line.split(' ').find(|f| f.starts_with("ts=")).unwrap();
        field[3..].parse().unwrap()
    };
    let flushed = |value: u32| {
        let want = "series step.gauge gauge ";
        let value = format!(" value={value} ");
        w.wait_for_stdout(|l| l.starts_with(want) && l.contains(&value))
    };
    w.send_unix(b"step.gauge:1|g");
    let before = ts(&flushed(1));
    // An hour back: a bucket kept by the wall clock would wait an hour to close.
    std::fs::write(&offset, "-3600\n").unwrap();
    w.send_unix(b"step.gauge:2|g");
    let back = ts(&flushed(2));
    // The next bucket is a point of its own, not merged into the one before.
    w.send_unix(b"step.gauge:3|g");
    let next = ts(&flushed(3));
    // And an hour forward.
    std::fs::write(&offset, "+3600\n").unwrap();
    w.send_unix(b"step.gauge:4|g");
    let forward = ts(&flushed(4));
    let s = w.stop();
    assert!(s.status.success());
    // Stamped by the wall clock: an hour back, then on, then two hours later.
    assert!(
        (before - 3600..before - 3600 + 30).contains(&back),
        "{before} {back}"
    );
    assert!(next > back, "{back} {next}");
    assert!(
        (before + 3600..before + 3600 + 60).contains(&forward),
        "{before} {forward}"
    );
    let lines: Vec<&String> = s
        .stdout
        .iter()
        .filter(|l| l.starts_with("series step.gauge "))
        .collect();
    for v in 1..=4 {
        let n = lines
            .iter()
            .filter(|l| l.contains(&format!(" value={v} ")))
            .count();
        assert!(n >= 1, "{v}: {lines:?}");
    }
}

#[test]
fn an_additional_intake_failing_for_a_minute_neither_delays_nor_costs_the_main_one_anything() {
    // Dual shipping: every payload goes to both intakes, each with its own key. The second
    // answers 503 for its first minute; the main one must get each increment while the
    // second is still failing, and the second must get every one, once, when it recovers.
    let main = intake(IntakeConfig {
        api_key: Some("main-key".into()),
        ..IntakeConfig::default()
    });
    let second = intake(IntakeConfig {
        api_key: Some("second-key".into()),
        fail_for: Some((503, Duration::from_secs(60))),
        ..IntakeConfig::default()
    });
    let endpoints = format!(r#"{{"{}": ["second-key"]}}"#, second.url());
    let w = Whippet::to_intake(
        &main.url(),
        &[
            "--api-key",
            "main-key",
            "--additional-endpoints",
            &endpoints,
            "--retry-base-ms",
            "200",
            "--bucket-seconds",
            "1",
        ],
    );
    let tag = "phase:early";
    send_increments(&w, "early", 1000, Duration::from_secs(3));
    let main_store = main.store().clone();
    poll_until("the early increments at the main intake", DEADLINE, || {
        increments(&main_store.points(), "outage.count", tag) >= 1000.0
    });
    // Still inside the second intake's failing minute: it has stored nothing yet.
    assert_eq!(
        increments(&second.store().points(), "outage.count", tag),
        0.0
    );
    assert!(
        second
            .store()
            .rejected()
            .get("injected_503")
            .copied()
            .unwrap_or(0)
            > 0
    );
    send_increments(&w, "late", 4000, Duration::from_secs(57));
    let second_store = second.store().clone();
    poll_until("every increment at the second intake", DEADLINE * 4, || {
        let points = second_store.points();
        increments(&points, "outage.count", tag) >= 1000.0
            && increments(&points, "outage.count", "phase:late") >= 4000.0
    });
    let s = stop_once_delivered(w, &main, &[("early", 1000), ("late", 4000)]);
    let points = second.store().points();
    assert_eq!(increments(&points, "outage.count", tag), 1000.0);
    assert_eq!(increments(&points, "outage.count", "phase:late"), 4000.0);
    // Counted apart: the second intake's retries carry its address, the main one had none.
    let at = second.url();
    let retried = s.telemetry(&format!(
        r#"whippet_payloads_total{{endpoint="/api/v2/series",outcome="retried",status="5xx",intake="{at}"}}"#
    ));
    let rejected = second
        .store()
        .rejected()
        .get("injected_503")
        .copied()
        .unwrap_or(0);
    assert_eq!(retried, rejected);
    // The main intake's readings carry its address too, so each family has one label set.
    let main_at = main.url();
    let main_sent = s.telemetry(&format!(
        r#"whippet_payloads_total{{endpoint="/api/v2/series",outcome="sent",status="2xx",intake="{main_at}"}}"#
    ));
    assert!(main_sent > 0);
    let main_retried = s.telemetry_or_zero(&format!(
        r#"whippet_payloads_total{{endpoint="/api/v2/series",outcome="retried",status="5xx",intake="{main_at}"}}"#
    ));
    assert_eq!(main_retried, 0);
    assert!(
        s.stderr
            .iter()
            .any(|l| l.contains(&format!("the intake at {at} answered 503"))),
        "{:?}",
        s.stderr
    );
    assert!(!s.stderr.iter().any(|l| l.contains("second-key")));
    main.stop();
    second.stop();
}
