//! The status endpoint (`--status ADDR`, off by default): `/status` (JSON: version, uptime,
//! listeners, intake, every counter), `/metrics` (Prometheus text format, every counter) and
//! `/contexts?top=N` (the busiest contexts with their sample counts, as the Agent's
//! `dogstatsd-stats` shows). One tiny_http thread; it reads counters and locks one
//! shard at a time, never the ingest path.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use serde_json::{json, Map, Value};
use tiny_http::{Header, Request, Response, Server};

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

/// A running status endpoint.
pub(crate) struct StatusServer {
    pub addr: SocketAddr,
    server: Arc<Server>,
    thread: JoinHandle<()>,
}

impl StatusServer {
    pub fn start(addr: SocketAddr, sources: Arc<Sources>) -> Result<StatusServer, crate::Error> {
        let server = Server::http(addr).map_err(|e| {
            crate::Error::Startup(format!(
                "cannot serve the status endpoint on {addr}: {e}; choose another --status address"
            ))
        })?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("whippet-status".into())
            .spawn(move || {
                // `incoming_requests` ends when the server is unblocked at shutdown.
                for request in s.incoming_requests() {
                    answer(&sources, request);
                }
            })
            .map_err(|e| crate::Error::Startup(format!("cannot start the status thread: {e}")))?;
        Ok(StatusServer {
            addr,
            server,
            thread,
        })
    }

    pub fn stop(self) {
        self.server.unblock();
        let _ = self.thread.join();
    }
}

fn answer(sources: &Sources, request: Request) {
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let (status, content_type, body) = match path {
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
    };
    let header = Header::from_bytes("Content-Type", content_type).expect("a valid header");
    let response = Response::from_string(body)
        .with_status_code(status)
        .with_header(header);
    let _ = request.respond(response);
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
    let mut counters = Map::new();
    for p in (sources.snapshot)().readings {
        let mut key = p.name.to_string();
        if !p.labels.is_empty() {
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            key = format!("{key}{{{}}}", labels.join(","));
        }
        counters.insert(key, json!(p.value));
    }
    out.insert("telemetry".into(), Value::Object(counters));
    Value::Object(out)
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
    fn top_is_bounded() {
        assert_eq!(top_param(""), Ok(10));
        assert_eq!(top_param("top=3"), Ok(3));
        assert!(top_param("top=0").is_err());
        assert!(top_param("top=10001").is_err());
        assert!(top_param("top=x").is_err());
    }
}
