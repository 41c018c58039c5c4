//! The store on PostgreSQL (`spool.postgres`): several gateways share one database, so that
//! losing an instance loses nothing and dedup, guards and dead letters are the cluster's.
//!
//! - **Acks after COMMIT, with group commit.** Appends queue for a few committer tasks; each
//!   takes every append waiting and stores them in one transaction, so that requests arriving
//!   together share one commit (and, with a synchronous standby, one round trip to it).
//! - **Dedup across instances** is a unique key in `actiongate_keys`, written in the event's
//!   own statement (`INSERT … ON CONFLICT … WHERE expired`): of two instances storing the same
//!   (action, event_id), the second waits for the first's commit and finds the key.
//! - **Guards** run under a transaction-scoped advisory lock per action, so that two pushes
//!   racing on two instances are decided one after the other, as the spool's writer does.
//! - **Deliveries are claimed** with `FOR UPDATE SKIP LOCKED` and a lease, renewed while the
//!   attempt runs; a result is recorded only by the instance that holds the claim. The claims
//!   of an instance that died are taken over when their lease runs out. LISTEN/NOTIFY wakes
//!   every instance's lanes when work is committed; the NOTIFY is sent after the commit, on a
//!   connection of its own, because a NOTIFY inside a transaction takes a database-wide lock
//!   until the commit (and its wait for a synchronous standby) is over, which would make the
//!   whole cluster's commits take turns.
//! - **The database down or failing over**: a call that fails for want of a server, or takes
//!   longer than [`OP_TIMEOUT`] (a host gone silent sends no reset), marks the store down;
//!   appends are then refused at once (503 with Retry-After) and `/readyz` says so, while a
//!   probe connects afresh with backoff; the first read-write answer (a multi-host URL with
//!   `target_session_attrs=read-write` finds the promoted standby) clears it.
//!
//! The client is tokio-postgres with deadpool-postgres: tokio-postgres is the async driver the
//! Rust ecosystem builds on (it pipelines queries on one connection, speaks LISTEN/NOTIFY, and
//! parses multi-host URLs with `target_session_attrs`), and deadpool is a small pool that does
//! nothing but hand out and recycle connections. sqlx would bring a query macro layer and its
//! own runtime choices that the gateway does not need. Everything here runs on one thread of
//! its own with its own tokio runtime, started on first use: a daemonizing server forks after
//! the store is opened, and the connections' tasks then live on one runtime whatever service's
//! runtime calls in.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, TimeoutType, Transaction,
};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::guard::{self, GuardCheck, Guarded, HOUR_MS};
use super::{
    dedup_key, lane_key, now_ms, Appended, DeliveryRecord, Finish, IdSet, NewEvent, StoreCounts,
    StoreError,
};
use crate::metrics::{Metrics, SpoolRefusal};

/// The schema this build writes. A database at a newer version is refused at start.
const SCHEMA_VERSION: i32 = 1;

/// How long a claim holds a delivery without being renewed, at least: longer for an upstream
/// whose attempts may take longer (see [`lease_for`]). An instance renews the claims of its
/// running attempts every [`RENEW_EVERY`]; a dead instance's claims are free this long after
/// its last renewal.
const LEASE: Duration = Duration::from_secs(30);

/// How often held claims are renewed: six chances before one runs out.
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Room for the instances' wall clocks to differ (leases are compared on them: keep them in
/// sync with NTP, well within this). An attempt is sent only if the lease as last renewed
/// outlasts its whole timeout and this: it is over before another instance may take the
/// delivery, even one whose clock runs ahead.
const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// How long an instance may go without renewing before it stops sending: three renewals.
const UNRENEWED: Duration = Duration::from_secs(15);

/// The lease of a claim for attempts that may take `timeout`: long enough that a send may
/// start for [`UNRENEWED`] after the last renewal and still end, with [`CLOCK_SKEW`] to spare,
/// before the lease runs out.
fn lease_for(timeout: Duration) -> Duration {
    LEASE.max(timeout + CLOCK_SKEW + UNRENEWED)
}

/// See [`super::Store::orphan_grace`]. Instances announce their lanes before they accept a
/// request and every [`MAINTENANCE_EVERY`] after: this is ample for the first announcement.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(10);

/// A lane announced by an instance within this long is run by a live instance: six rounds of
/// announcements, so that a slow round or two does not let another instance sweep it.
const LANE_FRESH: Duration = Duration::from_secs(30);

/// Longest a database call may take. Past it the connection is dropped and the store marked
/// down: a server that answers nothing (a host gone silent, a partition) sends no reset.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest an append waits for its commit before it is answered 503: a retry of an event that
/// did commit meanwhile is then a duplicate. Below Flashduty's one-second deadline.
const APPEND_DEADLINE: Duration = Duration::from_millis(800);

/// Transactions of appends that may be open at once per instance; more appends wait and join
/// the next one.
const COMMITTERS: usize = 4;
/// Appends per transaction at most.
const MAX_BATCH: usize = 512;
/// Appends queued beyond this are refused with 503 rather than waiting.
const QUEUE_DEPTH: usize = 16_384;

/// Pauses of the probe that reconnects a store marked down: quick at first, then once a second.
const PROBE_FIRST: Duration = Duration::from_millis(50);
const PROBE_MAX: Duration = Duration::from_secs(1);
/// How often expired keys and finished events are deleted, and the gauges refreshed.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);
/// Rows deleted per maintenance statement, so that a large purge never holds locks for long,
/// and statements per round.
const PURGE_SLICE: i64 = 5_000;
const PURGE_ROUNDS: usize = 20;

const CHANNEL: &str = "actiongate_work";

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Postgres {
    core: Arc<Core>,
    runtime: Arc<StoreRuntime>,
}

/// What the store's tasks share.
struct Core {
    /// Claims, loads, results, the admin API, maintenance: committed asynchronously.
    pool: Pool,
    /// The committers' connections: committed durably, and never busy with deliveries.
    appends: Pool,
    /// One connection for lease renewals: a pool busy with lanes' work must not keep them
    /// waiting until the claims stop being sent.
    renewals: Pool,
    /// For the LISTEN connection, which lives outside the pool.
    pg: tokio_postgres::Config,
    /// The appends' settings, for the probe: the store is up again when a commit made as an
    /// ack's would be completes, not merely when a server answers. Named `actiongate probe`
    /// in `pg_stat_activity`.
    probe: tokio_postgres::Config,
    dedup_window_ms: u64,
    /// Names this instance's claims, for a post-mortem of who held what.
    instance: String,
    /// Woken when work is committed here or NOTIFY says it was committed elsewhere.
    work: Arc<Notify>,
    /// Why the database is unreachable, while it is.
    down: Mutex<Option<String>>,
    is_down: AtomicBool,
    /// Woken when the store is marked down, to start the probe.
    went_down: Notify,
    /// Deliveries this instance has claimed and not finished: their leases are renewed.
    held: Mutex<HashMap<i64, Claim>>,
    /// The lanes this instance runs, announced in `actiongate_lanes` so that no other
    /// instance takes their deliveries for orphans.
    lanes: Mutex<Vec<String>>,
    /// Set when committed work should wake the other instances; the listener sends one NOTIFY
    /// for however many commits asked since the last.
    notify_others: Notify,
    /// Set when the lanes changed, to announce them at once.
    lanes_changed: Notify,
    metrics: Arc<Metrics>,
}

/// A claim as this instance knows it, on its own monotonic clock.
#[derive(Clone, Copy)]
struct Claim {
    /// When the statement that took it was sent: identifies this claim among later ones of
    /// the same delivery.
    taken: Instant,
    /// When the lease as last confirmed runs out, counted from before the statement that set
    /// it was sent (so never later than the database's own `leased_until`, clock skew apart).
    until: Instant,
    /// Its length ([`lease_for`] the attempt's timeout), at every renewal.
    lease: Duration,
}

/// The thread and runtime the store's I/O runs on, started on first use and stopped when the
/// last handle goes.
struct StoreRuntime {
    started: Mutex<Option<Started>>,
    core: Arc<Core>,
}

