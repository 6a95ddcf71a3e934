//! "A week in the federation": the counter-current workflows driven through
//! the CLIs of real processes, the way the people would use them — the
//! centre sets frames, issues directives and opens consultations; the
//! quarters raise concerns, collect supports, answer, allocate, acknowledge
//! and escalate; the centre responds; every view shows the right totals.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use iq_tests::{Cluster, Node, Result, wait_until};
use serde_json::Value;

const QUARTERS: [&str; 3] = ["johannstadt", "friedrichstadt", "prohlis"];

/// Runs a CLI command that must fail; returns its one-line error.
fn cli_err(node: &Node, args: &[&str]) -> String {
    let out = node.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        stderr.starts_with("error: ") && stderr.lines().count() == 1,
        "{stderr}"
    );
    stderr
}

/// Waits until `--json` output of `args` on `node` satisfies `pred`.
fn wait_json(
    node: &Node,
    args: &[&str],
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    wait_until(what, Duration::from_secs(10), || {
        let v = node.cli_json(args)?;
        Ok(pred(&v).then_some(v))
    })
}

/// An RFC 3339 time `secs` from now.
fn in_secs(secs: u64) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + secs;
    let days = t / 86_400;
    let rem = t % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn a_week_in_the_federation() -> Result<()> {
    let c = Cluster::start(&QUARTERS)?;
    let [johannstadt, friedrichstadt, prohlis] = [&c.quarters[0], &c.quarters[1], &c.quarters[2]];
    let centre = &c.center;

    // Monday: the centre sets the frame.
    centre.cli_ok(&[
        "budget",
        "frame",
        "--year",
        "2027",
        "--quarter",
        "johannstadt",
        "--amount",
        "10000",
    ])?;
    centre.cli_ok(&[
        "budget",
        "frame",
        "--year",
        "2027",
        "--quarter",
        "friedrichstadt",
        "--inhabitants",
        "8000",
        "--rate",
        "1.50",
    ])?;
    centre.cli_ok(&[
        "budget",
        "frame",
        "--year",
        "2027",
        "--quarter",
        "prohlis",
        "--amount",
        "5000",
    ])?;
    let winter = centre
        .cli_ok(&[
            "directive",
            "issue",
            "--title",
            "Winter service",
            "--text",
            "Clear footpaths by 7:00",
            "--ack-due",
            "2099-01-31",
        ])?
        .trim()
        .to_owned();
    let overdue = centre
        .cli_ok(&[
            "directive",
            "issue",
            "--title",
            "Report playground checks",
            "--text",
            "Annual check",
            "--ack-due",
            "2020-01-01",
            "--target",
            "prohlis",
        ])?
        .trim()
        .to_owned();
    let tempo = centre
        .cli_ok(&[
            "consultation",
            "open",
            "--question",
            "Tempo 30 on main roads?",
            "--option",
            "yes",
            "--option",
            "no",
            "--option",
            "only at night",
            "--deadline",
            "2099-12-31",
        ])?
        .trim()
        .to_owned();
    let closing = centre
        .cli_ok(&[
            "consultation",
            "open",
            "--question",
            "Rename the square?",
            "--option",
            "yes",
            "--option",
            "no",
            "--deadline",
            &in_secs(3),
        ])?
        .trim()
        .to_owned();
    assert!(
        cli_err(
            centre,
            &[
                "budget",
                "frame",
                "--year",
                "2027",
                "--quarter",
                "atlantis",
                "--amount",
                "1"
            ]
        )
        .contains("unknown quarter")
    );

    // The frame reaches every quarter.
    for q in [johannstadt, friedrichstadt, prohlis] {
        wait_json(
            q,
            &["consultation", "list"],
            "consultations at the quarters",
            |v| v.as_array().is_some_and(|a| a.len() == 2),
        )?;
        wait_json(
            q,
            &["directive", "list"],
            "directives at the quarters",
            |v| v.as_array().is_some_and(|a| a.len() == 2),
        )?;
    }

    // Tuesday: the quarters' input.
    let lamp = prohlis
        .cli_ok(&[
            "concern",
            "add",
            "--category",
            "lighting",
            "--description",
            "Dark underpass at the tram stop",
            "--address",
            "Prohliser Allee 1",
            "--reporter-name",
            "Erika Muster",
            "--reporter-email",
            "erika@example.org",
        ])?
        .trim()
        .to_owned();
    johannstadt.cli_ok(&[
        "concern",
        "add",
        "--category",
        "litter",
        "--description",
        "Bins overflowing at the Elbe",
    ])?;
    let spam = johannstadt
        .cli_ok(&[
            "concern",
            "add",
            "--category",
            "litter",
            "--description",
            "buy cheap watches",
        ])?
        .trim()
        .to_owned();
    friedrichstadt.cli_ok(&[
        "concern",
        "add",
        "--category",
        "road-damage",
        "--description",
        "Pothole on Friedrichstraße",
    ])?;
    let bench = johannstadt
        .cli_ok(&[
            "proposal",
            "add",
            "--title",
            "Benches at the Elbe meadows",
            "--description",
            "Three benches",
            "--threshold",
            "2",
        ])?
        .trim()
        .to_owned();
    johannstadt.cli_ok(&["support", &bench, "--supporter", "ref-anna"])?;
    johannstadt.cli_ok(&["support", &bench, "--supporter", "ref-anna"])?; // idempotent
    let p = johannstadt.cli_json(&["support", &bench, "--supporter", "ref-ben"])?;
    assert_eq!(p["status"], "qualified", "two supports should qualify: {p}");
    assert_eq!(p["supports"].as_object().map(|s| s.len()), Some(2));
    johannstadt.cli_ok(&["proposal", "status", &bench, "accepted"])?;
    let bench_escalation = johannstadt
        .cli_ok(&[
            "escalate",
            "--kind",
            "proposal",
            "--id",
            &bench,
            "--reason",
            "Needs the parks department's approval",
        ])?
        .trim()
        .to_owned();

    johannstadt.cli_ok(&[
        "consultation",
        "answer",
        &tempo,
        "--option",
        "yes",
        "--position",
        "Safer school routes",
        "--yes",
        "9",
        "--no",
        "2",
        "--abstain",
        "1",
        "--body",
        "Stadtbezirksbeirat",
    ])?;
    friedrichstadt.cli_ok(&[
        "consultation",
        "answer",
        &tempo,
        "--option",
        "only at night",
        "--position",
        "Noise at night",
        "--yes",
        "6",
        "--no",
        "5",
        "--body",
        "Stadtbezirksbeirat",
    ])?;
    assert!(
        cli_err(
            prohlis,
            &[
                "consultation",
                "answer",
                &tempo,
                "--option",
                "maybe",
                "--position",
                "x",
                "--body",
                "B"
            ]
        )
        .contains("not an option")
    );
    assert!(
        cli_err(
            prohlis,
            &[
                "consultation",
                "answer",
                "no-such-id",
                "--option",
                "yes",
                "--position",
                "x",
                "--body",
                "B"
            ]
        )
        .contains("no consultation")
    );

    johannstadt.cli_ok(&[
        "budget",
        "allocate",
        "--title",
        "Benches",
        "--amount",
        "6000",
        "--year",
        "2027",
        "--proposal",
        &bench,
    ])?;
    assert!(
        cli_err(
            johannstadt,
            &[
                "budget", "allocate", "--title", "More", "--amount", "5000", "--year", "2027"
            ]
        )
        .contains("over the frame")
    );
    assert!(
        cli_err(
            johannstadt,
            &[
                "budget", "allocate", "--title", "x", "--amount", "1", "--year", "2031"
            ]
        )
        .contains("no budget frame")
    );
    prohlis.cli_ok(&[
        "budget", "allocate", "--title", "Lighting", "--amount", "1000", "--year", "2027",
    ])?;

    johannstadt.cli_ok(&[
        "directive",
        "ack",
        &winter,
        "--state",
        "implemented",
        "--comment",
        "done",
    ])?;
    friedrichstadt.cli_ok(&["directive", "ack", &winter])?;
    assert!(
        cli_err(johannstadt, &["directive", "ack", &overdue])
            .contains("not addressed to johannstadt")
    );

    let esc = prohlis
        .cli_ok(&[
            "escalate",
            "--kind",
            "concern",
            "--id",
            &lamp,
            "--reason",
            "Needs the city's lighting department",
        ])?
        .trim()
        .to_owned();
    johannstadt.cli_ok(&[
        "hide",
        "--kind",
        "concern",
        "--id",
        &spam,
        "--reason",
        "advertising",
    ])?;
    assert!(
        cli_err(
            johannstadt,
            &["proposal", "add", "--title", " ", "--description", "x"]
        )
        .contains("title is empty")
    );

    let c = prohlis.cli_json(&[
        "concern",
        "status",
        &lamp,
        "in_process",
        "--note",
        "Inspected on site",
    ])?;
    assert_eq!(
        (c["status"].clone(), c["detailed_status"].clone()),
        (serde_json::json!("open"), serde_json::json!("in_process"))
    );
    assert!(cli_err(prohlis, &["concern", "status", &lamp, "fixed"]).contains("not one of"));

    // After the deadline, answers are refused.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        cli_err(
            prohlis,
            &[
                "consultation",
                "answer",
                &closing,
                "--option",
                "yes",
                "--position",
                "x",
                "--body",
                "B"
            ]
        )
        .contains("deadline")
    );

    // Wednesday: the centre sees it all and responds.
    let inbox = wait_json(
        centre,
        &["inbox"],
        "both escalations in the centre's inbox",
        |v| v.as_array().is_some_and(|a| a.len() == 2),
    )?;
    // Oldest first: Johannstadt's proposal, then Prohlis's concern.
    assert_eq!(
        (inbox[0]["quarter"].clone(), inbox[0]["item"].clone()),
        (
            serde_json::json!("johannstadt"),
            serde_json::json!("Benches at the Elbe meadows")
        )
    );
    assert_eq!(inbox[1]["quarter"], "prohlis");
    assert_eq!(inbox[1]["item"], "Dark underpass at the tram stop");
    assert!(
        cli_err(
            centre,
            &[
                "respond",
                "--quarter",
                "prohlis",
                "--escalation",
                "nope",
                "--decision",
                "accepted",
                "--note",
                "x"
            ]
        )
        .contains("no escalation")
    );
    centre.cli_ok(&[
        "respond",
        "--quarter",
        "prohlis",
        "--escalation",
        &esc,
        "--decision",
        "forwarded",
        "--department",
        "Straßen- und Tiefbauamt",
        "--note",
        "Lamp repair ordered",
    ])?;
    centre.cli_ok(&[
        "respond",
        "--quarter",
        "johannstadt",
        "--escalation",
        &bench_escalation,
        "--decision",
        "accepted",
        "--note",
        "Approved by the parks department",
    ])?;
    wait_json(centre, &["inbox"], "the inbox to empty", |v| {
        v.as_array().is_some_and(|a| a.is_empty())
    })?;
    // The response shows where the matter started.
    let mine = wait_json(
        prohlis,
        &["escalations", "--quarter", "prohlis"],
        "the response at prohlis",
        |v| v[0]["response"].is_object(),
    )?;
    // … and in the concern's status notes.
    let shown = prohlis.cli_json(&["concern", "show", &lamp])?;
    let notes = shown["notes"].as_array().ok_or("no notes")?;
    assert_eq!(notes.len(), 2, "{shown}");
    assert_eq!(
        (notes[0]["by"].clone(), notes[1]["by"].clone()),
        (serde_json::json!("quarter"), serde_json::json!("centre"))
    );
    assert!(notes[1]["note"] == "Lamp repair ordered", "{shown}");
    // The response to the escalated proposal shows on the proposal.
    let proposals = wait_json(
        johannstadt,
        &["proposal", "list", "--quarter", "johannstadt"],
        "the response on the proposal",
        |v| v[0]["responses"].as_array().is_some_and(|r| r.len() == 1),
    )?;
    assert_eq!(
        proposals[0]["responses"][0]["note"],
        "Approved by the parks department"
    );
    // The reporter's personal data stays on the quarter's node.
    let reporter = prohlis.cli_json(&["concern", "reporter", &lamp])?;
    assert_eq!(reporter["email"], "erika@example.org");
    let at_centre = centre.api_get(&format!("/api/v1/concerns/{lamp}"))?;
    assert_eq!(at_centre["address"], "Prohliser Allee 1");
    assert!(
        !at_centre.to_string().contains("erika") && !at_centre.to_string().contains("Muster"),
        "personal data left the quarter: {at_centre}"
    );
    assert!(cli_err(johannstadt, &["concern", "reporter", &lamp]).contains("no such concern"));
    assert_eq!(mine[0]["response"]["decision"], "forwarded");
    assert_eq!(mine[0]["response"]["department"], "Straßen- und Tiefbauamt");

    let results = wait_json(
        centre,
        &["consultation", "results", &tempo],
        "both answers at the centre",
        |v| v[0]["answers"].as_object().is_some_and(|a| a.len() == 2),
    )?;
    let options = results[0]["options"].as_array().ok_or("no options")?;
    let yes = options
        .iter()
        .find(|o| o["option"] == "yes")
        .ok_or("no yes")?;
    assert_eq!(
        (
            yes["quarters"].clone(),
            yes["yes"].clone(),
            yes["no"].clone()
        ),
        (
            serde_json::json!(["johannstadt"]),
            serde_json::json!(9),
            serde_json::json!(2)
        )
    );
    let night = options
        .iter()
        .find(|o| o["option"] == "only at night")
        .ok_or("no night")?;
    assert_eq!(night["yes"], 6);
    assert_eq!(results[0]["missing"], serde_json::json!(["prohlis"]));

    let directives = wait_json(
        centre,
        &["directive", "list"],
        "acknowledgements at the centre",
        |v| {
            v.as_array().is_some_and(|a| {
                a.iter()
                    .any(|d| d["acks"].as_object().is_some_and(|x| x.len() == 2))
            })
        },
    )?;
    let w = directives
        .as_array()
        .and_then(|a| a.iter().find(|d| d["directive"]["id"] == winter.as_str()))
        .ok_or("no winter")?;
    assert_eq!(w["acks"]["johannstadt"]["state"], "implemented");
    assert_eq!(w["pending"], serde_json::json!(["prohlis"]));
    assert_eq!(w["overdue"], serde_json::json!([]), "not due yet");
    let o = directives
        .as_array()
        .and_then(|a| a.iter().find(|d| d["directive"]["id"] == overdue.as_str()))
        .ok_or("no overdue")?;
    assert_eq!(o["overdue"], serde_json::json!(["prohlis"]));

    let budget = wait_json(
        centre,
        &["budget", "show", "--year", "2027"],
        "allocations at the centre",
        |v| {
            v.as_array().is_some_and(|a| {
                a.iter()
                    .map(|b| b["allocated_cents"].as_i64().unwrap_or(0))
                    .sum::<i64>()
                    == 700_000
            })
        },
    )?;
    let line = |b: &Value, q: &str| {
        b.as_array()
            .and_then(|a| a.iter().find(|l| l["quarter"] == q).cloned())
            .unwrap_or_default()
    };
    assert_eq!(
        line(&budget, "friedrichstadt")["frame_cents"],
        1_200_000,
        "8000 × 1.50 €"
    );
    assert_eq!(line(&budget, "johannstadt")["remaining_cents"], 400_000);
    assert_eq!(line(&budget, "johannstadt")["over_frame"], false);

    // The centre lowers Johannstadt's frame below what it allocated: both sides see the flag.
    centre.cli_ok(&[
        "budget",
        "frame",
        "--year",
        "2027",
        "--quarter",
        "johannstadt",
        "--amount",
        "5000",
    ])?;
    let b = centre.cli_json(&["budget", "show", "--year", "2027"])?;
    assert_eq!(line(&b, "johannstadt")["over_frame"], true);
    wait_json(
        johannstadt,
        &["budget", "show", "--year", "2027"],
        "the over-frame flag at johannstadt",
        |v| line(v, "johannstadt")["over_frame"] == true,
    )?;

    // Hidden items stay out of public views everywhere.
    wait_until(
        "the hidden concern to leave the centre's list",
        Duration::from_secs(10),
        || {
            let ids = centre.concern_ids(Some("johannstadt"))?;
            Ok((ids.len() == 1 && !ids.contains(&spam)).then_some(()))
        },
    )?;
    let overview = centre.cli_json(&["overview"])?;
    let j = overview
        .as_array()
        .and_then(|a| a.iter().find(|o| o["quarter"] == "johannstadt").cloned())
        .ok_or("no overview")?;
    assert_eq!(
        (j["total"].clone(), j["hidden"].clone()),
        (serde_json::json!(1), serde_json::json!(1))
    );
    Ok(())
}

