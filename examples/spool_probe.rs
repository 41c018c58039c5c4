//! Times spool appends one at a time, to see where a commit's time goes (strace/perf target).
use std::sync::Arc;
use std::time::{Duration, Instant};

use actiongate::config::Config;
use actiongate::spool::{Commit, Spool};
use actiongate::store::NewEvent;

#[tokio::main]
async fn main() {
    let config = Config::from_yaml(
        "listen: [{addr: \"127.0.0.1:1\"}]\nactions:\n  - {name: a, path: /a, upstreams: [{name: u, url: \"http://127.0.0.1:1/\"}]}\n",
        &|_| None,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let commit = if std::env::args().any(|a| a == "--unsafe") {
        Commit::Unsafe
    } else {
        Commit::Durable
    };
    let spool = Spool::open_with(
        dir.path(),
        Duration::from_secs(3600),
        Arc::new(actiongate::metrics_for(&config)),
        commit,
    )
    .unwrap();
    let body = if std::env::args().any(|a| a == "--small") {
        bytes::Bytes::from_static(b"{}")
    } else {
        bytes::Bytes::from_static(include_bytes!("../tests/fixtures/custom_action_full.json"))
    };
    let n = 6400u32;
    let concurrency = 32;
    let started = Instant::now();
    for round in 0..n / concurrency {
        let tasks: Vec<_> = (0..concurrency)
            .map(|i| {
                let spool = spool.clone();
                let event = NewEvent {
                    action: Arc::from("a"),
                    event_id: format!("e{round}-{i}"),
                    body: body.clone(),
                    upstreams: vec![Arc::from("u")],
                };
                tokio::spawn(async move { spool.append(event).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    println!(
        "{n} appends, {concurrency} at a time, in {:?}: {:?} each",
        started.elapsed(),
        started.elapsed() / n
    );
}
