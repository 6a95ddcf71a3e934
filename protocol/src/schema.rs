//! Document schemas: typed Rust structs mapped onto automerge with autosurgeon.
//!
//! Every document starts from a *genesis* change that is byte-for-byte the same
//! on every node (fixed actor, time 0, fixed content), so all replicas of a
//! document share one root and the containers (`concerns`, `roster`) it
//! creates. Without it, two writers that each created `concerns` would produce
//! two conflicting maps and one would hide the other's entries.
//!
//! Growing the schema: a new optional field is an `Option` marked
//! `#[autosurgeon(missing = "Default::default")]`, so that an absent key
//! reads as `None` (without the mark autosurgeon refuses the item); older
//! nodes ignore keys they do not know. A new top-level
//! container is added by a further deterministic change in the same way as
//! genesis, and `schema_version` is raised. Writes are targeted (`put` one
//! concern, one roster entry), never a rewrite of the whole document.

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{ActorId, Automerge, AutomergeError, ObjType, ROOT, ReadDoc};
use autosurgeon::{Hydrate, Reconcile};
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{DocId, QuarterSlug};

/// The schema version written by this build into every document it creates.
pub const SCHEMA_VERSION: u64 = 1;

/// Longest accepted concern description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 4_000;

/// Why a document could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("document is malformed: {0}")]
    Hydrate(Box<autosurgeon::HydrateError>),
    #[error("cannot write document: {0}")]
    Reconcile(Box<autosurgeon::ReconcileError>),
    #[error("automerge: {0}")]
    Automerge(Box<AutomergeError>),
    #[error("document has no '{0}' container; it was not created from iq's genesis")]
    MissingContainer(&'static str),
    /// What a user sent is not acceptable as it is.
    #[error("{0}")]
    Invalid(String),
    /// The item named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The action is refused by a rule of the workflow (past a deadline, over a frame).
    #[error("{0}")]
    Refused(String),
}

impl From<autosurgeon::HydrateError> for SchemaError {
    fn from(e: autosurgeon::HydrateError) -> Self {
        Self::Hydrate(Box::new(e))
    }
}

impl From<autosurgeon::ReconcileError> for SchemaError {
    fn from(e: autosurgeon::ReconcileError) -> Self {
        Self::Reconcile(Box::new(e))
    }
}

impl From<AutomergeError> for SchemaError {
    fn from(e: AutomergeError) -> Self {
        Self::Automerge(Box::new(e))
    }
}

/// A concern (Anliegen): something a citizen or the quarter office reported.
///
/// Its optional fields are written only when present (see the `Reconcile`
/// impl below), and an absent key reads as `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Hydrate)]
pub struct Concern {
    pub id: String,
    /// Set when the quarter hid it from public views (kept, not deleted).
    #[autosurgeon(missing = "Default::default")]
    pub hidden: Option<Hidden>,
    /// Service code, e.g. `road-damage`.
    pub category: String,
    pub description: String,
    #[autosurgeon(missing = "Default::default")]
    pub lat: Option<f64>,
    #[autosurgeon(missing = "Default::default")]
    pub long: Option<f64>,
    /// `open` or `closed`.
    pub status: String,
    /// Unix time in milliseconds.
    pub created_ms: i64,
    /// Where, in words (alternative or addition to lat/long).
    #[autosurgeon(missing = "Default::default")]
    pub address: Option<String>,
    /// A photo or document (http or https URL).
    #[autosurgeon(missing = "Default::default")]
    pub media_url: Option<String>,
    /// `received`, `in_process`, `processed` or `rejected`.
    #[autosurgeon(missing = "Default::default")]
    pub detailed_status: Option<String>,
    /// What was done, oldest first.
    #[autosurgeon(missing = "Default::default")]
    pub notes: Option<Vec<StatusNote>>,
    /// Last status change (unix ms).
    #[autosurgeon(missing = "Default::default")]
    pub updated_ms: Option<i64>,
    /// The department responsible.
    #[autosurgeon(missing = "Default::default")]
    pub agency: Option<String>,
    /// Pseudonymous reference to the reporter; name and contact stay in the
    /// quarter node's local-only store, never in a replicated document.
    #[autosurgeon(missing = "Default::default")]
    pub reporter_ref: Option<String>,
    /// Answers to the service's questions (Open311 `attribute[code]`):
    /// attribute code → values (one, or several for a multi-value list).
    #[autosurgeon(missing = "Default::default")]
    pub attributes: Option<BTreeMap<String, Vec<String>>>,
}

