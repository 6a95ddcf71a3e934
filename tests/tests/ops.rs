//! What an operator relies on, on real daemons: `/metrics` parsed by a
//! Prometheus text-format parser, `/healthz` and `/readyz`, and `backup` /
//! `restore` of a running node's store.

use std::process::Command;
use std::time::Duration;

use iq_tests::{Cluster, Kind, Node, Result, bin_dir, wait_until};
use prometheus_parse::{Scrape, Value};

/// `GET` on a node's HTTP server; (status, body). `host` overrides the Host header.
fn get(node: &Node, path: &str, host: Option<&str>) -> Result<(u16, String)> {
    let addr = std::fs::read_to_string(node.dir.join("api.addr")).map_err(|e| e.to_string())?;
    let mut req = ureq::get(&format!("http://{}{path}", addr.trim()));
    if let Some(h) = host {
        req = req.header("Host", h);
    }
    let mut resp = req
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .call()
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// Scrapes and parses a node's `/metrics`.
fn scrape(node: &Node) -> Result<Scrape> {
    let (status, text) = get(node, "/metrics", None)?;
    if status != 200 {
        return Err(format!("{}: /metrics answered {status}: {text}", node.name));
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .map_err(|e| format!("{}: /metrics does not parse: {e}\n{text}", node.name))
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn is_counter(scrape: &Scrape, name: &str) -> bool {
    scrape
        .samples
        .iter()
        .any(|s| s.metric == name && matches!(s.value, Value::Counter(_)))
}

#[test]
fn metrics_health_and_readiness_on_both_daemons() -> Result<()> {
    let mut c = Cluster::start(&["prohlis"])?;
    let quarter_peer = c.quarters[0].peer_id()?;
    let centre_peer = c.center.peer_id()?;
    c.quarters[0].add_concern("Broken bench")?;
    c.wait_converged(Duration::from_secs(20))?;

    for node in c.nodes() {
        for path in ["/healthz", "/readyz"] {
            let (status, body) = get(node, path, None)?;
            assert_eq!(status, 200, "{} {path}: {body}", node.name);
        }
        // Scraped from another machine: metrics and health answer any Host,
        // the API does not.
        let (status, _) = get(node, "/metrics", Some("prometheus.example:9090"))?;
        assert_eq!(
            status, 200,
            "{}: /metrics refused a foreign Host",
            node.name
        );
        let (status, _) = get(node, "/api/v1/status", Some("prometheus.example:9090"))?;
        assert_eq!(status, 403, "{}: the API served a foreign Host", node.name);
    }

    // The centre: per-quarter state, once the quarter confirmed everything.
    let m = wait_until(
        "the centre to see prohlis with no lag and nothing in flight",
        Duration::from_secs(20),
        || {
            let m = scrape(&c.center)?;
            let lag = value(&m, "iq_quarter_lag_changes", &[("quarter", "prohlis")]);
            // In sync, and every message acknowledged: nothing in flight.
            let in_flight = value(&m, "iq_sync_bytes_in_flight", &[]);
            Ok((lag == Some(0.0) && in_flight == Some(0.0)).then_some(m))
        },
    )?;
    let q = [("quarter", "prohlis")];
    assert_eq!(value(&m, "iq_quarter_connected", &q), Some(1.0));
    assert_eq!(value(&m, "iq_quarter_concerns", &q), Some(1.0));
    let age = value(&m, "iq_quarter_last_sync_age_seconds", &q).ok_or("no sync age")?;
    assert!(age >= 0.0, "sync age {age}");
    assert_eq!(value(&m, "iq_documents", &[]), Some(2.0));
    assert_eq!(value(&m, "iq_peers_connected", &[]), Some(1.0));
    assert!(value(&m, "iq_store_bytes", &[]).is_some_and(|b| b > 0.0));
    let p = [("peer", quarter_peer.as_str())];
    for counter in [
        "iq_sync_messages_sent_total",
        "iq_sync_messages_received_total",
        "iq_sync_bytes_sent_total",
        "iq_sync_bytes_received_total",
    ] {
        assert!(is_counter(&m, counter), "{counter} is not a counter");
        assert!(
            value(&m, counter, &p).is_some_and(|v| v > 0.0),
            "{counter} for the quarter is not positive"
        );
    }
    for direction in ["sent", "received"] {
        let d = [("direction", direction)];
        assert!(is_counter(&m, "iq_sync_wire_bytes_total"));
        assert!(
            value(&m, "iq_sync_wire_bytes_total", &d).is_some_and(|v| v > 0.0),
            "no sync bytes {direction} on the wire"
        );
    }
    // Every reason is reported; honest peers had nothing refused by the engine.
    for reason in ["connection", "request", "rate_limited", "message", "change"] {
        let n = value(&m, "iq_refusals_total", &[("reason", reason)]);
        assert!(n.is_some(), "no refusal counter for {reason}");
        if matches!(reason, "message" | "change") {
            assert_eq!(n, Some(0.0), "refusals {reason}");
        }
    }
    assert_eq!(
        value(
            &m,
            "iq_node_info",
            &[("role", "center"), ("peer_id", &centre_peer)]
        ),
        Some(1.0)
    );

    // The quarter: its own view, no per-quarter section.
    let m = scrape(&c.quarters[0])?;
    assert_eq!(value(&m, "iq_peers_connected", &[]), Some(1.0));
    assert!(
        value(
            &m,
            "iq_sync_bytes_received_total",
            &[("peer", &centre_peer)]
        )
        .is_some_and(|v| v > 0.0)
    );
    assert!(value(&m, "iq_quarter_connected", &q).is_none());
    assert_eq!(value(&m, "iq_node_info", &[("role", "quarter")]), Some(1.0));

    // A page's event stream is open: the first event comes at once, and the
    // stream does not keep the daemon from stopping cleanly.
    let addr =
        std::fs::read_to_string(c.quarters[0].dir.join("api.addr")).map_err(|e| e.to_string())?;
    let resp = ureq::get(&format!("http://{}/events", addr.trim()))
        .config()
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .call()
        .map_err(|e| format!("GET /events: {e}"))?;
    let mut events = resp.into_body().into_reader();
    let mut first = [0u8; 64];
    let n = std::io::Read::read(&mut events, &mut first).map_err(|e| e.to_string())?;
    let first = String::from_utf8_lossy(&first[..n]).into_owned();
    assert!(first.contains("event: change"), "{first:?}");
    let reader =
        std::thread::spawn(move || std::io::Read::read_to_end(&mut events, &mut Vec::new()));

    // The quarter goes down and the centre writes: it is offline and behind.
    c.quarters[0].stop()?;
    assert!(reader.join().is_ok(), "the event stream reader panicked");
    c.center.cli_ok(&[
        "directive",
        "issue",
        "--title",
        "Winter service",
        "--text",
        "Clear footpaths by 7:00",
        "--ack-due",
        "2099-01-31",
    ])?;
    wait_until(
        "the centre to report prohlis offline and behind",
        Duration::from_secs(20),
        || {
            let m = scrape(&c.center)?;
            let connected = value(&m, "iq_quarter_connected", &q);
            let lag = value(&m, "iq_quarter_lag_changes", &q).unwrap_or(0.0);
            Ok((connected == Some(0.0) && lag >= 1.0).then_some(()))
        },
    )?;
    Ok(())
}

fn run(kind: Kind, args: &[&str]) -> std::process::Output {
    let bin = bin_dir().join(match kind {
        Kind::Center => "iq-center",
        Kind::Quarter => "iq-node",
    });
    Command::new(bin)
        .args(args)
        .env_remove("IQ_DATA")
        .output()
        .unwrap_or_else(|e| panic!("cannot run: {e}"))
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn backup_of_a_running_node_restores_its_store_key_and_personal_data() -> Result<()> {
    let mut c = Cluster::start(&["prohlis"])?;
    let files = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = files.path().join("prohlis.iqbackup");
    let file_s = file.to_str().ok_or("path")?;
    let q = &mut c.quarters[0];
    let peer = q.peer_id()?;
    let concern = q.cli_ok(&[
        "concern",
        "add",
        "--category",
        "lighting",
        "--description",
        "Dark underpass",
        "--reporter-name",
        "Erika Muster",
    ])?;
    let concern = concern.trim().to_owned();

    // While the daemon runs.
    q.cli_ok(&["backup", "--to", file_s])?;
    let later = q.add_concern("Recorded after the backup")?;
    wait_until(
        "the centre to hold the concern recorded after the backup",
        Duration::from_secs(20),
        || {
            Ok(c.center
                .concern_ids(Some("prohlis"))?
                .contains(&later)
                .then_some(()))
        },
    )?;

    // A non-empty directory is not overwritten without --force, even stopped.
    q.stop()?;
    let out = q.cli(&["restore", "--from", file_s]);
    assert!(!out.status.success(), "restore overwrote a data directory");
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));

    // A damaged file is refused, and nothing is created.
    let bytes = std::fs::read(&file).map_err(|e| e.to_string())?;
    let damaged = files.path().join("damaged.iqbackup");
    std::fs::write(&damaged, &bytes[..bytes.len() - 10]).map_err(|e| e.to_string())?;
    let fresh = files.path().join("fresh");
    let fresh_s = fresh.to_str().ok_or("path")?;
    let out = run(
        Kind::Quarter,
        &[
            "restore",
            "--data",
            fresh_s,
            "--from",
            damaged.to_str().ok_or("path")?,
        ],
    );
    assert!(!out.status.success(), "a damaged backup was restored");
    assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    assert!(!fresh.exists(), "a refused restore left {fresh_s} behind");

    // A centre's binary refuses a quarter's backup.
    let out = run(
        Kind::Center,
        &["restore", "--data", fresh_s, "--from", file_s],
    );
    assert!(!out.status.success(), "iq-center restored a quarter backup");
    assert!(!fresh.exists());

    // Into a new directory: the same key, the concern and its reporter.
    let out = run(
        Kind::Quarter,
        &["restore", "--data", fresh_s, "--from", file_s],
    );
    assert!(out.status.success(), "restore failed: {}", stderr(&out));
    let id = run(Kind::Quarter, &["id", "--data", fresh_s]);
    assert_eq!(String::from_utf8_lossy(&id.stdout).trim(), peer);

    // With --force over the node's own directory, then started: the
    // concern and the reporter (local-only data) are back, and what was
    // recorded after the backup returns from the centre.
    q.cli_ok(&["restore", "--from", file_s, "--force"])?;
    let aside: Vec<_> = std::fs::read_dir(c.root.path())
        .map_err(|e| e.to_string())?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("prohlis.before-restore-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the old directory was not kept aside");
    let q = &mut c.quarters[0];
    q.start()?;
    let reporter = q.cli_ok(&["concern", "reporter", &concern])?;
    assert!(reporter.contains("Erika Muster"), "{reporter}");
    assert!(q.concern_ids(Some("prohlis"))?.contains(&concern));
    wait_until(
        "the concern recorded after the backup to return from the centre",
        Duration::from_secs(20),
        || {
            Ok(q.concern_ids(Some("prohlis"))?
                .contains(&later)
                .then_some(()))
        },
    )?;

    // A stopped node is backed up from its store directly.
    q.stop()?;
    let offline = files.path().join("offline.iqbackup");
    q.cli_ok(&["backup", "--to", offline.to_str().ok_or("path")?])?;
    let again = files.path().join("again");
    let out = run(
        Kind::Quarter,
        &[
            "restore",
            "--data",
            again.to_str().ok_or("path")?,
            "--from",
            offline.to_str().ok_or("path")?,
        ],
    );
    assert!(out.status.success(), "restore failed: {}", stderr(&out));
    Ok(())
}
