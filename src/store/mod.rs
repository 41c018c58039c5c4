//! The store boundary: what the request path, the dispatcher and the admin API ask of durable
//! storage, and the two places it can live.
//!
//! - [`crate::spool`]: an append-only log on the gateway's own disk (`spool.path`), the default;
//! - [`postgres`]: one PostgreSQL database shared by several gateways (`spool.postgres`), so that
//!   losing an instance loses nothing and a retry that lands on another instance is still a
//!   duplicate.
//!
//! Both keep the same promises, and the rest of the gateway cannot tell them apart: an event is
//! answered only once it is durable; (action, event_id) is a duplicate within the dedup window;
//! a guard's decision is taken with the event's own dedup check; a delivery's result and the
//! report of that result are stored together or not at all; every accepted event is delivered
//! or dead-lettered. The vocabulary they share lives here, so that neither implementation needs
//! the other, and neither needs the config.

pub mod guard;
mod ids;
pub mod postgres;
mod record;

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::spool::Spool;
pub use guard::{GuardCheck, Guarded};
pub use ids::{IdMap, IdSet};
pub use postgres::Postgres;
pub use record::{lane_key, upstream_of, DeliveryRecord, Finish};

/// The largest event body stored: `limits.max_body` may not be set higher. The spool frames
/// records with u32 lengths, and a length past this bound is read as damage.
pub const MAX_BODY: usize = 64 << 20;

/// An action's upstreams fit the eight bits of a spool delivery id that name the upstream.
pub const MAX_UPSTREAMS: usize = 256;

/// Why the store could not do something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Too many changes queued: storage is not keeping up.
    Busy,
    /// The filesystem is full. Passes by itself: writing resumes once space is freed.
    Full(String),
    /// The store has stopped (shutdown).
    Closed,
    /// The disk refused a write or an fsync, or the log is damaged. After a failed write the
    /// spool refuses every further change: what is on disk is then only known after a restart.
    Storage(String),
    /// Another process holds the store.
    Locked(String),
    /// The database cannot be reached, or answers read-only (failing over). Passes by itself:
    /// the store reconnects and takes changes again as soon as a read-write server answers.
    Unavailable(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Busy => f.write_str("spool is busy (write queue full)"),
            StoreError::Full(e) => write!(f, "spool disk is full ({e})"),
            StoreError::Closed => f.write_str("spool is closed"),
            StoreError::Storage(e) => write!(f, "spool storage error: {e}"),
            StoreError::Locked(e) => f.write_str(e),
            StoreError::Unavailable(e) => write!(f, "database unavailable: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    /// Whether the error passes by itself (see each kind); the others last until a restart.
    pub fn passes(&self) -> bool {
        matches!(
            self,
            StoreError::Busy | StoreError::Full(_) | StoreError::Unavailable(_)
        )
    }
}

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
    /// Refused by one of the action's guards: not stored.
    Guarded(Guarded),
}

/// Table sizes, for tests and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreCounts {
    pub events: u64,
    pub pending: u64,
    pub dedup_keys: u64,
    pub dead: u64,
}

/// Why the store refuses new events for now, as `/readyz` says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    /// `/readyz`'s `status`: "spool failed", "disk full", "database unavailable".
    pub status: &'static str,
    pub error: StoreError,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The dedup key of (action, event_id).
pub fn dedup_key(action: &str, event_id: &str) -> String {
    format!("{action}\u{1f}{event_id}")
}

/// Where events, deliveries, dedup keys and dead letters are kept; cheap to clone.
#[derive(Clone)]
pub enum Store {
    Local(Spool),
    Postgres(Postgres),
}

impl Store {
    /// Stores an event durably with one due delivery per upstream, unless (action, event_id)
    /// was accepted within the dedup window.
    pub async fn append(&self, event: NewEvent) -> Result<Appended, StoreError> {
        match self {
            Store::Local(spool) => spool.append(event).await,
            Store::Postgres(pg) => pg.append(event, None).await,
        }
    }