/// Written as a map like the derived impl, but an absent optional field
/// is left out rather than written as null: a new concern is then 10
/// operations instead of 17 (its map and nine keys, with a position),
/// which every node pays for in memory and when it loads the document
/// (a third less load time, `docs/benchmarks.md`). A field
/// that becomes absent is deleted; a null written by an earlier version
/// stays, as it reads as `None` too.
impl Reconcile for Concern {
    type Key<'a> = autosurgeon::reconcile::NoKey;

    fn reconcile<R: autosurgeon::Reconciler>(&self, mut reconciler: R) -> Result<(), R::Error> {
        use autosurgeon::reconcile::MapReconciler;
        let mut m = reconciler.map()?;
        m.put("id", &self.id)?;
        put_present(&mut m, "hidden", &self.hidden)?;
        m.put("category", &self.category)?;
        m.put("description", &self.description)?;
        put_present(&mut m, "lat", &self.lat)?;
        put_present(&mut m, "long", &self.long)?;
        m.put("status", &self.status)?;
        m.put("created_ms", self.created_ms)?;
        put_present(&mut m, "address", &self.address)?;
        put_present(&mut m, "media_url", &self.media_url)?;
        put_present(&mut m, "detailed_status", &self.detailed_status)?;
        put_present(&mut m, "notes", &self.notes)?;
        put_present(&mut m, "updated_ms", &self.updated_ms)?;
        put_present(&mut m, "agency", &self.agency)?;
        put_present(&mut m, "reporter_ref", &self.reporter_ref)?;
        put_present(&mut m, "attributes", &self.attributes)
    }
}

/// Puts `value` under `key` if it is present; if not, deletes what the map
/// holds there unless that already reads as absent (nothing, or null).
fn put_present<M: autosurgeon::reconcile::MapReconciler, T: Reconcile>(
    m: &mut M,
    key: &str,
    value: &Option<T>,
) -> Result<(), M::Error> {
    match value {
        Some(v) => m.put(key, v),
        None => match m.entry(key) {
            None => Ok(()),
            Some(automerge::Value::Scalar(s)) if s.is_null() => Ok(()),
            Some(_) => m.delete(key),
        },
    }
}

/// One entry of a concern's status history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct StatusNote {
    pub at_ms: i64,
    /// The detailed status set with this note.
    pub status: String,
    pub note: String,
}

/// The detailed statuses of a concern, in their usual order.
pub const DETAILED_STATUSES: &[&str] = &["received", "in_process", "processed", "rejected"];

