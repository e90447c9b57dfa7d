//! Configuration: command-line flags (getopts) → a validated [`Config`]. Every setting says what
//! it controls, the trade-off, and its default; every error names the flag to change.

use std::net::SocketAddr;
use std::path::PathBuf;

use getopts::Options;

use crate::flush::Aggregate;
use crate::serializer::{Compression, SeriesApi};
use crate::Error;

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

/// Largest `--buffer-size`: the largest UDP payload, and what one frame may carry.
pub const MAX_BUFFER_SIZE: usize = 65536;

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
    pub event_backlog: usize,
    /// Where payloads go (scheme://host[:port]); `None` prints to the console instead.
    pub intake_url: Option<String>,
    pub api_key: ApiKey,
    pub series_api: SeriesApi,
    pub compression: Compression,
    pub retry_queue_bytes: usize,
    pub forwarder_threads: usize,
    pub request_timeout_ms: u64,
    pub retry_base_ms: u64,
    pub shutdown_timeout_ms: u64,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    Help(String),
    Version,
}

fn options() -> Options {
    let mut o = Options::new();
    o.optmulti("", "udp", "UDP address to listen on, or 'off'. Binding a non-loopback address exposes whippet to the network. Default 127.0.0.1:8125", "ADDR");
    o.optmulti("", "udp-readers", "UDP sockets bound with SO_REUSEPORT, one reader thread each; more readers spread load across cores. Default 1", "N");
    o.optmulti("", "so-rcvbuf", "Receive buffer for the UDP and Unix datagram sockets, in bytes; larger absorbs bursts, capped by net.core.rmem_max. 0 keeps the OS default. Default 4194304", "BYTES");
    o.optmulti(
        "",
        "socket",
        "Unix datagram socket path. Default off",
        "PATH",
    );
    o.optmulti("", "socket-mode", "File mode of the Unix sockets, octal. Default 0722 (anyone may write, nobody else may read)", "OCTAL");
    o.optmulti(
        "",
        "stream-socket",
        "Unix stream socket path (4-byte little-endian length framing). Default off",
        "PATH",
    );
    o.optmulti(
        "",
        "stream-max-connections",
        "Most concurrent stream connections; one thread each. Default 256",
        "N",
    );
    o.optmulti("", "buffer-size", "Largest datagram or stream frame, in bytes; longer datagrams are counted as truncated and dropped. Max 65536. Default 8192", "BYTES");
    o.optmulti("", "queue-size", "Packet batches (up to 32 packets each) waiting for workers; more absorbs bursts at the cost of memory (queue-size × 32 × buffer-size at worst). Default 32 (8 MiB at worst with the default buffer size)", "N");
    o.optmulti(
        "",
        "workers",
        "Parser threads. Default: the number of CPUs",
        "N",
    );
    o.optmulti("", "shards", "Aggregation shards (mutex-guarded); more reduce lock contention between workers. Default 16", "N");
    o.optmulti(
        "",
        "tags",
        "Extra tags added to every metric, event and service check, comma-separated. Default none",
        "TAGS",
    );
    o.optmulti(
        "",
        "hostname",
        "Host reported for data without a host: tag. Default: this machine's hostname",
        "NAME",
    );
    o.optmulti(
        "",
        "bucket-seconds",
        "Aggregation bucket length in seconds. Default 10",
        "N",
    );
    o.optmulti(
        "",
        "histogram-aggregates",
        "Histogram aggregates: max, min, median, avg, sum, count. Default max,median,avg,count",
        "LIST",
    );
    o.optmulti(
        "",
        "histogram-percentiles",
        "Histogram percentiles as fractions. Default 0.95",
        "LIST",
    );
    o.optmulti(
        "",
        "expiry-seconds",
        "Counters report 0 for this long after their last sample. Default 300",
        "N",
    );
    o.optmulti(
        "",
        "context-expiry-seconds",
        "Other contexts are freed once idle this long. Default 20",
        "N",
    );
    o.optmulti("", "event-backlog", "Most events plus service checks held between two flushes; beyond, they are dropped and counted. Default 10000", "N");
    o.optmulti("", "dd-url", "Intake URL (http:// or https://) that payloads are sent to. Default: https://app.SITE when an API key is set; otherwise whippet prints to the console", "URL");
    o.optmulti(
        "",
        "site",
        "Datadog site used to build the intake URL. Default datadoghq.com",
        "SITE",
    );
    o.optmulti("", "api-key", "Datadog API key sent with every payload; DD_API_KEY in the environment is used when absent. Never logged", "KEY");
    o.optmulti(
        "",
        "series-api",
        "Series API: v2 (protobuf) or v1 (JSON, legacy). Default v2",
        "VERSION",
    );
    o.optmulti(
        "",
        "compression",
        "Payload compression: zstd (level 1), deflate (zlib) or none. Default zstd",
        "KIND",
    );
    o.optmulti("", "retry-queue-bytes", "Bytes of payloads that may wait for the intake (new and failed); beyond, the oldest is dropped and counted. Default 15728640", "BYTES");
    o.optmulti(
        "",
        "forwarder-threads",
        "Concurrent requests to the intake. Default 2",
        "N",
    );
    o.optmulti("", "request-timeout-ms", "Timeout of one request to the intake, in milliseconds; a timeout is retried. Default 20000", "MS");
    o.optmulti("", "retry-base-ms", "First retry delay in milliseconds; each further failure doubles it, up to 32 times. Default 2000", "MS");
    o.optmulti("", "shutdown-timeout-ms", "How long the final flush may take to reach the intake at shutdown, in milliseconds; what is left is dropped and counted. Default 10000", "MS");
    o.optflag("h", "help", "Print this help and exit");
    o.optflag("V", "version", "Print the version and exit");
    o
}

