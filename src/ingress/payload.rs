//! Validates a Flashduty custom-action payload (PAYLOAD.md) in one streaming pass.
//!
//! The schema is a static table below. The validator walks the JSON once with serde, checking
//! each documented field's type as it goes and skipping unknown fields without building them,
//! so a payload is never materialised as a tree on the request path. The raw bytes are what we
//! store and forward, which keeps unknown fields byte-for-byte.
//!
//! Rules (forward compatible by design):
//! - Required: `event_id` (top level, or `incident.event_id` in older pushes), `event_type`
//!   (= `i_custom`), `event_time`, `incident`, and in it `incident_id`, `title`,
//!   `incident_severity`, `incident_status`, `progress`. Every other documented field is
//!   type-checked when present; absent, `null`, `0`, `""`, `{}` and `[]` all mean "not set".
//! - Unknown fields are accepted anywhere.
//! - An unknown value of a documented enum is schema drift: reported to the caller (counted in
//!   `actiongate_schema_drift_total`), or rejected when the config says `schema_drift: reject`.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::config::DriftPolicy;

/// Longest accepted `event_id`, in bytes: it is a dedup key, so it must stay small.
pub const MAX_EVENT_ID: usize = 256;
/// Longest accepted `incident.incident_id`, in bytes: a guard key holds it (Flashduty's are 24
/// characters).
pub const MAX_INCIDENT_ID: usize = 256;

/// The documented enum fields, as `field` labels of `actiongate_schema_drift_total`.
pub const DRIFT_FIELDS: [&str; 9] = [
    "incident.incident_severity",
    "incident.incident_status",
    "incident.progress",
    "incident.channel_status",
    "incident.group_method",
    "incident.assigned_to.type",
    "incident.alerts.alert_severity",
    "incident.alerts.alert_status",
    "incident.alerts.progress",
];

/// A payload that passed validation.
#[derive(Debug)]
pub struct Validated<'a> {
    pub event_id: Cow<'a, str>,
    /// `incident.incident_id`: what guards and reports are about.
    pub incident_id: Cow<'a, str>,
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

