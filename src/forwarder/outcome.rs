//! What a request to the intake came to: the answer, its class (sent, dropped, retried), the
//! backoff a retry waits, and the forwarder's counters, which keep each outcome with its
//! endpoint and status and each network failure with its cause.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::flush::Data;
use crate::serializer::Endpoint;
use crate::telemetry::{labels, Counter, Gauge, Label, PerLabel, Readings, Snapshot};

labels! {
    /// Why a request got no HTTP answer.
    #[derive(PartialOrd, Ord)]
    pub enum Cause: "cause" {
        /// `--request-timeout-ms` passed.
        Timeout = "timeout",
        /// The intake's host name did not resolve.
        Dns = "dns",
        /// No connection: refused, unreachable, or the proxy refused it.
        Connect = "connect",
        /// The TLS handshake failed (an untrusted certificate, a protocol mismatch).
        Tls = "tls",
        /// The connection broke while the request or its answer was on the way (reset, closed).
        Io = "io",
        /// The intake answered something that is not HTTP.
        Protocol = "protocol",
    }
}

impl Cause {
    /// The cause of a failed request.
    pub fn of(e: &ureq::Error) -> Cause {
        use std::io::ErrorKind;
        match e {
            ureq::Error::Timeout(_) => Cause::Timeout,
            ureq::Error::HostNotFound => Cause::Dns,
            ureq::Error::ConnectionFailed | ureq::Error::ConnectProxyFailed(_) => Cause::Connect,
            ureq::Error::Tls(_)
            | ureq::Error::Rustls(_)
            | ureq::Error::Pem(_)
            | ureq::Error::TlsRequired => Cause::Tls,
            ureq::Error::Io(io) => match io.kind() {
                ErrorKind::TimedOut => Cause::Timeout,
                ErrorKind::ConnectionRefused
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::AddrNotAvailable => Cause::Connect,
                // rustls reports every TLS failure (an untrusted certificate among them) as
                // invalid data; plain HTTP parse errors come as `Protocol`.
                ErrorKind::InvalidData => Cause::Tls,
                _ => Cause::Io,
            },
            _ => Cause::Protocol,
        }
    }
}

/// The answer to one request: an HTTP status, or the cause of getting none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
    Failed(Cause),
}

/// What an answer means for its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Sent,
    Drop(u16),
    Retry(Answer),
}

/// docs/behaviour.md, "Delivery": 2xx is sent; 400, 403 and 413 are dropped; anything else,
/// an answer or none, is retried. A 3xx (never followed) is retried too: it is a
/// misconfigured `--dd-url`, and the payloads wait, bounded, until SIGHUP fixes it.
pub(crate) fn classify(answer: Answer) -> Class {
    match answer {
        Answer::Status(s) if (200..300).contains(&s) => Class::Sent,
        Answer::Status(s @ (400 | 403 | 413)) => Class::Drop(s),
        other => Class::Retry(other),
    }
}

/// Backoff before the next try after `failures` consecutive failures: base · 2ⁿ⁻¹, capped at
/// `max` (2 s … 64 s by default), jittered to between half and all of it so endpoints do
/// not retry in lockstep.
pub(crate) fn backoff(failures: u32, base: Duration, max: Duration, jitter: u64) -> Duration {
    let doubled = (base.as_millis() as u64).saturating_mul(1 << failures.saturating_sub(1).min(32));
    let ms = doubled.min(max.as_millis() as u64);
    Duration::from_millis(ms / 2 + jitter % (ms / 2 + 1))
}

/// What happened to a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// A retryable failure.
    Retried(Answer),
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
            300..=399 => "3xx",
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
            Outcome::Retried(Answer::Status(s)) => ("retried", status(s)),
            Outcome::Retried(Answer::Failed(_)) => ("retried", "network"),
            Outcome::Dropped(s) => ("dropped", status(s)),
            Outcome::DroppedQueueFull => ("dropped", "retry_queue_full"),
            Outcome::DroppedShutdown => ("dropped", "shutdown"),
            Outcome::Spilled => ("spilled", "disk"),
            Outcome::DroppedDiskFull => ("dropped", "retry_dir_full"),
            Outcome::DroppedUnreadable => ("dropped", "retry_dir_unreadable"),
        }
    }
}

