//! Flush: at every bucket boundary the flusher thread takes closed buckets out of the shards
//! (one short lock each), turns accumulators into series points and sketches outside the
//! locks, adds the event and service-check backlog, and hands the result to the [`Output`].
//! At shutdown it flushes everything, the open bucket included.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::clock;
use crate::context::ContextKey;
use crate::demux::Demux;
use crate::sample::{EventRecord, ServiceCheckRecord};
use crate::shaping::NameList;
use crate::shard::{Accumulator, Closed, Expiry, Histogram};
use crate::sketch::Sketch;
use crate::telemetry::{labels, Counter, Gauge, PerLabel, Readings, Snapshot};
use crate::worker::LiveTags;

/// The intake's metric types (v2 `MetricType` numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesKind {
    Count = 1,
    Rate = 2,
    Gauge = 3,
}

impl SeriesKind {
    pub fn label(self) -> &'static str {
        match self {
            SeriesKind::Count => "count",
            SeriesKind::Rate => "rate",
            SeriesKind::Gauge => "gauge",
        }
    }
}

/// One point of one series. The name is the context's name plus `suffix` (`.max`,
/// `.95percentile`, … for histograms; empty otherwise).
#[derive(Debug, Clone)]
pub struct Series {
    pub context: ContextKey,
    pub suffix: Arc<str>,
    pub kind: SeriesKind,
    pub interval: i64,
    pub timestamp: i64,
    pub value: f64,
}

impl Series {
    pub fn name(&self) -> String {
        format!("{}{}", self.context.name(), self.suffix)
    }
}

/// One distribution's sketch for one bucket (already finished).
#[derive(Debug, Clone)]
pub struct SketchPoint {
    pub context: ContextKey,
    pub timestamp: i64,
    pub sketch: Box<Sketch>,
}

/// Everything one flush hands to the output.
#[derive(Debug, Default)]
pub struct Flushed {
    pub series: Vec<Series>,
    pub sketches: Vec<SketchPoint>,
    pub events: Vec<EventRecord>,
    pub service_checks: Vec<ServiceCheckRecord>,
}

impl Flushed {
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
            && self.sketches.is_empty()
            && self.events.is_empty()
            && self.service_checks.is_empty()
    }
}

/// Where flushed data goes. Called from the flusher thread only; `emit` may block (the
/// forwarder applies its own bounds), `finish` is called once at shutdown after the last emit.
pub trait Output: Send {
    fn emit(&mut self, flushed: Flushed);
    fn finish(&mut self) {}
}

/// After a boundary, wait this long before flushing, so samples that arrived just before it
/// and are still in a worker's hands make it into their bucket.
const GRACE: Duration = Duration::from_millis(100);

/// A histogram aggregate (docs/behaviour.md, "What each type emits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Max,
    Min,
    Median,
    Avg,
    Sum,
    Count,
}

impl Aggregate {
    pub fn parse(s: &str) -> Option<Aggregate> {
        Some(match s {
            "max" => Aggregate::Max,
            "min" => Aggregate::Min,
            "median" => Aggregate::Median,
            "avg" => Aggregate::Avg,
            "sum" => Aggregate::Sum,
            "count" => Aggregate::Count,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Max => "max",
            Aggregate::Min => "min",
            Aggregate::Median => "median",
            Aggregate::Avg => "avg",
            Aggregate::Sum => "sum",
            Aggregate::Count => "count",
        }
    }
}

/// How closed buckets become output.
#[derive(Debug, Clone)]
pub struct FlushSettings {
    pub expiry: Expiry,
    /// Histogram aggregates, in emission order, with their name suffix.
    aggregates: Vec<(Aggregate, Arc<str>)>,
    /// Histogram percentiles (1..=100, sorted), with their name suffix.
    percentiles: Vec<(i64, Arc<str>)>,
    no_suffix: Arc<str>,
    /// The filter list's entries that name a histogram's aggregate series, which are
    /// dropped (`--metric-filterlist`; empty without one).
    pub(crate) histogram_filter: NameList,
}

impl FlushSettings {
    pub fn new(expiry: Expiry, aggregates: &[Aggregate], percentiles: &[u32]) -> FlushSettings {
        let mut pcts: Vec<u32> = percentiles.to_vec();
        pcts.sort_unstable();
        pcts.dedup();
        FlushSettings {
            expiry,
            aggregates: aggregates
                .iter()
                .map(|a| (*a, format!(".{}", a.name()).into()))
                .collect(),
            percentiles: pcts
                .iter()
                .map(|p| (*p as i64, format!(".{p}percentile").into()))
                .collect(),
            no_suffix: "".into(),
            histogram_filter: NameList::default(),
        }
    }

