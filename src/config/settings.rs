//! Every setting whippet has, declared once: its flag, its variable (the Agent's name where
//! the Agent has the setting), what it controls, its default and, for numbers, its range.
//! `--help` is generated from this table; whippet(8), the packaged config file and the
//! README's settings table are checked against it by the test suite.

/// A setting's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// A value written as a user would write it; the resolver parses it exactly as it
    /// parses theirs.
    Value(&'static str),
    /// Not set unless given: the word says how that reads ("off", "none").
    Unset(&'static str),
    /// Computed at start; the text says from what.
    Derived(&'static str),
}

impl DefaultValue {
    /// As documentation writes it: `8192`, `off`, `the number of CPUs`.
    pub fn text(self) -> &'static str {
        match self {
            DefaultValue::Value(v) | DefaultValue::Unset(v) | DefaultValue::Derived(v) => v,
        }
    }

    /// The sentence `--help` and whippet(8) end a setting's description with.
    pub(crate) fn sentence(self) -> String {
        match self {
            DefaultValue::Value(v) | DefaultValue::Unset(v) => format!("Default {v}."),
            DefaultValue::Derived(t) => format!("Default: {t}."),
        }
    }
}

/// The most workers by default (`--workers`, "at most 4" in its default's text).
pub const DEFAULT_WORKERS_AT_MOST: usize = 4;

/// One setting.
#[derive(Debug)]
pub struct Setting {
    pub flag: &'static str,
    /// Environment variable and config file key.
    pub var: &'static str,
    /// The value's shape in `--help`: `N`, `BYTES`, `ADDR`, `BOOL` (a bare `--flag` is true).
    pub hint: &'static str,
    /// What it controls and the trade-off.
    pub help: &'static str,
    pub default: DefaultValue,
    /// Smallest and largest value of a number.
    pub range: Option<(u64, u64)>,
    /// SIGHUP applies a new value in place; any other setting needs a restart.
    pub reload: bool,
}

impl Setting {
    /// This setting is applied in place on SIGHUP.
    const fn reloadable(mut self) -> Setting {
        self.reload = true;
        self
    }

    /// What `--help` and whippet(8) say of it after its help: whether SIGHUP applies it, and
    /// its default.
    pub fn tail(&self) -> String {
        let reload = if self.reload {
            "Reloaded on SIGHUP. "
        } else {
            ""
        };
        format!("{reload}{}", self.default.sentence())
    }
}

const fn s(
    flag: &'static str,
    var: &'static str,
    hint: &'static str,
    default: DefaultValue,
    help: &'static str,
) -> Setting {
    Setting {
        flag,
        var,
        hint,
        help,
        default,
        range: None,
        reload: false,
    }
}

/// A number between `min` and `max`.
const fn n(
    flag: &'static str,
    var: &'static str,
    hint: &'static str,
    (default, min, max): (DefaultValue, u64, u64),
    help: &'static str,
) -> Setting {
    Setting {
        range: Some((min, max)),
        ..s(flag, var, hint, default, help)
    }
}

use DefaultValue::{Derived, Unset, Value};

/// Largest `--buffer-size`: the largest UDP payload, and what one frame may carry.
pub const MAX_BUFFER_SIZE: usize = 65536;

/// Every setting, in `--help` order.
pub const SETTINGS: &[Setting] = &[
    s("udp", "WHIPPET_UDP", "ADDR", Value("127.0.0.1:8125"), "UDP address to listen on, or 'off'; when set, overrides --bind-host, --port and --non-local-traffic. Binding a non-loopback address exposes whippet to the network."),
    s("bind-host", "DD_BIND_HOST", "HOST", Value("127.0.0.1"), "IP address (or localhost) the UDP listener binds."),
    n("port", "DD_DOGSTATSD_PORT", "PORT", (Value("8125"), 0, 65535), "UDP port; 0 turns UDP off (the Agent's meaning)."),
    s("non-local-traffic", "DD_DOGSTATSD_NON_LOCAL_TRAFFIC", "BOOL", Value("false"), "Listen for UDP on every interface (0.0.0.0) instead of --bind-host."),
    n("udp-readers", "WHIPPET_UDP_READERS", "N", (Value("1"), 1, 64), "UDP sockets bound with SO_REUSEPORT, one reader thread each; more readers spread load across cores. A reader whose socket has no backlog parses its batches itself, waking no worker."),
    n("so-rcvbuf", "DD_DOGSTATSD_SO_RCVBUF", "BYTES", (Value("4194304"), 0, 1 << 30), "Receive buffer for the UDP and Unix datagram sockets, in bytes; larger absorbs bursts, capped by net.core.rmem_max. 0 keeps the OS default."),
    s("socket", "DD_DOGSTATSD_SOCKET", "PATH", Unset("off"), "Unix datagram socket path."),
    n("unix-reader-priority", "WHIPPET_UNIX_READER_PRIORITY", "N", (Value("1"), 0, 99), "SCHED_FIFO priority of the Unix datagram socket's reader, 0 for normal scheduling. At real-time priority the reader takes a burst from a client that sends without blocking before the socket's small queue (net.unix.max_dgram_qlen) overflows, instead of waiting for its core; once it uses a quarter of a core or more over 50 ms it runs at normal priority, where a saturated reader costs less, until it uses less than a tenth. Needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least N (systemd: LimitRTPRIO=); when refused, whippet logs so once and runs the reader at normal priority."),
    s("socket-mode", "WHIPPET_SOCKET_MODE", "OCTAL", Value("0722"), "File mode of the Unix sockets, octal; 0722 lets anyone write and nobody else read. A world-readable mode is refused."),
    s("stream-socket", "DD_DOGSTATSD_STREAM_SOCKET", "PATH", Unset("off"), "Unix stream socket path (4-byte little-endian length framing)."),
    n("stream-max-connections", "WHIPPET_STREAM_MAX_CONNECTIONS", "N", (Value("256"), 1, 65536), "Most concurrent stream connections; one thread each."),
    s("stream-idle-timeout", "WHIPPET_STREAM_IDLE_TIMEOUT", "DURATION", Value("5m"), "Close a stream connection that sends nothing for this long, or takes this long over one frame (so idle or dripping clients cannot hold every slot); 0 never closes. Clients reconnect on their next write."),
    s("eol-required", "DD_DOGSTATSD_EOL_REQUIRED", "LIST", Unset("none"), "Transports whose packets must end every message with a newline: udp, uds (the Unix datagram and stream sockets), comma- or space-separated; a packet's unterminated last message is dropped and counted (whippet_dropped_total{reason=unterminated}), as from clients that may cut a message short."),
    s("forward-host", "DD_STATSD_FORWARD_HOST", "HOST", Unset("none"), "Another StatsD server that gets a copy of every packet received, as a UDP datagram; best effort: when the copy cannot keep up, packets are dropped from it and counted (whippet_mirror_packets_total{result=dropped}), never delaying whippet."),
    n("forward-port", "DD_STATSD_FORWARD_PORT", "PORT", (Value("0"), 0, 65535), "Port of the forward host; 0 mirrors nothing."),
    s("capture-dir", "WHIPPET_CAPTURE_DIR", "DIR", Unset("off"), "Directory where SIGUSR2 records the raw packets received (with transport and arrival time) to a new file, for whippet-blast replay; a second SIGUSR2 ends the capture early. Created if missing. Off: SIGUSR2 only logs that captures are off."),
    n("capture-seconds", "WHIPPET_CAPTURE_SECONDS", "N", (Value("60"), 1, 86_400), "How long a capture records."),
    n("capture-memory", "WHIPPET_CAPTURE_MEMORY", "BYTES", (Value("4194304"), 262_144, 1 << 30), "Bytes of copied packets waiting for the disk during a capture; when a slow or full disk leaves none free, packets are left out of the capture and counted (whippet_capture_packets_total{result=skipped}), never held."),
    n("capture-file-bytes", "WHIPPET_CAPTURE_FILE_BYTES", "BYTES", (Value("1073741824"), 4096, 1 << 50), "The most one capture file grows to; packets beyond are left out and counted."),
    n("buffer-size", "DD_DOGSTATSD_BUFFER_SIZE", "BYTES", (Value("8192"), 512, MAX_BUFFER_SIZE as u64), "Largest datagram or stream frame, in bytes (at most 65536); longer datagrams are counted as truncated and dropped."),
    n("queue-size", "DD_DOGSTATSD_QUEUE_SIZE", "N", (Value("16"), 1, 1 << 20), "Packet batches (up to 64 packets each) waiting for workers; more absorbs UDP bursts at the cost of memory (queue-size × 64 × buffer-size at worst: 8 MiB with the defaults). Unix socket readers queue at most 2 per worker and then wait; the Unix datagram reader first fills the rest of its batch from the socket."),
    n("workers", "DD_DOGSTATSD_WORKERS_COUNT", "N", (Derived("the number of CPUs, at most 4"), 1, 256), "Parser threads. One reader feeds about two busy workers, so more would mostly wait and contend for shards: raise it with --udp-readers, or when whippet_queue_depth stays near --queue-size or UDP queue_full drops are counted. Steady Unix datagram traffic far below what one core parses uses less CPU with 1, but then bursts from clients that send to the Unix socket without blocking lose more."),
    n("shards", "DD_DOGSTATSD_PIPELINE_COUNT", "N", (Value("16"), 1, 4096), "Aggregation shards (mutex-guarded); more reduce lock contention between workers."),
    s("tags", "DD_DOGSTATSD_TAGS", "TAGS", Unset("none"), "Extra tags added to every metric, event and service check: comma-separated on the command line, space- or comma-separated in the environment and config file.").reloadable(),
    s("host-tags", "DD_TAGS", "TAGS", Unset("none"), "The Agent's host tags, space- or comma-separated: added to every metric, event and service check like the extra tags, since whippet sends no host metadata to carry them.").reloadable(),
    s("env", "DD_ENV", "NAME", Unset("none"), "The Agent's env: the tag env:NAME joins every metric, event and service check.").reloadable(),
    s("hostname", "DD_HOSTNAME", "NAME", Derived("resolved as the Agent does off-cloud (see whippet(8), HOSTNAME)"), "Host reported for data without a host: tag."),
    s("hostname-file", "DD_HOSTNAME_FILE", "PATH", Unset("none"), "File whose first line is the host name, used when no host name is set."),
    s("hostname-fqdn", "DD_HOSTNAME_FQDN", "BOOL", Value("false"), "Use this machine's fully qualified domain name, when it has one, rather than its short host name."),
    s("kubelet-nodename", "DD_KUBERNETES_KUBELET_NODENAME", "NAME", Unset("none"), "The Kubernetes node whippet runs on (the downward API's spec.nodeName): the host name when none is set, followed by the cluster name."),
    s("cluster-name", "DD_CLUSTER_NAME", "NAME", Unset("none"), "Kubernetes cluster name, appended to the node name as NODE-CLUSTER: lowercase letters, digits, dots and hyphens, starting with a letter, at most 80."),
    n("bucket-seconds", "WHIPPET_BUCKET_SECONDS", "N", (Value("10"), 1, 1 << 40), "Aggregation bucket length in seconds."),
    s("histogram-aggregates", "DD_HISTOGRAM_AGGREGATES", "LIST", Value("max,median,avg,count"), "Histogram aggregates: max, min, median, avg, sum, count (comma- or space-separated)."),
    s("histogram-percentiles", "DD_HISTOGRAM_PERCENTILES", "LIST", Value("0.95"), "Histogram percentiles as fractions (comma- or space-separated)."),
    n("expiry-seconds", "DD_DOGSTATSD_EXPIRY_SECONDS", "N", (Value("300"), 0, 1 << 40), "Counters report 0 for this long after their last sample."),
    n("context-expiry-seconds", "DD_DOGSTATSD_CONTEXT_EXPIRY_SECONDS", "N", (Value("20"), 0, 1 << 40), "Other contexts are freed once idle this long."),
    n("context-limit", "WHIPPET_CONTEXT_LIMIT", "N", (Value("500000"), 1, 1 << 32), "Most live metric contexts; a sample that would create one more is dropped and counted (whippet_dropped_total{reason=context_limit}), existing contexts keep working. Bounds memory against unbounded tag values: a context costs about 128 bytes plus its name, host and tags (see --aggregation-memory)."),
    n("aggregation-memory", "WHIPPET_AGGREGATION_MEMORY", "BYTES", (Value("1073741824"), 1 << 20, 1 << 40), "Bytes that contexts and the samples of open buckets may hold (1 GiB by default): a context's 128 bytes plus its name, host and tags, histogram samples (16 bytes each), set members (11), sketch bins, timestamped points (80). A sample that needs more while it is spent is dropped and counted (whippet_dropped_total{reason=memory_limit}); existing contexts keep working."),
    s("no-aggregation-pipeline", "DD_DOGSTATSD_NO_AGGREGATION_PIPELINE", "BOOL", Value("true"), "Honour |T timestamps (a timestamped gauge or count is sent as its own point); false ignores them and aggregates every sample at arrival, as the Agent does with this setting off."),
    n("event-backlog", "WHIPPET_EVENT_BACKLOG", "N", (Value("10000"), 1, 10_000_000), "Most events plus service checks held between two flushes; beyond, they are dropped and counted."),
    s("origin-detection", "DD_DOGSTATSD_ORIGIN_DETECTION", "BOOL", Value("false"), "Tag what arrives over the Unix sockets with the sending container's tags: the kernel gives each packet's sender pid (SO_PASSCRED), and <procfs>/<pid>/cgroup names its container."),
    s("origin-detection-client", "DD_DOGSTATSD_ORIGIN_DETECTION_CLIENT", "BOOL", Value("false"), "Honour the container a client names itself (|c: field) and the cardinality it asks for (|card:)."),
    s("entity-id-precedence", "DD_DOGSTATSD_ENTITY_ID_PRECEDENCE", "BOOL", Value("false"), "A dd.internal.entity_id tag replaces the Unix socket's origin instead of joining it."),
    s("origin-optout", "DD_DOGSTATSD_ORIGIN_OPTOUT_ENABLED", "BOOL", Value("true"), "card:none (field or dd.internal.card tag) opts a message out of container tags. whippet gives such a message no container tags either way, as the Agent's tagger has none at cardinality none."),
    s("tag-cardinality", "DD_DOGSTATSD_TAG_CARDINALITY", "LEVEL", Value("low"), "Container tags added: low (image, namespace, workload, env/service/version), orchestrator (plus pod_name) or high (plus container_id and names); a message's card: field or dd.internal.card tag overrides it.").reloadable(),
    s("procfs-path", "DD_PROCFS_PATH", "PATH", Value("/proc"), "Where the host's /proc is mounted (for origin detection inside a container)."),
    s("kubelet-host", "DD_KUBERNETES_KUBELET_HOST", "HOST", Unset("off"), "The local kubelet, asked for the node's pods (/pods) to tag metrics from them; also turns on the tagger for dd.internal.entity_id tags.").reloadable(),
    n("kubelet-https-port", "DD_KUBERNETES_HTTPS_KUBELET_PORT", "PORT", (Value("10250"), 0, 65535), "The kubelet's HTTPS port, asked first; 0 skips HTTPS.").reloadable(),
    n("kubelet-http-port", "DD_KUBERNETES_HTTP_KUBELET_PORT", "PORT", (Value("10255"), 0, 65535), "The kubelet's plain HTTP port, asked when HTTPS fails; 0 never falls back.").reloadable(),
    s("kubelet-token-path", "DD_KUBELET_AUTH_TOKEN_PATH", "PATH", Value("/var/run/secrets/kubernetes.io/serviceaccount/token"), "Bearer token for the kubelet's HTTPS port, re-read at each request.").reloadable(),
    s("kubelet-client-ca", "DD_KUBELET_CLIENT_CA", "PATH", Value("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"), "CA certificate the kubelet's HTTPS certificate must chain to; the built-in roots when the file is absent.").reloadable(),
    s("kubelet-tls-verify", "DD_KUBELET_TLS_VERIFY", "BOOL", Value("true"), "Verify the kubelet's HTTPS certificate.").reloadable(),
    s("docker-host", "DOCKER_HOST", "URL", Value("unix:///var/run/docker.sock"), "The Docker Engine API, asked for container names, images and labels when origin detection is on; unix:// only, or off.").reloadable(),
    s("mapper-profiles", "DD_DOGSTATSD_MAPPER_PROFILES", "JSON", Unset("none"), "Mapper profiles as JSON, as the Agent reads them: [{\"name\", \"prefix\", \"mappings\": [{\"match\", \"match_type\" (wildcard or regex), \"name\", \"tags\": {key: value}}]}]; a matching metric is renamed and $1, ${1} in name and tag values expand to what the match captured (see whippet(8), SHAPING).").reloadable(),
    n("mapper-cache-size", "DD_DOGSTATSD_MAPPER_CACHE_SIZE", "N", (Value("1000"), 1, 1 << 20), "Metric names each worker remembers the shaping of (mapper, namespace, filters), so a name is decided once.").reloadable(),
    s("metric-namespace", "DD_STATSD_METRIC_NAMESPACE", "PREFIX", Unset("none"), "Prefix put before every metric name (a dot is added if it lacks one), after the mapper.").reloadable(),
    s("metric-namespace-blacklist", "DD_STATSD_METRIC_NAMESPACE_BLACKLIST", "LIST", Value(crate::shaping::NAMESPACE_EXEMPT), "Names beginning with one of these prefixes get no namespace (comma- or space-separated); the default is the Agent's.").reloadable(),
    s("metric-filterlist", "DD_METRIC_FILTERLIST", "LIST", Unset("none"), "Metric names dropped (after mapper and namespace), comma- or space-separated or a JSON list; counted as whippet_dropped_total{reason=filtered}. When set, the older blocklist is ignored.").reloadable(),
    s("metric-filterlist-match-prefix", "DD_METRIC_FILTERLIST_MATCH_PREFIX", "BOOL", Value("false"), "The filter list's entries are prefixes rather than whole names.").reloadable(),
    s("metric-blocklist", "DD_STATSD_METRIC_BLOCKLIST", "LIST", Unset("none"), "The Agent's older name for the filter list, used when the newer one is not set.").reloadable(),
    s("metric-blocklist-match-prefix", "DD_STATSD_METRIC_BLOCKLIST_MATCH_PREFIX", "BOOL", Value("false"), "The older list's entries are prefixes rather than whole names.").reloadable(),
    s("metric-tag-filterlist", "DD_METRIC_TAG_FILTERLIST", "JSON", Unset("none"), "Which tags distributions keep, per metric name, as JSON: [{\"metric_name\", \"action\": \"include\" or \"exclude\", \"tags\": [keys]}]; include keeps only the listed tag keys, exclude drops them.").reloadable(),
    s("histogram-copy-to-distribution", "DD_HISTOGRAM_COPY_TO_DISTRIBUTION", "BOOL", Value("false"), "Every histogram and timer sample also feeds a distribution named by the copy prefix followed by the metric's name.").reloadable(),
    s("histogram-copy-to-distribution-prefix", "DD_HISTOGRAM_COPY_TO_DISTRIBUTION_PREFIX", "PREFIX", Unset("none"), "Prefix of the distribution copies' names.").reloadable(),
    s("host-rules", "WHIPPET_HOST_RULES", "JSON", Unset("none"), "Metrics sent without a host, as JSON: [{\"match\": glob over the name, \"types\": [count, gauge, …] (all when absent), \"tags\": tags added in the host's place}]; the first rule that fits applies (see whippet(8), SHAPING).").reloadable(),
    s("dd-url", "DD_DD_URL", "URL", Derived("https://app.SITE when an API key is set; otherwise whippet prints to the console"), "Intake URL (http:// or https://) that payloads are sent to.").reloadable(),
    s("site", "DD_SITE", "SITE", Value("datadoghq.com"), "Datadog site used to build the intake URL.").reloadable(),
    s("api-key", "DD_API_KEY", "KEY", Unset("none"), "Datadog API key sent with every payload; never logged or printed. Put it in a key file or the environment, never on a command line, which local users can read.").reloadable(),
    s("api-key-file", "WHIPPET_API_KEY_FILE", "PATH", Derived("$CREDENTIALS_DIRECTORY/api_key when systemd passes that credential (LoadCredential=api_key:…)"), "File holding the API key (surrounding whitespace ignored), used when no key is set directly; keep it readable by whippet alone. The packaged service passes /etc/whippet/api_key as a systemd credential.").reloadable(),
    s("additional-endpoints", "DD_ADDITIONAL_ENDPOINTS", "JSON", Unset("none"), "Further intakes that get a copy of every payload, as JSON: {\"https://URL\": [\"API key\", …]}. Each URL and key has its own senders, backoff, equal share of the retry queue and of the retry directory, and counters labelled with its address (the main intake's too), so one that is slow or down never delays or drops another's data."),
    s("proxy-https", "DD_PROXY_HTTPS", "URL", Unset("none"), "Proxy for https:// intakes, like http://user:password@proxy:3128 (the password is never shown); the standard HTTPS_PROXY is read when this is not set."),
    s("proxy-http", "DD_PROXY_HTTP", "URL", Unset("none"), "Proxy for http:// intakes; the standard HTTP_PROXY is read when this is not set."),
    s("proxy-no-proxy", "DD_PROXY_NO_PROXY", "LIST", Unset("none"), "Hosts reached without the proxy, comma- or space-separated: names or addresses, .suffix or *.suffix, or * for all; the standard NO_PROXY is read when this is not set."),
    s("ca-bundle", "WHIPPET_CA_BUNDLE", "PATH", Value("bundled"), "Certificates an HTTPS intake or proxy must chain to: bundled (Mozilla's roots, built in), system (the distribution's CA bundle) or the path of a PEM file, then trusted alone; the standard SSL_CERT_FILE is read when this is not set."),
    s("series-api", "WHIPPET_SERIES_API", "VERSION", Value("v2"), "Series API: v2 (protobuf) or v1 (JSON, legacy)."),
    s("compression", "DD_SERIALIZER_COMPRESSOR_KIND", "KIND", Value("zstd"), "Payload compression: zstd (level 1), zlib (also called deflate) or none."),
    s("enable-payloads-series", "DD_ENABLE_PAYLOADS_SERIES", "BOOL", Value("true"), "Send series (points); false drops them at flush, counted."),
    s("enable-payloads-sketches", "DD_ENABLE_PAYLOADS_SKETCHES", "BOOL", Value("true"), "Send distributions' sketches; false drops them at flush, counted."),
    s("enable-payloads-events", "DD_ENABLE_PAYLOADS_EVENTS", "BOOL", Value("true"), "Send events; false drops them at flush, counted."),
    s("enable-payloads-service-checks", "DD_ENABLE_PAYLOADS_SERVICE_CHECKS", "BOOL", Value("true"), "Send service checks; false drops them at flush, counted."),
    n("retry-queue-bytes", "WHIPPET_RETRY_QUEUE_BYTES", "BYTES", (Value("15728640"), 0, 1 << 40), "Bytes of payloads that may wait for the intake in memory (new and failed, 15 MiB by default); beyond, the oldest goes to --retry-dir, or is dropped and counted."),
    s("retry-dir", "WHIPPET_RETRY_DIR", "DIR", Unset("off"), "Directory where payloads that no longer fit --retry-queue-bytes (and those still waiting at shutdown) are kept until the intake takes them, oldest first, across restarts. Created if missing. Unset, they are dropped and counted."),
    n("retry-dir-bytes", "WHIPPET_RETRY_DIR_BYTES", "BYTES", (Value("268435456"), 0, 1 << 50), "Most bytes kept in --retry-dir (256 MiB by default); beyond, the oldest payload on disk is dropped and counted."),
    n("forwarder-threads", "WHIPPET_FORWARDER_THREADS", "N", (Value("2"), 1, 64), "Concurrent requests to the intake."),
    n("request-timeout-ms", "WHIPPET_REQUEST_TIMEOUT_MS", "MS", (Value("20000"), 1, 3_600_000), "Timeout of one request to the intake, in milliseconds; a timeout is retried."),
    n("retry-base-ms", "WHIPPET_RETRY_BASE_MS", "MS", (Value("2000"), 1, 3_600_000), "First retry delay in milliseconds; each further failure of the endpoint doubles it, up to the longest retry delay, with jitter."),
    n("retry-max-ms", "WHIPPET_RETRY_MAX_MS", "MS", (Derived("32 times the first retry delay (64000)"), 1, 3_600_000), "Longest retry delay in milliseconds."),
    s("shutdown-timeout", "WHIPPET_SHUTDOWN_TIMEOUT", "DURATION", Value("10s"), "How long shutdown may take after SIGTERM (10s, 500ms, 1m; a bare number is seconds): no request outlives it, and what is left goes to --retry-dir or is dropped and counted. whippet exits within this plus 5 s."),
    s("self-metrics", "WHIPPET_SELF_METRICS", "BOOL", Value("true"), "Send whippet's own counters to the intake with each flush, as metrics under whippet. with a whippet.running series for liveness (see whippet(8), TELEMETRY)."),
    s("log-level", "DD_LOG_LEVEL", "LEVEL", Value("info"), "Least severe log lines written: error, warn, info or debug (the Agent's trace, critical and off are accepted).").reloadable(),
    s("allow-root", "WHIPPET_ALLOW_ROOT", "BOOL", Value("false"), "Run even as root. whippet needs no privilege: run it as its own user (the packaged service uses User=whippet)."),
    s("status", "WHIPPET_STATUS", "ADDR", Unset("off"), "Serve /status (JSON), /metrics (Prometheus) and /contexts?top=N over HTTP on this address; a bare port means 127.0.0.1:PORT."),
];

/// How an Agent variable's value becomes whippet's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Taken as written.
    Same,
    /// The Agent counts seconds (fractions allowed), whippet milliseconds.
    Seconds,
}

