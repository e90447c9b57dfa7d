//! Measures one worker thread: `cargo run --release --example worker_throughput -- [ROUNDS]
//! [FILE]`, over the generated `dsd_base`-like workload or the corpus FILE. Messages are
//! packed into 8 KiB packets, 32 to a batch, as the Unix datagram listener would deliver
//! them; prints nanoseconds per message.

use std::sync::Arc;
use std::time::Instant;

use whippet::demux::Demux;
use whippet::packet::Pool;
use whippet::worker::{Counters, Enrichment, Worker};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .get(1)
        .map_or(20, |r| r.parse().expect("ROUNDS is a number"));
    let messages = match args.get(2) {
        Some(path) => whippet::blast::corpus(std::path::Path::new(path)).unwrap(),
        None => whippet::blast::Generated::dsd_base().generate(),
    };
    let pool = Pool::new(8192, 4096);
    let batches = whippet::blast::batches(&pool, &messages, 1_700_000_000);
    let messages = messages.len() as u64;
    let enrichment = Enrichment {
        hostname: "bench-host".into(),
        extra_tags: Arc::new([]),
        bucket_seconds: 10,
        origin: None,
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
    println!("{messages} messages × {rounds} rounds: {ns:.0} ns/message (one worker thread)");
}
