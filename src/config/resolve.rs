//! Resolving settings: each one's raw value from a flag, the config file or the environment
//! (in that order), or its declared default; parsed and range-checked, with every error
//! naming the flag or variable and where the value came from.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::settings::{setting, DefaultValue, Unit, ALIASES, FIXED, SETTINGS};
use super::Source;
use crate::flush::Aggregate;
use crate::packet::Transport;

/// Resolves settings one at a time, collecting every error and where each value came from.
pub(super) struct Resolver<'a> {
    pub m: &'a getopts::Matches,
    /// The config file's `KEY → (value, line)`.
    pub file: HashMap<String, (String, usize)>,
    pub file_path: Option<PathBuf>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub errors: Vec<String>,
    /// (flag, value as given, source), in the order settings were resolved.
    pub sources: Vec<(&'static str, String, Source)>,
}

impl Resolver<'_> {
    /// The raw value with its source and the name to blame in an error.
    pub fn raw(&self, flag: &str) -> Option<(String, Source, String)> {
        let s = setting(flag);
        // A repeated flag: the last one wins, so wrappers can append overrides.
        if let Some(v) = self.m.opt_strs(flag).pop() {
            return Some((v, Source::Flag, format!("--{flag}")));
        }
        if self.m.opt_present(flag) {
            return Some(("true".into(), Source::Flag, format!("--{flag}")));
        }
        let aliases = ALIASES.iter().filter(|a| a.flag == flag);
        let names =
            || std::iter::once((s.var, Unit::Same)).chain(aliases.clone().map(|a| (a.var, a.unit)));
        if let Some(path) = &self.file_path {
            for (var, unit) in names() {
                if let Some((v, line)) = self.file.get(var) {
                    let source = Source::File {
                        path: path.clone(),
                        line: *line,
                    };
                    let name = format!("{var} ({source}{})", unit.note());
                    return Some((in_unit(v, unit), source, name));
                }
            }
        }
        for (var, unit) in names() {
            if let Some(v) = (self.env)(var) {
                let name = format!("{var} (environment{})", unit.note());
                return Some((in_unit(&v, unit), Source::Environment, name));
            }
        }
        None
    }

    /// The Agent's settings whippet's fixed behaviour stands in for, when set: a warning
    /// each.
    pub(crate) fn fixed_warnings(&self) -> Vec<String> {
        FIXED
            .iter()
            .filter(|(var, _)| self.file.contains_key(*var) || (self.env)(var).is_some())
            .map(|(var, what)| format!("{var} is not used: {what}"))
            .collect()
    }

    /// The setting parsed by `parse` when it was given (its source recorded; an error is
    /// recorded and gives `None`), else `None`.
    pub(crate) fn given<T>(
        &mut self,
        flag: &'static str,
        parse: impl Fn(&str, &str) -> Result<T, String>,
    ) -> Option<T> {
        let Some((v, source, name)) = self.raw(flag) else {
            // The declared default; a derived one is filled in once the config is built.
            let shown = match setting(flag).default {
                DefaultValue::Value(v) | DefaultValue::Unset(v) => v.to_string(),
                DefaultValue::Derived(_) => String::new(),
            };
            self.sources.push((flag, shown, Source::Default));
            return None;
        };
        let shown = match flag {
            "api-key" => "(redacted)".into(),
            "dd-url" | "proxy-https" | "proxy-http" => crate::forwarder::redact_url(&v),
            "additional-endpoints" => match additional_endpoints(&v, flag) {
                Ok(list) => list
                    .iter()
                    .map(|(url, _)| crate::forwarder::redact_url(url))
                    .collect::<Vec<_>>()
                    .join(", "),
                Err(_) => "(not valid)".into(),
            },
            _ => v.clone(),
        };
        self.sources.push((flag, shown, source));
        match parse(&v, &name) {
            Ok(t) => Some(t),
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }

    /// The setting parsed by `parse`, or its declared default parsed the same way (also after
    /// an error, which is recorded).
    pub fn value<T>(
        &mut self,
        flag: &'static str,
        parse: impl Fn(&str, &str) -> Result<T, String>,
    ) -> T {
        let DefaultValue::Value(default) = setting(flag).default else {
            unreachable!("--{flag} declares no value default: resolve it with `given`");
        };
        self.given(flag, &parse).unwrap_or_else(|| {
            parse(default, flag).unwrap_or_else(|e| unreachable!("a declared default: {e}"))
        })
    }

    /// A whole number in the setting's declared range, if given.
    pub(crate) fn number_given<T: TryFrom<u64>>(&mut self, flag: &'static str) -> Option<T> {
        let (min, max) = setting(flag)
            .range
            .unwrap_or_else(|| unreachable!("--{flag} declares no range"));
        self.given(flag, |v, name| number(v, name, min, max))
    }

    /// A whole number in the setting's declared range, or its declared default.
    pub fn number<T: TryFrom<u64>>(&mut self, flag: &'static str) -> T {
        let (min, max) = setting(flag)
            .range
            .unwrap_or_else(|| unreachable!("--{flag} declares no range"));
        self.value(flag, |v, name| number(v, name, min, max))
    }

    pub(crate) fn string(&mut self, flag: &'static str) -> Option<String> {
        self.given(flag, |v, _| Ok(v.to_string()))
    }

    /// A key in the config file that is not a setting is a typo until proven otherwise.
    pub(crate) fn check_unknown_keys(&mut self, path: &Path) {
        let mut unknown: Vec<_> = self
            .file
            .iter()
            .filter(|(k, _)| {
                !SETTINGS.iter().any(|s| s.var == k.as_str())
                    && !ALIASES.iter().any(|a| a.var == k.as_str())
                    && !FIXED.iter().any(|(var, _)| var == k)
            })
            .map(|(k, (_, line))| (*line, k.clone()))
            .collect();
        unknown.sort();
        for (line, key) in unknown {
            if key == "DD_SKIP_SSL_VALIDATION" {
                let value = self.file.get(&key).map(|(v, _)| v.as_str());
                refuse_skip_ssl(
                    value,
                    &format!("{}:{line}: {key}", path.display()),
                    &mut self.errors,
                );
                continue;
            }
            self.errors.push(format!(
                "{}:{line}: {key} is not a whippet setting (see the bracketed names in --help)",
                path.display()
            ));
        }
    }
}

