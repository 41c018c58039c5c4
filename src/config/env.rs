//! `${NAME}` expansion over the parsed YAML tree, so that secrets never live in the file.
//!
//! Expansion happens on string values after YAML parsing (not on the raw text), so that a
//! variable's value can never change the structure of the document.

use serde_norway::Value;

/// Replaces `${NAME}` in every string of `value`; `$${` stands for a literal `${`.
/// Returns one problem per missing or malformed variable, each with its key path.
pub fn expand(value: &mut Value, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut problems = Vec::new();
    walk(value, String::new(), lookup, &mut problems);
    problems
}

fn walk(
    value: &mut Value,
    path: String,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) {
    match value {
        Value::String(text) => {
            if text.contains('$') {
                match expand_str(text, lookup) {
                    Ok(expanded) => *text = expanded,
                    Err(why) => problems.push(format!("{}: {why}", display_path(&path))),
                }
            }
        }
        Value::Sequence(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                walk(item, format!("{path}[{index}]"), lookup, problems);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let key = match key {
                    Value::String(name) => name.clone(),
                    other => format!("{other:?}"),
                };
                let child = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                walk(item, child, lookup, problems);
            }
        }
        Value::Tagged(tagged) => walk(&mut tagged.value, path, lookup, problems),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "(top level)"
    } else {
        path
    }
}

fn expand_str(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| "unclosed ${ (write $${ for a literal ${)".to_string())?;
            let name = &after[..end];
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "${{{name}}} is not a valid environment variable name"
                ));
            }
            let value =
                lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cr3t".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_inside_text() {
        assert_eq!(
            expand_str("Bearer ${TOKEN}!", &env).unwrap(),
            "Bearer s3cr3t!"
        );
        assert_eq!(expand_str("${EMPTY}x", &env).unwrap(), "x");
        assert_eq!(expand_str("cost $5", &env).unwrap(), "cost $5");
        assert_eq!(expand_str("$${TOKEN}", &env).unwrap(), "${TOKEN}");
    }

    #[test]
    fn a_missing_variable_names_itself_and_its_key() {
        let mut doc: Value = serde_norway::from_str("a:\n  b: [x, \"${NOPE}\"]\n").unwrap();
        assert_eq!(
            expand(&mut doc, &env),
            vec!["a.b[1]: environment variable NOPE is not set".to_string()]
        );
    }

    #[test]
    fn malformed_references_are_errors() {
        assert!(expand_str("${TOKEN", &env).is_err());
        assert!(expand_str("${1X}", &env).is_err());
        assert!(expand_str("${}", &env).is_err());
    }
}
