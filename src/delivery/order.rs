//! `order: event_time`: which deliveries of an ordered upstream may leave now, so that those of
//! one incident leave in `event_time` order (Flashduty does not push them in order).
//!
//! Two rules, both kept in memory by the lane and rebuilt from durable facts (the payload's
//! `event_time` and the time the event was stored):
//! - a delivery is held until `event_time + window`, never more than `window` after it was
//!   stored, so that an earlier event of its incident arriving within the window overtakes it;
//! - of one incident, only the delivery with the earliest `event_time` that is still pending
//!   (in flight, or waiting for a retry) may leave.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::config::DriftPolicy;
use crate::ingress::event_type::EventTypes;
use crate::ingress::payload::{self, Verdict};
use crate::store::{IdMap, IdSet};

/// Where a payload stands in its incident's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The incident (for an alert, its incident, or `alert:<alert_id>`): what guards key on.
    pub incident: String,
    pub event_time_ms: u64,
}

impl Place {
    /// Reads the place of a stored payload as the ingress read it (the same validator, so the
    /// same incident as guards and reports); `None` for a payload it would not take.
    pub fn of(raw: &[u8]) -> Option<Place> {
        match payload::validate(raw, DriftPolicy::Accept, &EventTypes::every()) {
            Ok(Verdict::Valid(valid)) => Some(Place {
                incident: valid.incident_id.into_owned(),
                event_time_ms: valid.event_time_ms,
            }),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Entry {
    incident: String,
    event_time_ms: u64,
    /// Held until then for earlier events of its incident to arrive.
    release_ms: u64,
    /// When the store has its next attempt due (a retry moves it).
    due_ms: u64,
}

/// The pending deliveries of one ordered lane, which the lane learns as they come due (all of
/// them before it starts any, after a restart too), and from which it picks what may leave.
#[derive(Debug, Default)]
pub struct Order {
    window_ms: u64,
    entries: IdMap<Entry>,
    /// The ids of `entries`: what the lane no longer needs the store to tell it about.
    ids: IdSet,
    /// Per incident, its pending deliveries by (event time, id): the first is its head.
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

    pub fn ids(&self) -> &IdSet {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Learns delivery `id` of the event stored at `accepted_ms`, next due at `due_ms`. One
    /// whose place cannot be read is an incident of its own: never held, holding nothing.
    pub fn add(&mut self, id: u64, place: Option<Place>, accepted_ms: u64, due_ms: u64) {
        let place = place.unwrap_or_else(|| Place {
            incident: format!("#{id}"),
            event_time_ms: 0,
        });
        let release_ms = place
            .event_time_ms
            .saturating_add(self.window_ms)
            .clamp(accepted_ms, accepted_ms.saturating_add(self.window_ms));
        self.settled(id);
        self.incidents
            .entry(place.incident.clone())
            .or_default()
            .insert((place.event_time_ms, id));
        self.ids.insert(id);
        self.entries.insert(
            id,
            Entry {
                incident: place.incident,
                event_time_ms: place.event_time_ms,
                release_ms,
                due_ms,
            },
        );
    }

    /// Delivery `id` failed and is due again at `due_ms`; it stays its incident's head.
    pub fn retry(&mut self, id: u64, due_ms: u64) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.due_ms = due_ms;
        }
    }

    /// Forgets delivery `id`: it was delivered, skipped or dead-lettered.
    pub fn settled(&mut self, id: u64) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        self.ids.remove(&id);
        if let Some(pending) = self.incidents.get_mut(&entry.incident) {
            pending.remove(&(entry.event_time_ms, id));
            if pending.is_empty() {
                self.incidents.remove(&entry.incident);
            }
        }
    }

    /// The heads of the incidents with nothing `busy` (in flight).
    /// (Also skipped: the head of an incident with a later event in flight, which was sent
    /// before an earlier one arrived late.)
    fn heads<'a>(&'a self, busy: &'a IdSet) -> impl Iterator<Item = (u64, &'a Entry)> + 'a {
        let busy_incidents: HashSet<&str> = busy
            .iter()
            .filter_map(|id| self.entries.get(id))
            .map(|entry| entry.incident.as_str())
            .collect();
        self.incidents
            .values()
            .filter_map(|pending| pending.first())
            .filter_map(|(_, id)| self.entries.get(id).map(|entry| (*id, entry)))
            .filter(move |(_, e)| !busy_incidents.contains(e.incident.as_str()))
    }

    /// What may leave at `now_ms`, earliest event first, at most `limit`: of each incident
    /// only its head, once released and due, and only while no delivery of it is in flight.
    pub fn startable(&self, now_ms: u64, busy: &IdSet, limit: usize) -> Vec<u64> {
        let mut ready: Vec<(u64, u64)> = self
            .heads(busy)
            .filter(|(_, e)| e.release_ms <= now_ms && e.due_ms <= now_ms)
            .map(|(id, e)| (e.event_time_ms, id))
            .collect();
        ready.sort_unstable();
        ready.into_iter().take(limit).map(|(_, id)| id).collect()
    }

    /// When the next head not in flight may leave, if one is waiting.
    pub fn next_wake(&self, busy: &IdSet) -> Option<u64> {
        self.heads(busy)
            .map(|(_, e)| e.release_ms.max(e.due_ms))
            .min()
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
        let fixture = |name: &str| {
            std::fs::read(format!(
                "{}/tests/fixtures/{name}.json",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap()
        };
        let inc = "692701aa3c5e8f0012ab77c1";
        assert_eq!(
            Place::of(&fixture("incident_ack")),
            Some(place(inc, 1_764_159_812_400))
        );
        assert_eq!(
            Place::of(&fixture("alert_closed")),
            Some(place(inc, 1_764_161_990_020))
        );
        assert_eq!(
            Place::of(&fixture("alert_new")),
            Some(place("alert:692701a03c5e8f0012ab77b0", 1_764_159_690_310))
        );
        // The other kind's object, whatever it holds, changes nothing (as for the ingress).
        let mut doc: serde_json::Value = serde_json::from_slice(&fixture("incident_ack")).unwrap();
        doc["alert"] = serde_json::json!({"alert_id": "zz"});
        let body = serde_json::to_vec(&doc).unwrap();
        assert_eq!(Place::of(&body), Some(place(inc, 1_764_159_812_400)));
        doc["alert"] = 5.into();
        let body = serde_json::to_vec(&doc).unwrap();
        assert_eq!(Place::of(&body), Some(place(inc, 1_764_159_812_400)));
        assert_eq!(Place::of(b"not json"), None);
    }

    fn none() -> IdSet {
        IdSet::default()
    }

    #[test]
    fn a_delivery_is_held_until_its_event_time_plus_the_window_but_never_longer_than_the_window() {
        let mut order = Order::new(2_000);
        // Stored 300 ms after its event: held 1,700 ms more.
        order.add(1, Some(place("a", 10_000)), 10_300, 10_300);
        assert!(order.startable(10_300, &none(), 10).is_empty());
        assert_eq!(order.next_wake(&none()), Some(12_000));
        assert_eq!(order.startable(12_000, &none(), 10), [1]);
        // Pushed late: not held at all.
        order.add(2, Some(place("b", 10_000)), 15_000, 15_000);
        assert_eq!(
            order.startable(15_000, &none(), 10),
            [1, 2],
            "same event time: by id"
        );
        // An event time in the future (a clock ahead): held the window, no more.
        order.add(3, Some(place("c", 99_000)), 20_000, 20_000);
        assert!(!order.startable(21_999, &none(), 10).contains(&3));
        assert!(order.startable(22_000, &none(), 10).contains(&3));
        // A payload without a place is never held and holds nothing.
        order.add(4, None, 20_000, 20_000);
        assert!(order.startable(20_000, &none(), 10).contains(&4));
    }

    #[test]
    fn of_one_incident_the_earliest_pending_event_leaves_first_and_the_rest_wait_for_it() {
        let mut order = Order::new(1_000);
        // The resolve arrives first, the ack 500 ms later, within the window.
        order.add(20, Some(place("inc", 5_000)), 5_100, 5_100);
        order.add(21, Some(place("inc", 4_000)), 5_600, 5_600);
        order.add(30, Some(place("other", 5_000)), 5_100, 5_100);
        let now = 6_000;
        // The ack goes first; other incidents do not wait.
        assert_eq!(order.startable(now, &none(), 10), [21, 30]);
        assert_eq!(
            order.startable(now, &none(), 1),
            [21],
            "earliest event first"
        );
        // While the ack is in flight, nothing else of its incident may go, nor wakes the lane.
        let busy: IdSet = [21].into_iter().collect();
        assert_eq!(order.startable(now, &busy, 10), [30]);
        let both: IdSet = [21, 30].into_iter().collect();
        assert_eq!(order.next_wake(&both), None);
        // The ack fails and waits for a retry: the resolve still waits behind it.
        order.retry(21, 60_000);
        assert_eq!(order.startable(59_999, &none(), 10), [30]);
        assert_eq!(
            order.next_wake(&none()),
            Some(6_000),
            "the other incident's release"
        );
        assert_eq!(order.startable(60_000, &none(), 10), [21, 30]);
        order.settled(21);
        assert_eq!(order.startable(60_000, &none(), 10), [20, 30]);
        order.settled(20);
        order.settled(30);
        assert!(order.is_empty() && order.ids().is_empty());
        assert!(order.incidents.is_empty());
    }

    #[test]
    fn learning_a_delivery_twice_keeps_one_entry() {
        let mut order = Order::new(1_000);
        order.add(1, Some(place("a", 1_000)), 1_000, 1_000);
        order.add(1, Some(place("a", 1_000)), 1_000, 1_000);
        assert_eq!(order.len(), 1);
        assert_eq!(order.incidents["a"].len(), 1);
    }
}
