//! iq itself: real `iq-center` and `iq-node` processes on loopback, driven
//! through their HTTP API. Waits are long polls on `GET /api/v1/heads`
//! (the node answers when its documents change), so measuring does not
//! load the nodes with polling.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use iq_tests::{Cluster, Endpoint, Node, Result, wait_until};
use serde_json::{Value, json};

use crate::{Rng, Stats};

/// Document id → sorted heads.
pub type DocHeads = BTreeMap<String, Vec<String>>;

/// One answer of `GET /api/v1/heads`.
#[derive(Debug)]
struct Heads {
    version: u64,
    docs: DocHeads,
}

/// What the iq runs are given.
#[derive(Debug, Clone)]
pub struct Config {
    pub quarters: usize,
    pub concerns: usize,
    pub live_writes: usize,
    pub seed: u64,
    /// Threads recording concerns in the (untimed) offline phase.
    pub writers: usize,
    /// Concerns every other quarter records while one is offline (0: no
    /// rejoin run).
    pub rejoin: usize,
    /// Bound on every wait.
    pub timeout: Duration,
    /// Quarter nodes replicate their own document and the city's only
    /// (`iq-node init --replicate own`): nothing is measured that needs a
    /// quarter to hold the others' documents.
    pub own_only: bool,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn get_heads(agent: &ureq::Agent, base: &str, after: Option<u64>, wait_ms: u64) -> Result<Heads> {
    let url = match after {
        Some(v) => format!("{base}/api/v1/heads?after={v}&wait_ms={wait_ms}"),
        None => format!("{base}/api/v1/heads"),
    };
    let body = iq_tests::get_json_with(agent, &url)?;
    let version = body["version"].as_u64().ok_or("heads without a version")?;
    let docs = body["documents"]
        .as_object()
        .ok_or("heads without documents")?
        .iter()
        .map(|(id, heads)| {
            let list = heads
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|h| h.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            (id.clone(), list)
        })
        .collect();
    Ok(Heads { version, docs })
}

fn heads_now(ep: &Endpoint, agent: &ureq::Agent) -> Result<Heads> {
    ep.call(|base| get_heads(agent, base, None, 0))
}

/// Long-polls `ep` until `done` holds for its heads; returns when (since `t0`).
fn wait_heads(
    ep: &Endpoint,
    t0: Instant,
    timeout: Duration,
    mut done: impl FnMut(&DocHeads) -> bool,
) -> Result<Duration> {
    let agent = agent();
    let mut after = None;
    loop {
        let h = ep.call(|base| get_heads(&agent, base, after, 1000))?;
        if done(&h.docs) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return Err(format!("{}: not there after {timeout:?}", ep.name));
        }
        after = Some(h.version);
    }
}

/// Whether `held` has every document of `expected` at exactly its heads.
fn holds(held: &DocHeads, expected: &DocHeads) -> bool {
    expected.iter().all(|(d, h)| held.get(d) == Some(h))
}

/// Sum of a peer counter over a node's peers.
fn peer_sum(status: &Value, field: &str) -> u64 {
    status["peers"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p[field].as_u64()).sum())
        .unwrap_or(0)
}

fn connected_peers(status: &Value) -> usize {
    status["peers"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["connected"] == true).count())
        .unwrap_or(0)
}

/// Waits until the counter `field` of every node in `nodes` stops moving
/// (equal over half a second); returns the statuses.
fn settled(nodes: &[&Node], field: &str, timeout: Duration) -> Result<Vec<Value>> {
    let read =
        || -> Result<Vec<Value>> { nodes.iter().map(|n| n.api_get("/api/v1/status")).collect() };
    wait_until("traffic to settle", timeout, || {
        let a = read()?;
        std::thread::sleep(Duration::from_millis(500));
        let b = read()?;
        let same = a
            .iter()
            .zip(&b)
            .all(|(x, y)| peer_sum(x, field) == peer_sum(y, field));
        Ok(same.then_some(b))
    })
}

/// Bytes of all files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// Peak resident memory (VmHWM) of a running node, in KiB.
fn peak_rss_kib(node: &Node) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid()?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Writes `m` concerns at every quarter, `writers` quarters at a time.
fn record(quarters: &[Node], m: usize, writers: usize) -> Result<()> {
    let next = Mutex::new(0usize);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..writers.max(1))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = {
                            let mut n = next.lock().map_err(|_| "writer lock poisoned")?;
                            *n += 1;
                            *n - 1
                        };
                        let Some(q) = quarters.get(i) else {
                            return Ok(());
                        };
                        for n in 0..m {
                            q.add_concern(&format!("Pothole number {n} at the corner"))?;
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|_| Err("a writer panicked".into())))
    })
}

