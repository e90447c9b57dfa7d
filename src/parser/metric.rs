//! Metric messages: `name:value[:value...]|type[|@rate][|#tags][|Tts][|c:..][|e:..][|card:..]`.
//!
//! ```text
//!  page.views:1:2|c|@0.5|#env:dev,host:web1|T1700000000|c:ci-123|e:ext|card:low
//!  └── name ─┘└val┘ │  └rate┘ └──── tags ───┘ └─ ts ───┘ └────── origin ───────┘
//!                   └ type: c g h ms d s
//! ```

use super::{positive_int, split_at_byte, split_at_pipes, split_once, OriginFields, Reason};

/// The metric type, matched exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Count,
    Gauge,
    Histogram,
    Timer,
    Distribution,
    Set,
}

impl MetricKind {
    /// Every type, each at the index of its discriminant (`ALL[k as usize] == k`).
    pub(crate) const ALL: [MetricKind; 6] = [
        MetricKind::Count,
        MetricKind::Gauge,
        MetricKind::Histogram,
        MetricKind::Timer,
        MetricKind::Distribution,
        MetricKind::Set,
    ];

    pub(crate) fn from_wire(s: &str) -> Option<MetricKind> {
        Some(match s {
            "c" => MetricKind::Count,
            "g" => MetricKind::Gauge,
            "h" => MetricKind::Histogram,
            "ms" => MetricKind::Timer,
            "d" => MetricKind::Distribution,
            "s" => MetricKind::Set,
            _ => return None,
        })
    }

    pub(crate) fn wire(self) -> &'static str {
        match self {
            MetricKind::Count => "c",
            MetricKind::Gauge => "g",
            MetricKind::Histogram => "h",
            MetricKind::Timer => "ms",
            MetricKind::Distribution => "d",
            MetricKind::Set => "s",
        }
    }
}

/// The value part of a metric, already validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Values<'a> {
    /// The common case, parsed once.
    One(f64),
    /// Several `:`-separated numbers, all known to parse; [`Values::iter`] reads them again,
    /// and the worker takes them from the buffer it gave the parser.
    Many(&'a str),
    /// A set member: an opaque string, colons included.
    Member(&'a str),
}

impl<'a> Values<'a> {
    /// The numeric values, in order (a set member yields nothing).
    pub fn iter(&self) -> impl Iterator<Item = f64> + 'a {
        let (one, many) = match *self {
            Values::One(v) => (Some(v), ""),
            Values::Many(s) => (None, s),
            Values::Member(_) => (None, ""),
        };
        one.into_iter().chain(
            split_at_byte(many, b':')
                .filter(|item| !item.is_empty())
                .filter_map(|item| number(item).ok()),
        )
    }
}

/// A parsed metric message, borrowing from the packet.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric<'a> {
    pub name: &'a str,
    pub values: Values<'a>,
    pub kind: MetricKind,
    /// In (0, 1]; 1 when absent or invalid.
    pub sample_rate: f64,
    /// The `@` field was a number outside (0, 1] and was replaced by 1 (counted; **whippet
    /// differs**: docs/behaviour.md, "Differences from the Agent").
    pub sample_rate_invalid: bool,
    /// The raw tag list (`a:b,c`), empty when absent. Not split here: the worker does that
    /// while it builds the context, so tags are walked once.
    pub tags: &'a str,
    pub timestamp: Option<i64>,
    pub origin: OriginFields<'a>,
}

/// Parses a metric line (known to be UTF-8, no `\n`).
pub fn parse(line: &str) -> Result<Metric<'_>, Reason> {
    parse_split(line, None, &mut Vec::new())
}

