//! Enrichment through the real binary: host and magic tags, resources, events and service
//! checks as the Agent writes them (docs/behaviour.md, "Enrichment"); and origin detection
//! over the Unix sockets against a procfs fixture, a fake kubelet and a fake Docker socket
//! (docs/behaviour.md, "Origin").

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use whippet::intake::store::PointRecord;
use whippet::intake::{Intake, IntakeConfig};

use crate::support::{intake, parse_line, TempDir, Whippet};

fn whippet_to(intake: &Intake, extra: &[&str]) -> Whippet {
    let mut args = vec!["--api-key", "test-key", "--retry-base-ms", "10"];
    args.extend_from_slice(extra);
    Whippet::to_intake(&intake.url(), &args)
}

/// The one point named `metric`.
fn point(points: &[PointRecord], metric: &str) -> PointRecord {
    let found: Vec<&PointRecord> = points.iter().filter(|p| p.metric == metric).collect();
    assert_eq!(found.len(), 1, "{metric} in {points:#?}");
    found[0].clone()
}

#[test]
fn host_and_magic_tags_shape_every_kind_as_the_agent_does() {
    let intake = intake(IntakeConfig::default());
    let w = whippet_to(&intake, &["--tags", "team:core"]);
    let lines = [
        // Metrics: magic tags leave; the resource tag stays in the context and becomes a
        // v2 resource after host and device.
        "m:1|g|#a,dd.internal.entity_id:pod-x,dd.internal.card:high,dd.internal.jmx_check_name:kafka,host:h1",
        "r:2|g|#device:sda,dd.internal.resource:database_instance:db1,dd.internal.resource:bad,z",
        // Events: the host: tag sets the host, h: wins, an empty host: means none.
        "_e{2,1}:e1|t|#x,host:tagged,dd.internal.entity_id:pod-x",
        "_e{2,1}:e2|t|h:field|#host:tagged",
        "_e{2,1}:e3|t|k:agg|s:src|#host:",
        // A text shorter than its field: the Agent's lenient reading.
        "_e{2,2}:e4|text|p:low",
        // Service checks: the same host rules; no tags at all is null.
        "_sc|c1|0|#y,host:tagged,dd.internal.card:low",
        "_sc|c2|1|h:field|#host:tagged",
        "_sc|c3|2|m:msg",
    ];
    w.send_udp(lines.join("\n").as_bytes());
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let points = intake.store().points();
    let m = point(&points, "m");
    assert_eq!(
        (m.host.as_str(), m.tags.clone()),
        ("h1", vec!["a".to_string(), "team:core".into()])
    );
    let r = point(&points, "r");
    assert_eq!(
        r.resources,
        ["host:test-host", "device:sda", "database_instance:db1"]
    );
    assert_eq!(r.tags, ["team:core", "z"]);

    let mut events = intake.store().events();
    events.sort_by_key(|e| e["msg_title"].as_str().unwrap_or_default().to_string());
    let ts = |e: &Value| e["timestamp"].clone();
    let want = [
        json!({"msg_title":"e1","msg_text":"t","timestamp":ts(&events[0]),"priority":"normal","host":"tagged","tags":["x","team:core"],"alert_type":"info"}),
        json!({"msg_title":"e2","msg_text":"t","timestamp":ts(&events[1]),"priority":"normal","host":"field","tags":["team:core"],"alert_type":"info"}),
        json!({"msg_title":"e3","msg_text":"t","timestamp":ts(&events[2]),"priority":"normal","host":"","tags":["team:core"],"alert_type":"info","aggregation_key":"agg","source_type_name":"src"}),
        json!({"msg_title":"e4","msg_text":"te","timestamp":ts(&events[3]),"priority":"low","host":"test-host","tags":["team:core"],"alert_type":"info"}),
    ];
    assert_eq!(events, want);
    assert!(events
        .iter()
        .all(|e| e["timestamp"].as_i64().unwrap() > 1_600_000_000));

    let mut checks = intake.store().service_checks();
    checks.sort_by_key(|c| c["check"].as_str().unwrap_or_default().to_string());
    let ts = |c: &Value| c["timestamp"].clone();
    let want = [
        json!({"check":"c1","host_name":"tagged","timestamp":ts(&checks[0]),"status":0,"message":"","tags":["y","team:core"]}),
        json!({"check":"c2","host_name":"field","timestamp":ts(&checks[1]),"status":1,"message":"","tags":["team:core"]}),
        json!({"check":"c3","host_name":"test-host","timestamp":ts(&checks[2]),"status":2,"message":"msg","tags":["team:core"]}),
    ];
    assert_eq!(checks, want);
    intake.stop();

    // Without extra tags, a check with no tags says `null`, as the Agent writes it.
    let intake2 = super::support::intake(IntakeConfig::default());
    let w = whippet_to(&intake2, &[]);
    w.send_udp(b"_sc|bare|3\n_e{1,1}:a|b");
    assert!(w.stop().status.success());
    let checks = intake2.store().service_checks();
    assert_eq!(checks[0]["tags"], Value::Null);
    let events = intake2.store().events();
    let keys: Vec<&str> = events[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "alert_type",
            "host",
            "msg_text",
            "msg_title",
            "priority",
            "timestamp"
        ]
    );
    intake2.stop();
}