/// The cluster after P1: every quarter connected and converged.
pub struct Run {
    pub cluster: Cluster,
    slugs: Vec<String>,
}

/// P1: Q quarters record M concerns each while the centre is down and they
/// know nothing of each other; then the centre starts. The roster gives
/// each quarter's address, so the centre dials them all once it has loaded
/// (and the quarters redial it every second meanwhile). Times are from the
/// centre's process start.
pub fn catch_up(cfg: &Config) -> Result<(Run, Value)> {
    let slugs: Vec<String> = (0..cfg.quarters).map(|i| format!("q{i:03}")).collect();
    let mut c = Cluster::start(&[])?;
    let scope: &[&str] = if cfg.own_only {
        &["--replicate", "own"]
    } else {
        &[]
    };
    for slug in &slugs {
        let (node, peer) = c.init_quarter_with(slug, scope)?;
        // As the city's operators register an office: its key and where
        // it listens, so the centre dials it as soon as it starts.
        c.add_to_roster_at(slug, &node, &peer)?;
        c.quarters.push(node);
    }
    c.center.stop()?;
    for q in &mut c.quarters {
        q.start()?;
    }
    let rec = Instant::now();
    record(&c.quarters, cfg.concerns, cfg.writers)?;
    let recorded = rec.elapsed();
    eprintln!(
        "iq: recorded {} concerns offline in {recorded:.1?}",
        cfg.quarters * cfg.concerns
    );
    let agent = agent();
    let mut expected = DocHeads::new();
    for (slug, q) in slugs.iter().zip(&c.quarters) {
        let doc = format!("quarter/{slug}");
        let heads = heads_now(&q.endpoint(), &agent)?;
        let own = heads.docs.get(&doc).ok_or(format!("{slug} lacks {doc}"))?;
        expected.insert(doc, own.clone());
    }

    let t0 = Instant::now();
    c.center.start()?;
    let centre_ready = t0.elapsed();
    let centre = c.center.endpoint();
    // When each quarter's document was first complete at the centre: the
    // last one is P1's time to the centre, the middle one what a typical
    // quarter sees.
    let mut arrived: BTreeMap<String, Duration> = BTreeMap::new();
    let to_centre = wait_heads(&centre, t0, cfg.timeout, |held| {
        for (d, h) in held {
            if expected.get(d) == Some(h) && !arrived.contains_key(d) {
                arrived.insert(d.clone(), t0.elapsed());
            }
        }
        holds(held, &expected)
    })?;
    // The document that came last, to look for in the nodes' logs.
    let last_doc = arrived
        .iter()
        .max_by_key(|(_, t)| **t)
        .map(|(d, _)| d.clone());
    let arrivals: Vec<Duration> = arrived.into_values().collect();
    let first_doc = arrivals.iter().min().copied();
    eprintln!("iq: P1 the centre holds every document after {to_centre:.2?}");
    let mut everything = expected.clone();
    let city = heads_now(&centre, &agent)?
        .docs
        .get("city")
        .cloned()
        .ok_or("the centre has no city document")?;
    everything.insert("city".into(), city);
    let to_all = if cfg.own_only {
        None
    } else {
        Some(every_quarter_holds(&c, &everything, t0, cfg.timeout)?)
    };
    let nodes: Vec<&Node> = c.nodes().collect();
    let statuses = settled(&nodes, "total_bytes_sent", cfg.timeout)?;
    let all_bytes: u64 = statuses
        .iter()
        .map(|s| peer_sum(s, "total_bytes_sent"))
        .sum();
    let centre_received = peer_sum(&statuses[0], "total_bytes_received");
    let centre_sent = peer_sum(&statuses[0], "total_bytes_sent");
    // As the streams carried them: deflated between nodes of this version.
    let all_wire: u64 = statuses
        .iter()
        .map(|s| s["wire"]["sent"].as_u64().unwrap_or(0))
        .sum();
    let centre_received_wire = statuses[0]["wire"]["received"].as_u64().unwrap_or(0);
    let result = json!({
        "quarters": cfg.quarters,
        "concerns_per_quarter": cfg.concerns,
        "record_offline_s": recorded.as_secs_f64(),
        "centre_ready_ms": ms(centre_ready),
        "first_document_at_centre_ms": first_doc.map(ms),
        "documents_at_centre_ms": Stats::of(&arrivals).json(),
        "last_document_at_centre": last_doc,
        "to_centre_ms": ms(to_centre),
        "to_all_ms": to_all.map(ms),
        "centre_received_bytes": centre_received,
        "centre_sent_bytes": centre_sent,
        "all_bytes": all_bytes,
        "centre_received_wire_bytes": centre_received_wire,
        "all_wire_bytes": all_wire,
    });
    Ok((Run { cluster: c, slugs }, result))
}