/// Validates `body`; see the module documentation for the rules.
pub fn validate(body: &[u8], policy: DriftPolicy) -> Result<Validated<'_>, PayloadError> {
    let mut ctx = Ctx {
        policy,
        event_id: [None, None],
        incident_id: None,
        person: false,
        drift: Vec::new(),
        problem: None,
    };
    // JSON text is UTF-8 (RFC 8259). Checked once for the whole body, strings need no check of
    // their own: serde_json's per-string `from_utf8` calls were 11 % of validation (perf).
    let text = std::str::from_utf8(body).map_err(|e| not_utf8(body, e.valid_up_to()))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let seed = Seed {
        kind: &ENVELOPE,
        need: Need::Required,
        ctx: &mut ctx,
    };
    let parsed = seed.deserialize(&mut de).and_then(|()| de.end());
    if let Err(e) = parsed {
        return Err(match ctx.problem.take() {
            // A schema problem was found before the end; if the text is not even JSON further
            // on, "not JSON" is the truer answer.
            Some(problem) => match serde_json::from_slice::<IgnoredAny>(body) {
                Ok(_) => PayloadError::Invalid(problem.to_string()),
                Err(syntax) => PayloadError::NotJson(syntax.to_string()),
            },
            None => PayloadError::NotJson(e.to_string()),
        });
    }
    let [top, legacy] = ctx.event_id;
    let event_id = top.or(legacy).ok_or_else(|| {
        PayloadError::Invalid(
            "event_id: required, a non-empty string (at event_id, or incident.event_id)".into(),
        )
    })?;
    if event_id.len() > MAX_EVENT_ID {
        return Err(PayloadError::Invalid(format!(
            "event_id: longer than {MAX_EVENT_ID} bytes"
        )));
    }
    Ok(Validated {
        event_id,
        // Required by the schema: a payload that passed has it.
        incident_id: ctx.incident_id.unwrap_or_default(),
        person: ctx.person,
        drift: ctx.drift,
    })
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
    Bool,
    Any,
    /// Must be exactly `i_custom`.
    EventType,
    /// A dedup key: slot 0 is the top level, slot 1 the legacy `incident.event_id`.
    EventId(usize),
    /// `incident.incident_id`, kept: a required non-empty string.
    IncidentId,
    /// `person`, an object whose presence is kept.
    Person,
    /// A documented enum: index into DRIFT_FIELDS, known values.
    Enum(usize, &'static [&'static str]),
    /// Fields sorted by name (a test checks it): found through [`FieldIndex`], or by binary
    /// search for a table the index was not built for.
    Object(&'static [Field]),
    Array(&'static Kind),
    Map(&'static Kind),
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
    opt("event_detail", Kind::Object(EVENT_DETAIL)),
    opt("event_id", Kind::EventId(0)),
    req("event_time", Kind::Int),
    req("event_type", Kind::EventType),
    req("incident", Kind::Object(INCIDENT)),
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
    opt("event_id", Kind::EventId(1)),
    opt("fields", Kind::Map(&Kind::Any)),
    opt("group_method", Kind::Enum(4, &["n", "p", "i"])),
    opt("has_unfinished_work_item", Kind::Bool),
    opt("images", Kind::Array(&Kind::Object(IMAGE))),
    opt("impact", Kind::Str),
    req("incident_id", Kind::IncidentId),
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
            Kind::EventId(_) | Kind::IncidentId => "a non-empty string",
            Kind::Int => "an integer",
            Kind::Bool => "a boolean",
            Kind::Any => "any value",
            Kind::EventType => "\"i_custom\"",
            Kind::Object(_) | Kind::Map(_) | Kind::Person => "an object",
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

struct Ctx<'de> {
    policy: DriftPolicy,
    event_id: [Option<Cow<'de, str>>; 2],
    incident_id: Option<Cow<'de, str>>,
    person: bool,
    drift: Vec<(usize, String)>,
    problem: Option<Problem>,
}

impl Ctx<'_> {
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

struct Seed<'c, 'de> {
    kind: &'static Kind,
    need: Need,
    ctx: &'c mut Ctx<'de>,
}

impl<'de> DeserializeSeed<'de> for Seed<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if matches!(self.kind, Kind::Any) {
            deserializer.deserialize_ignored_any(IgnoredAny)?;
            return Ok(());
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Seed<'_, 'de> {
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
            Kind::IncidentId if value.is_empty() => Err(self.ctx.fail("must not be empty".into())),
            Kind::IncidentId if value.len() > MAX_INCIDENT_ID => Err(self
                .ctx
                .fail(format!("longer than {MAX_INCIDENT_ID} bytes"))),
            Kind::IncidentId => {
                self.ctx.incident_id = Some(value);
                Ok(())
            }
            Kind::EventType if value == "i_custom" => Ok(()),
            Kind::EventType => Err(self.ctx.fail(format!(
                "expected \"i_custom\" (a custom action), got {value:?}"
            ))),
            Kind::EventId(slot) => {
                if !value.is_empty() {
                    self.ctx.event_id[*slot] = Some(value);
                }
                Ok(())
            }
            Kind::Enum(field, known) => {
                if known.contains(&value.as_ref())
                    || (value.is_empty() && self.need == Need::Optional)
                {
                    return Ok(());
                }
                match self.ctx.policy {
                    DriftPolicy::Accept => {
                        self.ctx.drift.push((*field, value.into_owned()));
                        Ok(())
                    }
                    DriftPolicy::Reject => Err(self.ctx.fail(format!(
                        "unknown value {value:?} (expected one of {})",
                        known.join(", ")
                    ))),
                }
            }
            _ => {
                let empty = value.is_empty();
                self.mismatch("a string", empty)
            }
        }
    }

    fn integer<E: de::Error>(self, fits: bool, is_zero: bool) -> Result<(), E> {
        match self.kind {
            Kind::Int if fits => Ok(()),
            Kind::Int => Err(self.ctx.fail("integer out of range".into())),
            _ => self.mismatch("a number", is_zero),
        }
    }
}

impl<'de> Visitor<'de> for Seed<'_, 'de> {
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
        self.integer(true, v == 0)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.integer(i64::try_from(v).is_ok(), v == 0)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        match self.kind {
            Kind::Int => Err(self.ctx.fail(format!("expected an integer, got {v}"))),
            _ => self.mismatch("a number", v == 0.0),
        }
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        self.string(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        // Only strings with escapes arrive here; copy just the one we keep.
        let value = match self.kind {
            Kind::EventId(_) | Kind::IncidentId | Kind::Enum(..) | Kind::EventType => {
                Cow::Owned(v.to_string())
            }
            _ => Cow::Borrowed(if v.is_empty() { "" } else { "x" }),
        };
        self.string(value)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        match self.kind {
            Kind::EventId(_) => Ok(()),
            _ => self.mismatch("null", true),
        }
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
        let fields = match self.kind {
            Kind::Object(fields) => Some(*fields),
            Kind::Person => Some(PERSON),
            _ => None,
        };
        match (self.kind, fields) {
            (_, Some(fields)) => {
                let mut seen: u64 = 0;
                let mut entries = 0usize;
                let index = FieldIndex::of(fields);
                while let Some(key) = map.next_key_seed(KeySeed)? {
                    entries += 1;
                    let found = match index {
                        Some(index) => index.find(fields, &key),
                        None => fields.binary_search_by(|f| f.name.cmp(key.as_ref())).ok(),
                    };
                    let Some(at) = found else {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    };
                    let field = &fields[at];
                    seen |= 1 << at;
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
                if matches!(self.kind, Kind::Person) {
                    self.ctx.person = true;
                }
                for (at, field) in fields.iter().enumerate() {
                    if field.need == Need::Required && seen & (1 << at) == 0 {
                        let error = self.ctx.fail("required field is missing".into());
                        return self.ctx.wrap(Err(error), || Segment::Field(field.name));
                    }
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
