//! What operators expect of a service: `/metrics` in the Prometheus text
//! format, `/healthz` and `/readyz`, and the live-update stream the pages
//! listen on (`/events`). The first three are served to any host (they carry
//! no personal data, and a Prometheus server scrapes from another machine);
//! `/events` and the store export for backups stay behind the same-machine
//! check of the API.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use iq_protocol::datadir::Role;
use iq_protocol::replicator::{Handle, View};
use iq_protocol::schema;
use iq_protocol::{DocId, PeerId};
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::api::ApiError;

/// How long `/readyz` waits for the replicator to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Routes served to any host: metrics and health.
pub fn public_routes() -> Router<Handle> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// Routes for pages and the CLIs on this machine: live updates and the
/// store export behind `backup`.
pub fn local_routes() -> Router<Handle> {
    Router::new()
        .route("/events", get(events))
        .route("/backup/store", get(backup_store))
}

/// `/healthz`: the process serves HTTP. It does not ask the replicator, so
/// a node busy with a large sync is not restarted for it.
async fn healthz() -> &'static str {
    "ok\n"
}

/// `/readyz`: the replicator answers within two seconds, has loaded its
/// stored documents and listens for peers. 503 with the reason otherwise.
async fn readyz(State(handle): State<Handle>) -> Response {
    let answer = tokio::time::timeout(
        READY_TIMEOUT,
        handle.read_now(|view| (view.listen_addrs().len(), view.loading())),
    )
    .await;
    match answer {
        Ok(Ok((_, loading))) if loading > 0 => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: still loading {loading} stored documents\n"),
        )
            .into_response(),
        Ok(Ok((n, _))) if n > 0 => (StatusCode::OK, "ready\n").into_response(),
        Ok(Ok(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not listening for peers yet\n".to_string(),
        )
            .into_response(),
        Ok(Err(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the replicator has stopped; see the log\n",
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the replicator did not answer within 2 s\n",
        )
            .into_response(),
    }
}

async fn metrics(State(handle): State<Handle>) -> Result<Response, ApiError> {
    let text = handle
        .read(|view| render_metrics(&view))
        .await?
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("cannot encode metrics: {e}"),
        })?;
    Ok((
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        text.into_bytes(),
    )
        .into_response())
}

