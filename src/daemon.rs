//! The daemon: the only place that knows which threads exist, how they are wired, and the
//! order they stop in.
//!
//! Start ([`Daemon::start`]): bind every socket first, or take those systemd passed (so a bad
//! flag fails before any thread runs); spawn the pipeline (the flusher, then the workers);
//! spawn the readers; start the status endpoint last. Then [`run`] tells systemd READY=1.
//!
//! Reload (SIGHUP): see [`crate::reload`].
//!
//! Stop ([`Daemon::shutdown`]), from the sources down:
//! 1. set `stopping` and `shutdown(SHUT_RD)` every socket: readers drain what the kernel holds
//!    and exit; their queue senders drop with them;
//! 2. workers drain the queue and exit when it is closed and empty;
//! 3. the flusher is told to stop: it flushes every bucket, the open one included, and
//!    finishes the output (the forwarder gets `--shutdown-timeout` to deliver it);
//! 4. the status endpoint stops last, so it answers while whippet drains.
//!
//! The clock starts at SIGTERM ([`Daemon::guard_shutdown`]): the forwarder bounds every
//! request by `--shutdown-timeout`, the final flush paces itself for half of it at most, and
//! a guard thread ends the process [`OVERRUN`] after it if anything is still stuck.

use std::net::{Shutdown, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use crate::config::{check, Config, Listen};
use crate::console::Console;
use crate::demux::Demux;
use crate::enrichment::{Enrichment, OriginDetection};
use crate::flush::{self, Flusher, Output};
use crate::forwarder::{self, Forwarder, Handle, IntakeOutput};
use crate::listener::capture::{Capture, CaptureCounters};
use crate::listener::datagram::DatagramReader;
use crate::listener::mirror::{Mirror, MirrorCounters};
use crate::listener::{self, stream, udp, unix, Bound, Handoff};
use crate::log;
use crate::origin::{self, PidCache};
use crate::packet::{Batch, Pool, Transport};
use crate::parser::{MessageKind, Reason};
use crate::reload::Reloader;
use crate::serializer::SeriesApi;
use crate::status::{self, StatusServer};
use crate::systemd;
use crate::tagger::{self, Tagger};
use crate::telemetry::{Label, Reading, Readings, Snapshot};
use crate::vitals::Vitals;
use crate::worker::{self, LiveTags, Worker};
use crate::Error;

/// Every stage's counters, built once and shared by the stage's threads.
#[derive(Default)]
pub struct Telemetry {
    pub listener: Arc<listener::Counters>,
    pub worker: Arc<worker::Counters>,
    pub flush: Arc<flush::Counters>,
    pub forwarder: Arc<forwarder::Counters>,
    /// One set per `--additional-endpoints` intake, in their order.
    pub additional: Vec<Arc<forwarder::Counters>>,
    pub origin: Arc<origin::Counters>,
    pub tagger: Arc<tagger::Counters>,
    pub mirror: Arc<MirrorCounters>,
    pub capture: Arc<CaptureCounters>,
}

impl Telemetry {
    /// Fresh counters for `config`: one set per intake, named as its forwarder is.
    fn new(config: &Config) -> Telemetry {
        let mut each = config
            .forwarders()
            .into_iter()
            .map(|c| Arc::new(forwarder::Counters::of_intake(c.intake, c.additional)));
        Telemetry {
            forwarder: each.next().unwrap_or_default(),
            additional: each.collect(),
            ..Telemetry::default()
        }
    }
}

/// The counters, plus the gauges read when a snapshot is taken (queue depth, the kernel's
/// UDP drops); shared with the status endpoint.
struct Probe {
    telemetry: Arc<Telemetry>,
    queue: Receiver<Batch>,
    kernel_drops: udp::KernelDrops,
    demux: Arc<Demux>,
    /// Whether packets are mirrored, and captures can run (their counters are read only
    /// then).
    mirror: bool,
    capture: bool,
}

impl Readings for Probe {
    fn read(&self, out: &mut Snapshot) {
        let t = &self.telemetry;
        t.listener.read(out);
        t.worker.read(out);
        t.flush.read(out);
        t.forwarder.read(out);
        for counters in &t.additional {
            counters.read(out);
        }
        t.origin.read(out);
        t.tagger.read(out);
        if self.mirror {
            t.mirror.read(out);
        }
        if self.capture {
            t.capture.read(out);
        }
        out.gauge("whippet_queue_depth", &[], self.queue.len() as u64);
        let memory = self.demux.memory_bytes() as u64;
        out.gauge("whippet_aggregation_memory_bytes", &[], memory);
        self.kernel_drops.read(out);
    }
}

/// The listening sockets, bound or passed by systemd.
struct Sockets {
    bound: Bound,
    udp: Vec<Arc<UdpSocket>>,
    unix: Option<Arc<UnixDatagram>>,
    stream: Option<UnixListener>,
    /// Socket files whippet created and removes at exit (not those systemd passed).
    owned_paths: Vec<PathBuf>,
}

impl Sockets {
    /// Takes the sockets systemd passed (socket activation) and binds the configured ones of
    /// the other kinds: a kind of socket systemd passed replaces the configured one.
    fn bind(listen: &Listen, origin_detection: bool) -> Result<Sockets, Error> {
        let passed = systemd::listen_fds()?;
        let mut bound = Bound {
            activated: passed.udp.len()
                + passed.datagram.is_some() as usize
                + passed.stream.is_some() as usize,
            ..Bound::default()
        };
        let mut owned_paths = Vec::new();
        let udp = if !passed.udp.is_empty() {
            let rcvbuf = nix::sys::socket::sockopt::RcvBuf;
            bound.udp_rcvbuf = nix::sys::socket::getsockopt(&passed.udp[0], rcvbuf).unwrap_or(0);
            passed.udp
        } else if let Some(addr) = listen.udp {
            let (sockets, rcvbuf) = udp::bind_all(addr, listen.udp_readers, listen.so_rcvbuf)?;
            bound.udp_rcvbuf = rcvbuf;
            sockets
        } else {
            Vec::new()
        };
        bound.udp = udp.first().and_then(|s| s.local_addr().ok());
        let unix = match (passed.datagram, &listen.socket) {
            (Some((s, path)), _) => {
                bound.socket = path;
                Some(Arc::new(s))
            }
            (None, Some(path)) => {
                let (s, _) = unix::bind_datagram(path, listen.socket_mode, listen.so_rcvbuf)?;
                bound.socket = Some(path.clone());
                owned_paths.push(path.clone());
                Some(Arc::new(s))
            }
            (None, None) => None,
        };
        let stream = match (passed.stream, &listen.stream_socket) {
            (Some((l, path)), _) => {
                bound.stream_socket = path;
                Some(l)
            }
            (None, Some(path)) => {
                let l = unix::bind_stream(path, listen.socket_mode)?;
                bound.stream_socket = Some(path.clone());
                owned_paths.push(path.clone());
                Some(l)
            }
            (None, None) => None,
        };
        if origin_detection {
            let passcred = |fd: std::os::fd::BorrowedFd<'_>, which: &str| {
                let on = nix::sys::socket::sockopt::PassCred;
                nix::sys::socket::setsockopt(&fd, on, &true).map_err(|e| {
                    Error::Startup(format!(
                        "cannot turn on SO_PASSCRED on {which} for --origin-detection: {e}"
                    ))
                })
            };
            if let Some(s) = &unix {
                passcred(s.as_fd(), "--socket")?;
            }
            if let Some(l) = &stream {
                passcred(l.as_fd(), "--stream-socket")?;
            }
        }
        if udp.is_empty() && unix.is_none() && stream.is_none() {
            return Err(Error::Config(
                "no listener: --udp is off and neither --socket nor --stream-socket is set (nor \
                 did systemd pass a socket); whippet would receive nothing. Set --udp, --socket \
                 or --stream-socket"
                    .into(),
            ));
        }
        Ok(Sockets {
            bound,
            udp: udp.into_iter().map(Arc::new).collect(),
            unix,
            stream,
            owned_paths,
        })
    }
}

