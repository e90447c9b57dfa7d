//! The status endpoint (`--status ADDR`, off by default): `/status` (JSON: version, uptime,
//! listeners, intake, every counter), `/metrics` (Prometheus text format, every counter) and
//! `/contexts?top=N` (the busiest contexts with their sample counts, as the Agent's
//! `dogstatsd-stats` shows). It reads counters and locks one shard at a time, never the
//! ingest path.
//!
//! Nothing a client does can stop ingestion or grow memory: one accept thread hands
//! connections to [`HANDLERS`] threads through a queue of [`WAITING`]; a connection that
//! finds the queue full is closed at once. A request head is read within [`MAX_HEAD`] bytes
//! and [`REQUEST_TIME`] (parsed by httparse), the answer written within the same time, and
//! every connection closed after one answer. No thread is started per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::TrySendError;
use serde_json::{json, Map, Value};

use crate::demux::Demux;
use crate::telemetry::Snapshot;

/// Most contexts `/contexts` lists.
pub(crate) const MAX_TOP: usize = 10_000;

/// What the endpoint reports besides counters; `info` is replaced on reload.
pub struct Sources {
    pub snapshot: Box<dyn Fn() -> Snapshot + Send + Sync>,
    pub demux: Arc<Demux>,
    pub info: RwLock<Map<String, Value>>,
    pub started: Instant,
}

/// Threads answering requests.
pub const HANDLERS: usize = 2;
/// Accepted connections waiting for a handler; more are closed at once.
pub const WAITING: usize = 16;
/// Longest request head read (request line and headers).
pub const MAX_HEAD: usize = 8192;
/// Time a client has to send its request head, and then to take the answer.
pub const REQUEST_TIME: Duration = Duration::from_secs(2);

/// A running status endpoint.
pub(crate) struct StatusServer {
    pub addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl StatusServer {
    pub fn start(addr: SocketAddr, sources: Arc<Sources>) -> Result<StatusServer, crate::Error> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            crate::Error::Startup(format!(
                "cannot serve the status endpoint on {addr}: {e}; choose another --status address"
            ))
        })?;
        let addr = listener.local_addr().unwrap_or(addr);
        let stopping = Arc::new(AtomicBool::new(false));
        let (queue, waiting) = crossbeam_channel::bounded::<TcpStream>(WAITING);
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| crate::Error::Startup(format!("cannot start the status threads: {e}")))
        };
        let mut threads = Vec::new();
        for i in 0..HANDLERS {
            let (waiting, sources) = (waiting.clone(), sources.clone());
            threads.push(spawn(
                format!("whippet-status-{i}"),
                Box::new(move || {
                    for connection in waiting {
                        serve(&sources, connection);
                    }
                }),
            )?);
        }
        let stop = stopping.clone();
        threads.push(spawn(
            "whippet-status".into(),
            Box::new(move || {
                for connection in listener.incoming() {
                    if stop.load(Relaxed) {
                        break;
                    }
                    let Ok(connection) = connection else {
                        // Out of descriptors, most likely: waiting beats spinning.
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    match queue.try_send(connection) {
                        // Closed at once: the handlers are busy with others.
                        Err(TrySendError::Full(refused)) => drop(refused),
                        Err(TrySendError::Disconnected(_)) => break,
                        Ok(()) => {}
                    }
                }
                // Dropping the queue ends the handlers once they are done.
            }),
        )?);
        Ok(StatusServer {
            addr,
            stopping,
            threads,
        })
    }

    pub fn stop(self) {
        self.stopping.store(true, Relaxed);
        // Wakes the accept thread.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let _ = TcpStream::connect_timeout(&wake, REQUEST_TIME);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Reads one request head from `connection` and answers it, each within [`REQUEST_TIME`].
fn serve(sources: &Sources, mut connection: TcpStream) {
    let deadline = Instant::now() + REQUEST_TIME;
    let mut head = [0u8; MAX_HEAD];
    let mut len = 0;
    let (status, content_type, body) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || connection.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match connection.read(&mut head[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                break match (request.method, request.path) {
                    (Some("GET"), Some(target)) => route(sources, target),
                    _ => (405, "text/plain", "only GET is served\n".into()),
                };
            }
            Ok(httparse::Status::Partial) if len < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                break (
                    431,
                    "text/plain",
                    format!("the request head is over {MAX_HEAD} bytes or 32 headers\n"),
                );
            }
            Err(_) => break (400, "text/plain", "not an HTTP request\n".into()),
        }
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let deadline = Instant::now() + REQUEST_TIME;
    let mut rest = answer.as_bytes();
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || connection.set_write_timeout(Some(left)).is_err() {
            return;
        }
        match connection.write(rest) {
            Ok(0) | Err(_) => return,
            Ok(n) => rest = &rest[n..],
        }
    }
}

