//! The forwarder: sends payloads to the intake over HTTP(S) from a small pool of threads,
//! classifies each outcome (docs/behaviour.md, "Delivery"), and retries what can be retried
//! with exponential backoff per endpoint. Everything waiting — new payloads and failed ones —
//! lives in one queue bounded in bytes (`--retry-queue-bytes`): when it is full the oldest
//! payload is dropped and counted — or, with `--retry-dir`, written to disk ([`disk`]) and
//! sent later, oldest first, also after a restart. Nothing is dropped without a counter.
//!
//! | outcome | what happens |
//! |---|---|
//! | 2xx | sent |
//! | 400, 403, 413 | dropped and counted (403 also logs "invalid API key", at most every 10 s) |
//! | network error, timeout, 404, 408, 429, 5xx, any other status | retried: the endpoint backs off 2 s · 2ⁿ, capped at 64 s (`--retry-base-ms`, `--retry-max-ms`), jittered |

pub mod disk;
pub mod egress;
pub mod outcome;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::flush::{Flushed, Output};
use crate::log;
use crate::serializer::{Endpoint, Payload, Serializer};
use disk::{Disk, Entry};
pub use outcome::Counters;
use outcome::{backoff, classify, Answer, Cause, Class, Outcome};

/// The API key: never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Default)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "(none)"
        } else {
            "(redacted)"
        })
    }
}

/// Which kinds of data are sent (the Agent's `enable_payloads`): a kind turned off is
/// dropped at flush, before it is serialized, and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enabled {
    pub series: bool,
    pub sketches: bool,
    pub events: bool,
    pub service_checks: bool,
}

impl Enabled {
    pub const ALL: Enabled = Enabled {
        series: true,
        sketches: true,
        events: true,
        service_checks: true,
    };

    /// Takes out of `flushed` what is not to be sent, counting it.
    fn apply(&self, flushed: &mut Flushed, counters: &Counters) {
        use crate::flush::Data;
        fn drop_all<T>(on: bool, items: &mut Vec<T>, counter: &crate::telemetry::Counter) {
            if !on {
                counter.add(items.len() as u64);
                items.clear();
            }
        }
        let d = &counters.disabled;
        drop_all(self.series, &mut flushed.series, &d[Data::Points]);
        drop_all(self.sketches, &mut flushed.sketches, &d[Data::Sketches]);
        drop_all(self.events, &mut flushed.events, &d[Data::Events]);
        drop_all(
            self.service_checks,
            &mut flushed.service_checks,
            &d[Data::ServiceChecks],
        );
    }
}

/// How the forwarder reaches the intake.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// Scheme, host and port, no trailing slash: `https://app.datadoghq.com`.
    pub base_url: String,
    /// Redacted by `{:?}`, so no log line or panic message can carry it.
    pub api_key: ApiKey,
    pub threads: usize,
    pub retry_queue_bytes: usize,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// First retry delay; later ones double, up to `retry_max` (2 s to 64 s by default).
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// `--retry-dir` and `--retry-dir-bytes` (this intake's share of them).
    pub retry_dir: Option<(std::path::PathBuf, u64)>,
    /// How counters and logs name this intake when there are several (`--additional-endpoints`):
    /// its address, never its key. `None` when the main intake is the only one.
    pub intake: Option<&'static str>,
    /// One of `--additional-endpoints`, not `--dd-url`.
    pub additional: bool,
    /// Proxies and the certificates trusted.
    pub egress: egress::Egress,
}

struct Waiting {
    /// Shared with the in-flight list while a request carries it, so shutdown can spill a
    /// payload whose request outlives the deadline.
    payload: Arc<Payload>,
    attempts: u32,
    /// Read from the retry directory: its file goes once the payload is settled.
    from_disk: Option<Entry>,
}

