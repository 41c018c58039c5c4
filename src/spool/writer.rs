//! The spool's single writer: turns queued changes into log records, one `write` and one
//! `fdatasync` per batch (group commit).
//!
//! The thread blocks for the first change, takes whatever else is queued (up to a limit),
//! encodes and applies it all under the index lock, writes the batch, releases the lock,
//! fsyncs, and only then answers. While one fsync runs, the next batch queues up, so
//! throughput grows with load while a lone request is still committed at once. Nothing is
//! acknowledged before its bytes are on disk.
//!
//! Attempt results are the exception: losing one to a power cut only means the delivery is
//! made again (at least once), so a batch of nothing but results is written without an
//! fsync; the next fsync of the file (the next accepted event's, or the one that seals the
//! segment) makes them durable too.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::segment::{self, AttemptKind, Record};
use super::state::{dedup_key, Deltas};
use super::{now_ms, Appended, Commit, Finish, Inner, NewEvent, SpoolError};
use crate::metrics::Metrics;

/// Most changes in one batch: bounds the latency a batch adds to its first member.
const MAX_BATCH: usize = 1024;
/// A segment is sealed, and a new one started, past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// How often expired dedup keys are forgotten and finished segments deleted.
const MAINTAIN_EVERY: Duration = Duration::from_secs(10);

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// A change for the writer, with where to send its result.
pub enum Op {
    Append(NewEvent, Reply<Appended>),
    Finish(u64, Finish, Reply<()>),
    Replay(Option<u64>, Reply<usize>),
    Purge(u64, Reply<bool>),
}

/// A result held until its batch is on disk.
enum Done {
    Append(Reply<Appended>, Appended),
    Finish(Reply<()>),
    Replay(Reply<usize>, usize),
    Purge(Reply<bool>, bool),
}

impl Done {
    fn abandon(op: Op) -> Done {
        match op {
            Op::Append(_, reply) => Done::Append(reply, Appended::Duplicate),
            Op::Finish(_, _, reply) => Done::Finish(reply),
            Op::Replay(_, reply) => Done::Replay(reply, 0),
            Op::Purge(_, reply) => Done::Purge(reply, false),
        }
    }

    fn send(self, failure: Option<&SpoolError>) {
        // A dropped receiver means the caller gave up (e.g. the client went away).
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
    pub(super) inner: Arc<Inner>,
    pub(super) dir: PathBuf,
    pub(super) active: File,
    pub(super) active_number: u64,
    pub(super) active_size: u64,
    pub(super) dedup_window_ms: u64,
    pub(super) metrics: Arc<Metrics>,
    pub(super) commit: Commit,
    pub(super) last_maintenance: Instant,
    /// Seal the active segment past this size ([`SEGMENT_BYTES`]; smaller in tests).
    pub(super) segment_bytes: u64,
}

impl Writer {
    /// Runs until every sender is dropped.
    pub fn run(mut self, rx: Receiver<Op>, work: &Notify) {
        while let Ok(first) = rx.recv() {
            let mut batch = Vec::with_capacity(32);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let size = batch.len();
            let started = Instant::now();
            let mut deltas = Deltas::default();
            let mut done = Vec::with_capacity(size);
            let written = self.write_batch(batch, &mut done, &mut deltas);
            if written.is_ok() {
                // The index already holds the batch: gauges follow it now.
                for (upstream, delta) in deltas.pending.drain() {
                    self.metrics.pending_deliveries(&upstream).add(delta);
                }
                for (upstream, delta) in deltas.dead.drain() {
                    self.metrics.dead_letters(&upstream).add(delta);
                }
                // A finished attempt needs no fsync before its answer: if a crash loses the
                // record, the delivery is made again (at least once). Answering now frees the
                // dispatcher's permit a whole fsync earlier.
                let (finished, durable): (Vec<Done>, Vec<Done>) =
                    done.into_iter().partition(|d| matches!(d, Done::Finish(_)));
                finished.into_iter().for_each(|d| d.send(None));
                done = durable;
            }
            match written.and_then(|must_sync| self.sync(must_sync)) {
                Ok(synced) => {
                    if synced {
                        self.metrics.observe_spool_commit(size, started.elapsed());
                    }
                    for d in done {
                        d.send(None);
                    }
                    if deltas.new_work {
                        work.notify_waiters();
                    }
                }
                Err(e) => {
                    log::error!(
                        "spool: commit of {size} changes failed: {e}; refusing further changes"
                    );
                    self.inner.fail(&e);
                    for d in done {
                        d.send(Some(&e));
                    }
                }
            }
            if self.last_maintenance.elapsed() >= MAINTAIN_EVERY
                || self.active_size >= self.segment_bytes
            {
                if let Err(e) = self.maintain() {
                    log::error!("spool: maintenance failed: {e}; refusing further changes");
                    self.inner.fail(&e);
                }
            }
        }
    }

