//! The spool's in-memory index, rebuilt from the log at start-up: events and where their bytes
//! are, pending deliveries by lane and due time, dead letters, dedup keys, and what each
//! segment still holds. Recovery and the writer change it through the same `apply`, so a
//! restarted spool is exactly the one that stopped.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use super::deliveries::Deliveries;
use super::segment::{AttemptKind, Record, Snapshot, StateKind};
use crate::store::guard::parse_rate_key;
use crate::store::{dedup_key, lane_key, DeliveryRecord, IdMap};

/// An accepted event whose bytes some delivery still needs.
#[derive(Debug, Clone, Copy)]
pub struct EventEntry {
    pub segment: u64,
    /// Offset of the body in the segment file, and its length.
    pub offset: u64,
    pub len: u32,
    /// Deliveries (pending or dead) still referring to it.
    pub remaining: u32,
    /// How many deliveries it was accepted with (ids `seq << 8 | 0..upstreams`).
    pub upstreams: u16,
}

/// What a segment holds that the state is rebuilt from.
#[derive(Debug, Clone, Default)]
pub struct SegmentInfo {
    /// Events whose bytes live in this segment and are still needed.
    pub live_events: u32,
    /// Dedup keys recorded here (some may since have expired or been recorded again later).
    pub dedup: Vec<Arc<str>>,
    /// The last sequence number accepted here (the first is in [`State::seq_starts`]).
    pub last_seq: u64,
    /// Deliveries with a record here whose event was accepted in an older segment, with that
    /// segment. While that segment exists its accept record recreates the delivery at
    /// start-up, so the delivery's fate must outlive this segment: see [`State::carry`].
    pub refs: IdMap<u64>,
    /// Events of older segments that a `Finished` record here declares done.
    pub finished: BTreeSet<u64>,
}

#[derive(Debug, Clone, Copy)]
struct DedupEntry {
    expires_ms: u64,
    segment: u64,
}

/// Gauge changes caused by applied records.
#[derive(Debug, Default)]
pub struct Deltas {
    /// By lane (`action/upstream`): the gauges are per upstream, the writer splits the key.
    pub pending: HashMap<Arc<str>, i64>,
    pub dead: HashMap<Arc<str>, i64>,
    pub new_work: bool,
}

#[derive(Debug, Default)]
pub struct State {
    pub next_seq: u64,
    /// Every lane key once, shared by the deliveries of the lane.
    lanes: Lanes,
    pub events: IdMap<EventEntry>,
    /// Pending deliveries and dead letters.
    pub deliveries: Deliveries,
    errors: RecentErrors,
    /// Lane → (due ms, delivery id).
    pub due: HashMap<String, BTreeSet<(u64, u64)>>,
    dedup: HashMap<Arc<str>, DedupEntry>,
    /// Dedup keys in insertion order, for purging expired ones cheaply.
    dedup_order: VecDeque<(u64, Arc<str>)>,
    /// Action → (expiry, seq) of its `max_per_hour` keys (see [`super::guard`]): an index of
    /// some of the dedup keys, kept with them.
    rates: HashMap<Arc<str>, BTreeSet<(u64, u64)>>,
    pub segments: BTreeMap<u64, SegmentInfo>,
    /// First sequence number accepted in a segment → that segment. Sequence numbers grow with
    /// the log, so this finds the segment holding any event's accept record, even after the
    /// event itself is forgotten.
    seq_starts: BTreeMap<u64, u64>,
}

/// Records to write before a segment can be deleted without changing the rebuilt state.
#[derive(Debug, Default)]
pub struct Carry {
    pub dedup: Vec<(Arc<str>, u64)>,
    pub states: Vec<Snapshot>,
    /// Finished events, one sorted list per segment holding their accept records.
    pub finished: Vec<Vec<u64>>,
}

/// Delivery ids are the event's sequence number and the upstream's index: no counter to keep.
pub fn delivery_id(seq: u64, index: usize) -> u64 {
    (seq << 8) | index as u64
}

