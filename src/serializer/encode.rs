//! Encoding of single items in the intake formats (docs/behaviour.md, "Output"). Field
//! numbers follow DataDog/agent-payload `proto/metrics/agent_payload.proto`.
//!
//! ```text
//! MetricPayload { 1: repeated MetricSeries }
//! MetricSeries  { 1: repeated Resource{1 type, 2 name}, 2: metric, 3: repeated tags,
//!                 4: repeated MetricPoint{1 double value, 2 int64 timestamp}, 5: type,
//!                 8: interval, 9: Metadata{1: Origin{4 product, 5 category, 6 service}} }
//! SketchPayload { 1: repeated Sketch }
//! Sketch        { 1: metric, 2: host, 4: repeated tags, 7: repeated Dogsketch, 8: Metadata }
//! Dogsketch     { 1 ts, 2 cnt, 3 min, 4 max, 5 avg, 6 sum, 7 packed sint32 k, 8 packed uint32 n }
//! ```

use serde_json::{json, Value};

use super::protobuf as pb;
use super::{Compression, Endpoint, Payload, PayloadBuilder, Splitter};
use crate::flush::{Series, SketchPoint};
use crate::sample::{EventRecord, ServiceCheckRecord};

/// Origin of DogStatsD data, as the Agent stamps it: product Agent (10), category
/// DogStatsD (10), service 0.
const ORIGIN_PRODUCT: u64 = 10;
const ORIGIN_CATEGORY: u64 = 10;

fn metadata(buf: &mut Vec<u8>, field: u32) {
    // Metadata { origin: Origin { 4: product, 5: category } } (service 0 is omitted).
    let mut origin = Vec::with_capacity(4);
    pb::uint(&mut origin, 4, ORIGIN_PRODUCT);
    pb::uint(&mut origin, 5, ORIGIN_CATEGORY);
    let mut meta = Vec::with_capacity(8);
    pb::bytes(&mut meta, 1, &origin);
    pb::bytes(buf, field, &meta);
}

/// The prefix of a tag that names a resource of the series (`dd.internal.resource:<type>:<name>`).
const RESOURCE_TAG: &str = "dd.internal.resource:";

/// A resource tag's type and name; `None` when either is empty (the Agent drops those).
fn resource(tag: &str) -> Option<(&str, &str)> {
    let value = tag.strip_prefix(RESOURCE_TAG)?;
    let (kind, name) = value.split_once(':')?;
    (!kind.is_empty() && !name.is_empty()).then_some((kind, name))
}

/// One `MetricSeries` (as field 1 of `MetricPayload`) holding `points` of one series.
/// The `device:` tag becomes the `device` resource and each `dd.internal.resource:` tag a
/// resource of its own, after host and device in tag order; all of them leave the tags, as
/// in the Agent (docs/behaviour.md, "Output").
pub(crate) fn series_v2(buf: &mut Vec<u8>, points: &[&Series], scratch: &mut Vec<u8>) {
    let first = points[0];
    let c = &first.context;
    let mut series = Vec::with_capacity(64 + c.name().len() + 48 * c.tags().len());
    let mut inner = Vec::new();
    pb::message(&mut series, 1, &mut inner, |r| {
        pb::bytes(r, 1, b"host");
        pb::bytes(r, 2, c.host().as_bytes());
    });
    if let Some(device) = c.device() {
        pb::message(&mut series, 1, &mut inner, |r| {
            pb::bytes(r, 1, b"device");
            pb::bytes(r, 2, device.as_bytes());
        });
    }
    for (kind, name) in c.tags().filter_map(resource) {
        pb::message(&mut series, 1, &mut inner, |r| {
            pb::bytes(r, 1, kind.as_bytes());
            pb::bytes(r, 2, name.as_bytes());
        });
    }
    scratch.clear();
    scratch.extend_from_slice(c.name().as_bytes());
    scratch.extend_from_slice(first.suffix.as_bytes());
    pb::bytes(&mut series, 2, scratch);
    let plain = |t: &&str| !t.starts_with("device:") && !t.starts_with(RESOURCE_TAG);
    for tag in c.tags().filter(plain) {
        pb::bytes(&mut series, 3, tag.as_bytes());
    }
    for p in points {
        pb::message(&mut series, 4, &mut inner, |m| {
            pb::double(m, 1, p.value);
            pb::int64(m, 2, p.timestamp);
        });
    }
    pb::uint(&mut series, 5, first.kind as u64);
    pb::int64(&mut series, 8, first.interval);
    metadata(&mut series, 9);
    pb::bytes(buf, 1, &series);
}