/// A container id as the runtimes write it: 64 hex digits.
const CONTAINER: &str = "9a3f1c2b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";
const POD: &str = "4f7c2a10-9b3e-4d2a-8c1f-0e6d5b4a3c21";

/// The kubelet's `/pods` for one pod with one running container.
fn pods_json() -> String {
    json!({"items": [{
        "metadata": {
            "uid": POD, "name": "web-7d4b9c8f6d-x2x9z", "namespace": "shop",
            "labels": {"tags.datadoghq.com/env": "prod", "app.kubernetes.io/name": "web"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d4b9c8f6d"}]
        },
        "spec": {"priorityClassName": "high"},
        "status": {"phase": "Running", "qosClass": "Burstable", "containerStatuses": [
            {"name": "app", "containerID": format!("containerd://{CONTAINER}"),
             "image": "docker.io/shop/web:1.2", "imageID": "sha256:ff00"}
        ]}
    }]})
    .to_string()
}

/// A kubelet on loopback serving `/pods` over plain HTTP; returns its port.
fn fake_kubelet() -> (Arc<tiny_http::Server>, u16) {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let port = server.server_addr().to_ip().unwrap().port();
    let s = server.clone();
    std::thread::spawn(move || {
        for request in s.incoming_requests() {
            let response = if request.url() == "/pods" {
                tiny_http::Response::from_string(pods_json())
            } else {
                tiny_http::Response::from_string("no").with_status_code(404)
            };
            let _ = request.respond(response);
        }
    });
    (server, port)
}

/// The flags that point whippet at the fake kubelet's plain HTTP `port`.
fn kubelet_on(port: &str) -> [&str; 6] {
    [
        "--kubelet-host",
        "127.0.0.1",
        "--kubelet-https-port",
        "0",
        "--kubelet-http-port",
        port,
    ]
}

/// A Docker Engine on a Unix socket answering `/containers/json` for the same container.
fn fake_docker(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut head = [0u8; 1024];
            let _ = s.read(&mut head);
            let body = json!([{
                "Id": CONTAINER, "Names": ["/k8s_app_web"], "Image": "docker.io/shop/web:1.2",
                "ImageID": "sha256:ff00", "Labels": {"com.datadoghq.tags.service": "web"}
            }])
            .to_string();
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}"
            );
        }
    });
}

fn sorted(tags: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    v.sort();
    v
}

