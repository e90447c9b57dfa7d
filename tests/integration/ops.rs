//! Running as a daemon: config file and environment, `--check-config`, SIGHUP reload,
//! sd_notify and the watchdog, socket activation, journald priorities, log level, and the
//! status endpoint.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::process::Command;

use nix::sys::signal::Signal;
use whippet::intake::{Intake, IntakeConfig};

use crate::support::*;

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn check_config_prints_sources_and_exits_0_or_lists_every_problem_and_exits_2() {
    let dir = TempDir::new();
    let conf = dir.path("whippet.conf");
    write(
        &conf,
        "# whippet\nDD_API_KEY=\"check-secret\"\nDD_DOGSTATSD_TAGS=env:prod team:a\n",
    );
    let out = Command::new(binary())
        .env_clear()
        .env("DD_DOGSTATSD_PORT", "9000")
        .args(["--config", conf.to_str().unwrap(), "--check-config"])
        .args(["--hostname", "h1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("check-secret"), "{text}");
    let line = |flag: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(flag))
            .unwrap_or_else(|| panic!("no {flag} in {text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let at = |n: u32| format!("({}:{n})", conf.display());
    assert_eq!(line("api-key"), format!("api-key (redacted) {}", at(2)));
    assert_eq!(line("tags"), format!("tags env:prod team:a {}", at(3)));
    assert_eq!(line("port"), "port 9000 (environment)");
    assert_eq!(line("hostname"), "hostname h1 (flag)");
    // A derived default shows what it came to: the number of CPUs, at most 4.
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        line("workers"),
        format!("workers {} (default)", cpus.min(4))
    );
    assert_eq!(line("shards"), "shards 16 (default)");
    assert_eq!(line("=>"), "=> intake https://app.datadoghq.com");
    assert!(
        text.contains("=> udp                   127.0.0.1:9000\n"),
        "{text}"
    );

    write(&conf, "DD_DOGSTATSD_PORT=x\nDD_NOPE=1\n");
    let out = Command::new(binary())
        .env_clear()
        .env("DD_LOG_LEVEL", "loud")
        .args(["--config", conf.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 3, "{err}");
    assert!(err.contains(&format!(
        "whippet: DD_DOGSTATSD_PORT {}: 'x' is not a whole number",
        at(1)
    )));
    assert!(err.contains("whippet: DD_LOG_LEVEL (environment): 'loud' is not one of"));
    assert!(err.contains(&format!(
        "whippet: {}:2: DD_NOPE is not a whippet setting",
        conf.display()
    )));
}

#[test]
fn config_file_and_environment_configure_the_daemon() {
    let dir = TempDir::new();
    let conf = dir.path("whippet.conf");
    let socket = dir.path("env.socket");
    write(
        &conf,
        &format!(
            "DD_DOGSTATSD_SOCKET={}\nDD_DOGSTATSD_TAGS=\"from:file\"\n",
            socket.display()
        ),
    );
    let args = vec![
        "--config".into(),
        conf.display().to_string(),
        "--bucket-seconds".into(),
        ONE_BUCKET.into(),
    ];
    let env = [
        ("DD_DOGSTATSD_PORT", "0"), // the Agent's "UDP off"
        ("DD_HOSTNAME", "env-host"),
        ("DD_DOGSTATSD_TAGS", "from:env"), // the file wins
    ];
    let w = Whippet::spawn_env(args, &env, dir);
    assert_eq!(w.udp, None);
    assert_eq!(w.socket.as_deref(), Some(socket.as_path()));
    w.send_unix(b"cfg.gauge:2|g|#own:tag");
    w.wait_for_telemetry(r#"whippet_samples_total"#, 1);
    let s = w.stop();
    assert!(s.status.success());
    let line = s.one("series", "cfg.gauge", "from:file,own:tag");
    assert_eq!(line.get("host"), "env-host");
    assert_eq!(line.f64("value"), 2.0);
}

/// Polls the intake until `pred` holds for its points.
fn wait_points(intake: &Intake, pred: impl Fn(&[whippet::intake::store::PointRecord]) -> bool) {
    poll_until("the intake seeing the point", DEADLINE, || {
        pred(&intake.store().points())
    });
}

#[test]
fn sighup_applies_key_tags_url_and_log_level_and_rejects_a_bad_file() {
    let first = intake(IntakeConfig::default());
    let second = intake(IntakeConfig::default());
    let dir = TempDir::new();
    let conf = dir.path("whippet.conf");
    let settings = |url: &str, key: &str, tags: &str| {
        format!("DD_DD_URL={url}\nDD_API_KEY={key}\nDD_DOGSTATSD_TAGS={tags}\nDD_LOG_LEVEL=info\n")
    };
    write(&conf, &settings(&first.url(), "key-one", "phase:one"));
    let args = vec![
        "--config".into(),
        conf.display().to_string(),
        "--udp".into(),
        "127.0.0.1:0".into(),
        "--bucket-seconds".into(),
        "1".into(),
        "--retry-base-ms".into(),
        "10".into(),
    ];
    let w = Whippet::spawn_env(args, &[], dir);
    w.send_udp(b"reload.gauge:1|g");
    wait_points(&first, |p| p.iter().any(|p| p.metric == "reload.gauge"));

    write(&conf, &settings(&second.url(), "key-two", "phase:two"));
    w.signal(Signal::SIGHUP);
    w.wait_for_new_stderr("whippet: reloaded the configuration");
    w.send_udp(b"reload.gauge:2|g");
    wait_points(&second, |p| p.iter().any(|p| p.metric == "reload.gauge"));

    // A broken file is rejected whole: the old settings stay.
    write(&conf, "DD_API_KEY=key-three\nDD_DOGSTATSD_PORT=many\n");
    w.signal(Signal::SIGHUP);
    let line = w.wait_for_new_stderr("whippet: reload rejected, the old settings stay:");
    assert!(line.contains("'many' is not a whole number"), "{line}");
    assert!(!line.contains("key-three"));
    w.send_udp(b"reload.gauge:3|g");
    wait_points(&second, |p| p.iter().any(|p| p.value == 3.0));
    let s = w.stop();
    assert!(s.status.success());

    let tagged = |intake: &Intake, value: f64| {
        let p = intake.store().points();
        let p = p
            .iter()
            .find(|p| p.metric == "reload.gauge" && p.value == value)
            .unwrap_or_else(|| panic!("no {value}: {p:?}"))
            .clone();
        p.tags
    };
    assert_eq!(tagged(&first, 1.0), ["phase:one"]);
    assert_eq!(tagged(&second, 2.0), ["phase:two"]);
    assert_eq!(tagged(&second, 3.0), ["phase:two"]);
    let keys = |intake: &Intake| {
        let mut k: Vec<String> = intake
            .store()
            .payloads(None)
            .into_iter()
            .map(|p| p.api_key)
            .collect();
        k.dedup();
        k
    };
    assert_eq!(keys(&first), ["key-one"]);
    assert_eq!(keys(&second), ["key-two"]);
    for line in &s.stderr {
        assert!(
            !line.contains("key-one") && !line.contains("key-two"),
            "{line}"
        );
    }
}

#[test]
fn sighup_under_load_loses_nothing() {
    let dir = TempDir::new();
    let conf = dir.path("whippet.conf");
    write(&conf, "DD_DOGSTATSD_TAGS=gen:0\n");
    let socket = dir.path("load.socket");
    let w = start_with_config_on_socket(&conf, &socket, dir);
    const N: u64 = 20_000;
    let packet = ["load.c:1|c"; 10].join("\n");
    let sender = send_blocking(&socket, packet.into_bytes(), N / 10);
    for generation in 1..=5 {
        write(&conf, &format!("DD_DOGSTATSD_TAGS=gen:{generation}\n"));
        w.signal(Signal::SIGHUP);
        w.wait_for_new_stderr("whippet: reloaded the configuration");
    }
    sender.join().unwrap();
    w.wait_for_telemetry("whippet_samples_total", N);
    let s = w.stop();
    let total: f64 = s
        .lines()
        .iter()
        .filter(|l| l.name == "load.c")
        .map(|l| l.f64("value"))
        .sum();
    // One bucket of ONE_BUCKET seconds: each context's rate × interval is its count.
    let interval: f64 = ONE_BUCKET.parse().unwrap();
    assert_eq!((total * interval).round() as u64, N);
    assert_eq!(s.telemetry("whippet_samples_total"), N);
}

/// The next notification that is not a watchdog ping, counting the pings.
fn next_not_watchdog(mut next: impl FnMut() -> String, watchdogs: &mut u32) -> String {
    loop {
        let msg = next();
        if msg == "WATCHDOG=1" {
            *watchdogs += 1;
        } else {
            return msg;
        }
    }
}

#[test]
fn sd_notify_ready_reloading_stopping_and_watchdog() {
    let env = [("WATCHDOG_USEC", "100000")];
    let args = vec!["--udp".into(), "127.0.0.1:0".into()];
    let w = Whippet::spawn_env(args, &env, TempDir::new());
    let mut watchdogs = 0;
    let next = || w.notification();
    assert_eq!(
        next_not_watchdog(next, &mut watchdogs),
        "READY=1\nSTATUS=listening"
    );
    // The watchdog pings every WATCHDOG_USEC / 2.
    while watchdogs < 2 {
        assert_eq!(w.notification(), "WATCHDOG=1");
        watchdogs += 1;
    }
    w.signal(Signal::SIGHUP);
    let reloading = next_not_watchdog(next, &mut watchdogs);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(
        next_not_watchdog(next, &mut watchdogs),
        "READY=1\nSTATUS=listening"
    );
    let s = w.stop();
    assert!(s.status.success());
    let mut after = s.notifications.into_iter();
    let after = || after.next().expect("STOPPING=1 before the exit");
    assert_eq!(next_not_watchdog(after, &mut watchdogs), "STOPPING=1");
}

/// A close-on-exec copy of `fd` numbered 100 or above, clear of the fds 3..=5 it will be
/// moved to in the child.
fn high_copy(fd: &impl AsRawFd) -> OwnedFd {
    use nix::fcntl::{fcntl, FcntlArg};
    // SAFETY: `fd` is open for the whole call; the borrow does not outlive it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let raw = fcntl(borrowed, FcntlArg::F_DUPFD_CLOEXEC(100)).unwrap();
    // SAFETY: `raw` is the new descriptor fcntl just made, owned by nothing else.
    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
}

fn libc_dup2(from: i32, to: i32) -> i32 {
    extern "C" {
        fn dup2(oldfd: i32, newfd: i32) -> i32;
    }
    // SAFETY: dup2 takes two integers and touches no memory of ours.
    unsafe { dup2(from, to) }
}

#[test]
fn socket_activation_serves_the_passed_sockets_and_leaves_their_files() {
    let dir = TempDir::new();
    let dgram_path = dir.path("activated.socket");
    let stream_path = dir.path("activated-stream.socket");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp.local_addr().unwrap();
    let dgram = UnixDatagram::bind(&dgram_path).unwrap();
    let stream = UnixListener::bind(&stream_path).unwrap();
    let fds = [high_copy(&udp), high_copy(&dgram), high_copy(&stream)];
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // As systemd does: the sockets at fds 3, 4, 5, LISTEN_FDS=3, LISTEN_PID = the pid that
    // runs whippet (the shell execs it, keeping its pid). The flags ask for other sockets,
    // which the passed ones replace.
    let mut command = Command::new("/bin/sh");
    command.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=3 exec \"$0\" \"$@\"",
        binary(),
    ]);
    command.args(["--allow-root", "--udp", "127.0.0.1:0"]);
    command.args(["--socket", dir.path("unused.socket").to_str().unwrap()]);
    command.args(["--bucket-seconds", ONE_BUCKET, "--hostname", "h"]);
    // SAFETY: only dup2 between fork and exec, which is async-signal-safe; dup2 clears
    // close-on-exec on the copies, and the high originals close at exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            for (i, fd) in raw.iter().enumerate() {
                if libc_dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let w = Whippet::spawn_command(&mut command, &[], TempDir::new());
    drop((udp, dgram, stream, fds)); // whippet holds its own copies now
    w.wait_for_stderr("whippet: socket activation: using 3 socket(s) passed by systemd");
    assert_eq!(w.udp, Some(udp_addr));
    assert_eq!(w.socket.as_deref(), Some(dgram_path.as_path()));
    assert_eq!(w.stream_socket.as_deref(), Some(stream_path.as_path()));
    assert!(!dir.path("unused.socket").exists());
    w.send_udp(b"act.udp:1|g");
    w.send_unix(b"act.unix:2|g");
    w.send_stream(&[b"act.stream:3|g"]);
    w.wait_for_telemetry("whippet_samples_total", 3);
    let s = w.stop();
    assert!(s.status.success());
    assert_eq!(s.one("series", "act.udp", "").f64("value"), 1.0);
    assert_eq!(s.one("series", "act.unix", "").f64("value"), 2.0);
    assert_eq!(s.one("series", "act.stream", "").f64("value"), 3.0);
    // systemd owns the socket files: whippet leaves them.
    assert!(dgram_path.exists() && stream_path.exists());
}

#[test]
fn journald_priorities_and_log_level() {
    // stderr is a pipe whose device and inode whippet finds in JOURNAL_STREAM, as under
    // journald; --log-level warn hides the info lines, so readiness comes from sd_notify.
    let (read, write_end): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    let st = nix::sys::stat::fstat(&write_end).unwrap();
    let journal = format!("{}:{}", st.st_dev, st.st_ino);
    let dir = TempDir::new();
    let notify_path = dir.path("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut child = Command::new(binary())
        .env_clear()
        .env("JOURNAL_STREAM", &journal)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("DD_DD_URL", "http://127.0.0.1:9") // nothing listens: the API key check fails
        .env("DD_API_KEY", "journal-secret")
        .args([
            "--allow-root",
            "--udp",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(write_end))
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1\nSTATUS=listening");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_with_deadline(&mut child);
    assert!(status.success());
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(read), &mut text).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(
            line.starts_with("<4>whippet: ") || line.starts_with("<3>whippet: "),
            "{line}"
        );
        assert!(!line.contains("journal-secret"), "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>whippet: API key check failed")),
        "{lines:?}"
    );
}

fn get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent.get(url).call().unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

#[test]
fn status_endpoint_serves_status_metrics_and_busiest_contexts() {
    let captures = TempDir::new();
    let capture_dir = captures.path("caps").display().to_string();
    // Every optional stage on, so /metrics carries every family: an intake (nothing listens
    // there) with an additional one, whose readings add an intake label to the family.
    let w = Whippet::start(&[
        "--dd-url",
        "http://127.0.0.1:9",
        "--api-key",
        "k1",
        "--additional-endpoints",
        r#"{"http://127.0.0.1:9": ["k2"]}"#,
        "--enable-payloads-events=false",
        "--status",
        "127.0.0.1:0",
        "--tags",
        "svc:x",
        "--capture-dir",
        &capture_dir,
        "--origin-detection",
        "--docker-host",
        "off",
    ]);
    let addr = w.status.expect("the status endpoint listens");
    w.send_udp(b"busy.a:1|c\nbusy.a:1|c\nbusy.a:1|c\nbusy.b:1|c|#k:v\nbusy.b:1|c|#k:v\nbusy.c:5|g");
    w.wait_for_telemetry("whippet_samples_total", 6);

    let (code, body) = get(&format!("http://{addr}/contexts?top=2"));
    assert_eq!(code, 200);
    let top: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        top,
        serde_json::json!([
            {"name": "busy.a", "type": "c", "host": "test-host", "tags": ["svc:x"], "samples": 3},
            {"name": "busy.b", "type": "c", "host": "test-host", "tags": ["k:v", "svc:x"], "samples": 2},
        ])
    );
    let (code, body) = get(&format!("http://{addr}/metrics"));
    assert_eq!(code, 200);
    assert!(
        body.contains("# TYPE whippet_samples_total counter\nwhippet_samples_total 6\n"),
        "{body}"
    );
    // A strict parser takes it: each family once, typed before its samples, counters
    // named _total.
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&body);
    assert!(parsed.is_ok(), "{parsed:?}\n{body}");
    let repeated = "# TYPE a_total counter\na_total 1\n# TYPE b gauge\nb 1\n# TYPE a_total counter\na_total 2\n";
    assert!(
        openmetrics_parser::prometheus::parse_prometheus(repeated).is_err(),
        "the parser refuses a family typed twice"
    );
    assert!(
        body.contains("whippet_packets_total{transport=\"udp\"} 1\n"),
        "{body}"
    );
    assert!(
        body.contains("whippet_retry_queue_bytes{intake=\"http://127.0.0.1:9\"} 0\n"),
        "{body}"
    );
    let (code, body) = get(&format!("http://{addr}/status"));
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["telemetry"]["whippet_samples_total"], 6);
    let packets = &status["telemetry"]["whippet_packets_total"];
    let udp = packets
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["transport"] == "udp")
        .unwrap();
    assert_eq!(udp["value"], 1);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["tags"], serde_json::json!(["svc:x"]));
    assert_eq!(status["listeners"]["udp"], w.udp.unwrap().to_string());
    assert_eq!(get(&format!("http://{addr}/contexts?top=0")).0, 400);
    assert_eq!(get(&format!("http://{addr}/nothing")).0, 404);
    let s = w.stop();
    assert!(s.status.success());
}