/// Parses the command line (without the program name).
pub fn parse(args: &[String]) -> Result<Command, Error> {
    let opts = options();
    let m = opts
        .parse(args)
        .map_err(|e| Error::Config(format!("{e} (see --help)")))?;
    if m.opt_present("help") {
        let brief = "Usage: whippet [OPTIONS]\n\nA fast, lean DogStatsD server.";
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
    // A repeated flag: the last one wins, so wrappers can append overrides.
    let get = |name: &str| m.opt_strs(name).pop();
    let udp = match get("udp").as_deref() {
        Some("off") => None,
        Some(addr) => Some(addr.parse().map_err(|_| {
            Error::Config(format!(
                "--udp: '{addr}' is not an address like 127.0.0.1:8125 or 'off'"
            ))
        })?),
        None => Some(SocketAddr::from(([127, 0, 0, 1], 8125))),
    };
    let workers_default = std::thread::available_parallelism().map_or(2, |n| n.get());
    let config = Config {
        udp,
        udp_readers: number(get("udp-readers"), "--udp-readers", 1, 1, 64)?,
        so_rcvbuf: number(get("so-rcvbuf"), "--so-rcvbuf", 4 << 20, 0, 1 << 30)?,
        socket: get("socket").map(PathBuf::from),
        socket_mode: octal(get("socket-mode"), "--socket-mode", 0o722)?,
        stream_socket: get("stream-socket").map(PathBuf::from),
        stream_max_connections: number(
            get("stream-max-connections"),
            "--stream-max-connections",
            256,
            1,
            65536,
        )?,
        buffer_size: number(
            get("buffer-size"),
            "--buffer-size",
            8192,
            512,
            MAX_BUFFER_SIZE,
        )?,
        queue_size: number(get("queue-size"), "--queue-size", 32, 1, 1 << 20)?,
        workers: number(get("workers"), "--workers", workers_default, 1, 256)?,
        shards: number(get("shards"), "--shards", 16, 1, 4096)?,
        tags: get("tags")
            .map(|t| {
                t.split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        hostname: match get("hostname") {
            Some(h) => h,
            None => machine_hostname(),
        },
        bucket_seconds: number(get("bucket-seconds"), "--bucket-seconds", 10, 1, 1 << 40)?,
        histogram_aggregates: aggregates(get("histogram-aggregates"))?,
        histogram_percentiles: percentiles(get("histogram-percentiles"))?,
        expiry_seconds: number(get("expiry-seconds"), "--expiry-seconds", 300, 0, 1 << 40)?,
        context_expiry_seconds: number(
            get("context-expiry-seconds"),
            "--context-expiry-seconds",
            20,
            0,
            1 << 40,
        )?,
        event_backlog: number(
            get("event-backlog"),
            "--event-backlog",
            10_000,
            1,
            10_000_000,
        )?,
        intake_url: None,
        api_key: ApiKey(
            get("api-key")
                .or_else(|| std::env::var("DD_API_KEY").ok())
                .unwrap_or_default(),
        ),
        series_api: match get("series-api").as_deref() {
            None | Some("v2") => SeriesApi::V2,
            Some("v1") => SeriesApi::V1,
            Some(other) => {
                return Err(Error::Config(format!(
                    "--series-api: '{other}' is not v1 or v2"
                )))
            }
        },
        compression: match get("compression") {
            None => Compression::Zstd,
            Some(c) => Compression::parse(&c).ok_or_else(|| {
                Error::Config(format!("--compression: '{c}' is not zstd, deflate or none"))
            })?,
        },
        retry_queue_bytes: number(
            get("retry-queue-bytes"),
            "--retry-queue-bytes",
            15 << 20,
            0,
            1 << 40,
        )?,
        forwarder_threads: number(get("forwarder-threads"), "--forwarder-threads", 2, 1, 64)?,
        request_timeout_ms: number(
            get("request-timeout-ms"),
            "--request-timeout-ms",
            20_000,
            1,
            3_600_000,
        )?,
        retry_base_ms: number(get("retry-base-ms"), "--retry-base-ms", 2000, 1, 3_600_000)?,
        shutdown_timeout_ms: number(
            get("shutdown-timeout-ms"),
            "--shutdown-timeout-ms",
            10_000,
            0,
            3_600_000,
        )?,
    };
    let mut config = config;
    config.intake_url = intake_url(get("dd-url"), get("site"), !config.api_key.0.is_empty())?;
    Ok(Command::Run(Box::new(config)))
}

/// `--dd-url`, else `https://app.SITE` when there is an API key, else none (console).
fn intake_url(
    url: Option<String>,
    site: Option<String>,
    have_key: bool,
) -> Result<Option<String>, Error> {
    if let Some(url) = url {
        let url = url.trim_end_matches('/').to_string();
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        return match rest {
            Some(host) if !host.is_empty() && !host.contains('/') => Ok(Some(url)),
            _ => Err(Error::Config(format!(
                "--dd-url: '{url}' is not like https://app.datadoghq.com or http://127.0.0.1:8080 (scheme, host, optional port, no path)"
            ))),
        };
    }
    let site = site.unwrap_or_else(|| "datadoghq.com".into());
    if site.is_empty() || site.contains('/') {
        return Err(Error::Config(format!(
            "--site: '{site}' is not a site like datadoghq.com"
        )));
    }
    Ok(have_key.then(|| format!("https://app.{site}")))
}

fn number<T>(value: Option<String>, flag: &str, default: T, min: T, max: T) -> Result<T, Error>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(s) = value else { return Ok(default) };
    let v: T = s
        .parse()
        .map_err(|_| Error::Config(format!("{flag}: '{s}' is not a whole number")))?;
    if v < min || v > max {
        return Err(Error::Config(format!(
            "{flag}: {v} is outside {min}..={max}"
        )));
    }
    Ok(v)
}

fn octal(value: Option<String>, flag: &str, default: u32) -> Result<u32, Error> {
    let Some(s) = value else { return Ok(default) };
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| Error::Config(format!("{flag}: '{s}' is not an octal file mode like 0722")))
}

fn aggregates(value: Option<String>) -> Result<Vec<Aggregate>, Error> {
    let list = value.unwrap_or_else(|| "max,median,avg,count".into());
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            Aggregate::parse(s.trim()).ok_or_else(|| {
                Error::Config(format!(
                    "--histogram-aggregates: '{s}' is not one of max, min, median, avg, sum, count"
                ))
            })
        })
        .collect()
}

