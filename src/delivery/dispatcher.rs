//! The dispatcher: one lane per (action, upstream) takes due deliveries from the spool and runs
//! attempts, at most `concurrency` at a time per lane.
//!
//! Lanes share nothing but the spool, so a slow or dead upstream fills only its own lane. A
//! delivery stays in the spool's due queue while its attempt runs (the lane remembers it is
//! in flight); only the attempt's recorded result moves or removes it. A crash mid-attempt
//! therefore leaves it due, and it is tried again after the restart: at least once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::runtime::Handle;
use tokio::sync::Notify;

use super::order::{Order, Place};
use super::projection::Projection;
use super::report::{self, Facts, Pace};
use super::retry::{AttemptOutcome, Decision};
use super::{client, request, DeliveryOutcome};
use crate::config::{Config, FlashdutyApi, ReportOutcome, Upstream, REPORT_UPSTREAM};
use crate::lifecycle::{wait_until, Lifecycle};
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::store::{lane_key, now_ms, DeliveryRecord, Finish, IdSet, NewEvent, Store};

/// Longest a lane sleeps without looking at the spool, as a safety net for missed wake-ups.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Pause after a spool read error before trying again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// How long the result of an attempt is offered to a store that cannot record it, before the
/// attempt is left to be made again: a database failover or restart fits well within.
const RECORD_FOR: Duration = Duration::from_secs(60);
const RECORD_PAUSE_MAX: Duration = Duration::from_secs(5);
/// How often deliveries for lanes that are no longer configured are looked for. A request
/// still running on the config before a reload can store one after its lane has let go.
const ORPHAN_SWEEP_EVERY: Duration = Duration::from_secs(2);
/// A sweep takes a lane's deliveries this many at a time, at most this many times a round.
const SWEEP_SLICE: usize = 1_000;
const SWEEP_PASSES: usize = 1_000;
/// An ordered lane learns due deliveries this many at a time (one load each).
const LEARN_BATCH: usize = 1_000;

/// Runs every lane. Shared by the background service that runs it and by reloads, which add,
/// change and retire lanes while it runs.
pub struct Dispatcher {
    store: Store,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
    /// The client (and so the connection pool) of every upstream with default TLS settings.
    shared_client: client::Client,
    /// Every lane whose task runs, retired ones included until they have let go.
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    /// Lanes whose deliveries are being dead-lettered. A lane configured again meanwhile is
    /// created held, so that it cannot send what is being dead-lettered. Locked after `lanes`.
    sweeping: Mutex<HashSet<String>>,
    /// Where lane tasks run; set when the service starts.
    runtime: OnceLock<Handle>,
    /// The one pace of every Open API call (`flashduty.rate`).
    pace: Arc<Pace>,
    /// Each reporting action's plan, for outcomes decided outside a lane (a sweep).
    reports: Mutex<HashMap<String, Arc<ReportPlan>>>,
}

/// The background service that runs a [`Dispatcher`].
pub struct DispatcherService(pub Arc<Dispatcher>);

/// A lane's settings, replaced as a whole on reload; an attempt uses the ones it started with.
struct LaneConf {
    upstream: Upstream,
    /// The upstream's URL as sent when its query is no template: parsed once, here.
    uri: http::Uri,
    client: client::Client,
    /// What the upstream's rules and templates read of a payload.
    projection: Projection,
    /// The action reports this lane's outcomes onto the incident.
    report: Option<Arc<ReportPlan>>,
    /// This lane delivers an action's reports: its events are Open API calls.
    flashduty: Option<Arc<FlashdutyApi>>,
}

/// How an action's outcomes become reports.
struct ReportPlan {
    plan: report::Plan,
    /// The report lane's metrics: an outcome that cannot be reported counts as skipped there.
    metrics: UpstreamMetrics,
}

