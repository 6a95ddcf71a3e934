//! The pages people use, served by the daemons themselves: the quarter
//! office's page at `/` of `iq-node` (the centre's dashboard lives in
//! `iq-center`). Server-sent HTML shells with a small stylesheet and
//! vanilla scripts compiled into the binary, which call the JSON API and
//! refresh on `/events`; nothing is loaded from elsewhere, so the pages work
//! in city networks without internet.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use iq_protocol::replicator::Handle;

const CSS: &str = include_str!("../assets/iq.css");
const COMMON_JS: &str = include_str!("../assets/iq.js");
const QUARTER_HTML: &str = include_str!("../assets/quarter.html");
const QUARTER_JS: &str = include_str!("../assets/quarter.js");

/// Pages may load only this node's own scripts, styles and API.
const CSP: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// An embedded file with its content type; never cached stale.
pub fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// An embedded HTML page, under the content security policy.
pub fn page(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// The stylesheet and helpers both node kinds' pages share.
pub fn common_assets() -> Router<Handle> {
    Router::new()
        .route(
            "/assets/iq.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/assets/iq.js",
            get(|| async { asset("text/javascript; charset=utf-8", COMMON_JS) }),
        )
}

/// The quarter office's page.
pub fn quarter_page() -> Router<Handle> {
    Router::new()
        .route("/", get(|| async { page(QUARTER_HTML) }))
        .route(
            "/assets/quarter.js",
            get(|| async { asset("text/javascript; charset=utf-8", QUARTER_JS) }),
        )
}
