//! Micro-benchmarks of the hot paths: payload validation, the allowlist check, template
//! rendering, a delivery's payload parse, and spool appends (group commit, with and without
//! fsync).
//!
//! Run: `cargo bench --bench micro`. Numbers and the machine are recorded in BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use actiongate::config::{Config, DriftPolicy};
use actiongate::delivery::projection::Projection;
use actiongate::delivery::template::{Template, ValueMapping};
use actiongate::ingress::allowlist::IpSet;
use actiongate::ingress::event_type::EventTypes;
use actiongate::ingress::{client_addr, payload};
use actiongate::spool::{Commit, Spool};
use actiongate::store::NewEvent;

const FULL: &[u8] = include_bytes!("../tests/fixtures/custom_action_full.json");

/// The status-page template of conf/examples/status-page.yaml.
const STATUS_PAGE: &str = r#"{"incident": {"name": "{{incident.title}}", "status": "investigating",
    "impact": "{{incident.incident_severity}}", "component": "{{incident.labels.service}}",
    "body": "We are investigating degraded {{incident.labels.service}} ({{incident.num}})."}}"#;

fn validate(c: &mut Criterion) {
    let mut group = c.benchmark_group("payload");
    group.throughput(Throughput::Bytes(FULL.len() as u64));
    let events = EventTypes::default();
    group.bench_function("validate_full_fixture", |b| {
        b.iter(|| {
            payload::validate(black_box(FULL), DriftPolicy::Accept, &events)
                .map(|v| v.event_id().len())
        })
    });
    // For comparison: what building a JSON tree alone costs (the validator does not).
    group.bench_function("serde_json_value_parse_full_fixture", |b| {
        b.iter(|| {
            serde_json::from_slice::<serde_json::Value>(black_box(FULL)).map(|v| v.is_object())
        })
    });
    group.finish();
}

fn allowlist(c: &mut Criterion) {
    let flashduty = IpSet::new(
        actiongate::config::FLASHDUTY_SOURCES
            .iter()
            .chain(["10.20.0.0/16", "2001:db8::/32"].iter())
            .map(|c| c.parse().unwrap()),
    );
    let trusted = IpSet::new(["10.0.0.0/8".parse().unwrap()]);
    let peer = "10.0.0.1".parse().unwrap();
    let xff: &[&[u8]] = &[b"198.51.100.1, 47.94.193.81"];
    c.bench_function("address/xff_walk_and_allowlist", |b| {
        b.iter(|| {
            let client = client_addr::resolve(black_box(peer), xff.iter().copied(), &trusted);
            flashduty.contains(client)
        })
    });
}

fn render(c: &mut Criterion) {
    let template = Template::parse_json(STATUS_PAGE).unwrap();
    let payload: serde_json::Value = serde_json::from_slice(FULL).unwrap();
    let mapping = ValueMapping::new(
        [(
            "incident.incident_severity".to_string(),
            [("Critical".to_string(), "major".to_string())]
                .into_iter()
                .collect(),
        )]
        .into_iter()
        .collect(),
    );
    let mut out = Vec::with_capacity(512);
    c.bench_function("template/render_status_page", |b| {
        b.iter(|| {
            out.clear();
            template.render(black_box(&payload), &mapping, &mut out);
            out.len()
        })
    });
}

/// What a delivery parses of its stored payload: the projection of the status-page template's
/// paths, against the whole tree it used to build.
fn delivery_parse(c: &mut Criterion) {
    let template = Template::parse_json(STATUS_PAGE).unwrap();
    let projection = Projection::new(template.paths());
    let mut group = c.benchmark_group("delivery");
    group.throughput(Throughput::Bytes(FULL.len() as u64));
    group.bench_function("projected_parse_status_page_paths", |b| {
        b.iter(|| projection.parse(black_box(FULL)).map(|v| v.is_object()))
    });
    group.bench_function("full_parse_for_comparison", |b| {
        b.iter(|| {
            serde_json::from_slice::<serde_json::Value>(black_box(FULL)).map(|v| v.is_object())
        })
    });
    group.finish();
}

fn spool(c: &mut Criterion) {
    let config = Config::from_yaml(
        "listen: [{addr: \"127.0.0.1:1\"}]\nactions:\n  - {name: a, path: /a, upstreams: [{name: u, url: \"http://127.0.0.1:1/\"}]}\n",
        &|_| None,
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("spool");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for (name, commit) in [("fsync", Commit::Durable), ("no_fsync", Commit::Unsafe)] {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_with(
            dir.path(),
            Duration::from_secs(3600),
            Arc::new(actiongate::metrics_for(&config)),
            commit,
        )
        .unwrap();
        let mut n = 0u64;
        let mut event = move || {
            n += 1;
            NewEvent {
                action: Arc::from("a"),
                event_id: format!("e{n}"),
                body: Bytes::from_static(FULL),
                upstreams: vec![Arc::from("u")],
            }
        };
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("append_one_{name}"), |b| {
            b.iter(|| runtime.block_on(spool.append(event())).unwrap())
        });
        // 32 concurrent appenders, as under load: group commit shares each fsync.
        group.throughput(Throughput::Elements(32));
        group.bench_function(format!("append_32_concurrent_{name}"), |b| {
            b.iter_custom(|iters| {
                let events: Vec<Vec<NewEvent>> = (0..iters)
                    .map(|_| (0..32).map(|_| event()).collect())
                    .collect();
                let started = Instant::now();
                runtime.block_on(async {
                    for batch in events {
                        let handles: Vec<_> = batch
                            .into_iter()
                            .map(|e| {
                                let spool = spool.clone();
                                tokio::spawn(async move { spool.append(e).await })
                            })
                            .collect();
                        for h in handles {
                            h.await.unwrap().unwrap();
                        }
                    }
                });
                started.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, validate, allowlist, render, delivery_parse, spool);
criterion_main!(benches);
