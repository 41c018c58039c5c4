//! Reports: an action's outcome written back onto its incident as a comment through
//! Flashduty's Open API (`POST {api}/incident/comment`), so that the responder who pressed the
//! button learns whether the restart or rollback worked.
//!
//! A report is an event of its own for upstream `flashduty`, stored in the same write as the
//! outcome it tells of (see [`crate::spool::Spool::finish_reported`]), then delivered like any
//! other: retries, backoff, dead letters, metrics. What differs is here: the comment, the
//! body Flashduty expects, its answer's envelope, and one pace for the whole process.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::path::FieldPath;
use super::projection::Projection;
use super::retry::AttemptOutcome;
use super::template::{TextTemplate, ValueMapping};
use crate::config::units::format_duration;
use crate::config::{Report, ReportOutcome, REPORT_UPSTREAM};
use crate::ingress::event_type::EventKind;
use crate::store::NewEvent;

/// Flashduty refuses longer comments.
pub const MAX_COMMENT_CHARS: usize = 1024;
/// How much of the upstream's answer `actiongate.response` holds.
pub const RESPONSE_BYTES: usize = 512;
/// Flashduty's error codes worth another try; every other one is permanent.
const RETRYABLE_CODES: [&str; 2] = ["RequestTooFrequently", "InternalError"];

/// What happened, as a comment tells it: the `actiongate.*` values.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub action: &'a str,
    /// The upstream the outcome is of (empty for a guard refusal, which has none).
    pub upstream: &'a str,
    pub outcome: ReportOutcome,
    pub attempts: u32,
    pub status: Option<u16>,
    pub error: Option<&'a str>,
    /// The start of the upstream's answer, as text.
    pub response: &'a str,
    /// From the push's acceptance (or refusal) to the outcome.
    pub lag: Duration,
}

impl Facts<'_> {
    /// The `actiongate` object a comment template reads.
    fn value(&self) -> Value {
        json!({
            "action": self.action,
            "upstream": self.upstream,
            "outcome": self.outcome.label(),
            "attempts": self.attempts,
            "status": self.status.map_or(Value::from(""), Value::from),
            "error": self.error.unwrap_or_default(),
            "response": self.response,
            "lag": format_duration(self.lag),
        })
    }
}

/// An action's `report`, ready to turn outcomes into report events.
#[derive(Debug, Clone)]
pub struct Plan {
    pub report: Report,
    /// What the comment reads of a payload, the incident id included.
    projection: Projection,
}

impl Plan {
    pub fn new(report: &Report) -> Plan {
        let incident = incident_paths();
        let mut paths: Vec<&FieldPath> = incident.iter().collect();
        if let Some(comment) = &report.comment {
            paths.extend(comment.paths());
        }
        Plan {
            report: report.clone(),
            projection: Projection::new(paths),
        }
    }

    pub fn wants(&self, outcome: ReportOutcome) -> bool {
        self.report.wants(outcome)
    }

    /// The report of `facts` about the push `raw` (event `event_id`): an event for upstream
    /// `flashduty` whose body is the Open API call. `None` when the payload names no incident
    /// Flashduty can comment on (validated payloads have an incident_id, but a sender other
    /// than Flashduty may use ids of its own).
    pub fn event(&self, event_id: &str, raw: &[u8], facts: &Facts) -> Option<NewEvent> {
        let payload = self.projection.parse(raw).ok()?;
        let incident = incident_id(&payload)?;
        let comment = comment(self.report.comment.as_ref(), &payload, facts);
        Some(NewEvent {
            action: Arc::from(facts.action),
            event_id: event_id.to_string(),
            body: request_body(incident, &comment),
            upstreams: vec![Arc::from(REPORT_UPSTREAM)],
        })
    }
}

/// Where a payload names its incident: `event_type`, then the incident of an incident event
/// and that of an alert event (once the alert belongs to one).
fn incident_paths() -> [FieldPath; 3] {
    // Constant paths: they parse.
    [
        "event_type",
        "incident.incident_id",
        "alert.incident.incident_id",
    ]
    .map(|path| FieldPath::parse(path).unwrap_or_else(|_| unreachable!()))
}