struct Started {
    handle: Handle,
    appends: mpsc::Sender<Pending>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// An append waiting for its transaction.
struct Pending {
    event: NewEvent,
    admit: Admit,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// How an append is admitted; see the spool's writer for the same three cases.
enum Admit {
    /// A push from Flashduty: dedup on (action, event_id), then the action's guards if any.
    Push(Option<GuardCheck>),
    /// A report of the gateway's own: once per (action, event_id) when `once`.
    Report { once: bool },
}

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        let started = self.started.get_mut().ok().and_then(Option::take);
        if let Some(mut started) = started {
            if let Some(stop) = started.stop.take() {
                let _ = stop.send(());
            }
            if let Some(thread) = started.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

const SCHEMA: &str = "
CREATE TABLE actiongate_events (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action text NOT NULL,
    event_id text NOT NULL,
    body bytea NOT NULL,
    accepted_ms bigint NOT NULL
);
CREATE TABLE actiongate_keys (
    key text COLLATE \"C\" PRIMARY KEY,
    expires_ms bigint NOT NULL
);
CREATE INDEX actiongate_keys_expiry ON actiongate_keys (expires_ms);
CREATE TABLE actiongate_deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event bigint NOT NULL REFERENCES actiongate_events (seq) ON DELETE CASCADE,
    lane text NOT NULL,
    action text NOT NULL,
    upstream text NOT NULL,
    event_id text NOT NULL,
    accepted_ms bigint NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    due_ms bigint NOT NULL,
    first_attempt_ms bigint,
    last_attempt_ms bigint,
    last_error text,
    last_status integer,
    dead_ms bigint,
    leased_until bigint NOT NULL DEFAULT 0,
    leased_by text
);
CREATE INDEX actiongate_deliveries_due ON actiongate_deliveries (lane, due_ms, id)
    WHERE dead_ms IS NULL;
CREATE INDEX actiongate_deliveries_leased ON actiongate_deliveries (lane, leased_until)
    WHERE dead_ms IS NULL AND leased_until > 0;
CREATE INDEX actiongate_deliveries_dead ON actiongate_deliveries (id) WHERE dead_ms IS NOT NULL;
CREATE INDEX actiongate_deliveries_event ON actiongate_deliveries (event);
CREATE TABLE actiongate_lanes (
    lane text NOT NULL,
    instance text NOT NULL,
    seen_ms bigint NOT NULL,
    PRIMARY KEY (lane, instance)
);
";

/// An event with its deliveries, unless its key (when it has one) is held and unexpired.
/// $1 key (NULL: none), $2 key expiry, $3 now, $4 action, $5 event_id, $6 body, $7 upstreams.
const ACCEPT: &str = "
WITH k AS (
    INSERT INTO actiongate_keys (key, expires_ms) SELECT $1::text, $2::bigint WHERE $1 IS NOT NULL
    ON CONFLICT (key) DO UPDATE SET expires_ms = EXCLUDED.expires_ms
        WHERE actiongate_keys.expires_ms <= $3
    RETURNING 1
), e AS (
    INSERT INTO actiongate_events (action, event_id, body, accepted_ms)
    SELECT $4, $5, $6, $3 WHERE $1 IS NULL OR EXISTS (SELECT 1 FROM k)
    RETURNING seq
), d AS (
    INSERT INTO actiongate_deliveries (event, lane, action, upstream, event_id, accepted_ms, due_ms)
    SELECT e.seq, $4 || '/' || u, $4, u, $5, $3, $3 FROM e, unnest($7::text[]) AS u
)
SELECT seq FROM e";

/// A delivery's columns, of a table aliased `d`.
macro_rules! record_columns {
    () => {
        "d.id, d.event, d.action, d.upstream, d.event_id, d.accepted_ms, d.attempts, d.due_ms, \
         d.first_attempt_ms, d.last_attempt_ms, d.last_error, d.last_status, d.dead_ms"
    };
}

/// A statement's parameters, owned: they travel to the store's runtime.
type Params = Vec<Box<dyn ToSql + Send + Sync>>;

fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

fn ids_of(ids: &IdSet) -> Vec<i64> {
    ids.iter().map(|&id| i64_of(id)).collect()
}

fn record_of(row: &Row) -> Result<DeliveryRecord, tokio_postgres::Error> {
    Ok(DeliveryRecord {
        id: u64_of(row.try_get("id")?),
        event: u64_of(row.try_get("event")?),
        lane: Arc::from(lane_key(
            row.try_get::<_, &str>("action")?,
            row.try_get::<_, &str>("upstream")?,
        )),
        event_id: row.try_get("event_id")?,
        accepted_ms: u64_of(row.try_get("accepted_ms")?),
        attempts: u32::try_from(row.try_get::<_, i32>("attempts")?).unwrap_or(0),
        due_ms: u64_of(row.try_get("due_ms")?),
        first_attempt_ms: row
            .try_get::<_, Option<i64>>("first_attempt_ms")?
            .map(u64_of),
        last_attempt_ms: row
            .try_get::<_, Option<i64>>("last_attempt_ms")?
            .map(u64_of),
        last_error: row
            .try_get::<_, Option<String>>("last_error")?
            .map(Arc::from),
        last_status: row
            .try_get::<_, Option<i32>>("last_status")?
            .and_then(|s| u16::try_from(s).ok()),
        dead_ms: row.try_get::<_, Option<i64>>("dead_ms")?.map(u64_of),
    })
}

/// Whether an error means the connection (or the server's role) is gone, not the statement.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No database error at all: the socket failed, or a timeout.
        None => true,
        // Read-only (a standby, or a primary being demoted), connection failures (08),
        // credentials refused (28), no such database (3D), out of connections or resources
        // (53), the server shutting down (57P).
        Some(code) => {
            *code == SqlState::READ_ONLY_SQL_TRANSACTION
                || ["08", "28", "3D", "53", "57P"]
                    .iter()
                    .any(|class| code.code().starts_with(class))
        }
    }
}

/// A row that does not read as the schema says: the database is there, the data is not.
fn bad_row(e: tokio_postgres::Error) -> StoreError {
    StoreError::Storage(format!("unexpected row: {e}"))
}

