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
//!   attempt runs. The claims of an instance that died are taken over when their lease runs
//!   out; LISTEN/NOTIFY wakes every instance's lanes when work is committed.
//! - **The database down or failing over**: the first failed call marks the store down, appends
//!   are refused at once (503 with Retry-After) and `/readyz` says so, while a probe reconnects
//!   with backoff; the first read-write answer (a multi-host URL with
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Transaction,
};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::guard::{self, GuardCheck, Guarded, HOUR_MS};
use super::{
    dedup_key, now_ms, Appended, DeliveryRecord, Finish, NewEvent, StoreCounts, StoreError,
};
use crate::metrics::{Metrics, SpoolRefusal};

/// The schema this build writes. A database at a newer version is refused at start.
const SCHEMA_VERSION: i32 = 1;

/// How long a claim holds a delivery without being renewed. An instance renews the claims of
/// its running attempts every third of it; a dead instance's claims are free this long after
/// its last renewal.
const LEASE: Duration = Duration::from_secs(30);

/// See [`super::Store::orphan_grace`].
pub const ORPHAN_GRACE: Duration = Duration::from_secs(600);

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
/// Rows deleted per maintenance statement, so that a large purge never holds locks for long.
const PURGE_SLICE: i64 = 10_000;

const CHANNEL: &str = "actiongate_work";

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Postgres {
    core: Arc<Core>,
    runtime: Arc<StoreRuntime>,
}