    /// [`Store::append`] for an action with guards: after the duplicate check, a push that a
    /// guard refuses is not stored and the answer says which guard refused it.
    pub async fn append_guarded(
        &self,
        event: NewEvent,
        check: GuardCheck,
    ) -> Result<Appended, StoreError> {
        match self {
            Store::Local(spool) => spool.append_guarded(event, check).await,
            Store::Postgres(pg) => pg.append(event, Some(check)).await,
        }
    }

    /// Stores a report of a guard refusal for delivery to Flashduty, once per (action,
    /// event_id) within the dedup window.
    pub async fn append_refusal_report(&self, report: NewEvent) -> Result<Appended, StoreError> {
        match self {
            Store::Local(spool) => spool.append_refusal_report(report).await,
            Store::Postgres(pg) => pg.append_refusal_report(report).await,
        }
    }

    /// Records how a delivery attempt ended and, in the same commit, the report of that
    /// outcome as a new event for its own upstream. Nothing is reported when the delivery had
    /// already finished.
    pub async fn finish_reported(
        &self,
        delivery: u64,
        finish: Finish,
        report: Option<NewEvent>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Local(spool) => spool.finish_reported(delivery, finish, report).await,
            Store::Postgres(pg) => pg.finish(delivery, finish, report).await,
        }
    }

    /// Records how a delivery attempt ended.
    pub async fn finish(&self, delivery: u64, finish: Finish) -> Result<(), StoreError> {
        self.finish_reported(delivery, finish, None).await
    }

    /// Moves dead letters (all, or one) back to due with their attempt count reset.
    pub async fn replay(&self, id: Option<u64>) -> Result<usize, StoreError> {
        match self {
            Store::Local(spool) => spool.replay(id).await,
            Store::Postgres(pg) => pg.replay(id).await,
        }
    }

    /// Deletes one dead letter for good. Returns whether it existed.
    pub async fn purge(&self, id: u64) -> Result<bool, StoreError> {
        match self {
            Store::Local(spool) => spool.purge(id).await,
            Store::Postgres(pg) => pg.purge(id).await,
        }
    }

    /// Takes up to `limit` deliveries of `lane` due at `now_ms`, oldest first, except `skip`
    /// (the lane's attempts in flight). In cluster mode they are claimed for this instance
    /// for a lease that covers an attempt of `timeout`: no other instance takes them until it
    /// runs out.
    pub async fn due(
        &self,
        lane: &str,
        now_ms: u64,
        limit: usize,
        skip: &IdSet,
        timeout: Duration,
    ) -> Result<Vec<u64>, StoreError> {
        match self {
            Store::Local(spool) => spool.due(lane, now_ms, limit, skip),
            Store::Postgres(pg) => pg.claim(lane, now_ms, limit, skip, timeout).await,
        }
    }

    /// When the earliest delivery of `lane` not in `skip` can be taken, if there is one.
    pub async fn next_due_ms(&self, lane: &str, skip: &IdSet) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Local(spool) => spool.next_due_ms(lane, skip),
            Store::Postgres(pg) => pg.next_due_ms(lane, skip).await,
        }
    }

    /// A pending delivery and its event's bytes.
    pub async fn load(&self, delivery: u64) -> Result<Option<(DeliveryRecord, Bytes)>, StoreError> {
        match self {
            Store::Local(spool) => spool.load(delivery),
            Store::Postgres(pg) => pg.load(delivery).await,
        }
    }

    /// Whether an attempt of `delivery` taking up to `timeout` may be sent now. Always, on the
    /// spool; in cluster mode only while this instance's claim outlasts it with time to spare
    /// (see [`Postgres::may_send`]).
    pub fn may_send(&self, delivery: u64, timeout: Duration) -> bool {
        match self {
            Store::Local(_) => true,
            Store::Postgres(pg) => pg.may_send(delivery, timeout),
        }
    }

    /// Whether the result of an attempt of `delivery` is still worth offering again: in cluster
    /// mode, while this instance's claim holds (see [`Postgres::may_record`]).
    pub fn may_record(&self, delivery: u64) -> bool {
        match self {
            Store::Local(_) => true,
            Store::Postgres(pg) => pg.may_record(delivery),
        }
    }

    /// Lets go of a delivery whose attempt has ended, whether or not its result was recorded:
    /// one not recorded is taken again (in cluster mode, once its claim runs out).
    pub fn release(&self, delivery: u64) {
        if let Store::Postgres(pg) = self {
            pg.release(delivery);
        }
    }

    /// Lanes that hold pending deliveries.
    pub async fn pending_lanes(&self) -> Result<BTreeSet<String>, StoreError> {
        match self {
            Store::Local(spool) => Ok(spool.pending_lanes()?.into_keys().collect()),
            Store::Postgres(pg) => pg.pending_lanes().await,
        }
    }

    /// Lanes another instance of the cluster runs, which this one must leave alone whatever
    /// its own config says (a rolling change of config). None for the spool.
    pub async fn lanes_run_elsewhere(&self) -> Result<HashSet<String>, StoreError> {
        match self {
            Store::Local(_) => Ok(HashSet::new()),
            Store::Postgres(pg) => pg.lanes_run_elsewhere().await,
        }
    }

    /// Tells the store which lanes this instance runs (after every reload).
    pub fn announce_lanes(&self, lanes: Vec<String>) {
        if let Store::Postgres(pg) = self {
            pg.announce_lanes(lanes);
        }
    }

    /// Up to `limit` dead letters, oldest first; in cluster mode, every instance's.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeliveryRecord>, StoreError> {
        match self {
            Store::Local(spool) => spool.dead_letters(limit),
            Store::Postgres(pg) => pg.dead_letters(limit).await,
        }
    }

    /// How many events, pending deliveries, dedup keys and dead letters are stored.
    pub async fn counts(&self) -> Result<StoreCounts, StoreError> {
        match self {
            Store::Local(spool) => spool.counts(),
            Store::Postgres(pg) => pg.counts().await,
        }
    }

    /// Why results cannot be recorded until a restart, if so: lanes then hold off rather than
    /// attempt again and again what they cannot mark done.
    pub fn failure(&self) -> Option<StoreError> {
        match self {
            Store::Local(spool) => spool.failure(),
            Store::Postgres(_) => None,
        }
    }

    /// Why new events are refused right now, if they are.
    pub fn not_ready(&self) -> Option<NotReady> {
        match self {
            Store::Local(spool) => {
                if let Some(error) = spool.failure() {
                    Some(NotReady {
                        status: "spool failed",
                        error,
                    })
                } else {
                    spool.full().map(|error| NotReady {
                        status: "disk full",
                        error,
                    })
                }
            }
            Store::Postgres(pg) => pg.down().map(|error| NotReady {
                status: "database unavailable",
                error,
            }),
        }
    }

    /// Waits until a commit makes new deliveries due (in cluster mode, any instance's commit).
    /// Create the future and `enable` it before looking for work, so that a commit in between
    /// is not missed.
    pub fn work_notified(&self) -> tokio::sync::futures::Notified<'_> {
        match self {
            Store::Local(spool) => spool.work_notified(),
            Store::Postgres(pg) => pg.work_notified(),
        }
    }

    /// How long deliveries of a lane that no instance runs must have waited before a sweep
    /// dead-letters them. Zero for the spool, which only this instance serves. In cluster
    /// mode, a lane an instance announced lately is never swept (see
    /// [`Store::lanes_run_elsewhere`]); the wait covers an instance that has accepted events
    /// for a new lane and not yet announced it.
    pub fn orphan_grace(&self) -> Duration {
        match self {
            Store::Local(_) => Duration::ZERO,
            Store::Postgres(_) => postgres::ORPHAN_GRACE,
        }
    }
}
