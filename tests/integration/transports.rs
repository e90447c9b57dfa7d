//! Every metric type, events and service checks arrive with exact aggregated values over each
//! transport.

use crate::support::{Stopped, Whippet, ONE_BUCKET};

const INTERVAL: f64 = 1e9; // ONE_BUCKET
const BUCKET: &str = ONE_BUCKET; // bucket start of any time between 2001 and 2033

/// One packet's worth of every message kind; the same text is sent over each transport.
pub const PAYLOAD: &str = "\
c:1|c|#env:dev
c:2|c|#env:dev|@0.5
c:1:3|c|#env:dev
g:1|g
g:+5|g
s:a|s
s:b|s
s:a|s
s:a:b|s
h:1:2:3:4|h
h:10|h|@0.5
t:7|ms
d:1|d
d:10|d
d:100|d|@0.5
tg:7|g|T1700000000
tc:30|c|T1700000001|@0.5
tagged:1|g|#b,a,host:web9,a
nohost:1|g|#host:
_e{6,10}:deploy|v2\\nrolled|p:low|t:success|#svc:api
_sc|db.up|2|h:db1|#role:primary|m:connection refused";

fn assert_every_type(s: &Stopped, extra_tag: &str) {
    assert!(s.status.success(), "{:?}", s.stderr);
    let tags = |t: &str| match (t.is_empty(), extra_tag.is_empty()) {
        (true, _) => extra_tag.to_string(),
        (false, true) => t.to_string(),
        (false, false) => {
            let mut all: Vec<&str> = t.split(',').chain([extra_tag]).collect();
            all.sort();
            all.join(",")
        }
    };

    // Counter: Σ value·(1/rate) ÷ interval, as a rate.
    let c = s.one("series", "c", &tags("env:dev"));
    assert_eq!(
        (c.get("type"), c.get("ts"), c.get("host")),
        ("rate", BUCKET, "test-host")
    );
    assert_eq!(
        c.f64("value"),
        (1.0 + 2.0 * (1.0 / 0.5) + 1.0 + 3.0) / INTERVAL
    );
    assert_eq!(c.get("interval"), ONE_BUCKET);

    // Gauge: last value; "+5" is not a delta.
    let g = s.one("series", "g", &tags(""));
    assert_eq!((g.get("type"), g.f64("value")), ("gauge", 5.0));

    // Set: distinct members, colons included ("a:b" is one member).
    assert_eq!(s.one("series", "s", &tags("")).f64("value"), 3.0);

    // Histogram 1,2,3,4 (weight 1) and 10 (weight 2): count 6, sum 30.
    let h = |suffix: &str| s.one("series", &format!("h.{suffix}"), &tags(""));
    assert_eq!(h("max").f64("value"), 10.0);
    assert_eq!(h("median").f64("value"), 3.0); // target (6-1)/2 = 2 → third sample
    assert_eq!(h("avg").f64("value"), 30.0 / 6.0);
    assert_eq!(
        (h("count").get("type"), h("count").f64("value")),
        ("rate", 6.0 / INTERVAL)
    );
    assert_eq!(h("95percentile").f64("value"), 10.0); // target (570-1)/100 = 5
    let t = s.one("series", "t.max", &tags(""));
    assert_eq!(t.f64("value"), 7.0);

    // Distribution: 1, 10, and 100 at rate 0.5 (weight 2, sum +200).
    let d = s.one("sketch", "d", &tags(""));
    assert_eq!(
        (d.get("count"), d.get("min"), d.get("max")),
        ("4", "1", "100")
    );
    assert_eq!(
        (d.f64("sum"), d.f64("avg"), d.get("bins")),
        (211.0, 52.75, "3")
    );

    // Timestamped: own timestamp, no aggregation, sample rate ignored.
    let tg = s.one("series", "tg", &tags(""));
    assert_eq!((tg.get("ts"), tg.f64("value")), ("1700000000", 7.0));
    let tc = s.one("series", "tc", &tags(""));
    assert_eq!(
        (tc.get("type"), tc.get("ts"), tc.f64("value")),
        ("rate", "1700000001", 30.0 / INTERVAL)
    );

    // host: tags set the host and leave the tags; tags sorted and de-duplicated.
    let tagged = s.one("series", "tagged", &tags("a,b"));
    assert_eq!(tagged.get("host"), "web9");
    assert_eq!(s.one("series", "nohost", &tags("")).get("host"), "");

    let event = s
        .stdout
        .iter()
        .find(|l| l.starts_with("event "))
        .expect("an event");
    let event_tags = if extra_tag.is_empty() {
        "svc:api".to_string()
    } else {
        format!("svc:api,{extra_tag}")
    };
    assert!(event.starts_with("event ts="), "{event}");
    assert!(
        event.ends_with(&format!(
            "priority=low alert=success host=test-host aggregation_key=\"\" source_type=\"\" title=\"deploy\" text=\"v2\\nrolled\" tags={event_tags}"
        )),
        "{event}"
    );
    let check = s
        .stdout
        .iter()
        .find(|l| l.starts_with("service_check "))
        .expect("a check");
    let check_tags = if extra_tag.is_empty() {
        "role:primary".to_string()
    } else {
        format!("role:primary,{extra_tag}")
    };
    assert!(
        check.starts_with("service_check db.up status=2 ts="),
        "{check}"
    );
    assert!(
        check.ends_with(&format!(
            "host=db1 message=\"connection refused\" tags={check_tags}"
        )),
        "{check}"
    );

    // Nothing else: 13 series lines (c, g, s, 5×h, t×5, tg, tc, tagged, nohost) … counted exactly.
    let series = s.stdout.iter().filter(|l| l.starts_with("series ")).count();
    assert_eq!(series, 1 + 1 + 1 + 5 + 5 + 1 + 1 + 1 + 1, "{:#?}", s.stdout);
    assert_eq!(
        s.stdout.iter().filter(|l| l.starts_with("sketch ")).count(),
        1
    );
    assert_eq!(s.telemetry("whippet_messages_total{kind=\"metric\"}"), 19);
    assert_eq!(s.telemetry("whippet_messages_total{kind=\"event\"}"), 1);
    assert_eq!(
        s.telemetry("whippet_messages_total{kind=\"service_check\"}"),
        1
    );
}