/// The pod's tags at low cardinality.
const POD_LOW: [&str; 9] = [
    "env:prod",
    "kube_namespace:shop",
    "pod_phase:running",
    "kube_priority_class:high",
    "kube_qos:Burstable",
    "kube_app_name:web",
    "kube_ownerref_kind:replicaset",
    "kube_deployment:web",
    "kube_replica_set:web-7d4b9c8f6d",
];
/// What its container adds at low cardinality.
const CONTAINER_LOW: [&str; 5] = [
    "kube_container_name:app",
    "image_name:docker.io/shop/web",
    "short_image:web",
    "image_tag:1.2",
    "image_id:sha256:ff00",
];
/// What Docker adds at low cardinality.
const DOCKER_LOW: [&str; 2] = ["docker_image:docker.io/shop/web:1.2", "service:web"];
const ORCHESTRATOR: [&str; 2] = [
    "pod_name:web-7d4b9c8f6d-x2x9z",
    "kube_ownerref_name:web-7d4b9c8f6d",
];
const HIGH: [&str; 3] = [
    "container_id:9a3f1c2b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8",
    "display_container_name:app_web-7d4b9c8f6d-x2x9z",
    "container_name:k8s_app_web",
];

#[test]
fn unix_socket_origin_detection_adds_the_containers_tags_at_each_cardinality() {
    let dir = TempDir::new();
    // The sender is this test process: its real pid, in a procfs fixture naming a
    // containerd container.
    let procfs = dir.path("proc");
    let me = std::process::id().to_string();
    std::fs::create_dir_all(procfs.join(&me)).unwrap();
    std::fs::write(
        procfs.join(&me).join("cgroup"),
        format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CONTAINER}.scope\n", POD.replace('-', "_")),
    )
    .unwrap();
    let docker = dir.path("docker.sock");
    fake_docker(&docker);
    let (kubelet, port) = fake_kubelet();
    let port = port.to_string();
    let procfs_arg = procfs.display().to_string();
    let docker_arg = format!("unix://{}", docker.display());
    let intake = intake(IntakeConfig::default());
    let mut args = vec!["--origin-detection", "--procfs-path", &procfs_arg];
    args.extend(kubelet_on(&port));
    args.extend(["--docker-host", &docker_arg]);
    let w = whippet_to(&intake, &args);
    w.send_unix(b"c.default:1|c|#own:tag\nc.low:1|c|#dd.internal.card:low\nc.orch:1|c|#dd.internal.card:orchestrator\nc.high:1|c|#dd.internal.card:high\nc.none:1|c|#dd.internal.card:none");
    w.send_stream(&[b"s.stream:1|c|#dd.internal.card:orchestrator"]);
    // UDP carries no credentials: no container tags.
    w.send_udp(b"u.udp:1|c");
    w.wait_for_telemetry("whippet_tagger_lookups_total{result=\"hit\"}", 5);
    let lookups = w.telemetry_now("whippet_origin_lookups_total{result=\"container\"}");
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    assert_eq!(lookups, 1, "one procfs read, then the cache");
    let points = intake.store().points();
    let low: Vec<&str> = POD_LOW
        .iter()
        .chain(&CONTAINER_LOW)
        .chain(&DOCKER_LOW)
        .copied()
        .collect();
    let orch: Vec<&str> = low.iter().chain(&ORCHESTRATOR).copied().collect();
    let high: Vec<&str> = orch.iter().chain(&HIGH).copied().collect();
    let with = |extra: &[&str], base: &[&str]| {
        sorted(&base.iter().chain(extra).copied().collect::<Vec<_>>())
    };
    assert_eq!(point(&points, "c.default").tags, with(&["own:tag"], &low));
    assert_eq!(point(&points, "c.low").tags, sorted(&low));
    assert_eq!(point(&points, "c.orch").tags, sorted(&orch));
    assert_eq!(point(&points, "c.high").tags, sorted(&high));
    assert_eq!(point(&points, "s.stream").tags, sorted(&orch));
    assert!(point(&points, "c.none").tags.is_empty());
    assert!(point(&points, "u.udp").tags.is_empty());
    intake.stop();
    kubelet.unblock();
}

