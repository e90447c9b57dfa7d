//! Shaping through the real binary (docs/behaviour.md, "Shaping"): the Agent's mapper table,
//! namespace, filter lists, per-distribution tag filters and histogram copies as the intake
//! receives them, and SIGHUP swapping them under load without losing or double-counting a
//! sample.

use nix::sys::signal::Signal;
use serde_json::Value;
use whippet::intake::store::PointRecord;
use whippet::intake::IntakeConfig;

use crate::support::{
    intake, send_blocking, start_with_config_on_socket, TempDir, Whippet, ONE_BUCKET,
};

/// The mapper table the unit test reads too.
const TABLE: &str = include_str!("../data/mapper_table.json");

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn the_agents_mapper_table_reaches_the_intake() {
    let intake = intake(IntakeConfig::default());
    let cases: Vec<Value> = serde_json::from_str(TABLE).unwrap();
    let mut checked = 0;
    for c in &cases {
        let case = c["case"].as_str().unwrap();
        let profiles = c["profiles"].to_string();
        intake.store().clear();
        let env = [("DD_DOGSTATSD_MAPPER_PROFILES", profiles.as_str())];
        let args = ["--dd-url", &intake.url(), "--api-key", "k"];
        let w = Whippet::start_env(&args, &env);
        let names = c["names"].as_array().unwrap();
        // Each name a gauge of its own value, with a tag of its own.
        let lines: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, pair)| format!("{}:{}|g|#src:client", pair[0].as_str().unwrap(), i + 1))
            .collect();
        w.send_udp(lines.join("\n").as_bytes());
        let s = w.stop();
        assert!(s.status.success(), "{case}: {:?}", s.stderr);
        let points = intake.store().points();
        assert_eq!(points.len(), names.len(), "{case}: {points:#?}");
        for (i, pair) in names.iter().enumerate() {
            let (name, want) = (pair[0].as_str().unwrap(), &pair[1]);
            let (want_name, mut want_tags) = match want {
                Value::Null => (name.to_string(), vec![]),
                m => (
                    m["name"].as_str().unwrap().to_string(),
                    serde_json::from_value::<Vec<String>>(m["tags"].clone()).unwrap(),
                ),
            };
            want_tags.push("src:client".into());
            let p: Vec<&PointRecord> = points
                .iter()
                .filter(|p| p.value == (i + 1) as f64)
                .collect();
            assert_eq!(p.len(), 1, "{case}: {name}");
            assert_eq!(
                (
                    p[0].metric.as_str(),
                    sorted(p[0].tags.clone()),
                    p[0].host.as_str()
                ),
                (want_name.as_str(), sorted(want_tags), "test-host"),
                "{case}: {name}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 22);
    intake.stop();
}

#[test]
fn namespace_filter_lists_tag_filters_and_copies_from_a_config_file() {
    let intake = intake(IntakeConfig::default());
    let dir = TempDir::new();
    let conf = dir.path("whippet.conf");
    std::fs::write(
        &conf,
        r#"DD_STATSD_METRIC_NAMESPACE=app
DD_METRIC_FILTERLIST=app.noisy app.t.max
DD_METRIC_FILTERLIST_MATCH_PREFIX=true
DD_STATSD_METRIC_BLOCKLIST=app.req
DD_METRIC_TAG_FILTERLIST='[{"metric_name":"dist.app.lat","action":"include","tags":["env"]},{"metric_name":"app.size","tags":["pod"]}]'
DD_HISTOGRAM_COPY_TO_DISTRIBUTION=true
DD_HISTOGRAM_COPY_TO_DISTRIBUTION_PREFIX=dist.
"#,
    )
    .unwrap();
    let conf = conf.display().to_string();
    let args = [
        "--dd-url",
        &intake.url(),
        "--api-key",
        "k",
        "--config",
        &conf,
        "--histogram-aggregates",
        "max,count",
        "--histogram-percentiles",
        "",
    ];
    let w = Whippet::start(&args);
    let lines = [
        // Namespaced; the older blocklist is ignored because the newer list is set.
        "req:1|c|#env:dev",
        "req:2|c|#env:dev",
        // Exempt by the Agent's default list.
        "jvm.heap:5|g",
        // Filtered after the namespace: three samples.
        "noisy.a:1|c",
        "noisy.b:1:2|d",
        // A histogram and a timer, each with its distribution copy.
        "lat:10|h|#env:dev,pod:p1",
        "lat:20|h|#env:dev,pod:p1",
        "t:7|ms",
        // A distribution's tag filter drops the pod.
        "size:3|d|#pod:p1,env:dev",
        // Events are not shaped.
        "_e{5,1}:noisy|x",
    ];
    w.send_udp(lines.join("\n").as_bytes());
    w.wait_for_telemetry("whippet_samples_total", 10);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    assert_eq!(
        s.telemetry(r#"whippet_dropped_total{reason="filtered"}"#),
        3
    );
    // The pod tags of app.size and dist.app.lat, as their contexts were built.
    assert_eq!(s.telemetry("whippet_tags_filtered_total"), 2);
    // An entry naming a histogram's aggregate drops that series only, at flush.
    assert_eq!(
        s.telemetry(r#"whippet_dropped_total{reason="filtered_aggregate"}"#),
        1
    );
    // Counts are sent as rates over the one long bucket: their count is rate × interval.
    let mut points: Vec<(String, Vec<String>, f64)> = intake
        .store()
        .points()
        .into_iter()
        .map(|p| {
            let value = match p.kind.as_str() {
                "rate" => (p.value * p.interval as f64).round(),
                _ => p.value,
            };
            (p.metric, p.tags, value)
        })
        .collect();
    points.sort_by(|a, b| a.0.cmp(&b.0));
    let tags = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    assert_eq!(
        points,
        [
            ("app.lat.count".into(), tags(&["env:dev", "pod:p1"]), 2.0),
            ("app.lat.max".into(), tags(&["env:dev", "pod:p1"]), 20.0),
            ("app.req".into(), tags(&["env:dev"]), 3.0),
            ("app.t.count".into(), tags(&[]), 1.0),
            ("jvm.heap".into(), tags(&[]), 5.0),
        ]
    );
    let mut sketches: Vec<(String, Vec<String>, i64, f64)> = intake
        .store()
        .sketches()
        .into_iter()
        .map(|s| (s.metric, s.tags, s.cnt, s.sum))
        .collect();
    sketches.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        sketches,
        [
            ("app.size".into(), tags(&["env:dev"]), 1, 3.0),
            ("dist.app.lat".into(), tags(&["env:dev"]), 2, 30.0),
            ("dist.app.t".into(), tags(&[]), 1, 7.0),
        ]
    );
    let events = intake.store().events();
    assert_eq!(events[0]["msg_title"], "noisy");
    intake.stop();
}

#[test]
fn sighup_swaps_mapper_and_filters_under_load_with_exact_totals() {
    let dir = TempDir::new();
    let conf = dir.path("whippet.conf");
    // Two generations that shape the same traffic differently: the mapper renames load.c
    // and the filter list drops drop.me; or a namespace, with the filter list naming the
    // namespaced name.
    let mapped = r#"DD_DOGSTATSD_MAPPER_PROFILES='[{"name":"p","prefix":"load.","mappings":[{"match":"load.c","name":"load.mapped"}]}]'
DD_METRIC_FILTERLIST=drop.me
"#;
    let namespaced = "DD_STATSD_METRIC_NAMESPACE=ns\nDD_METRIC_FILTERLIST=ns.drop.me\n";
    std::fs::write(&conf, mapped).unwrap();
    let socket = dir.path("load.socket");
    let w = start_with_config_on_socket(&conf, &socket, dir);
    const PACKETS: u64 = 3_000;
    let packet = ["load.c:1|c"; 9].join("\n") + "\ndrop.me:1|c";
    let sender = send_blocking(&socket, packet.into_bytes(), PACKETS);
    // Each reload sends systemd two notifications, which the harness reads only at the end:
    // four reloads stay within the smallest notification queue (10).
    for generation in 1..=4 {
        let text = if generation % 2 == 1 {
            namespaced
        } else {
            mapped
        };
        std::fs::write(&conf, text).unwrap();
        w.signal(Signal::SIGHUP);
        w.wait_for_new_stderr("whippet: reloaded the configuration");
    }
    sender.join().unwrap();
    w.wait_for_telemetry("whippet_samples_total", 9 * PACKETS);
    let s = w.stop();
    assert!(s.status.success());
    assert_eq!(s.telemetry("whippet_samples_total"), 9 * PACKETS);
    assert_eq!(
        s.telemetry(r#"whippet_dropped_total{reason="filtered"}"#),
        PACKETS
    );
    let interval: f64 = ONE_BUCKET.parse().unwrap();
    let lines = s.lines();
    let names: std::collections::BTreeSet<&str> = lines.iter().map(|l| l.name.as_str()).collect();
    assert!(
        names
            .iter()
            .all(|n| ["load.mapped", "ns.load.c"].contains(n)),
        "{names:?}"
    );
    let total: f64 = lines.iter().map(|l| l.f64("value") * interval).sum();
    assert_eq!(total.round() as u64, 9 * PACKETS);
}

#[test]
fn the_agents_datadog_yaml_configures_whippet_and_reloads() {
    let dir = TempDir::new();
    let conf = dir.path("datadog.yaml");
    let yaml = |namespace: &str| {
        format!(
            r#"# An Agent's file: keys whippet implements apply, the rest are ignored.
use_dogstatsd: true
dogstatsd_tags:
  - env:prod
statsd_metric_namespace: {namespace}
dogstatsd_mapper_profiles:
  - name: airflow
    prefix: "airflow."
    mappings:
      - match: "airflow.dag.*.duration"
        name: "airflow.dag.duration"
        tags:
          dag_id: "$1"
histogram_aggregates: [max]
histogram_percentiles: []
apm_config:
  enabled: true
"#
        )
    };
    std::fs::write(&conf, yaml("first")).unwrap();
    let args = vec![
        "--config".into(),
        conf.display().to_string(),
        "--udp".into(),
        "127.0.0.1:0".into(),
        "--bucket-seconds".into(),
        ONE_BUCKET.into(),
        "--hostname".into(),
        "h".into(),
    ];
    let w = Whippet::spawn_env(args, &[], dir);
    w.wait_for_stderr("whippet: ignored 2 keys of the config file");
    w.send_udp(b"airflow.dag.etl.duration:3|h\nreq:1|g");
    w.wait_for_telemetry("whippet_samples_total", 2);
    std::fs::write(&conf, yaml("second")).unwrap();
    w.signal(Signal::SIGHUP);
    w.wait_for_new_stderr("whippet: reloaded the configuration");
    w.send_udp(b"req:2|g");
    w.wait_for_telemetry("whippet_samples_total", 3);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    // airflow is one of the Agent's prefixes exempt from the namespace.
    let max = s.one("series", "airflow.dag.duration.max", "dag_id:etl,env:prod");
    assert_eq!(max.f64("value"), 3.0);
    assert_eq!(s.one("series", "first.req", "env:prod").f64("value"), 1.0);
    assert_eq!(s.one("series", "second.req", "env:prod").f64("value"), 2.0);
}

#[test]
fn host_rules_reach_the_intake_without_a_host() {
    let intake = intake(IntakeConfig::default());
    let rules = r#"[{"match":"fleet.*","types":["count"],"tags":["env:prod"]}]"#;
    let env = [("WHIPPET_HOST_RULES", rules)];
    let w = Whippet::start_env(&["--dd-url", &intake.url(), "--api-key", "k"], &env);
    w.send_udp(b"fleet.requests:3|c|#host:web1,route:/a\nfleet.requests:4|c|#host:web2,route:/a\nfleet.up:1|g\nmachine.load:2|g");
    w.wait_for_telemetry("whippet_samples_total", 4);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let mut points: Vec<(String, String, Vec<String>, Vec<String>)> = intake
        .store()
        .points()
        .into_iter()
        .map(|p| (p.metric, p.host, p.resources, p.tags))
        .collect();
    points.sort();
    let v = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    assert_eq!(
        points,
        [
            // Two hosts' counts are one context, whose host resource is empty (the Agent
            // always writes one).
            (
                "fleet.requests".into(),
                "".into(),
                v(&["host:"]),
                v(&["env:prod", "route:/a"])
            ),
            (
                "fleet.up".into(),
                "test-host".into(),
                v(&["host:test-host"]),
                v(&[])
            ),
            (
                "machine.load".into(),
                "test-host".into(),
                v(&["host:test-host"]),
                v(&[])
            ),
        ]
    );
    let requests = intake.store().points();
    let requests = requests
        .iter()
        .find(|p| p.metric == "fleet.requests")
        .unwrap();
    assert_eq!((requests.value * requests.interval as f64).round(), 7.0);
    intake.stop();
}