    /// Every name suffix a histogram's series may have: its aggregates and percentiles.
    fn histogram_suffixes(&self) -> Vec<Arc<str>> {
        let aggregates = self.aggregates.iter().map(|(_, s)| s);
        let percentiles = self.percentiles.iter().map(|(_, s)| s);
        aggregates.chain(percentiles).cloned().collect()
    }

    /// Turns one closed accumulator into series points or a sketch. Returns how many points
    /// (or sketches) were dropped for a value that overflowed to infinity (a counter summed
    /// past f64's range, a tiny sample rate): the intake cannot take them; and how many
    /// aggregate series of a histogram the filter list named.
    pub fn finish(&self, closed: Closed, out: &mut Flushed) -> Dropped {
        let Closed {
            context,
            timestamp,
            acc,
        } = closed;
        let interval = self.expiry.interval;
        let mut dropped = Dropped::default();
        let filter = &self.histogram_filter;
        let mut series = |suffix: &Arc<str>, kind, value: f64| {
            if !value.is_finite() {
                dropped.non_finite += 1;
                return;
            }
            if !suffix.is_empty()
                && !filter.is_empty()
                && filter.contains(&format!("{}{suffix}", context.name()))
            {
                dropped.filtered += 1;
                return;
            }
            out.series.push(Series {
                context: context.clone(),
                suffix: suffix.clone(),
                kind,
                interval,
                timestamp,
                value,
            })
        };
        match acc {
            Accumulator::Count(sum) => {
                series(&self.no_suffix, SeriesKind::Rate, sum / interval as f64)
            }
            Accumulator::Gauge(v) => series(&self.no_suffix, SeriesKind::Gauge, v),
            Accumulator::Set(members) => {
                series(&self.no_suffix, SeriesKind::Gauge, members.len() as f64)
            }
            Accumulator::Histogram(mut h) => {
                if h.samples.is_empty() {
                    return dropped;
                }
                h.samples.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
                for (agg, suffix) in &self.aggregates {
                    let (kind, value) = aggregate(&h, *agg, interval);
                    series(suffix, kind, value);
                }
                percentiles(&h, &self.percentiles, |suffix, v| {
                    series(suffix, SeriesKind::Gauge, v)
                });
            }
            Accumulator::Distribution(mut sketch) => {
                sketch.finish();
                if !sketch.summary().sum.is_finite() {
                    dropped.non_finite += 1;
                    return dropped;
                }
                if !sketch.is_empty() {
                    out.sketches.push(SketchPoint {
                        context,
                        timestamp,
                        sketch,
                    });
                }
            }
        }
        dropped
    }
}

/// What [`FlushSettings::finish`] dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Points and sketches whose value overflowed to infinity.
    pub non_finite: u64,
    /// A histogram's aggregate series the filter list names.
    pub filtered: u64,
}

/// One aggregate of a sorted, non-empty histogram, as the Agent computes it.
fn aggregate(h: &Histogram, agg: Aggregate, interval: i64) -> (SeriesKind, f64) {
    let gauge = |v| (SeriesKind::Gauge, v);
    match agg {
        Aggregate::Max => gauge(h.samples[h.samples.len() - 1].0),
        Aggregate::Min => gauge(h.samples[0].0),
        Aggregate::Median => gauge(weighted_rank(h, (h.count - 1) / 2)),
        Aggregate::Avg => gauge(h.sum / h.count as f64),
        Aggregate::Sum => gauge(h.sum),
        Aggregate::Count => (SeriesKind::Rate, h.count as f64 / interval as f64),
    }
}

