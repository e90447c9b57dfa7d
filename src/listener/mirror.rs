//! The mirror (`--forward-host`, `--forward-port`; the Agent's `statsd_forward_host` and
//! `statsd_forward_port`): a best-effort copy of every packet received, on any transport, sent
//! on as a UDP datagram to another StatsD server. Readers copy a batch's packets into a
//! buffer and hand it to the `whippet-mirror` thread without waiting: when the thread is
//! behind and every buffer is taken, the copy is dropped and counted. Memory is bounded by
//! [`BUFFERS`] buffers of one batch each.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use super::copies::{Copies, Drain};
use crate::packet::Batch;
use crate::telemetry::{Counter, Readings, Snapshot};

/// Most copy buffers in existence: queued, being sent, or free. Each holds one batch's bytes
/// (512 KiB at most), so the mirror holds 4 MiB at most.
pub const BUFFERS: usize = 8;

/// The mirror's counters.
#[derive(Debug, Default)]
pub struct MirrorCounters {
    /// Packets sent on.
    pub sent: Counter,
    /// Packets not copied: every buffer was taken.
    pub dropped: Counter,
    /// Packets the send of failed.
    pub errors: Counter,
}

impl Readings for MirrorCounters {
    fn read(&self, out: &mut Snapshot) {
        for (result, c) in [
            ("sent", &self.sent),
            ("dropped", &self.dropped),
            ("error", &self.errors),
        ] {
            out.counter(
                "whippet_mirror_packets_total",
                &[("result", result)],
                c.get(),
            );
        }
    }
}

/// The readers' side: where copies go.
pub struct Mirror {
    copies: Copies,
    counters: Arc<MirrorCounters>,
}

impl Mirror {
    /// Starts the `whippet-mirror` thread sending to `to`. It ends once every reader has
    /// let go of the mirror and what was queued is sent.
    pub fn start(to: SocketAddr, counters: Arc<MirrorCounters>) -> std::io::Result<Arc<Mirror>> {
        let bind: SocketAddr = if to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(to)?;
        let (copies, drain) = Copies::new(BUFFERS);
        let c = counters.clone();
        std::thread::Builder::new()
            .name("whippet-mirror".into())
            .spawn(move || send_all(&socket, &drain, &c))?;
        Ok(Arc::new(Mirror { copies, counters }))
    }

    /// Copies the packets of `batch` for the mirror thread, or counts them dropped when
    /// every buffer is taken. Never waits.
    pub fn copy(&self, batch: &Batch) {
        let packets = batch.packet_count() as u64;
        if packets > 0 && !self.copies.copy(batch, 0) {
            self.counters.dropped.add(packets);
        }
    }
}

/// The mirror thread: sends each copied packet as one datagram and gives the buffer back.
fn send_all(socket: &UdpSocket, drain: &Drain, c: &MirrorCounters) {
    for copy in &drain.rx {
        for p in copy.packets() {
            match socket.send(p) {
                Ok(_) => c.sent.add(1),
                Err(_) => c.errors.add(1),
            }
        }
        drain.recycle(copy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Pool, Transport};
    use std::time::Duration;

    fn batch(pool: &Pool, packets: &[&[u8]]) -> Batch {
        let mut b = pool.get(Transport::Udp);
        let mut at = 0;
        for p in packets {
            b.buffer_mut()[at..at + p.len()].copy_from_slice(p);
            b.push_packet(at, at + p.len());
            at += p.len();
        }
        b
    }

    #[test]
    fn every_packet_is_sent_on_as_one_datagram() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let counters = Arc::new(MirrorCounters::default());
        let mirror = Mirror::start(receiver.local_addr().unwrap(), counters.clone()).unwrap();
        let pool = Pool::new(1024, 2);
        mirror.copy(&batch(&pool, &[b"a:1|c", b"b:2|g\nc:3|c"]));
        mirror.copy(&batch(&pool, &[]));
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            let n = receiver.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        assert_eq!(got, ["a:1|c", "b:2|g\nc:3|c"]);
        drop(mirror);
        crate::blast::process::poll_until(
            "the sent counter",
            crate::blast::process::DEADLINE,
            || counters.sent.get() == 2,
        );
        assert_eq!((counters.dropped.get(), counters.errors.get()), (0, 0));
    }
}
