//! The local HTTP API (JSON under `/api/v1`): the routes every node serves
//! and those only a quarter node serves. Errors go through [`ApiError`],
//! which says what was wrong and what to do.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use iq_protocol::replicator::{Handle, Heads, Status, View, WriteError};
use iq_protocol::schema::{self, Concern, SchemaError};
use iq_protocol::{DocId, QuarterSlug};
use serde::{Deserialize, Serialize};

/// An error answer: HTTP status plus a one-line message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

/// The JSON body of every error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    pub fn unavailable() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the node is shutting down or has stopped; check its log and restart it"
                .into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Invalid(SchemaError::NotFound(m)) => ApiError::not_found(m),
            WriteError::Invalid(SchemaError::Refused(m)) => ApiError {
                status: StatusCode::CONFLICT,
                message: m,
            },
            WriteError::Invalid(e) => ApiError::bad_request(e.to_string()),
            WriteError::NotOwner(_) => ApiError {
                status: StatusCode::FORBIDDEN,
                message: e.to_string(),
            },
            WriteError::Stopped => ApiError::unavailable(),
        }
    }
}

impl From<iq_protocol::replicator::ReplicatorError> for ApiError {
    fn from(_: iq_protocol::replicator::ReplicatorError) -> Self {
        ApiError::unavailable()
    }
}

/// A concern as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConcernView {
    pub id: String,
    pub quarter: String,
    pub category: String,
    pub description: String,
    pub lat: Option<f64>,
    pub long: Option<f64>,
    pub status: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub created_ms: i64,
    /// `received`, `in_process`, `processed` or `rejected`.
    pub detailed_status: Option<String>,
    pub address: Option<String>,
    pub media_url: Option<String>,
    pub agency: Option<String>,
    /// RFC 3339, UTC, of the last status change.
    pub updated: Option<String>,
    /// The status history, including the centre's response if the concern
    /// was escalated.
    pub notes: Vec<NoteView>,
    /// Fields two writers set differently at the same time: every value
    /// written (the one shown above is automerge's deterministic pick).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub conflicts: std::collections::BTreeMap<String, Vec<String>>,
    /// Answers to the service's questions (Open311 attributes): code → values.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub attributes: std::collections::BTreeMap<String, Vec<String>>,
}

/// One status note as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NoteView {
    /// RFC 3339, UTC.
    pub at: String,
    pub at_ms: i64,
    pub status: String,
    pub note: String,
    /// `quarter` for the quarter's own notes, `centre` for its response.
    pub by: String,
}

impl ConcernView {
    pub fn new(quarter: &QuarterSlug, c: Concern) -> Self {
        let created = schema::format_time(c.created_ms, true);
        Self {
            id: c.id,
            quarter: quarter.to_string(),
            category: c.category,
            description: c.description,
            lat: c.lat,
            long: c.long,
            status: c.status,
            created,
            created_ms: c.created_ms,
            detailed_status: c.detailed_status,
            address: c.address,
            media_url: c.media_url,
            agency: c.agency,
            updated: c.updated_ms.map(|ms| schema::format_time(ms, true)),
            notes: c
                .notes
                .unwrap_or_default()
                .into_iter()
                .map(|n| NoteView {
                    at: schema::format_time(n.at_ms, true),
                    at_ms: n.at_ms,
                    status: n.status,
                    note: n.note,
                    by: "quarter".into(),
                })
                .collect(),
            conflicts: Default::default(),
            attributes: c.attributes.unwrap_or_default(),
        }
    }
}

/// Body of `POST /api/v1/concerns`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewConcern {
    pub category: String,
    pub description: String,
    #[serde(default)]
    pub lat: Option<f64>,
    #[serde(default)]
    pub long: Option<f64>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub media_url: Option<String>,
    #[serde(default)]
    pub agency: Option<String>,
    /// Who reported it: kept in this node's local-only store, never replicated.
    #[serde(default)]
    pub reporter: Option<Reporter>,
}

/// A reporter's personal data (local-only).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reporter {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    /// The app's device id (Open311 `device_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The citizen's account in the app (Open311 `account_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
}

