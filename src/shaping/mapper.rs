//! The mapper (`--mapper-profiles`, the Agent's `dogstatsd_mapper_profiles`): profiles of
//! ordered mappings that rename a metric and turn parts of its name into tags
//! (docs/behaviour.md, "Shaping").
//!
//! A profile applies to names that begin with its prefix (`*`: every name). The first profile
//! whose prefix fits is the only one tried: its mappings in order, the first that matches
//! wins, and if none matches the name is left as it is. A `wildcard` match is a metric name
//! in which `*` stands for one dot-free part; a `regex` match is a regular expression
//! anchored at both ends. `$1`, `${1}` or `${name}` in the new name and in tag values expand
//! to what the match captured.

use regex::Regex;
use serde_json::Value;

/// A mapping's match type.
const WILDCARD: &str = "wildcard";
const REGEX: &str = "regex";

/// Profiles, validated and compiled.
#[derive(Debug, Default)]
pub struct Mapper {
    profiles: Vec<Profile>,
}

#[derive(Debug)]
struct Profile {
    prefix: Box<str>,
    mappings: Vec<Mapping>,
}

#[derive(Debug)]
struct Mapping {
    regex: Regex,
    /// The new name, a template.
    name: Box<str>,
    /// Tag key → value template, in key order.
    tags: Vec<(Box<str>, Box<str>)>,
}

/// What a name maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub name: String,
    /// `key:value`, in key order.
    pub tags: Vec<String>,
}

impl Mapper {
    /// Reads profiles from JSON, the form the Agent reads from `DD_DOGSTATSD_MAPPER_PROFILES`:
    /// `[{"name": …, "prefix": …, "mappings": [{"match": …, "match_type": …, "name": …,
    /// "tags": {…}}]}]`. An error names the profile and the mapping.
    pub fn from_json(text: &str) -> Result<Mapper, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        Mapper::from_value(&value)
    }

    /// Reads profiles from a parsed JSON (or YAML) value.
    pub fn from_value(value: &Value) -> Result<Mapper, String> {
        let list = match value {
            Value::Null => return Ok(Mapper::default()),
            Value::Array(list) => list,
            _ => return Err("profiles must be a list".into()),
        };
        let mut profiles = Vec::with_capacity(list.len());
        for (i, p) in list.iter().enumerate() {
            let name = text_field(p, "name").filter(|n| !n.is_empty());
            let name = name.ok_or_else(|| format!("profile {i}: missing profile name"))?;
            let prefix = text_field(p, "prefix").filter(|n| !n.is_empty());
            let prefix = prefix.ok_or_else(|| format!("profile {name}: missing prefix"))?;
            let mappings = match p.get("mappings") {
                None | Some(Value::Null) => &[][..],
                Some(Value::Array(m)) => m,
                Some(_) => return Err(format!("profile {name}: mappings must be a list")),
            };
            let mappings = mappings
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    Mapping::new(m).map_err(|e| format!("profile {name}, mapping {j}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            profiles.push(Profile {
                prefix: prefix.into(),
                mappings,
            });
        }
        Ok(Mapper { profiles })
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// How many mappings all profiles hold.
    pub fn mappings(&self) -> usize {
        self.profiles.iter().map(|p| p.mappings.len()).sum()
    }

    /// What `name` maps to, or `None` when it is left as it is.
    pub fn map(&self, name: &str) -> Option<Mapped> {
        let profile = self
            .profiles
            .iter()
            .find(|p| &*p.prefix == "*" || name.starts_with(&*p.prefix))?;
        profile.mappings.iter().find_map(|m| {
            let captures = m.regex.captures(name)?;
            let expand = |template: &str| {
                let mut out = String::new();
                captures.expand(template, &mut out);
                out
            };
            Some(Mapped {
                name: expand(&m.name),
                tags: m
                    .tags
                    .iter()
                    .map(|(k, v)| format!("{k}:{}", expand(v)))
                    .collect(),
            })
        })
    }
}

impl Mapping {
    fn new(m: &Value) -> Result<Mapping, String> {
        let kind = text_field(m, "match_type").unwrap_or("");
        let kind = if kind.is_empty() { WILDCARD } else { kind };
        if kind != WILDCARD && kind != REGEX {
            return Err(format!(
                "invalid match type '{kind}', must be wildcard or regex"
            ));
        }
        let name = text_field(m, "name").filter(|n| !n.is_empty());
        let name = name.ok_or("name is required")?;
        let pattern = text_field(m, "match").filter(|n| !n.is_empty());
        let pattern = pattern.ok_or("match is required")?;
        let regex = if kind == WILDCARD {
            wildcard_regex(pattern)?
        } else {
            pattern.to_string()
        };
        // Anchored as the Agent anchors it: `^` and `$` bind tighter than a top-level `|`.
        let regex = Regex::new(&format!("^{regex}$"))
            .map_err(|e| format!("match '{pattern}' is not a valid regular expression: {e}"))?;
        let tags = match m.get("tags") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(tags)) => {
                let mut out = Vec::with_capacity(tags.len());
                for (k, v) in tags {
                    let Value::String(v) = v else {
                        return Err(format!("tag '{k}' must be a string"));
                    };
                    out.push((k.as_str().into(), v.as_str().into()));
                }
                out.sort();
                out
            }
            Some(_) => return Err("tags must be an object of key: value template".into()),
        };
        Ok(Mapping {
            regex,
            name: name.into(),
            tags,
        })
    }
}