#[test]
fn an_entity_id_never_reaches_the_intake_and_brings_its_pods_tags() {
    let (kubelet, port) = fake_kubelet();
    let port = port.to_string();
    let intake = intake(IntakeConfig::default());
    let mut args = kubelet_on(&port).to_vec();
    args.extend(["--docker-host", "off", "--tag-cardinality", "orchestrator"]);
    let w = whippet_to(&intake, &args);
    let line = format!("pod.metric:3|g|#a:b,dd.internal.entity_id:{POD}\nother.pod:1|g|#dd.internal.entity_id:unknown-pod\n_sc|pod.check|0|#dd.internal.entity_id:{POD}");
    w.send_udp(line.as_bytes());
    // Sent again over the stream and a Unix datagram: the same context, no socket origin
    // (origin detection is off).
    w.send_stream(&[format!("pod.metric:3|g|#dd.internal.entity_id:{POD},a:b").as_bytes()]);
    w.send_unix(format!("pod.metric:3|g|#a:b,dd.internal.entity_id:{POD}").as_bytes());
    w.wait_for_telemetry("whippet_tagger_lookups_total{result=\"hit\"}", 4);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let points = intake.store().points();
    let pod: Vec<&str> = POD_LOW.iter().chain(&ORCHESTRATOR).copied().collect();
    let pod_tags: Vec<&str> = pod.iter().copied().chain(["a:b"]).collect();
    let p = point(&points, "pod.metric");
    assert_eq!(p.tags, sorted(&pod_tags));
    assert!(point(&points, "other.pod").tags.is_empty());
    for p in &points {
        assert!(
            p.tags.iter().all(|t| !t.starts_with("dd.internal")),
            "{p:?}"
        );
    }
    let checks = intake.store().service_checks();
    let tags: Vec<&str> = checks[0]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut got: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    got.sort();
    assert_eq!(got, sorted(&pod));
    intake.stop();
    kubelet.unblock();
}

#[test]
fn an_unreachable_provider_degrades_to_no_container_tags_and_is_counted() {
    let dir = TempDir::new();
    let missing = format!("unix://{}", dir.path("no-docker.sock").display());
    let w = Whippet::start(&["--origin-detection-client", "--docker-host", &missing]);
    w.send_udp(b"m:1|c|#k:v|c:ci-abc");
    w.wait_for_telemetry("whippet_tagger_lookups_total{result=\"miss\"}", 1);
    assert!(w.telemetry_now("whippet_tagger_errors_total{provider=\"docker\"}") >= 1);
    let s = w.stop();
    assert!(s.status.success());
    let m = s
        .stdout
        .iter()
        .filter_map(|l| parse_line(l))
        .find(|l| l.name == "m")
        .unwrap();
    assert_eq!(m.get("tags"), "k:v");
    assert_eq!(
        s.stderr
            .iter()
            .filter(|l| l.contains("tagger: docker cannot be asked"))
            .count(),
        1,
        "{:?}",
        s.stderr
    );
}

#[test]
fn sighup_changes_the_cardinality_and_the_kubelet_in_place() {
    let (kubelet, port) = fake_kubelet();
    let dir = TempDir::new();
    let conf = dir.path("whippet.conf");
    let settings = |cardinality: &str, port: &str| {
        format!(
            "DD_KUBERNETES_KUBELET_HOST=127.0.0.1\nDD_KUBERNETES_HTTPS_KUBELET_PORT=0\nDD_KUBERNETES_HTTP_KUBELET_PORT={port}\nDOCKER_HOST=off\nDD_DOGSTATSD_TAG_CARDINALITY={cardinality}\n"
        )
    };
    std::fs::write(&conf, settings("low", &port.to_string())).unwrap();
    let conf_arg = conf.display().to_string();
    let w = Whippet::start(&["--config", &conf_arg]);
    let line = format!("m:1|c|#dd.internal.entity_id:{POD}");
    w.send_udp(line.as_bytes());
    w.wait_for_telemetry("whippet_tagger_lookups_total{result=\"hit\"}", 1);
    std::fs::write(&conf, settings("orchestrator", &port.to_string())).unwrap();
    w.signal(nix::sys::signal::Signal::SIGHUP);
    w.wait_for_new_stderr("whippet: reloaded the configuration");
    w.send_udp(line.as_bytes());
    w.wait_for_telemetry("whippet_tagger_lookups_total{result=\"hit\"}", 2);
    // A kubelet that is gone: the snapshot keeps its last answer, the failure is counted.
    std::fs::write(&conf, settings("orchestrator", "1")).unwrap();
    w.signal(nix::sys::signal::Signal::SIGHUP);
    w.wait_for_new_stderr("whippet: tagger: kubelet cannot be asked");
    w.send_udp(line.as_bytes());
    w.wait_for_telemetry("whippet_tagger_lookups_total{result=\"hit\"}", 3);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let tags: Vec<String> = s
        .stdout
        .iter()
        .filter_map(|l| parse_line(l))
        .filter(|l| l.name == "m")
        .map(|l| l.get("tags").to_string())
        .collect();
    let low = sorted(&POD_LOW).join(",");
    let pod: Vec<&str> = POD_LOW.iter().chain(&ORCHESTRATOR).copied().collect();
    let orchestrator = sorted(&pod).join(",");
    let mut want = vec![low, orchestrator];
    let mut got = tags.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{tags:?}");
    kubelet.unblock();
}