/// When every quarter holds `everything` (since `t0`): the last one's time.
fn every_quarter_holds(
    c: &Cluster,
    everything: &DocHeads,
    t0: Instant,
    timeout: Duration,
) -> Result<Duration> {
    let times = std::thread::scope(|s| {
        let waits: Vec<_> = c
            .quarters
            .iter()
            .map(|q| {
                let ep = q.endpoint();
                s.spawn(move || wait_heads(&ep, t0, timeout, |held| holds(held, everything)))
            })
            .collect();
        waits
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("a waiter panicked".into())))
            .collect::<Result<Vec<Duration>>>()
    })?;
    Ok(times.into_iter().max().unwrap_or_default())
}

/// P3 and P4 on the converged cluster: memory and disk, then the cold start
/// of the centre and of one quarter, each with the bytes its reconnect costs.
pub fn scale_and_reconnect(run: &mut Run, cfg: &Config) -> Result<(Value, Value)> {
    let c = &mut run.cluster;
    let q = cfg.quarters;
    let docs = q + 1;
    let centre_peak = peak_rss_kib(&c.center);
    let quarter_peak = c.quarters.iter().filter_map(peak_rss_kib).max();
    let centre_disk = dir_bytes(&c.center.dir);
    let quarter_disk: Vec<u64> = c.quarters.iter().map(|n| dir_bytes(&n.dir)).collect();
    let quarter_disk_mean = quarter_disk.iter().sum::<u64>() / quarter_disk.len().max(1) as u64;
    let concerns_held = q * cfg.concerns;

    c.center.stop()?;
    let t = Instant::now();
    c.center.start()?;
    let centre_cold = t.elapsed();
    loaded(&c.center, cfg.timeout)?;
    let centre_loaded = t.elapsed();
    // Sessions per quarter with the centre: every document, or (own only)
    // the city's and its own.
    let per_quarter = if cfg.own_only { 2 } else { docs };
    let centre_reconnect = reconnect(&c.center, q, q * per_quarter, docs, cfg.timeout)?;

    let quarter = &mut c.quarters[0];
    quarter.stop()?;
    let t = Instant::now();
    quarter.start()?;
    let quarter_cold = t.elapsed();
    loaded(quarter, cfg.timeout)?;
    let quarter_loaded = t.elapsed();
    // A quarter connects to the centre and every other quarter, but syncs
    // with the others only while the centre is gone (they stay passive).
    // One that replicates its own document only learns no other quarter's
    // address (they are in the documents it does not hold): the centre alone.
    let quarter_reconnect = if cfg.own_only {
        reconnect(&c.quarters[0], 1, 2, 2, cfg.timeout)?
    } else {
        reconnect(&c.quarters[0], q, q * docs, docs, cfg.timeout)?
    };
    converged(c, cfg.own_only, cfg.timeout)?;

    let p3 = json!({
        "centre_peak_rss_mib": centre_peak.map(|k| k as f64 / 1024.0),
        "quarter_peak_rss_mib": quarter_peak.map(|k| k as f64 / 1024.0),
        "centre_disk_bytes": centre_disk,
        "quarter_disk_bytes_mean": quarter_disk_mean,
        "concerns_per_node": concerns_held,
        "centre_cold_start_ms": ms(centre_cold),
        "quarter_cold_start_ms": ms(quarter_cold),
        "centre_loaded_ms": ms(centre_loaded),
        "quarter_loaded_ms": ms(quarter_loaded),
    });
    let p4 = json!({ "centre": centre_reconnect, "quarter": quarter_reconnect });
    Ok((p3, p4))
}