/// The incident a payload (as projected) is about, when it is one Flashduty can comment on.
pub fn incident_id(payload: &Value) -> Option<&str> {
    let [event_type, incident, alert] = incident_paths();
    let is_alert = event_type
        .resolve(payload)
        .and_then(Value::as_str)
        .and_then(EventKind::of)
        == Some(EventKind::Alert);
    let path = if is_alert { alert } else { incident };
    path.resolve(payload)
        .and_then(Value::as_str)
        .filter(|id| is_incident_id(id))
}

/// Why a report was not written, for the log: the payload names no incident to comment on.
pub const NO_INCIDENT: &str = "not reported: the payload names no Flashduty incident (24 hex \
     characters at incident.incident_id, or alert.incident.incident_id for an alert)";

/// Flashduty's incident ids are 24 hexadecimal characters (an ObjectID).
pub fn is_incident_id(text: &str) -> bool {
    text.len() == 24 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The comment for `facts`: the action's template against the payload and the facts, or the
/// built-in sentence; cut to what Flashduty takes.
pub fn comment(template: Option<&TextTemplate>, payload: &Value, facts: &Facts) -> String {
    let text = match template {
        Some(template) => {
            let mut values = match payload {
                Value::Object(map) => map.clone(),
                _ => Map::new(),
            };
            values.insert("actiongate".into(), facts.value());
            let text = template.render_to_string(&Value::Object(values), &ValueMapping::default());
            // Values empty for this outcome (`error` of a delivery) leave no dangling space.
            text.trim().to_string()
        }
        None => default_comment(facts),
    };
    cut(text)
}

/// One sentence that says all of it.
fn default_comment(f: &Facts) -> String {
    let attempts = match f.attempts {
        1 => "1 attempt".to_string(),
        n => format!("{n} attempts"),
    };
    let lag = format_duration(f.lag);
    let response = f.response.trim();
    match f.outcome {
        ReportOutcome::Delivered => {
            let status = f
                .status
                .map_or_else(String::new, |s| format!(" (HTTP {s})"));
            let mut text = format!(
                "actiongate: {} was delivered to {}{status} after {attempts}, {lag} after the push",
                f.action, f.upstream
            );
            if !response.is_empty() {
                text.push_str(&format!("; it answered: {response}"));
            }
            text
        }
        ReportOutcome::DeadLettered => {
            let error = f.error.unwrap_or("no answer");
            let mut text = format!(
                "actiongate: {} FAILED at {} after {attempts}, {lag} after the push ({error}); \
                 it is kept as a dead letter in actiongate, from where an operator can replay it",
                f.action, f.upstream
            );
            if !response.is_empty() && !error.contains(response) {
                text.push_str(&format!("; it answered: {response}"));
            }
            text
        }
        ReportOutcome::Guarded => format!(
            "actiongate: {} was not run: {}",
            f.action,
            f.error.unwrap_or("a guard refused it")
        ),
    }
}

/// At most [`MAX_COMMENT_CHARS`] characters, with an ellipsis where it was cut.
fn cut(text: String) -> String {
    if text.chars().count() <= MAX_COMMENT_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_COMMENT_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// The body of `POST /incident/comment`. `mute_reply`: the comment must not trigger webhooks
/// that could push back into the gateway.
pub fn request_body(incident_id: &str, comment: &str) -> Bytes {
    Bytes::from(
        json!({
            "incident_ids": [incident_id],
            "comment": comment,
            "mute_reply": true,
        })
        .to_string(),
    )
}

/// The text of the start of an answer, for `actiongate.response`.
pub fn response_text(head: &[u8]) -> String {
    let head = &head[..head.len().min(RESPONSE_BYTES)];
    String::from_utf8_lossy(head).trim().to_string()
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    error: Option<EnvelopeError>,
}

#[derive(Deserialize)]
struct EnvelopeError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// How an Open API call ended: an HTTP 200 whose envelope carries `error.code` failed, and is
/// retried only for the codes worth it. The request id goes into the description, which is
/// what the log line and the dead letter keep.
pub fn judge(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    header_request_id: Option<&str>,
) -> (AttemptOutcome, String) {
    let envelope: Option<Envelope> = serde_json::from_slice(body).ok();
    let request_id = header_request_id
        .map(str::to_string)
        .or_else(|| envelope.as_ref().and_then(|e| e.request_id.clone()))
        .filter(|id| !id.is_empty());
    let request = request_id.map_or_else(String::new, |id| format!(" (request {id})"));
    let error = envelope
        .and_then(|e| e.error)
        .filter(|e| !e.code.is_empty());
    match error {
        Some(error) => {
            let retryable = RETRYABLE_CODES.contains(&error.code.as_str());
            let outcome = AttemptOutcome::Declined {
                status,
                retryable,
                retry_after,
            };
            let message: String = error.message.chars().take(200).collect();
            (
                outcome,
                format!(
                    "HTTP {status}, Flashduty {}: {message}{request}",
                    error.code
                ),
            )
        }
        None => {
            let outcome = AttemptOutcome::Status {
                status,
                retry_after,
            };
            let description = if (200..300).contains(&status) {
                format!("HTTP {status}{request}")
            } else {
                let text = response_text(&body[..body.len().min(200)]);
                format!("HTTP {status}: {text}{request}")
            };
            (outcome, description)
        }
    }
}

/// Flashduty's other limit on the incident endpoints: calls in any minute, per account.
pub const CALLS_PER_MINUTE: usize = 1000;
const MINUTE_WITH_MARGIN: Duration = Duration::from_secs(61);

/// One pace for every Open API call of the process: calls spaced evenly at `rate` a second, so
/// no second ever holds more than `rate` of them, and never more than [`CALLS_PER_MINUTE`] in
/// any minute (at the default 20 a second a backlog would reach 1,200). Flashduty counts per
/// account, whichever process calls. Reports need no burst: they trail their outcomes anyway.
pub struct Pace {
    state: std::sync::Mutex<PaceState>,
}

struct PaceState {
    rate: u32,
    /// When the next call may go by the rate.
    next: Instant,
    /// The turns given in the last minute (at most [`CALLS_PER_MINUTE`]), oldest first.
    minute: std::collections::VecDeque<Instant>,
}

impl Pace {
    pub fn new(rate: u32) -> Pace {
        Pace {
            state: std::sync::Mutex::new(PaceState {
                rate: rate.max(1),
                next: Instant::now(),
                minute: std::collections::VecDeque::with_capacity(CALLS_PER_MINUTE),
            }),
        }
    }

    /// Takes a new rate (a reload) from the next call on.
    pub fn set_rate(&self, rate: u32) {
        if let Ok(mut state) = self.state.lock() {
            state.rate = rate.max(1);
        }
    }

    /// Waits for this call's turn.
    pub async fn wait(&self) {
        let turn = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            let mut turn = state.next.max(Instant::now());
            if state.minute.len() >= CALLS_PER_MINUTE {
                // Turns are handed out in order: the oldest of the last 1,000 must be a
                // minute old (and a second more, for a call held up between its turn and
                // Flashduty) before another may go.
                if let Some(oldest) = state.minute.pop_front() {
                    turn = turn.max(oldest + MINUTE_WITH_MARGIN);
                }
            }
            state.minute.push_back(turn);
            state.next = turn + Duration::from_secs(1) / state.rate;
            turn
        };
        tokio::time::sleep_until(turn).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(comment: Option<&str>) -> Option<TextTemplate> {
        comment.map(|c| TextTemplate::parse_text(c).unwrap())
    }

    fn facts(outcome: ReportOutcome) -> Facts<'static> {
        Facts {
            action: "restart-host",
            upstream: "host-agent",
            outcome,
            attempts: 3,
            status: Some(503),
            error: Some("HTTP 503: busy (after 3 attempts)"),
            response: "busy",
            lag: Duration::from_millis(12_400),
        }
    }

    #[test]
    fn templates_read_the_payload_and_the_outcome() {
        let payload =
            json!({"incident": {"incident_id": "0123456789abcdef01234567", "title": "disk"}});
        let text = comment(
            report(Some(
                "{{incident.title}}: {{actiongate.upstream}} {{actiongate.outcome}} after \
                 {{actiongate.attempts}}, HTTP {{actiongate.status}} in {{actiongate.lag}}",
            ))
            .as_ref(),
            &payload,
            &facts(ReportOutcome::DeadLettered),
        );
        assert_eq!(
            text,
            "disk: host-agent dead_lettered after 3, HTTP 503 in 12.4s"
        );
        let mut quiet = facts(ReportOutcome::Delivered);
        quiet.status = None;
        let text = comment(
            report(Some("[{{actiongate.status}}]")).as_ref(),
            &payload,
            &quiet,
        );
        assert_eq!(text, "[]");
    }

    #[test]
    fn the_default_comment_says_it_all_in_one_sentence() {
        let payload = json!({});
        let dead = comment(None, &payload, &facts(ReportOutcome::DeadLettered));
        assert_eq!(
            dead,
            "actiongate: restart-host FAILED at host-agent after 3 attempts, 12.4s after the \
             push (HTTP 503: busy (after 3 attempts)); it is kept as a dead letter in \
             actiongate, from where an operator can replay it"
        );
        let mut ok = facts(ReportOutcome::Delivered);
        ok.status = Some(200);
        ok.attempts = 1;
        ok.response = "restarted web-3";
        assert_eq!(
            comment(None, &payload, &ok),
            "actiongate: restart-host was delivered to host-agent (HTTP 200) after 1 attempt, \
             12.4s after the push; it answered: restarted web-3"
        );
    }

    #[test]
    fn comments_are_cut_to_what_flashduty_takes() {
        let mut long = facts(ReportOutcome::Delivered);
        let answer = "é".repeat(3000);
        long.response = &answer;
        let text = comment(
            report(Some("{{actiongate.response}}")).as_ref(),
            &json!({}),
            &long,
        );
        assert_eq!(text.chars().count(), MAX_COMMENT_CHARS);
        assert!(text.ends_with('…'));
    }

    #[test]
    fn incident_ids_are_24_hex_characters() {
        assert!(is_incident_id("0123456789abcdefABCDEF01"));
        assert!(!is_incident_id("0123456789abcdef0123456"));
        assert!(!is_incident_id("0123456789abcdef0123456g"));
        let payload = json!({"incident": {"incident_id": "inc-1"}});
        assert_eq!(incident_id(&payload), None);
    }

    #[test]
    fn the_envelope_decides_not_the_status_alone() {
        let (outcome, text) = judge(200, None, br#"{"request_id":"r1","data":null}"#, None);
        assert_eq!(
            outcome,
            AttemptOutcome::Status {
                status: 200,
                retry_after: None
            }
        );
        assert_eq!(text, "HTTP 200 (request r1)");
        let body = br#"{"request_id":"r2","error":{"code":"InvalidParameter","message":"bad id"}}"#;
        let (outcome, text) = judge(200, None, body, Some("h2"));
        assert_eq!(
            outcome,
            AttemptOutcome::Declined {
                status: 200,
                retryable: false,
                retry_after: None
            }
        );
        assert_eq!(
            text,
            "HTTP 200, Flashduty InvalidParameter: bad id (request h2)"
        );
        for code in RETRYABLE_CODES {
            let body = format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#);
            let (outcome, _) = judge(200, None, body.as_bytes(), None);
            assert_eq!(
                outcome,
                AttemptOutcome::Declined {
                    status: 200,
                    retryable: true,
                    retry_after: None
                },
                "{code}"
            );
        }
        let (outcome, text) = judge(502, None, b"<html>bad gateway</html>", None);
        assert!(matches!(
            outcome,
            AttemptOutcome::Status { status: 502, .. }
        ));
        assert_eq!(text, "HTTP 502: <html>bad gateway</html>");
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_spaces_calls_evenly_at_the_rate() {
        let pace = Pace::new(10);
        let start = Instant::now();
        let mut at = Vec::new();
        for _ in 0..21 {
            pace.wait().await;
            at.push(start.elapsed());
        }
        assert_eq!(at[0], Duration::ZERO, "the first call goes at once");
        assert_eq!(at[10], Duration::from_secs(1));
        assert_eq!(at[20], Duration::from_secs(2));
        pace.set_rate(50);
        pace.wait().await;
        pace.wait().await;
        assert_eq!(start.elapsed(), Duration::from_millis(2120));
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_keeps_to_a_thousand_calls_a_minute_too() {
        let pace = Pace::new(50);
        let start = Instant::now();
        for _ in 0..CALLS_PER_MINUTE {
            pace.wait().await;
        }
        // 1,000 calls at 50 a second take 20 s; the next waits for the first to be a minute
        // (and a second) old.
        assert_eq!(start.elapsed(), Duration::from_millis(19_980));
        pace.wait().await;
        assert_eq!(start.elapsed(), Duration::from_secs(61));
        pace.wait().await;
        assert_eq!(start.elapsed(), Duration::from_millis(61_020));
    }
}
