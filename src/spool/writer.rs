//! The spool's single writer: applies queued changes in batches, one fsync per batch.
//!
//! Group commit: the thread blocks for the first change, takes whatever else is queued (up to
//! a batch limit), applies it all in one write transaction and commits once. While a commit's
//! fsync runs, new requests queue up and form the next batch, so throughput grows with load
//! while an idle gateway still commits a lone request at once.

use std::collections::HashMap;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, WriteTransaction};
use tokio::sync::{oneshot, Notify};

use super::{
    decode, encode, now_ms, Appended, Commit, DeliveryRecord, Finish, NewEvent, SpoolError, DEAD,
    DEDUP, DEDUP_EXPIRY, DELIVERIES, DUE, EVENTS, REMAINING,
};
use crate::metrics::Metrics;

/// Most changes in one transaction: bounds the latency a batch adds to its first member.
const MAX_BATCH: usize = 512;
/// How often expired dedup keys are purged, and how many at most per purge.
const PURGE_EVERY: Duration = Duration::from_secs(10);
const PURGE_BATCH: usize = 1_000;

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// A change for the writer, with where to send its result.
pub enum Op {
    Append(NewEvent, Reply<Appended>),
    Finish(u64, Finish, Reply<()>),
    Replay(Option<u64>, Reply<usize>),
    Purge(u64, Reply<bool>),
}

/// A result held until its batch is committed.
enum Done {
    Append(Reply<Appended>, Appended),
    Finish(Reply<()>),
    Replay(Reply<usize>, usize),
    Purge(Reply<bool>, bool),
}

impl Done {
    fn send(self, failure: Option<&SpoolError>) {
        // A dropped receiver means the caller gave up (e.g. the client went away): nothing to do.
        match (self, failure) {
            (Done::Append(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Done::Append(tx, v), None) => drop(tx.send(Ok(v))),
            (Done::Finish(tx), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Done::Finish(tx), None) => drop(tx.send(Ok(()))),
            (Done::Replay(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Done::Replay(tx, v), None) => drop(tx.send(Ok(v))),
            (Done::Purge(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Done::Purge(tx, v), None) => drop(tx.send(Ok(v))),
        }
    }
}

/// The writer's state, owned by its thread.
pub struct Writer {
    db: Arc<Database>,
    next_id: u64,
    dedup_window_ms: u64,
    metrics: Arc<Metrics>,
    commit: Commit,
    last_purge: Option<Instant>,
}

/// Gauge changes of one batch, applied only once it is committed.
#[derive(Default)]
struct GaugeDeltas {
    pending: HashMap<String, i64>,
    dead: HashMap<String, i64>,
    new_work: bool,
}

/// The first id not used by any event or delivery.
pub fn next_id(db: &Database) -> Result<u64, SpoolError> {
    let txn = db.begin_read()?;
    let mut next = 1;
    for last in [
        txn.open_table(EVENTS)?.last()?.map(|(k, _)| k.value()),
        txn.open_table(DELIVERIES)?.last()?.map(|(k, _)| k.value()),
        txn.open_table(DEAD)?.last()?.map(|(k, _)| k.value()),
    ]
    .into_iter()
    .flatten()
    {
        next = next.max(last + 1);
    }
    Ok(next)
}

impl Writer {
    pub fn new(
        db: Arc<Database>,
        next_id: u64,
        dedup_window: Duration,
        metrics: Arc<Metrics>,
        commit: Commit,
    ) -> Writer {
        Writer {
            db,
            next_id,
            dedup_window_ms: u64::try_from(dedup_window.as_millis()).unwrap_or(u64::MAX),
            metrics,
            commit,
            last_purge: None,
        }
    }

    /// Runs until every sender is dropped.
    pub fn run(mut self, rx: Receiver<Op>, work: &Notify) {
        while let Ok(first) = rx.recv() {
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let size = batch.len();
            let started = Instant::now();
            let mut deltas = GaugeDeltas::default();
            let mut done = Vec::with_capacity(size);
            // The id counter moves only when a batch commits, so a failed batch reuses its ids.
            let id_before = self.next_id;
            let result = self.apply(batch, &mut done, &mut deltas);
            match result {
                Ok(()) => {
                    self.metrics.observe_spool_commit(size, started.elapsed());
                    for (upstream, delta) in deltas.pending {
                        self.metrics.pending_deliveries(&upstream).add(delta);
                    }
                    for (upstream, delta) in deltas.dead {
                        self.metrics.dead_letters(&upstream).add(delta);
                    }
                    for d in done {
                        d.send(None);
                    }
                    if deltas.new_work {
                        work.notify_waiters();
                    }
                }
                Err(e) => {
                    self.next_id = id_before;
                    log::error!("spool commit of {size} changes failed: {e}");
                    for d in done {
                        d.send(Some(&e));
                    }
                }
            }
        }
    }

    fn apply(
        &mut self,
        batch: Vec<Op>,
        done: &mut Vec<Done>,
        deltas: &mut GaugeDeltas,
    ) -> Result<(), SpoolError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(match self.commit {
            Commit::Durable => Durability::Immediate,
            Commit::Unsafe => Durability::None,
        });
        let now = now_ms();
        let mut failed = None;
        for op in batch {
            // After a storage error the transaction is lost: every caller hears of the failure.
            if failed.is_some() {
                done.push(abandon(op));
                continue;
            }
            match self.apply_one(&txn, op, now, deltas) {
                Ok(d) => done.push(d),
                Err((e, d)) => {
                    done.push(d);
                    failed = Some(e);
                }
            }
        }
        if let Some(e) = failed {
            txn.abort()?;
            return Err(e);
        }
        if self.last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
            purge_expired_dedup(&txn, now)?;
            self.last_purge = Some(Instant::now());
        }
        txn.commit()?;
        Ok(())
    }
}

/// The reply owed for an op that was never applied (its batch failed).
fn abandon(op: Op) -> Done {
    match op {
        Op::Append(_, reply) => Done::Append(reply, Appended::Duplicate),
        Op::Finish(_, _, reply) => Done::Finish(reply),
        Op::Replay(_, reply) => Done::Replay(reply, 0),
        Op::Purge(_, reply) => Done::Purge(reply, false),
    }
}

/// Applies one op; on failure returns the error together with the reply still owed.
type OpResult = Result<Done, (SpoolError, Done)>;

impl Writer {
    fn apply_one(
        &mut self,
        txn: &WriteTransaction,
        op: Op,
        now: u64,
        deltas: &mut GaugeDeltas,
    ) -> OpResult {
        match op {
            Op::Append(event, reply) => match self.append(txn, &event, now, deltas) {
                Ok(v) => Ok(Done::Append(reply, v)),
                Err(e) => Err((e, Done::Append(reply, Appended::Duplicate))),
            },
            Op::Finish(id, finish, reply) => match finish_delivery(txn, id, finish, deltas) {
                Ok(()) => Ok(Done::Finish(reply)),
                Err(e) => Err((e, Done::Finish(reply))),
            },
            Op::Replay(id, reply) => match replay(txn, id, now, deltas) {
                Ok(n) => Ok(Done::Replay(reply, n)),
                Err(e) => Err((e, Done::Replay(reply, 0))),
            },
            Op::Purge(id, reply) => match purge_dead(txn, id, deltas) {
                Ok(found) => Ok(Done::Purge(reply, found)),
                Err(e) => Err((e, Done::Purge(reply, false))),
            },
        }
    }

