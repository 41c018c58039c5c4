//! The config of closing the loop with Flashduty: the Open API (`flashduty:`), what an action
//! reports onto its incident (`report:`), and the guards of destructive actions (`guard:`).

use std::fmt;
use std::time::Duration;

use super::raw::{RawFlashduty, RawGuard, RawReport};
use super::{parse_upstream_url, Check};
use crate::config::Upstream;
use crate::delivery::path::FieldPath;
use crate::delivery::retry::RetryPolicy;
use crate::delivery::template::{TextTemplate, ValueMapping};

/// The name under which reports are delivered, in dead letters and every delivery metric.
pub const REPORT_UPSTREAM: &str = "flashduty";

/// The Open API's base URL when `flashduty.api` is not set.
pub const DEFAULT_API: &str = "https://api.flashcat.cloud";

/// Flashduty allows 50 Open API calls a second per account.
pub const MAX_RATE: u32 = 50;

/// Flashduty's Open API, as `report` uses it.
#[derive(Clone)]
pub struct FlashdutyApi {
    /// An account's API key: sent as the `app_key` query parameter, never logged or stored.
    pub app_key: String,
    /// The base URL (`https://api.flashcat.cloud`).
    pub api: url::Url,
    /// Open API calls a second, process-wide.
    pub rate: u32,
}

impl fmt::Debug for FlashdutyApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is a credential: never print it, not even in debug output.
        f.debug_struct("FlashdutyApi")
            .field("app_key", &"<redacted>")
            .field("api", &self.api.as_str())
            .field("rate", &self.rate)
            .finish()
    }
}

impl FlashdutyApi {
    /// `POST {api}/incident/comment`, without the key (added at send time).
    pub fn comment_url(&self) -> url::Url {
        let mut url = self.api.clone();
        let path = format!("{}/incident/comment", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url
    }
}

/// An outcome that can be reported onto the incident: the `actiongate.outcome` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReportOutcome {
    Delivered,
    DeadLettered,
    Guarded,
}

impl ReportOutcome {
    pub const ALL: [ReportOutcome; 3] = [
        ReportOutcome::Delivered,
        ReportOutcome::DeadLettered,
        ReportOutcome::Guarded,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ReportOutcome::Delivered => "delivered",
            ReportOutcome::DeadLettered => "dead_lettered",
            ReportOutcome::Guarded => "guarded",
        }
    }

    pub fn parse(text: &str) -> Option<ReportOutcome> {
        ReportOutcome::ALL.into_iter().find(|o| o.label() == text)
    }
}

/// What an action writes onto its incident, and how reports are delivered.
#[derive(Debug, Clone)]
pub struct Report {
    /// The outcomes that get a comment.
    pub on: Vec<ReportOutcome>,
    /// The comment; `None` for the built-in sentence.
    pub comment: Option<TextTemplate>,
    /// The lane settings reports are delivered with: upstream `flashduty` at
    /// `{api}/incident/comment`, the default retry policy.
    pub upstream: Upstream,
}

impl Report {
    pub fn wants(&self, outcome: ReportOutcome) -> bool {
        self.on.contains(&outcome)
    }
}

/// Guardrails of a destructive action, checked after the duplicate check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guard {
    /// Refuse pushes that carry no `person` (an automation, not a responder).
    pub human_only: bool,
    /// Refuse a second push for the same incident within this long.
    pub once_per_incident: Option<Duration>,
    /// Refuse past this many accepted pushes of the action in any hour.
    pub max_per_hour: Option<u32>,
}

/// The values a comment template may read under `actiongate.`.
pub const COMMENT_VALUES: [&str; 8] = [
    "action", "upstream", "outcome", "attempts", "status", "error", "response", "lag",
];

pub(super) fn validate_api(raw: &RawFlashduty, check: &mut Check) -> Option<FlashdutyApi> {
    if raw.app_key.trim().is_empty() {
        check.fail(
            "flashduty.app_key",
            "must not be empty (an account's API key, e.g. \"${FLASHDUTY_APP_KEY}\")",
        );
    }
    let api = check.ok(
        "flashduty.api",
        parse_upstream_url(raw.api.as_deref().unwrap_or(DEFAULT_API)),
    );
    if let Some(api) = &api {
        if api.query().is_some() {
            check.fail("flashduty.api", "must have no query string");
        }
        let loopback = match api.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => name == "localhost",
            None => false,
        };
        if api.scheme() != "https" && !loopback {
            check.warnings.push(format!(
                "flashduty.api: {api} is not https: the app_key would cross the network in \
                 clear text"
            ));
        }
    }
    let rate = raw.rate.unwrap_or(20);
    if rate == 0 || rate > MAX_RATE {
        check.fail(
            "flashduty.rate",
            format!("must be 1 to {MAX_RATE} (Flashduty allows {MAX_RATE} calls a second)"),
        );
    }
    Some(FlashdutyApi {
        app_key: raw.app_key.clone(),
        api: api?,
        rate: rate.clamp(1, MAX_RATE),
    })
}

