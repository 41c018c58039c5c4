//! The durable store: accepted events, due deliveries, dedup keys and dead letters.
//!
//! It is one redb file (`spool.path/actiongate.redb`): crash-safe (copy-on-write B-trees with
//! checksummed commits), embedded, pure Rust. Every change goes through a single writer thread
//! ([`writer`]) that commits many changes per fsync (group commit), so concurrent requests
//! share the cost of durability. Reads (the dispatcher, the admin API) use MVCC snapshots and
//! never wait for the writer.
//!
//! Tables:
//! - `events`: event seq → raw payload bytes, removed once no delivery needs them;
//! - `remaining`: event seq → deliveries still referring to it (pending or dead);
//! - `deliveries`: delivery id → [`DeliveryRecord`] (pending ones);
//! - `due`: (lane, due ms, delivery id) → (), the dispatcher's per-upstream queues;
//! - `dedup`: "action\x1fevent_id" → expiry ms, with `dedup_expiry` to purge in order;
//! - `dead`: delivery id → [`DeliveryRecord`] with `dead_ms` set.

mod record;
mod writer;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{oneshot, Notify};

use crate::metrics::Metrics;
pub use record::{lane_key, DeliveryRecord, Finish};
use writer::Op;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const REMAINING: TableDefinition<u64, u32> = TableDefinition::new("remaining");
const DELIVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("deliveries");
const DUE: TableDefinition<(&str, u64, u64), ()> = TableDefinition::new("due");
const DEDUP: TableDefinition<&str, u64> = TableDefinition::new("dedup");
const DEDUP_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("dedup_expiry");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");

/// Queued changes beyond which new events are refused with 503 rather than waiting.
const QUEUE_DEPTH: usize = 16_384;

/// Why the spool could not do something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolError {
    /// Too many changes queued: the disk is not keeping up.
    Busy,
    /// The writer has stopped (shutdown, or a fatal storage error).
    Closed,
    /// The store reported an error (disk full, I/O error, corruption).
    Storage(String),
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpoolError::Busy => f.write_str("spool is busy (write queue full)"),
            SpoolError::Closed => f.write_str("spool is closed"),
            SpoolError::Storage(e) => write!(f, "spool storage error: {e}"),
        }
    }
}

impl std::error::Error for SpoolError {}

impl From<redb::Error> for SpoolError {
    fn from(e: redb::Error) -> Self {
        SpoolError::Storage(e.to_string())
    }
}

macro_rules! storage_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for SpoolError {
            fn from(e: $t) -> Self { SpoolError::Storage(e.to_string()) }
        }
    )*};
}
storage_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// An event to store: who it is for and its raw bytes.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub action: Arc<str>,
    pub event_id: String,
    pub body: Bytes,
    /// Upstream names of the action: one delivery each.
    pub upstreams: Vec<Arc<str>>,
}

/// What became of an appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored durably under this sequence number.
    Accepted(u64),
    /// Already accepted within the dedup window: not stored again.
    Duplicate,
}

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

struct Shared {
    db: Arc<Database>,
    /// Started lazily: a daemonizing server forks after the spool is opened, and threads do not
    /// survive a fork.
    sender: Mutex<Option<SyncSender<Op>>>,
    writer_state: Mutex<Option<writer::Writer>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Woken after a commit that made new deliveries due.
    work: Arc<Notify>,
}

