//! The daemon: the only place that knows which threads exist, how they are wired, and the
//! order they stop in.
//!
//! Start: bind every socket first (so a bad flag fails before any thread runs), then start the
//! flusher, the workers, and the readers last.
//!
//! Stop (SIGTERM/SIGINT), from the sources down:
//! 1. set `stopping` and `shutdown(SHUT_RD)` every socket: readers drain what the kernel holds
//!    and exit; their queue senders drop with them;
//! 2. workers drain the queue and exit when it is closed and empty;
//! 3. the flusher is told to stop: it flushes every bucket, the open one included, and
//!    finishes the output.

use std::net::{Shutdown, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::config::Config;
use crate::demux::Demux;
use crate::flush::{FlushSettings, Flusher};
use crate::forwarder::{self, Forwarder, ForwarderConfig, IntakeOutput};
use crate::listener::{self, stream, udp, unix, ReaderContext};
use crate::output::{Console, Output};
use crate::packet::{Batch, Pool};
use crate::serializer::{Serializer, SeriesApi};
use crate::shard::Expiry;
use crate::telemetry::{Point, Snapshot, Telemetry, Transport};
use crate::worker::{Enrichment, Worker};
use crate::Error;

/// Where the listeners ended up (port 0 resolved).
#[derive(Debug, Clone, Default)]
pub struct Bound {
    pub udp: Option<SocketAddr>,
    pub udp_rcvbuf: usize,
    pub socket: Option<PathBuf>,
    pub stream_socket: Option<PathBuf>,
}

/// A running whippet.
pub struct Daemon {
    pub bound: Bound,
    pub telemetry: Arc<Telemetry>,
    stopping: Arc<AtomicBool>,
    udp: Vec<Arc<UdpSocket>>,
    udp_inodes: Vec<u64>,
    unix: Option<Arc<UnixDatagram>>,
    stream: Option<Arc<stream::Connections>>,
    readers: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    flusher: Option<(Sender<()>, JoinHandle<()>)>,
    queue: Receiver<Batch>,
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

    /// Like [`Daemon::start`], with an output of the caller's making.
    pub fn start_with(
        config: &Config,
        make_output: impl FnOnce(Arc<Telemetry>) -> Result<Box<dyn Output>, Error>,
    ) -> Result<Daemon, Error> {
        let mut bound = Bound::default();
        let (udp_sockets, rcvbuf) = match config.udp {
            Some(addr) => udp::bind_all(addr, config.udp_readers, config.so_rcvbuf)?,
            None => (Vec::new(), 0),
        };
        bound.udp = udp_sockets.first().and_then(|s| s.local_addr().ok());
        bound.udp_rcvbuf = rcvbuf;
        let unix_socket = match &config.socket {
            Some(path) => {
                let (s, _) = unix::bind_datagram(path, config.socket_mode, config.so_rcvbuf)?;
                bound.socket = Some(path.clone());
                Some(Arc::new(s))
            }
            None => None,
        };
        let stream_listener = match &config.stream_socket {
            Some(path) => {
                unix::prepare_path(path, unix::SocketKind::Stream, "--stream-socket")?;
                let l = UnixListener::bind(path).map_err(|e| {
                    listener::bind_error("--stream-socket", &path.display().to_string(), e)
                })?;
                unix::set_mode(path, config.socket_mode, "--socket-mode")?;
                bound.stream_socket = Some(path.clone());
                Some(l)
            }
            None => None,
        };

        let telemetry = Arc::new(Telemetry::default());
        let output = make_output(telemetry.clone())?;
        let demux = Arc::new(Demux::new(config.shards, config.event_backlog));
        let pool = Arc::new(Pool::new(
            config.buffer_size,
            config.workers * 2 + config.udp_readers + 4,
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
        let flusher = Flusher::new(demux.clone(), telemetry.clone(), settings, output);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let flusher_thread = spawn("whippet-flusher".into(), move || flusher.run(stop_rx))?;

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
            let worker = Worker::new(demux.clone(), telemetry.clone(), enrichment.clone());
            let (rx, pool) = (queue_rx.clone(), pool.clone());
            workers.push(spawn(format!("whippet-worker-{i}"), move || {
                worker.run(rx, pool)
            })?);
        }

        let ctx = ReaderContext {
            queue: queue_tx,
            pool,
            telemetry: telemetry.clone(),
            stopping: stopping.clone(),
        };
        let mut readers = Vec::new();
        let udp: Vec<Arc<UdpSocket>> = udp_sockets.into_iter().map(Arc::new).collect();
        for (i, socket) in udp.iter().enumerate() {
            let (socket, ctx) = (socket.clone(), ctx.clone());
            readers.push(spawn(format!("whippet-udp-{i}"), move || {
                listener::read_datagrams(socket.as_fd(), Transport::Udp, &ctx)
            })?);
        }
        if let Some(socket) = &unix_socket {
            let (socket, ctx) = (socket.clone(), ctx.clone());
            readers.push(spawn("whippet-unix".into(), move || {
                listener::read_datagrams(socket.as_fd(), Transport::Unix, &ctx)
            })?);
        }
        let mut stream_handle = None;
        if let Some(l) = stream_listener {
            let connections = Arc::new(stream::Connections::default());
            let (conns, ctx, max) = (
                connections.clone(),
                ctx.clone(),
                config.stream_max_connections,
            );
            readers.push(spawn("whippet-stream-accept".into(), move || {
                stream::accept_loop(l, ctx, max, conns)
            })?);
            stream_handle = Some(connections);
        }
        drop(ctx); // only readers hold queue senders now: the queue closes when they exit

        Ok(Daemon {
            bound,
            udp_inodes: udp.iter().map(|s| udp::inode(s)).collect(),
            telemetry,
            stopping,
            udp,
            unix: unix_socket,
            stream: stream_handle,
            readers,
            workers,
            flusher: Some((stop_tx, flusher_thread)),
            queue: queue_rx,
        })
    }

    /// Every counter, plus the gauges read now (queue depth, kernel UDP drops).
    pub fn snapshot(&self) -> Snapshot {
        let gauges = [
            Point {
                name: "whippet_queue_depth",
                labels: vec![],
                value: self.queue.len() as u64,
            },
            Point {
                name: "whippet_udp_kernel_drops",
                labels: vec![],
                value: udp::kernel_drops(&self.udp_inodes),
            },
        ];
        self.telemetry.snapshot(&gauges)
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
        for path in [&self.bound.socket, &self.bound.stream_socket]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(path);
        }
        self.snapshot()
    }
}

/// The console, or the serializer and forwarder when an intake is configured.
fn output_for(config: &Config, telemetry: Arc<Telemetry>) -> Result<Box<dyn Output>, Error> {
    let Some(url) = &config.intake_url else {
        return Ok(Box::new(Console::new(std::io::BufWriter::new(
            std::io::stdout(),
        ))));
    };
    let forwarder_config = ForwarderConfig {
        base_url: url.clone(),
        api_key: config.api_key.0.clone(),
        threads: config.forwarder_threads,
        retry_queue_bytes: config.retry_queue_bytes,
        timeout: Duration::from_millis(config.request_timeout_ms),
        retry_base: Duration::from_millis(config.retry_base_ms),
    };
    // A short-lived thread: it logs whether the key is valid and ends; whippet runs either way.
    let check = forwarder_config.clone();
    spawn("whippet-validate".into(), move || {
        forwarder::validate_api_key(&check)
    })?;
    let forwarder = Forwarder::start(forwarder_config, telemetry.clone())?;
    Ok(Box::new(IntakeOutput {
        serializer: Serializer {
            series_api: config.series_api,
            compression: config.compression,
            hostname: config.hostname.clone(),
        },
        forwarder: Some(forwarder),
        telemetry,
        shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
    }))
}

fn log(msg: &str) {
    eprintln!("whippet: {msg}");
}

/// Runs whippet until SIGTERM or SIGINT, with console output. SIGUSR1 logs the telemetry.
pub fn run(config: &Config) -> Result<(), Error> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1])
        .map_err(|e| Error::Startup(format!("cannot install signal handlers: {e}")))?;
    let daemon = Daemon::start(config)?;
    match &config.intake_url {
        Some(url) => log(&format!(
            "forwarding to {url} (series {}, {} compression)",
            match config.series_api {
                SeriesApi::V1 => "v1 JSON",
                SeriesApi::V2 => "v2 protobuf",
            },
            config.compression.header().unwrap_or("no")
        )),
        None => log("no intake configured (--dd-url or an API key): printing to stdout"),
    }
    if let Some(addr) = daemon.bound.udp {
        log(&format!(
            "listening on udp {addr} (receive buffer {} bytes)",
            daemon.bound.udp_rcvbuf
        ));
    }
    if let Some(path) = &daemon.bound.socket {
        log(&format!("listening on unix {}", path.display()));
    }
    if let Some(path) = &daemon.bound.stream_socket {
        log(&format!("listening on unix_stream {}", path.display()));
    }
    log(&format!(
        "ready: {} workers, {} shards, {}s buckets",
        config.workers, config.shards, config.bucket_seconds
    ));
    for signal in signals.forever() {
        if signal == SIGUSR1 {
            log_snapshot(&daemon.snapshot());
        } else {
            log("stopping: draining queues and flushing every bucket");
            break;
        }
    }
    let last = daemon.shutdown();
    log_snapshot(&last);
    log("stopped");
    Ok(())
}

fn log_snapshot(s: &Snapshot) {
    let mut text = String::new();
    for p in &s.points {
        text.push_str(&format!("whippet: telemetry {p}\n"));
    }
    eprint!("{text}");
}
