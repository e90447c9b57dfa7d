//! The Unix stream transport: each frame is a 4-byte little-endian length, then that many
//! bytes of `\n`-separated messages. One thread per connection, up to a cap; a frame longer
//! than `--buffer-size` closes that connection only. Readers block on a full queue, which
//! pushes back on the client instead of dropping.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{unix_now, ReaderContext};
use crate::telemetry::Transport;

/// Open connections, so the daemon can wake their threads at shutdown.
#[derive(Default)]
pub struct Connections {
    open: Mutex<HashMap<u64, UnixStream>>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, UnixStream>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops reading on every connection: each thread drains what the kernel holds, then
    /// sees end-of-file and exits.
    pub fn shutdown_all(&self) {
        for stream in self.lock().values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
    }
}

/// Accepts connections until the listener is shut down; joins every connection thread
/// before returning. Runs on its own thread.
pub fn accept_loop(listener: UnixListener, ctx: ReaderContext, max_connections: usize, connections: Arc<Connections>) {
    let counters = ctx.telemetry.transport(Transport::Stream);
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if ctx.stopping.load(Relaxed) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                counters.errors.fetch_add(1, Relaxed);
                // Out of file descriptors, typically: back off instead of spinning.
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        if connections.len() >= max_connections {
            counters.connections_refused.fetch_add(1, Relaxed);
            continue;
        }
        let Ok(handle) = stream.try_clone() else {
            counters.errors.fetch_add(1, Relaxed);
            continue;
        };
        counters.connections.fetch_add(1, Relaxed);
        let id = next_id;
        next_id += 1;
        connections.lock().insert(id, handle);
        let (ctx, conns) = (ctx.clone(), connections.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("whippet-stream-{id}"))
            .spawn(move || {
                serve(stream, &ctx);
                conns.lock().remove(&id);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(_) => {
                connections.lock().remove(&id);
                counters.errors.fetch_add(1, Relaxed);
            }
        }
    }
    connections.shutdown_all();
    for t in threads {
        let _ = t.join();
    }
}

/// Reads frames from one connection until end-of-file, an error or an oversized frame.
fn serve(mut stream: UnixStream, ctx: &ReaderContext) {
    let counters = ctx.telemetry.transport(Transport::Stream);
    let max_frame = ctx.pool.slot_bytes();
    let mut batch = ctx.pool.get(Transport::Stream);
    let mut filled = 0;
    loop {
        let n = match stream.read(&mut batch.buffer_mut()[filled..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                counters.errors.fetch_add(1, Relaxed);
                break;
            }
        };
        filled += n;
        counters.bytes.fetch_add(n as u64, Relaxed);
        let (consumed, oversized) = split_frames(&mut batch, filled, max_frame);
        counters.packets.fetch_add(batch.frame_count() as u64, Relaxed);
        if batch.frame_count() > 0 {
            // Ship the complete frames; the partial one moves to the next buffer.
            let mut next = ctx.pool.get(Transport::Stream);
            next.buffer_mut()[..filled - consumed].copy_from_slice(&batch.buffer()[consumed..filled]);
            batch.received_at = unix_now();
            if ctx.queue.send(std::mem::replace(&mut batch, next)).is_err() {
                return;
            }
        } else if consumed > 0 {
            batch.buffer_mut().copy_within(consumed..filled, 0);
        }
        filled -= consumed;
        if oversized {
            counters.frames_too_large.fetch_add(1, Relaxed);
            filled = 0;
            break;
        }
    }
    if filled > 0 {
        counters.partial_frames.fetch_add(1, Relaxed);
    }
    ctx.pool.put(batch);
}

/// Records the complete frames in `batch.buffer()[..filled]`. Returns the bytes they use
/// (zero-length frames included) and whether an oversized frame header was met.
fn split_frames(batch: &mut crate::packet::Batch, filled: usize, max_frame: usize) -> (usize, bool) {
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
        if len > 0 {
            batch.push_frame(pos + 4, pos + 4 + len);
        }
        pos += 4 + len;
    }
    (pos, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Pool;

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
        let (consumed, oversized) = split_frames(&mut batch, bytes.len(), 64);
        assert_eq!((consumed, oversized), (complete, false));
        assert_eq!(batch.frames().collect::<Vec<_>>(), [&b"a:1|c"[..], b"b:2|g\nc:3|c"]);
    }

    #[test]
    fn an_oversized_frame_stops_the_split_after_the_frames_before_it() {
        let pool = Pool::new(64, 1);
        let mut batch = pool.get(Transport::Stream);
        let mut bytes = frame(b"ok:1|c");
        let ok_len = bytes.len();
        bytes.extend(65u32.to_le_bytes());
        batch.buffer_mut()[..bytes.len()].copy_from_slice(&bytes);
        assert_eq!(split_frames(&mut batch, bytes.len(), 64), (ok_len, true));
        assert_eq!(batch.frame_count(), 1);
    }
}
