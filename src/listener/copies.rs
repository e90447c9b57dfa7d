//! Copies of packet batches, handed from readers to a thread of their own (the mirror, a
//! capture) without ever waiting: a reader copies a batch into a free buffer and queues it;
//! when every buffer is taken the copy is skipped, and the caller counts it. At most `limit`
//! buffers exist, each holding one batch (512 KiB at most), so copies hold at most
//! `limit × 512 KiB` whatever the consumer's speed.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::packet::{Batch, Transport};

/// One batch's packets, copied, with where and when they arrived.
pub struct Copy {
    pub bytes: Vec<u8>,
    /// Where each packet ends in `bytes`.
    pub ends: Vec<usize>,
    pub transport: Transport,
    pub at: Instant,
    /// A tag the producer chose (a capture's number).
    pub tag: u64,
}

impl Copy {
    /// The packets, in order.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let p = &self.bytes[start..end];
            start = end;
            p
        })
    }
}

/// The readers' side.
pub struct Copies {
    queue: Sender<Copy>,
    free: Receiver<Copy>,
    created: AtomicUsize,
    limit: usize,
}

/// The consumer's side: the copies, and where their buffers go back.
pub struct Drain {
    pub rx: Receiver<Copy>,
    give_back: Sender<Copy>,
}

impl Drain {
    /// Returns a copy's buffers for reuse.
    pub fn recycle(&self, copy: Copy) {
        let _ = self.give_back.try_send(copy);
    }
}

impl Copies {
    /// At most `limit` buffers (at least one).
    pub fn new(limit: usize) -> (Copies, Drain) {
        let limit = limit.max(1);
        let (queue, rx) = crossbeam_channel::bounded(limit);
        let (give_back, free) = crossbeam_channel::bounded(limit);
        let copies = Copies {
            queue,
            free,
            created: AtomicUsize::new(0),
            limit,
        };
        (copies, Drain { rx, give_back })
    }

    /// Copies the packets of `batch` for the consumer, tagged `tag`. False when every buffer
    /// was taken (or the consumer is gone): the copy is skipped. Never waits.
    pub fn copy(&self, batch: &Batch, tag: u64) -> bool {
        let mut copy = match self.free.try_recv() {
            Ok(c) => c,
            Err(_) if self.created.fetch_add(1, Relaxed) < self.limit => Copy {
                bytes: Vec::new(),
                ends: Vec::new(),
                transport: batch.transport,
                at: Instant::now(),
                tag,
            },
            Err(_) => {
                self.created.fetch_sub(1, Relaxed);
                return false;
            }
        };
        copy.bytes.clear();
        copy.ends.clear();
        copy.transport = batch.transport;
        copy.at = Instant::now();
        copy.tag = tag;
        for p in batch.packets() {
            copy.bytes.extend_from_slice(p);
            copy.ends.push(copy.bytes.len());
        }
        if self.queue.try_send(copy).is_err() {
            // Fewer than `limit` copies are queued while one is free: not expected, but
            // never wait. The buffer is let go.
            self.created.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Pool;

    #[test]
    fn without_a_free_buffer_a_copy_is_skipped_never_waited_for() {
        let (copies, drain) = Copies::new(3);
        let pool = Pool::new(1024, 1);
        let mut b = pool.get(Transport::Unix);
        b.buffer_mut()[..10].copy_from_slice(b"x:1|cy:2|g");
        b.push_packet(0, 5);
        b.push_packet(5, 10);
        // Nobody drains: three copies queue, the rest are skipped at once.
        let copied: Vec<bool> = (0..5).map(|i| copies.copy(&b, i)).collect();
        assert_eq!(copied, [true, true, true, false, false]);
        let first = drain.rx.try_recv().unwrap();
        let packets: Vec<&[u8]> = first.packets().collect();
        assert_eq!(packets, [&b"x:1|c"[..], b"y:2|g"]);
        assert_eq!((first.transport, first.tag), (Transport::Unix, 0));
        // A recycled buffer is reused.
        drain.recycle(first);
        assert!(copies.copy(&b, 9));
        assert_eq!(copies.created.load(Relaxed), 3);
    }
}