impl Unit {
    /// What an error about a converted value adds to its name.
    fn note(self) -> &'static str {
        match self {
            Unit::Same => "",
            Unit::Seconds => ", in milliseconds",
        }
    }
}

/// An Agent value in whippet's unit: seconds become milliseconds. What does not parse is
/// passed on as written, for the setting's own check to name.
fn in_unit(v: &str, unit: Unit) -> String {
    match unit {
        Unit::Same => v.to_string(),
        Unit::Seconds => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => format!("{}", (s * 1000.0).round() as u64),
            _ => v.to_string(),
        },
    }
}

/// Why the Agent's `skip_ssl_validation` is refused rather than ignored.
pub(super) const SKIP_SSL: &str = "whippet never skips TLS certificate verification: an intake whose certificate does not verify could be anyone, and would receive the API key; remove it, and trust the intake's CA with --ca-bundle (WHIPPET_CA_BUNDLE) instead";

/// The Agent's `DD_SKIP_SSL_VALIDATION` (environment or file) set to true: refused.
pub(super) fn refuse_skip_ssl(value: Option<&str>, name: &str, errors: &mut Vec<String>) {
    if value.is_some_and(|v| boolean(v, name).unwrap_or(true)) {
        errors.push(format!("{name}: {SKIP_SSL}"));
    }
}

/// A whole number between `min` and `max`, as a `T` (which holds the range).
fn number<T: TryFrom<u64>>(v: &str, name: &str, min: u64, max: u64) -> Result<T, String> {
    let n: u64 = v
        .trim()
        .parse()
        .map_err(|_| format!("{name}: '{v}' is not a whole number"))?;
    if n < min || n > max {
        return Err(format!("{name}: {n} is outside {min}..={max}"));
    }
    T::try_from(n).map_err(|_| format!("{name}: {n} is outside {min}..={max}"))
}