/// Whether a transaction lost a race it can simply run again.
fn is_conflict(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// Text as PostgreSQL takes it: a NUL byte (which JSON can carry as `\u0000`, and an
/// upstream's answer can hold) is refused in `text`, so it becomes U+FFFD.
fn clean(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// A database error, described without the URL (which may hold a password).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

impl Postgres {
    /// Connects to `url`, creates or migrates the schema, and returns the store. Fails if no
    /// read-write server answers within `wait`, or the schema is newer than this build's.
    pub fn open(
        url: &str,
        pool: usize,
        dedup_window: Duration,
        metrics: Arc<Metrics>,
        wait: Duration,
    ) -> Result<Postgres, StoreError> {
        let mut pg = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Storage(format!("spool.postgres.url: {e}")))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(2));
        }
        // A server that vanishes without a reset is noticed by the operation timeouts; these
        // make the kernel give up on its sockets too, instead of after fifteen minutes.
        pg.keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(OP_TIMEOUT)
            .application_name("actiongate");
        let given = pg.get_options().unwrap_or_default().to_string();
        // The server's side of the same: a session whose gateway died (host gone, network cut)
        // would otherwise keep its transaction, and the guard locks and key rows it holds,
        // open until the server's own keep-alive gives up (two hours by default), stalling
        // every batch that pushes the same action on every other instance.
        let server_side = "-c idle_in_transaction_session_timeout=10s -c tcp_keepalives_idle=10 \
                           -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3";
        // Appends have connections of their own: an ack never waits behind deliveries. Their
        // commits are durable whatever the role or database says (`synchronous_commit=off` set
        // there would make every ack a promise the server may not keep), unless the URL's own
        // options choose a level.
        let chooses_level = given.contains("synchronous_commit");
        let mut durable = pg.clone();
        durable.options(if chooses_level {
            format!("{given} {server_side}")
        } else {
            format!("{given} {server_side} -c synchronous_commit=on")
        });
        // On the appends' own settings: a server that refuses them (unknown to an old
        // version) or a pooler that drops them is found at start, not at the first ack.
        migrate(&durable, wait, !chooses_level)?;
        let appends = pool_of(&durable, COMMITTERS)?;
        let mut probe = durable;
        probe.application_name("actiongate probe");
        // Everything else commits without waiting for the disk (or the standby), as the spool
        // writes results without an fsync of their own: a crash can lose the last results,
        // which repeats those deliveries (at least once), never an acknowledged event.
        let mut relaxed = pg.clone();
        relaxed.options(format!("{given} {server_side} -c synchronous_commit=off"));
        let renewals = pool_of(&relaxed, 1)?;
        let pool = pool_of(&relaxed, pool)?;
        let core = Arc::new(Core {
            pool,
            appends,
            renewals,
            pg,
            probe,
            dedup_window_ms: millis(dedup_window),
            instance: instance_name(),
            work: Arc::new(Notify::new()),
            down: Mutex::new(None),
            is_down: AtomicBool::new(false),
            went_down: Notify::new(),
            held: Mutex::new(HashMap::new()),
            lanes: Mutex::new(Vec::new()),
            notify_others: Notify::new(),
            lanes_changed: Notify::new(),
            metrics,
        });
        Ok(Postgres {
            runtime: Arc::new(StoreRuntime {
                started: Mutex::new(None),
                core: core.clone(),
            }),
            core,
        })
    }

    /// Runs `work` on the store's runtime and waits for it.
    async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let handle = self.runtime.handle()?;
        handle.spawn(work).await.map_err(|_| StoreError::Closed)?
    }

    pub async fn append(
        &self,
        event: NewEvent,
        check: Option<GuardCheck>,
    ) -> Result<Appended, StoreError> {
        self.submit(event, Admit::Push(check)).await
    }

    pub async fn append_refusal_report(&self, report: NewEvent) -> Result<Appended, StoreError> {
        self.submit(report, Admit::Report { once: true }).await
    }

    async fn submit(&self, event: NewEvent, admit: Admit) -> Result<Appended, StoreError> {
        if let Some(why) = self.down() {
            return Err(why);
        }
        let appends = self.runtime.appends()?;
        let (reply, answer) = oneshot::channel();
        appends
            .try_send(Pending {
                event,
                admit,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Busy,
                mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
            })?;
        match tokio::time::timeout(APPEND_DEADLINE, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no commit within {} ms",
                APPEND_DEADLINE.as_millis()
            ))),
        }
    }

    pub async fn finish(
        &self,
        delivery: u64,
        finish: Finish,
        report: Option<NewEvent>,
    ) -> Result<(), StoreError> {
        let core = self.core.clone();
        let id = i64_of(delivery);
        let result = self
            .run(async move {
                let instance = core.instance.clone();
                let reported = core
                    .transaction(&core.pool, move |tx| {
                        let (finish, report, instance) =
                            (finish.clone(), report.clone(), instance.clone());
                        Box::pin(async move {
                            settle(tx, id, &instance, &finish, report.as_ref()).await
                        })
                    })
                    .await?;
                if reported {
                    core.notify_others.notify_one();
                }
                Ok(reported)
            })
            .await;
        // A result not recorded keeps its claim, renewed, while the caller tries again.
        if result.is_ok() {
            self.core.held().remove(&id);
        }
        if let Ok(true) = result {
            self.core.work.notify_waiters();
        }
        result.map(|_| ())
    }

    /// Runs one statement on the store's runtime, prepared once per connection, and returns
    /// its rows.
    async fn rows(&self, sql: &'static str, params: Params) -> Result<Vec<Row>, StoreError> {
        let core = self.core.clone();
        self.run(async move {
            core.on_client(move |client| {
                Box::pin(async move {
                    let statement = client.prepare_cached(sql).await?;
                    client.query(&statement, &refs(&params)).await
                })
            })
            .await
        })
        .await
    }

    /// [`Postgres::rows`] for a statement whose rows are not wanted: how many it changed.
    async fn execute(&self, sql: &'static str, params: Params) -> Result<u64, StoreError> {
        let core = self.core.clone();
        self.run(async move {
            core.on_client(move |client| {
                Box::pin(async move {
                    let statement = client.prepare_cached(sql).await?;
                    client.execute(&statement, &refs(&params)).await
                })
            })
            .await
        })
        .await
    }

    pub async fn replay(&self, id: Option<u64>) -> Result<usize, StoreError> {
        let n = self
            .execute(
                "UPDATE actiongate_deliveries
                 SET dead_ms = NULL, attempts = 0, due_ms = $1, leased_until = 0, leased_by = NULL
                 WHERE dead_ms IS NOT NULL AND ($2::bigint IS NULL OR id = $2)",
                vec![Box::new(i64_of(now_ms())), Box::new(id.map(i64_of))],
            )
            .await?;
        if n > 0 {
            self.core.work.notify_waiters();
            self.core.notify_others.notify_one();
        }
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    pub async fn purge(&self, id: u64) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "DELETE FROM actiongate_deliveries WHERE id = $1 AND dead_ms IS NOT NULL",
                vec![Box::new(i64_of(id))],
            )
            .await?;
        Ok(n > 0)
    }

    /// Claims up to `limit` due deliveries of `lane` for this instance: unclaimed ones, ones
    /// whose claim ran out, and this instance's own whose attempt ended without a recorded
    /// result (the database went away mid-attempt): `skip` holds every attempt still running
    /// here, so taking those again at once sends nothing twice.
    /// `timeout` is how long an attempt may take: the lease covers it.
    pub async fn claim(
        &self,
        lane: &str,
        now: u64,
        limit: usize,
        skip: &IdSet,
        timeout: Duration,
    ) -> Result<Vec<u64>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let lease = lease_for(timeout);
        // In this order: the lease as this instance counts it never ends after the database's.
        let taken = Instant::now();
        let wall = now_ms();
        let rows = self
            .rows(
                "UPDATE actiongate_deliveries SET leased_until = $4, leased_by = $5
                 WHERE id IN (
                     SELECT id FROM actiongate_deliveries
                     WHERE lane = $1 AND dead_ms IS NULL AND due_ms <= $2
                       AND (leased_until <= $6 OR leased_by = $5) AND id <> ALL($3)
                     ORDER BY due_ms, id LIMIT $7
                     FOR UPDATE SKIP LOCKED)
                 RETURNING id",
                vec![
                    Box::new(lane.to_string()),
                    Box::new(i64_of(now)),
                    Box::new(ids_of(skip)),
                    Box::new(i64_of(wall.saturating_add(millis(lease)))),
                    Box::new(self.core.instance.clone()),
                    Box::new(i64_of(wall)),
                    Box::new(i64::try_from(limit).unwrap_or(i64::MAX)),
                ],
            )
            .await?;
        let mut ids = rows
            .iter()
            .map(|row| row.try_get::<_, i64>(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad_row)?;
        ids.sort_unstable();
        let claim = Claim {
            taken,
            until: taken + lease,
            lease,
        };
        self.core.held().extend(ids.iter().map(|&id| (id, claim)));
        Ok(ids.into_iter().map(u64_of).collect())
    }

    /// Whether an attempt of `delivery` may still be sent: this instance holds its claim, and
    /// the lease as last confirmed outlasts the attempt's timeout with [`CLOCK_SKEW`] to
    /// spare. An instance cut off from the database cannot renew; past this another
    /// instance might take the delivery while this one's attempt still runs, and both would
    /// send it.
    pub fn may_send(&self, delivery: u64, timeout: Duration) -> bool {
        self.holds(delivery, timeout + CLOCK_SKEW)
    }

    /// Whether this instance still holds its claim on `delivery`, with `spare` of the lease
    /// as last renewed left.
    fn holds(&self, delivery: u64, spare: Duration) -> bool {
        let now = Instant::now();
        self.core
            .held()
            .get(&i64_of(delivery))
            .is_some_and(|claim| claim.until > now + spare)
    }

    /// Whether a result of an attempt of `delivery` may still be recorded as this instance's
    /// alone: its claim holds, with [`CLOCK_SKEW`] to spare. Past that, another instance may
    /// take the delivery and attempt it again, whatever this one records.
    pub fn may_record(&self, delivery: u64) -> bool {
        self.holds(delivery, CLOCK_SKEW)
    }

    /// Gives up the claim of a delivery whose attempt ended without a recorded result (its
    /// load failed): its lease then runs out and it is taken again.
    pub fn release(&self, delivery: u64) {
        self.core.held().remove(&i64_of(delivery));
    }

    /// When the lane should look again: the earliest due delivery it could take, or the
    /// earliest claim of another instance to run out. Two index lookups, never a scan of the
    /// lane's backlog: this runs at every wake-up of every lane.
    pub async fn next_due_ms(&self, lane: &str, skip: &IdSet) -> Result<Option<u64>, StoreError> {
        let rows = self
            .rows(
                "SELECT least(
                     (SELECT due_ms FROM actiongate_deliveries
                      WHERE lane = $1 AND dead_ms IS NULL AND id <> ALL($2)
                        AND (leased_until <= $4 OR leased_by = $3)
                      ORDER BY due_ms LIMIT 1),
                     (SELECT min(leased_until) FROM actiongate_deliveries
                      WHERE lane = $1 AND dead_ms IS NULL AND leased_until > $4
                        AND leased_by <> $3))",
                vec![
                    Box::new(lane.to_string()),
                    Box::new(ids_of(skip)),
                    Box::new(self.core.instance.clone()),
                    Box::new(i64_of(now_ms())),
                ],
            )
            .await?;
        let due: Option<i64> = match rows.first() {
            Some(row) => row.try_get(0).map_err(bad_row)?,
            None => None,
        };
        Ok(due.map(u64_of))
    }

    pub async fn load(&self, delivery: u64) -> Result<Option<(DeliveryRecord, Bytes)>, StoreError> {
        let id = i64_of(delivery);
        let rows = self
            .rows(
                concat!(
                    "SELECT ",
                    record_columns!(),
                    ", body FROM actiongate_deliveries d
                     JOIN actiongate_events e ON e.seq = d.event
                     WHERE d.id = $1 AND d.dead_ms IS NULL"
                ),
                vec![Box::new(id)],
            )
            .await;
        let found = rows.and_then(|rows| match rows.first() {
            None => Ok(None),
            Some(row) => {
                let record = record_of(row).map_err(bad_row)?;
                let body: Vec<u8> = row.try_get("body").map_err(bad_row)?;
                Ok(Some((record, Bytes::from(body))))
            }
        });
        if !matches!(found, Ok(Some(_))) {
            self.core.held().remove(&id);
        }
        found
    }

    /// Lanes that hold pending deliveries: one index probe per lane, not a scan of them all.
    pub async fn pending_lanes(&self) -> Result<BTreeSet<String>, StoreError> {
        let rows = self
            .rows(
                "WITH RECURSIVE lanes AS (
                     (SELECT lane FROM actiongate_deliveries
                      WHERE dead_ms IS NULL ORDER BY lane LIMIT 1)
                     UNION ALL
                     SELECT (SELECT d.lane FROM actiongate_deliveries d
                             WHERE d.dead_ms IS NULL AND d.lane > lanes.lane
                             ORDER BY d.lane LIMIT 1)
                     FROM lanes WHERE lanes.lane IS NOT NULL)
                 SELECT lane FROM lanes WHERE lane IS NOT NULL",
                Vec::new(),
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get::<_, String>(0).map_err(bad_row))
            .collect()
    }

    /// Lanes another live instance runs: their deliveries are no orphans, whatever this
    /// instance's config says.
    pub async fn lanes_run_elsewhere(&self) -> Result<HashSet<String>, StoreError> {
        let since = i64_of(now_ms().saturating_sub(millis(LANE_FRESH)));
        let rows = self
            .rows(
                "SELECT DISTINCT lane FROM actiongate_lanes WHERE instance <> $1 AND seen_ms > $2",
                vec![Box::new(self.core.instance.clone()), Box::new(since)],
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get::<_, String>(0).map_err(bad_row))
            .collect()
    }

    /// The lanes this instance runs from now on; announced to the others at once.
    pub fn announce_lanes(&self, lanes: Vec<String>) {
        *self.core.lanes.lock().unwrap_or_else(|e| e.into_inner()) = lanes;
        // Announced by a task of the store's runtime, which starts with the first lane (after
        // a daemonizing server's fork: threads do not survive it).
        self.core.lanes_changed.notify_one();
    }

    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeliveryRecord>, StoreError> {
        let rows = self
            .rows(
                concat!(
                    "SELECT ",
                    record_columns!(),
                    " FROM actiongate_deliveries d WHERE dead_ms IS NOT NULL ORDER BY id LIMIT $1"
                ),
                vec![Box::new(i64::try_from(limit).unwrap_or(i64::MAX))],
            )
            .await?;
        rows.iter()
            .map(|row| record_of(row).map_err(bad_row))
            .collect()
    }

    pub async fn counts(&self) -> Result<StoreCounts, StoreError> {
        let rows = self
            .rows(
                "SELECT (SELECT count(*) FROM actiongate_events),
                        (SELECT count(*) FROM actiongate_deliveries WHERE dead_ms IS NULL),
                        (SELECT count(*) FROM actiongate_keys WHERE expires_ms > $1),
                        (SELECT count(*) FROM actiongate_deliveries WHERE dead_ms IS NOT NULL)",
                vec![Box::new(i64_of(now_ms()))],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Storage("counts: no row".into()))?;
        let get = |i: usize| row.try_get::<_, i64>(i).map(u64_of).map_err(bad_row);
        Ok(StoreCounts {
            events: get(0)?,
            pending: get(1)?,
            dedup_keys: get(2)?,
            dead: get(3)?,
        })
    }

    /// Why the database cannot be used right now, if it cannot.
    pub fn down(&self) -> Option<StoreError> {
        if !self.core.is_down.load(Ordering::Acquire) {
            return None;
        }
        self.core.down_reason().map(StoreError::Unavailable)
    }

    pub fn work_notified(&self) -> tokio::sync::futures::Notified<'_> {
        // The runtime must run for NOTIFY to be heard; a lane looking for work starts it.
        let _ = self.runtime.handle();
        self.core.work.notified()
    }
}

