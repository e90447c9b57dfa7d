//! Fuzz entry points: one per parser entry, one for a whole packet through worker, shard,
//! flush and serializer, and one for stream framing. Each takes arbitrary bytes and panics
//! only if an invariant breaks. The cargo-fuzz targets in `tests/fuzz` call these, and the
//! test suite replays the committed corpus through them on stable Rust.

use std::sync::Arc;

use crate::demux::Demux;
use crate::flush::{Aggregate, FlushSettings, Flushed};
use crate::listener::stream::Reassembly;
use crate::packet::{lines, scanned_lines, Line, Pool, Transport};
use crate::parser::{self, Message, MessageKind, Values};
use crate::serializer::{Compression, Serializer, SeriesApi};
use crate::shard::Expiry;
use crate::telemetry::Snapshot;
use crate::worker::{Counters, Enrichment, Worker};

/// One fuzz entry point: arbitrary bytes in, a panic only on a broken invariant.
pub type Target = fn(&[u8]);

/// The targets, by name: what `tests/fuzz/fuzz_targets/<name>.rs` runs and what the corpus
/// folder `tests/fuzz/corpus/<name>` feeds.
pub const TARGETS: [(&str, Target); 6] = [
    ("message", message),
    ("metric", metric),
    ("event", event),
    ("service_check", service_check),
    ("packet", packet),
    ("stream", stream),
];

/// [`parser::parse`]: the error's kind is the line's kind; what parses keeps its promises.
pub fn message(data: &[u8]) {
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    match parser::parse(line) {
        Ok(Message::Metric(m)) => check_metric(&m),
        Ok(Message::Event(e)) => assert!(!e.title.is_empty()),
        Ok(Message::ServiceCheck(c)) => assert!(!c.name.is_empty()),
        Err(e) => {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert_eq!(e.kind, MessageKind::of(line));
        }
    }
}

/// [`parser::metric::parse`] on any UTF-8 line.
pub fn metric(data: &[u8]) {
    if let Some(line) = utf8_line(data) {
        if let Ok(m) = parser::metric::parse(line) {
            check_metric(&m);
        }
    }
}

/// [`parser::event::parse`]: a title is never empty; unescaping never grows the text.
pub fn event(data: &[u8]) {
    let Some(line) = prefixed(data, "_e{") else {
        return;
    };
    if let Ok(e) = parser::event::parse(&line) {
        assert!(!e.title.is_empty());
        // Unescaping never grows a string.
        assert!(parser::event::unescape(e.text).len() <= e.text.len());
    }
}

/// [`parser::service_check::parse`].
pub fn service_check(data: &[u8]) {
    let Some(line) = prefixed(data, "_sc|") else {
        return;
    };
    if let Ok(c) = parser::service_check::parse(&line) {
        assert!(!c.name.is_empty());
        assert!(c.status.code() <= 3);
    }
}

/// One packet through a worker into the shards, a flush, and the serializer: every line is
/// counted as parsed or as an error, and every payload decodes as the intake decodes it.
/// Lines a worker counted, as parsed messages or parse errors.
fn lines_counted(counters: &Counters) -> u64 {
    Snapshot::of(&[counters])
        .readings
        .iter()
        .filter(|p| p.name == "whippet_messages_total" || p.name == "whippet_parse_errors_total")
        .map(|p| p.value)
        .sum()
}

/// The batch again through a worker with origin detection on (client fields honoured, a
/// tagger knowing the pod `p` and the containers `c` and `abc`), twice: every line is
/// counted as without it, and every sample the first worker aggregated (`samples`) is
/// aggregated here too, each time.
fn with_origin(batch: &crate::packet::Batch, mut enrichment: Enrichment, samples: u64) {
    use crate::enrichment::OriginDetection;
    use crate::tagger::{Cardinality, Entities, EntityTags, Sources, Tagger};
    let tagger = Tagger::new(Sources::default(), Arc::default());
    let mut entities = Entities::default();
    let mut tags = EntityTags::default();
    tags.low("kube_namespace", "fuzz");
    tags.orchestrator("pod_name", "p-1");
    tags.high("container_id", "c");
    entities.pods.insert("p".into(), tags.clone());
    entities.containers.insert("c".into(), tags.clone());
    entities.containers.insert("abc".into(), tags);
    tagger.publish(entities);
    let detection = OriginDetection::new(tagger, None, true, false, Cardinality::High);
    enrichment.origin = Some(Arc::new(detection));
    let demux = Arc::new(Demux::with_context_limit(4, 1_000, 10_000));
    let counters = Arc::new(Counters::default());
    let mut worker = Worker::new(demux, counters.clone(), enrichment);
    worker.process(batch);
    worker.process(batch); // the second time through the cache
    let counted = lines_counted(&counters);
    let lines: u64 = batch.packets().map(|p| lines(p).count() as u64).sum();
    assert_eq!(
        counted,
        2 * lines,
        "every line is counted once with origin detection"
    );
    assert_eq!(
        counters.samples.get(),
        2 * samples,
        "samples with origin detection"
    );
}