struct Lane {
    key: String,
    action: String,
    conf: ArcSwap<LaneConf>,
    /// Deliveries with an attempt running; at most `upstream.concurrency` of them.
    in_flight: Mutex<IdSet>,
    /// Woken when an attempt finishes or the lane's settings change.
    changed: Notify,
    /// No longer configured: start no attempt, let the running ones finish.
    retired: AtomicBool,
    started: AtomicBool,
    /// Set once a retired lane has let go of its deliveries; its task then ends.
    stopped: AtomicBool,
    /// Start no attempt: the deliveries of a lane of the same name are being dead-lettered.
    held: AtomicBool,
    /// `order: event_time`: the lane's pending deliveries it has seen, by incident.
    order: Mutex<Option<Order>>,
    metrics: UpstreamMetrics,
}

/// Lane settings built from a new config, checked before anything is swapped.
pub struct Prepared {
    lanes: Vec<(String, String, LaneConf)>,
    rate: Option<u32>,
    reports: HashMap<String, Arc<ReportPlan>>,
}

impl Dispatcher {
    pub fn new(
        config: &Config,
        store: Store,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
    ) -> Result<Arc<Dispatcher>, String> {
        let dispatcher = Arc::new(Dispatcher {
            store,
            metrics,
            lifecycle,
            shared_client: client::build(None)?,
            lanes: Mutex::new(HashMap::new()),
            sweeping: Mutex::new(HashSet::new()),
            runtime: OnceLock::new(),
            pace: Arc::new(Pace::new(config.flashduty.as_ref().map_or(1, |f| f.rate))),
            reports: Mutex::new(HashMap::new()),
        });
        let prepared = dispatcher.prepare(config)?;
        dispatcher.apply(prepared);
        Ok(dispatcher)
    }

    /// Builds the lanes' settings for `config`; fails (changing nothing) if a client cannot be
    /// built, e.g. an upstream's `ca_file` became unreadable.
    pub fn prepare(&self, config: &Config) -> Result<Prepared, String> {
        let mut lanes = Vec::new();
        let mut reports = HashMap::new();
        let api = config.flashduty.clone().map(Arc::new);
        for action in &config.actions {
            let plan = action.report.as_ref().map(|report| {
                Arc::new(ReportPlan {
                    plan: report::Plan::new(report),
                    metrics: self.metrics.for_upstream(&action.name, REPORT_UPSTREAM),
                })
            });
            if let Some(plan) = &plan {
                reports.insert(action.name.clone(), plan.clone());
            }
            if let (Some(plan), Some(api)) = (&plan, &api) {
                let upstream = plan.plan.report.upstream.clone();
                let conf = LaneConf {
                    uri: request::uri(&upstream.url).map_err(|e| format!("flashduty: {e}"))?,
                    upstream,
                    client: self.shared_client.clone(),
                    projection: Projection::default(),
                    report: None,
                    flashduty: Some(api.clone()),
                };
                lanes.push((action.name.clone(), REPORT_UPSTREAM.to_string(), conf));
            }
            for upstream in &action.upstreams {
                let client = if client::needs_own_client(upstream) {
                    client::build(Some(upstream))
                        .map_err(|e| format!("{}/{}: {e}", action.name, upstream.name))?
                } else {
                    self.shared_client.clone()
                };
                let conf = LaneConf {
                    uri: request::uri(&upstream.url)
                        .map_err(|e| format!("{}/{}: {e}", action.name, upstream.name))?,
                    upstream: upstream.clone(),
                    client,
                    projection: Projection::for_upstream(upstream),
                    report: plan.clone(),
                    flashduty: None,
                };
                lanes.push((action.name.clone(), upstream.name.clone(), conf));
            }
        }
        Ok(Prepared {
            lanes,
            rate: config.flashduty.as_ref().map(|f| f.rate),
            reports,
        })
    }

