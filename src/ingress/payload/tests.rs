use super::*;

const FULL: &[u8] = include_bytes!("../../../tests/fixtures/custom_action_full.json");
const MANUAL: &[u8] = include_bytes!("../../../tests/fixtures/custom_action_manual.json");
const LEGACY: &[u8] = include_bytes!("../../../tests/fixtures/custom_action_legacy_event_id.json");
const UNKNOWN: &[u8] = include_bytes!("../../../tests/fixtures/custom_action_unknown_fields.json");

fn invalid(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/invalid/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(path).unwrap()
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(path).unwrap()
}

/// Every type Flashduty sends, as an action with `events: [i_*, a_*]` takes them.
fn every_type() -> EventTypes {
    EventTypes::parse(&["i_*".into(), "a_*".into()]).unwrap().0
}

fn check(body: &[u8], policy: DriftPolicy) -> Result<Validated<'_>, PayloadError> {
    check_for(body, policy, &every_type())
}

fn check_for<'a>(
    body: &'a [u8],
    policy: DriftPolicy,
    events: &EventTypes,
) -> Result<Validated<'a>, PayloadError> {
    match validate(body, policy, events)? {
        Verdict::Valid(valid) => Ok(valid),
        Verdict::Unwanted { event_type, .. } => panic!("{event_type} unwanted"),
    }
}

fn accept(body: &[u8]) -> Validated<'_> {
    check(body, DriftPolicy::Accept).unwrap_or_else(|e| panic!("{e:?}"))
}

fn refuse(body: &[u8]) -> PayloadError {
    check(body, DriftPolicy::Accept).unwrap_err()
}

/// What an action taking only `events` makes of `body`: `Ok(event_id)` for an unwanted type.
fn unwanted(body: &[u8], events: &[&str]) -> Result<String, PayloadError> {
    let events = EventTypes::parse(&events.iter().map(|e| e.to_string()).collect::<Vec<_>>())
        .unwrap()
        .0;
    match validate(body, DriftPolicy::Reject, &events)? {
        Verdict::Unwanted { event_id, .. } => Ok(event_id.into_owned()),
        Verdict::Valid(valid) => panic!("{:?} wanted", valid.event_id),
    }
}

/// `body` with the field at the `/`-separated `pointer` set to the JSON literal `value`
/// (created if absent), or removed when `value` is `None`.
fn edit(body: &[u8], pointer: &str, value: Option<&str>) -> Vec<u8> {
    let mut doc: serde_json::Value = serde_json::from_slice(body).unwrap();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = if parent.is_empty() {
        &mut doc
    } else {
        doc.pointer_mut(parent).unwrap()
    };
    match value {
        Some(value) => target[key] = serde_json::from_str(value).unwrap(),
        None => drop(target.as_object_mut().unwrap().remove(key)),
    }
    serde_json::to_vec(&doc).unwrap()
}

fn with(body: &[u8], pointer: &str, value: &str) -> Vec<u8> {
    edit(body, pointer, Some(value))
}

fn without(body: &[u8], pointer: &str) -> Vec<u8> {
    edit(body, pointer, None)
}

/// `body` with its top-level `keys` moved to the end, in that order.
fn moved_last(body: &[u8], keys: &[&str]) -> Vec<u8> {
    let mut doc: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).unwrap();
    for key in keys {
        let value = doc.remove(*key).unwrap();
        doc.insert(key.to_string(), value);
    }
    serde_json::to_vec(&doc).unwrap()
}

/// The full fixture with `incident.<field>` replaced by `value` (a JSON literal).
fn with_incident_field(field: &str, value: &str) -> Vec<u8> {
    let mut doc: serde_json::Value = serde_json::from_slice(FULL).unwrap();
    doc["incident"][field] = serde_json::from_str(value).unwrap();
    serde_json::to_vec(&doc).unwrap()
}

