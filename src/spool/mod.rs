//! The durable store: accepted events, due deliveries, dedup keys and dead letters.
//!
//! An append-only log (see [`segment`] for the format) under `spool.path`, with an in-memory
//! index ([`state`]) rebuilt from it at start-up. Every change goes through one writer thread
//! ([`writer`]) that writes a batch of records with one `write` and one `fdatasync` (group
//! commit), so concurrent requests share the cost of durability and an answer is given only
//! once its event is on disk. Event bodies stay on disk and are read back with `pread` when a
//! delivery needs them, so a backlog costs memory only for its index entries.
//!
//! The invariant that keeps a restart from re-running delivered actions: **a segment is
//! deleted only when nothing in it is still needed to rebuild the state** — before it goes,
//! its unexpired dedup keys, a snapshot of every delivery of an older segment's event it holds
//! a record of, and which older events it finished are written to the newest segment
//! ([`state::State::carry`]). And the other half: a change reaches the index only once it is on
//! disk, and a write that failed is cut from the file, so the index never holds what a restart
//! would not find.
//!
//! Why not an embedded B-tree store (redb, the design's first candidate): it was tried, and
//! measured at 33-89 us per accepted event (copy-on-write pages across six tables), which
//! capped the gateway near 5,000 events/s on this machine; the log costs a few microseconds.
//! See BENCHMARKS.md.

mod deliveries;
mod segment;
mod state;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use crate::metrics::Metrics;
use crate::store::{
    Appended, DeliveryRecord, Finish, GuardCheck, IdSet, NewEvent, StoreCounts, StoreError,
};
use state::{Deltas, State};
pub use writer::SEGMENT_BYTES;
use writer::{Admit, Files, Op, Settle, Writer};

/// Queued changes beyond which new events are refused with 503 rather than waiting. Attempt
/// results are not counted and never refused (see [`writer`]).
const QUEUE_DEPTH: usize = 16_384;

/// Whether commits wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// fsync before any change is reported done: what the gateway always uses.
    Durable,
    /// No fsync. Only for measuring what durability costs: a crash can lose acknowledged events.
    Unsafe,
}

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Arc<Inner>,
    /// Started lazily: a daemonizing server forks after the spool is opened, and threads do not
    /// survive a fork.
    sender: Mutex<Option<Sender<Op>>>,
    /// Bounded changes queued for the writer (see [`QUEUE_DEPTH`]).
    queued: Arc<AtomicUsize>,
    writer_state: Mutex<Option<Writer>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Woken after a commit that made new deliveries due.
    work: Arc<Notify>,
    /// Held for the spool's lifetime: one process per spool directory.
    _lock: File,
}

/// What the writer and the readers share.
pub(crate) struct Inner {
    state: Mutex<State>,
    files: Mutex<Files>,
    failure: Mutex<Option<StoreError>>,
    /// Set while the disk is full; `full_flag` lets a successful write skip the lock.
    full: Mutex<Option<StoreError>>,
    full_flag: AtomicBool,
}

impl Inner {
    fn lock_state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state
            .lock()
            .map_err(|_| StoreError::Storage("spool index poisoned".into()))
    }

    fn fail(&self, e: &StoreError) {
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert_with(|| e.clone());
        }
    }

    fn failure(&self) -> Option<StoreError> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Records that the disk is full (`Some`) or no longer is (`None`). Returns whether that
    /// changed.
    fn set_full(&self, full: Option<&StoreError>) -> bool {
        if full.is_none() && !self.full_flag.load(Ordering::Acquire) {
            return false;
        }
        let Ok(mut slot) = self.full.lock() else {
            return false;
        };
        let changed = slot.is_some() != full.is_some();
        *slot = full.cloned();
        self.full_flag.store(full.is_some(), Ordering::Release);
        if changed && full.is_none() {
            log::warn!("spool: writing again after the disk was full");
        }
        changed
    }

    fn full(&self) -> Option<StoreError> {
        if !self.full_flag.load(Ordering::Acquire) {
            return None;
        }
        self.full.lock().ok().and_then(|f| f.clone())
    }

    fn add_segment(&self, number: u64, read: File) -> Result<(), StoreError> {
        self.files
            .lock()
            .map_err(|_| StoreError::Closed)?
            .insert(number, Arc::new(read));
        Ok(())
    }

    fn segment_count(&self) -> usize {
        self.files.lock().map(|f| f.len()).unwrap_or(0)
    }

    fn remove_segment(&self, number: u64) {
        if let Ok(mut files) = self.files.lock() {
            files.remove(&number);
        }
    }
}

