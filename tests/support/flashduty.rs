//! A loopback stand-in for Flashduty's Open API (`POST /incident/comment`): real HTTP, checking
//! what Flashduty checks (app_key, JSON, 1–100 ids of 24 hex characters, comments of at most
//! 1,024 characters, 50 calls a second) and answering with Flashduty's envelope. It records the
//! comments it took and the refusals it gave, and can be told to fail the next calls with a
//! 200 that carries an error code, as Flashduty sometimes does.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::upstream::{Received, Reply, Upstream};

/// Flashduty's per-account limit on the incident endpoints.
pub const CALLS_PER_SECOND: usize = 50;

/// A comment the stand-in accepted.
#[derive(Debug, Clone)]
pub struct Comment {
    pub incident_ids: Vec<String>,
    pub comment: String,
    pub mute_reply: bool,
    pub at: Instant,
}

/// A failure to give instead of success (to a call that passed every check).
#[derive(Debug, Clone, Copy)]
pub enum Fail {
    /// HTTP 200 with `error.code` set.
    Code(&'static str),
}

#[derive(Default)]
struct State {
    calls: VecDeque<Instant>,
    fail_next: VecDeque<Fail>,
    comments: Vec<Comment>,
    /// Error codes answered, in order.
    refused: Vec<String>,
    served: usize,
}

pub struct OpenApi {
    pub upstream: Upstream,
    pub app_key: String,
    state: Arc<Mutex<State>>,
}

impl OpenApi {
    pub async fn start(app_key: &str) -> OpenApi {
        OpenApi::serve(app_key, None).await
    }

    /// Like `start`, on a given address (to bring it back where it was).
    pub async fn start_on(app_key: &str, addr: std::net::SocketAddr) -> OpenApi {
        OpenApi::serve(app_key, Some(addr)).await
    }

    async fn serve(app_key: &str, addr: Option<std::net::SocketAddr>) -> OpenApi {
        let state = Arc::new(Mutex::new(State::default()));
        let (s, key) = (state.clone(), app_key.to_string());
        let script = move |_: usize, request: &Received| answer(&s, &key, request);
        let upstream = match addr {
            Some(addr) => Upstream::start_on(addr, script).await,
            None => Upstream::start(script).await,
        };
        OpenApi {
            upstream,
            app_key: app_key.to_string(),
            state,
        }
    }

    /// The `flashduty.api` to configure.
    pub fn api(&self) -> String {
        self.upstream.url("")
    }

    /// Fails the next calls that pass every check, in this order.
    pub fn fail_next(&self, fails: &[Fail]) {
        self.lock().fail_next.extend(fails.iter().copied());
    }

    pub fn comments(&self) -> Vec<Comment> {
        self.lock().comments.clone()
    }

    /// The error codes answered so far, in order.
    pub fn refused(&self) -> Vec<String> {
        self.lock().refused.clone()
    }

    /// Every call received, accepted or not.
    pub fn calls(&self) -> usize {
        self.lock().served
    }

    /// Waits until `n` comments were accepted (panics after `limit`).
    pub async fn wait_comments(&self, n: usize, limit: Duration) -> Vec<Comment> {
        super::eventually(&format!("{n} comments"), limit, || {
            let comments = self.comments();
            (comments.len() >= n).then_some(comments)
        })
        .await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("lock")
    }
}

fn envelope(status: u16, code: &str, message: &str, request_id: &str) -> Reply {
    let body = json!({"request_id": request_id, "error": {"code": code, "message": message}});
    Reply::Full(
        status,
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("Flashcat-Request-Id".into(), request_id.into()),
        ],
        body.to_string(),
    )
}

fn answer(state: &Mutex<State>, app_key: &str, request: &Received) -> Reply {
    let mut state = state.lock().expect("lock");
    state.served += 1;
    let request_id = format!("req-{}", state.served);
    let refuse = |state: &mut State, status: u16, code: &str, message: &str| {
        state.refused.push(code.to_string());
        envelope(status, code, message, &request_id)
    };
    let (path, query) = request
        .path
        .split_once('?')
        .unwrap_or((request.path.as_str(), ""));
    if request.method != "POST" {
        return refuse(&mut state, 400, "MethodNotAllowed", "POST only");
    }
    if path != "/incident/comment" {
        return refuse(&mut state, 404, "RouteNotFound", path);
    }
    let key = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "app_key")
        .map(|(_, v)| v.into_owned());
    if key.as_deref() != Some(app_key) {
        return refuse(
            &mut state,
            401,
            "Unauthorized",
            "app_key is missing or wrong",
        );
    }
    let json_type = request
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json"));
    if !json_type {
        return refuse(
            &mut state,
            400,
            "InvalidContentType",
            "send application/json",
        );
    }
    let now = Instant::now();
    while state
        .calls
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        state.calls.pop_front();
    }
    if state.calls.len() >= CALLS_PER_SECOND {
        return refuse(&mut state, 429, "RequestTooFrequently", "50 calls a second");
    }
    state.calls.push_back(now);
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return refuse(&mut state, 400, "InvalidParameter", "body is not JSON");
    };
    let ids: Option<Vec<String>> = body["incident_ids"].as_array().and_then(|ids| {
        ids.iter()
            .map(|id| id.as_str().map(str::to_string))
            .collect()
    });
    let ids = match ids {
        Some(ids)
            if (1..=100).contains(&ids.len())
                && ids
                    .iter()
                    .all(|id| id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit())) =>
        {
            ids
        }
        _ => {
            return refuse(
                &mut state,
                400,
                "InvalidParameter",
                "incident_ids: 1 to 100 ids of 24 hex characters",
            )
        }
    };
    let Some(comment) = body["comment"].as_str() else {
        return refuse(&mut state, 400, "InvalidParameter", "comment is required");
    };
    if comment.chars().count() > 1024 {
        return refuse(&mut state, 400, "InvalidParameter", "comment is too long");
    }
    if let Some(Fail::Code(code)) = state.fail_next.pop_front() {
        return refuse(&mut state, 200, code, "injected");
    }
    state.comments.push(Comment {
        incident_ids: ids,
        comment: comment.to_string(),
        mute_reply: body["mute_reply"] == json!(true),
        at: now,
    });
    Reply::Full(
        200,
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("Flashcat-Request-Id".into(), request_id.clone()),
        ],
        json!({"request_id": request_id, "data": null}).to_string(),
    )
}