/// The first value whose cumulative weight exceeds `target`.
fn weighted_rank(h: &Histogram, target: i64) -> f64 {
    let mut weight = 0i64;
    for &(v, w) in &h.samples {
        weight = weight.saturating_add(w);
        if weight > target {
            return v;
        }
    }
    h.samples[h.samples.len() - 1].0
}

/// Percentile p = first value whose cumulative weight exceeds (p·count − 1) / 100.
fn percentiles(h: &Histogram, pcts: &[(i64, Arc<str>)], mut emit: impl FnMut(&Arc<str>, f64)) {
    for (p, suffix) in pcts {
        let target = (p.saturating_mul(h.count) - 1) / 100;
        emit(suffix, weighted_rank(h, target));
    }
}

/// Closed contexts per emit of a flush: the series payload's 10,000-point limit, so chunking
/// costs at most one extra, smaller payload per emit.
pub const EMIT_CONTEXTS: usize = 10_000;

labels! {
    /// What a flush produced, labelling `whippet_flushed_total`.
    pub enum Data: "data" {
        Points = "points",
        Sketches = "sketches",
        Events = "events",
        ServiceChecks = "service_checks",
    }
}

/// The flusher's counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub flushes: Counter,
    pub contexts_expired: Counter,
    /// Live contexts after the last flush.
    pub contexts: Gauge,
    pub flushed: PerLabel<Data, Counter, { Data::COUNT }>,
    /// Points and sketches dropped at flush for a value that overflowed to infinity.
    pub non_finite: Counter,
    /// A histogram's aggregate series dropped for the filter list.
    pub filtered: Counter,
}

impl Readings for Counters {
    fn read(&self, out: &mut Snapshot) {
        out.counter(
            "whippet_contexts_expired_total",
            &[],
            self.contexts_expired.get(),
        );
        out.gauge("whippet_contexts", &[], self.contexts.get());
        out.counter("whippet_flushes_total", &[], self.flushes.get());
        out.per_label("whippet_flushed_total", &self.flushed);
        let non_finite = self.non_finite.get();
        out.counter(
            "whippet_dropped_total",
            &[("reason", "non_finite")],
            non_finite,
        );
        let filtered = self.filtered.get();
        out.counter(
            "whippet_dropped_total",
            &[("reason", "filtered_aggregate")],
            filtered,
        );
    }
}

/// Runs flushes: periodically on bucket boundaries, and once more at shutdown.
pub struct Flusher {
    demux: Arc<Demux>,
    counters: Arc<Counters>,
    settings: FlushSettings,
    output: Box<dyn Output>,
    /// Reused between flushes.
    closed: Vec<Closed>,
    /// Run after each periodic flush: the daemon's housekeeping (trimming the packet pool).
    after_flush: Option<Box<dyn FnMut() + Send>>,
    /// The reloadable shaping and the generation applied.
    live: Option<(Arc<LiveTags>, u64)>,
}

impl Flusher {
    pub fn new(
        demux: Arc<Demux>,
        counters: Arc<Counters>,
        settings: FlushSettings,
        output: Box<dyn Output>,
    ) -> Flusher {
        Flusher {
            demux,
            counters,
            settings,
            output,
            closed: Vec::new(),
            after_flush: None,
            live: None,
        }
    }

    /// Takes the filter list for histogram aggregates from `live` from now on (and whenever
    /// SIGHUP changes it).
    pub(crate) fn with_live_shaping(mut self, live: Arc<LiveTags>) -> Flusher {
        self.live = Some((live, u64::MAX));
        self.apply_live_shaping();
        self
    }

    /// Rebuilds the histogram filter if the shaping changed since the last flush.
    fn apply_live_shaping(&mut self) {
        let Some((live, seen)) = &mut self.live else {
            return;
        };
        let Some((generation, shaping)) = live.shaping_since(*seen) else {
            return;
        };
        *seen = generation;
        let suffixes = self.settings.histogram_suffixes();
        self.settings.histogram_filter = shaping
            .map(|s| s.filter.with_suffixes(&suffixes))
            .unwrap_or_default();
    }

