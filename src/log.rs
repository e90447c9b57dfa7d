//! Logs: one line per event on stderr, `<N>` syslog priority prefixes when stderr is the
//! journal (`JOURNAL_STREAM`), a level set by `--log-level` and changed on SIGHUP, and rate
//! limiting for warnings that repeat. Nothing is logged per packet, and nothing logged ever
//! holds the API key (the config keeps it in a type that will not print).

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Severity, least to most verbose; the discriminant is the syslog priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Off = 0,
    Error = 3,
    Warn = 4,
    Info = 6,
    Debug = 7,
}

impl Level {
    /// The Agent's level names: trace and debug, info, warn, error and critical, off.
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "trace" | "debug" => Level::Debug,
            "info" => Level::Info,
            "warn" | "warning" => Level::Warn,
            "error" | "err" | "critical" => Level::Error,
            "off" => Level::Off,
            _ => return None,
        })
    }

    fn from_u8(v: u8) -> Level {
        match v {
            0 => Level::Off,
            3 => Level::Error,
            4 => Level::Warn,
            7 => Level::Debug,
            _ => Level::Info,
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Sets the least severe level written.
pub(crate) fn set_level(level: Level) {
    LEVEL.store(level as u8, Relaxed);
}

pub fn level() -> Level {
    Level::from_u8(LEVEL.load(Relaxed))
}

/// True when stderr is the journal's stream (`JOURNAL_STREAM=DEV:INODE` matches fd 2).
fn journal() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        let Ok(v) = std::env::var("JOURNAL_STREAM") else {
            return false;
        };
        let Some((dev, ino)) = v.split_once(':') else {
            return false;
        };
        let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
            return false;
        };
        dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
    })
}

/// Writes one line at `level` if the current level lets it through.
pub fn write(level: Level, msg: &str) {
    if level == Level::Off || level > self::level() {
        return;
    }
    emit(level, msg);
}

fn emit(level: Level, msg: &str) {
    let line = if journal() {
        format!("<{}>whippet: {msg}\n", level as u8)
    } else {
        format!("whippet: {msg}\n")
    };
    // One write per line so lines from different threads do not interleave.
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}

/// A line the operator asked for (SIGUSR1): written whatever `--log-level` says.
pub fn answer(msg: &str) {
    emit(Level::Info, msg);
}

pub fn error(msg: &str) {
    write(Level::Error, msg)
}

pub fn warn(msg: &str) {
    write(Level::Warn, msg)
}

pub fn info(msg: &str) {
    write(Level::Info, msg)
}

pub fn debug(msg: &str) {
    write(Level::Debug, msg)
}

/// How often one kind of repeated warning is written.
pub(crate) const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// A warning that may repeat (an intake failing, a client sending garbage): written at most
/// once per [`WARN_INTERVAL`] per `key`, with the number of repeats suppressed since.
pub(crate) fn warn_limited(key: &'static str, msg: impl FnOnce() -> String) {
    static SEEN: Mutex<Vec<(&'static str, Instant, u64)>> = Mutex::new(Vec::new());
    let admitted = {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        admit(&mut seen, key, Instant::now())
    };
    let Some(suppressed) = admitted else { return };
    let mut text = msg();
    if suppressed > 0 {
        text.push_str(&format!(
            " ({suppressed} more like this in the last {}s)",
            WARN_INTERVAL.as_secs()
        ));
    }
    warn(&text);
}

/// Whether a warning of `key` may be written at `now`: `Some(repeats suppressed since the
/// last one written)`, or `None` to suppress (and count) it.
fn admit(
    seen: &mut Vec<(&'static str, Instant, u64)>,
    key: &'static str,
    now: Instant,
) -> Option<u64> {
    match seen.iter_mut().find(|(k, _, _)| *k == key) {
        Some((_, last, n)) if now.duration_since(*last) < WARN_INTERVAL => {
            *n += 1;
            None
        }
        Some((_, last, n)) => {
            *last = now;
            Some(std::mem::take(n))
        }
        None => {
            seen.push((key, now, 0));
            Some(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_warnings_are_written_once_per_interval_with_the_count_suppressed() {
        let mut seen = Vec::new();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(admit(&mut seen, "a", t0), Some(0));
        assert_eq!(admit(&mut seen, "a", t0 + s), None);
        assert_eq!(admit(&mut seen, "a", t0 + 9 * s), None);
        assert_eq!(admit(&mut seen, "b", t0 + 9 * s), Some(0)); // keys are independent
        assert_eq!(admit(&mut seen, "a", t0 + WARN_INTERVAL), Some(2));
        assert_eq!(admit(&mut seen, "a", t0 + WARN_INTERVAL + s), None);
        assert_eq!(admit(&mut seen, "a", t0 + 3 * WARN_INTERVAL), Some(1));
    }

    #[test]
    fn agent_level_names_parse() {
        let cases = [
            ("trace", Level::Debug),
            ("DEBUG", Level::Debug),
            ("info", Level::Info),
            ("warn", Level::Warn),
            ("warning", Level::Warn),
            ("error", Level::Error),
            ("critical", Level::Error),
            ("off", Level::Off),
        ];
        for (name, want) in cases {
            assert_eq!(Level::parse(name), Some(want), "{name}");
        }
        assert_eq!(Level::parse("loud"), None);
        assert!(Level::Error < Level::Warn && Level::Info < Level::Debug);
        for l in [
            Level::Off,
            Level::Error,
            Level::Warn,
            Level::Info,
            Level::Debug,
        ] {
            assert_eq!(Level::from_u8(l as u8), l);
        }
    }
}
