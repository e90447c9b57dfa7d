//! The test intake: a Datadog-compatible HTTP intake on tiny_http that decompresses and
//! decodes everything whippet (or an Agent) sends, stores it, and answers queries in the
//! format of Datadog's fakeintake. Used by the tests in-process, by the `whippet-intake`
//! binary, and by the benchmark.
//!
//! Fault injection: `api_key` answers 403 to other keys, `fail` answers a status to the next
//! N requests, `fail_for` answers a status for a while after start, `delay` holds answers
//! (every one, or the first `slow_requests`) after the payload is stored, as an intake that
//! is slow to acknowledge.

pub mod proto;
pub mod store;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use store::{Decoded, Store, Stored};

/// Largest body accepted after decompression: far above any Datadog limit, so a
/// decompression bomb is refused instead of eating memory.
const MAX_DECOMPRESSED: u64 = 64 << 20;

/// How the intake behaves.
#[derive(Debug, Clone)]
pub struct IntakeConfig {
    pub listen: SocketAddr,
    /// Answer 403 to requests whose `DD-API-KEY` differs.
    pub api_key: Option<String>,
    /// Answer `status` to the next `count` data requests.
    pub fail: Option<(u16, u64)>,
    /// Answer `status` to every data request for this long after start.
    pub fail_for: Option<(u16, Duration)>,
    /// Hold answers this long (after storing the payload).
    pub delay: Duration,
    /// Delay only the first this many requests; 0 delays all.
    pub slow_requests: u64,
    /// Print a readable line per decoded point, sketch, event and check.
    pub print: bool,
    /// Answer every Datadog route with this 3xx status and `Location`, storing nothing.
    pub redirect: Option<(u16, String)>,
}

impl Default for IntakeConfig {
    fn default() -> IntakeConfig {
        IntakeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: None,
            fail: None,
            fail_for: None,
            delay: Duration::ZERO,
            slow_requests: 0,
            print: false,
            redirect: None,
        }
    }
}

struct Shared {
    config: IntakeConfig,
    store: Arc<Store>,
    fail_left: AtomicU64,
    slow_left: AtomicU64,
    started: std::time::Instant,
    stopping: AtomicBool,
}