/// The forwarder's counters. Outcomes are kept sparse: only what happened is reported.
#[derive(Debug, Default)]
pub struct Counters {
    /// The intake these count for, carried by every reading as `intake="…"` when there are
    /// several (dual shipping); `None` when there is one.
    intake: Option<&'static str>,
    /// An additional intake's: the serializer's counters are the main one's alone.
    additional: bool,
    /// Payloads per (endpoint, outcome, status).
    payloads: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
    /// Requests that got no answer, per (endpoint, cause).
    network_errors: Mutex<BTreeMap<(&'static str, Cause), u64>>,
    /// Items dropped by the serializer because alone they exceed a payload limit.
    pub oversized_items: Counter,
    /// Items not sent because their kind is turned off (`--enable-payloads-*`).
    pub disabled: PerLabel<Data, Counter, { Data::COUNT }>,
    /// Bytes of payloads waiting in memory.
    pub retry_queue_bytes: Gauge,
    /// Bytes of payloads waiting in `--retry-dir`.
    pub retry_dir_bytes: Gauge,
    /// Settled payloads whose files in `--retry-dir` could not be deleted (emptied instead,
    /// or not even that).
    pub retry_dir_errors: Counter,
}

impl Counters {
    /// The counters of the intake named `intake` (its address, never its key; `None` when
    /// it is the only one); `additional` for each but the main one.
    pub fn of_intake(intake: Option<&'static str>, additional: bool) -> Counters {
        Counters {
            intake,
            additional,
            ..Counters::default()
        }
    }

