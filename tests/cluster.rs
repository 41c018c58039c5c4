//! Cluster mode against real PostgreSQL servers on loopback: several gateways on one database,
//! dedup and dead letters across them, kill -9 of a gateway, the database down, and a failover
//! to a synchronous standby, with every acknowledged event delivered.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actiongate::store::{now_ms, Appended, IdSet, NewEvent, Postgres};
use support::client::{self, Request};
use support::gateway::Gateway;
use support::postgres::PgServer;
use support::upstream::{Received, Reply, Upstream};
use support::{event_with_id, eventually_async};

const WAIT: Duration = Duration::from_secs(30);

/// One action `act` at /act, open to 127.0.0.1, delivering to `upstream`, stored in `url`.
fn config(url: &str, upstream: &str, extra: &str) -> String {
    format!(
        "spool: {{postgres: {{url: \"{url}\", pool: 4}}}}\nserver: {{threads: 2}}\n\
         sources: {{local: [\"127.0.0.1/32\"]}}\nactions:\n  - name: act\n    path: /act\n    \
         allow: [local]\n{extra}    upstreams:\n      - {{name: up, url: \"{upstream}\", \
         retry: {{attempts: 3, backoff: 10ms, max_backoff: 50ms}}}}\n"
    )
}

async fn post(gateway: &Gateway, event_id: &str) -> client::Response {
    Request::post_json("/act", &event_with_id(event_id))
        .send(gateway.addr)
        .await
}