impl Drop for Shared {
    /// Closes the queue and waits for the writer to finish its last batch, so that the lock
    /// is released when the last handle goes (a reopen in the same process then works).
    fn drop(&mut self) {
        if let Ok(sender) = self.sender.get_mut() {
            sender.take();
        }
        if let Some(thread) = self.writer_thread.get_mut().ok().and_then(Option::take) {
            let _ = thread.join();
        }
    }
}

fn storage(what: impl fmt::Display, e: impl fmt::Display) -> StoreError {
    StoreError::Storage(format!("{what}: {e}"))
}

/// What `-t` checks of `spool.path` without touching the spool: that this process could
/// create the directory (or, if it exists, create files in it). Tried for real, with a probe
/// removed at once, because permission bits say nothing of read-only mounts, `/proc` or
/// systemd's `ProtectSystem`. The probe is created new under a random name and never through
/// a symlink (`-t` often runs as root in a directory the service user owns), and only what
/// this call created is removed.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let probe_name = || format!(".actiongate-check-{:016x}", fastrand::u64(..));
    if dir.is_dir() {
        for _ in 0..8 {
            let probe = dir.join(probe_name());
            let created = File::options()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&probe);
            match created {
                Ok(_) => {
                    return std::fs::remove_file(&probe).map_err(|e| {
                        format!("{}: cannot remove its probe file: {e}", probe.display())
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("{}: cannot create files in it: {e}", dir.display())),
            }
        }
        return Err(format!(
            "{}: cannot create a probe file in it",
            dir.display()
        ));
    }
    if dir.exists() {
        return Err(format!("{}: exists and is not a directory", dir.display()));
    }
    // The first missing component is the one the gateway would create first; `create_dir`
    // fails on anything already there, so only a directory this call made is removed.
    let mut first_missing = dir;
    while let Some(parent) = first_missing.parent() {
        if parent.as_os_str().is_empty() || parent.exists() {
            break;
        }
        first_missing = parent;
    }
    std::fs::create_dir(first_missing)
        .and_then(|()| std::fs::remove_dir(first_missing))
        .map_err(|e| format!("{}: cannot be created: {e}", dir.display()))
}

/// Creates the spool directory if needed and takes its lock: one process per spool.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| storage(format!("cannot create {}", dir.display()), e))?;
    let lock_path = dir.join("LOCK");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| storage(lock_path.display(), e))?;
    lock.try_lock().map_err(|_| {
        StoreError::Locked(format!(
            "{} is in use by another actiongate process",
            dir.display()
        ))
    })?;
    Ok(lock)
}

