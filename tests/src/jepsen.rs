//! Jepsen-style runs: concurrent clients create concerns through the HTTP
//! API while a seeded nemesis kills, pauses and partitions real node
//! processes; after the final heal a set checker asks every node for every
//! item.
//!
//! A run is fully described by its [`Config`]: the same seed gives the same
//! schedule of faults (the wall-clock interleaving with the clients differs,
//! as it does in Jepsen).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Cluster, Endpoint, Netns, Result};

/// SplitMix64: small, seedable, and its output never changes with a crate
/// version, so a seed printed today replays the same schedule later.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}

/// One fault. Nodes are numbered as in [`Cluster::node`]: 0 is the centre.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, restarted at the heal.
    Kill(usize),
    /// SIGSTOP, SIGCONT at the heal.
    Pause(usize),
    /// The centre cut off from every quarter.
    IsolateCenter,
    /// One quarter cut off from everyone.
    CutOff(usize),
    /// These quarters cut off from the centre and the other quarters (they
    /// still reach each other).
    Split(Vec<usize>),
}

impl Fault {
    fn is_partition(&self) -> bool {
        matches!(self, Self::IsolateCenter | Self::CutOff(_) | Self::Split(_))
    }
}

fn node_name(i: usize) -> String {
    if i == 0 {
        "centre".into()
    } else {
        format!("q{i}")
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kill(i) => write!(f, "kill {}", node_name(*i)),
            Self::Pause(i) => write!(f, "pause {}", node_name(*i)),
            Self::IsolateCenter => write!(f, "isolate centre"),
            Self::CutOff(i) => write!(f, "isolate {}", node_name(*i)),
            Self::Split(group) => {
                let names: Vec<String> = group.iter().map(|i| node_name(*i)).collect();
                write!(f, "split {{{}}} from the rest", names.join(","))
            }
        }
    }
}

/// Faults applied together, held, then healed, then a quiet spell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub faults: Vec<Fault>,
    pub hold: Duration,
    pub quiet: Duration,
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub quarters: usize,
    /// Time spent in the fault schedule (faults and quiet spells).
    pub length: Duration,
    /// Pause between one client's operations.
    pub op_interval: Duration,
    /// How long a client waits for an answer before calling it indeterminate.
    pub op_timeout: Duration,
    /// Longest wait for convergence after the final heal.
    pub converge_limit: Duration,
}

impl Config {
    /// A run with the defaults for `seed`: 5 quarters, one minute.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            quarters: 5,
            length: Duration::from_secs(60),
            op_interval: Duration::from_millis(100),
            op_timeout: Duration::from_secs(5),
            converge_limit: Duration::from_secs(120),
        }
    }
}

/// The fault schedule for a seed: a pure function of its arguments.
pub fn schedule(seed: u64, quarters: usize, partitions: bool, length: Duration) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut steps = Vec::new();
    let mut total = Duration::ZERO;
    let q = quarters as u64;
    while total < length {
        let mut faults = Vec::new();
        if partitions && rng.chance(70) {
            faults.push(match rng.below(3) {
                0 => Fault::IsolateCenter,
                1 => Fault::CutOff(1 + rng.below(q) as usize),
                _ => {
                    // A non-empty proper subset of the quarters.
                    let mut group: Vec<usize> = (1..=quarters).filter(|_| rng.chance(50)).collect();
                    if group.is_empty() {
                        group.push(1 + rng.below(q) as usize);
                    }
                    if group.len() == quarters {
                        group.pop();
                    }
                    Fault::Split(group)
                }
            });
        }
        if faults.is_empty() || rng.chance(50) {
            let node = rng.below(q + 1) as usize;
            faults.push(if rng.chance(50) {
                Fault::Kill(node)
            } else {
                Fault::Pause(node)
            });
        }
        let hold = rng.millis(1_000, 8_000);
        let quiet = rng.millis(500, 4_000);
        total += hold + quiet;
        steps.push(Step {
            faults,
            hold,
            quiet,
        });
    }
    steps
}

/// What a client learnt about one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 201 with this id: the node says it is saved.
    Acknowledged(String),
    /// Certainly not applied (refused connection, an error status).
    Failed(String),
    /// No answer in time, or the connection broke after the request went out.
    Indeterminate(String),
}

