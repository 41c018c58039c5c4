//! Flashduty's event types (`event_type`) and an action's choice of them (`events:`).
//!
//! Flashduty pushes three kinds of webhook from the same addresses: custom actions
//! (`i_custom`), incident webhooks (`i_new`, `i_ack`, …) and alert webhooks (`a_new`, …). The
//! prefix says which object the payload carries: `incident` for `i_*`, `alert` for `a_*`.

use std::fmt;

/// Flashduty's documented incident event types (PAYLOAD.md, "Incident and alert webhooks").
pub const INCIDENT_TYPES: [&str; 20] = [
    "i_new",
    "i_assign",
    "i_a_rspd",
    "i_snooze",
    "i_wake",
    "i_ack",
    "i_unack",
    "i_storm",
    "i_custom",
    "i_rslv",
    "i_reopen",
    "i_merge",
    "i_comm",
    "i_r_title",
    "i_r_desc",
    "i_r_impact",
    "i_r_rc",
    "i_r_rsltn",
    "i_r_severity",
    "i_r_field",
];

/// Flashduty's documented alert event types.
pub const ALERT_TYPES: [&str; 4] = ["a_new", "a_update", "a_merge", "a_close"];

/// Longest `event_type` taken: Flashduty's are at most 12 characters.
const MAX_EVENT_TYPE: usize = 64;

/// What a payload is about, from the prefix of its `event_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// `i_*`: the payload carries `incident`.
    Incident,
    /// `a_*`: the payload carries `alert`.
    Alert,
}

impl EventKind {
    /// The kind of `event_type`, or `None` when it is no Flashduty event type at all: those
    /// are short, lowercase, digits and `_` (a bound on what drift logs and counts keep).
    pub fn of(event_type: &str) -> Option<EventKind> {
        let well_formed = event_type.len() <= MAX_EVENT_TYPE
            && event_type
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !well_formed {
            return None;
        }
        let kind = if event_type.starts_with("i_") {
            EventKind::Incident
        } else if event_type.starts_with("a_") {
            EventKind::Alert
        } else {
            return None;
        };
        (event_type.len() > 2).then_some(kind)
    }

    /// The payload's key for the object this kind carries.
    pub fn object(self) -> &'static str {
        match self {
            EventKind::Incident => "incident",
            EventKind::Alert => "alert",
        }
    }

    /// Whether `event_type` (of this kind) is one Flashduty documents.
    pub fn is_documented(self, event_type: &str) -> bool {
        match self {
            EventKind::Incident => INCIDENT_TYPES.contains(&event_type),
            EventKind::Alert => ALERT_TYPES.contains(&event_type),
        }
    }
}

/// The event types an action takes (`events:`), `[i_custom]` unless configured.
#[derive(Clone, PartialEq, Eq)]
pub struct EventTypes {
    /// `i_*`: every incident type, including ones Flashduty adds later.
    all_incidents: bool,
    /// `a_*`: every alert type, likewise.
    all_alerts: bool,
    /// Types named one by one.
    named: Vec<Box<str>>,
}

impl Default for EventTypes {
    fn default() -> EventTypes {
        EventTypes {
            all_incidents: false,
            all_alerts: false,
            named: vec!["i_custom".into()],
        }
    }
}

impl EventTypes {
    /// `[i_*, a_*]`: every type Flashduty sends.
    pub fn every() -> EventTypes {
        EventTypes {
            all_incidents: true,
            all_alerts: true,
            named: Vec::new(),
        }
    }

    /// Reads `events:` entries. An entry that is neither a wildcard nor of the form `i_…` or
    /// `a_…` is an error; a well-formed type Flashduty does not document is a warning (it may
    /// be one Flashduty added after this release), with the closest documented one.
    pub fn parse(entries: &[String]) -> Result<(EventTypes, Vec<String>), String> {
        if entries.is_empty() {
            return Err("must name at least one event type (e.g. [i_custom])".into());
        }
        let mut types = EventTypes {
            all_incidents: false,
            all_alerts: false,
            named: Vec::new(),
        };
        let mut warnings = Vec::new();
        for entry in entries {
            match entry.as_str() {
                "i_*" => types.all_incidents = true,
                "a_*" => types.all_alerts = true,
                name => {
                    let Some(kind) = EventKind::of(name) else {
                        return Err(format!(
                            "{name:?} is not a Flashduty event type (i_… for incidents, a_… \
                             for alerts, or i_* / a_* for every type of a kind)"
                        ));
                    };
                    if !kind.is_documented(name) {
                        warnings.push(format!(
                            "{name:?} is not one of Flashduty's documented event types{}",
                            nearest(name)
                                .map(|near| format!("; did you mean {near}?"))
                                .unwrap_or_default()
                        ));
                    }
                    if !types.named.iter().any(|n| n.as_ref() == name) {
                        types.named.push(name.into());
                    }
                }
            }
        }
        Ok((types, warnings))
    }