/// A running intake.
pub struct Intake {
    addr: SocketAddr,
    server: Arc<Server>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Request threads: enough that a delayed answer does not hold up the others.
const THREADS: usize = 4;

impl Intake {
    pub fn start(config: IntakeConfig) -> Result<Intake, String> {
        let server = Server::http(config.listen)
            .map_err(|e| format!("cannot listen on {} (--listen): {e}", config.listen))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| "the intake is not listening on an IP address".to_string())?;
        let server = Arc::new(server);
        let shared = Arc::new(Shared {
            fail_left: AtomicU64::new(config.fail.map_or(0, |f| f.1)),
            slow_left: AtomicU64::new(config.slow_requests),
            started: std::time::Instant::now(),
            config,
            store: Arc::new(Store::default()),
            stopping: AtomicBool::new(false),
        });
        let threads = (0..THREADS)
            .map(|i| {
                let (server, shared) = (server.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("intake-{i}"))
                    .spawn(move || {
                        while !shared.stopping.load(Relaxed) {
                            if let Ok(request) = server.recv() {
                                handle(&shared, request);
                            }
                        }
                    })
                    .map_err(|e| format!("cannot start intake thread: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Intake {
            addr,
            server,
            shared,
            threads,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for `--dd-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// Stops the request threads.
    pub fn stop(self) {
        self.shared.stopping.store(true, Relaxed);
        for _ in 0..self.threads.len() {
            self.server.unblock();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

fn json_response(status: u16, body: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    let content_type =
        Header::from_bytes("Content-Type", "application/json").unwrap_or_else(|_| unreachable!());
    Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header(content_type)
}

fn handle(shared: &Shared, mut request: Request) {
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let path = path.to_string();
    let query = query.to_string();
    shared.store.record_route(&path);
    let response = if path.starts_with("/fakeintake/") {
        fakeintake(shared, &path, &query)
    } else if let Some((status, location)) = &shared.config.redirect {
        let header = Header::from_bytes("Location", format!("{location}{path}"))
            .unwrap_or_else(|_| unreachable!("a test's own address"));
        json_response(*status, &json!({"moved": location})).with_header(header)
    } else {
        data(shared, &mut request, &path)
    };
    // Only payload submissions are slow, not the API key check or queries.
    let payload = !path.starts_with("/fakeintake/") && path != "/api/v1/validate";
    let slow = payload
        && (shared.config.slow_requests == 0
            || shared
                .slow_left
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok());
    if !shared.config.delay.is_zero() && slow {
        std::thread::sleep(shared.config.delay);
    }
    let _ = request.respond(response);
}

/// A JSON answer.
type Answer = Response<std::io::Cursor<Vec<u8>>>;

/// The Datadog routes.
fn data(shared: &Shared, request: &mut Request, path: &str) -> Answer {
    if let Some(refused) = refusal(shared, request, path) {
        return refused;
    }
    let store = &shared.store;
    let encoding = header(request, "Content-Encoding")
        .unwrap_or("")
        .to_string();
    let mut raw = Vec::new();
    if let Err(e) = request
        .as_reader()
        .take(MAX_DECOMPRESSED)
        .read_to_end(&mut raw)
    {
        store.record_rejected("read");
        return json_response(400, &json!({"errors": [format!("cannot read body: {e}")]}));
    }
    let decoded = decompress(&encoding, &raw).and_then(|body| decode(path, &body));
    match decoded {
        Ok(decoded) => {
            if shared.config.print {
                print(&decoded);
            }
            let text = |name| header(request, name).unwrap_or("").to_string();
            store.add(Stored {
                endpoint: path.to_string(),
                raw,
                encoding,
                content_type: text("Content-Type"),
                user_agent: text("User-Agent"),
                api_key: text("DD-API-KEY"),
                received: SystemTime::now(),
                decoded,
            });
            json_response(202, &json!({"status": "ok"}))
        }
        Err(reason) => {
            store.record_rejected("bad_payload");
            json_response(400, &json!({"errors": [reason]}))
        }
    }
}

/// The answer to a request refused before its body is read: a wrong API key, the key check
/// itself (always valid), an injected failure, an unknown route or method.
fn refusal(shared: &Shared, request: &Request, path: &str) -> Option<Answer> {
    let store = &shared.store;
    let refuse = |reason: &str, status: u16, error: String| {
        store.record_rejected(reason);
        Some(json_response(status, &json!({"errors": [error]})))
    };
    if let Some(key) = &shared.config.api_key {
        if header(request, "DD-API-KEY") != Some(key.as_str()) {
            return refuse("forbidden", 403, "Forbidden".into());
        }
    }
    if path == "/api/v1/validate" {
        return Some(json_response(200, &json!({"valid": true})));
    }
    // Injected failures hit payload submissions only, not the key check.
    if let Some((status, span)) = shared.config.fail_for {
        if shared.started.elapsed() < span {
            return refuse(
                &format!("injected_{status}"),
                status,
                "injected failure".into(),
            );
        }
    }
    if let Some((status, _)) = shared.config.fail {
        let took = shared
            .fail_left
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if took {
            return refuse(
                &format!("injected_{status}"),
                status,
                "injected failure".into(),
            );
        }
    }
    let known = [
        "/api/v2/series",
        "/api/v1/series",
        "/api/beta/sketches",
        "/intake/",
        "/api/v1/check_run",
    ];
    if !known.contains(&path) {
        return refuse("unknown_route", 404, format!("no route {path}"));
    }
    if *request.method() != Method::Post {
        return refuse("method", 405, "POST only".into());
    }
    None
}

/// Undoes `Content-Encoding`: zstd, deflate (zlib), gzip, or none.
pub fn decompress(encoding: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let result = match encoding {
        "" | "identity" => return Ok(body.to_vec()),
        "zstd" => zstd::stream::read::Decoder::new(body)
            .and_then(|d| d.take(MAX_DECOMPRESSED).read_to_end(&mut out)),
        "deflate" => flate2::read::ZlibDecoder::new(body)
            .take(MAX_DECOMPRESSED)
            .read_to_end(&mut out),
        "gzip" => flate2::read::GzDecoder::new(body)
            .take(MAX_DECOMPRESSED)
            .read_to_end(&mut out),
        other => return Err(format!("unsupported Content-Encoding '{other}'")),
    };
    result.map_err(|e| format!("cannot decompress {encoding} body: {e}"))?;
    Ok(out)
}

/// Decodes a decompressed body for its route.
pub fn decode(path: &str, body: &[u8]) -> Result<Decoded, String> {
    let json = |what: &str| {
        serde_json::from_slice::<Value>(body).map_err(|e| format!("invalid {what} JSON: {e}"))
    };
    match path {
        "/api/v2/series" => prost::Message::decode(body)
            .map(Decoded::Series)
            .map_err(|e| format!("invalid MetricPayload: {e}")),
        "/api/beta/sketches" => prost::Message::decode(body)
            .map(Decoded::Sketches)
            .map_err(|e| format!("invalid SketchPayload: {e}")),
        "/api/v1/series" => {
            let v = json("series")?;
            if !v["series"].is_array() {
                return Err("series payload has no \"series\" array".into());
            }
            Ok(Decoded::SeriesV1(v))
        }
        "/intake/" => {
            let v = json("events")?;
            if !v["events"].is_object() {
                return Err("events payload has no \"events\" object".into());
            }
            Ok(Decoded::Events(v))
        }
        _ => {
            let v = json("service checks")?;
            if !v.is_array() {
                return Err("service checks payload is not an array".into());
            }
            Ok(Decoded::ServiceChecks(v))
        }
    }
}

/// `/fakeintake/...`: the query API of Datadog's fakeintake.
fn fakeintake(shared: &Shared, path: &str, query: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    let store = &shared.store;
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.replace("%2F", "/").replace("%2f", "/"))
    };
    match path {
        "/fakeintake/health" => json_response(200, &json!({"status": "ok"})),
        "/fakeintake/flushPayloads" => {
            store.clear();
            json_response(200, &json!({"status": "ok"}))
        }
        "/fakeintake/routestats" => {
            let stats: serde_json::Map<String, Value> = store
                .routes()
                .into_iter()
                .filter(|(route, _)| !route.starts_with("/fakeintake/"))
                .map(|(route, count)| (route.clone(), json!({"ID": route, "Count": count})))
                .collect();
            json_response(200, &Value::Object(stats))
        }
        "/fakeintake/payloads" => {
            let Some(endpoint) = param("endpoint") else {
                return json_response(400, &json!({"errors": ["missing endpoint parameter"]}));
            };
            let as_json = param("format").as_deref() == Some("json");
            let payloads: Vec<Value> = store
                .payloads(Some(&endpoint))
                .iter()
                .map(|p| {
                    let data = if as_json {
                        p.decoded.to_json()
                    } else {
                        Value::from(base64::engine::general_purpose::STANDARD.encode(&p.raw))
                    };
                    json!({"data": data, "encoding": p.encoding, "timestamp": rfc3339(p.received)})
                })
                .collect();
            json_response(200, &json!({ "payloads": payloads }))
        }
        _ => json_response(404, &json!({"errors": [format!("no route {path}")]})),
    }
}

/// UTC time as RFC 3339 with seconds, computed without a date library.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `--print`: one readable line per point, sketch, event and check, on stdout.
fn print(decoded: &Decoded) {
    let stored = [Stored {
        endpoint: String::new(),
        raw: Vec::new(),
        encoding: String::new(),
        content_type: String::new(),
        user_agent: String::new(),
        api_key: String::new(),
        received: SystemTime::now(),
        decoded: decoded.clone(),
    }];
    let mut text = String::new();
    for p in store::points_of(&stored) {
        text.push_str(&format!(
            "series {} {} ts={} value={} interval={} host={} tags={}\n",
            p.metric,
            p.kind,
            p.timestamp,
            p.value,
            p.interval,
            p.host,
            p.tags.join(",")
        ));
    }
    for s in store::sketches_of(&stored) {
        text.push_str(&format!(
            "sketch {} ts={} count={} min={} max={} sum={} avg={} bins={} host={} tags={}\n",
            s.metric,
            s.ts,
            s.cnt,
            s.min,
            s.max,
            s.sum,
            s.avg,
            s.k.len(),
            s.host,
            s.tags.join(",")
        ));
    }
    match decoded {
        Decoded::Events(v) => {
            for list in v["events"].as_object().into_iter().flat_map(|o| o.values()) {
                for e in list.as_array().into_iter().flatten() {
                    text.push_str(&format!("event {e}\n"));
                }
            }
        }
        Decoded::ServiceChecks(v) => {
            for c in v.as_array().into_iter().flatten() {
                text.push_str(&format!("service_check {c}\n"));
            }
        }
        _ => {}
    }
    print!("{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        let cases = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ];
        for (secs, want) in cases {
            assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(secs)), want);
        }
    }

    #[test]
    fn every_supported_encoding_decompresses() {
        use std::io::Write;
        let body = br#"[{"check":"c"}]"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(body).unwrap();
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(body).unwrap();
        let cases = [
            ("gzip", gz.finish().unwrap()),
            ("deflate", zlib.finish().unwrap()),
            ("zstd", zstd::encode_all(&body[..], 1).unwrap()),
            ("", body.to_vec()),
            ("identity", body.to_vec()),
        ];
        for (encoding, compressed) in cases {
            assert_eq!(
                decompress(encoding, &compressed).unwrap(),
                body,
                "{encoding}"
            );
        }
    }

    #[test]
    fn bad_bodies_are_refused_with_a_reason() {
        let cases = [
            (
                "/api/v2/series",
                "",
                &b"\xff\xff\xff"[..],
                "invalid MetricPayload",
            ),
            ("/api/v1/series", "", b"{\"nope\":1}", "no \"series\" array"),
            ("/intake/", "", b"[]", "no \"events\" object"),
            ("/api/v1/check_run", "", b"{}", "not an array"),
            (
                "/api/v1/check_run",
                "zstd",
                b"not zstd",
                "cannot decompress zstd",
            ),
            (
                "/api/v1/check_run",
                "br",
                b"[]",
                "unsupported Content-Encoding 'br'",
            ),
        ];
        for (path, encoding, body, want) in cases {
            let err = decompress(encoding, body)
                .and_then(|b| decode(path, &b))
                .unwrap_err();
            assert!(err.contains(want), "{path} {encoding}: {err}");
        }
    }
}