    /// Runs `f` after each periodic flush (not the final one): work that wants a steady,
    /// unhurried tick, once per bucket.
    pub(crate) fn after_each_flush(mut self, f: impl FnMut() + Send + 'static) -> Flusher {
        self.after_flush = Some(Box::new(f));
        self
    }

    /// Closes every bucket starting before `boundary` and emits it with the backlog, a few
    /// shards at a time: each emit carries about [`EMIT_CONTEXTS`] closed contexts, so the
    /// transient memory of a flush (closed accumulators, series, payloads being built) stays
    /// that of a chunk however many contexts there are.
    pub fn flush(&mut self, boundary: i64) {
        self.flush_stamped(boundary, clock::wall_offset(self.settings.expiry.interval));
    }

    /// [`Flusher::flush`], stamping buckets `offset` seconds from their start on the
    /// pipeline's clock ([`clock::wall_offset`]).
    fn flush_stamped(&mut self, boundary: i64, offset: i64) {
        self.apply_live_shaping();
        let backlog = self.demux.take_backlog();
        let mut out = Flushed {
            events: backlog.events,
            service_checks: backlog.service_checks,
            ..Flushed::default()
        };
        let (mut freed, mut live) = (0, 0);
        let shards = self.demux.shard_count();
        for shard in 0..shards {
            let expiry = &self.settings.expiry;
            let (f, l) = self
                .demux
                .flush_shard(shard, boundary, expiry, offset, &mut self.closed);
            freed += f;
            live += l;
            if self.closed.len() < EMIT_CONTEXTS && shard + 1 < shards {
                continue;
            }
            for closed in self.closed.drain(..) {
                let dropped = self.settings.finish(closed, &mut out);
                self.counters.non_finite.add(dropped.non_finite);
                self.counters.filtered.add(dropped.filtered);
            }
            self.emit(std::mem::take(&mut out));
        }
        let c = &self.counters;
        c.flushes.add(1);
        c.contexts_expired.add(freed as u64);
        c.contexts.set(live as u64);
    }

    fn emit(&mut self, out: Flushed) {
        let flushed = &self.counters.flushed;
        flushed[Data::Points].add(out.series.len() as u64);
        flushed[Data::Sketches].add(out.sketches.len() as u64);
        flushed[Data::Events].add(out.events.len() as u64);
        flushed[Data::ServiceChecks].add(out.service_checks.len() as u64);
        if !out.is_empty() {
            self.output.emit(out);
        }
    }

    /// The flusher thread: flushes at each boundary until `stop` is closed, then flushes
    /// everything (the open bucket too) and finishes the output. Boundaries are kept by the
    /// pipeline's clock, which a wall-clock step does not move ([`crate::clock`]).
    pub fn run(mut self, stop: Receiver<()>) {
        let interval = self.settings.expiry.interval;
        loop {
            let now = clock::data_time();
            let boundary = clock::next_boundary(now.as_secs() as i64, interval);
            let wait = Duration::from_secs(boundary as u64) + GRACE - now;
            match stop.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {
                    crate::inject_fault("flusher");
                    self.flush(boundary);
                    if let Some(f) = &mut self.after_flush {
                        f();
                    }
                }
                _ => break,
            }
        }
        self.flush(clock::next_boundary(clock::data_now(), interval));
        self.output.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{ContextKey, ContextRef};
    use crate::parser::MetricKind;

    const EXPIRY: Expiry = Expiry {
        interval: 10,
        counter_seconds: 300,
        context_seconds: 20,
    };

    fn closed(kind: MetricKind, acc: Accumulator) -> Closed {
        let context = ContextRef {
            name: "m",
            host: "h",
            tags: &[],
            kind,
        };
        Closed {
            context: ContextKey::new(&context),
            timestamp: 100,
            acc,
        }
    }

    fn series(settings: &FlushSettings, c: Closed) -> Vec<(String, SeriesKind, f64)> {
        let mut out = Flushed::default();
        settings.finish(c, &mut out);
        out.series
            .iter()
            .map(|s| (s.name(), s.kind, s.value))
            .collect()
    }

