//! The console output, used whenever no intake is configured: one line per series point,
//! sketch, event and service check on stdout.

use std::io::Write;

use crate::flush::{Flushed, Output};

/// Writes one readable line per item to a writer (stdout for the daemon):
///
/// ```text
/// series page.views rate ts=1700000000 value=0.1 interval=10 host=web1 tags=env:dev
/// sketch latency ts=1700000000 count=3 min=1 max=9 sum=15 avg=5 bins=3 host=web1 tags=
/// event ts=1700000000 priority=normal alert=info host=web1 title="deploy" text="v2" tags=
/// service_check db.up status=2 ts=1700000000 host=web1 message="refused" tags=a:b
/// ```
///
/// Values print in Rust's shortest round-trip form, so parsing a line gives the exact `f64`.
/// What clients sent prints with control characters escaped (`\u{1b}`), so no client can
/// move the cursor, clear the screen or forge a line on the operator's terminal.
pub(crate) struct Console<W: Write + Send> {
    out: W,
}

impl<W: Write + Send> Console<W> {
    pub fn new(out: W) -> Console<W> {
        Console { out }
    }

    fn write_all(&mut self, f: &Flushed) -> std::io::Result<()> {
        let out = &mut self.out;
        for s in &f.series {
            let c = &s.context;
            writeln!(
                out,
                "series {}{} {} ts={} value={} interval={} host={} tags={}",
                Shown(c.name()),
                s.suffix,
                s.kind.label(),
                s.timestamp,
                s.value,
                s.interval,
                Shown(c.host()),
                join(c.tags()),
            )?;
        }
        for p in &f.sketches {
            let c = &p.context;
            let sum = p.sketch.summary();
            writeln!(
                out,
                "sketch {} ts={} count={} min={} max={} sum={} avg={} bins={} host={} tags={}",
                Shown(c.name()),
                p.timestamp,
                sum.count,
                sum.min,
                sum.max,
                sum.sum,
                sum.avg,
                p.sketch.bins().len(),
                Shown(c.host()),
                join(c.tags()),
            )?;
        }
        for e in &f.events {
            writeln!(
                out,
                "event ts={} priority={} alert={} host={} aggregation_key={:?} source_type={:?} title={:?} text={:?} tags={}",
                e.timestamp,
                e.priority.label(),
                e.alert_type.label(),
                Shown(&e.host),
                e.aggregation_key,
                e.source_type,
                e.title,
                e.text,
                join(e.tags.iter().map(|t| &t[..])),
            )?;
        }
        for c in &f.service_checks {
            writeln!(
                out,
                "service_check {} status={} ts={} host={} message={:?} tags={}",
                Shown(&c.name),
                c.status.code(),
                c.timestamp,
                Shown(&c.host),
                c.message,
                join(c.tags.iter().map(|t| &t[..])),
            )?;
        }
        out.flush()
    }
}

fn join<'a>(tags: impl Iterator<Item = &'a str>) -> String {
    let mut s = String::new();
    for (i, t) in tags.enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&Shown(t).to_string());
    }
    s
}

/// Client text with its control characters (C0, DEL, C1) escaped as `\u{..}`.
struct Shown<'a>(&'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(char::is_control) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            write!(f, "\\u{{{:x}}}", c as u32)?;
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

impl<W: Write + Send> Output for Console<W> {
    fn emit(&mut self, flushed: Flushed) {
        // stdout closed (e.g. piped into `head`) is not a reason to stop aggregating.
        let _ = self.write_all(&flushed);
    }
}
