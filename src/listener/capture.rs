//! Capture (SIGUSR2): a running whippet records the raw packets it receives, with their
//! transport and arrival time, to a file in `--capture-dir` for `--capture-seconds` (a second
//! SIGUSR2 ends it early); `whippet-blast replay` sends them again. The format is in
//! docs/capture.md.
//!
//! Memory is bounded: readers copy each batch into one of a fixed number of buffers
//! (`--capture-memory`) and never wait for the writer; when the disk is slow or full and the
//! buffers are all taken, packets are left out of the capture and counted, and nothing
//! accumulates. A file stops growing at `--capture-file-bytes`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender, TrySendError};

use super::copies::{Copies, Copy, Drain};
use crate::log;
use crate::packet::{Batch, Transport, BATCH_BYTES};
use crate::telemetry::{Counter, Label, Readings, Snapshot};

/// The first bytes of a capture file: the format and its version.
pub const MAGIC: &[u8; 8] = b"WHIPCAP1";
/// Bytes before each packet: arrival (8), transport (1), length (4).
const RECORD_HEAD: usize = 13;

/// Where and how much a capture records.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureSettings {
    pub dir: PathBuf,
    pub duration: Duration,
    /// `--capture-memory`: bytes of copies waiting for the disk.
    pub memory: usize,
    /// `--capture-file-bytes`: the most one file grows to.
    pub file_bytes: u64,
}

/// Counters of every capture.
#[derive(Debug, Default)]
pub struct CaptureCounters {
    pub captures: Counter,
    /// Packets written to a capture file.
    pub written: Counter,
    /// Packets left out: no free buffer, a failed write, or the file at its size limit.
    pub skipped: Counter,
}

impl Readings for CaptureCounters {
    fn read(&self, out: &mut Snapshot) {
        out.counter("whippet_captures_total", &[], self.captures.get());
        for (result, c) in [("written", &self.written), ("skipped", &self.skipped)] {
            out.counter(
                "whippet_capture_packets_total",
                &[("result", result)],
                c.get(),
            );
        }
    }
}

/// What readers record into, and what starts and stops captures.
pub struct Capture {
    settings: CaptureSettings,
    copies: Copies,
    drain: Arc<Drain>,
    /// Whether readers copy batches now, and the number of the capture they copy for.
    active: AtomicBool,
    number: AtomicU64,
    /// Ends the capture running now early.
    running: Mutex<Option<Sender<()>>>,
    counters: Arc<CaptureCounters>,
}

impl Capture {
    pub fn new(settings: CaptureSettings, counters: Arc<CaptureCounters>) -> Arc<Capture> {
        let (copies, drain) = Copies::new(settings.memory / BATCH_BYTES);
        Arc::new(Capture {
            settings,
            copies,
            drain: Arc::new(drain),
            active: AtomicBool::new(false),
            number: AtomicU64::new(0),
            running: Mutex::new(None),
            counters,
        })
    }

    /// Called by readers for each batch: one atomic load when no capture runs.
    #[inline]
    pub fn record(&self, batch: &Batch) {
        if self.active.load(Relaxed) {
            self.copy(batch);
        }
    }

    #[inline(never)]
    fn copy(&self, batch: &Batch) {
        let packets = batch.packet_count() as u64;
        if packets > 0 && !self.copies.copy(batch, self.number.load(Relaxed)) {
            self.counters.skipped.add(packets);
        }
    }