    /// Puts `prepared` in force: new lanes start, existing ones take their new settings from
    /// their next attempt on, and lanes no longer configured are retired. Returns the keys of
    /// the lanes retired, for [`Dispatcher::let_go`].
    pub fn apply(self: &Arc<Self>, prepared: Prepared) -> Vec<String> {
        if let Some(rate) = prepared.rate {
            self.pace.set_rate(rate);
        }
        *self.reports.lock().unwrap_or_else(|e| e.into_inner()) = prepared.reports;
        let mut lanes = self.lanes();
        let mut configured = HashSet::new();
        for (action, upstream, conf) in prepared.lanes {
            let key = lane_key(&action, &upstream);
            configured.insert(key.clone());
            if let Some(lane) = lanes.get(&key) {
                lane.set_order(conf.upstream.order_window);
                lane.conf.store(Arc::new(conf));
                lane.retired.store(false, Ordering::Release);
                lane.changed.notify_waiters();
                continue;
            }
            let lane = Arc::new(Lane {
                order: Mutex::new(conf.upstream.order_window.map(|w| Order::new(millis(w)))),
                key: key.clone(),
                metrics: self.metrics.for_upstream(&action, &upstream),
                action,
                conf: ArcSwap::from_pointee(conf),
                in_flight: Mutex::new(IdSet::default()),
                changed: Notify::new(),
                retired: AtomicBool::new(false),
                started: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                held: AtomicBool::new(self.sweeping().contains(&key)),
            });
            lanes.insert(key, lane.clone());
            if let Some(runtime) = self.runtime.get() {
                self.start(runtime, lane);
            }
        }
        let mut retired = Vec::new();
        for (key, lane) in lanes.iter() {
            if !configured.contains(key) && !lane.retired.swap(true, Ordering::AcqRel) {
                lane.changed.notify_waiters();
                retired.push(key.clone());
            }
        }
        self.store.announce_lanes(configured.into_iter().collect());
        retired
    }

    /// Ends retired lanes once nothing can add to them: their running attempts have finished
    /// and the caller has made sure that no request still routes to them. What they still
    /// hold goes to dead letters, where an operator sees it, rather than waiting forever.
    pub async fn let_go(&self, keys: Vec<String>) {
        for key in keys {
            let Some(lane) = self.lanes().get(&key).cloned() else {
                continue;
            };
            lane.idle().await;
            {
                let mut lanes = self.lanes();
                // Configured again by a later reload: it carries on.
                if !lane.retired.load(Ordering::Acquire) {
                    continue;
                }
                lanes.remove(&key);
            }
            lane.stopped.store(true, Ordering::Release);
            lane.changed.notify_waiters();
            self.sweep(&key).await;
        }
    }

    /// Runs the lanes until draining begins. Attempts in flight then carry on by themselves
    /// for the grace period.
    pub async fn run(self: &Arc<Self>) {
        self.dead_letter_orphans().await;
        let runtime = self.runtime.get_or_init(Handle::current);
        let lanes: Vec<Arc<Lane>> = self.lanes().values().cloned().collect();
        for lane in lanes {
            self.start(runtime, lane);
        }
        loop {
            tokio::select! {
                _ = self.lifecycle.deliveries_stopping() => return,
                _ = tokio::time::sleep(ORPHAN_SWEEP_EVERY) => self.dead_letter_orphans().await,
            }
        }
    }

    fn start(self: &Arc<Self>, runtime: &Handle, lane: Arc<Lane>) {
        if !lane.started.swap(true, Ordering::AcqRel) {
            runtime.spawn(run_lane(
                lane,
                self.store.clone(),
                self.lifecycle.clone(),
                self.pace.clone(),
            ));
        }
    }

    fn lanes(&self) -> MutexGuard<'_, HashMap<String, Arc<Lane>>> {
        // A panic while holding this lock leaves the map itself intact.
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sweeping(&self) -> MutexGuard<'_, HashSet<String>> {
        self.sweeping.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deliveries whose (action, upstream) left the config while the gateway was stopped.
    async fn dead_letter_orphans(&self) {
        let pending = match self.store.pending_lanes().await {
            Ok(lanes) => lanes,
            Err(e) => {
                log::error!("cannot list pending deliveries: {e}");
                return;
            }
        };
        let orphans: Vec<String> = {
            let lanes = self.lanes();
            pending
                .into_iter()
                .filter(|key| !lanes.contains_key(key))
                .collect()
        };
        for key in orphans {
            self.sweep(&key).await;
        }
    }

