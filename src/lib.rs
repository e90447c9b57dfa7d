//! whippet: a fast, lean DogStatsD server.
//!
//! # The data path
//!
//! ```text
//!  UDP / Unix datagram / Unix stream
//!        │  listener: recvmmsg into pooled batches (one syscall, one send per batch;
//!        │  a Unix datagram batch takes what is queued and goes at once; a UDP reader
//!        │  whose socket has no backlog, or a Unix datagram reader that is saturated
//!        │  or sees a trickle, parses its batch itself, as a worker would)
//!        ▼
//!  packet queue (bounded crossbeam channel; UDP: drop+count when full; Unix: wait, 2/worker)
//!        │
//!        ▼  worker × --workers: split lines → parser → enrichment → context hashed once
//!        │  (a new context's name and tags shaped first) → samples
//!  per-shard sample batches
//!        │  one lock per shard per batch; a shard another worker holds is visited last
//!        ▼
//!  shard × --shards (Mutex): contexts, bucket accumulators, zero-fill, expiry
//!        │  flusher: at each bucket boundary, take closed buckets (short lock)
//!        ▼
//!  flush → series points, sketches, events, service checks (outside the locks)
//!        │
//!        ▼  output: the console when no intake is configured, otherwise vitals
//!        │  (whippet's own counters as `whippet.*` series) added, then
//!  serializer: v2/v1 series, sketches, events, checks → compressed payloads within limits
//!        │
//!        ▼
//!  forwarder × --forwarder-threads: HTTP(S), backoff per endpoint, bounded retry queue
//!        │
//!        ▼
//!  intake (Datadog, or `whippet-intake` for tests and local inspection)
//! ```
//!
//! # Threads
//!
//! | thread | how many | blocks on | owned by |
//! |---|---|---|---|
//! | `whippet-udp-N` | `--udp-readers` | `recvmmsg`; parses its batches while its socket has no backlog | [`listener::datagram::DatagramReader`] |
//! | `whippet-unix` | 1 if `--socket` | `recvmmsg`, queue admission; `SCHED_FIFO` while not saturated; parses its batches while saturated, and a trickle's | [`listener::datagram::DatagramReader`] |
//! | `whippet-stream-accept` | 1 if `--stream-socket` | `accept` | [`listener::stream::accept_loop`] |
//! | `whippet-stream-N` | ≤ `--stream-max-connections` | `read`, queue admission and send | [`listener::stream`] |
//! | `whippet-worker-N` | `--workers` | queue receive | [`worker::Worker::run`] |
//! | `whippet-flusher` | 1 | timer until the next boundary; serializes | [`flush::Flusher::run`] |
//! | `whippet-forwarder-N` | `--forwarder-threads` per intake (the main one and each additional) | HTTP request, retry timer | [`forwarder`] |
//! | `whippet-validate` | 1, briefly at start | one API key check | [`forwarder::validate_api_key`] |
//! | `whippet-mirror` | 1 with `--forward-host` | a copy to send; one UDP send per packet | [`listener::mirror::Mirror`] |
//! | `whippet-capture` | 1 while a capture runs (SIGUSR2) | a copy to write; the file | [`listener::capture::Capture`] |
//! | `whippet-tagger` | 1 with origin detection or `--kubelet-host` | timer; a request to the kubelet or Docker | [`tagger::Tagger::run`] |
//! | `whippet-status` | 1 if `--status` | `accept`; hands connections to a bounded queue | [`status`] |
//! | `whippet-status-N` | 2 if `--status` | reading one request head, writing one answer (2 s each at most) | [`status`] |
//! | `whippet-watchdog` | 1 if systemd's `WatchdogSec=` | timer | [`daemon::run`] |
//! | `whippet-stop-guard` | 1, from SIGTERM | timer | [`daemon::Daemon::guard_shutdown`] |
//! | main | 1 | signals (SIGTERM, SIGINT, SIGHUP reload, SIGUSR1) | [`daemon::run`] |
//!
//! [`daemon`] decides which threads exist, starts them in order (sockets, pipeline, readers,
//! status endpoint) and stops them from the sources down; the stream listener and the
//! forwarder run their own pools, started and stopped by the daemon.
//!
//! # Glossary
//!
//! - **packet**: one datagram, or one frame of the stream transport.
//! - **frame**: a packet of the stream transport: a 4-byte little-endian length, then that
//!   many bytes.
//! - **batch**: packets read together into one pooled buffer ([`packet::Batch`]).
//! - **hand-off**: where a reader puts a batch, by its transport's queue-full policy
//!   ([`listener::Handoff`]).
//! - **line**: the bytes of one message as they sit in a packet, between newlines
//!   ([`packet::Line`]).
//! - **message**: one line parsed: a metric, an event or a service check
//!   ([`parser::Message`]); its **kind** labels counters ([`parser::MessageKind`]).
//! - **sample**: one value of one metric message, on its way to a shard
//!   ([`sample::Sample`]).
//! - **record**: an event or service check as whippet holds it until a flush
//!   ([`sample::EventRecord`], [`sample::ServiceCheckRecord`]).
//! - **enrichment**: what happens to a message between parser and context: host and magic
//!   tags, extra tags, and its origin's container tags ([`enrichment`]).
//! - **shaping**: what the operator's settings do to a metric's name and tags: mapper,
//!   namespace, filter lists, histogram copies ([`shaping`]).
//! - **origin**: the container or pod a message came from, by the sender's pid or what the
//!   client says ([`origin`], [`enrichment::OriginDetection`]).
//! - **tagger**: the tags of each container and pod, from the kubelet and Docker ([`tagger`]).
//! - **context**: what a metric is aggregated by: name, host, sorted tags, type ([`context`]).
//! - **shard**: a mutex-guarded slice of the contexts ([`shard::Shard`]).
//! - **demux**: the shards, the routing of a context's hash to its shard, and the backlog of
//!   records (the Agent's demultiplexer; [`demux::Demux`]).
//! - **bucket**: a `--bucket-seconds` interval of arrival time; its start stamps its points.
//! - **flush**: closing buckets and turning them into output ([`flush`]).
//! - **payload**: one compressed HTTP request body for one endpoint ([`serializer::Payload`]).
//! - **intake**: the HTTP service payloads are sent to ([`intake`] is a test one).
//! - **reading**: one counter or gauge value with its labels ([`telemetry::Reading`]).
//! - **vitals**: whippet's own readings, sent to the intake with each flush as `whippet.*`
//!   metrics ([`vitals`]).
//!
//! # Layers
//!
//! A module uses only modules of earlier layers, so the dependencies point one way, down the
//! data path, and no import cycle can form; a test checks every `crate::` path outside test
//! code against this list.
//!
//! 1. telemetry, log, clock, systemd, sketch, intake: foundations, knowing no stage
//! 2. tagger, origin: what the containers and pods of this node are tagged with, and which
//!    container sent a message
//! 3. packet
//! 4. parser
//! 5. context, sample
//! 6. shaping
//! 7. enrichment
//! 8. shard
//! 9. demux
//! 10. worker
//! 11. listener
//! 12. flush
//! 13. serializer, console, vitals
//! 14. forwarder
//! 15. status
//! 16. config
//! 17. reload
//! 18. daemon
//! 19. blast, fuzz: tools built on the rest