    /// Encodes and applies a batch and writes it (not yet fsynced). Returns whether it must be
    /// fsynced before its answers: it wrote something, and not only attempt results (whose
    /// loss means a repeated delivery, never a lost event).
    fn write_batch(
        &mut self,
        batch: Vec<Op>,
        done: &mut Vec<Done>,
        deltas: &mut Deltas,
    ) -> Result<bool, SpoolError> {
        if let Some(e) = self.inner.failure() {
            done.extend(batch.into_iter().map(Done::abandon));
            return Err(e);
        }
        let mut buf = Vec::with_capacity(batch.len() * 2048);
        // Readers see the batch only once its bytes are in the file (page cache), so a
        // delivery never points at bytes that are not there yet.
        let mut state = self.inner.lock_state()?;
        let now = now_ms();
        let results_only = batch.iter().all(|op| matches!(op, Op::Finish(..)));
        for op in batch {
            done.push(self.encode(&mut state, op, now, &mut buf, deltas));
        }
        if buf.is_empty() {
            return Ok(false);
        }
        self.active
            .write_all(&buf)
            .map_err(|e| SpoolError::Storage(format!("write: {e}")))?;
        self.active_size += buf.len() as u64;
        Ok(!results_only)
    }

    /// Makes a written batch durable if it has to be. Returns whether it fsynced.
    fn sync(&mut self, must_sync: bool) -> Result<bool, SpoolError> {
        if !must_sync || self.commit != Commit::Durable {
            return Ok(false);
        }
        self.fsync_active()?;
        Ok(true)
    }

    /// fdatasync of the active segment.
    fn fsync_active(&self) -> Result<(), SpoolError> {
        self.active
            .sync_data()
            .map_err(|e| SpoolError::Storage(format!("fsync: {e}")))
    }

    /// Encodes one change into `buf` and applies it to the index.
    fn encode(
        &self,
        state: &mut super::state::State,
        op: Op,
        now: u64,
        buf: &mut Vec<u8>,
        deltas: &mut Deltas,
    ) -> Done {
        let active = self.active_number;
        let mut apply = |state: &mut super::state::State, start: usize, record: Record| {
            state.apply(active, self.active_size + start as u64, record, deltas);
        };
        match op {
            Op::Append(event, reply) => {
                if state.is_duplicate(&dedup_key(&event.action, &event.event_id), now) {
                    return Done::Append(reply, Appended::Duplicate);
                }
                let seq = state.next_seq.max(1);
                let expires = now.saturating_add(self.dedup_window_ms);
                let start = buf.len();
                let body_at = segment::encode_accept(
                    buf,
                    seq,
                    now,
                    expires,
                    &event.action,
                    &event.event_id,
                    &event.upstreams,
                    &event.body,
                );
                let record = Record::Accept {
                    seq,
                    accepted_ms: now,
                    dedup_expires_ms: expires,
                    action: event.action.to_string(),
                    event_id: event.event_id,
                    upstreams: event.upstreams.iter().map(|u| u.to_string()).collect(),
                    body_at: body_at - start,
                    body_len: event.body.len(),
                };
                apply(state, start, record);
                Done::Append(reply, Appended::Accepted(seq))
            }
            Op::Finish(id, finish, reply) => {
                if state.deliveries.contains_key(&id) {
                    let (kind, at_ms, due_ms, status, error) = match finish {
                        Finish::Delivered { at_ms, status } => (
                            AttemptKind::Delivered,
                            at_ms,
                            0,
                            Some(status),
                            String::new(),
                        ),
                        Finish::Skipped => (AttemptKind::Skipped, now, 0, None, String::new()),
                        Finish::Retry {
                            at_ms,
                            due_ms,
                            error,
                            status,
                        } => (AttemptKind::Retry, at_ms, due_ms, status, error),
                        Finish::Dead {
                            at_ms,
                            error,
                            status,
                            attempted,
                        } => {
                            let kind = if attempted {
                                AttemptKind::Dead
                            } else {
                                AttemptKind::DeadUnattempted
                            };
                            (kind, at_ms, 0, status, error)
                        }
                    };
                    let start = buf.len();
                    segment::encode_attempt(buf, id, kind, at_ms, due_ms, status, &error);
                    apply(
                        state,
                        start,
                        Record::Attempt {
                            id,
                            kind,
                            at_ms,
                            due_ms,
                            status,
                            error,
                        },
                    );
                }
                // Already finished (e.g. replayed and delivered twice): nothing to record.
                Done::Finish(reply)
            }
            Op::Replay(id, reply) => {
                let ids: Vec<u64> = match id {
                    Some(id) => state
                        .dead
                        .contains_key(&id)
                        .then_some(id)
                        .into_iter()
                        .collect(),
                    None => state.dead.keys().copied().collect(),
                };
                for &id in &ids {
                    let start = buf.len();
                    segment::encode_replay(buf, id, now);
                    apply(state, start, Record::Replay { id, at_ms: now });
                }
                Done::Replay(reply, ids.len())
            }
            Op::Purge(id, reply) => {
                let found = state.dead.contains_key(&id);
                if found {
                    let start = buf.len();
                    segment::encode_purge(buf, id);
                    apply(state, start, Record::Purge { id });
                }
                Done::Purge(reply, found)
            }
        }
    }

