//! Test support: the real `actiongate` binary on loopback, a raw HTTP/1.1 client, and
//! upstream servers that record what they receive. Nothing here mocks HTTP.
#![allow(dead_code)]

pub mod client;
pub mod flashduty;
pub mod fs;
pub mod gateway;
pub mod postgres;
pub mod tls;
pub mod upstream;

use std::path::PathBuf;
use std::time::Duration;

/// The first value of header `name` (case-insensitive) in a parsed header list.
pub fn find_header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A fixture's bytes, from tests/fixtures.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The full fixture with its event_id replaced, for as many distinct events as a test needs.
pub fn event_with_id(event_id: &str) -> Vec<u8> {
    let body = String::from_utf8(fixture("custom_action_full.json")).unwrap();
    body.replace("3f9c2b7a51e04d8c9a6b0e1f2d3c4b5a", event_id)
        .into_bytes()
}

/// Polls `check` until it returns Some, or panics after `limit` with `what`.
pub async fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like `eventually`, for checks that need to await (e.g. read a metric).
pub async fn eventually_async<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound then released: good enough on a test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