pub fn packet(data: &[u8]) {
    const SLOT: usize = 8192;
    let data = &data[..data.len().min(SLOT)];
    let pool = Pool::new(SLOT, 1);
    let mut batch = pool.get(Transport::Unix);
    batch.buffer_mut()[..data.len()].copy_from_slice(data);
    batch.push_packet(0, data.len());
    batch.received_at = 1_700_000_000;
    // The one-pass scan finds the same lines as splitting, and flags exactly the non-ASCII.
    let scanned: Vec<Line<'_>> = scanned_lines(data).collect();
    let split: Vec<Line<'_>> = lines(data).map(Line::new).collect();
    assert_eq!(scanned, split, "scanned lines");

    let demux = Arc::new(Demux::with_context_limit(4, 1_000, 10_000));
    let counters = Arc::new(Counters::default());
    let enrichment = Enrichment::plain("fuzz", &["env:fuzz"]);
    let mut worker = Worker::new(demux.clone(), counters.clone(), enrichment.clone());
    worker.process(&batch);
    with_origin(&batch, enrichment, counters.samples.get());

    let counted = lines_counted(&counters);
    assert_eq!(
        counted,
        lines(data).count() as u64,
        "every line is counted once"
    );

    let expiry = Expiry {
        interval: 10,
        counter_seconds: 300,
        context_seconds: 300,
    };
    let settings = FlushSettings::new(expiry, &[Aggregate::Max, Aggregate::Count], &[95]);
    let mut closed = Vec::new();
    demux.flush(batch.received_at + 20, &expiry, &mut closed);
    let backlog = demux.take_backlog();
    let mut flushed = Flushed {
        events: backlog.events,
        service_checks: backlog.service_checks,
        ..Flushed::default()
    };
    for c in closed {
        settings.finish(c, &mut flushed);
    }
    for series_api in [SeriesApi::V2, SeriesApi::V1] {
        let serializer = Serializer {
            series_api,
            compression: Compression::None,
            hostname: "fuzz".into(),
        };
        for p in serializer.serialize(&flushed).payloads {
            if let Err(e) = crate::intake::decode(p.endpoint.path(), &p.body) {
                panic!("{} payload does not decode: {e}", p.endpoint.path());
            }
        }
    }
    pool.put(batch);
}

/// Stream framing: the bytes arrive in chunks whose sizes the input chooses; the frames
/// reassembled are exactly those a straightforward reading of the whole stream finds.
pub fn stream(data: &[u8]) {
    const MAX_FRAME: usize = 64;
    let Some((&chunking, bytes)) = data.split_first() else {
        return;
    };
    let pool = Pool::new(MAX_FRAME, 2);
    let mut frames = Reassembly::new(&pool);
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut oversized = false;
    let mut at = 0;
    let mut step = 0usize;
    while at < bytes.len() && !oversized {
        // Chunk sizes cycle through 1..=chunking+1, mixing byte-at-a-time and bulk reads.
        step = step % (chunking as usize + 1) + 1;
        let space = frames.space();
        assert!(!space.is_empty(), "the read buffer is never full");
        let n = step.min(space.len()).min(bytes.len() - at);
        space[..n].copy_from_slice(&bytes[at..at + n]);
        at += n;
        let fed = frames.fed(n, &pool);
        if let Some(batch) = fed.complete {
            assert!(batch.packet_count() > 0);
            got.extend(batch.packets().map(<[u8]>::to_vec));
            pool.put(batch);
        }
        oversized = fed.oversized;
    }

    // The reference: walk the whole stream at once.
    let mut want: Vec<Vec<u8>> = Vec::new();
    let mut pos = 0;
    let mut want_oversized = false;
    while bytes.len() - pos >= 4 {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        if len > MAX_FRAME {
            want_oversized = true;
            break;
        }
        if bytes.len() - pos - 4 < len {
            break;
        }
        if len > 0 {
            want.push(bytes[pos + 4..pos + 4 + len].to_vec());
        }
        pos += 4 + len;
    }
    assert_eq!(got, want);
    assert_eq!(oversized, want_oversized);
    if !oversized {
        assert_eq!(frames.pending(), bytes.len() - pos);
    }
    frames.release(&pool);
}

fn utf8_line(data: &[u8]) -> Option<&str> {
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    std::str::from_utf8(line).ok()
}

/// The first line of `data` starting with `prefix` (added when missing), so the fuzzer
/// spends its time past the prefix the kind is recognized by.
fn prefixed(data: &[u8], prefix: &str) -> Option<String> {
    let line = utf8_line(data)?;
    Some(if line.starts_with(prefix) {
        line.to_owned()
    } else {
        format!("{prefix}{line}")
    })
}

fn check_metric(m: &parser::Metric<'_>) {
    assert!(!m.name.is_empty());
    assert!(!m.name.contains(':') && !m.name.contains('|'));
    assert!(m.sample_rate > 0.0 && m.sample_rate <= 1.0);
    assert!(m.timestamp.is_none_or(|t| t > 0));
    match m.values {
        Values::One(v) => assert!(v.is_finite()),
        Values::Many(_) => {
            assert!(m.values.iter().count() >= 1);
            assert!(m.values.iter().all(f64::is_finite));
        }
        Values::Member(s) => assert!(!s.is_empty()),
    }
}
