//! End to end: the real `whippet` binary → real sockets → the in-process test intake, which
//! decodes with its own prost types. Values are asserted exactly, per series API and per
//! compression, and the forwarder's retry and drop rules are checked with injected faults.

use std::collections::BTreeMap;

use whippet::intake::store::{PointRecord, SketchRecord};
use whippet::intake::{Intake, IntakeConfig};

use crate::support::{intake, Stopped, Whippet};
use crate::transports::PAYLOAD;

const INTERVAL: f64 = 1e9;
const BUCKET: i64 = 1_000_000_000;

/// whippet forwarding to `intake` with an API key and fast retries, plus `extra` flags.
fn whippet_to(intake: &Intake, extra: &[&str]) -> Whippet {
    let mut args = vec!["--api-key", "test-key", "--retry-base-ms", "10"];
    args.extend_from_slice(extra);
    Whippet::to_intake(&intake.url(), &args)
}

/// The one point named `metric` with exactly these tags.
fn point(points: &[PointRecord], metric: &str, tags: &[&str]) -> PointRecord {
    let found: Vec<&PointRecord> = points
        .iter()
        .filter(|p| p.metric == metric && p.tags == tags)
        .collect();
    assert_eq!(found.len(), 1, "{metric} {tags:?} in {points:#?}");
    found[0].clone()
}

fn assert_every_type_arrived(intake: &Intake, s: &Stopped) {
    assert!(s.status.success(), "{:?}", s.stderr);
    let points = intake.store().points();
    let c = point(&points, "c", &["env:dev"]);
    assert_eq!(
        (c.kind.as_str(), c.host.as_str(), c.interval, c.timestamp),
        ("rate", "test-host", BUCKET, BUCKET)
    );
    assert_eq!(c.value, (1.0 + 2.0 * (1.0 / 0.5) + 1.0 + 3.0) / INTERVAL);
    let g = point(&points, "g", &[]);
    assert_eq!((g.kind.as_str(), g.value), ("gauge", 5.0));
    assert_eq!(point(&points, "s", &[]).value, 3.0);
    assert_eq!(point(&points, "h.max", &[]).value, 10.0);
    assert_eq!(point(&points, "h.median", &[]).value, 3.0);
    assert_eq!(point(&points, "h.avg", &[]).value, 5.0);
    let count = point(&points, "h.count", &[]);
    assert_eq!((count.kind.as_str(), count.value), ("rate", 6.0 / INTERVAL));
    assert_eq!(point(&points, "h.95percentile", &[]).value, 10.0);
    assert_eq!(point(&points, "t.max", &[]).value, 7.0);
    let tg = point(&points, "tg", &[]);
    assert_eq!((tg.timestamp, tg.value), (1_700_000_000, 7.0));
    let tc = point(&points, "tc", &[]);
    assert_eq!(
        (tc.kind.as_str(), tc.timestamp, tc.value),
        ("rate", 1_700_000_001, 30.0 / INTERVAL)
    );
    assert_eq!(point(&points, "tagged", &["a", "b"]).host, "web9");
    assert_eq!(point(&points, "nohost", &[]).host, "");
    assert_eq!(points.len(), 17, "{points:#?}");

    let sketches = intake.store().sketches();
    assert_eq!(sketches.len(), 1);
    let d: &SketchRecord = &sketches[0];
    assert_eq!(
        (d.metric.as_str(), d.host.as_str(), d.ts, d.cnt),
        ("d", "test-host", BUCKET, 4)
    );
    assert_eq!((d.min, d.max, d.sum, d.avg), (1.0, 100.0, 211.0, 52.75));
    let keys = [
        whippet::sketch::key(1.0) as i32,
        whippet::sketch::key(10.0) as i32,
        whippet::sketch::key(100.0) as i32,
    ];
    assert_eq!(
        (d.k.as_slice(), d.n.as_slice()),
        (&keys[..], &[1u32, 1, 2][..])
    );

    let events = intake.store().events();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(
        (e["msg_title"].as_str(), e["msg_text"].as_str()),
        (Some("deploy"), Some("v2\nrolled"))
    );
    assert_eq!(
        (e["priority"].as_str(), e["alert_type"].as_str()),
        (Some("low"), Some("success"))
    );
    assert_eq!(
        (e["host"].as_str(), e["tags"][0].as_str()),
        (Some("test-host"), Some("svc:api"))
    );
    let checks = intake.store().service_checks();
    assert_eq!(checks.len(), 1);
    let c = &checks[0];
    assert_eq!(
        (
            c["check"].as_str(),
            c["status"].as_i64(),
            c["host_name"].as_str()
        ),
        (Some("db.up"), Some(2), Some("db1"))
    );
    assert_eq!(
        (c["message"].as_str(), c["tags"][0].as_str()),
        (Some("connection refused"), Some("role:primary"))
    );
}

