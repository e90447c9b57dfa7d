//! What the intake received: every accepted payload, raw and decoded, plus counters, with
//! flattened views (one record per point, sketch, event, check) for tests and `--print`.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use serde_json::Value;

use super::proto::{MetricPayload, SketchPayload};

/// A decoded payload.
#[derive(Debug, Clone)]
pub enum Decoded {
    Series(MetricPayload),
    SeriesV1(Value),
    Sketches(SketchPayload),
    Events(Value),
    ServiceChecks(Value),
}

impl Decoded {
    pub(crate) fn to_json(&self) -> Value {
        match self {
            Decoded::Series(p) => p.to_json(),
            Decoded::Sketches(p) => p.to_json(),
            Decoded::SeriesV1(v) | Decoded::Events(v) | Decoded::ServiceChecks(v) => v.clone(),
        }
    }
}

/// One accepted request.
#[derive(Debug, Clone)]
pub struct Stored {
    pub endpoint: String,
    /// The body as received (still compressed).
    pub raw: Vec<u8>,
    /// Its `Content-Encoding` (empty for none).
    pub encoding: String,
    pub content_type: String,
    pub user_agent: String,
    pub api_key: String,
    pub received: SystemTime,
    pub decoded: Decoded,
}

/// One series point, from a v1 or v2 payload.
#[derive(Debug, Clone, PartialEq)]
pub struct PointRecord {
    pub metric: String,
    pub host: String,
    pub device: Option<String>,
    /// Every resource of a v2 series, in order, as `type:name` (host and device included);
    /// empty for v1.
    pub resources: Vec<String>,
    pub tags: Vec<String>,
    /// "count", "rate", "gauge" (v2 types are mapped to these names).
    pub kind: String,
    pub interval: i64,
    pub timestamp: i64,
    pub value: f64,
}

/// One dogsketch with its series identity.
#[derive(Debug, Clone, PartialEq)]
pub struct SketchRecord {
    pub metric: String,
    pub host: String,
    pub tags: Vec<String>,
    pub ts: i64,
    pub cnt: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub avg: f64,
    pub k: Vec<i32>,
    pub n: Vec<u32>,
}

#[derive(Debug, Default)]
struct Inner {
    payloads: Vec<Stored>,
    /// Requests per route (accepted, rejected or failed on purpose).
    routes: BTreeMap<String, u64>,
    /// Rejected requests per reason.
    rejected: BTreeMap<String, u64>,
}

/// Shared by the request threads and whoever reads the intake.
#[derive(Debug, Default)]
pub struct Store {
    inner: Mutex<Inner>,
}

fn v2_kind(t: i32) -> &'static str {
    match t {
        1 => "count",
        2 => "rate",
        3 => "gauge",
        _ => "unspecified",
    }
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn record_route(&self, route: &str) {
        *self.lock().routes.entry(route.to_string()).or_default() += 1;
    }

    pub(crate) fn record_rejected(&self, reason: &str) {
        *self.lock().rejected.entry(reason.to_string()).or_default() += 1;
    }

    pub(crate) fn add(&self, stored: Stored) {
        self.lock().payloads.push(stored);
    }

    pub fn clear(&self) {
        self.lock().payloads.clear();
    }

    pub fn routes(&self) -> BTreeMap<String, u64> {
        self.lock().routes.clone()
    }

    pub fn rejected(&self) -> BTreeMap<String, u64> {
        self.lock().rejected.clone()
    }

    /// Accepted payloads for `endpoint` (all endpoints when `None`).
    pub fn payloads(&self, endpoint: Option<&str>) -> Vec<Stored> {
        self.lock()
            .payloads
            .iter()
            .filter(|p| endpoint.is_none_or(|e| p.endpoint == e))
            .cloned()
            .collect()
    }

    /// Every series point received, v1 and v2.
    pub fn points(&self) -> Vec<PointRecord> {
        points_of(&self.payloads(None))
    }

    /// Every dogsketch received.
    pub fn sketches(&self) -> Vec<SketchRecord> {
        sketches_of(&self.payloads(None))
    }

    /// Every event received, as its JSON object.
    pub fn events(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for p in self.payloads(None) {
            if let Decoded::Events(v) = &p.decoded {
                if let Some(groups) = v["events"].as_object() {
                    for list in groups.values() {
                        out.extend(list.as_array().cloned().unwrap_or_default());
                    }
                }
            }
        }
        out
    }

    /// Every service check received, as its JSON object.
    pub fn service_checks(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for p in self.payloads(None) {
            if let Decoded::ServiceChecks(v) = &p.decoded {
                out.extend(v.as_array().cloned().unwrap_or_default());
            }
        }
        out
    }
}

/// Flattens payloads into points.
pub fn points_of(payloads: &[Stored]) -> Vec<PointRecord> {
    let mut out = Vec::new();
    for p in payloads {
        match &p.decoded {
            Decoded::Series(m) => {
                for s in &m.series {
                    let resource = |t: &str| {
                        s.resources
                            .iter()
                            .find(|r| r.r#type == t)
                            .map(|r| r.name.clone())
                    };
                    for point in &s.points {
                        out.push(PointRecord {
                            metric: s.metric.clone(),
                            host: resource("host").unwrap_or_default(),
                            device: resource("device"),
                            resources: s
                                .resources
                                .iter()
                                .map(|r| format!("{}:{}", r.r#type, r.name))
                                .collect(),
                            tags: s.tags.clone(),
                            kind: v2_kind(s.r#type).to_string(),
                            interval: s.interval,
                            timestamp: point.timestamp,
                            value: point.value,
                        });
                    }
                }
            }
            Decoded::SeriesV1(v) => {
                for s in v["series"].as_array().into_iter().flatten() {
                    for point in s["points"].as_array().into_iter().flatten() {
                        out.push(PointRecord {
                            metric: s["metric"].as_str().unwrap_or_default().to_string(),
                            host: s["host"].as_str().unwrap_or_default().to_string(),
                            device: s["device"].as_str().map(str::to_string),
                            resources: Vec::new(),
                            tags: s["tags"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|t| t.as_str().map(str::to_string))
                                .collect(),
                            kind: s["type"].as_str().unwrap_or_default().to_string(),
                            interval: s["interval"].as_i64().unwrap_or_default(),
                            timestamp: point[0].as_i64().unwrap_or_default(),
                            value: point[1].as_f64().unwrap_or(f64::NAN),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Flattens payloads into dogsketches.
pub(crate) fn sketches_of(payloads: &[Stored]) -> Vec<SketchRecord> {
    let mut out = Vec::new();
    for p in payloads {
        if let Decoded::Sketches(m) = &p.decoded {
            for s in &m.sketches {
                for d in &s.dogsketches {
                    out.push(SketchRecord {
                        metric: s.metric.clone(),
                        host: s.host.clone(),
                        tags: s.tags.clone(),
                        ts: d.ts,
                        cnt: d.cnt,
                        min: d.min,
                        max: d.max,
                        sum: d.sum,
                        avg: d.avg,
                        k: d.k.clone(),
                        n: d.n.clone(),
                    });
                }
            }
        }
    }
    out
}
