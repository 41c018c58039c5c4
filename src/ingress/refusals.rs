//! Log lines for refused requests, at most one per (source, reason) every [`EVERY`].
//!
//! Every accepted and duplicate request keeps its own line, but a refusal is what a flood is
//! made of: one line per 403 wrote 2.5 MB of log a second from a single host, and under
//! journald's rate limit the lines of real events would then be dropped. The counters still
//! count every refusal; the log says who, why, and how many since its last line.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest a (source, reason) goes without a line while it keeps being refused.
pub const EVERY: Duration = Duration::from_secs(10);
/// (source, reason) pairs remembered at once (addresses behind a trusted proxy come from
/// `X-Forwarded-For` and can be many). When full, quiet pairs are forgotten (at most once a
/// second); refusals of new pairs past it are counted in the metrics but not logged.
const MAX_SOURCES: usize = 10_000;

/// What to log for one refusal: nothing, or a line with how many it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted into the next line.
    Quiet,
    /// Log a line standing for this many refusals (this one included).
    Log(u64),
}

struct Entry {
    /// When the last line for this key was written.
    logged: Instant,
    /// Refusals since that line.
    unlogged: u64,
}

/// Counts refusals per (source, reason) between log lines.
#[derive(Default)]
pub struct RefusalLog {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<(IpAddr, &'static str), Entry>,
    /// When quiet pairs were last forgotten.
    swept: Option<Instant>,
}

impl RefusalLog {
    /// Records a refusal of `source` for `reason` at `now`.
    pub fn refused(&self, source: IpAddr, reason: &'static str, now: Instant) -> Verdict {
        let Ok(mut guard) = self.entries.lock() else {
            return Verdict::Log(1);
        };
        let entries = &mut *guard;
        if entries.map.len() >= MAX_SOURCES && !entries.map.contains_key(&(source, reason)) {
            if entries
                .swept
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
            {
                entries.swept = Some(now);
                entries
                    .map
                    .retain(|_, e| now.duration_since(e.logged) < EVERY);
            }
            if entries.map.len() >= MAX_SOURCES {
                return Verdict::Quiet;
            }
        }
        match entries.map.get_mut(&(source, reason)) {
            Some(entry) if now.duration_since(entry.logged) < EVERY => {
                entry.unlogged += 1;
                Verdict::Quiet
            }
            Some(entry) => {
                let count = entry.unlogged + 1;
                entry.unlogged = 0;
                entry.logged = now;
                Verdict::Log(count)
            }
            None => {
                entries.map.insert(
                    (source, reason),
                    Entry {
                        logged: now,
                        unlogged: 0,
                    },
                );
                Verdict::Log(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_source_and_reason_every_interval_with_the_count_since_the_last() {
        let log = RefusalLog::default();
        let a: IpAddr = "127.0.0.3".parse().unwrap();
        let b: IpAddr = "127.0.0.4".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(log.refused(a, "forbidden_source", t0), Verdict::Log(1));
        for i in 1..1000 {
            let at = t0 + Duration::from_millis(i);
            assert_eq!(log.refused(a, "forbidden_source", at), Verdict::Quiet);
        }
        // Another reason or another source has its own line.
        assert_eq!(log.refused(a, "unauthorized", t0), Verdict::Log(1));
        assert_eq!(log.refused(b, "forbidden_source", t0), Verdict::Log(1));
        // After the interval: one line for the 999 quiet ones and this one.
        assert_eq!(
            log.refused(a, "forbidden_source", t0 + EVERY),
            Verdict::Log(1000)
        );
        assert_eq!(
            log.refused(a, "forbidden_source", t0 + EVERY + Duration::from_secs(1)),
            Verdict::Quiet
        );
    }

    #[test]
    fn memory_is_bounded_however_many_sources() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 * 3) {
            let source = IpAddr::from(i.to_be_bytes());
            let at = t0 + EVERY * (i / MAX_SOURCES as u32);
            log.refused(source, "forbidden_source", at);
        }
        assert!(log.entries.lock().unwrap().map.len() <= MAX_SOURCES);
    }
}
