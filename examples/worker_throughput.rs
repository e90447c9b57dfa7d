//! Measures one worker thread: `cargo run --release --example worker_throughput -- [ROUNDS]
//! [FILE]`, over the generated `dsd_base`-like workload or the corpus FILE. Messages are
//! packed into 8 KiB packets, 32 to a batch, as the Unix datagram listener would deliver
//! them; prints nanoseconds per message.
//!
//! `ORIGIN=configured` runs with origin detection configured (a tagger knowing one pod) and
//! the messages unchanged; `ORIGIN=tagged` also gives every message that pod's
//! `dd.internal.entity_id` tag, so each one gets the pod's tags.
//!
//! `SHAPING=mapper100` adds a mapper profile of 100 regex mappings that every name is tried
//! against, the last of which renames every metric and adds a tag; `SHAPING=namespace` puts
//! a namespace before every name.

use std::sync::Arc;
use std::time::Instant;

use whippet::demux::Demux;
use whippet::enrichment::OriginDetection;
use whippet::packet::Pool;
use whippet::tagger::{Cardinality, Entities, EntityTags, Sources, Tagger};
use whippet::worker::{Counters, Enrichment, Worker};

/// A tagger that knows one pod with a realistic tag set.
fn origin() -> Arc<OriginDetection> {
    let tagger = Tagger::new(Sources::default(), Arc::default());
    let mut pod = EntityTags::default();
    for t in [
        "kube_namespace:shop",
        "pod_phase:running",
        "kube_qos:Burstable",
        "env:prod",
        "kube_deployment:web",
        "kube_replica_set:web-7d4b9c8f6d",
        "kube_ownerref_kind:replicaset",
    ] {
        pod.low.push(t.into());
    }
    pod.orchestrator
        .push("pod_name:web-7d4b9c8f6d-x2x9z".into());
    let mut entities = Entities::default();
    entities.pods.insert("pod-1".into(), pod);
    tagger.publish(entities);
    Arc::new(OriginDetection::new(
        tagger,
        None,
        false,
        false,
        Cardinality::Low,
    ))
}

/// The shaping `SHAPING` asks for.
fn shaping(mode: &str) -> Option<Arc<whippet::shaping::Shaping>> {
    let mut settings = whippet::config::ShapingSettings {
        mapper_cache_size: 1000,
        ..Default::default()
    };
    match mode {
        "mapper100" => {
            let mut mappings: Vec<String> = (0..99)
                .map(|i| {
                    format!(
                        r#"{{"match":"nomatch{i}\\.(.*)","match_type":"regex","name":"n{i}.$1"}}"#
                    )
                })
                .collect();
            mappings.push(
                r#"{"match":"(.*)","match_type":"regex","name":"m.$1","tags":{"via":"map"}}"#
                    .into(),
            );
            settings.mapper_profiles = Some(format!(
                r#"[{{"name":"bench","prefix":"*","mappings":[{}]}}]"#,
                mappings.join(",")
            ));
        }
        "namespace" => settings.namespace = "app.".into(),
        "" => return None,
        other => panic!("SHAPING={other} is not mapper100 or namespace"),
    }
    Some(settings.build().expect("valid settings").expect("active"))
}

/// `m` with the pod's entity id among its tags.
fn tagged(m: &[u8]) -> Vec<u8> {
    const TAG: &[u8] = b"dd.internal.entity_id:pod-1";
    let text = String::from_utf8_lossy(m);
    match text.find("|#") {
        Some(at) => [&m[..at + 2], TAG, b",", &m[at + 2..]].concat(),
        None => [m, b"|#", TAG].concat(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .get(1)
        .map_or(20, |r| r.parse().expect("ROUNDS is a number"));
    let messages = match args.get(2) {
        Some(path) => whippet::blast::corpus(std::path::Path::new(path)).unwrap(),
        None => whippet::blast::Generated::dsd_base().generate(),
    };
    let mode = std::env::var("ORIGIN").unwrap_or_default();
    let shaping_mode = std::env::var("SHAPING").unwrap_or_default();
    let messages: Vec<Vec<u8>> = match mode.as_str() {
        "tagged" => messages.iter().map(|m| tagged(m)).collect(),
        _ => messages,
    };
    let pool = Pool::new(8192, 4096);
    let batches = whippet::blast::batches(&pool, &messages, 1_700_000_000);
    let messages = messages.len() as u64;
    let enrichment = Enrichment {
        hostname: "bench-host".into(),
        extra_tags: Arc::new([]),
        bucket_seconds: 10,
        origin: matches!(mode.as_str(), "configured" | "tagged").then(origin),
        shaping: shaping(&shaping_mode),
        eol_required: [false; 3],
        timestamps: true,
    };
    let counters = Arc::new(Counters::default());
    let mut worker = Worker::new(
        Arc::new(Demux::new(16, 10_000)),
        counters.clone(),
        enrichment,
    );
    for b in &batches {
        worker.process(b); // warm: contexts exist
    }
    let start = Instant::now();
    for _ in 0..rounds {
        for b in &batches {
            worker.process(b);
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / (rounds as u64 * messages) as f64;
    let mode = if mode.is_empty() { "off" } else { &mode };
    let shaping_mode = if shaping_mode.is_empty() {
        "off"
    } else {
        &shaping_mode
    };
    println!(
        "{messages} messages × {rounds} rounds, origin {mode}, shaping {shaping_mode}: {ns:.0} ns/message (one worker thread)"
    );
}
