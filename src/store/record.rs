//! What the spool stores about one delivery: its identity, progress and last error.

use std::sync::Arc;

/// One (event, upstream) delivery. The same record is kept while pending and once dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// Unique id of this delivery (also the dead letter id).
    pub id: u64,
    /// The accepted event whose bytes it carries.
    pub event: u64,
    /// `action/upstream` (see [`lane_key`]): one shared string for every delivery of the lane
    /// rather than two strings each (#16: memory per pending delivery).
    pub lane: Arc<str>,
    pub event_id: String,
    /// When the event was accepted (ms since the epoch).
    pub accepted_ms: u64,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due (ms since the epoch).
    pub due_ms: u64,
    pub first_attempt_ms: Option<u64>,
    pub last_attempt_ms: Option<u64>,
    /// Shared by the records that failed the same way (an outage gives 100,000 dead letters
    /// one text): one allocation, not one each (#16).
    pub last_error: Option<Arc<str>>,
    pub last_status: Option<u16>,
    /// When it was dead-lettered, if it was.
    pub dead_ms: Option<u64>,
}

impl DeliveryRecord {
    pub fn action(&self) -> &str {
        self.lane.split_once('/').map_or(&*self.lane, |(a, _)| a)
    }

    pub fn upstream(&self) -> &str {
        upstream_of(&self.lane)
    }
}

/// The upstream's name in a lane key.
pub fn upstream_of(lane: &str) -> &str {
    lane.split_once('/').map_or("", |(_, u)| u)
}

/// The key of an (action, upstream) queue. Action names hold no `/`, so the first one splits
/// it again.
pub fn lane_key(action: &str, upstream: &str) -> String {
    format!("{action}/{upstream}")
}

/// How a delivery attempt (or a decision not to attempt) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// A 2xx: forget the delivery.
    Delivered { at_ms: u64, status: u16 },
    /// The upstream's `when` did not match: forget it without an attempt.
    Skipped,
    /// Try again at `due_ms`.
    Retry {
        at_ms: u64,
        due_ms: u64,
        error: String,
        status: Option<u16>,
    },
    /// Give up: move to dead letters.
    Dead {
        at_ms: u64,
        error: String,
        status: Option<u16>,
        /// Whether an attempt was made (false for an upstream that left the config).
        attempted: bool,
    },
}