/// One client operation.
#[derive(Debug, Clone)]
pub struct Op {
    pub node: String,
    pub description: String,
    pub outcome: Outcome,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    /// How partitions were made, or why there were none.
    pub network: String,
    pub steps: usize,
    pub faults: usize,
    pub restarts: usize,
    pub acknowledged: usize,
    pub failed: usize,
    /// Failed operations by reason ("connection refused", "503: …").
    pub failed_reasons: BTreeMap<String, usize>,
    pub indeterminate: usize,
    /// Indeterminate operations whose item ended up present everywhere.
    pub indeterminate_present: usize,
    /// Acknowledged and present on no node.
    pub lost: Vec<String>,
    /// Acknowledged, present on some nodes but not all: (item, nodes without it).
    pub missing: Vec<(String, Vec<String>)>,
    /// Reported failed but present somewhere.
    pub unexpected: Vec<String>,
    /// From the final heal until every node held identical heads.
    pub converged_after: Duration,
}

impl Report {
    /// An empty report for a run of `seed`.
    pub fn new(seed: u64, network: String) -> Self {
        Self {
            seed,
            network,
            steps: 0,
            faults: 0,
            restarts: 0,
            acknowledged: 0,
            failed: 0,
            failed_reasons: BTreeMap::new(),
            indeterminate: 0,
            indeterminate_present: 0,
            lost: Vec::new(),
            missing: Vec::new(),
            unexpected: Vec::new(),
            converged_after: Duration::ZERO,
        }
    }

    /// Nothing acknowledged was lost or is missing anywhere, and nothing
    /// reported as failed appeared.
    pub fn valid(&self) -> bool {
        self.lost.is_empty() && self.missing.is_empty() && self.unexpected.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed:          {}", self.seed)?;
        writeln!(f, "network:       {}", self.network)?;
        writeln!(
            f,
            "schedule:      {} steps, {} faults, {} clean restarts",
            self.steps, self.faults, self.restarts
        )?;
        writeln!(
            f,
            "operations:    {} acknowledged, {} failed, {} indeterminate ({} of them present)",
            self.acknowledged, self.failed, self.indeterminate, self.indeterminate_present
        )?;
        for (reason, n) in &self.failed_reasons {
            writeln!(f, "  failed {n}×: {reason}")?;
        }
        writeln!(
            f,
            "checker:       {} lost, {} missing somewhere, {} failed-but-present",
            self.lost.len(),
            self.missing.len(),
            self.unexpected.len()
        )?;
        for item in &self.lost {
            writeln!(f, "  lost: {item}")?;
        }
        for (item, nodes) in &self.missing {
            writeln!(f, "  missing: {item} on {}", nodes.join(", "))?;
        }
        for item in &self.unexpected {
            writeln!(f, "  failed but present: {item}")?;
        }
        writeln!(
            f,
            "convergence:   {:.1} s after the final heal",
            self.converged_after.as_secs_f64()
        )?;
        write!(
            f,
            "verdict:       {}",
            if self.valid() { "valid" } else { "INVALID" }
        )
    }
}

/// Posts one concern and classifies the answer.
fn create(endpoint: &Endpoint, description: &str, timeout: Duration) -> Outcome {
    let result = endpoint.call(|base| {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let url = format!("{base}/api/v1/concerns");
        let body = serde_json::json!({"category": "litter", "description": description});
        Ok(match agent.post(&url).send_json(&body) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let body: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
                match (status, body["id"].as_str()) {
                    (201, Some(id)) => Outcome::Acknowledged(id.to_owned()),
                    (201, None) => Outcome::Indeterminate(format!("201 without an id: {body}")),
                    (s, _) => Outcome::Failed(format!("{s}: {body}")),
                }
            }
            Err(ureq::Error::ConnectionFailed) => Outcome::Failed("connection refused".into()),
            Err(ureq::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Outcome::Failed("connection refused".into())
            }
            Err(e) => Outcome::Indeterminate(e.to_string()),
        })
    });
    // Errors before any request went out (no api.addr yet, no namespace).
    result.unwrap_or_else(Outcome::Failed)
}

/// One client: creates concerns on `endpoint` until `stop`, at most 100,000.
fn client(endpoint: &Endpoint, id: usize, cfg: &Config, stop: &AtomicBool) -> Vec<Op> {
    let mut ops = Vec::new();
    while !stop.load(Ordering::Relaxed) && ops.len() < 100_000 {
        let description = format!("jepsen seed {} client {id} op {}", cfg.seed, ops.len());
        let outcome = create(endpoint, &description, cfg.op_timeout);
        ops.push(Op {
            node: endpoint.name.clone(),
            description,
            outcome,
        });
        std::thread::sleep(cfg.op_interval);
    }
    ops
}

