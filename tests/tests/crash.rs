//! Crash loop: a quarter node is killed with SIGKILL at random instants while
//! a client writes to it; every restart must open cleanly and still hold every
//! write it acknowledged. CI runs a short loop; `IQ_CRASH_CYCLES=200 cargo test
//! -p iq-tests --test crash -- --nocapture` runs the long one (docs/testing.md).
//! `IQ_SEED` replays a schedule.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use iq_tests::{Cluster, Result};

/// A small seeded PRNG so a failing schedule can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn sigkill_while_writing_loses_no_acknowledged_write() -> Result<()> {
    let cycles = env_u64("IQ_CRASH_CYCLES", 25);
    let seed = env_u64("IQ_SEED", 0x1d5e_ed00_c0ff_ee01);
    eprintln!("crash loop: {cycles} cycles, seed {seed}");
    let mut rng = Rng(seed | 1);
    let mut c = Cluster::start(&["prohlis"])?;
    let mut acknowledged = BTreeSet::new();
    let mut indeterminate = 0usize;
    for cycle in 0..cycles {
        let node = &c.quarters[0];
        let stop = AtomicBool::new(false);
        let kill_after = Duration::from_millis(20 + rng.below(300));
        let (acked, failed): (Vec<String>, usize) = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut acked = Vec::new();
                let mut failed = 0usize;
                let mut i = 0u64;
                // Bounded: at most 10,000 writes per cycle.
                while !stop.load(Ordering::Relaxed) && i < 10_000 {
                    match node.add_concern(&format!("cycle {cycle} write {i}")) {
                        Ok(id) => acked.push(id),
                        Err(_) => failed += 1, // killed mid-request: indeterminate
                    }
                    i += 1;
                }
                (acked, failed)
            });
            std::thread::sleep(kill_after);
            // Killed while the writer is still writing.
            node.sigkill();
            stop.store(true, Ordering::Relaxed);
            writer.join().unwrap_or_default()
        });
        acknowledged.extend(acked);
        indeterminate += failed;
        c.quarters[0].kill();
        c.quarters[0]
            .start()
            .map_err(|e| format!("cycle {cycle} (seed {seed}): restart failed: {e}"))?;
        let held: BTreeSet<String> = c.quarters[0]
            .concern_ids(Some("prohlis"))?
            .into_iter()
            .collect();
        let lost: Vec<&String> = acknowledged.difference(&held).collect();
        assert!(
            lost.is_empty(),
            "cycle {cycle} (seed {seed}): {} acknowledged writes lost, e.g. {:?}",
            lost.len(),
            lost.first()
        );
    }
    eprintln!(
        "crash loop: {cycles}/{cycles} clean restarts, {} acknowledged writes all present, {indeterminate} indeterminate",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() as u64 >= cycles,
        "too few writes were acknowledged to mean anything"
    );
    Ok(())
}
