//! Jepsen-style fault runs over real node processes (`iq_tests::jepsen`).
//!
//! CI runs one seed with about a minute of faults. The long run (20 seeds ×
//! 5 minutes, centre and 5 quarters) is one command, see docs/testing.md:
//! `IQ_JEPSEN_SEEDS=20 IQ_JEPSEN_SECS=300 cargo test --release -p iq-tests
//! --test jepsen -- --ignored --nocapture`. `IQ_SEED` replays one seed.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use iq_tests::jepsen::{self, Config, Fault};
use iq_tests::{Cluster, Netns, Result, wait_until};

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

/// Quarter offices' nodes often listen on every interface; they then
/// advertise the address other quarters can dial (`--advertise`). On real
/// test hosts, with the centre cut off, two such quarters still exchange
/// their documents directly, and everyone converges once the cut heals.
#[test]
fn quarters_on_wildcard_addresses_sync_directly_while_the_centre_is_cut_off() -> Result<()> {
    if let Err(why) = Netns::available() {
        panic!("this test needs test hosts (root and iproute2's ip): {why}");
    }
    let mut net = Netns::create(3)?;
    net.wildcard = true;
    let mut c = Cluster::start_on_hosts(&["johannstadt", "prohlis"], net)?;
    c.wait_converged(Duration::from_secs(30))?;
    c.isolate(0)?;
    let from_j = c.quarters[0].add_concern("written while the centre is cut off")?;
    let from_p = c.quarters[1].add_concern("also written while the centre is cut off")?;
    wait_until(
        "the quarters to exchange their concerns directly",
        Duration::from_secs(30),
        || {
            let at_p = c.quarters[1].concern_ids(Some("johannstadt"))?;
            let at_j = c.quarters[0].concern_ids(Some("prohlis"))?;
            Ok((at_p.contains(&from_j) && at_j.contains(&from_p)).then_some(()))
        },
    )?;
    assert!(
        !c.center.concern_ids(None)?.contains(&from_j),
        "the centre was cut off, yet it got the concern: the cut is not real"
    );
    c.heal()?;
    c.wait_converged(Duration::from_secs(60))?;
    let at_centre = c.center.concern_ids(None)?;
    assert!(at_centre.contains(&from_j) && at_centre.contains(&from_p));
    Ok(())
}

/// A partition much longer than the nemesis' steps: the centre cut off for
/// `IQ_CUT_SECS` (default 120) while a quarter keeps writing. TCP backs off
/// its retransmissions during the cut; this shows how long the federation
/// then takes to converge after the heal (docs/testing.md).
#[test]
#[ignore = "long: minutes of partition, see docs/testing.md"]
fn long_partition_then_heal() -> Result<()> {
    let secs = env_u64("IQ_CUT_SECS", 120);
    let mut c = Cluster::start_on_hosts(&["johannstadt", "prohlis"], Netns::create(3)?)?;
    c.wait_converged(Duration::from_secs(30))?;
    c.isolate(0)?;
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    let mut written = Vec::new();
    while std::time::Instant::now() < end {
        written.push(c.quarters[0].add_concern("written during a long cut")?);
        std::thread::sleep(Duration::from_millis(500));
    }
    c.heal()?;
    let healed = std::time::Instant::now();
    c.wait_converged(Duration::from_secs(300))?;
    eprintln!(
        "centre cut off for {secs} s, {} concerns written meanwhile: converged {:.1} s after the heal",
        written.len(),
        healed.elapsed().as_secs_f64()
    );
    let at_centre = c.center.concern_ids(None)?;
    assert!(written.iter().all(|id| at_centre.contains(id)));
    Ok(())
}
