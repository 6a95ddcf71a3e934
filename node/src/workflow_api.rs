//! The counter-current workflows over HTTP: views both node kinds serve
//! (directives, consultations, budget, escalations, proposals, concern
//! overview) and the actions of a quarter node. The rules live in
//! `iq_protocol::workflows`; these handlers only read, check and write.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use iq_protocol::replicator::{Handle, View};
use iq_protocol::schema::{self, Concern, SchemaError};
use iq_protocol::workflows::{
    self, Ack, Allocation, Answer, BudgetLine, ConcernOverview, ConsultationResults,
    DirectiveStatus, Escalation, InboxEntry, Proposal,
};
use iq_protocol::{DocId, QuarterSlug};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, now_ms};

/// Read-only views, served by every node.
pub fn views() -> Router<Handle> {
    Router::new()
        .route("/api/v1/directives", get(list_directives))
        .route("/api/v1/consultations", get(list_consultations))
        .route("/api/v1/consultations/{id}", get(one_consultation))
        .route("/api/v1/budget", get(budget))
        .route("/api/v1/escalations", get(list_escalations))
        .route("/api/v1/proposals", get(list_proposals))
        .route("/api/v1/overview/concerns", get(concern_overview))
}

/// Actions of a quarter node on its own document.
pub fn quarter_actions() -> Router<Handle> {
    Router::new()
        .route("/api/v1/proposals", post(add_proposal))
        .route("/api/v1/proposals/{id}/supports", post(support))
        .route("/api/v1/proposals/{id}/status", post(proposal_status))
        .route("/api/v1/proposals/{id}/milestones", post(milestone))
        .route("/api/v1/consultations/{id}/answer", post(answer))
        .route("/api/v1/allocations", post(allocate))
        .route("/api/v1/directives/{id}/ack", post(ack))
        .route("/api/v1/escalations", post(escalate))
        .route("/api/v1/hide", post(hide))
}

/// A JSON request body, or why it could not be read.
pub type JsonBody<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// Unwraps a JSON body or says what is wrong with it.
pub fn body<T>(b: JsonBody<T>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {}", e.body_text())))
}

fn city_or_empty<'a>(view: &'a View<'_>) -> Result<&'a automerge::Automerge, ApiError> {
    view.city()
        .ok_or_else(|| ApiError::not_found("this node holds no city document yet"))
}

async fn list_directives(State(h): State<Handle>) -> Result<Json<Vec<DirectiveStatus>>, ApiError> {
    let now = now_ms();
    Ok(Json(
        h.read(move |v| {
            city_or_empty(&v).map(|c| workflows::directives(c, &v.quarter_docs(), now))
        })
        .await??,
    ))
}

async fn list_consultations(
    State(h): State<Handle>,
) -> Result<Json<Vec<ConsultationResults>>, ApiError> {
    Ok(Json(
        h.read(|v| {
            city_or_empty(&v).map(|c| workflows::consultation_results(c, &v.quarter_docs()))
        })
        .await??,
    ))
}

async fn one_consultation(
    State(h): State<Handle>,
    Path(id): Path<String>,
) -> Result<Json<ConsultationResults>, ApiError> {
    let all = h
        .read(|v| city_or_empty(&v).map(|c| workflows::consultation_results(c, &v.quarter_docs())))
        .await??;
    all.into_iter()
        .find(|r| r.consultation.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no consultation '{id}'")))
}

/// `?year=2027`
#[derive(Debug, Deserialize)]
pub struct YearQuery {
    pub year: Option<i64>,
}

async fn budget(
    State(h): State<Handle>,
    Query(q): Query<YearQuery>,
) -> Result<Json<Vec<BudgetLine>>, ApiError> {
    Ok(Json(
        h.read(move |v| city_or_empty(&v).map(|c| workflows::budget(c, &v.quarter_docs(), q.year)))
            .await??,
    ))
}

/// `?open=true` for the inbox: escalations without a response yet.
#[derive(Debug, Deserialize)]
pub struct EscalationQuery {
    #[serde(default)]
    pub open: bool,
    pub quarter: Option<String>,
}

async fn list_escalations(
    State(h): State<Handle>,
    Query(q): Query<EscalationQuery>,
) -> Result<Json<Vec<InboxEntry>>, ApiError> {
    let list = h
        .read(move |v| {
            city_or_empty(&v).map(|c| workflows::escalations(c, &v.quarter_docs(), q.open))
        })
        .await??;
    Ok(Json(
        list.into_iter()
            .filter(|e| q.quarter.as_deref().is_none_or(|s| s == e.quarter))
            .collect(),
    ))
}

/// A proposal with the quarter it belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProposalView {
    pub quarter: String,
    #[serde(flatten)]
    pub proposal: Proposal,
    pub support_count: usize,
    /// The centre's responses if the proposal was escalated.
    pub responses: Vec<crate::api::NoteView>,
}

/// `?quarter=SLUG`
#[derive(Debug, Deserialize)]
pub struct QuarterQuery {
    pub quarter: Option<String>,
}

