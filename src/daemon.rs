//! The daemon: the only place that knows which threads exist, how they are wired, and the
//! order they stop in.
//!
//! Start: take the sockets systemd passed (socket activation) or bind every socket first (so
//! a bad flag fails before any thread runs), then start the flusher, the workers, the
//! readers, and the status endpoint last; then tell systemd READY=1.
//!
//! Reload (SIGHUP): re-read the configuration; apply the API key, intake URL, extra tags and
//! log level in place (no thread stops, no sample waits); anything else that changed is
//! named in a log line as needing a restart. An invalid file changes nothing.
//!
//! Stop (SIGTERM/SIGINT), from the sources down:
//! 1. set `stopping` and `shutdown(SHUT_RD)` every socket: readers drain what the kernel holds
//!    and exit; their queue senders drop with them;
//! 2. workers drain the queue and exit when it is closed and empty;
//! 3. the flusher is told to stop: it flushes every bucket, the open one included, and
//!    finishes the output (the forwarder gets `--shutdown-timeout` to deliver it);
//! 4. the status endpoint stops last, so it answers while whippet drains.

use std::net::{Shutdown, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::config::{Config, Source};
use crate::console::Console;
use crate::demux::Demux;
use crate::flush::Output;
use crate::flush::{FlushSettings, Flusher};
use crate::forwarder::{self, Forwarder, ForwarderConfig, IntakeOutput, Retarget};
use crate::listener::datagram::DatagramReader;
use crate::listener::{self, stream, udp, unix, Handoff};
use crate::log;
use crate::packet::{Batch, Pool, Transport};
use crate::serializer::{Serializer, SeriesApi};
use crate::shard::Expiry;
use crate::status::{self, StatusServer};
use crate::systemd;
use crate::telemetry::{Readings, Snapshot};
use crate::worker::{self, Enrichment, LiveTags, Worker};
use crate::Error;

/// Where the listeners ended up (port 0 resolved).
#[derive(Debug, Clone, Default)]
pub struct Bound {
    pub udp: Option<SocketAddr>,
    pub udp_rcvbuf: usize,
    pub socket: Option<PathBuf>,
    pub stream_socket: Option<PathBuf>,
    /// Sockets systemd passed in (socket activation).
    pub activated: usize,
    /// The status endpoint's address.
    pub status: Option<SocketAddr>,
}

/// Every stage's counters, and the gauges read when a snapshot is taken; shared with the
/// status endpoint.
pub struct Telemetry {
    pub listener: Arc<listener::Counters>,
    pub worker: Arc<worker::Counters>,
    pub flush: Arc<crate::flush::Counters>,
    pub forwarder: Arc<forwarder::Counters>,
}

impl Telemetry {
    fn new() -> Telemetry {
        Telemetry {
            listener: Arc::default(),
            worker: Arc::default(),
            flush: Arc::default(),
            forwarder: Arc::default(),
        }
    }
}

struct Probe {
    telemetry: Arc<Telemetry>,
    queue: Receiver<Batch>,
    kernel_drops: udp::KernelDrops,
}

impl Readings for Probe {
    fn read(&self, out: &mut Snapshot) {
        let t = &self.telemetry;
        t.listener.read(out);
        t.worker.read(out);
        t.flush.read(out);
        t.forwarder.read(out);
        out.gauge("whippet_queue_depth", &[], self.queue.len() as u64);
        self.kernel_drops.read(out);
    }
}

impl Probe {
    fn snapshot(&self) -> Snapshot {
        Snapshot::of(&[self])
    }
}

/// A running whippet.
pub struct Daemon {
    pub bound: Bound,
    pub telemetry: Arc<Telemetry>,
    stopping: Arc<AtomicBool>,
    udp: Vec<Arc<UdpSocket>>,
    unix: Option<Arc<UnixDatagram>>,
    stream: Option<Arc<stream::Connections>>,
    readers: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    flusher: Option<(Sender<()>, JoinHandle<()>)>,
    probe: Arc<Probe>,
    /// Socket files whippet created and removes at exit (not those systemd passed).
    owned_paths: Vec<PathBuf>,
    live_tags: Arc<LiveTags>,
    retarget: Option<Retarget>,
    status: Option<(StatusServer, Arc<status::Sources>)>,
    /// The settings in effect, for reloads to compare with.
    config: Config,
}

/// Asks glibc's allocator for a single arena, unless `MALLOC_ARENA_MAX` says otherwise.
///
/// By default glibc gives threads arenas of their own (up to 8 per CPU). Here workers
/// allocate context keys and accumulators and the flusher frees them, so memory freed in one
/// arena sits unused while another grows: at 300k contexts, peak RSS was 5 to 9 MiB higher
/// with the default than with one arena (three runs of each). Allocation is off the
/// per-message path (a new context, a closed bucket), so the shared arena's lock is rarely
/// taken.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; any value is valid to pass.
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
        }
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|e| Error::Startup(format!("cannot start thread {name}: {e}")))
}

