//! Event messages.
//!
//! ```text
//!  _e{5,11}:title|hello\nworld|d:1700000000|h:web1|k:agg|p:low|s:src|t:error|#a:b,c
//!     │ └ text length in bytes     └──────────── optional fields, any order ────┘
//!     └ title length in bytes
//! ```

use super::{fields, positive_int, OriginFields, Reason};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Normal,
    Low,
}

impl Priority {
    pub fn label(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertType {
    Info,
    Error,
    Warning,
    Success,
}

impl AlertType {
    pub fn label(self) -> &'static str {
        match self {
            AlertType::Info => "info",
            AlertType::Error => "error",
            AlertType::Warning => "warning",
            AlertType::Success => "success",
        }
    }
}

/// A parsed event, borrowing from the packet. `title` and `text` are raw: the two-byte
/// sequence `\n` still has to become a newline ([`unescape`]) when the event is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    pub title: &'a str,
    pub text: &'a str,
    /// `d:`, always positive (nonzero, so that it takes no more room than an `i64`).
    pub timestamp: Option<std::num::NonZeroI64>,
    pub host: Option<&'a str>,
    pub aggregation_key: &'a str,
    pub priority: Priority,
    pub source_type: &'a str,
    pub alert_type: AlertType,
    pub tags: &'a str,
    /// The optional fields as sent, for [`Event::origin`]: kept raw so that an event is no
    /// larger than a metric (every message moves at the size of the largest kind).
    fields: &'a str,
}

impl<'a> Event<'a> {
    /// The origin fields (`c:`, `e:`, `card:`); the last of each wins.
    pub fn origin(&self) -> OriginFields<'a> {
        OriginFields::of(self.fields)
    }
}

/// Parses an event line (starts with `_e{`, UTF-8, no `\n`).
///
/// As lenient as the Agent where a real client could tell: the title and text are taken by
/// their declared lengths whatever byte separates them, and whatever follows the text is read
/// as `|`-separated fields, so a text shorter than declared leaves its tail to be ignored as an
/// unknown field. **whippet differs** (docs/behaviour.md, "Differences from the Agent"): the
/// header must end in `}`, lengths are plain digits, and a length that ends inside a UTF-8
/// character is refused rather than cutting it.
pub fn parse(line: &str) -> Result<Event<'_>, Reason> {
    let (header, body) = super::split_once(line, b':').ok_or(Reason::InvalidHeader)?;
    let lengths = header
        .strip_prefix("_e{")
        .and_then(|h| h.strip_suffix('}'))
        .ok_or(Reason::InvalidHeader)?;
    let (title_len, text_len) = lengths.split_once(',').ok_or(Reason::InvalidHeader)?;
    let title_len = length(title_len)?;
    let text_len = length(text_len)?;
    if title_len == 0 {
        return Err(Reason::EmptyTitle);
    }
    // Lengths are in bytes; `get` also refuses a length that ends inside a character. The
    // byte between title and text is skipped unread, as the Agent does.
    let title = body.get(..title_len).ok_or(Reason::InvalidLength)?;
    let text_start = title_len + 1;
    let text = body
        .get(text_start..text_start + text_len)
        .ok_or(Reason::InvalidLength)?;
    let rest = &body[text_start + text_len..];

    let mut event = Event {
        title,
        text,
        timestamp: None,
        host: None,
        aggregation_key: "",
        priority: Priority::Normal,
        source_type: "",
        alert_type: AlertType::Info,
        tags: "",
        fields: rest,
    };
    if rest.is_empty() {
        return Ok(event);
    }
    for field in fields(rest) {
        // A bad optional field is ignored, not fatal (Agent behaviour).
        if let Some(v) = field.strip_prefix("d:") {
            if let Some(ts) = positive_int(v) {
                event.timestamp = std::num::NonZeroI64::new(ts);
            }
        } else if let Some(v) = field.strip_prefix("h:") {
            event.host = Some(v);
        } else if let Some(v) = field.strip_prefix("k:") {
            event.aggregation_key = v;
        } else if let Some(v) = field.strip_prefix("p:") {
            match v {
                "low" => event.priority = Priority::Low,
                "normal" => event.priority = Priority::Normal,
                _ => {}
            }
        } else if let Some(v) = field.strip_prefix("s:") {
            event.source_type = v;
        } else if let Some(v) = field.strip_prefix("t:") {
            match v {
                "error" => event.alert_type = AlertType::Error,
                "warning" => event.alert_type = AlertType::Warning,
                "info" => event.alert_type = AlertType::Info,
                "success" => event.alert_type = AlertType::Success,
                _ => {}
            }
        } else if let Some(v) = field.strip_prefix('#') {
            event.tags = v;
        }
    }
    Ok(event)
}