#[test]
fn an_api_key_in_a_readable_config_file_draws_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    // The file's group is the test's own, as whippet's group owns the packaged file.
    for (mode, warned) in [(0o644, true), (0o640, false), (0o600, false)] {
        let dir = TempDir::new();
        let conf = dir.path("whippet.conf");
        write(
            &conf,
            "DD_API_KEY=perm-secret\nDD_DD_URL=http://127.0.0.1:9\n",
        );
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(mode)).unwrap();
        let args = vec![
            "--config".into(),
            conf.display().to_string(),
            "--udp".into(),
            "127.0.0.1:0".into(),
        ];
        let w = Whippet::spawn_env(args, &[], dir);
        let s = w.stop();
        assert!(s.status.success());
        let warning = format!(
            "whippet: {} holds the API key and others can read it (mode {mode:o}, group ",
            conf.display()
        );
        assert_eq!(
            s.stderr.iter().any(|l| l.starts_with(&warning)),
            warned,
            "mode {mode:o}: {:?}",
            s.stderr
        );
        assert!(s.stderr.iter().all(|l| !l.contains("perm-secret")));
    }
}

#[test]
fn sigusr1_answers_even_at_log_level_warn_and_core_dumps_are_off() {
    let w = Whippet::start(&["--log-level", "warn"]);
    w.send_udp(b"asked:1|c");
    // Each ask signals SIGUSR1 and waits for the line (a worker may parse the packet a
    // moment after the reader counted it).
    w.wait_for_telemetry(r#"whippet_messages_total{kind="metric"}"#, 1);
    // A core dump would hold the API key.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", w.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(fields[4..], ["0", "0", "bytes"], "{core}");
    let s = w.stop();
    assert!(s.status.success());
}

#[test]
fn no_status_client_can_stop_ingestion_or_grow_memory() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let w = Whippet::start(&["--status", "127.0.0.1:0"]);
    let addr = w.status.unwrap();
    // An endless header line: answered 431 after 8 KiB, not read forever.
    let mut endless = TcpStream::connect(addr).unwrap();
    // A server that reads forever would leave this test waiting: it fails instead.
    endless
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    endless
        .write_all(b"GET /status HTTP/1.1\r\nX-Endless: ")
        .unwrap();
    let filler = vec![b'a'; 64 * 1024];
    for _ in 0..16 {
        if endless.write_all(&filler).is_err() {
            break; // whippet answered and closed
        }
    }
    let mut answer = String::new();
    let _ = endless.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    // A thousand connections that never send a byte: no thread each, no abort.
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    w.send_udp(b"still.counted:1|c");
    // The reader counted the packet; a worker parses it a moment later.
    w.wait_for_telemetry(r#"whippet_messages_total{kind="metric"}"#, 1);
    let threads = std::fs::read_dir(format!("/proc/{}/task", w.pid()))
        .unwrap()
        .count();
    assert!(threads < 40, "{threads} threads");
    // Once they are given up on, the endpoint answers again.
    drop(idle);
    poll_until("the endpoint answering", DEADLINE, || {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 200 OK") && answer.contains("whippet_samples_total 1\n")
    });
    let s = w.stop();
    assert!(s.status.success());
}

#[test]
fn the_api_key_from_a_systemd_credential_is_used_and_never_shown_and_disabled_kinds_are_counted() {
    // The intake answers 403 to any other key: the gauge arriving proves the credential's
    // key was sent.
    let key = "credential-key-0123456789";
    let intake = intake(IntakeConfig {
        api_key: Some(key.into()),
        ..IntakeConfig::default()
    });
    let credentials = TempDir::new();
    write(&credentials.path("api_key"), &format!("{key}\n"));
    let dir = credentials.0.display().to_string();
    let w = Whippet::start_env(
        &["--dd-url", &intake.url(), "--enable-payloads-events=false"],
        &[("CREDENTIALS_DIRECTORY", &dir)],
    );
    w.send_unix(b"credential.gauge:3|g");
    w.send_unix(b"_e{5,4}:title|text");
    w.send_unix(b"_sc|credential.check|0");
    w.wait_for_telemetry(r#"whippet_packets_total{transport="unix"}"#, 3);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let points: Vec<_> = intake
        .store()
        .points()
        .into_iter()
        .map(|p| (p.metric, p.value))
        .collect();
    assert_eq!(points, [("credential.gauge".to_string(), 3.0)]);
    assert_eq!(intake.store().events().len(), 0);
    assert_eq!(intake.store().service_checks().len(), 1);
    assert_eq!(
        s.telemetry(r#"whippet_disabled_items_total{data="events"}"#),
        1
    );
    assert_eq!(
        s.telemetry_or_zero(r#"whippet_disabled_items_total{data="points"}"#),
        0
    );
    assert!(!s.stderr.iter().any(|l| l.contains(key)), "{:?}", s.stderr);
    assert!(
        !s.stderr
            .iter()
            .any(|l| l.contains("readable") || l.contains("403")),
        "{:?}",
        s.stderr
    );
    let out = Command::new(binary())
        .env_clear()
        .env("CREDENTIALS_DIRECTORY", &dir)
        .args(["--check-config"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let line = report
        .lines()
        .find(|l| l.starts_with("api-key-file"))
        .unwrap();
    assert!(line.contains("/api_key (systemd credential)"), "{line}");
    assert!(!report.contains(key), "{report}");
    intake.stop();
}

#[test]
fn whippets_vitals_reach_the_intake_with_each_flush_and_can_be_turned_off() {
    let intake = intake(IntakeConfig::default());
    let w = Whippet::to_intake(
        &intake.url(),
        &["--self-metrics=true", "--tags", "team:obs"],
    );
    w.send_unix(b"app.a:1|c\napp.b:2|g\napp.c:3|h");
    w.send_unix(b"app.bad:x|c");
    w.wait_for_telemetry(r#"whippet_packets_total{transport="unix"}"#, 2);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let mut vitals: Vec<String> = intake
        .store()
        .points()
        .into_iter()
        .filter(|p| p.metric.starts_with("whippet."))
        .filter(|p| p.metric != "whippet.aggregation.memory_bytes")
        .map(|p| {
            assert_eq!(p.host, "test-host");
            format!("{} {} {} {}", p.metric, p.kind, p.value, p.tags.join(","))
        })
        .collect();
    vitals.sort();
    let v = format!("version:{}", env!("CARGO_PKG_VERSION"));
    let want = [
        format!("whippet.contexts gauge 0 team:obs,{v}"),
        format!("whippet.messages count 3 kind:metric,team:obs,{v}"),
        format!("whippet.packets count 2 team:obs,transport:unix,{v}"),
        format!("whippet.parse_errors count 1 kind:metric,reason:invalid_value,team:obs,{v}"),
        format!("whippet.queue.depth gauge 0 team:obs,{v}"),
        format!("whippet.retry_dir.bytes gauge 0 team:obs,{v}"),
        format!("whippet.retry_queue.bytes gauge 0 team:obs,{v}"),
        format!("whippet.running gauge 1 team:obs,{v}"),
        format!("whippet.samples count 3 team:obs,{v}"),
    ];
    assert_eq!(vitals, want);
    // Off: nothing of whippet's own.
    let intake2 = crate::support::intake(IntakeConfig::default());
    let w = Whippet::to_intake(&intake2.url(), &["--self-metrics=false"]);
    w.send_unix(b"app.a:1|c");
    w.wait_for_telemetry(r#"whippet_packets_total{transport="unix"}"#, 1);
    let s = w.stop();
    assert!(s.status.success());
    let names: Vec<String> = intake2
        .store()
        .points()
        .into_iter()
        .map(|p| p.metric)
        .collect();
    assert_eq!(names, ["app.a"]);
    intake.stop();
    intake2.stop();
}