/// Everything between the readers and the output: the queue, the buffer pool, the workers,
/// the shards and the flusher.
struct Pipeline {
    demux: Arc<Demux>,
    queue_rx: Receiver<Batch>,
    pool: Arc<Pool>,
    live_tags: Arc<LiveTags>,
    /// What each worker is made from, for the UDP readers' own.
    worker_counters: Arc<worker::Counters>,
    enrichment: Enrichment,
    workers: Vec<JoinHandle<()>>,
    flusher: Option<(Sender<()>, JoinHandle<()>)>,
    /// Origin detection and the tagger's refresher, when on.
    origin: Option<Origin>,
}

/// Origin detection, and the thread that keeps the tagger current.
type Origin = (Arc<OriginDetection>, JoinHandle<()>);

impl Pipeline {
    /// Starts the flusher, then the workers. Returns the pipeline and the queue's only
    /// sender, for the readers: the queue closes when they have all exited.
    fn spawn(
        config: &Config,
        telemetry: &Telemetry,
        output: Box<dyn Output>,
    ) -> Result<(Pipeline, Sender<Batch>), Error> {
        let p = &config.pipeline;
        let listen = &config.listen;
        let demux = Arc::new(Demux::with_limits(
            p.shards,
            p.event_backlog,
            p.context_limit,
            p.aggregation_memory,
        ));
        let (queue, queue_rx) = crossbeam_channel::bounded::<Batch>(p.queue_size);
        // Every batch that can be in circulation at once stays pooled under load: the queue,
        // what the workers hold, one per datagram reader, and a few for stream connections.
        let in_flight = p.queue_size + p.workers + listen.udp_readers + 1 + 4;
        // Unix readers queue at most two batches per worker (see `Pool::admit`).
        let pool =
            Arc::new(Pool::new(listen.buffer_size, in_flight).with_admissions(2 * p.workers));
        // After each flush, spares beyond what one round of readers and workers holds go back
        // to the allocator.
        let keep = p.workers + listen.udp_readers + 2;
        let trimmed = pool.clone();
        let shaping = config.shaping.build().map_err(Error::Config)?;
        let live_tags = Arc::new(LiveTags::new(&config.aggregation.tags, shaping));
        let flusher = Flusher::new(
            demux.clone(),
            telemetry.flush.clone(),
            config.flush_settings(),
            output,
        )
        .with_live_shaping(live_tags.clone())
        .after_each_flush(move || {
            trimmed.trim(keep);
        });
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let flusher = spawn("whippet-flusher".into(), move || flusher.run(stop_rx))?;
        let mut enrichment = config.enrichment();
        let origin = start_origin(config, telemetry)?;
        enrichment.origin = origin.as_ref().map(|(o, _)| o.clone());
        let mut pipeline = Pipeline {
            demux,
            queue_rx,
            pool,
            live_tags,
            worker_counters: telemetry.worker.clone(),
            enrichment,
            workers: Vec::with_capacity(p.workers),
            flusher: Some((stop, flusher)),
            origin,
        };
        for i in 0..p.workers {
            let worker = pipeline.worker();
            let (rx, pool) = (pipeline.queue_rx.clone(), pipeline.pool.clone());
            pipeline
                .workers
                .push(spawn(format!("whippet-worker-{i}"), move || {
                    worker.run(rx, pool)
                })?);
        }
        Ok((pipeline, queue))
    }

