//! Validates a Flashduty webhook payload (PAYLOAD.md) in one streaming pass: a custom action
//! or incident webhook (`i_*`, carrying `incident`) or an alert webhook (`a_*`, carrying
//! `alert`).
//!
//! The schema is a static table below. The validator walks the JSON once with serde, checking
//! each documented field's type as it goes and skipping unknown fields without building them,
//! so a payload is never materialised as a tree on the request path. The raw bytes are what we
//! store and forward, which keeps unknown fields byte-for-byte.
//!
//! Rules (forward compatible by design):
//! - Required: `event_id` (top level, or `incident.event_id` in older pushes), `event_type`
//!   (`i_…` or `a_…`), `event_time`, and the object the type names: `incident` with its
//!   `incident_id`, `title`, `incident_severity`, `incident_status`, `progress`; or `alert`
//!   with its `alert_id`, `title`, `alert_severity`, `alert_status`. Every other documented
//!   field is type-checked when present; absent, `null`, `0`, `""`, `{}` and `[]` all mean
//!   "not set". Once the type is known, the other kind's object is just an unknown field.
//! - Unknown fields are accepted anywhere.
//! - An unknown value of a documented enum, and an `i_…`/`a_…` type Flashduty does not
//!   document, are schema drift: reported to the caller (counted in
//!   `actiongate_schema_drift_total`), or rejected when the config says `schema_drift: reject`.
//! - A type the action does not take (`events:`) is [`Verdict::Unwanted`], whatever the rest of
//!   the body holds: the gateway answers it `200 ignored` and Flashduty sees no failure.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::event_type::{EventKind, EventTypes, ALERT_TYPES, INCIDENT_TYPES};
use crate::config::DriftPolicy;

/// Longest accepted `event_id`, in bytes: it is a dedup key, so it must stay small.
pub const MAX_EVENT_ID: usize = 256;
/// Longest accepted `incident.incident_id` or `alert.alert_id`, in bytes: a guard key holds it
/// (Flashduty's are 24 characters).
pub const MAX_INCIDENT_ID: usize = 256;

/// The documented enum fields, as `field` labels of `actiongate_schema_drift_total`.
pub const DRIFT_FIELDS: [&str; 13] = [
    "incident.incident_severity",
    "incident.incident_status",
    "incident.progress",
    "incident.channel_status",
    "incident.group_method",
    "incident.assigned_to.type",
    "incident.alerts.alert_severity",
    "incident.alerts.alert_status",
    "incident.alerts.progress",
    "event_type",
    "alert.alert_severity",
    "alert.alert_status",
    "alert.progress",
];

/// The `DRIFT_FIELDS` index of `event_type`.
const EVENT_TYPE_DRIFT: usize = 9;

/// The kind whose object holds drift field `field`; `None` for the envelope's.
fn drift_owner(field: usize) -> Option<EventKind> {
    let object = DRIFT_FIELDS.get(field)?.split('.').next()?;
    [EventKind::Incident, EventKind::Alert]
        .into_iter()
        .find(|kind| kind.object() == object)
}

/// What the validator made of a body that is JSON with an event type.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// The action takes this type and the payload keeps its contract.
    Valid(Validated<'a>),
    /// The action does not take this type (`events:`): answered `200 ignored`, not stored.
    Unwanted {
        event_id: Cow<'a, str>,
        event_type: String,
    },
}

impl Verdict<'_> {
    /// The event id the answer names.
    pub fn event_id(&self) -> &str {
        match self {
            Verdict::Valid(valid) => &valid.event_id,
            Verdict::Unwanted { event_id, .. } => event_id,
        }
    }
}

/// A payload that passed validation.
#[derive(Debug)]
pub struct Validated<'a> {
    pub event_id: Cow<'a, str>,
    /// `i_*` or `a_*`.
    pub kind: EventKind,
    /// What guards and reports are about: the incident (`incident.incident_id`, or for an
    /// alert `alert.incident.incident_id`); for an alert that belongs to no incident yet,
    /// `alert:` and its `alert_id`.
    pub incident_id: Cow<'a, str>,
    /// `event_time`, in milliseconds since the epoch (0 if negative).
    pub event_time_ms: u64,
    /// Whether `person` is set: someone pressed the button (an automation sends none).
    pub person: bool,
    /// Unknown enum values seen: (index into [`DRIFT_FIELDS`], the value).
    pub drift: Vec<(usize, String)>,
}

/// Why a payload was refused; the text is the user-facing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadError {
    /// The body is not JSON (`400 invalid_json`).
    NotJson(String),
    /// JSON that breaks the payload contract (`400 invalid_payload`); starts with the path.
    Invalid(String),
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadError::NotJson(why) => write!(f, "not JSON: {why}"),
            PayloadError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for PayloadError {}

