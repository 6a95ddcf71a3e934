//! The peer: the same workload on automerge-repo, driven by
//! `tests/bench-js/bench.mjs` on Node. The script and its pinned
//! `package-lock.json` are copied to `target/bench-js/`, where npm installs
//! the locked versions from the registry the first time (and again when the
//! lock changes); nothing is installed into the source tree. (`npm install`
//! rather than `npm ci`: a registry mirror without cbor-x's optional native
//! packages makes `npm ci` refuse the lock; cbor-x runs without them.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const FILES: [&str; 3] = ["package.json", "package-lock.json", "bench.mjs"];

fn workspace() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

fn tool_version(tool: &str) -> Result<String, String> {
    let out = Command::new(tool)
        .arg("--version")
        .output()
        .map_err(|e| format!("the automerge-repo peer needs `{tool}` (Node 20 or newer) on PATH: {e}; install Node or pass --no-peer"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Copies the script and its manifests to `target/bench-js/` and installs
/// the pinned packages unless the same lock is installed already.
fn install() -> Result<PathBuf, String> {
    let node = tool_version("node")?;
    let major: u32 = node
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 20 {
        return Err(format!(
            "the automerge-repo peer needs Node 20 or newer, found {node}"
        ));
    }
    tool_version("npm")?;
    let src = workspace().join("tests/bench-js");
    let dst = target_dir().join("bench-js");
    std::fs::create_dir_all(&dst).map_err(|e| format!("cannot create {}: {e}", dst.display()))?;
    let lock = std::fs::read(src.join("package-lock.json"))
        .map_err(|e| format!("cannot read tests/bench-js/package-lock.json: {e}"))?;
    let installed = dst.join("node_modules/.iq-bench-lock");
    let fresh = std::fs::read(&installed).is_ok_and(|l| l == lock);
    for f in FILES {
        std::fs::copy(src.join(f), dst.join(f))
            .map_err(|e| format!("cannot copy tests/bench-js/{f} to {}: {e}", dst.display()))?;
    }
    if !fresh {
        eprintln!("peer: npm install (locked versions) in {}", dst.display());
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dst)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run npm install: {e}"))?;
        if !status.success() {
            return Err(format!(
                "npm install in {} failed ({status}): is the npm registry reachable?",
                dst.display()
            ));
        }
        std::fs::write(&installed, &lock)
            .map_err(|e| format!("cannot write {}: {e}", installed.display()))?;
    }
    Ok(dst)
}

/// Runs P1 and P2 on automerge-repo; returns the script's JSON report.
pub fn run(q: usize, m: usize, live: usize, seed: u64, timeout: Duration) -> Result<Value, String> {
    let dir = install()?;
    let data = tempfile::Builder::new()
        .prefix("iq-bench-peer-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let mut child = Command::new("node")
        .arg(dir.join("bench.mjs"))
        .args(["--quarters", &q.to_string()])
        .args(["--concerns", &m.to_string()])
        .args(["--live", &live.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--timeout-ms", &timeout.as_millis().to_string()])
        .arg("--dir")
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run node: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("node's stdout was not piped")?;
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut text).map(|_| text)
    });
    // The script bounds each wait by `timeout` after its offline phase;
    // this bounds the whole of it (the offline phase, and a wait the script
    // failed to bound), so the run always ends.
    let bound = timeout * 2 + Duration::from_secs(60);
    let deadline = Instant::now() + bound;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the automerge-repo peer was still running after {bound:?}, and was stopped"
                ));
            }
            Err(e) => return Err(format!("cannot wait for node: {e}")),
        }
    };
    let stdout = reader
        .join()
        .map_err(|_| "the thread reading node's output panicked")?
        .map_err(|e| format!("cannot read node's output: {e}"))?;
    if !status.success() {
        return Err(format!("the automerge-repo peer failed ({status})"));
    }
    let text = String::from_utf8_lossy(&stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("the automerge-repo peer printed no result: {text}"))?;
    serde_json::from_str(line)
        .map_err(|e| format!("the automerge-repo peer's result is not JSON ({e}): {line}"))
}
