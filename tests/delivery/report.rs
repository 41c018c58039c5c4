//! Closing the loop with Flashduty against the real binary: reports of outcomes posted onto
//! the incident through a loopback stand-in of the Open API, and the guards of destructive
//! actions, across retries, refusals, kill -9 and restarts.

use std::time::Duration;

use serde_json::Value;

use crate::support::client::{self, Request};
use crate::support::event_with_id;
use crate::support::flashduty::{Fail, OpenApi, CALLS_PER_SECOND};
use crate::support::gateway::Gateway;
use crate::support::upstream::{Reply, Upstream};

const WAIT: Duration = Duration::from_secs(20);
const KEY: &str = "fd-test-key-5ec2e7";
/// The incident of every fixture built by `event_with_id`.
const INCIDENT: &str = "692701aa3c5e8f0012ab77c1";

/// One action `act` at /act for 127.0.0.1 with `report` and `guard` YAML (or empty), reporting
/// through `api`, with the given upstream items.
fn config(api: &OpenApi, rate: u32, report: &str, guard: &str, upstreams: &[String]) -> String {
    let mut yaml = format!(
        "server: {{threads: 2, grace_period: 1s}}\nlog: {{level: debug}}\nsources: {{local: [\"127.0.0.1/32\"]}}\nflashduty: {{app_key: \"${{FD_KEY}}\", api: \"{}\", rate: {rate}}}\nactions:\n  - name: act\n    path: /act\n    allow: [local]\n",
        api.api()
    );
    if !report.is_empty() {
        yaml.push_str(&format!("    report: {report}\n"));
    }
    if !guard.is_empty() {
        yaml.push_str(&format!("    guard: {guard}\n"));
    }
    yaml.push_str("    upstreams:\n");
    for u in upstreams {
        yaml.push_str(&format!("      - {u}\n"));
    }
    yaml
}

fn upstream(name: &str, url: &str) -> String {
    format!("{{name: {name}, url: \"{url}\", retry: {{attempts: 2, backoff: 10ms, max_backoff: 20ms}}}}")
}

async fn start(yaml: &str) -> Gateway {
    Gateway::start_with_env(yaml, &[("FD_KEY", KEY)]).await
}

/// The Open API stand-in, an upstream `agent` that answers 200, and the gateway reporting to
/// the one and delivering to the other, with `report` and `guard` YAML (or empty).
async fn with_agent(report: &str, guard: &str) -> (OpenApi, Upstream, Gateway) {
    let api = OpenApi::start(KEY).await;
    let ok = Upstream::ok().await;
    let gateway = start(&config(
        &api,
        20,
        report,
        guard,
        &[upstream("agent", &ok.url("/"))],
    ))
    .await;
    (api, ok, gateway)
}

async fn push(gateway: &Gateway, body: &[u8]) -> (u16, Value) {
    let response = Request::post_json("/act", body).send(gateway.addr).await;
    (response.status, response.json())
}

/// Deliveries of `upstream` not yet done.
async fn pending(gateway: &Gateway, upstream: &str) -> f64 {
    gateway
        .metric(&format!(
            "actiongate_pending_deliveries{{upstream=\"{upstream}\"}}"
        ))
        .await
}

fn series(name: &str, upstream: &str, outcome: &str) -> String {
    format!("{name}{{action=\"act\",outcome=\"{outcome}\",upstream=\"{upstream}\"}}")
}

/// The event without `person`: what an automation pushes.
fn without_person(event_id: &str) -> Vec<u8> {
    let mut value: Value = serde_json::from_slice(&event_with_id(event_id)).unwrap();
    value.as_object_mut().unwrap().remove("person");
    serde_json::to_vec(&value).unwrap()
}

