//! The peer: the same workload on automerge-repo (see `tests/bench-js/`).

use std::time::Duration;

use serde_json::Value;

pub fn run(
    _q: usize,
    _m: usize,
    _live: usize,
    _seed: u64,
    _timeout: Duration,
) -> Result<Value, String> {
    Err("the automerge-repo peer is not wired up yet".into())
}