impl Daemon {
    /// Binds the listeners and starts every thread, with the output the configuration asks
    /// for: the intake when one is configured, else the console on stdout.
    pub fn start(config: &Config) -> Result<Daemon, Error> {
        Daemon::start_with(config, |telemetry| output_for(config, telemetry))
    }

    /// Like [`Daemon::start`], with an output of the caller's making (and, if it forwards to
    /// an intake, the handle that retargets it on reload).
    pub fn start_with(
        config: &Config,
        make_output: impl FnOnce(Arc<Telemetry>) -> Result<(Box<dyn Output>, Option<Retarget>), Error>,
    ) -> Result<Daemon, Error> {
        one_malloc_arena();
        let mut bound = Bound::default();
        let mut owned_paths = Vec::new();
        let passed = systemd::listen_fds()?;
        bound.activated = passed.udp.len()
            + passed.datagram.is_some() as usize
            + passed.stream.is_some() as usize;
        // A kind of socket systemd passed replaces the configured one of that kind.
        let udp_sockets = if !passed.udp.is_empty() {
            bound.udp_rcvbuf =
                nix::sys::socket::getsockopt(&passed.udp[0], nix::sys::socket::sockopt::RcvBuf)
                    .unwrap_or(0);
            passed.udp
        } else {
            match config.udp {
                Some(addr) => {
                    let (sockets, rcvbuf) =
                        udp::bind_all(addr, config.udp_readers, config.so_rcvbuf)?;
                    bound.udp_rcvbuf = rcvbuf;
                    sockets
                }
                None => Vec::new(),
            }
        };
        bound.udp = udp_sockets.first().and_then(|s| s.local_addr().ok());
        let unix_socket = match (passed.datagram, &config.socket) {
            (Some((s, path)), _) => {
                bound.socket = path;
                Some(Arc::new(s))
            }
            (None, Some(path)) => {
                let (s, _) = unix::bind_datagram(path, config.socket_mode, config.so_rcvbuf)?;
                bound.socket = Some(path.clone());
                owned_paths.push(path.clone());
                Some(Arc::new(s))
            }
            (None, None) => None,
        };
        let stream_listener = match (passed.stream, &config.stream_socket) {
            (Some((l, path)), _) => {
                bound.stream_socket = path;
                Some(l)
            }
            (None, Some(path)) => {
                unix::prepare_path(path, unix::SocketKind::Stream, "--stream-socket")?;
                let l = UnixListener::bind(path).map_err(|e| {
                    listener::bind_error("--stream-socket", &path.display().to_string(), e)
                })?;
                unix::set_mode(path, config.socket_mode, "--socket-mode")?;
                bound.stream_socket = Some(path.clone());
                owned_paths.push(path.clone());
                Some(l)
            }
            (None, None) => None,
        };

        let telemetry = Arc::new(Telemetry::new());
        let (output, retarget) = make_output(telemetry.clone())?;
        let demux = Arc::new(Demux::with_context_limit(
            config.shards,
            config.event_backlog,
            config.context_limit,
        ));
        let (queue_tx, queue_rx) = crossbeam_channel::bounded::<Batch>(config.queue_size);
        let stopping = Arc::new(AtomicBool::new(false));

        let expiry = Expiry {
            interval: config.bucket_seconds,
            counter_seconds: config.expiry_seconds,
            context_seconds: config.context_expiry_seconds,
        };
        let settings = FlushSettings::new(
            expiry,
            &config.histogram_aggregates,
            &config.histogram_percentiles,
        );
        // Every batch that can be in circulation at once stays pooled under load: the queue,
        // what the workers hold, one per datagram reader, and a few for stream connections.
        // Idle spares beyond a handful are freed after each flush.
        let in_flight = config.queue_size + config.workers + config.udp_readers + 1 + 4;
        // Unix readers queue at most two batches per worker (see `Pool::admit`).
        let pool =
            Arc::new(Pool::new(config.buffer_size, in_flight).with_admissions(2 * config.workers));
        // The pool keeps every batch in circulation under load; after each flush, spares
        // beyond what one round of readers and workers holds go back to the allocator.
        let keep = config.workers + config.udp_readers + 2;
        let trimmed = pool.clone();
        let flusher = Flusher::new(demux.clone(), telemetry.flush.clone(), settings, output)
            .after_each_flush(move || {
                trimmed.trim(keep);
            });
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let flusher_thread = spawn("whippet-flusher".into(), move || flusher.run(stop_rx))?;

        let live_tags = Arc::new(LiveTags::new(&config.tags));
        let enrichment = Enrichment {
            hostname: config.hostname.as_str().into(),
            extra_tags: config
                .tags
                .iter()
                .map(|t| Box::<str>::from(t.as_str()))
                .collect(),
            bucket_seconds: config.bucket_seconds,
        };
        let mut workers = Vec::with_capacity(config.workers);
        for i in 0..config.workers {
            let worker = Worker::new(demux.clone(), telemetry.worker.clone(), enrichment.clone())
                .with_live_tags(live_tags.clone());
            let (rx, pool) = (queue_rx.clone(), pool.clone());
            workers.push(spawn(format!("whippet-worker-{i}"), move || {
                worker.run(rx, pool)
            })?);
        }

        let ctx = Handoff {
            queue: queue_tx,
            pool,
            counters: telemetry.listener.clone(),
            stopping: stopping.clone(),
        };
        let mut readers = Vec::new();
        let udp: Vec<Arc<UdpSocket>> = udp_sockets.into_iter().map(Arc::new).collect();
        for (i, socket) in udp.iter().enumerate() {
            let (socket, ctx) = (socket.clone(), ctx.clone());
            readers.push(spawn(format!("whippet-udp-{i}"), move || {
                DatagramReader::new(socket.as_fd(), Transport::Udp, &ctx).run()
            })?);
        }
        if let Some(socket) = &unix_socket {
            let (socket, ctx) = (socket.clone(), ctx.clone());
            readers.push(spawn("whippet-unix".into(), move || {
                DatagramReader::new(socket.as_fd(), Transport::Unix, &ctx).run()
            })?);
        }
        let mut stream_handle = None;
        if let Some(l) = stream_listener {
            let connections = Arc::new(stream::Connections::default());
            let limits = stream::Limits {
                max_connections: config.stream_max_connections,
                idle_timeout: (config.stream_idle_timeout_ms > 0)
                    .then(|| Duration::from_millis(config.stream_idle_timeout_ms)),
            };
            let (conns, ctx) = (connections.clone(), ctx.clone());
            readers.push(spawn("whippet-stream-accept".into(), move || {
                stream::accept_loop(l, ctx, limits, conns)
            })?);
            stream_handle = Some(connections);
        }
        drop(ctx); // only readers hold queue senders now: the queue closes when they exit

        let probe = Arc::new(Probe {
            telemetry: telemetry.clone(),
            queue: queue_rx,
            kernel_drops: udp::KernelDrops::of(&udp),
        });
        let status = match config.status {
            Some(addr) => {
                let p = probe.clone();
                let sources = Arc::new(status::Sources {
                    snapshot: Box::new(move || p.snapshot()),
                    demux: demux.clone(),
                    info: Default::default(),
                    started: std::time::Instant::now(),
                });
                let server = StatusServer::start(addr, sources.clone())?;
                bound.status = Some(server.addr);
                Some((server, sources))
            }
            None => None,
        };
        let daemon = Daemon {
            bound,
            telemetry,
            stopping,
            udp,
            unix: unix_socket,
            stream: stream_handle,
            readers,
            workers,
            flusher: Some((stop_tx, flusher_thread)),
            probe,
            owned_paths,
            live_tags,
            retarget,
            status,
            config: config.clone(),
        };
        daemon.update_status_info();
        Ok(daemon)
    }

