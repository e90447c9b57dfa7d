//! The Unix stream transport: each frame is a 4-byte little-endian length, then that many
//! bytes of `\n`-separated messages. One thread per connection, up to a cap; a frame longer
//! than `--buffer-size` closes that connection only. Readers block on a full queue, which
//! pushes back on the client instead of dropping.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};

use super::{Flow, Handoff};
use crate::clock;
use crate::packet::{Batch, Pool, Transport};

/// Open connections, so the daemon can wake their threads at shutdown.
#[derive(Default)]
pub struct Connections {
    open: Mutex<HashMap<u64, UnixStream>>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, UnixStream>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Stops reading on every connection: each thread drains what the kernel holds, then
    /// sees end-of-file and exits.
    pub(crate) fn shutdown_all(&self) {
        for stream in self.lock().values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
    }
}

/// Accepts connections until the daemon sets `stopping` and wakes it with a connection of
/// its own; then accepts whatever is still pending (a client that connected before the stop
/// must not lose what it wrote), stops reading everywhere, and joins every connection thread.
pub fn accept_loop(
    listener: UnixListener,
    handoff: Handoff,
    limits: Limits,
    connections: Arc<Connections>,
) {
    // Origin detection set SO_PASSCRED on the listener: each connection's frames then carry
    // the pid that connected.
    let origin = getsockopt(&listener, sockopt::PassCred).unwrap_or(false);
    let mut acceptor = Acceptor {
        handoff,
        limits,
        connections,
        threads: Vec::new(),
        next_id: 0,
        origin,
    };
    for stream in listener.incoming() {
        if acceptor.handoff.stopping() {
            if let Ok(s) = stream {
                acceptor.admit_unless_own(s);
            }
            break;
        }
        match stream {
            Ok(s) => acceptor.admit(s),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                acceptor.count_error();
                // Out of file descriptors, typically: back off instead of spinning.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
    if listener.set_nonblocking(true).is_ok() {
        while let Ok((s, _)) = listener.accept() {
            let _ = s.set_nonblocking(false);
            acceptor.admit_unless_own(s);
        }
    }
    acceptor.connections.shutdown_all();
    for t in acceptor.threads {
        let _ = t.join();
    }
}

/// What one client may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `--stream-max-connections`: connections over it are closed at once and counted.
    pub max_connections: usize,
    /// `--stream-idle-timeout`: a connection silent this long is closed and counted, so idle
    /// clients cannot keep the slots from others. `None`: never.
    pub idle_timeout: Option<std::time::Duration>,
}

struct Acceptor {
    handoff: Handoff,
    limits: Limits,
    connections: Arc<Connections>,
    threads: Vec<JoinHandle<()>>,
    next_id: u64,
    /// Frames carry their connection's pid (origin detection).
    origin: bool,
}

impl Acceptor {
    fn count_error(&self) {
        self.handoff.counters.transports[Transport::Stream]
            .errors
            .add(1);
    }

    /// At shutdown: the daemon wakes `accept` by connecting itself; that connection is not a
    /// client's and is dropped uncounted. Any other pending connection is served.
    fn admit_unless_own(&mut self, stream: UnixStream) {
        let peer = getsockopt(&stream, sockopt::PeerCredentials).map(|c| c.pid());
        if peer.ok() != Some(std::process::id() as i32) {
            self.admit(stream);
        }
    }

    /// Starts a thread for a new connection, or refuses it over the cap.
    fn admit(&mut self, stream: UnixStream) {
        let counters = &self.handoff.counters.stream;
        self.threads.retain(|t| !t.is_finished());
        if self.connections.len() >= self.limits.max_connections {
            counters.refused.add(1);
            return;
        }
        if stream.set_read_timeout(self.limits.idle_timeout).is_err() {
            self.count_error();
            return;
        }
        let Ok(handle) = stream.try_clone() else {
            self.count_error();
            return;
        };
        counters.connections.add(1);
        let id = self.next_id;
        self.next_id += 1;
        self.connections.lock().insert(id, handle);
        if self.handoff.stopping() {
            let _ = stream.shutdown(Shutdown::Read);
        }
        let (handoff, conns) = (self.handoff.clone(), self.connections.clone());
        let idle = self.limits.idle_timeout;
        // The pid that connected, in whippet's pid namespace (0 when it is not visible there).
        let pid = self.origin.then(|| {
            getsockopt(&stream, sockopt::PeerCredentials).map_or(0, |c| c.pid().max(0) as u32)
        });
        let spawned = std::thread::Builder::new()
            .name(format!("whippet-stream-{id}"))
            .spawn(move || {
                serve(stream, &handoff, idle, pid);
                conns.lock().remove(&id);
            });
        match spawned {
            Ok(t) => self.threads.push(t),
            Err(_) => {
                self.connections.lock().remove(&id);
                self.count_error();
            }
        }
    }
}

/// Reads frames from one connection until end-of-file, an error, an oversized frame or the
/// idle timeout: `idle` without a byte (the socket's read timeout), or without finishing a
/// frame begun `idle` ago, so a client dripping a byte at a time cannot hold its slot.
fn serve(mut stream: UnixStream, handoff: &Handoff, idle: Option<Duration>, pid: Option<u32>) {
    let transport = &handoff.counters.transports[Transport::Stream];
    let counters = &handoff.counters.stream;
    let mut frames = Reassembly::new(&handoff.pool);
    frames.pid = pid;
    // When the partial frame pending began, and the read timeout now set.
    let mut frame_began: Option<Instant> = None;
    let mut timeout = idle;
    loop {
        if let (Some(began), Some(idle)) = (frame_began, idle) {
            let left = idle.saturating_sub(began.elapsed());
            if left.is_zero() {
                counters.idle_closed.add(1);
                break;
            }
            // Shortened in halves, so a connection making steady progress rarely pays for it.
            if timeout.is_some_and(|t| left < t / 2) {
                if stream.set_read_timeout(Some(left)).is_err() {
                    transport.errors.add(1);
                    break;
                }
                timeout = Some(left);
            }
        }
        let n = match stream.read(frames.space()) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                counters.idle_closed.add(1);
                break;
            }
            Err(_) => {
                transport.errors.add(1);
                break;
            }
        };
        transport.bytes.add(n as u64);
        let fed = frames.fed(n, &handoff.pool);
        let completed = fed.complete.is_some();
        if frames.pending() == 0 {
            frame_began = None;
            if timeout != idle {
                if stream.set_read_timeout(idle).is_err() {
                    transport.errors.add(1);
                    break;
                }
                timeout = idle;
            }
        } else if completed || frame_began.is_none() {
            frame_began = Some(Instant::now());
        }
        if let Some(mut batch) = fed.complete {
            transport.packets.add(batch.packet_count() as u64);
            batch.received_at = clock::data_now();
            if handoff.wait_for_room(batch) == Flow::Stop {
                return;
            }
        }
        if fed.oversized {
            counters.frames_too_large.add(1);
            frames.discard_pending();
            break;
        }
    }
    if frames.pending() > 0 {
        counters.partial_frames.add(1);
    }
    frames.release(&handoff.pool);
}