    /// Starts a new segment when the active one is full, forgets expired dedup keys, and
    /// deletes sealed segments that hold nothing still needed (carrying their unexpired dedup
    /// keys forward first, so that a duplicate is still recognised after a restart).
    fn maintain(&mut self) -> Result<(), SpoolError> {
        self.last_maintenance = Instant::now();
        if self.active_size >= self.segment_bytes {
            // Results written without an fsync may end the segment being sealed, and later
            // fsyncs go to the next file only. A power cut could then tear a segment that is
            // no longer the last, which start-up rightly refuses as damage: seal it durably.
            self.fsync_active()?;
            let number = self.active_number + 1;
            let (file, read) = super::create_segment(&self.dir, number)?;
            self.inner.add_segment(number, read)?;
            self.active = file;
            self.active_number = number;
            self.active_size = 0;
        }
        let now = now_ms();
        let mut state = self.inner.lock_state()?;
        // Every segment is known to the index, even one holding only attempt records, so that
        // it is deleted once nothing in it is needed.
        state.segments.entry(self.active_number).or_default();
        state.purge_expired_dedup(now, 100_000);
        let finished: Vec<u64> = state
            .segments
            .iter()
            .filter(|(n, info)| **n < self.active_number && info.live_events == 0)
            .map(|(n, _)| *n)
            .collect();
        for number in finished {
            let keys = state.dedup_keys_in(number, now);
            if !keys.is_empty() {
                let mut buf = Vec::with_capacity(keys.len() * 64);
                let mut starts = Vec::with_capacity(keys.len());
                for (key, expires) in &keys {
                    starts.push(buf.len());
                    segment::encode_dedup(&mut buf, key, *expires);
                }
                self.active
                    .write_all(&buf)
                    .and_then(|()| self.active.sync_data())
                    .map_err(|e| SpoolError::Storage(format!("write: {e}")))?;
                let mut deltas = Deltas::default();
                for ((key, expires_ms), start) in keys.into_iter().zip(starts) {
                    let offset = self.active_size + start as u64;
                    state.apply(
                        self.active_number,
                        offset,
                        Record::Dedup { key, expires_ms },
                        &mut deltas,
                    );
                }
                self.active_size += buf.len() as u64;
            }
            state.segments.remove(&number);
            self.inner.remove_segment(number);
            let path = segment::segment_path(&self.dir, number);
            std::fs::remove_file(&path).map_err(|e| {
                SpoolError::Storage(format!("cannot delete {}: {e}", path.display()))
            })?;
            log::debug!("spool: deleted finished segment {}", path.display());
        }
        Ok(())
    }
}

/// Opens a segment for appending, creating it if needed.
pub fn open_for_append(path: &std::path::Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| SpoolError::Storage(format!("cannot open {}: {e}", path.display())))
}

/// Segment read handles by number.
pub type Files = HashMap<u64, Arc<File>>;