    /// Dead-letters what a lane that is no longer configured still holds. Stops early if the
    /// lane is configured again; the new lane is held until then, so nothing is both sent and
    /// dead-lettered.
    async fn sweep(&self, key: &str) {
        {
            let lanes = self.lanes();
            if lanes.contains_key(key) {
                return;
            }
            self.sweeping().insert(key.to_string());
        }
        self.dead_letter_lane(key).await;
        let lanes = self.lanes();
        self.sweeping().remove(key);
        if let Some(lane) = lanes.get(key) {
            lane.held.store(false, Ordering::Release);
            lane.changed.notify_waiters();
        }
    }

    async fn dead_letter_lane(&self, key: &str) {
        // In a cluster, a lane another instance runs is that instance's to deliver.
        match self.store.lanes_run_elsewhere().await {
            Ok(elsewhere) if elsewhere.contains(key) => return,
            Ok(_) => {}
            Err(e) => {
                log::error!("cannot tell whether another instance runs {key}: {e}");
                return;
            }
        }
        // Everything the lane holds goes, retries backing off included; in a cluster, only
        // what waited past the store's grace.
        let grace = self.store.orphan_grace();
        let upto = if grace.is_zero() {
            u64::MAX
        } else {
            now_ms().saturating_sub(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX))
        };
        let mut swept = 0usize;
        // Bounded: each pass takes up to SWEEP_SLICE and finishes them.
        for _ in 0..SWEEP_PASSES {
            let ids = self
                .store
                .due(key, upto, SWEEP_SLICE, &IdSet::default(), Duration::ZERO)
                .await
                .unwrap_or_default();
            if ids.is_empty() {
                break;
            }
            if swept == 0 {
                log::warn!(
                    "deliveries for {key}, which is no longer configured, go to dead letters"
                );
            }
            for (i, &id) in ids.iter().enumerate() {
                if self.lanes().contains_key(key) {
                    log::warn!("{key} is configured again: its remaining deliveries stay due");
                    for &left in &ids[i..] {
                        self.store.release(left);
                    }
                    return;
                }
                let error = format!("{key} is no longer configured");
                let at_ms = now_ms();
                let report = self.sweep_report(key, id, &error, at_ms).await;
                let finish = Finish::Dead {
                    at_ms,
                    error,
                    status: None,
                    attempted: false,
                };
                if let Err(e) = self.store.finish_reported(id, finish, report).await {
                    log::error!("cannot dead-letter delivery {id}: {e}");
                    self.store.release(id);
                }
                swept += 1;
            }
        }
        if swept > 0 {
            log::warn!("{swept} deliveries for {key} went to dead letters");
        }
    }
}

impl Dispatcher {
    /// The report of a delivery of lane `key` dead-lettered by a sweep, if its action still
    /// reports dead letters (a report's own lane is never reported).
    async fn sweep_report(&self, key: &str, id: u64, error: &str, at_ms: u64) -> Option<NewEvent> {
        // Action names hold no `/`: the lane key is `action/upstream`.
        let (action, upstream) = key.split_once('/')?;
        if upstream == REPORT_UPSTREAM {
            return None;
        }
        let plan = self
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(action)
            .filter(|plan| plan.plan.wants(ReportOutcome::DeadLettered))
            .cloned()?;
        let (record, raw) = match self.store.load(id).await {
            Ok(found) => found?,
            Err(e) => {
                log::error!("{key}: cannot load delivery {id} to report its dead letter: {e}");
                return None;
            }
        };
        let facts = Facts {
            action: record.action(),
            upstream: record.upstream(),
            outcome: ReportOutcome::DeadLettered,
            attempts: record.attempts,
            status: record.last_status,
            error: Some(error),
            response: "",
            lag: Duration::from_millis(at_ms.saturating_sub(record.accepted_ms)),
        };
        report_of(&plan, &record, &raw, &facts)
    }
}

#[async_trait]
impl BackgroundService for DispatcherService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Lanes stop with the lifecycle's drain, which SIGTERM begins before Pingora's
        // shutdown. A graceful upgrade does not drain (the old process answers until its
        // listeners close), so lanes stop at Pingora's shutdown and the new process takes
        // their deliveries over.
        tokio::select! {
            _ = self.0.run() => {}
            _ = shutdown.changed() => self.0.lifecycle.stop_deliveries(),
        }
    }
}

