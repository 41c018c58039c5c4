//! Fuzz target: the spool's record decoder and replay, on a segment built from the input.
//! The input is a list of chunks (`[u16 LE length][kind][bytes]`): kind 0 is framed as a
//! record with a valid checksum (so the decoder and replay see it, not just the CRC check),
//! anything else is written raw (damage). Properties: opening never panics; a spool refused
//! for damage opens after `repair` (unless it holds a newer record type); repair is
//! idempotent.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actiongate::config::Config;
use actiongate::metrics::Metrics;
use actiongate::spool::{repair, Spool};
use actiongate::store::StoreError;
use libfuzzer_sys::fuzz_target;

fn segment(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while data.len() >= 3 {
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let framed = data[2] == 0;
        let rest = &data[3..];
        let body = &rest[..len.min(rest.len())];
        data = &rest[body.len()..];
        if framed {
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        }
        out.extend_from_slice(body);
    }
    out
}

fn open(dir: &std::path::Path) -> Result<Spool, StoreError> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    let metrics = METRICS.get_or_init(|| {
        let config = Config::from_yaml(
            "listen: [{addr: \"127.0.0.1:1\"}]\nactions: [{name: a, path: /a, upstreams: [{name: u, url: \"http://127.0.0.1:1/\"}]}]",
            &|_| None,
        )
        .expect("config");
        Arc::new(actiongate::metrics_for(&config))
    });
    Spool::open(dir, Duration::from_secs(3600), metrics.clone())
}

fuzz_target!(|data: &[u8]| {
    // In memory where there is a tmpfs: every open fsyncs.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir");
    std::fs::write(dir.path().join("seg-0000000001.log"), segment(data)).expect("write segment");
    match open(dir.path()) {
        Ok(spool) => drop(spool),
        Err(StoreError::Storage(why)) if why.contains("newer actiongate") => {}
        Err(_) => {
            match repair(dir.path()) {
                Ok(_) => {}
                // Damage with a newer record type behind it: repair touches nothing.
                Err(StoreError::Storage(why)) if why.contains("newer actiongate") => return,
                Err(e) => panic!("repair failed: {e}"),
            }
            if let Err(e) = open(dir.path()) {
                panic!("still refused after repair: {e}");
            }
            let again = repair(dir.path()).expect("second repair");
            assert!(again.is_empty(), "repair not idempotent: {again:?}");
        }
    }
});