/// Validates `body` for an action taking `events`; see the module documentation for the rules.
pub fn validate<'a>(
    body: &'a [u8],
    policy: DriftPolicy,
    events: &EventTypes,
) -> Result<Verdict<'a>, PayloadError> {
    // JSON text is UTF-8 (RFC 8259). Checked once for the whole body, strings need no check of
    // their own: serde_json's per-string `from_utf8` calls were 11 % of validation (perf).
    let text = std::str::from_utf8(body).map_err(|e| not_utf8(body, e.valid_up_to()))?;
    match walk(text, policy, events, None) {
        Walked::Done(verdict) => verdict,
        // The walk met a problem before it met `event_type`: the problem may be in the object
        // of the other kind (an unknown field once the type is known), or the type may be one
        // the action does not take. A second, plain parse says which; only failures pay it.
        Walked::TypeUnknown(error) => {
            let envelope = envelope(body)?;
            let Some(event_type) = envelope.event_type else {
                return Err(error);
            };
            match EventKind::of(&event_type) {
                None => Err(error),
                Some(_) if !events.wants(&event_type) => {
                    ignored(event_type, envelope.event_id.map(Cow::Owned))
                }
                Some(kind) => match walk(text, policy, events, Some(kind)) {
                    Walked::Done(verdict) => verdict,
                    Walked::TypeUnknown(error) => Err(error),
                },
            }
        }
    }
}

/// How one walk over the body ended.
enum Walked<'a> {
    Done(Result<Verdict<'a>, PayloadError>),
    /// Refused before `event_type` was read: the answer may change once it is known.
    TypeUnknown(PayloadError),
}

/// One streaming pass; `kind` is the payload's kind when an earlier pass learnt it.
fn walk<'a>(
    text: &'a str,
    policy: DriftPolicy,
    events: &EventTypes,
    kind: Option<EventKind>,
) -> Walked<'a> {
    let mut ctx = Ctx {
        policy,
        events,
        kind,
        event_type: None,
        event_time: None,
        kept: Default::default(),
        present: [false; 2],
        person: false,
        drift: Vec::new(),
        problem: None,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let seed = Seed {
        kind: &ENVELOPE,
        need: Need::Required,
        ctx: &mut ctx,
    };
    let parsed = seed.deserialize(&mut de).and_then(|()| de.end());
    let body = text.as_bytes();
    if let Some(event_type) = ctx.event_type.take().filter(|_| ctx.problem.is_none()) {
        if !events.wants(&event_type) {
            let [top, legacy, ..] = std::mem::take(&mut ctx.kept);
            return Walked::Done(unwanted(body, event_type.into_owned(), top.or(legacy)));
        }
    }
    if let Err(e) = parsed {
        let error = match ctx.problem.take() {
            // A schema problem was found before the end; if the text is not even JSON further
            // on, "not JSON" is the truer answer.
            Some(problem) => match serde_json::from_slice::<IgnoredAny>(body) {
                Ok(_) => PayloadError::Invalid(problem.to_string()),
                Err(syntax) => return Walked::Done(Err(PayloadError::NotJson(syntax.to_string()))),
            },
            None => return Walked::Done(Err(PayloadError::NotJson(e.to_string()))),
        };
        return match ctx.kind {
            None => Walked::TypeUnknown(error),
            Some(_) => Walked::Done(Err(error)),
        };
    }
    Walked::Done(ctx.finish().map(Verdict::Valid))
}

/// The answer for a type the action does not take: the body must still be JSON, and have an
/// event id (that the walk may not have reached) for the answer to name.
fn unwanted<'a>(
    body: &'a [u8],
    event_type: String,
    event_id: Option<Cow<'a, str>>,
) -> Result<Verdict<'a>, PayloadError> {
    let event_id = match event_id {
        Some(id) => {
            serde_json::from_slice::<IgnoredAny>(body)
                .map_err(|e| PayloadError::NotJson(e.to_string()))?;
            Some(id)
        }
        None => envelope(body)?.event_id.map(Cow::Owned),
    };
    ignored(event_type, event_id)
}

fn ignored(
    event_type: String,
    event_id: Option<Cow<'_, str>>,
) -> Result<Verdict<'_>, PayloadError> {
    Ok(Verdict::Unwanted {
        event_id: checked_event_id(event_id)?,
        event_type,
    })
}

/// The envelope of a body, read plainly: the slow path, for refusals and unwanted types.
/// It streams over the top level (and `incident`, for a legacy event id), skipping every value
/// but three strings, so a large body costs a scan, not a tree. The first of a repeated key
/// counts, as in the walk.
#[derive(Default)]
struct Envelope {
    event_type: Option<String>,
    event_id: Option<String>,
}