/// [`parse`], given the offsets of every `|` in `line` when the scan for its end found them.
/// A metric of several values ([`Values::Many`]) leaves them in `many`, read as they were
/// checked, so that the worker does not read them again; `many` is untouched otherwise.
pub(crate) fn parse_split<'a>(
    line: &'a str,
    pipes: Option<&[u32]>,
    many: &mut Vec<f64>,
) -> Result<Metric<'a>, Reason> {
    let mut pieces = split_at_pipes(line, pipes);
    let head = pieces.next().unwrap_or_default();
    let type_field = pieces.next().ok_or(Reason::MissingType)?;
    let (name, raw_values) = split_once(head, b':').ok_or(Reason::MissingValue)?;
    if name.is_empty() {
        return Err(Reason::EmptyName);
    }
    if type_field.is_empty() {
        return Err(Reason::MissingType);
    }
    let kind = MetricKind::from_wire(type_field).ok_or(Reason::UnknownType)?;
    let values = values(kind, raw_values, many)?;

    let mut metric = Metric {
        name,
        values,
        kind,
        sample_rate: 1.0,
        sample_rate_invalid: false,
        tags: "",
        timestamp: None,
        origin: OriginFields::default(),
    };
    for field in pieces {
        match field.as_bytes().first() {
            Some(b'@') => {
                // **whippet differs:** a rate outside (0, 1] is treated as 1 and counted; the
                // Agent divides by zero for `@0`.
                let rate = field[1..]
                    .parse::<f64>()
                    .map_err(|_| Reason::InvalidSampleRate)?;
                let valid = rate > 0.0 && rate <= 1.0;
                metric.sample_rate = if valid { rate } else { 1.0 };
                metric.sample_rate_invalid = !valid;
            }
            Some(b'#') => metric.tags = &field[1..],
            Some(b'T') => {
                metric.timestamp = Some(positive_int(&field[1..]).ok_or(Reason::InvalidTimestamp)?)
            }
            // Origin fields; unknown fields are ignored (forward compatibility with newer
            // clients).
            Some(b'c' | b'e') => {
                metric.origin.read(field);
            }
            _ => {}
        }
    }
    Ok(metric)
}

fn values<'a>(kind: MetricKind, raw: &'a str, many: &mut Vec<f64>) -> Result<Values<'a>, Reason> {
    if kind == MetricKind::Set {
        return if raw.is_empty() {
            Err(Reason::EmptyValue)
        } else {
            Ok(Values::Member(raw))
        };
    }
    if memchr::memchr(b':', raw.as_bytes()).is_none() {
        return if raw.is_empty() {
            Err(Reason::EmptyValue)
        } else {
            number(raw).map(Values::One)
        };
    }
    // Several values: every non-empty item must parse; one bad item rejects the message.
    many.clear();
    for item in split_at_byte(raw, b':').filter(|item| !item.is_empty()) {
        many.push(number(item)?);
    }
    if many.is_empty() {
        Err(Reason::EmptyValue)
    } else {
        Ok(Values::Many(raw))
    }
}

/// A value as Go's `strconv.ParseFloat` reads decimal forms (`+5`, `-5`, `1e3`, `.5`).
/// **whippet differs:** NaN, infinities and values beyond `f64` range are rejected, because
/// JSON cannot carry them and they poison every aggregate they touch.
#[inline]
pub fn number(s: &str) -> Result<f64, Reason> {
    match integer(s) {
        Some(v) => Ok(v),
        None => decimal(s),
    }
}

/// [`number`] for what is not a plain integer: kept out of line, so that the integer path
/// inlined into its callers stays small.
#[inline(never)]
fn decimal(s: &str) -> Result<f64, Reason> {
    // Rust's float grammar also accepts "inf", "infinity" and "nan"; all are non-finite and
    // rejected below, so the accepted grammar is exactly the decimal one.
    let v: f64 = s.parse().map_err(|_| Reason::InvalidValue)?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Reason::NonFiniteValue)
    }
}

