//! The outbound HTTP client: one pooled HTTP/1.1 client (rustls), and one attempt with it.

use std::error::Error as _;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;

use super::retry::{parse_retry_after, AttemptOutcome};
use crate::config::Upstream;

/// How much of an error response is kept for the dead letter's `last_error`.
const ERROR_SNIPPET: usize = 200;
/// How much of any response body is read (to keep the connection reusable) before dropping it.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Builds a client for upstreams with these TLS settings. One client (and so one connection
/// pool) serves every upstream with default TLS settings.
pub fn build(upstream: Option<&Upstream>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .http1_only()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("actiongate/", env!("CARGO_PKG_VERSION")));
    if let Some(upstream) = upstream {
        if !upstream.tls_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some(path) = &upstream.ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{}: {e}", path.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
    }
    builder
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))
}

/// Whether `upstream` needs a client of its own (non-default TLS settings).
pub fn needs_own_client(upstream: &Upstream) -> bool {
    !upstream.tls_verify || upstream.ca_file.is_some()
}

/// What came back from an attempt that got an answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<Duration>,
    /// The first [`HEAD_BYTES`] of the body: for the description, `actiongate.response` and
    /// Flashduty's envelope.
    pub head: Vec<u8>,
    /// Flashduty's `Flashcat-Request-Id`, kept in the description of a failed report.
    pub request_id: Option<String>,
}

/// How much of a response body is kept.
pub const HEAD_BYTES: usize = 4096;

/// Sends one attempt. An error is the one-line description of why no answer came
/// (`timed out after 10s`, `connect failed: …`); it never holds the URL, whose query may
/// carry a key.
pub async fn send(
    client: &reqwest::Client,
    upstream: &Upstream,
    url: url::Url,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Reply, String> {
    let sent = client
        .request(upstream.method.clone(), url)
        .timeout(upstream.timeout)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let mut response = sent.map_err(|e| describe(&e.without_url(), upstream.timeout))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let request_id = response
        .headers()
        .get("flashcat-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut head = Vec::new();
    let mut read = 0usize;
    while read < DRAIN_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                let room = HEAD_BYTES.saturating_sub(head.len());
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) => break,
            // The status arrived but the body broke off: the upstream may not have finished
            // handling it, so this counts as no answer (and is retried).
            Err(e) => {
                return Err(format!(
                    "HTTP {status}, then the response broke off: {}",
                    describe(&e.without_url(), upstream.timeout)
                ))
            }
        }
    }
    Ok(Reply {
        status,
        retry_after,
        head,
        request_id,
    })
}

/// How an upstream's answer counts (its status), with a one-line description for logs and
/// dead letters (`HTTP 404: no such host`).
pub fn judge(reply: &Reply) -> (AttemptOutcome, String) {
    let status = reply.status;
    let snippet = &reply.head[..reply.head.len().min(ERROR_SNIPPET)];
    let text = String::from_utf8_lossy(snippet);
    let text = text.trim();
    let description = if text.is_empty() || (200..300).contains(&status) {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    };
    let outcome = AttemptOutcome::Status {
        status,
        retry_after: reply.retry_after,
    };
    (outcome, description)
}

/// A one-line description of a client error with its causes (TLS reasons are in the chain).
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {timeout:?}");
    }
    let mut text = if e.is_connect() {
        "connect failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