/// The sequence number of a delivery's event.
pub fn delivery_seq(id: u64) -> u64 {
    id >> 8
}

/// Sequence numbers stay below this so that `seq << 8` keeps every bit (2^56 events is two
/// thousand years at a million a second). The decoder refuses records past it as damage, so
/// replay's arithmetic on sequence numbers never overflows.
pub const MAX_SEQ: u64 = 1 << 56;

/// The last few distinct delivery errors, so that the records failing the same way share one
/// string. Bounded: an upstream that answers a different text each time costs a lookup in a
/// handful of short strings, and each record its own string, as before.
#[derive(Debug, Default)]
struct RecentErrors(VecDeque<Arc<str>>);

impl RecentErrors {
    const KEPT: usize = 8;

    fn intern(&mut self, error: String) -> Arc<str> {
        if let Some(known) = self.0.iter().find(|known| ***known == *error) {
            return known.clone();
        }
        let error: Arc<str> = Arc::from(error);
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        self.0.push_back(error.clone());
        error
    }
}

/// Lane keys, interned: a handful of lanes, hundreds of thousands of deliveries.
#[derive(Debug, Default)]
struct Lanes(HashMap<String, HashMap<String, Arc<str>>>);

impl Lanes {
    fn intern(&mut self, action: &str, upstream: &str) -> Arc<str> {
        if let Some(lane) = self.0.get(action).and_then(|u| u.get(upstream)) {
            return lane.clone();
        }
        let lane: Arc<str> = Arc::from(lane_key(action, upstream));
        self.0
            .entry(action.to_string())
            .or_default()
            .insert(upstream.to_string(), lane.clone());
        lane
    }
}