    /// A worker feeding this pipeline's shards, with its extra tags and shaping live.
    fn worker(&self) -> Worker {
        let counters = self.worker_counters.clone();
        Worker::new(self.demux.clone(), counters, self.enrichment.clone())
            .with_live_tags(self.live_tags.clone())
    }
}

/// Origin detection, when the configuration turns it on: the pid cache, and the tagger,
/// asked once before this returns (so the first messages find their containers) and then by
/// its own thread.
fn start_origin(config: &Config, telemetry: &Telemetry) -> Result<Option<Origin>, Error> {
    let o = &config.origin;
    if !o.tagger() {
        return Ok(None);
    }
    let tagger = Tagger::new(o.sources(), telemetry.tagger.clone());
    let pids = o
        .detection
        .then(|| Arc::new(PidCache::new(o.procfs.clone(), telemetry.origin.clone())));
    let thread = tagger
        .start()
        .map_err(|e| Error::Startup(format!("cannot start thread whippet-tagger: {e}")))?;
    let detection = OriginDetection::new(
        tagger,
        pids,
        o.client,
        o.entity_id_precedence,
        o.cardinality,
    );
    Ok(Some((Arc::new(detection), thread)))
}

/// The reader threads, and the stream transport's open connections.
struct Readers {
    threads: Vec<JoinHandle<()>>,
    stream: Option<Arc<stream::Connections>>,
}