    /// SIGUSR2: starts a capture, or ends the one running. Logs what it did.
    pub fn toggle(self: &Arc<Self>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stop) = running.as_ref() {
            match stop.try_send(()) {
                // Ending now (or already asked to): the writer clears `running` when done.
                Ok(()) | Err(TrySendError::Full(())) => return,
                // The writer is gone: this is a new start.
                Err(TrySendError::Disconnected(())) => {}
            }
        }
        match self.start() {
            Ok(stop) => *running = Some(stop),
            Err(e) => log::warn(&format!(
                "cannot start a capture in {} (--capture-dir): {e}",
                self.settings.dir.display()
            )),
        }
    }

    fn start(self: &Arc<Self>) -> std::io::Result<Sender<()>> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let path = self.settings.dir.join(format!(
            "whippet-{}-{:03}.cap",
            stamp.as_secs(),
            stamp.subsec_millis()
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all(MAGIC)?;
        let number = self.number.fetch_add(1, Relaxed) + 1;
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let started = Instant::now();
        let capture = self.clone();
        std::thread::Builder::new()
            .name("whippet-capture".into())
            .spawn(move || capture.write(file, &path, number, started, &stopped))?;
        self.counters.captures.add(1);
        self.active.store(true, Relaxed);
        log::info(&format!(
            "capture {number} started: {} for {} s (SIGUSR2 ends it)",
            self.settings.dir.display(),
            self.settings.duration.as_secs()
        ));
        Ok(stop)
    }

    /// The writer of capture `number`: copies to the file until the time is up or SIGUSR2.
    fn write(
        &self,
        mut file: File,
        path: &Path,
        number: u64,
        started: Instant,
        stop: &Receiver<()>,
    ) {
        let deadline = started + self.settings.duration;
        let mut out = Vec::new();
        let mut bytes = MAGIC.len() as u64;
        let (written_before, skipped_before) =
            (self.counters.written.get(), self.counters.skipped.get());
        let mut one = |copy: Copy, out: &mut Vec<u8>| {
            if copy.tag == number {
                self.write_copy(&mut file, &copy, started, &mut bytes, out);
            }
            self.drain.recycle(copy);
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            select! {
                recv(self.drain.rx) -> copy => match copy {
                    Ok(copy) => one(copy, &mut out),
                    Err(_) => break,
                },
                recv(stop) -> _ => break,
                default(left) => break,
            }
        }
        self.active.store(false, Relaxed);
        // What readers copied before the flag fell.
        while let Ok(copy) = self.drain.rx.try_recv() {
            one(copy, &mut out);
        }
        let _ = file.sync_all();
        let written = self.counters.written.get() - written_before;
        let skipped = self.counters.skipped.get() - skipped_before;
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = None;
        log::info(&format!(
            "capture {number} written to {}: {written} packets, {bytes} bytes; {skipped} packets left out",
            path.display()
        ));
    }

    /// Writes one copy's packets as records, counting them written or skipped.
    fn write_copy(
        &self,
        file: &mut File,
        copy: &Copy,
        started: Instant,
        bytes: &mut u64,
        out: &mut Vec<u8>,
    ) {
        let packets = copy.ends.len() as u64;
        let size = (copy.bytes.len() + RECORD_HEAD * copy.ends.len()) as u64;
        if *bytes + size > self.settings.file_bytes {
            self.counters.skipped.add(packets);
            return;
        }
        let at = copy.at.saturating_duration_since(started).as_nanos() as u64;
        out.clear();
        for p in copy.packets() {
            out.extend_from_slice(&at.to_le_bytes());
            out.push(transport_code(copy.transport));
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
        }
        if crate::fault_injected("capture-slow") {
            std::thread::sleep(Duration::from_millis(20));
        }
        let result = if crate::fault_injected("capture-full") {
            Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC))
        } else {
            file.write_all(out)
        };
        match result {
            Ok(()) => {
                *bytes += size;
                self.counters.written.add(packets);
            }
            Err(_) => self.counters.skipped.add(packets),
        }
    }
}

fn transport_code(t: Transport) -> u8 {
    t as u8
}

/// One packet of a capture file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<'a> {
    /// Arrival, after the capture started.
    pub at: Duration,
    pub transport: Transport,
    pub bytes: &'a [u8],
}

