//! Bad input is counted by kind and reason, never crashes whippet, and never costs the valid
//! messages around it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use crate::support::{poll_until, write_frame, Line, Whippet, DEADLINE};
use whippet::telemetry::Label;

/// The 16 message shapes of the million-message test, by `i % 16`.
fn message(i: u64) -> Vec<u8> {
    match i % 16 {
        0 => b"ok.count:1|c|#k:v".to_vec(),
        1 => b"ok.gauge:42|g".to_vec(),
        2 => format!("ok.dist:{}|d", i % 100).into_bytes(),
        3 => b"bad.type:1|x".to_vec(),
        4 => b"bad.novalue|c".to_vec(),
        5 => b"bad.nan:NaN|g".to_vec(),
        6 => b"bad\xff\xfe:1|c".to_vec(),
        7 => b"_e{10,5}:short|x".to_vec(),
        8 => b"_sc|svc|7".to_vec(),
        9 => b":1|c".to_vec(),
        10 => format!("ok.set:{i}|s").into_bytes(),
        11 => b"bad.rate:1|c|@x".to_vec(),
        12 => b"bad.ts:1|g|Tsoon".to_vec(),
        13 => b"_e{3,2}:abc|de".to_vec(),
        14 => b"_sc|ok.check|0".to_vec(),
        _ => b"bad.ts.type:1|d|T1700000000".to_vec(),
    }
}

