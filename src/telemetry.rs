//! Telemetry primitives: the counters and gauges each stage owns, a table of them indexed by
//! a label enum, and the [`Snapshot`] that collects every stage's readings (written to the
//! log on SIGUSR1 and at exit, served as JSON and Prometheus text by the status endpoint).
//!
//! This module knows no stage. Each stage declares its own counter struct
//! (`listener::Counters`, `worker::Counters`, `flush::Counters`, `forwarder::Counters`),
//! built once and shared by its threads, and renders its own readings through
//! [`Readings`]; the daemon asks each of them for a snapshot. Hot paths count into
//! thread-local tallies and add them here once per batch, so no cache line bounces per
//! packet.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Index, IndexMut};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A count that only goes up, shared between threads.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` (nothing is written when `n` is 0, so idle tallies cost no cache traffic).
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        if n > 0 {
            self.0.fetch_add(n, Relaxed);
        }
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A level that goes up and down (bytes waiting, live contexts), shared between threads.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// An enum whose values label a reading (`transport="udp"`).
pub trait Label: Copy + Eq + 'static {
    /// The label's name, e.g. `transport`.
    const NAME: &'static str;
    /// Every value, each at the index of its discriminant (`ALL[v.index()] == v`).
    const ALL: &'static [Self];
    /// The value as a label.
    fn label(self) -> &'static str;
    /// The position of the value in [`Label::ALL`].
    fn index(self) -> usize;
}

/// Declares a fieldless enum whose values label readings: the enum, its `COUNT`, and its
/// [`Label`] implementation, with `ALL` in declaration order and each value's discriminant
/// its index, so neither can drift from the other.
///
/// ```text
/// labels! {
///     /// Where packets come from.
///     pub enum Transport: "transport" {
///         Udp = "udp",
///         Unix = "unix",
///     }
/// }
/// ```
macro_rules! labels {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $key:literal {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const COUNT: usize = <Self as $crate::telemetry::Label>::ALL.len();
        }

        impl $crate::telemetry::Label for $name {
            const NAME: &'static str = $key;
            const ALL: &'static [$name] = &[$($name::$variant,)+];

            fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            fn index(self) -> usize {
                self as usize
            }
        }
    };
}
pub(crate) use labels;

/// One `T` per value of the label `L`, indexed by it. `N` is `L::ALL.len()`, written as the
/// enum's own constant (`PerLabel<Transport, Counter, { Transport::COUNT }>`), and checked
/// when a table is built.
#[derive(Debug, Clone)]
pub struct PerLabel<L, T, const N: usize> {
    values: [T; N],
    label: PhantomData<L>,
}

impl<L: Label, T: Default, const N: usize> Default for PerLabel<L, T, N> {
    fn default() -> Self {
        const { assert!(N == L::ALL.len(), "N must be the label's number of values") };
        PerLabel {
            values: std::array::from_fn(|_| T::default()),
            label: PhantomData,
        }
    }
}

impl<L: Label, T, const N: usize> PerLabel<L, T, N> {
    /// Each label value with its entry, in [`Label::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (L, &T)> {
        L::ALL.iter().copied().zip(self.values.iter())
    }
}

impl<L: Label, T, const N: usize> Index<L> for PerLabel<L, T, N> {
    type Output = T;

    fn index(&self, label: L) -> &T {
        &self.values[label.index()]
    }
}

impl<L: Label, T, const N: usize> IndexMut<L> for PerLabel<L, T, N> {
    fn index_mut(&mut self, label: L) -> &mut T {
        &mut self.values[label.index()]
    }
}

/// What a reading measures: Prometheus' counter (only goes up) or gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One counter or gauge value, with its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    pub name: &'static str,
    pub labels: Vec<(&'static str, &'static str)>,
    pub kind: Kind,
    pub value: u64,
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}=\"{v}\"")?;
            }
            f.write_str("}")?;
        }
        write!(f, " {}", self.value)
    }
}

/// `s` as a `&'static str` for a label value or a log key, kept once however often it is
/// asked for. Only names from the configuration come here (an additional intake's address),
/// so what is kept is bounded by what was configured.
pub(crate) fn intern(s: &str) -> &'static str {
    static KEPT: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = kept.iter().find(|k| **k == s) {
        return k;
    }
    let k: &'static str = Box::leak(s.to_owned().into_boxed_str());
    kept.push(k);
    k
}

/// Something that reports readings: a stage's counters, or a gauge read on demand.
pub trait Readings {
    /// Appends every reading to `out`.
    fn read(&self, out: &mut Snapshot);
}

/// Every reading at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub readings: Vec<Reading>,
}

impl Snapshot {
    /// Reads each source in turn.
    pub fn of(sources: &[&dyn Readings]) -> Snapshot {
        let mut out = Snapshot::default();
        for s in sources {
            s.read(&mut out);
        }
        out
    }

    pub fn counter(&mut self, name: &'static str, labels: &[(&'static str, &'static str)], v: u64) {
        self.push(name, labels, Kind::Counter, v);
    }

