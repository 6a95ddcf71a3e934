//! The demo federation: a centre and Dresden's three pilot quarters
//! (Johannstadt, Friedrichstadt, Prohlis) as four separate nodes in one
//! process — each with its own data directory, sled store, libp2p swarm on
//! loopback and HTTP API — that record concerns and show them arrive.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use iq_node::api::{self as node_api, ConcernView, NewConcern};
use iq_node::cli::{QuarterInit, init_quarter};
use iq_node::client::Client;
use iq_node::daemon::{Daemon, shutdown_signal};
use iq_node::output;
use iq_protocol::QuarterSlug;
use iq_protocol::datadir::{DataDir, Replicate, Role};

use crate::api::{self, QuarterView};
use crate::cli::{init_center, print_quarters};

const QUARTERS: [(&str, &str); 3] = [
    ("johannstadt", "Johannstadt"),
    ("friedrichstadt", "Friedrichstadt"),
    ("prohlis", "Prohlis"),
];

/// (quarter, category, description, lat, long)
const CONCERNS: [(&str, &str, &str, f64, f64); 9] = [
    (
        "johannstadt",
        "lighting",
        "Street lamp out at Pfotenhauerstraße corner",
        51.0521,
        13.7641,
    ),
    (
        "johannstadt",
        "litter",
        "Overflowing bins at the Elbe meadows after the weekend",
        51.0558,
        13.7612,
    ),
    (
        "johannstadt",
        "green-spaces",
        "Hedge blocks the cycle path on Blumenstraße",
        51.0489,
        13.7702,
    ),
    (
        "friedrichstadt",
        "road-damage",
        "Deep pothole in Friedrichstraße near the hospital",
        51.0566,
        13.7168,
    ),
    (
        "friedrichstadt",
        "graffiti",
        "Graffiti on the underpass at Bahnhof Mitte",
        51.0571,
        13.7235,
    ),
    (
        "friedrichstadt",
        "playgrounds",
        "Broken swing at the Ostragehege playground",
        51.0612,
        13.7101,
    ),
    (
        "prohlis",
        "lighting",
        "Dark footpath between Prohliser Allee and the tram stop",
        51.0025,
        13.7985,
    ),
    (
        "prohlis",
        "litter",
        "Bulky waste dumped behind the shopping centre",
        51.0041,
        13.8012,
    ),
    (
        "prohlis",
        "road-damage",
        "Loose kerbstones at Jacob-Winter-Platz",
        51.0013,
        13.7952,
    ),
];

fn init_demo_tracing() {
    let filter = iq_node::cli::log_filter("warn");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the demo; with `once`, stops as soon as the centre holds everything.
pub async fn run(dir: Option<PathBuf>, once: bool) -> anyhow::Result<()> {
    init_demo_tracing();
    let (_temp, root) = match dir {
        Some(d) => {
            if d.exists() {
                bail!(
                    "--dir {} already exists: give a path that does not exist yet",
                    d.display()
                );
            }
            (None, d)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("iq-demo-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    println!("iq demo federation — data in {}", root.display());
    println!();

    let center_dir = DataDir::new(root.join("center"));
    let (_, center_id) = init_center(&center_dir, None, None, false)?;
    let center = Daemon::start(center_dir.clone(), Role::Center, api::router).await?;
    println!(
        "centre        {}  api http://{}",
        center.listen, center.api_addr
    );

    let mut quarters = Vec::new();
    for (slug, name) in QUARTERS {
        let dir = DataDir::new(root.join(slug));
        let (_, peer) = init_quarter(
            &dir,
            QuarterInit {
                slug: slug.into(),
                name: name.into(),
                center: center.listen.clone(),
                listen: None,
                api: None,
                psk: None,
                advertise: None,
                replicate: Replicate::All,
            },
        )?;
        let peer = peer.parse().context("fresh PeerId")?;
        api::add_to_roster(
            &center.handle(),
            QuarterSlug::new(slug)?,
            name.into(),
            peer,
            None,
        )
        .await?;
        let daemon = Daemon::start(dir, Role::Quarter, node_api::quarter_router).await?;
        println!(
            "{slug:<14}{}  api http://{}",
            daemon.listen, daemon.api_addr
        );
        quarters.push(daemon);
    }
    let _ = center_id;
    println!();

    for (slug, category, description, lat, long) in CONCERNS {
        let dir = DataDir::new(root.join(slug));
        let client = Client::new(&dir, Role::Quarter)?;
        let body = NewConcern {
            category: category.into(),
            description: description.into(),
            lat: Some(lat),
            long: Some(long),
            address: None,
            media_url: None,
            agency: None,
            reporter: None,
        };
        let c: ConcernView = client.post("/api/v1/concerns", &body).await?;
        println!("recorded at {slug:<14} {} {category}", c.id);
    }
    println!();

    let center_client = Client::new(&center_dir, Role::Center)?;
    let started = Instant::now();
    let deadline = Duration::from_secs(30);
    let arrived = loop {
        let list: Vec<ConcernView> = center_client.get("/api/v1/concerns", &[]).await?;
        if list.len() >= CONCERNS.len() {
            break list;
        }
        if started.elapsed() > deadline {
            bail!(
                "only {} of {} concerns reached the centre within {deadline:?}",
                list.len(),
                CONCERNS.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "all {} concerns arrived at the centre after {:.2}s:",
        arrived.len(),
        started.elapsed().as_secs_f64()
    );
    output::print_concerns(&arrived);
    println!();
    for (slug, _) in QUARTERS {
        let client = Client::new(&DataDir::new(root.join(slug)), Role::Quarter)?;
        loop {
            let list: Vec<ConcernView> = client.get("/api/v1/concerns", &[]).await?;
            if list.len() >= CONCERNS.len() {
                println!("{slug} holds all {} concerns of the city", list.len());
                break;
            }
            if started.elapsed() > deadline {
                bail!(
                    "{slug} holds only {} of {} concerns after {deadline:?}",
                    list.len(),
                    CONCERNS.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!();
    let roster: Vec<QuarterView> = center_client.get("/api/v1/quarters", &[]).await?;
    print_quarters(&roster);
    println!();

    let r = root.display();
    println!("try the CLIs against the running nodes (in another terminal):");
    println!(
        "  cargo run --release -q -p iq-node -- concern add --data {r}/prohlis --category litter --description \"Glass shards on the playground\""
    );
    println!("  cargo run --release -q -p iq-node -- concern list --data {r}/johannstadt");
    println!("  cargo run --release -q -p iq-node -- status --data {r}/friedrichstadt");
    println!(
        "  cargo run --release -q -p iq-center -- concerns --data {r}/center --quarter prohlis"
    );
    println!("  cargo run --release -q -p iq-center -- quarters --data {r}/center");
    println!();

    if !once {
        println!("running; stop with ctrl-c");
        shutdown_signal().await;
        println!();
    }
    println!("stopping the demo federation…");
    for q in quarters {
        q.shutdown().await?;
    }
    center.shutdown().await?;
    println!("stopped cleanly");
    Ok(())
}
