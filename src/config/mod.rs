//! Configuration: flags, a `KEY=VALUE` config file and the Datadog environment variables →
//! a validated [`Config`]. Every setting is one row of [`SETTINGS`], which declares its flag,
//! its variable (the Agent's name where the Agent has one), its help, its default and its
//! range. Precedence: flag > config file > environment > default. Every error names the flag
//! or variable to change. [`Config`] groups the settings by the part of whippet they shape
//! and builds each stage's own configuration.

pub mod check;
mod resolve;
pub mod settings;
mod yaml;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use getopts::{HasArg, Occur, Options};

use crate::enrichment::Enrichment;
use crate::flush::{Aggregate, FlushSettings};
pub use crate::forwarder::ApiKey;
use crate::forwarder::ForwarderConfig;
use crate::listener::capture::CaptureSettings;
use crate::listener::stream::Limits;
use crate::log::Level;
use crate::packet::Transport;
use crate::serializer::{Compression, Serializer, SeriesApi};
use crate::shaping::{HostRules, Mapper, NameList, Shaping};
use crate::shard::Expiry;
use crate::tagger::{kubelet::KubeletConfig, Cardinality, Sources};
use crate::Error;
pub(crate) use resolve::machine_hostname;
use resolve::Resolver;
pub use settings::{Setting, MAX_BUFFER_SIZE, SETTINGS};

/// Where whippet listens.
#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    /// UDP address, or `None` for `--udp off`.
    pub udp: Option<SocketAddr>,
    pub udp_readers: usize,
    /// Requested SO_RCVBUF for UDP and the Unix datagram socket (0 = OS default).
    pub so_rcvbuf: usize,
    pub socket: Option<PathBuf>,
    /// `--unix-reader-priority`: the Unix datagram reader's SCHED_FIFO priority (0: normal).
    pub unix_reader_priority: u32,
    pub socket_mode: u32,
    pub stream_socket: Option<PathBuf>,
    /// `--stream-max-connections` and `--stream-idle-timeout`.
    pub stream: Limits,
    pub buffer_size: usize,
    /// `--eol-required`, per transport (`Transport as usize`).
    pub eol_required: [bool; Transport::COUNT],
    /// `--forward-host` and `--forward-port`: where every packet is mirrored.
    pub mirror: Option<SocketAddr>,
    /// `--capture-dir` and its limits: where SIGUSR2 records packets.
    pub capture: Option<CaptureSettings>,
}

/// How much the pipeline between listeners and shards holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub queue_size: usize,
    pub workers: usize,
    pub shards: usize,
    pub context_limit: usize,
    /// `--aggregation-memory`, bytes.
    pub aggregation_memory: usize,
    pub event_backlog: usize,
    /// `--no-aggregation-pipeline`: honour `|T` timestamps.
    pub timestamps: bool,
}

/// What every message gets, and how metrics aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregation {
    pub tags: Vec<String>,
    pub hostname: String,
    /// Which rule gave the host name (`--check-config` shows it).
    pub hostname_rule: &'static str,
    /// `--bucket-seconds`, `--expiry-seconds`, `--context-expiry-seconds`.
    pub expiry: Expiry,
    pub histogram_aggregates: Vec<Aggregate>,
    pub histogram_percentiles: Vec<u32>,
}

/// What the operator's settings do to metric names and tags (docs/behaviour.md, "Shaping"),
/// as given; validated when read, compiled by [`ShapingSettings::build`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ShapingSettings {
    /// `--mapper-profiles`, JSON.
    pub mapper_profiles: Option<String>,
    pub mapper_cache_size: usize,
    /// `--metric-namespace`, with its dot.
    pub namespace: String,
    pub namespace_exempt: Vec<String>,
    /// The filter list in effect (`--metric-filterlist`, else `--metric-blocklist`) and
    /// whether its entries are prefixes.
    pub filterlist: Vec<String>,
    pub filterlist_prefix: bool,
    /// `--metric-tag-filterlist`, JSON.
    pub tag_filterlist: Option<String>,
    /// `--histogram-copy-to-distribution-prefix` when the copy is on.
    pub histogram_copy: Option<String>,
    /// `--host-rules`, JSON.
    pub host_rules: Option<String>,
}

impl ShapingSettings {
    /// The compiled settings, or `None` when none changes anything.
    pub fn build(&self) -> Result<Option<Arc<Shaping>>, String> {
        let mapper = match &self.mapper_profiles {
            Some(json) => Mapper::from_json(json).map_err(|e| format!("mapper profiles: {e}"))?,
            None => Mapper::default(),
        };
        let tag_filters = match &self.tag_filterlist {
            Some(json) => {
                let value: serde_json::Value = serde_json::from_str(json)
                    .map_err(|e| format!("metric tag filterlist: not valid JSON: {e}"))?;
                crate::shaping::tag_filters(&value)
                    .map_err(|e| format!("metric tag filterlist: {e}"))?
            }
            None => Default::default(),
        };
        let shaping = Shaping {
            mapper,
            cache_size: self.mapper_cache_size,
            namespace: self.namespace.as_str().into(),
            namespace_exempt: self
                .namespace_exempt
                .iter()
                .map(|p| p.as_str().into())
                .collect(),
            filter: NameList::new(&self.filterlist, self.filterlist_prefix),
            tag_filters,
            histogram_copy: self.histogram_copy.as_deref().map(Box::from),
            host_rules: match &self.host_rules {
                Some(json) => HostRules::from_json(json).map_err(|e| format!("host rules: {e}"))?,
                None => HostRules::default(),
            },
        };
        Ok(shaping.is_active().then(|| Arc::new(shaping)))
    }
}

/// Where messages come from and which container tags they get (docs/behaviour.md, "Origin").
#[derive(Debug, Clone, PartialEq)]
pub struct OriginSettings {
    /// `--origin-detection`: SO_PASSCRED on the Unix sockets.
    pub detection: bool,
    pub client: bool,
    pub entity_id_precedence: bool,
    pub cardinality: Cardinality,
    pub procfs: PathBuf,
    pub kubelet: Option<KubeletConfig>,
    /// The Docker Engine API's socket; `None` for `--docker-host off`.
    pub docker: Option<PathBuf>,
}

impl OriginSettings {
    /// The tagger runs when origin detection is on or a kubelet is named (whose pods
    /// `dd.internal.entity_id` tags refer to).
    pub fn tagger(&self) -> bool {
        self.detection || self.client || self.kubelet.is_some()
    }