    /// Every counter, plus the gauges read now (queue depth, kernel UDP drops).
    pub fn snapshot(&self) -> Snapshot {
        self.probe.snapshot()
    }

    /// Applies a re-read configuration: the API key, intake URL, extra tags and log level
    /// change in place. Returns a line for each other setting that changed and needs a
    /// restart, and for an intake change the running output cannot make.
    pub fn reload(&mut self, new: &Config) -> Vec<String> {
        let mut notes = Vec::new();
        let old = &self.config;
        log::set_level(new.log_level);
        if new.tags != old.tags {
            self.live_tags.set(&new.tags);
        }
        let mut applied = new.clone();
        match (&self.retarget, &new.intake_url) {
            (Some(retarget), Some(url)) => retarget.set(url, &new.api_key.0),
            (None, None) => {}
            (Some(_), None) => notes.push("the new settings have no intake (no --dd-url and no API key); still forwarding to the old one until a restart".into()),
            (None, Some(_)) => notes.push("an intake is now configured, but whippet started printing to stdout; restart whippet to forward".into()),
        }
        if self.retarget.is_some() != new.intake_url.is_some() {
            // The output cannot change kind while running: the old intake stays in effect.
            applied.intake_url = old.intake_url.clone();
        }
        const RELOADABLE: [&str; 5] = ["api-key", "dd-url", "site", "tags", "log-level"];
        for (flag, value, _) in &new.sources {
            if RELOADABLE.contains(flag) {
                continue;
            }
            let before = old
                .sources
                .iter()
                .find(|(f, _, _)| f == flag)
                .map(|(_, v, _)| v);
            if before != Some(value) {
                notes.push(format!("--{flag} changed; restart whippet to apply it"));
            }
        }
        self.config = applied;
        self.update_status_info();
        notes
    }

