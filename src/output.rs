//! Output: what a flush produces ([`Flushed`]) and where it goes ([`Output`]). The console
//! output, one line per series point, sketch, event and service check on stdout, is used
//! whenever no intake is configured.

use std::io::Write;
use std::sync::Arc;

use crate::context::ContextKey;
use crate::parser::{AlertType, CheckStatus, Priority};
use crate::sketch::Sketch;

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

/// An event as it will be sent (owned; `\n` escapes already turned into newlines).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub title: String,
    pub text: String,
    pub timestamp: i64,
    pub host: String,
    pub aggregation_key: String,
    pub priority: Priority,
    pub source_type: String,
    pub alert_type: AlertType,
    pub tags: Vec<String>,
}

/// A service check as it will be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceCheckRecord {
    pub name: String,
    pub status: CheckStatus,
    pub timestamp: i64,
    pub host: String,
    pub message: String,
    pub tags: Vec<String>,
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
    /// Called before the final flush at shutdown.
    fn stopping(&mut self) {}
    fn finish(&mut self) {}
}

/// Writes one readable line per item to a writer (stdout for the daemon):
///
/// ```text
/// series page.views rate ts=1700000000 value=0.1 interval=10 host=web1 tags=env:dev
/// sketch latency ts=1700000000 count=3 min=1 max=9 sum=15 avg=5 bins=3 host=web1 tags=
/// event ts=1700000000 priority=normal alert=info host=web1 title="deploy" text="v2" tags=
/// service_check db.up status=2 ts=1700000000 host=web1 message="refused" tags=a:b
/// ```
///
/// Values print in Rust's shortest round-trip form, so parsing a line gives the exact `f64`.
pub struct Console<W: Write + Send> {
    out: W,
}

impl<W: Write + Send> Console<W> {
    pub fn new(out: W) -> Console<W> {
        Console { out }
    }

    fn write_all(&mut self, f: &Flushed) -> std::io::Result<()> {
        let out = &mut self.out;
        for s in &f.series {
            let c = &s.context;
            writeln!(
                out,
                "series {}{} {} ts={} value={} interval={} host={} tags={}",
                c.name(),
                s.suffix,
                s.kind.label(),
                s.timestamp,
                s.value,
                s.interval,
                c.host(),
                join(c.tags()),
            )?;
        }
        for p in &f.sketches {
            let c = &p.context;
            let sum = p.sketch.summary();
            writeln!(
                out,
                "sketch {} ts={} count={} min={} max={} sum={} avg={} bins={} host={} tags={}",
                c.name(),
                p.timestamp,
                sum.count,
                sum.min,
                sum.max,
                sum.sum,
                sum.avg,
                p.sketch.bins().len(),
                c.host(),
                join(c.tags()),
            )?;
        }
        for e in &f.events {
            writeln!(
                out,
                "event ts={} priority={} alert={} host={} aggregation_key={:?} source_type={:?} title={:?} text={:?} tags={}",
                e.timestamp,
                e.priority.label(),
                e.alert_type.label(),
                e.host,
                e.aggregation_key,
                e.source_type,
                e.title,
                e.text,
                e.tags.join(","),
            )?;
        }
        for c in &f.service_checks {
            writeln!(
                out,
                "service_check {} status={} ts={} host={} message={:?} tags={}",
                c.name,
                c.status.code(),
                c.timestamp,
                c.host,
                c.message,
                c.tags.join(","),
            )?;
        }
        out.flush()
    }
}

fn join<'a>(tags: impl Iterator<Item = &'a str>) -> String {
    let mut s = String::new();
    for (i, t) in tags.enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(t);
    }
    s
}

impl<W: Write + Send> Output for Console<W> {
    fn emit(&mut self, flushed: Flushed) {
        // stdout closed (e.g. piped into `head`) is not a reason to stop aggregating.
        let _ = self.write_all(&flushed);
    }
}