    fn histogram(samples: &[(f64, f64)]) -> Accumulator {
        let mut acc = Accumulator::new(MetricKind::Histogram);
        for &(v, rate) in samples {
            acc.add(v, rate);
        }
        acc
    }

    #[test]
    fn a_large_flush_is_emitted_in_chunks_and_loses_nothing() {
        use crate::packet::Pool;
        use crate::packet::Transport;
        use crate::worker::{self, Enrichment, Worker};
        use std::sync::Mutex;

        /// (series, events) of each emit.
        struct Capture(Arc<Mutex<Vec<(usize, usize)>>>);
        impl Output for Capture {
            fn emit(&mut self, f: Flushed) {
                self.0
                    .lock()
                    .unwrap()
                    .push((f.series.len(), f.events.len()));
            }
        }

        const CONTEXTS: usize = 25_000;
        let demux = Arc::new(Demux::new(4, 100));
        let counters = Arc::new(Counters::default());
        let enrichment = Enrichment::plain("h", &[]);
        let worker_counters = Arc::new(worker::Counters::default());
        let mut worker = Worker::new(demux.clone(), worker_counters, enrichment);
        let pool = Pool::new(8192, 1);
        let mut lines: Vec<String> = (0..CONTEXTS).map(|i| format!("g{i}:1|g")).collect();
        lines.push("_e{1,1}:t|x".into());
        for chunk in lines.chunks(500) {
            let packet = chunk.join("\n");
            let mut batch = pool.get(Transport::Unix);
            batch.buffer_mut()[..packet.len()].copy_from_slice(packet.as_bytes());
            batch.push_packet(0, packet.len());
            batch.received_at = 1_000;
            worker.process(&batch);
            pool.put(batch);
        }
        let emits = Arc::new(Mutex::new(Vec::new()));
        let settings = FlushSettings::new(EXPIRY, &[], &[]);
        let mut flusher = Flusher::new(
            demux,
            counters.clone(),
            settings,
            Box::new(Capture(emits.clone())),
        );
        flusher.flush(2_000);
        let emits = emits.lock().unwrap().clone();
        // Four shards of about 6,250 contexts: emitted two shards at a time.
        assert_eq!(emits.len(), 2, "{emits:?}");
        assert!(emits[0].0 >= EMIT_CONTEXTS, "{emits:?}");
        assert_eq!(emits.iter().map(|e| e.0).sum::<usize>(), CONTEXTS);
        assert_eq!(emits.iter().map(|e| e.1).collect::<Vec<_>>(), [1, 0]);
        assert_eq!(counters.flushed[Data::Points].get(), CONTEXTS as u64);
        assert_eq!(counters.flushes.get(), 1);
    }

    #[test]
    fn counters_become_rates_and_gauges_and_sets_become_gauges() {
        let s = FlushSettings::new(EXPIRY, &[], &[]);
        assert_eq!(
            series(&s, closed(MetricKind::Count, Accumulator::Count(25.0))),
            [("m".into(), SeriesKind::Rate, 2.5)]
        );
        assert_eq!(
            series(&s, closed(MetricKind::Gauge, Accumulator::Gauge(-3.0))),
            [("m".into(), SeriesKind::Gauge, -3.0)]
        );
        let mut set = Accumulator::new(MetricKind::Set);
        for h in [1, 2, 3, 3] {
            set.add_member(h);
        }
        assert_eq!(
            series(&s, closed(MetricKind::Set, set)),
            [("m".into(), SeriesKind::Gauge, 3.0)]
        );
    }

