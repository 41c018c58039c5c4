//! The request path: from a request on an action path to a durable, acknowledged event.
//!
//! Checks run in the contract's order — action, client address, secret, method, content
//! type, size, payload — and a request is stored only when every check passed. Then the spool
//! answers duplicates and the action's guards ([`guard`]) in one step with the write. Each
//! check is owned by a module of its own; this file only sequences them.

pub mod admission;
pub mod allowlist;
pub mod answer;
pub mod client_addr;
pub mod event_type;
pub mod guard;
pub mod payload;
pub mod refusals;
pub mod secret;
pub mod watchdog;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{header, Method};
use pingora_core::protocols::http::ServerSession;

use crate::config::{Action, Config, DriftPolicy, Limits, ReportOutcome};
use crate::delivery::report::{self, Facts};
use crate::lifecycle::Lifecycle;
use crate::metrics::{ActionMetrics, Metrics};
use crate::store::{now_ms, Appended, NewEvent, Store};
use allowlist::IpSet;
use answer::{Answer, Outcome};
use payload::{PayloadError, Verdict, DRIFT_FIELDS};

/// Distinct drift values logged, at most; past that they are only counted.
const DRIFT_LOG_LIMIT: usize = 256;

/// The request path for every configured action.
pub struct Ingress {
    actions: HashMap<String, Route>,
    trusted_proxies: IpSet,
    limits: Limits,
    drift_policy: DriftPolicy,
    store: Store,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
    drift_logged: Mutex<HashSet<(usize, String)>>,
    /// Refusals by address or secret, logged at most once per source every 10 s.
    refusals: refusals::RefusalLog,
}

/// What the checks learnt about a request, for its log line.
#[derive(Default)]
struct Seen {
    client: Option<std::net::IpAddr>,
    event_id: Option<String>,
}

/// One action, with what its requests need at hand.
struct Route {
    action: Action,
    name: Arc<str>,
    upstreams: Vec<Arc<str>>,
    metrics: ActionMetrics,
    /// Set when the action reports its guard refusals.
    refusal_report: Option<report::Plan>,
}

impl Ingress {
    pub fn new(
        config: &Config,
        store: Store,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
    ) -> Ingress {
        let actions = config
            .actions
            .iter()
            .map(|action| {
                let route = Route {
                    name: Arc::from(action.name.as_str()),
                    upstreams: action
                        .upstreams
                        .iter()
                        .map(|u| Arc::from(u.name.as_str()))
                        .collect(),
                    metrics: metrics.for_action(&action.name, action.guard.is_some()),
                    refusal_report: action
                        .report
                        .as_ref()
                        .filter(|r| action.guard.is_some() && r.wants(ReportOutcome::Guarded))
                        .map(report::Plan::new),
                    action: action.clone(),
                };
                (action.path.clone(), route)
            })
            .collect();
        Ingress {
            actions,
            trusted_proxies: config.trusted_proxies.clone(),
            limits: config.limits,
            drift_policy: config.schema_drift,
            store,
            metrics,
            lifecycle,
            drift_logged: Mutex::new(HashSet::new()),
            refusals: refusals::RefusalLog::default(),
        }
    }

    /// Whether `peer` is one of `trusted_proxies`.
    pub fn is_trusted_proxy(&self, peer: std::net::IpAddr) -> bool {
        self.trusted_proxies.contains(peer)
    }

    /// Whether some action allows `peer` as a client.
    pub fn admits(&self, peer: std::net::IpAddr) -> bool {
        self.actions
            .values()
            .any(|route| route.action.allow.contains(peer))
    }

    /// Whether `path` is an action path.
    pub fn is_action_path(&self, path: &str) -> bool {
        self.actions.contains_key(path)
    }

    /// Answers the request if its path is an action path and returns `Ok(true)`; returns
    /// `Ok(false)` without touching the session otherwise, so the caller can proxy it on.
    pub async fn handle(&self, session: &mut ServerSession) -> pingora_core::Result<bool> {
        let started = Instant::now();
        let Some(route) = self.actions.get(session.req_header().uri.path()) else {
            return Ok(false);
        };
        let _in_flight = self.lifecycle.request();
        let mut seen = Seen::default();
        let answer = self.decide(route, session, &mut seen).await;
        // Counted before answering, so that a client which has its answer also finds it in
        // the metrics; the ack time below runs to the last byte of the response.
        route.metrics.request(answer.outcome);
        let result = respond(session, &answer).await;
        let elapsed = started.elapsed();
        let status = answer.outcome.status();
        if status == 200 {
            route.metrics.ack(elapsed);
        }
        // One line per request. The reason of a refusal names a field or a header, never a
        // value from the payload or a secret.
        let reason = if status == 200 {
            ""
        } else {
            answer.detail.as_str()
        };
        // Refusals by address or secret are what a flood is made of: one line per source and
        // reason every 10 s, saying how many it stands for.
        let refused = match (answer.outcome, seen.client) {
            (Outcome::ForbiddenSource | Outcome::Unauthorized, Some(client)) => {
                match self
                    .refusals
                    .refused(client, answer.outcome.label(), Instant::now())
                {
                    refusals::Verdict::Quiet => return result.map(|()| true),
                    refusals::Verdict::Log(count) => count,
                }
            }
            _ => 1,
        };
        if refused > 1 {
            log::info!(
                target: "actiongate::request",
                action = route.name.as_ref(),
                client:% = seen.client.map_or_else(String::new, |c| c.to_string()),
                outcome = answer.outcome.label(),
                status = status,
                refused = refused,
                reason = reason;
                "requests refused since the last line for this source"
            );
            return result.map(|()| true);
        }
        log::info!(
            target: "actiongate::request",
            action = route.name.as_ref(),
            client:% = seen.client.map_or_else(String::new, |c| c.to_string()),
            outcome = answer.outcome.label(),
            status = status,
            event_id = seen.event_id.as_deref().unwrap_or_default(),
            ack_ms = crate::logging::millis(elapsed),
            reason = reason;
            "request"
        );
        result.map(|()| true)
    }

