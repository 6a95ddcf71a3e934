//! The centre's dashboard at `/`: the federation, concerns, the escalation
//! inbox with a respond action, consultations, budget and directives, live.
//! Embedded like the quarter page (see `iq_node::pages`).

use axum::Router;
use axum::routing::get;
use iq_node::pages::{asset, page};
use iq_protocol::replicator::Handle;

const HTML: &str = include_str!("../assets/dashboard.html");
const JS: &str = include_str!("../assets/dashboard.js");

pub fn routes() -> Router<Handle> {
    Router::new()
        .route("/", get(|| async { page(HTML) }))
        .route(
            "/assets/dashboard.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
}