impl StoreRuntime {
    fn handle(&self) -> Result<Handle, StoreError> {
        self.start().map(|s| s.0)
    }

    fn appends(&self) -> Result<mpsc::Sender<Pending>, StoreError> {
        self.start().map(|s| s.1)
    }

    fn start(&self) -> Result<(Handle, mpsc::Sender<Pending>), StoreError> {
        let mut started = self.started.lock().map_err(|_| StoreError::Closed)?;
        if let Some(s) = started.as_ref() {
            return Ok((s.handle.clone(), s.appends.clone()));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Storage(format!("cannot start the store's runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (appends, queue) = mpsc::channel(QUEUE_DEPTH);
        let (stop, stopped) = oneshot::channel::<()>();
        let core = self.core.clone();
        handle.spawn(committer(core.clone(), queue));
        handle.spawn(listener(core.clone()));
        handle.spawn(probe(core.clone()));
        handle.spawn(maintenance(core.clone()));
        handle.spawn(announcer(core.clone()));
        handle.spawn(renew_leases(core));
        let thread = std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| StoreError::Storage(format!("cannot start the store's thread: {e}")))?;
        *started = Some(Started {
            handle: handle.clone(),
            appends: appends.clone(),
            stop: Some(stop),
            thread: Some(thread),
        });
        Ok((handle, appends))
    }
}

type TxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'a>>;

impl Core {
    fn held(&self) -> MutexGuard<'_, HashMap<i64, Claim>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn down_reason(&self) -> Option<String> {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn mark_down(&self, why: String) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if down.is_none() {
            log::error!(
                "store: the database is unavailable: {why}; new events are answered 503 until \
                 it answers again"
            );
            self.metrics
                .spool_refusing(SpoolRefusal::DatabaseUnavailable, true);
            // Idle connections to that server would be handed out again: drop them all, so
            // that the next calls connect afresh (to whichever server is primary by then).
            self.pool.retain(|_, _| false);
            self.appends.retain(|_, _| false);
            self.renewals.retain(|_, _| false);
        }
        *down = Some(why);
        self.is_down.store(true, Ordering::Release);
        self.went_down.notify_one();
    }

