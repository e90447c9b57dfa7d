//! Packets: pooled buffers carrying what listeners read to the workers, and the splitting of a
//! packet into messages.
//!
//! A [`Batch`] is one buffer holding up to [`Batch::slots`] packets (datagrams, or frames of
//! the stream transport) read in one go, so a reader makes one `recvmmsg` call and one channel
//! send per batch, not per packet. Batches return to a [`Pool`] after a worker is done with
//! them; buffers are reused (the last returned first), every batch in circulation is kept
//! while traffic flows, and the flusher trims the spares once per bucket.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crossbeam_channel::{Receiver, Sender};

use crate::telemetry::Transport;

/// Bytes one batch buffer aims at: 32 datagrams of the default 8 KiB.
const BATCH_BYTES: usize = 256 * 1024;
/// Upper bound on packets a batch holds (the size of a `recvmmsg` call).
pub const MAX_SLOTS: usize = 32;

/// Packets read in one go, and when they arrived.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    /// Byte ranges of the packets in `buf`.
    frames: Vec<(u32, u32)>,
    pub transport: Transport,
    /// Arrival time, unix seconds: picks the bucket (SPEC §3.1).
    pub received_at: i64,
    /// Holds one of the pool's admissions (see [`Pool::admit`]).
    admitted: bool,
}

impl Batch {
    fn new(bytes: usize) -> Batch {
        Batch {
            // Zeroed pages come from the kernel untouched: only what is received becomes RSS.
            buf: vec![0; bytes],
            frames: Vec::with_capacity(MAX_SLOTS),
            transport: Transport::Udp,
            received_at: 0,
            admitted: false,
        }
    }

    /// The whole buffer, for a reader to fill.
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    pub fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// Records that `buf[start..end]` holds one packet.
    pub fn push_frame(&mut self, start: usize, end: usize) {
        self.frames.push((start as u32, end as u32));
    }

    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }

    /// The packets, in arrival order.
    pub fn frames(&self) -> impl Iterator<Item = &[u8]> {
        self.frames
            .iter()
            .map(|&(s, e)| &self.buf[s as usize..e as usize])
    }

    /// Bytes of payload held.
    pub fn payload_bytes(&self) -> u64 {
        self.frames.iter().map(|&(s, e)| (e - s) as u64).sum()
    }

    /// Messages held (lines), counted only when a batch is dropped.
    pub fn message_count(&self) -> u64 {
        self.frames().map(|f| lines(f).count() as u64).sum()
    }

    fn clear(&mut self) {
        self.frames.clear();
    }
}

/// The free list of batch buffers: a stack, so the buffer a worker just returned (still in
/// cache) is the next one a reader fills. A FIFO hands out the coldest buffer instead, and
/// the kernel's copy into it then misses the cache on every line.
pub struct Pool {
    free: Mutex<Vec<Batch>>,
    spare: usize,
    batch_bytes: usize,
    slot_bytes: usize,
    /// One message per admitted batch not yet returned (see [`Pool::admit`]).
    admissions: Option<(Sender<()>, Receiver<()>)>,
}

impl Pool {
    /// A pool of batches holding packets of up to `slot_bytes` (the `--buffer-size`);
    /// at most `spare` free buffers are kept, the rest are freed.
    pub fn new(slot_bytes: usize, spare: usize) -> Pool {
        let slots = (BATCH_BYTES / slot_bytes).clamp(4, MAX_SLOTS);
        Pool {
            free: Mutex::new(Vec::with_capacity(spare.max(1))),
            spare: spare.max(1),
            batch_bytes: slots * slot_bytes,
            slot_bytes,
            admissions: None,
        }
    }

    /// Lets at most `depth` admitted batches be queued or parsed at once (see
    /// [`Pool::admit`]).
    pub fn with_admissions(mut self, depth: usize) -> Pool {
        self.admissions = Some(crossbeam_channel::bounded(depth.max(1)));
        self
    }

    /// Waits until fewer than the pool's admission depth of admitted batches are queued or
    /// being parsed, then admits `batch`; it counts until it comes back through
    /// [`Pool::put`]. Readers whose senders can wait (the Unix transports) admit each batch
    /// before queueing it: a queue deeper than the workers need adds memory, not throughput,
    /// when the sender can be made to wait instead (all-out over a Unix socket, the 32-batch
    /// queue held 8 MiB of packets). UDP readers, which cannot make anyone wait, do not, and
    /// keep the whole queue for bursts.
    pub fn admit(&self, batch: &mut Batch) {
        if let Some((tx, _)) = &self.admissions {
            if !batch.admitted && tx.send(()).is_ok() {
                batch.admitted = true;
            }
        }
    }

    fn free(&self) -> MutexGuard<'_, Vec<Batch>> {
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Packets a batch holds.
    pub fn slots(&self) -> usize {
        self.batch_bytes / self.slot_bytes
    }

    /// Largest packet: `--buffer-size`.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// An empty batch: the spare one returned last, or a new one.
    pub fn get(&self, transport: Transport) -> Batch {
        let spare = self.free().pop();
        let mut batch = spare.unwrap_or_else(|| Batch::new(self.batch_bytes));
        batch.transport = transport;
        batch
    }

    /// Returns a batch for reuse; freed if enough are spare.
    pub fn put(&self, mut batch: Batch) {
        batch.clear();
        if std::mem::take(&mut batch.admitted) {
            if let Some((_, rx)) = &self.admissions {
                let _ = rx.try_recv();
            }
        }
        let mut free = self.free();
        if free.len() < self.spare {
            free.push(batch);
        }
    }

