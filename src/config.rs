//! Configuration: flags, a `KEY=VALUE` config file and the Datadog environment variables →
//! a validated [`Config`]. Every setting is one row of [`SETTINGS`]: its long flag, its
//! variable name (the Agent's where the Agent has one), and its help. Precedence: flag >
//! config file > environment > default. Every error names the flag or variable to change.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use getopts::{HasArg, Occur, Options};

use crate::flush::Aggregate;
pub use crate::forwarder::ApiKey;
use crate::log::Level;
use crate::serializer::{Compression, SeriesApi};
use crate::Error;

/// Largest `--buffer-size`: the largest UDP payload, and what one frame may carry.
pub const MAX_BUFFER_SIZE: usize = 65536;

/// One setting: `--flag`, `VARIABLE` (environment and config file), value hint, help.
pub struct Setting {
    pub flag: &'static str,
    pub var: &'static str,
    pub hint: &'static str,
    pub help: &'static str,
}

const fn s(
    flag: &'static str,
    var: &'static str,
    hint: &'static str,
    help: &'static str,
) -> Setting {
    Setting {
        flag,
        var,
        hint,
        help,
    }
}

/// Every setting whippet has, in `--help` order.
pub const SETTINGS: &[Setting] = &[
    s("udp", "WHIPPET_UDP", "ADDR", "UDP address to listen on, or 'off'; when set, overrides --bind-host, --port and --non-local-traffic. Binding a non-loopback address exposes whippet to the network. Default 127.0.0.1:8125"),
    s("bind-host", "DD_BIND_HOST", "HOST", "IP address (or localhost) the UDP listener binds. Default 127.0.0.1"),
    s("port", "DD_DOGSTATSD_PORT", "PORT", "UDP port; 0 turns UDP off (the Agent's meaning). Default 8125"),
    s("non-local-traffic", "DD_DOGSTATSD_NON_LOCAL_TRAFFIC", "BOOL", "Listen for UDP on every interface (0.0.0.0) instead of --bind-host. Default false"),
    s("udp-readers", "WHIPPET_UDP_READERS", "N", "UDP sockets bound with SO_REUSEPORT, one reader thread each; more readers spread load across cores. Default 1"),
    s("so-rcvbuf", "DD_DOGSTATSD_SO_RCVBUF", "BYTES", "Receive buffer for the UDP and Unix datagram sockets, in bytes; larger absorbs bursts, capped by net.core.rmem_max. 0 keeps the OS default. Default 4194304"),
    s("socket", "DD_DOGSTATSD_SOCKET", "PATH", "Unix datagram socket path. Default off"),
    s("socket-mode", "WHIPPET_SOCKET_MODE", "OCTAL", "File mode of the Unix sockets, octal; a world-readable mode is refused. Default 0722 (anyone may write, nobody else may read)"),
    s("stream-socket", "DD_DOGSTATSD_STREAM_SOCKET", "PATH", "Unix stream socket path (4-byte little-endian length framing). Default off"),
    s("stream-max-connections", "WHIPPET_STREAM_MAX_CONNECTIONS", "N", "Most concurrent stream connections; one thread each. Default 256"),
    s("stream-idle-timeout", "WHIPPET_STREAM_IDLE_TIMEOUT", "DURATION", "Close a stream connection that sends nothing for this long (so idle clients cannot hold every slot); 0 never closes. Clients reconnect on their next write. Default 5m"),
    s("buffer-size", "DD_DOGSTATSD_BUFFER_SIZE", "BYTES", "Largest datagram or stream frame, in bytes; longer datagrams are counted as truncated and dropped. Max 65536. Default 8192"),
    s("queue-size", "DD_DOGSTATSD_QUEUE_SIZE", "N", "Packet batches (up to 32 packets each) waiting for workers; more absorbs UDP bursts at the cost of memory (queue-size × 32 × buffer-size at worst). Unix socket readers queue at most 2 per worker and then wait. Default 32 (8 MiB at worst with the default buffer size)"),
    s("workers", "DD_DOGSTATSD_WORKERS_COUNT", "N", "Parser threads; steady traffic far below what one core parses uses less CPU with 1, more absorb bursts. Default: the number of CPUs"),
    s("shards", "DD_DOGSTATSD_PIPELINE_COUNT", "N", "Aggregation shards (mutex-guarded); more reduce lock contention between workers. Default 16"),
    s("tags", "DD_DOGSTATSD_TAGS", "TAGS", "Extra tags added to every metric, event and service check: comma-separated on the command line, space- or comma-separated in the environment and config file. Reloaded on SIGHUP. Default none"),
    s("hostname", "DD_HOSTNAME", "NAME", "Host reported for data without a host: tag. Default: this machine's hostname"),
    s("bucket-seconds", "WHIPPET_BUCKET_SECONDS", "N", "Aggregation bucket length in seconds. Default 10"),
    s("histogram-aggregates", "DD_HISTOGRAM_AGGREGATES", "LIST", "Histogram aggregates: max, min, median, avg, sum, count (comma- or space-separated). Default max,median,avg,count"),
    s("histogram-percentiles", "DD_HISTOGRAM_PERCENTILES", "LIST", "Histogram percentiles as fractions (comma- or space-separated). Default 0.95"),
    s("expiry-seconds", "DD_DOGSTATSD_EXPIRY_SECONDS", "N", "Counters report 0 for this long after their last sample. Default 300"),
    s("context-expiry-seconds", "DD_DOGSTATSD_CONTEXT_EXPIRY_SECONDS", "N", "Other contexts are freed once idle this long. Default 20"),
    s("context-limit", "WHIPPET_CONTEXT_LIMIT", "N", "Most live metric contexts; a sample that would create one more is dropped and counted (whippet_dropped_total{reason=context_limit}), existing contexts keep working. Bounds memory against unbounded tag values (about 0.7 KiB per context of ~2 KB messages). Default 500000"),
    s("event-backlog", "WHIPPET_EVENT_BACKLOG", "N", "Most events plus service checks held between two flushes; beyond, they are dropped and counted. Default 10000"),
    s("dd-url", "DD_DD_URL", "URL", "Intake URL (http:// or https://) that payloads are sent to. Reloaded on SIGHUP. Default: https://app.SITE when an API key is set; otherwise whippet prints to the console"),
    s("site", "DD_SITE", "SITE", "Datadog site used to build the intake URL. Reloaded on SIGHUP. Default datadoghq.com"),
    s("api-key", "DD_API_KEY", "KEY", "Datadog API key sent with every payload. Reloaded on SIGHUP. Never logged or printed"),
    s("series-api", "WHIPPET_SERIES_API", "VERSION", "Series API: v2 (protobuf) or v1 (JSON, legacy). Default v2"),
    s("compression", "DD_SERIALIZER_COMPRESSOR_KIND", "KIND", "Payload compression: zstd (level 1), zlib (also called deflate) or none. Default zstd"),
    s("retry-queue-bytes", "WHIPPET_RETRY_QUEUE_BYTES", "BYTES", "Bytes of payloads that may wait for the intake (new and failed); beyond, the oldest is dropped and counted. Default 15728640"),
    s("retry-dir", "WHIPPET_RETRY_DIR", "DIR", "Directory where payloads that no longer fit --retry-queue-bytes (and those still waiting at shutdown) are kept until the intake takes them, oldest first, across restarts. Created if missing. Default off (they are dropped and counted)"),
    s("retry-dir-bytes", "WHIPPET_RETRY_DIR_BYTES", "BYTES", "Most bytes kept in --retry-dir; beyond, the oldest payload on disk is dropped and counted. Default 268435456 (256 MiB)"),
    s("forwarder-threads", "WHIPPET_FORWARDER_THREADS", "N", "Concurrent requests to the intake. Default 2"),
    s("request-timeout-ms", "WHIPPET_REQUEST_TIMEOUT_MS", "MS", "Timeout of one request to the intake, in milliseconds; a timeout is retried. Default 20000"),
    s("retry-base-ms", "WHIPPET_RETRY_BASE_MS", "MS", "First retry delay in milliseconds; each further failure doubles it, up to 32 times. Default 2000"),
    s("shutdown-timeout", "WHIPPET_SHUTDOWN_TIMEOUT", "DURATION", "How long the final flush may take to reach the intake at shutdown (10s, 500ms, 1m; a bare number is seconds); what is left is dropped and counted. Default 10s"),
    s("log-level", "DD_LOG_LEVEL", "LEVEL", "Least severe log lines written: error, warn, info or debug (the Agent's trace, critical and off are accepted). Reloaded on SIGHUP. Default info"),
    s("allow-root", "WHIPPET_ALLOW_ROOT", "BOOL", "Run even as root. whippet needs no privilege: run it as its own user (the packaged service uses User=whippet). Default false"),
    s("status", "WHIPPET_STATUS", "ADDR", "Serve /status (JSON), /metrics (Prometheus) and /contexts?top=N over HTTP on this address; a bare port means 127.0.0.1:PORT. Default off"),
];

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// UDP address, or `None` for `--udp off`.
    pub udp: Option<SocketAddr>,
    pub udp_readers: usize,
    /// Requested SO_RCVBUF for UDP and the Unix datagram socket (0 = OS default).
    pub so_rcvbuf: usize,
    pub socket: Option<PathBuf>,
    pub socket_mode: u32,
    pub stream_socket: Option<PathBuf>,
    pub stream_max_connections: usize,
    /// Idle stream connections are closed after this long; 0 never.
    pub stream_idle_timeout_ms: u64,
    pub buffer_size: usize,
    pub queue_size: usize,
    pub workers: usize,
    pub shards: usize,
    pub tags: Vec<String>,
    pub hostname: String,
    pub bucket_seconds: i64,
    pub histogram_aggregates: Vec<Aggregate>,
    pub histogram_percentiles: Vec<u32>,
    pub expiry_seconds: i64,
    pub context_expiry_seconds: i64,
    pub context_limit: usize,
    pub event_backlog: usize,
    /// Where payloads go (scheme://host[:port]); `None` prints to the console instead.
    pub intake_url: Option<String>,
    pub api_key: ApiKey,
    pub series_api: SeriesApi,
    pub compression: Compression,
    pub retry_queue_bytes: usize,
    /// `--retry-dir`: where payloads spill to disk; `None` drops them instead.
    pub retry_dir: Option<PathBuf>,
    pub retry_dir_bytes: u64,
    pub forwarder_threads: usize,
    pub request_timeout_ms: u64,
    pub retry_base_ms: u64,
    pub shutdown_timeout_ms: u64,
    pub log_level: Level,
    pub status: Option<SocketAddr>,
    pub allow_root: bool,
    /// `--config FILE`, re-read on SIGHUP.
    pub config_file: Option<PathBuf>,
    /// Where each setting came from, in [`SETTINGS`] order: (flag, value as given, source).
    /// The API key's value is never kept here.
    pub sources: Vec<(&'static str, String, Source)>,
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
        let help = format!("{} [{}]", s.help, s.var);
        if s.hint == "BOOL" {
            // `--allow-root` alone means true; `--allow-root=false` is accepted too.
            o.opt("", s.flag, &help, s.hint, HasArg::Maybe, Occur::Multi);
        } else {
            o.optmulti("", s.flag, &help, s.hint);
        }
    }
    o.optmulti("", "config", "Read settings from FILE: KEY=VALUE lines named like the environment variables in brackets above ('#' comments, blank lines and quotes allowed), so one file serves as whippet's config and as a systemd EnvironmentFile. Re-read on SIGHUP", "FILE");
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
pub fn parse_with(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Command, Error> {
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
        Some(path) => read_file(path, &mut errors),
        None => HashMap::new(),
    };
    let mut r = Resolver {
        m: &m,
        file,
        file_path: config_file.clone(),
        env,
        errors,
        sources: Vec::new(),
    };
    let config = r.config();
    if let Some(path) = &config_file {
        r.check_unknown_keys(path);
    }
    let Resolver {
        errors, sources, ..
    } = r;
    if !errors.is_empty() {
        return Err(Error::Config(errors.join("\n")));
    }
    let config = Config {
        config_file,
        sources,
        ..config
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
    let intake = c
        .intake_url
        .as_deref()
        .unwrap_or("none: printing to stdout");
    out.push_str(&format!("{:<24} {intake}\n", "=> intake"));
    let udp = c.udp.map_or("off".to_string(), |a| a.to_string());
    out.push_str(&format!("{:<24} {udp}\n", "=> udp"));
    out
}

/// Reads `KEY=VALUE` lines: `#` comments, blank lines, and values in single or double quotes.
fn read_file(path: &Path, errors: &mut Vec<String>) -> HashMap<String, (String, usize)> {
    let mut out = HashMap::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errors.push(format!("--config: cannot read {}: {e}", path.display()));
            return out;
        }
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            errors.push(format!(
                "{}:{}: '{line}' is not KEY=VALUE",
                path.display(),
                i + 1
            ));
            continue;
        };
        match unquote(value.trim()) {
            Some(v) => {
                out.insert(key.trim().to_string(), (v, i + 1));
            }
            None => errors.push(format!(
                "{}:{}: the value of {} has an unterminated quote",
                path.display(),
                i + 1,
                key.trim()
            )),
        }
    }
    out
}

