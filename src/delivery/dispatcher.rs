//! The dispatcher: one lane per (action, upstream) takes due deliveries from the spool and runs
//! attempts, at most `concurrency` at a time per lane.
//!
//! Lanes share nothing but the spool, so a slow or dead upstream fills only its own lane. A
//! delivery stays in the spool's due queue while its attempt runs (the lane remembers it is
//! in flight); only the attempt's recorded result moves or removes it. A crash mid-attempt
//! therefore leaves it due, and it is tried again after the restart: at least once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::retry::{AttemptOutcome, Decision};
use super::{client, request, DeliveryOutcome};
use crate::config::{Config, Upstream};
use crate::lifecycle::Lifecycle;
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::spool::{lane_key, now_ms, Finish, Spool};

/// Longest a lane sleeps without looking at the spool, as a safety net for missed wake-ups.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Pause after a spool read error before trying again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Runs every lane; a Pingora background service.
pub struct Dispatcher {
    spool: Spool,
    lanes: Vec<Arc<Lane>>,
    lifecycle: Arc<Lifecycle>,
}

struct Lane {
    key: String,
    action: String,
    upstream: Upstream,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    in_flight: Mutex<HashSet<u64>>,
    /// Woken when an attempt of this lane finishes (a permit is free again).
    finished: Notify,
    metrics: UpstreamMetrics,
}

impl Dispatcher {
    pub fn new(
        config: &Config,
        spool: Spool,
        metrics: &Metrics,
        lifecycle: Arc<Lifecycle>,
    ) -> Result<Dispatcher, String> {
        let shared = client::build(None)?;
        let mut lanes = Vec::new();
        for action in &config.actions {
            for upstream in &action.upstreams {
                let client = if client::needs_own_client(upstream) {
                    client::build(Some(upstream))
                        .map_err(|e| format!("{}/{}: {e}", action.name, upstream.name))?
                } else {
                    shared.clone()
                };
                lanes.push(Arc::new(Lane {
                    key: lane_key(&action.name, &upstream.name),
                    action: action.name.clone(),
                    upstream: upstream.clone(),
                    client,
                    permits: Arc::new(Semaphore::new(upstream.concurrency)),
                    in_flight: Mutex::new(HashSet::new()),
                    finished: Notify::new(),
                    metrics: metrics.for_upstream(&action.name, &upstream.name),
                }));
            }
        }
        Ok(Dispatcher {
            spool,
            lanes,
            lifecycle,
        })
    }

