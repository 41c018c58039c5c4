//! Flashduty's documented payloads (custom actions, incident and alert webhooks) as one tree
//! of field names, so that `-t`,
//! `render` and reloads can warn about a template or `when` path Flashduty never sends
//! (`incident.lables.service`), naming the closest documented one. A warning, never a refusal:
//! custom fields and fields Flashduty adds later are real paths too.

use super::path::FieldPath;

/// What a documented field holds, as far as paths into it go.
enum Shape {
    /// A scalar: nothing below it.
    Leaf,
    /// An object with these documented keys.
    Object(&'static [(&'static str, Shape)]),
    /// An object with the keys of both tables (an alert webhook's `alert`: an incident's
    /// alert and more).
    Extended(
        &'static [(&'static str, Shape)],
        &'static [(&'static str, Shape)],
    ),
    /// An array; a numeric segment indexes an element of this shape.
    Array(&'static Shape),
    /// An object with keys of the user's own (`labels`): one more segment, any name.
    Labels,
    /// Anything below (`fields`: custom fields of any JSON type).
    Any,
}

use Shape::{Any, Array, Extended, Labels, Leaf, Object};

const PERSON: &[(&str, Shape)] = &[("person_id", Leaf), ("person_name", Leaf), ("email", Leaf)];

const RESPONDER: &[(&str, Shape)] = &[
    ("person_id", Leaf),
    ("person_name", Leaf),
    ("email", Leaf),
    ("assigned_at", Leaf),
    ("acknowledged_at", Leaf),
];

const IMAGE: &[(&str, Shape)] = &[("src", Leaf), ("href", Leaf), ("alt", Leaf)];

const ASSIGNED_TO: &[(&str, Shape)] = &[
    ("id", Leaf),
    ("type", Leaf),
    ("layer_idx", Leaf),
    ("assigned_at", Leaf),
    ("person_ids", Array(&Leaf)),
    ("effective_person_ids", Array(&Leaf)),
    ("escalate_rule_id", Leaf),
    ("escalate_rule_name", Leaf),
];

const ALERT: &[(&str, Shape)] = &[
    ("alert_id", Leaf),
    ("title", Leaf),
    ("alert_key", Leaf),
    ("alert_severity", Leaf),
    ("alert_status", Leaf),
    ("progress", Leaf),
    ("account_id", Leaf),
    ("integration_id", Leaf),
    ("data_source_id", Leaf),
    ("channel_id", Leaf),
    ("created_at", Leaf),
    ("updated_at", Leaf),
    ("start_time", Leaf),
    ("last_time", Leaf),
    ("ever_muted", Leaf),
    ("images", Array(&Object(IMAGE))),
    ("description", Leaf),
    ("title_rule", Leaf),
    ("labels", Labels),
    ("event_cnt", Leaf),
    ("end_time", Leaf),
    ("close_time", Leaf),
    ("integration_name", Leaf),
    ("integration_type", Leaf),
    ("channel_name", Leaf),
    ("channel_status", Leaf),
    ("responder_name", Leaf),
    ("responder_email", Leaf),
    ("data_source_name", Leaf),
    ("data_source_ref_id", Leaf),
];

const INCIDENT: &[(&str, Shape)] = &[
    ("incident_id", Leaf),
    ("title", Leaf),
    ("incident_severity", Leaf),
    ("incident_status", Leaf),
    ("progress", Leaf),
    ("created_at", Leaf),
    ("updated_at", Leaf),
    ("start_time", Leaf),
    ("account_id", Leaf),
    ("account_name", Leaf),
    ("creator_id", Leaf),
    ("closer_id", Leaf),
    ("owner_id", Leaf),
    ("dedup_key", Leaf),
    ("integration_id", Leaf),
    ("data_source_id", Leaf),
    ("num", Leaf),
    ("channel_status", Leaf),
    ("detail_url", Leaf),
    ("silence_url", Leaf),
    ("has_unfinished_work_item", Leaf),
    ("post_mortem_id", Leaf),
    ("images", Array(&Object(IMAGE))),
    ("description", Leaf),
    ("impact", Leaf),
    ("root_cause", Leaf),
    ("resolution", Leaf),
    ("last_time", Leaf),
    ("end_time", Leaf),
    ("ack_time", Leaf),
    ("close_time", Leaf),
    ("snoozed_before", Leaf),
    ("labels", Labels),
    ("fields", Any),
    ("creator", Object(PERSON)),
    ("closer", Object(PERSON)),
    ("responders", Array(&Object(RESPONDER))),
    ("assigned_to", Object(ASSIGNED_TO)),
    ("alerts", Array(&Object(ALERT))),
    ("alert_cnt", Leaf),
    ("active_alert_cnt", Leaf),
    ("integration_ids", Array(&Leaf)),
    ("data_source_ids", Array(&Leaf)),
    ("integration_types", Array(&Leaf)),
    ("channel_id", Leaf),
    ("team_id", Leaf),
    ("channel_name", Leaf),
    ("group_method", Leaf),
    ("links", Array(&Any)),
    // Older pushes carry the event id inside the incident (PAYLOAD.md, "Where the docs disagree").
    ("event_id", Leaf),
];

