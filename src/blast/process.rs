//! A whippet binary run as a child process, as the benchmark and the integration tests run
//! it: started with only the environment it is given; ready when it says `READY=1` on a
//! notification socket of the caller's (the systemd protocol whippet speaks anyway), not
//! when its log reads a certain way; its listeners read from the kernel's socket tables (so
//! port 0 resolves without parsing a log line); stopped with SIGTERM; its output, final
//! telemetry and peak memory, shutdown included, read back.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long anything may take before a wait gives up: generous, since CI machines are slow.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Calls `done` every few milliseconds until it returns true; panics, naming `what`, once
/// `within` has passed.
pub fn poll_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < end, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The lines of a child's pipe, read by a thread of their own, kept as they arrive.
pub struct Lines {
    rx: Receiver<String>,
    seen: RefCell<Vec<String>>,
}

impl Lines {
    pub fn of(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: RefCell::default(),
        }
    }

    /// No lines at all.
    fn none() -> Lines {
        Lines {
            rx: channel().1,
            seen: RefCell::default(),
        }
    }

    /// How many lines have been seen so far.
    pub fn count(&self) -> usize {
        self.seen.borrow().len()
    }

    /// The first line from the `from`th on for which `pred` holds, waiting for more lines
    /// until [`DEADLINE`]; `Err` with every line seen when none comes or the pipe closes.
    pub fn wait_from(&self, from: usize, pred: impl Fn(&str) -> bool) -> Result<String, String> {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(line) = self.seen.borrow()[from.min(self.count())..]
                .iter()
                .find(|l| pred(l))
            {
                return Ok(line.clone());
            }
            match self
                .rx
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(line) => self.seen.borrow_mut().push(line),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("not within {DEADLINE:?}: {:?}", self.seen.borrow()))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("the pipe closed: {:?}", self.seen.borrow()))
                }
            }
        }
    }

    /// Every line, once the pipe has closed.
    pub fn all(self) -> Vec<String> {
        let mut seen = self.seen.into_inner();
        seen.extend(self.rx.iter());
        seen
    }
}

/// Sockets a process listens on, from `/proc/PID/net/{udp,udp6,tcp,tcp6,unix}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listeners {
    pub udp: Option<SocketAddr>,
    /// TCP sockets listening (the status endpoint).
    pub tcp: Vec<SocketAddr>,
    pub unix_datagram: Option<PathBuf>,
    pub unix_stream: Option<PathBuf>,
}

impl Listeners {
    pub fn of(pid: u32) -> Listeners {
        let table = |name: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{name}")).unwrap_or_default()
        };
        let ip = |a: &str, b: &str| table(a) + &table(b);
        Listeners::from_tables(
            &socket_inodes(pid),
            &ip("udp", "udp6"),
            &ip("tcp", "tcp6"),
            &table("unix"),
        )
    }

    /// The sockets among `inodes` in the text of the kernel's tables (their header lines
    /// included).
    fn from_tables(inodes: &[u64], udp: &str, tcp: &str, unix: &str) -> Listeners {
        let rows = |text: &str| -> Vec<Vec<String>> {
            text.lines()
                .filter(|l| {
                    !l.trim_start()
                        .starts_with(|c: char| c.is_ascii_alphabetic())
                })
                .map(|l| l.split_whitespace().map(str::to_string).collect())
                .collect()
        };
        let ours = |row: &[String], at: usize| {
            row.get(at)
                .and_then(|i| i.parse::<u64>().ok())
                .is_some_and(|i| inodes.contains(&i))
        };
        let mut out = Listeners::default();
        // sl local rem st tx:rx tr:tm retrnsmt uid timeout inode
        for row in rows(udp) {
            // 07: not connected. A connected socket sends (the mirror), it does not listen.
            if ours(&row, 9) && row[3] == "07" && out.udp.is_none() {
                out.udp = address(&row[1]);
            }
        }
        for row in rows(tcp) {
            // 0A: LISTEN.
            if ours(&row, 9) && row[3] == "0A" {
                out.tcp.extend(address(&row[1]));
            }
        }
        // Num RefCount Protocol Flags Type St Inode Path
        for row in rows(unix) {
            let (Some(path), true) = (row.get(7), ours(&row, 6)) else {
                continue;
            };
            // __SO_ACCEPTCON: a listening stream socket, not a connection accepted from it.
            let listening = u32::from_str_radix(&row[3], 16).is_ok_and(|f| f & 0x10000 != 0);
            match row[4].as_str() {
                "0002" => out.unix_datagram = Some(PathBuf::from(path)),
                "0001" if listening => out.unix_stream = Some(PathBuf::from(path)),
                _ => {}
            }
        }
        out
    }
}