/// Reads `KEY=VALUE` lines: `#` comments, blank lines, and values in single or double quotes.
pub(super) fn read_file(path: &Path, errors: &mut Vec<String>) -> ConfigFile {
    let mut out = HashMap::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errors.push(format!("--config: cannot read {}: {e}", path.display()));
            return ConfigFile::default();
        }
    };
    if super::yaml::is_yaml(path, &text) {
        let read = super::yaml::read(path, &text, errors);
        return ConfigFile {
            values: read.values,
            ignored: read.ignored,
            yaml: true,
        };
    }
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
    ConfigFile {
        values: out,
        ignored: Vec::new(),
        yaml: false,
    }
}

/// What `--config` gives: setting variable → (value, line); for the Agent's YAML file, the
/// keys whippet does not implement, with their lines.
#[derive(Debug, Default)]
pub(super) struct ConfigFile {
    pub values: HashMap<String, (String, usize)>,
    pub ignored: Vec<(String, usize)>,
    pub yaml: bool,
}

/// `--eol-required`: the Agent's listener names (`udp`, `uds`, `named_pipe`, which whippet
/// has none of) or whippet's transports (`unix`, `unix_stream`), per transport.
pub(super) fn eol_transports(v: &str, name: &str) -> Result<[bool; Transport::COUNT], String> {
    let mut out = [false; Transport::COUNT];
    for t in v
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
    {
        match t.to_ascii_lowercase().as_str() {
            "udp" => out[Transport::Udp as usize] = true,
            "uds" => {
                out[Transport::Unix as usize] = true;
                out[Transport::Stream as usize] = true;
            }
            "unix" => out[Transport::Unix as usize] = true,
            "unix_stream" => out[Transport::Stream as usize] = true,
            "named_pipe" => {}
            other => {
                return Err(format!(
                    "{name}: '{other}' is not udp, uds, unix, unix_stream or named_pipe"
                ))
            }
        }
    }
    Ok(out)
}

/// A list of metric names or prefixes: a JSON list of strings, or names separated by commas
/// or white space (the Agent's environment variables separate with spaces).
pub(super) fn names(v: &str, name: &str) -> Result<Vec<String>, String> {
    let v = v.trim();
    if v.starts_with('[') {
        let list: Vec<serde_json::Value> =
            serde_json::from_str(v).map_err(|e| format!("{name}: not a valid JSON list: {e}"))?;
        return list
            .into_iter()
            .map(|n| match n {
                serde_json::Value::String(s) => Ok(s),
                other => Err(format!("{name}: {other} is not a string")),
            })
            .filter(|n| n.as_ref().map_or(true, |n| !n.is_empty()))
            .collect();
    }
    Ok(v.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect())
}