#[test]
fn every_type_arrives_exactly_over_v2_protobuf_with_each_compression() {
    for compression in ["zstd", "deflate", "none"] {
        let intake = intake(IntakeConfig::default());
        let w = whippet_to(&intake, &["--compression", compression]);
        w.send_udp(PAYLOAD.as_bytes());
        let s = w.stop();
        assert_every_type_arrived(&intake, &s);
        let encoding = if compression == "none" {
            ""
        } else {
            compression
        };
        for p in intake.store().payloads(None) {
            assert_eq!(p.encoding, encoding, "{}", p.endpoint);
        }
        assert_eq!(intake.store().payloads(Some("/api/v2/series")).len(), 1);
        intake.stop();
    }
}

#[test]
fn every_type_arrives_exactly_over_v1_json() {
    let intake = intake(IntakeConfig::default());
    let w = whippet_to(&intake, &["--series-api", "v1", "--compression", "deflate"]);
    w.send_unix(PAYLOAD.as_bytes());
    let s = w.stop();
    assert_every_type_arrived(&intake, &s);
    assert_eq!(intake.store().payloads(Some("/api/v1/series")).len(), 1);
    assert!(intake.store().payloads(Some("/api/v2/series")).is_empty());
    intake.stop();
}

#[test]
fn a_v2_payload_decodes_field_by_field_with_the_agent_payload_schema() {
    let intake = intake(IntakeConfig::default());
    let w = whippet_to(&intake, &[]);
    w.send_udp(b"disk.used:5|g|#device:sda,env:prod");
    let s = w.stop();
    assert!(s.status.success());
    let stored = intake.store().payloads(Some("/api/v2/series"));
    assert_eq!(stored.len(), 1);
    // Decode the raw body again, independently of the store's flattening.
    let body = whippet::intake::decompress(&stored[0].encoding, &stored[0].raw).unwrap();
    let payload: whippet::intake::proto::MetricPayload = prost::Message::decode(&body[..]).unwrap();
    assert_eq!(payload.series.len(), 1);
    let series = &payload.series[0];
    let resources: Vec<(&str, &str)> = series
        .resources
        .iter()
        .map(|r| (r.r#type.as_str(), r.name.as_str()))
        .collect();
    assert_eq!(resources, [("host", "test-host"), ("device", "sda")]);
    assert_eq!(series.metric, "disk.used");
    assert_eq!(series.tags, ["env:prod"]);
    assert_eq!(series.points.len(), 1);
    assert_eq!(
        (series.points[0].value, series.points[0].timestamp),
        (5.0, BUCKET)
    );
    assert_eq!(series.r#type, 3); // GAUGE
    assert_eq!(series.interval, BUCKET);
    assert_eq!(
        (series.unit.as_str(), series.source_type_name.as_str()),
        ("", "")
    );
    let origin = series
        .metadata
        .as_ref()
        .and_then(|m| m.origin.as_ref())
        .expect("origin");
    assert_eq!(
        (
            origin.origin_product,
            origin.origin_category,
            origin.origin_service
        ),
        (10, 10, 0)
    );
    intake.stop();
}

#[test]
fn a_hundred_thousand_contexts_split_into_payloads_and_every_point_arrives_once() {
    const CONTEXTS: usize = 100_000;
    let intake = intake(IntakeConfig::default());
    let w = whippet_to(&intake, &[]);
    let mut frames = Vec::new();
    let mut frame = String::new();
    for i in 0..CONTEXTS {
        let line = format!("split.metric.{i}:{i}|g|#shard:{},env:test\n", i % 97);
        if frame.len() + line.len() > 8000 {
            frames.push(std::mem::take(&mut frame));
        }
        frame.push_str(&line);
    }
    frames.push(frame);
    let frames: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes()).collect();
    w.send_stream(&frames);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let payloads = intake.store().payloads(Some("/api/v2/series"));
    assert!(
        payloads.len() >= CONTEXTS / 10_000,
        "{} payloads",
        payloads.len()
    );
    let mut per_payload_points = Vec::new();
    for p in &payloads {
        assert!(p.raw.len() <= 512_000, "compressed {}", p.raw.len());
        let body = whippet::intake::decompress(&p.encoding, &p.raw).unwrap();
        assert!(body.len() <= 5_242_880, "uncompressed {}", body.len());
        let n = whippet::intake::store::points_of(std::slice::from_ref(p)).len();
        assert!(n <= 10_000, "{n} points");
        per_payload_points.push(n);
    }
    let points = intake.store().points();
    assert_eq!(points.len(), CONTEXTS);
    let mut seen: BTreeMap<String, f64> = BTreeMap::new();
    for p in &points {
        assert!(
            seen.insert(p.metric.clone(), p.value).is_none(),
            "{} twice",
            p.metric
        );
    }
    for i in [0, 1, 4999, 50_000, CONTEXTS - 1] {
        assert_eq!(seen[&format!("split.metric.{i}")], i as f64);
    }
    assert_eq!(
        s.telemetry(
            r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="sent",status="2xx"}"#
        ),
        payloads.len() as u64
    );
    assert_eq!(s.telemetry("whippet_serializer_oversized_items_total"), 0);
    intake.stop();
}

#[test]
fn service_unavailable_then_success_loses_nothing_and_sends_nothing_twice() {
    let intake = intake(IntakeConfig {
        fail: Some((503, 3)),
        ..IntakeConfig::default()
    });
    let w = whippet_to(&intake, &["--forwarder-threads", "1"]);
    w.send_udp(b"retry.me:7|c\nretry.gauge:3|g");
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let points = intake.store().points();
    assert_eq!(point(&points, "retry.me", &[]).value, 7.0 / INTERVAL);
    assert_eq!(point(&points, "retry.gauge", &[]).value, 3.0);
    assert_eq!(points.len(), 2);
    assert_eq!(intake.store().rejected().get("injected_503"), Some(&3));
    assert_eq!(
        s.telemetry(
            r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="retried",status="5xx"}"#
        ),
        3
    );
    assert_eq!(
        s.telemetry(
            r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="sent",status="2xx"}"#
        ),
        1
    );
    intake.stop();
}

