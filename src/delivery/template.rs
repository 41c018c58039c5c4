//! Flashduty-style body templates: `{{incident.title}}` placeholders inside a JSON document.
//!
//! Semantics (the ones operators know from Flashduty's custom request bodies):
//! - a JSON string that is exactly one placeholder keeps the value's JSON type;
//! - a placeholder mixed with text renders as text (strings as themselves, anything else as
//!   its JSON spelling);
//! - a path that does not resolve stays as the literal `{{...}}` text;
//! - `value_mapping` replaces a resolved value per path (`Critical` → `P0`).
//!
//! Templates are parsed once, at config load; rendering walks the compiled tree and writes
//! through serde_json's serializer, so the output is valid JSON whatever the incident holds.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde_json::Value;

use super::path::FieldPath;

/// A compiled JSON body template.
#[derive(Debug, Clone)]
pub struct Template {
    root: Node,
}

#[derive(Debug, Clone)]
enum Node {
    /// JSON without placeholders, serialized once at load.
    Literal(String),
    /// A string that is exactly one placeholder: the value keeps its JSON type.
    Whole(Var),
    /// A string mixing text and placeholders: always renders as a JSON string.
    Text(TextTemplate),
    Array(Vec<Node>),
    Object(Vec<(TextTemplate, Node)>),
}

/// Text with placeholders, rendered as plain text (JSON strings, header values).
#[derive(Debug, Clone, Default)]
pub struct TextTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Var(Var),
}

#[derive(Debug, Clone)]
struct Var {
    path: FieldPath,
    /// The placeholder as written, emitted when the path does not resolve.
    literal: String,
}

/// Per-path replacement of values during substitution.
#[derive(Debug, Clone, Default)]
pub struct ValueMapping {
    by_path: HashMap<String, HashMap<String, String>>,
}

impl ValueMapping {
    pub fn new(map: BTreeMap<String, BTreeMap<String, String>>) -> ValueMapping {
        ValueMapping {
            by_path: map
                .into_iter()
                .map(|(path, values)| (path.trim().to_string(), values.into_iter().collect()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }

    fn replace<'a>(&'a self, path: &FieldPath, original: &str) -> Option<&'a str> {
        self.by_path
            .get(path.as_str())?
            .get(original)
            .map(String::as_str)
    }
}

impl Template {
    /// Parses a JSON body template. Errors name the line and column.
    pub fn parse_json(text: &str) -> Result<Template, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| {
            format!(
                "line {} column {}: not valid JSON: {e}",
                e.line(),
                e.column()
            )
        })?;
        let root = compile(&doc).map_err(|(snippet, why)| {
            let (line, column) = locate(text, &snippet);
            format!("line {line} column {column}: {why}")
        })?;
        Ok(Template { root })
    }

    /// Renders against `payload`, appending JSON to `out`.
    pub fn render(&self, payload: &Value, mapping: &ValueMapping, out: &mut Vec<u8>) {
        render_node(&self.root, payload, mapping, out);
    }

    /// Every path the template reads.
    pub fn paths(&self) -> Vec<&FieldPath> {
        let mut paths = Vec::new();
        node_paths(&self.root, &mut paths);
        paths
    }

    /// Renders into a fresh buffer.
    pub fn render_to_vec(&self, payload: &Value, mapping: &ValueMapping) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.render(payload, mapping, &mut out);
        out
    }
}

type CompileError = (String, String);

fn node_paths<'t>(node: &'t Node, out: &mut Vec<&'t FieldPath>) {
    match node {
        Node::Literal(_) => {}
        Node::Whole(var) => out.push(&var.path),
        Node::Text(text) => out.extend(text.paths()),
        Node::Array(items) => items.iter().for_each(|item| node_paths(item, out)),
        Node::Object(fields) => {
            for (key, value) in fields {
                out.extend(key.paths());
                node_paths(value, out);
            }
        }
    }
}

fn compile(value: &Value) -> Result<Node, CompileError> {
    Ok(match value {
        Value::String(s) => {
            let text = TextTemplate::parse(s)?;
            match text.parts.as_slice() {
                [] | [Part::Text(_)] => Node::Literal(value.to_string()),
                [Part::Var(var)] => Node::Whole(var.clone()),
                _ => Node::Text(text),
            }
        }
        Value::Array(items) => {
            let nodes = items.iter().map(compile).collect::<Result<Vec<_>, _>>()?;
            if nodes.iter().all(|n| matches!(n, Node::Literal(_))) {
                Node::Literal(value.to_string())
            } else {
                Node::Array(nodes)
            }
        }
        Value::Object(map) => {
            let mut fields = Vec::with_capacity(map.len());
            for (key, item) in map {
                fields.push((TextTemplate::parse(key)?, compile(item)?));
            }
            let literal = fields
                .iter()
                .all(|(k, n)| k.is_literal() && matches!(n, Node::Literal(_)));
            if literal {
                Node::Literal(value.to_string())
            } else {
                Node::Object(fields)
            }
        }
        other => Node::Literal(other.to_string()),
    })
}