#[derive(Default, Clone, Copy)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Waiting>,
    queued_bytes: usize,
    backoff: HashMap<Endpoint, Backoff>,
    /// Payloads whose requests are on the way, by request number, and whether each came
    /// from the retry directory (its file stays there until the request settles).
    in_flight: Vec<(u64, Arc<Payload>, bool)>,
    requests: u64,
    /// Sender threads not yet ended.
    running: usize,
    closing: bool,
    /// After this instant, whatever still waits at shutdown is dropped and counted (or
    /// written to the retry directory).
    deadline: Option<Instant>,
    /// Set at SIGTERM: no request outlives this instant.
    stop_by: Option<Instant>,
    /// Set at SIGTERM, halfway to `stop_by`: flushes pace themselves no longer than this.
    pace_until: Option<Instant>,
    /// The deadline passed with requests on the way: their payloads were spilled or counted,
    /// and what those requests come to no longer matters.
    abandoned: bool,
    disk: Option<Disk>,
}

impl State {
    /// At shutdown: nothing waits in memory, and the retry directory is empty or the intake
    /// is not answering (what is on disk waits there for the next start; while the intake
    /// answers, it is sent until the deadline).
    fn done_at_close(&self, now: Instant) -> bool {
        let backing_off = self
            .backoff
            .values()
            .any(|b| b.until.is_some_and(|u| u > now));
        self.queue.is_empty()
            && self.in_flight.is_empty()
            && (self.disk.as_ref().is_none_or(Disk::is_empty) || backing_off)
    }
}

struct Shared {
    config: ForwarderConfig,
    /// Intake URL and API key now: SIGHUP may change them (see [`Retarget`]).
    target: RwLock<(String, String)>,
    agent: ureq::Agent,
    counters: Arc<Counters>,
    state: Mutex<State>,
    changed: Condvar,
}

/// What the daemon may do to the running forwarders from outside the flusher: change where
/// the main one sends (SIGHUP), and start the shutdown clock (SIGTERM). The first is the
/// `--dd-url` intake's; the others are `--additional-endpoints`, fixed until a restart.
#[derive(Clone)]
pub struct Handle(Vec<Arc<Shared>>);

impl Handle {
    /// Changes the main intake's URL and API key; payloads still waiting go to the new
    /// target with the new key.
    pub fn retarget(&self, base_url: &str, api_key: &str) {
        let main = &self.0[0];
        *main.target.write().unwrap_or_else(|e| e.into_inner()) =
            (base_url.to_string(), api_key.to_string());
        main.changed.notify_all();
    }

    /// Shutdown has begun and must be over by `deadline`: no request from now on may outlive
    /// it, and the final flush paces itself on the intake for half the time left at most, so
    /// the rest of the flush has the other half.
    pub fn stop_by(&self, deadline: Instant) {
        let now = Instant::now();
        let pace_until = now + deadline.saturating_duration_since(now) / 2;
        for shared in &self.0 {
            let mut state = shared.lock();
            state.stop_by = Some(deadline);
            state.pace_until = Some(pace_until);
            drop(state);
            shared.changed.notify_all();
        }
    }

    /// Last resort when shutdown overran: what waits or is on the way goes to the retry
    /// directory or is counted as dropped, now.
    pub fn abandon(&self) {
        for shared in &self.0 {
            let mut state = shared.lock();
            shared.abandon(&mut state);
        }
    }
}

/// A running forwarder.
pub(crate) struct Forwarder {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

fn random() -> u64 {
    // A per-process random hasher over the current time: jitter, not cryptography.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos() ^ std::process::id() as u128);
    h.finish()
}

/// Checks the API key once (`GET /api/v1/validate`) and logs the answer; whippet keeps
/// running whatever it is.
pub fn validate_api_key(config: &ForwarderConfig) {
    let Ok(agent) = agent(config) else {
        return; // Checked when the forwarder started.
    };
    let url = format!("{}/api/v1/validate", config.base_url);
    let answer = agent
        .get(&url)
        .header("DD-API-KEY", &config.api_key.0)
        .call();
    if let Ok(r) = &answer {
        let status = r.status().as_u16();
        if (300..400).contains(&status) {
            log_redirect(status, "/api/v1/validate", r);
        }
    }
    match answer.map(|r| r.status().as_u16()) {
        Ok(200..=299) => log::info("API key is valid"),
        Ok(403) => log::error("invalid API key: the intake answered 403 to /api/v1/validate; set --api-key or DD_API_KEY"),
        Ok(status) => log::warn(&format!("API key check answered HTTP {status}; continuing")),
        Err(e) => log::warn(&format!("API key check failed ({e}); continuing, payloads will be retried")),
    }
}

/// `url` with any credentials in its authority (`user:password@`) replaced, for logs,
/// `--check-config` and `/status`.
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}(redacted){}", &url[..start], &url[start + at..]),
        None => url.to_string(),
    }
}