#[test]
fn bad_request_forbidden_and_too_large_are_dropped_and_counted() {
    for status in [400u16, 413] {
        let intake = intake(IntakeConfig {
            fail: Some((status, 1)),
            ..IntakeConfig::default()
        });
        let w = whippet_to(&intake, &[]);
        w.send_udp(b"refused:1|g");
        let s = w.stop();
        assert!(s.status.success());
        assert!(intake.store().points().is_empty());
        let key = format!(
            r#"whippet_payloads_total{{endpoint="/api/v2/series",outcome="dropped",status="{status}"}}"#
        );
        assert_eq!(s.telemetry(&key), 1, "{status}");
        intake.stop();
    }
    let intake = intake(IntakeConfig {
        api_key: Some("the-right-key".into()),
        ..IntakeConfig::default()
    });
    let w = whippet_to(&intake, &[]); // sends "test-key"
    w.send_udp(b"refused:1|g\n_sc|x|0");
    let s = w.stop();
    assert!(intake.store().payloads(None).is_empty());
    assert_eq!(
        s.telemetry(
            r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="dropped",status="403"}"#
        ),
        1
    );
    assert_eq!(
        s.telemetry(
            r#"whippet_payloads_total{endpoint="/api/v1/check_run",outcome="dropped",status="403"}"#
        ),
        1
    );
    assert!(
        s.stderr.iter().any(|l| l.contains("invalid API key")),
        "{:?}",
        s.stderr
    );
    assert!(
        !s.stderr
            .iter()
            .chain(&s.stdout)
            .any(|l| l.contains("test-key")),
        "the key leaked"
    );
    intake.stop();
}