async fn run_lane(lane: Arc<Lane>, store: Store, lifecycle: Arc<Lifecycle>, pace: Arc<Pace>) {
    loop {
        if lifecycle.deliveries_stopped() || lane.stopped.load(Ordering::Acquire) {
            return;
        }
        if store.failure().is_some() {
            // Results could not be recorded, so every attempt would be made again at once:
            // hold off rather than hammer the upstream (the failure is logged and in /readyz).
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        }
        // Register for wake-ups before looking, so that a commit in between is not missed.
        let work = store.work_notified();
        let changed = lane.changed.notified();
        tokio::pin!(work, changed);
        work.as_mut().enable();
        changed.as_mut().enable();

        let start = |id: u64| {
            lane.mark_in_flight(id);
            tokio::spawn(attempt_task(
                lane.clone(),
                store.clone(),
                lifecycle.clone(),
                pace.clone(),
                id,
            ));
        };
        let pass = if lane.is_ordered() {
            ordered_pass(&lane, &store, start).await
        } else {
            plain_pass(&lane, &store, start).await
        };
        let Ok(wake_ms) = pass else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        // Sleep until the next delivery is due, new work arrives, or an attempt finishes.
        let wait = wake_ms.map_or(IDLE_POLL, |at| {
            Duration::from_millis(at.saturating_sub(now_ms()).max(1)).min(IDLE_POLL)
        });
        tokio::select! {
            _ = &mut work => {}
            _ = &mut changed => {}
            _ = tokio::time::sleep(wait) => {}
            _ = lifecycle.deliveries_stopping() => return,
        }
    }
}

/// One look at a lane: starts what is due, up to its concurrency. Returns when to look again
/// if nothing wakes the lane first (`None`: only a wake-up or the idle poll); `Err` after a
/// store error, logged.
async fn plain_pass(lane: &Lane, store: &Store, start: impl Fn(u64)) -> Result<Option<u64>, ()> {
    let now = now_ms();
    // What is in flight, read once per pass; ids started below are added to it.
    let mut skip = lane.in_flight_ids();
    let free = lane.free(skip.len());
    if free > 0 {
        let timeout = lane.conf.load().upstream.timeout;
        let ids = store
            .due(&lane.key, now, free, &skip, timeout)
            .await
            .map_err(|e| log::error!("lane {}: cannot read due deliveries: {e}", lane.key))?;
        for id in ids {
            skip.insert(id);
            start(id);
        }
    }
    if lane.free(skip.len()) == 0 {
        return Ok(None);
    }
    Ok(next_due_ms(store, lane, &skip).await)
}

/// When the earliest delivery of the lane not in `skip` is due; after a store error, soon.
async fn next_due_ms(store: &Store, lane: &Lane, skip: &IdSet) -> Option<u64> {
    match store.next_due_ms(&lane.key, skip).await {
        Ok(due) => due,
        Err(_) => Some(now_ms().saturating_add(millis(ERROR_PAUSE))),
    }
}