fn length(s: &str) -> Result<usize, Reason> {
    if s.is_empty() || s.len() > 7 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Reason::InvalidHeader);
    }
    s.parse().map_err(|_| Reason::InvalidHeader)
}

/// Turns every two-byte `\n` into a newline, as the Agent does for titles and texts.
pub fn unescape(s: &str) -> String {
    s.replace("\\n", "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_event_gets_the_defaults() {
        let e = parse("_e{5,4}:title|text").unwrap();
        assert_eq!(e.title, "title");
        assert_eq!(e.text, "text");
        assert_eq!(e.priority, Priority::Normal);
        assert_eq!(e.alert_type, AlertType::Info);
        assert_eq!(e.timestamp, None);
        assert_eq!(e.host, None);
        assert_eq!(e.tags, "");
    }

    #[test]
    fn every_optional_field_is_read() {
        let e =
            parse("_e{2,3}:ti|txt|d:1700000000|h:web1|k:agg|p:low|s:src|t:error|#a:b,c").unwrap();
        assert_eq!(e.timestamp.map(|t| t.get()), Some(1_700_000_000));
        assert_eq!(e.host, Some("web1"));
        assert_eq!(e.aggregation_key, "agg");
        assert_eq!(e.priority, Priority::Low);
        assert_eq!(e.source_type, "src");
        assert_eq!(e.alert_type, AlertType::Error);
        assert_eq!(e.tags, "a:b,c");
    }

    #[test]
    fn lengths_are_bytes_and_must_match() {
        let cases = [
            ("_e{5,4}:title|text", Ok(("title", "text"))),
            ("_e{1,0}:t|", Ok(("t", ""))),
            ("_e{3,3}:a|b|c|d", Ok(("a|b", "c|d"))),
            // A shorter text than sent: the tail is read as an (unknown) field, as the Agent
            // does.
            ("_e{3,2}:a|b|c|d", Ok(("a|b", "c|"))),
            ("_e{5,2}:title|text", Ok(("title", "te"))),
            ("_e{4,4}:title|text", Ok(("titl", "|tex"))),
            // Any byte separates title and text.
            ("_e{5,4}:title_text", Ok(("title", "text"))),
            ("_e{6,2}:héllo|ok", Ok(("héllo", "ok"))),
            ("_e{2,2}:héllo|ok", Err(Reason::InvalidLength)),
            ("_e{0,4}:|text", Err(Reason::EmptyTitle)),
            ("_e{9,4}:title|text", Err(Reason::InvalidLength)),
            ("_e{5,9}:title|text", Err(Reason::InvalidLength)),
            ("_e{5,4}title|text", Err(Reason::InvalidHeader)),
            ("_e{5}:title|text", Err(Reason::InvalidHeader)),
            ("_e{-1,4}:title|text", Err(Reason::InvalidHeader)),
            ("_e{a,4}:title|text", Err(Reason::InvalidHeader)),
            ("_e{,4}:title|text", Err(Reason::InvalidHeader)),
            ("_e{99999999999,4}:t|text", Err(Reason::InvalidHeader)),
            ("_e{5,4:title|text", Err(Reason::InvalidHeader)),
            ("_e{5,4]:title|text", Err(Reason::InvalidHeader)),
            ("_e{5,4}", Err(Reason::InvalidHeader)),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line).map(|e| (e.title, e.text)), want, "{line:?}");
        }
    }

    #[test]
    fn bad_optional_fields_are_ignored() {
        let e = parse("_e{1,1}:a|b|d:soon|p:urgent|t:panic|zz:top").unwrap();
        assert_eq!(e.timestamp, None);
        assert_eq!(e.priority, Priority::Normal);
        assert_eq!(e.alert_type, AlertType::Info);
    }

    #[test]
    fn trailing_data_after_the_text_is_read_as_fields() {
        // The Agent's expectation: a text shorter than the rest is fine, and fields after it
        // still apply.
        let e = parse("_e{5,2}:title|text|p:low|#a").unwrap();
        assert_eq!((e.text, e.priority, e.tags), ("te", Priority::Low, "a"));
        let e = parse("_e{1,1}:a|b|h:|k:").unwrap();
        assert_eq!((e.host, e.aggregation_key), (Some(""), ""));
    }

    #[test]
    fn origin_fields_are_read() {
        let e = parse("_e{1,1}:a|b|c:ci-abc|e:it-false,cn-app|card:high|#x").unwrap();
        assert_eq!(
            e.origin(),
            OriginFields {
                local: "ci-abc",
                external: "it-false,cn-app",
                cardinality: "high"
            }
        );
        assert_eq!(e.tags, "x");
    }

    #[test]
    fn escaped_newlines_become_newlines() {
        assert_eq!(unescape("line1\\nline2\\n"), "line1\nline2\n");
        assert_eq!(unescape("no escapes"), "no escapes");
    }
}
