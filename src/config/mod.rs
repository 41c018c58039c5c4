//! The YAML configuration: schema, defaults, `${ENV}` expansion and validation.
//!
//! Parsing happens in two steps. Serde reads the file into `raw` structs that mirror the YAML
//! (unknown keys are errors, so a typo cannot silently disable a check); `validate` then turns
//! them into a [`Config`] whose fields are already checked, typed values: a `Config` that exists
//! holds no unparsed URL, CIDR, duration, template or unknown source name.

mod env;
mod flashduty;
mod postgres;
mod raw;
pub mod units;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;

use crate::delivery::path::FieldPath;
use crate::delivery::retry::RetryPolicy;
use crate::delivery::schema;
use crate::delivery::template::{Template, TextTemplate, ValueMapping};
use crate::delivery::when::When;
use crate::ingress::allowlist::IpSet;
use crate::ingress::event_type::EventTypes;
use crate::logging::LogFormat;
use raw::{RawAction, RawConfig, RawUpstream};
use units::{parse_duration, parse_size};

pub use flashduty::{FlashdutyApi, Guard, Report, ReportOutcome, COMMENT_VALUES, REPORT_UPSTREAM};
pub use postgres::PostgresStore;

/// Flashduty's SaaS push addresses, the built-in `flashduty` source (PAYLOAD.md). A config may
/// redefine `sources.flashduty` when Flashduty announces new ones or for an on-prem install.
pub const FLASHDUTY_SOURCES: [&str; 4] = [
    "47.94.95.118/32",
    "123.56.8.183/32",
    "47.94.193.81/32",
    "1.13.19.96/32",
];