    /// Runs the lanes until draining begins. Attempts in flight then carry on by themselves
    /// for the grace period.
    pub async fn run(&self) {
        self.dead_letter_orphans().await;
        let mut tasks = tokio::task::JoinSet::new();
        for lane in &self.lanes {
            tasks.spawn(run_lane(
                lane.clone(),
                self.spool.clone(),
                self.lifecycle.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Deliveries whose (action, upstream) left the config cannot be sent anywhere: they go
    /// to dead letters, where an operator sees them, rather than waiting forever.
    async fn dead_letter_orphans(&self) {
        let known: HashSet<&str> = self.lanes.iter().map(|l| l.key.as_str()).collect();
        let lanes = match self.spool.pending_lanes() {
            Ok(lanes) => lanes,
            Err(e) => {
                log::error!("cannot list pending deliveries: {e}");
                return;
            }
        };
        for lane in lanes.keys().filter(|l| !known.contains(l.as_str())) {
            let ids = self
                .spool
                .due(lane, u64::MAX, usize::MAX, &HashSet::new())
                .unwrap_or_default();
            log::warn!(
                "{} deliveries for {lane}, which is no longer configured, go to dead letters",
                ids.len()
            );
            for id in ids {
                let finish = Finish::Dead {
                    at_ms: now_ms(),
                    error: format!("{lane} is no longer configured"),
                    status: None,
                    attempted: false,
                };
                if let Err(e) = self.spool.finish(id, finish).await {
                    log::error!("cannot dead-letter delivery {id}: {e}");
                }
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Dispatcher {
    async fn start(&self, _shutdown: ShutdownWatch) {
        // Lanes stop on the lifecycle's drain, which begins before Pingora's shutdown watch
        // fires, so the watch is not needed here.
        self.run().await;
    }
}

async fn run_lane(lane: Arc<Lane>, spool: Spool, lifecycle: Arc<Lifecycle>) {
    loop {
        if lifecycle.is_draining() {
            return;
        }
        if spool.failure().is_some() {
            // Results could not be recorded, so every attempt would be made again at once:
            // hold off rather than hammer the upstream (the failure is logged and in /readyz).
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        }
        // Register for wake-ups before looking, so that a commit in between is not missed.
        let work = spool.work_notified();
        let finished = lane.finished.notified();
        tokio::pin!(work, finished);
        work.as_mut().enable();
        finished.as_mut().enable();

        let now = now_ms();
        let free = lane.permits.available_permits();
        // What is in flight, read once per pass; ids started below are added to it.
        let mut skip = lane.in_flight_ids();
        if free > 0 {
            match spool.due(&lane.key, now, free, &skip) {
                Ok(ids) => {
                    for id in ids {
                        let Ok(permit) = lane.permits.clone().try_acquire_owned() else {
                            break;
                        };
                        lane.mark_in_flight(id);
                        skip.insert(id);
                        tokio::spawn(attempt_task(
                            lane.clone(),
                            spool.clone(),
                            lifecycle.clone(),
                            id,
                            permit,
                        ));
                    }
                }
                Err(e) => {
                    log::error!("lane {}: cannot read due deliveries: {e}", lane.key);
                    tokio::time::sleep(ERROR_PAUSE).await;
                    continue;
                }
            }
        }

        // Sleep until the next delivery is due, new work arrives, or a permit frees up.
        let wait = if lane.permits.available_permits() > 0 {
            match spool.next_due_ms(&lane.key, &skip) {
                Ok(Some(due)) => {
                    Duration::from_millis(due.saturating_sub(now_ms()).max(1)).min(IDLE_POLL)
                }
                Ok(None) => IDLE_POLL,
                Err(_) => ERROR_PAUSE,
            }
        } else {
            IDLE_POLL
        };
        tokio::select! {
            _ = &mut work => {}
            _ = &mut finished => {}
            _ = tokio::time::sleep(wait) => {}
            _ = lifecycle.draining() => return,
        }
    }
}

impl Lane {
    fn in_flight_ids(&self) -> HashSet<u64> {
        self.in_flight.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn mark_in_flight(&self, id: u64) {
        if let Ok(mut set) = self.in_flight.lock() {
            set.insert(id);
        }
    }

    fn clear_in_flight(&self, id: u64) {
        if let Ok(mut set) = self.in_flight.lock() {
            set.remove(&id);
        }
    }
}

async fn attempt_task(
    lane: Arc<Lane>,
    spool: Spool,
    lifecycle: Arc<Lifecycle>,
    id: u64,
    permit: OwnedSemaphorePermit,
) {
    let in_flight = lifecycle.delivery();
    deliver(&lane, &spool, id).await;
    lane.clear_in_flight(id);
    drop(permit);
    drop(in_flight);
    lane.finished.notify_waiters();
}

/// One step for delivery `id`: skip it, or attempt it and record the result.
async fn deliver(lane: &Lane, spool: &Spool, id: u64) {
    let upstream = &lane.upstream;
    let (record, raw) = match spool.load(id) {
        Ok(Some(found)) => found,
        Ok(None) => return, // finished meanwhile (e.g. replayed and delivered)
        Err(e) => {
            log::error!("lane {}: cannot load delivery {id}: {e}", lane.key);
            tokio::time::sleep(ERROR_PAUSE).await;
            return;
        }
    };
    let payload = if request::needs_payload(upstream) {
        match serde_json::from_slice(&raw) {
            Ok(value) => Some(value),
            Err(e) => {
                // Cannot happen for events the ingress validated; say so loudly if it does.
                record_finish(
                    lane,
                    spool,
                    id,
                    Finish::Dead {
                        at_ms: now_ms(),
                        error: format!("stored payload is not JSON: {e}"),
                        status: None,
                        attempted: false,
                    },
                    DeliveryOutcome::DeadLettered,
                    None,
                )
                .await;
                return;
            }
        }
    } else {
        None
    };
    if let (Some(when), Some(payload)) = (&upstream.when, &payload) {
        if !when.matches(payload) {
            log::info!(
                target: "actiongate::delivery",
                action = lane.action.as_str(),
                upstream = upstream.name.as_str(),
                event_id = record.event_id.as_str(),
                decision = "skipped";
                "when did not match"
            );
            record_finish(
                lane,
                spool,
                id,
                Finish::Skipped,
                DeliveryOutcome::Skipped,
                None,
            )
            .await;
            return;
        }
    }

    let attempt = record.attempts + 1;
    let headers = request::headers(
        upstream,
        &lane.action,
        &record.event_id,
        attempt,
        payload.as_ref(),
    );
    let body = request::body(upstream, &raw, payload.as_ref());
    let url = request::url(upstream, payload.as_ref());
    let started = Instant::now();
    let (outcome, description) = client::attempt(&lane.client, upstream, url, headers, body).await;
    let took = started.elapsed();
    lane.metrics.attempt_duration.observe(took.as_secs_f64());

    let status = match &outcome {
        AttemptOutcome::Status { status, .. } => Some(*status),
        AttemptOutcome::Transport(_) => None,
    };
    let at_ms = now_ms();
    let decision = upstream.retry.decide(attempt, &outcome, fastrand::f64());
    log::info!(
        target: "actiongate::delivery",
        action = lane.action.as_str(),
        upstream = upstream.name.as_str(),
        event_id = record.event_id.as_str(),
        attempt = attempt,
        status = status.unwrap_or(0),
        result = description.as_str(),
        decision = match decision {
            Decision::Delivered => "delivered",
            Decision::Retry(_) => "retry",
            Decision::DeadLetter => "dead_letter",
        },
        duration_ms = took.as_secs_f64() * 1000.0;
        "delivery attempt"
    );
    let (finish, label) = match decision {
        Decision::Delivered => (
            Finish::Delivered {
                at_ms,
                status: status.unwrap_or(200),
            },
            DeliveryOutcome::Delivered,
        ),
        Decision::Retry(wait) => (
            Finish::Retry {
                at_ms,
                due_ms: at_ms.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
                error: description,
                status,
            },
            DeliveryOutcome::Retried,
        ),
        Decision::DeadLetter => {
            let error = if attempt >= upstream.retry.attempts
                && status.is_none_or(crate::delivery::retry::is_retryable_status)
            {
                format!("{description} (after {attempt} attempts)")
            } else {
                description
            };
            (
                Finish::Dead {
                    at_ms,
                    error,
                    status,
                    attempted: true,
                },
                DeliveryOutcome::DeadLettered,
            )
        }
    };
    let lag =
        (label == DeliveryOutcome::Delivered).then(|| at_ms.saturating_sub(record.accepted_ms));
    record_finish(lane, spool, id, finish, label, lag).await;
}

async fn record_finish(
    lane: &Lane,
    spool: &Spool,
    id: u64,
    finish: Finish,
    outcome: DeliveryOutcome,
    lag_ms: Option<u64>,
) {
    match spool.finish(id, finish).await {
        Ok(()) => {
            lane.metrics.delivery(outcome);
            if let Some(lag) = lag_ms {
                lane.metrics.lag.observe(lag as f64 / 1000.0);
            }
        }
        // The delivery stays due as it was and is tried again: at least once.
        Err(e) => log::error!("lane {}: cannot record delivery {id}: {e}", lane.key),
    }
}