/// The numbers of the segment files in `dir`, oldest first.
fn segment_numbers(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut numbers: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| storage(dir.display(), e))?
        .filter_map(|entry| {
            entry
                .ok()?
                .file_name()
                .to_str()
                .and_then(segment::segment_number)
        })
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// Makes a damaged spool startable: in every segment, bytes that are not whole records are
/// moved to a `.damaged` file beside it and every whole record is kept. Returns one line per
/// piece set aside. What the damaged bytes held is lost (an accepted event, or a result whose
/// delivery will then be made again); everything else is delivered as usual.
pub fn repair(dir: &Path) -> Result<Vec<String>, StoreError> {
    let _lock = lock_dir(dir)?;
    let mut report = Vec::new();
    for number in segment_numbers(dir)? {
        let path = segment::segment_path(dir, number);
        let data = std::fs::read(&path).map_err(|e| storage(path.display(), e))?;
        let mut kept = Vec::with_capacity(data.len());
        let mut pos = 0;
        while pos < data.len() {
            let Err(damage) = segment::read_segment(&data[pos..], |_, _| {}) else {
                kept.extend_from_slice(&data[pos..]);
                break;
            };
            if damage.why.starts_with(segment::NEWER) {
                return Err(StoreError::Storage(format!(
                    "{} holds {} at offset {}: not damage; run that version on this spool",
                    path.display(),
                    segment::NEWER,
                    pos + damage.at
                )));
            }
            let bad = pos + damage.at;
            kept.extend_from_slice(&data[pos..bad]);
            let resume = segment::next_record(&data, bad + 1).unwrap_or(data.len());
            let aside = set_aside(&path, &data[bad..resume], "damaged")?;
            report.push(format!(
                "{}: {} bytes from offset {bad} ({}) moved to {}",
                path.display(),
                resume - bad,
                damage.why.split(" at offset").next().unwrap_or(&damage.why),
                aside.display()
            ));
            pos = resume;
        }
        if kept.len() != data.len() {
            let tmp = path.with_extension("log.repairing");
            std::fs::write(&tmp, &kept)
                .and_then(|()| File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .and_then(|()| File::open(dir)?.sync_all())
                .map_err(|e| storage(path.display(), e))?;
        }
    }
    Ok(report)
}

/// Writes `bytes` cut from `segment` to a new file beside it (`<segment>.<what>`, numbered if
/// one exists) and makes it durable before the segment is changed.
fn set_aside(segment: &Path, bytes: &[u8], what: &str) -> Result<PathBuf, StoreError> {
    let name = segment
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = segment.parent().unwrap_or(Path::new("."));
    let path = (0u32..)
        .map(|n| match n {
            0 => dir.join(format!("{name}.{what}")),
            n => dir.join(format!("{name}.{what}.{n}")),
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| dir.join(format!("{name}.{what}")));
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| storage(path.display(), e))?;
    std::io::Write::write_all(&mut file, bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| File::open(dir)?.sync_all())
        .map_err(|e| storage(path.display(), e))?;
    Ok(path)
}

/// Creates segment `number` (append handle, read handle) and makes its name durable.
/// If it fails, no file is left behind: an empty newer segment would make the active one a
/// middle segment at the next start, where a torn tail is refused as damage.
fn create_segment(dir: &Path, dir_handle: &File, number: u64) -> std::io::Result<(File, File)> {
    let path = segment::segment_path(dir, number);
    // Only a file this call created is removed on failure.
    let append = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)?;
    let created = File::open(&path).and_then(|read| {
        dir_handle.sync_all()?;
        Ok((append, read))
    });
    if created.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    created
}