/// Frame reassembly for one connection: bytes in as the socket gives them, batches of
/// complete frames out. A partial frame stays behind for the next read.
pub(crate) struct Reassembly {
    batch: Batch,
    filled: usize,
    max_frame: usize,
    /// The connection's pid, recorded with each frame (origin detection).
    pub pid: Option<u32>,
}

/// What one read produced.
pub(crate) struct Fed {
    /// The complete frames so far, ready to send (`None` when there are none).
    pub complete: Option<Batch>,
    /// A frame header declared more than `--buffer-size` bytes: the connection must close.
    pub oversized: bool,
}

impl Reassembly {
    pub fn new(pool: &Pool) -> Reassembly {
        Reassembly {
            batch: pool.get(Transport::Stream),
            filled: 0,
            max_frame: pool.slot_bytes(),
            pid: None,
        }
    }

    /// Where the next read goes; never empty (a pending partial frame is at most
    /// `--buffer-size` + 3 bytes and a batch buffer holds at least four of them).
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.batch.buffer_mut()[self.filled..]
    }

    /// Accounts `n` bytes just read into [`Reassembly::space`].
    pub(crate) fn fed(&mut self, n: usize, pool: &Pool) -> Fed {
        self.filled += n;
        let (consumed, oversized) =
            split_frames(&mut self.batch, self.filled, self.max_frame, self.pid);
        let rest = self.filled - consumed;
        let complete = if self.batch.packet_count() > 0 {
            // Ship the complete frames; the partial one moves to the next buffer.
            let mut next = pool.get(Transport::Stream);
            next.buffer_mut()[..rest].copy_from_slice(&self.batch.buffer()[consumed..self.filled]);
            Some(std::mem::replace(&mut self.batch, next))
        } else {
            self.batch
                .buffer_mut()
                .copy_within(consumed..self.filled, 0);
            None
        };
        self.filled = rest;
        Fed {
            complete,
            oversized,
        }
    }

    /// Bytes of a frame not yet complete.
    pub(crate) fn pending(&self) -> usize {
        self.filled
    }

    /// Forgets the pending bytes (after an oversized frame header).
    pub(crate) fn discard_pending(&mut self) {
        self.filled = 0;
    }

    /// Returns the buffer to the pool.
    pub fn release(self, pool: &Pool) {
        pool.put(self.batch);
    }
}

