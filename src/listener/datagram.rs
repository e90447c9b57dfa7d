//! The datagram reader: one thread per UDP or Unix datagram socket, reading batches of
//! datagrams with `recvmmsg` into pooled buffers and handing each batch off by its
//! transport's policy ([`Handoff`]).
//!
//! A partial batch waits a little for more before a worker is woken for it, because waking a
//! worker costs far more than the wait: UDP sleeps half a millisecond and then takes what
//! came; a Unix datagram batch polls for further drains of the socket for up to a
//! millisecond.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders};

use super::{Flow, Handoff};
use crate::clock;
use crate::packet::{Batch, Transport, MAX_SLOTS};

/// How long the UDP reader lets a partial batch fill before handing it to a worker. The
/// kernel's receive buffer holds far more than this much traffic.
const LINGER: Duration = Duration::from_micros(500);

/// Longest a Unix datagram batch waits to fill ([`DatagramReader::top_up`]): nothing that a
/// 10 s bucket would notice.
const FILL_WAIT: Duration = Duration::from_millis(1);

/// Free slots a Unix datagram batch needs for [`DatagramReader::top_up`] to wait for more: a
/// full socket queue at the default `net.unix.max_dgram_qlen`.
const FILL_ROOM: usize = 10;

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
    headers: MultiHeaders<()>,
    /// The batch being filled.
    batch: Batch,
    /// (length, truncated) of each datagram received into the batch's slots.
    got: [(usize, bool); MAX_SLOTS],
    /// Bytes per slot (`--buffer-size`) and slots per batch.
    slot: usize,
    slots: usize,
    /// Unexpected receive errors since the last success.
    errors_in_a_row: u32,
}

impl<'a> DatagramReader<'a> {
    pub fn new(fd: BorrowedFd<'a>, transport: Transport, handoff: &'a Handoff) -> Self {
        let slots = handoff.pool.slots();
        DatagramReader {
            fd,
            transport,
            handoff,
            headers: MultiHeaders::<()>::preallocate(slots, None),
            batch: handoff.pool.get(transport),
            got: [(0, false); MAX_SLOTS],
            slot: handoff.pool.slot_bytes(),
            slots,
            errors_in_a_row: 0,
        }
    }

