use super::*;
use serde_json::json;

fn render(template: &str, payload: &Value) -> Value {
    render_with(template, payload, ValueMapping::default())
}

fn render_with(template: &str, payload: &Value, mapping: ValueMapping) -> Value {
    let t = Template::parse_json(template).unwrap();
    let out = t.render_to_vec(payload, &mapping);
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("invalid JSON {e}: {}", String::from_utf8_lossy(&out)))
}

fn payload() -> Value {
    json!({
        "event_id": "e1",
        "incident": {
            "title": "web-03 \"quoted\" \\ back\nline \u{1} ctl }} {{x}}",
            "incident_severity": "Critical",
            "alert_cnt": 3,
            "has_unfinished_work_item": false,
            "labels": {"resource": "web-03", "service": "checkout"},
            "responders": [{"email": "a@x"}, {"email": "b@x"}],
            "images": null,
            "num": "AB77C1"
        }
    })
}

#[test]
fn whole_value_placeholders_keep_their_json_type() {
    let out = render(
        r#"{"labels": "{{incident.labels}}", "n": "{{incident.alert_cnt}}",
            "b": "{{incident.has_unfinished_work_item}}", "img": "{{incident.images}}",
            "who": "{{incident.responders}}"}"#,
        &payload(),
    );
    assert_eq!(
        out["labels"],
        json!({"resource": "web-03", "service": "checkout"})
    );
    assert_eq!(out["n"], json!(3));
    assert_eq!(out["b"], json!(false));
    assert_eq!(out["img"], Value::Null);
    assert_eq!(out["who"][1]["email"], json!("b@x"));
}

#[test]
fn mixed_text_renders_as_a_string() {
    let out = render(
        r##"{"m": "#{{incident.num}}: {{incident.alert_cnt}} alerts on {{incident.labels.resource}}",
            "o": "labels={{incident.labels}}"}"##,
        &payload(),
    );
    assert_eq!(out["m"], json!("#AB77C1: 3 alerts on web-03"));
    assert_eq!(
        out["o"],
        json!(r#"labels={"resource":"web-03","service":"checkout"}"#)
    );
}

#[test]
fn numeric_segments_index_arrays() {
    let out = render(
        r#"{"first": "{{incident.responders.0.email}}", "gone": "{{incident.responders.5.email}}"}"#,
        &payload(),
    );
    assert_eq!(out["first"], json!("a@x"));
    assert_eq!(out["gone"], json!("{{incident.responders.5.email}}"));
}

#[test]
fn unresolved_paths_stay_literal() {
    let out = render(
        r#"{"a": "{{incident.nope}}", "b": "x {{ person.email }} y", "c": "{{incident.title.deeper}}"}"#,
        &payload(),
    );
    assert_eq!(out["a"], json!("{{incident.nope}}"));
    assert_eq!(out["b"], json!("x {{ person.email }} y"));
    assert_eq!(out["c"], json!("{{incident.title.deeper}}"));
}

#[test]
fn hostile_strings_still_give_valid_json() {
    let title = payload()["incident"]["title"].clone();
    let out = render(
        r#"{"t": "{{incident.title}}", "m": "T: {{incident.title}}!"}"#,
        &payload(),
    );
    assert_eq!(out["t"], title);
    assert_eq!(out["m"], json!(format!("T: {}!", title.as_str().unwrap())));
}

#[test]
fn placeholders_in_keys_and_arrays() {
    let out = render(
        r#"{"{{incident.labels.service}}": ["{{incident.num}}", 1, "lit"], "k": [true, null]}"#,
        &payload(),
    );
    assert_eq!(
        out,
        json!({"checkout": ["AB77C1", 1, "lit"], "k": [true, null]})
    );
}

#[test]
fn value_mapping_replaces_matched_values_only() {
    let mapping = ValueMapping::new(
        [
            (
                "incident.incident_severity".to_string(),
                [
                    ("Critical".to_string(), "P0".to_string()),
                    ("Warning".to_string(), "P1".to_string()),
                ]
                .into_iter()
                .collect(),
            ),
            (
                "incident.alert_cnt".to_string(),
                [("3".to_string(), "many".to_string())]
                    .into_iter()
                    .collect(),
            ),
            (
                "incident.num".to_string(),
                [("ZZZ".to_string(), "never".to_string())]
                    .into_iter()
                    .collect(),
            ),
        ]
        .into_iter()
        .collect(),
    );
    let out = render_with(
        r#"{"level": "{{incident.incident_severity}}", "text": "sev {{incident.incident_severity}}",
            "n": "{{incident.alert_cnt}}", "num": "{{incident.num}}"}"#,
        &payload(),
        mapping,
    );
    assert_eq!(
        out,
        json!({"level": "P0", "text": "sev P0", "n": "many", "num": "AB77C1"})
    );
}

#[test]
fn templates_without_placeholders_render_unchanged() {
    let out = render(r#"{"a": [1, 2.5, "x"], "b": {"c": null}}"#, &payload());
    assert_eq!(out, json!({"a": [1, 2.5, "x"], "b": {"c": null}}));
}

#[test]
fn malformed_templates_are_refused_with_line_and_column() {
    let err = Template::parse_json("{\n  \"a\": \"{{incident..title}}\"\n}").unwrap_err();
    assert!(err.starts_with("line 2 column 9:"), "{err}");
    let err = Template::parse_json("{\"a\": \"{{incident.title\"}").unwrap_err();
    assert!(err.contains("unclosed {{"), "{err}");
    let err = Template::parse_json("{\"a\": {{incident.title}}}").unwrap_err();
    assert!(err.starts_with("line 1 column"), "{err}");
    assert!(err.contains("not valid JSON"), "{err}");
}

#[test]
fn text_templates_render_plain_text() {
    let t = TextTemplate::parse("incident {{incident.num}} ({{incident.nope}})").unwrap();
    assert_eq!(
        t.render_to_string(&payload(), &ValueMapping::default()),
        "incident AB77C1 ({{incident.nope}})"
    );
}