/// Logs (rate-limited) a redirect the intake answered, with where it pointed, minus any
/// credentials in that address.
fn log_redirect(status: u16, path: &str, response: &ureq::http::Response<ureq::Body>) {
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| "nowhere".to_string(), redact_url);
    log::warn_limited("forwarder-redirect", || {
        format!(
            "the intake answered {status} to {path}, pointing at {location}; whippet never \
             follows redirects (the API key would go along): set --dd-url to the intake's \
             own address; retrying with backoff"
        )
    });
}

/// The HTTP client for one intake: its proxy (by the intake's scheme) and trusted roots as
/// configured, never what the client would read from the environment itself.
fn agent(config: &ForwarderConfig) -> Result<ureq::Agent, String> {
    let e = &config.egress;
    let proxy = e.proxy(&config.base_url).map_err(|err| {
        format!("proxy {err}; set DD_PROXY_HTTPS or DD_PROXY_HTTP to a URL like http://proxy:3128")
    })?;
    let tls = e.tls().map_err(|err| format!("--ca-bundle: {err}"))?;
    Ok(ureq::Agent::config_builder()
        .timeout_global(Some(config.timeout))
        .http_status_as_error(false)
        // A redirect would carry DD-API-KEY to whatever host it names (in clear, were it
        // http), and 301-303 would turn the POST into a body-less GET: never followed, a 3xx
        // is an answer of its own (docs/behaviour.md, "Delivery").
        .max_redirects(0)
        .proxy(proxy)
        .tls_config(tls)
        .user_agent(format!("whippet/{}", env!("CARGO_PKG_VERSION")))
        .build()
        .into())
}