impl TextTemplate {
    /// Splits text into literal runs and `{{path}}` placeholders.
    pub fn parse(text: &str) -> Result<TextTemplate, CompileError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                let snippet: String = rest[open..].chars().take(40).collect();
                return Err((
                    snippet,
                    "unclosed {{ (placeholders look like {{incident.title}})".into(),
                ));
            };
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let literal = &rest[open..open + 2 + close + 2];
            let path =
                FieldPath::parse(&after[..close]).map_err(|why| (literal.to_string(), why))?;
            parts.push(Part::Var(Var {
                path,
                literal: literal.to_string(),
            }));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(TextTemplate { parts })
    }

    /// Every path the text reads.
    pub fn paths(&self) -> impl Iterator<Item = &FieldPath> {
        self.parts.iter().filter_map(|part| match part {
            Part::Var(var) => Some(&var.path),
            Part::Text(_) => None,
        })
    }

    /// True when the text has no placeholder.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// Parses text with placeholders for a header value or a query string.
    pub fn parse_text(text: &str) -> Result<TextTemplate, String> {
        TextTemplate::parse(text).map_err(|(snippet, why)| {
            let column = text
                .find(&snippet)
                .map_or(0, |at| text[..at].chars().count())
                + 1;
            format!("column {column}: {why}")
        })
    }

    /// Renders as plain text.
    pub fn render(&self, payload: &Value, mapping: &ValueMapping, out: &mut String) {
        self.render_encoded(payload, mapping, out, |text, out| out.push_str(text));
    }

    /// Renders with each substituted value passed through `encode` (literal text is kept as
    /// written), e.g. to URL-encode values placed in a query string.
    pub fn render_encoded(
        &self,
        payload: &Value,
        mapping: &ValueMapping,
        out: &mut String,
        encode: impl Fn(&str, &mut String),
    ) {
        let mut value = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Var(var) => {
                    value.clear();
                    var.render_text(payload, mapping, &mut value);
                    encode(&value, out);
                }
            }
        }
    }

    pub fn render_to_string(&self, payload: &Value, mapping: &ValueMapping) -> String {
        let mut out = String::new();
        self.render(payload, mapping, &mut out);
        out
    }
}

impl Var {
    fn render_text(&self, payload: &Value, mapping: &ValueMapping, out: &mut String) {
        match self.path.resolve(payload) {
            None => out.push_str(&self.literal),
            Some(Value::String(s)) => out.push_str(mapping.replace(&self.path, s).unwrap_or(s)),
            Some(other @ (Value::Number(_) | Value::Bool(_))) => {
                let text = other.to_string();
                out.push_str(mapping.replace(&self.path, &text).unwrap_or(&text));
            }
            Some(other) => {
                let _ = write!(out, "{other}");
            }
        }
    }
}

fn render_node(node: &Node, payload: &Value, mapping: &ValueMapping, out: &mut Vec<u8>) {
    match node {
        Node::Literal(json) => out.extend_from_slice(json.as_bytes()),
        Node::Whole(var) => match var.path.resolve(payload) {
            None => write_json_str(&var.literal, out),
            Some(value) => {
                let mapped = match value {
                    Value::String(s) => mapping.replace(&var.path, s),
                    Value::Number(_) | Value::Bool(_) => {
                        mapping.replace(&var.path, &value.to_string())
                    }
                    _ => None,
                };
                match mapped {
                    Some(text) => write_json_str(text, out),
                    None => write_json_value(value, out),
                }
            }
        },
        Node::Text(text) => write_json_str(&text.render_to_string(payload, mapping), out),
        Node::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                render_node(item, payload, mapping, out);
            }
            out.push(b']');
        }
        Node::Object(fields) => {
            out.push(b'{');
            for (i, (key, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_str(&key.render_to_string(payload, mapping), out);
                out.push(b':');
                render_node(item, payload, mapping, out);
            }
            out.push(b'}');
        }
    }
}

fn write_json_str(text: &str, out: &mut Vec<u8>) {
    // Writing to a Vec cannot fail, and a &str always serializes.
    let _ = serde_json::to_writer(out, text);
}

fn write_json_value(value: &Value, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(out, value);
}

/// 1-based line and column of `snippet` in `text` (its first occurrence), for error messages.
fn locate(text: &str, snippet: &str) -> (usize, usize) {
    let at = text.find(snippet).unwrap_or(0);
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
