//! The retry directory (`--retry-dir`): payloads the memory queue cannot hold, and those
//! still waiting at shutdown, wait here as one file each until the intake takes them, oldest
//! first, across restarts. Bounded by `--retry-dir-bytes`: the oldest file gives way.
//!
//! A file is `<sequence, 16 hex digits>.payload`: one header line
//! `whippet-payload 1 <endpoint path> <compression> <items>` and the compressed body. It is
//! written to a `.tmp` name and renamed, so a crash never leaves half a payload under a name
//! that would be replayed. The directory is locked (`flock` on `.lock`) so two daemons never
//! send the same files.
//!
//! Nothing in the directory is trusted: it is created 0700 and files 0600; a directory that
//! another user owns or that group or others may write is refused; nothing is opened through
//! a symbolic link; only regular files owned by whippet's user are read, and they are opened
//! without blocking, so a FIFO is skipped, never waited on. A payload whose file cannot be
//! deleted once settled is emptied instead (an empty payload file is a spent one), so it is
//! never sent again.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::libc;

use crate::serializer::{Compression, Endpoint, Payload};

const MAGIC: &str = "whippet-payload 1";

/// One payload on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub seq: u64,
    pub endpoint: Endpoint,
    pub bytes: u64,
}

/// The retry directory and an index of its payloads, oldest first.
#[derive(Debug)]
pub(crate) struct Disk {
    dir: PathBuf,
    _lock: Flock<File>,
    entries: VecDeque<Entry>,
    bytes: u64,
    limit: u64,
    next_seq: u64,
}

/// What opening the directory found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Found {
    pub payloads: usize,
    pub bytes: u64,
    /// Files that were not whole payloads (removed).
    pub unreadable: usize,
    /// Entries named like payloads that are not regular files of whippet's user (left
    /// alone, never read).
    pub foreign: usize,
}

/// Opens `path` for reading without following a symbolic link or blocking on a FIFO, and
/// only if it is a regular file owned by this process's user.
fn open_own(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other("not a regular file of whippet's user"));
    }
    Ok(file)
}

/// Creates `path`, which must not exist (not even as a link), for writing, mode 0600.
fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Refuses a retry directory another user could fill or read: it must be a directory owned
/// by this process's user that group and others may not write.
fn check_dir(dir: &Path) -> Result<(), String> {
    let meta = fs::metadata(dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!(
            "owned by uid {}, not whippet's user (uid {})",
            meta.uid(),
            nix::unistd::geteuid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "group or others may write it (mode {mode:04o}); chmod 700 it"
        ));
    }
    Ok(())
}

