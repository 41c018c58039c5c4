//! Fuzz target: the payload validator, the first code to read a body from the network.
//! Properties: never panics; the two drift policies agree on everything but drift; an accepted
//! payload's event_id is non-empty; an action taking every type accepts whatever one taking
//! only custom actions accepts, and answers an unwanted type only with an event id.
#![no_main]

use actiongate::config::DriftPolicy;
use actiongate::ingress::event_type::EventTypes;
use actiongate::ingress::payload::{validate, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let custom = EventTypes::default();
    let every = EventTypes::parse(&["i_*".to_string(), "a_*".to_string()])
        .expect("wildcards parse")
        .0;
    let lenient = validate(body, DriftPolicy::Accept, &every);
    let strict = validate(body, DriftPolicy::Reject, &every);
    if let Ok(verdict) = &lenient {
        assert!(!verdict.event_id().is_empty(), "accepted an empty event_id");
        match verdict {
            Verdict::Valid(event) if event.drift.is_empty() => assert!(
                strict.is_ok(),
                "strict refused a payload with no drift: {strict:?}"
            ),
            Verdict::Valid(_) => {}
            Verdict::Unwanted { .. } => panic!("an action taking every type refused a type"),
        }
    }
    if strict.is_ok() {
        assert!(lenient.is_ok(), "lenient refused what strict accepted");
    }
    if let Ok(Verdict::Valid(event)) = validate(body, DriftPolicy::Accept, &custom) {
        assert!(
            matches!(lenient, Ok(Verdict::Valid(_))),
            "i_* refused what i_custom took: {:?}",
            event.event_id
        );
    }
    if let Ok(Verdict::Unwanted { event_id, .. }) = validate(body, DriftPolicy::Accept, &custom) {
        assert!(!event_id.is_empty(), "ignored with an empty event_id");
    }
});
