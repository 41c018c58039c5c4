//! `order: event_time`: which deliveries of an ordered upstream may leave now, so that those of
//! one incident leave in `event_time` order (Flashduty does not push them in order).
//!
//! Two rules, both kept in memory by the lane and rebuilt from durable facts (the payload's
//! `event_time` and the time the event was stored):
//! - a delivery is held until `event_time + window`, never more than `window` after it was
//!   stored, so that an earlier event of its incident arriving within the window overtakes it;
//! - of one incident, only the delivery with the earliest `event_time` that is still pending
//!   (in flight, or waiting for a retry) may leave.

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;

use crate::store::IdSet;

/// Where a payload stands in its incident's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The incident (for an alert, its incident, or `alert:<alert_id>`): what guards key on.
    pub incident: String,
    pub event_time_ms: u64,
}

impl Place {
    /// Reads the place of a stored payload; `None` if it names no event time or incident (an
    /// event the ingress validated always does).
    pub fn of(raw: &[u8]) -> Option<Place> {
        #[derive(Deserialize)]
        struct Payload {
            event_time: i64,
            incident: Option<Incident>,
            alert: Option<Alert>,
        }
        #[derive(Deserialize)]
        struct Incident {
            incident_id: Option<String>,
        }
        #[derive(Deserialize)]
        struct Alert {
            alert_id: Option<String>,
            incident: Option<Incident>,
        }
        let payload: Payload = serde_json::from_slice(raw).ok()?;
        let non_empty = |id: Option<String>| id.filter(|id| !id.is_empty());
        let incident = match payload.alert {
            Some(alert) => non_empty(alert.incident.and_then(|i| i.incident_id))
                .or_else(|| non_empty(alert.alert_id).map(|id| format!("alert:{id}"))),
            None => non_empty(payload.incident.and_then(|i| i.incident_id)),
        }?;
        Some(Place {
            incident,
            event_time_ms: u64::try_from(payload.event_time).unwrap_or(0),
        })
    }
}

/// Why a known delivery may not leave yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Held until this time (ms since the epoch) for earlier events to arrive.
    Until(u64),
    /// An earlier event of its incident is still pending.
    Behind,
}

#[derive(Debug)]
struct Entry {
    incident: String,
    event_time_ms: u64,
    release_ms: u64,
}

/// The pending deliveries of one ordered lane that the lane has seen.
#[derive(Debug, Default)]
pub struct Order {
    window_ms: u64,
    entries: HashMap<u64, Entry>,
    /// Per incident, its pending deliveries by (event time, id).
    incidents: HashMap<String, BTreeSet<(u64, u64)>>,
}

impl Order {
    pub fn new(window_ms: u64) -> Order {
        Order {
            window_ms,
            ..Order::default()
        }
    }

    pub fn set_window(&mut self, window_ms: u64) {
        self.window_ms = window_ms;
    }

    pub fn knows(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Learns delivery `id` of the event stored at `accepted_ms`.
    pub fn add(&mut self, id: u64, place: Place, accepted_ms: u64) {
        let release_ms = place
            .event_time_ms
            .saturating_add(self.window_ms)
            .clamp(accepted_ms, accepted_ms.saturating_add(self.window_ms));
        self.incidents
            .entry(place.incident.clone())
            .or_default()
            .insert((place.event_time_ms, id));
        self.entries.insert(
            id,
            Entry {
                incident: place.incident,
                event_time_ms: place.event_time_ms,
                release_ms,
            },
        );
    }

    /// Whether known delivery `id` may leave at `now_ms`.
    pub fn check(&self, id: u64, now_ms: u64) -> Result<(), Wait> {
        let Some(entry) = self.entries.get(&id) else {
            return Ok(());
        };
        if now_ms < entry.release_ms {
            return Err(Wait::Until(entry.release_ms));
        }
        let first = self
            .incidents
            .get(&entry.incident)
            .and_then(|pending| pending.first());
        match first {
            Some(&(_, first)) if first != id => Err(Wait::Behind),
            _ => Ok(()),
        }
    }

    /// Forgets delivery `id`: it was delivered, skipped or dead-lettered.
    pub fn settled(&mut self, id: u64) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        if let Some(pending) = self.incidents.get_mut(&entry.incident) {
            pending.remove(&(entry.event_time_ms, id));
            if pending.is_empty() {
                self.incidents.remove(&entry.incident);
            }
        }
    }