    fn mark_up(&self) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if down.take().is_some() {
            log::info!("store: the database answers again; accepting events");
            self.metrics
                .spool_refusing(SpoolRefusal::DatabaseUnavailable, false);
        }
        self.is_down.store(false, Ordering::Release);
    }

    /// Turns a database error into the store's, marking the store down if the server is gone.
    fn failed(&self, e: &tokio_postgres::Error) -> StoreError {
        let why = describe(e);
        if is_unavailable(e) {
            self.mark_down(why.clone());
            StoreError::Unavailable(why)
        } else {
            StoreError::Storage(why)
        }
    }

    fn timed_out(&self) -> StoreError {
        let why = format!("no answer within {} s", OP_TIMEOUT.as_secs());
        self.mark_down(why.clone());
        StoreError::Unavailable(why)
    }

    async fn client(&self, pool: &Pool) -> Result<Object, StoreError> {
        match pool.get().await {
            Ok(client) => Ok(client),
            Err(deadpool_postgres::PoolError::Backend(e)) => Err(self.failed(&e)),
            // Every connection is in use: busy, not down.
            Err(deadpool_postgres::PoolError::Timeout(TimeoutType::Wait)) => Err(StoreError::Busy),
            Err(e) => {
                let why = e.to_string();
                self.mark_down(why.clone());
                Err(StoreError::Unavailable(why))
            }
        }
    }

    /// Runs `body` on a pooled connection within [`OP_TIMEOUT`]. A connection whose server
    /// failed or went silent is dropped, not put back.
    async fn on_client<T>(
        &self,
        body: impl for<'c> FnOnce(&'c Object) -> TxFuture<'c, T>,
    ) -> Result<T, StoreError> {
        self.on_client_of(&self.pool, body).await
    }

    /// [`Core::on_client`] on a connection of `pool`.
    async fn on_client_of<T>(
        &self,
        pool: &Pool,
        body: impl for<'c> FnOnce(&'c Object) -> TxFuture<'c, T>,
    ) -> Result<T, StoreError> {
        let client = self.client(pool).await?;
        match tokio::time::timeout(OP_TIMEOUT, body(&client)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if is_unavailable(&e) {
                    drop(Object::take(client));
                }
                Err(self.failed(&e))
            }
            Err(_) => {
                cancel(&client);
                drop(Object::take(client));
                Err(self.timed_out())
            }
        }
    }

    /// Runs `body` in a transaction on a connection of `pool` within [`OP_TIMEOUT`], again
    /// (up to twice) if it lost a deadlock or serialization race.
    async fn transaction<T>(
        &self,
        pool: &Pool,
        body: impl for<'t> Fn(&'t Transaction<'t>) -> TxFuture<'t, T>,
    ) -> Result<T, StoreError> {
        let mut client = self.client(pool).await?;
        let mut tries = 0;
        loop {
            tries += 1;
            let attempt = async {
                let tx = client.transaction().await?;
                let value = body(&tx).await?;
                tx.commit().await?;
                Ok::<T, tokio_postgres::Error>(value)
            };
            match tokio::time::timeout(OP_TIMEOUT, attempt).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if is_conflict(&e) && tries < 3 => continue,
                Ok(Err(e)) => {
                    if is_unavailable(&e) {
                        drop(Object::take(client));
                    }
                    return Err(self.failed(&e));
                }
                Err(_) => {
                    cancel(&client);
                    drop(Object::take(client));
                    return Err(self.timed_out());
                }
            }
        }
    }
}

/// Records a delivery's result and its report, if this instance still holds its claim.
/// Returns whether a report was stored (new work for other instances).
async fn settle(
    tx: &Transaction<'_>,
    id: i64,
    instance: &str,
    finish: &Finish,
    report: Option<&NewEvent>,
) -> Result<bool, tokio_postgres::Error> {
    // Each statement matches only a claim of this instance: if the claim ran out and another
    // instance took the delivery, that instance's result is the one that counts. (A claim
    // lost with a crashed server's last unflushed commits matches nothing either, and the
    // delivery is made again: at least once. Telling such a row from one another instance
    // has since recorded a result for needs a fencing token in the schema.)
    let changed = match finish {
        Finish::Delivered { .. } | Finish::Skipped => {
            let gone = tx
                .query_opt(
                    &tx.prepare_cached(
                        "DELETE FROM actiongate_deliveries
                     WHERE id = $1 AND dead_ms IS NULL AND leased_by = $2
                     RETURNING event",
                    )
                    .await?,
                    &[&id, &instance],
                )
                .await?;
            match gone {
                None => 0,
                Some(row) => {
                    let event: i64 = row.try_get(0)?;
                    // The event goes with its last delivery (one finishing at the same moment
                    // on another instance may leave it: maintenance takes those).
                    tx.execute(
                        &tx.prepare_cached(
                            "DELETE FROM actiongate_events WHERE seq = $1 AND NOT EXISTS (
                             SELECT 1 FROM actiongate_deliveries WHERE event = $1)",
                        )
                        .await?,
                        &[&event],
                    )
                    .await?;
                    1
                }
            }
        }
        Finish::Retry {
            at_ms,
            due_ms,
            error,
            status,
        } => {
            tx.execute(
                &tx.prepare_cached(
                    "UPDATE actiongate_deliveries SET attempts = attempts + 1,
                     first_attempt_ms = coalesce(first_attempt_ms, $2), last_attempt_ms = $2,
                     due_ms = $3, last_error = $4, last_status = $5,
                     leased_until = 0, leased_by = NULL
                 WHERE id = $1 AND dead_ms IS NULL AND leased_by = $6",
                )
                .await?,
                &[
                    &id,
                    &i64_of(*at_ms),
                    &i64_of(*due_ms),
                    &clean(error),
                    &status.map(i32::from),
                    &instance,
                ],
            )
            .await?
        }
        Finish::Dead {
            at_ms,
            error,
            status,
            attempted,
        } => {
            tx.execute(
                &tx.prepare_cached(
                    "UPDATE actiongate_deliveries SET
                     attempts = attempts + CASE WHEN $5 THEN 1 ELSE 0 END,
                     first_attempt_ms = CASE WHEN $5 THEN coalesce(first_attempt_ms, $2)
                                        ELSE first_attempt_ms END,
                     last_attempt_ms = CASE WHEN $5 THEN $2 ELSE last_attempt_ms END,
                     dead_ms = $2, last_error = $3, last_status = coalesce($4, last_status),
                     leased_until = 0, leased_by = NULL
                 WHERE id = $1 AND dead_ms IS NULL AND leased_by = $6",
                )
                .await?,
                &[
                    &id,
                    &i64_of(*at_ms),
                    &clean(error),
                    &status.map(i32::from),
                    attempted,
                    &instance,
                ],
            )
            .await?
        }
    };
    if changed == 0 {
        // Finished meanwhile, or taken over by another instance: nothing to record, nothing
        // to report.
        return Ok(false);
    }
    match report {
        Some(report) => Ok(accept(tx, report, None, 0, now_ms()).await?.is_some()),
        None => Ok(false),
    }
}

/// Runs the [`ACCEPT`] statement: the event's sequence number, or `None` if its key is held.
async fn accept(
    tx: &Transaction<'_>,
    event: &NewEvent,
    key: Option<&str>,
    expires_ms: u64,
    now: u64,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let upstreams: Vec<&str> = event.upstreams.iter().map(|u| u.as_ref()).collect();
    let statement = tx.prepare_cached(ACCEPT).await?;
    let row = tx
        .query_opt(
            &statement,
            &[
                &key.map(clean),
                &i64_of(expires_ms),
                &i64_of(now),
                &event.action.as_ref(),
                &clean(&event.event_id),
                &event.body.as_ref(),
                &upstreams,
            ],
        )
        .await?;
    row.map(|r| r.try_get::<_, i64>(0)).transpose()
}