impl Drop for Shared {
    /// Closes the queue and waits for the writer to finish its last batch, so that the file
    /// lock is released when the last handle goes (a reopen in the same process then works).
    fn drop(&mut self) {
        if let Ok(sender) = self.sender.get_mut() {
            sender.take();
        }
        if let Some(thread) = self.writer_thread.get_mut().ok().and_then(Option::take) {
            let _ = thread.join();
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether commits wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// fsync before any change is reported done: what the gateway always uses.
    Durable,
    /// No fsync. Only for measuring what durability costs: a crash can lose acknowledged events.
    Unsafe,
}

impl Spool {
    /// Opens (or creates) the store in directory `dir`, and sets the pending and dead-letter
    /// gauges from what it holds.
    pub fn open(
        dir: &Path,
        dedup_window: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Spool, SpoolError> {
        Spool::open_with(dir, dedup_window, metrics, Commit::Durable)
    }

    /// [`Spool::open`] with a choice of commit mode (benchmarks compare the two).
    pub fn open_with(
        dir: &Path,
        dedup_window: Duration,
        metrics: Arc<Metrics>,
        commit: Commit,
    ) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| SpoolError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("actiongate.redb");
        let db = Database::create(&path)
            .map_err(|e| SpoolError::Storage(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write()?;
        txn.open_table(EVENTS)?;
        txn.open_table(REMAINING)?;
        txn.open_table(DELIVERIES)?;
        txn.open_table(DUE)?;
        txn.open_table(DEDUP)?;
        txn.open_table(DEDUP_EXPIRY)?;
        txn.open_table(DEAD)?;
        txn.commit()?;
        let db = Arc::new(db);
        let next_id = writer::next_id(&db)?;
        let spool = Spool {
            shared: Arc::new(Shared {
                db: db.clone(),
                sender: Mutex::new(None),
                writer_state: Mutex::new(Some(writer::Writer::new(
                    db,
                    next_id,
                    dedup_window,
                    metrics.clone(),
                    commit,
                ))),
                writer_thread: Mutex::new(None),
                work: Arc::new(Notify::new()),
            }),
        };
        for (upstream, count) in spool.pending_by_upstream()? {
            metrics.pending_deliveries(&upstream).set(count as i64);
        }
        for (upstream, count) in spool.dead_by_upstream()? {
            metrics.dead_letters(&upstream).set(count as i64);
        }
        Ok(spool)
    }

    fn send(&self, op: Op) -> Result<(), SpoolError> {
        let mut sender = self.shared.sender.lock().map_err(|_| SpoolError::Closed)?;
        if sender.is_none() {
            let state = self
                .shared
                .writer_state
                .lock()
                .map_err(|_| SpoolError::Closed)?
                .take()
                .ok_or(SpoolError::Closed)?;
            let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
            // The thread must not hold `shared`: it owns the sender whose drop ends the thread.
            let work = self.shared.work.clone();
            let thread = std::thread::Builder::new()
                .name("spool-writer".into())
                .spawn(move || state.run(rx, &work))
                .map_err(|e| SpoolError::Storage(format!("cannot start writer: {e}")))?;
            if let Ok(mut slot) = self.shared.writer_thread.lock() {
                *slot = Some(thread);
            }
            *sender = Some(tx);
        }
        let tx = sender.as_ref().ok_or(SpoolError::Closed)?;
        tx.try_send(op).map_err(|e| match e {
            TrySendError::Full(_) => SpoolError::Busy,
            TrySendError::Disconnected(_) => SpoolError::Closed,
        })
    }

    async fn call<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Op,
    ) -> Result<T, SpoolError> {
        let (tx, rx) = oneshot::channel();
        self.send(op(tx))?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Stores an event durably (returns after fsync) with one due delivery per upstream, unless
    /// (action, event_id) was accepted within the dedup window.
    pub async fn append(&self, event: NewEvent) -> Result<Appended, SpoolError> {
        self.call(|reply| Op::Append(event, reply)).await
    }

    /// Records how a delivery attempt ended.
    pub async fn finish(&self, delivery: u64, finish: Finish) -> Result<(), SpoolError> {
        self.call(|reply| Op::Finish(delivery, finish, reply)).await
    }

    /// Moves dead letters (all, or one) back to due with their attempt count reset.
    pub async fn replay(&self, id: Option<u64>) -> Result<usize, SpoolError> {
        self.call(|reply| Op::Replay(id, reply)).await
    }

    /// Deletes one dead letter for good. Returns whether it existed.
    pub async fn purge(&self, id: u64) -> Result<bool, SpoolError> {
        self.call(|reply| Op::Purge(id, reply)).await
    }

    /// Waits until a commit makes new deliveries due. Create the future and `enable` it before
    /// looking for work, so that a commit in between is not missed.
    pub fn work_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.work.notified()
    }

    /// Up to `limit` deliveries of `lane` due at `now_ms`, oldest first, except `skip`.
    pub fn due(
        &self,
        lane: &str,
        now_ms: u64,
        limit: usize,
        skip: &HashSet<u64>,
    ) -> Result<Vec<u64>, SpoolError> {
        let txn = self.shared.db.begin_read()?;
        let table = txn.open_table(DUE)?;
        let mut ids = Vec::new();
        for entry in table.range((lane, 0, 0)..=(lane, now_ms, u64::MAX))? {
            if ids.len() >= limit {
                break;
            }
            let (key, _) = entry?;
            let (_, _, id) = key.value();
            if !skip.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// When the earliest delivery of `lane` not in `skip` is due, if there is one.
    pub fn next_due_ms(&self, lane: &str, skip: &HashSet<u64>) -> Result<Option<u64>, SpoolError> {
        let txn = self.shared.db.begin_read()?;
        let table = txn.open_table(DUE)?;
        for entry in table.range((lane, 0, 0)..=(lane, u64::MAX, u64::MAX))? {
            let (key, _) = entry?;
            let (_, due, id) = key.value();
            if !skip.contains(&id) {
                return Ok(Some(due));
            }
        }
        Ok(None)
    }

    /// A pending delivery and its event's bytes.
    pub fn load(&self, delivery: u64) -> Result<Option<(DeliveryRecord, Bytes)>, SpoolError> {
        let txn = self.shared.db.begin_read()?;
        let Some(record) = txn.open_table(DELIVERIES)?.get(delivery)? else {
            return Ok(None);
        };
        let record = decode(record.value())?;
        let Some(body) = txn.open_table(EVENTS)?.get(record.event)? else {
            return Err(SpoolError::Storage(format!(
                "delivery {delivery} refers to missing event {}",
                record.event
            )));
        };
        let body = Bytes::copy_from_slice(body.value());
        Ok(Some((record, body)))
    }

    /// Lanes that hold pending deliveries, with their counts.
    pub fn pending_lanes(&self) -> Result<BTreeMap<String, u64>, SpoolError> {
        let txn = self.shared.db.begin_read()?;
        let mut lanes = BTreeMap::new();
        for entry in txn.open_table(DUE)?.iter()? {
            let (key, _) = entry?;
            *lanes.entry(key.value().0.to_string()).or_insert(0) += 1;
        }
        Ok(lanes)
    }

    fn pending_by_upstream(&self) -> Result<BTreeMap<String, u64>, SpoolError> {
        let mut by_upstream = BTreeMap::new();
        for (lane, count) in self.pending_lanes()? {
            let upstream = lane.split_once('/').map_or(lane.as_str(), |(_, u)| u);
            *by_upstream.entry(upstream.to_string()).or_insert(0) += count;
        }
        Ok(by_upstream)
    }

    fn dead_by_upstream(&self) -> Result<BTreeMap<String, u64>, SpoolError> {
        let mut by_upstream = BTreeMap::new();
        for record in self.dead_letters(usize::MAX)? {
            *by_upstream.entry(record.upstream).or_insert(0) += 1;
        }
        Ok(by_upstream)
    }

    /// Up to `limit` dead letters, oldest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeliveryRecord>, SpoolError> {
        let txn = self.shared.db.begin_read()?;
        let table = txn.open_table(DEAD)?;
        let mut records = Vec::new();
        for entry in table.iter()?.take(limit) {
            let (_, value) = entry?;
            records.push(decode(value.value())?);
        }
        Ok(records)
    }

    /// How many events, pending deliveries, dedup keys and dead letters are stored.
    pub fn counts(&self) -> Result<SpoolCounts, SpoolError> {
        let txn = self.shared.db.begin_read()?;
        Ok(SpoolCounts {
            events: txn.open_table(EVENTS)?.len()?,
            pending: txn.open_table(DELIVERIES)?.len()?,
            dedup_keys: txn.open_table(DEDUP)?.len()?,
            dead: txn.open_table(DEAD)?.len()?,
        })
    }
}

/// Table sizes, for tests and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolCounts {
    pub events: u64,
    pub pending: u64,
    pub dedup_keys: u64,
    pub dead: u64,
}

fn decode(bytes: &[u8]) -> Result<DeliveryRecord, SpoolError> {
    serde_json::from_slice(bytes)
        .map_err(|e| SpoolError::Storage(format!("corrupt delivery record: {e}")))
}

fn encode(record: &DeliveryRecord) -> Vec<u8> {
    // A struct of plain fields always serializes.
    serde_json::to_vec(record).unwrap_or_default()
}

#[cfg(test)]
mod tests;
