//! Packets: pooled buffers carrying what listeners read to the workers, and the splitting of a
//! packet into messages.
//!
//! A [`Batch`] is one buffer holding up to [`Pool::slots`] packets (datagrams, or frames of
//! the stream transport) read in one go, so a reader makes one `recvmmsg` call and one channel
//! send per batch, not per packet. Batches return to a [`Pool`] after a worker is done with
//! them; buffers are reused (the last returned first), every batch in circulation is kept
//! while traffic flows, and the flusher trims the spares once per bucket.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crossbeam_channel::{Receiver, Sender};

use crate::telemetry::labels;

labels! {
    /// Where packets come from.
    pub enum Transport: "transport" {
        Udp = "udp",
        Unix = "unix",
        Stream = "unix_stream",
    }
}

/// Bytes one batch buffer aims at: 64 datagrams of the default 8 KiB. No batch holds more
/// (at least 4 slots of at most 64 KiB). Pages no datagram reached stay out of RSS.
pub(crate) const BATCH_BYTES: usize = 512 * 1024;
/// Upper bound on packets a batch holds (the size of a `recvmmsg` call).
pub(crate) const MAX_SLOTS: usize = 64;

/// Packets read in one go, and when they arrived.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    /// Byte ranges of the packets in `buf`.
    packets: Vec<(u32, u32)>,
    /// The sender's pid of each packet, when the reader learns it (origin detection on a
    /// Unix socket); otherwise empty.
    pids: Vec<u32>,
    pub transport: Transport,
    /// Arrival time, unix seconds on the pipeline's clock ([`crate::clock::data_now`]): picks
    /// the bucket (docs/behaviour.md, "Buckets and contexts").
    pub received_at: i64,
    /// Holds one of the pool's admissions (see [`Pool::admit`]).
    admitted: bool,
}

impl Batch {
    fn new(bytes: usize) -> Batch {
        Batch {
            // Zeroed pages come from the kernel untouched: only what is received becomes RSS.
            buf: vec![0; bytes],
            packets: Vec::with_capacity(MAX_SLOTS),
            pids: Vec::new(),
            transport: Transport::Udp,
            received_at: 0,
            admitted: false,
        }
    }

    /// The whole buffer, for a reader to fill.
    pub(crate) fn buffer_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    pub fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// Records that `buf[start..end]` holds one packet.
    pub(crate) fn push_packet(&mut self, start: usize, end: usize) {
        self.packets.push((start as u32, end as u32));
    }

    /// Records that `buf[start..end]` holds one packet from process `pid` (0: a sender in
    /// another pid namespace). A batch holds pids for all its packets or for none.
    pub(crate) fn push_packet_from(&mut self, start: usize, end: usize, pid: u32) {
        self.push_packet(start, end);
        self.pids.push(pid);
    }

    /// The sender's pid of each packet, in arrival order; `None` when the reader did not
    /// learn them.
    pub fn pids(&self) -> Option<&[u32]> {
        (!self.pids.is_empty()).then_some(&self.pids[..])
    }

    pub(crate) fn packet_count(&self) -> usize {
        self.packets.len()
    }