/// What the store's tasks share.
struct Core {
    pool: Pool,
    /// For the LISTEN connection, which lives outside the pool.
    pg: tokio_postgres::Config,
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
    held: Mutex<HashSet<i64>>,
    metrics: Arc<Metrics>,
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
CREATE INDEX actiongate_deliveries_dead ON actiongate_deliveries (id) WHERE dead_ms IS NOT NULL;
CREATE INDEX actiongate_deliveries_event ON actiongate_deliveries (event);
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
const RECORD_COLUMNS: &str = "d.id, d.event, d.action, d.upstream, d.event_id, d.accepted_ms, \
     d.attempts, d.due_ms, d.first_attempt_ms, d.last_attempt_ms, d.last_error, d.last_status, \
     d.dead_ms";

fn record_of(row: &Row) -> Result<DeliveryRecord, tokio_postgres::Error> {
    Ok(DeliveryRecord {
        id: u64_of(row.try_get("id")?),
        event: u64_of(row.try_get("event")?),
        action: row.try_get("action")?,
        upstream: row.try_get("upstream")?,
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
        last_error: row.try_get("last_error")?,
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
        Some(code) => {
            *code == SqlState::READ_ONLY_SQL_TRANSACTION
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || code.code().starts_with("08")
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
        pg.keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .application_name("actiongate");
        migrate(&pg, wait)?;
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(APPEND_DEADLINE))
            .create_timeout(Some(Duration::from_secs(2)))
            .recycle_timeout(Some(Duration::from_secs(1)))
            .build()
            .map_err(|e| StoreError::Storage(format!("spool.postgres: {e}")))?;
        let core = Arc::new(Core {
            pool,
            pg,
            dedup_window_ms: millis(dedup_window),
            instance: instance_name(),
            work: Arc::new(Notify::new()),
            down: Mutex::new(None),
            is_down: AtomicBool::new(false),
            went_down: Notify::new(),
            held: Mutex::new(HashSet::new()),
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
                core.transaction(move |tx| {
                    let finish = finish.clone();
                    let report = report.clone();
                    Box::pin(async move { settle(tx, id, &finish, report.as_ref()).await })
                })
                .await
            })
            .await;
        self.core.held().remove(&id);
        if let Ok(true) = result {
            self.core.work.notify_waiters();
        }
        result.map(|_| ())
    }

    pub async fn replay(&self, id: Option<u64>) -> Result<usize, StoreError> {
        let core = self.core.clone();
        let replayed = self
            .run(async move {
                core.transaction(move |tx| {
                    Box::pin(async move {
                        let n = tx
                            .execute(
                                "UPDATE actiongate_deliveries
                                 SET dead_ms = NULL, attempts = 0, due_ms = $1, leased_until = 0
                                 WHERE dead_ms IS NOT NULL AND ($2::bigint IS NULL OR id = $2)",
                                &[&i64_of(now_ms()), &id.map(i64_of)],
                            )
                            .await?;
                        if n > 0 {
                            tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
                        }
                        Ok(usize::try_from(n).unwrap_or(usize::MAX))
                    })
                })
                .await
            })
            .await?;
        if replayed > 0 {
            self.core.work.notify_waiters();
        }
        Ok(replayed)
    }

    pub async fn purge(&self, id: u64) -> Result<bool, StoreError> {
        let core = self.core.clone();
        self.run(async move {
            let client = core.client().await?;
            let n = client
                .execute(
                    "DELETE FROM actiongate_deliveries WHERE id = $1 AND dead_ms IS NOT NULL",
                    &[&i64_of(id)],
                )
                .await
                .map_err(|e| core.failed(&e))?;
            Ok(n > 0)
        })
        .await
    }

    /// Claims up to `limit` due deliveries of `lane` for this instance: unclaimed ones, ones
    /// whose claim ran out, and this instance's own whose attempt ended without a recorded
    /// result (the database went away mid-attempt): `skip` holds every attempt still running
    /// here, so taking those again at once sends nothing twice.
    pub async fn claim(
        &self,
        lane: &str,
        now: u64,
        limit: usize,
        skip: &HashSet<u64>,
    ) -> Result<Vec<u64>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let core = self.core.clone();
        let lane = lane.to_string();
        let skip: Vec<i64> = skip.iter().map(|&id| i64_of(id)).collect();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let ids = self
            .run(async move {
                let client = core.client().await?;
                let wall = now_ms();
                let rows = client
                    .query(
                        "UPDATE actiongate_deliveries SET leased_until = $4, leased_by = $5
                         WHERE id IN (
                             SELECT id FROM actiongate_deliveries
                             WHERE lane = $1 AND dead_ms IS NULL AND due_ms <= $2
                               AND (leased_until <= $6 OR leased_by = $5) AND id <> ALL($3)
                             ORDER BY due_ms, id LIMIT $7
                             FOR UPDATE SKIP LOCKED)
                         RETURNING id",
                        &[
                            &lane,
                            &i64_of(now),
                            &skip,
                            &i64_of(wall.saturating_add(millis(LEASE))),
                            &core.instance,
                            &i64_of(wall),
                            &limit,
                        ],
                    )
                    .await
                    .map_err(|e| core.failed(&e))?;
                let mut ids = Vec::with_capacity(rows.len());
                for row in rows {
                    ids.push(row.try_get::<_, i64>(0).map_err(bad_row)?);
                }
                ids.sort_unstable();
                core.held().extend(ids.iter().copied());
                Ok(ids)
            })
            .await?;
        Ok(ids.into_iter().map(u64_of).collect())
    }

    /// Gives up the claim of a delivery whose attempt ended without a recorded result (its
    /// load failed): its lease then runs out and it is taken again.
    pub fn release(&self, delivery: u64) {
        self.core.held().remove(&i64_of(delivery));
    }

    pub async fn next_due_ms(
        &self,
        lane: &str,
        skip: &HashSet<u64>,
    ) -> Result<Option<u64>, StoreError> {
        let core = self.core.clone();
        let lane = lane.to_string();
        let skip: Vec<i64> = skip.iter().map(|&id| i64_of(id)).collect();
        self.run(async move {
            let client = core.client().await?;
            let row = client
                .query_one(
                    "SELECT min(greatest(due_ms,
                                CASE WHEN leased_by = $3 THEN 0 ELSE leased_until END))
                     FROM actiongate_deliveries
                     WHERE lane = $1 AND dead_ms IS NULL AND id <> ALL($2)",
                    &[&lane, &skip, &core.instance],
                )
                .await
                .map_err(|e| core.failed(&e))?;
            let due: Option<i64> = row.try_get(0).map_err(bad_row)?;
            Ok(due.map(u64_of))
        })
        .await
    }

    pub async fn load(&self, delivery: u64) -> Result<Option<(DeliveryRecord, Bytes)>, StoreError> {
        let core = self.core.clone();
        let id = i64_of(delivery);
        let found = self
            .run(async move {
                let client = core.client().await?;
                let row = client
                    .query_opt(
                        &format!(
                            "SELECT {RECORD_COLUMNS}, body FROM actiongate_deliveries d
                             JOIN actiongate_events e ON e.seq = d.event
                             WHERE d.id = $1 AND d.dead_ms IS NULL"
                        ),
                        &[&id],
                    )
                    .await
                    .map_err(|e| core.failed(&e))?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let record = record_of(&row).map_err(bad_row)?;
                let body: Vec<u8> = row.try_get("body").map_err(bad_row)?;
                Ok(Some((record, Bytes::from(body))))
            })
            .await;
        if !matches!(found, Ok(Some(_))) {
            self.core.held().remove(&id);
        }
        found
    }

    pub async fn pending_lanes(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let core = self.core.clone();
        self.run(async move {
            let client = core.client().await?;
            let rows = client
                .query(
                    "SELECT lane, count(*) FROM actiongate_deliveries WHERE dead_ms IS NULL
                     GROUP BY lane",
                    &[],
                )
                .await
                .map_err(|e| core.failed(&e))?;
            let mut lanes = BTreeMap::new();
            for row in rows {
                let lane: String = row.try_get(0).map_err(bad_row)?;
                let n: i64 = row.try_get(1).map_err(bad_row)?;
                lanes.insert(lane, u64_of(n));
            }
            Ok(lanes)
        })
        .await
    }

    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeliveryRecord>, StoreError> {
        let core = self.core.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async move {
            let client = core.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {RECORD_COLUMNS} FROM actiongate_deliveries d
                         WHERE dead_ms IS NOT NULL ORDER BY id LIMIT $1"
                    ),
                    &[&limit],
                )
                .await
                .map_err(|e| core.failed(&e))?;
            rows.iter()
                .map(|row| record_of(row).map_err(bad_row))
                .collect()
        })
        .await
    }

    pub async fn counts(&self) -> Result<StoreCounts, StoreError> {
        let core = self.core.clone();
        self.run(async move {
            let client = core.client().await?;
            let now = i64_of(now_ms());
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM actiongate_events),
                            (SELECT count(*) FROM actiongate_deliveries WHERE dead_ms IS NULL),
                            (SELECT count(*) FROM actiongate_keys WHERE expires_ms > $1),
                            (SELECT count(*) FROM actiongate_deliveries WHERE dead_ms IS NOT NULL)",
                    &[&now],
                )
                .await
                .map_err(|e| core.failed(&e))?;
            let get = |i: usize| -> Result<u64, StoreError> {
                row.try_get::<_, i64>(i).map(u64_of).map_err(bad_row)
            };
            Ok(StoreCounts {
                events: get(0)?,
                pending: get(1)?,
                dedup_keys: get(2)?,
                dead: get(3)?,
            })
        })
        .await
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

