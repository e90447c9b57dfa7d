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
    if addr.port() == 0 {
        // Linux may give a SO_REUSEPORT socket bound to port 0 a port that another such
        // socket of the same user holds, and then split datagrams between the two processes.
        // A plain socket is given a port nobody holds: take that one.
        let probe = UdpSocket::bind(addr).map_err(|e| super::bind_error("--udp", "UDP", e))?;
        bound = probe
            .local_addr()
            .map_err(|e| super::bind_error("--udp", "UDP", e))?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_binds_every_reader_to_one_port_no_other_socket_holds() {
        let (sockets, _) = bind_all("127.0.0.1:0".parse().unwrap(), 3, 0).unwrap();
        let ports: Vec<u16> = sockets
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect();
        assert_ne!(ports[0], 0);
        assert_eq!(ports, [ports[0]; 3]);
        // Held with SO_REUSEPORT by this process's readers only: a plain socket cannot join.
        let taken = UdpSocket::bind(("127.0.0.1", ports[0])).unwrap_err();
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    }
}