#[test]
fn two_writers_of_a_quarter_edit_offline_and_the_conflict_is_visible() -> Result<()> {
    let mut c = Cluster::start(&["prohlis"])?;
    // The quarter's second writer: a laptop at a street festival.
    let (mut laptop, laptop_peer) = c.init_writer("prohlis", "prohlis-laptop")?;
    c.add_to_roster("prohlis", &laptop_peer)?;
    laptop.start()?;
    let id = c.quarters[0].add_concern("Broken bench at the festival site")?;
    wait_until(
        "the laptop to hold the office's concern",
        Duration::from_secs(10),
        || {
            Ok(laptop
                .concern_ids(Some("prohlis"))?
                .contains(&id)
                .then_some(()))
        },
    )?;
    // Each edits the same concern without having seen the other's edit:
    // the laptop is away while the office edits, and offline (no centre, no
    // office) while it edits itself.
    laptop.stop()?;
    c.quarters[0].cli_ok(&[
        "concern",
        "status",
        &id,
        "processed",
        "--note",
        "repaired by the office",
    ])?;
    c.quarters[0].stop()?;
    c.center.kill();
    laptop.start()?;
    laptop.cli_ok(&[
        "concern",
        "status",
        &id,
        "rejected",
        "--note",
        "not ours: private ground",
    ])?;
    c.center.restart()?;
    c.quarters[0].start()?;
    // Both edits merge; the field both set lists both values, the same everywhere.
    let shown = wait_json(
        &c.quarters[0],
        &["concern", "show", &id],
        "the edits to merge at the office",
        |v| v["notes"].as_array().is_some_and(|n| n.len() == 2),
    )?;
    let mut values: Vec<String> = shown["conflicts"]["detailed_status"]
        .as_array()
        .ok_or(format!("no conflict shown: {shown}"))?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    values.sort();
    assert_eq!(
        values,
        vec!["processed".to_string(), "rejected".to_string()]
    );
    let at_laptop = wait_json(
        &laptop,
        &["concern", "show", &id],
        "the edits to merge at the laptop",
        |v| v["notes"].as_array().is_some_and(|n| n.len() == 2),
    )?;
    assert_eq!(
        at_laptop["detailed_status"], shown["detailed_status"],
        "the merged value differs between writers"
    );
    let at_centre = wait_json(
        &c.center,
        &["concerns", "--quarter", "prohlis"],
        "the merge at the centre",
        |v| v[0]["notes"].as_array().is_some_and(|n| n.len() == 2),
    )?;
    assert_eq!(at_centre[0]["detailed_status"], shown["detailed_status"]);
    Ok(())
}
