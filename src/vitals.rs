//! Vitals: whippet's own counters, sent with each flush as metrics under `whippet.`, so a
//! monitor in Datadog can alert on drops, on a failing intake, or on whippet being down
//! (its `whippet.running` series stops). The set is fixed ([`VITALS`], documented in
//! docs/behaviour.md, "Vitals"); `--self-metrics=false` turns it off.
//!
//! Counters go out as counts of what happened since the previous flush, only when
//! something did; gauges go out every flush. Each reading's labels become tags
//! (`reason:queue_full`), after the extra tags and `version:…`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::context::{ContextKey, ContextRef};
use crate::flush::{Flushed, Output, Series, SeriesKind};
use crate::parser::MetricKind;
use crate::telemetry::Snapshot;

/// Whether a vital is a count of what happened since the last flush, or a level now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Count,
    Gauge,
}

/// Each vital: the reading it comes from, the metric it is sent as, and its form.
pub const VITALS: &[(&str, &str, Form)] = &[
    ("whippet_packets_total", "whippet.packets", Form::Count),
    ("whippet_messages_total", "whippet.messages", Form::Count),
    ("whippet_samples_total", "whippet.samples", Form::Count),
    ("whippet_dropped_total", "whippet.dropped", Form::Count),
    (
        "whippet_packets_queue_full_total",
        "whippet.packets.queue_full",
        Form::Count,
    ),
    (
        "whippet_packets_truncated_total",
        "whippet.packets.truncated",
        Form::Count,
    ),
    (
        "whippet_parse_errors_total",
        "whippet.parse_errors",
        Form::Count,
    ),
    (
        "whippet_udp_kernel_drops",
        "whippet.udp.kernel_drops",
        Form::Count,
    ),
    ("whippet_payloads_total", "whippet.payloads", Form::Count),
    (
        "whippet_serializer_oversized_items_total",
        "whippet.serializer.oversized_items",
        Form::Count,
    ),
    ("whippet_flushes_total", "whippet.flushes", Form::Count),
    ("whippet_contexts", "whippet.contexts", Form::Gauge),
    ("whippet_queue_depth", "whippet.queue.depth", Form::Gauge),
    (
        "whippet_shard_lock_waits_total",
        "whippet.shard.lock_waits",
        Form::Count,
    ),
    (
        "whippet_retry_queue_bytes",
        "whippet.retry_queue.bytes",
        Form::Gauge,
    ),
    (
        "whippet_retry_dir_bytes",
        "whippet.retry_dir.bytes",
        Form::Gauge,
    ),
    (
        "whippet_aggregation_memory_bytes",
        "whippet.aggregation.memory_bytes",
        Form::Gauge,
    ),
];

/// The liveness series: 1 with every flush while whippet runs.
pub const RUNNING: &str = "whippet.running";

