//! The OpenAPI description each daemon serves at `/api/v1/openapi.json`:
//! one table of the routes, the node kinds that serve them and what they do.
//! An integration test calls every route listed here on real daemons, so the
//! table cannot drift from the routers unnoticed.

use iq_protocol::datadir::Role;
use serde_json::{Value, json};

/// Which node kinds serve a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    Both,
    Quarter,
    Center,
}

/// One documented route.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub on: On,
    pub summary: &'static str,
}

const fn r(method: &'static str, path: &'static str, on: On, summary: &'static str) -> Route {
    Route {
        method,
        path,
        on,
        summary,
    }
}

/// Every route of the JSON API.
pub const ROUTES: &[Route] = &[
    r("get", "/api/v1/openapi.json", On::Both, "This description"),
    r(
        "get",
        "/api/v1/status",
        On::Both,
        "PeerId, listen addresses, documents with heads, peers with traffic, refusal counters; at start-up, `loading` counts stored documents not loaded yet",
    ),
    r(
        "get",
        "/api/v1/heads",
        On::Both,
        "Heads of every document and a version that grows with each change (at start-up, `loading` counts stored documents not loaded yet, which are not listed); ?after=VERSION&wait_ms=MS waits (at most 30 s) until the documents changed after VERSION",
    ),
    r(
        "get",
        "/api/v1/concerns",
        On::Both,
        "Concerns of every replicated quarter, newest first (?quarter=SLUG); hidden ones left out",
    ),
    r(
        "post",
        "/api/v1/concerns",
        On::Quarter,
        "Record a concern {category, description, lat?, long?, address?, media_url?, agency?, reporter?: {name?, email?, phone?}}; the reporter stays on this node",
    ),
    r(
        "get",
        "/api/v1/concerns/{id}",
        On::Both,
        "One concern with its status notes (and the centre's response) and conflicts",
    ),
    r(
        "post",
        "/api/v1/concerns/{id}/status",
        On::Quarter,
        "Move a concern on {status: received|in_process|processed|rejected, note?}",
    ),
    r(
        "get",
        "/api/v1/concerns/{id}/reporter",
        On::Quarter,
        "The reporter's personal data, from this node's local-only store",
    ),
    r(
        "get",
        "/api/v1/directives",
        On::Both,
        "Directives with acknowledgements, pending and overdue quarters",
    ),
    r(
        "post",
        "/api/v1/directives",
        On::Center,
        "Issue a directive {title, text, effective?, targets?, ack_due?}",
    ),
    r(
        "post",
        "/api/v1/directives/{id}/ack",
        On::Quarter,
        "Acknowledge a directive {state: received|implemented, comment?}",
    ),
    r(
        "get",
        "/api/v1/consultations",
        On::Both,
        "Consultations with results per option and quarter, and who has not answered",
    ),
    r(
        "post",
        "/api/v1/consultations",
        On::Center,
        "Open a consultation {question, options, deadline, targets?}",
    ),
    r(
        "get",
        "/api/v1/consultations/{id}",
        On::Both,
        "One consultation's results",
    ),
    r(
        "post",
        "/api/v1/consultations/{id}/close",
        On::Center,
        "Close a consultation",
    ),
    r(
        "post",
        "/api/v1/consultations/{id}/answer",
        On::Quarter,
        "Answer {options, position, yes, no, abstain, body, decided_on?}; refused after the deadline",
    ),
    r(
        "get",
        "/api/v1/budget",
        On::Both,
        "Frames against allocations per quarter (?year=), with the over-frame flag",
    ),
    r(
        "post",
        "/api/v1/frames",
        On::Center,
        "Set a frame {year, quarter, amount_cents | inhabitants + rate_per_head_cents}",
    ),
    r(
        "post",
        "/api/v1/allocations",
        On::Quarter,
        "Allocate {title, amount_cents, year, proposal_id?}; refused above the frame",
    ),
    r(
        "get",
        "/api/v1/escalations",
        On::Both,
        "Escalations with their item and response (?open=true for the inbox, ?quarter=)",
    ),
    r(
        "post",
        "/api/v1/escalations",
        On::Quarter,
        "Escalate {kind: concern|proposal, item_id, reason}",
    ),
    r(
        "post",
        "/api/v1/responses",
        On::Center,
        "Respond {quarter, escalation, decision: accepted|declined|forwarded, department?, note}",
    ),
    r(
        "get",
        "/api/v1/proposals",
        On::Both,
        "Proposals with their supports (?quarter=)",
    ),
    r(
        "post",
        "/api/v1/proposals",
        On::Quarter,
        "Add a proposal {title, description, threshold?}",
    ),
    r(
        "post",
        "/api/v1/proposals/{id}/supports",
        On::Quarter,
        "Support {supporter}; one support per supporter",
    ),
    r(
        "post",
        "/api/v1/proposals/{id}/status",
        On::Quarter,
        "Move on {status: accepted|rejected|implemented}",
    ),
    r(
        "post",
        "/api/v1/proposals/{id}/milestones",
        On::Quarter,
        "Record a milestone {text}",
    ),
    r(
        "post",
        "/api/v1/hide",
        On::Quarter,
        "Hide a concern or proposal from public views {kind, id, reason}",
    ),
    r(
        "get",
        "/api/v1/overview/concerns",
        On::Both,
        "Concern counts per quarter by status and category",
    ),
    r(
        "get",
        "/api/v1/apikeys",
        On::Quarter,
        "Open311 API keys: names and dates (never the keys)",
    ),
    r(
        "post",
        "/api/v1/apikeys",
        On::Quarter,
        "Create an Open311 API key {name}; the key is in the answer, this once",
    ),
    r(
        "post",
        "/api/v1/apikeys/{id}/revoke",
        On::Quarter,
        "Revoke the Open311 API key with this name: refused at once",
    ),
    r(
        "get",
        "/api/v1/quarters",
        On::Center,
        "The roster with each quarter's sync state",
    ),
    r(
        "post",
        "/api/v1/quarters",
        On::Center,
        "Add a writer node to the roster {slug, name, peer}",
    ),
    r(
        "delete",
        "/api/v1/quarters/{slug}/writers/{peer}",
        On::Center,
        "Remove a writer key: disconnected and refused at once",
    ),
];

