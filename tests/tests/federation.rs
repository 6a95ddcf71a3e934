//! The foundation's core loop across real processes on loopback: record at a
//! quarter, durable there, reaches the centre and through it every quarter —
//! also after a node was killed or the centre was down.

use std::collections::BTreeSet;
use std::time::Duration;

use iq_tests::{Cluster, Result, wait_until};

const QUARTERS: [&str; 3] = ["johannstadt", "friedrichstadt", "prohlis"];

fn ids(v: Vec<String>) -> BTreeSet<String> {
    v.into_iter().collect()
}

/// Waits until `node` holds every id in `expected` for `quarter`.
fn wait_holds(
    c: &Cluster,
    quarter: &str,
    expected: &BTreeSet<String>,
    timeout: Duration,
) -> Result<()> {
    for node in c.nodes().filter(|n| n.is_running()) {
        wait_until(
            &format!(
                "{} to hold {quarter}'s {} concerns",
                node.name,
                expected.len()
            ),
            timeout,
            || {
                let held = ids(node.concern_ids(Some(quarter))?);
                let missing = expected.difference(&held).count();
                Ok((missing == 0).then_some(()).or_else(|| {
                    let _ = missing;
                    None
                }))
            },
        )?;
    }
    Ok(())
}

#[test]
fn three_quarters_converge_after_100_concerns_each() -> Result<()> {
    let c = Cluster::start(&QUARTERS)?;
    let written: Vec<BTreeSet<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = c
            .quarters
            .iter()
            .map(|q| {
                s.spawn(move || {
                    (0..100)
                        .map(|i| q.add_concern(&format!("{} #{i}", q.name)))
                        .collect::<Result<BTreeSet<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("writer panicked".into())))
            .collect::<Result<Vec<_>>>()
    })?;
    // The bound: identical heads for all four documents within 10 s.
    let heads = c.wait_converged(Duration::from_secs(10))?;
    assert_eq!(
        heads.len(),
        4,
        "expected city + 3 quarter documents: {heads:?}"
    );
    for (q, expected) in QUARTERS.iter().zip(&written) {
        assert_eq!(expected.len(), 100);
        for node in c.nodes() {
            assert_eq!(
                &ids(node.concern_ids(Some(q))?),
                expected,
                "{} on {q}",
                node.name
            );
        }
    }
    // A CLI user sees the same through --json.
    let listed = c.center.cli_json(&["concerns", "--quarter", "prohlis"])?;
    let first = &listed.as_array().ok_or("not a list")?[0];
    for field in ["id", "quarter", "category", "description", "status"] {
        assert!(
            first.get(field).is_some(),
            "--json concern lacks {field}: {first}"
        );
    }
    assert_eq!(first["quarter"], "prohlis");
    Ok(())
}

#[test]
fn killed_quarter_catches_up_and_keeps_what_it_acknowledged() -> Result<()> {
    let mut c = Cluster::start(&QUARTERS)?;
    let mut johannstadt: BTreeSet<String> = (0..20)
        .map(|i| c.quarters[0].add_concern(&format!("before {i}")))
        .collect::<Result<_>>()?;
    c.wait_converged(Duration::from_secs(10))?;
    // Acknowledged right before the kill: may not have left the node yet.
    for i in 0..10 {
        johannstadt.insert(c.quarters[0].add_concern(&format!("just before kill {i}"))?);
    }
    c.quarter("johannstadt").kill();
    let mut others = BTreeSet::new();
    for i in 0..15 {
        others.insert(c.quarters[1].add_concern(&format!("while johannstadt is down {i}"))?);
        others.insert(c.quarters[2].add_concern(&format!("while johannstadt is down {i}"))?);
    }
    c.quarter("johannstadt").restart()?;
    // Right after restart, before any sync can matter, its own records are there.
    let held = ids(c.quarters[0].concern_ids(Some("johannstadt"))?);
    assert!(
        johannstadt.is_subset(&held),
        "johannstadt lost {} acknowledged concerns",
        johannstadt.difference(&held).count()
    );
    c.wait_converged(Duration::from_secs(20))?;
    wait_holds(&c, "johannstadt", &johannstadt, Duration::from_secs(5))?;
    let caught_up = ids(c.quarters[0].concern_ids(None)?);
    assert!(
        others.is_subset(&caught_up),
        "johannstadt did not catch up on the others' concerns"
    );
    Ok(())
}

