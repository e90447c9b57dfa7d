//! Self-telemetry (SPEC §5): one struct of atomic counters, built once and shared by every
//! stage. Hot paths count into thread-local tallies and add them here once per batch, so no
//! cache line bounces per packet. [`Telemetry::snapshot`] reads everything as Prometheus-style
//! points; SIGUSR1 and shutdown write it to the log.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::parser::{Kind, Reason};
use crate::serializer::Endpoint;

/// Where packets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp = 0,
    Unix = 1,
    Stream = 2,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::Udp, Transport::Unix, Transport::Stream];

    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Unix => "unix",
            Transport::Stream => "unix_stream",
        }
    }
}

/// Why a message or sample was dropped after it was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// The packet queue was full (datagram transports only); counts messages.
    QueueFull = 0,
    /// A `|T` timestamp on a type other than gauge or count (SPEC §3.4).
    TimestampedUnsupported = 1,
    /// Too many events or service checks waiting for the next flush.
    EventBacklogFull = 2,
    /// A sample for a new context while `--context-limit` contexts are live.
    ContextLimit = 3,
}

impl Discard {
    pub const ALL: [Discard; 4] = [
        Discard::QueueFull,
        Discard::TimestampedUnsupported,
        Discard::EventBacklogFull,
        Discard::ContextLimit,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Discard::QueueFull => "queue_full",
            Discard::TimestampedUnsupported => "timestamped_unsupported",
            Discard::EventBacklogFull => "event_backlog_full",
            Discard::ContextLimit => "context_limit",
        }
    }
}

/// What happened to a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// A retryable failure: the status, or `None` for a network error or timeout.
    Retried(Option<u16>),
    /// Refused by the intake (400, 403, 413).
    Dropped(u16),
    /// The oldest waiting payload, pushed out of the full retry queue.
    DroppedQueueFull,
    /// Still waiting when the shutdown deadline passed.
    DroppedShutdown,
    /// Written to `--retry-dir` to wait there.
    Spilled,
    /// The oldest payload on disk, pushed out by `--retry-dir-bytes`, or one that could not
    /// be written there.
    DroppedDiskFull,
    /// A file in `--retry-dir` that could not be read back.
    DroppedUnreadable,
}

impl Outcome {
    /// (outcome, status) labels.
    fn labels(self) -> (&'static str, &'static str) {
        let status = |s: u16| match s {
            200..=299 => "2xx",
            400 => "400",
            403 => "403",
            404 => "404",
            408 => "408",
            413 => "413",
            429 => "429",
            500..=599 => "5xx",
            _ => "other",
        };
        match self {
            Outcome::Sent => ("sent", "2xx"),
            Outcome::Retried(Some(s)) => ("retried", status(s)),
            Outcome::Retried(None) => ("retried", "network"),
            Outcome::Dropped(s) => ("dropped", status(s)),
            Outcome::DroppedQueueFull => ("dropped", "retry_queue_full"),
            Outcome::DroppedShutdown => ("dropped", "shutdown"),
            Outcome::Spilled => ("spilled", "disk"),
            Outcome::DroppedDiskFull => ("dropped", "retry_dir_full"),
            Outcome::DroppedUnreadable => ("dropped", "retry_dir_unreadable"),
        }
    }
}

/// Counters of one transport.
#[derive(Debug, Default)]
pub struct TransportCounters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Datagrams longer than `--buffer-size`, detected with MSG_TRUNC and not parsed.
    pub truncated: AtomicU64,
    /// Packets dropped because the queue was full.
    pub queue_full_packets: AtomicU64,
    /// Receive errors other than interruptions.
    pub errors: AtomicU64,
    /// Stream only: connections accepted, refused over the cap, closed for an oversized
    /// frame, and closed with a partial frame pending.
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
    pub frames_too_large: AtomicU64,
    pub partial_frames: AtomicU64,
    /// Stream only: connections closed after `--stream-idle-timeout` without a byte.
    pub idle_closed: AtomicU64,
}

/// Every counter whippet keeps.
#[derive(Debug, Default)]
pub struct Telemetry {
    pub transports: [TransportCounters; 3],
    /// Messages parsed, per kind.
    pub messages: [AtomicU64; 3],
    /// Parse errors, per kind and reason.
    pub parse_errors: [[AtomicU64; Reason::COUNT]; 3],
    /// Messages or samples dropped after parsing, per reason.
    pub dropped: [AtomicU64; 4],
    /// `@rate` outside (0, 1], treated as 1.
    pub sample_rate_invalid: AtomicU64,
    /// Metric samples handed to shards (one per value).
    pub samples: AtomicU64,
    pub contexts_created: AtomicU64,
    pub contexts_expired: AtomicU64,
    /// Live contexts after the last flush.
    pub contexts: AtomicU64,
    pub flushes: AtomicU64,
    pub flushed_points: AtomicU64,
    pub flushed_sketches: AtomicU64,
    pub flushed_events: AtomicU64,
    pub flushed_service_checks: AtomicU64,
    /// Payloads per (endpoint, outcome, status).
    payloads: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
    /// Items dropped by the serializer because alone they exceed a payload limit.
    pub oversized_items: AtomicU64,
    /// Bytes of payloads waiting in the forwarder.
    pub retry_queue_bytes: AtomicU64,
    /// Bytes of payloads waiting in `--retry-dir`.
    pub retry_dir_bytes: AtomicU64,
}

impl Telemetry {
    pub fn transport(&self, t: Transport) -> &TransportCounters {
        &self.transports[t as usize]
    }

