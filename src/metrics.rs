//! Every Prometheus metric actiongate exports, defined in one place.
//!
//! All series for the configured actions and upstreams are created at start-up with value 0,
//! so that dashboards and alert rules never meet an absent series. The request path holds
//! pre-resolved handles ([`ActionMetrics`]) and never looks up labels or takes a lock.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::delivery::DeliveryOutcome;
use crate::ingress::answer::Outcome;

/// `action` label for requests that matched no action.
pub const NO_ACTION: &str = "(none)";

/// Acks must resolve 100 µs to 1 s (Flashduty's deadline).
const ACK_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
];
/// Delivery attempts resolve 1 ms to 60 s.
const DELIVERY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Lag spans retries too: up to hours.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0, 3600.0, 21600.0,
];

/// The registry and every metric family in it.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    ack: HistogramVec,
    deliveries: IntCounterVec,
    attempt_duration: HistogramVec,
    lag: HistogramVec,
    claims_lost: IntCounterVec,
    pending: IntGaugeVec,
    dead: IntGaugeVec,
    drift: IntCounterVec,
    forbidden_with_secret: IntCounterVec,
    in_flight: IntGaugeVec,
    reloads: IntCounterVec,
    reload_ok: IntGauge,
    commit_duration: Histogram,
    commit_batch: Histogram,
    spool_segments: IntGauge,
    spool_refusing: IntGaugeVec,
    connections_refused: IntCounterVec,
    connections_open: IntGauge,
}

/// Why a connection was closed by the gateway, as `actiongate_connections_refused_total{reason}`
/// says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// No action allows the peer (and no fallback takes other traffic).
    Source,
    /// `limits.max_connections` reached.
    Limit,
    /// `limits.max_connections_per_source` reached for the peer.
    PerSource,
    /// The first request head did not arrive within `limits.header_timeout`.
    HeaderTimeout,
    /// The next request head did not arrive within `limits.idle_timeout`.
    IdleTimeout,
}

impl ConnectionRefusal {
    const ALL: [ConnectionRefusal; 5] = [
        ConnectionRefusal::Source,
        ConnectionRefusal::Limit,
        ConnectionRefusal::PerSource,
        ConnectionRefusal::HeaderTimeout,
        ConnectionRefusal::IdleTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ConnectionRefusal::Source => "source",
            ConnectionRefusal::Limit => "limit",
            ConnectionRefusal::PerSource => "per_source",
            ConnectionRefusal::HeaderTimeout => "header_timeout",
            ConnectionRefusal::IdleTimeout => "idle_timeout",
        }
    }
}

/// Why the spool refuses new events, as `actiongate_spool_refusing{reason}` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolRefusal {
    /// The filesystem is full; passes by itself.
    DiskFull,
    /// A write or fsync failed; needs a restart.
    Failed,
    /// Cluster mode: the database is unreachable or read-only; passes by itself.
    DatabaseUnavailable,
}

impl SpoolRefusal {
    const ALL: [SpoolRefusal; 3] = [
        SpoolRefusal::DiskFull,
        SpoolRefusal::Failed,
        SpoolRefusal::DatabaseUnavailable,
    ];

    fn label(self) -> &'static str {
        match self {
            SpoolRefusal::DiskFull => "disk_full",
            SpoolRefusal::Failed => "failed",
            SpoolRefusal::DatabaseUnavailable => "database_unavailable",
        }
    }
}

/// Handles for one action's request metrics, resolved once.
#[derive(Clone)]
pub struct ActionMetrics {
    /// One counter per outcome an action's request can have (all but `unknown_action`).
    requests: Vec<(Outcome, IntCounter)>,
    ack: Histogram,
    /// Refused by address although the secret was right: Flashduty likely moved.
    pub forbidden_with_secret: IntCounter,
}

impl ActionMetrics {
    pub fn request(&self, outcome: Outcome) {
        if let Some((_, counter)) = self.requests.iter().find(|(o, _)| *o == outcome) {
            counter.inc();
        }
    }

    pub fn ack(&self, elapsed: Duration) {
        self.ack.observe(elapsed.as_secs_f64());
    }
}

/// Handles for one (action, upstream)'s delivery metrics, resolved once.
#[derive(Clone)]
pub struct UpstreamMetrics {
    outcomes: Vec<IntCounter>,
    pub attempt_duration: Histogram,
    pub lag: Histogram,
    /// Attempts not sent in cluster mode: the claim was lost or could not be renewed in time.
    pub claims_lost: IntCounter,
}

