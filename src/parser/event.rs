//! Event messages.
//!
//! ```text
//!  _e{5,11}:title|hello\nworld|d:1700000000|h:web1|k:agg|p:low|s:src|t:error|#a:b,c
//!     │ └ text length in bytes     └──────────── optional fields, any order ────┘
//!     └ title length in bytes
//! ```

use super::{fields, positive_int, Reason};

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
    pub timestamp: Option<i64>,
    pub host: Option<&'a str>,
    pub aggregation_key: &'a str,
    pub priority: Priority,
    pub source_type: &'a str,
    pub alert_type: AlertType,
    pub tags: &'a str,
}

/// Parses an event line (starts with `_e{`, UTF-8, no `\n`).
pub fn parse(line: &str) -> Result<Event<'_>, Reason> {
    let header = line.strip_prefix("_e{").ok_or(Reason::InvalidHeader)?;
    let (lengths, body) = header.split_once("}:").ok_or(Reason::InvalidHeader)?;
    let (title_len, text_len) = lengths.split_once(',').ok_or(Reason::InvalidHeader)?;
    let title_len = length(title_len)?;
    let text_len = length(text_len)?;
    if title_len == 0 {
        return Err(Reason::EmptyTitle);
    }
    // Lengths are in bytes; `get` also refuses a length that ends inside a character.
    let title = body.get(..title_len).ok_or(Reason::InvalidLength)?;
    let after_title = &body[title_len..];
    let after_title = after_title.strip_prefix('|').ok_or(Reason::InvalidLength)?;
    let text = after_title.get(..text_len).ok_or(Reason::InvalidLength)?;
    let rest = &after_title[text_len..];

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
    };
    if rest.is_empty() {
        return Ok(event);
    }
    // Whatever follows the text must start a field, or the declared text length lied.
    let rest = rest.strip_prefix('|').ok_or(Reason::InvalidLength)?;
    for field in fields(rest) {
        // A bad optional field is ignored, not fatal (Agent behaviour).
        if let Some(v) = field.strip_prefix("d:") {
            if let Some(ts) = positive_int(v) {
                event.timestamp = Some(ts);
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
        assert_eq!(e.timestamp, Some(1_700_000_000));
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
            ("_e{3,2}:a|b|c|d", Err(Reason::InvalidLength)),
            ("_e{6,2}:héllo|ok", Ok(("héllo", "ok"))),
            ("_e{2,2}:héllo|ok", Err(Reason::InvalidLength)),
            ("_e{0,4}:|text", Err(Reason::EmptyTitle)),
            ("_e{9,4}:title|text", Err(Reason::InvalidLength)),
            ("_e{5,9}:title|text", Err(Reason::InvalidLength)),
            ("_e{4,4}:title|text", Err(Reason::InvalidLength)),
            ("_e{5,3}:title|text", Err(Reason::InvalidLength)),
            ("_e{5,4}title|text", Err(Reason::InvalidHeader)),
            ("_e{5}:title|text", Err(Reason::InvalidHeader)),
            ("_e{-1,4}:title|text", Err(Reason::InvalidHeader)),
            ("_e{a,4}:title|text", Err(Reason::InvalidHeader)),
            ("_e{,4}:title|text", Err(Reason::InvalidHeader)),
            ("_e{99999999999,4}:t|text", Err(Reason::InvalidHeader)),
            ("_e{5,4:title|text", Err(Reason::InvalidHeader)),
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
    fn escaped_newlines_become_newlines() {
        assert_eq!(unescape("line1\\nline2\\n"), "line1\nline2\n");
        assert_eq!(unescape("no escapes"), "no escapes");
    }
}
