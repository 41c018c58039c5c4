//! The configuration file exactly as written: serde mirrors of the YAML, before any checks.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Pingora server settings.
    #[serde(default)]
    pub server: RawServer,
    /// The public listeners (at least one).
    #[serde(default)]
    pub listen: Vec<RawListen>,
    /// The admin listener.
    #[serde(default)]
    pub admin: RawAdmin,
    /// The durable store.
    #[serde(default)]
    pub spool: RawSpool,
    /// Request limits.
    #[serde(default)]
    pub limits: RawLimits,
    /// How long an event_id is remembered [24h].
    pub dedup_window: Option<DurationText>,
    /// Named allowlists; `flashduty` is built in.
    #[serde(default)]
    pub sources: BTreeMap<String, Vec<String>>,
    /// CIDRs whose X-Forwarded-For is believed [none].
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Where non-action requests are proxied [none: 404].
    pub fallback: Option<RawFallback>,
    /// The custom actions.
    #[serde(default)]
    pub actions: Vec<RawAction>,
    /// `accept` [default] or `reject` unknown enum values in payloads.
    pub schema_drift: Option<String>,
    /// Log format and level.
    #[serde(default)]
    pub log: RawLog,
    /// Flashduty's Open API, which `report` writes comments through [none].
    pub flashduty: Option<RawFlashduty>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlashduty {
    /// An account's API key, e.g. `${FLASHDUTY_APP_KEY}`; never logged.
    pub app_key: String,
    /// The Open API's base URL [https://api.flashcat.cloud].
    pub api: Option<String>,
    /// Open API calls per second, process-wide [20]; Flashduty allows 50 per account.
    pub rate: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReport {
    /// Outcomes that get a comment: delivered, dead_lettered, guarded [delivered, dead_lettered].
    pub on: Option<Vec<String>>,
    /// The comment, with payload paths and actiongate.* values [one sentence saying it all].
    pub comment: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuard {
    /// Refuse pushes that carry no `person` [false].
    pub human_only: Option<bool>,
    /// Refuse a second push for the same incident within this long [none].
    pub once_per_incident: Option<DurationText>,
    /// Refuse past this many accepted pushes of the action in any hour [none].
    pub max_per_hour: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `text` [default], `json` or `logfmt`.
    pub format: Option<String>,
    /// `error`, `warn`, `info` [default], `debug` or `trace`; RUST_LOG overrides it.
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Worker threads [number of CPUs].
    pub threads: Option<usize>,
    /// Time given to in-flight work on shutdown [5s].
    pub grace_period: Option<DurationText>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    /// `host:port` to bind.
    pub addr: String,
    /// Terminate TLS with these PEM files.
    pub tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// [127.0.0.1:9091]
    pub addr: Option<String>,
    /// When set, the dead-letter API needs `Authorization: Bearer <token>` [none].
    pub token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpool {
    /// Directory of the store [./data].
    pub path: Option<String>,
    /// Size past which a log segment is sealed and a new one started [64MiB].
    pub segment_size: Option<serde_norway::Value>,
    /// Cluster mode: a PostgreSQL database instead of `path`.
    pub postgres: Option<RawPostgres>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// `postgresql://user:password@host1:5432,host2:5432/db?target_session_attrs=read-write`.
    pub url: Option<String>,
    /// Connections per instance [16].
    pub pool: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest body, bytes or `64KiB`/`1MiB` [1MiB].
    pub max_body: Option<serde_norway::Value>,
    /// Deadline for the whole body [5s].
    pub read_timeout: Option<DurationText>,
    /// The whole request head must arrive within it, else the connection is closed [5s].
    pub header_timeout: Option<DurationText>,
    /// A keep-alive connection idle this long is closed [60s].
    pub idle_timeout: Option<DurationText>,
    /// Open connections on all listeners together [80% of the open-files limit].
    pub max_connections: Option<u64>,
    /// Open connections from one socket peer address; trusted proxies are exempt [256].
    pub max_connections_per_source: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    /// `[a-z0-9_-]+`, unique; a metrics label.
    pub name: String,
    /// Exact request path.
    pub path: String,
    /// Flashduty event types taken: i_custom, i_new, …, a_new, …; i_* / a_* for every type
    /// of a kind [i_custom]. Others are answered `200 ignored`.
    pub events: Option<Vec<String>>,
    /// Source names and/or CIDRs [flashduty].
    pub allow: Option<Vec<String>>,
    /// Shared-secret header.
    pub secret: Option<RawSecret>,
    /// Where accepted events go.
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    /// A comment on the incident for each outcome [none].
    pub report: Option<RawReport>,
    /// Guardrails for destructive actions [none].
    pub guard: Option<RawGuard>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    pub header: String,
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Unique within the action.
    pub name: String,
    /// Absolute http(s) URL.
    pub url: String,
    /// [POST]
    pub method: Option<String>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Per-attempt timeout [10s].
    pub timeout: Option<DurationText>,
    /// Retry policy [8 attempts, 1s, 5m].
    pub retry: Option<RawRetry>,
    /// In-flight attempts [32].
    pub concurrency: Option<usize>,
    /// Conditions on the payload; all must hold.
    pub when: Option<serde_norway::Mapping>,
    /// Body template [the payload as received].
    pub body: Option<String>,
    /// Per-path value replacement for templates.
    pub value_mapping: Option<BTreeMap<String, BTreeMap<String, String>>>,
    /// Verify the upstream certificate [true].
    pub tls_verify: Option<bool>,
    /// Extra CA bundle (PEM) for this upstream.
    pub ca_file: Option<String>,
    /// `event_time`: deliveries of one incident leave in event_time order [none].
    pub order: Option<String>,
    /// With `order`, how long a delivery waits for an earlier event of its incident [2s].
    pub order_window: Option<DurationText>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<u32>,
    pub backoff: Option<DurationText>,
    pub max_backoff: Option<DurationText>,
}

/// A duration as written (`5s`, `1m30s`), parsed during validation. Its own type so that a
/// wrong YAML type says what was expected (`timeout: 30` → "expected a duration such as 5s")
/// instead of "expected a string".
#[derive(Debug, Clone)]
pub struct DurationText(String);

impl std::ops::Deref for DurationText {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = DurationText;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as 5s, 500ms or 1m30s")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
        }
        d.deserialize_str(Text)
    }
}
