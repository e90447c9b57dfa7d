//! The datagram reader: one thread per UDP or Unix datagram socket, reading batches of
//! datagrams with `recvmmsg` into pooled buffers and handing each batch off by its
//! transport's policy ([`Handoff`]).
//!
//! A partial UDP batch waits half a millisecond for more, because the kernel's receive buffer
//! holds far more than that much traffic. While the socket does not keep it busy, a UDP
//! reader then parses the batch itself with a worker of its own: the datagrams are still in
//! its core's cache, and no worker has to be woken. Once three receives in a row find a full
//! batch waiting, the socket has a backlog and the reader's time goes to draining it: its
//! batches go to the workers (docs/performance.md, "A UDP reader that parses").
//!
//! A Unix datagram batch never waits: it takes what is already queued and goes, because the
//! socket queues only `net.unix.max_dgram_qlen` datagrams and a client that does not block
//! loses whatever arrives while the reader is busy (docs/performance.md, "Bursts from
//! non-blocking clients"). For the same reason, while the reader is urgent (mostly idle,
//! see [`super::priority`]) it runs at real-time priority, hands its batches off, and when
//! the workers are behind keeps draining the socket into the rest of its batch before it
//! waits for them. Only a batch of a datagram or two after which the socket was empty, a
//! trickle, it parses itself: that takes a few microseconds, less than waking a worker.
//! While it is saturated, the socket is full whenever it looks, so it parses every batch
//! itself with a worker of its own, as a UDP reader does.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::socket::{getsockopt, sockopt, MsgFlags};
use nix::sys::time::TimeSpec;

use super::priority::Scheduling;
use super::{Flow, Handoff};
use crate::clock;
use crate::packet::{Batch, Transport, MAX_SLOTS};
use crate::worker::Worker;

/// How long the UDP reader lets a partial batch fill before parsing it or handing it off. The
/// kernel's receive buffer holds far more than this much traffic.
const LINGER: Duration = Duration::from_micros(500);

/// Receives in a row that find a full batch queued, after which a UDP reader with a worker
/// of its own hands its batches to the workers: the first ones of a backlog it still parses,
/// so a moment's delay (a flush, a preemption) does not wake the workers.
const BACKLOG_READS: u32 = 3;

/// Free slots a Unix datagram batch needs for [`DatagramReader::take_queued`] to drain the
/// socket again: a full socket queue at the default `net.unix.max_dgram_qlen`.
const FILL_ROOM: usize = 10;

/// Most datagrams in a batch that an urgent Unix datagram reader parses itself when the
/// socket was empty after it: a trickle, where waking a worker costs more than the parse
/// (a few microseconds), and where a burst that is just beginning fits in the socket's
/// queue meanwhile.
const QUIET_BATCH: usize = 2;

/// How long a Unix datagram reader whose workers are behind first waits for a datagram
/// before it asks for an admission again (see [`DatagramReader::drain_while_behind`]): about
/// what a worker takes over a full batch, so a batch waits little once a worker is free. A
/// datagram ends the wait at once, so the wait only decides how soon a free worker is seen.
const ADMISSION_RETRY: Duration = Duration::from_micros(100);

/// Each wait that ends with the socket still empty doubles the next, up to this: workers
/// held up for long (a flush holding a shard) cost the reader a few hundred wakeups a
/// second, not ten thousand.
const MAX_ADMISSION_RETRY: Duration = Duration::from_micros(1600);

/// The first pause after an unexpected receive error; each further error in a row doubles it
/// up to [`MAX_ERROR_PAUSE`], so an error that persists costs a few wakeups a second, not a
/// core.
const FIRST_ERROR_PAUSE: Duration = Duration::from_millis(1);
const MAX_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Reads one datagram socket until it is shut down.
pub struct DatagramReader<'a> {
    fd: BorrowedFd<'a>,
    transport: Transport,
    handoff: &'a Handoff,
    /// Where `recvmmsg` writes each datagram's sender (only whether there is one is read).
    senders: Box<[libc::sockaddr_storage; MAX_SLOTS]>,
    /// The batch being filled.
    batch: Batch,
    /// Each read into the batch's slots.
    got: [Read; MAX_SLOTS],
    /// Bytes per slot (`--buffer-size`) and slots per batch.
    slot: usize,
    slots: usize,
    /// Unexpected receive errors since the last success.
    errors_in_a_row: u32,
    /// Empty reads since the sockets were shut down (see [`DatagramReader::drained`]).
    empty_reads_stopping: usize,
    /// `net.unix.max_dgram_qlen` for a Unix socket: at most this many datagrams (and one
    /// more) wait in it.
    unix_queue: usize,
    /// Where the kernel writes each datagram's sender credentials, when origin detection set
    /// SO_PASSCRED on the socket; the pids read from them.
    creds: Option<Box<[Credentials; MAX_SLOTS]>>,
    pids: [u32; MAX_SLOTS],
    /// The reader's own worker, for the batches it parses itself (UDP and Unix).
    own: Option<Worker>,
    /// Receives in a row that found a full batch queued.
    full_reads: u32,
    /// Unix: the reader's urgency, and its real-time scheduling when `--unix-reader-priority`
    /// asks for it and the system allows it.
    scheduling: Option<Scheduling<'a>>,
}