/// `"a b"` → `a b` (with `\"` and `\\` escapes), `'a b'` → `a b`, `a` → `a`.
fn unquote(v: &str) -> Option<String> {
    if let Some(inner) = v.strip_prefix('\'') {
        return inner.strip_suffix('\'').map(str::to_string);
    }
    let Some(inner) = v.strip_prefix('"') else {
        return Some(v.to_string());
    };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return chars.as_str().is_empty().then_some(out),
            c => out.push(c),
        }
    }
    None
}

struct Resolver<'a> {
    m: &'a getopts::Matches,
    file: HashMap<String, (String, usize)>,
    file_path: Option<PathBuf>,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<String>,
    sources: Vec<(&'static str, String, Source)>,
}

fn setting(flag: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.flag == flag)
        .expect("every flag asked for is in SETTINGS")
}

impl Resolver<'_> {
    /// The raw value with its source and the name to blame in an error.
    fn raw(&self, flag: &str) -> Option<(String, Source, String)> {
        let s = setting(flag);
        // A repeated flag: the last one wins, so wrappers can append overrides.
        if let Some(v) = self.m.opt_strs(flag).pop() {
            return Some((v, Source::Flag, format!("--{flag}")));
        }
        if self.m.opt_present(flag) {
            return Some(("true".into(), Source::Flag, format!("--{flag}")));
        }
        if let (Some((v, line)), Some(path)) = (self.file.get(s.var), &self.file_path) {
            let source = Source::File {
                path: path.clone(),
                line: *line,
            };
            let name = format!("{} ({source})", s.var);
            return Some((v.clone(), source, name));
        }
        if let Some(v) = (self.env)(s.var) {
            return Some((v, Source::Environment, format!("{} (environment)", s.var)));
        }
        None
    }

    /// The setting parsed by `parse`, or `default` (also after an error, which is recorded).
    fn get<T>(
        &mut self,
        flag: &'static str,
        default: T,
        parse: impl Fn(&str, &str) -> Result<T, String>,
    ) -> T {
        match self.raw(flag) {
            Some((v, source, name)) => {
                let shown = if flag == "api-key" {
                    "(redacted)".into()
                } else {
                    v.clone()
                };
                self.sources.push((flag, shown, source));
                match parse(&v, &name) {
                    Ok(t) => t,
                    Err(e) => {
                        self.errors.push(e);
                        default
                    }
                }
            }
            None => {
                self.sources.push((flag, "".into(), Source::Default));
                default
            }
        }
    }

    fn number<T>(&mut self, flag: &'static str, default: T, min: T, max: T) -> T
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        self.get(flag, default, |v, name| {
            let n: T = v
                .trim()
                .parse()
                .map_err(|_| format!("{name}: '{v}' is not a whole number"))?;
            if n < min || n > max {
                return Err(format!("{name}: {n} is outside {min}..={max}"));
            }
            Ok(n)
        })
    }

    fn string(&mut self, flag: &'static str) -> Option<String> {
        self.get(flag, None, |v, _| Ok(Some(v.to_string())))
    }

    fn config(&mut self) -> Config {
        let udp_flag = self.get("udp", None, |v, name| {
            Ok(Some(match v {
                "off" => None,
                addr => Some(addr.parse::<SocketAddr>().map_err(|_| {
                    format!("{name}: '{addr}' is not an address like 127.0.0.1:8125 or 'off'")
                })?),
            }))
        });
        let bind_host = self
            .string("bind-host")
            .unwrap_or_else(|| "127.0.0.1".into());
        let port: u16 = self.number("port", 8125, 0, 65535);
        let non_local = self.get("non-local-traffic", false, boolean);
        let udp = match udp_flag {
            Some(udp) => udp,
            None if port == 0 => None,
            None if non_local => Some(SocketAddr::from(([0, 0, 0, 0], port))),
            None => match resolve(&bind_host, port) {
                Ok(a) => Some(a),
                Err(e) => {
                    let name = self.raw("bind-host").map_or("--bind-host".into(), |r| r.2);
                    self.errors.push(format!("{name}: {e}"));
                    None
                }
            },
        };
        let workers_default = std::thread::available_parallelism().map_or(2, |n| n.get());
        let tags_flag = self.m.opt_present("tags");
        let api_key = self.string("api-key").unwrap_or_default();
        let dd_url = self.get("dd-url", None, |v, name| intake_base(v, name).map(Some));
        let site = self.get("site", "datadoghq.com".to_string(), |v, name| {
            if v.is_empty() || v.contains('/') {
                return Err(format!("{name}: '{v}' is not a site like datadoghq.com"));
            }
            Ok(v.to_string())
        });
        let mut c = Config {
            udp,
            udp_readers: self.number("udp-readers", 1, 1, 64),
            so_rcvbuf: self.number("so-rcvbuf", 4 << 20, 0, 1 << 30),
            socket: self.string("socket").map(PathBuf::from),
            socket_mode: self.get("socket-mode", 0o722, |v, name| {
                let mode = u32::from_str_radix(v.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| format!("{name}: '{v}' is not an octal file mode like 0722"))?;
                if mode & 0o004 != 0 {
                    return Err(format!(
                        "{name}: {mode:04o} would make the sockets world-readable; drop the 'other read' bit (like 0722 or 0720)"
                    ));
                }
                Ok(mode)
            }),
            stream_socket: self.string("stream-socket").map(PathBuf::from),
            stream_max_connections: self.number("stream-max-connections", 256, 1, 65536),
            stream_idle_timeout_ms: self.get("stream-idle-timeout", 300_000, duration_ms),
            buffer_size: self.number("buffer-size", 8192, 512, MAX_BUFFER_SIZE),
            queue_size: self.number("queue-size", 32, 1, 1 << 20),
            workers: self.number("workers", workers_default, 1, 256),
            shards: self.number("shards", 16, 1, 4096),
            tags: self.get("tags", Vec::new(), |v, _| {
                // The command line separates with commas; the Agent's DD_DOGSTATSD_TAGS with
                // spaces.
                let seps: &[char] = if tags_flag { &[','] } else { &[',', ' ', '\t'] };
                Ok(v.split(seps)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect())
            }),
            hostname: self.string("hostname").unwrap_or_else(machine_hostname),
            bucket_seconds: self.number("bucket-seconds", 10, 1, 1 << 40),
            histogram_aggregates: self.get(
                "histogram-aggregates",
                default_aggregates(),
                aggregates,
            ),
            histogram_percentiles: self.get("histogram-percentiles", vec![95], percentiles),
            expiry_seconds: self.number("expiry-seconds", 300, 0, 1 << 40),
            context_expiry_seconds: self.number("context-expiry-seconds", 20, 0, 1 << 40),
            context_limit: self.number("context-limit", 500_000, 1, 1 << 32),
            event_backlog: self.number("event-backlog", 10_000, 1, 10_000_000),
            intake_url: None,
            api_key: ApiKey(api_key),
            series_api: self.get("series-api", SeriesApi::V2, |v, name| match v {
                "v2" => Ok(SeriesApi::V2),
                "v1" => Ok(SeriesApi::V1),
                other => Err(format!("{name}: '{other}' is not v1 or v2")),
            }),
            compression: self.get("compression", Compression::Zstd, |v, name| {
                Compression::parse(&v.to_ascii_lowercase())
                    .ok_or_else(|| format!("{name}: '{v}' is not zstd, zlib, deflate or none"))
            }),
            retry_queue_bytes: self.number("retry-queue-bytes", 15 << 20, 0, 1 << 40),
            retry_dir: self.string("retry-dir").filter(|d| !d.is_empty()).map(PathBuf::from),
            retry_dir_bytes: self.number("retry-dir-bytes", 256 << 20, 0, 1 << 50),
            forwarder_threads: self.number("forwarder-threads", 2, 1, 64),
            request_timeout_ms: self.number("request-timeout-ms", 20_000, 1, 3_600_000),
            retry_base_ms: self.number("retry-base-ms", 2000, 1, 3_600_000),
            shutdown_timeout_ms: self.get("shutdown-timeout", 10_000, duration_ms),
            log_level: self.get("log-level", Level::Info, |v, name| {
                Level::parse(v).ok_or_else(|| {
                    format!("{name}: '{v}' is not one of error, warn, info, debug (or trace, critical, off)")
                })
            }),
            status: self.get("status", None, |v, name| {
                let addr = if v.chars().all(|c| c.is_ascii_digit()) {
                    format!("127.0.0.1:{v}")
                } else {
                    v.to_string()
                };
                addr.parse::<SocketAddr>().map(Some).map_err(|_| {
                    format!("{name}: '{v}' is not an address like 127.0.0.1:5000 or a port")
                })
            }),
            allow_root: self.get("allow-root", false, boolean),
            config_file: None,
            sources: Vec::new(),
        };
        // An explicit URL, else the site's intake when there is a key, else the console.
        c.intake_url =
            dd_url.or_else(|| (!c.api_key.0.is_empty()).then(|| format!("https://app.{site}")));
        c
    }

    /// A key in the config file that is not a setting is a typo until proven otherwise.
    fn check_unknown_keys(&mut self, path: &Path) {
        let mut unknown: Vec<_> = self
            .file
            .iter()
            .filter(|(k, _)| !SETTINGS.iter().any(|s| s.var == k.as_str()))
            .map(|(k, (_, line))| (*line, k.clone()))
            .collect();
        unknown.sort();
        for (line, key) in unknown {
            self.errors.push(format!(
                "{}:{line}: {key} is not a whippet setting (see the bracketed names in --help)",
                path.display()
            ));
        }
    }
}

