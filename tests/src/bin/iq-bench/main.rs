//! `iq-bench`: catch-up, live latency, scale and reconnect cost of iq on
//! real processes, side by side with the floor (automerge's own sync in one
//! process) and the peer (automerge-repo on Node). See `docs/benchmarks.md`.
//!
//! # Layout
//! - `iq`: real `iq-center`/`iq-node` processes on loopback (P1–P4).
//! - `floor`: the same changes synced in one process, no network, no disk.
//! - `peer`: the same workload on automerge-repo (`tests/bench-js/`).
//! - here: arguments, the report (markdown table and JSON).

mod floor;
mod iq;
mod peer;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};

/// Benchmarks iq against the in-process floor and automerge-repo.
#[derive(Debug, Parser)]
#[command(name = "iq-bench")]
struct Args {
    /// Quarters (Q).
    #[arg(long, default_value_t = 19)]
    quarters: usize,
    /// Concerns each quarter records offline (M).
    #[arg(long, default_value_t = 1000)]
    concerns: usize,
    /// Concerns recorded one at a time in the live run (P2).
    #[arg(long, default_value_t = 200)]
    live: usize,
    /// Seed of the random choices (which quarter writes, concern ids).
    #[arg(long, default_value_t = 8)]
    seed: u64,
    /// Threads recording concerns in the untimed offline phase.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Concerns every other quarter records while the first is offline,
    /// before it rejoins (0 skips the rejoin run).
    #[arg(long, default_value_t = 50)]
    rejoin: usize,
    /// Bound on every wait, in seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// A tiny run (Q=2, M=20, 10 live writes, no peer) that checks the
    /// harness works; its numbers mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Skip iq's real-process runs.
    #[arg(long)]
    no_iq: bool,
    /// Skip the floor.
    #[arg(long)]
    no_floor: bool,
    /// Skip the automerge-repo peer (it installs npm packages into target/).
    #[arg(long)]
    no_peer: bool,
    /// Also write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Which quarter documents iq's quarter nodes replicate: "all", or
    /// "own" (`iq-node init --replicate own`; then neither iq nor the floor
    /// measures what needs every quarter to hold every document, which
    /// lets P3 run at 64 × 10,000 on one machine).
    #[arg(long, default_value = "all", value_parser = ["all", "own"])]
    replicate: String,
}

/// The harness' seeded generator (SplitMix64), shared with the fault runs.
pub use iq_tests::jepsen::Rng;

/// p50 / p99 / max of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Self {
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        Self::of_ms(&mut v)
    }

    pub fn of_ms(v: &mut [f64]) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }

    pub fn json(&self) -> Value {
        json!({"p50": self.p50, "p99": self.p99, "max": self.max})
    }
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("iq-bench: {e}");
            std::process::exit(1);
        }
    }
}