/// Reads a capture file's records; an error says where the file stops making sense.
pub fn records(file: &[u8]) -> Result<Vec<Record<'_>>, String> {
    let rest = file
        .strip_prefix(&MAGIC[..])
        .ok_or("not a whippet capture (it does not begin with WHIPCAP1)")?;
    let mut out = Vec::new();
    let mut at = 0;
    while at < rest.len() {
        let head = rest
            .get(at..at + RECORD_HEAD)
            .ok_or_else(|| format!("record {} is cut short at byte {}", out.len(), at + 8))?;
        let nanos = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let transport = *Transport::ALL
            .get(head[8] as usize)
            .ok_or_else(|| format!("record {}: unknown transport {}", out.len(), head[8]))?;
        let len = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes")) as usize;
        let start = at + RECORD_HEAD;
        let bytes = rest
            .get(start..start + len)
            .ok_or_else(|| format!("record {} is cut short at byte {}", out.len(), start + 8))?;
        out.push(Record {
            at: Duration::from_nanos(nanos),
            transport,
            bytes,
        });
        at = start + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Pool;

    fn batch(pool: &Pool, t: Transport, packets: &[&[u8]]) -> Batch {
        let mut b = pool.get(t);
        let mut at = 0;
        for p in packets {
            b.buffer_mut()[at..at + p.len()].copy_from_slice(p);
            b.push_packet(at, at + p.len());
            at += p.len();
        }
        b
    }

    fn settings(dir: &Path) -> CaptureSettings {
        CaptureSettings {
            dir: dir.to_path_buf(),
            duration: Duration::from_secs(3600),
            memory: 4 * BATCH_BYTES,
            file_bytes: 1 << 30,
        }
    }

    fn wait_idle(c: &Capture) {
        crate::blast::process::poll_until(
            "the capture to end",
            crate::blast::process::DEADLINE,
            || c.running.lock().unwrap().is_none(),
        );
    }

    #[test]
    fn a_capture_records_packets_between_two_signals_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("whippet-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let counters = Arc::new(CaptureCounters::default());
        let c = Capture::new(settings(&dir), counters.clone());
        let pool = Pool::new(1024, 2);
        // Before a capture: nothing is copied.
        c.record(&batch(&pool, Transport::Udp, &[b"before:1|c"]));
        c.toggle();
        c.record(&batch(&pool, Transport::Udp, &[b"a:1|c", b"b:2|g"]));
        c.record(&batch(&pool, Transport::Stream, &[b"c:3|d"]));
        c.toggle();
        wait_idle(&c);
        c.record(&batch(&pool, Transport::Unix, &[b"after:1|c"]));
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 1);
        let bytes = std::fs::read(files[0].path()).unwrap();
        let records = records(&bytes).unwrap();
        let got: Vec<(Transport, &[u8])> = records.iter().map(|r| (r.transport, r.bytes)).collect();
        assert_eq!(
            got,
            [
                (Transport::Udp, &b"a:1|c"[..]),
                (Transport::Udp, b"b:2|g"),
                (Transport::Stream, b"c:3|d")
            ]
        );
        assert!(records[0].at <= records[2].at);
        assert_eq!((counters.written.get(), counters.skipped.get()), (3, 0));
        assert_eq!(counters.captures.get(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_at_its_size_limit_leaves_packets_out_and_counts_them() {
        let dir = std::env::temp_dir().join(format!("whippet-capture-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let counters = Arc::new(CaptureCounters::default());
        let mut s = settings(&dir);
        // The header and one record of 5 bytes.
        s.file_bytes = (MAGIC.len() + RECORD_HEAD + 5) as u64;
        let c = Capture::new(s, counters.clone());
        let pool = Pool::new(1024, 2);
        c.toggle();
        c.record(&batch(&pool, Transport::Udp, &[b"a:1|c"]));
        c.record(&batch(&pool, Transport::Udp, &[b"b:1|c", b"c:1|c"]));
        c.toggle();
        wait_idle(&c);
        assert_eq!((counters.written.get(), counters.skipped.get()), (1, 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_files_are_refused_with_where() {
        assert_eq!(
            records(b"nope").unwrap_err(),
            "not a whippet capture (it does not begin with WHIPCAP1)"
        );
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&5u64.to_le_bytes());
        f.push(9);
        f.extend_from_slice(&1u32.to_le_bytes());
        f.push(b'x');
        assert_eq!(records(&f).unwrap_err(), "record 0: unknown transport 9");
        f[16] = 0;
        assert_eq!(records(&f).unwrap()[0].bytes, b"x");
        f.truncate(f.len() - 1);
        assert_eq!(records(&f).unwrap_err(), "record 0 is cut short at byte 21");
        assert!(records(MAGIC).unwrap().is_empty());
    }
}