/// Takes every append waiting and stores them in one transaction, up to [`COMMITTERS`]
/// transactions at once.
async fn committer(core: Arc<Core>, mut queue: mpsc::Receiver<Pending>) {
    let permits = Arc::new(Semaphore::new(COMMITTERS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let core = core.clone();
        tokio::spawn(async move {
            commit(&core, batch).await;
            drop(permit);
        });
    }
}

/// Stores a batch of appends in one transaction and answers each. Should a statement fail
/// for one of them (not the server), each is stored in a transaction of its own instead, so
/// that one bad event costs only its own answer.
async fn commit(core: &Core, batch: Vec<Pending>) {
    // An append whose caller stopped waiting (its deadline passed, it was answered 503) is
    // not stored late: a sender told "not accepted" must not see the action run.
    let mut batch: Vec<Pending> = batch.into_iter().filter(|p| !p.reply.is_closed()).collect();
    if batch.is_empty() {
        return;
    }
    // One order for the locks every transaction takes (keys, guard locks), so that two batches
    // holding the same events cannot wait for each other.
    batch.sort_by(|a, b| {
        (a.event.action.as_ref(), &a.event.event_id)
            .cmp(&(b.event.action.as_ref(), &b.event.event_id))
    });
    let started = Instant::now();
    let size = batch.len();
    let (jobs, replies): (Vec<(NewEvent, Admit)>, Vec<_>) = batch
        .into_iter()
        .map(|p| ((p.event, p.admit), p.reply))
        .unzip();
    let jobs = Arc::new(jobs);
    let all = store_jobs(core, jobs.clone(), (0..size).collect()).await;
    let answers: Vec<Result<Appended, StoreError>> = match all {
        Ok(answers) => {
            core.metrics.observe_spool_commit(size, started.elapsed());
            answers.into_iter().map(Ok).collect()
        }
        Err(StoreError::Storage(why)) if size > 1 => {
            log::warn!("store: a batch of {size} failed ({why}); storing its events one by one");
            let mut answers = Vec::with_capacity(size);
            for i in 0..size {
                let one = store_jobs(core, jobs.clone(), vec![i]).await;
                answers.push(one.map(|mut a| a.remove(0)));
            }
            answers
        }
        Err(e) => vec![Err(e); size],
    };
    if answers
        .iter()
        .any(|a| matches!(a, Ok(Appended::Accepted(_))))
    {
        core.work.notify_waiters();
        core.notify_others.notify_one();
    }
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}

/// Stores `jobs[i]` for each `i` of `which` in one transaction.
async fn store_jobs(
    core: &Core,
    jobs: Arc<Vec<(NewEvent, Admit)>>,
    which: Vec<usize>,
) -> Result<Vec<Appended>, StoreError> {
    let window = core.dedup_window_ms;
    let which = Arc::new(which);
    core.transaction(&core.appends, |tx| {
        let (jobs, which) = (jobs.clone(), which.clone());
        Box::pin(async move {
            let now = now_ms();
            let mut answers = Vec::with_capacity(which.len());
            for &i in which.iter() {
                let (event, admit) = &jobs[i];
                answers.push(admit_one(tx, event, admit, now, window).await?);
            }
            Ok(answers)
        })
    })
    .await
}

/// Stores one append inside the batch's transaction, or says why not.
async fn admit_one(
    tx: &Transaction<'_>,
    event: &NewEvent,
    admit: &Admit,
    now: u64,
    window: u64,
) -> Result<Appended, tokio_postgres::Error> {
    let expires = now.saturating_add(window);
    let check = match admit {
        Admit::Push(Some(check)) => check,
        Admit::Push(None) => {
            let key = dedup_key(&event.action, &event.event_id);
            let seq = accept(tx, event, Some(&key), expires, now).await?;
            return Ok(seq.map_or(Appended::Duplicate, |s| Appended::Accepted(u64_of(s))));
        }
        Admit::Report { once } => {
            let key = once.then(|| guard::report_key(&event.action, &event.event_id));
            let seq = accept(tx, event, key.as_deref(), expires, now).await?;
            return Ok(seq.map_or(Appended::Duplicate, |s| Appended::Accepted(u64_of(s))));
        }
    };
    // Guarded: decided one push of the action at a time across the cluster, as the spool's
    // single writer does, so that two racing pushes cannot both pass a limit.
    let action: &str = &event.action;
    tx.execute(
        &tx.prepare_cached(
            "SELECT pg_advisory_xact_lock(hashtextextended('actiongate guard ' || $1, 0))",
        )
        .await?,
        &[&action],
    )
    .await?;
    let key = dedup_key(action, &event.event_id);
    if live_expiry(tx, &key, now).await?.is_some() {
        return Ok(Appended::Duplicate);
    }
    if let Some(guarded) = guard(tx, action, check, now).await? {
        return Ok(Appended::Guarded(guarded));
    }
    let Some(seq) = accept(tx, event, Some(&key), expires, now).await? else {
        return Ok(Appended::Duplicate);
    };
    let mut keys = Vec::new();
    if let Some((incident, window)) = &check.once_per_incident {
        keys.push((
            guard::once_key(action, incident),
            now.saturating_add(millis(*window)),
        ));
    }
    if check.max_per_hour.is_some() {
        keys.push((
            guard::rate_key(action, u64_of(seq)),
            now.saturating_add(HOUR_MS),
        ));
    }
    for (key, expires) in keys {
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO actiongate_keys (key, expires_ms) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET expires_ms = EXCLUDED.expires_ms",
            )
            .await?,
            &[&clean(&key), &i64_of(expires)],
        )
        .await?;
    }
    Ok(Appended::Accepted(u64_of(seq)))
}

/// When `key` expires, if it is held now.
async fn live_expiry(
    tx: &Transaction<'_>,
    key: &str,
    now: u64,
) -> Result<Option<u64>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            &tx.prepare_cached(
                "SELECT expires_ms FROM actiongate_keys WHERE key = $1 AND expires_ms > $2",
            )
            .await?,
            &[&clean(key), &i64_of(now)],
        )
        .await?;
    row.map(|r| r.try_get::<_, i64>(0).map(u64_of)).transpose()
}

/// Which guard, if any, refuses a push of `action` now. The order is the contract's, and the
/// spool writer's: `human_only`, `once_per_incident`, `max_per_hour`.
async fn guard(
    tx: &Transaction<'_>,
    action: &str,
    check: &GuardCheck,
    now: u64,
) -> Result<Option<Guarded>, tokio_postgres::Error> {
    if check.not_human {
        return Ok(Some(Guarded::HumanOnly));
    }
    if let Some((incident, _)) = &check.once_per_incident {
        if let Some(frees_ms) = live_expiry(tx, &guard::once_key(action, incident), now).await? {
            return Ok(Some(Guarded::OncePerIncident { frees_ms }));
        }
    }
    if let Some(limit) = check.max_per_hour {
        // Rate keys of the action sort together (the key column compares bytes): one range.
        let (low, high) = guard::rate_key_range(action);
        let rows = tx
            .query(
                &tx.prepare_cached(
                    "SELECT expires_ms FROM actiongate_keys
                 WHERE key >= $1 AND key < $2 AND expires_ms > $3 ORDER BY expires_ms",
                )
                .await?,
                &[&clean(&low), &clean(&high), &i64_of(now)],
            )
            .await?;
        let runs: Vec<u64> = rows
            .iter()
            .map(|r| r.try_get::<_, i64>(0).map(u64_of))
            .collect::<Result<_, _>>()?;
        let limit_runs = usize::try_from(limit).unwrap_or(usize::MAX);
        if runs.len() >= limit_runs {
            let frees_ms = runs[runs.len() - limit_runs];
            return Ok(Some(Guarded::MaxPerHour { limit, frees_ms }));
        }
    }
    Ok(None)
}

