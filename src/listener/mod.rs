//! Listeners: plain OS threads blocking on sockets, turning what they read into [`Batch`]es on
//! the packet queue. UDP and Unix datagram sockets are read with batched `recvmmsg` by a
//! [`datagram::DatagramReader`]; the Unix stream transport has a thread per connection
//! ([`stream`]).
//!
//! Queue-full policy ([`Handoff`]): the UDP reader never waits for workers — a full queue
//! drops the batch and counts it, because UDP has no backpressure and a blocked reader only
//! moves the loss into the kernel. The Unix stream and Unix datagram readers wait instead: a
//! Unix datagram sender blocks (or gets EAGAIN) when the socket's queue is full, so waiting
//! turns overload into backpressure on the client instead of loss (docs/behaviour.md,
//! "Overload"). A UDP reader whose socket has no backlog parses a batch itself rather than
//! handing it off ([`datagram`]); with a backlog it only drains and hands off. The Unix
//! datagram reader runs at real-time priority while it is not saturated, and parses its
//! batches itself while it is ([`priority`]), or when they are a trickle: a datagram or
//! two after which the socket was empty.
//!
//! Shutdown: the daemon calls `shutdown(SHUT_RD)` on every socket. A blocked read wakes up,
//! the kernel hands over what was already queued, and then reads return 0: readers drain and
//! exit without timeouts or polling.

pub mod capture;
pub mod copies;
pub mod datagram;
pub mod mirror;
pub mod priority;
pub mod stream;
pub mod udp;
pub mod unix;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_channel::{Sender, TrySendError};

use crate::packet::{Batch, Pool, Transport};
use crate::telemetry::{Counter, Gauge, Label, PerLabel, Readings, Snapshot};

/// Counters of one transport.
#[derive(Debug, Default)]
pub struct TransportCounters {
    pub packets: Counter,
    pub bytes: Counter,
    /// Datagrams longer than `--buffer-size`, detected with MSG_TRUNC and not parsed.
    pub truncated: Counter,
    /// Packets dropped because the queue was full.
    pub queue_full: Counter,
    /// Receive errors other than interruptions.
    pub errors: Counter,
}

impl TransportCounters {
    /// Each counter with the name it is reported under.
    fn named(&self) -> [(&'static str, &Counter); 5] {
        [
            ("whippet_packets_total", &self.packets),
            ("whippet_bytes_total", &self.bytes),
            ("whippet_packets_truncated_total", &self.truncated),
            ("whippet_packets_queue_full_total", &self.queue_full),
            ("whippet_receive_errors_total", &self.errors),
        ]
    }
}

/// The stream transport's connections.
#[derive(Debug, Default)]
pub struct StreamCounters {
    /// Connections accepted.
    pub connections: Counter,
    /// Connections closed at once over `--stream-max-connections`.
    pub refused: Counter,
    /// Connections closed for a frame longer than `--buffer-size`.
    pub frames_too_large: Counter,
    /// Connections that ended with a partial frame pending.
    pub partial_frames: Counter,
    /// Connections closed after `--stream-idle-timeout` without a byte, or without finishing
    /// a frame begun that long ago.
    pub idle_closed: Counter,
}

/// The listeners' counters, shared by every reader thread.
#[derive(Debug, Default)]
pub struct Counters {
    pub transports: PerLabel<Transport, TransportCounters, { Transport::COUNT }>,
    pub stream: StreamCounters,
    /// Messages in the batches dropped because the queue was full.
    pub queue_full_messages: Counter,
    /// 1 while the Unix datagram reader runs at real-time priority (see [`priority`]).
    pub unix_reader_realtime: Gauge,
}

impl Readings for Counters {
    fn read(&self, out: &mut Snapshot) {
        for (t, c) in self.transports.iter() {
            for (name, counter) in c.named() {
                out.counter(name, &[(Transport::NAME, t.label())], counter.get());
            }
        }
        let s = &self.stream;
        let stream = [
            ("whippet_stream_connections_total", &s.connections),
            ("whippet_stream_connections_refused_total", &s.refused),
            ("whippet_stream_frames_too_large_total", &s.frames_too_large),
            ("whippet_stream_partial_frames_total", &s.partial_frames),
            ("whippet_stream_idle_closed_total", &s.idle_closed),
        ];
        for (name, c) in stream {
            out.counter(name, &[], c.get());
        }
        out.gauge(
            "whippet_unix_reader_realtime",
            &[],
            self.unix_reader_realtime.get(),
        );
        let dropped = self.queue_full_messages.get();
        out.counter(
            "whippet_dropped_total",
            &[("reason", "queue_full")],
            dropped,
        );
    }
}

/// Where readers put what they read: the packet queue, the pool its buffers come from and
/// go back to, the counters, and the flag the daemon sets before it shuts sockets down.
#[derive(Clone)]
pub struct Handoff {
    pub queue: Sender<Batch>,
    pub pool: Arc<Pool>,
    pub counters: Arc<Counters>,
    pub stopping: Arc<AtomicBool>,
    /// Set once every socket has been shut down for reading (after `stopping`).
    pub shut: Arc<AtomicBool>,
    /// Where a copy of every packet goes (`--forward-host`), when configured.
    pub mirror: Option<Arc<mirror::Mirror>>,
    /// What records packets while a capture runs (`--capture-dir`), when configured.
    pub capture: Option<Arc<capture::Capture>>,
}

/// Whether a reader goes on after handing a batch off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    /// The queue is closed: the workers are gone, and so is the point of reading.
    Stop,
}

