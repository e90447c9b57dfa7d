//! The parser: one DogStatsD message (one line of a packet) → a borrowed [`Message`], or a
//! [`ParseError`] naming the kind of message and the reason.
//!
//! Pure: no I/O, no locks, no allocation. Every field borrows from the line, so a worker can
//! parse a whole packet and aggregate it while the packet buffer is still alive. The rules are
//! docs/behaviour.md, "Messages"; where whippet deliberately differs from the Agent, the
//! function says so.

pub mod event;
pub mod metric;
pub mod service_check;

pub use event::{AlertType, Event, Priority};
pub use metric::{Metric, MetricKind, Values};
pub use service_check::{CheckStatus, ServiceCheck};

/// The origin fields a client may add to any message (docs/behaviour.md, "Origin"): raw,
/// as they came; the enrichment stage reads them only when client origin detection is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OriginFields<'a> {
    /// `|c:`: the client's container (`ci-<id>`, `cid-<id>`, `in-<cgroup inode>`, or a bare
    /// id from older clients).
    pub local: &'a str,
    /// `|e:`: external data from the admission controller (`it-`, `cn-`, `pu-` items).
    pub external: &'a str,
    /// `|card:`: the tag cardinality the client asks for.
    pub cardinality: &'a str,
}

impl<'a> OriginFields<'a> {
    /// Reads `field` into the origin when it is one of the origin fields; `false` otherwise.
    #[inline]
    pub(crate) fn read(&mut self, field: &'a str) -> bool {
        match field.as_bytes() {
            [b'c', b':', ..] => self.local = &field[2..],
            [b'e', b':', ..] => self.external = &field[2..],
            [b'c', b'a', b'r', b'd', b':', ..] => self.cardinality = &field[5..],
            _ => return false,
        }
        true
    }

    /// The origin fields among `|`-separated optional fields; the last of each wins.
    pub(crate) fn of(optional: &'a str) -> OriginFields<'a> {
        let mut origin = OriginFields::default();
        for field in fields(optional) {
            origin.read(field);
        }
        origin
    }

    /// No origin field was given.
    pub fn is_empty(&self) -> bool {
        self.local.is_empty() && self.external.is_empty() && self.cardinality.is_empty()
    }
}

use crate::packet::Line;
use crate::telemetry::{labels, Label};

/// One parsed message, borrowing from the packet it came in.
#[derive(Debug, Clone, PartialEq)]
pub enum Message<'a> {
    Metric(Metric<'a>),
    Event(Event<'a>),
    ServiceCheck(ServiceCheck<'a>),
}

labels! {
    /// What a message claims to be, judged by its first bytes; labels counters.
    pub enum MessageKind: "kind" {
        Metric = "metric",
        Event = "event",
        ServiceCheck = "service_check",
    }
}

impl MessageKind {
    /// Classifies a line by its prefix: `_e{` is an event, `_sc|` a service check.
    pub fn of(line: &[u8]) -> MessageKind {
        if line.starts_with(b"_e{") {
            MessageKind::Event
        } else if line.starts_with(b"_sc|") {
            MessageKind::ServiceCheck
        } else {
            MessageKind::Metric
        }
    }
}

labels! {
    /// Why a message was rejected. `Copy`, so the hot path can count it without allocating.
    pub enum Reason: "reason" {
        /// The line is not valid UTF-8. **whippet differs:** the Agent passes the bytes on and the
        /// intake receives mangled strings; protobuf strings must be UTF-8, so we reject.
        InvalidUtf8 = "invalid_utf8",
        /// Metric: no `:` between name and value.
        MissingValue = "missing_value",
        /// Metric: nothing before the first `:`; service check: empty name.
        EmptyName = "empty_name",
        /// Metric: no value item (after skipping empty ones).
        EmptyValue = "empty_value",
        /// Metric: no `|type` field.
        MissingType = "missing_type",
        /// Metric: type is not one of `c g h ms d s`.
        UnknownType = "unknown_type",
        /// Metric: a value item is not a decimal number.
        InvalidValue = "invalid_value",
        /// Metric: a value is NaN, infinite or out of `f64` range (**whippet differs**:
        /// docs/behaviour.md, "Differences from the Agent").
        NonFiniteValue = "non_finite_value",
        /// Metric: the `@` field is not a number.
        InvalidSampleRate = "invalid_sample_rate",
        /// Metric: a field starting with `T` that is not a positive integer.
        InvalidTimestamp = "invalid_timestamp",
        /// Event: the `_e{<title_len>,<text_len>}:` header is malformed.
        InvalidHeader = "invalid_header",
        /// Event: the declared lengths do not match the message.
        InvalidLength = "invalid_length",
        /// Event: title length is 0.
        EmptyTitle = "empty_title",
        /// Service check: fewer than three `|`-separated parts.
        MissingField = "missing_field",
        /// Service check: status is not 0, 1, 2 or 3.
        InvalidStatus = "invalid_status",
    }
}

impl Reason {
    /// Whether a message of `kind` can be rejected for this reason: the counters that can
    /// never move are left out of the telemetry dump.
    pub fn applies_to(self, kind: MessageKind) -> bool {
        use Reason::*;
        match kind {
            _ if self == InvalidUtf8 => true,
            MessageKind::Metric => matches!(
                self,
                MissingValue
                    | EmptyName
                    | EmptyValue
                    | MissingType
                    | UnknownType
                    | InvalidValue
                    | NonFiniteValue
                    | InvalidSampleRate
                    | InvalidTimestamp
            ),
            MessageKind::Event => matches!(self, InvalidHeader | InvalidLength | EmptyTitle),
            MessageKind::ServiceCheck => matches!(self, EmptyName | MissingField | InvalidStatus),
        }
    }
}

/// A rejected message: what it claimed to be and why it was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParseError {
    pub kind: MessageKind,
    pub reason: Reason,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.label(), self.reason.label())
    }
}

