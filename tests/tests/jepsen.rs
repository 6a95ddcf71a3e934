//! Jepsen-style fault runs over real node processes (`iq_tests::jepsen`).
//!
//! CI runs one seed with about a minute of faults. The long run (20 seeds ×
//! 5 minutes, centre and 5 quarters) is one command, see docs/testing.md:
//! `IQ_JEPSEN_SEEDS=20 IQ_JEPSEN_SECS=300 cargo test --release -p iq-tests
//! --test jepsen -- --ignored --nocapture`. `IQ_SEED` replays one seed.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use iq_tests::Result;
use iq_tests::jepsen::{self, Config, Fault};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn schedule_is_a_function_of_the_seed() {
    let a = jepsen::schedule(7, 5, true, Duration::from_secs(120));
    let b = jepsen::schedule(7, 5, true, Duration::from_secs(120));
    let other = jepsen::schedule(8, 5, true, Duration::from_secs(120));
    assert_eq!(a, b);
    assert_ne!(a, other);
    let faults: Vec<&Fault> = a.iter().flat_map(|s| &s.faults).collect();
    assert!(faults.iter().any(|f| matches!(f, Fault::Kill(_))));
    assert!(faults.iter().any(|f| matches!(f, Fault::Pause(_))));
    assert!(faults.iter().any(|f| matches!(f, Fault::Split(_))));
    // Without partitions, only process faults are scheduled.
    let local = jepsen::schedule(7, 5, false, Duration::from_secs(120));
    assert!(
        local
            .iter()
            .flat_map(|s| &s.faults)
            .all(|f| matches!(f, Fault::Kill(_) | Fault::Pause(_)))
    );
}

#[test]
fn acknowledged_writes_survive_a_minute_of_faults() -> Result<()> {
    let mut cfg = Config::new(env_u64("IQ_SEED", 0x5eed_0001));
    cfg.length = Duration::from_secs(env_u64("IQ_JEPSEN_SECS", 60));
    let report = jepsen::run(&cfg)?;
    eprintln!("{report}");
    assert!(report.acknowledged > 0, "no operation was acknowledged");
    assert!(report.faults > 0, "no fault was injected");
    assert!(report.valid(), "the checker found anomalies:\n{report}");
    Ok(())
}

/// The long run; results go to `target/jepsen-long-run.md` (or
/// `IQ_JEPSEN_OUT`) as a table, rewritten after every seed.
#[test]
#[ignore = "long run: 20 seeds × 5 minutes, see docs/testing.md"]
fn long_run() -> Result<()> {
    let seeds = env_u64("IQ_JEPSEN_SEEDS", 20);
    let secs = env_u64("IQ_JEPSEN_SECS", 300);
    let first = env_u64("IQ_SEED", 1);
    let mut table = String::from(
        "| seed | steps | faults | restarts | acknowledged | failed | indeterminate | lost | missing | converged after heal |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let out = std::env::var_os("IQ_JEPSEN_OUT").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/jepsen-long-run.md"),
        PathBuf::from,
    );
    let mut invalid = Vec::new();
    for seed in first..first + seeds {
        let mut cfg = Config::new(seed);
        cfg.length = Duration::from_secs(secs);
        let report = jepsen::run(&cfg)?;
        eprintln!("{report}");
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |\n",
            report.seed,
            report.steps,
            report.faults,
            report.restarts,
            report.acknowledged,
            report.failed,
            report.indeterminate,
            report.lost.len(),
            report.missing.len(),
            report.converged_after.as_secs_f64()
        ));
        if !report.valid() {
            invalid.push(seed);
        }
        let mut file = std::fs::File::create(&out).map_err(|e| e.to_string())?;
        writeln!(file, "network: {}\n\n{table}", report.network).map_err(|e| e.to_string())?;
    }
    eprintln!("{table}");
    assert!(invalid.is_empty(), "invalid seeds: {invalid:?}");
    Ok(())
}
