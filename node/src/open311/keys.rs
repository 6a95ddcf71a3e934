//! Open311 API keys: an app needs one to post requests to a quarter node.
//! Keys live in the node's local-only store (never replicated), as a SHA-256
//! hash with a name, so the store never holds a usable key; `iq-node apikey`
//! creates, lists and revokes them through the local JSON API.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use iq_protocol::replicator::Handle;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::{ApiError, now_ms};

const PREFIX: &str = "open311/apikey/";

/// A key as stored: never the key itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    name: String,
    /// Hex SHA-256 of the key.
    sha256: String,
    created_ms: i64,
    revoked_ms: Option<i64>,
}

/// A key as `list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyView {
    pub name: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// RFC 3339, UTC, when revoked.
    pub revoked: Option<String>,
}

/// The answer to `create`: the key, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewKey {
    pub name: String,
    pub key: String,
}

/// Body of `POST /api/v1/apikeys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateKey {
    pub name: String,
}

impl From<&StoredKey> for KeyView {
    fn from(k: &StoredKey) -> Self {
        Self {
            name: k.name.clone(),
            created: iq_protocol::schema::format_time(k.created_ms, false),
            revoked: k
                .revoked_ms
                .map(|ms| iq_protocol::schema::format_time(ms, false)),
        }
    }
}

fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn all(handle: &Handle) -> Result<Vec<StoredKey>, iq_protocol::replicator::ReplicatorError> {
    let entries = handle.local_scan(PREFIX.into()).await?;
    Ok(entries
        .into_iter()
        .filter_map(|(_, bytes)| serde_json::from_slice(&bytes).ok())
        .collect())
}

/// The name of the active key `key`, if there is one.
pub async fn active_key_name(
    handle: &Handle,
    key: &str,
) -> Result<Option<String>, iq_protocol::replicator::ReplicatorError> {
    let wanted = hash(key);
    Ok(all(handle)
        .await?
        .into_iter()
        .find(|k| k.revoked_ms.is_none() && k.sha256 == wanted)
        .map(|k| k.name))
}

/// The local JSON API's key routes (quarter nodes).
pub fn routes() -> Router<Handle> {
    Router::new()
        .route("/api/v1/apikeys", get(list).post(create))
        .route("/api/v1/apikeys/{id}/revoke", post(revoke))
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "key name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.', e.g. the app's name"
        )))
    }
}

/// `POST /api/v1/apikeys`: a new key named `name`, shown once.
async fn create(
    State(handle): State<Handle>,
    body: Result<Json<CreateKey>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<NewKey>), ApiError> {
    let Json(body) =
        body.map_err(|e| ApiError::bad_request(format!("invalid key request: {}", e.body_text())))?;
    let name = body.name.trim().to_string();
    check_name(&name)?;
    let key = iq_protocol::workflows::new_id().replace('-', "")
        + &iq_protocol::workflows::new_id().replace('-', "");
    let stored = StoredKey {
        name: name.clone(),
        sha256: hash(&key),
        created_ms: now_ms(),
        revoked_ms: None,
    };
    let bytes = serde_json::to_vec(&stored).map_err(|_| ApiError::unavailable())?;
    if !handle
        .local_put_new(format!("{PREFIX}{name}"), bytes)
        .await?
    {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!(
                "a key named '{name}' exists already (names stay taken after revoking); choose another name"
            ),
        });
    }
    Ok((StatusCode::CREATED, Json(NewKey { name, key })))
}

/// `GET /api/v1/apikeys`: every key's name and dates, never the keys.
async fn list(State(handle): State<Handle>) -> Result<Json<Vec<KeyView>>, ApiError> {
    Ok(Json(
        all(&handle).await?.iter().map(KeyView::from).collect(),
    ))
}

/// `POST /api/v1/apikeys/{name}/revoke`: the key stops working at once.
async fn revoke(
    State(handle): State<Handle>,
    Path(name): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    let key = format!("{PREFIX}{name}");
    let mut stored: StoredKey = handle
        .local_get(key.clone())
        .await?
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no API key named '{name}'; `iq-node apikey list` shows the names"
            ))
        })?;
    if stored.revoked_ms.is_none() {
        stored.revoked_ms = Some(now_ms());
        let bytes = serde_json::to_vec(&stored).map_err(|_| ApiError::unavailable())?;
        handle.local_put(key, bytes).await?;
    }
    Ok(Json(KeyView::from(&stored)))
}