/// A wildcard match as a regular expression: letters, digits, `-`, `_`, `.` and `*` only,
/// never `**`; `*` captures one dot-free part.
fn wildcard_regex(pattern: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*' | '.');
    if !pattern.chars().all(allowed) {
        return Err(format!(
            "wildcard match '{pattern}' may hold only letters, digits, '-', '_', '.' and '*'"
        ));
    }
    if pattern.contains("**") {
        return Err(format!(
            "wildcard match '{pattern}' must not contain consecutive '*'"
        ));
    }
    let mut out = String::with_capacity(pattern.len() * 2);
    for c in pattern.chars() {
        match c {
            '.' => out.push_str("\\."),
            '*' => out.push_str("([^.]*)"),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn text_field<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Agent's mapper scenarios as whippet reads them (JSON instead of YAML), shared
    /// with the test that runs them through the binary: each case's profiles, then each name
    /// with the name and tags it maps to (`null`: left as it is).
    pub(crate) const TABLE: &str = include_str!("../../tests/data/mapper_table.json");

    #[test]
    fn the_agents_mapper_table() {
        let cases: Vec<Value> = serde_json::from_str(TABLE).unwrap();
        let mut names = 0;
        for c in &cases {
            let case = c["case"].as_str().unwrap();
            let mapper =
                Mapper::from_value(&c["profiles"]).unwrap_or_else(|e| panic!("{case}: {e}"));
            for pair in c["names"].as_array().unwrap() {
                let name = pair[0].as_str().unwrap();
                let got = mapper.map(name).map(|mut m| {
                    m.tags.sort();
                    m
                });
                let want = (!pair[1].is_null()).then(|| Mapped {
                    name: pair[1]["name"].as_str().unwrap().to_string(),
                    tags: serde_json::from_value(pair[1]["tags"].clone()).unwrap(),
                });
                assert_eq!(got, want, "{case}: {name}");
                names += 1;
            }
        }
        assert_eq!((cases.len(), names), (13, 22));
    }

    #[test]
    fn the_agents_mapper_errors_name_the_profile_and_mapping() {
        let cases = [
            (r#"[{"name":"test","prefix":"test.","mappings":[{"match":"test.job.*","name":""}]}]"#, "profile test, mapping 0: name is required"),
            (r#"[{"name":"test","prefix":"test.","mappings":[{"match":"a.*"},{"match":"test.job.*"}]}]"#, "profile test, mapping 0: name is required"),
            (r#"[{"name":"test","prefix":"test.","mappings":[{"match":"a","name":"b"},{"name":"test.job"}]}]"#, "profile test, mapping 1: match is required"),
            (r#"[{"name":"test","prefix":"test.","mappings":[{"match":"test.[]duration.*.*","name":"x"}]}]"#, "profile test, mapping 0: wildcard match 'test.[]duration.*.*' may hold only letters, digits, '-', '_', '.' and '*'"),
            (r#"[{"name":"test","prefix":"test.","mappings":[{"match":"^test.invalid.*","name":"x"}]}]"#, "profile test, mapping 0: wildcard match '^test.invalid.*' may hold only letters, digits, '-', '_', '.' and '*'"),
            (r#"[{"name":"test","prefix":"test.","mappings":[{"match":"test.invalid.duration.**","name":"x"}]}]"#, "profile test, mapping 0: wildcard match 'test.invalid.duration.**' must not contain consecutive '*'"),
            (r#"[{"name":"test","prefix":"test.","mappings":[{"match":"test.invalid","match_type":"invalid","name":"x"}]}]"#, "profile test, mapping 0: invalid match type 'invalid', must be wildcard or regex"),
            (r#"[{"prefix":"test.","mappings":[]}]"#, "profile 0: missing profile name"),
            (r#"[{"name":"test","mappings":[]}]"#, "profile test: missing prefix"),
            (r#"[{"name":"p","prefix":"a.","mappings":[{"match":"a.(","match_type":"regex","name":"x"}]}]"#, "profile p, mapping 0: match 'a.(' is not a valid regular expression"),
            (r#"[{"name":"p","prefix":"a.","mappings":[{"match":"a.*","name":"x","tags":{"k":1}}]}]"#, "profile p, mapping 0: tag 'k' must be a string"),
            (r#"{"name":"p"}"#, "profiles must be a list"),
            ("[", "not valid JSON"),
        ];
        for (json, want) in cases {
            let err = Mapper::from_json(json).unwrap_err();
            assert!(err.starts_with(want), "{json}: {err}");
        }
    }

    #[test]
    fn anchors_bind_as_the_agents_and_unknown_groups_expand_to_nothing() {
        let m = Mapper::from_json(
            r#"[{"name":"p","prefix":"*","mappings":[
                {"match":"a\\.b|a\\.c","match_type":"regex","name":"x.$1x.${9}.$$"}]}]"#,
        )
        .unwrap();
        // `^a\.b|a\.c$`: the first branch is anchored at the start only, the second at the
        // end only (the Agent's result).
        assert_eq!(m.map("a.bc").unwrap().name, "x...$");
        assert_eq!(m.map("za.c").unwrap().name, "x...$");
        assert_eq!(m.map("za.bz"), None);
        assert_eq!(m.mappings(), 1);
    }
}