/// How many times each event id reached the upstream.
fn deliveries(received: &[Received]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for r in received {
        let id = r.json()["event_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

async fn dead_letters(gateway: &Gateway) -> Vec<serde_json::Value> {
    let response = client::get(gateway.admin, "/dead-letters").await;
    assert_eq!(response.status, 200);
    response.json().as_array().cloned().expect("a JSON list")
}

/// Waits until the database holds no pending delivery (up to `limit`).
async fn drained_within(db: &PgServer, limit: Duration) {
    eventually_async(limit, || async {
        let pending = db.query(
            "actiongate",
            "SELECT count(*) FROM actiongate_deliveries WHERE dead_ms IS NULL",
        );
        (pending.trim() == "0").then_some(())
    })
    .await;
}

async fn drained(db: &PgServer) {
    drained_within(db, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_the_work_and_a_retry_on_the_other_is_a_duplicate() {
    let db = PgServer::primary().await;
    let upstream = Upstream::ok().await;
    let yaml = config(&db.url(), &upstream.url("/"), "");
    let a = Gateway::start(&yaml).await;
    let b = Gateway::start(&yaml).await;

    let mut ids = BTreeSet::new();
    for i in 0..40 {
        let id = format!("evt-{i:03}");
        let (first, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let response = post(first, &id).await;
        assert_eq!(response.status, 200, "{}", a.logs());
        assert_eq!(response.json()["status"], "accepted");
        // Flashduty's retry lands on the other instance: still a duplicate.
        let again = post(other, &id).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.json()["status"], "duplicate", "{id}");
        ids.insert(id);
    }
    let received = upstream.wait_for(ids.len(), WAIT).await;
    drained(&db).await;
    let seen = deliveries(&upstream.received());
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), ids);
    assert!(seen.values().all(|&n| n == 1), "delivered twice: {seen:?}");
    assert_eq!(received.len(), ids.len());
    // Both instances delivered: the claims spread the work.
    let delivered =
        "actiongate_deliveries_total{action=\"act\",outcome=\"delivered\",upstream=\"up\"}";
    let (by_a, by_b) = (a.metric(delivered).await, b.metric(delivered).await);
    assert_eq!(by_a + by_b, ids.len() as f64);
    let duplicates = a
        .metric("actiongate_requests_total{action=\"act\",outcome=\"duplicate\"}")
        .await
        + b.metric("actiongate_requests_total{action=\"act\",outcome=\"duplicate\"}")
            .await;
    assert_eq!(duplicates, ids.len() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_holds_across_instances() {
    let db = PgServer::primary().await;
    let upstream = Upstream::ok().await;
    let guard = "    guard: {once_per_incident: 10m}\n";
    let yaml = config(&db.url(), &upstream.url("/"), guard);
    let a = Gateway::start(&yaml).await;
    let b = Gateway::start(&yaml).await;
    // Two presses for the same incident (the fixture's), on two instances.
    let first = post(&a, "press-1").await;
    assert_eq!(first.status, 200);
    let second = post(&b, "press-2").await;
    assert_eq!(
        second.status,
        409,
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    assert_eq!(second.json()["error"], "guarded");
    upstream.wait_for(1, WAIT).await;
    drained(&db).await;
    assert_eq!(upstream.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_gateway_mid_load_loses_no_acknowledged_event() {
    let db = PgServer::primary().await;
    // Slow enough that the killed instance holds claims when it dies.
    let upstream = Upstream::start(|_, _| Reply::Delayed(Duration::from_millis(200), 200)).await;
    let yaml = config(&db.url(), &upstream.url("/"), "");
    let mut a = Gateway::start(&yaml).await;
    let b = Gateway::start(&yaml).await;

    let mut acked = BTreeSet::new();
    for i in 0..60 {
        let id = format!("load-{i:03}");
        let response = post(&a, &id).await;
        assert_eq!(response.status, 200);
        acked.insert(id);
        if i == 40 {
            a.kill9();
            break;
        }
    }
    // The survivor takes over what the dead instance had claimed once the claims run out
    // (30 s): those it had sent without recording are sent again (at least once).
    eventually_async(Duration::from_secs(90), || async {
        let seen = deliveries(&upstream.received());
        acked.iter().all(|id| seen.contains_key(id)).then_some(())
    })
    .await;
    drained_within(&db, Duration::from_secs(90)).await;
    let taken_over = b
        .metric("actiongate_deliveries_total{action=\"act\",outcome=\"delivered\",upstream=\"up\"}")
        .await;
    assert!(taken_over > 0.0, "the survivor delivered nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_made_on_one_instance_are_replayed_from_the_other() {
    let db = PgServer::primary().await;
    let failing = Arc::new(Mutex::new(true));
    let flag = failing.clone();
    let upstream = Upstream::start(move |_, _| {
        if *flag.lock().unwrap() {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let yaml = config(&db.url(), &upstream.url("/"), "");
    let a = Gateway::start(&yaml).await;
    let b = Gateway::start(&yaml).await;
    for i in 0..5 {
        assert_eq!(post(&a, &format!("dl-{i}")).await.status, 200);
    }
    let letters = eventually_async(WAIT, || async {
        let letters = dead_letters(&b).await;
        (letters.len() == 5).then_some(letters)
    })
    .await;
    assert!(
        letters.iter().all(|l| l["last_status"] == 400),
        "{letters:?}"
    );
    *failing.lock().unwrap() = false;
    let replayed = client::call(b.admin, "POST", "/dead-letters/replay").await;
    assert_eq!(replayed.status, 200);
    assert_eq!(replayed.json()["replayed"], 5);
    eventually_async(WAIT, || async {
        let seen = deliveries(&upstream.received());
        (0..5)
            .all(|i| seen.get(&format!("dl-{i}")) == Some(&2))
            .then_some(())
    })
    .await;
    drained(&db).await;
    assert!(dead_letters(&a).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_down_is_answered_503_at_once_and_accepting_resumes_when_it_returns() {
    let mut db = PgServer::primary().await;
    let upstream = Upstream::ok().await;
    let gateway = Gateway::start(&config(&db.url(), &upstream.url("/"), "")).await;
    assert_eq!(post(&gateway, "before").await.status, 200);

    db.stop_immediate();
    let started = Instant::now();
    let refused = post(&gateway, "while-down").await;
    assert_eq!(
        refused.status,
        503,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.json()["error"], "unavailable");
    assert!(refused.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered only after {:?}",
        started.elapsed()
    );
    let ready = client::get(gateway.admin, "/readyz").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "database unavailable");
    gateway
        .wait_metric(
            "actiongate_spool_refusing{reason=\"database_unavailable\"}",
            1.0,
        )
        .await;

    db.start().await;
    // Accepted again once the probe reconnects: within seconds, not after a restart.
    let back = eventually_async(WAIT, || async {
        let r = post(&gateway, "after").await;
        (r.status == 200).then_some(Instant::now())
    })
    .await;
    let _ = back;
    assert_eq!(client::get(gateway.admin, "/readyz").await.status, 200);
    // Both, at least once: "before" may have been delivered as the server went down, its
    // result committed without waiting for the disk and lost with it (at least once).
    drained(&db).await;
    let seen = deliveries(&upstream.received());
    assert!(
        seen.contains_key("before") && seen.contains_key("after"),
        "{seen:?}"
    );
    assert!(
        !seen.contains_key("while-down"),
        "a refused event was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_gone_silent_is_answered_503_within_the_deadline_and_then_marked_down() {
    let db = PgServer::primary().await;
    let upstream = Upstream::ok().await;
    let gateway = Gateway::start(&config(&db.url(), &upstream.url("/"), "")).await;
    assert_eq!(post(&gateway, "before").await.status, 200);

    // No reset, no answer: what a host that died or a partition looks like.
    db.signal_all("-STOP");
    let resumed = scopeguard(&db);
    let started = Instant::now();
    let refused = post(&gateway, "while-silent").await;
    assert_eq!(
        refused.status,
        503,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert!(refused.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered only after {:?}",
        started.elapsed()
    );
    // The hung call times out, the store is marked down: the load balancer is told.
    eventually_async(WAIT, || async {
        let ready = client::get(gateway.admin, "/readyz").await;
        (ready.status == 503 && ready.json()["status"] == "database unavailable").then_some(())
    })
    .await;
    let refused = post(&gateway, "while-down").await;
    assert_eq!(refused.status, 503);

    drop(resumed);
    eventually_async(WAIT, || async {
        (post(&gateway, "after").await.status == 200).then_some(())
    })
    .await;
    assert_eq!(client::get(gateway.admin, "/readyz").await.status, 200);
    upstream.wait_for(2, WAIT).await;
    drained(&db).await;
    let seen = deliveries(&upstream.received());
    assert!(
        seen.contains_key("before") && seen.contains_key("after"),
        "{seen:?}"
    );
}

/// Sends SIGCONT to the server when dropped, so that a failing test leaves no stopped server.
fn scopeguard(db: &PgServer) -> impl Drop + '_ {
    struct Resume<'a>(&'a PgServer);
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            self.0.signal_all("-CONT");
        }
    }
    Resume(db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_leaves_alone_the_lanes_another_instance_runs() {
    let db = PgServer::primary().await;
    // A's `up` takes one attempt at a time and never answers: a backlog that waits, overdue,
    // on a lane A runs.
    let hung = Upstream::start(|_, _| Reply::Hang).await;
    let with_up = config(&db.url(), &hung.url("/"), "").replace(
        "retry: {attempts: 3, backoff: 10ms, max_backoff: 50ms}",
        "timeout: 60s, concurrency: 1",
    );
    let a = Gateway::start(&with_up).await;
    for i in 0..4 {
        assert_eq!(post(&a, &format!("roll-{i}")).await.status, 200);
    }
    hung.wait_for(1, WAIT).await;
    // B runs a newer config without `up` (a rolling change): for B the lane is an orphan, and
    // its deliveries are overdue past the grace (10 s); but A announces that it runs the lane.
    let other = Upstream::ok().await;
    let without_up = config(&db.url(), &other.url("/"), "").replace("name: up,", "name: other,");
    let b = Gateway::start(&without_up).await;
    assert_eq!(post(&b, "on-b").await.status, 200);
    other.wait_for(1, WAIT).await;
    // Past the grace, and three of B's sweeps (every 2 s) after it.
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert!(
        dead_letters(&b).await.is_empty(),
        "B dead-lettered deliveries of a lane A runs"
    );
    let pending = db.query(
        "actiongate",
        "SELECT count(*) FROM actiongate_deliveries WHERE lane = 'act/up' AND dead_ms IS NULL",
    );
    assert_eq!(pending.trim(), "4");
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_the_synchronous_standby_loses_no_acknowledged_event() {
    let mut primary = PgServer::primary().await;
    let standby = PgServer::standby_of(&primary).await;
    let upstream = Upstream::ok().await;
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/actiongate?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let gateway = Arc::new(Gateway::start(&config(&url, &upstream.url("/"), "")).await);

    // Four senders until told to stop; each answer must be 200, or 503 with Retry-After.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<(String, u16, Instant)>::new()));
    let mut senders = Vec::new();
    for worker in 0..4 {
        let (gateway, stop, answers) = (gateway.clone(), stop.clone(), answers.clone());
        senders.push(tokio::spawn(async move {
            for n in 0..5_000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let id = format!("fo-{worker}-{n:05}");
                let r = post(&gateway, &id).await;
                assert!(
                    r.status == 200 || (r.status == 503 && r.header("retry-after").is_some()),
                    "{id}: {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                );
                answers.lock().unwrap().push((id, r.status, Instant::now()));
                if r.status == 503 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let count = |status: u16| {
        answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.1 == status)
            .count()
    };
    eventually_async(WAIT, || async { (count(200) >= 100).then_some(()) }).await;
    primary.kill9();
    let killed = Instant::now();
    eventually_async(WAIT, || async { (count(503) >= 1).then_some(()) }).await;
    standby.promote().await;
    let promoted = Instant::now();
    let accepted_after = || {
        answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.1 == 200 && a.2 > promoted)
            .count()
    };
    eventually_async(WAIT, || async { (accepted_after() >= 50).then_some(()) }).await;
    let back_after = answers
        .lock()
        .unwrap()
        .iter()
        .find(|a| a.1 == 200 && a.2 > promoted)
        .map(|a| a.2 - promoted);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for sender in senders {
        sender.await.expect("sender");
    }
    eprintln!(
        "failover: {} accepted, {} refused; accepting again {:?} after the promotion ({:?} after the kill)",
        count(200),
        count(503),
        back_after,
        promoted - killed
    );
    let acked: BTreeSet<String> = answers
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.1 == 200)
        .map(|a| a.0.clone())
        .collect();
    // Every acknowledged event survived the primary: the standby had it before the 200.
    eventually_async(Duration::from_secs(60), || async {
        let seen = deliveries(&upstream.received());
        acked.iter().all(|id| seen.contains_key(id)).then_some(())
    })
    .await;
    drained(&standby).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_synchronous_standby_acks_nothing_keeps_the_store_down_and_strands_no_session() {
    let primary = PgServer::primary().await;
    let mut standby = PgServer::standby_of(&primary).await;
    // A setting a DBA may well have made for speed: the acks must not inherit it.
    primary.psql(
        "postgres",
        "ALTER DATABASE actiongate SET synchronous_commit = off",
    );
    let upstream = Upstream::ok().await;
    let gateway = Gateway::start(&config(&primary.url(), &upstream.url("/"), "")).await;
    assert_eq!(post(&gateway, "before").await.status, 200);

    // The primary answers every query but can commit nothing durably.
    standby.kill9();
    eventually_async(WAIT, || async {
        let streaming = primary.query("postgres", "SELECT count(*) FROM pg_stat_replication");
        (streaming.trim() == "0").then_some(())
    })
    .await;
    let refused = post(&gateway, "lost-0").await;
    assert_eq!(
        refused.status,
        503,
        "acked without the standby: {}",
        String::from_utf8_lossy(&refused.body)
    );
    assert!(refused.header("retry-after").is_some());
    eventually_async(WAIT, || async {
        let ready = client::get(gateway.admin, "/readyz").await;
        (ready.status == 503).then_some(())
    })
    .await;
    // It stays down while no commit completes: a server that merely answers is not one that
    // takes acks. Two of the probe's rounds (each waits out its commit for 5 s).
    let watched = Instant::now();
    let mut n = 0;
    while watched.elapsed() < Duration::from_secs(11) {
        n += 1;
        let ready = client::get(gateway.admin, "/readyz").await;
        assert_eq!(ready.status, 503, "marked up after {:?}", watched.elapsed());
        let r = post(&gateway, &format!("lost-{n}")).await;
        assert_eq!(
            r.status,
            503,
            "lost-{n}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.header("retry-after").is_some());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // No session of the gateway's is left waiting for the standby: a commit that timed out
    // was cancelled before its connection was dropped (only the probe's own may be waiting).
    eventually_async(WAIT, || async {
        let stuck = primary.query(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'actiongate' AND wait_event = 'SyncRep'",
        );
        (stuck.trim() == "0").then_some(())
    })
    .await;

    standby.start().await;
    eventually_async(WAIT, || async {
        let r = post(&gateway, "after").await;
        (r.status == 200).then_some(())
    })
    .await;
    assert_eq!(client::get(gateway.admin, "/readyz").await.status, 200);
    // What was acknowledged is delivered, once.
    eventually_async(WAIT, || async {
        let seen = deliveries(&upstream.received());
        (seen.get("before") == Some(&1) && seen.get("after") == Some(&1)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_database_could_not_take_is_recorded_when_it_returns_not_sent_again() {
    let db = PgServer::primary().await;
    // The upstream answers 200 only once the database has gone silent: the attempt is made,
    // and its result has nowhere to go.
    let upstream = Upstream::start(|_, _| Reply::Delayed(Duration::from_secs(3), 200)).await;
    let gateway = Gateway::start(&config(&db.url(), &upstream.url("/"), "")).await;
    assert_eq!(post(&gateway, "made-once").await.status, 200);
    upstream.wait_for(1, WAIT).await;
    // Silent rather than crashed: a crash may also lose the claim, committed without waiting
    // for the disk, and the delivery is then made again by design (at least once).
    db.signal_all("-STOP");
    let resumed = scopeguard(&db);
    eventually_async(WAIT, || async {
        gateway
            .logs()
            .contains("cannot record delivery")
            .then_some(())
    })
    .await;

    drop(resumed);
    drained(&db).await;
    let seen = deliveries(&upstream.received());
    assert_eq!(
        seen.get("made-once"),
        Some(&1),
        "{seen:?}\n{}",
        gateway.logs()
    );
    assert!(dead_letters(&gateway).await.is_empty());
    gateway
        .wait_metric(
            "actiongate_deliveries_total{action=\"act\",outcome=\"delivered\",upstream=\"up\"}",
            1.0,
        )
        .await;
}

/// The store on `db` as a gateway opens it, from a test's runtime.
async fn open_store(db: &PgServer) -> Postgres {
    let url = db.url();
    tokio::task::spawn_blocking(move || {
        let metrics = Arc::new(actiongate::metrics::Metrics::new());
        Postgres::open(&url, 2, Duration::from_secs(600), metrics, WAIT)
    })
    .await
    .expect("open")
    .expect("the store opens")
}

/// The upstream timeout the claims below cover: the default. Its lease is 30 s, and an attempt
/// is sent only with 15 s of it left (the timeout and 5 s for clock skew).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Stores one event for `act` with the delivery `act/up`, and claims that delivery.
async fn claim_one(store: &Postgres, event_id: &str) -> u64 {
    let appended = store
        .append(
            NewEvent {
                action: Arc::from("act"),
                event_id: event_id.to_string(),
                body: event_with_id(event_id).into(),
                upstreams: vec![Arc::from("up")],
            },
            None,
        )
        .await
        .expect("append");
    assert!(matches!(appended, Appended::Accepted(_)), "{appended:?}");
    let claimed = store
        .claim("act/up", now_ms(), 10, &IdSet::default(), ATTEMPT_TIMEOUT)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    claimed[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_stops_sending_what_its_claim_no_longer_covers() {
    let mut db = PgServer::primary().await;
    let store = open_store(&db).await;

    // Taken by another instance (its clock saw the lease run out): the next renewal finds
    // the claim gone, and this instance must not send it.
    let taken = claim_one(&store, "taken-elsewhere").await;
    assert!(store.may_send(taken, ATTEMPT_TIMEOUT));
    db.psql(
        "actiongate",
        &format!("UPDATE actiongate_deliveries SET leased_by = 'elsewhere' WHERE id = {taken}"),
    );
    // At the next renewal (every 5 s), not when an unrenewed claim would stop (15 s).
    eventually_async(Duration::from_secs(12), || async {
        (!store.may_send(taken, ATTEMPT_TIMEOUT)).then_some(())
    })
    .await;

    // Renewed while the database answers: still sendable past the point where an unrenewed
    // claim would have stopped.
    let held = claim_one(&store, "held").await;
    tokio::time::sleep(Duration::from_secs(22)).await;
    assert!(
        store.may_send(held, ATTEMPT_TIMEOUT),
        "a renewed claim ran out"
    );

    // The database unreachable: no renewal, and past the margin nothing is sent, before any
    // other instance could take it.
    db.stop_immediate();
    let stopped = Instant::now();
    eventually_async(WAIT, || async {
        (!store.may_send(held, ATTEMPT_TIMEOUT)).then_some(())
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "still sendable {:?} after the database went away",
        stopped.elapsed()
    );
    drop(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_with_a_newer_schema_is_refused_at_start() {
    let db = PgServer::primary().await;
    let upstream = Upstream::ok().await;
    let yaml = config(&db.url(), &upstream.url("/"), "");
    let gateway = Gateway::start(&yaml).await;
    drop(gateway);
    db.psql("actiongate", "UPDATE actiongate_schema SET version = 99");
    let config_path = tempfile::tempdir().unwrap();
    let path = config_path.path().join("actiongate.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: [{{addr: \"127.0.0.1:{}\"}}]\nadmin: {{addr: \"127.0.0.1:{}\"}}\n{yaml}",
            support::free_port(),
            support::free_port()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_actiongate"))
        .arg("-c")
        .arg(&path)
        .current_dir(config_path.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("schema version 99, newer than this build's (1)"),
        "{stderr}"
    );
}
