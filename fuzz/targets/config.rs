//! Fuzz target: the config loader (YAML, `${ENV}` expansion, validation, `when` rules,
//! templates, CIDRs, durations). Property: never panics; every refusal names a problem.
#![no_main]

use actiongate::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| (name == "SECRET").then(|| "s3cret".to_string());
    if let Err(errors) = Config::from_yaml(text, &env) {
        assert!(!errors.0.is_empty(), "refused without saying why");
        assert!(errors.0.iter().all(|line| !line.trim().is_empty()));
    }
});