/// A plain integer of at most 19 digits, optionally signed, as the nearest `f64`: the fast
/// path for the commonest values (every value in the benchmark corpus). The `u64` holds it
/// exactly and `as f64` rounds to nearest-even, as parsing the decimal string does, so the
/// result is bit-identical to `str::parse::<f64>` (tested).
fn integer(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let (negative, mut digits) = match b.first()? {
        b'-' => (true, &b[1..]),
        b'+' => (false, &b[1..]),
        _ => (false, b),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut n: u64 = 0;
    while let Some((eight, rest)) = digits.split_first_chunk::<8>() {
        n = n * 100_000_000 + eight_digits(u64::from_le_bytes(*eight))?;
        digits = rest;
    }
    for &d in digits {
        let d = d.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n * 10 + d as u64;
    }
    let v = n as f64;
    Some(if negative { -v } else { v })
}

/// The value of eight ASCII digits read as a little-endian `u64` (the first digit in the low
/// byte), or `None` if a byte is not a digit: three multiplies instead of eight, for the long
/// integers many clients send.
fn eight_digits(chunk: u64) -> Option<u64> {
    const NIBBLES: u64 = 0xf0f0_f0f0_f0f0_f0f0;
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    // A digit's high nibble is 3, and stays 3 when 6 is added (no byte carries into the next:
    // each is at most 0x3f once the first test passed).
    if chunk & NIBBLES != ZEROS || chunk.wrapping_add(0x0606_0606_0606_0606) & NIBBLES != ZEROS {
        return None;
    }
    // Each step joins neighbouring lanes: the lower one holds the more significant digits.
    let v = chunk - ZEROS;
    let v = (v.wrapping_mul(1 + (10 << 8)) >> 8) & 0x00ff_00ff_00ff_00ff;
    let v = (v.wrapping_mul(1 + (100 << 16)) >> 16) & 0x0000_ffff_0000_ffff;
    Some(v.wrapping_mul(1 + (10_000 << 32)) >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_sits_at_its_discriminant_and_round_trips_its_wire_form() {
        for (i, kind) in MetricKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i);
            assert_eq!(MetricKind::from_wire(kind.wire()), Some(kind));
        }
    }

    #[test]
    fn the_integer_fast_path_is_bit_identical_to_parsing_the_decimal() {
        let mut cases: Vec<String> = [
            "0",
            "-0",
            "+0",
            "1",
            "-1",
            "+7",
            "42",
            "9007199254740992",
            "9007199254740993",
            "9007199254740995",
            "-9007199254740993",
            "18014398509481985",
            "-7331781976144167000",
            "4521940842906420850",
            "9999999999999999999",
            "-9999999999999999999",
            "0000000000000000001",
            "1234567890123456789",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let digits = (x % 19) as usize + 1;
            let n = x % 10u64.pow(digits as u32);
            cases.push(if x & (1 << 40) == 0 {
                format!("{n}")
            } else {
                format!("-{n}")
            });
        }
        for s in &cases {
            let fast = integer(s).unwrap_or_else(|| panic!("{s} takes the fast path"));
            let slow: f64 = s.parse().unwrap();
            assert_eq!(fast.to_bits(), slow.to_bits(), "{s}");
        }
        for s in [
            "",
            "-",
            "+",
            "1.5",
            "1e3",
            "12345678901234567890",
            "1_0",
            " 1",
            "--1",
            "nan",
        ] {
            assert_eq!(integer(s), None, "{s}");
        }
        // Every byte next to a digit's, at every place of every length.
        for len in 1..=19 {
            for at in 0..len {
                for bad in ['/', ':', '?', '@', '.', 'a', ' ', '\0', '\u{7f}', '\u{e9}'] {
                    let mut s: String = "9".repeat(len);
                    s.replace_range(at..at + 1, &bad.to_string());
                    assert_eq!(integer(&s), None, "{s:?}");
                }
            }
        }
    }

    fn ok(line: &str) -> Metric<'_> {
        parse(line).unwrap_or_else(|e| panic!("{line:?} should parse: {e:?}"))
    }

    #[test]
    fn every_type_is_matched_exactly() {
        let cases = [
            ("a:1|c", Ok(MetricKind::Count)),
            ("a:1|g", Ok(MetricKind::Gauge)),
            ("a:1|h", Ok(MetricKind::Histogram)),
            ("a:1|ms", Ok(MetricKind::Timer)),
            ("a:1|d", Ok(MetricKind::Distribution)),
            ("a:1|s", Ok(MetricKind::Set)),
            ("a:1|C", Err(Reason::UnknownType)),
            ("a:1|cc", Err(Reason::UnknownType)),
            ("a:1|m", Err(Reason::UnknownType)),
            ("a:1|x", Err(Reason::UnknownType)),
            ("a:1| c", Err(Reason::UnknownType)),
            ("a:1|", Err(Reason::MissingType)),
            ("a:1||#t", Err(Reason::MissingType)),
            ("a:1", Err(Reason::MissingType)),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line).map(|m| m.kind), want, "{line:?}");
        }
    }

    #[test]
    fn name_and_value_split_at_the_first_colon() {
        let cases = [
            ("a:1|c", Ok(("a", Values::One(1.0)))),
            ("a.b-c_d:2|c", Ok(("a.b-c_d", Values::One(2.0)))),
            ("a:1:2|d", Ok(("a", Values::Many("1:2")))),
            ("s:x:y|s", Ok(("s", Values::Member("x:y")))),
            (":1|c", Err(Reason::EmptyName)),
            ("a:|c", Err(Reason::EmptyValue)),
            ("a|c", Err(Reason::MissingValue)),
            ("a::|c", Err(Reason::EmptyValue)),
            ("s:|s", Err(Reason::EmptyValue)),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line).map(|m| (m.name, m.values)), want, "{line:?}");
        }
    }

    #[test]
    fn values_parse_like_go_decimal_floats_and_reject_non_finite() {
        let cases = [
            ("+5", Ok(5.0)),
            ("-5", Ok(-5.0)),
            ("1e3", Ok(1000.0)),
            ("1E3", Ok(1000.0)),
            (".5", Ok(0.5)),
            ("5.", Ok(5.0)),
            ("-0.25e-2", Ok(-0.0025)),
            ("-7331781976144167000", Ok(-7331781976144167000.0)),
            ("1.7976931348623157e308", Ok(f64::MAX)),
            ("NaN", Err(Reason::NonFiniteValue)),
            ("nan", Err(Reason::NonFiniteValue)),
            ("Inf", Err(Reason::NonFiniteValue)),
            ("-inf", Err(Reason::NonFiniteValue)),
            ("+Infinity", Err(Reason::NonFiniteValue)),
            ("1e309", Err(Reason::NonFiniteValue)),
            ("-1e400", Err(Reason::NonFiniteValue)),
            ("0x10", Err(Reason::InvalidValue)),
            ("1_000", Err(Reason::InvalidValue)),
            ("1,5", Err(Reason::InvalidValue)),
            (" 1", Err(Reason::InvalidValue)),
            ("e5", Err(Reason::InvalidValue)),
            ("abc", Err(Reason::InvalidValue)),
            ("--1", Err(Reason::InvalidValue)),
        ];
        for (value, want) in cases {
            assert_eq!(number(value), want, "{value:?}");
            let line = format!("m:{value}|g");
            let got = parse(&line).map(|m| m.values);
            assert_eq!(got, want.map(Values::One), "{line:?}");
        }
    }

    #[test]
    fn several_values_are_allowed_for_every_type_but_sets() {
        let cases: [(&str, Result<Vec<f64>, Reason>); 8] = [
            ("m:1:2:3|c", Ok(vec![1.0, 2.0, 3.0])),
            ("m:1:2:3|g", Ok(vec![1.0, 2.0, 3.0])),
            ("m:1:2|h", Ok(vec![1.0, 2.0])),
            ("m:1:2|ms", Ok(vec![1.0, 2.0])),
            ("m:1::2:|d", Ok(vec![1.0, 2.0])),
            ("m::5|d", Ok(vec![5.0])),
            ("m:1:x:3|d", Err(Reason::InvalidValue)),
            ("m:1:nan|c", Err(Reason::NonFiniteValue)),
        ];
        for (line, want) in cases {
            let got = parse(line).map(|m| m.values.iter().collect::<Vec<_>>());
            assert_eq!(got, want, "{line:?}");
            // The values were also left in the caller's buffer, replacing what it held.
            let mut many = vec![9.0; 4];
            if parse_split(line, None, &mut many).is_ok() {
                assert_eq!(Ok(many), want, "{line:?}");
            }
        }
        // One value leaves the buffer as it was.
        let mut many = vec![9.0];
        assert_eq!(
            parse_split("m:4|c", None, &mut many).map(|m| m.values),
            Ok(Values::One(4.0))
        );
        assert_eq!(many, [9.0]);
        // A set value is opaque: colons and all.
        assert_eq!(ok("u:a:b:c|s").values, Values::Member("a:b:c"));
        assert_eq!(ok("u:a:b:c|s").values.iter().count(), 0);
    }

    #[test]
    fn a_gauge_with_a_sign_is_a_plain_value_not_a_delta() {
        assert_eq!(ok("g:+5|g").values, Values::One(5.0));
        assert_eq!(ok("g:-5|g").values, Values::One(-5.0));
    }

    #[test]
    fn sample_rates_outside_zero_to_one_become_one_and_are_flagged() {
        let cases = [
            ("m:1|c|@0.5", Ok((0.5, false))),
            ("m:1|c|@1", Ok((1.0, false))),
            ("m:1|c|@.25", Ok((0.25, false))),
            ("m:1|c|@0", Ok((1.0, true))),
            ("m:1|c|@-0.5", Ok((1.0, true))),
            ("m:1|c|@2", Ok((1.0, true))),
            ("m:1|c|@nan", Ok((1.0, true))),
            ("m:1|c|@inf", Ok((1.0, true))),
            ("m:1|c|@", Err(Reason::InvalidSampleRate)),
            ("m:1|c|@abc", Err(Reason::InvalidSampleRate)),
            ("m:1|c", Ok((1.0, false))),
        ];
        for (line, want) in cases {
            let got = parse(line).map(|m| (m.sample_rate, m.sample_rate_invalid));
            assert_eq!(got, want, "{line:?}");
        }
    }

    #[test]
    fn optional_fields_come_in_any_order_and_the_last_repeat_wins() {
        let a = ok("m:1|c|#a:b,c|@0.5|T1700000000|c:cid|e:ext|card:high");
        let b = ok("m:1|c|card:high|e:ext|c:cid|T1700000000|@0.5|#a:b,c");
        for m in [&a, &b] {
            assert_eq!(m.tags, "a:b,c");
            assert_eq!(m.sample_rate, 0.5);
            assert_eq!(m.timestamp, Some(1_700_000_000));
            assert_eq!(m.origin.local, "cid");
            assert_eq!(m.origin.external, "ext");
            assert_eq!(m.origin.cardinality, "high");
        }
        let repeated = ok("m:1|c|#first|@0.5|#second|@0.25");
        assert_eq!(repeated.tags, "second");
        assert_eq!(repeated.sample_rate, 0.25);
    }

    #[test]
    fn unknown_and_empty_fields_are_ignored() {
        let m = ok("m:1|c||x:whatever|cx|#t|zzz");
        assert_eq!(m.tags, "t");
        assert_eq!(m.sample_rate, 1.0);
        assert_eq!(m.origin.local, "");
    }

    #[test]
    fn a_field_starting_with_t_must_be_a_positive_integer() {
        let cases = [
            ("m:1|g|T1", Ok(Some(1))),
            ("m:1|g|T1700000000", Ok(Some(1_700_000_000))),
            ("m:1|g|T", Err(Reason::InvalidTimestamp)),
            ("m:1|g|T0", Err(Reason::InvalidTimestamp)),
            ("m:1|g|T-5", Err(Reason::InvalidTimestamp)),
            ("m:1|g|T1.5", Err(Reason::InvalidTimestamp)),
            ("m:1|g|Tabc", Err(Reason::InvalidTimestamp)),
            ("m:1|g|t123", Ok(None)),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line).map(|m| m.timestamp), want, "{line:?}");
        }
    }

    #[test]
    fn tags_are_kept_raw_for_the_worker_to_split() {
        assert_eq!(ok("m:1|c|#").tags, "");
        assert_eq!(ok("m:1|c|#a,b:c,,host:h").tags, "a,b:c,,host:h");
        assert_eq!(ok("m:1|c").tags, "");
    }
}