/// Another name a setting is read under (the Agent's, or a standard one): read (from the
/// config file, then the environment) after the setting's own variable, which wins when
/// both are set.
#[derive(Debug)]
pub struct Alias {
    pub var: &'static str,
    pub flag: &'static str,
    pub unit: Unit,
}

const fn alias(var: &'static str, flag: &'static str, unit: Unit) -> Alias {
    Alias { var, flag, unit }
}

/// The Agent's forwarder settings, on whippet's forwarder; and the standard variables of
/// proxies and trust, which the Agent's own names beat.
pub const ALIASES: &[Alias] = &[
    alias("HTTPS_PROXY", "proxy-https", Unit::Same),
    alias("https_proxy", "proxy-https", Unit::Same),
    alias("HTTP_PROXY", "proxy-http", Unit::Same),
    alias("http_proxy", "proxy-http", Unit::Same),
    alias("NO_PROXY", "proxy-no-proxy", Unit::Same),
    alias("no_proxy", "proxy-no-proxy", Unit::Same),
    alias("SSL_CERT_FILE", "ca-bundle", Unit::Same),
    alias("DD_FORWARDER_TIMEOUT", "request-timeout-ms", Unit::Seconds),
    alias("DD_FORWARDER_NUM_WORKERS", "forwarder-threads", Unit::Same),
    alias(
        "DD_FORWARDER_RETRY_QUEUE_PAYLOADS_MAX_SIZE",
        "retry-queue-bytes",
        Unit::Same,
    ),
    alias("DD_FORWARDER_STORAGE_PATH", "retry-dir", Unit::Same),
    alias(
        "DD_FORWARDER_STORAGE_MAX_SIZE_IN_BYTES",
        "retry-dir-bytes",
        Unit::Same,
    ),
    alias("DD_FORWARDER_BACKOFF_BASE", "retry-base-ms", Unit::Seconds),
    alias("DD_FORWARDER_BACKOFF_MAX", "retry-max-ms", Unit::Seconds),
];