#[test]
fn schema_tables_are_sorted_and_fit_the_seen_mask() {
    for table in [
        EVENT_DETAIL,
        PERSON,
        RESPONDER,
        IMAGE,
        ASSIGNED_TO,
        ALERT,
        ALERT_EVENT,
        ALERT_INCIDENT,
        INCIDENT,
    ] {
        assert!(table.len() <= 64);
        assert!(
            table.windows(2).all(|w| w[0].name < w[1].name),
            "{:?}",
            table[0].name
        );
    }
    let Kind::Object(envelope) = &ENVELOPE else {
        panic!()
    };
    assert!(envelope.windows(2).all(|w| w[0].name < w[1].name));
}

#[test]
fn every_object_of_the_schema_is_indexed_and_its_index_finds_each_field_alone() {
    fn check(kind: &Kind, checked: &mut usize) {
        match kind {
            Kind::Object(fields) => {
                let index = FieldIndex::of(fields).expect("every table the validator meets");
                assert!(fields.len() < usize::from(u8::MAX));
                for (at, field) in fields.iter().enumerate() {
                    assert_eq!(index.find(fields, field.name), Some(at), "{}", field.name);
                    check(&field.kind, checked);
                }
                for unknown in [
                    "",
                    "x",
                    "titl",
                    "titles",
                    "Title",
                    "equals_md5",
                    "event_idx",
                ] {
                    assert_eq!(index.find(fields, unknown), None, "{unknown}");
                }
                *checked += 1;
            }
            Kind::Subject { fields, base, .. } => {
                check(&Kind::Object(fields), checked);
                if !base.is_empty() {
                    check(&Kind::Object(base), checked);
                }
            }
            Kind::Array(item) | Kind::Map(item) => check(item, checked),
            _ => {}
        }
    }
    let mut checked = 0;
    check(&ENVELOPE, &mut checked);
    assert!(checked >= 11, "{checked}");
}

#[test]
fn every_valid_fixture_is_accepted() {
    assert_eq!(accept(FULL).event_id, "3f9c2b7a51e04d8c9a6b0e1f2d3c4b5a");
    assert_eq!(accept(MANUAL).event_id, "c0ffee00c0ffee00c0ffee00c0ffee01");
    assert!(accept(FULL).drift.is_empty());
    assert!(accept(MANUAL).drift.is_empty());
}

#[test]
fn legacy_event_id_inside_incident_is_used() {
    assert_eq!(accept(LEGACY).event_id, "a1b2c3d4e5f60718293a4b5c6d7e8f90");
}

#[test]
fn unknown_fields_are_accepted_and_new_enum_values_are_drift() {
    let v = accept(UNKNOWN);
    assert_eq!(v.event_id, "0badf00d0badf00d0badf00d0badf00d");
    assert_eq!(v.drift, vec![(2, "Mitigated".to_string())]);
    assert_eq!(DRIFT_FIELDS[2], "incident.progress");
}

#[test]
fn drift_is_rejected_when_the_policy_says_so() {
    let err = check(UNKNOWN, DriftPolicy::Reject).unwrap_err();
    assert_eq!(
        err,
        PayloadError::Invalid(
            "incident.progress: unknown value \"Mitigated\" (expected one of Triggered, Processing, Closed)".into()
        )
    );
}

#[test]
fn each_invalid_fixture_is_refused_with_its_field_path() {
    let cases = [
        (
            "empty_event_id",
            "event_id: required, a non-empty string (at event_id, or incident.event_id)",
        ),
        (
            "missing_event_id",
            "event_id: required, a non-empty string (at event_id, or incident.event_id)",
        ),
        (
            "event_time_is_string",
            "event_time: expected an integer, got a string",
        ),
        (
            "incident_id_missing",
            "incident.incident_id: required field is missing",
        ),
        (
            "incident_is_array",
            "incident: expected an object, got an array",
        ),
        (
            "labels_value_not_string",
            "incident.labels.replicas: expected a string, got a number",
        ),
        ("missing_incident", "incident: required field is missing"),
        ("not_an_object", "payload: expected an object, got an array"),
        (
            "event_type_not_flashduty",
            "event_type: expected a Flashduty event type (i_… for an incident, a_… for an \
             alert), got \"incident.created\"",
        ),
        (
            "alert_id_missing",
            "alert.alert_id: required field is missing",
        ),
        ("alert_missing", "alert: required field is missing"),
    ];
    for (name, message) in cases {
        assert_eq!(
            refuse(&invalid(name)),
            PayloadError::Invalid(message.into()),
            "{name}"
        );
    }
}

