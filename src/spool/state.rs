//! The spool's in-memory index, rebuilt from the log at start-up: events and where their bytes
//! are, pending deliveries by lane and due time, dead letters, dedup keys, and what each
//! segment still holds. Recovery and the writer change it through the same `apply`, so a
//! restarted spool is exactly the one that stopped.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::record::{lane_key, DeliveryRecord};
use super::segment::{AttemptKind, Record};

/// An accepted event whose bytes some delivery still needs.
#[derive(Debug, Clone, Copy)]
pub struct EventEntry {
    pub segment: u64,
    /// Offset of the body in the segment file, and its length.
    pub offset: u64,
    pub len: u32,
    /// Deliveries (pending or dead) still referring to it.
    pub remaining: u32,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SegmentInfo {
    /// Events whose bytes live in this segment and are still needed.
    pub live_events: u32,
    /// Latest expiry of a dedup key recorded in this segment.
    pub max_dedup_expiry: u64,
}

#[derive(Debug, Clone, Copy)]
struct DedupEntry {
    expires_ms: u64,
    segment: u64,
}

/// Gauge changes caused by applied records.
#[derive(Debug, Default)]
pub struct Deltas {
    pub pending: HashMap<String, i64>,
    pub dead: HashMap<String, i64>,
    pub new_work: bool,
}

#[derive(Debug, Default)]
pub struct State {
    pub next_seq: u64,
    pub events: HashMap<u64, EventEntry>,
    pub deliveries: HashMap<u64, DeliveryRecord>,
    pub dead: BTreeMap<u64, DeliveryRecord>,
    /// Lane → (due ms, delivery id).
    pub due: HashMap<String, BTreeSet<(u64, u64)>>,
    dedup: HashMap<String, DedupEntry>,
    /// Dedup keys in insertion order, for purging expired ones cheaply.
    dedup_order: VecDeque<(u64, String)>,
    pub segments: BTreeMap<u64, SegmentInfo>,
}

/// The dedup key of (action, event_id).
pub fn dedup_key(action: &str, event_id: &str) -> String {
    format!("{action}\u{1f}{event_id}")
}

/// Delivery ids are the event's sequence number and the upstream's index: no counter to keep.
pub fn delivery_id(seq: u64, index: usize) -> u64 {
    (seq << 8) | index as u64
}

pub const MAX_UPSTREAMS: usize = 256;

impl State {
    /// Whether (action, event_id) was accepted and its window has not passed.
    pub fn is_duplicate(&self, key: &str, now_ms: u64) -> bool {
        self.dedup.get(key).is_some_and(|d| d.expires_ms > now_ms)
    }

    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// Applies one record written at `offset` of `segment`.
    pub fn apply(&mut self, segment: u64, offset: u64, record: Record, deltas: &mut Deltas) {
        match record {
            Record::Accept {
                seq,
                accepted_ms,
                dedup_expires_ms,
                action,
                event_id,
                upstreams,
                body_at,
                body_len,
            } => {
                self.next_seq = self.next_seq.max(seq + 1);
                self.events.insert(
                    seq,
                    EventEntry {
                        segment,
                        offset: offset + body_at as u64,
                        len: body_len as u32,
                        remaining: upstreams.len() as u32,
                    },
                );
                let info = self.segments.entry(segment).or_default();
                info.live_events += 1;
                self.remember_dedup(dedup_key(&action, &event_id), dedup_expires_ms, segment);
                for (index, upstream) in upstreams.into_iter().enumerate() {
                    let record = DeliveryRecord {
                        id: delivery_id(seq, index),
                        event: seq,
                        action: action.clone(),
                        upstream,
                        event_id: event_id.clone(),
                        accepted_ms,
                        attempts: 0,
                        due_ms: accepted_ms,
                        first_attempt_ms: None,
                        last_attempt_ms: None,
                        last_error: None,
                        last_status: None,
                        dead_ms: None,
                    };
                    self.queue(&record);
                    *deltas.pending.entry(record.upstream.clone()).or_insert(0) += 1;
                    self.deliveries.insert(record.id, record);
                }
                deltas.new_work = true;
            }
            Record::Attempt {
                id,
                kind,
                at_ms,
                due_ms,
                status,
                error,
            } => {
                let Some(mut record) = self.deliveries.remove(&id) else {
                    return;
                };
                self.unqueue(&record);
                if !matches!(kind, AttemptKind::Skipped | AttemptKind::DeadUnattempted) {
                    record.attempts += 1;
                    record.first_attempt_ms.get_or_insert(at_ms);
                    record.last_attempt_ms = Some(at_ms);
                }
                match kind {
                    AttemptKind::Delivered | AttemptKind::Skipped => {
                        *deltas.pending.entry(record.upstream.clone()).or_insert(0) -= 1;
                        self.release_event(record.event);
                    }
                    AttemptKind::Retry => {
                        record.due_ms = due_ms;
                        record.last_error = Some(error);
                        record.last_status = status;
                        self.queue(&record);
                        self.deliveries.insert(id, record);
                    }
                    AttemptKind::Dead | AttemptKind::DeadUnattempted => {
                        record.dead_ms = Some(at_ms);
                        record.last_error = Some(error);
                        record.last_status = status.or(record.last_status);
                        *deltas.pending.entry(record.upstream.clone()).or_insert(0) -= 1;
                        *deltas.dead.entry(record.upstream.clone()).or_insert(0) += 1;
                        self.dead.insert(id, record);
                    }
                }
            }
            Record::Replay { id, at_ms } => {
                let Some(mut record) = self.dead.remove(&id) else {
                    return;
                };
                record.attempts = 0;
                record.dead_ms = None;
                record.due_ms = at_ms;
                *deltas.dead.entry(record.upstream.clone()).or_insert(0) -= 1;
                *deltas.pending.entry(record.upstream.clone()).or_insert(0) += 1;
                self.queue(&record);
                self.deliveries.insert(id, record);
                deltas.new_work = true;
            }
            Record::Purge { id } => {
                if let Some(record) = self.dead.remove(&id) {
                    *deltas.dead.entry(record.upstream).or_insert(0) -= 1;
                    self.release_event(record.event);
                }
            }
            Record::Dedup { key, expires_ms } => self.remember_dedup(key, expires_ms, segment),
        }
    }