/// The event about another incident.
fn for_incident(event_id: &str, incident: &str) -> Vec<u8> {
    let mut value: Value = serde_json::from_slice(&event_with_id(event_id)).unwrap();
    value["incident"]["incident_id"] = Value::from(incident);
    serde_json::to_vec(&value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_outcome_is_commented_on_the_incident_after_it_happened() {
    let api = OpenApi::start(KEY).await;
    let ok = Upstream::start(|_, _| Reply::Full(200, vec![], "restarted web-3".into())).await;
    let gone = Upstream::start(|_, _| Reply::Full(404, vec![], "no such host".into())).await;
    let gateway = start(&config(
        &api,
        20,
        "{}",
        "",
        &[
            upstream("agent", &ok.url("/")),
            upstream("cmdb", &gone.url("/")),
        ],
    ))
    .await;
    let (status, _) = push(&gateway, &event_with_id("e-outcomes")).await;
    assert_eq!(status, 200);

    let comments = api.wait_comments(2, WAIT).await;
    let delivered = comments
        .iter()
        .find(|c| c.comment.contains("delivered to agent"))
        .expect("a comment on the delivery");
    assert!(
        delivered
            .comment
            .starts_with("actiongate: act was delivered to agent (HTTP 200) after 1 attempt, "),
        "{}",
        delivered.comment
    );
    assert!(
        delivered
            .comment
            .ends_with(" after the push; it answered: restarted web-3"),
        "{}",
        delivered.comment
    );
    let dead = comments
        .iter()
        .find(|c| c.comment.contains("FAILED at cmdb"))
        .expect("a comment on the dead letter");
    assert!(
        dead.comment.contains("HTTP 404: no such host"),
        "{}",
        dead.comment
    );
    for comment in &comments {
        assert_eq!(comment.incident_ids, [INCIDENT]);
        assert!(comment.mute_reply, "a comment must not trigger webhooks");
    }
    // After the outcome it tells of: the upstream's answer came first.
    assert!(delivered.at > ok.received()[0].at);
    assert!(dead.at > gone.received()[0].at);
    gateway
        .wait_metric(
            &series("actiongate_deliveries_total", "flashduty", "delivered"),
            2.0,
        )
        .await;
    assert_eq!(pending(&gateway, "flashduty").await, 0.0);
    // Nothing left to report: exactly one comment per outcome. And the key is in no log line.
    assert_eq!(api.comments().len(), 2);
    assert!(!gateway.logs().contains(KEY), "the app_key was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_with_an_error_is_retried_or_dead_lettered_by_its_code() {
    let (api, _agent, gateway) = with_agent("{on: [delivered]}", "").await;
    api.fail_next(&[
        Fail::Code("RequestTooFrequently"),
        Fail::Code("InternalError"),
    ]);
    push(&gateway, &event_with_id("e-retried")).await;
    let comments = api.wait_comments(1, WAIT).await;
    assert!(comments[0].comment.contains("delivered to agent"));
    assert_eq!(api.refused(), ["RequestTooFrequently", "InternalError"]);
    gateway
        .wait_metric(
            &series("actiongate_deliveries_total", "flashduty", "retried"),
            2.0,
        )
        .await;

    // A permanent code: dead-lettered at once, with Flashduty's words and request id.
    api.fail_next(&[Fail::Code("InvalidParameter")]);
    push(&gateway, &event_with_id("e-refused")).await;
    gateway
        .wait_metric(
            &series("actiongate_deliveries_total", "flashduty", "dead_lettered"),
            1.0,
        )
        .await;
    let dead = client::get(gateway.admin, "/dead-letters").await.json();
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["upstream"], "flashduty");
    assert_eq!(dead[0]["event_id"], "e-refused");
    assert_eq!(dead[0]["attempts"], 1);
    let error = dead[0]["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("HTTP 200, Flashduty InvalidParameter: injected (request req-"),
        "{error}"
    );
    assert_eq!(api.comments().len(), 1);
    assert!(!gateway.logs().contains(KEY), "the app_key was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_reports_keeps_to_flashdutys_rate() {
    let api = OpenApi::start(KEY).await;
    let ok = Upstream::ok().await;
    // Near what Flashduty allows (50): a pace that bunched calls would earn 429s from the
    // stand-in. (At exactly 50 the network's jitter alone earns a few; they are retried.)
    let rate = CALLS_PER_SECOND as u32 * 4 / 5;
    let gateway = start(&config(
        &api,
        rate,
        "{}",
        "",
        &[upstream("agent", &ok.url("/"))],
    ))
    .await;
    let ids: Vec<String> = (0..120).map(|i| format!("e-burst-{i}")).collect();
    let bodies: Vec<Vec<u8>> = ids.iter().map(|id| event_with_id(id)).collect();
    let statuses = client::post_many(gateway.addr, "/act", bodies, 8).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let comments = api.wait_comments(120, WAIT).await;
    assert_eq!(api.refused(), Vec::<String>::new(), "no call over the rate");
    assert_eq!(api.calls(), 120);
    // Unpaced, the lane's 8 concurrent calls would send all 120 within a few milliseconds,
    // and the stand-in would have refused most of them.
    assert_eq!(comments.len(), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_upstreams_2xx_and_the_comment_still_comments_after_restart() {
    // Flashduty cannot be reached while the action runs: the report waits in the spool.
    let (api, ok, mut gateway) = with_agent("{}", "").await;
    let api_addr = api.upstream.addr;
    api.upstream.stop().await;
    push(&gateway, &event_with_id("e-crash")).await;
    ok.wait_for(1, WAIT).await;
    gateway
        .wait_metric_at_least(
            &series("actiongate_deliveries_total", "flashduty", "retried"),
            1.0,
            WAIT,
        )
        .await;
    gateway.kill9();

    let api = OpenApi::start_on(KEY, api_addr).await;
    gateway.spawn().await;
    let comments = api.wait_comments(1, WAIT).await;
    assert!(comments[0].comment.contains("delivered to agent"));
    gateway
        .wait_metric(
            &series("actiongate_deliveries_total", "flashduty", "delivered"),
            1.0,
        )
        .await;
    // The action ran once: the restart re-ran only the report.
    assert_eq!(ok.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_refusal_is_answered_not_delivered_and_reported_once() {
    let (api, ok, gateway) = with_agent("{on: [guarded]}", "{human_only: true}").await;
    let (status, body) = push(&gateway, &without_person("e-bot")).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"], "guarded");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("act runs only when a person presses it"),
        "{message}"
    );
    // Flashduty may push it again: refused again, reported once.
    let (status, _) = push(&gateway, &without_person("e-bot")).await;
    assert_eq!(status, 409);
    let comments = api.wait_comments(1, WAIT).await;
    assert_eq!(
        comments[0].comment,
        format!("actiongate: act was not run: {message}")
    );
    gateway
        .wait_metric(
            "actiongate_requests_total{action=\"act\",outcome=\"guarded\"}",
            2.0,
        )
        .await;
    // A person's push runs.
    let (status, _) = push(&gateway, &event_with_id("e-person")).await;
    assert_eq!(status, 200);
    gateway
        .wait_metric(
            &series("actiongate_deliveries_total", "agent", "delivered"),
            1.0,
        )
        .await;
    // The delivery's result is recorded, and with it any report: there is none to come.
    assert_eq!(pending(&gateway, "flashduty").await, 0.0);
    assert_eq!(api.comments().len(), 1, "delivered is not in report.on");
    // Refused pushes were never accepted (stored), only the person's was.
    assert_eq!(
        gateway
            .metric("actiongate_requests_total{action=\"act\",outcome=\"accepted\"}")
            .await,
        1.0
    );
    let received = ok.received();
    assert_eq!(received.len(), 1, "the refused push reached the upstream");
    assert_eq!(
        received[0].header("x-actiongate-event-id"),
        Some("e-person")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_windows_hold_across_restarts_and_duplicates_are_answered_first() {
    let (api, ok, mut gateway) = with_agent("", "{once_per_incident: 10m, max_per_hour: 3}").await;
    let (status, _) = push(&gateway, &event_with_id("e-first")).await;
    assert_eq!(status, 200);
    // The same push again is a duplicate, not a second run for the incident.
    let (status, body) = push(&gateway, &event_with_id("e-first")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("duplicate")));
    let (status, body) = push(&gateway, &event_with_id("e-second")).await;
    assert_eq!(status, 409);
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("act already ran for this incident; it may run for it again in 9m")
            || message
                .starts_with("act already ran for this incident; it may run for it again in 10m"),
        "{message}"
    );

    gateway.kill9();
    gateway.spawn().await;
    let (status, _) = push(&gateway, &event_with_id("e-third")).await;
    assert_eq!(status, 409, "the incident's window outlived kill -9");
    for (i, incident) in ["aaaaaaaaaaaaaaaaaaaaaaa1", "aaaaaaaaaaaaaaaaaaaaaaa2"]
        .iter()
        .enumerate()
    {
        let (status, _) = push(&gateway, &for_incident(&format!("e-other-{i}"), incident)).await;
        assert_eq!(status, 200);
    }
    gateway.stop_with("-TERM").await;
    gateway.spawn().await;
    let (status, body) = push(
        &gateway,
        &for_incident("e-fourth", "aaaaaaaaaaaaaaaaaaaaaaa3"),
    )
    .await;
    assert_eq!(status, 409, "three ran in the hour, before a clean restart");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("act ran 3 times in the last hour, its limit; it may run again in 59m"),
        "{body}"
    );
    ok.wait_for(3, WAIT).await;
    gateway
        .wait_metric("actiongate_pending_deliveries{upstream=\"agent\"}", 0.0)
        .await;
    // At least once across kill -9: a run may repeat, but only the three let through ran.
    let ran: std::collections::BTreeSet<String> = ok
        .received()
        .iter()
        .filter_map(|r| r.header("x-actiongate-event-id").map(str::to_string))
        .collect();
    assert_eq!(
        ran.into_iter().collect::<Vec<_>>(),
        ["e-first", "e-other-0", "e-other-1"]
    );
    assert_eq!(api.calls(), 0, "nothing reports without report");
}