/// Applies a step's faults.
fn inject(c: &mut Cluster, faults: &[Fault]) -> Result<()> {
    for fault in faults {
        match fault {
            Fault::Kill(i) => c.kill(*i),
            Fault::Pause(i) => c.pause(*i)?,
            Fault::IsolateCenter => c.isolate(0)?,
            Fault::CutOff(i) => c.isolate(*i)?,
            Fault::Split(group) => {
                for a in group {
                    for b in (0..=c.quarters.len()).filter(|b| !group.contains(b)) {
                        c.cut(*a, b)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Undoes a step's faults; returns how many nodes were restarted.
fn heal(c: &mut Cluster, faults: &[Fault]) -> Result<usize> {
    let mut restarts = 0;
    for fault in faults {
        match fault {
            Fault::Pause(i) => c.resume(*i)?,
            Fault::Kill(i) => {
                c.restart(*i)?;
                restarts += 1;
            }
            _ => {}
        }
    }
    if faults.iter().any(Fault::is_partition) {
        c.heal()?;
    }
    Ok(restarts)
}

/// Every concern description each node holds, with its id.
fn holdings(c: &Cluster) -> Result<Vec<(String, BTreeMap<String, String>)>> {
    c.nodes()
        .map(|node| {
            let list = node.api_get("/api/v1/concerns")?;
            let items = list
                .as_array()
                .ok_or_else(|| format!("{}: concerns is not a list", node.name))?
                .iter()
                .filter_map(|c| {
                    Some((
                        c["description"].as_str()?.to_owned(),
                        c["id"].as_str()?.to_owned(),
                    ))
                })
                .collect();
            Ok((node.name.clone(), items))
        })
        .collect()
}

/// Classifies every operation against what the nodes hold.
fn check(ops: &[Op], holdings: &[(String, BTreeMap<String, String>)], report: &mut Report) {
    for op in ops {
        let without: Vec<String> = holdings
            .iter()
            .filter(|(_, items)| !items.contains_key(&op.description))
            .map(|(name, _)| name.clone())
            .collect();
        let everywhere = without.is_empty();
        let nowhere = without.len() == holdings.len();
        let item = format!("{:?} (written at {})", op.description, op.node);
        match &op.outcome {
            Outcome::Acknowledged(id) => {
                report.acknowledged += 1;
                let wrong_id = holdings
                    .iter()
                    .any(|(_, items)| items.get(&op.description).is_some_and(|i| i != id));
                if nowhere {
                    report.lost.push(item);
                } else if !everywhere || wrong_id {
                    report.missing.push((item, without));
                }
            }
            Outcome::Failed(why) => {
                report.failed += 1;
                let reason: String = why.chars().take(60).collect();
                *report.failed_reasons.entry(reason).or_default() += 1;
                if !nowhere {
                    report.unexpected.push(item);
                }
            }
            Outcome::Indeterminate(_) => {
                report.indeterminate += 1;
                if everywhere {
                    report.indeterminate_present += 1;
                }
            }
        }
    }
}

/// Runs one seed: starts a federation, runs clients under the fault
/// schedule, heals, waits for convergence and checks every operation.
pub fn run(cfg: &Config) -> Result<Report> {
    let slugs: Vec<String> = (1..=cfg.quarters).map(|i| format!("q{i}")).collect();
    let slugs: Vec<&str> = slugs.iter().map(String::as_str).collect();
    let (mut c, network) = match Netns::available() {
        Ok(()) => {
            let net = Netns::create(cfg.quarters + 1)?;
            (
                Cluster::start_on_hosts(&slugs, net)?,
                "network namespaces: one host per node, veth to a bridge, partitions by blackhole routes".to_owned(),
            )
        }
        Err(why) => (
            Cluster::start(&slugs)?,
            format!("loopback only ({why}): process faults, no partitions"),
        ),
    };
    let partitions = c.net.is_some();
    let steps = schedule(cfg.seed, cfg.quarters, partitions, cfg.length);
    eprintln!("jepsen: seed {}, {network}", cfg.seed);
    c.wait_converged(cfg.converge_limit)?;

    let mut report = Report::new(cfg.seed, network);
    report.steps = steps.len();
    report.faults = steps.iter().map(|s| s.faults.len()).sum();
    let endpoints: Vec<Endpoint> = c.quarters.iter().map(|q| q.endpoint()).collect();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (ops, healed_at) = std::thread::scope(|s| -> Result<(Vec<Op>, Instant)> {
        let clients: Vec<_> = endpoints
            .iter()
            .enumerate()
            .map(|(id, e)| {
                let stop = &stop;
                s.spawn(move || client(e, id, cfg, stop))
            })
            .collect();
        let nemesis = (|| -> Result<Instant> {
            for (n, step) in steps.iter().enumerate() {
                let names: Vec<String> = step.faults.iter().map(Fault::to_string).collect();
                eprintln!(
                    "jepsen: {:>6.1} s step {n}: {} for {:.1} s",
                    start.elapsed().as_secs_f64(),
                    names.join(" + "),
                    step.hold.as_secs_f64()
                );
                inject(&mut c, &step.faults)?;
                std::thread::sleep(step.hold);
                let last = n + 1 == steps.len();
                if last {
                    stop.store(true, Ordering::Relaxed);
                }
                report.restarts += heal(&mut c, &step.faults)?;
                if last {
                    return Ok(Instant::now());
                }
                std::thread::sleep(step.quiet);
            }
            Ok(Instant::now())
        })();
        stop.store(true, Ordering::Relaxed);
        let mut ops = Vec::new();
        for client in clients {
            ops.extend(client.join().map_err(|_| "a client panicked")?);
        }
        Ok((ops, nemesis?))
    })?;
    eprintln!(
        "jepsen: {:>6.1} s final heal; waiting for convergence",
        start.elapsed().as_secs_f64()
    );
    c.wait_converged(cfg.converge_limit)?;
    report.converged_after = healed_at.elapsed();
    let holdings = holdings(&c)?;
    check(&ops, &holdings, &mut report);
    let distinct: BTreeSet<&str> = ops.iter().map(|o| o.description.as_str()).collect();
    if distinct.len() != ops.len() {
        return Err(
            "two operations share a description: the checker cannot tell them apart".into(),
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(description: &str, outcome: Outcome) -> Op {
        Op {
            node: "q1".into(),
            description: description.into(),
            outcome,
        }
    }

    fn empty_report() -> Report {
        Report::new(0, String::new())
    }

    #[test]
    fn checker_classifies_every_kind_of_anomaly() {
        let everywhere = |d: &str, id: &str| (d.to_owned(), id.to_owned());
        let holdings = vec![
            (
                "centre".to_owned(),
                BTreeMap::from([
                    everywhere("a", "1"),
                    everywhere("c", "3"),
                    everywhere("f", "6"),
                ]),
            ),
            (
                "q1".to_owned(),
                BTreeMap::from([
                    everywhere("a", "1"),
                    everywhere("d", "9"),
                    everywhere("f", "6"),
                ]),
            ),
        ];
        let ops = vec![
            op("a", Outcome::Acknowledged("1".into())),
            op("b", Outcome::Acknowledged("2".into())),
            op("c", Outcome::Acknowledged("3".into())),
            op("d", Outcome::Acknowledged("4".into())),
            op("e", Outcome::Failed("refused".into())),
            op("f", Outcome::Failed("500".into())),
            op("g", Outcome::Indeterminate("timeout".into())),
        ];
        let mut report = empty_report();
        check(&ops, &holdings, &mut report);
        assert_eq!(
            (report.acknowledged, report.failed, report.indeterminate),
            (4, 2, 1)
        );
        assert_eq!(report.lost.len(), 1, "b is nowhere");
        assert!(report.lost[0].contains("\"b\""));
        // c is missing on q1; d is on one node under another id.
        let missing: Vec<&str> = report.missing.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(missing.len(), 2);
        assert!(missing[0].contains("\"c\"") && report.missing[0].1 == ["q1"]);
        assert!(missing[1].contains("\"d\""));
        assert_eq!(report.unexpected.len(), 1, "f failed but is present");
        assert!(!report.valid());

        let mut clean = empty_report();
        check(&ops[..1], &holdings, &mut clean);
        assert!(clean.valid());
    }

    #[test]
    fn schedules_only_name_existing_nodes() {
        for seed in 0..200 {
            for step in schedule(seed, 3, true, Duration::from_secs(60)) {
                assert!(!step.faults.is_empty());
                for fault in step.faults {
                    match fault {
                        Fault::Kill(i) | Fault::Pause(i) => assert!(i <= 3),
                        Fault::CutOff(i) => assert!((1..=3).contains(&i)),
                        Fault::Split(g) => {
                            assert!(!g.is_empty() && g.len() < 3);
                            assert!(g.iter().all(|i| (1..=3).contains(i)));
                        }
                        Fault::IsolateCenter => {}
                    }
                }
            }
        }
    }
}
