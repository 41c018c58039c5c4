//! Fuzz target: the template parser and renderer. The input is a template, a NUL byte, then
//! a payload (a Flashduty fixture when that part is not JSON).
//! Properties: never panics; a JSON body template always renders valid JSON, whatever the
//! payload holds; a report's comment (any template, any payload, any answer from the upstream)
//! always makes an Open API body that is JSON with a comment of at most 1,024 characters.
#![no_main]

use std::collections::BTreeMap;

use std::time::Duration;

use actiongate::config::ReportOutcome;
use actiongate::delivery::report::{self, Facts, MAX_COMMENT_CHARS};
use actiongate::delivery::template::{Template, TextTemplate, ValueMapping};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const FIXTURE: &str = include_str!("../../tests/fixtures/custom_action_full.json");

fuzz_target!(|data: &[u8]| {
    let (template, payload) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(template) = std::str::from_utf8(template) else {
        return;
    };
    let payload: Value = serde_json::from_slice(payload)
        .or_else(|_| serde_json::from_str(FIXTURE))
        .expect("the fixture is JSON");
    let mapping = ValueMapping::new(BTreeMap::from([(
        "incident.incident_severity".to_string(),
        BTreeMap::from([("Critical".to_string(), "P1\"\n{{x}}".to_string())]),
    )]));

    if let Ok(text) = TextTemplate::parse_text(template) {
        let _ = text.render_to_string(&payload, &mapping);
        // The template's own text doubles as a hostile upstream answer and error.
        for (i, outcome) in ReportOutcome::ALL.into_iter().enumerate() {
            let facts = Facts {
                action: "act",
                upstream: "up",
                outcome,
                attempts: 3,
                status: Some(503),
                error: Some(template),
                response: template,
                lag: Duration::from_millis(1234),
            };
            let template = (i > 0).then_some(&text);
            let comment = report::comment(template, &payload, &facts);
            assert!(comment.chars().count() <= MAX_COMMENT_CHARS, "{comment}");
            let body = report::request_body("0123456789abcdef01234567", &comment);
            let parsed: Value = serde_json::from_slice(&body).expect("the body is JSON");
            assert_eq!(parsed["comment"], Value::from(comment));
        }
        let mut encoded = String::new();
        text.render_encoded(&payload, &mapping, &mut encoded, |v, out| {
            out.extend(url::form_urlencoded::byte_serialize(v.as_bytes()))
        });
    }
    if let Ok(body) = Template::parse_json(template) {
        let out = body.render_to_vec(&payload, &mapping);
        if let Err(e) = serde_json::from_slice::<Value>(&out) {
            panic!(
                "template rendered invalid JSON ({e}): {}",
                String::from_utf8_lossy(&out)
            );
        }
    }
});
