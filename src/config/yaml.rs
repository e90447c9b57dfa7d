//! The Agent's `datadog.yaml` as a config file: each top-level key whose `DD_` variable is a
//! whippet setting (`dogstatsd_port` is `DD_DOGSTATSD_PORT`) gives that setting's value;
//! every other key is listed as ignored, never an error, so an operator can point whippet at
//! the file the Agent used.
//!
//! Values become the text a `KEY=VALUE` file would hold: scalars as written, lists joined
//! with commas, and the structured settings (mapper profiles, the tag filter list) as JSON.

use std::collections::HashMap;
use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

use super::settings::SETTINGS;

/// Whether `path` holds YAML rather than `KEY=VALUE` lines: by its extension, else by its
/// first line that is not blank or a comment (`key: value` rather than `KEY=VALUE`).
pub(super) fn is_yaml(path: &Path, text: &str) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
    {
        return true;
    }
    let Some(first) = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
    else {
        return false;
    };
    if first == "---" {
        return true;
    }
    match (first.find(':'), first.find('=')) {
        (Some(colon), Some(eq)) => colon < eq,
        (Some(_), None) => true,
        _ => false,
    }
}

/// What a YAML config file gives: setting variable → (value, line), and the keys whippet
/// does not implement, with their lines.
pub(super) struct Read {
    pub values: HashMap<String, (String, usize)>,
    pub ignored: Vec<(String, usize)>,
}

/// Reads the top-level keys of `text`.
pub(super) fn read(path: &Path, text: &str, errors: &mut Vec<String>) -> Read {
    let mut out = Read {
        values: HashMap::new(),
        ignored: Vec::new(),
    };
    let docs = match YamlLoader::load_from_str(text) {
        Ok(d) => d,
        Err(e) => {
            errors.push(format!("{}: not valid YAML: {e}", path.display()));
            return out;
        }
    };
    let map = match docs.first() {
        None | Some(Yaml::Null) => return out,
        Some(Yaml::Hash(map)) => map,
        Some(_) => {
            errors.push(format!(
                "{}: a YAML config file is a mapping of keys to values",
                path.display()
            ));
            return out;
        }
    };
    // Top-level keys, and the keys of a mapping that is not itself a setting (the Agent's
    // `enable_payloads: {series: …}` is DD_ENABLE_PAYLOADS_SERIES), named `parent.key`.
    let mut entries: Vec<(String, String, &Yaml, usize)> = Vec::new();
    for (key, value) in map {
        let Some(key) = key.as_str() else {
            continue;
        };
        let line = line_of(text, key);
        let var = format!("DD_{}", key.to_ascii_uppercase());
        let nested = |sub: &Yaml| {
            sub.as_str()
                .map(|sub| format!("{var}_{}", sub.to_ascii_uppercase()))
        };
        match value {
            Yaml::Hash(inner)
                if hint(&var).is_none()
                    && inner
                        .keys()
                        .any(|k| nested(k).is_some_and(|v| hint(&v).is_some())) =>
            {
                for (sub, v) in inner {
                    let (Some(name), Some(sub_var)) = (sub.as_str(), nested(sub)) else {
                        continue;
                    };
                    let sub_line = nested_line(text, line, name);
                    entries.push((format!("{key}.{name}"), sub_var, v, sub_line));
                }
            }
            _ => entries.push((key.to_string(), var, value, line)),
        }
    }
    for (key, var, value, line) in entries {
        let key = key.as_str();
        let Some(hint) = hint(&var) else {
            if key == "skip_ssl_validation" {
                let name = format!("{}:{line}: {key}", path.display());
                super::resolve::refuse_skip_ssl(scalar(value).as_deref(), &name, errors);
                continue;
            }
            out.ignored.push((key.to_string(), line));
            continue;
        };
        let text = if hint == "JSON" {
            match value {
                Yaml::Null => continue,
                Yaml::String(s) => s.clone(),
                v => json(v).to_string(),
            }
        } else {
            match scalar(value) {
                Some(v) => v,
                None => match value {
                    Yaml::Null => continue,
                    Yaml::Array(items) => {
                        match items.iter().map(scalar).collect::<Option<Vec<_>>>() {
                            Some(items) => items.join(","),
                            None => {
                                errors.push(format!(
                                "{}:{line}: {key} is a list of values, not of lists or mappings",
                                path.display()
                            ));
                                continue;
                            }
                        }
                    }
                    _ => {
                        errors.push(format!(
                            "{}:{line}: {key} takes a value or a list, not a mapping",
                            path.display()
                        ));
                        continue;
                    }
                },
            }
        };
        out.values.insert(var, (text, line));
    }
    out
}