/// A gauge family registered on `registry`.
fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The node's metrics in the Prometheus text format (0.0.4), computed from
/// what the replicator tracks. Names are documented in `docs/operations.md`.
pub fn render_metrics(view: &View<'_>) -> prometheus::Result<String> {
    let r = Registry::new();
    let role = match view.role {
        Role::Center => "center",
        Role::Quarter => "quarter",
    };
    gauge_vec(
        &r,
        "iq_node_info",
        "Always 1; labels say which node this is",
        &["role", "peer_id", "own_doc", "version"],
    )?
    .with_label_values(&[
        role,
        &view.peer_id.to_string(),
        &view.own_doc.to_string(),
        env!("CARGO_PKG_VERSION"),
    ])
    .set(1);
    gauge(&r, "iq_uptime_seconds", "Seconds since the node started")?
        .set(clamp(view.uptime_secs()));
    gauge(
        &r,
        "iq_peers_connected",
        "Peers with an open libp2p connection",
    )?
    .set(clamp(view.connected_count() as u64));
    gauge(
        &r,
        "iq_store_bytes",
        "Bytes the node's sled store occupies on disk",
    )?
    .set(clamp(view.store_bytes()));
    gauge(
        &r,
        "iq_sync_bytes_in_flight",
        "Bytes of sync messages with changes sent and not yet acknowledged or failed",
    )?
    .set(clamp(view.engine.in_flight_bytes() as u64));
    let wire = counter_vec(
        &r,
        "iq_sync_wire_bytes_total",
        "Bytes on the sync streams as written on them (requests deflated between nodes of this version, and responses) since start",
        &["direction"],
    )?;
    wire.with_label_values(&["sent"]).inc_by(view.wire().sent);
    wire.with_label_values(&["received"])
        .inc_by(view.wire().received);

    let docs: Vec<_> = view
        .engine
        .docs()
        .filter(|(id, _)| view.engine.accepts(id))
        .collect();
    gauge(&r, "iq_documents", "Documents this node replicates")?.set(clamp(docs.len() as u64));
    let changes = gauge_vec(
        &r,
        "iq_document_changes",
        "Changes held per document",
        &["doc"],
    )?;
    for (id, am) in &docs {
        changes
            .with_label_values(&[&id.to_string()])
            .set(clamp(am.get_changes_meta(&[]).len() as u64));
    }

    let messages_sent = counter_vec(
        &r,
        "iq_sync_messages_sent_total",
        "Sync messages sent to a peer since start",
        &["peer"],
    )?;
    let messages_received = counter_vec(
        &r,
        "iq_sync_messages_received_total",
        "Sync messages received from a peer since start",
        &["peer"],
    )?;
    let bytes_sent = counter_vec(
        &r,
        "iq_sync_bytes_sent_total",
        "Bytes of sync messages sent to a peer since start",
        &["peer"],
    )?;
    let bytes_received = counter_vec(
        &r,
        "iq_sync_bytes_received_total",
        "Bytes of sync messages received from a peer since start",
        &["peer"],
    )?;
    let peer_connected = gauge_vec(
        &r,
        "iq_peer_connected",
        "1 while the sync partner is connected",
        &["peer"],
    )?;
    let unconfirmed = gauge_vec(
        &r,
        "iq_peer_unconfirmed_changes",
        "Changes this node holds that the peer has not confirmed holding",
        &["peer"],
    )?;
    for (peer, stats) in view.engine.peers() {
        let p = peer.to_string();
        messages_sent
            .with_label_values(&[&p])
            .inc_by(stats.total_messages_sent);
        messages_received
            .with_label_values(&[&p])
            .inc_by(stats.total_messages_received);
        bytes_sent
            .with_label_values(&[&p])
            .inc_by(stats.total_bytes_sent);
        bytes_received
            .with_label_values(&[&p])
            .inc_by(stats.total_bytes_received);
        peer_connected
            .with_label_values(&[&p])
            .set(i64::from(view.is_connected(peer)));
        if let Some(n) = view.engine.unconfirmed_changes(peer) {
            unconfirmed.with_label_values(&[&p]).set(clamp(n));
        }
    }

    let refusals = counter_vec(
        &r,
        "iq_refusals_total",
        "Input refused since start, by reason",
        &["reason"],
    )?;
    let counts = view.refusals();
    for (reason, n) in [
        ("connection", counts.connections),
        ("request", counts.requests),
        ("rate_limited", counts.rate_limited),
        ("message", counts.messages),
        ("change", counts.changes),
    ] {
        refusals.with_label_values(&[reason]).inc_by(n);
    }

    if view.role == Role::Center {
        quarter_metrics(&r, view)?;
    }

    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// The centre's view of each quarter on the roster: connected, how long
/// since it was last heard from, how far behind it is, its concerns.
fn quarter_metrics(r: &Registry, view: &View<'_>) -> prometheus::Result<()> {
    let connected = gauge_vec(
        r,
        "iq_quarter_connected",
        "1 while any writer node of the quarter is connected to the centre",
        &["quarter"],
    )?;
    let age = gauge_vec(
        r,
        "iq_quarter_last_sync_age_seconds",
        "Seconds since the centre last received a sync message from the quarter (absent if never)",
        &["quarter"],
    )?;
    let lag = gauge_vec(
        r,
        "iq_quarter_lag_changes",
        "Changes the centre holds that the quarter's best-synced writer node has not confirmed",
        &["quarter"],
    )?;
    let concerns = gauge_vec(
        r,
        "iq_quarter_concerns",
        "Concerns in the quarter's document as the centre holds it",
        &["quarter"],
    )?;
    let now_ms = u64::try_from(crate::api::now_ms()).unwrap_or(0);
    for q in quarter_states(view) {
        let slug = q.slug.as_str();
        connected
            .with_label_values(&[slug])
            .set(i64::from(q.connected));
        if let Some(last) = q.last_sync_ms {
            age.with_label_values(&[slug])
                .set(clamp(now_ms.saturating_sub(last) / 1000));
        }
        if let Some(n) = q.lag_changes {
            lag.with_label_values(&[slug]).set(clamp(n));
        }
        concerns
            .with_label_values(&[slug])
            .set(clamp(q.concerns as u64));
    }
    Ok(())
}

/// One roster quarter's sync state as this node sees it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuarterState {
    pub slug: String,
    pub name: String,
    pub writers: Vec<String>,
    /// Whether any of its writer nodes is connected now.
    pub connected: bool,
    /// Heads of the quarter's document as this node holds it.
    pub heads: Vec<String>,
    pub concerns: usize,
    /// Unix time (ms) of the last sync message from any of its writers.
    pub last_sync_ms: Option<u64>,
    /// Changes this node holds that the quarter's best-synced writer has
    /// not confirmed holding (`None` before it ever connected).
    #[serde(default)]
    pub lag_changes: Option<u64>,
    /// The iq version each writer node reports (peer → version), for
    /// nodes that advertise an address.
    #[serde(default)]
    pub versions: std::collections::BTreeMap<String, String>,
    /// Where the centre dials writer nodes (peer → multiaddr), as given on
    /// the roster with `iq-center quarter add --addr`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub addrs: std::collections::BTreeMap<String, String>,
}