    #[test]
    fn histograms_emit_the_default_aggregates_and_the_95th_percentile_like_the_agent() {
        let aggs = [
            Aggregate::Max,
            Aggregate::Median,
            Aggregate::Avg,
            Aggregate::Count,
        ];
        let s = FlushSettings::new(EXPIRY, &aggs, &[95]);
        // 1..=20: count 20, median target (20-1)/2 = 9 → 10th value = 10;
        // p95 target (95·20-1)/100 = 18 → 19th value = 19.
        let values: Vec<(f64, f64)> = (1..=20).rev().map(|v| (v as f64, 1.0)).collect();
        assert_eq!(
            series(&s, closed(MetricKind::Histogram, histogram(&values))),
            [
                ("m.max".into(), SeriesKind::Gauge, 20.0),
                ("m.median".into(), SeriesKind::Gauge, 10.0),
                ("m.avg".into(), SeriesKind::Gauge, 10.5),
                ("m.count".into(), SeriesKind::Rate, 2.0),
                ("m.95percentile".into(), SeriesKind::Gauge, 19.0),
            ]
        );
    }

    #[test]
    fn histogram_weights_come_from_sample_rates() {
        let s = FlushSettings::new(
            EXPIRY,
            &[
                Aggregate::Min,
                Aggregate::Sum,
                Aggregate::Count,
                Aggregate::Median,
            ],
            &[50, 99],
        );
        // 1 at weight 1, 100 at weight 4 (rate 0.25): count 5; sum 1 + 400.
        // median target (5-1)/2 = 2: cumulative 1, 5 → 100. p50 target (250-1)/100 = 2 → 100.
        // p99 target (495-1)/100 = 4 → 100.
        assert_eq!(
            series(
                &s,
                closed(MetricKind::Timer, histogram(&[(100.0, 0.25), (1.0, 1.0)]))
            ),
            [
                ("m.min".into(), SeriesKind::Gauge, 1.0),
                ("m.sum".into(), SeriesKind::Gauge, 401.0),
                ("m.count".into(), SeriesKind::Rate, 0.5),
                ("m.median".into(), SeriesKind::Gauge, 100.0),
                ("m.50percentile".into(), SeriesKind::Gauge, 100.0),
                ("m.99percentile".into(), SeriesKind::Gauge, 100.0),
            ]
        );
    }

    #[test]
    fn a_single_sample_histogram_reports_it_everywhere() {
        let s = FlushSettings::new(EXPIRY, &[Aggregate::Median], &[1, 95, 100]);
        let got = series(&s, closed(MetricKind::Histogram, histogram(&[(7.0, 1.0)])));
        assert!(got.iter().all(|(_, _, v)| *v == 7.0), "{got:?}");
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn distributions_become_finished_sketches() {
        let s = FlushSettings::new(EXPIRY, &[], &[]);
        let mut acc = Accumulator::new(MetricKind::Distribution);
        acc.add(1.0, 1.0);
        acc.add(10.0, 0.5);
        let mut out = Flushed::default();
        s.finish(closed(MetricKind::Distribution, acc), &mut out);
        assert_eq!(out.series.len(), 0);
        let sum = out.sketches[0].sketch.summary();
        assert_eq!((sum.count, sum.sum), (3, 21.0));
        assert_eq!(
            out.sketches[0]
                .sketch
                .bins()
                .iter()
                .map(|b| b.n)
                .sum::<u16>(),
            3
        );
    }

    #[test]
    fn a_filter_list_entry_naming_a_histogram_aggregate_drops_that_series_only() {
        let mut s = FlushSettings::new(EXPIRY, &[Aggregate::Max, Aggregate::Count], &[95]);
        let list = NameList::new(
            &["m.max".into(), "m.95percentile".into(), "m".into()],
            false,
        );
        s.histogram_filter = list.with_suffixes(&s.histogram_suffixes());
        assert_eq!(
            s.histogram_filter.len(),
            2,
            "the bare name is not an aggregate's"
        );
        let mut h = Histogram::default();
        h.samples.push((2.0, 1));
        h.count = 1;
        h.sum = 2.0;
        let mut out = Flushed::default();
        let dropped = s.finish(
            closed(MetricKind::Histogram, Accumulator::Histogram(Box::new(h))),
            &mut out,
        );
        let names: Vec<String> = out.series.iter().map(Series::name).collect();
        assert_eq!(names, ["m.count"]);
        assert_eq!(
            dropped,
            Dropped {
                non_finite: 0,
                filtered: 2
            }
        );
    }
}