    /// The providers the tagger asks.
    pub fn sources(&self) -> Sources {
        Sources {
            kubelet: self.kubelet.clone(),
            docker: self.docker.clone(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Where the output goes and how it gets there.
#[derive(Debug, Clone, PartialEq)]
pub struct Forwarding {
    /// Where payloads go (`scheme://host[:port]`); `None` prints to the console instead.
    pub intake_url: Option<String>,
    pub api_key: ApiKey,
    /// Proxies and the certificates trusted.
    pub egress: crate::forwarder::egress::Egress,
    /// Which kinds of payload are sent (the Agent's `enable_payloads`).
    pub payloads: crate::forwarder::Enabled,
    /// `--additional-endpoints`: (URL, key) pairs that also get every payload.
    pub additional: Vec<(String, ApiKey)>,
    pub series_api: SeriesApi,
    pub compression: Compression,
    pub retry_queue_bytes: usize,
    /// `--retry-dir`: where payloads spill to disk; `None` drops them instead.
    pub retry_dir: Option<PathBuf>,
    pub retry_dir_bytes: u64,
    pub forwarder_threads: usize,
    pub request_timeout: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub shutdown_timeout: Duration,
}

/// How whippet runs and is watched.
#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    pub log_level: Level,
    /// `--self-metrics`: whippet's vitals go to the intake with each flush.
    pub self_metrics: bool,
    pub status: Option<SocketAddr>,
    pub allow_root: bool,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Listen,
    pub pipeline: Pipeline,
    pub aggregation: Aggregation,
    pub shaping: ShapingSettings,
    pub origin: OriginSettings,
    pub forwarding: Forwarding,
    pub operation: Operation,
    /// `--config FILE`, re-read on SIGHUP.
    pub config_file: Option<PathBuf>,
    /// Where each setting came from, in [`SETTINGS`] order: (flag, value as given, source).
    /// The API key's value is never kept here.
    pub sources: Vec<(&'static str, String, Source)>,
    /// What was skipped rather than refused (the Agent's leniency), logged at start and shown
    /// by `--check-config`.
    pub warnings: Vec<String>,
    /// The keys of the Agent's YAML file that whippet does not implement, with where they
    /// are: shown by `--check-config`, counted in a log line at start.
    pub ignored: Vec<String>,
}

impl Config {
    /// The main forwarder's configuration, when an intake is configured.
    pub fn forwarder(&self) -> Option<ForwarderConfig> {
        self.forwarders().into_iter().next()
    }

    /// One forwarder configuration per intake: `--dd-url` first, then each additional (URL,
    /// key). They share the retry queue and the retry directory's bytes equally; an
    /// additional intake spills to a directory of its own inside `--retry-dir`, named by a
    /// hash of its URL and key so it is found again after a restart.
    pub fn forwarders(&self) -> Vec<ForwarderConfig> {
        let f = &self.forwarding;
        let Some(main) = &f.intake_url else {
            return Vec::new();
        };
        let n = 1 + f.additional.len();
        let base = ForwarderConfig {
            base_url: main.clone(),
            api_key: f.api_key.clone(),
            threads: f.forwarder_threads,
            retry_queue_bytes: f.retry_queue_bytes / n,
            timeout: f.request_timeout,
            retry_base: f.retry_base,
            retry_max: f.retry_max,
            retry_dir: f
                .retry_dir
                .clone()
                .map(|dir| (dir, f.retry_dir_bytes / n as u64)),
            // With additional intakes every intake is named, the main one too, so each
            // reading family has one set of labels.
            intake: (n > 1).then(|| crate::telemetry::intern(&crate::forwarder::redact_url(main))),
            additional: false,
            egress: f.egress.clone(),
        };
        let mut seen: Vec<String> = vec![crate::forwarder::redact_url(main)];
        let mut out = vec![base.clone()];
        for (url, key) in &f.additional {
            let shown = crate::forwarder::redact_url(url);
            // The same address with a second key is told apart by its position.
            let label = match seen.iter().filter(|s| **s == shown).count() {
                0 => shown.clone(),
                k => format!("{shown} (key {})", k + 1),
            };
            seen.push(shown);
            let intake = crate::telemetry::intern(&label);
            out.push(ForwarderConfig {
                base_url: url.clone(),
                api_key: key.clone(),
                retry_dir: base.retry_dir.as_ref().map(|(dir, bytes)| {
                    (
                        dir.join(format!("intake-{:016x}", stable_hash(url, &key.0))),
                        *bytes,
                    )
                }),
                intake: Some(intake),
                additional: true,
                ..base.clone()
            });
        }
        out
    }

    pub fn serializer(&self) -> Serializer {
        Serializer {
            series_api: self.forwarding.series_api,
            compression: self.forwarding.compression,
            hostname: self.aggregation.hostname.clone(),
        }
    }

    /// What workers add to every message.
    pub fn enrichment(&self) -> Enrichment {
        let a = &self.aggregation;
        Enrichment {
            hostname: a.hostname.as_str().into(),
            extra_tags: a
                .tags
                .iter()
                .map(|t| Box::<str>::from(t.as_str()))
                .collect(),
            bucket_seconds: a.expiry.interval,
            origin: None,
            shaping: None,
            eol_required: self.listen.eol_required,
            timestamps: self.pipeline.timestamps,
        }
    }

    /// How closed buckets become output.
    pub(crate) fn flush_settings(&self) -> FlushSettings {
        let a = &self.aggregation;
        FlushSettings::new(a.expiry, &a.histogram_aggregates, &a.histogram_percentiles)
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    File { path: PathBuf, line: usize },
    Environment,
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::File { path, line } => write!(f, "{}:{line}", path.display()),
            Source::Environment => f.write_str("environment"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    /// `--check-config`: the report to print; exit 0.
    Check(String),
    Help(String),
    Version,
}

fn options() -> Options {
    let mut o = Options::new();
    for s in SETTINGS {
        let help = format!("{} {} [{}]", s.help, s.tail(), s.var);
        if s.hint == "BOOL" {
            // `--allow-root` alone means true; `--allow-root=false` is accepted too.
            o.opt("", s.flag, &help, s.hint, HasArg::Maybe, Occur::Multi);
        } else {
            o.optmulti("", s.flag, &help, s.hint);
        }
    }
    o.optmulti("", "config", "Read settings from FILE: KEY=VALUE lines named like the environment variables in brackets above ('#' comments, blank lines and quotes allowed), so one file serves as whippet's config and as a systemd EnvironmentFile; or the Agent's datadog.yaml (by its .yaml extension or its content), whose keys are those variables in lower case without DD_, other keys ignored. Re-read on SIGHUP", "FILE");
    o.optflag(
        "",
        "check-config",
        "Print the effective settings and where each came from, then exit 0; or print every problem and exit 2",
    );
    o.optflag("h", "help", "Print this help and exit");
    o.optflag("V", "version", "Print the version and exit");
    o
}

/// Parses the command line (without the program name) with the process environment.
pub fn parse(args: &[String]) -> Result<Command, Error> {
    parse_with(args, &|name| std::env::var(name).ok())
}

/// Like [`parse`], with the environment given as a lookup (for tests and reloads).
pub(crate) fn parse_with(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Command, Error> {
    let opts = options();
    let m = opts
        .parse(args)
        .map_err(|e| Error::Config(format!("{e} (see --help)")))?;
    if m.opt_present("help") {
        let brief = "Usage: whippet [OPTIONS]\n\nA fast, lean DogStatsD server. Each setting also reads the environment variable in brackets.";
        return Ok(Command::Help(opts.usage(brief)));
    }
    if m.opt_present("version") {
        return Ok(Command::Version);
    }
    if let Some(extra) = m.free.first() {
        return Err(Error::Config(format!(
            "unexpected argument '{extra}' (see --help)"
        )));
    }
    let config_file = m.opt_strs("config").pop().map(PathBuf::from);
    let mut errors = Vec::new();
    let file = match &config_file {
        Some(path) => resolve::read_file(path, &mut errors),
        None => Default::default(),
    };
    let ignored = match &config_file {
        Some(path) => file
            .ignored
            .iter()
            .map(|(key, line)| format!("{key} ({}:{line})", path.display()))
            .collect(),
        None => Vec::new(),
    };
    let mut r = Resolver {
        m: &m,
        file: file.values,
        file_path: config_file.clone(),
        env,
        errors,
        sources: Vec::new(),
    };
    let listen = listen(&mut r);
    let pipeline = pipeline(&mut r);
    let mut warnings = Vec::new();
    let aggregation = aggregation(&mut r, &mut warnings);
    let shaping = shaping(&mut r);
    let origin = origin(&mut r);
    let forwarding = forwarding(&mut r);
    warnings.extend(r.fixed_warnings());
    let operation = operation(&mut r);
    if let (Some(path), false) = (&config_file, file.yaml) {
        r.check_unknown_keys(path);
    }
    let skip = env("DD_SKIP_SSL_VALIDATION");
    let name = "DD_SKIP_SSL_VALIDATION (environment)";
    resolve::refuse_skip_ssl(skip.as_deref(), name, &mut r.errors);
    let Resolver {
        errors,
        mut sources,
        ..
    } = r;
    if !errors.is_empty() {
        return Err(Error::Config(errors.join("\n")));
    }
    sources.sort_by_key(|(flag, _, _)| SETTINGS.iter().position(|s| s.flag == *flag));
    // What the derived defaults came to.
    for (flag, value, source) in &mut sources {
        if *source != Source::Default || !value.is_empty() {
            continue;
        }
        *value = match *flag {
            "workers" => pipeline.workers.to_string(),
            "retry-max-ms" => forwarding.retry_max.as_millis().to_string(),
            "hostname" => aggregation.hostname.clone(),
            "dd-url" => forwarding.intake_url.as_deref().map_or(
                "none (printing to stdout)".into(),
                crate::forwarder::redact_url,
            ),
            _ => continue,
        };
    }
    let config = Config {
        listen,
        pipeline,
        aggregation,
        shaping,
        origin,
        forwarding,
        operation,
        config_file,
        sources,
        warnings,
        ignored,
    };
    if m.opt_present("check-config") {
        return Ok(Command::Check(report(&config)));
    }
    Ok(Command::Run(Box::new(config)))
}

/// `--check-config`'s output: one line per setting, then what was derived from them.
pub fn report(c: &Config) -> String {
    let mut out = String::new();
    for (flag, value, source) in &c.sources {
        out.push_str(&format!("{flag:<24} {value:<40} ({source})\n"));
    }
    let intake = c.forwarding.intake_url.as_deref().map_or(
        "none: printing to stdout".into(),
        crate::forwarder::redact_url,
    );
    out.push_str(&format!("{:<24} {intake}\n", "=> intake"));
    let udp = c.listen.udp.map_or("off".to_string(), |a| a.to_string());
    out.push_str(&format!("{:<24} {udp}\n", "=> udp"));
    let a = &c.aggregation;
    out.push_str(&format!(
        "{:<24} {} (from {})\n",
        "=> hostname", a.hostname, a.hostname_rule
    ));
    out.push_str(&format!(
        "{:<24} {}\n",
        "=> tagger",
        tagger_summary(&c.origin)
    ));
    out.push_str(&format!(
        "{:<24} {}\n",
        "=> shaping",
        shaping_summary(&c.shaping)
    ));
    for w in &c.warnings {
        out.push_str(&format!("{:<24} {w}\n", "=> warning"));
    }
    for key in &c.ignored {
        out.push_str(&format!(
            "{:<24} {key}: not a whippet setting\n",
            "=> ignored"
        ));
    }
    out
}

/// What shaping will do, for `--check-config`.
fn shaping_summary(settings: &ShapingSettings) -> String {
    let shaping = match settings.build() {
        Ok(Some(s)) => s,
        Ok(None) => return "off".into(),
        Err(e) => return e,
    };
    let mut parts = Vec::new();
    if !shaping.mapper.is_empty() {
        parts.push(format!("mapper {} mappings", shaping.mapper.mappings()));
    }
    if !shaping.namespace.is_empty() {
        parts.push(format!("namespace {}", shaping.namespace));
    }
    if !shaping.filter.is_empty() {
        let kind = if settings.filterlist_prefix {
            "prefixes"
        } else {
            "names"
        };
        parts.push(format!("filter list {} {kind}", shaping.filter.len()));
    }
    if !shaping.tag_filters.is_empty() {
        parts.push(format!(
            "tag filters for {} names",
            shaping.tag_filters.len()
        ));
    }
    if let Some(prefix) = &shaping.histogram_copy {
        parts.push(format!(
            "histograms copied to distributions named {prefix}<name>"
        ));
    }
    if !shaping.host_rules.is_empty() {
        parts.push(format!("{} host rules", shaping.host_rules.len()));
    }
    parts.join("; ")
}

/// What the tagger will ask, for `--check-config`.
fn tagger_summary(o: &OriginSettings) -> String {
    if !o.tagger() {
        return "off (no --origin-detection, --origin-detection-client or --kubelet-host)".into();
    }
    let mut providers = Vec::new();
    if let Some(k) = &o.kubelet {
        providers.push(format!(
            "kubelet {} (https port {}, http port {})",
            k.host, k.https_port, k.http_port
        ));
    }
    if let Some(d) = &o.docker {
        providers.push(format!("docker {}", d.display()));
    }
    if providers.is_empty() {
        providers.push("no provider".into());
    }
    let socket = if o.detection { "on" } else { "off" };
    format!(
        "{}; cardinality {}; socket origin {socket}",
        providers.join(", "),
        crate::telemetry::Label::label(o.cardinality)
    )
}

fn listen(r: &mut Resolver<'_>) -> Listen {
    let udp_flag = r.given("udp", resolve::udp_address);
    let bind_host = r.value("bind-host", |v, _| Ok(v.to_string()));
    let port: u16 = r.number("port");
    let non_local = r.value("non-local-traffic", resolve::boolean);
    let udp = match udp_flag {
        Some(udp) => udp,
        None if port == 0 => None,
        None if non_local => Some(SocketAddr::from(([0, 0, 0, 0], port))),
        None => match resolve::host_address(&bind_host, port) {
            Ok(a) => Some(a),
            Err(e) => {
                let name = r.raw("bind-host").map_or("--bind-host".into(), |r| r.2);
                r.errors.push(format!("{name}: {e}"));
                None
            }
        },
    };
    let idle = r.value("stream-idle-timeout", resolve::duration);
    Listen {
        udp,
        udp_readers: r.number("udp-readers"),
        so_rcvbuf: r.number("so-rcvbuf"),
        socket: r.string("socket").map(PathBuf::from),
        unix_reader_priority: r.number("unix-reader-priority"),
        socket_mode: r.value("socket-mode", resolve::socket_mode),
        stream_socket: r.string("stream-socket").map(PathBuf::from),
        stream: Limits {
            max_connections: r.number("stream-max-connections"),
            idle_timeout: (!idle.is_zero()).then_some(idle),
        },
        buffer_size: r.number("buffer-size"),
        eol_required: r
            .given("eol-required", resolve::eol_transports)
            .unwrap_or_default(),
        mirror: mirror(r),
        capture: capture(r),
    }
}

/// `--capture-dir` and its limits, when captures are on.
fn capture(r: &mut Resolver<'_>) -> Option<CaptureSettings> {
    let dir = r
        .string("capture-dir")
        .filter(|d| !d.is_empty() && d != "off");
    let seconds: u64 = r.number("capture-seconds");
    let memory: usize = r.number("capture-memory");
    let file_bytes: u64 = r.number("capture-file-bytes");
    Some(CaptureSettings {
        dir: PathBuf::from(dir?),
        duration: Duration::from_secs(seconds),
        memory,
        file_bytes,
    })
}

/// `--forward-host` and `--forward-port`: both, or no mirror (the Agent's port 0 is off).
fn mirror(r: &mut Resolver<'_>) -> Option<SocketAddr> {
    let host = r.string("forward-host").map(|h| h.trim().to_string());
    let port: u16 = r.number("forward-port");
    let host = host.filter(|h| !h.is_empty())?;
    if port == 0 {
        return None;
    }
    match resolve::host_port(&host, port) {
        Ok(a) => Some(a),
        Err(e) => {
            let name = r
                .raw("forward-host")
                .map_or("--forward-host".into(), |r| r.2);
            r.errors.push(format!("{name}: {e}"));
            None
        }
    }
}

fn pipeline(r: &mut Resolver<'_>) -> Pipeline {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    Pipeline {
        queue_size: r.number("queue-size"),
        workers: r
            .number_given("workers")
            .unwrap_or(cpus.min(settings::DEFAULT_WORKERS_AT_MOST)),
        shards: r.number("shards"),
        context_limit: r.number("context-limit"),
        aggregation_memory: r.number("aggregation-memory"),
        event_backlog: r.number("event-backlog"),
        timestamps: r.value("no-aggregation-pipeline", resolve::boolean),
    }
}

fn aggregation(r: &mut Resolver<'_>, warnings: &mut Vec<String>) -> Aggregation {
    let tags_flag = r.m.opt_present("tags");
    let tags = r.given("tags", |v, _| {
        // The command line separates with commas; the Agent's DD_DOGSTATSD_TAGS with spaces.
        let seps: &[char] = if tags_flag { &[','] } else { &[',', ' ', '\t'] };
        Ok(v.split(seps)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect())
    });
    let (hostname, hostname_rule) = hostname(r, warnings);
    let expiry = Expiry {
        interval: r.number("bucket-seconds"),
        counter_seconds: r.number("expiry-seconds"),
        context_seconds: r.number("context-expiry-seconds"),
    };
    let (histogram_aggregates, skipped) = r.value("histogram-aggregates", resolve::aggregates);
    warnings.extend(skipped);
    let (histogram_percentiles, skipped) = r.value("histogram-percentiles", resolve::percentiles);
    warnings.extend(skipped);
    // The Agent's host tags and env travel in host metadata, which whippet does not send:
    // they join the extra tags instead, after them, each once.
    let host_tags = r
        .given("host-tags", |v, _| {
            Ok(v.split([',', ' ', '\t'])
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>())
        })
        .unwrap_or_default();
    let env = r.given("env", |v, name| {
        let v = v.trim();
        if v.contains([',', ' ', '|', '#']) {
            return Err(format!("{name}: '{v}' cannot be a tag value"));
        }
        Ok((!v.is_empty()).then(|| format!("env:{v}")))
    });
    let mut tags: Vec<String> = tags.unwrap_or_default();
    for t in host_tags.into_iter().chain(env.flatten()) {
        if !tags.contains(&t) {
            tags.push(t);
        }
    }
    Aggregation {
        tags,
        hostname,
        hostname_rule,
        expiry,
        histogram_aggregates,
        histogram_percentiles,
    }
}

fn shaping(r: &mut Resolver<'_>) -> ShapingSettings {
    let json = |v: &str, name: &str| -> Result<String, String> {
        serde_json::from_str::<serde_json::Value>(v)
            .map(|_| v.to_string())
            .map_err(|e| format!("{name}: not valid JSON: {e}"))
    };
    let mapper_profiles = r.given("mapper-profiles", |v, name| {
        let v = json(v, name)?;
        Mapper::from_json(&v).map_err(|e| format!("{name}: {e}"))?;
        Ok(v)
    });
    let tag_filterlist = r.given("metric-tag-filterlist", |v, name| {
        let v = json(v, name)?;
        let value = serde_json::from_str(&v).map_err(|e| format!("{name}: {e}"))?;
        crate::shaping::tag_filters(&value).map_err(|e| format!("{name}: {e}"))?;
        Ok(v)
    });
    let host_rules = r.given("host-rules", |v, name| {
        HostRules::from_json(v).map_err(|e| format!("{name}: {e}"))?;
        Ok(v.to_string())
    });
    let namespace = r.given("metric-namespace", |v, name| {
        let v = v.trim();
        if v.contains(|c: char| c.is_whitespace() || c == '|' || c == ':') {
            return Err(format!("{name}: '{v}' cannot begin a metric name"));
        }
        // The Agent's rule: a namespace ends with a dot.
        Ok(match v {
            "" => String::new(),
            v if v.ends_with('.') => v.to_string(),
            v => format!("{v}."),
        })
    });
    let namespace_exempt = r.value("metric-namespace-blacklist", resolve::names);
    let filterlist = r
        .given("metric-filterlist", resolve::names)
        .unwrap_or_default();
    let filterlist_prefix: bool = r.value("metric-filterlist-match-prefix", resolve::boolean);
    let blocklist = r
        .given("metric-blocklist", resolve::names)
        .unwrap_or_default();
    let blocklist_prefix: bool = r.value("metric-blocklist-match-prefix", resolve::boolean);
    let copy: bool = r.value("histogram-copy-to-distribution", resolve::boolean);
    let copy_prefix = r.string("histogram-copy-to-distribution-prefix");
    // As the Agent: the newer filter list wins when it has entries.
    let (filterlist, filterlist_prefix) = if filterlist.is_empty() {
        (blocklist, blocklist_prefix)
    } else {
        (filterlist, filterlist_prefix)
    };
    ShapingSettings {
        mapper_profiles,
        mapper_cache_size: r.number("mapper-cache-size"),
        namespace: namespace.unwrap_or_default(),
        namespace_exempt,
        filterlist,
        filterlist_prefix,
        tag_filterlist,
        histogram_copy: copy.then(|| copy_prefix.unwrap_or_default()),
        host_rules,
    }
}

fn origin(r: &mut Resolver<'_>) -> OriginSettings {
    let kubelet = r.given("kubelet-host", |v, _| Ok(v.trim().to_string()));
    let https_port = r.number("kubelet-https-port");
    let http_port = r.number("kubelet-http-port");
    let token_path = PathBuf::from(r.value("kubelet-token-path", |v, _| Ok(v.to_string())));
    let ca_path = PathBuf::from(r.value("kubelet-client-ca", |v, _| Ok(v.to_string())));
    let tls_verify = r.value("kubelet-tls-verify", resolve::boolean);
    // Validated and shown, but with no effect of its own: at cardinality `none` the Agent's
    // tagger gives no tags either way, and so does whippet (docs/behaviour.md, "Origin").
    let _optout: bool = r.value("origin-optout", resolve::boolean);
    OriginSettings {
        detection: r.value("origin-detection", resolve::boolean),
        client: r.value("origin-detection-client", resolve::boolean),
        entity_id_precedence: r.value("entity-id-precedence", resolve::boolean),
        cardinality: r.value("tag-cardinality", |v, name| {
            Cardinality::parse(v)
                .ok_or_else(|| format!("{name}: '{v}' is not low, orchestrator or high"))
        }),
        procfs: PathBuf::from(r.value("procfs-path", |v, _| Ok(v.to_string()))),
        kubelet: kubelet
            .filter(|h| !h.is_empty() && h != "off")
            .map(|host| KubeletConfig {
                host,
                https_port,
                http_port,
                token_path,
                ca_path,
                tls_verify,
            }),
        docker: r.value("docker-host", |v, name| match v.trim() {
            "off" => Ok(None),
            // An empty DOCKER_HOST means Docker's own default.
            "" => Ok(Some(PathBuf::from("/var/run/docker.sock"))),
            v => crate::tagger::docker::socket_of(v)
                .map(Some)
                .map_err(|e| format!("{name}: {e}")),
        }),
    }
}

/// The host name, as the Agent resolves it where no cloud provider applies: the setting,
/// else the first line of `--hostname-file`, else the FQDN when `--hostname-fqdn` asks for
/// it, else the Kubernetes node name (with `-CLUSTER` when the cluster name is set), else
/// this machine's host name. Returns it with the rule that gave it.
fn hostname(r: &mut Resolver<'_>, warnings: &mut Vec<String>) -> (String, &'static str) {
    let given = r.string("hostname").filter(|h| !h.is_empty());
    let file = r.string("hostname-file").filter(|f| !f.is_empty());
    let fqdn: bool = r.value("hostname-fqdn", resolve::boolean);
    let node = r.string("kubelet-nodename").filter(|n| !n.is_empty());
    let cluster = r
        .given("cluster-name", resolve::cluster_name)
        .filter(|c| !c.is_empty());
    if let Some(h) = given {
        return (h, "--hostname (DD_HOSTNAME)");
    }
    if let Some(path) = file {
        match std::fs::read_to_string(&path) {
            Ok(text) => match text.lines().next().map(str::trim).filter(|l| !l.is_empty()) {
                Some(h) => return (h.to_string(), "--hostname-file (DD_HOSTNAME_FILE)"),
                None => warnings.push(format!(
                    "DD_HOSTNAME_FILE: {path} is empty; the host name comes from the next rule"
                )),
            },
            Err(e) => warnings.push(format!(
                "DD_HOSTNAME_FILE: cannot read {path} ({e}); the host name comes from the next rule"
            )),
        }
    }
    let machine = machine_hostname();
    if fqdn {
        match resolve::fqdn(&machine) {
            Some(f) => return (f, "the FQDN (DD_HOSTNAME_FQDN)"),
            None => warnings.push(format!(
                "DD_HOSTNAME_FQDN: {machine} resolves to no fully qualified name; the host name comes from the next rule"
            )),
        }
    }
    if let Some(node) = node {
        return match cluster {
            Some(c) => (
                format!("{node}-{c}"),
                "the Kubernetes node name and cluster name",
            ),
            None => (
                node,
                "the Kubernetes node name (DD_KUBERNETES_KUBELET_NODENAME)",
            ),
        };
    }
    (machine, "this machine's host name")
}

/// Proxies and trust, each checked now so a bad one stops the start with its name.
fn egress(r: &mut Resolver<'_>, intake: Option<&str>) -> crate::forwarder::egress::Egress {
    use crate::forwarder::egress::{Egress, Roots};
    let proxy = |r: &mut Resolver<'_>, flag: &'static str| {
        r.given(flag, |v, name| {
            let v = v.trim();
            if v.is_empty() {
                return Ok(None);
            }
            crate::forwarder::egress::parse_proxy(v)
                .map(|_| Some(v.to_string()))
                .map_err(|e| format!("{name}: not a proxy address like http://proxy:3128 ({e})"))
        })
        .flatten()
    };
    let proxy_https = proxy(r, "proxy-https");
    let proxy_http = proxy(r, "proxy-http");
    let no_proxy = r
        .string("proxy-no-proxy")
        .map(|v| {
            v.split([',', ' ', '\t'])
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let roots = r.value("ca-bundle", |v, name| {
        let roots = Roots::parse(v);
        roots
            .load()
            .map(|_| roots)
            .map_err(|e| format!("{name}: {e}"))
    });
    let egress = Egress {
        proxy_https,
        proxy_http,
        no_proxy,
        roots,
    };
    if let Some(url) = intake {
        if let Err(e) = egress.proxy(url) {
            r.errors.push(format!("proxy: {e}"));
        }
    }
    egress
}

/// The API key: `--api-key`, else the file `--api-key-file` names, else the systemd
/// credential `api_key` when systemd passed one, else none.
fn api_key(r: &mut Resolver<'_>) -> Option<String> {
    let direct = r.given("api-key", resolve::api_key);
    let named = r.given("api-key-file", |v, name| {
        Ok((PathBuf::from(v), name.to_string()))
    });
    let credential = (r.env)("CREDENTIALS_DIRECTORY")
        .map(|dir| PathBuf::from(dir).join("api_key"))
        .filter(|p| p.exists());
    match (direct, named, credential) {
        (Some(_), Some((_, name)), _) => {
            r.errors.push(format!(
                "{name}: the API key is also set directly (--api-key or DD_API_KEY); keep one of them"
            ));
            None
        }
        (Some(key), None, _) => Some(key),
        (None, Some((path, name)), _) => read_key_file(r, &path, &name),
        (None, None, Some(path)) => {
            let shown = path.display().to_string();
            if let Some(entry) = r.sources.iter_mut().find(|(f, _, _)| *f == "api-key-file") {
                entry.1 = format!("{shown} (systemd credential)");
            }
            read_key_file(r, &path, &format!("the systemd credential {shown}"))
        }
        (None, None, None) => None,
    }
}

/// The key a key file holds, without surrounding whitespace (an editor's newline); errors
/// name the file, never the key.
fn read_key_file(r: &mut Resolver<'_>, path: &std::path::Path, name: &str) -> Option<String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            r.errors.push(format!(
                "{name}: cannot read the API key from {}: {e}; make it readable by whippet's user",
                path.display()
            ));
            return None;
        }
    };
    match resolve::api_key(text.trim(), name) {
        Ok(key) => (!key.is_empty()).then_some(key),
        Err(e) => {
            r.errors.push(e);
            None
        }
    }
}

/// FNV-1a over a URL and a key: the same on every start, so an additional intake finds its
/// retry directory again. Not secret (the directory is whippet's alone).
fn stable_hash(url: &str, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in url.bytes().chain([0]).chain(key.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn forwarding(r: &mut Resolver<'_>) -> Forwarding {
    let dd_url = r.given("dd-url", resolve::intake_base);
    let site = r.value("site", resolve::site);
    let api_key = ApiKey(api_key(r).unwrap_or_default());
    // An explicit URL, else the site's intake when there is a key, else the console.
    let intake_url =
        dd_url.or_else(|| (!api_key.0.is_empty()).then(|| format!("https://app.{site}")));
    let request_timeout_ms: u64 = r.number("request-timeout-ms");
    let retry_base_ms: u64 = r.number("retry-base-ms");
    let retry_max_ms: u64 = r
        .number_given("retry-max-ms")
        .unwrap_or(retry_base_ms.saturating_mul(32));
    let additional: Vec<(String, ApiKey)> = r
        .given("additional-endpoints", resolve::additional_endpoints)
        .unwrap_or_default()
        .into_iter()
        .map(|(url, key)| (url, ApiKey(key)))
        .collect();
    if !additional.is_empty() && intake_url.is_none() {
        r.errors.push(
            "DD_ADDITIONAL_ENDPOINTS: additional intakes need a main one; set --dd-url or an API key (DD_API_KEY)".into(),
        );
    }
    let payloads = crate::forwarder::Enabled {
        series: r.value("enable-payloads-series", resolve::boolean),
        sketches: r.value("enable-payloads-sketches", resolve::boolean),
        events: r.value("enable-payloads-events", resolve::boolean),
        service_checks: r.value("enable-payloads-service-checks", resolve::boolean),
    };
    let egress = egress(r, intake_url.as_deref());
    Forwarding {
        intake_url,
        api_key,
        egress,
        payloads,
        additional,
        series_api: r.value("series-api", |v, name| match v {
            "v2" => Ok(SeriesApi::V2),
            "v1" => Ok(SeriesApi::V1),
            other => Err(format!("{name}: '{other}' is not v1 or v2")),
        }),
        compression: r.value("compression", |v, name| {
            Compression::parse(&v.to_ascii_lowercase())
                .ok_or_else(|| format!("{name}: '{v}' is not zstd, zlib, deflate or none"))
        }),
        retry_queue_bytes: r.number("retry-queue-bytes"),
        retry_dir: r
            .string("retry-dir")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from),
        retry_dir_bytes: r.number("retry-dir-bytes"),
        forwarder_threads: r.number("forwarder-threads"),
        request_timeout: Duration::from_millis(request_timeout_ms),
        retry_base: Duration::from_millis(retry_base_ms),
        retry_max: Duration::from_millis(retry_max_ms.max(retry_base_ms)),
        shutdown_timeout: r.value("shutdown-timeout", resolve::duration),
    }
}

fn operation(r: &mut Resolver<'_>) -> Operation {
    Operation {
        self_metrics: r.value("self-metrics", resolve::boolean),
        log_level: r.value("log-level", |v, name| {
            Level::parse(v).ok_or_else(|| {
                format!("{name}: '{v}' is not one of error, warn, info, debug (or trace, critical, off)")
            })
        }),
        status: r.given("status", resolve::status_address),
        allow_root: r.value("allow-root", resolve::boolean),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Command, String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_with(&args, &|k| env.get(k).cloned()).map_err(|e| e.to_string())
    }

    fn run_env(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        match parse_env(args, env)? {
            Command::Run(c) => Ok(*c),
            other => Err(format!("{other:?}")),
        }
    }

    fn run(args: &[&str]) -> Result<Config, String> {
        run_env(args, &[])
    }

    struct File(PathBuf);

    impl File {
        fn new(name: &str, text: &str) -> File {
            let path = std::env::temp_dir()
                .join(format!("whippet-config-{}-{name}.conf", std::process::id()));
            std::fs::write(&path, text).unwrap();
            File(path)
        }

        fn arg(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = run(&[]).unwrap();
        assert_eq!(c.listen.udp, Some("127.0.0.1:8125".parse().unwrap()));
        assert_eq!(c.listen.socket, None);
        assert_eq!(c.listen.socket_mode, 0o722);
        assert_eq!(c.listen.buffer_size, 8192);
        assert_eq!(c.aggregation.expiry.interval, 10);
        assert_eq!(
            c.aggregation.histogram_aggregates,
            [
                Aggregate::Max,
                Aggregate::Median,
                Aggregate::Avg,
                Aggregate::Count
            ]
        );
        assert_eq!(c.aggregation.histogram_percentiles, [95]);
        assert_eq!(
            (
                c.aggregation.expiry.counter_seconds,
                c.aggregation.expiry.context_seconds
            ),
            (300, 20)
        );
        assert_eq!(c.aggregation.hostname, machine_hostname());
        assert_eq!(c.forwarding.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.operation.log_level, Level::Info);
        assert_eq!(
            (c.operation.status, c.forwarding.intake_url.as_deref()),
            (None, None)
        );
        assert_eq!(c.sources.len(), SETTINGS.len());
        assert!(c.sources.iter().all(|s| s.2 == Source::Default));
    }

    #[test]
    fn flags_set_their_settings() {
        let c = run(&[
            "--udp",
            "off",
            "--socket",
            "/tmp/s",
            "--socket-mode",
            "0700",
            "--tags",
            "a:b,c",
            "--histogram-percentiles",
            "0.5,0.99",
            "--histogram-aggregates",
            "min,sum",
            "--hostname",
            "h1",
            "--bucket-seconds",
            "1",
            "--workers",
            "3",
            "--shutdown-timeout",
            "250ms",
            "--status",
            "5000",
        ])
        .unwrap();
        assert_eq!(c.listen.udp, None);
        assert_eq!(c.listen.socket, Some(PathBuf::from("/tmp/s")));
        assert_eq!(c.listen.socket_mode, 0o700);
        assert_eq!(c.aggregation.tags, ["a:b", "c"]);
        assert_eq!(c.aggregation.histogram_percentiles, [50, 99]);
        assert_eq!(
            c.aggregation.histogram_aggregates,
            [Aggregate::Min, Aggregate::Sum]
        );
        assert_eq!(
            (
                c.aggregation.hostname.as_str(),
                c.aggregation.expiry.interval,
                c.pipeline.workers
            ),
            ("h1", 1, 3)
        );
        assert_eq!(c.forwarding.shutdown_timeout, Duration::from_millis(250));
        assert_eq!(c.operation.status, Some("127.0.0.1:5000".parse().unwrap()));
    }

    #[test]
    fn agent_environment_variables_keep_the_agents_meaning() {
        let c = run_env(
            &[],
            &[
                ("DD_API_KEY", "k1"),
                ("DD_SITE", "datadoghq.eu"),
                ("DD_HOSTNAME", "envhost"),
                ("DD_DOGSTATSD_PORT", "9125"),
                ("DD_BIND_HOST", "127.0.0.2"),
                ("DD_DOGSTATSD_SOCKET", "/run/x.sock"),
                ("DD_DOGSTATSD_STREAM_SOCKET", "/run/y.sock"),
                ("DD_DOGSTATSD_TAGS", "env:prod  team:a,b"),
                ("DD_DOGSTATSD_BUFFER_SIZE", "16384"),
                ("DD_DOGSTATSD_SO_RCVBUF", "1048576"),
                ("DD_DOGSTATSD_QUEUE_SIZE", "64"),
                ("DD_DOGSTATSD_WORKERS_COUNT", "5"),
                ("DD_DOGSTATSD_PIPELINE_COUNT", "4"),
                ("DD_HISTOGRAM_AGGREGATES", "max min"),
                ("DD_HISTOGRAM_PERCENTILES", "0.5 0.99"),
                ("DD_DOGSTATSD_EXPIRY_SECONDS", "60"),
                ("DD_DOGSTATSD_CONTEXT_EXPIRY_SECONDS", "30"),
                ("DD_SERIALIZER_COMPRESSOR_KIND", "zlib"),
                ("DD_LOG_LEVEL", "WARN"),
            ],
        )
        .unwrap();
        assert_eq!(c.forwarding.api_key, ApiKey("k1".into()));
        assert_eq!(
            c.forwarding.intake_url.as_deref(),
            Some("https://app.datadoghq.eu")
        );
        assert_eq!(c.aggregation.hostname, "envhost");
        assert_eq!(c.listen.udp, Some("127.0.0.2:9125".parse().unwrap()));
        assert_eq!(c.listen.socket, Some(PathBuf::from("/run/x.sock")));
        assert_eq!(c.listen.stream_socket, Some(PathBuf::from("/run/y.sock")));
        assert_eq!(c.aggregation.tags, ["env:prod", "team:a", "b"]);
        assert_eq!(
            (
                c.listen.buffer_size,
                c.listen.so_rcvbuf,
                c.pipeline.queue_size,
                c.pipeline.workers,
                c.pipeline.shards
            ),
            (16384, 1 << 20, 64, 5, 4)
        );
        assert_eq!(
            c.aggregation.histogram_aggregates,
            [Aggregate::Max, Aggregate::Min]
        );
        assert_eq!(c.aggregation.histogram_percentiles, [50, 99]);
        assert_eq!(
            (
                c.aggregation.expiry.counter_seconds,
                c.aggregation.expiry.context_seconds
            ),
            (60, 30)
        );
        assert_eq!(c.forwarding.compression, Compression::Deflate);
        assert_eq!(c.operation.log_level, Level::Warn);
        assert!(c
            .sources
            .iter()
            .any(|s| s == &("api-key", "(redacted)".into(), Source::Environment)));
    }

    #[test]
    fn udp_follows_the_agents_port_and_non_local_rules() {
        let udp = |env: &[(&str, &str)]| run_env(&[], env).unwrap().listen.udp;
        assert_eq!(udp(&[("DD_DOGSTATSD_PORT", "0")]), None);
        assert_eq!(
            udp(&[("DD_DOGSTATSD_NON_LOCAL_TRAFFIC", "true")]),
            Some("0.0.0.0:8125".parse().unwrap())
        );
        assert_eq!(
            udp(&[("DD_BIND_HOST", "localhost")]),
            Some("127.0.0.1:8125".parse().unwrap())
        );
        // --udp, from anywhere, is the whole address.
        assert_eq!(
            udp(&[
                ("WHIPPET_UDP", "127.0.0.1:7000"),
                ("DD_DOGSTATSD_PORT", "0")
            ]),
            Some("127.0.0.1:7000".parse().unwrap())
        );
    }

    #[test]
    fn precedence_is_flag_then_file_then_environment_then_default() {
        let file = File::new(
            "precedence",
            "# a comment\n\n  DD_HOSTNAME = \"file host\"\nDD_DOGSTATSD_TAGS='a:1 b:2'\nDD_DOGSTATSD_BUFFER_SIZE=4096\n; another comment\n",
        );
        let env = [
            ("DD_HOSTNAME", "env-host"),
            ("DD_DOGSTATSD_BUFFER_SIZE", "2048"),
            ("DD_DOGSTATSD_QUEUE_SIZE", "7"),
        ];
        let c = run_env(&["--config", file.arg(), "--buffer-size", "1024"], &env).unwrap();
        assert_eq!(c.listen.buffer_size, 1024); // flag beats file and environment
        assert_eq!(c.aggregation.hostname, "file host"); // file beats environment
        assert_eq!(c.aggregation.tags, ["a:1", "b:2"]);
        assert_eq!(c.pipeline.queue_size, 7); // environment beats default
        assert_eq!(c.pipeline.workers, run(&[]).unwrap().pipeline.workers); // default
        let source = |flag: &str| c.sources.iter().find(|s| s.0 == flag).unwrap().2.clone();
        assert_eq!(source("buffer-size"), Source::Flag);
        assert_eq!(
            source("hostname"),
            Source::File {
                path: file.0.clone(),
                line: 3
            }
        );
        assert_eq!(source("queue-size"), Source::Environment);
        assert_eq!(source("workers"), Source::Default);
        assert_eq!(c.config_file, Some(file.0.clone()));
    }

    #[test]
    fn every_problem_is_reported_with_its_name_and_source() {
        let file = File::new(
            "problems",
            "DD_DOGSTATSD_PORT=eighty\nDD_DOGSTATSD_PORTT=1\nnot a setting\nDD_LOG_LEVEL=\"loud\nDD_API_KEY=secret-key-1\n",
        );
        let err = run_env(
            &["--config", file.arg(), "--workers", "0"],
            &[("DD_DOGSTATSD_BUFFER_SIZE", "big")],
        )
        .unwrap_err();
        let p = file.arg();
        let want = [
            format!("{p}:3: 'not a setting' is not KEY=VALUE"),
            format!("{p}:4: the value of DD_LOG_LEVEL has an unterminated quote"),
            format!("DD_DOGSTATSD_PORT ({p}:1): 'eighty' is not a whole number"),
            "DD_DOGSTATSD_BUFFER_SIZE (environment): 'big' is not a whole number".into(),
            "--workers: 0 is outside 1..=256".into(),
            format!("{p}:2: DD_DOGSTATSD_PORTT is not a whippet setting"),
        ];
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), want.len(), "{err}");
        for (line, want) in lines.iter().zip(&want) {
            assert!(line.starts_with(want.as_str()), "{line:?} vs {want:?}");
        }
        assert!(!err.contains("secret-key-1"));
    }

    #[test]
    fn an_api_key_an_http_header_cannot_carry_is_refused_at_start_without_showing_it() {
        for (key, what) in [
            ("secret-key\n", "a newline at character 11 (of 11)"),
            ("secret key", "a space at character 7 (of 10)"),
            ("\"secret-key\"", ""),
            ("sécret", "a non-ASCII character at character 2 (of 6)"),
            (
                "secret\u{7f}",
                "the control character 0x7f at character 7 (of 7)",
            ),
        ] {
            let result = parse_env(&["--api-key", key], &[]);
            if what.is_empty() {
                // Quotes are printable: the intake will refuse the key, not the header.
                assert!(result.is_ok(), "{key:?}");
                continue;
            }
            let Err(e) = result else {
                panic!("{key:?} accepted");
            };
            let e = e.to_string();
            assert!(e.contains(what), "{e}");
            assert!(!e.contains("ecret"), "the key leaked: {e}");
        }
    }

    #[test]
    fn a_password_in_the_intake_address_is_never_shown() {
        let Ok(Command::Check(report)) = parse_env(
            &[
                "--dd-url",
                "https://user:hunter2@intake.example",
                "--check-config",
            ],
            &[],
        ) else {
            panic!("not a report");
        };
        assert!(!report.contains("hunter2"), "{report}");
        assert!(report.contains("=> intake                https://(redacted)@intake.example\n"));
        let Err(e) = parse_env(&["--dd-url", "ftp://u:hunter2@x"], &[]) else {
            panic!("accepted");
        };
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn check_config_reports_sources_and_never_the_key() {
        let file = File::new("check", "DD_API_KEY=\"secret-key-2\"\n");
        let Ok(Command::Check(report)) =
            parse_env(&["--config", file.arg(), "--check-config"], &[])
        else {
            panic!("not a report");
        };
        assert!(!report.contains("secret-key-2"), "{report}");
        let key_line = report.lines().find(|l| l.starts_with("api-key")).unwrap();
        assert!(key_line.contains("(redacted)"), "{key_line}");
        assert!(
            key_line.ends_with(&format!("({}:1)", file.arg())),
            "{key_line}"
        );
        assert!(report.contains("=> intake                https://app.datadoghq.com\n"));
        assert_eq!(report.lines().count(), SETTINGS.len() + 5);
    }

    #[test]
    fn check_config_says_what_the_tagger_will_ask() {
        let report = |args: &[&str]| {
            let c = run(args).unwrap();
            let line = super::report(&c)
                .lines()
                .find(|l| l.starts_with("=> tagger"))
                .unwrap()
                .to_string();
            line["=> tagger".len()..].trim().to_string()
        };
        assert!(report(&[]).starts_with("off"));
        assert_eq!(
            report(&["--kubelet-host", "10.0.0.7", "--docker-host", "off", "--tag-cardinality", "high"]),
            "kubelet 10.0.0.7 (https port 10250, http port 10255); cardinality high; socket origin off"
        );
        assert_eq!(
            report(&["--origin-detection"]),
            "docker /var/run/docker.sock; cardinality low; socket origin on"
        );
        let bad = run(&["--docker-host", "tcp://1.2.3.4:2375"]).unwrap_err();
        assert!(
            bad.contains("--docker-host: 'tcp://1.2.3.4:2375' is not unix://"),
            "{bad}"
        );
        let bad = run(&["--tag-cardinality", "none"]).unwrap_err();
        assert_eq!(
            bad,
            "--tag-cardinality: 'none' is not low, orchestrator or high"
        );
    }

    #[test]
    fn invalid_histogram_entries_are_skipped_with_a_warning_the_report_shows() {
        let args = [
            "--histogram-aggregates",
            "max,p99,sum",
            "--histogram-percentiles",
            "0.5 95 0.99 x",
        ];
        let c = run(&args).unwrap();
        assert_eq!(
            c.aggregation.histogram_aggregates,
            [Aggregate::Max, Aggregate::Sum]
        );
        assert_eq!(c.aggregation.histogram_percentiles, [50, 99]);
        assert_eq!(
            c.warnings,
            [
                "--histogram-aggregates: skipped 'p99', which is not one of max, min, median, avg, sum, count",
                "--histogram-percentiles: skipped '95', which is not a fraction between 0.01 and 1 like 0.95",
                "--histogram-percentiles: skipped 'x', which is not a fraction between 0.01 and 1 like 0.95",
            ]
        );
        let report = report(&c);
        assert!(
            report.contains("=> warning               --histogram-aggregates: skipped 'p99'"),
            "{report}"
        );
        // The variables are as lenient as the flags.
        let c = run_env(&[], &[("DD_HISTOGRAM_AGGREGATES", "bogus max")]).unwrap();
        assert_eq!(c.aggregation.histogram_aggregates, [Aggregate::Max]);
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn invalid_values_name_the_flag() {
        let cases = [
            (
                vec!["--buffer-size", "70000"],
                "--buffer-size: 70000 is outside 512..=65536",
            ),
            (
                vec!["--buffer-size", "big"],
                "--buffer-size: 'big' is not a whole number",
            ),
            (
                vec!["--udp", "localhost"],
                "--udp: 'localhost' is not an address",
            ),
            (
                vec!["--socket-mode", "999"],
                "--socket-mode: '999' is not an octal file mode",
            ),
            (vec!["--workers", "0"], "--workers: 0 is outside 1..=256"),
            (
                vec!["--socket-mode", "0766"],
                "--socket-mode: 0766 would make the sockets world-readable",
            ),
            (
                vec!["--non-local-traffic=maybe"],
                "--non-local-traffic: 'maybe' is not true or false",
            ),
            (
                vec!["--shutdown-timeout", "2h"],
                "--shutdown-timeout: '2h' is not a duration",
            ),
            (
                vec!["--log-level", "loud"],
                "--log-level: 'loud' is not one of",
            ),
            (
                vec!["--status", "nowhere"],
                "--status: 'nowhere' is not an address",
            ),
            (
                vec!["--dd-url", "ftp://x"],
                "--dd-url: 'ftp://x' is not like",
            ),
            (
                vec!["--bind-host", "example.com"],
                "--bind-host: 'example.com' is not an IP address or localhost",
            ),
            (
                vec!["--config", "/nonexistent/w.conf"],
                "--config: cannot read /nonexistent/w.conf",
            ),
            (vec!["--bogus"], "Unrecognized option: 'bogus'"),
            (vec!["stray"], "unexpected argument 'stray'"),
        ];
        for (args, want) in cases {
            let err = run(&args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn shaping_settings_read_the_agents_variables_and_forms() {
        let c = run(&[]).unwrap();
        assert_eq!(
            c.shaping.build().unwrap().map(|_| ()),
            None,
            "off by default"
        );
        assert_eq!(c.shaping.namespace_exempt.len(), 21);
        assert_eq!(c.shaping.namespace_exempt[0], "datadog.agent");
        assert_eq!(c.shaping.mapper_cache_size, 1000);
        let profiles = r#"[{"name":"p","prefix":"a.","mappings":[{"match":"a.*","name":"b"}]}]"#;
        let filters = r#"[{"metric_name":"d","action":"include","tags":["env"]}]"#;
        let c = run_env(
            &[],
            &[
                ("DD_DOGSTATSD_MAPPER_PROFILES", profiles),
                ("DD_DOGSTATSD_MAPPER_CACHE_SIZE", "50"),
                ("DD_STATSD_METRIC_NAMESPACE", "app"),
                ("DD_STATSD_METRIC_NAMESPACE_BLACKLIST", "jvm kafka"),
                ("DD_STATSD_METRIC_BLOCKLIST", "old.one old.two"),
                ("DD_STATSD_METRIC_BLOCKLIST_MATCH_PREFIX", "true"),
                ("DD_METRIC_TAG_FILTERLIST", filters),
                ("DD_HISTOGRAM_COPY_TO_DISTRIBUTION", "true"),
                ("DD_HISTOGRAM_COPY_TO_DISTRIBUTION_PREFIX", "dist."),
            ],
        )
        .unwrap();
        let want = ShapingSettings {
            mapper_profiles: Some(profiles.into()),
            mapper_cache_size: 50,
            namespace: "app.".into(),
            namespace_exempt: vec!["jvm".into(), "kafka".into()],
            filterlist: vec!["old.one".into(), "old.two".into()],
            filterlist_prefix: true,
            tag_filterlist: Some(filters.into()),
            histogram_copy: Some("dist.".into()),
            host_rules: None,
        };
        assert_eq!(c.shaping, want);
        let built = c.shaping.build().unwrap().unwrap();
        assert_eq!((built.mapper.mappings(), built.filter.len()), (1, 2));
        // The newer filter list wins over the older one, in any form: a JSON list here.
        let c = run_env(
            &["--metric-filterlist", r#"["new.a", "new.b"]"#],
            &[("DD_STATSD_METRIC_BLOCKLIST", "old.one")],
        )
        .unwrap();
        assert_eq!(c.shaping.filterlist, ["new.a", "new.b"]);
        assert!(!c.shaping.filterlist_prefix);
        // Copies without a prefix keep the name; the dot is not doubled.
        let c = run(&[
            "--histogram-copy-to-distribution",
            "--metric-namespace",
            "x.",
        ])
        .unwrap();
        assert_eq!(c.shaping.histogram_copy.as_deref(), Some(""));
        assert_eq!(c.shaping.namespace, "x.");
        let file = File::new(
            "shaping",
            &format!("DD_DOGSTATSD_MAPPER_PROFILES='{profiles}'\nDD_METRIC_FILTERLIST=a,b c\n"),
        );
        let c = run(&["--config", file.arg()]).unwrap();
        assert_eq!(c.shaping.mapper_profiles.as_deref(), Some(profiles));
        assert_eq!(c.shaping.filterlist, ["a", "b", "c"]);
        let line = |c: &Config| {
            report(c)
                .lines()
                .find(|l| l.starts_with("=> shaping"))
                .unwrap()
                .to_string()
        };
        assert_eq!(
            line(&c),
            format!(
                "{:<24} mapper 1 mappings; filter list 3 names",
                "=> shaping"
            )
        );
        assert_eq!(
            line(&run(&[]).unwrap()),
            format!("{:<24} off", "=> shaping")
        );
    }

    #[test]
    fn shaping_errors_name_the_variable_the_profile_and_the_mapping() {
        let cases = [
            (
                ("DD_DOGSTATSD_MAPPER_PROFILES", r#"[{"name":"air","prefix":"a.","mappings":[{"match":"a.**","name":"b"}]}]"#),
                "DD_DOGSTATSD_MAPPER_PROFILES (environment): profile air, mapping 0: wildcard match 'a.**' must not contain consecutive '*'",
            ),
            (
                ("DD_DOGSTATSD_MAPPER_PROFILES", "[{"),
                "DD_DOGSTATSD_MAPPER_PROFILES (environment): not valid JSON: EOF while parsing an object at line 1 column 2",
            ),
            (
                ("DD_METRIC_TAG_FILTERLIST", r#"[{"metric_name":"m","action":"keep","tags":[]}]"#),
                "DD_METRIC_TAG_FILTERLIST (environment): entry 0 (m): action 'keep' is not include or exclude",
            ),
            (
                ("DD_METRIC_FILTERLIST", r#"["a", 1]"#),
                "DD_METRIC_FILTERLIST (environment): 1 is not a string",
            ),
            (
                ("DD_STATSD_METRIC_NAMESPACE", "my app"),
                "DD_STATSD_METRIC_NAMESPACE (environment): 'my app' cannot begin a metric name",
            ),
            (
                ("DD_DOGSTATSD_MAPPER_CACHE_SIZE", "0"),
                "DD_DOGSTATSD_MAPPER_CACHE_SIZE (environment): 0 is outside 1..=1048576",
            ),
        ];
        for ((var, value), want) in cases {
            assert_eq!(run_env(&[], &[(var, value)]).unwrap_err(), want);
        }
    }

    #[test]
    fn the_agents_yaml_file_is_read_with_the_same_precedence_and_its_other_keys_ignored() {
        let dir = std::env::temp_dir().join(format!("whippet-yaml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("datadog.yaml");
        std::fs::write(
            &path,
            r#"# The Agent's file, as an operator has it.
api_key: "0123456789abcdef0123456789abcdef"
site: datadoghq.eu
hostname: yaml-host
dogstatsd_port: 8126
dogstatsd_tags: ["env:prod", "team:metrics"]
histogram_aggregates:
  - max
  - sum
statsd_metric_namespace: app
dogstatsd_mapper_profiles:
  - name: air
    prefix: "airflow."
    mappings:
      - match: "airflow.*.done"
        name: "airflow.done"
        tags: {dag: "$1"}
metric_tag_filterlist:
  - metric_name: lat
    action: include
    tags: [env]
logs_enabled: true
process_config:
  enabled: "true"
"#,
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = run_env(
            &["--config", file, "--hostname", "flag-host"],
            &[("DD_SITE", "env.example"), ("DD_LOG_LEVEL", "debug")],
        )
        .unwrap();
        // Flag over file over environment over default.
        assert_eq!(c.aggregation.hostname, "flag-host");
        assert_eq!(
            c.forwarding.intake_url.as_deref(),
            Some("https://app.datadoghq.eu")
        );
        assert_eq!(c.operation.log_level, Level::Debug);
        assert_eq!(c.listen.udp, Some("127.0.0.1:8126".parse().unwrap()));
        assert_eq!(c.aggregation.tags, ["env:prod", "team:metrics"]);
        assert_eq!(
            c.aggregation.histogram_aggregates,
            [Aggregate::Max, Aggregate::Sum]
        );
        assert_eq!(c.shaping.namespace, "app.");
        let built = c.shaping.build().unwrap().unwrap();
        assert_eq!((built.mapper.mappings(), built.tag_filters.len()), (1, 1));
        assert_eq!(
            c.ignored,
            [
                format!("logs_enabled ({file}:22)"),
                format!("process_config ({file}:23)")
            ]
        );
        let Command::Check(report) = parse_env(&["--config", file, "--check-config"], &[]).unwrap()
        else {
            panic!("not a report");
        };
        assert!(report.contains(&format!(
            "=> ignored               logs_enabled ({file}:22): not a whippet setting\n"
        )));
        let port = report.lines().find(|l| l.starts_with("port ")).unwrap();
        assert!(port.ends_with(&format!("({file}:5)")), "{port}");
        assert!(!report.contains("0123456789abcdef"), "{report}");
        // A value whippet refuses is an error naming the key's line, as for KEY=VALUE files.
        std::fs::write(&path, "dogstatsd_port: many\n").unwrap();
        let err = run(&["--config", file]).unwrap_err();
        assert_eq!(
            err,
            format!("DD_DOGSTATSD_PORT ({file}:1): 'many' is not a whole number")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_tags_and_env_join_the_extra_tags_each_once() {
        let c = run_env(
            &["--tags", "team:core,env:prod"],
            &[("DD_TAGS", "region:eu team:core, az:b"), ("DD_ENV", "prod")],
        )
        .unwrap();
        assert_eq!(
            c.aggregation.tags,
            ["team:core", "env:prod", "region:eu", "az:b"]
        );
        let c = run_env(&[], &[("DD_ENV", "staging")]).unwrap();
        assert_eq!(c.aggregation.tags, ["env:staging"]);
        assert_eq!(
            run_env(&[], &[("DD_ENV", "my env")]).unwrap_err(),
            "DD_ENV (environment): 'my env' cannot be a tag value"
        );
    }

    #[test]
    fn skipping_tls_verification_is_refused_with_the_reason_in_every_form() {
        let why = resolve::SKIP_SSL;
        assert_eq!(
            run_env(&[], &[("DD_SKIP_SSL_VALIDATION", "true")]).unwrap_err(),
            format!("DD_SKIP_SSL_VALIDATION (environment): {why}")
        );
        assert!(run_env(&[], &[("DD_SKIP_SSL_VALIDATION", "false")]).is_ok());
        let file = File::new("skip", "DD_LOG_LEVEL=info\nDD_SKIP_SSL_VALIDATION=yes\n");
        assert_eq!(
            run(&["--config", file.arg()]).unwrap_err(),
            format!("{}:2: DD_SKIP_SSL_VALIDATION: {why}", file.arg())
        );
        let dir = std::env::temp_dir().join(format!("whippet-skip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = dir.join("datadog.yaml");
        std::fs::write(&yaml, "api_key: abc\nskip_ssl_validation: true\n").unwrap();
        let path = yaml.to_str().unwrap();
        assert_eq!(
            run(&["--config", path]).unwrap_err(),
            format!("{path}:2: skip_ssl_validation: {why}")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn additional_endpoints_are_read_as_the_agent_writes_them_and_share_the_bounds() {
        let json =
            r#"{"https://eu.example/": ["k2", "k3", "k2"], "http://user:pw@10.0.0.1:81": "k4"}"#;
        let c = run_env(
            &[
                "--api-key",
                "k1",
                "--retry-dir",
                "/var/lib/w",
                "--retry-queue-bytes",
                "900",
            ],
            &[("DD_ADDITIONAL_ENDPOINTS", json)],
        )
        .unwrap();
        let f = c.forwarders();
        let shown: Vec<_> = f
            .iter()
            .map(|f| {
                (
                    f.base_url.as_str(),
                    f.api_key.0.as_str(),
                    f.intake,
                    f.retry_queue_bytes,
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "https://app.datadoghq.com",
                    "k1",
                    Some("https://app.datadoghq.com"),
                    225
                ),
                (
                    "http://user:pw@10.0.0.1:81",
                    "k4",
                    Some("http://(redacted)@10.0.0.1:81"),
                    225
                ),
                ("https://eu.example", "k2", Some("https://eu.example"), 225),
                (
                    "https://eu.example",
                    "k3",
                    Some("https://eu.example (key 2)"),
                    225
                ),
            ]
        );
        let dirs: Vec<_> = f.iter().map(|f| f.retry_dir.clone().unwrap()).collect();
        assert_eq!(dirs[0], (PathBuf::from("/var/lib/w"), 268435456 / 4));
        // Each additional intake's own directory, the same on every start, distinct per key.
        assert!(dirs[2]
            .0
            .display()
            .to_string()
            .starts_with("/var/lib/w/intake-"));
        assert_ne!(dirs[2].0, dirs[3].0);
        assert_eq!(c.forwarders()[3].retry_dir, f[3].retry_dir);
        let Command::Check(report) = parse_env(
            &["--api-key", "k1", "--check-config"],
            &[("DD_ADDITIONAL_ENDPOINTS", json)],
        )
        .unwrap() else {
            panic!("not a report");
        };
        let line = report
            .lines()
            .find(|l| l.starts_with("additional-endpoints"))
            .unwrap();
        assert!(
            line.contains("http://(redacted)@10.0.0.1:81, https://eu.example, https://eu.example"),
            "{line}"
        );
        assert!(
            !report.contains("k2") && !report.contains("pw@"),
            "{report}"
        );
        for (bad, want) in [
            ("[1]", "not a JSON object"),
            (r#"{"eu.example": ["k"]}"#, "is not like https://"),
            (r#"{"https://eu.example": ["bad key"]}"#, "a space"),
            (r#"{"https://eu.example": [""]}"#, "an empty API key"),
        ] {
            let err =
                run_env(&["--api-key", "k1"], &[("DD_ADDITIONAL_ENDPOINTS", bad)]).unwrap_err();
            assert!(
                err.contains("DD_ADDITIONAL_ENDPOINTS") && err.contains(want),
                "{bad}: {err}"
            );
            assert!(!err.contains("bad key"), "{err}");
        }
        let err = run_env(&[], &[("DD_ADDITIONAL_ENDPOINTS", json)]).unwrap_err();
        assert!(err.contains("need a main one"), "{err}");
    }

    #[test]
    fn the_agents_forwarder_names_map_onto_whippets_settings_whose_own_names_win() {
        let env = [
            ("DD_FORWARDER_TIMEOUT", "7"),
            ("DD_FORWARDER_NUM_WORKERS", "5"),
            ("DD_FORWARDER_RETRY_QUEUE_PAYLOADS_MAX_SIZE", "1000"),
            ("DD_FORWARDER_STORAGE_PATH", "/var/lib/agent-retry"),
            ("DD_FORWARDER_STORAGE_MAX_SIZE_IN_BYTES", "5000"),
            ("DD_FORWARDER_BACKOFF_BASE", "0.5"),
            ("DD_FORWARDER_BACKOFF_MAX", "30"),
            ("DD_FORWARDER_BACKOFF_FACTOR", "3"),
        ];
        let c = run_env(&[], &env).unwrap();
        let f = &c.forwarding;
        assert_eq!(f.request_timeout, Duration::from_secs(7));
        assert_eq!(f.forwarder_threads, 5);
        assert_eq!(f.retry_queue_bytes, 1000);
        assert_eq!(f.retry_dir, Some(PathBuf::from("/var/lib/agent-retry")));
        assert_eq!(f.retry_dir_bytes, 5000);
        assert_eq!(f.retry_base, Duration::from_millis(500));
        assert_eq!(f.retry_max, Duration::from_secs(30));
        assert_eq!(
            c.warnings,
            ["DD_FORWARDER_BACKOFF_FACTOR is not used: whippet doubles the delay after each failure"]
        );
        // whippet's own variable beats the Agent's.
        let mut both = env.to_vec();
        both.push(("WHIPPET_REQUEST_TIMEOUT_MS", "250"));
        let c = run_env(&[], &both).unwrap();
        assert_eq!(c.forwarding.request_timeout, Duration::from_millis(250));
        // Unset, the longest delay is 32 times the first.
        let c = run_env(&["--retry-base-ms", "10"], &[]).unwrap();
        assert_eq!(c.forwarding.retry_max, Duration::from_millis(320));
        let err = run_env(&[], &[("DD_FORWARDER_TIMEOUT", "soon")]).unwrap_err();
        assert!(
            err.contains("DD_FORWARDER_TIMEOUT (environment, in milliseconds): 'soon'"),
            "{err}"
        );
        // In the Agent's YAML, nested or not, and in a KEY=VALUE file.
        let yaml = File::new(
            "agent.yaml",
            "forwarder_timeout: 3\nenable_payloads:\n  series: true\n  events: false\n  logs: x\n",
        );
        let c = run(&["--config", yaml.arg()]).unwrap();
        assert_eq!(c.forwarding.request_timeout, Duration::from_secs(3));
        assert_eq!(
            c.forwarding.payloads,
            crate::forwarder::Enabled {
                events: false,
                ..crate::forwarder::Enabled::ALL
            }
        );
        assert_eq!(
            c.ignored,
            [format!("enable_payloads.logs ({}:5)", yaml.arg())]
        );
        let conf = File::new("agent.conf", "DD_FORWARDER_NUM_WORKERS=3\n");
        assert_eq!(
            run(&["--config", conf.arg()])
                .unwrap()
                .forwarding
                .forwarder_threads,
            3
        );
    }

    #[test]
    fn the_api_key_comes_from_a_key_file_or_a_systemd_credential_never_shown() {
        let dir = std::env::temp_dir().join(format!("whippet-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("api_key");
        std::fs::write(&key, "  0123abcd\n").unwrap();
        let d = dir.display().to_string();
        let k = key.display().to_string();
        let c = run_env(&[], &[("CREDENTIALS_DIRECTORY", &d)]).unwrap();
        assert_eq!(c.forwarding.api_key, ApiKey("0123abcd".into()));
        let shown = c
            .sources
            .iter()
            .find(|(f, _, _)| *f == "api-key-file")
            .unwrap();
        assert_eq!(shown.1, format!("{k} (systemd credential)"));
        // A key set directly wins over the credential; with a key file it is an error.
        let c = run_env(&["--api-key", "direct"], &[("CREDENTIALS_DIRECTORY", &d)]).unwrap();
        assert_eq!(c.forwarding.api_key, ApiKey("direct".into()));
        let err = run_env(&["--api-key", "direct", "--api-key-file", &k], &[]).unwrap_err();
        assert!(
            err.contains("--api-key-file: the API key is also set directly"),
            "{err}"
        );
        let c = run_env(&[], &[("WHIPPET_API_KEY_FILE", &k)]).unwrap();
        assert_eq!(c.forwarding.api_key, ApiKey("0123abcd".into()));
        std::fs::write(&key, "0123 abcd").unwrap();
        let err = run_env(&["--api-key-file", &k], &[]).unwrap_err();
        assert!(
            err.contains("--api-key-file: the API key has a space at character 5"),
            "{err}"
        );
        assert!(!err.contains("0123"), "{err}");
        let missing = dir.join("nothing").display().to_string();
        let err = run_env(&["--api-key-file", &missing], &[]).unwrap_err();
        assert!(err.contains("cannot read the API key from"), "{err}");
        // An empty credential is no key: whippet prints to the console.
        std::fs::write(&key, "\n").unwrap();
        let c = run_env(&[], &[("CREDENTIALS_DIRECTORY", &d)]).unwrap();
        assert_eq!(
            (c.forwarding.api_key.0.as_str(), c.forwarding.intake_url),
            ("", None)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_host_name_follows_the_agents_order_and_says_which_rule_gave_it() {
        let file = File::new("hostname", "\n");
        let named = File::new("hostname2", "from-file\nsecond line\n");
        let m = machine_hostname();
        let node = ("DD_KUBERNETES_KUBELET_NODENAME", "node-7");
        type Case<'a> = (Vec<(&'a str, &'a str)>, String, &'a str);
        let cases: Vec<Case> = vec![
            (vec![], m.clone(), "this machine's host name"),
            (
                vec![node],
                "node-7".into(),
                "the Kubernetes node name (DD_KUBERNETES_KUBELET_NODENAME)",
            ),
            (
                vec![node, ("DD_CLUSTER_NAME", "prod-eu1")],
                "node-7-prod-eu1".into(),
                "the Kubernetes node name and cluster name",
            ),
            (
                vec![node, ("DD_HOSTNAME_FILE", named.arg())],
                "from-file".into(),
                "--hostname-file (DD_HOSTNAME_FILE)",
            ),
            (
                vec![
                    node,
                    ("DD_HOSTNAME_FILE", named.arg()),
                    ("DD_HOSTNAME", "given"),
                ],
                "given".into(),
                "--hostname (DD_HOSTNAME)",
            ),
            // An empty file falls through to the next rule, with a warning.
            (
                vec![("DD_HOSTNAME_FILE", file.arg())],
                m.clone(),
                "this machine's host name",
            ),
        ];
        for (env, host, rule) in cases {
            let c = run_env(&[], &env).unwrap();
            assert_eq!(
                (c.aggregation.hostname.as_str(), c.aggregation.hostname_rule),
                (host.as_str(), rule),
                "{env:?}"
            );
        }
        let c = run_env(&[], &[("DD_HOSTNAME_FILE", file.arg())]).unwrap();
        assert!(c.warnings[0].contains("is empty"), "{:?}", c.warnings);
        let c = run_env(&[], &[("DD_HOSTNAME_FQDN", "true")]).unwrap();
        assert_eq!(
            c.aggregation.hostname,
            resolve::fqdn(&m).unwrap_or(m.clone())
        );
        let err = run_env(&[], &[node, ("DD_CLUSTER_NAME", "Prod_1")]).unwrap_err();
        assert!(
            err.contains("DD_CLUSTER_NAME (environment): 'Prod_1' is not a cluster name"),
            "{err}"
        );
        let Command::Check(report) = parse_env(&["--check-config"], &[node]).unwrap() else {
            panic!("not a report");
        };
        assert!(
            report.contains("=> hostname              node-7 (from the Kubernetes node name (DD_KUBERNETES_KUBELET_NODENAME))\n"),
            "{report}"
        );
    }

    #[test]
    fn quotes_and_escapes_in_the_file() {
        assert_eq!(resolve::unquote("plain"), Some("plain".into()));
        assert_eq!(resolve::unquote("'a b'"), Some("a b".into()));
        assert_eq!(
            resolve::unquote(r#""a \"b\" \\c""#),
            Some(r#"a "b" \c"#.into())
        );
        assert_eq!(resolve::unquote(r#""open"#), None);
        assert_eq!(resolve::unquote(r#""a" trailing"#), None);
        assert_eq!(resolve::unquote("'open"), None);
    }
}