#[test]
fn invalid_histogram_entries_are_skipped_with_a_warning_instead_of_refusing_to_start() {
    let w = Whippet::start(&[
        "--histogram-aggregates",
        "max,p99",
        "--histogram-percentiles",
        "0.5,95",
    ]);
    w.send_udp(b"h:1|h\nh:3|h");
    w.wait_for_udp_packets(1);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let warnings: Vec<&String> = s.stderr.iter().filter(|l| l.contains("skipped")).collect();
    assert_eq!(warnings.len(), 2, "{:?}", s.stderr);
    assert!(
        warnings[0].contains("--histogram-aggregates: skipped 'p99'"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("--histogram-percentiles: skipped '95'"),
        "{warnings:?}"
    );
    let mut names: Vec<String> = s
        .stdout
        .iter()
        .filter_map(|l| parse_line(l))
        .map(|l| format!("{}={}", l.name, l.get("value")))
        .collect();
    names.sort();
    assert_eq!(names, ["h.50percentile=1", "h.max=3"]);
}

#[test]
fn the_agents_host_tags_and_env_reach_every_kind() {
    let intake = intake(IntakeConfig::default());
    let env = [("DD_TAGS", "region:eu az:b"), ("DD_ENV", "prod")];
    let args = [
        "--dd-url",
        &intake.url(),
        "--api-key",
        "k",
        "--tags",
        "team:core",
    ];
    let w = Whippet::start_env(&args, &env);
    w.send_udp(b"m:1|g|#own\n_e{1,1}:e|t\n_sc|c|0");
    w.wait_for_telemetry("whippet_samples_total", 1);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let want = ["az:b", "env:prod", "own", "region:eu", "team:core"];
    assert_eq!(point(&intake.store().points(), "m").tags, want);
    let e = &intake.store().events()[0];
    assert_eq!(
        e["tags"],
        json!(["team:core", "region:eu", "az:b", "env:prod"])
    );
    let c = &intake.store().service_checks()[0];
    assert_eq!(
        c["tags"],
        json!(["team:core", "region:eu", "az:b", "env:prod"])
    );
    intake.stop();
}

#[test]
fn the_host_name_comes_from_the_node_and_cluster_name_when_none_is_set() {
    // No --hostname: the Kubernetes node name and the cluster name make the host, on every
    // kind, and a host: tag still wins for its own metric.
    let intake = intake(IntakeConfig::default());
    let dir = TempDir::new();
    let args: Vec<String> = [
        "--udp",
        "127.0.0.1:0",
        "--dd-url",
        &intake.url(),
        "--self-metrics=false",
    ]
    .map(String::from)
    .to_vec();
    let env = [
        ("DD_KUBERNETES_KUBELET_NODENAME", "node-7"),
        ("DD_CLUSTER_NAME", "prod-eu1"),
    ];
    let w = Whippet::spawn_env(args, &env, dir);
    w.send_udp(b"m:1|g\nn:1|g|#host:elsewhere\n_sc|c|0");
    w.wait_for_telemetry("whippet_samples_total", 2);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    let points = intake.store().points();
    assert_eq!(point(&points, "m").host, "node-7-prod-eu1");
    assert_eq!(point(&points, "n").host, "elsewhere");
    let c = &intake.store().service_checks()[0];
    assert_eq!(c["host_name"], json!("node-7-prod-eu1"));
    intake.stop();
}