    /// The known deliveries that may not leave at `now_ms`, and the earliest time one of
    /// them is released by the clock (the others wait for an earlier one to settle).
    pub fn waiting(&self, now_ms: u64) -> (IdSet, Option<u64>) {
        let mut held = IdSet::default();
        let mut next = None::<u64>;
        for &id in self.entries.keys() {
            match self.check(id, now_ms) {
                Ok(()) => {}
                Err(wait) => {
                    held.insert(id);
                    if let Wait::Until(at) = wait {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                }
            }
        }
        (held, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(incident: &str, event_time_ms: u64) -> Place {
        Place {
            incident: incident.into(),
            event_time_ms,
        }
    }

    #[test]
    fn the_place_of_incident_and_alert_payloads() {
        let incident = br#"{"event_time": 1700000000123, "event_type": "i_ack",
            "incident": {"incident_id": "abc", "title": "t"}}"#;
        assert_eq!(Place::of(incident), Some(place("abc", 1_700_000_000_123)));
        let alert = br#"{"event_time": 5, "alert": {"alert_id": "al", "incident": {"incident_id": "inc"}}}"#;
        assert_eq!(Place::of(alert), Some(place("inc", 5)));
        let loose = br#"{"event_time": 5, "alert": {"alert_id": "al", "incident": {}}}"#;
        assert_eq!(Place::of(loose), Some(place("alert:al", 5)));
        assert_eq!(Place::of(br#"{"event_time": 5, "incident": {}}"#), None);
        assert_eq!(Place::of(b"not json"), None);
    }

    #[test]
    fn a_delivery_is_held_until_its_event_time_plus_the_window_but_never_longer_than_the_window() {
        let mut order = Order::new(2_000);
        // Stored 300 ms after its event: held 1,700 ms more.
        order.add(1, place("a", 10_000), 10_300);
        assert_eq!(order.check(1, 10_300), Err(Wait::Until(12_000)));
        assert_eq!(order.check(1, 12_000), Ok(()));
        // Pushed late: not held at all.
        order.add(2, place("b", 10_000), 15_000);
        assert_eq!(order.check(2, 15_000), Ok(()));
        // An event time in the future (a clock ahead): held the window, no more.
        order.add(3, place("c", 99_000), 20_000);
        assert_eq!(order.check(3, 20_000), Err(Wait::Until(22_000)));
    }

    #[test]
    fn of_one_incident_the_earliest_pending_event_leaves_first_and_the_rest_wait_for_it() {
        let mut order = Order::new(1_000);
        // The resolve arrives first, the ack 500 ms later, within the window.
        order.add(20, place("inc", 5_000), 5_100);
        order.add(21, place("inc", 4_000), 5_600);
        order.add(30, place("other", 5_000), 5_100);
        let now = 6_000;
        assert_eq!(order.check(21, now), Ok(()), "the ack goes first");
        assert_eq!(order.check(20, now), Err(Wait::Behind));
        assert_eq!(order.check(30, now), Ok(()), "other incidents do not wait");
        let (held, next) = order.waiting(now);
        assert_eq!(held.into_iter().collect::<Vec<_>>(), [20]);
        assert_eq!(next, None);
        // The ack fails and waits for a retry: the resolve still waits behind it.
        assert_eq!(order.check(20, 60_000), Err(Wait::Behind));
        order.settled(21);
        assert_eq!(order.check(20, 60_000), Ok(()));
        order.settled(20);
        order.settled(30);
        assert!(order.is_empty());
        assert!(order.incidents.is_empty());
    }

    #[test]
    fn waiting_names_the_earliest_release() {
        let mut order = Order::new(2_000);
        order.add(1, place("a", 1_000), 1_000);
        order.add(2, place("b", 500), 1_000);
        let (held, next) = order.waiting(1_000);
        assert_eq!(held.len(), 2);
        assert_eq!(next, Some(2_500));
        assert_eq!(order.waiting(3_000).0.len(), 0);
    }
}