/// The sync state of every quarter on the roster.
pub fn quarter_states(view: &View<'_>) -> Vec<QuarterState> {
    let roster = view
        .city()
        .and_then(|am| schema::roster(am).ok())
        .unwrap_or_default();
    roster
        .into_iter()
        .map(|(slug, entry)| {
            let doc = view.engine.doc(&DocId::quarter(&slug));
            let writers: Vec<PeerId> = entry
                .writers
                .iter()
                .filter_map(|w| w.parse().ok())
                .collect();
            let last = view
                .engine
                .peers()
                .filter(|(p, _)| writers.contains(p))
                .filter_map(|(_, s)| s.last_received_ms)
                .max();
            let lag = writers
                .iter()
                .filter_map(|p| view.engine.unconfirmed_changes(p))
                .min();
            QuarterState {
                slug: slug.to_string(),
                name: entry.name,
                writers: entry.writers,
                addrs: entry.addrs.unwrap_or_default(),
                connected: writers.iter().any(|p| view.is_connected(p)),
                heads: doc
                    .map(|am| am.get_heads().iter().map(|h| h.to_string()).collect())
                    .unwrap_or_default(),
                concerns: doc.map(schema::concern_count).unwrap_or(0),
                last_sync_ms: last.map(|t| view.wall_ms(t)),
                lag_changes: lag,
                versions: doc
                    .map(|am| {
                        schema::items::<schema::NodeAddr>(am)
                            .unwrap_or_default()
                            .into_iter()
                            .filter_map(|n| Some((n.peer, n.version?)))
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// Turns `true` when the daemon begins to stop; ends the event streams.
#[derive(Debug, Clone)]
pub struct Stopping(pub tokio::sync::watch::Receiver<bool>);

/// `/events`: server-sent events, one `change` event whenever a document
/// changes or a peer connects or disconnects (coalesced: a burst of changes
/// is one event), so a page refreshes without polling. The stream ends when
/// the daemon stops.
async fn events(
    State(handle): State<Handle>,
    axum::Extension(Stopping(stopping)): axum::Extension<Stopping>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let mut rx = handle.subscribe();
    rx.mark_changed();
    let stream = futures::stream::unfold((rx, stopping), |(mut rx, mut stopping)| async move {
        tokio::select! {
            changed = rx.changed() => changed.ok()?,
            _ = stopping.wait_for(|s| *s) => return None,
        }
        let n = *rx.borrow_and_update();
        Some((
            Ok(Event::default().event("change").data(n.to_string())),
            (rx, stopping),
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// `/backup/store`: every entry of the store, read in one step of the
/// replicator so the copy is consistent, in the backup format (see
/// [`crate::backup`]). Only the store: the CLI adds the key and config from
/// the data directory itself, so the key never crosses HTTP.
async fn backup_store(State(handle): State<Handle>) -> Result<Response, ApiError> {
    let export = handle.export_store().await?;
    let bytes = crate::backup::encode_store(&export).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("cannot encode the store: {e}"),
    })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}