#[test]
fn concerns_recorded_while_the_centre_is_down_arrive_after_it_returns() -> Result<()> {
    let mut c = Cluster::start(&QUARTERS)?;
    c.wait_converged(Duration::from_secs(10))?;
    c.center.kill();
    let mut written = Vec::new();
    for q in &c.quarters {
        let mine: BTreeSet<String> = (0..10)
            .map(|i| q.add_concern(&format!("offline {i}")))
            .collect::<Result<_>>()?;
        written.push(mine);
    }
    c.center.restart()?;
    c.wait_converged(Duration::from_secs(20))?;
    for (q, expected) in QUARTERS.iter().zip(&written) {
        wait_holds(&c, q, expected, Duration::from_secs(5))?;
    }
    Ok(())
}

/// A catch-up message is mostly change chunks that repeat their fields:
/// between nodes of this version it travels deflated (`/iq/sync/2`), and the
/// wire counters show fewer bytes than the sync messages hold.
#[test]
fn a_catch_up_travels_deflated() -> Result<()> {
    let mut c = Cluster::start(&["prohlis"])?;
    c.wait_converged(Duration::from_secs(10))?;
    c.center.kill();
    let written: BTreeSet<String> = (0..100)
        .map(|i| c.quarters[0].add_concern(&format!("Pothole number {i} at the corner")))
        .collect::<Result<_>>()?;
    c.center.restart()?;
    wait_holds(&c, "prohlis", &written, Duration::from_secs(20))?;
    c.wait_converged(Duration::from_secs(10))?;
    // The restarted centre counts from its start: what came in is the
    // catch-up (and the few messages that settle the sessions).
    let status = c.center.api_get("/api/v1/status")?;
    let messages: u64 = status["peers"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|p| p["total_bytes_received"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    let wire = status["wire"]["received"]
        .as_u64()
        .ok_or("no wire bytes in status")?;
    eprintln!("catch-up into the centre: {messages} B of sync messages, {wire} B on the wire");
    // 100 changes of about 400 B, and the signatures that vouch for them.
    assert!(messages > 40_000, "only {messages} B of sync messages");
    assert!(
        wire * 10 < messages * 6,
        "{wire} B on the wire for {messages} B of sync messages: not deflated"
    );
    Ok(())
}

/// A node's answer without changes to a peer's message rides in its
/// acknowledgement of that message: a live write reaches the centre and
/// every other quarter with one stream each, and every answer comes back
/// in an acknowledgement instead of as a request of its own.
#[test]
fn answers_without_changes_travel_in_acknowledgements() -> Result<()> {
    let c = Cluster::start(&QUARTERS)?;
    c.wait_converged(Duration::from_secs(10))?;
    let answers = |n: &iq_tests::Node| -> Result<(u64, u64)> {
        let s = n.api_get("/api/v1/status")?;
        let count = |field: &str| {
            s["wire"][field]
                .as_u64()
                .ok_or(format!("no wire.{field} in {}'s status", n.name))
        };
        Ok((count("answers_sent")?, count("answers_received")?))
    };
    let before: Vec<(u64, u64)> = c.nodes().map(answers).collect::<Result<_>>()?;
    let writer = &c.quarters[0];
    let mut written = BTreeSet::new();
    for i in 0..5 {
        written.insert(writer.add_concern(&format!("Bench {i} broken"))?);
        wait_holds(&c, &writer.name, &written, Duration::from_secs(10))?;
    }
    let after: Vec<(u64, u64)> = c.nodes().map(answers).collect::<Result<_>>()?;
    let grew: Vec<(u64, u64)> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a.0 - b.0, a.1 - b.1))
        .collect();
    eprintln!("answers (sent, received) per node for 5 writes: {grew:?}");
    // nodes(): the centre, then the quarters in order.
    let (centre, writer, others) = (grew[0], grew[1], &grew[2..]);
    assert!(
        centre.0 >= 5,
        "the centre answered the writer in {} acks",
        centre.0
    );
    assert!(writer.1 >= 5, "the writer got {} answers in acks", writer.1);
    for (i, q) in others.iter().enumerate() {
        assert!(
            q.0 >= 5,
            "quarter {} answered {} relays in acks",
            i + 1,
            q.0
        );
    }
    assert!(
        centre.1 >= 10,
        "the centre got {} answers to its relays in acks",
        centre.1
    );
    Ok(())
}

