//! The centre's actions on the city document over HTTP: directives,
//! consultations, budget frames and responses to escalations. The views
//! are the common ones (`iq_node::workflow_api::views`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use iq_node::api::{ApiError, now_ms};
use iq_node::workflow_api::{JsonBody, body};
use iq_protocol::replicator::Handle;
use iq_protocol::schema::{self, SchemaError};
use iq_protocol::workflows::{self, Consultation, Directive, Frame, Response};
use iq_protocol::{DocId, QuarterSlug};
use serde::{Deserialize, Serialize};

pub fn routes() -> Router<Handle> {
    Router::new()
        .route("/api/v1/directives", post(issue_directive))
        .route("/api/v1/consultations", post(open_consultation))
        .route("/api/v1/consultations/{id}/close", post(close_consultation))
        .route("/api/v1/frames", post(set_frame))
        .route("/api/v1/responses", post(respond))
}

/// Body of `POST /api/v1/directives`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewDirective {
    pub title: String,
    pub text: String,
    /// Date it takes effect.
    #[serde(default)]
    pub effective: String,
    /// Target quarters; empty means all.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Acknowledgements due by (date or RFC 3339).
    pub ack_due: Option<String>,
}

async fn issue_directive(
    State(h): State<Handle>,
    b: JsonBody<NewDirective>,
) -> Result<(StatusCode, Json<Directive>), ApiError> {
    let b = body(b)?;
    let now = now_ms();
    let due = b
        .ack_due
        .as_deref()
        .map(workflows::parse_when)
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let d = h
        .write_with(
            DocId::City,
            move |v| {
                workflows::directive(
                    &b.title,
                    &b.text,
                    &b.effective,
                    b.targets,
                    due,
                    &v.roster_slugs(),
                    now,
                )
            },
            schema::insert,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(d)))
}

/// Body of `POST /api/v1/consultations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewConsultation {
    pub question: String,
    pub options: Vec<String>,
    /// Date or RFC 3339 time.
    pub deadline: String,
    #[serde(default)]
    pub targets: Vec<String>,
}

async fn open_consultation(
    State(h): State<Handle>,
    b: JsonBody<NewConsultation>,
) -> Result<(StatusCode, Json<Consultation>), ApiError> {
    let b = body(b)?;
    let now = now_ms();
    let deadline =
        workflows::parse_when(&b.deadline).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let c = h
        .write_with(
            DocId::City,
            move |v| {
                workflows::consultation(
                    &b.question,
                    b.options,
                    deadline,
                    b.targets,
                    &v.roster_slugs(),
                    now,
                )
            },
            schema::insert,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(c)))
}

async fn close_consultation(
    State(h): State<Handle>,
    Path(id): Path<String>,
) -> Result<Json<Consultation>, ApiError> {
    let c = h
        .write(DocId::City, move |tx| {
            let Some(mut c) = schema::item_in::<Consultation>(tx, &id)? else {
                return Err(SchemaError::NotFound(format!(
                    "no consultation '{id}': see `iq-center consultation list`"
                )));
            };
            c.status = "closed".into();
            schema::put_item(tx, &c)?;
            Ok(c)
        })
        .await?;
    Ok(Json(c))
}

/// Body of `POST /api/v1/frames`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewFrame {
    pub year: i64,
    pub quarter: String,
    pub amount_cents: Option<i64>,
    pub inhabitants: Option<i64>,
    pub rate_per_head_cents: Option<i64>,
}

async fn set_frame(
    State(h): State<Handle>,
    b: JsonBody<NewFrame>,
) -> Result<(StatusCode, Json<Frame>), ApiError> {
    let b = body(b)?;
    let quarter = QuarterSlug::new(&b.quarter).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let per_head = match (b.inhabitants, b.rate_per_head_cents) {
        (Some(i), Some(r)) => Some((i, r)),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad_request(
                "give both inhabitants and rate_per_head_cents, or neither",
            ));
        }
    };
    let f = h
        .write_with(
            DocId::City,
            move |v| {
                workflows::frame(
                    b.year,
                    &quarter,
                    b.amount_cents,
                    per_head,
                    &v.roster_slugs(),
                )
            },
            schema::insert,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(f)))
}

/// Body of `POST /api/v1/responses`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewResponse {
    pub quarter: String,
    pub escalation: String,
    /// `accepted`, `declined` or `forwarded`.
    pub decision: String,
    pub department: Option<String>,
    pub note: String,
}

async fn respond(
    State(h): State<Handle>,
    b: JsonBody<NewResponse>,
) -> Result<(StatusCode, Json<Response>), ApiError> {
    let b = body(b)?;
    let quarter = QuarterSlug::new(&b.quarter).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let now = now_ms();
    let r = h
        .write_with(
            DocId::City,
            move |v| {
                let doc = v
                    .engine
                    .doc(&DocId::quarter(&quarter))
                    .filter(|_| v.engine.accepts(&DocId::quarter(&quarter)))
                    .ok_or_else(|| SchemaError::NotFound(format!("unknown quarter '{quarter}'")))?;
                workflows::response(
                    doc,
                    &quarter,
                    &b.escalation,
                    b.decision.trim(),
                    b.department,
                    &b.note,
                    now,
                )
            },
            schema::insert,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(r)))
}
