//! The spool's single writer: turns queued changes into log records, one `write` and one
//! `fdatasync` per batch (group commit), and keeps the log small (maintenance).
//!
//! The thread blocks for the first change, takes whatever else is queued (up to a limit),
//! encodes the batch against the index without changing it, writes it, fsyncs, and only then
//! applies it to the index and answers. So a reader (the dispatcher) never sees a change that
//! is not on disk, and a batch whose write or fsync fails is cut from the file and leaves no
//! trace: a 503 means not accepted. While one fsync runs, the next batch queues up, so
//! throughput grows with load while a lone request is still committed at once.
//!
//! Attempt results are the exception to "fsync before answering": losing one to a power cut
//! only means the delivery is made again (at least once), so a batch of nothing but results is
//! written without an fsync, and fsynced within [`SYNC_RESULTS_WITHIN`] by whatever comes next
//! or by a timer. Results are never refused: while the disk is full they wait here, and their
//! delivery stays in flight, so the write is retried rather than the delivery.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::segment::{self, AttemptKind, Record};
use super::state::{Deltas, State};
use super::{Commit, Inner};
use crate::metrics::{Metrics, SpoolRefusal};
use crate::store::guard::{self, GuardCheck, Guarded, HOUR_MS};
use crate::store::{dedup_key, now_ms, upstream_of, Appended, Finish, IdSet, NewEvent, StoreError};

/// Most changes in one batch: bounds the latency a batch adds to its first member.
pub(super) const MAX_BATCH: usize = 1024;
/// A segment is sealed, and a new one started, past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// How often expired dedup keys are forgotten and finished segments deleted.
const MAINTAIN_EVERY: Duration = Duration::from_secs(10);
/// Longest an attempt result stays written but not fsynced: bounds what a power cut can make
/// the dispatcher repeat.
pub const SYNC_RESULTS_WITHIN: Duration = Duration::from_secs(1);
/// How often results held back by a full disk are written again.
pub(super) const RETRY_FULL_EVERY: Duration = Duration::from_secs(1);
/// Segments deleted per maintenance pass at most.
const DELETE_PER_PASS: usize = 16;
/// Expired dedup keys forgotten per slice; the index lock is let go between slices.
const PURGE_SLICE: usize = 4096;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A change for the writer, with where to send its result.
pub enum Op {
    Append(NewEvent, Admit, Reply<Appended>),
    Finish(Settle, Reply<()>),
    Replay(Option<u64>, Reply<usize>),
    Purge(u64, Reply<bool>),
}

/// How an event is let in: what it is deduplicated on, and what guards it.
pub enum Admit {
    /// A push from Flashduty: once per (action, event_id) within the dedup window, then past
    /// the action's guards, if it has any.
    Push(Option<GuardCheck>),
    /// A report the gateway files itself. `once`: at most one per (action, event_id) within
    /// the dedup window (a guard refusal, which Flashduty may push again); otherwise no key (a
    /// delivery's outcome, reported by the result that records it).
    Report { once: bool },
}

/// How a delivery attempt ended, with the report of that outcome to file in the same batch,
/// so that a crash cannot record the one without the other.
pub struct Settle {
    pub id: u64,
    pub finish: Finish,
    pub report: Option<NewEvent>,
}

impl Op {
    /// Whether it counts against the queue's depth. Results do not: there are never more of
    /// them than attempts in flight, and refusing one would make its delivery run again.
    pub fn is_bounded(&self) -> bool {
        !matches!(self, Op::Finish(..))
    }
}

/// A result held until its batch is on disk.
enum Done {
    Append(Reply<Appended>, Appended),
    /// An event refused before anything was written.
    Refused(Reply<Appended>, StoreError),
    /// Keeps its change, so that a result the disk refused can be written again later.
    Finish(Settle, Reply<()>),
    Replay(Reply<usize>, usize),
    Purge(Reply<bool>, bool),
}

impl Done {
    fn abandon(op: Op) -> Done {
        match op {
            Op::Append(_, _, reply) => Done::Append(reply, Appended::Duplicate),
            Op::Finish(settle, reply) => Done::Finish(settle, reply),
            Op::Replay(_, reply) => Done::Replay(reply, 0),
            Op::Purge(_, reply) => Done::Purge(reply, false),
        }
    }