/// A checked configuration. Build it with [`Config::load`] or [`Config::from_yaml`].
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub listen: Vec<Listener>,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`, `/dead-letters`).
    pub admin: SocketAddr,
    /// `admin.token`: the dead-letter API then needs `Authorization: Bearer <token>`, held
    /// as that whole header value so that one constant-time comparison checks it.
    pub admin_token: Option<Secret>,
    /// Directory of the embedded durable store; in cluster mode, only of the pid file and the
    /// upgrade socket.
    pub spool_path: PathBuf,
    /// `spool.postgres`: the store is a PostgreSQL database shared by several instances.
    pub postgres: Option<PostgresStore>,
    /// Size past which a spool segment is sealed (`spool.segment_size`). Smaller segments free
    /// disk sooner and cost more files; tests use small ones to span many.
    pub spool_segment_size: u64,
    pub limits: Limits,
    /// How long an accepted (action, event_id) is remembered to answer `duplicate`.
    pub dedup_window: Duration,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: IpSet,
    pub fallback: Option<Fallback>,
    pub actions: Vec<Action>,
    /// What to do with an unknown value of a documented enum (schema drift).
    pub schema_drift: DriftPolicy,
    pub log: LogSettings,
    /// Flashduty's Open API, which reports go through.
    pub flashduty: Option<FlashdutyApi>,
    /// What is valid but probably not meant: template and `when` paths that Flashduty's
    /// payload does not have. Printed by `-t` and `render`, logged at start and reload.
    pub warnings: Vec<String>,
}

/// Log output (`log.format`, `log.level`).
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A level name; `RUST_LOG`, when set, overrides it.
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Worker threads of the main listener.
    pub threads: usize,
    /// How long in-flight requests and delivery attempts get on shutdown.
    pub grace_period: Duration,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The chain and key as read and checked at load: what the listener presents.
    pub certified: std::sync::Arc<pingora_rustls::sign::CertifiedKey>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted request body, in bytes.
    pub max_body: usize,
    /// Deadline for receiving the whole request body.
    pub read_timeout: Duration,
    /// The first request head of a connection must have arrived this long after the connection
    /// was accepted, else it is closed (slow-header attacks).
    pub header_timeout: Duration,
    /// After a response, the next request head must have arrived within this, else the
    /// keep-alive connection is closed.
    pub idle_timeout: Duration,
    /// Open connections on all listeners together; `None`: 80 % of the open-files limit,
    /// read when the listener starts (so that the spool, the admin listener and upstream
    /// sockets always have descriptors left).
    pub max_connections: Option<usize>,
    /// Open connections from one socket peer; trusted proxies are exempt.
    pub max_connections_per_source: usize,
}

/// Where requests that match no action are proxied.
#[derive(Debug, Clone)]
pub struct Fallback {
    pub addr: SocketAddr,
    pub tls: bool,
    /// Host name for SNI and certificate checks.
    pub host: String,
}

/// Whether an unknown enum value (e.g. a new incident `progress`) rejects the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftPolicy {
    /// Count it in `actiongate_schema_drift_total`, log it once, accept the event.
    Accept,
    /// Answer `400 invalid_payload` naming the field and value.
    Reject,
}

/// One Flashduty custom action: a path, who may call it, and where its events go.
#[derive(Debug, Clone)]
pub struct Action {
    pub name: String,
    pub path: String,
    /// The event types taken; others are answered `200 ignored`.
    pub events: EventTypes,
    pub allow: IpSet,
    /// Whether `allow` names the `flashduty` source: only then does a right secret from an
    /// unknown address suggest that Flashduty's push addresses changed.
    pub allows_flashduty: bool,
    pub secret: Option<Secret>,
    pub upstreams: Vec<Upstream>,
    /// What is written onto the incident for each outcome.
    pub report: Option<Report>,
    pub guard: Option<Guard>,
}

/// A shared-secret header that must be present with this exact value.
#[derive(Clone)]
pub struct Secret {
    pub header: HeaderName,
    pub value: Vec<u8>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The value is a credential: never print it, not even in debug output.
        f.debug_struct("Secret")
            .field("header", &self.header)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// An internal service that receives an action's events.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    /// The URL; when `query` is set, its query string is rendered per event.
    pub url: url::Url,
    /// A query string with placeholders (`?host={{incident.labels.resource}}`); substituted
    /// values are URL-encoded.
    pub query: Option<TextTemplate>,
    pub method: Method,
    pub headers: Vec<(HeaderName, HeaderSource)>,
    /// Per-attempt timeout, connect included.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Most attempts in flight at once to this upstream.
    pub concurrency: usize,
    pub when: Option<When>,
    /// Body template; `None` forwards the payload exactly as received.
    pub body: Option<Template>,
    pub value_mapping: ValueMapping,
    /// Verify the upstream's TLS certificate (default true).
    pub tls_verify: bool,
    /// Extra CA certificates (PEM) to trust for this upstream.
    pub ca_file: Option<PathBuf>,
    /// `order: event_time`: the window a delivery waits for earlier events of its incident.
    pub order_window: Option<Duration>,
}

/// A configured header value: fixed, or a template rendered per event.
#[derive(Debug, Clone)]
pub enum HeaderSource {
    Static(HeaderValue),
    Template(TextTemplate),
}

/// Every problem found in a configuration, one per line, each starting with its key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads, expands and validates the file at `path` using the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with(path, &|name| std::env::var(name).ok())
    }

    /// [`Config::load`] with `env` resolving `${NAME}`.
    pub fn load_with(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
        Self::parse(&text, &path.display().to_string(), env)
    }

    /// Parses and validates YAML text; `env` resolves `${NAME}`.
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        Self::parse(text, "(config)", env)
    }

    /// The checks, in order: YAML syntax (named after `file`), `${ENV}` expansion, types
    /// (every wrong key reported, not just the first), then meaning.
    fn parse(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut doc: serde_norway::Value = serde_norway::from_str(text)
            .map_err(|e| ConfigErrors(vec![format!("{file}: not valid YAML: {e}")]))?;
        let problems = env::expand(&mut doc, env);
        if !problems.is_empty() {
            return Err(ConfigErrors(problems));
        }
        let mut check = Check::default();
        let (raw, removed) = deserialize_all(doc, &mut check.problems);
        let Some(raw) = raw else {
            return Err(ConfigErrors(check.problems));
        };
        let typed = check.problems.len();
        let config = validate(raw, &mut check);
        // What a removed key would have said again (a default in its place) is not news.
        let mut problems = check.problems.split_off(typed);
        problems.retain(|p| !removed.iter().any(|r| is_under(p, r)));
        check.problems.extend(problems);
        match config {
            Some(config) if check.problems.is_empty() => Ok(config),
            _ => Err(ConfigErrors(check.problems)),
        }
    }

    /// The action served at `path`, if any (exact match).
    pub fn action_by_path(&self, path: &str) -> Option<&Action> {
        self.actions.iter().find(|a| a.path == path)
    }
}

/// Collects problems so that `-t` can report all of them at once.
#[derive(Default)]
struct Check {
    problems: Vec<String>,
    warnings: Vec<String>,
}

impl Check {
    fn fail(&mut self, path: impl fmt::Display, why: impl fmt::Display) {
        self.problems.push(format!("{path}: {why}"));
    }

    /// Records the error of `result` under `path` and returns its value, if any.
    fn ok<T>(&mut self, path: impl fmt::Display, result: Result<T, String>) -> Option<T> {
        result.map_err(|why| self.fail(path, why)).ok()
    }

    /// Warns about each of `paths` (read by the thing at `at`) that Flashduty never sends.
    fn payload_paths<'p>(&mut self, at: &str, paths: impl IntoIterator<Item = &'p FieldPath>) {
        for path in paths {
            if let Some(why) = schema::check(path) {
                self.warnings.push(format!("{at}: {why}"));
            }
        }
    }

    fn duration(&mut self, path: &str, text: Option<&str>, default: Duration) -> Duration {
        match text {
            None => default,
            Some(text) => self.ok(path, parse_duration(text)).unwrap_or(default),
        }
    }
}

/// The most type problems reported in one go; past it, the first ones are enough to go on.
const MAX_TYPE_PROBLEMS: usize = 50;

/// Deserializes `doc`, reporting every key of the wrong type or unknown name rather than the
/// first. Each bad node is stepped over and the rest tried again: a key of a mapping is
/// removed; a list element (or a mapping missing a required key, which cannot be removed from
/// a list without shifting the indices of the rest) is replaced by a stand-in of its kind.
/// Returns the config (`None` when a problem cannot be stepped over) and the paths stepped
/// over, whose own validation problems would only repeat what was said.
fn deserialize_all(
    mut doc: serde_norway::Value,
    problems: &mut Vec<String>,
) -> (Option<RawConfig>, Vec<String>) {
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..MAX_TYPE_PROBLEMS {
        let e = match serde_path_to_error::deserialize::<_, RawConfig>(doc.clone()) {
            Ok(raw) => return (Some(raw), removed),
            Err(e) => e,
        };
        let path: Vec<serde_path_to_error::Segment> = e.path().iter().cloned().collect();
        let at = e.path().to_string();
        let at = if at == "." { "(top level)".into() } else { at };
        let why = e.into_inner().to_string();
        // serde names Rust types; a YAML author wants to know what to write.
        let mut why = ["usize", "u64", "u32", "u16"].iter().fold(why, |why, t| {
            why.replace(&format!("expected {t}"), "expected a whole number")
        });
        if let Some(at) = why.find("expected struct Raw") {
            why.replace_range(at.., "expected a mapping of keys");
        }
        if removed.contains(&at) {
            // The stand-in did not fit either: nothing more to learn by going on.
            return (None, removed);
        }
        let missing = why
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        // A required key of the wrong type, removed, comes back as missing: said already.
        let repeat = missing.is_some_and(|field| removed.contains(&format!("{at}.{field}")));
        if !repeat {
            problems.push(format!("{at}: {why}"));
        }
        let stepped = remove_key(&mut doc, &path) || replace_with_stand_in(&mut doc, &path);
        if !stepped {
            return (None, removed);
        }
        removed.push(at);
    }
    (None, removed)
}

/// Whether `problem` (a line starting with a key path) is about `path` or something in it.
fn is_under(problem: &str, path: &str) -> bool {
    problem
        .strip_prefix(path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '.', '[']))
}

/// The node at `path`, if every step of it exists.
fn node_mut<'d>(
    doc: &'d mut serde_norway::Value,
    path: &[serde_path_to_error::Segment],
) -> Option<&'d mut serde_norway::Value> {
    use serde_path_to_error::Segment;
    let mut at = doc;
    for segment in path {
        at = match (segment, at) {
            (Segment::Map { key }, serde_norway::Value::Mapping(map)) => {
                map.get_mut(key.as_str())?
            }
            (Segment::Seq { index }, serde_norway::Value::Sequence(items)) => {
                items.get_mut(*index)?
            }
            _ => return None,
        };
    }
    Some(at)
}

/// Removes the mapping key at `path`; false when `path` does not end in a key of a mapping.
fn remove_key(doc: &mut serde_norway::Value, path: &[serde_path_to_error::Segment]) -> bool {
    use serde_path_to_error::Segment;
    let Some((Segment::Map { key }, parents)) = path.split_last() else {
        return false;
    };
    match node_mut(doc, parents) {
        Some(serde_norway::Value::Mapping(map)) => map.remove(key.as_str()).is_some(),
        _ => false,
    }
}

/// Replaces the list element at `path` with a valid stand-in of its kind (named after the
/// list it is in), so that the elements after it keep their indices; false when `path` does
/// not end in a list element.
fn replace_with_stand_in(
    doc: &mut serde_norway::Value,
    path: &[serde_path_to_error::Segment],
) -> bool {
    use serde_path_to_error::Segment;
    let Some((Segment::Seq { index }, parents)) = path.split_last() else {
        return false;
    };
    let list = parents.iter().rev().find_map(|s| match s {
        Segment::Map { key } => Some(key.as_str()),
        _ => None,
    });
    let stand_in = match list {
        Some("actions") => format!(
            "{{name: stand-in-{index}, path: /.stand-in/{index}, allow: [127.0.0.1/32], \
             upstreams: [{{name: u, url: \"http://127.0.0.1:1/\"}}]}}"
        ),
        Some("upstreams") => format!("{{name: stand-in-{index}, url: \"http://127.0.0.1:1/\"}}"),
        Some("listen") => "{addr: \"127.0.0.1:1\"}".to_string(),
        _ => "127.0.0.1/32".to_string(),
    };
    let (Some(node), Ok(value)) = (node_mut(doc, path), serde_norway::from_str(&stand_in)) else {
        return false;
    };
    *node = value;
    true
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn validate(raw: RawConfig, check: &mut Check) -> Option<Config> {
    let threads = raw.server.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads == 0 {
        check.fail("server.threads", "must be at least 1");
    }
    let server = ServerSettings {
        threads: threads.max(1),
        grace_period: check.duration(
            "server.grace_period",
            raw.server.grace_period.as_deref(),
            Duration::from_secs(5),
        ),
    };

    if raw.listen.is_empty() {
        check.fail("listen", "at least one listener is required");
    }
    let mut listen = Vec::new();
    for (i, l) in raw.listen.iter().enumerate() {
        let Some(addr) = check.ok(format!("listen[{i}].addr"), parse_socket_addr(&l.addr)) else {
            continue;
        };
        let tls = l.tls.as_ref().and_then(|tls| {
            let cert = check.ok(
                format!("listen[{i}].tls.cert"),
                check_pem(&tls.cert, "CERTIFICATE"),
            );
            let key = check.ok(
                format!("listen[{i}].tls.key"),
                check_pem(&tls.key, "PRIVATE KEY"),
            );
            let (cert, key) = (cert?, key?);
            let certified = check.ok(format!("listen[{i}].tls"), crate::tls::load(&cert, &key))?;
            Some(TlsFiles {
                cert,
                key,
                certified,
            })
        });
        listen.push(Listener { addr, tls });
    }

    let admin_token = match raw.admin.token.as_deref() {
        None => None,
        Some(token) if token.trim().is_empty() || token.chars().any(char::is_whitespace) => {
            check.fail(
                "admin.token",
                "must be a non-empty string without spaces (or leave it out)",
            );
            None
        }
        Some(token) => Some(Secret {
            header: http::header::AUTHORIZATION,
            value: format!("Bearer {token}").into_bytes(),
        }),
    };
    let admin_text = raw.admin.addr.as_deref().unwrap_or("127.0.0.1:9091");
    let admin = check.ok("admin.addr", parse_socket_addr(admin_text));
    if let Some(admin) = admin {
        if listen.iter().any(|l| l.addr == admin) {
            check.fail("admin.addr", format!("{admin} is also a listen address"));
        }
    }

    let spool_path = PathBuf::from(raw.spool.path.as_deref().unwrap_or("./data"));
    let postgres = raw.spool.postgres.as_ref().and_then(|pg| {
        if raw.spool.path.is_some() {
            check.fail(
                "spool",
                "set `path` (the local spool) or `postgres` (cluster mode), not both",
            );
        }
        check.ok("spool.postgres", PostgresStore::from_raw(pg))
    });
    let spool_segment_size = match &raw.spool.segment_size {
        None => crate::spool::SEGMENT_BYTES,
        Some(value) => check
            .ok("spool.segment_size", size_value(value))
            .unwrap_or(crate::spool::SEGMENT_BYTES),
    };
    if !(64 << 10..=1 << 30).contains(&spool_segment_size) {
        check.fail(
            "spool.segment_size",
            format!("{spool_segment_size} bytes is outside 64KiB..1GiB"),
        );
    }
    let max_body = match &raw.limits.max_body {
        None => 1 << 20,
        Some(value) => check
            .ok("limits.max_body", size_value(value))
            .unwrap_or(1 << 20),
    };
    if max_body == 0 {
        check.fail("limits.max_body", "must be more than 0");
    } else if max_body > crate::store::MAX_BODY as u64 {
        check.fail(
            "limits.max_body",
            format!(
                "{max_body} bytes is more than the spool stores in one record (at most 64MiB; \
                 Flashduty's payloads are a few KiB)"
            ),
        );
    }
    let positive = |check: &mut Check, key: &str, value: Option<u64>| {
        if value == Some(0) {
            check.fail(key, "must be more than 0");
        }
        value.map(|v| usize::try_from(v).unwrap_or(usize::MAX))
    };
    let max_connections = positive(check, "limits.max_connections", raw.limits.max_connections);
    let max_connections_per_source = positive(
        check,
        "limits.max_connections_per_source",
        raw.limits.max_connections_per_source,
    )
    .unwrap_or(256);
    let limits = Limits {
        max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
        read_timeout: check.duration(
            "limits.read_timeout",
            raw.limits.read_timeout.as_deref(),
            Duration::from_secs(5),
        ),
        header_timeout: check.duration(
            "limits.header_timeout",
            raw.limits.header_timeout.as_deref(),
            Duration::from_secs(5),
        ),
        idle_timeout: check.duration(
            "limits.idle_timeout",
            raw.limits.idle_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        max_connections,
        max_connections_per_source,
    };
    for (key, value) in [
        ("limits.header_timeout", limits.header_timeout),
        ("limits.idle_timeout", limits.idle_timeout),
    ] {
        if value.is_zero() {
            check.fail(key, "must be more than 0");
        }
    }
    // Pingora closes a keep-alive connection idle for 60 s by itself.
    if limits.idle_timeout > Duration::from_secs(60) {
        check.fail(
            "limits.idle_timeout",
            "at most 60s (Pingora closes idle keep-alive connections at 60s)",
        );
    }
    let dedup_window = check.duration(
        "dedup_window",
        raw.dedup_window.as_deref(),
        Duration::from_secs(24 * 3600),
    );

    // Named sources: the built-in list first, so that a config can redefine it.
    let mut sources: BTreeMap<String, IpSet> = BTreeMap::new();
    sources.insert(
        "flashduty".into(),
        IpSet::new(FLASHDUTY_SOURCES.iter().filter_map(|c| c.parse().ok())),
    );
    for (name, cidrs) in &raw.sources {
        if !is_name(name) {
            check.fail(
                format!("sources.{name}"),
                "a source name may use only a-z, 0-9, - and _",
            );
        }
        let nets = cidrs
            .iter()
            .enumerate()
            .filter_map(|(i, text)| check.ok(format!("sources.{name}[{i}]"), parse_net(text)));
        sources.insert(name.clone(), IpSet::new(nets.collect::<Vec<_>>()));
    }

    let trusted: Vec<IpNet> = raw
        .trusted_proxies
        .iter()
        .enumerate()
        .filter_map(|(i, text)| check.ok(format!("trusted_proxies[{i}]"), parse_net(text)))
        .collect();

    let fallback = raw
        .fallback
        .as_ref()
        .and_then(|f| check.ok("fallback.url", parse_fallback(&f.url)));

    let schema_drift = match raw.schema_drift.as_deref() {
        None | Some("accept") => DriftPolicy::Accept,
        Some("reject") => DriftPolicy::Reject,
        Some(other) => {
            check.fail(
                "schema_drift",
                format!("{other:?} is not a policy (use accept or reject)"),
            );
            DriftPolicy::Accept
        }
    };

    let log = LogSettings {
        format: match raw.log.format.as_deref() {
            None => LogFormat::Text,
            Some(text) => LogFormat::parse(text).unwrap_or_else(|| {
                check.fail(
                    "log.format",
                    format!("{text:?} is not a format (use text, json or logfmt)"),
                );
                LogFormat::Text
            }),
        },
        level: match raw.log.level.as_deref() {
            None => "info".to_string(),
            Some(level @ ("error" | "warn" | "info" | "debug" | "trace" | "off")) => {
                level.to_string()
            }
            Some(other) => {
                check.fail(
                    "log.level",
                    format!("{other:?} is not a level (use error, warn, info, debug or trace)"),
                );
                "info".to_string()
            }
        },
    };

    let flashduty = raw
        .flashduty
        .as_ref()
        .and_then(|f| flashduty::validate_api(f, check));
    if raw.actions.is_empty() {
        check.fail("actions", "at least one action is required");
    }
    let mut names = HashSet::new();
    let mut paths = HashSet::new();
    let mut actions = Vec::new();
    for (i, a) in raw.actions.iter().enumerate() {
        let at = format!("actions[{i}]");
        if !names.insert(a.name.as_str()) {
            check.fail(format!("{at}.name"), format!("{:?} is used twice", a.name));
        }
        if !paths.insert(a.path.as_str()) {
            check.fail(format!("{at}.path"), format!("{:?} is used twice", a.path));
        }
        if let Some(action) = validate_action(&at, a, &sources, flashduty.as_ref(), check) {
            actions.push(action);
        }
    }
    if postgres.is_some() {
        // Each instance claims deliveries on its own: no one of them sees an incident's
        // events together, so none could hold them in order.
        for (i, action) in actions.iter().enumerate() {
            for (j, upstream) in action.upstreams.iter().enumerate() {
                if upstream.order_window.is_some() {
                    check.fail(
                        format!("actions[{i}].upstreams[{j}].order"),
                        "needs the local spool: in cluster mode (spool.postgres) instances \
                         claim deliveries independently",
                    );
                }
            }
        }
    }

    Some(Config {
        server,
        listen,
        admin: admin?,
        admin_token,
        spool_path,
        postgres,
        spool_segment_size,
        limits,
        dedup_window,
        trusted_proxies: IpSet::new(trusted),
        fallback,
        actions,
        schema_drift,
        log,
        flashduty,
        warnings: std::mem::take(&mut check.warnings),
    })
}

fn validate_action(
    at: &str,
    a: &RawAction,
    sources: &BTreeMap<String, IpSet>,
    api: Option<&FlashdutyApi>,
    check: &mut Check,
) -> Option<Action> {
    if !is_name(&a.name) {
        check.fail(
            format!("{at}.name"),
            format!("{:?} may use only a-z, 0-9, - and _", a.name),
        );
    }
    if !a.path.starts_with('/') || a.path.contains(['?', '#']) {
        check.fail(
            format!("{at}.path"),
            format!(
                "{:?} must be an absolute path without query (e.g. /actions/restart)",
                a.path
            ),
        );
    }
    let events = match &a.events {
        None => EventTypes::default(),
        Some(entries) => {
            let parsed = check.ok(format!("{at}.events"), EventTypes::parse(entries));
            let (events, warnings) = parsed.unwrap_or_default();
            for warning in warnings {
                check.warnings.push(format!("{at}.events: {warning}"));
            }
            events
        }
    };
    let default_allow = vec!["flashduty".to_string()];
    let entries = a.allow.as_ref().unwrap_or(&default_allow);
    let mut allow = Vec::new();
    for (j, entry) in entries.iter().enumerate() {
        if let Some(set) = sources.get(entry) {
            allow.extend(set.nets().iter().copied());
        } else if entry.contains(['.', ':']) {
            if let Some(net) = check.ok(format!("{at}.allow[{j}]"), parse_net(entry)) {
                allow.push(net);
            }
        } else {
            let known: Vec<&str> = sources.keys().map(String::as_str).collect();
            check.fail(
                format!("{at}.allow[{j}]"),
                format!(
                    "unknown source {entry:?} (known: {}; or write a CIDR)",
                    known.join(", ")
                ),
            );
        }
    }
    let secret = a.secret.as_ref().and_then(|s| {
        let header = check.ok(
            format!("{at}.secret.header"),
            HeaderName::from_bytes(s.header.as_bytes())
                .map_err(|_| format!("{:?} is not a valid header name", s.header)),
        );
        if s.value.is_empty() {
            check.fail(format!("{at}.secret.value"), "must not be empty");
            return None;
        }
        Some(Secret {
            header: header?,
            value: s.value.as_bytes().to_vec(),
        })
    });
    if a.upstreams.is_empty() {
        check.fail(
            format!("{at}.upstreams"),
            "at least one upstream is required",
        );
    }
    if a.upstreams.len() > crate::store::MAX_UPSTREAMS {
        check.fail(
            format!("{at}.upstreams"),
            format!(
                "at most {} upstreams per action",
                crate::store::MAX_UPSTREAMS
            ),
        );
    }
    let mut upstream_names = HashSet::new();
    let mut upstreams = Vec::new();
    for (j, u) in a.upstreams.iter().enumerate() {
        let uat = format!("{at}.upstreams[{j}]");
        if !upstream_names.insert(u.name.as_str()) {
            check.fail(
                format!("{uat}.name"),
                format!("{:?} is used twice in this action", u.name),
            );
        }
        if let Some(upstream) = validate_upstream(&uat, u, check) {
            upstreams.push(upstream);
        }
    }
    let guard = a
        .guard
        .as_ref()
        .map(|g| flashduty::validate_guard(&format!("{at}.guard"), g, check));
    let names: Vec<&str> = a.upstreams.iter().map(|u| u.name.as_str()).collect();
    let report = a.report.as_ref().and_then(|r| {
        flashduty::validate_report(
            &format!("{at}.report"),
            r,
            api,
            &names,
            guard.is_some(),
            check,
        )
    });
    Some(Action {
        name: a.name.clone(),
        path: a.path.clone(),
        events,
        allow: IpSet::new(allow),
        allows_flashduty: entries.iter().any(|entry| entry == "flashduty"),
        secret,
        upstreams,
        report,
        guard,
    })
}

fn validate_upstream(at: &str, u: &RawUpstream, check: &mut Check) -> Option<Upstream> {
    if !is_name(&u.name) {
        check.fail(
            format!("{at}.name"),
            format!("{:?} may use only a-z, 0-9, - and _", u.name),
        );
    }
    let (url, query) = match check.ok(format!("{at}.url"), parse_templated_url(&u.url)) {
        Some((url, query)) => (Some(url), query),
        None => (None, None),
    };
    let method = match u.method.as_deref() {
        None => Some(Method::POST),
        Some(m) => check.ok(format!("{at}.method"), parse_method(m)),
    };
    let mut headers = Vec::new();
    for (name, value) in &u.headers {
        let hat = format!("{at}.headers.{name}");
        let name = check.ok(
            &hat,
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| "not a valid header name".to_string()),
        );
        let source = if value.contains("{{") {
            check
                .ok(&hat, TextTemplate::parse_text(value))
                .map(HeaderSource::Template)
        } else {
            check
                .ok(
                    &hat,
                    HeaderValue::from_str(value)
                        .map_err(|_| "not a valid header value (control characters?)".to_string()),
                )
                .map(|mut value| {
                    // Configured headers often carry credentials: keep them out of debug output.
                    value.set_sensitive(true);
                    HeaderSource::Static(value)
                })
        };
        if let (Some(name), Some(source)) = (name, source) {
            headers.push((name, source));
        }
    }
    let timeout = check.duration(
        &format!("{at}.timeout"),
        u.timeout.as_deref(),
        Duration::from_secs(10),
    );
    if timeout.is_zero() {
        check.fail(format!("{at}.timeout"), "must be more than 0");
    }
    let raw_retry = u.retry.clone().unwrap_or_default();
    let attempts = raw_retry.attempts.unwrap_or(8);
    if attempts == 0 {
        check.fail(format!("{at}.retry.attempts"), "must be at least 1");
    }
    let backoff = check.duration(
        &format!("{at}.retry.backoff"),
        raw_retry.backoff.as_deref(),
        Duration::from_secs(1),
    );
    let max_backoff = check.duration(
        &format!("{at}.retry.max_backoff"),
        raw_retry.max_backoff.as_deref(),
        Duration::from_secs(300),
    );
    if backoff > max_backoff {
        check.fail(
            format!("{at}.retry.backoff"),
            "is longer than retry.max_backoff",
        );
    }
    let concurrency = u.concurrency.unwrap_or(32);
    if concurrency == 0 {
        check.fail(format!("{at}.concurrency"), "must be at least 1");
    }
    let when = u.when.as_ref().and_then(|w| match When::compile(w) {
        Ok(when) => Some(when),
        Err(problems) => {
            for why in problems {
                check.fail(format!("{at}.when"), why);
            }
            None
        }
    });
    let body = u
        .body
        .as_ref()
        .and_then(|text| check.ok(format!("{at}.body"), Template::parse_json(text)));
    let value_mapping = ValueMapping::new(u.value_mapping.clone().unwrap_or_default());
    if let Some(query) = &query {
        check.payload_paths(&format!("{at}.url"), query.paths());
    }
    for (name, source) in &headers {
        if let HeaderSource::Template(template) = source {
            check.payload_paths(&format!("{at}.headers.{name}"), template.paths());
        }
    }
    if let Some(when) = &when {
        check.payload_paths(&format!("{at}.when"), when.paths());
    }
    if let Some(body) = &body {
        check.payload_paths(&format!("{at}.body"), body.paths());
    }
    for key in u.value_mapping.iter().flat_map(|m| m.keys()) {
        match FieldPath::parse(key) {
            Ok(path) => check.payload_paths(&format!("{at}.value_mapping"), [&path]),
            Err(why) => check.fail(format!("{at}.value_mapping"), why),
        }
    }
    let order_window = validate_order(at, u, check);
    let ca_file = u
        .ca_file
        .as_ref()
        .and_then(|p| check.ok(format!("{at}.ca_file"), check_pem(p, "CERTIFICATE")));
    if let Some(url) = &url {
        if url.scheme() != "https" && (u.tls_verify.is_some() || ca_file.is_some()) {
            check.fail(
                format!("{at}.url"),
                "tls_verify and ca_file need an https URL",
            );
        }
    }
    Some(Upstream {
        name: u.name.clone(),
        url: url?,
        query,
        method: method?,
        headers,
        timeout,
        retry: RetryPolicy {
            attempts: attempts.max(1),
            backoff,
            max_backoff,
        },
        concurrency: concurrency.max(1),
        when,
        body,
        value_mapping,
        tls_verify: u.tls_verify.unwrap_or(true),
        ca_file,
        order_window,
    })
}

/// `order_window` when it is not set.
pub const DEFAULT_ORDER_WINDOW: Duration = Duration::from_secs(2);
/// The longest `order_window`: every delivery of the upstream may wait that long.
const MAX_ORDER_WINDOW: Duration = Duration::from_secs(60);

/// An upstream's `order` and `order_window`: the window when deliveries are ordered.
fn validate_order(at: &str, u: &RawUpstream, check: &mut Check) -> Option<Duration> {
    match u.order.as_deref() {
        None => {
            if u.order_window.is_some() {
                check.fail(
                    format!("{at}.order_window"),
                    "has no effect without order: event_time",
                );
            }
            None
        }
        Some("event_time") => {
            let path = format!("{at}.order_window");
            let window = check.duration(&path, u.order_window.as_deref(), DEFAULT_ORDER_WINDOW);
            if window.is_zero() || window > MAX_ORDER_WINDOW {
                check.fail(&path, "must be more than 0 and at most 1m");
            }
            Some(window)
        }
        Some(other) => {
            check.fail(
                format!("{at}.order"),
                format!("{other:?} is not an order (the one there is: event_time)"),
            );
            None
        }
    }
}

/// An upstream's method: one an HTTP service can be expected to route. `Method::from_bytes`
/// alone takes any token (`FOO`), which no upstream answers.
fn parse_method(text: &str) -> Result<Method, String> {
    const METHODS: [Method; 5] = [
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::GET,
        Method::DELETE,
    ];
    METHODS
        .into_iter()
        .find(|m| m.as_str().eq_ignore_ascii_case(text.trim()))
        .ok_or_else(|| format!("{text:?} is not one of POST, PUT, PATCH, GET, DELETE"))
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an address (try 0.0.0.0:8443 or [::]:8443)"))
}

/// Parses a CIDR or a bare address (taken as a single host).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{text:?} is not a CIDR or IP address (try 10.20.0.0/16)"))
}

fn size_value(value: &serde_norway::Value) -> Result<u64, String> {
    match value {
        serde_norway::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a size (try 65536, 64KiB, 1MiB)")),
        serde_norway::Value::String(text) => parse_size(text),
        other => Err(format!("{other:?} is not a size (try 65536, 64KiB, 1MiB)")),
    }
}

fn parse_upstream_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| match e {
        url::ParseError::RelativeUrlWithoutBase => "relative URL not allowed".to_string(),
        other => format!("{text:?} is not a URL: {other}"),
    })?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "scheme {other:?} not supported (use http or https)"
            ))
        }
    }
    if url.host().is_none() {
        return Err("URL has no host".into());
    }
    // What `url` takes, HTTP may not (e.g. `{` in a host name): refused here, at `-t`, rather
    // than when the dispatcher builds the request.
    crate::delivery::request::uri(&url)?;
    Ok(url)
}

/// Parses an upstream URL whose query string may hold `{{placeholders}}`.
fn parse_templated_url(text: &str) -> Result<(url::Url, Option<TextTemplate>), String> {
    if !text.contains("{{") {
        return parse_upstream_url(text).map(|url| (url, None));
    }
    let (base, query) = text
        .split_once('?')
        .filter(|(base, _)| !base.contains("{{"))
        .ok_or("placeholders are allowed only in the query string")?;
    let template = TextTemplate::parse_text(query)?;
    let url = parse_upstream_url(base)?;
    Ok((url, Some(template)))
}

fn parse_fallback(text: &str) -> Result<Fallback, String> {
    let url = parse_upstream_url(text)?;
    if !(url.path().is_empty() || url.path() == "/") || url.query().is_some() {
        return Err("a path or query is not supported (requests keep their own)".into());
    }
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    // Resolved once here: Pingora's HttpPeer wants an address, and resolving per request
    // would put a blocking DNS lookup on the request path.
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host:?} resolves to no address"))?;
    Ok(Fallback {
        addr,
        tls: url.scheme() == "https",
        host,
    })
}

/// Checks that a PEM file exists and holds at least one block of the expected kind, so that a
/// bad file fails `-t` instead of panicking a listener at start-up.
fn check_pem(path: &str, kind: &str) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    let found = text.lines().any(|line| {
        line.starts_with("-----BEGIN ") && line.trim_end().ends_with(&format!("{kind}-----"))
    });
    if found {
        Ok(PathBuf::from(path))
    } else {
        Err(format!("{path:?} holds no PEM {kind}"))
    }
}

#[cfg(test)]
mod tests;