const PAYLOAD: Shape = Object(&[
    ("event_id", Leaf),
    ("event_type", Leaf),
    ("event_time", Leaf),
    (
        "event_detail",
        Object(&[("integration_id", Leaf), ("integration_name", Leaf)]),
    ),
    ("person", Object(PERSON)),
    ("incident", Object(INCIDENT)),
    (
        "alert",
        Extended(
            ALERT,
            &[(
                "incident",
                Object(&[("incident_id", Leaf), ("title", Leaf)]),
            )],
        ),
    ),
]);

/// `None` when `path` can be in one of Flashduty's payloads; else a warning saying so, with the
/// closest documented path when there is one near enough to be a typo.
pub fn check(path: &FieldPath) -> Option<String> {
    let keys: Vec<&str> = path.keys().collect();
    let mut shape = &PAYLOAD;
    for (i, key) in keys.iter().enumerate() {
        shape = match shape {
            Any => return None,
            Labels if i + 1 == keys.len() => return None,
            Leaf | Labels => {
                return Some(format!(
                    "{path} is not in Flashduty's payloads ({} has nothing below it)",
                    keys[..i].join(".")
                ))
            }
            Array(element) => {
                if key.parse::<usize>().is_err() {
                    return Some(format!(
                        "{path} is not in Flashduty's payloads ({} is a list: \
                         index it, as in {}.0)",
                        keys[..i].join("."),
                        keys[..i].join(".")
                    ));
                }
                element
            }
            Object(fields) | Extended(fields, _) => match fields
                .iter()
                .chain(more(shape))
                .find(|(name, _)| name == key)
            {
                Some((_, inner)) => inner,
                None => {
                    let mut text = format!("{path} is not in Flashduty's payloads");
                    let names = fields.iter().chain(more(shape)).map(|(name, _)| *name);
                    if let Some(near) = closest(key, names) {
                        let mut fixed: Vec<&str> = keys.clone();
                        fixed[i] = near;
                        text.push_str(&format!("; did you mean {}?", fixed.join(".")));
                    }
                    return Some(text);
                }
            },
        };
    }
    None
}

/// The second table of an extended object.
fn more(shape: &Shape) -> impl Iterator<Item = &(&'static str, Shape)> {
    match shape {
        Extended(_, more) => more.iter(),
        _ => [].iter(),
    }
}

/// The candidate nearest to `key` by edit distance, if near enough to be a typo.
fn closest<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (key.chars().count() / 3).clamp(1, 3);
    candidates
        .map(|c| (distance(key, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, with a swap of two neighbours counted as one edit (`lables`).
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warn(path: &str) -> Option<String> {
        check(&FieldPath::parse(path).unwrap())
    }

    #[test]
    fn documented_and_open_ended_paths_pass() {
        for path in [
            "incident.title",
            "incident.labels.service",
            "incident.labels.anything-the-user-labels",
            "incident.fields.priority",
            "incident.fields.deep.custom.value",
            "incident.responders.0.email",
            "incident.alerts.3.labels.host",
            "incident.labels",
            "incident.alerts",
            "person.email",
            "event_detail.integration_name",
            "alert.labels.host",
            "alert.incident.incident_id",
            "alert.alert_severity",
            "event_type",
        ] {
            assert_eq!(warn(path), None, "{path}");
        }
    }

    #[test]
    fn typos_name_the_closest_documented_path() {
        assert_eq!(
            warn("incident.lables.service").unwrap(),
            "incident.lables.service is not in Flashduty's payloads; \
             did you mean incident.labels.service?"
        );
        assert!(warn("incident.incident_severty")
            .unwrap()
            .ends_with("did you mean incident.incident_severity?"));
        assert!(warn("alert.incident.titel")
            .unwrap()
            .ends_with("did you mean alert.incident.title?"));
        assert!(warn("alert.incidnt")
            .unwrap()
            .ends_with("did you mean alert.incident?"));
        assert!(warn("persn.email")
            .unwrap()
            .ends_with("did you mean person.email?"));
        // Nothing near: no guess.
        assert_eq!(
            warn("incident.zzzzzzzz").unwrap(),
            "incident.zzzzzzzz is not in Flashduty's payloads"
        );
    }

    #[test]
    fn paths_past_a_scalar_or_into_a_list_without_an_index_are_named() {
        assert!(warn("incident.title.text")
            .unwrap()
            .contains("incident.title has nothing below it"));
        assert!(warn("incident.labels.service.name")
            .unwrap()
            .contains("nothing below"));
        assert!(warn("incident.responders.email")
            .unwrap()
            .contains("index it, as in incident.responders.0"));
    }
}