impl Reporter {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.email.is_none()
            && self.phone.is_none()
            && self.device_id.is_none()
            && self.account_id.is_none()
    }

    pub fn validate(&self) -> Result<(), ApiError> {
        for (field, value) in [
            ("name", &self.name),
            ("email", &self.email),
            ("phone", &self.phone),
            ("device_id", &self.device_id),
            ("account_id", &self.account_id),
        ] {
            if value
                .as_ref()
                .is_some_and(|v| v.trim().is_empty() || v.chars().count() > 200)
            {
                return Err(ApiError::bad_request(format!(
                    "reporter {field} must be 1 to 200 characters"
                )));
            }
        }
        if self.email.as_ref().is_some_and(|e| !e.contains('@')) {
            return Err(ApiError::bad_request("reporter email has no '@'"));
        }
        Ok(())
    }
}

/// Body of `POST /api/v1/concerns/{id}/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewConcernStatus {
    /// `received`, `in_process`, `processed` or `rejected`.
    pub status: String,
    #[serde(default)]
    pub note: String,
}

/// Query of `GET /api/v1/concerns`.
#[derive(Debug, Deserialize)]
pub struct ConcernQuery {
    pub quarter: Option<String>,
}

/// Routes every node serves.
pub fn common_routes() -> Router<Handle> {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/heads", get(heads))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/concerns", get(list_concerns))
        .route("/api/v1/concerns/{id}", get(one_concern))
        .merge(crate::workflow_api::views())
        .merge(crate::ops::local_routes())
        .merge(crate::pages::common_assets())
}

/// Routes of a quarter node.
pub fn quarter_router(handle: Handle) -> Router {
    common_routes()
        .route("/api/v1/concerns", post(add_concern))
        .route("/api/v1/concerns/{id}/status", post(concern_status))
        .route("/api/v1/concerns/{id}/reporter", get(concern_reporter))
        .merge(crate::workflow_api::quarter_actions())
        .merge(crate::open311::keys::routes())
        .merge(crate::pages::quarter_page())
        .fallback(no_such_route)
        .with_state(handle)
}

/// Refuses requests whose `Host` is not this machine's API address, a
/// loopback address or `localhost`: the API has no login, and this stops a
/// web page in a local browser from reaching it through DNS rebinding.
pub async fn same_machine_only(
    State(api): State<std::net::SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let local = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip == api.ip());
    if local {
        next.run(request).await
    } else {
        ApiError {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "Host {host:?} is not this machine: the API answers only requests addressed to {api} or localhost"
            ),
        }
        .into_response()
    }
}

/// The centre's responses to a quarter's escalated items of `kind`
/// (`concern` or `proposal`), as status notes by item id.
pub fn response_notes(
    view: &View<'_>,
    slug: &QuarterSlug,
    quarter_doc: &automerge::Automerge,
    kind: &str,
) -> std::collections::BTreeMap<String, Vec<NoteView>> {
    let mut out: std::collections::BTreeMap<String, Vec<NoteView>> = Default::default();
    let Some(city) = view.city() else { return out };
    let escalations =
        schema::items::<iq_protocol::workflows::Escalation>(quarter_doc).unwrap_or_default();
    for e in escalations.into_iter().filter(|e| e.kind == kind) {
        let key = format!("{slug}/{}", e.id);
        if let Some(r) = schema::item::<iq_protocol::workflows::Response>(city, &key)
            .ok()
            .flatten()
        {
            let to = r
                .department
                .as_deref()
                .map(|d| format!(" to {d}"))
                .unwrap_or_default();
            out.entry(e.item_id).or_default().push(NoteView {
                at: schema::format_time(r.at_ms, true),
                at_ms: r.at_ms,
                status: format!("escalation {}{to}", r.decision),
                note: r.note,
                by: "centre".into(),
            });
        }
    }
    out
}

/// A fresh random reference (32 hex digits).
fn uuid_like() -> String {
    iq_protocol::workflows::new_id().replace('-', "")
}