#[test]
fn every_type_arrives_exactly_over_udp() {
    let w = Whippet::start(&[]);
    w.send_udp(PAYLOAD.as_bytes());
    let s = w.stop();
    assert_eq!(s.telemetry("whippet_packets_total{transport=\"udp\"}"), 1);
    assert_every_type(&s, "");
}

#[test]
fn every_type_arrives_exactly_over_the_unix_datagram_socket() {
    let w = Whippet::start(&[]);
    w.send_unix(PAYLOAD.as_bytes());
    let s = w.stop();
    assert_eq!(s.telemetry("whippet_packets_total{transport=\"unix\"}"), 1);
    assert_every_type(&s, "");
}

#[test]
fn every_type_arrives_exactly_over_the_unix_stream_socket_one_message_per_frame() {
    let w = Whippet::start(&[]);
    let frames: Vec<&[u8]> = PAYLOAD.lines().map(str::as_bytes).collect();
    w.send_stream(&frames);
    let s = w.stop();
    assert_eq!(
        s.telemetry("whippet_packets_total{transport=\"unix_stream\"}"),
        21
    );
    assert_every_type(&s, "");
}

#[test]
fn messages_split_across_transports_aggregate_into_the_same_contexts() {
    let w = Whippet::start(&["--tags", "team:core"]);
    let lines: Vec<&str> = PAYLOAD.lines().collect();
    // Each context stays on one transport except `d`, whose summary does not depend on the
    // order these values arrive in.
    let thirds: Vec<String> = lines.chunks(7).map(|c| c.join("\n")).collect();
    w.send_udp(thirds[0].as_bytes());
    w.send_unix(thirds[1].as_bytes());
    w.send_stream(&[thirds[2].as_bytes()]);
    let s = w.stop();
    assert_every_type(&s, "team:core");
}

#[test]
fn crlf_line_endings_and_empty_lines_are_accepted() {
    let w = Whippet::start(&[]);
    w.send_udp(b"crlf:1|c\r\n\r\n\ncrlf:2|c\r\n");
    let s = w.stop();
    assert_eq!(s.one("series", "crlf", "").f64("value"), 3.0 / INTERVAL);
    assert_eq!(s.telemetry("whippet_messages_total{kind=\"metric\"}"), 2);
}