#[test]
fn killed_centre_loses_nothing_it_acknowledged() -> Result<()> {
    let mut c = Cluster::start(&QUARTERS)?;
    let mut expected = BTreeSet::new();
    for q in &c.quarters {
        for i in 0..20 {
            expected.insert(q.add_concern(&format!("{} {i}", q.name))?);
        }
    }
    // Once the centre lists them, it has acknowledged them (durably).
    wait_until(
        "the centre to hold all concerns",
        Duration::from_secs(10),
        || Ok((ids(c.center.concern_ids(None)?) == expected).then_some(())),
    )?;
    let roster_before = c.center.cli_json(&["quarters"])?;
    // Take the quarters away first so nothing can be re-fetched from them.
    for q in &mut c.quarters {
        q.kill();
    }
    c.center.kill();
    c.center.start()?;
    assert_eq!(
        ids(c.center.concern_ids(None)?),
        expected,
        "the centre lost acknowledged concerns"
    );
    let roster_after = c.center.cli_json(&["quarters"])?;
    let slugs = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|q| q["slug"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        slugs(&roster_after),
        slugs(&roster_before),
        "the centre lost roster entries"
    );
    assert_eq!(slugs(&roster_after).len(), 3);
    Ok(())
}

#[test]
fn reconnecting_in_sync_sends_only_a_few_hundred_bytes_per_document() -> Result<()> {
    let mut c = Cluster::start(&QUARTERS)?;
    for q in &c.quarters {
        for i in 0..50 {
            q.add_concern(&format!("{} {i}", q.name))?;
        }
    }
    c.wait_converged(Duration::from_secs(15))?;
    let total = |s: &serde_json::Value, field: &str| -> u64 {
        s["peers"]
            .as_array()
            .map(|p| p.iter().filter_map(|p| p[field].as_u64()).sum())
            .unwrap_or(0)
    };
    let full = total(
        &c.quarters[2].api_get("/api/v1/status")?,
        "session_bytes_received",
    );
    c.quarter("prohlis").stop()?;
    c.quarter("prohlis").start()?;
    c.wait_converged(Duration::from_secs(10))?;
    // Let the exchange settle: all three peers (centre and two quarters) up
    // and the counters no longer moving.
    let status = wait_until(
        "prohlis's traffic to settle",
        Duration::from_secs(10),
        || {
            let a = c.quarters[2].api_get("/api/v1/status")?;
            std::thread::sleep(Duration::from_millis(500));
            let b = c.quarters[2].api_get("/api/v1/status")?;
            let connected = b["peers"]
                .as_array()
                .map(|p| p.iter().filter(|p| p["connected"] == true).count());
            let settled = total(&a, "session_bytes_sent") == total(&b, "session_bytes_sent");
            Ok((settled && connected == Some(3)).then_some(b))
        },
    )?;
    let docs = status["documents"].as_array().ok_or("no documents")?.len() as u64;
    let sessions = docs * 3;
    let sent = total(&status, "session_bytes_sent");
    let received = total(&status, "session_bytes_received");
    eprintln!(
        "reconnect: {docs} documents × 3 peers, sent {sent} B, received {received} B (first sync received {full} B)"
    );
    assert_eq!(docs, 4);
    assert!(
        sent > 0 && received > 0,
        "no exchange on reconnect was counted"
    );
    assert!(
        sent / sessions <= 400,
        "sent {sent} B for {sessions} (peer, document) sessions on reconnect"
    );
    assert!(
        received / sessions <= 400,
        "received {received} B for {sessions} sessions on reconnect"
    );
    assert!(
        full > 10 * received,
        "first sync ({full} B) should dwarf the reconnect ({received} B)"
    );
    Ok(())
}