    fn append(
        &mut self,
        txn: &WriteTransaction,
        event: &NewEvent,
        now: u64,
        deltas: &mut GaugeDeltas,
    ) -> Result<Appended, SpoolError> {
        let key = format!("{}\u{1f}{}", event.action, event.event_id);
        let mut dedup = txn.open_table(DEDUP)?;
        if let Some(expires) = dedup.get(key.as_str())? {
            if expires.value() > now {
                return Ok(Appended::Duplicate);
            }
        }
        let expires = now.saturating_add(self.dedup_window_ms);
        if let Some(old) = dedup.insert(key.as_str(), expires)? {
            txn.open_table(DEDUP_EXPIRY)?
                .remove((old.value(), key.as_str()))?;
        }
        txn.open_table(DEDUP_EXPIRY)?
            .insert((expires, key.as_str()), ())?;

        let seq = self.next_id;
        self.next_id += 1;
        txn.open_table(EVENTS)?.insert(seq, event.body.as_ref())?;
        txn.open_table(REMAINING)?.insert(
            seq,
            u32::try_from(event.upstreams.len()).unwrap_or(u32::MAX),
        )?;
        let mut deliveries = txn.open_table(DELIVERIES)?;
        let mut due = txn.open_table(DUE)?;
        for upstream in &event.upstreams {
            let record = DeliveryRecord {
                id: self.next_id,
                event: seq,
                action: event.action.to_string(),
                upstream: upstream.to_string(),
                event_id: event.event_id.clone(),
                accepted_ms: now,
                attempts: 0,
                due_ms: now,
                first_attempt_ms: None,
                last_attempt_ms: None,
                last_error: None,
                last_status: None,
                dead_ms: None,
            };
            self.next_id += 1;
            deliveries.insert(record.id, encode(&record).as_slice())?;
            due.insert((record.lane().as_str(), now, record.id), ())?;
            *deltas.pending.entry(record.upstream).or_insert(0) += 1;
        }
        deltas.new_work = true;
        Ok(Appended::Accepted(seq))
    }
}

fn finish_delivery(
    txn: &WriteTransaction,
    id: u64,
    finish: Finish,
    deltas: &mut GaugeDeltas,
) -> Result<(), SpoolError> {
    let mut deliveries = txn.open_table(DELIVERIES)?;
    let Some(bytes) = deliveries.remove(id)? else {
        // Already finished (e.g. replayed twice): nothing to do.
        return Ok(());
    };
    let mut record = decode(bytes.value())?;
    drop(bytes);
    let lane = record.lane();
    txn.open_table(DUE)?
        .remove((lane.as_str(), record.due_ms, id))?;
    let attempted_at = match &finish {
        Finish::Delivered { at_ms, .. } | Finish::Retry { at_ms, .. } => Some(*at_ms),
        Finish::Dead {
            at_ms,
            attempted: true,
            ..
        } => Some(*at_ms),
        Finish::Dead { .. } | Finish::Skipped => None,
    };
    if let Some(at) = attempted_at {
        record.attempts += 1;
        record.first_attempt_ms.get_or_insert(at);
        record.last_attempt_ms = Some(at);
    }
    match finish {
        Finish::Delivered { .. } | Finish::Skipped => {
            *deltas.pending.entry(record.upstream.clone()).or_insert(0) -= 1;
            release_event(txn, record.event)?;
        }
        Finish::Retry {
            due_ms,
            error,
            status,
            ..
        } => {
            record.due_ms = due_ms;
            record.last_error = Some(error);
            record.last_status = status;
            deliveries.insert(id, encode(&record).as_slice())?;
            txn.open_table(DUE)?
                .insert((lane.as_str(), due_ms, id), ())?;
        }
        Finish::Dead {
            at_ms,
            error,
            status,
            ..
        } => {
            record.dead_ms = Some(at_ms);
            record.last_error = Some(error);
            record.last_status = status.or(record.last_status);
            txn.open_table(DEAD)?
                .insert(id, encode(&record).as_slice())?;
            *deltas.pending.entry(record.upstream.clone()).or_insert(0) -= 1;
            *deltas.dead.entry(record.upstream).or_insert(0) += 1;
        }
    }
    Ok(())
}

/// One fewer delivery needs the event; drop its bytes when none does.
fn release_event(txn: &WriteTransaction, event: u64) -> Result<(), SpoolError> {
    let mut remaining = txn.open_table(REMAINING)?;
    let left = remaining
        .get(event)?
        .map_or(0, |v| v.value())
        .saturating_sub(1);
    if left == 0 {
        remaining.remove(event)?;
        txn.open_table(EVENTS)?.remove(event)?;
    } else {
        remaining.insert(event, left)?;
    }
    Ok(())
}

fn replay(
    txn: &WriteTransaction,
    id: Option<u64>,
    now: u64,
    deltas: &mut GaugeDeltas,
) -> Result<usize, SpoolError> {
    let mut dead = txn.open_table(DEAD)?;
    let ids: Vec<u64> = match id {
        Some(id) => vec![id],
        None => dead
            .iter()?
            .map(|entry| entry.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?,
    };
    let mut deliveries = txn.open_table(DELIVERIES)?;
    let mut due = txn.open_table(DUE)?;
    let mut moved = 0;
    for id in ids {
        let Some(bytes) = dead.remove(id)? else {
            continue;
        };
        let mut record = decode(bytes.value())?;
        drop(bytes);
        record.attempts = 0;
        record.dead_ms = None;
        record.due_ms = now;
        deliveries.insert(id, encode(&record).as_slice())?;
        due.insert((record.lane().as_str(), now, id), ())?;
        *deltas.dead.entry(record.upstream.clone()).or_insert(0) -= 1;
        *deltas.pending.entry(record.upstream).or_insert(0) += 1;
        moved += 1;
    }
    deltas.new_work |= moved > 0;
    Ok(moved)
}

fn purge_dead(
    txn: &WriteTransaction,
    id: u64,
    deltas: &mut GaugeDeltas,
) -> Result<bool, SpoolError> {
    let mut dead = txn.open_table(DEAD)?;
    let Some(bytes) = dead.remove(id)? else {
        return Ok(false);
    };
    let record = decode(bytes.value())?;
    drop(bytes);
    *deltas.dead.entry(record.upstream).or_insert(0) -= 1;
    release_event(txn, record.event)?;
    Ok(true)
}

fn purge_expired_dedup(txn: &WriteTransaction, now: u64) -> Result<(), SpoolError> {
    let mut expiry = txn.open_table(DEDUP_EXPIRY)?;
    let mut expired = Vec::new();
    for entry in expiry.range((0, "")..(now, ""))?.take(PURGE_BATCH) {
        let (key, _) = entry?;
        let (at, name) = key.value();
        expired.push((at, name.to_string()));
    }
    let mut dedup = txn.open_table(DEDUP)?;
    for (at, name) in expired {
        expiry.remove((at, name.as_str()))?;
        if dedup.get(name.as_str())?.is_some_and(|v| v.value() == at) {
            dedup.remove(name.as_str())?;
        }
    }
    Ok(())
}