/// The value shape of a variable whippet reads: a setting's own, or the Agent's name of one
/// (an alias, or a setting whippet's fixed behaviour stands in for).
fn hint(var: &str) -> Option<&'static str> {
    use super::settings::{setting, ALIASES, FIXED};
    SETTINGS
        .iter()
        .find(|s| s.var == var)
        .map(|s| s.hint)
        .or_else(|| {
            ALIASES
                .iter()
                .find(|a| a.var == var)
                .map(|a| setting(a.flag).hint)
        })
        .or_else(|| FIXED.iter().any(|(v, _)| *v == var).then_some("VALUE"))
}

/// The line of `key` nested under the key on line `parent` (1-based), or the parent's.
fn nested_line(text: &str, parent: usize, key: &str) -> usize {
    text.lines()
        .enumerate()
        .skip(parent)
        .take_while(|(_, l)| l.is_empty() || l.starts_with([' ', '\t', '#']))
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map_or(parent, |(i, _)| i + 1)
}

/// A scalar's text as written (`true`, `8125`, `0.95`, a string).
fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A YAML value as JSON, for the settings whose value is JSON.
fn json(v: &Yaml) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(r.clone()), Value::Number),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(json).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (scalar(k).unwrap_or_default(), json(v)))
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// The line (from 1) where the top-level `key:` is, for messages; 0 when not found.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_told_from_key_value_lines_by_extension_or_content() {
        let p = Path::new("/etc/whippet/whippet.conf");
        assert!(is_yaml(Path::new("/etc/datadog-agent/datadog.yaml"), "A=1"));
        assert!(is_yaml(Path::new("x.YML"), ""));
        assert!(is_yaml(p, "# c\n\napi_key: abc\n"));
        assert!(is_yaml(p, "---\n"));
        assert!(is_yaml(p, "dd_url: http://a:1/x=y\n"));
        assert!(!is_yaml(p, "# c\nDD_API_KEY=abc\n"));
        assert!(!is_yaml(p, "DD_DD_URL=http://a:1\n"));
        assert!(!is_yaml(p, ""));
    }

    #[test]
    fn agent_keys_become_setting_values_and_the_rest_is_ignored() {
        let text = r#"
api_key: "0123456789abcdef0123456789abcdef"
dogstatsd_port: 8126
dogstatsd_non_local_traffic: true
histogram_percentiles: [0.95, "0.99"]
dogstatsd_tags:
  - env:prod
  - team:metrics
dogstatsd_mapper_profiles:
  - name: airflow
    prefix: "airflow."
    mappings:
      - match: "airflow.job.*"
        name: "airflow.job"
        tags:
          job: "$1"
logs_enabled: true
apm_config:
  enabled: false
dogstatsd_socket:
"#;
        let mut errors = Vec::new();
        let read = read(Path::new("datadog.yaml"), text, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let v = |var: &str| read.values.get(var).cloned();
        assert_eq!(v("DD_DOGSTATSD_PORT"), Some(("8126".into(), 3)));
        assert_eq!(v("DD_DOGSTATSD_NON_LOCAL_TRAFFIC").unwrap().0, "true");
        assert_eq!(v("DD_HISTOGRAM_PERCENTILES").unwrap().0, "0.95,0.99");
        assert_eq!(v("DD_DOGSTATSD_TAGS").unwrap().0, "env:prod,team:metrics");
        let profiles: serde_json::Value =
            serde_json::from_str(&v("DD_DOGSTATSD_MAPPER_PROFILES").unwrap().0).unwrap();
        assert_eq!(
            profiles,
            serde_json::json!([{"name": "airflow", "prefix": "airflow.", "mappings": [
                {"match": "airflow.job.*", "name": "airflow.job", "tags": {"job": "$1"}}]}])
        );
        // An empty value is unset, as the Agent reads it.
        assert_eq!(v("DD_DOGSTATSD_SOCKET"), None);
        assert_eq!(
            read.ignored,
            [
                ("logs_enabled".to_string(), 17),
                ("apm_config".to_string(), 18)
            ]
        );
    }

    #[test]
    fn values_whippet_cannot_take_are_errors_with_their_line() {
        let mut errors = Vec::new();
        read(
            Path::new("d.yaml"),
            "dogstatsd_port:\n  a: 1\nhistogram_aggregates: [[max]]\n",
            &mut errors,
        );
        assert_eq!(
            errors,
            [
                "d.yaml:1: dogstatsd_port takes a value or a list, not a mapping",
                "d.yaml:3: histogram_aggregates is a list of values, not of lists or mappings"
            ]
        );
        let mut errors = Vec::new();
        read(Path::new("d.yaml"), "a: [\n", &mut errors);
        assert!(
            errors[0].starts_with("d.yaml: not valid YAML:"),
            "{errors:?}"
        );
        let mut errors = Vec::new();
        read(Path::new("d.yaml"), "- a\n- b\n", &mut errors);
        assert_eq!(
            errors,
            ["d.yaml: a YAML config file is a mapping of keys to values"]
        );
    }
}