/// A reading's name and labels.
type Key = (&'static str, Vec<(&'static str, &'static str)>);

/// An output that adds the vitals to each flush before handing it on.
pub struct Vitals {
    inner: Box<dyn Output>,
    read: Box<dyn Fn() -> Snapshot + Send>,
    host: String,
    /// `version:…` and the extra tags, sorted.
    tags: Vec<String>,
    interval: i64,
    /// Each counter's value at the previous flush, by name and labels.
    last: HashMap<Key, u64>,
    suffix: Arc<str>,
}

impl Vitals {
    /// Wraps `inner`; `read` takes the telemetry snapshot at each flush.
    pub fn new(
        inner: Box<dyn Output>,
        read: Box<dyn Fn() -> Snapshot + Send>,
        host: &str,
        extra_tags: &[String],
        interval: i64,
    ) -> Vitals {
        let mut tags = vec![format!("version:{}", env!("CARGO_PKG_VERSION"))];
        tags.extend(extra_tags.iter().cloned());
        tags.sort();
        tags.dedup();
        Vitals {
            inner,
            read,
            host: host.to_string(),
            tags,
            interval,
            last: HashMap::new(),
            suffix: Arc::from(""),
        }
    }

    /// The vitals of `snapshot`, stamped `timestamp`, as series; remembers the counters.
    fn series(&mut self, snapshot: &Snapshot, timestamp: i64) -> Vec<Series> {
        let mut out = vec![self.one(RUNNING, &[], SeriesKind::Gauge, timestamp, 1.0)];
        for r in &snapshot.readings {
            let Some((_, metric, form)) = VITALS.iter().find(|(name, _, _)| *name == r.name) else {
                continue;
            };
            match form {
                Form::Gauge => {
                    let s = self.one(
                        metric,
                        &r.labels,
                        SeriesKind::Gauge,
                        timestamp,
                        r.value as f64,
                    );
                    out.push(s);
                }
                Form::Count => {
                    let before = self.last.insert((r.name, r.labels.clone()), r.value);
                    // A counter never goes down; one that did (the kernel's, for a socket
                    // that is gone) counts from its new value.
                    let delta = r.value.saturating_sub(before.unwrap_or(0));
                    if delta > 0 {
                        let s = self.one(
                            metric,
                            &r.labels,
                            SeriesKind::Count,
                            timestamp,
                            delta as f64,
                        );
                        out.push(s);
                    }
                }
            }
        }
        out
    }

    fn one(
        &self,
        metric: &str,
        labels: &[(&'static str, &'static str)],
        kind: SeriesKind,
        timestamp: i64,
        value: f64,
    ) -> Series {
        let mut tags: Vec<String> = self.tags.clone();
        tags.extend(labels.iter().map(|(k, v)| format!("{k}:{v}")));
        tags.sort();
        let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
        let context = ContextKey::new(&ContextRef {
            name: metric,
            host: &self.host,
            tags: &refs,
            kind: match kind {
                SeriesKind::Gauge => MetricKind::Gauge,
                _ => MetricKind::Count,
            },
        });
        Series {
            context,
            suffix: self.suffix.clone(),
            kind,
            interval: if kind == SeriesKind::Count {
                self.interval
            } else {
                0
            },
            timestamp,
            value,
        }
    }
}

impl Output for Vitals {
    fn emit(&mut self, mut flushed: Flushed) {
        let snapshot = (self.read)();
        // Stamped when read: they describe this moment, not a bucket.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let vitals = self.series(&snapshot, now);
        flushed.series.extend(vitals);
        self.inner.emit(flushed);
    }

    fn finish(&mut self) {
        self.inner.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Keep(std::sync::Arc<std::sync::Mutex<Vec<Flushed>>>);

    impl Output for Keep {
        fn emit(&mut self, flushed: Flushed) {
            self.0.lock().unwrap().push(flushed);
        }
    }

    fn shown(f: &Flushed) -> Vec<String> {
        f.series
            .iter()
            .map(|s| {
                format!(
                    "{} {} {} {}",
                    s.name(),
                    s.kind.label(),
                    s.value,
                    s.context.tags().collect::<Vec<_>>().join(",")
                )
            })
            .collect()
    }

    #[test]
    fn counters_go_out_as_what_happened_since_the_last_flush_and_gauges_as_they_are() {
        let values = std::sync::Arc::new(std::sync::Mutex::new(vec![5u64, 2, 7]));
        let v = values.clone();
        let read = Box::new(move || {
            let v = v.lock().unwrap().clone();
            let mut s = Snapshot::default();
            s.counter("whippet_samples_total", &[], v[0]);
            s.counter("whippet_dropped_total", &[("reason", "queue_full")], v[1]);
            s.gauge("whippet_contexts", &[], v[2]);
            s.counter("whippet_tags_filtered_total", &[], 9);
            s
        });
        let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let inner = Box::new(Keep(kept.clone()));
        let mut vitals = Vitals::new(inner, read, "h", &["env:prod".into()], 10);
        vitals.emit(Flushed::default());
        *values.lock().unwrap() = vec![8, 2, 3];
        vitals.emit(Flushed::default());
        let kept = kept.lock().unwrap();
        assert_eq!(
            shown(&kept[0]),
            [
                "whippet.running gauge 1 env:prod,version:0.1.0",
                "whippet.samples count 5 env:prod,version:0.1.0",
                "whippet.dropped count 2 env:prod,reason:queue_full,version:0.1.0",
                "whippet.contexts gauge 7 env:prod,version:0.1.0",
            ]
        );
        // Nothing dropped since: no dropped series.
        assert_eq!(
            shown(&kept[1]),
            [
                "whippet.running gauge 1 env:prod,version:0.1.0",
                "whippet.samples count 3 env:prod,version:0.1.0",
                "whippet.contexts gauge 3 env:prod,version:0.1.0",
            ]
        );
        assert!(kept[1].series.iter().all(|s| s.context.host() == "h"));
        assert_eq!(kept[1].series[1].interval, 10);
    }
}
