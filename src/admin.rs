//! The admin listener: `/metrics`, `/healthz`, `/readyz` and the dead-letter API.
//!
//! Bound to loopback by default: it can replay and delete deliveries. When it must be reachable
//! (Prometheus on another host), `admin.token` guards the dead-letter API, which lists incident
//! payloads' ids and can replay or delete deliveries; metrics and probes stay open so that they
//! need no secret.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Value};

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::ingress::secret;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::store::{DeliveryRecord, Store};

/// Most dead letters listed by one `GET /dead-letters` unless `?limit=` says otherwise.
const DEFAULT_LIST_LIMIT: usize = 1_000;
/// How long a readiness probe waits for a listener to accept.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

pub struct Admin {
    /// The configuration in force (reloads change `admin.token`).
    config: Arc<ArcSwap<Config>>,
    store: Store,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
    listeners: Vec<SocketAddr>,
    /// Set once every listener has been seen accepting connections.
    listening: AtomicBool,
}

impl Admin {
    /// The admin API over `spool`; `/readyz` also waits until `listeners` accept connections.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        store: Store,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
        listeners: Vec<SocketAddr>,
    ) -> Admin {
        Admin {
            config,
            store,
            metrics,
            lifecycle,
            listeners,
            listening: AtomicBool::new(false),
        }
    }

    /// Whether the main listeners accept connections. Pingora reports a listening service as
    /// started before it has bound its sockets, so readiness is checked by connecting, once.
    async fn listeners_up(&self) -> bool {
        if self.listening.load(Ordering::Acquire) {
            return true;
        }
        for addr in &self.listeners {
            let target = match addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => {
                    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
                }
                IpAddr::V6(ip) if ip.is_unspecified() => {
                    SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
                }
                _ => *addr,
            };
            let connected =
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(target)).await;
            if !matches!(connected, Ok(Ok(_))) {
                return false;
            }
        }
        self.listening.store(true, Ordering::Release);
        true
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session
            .req_header()
            .uri
            .query()
            .unwrap_or_default()
            .to_string();
        if path.starts_with("/dead-letters") {
            if let Some(token) = &self.config.load().admin_token {
                let values = session
                    .req_header()
                    .headers
                    .get_all(http::header::AUTHORIZATION)
                    .iter()
                    .map(|v| v.as_bytes());
                if !secret::holds(token, values) {
                    let mut denied = error(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "the dead-letter API needs Authorization: Bearer <admin.token>",
                    );
                    denied.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Bearer"),
                    );
                    return denied;
                }
            }
        }
        match (&method, path.as_str()) {
            (&Method::GET, "/metrics") => {
                let (requests, deliveries) = self.lifecycle.in_flight();
                self.metrics.set_in_flight(requests, deliveries);
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.encode(),
                )
            }
            (&Method::GET, "/healthz") => json_reply(StatusCode::OK, json!({"status": "ok"})),
            (&Method::GET, "/readyz") => {
                if self.lifecycle.is_draining() {
                    json_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": "draining"}),
                    )
                } else if let Some(why) = self.store.not_ready() {
                    // Events cannot be stored here now: a load balancer should send them
                    // elsewhere. A full disk or an unreachable database passes by itself.
                    json_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": why.status, "message": why.error.to_string()}),
                    )
                } else if !self.listeners_up().await {
                    json_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": "starting"}),
                    )
                } else {
                    json_reply(StatusCode::OK, json!({"status": "ready"}))
                }
            }
            (&Method::GET, "/dead-letters") => self.list(&query).await,
            (&Method::POST, "/dead-letters/replay") => match query_id(&query) {
                Err(why) => error(StatusCode::BAD_REQUEST, "bad_request", &why),
                Ok(id) => match self.store.replay(id).await {
                    Ok(n) if id.is_some() && n == 0 => not_found(id),
                    Ok(n) => json_reply(StatusCode::OK, json!({"replayed": n})),
                    Err(e) => unavailable(&e.to_string()),
                },
            },
            (&Method::DELETE, "/dead-letters") => match query_id(&query) {
                Err(why) => error(StatusCode::BAD_REQUEST, "bad_request", &why),
                Ok(None) => error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "DELETE needs ?id=<dead letter id>",
                ),
                Ok(Some(id)) => match self.store.purge(id).await {
                    Ok(true) => json_reply(StatusCode::OK, json!({"deleted": id})),
                    Ok(false) => not_found(Some(id)),
                    Err(e) => unavailable(&e.to_string()),
                },
            },
            (_, "/metrics" | "/healthz" | "/readyz" | "/dead-letters" | "/dead-letters/replay") => {
                error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    &format!("{method} not allowed on {path}"),
                )
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no admin endpoint at {path}"),
            ),
        }
    }
}

impl Admin {
    async fn list(&self, query: &str) -> Response<Vec<u8>> {
        // A limit that does not parse is a mistake to say, not a reason to list everything.
        let limit = match query_param(query, "limit").map(str::parse::<usize>) {
            None => DEFAULT_LIST_LIMIT,
            Some(Ok(n)) if n > 0 => n,
            Some(_) => {
                let v = query_param(query, "limit").unwrap_or_default();
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("limit {v:?} is not a positive whole number"),
                );
            }
        };
        match self.store.dead_letters(limit).await {
            Ok(records) => {
                let items: Vec<Value> = records.iter().map(dead_letter_json).collect();
                json_reply(StatusCode::OK, Value::Array(items))
            }
            Err(e) => unavailable(&e.to_string()),
        }
    }
}

fn dead_letter_json(r: &DeliveryRecord) -> Value {
    json!({
        "id": r.id,
        "action": r.action(),
        "upstream": r.upstream(),
        "event_id": r.event_id,
        "attempts": r.attempts,
        "last_error": r.last_error.as_deref(),
        "last_status": r.last_status,
        "accepted_at": time(Some(r.accepted_ms)),
        "first_attempt_at": time(r.first_attempt_ms),
        "last_attempt_at": time(r.last_attempt_ms),
        "dead_at": time(r.dead_ms),
    })
}

/// RFC 3339 time (UTC, milliseconds), or null.
fn time(ms: Option<u64>) -> Value {
    ms.map_or(Value::Null, |ms| {
        let at = UNIX_EPOCH + Duration::from_millis(ms);
        Value::String(humantime::format_rfc3339_millis(at).to_string())
    })
}

fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn query_id(query: &str) -> Result<Option<u64>, String> {
    match query_param(query, "id") {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("id {v:?} is not a dead letter id")),
    }
}

fn not_found(id: Option<u64>) -> Response<Vec<u8>> {
    let id = id.map_or_else(String::new, |id| id.to_string());
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no dead letter with id {id}"),
    )
}

fn unavailable(why: &str) -> Response<Vec<u8>> {
    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Vec<u8>> {
    json_reply(status, json!({"error": code, "message": message}))
}

fn json_reply(status: StatusCode, body: Value) -> Response<Vec<u8>> {
    reply(status, "application/json", body.to_string().into_bytes())
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    // Pingora does not add Content-Length for us; without it the body would be
    // close-delimited on a keep-alive connection.
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(v) = content_type.parse() {
        headers.insert(http::header::CONTENT_TYPE, v);
    }
    let length = response.body().len();
    response.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(length),
    );
    response
}