impl Spool {
    /// Opens (or creates) the store in directory `dir`, replaying its log, and sets the
    /// pending and dead-letter gauges from what it holds.
    pub fn open(
        dir: &Path,
        dedup_window: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Spool, StoreError> {
        Spool::open_with(dir, dedup_window, metrics, Commit::Durable)
    }

    /// [`Spool::open`], waiting up to `wait` for another process to let go of the store: a
    /// graceful upgrade's new process waits here until the old one has exited.
    pub fn open_after(
        dir: &Path,
        dedup_window: Duration,
        metrics: Arc<Metrics>,
        wait: Duration,
        segment_bytes: u64,
    ) -> Result<Spool, StoreError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let opened = Spool::open_sized(
                dir,
                dedup_window,
                metrics.clone(),
                Commit::Durable,
                segment_bytes,
            );
            match opened {
                Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                result => return result,
            }
        }
    }

    /// [`Spool::open`] with a choice of commit mode (benchmarks compare the two).
    pub fn open_with(
        dir: &Path,
        dedup_window: Duration,
        metrics: Arc<Metrics>,
        commit: Commit,
    ) -> Result<Spool, StoreError> {
        Spool::open_sized(dir, dedup_window, metrics, commit, writer::SEGMENT_BYTES)
    }

    fn open_sized(
        dir: &Path,
        dedup_window: Duration,
        metrics: Arc<Metrics>,
        commit: Commit,
        segment_bytes: u64,
    ) -> Result<Spool, StoreError> {
        let lock = lock_dir(dir)?;
        let dir_handle = File::open(dir).map_err(|e| storage(dir.display(), e))?;
        let numbers = segment_numbers(dir)?;
        let mut state = State::default();
        let mut files = Files::new();
        let mut ignored = Deltas::default();
        let started = Instant::now();
        for (i, &number) in numbers.iter().enumerate() {
            let path = segment::segment_path(dir, number);
            let data = std::fs::read(&path).map_err(|e| storage(path.display(), e))?;
            state.segments.entry(number).or_default();
            let replayed = segment::read_segment(&data, |offset, record| {
                state.apply(number, offset as u64, record, &mut ignored);
            });
            if let Err(damage) = replayed {
                if damage.why.starts_with(segment::NEWER) {
                    return Err(StoreError::Storage(format!(
                        "{} holds {} at offset {}: run that version (or a later one) on this \
                         spool; nothing was changed",
                        path.display(),
                        segment::NEWER,
                        damage.at
                    )));
                }
                if i + 1 < numbers.len() || damage.committed_after {
                    return Err(StoreError::Storage(format!(
                        "{} is damaged at offset {} ({}), and acknowledged records follow the \
                         damage, so it is not a write cut short by a crash. Nothing was changed. \
                         To start with every intact record and the damaged bytes set aside in \
                         a .damaged file, run `actiongate -c <config> --repair-spool`",
                        path.display(),
                        damage.at,
                        damage.why
                    )));
                }
                // A batch the crash cut short: nothing in it was acknowledged. Its bytes are
                // kept aside for a post-mortem, then cut off.
                let kept = set_aside(&path, &data[damage.at..], "torn")?;
                log::warn!(
                    "spool: {} ends in a write cut short ({}); its last {} bytes moved to {}",
                    path.display(),
                    damage.why,
                    data.len() - damage.at,
                    kept.display()
                );
                let file = File::options()
                    .write(true)
                    .open(&path)
                    .map_err(|e| storage(path.display(), e))?;
                file.set_len(damage.at as u64)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| storage(path.display(), e))?;
            }
            files.insert(
                number,
                Arc::new(File::open(&path).map_err(|e| storage(path.display(), e))?),
            );
        }
        let (active, active_number) = match numbers.last() {
            Some(&last) => (
                writer::open_for_append(&segment::segment_path(dir, last))?,
                last,
            ),
            None => {
                let (append, read) =
                    create_segment(dir, &dir_handle, 1).map_err(|e| storage(dir.display(), e))?;
                files.insert(1, Arc::new(read));
                state.segments.entry(1).or_default();
                (append, 1)
            }
        };
        let active_size = active
            .metadata()
            .map_err(|e| storage(dir.display(), e))?
            .len();
        log::info!(
            "spool: {} opened in {} ms: {} events, {} pending deliveries, {} dead letters",
            dir.display(),
            crate::logging::millis(started.elapsed()),
            state.events.len(),
            state.deliveries.pending_len(),
            state.deliveries.dead_len()
        );
        metrics.spool_segments(files.len());
        for record in state.deliveries.pending_records() {
            metrics.pending_deliveries(record.upstream()).inc();
        }
        for record in state.deliveries.dead_records() {
            metrics.dead_letters(record.upstream()).inc();
        }
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            files: Mutex::new(files),
            failure: Mutex::new(None),
            full: Mutex::new(None),
            full_flag: AtomicBool::new(false),
        });
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            inner: inner.clone(),
            dir: PathBuf::from(dir),
            dir_handle,
            active,
            active_number,
            active_size,
            dedup_window_ms: u64::try_from(dedup_window.as_millis()).unwrap_or(u64::MAX),
            metrics,
            commit,
            last_maintenance: Instant::now() - Duration::from_secs(3600),
            segment_bytes,
            queued: queued.clone(),
            unsynced_since: None,
            held: Vec::new(),
            seal_deferred: false,
            full_since: None,
        };
        Ok(Spool {
            shared: Arc::new(Shared {
                inner,
                sender: Mutex::new(None),
                queued,
                writer_state: Mutex::new(Some(writer)),
                writer_thread: Mutex::new(None),
                work: Arc::new(Notify::new()),
                _lock: lock,
            }),
        })
    }

    fn send(&self, op: Op) -> Result<(), StoreError> {
        let mut sender = self.shared.sender.lock().map_err(|_| StoreError::Closed)?;
        if sender.is_none() {
            let state = self
                .shared
                .writer_state
                .lock()
                .map_err(|_| StoreError::Closed)?
                .take()
                .ok_or(StoreError::Closed)?;
            let (tx, rx) = mpsc::channel();
            // The thread must not hold `shared`: it owns the sender whose drop ends the thread.
            let work = self.shared.work.clone();
            let thread = std::thread::Builder::new()
                .name("spool-writer".into())
                .spawn(move || state.run(rx, &work))
                .map_err(|e| storage("cannot start the writer", e))?;
            if let Ok(mut slot) = self.shared.writer_thread.lock() {
                *slot = Some(thread);
            }
            *sender = Some(tx);
        }
        let tx = sender.as_ref().ok_or(StoreError::Closed)?;
        let bounded = op.is_bounded();
        if bounded && self.shared.queued.fetch_add(1, Ordering::AcqRel) >= QUEUE_DEPTH {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(StoreError::Busy);
        }
        tx.send(op).map_err(|_| {
            if bounded {
                self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            }
            StoreError::Closed
        })
    }

    async fn call<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(op(tx))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores an event durably (returns after fsync) with one due delivery per upstream, unless
    /// (action, event_id) was accepted within the dedup window.
    pub async fn append(&self, event: NewEvent) -> Result<Appended, StoreError> {
        self.call(|reply| Op::Append(event, Admit::Push(None), reply))
            .await
    }

    /// [`Spool::append`] for an action with guards: after the duplicate check, a push that a
    /// guard refuses is not stored and the answer says which guard refused it.
    pub async fn append_guarded(
        &self,
        event: NewEvent,
        check: GuardCheck,
    ) -> Result<Appended, StoreError> {
        self.call(|reply| Op::Append(event, Admit::Push(Some(check)), reply))
            .await
    }

    /// Stores a report of a guard refusal for delivery to Flashduty, once per (action,
    /// event_id) within the dedup window: a push that Flashduty sends again is refused again,
    /// but reported once.
    pub async fn append_refusal_report(&self, report: NewEvent) -> Result<Appended, StoreError> {
        self.call(|reply| Op::Append(report, Admit::Report { once: true }, reply))
            .await
    }

    /// Records how a delivery attempt ended.
    pub async fn finish(&self, delivery: u64, finish: Finish) -> Result<(), StoreError> {
        self.finish_reported(delivery, finish, None).await
    }

    /// Records how a delivery attempt ended and, in the same write, the report of that outcome
    /// as a new event for its own upstream: a crash keeps both or neither. Nothing is
    /// reported when the delivery had already finished.
    pub async fn finish_reported(
        &self,
        delivery: u64,
        finish: Finish,
        report: Option<NewEvent>,
    ) -> Result<(), StoreError> {
        let settle = Settle {
            id: delivery,
            finish,
            report,
        };
        self.call(|reply| Op::Finish(settle, reply)).await
    }

    /// Moves dead letters (all, or one) back to due with their attempt count reset.
    pub async fn replay(&self, id: Option<u64>) -> Result<usize, StoreError> {
        self.call(|reply| Op::Replay(id, reply)).await
    }

    /// Deletes one dead letter for good. Returns whether it existed.
    pub async fn purge(&self, id: u64) -> Result<bool, StoreError> {
        self.call(|reply| Op::Purge(id, reply)).await
    }

    /// Why the spool refuses changes until a restart, if it does (a failed write or fsync).
    pub fn failure(&self) -> Option<StoreError> {
        self.shared.inner.failure()
    }

    /// Why new events are refused for now, if they are: the disk is full. Clears by itself
    /// once a write succeeds again.
    pub fn full(&self) -> Option<StoreError> {
        self.shared.inner.full()
    }

    /// Waits until a commit makes new deliveries due. Create the future and `enable` it before
    /// looking for work, so that a commit in between is not missed.
    pub fn work_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.work.notified()
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.shared.inner.lock_state()
    }

    /// Up to `limit` deliveries of `lane` due at `now_ms`, oldest first, except `skip`.
    pub fn due(
        &self,
        lane: &str,
        now_ms: u64,
        limit: usize,
        skip: &IdSet,
    ) -> Result<Vec<u64>, StoreError> {
        let state = self.state()?;
        let Some(queue) = state.due.get(lane) else {
            return Ok(Vec::new());
        };
        Ok(queue
            .range(..=(now_ms, u64::MAX))
            .map(|(_, id)| *id)
            .filter(|id| !skip.contains(id))
            .take(limit)
            .collect())
    }

    /// When the earliest delivery of `lane` not in `skip` is due, if there is one.
    pub fn next_due_ms(&self, lane: &str, skip: &IdSet) -> Result<Option<u64>, StoreError> {
        let state = self.state()?;
        Ok(state.due.get(lane).and_then(|queue| {
            queue
                .iter()
                .find(|(_, id)| !skip.contains(id))
                .map(|(due, _)| *due)
        }))
    }

    /// A pending delivery and its event's bytes.
    pub fn load(&self, delivery: u64) -> Result<Option<(DeliveryRecord, Bytes)>, StoreError> {
        let (record, event) = {
            let state = self.state()?;
            let Some(record) = state.deliveries.pending(delivery) else {
                return Ok(None);
            };
            let event = state.events.get(&record.event).copied().ok_or_else(|| {
                StoreError::Storage(format!(
                    "delivery {delivery} refers to missing event {}",
                    record.event
                ))
            })?;
            (record.clone(), event)
        };
        let file = self
            .shared
            .inner
            .files
            .lock()
            .map_err(|_| StoreError::Closed)?
            .get(&event.segment)
            .cloned()
            .ok_or_else(|| StoreError::Storage(format!("segment {} is gone", event.segment)))?;
        let mut body = vec![0u8; event.len as usize];
        file.read_exact_at(&mut body, event.offset)
            .map_err(|e| storage(format!("reading event {}", record.event), e))?;
        Ok(Some((record, Bytes::from(body))))
    }

    /// Lanes that hold pending deliveries, with their counts.
    pub fn pending_lanes(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let state = self.state()?;
        Ok(state
            .due
            .iter()
            .map(|(lane, queue)| (lane.clone(), queue.len() as u64))
            .collect())
    }

    /// Up to `limit` dead letters, oldest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeliveryRecord>, StoreError> {
        let state = self.state()?;
        Ok(state
            .deliveries
            .dead_records()
            .take(limit)
            .cloned()
            .collect())
    }

    /// How many events, pending deliveries, dedup keys and dead letters are stored.
    pub fn counts(&self) -> Result<StoreCounts, StoreError> {
        let state = self.state()?;
        Ok(StoreCounts {
            events: state.events.len() as u64,
            pending: state.deliveries.pending_len() as u64,
            dedup_keys: state.dedup_len() as u64,
            dead: state.deliveries.dead_len() as u64,
        })
    }
}

#[cfg(test)]
mod tests;
