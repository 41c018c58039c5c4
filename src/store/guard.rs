//! Guard state for destructive actions (`guard:` in the config): which incidents an action ran
//! for lately, and how often it ran in the last hour, decided by the store together with the
//! event's own dedup check, so two pushes racing for one incident cannot both pass.
//!
//! The state is kept as dedup keys of its own, written with the accepted event: in the spool a
//! key already outlives restarts and compaction (it is carried while unexpired), and in
//! PostgreSQL it is a row of the keys table, which is exactly the life a guard window needs, so
//! guards add no record type and no carry rule of their own.
//! Internal keys begin with U+001F, which no event key does (those begin with the action's
//! name).

use std::time::Duration;

/// What the guards of an action ask of one push.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardCheck {
    /// Refuse it (after the duplicate check): it carries no `person` and the action runs only
    /// for people (`human_only`).
    pub not_human: bool,
    /// Refuse a second push for this incident within the window (`once_per_incident`).
    pub once_per_incident: Option<(String, Duration)>,
    /// Refuse past this many accepted pushes of the action in any hour (`max_per_hour`).
    pub max_per_hour: Option<u32>,
}

/// Which guard refused a push, and when it would let one through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarded {
    /// The push carries no `person`.
    HumanOnly,
    /// The action ran for this incident; it may run again at `frees_ms`.
    OncePerIncident { frees_ms: u64 },
    /// The action ran `limit` times in the last hour; the next run may start at `frees_ms`.
    MaxPerHour { limit: u32, frees_ms: u64 },
}

/// The window of `max_per_hour`.
pub const HOUR_MS: u64 = 3_600_000;

const PREFIX: char = '\u{1f}';

/// The key that marks `action` as run for `incident` until it expires.
pub fn once_key(action: &str, incident: &str) -> String {
    format!("{PREFIX}once{PREFIX}{action}{PREFIX}{incident}")
}

/// The key that counts event `seq` of `action` against its hourly limit until it expires.
pub fn rate_key(action: &str, seq: u64) -> String {
    format!("{PREFIX}rate{PREFIX}{action}{PREFIX}{seq}")
}

/// The bounds of every [`rate_key`] of `action`, compared as bytes: `low <= key < high`.
pub fn rate_key_range(action: &str) -> (String, String) {
    (
        format!("{PREFIX}rate{PREFIX}{action}{PREFIX}"),
        format!("{PREFIX}rate{PREFIX}{action}\u{20}"),
    )
}

/// The key that makes a guard refusal of (action, event_id) reported once, however often
/// Flashduty sends it again.
pub fn report_key(action: &str, event_id: &str) -> String {
    format!("{PREFIX}report{PREFIX}{action}{PREFIX}{event_id}")
}

/// The action and sequence number of a [`rate_key`].
pub fn parse_rate_key(key: &str) -> Option<(&str, u64)> {
    let rest = key.strip_prefix(PREFIX)?.strip_prefix("rate")?;
    let rest = rest.strip_prefix(PREFIX)?;
    let (action, seq) = rest.rsplit_once(PREFIX)?;
    Some((action, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_keys_read_back_and_no_other_key_looks_like_one() {
        assert_eq!(
            parse_rate_key(&rate_key("restart", 42)),
            Some(("restart", 42))
        );
        assert_eq!(parse_rate_key(&once_key("restart", "42")), None);
        assert_eq!(parse_rate_key(&report_key("restart", "42")), None);
        assert_eq!(parse_rate_key("restart\u{1f}rate"), None);
        assert_eq!(parse_rate_key("\u{1f}rate\u{1f}a\u{1f}x"), None);
        let (low, high) = rate_key_range("a");
        let key = rate_key("a", 7);
        assert!(low <= key && key < high);
        for other in [rate_key("ab", 7), rate_key("", 7), once_key("a", "7")] {
            assert!(!(low <= other && other < high), "{other:?}");
        }
    }
}