impl Readers {
    /// One thread per UDP socket, one for the Unix datagram socket, one accepting stream
    /// connections. Only they hold queue senders: the queue closes when they all exit.
    fn spawn(
        sockets: &mut Sockets,
        handoff: Handoff,
        listen: &Listen,
        pipeline: &Pipeline,
    ) -> Result<Readers, Error> {
        let (limits, priority) = (listen.stream, listen.unix_reader_priority);
        let mut threads = Vec::new();
        for (i, socket) in sockets.udp.iter().enumerate() {
            let (socket, handoff) = (socket.clone(), handoff.clone());
            let worker = pipeline.worker();
            threads.push(spawn(format!("whippet-udp-{i}"), move || {
                DatagramReader::new(socket.as_fd(), Transport::Udp, &handoff)
                    .with_worker(worker)
                    .run()
            })?);
        }
        if let Some(socket) = &sockets.unix {
            let (socket, handoff) = (socket.clone(), handoff.clone());
            let worker = pipeline.worker();
            threads.push(spawn("whippet-unix".into(), move || {
                DatagramReader::new(socket.as_fd(), Transport::Unix, &handoff)
                    .with_priority(priority)
                    .with_worker(worker)
                    .run()
            })?);
        }
        let mut stream = None;
        if let Some(listener) = sockets.stream.take() {
            let connections = Arc::new(stream::Connections::default());
            let conns = connections.clone();
            threads.push(spawn("whippet-stream-accept".into(), move || {
                stream::accept_loop(listener, handoff, limits, conns)
            })?);
            stream = Some(connections);
        }
        Ok(Readers { threads, stream })
    }
}

/// A running whippet.
pub struct Daemon {
    pub bound: Bound,
    pub telemetry: Arc<Telemetry>,
    stopping: Arc<AtomicBool>,
    /// Set once every socket is shut down for reading ([`Handoff::shut`]).
    shut: Arc<AtomicBool>,
    sockets: Sockets,
    readers: Readers,
    pipeline: Pipeline,
    probe: Arc<Probe>,
    reloader: Reloader,
    /// The forwarder, when there is one, for the shutdown clock.
    forwarder: Option<Handle>,
    status: Option<StatusServer>,
    /// Captures (SIGUSR2), when `--capture-dir` is set.
    capture: Option<Arc<Capture>>,
}

impl Daemon {
    /// Binds the listeners and starts every thread, with the output the configuration asks
    /// for: the intake when one is configured, else the console on stdout.
    pub fn start(config: &Config) -> Result<Daemon, Error> {
        one_malloc_arena();
        let mut sockets = Sockets::bind(&config.listen, config.origin.detection)?;
        let telemetry = Arc::new(Telemetry::new(config));
        // The vitals read the probe, which needs the pipeline the output goes into.
        let probe_slot: Arc<OnceLock<Arc<Probe>>> = Arc::default();
        let (output, retarget) = output_for(config, &telemetry, &probe_slot)?;
        let (pipeline, queue) = Pipeline::spawn(config, &telemetry, output)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let shut = Arc::new(AtomicBool::new(false));
        let mirror = match config.listen.mirror {
            Some(to) => Some(Mirror::start(to, telemetry.mirror.clone()).map_err(|e| {
                Error::Startup(format!(
                    "cannot start the mirror to {to} (--forward-host, --forward-port): {e}"
                ))
            })?),
            None => None,
        };
        let capture = match &config.listen.capture {
            Some(settings) => {
                std::fs::create_dir_all(&settings.dir).map_err(|e| {
                    Error::Startup(format!(
                        "cannot create the capture directory {} (--capture-dir): {e}",
                        settings.dir.display()
                    ))
                })?;
                Some(Capture::new(settings.clone(), telemetry.capture.clone()))
            }
            None => None,
        };
        let handoff = Handoff {
            queue,
            pool: pipeline.pool.clone(),
            counters: telemetry.listener.clone(),
            stopping: stopping.clone(),
            shut: shut.clone(),
            mirror,
            capture: capture.clone(),
        };
        let readers = Readers::spawn(&mut sockets, handoff, &config.listen, &pipeline)?;
        let probe = Arc::new(Probe {
            telemetry: telemetry.clone(),
            queue: pipeline.queue_rx.clone(),
            kernel_drops: udp::KernelDrops::of(&sockets.udp),
            demux: pipeline.demux.clone(),
            mirror: config.listen.mirror.is_some(),
            capture: capture.is_some(),
        });
        let _ = probe_slot.set(probe.clone());
        let (status, status_sources) = start_status(config, &probe, &pipeline.demux)?;
        sockets.bound.status = status.as_ref().map(|s| s.addr);
        let bound = sockets.bound.clone();
        let forwarder = retarget.clone();
        let reloader = Reloader::new(
            config,
            bound.clone(),
            pipeline.live_tags.clone(),
            retarget,
            status_sources,
            pipeline.origin.as_ref().map(|(o, _)| o.clone()),
        );
        Ok(Daemon {
            bound,
            telemetry,
            stopping,
            shut,
            sockets,
            readers,
            pipeline,
            probe,
            reloader,
            forwarder,
            status,
            capture,
        })
    }

