//! Host rules (`--host-rules`, whippet's own): metrics that describe a service rather than a
//! machine are sent without a host. Datadog counts a custom metric per distinct combination
//! of name and tag values, the host included, so such a metric reported from 200 hosts
//! counts 200 times over and shows 200 series that only make sense summed; without the host
//! it counts once per combination of its other tags. A rule may add tags in the host's place
//! (the host's own tags, such as `env:prod`, are attached by the backend to points that have
//! a host, and so are lost with it).
//!
//! A rule names metrics by a glob over the shaped name (`*`: any run of characters, `?`: one)
//! and optionally by type; the first rule that fits a metric applies.

use std::sync::Arc;

use serde_json::Value;

use crate::parser::MetricKind;

/// One rule.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRule {
    glob: Box<str>,
    /// The types it applies to; all when empty.
    kinds: Vec<MetricKind>,
    /// Tags the points get instead of a host.
    pub tags: Box<[Box<str>]>,
}

/// The rules, in order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HostRules(Vec<Arc<HostRule>>);

impl HostRules {
    /// Reads `[{"match": "<glob>", "types": ["count", …], "tags": ["key:value", …]}]`; an error
    /// names the rule and the field.
    pub fn from_json(text: &str) -> Result<HostRules, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Array(list) = value else {
            return Err("host rules must be a list".into());
        };
        let mut rules = Vec::with_capacity(list.len());
        for (i, r) in list.iter().enumerate() {
            let Value::Object(fields) = r else {
                return Err(format!("rule {i}: must be an object"));
            };
            if let Some(other) = fields
                .keys()
                .find(|k| !matches!(k.as_str(), "match" | "types" | "tags"))
            {
                return Err(format!(
                    "rule {i}: unknown field '{other}' (match, types, tags)"
                ));
            }
            let glob = r.get("match").and_then(Value::as_str).unwrap_or("");
            if glob.is_empty() {
                return Err(format!("rule {i}: match is required"));
            }
            let kinds = strings(r, "types", i)?
                .iter()
                .map(|t| {
                    kind_of(t).ok_or_else(|| {
                        format!("rule {i}: type '{t}' is not count, gauge, histogram, timer, distribution or set")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let tags = strings(r, "tags", i)?;
            if let Some(bad) = tags.iter().find(|t| t.is_empty() || t.contains(',')) {
                return Err(format!("rule {i}: '{bad}' is not a tag"));
            }
            rules.push(Arc::new(HostRule {
                glob: glob.into(),
                kinds,
                tags: tags.into_iter().map(String::into_boxed_str).collect(),
            }));
        }
        Ok(HostRules(rules))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The first rule that fits a metric named `name` of type `kind`.
    pub fn find(&self, name: &str, kind: MetricKind) -> Option<Arc<HostRule>> {
        self.0
            .iter()
            .find(|r| (r.kinds.is_empty() || r.kinds.contains(&kind)) && glob(&r.glob, name))
            .cloned()
    }
}

/// A list of strings, or nothing.
fn strings(r: &Value, field: &str, i: usize) -> Result<Vec<String>, String> {
    match r.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("rule {i}: {field} must be a list of strings")),
        Some(_) => Err(format!("rule {i}: {field} must be a list of strings")),
    }
}

/// A type by the name the documentation gives it, or its wire letters.
fn kind_of(t: &str) -> Option<MetricKind> {
    Some(match t {
        "count" | "c" => MetricKind::Count,
        "gauge" | "g" => MetricKind::Gauge,
        "histogram" | "h" => MetricKind::Histogram,
        "timer" | "ms" => MetricKind::Timer,
        "distribution" | "d" => MetricKind::Distribution,
        "set" | "s" => MetricKind::Set,
        _ => return None,
    })
}

/// Whether `name` matches `pattern`: `*` any run of characters (dots included), `?` any one,
/// anything else itself. Linear: one backtrack point, the last `*`.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_any_run_or_one_character() {
        let cases = [
            ("queue.*", "queue.depth", true),
            ("queue.*", "queue.", true),
            ("queue.*", "queue", false),
            ("*.requests", "svc.api.requests", true),
            ("*.requests", "svc.api.requests.total", false),
            ("svc.*.lat*", "svc.api.latency", true),
            ("svc.?.x", "svc.a.x", true),
            ("svc.?.x", "svc.ab.x", false),
            ("*", "", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(glob(p, n), want, "{p} {n}");
        }
    }

    #[test]
    fn the_first_rule_that_fits_name_and_type_applies() {
        let rules = HostRules::from_json(
            r#"[{"match":"queue.*","types":["gauge"],"tags":["env:prod"]},
                {"match":"queue.*"},
                {"match":"fleet.requests","types":["c","d"]}]"#,
        )
        .unwrap();
        assert_eq!(rules.len(), 3);
        let tags = |name, kind| rules.find(name, kind).map(|r| r.tags.to_vec());
        assert_eq!(
            tags("queue.depth", MetricKind::Gauge),
            Some(vec!["env:prod".into()])
        );
        assert_eq!(tags("queue.depth", MetricKind::Count), Some(vec![]));
        assert_eq!(
            tags("fleet.requests", MetricKind::Distribution),
            Some(vec![])
        );
        assert_eq!(tags("fleet.requests", MetricKind::Gauge), None);
        assert_eq!(tags("other", MetricKind::Gauge), None);
    }

    #[test]
    fn rule_errors_name_the_rule_and_field() {
        let cases = [
            ("{}", "host rules must be a list"),
            ("[1]", "rule 0: must be an object"),
            (
                r#"[{"match":"a"},{"tags":["x"]}]"#,
                "rule 1: match is required",
            ),
            (
                r#"[{"match":"a","type":["count"]}]"#,
                "rule 0: unknown field 'type' (match, types, tags)",
            ),
            (
                r#"[{"match":"a","types":["meter"]}]"#,
                "rule 0: type 'meter' is not count, gauge, histogram, timer, distribution or set",
            ),
            (
                r#"[{"match":"a","tags":"env:prod"}]"#,
                "rule 0: tags must be a list of strings",
            ),
            (
                r#"[{"match":"a","tags":["a,b"]}]"#,
                "rule 0: 'a,b' is not a tag",
            ),
        ];
        for (json, want) in cases {
            assert_eq!(HostRules::from_json(json).unwrap_err(), want, "{json}");
        }
    }
}
