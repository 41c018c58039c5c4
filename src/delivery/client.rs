//! The outbound HTTP client: one pooled HTTP/1.1 client (hyper, rustls), and one attempt with it.
//!
//! hyper directly rather than through reqwest (#16): a delivery needs no redirects, proxies,
//! cookies or URL parsing per request, and reqwest's layers were a tenth of the dispatcher's
//! CPU. The request's `Uri` is built once per upstream (see `request::uri`).

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::retry::{parse_retry_after, AttemptOutcome};
use crate::config::Upstream;

/// How much of an error response is kept for the dead letter's `last_error`.
const ERROR_SNIPPET: usize = 200;
/// How much of any response body is read (to keep the connection reusable) before dropping it.
const DRAIN_LIMIT: usize = 64 * 1024;
/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
const USER_AGENT: &str = concat!("actiongate/", env!("CARGO_PKG_VERSION"));
const KEEPALIVE: Duration = Duration::from_secs(15);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// A pooled client: cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct Client(hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>);

/// Builds a client for upstreams with these TLS settings. One client (and so one connection
/// pool) serves every upstream with default TLS settings.
pub fn build(upstream: Option<&Upstream>) -> Result<Client, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut verify = true;
    if let Some(upstream) = upstream {
        verify = upstream.tls_verify;
        if let Some(path) = &upstream.ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot build TLS settings: {e}"))?;
    let tls = if verify {
        tls.with_root_certificates(roots)
    } else {
        tls.dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    }
    .with_no_client_auth();
    let mut tls = tls;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    // TCP keep-alive and a user timeout, as reqwest had: a pooled connection whose NAT or
    // firewall state vanished is noticed instead of swallowing the next request until its
    // timeout.
    http.set_keepalive(Some(KEEPALIVE));
    http.set_keepalive_interval(Some(KEEPALIVE));
    http.set_keepalive_retries(Some(3));
    http.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
    // Both http:// and https:// URLs; ALPN says http/1.1, the only protocol spoken.
    let connector = HttpsConnector::from((http, tls));
    Ok(Client(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .build(connector),
    ))
}

/// Whether `upstream` needs a client of its own (non-default TLS settings).
pub fn needs_own_client(upstream: &Upstream) -> bool {
    !upstream.tls_verify || upstream.ca_file.is_some()
}

/// `tls_verify: false`: any certificate and any handshake signature are taken, as reqwest's
/// `danger_accept_invalid_certs` did. Checking the signatures would prove nothing once any
/// certificate is accepted, and would refuse the old appliance certificates (X.509 v1, short
/// RSA keys) that are why people turn verification off.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        let mut schemes = self.0.signature_verification_algorithms.supported_schemes();
        // Offered too, so that a server that can sign only with these still talks to us.
        for legacy in [
            SignatureScheme::RSA_PKCS1_SHA1,
            SignatureScheme::ECDSA_SHA1_Legacy,
        ] {
            if !schemes.contains(&legacy) {
                schemes.push(legacy);
            }
        }
        schemes
    }
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

/// Sends one attempt; the upstream's `timeout` bounds it from connect to the end of the
/// answer's body. An error is the one-line description of why no answer came
/// (`timed out after 10s`, `connect failed: …`); it never holds the URL, whose query may
/// carry a key.
pub async fn send(
    client: &Client,
    upstream: &Upstream,
    uri: Uri,
    mut headers: HeaderMap,
    body: Bytes,
) -> Result<Reply, String> {
    // reqwest's defaults, which a configured header overrides.
    headers
        .entry(http::header::USER_AGENT)
        .or_insert(HeaderValue::from_static(USER_AGENT));
    headers
        .entry(http::header::ACCEPT)
        .or_insert(HeaderValue::from_static("*/*"));
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = upstream.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    match tokio::time::timeout(upstream.timeout, exchange(client, request)).await {
        Ok(reply) => reply,
        Err(_) => Err(format!("timed out after {:?}", upstream.timeout)),
    }
}

/// The request and its answer, read up to [`DRAIN_LIMIT`].
async fn exchange(client: &Client, request: http::Request<Full<Bytes>>) -> Result<Reply, String> {
    let response = client.0.request(request).await.map_err(|e| {
        let kind = if e.is_connect() {
            "connect failed"
        } else {
            "request failed"
        };
        describe(kind, e.source())
    })?;
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
    let mut body = response.into_body();
    let mut head = Vec::new();
    let mut read = 0usize;
    while read < DRAIN_LIMIT {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(chunk) = frame.into_data() else {
                    continue; // trailers
                };
                read += chunk.len();
                let room = HEAD_BYTES.saturating_sub(head.len());
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            None => break,
            // The status arrived but the body broke off: the upstream may not have finished
            // handling it, so this counts as no answer (and is retried).
            Some(Err(e)) => {
                return Err(format!(
                    "HTTP {status}, then the response broke off: {}",
                    describe("request failed", Some(&e))
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

/// A one-line description of a client error: `kind`, then `first` and its causes (TLS reasons
/// are in the chain). hyper's own top line ("client error (Connect)") is left out by passing
/// its source: `kind` says it plainly.
fn describe(kind: &str, first: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut text = kind.to_string();
    let mut source = first;
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