/// [`plain_pass`] for a lane with `order: event_time`: first learns every delivery that has
/// come due since the last look (all of them, before starting any: a busy lane or a restart
/// must not let one overtake an earlier event it has not seen yet), then starts what
/// [`Order::startable`] allows.
async fn ordered_pass(lane: &Lane, store: &Store, start: impl Fn(u64)) -> Result<Option<u64>, ()> {
    let timeout = lane.conf.load().upstream.timeout;
    loop {
        let known = lane
            .with_order(|order| order.ids().clone())
            .unwrap_or_default();
        let ids = store
            .due(&lane.key, now_ms(), LEARN_BATCH, &known, timeout)
            .await
            .map_err(|e| log::error!("lane {}: cannot read due deliveries: {e}", lane.key))?;
        if ids.is_empty() {
            break;
        }
        for id in ids {
            match store.load(id).await {
                Ok(Some((record, raw))) => {
                    let place = Place::of(&raw);
                    lane.with_order(|order| {
                        order.add(id, place, record.accepted_ms, record.due_ms)
                    });
                }
                Ok(None) => {} // finished meanwhile
                // Not held, holding nothing: its attempt meets the same error, as on a plain
                // lane, and the rest of the lane goes on.
                Err(e) => {
                    log::error!(
                        "lane {}: cannot load delivery {id} to order it: {e}",
                        lane.key
                    );
                    let now = now_ms();
                    lane.with_order(|order| order.add(id, None, now, now));
                }
            }
        }
        // A backlog is learnt a batch at a time, letting the other lanes run in between.
        tokio::task::yield_now().await;
    }
    let busy = lane.in_flight_ids();
    let free = lane.free(busy.len());
    let now = now_ms();
    let ready = lane
        .with_order(|order| order.startable(now, &busy, free))
        .unwrap_or_default();
    for &id in &ready {
        start(id);
    }
    let busy = lane.in_flight_ids();
    if lane.free(busy.len()) == 0 {
        // Full, held or retired: an attempt that ends wakes the lane.
        return Ok(None);
    }
    let known = lane
        .with_order(|order| order.ids().clone())
        .unwrap_or_default();
    // Retries the lane has not learnt (due before a restart) come due by the store's clock.
    let unknown = next_due_ms(store, lane, &known).await;
    let held = lane.with_order(|order| order.next_wake(&busy)).flatten();
    Ok(unknown.into_iter().chain(held).min())
}

impl Lane {
    /// How many more attempts may start, with `running` in flight.
    fn free(&self, running: usize) -> usize {
        if self.retired.load(Ordering::Acquire) || self.held.load(Ordering::Acquire) {
            return 0;
        }
        self.conf
            .load()
            .upstream
            .concurrency
            .saturating_sub(running)
    }

