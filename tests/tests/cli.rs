//! What a user sees when something is wrong: one clear line, no panic, no
//! backtrace, nothing half-written — and the demo command.

use std::process::Command;

use iq_tests::{Cluster, Kind, Result, bin_dir};

/// Checks a failed command: non-zero exit, one `error:` line containing
/// `needle`, and no panic or backtrace.
fn assert_clean_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "command succeeded; stderr: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "panic: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {stderr}"
    );
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

#[test]
fn missing_and_uninitialised_data_directories_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("nope");
    let missing = missing.to_str().expect("utf8");
    assert_clean_error(
        &run(Kind::Quarter, &["concern", "list", "--data", missing]),
        "no iq data directory",
    );
    assert_clean_error(
        &run(Kind::Quarter, &["run", "--data", missing]),
        "iq-node init --data",
    );
    let empty = tmp.path().to_str().expect("utf8");
    assert_clean_error(
        &run(Kind::Center, &["run", "--data", empty]),
        "not an initialised iq data directory",
    );
}

#[test]
fn bad_init_arguments_are_refused_without_writing_anything() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("q");
    let d = dir.to_str().expect("utf8");
    let good_center =
        "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWRgmzwbghT4CuAChbMgNBbZfYbqbC2SxzaKdJKuPmJMCK";
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "--quarter",
                "prohlis",
                "--name",
                "P",
                "--center",
                "not-a-multiaddr",
            ],
            "not a multiaddr",
        ),
        (
            &[
                "--quarter",
                "prohlis",
                "--name",
                "P",
                "--center",
                "/ip4/127.0.0.1/tcp/4001",
            ],
            "does not end in /p2p/<PeerId>",
        ),
        (
            &[
                "--quarter",
                "Prohlis!",
                "--name",
                "P",
                "--center",
                good_center,
            ],
            "invalid quarter slug",
        ),
        (
            &[
                "--quarter",
                "prohlis",
                "--name",
                " ",
                "--center",
                good_center,
            ],
            "--name is empty",
        ),
        (
            &[
                "--quarter",
                "prohlis",
                "--name",
                "P",
                "--center",
                good_center,
                "--advertise",
                "nowhere",
            ],
            "--advertise \"nowhere\" is not a multiaddr",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["init", "--data", d];
        all.extend_from_slice(args);
        assert_clean_error(&run(Kind::Quarter, &all), needle);
        assert!(
            !dir.join("config.toml").exists(),
            "a refused init wrote a config"
        );
    }
    let peer = run(
        Kind::Center,
        &[
            "quarter",
            "add",
            "prohlis",
            "--name",
            "Prohlis",
            "--peer",
            "12D3-not-a-peer",
            "--data",
            d,
        ],
    );
    assert_clean_error(&peer, "is not a PeerId");
}

#[test]
fn running_cluster_errors_are_clear() -> Result<()> {
    let mut c = Cluster::start(&["prohlis"])?;
    // A second daemon on the same directory.
    let dir = c.quarters[0].dir.to_str().ok_or("utf8")?.to_owned();
    assert_clean_error(
        &run(Kind::Quarter, &["run", "--data", &dir]),
        "in use by another iq process",
    );
    // An empty description is refused by the node and nothing is recorded.
    let before = c.quarters[0].concern_ids(None)?.len();
    let out = c.quarters[0].cli(&[
        "concern",
        "add",
        "--category",
        "litter",
        "--description",
        "  ",
    ]);
    assert_clean_error(&out, "description is empty");
    assert_eq!(c.quarters[0].concern_ids(None)?.len(), before);
    // An unknown quarter at the centre.
    let out = c.center.cli(&["concerns", "--quarter", "atlantis"]);
    assert_clean_error(&out, "unknown quarter 'atlantis'");
    // The wrong binary for a directory.
    assert_clean_error(
        &run(Kind::Center, &["status", "--data", &dir]),
        "belongs to a quarter node",
    );
    // A roster address that is not one is refused, by the CLI and by the
    // API, before anything is written; a good one is registered and listed.
    let peer = c.quarters[0].cli_ok(&["id"])?.trim().to_owned();
    let addrs = |c: &Cluster| -> Result<serde_json::Value> {
        let list = c.center.api_get("/api/v1/quarters")?;
        Ok(list[0]["addrs"].clone())
    };
    let add = |addr: &str| {
        c.center.cli(&[
            "quarter", "add", "prohlis", "--name", "Prohlis", "--peer", &peer, "--addr", addr,
        ])
    };
    assert_clean_error(
        &add("10.0.0.5:4001"),
        "--addr \"10.0.0.5:4001\" is not a multiaddr",
    );
    let (status, body) = c.center.api_post(
        "/api/v1/quarters",
        &serde_json::json!({
            "slug": "prohlis", "name": "Prohlis", "peer": peer,
            "addr": "/ip4/0.0.0.0/tcp/4001",
        }),
    )?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("is a wildcard"), "{body}");
    assert_eq!(
        addrs(&c)?,
        serde_json::Value::Null,
        "nothing was registered"
    );
    let listen = c.quarters[0].listen.clone();
    let out = add(&listen);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = listen
        .rsplit_once("/p2p/")
        .map_or(listen.as_str(), |(a, _)| a);
    assert_eq!(addrs(&c)?, serde_json::json!({ peer.as_str(): plain }));
    // A daemon that is not running.
    c.quarters[0].stop()?;
    let out = c.quarters[0].cli(&["concern", "list"]);
    assert_clean_error(&out, "is not running");
    let out = c.quarters[0].cli(&["status"]);
    assert_clean_error(&out, "start it with `iq-node run --data");
    // A SIGKILLed daemon leaves api.addr behind; the CLI still says it is not running.
    c.center.kill();
    let out = c.center.cli(&["quarters"]);
    assert_clean_error(&out, "is not running");
    Ok(())
}

#[test]
fn demo_federation_runs_and_stops_cleanly() {
    let out = run(Kind::Center, &["demo", "--once"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("all 9 concerns arrived at the centre"),
        "{stdout}"
    );
    for q in ["johannstadt", "friedrichstadt", "prohlis"] {
        assert!(
            stdout.contains(&format!("{q} holds all 9 concerns")),
            "{stdout}"
        );
    }
    assert!(stdout.contains("stopped cleanly"), "{stdout}");
}