    /// Whether the action takes events of this type.
    pub fn wants(&self, event_type: &str) -> bool {
        match EventKind::of(event_type) {
            Some(EventKind::Incident) if self.all_incidents => true,
            Some(EventKind::Alert) if self.all_alerts => true,
            _ => self.named.iter().any(|n| n.as_ref() == event_type),
        }
    }

    /// Whether the action names this type one by one (not through a wildcard).
    pub fn names(&self, event_type: &str) -> bool {
        self.named.iter().any(|n| n.as_ref() == event_type)
    }

    /// Whether the action can take events of this kind at all.
    pub fn takes(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::Incident if self.all_incidents => true,
            EventKind::Alert if self.all_alerts => true,
            _ => self
                .named
                .iter()
                .any(|n| EventKind::of(n).is_some_and(|k| k == kind)),
        }
    }
}

/// `[i_new, a_*]`, as an operator wrote it (wildcards last).
impl fmt::Display for EventTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wildcards = [(self.all_incidents, "i_*"), (self.all_alerts, "a_*")];
        let names = self.named.iter().map(|n| n.as_ref()).chain(
            wildcards
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, name)| *name),
        );
        f.write_str("[")?;
        for (i, name) in names.enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
        }
        f.write_str("]")
    }
}

impl fmt::Debug for EventTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The documented type that differs from `name` by one or two characters, if one does.
fn nearest(name: &str) -> Option<&'static str> {
    INCIDENT_TYPES
        .iter()
        .chain(ALERT_TYPES.iter())
        .copied()
        .filter(|known| crate::delivery::schema::distance(name, known) <= 2)
        .min_by_key(|known| crate::delivery::schema::distance(name, known))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entries: &[&str]) -> Result<(EventTypes, Vec<String>), String> {
        EventTypes::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn the_default_takes_custom_actions_only() {
        let types = EventTypes::default();
        assert!(types.wants("i_custom"));
        assert!(!types.wants("i_new"));
        assert!(!types.wants("a_new"));
        assert!(types.takes(EventKind::Incident));
        assert!(!types.takes(EventKind::Alert));
        assert_eq!(types.to_string(), "[i_custom]");
    }

    #[test]
    fn wildcards_take_every_type_of_their_kind_even_later_ones() {
        let (types, warnings) = parse(&["i_new", "a_*"]).unwrap();
        assert!(warnings.is_empty());
        assert!(types.wants("i_new"));
        assert!(!types.wants("i_rslv"));
        assert!(types.wants("a_close"));
        assert!(types.wants("a_escalate_later"));
        assert!(!types.wants("a_"));
        assert!(!types.wants("x_new"));
        assert_eq!(types.to_string(), "[i_new, a_*]");
        let (all, _) = parse(&["i_*"]).unwrap();
        assert!(all.wants("i_custom") && all.wants("i_brand_new") && !all.wants("a_new"));
    }

    #[test]
    fn bad_entries_are_refused_and_unknown_ones_warned_of() {
        assert!(parse(&[]).unwrap_err().contains("at least one"));
        assert!(parse(&["incident_new"])
            .unwrap_err()
            .contains("\"incident_new\" is not a Flashduty event type"));
        assert!(parse(&["i_"]).is_err());
        assert!(parse(&["i_New"]).is_err());
        assert!(parse(&[&format!("i_{}", "x".repeat(63))]).is_err());
        assert_eq!(EventKind::of("i_r_severity"), Some(EventKind::Incident));
        let (types, warnings) = parse(&["i_rslvd"]).unwrap();
        assert_eq!(
            warnings,
            ["\"i_rslvd\" is not one of Flashduty's documented event types; did you mean i_rslv?"]
        );
        assert!(types.wants("i_rslvd"));
    }
}