#[test]
fn truncated_or_malformed_json_is_not_json() {
    assert!(matches!(refuse(&invalid("truncated")), PayloadError::NotJson(m) if m.contains("EOF")));
    assert!(matches!(refuse(b"{\"a\": 1,}"), PayloadError::NotJson(_)));
    assert!(matches!(refuse(b""), PayloadError::NotJson(_)));
    assert!(matches!(refuse(b"{} trailing"), PayloadError::NotJson(_)));
    // A schema problem early but broken JSON later is still "not JSON".
    assert!(matches!(
        refuse(b"{\"event_time\": \"x\", "),
        PayloadError::NotJson(_)
    ));
}

#[test]
fn a_body_that_is_not_utf8_is_not_json_and_says_where() {
    // A Latin-1 "é" inside the title, on the third line.
    let mut body = b"{\n  \"event_id\": \"e\",\n  \"title\": \"caf".to_vec();
    body.extend_from_slice(&[0xe9, b'"', b'}']);
    assert_eq!(
        refuse(&body),
        PayloadError::NotJson("invalid UTF-8 at line 3 column 16".into())
    );
    assert_eq!(
        refuse(&[0xff]),
        PayloadError::NotJson("invalid UTF-8 at line 1 column 1".into())
    );
}

#[test]
fn unset_optional_fields_may_be_null_zero_empty_or_empty_containers() {
    for value in ["null", "0", "\"\"", "{}", "[]"] {
        for field in [
            "labels",
            "alerts",
            "creator",
            "assigned_to",
            "last_time",
            "channel_name",
            "group_method",
        ] {
            let body = with_incident_field(field, value);
            assert!(
                check(&body, DriftPolicy::Reject).is_ok(),
                "{field} = {value}"
            );
        }
    }
}

#[test]
fn documented_types_are_enforced_with_paths() {
    let cases = [
        (
            "alert_cnt",
            "\"3\"",
            "incident.alert_cnt: expected an integer, got a string",
        ),
        (
            "alert_cnt",
            "1.5",
            "incident.alert_cnt: expected an integer, got 1.5",
        ),
        (
            "has_unfinished_work_item",
            "\"no\"",
            "incident.has_unfinished_work_item: expected a boolean, got a string",
        ),
        (
            "title",
            "null",
            "incident.title: expected a string, got null",
        ),
        (
            "incident_id",
            "\"\"",
            "incident.incident_id: must not be empty",
        ),
        (
            "integration_ids",
            "[1, \"2\"]",
            "incident.integration_ids[1]: expected an integer, got a string",
        ),
        (
            "responders",
            "[{\"email\": 5}]",
            "incident.responders[0].email: expected a string, got a number",
        ),
        (
            "labels",
            "\"web\"",
            "incident.labels: expected an object, got a string",
        ),
        (
            "alerts",
            "[null]",
            "incident.alerts[0]: expected an object, got null",
        ),
    ];
    for (field, value, message) in cases {
        let body = with_incident_field(field, value);
        assert_eq!(
            refuse(&body),
            PayloadError::Invalid(message.into()),
            "{field} = {value}"
        );
    }
}

