//! The `iq-center` command line: what the user typed (clap) and what each
//! command does with it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, Subcommand};
use iq_node::api::ConcernView;
use iq_node::cli::{
    AddrArgs, DataArg, JsonArg, LogFormat, check_listen, default_api, default_listen, init_tracing,
};
use iq_node::client::Client;
use iq_node::daemon::Daemon;
use iq_node::output;
use iq_protocol::PeerId;
use iq_protocol::QuarterSlug;
use iq_protocol::datadir::{Config, DataDir, Replicate, Role};

use crate::api::{self, AddQuarter, QuarterView};
use crate::demo;
use crate::frame_cli;

/// iq centre node: the city's node that aggregates every quarter and sets the frame.
#[derive(Debug, Parser)]
#[command(name = "iq-center", version, about)]
pub struct Cli {
    /// Log format of `run`: human or json.
    #[arg(long, env = "IQ_LOG_FORMAT", default_value = "human", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the centre's data directory; prints its PeerId and listen address.
    Init {
        #[command(flatten)]
        data: DataArg,
        #[command(flatten)]
        addr: AddrArgs,
        /// Run the federation as a libp2p private network: generates
        /// DIR/swarm.key, which every quarter node needs (`iq-node init --psk`).
        #[arg(long)]
        private_network: bool,
    },
    /// Run the centre until ctrl-c.
    Run {
        #[command(flatten)]
        data: DataArg,
    },
    /// Print the centre's PeerId.
    Id {
        #[command(flatten)]
        data: DataArg,
    },
    /// Manage the federation roster.
    #[command(subcommand)]
    Quarter(QuarterCommand),
    /// The roster with each quarter's sync state.
    Quarters {
        #[command(flatten)]
        data: DataArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Concerns of all quarters, aggregated.
    Concerns {
        #[command(flatten)]
        data: DataArg,
        /// Only this quarter's concerns.
        #[arg(long)]
        quarter: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Peers, documents, heads and last sync of the running centre.
    Status {
        #[command(flatten)]
        data: DataArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Write a consistent snapshot of the centre (store, config, key) to a file.
    Backup(iq_node::cli::BackupArgs),
    /// Make a data directory from a backup file.
    Restore(iq_node::cli::RestoreArgs),
    /// Directives: issue, list with acknowledgements.
    #[command(subcommand)]
    Directive(frame_cli::DirectiveCommand),
    /// Consultations: open, close, results.
    #[command(subcommand)]
    Consultation(frame_cli::ConsultationCommand),
    /// Budget frames: set, show against allocations.
    #[command(subcommand)]
    Budget(frame_cli::BudgetCommand),
    /// Escalations waiting for a response, oldest first.
    Inbox {
        #[command(flatten)]
        data: DataArg,
        /// Include answered escalations.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Respond to an escalation: accepted, declined, or forwarded to a department.
    Respond {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        quarter: String,
        /// The escalation's id (see `inbox`).
        #[arg(long)]
        escalation: String,
        #[arg(long)]
        decision: String,
        #[arg(long)]
        department: Option<String>,
        #[arg(long)]
        note: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Concerns per quarter by status and category.
    Overview {
        #[command(flatten)]
        data: DataArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Start a demo federation (centre + Johannstadt, Friedrichstadt, Prohlis) on loopback.
    Demo {
        /// Keep the demo's data here instead of a temporary directory (must not exist yet).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Exit once the centre holds every concern instead of waiting for ctrl-c.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum QuarterCommand {
    /// Remove a writer node's key from a quarter (a lost laptop, a rotated
    /// key): it is refused and disconnected at once.
    Remove {
        /// The quarter's slug.
        slug: String,
        /// The PeerId to remove.
        #[arg(long)]
        peer: String,
        #[command(flatten)]
        data: DataArg,
    },
    /// Add a quarter (or another writer node of it) to the roster.
    Add {
        /// The quarter's slug, e.g. johannstadt.
        slug: String,
        /// Display name, e.g. "Johannstadt".
        #[arg(long)]
        name: String,
        /// The quarter node's PeerId (printed by `iq-node init` / `iq-node id`).
        #[arg(long)]
        peer: String,
        /// Where the centre can dial that node, e.g. /ip4/10.0.0.5/tcp/4001
        /// (its `listen:` line). Optional: quarter nodes dial the centre
        /// anyway; with it a new or rebuilt centre reaches them at once.
        /// Given again, it replaces the one registered before.
        #[arg(long)]
        addr: Option<String>,
        #[command(flatten)]
        data: DataArg,
    },
}

/// Initialises the centre's data directory; returns its config and PeerId.
pub fn init_center(
    data: &DataDir,
    listen: Option<String>,
    api: Option<SocketAddr>,
    private_network: bool,
) -> anyhow::Result<(Config, PeerId)> {
    let listen = match listen {
        Some(l) => {
            check_listen(&l)?;
            l
        }
        None => default_listen()?,
    };
    let api = match api {
        Some(a) => a,
        None => default_api()?,
    };
    let config = Config {
        role: Role::Center,
        listen,
        api,
        quarter: None,
        center: None,
        private_network,
        advertise: None,
        replicate: Replicate::All,
    };
    let psk = private_network.then(DataDir::new_psk_file);
    let identity = data.init(&config, psk.as_deref())?;
    Ok((config, identity.peer_id()))
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints the roster table.
pub fn print_quarters(list: &[QuarterView]) {
    if list.is_empty() {
        println!(
            "no quarters on the roster yet: add one with `iq-center quarter add SLUG --name NAME --peer PEERID`"
        );
        return;
    }
    println!(
        "{:<16}  {:<20}  {:<9}  {:>8}  {:<14}  WRITERS",
        "QUARTER", "NAME", "CONNECTED", "CONCERNS", "HEADS"
    );
    for q in list {
        let heads: Vec<String> = q.heads.iter().map(|h| output::short(h)).collect();
        let writers: Vec<String> = q.writers.iter().map(|w| output::short(w)).collect();
        println!(
            "{:<16}  {:<20}  {:<9}  {:>8}  {:<14}  {}",
            q.slug,
            q.name,
            if q.connected { "yes" } else { "no" },
            q.concerns,
            heads.join(","),
            writers.join(",")
        );
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    const ROLE: Role = Role::Center;
    let client =
        |d: &DataArg| -> anyhow::Result<Client> { Ok(Client::new(&DataDir::new(&d.data), ROLE)?) };
    match cli.command {
        Command::Init {
            data,
            addr: AddrArgs { listen, api },
            private_network,
        } => {
            let dir = DataDir::new(&data.data);
            let (config, peer_id) = init_center(&dir, listen, api, private_network)?;
            println!("initialised centre in {}", data.data.display());
            println!("peer id:  {peer_id}");
            println!("listen:   {}/p2p/{peer_id}", config.listen);
            println!("api:      http://{}", config.api);
            println!();
            println!("quarter nodes use the listen address as --center:");
            let psk = if private_network {
                format!(" --psk {}", dir.psk_path().display())
            } else {
                String::new()
            };
            println!(
                "  iq-node init --data <dir> --quarter <slug> --name <name> --center {}/p2p/{peer_id}{psk}",
                config.listen
            );
            if private_network {
                println!();
                println!(
                    "private network: every node needs a copy of {} (keep it secret)",
                    dir.psk_path().display()
                );
            }
        }
        Command::Run { data } => {
            init_tracing(cli.log_format);
            let daemon = Daemon::start(DataDir::new(&data.data), Role::Center, api::router).await?;
            println!("iq-center running");
            println!("peer id:  {}", daemon.peer_id);
            println!("libp2p:   {}", daemon.listen);
            println!("api:      http://{}", daemon.api_addr);
            println!("stop with ctrl-c");
            daemon.run_until_signal().await?;
        }
        Command::Id { data } => {
            println!("{}", DataDir::new(&data.data).identity()?.peer_id());
        }
        Command::Quarter(QuarterCommand::Remove { slug, peer, data }) => {
            QuarterSlug::new(&slug).map_err(|e| anyhow::anyhow!("{e}"))?;
            if peer.trim().parse::<PeerId>().is_err() {
                bail!("--peer {peer:?} is not a PeerId");
            }
            let client = Client::new(&DataDir::new(&data.data), ROLE)?;
            let entry: iq_protocol::schema::RosterEntry = client
                .delete(&format!("/api/v1/quarters/{slug}/writers/{}", peer.trim()))
                .await?;
            println!(
                "{} removed from {slug}; {} writer node(s) left",
                peer.trim(),
                entry.writers.len()
            );
        }
        Command::Quarter(QuarterCommand::Add {
            slug,
            name,
            peer,
            addr,
            data,
        }) => {
            // Check locally first so the message names the flag.
            QuarterSlug::new(&slug).map_err(|e| anyhow::anyhow!("{e}"))?;
            let Ok(peer_id) = peer.trim().parse::<PeerId>() else {
                bail!(
                    "--peer {peer:?} is not a PeerId; use the id printed by `iq-node init` or `iq-node id`"
                );
            };
            if let Some(a) = &addr {
                iq_protocol::transport::roster_addr(&peer_id, a)
                    .map_err(|e| anyhow::anyhow!("--addr {e}"))?;
            }
            let client = Client::new(&DataDir::new(&data.data), ROLE)?;
            let entry: iq_protocol::schema::RosterEntry = client
                .post(
                    "/api/v1/quarters",
                    &AddQuarter {
                        slug: slug.clone(),
                        name,
                        peer,
                        addr,
                    },
                )
                .await?;
            println!(
                "{slug} ({}) is on the roster with {} writer node(s)",
                entry.name,
                entry.writers.len()
            );
        }
        Command::Quarters { data, json } => {
            let client = Client::new(&DataDir::new(&data.data), ROLE)?;
            let list: Vec<QuarterView> = client.get("/api/v1/quarters", &[]).await?;
            if json.json {
                print_json(&list)?;
            } else {
                print_quarters(&list);
            }
        }
        Command::Concerns {
            data,
            quarter,
            json,
        } => {
            let client = Client::new(&DataDir::new(&data.data), ROLE)?;
            let query: Vec<(&str, &str)> = quarter
                .as_deref()
                .map(|q| ("quarter", q))
                .into_iter()
                .collect();
            let list: Vec<ConcernView> = client.get("/api/v1/concerns", &query).await?;
            if json.json {
                print_json(&list)?;
            } else {
                output::print_concerns(&list);
            }
        }
        Command::Status { data, json } => {
            let client = Client::new(&DataDir::new(&data.data), ROLE)?;
            let status: iq_protocol::replicator::Status = client.get("/api/v1/status", &[]).await?;
            if json.json {
                print_json(&status)?;
            } else {
                output::print_status(&status);
            }
        }
        Command::Backup(args) => iq_node::cli::run_backup(args, ROLE).await?,
        Command::Restore(args) => iq_node::cli::run_restore(args, ROLE)?,
        Command::Demo { dir, once } => demo::run(dir, once).await?,
        Command::Directive(cmd) => frame_cli::directive(cmd, client).await?,
        Command::Consultation(cmd) => frame_cli::consultation(cmd, client).await?,
        Command::Budget(cmd) => frame_cli::budget(cmd, client).await?,
        Command::Inbox { data, all, json } => {
            frame_cli::inbox(data, all, json.json, client).await?
        }
        Command::Respond {
            data,
            quarter,
            escalation,
            decision,
            department,
            note,
            json,
        } => {
            frame_cli::respond(
                data, quarter, escalation, decision, department, note, json.json, client,
            )
            .await?
        }
        Command::Overview { data, json } => frame_cli::overview(data, json.json, client).await?,
    }
    Ok(())
}
