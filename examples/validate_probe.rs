//! Runs payload validation in a loop on the full fixture: a perf/callgrind target.
use actiongate::config::DriftPolicy;
use actiongate::ingress::event_type::EventTypes;
use actiongate::ingress::payload;

fn main() {
    let body = include_bytes!("../tests/fixtures/custom_action_full.json");
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let started = std::time::Instant::now();
    let mut total = 0;
    let events = EventTypes::default();
    for _ in 0..n {
        total += payload::validate(std::hint::black_box(body), DriftPolicy::Accept, &events)
            .map(|v| v.event_id().len())
            .unwrap_or(0);
    }
    println!(
        "{n} validations in {:?}: {:?} each ({total})",
        started.elapsed(),
        started.elapsed() / n
    );
}