/// Room for one `SCM_CREDENTIALS` control message (`CMSG_SPACE` of a `ucred` is 32 bytes on
/// Linux), aligned as a `cmsghdr` must be.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Credentials([u8; 64]);

/// The sender's pid in a received message's control data; 0 when there is none (or the
/// sender is in a pid namespace whippet cannot see).
fn pid_of(hdr: &libc::msghdr) -> u32 {
    // SAFETY: the kernel filled `hdr`'s control buffer and set `msg_controllen` to what it
    // wrote; CMSG_FIRSTHDR and CMSG_NXTHDR never step past it, and the `ucred` is read
    // unaligned from inside the control message that declares it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                let cred: libc::ucred = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return cred.pid.max(0) as u32;
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    0
}

/// One datagram read: its length, whether it was truncated, and whether it came with a
/// sender's address (every UDP datagram does; the empty reads of a shut-down socket do not).
#[derive(Debug, Clone, Copy, Default)]
struct Read {
    len: usize,
    truncated: bool,
    addressed: bool,
}

/// `net.unix.max_dgram_qlen`, or a generous stand-in when it cannot be read.
fn unix_queue_length() -> usize {
    std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

impl<'a> DatagramReader<'a> {
    pub fn new(fd: BorrowedFd<'a>, transport: Transport, handoff: &'a Handoff) -> Self {
        let slots = handoff.pool.slots();
        DatagramReader {
            fd,
            transport,
            handoff,
            // SAFETY: sockaddr_storage is plain bytes; all zeroes is a valid value.
            senders: Box::new(unsafe { std::mem::zeroed() }),
            batch: handoff.pool.get(transport),
            got: [Read::default(); MAX_SLOTS],
            slot: handoff.pool.slot_bytes(),
            slots,
            errors_in_a_row: 0,
            empty_reads_stopping: 0,
            unix_queue: if transport == Transport::Unix {
                unix_queue_length()
            } else {
                0
            },
            creds: (transport == Transport::Unix
                && getsockopt(&fd, sockopt::PassCred).unwrap_or(false))
            .then(|| Box::new([Credentials([0; 64]); MAX_SLOTS])),
            pids: [0; MAX_SLOTS],
            own: None,
            full_reads: 0,
            scheduling: None,
        }
    }

    /// A Unix datagram reader that weighs its urgency, and runs at real-time `priority` (0:
    /// normal) while urgent (see [`super::priority`]). Call it on the reader's own thread: it
    /// sets the calling thread's scheduling. Other transports keep normal scheduling.
    pub fn with_priority(mut self, priority: u32) -> Self {
        if self.transport == Transport::Unix {
            let shown = &self.handoff.counters.unix_reader_realtime;
            self.scheduling = Some(Scheduling::start(priority, shown));
        }
        self
    }

    /// A reader that parses batches itself with `worker`: UDP while its socket has no
    /// backlog; Unix datagrams while saturated (which [`DatagramReader::with_priority`]
    /// weighs), or a batch of at most two datagrams after which the socket was empty. The
    /// stream transport hands every batch off.
    pub fn with_worker(mut self, worker: Worker) -> Self {
        if self.transport != Transport::Stream {
            self.own = Some(worker);
        }
        self
    }

    /// Whether the reader parses the batch it holds itself (see
    /// [`DatagramReader::with_worker`]); `trickle`: [`DatagramReader::fill`] found it one.
    fn parses_itself(&self, trickle: bool) -> bool {
        self.own.is_some()
            && match self.transport {
                Transport::Udp => self.full_reads < BACKLOG_READS,
                Transport::Unix => trickle || self.saturated(),
                Transport::Stream => false,
            }
    }

    /// Unix: whether the reader is saturated (see [`super::priority`]).
    fn saturated(&self) -> bool {
        self.scheduling.as_ref().is_some_and(Scheduling::saturated)
    }

    /// Reads until the socket is shut down and drained, or the queue closes.
    pub fn run(mut self) {
        loop {
            let shut = self.handoff.shut();
            let received = self.receive(0, MsgFlags::MSG_WAITFORONE);
            if let Some(s) = &mut self.scheduling {
                s.at(Instant::now());
            }
            let n = match received {
                Ok(n) => {
                    self.errors_in_a_row = 0;
                    n
                }
                Err(Errno::EINTR | Errno::EAGAIN) => continue,
                Err(_) if self.handoff.stopping() => break,
                Err(Errno::EBADF | Errno::ENOTSOCK) => break,
                Err(_) => {
                    self.pause_after_error();
                    continue;
                }
            };
            let (mut n, trickle) = self.fill(n);
            let drained = self.handoff.stopping() && {
                let (real, drained) = self.drained(n, shut);
                n = real;
                drained
            };
            // A stopping Unix socket's empty reads may be the end's: not counted as packets.
            let count_empty = !(self.handoff.stopping() && self.transport == Transport::Unix);
            self.record(0, n, count_empty);
            let parse = self.parses_itself(trickle);
            if self.transport == Transport::Unix && !self.handoff.stopping() && !parse {
                self.drain_while_behind(n);
            }
            if self.batch.packet_count() > 0 && self.hand_off(parse) == Flow::Stop {
                break;
            }
            if drained {
                break;
            }
        }
        self.handoff.pool.put(self.batch);
    }

    /// While stopping: whether the socket is drained, and how many of the `n` reads are
    /// datagrams. After shutdown(SHUT_RD), once the kernel queue is empty, reads return
    /// nothing at once, and no datagram can arrive after one of those; an empty datagram
    /// reads the same, so a batch of them must not end the drain.
    ///
    /// A UDP datagram always comes with its sender's address, and those empty reads never
    /// do. An unbound Unix sender has no address either, but a shut-down Unix socket takes no
    /// more datagrams and held at most `max_dgram_qlen` + 1: once more empty reads than that
    /// have come from reads begun after the shutdown (`shut`), one of them was the end, and
    /// every later one is too.
    fn drained(&mut self, n: usize, shut: bool) -> (usize, bool) {
        if self.transport == Transport::Udp {
            return match self.got[..n]
                .iter()
                .position(|r| r.len == 0 && !r.addressed)
            {
                Some(end) => (end, true),
                None => (n, false),
            };
        }
        let empty = self.got[..n].iter().filter(|r| r.len == 0).count();
        if shut {
            self.empty_reads_stopping += empty;
        }
        (
            n,
            empty == n && self.empty_reads_stopping > self.unix_queue + 1,
        )
    }

    /// Lets a batch holding `n` datagrams fill further, by the transport's policy; returns how
    /// many it holds, and whether they are a Unix trickle: at most [`QUIET_BATCH`], after
    /// which the socket was found empty.
    fn fill(&mut self, n: usize) -> (usize, bool) {
        if n == 0 || self.handoff.stopping() {
            return (n, false);
        }
        match self.transport {
            Transport::Udp => (self.linger(n), false),
            // A saturated reader parses what it has at once.
            Transport::Unix if self.own.is_some() && self.saturated() => (n, false),
            Transport::Unix => {
                let (n, emptied) = self.take_queued(n);
                (n, emptied && n <= QUIET_BATCH)
            }
            Transport::Stream => (n, false),
        }
    }

    /// UDP: a partial batch sleeps [`LINGER`], then takes whatever arrived, without waiting.
    /// One worker wakeup per full batch instead of one per few datagrams.
    fn linger(&mut self, n: usize) -> usize {
        if n >= self.slots {
            self.full_reads = self.full_reads.saturating_add(1);
            return n;
        }
        self.full_reads = 0;
        std::thread::sleep(LINGER);
        n + self.receive(n, MsgFlags::MSG_DONTWAIT).unwrap_or(0)
    }

    /// Unix datagrams: while a whole socket queue ([`FILL_ROOM`]) still fits, drains the
    /// socket again without waiting, and stops at the first drain that finds it empty. A
    /// sender that keeps the queue full fills the batch; a burst is never left in the queue
    /// while the reader sleeps. Returns how many the batch holds, and whether a drain found
    /// the socket empty.
    fn take_queued(&mut self, mut n: usize) -> (usize, bool) {
        while n + FILL_ROOM <= self.slots {
            match self.receive(n, MsgFlags::MSG_DONTWAIT) {
                Ok(m) if m > 0 => n += m,
                Ok(_) | Err(Errno::EAGAIN) => return (n, true),
                _ => break,
            }
        }
        (n, false)
    }

    /// Unix datagrams, while no admission is free (the workers are behind): rather than
    /// wait for one while the socket's small queue overflows, keeps draining the socket into
    /// the batch, as long as a whole socket queue still fits in it. Between drains it waits
    /// for a datagram at most [`ADMISSION_RETRY`] (doubling while the socket stays empty, up
    /// to [`MAX_ADMISSION_RETRY`]), then asks for an admission again. The batch's own slots
    /// are the spare room: no memory beyond it. Once whippet is stopping it leaves the drain
    /// to [`DatagramReader::run`]. Returns how many of the batch's slots are used.
    fn drain_while_behind(&mut self, mut n: usize) -> usize {
        let mut wait = ADMISSION_RETRY;
        while n + FILL_ROOM <= self.slots
            && !self.handoff.stopping()
            && !self.handoff.pool.try_admit(&mut self.batch)
        {
            if !readable(self.fd, wait) {
                wait = longer_admission_wait(wait);
                continue;
            }
            wait = ADMISSION_RETRY;
            if let Ok(m) = self.receive(n, MsgFlags::MSG_DONTWAIT) {
                // Empty reads once stopping may be the shutdown's, as in `run`.
                self.record(n, n + m, !self.handoff.stopping());
                n += m;
            }
        }
        n
    }

    /// Counts the datagrams received into slots `first..n` and records the whole ones in the
    /// batch (an empty datagram is a packet holding no message, counted when `count_empty`;
    /// a truncated one is counted and skipped).
    fn record(&mut self, first: usize, n: usize, count_empty: bool) {
        let counters = &self.handoff.counters.transports[self.transport];
        let mut bytes = 0;
        let mut truncated = 0;
        let mut empty = 0;
        for (
            i,
            &Read {
                len,
                truncated: trunc,
                ..
            },
        ) in self.got[..n].iter().enumerate().skip(first)
        {
            if trunc {
                truncated += 1;
            } else if len > 0 {
                let (start, end) = (i * self.slot, i * self.slot + len);
                match self.creds {
                    Some(_) => self.batch.push_packet_from(start, end, self.pids[i]),
                    None => self.batch.push_packet(start, end),
                }
                bytes += len as u64;
            } else {
                empty += 1;
            }
        }
        let uncounted = if count_empty { 0 } else { empty };
        counters.packets.add((n - first - uncounted) as u64);
        counters.bytes.add(bytes);
        counters.truncated.add(truncated);
    }

    /// Stamps the batch with its arrival time and parses it with the reader's own worker when
    /// `parse` (see [`DatagramReader::parses_itself`]); otherwise hands it off by the
    /// transport's policy, taking a fresh batch from the pool.
    fn hand_off(&mut self, parse: bool) -> Flow {
        self.batch.received_at = clock::data_now();
        crate::inject_fault(crate::telemetry::Label::label(self.transport));
        if let Some(worker) = self.own.as_mut().filter(|_| parse) {
            self.handoff.tap(&self.batch);
            worker.process(&self.batch);
            self.batch.clear();
            return Flow::Continue;
        }
        let pool = &self.handoff.pool;
        let full = std::mem::replace(&mut self.batch, pool.get(self.transport));
        match self.transport {
            Transport::Udp => self.handoff.drop_when_full(full),
            Transport::Unix | Transport::Stream => self.handoff.wait_for_room(full),
        }
    }

    /// Counts an unexpected receive error and sleeps before the next try: doubling from
    /// [`FIRST_ERROR_PAUSE`] up to [`MAX_ERROR_PAUSE`] while errors come in a row.
    fn pause_after_error(&mut self) {
        self.handoff.counters.transports[self.transport]
            .errors
            .add(1);
        std::thread::sleep(error_pause(self.errors_in_a_row));
        self.errors_in_a_row = self.errors_in_a_row.saturating_add(1);
    }

    /// One `recvmmsg` into the batch's slots `first..`; fills `got[first..]` and returns how
    /// many arrived. With `MSG_WAITFORONE` it blocks
    /// for the first datagram and takes whatever else is queued; with `MSG_DONTWAIT` it never
    /// blocks.
    fn receive(&mut self, first: usize, flags: MsgFlags) -> Result<usize, Errno> {
        let count = self.slots - first;
        let slot = self.slot;
        let buffer = self.batch.buffer_mut();
        // SAFETY: iovec and mmsghdr are plain C structs; all zeroes (null pointers, zero
        // lengths) is a valid value for both.
        let mut iovs: [libc::iovec; MAX_SLOTS] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; MAX_SLOTS] = unsafe { std::mem::zeroed() };
        let slots = buffer.chunks_mut(slot).skip(first).take(count);
        for (i, chunk) in slots.enumerate() {
            iovs[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            };
            let hdr = &mut msgs[i].msg_hdr;
            hdr.msg_name = std::ptr::from_mut(&mut self.senders[i]).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = std::ptr::from_mut(&mut iovs[i]);
            hdr.msg_iovlen = 1;
            if let Some(creds) = &mut self.creds {
                let c = &mut creds[first + i].0;
                hdr.msg_control = c.as_mut_ptr().cast();
                hdr.msg_controllen = c.len() as _;
            }
        }
        // SAFETY: the first `count` headers point at live, distinct buffers (slots of the
        // batch, their iovecs, `senders`, the control buffers) that outlive the call and that
        // nothing else touches meanwhile; the kernel writes at most their stated lengths.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                count as libc::c_uint,
                // glibc declares the flags int, musl unsigned int.
                flags.bits() as _,
                std::ptr::null_mut(),
            )
        };
        let n = Errno::result(r)? as usize;
        for (i, m) in msgs[..n].iter().enumerate() {
            if self.creds.is_some() {
                self.pids[first + i] = pid_of(&m.msg_hdr);
            }
            self.got[first + i] = Read {
                len: m.msg_len as usize,
                truncated: m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                addressed: m.msg_hdr.msg_namelen > 0,
            };
        }
        Ok(n)
    }
}

