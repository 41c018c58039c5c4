//! Fuzz target: the payload validator, the first code to read a body from the network.
//! Properties: never panics; the two drift policies agree on everything but drift; an accepted
//! payload's event_id is non-empty.
#![no_main]

use actiongate::config::DriftPolicy;
use actiongate::ingress::payload::validate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let lenient = validate(body, DriftPolicy::Accept);
    let strict = validate(body, DriftPolicy::Reject);
    if let Ok(event) = &lenient {
        assert!(!event.event_id.is_empty(), "accepted an empty event_id");
        if event.drift.is_empty() {
            assert!(
                strict.is_ok(),
                "strict refused a payload with no drift: {strict:?}"
            );
        }
    }
    if strict.is_ok() {
        assert!(lenient.is_ok(), "lenient refused what strict accepted");
    }
});