    /// Every counter, plus the gauges read now (queue depth, kernel UDP drops).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::of(&[&*self.probe])
    }

    /// Applies a re-read configuration (see [`Reloader::apply`]).
    pub fn reload(&mut self, new: &Config) -> Vec<String> {
        self.reloader.apply(new)
    }

    /// Starts the shutdown clock: the forwarder must be done by `deadline`, and a guard
    /// thread ends the process [`OVERRUN`] after it whatever is still stuck (a flusher
    /// blocked on a stdout nobody reads, a thread that never returns), after sending what
    /// the forwarder holds to the retry directory or counting it dropped. Dropping the
    /// returned sender, once shutdown is done, dismisses the guard.
    pub fn guard_shutdown(&self, deadline: Instant) -> Result<Sender<()>, Error> {
        if let Some(f) = &self.forwarder {
            f.stop_by(deadline);
        }
        let (done, wait) = crossbeam_channel::bounded::<()>(0);
        let forwarder = self.forwarder.clone();
        let limit = deadline + OVERRUN;
        spawn("whippet-stop-guard".into(), move || {
            let left = limit.saturating_duration_since(Instant::now());
            if let Err(crossbeam_channel::RecvTimeoutError::Timeout) = wait.recv_timeout(left) {
                if let Some(f) = forwarder {
                    f.abandon();
                }
                // Logged from a thread of its own: stderr may be the output that is stuck.
                let _ = std::thread::Builder::new().spawn(|| {
                    log::error(&format!(
                        "shutdown overran --shutdown-timeout by {} s (an output that does not \
                         take data: stdout not read, or a stuck thread); what the forwarder \
                         held went to --retry-dir or was counted dropped; exiting now",
                        OVERRUN.as_secs()
                    ))
                });
                std::thread::sleep(Duration::from_millis(200));
                // SAFETY: _exit ends the process at once; unlike exit it flushes nothing, so
                // it cannot block on the very stdout that may be stuck.
                unsafe { nix::libc::_exit(1) };
            }
        })?;
        Ok(done)
    }

    /// Stops in order (see the module doc) and returns the final telemetry.
    pub fn shutdown(mut self) -> Snapshot {
        self.stop_reading();
        for t in self.readers.threads.drain(..) {
            let _ = t.join();
        }
        // The readers held the queue's senders: it is closed, and the workers drain it.
        for t in self.pipeline.workers.drain(..) {
            let _ = t.join();
        }
        if let Some((stop, thread)) = self.pipeline.flusher.take() {
            drop(stop);
            let _ = thread.join();
        }
        if let Some((origin, thread)) = self.pipeline.origin.take() {
            // Not joined: it holds no data, and a request to a hung provider must not
            // stretch the shutdown; it ends at its next wakeup, or with the process.
            origin.tagger.stop();
            drop(thread);
        }
        for path in &self.sockets.owned_paths {
            let _ = std::fs::remove_file(path);
        }
        let last = self.snapshot();
        if let Some(server) = self.status.take() {
            server.stop();
        }
        last
    }

    /// Sets `stopping` and shuts every socket for reading, waking every reader.
    fn stop_reading(&self) {
        self.stopping.store(true, Relaxed);
        for s in &self.sockets.udp {
            // Unconnected UDP sockets answer ENOTCONN but are shut down all the same.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&**s),
                nix::sys::socket::Shutdown::Read,
            );
        }
        if let Some(s) = &self.sockets.unix {
            let _ = s.shutdown(Shutdown::Read);
        }
        if let (Some(connections), Some(path)) = (&self.readers.stream, &self.bound.stream_socket) {
            connections.shutdown_all();
            // Wake the accept thread; it then takes every pending connection before exiting.
            let _ = UnixStream::connect(path);
        }
        self.shut.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// How long past `--shutdown-timeout` the process may take to exit before the guard ends
/// it ([`Daemon::guard_shutdown`]): room for the final flush's serialization.
pub const OVERRUN: Duration = Duration::from_secs(5);

/// The status endpoint, when `--status` asks for one, and the settings section it shows.
fn start_status(
    config: &Config,
    probe: &Arc<Probe>,
    demux: &Arc<Demux>,
) -> Result<(Option<StatusServer>, Option<Arc<status::Sources>>), Error> {
    let Some(addr) = config.operation.status else {
        return Ok((None, None));
    };
    let p = probe.clone();
    let sources = Arc::new(status::Sources {
        snapshot: Box::new(move || Snapshot::of(&[&*p])),
        demux: demux.clone(),
        info: Default::default(),
        started: std::time::Instant::now(),
    });
    let server = StatusServer::start(addr, sources.clone())?;
    Ok((Some(server), Some(sources)))
}

