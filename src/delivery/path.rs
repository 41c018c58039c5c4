//! Field paths into a payload (`incident.labels.service`, `incident.responders.0.email`),
//! shared by `when` rules and templates so both resolve a path the same way.

use std::fmt;

use serde_json::Value;

/// A parsed dot path. A segment that is a number indexes an array (or names an object key
/// spelled with digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    key: String,
    index: Option<usize>,
}

impl FieldPath {
    /// Parses `a.b.0.c`; segments must be non-empty and free of spaces and braces.
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty field path".into());
        }
        let mut segments = Vec::new();
        for key in text.split('.') {
            let valid = !key.is_empty()
                && key
                    .chars()
                    .all(|c| !c.is_whitespace() && !matches!(c, '{' | '}' | '"'));
            if !valid {
                return Err(format!(
                    "{text:?} is not a field path (e.g. incident.labels.service)"
                ));
            }
            segments.push(Segment {
                key: key.to_string(),
                index: key.parse().ok(),
            });
        }
        Ok(FieldPath {
            text: text.to_string(),
            segments,
        })
    }

    /// The value at this path, or `None` if any step is missing.
    pub fn resolve<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        let mut at = root;
        for segment in &self.segments {
            at = match at {
                Value::Object(map) => map.get(&segment.key)?,
                Value::Array(items) => items.get(segment.index?)?,
                _ => return None,
            };
        }
        Some(at)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The segments as written (`incident`, `responders`, `0`, `email`).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().map(|s| s.key.as_str())
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resolves_objects_and_array_indexes() {
        let doc = json!({"incident": {"responders": [{"email": "a@x"}, {"email": "b@x"}],
                         "labels": {"0": "zero"}}});
        let path = |p| FieldPath::parse(p).unwrap();
        assert_eq!(
            path("incident.responders.1.email").resolve(&doc),
            Some(&json!("b@x"))
        );
        assert_eq!(path("incident.responders.2.email").resolve(&doc), None);
        assert_eq!(
            path("incident.labels.0").resolve(&doc),
            Some(&json!("zero"))
        );
        assert_eq!(path("incident.missing.x").resolve(&doc), None);
        assert_eq!(path("incident.responders.x").resolve(&doc), None);
    }

    #[test]
    fn rejects_malformed_paths() {
        for bad in ["", "a..b", ".a", "a.", "a b", "a.{b}"] {
            assert!(FieldPath::parse(bad).is_err(), "{bad:?}");
        }
    }
}