#[test]
fn eol_required_drops_a_packets_unterminated_last_message_on_the_named_transports() {
    let w = Whippet::start(&["--eol-required", "udp"]);
    w.send_udp(b"ok.udp:1|c\ncut.udp:2|c");
    w.send_udp(b"whole.udp:3|c\n");
    // The Unix socket is not named: its last message needs no newline.
    w.send_unix(b"ok.unix:4|c\nlast.unix:5|c");
    w.wait_for_telemetry("whippet_samples_total", 4);
    let s = w.stop();
    assert!(s.status.success());
    assert_eq!(
        s.telemetry(r#"whippet_dropped_total{reason="unterminated"}"#),
        1
    );
    let mut names: Vec<String> = s.lines().into_iter().map(|l| l.name).collect();
    names.sort();
    assert_eq!(names, ["last.unix", "ok.udp", "ok.unix", "whole.udp"]);
}

#[test]
fn without_the_no_aggregation_pipeline_timestamped_samples_aggregate_at_arrival() {
    let w = Whippet::start(&["--no-aggregation-pipeline=false"]);
    w.send_udp(b"tg:5|g|T1600000000\ntg:7|g|T1600000100\nth:2|h|T1600000000");
    w.wait_for_telemetry("whippet_samples_total", 3);
    let s = w.stop();
    assert!(s.status.success());
    let g = s.one("series", "tg", "");
    assert_eq!((g.f64("value"), g.get("ts")), (7.0, BUCKET));
    assert_eq!(s.one("series", "th.max", "").f64("value"), 2.0);
    assert_eq!(
        s.telemetry_or_zero(r#"whippet_dropped_total{reason="timestamped_unsupported"}"#),
        0
    );
}

#[test]
fn every_packet_is_mirrored_to_the_forward_host_and_still_aggregated() {
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let port = receiver.local_addr().unwrap().port().to_string();
    let w = Whippet::start_env(
        &[],
        &[
            ("DD_STATSD_FORWARD_HOST", "localhost"),
            ("DD_STATSD_FORWARD_PORT", port.as_str()),
        ],
    );
    w.send_udp(b"m.udp:1|c\nm.udp:2|c");
    w.send_unix(b"m.unix:5|g");
    w.send_stream(&[b"m.stream:7|g"]);
    let mut copies = Vec::new();
    let mut buf = [0u8; 256];
    for _ in 0..3 {
        let n = receiver.recv(&mut buf).unwrap();
        copies.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    copies.sort();
    assert_eq!(
        copies,
        ["m.stream:7|g", "m.udp:1|c\nm.udp:2|c", "m.unix:5|g"]
    );
    w.wait_for_telemetry(r#"whippet_mirror_packets_total{result="sent"}"#, 3);
    let s = w.stop();
    assert!(s.status.success());
    assert_eq!(
        s.telemetry(r#"whippet_mirror_packets_total{result="dropped"}"#),
        0
    );
    assert_eq!(s.one("series", "m.unix", "").f64("value"), 5.0);
    assert_eq!(s.one("series", "m.stream", "").f64("value"), 7.0);
    assert_eq!(
        (s.one("series", "m.udp", "").f64("value") * INTERVAL).round(),
        3.0
    );
}

/// Whether this process may put a thread at `SCHED_FIFO` priority 1, as whippet started by
/// it may: tried on a thread of its own, which then ends.
fn real_time_allowed() -> bool {
    std::thread::spawn(|| {
        let param = nix::libc::sched_param { sched_priority: 1 };
        // SAFETY: pid 0 is this short-lived thread; `param` outlives the call.
        unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_FIFO, &param) == 0 }
    })
    .join()
    .unwrap()
}

#[test]
fn the_unix_datagram_readers_scheduling_shows_in_the_telemetry_and_in_proc() {
    let allowed = real_time_allowed();
    for (flags, want) in [
        (&[][..], allowed),
        (&["--unix-reader-priority", "0"][..], false),
    ] {
        let w = Whippet::start(flags);
        w.send_unix(b"m:1|c");
        w.wait_for_telemetry(r#"whippet_packets_total{transport="unix"}"#, 1);
        assert_eq!(
            w.telemetry_now("whippet_unix_reader_realtime"),
            want as u64,
            "{flags:?}"
        );
        // The kernel's view: field 41 of the reader thread's stat is its policy (1: FIFO).
        let tasks = format!("/proc/{}/task", w.pid());
        let policies: Vec<String> = std::fs::read_dir(&tasks)
            .unwrap()
            .filter_map(|t| {
                let t = t.unwrap().path();
                let comm = std::fs::read_to_string(t.join("comm")).ok()?;
                let stat = std::fs::read_to_string(t.join("stat")).ok()?;
                let after_name = &stat[stat.rfind(')')? + 2..];
                (comm.trim() == "whippet-unix")
                    .then(|| after_name.split(' ').nth(41 - 3).unwrap().to_string())
            })
            .collect();
        assert_eq!(policies, [if want { "1" } else { "0" }], "{flags:?}");
        let s = w.stop();
        assert!(s.status.success(), "{:?}", s.stderr);
        let refused = s
            .stderr
            .iter()
            .any(|l| l.contains("Unix datagram reader runs at normal priority"));
        assert_eq!(refused, flags.is_empty() && !allowed, "{:?}", s.stderr);
    }
}