/// The console, or the serializer and forwarder when an intake is configured (and the handle
/// that retargets the forwarder on reload).
fn output_for(
    config: &Config,
    telemetry: &Telemetry,
    probe: &Arc<OnceLock<Arc<Probe>>>,
) -> Result<(Box<dyn Output>, Option<Handle>), Error> {
    let mut configs = config.forwarders().into_iter();
    let Some(forwarder_config) = configs.next() else {
        let console = Console::new(std::io::BufWriter::new(std::io::stdout()));
        return Ok((Box::new(console), None));
    };
    let additional = configs
        .zip(&telemetry.additional)
        .map(|(c, counters)| Forwarder::start(c, counters.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    // A short-lived thread: it logs whether the key is valid and ends; whippet runs either way.
    let check = forwarder_config.clone();
    spawn("whippet-validate".into(), move || {
        forwarder::validate_api_key(&check)
    })?;
    let forwarder = Forwarder::start(forwarder_config, telemetry.forwarder.clone())?;
    let retarget = forwarder.handle(&additional);
    let output = Box::new(IntakeOutput {
        serializer: config.serializer(),
        forwarder: Some(forwarder),
        additional,
        counters: telemetry.forwarder.clone(),
        shutdown_timeout: config.forwarding.shutdown_timeout,
        enabled: config.forwarding.payloads,
    });
    if !config.operation.self_metrics {
        return Ok((output, Some(retarget)));
    }
    let probe = probe.clone();
    let read = Box::new(move || {
        probe
            .get()
            .map(|p| Snapshot::of(&[&**p]))
            .unwrap_or_default()
    });
    let a = &config.aggregation;
    let vitals = Vitals::new(output, read, &a.hostname, &a.tags, a.expiry.interval);
    Ok((Box::new(vitals), Some(retarget)))
}

/// Asks glibc's allocator for a single arena, unless `MALLOC_ARENA_MAX` says otherwise.
///
/// By default glibc gives threads arenas of their own (up to 8 per CPU). Here workers
/// allocate context keys and accumulators and the flusher frees them, so memory freed in one
/// arena sits unused while another grows (several MiB at a few hundred thousand contexts;
/// docs/performance.md). Allocation is off the per-message path (a new context, a closed
/// bucket), so the shared arena's lock is rarely taken.
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

/// Runs whippet until SIGTERM or SIGINT. SIGHUP re-reads the configuration with `reload`;
/// SIGUSR1 logs the telemetry; SIGUSR2 starts or ends a capture. Speaks sd_notify when systemd asks for it.
pub fn run(config: &Config, reload: impl Fn() -> Result<Config, Error>) -> Result<(), Error> {
    log::set_level(config.operation.log_level);
    check::refuse_root(config, nix::unistd::geteuid().is_root())?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP])
        .map_err(|e| Error::Startup(format!("cannot install signal handlers: {e}")))?;
    warn_at_start(config);
    no_core_dumps();
    let mut daemon = Daemon::start(config)?;
    log_start(config, &daemon.bound);
    let relevant = Relevant::of(config, &daemon.bound);
    for warning in exposure(&daemon.bound) {
        log::warn(&warning);
    }
    systemd::notify("READY=1\nSTATUS=listening");
    let watchdog = systemd::watchdog_interval()
        .map(start_watchdog)
        .transpose()?;
    for signal in signals.forever() {
        match signal {
            // Asked for: answered whatever --log-level says.
            SIGUSR1 => {
                for r in daemon.snapshot().grouped() {
                    if relevant.keeps(r) {
                        log::answer(&format!("telemetry {r}"));
                    }
                }
            }
            SIGHUP => reload_with(&mut daemon, &reload),
            SIGUSR2 => match &daemon.capture {
                Some(c) => c.toggle(),
                None => {
                    log::warn("SIGUSR2 asks for a capture, but captures are off: set --capture-dir")
                }
            },
            _ => break,
        }
    }
    // The clock first: even the log line below may block (stderr a pipe nobody reads).
    let deadline = Instant::now() + config.forwarding.shutdown_timeout;
    let guard = daemon.guard_shutdown(deadline)?;
    systemd::notify("STOPPING=1");
    log::info("stopping: draining queues and flushing every bucket");
    let last = daemon.shutdown();
    drop(guard);
    if let Some((stop, thread)) = watchdog {
        drop(stop);
        let _ = thread.join();
    }
    log_snapshot(&last, &relevant);
    log::info("stopped");
    Ok(())
}

