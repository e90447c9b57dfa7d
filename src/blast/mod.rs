//! The load generator behind `whippet-blast`: workloads (a corpus file, or generated traffic
//! with contexts, tags, type mix and size as knobs), packing messages into packets, and
//! sending them over UDP, a Unix datagram socket or a Unix stream socket with `sendmmsg`, at
//! a rate or as fast as possible. [`bench`] drives whippet with it and measures.

pub mod bench;

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

/// A tiny deterministic generator (xorshift64*): reproducible workloads without a crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Knobs of a generated workload.
#[derive(Debug, Clone)]
pub struct Generated {
    pub contexts: usize,
    pub tags_per_message: usize,
    /// Relative weights of count, gauge, distribution, set, histogram (dsd_base: 208, 66, 72, 9, 1).
    pub mix: [u32; 5],
    /// Length of tag values.
    pub tag_value_len: usize,
    /// Distinct messages to generate (they are replayed in a loop).
    pub messages: usize,
    pub seed: u64,
}

impl Default for Generated {
    fn default() -> Generated {
        Generated {
            contexts: 3000,
            tags_per_message: 10,
            mix: [208, 66, 72, 9, 1],
            tag_value_len: 12,
            messages: 20_000,
            seed: 7,
        }
    }
}

fn word(rng: &mut Rng, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize] as char)
        .collect()
}

/// Generates `g.messages` messages over `g.contexts` contexts (each context has a fixed name,
/// tags and type; values vary).
pub fn generate(g: &Generated) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(g.seed);
    let total: u32 = g.mix.iter().sum::<u32>().max(1);
    let types = ["c", "g", "d", "s", "h"];
    let contexts: Vec<(String, &str)> = (0..g.contexts.max(1))
        .map(|i| {
            let mut pick = rng.below(total as u64) as u32;
            let mut kind = 0;
            while pick >= g.mix[kind] {
                pick -= g.mix[kind];
                kind += 1;
            }
            let tags: Vec<String> = (0..g.tags_per_message)
                .map(|t| format!("tag{t}:{}", word(&mut rng, g.tag_value_len)))
                .collect();
            (format!("blast.metric.{i}|{}", tags.join(",")), types[kind])
        })
        .collect();
    (0..g.messages)
        .map(|_| {
            let (key, kind) = &contexts[rng.below(contexts.len() as u64) as usize];
            let (name, tags) = key.split_once('|').unwrap_or((key, ""));
            let value = rng.below(1000);
            format!("{name}:{value}|{kind}|#{tags}").into_bytes()
        })
        .collect()
}

/// Reads a corpus: one message per line, empty lines skipped.
pub fn corpus(path: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read(path)
        .map_err(|e| format!("cannot read corpus {} (--corpus): {e}", path.display()))?;
    let messages: Vec<Vec<u8>> = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    if messages.is_empty() {
        return Err(format!("corpus {} has no messages", path.display()));
    }
    Ok(messages)
}

/// Messages packed into packets of at most `size` bytes (a longer message gets a packet of
/// its own), with the number of messages in each.
pub fn pack(messages: &[Vec<u8>], size: usize) -> Vec<(Vec<u8>, u64)> {
    let mut packets = Vec::new();
    let mut cur = Vec::with_capacity(size);
    let mut n = 0;
    for m in messages {
        if !cur.is_empty() && cur.len() + 1 + m.len() > size {
            packets.push((std::mem::take(&mut cur), n));
            n = 0;
        }
        if !cur.is_empty() {
            cur.push(b'\n');
        }
        cur.extend_from_slice(m);
        n += 1;
    }
    if !cur.is_empty() {
        packets.push((cur, n));
    }
    packets
}

/// How much to send.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Messages per second; `None` is as fast as possible.
    pub rate: Option<u64>,
    pub duration: Option<Duration>,
    /// Messages to send at most.
    pub count: Option<u64>,
}

/// What a send did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sent {
    pub messages: u64,
    pub packets: u64,
    pub bytes: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Sent {
    pub fn per_second(&self, n: u64) -> f64 {
        n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Datagram sockets are connected, so `sendmmsg` needs no addresses.
enum Socket {
    Udp(UdpSocket),
    Unix(UnixDatagram),
    Stream(UnixStream),
}

/// Sends `packets` in a loop according to `plan`.
pub fn send(target: &Target, packets: &[(Vec<u8>, u64)], plan: Plan) -> Result<Sent, String> {
    let socket = match target {
        Target::Udp(addr) => {
            let s = UdpSocket::bind(if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            })
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
    };
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
        // A batch of up to 32 packets, not past the count.
        let mut batch: Vec<&(Vec<u8>, u64)> = Vec::with_capacity(32);
        let mut batch_messages = 0;
        while batch.len() < 32 {
            let p = &packets[i % packets.len()];
            if plan
                .count
                .is_some_and(|c| sent.messages + batch_messages + p.1 > c)
                && !batch.is_empty()
            {
                break;
            }
            batch.push(p);
            batch_messages += p.1;
            i += 1;
            if plan.rate.is_some_and(|r| batch_messages > r / 1000) {
                break;
            }
        }
        let delivered = match &socket {
            Socket::Udp(s) => send_batch(s.as_raw_fd(), &mut headers, &batch),
            Socket::Unix(s) => send_batch(s.as_raw_fd(), &mut headers, &batch),
            Socket::Stream(s) => {
                stream_buf.clear();
                for (p, _) in &batch {
                    stream_buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
                    stream_buf.extend_from_slice(p);
                }
                let mut s = s;
                match s.write_all(&stream_buf) {
                    Ok(()) => batch.len(),
                    Err(e) => return Err(format!("stream write failed: {e}")),
                }
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

    #[test]
    fn messages_pack_into_packets_without_splitting_any() {
        let messages: Vec<Vec<u8>> = ["aaaa", "bbbb", "cccc", "dddddddddddd"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let packets = pack(&messages, 10);
        let got: Vec<(&[u8], u64)> = packets.iter().map(|(p, n)| (&p[..], *n)).collect();
        assert_eq!(
            got,
            [(&b"aaaa\nbbbb"[..], 2), (b"cccc", 1), (b"dddddddddddd", 1)]
        );
    }

    #[test]
    fn generated_workloads_are_reproducible_and_parse() {
        let g = Generated {
            contexts: 50,
            messages: 500,
            ..Generated::default()
        };
        let a = generate(&g);
        assert_eq!(a, generate(&g));
        for m in &a {
            assert!(
                crate::parser::parse(m).is_ok(),
                "{}",
                String::from_utf8_lossy(m)
            );
        }
        let names: std::collections::BTreeSet<&[u8]> = a
            .iter()
            .map(|m| m.split(|&b| b == b':').next().unwrap())
            .collect();
        assert!(names.len() <= 50 && names.len() > 40, "{}", names.len());
    }
}