/// Parses one message. `line` must not contain `\n`; a trailing `\r` is ignored.
pub fn parse(line: &[u8]) -> Result<Message<'_>, ParseError> {
    parse_line(Line::new(line))
}

/// [`parse`] for a line of a packet, whose ASCII check came with the search for its end
/// ([`crate::packet::scanned_lines`]).
pub fn parse_line(line: Line<'_>) -> Result<Message<'_>, ParseError> {
    parse_line_into(line, &mut Vec::new())
}

/// [`parse_line`], leaving the values of a metric that has several in `many` (see
/// [`metric::parse_split`]).
pub(crate) fn parse_line_into<'a>(
    line: Line<'a>,
    many: &mut Vec<f64>,
) -> Result<Message<'a>, ParseError> {
    let kind = MessageKind::of(line.bytes());
    let text = utf8(line).ok_or(ParseError {
        kind,
        reason: Reason::InvalidUtf8,
    })?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let fail = |reason| ParseError { kind, reason };
    match kind {
        MessageKind::Metric => metric::parse_split(text, line.pipes(), many)
            .map(Message::Metric)
            .map_err(fail),
        MessageKind::Event => event::parse(text).map(Message::Event).map_err(fail),
        MessageKind::ServiceCheck => service_check::parse(text)
            .map(Message::ServiceCheck)
            .map_err(fail),
    }
}

/// `line` as text, or `None` when it is not UTF-8. Messages are nearly always ASCII, and
/// checking for ASCII costs about half of full validation, so a line comes checked for ASCII
/// ([`Line`]) and only the rest are validated.
fn utf8(line: Line<'_>) -> Option<&str> {
    if line.is_ascii() {
        // SAFETY: a `Line` is ASCII when it says so, and ASCII bytes are valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(line.bytes()) })
    } else {
        std::str::from_utf8(line.bytes()).ok()
    }
}

/// Splits `s` at every `sep` (an ASCII byte), SIMD-accelerated with `memchr`.
pub(crate) fn split_at_byte(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut at = 0;
    memchr::memchr_iter(sep, s.as_bytes())
        .chain(std::iter::once(s.len()))
        .map(move |end| {
            // `sep` is ASCII, so both ends are character boundaries.
            let part = &s[at..end];
            at = end + 1;
            part
        })
}

/// `s` split at every `|`: at `pipes`, the offsets of every `|` in `s` in order when the scan
/// for the line's end found them ([`Line`]), or searched for here.
pub(crate) fn split_at_pipes<'a, 'p>(s: &'a str, pipes: Option<&'p [u32]>) -> Pieces<'a, 'p> {
    Pieces {
        s,
        at: 0,
        pipes: pipes.map(<[u32]>::iter),
        done: false,
    }
}

