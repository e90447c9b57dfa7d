//! `whippet-blast bench`: starts the release `whippet` binary against an in-process intake,
//! drives each scenario, stops whippet with SIGTERM and prints one row per scenario: offered
//! and achieved messages/s, whippet's CPU per message and peak RSS (from `/proc`), and the
//! accounting — every message sent must be parsed, rejected, or dropped under a named
//! counter; `unaccounted` must be 0, or, where the kernel dropped or truncated datagrams
//! (counted in packets, converted to messages), within what that conversion can be off by
//! ([`Row::accounted`]). A `floor` row runs the same sender against a receiver
//! that only drains the socket with `recvmmsg` (`whippet-blast sink`): this machine's limit.
//! The two are started together and sent to in turns.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::process::{hwm_kib, Lines, LoggedTelemetry, Process};
use super::{pack, send, Bursts, Generated, Plan, Sent, Target};
use crate::intake::{Intake, IntakeConfig};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub whippet: PathBuf,
    pub blast: PathBuf,
    pub corpus: Vec<Vec<u8>>,
    pub seconds: f64,
    pub smoke: bool,
    /// Only the non-blocking burst scenario, its rows without the table's head: how the
    /// benchmark runs itself again in a network namespace of its own with another
    /// `net.unix.max_dgram_qlen`.
    pub bursts_only: bool,
    /// The scaling table instead of the scenarios: UDP all-out over readers × workers ×
    /// senders, up to this machine's cores (docs/performance.md, "Many cores").
    pub scaling: bool,
    /// The scaling table's values on each axis, where given instead of the doubling.
    pub axes: Axes,
    /// Only the scenarios whose names contain this text (with their floors).
    pub only: Option<String>,
}

/// One row of the table.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub scenario: String,
    pub offered: Option<u64>,
    pub sent: Sent,
    pub cpu_seconds: f64,
    /// The part of `cpu_seconds` spent by the workers, the flusher and the forwarders: parse
    /// through serialize and send. The rest is receiving (reader threads, mostly the kernel's
    /// copy). `None` for a floor row.
    pub pipeline_seconds: Option<f64>,
    pub peak_rss_kib: u64,
    /// Messages parsed or rejected by the parser.
    pub received: u64,
    /// Messages dropped under a named counter (queue full, kernel drops estimated).
    pub counted_drops: u64,
    /// Of those, the messages a full packet queue dropped (counted exactly).
    pub queue_full: u64,
    pub kernel_drop_packets: u64,
    /// Datagrams longer than whippet's `--buffer-size`, not parsed.
    pub truncated_packets: u64,
    pub unaccounted: i64,
    /// How far `unaccounted` may be from 0 for the estimate alone: the kernel's drops and the
    /// truncations are counted in packets, and a packet of the workload holds between its
    /// fewest and its most messages.
    pub estimate_margin: u64,
    pub points_at_intake: usize,
    /// Sent by a non-blocking client in bursts: `sent` carries what the kernel refused.
    pub bursts: bool,
}

impl Row {
    /// Every message sent was parsed, rejected, or dropped under a named counter, to within
    /// what converting dropped packets to messages can be off by.
    pub fn accounted(&self) -> bool {
        self.unaccounted.unsigned_abs() <= self.estimate_margin
    }

    fn us_per_message(&self) -> f64 {
        self.per_message(self.cpu_seconds)
    }

    fn per_message(&self, seconds: f64) -> f64 {
        seconds * 1e6 / self.received.max(1) as f64
    }
}

/// How far converting `packets` lost packets to messages can be off: each of the workload's
/// packets holds between its fewest and its most messages.
fn estimate_margin(packets: u64, workload: &[(Vec<u8>, u64)]) -> u64 {
    let (fewest, most) = workload
        .iter()
        .fold((u64::MAX, 0), |(lo, hi), &(_, n)| (lo.min(n), hi.max(n)));
    packets * most.saturating_sub(fewest)
}

fn clock_ticks() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on Linux for every architecture whippet targets.
    100.0
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu(&format!("/proc/{pid}/stat")).1
}

/// (command name, utime + stime in seconds) from a `/proc/…/stat` file.
fn stat_cpu(path: &str) -> (String, f64) {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // The command name is between the first '(' and the last ')' (it may hold spaces).
    let (head, rest) = stat.rsplit_once(')').unwrap_or_default();
    let name = head.split_once('(').map_or("", |x| x.1).to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (name, (get(11) + get(12)) / clock_ticks())
}

/// Threads that parse, aggregate, serialize and send, by their names' prefixes (Linux keeps
/// 15 bytes of a thread's name).
const PIPELINE_THREADS: [&str; 3] = ["whippet-worker", "whippet-flusher", "whippet-forward"];

