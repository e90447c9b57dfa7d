//! The harness: the real `whippet` binary, run through [`whippet::blast::process`] (as the
//! benchmark runs it) on port 0 and temporary socket paths; real datagrams and frames; its
//! console output and final telemetry read back; an in-process test intake.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use whippet::blast::process::{LoggedTelemetry, Process};
use whippet::intake::{Intake, IntakeConfig};

pub use whippet::blast::process::{poll_until, DEADLINE};

/// A bucket so long (about 31 years) that a test's samples all land in one bucket, which the
/// shutdown flush emits: no test depends on where a boundary falls.
pub const ONE_BUCKET: &str = "1000000000";

/// A fresh directory for socket files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "whippet-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_whippet")
}

/// The test intake, in this process.
pub fn intake(config: IntakeConfig) -> Intake {
    Intake::start(config).expect("start the test intake")
}

/// Starts whippet with `--config conf`, only the Unix datagram socket `socket` and one long
/// bucket, and an empty environment.
pub fn start_with_config_on_socket(
    conf: &std::path::Path,
    socket: &std::path::Path,
    dir: TempDir,
) -> Whippet {
    let args = vec![
        "--config".into(),
        conf.display().to_string(),
        "--udp".into(),
        "off".into(),
        "--socket".into(),
        socket.display().to_string(),
        "--bucket-seconds".into(),
        ONE_BUCKET.into(),
        "--self-metrics=false".into(),
    ];
    Whippet::spawn_env(args, &[], dir)
}

/// Sends `packet` `count` times to the Unix datagram socket `socket` from a thread. Sends
/// block, so whippet's reader pushes back and none is lost.
pub fn send_blocking(
    socket: &std::path::Path,
    packet: Vec<u8>,
    count: u64,
) -> std::thread::JoinHandle<()> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let s = UnixDatagram::unbound().unwrap();
        for _ in 0..count {
            s.send_to(&packet, &socket).unwrap();
        }
    })
}

/// A running whippet.
pub struct Whippet {
    process: Process,
    /// Datagrams sent with `send_udp`, to wait for their delivery.
    udp_sent: Cell<u64>,
    pub udp: Option<SocketAddr>,
    pub socket: Option<PathBuf>,
    pub stream_socket: Option<PathBuf>,
    /// The status endpoint, when `--status` is on.
    pub status: Option<SocketAddr>,
    /// Holds the socket directory until the process is gone.
    _dir: TempDir,
}

/// What a stopped whippet left behind.
pub struct Stopped {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    /// What whippet told systemd after the test last asked.
    pub notifications: Vec<String>,
}