#[test]
fn quarters_keep_syncing_with_each_other_while_the_centre_is_down() -> Result<()> {
    let mut c = Cluster::start(&["johannstadt", "prohlis"])?;
    c.wait_converged(Duration::from_secs(10))?;
    // The quarters have found each other through the addresses they advertise.
    wait_until(
        "the quarters to connect directly",
        Duration::from_secs(10),
        || {
            let status = c.quarters[0].api_get("/api/v1/status")?;
            let up = status["peers"]
                .as_array()
                .map(|p| p.iter().filter(|p| p["connected"] == true).count())
                .unwrap_or(0);
            Ok((up == 2).then_some(()))
        },
    )?;
    c.center.kill();
    let from_j = c.quarters[0].add_concern("written while the centre is down")?;
    let from_p = c.quarters[1].add_concern("also written while the centre is down")?;
    wait_until(
        "the quarters to exchange their concerns directly",
        Duration::from_secs(10),
        || {
            let at_p = c.quarters[1].concern_ids(Some("johannstadt"))?;
            let at_j = c.quarters[0].concern_ids(Some("prohlis"))?;
            Ok((at_p.contains(&from_j) && at_j.contains(&from_p)).then_some(()))
        },
    )?;
    c.center.restart()?;
    c.wait_converged(Duration::from_secs(20))?;
    let at_centre = ids(c.center.concern_ids(None)?);
    assert!(
        at_centre.contains(&from_j) && at_centre.contains(&from_p),
        "the centre missed what was written while it was down"
    );
    Ok(())
}

/// A quarter node initialised with `--replicate own` holds its own
/// document and the city's, never another quarter's: its concerns reach the
/// centre and the other quarters, theirs do not reach it. While the centre
/// is down its own document still goes to the other quarters directly.
#[test]
fn a_quarter_replicating_its_own_only_holds_no_other_quarter() -> Result<()> {
    let mut c = Cluster::start(&["johannstadt"])?;
    let (node, peer) = c.init_quarter_with("prohlis", &["--replicate", "own"])?;
    c.add_to_roster("prohlis", &peer)?;
    c.quarters.push(node);
    c.quarters[1].start()?;
    let (j, p) = (&c.quarters[0], &c.quarters[1]);
    let status = p.api_get("/api/v1/status")?;
    assert_eq!(status["replicate"], "own", "{status}");
    assert_eq!(j.api_get("/api/v1/status")?["replicate"], "all");
    let from_j = j.add_concern("bench broken in the park")?;
    let from_p = p.add_concern("streetlight out")?;
    let timeout = Duration::from_secs(15);
    for node in [&c.center, j] {
        wait_until(
            &format!("{} to hold prohlis' concern", node.name),
            timeout,
            || {
                Ok(node
                    .concern_ids(Some("prohlis"))?
                    .contains(&from_p)
                    .then_some(()))
            },
        )?;
    }
    wait_until("the centre to hold johannstadt's concern", timeout, || {
        Ok(c.center
            .concern_ids(Some("johannstadt"))?
            .contains(&from_j)
            .then_some(()))
    })?;
    // Give johannstadt's document every chance to travel on, then look.
    std::thread::sleep(Duration::from_secs(2));
    let docs: Vec<String> = p.api_get("/api/v1/heads")?["documents"]
        .as_object()
        .ok_or("heads without documents")?
        .keys()
        .cloned()
        .collect();
    assert_eq!(docs, ["city", "quarter/prohlis"]);
    let everything = ids(p.concern_ids(None)?);
    assert_eq!(
        everything,
        ids(vec![from_p.clone()]),
        "prohlis holds another quarter's concern"
    );

    // The centre gone, prohlis' new concern reaches johannstadt directly.
    c.center.kill();
    let (j, p) = (&c.quarters[0], &c.quarters[1]);
    let later = p.add_concern("written while the centre is down")?;
    wait_until(
        "johannstadt to get prohlis' concern without the centre",
        Duration::from_secs(20),
        || {
            Ok(j.concern_ids(Some("prohlis"))?
                .contains(&later)
                .then_some(()))
        },
    )?;
    assert!(!ids(p.concern_ids(None)?).contains(&from_j));

    // Set back to `all` while stopped, it takes up the other quarters.
    c.center.restart()?;
    let p = &mut c.quarters[1];
    p.stop()?;
    let config = p.dir.join("config.toml");
    let text = std::fs::read_to_string(&config).map_err(|e| e.to_string())?;
    assert!(text.contains("replicate = \"own\""), "{text}");
    std::fs::write(
        &config,
        text.replace("replicate = \"own\"", "replicate = \"all\""),
    )
    .map_err(|e| e.to_string())?;
    p.start()?;
    wait_until(
        "prohlis, set to replicate all, to hold johannstadt's concern",
        Duration::from_secs(20),
        || {
            Ok(p.concern_ids(Some("johannstadt"))?
                .contains(&from_j)
                .then_some(()))
        },
    )?;
    assert_eq!(p.api_get("/api/v1/status")?["replicate"], "all");
    Ok(())
}