impl Disk {
    /// Creates `dir` if needed, locks it and indexes the payloads already there.
    pub(crate) fn open(dir: &Path, limit: u64) -> Result<(Disk, Found), String> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!(
                "--retry-dir {}: cannot {what}: {e}; set --retry-dir (WHIPPET_RETRY_DIR) to a directory whippet's user may write, or leave it unset",
                dir.display()
            )
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail("create the directory", &e))?;
        check_dir(dir).map_err(|e| fail("use it", &e))?;
        // Never truncated, never through a link: .lock only carries the flock.
        let lock_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dir.join(".lock"))
            .map_err(|e| fail("open .lock (a symbolic link is refused)", &e))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| fail("lock it (is another whippet using it?)", &e))?;
        let mut disk = Disk {
            dir: dir.to_path_buf(),
            _lock: lock,
            entries: VecDeque::new(),
            bytes: 0,
            limit,
            next_seq: 0,
        };
        let mut found = Found::default();
        let listing = fs::read_dir(dir).map_err(|e| fail("list it", &e))?;
        for file in listing.filter_map(|f| f.ok()) {
            let name = file.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                // A write a crash interrupted: never renamed, never promised to anyone.
                // (Unlinking a name never touches what a link there points at.)
                let _ = fs::remove_file(file.path());
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".payload")
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            else {
                continue;
            };
            // Not following links: a link, FIFO or device is not a payload.
            let own = file
                .metadata()
                .is_ok_and(|m| m.is_file() && m.uid() == nix::unistd::geteuid().as_raw());
            if !own {
                found.foreign += 1;
                continue;
            }
            disk.next_seq = disk.next_seq.max(seq + 1);
            match read_header(&file.path()) {
                Ok(None) => {
                    // Spent: sent, but its file could not be deleted then.
                    let _ = fs::remove_file(file.path());
                }
                Ok(Some((endpoint, _, _))) => {
                    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                    disk.entries.push_back(Entry {
                        seq,
                        endpoint,
                        bytes,
                    });
                    disk.bytes += bytes;
                }
                Err(_) => {
                    let _ = fs::remove_file(file.path());
                    found.unreadable += 1;
                }
            }
        }
        disk.entries.make_contiguous().sort_by_key(|e| e.seq);
        found.payloads = disk.entries.len();
        found.bytes = disk.bytes;
        Ok((disk, found))
    }

    /// Bytes of payloads on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes `p` as the newest payload. Older payloads that no longer fit the bound are
    /// removed first; their endpoints are returned so they can be counted. A payload larger
    /// than the whole bound is not written (`Err`).
    pub fn push(&mut self, p: &Payload) -> io::Result<Vec<Endpoint>> {
        let header = format!(
            "{MAGIC} {} {} {}\n",
            p.endpoint.path(),
            p.compression.header().unwrap_or("none"),
            p.items
        );
        let size = (header.len() + p.body.len()) as u64;
        if size > self.limit {
            return Err(io::Error::other("larger than --retry-dir-bytes"));
        }
        let mut dropped = Vec::new();
        while self.bytes + size > self.limit {
            let Some(oldest) = self.entries.pop_front() else {
                break;
            };
            self.forget(&oldest);
            dropped.push(oldest.endpoint);
        }
        let seq = self.next_seq;
        let path = self.path(seq);
        let tmp = path.with_extension("tmp");
        let written = (|| {
            // Whatever sits at the temporary name (a link planted there) goes; the new
            // file is created, never opened through it.
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut f = create_new(&tmp)?;
            f.write_all(header.as_bytes())?;
            f.write_all(&p.body)?;
            f.sync_data()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.next_seq += 1;
        self.bytes += size;
        self.entries.push_back(Entry {
            seq,
            endpoint: p.endpoint,
            bytes: size,
        });
        Ok(dropped)
    }

    /// Takes the oldest entry whose endpoint `ready` accepts out of the index (its file
    /// stays until [`Disk::done`] or [`Disk::restore`]).
    pub fn take(&mut self, ready: impl Fn(Endpoint) -> bool) -> Option<Entry> {
        let i = self.entries.iter().position(|e| ready(e.endpoint))?;
        let e = self.entries.remove(i)?;
        self.bytes -= e.bytes;
        Some(e)
    }

    /// Reads the payload of a taken entry.
    pub fn read(&self, e: &Entry) -> io::Result<Payload> {
        let mut raw = Vec::new();
        open_own(&self.path(e.seq))?.read_to_end(&mut raw)?;
        let nl = raw
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| io::Error::other("no header"))?;
        let (endpoint, compression, items) = parse_header(&raw[..nl])?;
        Ok(Payload {
            endpoint,
            body: raw[nl + 1..].to_vec(),
            compression,
            items,
        })
    }

    /// A taken entry is settled (sent, or dropped and counted): its file goes. When it
    /// cannot be deleted it is emptied, which marks it spent (`Ok(Some(why))`: never sent
    /// again, but the file stays); `Err` when neither worked, and the payload would be sent
    /// again after a restart.
    pub(crate) fn done(&mut self, e: &Entry) -> io::Result<Option<io::Error>> {
        let path = self.path(e.seq);
        let removed = remove(&path);
        match removed {
            Ok(()) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(removing) => {
                let emptied = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&path)
                    .and_then(|f| f.set_len(0));
                match emptied {
                    Ok(()) => Ok(Some(removing)),
                    Err(e) => Err(io::Error::other(format!(
                        "cannot delete it ({removing}) nor empty it ({e})"
                    ))),
                }
            }
        }
    }

    /// A taken entry must wait again: back to the front, as the oldest.
    pub(crate) fn restore(&mut self, e: Entry) {
        self.bytes += e.bytes;
        let at = self.entries.partition_point(|x| x.seq < e.seq);
        self.entries.insert(at, e);
    }

    fn forget(&mut self, e: &Entry) {
        self.bytes -= e.bytes;
        let _ = remove(&self.path(e.seq));
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016x}.payload"))
    }
}

