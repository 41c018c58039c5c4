//! `when` rules: which events an upstream wants, decided on the payload's fields.
//!
//! ```yaml
//! when:                                   # all entries must hold
//!   incident.labels.service: checkout     # equals
//!   incident.incident_severity: [Critical, Warning]   # one of
//!   incident.labels.region: { exists: true }          # present and not null
//!   incident.labels.env: { not: [dev, staging] }      # none of
//!   incident.title: { matches: "^sh-prod" }           # regex (Rust syntax)
//! ```
//! Values compare as text: a string compares as itself, a number or bool as its JSON spelling.

use regex::Regex;
use serde_json::Value;
use serde_yaml::Value as Yaml;

use super::path::FieldPath;

/// A compiled set of conditions; every one must hold.
#[derive(Debug, Clone)]
pub struct When {
    rules: Vec<(FieldPath, Condition)>,
}

#[derive(Debug, Clone)]
enum Condition {
    OneOf(Vec<String>),
    Exists(bool),
    Not(Box<Condition>),
    Matches(Regex),
}

impl When {
    /// Compiles the YAML map of a `when` key; regexes are compiled here, once.
    pub fn compile(map: &serde_yaml::Mapping) -> Result<When, String> {
        let mut rules = Vec::new();
        for (key, value) in map {
            let Yaml::String(key) = key else {
                return Err(format!("{key:?}: a field path must be a string"));
            };
            let path = FieldPath::parse(key)?;
            let condition = Condition::compile(value).map_err(|why| format!("{key}: {why}"))?;
            rules.push((path, condition));
        }
        Ok(When { rules })
    }

    /// Every path the rules read.
    pub fn paths(&self) -> impl Iterator<Item = &FieldPath> {
        self.rules.iter().map(|(path, _)| path)
    }

    /// Whether `payload` satisfies every rule.
    pub fn matches(&self, payload: &Value) -> bool {
        self.rules
            .iter()
            .all(|(path, condition)| condition.holds(path.resolve(payload)))
    }
}

impl Condition {
    fn compile(value: &Yaml) -> Result<Condition, String> {
        match value {
            Yaml::Sequence(items) => items
                .iter()
                .map(scalar_text)
                .collect::<Result<Vec<_>, _>>()
                .map(Condition::OneOf),
            Yaml::Mapping(map) => {
                if map.len() != 1 {
                    return Err("use exactly one of exists, not, matches".into());
                }
                let (op, arg) = map.iter().next().ok_or("empty condition")?;
                match op.as_str() {
                    Some("exists") => match arg {
                        Yaml::Bool(b) => Ok(Condition::Exists(*b)),
                        _ => Err("exists takes true or false".into()),
                    },
                    Some("not") => Ok(Condition::Not(Box::new(Condition::compile(arg)?))),
                    Some("matches") => {
                        let pattern = arg.as_str().ok_or("matches takes a regex string")?;
                        Regex::new(pattern)
                            .map(Condition::Matches)
                            .map_err(|e| format!("bad regex: {e}"))
                    }
                    _ => Err(format!(
                        "unknown condition {op:?} (use exists, not or matches)"
                    )),
                }
            }
            scalar => Ok(Condition::OneOf(vec![scalar_text(scalar)?])),
        }
    }

    fn holds(&self, found: Option<&Value>) -> bool {
        let found = found.filter(|v| !v.is_null());
        match self {
            Condition::Exists(wanted) => found.is_some() == *wanted,
            Condition::Not(inner) => !inner.holds(found),
            Condition::OneOf(options) => {
                found.is_some_and(|v| with_text(v, |t| options.iter().any(|o| o == t)))
            }
            Condition::Matches(regex) => found.is_some_and(|v| with_text(v, |t| regex.is_match(t))),
        }
    }
}

fn scalar_text(value: &Yaml) -> Result<String, String> {
    match value {
        Yaml::String(s) => Ok(s.clone()),
        Yaml::Number(n) => Ok(n.to_string()),
        Yaml::Bool(b) => Ok(b.to_string()),
        _ => Err("expected a value, a list of values, or {exists|not|matches: …}".into()),
    }
}

/// Runs `f` on the text form of a scalar; objects and arrays never match a value.
fn with_text(value: &Value, f: impl Fn(&str) -> bool) -> bool {
    match value {
        Value::String(s) => f(s),
        Value::Number(n) => f(&n.to_string()),
        Value::Bool(b) => f(if *b { "true" } else { "false" }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn when(yaml: &str) -> When {
        When::compile(&serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    fn payload() -> Value {
        json!({"incident": {"incident_severity": "Critical", "alert_cnt": 3, "title": "sh-prod / web-03",
               "labels": {"service": "checkout", "env": "prod", "nothing": null},
               "has_unfinished_work_item": false}})
    }

    #[test]
    fn equals_and_one_of() {
        assert!(when("incident.labels.service: checkout").matches(&payload()));
        assert!(!when("incident.labels.service: cart").matches(&payload()));
        assert!(when("incident.incident_severity: [Critical, Warning]").matches(&payload()));
        assert!(!when("incident.incident_severity: [Info]").matches(&payload()));
        assert!(when("incident.alert_cnt: 3").matches(&payload()));
        assert!(when("incident.has_unfinished_work_item: false").matches(&payload()));
    }

    #[test]
    fn all_entries_must_hold() {
        let w = when("incident.labels.service: checkout\nincident.labels.env: dev");
        assert!(!w.matches(&payload()));
    }

    #[test]
    fn exists_not_and_matches() {
        assert!(when("incident.labels.env: {exists: true}").matches(&payload()));
        assert!(when("incident.labels.nothing: {exists: false}").matches(&payload()));
        assert!(when("incident.labels.absent: {exists: false}").matches(&payload()));
        assert!(when("incident.labels.env: {not: [dev, staging]}").matches(&payload()));
        assert!(!when("incident.labels.env: {not: prod}").matches(&payload()));
        assert!(when("incident.title: {matches: '^sh-prod'}").matches(&payload()));
        assert!(!when("incident.title: {matches: '^cn-'}").matches(&payload()));
    }

    #[test]
    fn missing_fields_and_containers_never_equal_a_value() {
        assert!(!when("incident.labels.absent: x").matches(&payload()));
        assert!(!when("incident.labels: x").matches(&payload()));
        assert!(when("incident.labels.absent: {not: x}").matches(&payload()));
    }

    #[test]
    fn bad_rules_are_refused_at_load() {
        let compile = |y: &str| When::compile(&serde_yaml::from_str(y).unwrap());
        assert!(compile("incident.title: {matches: '('}")
            .unwrap_err()
            .starts_with("incident.title: bad regex"));
        assert!(compile("incident.title: {like: x}").is_err());
        assert!(compile("incident..title: x").is_err());
        assert!(compile("incident.title: {exists: yes please}").is_err());
    }
}