/// One v1 JSON series: `{"metric":..,"points":[[ts,value]],"tags":[..],"host":..,
/// "type":..,"interval":..}` (plus `"device"` when the context has a `device:` tag).
pub(crate) fn series_v1(buf: &mut Vec<u8>, points: &[&Series]) {
    let first = points[0];
    let c = &first.context;
    let mut v = json!({
        "metric": format!("{}{}", c.name(), first.suffix),
        "points": points.iter().map(|p| json!([p.timestamp, p.value])).collect::<Vec<_>>(),
        "tags": c.tags().filter(|t| !t.starts_with("device:")).collect::<Vec<_>>(),
        "host": c.host(),
        "type": first.kind.label(),
        "interval": first.interval,
    });
    if let Some(device) = c.device() {
        v["device"] = Value::from(device);
    }
    // Serializing a `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, &v);
}

/// One `Sketch` (as field 1 of `SketchPayload`) holding one dogsketch per bucket.
pub fn sketch(buf: &mut Vec<u8>, points: &[&SketchPoint], scratch: &mut (Vec<u8>, Vec<u8>)) {
    let c = &points[0].context;
    let mut sketch = Vec::with_capacity(64 + c.name().len() + 48 * c.tags().len());
    pb::bytes(&mut sketch, 1, c.name().as_bytes());
    pb::bytes(&mut sketch, 2, c.host().as_bytes());
    for tag in c.tags() {
        pb::bytes(&mut sketch, 4, tag.as_bytes());
    }
    let (inner, packed) = scratch;
    for p in points {
        let s = p.sketch.summary();
        pb::message(&mut sketch, 7, inner, |d| {
            pb::int64(d, 1, p.timestamp);
            pb::int64(d, 2, s.count);
            pb::double(d, 3, s.min);
            pb::double(d, 4, s.max);
            pb::double(d, 5, s.avg);
            pb::double(d, 6, s.sum);
            let bins = p.sketch.bins();
            pb::packed_sint32(d, 7, bins.iter().map(|b| b.k as i32), packed);
            pb::packed_uint32(d, 8, bins.iter().map(|b| b.n as u32), packed);
        });
    }
    metadata(&mut sketch, 8);
    pb::bytes(buf, 1, &sketch);
}

/// Events payloads, one per source type: `{"apiKey":"","events":{"<source>":[..]},
/// "internalHostname":..}` where `<source>` is the source type, or `api` when empty.
pub fn events(
    events: &[EventRecord],
    hostname: &str,
    compression: Compression,
) -> Vec<(Endpoint, (Vec<Payload>, usize))> {
    let mut sources: Vec<&str> = events
        .iter()
        .map(|e| {
            if e.source_type.is_empty() {
                "api"
            } else {
                e.source_type.as_str()
            }
        })
        .collect();
    sources.sort_unstable();
    sources.dedup();
    let mut out = Vec::new();
    for source in sources {
        let header = format!("{{\"apiKey\":\"\",\"events\":{{{}:[", Value::from(source));
        let footer = format!("]}},\"internalHostname\":{}}}", Value::from(hostname));
        let builder = PayloadBuilder::new(
            Endpoint::Events,
            compression,
            header.as_bytes(),
            b",",
            footer.as_bytes(),
        );
        let mut split = Splitter::new(builder);
        for e in events.iter().filter(|e| {
            let s = if e.source_type.is_empty() {
                "api"
            } else {
                e.source_type.as_str()
            };
            s == source
        }) {
            split.add(event(e).to_string().as_bytes(), 1);
        }
        out.push((Endpoint::Events, split.finish()));
    }
    out
}

/// One event as the Agent writes it: empty tags, aggregation key and source type are left
/// out.
fn event(e: &EventRecord) -> Value {
    let mut v = json!({
        "msg_title": e.title,
        "msg_text": e.text,
        "timestamp": e.timestamp,
        "priority": e.priority.label(),
        "host": e.host,
        "alert_type": e.alert_type.label(),
    });
    if !e.tags.is_empty() {
        v["tags"] = Value::from(e.tags.clone());
    }
    if !e.aggregation_key.is_empty() {
        v["aggregation_key"] = Value::from(e.aggregation_key.as_str());
    }
    if !e.source_type.is_empty() {
        v["source_type_name"] = Value::from(e.source_type.as_str());
    }
    v
}

/// Service checks payloads: a JSON array of
/// `{"check","host_name","timestamp","status","message","tags"}`, where empty tags are
/// `null` (as the Agent writes them).
pub fn service_checks(
    checks: &[ServiceCheckRecord],
    compression: Compression,
) -> (Vec<Payload>, usize) {
    let mut split = Splitter::new(PayloadBuilder::new(
        Endpoint::ServiceChecks,
        compression,
        b"[",
        b",",
        b"]",
    ));
    for c in checks {
        let v = json!({
            "check": c.name,
            "host_name": c.host,
            "timestamp": c.timestamp,
            "status": c.status.code(),
            "message": c.message,
            "tags": if c.tags.is_empty() { Value::Null } else { Value::from(c.tags.clone()) },
        });
        split.add(v.to_string().as_bytes(), 1);
    }
    split.finish()
}