impl UpstreamMetrics {
    pub fn delivery(&self, outcome: DeliveryOutcome) {
        if let Some(counter) = DeliveryOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .and_then(|i| self.outcomes.get(i))
        {
            counter.inc();
        }
    }
}

fn must<T>(result: prometheus::Result<T>) -> T {
    // Metric definitions are constants of this file; an error here is a programming error
    // caught by the first test run, never something input can cause.
    result.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates the registry with the series that name no action at 0; the actions' own come
    /// from [`Metrics::declare_action`] (see [`crate::metrics_for`]).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = must(HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            ));
            must(registry.register(Box::new(h.clone())));
            h
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let commit_duration = must(Histogram::with_opts(
            HistogramOpts::new(
                "actiongate_spool_commit_duration_seconds",
                "Time to apply and fsync one spool batch.",
            )
            .buckets(ACK_BUCKETS.to_vec()),
        ));
        must(registry.register(Box::new(commit_duration.clone())));
        let commit_batch = must(Histogram::with_opts(
            HistogramOpts::new(
                "actiongate_spool_commit_batch_size",
                "Changes committed together in one spool fsync (group commit).",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
            ]),
        ));
        must(registry.register(Box::new(commit_batch.clone())));

        let metrics = Metrics {
            requests: counter(
                "actiongate_requests_total",
                "Requests to action paths, by outcome.",
                &["action", "outcome"],
            ),
            ack: histogram(
                "actiongate_ack_duration_seconds",
                "From the request headers to the last byte of the 200, per action.",
                &["action"],
                ACK_BUCKETS,
            ),
            deliveries: counter(
                "actiongate_deliveries_total",
                "Delivery attempts and decisions, by outcome.",
                &["action", "upstream", "outcome"],
            ),
            attempt_duration: histogram(
                "actiongate_delivery_attempt_duration_seconds",
                "Duration of one delivery attempt.",
                &["action", "upstream"],
                DELIVERY_BUCKETS,
            ),
            lag: histogram(
                "actiongate_delivery_lag_seconds",
                "From acceptance to successful delivery.",
                &["action", "upstream"],
                LAG_BUCKETS,
            ),
            claims_lost: counter(
                "actiongate_claims_lost_total",
                "Attempts not sent because this instance's claim on the delivery was lost or \
                 could not be renewed in time (cluster mode; another instance sends it).",
                &["action", "upstream"],
            ),
            pending: gauge(
                "actiongate_pending_deliveries",
                "Deliveries waiting in the spool (due or backing off).",
                &["upstream"],
            ),
            dead: gauge(
                "actiongate_dead_letters",
                "Deliveries in dead letters, waiting for an operator.",
                &["upstream"],
            ),
            drift: counter(
                "actiongate_schema_drift_total",
                "Unknown values of documented payload enums, by field.",
                &["field"],
            ),
            forbidden_with_secret: counter(
                "actiongate_forbidden_source_with_secret_total",
                "Requests refused for their source address that carried the right secret: a sign \
                 that Flashduty pushes from an address the allowlist does not know.",
                &["action"],
            ),
            in_flight: gauge(
                "actiongate_in_flight",
                "Action requests and delivery attempts in progress, read at scrape time.",
                &["kind"],
            ),
            reloads: counter(
                "actiongate_config_reloads_total",
                "Configuration reloads (SIGHUP), applied or refused.",
                &["result"],
            ),
            reload_ok: {
                let g = must(IntGauge::new(
                    "actiongate_config_last_reload_successful",
                    "1 while the running configuration is the file's last version; 0 after a \
                     reload was refused, until one is applied.",
                ));
                must(registry.register(Box::new(g.clone())));
                g.set(1);
                g
            },
            commit_duration,
            commit_batch,
            spool_segments: {
                let g = must(IntGauge::new(
                    "actiongate_spool_segments",
                    "Segment files of the spool on disk. Each dead letter can keep its segment; \
                     otherwise finished segments are deleted.",
                ));
                must(registry.register(Box::new(g.clone())));
                g
            },
            connections_open: {
                let g = must(IntGauge::new(
                    "actiongate_connections",
                    "Open connections on the main listeners (capped by limits.max_connections).",
                ));
                must(registry.register(Box::new(g.clone())));
                g
            },
            connections_refused: counter(
                "actiongate_connections_refused_total",
                "Connections the gateway closed: reason=source (allowed by no action, closed \
                 at accept), limit (limits.max_connections), per_source \
                 (limits.max_connections_per_source), header_timeout, idle_timeout.",
                &["reason"],
            ),
            spool_refusing: gauge(
                "actiongate_spool_refusing",
                "1 while the spool refuses new events: reason=disk_full passes by itself once \
                 space is freed, reason=failed (a write or fsync failed) needs a restart.",
                &["reason"],
            ),
            registry,
        };
        for reason in ConnectionRefusal::ALL {
            metrics
                .connections_refused
                .with_label_values(&[reason.label()]);
        }
        for reason in SpoolRefusal::ALL {
            metrics.spool_refusing.with_label_values(&[reason.label()]);
        }
        for result in ["applied", "refused"] {
            metrics.reloads.with_label_values(&[result]);
        }
        // Only the series that can move: a request without an action is only ever unknown,
        // and an action's request never is (see for_action).
        metrics
            .requests
            .with_label_values(&[NO_ACTION, Outcome::UnknownAction.label()]);
        metrics
    }

    /// Creates the series of one action and of its upstreams at 0, so that dashboards and
    /// alert rules never meet an absent series; `guarded` for an action with guards.
    pub fn declare_action(&self, action: &str, guarded: bool, upstreams: &[&str]) {
        self.for_action(action, guarded);
        for upstream in upstreams {
            self.for_upstream(action, upstream);
            self.pending_deliveries(upstream);
            self.dead_letters(upstream);
        }
    }

    /// Creates `actiongate_schema_drift_total{field}` at 0 for each of `fields`.
    pub fn declare_drift_fields(&self, fields: &[&str]) {
        for field in fields {
            self.drift.with_label_values(&[field]);
        }
    }

    /// Request-path handles for `action` (creating its series); `guarded` only for an action
    /// with guards.
    pub fn for_action(&self, action: &str, guarded: bool) -> ActionMetrics {
        ActionMetrics {
            requests: Outcome::ALL
                .into_iter()
                .filter(|o| *o != Outcome::UnknownAction && (guarded || *o != Outcome::Guarded))
                .map(|o| (o, self.requests.with_label_values(&[action, o.label()])))
                .collect(),
            ack: self.ack.with_label_values(&[action]),
            forbidden_with_secret: self.forbidden_with_secret.with_label_values(&[action]),
        }
    }

    /// Delivery handles for (`action`, `upstream`) (creating its series).
    pub fn for_upstream(&self, action: &str, upstream: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            outcomes: DeliveryOutcome::ALL
                .iter()
                .map(|o| {
                    self.deliveries
                        .with_label_values(&[action, upstream, o.label()])
                })
                .collect(),
            attempt_duration: self.attempt_duration.with_label_values(&[action, upstream]),
            lag: self.lag.with_label_values(&[action, upstream]),
            claims_lost: self.claims_lost.with_label_values(&[action, upstream]),
        }
    }

    /// A request to a path that is no action (and no fallback took it).
    pub fn unknown_action(&self) {
        self.requests
            .with_label_values(&[NO_ACTION, Outcome::UnknownAction.label()])
            .inc();
    }

    pub fn pending_deliveries(&self, upstream: &str) -> IntGauge {
        self.pending.with_label_values(&[upstream])
    }

    pub fn dead_letters(&self, upstream: &str) -> IntGauge {
        self.dead.with_label_values(&[upstream])
    }

    /// Counts an undocumented enum value in payload field `field`.
    pub fn schema_drift(&self, field: &str) {
        self.drift.with_label_values(&[field]).inc();
    }

    /// Sets the in-flight gauges (called by the admin listener before each scrape).
    pub fn set_in_flight(&self, requests: usize, deliveries: usize) {
        self.in_flight
            .with_label_values(&["request"])
            .set(requests as i64);
        self.in_flight
            .with_label_values(&["delivery"])
            .set(deliveries as i64);
    }

    /// Counts a SIGHUP reload and whether the running config now matches the file.
    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.with_label_values(&[result]).inc();
        self.reload_ok.set(i64::from(applied));
    }

    /// One more (`true`) or one fewer open connection.
    pub fn connection_open(&self, opened: bool) {
        if opened {
            self.connections_open.inc();
        } else {
            self.connections_open.dec();
        }
    }

    pub fn connection_refused(&self, why: ConnectionRefusal) {
        self.connections_refused
            .with_label_values(&[why.label()])
            .inc();
    }

    pub fn spool_segments(&self, count: usize) {
        self.spool_segments.set(count as i64);
    }

    pub fn spool_refusing(&self, reason: SpoolRefusal, refusing: bool) {
        self.spool_refusing
            .with_label_values(&[reason.label()])
            .set(i64::from(refusing));
    }

    pub fn observe_spool_commit(&self, batch: usize, took: Duration) {
        self.commit_batch.observe(batch as f64);
        self.commit_duration.observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding our own well-formed families into a Vec does not fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
