//! systemd integration without libsystemd: `sd_notify` messages (READY, RELOADING,
//! STOPPING, WATCHDOG) over `$NOTIFY_SOCKET` with a std `UnixDatagram`, the watchdog
//! interval from `$WATCHDOG_USEC`, and socket activation from `$LISTEN_FDS`.

use std::net::UdpSocket;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

/// Sends one notification (`READY=1`, `STOPPING=1`, ...) if systemd asked for them; a
/// no-op otherwise. Errors are ignored: notification must never stop whippet.
pub fn notify(state: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        notify_to(&path, state);
    }
}

/// Sends `state` to the notification socket `path` (a path, or `@name` for an abstract one).
pub(crate) fn notify_to(path: &std::ffi::OsStr, state: &str) {
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    // A receiver that stopped reading fills its queue (net.unix.max_dgram_qlen datagrams):
    // give up after a second rather than block the thread that notifies.
    let _ = socket.set_write_timeout(Some(Duration::from_secs(1)));
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket: '@' stands for the leading NUL.
        use std::os::linux::net::SocketAddrExt;
        if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name) {
            let _ = socket.send_to_addr(state.as_bytes(), &addr);
        }
    } else {
        let _ = socket.send_to(state.as_bytes(), path);
    }
}

/// Half of `$WATCHDOG_USEC` when the watchdog is on for this process: how often to send
/// `WATCHDOG=1`.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Sockets systemd passed to this process (socket activation), sorted by kind.
#[derive(Default)]
pub(crate) struct Passed {
    pub udp: Vec<UdpSocket>,
    pub datagram: Option<(UnixDatagram, Option<PathBuf>)>,
    pub stream: Option<(UnixListener, Option<PathBuf>)>,
}

const FIRST_FD: RawFd = 3;

/// Takes the sockets of `$LISTEN_FDS` if `$LISTEN_PID` is this process, and unsets the
/// variables so nothing else takes them. A passed socket of a kind whippet does not serve
/// is an error naming it.
pub(crate) fn listen_fds() -> Result<Passed, crate::Error> {
    let mut passed = Passed::default();
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: RawFd = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !for_us || count <= 0 {
        return Ok(passed);
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Start-up, before any thread is spawned: nothing reads the environment concurrently.
        std::env::remove_var(var);
    }
    for fd in FIRST_FD..FIRST_FD + count {
        // SAFETY: borrowed only to ask whether the fd is open at all.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if nix::fcntl::fcntl(borrowed, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            return Err(crate::Error::Startup(format!(
                "socket activation: LISTEN_FDS={count} but fd {fd} is not open"
            )));
        }
        // SAFETY: the fd is open and ours: systemd passed it, nothing else in the process
        // owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let kind = getsockopt(&owned, sockopt::SockType).map_err(|e| {
            crate::Error::Startup(format!("socket activation: fd {fd} is not a socket: {e}"))
        })?;
        let addr: SockaddrStorage = getsockname(fd).map_err(|e| {
            crate::Error::Startup(format!("socket activation: getsockname on fd {fd}: {e}"))
        })?;
        let path = addr
            .as_unix_addr()
            .and_then(|u| u.path())
            .map(PathBuf::from);
        let _ = nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        match (addr.family(), kind) {
            (Some(AddressFamily::Inet | AddressFamily::Inet6), SockType::Datagram) => {
                passed.udp.push(UdpSocket::from(owned))
            }
            (Some(AddressFamily::Unix), SockType::Datagram) if passed.datagram.is_none() => {
                passed.datagram = Some((UnixDatagram::from(owned), path))
            }
            (Some(AddressFamily::Unix), SockType::Stream) if passed.stream.is_none() => {
                passed.stream = Some((UnixListener::from(owned), path))
            }
            (family, kind) => {
                return Err(crate::Error::Startup(format!(
                    "socket activation: fd {fd} is a {family:?} {kind:?} socket; whippet serves UDP, one Unix datagram and one Unix stream socket (check ListenDatagram=/ListenStream= in whippet.socket)"
                )))
            }
        }
    }
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("whippet-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1");
        let mut buf = [0u8; 64];
        listener.set_nonblocking(true).unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