/// "0.95" → 95: the Agent's fraction notation, turned into whole percentiles 1..=100.
fn percentiles(value: Option<String>) -> Result<Vec<u32>, Error> {
    let list = value.unwrap_or_else(|| "0.95".into());
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .ok()
                .map(|f| (f * 100.0).round())
                .filter(|p| (1.0..=100.0).contains(p))
                .map(|p| p as u32)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "--histogram-percentiles: '{s}' is not a fraction between 0.01 and 1 like 0.95"
                    ))
                })
        })
        .collect()
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

    fn run(args: &[&str]) -> Result<Config, String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match parse(&args) {
            Ok(Command::Run(c)) => Ok(*c),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
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
        assert_eq!(
            c.histogram_aggregates,
            [
                Aggregate::Max,
                Aggregate::Median,
                Aggregate::Avg,
                Aggregate::Count
            ]
        );
        assert_eq!(c.histogram_percentiles, [95]);
        assert_eq!((c.expiry_seconds, c.context_expiry_seconds), (300, 20));
        assert_eq!(c.hostname, machine_hostname());
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
            (vec!["--bogus"], "Unrecognized option: 'bogus'"),
            (vec!["stray"], "unexpected argument 'stray'"),
        ];
        for (args, want) in cases {
            let err = run(&args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }
}
