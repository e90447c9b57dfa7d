//! The load generator behind `whippet-blast`: sending [`workload`]s over UDP, a Unix datagram
//! socket or a Unix stream socket with `sendmmsg`, at a rate or as fast as possible, and
//! draining a socket as the floor to compare with. [`mod@bench`] drives whippet with it and
//! measures.

pub mod bench;
pub mod process;
pub mod workload;

#[cfg(test)]
pub(crate) use workload::Rng;
pub use workload::{corpus, pack, Generated};

use std::io::{IoSlice, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};

/// Where to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Udp(SocketAddr),
    Unix(PathBuf),
    Stream(PathBuf),
}

impl Target {
    /// `udp:HOST:PORT`, `unix:PATH` or `stream:PATH`.
    pub fn parse(s: &str) -> Result<Target, String> {
        let bad = || format!("--target: '{s}' is not udp:HOST:PORT, unix:PATH or stream:PATH");
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "udp" => rest.parse().map(Target::Udp).map_err(|_| bad()),
            "unix" if !rest.is_empty() => Ok(Target::Unix(rest.into())),
            "stream" if !rest.is_empty() => Ok(Target::Stream(rest.into())),
            _ => Err(bad()),
        }
    }

    /// Default packet size: 1432 bytes for UDP (one Ethernet frame), 8192 for Unix sockets.
    pub fn default_packet_size(&self) -> usize {
        match self {
            Target::Udp(_) => 1432,
            _ => 8192,
        }
    }
}

/// How much to send.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Messages per second; `None` is as fast as possible.
    pub rate: Option<u64>,
    pub duration: Option<Duration>,
    /// Messages to send at most.
    pub count: Option<u64>,
    /// Send as a client that never blocks: bursts of datagrams with gaps between them, and
    /// what the kernel refuses (its queue full) counted, not retried. Unix datagrams only.
    pub bursts: Option<Bursts>,
}

/// Bursts of datagrams, like a busy web worker's: each burst's size in turn, in a loop,
/// then `gap` of silence.
#[derive(Debug, Clone, PartialEq)]
pub struct Bursts {
    pub sizes: Vec<u32>,
    pub gap: Duration,
}

/// What a send did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sent {
    pub messages: u64,
    pub packets: u64,
    pub bytes: u64,
    pub errors: u64,
    /// Non-blocking sends the kernel refused because the socket's queue was full: the
    /// client-side loss a server never sees. Datagrams, and the messages they held.
    pub refused_packets: u64,
    pub refused_messages: u64,
    pub elapsed: Duration,
}

impl Sent {
    pub fn per_second(&self, n: u64) -> f64 {
        n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Two sends' counts and times added up, as if one.
    pub fn plus(&self, other: &Sent) -> Sent {
        Sent {
            messages: self.messages + other.messages,
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            errors: self.errors + other.errors,
            refused_packets: self.refused_packets + other.refused_packets,
            refused_messages: self.refused_messages + other.refused_messages,
            elapsed: self.elapsed + other.elapsed,
        }
    }
}

/// Datagram sockets are connected, so `sendmmsg` needs no addresses.
enum Socket {
    Udp(UdpSocket),
    Unix(UnixDatagram),
    Stream(UnixStream),
}

impl Socket {
    fn open(target: &Target) -> Result<Socket, String> {
        Ok(match target {
            Target::Udp(addr) => {
                let any = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let s = UdpSocket::bind(any)
                    .and_then(|s| s.connect(addr).map(|_| s))
                    .map_err(|e| format!("cannot open a UDP socket to {addr}: {e}"))?;
                Socket::Udp(s)
            }
            Target::Unix(path) => {
                let s = UnixDatagram::unbound()
                    .and_then(|s| s.connect(path).map(|_| s))
                    .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
                Socket::Unix(s)
            }
            Target::Stream(path) => Socket::Stream(
                UnixStream::connect(path)
                    .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?,
            ),
        })
    }
}

/// Sends `packets` in a loop according to `plan`.
pub fn send(target: &Target, packets: &[(Vec<u8>, u64)], plan: Plan) -> Result<Sent, String> {
    let socket = Socket::open(target)?;
    if let (Some(bursts), Socket::Unix(s)) = (&plan.bursts, &socket) {
        return send_bursts(s, packets, &plan, bursts);
    }
    let mut sent = Sent::default();
    let start = Instant::now();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(32, None);
    let mut i = 0;
    let mut stream_buf = Vec::with_capacity(64 * 1024);
    loop {
        let elapsed = start.elapsed();
        if plan.duration.is_some_and(|d| elapsed >= d)
            || plan.count.is_some_and(|c| sent.messages >= c)
        {
            break;
        }
        if let Some(rate) = plan.rate {
            // Keep to the rate: wait until the messages sent so far are due.
            let due = Duration::from_secs_f64(sent.messages as f64 / rate as f64);
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(Duration::from_millis(5)));
                continue;
            }
        }
        let batch = next_batch(packets, &mut i, &plan, sent.messages);
        let delivered = match &socket {
            Socket::Udp(s) => send_batch(s.as_raw_fd(), &mut headers, &batch),
            Socket::Unix(s) => send_batch(s.as_raw_fd(), &mut headers, &batch),
            Socket::Stream(s) => {
                stream_buf.clear();
                for (p, _) in &batch {
                    stream_buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
                    stream_buf.extend_from_slice(p);
                }
                let mut s: &UnixStream = s;
                s.write_all(&stream_buf)
                    .map_err(|e| format!("stream write failed: {e}"))?;
                batch.len()
            }
        };
        for (p, n) in &batch[..delivered] {
            sent.packets += 1;
            sent.messages += n;
            sent.bytes += p.len() as u64;
        }
        if delivered < batch.len() {
            sent.errors += 1;
            i -= batch.len() - delivered;
        }
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}