/// An IP address, or `localhost` (the Agent's default): no DNS lookup at start-up.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let ip = match host {
        "localhost" => IpAddr::from([127, 0, 0, 1]),
        _ => host
            .parse::<IpAddr>()
            .map_err(|_| format!("'{host}' is not an IP address or localhost"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// The Agent's booleans: true/false, 1/0, yes/no, on/off, any case.
fn boolean(v: &str, name: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{name}: '{v}' is not true or false")),
    }
}

/// `10s`, `500ms`, `2m`, or a bare number of seconds → milliseconds.
fn duration_ms(v: &str, name: &str) -> Result<u64, String> {
    let v = v.trim();
    let (digits, scale) = if let Some(d) = v.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = v.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = v.strip_suffix('m') {
        (d, 60_000)
    } else {
        (v, 1000)
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|ms| *ms <= 3_600_000)
        .ok_or_else(|| format!("{name}: '{v}' is not a duration up to 1h like 10s, 500ms or 2m"))
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split([',', ' ', '\t']).filter(|s| !s.is_empty())
}

fn default_aggregates() -> Vec<Aggregate> {
    vec![
        Aggregate::Max,
        Aggregate::Median,
        Aggregate::Avg,
        Aggregate::Count,
    ]
}

fn aggregates(v: &str, name: &str) -> Result<Vec<Aggregate>, String> {
    list(v)
        .map(|s| {
            Aggregate::parse(s).ok_or_else(|| {
                format!("{name}: '{s}' is not one of max, min, median, avg, sum, count")
            })
        })
        .collect()
}

/// "0.95" → 95: the Agent's fraction notation, turned into whole percentiles 1..=100.
fn percentiles(v: &str, name: &str) -> Result<Vec<u32>, String> {
    list(v)
        .map(|s| {
            s.parse::<f64>()
                .ok()
                .map(|f| (f * 100.0).round())
                .filter(|p| (1.0..=100.0).contains(p))
                .map(|p| p as u32)
                .ok_or_else(|| {
                    format!("{name}: '{s}' is not a fraction between 0.01 and 1 like 0.95")
                })
        })
        .collect()
}

/// An intake URL: scheme, host and optional port, no path; a trailing slash is dropped.
fn intake_base(v: &str, name: &str) -> Result<String, String> {
    let url = v.trim_end_matches('/');
    let host = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match host {
        Some(host) if !host.is_empty() && !host.contains('/') => Ok(url.to_string()),
        _ => Err(format!(
            "{name}: '{url}' is not like https://app.datadoghq.com or http://127.0.0.1:8080 (scheme, host, optional port, no path)"
        )),
    }
}

/// This machine's hostname, or empty if it cannot be read.
pub fn machine_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.udp, Some("127.0.0.1:8125".parse().unwrap()));
        assert_eq!(c.socket, None);
        assert_eq!(c.socket_mode, 0o722);
        assert_eq!(c.buffer_size, 8192);
        assert_eq!(c.bucket_seconds, 10);
        assert_eq!(c.histogram_aggregates, default_aggregates());
        assert_eq!(c.histogram_percentiles, [95]);
        assert_eq!((c.expiry_seconds, c.context_expiry_seconds), (300, 20));
        assert_eq!(c.hostname, machine_hostname());
        assert_eq!(c.shutdown_timeout_ms, 10_000);
        assert_eq!(c.log_level, Level::Info);
        assert_eq!((c.status, c.intake_url.as_deref()), (None, None));
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
        assert_eq!(c.udp, None);
        assert_eq!(c.socket, Some(PathBuf::from("/tmp/s")));
        assert_eq!(c.socket_mode, 0o700);
        assert_eq!(c.tags, ["a:b", "c"]);
        assert_eq!(c.histogram_percentiles, [50, 99]);
        assert_eq!(c.histogram_aggregates, [Aggregate::Min, Aggregate::Sum]);
        assert_eq!(
            (c.hostname.as_str(), c.bucket_seconds, c.workers),
            ("h1", 1, 3)
        );
        assert_eq!(c.shutdown_timeout_ms, 250);
        assert_eq!(c.status, Some("127.0.0.1:5000".parse().unwrap()));
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
        assert_eq!(c.api_key, ApiKey("k1".into()));
        assert_eq!(c.intake_url.as_deref(), Some("https://app.datadoghq.eu"));
        assert_eq!(c.hostname, "envhost");
        assert_eq!(c.udp, Some("127.0.0.2:9125".parse().unwrap()));
        assert_eq!(c.socket, Some(PathBuf::from("/run/x.sock")));
        assert_eq!(c.stream_socket, Some(PathBuf::from("/run/y.sock")));
        assert_eq!(c.tags, ["env:prod", "team:a", "b"]);
        assert_eq!(
            (
                c.buffer_size,
                c.so_rcvbuf,
                c.queue_size,
                c.workers,
                c.shards
            ),
            (16384, 1 << 20, 64, 5, 4)
        );
        assert_eq!(c.histogram_aggregates, [Aggregate::Max, Aggregate::Min]);
        assert_eq!(c.histogram_percentiles, [50, 99]);
        assert_eq!((c.expiry_seconds, c.context_expiry_seconds), (60, 30));
        assert_eq!(c.compression, Compression::Deflate);
        assert_eq!(c.log_level, Level::Warn);
        assert!(c
            .sources
            .iter()
            .any(|s| s == &("api-key", "(redacted)".into(), Source::Environment)));
    }

    #[test]
    fn udp_follows_the_agents_port_and_non_local_rules() {
        let udp = |env: &[(&str, &str)]| run_env(&[], env).unwrap().udp;
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
        assert_eq!(c.buffer_size, 1024); // flag beats file and environment
        assert_eq!(c.hostname, "file host"); // file beats environment
        assert_eq!(c.tags, ["a:1", "b:2"]);
        assert_eq!(c.queue_size, 7); // environment beats default
        assert_eq!(c.workers, run(&[]).unwrap().workers); // default
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
        assert_eq!(report.lines().count(), SETTINGS.len() + 2);
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
            (
                vec!["--histogram-aggregates", "p99"],
                "--histogram-aggregates: 'p99' is not one of",
            ),
            (
                vec!["--histogram-percentiles", "95"],
                "--histogram-percentiles: '95' is not a fraction",
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
    fn quotes_and_escapes_in_the_file() {
        assert_eq!(unquote("plain"), Some("plain".into()));
        assert_eq!(unquote("'a b'"), Some("a b".into()));
        assert_eq!(unquote(r#""a \"b\" \\c""#), Some(r#"a "b" \c"#.into()));
        assert_eq!(unquote(r#""open"#), None);
        assert_eq!(unquote(r#""a" trailing"#), None);
        assert_eq!(unquote("'open"), None);
    }
}