impl Concern {
    /// A new open concern with a fresh random id.
    pub fn new(
        category: String,
        description: String,
        lat: Option<f64>,
        long: Option<f64>,
        created_ms: i64,
    ) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            category,
            description,
            lat,
            long,
            status: "open".into(),
            created_ms,
            hidden: None,
            address: None,
            media_url: None,
            detailed_status: Some("received".into()),
            // Created with the concern, so two writers adding notes later
            // append to the same list instead of each creating one.
            notes: Some(Vec::new()),
            updated_ms: None,
            agency: None,
            reporter_ref: None,
            attributes: None,
        }
    }

    /// Moves the concern to a detailed status with a note; `processed` and
    /// `rejected` close it, the others (re)open it.
    pub fn set_status(&mut self, status: &str, note: &str, now_ms: i64) -> Result<(), SchemaError> {
        if !DETAILED_STATUSES.contains(&status) {
            return Err(SchemaError::Invalid(format!(
                "status '{status}' is not one of {}",
                DETAILED_STATUSES.join(", ")
            )));
        }
        if note.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(SchemaError::Invalid(
                "note is longer than 4000 characters".into(),
            ));
        }
        self.detailed_status = Some(status.into());
        self.status = if matches!(status, "processed" | "rejected") {
            "closed"
        } else {
            "open"
        }
        .into();
        self.notes.get_or_insert_with(Vec::new).push(StatusNote {
            at_ms: now_ms,
            status: status.into(),
            note: note.into(),
        });
        self.updated_ms = Some(now_ms);
        Ok(())
    }

    /// Checks what a user typed before it is written.
    pub fn validate(&self) -> Result<(), SchemaError> {
        let bad = |m: &str| Err(SchemaError::Invalid(m.to_owned()));
        if self.category.trim().is_empty() {
            return bad("category is empty: give a service code such as 'road-damage'");
        }
        if self.category.len() > 64
            || !self
                .category
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad("category must be a service code of up to 64 letters, digits, '-' or '_'");
        }
        if self.description.trim().is_empty() {
            return bad("description is empty: say what the concern is about");
        }
        if self.description.chars().count() > MAX_DESCRIPTION_CHARS {
            return bad("description is longer than 4000 characters");
        }
        match (self.lat, self.long) {
            (None, None) => {}
            (Some(lat), Some(long)) => {
                if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&long) {
                    return bad("lat must be within -90..90 and long within -180..180");
                }
            }
            _ => return bad("give both lat and long, or neither"),
        }
        if self.status != "open" && self.status != "closed" {
            return bad("status must be 'open' or 'closed'");
        }
        if let Some(a) = &self.address
            && (a.trim().is_empty() || a.chars().count() > 400)
        {
            return bad("address must be 1 to 400 characters");
        }
        if let Some(u) = &self.media_url
            && (u.len() > 2000
                || !(u.starts_with("https://") || u.starts_with("http://"))
                || u.contains(char::is_whitespace))
        {
            return bad("media URL must be an http(s) URL of at most 2000 characters");
        }
        if let Some(a) = &self.agency
            && (a.trim().is_empty() || a.chars().count() > 200)
        {
            return bad("agency must be 1 to 200 characters");
        }
        if let Some(attributes) = &self.attributes {
            if attributes.len() > 50 {
                return bad("a concern has at most 50 attributes");
            }
            for (code, values) in attributes {
                if code.is_empty() || code.len() > 64 || values.len() > 50 {
                    return bad("attribute codes are 1 to 64 bytes with at most 50 values each");
                }
                if values
                    .iter()
                    .any(|v| v.chars().count() > MAX_DESCRIPTION_CHARS)
                {
                    return bad("an attribute value is longer than 4000 characters");
                }
            }
        }
        Ok(())
    }
}

/// Moderation mark: the item stays, but public views leave it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Hidden {
    pub reason: String,
    pub at_ms: i64,
}

impl Item for Concern {
    const CONTAINER: &'static str = "concerns";
    fn item_key(&self) -> String {
        self.id.clone()
    }
}

/// Where one of a quarter's writer nodes listens, written by that node into
/// its quarter's document so the other quarters can reach it directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct NodeAddr {
    /// PeerId (base58).
    pub peer: String,
    /// libp2p multiaddr without `/p2p/`.
    pub addr: String,
    /// The iq version the node runs (absent in entries of older nodes).
    #[serde(default)]
    pub version: Option<String>,
}

impl Item for NodeAddr {
    const CONTAINER: &'static str = "nodes";
    fn item_key(&self) -> String {
        self.peer.clone()
    }
}

/// A writer key removed from a quarter, with the changes it made that the
/// centre held when it was removed: those stay acceptable everywhere, so
/// nodes that had not received them yet can still sync the document; any
/// other change by the key is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct RetiredKey {
    pub quarter: String,
    /// PeerId (base58).
    pub peer: String,
    /// Change hashes (hex).
    pub changes: Vec<String>,
    pub at_ms: i64,
}

impl Item for RetiredKey {
    const CONTAINER: &'static str = "retired";
    fn item_key(&self) -> String {
        format!("{}/{}", self.quarter, self.peer)
    }
}

/// A quarter on the federation roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct RosterEntry {
    pub name: String,
    /// PeerIds (base58) of the nodes that may write this quarter's document.
    pub writers: Vec<String>,
    /// Where the centre dials writer nodes, by PeerId (libp2p multiaddr
    /// without `/p2p/`), as the city's operators registered them: a centre
    /// that has not held the quarter's document yet (a new or rebuilt one)
    /// reaches the office at once instead of waiting for its redial.
    /// Absent in entries of older versions and where none was given.
    #[autosurgeon(missing = "Default::default")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addrs: Option<BTreeMap<String, String>>,
}