/// CPU seconds of each pipeline thread of a process, by thread id.
fn pipeline_cpu(pid: u32) -> Vec<(String, f64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .map(|t| {
            let (name, secs) = stat_cpu(&format!("{}/stat", t.path().display()));
            (t.file_name().to_string_lossy().into_owned(), name, secs)
        })
        .filter(|(_, name, _)| PIPELINE_THREADS.iter().any(|p| name.starts_with(p)))
        .map(|(tid, _, secs)| (tid, secs))
        .collect()
}

/// CPU seconds the pipeline threads spent between two [`pipeline_cpu`] readings. A thread
/// that ended between them is missed; whippet's pipeline threads live as long as it does.
fn pipeline_delta(before: &[(String, f64)], after: &[(String, f64)]) -> f64 {
    after
        .iter()
        .map(|(tid, secs)| {
            let start = before.iter().find(|(t, _)| t == tid).map_or(0.0, |b| b.1);
            secs - start
        })
        .sum()
}

/// Stops the drain-only sink and waits for it.
fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

/// Which socket a scenario uses.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    Udp,
    Unix,
    Stream,
}

struct Scenario {
    name: String,
    via: Via,
    rate: Option<u64>,
    workload: Vec<(Vec<u8>, u64)>,
    /// A client that never blocks, sending in bursts.
    bursts: Option<Bursts>,
    /// Flags given to whippet besides the bench's own (`--workers N`).
    flags: Vec<String>,
    /// Senders at once, each its own socket and thread.
    senders: usize,
    /// The sender on one CPU and the receiver (the sink, or every thread of whippet) on
    /// another, so that where the scheduler puts each thread does not decide the row.
    pinned: Option<Pinned>,
}

/// The two CPUs of a pinned scenario: the first two this process may use.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pinned {
    sender: usize,
    receiver: usize,
}

impl Pinned {
    /// `None` where this process may use fewer than two CPUs.
    fn here() -> Option<Pinned> {
        match allowed_cpus()[..] {
            [sender, receiver, ..] => Some(Pinned { sender, receiver }),
            _ => None,
        }
    }
}

/// The CPUs this thread may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain bits, all zeroes a valid empty set; sched_getaffinity
    // writes at most its size, and CPU_ISSET reads inside it.
    unsafe {
        let mut set: nix::libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<nix::libc::cpu_set_t>();
        if nix::libc::sched_getaffinity(0, size, &mut set) != 0 {
            return Vec::new();
        }
        (0..nix::libc::CPU_SETSIZE as usize)
            .filter(|&cpu| nix::libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Confines the calling thread, and whatever it starts afterwards, to `cpu`. Only system
/// calls: safe between fork and exec.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: as in allowed_cpus; CPU_SET writes inside the set.
    unsafe {
        let mut set: nix::libc::cpu_set_t = std::mem::zeroed();
        nix::libc::CPU_SET(cpu, &mut set);
        let size = std::mem::size_of::<nix::libc::cpu_set_t>();
        if nix::libc::sched_setaffinity(0, size, &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts the receiver of a pinned scenario on its CPU.
fn pin_receiver(command: &mut Command, pinned: Option<Pinned>) {
    use std::os::unix::process::CommandExt;
    if let Some(p) = pinned {
        // SAFETY: the closure makes one system call and touches no lock or allocator.
        unsafe {
            command.pre_exec(move || pin_to(p.receiver));
        }
    }
}

/// Sends a scenario's workload; a pinned scenario's sender runs on its own CPU.
fn send_scenario(target: &Target, s: &Scenario, plan: Plan) -> Result<Sent, String> {
    let Some(p) = s.pinned else {
        return send_all(target, s, plan);
    };
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                pin_to(p.sender)
                    .map_err(|e| format!("cannot pin the sender to CPU {}: {e}", p.sender))?;
                send_all(target, s, plan)
            })
            .join()
            .unwrap_or_else(|_| Err("the sender panicked".into()))
    })
}

impl Scenario {
    /// One sender, blocking as a default client does, with whippet's default flags.
    fn one_sender(
        name: &str,
        via: Via,
        rate: Option<u64>,
        workload: Vec<(Vec<u8>, u64)>,
    ) -> Scenario {
        Scenario {
            name: name.into(),
            via,
            rate,
            workload,
            bursts: None,
            flags: Vec::new(),
            senders: 1,
            pinned: None,
        }
    }
}

fn target_for(via: Via, dir: &Path, udp: Option<std::net::SocketAddr>) -> Target {
    match via {
        Via::Udp => Target::Udp(udp.unwrap_or_else(|| ([127, 0, 0, 1], 0).into())),
        Via::Unix => Target::Unix(dir.join("dsd.socket")),
        Via::Stream => Target::Stream(dir.join("dsd-stream.socket")),
    }
}