/// The iterator [`split_at_pipes`] returns.
pub(crate) struct Pieces<'a, 'p> {
    s: &'a str,
    at: usize,
    pipes: Option<std::slice::Iter<'p, u32>>,
    done: bool,
}

impl<'a> Iterator for Pieces<'a, '_> {
    type Item = &'a str;

    // Always inlined: a call cost more than the step itself where the scan found every `|`.
    #[inline(always)]
    fn next(&mut self) -> Option<&'a str> {
        if self.done {
            return None;
        }
        let end = match &mut self.pipes {
            Some(known) => known.next().map(|&o| o as usize),
            None => next_pipe(self.s, self.at),
        };
        let Some(end) = end else {
            self.done = true;
            return Some(&self.s[self.at..]);
        };
        debug_assert_eq!(self.s.as_bytes()[end], b'|');
        // `|` is ASCII, so both ends are character boundaries.
        let piece = &self.s[self.at..end];
        self.at = end + 1;
        Some(piece)
    }
}

/// The first `|` in `s` from `at` on.
#[inline(never)]
fn next_pipe(s: &str, at: usize) -> Option<usize> {
    memchr::memchr(b'|', &s.as_bytes()[at..]).map(|i| at + i)
}

/// The optional fields of every message kind: `s` split at `|`, searched for.
pub(crate) fn fields(s: &str) -> Pieces<'_, 'static> {
    split_at_pipes(s, None)
}

/// `s.split_once(sep)` for an ASCII byte, with `memchr`.
pub(crate) fn split_once(s: &str, sep: u8) -> Option<(&str, &str)> {
    let i = memchr::memchr(sep, s.as_bytes())?;
    Some((&s[..i], &s[i + 1..]))
}