/// `GET /api/v1/concerns/{id}`: one concern, with its notes and conflicts.
async fn one_concern(
    State(handle): State<Handle>,
    Path(id): Path<String>,
) -> Result<Json<ConcernView>, ApiError> {
    let found = handle
        .read(move |view| {
            concerns_in(&view, None)
                .into_iter()
                .find(|c| c.id == id)
                .ok_or(id)
        })
        .await?;
    found
        .map(Json)
        .map_err(|id| ApiError::not_found(format!("no concern '{id}' (or it is hidden)")))
}

/// `POST /api/v1/concerns/{id}/status`: the quarter moves its concern on.
async fn concern_status(
    State(handle): State<Handle>,
    Path(id): Path<String>,
    body: Result<Json<NewConcernStatus>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ConcernView>, ApiError> {
    let Json(body) =
        body.map_err(|e| ApiError::bad_request(format!("invalid status: {}", e.body_text())))?;
    let own = handle.own_doc().clone();
    let DocId::Quarter(slug) = own.clone() else {
        return Err(ApiError::bad_request("only quarter nodes change concerns"));
    };
    let now = now_ms();
    let concern = handle
        .write(own, move |tx| {
            let Some(mut c) = schema::item_in::<Concern>(tx, &id)? else {
                return Err(SchemaError::NotFound(format!(
                    "this quarter has no concern '{id}'"
                )));
            };
            c.set_status(body.status.trim(), &body.note, now)?;
            schema::insert(c, tx)
        })
        .await?;
    Ok(Json(ConcernView::new(&slug, concern)))
}

/// `GET /api/v1/concerns/{id}/reporter`: the reporter's personal data, from
/// this node's local-only store (quarter nodes; never replicated).
async fn concern_reporter(
    State(handle): State<Handle>,
    Path(id): Path<String>,
) -> Result<Json<Reporter>, ApiError> {
    let reference = handle
        .read(move |view| {
            let doc = view.engine.doc(view.own_doc)?;
            schema::item::<Concern>(doc, &id)
                .ok()
                .flatten()?
                .reporter_ref
        })
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "this quarter has no such concern, or it has no reporter on record here",
            )
        })?;
    let bytes = handle
        .local_get(format!("reporter/{reference}"))
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "the reporter's data is not on this node (it stays on the node that recorded it)",
            )
        })?;
    let reporter: Reporter = serde_json::from_slice(&bytes).map_err(|_| ApiError::unavailable())?;
    Ok(Json(reporter))
}

/// Answers requests no route matches, pointing to the description.
pub async fn no_such_route(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no such route {}: this node's routes are listed at /api/v1/openapi.json",
        uri.path()
    ))
}

async fn openapi(State(handle): State<Handle>) -> Result<Json<serde_json::Value>, ApiError> {
    let role = handle.role();
    Ok(Json(crate::openapi::document(role)))
}

async fn status(State(handle): State<Handle>) -> Result<Json<Status>, ApiError> {
    Ok(Json(handle.status().await?))
}

/// Longest a `GET /api/v1/heads?after=` waits for a change.
const MAX_HEADS_WAIT: Duration = Duration::from_secs(30);

/// Query of `GET /api/v1/heads`.
#[derive(Debug, Deserialize)]
pub struct HeadsQuery {
    /// Answer only once the documents changed after this version (or the wait is over).
    pub after: Option<u64>,
    /// How long to wait for that, in milliseconds (default and at most 30 000).
    pub wait_ms: Option<u64>,
}

/// `GET /api/v1/heads[?after=VERSION&wait_ms=MS]`: every document's heads;
/// with `after`, a long poll that answers as soon as something changed.
async fn heads(
    State(handle): State<Handle>,
    query: Result<Query<HeadsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Heads>, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::bad_request(format!(
            "invalid query ({}): use ?after=VERSION&wait_ms=MILLISECONDS with whole numbers",
            e.body_text()
        ))
    })?;
    if let Some(after) = query.after {
        let wait = query
            .wait_ms
            .map(Duration::from_millis)
            .unwrap_or(MAX_HEADS_WAIT)
            .min(MAX_HEADS_WAIT);
        handle.changed_after(after, wait).await;
    }
    Ok(Json(handle.heads().await?))
}

