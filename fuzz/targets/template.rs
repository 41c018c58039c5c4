//! Fuzz target: the template parser and renderer. The input is a template, a NUL byte, then
//! a payload (a Flashduty fixture when that part is not JSON).
//! Properties: never panics; a JSON body template always renders valid JSON, whatever the
//! payload holds.
#![no_main]

use std::collections::BTreeMap;

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