pub mod blast;
pub mod clock;
pub mod config;
pub mod console;
pub mod context;
pub mod daemon;
pub mod demux;
pub mod enrichment;
pub mod flush;
pub mod forwarder;
#[doc(hidden)]
pub mod fuzz;
pub mod intake;
pub mod listener;
pub mod log;
pub mod origin;
pub mod packet;
pub mod parser;
pub mod reload;
pub mod sample;
pub mod serializer;
pub mod shaping;
pub mod shard;
pub mod sketch;
pub mod status;
pub mod systemd;
pub mod tagger;
pub mod telemetry;
pub mod vitals;
pub mod worker;

/// Starts loading `*value` into the CPU cache: the cache lines of its first and last byte,
/// which hold all of a value of at most 64 bytes, or of 128 aligned to 64. Only a hint: it
/// reads nothing and is valid for any address.
#[inline]
pub(crate) fn prefetch<T>(value: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let first = value.cast::<i8>();
        let last = first.wrapping_add(std::mem::size_of::<T>().max(1) - 1);
        // SAFETY: prefetching is only a hint, valid for any address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(first);
            _mm_prefetch::<_MM_HINT_T0>(last);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Test-only fault injection, compiled into debug builds only (release builds and the
/// packages have none): with `WHIPPET_FAULT_INJECT=panic:<thread>` the named thread
/// (`worker`, `flusher`, `unix`, `udp`) panics at its next unit of work, which proves that a
/// panic anywhere ends the process with a failure status (panic = "abort").
#[doc(hidden)]
#[inline]
pub(crate) fn inject_fault(thread: &str) {
    #[cfg(debug_assertions)]
    if fault().is_some_and(|v| v.strip_prefix("panic:") == Some(thread)) {
        panic!("injected fault in {thread}");
    }
    #[cfg(not(debug_assertions))]
    let _ = thread;
}

/// The fault a test asked for (`WHIPPET_FAULT_INJECT`), in debug builds.
#[cfg(debug_assertions)]
fn fault() -> Option<String> {
    std::env::var("WHIPPET_FAULT_INJECT").ok()
}

/// Test-only fault injection for conditions a test cannot make for real (a slow or full
/// disk): with `WHIPPET_FAULT_INJECT=<name>` in a debug build, the named condition holds.
/// Release builds and the packages have none.
#[doc(hidden)]
#[inline]
pub(crate) fn fault_injected(name: &str) -> bool {
    #[cfg(debug_assertions)]
    return fault().is_some_and(|v| v == name);
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}

/// What can stop whippet from starting. The binary maps these to exit codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A flag has an invalid value; the message names the flag. Exit code 2.
    Config(String),
    /// A socket could not be bound or a thread started; the message names the setting.
    /// Exit code 1.
    Startup(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Config(m) | Error::Startup(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::Startup(_) => 1,
        }
    }
}

/// Counts each thread's allocations in the unit tests, so a test can prove a hot path
/// allocates nothing.
#[cfg(test)]
pub(crate) mod allocations {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }

    /// Allocations (and reallocations) made by this thread so far.
    pub(crate) fn count() -> u64 {
        COUNT.with(Cell::get)
    }

    fn counted() {
        // A thread being torn down has no counter left; its allocations do not matter here.
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }

    struct Counting;

    // SAFETY: every call is passed to the system allocator unchanged; counting touches only a
    // const-initialized thread-local cell, which allocates nothing.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            counted();
            // SAFETY: the caller's guarantees for `layout` are the system allocator's.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from this allocator, which is the system's.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
            counted();
            // SAFETY: as for `dealloc`, and the caller's guarantees for `size`.
            unsafe { System.realloc(ptr, layout, size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;
}
