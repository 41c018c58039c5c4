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

fn accept(body: &[u8]) -> Validated<'_> {
    validate(body, DriftPolicy::Accept).unwrap_or_else(|e| panic!("{e:?}"))
}

fn refuse(body: &[u8]) -> PayloadError {
    validate(body, DriftPolicy::Accept).unwrap_err()
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
            Kind::Array(item) | Kind::Map(item) => check(item, checked),
            _ => {}
        }
    }
    let mut checked = 0;
    check(&ENVELOPE, &mut checked);
    assert!(checked >= 9, "{checked}");
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
    let err = validate(UNKNOWN, DriftPolicy::Reject).unwrap_err();
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
            "wrong_event_type",
            "event_type: expected \"i_custom\" (a custom action), got \"i_new\"",
        ),
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
                validate(&body, DriftPolicy::Reject).is_ok(),
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
    assert!(validate(&body, DriftPolicy::Reject).is_ok());
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