    /// The packets, in arrival order.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.packets
            .iter()
            .map(|&(s, e)| &self.buf[s as usize..e as usize])
    }

    /// Bytes of payload held.
    #[cfg(test)]
    fn payload_bytes(&self) -> u64 {
        self.packets.iter().map(|&(s, e)| (e - s) as u64).sum()
    }

    /// Messages held (lines), counted only when a batch is dropped.
    pub(crate) fn message_count(&self) -> u64 {
        self.packets().map(|f| lines(f).count() as u64).sum()
    }

    pub(crate) fn clear(&mut self) {
        self.packets.clear();
        self.pids.clear();
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
    pub(crate) fn with_admissions(mut self, depth: usize) -> Pool {
        self.admissions = Some(crossbeam_channel::bounded(depth.max(1)));
        self
    }

    /// Waits until fewer than the pool's admission depth of admitted batches are queued or
    /// being parsed, then admits `batch`; it counts until it comes back through
    /// [`Pool::put`]. Readers whose senders can wait (the Unix transports) admit each batch
    /// before queueing it: a queue deeper than the workers need adds memory (megabytes of
    /// packets under all-out load), not throughput, when the sender can be made to wait
    /// instead. UDP readers, which cannot make anyone wait, do not, and keep the whole queue
    /// for bursts.
    pub(crate) fn admit(&self, batch: &mut Batch) {
        if let Some((tx, _)) = &self.admissions {
            if !batch.admitted && tx.send(()).is_ok() {
                batch.admitted = true;
            }
        }
    }

    /// Admits `batch` as [`Pool::admit`] does when that needs no wait; returns whether it is
    /// admitted (a pool without admissions admits every batch).
    pub(crate) fn try_admit(&self, batch: &mut Batch) -> bool {
        match &self.admissions {
            Some((tx, _)) if !batch.admitted => {
                batch.admitted = tx.try_send(()).is_ok();
                batch.admitted
            }
            _ => true,
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
    pub(crate) fn slot_bytes(&self) -> usize {
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
    pub(crate) fn put(&self, mut batch: Batch) {
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
    /// circulation under load, because re-allocating a 512 KiB buffer means zeroing it and
    /// faulting its pages in, a few percent of the CPU under all-out load; the daemon trims
    /// it once per bucket, so after a burst the spare buffers go back to the allocator (which
    /// keeps some of that memory mapped).
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
    #[cfg(test)]
    fn admitted(&self) -> usize {
        self.admissions.as_ref().map_or(0, |(_, rx)| rx.len())
    }

    /// Spare batches held.
    #[cfg(test)]
    fn spare(&self) -> usize {
        self.free().len()
    }
}

/// The non-empty messages of a packet: split at `\n`, a trailing `\r` removed.
pub fn lines(packet: &[u8]) -> impl Iterator<Item = &[u8]> {
    scanned_lines(packet).map(|line| line.bytes())
}

/// One message of a packet, whether it is all ASCII, and where its `|` bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    bytes: &'a [u8],
    /// True only if every byte is ASCII: the parser then takes the bytes as text unchecked.
    ascii: bool,
    pipes: Pipes,
}

impl<'a> Line<'a> {
    /// A line scanned here for ASCII and its `|` bytes.
    pub fn new(bytes: &'a [u8]) -> Line<'a> {
        match line_end(bytes) {
            (end, ascii, pipes) if end == bytes.len() => Line {
                bytes,
                ascii,
                pipes,
            },
            // Not one line: the parser searches it as it is.
            _ => Line {
                bytes,
                ascii: bytes.is_ascii(),
                pipes: Pipes::UNKNOWN,
            },
        }
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub(crate) fn is_ascii(&self) -> bool {
        self.ascii
    }

    /// The offsets of every `|` in the line, in order; `None` when there are more than fit.
    pub(crate) fn pipes(&self) -> Option<&[u32]> {
        self.pipes.all()
    }
}

/// Most `|` offsets a line carries: a metric with a sample rate, tags, a timestamp and two
/// origin fields has six. The parser searches a line with more itself.
const PIPES: usize = 8;

/// Where a line's `|` bytes are, found in the same pass as its end, so that the parser does
/// not search the ~2 KB tag field again for the `|` after it.
#[derive(Debug, Clone, Copy)]
struct Pipes {
    at: [u32; PIPES],
    /// How many `|` were seen; above [`PIPES`], the offsets are not all known.
    seen: u8,
}

impl Pipes {
    const NONE: Pipes = Pipes {
        at: [0; PIPES],
        seen: 0,
    };
    const UNKNOWN: Pipes = Pipes {
        at: [0; PIPES],
        seen: u8::MAX,
    };

    fn push(&mut self, offset: usize) {
        match (self.at.get_mut(self.seen as usize), u32::try_from(offset)) {
            (Some(slot), Ok(offset)) => {
                *slot = offset;
                self.seen += 1;
            }
            _ => self.seen = u8::MAX,
        }
    }

    /// Records the `|` a block's bit mask shows (bit `i` for the byte at `base + i`).
    #[inline]
    fn record(&mut self, base: usize, mut mask: u64) {
        while mask != 0 {
            self.push(base + mask.trailing_zeros() as usize);
            mask &= mask - 1;
        }
    }

    fn all(&self) -> Option<&[u32]> {
        self.at.get(..self.seen as usize)
    }
}

/// Two records are the same when they tell the parser the same: the offsets beyond the `|`
/// seen, or in a record of more than fit, mean nothing.
impl PartialEq for Pipes {
    fn eq(&self, other: &Pipes) -> bool {
        self.all() == other.all()
    }
}

impl Eq for Pipes {}

/// [`lines`], each checked for ASCII in the same pass over its bytes as the search for its
/// end, so the parser does not make a second pass (a message is ~2 KB).
pub fn scanned_lines(packet: &[u8]) -> impl Iterator<Item = Line<'_>> {
    let mut rest = Some(packet);
    std::iter::from_fn(move || loop {
        let chunk = rest?;
        let (end, ascii, pipes) = line_end(chunk);
        let bytes = if end < chunk.len() {
            rest = Some(&chunk[end + 1..]);
            &chunk[..end]
        } else {
            rest = None;
            chunk
        };
        // `\r` is ASCII: the flag holds for what is left.
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        if !bytes.is_empty() {
            return Some(Line {
                bytes,
                ascii,
                pipes,
            });
        }
    })
}

/// Where the line starting `chunk` ends (its first `\n`, or `chunk.len()`), whether every
/// byte before that is ASCII, and where its `|` are.
fn line_end(chunk: &[u8]) -> (usize, bool, Pipes) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above (std caches the answer).
        return unsafe { line_end_avx2(chunk) };
    }
    line_end_portable(chunk)
}

/// [`line_end`] in three passes: `memchr`, the standard ASCII check, `memchr` again.
fn line_end_portable(chunk: &[u8]) -> (usize, bool, Pipes) {
    let end = memchr::memchr(b'\n', chunk).unwrap_or(chunk.len());
    let mut pipes = Pipes::NONE;
    memchr::memchr_iter(b'|', &chunk[..end]).for_each(|at| pipes.push(at));
    (end, chunk[..end].is_ascii(), pipes)
}

/// [`line_end`] in one pass, 64 bytes a step: compares each block with `\n` and `|`, and ORs
/// it into an accumulator whose high bits say whether a non-ASCII byte went by. A block with
/// either byte (a few in a line) is looked at bit by bit.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn line_end_avx2(chunk: &[u8]) -> (usize, bool, Pipes) {
    use std::arch::x86_64::*;
    let len = chunk.len();
    let ptr = chunk.as_ptr();
    // Macros, not closures: a closure would not inherit the AVX2 target feature.
    macro_rules! load {
        ($at:expr) => {
            // SAFETY: every load reads 32 bytes at `at` only after `at + 32 <= len` (or
            // `at + 64 <= len` for a pair) was checked, so they are inside `chunk`; loadu has
            // no alignment requirement.
            unsafe { _mm256_loadu_si256(ptr.add($at).cast::<__m256i>()) }
        };
    }
    macro_rules! bits {
        ($a:expr) => {
            _mm256_movemask_epi8($a) as u32 as u64
        };
        ($a:expr, $b:expr) => {
            bits!($a) | bits!($b) << 32
        };
    }
    let newline = _mm256_set1_epi8(b'\n' as i8);
    let pipe = _mm256_set1_epi8(b'|' as i8);
    // `\n` and `|` in one compare: a byte is either exactly when it equals the entry its low
    // nibble picks here (their nibbles differ). The other entries match no byte: a byte with
    // its high bit set picks 0, and none below 0x80 equals an entry of 0x80 or more.
    const TABLE: [u8; 32] = {
        let mut t = [0x80u8; 32];
        let mut half = 0;
        while half < 32 {
            t[half + (b'\n' & 15) as usize] = b'\n';
            t[half + (b'|' & 15) as usize] = b'|';
            half += 16;
        }
        t
    };
    // SAFETY: `TABLE` holds 32 bytes.
    let table = unsafe { _mm256_loadu_si256(TABLE.as_ptr().cast::<__m256i>()) };
    macro_rules! either {
        ($a:expr) => {
            _mm256_cmpeq_epi8(_mm256_shuffle_epi8(table, $a), $a)
        };
    }
    let mut seen = _mm256_setzero_si256();
    let mut pipes = Pipes::NONE;
    let mut at = 0;
    while at + 64 <= len {
        let (a, b) = (load!(at), load!(at + 32));
        if _mm256_movemask_epi8(_mm256_or_si256(either!(a), either!(b))) != 0 {
            let newlines = bits!(_mm256_cmpeq_epi8(a, newline), _mm256_cmpeq_epi8(b, newline));
            let here = bits!(_mm256_cmpeq_epi8(a, pipe), _mm256_cmpeq_epi8(b, pipe));
            if newlines != 0 {
                let before = (1u64 << newlines.trailing_zeros()) - 1;
                pipes.record(at, here & before);
                // High bits of the bytes before the newline in this block.
                let high = bits!(a, b) & before;
                let ascii = _mm256_movemask_epi8(seen) == 0 && high == 0;
                return (at + newlines.trailing_zeros() as usize, ascii, pipes);
            }
            pipes.record(at, here);
        }
        seen = _mm256_or_si256(seen, _mm256_or_si256(a, b));
        at += 64;
    }
    // Fewer than 64 bytes left: one 32-byte block, then the last 32 bytes of the chunk, whose
    // bytes before `at` were seen already and are masked off.
    while at < len && len >= 32 {
        let start = (len - 32).min(at);
        let a = load!(start);
        let fresh = !0u64 << (at - start);
        let newlines = bits!(_mm256_cmpeq_epi8(a, newline)) & fresh;
        let here = bits!(_mm256_cmpeq_epi8(a, pipe)) & fresh;
        let high = bits!(a) & fresh;
        if newlines != 0 {
            let before = (1u64 << newlines.trailing_zeros()) - 1;
            pipes.record(start, here & before);
            let ascii = _mm256_movemask_epi8(seen) == 0 && high & before == 0;
            return (start + newlines.trailing_zeros() as usize, ascii, pipes);
        }
        pipes.record(start, here);
        seen = _mm256_or_si256(seen, a);
        at = start + 32;
    }
    if at == len {
        return (len, _mm256_movemask_epi8(seen) == 0, pipes);
    }
    let (end, tail_ascii, tail) = line_end_portable(&chunk[at..]);
    match tail.all() {
        Some(offsets) => offsets.iter().for_each(|&o| pipes.push(at + o as usize)),
        None => pipes = Pipes::UNKNOWN,
    }
    (
        at + end,
        _mm256_movemask_epi8(seen) == 0 && tail_ascii,
        pipes,
    )
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
    fn the_one_pass_line_scan_matches_memchr_and_the_ascii_check() {
        // In chunks of every length below 200: a newline at every position (or none), a
        // non-ASCII byte (or none) on both sides of each 32- and 64-byte step, and no `|`, one,
        // or a `|` every 9 or 23 bytes (more than a line's record holds, or about as many).
        const NONE: usize = usize::MAX;
        let highs = [NONE, 0, 1, 31, 32, 33, 63, 64, 65, 95, 96, 127, 128, 129];
        let mut cases = 0;
        for len in 0..200usize {
            let spreads: [&dyn Fn(usize) -> bool; 4] =
                [&|_| false, &|i| i == len * 3 / 7, &|i| i % 9 == 4, &|i| {
                    i % 23 == 22
                }];
            for newline in (0..len).chain([NONE]) {
                for high in highs {
                    for pipe_at in spreads {
                        let mut chunk: Vec<u8> = (0..len)
                            .map(|i| {
                                if pipe_at(i) {
                                    b'|'
                                } else {
                                    b'a' + (i % 26) as u8
                                }
                            })
                            .collect();
                        if high < len {
                            chunk[high] = 0xc3;
                        }
                        if newline < len {
                            chunk[newline] = b'\n';
                        }
                        let end = newline.min(len);
                        let pipes: Vec<u32> = (0..end as u32)
                            .filter(|&i| chunk[i as usize] == b'|')
                            .collect();
                        let pipes = (pipes.len() <= PIPES).then_some(&pipes[..]);
                        for (got_end, ascii, got_pipes) in
                            [line_end_portable(&chunk), line_end(&chunk)]
                        {
                            let want = ((end, high >= end), pipes);
                            let got = ((got_end, ascii), got_pipes.all());
                            assert_eq!(got, want, "{len} {newline} {high}");
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 4 * highs.len() * (200 + 199 * 200 / 2));
    }

    #[test]
    fn scanned_lines_flag_exactly_the_non_ascii_ones() {
        let packet =
            "a:1|c\nb\u{e9}:2|g\r\n\n".to_owned() + &"t".repeat(100) + ":3|c|#\u{fc}\nz:4|c";
        let got: Vec<Line<'_>> = scanned_lines(packet.as_bytes()).collect();
        let want: Vec<Line<'_>> = lines(packet.as_bytes()).map(Line::new).collect();
        assert_eq!(got, want);
        assert_eq!(
            got.iter().map(Line::is_ascii).collect::<Vec<_>>(),
            [true, false, false, true]
        );
    }

    #[test]
    fn a_batch_gives_back_the_packets_it_was_told_about() {
        let pool = Pool::new(8192, 2);
        assert_eq!(pool.slots(), 64);
        let mut b = pool.get(Transport::Unix);
        b.buffer_mut()[..5].copy_from_slice(b"x:1|c");
        b.buffer_mut()[8192..8198].copy_from_slice(b"y:2|g\n");
        b.push_packet(0, 5);
        b.push_packet(8192, 8198);
        assert_eq!(b.packets().collect::<Vec<_>>(), [&b"x:1|c"[..], b"y:2|g\n"]);
        assert_eq!(b.payload_bytes(), 11);
        assert_eq!(b.message_count(), 2);
        pool.put(b);
        let again = pool.get(Transport::Udp);
        assert_eq!(again.packet_count(), 0);
        assert_eq!(again.transport, Transport::Udp);
    }

    #[test]
    fn large_buffers_get_fewer_slots_per_batch() {
        assert_eq!(Pool::new(65536, 1).slots(), 8);
        assert_eq!(Pool::new(1024, 1).slots(), 64);
    }
}