impl State {
    /// Whether the key (of an event: (action, event_id)) was recorded and its window has not
    /// passed.
    pub fn is_duplicate(&self, key: &str, now_ms: u64) -> bool {
        self.dedup_expiry(key, now_ms).is_some()
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
                keys,
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
                        upstreams: upstreams.len() as u16,
                    },
                );
                let info = self.segments.entry(segment).or_default();
                info.live_events += 1;
                if info.last_seq == 0 {
                    self.seq_starts.insert(seq, segment);
                }
                info.last_seq = info.last_seq.max(seq);
                // A report (an event of the gateway's own) has no dedup key: 0.
                if dedup_expires_ms > 0 {
                    self.remember_dedup(
                        Arc::from(dedup_key(&action, &event_id)),
                        dedup_expires_ms,
                        segment,
                    );
                }
                for (key, expires_ms) in keys {
                    self.remember_dedup(Arc::from(key), expires_ms, segment);
                }
                for (index, upstream) in upstreams.into_iter().enumerate() {
                    let record = DeliveryRecord {
                        id: delivery_id(seq, index),
                        event: seq,
                        lane: self.lanes.intern(&action, &upstream),
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
                    *deltas.pending.entry(record.lane.clone()).or_insert(0) += 1;
                    self.deliveries.insert_pending(record);
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
                let Some(mut record) = self.deliveries.take_pending(id) else {
                    return;
                };
                self.note_ref(segment, id);
                self.unqueue(&record);
                if !matches!(kind, AttemptKind::Skipped | AttemptKind::DeadUnattempted) {
                    record.attempts += 1;
                    record.first_attempt_ms.get_or_insert(at_ms);
                    record.last_attempt_ms = Some(at_ms);
                }
                match kind {
                    AttemptKind::Delivered | AttemptKind::Skipped => {
                        *deltas.pending.entry(record.lane.clone()).or_insert(0) -= 1;
                        self.release_event(record.event);
                    }
                    AttemptKind::Retry => {
                        record.due_ms = due_ms;
                        record.last_error = Some(self.errors.intern(error));
                        record.last_status = status;
                        self.queue(&record);
                        self.deliveries.insert_pending(record);
                    }
                    AttemptKind::Dead | AttemptKind::DeadUnattempted => {
                        record.dead_ms = Some(at_ms);
                        record.last_error = Some(self.errors.intern(error));
                        record.last_status = status.or(record.last_status);
                        *deltas.pending.entry(record.lane.clone()).or_insert(0) -= 1;
                        *deltas.dead.entry(record.lane.clone()).or_insert(0) += 1;
                        self.deliveries.insert_dead(record);
                    }
                }
            }
            Record::Replay { id, at_ms } => {
                let Some(mut record) = self.deliveries.take_dead(id) else {
                    return;
                };
                self.note_ref(segment, id);
                record.attempts = 0;
                record.dead_ms = None;
                record.due_ms = at_ms;
                *deltas.dead.entry(record.lane.clone()).or_insert(0) -= 1;
                *deltas.pending.entry(record.lane.clone()).or_insert(0) += 1;
                self.queue(&record);
                self.deliveries.insert_pending(record);
                deltas.new_work = true;
            }
            Record::Purge { id } => {
                if let Some(record) = self.deliveries.take_dead(id) {
                    self.note_ref(segment, id);
                    *deltas.dead.entry(record.lane).or_insert(0) -= 1;
                    self.release_event(record.event);
                }
            }
            Record::Dedup { key, expires_ms } => {
                self.remember_dedup(Arc::from(key), expires_ms, segment)
            }
            Record::Commit => {}
            Record::Seq { next } => self.next_seq = self.next_seq.max(next),
            Record::State(snapshot) => self.restore(segment, snapshot, deltas),
            Record::Finished { seqs } => {
                for seq in seqs {
                    self.finish_event(segment, seq, deltas);
                }
            }
        }
    }

    /// Ends every delivery of event `seq` still pending or dead.
    fn finish_event(&mut self, segment: u64, seq: u64, deltas: &mut Deltas) {
        if let Some(event_segment) = self.event_segment(seq) {
            if event_segment < segment {
                if let Some(info) = self.segments.get_mut(&segment) {
                    info.finished.insert(seq);
                }
            }
        }
        let Some(event) = self.events.get(&seq).copied() else {
            return;
        };
        for index in 0..usize::from(event.upstreams) {
            let id = delivery_id(seq, index);
            if let Some(record) = self.deliveries.take_pending(id) {
                self.unqueue(&record);
                *deltas.pending.entry(record.lane.clone()).or_insert(0) -= 1;
                self.release_event(seq);
            } else if let Some(record) = self.deliveries.take_dead(id) {
                *deltas.dead.entry(record.lane.clone()).or_insert(0) -= 1;
                self.release_event(seq);
            }
        }
    }

    /// Puts a delivery in the state a snapshot gives, whatever came before it. A delivery no
    /// longer pending or dead has reached its end, and a snapshot cannot bring it back.
    fn restore(&mut self, segment: u64, s: Snapshot, deltas: &mut Deltas) {
        // Noted even when the snapshot changes nothing here: its segment now holds the fact.
        self.note_ref(segment, s.id);
        let mut record = if let Some(record) = self.deliveries.take_pending(s.id) {
            self.unqueue(&record);
            *deltas.pending.entry(record.lane.clone()).or_insert(0) -= 1;
            record
        } else if let Some(record) = self.deliveries.take_dead(s.id) {
            *deltas.dead.entry(record.lane.clone()).or_insert(0) -= 1;
            record
        } else {
            return;
        };
        record.attempts = s.attempts;
        record.due_ms = s.due_ms;
        record.first_attempt_ms = s.first_attempt_ms;
        record.last_attempt_ms = s.last_attempt_ms;
        record.last_status = s.last_status;
        record.last_error = s.last_error.map(|e| self.errors.intern(e));
        record.dead_ms = s.dead_ms;
        match s.kind {
            StateKind::Pending => {
                *deltas.pending.entry(record.lane.clone()).or_insert(0) += 1;
                self.queue(&record);
                self.deliveries.insert_pending(record);
                deltas.new_work = true;
            }
            StateKind::Dead => {
                *deltas.dead.entry(record.lane.clone()).or_insert(0) += 1;
                self.deliveries.insert_dead(record);
            }
            StateKind::Done => self.release_event(record.event),
        }
    }

    /// Remembers that `segment` holds a record of delivery `id`, if the delivery's accept
    /// record is in an older segment that still exists.
    fn note_ref(&mut self, segment: u64, id: u64) {
        let Some(event_segment) = self.event_segment(delivery_seq(id)) else {
            return;
        };
        if event_segment < segment {
            if let Some(info) = self.segments.get_mut(&segment) {
                info.refs.insert(id, event_segment);
            }
        }
    }

    /// The segment holding the accept record of event `seq`, while it exists.
    fn event_segment(&self, seq: u64) -> Option<u64> {
        let (_, segment) = self.seq_starts.range(..=seq).next_back()?;
        let info = self.segments.get(segment)?;
        (seq <= info.last_seq).then_some(*segment)
    }

    /// Forgets a deleted segment.
    pub fn remove_segment(&mut self, segment: u64) {
        self.segments.remove(&segment);
        self.seq_starts.retain(|_, s| *s != segment);
    }

    /// What must be written elsewhere before `segment` is deleted, so that the state rebuilt
    /// without it is the state now: its unexpired dedup keys, and a snapshot of every delivery
    /// it holds a record of whose event's accept record survives in an older segment.
    ///
    /// Without the snapshots, deleting a segment would drop the `Delivered` records of events
    /// kept alive by a sibling (one dead letter pins its segment) and the next start would
    /// deliver them again.
    pub fn carry(&self, segment: u64, now_ms: u64) -> Carry {
        let Some(info) = self.segments.get(&segment) else {
            return Carry::default();
        };
        let dedup = info
            .dedup
            .iter()
            .filter_map(|key| {
                let entry = self.dedup.get(key.as_ref())?;
                (entry.segment == segment && entry.expires_ms > now_ms)
                    .then(|| (key.clone(), entry.expires_ms))
            })
            .collect();
        // A delivery of a live event gets its own snapshot; an event with nothing left to do
        // is carried as one bit (most of a segment pinned by a dead letter is such events).
        let mut ids: Vec<u64> = Vec::new();
        let mut finished: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (id, event_segment) in &info.refs {
            if !self.segments.contains_key(event_segment) {
                continue;
            }
            let seq = delivery_seq(*id);
            if self.events.contains_key(&seq) {
                ids.push(*id);
            } else {
                finished.entry(*event_segment).or_default().push(seq);
            }
        }
        for &seq in &info.finished {
            if let Some(event_segment) = self.event_segment(seq) {
                finished.entry(event_segment).or_default().push(seq);
            }
        }
        let finished = finished
            .into_values()
            .map(|mut seqs| {
                seqs.sort_unstable();
                seqs.dedup();
                seqs
            })
            .collect();
        ids.sort_unstable();
        let states = ids.into_iter().map(|id| self.snapshot(id)).collect();
        Carry {
            dedup,
            states,
            finished,
        }
    }

    /// A delivery's whole state as it stands.
    fn snapshot(&self, id: u64) -> Snapshot {
        let (kind, record) = match (self.deliveries.pending(id), self.deliveries.dead(id)) {
            (Some(r), _) => (StateKind::Pending, Some(r)),
            (None, Some(r)) => (StateKind::Dead, Some(r)),
            (None, None) => (StateKind::Done, None),
        };
        Snapshot {
            id,
            kind,
            attempts: record.map_or(0, |r| r.attempts),
            due_ms: record.map_or(0, |r| r.due_ms),
            first_attempt_ms: record.and_then(|r| r.first_attempt_ms),
            last_attempt_ms: record.and_then(|r| r.last_attempt_ms),
            last_status: record.and_then(|r| r.last_status),
            dead_ms: record.and_then(|r| r.dead_ms),
            last_error: record.and_then(|r| r.last_error.as_deref().map(str::to_string)),
        }
    }

    fn queue(&mut self, record: &DeliveryRecord) {
        let entry = (record.due_ms, record.id);
        match self.due.get_mut(&*record.lane) {
            Some(queue) => {
                queue.insert(entry);
            }
            None => {
                self.due
                    .insert(record.lane.to_string(), BTreeSet::from([entry]));
            }
        }
    }

    fn unqueue(&mut self, record: &DeliveryRecord) {
        if let Some(queue) = self.due.get_mut(&*record.lane) {
            queue.remove(&(record.due_ms, record.id));
            if queue.is_empty() {
                self.due.remove(&*record.lane);
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

    /// When the unexpired `max_per_hour` keys of `action` expire, earliest first.
    pub fn rate_expiries(&self, action: &str, now_ms: u64) -> Vec<u64> {
        self.rates.get(action).map_or_else(Vec::new, |set| {
            set.range((now_ms.saturating_add(1), 0)..)
                .map(|(expires, _)| *expires)
                .collect()
        })
    }

    /// When an unexpired dedup key expires.
    pub fn dedup_expiry(&self, key: &str, now_ms: u64) -> Option<u64> {
        self.dedup
            .get(key)
            .map(|d| d.expires_ms)
            .filter(|expires| *expires > now_ms)
    }

    fn remember_dedup(&mut self, key: Arc<str>, expires_ms: u64, segment: u64) {
        if let Some((action, seq)) = parse_rate_key(&key) {
            self.rates
                .entry(Arc::from(action))
                .or_default()
                .insert((expires_ms, seq));
        }
        self.segments
            .entry(segment)
            .or_default()
            .dedup
            .push(key.clone());
        self.dedup_order.push_back((expires_ms, key.clone()));
        self.dedup.insert(
            key,
            DedupEntry {
                expires_ms,
                segment,
            },
        );
    }

    /// Forgets up to `limit` expired dedup keys. Returns whether more have expired: the
    /// writer purges in slices between batches, so that no ack waits behind a long purge.
    pub fn purge_expired_dedup(&mut self, now_ms: u64, limit: usize) -> bool {
        for _ in 0..limit {
            match self.dedup_order.front() {
                Some((expires, _)) if *expires <= now_ms => {}
                _ => return false,
            }
            if let Some((expires, key)) = self.dedup_order.pop_front() {
                if self
                    .dedup
                    .get(&key)
                    .is_some_and(|d| d.expires_ms == expires)
                {
                    self.dedup.remove(&key);
                    if let Some((action, seq)) = parse_rate_key(&key) {
                        if let Some(set) = self.rates.get_mut(action) {
                            set.remove(&(expires, seq));
                            if set.is_empty() {
                                self.rates.remove(action);
                            }
                        }
                    }
                }
            }
        }
        self.dedup_order
            .front()
            .is_some_and(|(expires, _)| *expires <= now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_failing_the_same_way_share_one_error_text_and_the_cache_stays_small() {
        let mut errors = RecentErrors::default();
        let first = errors.intern("connection refused".to_string());
        let again = errors.intern("connection refused".to_string());
        assert!(Arc::ptr_eq(&first, &again));
        for n in 0..20 {
            assert_eq!(
                &*errors.intern(format!("HTTP 5{n:02}")),
                format!("HTTP 5{n:02}")
            );
        }
        assert_eq!(errors.0.len(), RecentErrors::KEPT);
        let evicted = errors.intern("connection refused".to_string());
        assert!(
            !Arc::ptr_eq(&first, &evicted),
            "forgotten once 8 others came"
        );
        assert_eq!(&*evicted, "connection refused");
    }
}
