//! The retry directory (`--retry-dir`): payloads the memory queue cannot hold, and those
//! still waiting at shutdown, wait here as one file each until the intake takes them, oldest
//! first, across restarts. Bounded by `--retry-dir-bytes`: the oldest file gives way.
//!
//! A file is `<sequence, 16 hex digits>.payload`: one header line
//! `whippet-payload 1 <endpoint path> <compression> <items>` and the compressed body. It is
//! written to a `.tmp` name and renamed, so a crash never leaves half a payload under a name
//! that would be replayed. The directory is locked (`flock` on `.lock`) so two daemons never
//! send the same files.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

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
        fs::create_dir_all(dir).map_err(|e| fail("create the directory", &e))?;
        let lock_file = File::create(dir.join(".lock")).map_err(|e| fail("create .lock", &e))?;
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
                let _ = fs::remove_file(file.path());
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".payload")
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            else {
                continue;
            };
            match read_header(&file.path()) {
                Ok((endpoint, _, _)) => {
                    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                    disk.entries.push_back(Entry {
                        seq,
                        endpoint,
                        bytes,
                    });
                    disk.bytes += bytes;
                    disk.next_seq = disk.next_seq.max(seq + 1);
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
            let mut f = File::create(&tmp)?;
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
        let raw = fs::read(self.path(e.seq))?;
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

    /// A taken entry is settled (sent, or dropped and counted): its file goes.
    pub(crate) fn done(&mut self, e: &Entry) {
        let _ = fs::remove_file(self.path(e.seq));
    }

    /// A taken entry must wait again: back to the front, as the oldest.
    pub(crate) fn restore(&mut self, e: Entry) {
        self.bytes += e.bytes;
        let at = self.entries.partition_point(|x| x.seq < e.seq);
        self.entries.insert(at, e);
    }

    fn forget(&mut self, e: &Entry) {
        self.bytes -= e.bytes;
        let _ = fs::remove_file(self.path(e.seq));
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016x}.payload"))
    }
}

fn read_header(path: &Path) -> io::Result<(Endpoint, Compression, usize)> {
    let mut line = Vec::new();
    io::BufReader::new(File::open(path)?)
        .take(512)
        .read_until(b'\n', &mut line)?;
    parse_header(line.strip_suffix(b"\n").unwrap_or(&line))
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
mod tests {
    use super::*;

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
        disk.done(&a);
        // An endpoint backing off is skipped, not blocked on.
        assert_eq!(disk.take(|e| e != Endpoint::Events), None);
        let b = disk.take(|_| true).unwrap();
        assert_eq!(disk.read(&b).unwrap().body, b"second");
        disk.done(&b);
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