    pub fn gauge(&mut self, name: &'static str, labels: &[(&'static str, &'static str)], v: u64) {
        self.push(name, labels, Kind::Gauge, v);
    }

    /// One counter per value of `L`, labelled `L::NAME`.
    pub(crate) fn per_label<L: Label, const N: usize>(
        &mut self,
        name: &'static str,
        table: &PerLabel<L, Counter, N>,
    ) {
        for (l, c) in table.iter() {
            self.counter(name, &[(L::NAME, l.label())], c.get());
        }
    }

    fn push(
        &mut self,
        name: &'static str,
        labels: &[(&'static str, &'static str)],
        kind: Kind,
        value: u64,
    ) {
        self.readings.push(Reading {
            name,
            labels: labels.to_vec(),
            kind,
            value,
        });
    }

    /// The value of the reading with this name and exactly these labels (0 when absent).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.readings
            .iter()
            .find(|r| {
                r.name == name
                    && r.labels.len() == labels.len()
                    && r.labels
                        .iter()
                        .zip(labels)
                        .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
            })
            .map_or(0, |r| r.value)
    }

    /// The readings with every name's readings together, in the order names first appear:
    /// stages may report under one name (`whippet_dropped_total` has reasons from several).
    pub(crate) fn grouped(&self) -> Vec<&Reading> {
        let mut names: Vec<&'static str> = Vec::new();
        for r in &self.readings {
            if !names.contains(&r.name) {
                names.push(r.name);
            }
        }
        let mut out: Vec<&Reading> = self.readings.iter().collect();
        out.sort_by_key(|r| names.iter().position(|n| *n == r.name));
        out
    }

    /// The Prometheus text format: a `# TYPE` line per name, then its samples.
    pub(crate) fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut last = "";
        for r in self.grouped() {
            if r.name != last {
                let kind = match r.kind {
                    Kind::Counter => "counter",
                    Kind::Gauge => "gauge",
                };
                out.push_str(&format!("# TYPE {} {kind}\n", r.name));
                last = r.name;
            }
            out.push_str(&format!("{r}\n"));
        }
        out
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in self.grouped() {
            writeln!(f, "{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Color {
        Red = 0,
        Blue = 1,
    }

    impl Color {
        const COUNT: usize = Self::ALL.len();
    }

    impl Label for Color {
        const NAME: &'static str = "color";
        const ALL: &'static [Color] = &[Color::Red, Color::Blue];
        fn label(self) -> &'static str {
            match self {
                Color::Red => "red",
                Color::Blue => "blue",
            }
        }
        fn index(self) -> usize {
            self as usize
        }
    }

    struct Stage {
        by_color: PerLabel<Color, Counter, { Color::COUNT }>,
        waiting: Gauge,
    }

    impl Readings for Stage {
        fn read(&self, out: &mut Snapshot) {
            out.per_label("test_things_total", &self.by_color);
            out.gauge("test_waiting", &[], self.waiting.get());
        }
    }

    #[test]
    fn a_snapshot_reads_each_stage_by_name_and_labels() {
        let stage = Stage {
            by_color: PerLabel::default(),
            waiting: Gauge::default(),
        };
        stage.by_color[Color::Blue].add(3);
        stage.by_color[Color::Blue].add(0);
        stage.waiting.set(7);
        let s = Snapshot::of(&[&stage]);
        assert_eq!(s.get("test_things_total", &[("color", "blue")]), 3);
        assert_eq!(s.get("test_things_total", &[("color", "red")]), 0);
        assert_eq!(s.get("test_waiting", &[]), 7);
        assert_eq!(s.get("test_waiting", &[("color", "red")]), 0);
        assert_eq!(
            s.to_string(),
            "test_things_total{color=\"red\"} 0\ntest_things_total{color=\"blue\"} 3\ntest_waiting 7\n"
        );
    }

    #[test]
    fn prometheus_types_each_name_once_even_when_stages_interleave_it() {
        let mut s = Snapshot::default();
        s.counter("whippet_dropped_total", &[("reason", "a")], 1);
        s.gauge("whippet_queue_depth", &[], 0);
        s.counter("whippet_dropped_total", &[("reason", "b")], 2);
        assert_eq!(
            s.prometheus(),
            "# TYPE whippet_dropped_total counter\n\
             whippet_dropped_total{reason=\"a\"} 1\n\
             whippet_dropped_total{reason=\"b\"} 2\n\
             # TYPE whippet_queue_depth gauge\n\
             whippet_queue_depth 0\n"
        );
    }

    #[test]
    fn a_table_has_one_entry_per_label_value_in_order() {
        let mut t: PerLabel<Color, u64, { Color::COUNT }> = PerLabel::default();
        t[Color::Red] += 2;
        t[Color::Blue] += 5;
        let seen: Vec<(Color, u64)> = t.iter().map(|(c, v)| (c, *v)).collect();
        assert_eq!(seen, [(Color::Red, 2), (Color::Blue, 5)]);
    }
}
