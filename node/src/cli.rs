//! The `iq-node` command line: what the user typed (clap) and what each
//! command does with it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use iq_protocol::datadir::{self, Config, DataDir, QuarterConfig, Replicate, Role};
use iq_protocol::replicator::Status;
use iq_protocol::{Multiaddr, QuarterSlug};

use crate::api::{self, ConcernView, NewConcern};
use crate::client::Client;
use crate::daemon::{self, Daemon};
use crate::open311::keys;
use crate::output;
use crate::workflow_cli;

/// iq quarter node: a quarter office's own node in the city federation.
#[derive(Debug, Parser)]
#[command(name = "iq-node", version, about)]
pub struct Cli {
    /// Log format of `run`: human or json.
    #[arg(long, env = "IQ_LOG_FORMAT", default_value = "human", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// The data directory argument every command takes.
#[derive(Debug, Args)]
pub struct DataArg {
    /// The node's data directory.
    #[arg(long, env = "IQ_DATA", value_name = "DIR")]
    pub data: PathBuf,
}

/// `--json` for scripts.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a data directory for a quarter node; prints its PeerId.
    Init {
        #[command(flatten)]
        data: DataArg,
        /// The quarter's slug, e.g. johannstadt.
        #[arg(long)]
        quarter: String,
        /// The quarter's display name, e.g. "Johannstadt".
        #[arg(long)]
        name: String,
        /// The centre's address ending in /p2p/<PeerId> (printed by `iq-center init`).
        #[arg(long, value_name = "MULTIADDR")]
        center: String,
        #[command(flatten)]
        addr: AddrArgs,
        /// The federation's pre-shared key file (`swarm.key` from `iq-center init --private-network`).
        #[arg(long, value_name = "FILE")]
        psk: Option<std::path::PathBuf>,
        /// The address other quarters dial for direct sync [default: --listen,
        /// unless it is a wildcard such as 0.0.0.0].
        #[arg(long, value_name = "MULTIADDR")]
        advertise: Option<String>,
        /// Which quarter documents this node replicates: "all" (every quarter's
        /// on the roster) or "own" (its own quarter's and the city's only).
        #[arg(long, value_name = "SCOPE", default_value = "all", value_parser = clap::builder::ValueParser::new(str::parse::<Replicate>))]
        replicate: Replicate,
    },
    /// Run the node until ctrl-c.
    Run {
        #[command(flatten)]
        data: DataArg,
    },
    /// Print this node's PeerId.
    Id {
        #[command(flatten)]
        data: DataArg,
    },
    /// Record and list concerns (Anliegen).
    #[command(subcommand)]
    Concern(ConcernCommand),
    /// Proposals: add, list, move on, record milestones.
    #[command(subcommand)]
    Proposal(workflow_cli::ProposalCommand),
    /// Support a proposal (one support per supporter).
    Support {
        #[command(flatten)]
        data: DataArg,
        /// The proposal's id.
        id: String,
        /// A pseudonymous reference for the supporter (no names).
        #[arg(long)]
        supporter: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Consultations from the centre: list, answer.
    #[command(subcommand)]
    Consultation(workflow_cli::ConsultationCommand),
    /// The quarter's budget: allocate, show.
    #[command(subcommand)]
    Budget(workflow_cli::BudgetCommand),
    /// Directives from the centre: list, acknowledge.
    #[command(subcommand)]
    Directive(workflow_cli::DirectiveCommand),
    /// Hand a concern or proposal up to the city; prints the escalation's id.
    Escalate {
        #[command(flatten)]
        data: DataArg,
        /// concern or proposal.
        #[arg(long)]
        kind: String,
        /// The item's id.
        #[arg(long)]
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Escalations with the centre's responses.
    Escalations {
        #[command(flatten)]
        data: DataArg,
        /// Only this quarter's escalations.
        #[arg(long)]
        quarter: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Hide a concern or proposal from public views (kept, marked, with a reason).
    Hide {
        #[command(flatten)]
        data: DataArg,
        /// concern or proposal.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Open311 API keys for citizen apps: create, list, revoke.
    #[command(subcommand)]
    Apikey(ApikeyCommand),
    /// Peers, documents, heads and last sync of the running node.
    Status {
        #[command(flatten)]
        data: DataArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Write a consistent snapshot of this node (store, config, key) to a file.
    Backup(BackupArgs),
    /// Make a data directory from a backup file.
    Restore(RestoreArgs),
}

/// `backup` of both binaries.
#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// The backup file to write (replaced atomically; mode 0600, as it holds the node's key).
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
}

/// `restore` of both binaries.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The data directory to create; must be empty or missing unless --force.
    #[command(flatten)]
    pub data: DataArg,
    /// The backup file written by `backup`.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// Move a non-empty data directory aside to DIR.before-restore-<time> first
    /// (its daemon must be stopped).
    #[arg(long)]
    pub force: bool,
}

/// Runs `backup` for a node of `role`.
pub async fn run_backup(args: BackupArgs, role: Role) -> anyhow::Result<()> {
    let entries = crate::backup::backup(&DataDir::new(&args.data.data), role, &args.to).await?;
    println!(
        "backup written to {} ({entries} store entries)",
        args.to.display()
    );
    Ok(())
}

/// Runs `restore` for a node of `role`.
pub fn run_restore(args: RestoreArgs, role: Role) -> anyhow::Result<()> {
    let data = DataDir::new(&args.data.data);
    let done = crate::backup::restore(&data, role, &args.from, args.force)?;
    if let Some(aside) = &done.moved_aside {
        println!("the previous directory was moved to {}", aside.display());
    }
    println!(
        "restored {} ({} store entries); start it with `run --data {}`",
        data.path().display(),
        done.entries,
        data.path().display()
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum ConcernCommand {
    /// Record a concern in this quarter; prints its id.
    Add {
        #[command(flatten)]
        data: DataArg,
        /// Service code, e.g. road-damage, lighting, litter.
        #[arg(long)]
        category: String,
        /// What the concern is about.
        #[arg(long)]
        description: String,
        #[arg(long, allow_negative_numbers = true)]
        lat: Option<f64>,
        #[arg(long, allow_negative_numbers = true)]
        long: Option<f64>,
        /// Where, in words.
        #[arg(long)]
        address: Option<String>,
        /// A photo or document (http or https URL).
        #[arg(long)]
        media_url: Option<String>,
        /// The department responsible.
        #[arg(long)]
        agency: Option<String>,
        /// Reporter's name (kept on this node only, never replicated).
        #[arg(long)]
        reporter_name: Option<String>,
        /// Reporter's e-mail (kept on this node only).
        #[arg(long)]
        reporter_email: Option<String>,
        /// Reporter's phone (kept on this node only).
        #[arg(long)]
        reporter_phone: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Move a concern on: received, in_process, processed (closes it) or rejected (closes it).
    Status {
        #[command(flatten)]
        data: DataArg,
        id: String,
        status: String,
        /// What was done.
        #[arg(long, default_value = "")]
        note: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// One concern with its status history (and the centre's response) and any conflicting edits.
    Show {
        #[command(flatten)]
        data: DataArg,
        id: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// The reporter's personal data, from this node's local-only store.
    Reporter {
        #[command(flatten)]
        data: DataArg,
        id: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// List concerns of this quarter and the replicas it holds.
    List {
        #[command(flatten)]
        data: DataArg,
        /// Only this quarter's concerns.
        #[arg(long)]
        quarter: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApikeyCommand {
    /// Create a key for an app; prints the key (shown this once).
    Create {
        #[command(flatten)]
        data: DataArg,
        /// A name for the key, e.g. the app's: letters, digits, '-', '_', '.'.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// List the keys' names and dates (never the keys).
    List {
        #[command(flatten)]
        data: DataArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Revoke a key by its name: posts with it are refused at once.
    Revoke {
        #[command(flatten)]
        data: DataArg,
        name: String,
        #[command(flatten)]
        json: JsonArg,
    },
}

/// Runs a CLI's command on a tokio runtime and turns its error into one line
/// on stderr and a failing exit code (shared by both binaries' `main`).
pub fn main_with(
    run: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Where a new node listens: what `init` of both binaries takes.
#[derive(Debug, Args)]
pub struct AddrArgs {
    /// libp2p listen address [default: 127.0.0.1 with a free port chosen now].
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Option<String>,
    /// HTTP API address [default: 127.0.0.1 with a free port chosen now].
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<SocketAddr>,
}

/// Sets up `tracing` on stderr; `IQ_LOG` (or `RUST_LOG`) sets the filter.
pub fn init_tracing(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter("info,libp2p=warn"))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The log filter from `IQ_LOG` (or `RUST_LOG`), else `default`.
///
/// automerge wraps hot functions in info-level spans whose arguments are
/// formatted on every call (a tenth of a busy centre's CPU time), so
/// automerge logs only warnings unless the filter names it.
pub fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    let directives = std::env::var("IQ_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_owned());
    let directives = if directives.contains("automerge") {
        directives
    } else {
        format!("{directives},automerge=warn")
    };
    tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("warning: the log filter {directives:?} is invalid ({e}); using {default:?}");
        tracing_subscriber::EnvFilter::new(format!("{default},automerge=warn"))
    })
}

/// What `init` of a quarter node needs.
#[derive(Debug, Clone)]
pub struct QuarterInit {
    pub slug: String,
    pub name: String,
    pub center: String,
    pub listen: Option<String>,
    pub api: Option<SocketAddr>,
    /// The federation's pre-shared key file (private networks).
    pub psk: Option<std::path::PathBuf>,
    /// The address other quarters dial for direct sync.
    pub advertise: Option<String>,
    /// Which quarter documents the node replicates.
    pub replicate: Replicate,
}

/// Default libp2p listen address: loopback with a port chosen now, so the
/// node keeps its address across restarts.
pub fn default_listen() -> anyhow::Result<String> {
    let port = datadir::free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .context("cannot find a free TCP port")?;
    Ok(format!("/ip4/127.0.0.1/tcp/{port}"))
}

/// Default API address: loopback with a port chosen now.
pub fn default_api() -> anyhow::Result<SocketAddr> {
    let port = datadir::free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .context("cannot find a free TCP port")?;
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// Checks a listen multiaddr typed by the user.
pub fn check_listen(s: &str) -> anyhow::Result<()> {
    let _: Multiaddr = s.parse().map_err(|e| {
        anyhow::anyhow!(
            "--listen {s:?} is not a multiaddr ({e}); expected e.g. /ip4/127.0.0.1/tcp/4001"
        )
    })?;
    Ok(())
}

/// Initialises a quarter node's data directory; returns its config and PeerId.
pub fn init_quarter(data: &DataDir, init: QuarterInit) -> anyhow::Result<(Config, String)> {
    let slug = QuarterSlug::new(&init.slug).map_err(|e| anyhow::anyhow!("--quarter: {e}"))?;
    if init.name.trim().is_empty() {
        bail!("--name is empty: give the quarter's display name, e.g. \"Johannstadt\"");
    }
    daemon::parse_peer_addr(&init.center).map_err(|e| anyhow::anyhow!("--center: {e}"))?;
    let listen = match init.listen {
        Some(l) => {
            check_listen(&l)?;
            l
        }
        None => default_listen()?,
    };
    let api = match init.api {
        Some(a) => a,
        None => default_api()?,
    };
    if let Some(a) = &init.advertise {
        let _: iq_protocol::Multiaddr = a.parse().map_err(|e| {
            anyhow::anyhow!(
                "--advertise {a:?} is not a multiaddr ({e}); expected e.g. /ip4/192.0.2.10/tcp/4001"
            )
        })?;
    }
    let psk = match &init.psk {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--psk {}: {e}", path.display()))?;
            text.parse::<iq_protocol::transport::PreSharedKey>().map_err(|e| {
                anyhow::anyhow!("--psk {}: not a libp2p pre-shared key file ({e}); copy the centre's swarm.key", path.display())
            })?;
            Some(text)
        }
        None => None,
    };
    let config = Config {
        role: Role::Quarter,
        listen,
        api,
        quarter: Some(QuarterConfig {
            slug,
            name: init.name.trim().to_string(),
        }),
        center: Some(init.center),
        private_network: psk.is_some(),
        advertise: init.advertise,
        replicate: init.replicate,
    };
    let identity = data.init(&config, psk.as_deref())?;
    Ok((config, identity.peer_id().to_string()))
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    const ROLE: Role = Role::Quarter;
    let client =
        |d: &DataArg| -> anyhow::Result<Client> { Ok(Client::new(&DataDir::new(&d.data), ROLE)?) };
    match cli.command {
        Command::Init {
            data,
            quarter,
            name,
            center,
            addr: AddrArgs { listen, api },
            psk,
            advertise,
            replicate,
        } => {
            let dir = DataDir::new(&data.data);
            let (config, peer_id) = init_quarter(
                &dir,
                QuarterInit {
                    slug: quarter,
                    name,
                    center,
                    listen,
                    api,
                    psk,
                    advertise,
                    replicate,
                },
            )?;
            println!("initialised quarter node in {}", data.data.display());
            println!("peer id:  {peer_id}");
            println!("listen:   {}/p2p/{peer_id}", config.listen);
            println!("api:      http://{}", config.api);
            println!();
            println!("next: add it to the roster at the centre:");
            if let Some(q) = &config.quarter {
                println!(
                    "  iq-center quarter add {} --name {:?} --peer {peer_id} --data <centre dir>",
                    q.slug, q.name
                );
            }
            println!("then start it: iq-node run --data {}", data.data.display());
        }
        Command::Run { data } => {
            init_tracing(cli.log_format);
            let dir = DataDir::new(&data.data);
            let daemon = Daemon::start(dir, Role::Quarter, api::quarter_router).await?;
            println!("iq-node running");
            println!("peer id:  {}", daemon.peer_id);
            println!("libp2p:   {}", daemon.listen);
            println!("api:      http://{}", daemon.api_addr);
            println!("stop with ctrl-c");
            daemon.run_until_signal().await?;
        }
        Command::Id { data } => {
            let dir = DataDir::new(&data.data);
            println!("{}", dir.identity()?.peer_id());
        }
        Command::Concern(ConcernCommand::Add {
            data,
            category,
            description,
            lat,
            long,
            address,
            media_url,
            agency,
            reporter_name,
            reporter_email,
            reporter_phone,
            json,
        }) => {
            let client = Client::new(&DataDir::new(&data.data), ROLE)?;
            let reporter = crate::api::Reporter {
                name: reporter_name,
                email: reporter_email,
                phone: reporter_phone,
                device_id: None,
                account_id: None,
            };
            let body = NewConcern {
                category,
                description,
                lat,
                long,
                address,
                media_url,
                agency,
                reporter: Some(reporter),
            };
            let created: ConcernView = client.post("/api/v1/concerns", &body).await?;
            if json.json {
                print_json(&created)?;
            } else {
                println!("{}", created.id);
            }
        }
        Command::Concern(ConcernCommand::Status {
            data,
            id,
            status,
            note,
            json,
        }) => {
            let c: ConcernView = client(&data)?
                .post(
                    &format!("/api/v1/concerns/{id}/status"),
                    &crate::api::NewConcernStatus { status, note },
                )
                .await?;
            output::emit(&c, json.json, output::print_concern)?;
        }
        Command::Concern(ConcernCommand::Show { data, id, json }) => {
            let c: ConcernView = client(&data)?
                .get(&format!("/api/v1/concerns/{id}"), &[])
                .await?;
            output::emit(&c, json.json, output::print_concern)?;
        }
        Command::Concern(ConcernCommand::Reporter { data, id, json }) => {
            let r: crate::api::Reporter = client(&data)?
                .get(&format!("/api/v1/concerns/{id}/reporter"), &[])
                .await?;
            output::emit(&r, json.json, |r| {
                println!("name:  {}", r.name.as_deref().unwrap_or("-"));
                println!("email: {}", r.email.as_deref().unwrap_or("-"));
                println!("phone: {}", r.phone.as_deref().unwrap_or("-"));
                if let Some(device) = &r.device_id {
                    println!("device: {device}");
                }
                if let Some(account) = &r.account_id {
                    println!("account: {account}");
                }
            })?;
        }
        Command::Concern(ConcernCommand::List {
            data,
            quarter,
            json,
        }) => {
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
        Command::Proposal(cmd) => workflow_cli::proposal(cmd, client).await?,
        Command::Support {
            data,
            id,
            supporter,
            json,
        } => workflow_cli::support(data, id, supporter, json.json, client).await?,
        Command::Consultation(cmd) => workflow_cli::consultation(cmd, client).await?,
        Command::Budget(cmd) => workflow_cli::budget(cmd, client).await?,
        Command::Directive(cmd) => workflow_cli::directive(cmd, client).await?,
        Command::Escalate {
            data,
            kind,
            id,
            reason,
            json,
        } => workflow_cli::escalate(data, kind, id, reason, json.json, client).await?,
        Command::Escalations {
            data,
            quarter,
            json,
        } => workflow_cli::escalations(data, quarter, json.json, client).await?,
        Command::Hide {
            data,
            kind,
            id,
            reason,
            json,
        } => workflow_cli::hide(data, kind, id, reason, json.json, client).await?,
        Command::Apikey(ApikeyCommand::Create { data, name, json }) => {
            let created: keys::NewKey = client(&data)?
                .post("/api/v1/apikeys", &keys::CreateKey { name })
                .await?;
            output::emit(&created, json.json, |k| println!("{}", k.key))?;
        }
        Command::Apikey(ApikeyCommand::List { data, json }) => {
            let list: Vec<keys::KeyView> = client(&data)?.get("/api/v1/apikeys", &[]).await?;
            output::emit(&list, json.json, |list| {
                if list.is_empty() {
                    println!("no API keys; create one with `iq-node apikey create --name APP`");
                }
                for k in list {
                    let state = match &k.revoked {
                        Some(at) => format!("revoked {at}"),
                        None => "active".into(),
                    };
                    println!("{:<24} created {}  {state}", k.name, k.created);
                }
            })?;
        }
        Command::Apikey(ApikeyCommand::Revoke { data, name, json }) => {
            let revoked: keys::KeyView = client(&data)?
                .post(
                    &format!("/api/v1/apikeys/{name}/revoke"),
                    &serde_json::json!({}),
                )
                .await?;
            output::emit(&revoked, json.json, |k| {
                println!(
                    "revoked {} ({})",
                    k.name,
                    k.revoked.as_deref().unwrap_or("-")
                )
            })?;
        }
        Command::Status { data, json } => {
            let client = Client::new(&DataDir::new(&data.data), ROLE)?;
            let status: Status = client.get("/api/v1/status", &[]).await?;
            if json.json {
                print_json(&status)?;
            } else {
                output::print_status(&status);
            }
        }
        Command::Backup(args) => run_backup(args, ROLE).await?,
        Command::Restore(args) => run_restore(args, ROLE)?,
    }
    Ok(())
}