type TxFuture<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'a>>;

impl Core {
    fn held(&self) -> MutexGuard<'_, HashSet<i64>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn down_reason(&self) -> Option<String> {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn mark_down(&self, why: String) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if down.is_none() {
            log::error!("store: the database is unavailable: {why}; new events are answered 503 until it answers again");
            self.metrics
                .spool_refusing(SpoolRefusal::DatabaseUnavailable, true);
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

    async fn client(&self) -> Result<Object, StoreError> {
        match self.pool.get().await {
            Ok(client) => Ok(client),
            Err(deadpool_postgres::PoolError::Backend(e)) => Err(self.failed(&e)),
            Err(deadpool_postgres::PoolError::Timeout(_)) => Err(StoreError::Busy),
            Err(e) => {
                let why = e.to_string();
                self.mark_down(why.clone());
                Err(StoreError::Unavailable(why))
            }
        }
    }

    /// Runs `body` in a transaction, again once if it lost a deadlock or serialization race.
    async fn transaction<T>(
        &self,
        body: impl for<'t> Fn(&'t Transaction<'t>) -> TxFuture<'t, T>,
    ) -> Result<T, StoreError> {
        let mut client = self.client().await?;
        let mut tries = 0;
        loop {
            tries += 1;
            let result = async {
                let tx = client.transaction().await?;
                let value = body(&tx).await?;
                tx.commit().await?;
                Ok::<T, tokio_postgres::Error>(value)
            }
            .await;
            match result {
                Ok(value) => return Ok(value),
                Err(e) if is_conflict(&e) && tries < 3 => continue,
                Err(e) => {
                    if is_unavailable(&e) {
                        // Not back into the pool: a connection to a server that went read-only
                        // would otherwise be handed out again.
                        drop(Object::take(client));
                    }
                    return Err(self.failed(&e));
                }
            }
        }
    }
}