/// A pool of up to `size` connections to `pg`.
fn pool_of(pg: &tokio_postgres::Config, size: usize) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        pg.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(APPEND_DEADLINE))
        .create_timeout(Some(Duration::from_secs(2)))
        .recycle_timeout(Some(Duration::from_secs(1)))
        .build()
        .map_err(|e| StoreError::Storage(format!("spool.postgres: {e}")))
}

/// Creates the schema, or checks that it is this build's, under an advisory lock so that
/// instances starting together do not race. With `durable`, also checks that the connection's
/// options took effect: its commits wait for the disk and any synchronous standby, as the acks
/// rely on, and an idle transaction times out.
fn migrate(pg: &tokio_postgres::Config, wait: Duration, durable: bool) -> Result<(), StoreError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Storage(format!("cannot start a runtime: {e}")))?;
    runtime.block_on(async {
        let deadline = Instant::now() + wait;
        let (mut client, connection) = loop {
            match pg.connect(NoTls).await {
                Ok(connected) => break connected,
                Err(e) if Instant::now() < deadline => {
                    log::warn!(
                        "store: cannot reach the database yet ({}); trying again",
                        describe(&e)
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    return Err(StoreError::Unavailable(format!(
                        "no read-write server answered: {}",
                        describe(&e)
                    )))
                }
            }
        };
        let connection = tokio::spawn(connection);
        let storage = |e: tokio_postgres::Error| StoreError::Storage(describe(&e));
        if durable {
            let row = client
                .query_one(
                    "SELECT current_setting('synchronous_commit'), \
                            current_setting('idle_in_transaction_session_timeout')",
                    &[],
                )
                .await
                .map_err(storage)?;
            let level: String = row.try_get(0).map_err(storage)?;
            let idle: String = row.try_get(1).map_err(storage)?;
            if idle != "10s" {
                return Err(StoreError::Storage(format!(
                    "the connection's options (-c idle_in_transaction_session_timeout=10s …) did \
                     not take effect (it is {idle}); is a connection pooler dropping them? \
                     Connect to PostgreSQL directly"
                )));
            }
            if level == "off" || level == "local" {
                return Err(StoreError::Storage(format!(
                    "acks would commit with synchronous_commit={level}: the connection's \
                     options (-c synchronous_commit=on) did not take effect; is a connection \
                     pooler dropping them? Connect to PostgreSQL directly, or name \
                     synchronous_commit in the URL's options to choose knowingly"
                )));
            }
        }
        let tx = client.transaction().await.map_err(storage)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('actiongate schema', 0))",
            &[],
        )
        .await
        .map_err(storage)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS actiongate_schema (
                 id integer PRIMARY KEY CHECK (id = 1),
                 version integer NOT NULL
             )",
        )
        .await
        .map_err(storage)?;
        let version: Option<i32> = tx
            .query_opt("SELECT version FROM actiongate_schema WHERE id = 1", &[])
            .await
            .map_err(storage)?
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(storage)?;
        match version {
            None => {
                tx.batch_execute(SCHEMA).await.map_err(storage)?;
                tx.execute(
                    "INSERT INTO actiongate_schema (id, version) VALUES (1, $1)",
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(storage)?;
                log::info!("store: created the actiongate schema (version {SCHEMA_VERSION})");
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::Storage(format!(
                    "the database holds actiongate schema version {v}, newer than this build's \
                     ({SCHEMA_VERSION}): run that version (or a later one); nothing was changed"
                )));
            }
            Some(_) => {}
        }
        tx.commit().await.map_err(storage)?;
        drop(client);
        let _ = connection.await;
        Ok(())
    })
}

/// Holds a connection outside the pool that LISTENs for committed work and wakes the lanes
/// when any instance commits some, and that sends this instance's NOTIFYs, after their
/// commits, one for however many commits asked since the last. Reconnects with backoff;
/// after a reconnect it wakes the lanes once, for what was committed while it could not hear.
async fn listener(core: Arc<Core>) {
    let mut pause = PROBE_FIRST;
    loop {
        let connected = tokio::time::timeout(OP_TIMEOUT, core.pg.connect(NoTls)).await;
        if let Ok(Ok((client, mut connection))) = connected {
            pause = PROBE_FIRST;
            let (tx, mut rx) = mpsc::unbounded_channel();
            let driver = tokio::spawn(async move {
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(_))) => {
                            if tx.send(()).is_err() {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return,
                    }
                }
            });
            // A NOTIFY is a transaction of its own with nothing to make durable: it need not
            // wait for a standby.
            let listening = tokio::time::timeout(
                OP_TIMEOUT,
                client.batch_execute(&format!("SET synchronous_commit = local; LISTEN {CHANNEL}")),
            )
            .await;
            if matches!(listening, Ok(Ok(()))) {
                // Whatever was committed while this connection was away.
                core.work.notify_waiters();
                loop {
                    tokio::select! {
                        heard = rx.recv() => match heard {
                            Some(()) => core.work.notify_waiters(),
                            None => break,
                        },
                        _ = core.notify_others.notified() => {
                            let sent = tokio::time::timeout(
                                OP_TIMEOUT,
                                client.batch_execute(&format!("NOTIFY {CHANNEL}")),
                            )
                            .await;
                            if !matches!(sent, Ok(Ok(()))) {
                                // Sent again on the next connection: other instances then
                                // look at once.
                                core.notify_others.notify_one();
                                break;
                            }
                        }
                    }
                }
            }
            driver.abort();
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PROBE_MAX);
    }
}

/// While the store is marked down, connects afresh with backoff (a pooled connection may be
/// one to the old server), and clears the mark at the first read-write server that answers.
async fn probe(core: Arc<Core>) {
    loop {
        if !core.is_down.load(Ordering::Acquire) {
            core.went_down.notified().await;
            continue;
        }
        let mut pause = PROBE_FIRST;
        let mut said: Option<String> = None;
        while core.is_down.load(Ordering::Acquire) {
            match durable_commit(&core.probe).await {
                Ok(()) => {
                    core.mark_up();
                    core.work.notify_waiters();
                    break;
                }
                // Why it is still down, once per reason, and in /readyz: a probe that can never
                // succeed (no privilege to write, a standby gone for good) must say so.
                Err(why) => {
                    if said.as_ref() != Some(&why) {
                        log::warn!("store: still unavailable: {why}");
                        said = Some(why.clone());
                    }
                    core.mark_down(why);
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PROBE_MAX);
        }
    }
}

/// Whether a new connection reaches a server that takes writes and commits one as an ack
/// would (with a synchronous standby, the standby has it), within [`OP_TIMEOUT`]. A server
/// that answers but cannot commit (its synchronous standby is gone) is still down: marking it
/// up would let every append wait out its deadline and answer 503 anyway, a connection stuck
/// at each.
async fn durable_commit(pg: &tokio_postgres::Config) -> Result<(), String> {
    let (client, connection) = tokio::time::timeout(OP_TIMEOUT, pg.connect(NoTls))
        .await
        .map_err(|_| format!("no answer within {} s", OP_TIMEOUT.as_secs()))?
        .map_err(|e| describe(&e))?;
    let driver = tokio::spawn(connection);
    let check = async {
        let row = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| describe(&e))?;
        match row.try_get::<_, bool>(0) {
            Ok(false) => {}
            Ok(true) => return Err("the server is a standby".to_string()),
            Err(e) => return Err(e.to_string()),
        }
        // A row version written and committed: the commit waits for the disk and for a
        // synchronous standby as an ack's does. No row would mean no write, and a commit that
        // proves nothing: say so rather than pass.
        match client
            .execute(
                "UPDATE actiongate_schema SET version = version WHERE id = 1",
                &[],
            )
            .await
        {
            Ok(1) => Ok(()),
            Ok(_) => Err("actiongate_schema has no row: was the schema dropped?".to_string()),
            Err(e) => Err(format!("cannot write actiongate_schema: {}", describe(&e))),
        }
    };
    let checked = tokio::time::timeout(OP_TIMEOUT, check).await;
    if checked.is_err() {
        cancel(&client);
    }
    // The connection's task ends by itself once the client is gone.
    drop((client, driver));
    checked.unwrap_or_else(|_| {
        Err(format!(
            "no commit within {} s (is a synchronous standby gone?)",
            OP_TIMEOUT.as_secs()
        ))
    })
}