    /// The settings part of `/status`.
    fn update_status_info(&self) {
        let Some((_, sources)) = &self.status else {
            return;
        };
        let c = &self.config;
        let mut info = serde_json::Map::new();
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        info.insert(
            "listeners".into(),
            serde_json::json!({
                "udp": self.bound.udp.map(|a| a.to_string()),
                "socket": path(&self.bound.socket),
                "stream_socket": path(&self.bound.stream_socket),
                "socket_activated": self.bound.activated,
            }),
        );
        info.insert("intake".into(), serde_json::json!(c.intake_url));
        info.insert("hostname".into(), serde_json::json!(c.hostname));
        info.insert("tags".into(), serde_json::json!(c.tags));
        info.insert(
            "config_file".into(),
            serde_json::json!(path(&c.config_file)),
        );
        info.insert(
            "log_level".into(),
            serde_json::json!(format!("{:?}", c.log_level).to_lowercase()),
        );
        *sources.info.write().unwrap_or_else(|e| e.into_inner()) = info;
    }

    /// Stops in order (see the module doc) and returns the final telemetry.
    pub fn shutdown(mut self) -> Snapshot {
        self.stopping.store(true, Relaxed);
        for s in &self.udp {
            // Unconnected UDP sockets answer ENOTCONN but are shut down all the same.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&**s),
                nix::sys::socket::Shutdown::Read,
            );
        }
        if let Some(s) = &self.unix {
            let _ = s.shutdown(Shutdown::Read);
        }
        if let (Some(connections), Some(path)) = (&self.stream, &self.bound.stream_socket) {
            connections.shutdown_all();
            // Wake the accept thread; it then takes every pending connection before exiting.
            let _ = UnixStream::connect(path);
        }
        for t in self.readers.drain(..) {
            let _ = t.join();
        }
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        if let Some((stop, thread)) = self.flusher.take() {
            drop(stop);
            let _ = thread.join();
        }
        for path in &self.owned_paths {
            let _ = std::fs::remove_file(path);
        }
        let last = self.snapshot();
        if let Some((server, _)) = self.status.take() {
            server.stop();
        }
        last
    }
}