/// The actor of the genesis change: the same on every node, never a real key.
/// Formats unix milliseconds as RFC 3339 (UTC, `millis` digits or seconds).
/// Never panics: times a peer wrote outside years 1970–9999 print as the
/// raw number, since these values come from other nodes' documents.
pub fn format_time(ms: i64, millis: bool) -> String {
    use std::fmt::Write as _;
    let Ok(unsigned) = u64::try_from(ms) else {
        return ms.to_string();
    };
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unsigned);
    let mut out = String::new();
    let written = if millis {
        write!(out, "{}", humantime::format_rfc3339_millis(t))
    } else {
        write!(out, "{}", humantime::format_rfc3339_seconds(t))
    };
    match written {
        Ok(()) => out,
        Err(_) => ms.to_string(),
    }
}

/// Formats cents as euros with two decimals (`-0.05`, `1500.00`).
pub fn format_cents(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// The maps every city document has from genesis on (top-down items).
pub const CITY_CONTAINERS: &[&str] = &[
    "roster",
    "retired",
    "directives",
    "consultations",
    "frames",
    "responses",
];

/// The maps every quarter document has from genesis on (bottom-up items).
pub const QUARTER_CONTAINERS: &[&str] = &[
    "concerns",
    "proposals",
    "answers",
    "allocations",
    "acks",
    "escalations",
    "nodes",
];

/// A typed item stored in one map of a document, keyed by [`Item::item_key`].
pub trait Item: Reconcile + Hydrate + Clone {
    /// The map it lives in.
    const CONTAINER: &'static str;
    /// Its key in that map.
    fn item_key(&self) -> String;
}

/// Every item of type `T` in `doc`; malformed entries are skipped and logged.
pub fn items<T: Item>(doc: &Automerge) -> Result<Vec<T>, SchemaError> {
    let obj = container(doc, T::CONTAINER)?;
    let mut out = Vec::new();
    for entry in doc.map_range(&obj, ..) {
        match autosurgeon::hydrate_prop::<_, T, _, _>(doc, &obj, entry.key.as_ref()) {
            Ok(item) => out.push(item),
            Err(e) => {
                tracing::warn!(container = T::CONTAINER, key = %entry.key, error = %e, "skipping malformed item")
            }
        }
    }
    Ok(out)
}

/// The item of type `T` under `key`, if any.
pub fn item<T: Item>(doc: &Automerge, key: &str) -> Result<Option<T>, SchemaError> {
    let obj = container(doc, T::CONTAINER)?;
    if doc.get(&obj, key)?.is_none() {
        return Ok(None);
    }
    Ok(Some(autosurgeon::hydrate_prop::<_, T, _, _>(
        doc, &obj, key,
    )?))
}

/// The item of type `T` under `key`, read inside a write transaction.
pub fn item_in<T: Item>(tx: &Transaction<'_>, key: &str) -> Result<Option<T>, SchemaError> {
    let obj = container(tx, T::CONTAINER)?;
    if tx.get(&obj, key)?.is_none() {
        return Ok(None);
    }
    Ok(Some(autosurgeon::hydrate_prop::<_, T, _, _>(
        tx, &obj, key,
    )?))
}

/// Writes one item (only the fields that differ are changed).
pub fn put_item<T: Item>(tx: &mut Transaction<'_>, item: &T) -> Result<(), SchemaError> {
    let obj = container(tx, T::CONTAINER)?;
    autosurgeon::reconcile_prop(tx, &obj, item.item_key().as_str(), item)?;
    Ok(())
}

/// Writes `item` and hands it back: the write step of most actions.
pub fn insert<T: Item>(item: T, tx: &mut Transaction<'_>) -> Result<T, SchemaError> {
    put_item(tx, &item)?;
    Ok(item)
}

/// Values written concurrently to `field` of the item under `key`, when two
/// writers disagreed: automerge keeps one deterministically and the others as
/// conflicts. Empty when there is no conflict.
pub fn conflicts<T: Item>(doc: &Automerge, key: &str, field: &str) -> Vec<String> {
    let Ok(obj) = container(doc, T::CONTAINER) else {
        return Vec::new();
    };
    let Ok(Some((_, item))) = doc.get(&obj, key) else {
        return Vec::new();
    };
    let values = doc.get_all(&item, field).unwrap_or_default();
    if values.len() < 2 {
        return Vec::new();
    }
    values
        .into_iter()
        .map(|(v, _)| match v {
            automerge::Value::Scalar(s) => match s.as_ref() {
                automerge::ScalarValue::Str(t) => t.to_string(),
                other => other.to_string(),
            },
            automerge::Value::Object(t) => format!("<{t:?}>"),
        })
        .collect()
}

fn genesis_actor(doc: &DocId) -> ActorId {
    ActorId::from(format!("iq-genesis:{doc}").as_bytes())
}

/// The document as every node first creates it. Deterministic: every call for
/// the same id yields the same change hash.
pub fn genesis(doc: &DocId) -> Automerge {
    let mut am = Automerge::new().with_actor(genesis_actor(doc));
    let result = am.transact_with::<_, _, AutomergeError, _>(
        |_| CommitOptions::default().with_time(0),
        |tx| {
            tx.put(ROOT, "schema_version", SCHEMA_VERSION)?;
            match doc {
                DocId::City => {
                    tx.put(ROOT, "kind", "city")?;
                    for name in CITY_CONTAINERS {
                        tx.put_object(ROOT, *name, ObjType::Map)?;
                    }
                }
                DocId::Quarter(slug) => {
                    tx.put(ROOT, "kind", "quarter")?;
                    tx.put(ROOT, "quarter", slug.as_str())?;
                    for name in QUARTER_CONTAINERS {
                        tx.put_object(ROOT, *name, ObjType::Map)?;
                    }
                }
            }
            Ok(())
        },
    );
    // The genesis transaction puts constants into an empty document; it
    // cannot fail, and if it ever did the caller still gets an empty doc.
    if let Err(e) = result {
        tracing::error!(%doc, error = ?e.error, "genesis failed");
    }
    am
}

fn container(doc: &impl ReadDoc, name: &'static str) -> Result<automerge::ObjId, SchemaError> {
    match doc.get(ROOT, name)? {
        Some((automerge::Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(SchemaError::MissingContainer(name)),
    }
}

/// All concerns of a quarter document, newest first.
pub fn concerns(doc: &Automerge) -> Result<Vec<Concern>, SchemaError> {
    let mut out = items::<Concern>(doc)?;
    out.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Number of concerns in a quarter document.
pub fn concern_count(doc: &Automerge) -> usize {
    container(doc, "concerns")
        .map(|obj| doc.length(&obj))
        .unwrap_or(0)
}

/// Writes one concern into a quarter document.
pub fn put_concern(doc: &mut Transaction<'_>, concern: &Concern) -> Result<(), SchemaError> {
    concern.validate()?;
    put_item(doc, concern)
}

/// The roster in a city document, by slug.
pub fn roster(doc: &Automerge) -> Result<Vec<(QuarterSlug, RosterEntry)>, SchemaError> {
    let obj = container(doc, "roster")?;
    let mut out = Vec::new();
    for item in doc.map_range(&obj, ..) {
        let Ok(slug) = QuarterSlug::new(&item.key) else {
            tracing::warn!(key = %item.key, "skipping roster entry with invalid slug");
            continue;
        };
        match autosurgeon::hydrate_prop::<_, RosterEntry, _, _>(doc, &obj, item.key.as_ref()) {
            Ok(e) => out.push((slug, e)),
            Err(e) => {
                tracing::warn!(key = %item.key, error = %e, "skipping malformed roster entry")
            }
        }
    }
    Ok(out)
}

/// One roster entry, read inside a write transaction.
pub fn roster_entry(
    tx: &Transaction<'_>,
    slug: &QuarterSlug,
) -> Result<Option<RosterEntry>, SchemaError> {
    let obj = container(tx, "roster")?;
    if tx.get(&obj, slug.as_str())?.is_none() {
        return Ok(None);
    }
    Ok(Some(autosurgeon::hydrate_prop::<_, RosterEntry, _, _>(
        tx,
        &obj,
        slug.as_str(),
    )?))
}

/// Adds or replaces a roster entry in the city document.
pub fn put_roster_entry(
    doc: &mut Transaction<'_>,
    slug: &QuarterSlug,
    entry: &RosterEntry,
) -> Result<(), SchemaError> {
    if entry.name.trim().is_empty() {
        return Err(SchemaError::Invalid("quarter name is empty".into()));
    }
    let obj = container(doc, "roster")?;
    autosurgeon::reconcile_prop(doc, &obj, slug.as_str(), entry)?;
    Ok(())
}

/// The schema version recorded in a document, if any.
pub fn schema_version(doc: &Automerge) -> Option<u64> {
    match doc.get(ROOT, "schema_version").ok()?? {
        (automerge::Value::Scalar(s), _) => match s.as_ref() {
            automerge::ScalarValue::Uint(v) => Some(*v),
            automerge::ScalarValue::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slug(s: &str) -> QuarterSlug {
        QuarterSlug::new(s).expect("slug")
    }

    fn concern(id: &str) -> Concern {
        Concern {
            id: id.into(),
            ..Concern::new(
                "road-damage".into(),
                "pothole".into(),
                Some(51.05),
                Some(13.74),
                1,
            )
        }
    }

    #[test]
    fn times_and_amounts_from_peers_format_without_panicking() {
        assert_eq!(format_time(1_000, false), "1970-01-01T00:00:01Z");
        assert_eq!(format_time(1_500, true), "1970-01-01T00:00:01.500Z");
        // Year 10000 and beyond, and negative times: printed raw.
        assert_eq!(format_time(i64::MAX, true), i64::MAX.to_string());
        assert_eq!(format_time(-5, false), "-5");
        assert_eq!(format_cents(-5), "-0.05");
        assert_eq!(format_cents(150_005), "1500.05");
        assert_eq!(format_cents(i64::MIN), "-92233720368547758.08");
    }

    #[test]
    fn genesis_is_deterministic() {
        let q = DocId::quarter(&slug("prohlis"));
        assert_eq!(genesis(&q).get_heads(), genesis(&q).get_heads());
        assert_ne!(genesis(&q).get_heads(), genesis(&DocId::City).get_heads());
        assert_eq!(schema_version(&genesis(&q)), Some(SCHEMA_VERSION));
    }

    #[test]
    fn service_attributes_round_trip_and_older_concerns_read_without_them() {
        let q = DocId::quarter(&slug("prohlis"));
        let mut doc = genesis(&q).with_actor(ActorId::random());
        let mut with = concern("with");
        with.attributes = Some(BTreeMap::from([
            ("size".to_string(), vec!["large".to_string()]),
            ("kind".to_string(), vec!["crack".into(), "hole".into()]),
        ]));
        doc.transact::<_, _, SchemaError>(|tx| {
            put_concern(tx, &with)?;
            put_concern(tx, &concern("without"))
        })
        .expect("write");
        let read = concerns(&doc).expect("read");
        assert_eq!(read, vec![with, concern("without")]);
        let mut too_many = concern("x");
        too_many.attributes = Some((0..51).map(|i| (i.to_string(), vec![])).collect());
        assert!(too_many.validate().is_err());
    }

    /// The keys of concern `id` as stored in `doc`.
    fn stored_keys(doc: &Automerge, id: &str) -> Vec<String> {
        let concerns = container(doc, "concerns").expect("concerns");
        let (_, obj) = doc.get(&concerns, id).expect("get").expect("stored");
        doc.keys(&obj).collect()
    }

    #[test]
    fn a_concern_is_stored_without_its_absent_fields_and_reads_back_whole() {
        let q = DocId::quarter(&slug("prohlis"));
        let mut doc = genesis(&q).with_actor(ActorId::random());
        let mut c = Concern::new(
            "road-damage".into(),
            "pothole".into(),
            Some(51.05),
            Some(13.74),
            1,
        );
        c.id = "c".into();
        doc.transact::<_, _, SchemaError>(|tx| put_concern(tx, &c))
            .expect("write");
        assert_eq!(
            stored_keys(&doc, "c"),
            [
                "category",
                "created_ms",
                "description",
                "detailed_status",
                "id",
                "lat",
                "long",
                "notes",
                "status"
            ]
        );
        // The concern's map, its nine keys and nothing else.
        let change = doc.get_last_local_change().expect("written");
        assert_eq!(change.len(), 10);
        assert_eq!(concerns(&doc).expect("read"), vec![c.clone()]);

        // A field set and then cleared is deleted again.
        c.agency = Some("Tiefbauamt".into());
        doc.transact::<_, _, SchemaError>(|tx| put_concern(tx, &c))
            .expect("set");
        assert!(stored_keys(&doc, "c").contains(&"agency".to_string()));
        c.agency = None;
        doc.transact::<_, _, SchemaError>(|tx| put_concern(tx, &c))
            .expect("clear");
        assert!(!stored_keys(&doc, "c").contains(&"agency".to_string()));
        assert_eq!(concerns(&doc).expect("read"), vec![c]);
    }

    #[test]
    fn a_concern_with_the_nulls_of_earlier_versions_reads_and_stays_as_it_is() {
        let q = DocId::quarter(&slug("prohlis"));
        let mut doc = genesis(&q).with_actor(ActorId::random());
        let c = concern("old");
        // As nodes before this version wrote it: every absent field a null.
        doc.transact::<_, _, AutomergeError>(|tx| {
            let concerns = container(tx, "concerns").expect("concerns");
            let m = tx.put_object(&concerns, "old", ObjType::Map)?;
            tx.put(&m, "id", "old")?;
            tx.put(&m, "category", c.category.as_str())?;
            tx.put(&m, "description", c.description.as_str())?;
            tx.put(&m, "lat", 51.05)?;
            tx.put(&m, "long", 13.74)?;
            tx.put(&m, "status", "open")?;
            tx.put(&m, "created_ms", c.created_ms)?;
            tx.put(&m, "detailed_status", "received")?;
            tx.put_object(&m, "notes", ObjType::List)?;
            for key in [
                "hidden",
                "address",
                "media_url",
                "updated_ms",
                "agency",
                "reporter_ref",
                "attributes",
            ] {
                tx.put(&m, key, automerge::ScalarValue::Null)?;
            }
            Ok(())
        })
        .expect("write as before");
        assert_eq!(concerns(&doc).expect("read"), vec![c.clone()]);
        let heads = doc.get_heads();
        doc.transact::<_, _, SchemaError>(|tx| put_concern(tx, &c))
            .expect("write unchanged");
        assert_eq!(doc.get_heads(), heads, "nothing to write");
    }

    #[test]
    fn two_writers_from_genesis_merge_without_hiding_entries() {
        let q = DocId::quarter(&slug("prohlis"));
        let mut a = genesis(&q).with_actor(ActorId::random());
        let mut b = genesis(&q).with_actor(ActorId::random());
        a.transact::<_, _, SchemaError>(|tx| put_concern(tx, &concern("a")))
            .expect("write a");
        b.transact::<_, _, SchemaError>(|tx| put_concern(tx, &concern("b")))
            .expect("write b");
        a.merge(&mut b).expect("merge");
        let ids: Vec<_> = concerns(&a)
            .expect("read")
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn concurrent_edits_by_two_writers_keep_both_values_visible() {
        let q = DocId::quarter(&slug("prohlis"));
        let mut office = genesis(&q).with_actor(ActorId::random());
        office
            .transact::<_, _, SchemaError>(|tx| put_concern(tx, &concern("c")))
            .expect("write");
        let mut laptop = office.fork().with_actor(ActorId::random());
        let mut closed = concern("c");
        closed.status = "closed".into();
        laptop
            .transact::<_, _, SchemaError>(|tx| put_concern(tx, &closed))
            .expect("close offline");
        let mut edited = concern("c");
        edited.description = "pothole, now larger".into();
        office
            .transact::<_, _, SchemaError>(|tx| put_concern(tx, &edited))
            .expect("edit offline");
        let mut other = laptop.fork();
        other.merge(&mut office).expect("merge");
        office.merge(&mut laptop).expect("merge");
        // Both writers' edits survive and the result is the same on both sides.
        let a = concerns(&office).expect("read");
        assert_eq!(a, concerns(&other).expect("read"));
        assert_eq!(
            (a[0].status.as_str(), a[0].description.as_str()),
            ("closed", "pothole, now larger")
        );
        let mut laptop2 = genesis(&q).with_actor(ActorId::random());
        laptop2.merge(&mut office).expect("sync");
        // Two writers set the same field differently: both values are listed.
        let mut x = laptop2.fork().with_actor(ActorId::random());
        let mut y = laptop2.fork().with_actor(ActorId::random());
        let mut c1 = a[0].clone();
        c1.category = "lighting".into();
        let mut c2 = a[0].clone();
        c2.category = "graffiti".into();
        x.transact::<_, _, SchemaError>(|tx| put_concern(tx, &c1))
            .expect("x");
        y.transact::<_, _, SchemaError>(|tx| put_concern(tx, &c2))
            .expect("y");
        x.merge(&mut y).expect("merge");
        let mut values = conflicts::<Concern>(&x, "c", "category");
        values.sort();
        assert_eq!(values, vec!["graffiti".to_string(), "lighting".to_string()]);
        assert!(conflicts::<Concern>(&x, "c", "status").is_empty());
    }

    #[test]
    fn fields_written_by_a_newer_schema_survive_an_older_writer() {
        let q = DocId::quarter(&slug("prohlis"));
        let mut doc = genesis(&q).with_actor(ActorId::random());
        doc.transact::<_, _, SchemaError>(|tx| put_concern(tx, &concern("c")))
            .expect("write");
        // A newer node adds a field this build does not know.
        doc.transact::<_, _, AutomergeError>(|tx| {
            let concerns = container(tx, "concerns").map_err(|_| AutomergeError::Fail)?;
            let (_, c) = tx.get(&concerns, "c")?.ok_or(AutomergeError::Fail)?;
            tx.put(&c, "future_field", "Straßen- und Tiefbauamt")?;
            Ok(())
        })
        .expect("newer field");
        // This build reads the concern, changes it, and writes it back.
        let mut c = item::<Concern>(&doc, "c").expect("read").expect("present");
        c.status = "closed".into();
        doc.transact::<_, _, SchemaError>(|tx| put_concern(tx, &c))
            .expect("rewrite");
        let concerns = container(&doc, "concerns").expect("container");
        let (_, obj) = doc.get(&concerns, "c").expect("get").expect("concern");
        let agency = doc
            .get(&obj, "future_field")
            .expect("get")
            .map(|(v, _)| v.to_string());
        assert_eq!(agency.as_deref(), Some("\"Straßen- und Tiefbauamt\""));
        assert_eq!(
            item::<Concern>(&doc, "c").expect("read").map(|c| c.status),
            Some("closed".into())
        );
    }

    #[test]
    fn invalid_concerns_are_refused() {
        let mut c = concern("x");
        c.description = "  ".into();
        assert!(c.validate().is_err());
        let mut c = concern("x");
        c.lat = None;
        assert!(c.validate().is_err());
        let mut c = concern("x");
        c.description = "x".repeat(MAX_DESCRIPTION_CHARS + 1);
        assert!(c.validate().is_err());
    }

    #[test]
    fn roster_round_trips() {
        let mut city = genesis(&DocId::City).with_actor(ActorId::random());
        let mut entry = RosterEntry {
            name: "Prohlis".into(),
            writers: vec!["12D3Koo".into()],
            addrs: None,
        };
        city.transact::<_, _, SchemaError>(|tx| put_roster_entry(tx, &slug("prohlis"), &entry))
            .expect("write");
        assert_eq!(
            roster(&city).expect("read"),
            vec![(slug("prohlis"), entry.clone())]
        );
        entry.addrs = Some(BTreeMap::from([(
            "12D3Koo".to_string(),
            "/ip4/10.1.2.3/tcp/4001".to_string(),
        )]));
        city.transact::<_, _, SchemaError>(|tx| put_roster_entry(tx, &slug("prohlis"), &entry))
            .expect("write");
        assert_eq!(roster(&city).expect("read"), vec![(slug("prohlis"), entry)]);
    }

    #[test]
    fn a_roster_entry_of_an_older_version_reads_without_addresses() {
        // As versions before `addrs` wrote it: a map of `name` and `writers`.
        let mut city = genesis(&DocId::City).with_actor(ActorId::random());
        city.transact::<_, _, AutomergeError>(|tx| {
            let roster = match tx.get(ROOT, "roster")? {
                Some((_, id)) => id,
                None => panic!("genesis has a roster"),
            };
            let entry = tx.put_object(&roster, "prohlis", ObjType::Map)?;
            tx.put(&entry, "name", "Prohlis")?;
            let writers = tx.put_object(&entry, "writers", ObjType::List)?;
            tx.insert(&writers, 0, "12D3Koo")?;
            Ok(())
        })
        .expect("write");
        let read = roster(&city).expect("read");
        assert_eq!(
            read,
            vec![(
                slug("prohlis"),
                RosterEntry {
                    name: "Prohlis".into(),
                    writers: vec!["12D3Koo".into()],
                    addrs: None,
                }
            )]
        );
    }
}