    /// Answers `404 unknown_action`, for a path that is no action when there is no fallback.
    pub async fn answer_unknown(&self, session: &mut ServerSession) -> pingora_core::Result<()> {
        self.metrics.unknown_action();
        let path = session.req_header().uri.path().to_string();
        let answer = Answer::error(Outcome::UnknownAction, format!("no action at {path}"));
        respond(session, &answer).await
    }

    async fn decide(&self, route: &Route, session: &mut ServerSession, seen: &mut Seen) -> Answer {
        let action = &route.action;
        let request = session.req_header();

        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let Some(peer) = peer else {
            return Answer::error(Outcome::ForbiddenSource, "client address unknown");
        };
        let client = client_addr::resolve(
            peer,
            request
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.as_bytes()),
            &self.trusted_proxies,
        );
        seen.client = Some(client);
        // Checked before the address, but answered after it (the contract's order): a refusal
        // by address can then tell whether the secret was right.
        let secret_ok = action.secret.as_ref().map(|s| {
            let values = request
                .headers
                .get_all(&s.header)
                .iter()
                .map(|v| v.as_bytes());
            secret::holds(s, values)
        });
        if !action.allow.contains(client) {
            // A right secret from an unknown address most likely means Flashduty changed its
            // push addresses: say so (the answer stays 403).
            if secret_ok == Some(true) {
                route.metrics.forbidden_with_secret.inc();
                let verdict = self
                    .refusals
                    .refused(client, "right_secret", Instant::now());
                if let refusals::Verdict::Log(count) = verdict {
                    let hint = if action.allows_flashduty {
                        "has Flashduty changed its push addresses? (see sources.flashduty)"
                    } else {
                        "is the address missing from the action's allow list?"
                    };
                    log::warn!(
                        action = action.name.as_str(),
                        client:% = client,
                        refused = count;
                        "source refused although its secret was right: {hint}"
                    );
                }
            }
            return Answer::error(
                Outcome::ForbiddenSource,
                format!("source {client} is not allowed for action {}", action.name),
            );
        }
        if let (Some(s), Some(false)) = (&action.secret, secret_ok) {
            return Answer::error(
                Outcome::Unauthorized,
                format!("header {} is missing or wrong", s.header),
            );
        }

        if self.lifecycle.is_draining() {
            return Answer::error(Outcome::Unavailable, "shutting down; retry shortly");
        }

        if request.method != Method::POST {
            return Answer::error(
                Outcome::MethodNotAllowed,
                format!("method {} not allowed; use POST", request.method),
            );
        }

        let content_type = request
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !is_json(content_type) {
            return Answer::error(
                Outcome::UnsupportedMediaType,
                format!(
                    "content type {:?} not supported; send application/json",
                    String::from_utf8_lossy(content_type)
                ),
            );
        }