/// The routes a node of `role` serves.
pub fn routes_of(role: Role) -> impl Iterator<Item = &'static Route> {
    ROUTES.iter().filter(move |r| {
        matches!(
            (r.on, role),
            (On::Both, _) | (On::Quarter, Role::Quarter) | (On::Center, Role::Center)
        )
    })
}

/// The OpenAPI 3.1 document for a node of `role`.
pub fn document(role: Role) -> Value {
    let mut paths = serde_json::Map::new();
    for route in routes_of(role) {
        let params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": route.summary,
            "responses": {
                "200": {"description": "OK (201 when something was created)", "content": {"application/json": {}}},
                "400": {"$ref": "#/components/responses/Error"},
                "404": {"$ref": "#/components/responses/Error"},
                "409": {"$ref": "#/components/responses/Error"},
                "503": {"$ref": "#/components/responses/Error"}
            }
        });
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if route.method == "post" {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"type": "object"}}}});
        }
        let entry = paths.entry(route.path).or_insert_with(|| json!({}));
        entry[route.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": match role { Role::Quarter => "iq quarter node API", Role::Center => "iq centre node API" },
            "version": env!("CARGO_PKG_VERSION"),
            "license": {"name": "EUPL-1.2", "identifier": "EUPL-1.2"}
        },
        "paths": paths,
        "components": {
            "responses": {
                "Error": {
                    "description": "What was wrong and what to do",
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}
                    }}}
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_kind_documents_only_its_routes() {
        let q = document(Role::Quarter);
        let c = document(Role::Center);
        assert!(q["paths"]["/api/v1/concerns"]["post"].is_object());
        assert!(c["paths"]["/api/v1/concerns"]["post"].is_null());
        assert!(c["paths"]["/api/v1/frames"]["post"].is_object());
        assert!(q["paths"]["/api/v1/frames"].is_null());
        assert_eq!(
            q["paths"]["/api/v1/consultations/{id}/answer"]["post"]["parameters"][0]["name"],
            "id"
        );
    }
}