/// `"a b"` → `a b` (with `\"` and `\\` escapes), `'a b'` → `a b`, `a` → `a`.
pub(super) fn unquote(v: &str) -> Option<String> {
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

/// An IP address, or `localhost` (the Agent's default): no DNS lookup at start-up.
pub(super) fn host_address(host: &str, port: u16) -> Result<SocketAddr, String> {
    let ip = match host {
        "localhost" => IpAddr::from([127, 0, 0, 1]),
        _ => host
            .parse::<IpAddr>()
            .map_err(|_| format!("'{host}' is not an IP address or localhost"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// A host name or IP address with a port, resolved now (the first address).
pub(super) fn host_port(host: &str, port: u16) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = host_address(host, port) {
        return Ok(a);
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{host}': {e}"))?
        .next()
        .ok_or_else(|| format!("'{host}' has no address"))
}

/// `ADDR` or `off`.
pub(super) fn udp_address(v: &str, name: &str) -> Result<Option<SocketAddr>, String> {
    match v {
        "off" => Ok(None),
        addr => addr.parse::<SocketAddr>().map(Some).map_err(|_| {
            format!("{name}: '{addr}' is not an address like 127.0.0.1:8125 or 'off'")
        }),
    }
}

/// `ADDR`, or a bare port on 127.0.0.1.
pub(super) fn status_address(v: &str, name: &str) -> Result<SocketAddr, String> {
    let addr = if v.chars().all(|c| c.is_ascii_digit()) {
        format!("127.0.0.1:{v}")
    } else {
        v.to_string()
    };
    addr.parse::<SocketAddr>()
        .map_err(|_| format!("{name}: '{v}' is not an address like 127.0.0.1:5000 or a port"))
}

/// An octal file mode that does not let others read.
pub(super) fn socket_mode(v: &str, name: &str) -> Result<u32, String> {
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
}

/// The Agent's booleans: true/false, 1/0, yes/no, on/off, any case.
pub(super) fn boolean(v: &str, name: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{name}: '{v}' is not true or false")),
    }
}

/// `10s`, `500ms`, `2m`, or a bare number of seconds, up to an hour.
pub(super) fn duration(v: &str, name: &str) -> Result<std::time::Duration, String> {
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
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("{name}: '{v}' is not a duration up to 1h like 10s, 500ms or 2m"))
}

/// Items separated by commas, spaces or tabs.
pub(super) fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split([',', ' ', '\t']).filter(|s| !s.is_empty())
}

/// The valid aggregates of a list, and a warning for each entry skipped (the Agent skips
/// what it does not know instead of refusing to start).
pub(super) fn aggregates(v: &str, name: &str) -> Result<(Vec<Aggregate>, Vec<String>), String> {
    let mut skipped = Vec::new();
    let valid = list(v)
        .filter_map(|s| {
            let a = Aggregate::parse(s);
            if a.is_none() {
                skipped.push(format!(
                    "{name}: skipped '{s}', which is not one of max, min, median, avg, sum, count"
                ));
            }
            a
        })
        .collect();
    Ok((valid, skipped))
}

/// "0.95" → 95: the Agent's fraction notation, turned into whole percentiles 1..=100; an
/// entry that is not such a fraction is skipped with a warning, as the Agent does.
pub(super) fn percentiles(v: &str, name: &str) -> Result<(Vec<u32>, Vec<String>), String> {
    let mut skipped = Vec::new();
    let valid = list(v)
        .filter_map(|s| {
            let p = s
                .parse::<f64>()
                .ok()
                .map(|f| (f * 100.0).round())
                .filter(|p| (1.0..=100.0).contains(p))
                .map(|p| p as u32);
            if p.is_none() {
                skipped.push(format!(
                    "{name}: skipped '{s}', which is not a fraction between 0.01 and 1 like 0.95"
                ));
            }
            p
        })
        .collect();
    Ok((valid, skipped))
}

/// An intake URL: scheme, host and optional port, no path; a trailing slash is dropped.
pub(super) fn intake_base(v: &str, name: &str) -> Result<String, String> {
    let url = v.trim_end_matches('/');
    let host = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match host {
        Some(host) if !host.is_empty() && !host.contains('/') => Ok(url.to_string()),
        _ => Err(format!(
            "{name}: '{}' is not like https://app.datadoghq.com or http://127.0.0.1:8080 (scheme, host, optional port, no path)",
            crate::forwarder::redact_url(url)
        )),
    }
}

/// `--additional-endpoints`: a JSON object of intake URL to API keys (a list, or one key as
/// a string), each URL checked as `--dd-url` is and each key as `--api-key`. Returned
/// sorted by URL, keys in the order written, each (URL, key) once.
pub(super) fn additional_endpoints(v: &str, name: &str) -> Result<Vec<(String, String)>, String> {
    if v.trim().is_empty() {
        return Ok(Vec::new());
    }
    let shape = || {
        format!("{name}: not a JSON object of intake URL to a list of API keys, like {{\"https://app.datadoghq.eu\": [\"KEY\"]}}")
    };
    let value: serde_json::Value = serde_json::from_str(v).map_err(|_| shape())?;
    let serde_json::Value::Object(map) = value else {
        return Err(shape());
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for (url, keys) in map {
        let url = intake_base(&url, name)?;
        let keys = match keys {
            serde_json::Value::String(k) => vec![k],
            serde_json::Value::Array(list) => list
                .into_iter()
                .map(|k| match k {
                    serde_json::Value::String(k) => Ok(k),
                    _ => Err(shape()),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(shape()),
        };
        for key in keys {
            let key = api_key(
                key.trim(),
                &format!("{name}, a key of {}", crate::forwarder::redact_url(&url)),
            )?;
            if key.is_empty() {
                return Err(format!(
                    "{name}: an empty API key for {}",
                    crate::forwarder::redact_url(&url)
                ));
            }
            if !out.iter().any(|(u, k)| *u == url && *k == key) {
                out.push((url.clone(), key));
            }
        }
    }
    Ok(out)
}

/// An API key: it travels in an HTTP header, so every character must be printable ASCII
/// with no space; a stray newline or quote from a file is named, the key never shown.
pub(super) fn api_key(v: &str, name: &str) -> Result<String, String> {
    match v.char_indices().find(|(_, c)| !c.is_ascii_graphic()) {
        None => Ok(v.to_string()),
        Some((at, c)) => Err(format!(
            "{name}: the API key has {} at character {} (of {}), which an HTTP header cannot carry; check for a stray newline, space or quote",
            match c {
                '\n' => "a newline".to_string(),
                '\r' => "a carriage return".to_string(),
                ' ' => "a space".to_string(),
                '\t' => "a tab".to_string(),
                c if c.is_ascii() => format!("the control character {:#04x}", c as u32),
                _ => "a non-ASCII character".to_string(),
            },
            v[..at].chars().count() + 1,
            v.chars().count()
        )),
    }
}

/// A Datadog site name: no scheme, no path.
pub(super) fn site(v: &str, name: &str) -> Result<String, String> {
    if v.is_empty() || v.contains('/') {
        return Err(format!("{name}: '{v}' is not a site like datadoghq.com"));
    }
    Ok(v.to_string())
}

/// This machine's hostname, or empty if it cannot be read.
/// A Kubernetes cluster name as the Agent accepts it: lowercase letters, digits, dots and
/// hyphens, starting with a letter, ending with a letter or digit, at most 80 characters.
pub(super) fn cluster_name(v: &str, name: &str) -> Result<String, String> {
    let ok = v.is_empty()
        || (v.len() <= 80
            && v.starts_with(|c: char| c.is_ascii_lowercase())
            && v.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && v.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!("{name}: '{v}' is not a cluster name (lowercase letters, digits, dots and hyphens, starting with a letter, ending with a letter or digit, at most 80)"))
    }
}

/// The fully qualified name of `host`, as `hostname -f` finds it: the canonical name
/// the resolver gives, when it is not the short name itself.
pub(super) fn fqdn(host: &str) -> Option<String> {
    use std::ffi::{CStr, CString};
    let node = CString::new(host).ok()?;
    // SAFETY: an all-zero addrinfo is a valid "no hints" value; the fields set are plain
    // integers.
    let mut hints: nix::libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_flags = nix::libc::AI_CANONNAME;
    hints.ai_family = nix::libc::AF_UNSPEC;
    let mut found: *mut nix::libc::addrinfo = std::ptr::null_mut();
    // SAFETY: `node` is a NUL-terminated string that outlives the call, `hints` is a valid
    // addrinfo, and `found` receives a list freed below with freeaddrinfo.
    let rc = unsafe { nix::libc::getaddrinfo(node.as_ptr(), std::ptr::null(), &hints, &mut found) };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: getaddrinfo succeeded, so `found` points at a valid list whose first entry's
    // ai_canonname is NUL-terminated or null (AI_CANONNAME asks for it on the first entry).
    let canonical = unsafe {
        let name = (*found).ai_canonname;
        (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
    };
    // SAFETY: `found` came from getaddrinfo and is freed once.
    unsafe { nix::libc::freeaddrinfo(found) };
    canonical.filter(|c| !c.is_empty() && c.contains('.'))
}

pub(crate) fn machine_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}