        let declared = request
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.limits.max_body as u64) {
            return too_large(self.limits.max_body);
        }
        let expects_continue = request
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue && session.write_continue_response().await.is_err() {
            return Answer::error(Outcome::RequestTimeout, "client went away");
        }

        let body = match tokio::time::timeout(
            self.limits.read_timeout,
            read_body(session, self.limits.max_body),
        )
        .await
        {
            Err(_) => {
                return Answer::error(
                    Outcome::RequestTimeout,
                    format!("body not received within {:?}", self.limits.read_timeout),
                )
            }
            Ok(Err(answer)) => return answer,
            Ok(Ok(body)) => body,
        };

        let valid = match payload::validate(&body, self.drift_policy, &action.events) {
            Err(PayloadError::NotJson(why)) => {
                return Answer::error(Outcome::InvalidJson, format!("body is not JSON: {why}"))
            }
            Err(PayloadError::Invalid(why)) => return Answer::error(Outcome::InvalidPayload, why),
            Ok(Verdict::Unwanted { event_id, .. }) => {
                seen.event_id = Some(event_id.to_string());
                return Answer::success(Outcome::Ignored, &event_id);
            }
            Ok(Verdict::Valid(valid)) => valid,
        };
        for (field, value) in &valid.drift {
            self.schema_drift(*field, value);
        }
        let event_id = valid.event_id.into_owned();
        seen.event_id = Some(event_id.clone());
        let check = action
            .guard
            .as_ref()
            .map(|g| guard::check(g, &valid.incident_id, valid.person));

        let event = NewEvent {
            action: route.name.clone(),
            event_id: event_id.clone(),
            body: body.clone(),
            upstreams: route.upstreams.clone(),
        };
        let appended = match check {
            Some(check) => self.store.append_guarded(event, check).await,
            None => self.store.append(event).await,
        };
        match appended {
            Ok(Appended::Accepted(_)) => Answer::success(Outcome::Accepted, &event_id),
            Ok(Appended::Duplicate) => Answer::success(Outcome::Duplicate, &event_id),
            Ok(Appended::Guarded(guarded)) => {
                let message = guard::message(&action.name, guarded, now_ms());
                if let Some(plan) = &route.refusal_report {
                    self.report_refusal(route, plan, &event_id, &body, &message)
                        .await;
                }
                Answer::error(Outcome::Guarded, message)
            }
            Err(e) => {
                log::error!(
                    "action={} event_id={event_id}: cannot store: {e}",
                    route.name
                );
                Answer::error(
                    Outcome::Unavailable,
                    "cannot store the event right now; retry",
                )
            }
        }
    }

    /// Stores the report of a guard refusal before the refusal is answered, so that a crash
    /// in between leaves Flashduty a failed push to send again rather than a refusal nobody
    /// hears of. The refusal is answered whatever becomes of its report.
    async fn report_refusal(
        &self,
        route: &Route,
        plan: &report::Plan,
        event_id: &str,
        body: &[u8],
        message: &str,
    ) {
        let facts = Facts {
            action: &route.name,
            upstream: "",
            outcome: ReportOutcome::Guarded,
            attempts: 0,
            status: None,
            error: Some(message),
            response: "",
            lag: std::time::Duration::ZERO,
        };
        let Some(report) = plan.event(event_id, body, &facts) else {
            log::warn!(
                action = route.name.as_ref(),
                event_id = event_id;
                "guard refusal {}", report::NO_INCIDENT
            );
            return;
        };
        if let Err(e) = self.store.append_refusal_report(report).await {
            log::error!(
                action = route.name.as_ref(),
                event_id = event_id;
                "cannot store the report of a guard refusal: {e}"
            );
        }
    }

    fn schema_drift(&self, field: usize, value: &str) {
        if let Some(name) = DRIFT_FIELDS.get(field) {
            self.metrics.schema_drift(name);
        }
        let Ok(mut logged) = self.drift_logged.lock() else {
            return;
        };
        if logged.len() < DRIFT_LOG_LIMIT && logged.insert((field, value.to_string())) {
            log::warn!(
                "schema drift: {} has the undocumented value {value:?} (accepted; counted in actiongate_schema_drift_total)",
                DRIFT_FIELDS.get(field).copied().unwrap_or("?")
            );
        }
    }
}

fn too_large(limit: usize) -> Answer {
    Answer::error(
        Outcome::PayloadTooLarge,
        format!("body is larger than the limit of {limit} bytes"),
    )
}

/// `application/json`, any case, parameters allowed.
fn is_json(content_type: &[u8]) -> bool {
    let essence = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    essence.eq_ignore_ascii_case(b"application/json")
}

/// Reads the whole body, stopping as soon as it passes `limit`.
async fn read_body(session: &mut ServerSession, limit: usize) -> Result<Bytes, Answer> {
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut size = 0usize;
    loop {
        let chunk = session.read_request_body().await.map_err(|e| {
            Answer::error(Outcome::RequestTimeout, format!("body not received: {e}"))
        })?;
        let Some(chunk) = chunk else { break };
        size += chunk.len();
        if size > limit {
            return Err(too_large(limit));
        }
        // The common case is one chunk: keep it without copying.
        match (&mut first, &mut rest) {
            (None, _) => first = Some(chunk),
            (Some(head), None) => {
                let mut buf = BytesMut::with_capacity(size.max(head.len() * 2));
                buf.extend_from_slice(head);
                buf.extend_from_slice(&chunk);
                rest = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&chunk),
        }
    }
    Ok(match (first, rest) {
        (_, Some(buf)) => buf.freeze(),
        (Some(head), None) => head,
        (None, None) => Bytes::new(),
    })
}

/// Writes `answer` to the client.
async fn respond(session: &mut ServerSession, answer: &Answer) -> pingora_core::Result<()> {
    let (header, body) = answer.to_response()?;
    session.write_response_header(Box::new(header)).await?;
    session.write_response_body(body, true).await
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_content_types() {
        assert!(is_json(b"application/json"));
        assert!(is_json(b"Application/JSON; charset=utf-8"));
        assert!(is_json(b" application/json ;x=y"));
        assert!(!is_json(b"text/plain"));
        assert!(!is_json(b"application/jsonx"));
        assert!(!is_json(b""));
    }
}