/// A centre that has never held a quarter's document (a new one, or one
/// rebuilt elsewhere) reaches the quarter at the address the roster gives
/// for it (`iq-center quarter add --addr`), here even though the quarter's
/// own address for the centre is stale; a quarter registered without one
/// waits for its own dial, which goes nowhere.
#[test]
fn the_centre_dials_a_quarter_at_its_roster_address() -> Result<()> {
    let mut c = Cluster::start(&[])?;
    let centre_peer = c
        .center_addr
        .rsplit_once("/p2p/")
        .map(|(_, p)| p.to_owned())
        .ok_or("the centre's address has no /p2p/")?;
    // Nothing listens there: the port was free and is not used again.
    let port = iq_protocol::datadir::free_port(std::net::Ipv4Addr::LOCALHOST.into())
        .map_err(|e| format!("no free loopback port: {e}"))?;
    let stale = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{centre_peer}");
    let (reached, reached_peer) = c.init_quarter("johannstadt")?;
    c.add_to_roster_at("johannstadt", &reached, &reached_peer)?;
    let (unreached, unreached_peer) = c.init_quarter("prohlis")?;
    c.add_to_roster("prohlis", &unreached_peer)?;
    for q in [&reached, &unreached] {
        let path = q.dir.join("config.toml");
        let config = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        if !config.contains(&c.center_addr) {
            return Err(format!(
                "{} does not name the centre: {config}",
                path.display()
            ));
        }
        std::fs::write(&path, config.replace(&c.center_addr, &stale)).map_err(|e| e.to_string())?;
    }
    c.quarters.push(reached);
    c.quarters.push(unreached);
    for q in &mut c.quarters {
        q.start()?;
    }
    let arrives = c.quarters[0].add_concern("Pothole at the roster address")?;
    let stays = c.quarters[1].add_concern("Pothole behind a stale address")?;
    wait_until(
        "the centre to hold johannstadt's concern",
        Duration::from_secs(30),
        || {
            let held = c.center.concern_ids(Some("johannstadt"))?;
            Ok(held.contains(&arrives).then_some(()))
        },
    )?;
    let status = c.center.api_get("/api/v1/status")?;
    let connected = |peer: &str| {
        status["peers"].as_array().is_some_and(|peers| {
            peers
                .iter()
                .any(|p| p["peer_id"] == peer && p["connected"] == true)
        })
    };
    assert!(connected(&reached_peer), "johannstadt connected: {status}");
    assert!(
        !connected(&unreached_peer),
        "prohlis not connected: {status}"
    );
    assert!(
        !c.center.concern_ids(Some("prohlis"))?.contains(&stays),
        "prohlis's concern cannot have reached the centre"
    );
    Ok(())
}