/// One SIGHUP: re-read, apply or reject, and tell systemd.
fn reload_with(daemon: &mut Daemon, reload: &impl Fn() -> Result<Config, Error>) {
    systemd::notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    match reload() {
        Ok(new) => {
            warn_at_start(&new);
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

/// Whether the kernel gave less receive buffer than `--so-rcvbuf` asked for. Linux keeps
/// twice the size set (half for its own bookkeeping) and reports that, so the size granted
/// for data is half of `reported`.
fn rcvbuf_capped(asked: usize, reported: usize) -> Option<String> {
    let granted = reported / 2;
    (asked > 0 && granted < asked).then(|| {
        format!(
            "the kernel capped --so-rcvbuf: asked for {asked} bytes, granted {granted}; raise net.core.rmem_max to at least {asked} to let bursts wait in the socket"
        )
    })
}

fn warn_at_start(config: &Config) {
    if let Some(warning) = check::readable_key_file(config) {
        log::warn(&warning);
    }
    for warning in &config.warnings {
        log::warn(warning);
    }
    if !config.ignored.is_empty() {
        log::info(&format!(
            "ignored {} keys of the config file that are not whippet settings (--check-config lists them)",
            config.ignored.len()
        ));
    }
}

fn log_start(config: &Config, bound: &Bound) {
    let f = &config.forwarding;
    match &f.intake_url {
        Some(url) => log::info(&format!(
            "forwarding to {}{} (series {}, {} compression)",
            forwarder::redact_url(url),
            f.egress.proxy_url(url).map_or(String::new(), |p| format!(
                " through the proxy {}",
                forwarder::redact_url(p)
            )),
            match f.series_api {
                SeriesApi::V1 => "v1 JSON",
                SeriesApi::V2 => "v2 protobuf",
            },
            f.compression.header().unwrap_or("no")
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
        if bound.activated == 0 {
            if let Some(warning) = rcvbuf_capped(config.listen.so_rcvbuf, bound.udp_rcvbuf) {
                log::warn(&warning);
            }
        }
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
        config.pipeline.workers, config.pipeline.shards, config.aggregation.expiry.interval
    ));
}

/// A core dump would hold the API key: none are written (soft and hard `RLIMIT_CORE` 0; the
/// packaged unit also sets `LimitCORE=0`). Tracing and profiling stay possible.
fn no_core_dumps() {
    use nix::sys::resource::{setrlimit, Resource};
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        log::warn(&format!(
            "cannot turn core dumps off ({e}): a crash could write the API key to disk"
        ));
    }
}

/// A warning for each listener other hosts can reach: UDP takes metrics from anyone who can
/// send to it, and the status endpoint shows telemetry, settings and context names.
fn exposure(bound: &Bound) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(addr) = bound.udp.filter(|a| !a.ip().is_loopback()) {
        warnings.push(format!(
            "udp listens on {addr}, which other hosts can reach: anyone who can send to it can \
             submit metrics (set --udp 127.0.0.1:{} to keep it local)",
            addr.port()
        ));
    }
    if let Some(addr) = bound.status.filter(|a| !a.ip().is_loopback()) {
        warnings.push(format!(
            "the status endpoint listens on {addr}, which other hosts can reach: it shows \
             telemetry, settings and context names (give --status a bare port to keep it on \
             127.0.0.1)"
        ));
    }
    warnings
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

fn log_snapshot(s: &Snapshot, relevant: &Relevant) {
    for r in s.grouped() {
        if relevant.keeps(r) {
            log::info(&format!("telemetry {r}"));
        }
    }
}

/// Which counters can move in this configuration: the telemetry dump (SIGUSR1, shutdown)
/// leaves out the rest (a transport not listened on, origin detection that is off, a parse
/// error a message of that kind cannot have). `/metrics` and `/status` keep them all.
struct Relevant {
    transports: [bool; Transport::COUNT],
    origin: bool,
    tagger: bool,
    /// A kind of payload is turned off (`--enable-payloads-*`).
    disabled: bool,
}

impl Relevant {
    fn of(config: &Config, bound: &Bound) -> Relevant {
        let mut transports = [false; Transport::COUNT];
        transports[Transport::Udp as usize] = bound.udp.is_some();
        transports[Transport::Unix as usize] = bound.socket.is_some();
        transports[Transport::Stream as usize] = bound.stream_socket.is_some();
        Relevant {
            transports,
            origin: config.origin.detection,
            tagger: config.origin.tagger(),
            disabled: config.forwarding.payloads != forwarder::Enabled::ALL,
        }
    }

    fn keeps(&self, r: &Reading) -> bool {
        let label = |key: &str| r.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        if let Some(t) = label(Transport::NAME) {
            let listened = Transport::ALL
                .iter()
                .find(|x| x.label() == t)
                .is_some_and(|x| self.transports[*x as usize]);
            if !listened {
                return false;
            }
        }
        if r.name.starts_with("whippet_stream_") {
            return self.transports[Transport::Stream as usize];
        }
        if r.name == "whippet_udp_kernel_drops" {
            return self.transports[Transport::Udp as usize];
        }
        if r.name == "whippet_unix_reader_realtime" {
            return self.transports[Transport::Unix as usize];
        }
        if r.name.starts_with("whippet_origin_") {
            return self.origin;
        }
        if r.name.starts_with("whippet_tagger_") {
            return self.tagger;
        }
        if r.name == "whippet_disabled_items_total" {
            return self.disabled;
        }
        if r.name == "whippet_parse_errors_total" {
            let kind = MessageKind::ALL
                .iter()
                .find(|k| Some(k.label()) == label("kind"));
            let reason = Reason::ALL
                .iter()
                .find(|x| Some(x.label()) == label("reason"));
            return match (kind, reason) {
                (Some(k), Some(x)) => x.applies_to(*k),
                _ => true,
            };
        }
        true
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_dump_leaves_out_counters_that_cannot_move_here() {
        let relevant = Relevant {
            transports: [true, false, false],
            origin: false,
            tagger: false,
            disabled: false,
        };
        let mut s = Snapshot::default();
        s.counter("whippet_disabled_items_total", &[("data", "events")], 0);
        s.counter("whippet_packets_total", &[("transport", "udp")], 1);
        s.counter("whippet_packets_total", &[("transport", "unix")], 0);
        s.counter("whippet_stream_connections_total", &[], 0);
        s.gauge("whippet_unix_reader_realtime", &[], 0);
        s.counter("whippet_origin_cache_hits_total", &[], 0);
        s.counter("whippet_tagger_entities", &[], 0);
        let errors = "whippet_parse_errors_total";
        s.counter(errors, &[("kind", "event"), ("reason", "empty_title")], 0);
        s.counter(errors, &[("kind", "event"), ("reason", "unknown_type")], 0);
        s.counter(errors, &[("kind", "metric"), ("reason", "invalid_utf8")], 0);
        s.counter("whippet_samples_total", &[], 0);
        let kept: Vec<String> = s
            .grouped()
            .into_iter()
            .filter(|r| relevant.keeps(r))
            .map(|r| r.to_string())
            .collect();
        assert_eq!(
            kept,
            [
                "whippet_packets_total{transport=\"udp\"} 1",
                "whippet_parse_errors_total{kind=\"event\",reason=\"empty_title\"} 0",
                "whippet_parse_errors_total{kind=\"metric\",reason=\"invalid_utf8\"} 0",
                "whippet_samples_total 0",
            ]
        );
    }

    #[test]
    fn a_receive_buffer_the_kernel_capped_is_named_with_what_was_asked() {
        // Linux reports twice what it grants for data.
        assert_eq!(rcvbuf_capped(4 << 20, 8 << 20), None);
        assert_eq!(rcvbuf_capped(0, 425_984), None);
        assert_eq!(
            rcvbuf_capped(4 << 20, 425_984).unwrap(),
            "the kernel capped --so-rcvbuf: asked for 4194304 bytes, granted 212992; raise net.core.rmem_max to at least 4194304 to let bursts wait in the socket"
        );
    }

    use super::*;

    #[test]
    fn listeners_other_hosts_can_reach_draw_a_warning_each() {
        let mut bound = Bound {
            udp: Some("127.0.0.1:8125".parse().unwrap()),
            status: Some("[::1]:5000".parse().unwrap()),
            ..Bound::default()
        };
        assert_eq!(exposure(&bound), Vec::<String>::new());
        bound.udp = Some("0.0.0.0:8125".parse().unwrap());
        bound.status = Some("10.1.2.3:5000".parse().unwrap());
        let warnings = exposure(&bound);
        assert_eq!(warnings.len(), 2);
        assert!(warnings[0].starts_with("udp listens on 0.0.0.0:8125, which other hosts can reach"));
        assert!(warnings[0].contains("set --udp 127.0.0.1:8125"));
        assert!(warnings[1].starts_with("the status endpoint listens on 10.1.2.3:5000"));
    }
}
