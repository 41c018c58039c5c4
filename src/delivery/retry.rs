//! The retry policy: which failures are worth another try, and when the next try is due.
//!
//! One type used by the dispatcher and the tests alike, so the rules live in one place.

use std::time::{Duration, SystemTime};

/// Retries with capped exponential backoff and full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included, before a delivery is dead-lettered.
    pub attempts: u32,
    /// Backoff cap for the first retry; doubles for each later one.
    pub backoff: Duration,
    /// Largest wait between attempts, `Retry-After` included.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// How one attempt ended, as far as the retry decision cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The upstream answered with this status (and maybe a `Retry-After`).
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No answer: connect error, reset, timeout, malformed response.
    Transport(String),
    /// An answer whose body says the call failed, whatever its status (Flashduty's envelope
    /// with an `error.code`), and whether that failure is worth another try.
    Declined {
        status: u16,
        retryable: bool,
        retry_after: Option<Duration>,
    },
}

/// What to do with a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Delivered,
    /// Try again after this long.
    Retry(Duration),
    /// Stop trying; an operator must look.
    DeadLetter,
}

/// Statuses that say "not now" rather than "never": 408, 425, 429 and every 5xx.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500..=599)
}

impl RetryPolicy {
    /// Decides after attempt number `attempt` (1 for the first). `jitter` is uniform in [0, 1).
    pub fn decide(&self, attempt: u32, outcome: &AttemptOutcome, jitter: f64) -> Decision {
        let retry_after = match outcome {
            AttemptOutcome::Status { status, .. } if (200..300).contains(status) => {
                return Decision::Delivered
            }
            AttemptOutcome::Status { status, .. } if !is_retryable_status(*status) => {
                return Decision::DeadLetter
            }
            AttemptOutcome::Status { retry_after, .. } => *retry_after,
            AttemptOutcome::Transport(_) => None,
            AttemptOutcome::Declined {
                retryable: false, ..
            } => return Decision::DeadLetter,
            AttemptOutcome::Declined { retry_after, .. } => *retry_after,
        };
        if attempt >= self.attempts {
            return Decision::DeadLetter;
        }
        let wait = match retry_after {
            Some(asked) => asked.min(self.max_backoff),
            None => self.backoff_after(attempt, jitter),
        };
        Decision::Retry(wait)
    }

    /// Full jitter: uniform in [0, min(max_backoff, backoff × 2^(attempt-1))].
    pub fn backoff_after(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .backoff
            .saturating_mul(1u32 << exponent)
            .min(self.max_backoff);
        ceiling.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> AttemptOutcome {
        AttemptOutcome::Status {
            status,
            retry_after: None,
        }
    }

    #[test]
    fn two_hundreds_are_delivered() {
        let p = RetryPolicy::default();
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(p.decide(1, &status(s), 0.5), Decision::Delivered);
        }
    }

    #[test]
    fn retryable_failures_are_retried_until_attempts_run_out() {
        let p = RetryPolicy {
            attempts: 3,
            ..RetryPolicy::default()
        };
        for s in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert!(
                matches!(p.decide(1, &status(s), 0.5), Decision::Retry(_)),
                "{s}"
            );
            assert_eq!(p.decide(3, &status(s), 0.5), Decision::DeadLetter, "{s}");
        }
        let io = AttemptOutcome::Transport("connection refused".into());
        assert!(matches!(p.decide(2, &io, 0.5), Decision::Retry(_)));
        assert_eq!(p.decide(3, &io, 0.5), Decision::DeadLetter);
    }

    #[test]
    fn other_statuses_are_permanent() {
        let p = RetryPolicy::default();
        for s in [301, 400, 401, 403, 404, 409, 410, 422] {
            assert_eq!(p.decide(1, &status(s), 0.5), Decision::DeadLetter, "{s}");
        }
    }

    #[test]
    fn a_declined_answer_is_retried_only_when_worth_it() {
        let p = RetryPolicy::default();
        let declined = |retryable| AttemptOutcome::Declined {
            status: 200,
            retryable,
            retry_after: None,
        };
        assert_eq!(p.decide(1, &declined(false), 0.5), Decision::DeadLetter);
        assert!(matches!(
            p.decide(1, &declined(true), 0.5),
            Decision::Retry(_)
        ));
        assert_eq!(p.decide(8, &declined(true), 0.5), Decision::DeadLetter);
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let p = RetryPolicy {
            attempts: 20,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
        };
        assert_eq!(p.backoff_after(1, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff_after(2, 1.0), Duration::from_secs(2));
        assert_eq!(p.backoff_after(4, 1.0), Duration::from_secs(8));
        assert_eq!(p.backoff_after(5, 1.0), Duration::from_secs(10));
        assert_eq!(p.backoff_after(60, 1.0), Duration::from_secs(10));
        assert_eq!(p.backoff_after(3, 0.0), Duration::ZERO);
        assert_eq!(p.backoff_after(3, 0.25), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_is_honoured_but_capped() {
        let p = RetryPolicy {
            attempts: 5,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        };
        let asked = |secs| AttemptOutcome::Status {
            status: 503,
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(
            p.decide(1, &asked(7), 0.0),
            Decision::Retry(Duration::from_secs(7))
        );
        assert_eq!(
            p.decide(1, &asked(3600), 0.0),
            Decision::Retry(Duration::from_secs(60))
        );
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_160_000);
        assert_eq!(
            parse_retry_after(" 12 ", now),
            Some(Duration::from_secs(12))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