impl Whippet {
    /// Starts whippet with UDP on an OS-chosen port, a Unix datagram and a Unix stream socket
    /// in a temporary directory, `--hostname test-host`, one long bucket, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Whippet {
        Whippet::start_env(extra, &[])
    }

    /// [`Whippet::start`] with the environment `env`.
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Whippet {
        let dir = TempDir::new();
        let socket = dir.path("dsd.socket");
        let stream = dir.path("dsd-stream.socket");
        let mut args: Vec<String> = vec![
            "--udp".into(),
            "127.0.0.1:0".into(),
            "--socket".into(),
            socket.display().to_string(),
            "--stream-socket".into(),
            stream.display().to_string(),
            "--hostname".into(),
            "test-host".into(),
            "--bucket-seconds".into(),
            ONE_BUCKET.into(),
            // Tests count exactly what the intake gets; the vitals' own tests turn them on.
            "--self-metrics=false".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Whippet::spawn_env(args, env, dir)
    }

    /// [`Whippet::start`], forwarding to the intake at `url`.
    pub fn to_intake(url: &str, extra: &[&str]) -> Whippet {
        let mut args = vec!["--dd-url", url];
        args.extend_from_slice(extra);
        Whippet::start(&args)
    }

    /// Starts whippet with exactly `args` and an empty environment.
    pub fn spawn(args: Vec<String>, dir: TempDir) -> Whippet {
        Whippet::spawn_env(args, &[], dir)
    }

    /// Starts whippet with exactly `args` and only the environment `env` (so a developer's
    /// DD_* variables cannot change a test), and waits until it is ready.
    pub fn spawn_env(args: Vec<String>, env: &[(&str, &str)], dir: TempDir) -> Whippet {
        // Tests may run as root (CI does); whippet refuses root unless told.
        Whippet::spawn_command(
            Command::new(binary()).arg("--allow-root").args(&args),
            env,
            dir,
        )
    }

    /// Starts `command` (whippet, or a wrapper that execs it) with only `env`, and waits
    /// until it tells systemd it is ready.
    pub fn spawn_command(command: &mut Command, env: &[(&str, &str)], dir: TempDir) -> Whippet {
        let process = Process::start(command, env, &dir.0).unwrap_or_else(|e| panic!("{e}"));
        let l = process.listeners.clone();
        Whippet {
            process,
            udp_sent: Cell::new(0),
            udp: l.udp,
            socket: l.unix_datagram,
            stream_socket: l.unix_stream,
            status: l.tcp.first().copied(),
            _dir: dir,
        }
    }

    /// The next notification whippet sent systemd (the ones around its start included).
    pub fn notification(&self) -> String {
        self.process
            .notification(DEADLINE)
            .expect("a notification before the deadline")
    }

    /// Reads stderr until a line starting with `prefix` appears; panics at the deadline.
    pub fn wait_for_stderr(&self, prefix: &str) -> String {
        self.stderr_from(0, prefix)
    }

    /// Like [`Whippet::wait_for_stderr`], but only lines that arrive from now on count.
    pub fn wait_for_new_stderr(&self, prefix: &str) -> String {
        self.stderr_from(self.process.stderr.count(), prefix)
    }

    fn stderr_from(&self, from: usize, prefix: &str) -> String {
        let found = self
            .process
            .stderr
            .wait_from(from, |l| l.starts_with(prefix));
        found.unwrap_or_else(|e| panic!("no {prefix:?} on stderr: {e}"))
    }

    /// Waits (with the deadline) until whippet has printed a line for which `pred` holds,
    /// while it keeps running; returns that line.
    pub fn wait_for_stdout(&self, pred: impl Fn(&str) -> bool) -> String {
        let found = self.process.stdout.wait_from(0, pred);
        found.unwrap_or_else(|e| panic!("no such line on stdout: {e}"))
    }

    /// Sends one datagram and waits until whippet has received it: on loopback `send_to`
    /// returns before the kernel queues the datagram, and a SIGTERM must not race it.
    pub fn send_udp(&self, payload: &[u8]) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(payload, self.udp.expect("udp is on")).unwrap();
        self.udp_sent.set(self.udp_sent.get() + 1);
        self.wait_for_udp_packets(self.udp_sent.get());
    }

    /// Waits until whippet has received `n` UDP datagrams in all.
    pub fn wait_for_udp_packets(&self, n: u64) {
        self.wait_for_telemetry(r#"whippet_packets_total{transport="udp"}"#, n);
    }

    pub fn send_unix(&self, payload: &[u8]) {
        let s = UnixDatagram::unbound().unwrap();
        s.send_to(payload, self.socket.as_ref().expect("socket is on"))
            .unwrap();
    }

    /// The telemetry reading `key` now (e.g. `whippet_packets_total{transport="unix"}`):
    /// SIGUSR1, then the value it logs.
    pub fn telemetry_now(&self, key: &str) -> u64 {
        let prefix = format!("whippet: telemetry {key} ");
        self.signal(nix::sys::signal::Signal::SIGUSR1);
        let line = self.wait_for_new_stderr(&prefix);
        line[prefix.len()..].parse().unwrap()
    }

    /// Asks for the telemetry until the reading `key` shows `value`; panics at the deadline.
    pub fn wait_for_telemetry(&self, key: &str, value: u64) {
        let what = format!("telemetry {key} reaching {value}");
        poll_until(&what, DEADLINE, || self.telemetry_now(key) == value);
    }

    /// Connects to the stream socket and writes each payload as one frame.
    pub fn send_stream(&self, frames: &[&[u8]]) {
        let mut s =
            UnixStream::connect(self.stream_socket.as_ref().expect("stream is on")).unwrap();
        for f in frames {
            write_frame(&mut s, f);
        }
    }

    /// A line of `/proc/PID/status`, in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        let pid = self.process.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        self.process.signal(signal);
    }

    /// SIGTERM, then waits (with the deadline) for the exit and collects output.
    pub fn stop(self) -> Stopped {
        let exited = self.process.stop().unwrap_or_else(|e| panic!("{e}"));
        Stopped {
            status: exited.status,
            stdout: exited.stdout,
            stderr: exited.stderr,
            notifications: exited.notifications,
        }
    }
}

