//! The HTTP API as a client sees it: every route in each daemon's OpenAPI
//! description answers (with data, or with a JSON error that says what is
//! wrong) — none is missing from the router — and bad requests get 4xx
//! JSON errors.

use iq_tests::{Cluster, Node, Result};
use serde_json::{Value, json};

/// Calls every documented route of `node` with placeholder ids and an empty body.
fn every_documented_route_answers(node: &Node) -> Result<usize> {
    let (status, text) = node.api_call("get", "/api/v1/openapi.json", None)?;
    assert_eq!(status, 200, "{}: openapi.json: {text}", node.name);
    let doc: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().ok_or("no paths")?;
    let mut calls = 0;
    for (path, ops) in paths {
        let concrete = path
            .replace("{id}", "no-such-id")
            .replace("{slug}", "nope")
            .replace("{peer}", "not-a-peer");
        for method in ops.as_object().ok_or("no operations")?.keys() {
            let body = (method == "post").then(|| json!({}));
            let (status, text) = node.api_call(method, &concrete, body.as_ref())?;
            calls += 1;
            let parsed: Value = serde_json::from_str(&text).map_err(|_| {
                format!(
                    "{}: {method} {path} answered {status} without JSON (not routed?): {text:?}",
                    node.name
                )
            })?;
            let error = parsed["error"].as_str().unwrap_or_default();
            assert!(
                !error.starts_with("no such route"),
                "{}: {method} {path} is documented but not routed",
                node.name
            );
            match status {
                200 | 201 => {}
                400 | 404 | 409 => assert!(
                    !error.is_empty(),
                    "{}: {method} {path} {status} without an error message: {text}",
                    node.name
                ),
                other => {
                    return Err(format!(
                        "{}: {method} {path} answered {other}: {text}",
                        node.name
                    ));
                }
            }
        }
    }
    Ok(calls)
}

#[test]
fn every_documented_route_is_served_and_errors_are_json() -> Result<()> {
    let c = Cluster::start(&["prohlis"])?;
    let centre_calls = every_documented_route_answers(&c.center)?;
    let quarter_calls = every_documented_route_answers(&c.quarters[0])?;
    assert!(
        centre_calls >= 15 && quarter_calls >= 15,
        "too few routes documented: {centre_calls}, {quarter_calls}"
    );
    // A route of the other node kind is not served.
    let (status, text) = c.quarters[0].api_call("post", "/api/v1/frames", Some(&json!({})))?;
    assert_eq!(status, 404, "a quarter node must not set frames: {text}");
    assert!(text.contains("openapi.json"), "{text}");
    // A request addressed to another host (DNS rebinding from a browser) is refused.
    let addr = std::fs::read_to_string(c.center.dir.join("api.addr")).map_err(|e| e.to_string())?;
    let resp = ureq::get(&format!("http://{}/api/v1/quarters", addr.trim()))
        .header("Host", "evil.example:80")
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .map_err(|e| e.to_string())?;
    assert_eq!(
        resp.status().as_u16(),
        403,
        "a foreign Host header was served"
    );
    // Malformed JSON is a 400 that says so.
    let (status, text) =
        c.quarters[0].api_call("post", "/api/v1/concerns", Some(&json!({"category": 5})))?;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("invalid concern"), "{text}");
    Ok(())
}

#[test]
fn heads_long_poll_answers_when_a_document_changes() -> Result<()> {
    let c = Cluster::start(&["prohlis"])?;
    // The roster reaching the quarter would move its version too.
    c.wait_converged(std::time::Duration::from_secs(20))?;
    let quarter = &c.quarters[0];
    let before = quarter.api_get("/api/v1/heads")?;
    let version = before["version"].as_u64().ok_or("no version")?;
    let doc = &before["documents"]["quarter/prohlis"];
    assert!(doc.is_array(), "no heads for the own document: {before}");
    // Nothing changes: the wait runs out and the same version comes back.
    let idle = quarter.api_get(&format!("/api/v1/heads?after={version}&wait_ms=200"))?;
    assert_eq!(idle["version"].as_u64(), Some(version), "{idle}");
    // A long poll that is waiting answers once a concern is recorded.
    let changed = std::thread::scope(|s| {
        let poll =
            s.spawn(|| quarter.api_get(&format!("/api/v1/heads?after={version}&wait_ms=15000")));
        let id = quarter.add_concern("heads long poll")?;
        let changed = poll.join().map_err(|_| "the poll panicked".to_string())??;
        Ok::<_, String>((id, changed))
    });
    let (_, changed) = changed?;
    assert!(
        changed["version"].as_u64() > Some(version),
        "the version did not grow: {changed}"
    );
    assert_ne!(&changed["documents"]["quarter/prohlis"], doc, "{changed}");
    // A malformed query says what is expected.
    let (status, text) = quarter.api_call("get", "/api/v1/heads?after=soon", None)?;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("after=VERSION"), "{text}");
    Ok(())
}
