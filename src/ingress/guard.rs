//! An action's guards (`guard:`) on the request path: what a push asks of them, and the answer
//! a responder reads in Flashduty when one refuses it (`409 guarded`).
//!
//! The decision itself is the spool's ([`crate::spool::GuardCheck`]): it is made together with
//! the duplicate check and the write, so it holds across concurrent pushes and restarts.

use std::time::Duration;

use crate::config::units::format_duration;
use crate::config::Guard;
use crate::store::{GuardCheck, Guarded};

/// What `guard` asks of a push with this incident and person.
pub fn check(guard: &Guard, incident_id: &str, person: bool) -> GuardCheck {
    GuardCheck {
        not_human: guard.human_only && !person,
        once_per_incident: guard
            .once_per_incident
            .map(|window| (incident_id.to_string(), window)),
        max_per_hour: guard.max_per_hour,
    }
}

/// The answer's message: which rule refused the push, and when it would let one through.
pub fn message(action: &str, guarded: Guarded, now_ms: u64) -> String {
    match guarded {
        Guarded::HumanOnly => format!(
            "{action} runs only when a person presses it, and this push names no person \
             (guard.human_only); press the action's button on the incident to run it"
        ),
        Guarded::OncePerIncident { frees_ms } => format!(
            "{action} already ran for this incident; it may run for it again {} \
             (guard.once_per_incident)",
            when(frees_ms, now_ms)
        ),
        Guarded::MaxPerHour { limit, frees_ms } => format!(
            "{action} ran {limit} times in the last hour, its limit; it may run again {} \
             (guard.max_per_hour)",
            when(frees_ms, now_ms)
        ),
    }
}

/// `in 6m48s (at 18:40:10 UTC)`.
fn when(at_ms: u64, now_ms: u64) -> String {
    let wait = Duration::from_millis(at_ms.saturating_sub(now_ms));
    let seconds_of_day = (at_ms / 1000) % 86_400;
    format!(
        "in {} (at {:02}:{:02}:{:02} UTC)",
        format_duration(wait),
        seconds_of_day / 3600,
        (seconds_of_day % 3600) / 60,
        seconds_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_says_which_rule_and_when_it_frees() {
        // 2026-11-27 18:33:22 UTC.
        let now = 1_795_804_402_000;
        let text = message(
            "restart-host",
            Guarded::OncePerIncident {
                frees_ms: now + 408_000,
            },
            now,
        );
        assert_eq!(
            text,
            "restart-host already ran for this incident; it may run for it again in 6m48s \
             (at 18:40:10 UTC) (guard.once_per_incident)"
        );
        let text = message(
            "rollback",
            Guarded::MaxPerHour {
                limit: 20,
                frees_ms: now + 61_000,
            },
            now,
        );
        assert!(
            text.starts_with("rollback ran 20 times in the last hour"),
            "{text}"
        );
        assert!(text.contains("in 1m1s (at 18:34:23 UTC)"), "{text}");
        assert!(message("x", Guarded::HumanOnly, now).contains("guard.human_only"));
    }

    #[test]
    fn only_the_rules_set_are_asked_for() {
        let guard = Guard {
            human_only: true,
            once_per_incident: None,
            max_per_hour: Some(3),
        };
        assert_eq!(
            check(&guard, "i", false),
            GuardCheck {
                not_human: true,
                once_per_incident: None,
                max_per_hour: Some(3)
            }
        );
        assert!(!check(&guard, "i", true).not_human);
        assert!(!check(&Guard::default(), "i", false).not_human);
    }
}
