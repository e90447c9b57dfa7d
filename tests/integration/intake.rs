//! The `whippet-intake` binary: Datadog routes, fakeintake queries, fault injection.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use base64::Engine;
use serde_json::Value;

use crate::support::wait_with_deadline;

struct IntakeProcess {
    child: Child,
    url: String,
}

impl IntakeProcess {
    fn start(args: &[&str]) -> IntakeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_whippet-intake"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stderr.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        let url = first
            .trim()
            .strip_prefix("whippet-intake: listening on ")
            .unwrap_or_else(|| panic!("{first}"))
            .to_string();
        IntakeProcess { child, url }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    fn post(&self, path: &str, encoding: Option<&str>, key: &str, body: &[u8]) -> (u16, String) {
        let mut r = Self::agent()
            .post(format!("{}{path}", self.url))
            .header("DD-API-KEY", key);
        if let Some(e) = encoding {
            r = r.header("Content-Encoding", e);
        }
        let mut resp = r.send(body).unwrap();
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap(),
        )
    }

    fn get(&self, path: &str) -> Value {
        let mut resp = Self::agent()
            .get(format!("{}{path}", self.url))
            .call()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap()
    }

    fn stop(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = wait_with_deadline(&mut self.child);
        assert!(status.success());
        let mut out = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut out).unwrap();
        out
    }
}

/// A v2 series payload with one gauge point, encoded by whippet's serializer.
fn series_body() -> Vec<u8> {
    use whippet::context::{ContextKey, ContextRef};
    use whippet::flush::{Flushed, Series, SeriesKind};
    use whippet::serializer::{Compression, Serializer, SeriesApi};
    let context = ContextKey::new(&ContextRef {
        name: "probe",
        host: "h1",
        tags: &["a:b"],
        kind: whippet::parser::MetricKind::Gauge,
    });
    let flushed = Flushed {
        series: vec![Series {
            context,
            suffix: "".into(),
            kind: SeriesKind::Gauge,
            interval: 10,
            timestamp: 1_700_000_000,
            value: 4.5,
        }],
        ..Flushed::default()
    };
    let serializer = Serializer {
        series_api: SeriesApi::V2,
        compression: Compression::Zstd,
        hostname: "h1".into(),
    };
    serializer.serialize(&flushed).payloads.remove(0).body
}

#[test]
fn the_intake_stores_payloads_and_answers_fakeintake_queries() {
    let intake = IntakeProcess::start(&["--print"]);
    let body = series_body();
    assert_eq!(
        intake.post("/api/v2/series", Some("zstd"), "k", &body).0,
        202
    );
    assert_eq!(
        intake
            .post(
                "/api/v1/check_run",
                None,
                "k",
                br#"[{"check":"c","status":0}]"#
            )
            .0,
        202
    );

    assert_eq!(intake.get("/fakeintake/health")["status"], "ok");
    let raw = intake.get("/fakeintake/payloads?endpoint=/api/v2/series");
    let payloads = raw["payloads"].as_array().unwrap();
    assert_eq!(payloads.len(), 1);
    assert_eq!(payloads[0]["encoding"], "zstd");
    let data = base64::engine::general_purpose::STANDARD
        .decode(payloads[0]["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(data, body);
    assert!(payloads[0]["timestamp"].as_str().unwrap().ends_with('Z'));

    let decoded = intake.get("/fakeintake/payloads?endpoint=%2Fapi%2Fv2%2Fseries&format=json");
    let series = &decoded["payloads"][0]["data"]["series"][0];
    assert_eq!(series["metric"], "probe");
    assert_eq!(series["points"][0]["value"], 4.5);
    assert_eq!(series["points"][0]["timestamp"], 1_700_000_000);
    assert_eq!(series["resources"][0]["name"], "h1");
    assert_eq!(series["tags"][0], "a:b");

    let stats = intake.get("/fakeintake/routestats");
    assert_eq!(stats["/api/v2/series"]["Count"], 1);
    assert_eq!(stats["/api/v1/check_run"]["Count"], 1);

    intake.get("/fakeintake/flushPayloads");
    let after = intake.get("/fakeintake/payloads?endpoint=/api/v2/series");
    assert_eq!(after["payloads"].as_array().unwrap().len(), 0);

    let printed = intake.stop();
    assert!(
        printed
            .contains("series probe gauge ts=1700000000 value=4.5 interval=10 host=h1 tags=a:b\n"),
        "{printed}"
    );
    assert!(printed.contains("service_check {"), "{printed}");
}

#[test]
fn bad_payloads_get_400_with_a_reason_and_the_intake_keeps_serving() {
    let intake = IntakeProcess::start(&[]);
    let cases: [(&str, Option<&str>, &[u8], &str); 4] = [
        (
            "/api/v2/series",
            None,
            b"\xff\xff\xff\xff",
            "invalid MetricPayload",
        ),
        (
            "/api/v2/series",
            Some("zstd"),
            b"not zstd",
            "cannot decompress zstd",
        ),
        ("/intake/", None, b"{not json", "invalid events JSON"),
        (
            "/api/v1/check_run",
            Some("br"),
            b"[]",
            "unsupported Content-Encoding",
        ),
    ];
    for (path, encoding, body, reason) in cases {
        let (status, answer) = intake.post(path, encoding, "k", body);
        assert_eq!(status, 400, "{path}");
        assert!(answer.contains(reason), "{path}: {answer}");
    }
    assert_eq!(
        intake
            .post("/api/v2/series", Some("zstd"), "k", &series_body())
            .0,
        202
    );
    let stats = intake.get("/fakeintake/routestats");
    assert_eq!(stats["/api/v2/series"]["Count"], 3);
    intake.stop();
}

#[test]
fn fail_and_api_key_inject_the_answers_the_reliability_tests_need() {
    let intake =
        IntakeProcess::start(&["--fail", "503:2", "--api-key", "right", "--delay-ms", "1"]);
    assert_eq!(
        intake
            .post("/api/v2/series", Some("zstd"), "wrong", &series_body())
            .0,
        403
    );
    let mut validate = IntakeProcess::agent()
        .get(format!("{}/api/v1/validate", intake.url))
        .header("DD-API-KEY", "right")
        .call()
        .unwrap();
    assert_eq!(validate.status().as_u16(), 200);
    assert!(validate
        .body_mut()
        .read_to_string()
        .unwrap()
        .contains("valid"));
    assert_eq!(
        intake
            .post("/api/v2/series", Some("zstd"), "right", &series_body())
            .0,
        503
    );
    assert_eq!(
        intake
            .post("/api/v2/series", Some("zstd"), "right", &series_body())
            .0,
        503
    );
    assert_eq!(
        intake
            .post("/api/v2/series", Some("zstd"), "right", &series_body())
            .0,
        202
    );
    intake.stop();
}

#[test]
fn invalid_intake_flags_name_the_flag() {
    for (args, want) in [
        (vec!["--fail", "oops"], "--fail: 'oops' is not STATUS:COUNT"),
        (
            vec!["--listen", "nowhere"],
            "--listen: 'nowhere' is not an address",
        ),
        (
            vec!["--delay-ms", "-1"],
            "--delay-ms: '-1' is not a whole number",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_whippet-intake"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