async fn list_proposals(
    State(h): State<Handle>,
    Query(q): Query<QuarterQuery>,
) -> Result<Json<Vec<ProposalView>>, ApiError> {
    let list = h
        .read(move |v| {
            let mut out = Vec::new();
            for (slug, doc) in v.quarter_docs() {
                if q.quarter.as_deref().is_some_and(|s| s != slug.as_str()) {
                    continue;
                }
                let mut responses = crate::api::response_notes(&v, &slug, doc, "proposal");
                for p in schema::items::<Proposal>(doc).unwrap_or_default() {
                    if p.hidden.is_none() {
                        out.push(ProposalView {
                            quarter: slug.to_string(),
                            support_count: p.supports.len(),
                            responses: responses.remove(&p.id).unwrap_or_default(),
                            proposal: p,
                        });
                    }
                }
            }
            out.sort_by_key(|p| std::cmp::Reverse(p.proposal.created_ms));
            out
        })
        .await?;
    Ok(Json(list))
}

async fn concern_overview(State(h): State<Handle>) -> Result<Json<Vec<ConcernOverview>>, ApiError> {
    Ok(Json(
        h.read(|v| workflows::concern_overview(&v.quarter_docs()))
            .await?,
    ))
}

/// This node's quarter, or an error for the centre.
async fn own_quarter(h: &Handle) -> Result<(DocId, QuarterSlug), ApiError> {
    let own = h.own_doc().clone();
    match own.quarter_slug().cloned() {
        Some(q) => Ok((own, q)),
        None => Err(ApiError::bad_request(
            "this action belongs to a quarter node",
        )),
    }
}

/// Body of `POST /api/v1/proposals`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewProposal {
    pub title: String,
    pub description: String,
    /// Supports needed to qualify [default 10].
    pub threshold: Option<u64>,
}

async fn add_proposal(
    State(h): State<Handle>,
    b: JsonBody<NewProposal>,
) -> Result<(StatusCode, Json<Proposal>), ApiError> {
    let b = body(b)?;
    let (own, _) = own_quarter(&h).await?;
    let p = workflows::proposal(
        &b.title,
        &b.description,
        b.threshold.unwrap_or(10),
        now_ms(),
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let written = p.clone();
    h.write(own, move |tx| schema::put_item(tx, &written))
        .await?;
    Ok((StatusCode::CREATED, Json(p)))
}

/// Changes one of this quarter's proposals with `f` and writes it back.
async fn update_proposal(
    h: &Handle,
    id: String,
    f: impl FnOnce(&mut Proposal) -> Result<(), SchemaError> + Send + 'static,
) -> Result<Json<Proposal>, ApiError> {
    let (own, _) = own_quarter(h).await?;
    let p = h
        .write(own, move |tx| {
            let Some(mut p) = schema::item_in::<Proposal>(tx, &id)? else {
                return Err(SchemaError::NotFound(format!(
                    "this quarter has no proposal '{id}'"
                )));
            };
            f(&mut p)?;
            schema::put_item(tx, &p)?;
            Ok(p)
        })
        .await?;
    Ok(Json(p))
}

/// Body of `POST /api/v1/proposals/{id}/supports`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewSupport {
    /// A pseudonymous supporter reference (one support each).
    pub supporter: String,
}

async fn support(
    State(h): State<Handle>,
    Path(id): Path<String>,
    b: JsonBody<NewSupport>,
) -> Result<Json<Proposal>, ApiError> {
    let b = body(b)?;
    let now = now_ms();
    update_proposal(&h, id, move |p| {
        workflows::support(p, b.supporter.trim(), now).map(|_| ())
    })
    .await
}

/// Body of `POST /api/v1/proposals/{id}/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewStatus {
    pub status: String,
}

async fn proposal_status(
    State(h): State<Handle>,
    Path(id): Path<String>,
    b: JsonBody<NewStatus>,
) -> Result<Json<Proposal>, ApiError> {
    let b = body(b)?;
    update_proposal(&h, id, move |p| {
        workflows::set_proposal_status(p, b.status.trim())
    })
    .await
}

/// Body of `POST /api/v1/proposals/{id}/milestones`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewMilestone {
    pub text: String,
}

async fn milestone(
    State(h): State<Handle>,
    Path(id): Path<String>,
    b: JsonBody<NewMilestone>,
) -> Result<Json<Proposal>, ApiError> {
    let b = body(b)?;
    let now = now_ms();
    update_proposal(&h, id, move |p| {
        workflows::check_text("milestone", &b.text, workflows::MAX_TEXT_CHARS)?;
        p.milestones.push(workflows::Milestone {
            text: b.text,
            at_ms: now,
        });
        Ok(())
    })
    .await
}