/// Writes one length-prefixed frame of the stream transport.
pub fn write_frame(stream: &mut UnixStream, payload: &[u8]) {
    stream
        .write_all(&(payload.len() as u32).to_le_bytes())
        .unwrap();
    stream.write_all(payload).unwrap();
}

/// Waits (with the deadline) for a child that is not whippet under the harness to exit.
pub fn wait_with_deadline(child: &mut Child) -> ExitStatus {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < end,
            "the child did not exit within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One parsed console line: kind, name, and its key=value fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub kind: String,
    pub name: String,
    pub fields: HashMap<String, String>,
}

impl Line {
    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", |s| s.as_str())
    }

    pub fn f64(&self, key: &str) -> f64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("{key} of {self:?}"))
    }
}

impl Stopped {
    /// The console's `series` and `sketch` lines (events and checks have no plain name).
    pub fn lines(&self) -> Vec<Line> {
        self.stdout.iter().filter_map(|l| parse_line(l)).collect()
    }

    /// The one line of `kind` named `name` with exactly these tags; panics if not exactly one.
    pub fn one(&self, kind: &str, name: &str, tags: &str) -> Line {
        let found: Vec<Line> = self
            .lines()
            .into_iter()
            .filter(|l| l.kind == kind && l.name == name && l.get("tags") == tags)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{kind} {name} tags={tags} in {:#?}",
            self.stdout
        );
        found.into_iter().next().unwrap()
    }

    /// A final-telemetry value: `name{labels}` exactly as printed, e.g.
    /// `whippet_messages_total{kind="metric"}`; panics when whippet never wrote it.
    pub fn telemetry(&self, key: &str) -> u64 {
        LoggedTelemetry::from_log(&self.stderr)
            .get(key)
            .unwrap_or_else(|| panic!("no telemetry {key}: {:?}", self.stderr))
    }

    /// Like [`Stopped::telemetry`], 0 when the reading is absent (sparse readings, such as
    /// network errors per cause, appear once they count something).
    pub fn telemetry_or_zero(&self, key: &str) -> u64 {
        LoggedTelemetry::from_log(&self.stderr)
            .get(key)
            .unwrap_or(0)
    }
}

/// Parses `series NAME TYPE k=v ...` or `sketch NAME k=v ...`; `tags=` is always last and
/// may hold anything.
pub fn parse_line(line: &str) -> Option<Line> {
    let (kind, rest) = line.split_once(' ')?;
    if kind != "series" && kind != "sketch" {
        return None;
    }
    let (head, tags) = rest.rsplit_once(" tags=")?;
    let mut words = head.split(' ');
    let name = words.next()?.to_string();
    let mut fields = HashMap::new();
    fields.insert("tags".to_string(), tags.to_string());
    for w in words {
        match w.split_once('=') {
            Some((k, v)) => fields.insert(k.to_string(), v.to_string()),
            None => fields.insert("type".to_string(), w.to_string()),
        };
    }
    Some(Line {
        kind: kind.to_string(),
        name,
        fields,
    })
}