/// How long a receiver gets after a sender stops to drain what is queued, before its CPU
/// time is read or the other receiver's turn begins.
const SETTLE: Duration = Duration::from_millis(300);

/// The plan for sending `s` for `seconds`.
fn plan_for(s: &Scenario, seconds: f64) -> Plan {
    Plan {
        rate: s.rate,
        duration: Some(Duration::from_secs_f64(seconds)),
        count: None,
        bursts: s.bursts.clone(),
    }
}

/// whippet started for a scenario, with an intake of its own and its CPU time at the start.
struct RunningWhippet {
    process: Process,
    intake: Intake,
    target: Target,
    cpu0: f64,
    pipeline0: Vec<(String, f64)>,
}

impl RunningWhippet {
    fn start(opts: &BenchOptions, s: &Scenario, dir: &Path) -> Result<RunningWhippet, String> {
        let intake = Intake::start(IntakeConfig::default())?;
        let mut command = Command::new(&opts.whippet);
        command.args(["--dd-url", &intake.url(), "--hostname", "bench"]);
        command.arg("--socket").arg(dir.join("dsd.socket"));
        command
            .arg("--stream-socket")
            .arg(dir.join("dsd-stream.socket"));
        command.args(["--udp", "127.0.0.1:0", "--shutdown-timeout", "30s"]);
        command.args(&s.flags);
        pin_receiver(&mut command, s.pinned);
        if nix::unistd::geteuid().is_root() {
            // A benchmark run as root (a CI container) is the operator's explicit choice.
            command.arg("--allow-root");
        }
        let process = Process::start(&mut command, &[], dir).map_err(|e| {
            format!(
                "{e} (is {} built? cargo build --release)",
                opts.whippet.display()
            )
        })?;
        let target = target_for(s.via, dir, process.listeners.udp);
        let pid = process.pid();
        Ok(RunningWhippet {
            cpu0: cpu_seconds(pid),
            pipeline0: pipeline_cpu(pid),
            process,
            intake,
            target,
        })
    }

    /// Stops whippet and makes its row from what was sent to it (the caller has let it
    /// settle) and what it logged.
    fn finish(self, s: &Scenario, sent: Result<Sent, String>) -> Result<Row, String> {
        let pid = self.process.pid();
        let cpu = cpu_seconds(pid) - self.cpu0;
        let pipeline = pipeline_delta(&self.pipeline0, &pipeline_cpu(pid));
        // Read until it exits: the final flush at shutdown included.
        let exited = self.process.stop()?;
        let rss = exited.peak_rss_kib;
        let sent = sent?;
        let t = LoggedTelemetry::from_log(&exited.stderr);
        let parsed = t.sum("whippet_messages_total");
        let errors = t.sum("whippet_parse_errors_total");
        let queue_full = t
            .get(r#"whippet_dropped_total{reason="queue_full"}"#)
            .unwrap_or(0);
        let truncated = t.sum("whippet_packets_truncated_total");
        let kernel = t.get("whippet_udp_kernel_drops").unwrap_or(0);
        // Kernel drops are counted in packets; each of our packets holds sent/packets messages.
        let per_packet = sent.messages as f64 / sent.packets.max(1) as f64;
        let kernel_messages = (kernel as f64 * per_packet).round() as u64;
        let received = parsed + errors;
        let counted = queue_full + kernel_messages + (truncated as f64 * per_packet).round() as u64;
        let estimate_margin = estimate_margin(kernel + truncated, &s.workload);
        let points = self.intake.store().points().len();
        self.intake.stop();
        Ok(Row {
            scenario: s.name.clone(),
            offered: s.rate,
            sent,
            cpu_seconds: cpu,
            pipeline_seconds: Some(pipeline),
            peak_rss_kib: rss,
            received,
            counted_drops: counted,
            queue_full,
            kernel_drop_packets: kernel,
            truncated_packets: truncated,
            unaccounted: sent.messages as i64 - (received + counted) as i64,
            estimate_margin,
            points_at_intake: points,
            bursts: s.bursts.is_some(),
        })
    }
}

fn run_whippet(opts: &BenchOptions, s: &Scenario, dir: &Path) -> Result<Row, String> {
    let whippet = RunningWhippet::start(opts, s, dir)?;
    let sent = send_scenario(&whippet.target, s, plan_for(s, opts.seconds));
    std::thread::sleep(SETTLE);
    whippet.finish(s, sent)
}

/// `s.senders` senders at once, each on its own socket and thread; their counts summed.
fn send_all(target: &Target, s: &Scenario, plan: Plan) -> Result<Sent, String> {
    if s.senders <= 1 {
        return send(target, &s.workload, plan);
    }
    let results: Vec<Result<Sent, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..s.senders)
            .map(|_| {
                let plan = plan.clone();
                scope.spawn(move || send(target, &s.workload, plan))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a sender panicked".into())))
            .collect()
    });
    let mut all = Sent::default();
    for r in results {
        let one = r?;
        all.messages += one.messages;
        all.packets += one.packets;
        all.bytes += one.bytes;
        all.errors += one.errors;
        all.refused_packets += one.refused_packets;
        all.refused_messages += one.refused_messages;
        all.elapsed = all.elapsed.max(one.elapsed);
    }
    Ok(all)
}