/// A quarter office back after a week closed, the others connected: the
/// first quarter stops, every other quarter records `cfg.rejoin` concerns
/// and the centre takes them in, then the quarter starts again. Timed from
/// its process start until it holds every document as the centre does,
/// with the bytes it received; the cluster is left converged.
pub fn rejoin(run: &mut Run, cfg: &Config) -> Result<Value> {
    let c = &mut run.cluster;
    // A quarter replicating its own document only has no other quarter's
    // to catch up on.
    if cfg.rejoin == 0 || c.quarters.len() < 2 || cfg.own_only {
        return Ok(Value::Null);
    }
    c.quarters[0].stop()?;
    record(&c.quarters[1..], cfg.rejoin, cfg.writers)?;
    let agent = agent();
    let mut written = DocHeads::new();
    for (slug, q) in run.slugs.iter().zip(&c.quarters).skip(1) {
        let doc = format!("quarter/{slug}");
        let heads = heads_now(&q.endpoint(), &agent)?;
        let own = heads.docs.get(&doc).ok_or(format!("{slug} lacks {doc}"))?;
        written.insert(doc, own.clone());
    }
    let centre = c.center.endpoint();
    wait_heads(&centre, Instant::now(), cfg.timeout, |held| {
        holds(held, &written)
    })?;
    let mut target = heads_now(&centre, &agent)?.docs;
    // The quarter records a concern as soon as its API answers (its other
    // documents may still be loading); its own document then moves past
    // the centre's copy, so it is left out of what it must catch up on.
    target.remove(&format!("quarter/{}", run.slugs[0]));
    let quarter = &mut c.quarters[0];
    let t0 = Instant::now();
    quarter.start()?;
    let ready = t0.elapsed();
    quarter.add_concern("recorded on arrival")?;
    let first_write = t0.elapsed();
    loaded(quarter, cfg.timeout)?;
    let all_loaded = t0.elapsed();
    let back = wait_heads(&quarter.endpoint(), t0, cfg.timeout, |held| {
        holds(held, &target)
    })?;
    // Since its process start: a connection that closed and reopened
    // meanwhile would have reset its session counters.
    let status = settled(&[&c.quarters[0]], "total_bytes_received", cfg.timeout)?;
    let received = status
        .first()
        .map_or(0, |s| peer_sum(s, "total_bytes_received"));
    eprintln!("iq: rejoin after {back:.2?} ({received} B received)");
    converged(c, cfg.own_only, cfg.timeout)?;
    Ok(json!({
        "quarters_recording": c.quarters.len() - 1,
        "concerns_each": cfg.rejoin,
        "ready_ms": ms(ready),
        "first_write_ms": ms(first_write),
        "loaded_ms": ms(all_loaded),
        "holds_everything_ms": ms(back),
        "received_bytes": received,
    }))
}

/// Waits until `node` has loaded every stored document: its API answers
/// before (see `Actor::new` in `protocol/src/replicator.rs`), and it joins
/// the network after.
fn loaded(node: &Node, timeout: Duration) -> Result<()> {
    wait_until(
        &format!("{} to load its documents", node.name),
        timeout,
        || {
            let s = node.api_get("/api/v1/status")?;
            Ok((s["loading"].as_u64() == Some(0)).then_some(()))
        },
    )
}

/// Bytes `node` exchanged after it came back, once `peers` are connected
/// and its traffic has settled; `sessions` (peer, document) pairs, `docs`
/// documents.
fn reconnect(
    node: &Node,
    peers: usize,
    sessions: usize,
    docs: usize,
    timeout: Duration,
) -> Result<Value> {
    wait_until(
        &format!("{} to reconnect to {peers} peers", node.name),
        timeout,
        || {
            let s = node.api_get("/api/v1/status")?;
            Ok((connected_peers(&s) >= peers).then_some(()))
        },
    )?;
    let status = settled(&[node], "session_bytes_sent", timeout)?;
    let status = status.first().ok_or("no status")?;
    let sent = peer_sum(status, "session_bytes_sent");
    let received = peer_sum(status, "session_bytes_received");
    let sessions = sessions as f64;
    Ok(json!({
        "peers": connected_peers(status),
        "documents": docs,
        "sent_bytes": sent,
        "received_bytes": received,
        "sent_per_peer_document": sent as f64 / sessions,
        "received_per_peer_document": received as f64 / sessions,
        "per_document": (sent + received) as f64 / docs as f64,
    }))
}

/// Waits until every node holds the centre's heads for every document it
/// replicates: all of them, or (`own_only`) the city's and its own.
fn converged(c: &Cluster, own_only: bool, timeout: Duration) -> Result<()> {
    let agent = agent();
    let all = c.quarters.len() + 1;
    let per_quarter = if own_only { 2 } else { all };
    wait_until("every node to hold the centre's heads", timeout, || {
        let centre = heads_now(&c.center.endpoint(), &agent)?.docs;
        if centre.len() != all {
            return Ok(None);
        }
        for q in &c.quarters {
            let h = heads_now(&q.endpoint(), &agent)?.docs;
            if h.len() != per_quarter || !holds(&centre, &h) {
                return Ok(None);
            }
        }
        std::thread::sleep(Duration::from_millis(150));
        Ok(Some(()))
    })
}