/// Parses a strictly positive decimal integer (no sign, no spaces), as the `T` and `d:` fields
/// need. `None` for anything else, including overflow.
pub(crate) fn positive_int(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i64>().ok().filter(|&v| v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_no_larger_than_a_metric() {
        // A larger event would make every metric's `Message` bigger to move.
        assert_eq!(
            std::mem::size_of::<Message>(),
            std::mem::size_of::<Metric>()
        );
    }

    #[test]
    fn the_kind_of_a_line_comes_from_its_prefix() {
        let cases: [(&[u8], MessageKind); 5] = [
            (b"_e{1,1}:a|b", MessageKind::Event),
            (b"_sc|x|0", MessageKind::ServiceCheck),
            (b"_e", MessageKind::Metric),
            (b"_scx", MessageKind::Metric),
            (b"page.views:1|c", MessageKind::Metric),
        ];
        for (line, kind) in cases {
            assert_eq!(
                MessageKind::of(line),
                kind,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn invalid_utf8_is_rejected_and_labelled_with_the_claimed_kind() {
        let cases: [(&[u8], MessageKind); 3] = [
            (b"na\xffme:1|c", MessageKind::Metric),
            (b"_e{2,1}:\xff\xfe|x", MessageKind::Event),
            (b"_sc|n\xc3|0", MessageKind::ServiceCheck),
        ];
        for (line, kind) in cases {
            assert_eq!(
                parse(line),
                Err(ParseError {
                    kind,
                    reason: Reason::InvalidUtf8
                })
            );
        }
    }

    #[test]
    fn valid_non_ascii_utf8_parses_past_the_ascii_fast_path() {
        let Ok(Message::Metric(m)) = parse("café:1|c|#région:é,ü".as_bytes()) else {
            panic!("a UTF-8 metric must parse");
        };
        assert_eq!((m.name, m.tags), ("café", "région:é,ü"));
        // One bad byte after valid multi-byte characters is still caught.
        assert_eq!(
            parse(b"caf\xc3\xa9:1|c|#\xc3"),
            Err(ParseError {
                kind: MessageKind::Metric,
                reason: Reason::InvalidUtf8
            })
        );
    }

    #[test]
    fn a_trailing_carriage_return_is_ignored() {
        match parse(b"a:1|c\r").unwrap() {
            Message::Metric(m) => assert_eq!(m.kind, MetricKind::Count),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_reason_has_a_distinct_label() {
        let mut labels: Vec<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Reason::COUNT);
    }

    #[test]
    fn byte_splitting_matches_str_split() {
        for s in ["", "a", "|", "a|b", "||a||", "é|ü|", "no separator"] {
            assert_eq!(
                fields(s).collect::<Vec<_>>(),
                s.split('|').collect::<Vec<_>>(),
                "{s:?}"
            );
            assert_eq!(split_once(s, b'|'), s.split_once('|'), "{s:?}");
        }
    }

    #[test]
    fn positive_int_accepts_only_plain_positive_integers() {
        let cases = [
            ("1", Some(1)),
            ("1700000000", Some(1_700_000_000)),
            ("0", None),
            ("-5", None),
            ("+5", None),
            ("", None),
            ("12a", None),
            ("99999999999999999999", None),
        ];
        for (s, want) in cases {
            assert_eq!(positive_int(s), want, "{s:?}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Byte strings biased towards DogStatsD's delimiters, so the fuzzing reaches deep paths.
    fn dogstatsd_like() -> impl Strategy<Value = Vec<u8>> {
        let token = prop_oneof![
            Just(b"_e{".to_vec()),
            Just(b"_sc|".to_vec()),
            Just(b"|".to_vec()),
            Just(b":".to_vec()),
            Just(b",".to_vec()),
            Just(b"#".to_vec()),
            Just(b"@".to_vec()),
            Just(b"}".to_vec()),
            Just(b"|c".to_vec()),
            Just(b"|d".to_vec()),
            Just(b"|T".to_vec()),
            Just(b"host:".to_vec()),
            "[0-9]{1,4}".prop_map(String::into_bytes),
            "[a-z.]{1,6}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 1..4),
        ];
        proptest::collection::vec(token, 0..24).prop_map(|t| t.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn arbitrary_bytes_never_panic(line in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = parse(&line) {
                prop_assert!(e.reason.applies_to(e.kind), "{e:?}");
            }
        }

        #[test]
        fn dogstatsd_like_bytes_never_panic_and_errors_match_the_prefix(line in dogstatsd_like()) {
            match parse(&line) {
                Ok(Message::Metric(m)) => {
                    prop_assert!(!m.name.is_empty());
                    prop_assert!(m.sample_rate > 0.0 && m.sample_rate <= 1.0);
                    prop_assert!(m.values.iter().all(f64::is_finite));
                }
                Ok(Message::Event(e)) => prop_assert!(!e.title.is_empty()),
                Ok(Message::ServiceCheck(c)) => prop_assert!(!c.name.is_empty()),
                Err(e) => {
                    prop_assert!(e.reason.applies_to(e.kind), "{e:?}");
                    prop_assert_eq!(e.kind, MessageKind::of(line.strip_suffix(b"\r").unwrap_or(&line)))
                }
            }
        }

        #[test]
        fn a_metric_splits_alike_at_the_scanned_pipes_and_searching(line in dogstatsd_like()) {
            let line: Vec<u8> = line.into_iter().filter(|&b| b != b'\n').collect();
            let scanned = Line::new(&line);
            prop_assert!(scanned.pipes().is_some() || line.iter().filter(|&&b| b == b'|').count() > 8);
            if let Ok(text) = std::str::from_utf8(&line) {
                // A stale buffer: several values replace what it held.
                let mut many = vec![7.0; 3];
                let split = metric::parse_split(text, scanned.pipes(), &mut many);
                if let Ok(m @ metric::Metric { values: metric::Values::Many(_), .. }) = &split {
                    prop_assert_eq!(&many, &m.values.iter().collect::<Vec<_>>());
                }
                prop_assert_eq!(split, metric::parse(text));
            }
        }

        #[test]
        fn a_valid_metric_round_trips(
            name in "[a-zA-Z][a-zA-Z0-9_.]{0,30}",
            value in -1e12f64..1e12,
            kind in prop_oneof![Just("c"), Just("g"), Just("h"), Just("ms"), Just("d")],
            tags in proptest::collection::vec("[a-z]{1,5}:[a-z0-9]{1,5}", 0..5),
        ) {
            let line = format!("{name}:{value}|{kind}|#{}", tags.join(","));
            let Ok(Message::Metric(m)) = parse(line.as_bytes()) else {
                return Err(TestCaseError::fail(format!("{line} did not parse")));
            };
            prop_assert_eq!(m.name, name.as_str());
            prop_assert_eq!(m.values, Values::One(value));
            prop_assert_eq!(m.kind.wire(), kind);
            prop_assert_eq!(m.tags, tags.join(","));
        }
    }
}
