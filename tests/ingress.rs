//! The request path against the real binary on loopback: every answer of the contract, the
//! check order, source addresses, payload fixtures, and durability of what was answered 200.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::client::{self, read_response, Request};
use support::gateway::Gateway;
use support::upstream::Upstream;
use support::{event_with_id, fixture};
use tokio::io::AsyncWriteExt;

const SECRET: &str = "t0p-s3cret";

fn config(upstream: &str) -> String {
    format!(
        r#"
server: {{threads: 2, grace_period: 5s}}
limits: {{max_body: 64KiB, read_timeout: 500ms}}
sources:
  local: ["127.0.0.1/32"]
  partner: ["127.0.0.2/32"]
trusted_proxies: ["127.0.0.4/32"]
actions:
  - name: restart
    path: /actions/restart
    allow: [local]
    secret: {{header: X-Actiongate-Secret, value: "${{SECRET}}"}}
    upstreams: [{{name: up, url: "{upstream}/restart"}}]
  - name: partner
    path: /actions/partner
    allow: [partner]
    upstreams: [{{name: up, url: "{upstream}/partner"}}]
"#
    )
}

async fn start(upstream: &Upstream) -> Gateway {
    Gateway::start_with_env(&config(&upstream.url("")), &[("SECRET", SECRET)]).await
}