fn run(mut args: Args) -> Result<(), String> {
    if args.smoke {
        args.quarters = 2;
        args.concerns = 20;
        args.live = 10;
        args.rejoin = 5;
        args.no_peer = true;
        args.timeout = args.timeout.min(120);
    }
    if args.quarters == 0 {
        return Err("--quarters must be at least 1".into());
    }
    let timeout = Duration::from_secs(args.timeout);
    let (q, m) = (args.quarters, args.concerns);
    let own_only = args.replicate == "own";
    let mut report = json!({
        "date": now_utc(),
        "commit": commit(),
        "machine": machine(),
        "params": {"quarters": q, "concerns": m, "live_writes": args.live, "rejoin": args.rejoin, "seed": args.seed, "replicate": args.replicate},
    });

    if !args.no_floor {
        let mut floors = serde_json::Map::new();
        for mode in [floor::Mode::Default, floor::Mode::ChangesOnly] {
            eprintln!("{}: P1 {q} × {m}", mode.name());
            let p1 = floor::catch_up(q, m, mode, args.seed, !own_only)?;
            eprintln!("{}: P2 {q} quarters, {} writes", mode.name(), args.live);
            let lat = floor::live(q, args.live, mode, args.seed)?;
            let (c, e): (Vec<Duration>, Vec<Duration>) = lat.into_iter().unzip();
            // Printed as they come: a later part of a long run may not finish.
            eprintln!(
                "{}: P1 to centre {:.1} ms, every node {:?}, {} B all; P2 p99 {:.2} / {:.2} ms",
                mode.name(),
                p1.to_centre.as_secs_f64() * 1000.0,
                p1.to_all,
                p1.to_all_bytes,
                Stats::of(&c).p99,
                Stats::of(&e).p99,
            );
            floors.insert(
                mode.name().into(),
                json!({
                    "p1": {
                        "to_centre_ms": p1.to_centre.as_secs_f64() * 1000.0,
                        "to_centre_bytes": p1.to_centre_bytes,
                        "to_all_ms": p1.to_all.map(|d| d.as_secs_f64() * 1000.0),
                        "all_bytes": p1.to_all_bytes,
                    },
                    "p2": {
                        "to_centre_ms": Stats::of(&c).json(),
                        "to_every_quarter_ms": Stats::of(&e).json(),
                    },
                }),
            );
        }
        for (k, v) in floors {
            report[k] = v;
        }
        eprintln!("floor: P3 cold start, {q} documents of {m} concerns loaded");
        let cold = floor::cold_start(q, m, args.seed)?;
        report["floor"]["p3"] = json!({
            "own_document_load_ms": cold.own_document.as_secs_f64() * 1000.0,
            // A quarter replicating its own document only loads no other.
            "every_document_load_ms": (!own_only).then_some(cold.every_document.as_secs_f64() * 1000.0),
            "own_document_bytes": cold.own_document_bytes,
        });
        let (floor_change, iq_change) = floor::change_bytes(args.seed)?;
        report["change_bytes"] =
            json!({"floor": floor_change, "iq": iq_change, "iq_signature": 96});
    }

    if !args.no_peer {
        eprintln!(
            "peer: automerge-repo, P1 {q} × {m}, P2 {} writes",
            args.live
        );
        // A failed peer is reported, not fatal: the iq runs after it still count.
        report["peer"] = peer::run(q, m, args.live, args.seed, timeout).unwrap_or_else(|e| {
            eprintln!("peer: {e}");
            json!({ "error": e })
        });
    }

    if !args.no_iq {
        let cfg = iq::Config {
            quarters: q,
            concerns: m,
            live_writes: args.live,
            seed: args.seed,
            writers: args.writers,
            rejoin: args.rejoin,
            timeout,
            own_only,
        };
        eprintln!("iq: P1 {q} × {m}");
        let (mut run, p1) = iq::catch_up(&cfg)?;
        eprintln!("iq: P1 {p1}");
        eprintln!("iq: P3 and P4");
        let (p3, p4) = iq::scale_and_reconnect(&mut run, &cfg)?;
        eprintln!("iq: rejoin, {} concerns at each other quarter", args.rejoin);
        let rejoin = iq::rejoin(&mut run, &cfg)?;
        eprintln!("iq: P2 {} writes", args.live);
        let p2 = iq::live(&run, &cfg)?;
        report["iq"] = json!({"p1": p1, "p2": p2, "p3": p3, "p4": p4, "rejoin": rejoin});
        report["binaries"] = binaries();
    }

    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    if let Some(path) = &args.json {
        std::fs::write(path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    println!("{}", markdown(&report));
    println!("```json\n{text}\n```");
    Ok(())
}

/// The UTC date and time, from `date` (no clock crate for one line).
fn now_utc() -> String {
    command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
}

fn commit() -> String {
    command_line("git", &["rev-parse", "--short", "HEAD"])
}

/// The node binaries iq ran on: where they are and the start of each one's
/// SHA-256. `commit` is the checkout's, which need not be what they were
/// built from (`IQ_BIN_DIR` may point at an older build).
fn binaries() -> Value {
    let dir = iq_tests::bin_dir();
    let mut out = json!({ "dir": dir.display().to_string() });
    for name in ["iq-node", "iq-center"] {
        let path = dir.join(name);
        let sum = command_line("sha256sum", &[&path.to_string_lossy()]);
        out[name] = sum.get(..12).unwrap_or(&sum).into();
    }
    out
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// CPU model, cores, memory and the load when the run started.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    json!({"cpu": cpu, "cores": cores, "memory": mem, "load_at_start": load})
}

/// A number at `path` (`a.b.c`) in `v`.
fn num(v: &Value, path: &str) -> Option<f64> {
    path.split('.').try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn fmt(x: Option<f64>, unit: &str) -> String {
    match x {
        None => "–".into(),
        Some(x) if unit == "B" && x >= 1e6 => format!("{:.2} MB", x / 1e6),
        Some(x) if unit == "B" && x >= 1e3 => format!("{:.1} kB", x / 1e3),
        Some(x) if unit == "ms" && x >= 1000.0 => format!("{:.2} s", x / 1000.0),
        Some(x) if unit == "ms" => format!("{x:.1} ms"),
        Some(x) => format!("{x:.0} {unit}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

/// The report as a markdown table: one row per measure, one column per
/// system, then iq's ratios to the floor and to the peer.
fn markdown(r: &Value) -> String {
    let p = &r["params"];
    let mut out = format!(
        "iq-bench {} (commit {}), Q = {}, M = {}, {} live writes; {} × {}, load {}\n\n",
        r["date"].as_str().unwrap_or("?"),
        r["commit"].as_str().unwrap_or("?"),
        p["quarters"],
        p["concerns"],
        p["live_writes"],
        r["machine"]["cores"],
        r["machine"]["cpu"].as_str().unwrap_or("?"),
        r["machine"]["load_at_start"].as_str().unwrap_or("?"),
    );
    if p["replicate"] == "own" {
        out.push_str(
            "Quarter nodes replicate their own document and the city's only (`--replicate own`): \
             nothing that needs every quarter to hold every document is measured.\n\n",
        );
    }
    if let Some(b) = r["binaries"].as_object() {
        out.push_str(&format!(
            "iq's binaries: {} (SHA-256 iq-node {}…, iq-center {}…)\n\n",
            b["dir"].as_str().unwrap_or("?"),
            b["iq-node"].as_str().unwrap_or("?"),
            b["iq-center"].as_str().unwrap_or("?"),
        ));
    }
    if let Some(e) = r["peer"]["error"].as_str() {
        out.push_str(&format!("The automerge-repo peer failed: {e}\n\n"));
    }
    if let Some(u) = r["peer"]["unfinished"].as_str() {
        out.push_str(&format!(
            "automerge-repo did not finish ({u}): its time to the centre counts; it ran no P2.\n\n"
        ));
    }
    out.push_str("| measure | iq | floor | floor-changes | automerge-repo | iq ÷ floor | iq ÷ floor-changes | iq ÷ automerge-repo |\n");
    out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    // (label, unit, iq path, floor path, peer path; "" where the peer has
    // no such measure)
    let rows: &[(&str, &str, &str, &str, &str)] = &[
        (
            "P1 catch-up to centre",
            "ms",
            "iq.p1.to_centre_ms",
            "p1.to_centre_ms",
            "peer.p1.to_centre_ms",
        ),
        (
            "P1 catch-up, every node all docs",
            "ms",
            "iq.p1.to_all_ms",
            "p1.to_all_ms",
            "peer.p1.to_all_ms",
        ),
        (
            "P1 bytes into the centre",
            "B",
            "iq.p1.centre_received_wire_bytes",
            "p1.to_centre_bytes",
            "peer.p1.centre_received_bytes",
        ),
        (
            "P1 bytes, all",
            "B",
            "iq.p1.all_wire_bytes",
            "p1.all_bytes",
            "peer.p1.all_bytes",
        ),
        (
            "P2 to centre p50",
            "ms",
            "iq.p2.to_centre_ms.p50",
            "p2.to_centre_ms.p50",
            "peer.p2.to_centre_ms.p50",
        ),
        (
            "P2 to centre p99",
            "ms",
            "iq.p2.to_centre_ms.p99",
            "p2.to_centre_ms.p99",
            "peer.p2.to_centre_ms.p99",
        ),
        (
            "P2 to centre max",
            "ms",
            "iq.p2.to_centre_ms.max",
            "p2.to_centre_ms.max",
            "peer.p2.to_centre_ms.max",
        ),
        (
            "P2 to every quarter p50",
            "ms",
            "iq.p2.to_every_quarter_ms.p50",
            "p2.to_every_quarter_ms.p50",
            "peer.p2.to_every_quarter_ms.p50",
        ),
        (
            "P2 to every quarter p99",
            "ms",
            "iq.p2.to_every_quarter_ms.p99",
            "p2.to_every_quarter_ms.p99",
            "peer.p2.to_every_quarter_ms.p99",
        ),
        (
            "P2 to every quarter max",
            "ms",
            "iq.p2.to_every_quarter_ms.max",
            "p2.to_every_quarter_ms.max",
            "peer.p2.to_every_quarter_ms.max",
        ),
        (
            "P3 quarter cold start: API answers (floor: its document loaded)",
            "ms",
            "iq.p3.quarter_cold_start_ms",
            "p3.own_document_load_ms",
            "",
        ),
        (
            "P3 quarter cold start: every document loaded (floor: on one thread)",
            "ms",
            "iq.p3.quarter_loaded_ms",
            "p3.every_document_load_ms",
            "",
        ),
    ];
    for (label, unit, iq_path, floor_path, peer_path) in rows {
        let iq = num(r, iq_path);
        let fl = num(&r["floor"], floor_path);
        let fc = num(&r["floor-changes"], floor_path);
        let pe = num(r, peer_path);
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |\n",
            fmt(iq, unit),
            fmt(fl, unit),
            fmt(fc, unit),
            fmt(pe, unit),
            ratio(iq, fl),
            ratio(iq, fc),
            ratio(iq, pe),
        ));
    }
    let extra: &[(&str, &str, &str)] = &[
        (
            "one concern's change, floor (six fields)",
            "B",
            "change_bytes.floor",
        ),
        (
            "one concern's change, iq (as the API writes it; + 96 B signature)",
            "B",
            "change_bytes.iq",
        ),
        (
            "P1 sync messages into the centre, before deflate",
            "B",
            "iq.p1.centre_received_bytes",
        ),
        (
            "P1 sync messages, all, before deflate",
            "B",
            "iq.p1.all_bytes",
        ),
        ("P1 centre ready after start", "ms", "iq.p1.centre_ready_ms"),
        (
            "P1 first document complete at centre",
            "ms",
            "iq.p1.first_document_at_centre_ms",
        ),
        (
            "P1 quarter documents complete at centre, p50",
            "ms",
            "iq.p1.documents_at_centre_ms.p50",
        ),
        (
            "P2 write acknowledged (fsynced) p99",
            "ms",
            "iq.p2.ack_ms.p99",
        ),
        (
            "Rejoin: a quarter back, others recorded (see params), until it holds everything",
            "ms",
            "iq.rejoin.holds_everything_ms",
        ),
        ("Rejoin: its API answered after", "ms", "iq.rejoin.ready_ms"),
        (
            "Rejoin: its first concern recorded after",
            "ms",
            "iq.rejoin.first_write_ms",
        ),
        (
            "Rejoin: it had loaded every document after",
            "ms",
            "iq.rejoin.loaded_ms",
        ),
        (
            "Rejoin: bytes the quarter received",
            "B",
            "iq.rejoin.received_bytes",
        ),
        ("P3 centre peak RSS", "MiB", "iq.p3.centre_peak_rss_mib"),
        (
            "P3 quarter peak RSS (largest)",
            "MiB",
            "iq.p3.quarter_peak_rss_mib",
        ),
        ("P3 centre disk", "B", "iq.p3.centre_disk_bytes"),
        (
            "P3 quarter disk (mean)",
            "B",
            "iq.p3.quarter_disk_bytes_mean",
        ),
        (
            "P3 centre cold start (API answers)",
            "ms",
            "iq.p3.centre_cold_start_ms",
        ),
        (
            "P3 centre cold start, every document loaded",
            "ms",
            "iq.p3.centre_loaded_ms",
        ),
        (
            "P4 centre reconnect, sent per (peer, doc)",
            "B",
            "iq.p4.centre.sent_per_peer_document",
        ),
        (
            "P4 centre reconnect, received per (peer, doc)",
            "B",
            "iq.p4.centre.received_per_peer_document",
        ),
        (
            "P4 quarter reconnect, sent per (peer, doc)",
            "B",
            "iq.p4.quarter.sent_per_peer_document",
        ),
        (
            "P4 quarter reconnect, received per (peer, doc)",
            "B",
            "iq.p4.quarter.received_per_peer_document",
        ),
        (
            "P4 quarter reconnect, both ways per document",
            "B",
            "iq.p4.quarter.per_document",
        ),
    ];
    out.push_str("\n| more | value |\n| --- | --- |\n");
    for (label, unit, path) in extra {
        out.push_str(&format!("| {label} | {} |\n", fmt(num(r, path), unit)));
    }
    out
}