/// The inodes of the sockets a process holds open.
fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word of the
/// address in host byte order, the port big-endian.
fn address(hex: &str) -> Option<SocketAddr> {
    let (ip, port) = hex.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words[..] {
        [v4] => IpAddr::V4(Ipv4Addr::from(v4.to_be_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The telemetry whippet writes to its log (`whippet: telemetry NAME{LABELS} VALUE`) on
/// SIGUSR1 and at exit: the last value of each reading.
#[derive(Debug, Clone, Default)]
pub struct LoggedTelemetry(BTreeMap<String, u64>);

impl LoggedTelemetry {
    pub fn from_log(lines: &[String]) -> LoggedTelemetry {
        let mut values = BTreeMap::new();
        for line in lines {
            let Some(reading) = line.strip_prefix("whippet: telemetry ") else {
                continue;
            };
            if let Some((key, value)) = reading.rsplit_once(' ') {
                if let Ok(v) = value.parse() {
                    values.insert(key.to_string(), v);
                }
            }
        }
        LoggedTelemetry(values)
    }

    /// The reading `key`, exactly as written: `whippet_samples_total`,
    /// `whippet_packets_total{transport="udp"}`.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.0.get(key).copied()
    }

    /// The sum of every reading named `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }
}

/// A running whippet process.
pub struct Process {
    child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
    notify: UnixDatagram,
    /// Notifications read while waiting for READY=1, not yet asked for.
    pending: RefCell<std::collections::VecDeque<String>>,
    /// What the listeners ended up as, read once it was ready.
    pub listeners: Listeners,
}

/// What a stopped process left behind.
pub struct Exited {
    pub status: ExitStatus,
    /// Peak resident memory (`VmHWM`, KiB) at the last look before it exited, every few
    /// milliseconds while it stopped: the shutdown's included. (`wait4`'s `ru_maxrss` would
    /// also count the copy of the parent that the child was before it called `exec`.)
    pub peak_rss_kib: u64,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    /// Notifications not yet read when it exited.
    pub notifications: Vec<String>,
}

impl Process {
    /// Starts `command` (whippet, or a wrapper that execs it) with only `env`, stdout and
    /// stderr piped, and a notification socket in `dir`; waits until whippet says READY=1.
    /// `Err` says why it did not get ready (its stderr included).
    pub fn start(
        command: &mut Command,
        env: &[(&str, &str)],
        dir: &Path,
    ) -> Result<Process, String> {
        let path = dir.join("notify.socket");
        let _ = std::fs::remove_file(&path);
        let notify = UnixDatagram::bind(&path)
            .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        let mut child = command
            .env_clear()
            .envs(env.iter().copied())
            .env("NOTIFY_SOCKET", &path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {command:?}: {e}"))?;
        let stdout = Lines::of(child.stdout.take().ok_or("no stdout")?);
        let stderr = Lines::of(child.stderr.take().ok_or("no stderr")?);
        let mut p = Process {
            child,
            stdout,
            stderr,
            notify,
            pending: RefCell::default(),
            listeners: Listeners::default(),
        };
        match p.wait_ready() {
            Ok(()) => {
                p.listeners = Listeners::of(p.pid());
                Ok(p)
            }
            Err(e) => {
                p.kill();
                Err(e)
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                let stderr = self.stderr.wait_from(0, |_| false).unwrap_err();
                return Err(format!(
                    "whippet exited ({status}) before it was ready: {stderr}"
                ));
            }
            if let Some(n) = self.receive(Duration::from_millis(50)) {
                let ready = n.lines().any(|l| l == "READY=1");
                self.pending.borrow_mut().push_back(n);
                if ready {
                    return Ok(());
                }
            } else if Instant::now() >= end {
                return Err(format!("whippet was not ready within {DEADLINE:?}"));
            }
        }
    }

    /// The next notification whippet sent systemd (from the first, READY=1 among them),
    /// waiting at most `wait`.
    pub fn notification(&self, wait: Duration) -> Option<String> {
        let pending = self.pending.borrow_mut().pop_front();
        pending.or_else(|| self.receive(wait))
    }

    fn receive(&self, wait: Duration) -> Option<String> {
        self.notify
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .ok()?;
        let mut buf = [0u8; 4096];
        let n = self.notify.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
    }

    /// SIGTERM, then waits for the exit (with the deadline) and collects the output.
    pub fn stop(mut self) -> Result<Exited, String> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut peak_rss_kib = 0;
        let status = self.wait_watching(|pid| {
            // It only grows; a read that fails (the process is gone) changes nothing.
            peak_rss_kib = peak_rss_kib.max(hwm_kib(pid));
        })?;
        let stdout = std::mem::replace(&mut self.stdout, Lines::none());
        let stderr = std::mem::replace(&mut self.stderr, Lines::none());
        let mut notifications = Vec::new();
        while let Some(n) = self.notification(Duration::from_millis(1)) {
            notifications.push(n);
        }
        Ok(Exited {
            status,
            peak_rss_kib,
            stdout: stdout.all(),
            stderr: stderr.all(),
            notifications,
        })
    }

    /// Waits (with the deadline) for the process to exit by itself.
    pub fn wait(&mut self) -> Result<ExitStatus, String> {
        self.wait_watching(|_| {})
    }

    /// [`Process::wait`], calling `look` with the pid before each check for the exit.
    fn wait_watching(&mut self, mut look: impl FnMut(u32)) -> Result<ExitStatus, String> {
        let end = Instant::now() + DEADLINE;
        loop {
            look(self.child.id());
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status);
            }
            if Instant::now() >= end {
                self.kill();
                return Err(format!("whippet did not exit within {DEADLINE:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmHWM` of process `pid`, KiB; 0 if it cannot be read.
pub fn hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_socket_addresses_decode() {
        let cases = [
            ("0100007F:1F90", "127.0.0.1:8080"),
            ("00000000:0000", "0.0.0.0:0"),
            ("00000000000000000000000001000000:1F90", "[::1]:8080"),
        ];
        for (hex, want) in cases {
            assert_eq!(address(hex), Some(want.parse().unwrap()), "{hex}");
        }
        assert_eq!(address("nonsense"), None);
    }

    #[test]
    fn listeners_are_the_process_sockets_in_the_kernel_tables() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1: 0100007F:1F8D 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 900 2 0 0
 0: 0100007F:C2D3 0100007F:D162 01 00000000:00000000 00:00000000 00000000  1000        0 10 2 0 0
 2: 0100007F:A1B2 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 11 2 0 0
";
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12 1 0
   1: 0100007F:1389 0100007F:D3C2 01 00000000:00000000 00:00000000 00000000  1000        0 13 1 0
";
        let unix = "Num       RefCount Protocol Flags    Type St Inode Path
0000000032709caf: 00000002 00000000 00000000 0002 01    14 /tmp/w/dsd.socket
0000000032709cb0: 00000002 00000000 00010000 0001 01    15 /tmp/w/dsd-stream.socket
0000000032709cb1: 00000003 00000000 00000000 0001 03    16 /tmp/w/dsd-stream.socket
0000000032709cb2: 00000002 00000000 00010000 0001 01   901 /tmp/other.socket
";
        // Inode 10 is the process's connected UDP socket (the mirror's): not a listener.
        let found = Listeners::from_tables(&[10, 11, 12, 13, 14, 15, 16], udp, tcp, unix);
        assert_eq!(
            found,
            Listeners {
                udp: Some("127.0.0.1:41394".parse().unwrap()),
                tcp: vec!["127.0.0.1:5000".parse().unwrap()],
                unix_datagram: Some("/tmp/w/dsd.socket".into()),
                unix_stream: Some("/tmp/w/dsd-stream.socket".into()),
            }
        );
    }

    #[test]
    fn logged_telemetry_keeps_the_last_value_of_each_reading() {
        let lines: Vec<String> = [
            "whippet: telemetry whippet_samples_total 1",
            "whippet: something else",
            "whippet: telemetry whippet_packets_total{transport=\"udp\"} 2",
            "whippet: telemetry whippet_packets_total{transport=\"unix\"} 3",
            "whippet: telemetry whippet_samples_total 5",
        ]
        .map(String::from)
        .to_vec();
        let t = LoggedTelemetry::from_log(&lines);
        assert_eq!(t.get("whippet_samples_total"), Some(5));
        assert_eq!(t.get(r#"whippet_packets_total{transport="udp"}"#), Some(2));
        assert_eq!(t.get("whippet_bytes_total"), None);
        assert_eq!(t.sum("whippet_packets_total"), 5);
        assert_eq!(t.sum("whippet_packets"), 0);
    }
}