/// Records a delivery's result and its report. Returns whether new work became due.
async fn settle(
    tx: &Transaction<'_>,
    id: i64,
    finish: &Finish,
    report: Option<&NewEvent>,
) -> Result<bool, tokio_postgres::Error> {
    let changed = match finish {
        Finish::Delivered { .. } | Finish::Skipped => {
            tx.execute(
                "DELETE FROM actiongate_deliveries WHERE id = $1 AND dead_ms IS NULL",
                &[&id],
            )
            .await?
        }
        Finish::Retry {
            at_ms,
            due_ms,
            error,
            status,
        } => {
            tx.execute(
                "UPDATE actiongate_deliveries SET attempts = attempts + 1,
                     first_attempt_ms = coalesce(first_attempt_ms, $2), last_attempt_ms = $2,
                     due_ms = $3, last_error = $4, last_status = $5, leased_until = 0
                 WHERE id = $1 AND dead_ms IS NULL",
                &[
                    &id,
                    &i64_of(*at_ms),
                    &i64_of(*due_ms),
                    error,
                    &status.map(i32::from),
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
                "UPDATE actiongate_deliveries SET
                     attempts = attempts + CASE WHEN $5 THEN 1 ELSE 0 END,
                     first_attempt_ms = CASE WHEN $5 THEN coalesce(first_attempt_ms, $2)
                                        ELSE first_attempt_ms END,
                     last_attempt_ms = CASE WHEN $5 THEN $2 ELSE last_attempt_ms END,
                     dead_ms = $2, last_error = $3, last_status = coalesce($4, last_status),
                     leased_until = 0
                 WHERE id = $1 AND dead_ms IS NULL",
                &[
                    &id,
                    &i64_of(*at_ms),
                    error,
                    &status.map(i32::from),
                    attempted,
                ],
            )
            .await?
        }
    };
    if changed == 0 {
        // Finished meanwhile (by this instance after a replay, or by another that took it
        // over): nothing to record, nothing to report.
        return Ok(false);
    }
    let mut new_work = matches!(finish, Finish::Retry { .. });
    if let Some(report) = report {
        let rows = accept(tx, report, None, 0, now_ms()).await?;
        new_work |= rows.is_some();
    }
    if new_work {
        tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
    }
    Ok(new_work)
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
                &key,
                &i64_of(expires_ms),
                &i64_of(now),
                &event.action.as_ref(),
                &event.event_id,
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

async fn commit(core: &Core, batch: Vec<Pending>) {
    let started = Instant::now();
    let size = batch.len();
    let (jobs, replies): (Vec<(NewEvent, Admit)>, Vec<_>) = batch
        .into_iter()
        .map(|p| ((p.event, p.admit), p.reply))
        .unzip();
    let jobs = Arc::new(jobs);
    let window = core.dedup_window_ms;
    let result = core
        .transaction(|tx| {
            let jobs = jobs.clone();
            Box::pin(async move {
                let now = now_ms();
                let mut answers = Vec::with_capacity(jobs.len());
                for (event, admit) in jobs.iter() {
                    answers.push(admit_one(tx, event, admit, now, window).await?);
                }
                if answers.iter().any(|a| matches!(a, Appended::Accepted(_))) {
                    tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
                }
                Ok(answers)
            })
        })
        .await;
    match result {
        Ok(answers) => {
            core.metrics.observe_spool_commit(size, started.elapsed());
            if answers.iter().any(|a| matches!(a, Appended::Accepted(_))) {
                core.work.notify_waiters();
            }
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
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
        "SELECT pg_advisory_xact_lock(hashtextextended('actiongate guard ' || $1, 0))",
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
            "INSERT INTO actiongate_keys (key, expires_ms) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET expires_ms = EXCLUDED.expires_ms",
            &[&key, &i64_of(expires)],
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
            "SELECT expires_ms FROM actiongate_keys WHERE key = $1 AND expires_ms > $2",
            &[&key, &i64_of(now)],
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
                "SELECT expires_ms FROM actiongate_keys
                 WHERE key >= $1 AND key < $2 AND expires_ms > $3 ORDER BY expires_ms",
                &[&low, &high, &i64_of(now)],
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

/// Creates the schema, or checks that it is this build's, under an advisory lock so that
/// instances starting together do not race.
fn migrate(pg: &tokio_postgres::Config, wait: Duration) -> Result<(), StoreError> {
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

/// Holds a connection outside the pool that LISTENs for committed work, and wakes the lanes
/// when any instance commits some. Reconnects with backoff; after a reconnect it wakes the
/// lanes once, for what was committed while it could not hear.
async fn listener(core: Arc<Core>) {
    let mut pause = PROBE_FIRST;
    loop {
        match core.pg.connect(NoTls).await {
            Ok((client, mut connection)) => {
                pause = PROBE_FIRST;
                let (tx, mut rx) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    loop {
                        let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
                        match message {
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
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}"))
                    .await
                    .is_ok()
                {
                    core.work.notify_waiters();
                    while rx.recv().await.is_some() {
                        core.work.notify_waiters();
                    }
                }
                driver.abort();
            }
            Err(e) => {
                log::debug!("store: LISTEN connection failed: {}", describe(&e));
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PROBE_MAX);
    }
}

/// While the store is marked down, tries a read-write connection with backoff, and clears the
/// mark at the first one that answers.
async fn probe(core: Arc<Core>) {
    loop {
        if !core.is_down.load(Ordering::Acquire) {
            core.went_down.notified().await;
            continue;
        }
        let mut pause = PROBE_FIRST;
        while core.is_down.load(Ordering::Acquire) {
            match core.pool.get().await {
                Ok(client) => match client.simple_query("SELECT 1").await {
                    Ok(_) => {
                        core.mark_up();
                        core.work.notify_waiters();
                        break;
                    }
                    Err(e) => {
                        drop(Object::take(client));
                        log::debug!("store: probe failed: {}", describe(&e));
                    }
                },
                Err(e) => log::debug!("store: probe failed: {e}"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PROBE_MAX);
        }
    }
}

/// Renews the leases of the deliveries this instance's attempts hold.
async fn renew_leases(core: Arc<Core>) {
    loop {
        tokio::time::sleep(LEASE / 3).await;
        let ids: Vec<i64> = core.held().iter().copied().collect();
        if ids.is_empty() {
            continue;
        }
        let Ok(client) = core.client().await else {
            continue;
        };
        let until = i64_of(now_ms().saturating_add(millis(LEASE)));
        if let Err(e) = client
            .execute(
                "UPDATE actiongate_deliveries SET leased_until = $1
                 WHERE id = ANY($2) AND leased_by = $3 AND dead_ms IS NULL",
                &[&until, &ids, &core.instance],
            )
            .await
        {
            log::warn!("store: cannot renew claims: {}", core.failed(&e));
        }
    }
}

/// Deletes expired keys and events whose deliveries are all done, and sets the pending and
/// dead-letter gauges to the cluster's counts.
async fn maintenance(core: Arc<Core>) {
    let mut seen: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(MAINTENANCE_EVERY).await;
        let Ok(client) = core.client().await else {
            continue;
        };
        let now = i64_of(now_ms());
        let purged = async {
            client
                .execute(
                    "DELETE FROM actiongate_keys WHERE key IN (
                         SELECT key FROM actiongate_keys WHERE expires_ms <= $1 LIMIT $2)",
                    &[&now, &PURGE_SLICE],
                )
                .await?;
            // Two deliveries of one event finished at once can each see the other's row and
            // leave the event: it goes here.
            client
                .execute(
                    "DELETE FROM actiongate_events WHERE seq IN (
                         SELECT seq FROM actiongate_events e WHERE NOT EXISTS (
                             SELECT 1 FROM actiongate_deliveries d WHERE d.event = e.seq)
                         LIMIT $1)",
                    &[&PURGE_SLICE],
                )
                .await
        }
        .await;
        if let Err(e) = purged {
            log::warn!("store: maintenance failed: {}", core.failed(&e));
            continue;
        }
        let rows = match client
            .query(
                "SELECT upstream, count(*) FILTER (WHERE dead_ms IS NULL),
                        count(*) FILTER (WHERE dead_ms IS NOT NULL)
                 FROM actiongate_deliveries GROUP BY upstream",
                &[],
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                log::warn!("store: cannot count deliveries: {}", core.failed(&e));
                continue;
            }
        };
        let mut now_seen = HashSet::new();
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
            now_seen.insert(upstream.clone());
        }
        for gone in seen.difference(&now_seen) {
            core.metrics.pending_deliveries(gone).set(0);
            core.metrics.dead_letters(gone).set(0);
        }
        seen = now_seen;
    }
}

/// This instance's name in `leased_by`: host and process.
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
    format!("{host}:{}", std::process::id())
}