/// Sends `packets` one datagram at a time without ever blocking, in bursts: a full
/// socket queue refuses the datagram (`EAGAIN`), which is counted and dropped, as
/// datadogpy and other non-blocking clients do.
fn send_bursts(
    socket: &UnixDatagram,
    packets: &[(Vec<u8>, u64)],
    plan: &Plan,
    bursts: &Bursts,
) -> Result<Sent, String> {
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make the socket non-blocking: {e}"))?;
    let mut sent = Sent::default();
    let start = Instant::now();
    let mut i = 0;
    'bursts: for size in bursts.sizes.iter().cycle() {
        for _ in 0..*size {
            if plan.duration.is_some_and(|d| start.elapsed() >= d)
                || plan
                    .count
                    .is_some_and(|c| sent.messages + sent.refused_messages >= c)
            {
                break 'bursts;
            }
            let (p, n) = &packets[i % packets.len()];
            i += 1;
            match socket.send(p) {
                Ok(_) => {
                    sent.packets += 1;
                    sent.messages += n;
                    sent.bytes += p.len() as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    sent.refused_packets += 1;
                    sent.refused_messages += n;
                }
                Err(_) => sent.errors += 1,
            }
        }
        std::thread::sleep(bursts.gap);
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}

/// Sends the packets of a capture (docs/capture.md) to `target`, each as one datagram or
/// frame, in order: at the pace they were recorded divided by `speed`, or as fast as possible
/// without one. A Unix datagram send waits when the socket is full, so nothing is lost there.
pub fn replay(
    records: &[crate::listener::capture::Record<'_>],
    target: &Target,
    speed: Option<f64>,
) -> Result<Sent, String> {
    let socket = Socket::open(target)?;
    let mut sent = Sent::default();
    let start = Instant::now();
    let mut frame = Vec::new();
    for r in records {
        if let Some(speed) = speed {
            let due = r.at.div_f64(speed);
            let elapsed = start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        let result = match &socket {
            Socket::Udp(s) => s.send(r.bytes).map(|_| ()),
            Socket::Unix(s) => s.send(r.bytes).map(|_| ()),
            Socket::Stream(s) => {
                frame.clear();
                frame.extend_from_slice(&(r.bytes.len() as u32).to_le_bytes());
                frame.extend_from_slice(r.bytes);
                let mut s: &UnixStream = s;
                s.write_all(&frame)
            }
        };
        match result {
            Ok(()) => {
                sent.packets += 1;
                sent.bytes += r.bytes.len() as u64;
                sent.messages += crate::packet::scanned_lines(r.bytes).count() as u64;
            }
            Err(_) => sent.errors += 1,
        }
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}

/// The next batch of up to 32 packets from `packets[*i..]` (in a loop), never past the
/// plan's count, and at a fixed rate no more than a millisecond's worth.
fn next_batch<'p>(
    packets: &'p [(Vec<u8>, u64)],
    i: &mut usize,
    plan: &Plan,
    sent: u64,
) -> Vec<&'p (Vec<u8>, u64)> {
    let mut batch: Vec<&(Vec<u8>, u64)> = Vec::with_capacity(32);
    let mut messages = 0;
    while batch.len() < 32 {
        let p = &packets[*i % packets.len()];
        if plan.count.is_some_and(|c| sent + messages + p.1 > c) && !batch.is_empty() {
            break;
        }
        batch.push(p);
        messages += p.1;
        *i += 1;
        if plan.rate.is_some_and(|r| messages > r / 1000) {
            break;
        }
    }
    batch
}

/// One `sendmmsg`; returns how many packets went out.
fn send_batch(
    fd: i32,
    headers: &mut MultiHeaders<SockaddrStorage>,
    batch: &[&(Vec<u8>, u64)],
) -> usize {
    let iovs: Vec<[IoSlice<'_>; 1]> = batch.iter().map(|(p, _)| [IoSlice::new(p)]).collect();
    let addrs: Vec<Option<SockaddrStorage>> = vec![None; batch.len()];
    match sendmmsg(fd, headers, &iovs, &addrs, [], MsgFlags::empty()) {
        Ok(results) => results.count(),
        Err(_) => 0,
    }
}

/// Messages packed into 8 KiB packets, a pool's worth of packets per batch, as the Unix
/// datagram listener would deliver them, stamped `received_at`: the input of the worker
/// benchmarks.
pub fn batches(
    pool: &crate::packet::Pool,
    messages: &[Vec<u8>],
    received_at: i64,
) -> Vec<crate::packet::Batch> {
    let slot = pool.slot_bytes();
    let mut out = Vec::new();
    let mut batch = pool.get(crate::packet::Transport::Unix);
    let mut at = 0;
    for (packet, _) in pack(messages, slot) {
        if at == pool.slots() {
            out.push(std::mem::replace(
                &mut batch,
                pool.get(crate::packet::Transport::Unix),
            ));
            at = 0;
        }
        // A message longer than a slot would be a truncated datagram: it is cut here.
        let (start, len) = (at * slot, packet.len().min(slot));
        batch.buffer_mut()[start..start + len].copy_from_slice(&packet[..len]);
        batch.push_packet(start, start + len);
        at += 1;
    }
    out.push(batch);
    for b in &mut out {
        b.received_at = received_at;
    }
    out
}

/// `whippet-blast sink`: a receiver that only drains a datagram socket with `recvmmsg` and
/// counts messages; the physical floor the bench compares whippet with. Runs until `stop`
/// is set and the socket is shut down; returns (packets, messages).
pub fn drain(fd: std::os::fd::BorrowedFd<'_>, stop: &std::sync::atomic::AtomicBool) -> (u64, u64) {
    use std::io::IoSliceMut;
    use std::sync::atomic::Ordering::Relaxed;
    const SLOTS: usize = 32;
    const SLOT: usize = 8192;
    let mut buf = vec![0u8; SLOTS * SLOT];
    let mut headers = MultiHeaders::<()>::preallocate(SLOTS, None);
    let (mut packets, mut messages) = (0u64, 0u64);
    loop {
        let mut lens = [0usize; SLOTS];
        let n = {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
                buf.chunks_mut(SLOT).map(|c| [IoSliceMut::new(c)]).collect();
            match nix::sys::socket::recvmmsg(
                fd.as_raw_fd(),
                &mut headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(results) => {
                    let mut n = 0;
                    for r in results {
                        lens[n] = r.bytes;
                        n += 1;
                    }
                    n
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
        };
        if stop.load(Relaxed) && lens[..n].iter().all(|&l| l == 0) {
            break;
        }
        for (i, &len) in lens[..n].iter().enumerate() {
            if len > 0 {
                packets += 1;
                let p = &buf[i * SLOT..i * SLOT + len];
                messages += memchr::memchr_iter(b'\n', p).count() as u64 + 1;
            }
        }
    }
    (packets, messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_pick_their_packet_size() {
        assert_eq!(
            Target::parse("udp:127.0.0.1:8125")
                .unwrap()
                .default_packet_size(),
            1432
        );
        assert_eq!(
            Target::parse("unix:/tmp/s").unwrap(),
            Target::Unix("/tmp/s".into())
        );
        assert_eq!(
            Target::parse("stream:/tmp/s")
                .unwrap()
                .default_packet_size(),
            8192
        );
        assert!(Target::parse("tcp:x").unwrap_err().contains("--target"));
    }
}