/// The Agent's forwarder settings whippet's fixed behaviour stands in for: accepted, and
/// when set, a warning says what whippet does instead.
pub const FIXED: &[(&str, &str)] = &[
    (
        "DD_FORWARDER_BACKOFF_FACTOR",
        "whippet doubles the delay after each failure",
    ),
    (
        "DD_FORWARDER_RECOVERY_INTERVAL",
        "one success ends an endpoint's backoff",
    ),
    (
        "DD_FORWARDER_RECOVERY_RESET",
        "one success ends an endpoint's backoff",
    ),
];

/// The setting of a flag. Every flag the resolver asks for is in the table.
pub fn setting(flag: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.flag == flag)
        .expect("every flag asked for is in SETTINGS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workers_default_says_the_cap_it_applies() {
        let workers = SETTINGS.iter().find(|s| s.flag == "workers").unwrap();
        let cap = format!("at most {DEFAULT_WORKERS_AT_MOST}");
        assert!(
            workers.default.text().ends_with(&cap),
            "{}",
            workers.default.text()
        );
    }

    #[test]
    fn flags_and_variables_are_unique_and_numbers_have_a_sane_range() {
        let mut flags: Vec<&str> = SETTINGS.iter().map(|s| s.flag).collect();
        let mut vars: Vec<&str> = SETTINGS.iter().map(|s| s.var).collect();
        flags.sort_unstable();
        flags.dedup();
        vars.sort_unstable();
        vars.dedup();
        assert_eq!((flags.len(), vars.len()), (SETTINGS.len(), SETTINGS.len()));
        for s in SETTINGS {
            assert!(
                !s.help.contains("Default"),
                "{}: the default is declared, not written",
                s.flag
            );
            assert!(
                !s.help.contains("SIGHUP"),
                "{}: reloading is declared, not written",
                s.flag
            );
            assert!(s.help.ends_with('.'), "{}", s.flag);
            if let (Some((min, max)), Value(v)) = (s.range, s.default) {
                let v: u64 = v.parse().unwrap_or_else(|_| panic!("{}: {v}", s.flag));
                assert!(
                    min <= v && v <= max,
                    "{}: {v} outside {min}..={max}",
                    s.flag
                );
            }
        }
    }
}
