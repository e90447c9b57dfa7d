//! The intake's own decoding of Datadog protobuf payloads: message types derived with prost
//! straight from DataDog/agent-payload `proto/metrics/agent_payload.proto`, written apart from
//! whippet's hand-written encoder so a round trip is not our code checking itself.

use serde_json::{json, Value};

#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricPayload {
    #[prost(message, repeated, tag = "1")]
    pub series: Vec<MetricSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricSeries {
    #[prost(message, repeated, tag = "1")]
    pub resources: Vec<Resource>,
    #[prost(string, tag = "2")]
    pub metric: String,
    #[prost(string, repeated, tag = "3")]
    pub tags: Vec<String>,
    #[prost(message, repeated, tag = "4")]
    pub points: Vec<MetricPoint>,
    /// MetricType: 0 UNSPECIFIED, 1 COUNT, 2 RATE, 3 GAUGE.
    #[prost(int32, tag = "5")]
    pub r#type: i32,
    #[prost(string, tag = "6")]
    pub unit: String,
    #[prost(string, tag = "7")]
    pub source_type_name: String,
    #[prost(int64, tag = "8")]
    pub interval: i64,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<Metadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(string, tag = "2")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricPoint {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    #[prost(message, optional, tag = "1")]
    pub origin: Option<Origin>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Origin {
    #[prost(uint32, tag = "4")]
    pub origin_product: u32,
    #[prost(uint32, tag = "5")]
    pub origin_category: u32,
    #[prost(uint32, tag = "6")]
    pub origin_service: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SketchPayload {
    #[prost(message, repeated, tag = "1")]
    pub sketches: Vec<Sketch>,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<CommonMetadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CommonMetadata {
    #[prost(string, tag = "1")]
    pub agent_version: String,
    #[prost(string, tag = "2")]
    pub timezone: String,
    #[prost(double, tag = "3")]
    pub current_epoch: f64,
    #[prost(string, tag = "4")]
    pub internal_ip: String,
    #[prost(string, tag = "5")]
    pub public_ip: String,
    #[prost(string, tag = "6")]
    pub api_key: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sketch {
    #[prost(string, tag = "1")]
    pub metric: String,
    #[prost(string, tag = "2")]
    pub host: String,
    #[prost(string, repeated, tag = "4")]
    pub tags: Vec<String>,
    #[prost(message, repeated, tag = "7")]
    pub dogsketches: Vec<Dogsketch>,
    #[prost(message, optional, tag = "8")]
    pub metadata: Option<Metadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Dogsketch {
    #[prost(int64, tag = "1")]
    pub ts: i64,
    #[prost(int64, tag = "2")]
    pub cnt: i64,
    #[prost(double, tag = "3")]
    pub min: f64,
    #[prost(double, tag = "4")]
    pub max: f64,
    #[prost(double, tag = "5")]
    pub avg: f64,
    #[prost(double, tag = "6")]
    pub sum: f64,
    #[prost(sint32, repeated, tag = "7")]
    pub k: Vec<i32>,
    #[prost(uint32, repeated, tag = "8")]
    pub n: Vec<u32>,
}

fn metadata_json(m: &Option<Metadata>) -> Value {
    match m.as_ref().and_then(|m| m.origin.as_ref()) {
        Some(o) => json!({"origin": {
            "origin_product": o.origin_product,
            "origin_category": o.origin_category,
            "origin_service": o.origin_service,
        }}),
        None => Value::Null,
    }
}

impl MetricPayload {
    pub(crate) fn to_json(&self) -> Value {
        let series: Vec<Value> = self
            .series
            .iter()
            .map(|s| {
                json!({
                    "resources": s.resources.iter().map(|r| json!({"type": r.r#type, "name": r.name})).collect::<Vec<_>>(),
                    "metric": s.metric,
                    "tags": s.tags,
                    "points": s.points.iter().map(|p| json!({"value": p.value, "timestamp": p.timestamp})).collect::<Vec<_>>(),
                    "type": s.r#type,
                    "unit": s.unit,
                    "source_type_name": s.source_type_name,
                    "interval": s.interval,
                    "metadata": metadata_json(&s.metadata),
                })
            })
            .collect();
        json!({ "series": series })
    }
}

impl SketchPayload {
    pub(crate) fn to_json(&self) -> Value {
        let sketches: Vec<Value> = self
            .sketches
            .iter()
            .map(|s| {
                json!({
                    "metric": s.metric,
                    "host": s.host,
                    "tags": s.tags,
                    "dogsketches": s.dogsketches.iter().map(|d| json!({
                        "ts": d.ts, "cnt": d.cnt, "min": d.min, "max": d.max,
                        "avg": d.avg, "sum": d.sum, "k": d.k, "n": d.n,
                    })).collect::<Vec<_>>(),
                    "metadata": metadata_json(&s.metadata),
                })
            })
            .collect();
        json!({ "sketches": sketches })
    }
}