fn envelope(body: &[u8]) -> Result<Envelope, PayloadError> {
    /// The scalars a visitor below has nothing to take from: "not there".
    macro_rules! other_values {
        () => {
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Default::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Default::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Default::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Default::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Default::default())
            }
        };
    }
    struct Top;
    struct Inner;
    /// A non-empty string, or nothing for any other value.
    struct Text;

    impl<'de> DeserializeSeed<'de> for Text {
        type Value = Option<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Text {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<String>, E> {
            Ok((!v.is_empty()).then(|| v.to_string()))
        }
        other_values!();
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<String>, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }

    /// `incident`: its `event_id`, if it is an object that has one.
    impl<'de> DeserializeSeed<'de> for Inner {
        type Value = Option<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Inner {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
            let mut event_id = None;
            while let Some(key) = map.next_key_seed(KeySeed)? {
                if key == "event_id" && event_id.is_none() {
                    event_id = map.next_value_seed(Text)?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(event_id)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Option<String>, A::Error> {
            Text.visit_seq(seq)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        other_values!();
    }

    impl<'de> DeserializeSeed<'de> for Top {
        type Value = Envelope;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Envelope, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Top {
        type Value = Envelope;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
            let (mut envelope, mut legacy, mut seen) = (Envelope::default(), None, [false; 3]);
            while let Some(key) = map.next_key_seed(KeySeed)? {
                let (slot, first) = match key.as_ref() {
                    "event_type" => (0, !seen[0]),
                    "event_id" => (1, !seen[1]),
                    "incident" => (2, !seen[2]),
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                };
                seen[slot] = true;
                match slot {
                    _ if !first => drop(map.next_value::<IgnoredAny>()?),
                    0 => envelope.event_type = map.next_value_seed(Text)?,
                    1 => envelope.event_id = map.next_value_seed(Text)?,
                    _ => legacy = map.next_value_seed(Inner)?,
                }
            }
            envelope.event_id = envelope.event_id.or(legacy);
            Ok(envelope)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Envelope, A::Error> {
            Text.visit_seq(seq).map(|_| Envelope::default())
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Envelope, E> {
            Ok(Envelope::default())
        }
        other_values!();
    }

    let mut de = serde_json::Deserializer::from_slice(body);
    Top.deserialize(&mut de)
        .and_then(|envelope| de.end().map(|()| envelope))
        .map_err(|e| PayloadError::NotJson(e.to_string()))
}

/// The event id, if there is one and it fits a dedup key.
fn checked_event_id(event_id: Option<Cow<'_, str>>) -> Result<Cow<'_, str>, PayloadError> {
    let event_id = event_id.ok_or_else(|| {
        PayloadError::Invalid(
            "event_id: required, a non-empty string (at event_id, or incident.event_id)".into(),
        )
    })?;
    if event_id.len() > MAX_EVENT_ID {
        return Err(PayloadError::Invalid(format!(
            "event_id: longer than {MAX_EVENT_ID} bytes"
        )));
    }
    Ok(event_id)
}

/// Where the body stops being UTF-8, as serde_json would say it ("line 3 column 14").
fn not_utf8(body: &[u8], valid_up_to: usize) -> PayloadError {
    let before = &body[..valid_up_to];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = valid_up_to
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |at| at + 1)
        + 1;
    PayloadError::NotJson(format!("invalid UTF-8 at line {line} column {column}"))
}

// ---- The schema -------------------------------------------------------------------------

#[derive(Debug)]
enum Kind {
    Str,
    Int,
    /// `event_time`, an integer kept (milliseconds since the epoch).
    EventTime,
    Bool,
    Any,
    /// `i_…` or `a_…`, one the action takes.
    EventType,
    /// An id kept for the answer, guards and reports.
    Kept(Id),
    /// `person`, an object whose presence is kept.
    Person,
    /// A documented enum: index into DRIFT_FIELDS, known values.
    Enum(usize, &'static [&'static str]),
    /// Fields sorted by name (a test checks it): found through [`FieldIndex`], or by binary
    /// search for a table the index was not built for.
    Object(&'static [Field]),
    /// The object an event type names (`incident` for `i_*`, `alert` for `a_*`): required
    /// when the payload is of its kind, an unknown field when it is of the other. `base` holds
    /// more optional fields, looked up after `fields`.
    Subject {
        kind: EventKind,
        fields: &'static [Field],
        base: &'static [Field],
    },
    Array(&'static Kind),
    Map(&'static Kind),
}

/// The ids a payload names, each kept in its slot of [`Ctx::kept`]. An empty one counts as
/// absent; a required one must not be empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Id {
    /// `event_id`.
    Event = 0,
    /// `incident.event_id`, of older pushes.
    LegacyEvent = 1,
    /// `incident.incident_id`.
    Incident = 2,
    /// `alert.alert_id`.
    Alert = 3,
    /// `alert.incident.incident_id`: the incident an alert belongs to, once it does.
    AlertIncident = 4,
}

const IDS: usize = 5;

impl Id {
    fn is_event(self) -> bool {
        matches!(self, Id::Event | Id::LegacyEvent)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Required,
    Optional,
}

#[derive(Debug)]
struct Field {
    name: &'static str,
    kind: Kind,
    need: Need,
}

const fn req(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        need: Need::Required,
    }
}

const fn opt(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        need: Need::Optional,
    }
}

const SEVERITY: &[&str] = &["Critical", "Warning", "Info"];
const STATUS: &[&str] = &["Critical", "Warning", "Info", "Ok"];

static ENVELOPE: Kind = Kind::Object(&[
    opt(
        "alert",
        Kind::Subject {
            kind: EventKind::Alert,
            fields: ALERT_EVENT,
            base: ALERT,
        },
    ),
    opt("event_detail", Kind::Object(EVENT_DETAIL)),
    opt("event_id", Kind::Kept(Id::Event)),
    req("event_time", Kind::EventTime),
    req("event_type", Kind::EventType),
    opt(
        "incident",
        Kind::Subject {
            kind: EventKind::Incident,
            fields: INCIDENT,
            base: &[],
        },
    ),
    opt("person", Kind::Person),
]);

const EVENT_DETAIL: &[Field] = &[
    opt("integration_id", Kind::Int),
    opt("integration_name", Kind::Str),
];

const PERSON: &[Field] = &[
    opt("email", Kind::Str),
    opt("person_id", Kind::Int),
    opt("person_name", Kind::Str),
];

const RESPONDER: &[Field] = &[
    opt("acknowledged_at", Kind::Int),
    opt("assigned_at", Kind::Int),
    opt("email", Kind::Str),
    opt("person_id", Kind::Int),
    opt("person_name", Kind::Str),
];

const IMAGE: &[Field] = &[
    opt("alt", Kind::Str),
    opt("href", Kind::Str),
    opt("src", Kind::Str),
];

const ASSIGNED_TO: &[Field] = &[
    opt("assigned_at", Kind::Int),
    opt("effective_person_ids", Kind::Array(&Kind::Int)),
    opt("escalate_rule_id", Kind::Str),
    opt("escalate_rule_name", Kind::Str),
    opt("id", Kind::Str),
    opt("layer_idx", Kind::Int),
    opt("person_ids", Kind::Array(&Kind::Int)),
    opt(
        "type",
        Kind::Enum(5, &["assign", "reassign", "escalate", "reopen"]),
    ),
];

const ALERT: &[Field] = &[
    opt("account_id", Kind::Int),
    opt("alert_id", Kind::Str),
    opt("alert_key", Kind::Str),
    opt("alert_severity", Kind::Enum(6, SEVERITY)),
    opt("alert_status", Kind::Enum(7, STATUS)),
    opt("channel_id", Kind::Int),
    opt("channel_name", Kind::Str),
    opt("channel_status", Kind::Str),
    opt("close_time", Kind::Int),
    opt("created_at", Kind::Int),
    opt("data_source_id", Kind::Int),
    opt("data_source_name", Kind::Str),
    opt("data_source_ref_id", Kind::Str),
    opt("description", Kind::Str),
    opt("end_time", Kind::Int),
    opt("event_cnt", Kind::Int),
    opt("ever_muted", Kind::Bool),
    opt("images", Kind::Array(&Kind::Object(IMAGE))),
    opt("integration_id", Kind::Int),
    opt("integration_name", Kind::Str),
    opt("integration_type", Kind::Str),
    opt("labels", Kind::Map(&Kind::Str)),
    opt("last_time", Kind::Int),
    opt("progress", Kind::Enum(8, &["Triggered", "Closed"])),
    opt("responder_email", Kind::Str),
    opt("responder_name", Kind::Str),
    opt("start_time", Kind::Int),
    opt("title", Kind::Str),
    opt("title_rule", Kind::Str),
    opt("updated_at", Kind::Int),
];

/// The `alert` of an alert webhook: what differs from an incident's `alerts[]` item, which
/// is its base ([`ALERT`]).
const ALERT_EVENT: &[Field] = &[
    req("alert_id", Kind::Kept(Id::Alert)),
    req("alert_severity", Kind::Enum(10, SEVERITY)),
    req("alert_status", Kind::Enum(11, STATUS)),
    opt("incident", Kind::Object(ALERT_INCIDENT)),
    opt("progress", Kind::Enum(12, &["Triggered", "Closed"])),
    req("title", Kind::Str),
];

const ALERT_INCIDENT: &[Field] = &[
    opt("incident_id", Kind::Kept(Id::AlertIncident)),
    opt("title", Kind::Str),
];

const INCIDENT: &[Field] = &[
    opt("account_id", Kind::Int),
    opt("account_name", Kind::Str),
    opt("ack_time", Kind::Int),
    opt("active_alert_cnt", Kind::Int),
    opt("alert_cnt", Kind::Int),
    opt("alerts", Kind::Array(&Kind::Object(ALERT))),
    opt("assigned_to", Kind::Object(ASSIGNED_TO)),
    opt("channel_id", Kind::Int),
    opt("channel_name", Kind::Str),
    opt(
        "channel_status",
        Kind::Enum(3, &["enabled", "disabled", ""]),
    ),
    opt("close_time", Kind::Int),
    opt("closer", Kind::Object(PERSON)),
    opt("closer_id", Kind::Int),
    opt("created_at", Kind::Int),
    opt("creator", Kind::Object(PERSON)),
    opt("creator_id", Kind::Int),
    opt("data_source_id", Kind::Int),
    opt("data_source_ids", Kind::Array(&Kind::Int)),
    opt("dedup_key", Kind::Str),
    opt("description", Kind::Str),
    opt("detail_url", Kind::Str),
    opt("end_time", Kind::Int),
    opt("event_id", Kind::Kept(Id::LegacyEvent)),
    opt("fields", Kind::Map(&Kind::Any)),
    opt("group_method", Kind::Enum(4, &["n", "p", "i"])),
    opt("has_unfinished_work_item", Kind::Bool),
    opt("images", Kind::Array(&Kind::Object(IMAGE))),
    opt("impact", Kind::Str),
    req("incident_id", Kind::Kept(Id::Incident)),
    req("incident_severity", Kind::Enum(0, SEVERITY)),
    req("incident_status", Kind::Enum(1, STATUS)),
    opt("integration_id", Kind::Int),
    opt("integration_ids", Kind::Array(&Kind::Int)),
    opt("integration_types", Kind::Array(&Kind::Str)),
    opt("labels", Kind::Map(&Kind::Str)),
    opt("last_time", Kind::Int),
    opt("links", Kind::Any),
    opt("num", Kind::Str),
    opt("owner_id", Kind::Int),
    opt("post_mortem_id", Kind::Str),
    req(
        "progress",
        Kind::Enum(2, &["Triggered", "Processing", "Closed"]),
    ),
    opt("resolution", Kind::Str),
    opt("responders", Kind::Array(&Kind::Object(RESPONDER))),
    opt("root_cause", Kind::Str),
    opt("silence_url", Kind::Str),
    opt("snoozed_before", Kind::Int),
    opt("start_time", Kind::Int),
    opt("team_id", Kind::Int),
    req("title", Kind::Str),
    opt("updated_at", Kind::Int),
];

impl Kind {
    fn expected(&self) -> &'static str {
        match self {
            Kind::Str | Kind::Enum(..) => "a string",
            Kind::Kept(_) => "a non-empty string",
            Kind::Int | Kind::EventTime => "an integer",
            Kind::Bool => "a boolean",
            Kind::Any => "any value",
            Kind::EventType => "an event type such as \"i_custom\"",
            Kind::Object(_) | Kind::Subject { .. } | Kind::Map(_) | Kind::Person => "an object",
            Kind::Array(_) => "an array",
        }
    }
}

// ---- Field lookup ------------------------------------------------------------------------

/// A hash index of one object's fields. Binary search by name was half of validation's time
/// (memcmp per probe, ≈ 6 probes for each of the ≈ 120 keys of a full payload; perf on
/// `examples/validate_probe`); a hashed slot and one comparison is a fraction of that.
#[derive(Debug)]
struct FieldIndex {
    /// Field position + 1 in each slot, 0 for none; open addressing, linear probing.
    slots: Vec<u8>,
    mask: usize,
}

/// The index of every object reached from the envelope, by the address of its field table.
/// The top-level `person` (`Kind::Person`) names the `PERSON` constant, which may sit at
/// another address than the copy in the tree: it finds no index and takes the binary search,
/// two probes in three fields.
static FIELD_INDEXES: std::sync::LazyLock<Vec<(usize, FieldIndex)>> =
    std::sync::LazyLock::new(|| {
        let mut indexes = Vec::new();
        index_tables(&ENVELOPE, &mut indexes);
        indexes
    });

fn index_tables(kind: &Kind, indexes: &mut Vec<(usize, FieldIndex)>) {
    match kind {
        Kind::Object(fields) => {
            let address = fields.as_ptr() as usize;
            if indexes.iter().all(|(a, _)| *a != address) {
                indexes.push((address, FieldIndex::new(fields)));
                for field in *fields {
                    index_tables(&field.kind, indexes);
                }
            }
        }
        Kind::Subject { fields, base, .. } => {
            for table in [*fields, *base].into_iter().filter(|t| !t.is_empty()) {
                index_tables(&Kind::Object(table), indexes);
            }
        }
        Kind::Array(item) | Kind::Map(item) => index_tables(item, indexes),
        _ => {}
    }
}

impl FieldIndex {
    fn new(fields: &[Field]) -> FieldIndex {
        // u8 slots and the u64 `seen` mask both hold for the schema's tables (a test checks).
        let size = (fields.len() * 2).next_power_of_two().max(16);
        let mask = size - 1;
        let mut slots = vec![0u8; size];
        for (at, field) in fields.iter().enumerate() {
            let mut slot = hash(field.name) & mask;
            while slots[slot] != 0 {
                slot = (slot + 1) & mask;
            }
            slots[slot] = (at + 1) as u8;
        }
        FieldIndex { slots, mask }
    }

    /// The index of `fields`, if it is one of the schema's tables.
    fn of(fields: &'static [Field]) -> Option<&'static FieldIndex> {
        let address = fields.as_ptr() as usize;
        FIELD_INDEXES
            .iter()
            .find(|(a, _)| *a == address)
            .map(|(_, index)| index)
    }

    fn find(&self, fields: &[Field], key: &str) -> Option<usize> {
        let mut slot = hash(key) & self.mask;
        loop {
            let at = usize::from(self.slots[slot]).checked_sub(1)?;
            if fields[at].name == key {
                return Some(at);
            }
            slot = (slot + 1) & self.mask;
        }
    }
}

/// Marks field `at` as seen in `mask`; whether it had been seen already.
fn mark(mask: &mut u64, at: usize) -> bool {
    let before = *mask & 1 << at != 0;
    *mask |= 1 << at;
    before
}

/// The position of `key` in `fields`, through `index` when the table has one.
fn find(fields: &[Field], index: Option<&FieldIndex>, key: &str) -> Option<usize> {
    match index {
        Some(index) => index.find(fields, key),
        None => fields.binary_search_by(|f| f.name.cmp(key)).ok(),
    }
}

/// FNV-1a: the keys are short, and a sender choosing colliding keys only makes its own
/// payload's lookups probe a few more slots of a table that is at most half full.
fn hash(key: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as usize
}

// ---- The validator ----------------------------------------------------------------------

/// A path segment, collected innermost first while an error unwinds, so that the success path
/// never pays for path bookkeeping.
#[derive(Debug)]
enum Segment {
    Field(&'static str),
    Key(String),
    Index(usize),
}

#[derive(Debug)]
struct Problem {
    reversed_path: Vec<Segment>,
    message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reversed_path.is_empty() {
            f.write_str("payload")?;
        }
        for (i, segment) in self.reversed_path.iter().rev().enumerate() {
            match segment {
                Segment::Field(name) if i == 0 => f.write_str(name)?,
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        write!(f, ": {}", self.message)
    }
}

struct Ctx<'r, 'de> {
    policy: DriftPolicy,
    events: &'r EventTypes,
    /// The payload's kind, once `event_type` is read (or an earlier pass read it).
    kind: Option<EventKind>,
    /// `event_type`, as read.
    event_type: Option<Cow<'de, str>>,
    event_time: Option<i64>,
    /// The ids kept, by [`Id`].
    kept: [Option<Cow<'de, str>>; IDS],
    /// Whether `incident` / `alert` (by [`EventKind`]) was set and passed.
    present: [bool; 2],
    person: bool,
    drift: Vec<(usize, String)>,
    problem: Option<Problem>,
}

impl<'de> Ctx<'_, 'de> {
    /// What a walk that reached the end learnt, if the payload had all it needs.
    fn finish(self) -> Result<Validated<'de>, PayloadError> {
        // `event_type` is a required field: a walk that ended well has read it.
        let kind = self.kind.unwrap_or(EventKind::Incident);
        if !self.present[kind as usize] {
            return Err(PayloadError::Invalid(format!(
                "{}: required field is missing",
                kind.object()
            )));
        }
        let [top, legacy, incident, alert, alert_incident] = self.kept;
        // With the type last, the other kind's object was walked before it was known to be
        // an unknown field: what it drifted does not count.
        let mut drift = self.drift;
        drift.retain(|(field, _)| drift_owner(*field).is_none_or(|owner| owner == kind));
        let event_id = checked_event_id(top.or(legacy))?;
        let incident_id = match kind {
            EventKind::Incident => incident,
            EventKind::Alert => {
                alert_incident.or_else(|| alert.map(|id| Cow::Owned(format!("alert:{id}"))))
            }
        };
        Ok(Validated {
            event_id,
            kind,
            // Required of the kind's object: a payload that passed has it.
            incident_id: incident_id.unwrap_or_default(),
            event_time_ms: self
                .event_time
                .and_then(|ms| u64::try_from(ms).ok())
                .unwrap_or(0),
            person: self.person,
            drift,
        })
    }

    /// Reads `event_type`; an error with no problem recorded stops the walk for a type the
    /// action does not take.
    fn event_type<E: de::Error>(&mut self, value: Cow<'de, str>) -> Result<(), E> {
        let Some(kind) = EventKind::of(&value) else {
            return Err(self.fail(format!(
                "expected a Flashduty event type (i_… for an incident, a_… for an alert), \
                 got {value:?}"
            )));
        };
        self.kind = Some(kind);
        let wanted = self.events.wants(&value);
        // A type the operator named is known to them; one taken through a wildcard that
        // Flashduty does not document is news.
        let documented = kind.is_documented(&value) || self.events.names(&value);
        self.event_type = Some(value);
        if !wanted {
            return Err(E::custom("event type not taken"));
        }
        if !documented {
            let value = self.event_type.as_deref().unwrap_or_default().to_string();
            self.drifted(EVENT_TYPE_DRIFT, value, || {
                let known: Vec<&str> = match kind {
                    EventKind::Incident => INCIDENT_TYPES.to_vec(),
                    EventKind::Alert => ALERT_TYPES.to_vec(),
                };
                known.join(", ")
            })?;
        }
        Ok(())
    }

    /// An undocumented value: counted, or refused under `schema_drift: reject`.
    fn drifted<E: de::Error>(
        &mut self,
        field: usize,
        value: String,
        known: impl FnOnce() -> String,
    ) -> Result<(), E> {
        match self.policy {
            DriftPolicy::Accept => {
                self.drift.push((field, value));
                Ok(())
            }
            DriftPolicy::Reject => Err(self.fail(format!(
                "unknown value {value:?} (expected one of {})",
                known()
            ))),
        }
    }
}

impl Ctx<'_, '_> {
    fn fail<E: de::Error>(&mut self, message: String) -> E {
        self.problem = Some(Problem {
            reversed_path: Vec::new(),
            message,
        });
        E::custom("invalid payload")
    }

    fn wrap<T, E>(
        &mut self,
        result: Result<T, E>,
        segment: impl FnOnce() -> Segment,
    ) -> Result<T, E> {
        if result.is_err() {
            if let Some(problem) = &mut self.problem {
                problem.reversed_path.push(segment());
            }
        }
        result
    }
}

struct Seed<'c, 'r, 'de> {
    kind: &'static Kind,
    need: Need,
    ctx: &'c mut Ctx<'r, 'de>,
}

impl<'de> DeserializeSeed<'de> for Seed<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(mut self, deserializer: D) -> Result<(), D::Error> {
        match self.kind {
            Kind::Any => {
                deserializer.deserialize_ignored_any(IgnoredAny)?;
                return Ok(());
            }
            Kind::Subject { kind, .. } => match self.ctx.kind {
                // The object of the other kind: an unknown field.
                Some(known) if known != *kind => {
                    deserializer.deserialize_ignored_any(IgnoredAny)?;
                    return Ok(());
                }
                Some(_) => self.need = Need::Required,
                // The type comes later: checked now, required (or not) at the end.
                None => self.need = Need::Optional,
            },
            _ => {}
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Seed<'_, '_, 'de> {
    /// A value of the wrong JSON type: fine only as an "unset" optional value.
    fn mismatch<E: de::Error>(self, got: &str, is_empty: bool) -> Result<(), E> {
        if self.need == Need::Optional && is_empty {
            return Ok(());
        }
        let expected = self.kind.expected();
        Err(self.ctx.fail(format!("expected {expected}, got {got}")))
    }

    fn string<E: de::Error>(self, value: Cow<'de, str>) -> Result<(), E> {
        match self.kind {
            Kind::Str => Ok(()),
            Kind::Kept(_) if value.is_empty() => match self.need {
                Need::Required => Err(self.ctx.fail("must not be empty".into())),
                Need::Optional => Ok(()),
            },
            // An event id's length is checked at the end, wherever it came from.
            Kind::Kept(id) if !id.is_event() && value.len() > MAX_INCIDENT_ID => Err(self
                .ctx
                .fail(format!("longer than {MAX_INCIDENT_ID} bytes"))),
            Kind::Kept(id) => {
                self.ctx.kept[*id as usize] = Some(value);
                Ok(())
            }
            Kind::EventType => self.ctx.event_type(value),
            Kind::Enum(field, known) => {
                if known.contains(&value.as_ref())
                    || (value.is_empty() && self.need == Need::Optional)
                {
                    return Ok(());
                }
                self.ctx
                    .drifted(*field, value.into_owned(), || known.join(", "))
            }
            _ => {
                let empty = value.is_empty();
                self.mismatch("a string", empty)
            }
        }
    }

    /// An integer: `value` when it fits an i64.
    fn integer<E: de::Error>(self, value: Option<i64>, is_zero: bool) -> Result<(), E> {
        match (self.kind, value) {
            (Kind::Int, Some(_)) => Ok(()),
            (Kind::EventTime, Some(ms)) => {
                self.ctx.event_time = Some(ms);
                Ok(())
            }
            (Kind::Int | Kind::EventTime, None) => {
                Err(self.ctx.fail("integer out of range".into()))
            }
            _ => self.mismatch("a number", is_zero),
        }
    }
}

impl<'de> Visitor<'de> for Seed<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.expected())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        match self.kind {
            Kind::Bool => Ok(()),
            _ => self.mismatch("a boolean", false),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.integer(Some(v), v == 0)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.integer(i64::try_from(v).ok(), v == 0)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        match self.kind {
            Kind::Int | Kind::EventTime => {
                Err(self.ctx.fail(format!("expected an integer, got {v}")))
            }
            _ => self.mismatch("a number", v == 0.0),
        }
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        self.string(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        // Only strings with escapes arrive here; copy just the one we keep.
        let value = match self.kind {
            Kind::Kept(_) | Kind::Enum(..) | Kind::EventType => Cow::Owned(v.to_string()),
            _ => Cow::Borrowed(if v.is_empty() { "" } else { "x" }),
        };
        self.string(value)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.mismatch("null", true)
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Kind::Array(item) = self.kind else {
            let empty = seq.next_element::<IgnoredAny>()?.is_none();
            if !empty {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
            }
            return self.mismatch("an array", empty);
        };
        let mut index = 0;
        loop {
            let seed = Seed {
                kind: item,
                need: Need::Required,
                ctx: self.ctx,
            };
            let next = seq.next_element_seed(seed);
            match self.ctx.wrap(next, || Segment::Index(index))? {
                Some(()) => index += 1,
                None => return Ok(()),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (fields, base, subject) = match self.kind {
            Kind::Object(fields) => (Some(*fields), &[][..], None),
            Kind::Person => (Some(PERSON), &[][..], None),
            Kind::Subject { kind, fields, base } => (Some(*fields), *base, Some(*kind)),
            _ => (None, &[][..], None),
        };
        match (self.kind, fields) {
            (_, Some(fields)) => {
                let (mut seen, mut base_seen) = (0u64, 0u64);
                let mut entries = 0usize;
                let index = FieldIndex::of(fields);
                let base_index = if base.is_empty() {
                    None
                } else {
                    FieldIndex::of(base)
                };
                while let Some(key) = map.next_key_seed(KeySeed)? {
                    entries += 1;
                    // A documented field given twice would mean one thing here and another
                    // to a parser that keeps the last (the projection, the upstream).
                    let (field, twice) = match find(fields, index, &key) {
                        Some(at) => (&fields[at], mark(&mut seen, at)),
                        None => match find(base, base_index, &key) {
                            Some(at) => (&base[at], mark(&mut base_seen, at)),
                            None => {
                                map.next_value::<IgnoredAny>()?;
                                continue;
                            }
                        },
                    };
                    if twice {
                        let error = self.ctx.fail("given twice".into());
                        return self.ctx.wrap(Err(error), || Segment::Field(field.name));
                    }
                    let seed = Seed {
                        kind: &field.kind,
                        need: field.need,
                        ctx: self.ctx,
                    };
                    let result = map.next_value_seed(seed);
                    self.ctx.wrap(result, || Segment::Field(field.name))?;
                }
                if entries == 0 && self.need == Need::Optional {
                    return Ok(());
                }
                for (at, field) in fields.iter().enumerate() {
                    if field.need == Need::Required && seen & (1 << at) == 0 {
                        let error = self.ctx.fail("required field is missing".into());
                        return self.ctx.wrap(Err(error), || Segment::Field(field.name));
                    }
                }
                if matches!(self.kind, Kind::Person) {
                    self.ctx.person = true;
                }
                if let Some(kind) = subject {
                    self.ctx.present[kind as usize] = true;
                }
                Ok(())
            }
            (Kind::Map(value), None) => {
                while let Some(key) = map.next_key_seed(KeySeed)? {
                    let seed = Seed {
                        kind: value,
                        need: Need::Required,
                        ctx: self.ctx,
                    };
                    let result = map.next_value_seed(seed);
                    self.ctx.wrap(result, || Segment::Key(key.into_owned()))?;
                }
                Ok(())
            }
            _ => {
                let empty = map.next_key::<IgnoredAny>()?.is_none();
                if !empty {
                    map.next_value::<IgnoredAny>()?;
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                }
                self.mismatch("an object", empty)
            }
        }
    }
}

/// Reads an object key, borrowing it from the input when it has no escapes.
pub(crate) struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
}

#[cfg(test)]
mod tests;