    /// Frees spare batches beyond `keep` (the coldest ones). The pool keeps every batch in
    /// circulation under load (re-allocating a 256 KiB buffer means zeroing it and faulting
    /// its pages in: 6% of the daemon's CPU under all-out Unix load when spares were freed at
    /// once); the flusher trims it once per bucket, so after a burst the spare buffers go back to
    /// the allocator (glibc keeps most of that memory mapped: RSS after a 3 s all-out burst
    /// stays about 24 MiB, as it did when spares were freed at once).
    pub fn trim(&self, keep: usize) -> usize {
        // Taken out under the lock, freed after it.
        let cold: Vec<Batch> = {
            let mut free = self.free();
            let n = free.len().saturating_sub(keep);
            free.drain(..n).collect()
        };
        cold.len()
    }

    /// Admitted batches not yet returned.
    pub fn admitted(&self) -> usize {
        self.admissions.as_ref().map_or(0, |(_, rx)| rx.len())
    }

    /// Spare batches held.
    pub fn spare(&self) -> usize {
        self.free().len()
    }
}

/// The non-empty messages of a packet: split at `\n`, a trailing `\r` removed.
pub fn lines(packet: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(packet);
    std::iter::from_fn(move || loop {
        let chunk = rest?;
        let line = match memchr::memchr(b'\n', chunk) {
            Some(i) => {
                rest = Some(&chunk[i + 1..]);
                &chunk[..i]
            }
            None => {
                rest = None;
                chunk
            }
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.is_empty() {
            return Some(line);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_trimmed_pool_keeps_only_what_it_is_told() {
        let pool = Pool::new(8192, 8);
        let batches: Vec<Batch> = (0..6).map(|_| pool.get(Transport::Unix)).collect();
        assert_eq!(pool.spare(), 0);
        batches.into_iter().for_each(|b| pool.put(b));
        assert_eq!(pool.spare(), 6);
        assert_eq!(pool.trim(2), 4);
        assert_eq!(pool.spare(), 2);
        assert_eq!(pool.trim(2), 0);
        assert_eq!(pool.spare(), 2);
    }

    #[test]
    fn admissions_wait_for_an_admitted_batch_to_come_back() {
        let pool = Arc::new(Pool::new(8192, 8).with_admissions(2));
        let (mut a, mut b) = (pool.get(Transport::Unix), pool.get(Transport::Unix));
        pool.admit(&mut a);
        pool.admit(&mut a); // a batch is admitted once
        pool.admit(&mut b);
        assert_eq!(pool.admitted(), 2);
        // A batch never admitted (what a UDP reader queues) gives nothing back.
        pool.put(pool.get(Transport::Udp));
        assert_eq!(pool.admitted(), 2);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let third = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut c = pool.get(Transport::Unix);
                pool.admit(&mut c);
                done_tx.send(()).unwrap();
                c
            })
        };
        // The third admission can only complete once one of the first two is returned.
        assert!(done_rx.try_recv().is_err());
        pool.put(a);
        done_rx.recv().unwrap();
        let c = third.join().unwrap();
        assert_eq!(pool.admitted(), 2);
        pool.put(b);
        pool.put(c);
        assert_eq!(pool.admitted(), 0);
        // Without admissions, admitting never waits.
        let open = Pool::new(8192, 8);
        let mut many: Vec<Batch> = (0..50).map(|_| open.get(Transport::Unix)).collect();
        many.iter_mut().for_each(|b| open.admit(b));
        assert_eq!(open.admitted(), 0);
    }

    #[test]
    fn packets_split_into_non_empty_lines() {
        let cases: [(&[u8], Vec<&[u8]>); 7] = [
            (b"a:1|c", vec![b"a:1|c"]),
            (b"a:1|c\n", vec![b"a:1|c"]),
            (b"a:1|c\nb:2|g", vec![b"a:1|c", b"b:2|g"]),
            (b"a:1|c\r\nb:2|g\r\n", vec![b"a:1|c", b"b:2|g"]),
            (b"\n\n\r\na\n\n", vec![b"a"]),
            (b"", vec![]),
            (b"\n", vec![]),
        ];
        for (packet, want) in cases {
            assert_eq!(lines(packet).collect::<Vec<_>>(), want, "{packet:?}");
        }
    }

    #[test]
    fn a_batch_gives_back_the_frames_it_was_told_about() {
        let pool = Pool::new(8192, 2);
        assert_eq!(pool.slots(), 32);
        let mut b = pool.get(Transport::Unix);
        b.buffer_mut()[..5].copy_from_slice(b"x:1|c");
        b.buffer_mut()[8192..8198].copy_from_slice(b"y:2|g\n");
        b.push_frame(0, 5);
        b.push_frame(8192, 8198);
        assert_eq!(b.frames().collect::<Vec<_>>(), [&b"x:1|c"[..], b"y:2|g\n"]);
        assert_eq!(b.payload_bytes(), 11);
        assert_eq!(b.message_count(), 2);
        pool.put(b);
        let again = pool.get(Transport::Udp);
        assert_eq!(again.frame_count(), 0);
        assert_eq!(again.transport, Transport::Udp);
    }

    #[test]
    fn large_buffers_get_fewer_slots_per_batch() {
        assert_eq!(Pool::new(65536, 1).slots(), 4);
        assert_eq!(Pool::new(1024, 1).slots(), 32);
    }
}