    fn in_flight_ids(&self) -> IdSet {
        self.in_flight.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn in_flight_count(&self) -> usize {
        self.in_flight.lock().map(|s| s.len()).unwrap_or_default()
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

    /// Takes `order_window` from a (re)loaded config: ordering starts, stops, or keeps what it
    /// has learnt with the new window.
    fn set_order(&self, window: Option<Duration>) {
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        match (order.as_mut(), window) {
            (Some(order), Some(window)) => order.set_window(millis(window)),
            (None, Some(window)) => *order = Some(Order::new(millis(window))),
            (_, None) => *order = None,
        }
    }

    fn is_ordered(&self) -> bool {
        self.with_order(|_| ()).is_some()
    }

    /// Runs `f` on the lane's order, if it has one.
    fn with_order<T>(&self, f: impl FnOnce(&mut Order) -> T) -> Option<T> {
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        order.as_mut().map(f)
    }

    /// Waits until no attempt of this lane is running.
    async fn idle(&self) {
        wait_until(&self.changed, || self.in_flight_count() == 0).await;
    }
}

async fn attempt_task(
    lane: Arc<Lane>,
    store: Store,
    lifecycle: Arc<Lifecycle>,
    pace: Arc<Pace>,
    id: u64,
) {
    let in_flight = lifecycle.delivery();
    let after = deliver(&lane, &store, &pace, id).await;
    lane.with_order(|order| match after {
        After::Settled => order.settled(id),
        After::Retry(due_ms) => order.retry(id, due_ms),
        After::Unknown => {}
    });
    store.release(id);
    lane.clear_in_flight(id);
    drop(in_flight);
    lane.changed.notify_waiters();
}

/// What became of a delivery after one step, as far as the lane's order needs to know.
enum After {
    /// No longer pending: delivered, skipped, dead-lettered, or finished elsewhere.
    Settled,
    /// Recorded to be tried again then.
    Retry(u64),
    /// Nothing was recorded: it stays due as it was.
    Unknown,
}

impl After {
    fn of(recorded: bool, finish: &Finish) -> After {
        match (recorded, finish) {
            (false, _) => After::Unknown,
            (true, Finish::Retry { due_ms, .. }) => After::Retry(*due_ms),
            (true, _) => After::Settled,
        }
    }
}

/// One step for delivery `id`: skip it, or attempt it and record the result.
async fn deliver(lane: &Lane, store: &Store, pace: &Pace, id: u64) -> After {
    let conf = lane.conf.load_full();
    let upstream = &conf.upstream;
    let (record, raw) = match store.load(id).await {
        Ok(Some(found)) => found,
        Ok(None) => return After::Settled, // finished meanwhile (e.g. replayed and delivered)
        Err(e) => {
            log::error!("lane {}: cannot load delivery {id}: {e}", lane.key);
            tokio::time::sleep(ERROR_PAUSE).await;
            return After::Unknown;
        }
    };
    let payload = if request::needs_payload(upstream) {
        match conf.projection.parse(&raw) {
            Ok(value) => Some(value),
            Err(e) => {
                // Cannot happen for events the ingress validated; say so loudly if it does.
                let finish = Finish::Dead {
                    at_ms: now_ms(),
                    error: format!("stored payload is not JSON: {e}"),
                    status: None,
                    attempted: false,
                };
                let recorded = record_finish(
                    lane,
                    store,
                    id,
                    finish.clone(),
                    DeliveryOutcome::DeadLettered,
                    None,
                    None,
                )
                .await;
                return After::of(recorded, &finish);
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
            let recorded = record_finish(
                lane,
                store,
                id,
                Finish::Skipped,
                DeliveryOutcome::Skipped,
                None,
                None,
            )
            .await;
            return After::of(recorded, &Finish::Skipped);
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
    let uri = match (&upstream.query, &conf.flashduty) {
        (None, None) => Ok(conf.uri.clone()),
        (_, api) => {
            let mut url = request::url(upstream, payload.as_ref());
            if let Some(api) = api {
                // The key joins the URL only here, on its way out: never stored, never logged.
                url.query_pairs_mut().append_pair("app_key", &api.app_key);
                pace.wait().await;
            }
            request::uri(&url)
        }
    };
    // Last thing before sending: the load, a template or the Flashduty pace may have taken
    // long enough for the claim to be lost.
    if !store.may_send(id, upstream.timeout) {
        log::warn!(
            "lane {}: delivery {id} not sent: this instance's claim on it was lost or could not be \
             renewed in time (the database unreachable?); it is taken again, here or elsewhere",
            lane.key
        );
        lane.metrics.claims_lost.inc();
        return After::Unknown;
    }
    let started = Instant::now();
    let sent = match uri {
        Ok(uri) => client::send(&conf.client, upstream, uri, headers, body).await,
        Err(e) => Err(e),
    };
    let took = started.elapsed();
    lane.metrics.attempt_duration.observe(took.as_secs_f64());
    let (outcome, description) = match (&sent, &conf.flashduty) {
        (Err(why), _) => (AttemptOutcome::Transport(why.clone()), why.clone()),
        (Ok(reply), Some(_)) => report::judge(
            reply.status,
            reply.retry_after,
            &reply.head,
            reply.request_id.as_deref(),
        ),
        (Ok(reply), None) => client::judge(reply),
    };

    let status = match &outcome {
        AttemptOutcome::Status { status, .. } | AttemptOutcome::Declined { status, .. } => {
            Some(*status)
        }
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
        status = status,
        result = description.as_str(),
        decision = match decision {
            Decision::Delivered => "delivered",
            Decision::Retry(_) => "retry",
            Decision::DeadLetter => "dead_letter",
        },
        duration_ms = crate::logging::millis(took);
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
    let report = conf.report.as_deref().and_then(|plan| {
        let outcome = match &finish {
            Finish::Delivered { .. } => ReportOutcome::Delivered,
            Finish::Dead { .. } => ReportOutcome::DeadLettered,
            _ => return None,
        };
        let response = sent
            .as_ref()
            .map(|reply| report::response_text(&reply.head))
            .unwrap_or_default();
        let facts = Facts {
            action: &lane.action,
            upstream: &upstream.name,
            outcome,
            attempts: attempt,
            // The last status seen: a final timeout after two 503s still says 503, as the
            // dead letter does.
            status: status.or(record.last_status),
            error: match &finish {
                Finish::Dead { error, .. } => Some(error.as_str()),
                _ => None,
            },
            response: &response,
            lag: Duration::from_millis(at_ms.saturating_sub(record.accepted_ms)),
        };
        report_of(plan, &record, &raw, &facts)
    });
    let recorded = record_finish(lane, store, id, finish.clone(), label, lag, report).await;
    After::of(recorded, &finish)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The report of an outcome, if the action reports it and the payload names an incident
/// Flashduty can comment on.
fn report_of(
    plan: &ReportPlan,
    record: &DeliveryRecord,
    raw: &[u8],
    facts: &Facts,
) -> Option<NewEvent> {
    if !plan.plan.wants(facts.outcome) {
        return None;
    }
    let event = plan.plan.event(&record.event_id, raw, facts);
    if event.is_none() {
        log::warn!(
            target: "actiongate::delivery",
            action = facts.action,
            upstream = REPORT_UPSTREAM,
            event_id = record.event_id.as_str();
            "{}", report::NO_INCIDENT
        );
        plan.metrics.delivery(DeliveryOutcome::Skipped);
    }
    event
}

async fn record_finish(
    lane: &Lane,
    store: &Store,
    id: u64,
    finish: Finish,
    outcome: DeliveryOutcome,
    lag_ms: Option<u64>,
    report: Option<NewEvent>,
) -> bool {
    // The attempt was made: giving up on its result means making it again. So a result the
    // store could not take for a passing reason (the database down or failing over, a full
    // disk) is offered again, with backoff, for up to RECORD_FOR; in cluster mode only while
    // this instance's claim holds (it stays held, and renewed, meanwhile): past it another
    // instance may attempt the delivery, and this result would match nothing.
    let started = Instant::now();
    let mut pause = ERROR_PAUSE;
    loop {
        match store
            .finish_reported(id, finish.clone(), report.clone())
            .await
        {
            Ok(()) => {
                lane.metrics.delivery(outcome);
                if let Some(lag) = lag_ms {
                    lane.metrics.lag.observe(lag as f64 / 1000.0);
                }
                return true;
            }
            Err(e)
                if e.passes() && started.elapsed() + pause < RECORD_FOR && store.may_record(id) =>
            {
                log::warn!(
                    "lane {}: cannot record delivery {id} yet ({e}); trying again in {pause:?}",
                    lane.key
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECORD_PAUSE_MAX);
            }
            // The delivery stays due as it was and is tried again: at least once.
            Err(e) => {
                log::error!(
                    "lane {}: cannot record delivery {id} ({e}); it will be attempted again",
                    lane.key
                );
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewEvent;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delivery_stored_for_a_lane_that_let_go_is_dead_lettered_while_running() {
        let config = Config::from_yaml(
            "listen: [{addr: \"127.0.0.1:1\"}]\nactions:\n  - {name: kept, path: /k, upstreams: [{name: u, url: \"http://127.0.0.1:1/\"}]}\n",
            &|_| None,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(crate::metrics_for(&config));
        let spool = crate::spool::Spool::open(dir.path(), Duration::from_secs(60), metrics.clone())
            .unwrap();
        let store = Store::Local(spool.clone());
        let lifecycle = Lifecycle::new();
        let dispatcher =
            Dispatcher::new(&config, store.clone(), metrics, lifecycle.clone()).unwrap();
        let running = {
            let dispatcher = dispatcher.clone();
            tokio::spawn(async move { dispatcher.run().await })
        };
        // What a request still running on the config before a reload stores after its lane
        // has let go: nothing would ever take it.
        spool
            .append(NewEvent {
                action: Arc::from("gone"),
                event_id: "late".into(),
                body: bytes::Bytes::from_static(b"{}"),
                upstreams: vec![Arc::from("x")],
            })
            .await
            .unwrap();
        let deadline = Instant::now() + ORPHAN_SWEEP_EVERY * 5;
        while spool.dead_letters(10).unwrap().is_empty() {
            assert!(Instant::now() < deadline, "still pending");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dead = spool.dead_letters(10).unwrap();
        assert_eq!(dead[0].event_id, "late");
        assert_eq!(
            dead[0].last_error.as_deref(),
            Some("gone/x is no longer configured")
        );
        lifecycle.stop_deliveries();
        running.await.unwrap();
    }
}