/// Body of `POST /api/v1/consultations/{id}/answer`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewAnswer {
    pub options: Vec<String>,
    pub position: String,
    #[serde(default)]
    pub yes: u64,
    #[serde(default)]
    pub no: u64,
    #[serde(default)]
    pub abstain: u64,
    pub body: String,
    #[serde(default)]
    pub decided_on: String,
}

async fn answer(
    State(h): State<Handle>,
    Path(id): Path<String>,
    b: JsonBody<NewAnswer>,
) -> Result<(StatusCode, Json<Answer>), ApiError> {
    let b = body(b)?;
    let (own, quarter) = own_quarter(&h).await?;
    let now = now_ms();
    let a = h
        .write_with(
            own,
            move |v| {
                let city = v
                    .city()
                    .ok_or_else(|| SchemaError::NotFound("no city document yet".into()))?;
                workflows::answer(
                    city,
                    &quarter,
                    &id,
                    b.options,
                    &b.position,
                    (b.yes, b.no, b.abstain),
                    &b.body,
                    &b.decided_on,
                    now,
                )
            },
            schema::insert,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(a)))
}

/// Body of `POST /api/v1/allocations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewAllocation {
    pub title: String,
    pub amount_cents: i64,
    pub year: i64,
    pub proposal_id: Option<String>,
}

async fn allocate(
    State(h): State<Handle>,
    b: JsonBody<NewAllocation>,
) -> Result<(StatusCode, Json<Allocation>), ApiError> {
    let b = body(b)?;
    let (own, quarter) = own_quarter(&h).await?;
    let now = now_ms();
    let a = h
        .write_with(
            own.clone(),
            move |v| {
                let city = v
                    .city()
                    .ok_or_else(|| SchemaError::NotFound("no city document yet".into()))?;
                let mine = v
                    .engine
                    .doc(&own)
                    .map(schema::items::<Allocation>)
                    .transpose()?
                    .unwrap_or_default();
                if let Some(pid) = &b.proposal_id {
                    let exists = v
                        .engine
                        .doc(&own)
                        .is_some_and(|d| schema::item::<Proposal>(d, pid).ok().flatten().is_some());
                    if !exists {
                        return Err(SchemaError::NotFound(format!(
                            "this quarter has no proposal '{pid}'"
                        )));
                    }
                }
                workflows::allocation(
                    city,
                    &quarter,
                    &mine,
                    &b.title,
                    b.amount_cents,
                    b.proposal_id,
                    b.year,
                    now,
                )
            },
            schema::insert,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(a)))
}

/// Body of `POST /api/v1/directives/{id}/ack`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewAck {
    /// `received` or `implemented`.
    pub state: String,
    #[serde(default)]
    pub comment: String,
}

async fn ack(
    State(h): State<Handle>,
    Path(id): Path<String>,
    b: JsonBody<NewAck>,
) -> Result<Json<Ack>, ApiError> {
    let b = body(b)?;
    let (own, quarter) = own_quarter(&h).await?;
    let now = now_ms();
    let a = h
        .write_with(
            own,
            move |v| {
                let city = v
                    .city()
                    .ok_or_else(|| SchemaError::NotFound("no city document yet".into()))?;
                workflows::ack(city, &quarter, &id, b.state.trim(), &b.comment, now)
            },
            schema::insert,
        )
        .await?;
    Ok(Json(a))
}

/// Body of `POST /api/v1/escalations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewEscalation {
    /// `concern` or `proposal`.
    pub kind: String,
    pub item_id: String,
    pub reason: String,
}

async fn escalate(
    State(h): State<Handle>,
    b: JsonBody<NewEscalation>,
) -> Result<(StatusCode, Json<Escalation>), ApiError> {
    let b = body(b)?;
    let (own, _) = own_quarter(&h).await?;
    let now = now_ms();
    let e = h
        .write(own, move |tx| {
            let exists = match b.kind.as_str() {
                "concern" => schema::item_in::<Concern>(tx, &b.item_id)?.is_some(),
                "proposal" => schema::item_in::<Proposal>(tx, &b.item_id)?.is_some(),
                _ => false,
            };
            let e = workflows::escalation(&b.kind, &b.item_id, exists, &b.reason, now)?;
            schema::put_item(tx, &e)?;
            Ok(e)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(e)))
}

/// Body of `POST /api/v1/hide`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HideItem {
    /// `concern` or `proposal`.
    pub kind: String,
    pub id: String,
    pub reason: String,
}

/// Answer of `POST /api/v1/hide`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hidden {
    pub kind: String,
    pub id: String,
    pub hidden: bool,
}

async fn hide(State(h): State<Handle>, b: JsonBody<HideItem>) -> Result<Json<Hidden>, ApiError> {
    let b = body(b)?;
    let (own, _) = own_quarter(&h).await?;
    let now = now_ms();
    let (kind, id) = (b.kind.clone(), b.id.clone());
    h.write(own, move |tx| {
        workflows::hide(tx, &b.kind, &b.id, &b.reason, now)
    })
    .await?;
    Ok(Json(Hidden {
        kind,
        id,
        hidden: true,
    }))
}
