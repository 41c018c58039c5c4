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
use serde_norway::Value as Yaml;

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
    /// Compiles the YAML map of a `when` key; regexes are compiled here, once. Every bad
    /// entry is reported, each on a line of its own starting with its field path.
    pub fn compile(map: &serde_norway::Mapping) -> Result<When, Vec<String>> {
        let mut rules = Vec::new();
        let mut problems = Vec::new();
        for (key, value) in map {
            let Yaml::String(key) = key else {
                problems.push(format!("{}: a field path must be a string", yaml_text(key)));
                continue;
            };
            let compiled = FieldPath::parse(key)
                .and_then(|path| Ok((path, Condition::compile(value)?)))
                .map_err(|why| format!("{key}: {why}"));
            match compiled {
                Ok(rule) => rules.push(rule),
                Err(problem) => problems.push(problem),
            }
        }
        if problems.is_empty() {
            Ok(When { rules })
        } else {
            Err(problems)
        }
    }

    /// Every path the rules read.
    pub fn paths(&self) -> impl Iterator<Item = &FieldPath> {
        self.rules.iter().map(|(path, _)| path)
    }

    /// Why `payload` does not satisfy the rules: the first rule that fails, with the value it
    /// saw. `None` when every rule holds.
    pub fn explain(&self, payload: &Value) -> Option<String> {
        let (path, condition) = self
            .rules
            .iter()
            .find(|(path, condition)| !condition.holds(path.resolve(payload)))?;
        let seen = match path.resolve(payload) {
            None | Some(Value::Null) => "absent".to_string(),
            Some(value) => value.to_string(),
        };
        Some(format!(
            "{path} is {seen}, and the rule wants {}",
            condition.describe()
        ))
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
                            .map_err(|e| format!("bad regex {pattern:?}: {}", regex_why(&e)))
                    }
                    _ => Err(format!(
                        "unknown condition {:?} (use a value, a list of values, or one of \
                         exists, not, matches)",
                        yaml_text(op)
                    )),
                }
            }
            scalar => Ok(Condition::OneOf(vec![scalar_text(scalar)?])),
        }
    }

    /// What the condition wants, in words (`one of "Critical", "Warning"`).
    fn describe(&self) -> String {
        match self {
            Condition::OneOf(options) if options.len() == 1 => format!("{:?}", options[0]),
            Condition::OneOf(options) => {
                let quoted: Vec<String> = options.iter().map(|o| format!("{o:?}")).collect();
                format!("one of {}", quoted.join(", "))
            }
            Condition::Exists(true) => "it present".into(),
            Condition::Exists(false) => "it absent".into(),
            Condition::Not(inner) => format!("anything but {}", inner.describe()),
            Condition::Matches(regex) => format!("a match of /{}/", regex.as_str()),
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

/// A YAML key or value as its user wrote it, for messages (not Rust debug output).
fn yaml_text(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => s.clone(),
        other => serde_norway::to_string(other)
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| "?".into()),
    }
}

/// The one line of a regex error that says what is wrong (its Display draws the pattern
/// with a caret over three lines).
fn regex_why(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|line| line.strip_prefix("error: "))
        .unwrap_or(text.lines().last().unwrap_or("invalid"))
        .to_string()
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
        When::compile(&serde_norway::from_str(yaml).unwrap()).unwrap()
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
    fn explain_names_the_first_failing_rule_and_the_value_seen() {
        let rules = when(
            "{incident.title: {exists: true}, incident.incident_severity: [Info, Ok], \
              incident.labels.absent: {not: x}}",
        );
        assert_eq!(
            rules.explain(&payload()).unwrap(),
            "incident.incident_severity is \"Critical\", and the rule wants one of \"Info\", \"Ok\""
        );
        assert_eq!(
            when("incident.labels.nope: {matches: '^a'}")
                .explain(&payload())
                .unwrap(),
            "incident.labels.nope is absent, and the rule wants a match of /^a/"
        );
        assert_eq!(
            when("incident.title: {exists: true}").explain(&payload()),
            None
        );
    }

    #[test]
    fn bad_rules_are_refused_at_load() {
        let compile = |y: &str| When::compile(&serde_norway::from_str(y).unwrap());
        assert_eq!(
            compile("incident.title: {matches: '('}").unwrap_err(),
            ["incident.title: bad regex \"(\": unclosed group"]
        );
        assert_eq!(
            compile("incident.title: {equals: Critical}").unwrap_err(),
            [
                "incident.title: unknown condition \"equals\" (use a value, a list of values, \
              or one of exists, not, matches)"
            ]
        );
        // Every bad entry is reported, not only the first.
        assert_eq!(
            compile("{a: {matches: '('}, b: ok, c: {like: x}, d..e: x}")
                .unwrap_err()
                .len(),
            3
        );
        assert!(compile("incident..title: x").is_err());
        assert!(compile("incident.title: {exists: yes please}").is_err());
    }
}