/// The console, or the serializer and forwarder when an intake is configured.
fn output_for(
    config: &Config,
    telemetry: Arc<Telemetry>,
) -> Result<(Box<dyn Output>, Option<Retarget>), Error> {
    let Some(url) = &config.intake_url else {
        let console = Console::new(std::io::BufWriter::new(std::io::stdout()));
        return Ok((Box::new(console), None));
    };
    let forwarder_config = ForwarderConfig {
        base_url: url.clone(),
        api_key: config.api_key.clone(),
        threads: config.forwarder_threads,
        retry_queue_bytes: config.retry_queue_bytes,
        timeout: Duration::from_millis(config.request_timeout_ms),
        retry_base: Duration::from_millis(config.retry_base_ms),
        retry_dir: config
            .retry_dir
            .clone()
            .map(|dir| (dir, config.retry_dir_bytes)),
    };
    // A short-lived thread: it logs whether the key is valid and ends; whippet runs either way.
    let check = forwarder_config.clone();
    spawn("whippet-validate".into(), move || {
        forwarder::validate_api_key(&check)
    })?;
    let forwarder = Forwarder::start(forwarder_config, telemetry.forwarder.clone())?;
    let retarget = forwarder.retarget();
    let output = Box::new(IntakeOutput {
        serializer: Serializer {
            series_api: config.series_api,
            compression: config.compression,
            hostname: config.hostname.clone(),
        },
        forwarder: Some(forwarder),
        counters: telemetry.forwarder.clone(),
        shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
        pacing: true,
    });
    Ok((output, Some(retarget)))
}

/// Runs whippet until SIGTERM or SIGINT. SIGHUP re-reads the configuration with `reload`;
/// SIGUSR1 logs the telemetry. Speaks sd_notify when systemd asks for it.
pub fn run(config: &Config, reload: impl Fn() -> Result<Config, Error>) -> Result<(), Error> {
    log::set_level(config.log_level);
    refuse_root(config, nix::unistd::geteuid().is_root())?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])
        .map_err(|e| Error::Startup(format!("cannot install signal handlers: {e}")))?;
    warn_if_key_readable(config);
    let mut daemon = Daemon::start(config)?;
    log_start(config, &daemon.bound);
    systemd::notify("READY=1\nSTATUS=listening");
    let watchdog = systemd::watchdog_interval()
        .map(start_watchdog)
        .transpose()?;
    for signal in signals.forever() {
        match signal {
            SIGUSR1 => log_snapshot(&daemon.snapshot()),
            SIGHUP => {
                systemd::notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
                match reload() {
                    Ok(new) => {
                        warn_if_key_readable(&new);
                        for note in daemon.reload(&new) {
                            log::warn(&format!("reload: {note}"));
                        }
                        log::info("reloaded the configuration");
                    }
                    Err(e) => log::error(&format!(
                        "reload rejected, the old settings stay: {}",
                        e.to_string().replace('\n', "; ")
                    )),
                }
                systemd::notify("READY=1\nSTATUS=listening");
            }
            _ => {
                log::info("stopping: draining queues and flushing every bucket");
                break;
            }
        }
    }
    systemd::notify("STOPPING=1");
    let last = daemon.shutdown();
    if let Some((stop, thread)) = watchdog {
        drop(stop);
        let _ = thread.join();
    }
    log_snapshot(&last);
    log::info("stopped");
    Ok(())
}