/// Records the complete frames in `batch.buffer()[..filled]`. Returns the bytes they use
/// (zero-length frames included) and whether an oversized frame header was met.
fn split_frames(
    batch: &mut Batch,
    filled: usize,
    max_frame: usize,
    pid: Option<u32>,
) -> (usize, bool) {
    let mut pos = 0;
    while filled - pos >= 4 {
        let header: [u8; 4] = batch.buffer()[pos..pos + 4].try_into().unwrap_or_default();
        let len = u32::from_le_bytes(header) as usize;
        if len > max_frame {
            return (pos, true);
        }
        if filled - pos - 4 < len {
            break;
        }
        match (len, pid) {
            (0, _) => {}
            (_, Some(pid)) => batch.push_packet_from(pos + 4, pos + 4 + len, pid),
            (_, None) => batch.push_packet(pos + 4, pos + 4 + len),
        }
        pos += 4 + len;
    }
    (pos, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn complete_frames_are_split_and_a_partial_one_is_left() {
        let pool = Pool::new(64, 1);
        let mut batch = pool.get(Transport::Stream);
        let mut bytes = frame(b"a:1|c");
        bytes.extend(frame(b""));
        bytes.extend(frame(b"b:2|g\nc:3|c"));
        let complete = bytes.len();
        bytes.extend(&frame(b"partial")[..6]);
        batch.buffer_mut()[..bytes.len()].copy_from_slice(&bytes);
        let (consumed, oversized) = split_frames(&mut batch, bytes.len(), 64, None);
        assert_eq!((consumed, oversized), (complete, false));
        assert_eq!(
            batch.packets().collect::<Vec<_>>(),
            [&b"a:1|c"[..], b"b:2|g\nc:3|c"]
        );
    }

    #[test]
    fn an_oversized_frame_stops_the_split_after_the_frames_before_it() {
        let pool = Pool::new(64, 1);
        let mut batch = pool.get(Transport::Stream);
        let mut bytes = frame(b"ok:1|c");
        let ok_len = bytes.len();
        bytes.extend(65u32.to_le_bytes());
        batch.buffer_mut()[..bytes.len()].copy_from_slice(&bytes);
        assert_eq!(
            split_frames(&mut batch, bytes.len(), 64, None),
            (ok_len, true)
        );
        assert_eq!(batch.packet_count(), 1);
    }
}
