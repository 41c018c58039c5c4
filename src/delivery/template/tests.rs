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

/// Property test: any payload × any template gives valid JSON, or the template is refused at
/// parse time with a clean error; nothing panics. Deterministic (fixed seeds) so a failure
/// reproduces; 20,000 cases run in well under a second.
mod property {
    use super::*;
    use crate::delivery::projection::Projection;

    const HOSTILE: &[&str] = &[
        "",
        "\"",
        "\\",
        "\\\"",
        "}}",
        "{{",
        "{{x}}",
        "\u{0}",
        "\u{1f}",
        "\n\r\t",
        "é",
        "😀",
        "\u{2028}",
        "</script>",
        "null",
        "0",
        "-1e309",
        "incident",
        ".",
        "..",
        "0.0",
    ];
    const KEYS: &[&str] = &[
        "incident", "labels", "title", "0", "1", "a", "b b", "x.y", "",
    ];

    fn random_string(rng: &mut fastrand::Rng) -> String {
        (0..rng.usize(0..4))
            .map(|_| HOSTILE[rng.usize(..HOSTILE.len())])
            .collect()
    }

    fn random_value(rng: &mut fastrand::Rng, depth: usize) -> Value {
        match rng.usize(0..if depth > 3 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.bool()),
            2 => json!(rng.i64(..)),
            3 => json!(rng.f64() * 1e6 - 5e5),
            4 => Value::String(random_string(rng)),
            5 => Value::Array(
                (0..rng.usize(0..4))
                    .map(|_| random_value(rng, depth + 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.usize(0..4))
                    .map(|_| {
                        (
                            KEYS[rng.usize(..KEYS.len())].to_string(),
                            random_value(rng, depth + 1),
                        )
                    })
                    .collect(),
            ),
        }
    }

    fn random_path(rng: &mut fastrand::Rng) -> String {
        (0..rng.usize(1..4))
            .map(|_| KEYS[rng.usize(..KEYS.len() - 1)])
            .collect::<Vec<_>>()
            .join(".")
    }

    /// A template string: text and placeholders, some malformed on purpose.
    fn random_template_string(rng: &mut fastrand::Rng) -> String {
        let mut s = String::new();
        for _ in 0..rng.usize(0..4) {
            match rng.usize(0..5) {
                0 => s.push_str(&random_string(rng)),
                1 | 2 => s.push_str(&format!("{{{{{}}}}}", random_path(rng))),
                3 => s.push_str(&format!("{{{{ {} }}}}", random_path(rng))),
                _ => s.push_str("plain "),
            }
        }
        s
    }

    fn random_template(rng: &mut fastrand::Rng, depth: usize) -> Value {
        match rng.usize(0..if depth > 2 { 3 } else { 5 }) {
            0 | 1 => Value::String(random_template_string(rng)),
            2 => random_value(rng, 3),
            3 => Value::Array(
                (0..rng.usize(0..3))
                    .map(|_| random_template(rng, depth + 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.usize(0..3))
                    .map(|_| (random_template_string(rng), random_template(rng, depth + 1)))
                    .collect(),
            ),
        }
    }

    #[test]
    fn any_payload_and_template_render_valid_json() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_a110);
        let mapping = ValueMapping::new(
            [(
                "incident.title".to_string(),
                [("\"".to_string(), "}}\n".to_string())]
                    .into_iter()
                    .collect(),
            )]
            .into_iter()
            .collect(),
        );
        let mut rendered = 0;
        for _ in 0..20_000 {
            let payload = random_value(&mut rng, 0);
            let text = random_template(&mut rng, 0).to_string();
            let Ok(template) = Template::parse_json(&text) else {
                continue;
            };
            let out = template.render_to_vec(&payload, &mapping);
            if let Err(e) = serde_json::from_slice::<Value>(&out) {
                panic!(
                    "invalid JSON ({e}) from template {text} and payload {payload}: {}",
                    String::from_utf8_lossy(&out)
                );
            }
            // From the same stored bytes, the projected payload renders what the full one does.
            let raw = payload.to_string();
            let full: Value = serde_json::from_str(&raw).expect("valid JSON");
            let projected = Projection::new(template.paths())
                .parse(raw.as_bytes())
                .expect("projection of valid JSON");
            assert_eq!(
                String::from_utf8_lossy(&template.render_to_vec(&projected, &mapping)),
                String::from_utf8_lossy(&template.render_to_vec(&full, &mapping)),
                "template {text}, payload {raw}, projected {projected}"
            );
            rendered += 1;
        }
        assert!(
            rendered > 10_000,
            "most random templates are valid: {rendered}"
        );
    }

    #[test]
    fn arbitrary_template_text_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        const PIECES: &[&str] = &[
            "{", "}", "{{", "}}", "\"", ":", ",", "[", "]", "a", ".", "1", " ", "\\", "null",
        ];
        for _ in 0..20_000 {
            let text: String = (0..rng.usize(0..24))
                .map(|_| PIECES[rng.usize(..PIECES.len())])
                .collect();
            let _ = Template::parse_json(&text);
            let _ = TextTemplate::parse_text(&text);
        }
    }
}
