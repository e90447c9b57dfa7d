//! UDP: `--udp-readers` sockets bound to one address with `SO_REUSEPORT`, so the kernel spreads
//! datagrams across readers, each with its own `--so-rcvbuf` receive buffer.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, getsockopt, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
    SockaddrStorage,
};

use crate::telemetry::{Readings, Snapshot};
use crate::Error;

/// Binds `readers` sockets on `addr` (port 0: the OS picks one port for all of them).
/// Returns the sockets and the effective receive buffer size.
pub(crate) fn bind_all(
    addr: SocketAddr,
    readers: usize,
    rcvbuf: usize,
) -> Result<(Vec<UdpSocket>, usize), Error> {
    let mut sockets: Vec<UdpSocket> = Vec::with_capacity(readers);
    let mut bound = addr;
    let mut effective = 0;
    for _ in 0..readers.max(1) {
        let (socket, eff) = bind_one(bound, rcvbuf)
            .map_err(|e| super::bind_error("--udp", &format!("UDP {bound}"), e))?;
        bound = socket
            .local_addr()
            .map_err(|e| super::bind_error("--udp", "UDP", e))?;
        effective = eff;
        sockets.push(socket);
    }
    Ok((sockets, effective))
}

fn bind_one(addr: SocketAddr, rcvbuf: usize) -> std::io::Result<(UdpSocket, usize)> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    if rcvbuf > 0 {
        // The kernel caps this at net.core.rmem_max; the effective value is reported.
        setsockopt(&fd, sockopt::RcvBuf, &rcvbuf)?;
    }
    let effective = getsockopt(&fd, sockopt::RcvBuf)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok((UdpSocket::from(fd), effective))
}

/// The kernel's drop count of whippet's UDP sockets, read when a snapshot is taken.
pub(crate) struct KernelDrops {
    inodes: Vec<u64>,
}

impl KernelDrops {
    pub fn of(sockets: &[std::sync::Arc<UdpSocket>]) -> KernelDrops {
        KernelDrops {
            inodes: sockets.iter().map(|s| inode(s)).collect(),
        }
    }
}

impl Readings for KernelDrops {
    fn read(&self, out: &mut Snapshot) {
        out.gauge("whippet_udp_kernel_drops", &[], kernel_drops(&self.inodes));
    }
}

/// Datagrams the kernel dropped on these sockets because their receive buffers were full
/// (the `drops` column of `/proc/net/udp{,6}` for our socket inodes).
fn kernel_drops(inodes: &[u64]) -> u64 {
    let mut total = 0;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:tm retrnsmt uid timeout inode ref pointer drops
            if cols.len() >= 13 {
                if let (Ok(inode), Ok(drops)) = (cols[9].parse::<u64>(), cols[12].parse::<u64>()) {
                    if inodes.contains(&inode) {
                        total += drops;
                    }
                }
            }
        }
    }
    total
}

/// The inode of a socket, to find it in `/proc/net/udp`.
fn inode(socket: &UdpSocket) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd())).map_or(0, |m| m.ino())
}
