//! Unix sockets on the filesystem: preparing the path (a stale socket file is replaced, a live
//! one or a non-socket file is a startup error naming the flag), binding the datagram socket,
//! and setting the file mode.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::Path;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

use crate::Error;

/// Which kind of socket a path is for: decides how "is someone listening?" is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketKind {
    Datagram,
    Stream,
}

/// Makes `path` free to bind: removes a stale socket file; refuses a live socket or a file
/// that is not a socket.
pub(crate) fn prepare_path(path: &Path, kind: SocketKind, flag: &str) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::Startup(format!(
                "cannot inspect {} ({flag}): {e}",
                path.display()
            )))
        }
    };
    if !meta.file_type().is_socket() {
        return Err(Error::Startup(format!(
            "{} exists and is not a socket; remove it or choose another path with {flag}",
            path.display()
        )));
    }
    let live = match kind {
        SocketKind::Datagram => UnixDatagram::unbound()
            .and_then(|s| s.connect(path))
            .is_ok(),
        SocketKind::Stream => UnixStream::connect(path).is_ok(),
    };
    if live {
        return Err(Error::Startup(format!(
            "another process is listening on {}; stop it or choose another path with {flag}",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(|e| {
        Error::Startup(format!(
            "cannot remove stale socket {} ({flag}): {e}",
            path.display()
        ))
    })
}

/// Sets the socket file's permission bits (`--socket-mode`).
pub(crate) fn set_mode(path: &Path, mode: u32, flag: &str) -> Result<(), Error> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        Error::Startup(format!(
            "cannot set mode {mode:o} on {} ({flag}): {e}",
            path.display()
        ))
    })
}

/// Binds the Unix datagram socket at `path` with `mode` and receive buffer `rcvbuf` (0 = OS
/// default). Returns the socket and the effective receive buffer.
pub(crate) fn bind_datagram(
    path: &Path,
    mode: u32,
    rcvbuf: usize,
) -> Result<(UnixDatagram, usize), Error> {
    prepare_path(path, SocketKind::Datagram, "--socket")?;
    let socket = UnixDatagram::bind(path)
        .map_err(|e| super::bind_error("--socket", &path.display().to_string(), e))?;
    set_mode(path, mode, "--socket-mode")?;
    if rcvbuf > 0 {
        setsockopt(&socket, sockopt::RcvBuf, &rcvbuf).map_err(|e| {
            Error::Startup(format!("cannot set SO_RCVBUF ({rcvbuf}) on --socket: {e}"))
        })?;
    }
    let effective = getsockopt(&socket, sockopt::RcvBuf).unwrap_or(0);
    Ok((socket, effective))
}

/// Binds the Unix stream socket at `path` with `mode`.
pub(crate) fn bind_stream(path: &Path, mode: u32) -> Result<UnixListener, Error> {
    prepare_path(path, SocketKind::Stream, "--stream-socket")?;
    let listener = UnixListener::bind(path)
        .map_err(|e| super::bind_error("--stream-socket", &path.display().to_string(), e))?;
    set_mode(path, mode, "--socket-mode")?;
    Ok(listener)
}