/// (status, content type, body) for a request target.
fn route(sources: &Sources, target: &str) -> (u16, &'static str, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/status" => (200, "application/json", status_json(sources).to_string()),
        "/metrics" => (
            200,
            "text/plain; version=0.0.4",
            (sources.snapshot)().prometheus(),
        ),
        "/contexts" => match top_param(query) {
            Ok(n) => (
                200,
                "application/json",
                contexts_json(sources, n).to_string(),
            ),
            Err(e) => (400, "text/plain", e),
        },
        _ => (
            404,
            "text/plain",
            "not found: try /status, /metrics or /contexts?top=N\n".into(),
        ),
    }
}

fn top_param(query: &str) -> Result<usize, String> {
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("top=") {
            return v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_TOP).contains(n))
                .ok_or_else(|| format!("top: '{v}' is not a number from 1 to {MAX_TOP}\n"));
        }
    }
    Ok(10)
}

fn status_json(sources: &Sources) -> Value {
    let mut out = sources
        .info
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    out.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    out.insert("pid".into(), json!(std::process::id()));
    out.insert(
        "uptime_seconds".into(),
        json!(sources.started.elapsed().as_secs()),
    );
    out.insert("telemetry".into(), telemetry_json(&(sources.snapshot)()));
    Value::Object(out)
}

/// The readings by name: a reading without labels is its value; a name with labels is a
/// list of objects, each label a field beside `value`
/// (`"whippet_packets_total": [{"transport": "udp", "value": 3}]`).
fn telemetry_json(snapshot: &Snapshot) -> Value {
    let mut by_name = Map::new();
    for r in snapshot.grouped() {
        if r.labels.is_empty() {
            by_name.insert(r.name.to_string(), json!(r.value));
            continue;
        }
        let mut one = Map::new();
        for (k, v) in &r.labels {
            one.insert(k.to_string(), json!(v));
        }
        one.insert("value".into(), json!(r.value));
        let entry = by_name
            .entry(r.name.to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = entry {
            list.push(Value::Object(one));
        }
    }
    Value::Object(by_name)
}

fn contexts_json(sources: &Sources, n: usize) -> Value {
    let top = sources.demux.busiest(n);
    Value::Array(
        top.iter()
            .map(|(samples, key)| {
                json!({
                    "name": key.name(),
                    "type": key.kind().wire(),
                    "host": key.host(),
                    "tags": key.tags().collect::<Vec<_>>(),
                    "samples": samples,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_fields_beside_the_value_not_part_of_a_key() {
        let mut s = Snapshot::default();
        s.counter("whippet_samples_total", &[], 6);
        s.counter("whippet_packets_total", &[("transport", "udp")], 3);
        s.counter("whippet_packets_total", &[("transport", "unix")], 4);
        assert_eq!(
            telemetry_json(&s),
            json!({
                "whippet_samples_total": 6,
                "whippet_packets_total": [
                    {"transport": "udp", "value": 3},
                    {"transport": "unix", "value": 4},
                ],
            })
        );
    }

    #[test]
    fn top_is_bounded() {
        assert_eq!(top_param(""), Ok(10));
        assert_eq!(top_param("top=3"), Ok(3));
        assert!(top_param("top=0").is_err());
        assert!(top_param("top=10001").is_err());
        assert!(top_param("top=x").is_err());
    }
}
