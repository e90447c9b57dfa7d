//! Service check messages.
//!
//! ```text
//!  _sc|db.up|2|d:1700000000|h:web1|#a:b,c|m:connection refused
//!      └name┘ └ status 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN
//! ```

use super::{fields, positive_int, OriginFields, Reason};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl CheckStatus {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// A parsed service check, borrowing from the packet.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceCheck<'a> {
    pub name: &'a str,
    pub status: CheckStatus,
    pub timestamp: Option<i64>,
    pub host: Option<&'a str>,
    pub tags: &'a str,
    pub message: &'a str,
    /// The optional fields as sent, for [`ServiceCheck::origin`]: kept raw so that a check is
    /// no larger than a metric.
    fields: &'a str,
}

impl<'a> ServiceCheck<'a> {
    /// The origin fields (`c:`, `e:`, `card:`); the last of each wins.
    pub fn origin(&self) -> OriginFields<'a> {
        OriginFields::of(self.fields)
    }
}

/// Parses a service check line (starts with `_sc|`, UTF-8, no `\n`).
pub fn parse(line: &str) -> Result<ServiceCheck<'_>, Reason> {
    let mut parts = fields(line);
    parts.next(); // "_sc"
    let name = parts.next().ok_or(Reason::MissingField)?;
    if name.is_empty() {
        return Err(Reason::EmptyName);
    }
    let raw_status = parts.next().ok_or(Reason::MissingField)?;
    let status = match raw_status {
        "0" => CheckStatus::Ok,
        "1" => CheckStatus::Warning,
        "2" => CheckStatus::Critical,
        "3" => CheckStatus::Unknown,
        _ => return Err(Reason::InvalidStatus),
    };
    let mut check = ServiceCheck {
        name,
        status,
        timestamp: None,
        host: None,
        tags: "",
        message: "",
        // Everything after the status: `raw_status` is a slice of `line`.
        fields: line
            .get(raw_status.as_ptr() as usize - line.as_ptr() as usize + raw_status.len() + 1..)
            .unwrap_or(""),
    };
    // A bad optional field is ignored. A `|` inside the message ends it (Agent behaviour).
    for field in parts {
        if let Some(v) = field.strip_prefix("d:") {
            if let Some(ts) = positive_int(v) {
                check.timestamp = Some(ts);
            }
        } else if let Some(v) = field.strip_prefix("h:") {
            check.host = Some(v);
        } else if let Some(v) = field.strip_prefix("m:") {
            check.message = v;
        } else if let Some(v) = field.strip_prefix('#') {
            check.tags = v;
        }
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_must_be_zero_to_three() {
        let cases = [
            ("_sc|n|0", Ok(CheckStatus::Ok)),
            ("_sc|n|1", Ok(CheckStatus::Warning)),
            ("_sc|n|2", Ok(CheckStatus::Critical)),
            ("_sc|n|3", Ok(CheckStatus::Unknown)),
            ("_sc|n|4", Err(Reason::InvalidStatus)),
            ("_sc|n|-1", Err(Reason::InvalidStatus)),
            ("_sc|n|00", Err(Reason::InvalidStatus)),
            ("_sc|n|", Err(Reason::InvalidStatus)),
            ("_sc|n|ok", Err(Reason::InvalidStatus)),
            ("_sc|n", Err(Reason::MissingField)),
            ("_sc|", Err(Reason::EmptyName)),
            ("_sc||0", Err(Reason::EmptyName)),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line).map(|c| c.status), want, "{line:?}");
        }
    }

    #[test]
    fn every_optional_field_is_read_and_a_pipe_ends_the_message() {
        let c = parse("_sc|db.up|2|d:1700000000|h:web1|#a:b,c|m:refused|not message").unwrap();
        assert_eq!(c.name, "db.up");
        assert_eq!(c.status, CheckStatus::Critical);
        assert_eq!(c.timestamp, Some(1_700_000_000));
        assert_eq!(c.host, Some("web1"));
        assert_eq!(c.tags, "a:b,c");
        assert_eq!(c.message, "refused");
    }

    #[test]
    fn origin_fields_are_read() {
        let c = parse("_sc|n|0|c:cid-1|card:orchestrator|e:pu-9").unwrap();
        assert_eq!(
            c.origin(),
            OriginFields {
                local: "cid-1",
                external: "pu-9",
                cardinality: "orchestrator"
            }
        );
    }

    #[test]
    fn bad_optional_fields_are_ignored() {
        let c = parse("_sc|n|0|d:yesterday|x:y").unwrap();
        assert_eq!(c.timestamp, None);
        assert_eq!(c.message, "");
    }
}