impl Forwarder {
    pub fn start(
        config: ForwarderConfig,
        counters: Arc<Counters>,
    ) -> Result<Forwarder, crate::Error> {
        let agent = agent(&config).map_err(crate::Error::Startup)?;
        // Counted before they start, so a close that comes first still waits for them.
        let mut state = State {
            running: config.threads.max(1),
            ..State::default()
        };
        if let Some((dir, limit)) = &config.retry_dir {
            let (disk, found) = Disk::open(dir, *limit).map_err(crate::Error::Startup)?;
            if found.payloads > 0 {
                log::info(&format!(
                    "retry dir {}: {} payload(s), {} bytes waiting from before; sending them first",
                    dir.display(),
                    found.payloads,
                    found.bytes
                ));
            }
            if found.foreign > 0 {
                log::warn(&format!(
                    "retry dir {}: ignored {} entry(ies) named like payloads that are not \
                     regular files of whippet's user (links, FIFOs, others' files)",
                    dir.display(),
                    found.foreign
                ));
            }
            if found.unreadable > 0 {
                log::warn(&format!(
                    "retry dir {}: removed {} file(s) that were not whole payloads",
                    dir.display(),
                    found.unreadable
                ));
            }
            // A file without a readable header names no endpoint: counted under series,
            // where almost every payload on disk belongs.
            for _ in 0..found.unreadable {
                counters.count(Endpoint::SeriesV2, Outcome::DroppedUnreadable);
            }
            state.disk = Some(disk);
        }
        let shared = Arc::new(Shared {
            agent,
            counters,
            state: Mutex::new(state),
            changed: Condvar::new(),
            target: RwLock::new((config.base_url.clone(), config.api_key.0.clone())),
            config,
        });
        let mut threads = Vec::new();
        for i in 0..shared.config.threads.max(1) {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("whippet-forwarder-{i}"))
                .spawn(move || sender(&shared))
                .map_err(|e| {
                    crate::Error::Startup(format!("cannot start forwarder thread: {e}"))
                })?;
            threads.push(t);
        }
        Ok(Forwarder { shared, threads })
    }

    /// A handle for SIGHUP and SIGTERM over this forwarder and `others` ([`Handle`]).
    pub(crate) fn handle(&self, others: &[Forwarder]) -> Handle {
        let all = std::iter::once(self).chain(others);
        Handle(all.map(|f| f.shared.clone()).collect())
    }

    /// Queues payloads for sending; the oldest waiting payloads are dropped (and counted)
    /// if they no longer fit the byte bound.
    pub(crate) fn submit(&self, payloads: Vec<Payload>) {
        let mut state = self.shared.lock();
        for payload in payloads {
            state.queued_bytes += payload.body.len();
            state.queue.push_back(Waiting {
                payload: Arc::new(payload),
                attempts: 0,
                from_disk: None,
            });
        }
        self.shared.enforce_bound(&mut state);
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Waits, until `until` at most, while more than `bytes` of payloads (and never more than
    /// a quarter of `--retry-queue-bytes`) wait in memory, so a flush of many contexts
    /// produces payloads at the pace the intake takes them: it holds a few chunks' payloads,
    /// not all of them, and the next chunk fits the byte bound instead of pushing payloads
    /// out of it. Returns at once while an endpoint is backing off (the intake is failing:
    /// the byte bound and the retry directory handle that). At shutdown the final flush paces
    /// itself too, but not past halfway to the deadline ([`Handle::stop_by`]).
    pub fn pace(&self, bytes: usize, until: Instant) {
        let bytes = bytes.min(self.shared.config.retry_queue_bytes / 4);
        let mut state = self.shared.lock();
        while state.queued_bytes > bytes && !state.closing {
            let now = Instant::now();
            let until = state.pace_until.map_or(until, |p| p.min(until));
            let failing = state
                .backoff
                .values()
                .any(|b| b.until.is_some_and(|u| u > now));
            if failing || now >= until {
                break;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Payload bytes waiting in memory.
    #[cfg(test)]
    fn queued_bytes(&self) -> usize {
        self.shared.lock().queued_bytes
    }

    /// Sends what is queued until it is done or `deadline` passes (or the one set by
    /// [`Handle::stop_by`], if sooner), then stops the threads; whatever is left, on the way
    /// included, goes to the retry directory or is dropped and counted. A request still on
    /// the way then is left to its thread, which no longer counts.
    pub fn close(self, deadline: Instant) {
        let deadline = self.begin_close(deadline);
        let mut state = self.shared.lock();
        // Senders notice the deadline themselves; this waits for them, not for a request.
        while state.running > 0 {
            let left = (deadline + CLOSE_GRACE).saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        self.shared.abandon(&mut state);
        let finished = state.running == 0;
        drop(state);
        if finished {
            for t in self.threads {
                let _ = t.join();
            }
        }
    }
}

impl Forwarder {
    /// Tells the senders to finish by `deadline` (or the one set by [`Handle::stop_by`], if
    /// sooner), which it returns.
    fn begin_close(&self, deadline: Instant) -> Instant {
        let mut state = self.shared.lock();
        let deadline = state.stop_by.map_or(deadline, |d| d.min(deadline));
        state.closing = true;
        state.deadline = Some(deadline);
        self.shared.changed.notify_all();
        deadline
    }
}

/// How long past its deadline [`Forwarder::close`] waits for senders to notice it.
const CLOSE_GRACE: Duration = Duration::from_millis(200);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A rate-limited warning's key: one per intake, so one failing intake's warnings never
    /// hide another's.
    fn log_key(&self, what: &'static str) -> &'static str {
        match self.config.intake {
            None => what,
            Some(at) => crate::telemetry::intern(&format!("{what} {at}")),
        }
    }

    /// `" at URL"` for an additional intake, nothing for the main one.
    fn at(&self) -> String {
        self.config
            .intake
            .map_or_else(String::new, |at| format!(" at {at}"))
    }

    /// Counts and logs a settled payload whose file could not be deleted: emptied instead
    /// (never sent again, but the file stays), or not even that (sent again after a
    /// restart).
    fn settled_on_disk(&self, done: std::io::Result<Option<std::io::Error>>) {
        let what = match done {
            Ok(None) => return,
            Ok(Some(e)) => format!(
                "a sent payload's file cannot be deleted ({e}); it was emptied, so it is not \
                 sent again, but it stays (make the directory writable)"
            ),
            Err(e) => format!(
                "a sent payload's file stays: {e}; it will be sent again after a restart \
                 (make the directory writable)"
            ),
        };
        self.counters.retry_dir_errors.add(1);
        log::warn_limited("retry-dir-delete", || format!("--retry-dir: {what}"));
    }

    /// Everything waiting in memory or on the way goes to the retry directory, or is
    /// dropped and counted; requests on the way are disowned.
    fn abandon(&self, state: &mut State) {
        state.abandoned = true;
        let flying = std::mem::take(&mut state.in_flight);
        let left: Vec<Waiting> = state.queue.drain(..).collect();
        state.queued_bytes = 0;
        // On the way first: they are the oldest. One from disk still has its file there.
        let payloads = flying
            .into_iter()
            .filter(|(_, _, from_disk)| !from_disk)
            .map(|(_, p, _)| p)
            .chain(left.into_iter().map(|w| w.payload));
        for payload in payloads {
            if state.disk.is_some() {
                // It waits on disk for the next start.
                self.spill(state, &payload);
            } else {
                self.count(payload.endpoint, Outcome::DroppedShutdown);
            }
        }
        self.set_queue_gauge(state);
    }

    fn count(&self, endpoint: Endpoint, outcome: Outcome) {
        self.counters.count(endpoint, outcome);
    }

    fn set_queue_gauge(&self, state: &State) {
        let c = &self.counters;
        c.retry_queue_bytes.set(state.queued_bytes as u64);
        c.retry_dir_bytes
            .set(state.disk.as_ref().map_or(0, Disk::bytes));
    }

    /// Makes the memory queue fit its bound: the oldest payloads go to the retry directory,
    /// or are dropped and counted without one.
    fn enforce_bound(&self, state: &mut State) {
        while state.queued_bytes > self.config.retry_queue_bytes {
            let Some(oldest) = state.queue.pop_front() else {
                break;
            };
            state.queued_bytes -= oldest.payload.body.len();
            // (Payloads read from disk never wait here: a retry puts them back on disk.)
            if state.disk.is_none() {
                self.count(oldest.payload.endpoint, Outcome::DroppedQueueFull);
            } else {
                self.spill(state, &oldest.payload);
            }
        }
        self.set_queue_gauge(state);
    }

    /// Writes a payload to the retry directory (held in `state`), counting what that costs.
    /// File I/O under the state lock: it happens only while the intake is unreachable, and
    /// only the flusher and forwarder threads wait on this lock, never a reader.
    fn spill(&self, state: &mut State, payload: &Payload) {
        let Some(disk) = state.disk.as_mut() else {
            return;
        };
        match disk.push(payload) {
            Ok(pushed_out) => {
                self.count(payload.endpoint, Outcome::Spilled);
                for endpoint in pushed_out {
                    self.count(endpoint, Outcome::DroppedDiskFull);
                }
            }
            Err(e) => {
                self.count(payload.endpoint, Outcome::DroppedDiskFull);
                log::warn_limited("retry-dir-write", || {
                    format!("cannot write a payload to --retry-dir ({e}); dropped and counted")
                });
            }
        }
    }

    /// The oldest payload whose endpoint is not backing off, or how long until one may be.
    /// The retry directory holds the oldest payloads, so it is asked first.
    fn next(&self, state: &mut State, now: Instant) -> Result<Waiting, Option<Duration>> {
        let mut wait: Option<Duration> = None;
        let State { disk, backoff, .. } = state;
        if let Some(disk) = disk.as_mut() {
            let ready = |e: Endpoint| {
                backoff
                    .get(&e)
                    .and_then(|b| b.until)
                    .is_none_or(|u| u <= now)
            };
            while let Some(entry) = disk.take(ready) {
                match disk.read(&entry) {
                    Ok(payload) => {
                        return Ok(Waiting {
                            payload: Arc::new(payload),
                            attempts: 0,
                            from_disk: Some(entry),
                        });
                    }
                    Err(_) => {
                        let done = disk.done(&entry);
                        self.settled_on_disk(done);
                        self.count(entry.endpoint, Outcome::DroppedUnreadable);
                    }
                }
            }
            if !disk.is_empty() {
                // Every endpoint on disk is backing off: wake when the first may try again.
                wait = backoff
                    .values()
                    .filter_map(|b| b.until)
                    .filter(|&u| u > now)
                    .map(|u| u - now)
                    .min();
            }
        }
        let mut pick = None;
        for (i, w) in state.queue.iter().enumerate() {
            match state.backoff.get(&w.payload.endpoint).and_then(|b| b.until) {
                Some(until) if until > now => {
                    let d = until - now;
                    wait = Some(wait.map_or(d, |w| w.min(d)));
                }
                _ => {
                    pick = Some(i);
                    break;
                }
            }
        }
        match pick.and_then(|i| state.queue.remove(i)) {
            Some(w) => {
                state.queued_bytes -= w.payload.body.len();
                self.set_queue_gauge(state);
                // A flusher may be pacing itself on the queue (`Forwarder::pace`).
                self.changed.notify_all();
                Ok(w)
            }
            None => Err(wait),
        }
    }

    fn send(&self, p: &Payload, timeout: Duration) -> Answer {
        let (url, key) = {
            let target = self.target.read().unwrap_or_else(|e| e.into_inner());
            (
                format!("{}{}", target.0, p.endpoint.path()),
                target.1.clone(),
            )
        };
        let mut request = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("DD-API-KEY", &key)
            .header("Content-Type", p.endpoint.content_type());
        if let Some(encoding) = p.compression.header() {
            request = request.header("Content-Encoding", encoding);
        }
        match request.send(&p.body[..]) {
            Ok(response) => {
                let status = response.status().as_u16();
                if (300..400).contains(&status) {
                    log_redirect(status, p.endpoint.path(), &response);
                }
                // Drain a bounded answer so the connection can be reused.
                let mut body = response.into_body();
                let _ = body
                    .as_reader()
                    .take(64 * 1024)
                    .read_to_end(&mut Vec::new());
                Answer::Status(status)
            }
            Err(e) => {
                let cause = Cause::of(&e);
                log::warn_limited(self.log_key("forwarder-network"), || {
                    format!(
                        "cannot reach the intake{} for a {} payload: {} ({e}); retrying with backoff",
                        self.at(),
                        p.endpoint.path(),
                        crate::telemetry::Label::label(cause)
                    )
                });
                Answer::Failed(cause)
            }
        }
    }

    /// Records the outcome of one attempt; returns the payload when it must be retried.
    fn settle(
        &self,
        state: &mut State,
        mut w: Waiting,
        class: Class,
        now: Instant,
    ) -> Option<Waiting> {
        let endpoint = w.payload.endpoint;
        match class {
            Class::Sent => {
                state.backoff.remove(&endpoint);
                self.count(endpoint, Outcome::Sent);
                None
            }
            Class::Drop(status) => {
                self.count(endpoint, Outcome::Dropped(status));
                if status == 403 {
                    log::warn_limited(self.log_key("forwarder-403"), || {
                        if self.config.additional {
                            format!("invalid API key: the intake{} answered 403; payload dropped (correct its key in --additional-endpoints)", self.at())
                        } else {
                            format!("invalid API key: the intake{} answered 403; payload dropped (set --api-key-file or DD_API_KEY)", self.at())
                        }
                    });
                } else {
                    log::warn_limited(self.log_key("forwarder-drop"), || {
                        format!(
                            "the intake{} answered {status} to a {} payload; dropped and counted",
                            self.at(),
                            endpoint.path()
                        )
                    });
                }
                None
            }
            Class::Retry(answer) => {
                let b = state.backoff.entry(endpoint).or_default();
                b.failures = b.failures.saturating_add(1);
                b.until = Some(
                    now + backoff(
                        b.failures,
                        self.config.retry_base,
                        self.config.retry_max,
                        random(),
                    ),
                );
                self.count(endpoint, Outcome::Retried(answer));
                if let Answer::Status(s) = answer {
                    log::warn_limited(self.log_key("forwarder-retry"), || {
                        format!(
                            "the intake{} answered {s} to a {} payload; retrying with backoff",
                            self.at(),
                            endpoint.path()
                        )
                    });
                }
                w.attempts += 1;
                Some(w)
            }
        }
    }
}

fn sender(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        let now = Instant::now();
        if state.abandoned
            || state.closing
                && (state.deadline.is_some_and(|d| now >= d) || state.done_at_close(now))
        {
            break;
        }
        // After SIGTERM no request may outlive the shutdown deadline.
        let timeout = match state.stop_by {
            Some(by) => shared.config.timeout.min(by.saturating_duration_since(now)),
            None => shared.config.timeout,
        };
        let ready = if timeout.is_zero() {
            Err(state.deadline.map(|d| d.saturating_duration_since(now)))
        } else {
            shared.next(&mut state, now)
        };
        match ready {
            Ok(w) => {
                state.requests += 1;
                let id = state.requests;
                let from_disk = w.from_disk.is_some();
                state.in_flight.push((id, w.payload.clone(), from_disk));
                drop(state);
                let class = classify(shared.send(&w.payload, timeout));
                state = shared.lock();
                if state.abandoned {
                    // Shutdown already spilled or counted it.
                    break;
                }
                state.in_flight.retain(|(i, _, _)| *i != id);
                let from_disk = w.from_disk;
                let retry = shared.settle(&mut state, w, class, Instant::now());
                match (retry, from_disk, state.disk.as_mut()) {
                    // Back where it came from, at the front: payloads keep their age order.
                    (Some(_), Some(entry), Some(disk)) => disk.restore(entry),
                    (Some(retry), _, _) => {
                        state.queued_bytes += retry.payload.body.len();
                        state.queue.push_front(retry);
                        shared.enforce_bound(&mut state);
                    }
                    (None, Some(entry), Some(disk)) => {
                        let done = disk.done(&entry);
                        shared.settled_on_disk(done);
                    }
                    (None, _, _) => {}
                }
                shared.set_queue_gauge(&state);
                shared.changed.notify_all();
            }
            Err(wait) => {
                let mut wait = wait.unwrap_or(Duration::from_secs(3600));
                if let Some(deadline) = state.deadline {
                    wait = wait.min(deadline.saturating_duration_since(now));
                }
                state = shared
                    .changed
                    .wait_timeout(state, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
    }
    state.running -= 1;
    drop(state);
    shared.changed.notify_all();
}

/// A flush emitting in chunks waits while more than this many payload bytes wait for the
/// intake (about four chunks of 10,000 series; see [`Forwarder::pace`]).
const PACE_BYTES: usize = 2 << 20;
/// Longest wait per chunk: a slow intake delays a flush by at most this per chunk.
const PACE_WAIT: Duration = Duration::from_secs(1);

/// The output used when an intake is configured: serialize each flush, forward the payloads.
pub(crate) struct IntakeOutput {
    pub serializer: Serializer,
    pub forwarder: Option<Forwarder>,
    /// `--additional-endpoints`: each gets a copy of every payload, and nothing waits for
    /// them (only the main intake paces flushes).
    pub additional: Vec<Forwarder>,
    pub counters: Arc<Counters>,
    /// How long the final flush may take to send at shutdown.
    pub shutdown_timeout: Duration,
    pub enabled: Enabled,
}

impl Output for IntakeOutput {
    fn emit(&mut self, mut flushed: Flushed) {
        if self.enabled != Enabled::ALL {
            self.enabled.apply(&mut flushed, &self.counters);
        }
        let serialized = self.serializer.serialize(&flushed);
        for (_, n) in &serialized.oversized {
            self.counters.oversized_items.add(*n as u64);
        }
        for f in &self.additional {
            f.submit(serialized.payloads.clone());
        }
        if let Some(f) = &self.forwarder {
            f.submit(serialized.payloads);
            f.pace(PACE_BYTES, Instant::now() + PACE_WAIT);
        }
    }

    fn finish(&mut self) {
        // Every intake's senders start finishing at once, so they share the one deadline.
        let deadline = Instant::now() + self.shutdown_timeout;
        let all: Vec<Forwarder> = self
            .forwarder
            .take()
            .into_iter()
            .chain(self.additional.drain(..))
            .collect();
        for f in &all {
            f.begin_close(deadline);
        }
        for f in all {
            f.close(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_an_address_are_redacted() {
        for (url, shown) in [
            (
                "https://u:secret@h.example:8443",
                "https://(redacted)@h.example:8443",
            ),
            (
                "http://secret@127.0.0.1/a@b",
                "http://(redacted)@127.0.0.1/a@b",
            ),
            ("https://app.datadoghq.com", "https://app.datadoghq.com"),
            ("/relative/a@b", "/relative/a@b"),
            ("https://a:b@c@d", "https://(redacted)@d"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn the_api_key_never_shows_in_debug_output() {
        let config = ForwarderConfig {
            base_url: "https://app.datadoghq.com".into(),
            api_key: ApiKey("secret-key-123".into()),
            threads: 1,
            retry_queue_bytes: 1,
            timeout: Duration::from_secs(1),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(32),
            retry_dir: None,
            intake: None,
            additional: false,
            egress: Default::default(),
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret-key-123"), "{shown}");
        assert!(shown.contains("(redacted)"), "{shown}");
    }

    /// A one-thread forwarder to an intake that holds each answer `delay` (only the first,
    /// when `only_first`), with 8 payloads of 1,000 bytes submitted, and `bound` bytes of
    /// `--retry-queue-bytes`.
    fn paced(
        delay: Duration,
        only_first: bool,
        bound: usize,
        counters: &Arc<Counters>,
    ) -> (crate::intake::Intake, Forwarder) {
        let intake = crate::intake::Intake::start(crate::intake::IntakeConfig {
            delay,
            slow_requests: u64::from(only_first),
            ..Default::default()
        })
        .unwrap();
        let config = ForwarderConfig {
            base_url: intake.url(),
            api_key: ApiKey("k".into()),
            threads: 1,
            retry_queue_bytes: bound,
            timeout: Duration::from_secs(60),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(32),
            retry_dir: None,
            intake: None,
            additional: false,
            egress: Default::default(),
        };
        let forwarder = Forwarder::start(config, counters.clone()).unwrap();
        let payloads = (0..8)
            .map(|_| Payload {
                endpoint: Endpoint::Events,
                body: vec![b'x'; 1000],
                compression: crate::serializer::compress::Compression::None,
                items: 1,
            })
            .collect();
        forwarder.submit(payloads);
        (intake, forwarder)
    }

    #[test]
    fn a_paced_flush_waits_until_the_intake_has_taken_the_queue() {
        let counters = Arc::new(Counters::default());
        let (_intake, forwarder) = paced(Duration::from_millis(50), false, 1 << 20, &counters);
        let far = || Instant::now() + Duration::from_secs(120);
        forwarder.pace(0, far());
        assert_eq!(forwarder.queued_bytes(), 0);
        // Above the mark it returns without waiting.
        forwarder.pace(usize::MAX, far());
        forwarder.close(Instant::now() + Duration::from_secs(60));
    }

    #[test]
    fn a_flush_paces_itself_to_a_quarter_of_the_retry_queue_bound_at_most() {
        // 8,000 bytes queued, a bound of 8,000: pacing waits until at most 2,000 wait, so the
        // next chunk fits instead of pushing payloads out.
        let counters = Arc::new(Counters::default());
        let (_intake, forwarder) = paced(Duration::from_millis(20), false, 8_000, &counters);
        forwarder.pace(usize::MAX, Instant::now() + Duration::from_secs(120));
        let left = forwarder.queued_bytes();
        assert!(left <= 2_000, "{left} bytes still wait");
        forwarder.close(Instant::now() + Duration::from_secs(60));
    }

    #[test]
    fn a_paced_flush_stops_waiting_halfway_to_the_shutdown_deadline() {
        // The first answer takes 20 s: pacing would wait it out.
        let counters = Arc::new(Counters::default());
        let (intake, forwarder) = paced(Duration::from_secs(20), true, 1 << 20, &counters);
        let handle = forwarder.handle(&[]);
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                handle.stop_by(Instant::now() + Duration::from_millis(300));
            });
            forwarder.pace(0, Instant::now() + Duration::from_secs(120));
        });
        forwarder.close(Instant::now() + Duration::from_secs(60));
        // Not a speed check: without the stop, pacing waits out the intake (20 s a payload)
        // and close waits for the request on the way.
        assert!(started.elapsed() < Duration::from_secs(15));
        // The one on the way and the seven behind it: dropped (no retry directory), counted.
        let snapshot = crate::telemetry::Snapshot::of(&[&*counters]);
        let labels = [
            ("endpoint", "/intake/"),
            ("outcome", "dropped"),
            ("status", "shutdown"),
        ];
        assert_eq!(snapshot.get("whippet_payloads_total", &labels), 8);
        std::mem::forget(intake);
    }
}