/// Whether `fd` has a datagram to read within `wait` (`ppoll`); false on a timeout or an
/// error (the next receive reports the error).
fn readable(fd: BorrowedFd<'_>, wait: Duration) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None), Ok(n) if n > 0)
}

/// The wait for a datagram after one of `wait` that found the socket empty (see
/// [`DatagramReader::drain_while_behind`]).
fn longer_admission_wait(wait: Duration) -> Duration {
    (wait * 2).min(MAX_ADMISSION_RETRY)
}

/// The pause after the `n`th unexpected receive error in a row (counting from 0).
fn error_pause(n: u32) -> Duration {
    FIRST_ERROR_PAUSE
        .saturating_mul(1 << n.min(16))
        .min(MAX_ERROR_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::Counters;
    use crate::packet::Pool;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Instant;

    fn handoff(stopping: bool) -> (Handoff, crossbeam_channel::Receiver<Batch>) {
        handoff_shut(stopping, stopping)
    }

    fn handoff_shut(stopping: bool, shut: bool) -> (Handoff, crossbeam_channel::Receiver<Batch>) {
        // Room for every batch a test makes, so a slow consumer never drops one.
        let (queue, rx) = crossbeam_channel::bounded(1024);
        let handoff = Handoff {
            queue,
            pool: Arc::new(Pool::new(8192, 1)),
            counters: Arc::new(Counters::default()),
            stopping: Arc::new(AtomicBool::new(stopping)),
            shut: Arc::new(AtomicBool::new(shut)),
            mirror: None,
            capture: None,
        };
        (handoff, rx)
    }

    /// Receives the first datagrams of a batch as the reader does, runs `between`, then takes
    /// what is queued; returns the lengths received.
    fn receive_then_take(
        socket: &UnixDatagram,
        stopping: bool,
        between: impl FnOnce(),
    ) -> Vec<usize> {
        let (handoff, _rx) = handoff(stopping);
        let mut reader = DatagramReader::new(socket.as_fd(), Transport::Unix, &handoff);
        let n = reader.receive(0, MsgFlags::MSG_WAITFORONE).unwrap();
        between();
        let (n, _) = reader.take_queued(n);
        reader.got[..n].iter().map(|r| r.len).collect()
    }

    #[test]
    fn with_so_passcred_every_datagram_carries_its_senders_pid() {
        let (rx, tx) = UnixDatagram::pair().unwrap();
        nix::sys::socket::setsockopt(&rx, sockopt::PassCred, &true).unwrap();
        tx.send(b"a:1|c").unwrap();
        tx.send(b"b:1|c").unwrap();
        let (handoff, _rx) = handoff(false);
        let mut reader = DatagramReader::new(rx.as_fd(), Transport::Unix, &handoff);
        let n = reader.receive(0, MsgFlags::MSG_WAITFORONE).unwrap();
        let n = n + reader.receive(n, MsgFlags::MSG_DONTWAIT).unwrap_or(0);
        reader.record(0, n, true);
        assert_eq!(reader.batch.packet_count(), 2);
        let me = std::process::id();
        assert_eq!(reader.batch.pids(), Some(&[me, me][..]));
        // Without it, no pids are kept.
        let (rx, tx) = UnixDatagram::pair().unwrap();
        tx.send(b"a:1|c").unwrap();
        let mut reader = DatagramReader::new(rx.as_fd(), Transport::Unix, &handoff);
        let n = reader.receive(0, MsgFlags::MSG_WAITFORONE).unwrap();
        reader.record(0, n, true);
        assert_eq!(reader.batch.pids(), None);
    }

    #[test]
    fn a_unix_batch_takes_what_is_queued_without_waiting_for_more() {
        // Two datagrams arrive after the first drain and before the next: taken. None more
        // come: the batch goes at once (were it to wait, this test would never end).
        let (rx, tx) = UnixDatagram::pair().unwrap();
        tx.send(b"m:1|c").unwrap();
        let more = || {
            tx.send(b"m:22|c").unwrap();
            tx.send(b"m:333|c").unwrap();
        };
        assert_eq!(receive_then_take(&rx, false, more), [5, 6, 7]);
        // A batch without room for another whole socket queue takes no more.
        let (handoff, _rx) = handoff(false);
        let mut reader = DatagramReader::new(rx.as_fd(), Transport::Unix, &handoff);
        tx.send(b"m:1|c").unwrap();
        let full = reader.slots - FILL_ROOM + 1;
        assert_eq!(reader.take_queued(full), (full, false));
        assert_eq!(reader.receive(0, MsgFlags::MSG_DONTWAIT).unwrap(), 1);
    }

    #[test]
    fn a_shut_down_socket_ends_the_batch_and_empty_datagrams_count_as_packets() {
        // An empty datagram is a packet (counted, holding no message) while running.
        let (rx, tx) = UnixDatagram::pair().unwrap();
        tx.send(b"m:1|c").unwrap();
        let more = || {
            tx.send(b"").unwrap();
            tx.send(b"m:2|c").unwrap();
        };
        assert_eq!(receive_then_take(&rx, false, more), [5, 0, 5]);

        // After the daemon's shutdown(SHUT_RD), what reads return is not a packet.
        let (rx, tx) = UnixDatagram::pair().unwrap();
        tx.send(b"m:1|c").unwrap();
        rx.shutdown(std::net::Shutdown::Read).unwrap();
        assert_eq!(receive_then_take(&rx, true, || {}), [5]);
    }

    /// A worker over a fresh demux, and the counters it adds to.
    fn own_worker() -> (Worker, Arc<crate::worker::Counters>) {
        let enrichment = crate::worker::Enrichment::plain("h", &[]);
        let counters = Arc::new(crate::worker::Counters::default());
        let demux = Arc::new(crate::demux::Demux::new(1, 100));
        (Worker::new(demux, counters.clone(), enrichment), counters)
    }

    /// One turn of a running reader's loop: receive, fill, record, parse or hand off.
    fn one_turn(reader: &mut DatagramReader<'_>) {
        let n = reader.receive(0, MsgFlags::MSG_WAITFORONE).unwrap();
        let (n, trickle) = reader.fill(n);
        reader.record(0, n, true);
        let parse = reader.parses_itself(trickle);
        assert_eq!(reader.hand_off(parse), Flow::Continue);
    }

    #[test]
    fn a_udp_reader_parses_its_batches_until_a_backlog_sends_them_to_the_workers() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = socket.local_addr().unwrap();
        let (mut handoff, rx) = handoff(false);
        // 64 KiB slots: a batch holds 8 datagrams.
        handoff.pool = Arc::new(Pool::new(65536, 1));
        let (worker, parsed) = own_worker();
        let mut reader =
            DatagramReader::new(socket.as_fd(), Transport::Udp, &handoff).with_worker(worker);
        assert_eq!(reader.slots, 8);
        let metrics =
            |c: &crate::worker::Counters| c.messages[crate::parser::MessageKind::Metric].get();

        // A backlog of four full batches: the first BACKLOG_READS - 1 the reader still parses,
        // then it hands batches to the workers.
        for i in 0..32 {
            sender.send_to(format!("m:{i}|c").as_bytes(), to).unwrap();
        }
        for _ in 0..4 {
            one_turn(&mut reader);
        }
        assert_eq!(metrics(&parsed), 16);
        let handed: Vec<usize> = rx.try_iter().map(|b| b.packet_count()).collect();
        assert_eq!(handed, [8, 8]);

        // A partial batch: the backlog is gone, and the reader parses again.
        for i in 0..3 {
            sender.send_to(format!("n:{i}|c").as_bytes(), to).unwrap();
        }
        one_turn(&mut reader);
        assert_eq!(metrics(&parsed), 19);
        assert_eq!(rx.try_iter().count(), 0);
        assert_eq!(
            handoff.counters.transports[Transport::Udp].packets.get(),
            35
        );
    }

    #[test]
    fn a_unix_reader_parses_a_trickle_or_while_saturated_and_hands_the_rest_off() {
        let (rx_socket, tx) = UnixDatagram::pair().unwrap();
        let (handoff, rx) = handoff(false);
        let (worker, parsed) = own_worker();
        let metrics = || parsed.messages[crate::parser::MessageKind::Metric].get();
        let handed = || rx.try_iter().map(|b| b.packet_count()).collect::<Vec<_>>();
        // Without a worker of its own it hands every batch off, however small.
        let mut reader =
            DatagramReader::new(rx_socket.as_fd(), Transport::Unix, &handoff).with_priority(0);
        tx.send(b"m:1|c").unwrap();
        one_turn(&mut reader);
        assert_eq!((metrics(), handed()), (0, vec![1]));
        let mut reader = reader.with_worker(worker);
        // (saturated, datagrams queued, metrics parsed by the reader so far, batches handed
        // off): urgent, it parses a batch of at most QUIET_BATCH after which the socket was
        // empty, and hands a larger one off; saturated, it parses every batch.
        for (saturated, sent, parsed, handed_off) in [
            (false, QUIET_BATCH + 1, 0, vec![QUIET_BATCH + 1]),
            (false, QUIET_BATCH, QUIET_BATCH, vec![]),
            (false, 1, QUIET_BATCH + 1, vec![]),
            (true, 20, QUIET_BATCH + 21, vec![]),
            (false, 4, QUIET_BATCH + 21, vec![4]),
        ] {
            reader.scheduling.as_mut().unwrap().set_saturated(saturated);
            for i in 0..sent {
                tx.send(format!("m:{i}|c").as_bytes()).unwrap();
            }
            one_turn(&mut reader);
            let got = (metrics() as usize, handed());
            assert_eq!(got, (parsed, handed_off), "{saturated} {sent}");
        }
        assert_eq!(
            handoff.counters.transports[Transport::Unix].packets.get(),
            1 + 2 * QUIET_BATCH as u64 + 1 + 1 + 20 + 4
        );
    }

    #[test]
    fn a_unix_reader_whose_workers_are_behind_keeps_draining_into_its_batch() {
        let (dir, rx_socket, tx) = bound_socket("behind");
        let (handoff, held) = workers_behind();
        let mut reader = DatagramReader::new(rx_socket.as_fd(), Transport::Unix, &handoff);
        assert_eq!(reader.slots, 64);
        const SENT: usize = 40;
        let n = std::thread::scope(|s| {
            let draining = s.spawn(|| reader.drain_while_behind(0));
            for i in 0..SENT {
                tx.send(format!("m{i}:1|c").as_bytes()).unwrap();
            }
            handoff.pool.put(held);
            draining.join().unwrap()
        });
        // Every datagram was either taken into the batch or is still queued: at most a
        // socket queue's worth, since the sender never blocked for long.
        rx_socket.set_nonblocking(true).unwrap();
        let mut left = 0;
        while rx_socket.recv(&mut [0u8; 64]).is_ok() {
            left += 1;
        }
        assert_eq!(n + left, SENT);
        assert!(left <= reader.unix_queue + 1, "{left} left queued");
        assert_eq!(reader.batch.packet_count(), n);
        let first: Vec<&[u8]> = reader.batch.packets().take(2).collect();
        assert_eq!(first, [&b"m0:1|c"[..], b"m1:1|c"]);
        assert_eq!(
            handoff.counters.transports[Transport::Unix].packets.get(),
            n as u64
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_unix_reader_whose_workers_are_behind_stops_draining_when_its_batch_is_nearly_full() {
        let (dir, rx_socket, tx) = bound_socket("nearly-full");
        let (handoff, _held) = workers_behind();
        let mut reader = DatagramReader::new(rx_socket.as_fd(), Transport::Unix, &handoff);
        let sender = std::thread::spawn(move || {
            for i in 0..200 {
                if tx.send(format!("m{i}:1|c").as_bytes()).is_err() {
                    return i;
                }
            }
            200
        });
        // With the admission still held, it returns once no whole socket queue fits.
        let n = reader.drain_while_behind(0);
        assert!((64 - FILL_ROOM..=64).contains(&n), "{n}");
        assert_eq!(reader.batch.packet_count(), n);
        // The reader's socket closes: the blocked sender's next send fails.
        drop(rx_socket);
        assert!(sender.join().unwrap() < 200);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A hand-off whose pool admits one batch, and that batch, admitted: as if the workers
    /// were all busy with what they were given.
    fn workers_behind() -> (Handoff, Batch) {
        let (mut handoff, _rx) = handoff(false);
        handoff.pool = Arc::new(Pool::new(8192, 1).with_admissions(1));
        let mut held = handoff.pool.get(Transport::Unix);
        assert!(handoff.pool.try_admit(&mut held));
        (handoff, held)
    }

    /// A Unix datagram socket bound to a path in a fresh directory, as the daemon's (a socket
    /// pair's queue has no length limit), and an unbound sender connected to it. The sender
    /// blocks after `net.unix.max_dgram_qlen` datagrams the reader has not taken, at most 10
    /// seconds, so a reader that stops draining fails a test instead of hanging it.
    fn bound_socket(name: &str) -> (std::path::PathBuf, UnixDatagram, UnixDatagram) {
        let dir = std::env::temp_dir().join(format!("whippet-rx-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dsd.socket");
        let rx = UnixDatagram::bind(&path).unwrap();
        let tx = UnixDatagram::unbound().unwrap();
        tx.connect(&path).unwrap();
        tx.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        (dir, rx, tx)
    }

    /// Runs a stopping reader over `socket` and returns the packets it handed off; `shut`
    /// runs beside it and shuts the socket down for reading, as the daemon does.
    fn drain_stopping(
        socket: BorrowedFd<'_>,
        transport: Transport,
        shut: impl FnOnce() + Send,
    ) -> Vec<Vec<u8>> {
        let (handoff, rx) = handoff_shut(true, false);
        let consumer = std::thread::spawn(move || {
            let mut got = Vec::new();
            for batch in rx {
                got.extend(batch.packets().map(<[u8]>::to_vec));
            }
            got
        });
        std::thread::scope(|s| {
            s.spawn(|| {
                shut();
                handoff
                    .shut
                    .store(true, std::sync::atomic::Ordering::Release);
            });
            DatagramReader::new(socket, transport, &handoff).run();
        });
        drop(handoff);
        consumer.join().unwrap()
    }

    #[test]
    fn empty_udp_datagrams_queued_at_shutdown_do_not_end_the_drain() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &(4 << 20))
            .unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = socket.local_addr().unwrap();
        for _ in 0..3000 {
            sender.send_to(b"", to).unwrap();
        }
        for i in 0..500 {
            sender
                .send_to(format!("real:{i}|c").as_bytes(), to)
                .unwrap();
        }
        // As the daemon stops a reader (unconnected UDP answers ENOTCONN, yet shuts down).
        let fd = socket.as_raw_fd();
        let got = drain_stopping(socket.as_fd(), Transport::Udp, || {
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read);
        });
        let want: Vec<Vec<u8>> = (0..500)
            .map(|i| format!("real:{i}|c").into_bytes())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn empty_unix_datagrams_queued_at_shutdown_do_not_end_the_drain() {
        // A bound socket, as the daemon's (a socket pair's queue has no length limit). While
        // the reader is stopping, a blocked sender gets 3,000 empty datagrams through, then
        // one real one; only then is the socket shut down.
        let dir = std::env::temp_dir().join(format!("whippet-rx-empty-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("dsd.socket");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let fd = rx.as_raw_fd();
        let got = drain_stopping(rx.as_fd(), Transport::Unix, || {
            let tx = UnixDatagram::unbound().unwrap();
            // A reader that stopped early fails the test instead of hanging it.
            tx.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
            for _ in 0..3000 {
                tx.send_to(b"", &path).unwrap();
            }
            tx.send_to(b"real:1|c", &path).unwrap();
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read);
        });
        assert_eq!(got, [b"real:1|c".to_vec()]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_wait_for_an_admission_doubles_from_a_tenth_of_a_millisecond_while_the_socket_is_empty() {
        let mut wait = ADMISSION_RETRY;
        let mut waits = vec![wait.as_micros()];
        for _ in 0..6 {
            wait = longer_admission_wait(wait);
            waits.push(wait.as_micros());
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 1600, 1600]);
    }

    #[test]
    fn the_pause_after_errors_doubles_from_a_millisecond_up_to_a_tenth_of_a_second() {
        let pauses: Vec<u128> = (0..10).map(|n| error_pause(n).as_millis()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 64, 100, 100, 100]);
        assert_eq!(error_pause(u32::MAX), MAX_ERROR_PAUSE);
    }

    #[test]
    fn a_persistent_receive_error_is_counted_and_paced_instead_of_spinning() {
        // recvmmsg on a stream socket that is not connected fails with EINVAL every time.
        let dir = std::env::temp_dir().join(format!("whippet-rx-error-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("listening");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (handoff, _rx) = handoff(false);
        let handoff = Arc::new(handoff);
        let errors = || handoff.counters.transports[Transport::Unix].errors.get();
        let started = Instant::now();
        std::thread::scope(|s| {
            let reader =
                s.spawn(|| DatagramReader::new(listener.as_fd(), Transport::Unix, &handoff).run());
            let end = Instant::now() + Duration::from_secs(30);
            while errors() < 8 {
                assert!(Instant::now() < end, "only {} errors counted", errors());
                std::thread::sleep(Duration::from_millis(5));
            }
            handoff
                .stopping
                .store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().unwrap();
        });
        // Every error but the last was followed by its pause, so the errors that fit in the
        // time that passed are bounded: a reader that spun would count millions.
        let elapsed = started.elapsed();
        let n = errors();
        let paused: Duration = (0..n.saturating_sub(1) as u32).map(error_pause).sum();
        assert!(paused <= elapsed, "{n} errors in {elapsed:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