#[test]
fn custom_fields_accept_any_json_type() {
    let body = with_incident_field("fields", r#"{"a": [1, {"b": null}], "c": 1.5, "d": "x"}"#);
    assert!(check(&body, DriftPolicy::Reject).is_ok());
}

#[test]
fn escaped_event_ids_and_oversized_ones() {
    let body = String::from_utf8(FULL.to_vec())
        .unwrap()
        .replace("3f9c2b7a51e04d8c9a6b0e1f2d3c4b5a", "ab\\u0063d");
    assert_eq!(accept(body.as_bytes()).event_id, "abcd");
    let long = "x".repeat(MAX_EVENT_ID + 1);
    let body = String::from_utf8(FULL.to_vec())
        .unwrap()
        .replace("3f9c2b7a51e04d8c9a6b0e1f2d3c4b5a", &long);
    assert!(
        matches!(refuse(body.as_bytes()), PayloadError::Invalid(m) if m.starts_with("event_id: longer"))
    );
}

#[test]
fn incident_ids_are_kept_and_oversized_ones_refused() {
    let valid = accept(FULL);
    assert_eq!(valid.incident_id, "692701aa3c5e8f0012ab77c1");
    assert!(valid.person);
    let long = format!("\"{}\"", "i".repeat(MAX_INCIDENT_ID + 1));
    assert_eq!(
        refuse(&with_incident_field("incident_id", &long)),
        PayloadError::Invalid(format!(
            "incident.incident_id: longer than {MAX_INCIDENT_ID} bytes"
        ))
    );
    let mut doc: serde_json::Value = serde_json::from_slice(FULL).unwrap();
    doc["person"] = serde_json::json!({});
    assert!(
        !accept(&serde_json::to_vec(&doc).unwrap()).person,
        "{{}} is not set"
    );
}

#[test]
fn incident_and_alert_webhooks_are_taken_by_their_shape() {
    for (name, kind, incident_id) in [
        (
            "incident_new",
            EventKind::Incident,
            "692701aa3c5e8f0012ab77c1",
        ),
        (
            "incident_ack",
            EventKind::Incident,
            "692701aa3c5e8f0012ab77c1",
        ),
        (
            "incident_resolved",
            EventKind::Incident,
            "692701aa3c5e8f0012ab77c1",
        ),
        // An alert that belongs to no incident yet is about itself; guards key on that.
        (
            "alert_new",
            EventKind::Alert,
            "alert:692701a03c5e8f0012ab77b0",
        ),
        ("alert_closed", EventKind::Alert, "692701aa3c5e8f0012ab77c1"),
    ] {
        let body = fixture(name);
        let valid = check(&body, DriftPolicy::Reject).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(valid.kind, kind, "{name}");
        assert_eq!(valid.incident_id, incident_id, "{name}");
        assert!(valid.drift.is_empty(), "{name}");
    }
    assert!(!accept(&fixture("incident_new")).person);
    assert!(accept(&fixture("incident_ack")).person);
}

#[test]
fn an_alert_is_checked_with_the_alert_shape_and_its_own_drift_labels() {
    let alert = fixture("alert_new");
    let cases = [
        (
            "/alert/title",
            "5",
            "alert.title: expected a string, got a number",
        ),
        (
            "/alert/alert_id",
            "\"\"",
            "alert.alert_id: must not be empty",
        ),
        (
            "/alert/labels",
            "{\"a\": 1}",
            "alert.labels.a: expected a string, got a number",
        ),
        (
            "/alert/event_cnt",
            "\"4\"",
            "alert.event_cnt: expected an integer, got a string",
        ),
        (
            "/alert/incident",
            "[1]",
            "alert.incident: expected an object, got an array",
        ),
        (
            "/alert/incident/incident_id",
            "7",
            "alert.incident.incident_id: expected a non-empty string, got a number",
        ),
        ("/alert", "null", "alert: expected an object, got null"),
    ];
    for (pointer, value, message) in cases {
        let alert = if pointer.starts_with("/alert/incident/") {
            with(&alert, "/alert/incident", "{}")
        } else {
            alert.clone()
        };
        let body = with(&alert, pointer, value);
        assert_eq!(
            refuse(&body),
            PayloadError::Invalid(message.into()),
            "{pointer} = {value}"
        );
    }
    let drift = with(&alert, "/alert/alert_severity", "\"Fatal\"");
    assert_eq!(accept(&drift).drift, vec![(10, "Fatal".to_string())]);
    assert_eq!(DRIFT_FIELDS[10], "alert.alert_severity");
    assert_eq!(
        check(&drift, DriftPolicy::Reject).unwrap_err(),
        PayloadError::Invalid(
            "alert.alert_severity: unknown value \"Fatal\" (expected one of Critical, Warning, Info)"
                .into()
        )
    );
    // Unknown fields anywhere, an empty incident, and a long incident id are refused only
    // where they break the contract.
    let extra = with(&alert, "/alert/incident", "{}");
    assert_eq!(accept(&extra).incident_id, "alert:692701a03c5e8f0012ab77b0");
    let extra = with(
        &with(&alert, "/alert/new_field", "[1]"),
        "/alert/incident",
        "{\"x\": 1}",
    );
    assert!(check(&extra, DriftPolicy::Reject).is_ok());
}

#[test]
fn the_object_of_the_other_kind_is_an_unknown_field_wherever_the_type_stands() {
    // An incident event with a malformed `alert`, and an alert event with a malformed
    // `incident`: the type comes first, or last (one more pass, on the refusal path only).
    let incident = fixture("incident_new");
    let alert = fixture("alert_new");
    for body in [
        with(&incident, "/alert", "[1, 2]"),
        with(&alert, "/incident", "\"x\""),
    ] {
        assert!(check(&body, DriftPolicy::Reject).is_ok());
        let last = moved_last(&body, &["event_type"]);
        assert!(String::from_utf8_lossy(&last).ends_with(r#"_new"}"#));
        assert!(check(&last, DriftPolicy::Reject).is_ok());
    }
    // The object of the right kind is required whatever else is there.
    let swapped = with(
        &without(&alert, "/alert"),
        "/incident",
        "{\"incident_id\": \"x\"}",
    );
    assert_eq!(
        refuse(&swapped),
        PayloadError::Invalid("alert: required field is missing".into())
    );
    // When the type comes last, a real problem in the right object is still named.
    let last = moved_last(&with(&alert, "/alert/title", "1"), &["event_type"]);
    assert_eq!(
        refuse(&last),
        PayloadError::Invalid("alert.title: expected a string, got a number".into())
    );
}

#[test]
fn types_flashduty_adds_later_are_drift_under_a_wildcard() {
    let later = with(&fixture("incident_new"), "/event_type", "\"i_r_labels\"");
    assert_eq!(accept(&later).drift, vec![(9, "i_r_labels".to_string())]);
    assert_eq!(DRIFT_FIELDS[9], "event_type");
    assert!(matches!(
        check(&later, DriftPolicy::Reject),
        Err(PayloadError::Invalid(m)) if m.starts_with("event_type: unknown value \"i_r_labels\" (expected one of i_new, ")
    ));
    // Named one by one, an undocumented type is the operator's own choice: no drift.
    let named = EventTypes::parse(&["i_r_labels".into()]).unwrap().0;
    assert!(check_for(&later, DriftPolicy::Reject, &named)
        .unwrap()
        .drift
        .is_empty());
}

#[test]
fn a_type_the_action_does_not_take_is_unwanted_whatever_the_rest_holds() {
    let new = fixture("incident_new");
    let id = "6e1f0a2b3c4d5e6f708192a3b4c5d6e7";
    assert_eq!(unwanted(&new, &["i_custom"]).unwrap(), id);
    assert_eq!(
        unwanted(&fixture("alert_new"), &["i_*"]).unwrap(),
        "9b4c3d5e6f708192a3b4c5d6e7f8091a"
    );
    // Not checked past the envelope: a broken incident does not turn an unwanted push into a
    // failure Flashduty would see, whether the type comes before the problem or after it.
    let broken = with(&new, "/incident/title", "5");
    assert_eq!(unwanted(&broken, &["i_custom"]).unwrap(), id);
    let no_incident = without(&new, "/incident");
    assert_eq!(unwanted(&no_incident, &["a_new"]).unwrap(), id);
    let last = moved_last(&broken, &["event_type", "event_id"]);
    assert_eq!(unwanted(&last, &["i_custom"]).unwrap(), id);
    // The legacy event id counts too.
    let legacy = with(
        &without(&new, "/event_id"),
        "/incident/event_id",
        "\"legacy-1\"",
    );
    assert_eq!(unwanted(&legacy, &["i_custom"]).unwrap(), "legacy-1");
    // Still refused: no event id to answer with, a body that is not JSON, a type that is no
    // Flashduty type at all.
    assert_eq!(
        unwanted(&without(&new, "/event_id"), &["i_custom"]).unwrap_err(),
        PayloadError::Invalid(
            "event_id: required, a non-empty string (at event_id, or incident.event_id)".into()
        )
    );
    let mut truncated = new.clone();
    truncated.truncate(new.len() / 2);
    assert!(matches!(
        unwanted(&truncated, &["i_custom"]),
        Err(PayloadError::NotJson(_))
    ));
    assert!(matches!(
        unwanted(&with(&new, "/event_type", "\"new\""), &["i_custom"]),
        Err(PayloadError::Invalid(m)) if m.starts_with("event_type: expected a Flashduty event type")
    ));
}

#[test]
fn a_documented_field_given_twice_is_refused_wherever_the_type_stands() {
    // A parser that keeps the last copy (the projection, the upstream) would see another
    // payload than the one validated.
    let text = String::from_utf8(fixture("incident_new")).unwrap();
    let again = |body: &str, extra: &str| {
        let end = body.trim_end().strip_suffix('}').unwrap().to_string();
        format!("{end}, {extra}}}")
    };
    let twice = again(&text, "\"incident\": null");
    assert_eq!(
        refuse(twice.as_bytes()),
        PayloadError::Invalid("incident: given twice".into())
    );
    let last = moved_last(&fixture("incident_new"), &["event_type"]);
    let last = String::from_utf8(last).unwrap();
    let twice = last.replacen("\"event_type\":", "\"incident\":{},\"event_type\":", 1);
    assert_eq!(
        refuse(twice.as_bytes()),
        PayloadError::Invalid("incident: given twice".into())
    );
    let twice = text.replacen("\"title\":", "\"title\": \"a\", \"title\":", 1);
    assert_eq!(
        refuse(twice.as_bytes()),
        PayloadError::Invalid("incident.title: given twice".into())
    );
    // In an alert's base fields too.
    let alert = String::from_utf8(fixture("alert_new")).unwrap();
    let twice = alert.replacen("\"labels\":", "\"labels\": {}, \"labels\":", 1);
    assert_eq!(
        refuse(twice.as_bytes()),
        PayloadError::Invalid("alert.labels: given twice".into())
    );
}

#[test]
fn the_other_kinds_object_walked_before_the_type_counts_no_drift() {
    let body = with(
        &fixture("incident_new"),
        "/alert",
        r#"{"alert_severity": "Fatal"}"#,
    );
    assert!(accept(&moved_last(&body, &["event_type"])).drift.is_empty());
    assert!(check(&moved_last(&body, &["event_type"]), DriftPolicy::Reject).is_ok());
}

#[test]
fn event_types_are_short_lowercase_words() {
    for bad in ["I_NEW", "i_new\u{0}", "i_ünew"] {
        let body = with(
            &fixture("incident_new"),
            "/event_type",
            &serde_json::to_string(bad).unwrap(),
        );
        assert!(
            matches!(refuse(&body), PayloadError::Invalid(m) if m.starts_with("event_type: expected a Flashduty event type")),
            "{bad:?}"
        );
    }
    let long = format!("\"i_{}\"", "x".repeat(100));
    let body = with(&fixture("incident_new"), "/event_type", &long);
    assert!(matches!(refuse(&body), PayloadError::Invalid(_)));
}

#[test]
fn the_envelope_is_read_without_a_tree_and_first_copies_count() {
    let envelope = |body: &str| {
        let e = super::envelope(body.as_bytes()).unwrap();
        (e.event_type, e.event_id)
    };
    assert_eq!(
        envelope(
            r#"{"x": [1, {"y": 2}], "event_type": "i_new", "event_type": "a_new", "incident": {"event_id": "legacy"}}"#
        ),
        (Some("i_new".into()), Some("legacy".into()))
    );
    assert_eq!(
        envelope(r#"{"event_id": "", "incident": 5, "event_type": 7}"#),
        (None, None)
    );
    assert_eq!(envelope("[1, 2]"), (None, None));
    assert!(super::envelope(b"{\"event_type\": \"i_new\"").is_err());
    assert!(super::envelope(b"{} {}").is_err());
}