    fn queue(&mut self, record: &DeliveryRecord) {
        self.due
            .entry(lane_key(&record.action, &record.upstream))
            .or_default()
            .insert((record.due_ms, record.id));
    }

    fn unqueue(&mut self, record: &DeliveryRecord) {
        let lane = lane_key(&record.action, &record.upstream);
        if let Some(queue) = self.due.get_mut(&lane) {
            queue.remove(&(record.due_ms, record.id));
            if queue.is_empty() {
                self.due.remove(&lane);
            }
        }
    }

    fn release_event(&mut self, seq: u64) {
        let Some(event) = self.events.get_mut(&seq) else {
            return;
        };
        event.remaining = event.remaining.saturating_sub(1);
        if event.remaining == 0 {
            let segment = event.segment;
            self.events.remove(&seq);
            if let Some(info) = self.segments.get_mut(&segment) {
                info.live_events = info.live_events.saturating_sub(1);
            }
        }
    }

    fn remember_dedup(&mut self, key: String, expires_ms: u64, segment: u64) {
        let info = self.segments.entry(segment).or_default();
        info.max_dedup_expiry = info.max_dedup_expiry.max(expires_ms);
        self.dedup_order.push_back((expires_ms, key.clone()));
        self.dedup.insert(
            key,
            DedupEntry {
                expires_ms,
                segment,
            },
        );
    }

    /// Forgets up to `limit` expired dedup keys.
    pub fn purge_expired_dedup(&mut self, now_ms: u64, limit: usize) {
        for _ in 0..limit {
            match self.dedup_order.front() {
                Some((expires, _)) if *expires <= now_ms => {}
                _ => return,
            }
            if let Some((expires, key)) = self.dedup_order.pop_front() {
                if self
                    .dedup
                    .get(&key)
                    .is_some_and(|d| d.expires_ms == expires)
                {
                    self.dedup.remove(&key);
                }
            }
        }
    }

    /// Unexpired dedup keys recorded in `segment` (to carry forward before deleting it).
    pub fn dedup_keys_in(&self, segment: u64, now_ms: u64) -> Vec<(String, u64)> {
        self.dedup
            .iter()
            .filter(|(_, d)| d.segment == segment && d.expires_ms > now_ms)
            .map(|(k, d)| (k.clone(), d.expires_ms))
            .collect()
    }
}
