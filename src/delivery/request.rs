//! What an upstream receives for one delivery: body and headers (the contract's
//! "What an upstream receives"), built the same way by the dispatcher and `actiongate render`.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::config::{HeaderSource, Upstream};

/// Whether the upstream needs the payload parsed (for `when` or any template).
pub fn needs_payload(upstream: &Upstream) -> bool {
    upstream.when.is_some()
        || upstream.body.is_some()
        || upstream.query.is_some()
        || upstream
            .headers
            .iter()
            .any(|(_, h)| matches!(h, HeaderSource::Template(_)))
}

/// The request URL, with its query string rendered when it is a template.
pub fn url(upstream: &Upstream, payload: Option<&Value>) -> url::Url {
    let (Some(query), Some(payload)) = (&upstream.query, payload) else {
        return upstream.url.clone();
    };
    let mut rendered = String::new();
    query.render_encoded(
        payload,
        &upstream.value_mapping,
        &mut rendered,
        |value, out| {
            out.extend(url::form_urlencoded::byte_serialize(value.as_bytes()));
        },
    );
    let mut url = upstream.url.clone();
    url.set_query(Some(&rendered));
    url
}

/// A URL as hyper sends it. The `url` crate's serialization is percent-encoded, so this fails
/// only for what no HTTP request can carry; the reason never holds the URL (its query may carry
/// a key).
/// A user and password in the URL leave it here; `headers` sends them as `Authorization`.
pub fn uri(url: &url::Url) -> Result<http::Uri, String> {
    let sent = if url.username().is_empty() && url.password().is_none() {
        http::Uri::try_from(url.as_str())
    } else {
        let mut bare = url.clone();
        // Cannot fail: the URL has a host (checked at config load).
        let _ = bare.set_username("");
        let _ = bare.set_password(None);
        http::Uri::try_from(bare.as_str())
    };
    sent.map_err(|e| format!("the URL cannot be sent: {e}"))
}

/// `Authorization: Basic` from a user and password in the URL, as browsers and reqwest send
/// them; marked sensitive so that it is never logged.
fn basic_auth(url: &url::Url) -> Option<HeaderValue> {
    use base64::Engine as _;
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8_lossy()
            .into_owned()
    };
    let credentials = format!(
        "{}:{}",
        decode(url.username()),
        decode(url.password().unwrap_or_default())
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
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

/// The request headers: the configured ones (rendered when templates), then the contract's
/// own, which win.
pub fn headers(
    upstream: &Upstream,
    action: &str,
    event_id: &str,
    attempt: u32,
    payload: Option<&Value>,
) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(upstream.headers.len() + 5);
    for (name, source) in &upstream.headers {
        let value = match (source, payload) {
            (HeaderSource::Static(value), _) => value.clone(),
            (HeaderSource::Template(template), Some(payload)) => {
                header_value(&template.render_to_string(payload, &upstream.value_mapping))
            }
            (HeaderSource::Template(_), None) => continue,
        };
        headers.append(name.clone(), value);
    }
    if !headers.contains_key(http::header::AUTHORIZATION) {
        if let Some(value) = basic_auth(&upstream.url) {
            headers.insert(http::header::AUTHORIZATION, value);
        }
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

/// A header value from rendered text. Incident text may hold bytes a header cannot carry
/// (control characters, non-ASCII): those are percent-encoded rather than dropped, so the
/// request still goes out and the value is recoverable.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text)
        .or_else(|_| HeaderValue::from_str(&percent_encode(text)))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;

    fn upstream(extra: &str) -> Upstream {
        let yaml = format!(
            "listen: [{{addr: \"127.0.0.1:1\"}}]\nactions:\n  - name: a\n    path: /a\n    upstreams:\n      - {{name: u, {extra}}}\n"
        );
        let config = Config::from_yaml(&yaml, &|_| None).unwrap_or_else(|e| panic!("{e}"));
        config.actions[0].upstreams[0].clone()
    }

    fn payload() -> Value {
        json!({"incident": {"num": "AB77C1", "title": "disk full & slow\r\nx", "labels": {"resource": "web 03/a"}}})
    }

    #[test]
    fn contract_headers_are_always_set_and_win() {
        let u = upstream("url: \"http://x/\", headers: {Idempotency-Key: mine, X-Team: sre}");
        let h = headers(&u, "a", "e1", 3, None);
        assert_eq!(h["idempotency-key"], "e1:u");
        assert_eq!(h["x-actiongate-event-id"], "e1");
        assert_eq!(h["x-actiongate-action"], "a");
        assert_eq!(h["x-actiongate-attempt"], "3");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-team"], "sre");
    }

    #[test]
    fn header_templates_render_and_unsafe_bytes_are_encoded() {
        let u = upstream("url: \"http://x/\", headers: {X-Incident: \"{{incident.num}}\", X-Title: \"t={{incident.title}}\"}");
        assert!(needs_payload(&u));
        let h = headers(&u, "a", "e1", 1, Some(&payload()));
        assert_eq!(h["x-incident"], "AB77C1");
        assert_eq!(h["x-title"], "t=disk%20full%20&%20slow%0D%0Ax");
    }

    #[test]
    fn query_templates_url_encode_substituted_values_only() {
        let u = upstream("url: \"http://x:8/restart?host={{incident.labels.resource}}&src=fd&n={{incident.num}}\"");
        assert!(needs_payload(&u));
        assert_eq!(
            url(&u, Some(&payload())).as_str(),
            "http://x:8/restart?host=web+03%2Fa&src=fd&n=AB77C1"
        );
        assert_eq!(url(&u, None).as_str(), "http://x:8/restart");
    }

    #[test]
    fn placeholders_outside_the_query_are_refused() {
        let yaml = "listen: [{addr: \"127.0.0.1:1\"}]\nactions:\n  - name: a\n    path: /a\n    upstreams: [{name: u, url: \"http://{{incident.num}}/x\"}]\n";
        let err = Config::from_yaml(yaml, &|_| None).unwrap_err();
        assert_eq!(
            err.0,
            vec!["actions[0].upstreams[0].url: placeholders are allowed only in the query string"]
        );
    }

    #[test]
    fn a_user_in_the_url_becomes_basic_authorization_unless_one_is_configured() {
        let u = upstream("url: \"https://ops%40corp:s%3Acret@x:8443/hook?a=1\"");
        let sent = uri(&u.url).unwrap();
        assert_eq!(sent.to_string(), "https://x:8443/hook?a=1");
        let h = headers(&u, "a", "e1", 1, None);
        // base64("ops@corp:s:cret")
        assert_eq!(h["authorization"], "Basic b3BzQGNvcnA6czpjcmV0");
        assert!(h["authorization"].is_sensitive());
        let mine = upstream("url: \"https://u:p@x/\", headers: {Authorization: Bearer t}");
        assert_eq!(
            headers(&mine, "a", "e1", 1, None)["authorization"],
            "Bearer t"
        );
        let plain = upstream("url: \"https://x/\"");
        assert!(!headers(&plain, "a", "e1", 1, None).contains_key("authorization"));
    }

    #[test]
    fn body_is_raw_without_a_template() {
        let u = upstream("url: \"http://x/\"");
        assert!(!needs_payload(&u));
        let raw = Bytes::from_static(b"{ \"raw\" : 1 }");
        assert_eq!(body(&u, &raw, None), raw);
    }
}