pub(super) fn validate_report(
    at: &str,
    raw: &RawReport,
    api: Option<&FlashdutyApi>,
    upstream_names: &[&str],
    guarded: bool,
    check: &mut Check,
) -> Option<Report> {
    let Some(api) = api else {
        check.fail(
            at,
            "needs the flashduty section (flashduty: {app_key: \"${FLASHDUTY_APP_KEY}\"})",
        );
        return None;
    };
    if upstream_names.contains(&REPORT_UPSTREAM) {
        check.fail(
            at,
            format!(
                "reports are delivered as upstream {REPORT_UPSTREAM:?}: rename the upstream of \
                 that name"
            ),
        );
    }
    let mut on = Vec::new();
    match &raw.on {
        None => on.extend([ReportOutcome::Delivered, ReportOutcome::DeadLettered]),
        Some(list) if list.is_empty() => check.fail(
            format!("{at}.on"),
            "lists no outcome (delivered, dead_lettered, guarded); remove report to report nothing",
        ),
        Some(list) => {
            for (i, text) in list.iter().enumerate() {
                match ReportOutcome::parse(text) {
                    Some(outcome) if !on.contains(&outcome) => on.push(outcome),
                    Some(_) => {}
                    None => check.fail(
                        format!("{at}.on[{i}]"),
                        format!("{text:?} is not an outcome (delivered, dead_lettered, guarded)"),
                    ),
                }
            }
        }
    }
    if on.contains(&ReportOutcome::Guarded) && !guarded {
        check.warnings.push(format!(
            "{at}.on: guarded is reported, but the action has no guard"
        ));
    }
    let comment = raw.comment.as_ref().and_then(|text| {
        let template = check.ok(format!("{at}.comment"), TextTemplate::parse_text(text))?;
        let mut payload_paths: Vec<&FieldPath> = Vec::new();
        for path in template.paths() {
            let mut keys = path.keys();
            if keys.next() != Some("actiongate") {
                payload_paths.push(path);
                continue;
            }
            let name: Vec<&str> = keys.collect();
            if !matches!(name.as_slice(), [one] if COMMENT_VALUES.contains(one)) {
                check.fail(
                    format!("{at}.comment"),
                    format!(
                        "{path} is not a value of actiongate (known: {})",
                        COMMENT_VALUES.map(|v| format!("actiongate.{v}")).join(", ")
                    ),
                );
            }
        }
        check.payload_paths(&format!("{at}.comment"), payload_paths);
        Some(template)
    });
    Some(Report {
        on,
        comment,
        upstream: Upstream {
            name: REPORT_UPSTREAM.to_string(),
            url: api.comment_url(),
            query: None,
            method: http::Method::POST,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            // The process-wide rate paces them; this only bounds the calls waiting on it.
            concurrency: 8,
            when: None,
            body: None,
            value_mapping: ValueMapping::default(),
            tls_verify: true,
            ca_file: None,
            order_window: None,
        },
    })
}

pub(super) fn validate_guard(at: &str, raw: &RawGuard, check: &mut Check) -> Guard {
    let once_per_incident = raw.once_per_incident.as_deref().and_then(|text| {
        let path = format!("{at}.once_per_incident");
        match super::units::parse_duration(text) {
            Ok(window) if !window.is_zero() => return Some(window),
            Ok(_) => check.fail(path, "must be more than 0"),
            Err(why) => check.fail(path, why),
        }
        None
    });
    if raw.max_per_hour == Some(0) {
        check.fail(
            format!("{at}.max_per_hour"),
            "must be at least 1 (to stop the action, remove it)",
        );
    }
    let guard = Guard {
        human_only: raw.human_only.unwrap_or(false),
        once_per_incident,
        max_per_hour: raw.max_per_hour.filter(|n| *n > 0),
    };
    if guard == Guard::default() && raw.max_per_hour.is_none() && raw.once_per_incident.is_none() {
        check.warnings.push(format!(
            "{at}: sets no rule (human_only, once_per_incident, max_per_hour)"
        ));
    }
    guard
}
