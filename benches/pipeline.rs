//! Microbenchmarks of each stage over the benchmark workload: `cargo bench`. The workload is
//! generated with the statistics of Datadog's `dsd_base` corpus (`Generated::dsd_base`), or
//! read from the file `WHIPPET_BENCH_CORPUS` names.

use std::sync::{Arc, OnceLock};

use divan::{black_box, Bencher};
use whippet::context::{canonical_tags, split_tags, ContextHasher, ContextRef};
use whippet::demux::Demux;
use whippet::flush::{Aggregate, FlushSettings, Flushed};
use whippet::packet::{Batch, Pool};
use whippet::parser::{self, Message};
use whippet::serializer::{Compression, Serializer, SeriesApi};
use whippet::shard::Expiry;
use whippet::sketch::Sketch;
use whippet::worker::{Counters, Enrichment, Worker};

fn main() {
    divan::main();
}

fn corpus() -> &'static [Vec<u8>] {
    static CORPUS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CORPUS.get_or_init(|| match std::env::var_os("WHIPPET_BENCH_CORPUS") {
        Some(path) => whippet::blast::corpus(std::path::Path::new(&path)).unwrap(),
        None => whippet::blast::Generated::dsd_base().generate(),
    })
}

/// The corpus in 8 KiB packets, 32 to a batch, as the Unix listener delivers it.
fn batches(pool: &Pool) -> Vec<Batch> {
    whippet::blast::batches(pool, corpus(), 1_700_000_000)
}

fn worker(demux: Arc<Demux>) -> Worker {
    let enrichment = Enrichment::plain("bench", &[]);
    Worker::new(demux, Arc::new(Counters::default()), enrichment)
}

/// Parsing every corpus message (throughput in messages).
#[divan::bench]
fn parse(b: Bencher) {
    let lines = corpus();
    b.counter(divan::counter::ItemsCount::new(lines.len()))
        .bench(|| {
            for line in lines {
                let _ = black_box(parser::parse(black_box(line)));
            }
        });
}

/// Splitting, sorting and hashing every metric's context.
#[divan::bench]
fn context_hash(b: Bencher) {
    let lines = corpus();
    let hasher = ContextHasher::default();
    let metrics: Vec<_> = lines
        .iter()
        .filter_map(|l| match parser::parse(l) {
            Ok(Message::Metric(m)) => Some(m),
            _ => None,
        })
        .collect();
    b.counter(divan::counter::ItemsCount::new(metrics.len()))
        .bench(|| {
            let mut tags: Vec<&str> = Vec::with_capacity(64);
            let mut scratch = Vec::with_capacity(64);
            let mut buf = Vec::with_capacity(4096);
            for m in &metrics {
                tags.clear();
                tags.extend(split_tags(m.tags));
                canonical_tags(&mut tags, 0, &mut scratch);
                let c = ContextRef {
                    name: m.name,
                    host: "bench",
                    tags: &tags,
                    kind: m.kind,
                };
                black_box(c.hash_with(&hasher, &mut buf));
            }
        });
}

/// The whole worker: split, parse, hash, insert into shards (contexts already exist).
#[divan::bench]
fn worker_process(b: Bencher) {
    let pool = Pool::new(8192, 4096);
    let batches = batches(&pool);
    let mut w = worker(Arc::new(Demux::new(16, 10_000)));
    for batch in &batches {
        w.process(batch);
    }
    b.counter(divan::counter::ItemsCount::new(corpus().len()))
        .bench_local(|| {
            for batch in &batches {
                w.process(batch);
            }
        });
}

/// Inserting values into a distribution's sketch.
/// Deciding the shaping of a new metric name against a 100-mapping regex profile: a name no
/// mapping matches (all 100 tried) and one the last mapping renames. A worker does this once
/// per name and type.
#[divan::bench(args = ["nomatch", "last"])]
fn shaping_decide_100_mappings(b: Bencher, which: &str) {
    let mut mappings: Vec<String> = (0..99)
        .map(|i| format!(r#"{{"match":"svc{i}\\.(.*)","match_type":"regex","name":"s{i}.$1"}}"#))
        .collect();
    mappings.push(
        r#"{"match":"app\\.(.*)","match_type":"regex","name":"m.$1","tags":{"via":"map"}}"#.into(),
    );
    let settings = whippet::config::ShapingSettings {
        mapper_profiles: Some(format!(
            r#"[{{"name":"bench","prefix":"*","mappings":[{}]}}]"#,
            mappings.join(",")
        )),
        mapper_cache_size: 1000,
        ..Default::default()
    };
    let shaping = settings.build().unwrap().unwrap();
    let name = match which {
        "last" => "app.request.latency",
        _ => "web.request.latency",
    };
    b.bench(|| shaping.decide(black_box(name), whippet::parser::MetricKind::Count));
}

#[divan::bench(args = [1.0, 0.5])]
fn sketch_insert(b: Bencher, rate: f64) {
    let values: Vec<f64> = (0..10_000).map(|i| (i as f64 * 7.3).sin() * 1e6).collect();
    b.counter(divan::counter::ItemsCount::new(values.len()))
        .bench(|| {
            let mut s = Sketch::default();
            for &v in &values {
                s.insert(v, rate);
            }
            s.finish();
            black_box(s.bins().len());
        });
}

/// Closing a bucket of the corpus' contexts, turning it into series and sketches, and
/// serializing and compressing the payloads.
#[divan::bench(args = [Compression::Zstd, Compression::Deflate])]
fn flush_serialize_compress(b: Bencher, compression: Compression) {
    let pool = Pool::new(8192, 4096);
    let batches = batches(&pool);
    let expiry = Expiry {
        interval: 10,
        counter_seconds: 300,
        context_seconds: 20,
    };
    let settings = FlushSettings::new(
        expiry,
        &[
            Aggregate::Max,
            Aggregate::Median,
            Aggregate::Avg,
            Aggregate::Count,
        ],
        &[95],
    );
    let serializer = Serializer {
        series_api: SeriesApi::V2,
        compression,
        hostname: "bench".into(),
    };
    b.with_inputs(|| {
        let demux = Arc::new(Demux::new(16, 10_000));
        let mut w = worker(demux.clone());
        for batch in &batches {
            w.process(batch);
        }
        demux
    })
    .bench_local_values(|demux| {
        let mut closed = Vec::new();
        demux.flush(1_700_000_010, &expiry, &mut closed);
        let mut out = Flushed::default();
        for c in closed {
            settings.finish(c, &mut out);
        }
        black_box(serializer.serialize(&out).payloads.len())
    });
}