    pub fn count(&self, endpoint: Endpoint, outcome: Outcome) {
        let (o, status) = outcome.labels();
        let mut map = self.payloads.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((endpoint.path(), o, status)).or_default() += 1;
        drop(map);
        if let Outcome::Retried(Answer::Failed(cause)) = outcome {
            let mut map = self
                .network_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *map.entry((endpoint.path(), cause)).or_default() += 1;
        }
    }
}

impl Readings for Counters {
    fn read(&self, out: &mut Snapshot) {
        let intake = self.intake.map(|i| ("intake", i));
        let with = |labels: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
            labels.iter().copied().chain(intake).collect()
        };
        if !self.additional {
            let oversized = self.oversized_items.get();
            out.counter("whippet_serializer_oversized_items_total", &[], oversized);
            out.per_label("whippet_disabled_items_total", &self.disabled);
        }
        let queued = self.retry_queue_bytes.get();
        out.gauge("whippet_retry_queue_bytes", &with(&[]), queued);
        out.gauge(
            "whippet_retry_dir_bytes",
            &with(&[]),
            self.retry_dir_bytes.get(),
        );
        let errors = self.retry_dir_errors.get();
        out.counter("whippet_retry_dir_errors_total", &with(&[]), errors);
        let payloads = self.payloads.lock().unwrap_or_else(|e| e.into_inner());
        for (&(endpoint, outcome, status), &n) in payloads.iter() {
            let labels = [
                ("endpoint", endpoint),
                ("outcome", outcome),
                ("status", status),
            ];
            out.counter("whippet_payloads_total", &with(&labels), n);
        }
        drop(payloads);
        let errors = self
            .network_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (&(endpoint, cause), &n) in errors.iter() {
            let labels = [("endpoint", endpoint), (Cause::NAME, cause.label())];
            out.counter("whippet_network_errors_total", &with(&labels), n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_classified_as_the_behaviour_contract_says() {
        let status = Answer::Status;
        let cases = [
            (status(200), Class::Sent),
            (status(202), Class::Sent),
            (status(400), Class::Drop(400)),
            (status(403), Class::Drop(403)),
            (status(413), Class::Drop(413)),
            (status(404), Class::Retry(status(404))),
            (status(408), Class::Retry(status(408))),
            (status(429), Class::Retry(status(429))),
            (status(500), Class::Retry(status(500))),
            (status(503), Class::Retry(status(503))),
        ];
        for (answer, want) in cases {
            assert_eq!(classify(answer), want, "{answer:?}");
        }
        for cause in Cause::ALL {
            let failed = Answer::Failed(*cause);
            assert_eq!(classify(failed), Class::Retry(failed));
        }
    }

    #[test]
    fn backoff_doubles_from_two_seconds_caps_at_64_and_jitters_within_half() {
        let bounds = [
            (1, 2),
            (2, 4),
            (3, 8),
            (4, 16),
            (5, 32),
            (6, 64),
            (7, 64),
            (30, 64),
        ];
        for (failures, cap) in bounds {
            let base = Duration::from_secs(2);
            let max = Duration::from_secs(64);
            let lo = backoff(failures, base, max, 0);
            let hi = backoff(failures, base, max, u64::MAX - 1);
            assert_eq!(lo, Duration::from_millis(cap * 500), "{failures}");
            assert!(
                hi <= Duration::from_secs(cap) && hi >= lo,
                "{failures}: {hi:?}"
            );
        }
        // The Agent's forwarder_backoff_max, lower than 32 × base: 2 s, 4 s, 5 s, 5 s.
        let max = Duration::from_secs(5);
        let lows: Vec<u64> = (1..=4)
            .map(|n| backoff(n, Duration::from_secs(2), max, 0).as_millis() as u64)
            .collect();
        assert_eq!(lows, [1000, 2000, 2500, 2500]);
    }

    #[test]
    fn errors_without_an_answer_are_labelled_by_their_cause() {
        use std::io::{Error, ErrorKind};
        let cases = [
            (ureq::Error::HostNotFound, Cause::Dns),
            (ureq::Error::ConnectionFailed, Cause::Connect),
            (
                ureq::Error::Io(Error::from(ErrorKind::ConnectionRefused)),
                Cause::Connect,
            ),
            (
                ureq::Error::Io(Error::from(ErrorKind::ConnectionReset)),
                Cause::Io,
            ),
            (
                ureq::Error::Io(Error::from(ErrorKind::TimedOut)),
                Cause::Timeout,
            ),
            (ureq::Error::Tls("handshake"), Cause::Tls),
            (
                ureq::Error::Io(Error::from(ErrorKind::InvalidData)),
                Cause::Tls,
            ),
            (ureq::Error::BodyStalled, Cause::Protocol),
        ];
        for (e, want) in cases {
            assert_eq!(Cause::of(&e), want, "{e}");
        }
    }

    #[test]
    fn a_network_failure_counts_as_a_retry_and_under_its_cause() {
        let c = Counters::default();
        let timeout = Outcome::Retried(Answer::Failed(Cause::Timeout));
        c.count(Endpoint::SeriesV2, timeout);
        c.count(Endpoint::SeriesV2, timeout);
        c.count(Endpoint::Events, Outcome::Retried(Answer::Status(503)));
        let s = Snapshot::of(&[&c]);
        let retried = [
            ("endpoint", "/api/v2/series"),
            ("outcome", "retried"),
            ("status", "network"),
        ];
        assert_eq!(s.get("whippet_payloads_total", &retried), 2);
        let cause = [("endpoint", "/api/v2/series"), ("cause", "timeout")];
        assert_eq!(s.get("whippet_network_errors_total", &cause), 2);
        let events = [
            ("endpoint", "/intake/"),
            ("outcome", "retried"),
            ("status", "5xx"),
        ];
        assert_eq!(s.get("whippet_payloads_total", &events), 1);
        assert_eq!(
            s.readings
                .iter()
                .filter(|r| r.name == "whippet_network_errors_total")
                .count(),
            1
        );
    }
}