/// The values the scaling table runs on each axis; `None` doubles from 1 up to this
/// machine's cores (readers and senders) or twice that (workers). Naming fewer values makes
/// the table fit a shorter run: on 16 cores the doubling is 150 rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Axes {
    pub readers: Option<Vec<usize>>,
    pub workers: Option<Vec<usize>>,
    pub senders: Option<Vec<usize>>,
}

impl Axes {
    /// (readers, workers, senders) for a machine of `cores`.
    pub fn values(&self, cores: usize) -> [Vec<usize>; 3] {
        let doubling = |max: usize| {
            let mut v = vec![1];
            while v[v.len() - 1] * 2 <= max {
                v.push(v[v.len() - 1] * 2);
            }
            v
        };
        let or = |given: &Option<Vec<usize>>, max: usize| given.clone().unwrap_or(doubling(max));
        [
            or(&self.readers, cores),
            or(&self.workers, cores * 2),
            or(&self.senders, cores),
        ]
    }
}

/// One axis of the scaling table from a comma-separated list of counts (`1,4,16`).
pub fn parse_axis(text: &str) -> Result<Vec<usize>, String> {
    let values: Vec<usize> = text
        .split(',')
        .map(|v| match v.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err(format!(
                "'{v}' is not a count from 1 to 1024 (a list looks like 1,4,16)"
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok(values)
}

/// The scaling matrix: UDP all-out with `--udp-readers` R, `--workers` W and S senders, over
/// the values of [`Axes`].
fn scaling_scenarios(opts: &BenchOptions) -> Vec<Scenario> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let [readers_axis, workers_axis, senders_axis] = opts.axes.values(cores);
    let udp = pack(&opts.corpus, 1432);
    let mut out = Vec::new();
    for &readers in &readers_axis {
        for &workers in &workers_axis {
            for &senders in &senders_axis {
                let name = format!("{readers} | {workers} | {senders}");
                out.push(Scenario {
                    flags: vec![
                        "--udp-readers".into(),
                        readers.to_string(),
                        "--workers".into(),
                        workers.to_string(),
                    ],
                    senders,
                    ..Scenario::one_sender(&name, Via::Udp, None, udp.clone())
                });
            }
        }
    }
    out
}

/// Runs the scaling matrix and prints its table; returns the rows. The senders outrun the
/// readers on purpose, so the kernel drops datagrams: loss is those drops (and any queue-full
/// drops) in messages, converted at the workload's mean messages per datagram, an estimate.
pub fn run_scaling(opts: &BenchOptions) -> Result<Vec<Row>, String> {
    let dir = std::env::temp_dir().join(format!("whippet-scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    println!("| readers | workers | senders | received msg/s | cores | CPU µs/msg | loss | peak RSS MiB | kernel drops (datagrams) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for s in scaling_scenarios(opts) {
        let r = run_whippet(opts, &s, &dir)?;
        let offered = r.sent.messages.max(1) as f64;
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.1}% | {:.1} | {} |",
            r.scenario,
            r.received as f64 / r.sent.elapsed.as_secs_f64().max(1e-9),
            r.cpu_seconds / r.sent.elapsed.as_secs_f64().max(1e-9),
            r.us_per_message(),
            100.0 * r.counted_drops as f64 / offered,
            r.peak_rss_kib as f64 / 1024.0,
            r.kernel_drop_packets,
        );
        rows.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

/// The drain-only sink started for a scenario, and its CPU time at the start.
struct RunningSink {
    child: Child,
    stdout: Lines,
    target: Target,
    cpu0: f64,
}

impl RunningSink {
    fn start(opts: &BenchOptions, s: &Scenario, dir: &Path) -> Result<RunningSink, String> {
        let target = match s.via {
            Via::Udp => "udp:127.0.0.1:0".to_string(),
            _ => format!("unix:{}", dir.join("floor.socket").display()),
        };
        let mut sink = Command::new(&opts.blast);
        pin_receiver(&mut sink, s.pinned);
        let mut child = sink
            .args(["sink", "--target", &target])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {} sink: {e}", opts.blast.display()))?;
        let Some(out) = child.stdout.take() else {
            terminate(&mut child);
            return Err("the sink has no stdout".into());
        };
        let stdout = Lines::of(out);
        let bound = stdout
            .wait_from(0, |l| l.starts_with("sink: listening on "))
            .and_then(|l| Target::parse(l.trim_start_matches("sink: listening on ")));
        let target = match bound {
            Ok(target) => target,
            Err(e) => {
                terminate(&mut child);
                return Err(e);
            }
        };
        Ok(RunningSink {
            cpu0: cpu_seconds(child.id()),
            child,
            stdout,
            target,
        })
    }

    /// Stops the sink and makes the floor row from what was sent to it (the caller has let
    /// it settle) and the count it printed.
    fn finish(mut self, s: &Scenario, sent: Result<Sent, String>) -> Result<Row, String> {
        let pid = self.child.id();
        let cpu = cpu_seconds(pid) - self.cpu0;
        let rss = hwm_kib(pid);
        terminate(&mut self.child);
        let sent = sent?;
        let received: u64 = self
            .stdout
            .all()
            .iter()
            .find_map(|l| l.strip_prefix("sink: messages "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Row {
            scenario: format!("{} (floor)", s.name),
            offered: s.rate,
            sent,
            cpu_seconds: cpu,
            pipeline_seconds: None,
            peak_rss_kib: rss,
            received,
            counted_drops: 0,
            queue_full: 0,
            kernel_drop_packets: 0,
            truncated_packets: 0,
            unaccounted: sent.messages as i64 - received as i64,
            estimate_margin: 0,
            points_at_intake: 0,
            bursts: s.bursts.is_some(),
        })
    }
}

/// Turns each receiver takes in a scenario run against its floor: one per second of
/// `--seconds`, at most 10. A shared VM's speed drifts over seconds (other tenants, CPU
/// frequency); taken in turns, the drift falls on both rows alike instead of on whichever
/// ran second.
fn turns(seconds: f64) -> u32 {
    (seconds.round() as u32).clamp(1, 10)
}

/// Runs a scenario against the floor and against whippet, both started at once and sent
/// to in turns (floor first), each for `--seconds` in all. Each row's CPU time covers the
/// whole run, so whatever whippet does while the floor's turn lasts (a flush) counts as its
/// own.
fn run_against_floor(opts: &BenchOptions, s: &Scenario, dir: &Path) -> Result<(Row, Row), String> {
    let sink = RunningSink::start(opts, s, dir)?;
    let whippet = match RunningWhippet::start(opts, s, dir) {
        Ok(w) => w,
        Err(e) => {
            let _ = sink.finish(s, Err(String::new()));
            return Err(e);
        }
    };
    let n = turns(opts.seconds);
    let plan = || plan_for(s, opts.seconds / n as f64);
    let (mut to_sink, mut to_whippet) = (Ok(Sent::default()), Ok(Sent::default()));
    for _ in 0..n {
        for (target, total) in [
            (&sink.target, &mut to_sink),
            (&whippet.target, &mut to_whippet),
        ] {
            if let Ok(sum) = total {
                *total = send_scenario(target, s, plan()).map(|sent| sum.plus(&sent));
                std::thread::sleep(SETTLE);
            }
        }
    }
    let floor = sink.finish(s, to_sink);
    let row = whippet.finish(s, to_whippet);
    Ok((floor?, row?))
}

/// The messages per second of `packets` that make `bytes_per_second`, at the workload's
/// mean packet bytes per message.
fn messages_per_second(packets: &[(Vec<u8>, u64)], bytes_per_second: u64) -> u64 {
    let bytes: usize = packets.iter().map(|(p, _)| p.len()).sum();
    let messages: u64 = packets.iter().map(|(_, n)| n).sum();
    let per_message = bytes as f64 / messages.max(1) as f64;
    (bytes_per_second as f64 / per_message.max(1.0)).round() as u64
}

/// This machine's `net.unix.max_dgram_qlen`: how many datagrams a Unix socket queues
/// before a non-blocking sender is refused.
fn unix_qlen() -> String {
    std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .map_or_else(|_| "?".into(), |v| v.trim().to_string())
}

/// A busy web worker's client that never blocks: small datagrams (one ~200-byte message
/// each) in bursts of 300, 600 and 1,000, 20 ms apart; what the kernel refuses is lost.
fn bursts_scenario() -> Scenario {
    let name = format!("unix datagram, non-blocking bursts, qlen {}", unix_qlen());
    let workload = pack(&Generated::small(3_000).generate(), 1);
    Scenario {
        bursts: Some(Bursts {
            sizes: vec![300, 600, 1000],
            gap: Duration::from_millis(20),
        }),
        ..Scenario::one_sender(&name, Via::Unix, None, workload)
    }
}

fn scenarios(opts: &BenchOptions) -> Vec<(Scenario, bool)> {
    let udp = pack(&opts.corpus, 1432);
    let unix = pack(&opts.corpus, 8192);
    let mut list = vec![(bursts_scenario(), true)];
    if let Some(pinned) = Pinned::here() {
        let mut s = bursts_scenario();
        s.name = format!(
            "{}, pinned (sender CPU {}, receiver CPU {})",
            s.name, pinned.sender, pinned.receiver
        );
        s.pinned = Some(pinned);
        list.push((s, true));
    }
    list.extend([
        (
            Scenario::one_sender("unix datagram, all-out", Via::Unix, None, unix.clone()),
            true,
        ),
        (
            Scenario::one_sender("udp 50k/s", Via::Udp, Some(50_000), udp.clone()),
            false,
        ),
        (
            Scenario::one_sender("udp 100k/s", Via::Udp, Some(100_000), udp),
            true,
        ),
        (
            Scenario::one_sender("unix stream, all-out", Via::Stream, None, unix.clone()),
            false,
        ),
    ]);
    // Datadog's published regression cases: dsd_base over the Unix socket at fixed byte rates.
    for mib in [10u64, 100] {
        let rate = messages_per_second(&unix, mib << 20);
        let name = format!("unix datagram, {mib} MiB/s");
        let s = Scenario::one_sender(&name, Via::Unix, Some(rate), unix.clone());
        list.push((s, false));
    }
    let sweep: &[usize] = if opts.smoke {
        &[3_000]
    } else {
        &[3_000, 30_000, 300_000]
    };
    for &contexts in sweep {
        let workload = pack(&Generated::small(contexts).generate(), 8192);
        let name = format!("{contexts} contexts, unix all-out");
        list.push((
            Scenario::one_sender(&name, Via::Unix, None, workload),
            false,
        ));
    }
    list
}

/// Runs every scenario and prints the table; returns the rows.
pub fn run(opts: &BenchOptions) -> Result<Vec<Row>, String> {
    let dir = std::env::temp_dir().join(format!("whippet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut rows = Vec::new();
    let list = if opts.bursts_only {
        vec![(bursts_scenario(), true)]
    } else {
        println!(
            "| scenario | offered msg/s | achieved msg/s | CPU µs/msg | cores | vs floor | receive µs/msg | parse→send µs/msg | peak RSS MiB | sent | received | dropped (counted) | client-side loss | unaccounted | points at intake |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        scenarios(opts)
    };
    let list = list.into_iter().filter(|(s, _)| {
        opts.only
            .as_ref()
            .is_none_or(|only| s.name.contains(only.as_str()))
    });
    for (i, (scenario, with_floor)) in list.enumerate() {
        if i == 1 && !opts.bursts_only && !opts.smoke && opts.only.is_none() {
            bursts_at_qlen(opts, 512);
        }
        let (floor, row) = if with_floor {
            let (floor, row) = run_against_floor(opts, &scenario, &dir)?;
            (Some(floor), row)
        } else {
            (None, run_whippet(opts, &scenario, &dir)?)
        };
        if let Some(f) = &floor {
            print_row(f, None);
        }
        print_row(&row, floor.as_ref());
        rows.extend(floor);
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

fn print_row(r: &Row, floor: Option<&Row>) {
    let ratio = floor.map_or("".to_string(), |f| {
        format!("{:.2}×", r.us_per_message() / f.us_per_message().max(1e-9))
    });
    let (receive, pipeline) = r
        .pipeline_seconds
        .map_or((String::new(), String::new()), |p| {
            (
                format!("{:.2}", r.per_message(r.cpu_seconds - p)),
                format!("{:.2}", r.per_message(p)),
            )
        });
    println!(
        "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
        r.scenario,
        r.offered.map_or("max".to_string(), |o| o.to_string()),
        r.sent.per_second(r.sent.messages),
        r.us_per_message(),
        r.cpu_seconds / r.sent.elapsed.as_secs_f64().max(1e-9),
        ratio,
        receive,
        pipeline,
        r.peak_rss_kib as f64 / 1024.0,
        r.sent.messages,
        r.received,
        dropped(r),
        if r.bursts {
            client_loss(&r.sent)
        } else {
            String::new()
        },
        r.unaccounted,
        r.points_at_intake,
    );
}

/// The dropped cell: the messages dropped under a named counter, and where there are any,
/// what dropped them: a full packet queue (in messages), the kernel (in datagrams, converted
/// at the workload's mean for the total), datagrams too long for `--buffer-size`.
fn dropped(r: &Row) -> String {
    if r.counted_drops == 0 {
        return "0".into();
    }
    let mut why = vec![
        format!("queue full {}", r.queue_full),
        format!("kernel {} datagrams", r.kernel_drop_packets),
    ];
    if r.truncated_packets > 0 {
        why.push(format!("truncated {} datagrams", r.truncated_packets));
    }
    format!("{} ({})", r.counted_drops, why.join(", "))
}

/// The share of messages a non-blocking client lost to a full socket queue, for a burst
/// row; empty for the others.
fn client_loss(sent: &Sent) -> String {
    let offered = sent.messages + sent.refused_messages;
    format!(
        "{:.1}%",
        100.0 * sent.refused_messages as f64 / offered.max(1) as f64
    )
}

/// The burst scenario again at `qlen`, in a network namespace of its own where that queue
/// length is set and its loopback is up (root only; `unshare`, `ip` and `sysctl` from
/// util-linux, iproute2 and procps). Its rows are
/// printed as they come; without root the rows are skipped with a line saying so.
fn bursts_at_qlen(opts: &BenchOptions, qlen: u32) {
    if !nix::unistd::geteuid().is_root() {
        println!(
            "| unix datagram, non-blocking bursts, qlen {qlen}: skipped (needs root for a network namespace) |"
        );
        return;
    }
    let script = format!(
        "ip link set lo up && sysctl -qw net.unix.max_dgram_qlen={qlen} && exec \"$0\" bench --bursts-only --seconds {} --whippet \"$1\"",
        opts.seconds
    );
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .arg(&opts.blast)
        .arg(&opts.whippet)
        .stderr(Stdio::inherit())
        .output();
    match out {
        Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Ok(o) => println!(
            "| unix datagram, non-blocking bursts, qlen {qlen}: failed ({}) |",
            o.status
        ),
        Err(e) => println!(
            "| unix datagram, non-blocking bursts, qlen {qlen}: cannot run unshare ({e}) |"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_accounted_for_within_what_converting_lost_packets_can_be_off_by() {
        // Packets of 1, 3 and 4 messages: a lost packet is 1 to 4 messages, 3 apart.
        let workload: Vec<(Vec<u8>, u64)> =
            [1u64, 3, 4].map(|n| (vec![b'x'; n as usize], n)).into();
        assert_eq!(estimate_margin(0, &workload), 0);
        assert_eq!(estimate_margin(5, &workload), 15);
        assert_eq!(estimate_margin(5, &[(b"a".to_vec(), 2)]), 0);
        assert_eq!(estimate_margin(5, &[]), 0);
        let row = |unaccounted, estimate_margin| Row {
            unaccounted,
            estimate_margin,
            ..Row::default()
        };
        assert!(row(0, 0).accounted());
        assert!(!row(1, 0).accounted());
        assert!(!row(-1, 0).accounted());
        assert!(row(15, 15).accounted());
        assert!(row(-15, 15).accounted());
        assert!(!row(16, 15).accounted());
        assert!(!row(-16, 15).accounted());
    }

    #[test]
    fn the_dropped_cell_says_what_dropped_the_messages() {
        assert_eq!(dropped(&Row::default()), "0");
        let row = Row {
            counted_drops: 1_120,
            queue_full: 1_024,
            kernel_drop_packets: 93,
            ..Row::default()
        };
        assert_eq!(dropped(&row), "1120 (queue full 1024, kernel 93 datagrams)");
        let row = Row {
            counted_drops: 7,
            kernel_drop_packets: 2,
            truncated_packets: 5,
            ..Row::default()
        };
        assert_eq!(
            dropped(&row),
            "7 (queue full 0, kernel 2 datagrams, truncated 5 datagrams)"
        );
    }

    #[test]
    fn a_pinned_thread_runs_on_its_cpu_alone_and_what_it_starts_inherits_that() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let last = *cpus.last().unwrap();
        let (mine, child) = std::thread::spawn(move || {
            pin_to(last).unwrap();
            let child = std::thread::spawn(allowed_cpus).join().unwrap();
            (allowed_cpus(), child)
        })
        .join()
        .unwrap();
        assert_eq!((mine, child), (vec![last], vec![last]));
        // This thread was not touched.
        assert_eq!(allowed_cpus(), cpus);
        // The scenario's pair is the first two allowed, where there are two.
        let want = (cpus.len() >= 2).then(|| Pinned {
            sender: cpus[0],
            receiver: cpus[1],
        });
        assert_eq!(Pinned::here(), want);
    }

    #[test]
    fn the_scaling_axes_double_up_to_the_cores_unless_named() {
        let doubling = Axes::default().values(16);
        assert_eq!(
            doubling,
            [
                vec![1, 2, 4, 8, 16],
                vec![1, 2, 4, 8, 16, 32],
                vec![1, 2, 4, 8, 16]
            ]
        );
        assert_eq!(doubling.iter().map(Vec::len).product::<usize>(), 150);
        assert_eq!(Axes::default().values(2)[1], [1, 2, 4]);
        let named = Axes {
            readers: Some(vec![1, 4, 16]),
            senders: Some(vec![3]),
            ..Axes::default()
        };
        assert_eq!(
            named.values(16),
            [vec![1, 4, 16], vec![1, 2, 4, 8, 16, 32], vec![3]]
        );
    }

    #[test]
    fn an_axis_is_a_list_of_counts() {
        assert_eq!(parse_axis("1,4,16"), Ok(vec![1, 4, 16]));
        assert_eq!(parse_axis(" 2 "), Ok(vec![2]));
        for bad in ["", "0", "1,,2", "x", "1,-2", "2000"] {
            let err = parse_axis(bad).unwrap_err();
            assert!(
                err.contains("is not a count from 1 to 1024"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_byte_rate_becomes_the_message_rate_of_the_workloads_mean_message() {
        // 3 messages in 2 packets of 300 bytes in all: 100 bytes a message.
        let packets = vec![(vec![b'x'; 200], 2), (vec![b'y'; 100], 1)];
        assert_eq!(messages_per_second(&packets, 10 << 20), 104_858);
        assert_eq!(messages_per_second(&[], 1000), 1000);
    }

    #[test]
    fn the_client_side_loss_is_the_share_of_messages_the_kernel_refused() {
        let sent = Sent {
            messages: 300,
            refused_messages: 100,
            ..Sent::default()
        };
        assert_eq!(client_loss(&sent), "25.0%");
    }

    #[test]
    fn a_run_against_the_floor_takes_a_turn_a_second_up_to_ten() {
        assert_eq!(turns(0.2), 1);
        assert_eq!(turns(1.0), 1);
        assert_eq!(turns(5.0), 5);
        assert_eq!(turns(10.4), 10);
        assert_eq!(turns(60.0), 10);
    }

    #[test]
    fn sends_in_turns_add_up_as_one() {
        let turn = |n: u64, ms: u64| Sent {
            messages: n,
            packets: n / 2,
            bytes: 200 * n,
            errors: 1,
            refused_packets: n / 4,
            refused_messages: n / 3,
            elapsed: Duration::from_millis(ms),
        };
        let both = turn(600, 1_000).plus(&turn(300, 1_500));
        assert_eq!(
            both,
            Sent {
                messages: 900,
                packets: 450,
                bytes: 180_000,
                errors: 2,
                refused_packets: 225,
                refused_messages: 300,
                elapsed: Duration::from_millis(2_500),
            }
        );
        assert_eq!(client_loss(&both), "25.0%");
    }

    #[test]
    fn a_stat_line_gives_the_thread_name_and_its_cpu_seconds() {
        let dir = std::env::temp_dir().join(format!("whippet-stat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stat");
        // A name with a space and a ')' of its own; utime 250 and stime 75 ticks.
        std::fs::write(
            &path,
            "42 (whippet-wo) rk) S 1 42 42 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 9 0",
        )
        .unwrap();
        let (name, secs) = stat_cpu(&path.display().to_string());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(name, "whippet-wo) rk");
        assert_eq!(secs, 3.25);
        assert_eq!(stat_cpu("/nonexistent/stat"), (String::new(), 0.0));
    }

    #[test]
    fn pipeline_cpu_counts_workers_flusher_and_forwarders_of_this_process() {
        let names = ["whippet-worker-0", "whippet-flusher", "whippet-unix"];
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let done_rx = std::sync::Arc::new(std::sync::Mutex::new(done_rx));
        let threads: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let (ready, done) = (ready_tx.clone(), done_rx.clone());
                std::thread::Builder::new()
                    .name(n.to_string())
                    .spawn(move || {
                        ready.send((i, nix::unistd::gettid().to_string())).unwrap();
                        let _ = done.lock().unwrap().recv();
                    })
                    .unwrap()
            })
            .collect();
        let mut tids: Vec<(usize, String)> =
            names.iter().map(|_| ready_rx.recv().unwrap()).collect();
        tids.sort();
        let seen = pipeline_cpu(std::process::id());
        drop(done_tx);
        threads.into_iter().for_each(|t| t.join().unwrap());
        // The worker and the flusher, not the reader nor the test harness's threads (other
        // tests may run pipeline threads of their own meanwhile).
        let found: Vec<bool> = tids
            .iter()
            .map(|t| seen.iter().any(|s| s.0 == t.1))
            .collect();
        assert_eq!(found, [true, true, false], "{tids:?} {seen:?}");
        assert!(seen.iter().all(|s| s.1 >= 0.0));
        let before = vec![("7".to_string(), 1.0), ("8".to_string(), 2.0)];
        let after = vec![("7".to_string(), 1.5), ("9".to_string(), 0.25)];
        // Thread 8 exited (not counted); 9 started after the first reading.
        assert_eq!(pipeline_delta(&before, &after), 0.75);
    }
}