    pub fn count_payload(&self, endpoint: Endpoint, outcome: Outcome) {
        let (o, status) = outcome.labels();
        let mut map = self.payloads.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((endpoint.path(), o, status)).or_default() += 1;
    }

    pub fn drop_count(&self, reason: Discard, n: u64) {
        self.dropped[reason as usize].fetch_add(n, Relaxed);
    }

    /// All counters as points. `gauges` are read by the caller (queue depth, kernel drops).
    pub fn snapshot(&self, gauges: &[Point]) -> Snapshot {
        let mut points = Vec::new();
        let mut push = |name, labels: Vec<(&'static str, &'static str)>, v: &AtomicU64| {
            points.push(Point {
                name,
                labels,
                value: v.load(Relaxed),
            })
        };
        for t in Transport::ALL {
            let c = self.transport(t);
            let l = || vec![("transport", t.label())];
            push("whippet_packets_total", l(), &c.packets);
            push("whippet_bytes_total", l(), &c.bytes);
            push("whippet_packets_truncated_total", l(), &c.truncated);
            push(
                "whippet_packets_queue_full_total",
                l(),
                &c.queue_full_packets,
            );
            push("whippet_receive_errors_total", l(), &c.errors);
        }
        let stream = self.transport(Transport::Stream);
        push(
            "whippet_stream_connections_total",
            vec![],
            &stream.connections,
        );
        push(
            "whippet_stream_connections_refused_total",
            vec![],
            &stream.connections_refused,
        );
        push(
            "whippet_stream_frames_too_large_total",
            vec![],
            &stream.frames_too_large,
        );
        push(
            "whippet_stream_partial_frames_total",
            vec![],
            &stream.partial_frames,
        );
        push(
            "whippet_stream_idle_closed_total",
            vec![],
            &stream.idle_closed,
        );
        for k in Kind::ALL {
            push(
                "whippet_messages_total",
                vec![("kind", k.label())],
                &self.messages[k as usize],
            );
        }
        for k in Kind::ALL {
            for r in Reason::ALL {
                let v = &self.parse_errors[k as usize][r as usize];
                push(
                    "whippet_parse_errors_total",
                    vec![("kind", k.label()), ("reason", r.label())],
                    v,
                );
            }
        }
        for d in Discard::ALL {
            push(
                "whippet_dropped_total",
                vec![("reason", d.label())],
                &self.dropped[d as usize],
            );
        }
        push(
            "whippet_sample_rate_invalid_total",
            vec![],
            &self.sample_rate_invalid,
        );
        push("whippet_samples_total", vec![], &self.samples);
        push(
            "whippet_contexts_created_total",
            vec![],
            &self.contexts_created,
        );
        push(
            "whippet_contexts_expired_total",
            vec![],
            &self.contexts_expired,
        );
        push("whippet_contexts", vec![], &self.contexts);
        push("whippet_flushes_total", vec![], &self.flushes);
        push(
            "whippet_flushed_total",
            vec![("data", "points")],
            &self.flushed_points,
        );
        push(
            "whippet_flushed_total",
            vec![("data", "sketches")],
            &self.flushed_sketches,
        );
        push(
            "whippet_flushed_total",
            vec![("data", "events")],
            &self.flushed_events,
        );
        push(
            "whippet_flushed_total",
            vec![("data", "service_checks")],
            &self.flushed_service_checks,
        );
        push(
            "whippet_serializer_oversized_items_total",
            vec![],
            &self.oversized_items,
        );
        push("whippet_retry_queue_bytes", vec![], &self.retry_queue_bytes);
        push("whippet_retry_dir_bytes", vec![], &self.retry_dir_bytes);
        let payloads = self
            .payloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for ((endpoint, outcome, status), value) in payloads {
            points.push(Point {
                name: "whippet_payloads_total",
                labels: vec![
                    ("endpoint", endpoint),
                    ("outcome", outcome),
                    ("status", status),
                ],
                value,
            });
        }
        points.extend(gauges.iter().cloned());
        Snapshot { points }
    }
}

/// One counter or gauge reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub name: &'static str,
    pub labels: Vec<(&'static str, &'static str)>,
    pub value: u64,
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}=\"{v}\"")?;
            }
            f.write_str("}")?;
        }
        write!(f, " {}", self.value)
    }
}

/// All readings at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub points: Vec<Point>,
}

impl Snapshot {
    /// The value of the point with this name and exactly these labels (0 when absent).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.points
            .iter()
            .find(|p| {
                p.name == name
                    && p.labels.len() == labels.len()
                    && p.labels
                        .iter()
                        .zip(labels)
                        .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
            })
            .map_or(0, |p| p.value)
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.points {
            writeln!(f, "{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_reads_counters_by_name_and_labels() {
        let t = Telemetry::default();
        t.parse_errors[Kind::Metric as usize][Reason::UnknownType as usize].fetch_add(3, Relaxed);
        t.transport(Transport::Unix).packets.fetch_add(2, Relaxed);
        let s = t.snapshot(&[Point {
            name: "whippet_queue_depth",
            labels: vec![],
            value: 7,
        }]);
        let labels = [("kind", "metric"), ("reason", "unknown_type")];
        assert_eq!(s.get("whippet_parse_errors_total", &labels), 3);
        assert_eq!(s.get("whippet_packets_total", &[("transport", "unix")]), 2);
        assert_eq!(s.get("whippet_packets_total", &[("transport", "udp")]), 0);
        assert_eq!(s.get("whippet_queue_depth", &[]), 7);
        let text = s.to_string();
        assert!(text
            .contains("whippet_parse_errors_total{kind=\"metric\",reason=\"unknown_type\"} 3\n"));
    }
}