/// Asks the server to stop what the session of `client` is doing, before the gateway drops a
/// connection that timed out. A commit waiting for a synchronous standby that is gone never
/// notices its client leave: without this each timed-out commit would hold a server
/// connection (and its locks) until the standby came back, and the pools would reconnect
/// past `max_connections`.
fn cancel(client: &tokio_postgres::Client) {
    let token = client.cancel_token();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(OP_TIMEOUT, token.cancel_query(NoTls)).await;
    });
}

/// Renews the leases of the deliveries this instance's attempts hold.
async fn renew_leases(core: Arc<Core>) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        // Each claim as it is now: one taken again meanwhile is a claim this renewal does not
        // speak for. Every one of these had committed before the renewal is sent.
        let claims: Vec<(i64, Instant, Duration)> = core
            .held()
            .iter()
            .map(|(&id, c)| (id, c.taken, c.lease))
            .collect();
        if claims.is_empty() {
            continue;
        }
        let instance = core.instance.clone();
        let sent = Instant::now();
        let wall = now_ms();
        let asked: Vec<i64> = claims.iter().map(|&(id, _, _)| id).collect();
        let until: Vec<i64> = claims
            .iter()
            .map(|&(_, _, lease)| i64_of(wall.saturating_add(millis(lease))))
            .collect();
        let renewed = core
            .on_client_of(&core.renewals, move |client| {
                Box::pin(async move {
                    // Not a claim already given back (`leased_until = 0`): a result recorded
                    // meanwhile stays recorded.
                    let rows = client
                        .query(
                            &client
                                .prepare_cached(
                                    "UPDATE actiongate_deliveries d SET leased_until = u.until
                             FROM unnest($1::bigint[], $2::bigint[]) AS u(id, until)
                             WHERE d.id = u.id AND d.leased_by = $3 AND d.dead_ms IS NULL
                               AND d.leased_until > 0
                             RETURNING d.id",
                                )
                                .await?,
                            &[&asked, &until, &instance],
                        )
                        .await?;
                    rows.iter()
                        .map(|row| row.try_get::<_, i64>(0))
                        .collect::<Result<HashSet<i64>, _>>()
                })
            })
            .await;
        match renewed {
            Ok(renewed) => {
                let mut held = core.held();
                for (id, taken, lease) in claims {
                    // A claim finished or taken again meanwhile is not the one renewed.
                    let Some(claim) = held.get_mut(&id).filter(|c| c.taken == taken) else {
                        continue;
                    };
                    if renewed.contains(&id) {
                        claim.until = sent + lease;
                    } else {
                        // Finished, given back, or taken by another instance whose clock saw
                        // the lease run out: this instance must not send it.
                        held.remove(&id);
                    }
                }
            }
            Err(e) => log::warn!("store: cannot renew this instance's claims: {e}"),
        }
    }
}

/// Announces this instance's lanes at once when they change, and again at every round.
async fn announcer(core: Arc<Core>) {
    loop {
        tokio::select! {
            _ = core.lanes_changed.notified() => {}
            _ = tokio::time::sleep(MAINTENANCE_EVERY) => {}
        }
        let lanes = core.lanes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let instance = core.instance.clone();
        let announced = core
            .on_client(move |client| {
                Box::pin(async move {
                    let now = i64_of(now_ms());
                    client
                        .execute(
                            &client
                                .prepare_cached(
                                    "INSERT INTO actiongate_lanes (lane, instance, seen_ms)
                             SELECT unnest($1::text[]), $2, $3
                             ON CONFLICT (lane, instance) DO UPDATE SET seen_ms = EXCLUDED.seen_ms",
                                )
                                .await?,
                            &[&lanes, &instance, &now],
                        )
                        .await?;
                    // Instances long gone: their rows only slow the lookups down.
                    let old = now.saturating_sub(i64_of(millis(LANE_FRESH) * 20));
                    client
                        .execute(
                            &client
                                .prepare_cached("DELETE FROM actiongate_lanes WHERE seen_ms < $1")
                                .await?,
                            &[&old],
                        )
                        .await
                })
            })
            .await;
        if let Err(e) = announced {
            log::warn!("store: cannot announce this instance's lanes: {e}");
        }
    }
}

/// Deletes expired keys and events whose deliveries are all done, and sets the pending and
/// dead-letter gauges to the cluster's counts.
async fn maintenance(core: Arc<Core>) {
    let mut seen: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(MAINTENANCE_EVERY).await;
        if let Err(e) = purge(&core).await {
            log::warn!("store: maintenance failed: {e}");
            continue;
        }
        let rows = core
            .on_client(|client| {
                Box::pin(async move {
                    client
                        .query(
                            &client
                                .prepare_cached(
                                    "SELECT upstream, count(*) FILTER (WHERE dead_ms IS NULL),
                                    count(*) FILTER (WHERE dead_ms IS NOT NULL)
                             FROM actiongate_deliveries GROUP BY upstream",
                                )
                                .await?,
                            &[],
                        )
                        .await
                })
            })
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                log::warn!("store: cannot count deliveries: {e}");
                continue;
            }
        };
        let mut counts: HashMap<String, (i64, i64)> = HashMap::new();
        for row in &rows {
            if let (Ok(upstream), Ok(pending), Ok(dead)) = (
                row.try_get::<_, String>(0),
                row.try_get::<_, i64>(1),
                row.try_get::<_, i64>(2),
            ) {
                counts.insert(upstream, (pending, dead));
            }
        }
        for (upstream, (pending, dead)) in &counts {
            core.metrics.pending_deliveries(upstream).set(*pending);
            core.metrics.dead_letters(upstream).set(*dead);
        }
        for gone in seen.iter().filter(|u| !counts.contains_key(*u)) {
            core.metrics.pending_deliveries(gone).set(0);
            core.metrics.dead_letters(gone).set(0);
        }
        seen = counts.into_keys().collect();
    }
}

/// Expired keys, and events left without deliveries, in slices. Instances run this at once:
/// rows another is deleting are skipped, not waited for.
async fn purge(core: &Core) -> Result<(), StoreError> {
    for _ in 0..PURGE_ROUNDS {
        let deleted = core
            .on_client(|client| {
                Box::pin(async move {
                    let now = i64_of(now_ms());
                    // The outer check again: a key renewed since the inner select stays.
                    let keys = client
                        .execute(
                            &client.prepare_cached("DELETE FROM actiongate_keys WHERE expires_ms <= $1 AND key IN (
                                 SELECT key FROM actiongate_keys WHERE expires_ms <= $1
                                 LIMIT $2 FOR UPDATE SKIP LOCKED)").await?,
                            &[&now, &PURGE_SLICE],
                        )
                        .await?;
                    // Two deliveries of one event finished at once can each see the other's
                    // row and leave the event.
                    let events = client
                        .execute(
                            &client.prepare_cached("DELETE FROM actiongate_events WHERE seq IN (
                                 SELECT seq FROM actiongate_events e WHERE NOT EXISTS (
                                     SELECT 1 FROM actiongate_deliveries d WHERE d.event = e.seq)
                                 LIMIT $1 FOR UPDATE SKIP LOCKED)
                             AND NOT EXISTS (SELECT 1 FROM actiongate_deliveries d
                                             WHERE d.event = actiongate_events.seq)").await?,
                            &[&PURGE_SLICE],
                        )
                        .await?;
                    Ok(keys.max(events))
                })
            })
            .await?;
        if deleted < PURGE_SLICE as u64 {
            break;
        }
    }
    Ok(())
}

/// This instance's name in `leased_by`: host, process and a random part, because containers
/// sharing a host name (host networking) all run as process 1.
fn instance_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let host = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".to_string()
    };
    format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..))
}
