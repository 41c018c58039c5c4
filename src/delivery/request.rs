//! What an upstream receives for one delivery: body and headers (the contract's
//! "What an upstream receives"), built the same way by the dispatcher and `actiongate render`.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::config::Upstream;

/// Whether the upstream needs the payload parsed (for `when` or a template).
pub fn needs_payload(upstream: &Upstream) -> bool {
    upstream.when.is_some() || upstream.body.is_some()
}

/// The request body: the rendered template, or the payload exactly as received.
pub fn body(upstream: &Upstream, raw: &Bytes, payload: Option<&Value>) -> Bytes {
    match (&upstream.body, payload) {
        (Some(template), Some(payload)) => {
            Bytes::from(template.render_to_vec(payload, &upstream.value_mapping))
        }
        _ => raw.clone(),
    }
}

/// The request headers: the configured ones, then the contract's own (which win).
pub fn headers(upstream: &Upstream, action: &str, event_id: &str, attempt: u32) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(upstream.headers.len() + 5);
    for (name, value) in &upstream.headers {
        headers.append(name.clone(), value.clone());
    }
    let mut set = |name: &'static str, value: String| {
        // Event ids are validated JSON strings but may hold bytes a header cannot carry;
        // those are sent percent-encoded rather than dropped.
        let value = HeaderValue::from_str(&value).unwrap_or_else(|_| {
            HeaderValue::from_str(&percent_encode(&value)).unwrap_or(HeaderValue::from_static(""))
        });
        headers.insert(HeaderName::from_static(name), value);
    };
    set("content-type", "application/json".into());
    set("x-actiongate-event-id", event_id.to_string());
    set("x-actiongate-action", action.to_string());
    set("x-actiongate-attempt", attempt.to_string());
    set("idempotency-key", format!("{event_id}:{}", upstream.name));
    headers
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