    /// Reads until the socket is shut down and drained, or the queue closes.
    pub fn run(mut self) {
        loop {
            let n = match self.receive(0, MsgFlags::MSG_WAITFORONE) {
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
            let n = self.fill(n);
            // After shutdown(SHUT_RD) and once the kernel queue is drained, reads return
            // nothing at once: those are not packets.
            if self.handoff.stopping() && self.got[..n].iter().all(|&(len, _)| len == 0) {
                break;
            }
            self.record(n);
            if self.batch.packet_count() > 0 && self.hand_off() == Flow::Stop {
                break;
            }
        }
        self.handoff.pool.put(self.batch);
    }

    /// Lets a batch holding `n` datagrams fill further, by the transport's policy; returns how
    /// many it holds.
    fn fill(&mut self, n: usize) -> usize {
        if n == 0 || self.handoff.stopping() {
            return n;
        }
        match self.transport {
            Transport::Udp => self.linger(n),
            Transport::Unix => self.top_up(n, FILL_WAIT),
            Transport::Stream => n,
        }
    }

    /// UDP: a partial batch sleeps [`LINGER`], then takes whatever arrived, without waiting.
    /// One worker wakeup per full batch instead of one per few datagrams.
    fn linger(&mut self, n: usize) -> usize {
        if n >= self.slots {
            return n;
        }
        std::thread::sleep(LINGER);
        n + self.receive(n, MsgFlags::MSG_DONTWAIT).unwrap_or(0)
    }

    /// Unix datagrams: while a whole socket queue ([`FILL_ROOM`]) still fits, waits for more
    /// datagrams, `wait` at most in all. A Unix datagram socket queues at most
    /// `net.unix.max_dgram_qlen` datagrams (10 by default), so under load one `recvmmsg`
    /// brings about 8; filling the batch first wakes a worker for ~23 datagrams instead.
    fn top_up(&mut self, mut n: usize, wait: Duration) -> usize {
        let deadline = Instant::now() + wait;
        while n + FILL_ROOM <= self.slots {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Rounded up: poll counts whole milliseconds.
            let millis = left.as_nanos().div_ceil(1_000_000);
            let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.fd, PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            match self.receive(n, MsgFlags::MSG_DONTWAIT) {
                Ok(m) if m > 0 => {
                    // After shutdown(SHUT_RD), reads return nothing at once: not packets.
                    let empty = self.got[n..n + m].iter().all(|&(len, _)| len == 0);
                    if self.handoff.stopping() && empty {
                        break;
                    }
                    n += m;
                }
                _ => break,
            }
        }
        n
    }

    /// Counts the `n` datagrams received and records the whole ones in the batch (an empty
    /// datagram is a packet holding no message; a truncated one is counted and skipped).
    fn record(&mut self, n: usize) {
        let counters = &self.handoff.counters.transports[self.transport];
        let mut bytes = 0;
        let mut truncated = 0;
        for (i, &(len, trunc)) in self.got[..n].iter().enumerate() {
            if trunc {
                truncated += 1;
            } else if len > 0 {
                self.batch.push_packet(i * self.slot, i * self.slot + len);
                bytes += len as u64;
            }
        }
        counters.packets.add(n as u64);
        counters.bytes.add(bytes);
        counters.truncated.add(truncated);
    }

    /// Stamps the batch with its arrival time and hands it off by the transport's policy,
    /// taking a fresh batch from the pool.
    fn hand_off(&mut self) -> Flow {
        self.batch.received_at = clock::unix_now();
        crate::inject_fault(crate::telemetry::Label::label(self.transport));
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

    /// One `recvmmsg` into the batch's slots `first..`; fills `got[first..]` with (length,
    /// truncated) per datagram and returns how many arrived. With `MSG_WAITFORONE` it blocks
    /// for the first datagram and takes whatever else is queued; with `MSG_DONTWAIT` it never
    /// blocks.
    fn receive(&mut self, first: usize, flags: MsgFlags) -> Result<usize, Errno> {
        let mut chunks = self.batch.buffer_mut().chunks_mut(self.slot).skip(first);
        let mut iovs: [[IoSliceMut<'_>; 1]; MAX_SLOTS] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let slots = iovs.iter_mut().take(self.slots - first);
        let results = recvmmsg(self.fd.as_raw_fd(), &mut self.headers, slots, flags, None)?;
        let mut n = 0;
        for r in results {
            self.got[first + n] = (r.bytes, r.flags.contains(MsgFlags::MSG_TRUNC));
            n += 1;
        }
        Ok(n)
    }
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

    fn handoff(stopping: bool) -> (Handoff, crossbeam_channel::Receiver<Batch>) {
        let (queue, rx) = crossbeam_channel::bounded(4);
        let handoff = Handoff {
            queue,
            pool: Arc::new(Pool::new(8192, 1)),
            counters: Arc::new(Counters::default()),
            stopping: Arc::new(AtomicBool::new(stopping)),
        };
        (handoff, rx)
    }

    /// Receives the first datagrams of a batch as the reader does, runs `between`, then tops
    /// the batch up; returns the lengths received.
    fn receive_then_top_up(
        socket: &UnixDatagram,
        wait: Duration,
        stopping: bool,
        between: impl FnOnce(),
    ) -> Vec<usize> {
        let (handoff, _rx) = handoff(stopping);
        let mut reader = DatagramReader::new(socket.as_fd(), Transport::Unix, &handoff);
        let n = reader.receive(0, MsgFlags::MSG_WAITFORONE).unwrap();
        between();
        let n = reader.top_up(n, wait);
        reader.got[..n].iter().map(|&(len, _)| len).collect()
    }

    fn receive_and_top_up(socket: &UnixDatagram, wait: Duration, stopping: bool) -> Vec<usize> {
        receive_then_top_up(socket, wait, stopping, || {})
    }

    #[test]
    fn a_unix_batch_takes_more_drains_until_a_full_socket_queue_would_not_fit() {
        // The socket queues at most 10 (net.unix.max_dgram_qlen), so the sender blocks
        // between drains; 32 slots less a queue's 10 is 22, so the batch stops at 23.
        let (rx, tx) = UnixDatagram::pair().unwrap();
        let sender = std::thread::spawn(move || {
            for i in 0..23 {
                tx.send(format!("m:{i}|c").as_bytes()).unwrap();
            }
            tx
        });
        let lens = receive_and_top_up(&rx, Duration::from_secs(60), false);
        let want: Vec<usize> = (0..23).map(|i| format!("m:{i}|c").len()).collect();
        assert_eq!(lens, want);
        drop(sender.join().unwrap());
    }

    #[test]
    fn a_unix_batch_waits_for_more_no_longer_than_its_wait() {
        let (rx, tx) = UnixDatagram::pair().unwrap();
        for _ in 0..3 {
            tx.send(b"m:1|c").unwrap();
        }
        assert_eq!(
            receive_and_top_up(&rx, Duration::from_millis(20), false),
            [5, 5, 5]
        );
    }

    #[test]
    fn a_shut_down_socket_ends_the_wait_at_once_and_empty_datagrams_count_as_packets() {
        // An empty datagram is a packet (counted, holding no message) while running.
        let (rx, tx) = UnixDatagram::pair().unwrap();
        tx.send(b"m:1|c").unwrap();
        let more = || {
            tx.send(b"").unwrap();
            tx.send(b"m:2|c").unwrap();
        };
        let wait = Duration::from_millis(20);
        assert_eq!(receive_then_top_up(&rx, wait, false, more), [5, 0, 5]);

        // After the daemon's shutdown(SHUT_RD), what reads return is not a packet.
        let (rx, tx) = UnixDatagram::pair().unwrap();
        tx.send(b"m:1|c").unwrap();
        rx.shutdown(std::net::Shutdown::Read).unwrap();
        let start = Instant::now();
        assert_eq!(receive_and_top_up(&rx, Duration::from_secs(60), true), [5]);
        // Not a timing assertion: without the shutdown check it would wait the full minute.
        assert!(start.elapsed() < Duration::from_secs(30));
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