/// Concerns of every replicated quarter document, or of one quarter.
pub fn concerns_in(view: &View<'_>, quarter: Option<&QuarterSlug>) -> Vec<ConcernView> {
    let mut out = Vec::new();
    for (id, am) in view.engine.docs() {
        let DocId::Quarter(slug) = id else { continue };
        if !view.engine.accepts(id) || quarter.is_some_and(|q| q != slug) {
            continue;
        }
        let mut responses = response_notes(view, slug, am, "concern");
        match schema::concerns(am) {
            Ok(list) => out.extend(list.into_iter().filter(|c| c.hidden.is_none()).map(|c| {
                let mut view = ConcernView::new(slug, c);
                for field in ["category", "description", "status", "detailed_status"] {
                    let values = schema::conflicts::<Concern>(am, &view.id, field);
                    if !values.is_empty() {
                        view.conflicts.insert(field.to_string(), values);
                    }
                }
                if let Some(notes) = responses.remove(&view.id) {
                    view.notes.extend(notes);
                    view.notes.sort_by_key(|n| n.at_ms);
                }
                view
            })),
            Err(e) => tracing::warn!(doc = %id, error = %e, "cannot read concerns"),
        }
    }
    out.sort_by(|a, b| {
        b.created_ms
            .cmp(&a.created_ms)
            .then_with(|| a.id.cmp(&b.id))
    });
    out
}

async fn list_concerns(
    State(handle): State<Handle>,
    Query(q): Query<ConcernQuery>,
) -> Result<Json<Vec<ConcernView>>, ApiError> {
    let quarter = match q.quarter.as_deref() {
        None | Some("") => None,
        Some(s) => Some(QuarterSlug::new(s).map_err(|e| ApiError::bad_request(e.to_string()))?),
    };
    let result = handle
        .read(move |view| {
            if let Some(q) = &quarter
                && !view.engine.accepts(&DocId::quarter(q))
            {
                let known: Vec<String> = view
                    .engine
                    .docs()
                    .filter(|(id, _)| view.engine.accepts(id))
                    .filter_map(|(id, _)| id.quarter_slug().map(|s| s.to_string()))
                    .collect();
                return Err(ApiError::not_found(format!(
                    "unknown quarter '{q}': known quarters are {}",
                    if known.is_empty() {
                        "none yet".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            }
            Ok(concerns_in(&view, quarter.as_ref()))
        })
        .await??;
    Ok(Json(result))
}

/// The current unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn add_concern(
    State(handle): State<Handle>,
    body: Result<Json<NewConcern>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<ConcernView>), ApiError> {
    let Json(body) =
        body.map_err(|e| ApiError::bad_request(format!("invalid concern: {}", e.body_text())))?;
    let own = handle.own_doc().clone();
    let DocId::Quarter(slug) = own.clone() else {
        return Err(ApiError::bad_request("only quarter nodes record concerns"));
    };
    let mut concern = Concern::new(
        body.category.trim().to_string(),
        body.description,
        body.lat,
        body.long,
        now_ms(),
    );
    concern.address = body.address;
    concern.media_url = body.media_url;
    concern.agency = body.agency;
    concern
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(reporter) = body.reporter.filter(|r| !r.is_empty()) {
        reporter.validate()?;
        // Personal data first, local only; the replicated concern gets a
        // pseudonymous reference to it.
        let reference = uuid_like();
        let bytes =
            serde_json::to_vec(&reporter).map_err(|e| ApiError::bad_request(e.to_string()))?;
        handle
            .local_put(format!("reporter/{reference}"), bytes)
            .await?;
        concern.reporter_ref = Some(reference);
    }
    let written = concern.clone();
    handle
        .write(own, move |tx| schema::put_concern(tx, &written))
        .await?;
    Ok((StatusCode::CREATED, Json(ConcernView::new(&slug, concern))))
}