fn post(path: &str, body: &[u8]) -> Request {
    Request::post_json(path, body).header("X-Actiongate-Secret", SECRET)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Asserts an error answer: status, JSON code, and a message containing `message`.
fn assert_error(response: &client::Response, status: u16, code: &str, message: &str) {
    let body = response.json();
    assert_eq!(response.status, status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    let text = body["message"].as_str().unwrap_or_default();
    assert!(text.contains(message), "message {text:?} lacks {message:?}");
    assert_eq!(response.header("content-type"), Some("application/json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_answers_the_contract_and_nothing_is_stored_or_delivered() {
    let upstream = Upstream::ok().await;
    let mut gateway = start(&upstream).await;
    let body = fixture("custom_action_full.json");
    let at = gateway.addr;
    let cases: Vec<Case> = vec![
        (
            "unknown path",
            post("/actions/nope", &body),
            None,
            404,
            "unknown_action",
            "no action at /actions/nope",
        ),
        // 127.0.0.2 is the partner action's source, not restart's. (A peer that no action
        // allows is closed at accept: see connections_from_sources_no_action_allows_…)
        (
            "source not allowed",
            post("/actions/restart", &body),
            Some("127.0.0.2"),
            403,
            "forbidden_source",
            "source 127.0.0.2 is not allowed for action restart",
        ),
        (
            "XFF from an untrusted peer is ignored",
            post("/actions/restart", &body).header("X-Forwarded-For", "127.0.0.1"),
            Some("127.0.0.2"),
            403,
            "forbidden_source",
            "source 127.0.0.2",
        ),
        (
            "leftmost XFF is never believed",
            post("/actions/restart", &body).header("X-Forwarded-For", "127.0.0.1, 127.0.0.3"),
            Some("127.0.0.4"),
            403,
            "forbidden_source",
            "source 127.0.0.3",
        ),
        (
            "address is checked before the secret",
            Request::post_json("/actions/restart", &body),
            Some("127.0.0.2"),
            403,
            "forbidden_source",
            "127.0.0.2",
        ),
        (
            "secret missing",
            Request::post_json("/actions/restart", &body),
            None,
            401,
            "unauthorized",
            "header x-actiongate-secret is missing or wrong",
        ),
        (
            "secret wrong",
            Request::post_json("/actions/restart", &body)
                .header("X-Actiongate-Secret", "t0p-s3cre"),
            None,
            401,
            "unauthorized",
            "missing or wrong",
        ),
        (
            "secret is checked before the method",
            Request::post_json("/actions/restart", &body).method("GET"),
            None,
            401,
            "unauthorized",
            "x-actiongate-secret",
        ),
        (
            "not POST",
            post("/actions/restart", b"").method("PUT"),
            None,
            405,
            "method_not_allowed",
            "method PUT not allowed; use POST",
        ),
        (
            "not JSON content type",
            post("/actions/restart", &body)
                .without_header("Content-Type")
                .header("Content-Type", "text/plain"),
            None,
            415,
            "unsupported_media_type",
            "\"text/plain\"",
        ),
        (
            "no content type",
            post("/actions/restart", &body).without_header("Content-Type"),
            None,
            415,
            "unsupported_media_type",
            "send application/json",
        ),
        (
            "declared too large",
            post("/actions/restart", &vec![b' '; 70_000]),
            None,
            413,
            "payload_too_large",
            "limit of 65536 bytes",
        ),
        (
            "chunked and too large",
            chunked(post("/actions/restart", &vec![b' '; 70_000])),
            None,
            413,
            "payload_too_large",
            "limit of 65536 bytes",
        ),
        (
            "body not JSON",
            post("/actions/restart", &fixture("invalid/truncated.json")),
            None,
            400,
            "invalid_json",
            "body is not JSON: EOF while parsing",
        ),
        (
            "body empty",
            post("/actions/restart", b""),
            None,
            400,
            "invalid_json",
            "body is not JSON",
        ),
    ];
    for (what, request, from, status, code, message) in cases {
        let response = request.send_from(at, from.map(ip)).await;
        assert_error(&response, status, code, message);
        if status == 405 {
            assert_eq!(response.header("allow"), Some("POST"), "{what}");
        }
    }
    let invalid = [
        ("empty_event_id", "event_id: required, a non-empty string"),
        (
            "event_time_is_string",
            "event_time: expected an integer, got a string",
        ),
        (
            "incident_id_missing",
            "incident.incident_id: required field is missing",
        ),
        (
            "incident_is_array",
            "incident: expected an object, got an array",
        ),
        (
            "labels_value_not_string",
            "incident.labels.replicas: expected a string, got a number",
        ),
        ("missing_event_id", "event_id: required"),
        ("missing_incident", "incident: required field is missing"),
        ("not_an_object", "payload: expected an object, got an array"),
        (
            "event_type_not_flashduty",
            "event_type: expected a Flashduty event type (i_… for an incident, a_… for an \
             alert), got \"incident.created\"",
        ),
    ];
    for (name, message) in invalid {
        let response = post(
            "/actions/restart",
            &fixture(&format!("invalid/{name}.json")),
        )
        .send(at)
        .await;
        assert_error(&response, 400, "invalid_payload", message);
    }

    let metric = |outcome: &str| {
        format!("actiongate_requests_total{{action=\"restart\",outcome=\"{outcome}\"}}")
    };
    assert_eq!(gateway.metric(&metric("forbidden_source")).await, 4.0);
    assert_eq!(gateway.metric(&metric("unauthorized")).await, 3.0);
    assert_eq!(gateway.metric(&metric("method_not_allowed")).await, 1.0);
    assert_eq!(gateway.metric(&metric("unsupported_media_type")).await, 2.0);
    assert_eq!(gateway.metric(&metric("payload_too_large")).await, 2.0);
    assert_eq!(gateway.metric(&metric("invalid_json")).await, 2.0);
    assert_eq!(gateway.metric(&metric("invalid_payload")).await, 9.0);
    assert_eq!(gateway.metric(&metric("accepted")).await, 0.0);
    // Of the four forbidden requests, three carried the right secret: a sign Flashduty moved.
    assert_eq!(
        gateway
            .metric("actiongate_forbidden_source_with_secret_total{action=\"restart\"}")
            .await,
        3.0
    );
    assert_eq!(
        gateway
            .metric("actiongate_requests_total{action=\"(none)\",outcome=\"unknown_action\"}")
            .await,
        1.0
    );
    // No series that can never move: a request with no action is only ever unknown, and an
    // action's request never is.
    let text = gateway.metrics().await;
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("actiongate_requests_total{"))
        .collect();
    assert!(
        requests
            .iter()
            .all(|l| l.contains("(none)") == l.contains("unknown_action")),
        "{requests:#?}"
    );
    // Two actions, the twelve outcomes each can have, and the one series without an action.
    assert_eq!(requests.len(), 2 * 12 + 1, "{requests:#?}");

    assert!(gateway.stop_with("-TERM").await.success());
    assert_eq!(
        gateway.stored(),
        Default::default(),
        "a rejected request is never stored"
    );
    assert!(
        upstream.received().is_empty(),
        "a rejected request is never delivered"
    );
}

/// One rejection: what it shows, the request, its source address, status, code, message.
type Case = (
    &'static str,
    Request,
    Option<&'static str>,
    u16,
    &'static str,
    &'static str,
);

fn chunked(mut request: Request) -> Request {
    let mut body = format!("{:x}\r\n", request.body.len()).into_bytes();
    body.extend_from_slice(&request.body);
    body.extend_from_slice(b"\r\n0\r\n\r\n");
    request.body = body;
    request.header("Transfer-Encoding", "chunked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_is_a_408_and_is_not_stored() {
    let upstream = Upstream::ok().await;
    let mut gateway = start(&upstream).await;
    let request = post("/actions/restart", &fixture("custom_action_full.json"));
    let mut stream = client::connect(gateway.addr, None).await;
    stream.write_all(&request.head(gateway.addr)).await.unwrap();
    stream.write_all(&request.body[..100]).await.unwrap();
    let response = read_response(&mut stream).await.unwrap();
    assert_error(
        &response,
        408,
        "request_timeout",
        "body not received within 500ms",
    );
    assert_eq!(
        gateway
            .metric("actiongate_requests_total{action=\"restart\",outcome=\"request_timeout\"}")
            .await,
        1.0
    );
    assert!(gateway.stop_with("-TERM").await.success());
    assert_eq!(gateway.stored(), Default::default());
    assert!(upstream.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_valid_fixture_is_accepted_and_forwarded_byte_for_byte() {
    let upstream = Upstream::ok().await;
    let gateway = start(&upstream).await;
    let fixtures = [
        (
            "custom_action_full.json",
            "3f9c2b7a51e04d8c9a6b0e1f2d3c4b5a",
        ),
        (
            "custom_action_manual.json",
            "c0ffee00c0ffee00c0ffee00c0ffee01",
        ),
        (
            "custom_action_legacy_event_id.json",
            "a1b2c3d4e5f60718293a4b5c6d7e8f90",
        ),
        (
            "custom_action_unknown_fields.json",
            "0badf00d0badf00d0badf00d0badf00d",
        ),
    ];
    for (name, event_id) in fixtures {
        let response = post("/actions/restart", &fixture(name))
            .send(gateway.addr)
            .await;
        assert_eq!(response.status, 200, "{name}: {}", response.json());
        assert_eq!(
            response.json(),
            serde_json::json!({"status": "accepted", "event_id": event_id})
        );
    }
    let received = upstream.wait_for(4, Duration::from_secs(10)).await;
    for (name, event_id) in fixtures {
        let got = received
            .iter()
            .find(|r| r.header("x-actiongate-event-id") == Some(event_id))
            .unwrap_or_else(|| panic!("{name} not delivered"));
        assert_eq!(
            got.body,
            fixture(name),
            "{name}: unknown fields and formatting are kept"
        );
        assert_eq!(got.method, "POST");
        assert_eq!(got.path, "/restart");
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert_eq!(got.header("x-actiongate-action"), Some("restart"));
        assert_eq!(got.header("x-actiongate-attempt"), Some("1"));
        assert_eq!(
            got.header("idempotency-key"),
            Some(format!("{event_id}:up").as_str())
        );
    }
    assert_eq!(
        gateway
            .metric("actiongate_schema_drift_total{field=\"incident.progress\"}")
            .await,
        1.0,
        "the unknown progress value is counted as drift"
    );
    assert_eq!(
        gateway
            .metric("actiongate_schema_drift_total{field=\"incident.incident_status\"}")
            .await,
        0.0
    );
    assert!(gateway
        .logs()
        .contains("schema drift: incident.progress has the undocumented value \"Mitigated\""));
}

/// Incident and alert webhooks to actions that take them (`events:`), and to one that does not.
fn webhooks_config(up: &str) -> String {
    format!(
        r#"
server: {{threads: 2}}
actions:
  - name: tickets
    path: /hooks/incident
    allow: ["127.0.0.1/32"]
    events: [i_new, i_rslv]
    upstreams:
      - name: open
        url: "{up}/open"
        when: {{event_type: i_new}}
        body: '{{"summary": "{{{{incident.title}}}}", "severity": "{{{{incident.incident_severity}}}}"}}'
      - name: close
        url: "{up}/close"
        when: {{event_type: i_rslv}}
  - name: enrich
    path: /hooks/alert
    allow: ["127.0.0.1/32"]
    events: [a_*]
    upstreams:
      - name: enricher
        url: "{up}/enrich?host={{{{alert.labels.resource}}}}"
        body: '{{"type": "{{{{event_type}}}}", "incident": "{{{{alert.incident.incident_id}}}}"}}'
  - name: restart
    path: /actions/restart
    allow: ["127.0.0.1/32"]
    upstreams: [{{name: up, url: "{up}/restart"}}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_and_alert_webhooks_reach_the_actions_that_take_them_and_others_are_ignored() {
    let upstream = Upstream::ok().await;
    let mut gateway = Gateway::start(&webhooks_config(&upstream.url(""))).await;
    let later_type = String::from_utf8(fixture("alert_new.json"))
        .unwrap()
        .replace("\"a_new\"", "\"a_escalate\"")
        .replace("9b4c3d5e6f708192a3b4c5d6e7f8091a", "later-type-1");
    let pushes: [(&str, Vec<u8>, &str, &str); 10] = [
        (
            "/hooks/incident",
            fixture("incident_new.json"),
            "accepted",
            "6e1f0a2b3c4d5e6f708192a3b4c5d6e7",
        ),
        (
            "/hooks/incident",
            fixture("incident_ack.json"),
            "ignored",
            "7f2a1b3c4d5e6f708192a3b4c5d6e7f8",
        ),
        (
            "/hooks/incident",
            fixture("incident_resolved.json"),
            "accepted",
            "8a3b2c4d5e6f708192a3b4c5d6e7f809",
        ),
        (
            "/hooks/incident",
            fixture("alert_new.json"),
            "ignored",
            "9b4c3d5e6f708192a3b4c5d6e7f8091a",
        ),
        (
            "/hooks/incident",
            fixture("incident_new.json"),
            "duplicate",
            "6e1f0a2b3c4d5e6f708192a3b4c5d6e7",
        ),
        // Not stored, so a second push of an ignored event is ignored again, not a duplicate.
        (
            "/hooks/incident",
            fixture("incident_ack.json"),
            "ignored",
            "7f2a1b3c4d5e6f708192a3b4c5d6e7f8",
        ),
        (
            "/hooks/alert",
            fixture("alert_new.json"),
            "accepted",
            "9b4c3d5e6f708192a3b4c5d6e7f8091a",
        ),
        (
            "/hooks/alert",
            fixture("alert_closed.json"),
            "accepted",
            "ac5d4e6f708192a3b4c5d6e7f8091a2b",
        ),
        (
            "/hooks/alert",
            later_type.into_bytes(),
            "accepted",
            "later-type-1",
        ),
        // A custom action's path takes i_custom only, as before `events:` existed.
        (
            "/actions/restart",
            fixture("incident_new.json"),
            "ignored",
            "6e1f0a2b3c4d5e6f708192a3b4c5d6e7",
        ),
    ];
    for (path, body, status, event_id) in &pushes {
        let response = Request::post_json(path, body).send(gateway.addr).await;
        assert_eq!(
            response.status,
            200,
            "{path} {event_id}: {}",
            response.json()
        );
        assert_eq!(
            response.json(),
            serde_json::json!({"status": status, "event_id": event_id}),
            "{path}"
        );
    }
    let received = upstream.wait_for(5, Duration::from_secs(10)).await;
    let at = |path: &str| -> Vec<serde_json::Value> {
        received
            .iter()
            .filter(|r| r.path.starts_with(path))
            .map(|r| r.json())
            .collect()
    };
    assert_eq!(
        at("/open"),
        [
            serde_json::json!({"summary": "sh-prod / web-03 - memory usage above 95%", "severity": "Critical"})
        ]
    );
    assert_eq!(at("/close").len(), 1);
    assert_eq!(at("/close")[0]["event_type"], "i_rslv");
    let mut enriched = at("/enrich");
    enriched.sort_by_key(|v| v["type"].to_string());
    // An alert that joined no incident yet leaves the path as written (Flashduty's rule).
    assert_eq!(
        enriched,
        [
            serde_json::json!({"type": "a_close", "incident": "692701aa3c5e8f0012ab77c1"}),
            serde_json::json!({"type": "a_escalate", "incident": "{{alert.incident.incident_id}}"}),
            serde_json::json!({"type": "a_new", "incident": "{{alert.incident.incident_id}}"}),
        ]
    );
    assert!(received
        .iter()
        .filter(|r| r.path.starts_with("/enrich"))
        .all(|r| r.path == "/enrich?host=web-03"));
    assert!(at("/restart").is_empty());

    let metric = |action: &str, outcome: &str| {
        format!("actiongate_requests_total{{action=\"{action}\",outcome=\"{outcome}\"}}")
    };
    assert_eq!(gateway.metric(&metric("tickets", "accepted")).await, 2.0);
    assert_eq!(gateway.metric(&metric("tickets", "ignored")).await, 3.0);
    assert_eq!(gateway.metric(&metric("tickets", "duplicate")).await, 1.0);
    assert_eq!(gateway.metric(&metric("enrich", "accepted")).await, 3.0);
    assert_eq!(gateway.metric(&metric("restart", "ignored")).await, 1.0);
    assert_eq!(
        gateway
            .metric("actiongate_schema_drift_total{field=\"event_type\"}")
            .await,
        1.0,
        "a_escalate is no type Flashduty documents: taken through a_*, and counted"
    );
    assert!(gateway
        .logs()
        .contains("schema drift: event_type has the undocumented value \"a_escalate\""));

    assert!(gateway.stop_with("-TERM").await.success());
    let stored = gateway.stored();
    assert_eq!(
        stored.dedup_keys, 5,
        "only the five taken events were stored, the ignored pushes never: {stored:?}"
    );
    assert_eq!(stored.pending, 0, "{stored:?}");
    assert_eq!(upstream.received().len(), 5, "nor delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_event_is_acked_but_not_delivered_again() {
    let upstream = Upstream::ok().await;
    let gateway = start(&upstream).await;
    let body = event_with_id("dup-1");
    let first = post("/actions/restart", &body).send(gateway.addr).await;
    assert_eq!(first.json()["status"], "accepted");
    upstream.wait_for(1, Duration::from_secs(10)).await;
    let second = post("/actions/restart", &body).send(gateway.addr).await;
    assert_eq!(second.status, 200);
    assert_eq!(
        second.json(),
        serde_json::json!({"status": "duplicate", "event_id": "dup-1"})
    );
    // The same event_id on another action is another event.
    let other = Request::post_json("/actions/partner", &body)
        .send_from(gateway.addr, Some(ip("127.0.0.2")))
        .await;
    assert_eq!(other.json()["status"], "accepted");
    // A later event through the same lane proves the duplicate was not queued behind it.
    post("/actions/restart", &event_with_id("dup-2"))
        .send(gateway.addr)
        .await;
    // Once the spool holds nothing pending, nothing more can arrive: count then, by event id
    // (deliveries run concurrently, so arrival order proves nothing).
    gateway
        .wait_metric(
            "actiongate_deliveries_total{action=\"restart\",outcome=\"delivered\",upstream=\"up\"}",
            2.0,
        )
        .await;
    gateway
        .wait_metric("actiongate_pending_deliveries{upstream=\"up\"}", 0.0)
        .await;
    let ids: Vec<(String, String)> = upstream
        .received()
        .iter()
        .map(|r| {
            (
                r.path.clone(),
                r.header("x-actiongate-event-id").unwrap_or("").to_string(),
            )
        })
        .collect();
    let count = |path: &str, id: &str| ids.iter().filter(|r| r.0 == path && r.1 == id).count();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(count("/restart", "dup-1"), 1, "{ids:?}");
    assert_eq!(count("/restart", "dup-2"), 1, "{ids:?}");
    assert_eq!(count("/partner", "dup-1"), 1, "{ids:?}");
    assert_eq!(
        gateway
            .metric("actiongate_requests_total{action=\"restart\",outcome=\"duplicate\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_are_matched_by_address_and_trusted_proxy_hops() {
    let upstream = Upstream::ok().await;
    let gateway = start(&upstream).await;
    let body = |id: &str| event_with_id(id);
    // The partner action allows only 127.0.0.2.
    let direct = Request::post_json("/actions/partner", &body("s1"))
        .send_from(gateway.addr, Some(ip("127.0.0.2")))
        .await;
    assert_eq!(direct.status, 200);
    let other = Request::post_json("/actions/partner", &body("s2"))
        .send_from(gateway.addr, Some(ip("127.0.0.1")))
        .await;
    assert_error(&other, 403, "forbidden_source", "source 127.0.0.1");
    // Through the trusted proxy 127.0.0.4, the rightmost untrusted hop is the client.
    let proxied = Request::post_json("/actions/partner", &body("s3"))
        .header("X-Forwarded-For", "203.0.113.7, 127.0.0.2")
        .send_from(gateway.addr, Some(ip("127.0.0.4")))
        .await;
    assert_eq!(proxied.status, 200, "{}", proxied.json());
    let two_headers = Request::post_json("/actions/partner", &body("s4"))
        .header("X-Forwarded-For", "127.0.0.2")
        .header("X-Forwarded-For", "127.0.0.4")
        .send_from(gateway.addr, Some(ip("127.0.0.4")))
        .await;
    assert_eq!(two_headers.status, 200, "several XFF headers are one list");
    // The proxy itself is not the partner.
    let proxy_alone = Request::post_json("/actions/partner", &body("s5"))
        .send_from(gateway.addr, Some(ip("127.0.0.4")))
        .await;
    assert_error(&proxy_alone, 403, "forbidden_source", "source 127.0.0.4");
    let delivered = upstream.wait_for(3, Duration::from_secs(10)).await;
    let mut ids: Vec<_> = delivered
        .iter()
        .filter_map(|r| r.header("x-actiongate-event-id"))
        .collect();
    ids.sort();
    assert_eq!(ids, ["s1", "s3", "s4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body() {
    let upstream = Upstream::ok().await;
    let gateway = start(&upstream).await;
    let request =
        post("/actions/restart", &event_with_id("cont-1")).header("Expect", "100-continue");
    let mut stream = client::connect(gateway.addr, None).await;
    stream.write_all(&request.head(gateway.addr)).await.unwrap();
    let interim = read_response(&mut stream).await.unwrap();
    assert_eq!(interim.status, 100);
    stream.write_all(&request.body).await.unwrap();
    let response = read_response(&mut stream).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["event_id"], "cont-1");

    // A request that will be refused is refused without waiting for its body.
    let refused = Request::post_json("/actions/restart", b"{}").header("Expect", "100-continue");
    let mut stream = client::connect(gateway.addr, None).await;
    stream.write_all(&refused.head(gateway.addr)).await.unwrap();
    let response = read_response(&mut stream).await.unwrap();
    assert_eq!(response.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_carry_many_requests() {
    let upstream = Upstream::ok().await;
    let gateway = start(&upstream).await;
    let mut stream = client::connect(gateway.addr, None).await;
    for i in 0..5 {
        let request = post("/actions/restart", &event_with_id(&format!("ka-{i}")));
        let mut bytes = request.head(gateway.addr);
        bytes.extend_from_slice(&request.body);
        stream.write_all(&bytes).await.unwrap();
        let response = read_response(&mut stream).await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.json()["event_id"], format!("ka-{i}"));
    }
    upstream.wait_for(5, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_answered_200_survives_kill_9_and_is_delivered_after_restart() {
    // The upstream is down when the event arrives.
    let port = support::free_port();
    let upstream_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut gateway = Gateway::start_with_env(
        &config(&format!("http://{upstream_addr}")),
        &[("SECRET", SECRET)],
    )
    .await;
    let response = post("/actions/restart", &event_with_id("crash-1"))
        .send(gateway.addr)
        .await;
    assert_eq!(response.status, 200);
    gateway.kill9();
    let stored = gateway.stored();
    assert_eq!(
        (stored.events, stored.pending),
        (1, 1),
        "the 200 meant it was on disk"
    );

    let upstream =
        Upstream::start_on(upstream_addr, |_, _| support::upstream::Reply::Status(200)).await;
    gateway.spawn().await;
    let received = upstream.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(received[0].header("x-actiongate-event-id"), Some("crash-1"));
    assert_eq!(received[0].body, event_with_id("crash-1"));
    // And the dedup key survived too.
    let again = post("/actions/restart", &event_with_id("crash-1"))
        .send(gateway.addr)
        .await;
    assert_eq!(again.json()["status"], "duplicate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_draining_new_requests_get_503_and_in_flight_ones_finish() {
    let upstream = Upstream::ok().await;
    let yaml = config(&upstream.url("")).replace("read_timeout: 500ms", "read_timeout: 20s");
    let mut gateway = Gateway::start_with_env(&yaml, &[("SECRET", SECRET)]).await;
    // A request whose body is still arriving holds the drain open.
    let slow = post("/actions/restart", &event_with_id("slow-1"));
    let mut stream = client::connect(gateway.addr, None).await;
    stream.write_all(&slow.head(gateway.addr)).await.unwrap();
    stream.write_all(&slow.body[..10]).await.unwrap();
    gateway
        .wait_metric("actiongate_in_flight{kind=\"request\"}", 1.0)
        .await;
    gateway.signal("-TERM");
    let admin = gateway.admin;
    support::eventually_async(Duration::from_secs(5), || async move {
        (support::gateway::readyz(admin).await == Some(503)).then_some(())
    })
    .await;
    let refused = post("/actions/restart", &event_with_id("late-1"))
        .send(gateway.addr)
        .await;
    assert_error(&refused, 503, "unavailable", "shutting down");
    assert_eq!(refused.header("retry-after"), Some("1"));

    stream.write_all(&slow.body[10..]).await.unwrap();
    let response = read_response(&mut stream).await.unwrap();
    assert_eq!(response.status, 200, "the in-flight request finishes");
    assert!(gateway.wait_exit().await.success());
    // slow-1 is stored and still pending (lanes stop when draining begins); late-1 is not.
    let spool = gateway.open_spool();
    let pending = spool
        .due("restart/up", u64::MAX, 10, &Default::default())
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        spool.load(pending[0]).unwrap().unwrap().0.event_id,
        "slow-1"
    );
    drop(spool);
    let counts = gateway.stored();
    assert_eq!(
        (counts.events, counts.pending, counts.dedup_keys),
        (1, 1, 1),
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_go_to_the_fallback_when_one_is_configured() {
    let backend = Upstream::start(|_, r| {
        support::upstream::Reply::Full(
            200,
            vec![("X-Backend".into(), "yes".into())],
            format!("backend saw {}", r.path),
        )
    })
    .await;
    let upstream = Upstream::ok().await;
    let yaml = format!(
        "fallback: {{url: \"{}\"}}\n{}",
        backend.url(""),
        config(&upstream.url(""))
    );
    let gateway = Gateway::start_with_env(&yaml, &[("SECRET", SECRET)]).await;
    let response = client::get(gateway.addr, "/status/page?x=1").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-backend"), Some("yes"));
    assert_eq!(response.body, b"backend saw /status/page?x=1");
    // Action paths are still answered by the gateway itself.
    let action = post("/actions/restart", &event_with_id("fb-1"))
        .send(gateway.addr)
        .await;
    assert_eq!(action.json()["status"], "accepted");
    assert_eq!(
        gateway
            .metric("actiongate_requests_total{action=\"(none)\",outcome=\"unknown_action\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_and_every_series_exist_from_start() {
    let upstream = Upstream::ok().await;
    let gateway = start(&upstream).await;
    assert_eq!(client::get(gateway.admin, "/healthz").await.status, 200);
    assert_eq!(client::get(gateway.admin, "/readyz").await.status, 200);
    assert_eq!(client::get(gateway.admin, "/nope").await.status, 404);
    let text = gateway.metrics().await;
    for outcome in [
        "accepted",
        "duplicate",
        "forbidden_source",
        "unauthorized",
        "invalid_json",
        "invalid_payload",
        "payload_too_large",
        "unsupported_media_type",
        "method_not_allowed",
        "request_timeout",
        "unavailable",
        "ignored",
    ] {
        for action in ["restart", "partner"] {
            let series =
                format!("actiongate_requests_total{{action=\"{action}\",outcome=\"{outcome}\"}} 0");
            assert!(text.contains(&series), "missing {series}");
        }
    }
    for outcome in ["delivered", "retried", "dead_lettered", "skipped"] {
        let series = format!("actiongate_deliveries_total{{action=\"restart\",outcome=\"{outcome}\",upstream=\"up\"}} 0");
        assert!(text.contains(&series), "missing {series}");
    }
    for series in [
        "actiongate_ack_duration_seconds_bucket{action=\"restart\",le=\"0.0001\"} 0",
        "actiongate_ack_duration_seconds_bucket{action=\"restart\",le=\"1\"} 0",
        "actiongate_delivery_attempt_duration_seconds_bucket{action=\"restart\",upstream=\"up\",le=\"0.001\"} 0",
        "actiongate_delivery_attempt_duration_seconds_bucket{action=\"restart\",upstream=\"up\",le=\"60\"} 0",
        "actiongate_delivery_lag_seconds_count{action=\"restart\",upstream=\"up\"} 0",
        "actiongate_pending_deliveries{upstream=\"up\"} 0",
        "actiongate_dead_letters{upstream=\"up\"} 0",
        "actiongate_schema_drift_total{field=\"incident.alerts.alert_status\"} 0",
        "actiongate_schema_drift_total{field=\"event_type\"} 0",
        "actiongate_schema_drift_total{field=\"alert.alert_severity\"} 0",
    ] {
        assert!(text.contains(series), "missing {series}");
    }
}

/// Whether a connection from `from` is closed without an answer (at accept, by the gateway).
async fn closed_without_an_answer(to: SocketAddr, from: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = support::client::connect(to, Some(ip(from))).await;
    let request = Request::post_json("/actions/partner", &event_with_id("closed")).head(to);
    // The write may already fail: the gateway closed the socket right after accept().
    let _ = stream.write_all(&request).await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("neither answered nor closed within 10 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_sources_no_action_allows_are_closed_at_accept() {
    let upstream = Upstream::ok().await;
    let gateway = start(&upstream).await;
    // 127.0.0.3 is allowed by no action and is no trusted proxy: closed, nothing read.
    for _ in 0..5 {
        assert!(closed_without_an_answer(gateway.addr, "127.0.0.3").await);
    }
    assert_eq!(
        gateway
            .metric("actiongate_connections_refused_total{reason=\"source\"}")
            .await,
        5.0
    );
    // Not counted as requests: none was read.
    assert_eq!(
        gateway
            .metric("actiongate_requests_total{action=\"partner\",outcome=\"forbidden_source\"}")
            .await,
        0.0
    );
    // The allowed source and the trusted proxy still get in.
    let ok = Request::post_json("/actions/partner", &event_with_id("open-1"))
        .send_from(gateway.addr, Some(ip("127.0.0.2")))
        .await;
    assert_eq!(ok.status, 200);
    let proxied = Request::post_json("/actions/partner", &event_with_id("open-2"))
        .header("X-Forwarded-For", "127.0.0.2")
        .send_from(gateway.addr, Some(ip("127.0.0.4")))
        .await;
    assert_eq!(proxied.status, 200);
    gateway
        .wait_metric(
            "actiongate_requests_total{action=\"partner\",outcome=\"accepted\"}",
            2.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_fallback_every_source_reaches_the_request_path() {
    let upstream = Upstream::ok().await;
    let yaml = format!(
        "{}fallback: {{url: \"{}\"}}\n",
        config(&upstream.url("")),
        upstream.url("")
    );
    let gateway = Gateway::start_with_env(&yaml, &[("SECRET", SECRET)]).await;
    let refused = Request::post_json("/actions/partner", &event_with_id("fb-1"))
        .send_from(gateway.addr, Some(ip("127.0.0.3")))
        .await;
    assert_error(&refused, 403, "forbidden_source", "source 127.0.0.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_source_and_total_caps_are_closed_at_accept() {
    let upstream = Upstream::ok().await;
    let yaml = config(&upstream.url("")).replace(
        "limits: {max_body: 64KiB, read_timeout: 500ms}",
        "limits: {max_body: 64KiB, read_timeout: 500ms, max_connections: 4, max_connections_per_source: 2}",
    );
    let gateway = Gateway::start_with_env(&yaml, &[("SECRET", SECRET)]).await;
    let open = "actiongate_connections";
    // Two idle connections from the partner's address are its share (counted once the
    // listener has taken them: accepts run on several threads, in no fixed order).
    let held = hold(gateway.addr, "127.0.0.2", 2).await;
    gateway.wait_metric(open, 2.0).await;
    assert!(closed_without_an_answer(gateway.addr, "127.0.0.2").await);
    let refused =
        |reason: &str| format!("actiongate_connections_refused_total{{reason=\"{reason}\"}}");
    assert_eq!(gateway.metric(&refused("per_source")).await, 1.0);
    // The trusted proxy is exempt from the per-source cap, not from the total one (4).
    let proxy = hold(gateway.addr, "127.0.0.4", 2).await;
    gateway.wait_metric(open, 4.0).await;
    assert!(closed_without_an_answer(gateway.addr, "127.0.0.4").await);
    assert_eq!(gateway.metric(&refused("limit")).await, 1.0);
    // Connections closed give their place back.
    drop(held);
    drop(proxy);
    gateway.wait_metric(open, 0.0).await;
    let response = Request::post_json("/actions/partner", &event_with_id("cap-1"))
        .send_from(gateway.addr, Some(ip("127.0.0.2")))
        .await;
    assert_eq!(response.status, 200);
}

/// `n` connections from `from` that have sent nothing, held open until dropped.
async fn hold(to: SocketAddr, from: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(support::client::connect(to, Some(ip(from))).await);
    }
    held
}

/// Reads until the peer closes the connection; panics if it stays open `limit`.
async fn wait_closed(stream: &mut tokio::net::TcpStream, limit: Duration) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection was still open after {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_trickled_in_past_header_timeout_closes_the_connection() {
    let upstream = Upstream::ok().await;
    let yaml = config(&upstream.url("")).replace(
        "limits: {max_body: 64KiB, read_timeout: 500ms}",
        "limits: {max_body: 64KiB, read_timeout: 500ms, header_timeout: 1s}",
    );
    let gateway = Gateway::start_with_env(&yaml, &[("SECRET", SECRET)]).await;
    let mut stream = support::client::connect(gateway.addr, Some(ip("127.0.0.2"))).await;
    stream
        .write_all(b"POST /actions/partner HTTP/1.1\r\n")
        .await
        .unwrap();
    // A header byte every 100 ms: each read is quick, the head never ends. Bounded: the
    // gateway must close it well before 100 bytes.
    let trickle = async {
        for _ in 0..100 {
            if stream.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    trickle.await;
    wait_closed(&mut stream, Duration::from_secs(10)).await;
    gateway
        .wait_metric(
            "actiongate_connections_refused_total{reason=\"header_timeout\"}",
            1.0,
        )
        .await;
    // A prompt request is not affected.
    let ok = Request::post_json("/actions/partner", &event_with_id("prompt"))
        .send_from(gateway.addr, Some(ip("127.0.0.2")))
        .await;
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_idle_past_idle_timeout_is_closed() {
    let upstream = Upstream::ok().await;
    let yaml = config(&upstream.url("")).replace(
        "limits: {max_body: 64KiB, read_timeout: 500ms}",
        "limits: {max_body: 64KiB, read_timeout: 500ms, idle_timeout: 1s}",
    );
    let gateway = Gateway::start_with_env(&yaml, &[("SECRET", SECRET)]).await;
    let mut stream = support::client::connect(gateway.addr, Some(ip("127.0.0.2"))).await;
    let request = Request::post_json("/actions/partner", &event_with_id("idle-1"));
    let mut bytes = request.head(gateway.addr);
    bytes.extend_from_slice(&request.body);
    stream.write_all(&bytes).await.unwrap();
    let answer = read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 200);
    // Then nothing: closed by the gateway, counted as idle.
    wait_closed(&mut stream, Duration::from_secs(10)).await;
    gateway
        .wait_metric(
            "actiongate_connections_refused_total{reason=\"idle_timeout\"}",
            1.0,
        )
        .await;
}