#[test]
fn payloads_beyond_the_retry_queue_bound_are_dropped_oldest_first_and_counted() {
    let intake = intake(IntakeConfig {
        fail: Some((503, u64::MAX)),
        ..IntakeConfig::default()
    });
    // One byte of room: every payload pushes out whatever waited before it, itself included.
    let w = whippet_to(
        &intake,
        &["--retry-queue-bytes", "1", "--shutdown-timeout", "200ms"],
    );
    w.send_udp(
        b"queued:1|g
_sc|queued|0",
    );
    let s = w.stop();
    assert!(s.status.success());
    assert!(intake.store().points().is_empty());
    let dropped = |endpoint: &str| {
        s.telemetry(&format!(r#"whippet_payloads_total{{endpoint="{endpoint}",outcome="dropped",status="retry_queue_full"}}"#))
    };
    assert_eq!(dropped("/api/v2/series") + dropped("/api/v1/check_run"), 2);
    assert_eq!(s.telemetry("whippet_retry_queue_bytes"), 0);
    intake.stop();
}

#[test]
fn an_intake_that_never_answers_costs_the_shutdown_timeout_and_the_drop_is_counted() {
    // A port nothing listens on: every attempt is a network error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let w = Whippet::start(&[
        "--dd-url",
        &url,
        "--retry-base-ms",
        "10",
        "--shutdown-timeout",
        "300ms",
    ]);
    w.send_udp(b"lost:1|g");
    let s = w.stop();
    assert!(s.status.success());
    assert!(s.telemetry(r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="retried",status="network"}"#) >= 1);
    assert_eq!(s.telemetry(r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="dropped",status="shutdown"}"#), 1);
    // Nothing listens: every failure is a refused connection.
    assert_eq!(
        s.telemetry(r#"whippet_payloads_total{endpoint="/api/v2/series",outcome="retried",status="network"}"#),
        s.telemetry(r#"whippet_network_errors_total{endpoint="/api/v2/series",cause="connect"}"#)
    );
}

#[test]
fn a_real_dogstatsd_client_library_reaches_the_intake_over_udp_and_the_unix_socket() {
    use cadence::prelude::*;
    use cadence::{StatsdClient, UdpMetricSink, UnixMetricSink};

    let intake = intake(IntakeConfig::default());
    let w = whippet_to(&intake, &[]);
    let udp = StatsdClient::from_sink(
        "app",
        UdpMetricSink::from(
            w.udp.unwrap(),
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        )
        .unwrap(),
    );
    let unix = StatsdClient::from_sink(
        "app",
        UnixMetricSink::from(
            w.socket.clone().unwrap(),
            std::os::unix::net::UnixDatagram::unbound().unwrap(),
        ),
    );
    for client in [&udp, &unix] {
        client
            .count_with_tags("requests", 3)
            .with_tag("route", "home")
            .send();
        client.gauge("queue.depth", 12).unwrap();
        client.time("latency", 25).unwrap();
        client.histogram("payload.size", 512).unwrap();
        client.distribution("work.ms", 40).unwrap();
        client.set("users", 42).unwrap();
    }
    unix.set("users", 43).unwrap();
    w.wait_for_udp_packets(6); // one datagram per metric from the UDP client
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let points = intake.store().points();
    assert_eq!(
        point(&points, "app.requests", &["route:home"]).value,
        6.0 / INTERVAL
    );
    assert_eq!(point(&points, "app.queue.depth", &[]).value, 12.0);
    assert_eq!(point(&points, "app.latency.max", &[]).value, 25.0);
    assert_eq!(
        point(&points, "app.latency.count", &[]).value,
        2.0 / INTERVAL
    );
    assert_eq!(point(&points, "app.payload.size.avg", &[]).value, 512.0);
    assert_eq!(point(&points, "app.users", &[]).value, 2.0);
    let sketches = intake.store().sketches();
    assert_eq!(sketches.len(), 1);
    assert_eq!(
        (
            sketches[0].metric.as_str(),
            sketches[0].cnt,
            sketches[0].sum
        ),
        ("app.work.ms", 2, 80.0)
    );
    intake.stop();
}