#[test]
fn a_million_mixed_messages_are_counted_exactly_by_kind_and_reason() {
    const TOTAL: u64 = 1_000_000;
    const EACH: u64 = TOTAL / 16;
    let w = Whippet::start(&["--event-backlog", "1000000"]);
    // The stream transport applies backpressure, so nothing is dropped however fast we send.
    let mut stream = UnixStream::connect(w.stream_socket.as_ref().unwrap()).unwrap();
    let mut frame = Vec::with_capacity(8192);
    let mut dist_sum = 0u64;
    for i in 0..TOTAL {
        let m = message(i);
        if frame.len() + m.len() + 1 > 8000 {
            write_frame(&mut stream, &frame);
            frame.clear();
        }
        frame.extend_from_slice(&m);
        frame.push(b'\n');
        if i % 16 == 2 {
            dist_sum += i % 100;
        }
    }
    write_frame(&mut stream, &frame);
    drop(stream);
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);

    let t = |key: &str| s.telemetry(key);
    assert_eq!(t(r#"whippet_messages_total{kind="metric"}"#), 5 * EACH);
    assert_eq!(t(r#"whippet_messages_total{kind="event"}"#), EACH);
    assert_eq!(t(r#"whippet_messages_total{kind="service_check"}"#), EACH);
    let errors = [
        ("metric", "unknown_type"),
        ("metric", "missing_value"),
        ("metric", "non_finite_value"),
        ("metric", "invalid_utf8"),
        ("metric", "empty_name"),
        ("metric", "invalid_sample_rate"),
        ("metric", "invalid_timestamp"),
        ("event", "invalid_length"),
        ("service_check", "invalid_status"),
    ];
    let mut error_total = 0;
    for (kind, reason) in errors {
        let n = t(&format!(
            r#"whippet_parse_errors_total{{kind="{kind}",reason="{reason}"}}"#
        ));
        assert_eq!(n, EACH, "{kind} {reason}");
        error_total += n;
    }
    let all_errors: u64 = s
        .stderr
        .iter()
        .filter(|l| l.starts_with("whippet: telemetry whippet_parse_errors_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(all_errors, error_total, "no other reason was counted");
    assert_eq!(
        t(r#"whippet_dropped_total{reason="timestamped_unsupported"}"#),
        EACH
    );
    assert_eq!(
        t(r#"whippet_dropped_total{reason="event_backlog_full"}"#),
        0
    );

    // The valid messages in between were all aggregated.
    assert_eq!(
        s.one("series", "ok.count", "k:v").f64("value"),
        EACH as f64 / 1e9
    );
    assert_eq!(s.one("series", "ok.gauge", "").f64("value"), 42.0);
    assert_eq!(s.one("series", "ok.set", "").f64("value"), EACH as f64);
    let d = s.one("sketch", "ok.dist", "");
    assert_eq!(d.get("count"), EACH.to_string());
    assert_eq!(d.f64("sum"), dist_sum as f64);
    assert_eq!((d.get("min"), d.get("max")), ("2", "98"));
    assert_eq!(
        s.stdout.iter().filter(|l| l.starts_with("event ")).count() as u64,
        EACH
    );
    assert_eq!(
        s.stdout
            .iter()
            .filter(|l| l.starts_with("service_check ok.check "))
            .count() as u64,
        EACH
    );
    assert_eq!(
        s.stdout
            .iter()
            .filter(|l| l.starts_with("series ") || l.starts_with("sketch "))
            .count(),
        4
    );
}

#[test]
fn datagrams_longer_than_the_buffer_are_counted_as_truncated_and_not_parsed() {
    let w = Whippet::start(&["--buffer-size", "512"]);
    let mut exact = b"fits:1|c\n".to_vec();
    exact.resize(512, b'\n');
    let mut long = b"cut:1|c\n".to_vec();
    long.resize(513, b'\n');
    w.send_udp(&exact);
    w.send_udp(&long);
    w.send_unix(&exact);
    w.send_unix(&long);
    let s = w.stop();
    assert_eq!(
        s.telemetry(r#"whippet_packets_truncated_total{transport="udp"}"#),
        1
    );
    assert_eq!(
        s.telemetry(r#"whippet_packets_truncated_total{transport="unix"}"#),
        1
    );
    assert_eq!(s.one("series", "fits", "").f64("value"), 2.0 / 1e9);
    assert!(
        !s.stdout.iter().any(|l| l.contains(" cut ")),
        "{:?}",
        s.stdout
    );
    assert_eq!(s.telemetry(r#"whippet_messages_total{kind="metric"}"#), 2);
}

#[test]
fn an_oversized_stream_frame_closes_only_its_connection() {
    let w = Whippet::start(&["--buffer-size", "512"]);
    let path = w.stream_socket.clone().unwrap();
    let mut bad = UnixStream::connect(&path).unwrap();
    let before = b"before:1|c";
    write_frame(&mut bad, before);
    bad.write_all(&513u32.to_le_bytes()).unwrap();
    // whippet closes the connection: our read sees end-of-file (bounded by the deadline).
    bad.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(bad.read(&mut [0u8; 16]).unwrap(), 0);
    w.send_stream(&[b"good:1|c", b"", b"good:2|c"]);
    // A connection that closes mid-frame.
    let mut half = UnixStream::connect(&path).unwrap();
    half.write_all(&10u32.to_le_bytes()).unwrap();
    half.write_all(b"half").unwrap();
    drop(half);
    let s = w.stop();
    assert_eq!(s.telemetry("whippet_stream_frames_too_large_total"), 1);
    assert_eq!(s.one("series", "before", "").f64("value"), 1.0 / 1e9);
    assert_eq!(s.one("series", "good", "").f64("value"), 3.0 / 1e9);
    assert_eq!(s.telemetry("whippet_stream_connections_total"), 3);
    assert_eq!(s.telemetry("whippet_stream_partial_frames_total"), 1);
}

#[test]
fn stream_connections_over_the_cap_are_refused_and_the_others_keep_working() {
    let w = Whippet::start(&["--stream-max-connections", "1"]);
    let path = w.stream_socket.clone().unwrap();
    let mut first = UnixStream::connect(&path).unwrap();
    let payload = b"capped:1|c";
    write_frame(&mut first, payload);
    // The first connection is registered once its frame is counted as a packet.
    w.wait_for_telemetry(r#"whippet_packets_total{transport="unix_stream"}"#, 1);
    let mut second = UnixStream::connect(&path).unwrap();
    second.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(
        second.read(&mut [0u8; 8]).unwrap(),
        0,
        "refused: closed by whippet"
    );
    write_frame(&mut first, payload);
    drop(first);
    let s = w.stop();
    assert_eq!(s.telemetry("whippet_stream_connections_refused_total"), 1);
    assert_eq!(s.telemetry("whippet_stream_connections_total"), 1);
    assert_eq!(s.one("series", "capped", "").f64("value"), 2.0 / 1e9);
}

#[test]
fn a_thousand_idle_connections_cannot_keep_out_a_client_that_has_something_to_say() {
    let w = Whippet::start(&[
        "--stream-max-connections",
        "64",
        "--stream-idle-timeout",
        "1s",
    ]);
    let path = w.stream_socket.clone().unwrap();
    // The hog: 1,000 connections that never send and never close.
    let hog: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    let packets = r#"whippet_packets_total{transport="unix_stream"}"#;
    let mut attempts = 0u64;
    // The client: connect, say one thing, wait for the close (at once when refused, after
    // the idle timeout when served), until whippet has heard it.
    poll_until("the client being heard", DEADLINE, || {
        if w.telemetry_now(packets) > 0 {
            return true;
        }
        attempts += 1;
        let mut c = UnixStream::connect(&path).unwrap();
        // A refused connection may already be closed: the write then fails, as a client's would.
        let _ = c.write_all(b"\x09\x00\x00\x00heard:1|c");
        let _ = c.read(&mut [0u8; 1]);
        false
    });
    let s = w.stop();
    drop(hog);
    assert!(s.status.success());
    let accepted = s.telemetry("whippet_stream_connections_total");
    let refused = s.telemetry("whippet_stream_connections_refused_total");
    assert_eq!(accepted + refused, 1000 + attempts);
    // Every served connection that went quiet was closed for it, the hog's 64 included.
    assert!(s.telemetry("whippet_stream_idle_closed_total") >= 64);
    assert_eq!(s.telemetry(packets), 1);
    assert_eq!(s.one("series", "heard", "").f64("value"), 1.0 / 1e9);
}

#[test]
fn ten_thousand_connects_in_a_row_do_not_starve_a_steady_client() {
    let w = Whippet::start(&[]);
    let path = w.stream_socket.clone().unwrap();
    let mut steady = UnixStream::connect(&path).unwrap();
    write_frame(&mut steady, b"steady:1|c");
    w.wait_for_telemetry(r#"whippet_packets_total{transport="unix_stream"}"#, 1);
    let churn = std::thread::spawn(move || {
        for _ in 0..10_000 {
            drop(UnixStream::connect(&path).unwrap());
        }
    });
    for _ in 1..1000 {
        write_frame(&mut steady, b"steady:1|c");
    }
    churn.join().unwrap();
    drop(steady);
    let s = w.stop();
    assert!(s.status.success());
    let accepted = s.telemetry("whippet_stream_connections_total");
    let refused = s.telemetry("whippet_stream_connections_refused_total");
    assert_eq!(accepted + refused, 10_001);
    assert_eq!(s.one("series", "steady", "").f64("value"), 1000.0 / 1e9);
}

#[test]
fn a_full_queue_pushes_back_on_unix_datagram_senders_and_loses_nothing() {
    // One worker and a one-batch queue: the reader waits for room, the socket queue fills,
    // and the sender blocks until whippet catches up.
    let w = Whippet::start(&["--queue-size", "1", "--workers", "1"]);
    const PACKETS: u64 = 20_000;
    let packet = b"flood:1|c\nflood:1|c\nflood:1|c";
    for _ in 0..PACKETS {
        w.send_unix(packet);
    }
    let s = w.stop();
    assert_eq!(
        s.telemetry(r#"whippet_messages_total{kind="metric"}"#),
        3 * PACKETS
    );
    assert_eq!(
        s.telemetry(r#"whippet_dropped_total{reason="queue_full"}"#),
        0
    );
    assert_eq!(
        s.telemetry(r#"whippet_packets_total{transport="unix"}"#),
        PACKETS
    );
    assert_eq!(
        s.one("series", "flood", "").f64("value"),
        (3 * PACKETS) as f64 / 1e9
    );
}

#[test]
fn every_udp_message_is_aggregated_or_counted_as_dropped_by_the_queue_or_the_kernel() {
    // One worker, a one-batch queue and a small receive buffer: UDP overflows somewhere,
    // and where depends on scheduling, but the accounting must be exact either way.
    let w = Whippet::start(&[
        "--queue-size",
        "1",
        "--workers",
        "1",
        "--so-rcvbuf",
        "65536",
    ]);
    const PACKETS: u64 = 20_000;
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..PACKETS {
        sender
            .send_to(b"flood:1|c\nflood:1|c\nflood:1|c", w.udp.unwrap())
            .unwrap();
    }
    // Wait until every datagram is either received or counted as dropped by the kernel.
    poll_until("every datagram received or dropped", DEADLINE, || {
        let received = w.telemetry_now(r#"whippet_packets_total{transport="udp"}"#);
        received + w.telemetry_now("whippet_udp_kernel_drops") == PACKETS
    });
    let s = w.stop();
    let received = s.telemetry(r#"whippet_packets_total{transport="udp"}"#);
    let kernel = s.telemetry("whippet_udp_kernel_drops");
    let parsed = s.telemetry(r#"whippet_messages_total{kind="metric"}"#);
    let queue_full = s.telemetry(r#"whippet_dropped_total{reason="queue_full"}"#);
    assert_eq!(received + kernel, PACKETS);
    assert_eq!(parsed + queue_full, 3 * received);
    assert_eq!(
        queue_full,
        3 * s.telemetry(r#"whippet_packets_queue_full_total{transport="udp"}"#)
    );
    if parsed > 0 {
        assert_eq!(
            s.one("series", "flood", "").f64("value"),
            parsed as f64 / 1e9
        );
    }
}

#[test]
fn several_udp_readers_share_one_port_and_lose_nothing_sent_at_a_gentle_pace() {
    let w = Whippet::start(&["--udp-readers", "4"]);
    let senders: Vec<std::net::UdpSocket> = (0..8)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for i in 0..400 {
        senders[i % 8]
            .send_to(b"spread:1|c", w.udp.unwrap())
            .unwrap();
    }
    w.wait_for_udp_packets(400);
    let s = w.stop();
    // 400 datagrams of 10 bytes cannot fill a 4 MiB receive buffer: no kernel drops.
    assert_eq!(s.telemetry("whippet_udp_kernel_drops"), 0);
    assert_eq!(
        s.telemetry(r#"whippet_packets_total{transport="udp"}"#),
        400
    );
    assert_eq!(s.one("series", "spread", "").f64("value"), 400.0 / 1e9);
}

#[test]
fn the_context_limit_drops_samples_for_new_contexts_and_counts_them() {
    let w = Whippet::start(&["--context-limit", "100"]);
    w.send_unix(b"lim.0:1|g");
    w.wait_for_telemetry("whippet_samples_total", 1);
    let rest: Vec<String> = (1..150).map(|i| format!("lim.{i}:1|g")).collect();
    for chunk in rest.chunks(50) {
        w.send_unix(chunk.join("\n").as_bytes());
    }
    w.wait_for_telemetry(r#"whippet_messages_total{kind="metric"}"#, 150);
    w.send_unix(b"lim.0:5|g"); // an existing context keeps working at the limit
    w.wait_for_telemetry(r#"whippet_messages_total{kind="metric"}"#, 151);
    let s = w.stop();
    assert!(s.status.success());
    let series: Vec<Line> = s
        .lines()
        .into_iter()
        .filter(|l| l.name.starts_with("lim."))
        .collect();
    assert_eq!(series.len(), 100);
    assert_eq!(s.one("series", "lim.0", "").f64("value"), 5.0);
    assert_eq!(s.telemetry("whippet_contexts_created_total"), 100);
    assert_eq!(
        s.telemetry(r#"whippet_dropped_total{reason="context_limit"}"#),
        50
    );
    assert_eq!(s.telemetry("whippet_samples_total"), 101);
}

#[test]
fn two_million_unique_contexts_stay_within_the_memory_bound() {
    const SENT: u64 = 2_000_000;
    const LIMIT: u64 = 500_000;
    // Gauges tagged by user id, the classic cardinality accident; one-second buckets so the
    // flush of all the contexts happens (and is measured) while whippet runs.
    let w = Whippet::start(&[
        "--context-limit",
        &LIMIT.to_string(),
        "--bucket-seconds",
        "1",
    ]);
    let mut stream = UnixStream::connect(w.stream_socket.as_ref().unwrap()).unwrap();
    let mut frame = Vec::with_capacity(8192);
    for i in 0..SENT {
        let m = format!("user.seen:1|g|#user:{i},env:prod\n");
        if frame.len() + m.len() > 8000 {
            write_frame(&mut stream, &frame);
            frame.clear();
        }
        frame.extend_from_slice(m.as_bytes());
    }
    write_frame(&mut stream, &frame);
    drop(stream);
    w.wait_for_telemetry(
        r#"whippet_dropped_total{reason="context_limit"}"#,
        SENT - LIMIT,
    );
    w.wait_for_telemetry(r#"whippet_flushed_total{data="points"}"#, LIMIT);
    let peak_mib = w.status_kib("VmHWM") / 1024;
    let s = w.stop();
    assert!(s.status.success());
    assert_eq!(s.telemetry("whippet_contexts_created_total"), LIMIT);
    assert_eq!(s.telemetry("whippet_samples_total"), LIMIT);
    // docs/reliability.md, "Memory": 24 MiB of fixed cost (binary, buffers, the default queue)
    // plus about 150 bytes per context with keys this short, flush included; 200 leaves room
    // for a debug build's allocations.
    let bound_mib = 24 + LIMIT * 200 / (1 << 20);
    eprintln!("peak RSS {peak_mib} MiB with {LIMIT} contexts, bound {bound_mib} MiB");
    assert!(
        peak_mib <= bound_mib,
        "peak RSS {peak_mib} MiB over {bound_mib} MiB"
    );
}

#[test]
fn a_million_malformed_messages_of_every_kind_cost_nothing_but_counters() {
    use whippet::parser::{self, Message};
    const TOTAL: u64 = 1_000_000;
    let long_name = "n".repeat(64 * 1024 - 16);
    let many_tags: String = (0..3000).map(|i| format!("t{i}:v,")).collect();
    let shapes: Vec<Vec<u8>> = vec![
        b"ok.count:1|c".to_vec(),
        b"huge:1e400|g".to_vec(),
        b"huge.neg:-1e309|c".to_vec(),
        b"type:1|zz".to_vec(),
        b"bad\xc3\x28utf8:1|c".to_vec(),
        b"_e{5,10}:hello|wor".to_vec(),
        b"_e{100,1}:a|b".to_vec(),
        b"_e{-1,1}:a|b".to_vec(),
        b"nul\x00name:1|c".to_vec(),
        b"\x00\x00\x00".to_vec(),
        b"_sc|x|9|#a".to_vec(),
        b"many.values:1:2:x|h".to_vec(),
    ];
    // What the parser says of each shape; the pipeline must count exactly that.
    let mut want: std::collections::BTreeMap<String, u64> = Default::default();
    let mut verdict = |line: &[u8], n: u64| {
        let key = match parser::parse(line) {
            Ok(Message::Metric(_)) => r#"whippet_messages_total{kind="metric"}"#.to_string(),
            Ok(Message::Event(_)) => r#"whippet_messages_total{kind="event"}"#.to_string(),
            Ok(Message::ServiceCheck(_)) => {
                r#"whippet_messages_total{kind="service_check"}"#.to_string()
            }
            Err(e) => format!(
                r#"whippet_parse_errors_total{{kind="{}",reason="{}"}}"#,
                e.kind.label(),
                e.reason.label()
            ),
        };
        *want.entry(key).or_default() += n;
    };
    let per_shape = TOTAL / shapes.len() as u64;
    for s in &shapes {
        verdict(s, per_shape);
    }
    let giants = 50u64;
    verdict(format!("{long_name}:1|c").as_bytes(), giants);
    verdict(format!("tagged:1|c|#{many_tags}").as_bytes(), giants);

    let w = Whippet::start(&["--buffer-size", "65536", "--event-backlog", "10"]);
    let path = w.stream_socket.clone().unwrap();
    let mut stream = UnixStream::connect(&path).unwrap();
    let mut frame = Vec::with_capacity(65536);
    let mut frames = 0u64;
    for i in 0..per_shape * shapes.len() as u64 {
        let m = &shapes[(i % shapes.len() as u64) as usize];
        if frame.len() + m.len() + 1 > 8000 {
            write_frame(&mut stream, &frame);
            frame.clear();
            frames += 1;
            if frames % 100 == 0 {
                write_frame(&mut stream, b""); // zero-length frames are skipped
            }
        }
        frame.extend_from_slice(m);
        frame.push(b'\n');
    }
    write_frame(&mut stream, &frame);
    for _ in 0..giants {
        write_frame(&mut stream, format!("{long_name}:1|c").as_bytes());
        write_frame(&mut stream, format!("tagged:1|c|#{many_tags}").as_bytes());
    }
    drop(stream);
    // Half frames: a header promising more than the connection ever sends.
    for _ in 0..20 {
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(&100u32.to_le_bytes()).unwrap();
        c.write_all(b"half:1|c").unwrap();
    }
    w.wait_for_telemetry("whippet_stream_partial_frames_total", 20);
    let peak_mib = w.status_kib("VmHWM") / 1024;
    let s = w.stop();
    assert!(s.status.success(), "{:?}", s.stderr);
    for (key, n) in &want {
        assert_eq!(s.telemetry(key), *n, "{key}");
    }
    // The final telemetry (SIGUSR1 printed earlier snapshots too).
    let stopping = s
        .stderr
        .iter()
        .rposition(|l| l.starts_with("whippet: stopping"))
        .unwrap();
    let errors: u64 = s.stderr[stopping..]
        .iter()
        .filter(|l| l.starts_with("whippet: telemetry whippet_parse_errors_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    let want_errors: u64 = want
        .iter()
        .filter(|(k, _)| k.starts_with("whippet_parse_errors_total"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(errors, want_errors, "no other reason was counted");
    assert_eq!(s.telemetry("whippet_stream_frames_too_large_total"), 0);
    // The valid messages among them were all aggregated, the giants included.
    assert_eq!(
        s.one("series", "ok.count", "").f64("value"),
        per_shape as f64 / 1e9
    );
    let tagged: Vec<&String> = s
        .stdout
        .iter()
        .filter(|l| l.starts_with("series tagged "))
        .collect();
    assert_eq!(tagged.len(), 1);
    assert!(tagged[0].contains(" value=0.00000005 ") && tagged[0].contains(",t2999:v,"));
    let giant = format!("series {long_name} rate ts=1000000000 value=0.00000005 ");
    assert_eq!(s.stdout.iter().filter(|l| l.starts_with(&giant)).count(), 1);
    assert!(peak_mib < 100, "peak RSS {peak_mib} MiB");
}

#[test]
fn control_characters_from_clients_reach_the_console_escaped() {
    let w = Whippet::start(&[]);
    w.send_udp(b"esc\x1b[2J:1|c|#t:\x1b]0;title\x07\n_sc|chk\x1b[1A|0|h:host\x7f\xc2\x9b|#u:\x01");
    let s = w.stop();
    assert!(s.status.success());
    let raw = |l: &&String| l.chars().any(|c| c.is_control());
    let shown: Vec<&String> = s.stdout.iter().filter(raw).collect();
    assert!(shown.is_empty(), "{shown:?}");
    let series = s
        .stdout
        .iter()
        .find(|l| l.starts_with("series esc"))
        .unwrap();
    assert!(
        series.starts_with(r"series esc\u{1b}[2J rate ")
            && series.ends_with(r"tags=t:\u{1b}]0;title\u{7}"),
        "{series}"
    );
    let check = s
        .stdout
        .iter()
        .find(|l| l.starts_with("service_check"))
        .unwrap();
    assert!(
        check.starts_with(r"service_check chk\u{1b}[1A status=0"),
        "{check}"
    );
    assert!(
        check.contains(r" host=host\u{7f}\u{9b} ") && check.ends_with(r"tags=u:\u{1}"),
        "{check}"
    );
}

#[test]
fn aggregates_that_overflow_to_infinity_are_dropped_and_counted_never_sent() {
    let w = Whippet::start(&[]);
    // A counter summed past f64's range, a sample rate whose weight is infinite, a histogram
    // whose sum (and so its avg) overflows, a distribution whose sum does.
    w.send_udp(b"big:1e308|c\nbig:1e308|c\ntiny:1|c|@1e-320\nh:1e308|h\nh:1e308|h\nd:1e308|d\nd:1e308|d\nfine:1|c");
    let s = w.stop();
    assert!(s.status.success());
    assert_eq!(
        s.telemetry(r#"whippet_dropped_total{reason="non_finite"}"#),
        4
    );
    let inf: Vec<&String> = s.stdout.iter().filter(|l| l.contains("inf")).collect();
    assert!(inf.is_empty(), "{inf:?}");
    // The histogram's other aggregates are finite and sent.
    assert_eq!(s.one("series", "h.max", "").f64("value"), 1e308);
    assert_eq!(s.one("series", "fine", "").f64("value"), 1.0 / 1e9);
    assert!(!s.stdout.iter().any(|l| l.starts_with("series h.avg ")));
    assert!(!s.stdout.iter().any(|l| l.starts_with("sketch d ")));
}

#[test]
fn a_client_dripping_a_frame_a_byte_at_a_time_is_closed_at_the_idle_timeout() {
    let w = Whippet::start(&["--stream-idle-timeout", "1s"]);
    let path = w.stream_socket.clone().unwrap();
    let mut c = UnixStream::connect(&path).unwrap();
    // A 100-byte frame, one byte every 100 ms: each read is well within the timeout, but the
    // frame would take 10 s.
    c.write_all(&100u32.to_le_bytes()).unwrap();
    let started = std::time::Instant::now();
    let mut sent = 0;
    let cut = loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if c.write_all(b"x").is_err() {
            break true;
        }
        sent += 1;
        if sent == 100 {
            break false;
        }
    };
    assert!(
        cut,
        "the whole frame got through in {:?}",
        started.elapsed()
    );
    let s = w.stop();
    assert_eq!(s.telemetry("whippet_stream_idle_closed_total"), 1);
    assert_eq!(s.telemetry("whippet_stream_partial_frames_total"), 1);
    assert_eq!(
        s.telemetry(r#"whippet_packets_total{transport="unix_stream"}"#),
        0
    );
}

/// `n` `prefix:value` parts joined by `:` after `head`, as long as they fit `room` bytes.
fn values(head: &str, room: usize, value: impl Fn(usize) -> String) -> String {
    let mut m = head.to_string();
    for i in 0.. {
        let v = value(i);
        if m.len() + v.len() + 1 > room {
            break;
        }
        m.push(':');
        m.push_str(&v);
    }
    m
}

#[test]
fn the_worst_input_shapes_stay_within_the_memory_formula() {
    // docs/reliability.md, "Memory", with a 16 MiB --aggregation-memory. Each shape alone
    // would hold several times that (the timestamped one, before it was bounded, a copy of
    // its key per value: gigabytes). One whippet per shape, so each meets the whole budget.
    const BUDGET: u64 = 16 << 20;
    let tags = |n: usize| -> String {
        (0..n)
            .map(|i| format!("tag{i:03}:value{i:012}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (tags_short, tags_2k, tags_8k) = (tags(5), tags(80), tags(320));
    let now = whippet::clock::unix_now();
    // At the defaults: 20 datagrams of timestamped values with 2 KB of tags, which held
    // 156 MiB when every value kept a copy of its key, now share one key a datagram. (A
    // longer --shutdown-timeout only because a debug build on a busy machine takes a while
    // to print 60,000 points with 2 KB of tags each.)
    let w = Whippet::start(&["--shutdown-timeout", "60s"]);
    let tail = format!("|g|T{now}|#{tags_2k}");
    let timestamped = values("ts.m", 8192 - tail.len(), |_| "1".into()) + &tail;
    for _ in 0..20 {
        w.send_unix(timestamped.as_bytes());
    }
    w.wait_for_telemetry(r#"whippet_messages_total{kind="metric"}"#, 20);
    let peak_mib = w.status_kib("VmHWM") / 1024;
    let s = w.stop();
    assert!(s.status.success());
    assert_eq!(s.telemetry("whippet_samples_total"), 20 * 3086);
    assert!(peak_mib < 64, "peak {peak_mib} MiB at the defaults");
    eprintln!("MEASURED 20 timestamped datagrams at the defaults: peak {peak_mib} MiB");
    let tail = format!("|g|T{now}|#{tags_short}");
    let timestamped = values("ts.m", 8192 - tail.len(), |_| "1".into()) + &tail;
    let shapes: Vec<(&str, Vec<String>)> = vec![
        // ~4,000 timestamped points a datagram.
        ("timestamped multi-value", vec![timestamped; 150]),
        // One histogram, ~1,000 samples a datagram.
        (
            "histogram samples",
            (0..2000)
                .map(|d| values("hist", 8180, |i| format!("{}", d * 2000 + i)) + "|h")
                .collect(),
        ),
        // Contexts with 8 KB of tags.
        (
            "8 KB contexts",
            (0..4000)
                .map(|i| format!("ctx.{i}:1|c|#{tags_8k}"))
                .collect(),
        ),
        // One set, 500 new members a datagram.
        (
            "set members",
            (0..6000)
                .map(|d| {
                    (0..500)
                        .map(|i| format!("set:{}|s\n", d * 500 + i))
                        .collect()
                })
                .collect(),
        ),
        // Distributions of ~800 values 3% apart each: a sketch bin per value.
        (
            "distributions",
            (0..6000)
                .map(|c| {
                    values(&format!("dist.{c}"), 8180, |i| {
                        format!("{:.3e}", 1e-6 * 1.03f64.powi(i as i32))
                    }) + "|d"
                })
                .collect(),
        ),
    ];
    let budget = BUDGET.to_string();
    for (shape, datagrams) in shapes {
        let w = Whippet::start(&[
            "--aggregation-memory",
            &budget,
            "--workers",
            "2",
            "--shutdown-timeout",
            "60s",
        ]);
        let mut messages = 0;
        for d in &datagrams {
            assert!(d.len() <= 8192, "{shape}: {} bytes", d.len());
            messages += d.lines().count() as u64;
            w.send_unix(d.as_bytes());
        }
        w.wait_for_telemetry(r#"whippet_messages_total{kind="metric"}"#, messages);
        let peak_mib = w.status_kib("VmHWM") / 1024;
        let held = w.telemetry_now("whippet_aggregation_memory_bytes");
        let dropped = w.telemetry_now(r#"whippet_dropped_total{reason="memory_limit"}"#);
        let s = w.stop();
        assert!(s.status.success(), "{shape}");
        assert!(dropped > 0, "{shape}: nothing dropped");
        // Held within the budget, give or take one growing vector per shard.
        assert!(held <= BUDGET + (8 << 20), "{shape}: {held}");
        // The formula (docs/reliability.md, "Memory"): 24 MiB fixed, (queue 16 + 2 workers
        // + 1 UDP + 1 Unix reader + 5) batches of 512 KiB, for each parser (2 workers, and
        // the UDP and Unix readers' own) 2 MiB of cache and the (16 shards + 6) lists of
        // 128 KiB it keeps, and twice the budget (held, and one flush's worth leaving the
        // shards).
        let parsers = 4;
        let formula_kib = 24 * 1024
            + (16 + 2 + 1 + 1 + 5) * 512
            + parsers * (2048 + (16 + 6) * 128)
            + 2 * (BUDGET >> 10);
        let formula_mib = formula_kib / 1024;
        assert!(
            peak_mib <= formula_mib,
            "{shape}: peak {peak_mib} MiB > {formula_mib} MiB"
        );
        eprintln!("MEASURED {shape}: peak {peak_mib} MiB, held {held} B, {dropped} dropped");
    }
}