    fn send(self, failure: Option<&StoreError>) {
        // A dropped receiver means the caller gave up (e.g. the client went away).
        match (self, failure) {
            (Done::Append(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Done::Append(tx, v), None) => drop(tx.send(Ok(v))),
            (Done::Refused(tx, e), _) => drop(tx.send(Err(e))),
            (Done::Finish(_, tx), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Done::Finish(_, tx), None) => drop(tx.send(Ok(()))),
            (Done::Replay(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Done::Replay(tx, v), None) => drop(tx.send(Ok(v))),
            (Done::Purge(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Done::Purge(tx, v), None) => drop(tx.send(Ok(v))),
        }
    }
}

/// Why a write did not make it to disk.
enum Fault {
    /// The filesystem is full: the batch was cut, and writing may work again later.
    Full(StoreError),
    /// Anything else (EIO, a failed fsync): the page cache can no longer be trusted, so the
    /// spool refuses every change until a restart reads back what is really on disk.
    Failed(StoreError),
}

/// Records encoded for a batch, with their offsets in its buffer, not yet applied.
#[derive(Default)]
struct Encoded {
    buf: Vec<u8>,
    records: Vec<(usize, Record)>,
}

impl Encoded {
    /// Encodes a record that carries no event body.
    fn add(&mut self, record: Record) {
        let start = self.buf.len();
        segment::encode_record(&mut self.buf, &record);
        self.records.push((start, record));
    }
}

/// What a batch changes, seen before the index is: lets the batch's later changes see its
/// earlier ones (a duplicate within the batch, a dead letter replayed then purged).
#[derive(Default)]
struct BatchView {
    next_seq: u64,
    keys: HashSet<String>,
    /// Pushes of an action counted against `max_per_hour` in this batch.
    rated: HashMap<String, usize>,
    dead_taken: IdSet,
    finished: IdSet,
}

/// The writer's state, owned by its thread.
pub struct Writer {
    pub(super) inner: Arc<Inner>,
    pub(super) dir: PathBuf,
    /// The spool directory, open for the writer's lifetime: fsyncing it after a segment is
    /// created or deleted must not fail just because descriptors ran out for a moment.
    pub(super) dir_handle: File,
    pub(super) active: File,
    pub(super) active_number: u64,
    pub(super) active_size: u64,
    pub(super) dedup_window_ms: u64,
    pub(super) metrics: Arc<Metrics>,
    pub(super) commit: Commit,
    pub(super) last_maintenance: Instant,
    /// Seal the active segment past this size ([`SEGMENT_BYTES`]; smaller in tests).
    pub(super) segment_bytes: u64,
    /// Bounded changes queued and not yet taken (see [`Op::is_bounded`]).
    pub(super) queued: Arc<AtomicUsize>,
    /// Since when results have been written without an fsync.
    pub(super) unsynced_since: Option<Instant>,
    /// Results that a full disk refused, written again before anything else.
    pub(super) held: Vec<(Settle, Reply<()>)>,
    /// Sealing failed (no space for a new segment): try again at the next maintenance, not
    /// after every batch.
    pub(super) seal_deferred: bool,
    /// When the disk was last found full: it is tried again [`RETRY_FULL_EVERY`] later.
    pub(super) full_since: Option<Instant>,
}

impl Writer {
    /// Runs until every sender is dropped.
    pub fn run(mut self, rx: Receiver<Op>, work: &Notify) {
        loop {
            let first = match self.wake_up_in() {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(wait) => rx.recv_timeout(wait),
            };
            let mut batch = Vec::with_capacity(32);
            match first {
                Ok(op) => batch.push(op),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let bounded = batch.iter().filter(|op| op.is_bounded()).count();
            self.queued.fetch_sub(bounded, Ordering::AcqRel);
            self.commit(batch, work);
            self.purge_dedup_slice();
            if self.inner.failure().is_none()
                && (self.last_maintenance.elapsed() >= MAINTAIN_EVERY
                    || (self.active_size >= self.segment_bytes && !self.seal_deferred))
            {
                self.maintain();
            }
        }
        // Shutting down: make written results durable, so that a power cut right after a
        // clean stop repeats nothing.
        if self.unsynced_since.is_some() || !self.held.is_empty() {
            self.commit(Vec::new(), work);
        }
    }

    /// How long to wait for changes before there is something to do anyway: fsync results,
    /// or write held results again.
    fn wake_up_in(&self) -> Option<Duration> {
        if self.inner.failure().is_some() {
            return None;
        }
        if let Some(since) = self.full_since {
            // Nothing can be written or fsynced until space is back: try once a second, not
            // as often as an overdue fsync would ask for.
            return Some(RETRY_FULL_EVERY.saturating_sub(since.elapsed()));
        }
        let sync = self
            .unsynced_since
            .map(|since| SYNC_RESULTS_WITHIN.saturating_sub(since.elapsed()));
        let held = (!self.held.is_empty()).then_some(RETRY_FULL_EVERY);
        match (sync, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Writes a batch, then applies it and answers; or answers its failure.
    fn commit(&mut self, batch: Vec<Op>, work: &Notify) {
        if let Some(e) = self.inner.failure() {
            let held = self.held.drain(..).map(|(settle, r)| Op::Finish(settle, r));
            for op in held.chain(batch) {
                Done::abandon(op).send(Some(&e));
            }
            return;
        }
        let size = batch.len();
        let started = Instant::now();
        let ops: Vec<Op> = self
            .held
            .drain(..)
            .map(|(settle, r)| Op::Finish(settle, r))
            .chain(batch)
            .collect();
        let (mut encoded, done, must_sync) = match self.inner.lock_state() {
            Ok(state) => self.encode_batch(&state, ops),
            Err(e) => {
                self.inner.fail(&e);
                for op in ops {
                    Done::abandon(op).send(Some(&e));
                }
                return;
            }
        };
        // Results written long enough ago are made durable now; and while the disk is full,
        // a commit record is written even with nothing else, to learn when space is back.
        let due = self
            .unsynced_since
            .is_some_and(|since| since.elapsed() >= SYNC_RESULTS_WITHIN)
            || self.inner.full().is_some();
        match self.append(&mut encoded, must_sync || due) {
            Ok((synced, new_work)) => {
                if synced && must_sync {
                    self.metrics.observe_spool_commit(size, started.elapsed());
                }
                for d in done {
                    d.send(None);
                }
                if new_work {
                    work.notify_waiters();
                }
            }
            Err(Fault::Full(e)) => {
                for d in done {
                    match d {
                        Done::Finish(settle, reply) => self.held.push((settle, reply)),
                        other => other.send(Some(&e)),
                    }
                }
            }
            Err(Fault::Failed(e)) => {
                for d in done {
                    d.send(Some(&e));
                }
            }
        }
    }

    /// Encodes a batch against the index as it stands, without changing it. Returns the
    /// records, the answers to give once they are on disk, and whether the batch must be
    /// fsynced before those answers (it holds more than attempt results).
    fn encode_batch(&self, state: &State, ops: Vec<Op>) -> (Encoded, Vec<Done>, bool) {
        let mut encoded = Encoded {
            buf: Vec::with_capacity(ops.len() * 2048),
            records: Vec::with_capacity(ops.len()),
        };
        let mut view = BatchView {
            next_seq: state.next_seq.max(1),
            ..BatchView::default()
        };
        let now = now_ms();
        let mut must_sync = false;
        let mut done = Vec::with_capacity(ops.len());
        for op in ops {
            let before = encoded.records.len();
            let bounded = op.is_bounded();
            done.push(self.encode(state, &mut view, op, now, &mut encoded));
            must_sync |= bounded && encoded.records.len() > before;
        }
        (encoded, done, must_sync)
    }

    /// Encodes one change.
    fn encode(
        &self,
        state: &State,
        view: &mut BatchView,
        op: Op,
        now: u64,
        out: &mut Encoded,
    ) -> Done {
        match op {
            Op::Append(event, admit, reply) => {
                let key = match &admit {
                    Admit::Push(_) => Some(dedup_key(&event.action, &event.event_id)),
                    Admit::Report { once: true } => {
                        Some(guard::report_key(&event.action, &event.event_id))
                    }
                    Admit::Report { once: false } => None,
                };
                if let Some(key) = &key {
                    if state.is_duplicate(key, now) || view.keys.contains(key) {
                        return Done::Append(reply, Appended::Duplicate);
                    }
                }
                let check = match &admit {
                    Admit::Push(Some(check)) => Some(check),
                    _ => None,
                };
                if let Some(check) = check {
                    if let Some(guarded) = self.guard(state, view, &event.action, check, now) {
                        return Done::Append(reply, Appended::Guarded(guarded));
                    }
                }
                let seq = view.next_seq;
                view.next_seq += 1;
                let expires = now.saturating_add(self.dedup_window_ms);
                // An event's own key rides in its accept record (a report has none there); the
                // keys that stand or fall with it are in the same record, so that a write torn
                // by a power cut cannot keep the event and lose its guard window, or the other
                // way round.
                let (event_expires, mut keys) = match &admit {
                    Admit::Push(_) => (expires, Vec::new()),
                    Admit::Report { .. } => (0, Vec::new()),
                };
                if let (Admit::Report { .. }, Some(key)) = (&admit, &key) {
                    keys.push((key.clone(), expires));
                }
                if let Some(check) = check {
                    if let Some((incident, window)) = &check.once_per_incident {
                        keys.push((
                            guard::once_key(&event.action, incident),
                            now.saturating_add(millis(*window)),
                        ));
                    }
                    if check.max_per_hour.is_some() {
                        keys.push((
                            guard::rate_key(&event.action, seq),
                            now.saturating_add(HOUR_MS),
                        ));
                    }
                }
                let start = out.buf.len();
                encode_event(out, seq, now, event_expires, &event, keys);
                if out.buf.len() - start > segment::HEADER + segment::MAX_RECORD {
                    // Replay would read it as damage: refuse it rather than write a record
                    // that keeps the spool from opening. (The ingress limits keep it from
                    // happening: bodies, event ids and incident ids are bounded.)
                    out.buf.truncate(start);
                    out.records.pop();
                    view.next_seq -= 1;
                    return Done::Refused(
                        reply,
                        StoreError::Storage("event record larger than the spool takes".into()),
                    );
                }
                // Written: later changes of the batch see its keys.
                if let Some(Record::Accept { keys, .. }) = out.records.last().map(|(_, r)| r) {
                    view.keys.extend(keys.iter().map(|(key, _)| key.clone()));
                }
                if let Some(key) = key {
                    view.keys.insert(key);
                }
                if check.is_some_and(|c| c.max_per_hour.is_some()) {
                    *view.rated.entry(event.action.to_string()).or_default() += 1;
                }
                Done::Append(reply, Appended::Accepted(seq))
            }
            Op::Finish(settle, reply) => {
                // Already finished (e.g. replayed and delivered twice): nothing to record, and
                // nothing to report.
                if state.deliveries.is_pending(settle.id) && view.finished.insert(settle.id) {
                    // The report first: a write torn by a power cut keeps a prefix of the
                    // batch, and a report without its result only makes the delivery (and a
                    // second report) happen again, where a result without its report would
                    // never tell the responder.
                    if let Some(report) = &settle.report {
                        let seq = view.next_seq;
                        view.next_seq += 1;
                        encode_event(out, seq, now, 0, report, Vec::new());
                    }
                    out.add(attempt_record(settle.id, &settle.finish, now));
                }
                Done::Finish(settle, reply)
            }
            Op::Replay(id, reply) => {
                let ids: Vec<u64> = match id {
                    Some(id) => vec![id],
                    None => state.deliveries.dead_ids().collect(),
                };
                let mut replayed = 0;
                for id in ids {
                    if state.deliveries.is_dead(id) && view.dead_taken.insert(id) {
                        out.add(Record::Replay { id, at_ms: now });
                        replayed += 1;
                    }
                }
                Done::Replay(reply, replayed)
            }
            Op::Purge(id, reply) => {
                let found = state.deliveries.is_dead(id) && view.dead_taken.insert(id);
                if found {
                    out.add(Record::Purge { id });
                }
                Done::Purge(reply, found)
            }
        }
    }

    /// Which guard, if any, refuses a push of `action` now. The order is the contract's:
    /// `human_only`, `once_per_incident`, `max_per_hour`; the duplicate check came first.
    fn guard(
        &self,
        state: &State,
        view: &BatchView,
        action: &str,
        check: &GuardCheck,
        now: u64,
    ) -> Option<Guarded> {
        if check.not_human {
            return Some(Guarded::HumanOnly);
        }
        if let Some((incident, window)) = &check.once_per_incident {
            let key = guard::once_key(action, incident);
            if let Some(frees_ms) = state.dedup_expiry(&key, now) {
                return Some(Guarded::OncePerIncident { frees_ms });
            }
            if view.keys.contains(&key) {
                return Some(Guarded::OncePerIncident {
                    frees_ms: now.saturating_add(millis(*window)),
                });
            }
        }
        if let Some(limit) = check.max_per_hour {
            // Expiries of the runs in the last hour, earliest first; this batch's come last.
            let mut runs = state.rate_expiries(action, now);
            let batch = view.rated.get(action).copied().unwrap_or(0);
            runs.extend(std::iter::repeat_n(now.saturating_add(HOUR_MS), batch));
            let limit_runs = usize::try_from(limit).unwrap_or(usize::MAX);
            if runs.len() >= limit_runs {
                // Runs fall below the limit once the one at this index has expired.
                let frees_ms = runs[runs.len() - limit_runs];
                return Some(Guarded::MaxPerHour { limit, frees_ms });
            }
        }
        None
    }

    /// Writes encoded records (with a commit record and an fsync when `sync`), then applies
    /// them to the index and the gauges. On failure the bytes are cut from the file and the
    /// index is untouched. Returns whether it fsynced, and whether deliveries became due.
    fn append(&mut self, encoded: &mut Encoded, sync: bool) -> Result<(bool, bool), Fault> {
        let sync = sync && self.commit == Commit::Durable;
        if sync {
            encoded.add(Record::Commit);
        }
        if encoded.buf.is_empty() {
            return Ok((false, false));
        }
        if let Err(e) = self.active.write_all(&encoded.buf) {
            return Err(self.cut(classify("write", &e)));
        }
        if sync {
            if let Err(e) = self.active.sync_data() {
                // Whatever the error, the kernel may have dropped the dirty pages: only a
                // restart, reading the file back, knows what is on disk.
                return Err(self.cut(Fault::Failed(StoreError::Storage(format!("fsync: {e}")))));
            }
            self.unsynced_since = None;
        } else if self.commit == Commit::Durable {
            self.unsynced_since.get_or_insert_with(Instant::now);
        }
        self.full_since = None;
        if self.inner.set_full(None) {
            self.metrics.spool_refusing(SpoolRefusal::DiskFull, false);
        }
        let mut deltas = Deltas::default();
        {
            let inner = Arc::clone(&self.inner);
            let mut state = match inner.lock_state() {
                Ok(state) => state,
                Err(e) => return Err(self.fail(e)),
            };
            let at = self.active_size;
            for (start, record) in encoded.records.drain(..) {
                state.apply(self.active_number, at + start as u64, record, &mut deltas);
            }
        }
        self.active_size += encoded.buf.len() as u64;
        for (lane, delta) in deltas.pending.drain() {
            self.metrics
                .pending_deliveries(upstream_of(&lane))
                .add(delta);
        }
        for (lane, delta) in deltas.dead.drain() {
            self.metrics.dead_letters(upstream_of(&lane)).add(delta);
        }
        Ok((sync, deltas.new_work))
    }

    /// Cuts a batch that did not make it from the end of the active segment, so that nothing
    /// is ever appended after torn bytes, and records the fault.
    fn cut(&mut self, fault: Fault) -> Fault {
        // The cut is fsynced so that a power cut cannot bring back a batch that was refused.
        // After a failed fsync this fsync likely fails too; the restart that a failed spool
        // needs then reads back whatever the disk kept, which may include the batch.
        let cut = self
            .active
            .set_len(self.active_size)
            .and_then(|()| self.active.sync_all());
        if let Err(e) = cut {
            let e = StoreError::Storage(format!(
                "cannot cut a failed write from segment {}: {e}",
                self.active_number
            ));
            return match fault {
                Fault::Failed(first) => self.fail(first),
                Fault::Full(_) => self.fail(e),
            };
        }
        match fault {
            Fault::Full(e) => {
                self.full_since = Some(Instant::now());
                if self.inner.set_full(Some(&e)) {
                    log::error!("spool: {e}; refusing new events until space is freed");
                    self.metrics.spool_refusing(SpoolRefusal::DiskFull, true);
                }
                Fault::Full(e)
            }
            Fault::Failed(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: StoreError) -> Fault {
        log::error!("spool: {e}; refusing every change until a restart");
        self.inner.fail(&e);
        self.metrics.spool_refusing(SpoolRefusal::Failed, true);
        // Results held for space will never be written now: their deliveries stay due.
        for (_, reply) in self.held.drain(..) {
            let _ = reply.send(Err(e.clone()));
        }
        Fault::Failed(e)
    }

    /// Forgets one slice of expired dedup keys.
    fn purge_dedup_slice(&self) -> bool {
        self.inner
            .lock_state()
            .map(|mut state| state.purge_expired_dedup(now_ms(), PURGE_SLICE))
            .unwrap_or(false)
    }

    /// Starts a new segment when the active one is full, forgets expired dedup keys, and
    /// deletes sealed segments that hold no live event. See [`super::State::carry`] for what
    /// is written before a segment can go.
    fn maintain(&mut self) {
        self.last_maintenance = Instant::now();
        while self.purge_dedup_slice() {}
        if self.active_size >= self.segment_bytes {
            self.seal_deferred = false;
            match self.seal() {
                Ok(()) => {}
                Err(Fault::Full(_)) => self.seal_deferred = true,
                Err(Fault::Failed(_)) => return,
            }
        }
        let finished: Vec<u64> = match self.inner.lock_state() {
            Ok(state) => state
                .segments
                .iter()
                .filter(|(n, info)| **n < self.active_number && info.live_events == 0)
                .map(|(n, _)| *n)
                .collect(),
            Err(_) => return,
        };
        // Each deletion costs two fsyncs on the writer thread, which acks wait for: purging one
        // dead letter that pinned hundreds of segments frees them over several passes.
        for number in finished.into_iter().take(DELETE_PER_PASS) {
            match self.delete_segment(number) {
                Ok(()) => {}
                // A full disk can still delete segments that need nothing carried forward.
                Err(Fault::Full(_)) => continue,
                Err(Fault::Failed(_)) => return,
            }
        }
    }

    /// Seals the active segment durably and starts the next one.
    fn seal(&mut self) -> Result<(), Fault> {
        // Results written without an fsync may end the segment being sealed, and later fsyncs
        // go to the next file only: seal it with a commit record and an fsync.
        self.append(&mut Encoded::default(), true)?;
        let number = self.active_number + 1;
        let (file, read) = match super::create_segment(&self.dir, &self.dir_handle, number) {
            Ok(files) => files,
            Err(e) => {
                // Nothing was left behind: carry on in the active segment and try again at
                // the next maintenance if that can pass (no space, no descriptor); else stop.
                log::warn!("spool: cannot start segment {number}: {e}");
                let emfile = e.raw_os_error() == Some(24) || e.raw_os_error() == Some(23);
                return Err(match classify("new segment", &e) {
                    Fault::Full(e) => Fault::Full(e),
                    Fault::Failed(e) if emfile => Fault::Full(e),
                    Fault::Failed(e) => self.fail(e),
                });
            }
        };
        if let Err(e) = self.inner.add_segment(number, read) {
            return Err(self.fail(e));
        }
        self.metrics.spool_segments(self.inner.segment_count());
        let old = std::mem::replace(&mut self.active, file);
        drop(old);
        self.active_number = number;
        self.active_size = 0;
        let inner = Arc::clone(&self.inner);
        let next = match inner.lock_state() {
            Ok(mut state) => {
                state.segments.entry(number).or_default();
                state.next_seq.max(1)
            }
            Err(e) => return Err(self.fail(e)),
        };
        // fsynced at once: segments holding the newest sequence numbers may be deleted before
        // anything else is written here.
        let mut encoded = Encoded::default();
        encoded.add(Record::Seq { next });
        self.append(&mut encoded, true).map(|_| ())
    }

    /// Writes what `number` holds that the state still needs, then deletes it.
    fn delete_segment(&mut self, number: u64) -> Result<(), Fault> {
        let inner = Arc::clone(&self.inner);
        let carry = match inner.lock_state() {
            Ok(state) => state.carry(number, now_ms()),
            Err(e) => return Err(self.fail(e)),
        };
        let mut encoded = Encoded::default();
        for (key, expires_ms) in carry.dedup {
            encoded.add(Record::Dedup {
                key: key.to_string(),
                expires_ms,
            });
        }
        for snapshot in carry.states {
            encoded.add(Record::State(snapshot));
        }
        for seqs in carry.finished {
            encoded.add(Record::Finished { seqs });
        }
        if !encoded.records.is_empty() {
            self.append(&mut encoded, true)?;
        }
        let path = segment::segment_path(&self.dir, number);
        if let Err(e) = std::fs::remove_file(&path) {
            return Err(self.fail(StoreError::Storage(format!(
                "cannot delete {}: {e}",
                path.display()
            ))));
        }
        // Durable before the next deletion: carrying for a later segment assumes this one is
        // gone for good, and a power cut must not bring it back without what was carried.
        if let Err(e) = self.dir_handle.sync_all() {
            return Err(self.fail(StoreError::Storage(format!(
                "fsync of {}: {e}",
                self.dir.display()
            ))));
        }
        if let Ok(mut state) = self.inner.lock_state() {
            state.remove_segment(number);
        }
        self.inner.remove_segment(number);
        self.metrics.spool_segments(self.inner.segment_count());
        log::debug!("spool: deleted finished segment {}", path.display());
        Ok(())
    }
}

/// The log record of an attempt's result.
/// Encodes the accept record of `event` as `seq`, with its dedup expiry (0: no key) and the
/// keys that stand or fall with it.
fn encode_event(
    out: &mut Encoded,
    seq: u64,
    now: u64,
    dedup_expires_ms: u64,
    event: &NewEvent,
    keys: Vec<(String, u64)>,
) {
    let start = out.buf.len();
    let body_at = segment::encode_accept_keyed(
        &mut out.buf,
        seq,
        now,
        dedup_expires_ms,
        &event.action,
        &event.event_id,
        &event.upstreams,
        &keys,
        &event.body,
    );
    out.records.push((
        start,
        Record::Accept {
            seq,
            accepted_ms: now,
            dedup_expires_ms,
            action: event.action.to_string(),
            event_id: event.event_id.clone(),
            upstreams: event.upstreams.iter().map(|u| u.to_string()).collect(),
            keys,
            body_at: body_at - start,
            body_len: event.body.len(),
        },
    ));
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn attempt_record(id: u64, finish: &Finish, now: u64) -> Record {
    let (kind, at_ms, due_ms, status, error) = match finish {
        Finish::Delivered { at_ms, status } => (
            AttemptKind::Delivered,
            *at_ms,
            0,
            Some(*status),
            String::new(),
        ),
        Finish::Skipped => (AttemptKind::Skipped, now, 0, None, String::new()),
        Finish::Retry {
            at_ms,
            due_ms,
            error,
            status,
        } => (AttemptKind::Retry, *at_ms, *due_ms, *status, error.clone()),
        Finish::Dead {
            at_ms,
            error,
            status,
            attempted,
        } => {
            let kind = if *attempted {
                AttemptKind::Dead
            } else {
                AttemptKind::DeadUnattempted
            };
            (kind, *at_ms, 0, *status, error.clone())
        }
    };
    Record::Attempt {
        id,
        kind,
        at_ms,
        due_ms,
        status,
        error,
    }
}

/// A full filesystem is a fault that passes; anything else is not.
fn classify(what: &str, e: &io::Error) -> Fault {
    let full = e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(122); // EDQUOT
    let error = StoreError::Storage(format!("{what}: {e}"));
    if full {
        Fault::Full(StoreError::Full(format!("{what}: {e}")))
    } else {
        Fault::Failed(error)
    }
}

/// Opens a segment for appending, creating it if needed.
pub fn open_for_append(path: &std::path::Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| StoreError::Storage(format!("cannot open {}: {e}", path.display())))
}

/// Segment read handles by number.
pub type Files = HashMap<u64, Arc<File>>;