fn log_start(config: &Config, bound: &Bound) {
    match &config.intake_url {
        Some(url) => log::info(&format!(
            "forwarding to {url} (series {}, {} compression)",
            match config.series_api {
                SeriesApi::V1 => "v1 JSON",
                SeriesApi::V2 => "v2 protobuf",
            },
            config.compression.header().unwrap_or("no")
        )),
        None => log::info("no intake configured (--dd-url or an API key): printing to stdout"),
    }
    if bound.activated > 0 {
        log::info(&format!(
            "socket activation: using {} socket(s) passed by systemd",
            bound.activated
        ));
    }
    if let Some(addr) = bound.udp {
        log::info(&format!(
            "listening on udp {addr} (receive buffer {} bytes)",
            bound.udp_rcvbuf
        ));
    }
    if let Some(path) = &bound.socket {
        log::info(&format!("listening on unix {}", path.display()));
    }
    if let Some(path) = &bound.stream_socket {
        log::info(&format!("listening on unix_stream {}", path.display()));
    }
    if let Some(addr) = bound.status {
        log::info(&format!("status endpoint on http://{addr}/status"));
    }
    log::info(&format!(
        "ready: {} workers, {} shards, {}s buckets",
        config.workers, config.shards, config.bucket_seconds
    ));
}

/// An API key in a config file others can read deserves a warning (not a refusal).
/// whippet needs no privilege, so running as root is a mistake unless the operator says so.
fn refuse_root(config: &Config, is_root: bool) -> Result<(), Error> {
    if is_root && !config.allow_root {
        return Err(Error::Config(
            "refusing to run as root: whippet needs no privilege; run it as an unprivileged user (the packaged service uses User=whippet) or pass --allow-root (WHIPPET_ALLOW_ROOT=true)".into(),
        ));
    }
    Ok(())
}

fn warn_if_key_readable(config: &Config) {
    use std::os::unix::fs::PermissionsExt;
    for (flag, _, source) in &config.sources {
        if let (&"api-key", Source::File { path, .. }) = (flag, source) {
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o044 != 0 {
                    log::warn(&format!(
                        "{} holds the API key and is readable by group or others (mode {:o}); chmod 0600 it or move the key to a credential file",
                        path.display(),
                        meta.permissions().mode() & 0o777
                    ));
                }
            }
        }
    }
}

fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
    })
}

/// Pings the systemd watchdog every `interval` until its channel's sender is dropped.
fn start_watchdog(interval: Duration) -> Result<(Sender<()>, JoinHandle<()>), Error> {
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let thread = spawn("whippet-watchdog".into(), move || {
        systemd::notify("WATCHDOG=1");
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(interval)
        {
            systemd::notify("WATCHDOG=1");
        }
    })?;
    Ok((stop_tx, thread))
}

fn log_snapshot(s: &Snapshot) {
    for r in s.grouped() {
        log::info(&format!("telemetry {r}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_unless_allowed() {
        let parsed = crate::config::parse_with(&[], &|_| None);
        let Ok(crate::config::Command::Run(mut config)) = parsed else {
            panic!("the defaults do not parse: {parsed:?}")
        };
        let err = refuse_root(&config, true).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--allow-root"), "{err}");
        assert_eq!(refuse_root(&config, false), Ok(()));
        config.allow_root = true;
        assert_eq!(refuse_root(&config, true), Ok(()));
    }
}