/// What one observer saw: when a document reached which heads.
type Seen = Vec<(Instant, String, Vec<String>)>;

/// P2: one concern at a time at a random quarter; latency from the start of
/// the POST until the centre, and until every other quarter, holds it.
pub fn live(run: &Run, cfg: &Config) -> Result<Value> {
    let c = &run.cluster;
    let nodes: Vec<&Node> = c.nodes().collect();
    let logs: Vec<Mutex<Seen>> = nodes.iter().map(|_| Mutex::new(Vec::new())).collect();
    let bell = (Mutex::new(()), Condvar::new());
    let stop = AtomicBool::new(false);
    let mut rng = Rng::new(cfg.seed ^ 0x5eed);
    let mut centre = Vec::new();
    let mut every = Vec::new();
    let mut acks = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let mut observers = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let ep = n.endpoint();
            let (logs, bell, stop) = (&logs, &bell, &stop);
            observers.push(s.spawn(move || -> Result<()> {
                let agent = agent();
                let mut last = DocHeads::new();
                let mut after = None;
                while !stop.load(Ordering::Relaxed) {
                    let h = ep.call(|base| get_heads(&agent, base, after, 300))?;
                    let at = Instant::now();
                    let mut log = logs[i].lock().map_err(|_| "log poisoned")?;
                    for (d, heads) in &h.docs {
                        if last.get(d) != Some(heads) {
                            log.push((at, d.clone(), heads.clone()));
                        }
                    }
                    drop(log);
                    bell.1.notify_all();
                    last = h.docs;
                    after = Some(h.version);
                }
                Ok(())
            }));
        }
        let result = (|| -> Result<()> {
            let agent = agent();
            for n in 0..cfg.live_writes {
                let w = (rng.next_u64() % run.slugs.len() as u64) as usize;
                let writer = &c.quarters[w];
                let doc = format!("quarter/{}", run.slugs[w]);
                let starts: Vec<usize> = logs
                    .iter()
                    .map(|l| l.lock().map(|l| l.len()).unwrap_or(0))
                    .collect();
                let t0 = Instant::now();
                writer.add_concern(&format!("live concern {n}"))?;
                acks.push(t0.elapsed());
                let target = heads_now(&writer.endpoint(), &agent)?
                    .docs
                    .remove(&doc)
                    .ok_or(format!("{doc} missing at its writer"))?;
                let deadline = t0 + cfg.timeout;
                let mut guard = bell.0.lock().map_err(|_| "bell poisoned")?;
                // Each observer's log is read once: from where it stood when
                // the write began (the heads it waits for did not exist
                // before), and not again once it holds them, so the watching
                // costs the shared cores little.
                // Quarters replicating their own document only never
                // hold the write: the centre alone is watched.
                let mut found: Vec<(usize, usize, Option<Instant>)> = starts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != w + 1 && (*i == 0 || !cfg.own_only))
                    .map(|(i, start)| (i, *start, None))
                    .collect();
                let seen = loop {
                    for (i, next, at) in found.iter_mut().filter(|f| f.2.is_none()) {
                        let Ok(l) = logs[*i].lock() else { continue };
                        *at = l[*next..]
                            .iter()
                            .find(|(_, d, h)| *d == doc && *h == target)
                            .map(|(at, _, _)| *at);
                        *next = l.len();
                    }
                    if found.iter().all(|f| f.2.is_some()) {
                        break found.iter().filter_map(|f| f.2).collect::<Vec<_>>();
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(format!(
                            "write {n} at {doc} not everywhere after {:?}",
                            cfg.timeout
                        ));
                    }
                    guard = bell
                        .1
                        .wait_timeout(guard, (deadline - now).min(Duration::from_millis(100)))
                        .map_err(|_| "bell poisoned")?
                        .0;
                };
                drop(guard);
                centre.push(seen[0].saturating_duration_since(t0));
                if let Some(last) = seen[1..].iter().max() {
                    every.push(last.saturating_duration_since(t0));
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        for o in observers {
            o.join()
                .unwrap_or_else(|_| Err("an observer panicked".into()))?;
        }
        result
    })?;
    Ok(json!({
        "quarters": cfg.quarters,
        "writes": cfg.live_writes,
        "ack_ms": Stats::of(&acks).json(),
        "to_centre_ms": Stats::of(&centre).json(),
        "to_every_quarter_ms": if every.is_empty() { Value::Null } else { Stats::of(&every).json() },
    }))
}
