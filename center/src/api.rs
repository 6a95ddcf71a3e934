//! The centre's HTTP API: the common routes plus the roster.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use iq_node::api::{ApiError, common_routes};
use iq_protocol::replicator::Handle;
use iq_protocol::schema::{self, RosterEntry};
use iq_protocol::{DocId, Multiaddr, PeerId, QuarterSlug};
use serde::{Deserialize, Serialize};

/// A roster entry with the centre's view of its sync state (the same
/// state the metrics and the dashboard show).
pub use iq_node::ops::QuarterState as QuarterView;

/// Body of `POST /api/v1/quarters`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddQuarter {
    pub slug: String,
    pub name: String,
    /// A writer node's PeerId (printed by `iq-node init` / `iq-node id`).
    pub peer: String,
    /// Where the centre dials that node (a libp2p multiaddr); optional, and
    /// when absent an address registered before is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

pub fn router(handle: Handle) -> Router {
    common_routes()
        .merge(crate::frame_api::routes())
        .merge(crate::dashboard::routes())
        .route("/api/v1/quarters", get(list_quarters).post(add_quarter))
        .route(
            "/api/v1/quarters/{slug}/writers/{peer}",
            axum::routing::delete(remove_writer),
        )
        .fallback(iq_node::api::no_such_route)
        .with_state(handle)
}

async fn list_quarters(State(handle): State<Handle>) -> Result<Json<Vec<QuarterView>>, ApiError> {
    let list = handle
        .read(|view| iq_node::ops::quarter_states(&view))
        .await?;
    Ok(Json(list))
}

/// `DELETE /api/v1/quarters/{slug}/writers/{peer}`: the key is refused from now on.
async fn remove_writer(
    State(handle): State<Handle>,
    axum::extract::Path((slug, peer)): axum::extract::Path<(String, String)>,
) -> Result<Json<RosterEntry>, ApiError> {
    let slug = QuarterSlug::new(&slug).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let peer_id: PeerId = peer
        .parse()
        .map_err(|e| ApiError::bad_request(format!("{peer:?} is not a PeerId ({e})")))?;
    let now = iq_node::api::now_ms();
    let result = handle
        .write_with(
            DocId::City,
            {
                let slug = slug.clone();
                move |view| {
                    // The changes this key made that the centre holds stay
                    // acceptable, so nodes still missing them can sync.
                    let actor = iq_protocol::identity::actor_id_of_peer(&peer_id);
                    let held = view
                        .engine
                        .doc(&DocId::quarter(&slug))
                        .map(|doc| {
                            doc.get_changes(&[])
                                .iter()
                                .filter(|c| Some(c.actor_id()) == actor.as_ref())
                                .map(|c| c.hash().to_string())
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default();
                    Ok(held)
                }
            },
            move |held, tx| {
                let Some(mut entry) = schema::roster_entry(tx, &slug)? else {
                    return Ok(Err(ApiError::not_found(format!(
                        "unknown quarter '{slug}': see `iq-center quarters` for the roster"
                    ))));
                };
                let before = entry.writers.len();
                entry.writers.retain(|w| *w != peer_id.to_string());
                if entry.writers.len() == before {
                    return Ok(Err(ApiError::not_found(format!(
                        "{peer_id} is not a writer of '{slug}'"
                    ))));
                }
                if let Some(addrs) = &mut entry.addrs {
                    addrs.remove(&peer_id.to_string());
                }
                schema::put_roster_entry(tx, &slug, &entry)?;
                let retired = schema::RetiredKey {
                    quarter: slug.to_string(),
                    peer: peer_id.to_string(),
                    changes: held,
                    at_ms: now,
                };
                schema::put_item(tx, &retired)?;
                Ok(Ok(entry))
            },
        )
        .await??;
    Ok(Json(result))
}

async fn add_quarter(
    State(handle): State<Handle>,
    body: Result<Json<AddQuarter>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<RosterEntry>), ApiError> {
    let Json(body) = body
        .map_err(|e| ApiError::bad_request(format!("invalid roster entry: {}", e.body_text())))?;
    let slug = QuarterSlug::new(&body.slug).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let name = body.name.trim().to_string();
    if name.is_empty() {
        return Err(ApiError::bad_request(
            "quarter name is empty: give its display name, e.g. \"Johannstadt\"",
        ));
    }
    let peer: PeerId = body.peer.trim().parse().map_err(|e| {
        ApiError::bad_request(format!(
            "{:?} is not a PeerId ({e}); use the id printed by `iq-node init` or `iq-node id`",
            body.peer
        ))
    })?;
    let addr = body
        .addr
        .as_deref()
        .map(|a| iq_protocol::transport::roster_addr(&peer, a))
        .transpose()
        .map_err(ApiError::bad_request)?;
    let entry = add_to_roster(&handle, slug, name, peer, addr).await?;
    Ok((StatusCode::CREATED, Json(entry)))
}

/// Adds `peer` as a writer of quarter `slug` (creating the entry, or
/// renaming it) in the city document, with the address the centre dials it
/// at when `addr` is given; returns the entry as written.
pub async fn add_to_roster(
    handle: &Handle,
    slug: QuarterSlug,
    name: String,
    peer: PeerId,
    addr: Option<Multiaddr>,
) -> Result<RosterEntry, iq_protocol::replicator::WriteError> {
    handle
        .write(DocId::City, move |tx| {
            let existing = schema::roster_entry(tx, &slug)?;
            let (mut writers, mut addrs) =
                existing.map(|e| (e.writers, e.addrs)).unwrap_or_default();
            if !writers.contains(&peer.to_string()) {
                writers.push(peer.to_string());
            }
            if let Some(addr) = addr {
                addrs
                    .get_or_insert_default()
                    .insert(peer.to_string(), addr.to_string());
            }
            let entry = RosterEntry {
                name,
                writers,
                addrs,
            };
            schema::put_roster_entry(tx, &slug, &entry)?;
            Ok(entry)
        })
        .await
}