/// Deletes a payload file (in tests, fails while [`tests::READ_ONLY`] is set, as in a
/// read-only directory, which root, running the tests in CI, would not meet).
fn remove(path: &Path) -> io::Result<()> {
    #[cfg(test)]
    if tests::READ_ONLY.with(|r| r.get()) {
        return Err(io::Error::from(io::ErrorKind::PermissionDenied));
    }
    fs::remove_file(path)
}

/// The header of the payload file at `path`, or `None` for an empty (spent) file.
fn read_header(path: &Path) -> io::Result<Option<(Endpoint, Compression, usize)>> {
    let mut line = Vec::new();
    io::BufReader::new(open_own(path)?)
        .take(512)
        .read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    parse_header(line.strip_suffix(b"\n").unwrap_or(&line)).map(Some)
}

fn parse_header(line: &[u8]) -> io::Result<(Endpoint, Compression, usize)> {
    let bad = || io::Error::other("not a whippet payload header");
    let line = std::str::from_utf8(line).map_err(|_| bad())?;
    let rest = line.strip_prefix(MAGIC).ok_or_else(bad)?;
    let mut parts = rest.split_whitespace();
    let endpoint = parts
        .next()
        .and_then(|p| Endpoint::ALL.into_iter().find(|e| e.path() == p))
        .ok_or_else(bad)?;
    let compression = parts.next().and_then(Compression::parse).ok_or_else(bad)?;
    let items = parts.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
    Ok((endpoint, compression, items))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    thread_local! {
        /// Makes [`remove`] fail, as in a read-only directory.
        pub(crate) static READ_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_directory_and_its_files_are_private_and_a_writable_directory_is_refused() {
        let dir = temp_dir("modes");
        let (mut disk, _) = Disk::open(&dir, 1 << 20).unwrap();
        disk.push(&payload(Endpoint::SeriesV2, b"x")).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(".lock")), 0o600);
        assert_eq!(mode(&disk.path(0)), 0o600);
        drop(disk);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let e = Disk::open(&dir, 1 << 20).unwrap_err();
        assert!(
            e.contains("group or others may write it (mode 0777)"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn links_in_the_directory_are_never_followed() {
        let dir = temp_dir("links");
        let outside = temp_dir("links-outside");
        fs::create_dir_all(&outside).unwrap();
        let victim = outside.join("victim");
        fs::write(&victim, b"precious").unwrap();
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        // A .lock link would have truncated its target.
        symlink(&victim, dir.join(".lock")).unwrap();
        let e = Disk::open(&dir, 1 << 20).unwrap_err();
        assert!(e.contains("open .lock"), "{e}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        fs::remove_file(dir.join(".lock")).unwrap();
        // A link planted at the next temporary name would have received the payload; one
        // named like a payload is not read.
        let (mut disk, _) = Disk::open(&dir, 1 << 20).unwrap();
        symlink(&victim, disk.path(0).with_extension("tmp")).unwrap();
        disk.push(&payload(Endpoint::SeriesV2, b"payload")).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        symlink(&victim, dir.join("00000000000000aa.payload")).unwrap();
        drop(disk);
        let (mut disk, found) = Disk::open(&dir, 1 << 20).unwrap();
        assert_eq!((found.payloads, found.foreign), (1, 1));
        let e = disk.take(|_| true).unwrap();
        assert_eq!(disk.read(&e).unwrap().body, b"payload");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn a_fifo_named_like_a_payload_is_skipped_not_waited_on() {
        let dir = temp_dir("fifo");
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let fifo = dir.join("0000000000000001.payload");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Opening it for reading would block until a writer came: this returns at once.
        let (mut disk, found) = Disk::open(&dir, 1 << 20).unwrap();
        assert_eq!((found.payloads, found.foreign, found.unreadable), (0, 1, 0));
        assert!(disk.take(|_| true).is_none());
        // And one swapped in for an indexed payload is refused, not waited on.
        disk.push(&payload(Endpoint::SeriesV2, b"x")).unwrap();
        let e = disk.take(|_| true).unwrap();
        fs::remove_file(disk.path(e.seq)).unwrap();
        nix::unistd::mkfifo(&disk.path(e.seq), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(disk.read(&e).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_payload_whose_file_cannot_be_deleted_is_never_sent_again() {
        let dir = temp_dir("undeletable");
        let (mut disk, _) = Disk::open(&dir, 1 << 20).unwrap();
        for body in [b"a", b"b", b"c", b"d"] {
            disk.push(&payload(Endpoint::SeriesV2, body)).unwrap();
        }
        READ_ONLY.with(|r| r.set(true));
        // All four are sent; none of their files can be deleted.
        while let Some(e) = disk.take(|_| true) {
            disk.read(&e).unwrap();
            // Not deleted, but emptied: spent.
            assert!(disk.done(&e).unwrap().is_some());
        }
        READ_ONLY.with(|r| r.set(false));
        drop(disk);
        let (mut disk, found) = Disk::open(&dir, 1 << 20).unwrap();
        assert_eq!((found.payloads, found.unreadable), (0, 0));
        assert!(disk.take(|_| true).is_none());
        // The spent files are gone now that deleting works, and numbering moved on.
        disk.push(&payload(Endpoint::SeriesV2, b"e")).unwrap();
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".payload"))
            .collect();
        assert_eq!(names, ["0000000000000004.payload"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn payload(endpoint: Endpoint, body: &[u8]) -> Payload {
        Payload {
            endpoint,
            body: body.to_vec(),
            compression: Compression::Zstd,
            items: 3,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("whippet-disk-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn payloads_survive_a_reopen_in_order_and_read_back_whole() {
        let dir = temp_dir("reopen");
        {
            let (mut disk, found) = Disk::open(&dir, 1 << 20).unwrap();
            assert_eq!(found, Found::default());
            disk.push(&payload(Endpoint::SeriesV2, b"first")).unwrap();
            disk.push(&payload(Endpoint::Events, b"second")).unwrap();
        }
        fs::write(dir.join("00000000000000ff.payload"), b"garbage").unwrap();
        fs::write(dir.join("0000000000000100.tmp"), b"half").unwrap();
        let (mut disk, found) = Disk::open(&dir, 1 << 20).unwrap();
        assert_eq!((found.payloads, found.unreadable), (2, 1));
        assert!(!dir.join("0000000000000100.tmp").exists());
        let a = disk.take(|_| true).unwrap();
        let p = disk.read(&a).unwrap();
        assert_eq!(
            (p.endpoint, &p.body[..], p.items),
            (Endpoint::SeriesV2, &b"first"[..], 3)
        );
        assert_eq!(p.compression, Compression::Zstd);
        // Back to the front, then taken again before the newer one.
        disk.restore(a);
        assert_eq!(disk.take(|_| true), Some(a));
        assert!(disk.done(&a).unwrap().is_none());
        // An endpoint backing off is skipped, not blocked on.
        assert_eq!(disk.take(|e| e != Endpoint::Events), None);
        let b = disk.take(|_| true).unwrap();
        assert_eq!(disk.read(&b).unwrap().body, b"second");
        assert!(disk.done(&b).unwrap().is_none());
        assert_eq!((disk.len(), disk.bytes()), (0, 0));
        drop(disk);
        let (_, found) = Disk::open(&dir, 1 << 20).unwrap();
        assert_eq!(found.payloads, 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_oldest_gives_way_to_the_bound_and_a_second_daemon_is_refused() {
        let dir = temp_dir("bound");
        let header = format!("{MAGIC} /api/v2/series zstd 3\n").len() as u64;
        let (mut disk, _) = Disk::open(&dir, 2 * (header + 10)).unwrap();
        assert!(Disk::open(&dir, 1).unwrap_err().contains("another whippet"));
        assert_eq!(
            disk.push(&payload(Endpoint::SeriesV2, &[1; 10])).unwrap(),
            []
        );
        assert_eq!(
            disk.push(&payload(Endpoint::SeriesV2, &[2; 10])).unwrap(),
            []
        );
        assert_eq!(
            disk.push(&payload(Endpoint::SeriesV2, &[3; 10])).unwrap(),
            [Endpoint::SeriesV2]
        );
        assert!(disk.push(&payload(Endpoint::SeriesV2, &[0; 100])).is_err());
        let first = disk.take(|_| true).unwrap();
        assert_eq!(disk.read(&first).unwrap().body, [2; 10]);
        assert_eq!(disk.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