impl Handoff {
    pub fn stopping(&self) -> bool {
        self.stopping.load(Relaxed)
    }

    /// Whether every socket has been shut down for reading: a read that starts after this
    /// is true meets no datagram that arrived later.
    pub fn shut(&self) -> bool {
        self.shut.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Hands copies of a batch to the mirror and a running capture, when there are.
    #[inline]
    fn tap(&self, batch: &Batch) {
        if let Some(m) = &self.mirror {
            m.copy(batch);
        }
        if let Some(c) = &self.capture {
            c.record(batch);
        }
    }

    /// UDP's policy: never wait. A full queue drops the batch; its packets and messages are
    /// counted.
    pub(crate) fn drop_when_full(&self, batch: Batch) -> Flow {
        self.tap(&batch);
        match self.queue.try_send(batch) {
            Ok(()) => Flow::Continue,
            Err(TrySendError::Full(dropped)) => {
                let t = &self.counters.transports[dropped.transport];
                t.queue_full.add(dropped.packet_count() as u64);
                self.counters
                    .queue_full_messages
                    .add(dropped.message_count());
                self.pool.put(dropped);
                Flow::Continue
            }
            Err(TrySendError::Disconnected(_)) => Flow::Stop,
        }
    }

    /// The Unix transports' policy: wait for one of the pool's admissions (see
    /// [`Pool::admit`]) and for room in the queue, so a full pipeline pushes back on the
    /// client.
    pub(crate) fn wait_for_room(&self, mut batch: Batch) -> Flow {
        self.tap(&batch);
        self.pool.admit(&mut batch);
        match self.queue.send(batch) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }
}

/// Where the listeners ended up: port 0 resolved, socket activation applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bound {
    pub udp: Option<std::net::SocketAddr>,
    /// The UDP sockets' receive buffer, as the kernel granted it.
    pub udp_rcvbuf: usize,
    pub socket: Option<std::path::PathBuf>,
    pub stream_socket: Option<std::path::PathBuf>,
    /// Sockets systemd passed in (socket activation).
    pub activated: usize,
    /// The status endpoint's address.
    pub status: Option<std::net::SocketAddr>,
}

/// Turns an `io::Error` from binding into a startup error naming the setting.
pub(crate) fn bind_error(flag: &str, what: &str, e: io::Error) -> crate::Error {
    crate::Error::Startup(format!("cannot bind {what} ({flag}): {e}"))
}
