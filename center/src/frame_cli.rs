//! `iq-center` commands of the counter-current workflows: directives,
//! consultations, budget frames, the inbox of escalations and responses,
//! and the overview of concerns. Each calls the running centre's HTTP API.

use clap::Subcommand;
use iq_node::cli::{DataArg, JsonArg};
use iq_node::client::Client;
use iq_node::output;
use iq_protocol::workflows::{
    BudgetLine, ConcernOverview, Consultation, ConsultationResults, Directive, DirectiveStatus,
    Frame, InboxEntry, Response,
};

use crate::frame_api::{NewConsultation, NewDirective, NewFrame, NewResponse};

#[derive(Debug, Subcommand)]
pub enum DirectiveCommand {
    /// Issue a directive to all quarters or some; prints its id.
    Issue {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        title: String,
        #[arg(long)]
        text: String,
        /// Date it takes effect.
        #[arg(long, default_value = "")]
        effective: String,
        /// A target quarter (repeat; none means all).
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Acknowledgements due by (2026-12-15 or an RFC 3339 time).
        #[arg(long)]
        ack_due: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Directives with who acknowledged, who is pending and who is overdue.
    List {
        #[command(flatten)]
        data: DataArg,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConsultationCommand {
    /// Open a consultation; prints its id.
    Open {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        question: String,
        /// An option (repeat, at least two).
        #[arg(long = "option", required = true)]
        options: Vec<String>,
        /// Answers are accepted until then (2026-12-15 or an RFC 3339 time).
        #[arg(long)]
        deadline: String,
        /// A target quarter (repeat; none means all).
        #[arg(long = "target")]
        targets: Vec<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Close a consultation: no more answers.
    Close {
        #[command(flatten)]
        data: DataArg,
        id: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Results per option and per quarter, with who has not answered.
    Results {
        #[command(flatten)]
        data: DataArg,
        /// Only this consultation.
        id: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum BudgetCommand {
    /// Set a quarter's frame for a year: an amount, or inhabitants × rate per head.
    Frame {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        year: i64,
        #[arg(long)]
        quarter: String,
        /// Amount in euros.
        #[arg(long, conflicts_with_all = ["inhabitants", "rate"])]
        amount: Option<String>,
        #[arg(long, requires = "rate")]
        inhabitants: Option<i64>,
        /// Euros per inhabitant.
        #[arg(long, requires = "inhabitants")]
        rate: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Frames against allocations per quarter, with over-frame flags.
    Show {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        year: Option<i64>,
        #[command(flatten)]
        json: JsonArg,
    },
}

pub async fn directive(
    cmd: DirectiveCommand,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    match cmd {
        DirectiveCommand::Issue {
            data,
            title,
            text,
            effective,
            targets,
            ack_due,
            json,
        } => {
            let d: Directive = client(&data)?
                .post(
                    "/api/v1/directives",
                    &NewDirective {
                        title,
                        text,
                        effective,
                        targets,
                        ack_due,
                    },
                )
                .await?;
            output::emit(&d, json.json, |d| println!("{}", d.id))
        }
        DirectiveCommand::List { data, json } => {
            let list: Vec<DirectiveStatus> = client(&data)?.get("/api/v1/directives", &[]).await?;
            output::emit(&list, json.json, |list| output::print_directives(list))
        }
    }
}

pub async fn consultation(
    cmd: ConsultationCommand,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    match cmd {
        ConsultationCommand::Open {
            data,
            question,
            options,
            deadline,
            targets,
            json,
        } => {
            let c: Consultation = client(&data)?
                .post(
                    "/api/v1/consultations",
                    &NewConsultation {
                        question,
                        options,
                        deadline,
                        targets,
                    },
                )
                .await?;
            output::emit(&c, json.json, |c| println!("{}", c.id))
        }
        ConsultationCommand::Close { data, id, json } => {
            let c: Consultation = client(&data)?
                .post(&format!("/api/v1/consultations/{id}/close"), &())
                .await?;
            output::emit(&c, json.json, |c| {
                println!("consultation {id} is {}", c.status)
            })
        }
        ConsultationCommand::Results { data, id, json } => {
            let list: Vec<ConsultationResults> = match id {
                Some(id) => vec![
                    client(&data)?
                        .get(&format!("/api/v1/consultations/{id}"), &[])
                        .await?,
                ],
                None => client(&data)?.get("/api/v1/consultations", &[]).await?,
            };
            output::emit(&list, json.json, |list| output::print_consultations(list))
        }
    }
}

pub async fn budget(
    cmd: BudgetCommand,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    match cmd {
        BudgetCommand::Frame {
            data,
            year,
            quarter,
            amount,
            inhabitants,
            rate,
            json,
        } => {
            let amount_cents = amount
                .as_deref()
                .map(output::parse_euros)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--amount: {e}"))?;
            let rate_per_head_cents = rate
                .as_deref()
                .map(output::parse_euros)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--rate: {e}"))?;
            if amount_cents.is_none() && inhabitants.is_none() {
                anyhow::bail!("give --amount, or --inhabitants and --rate");
            }
            let f: Frame = client(&data)?
                .post(
                    "/api/v1/frames",
                    &NewFrame {
                        year,
                        quarter,
                        amount_cents,
                        inhabitants,
                        rate_per_head_cents,
                    },
                )
                .await?;
            output::emit(&f, json.json, |f| {
                println!(
                    "frame {} {}: {}",
                    f.year,
                    f.quarter,
                    output::euros(f.amount_cents)
                )
            })
        }
        BudgetCommand::Show { data, year, json } => {
            let y = year.map(|y| y.to_string());
            let q: Vec<(&str, &str)> = y.as_deref().map(|y| ("year", y)).into_iter().collect();
            let list: Vec<BudgetLine> = client(&data)?.get("/api/v1/budget", &q).await?;
            output::emit(&list, json.json, |list| output::print_budget(list))
        }
    }
}

pub async fn inbox(
    data: DataArg,
    all: bool,
    json: bool,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    let q: &[(&str, &str)] = if all { &[] } else { &[("open", "true")] };
    let list: Vec<InboxEntry> = client(&data)?.get("/api/v1/escalations", q).await?;
    output::emit(&list, json, |list| output::print_escalations(list))
}

#[allow(clippy::too_many_arguments)]
pub async fn respond(
    data: DataArg,
    quarter: String,
    escalation: String,
    decision: String,
    department: Option<String>,
    note: String,
    json: bool,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    let r: Response = client(&data)?
        .post(
            "/api/v1/responses",
            &NewResponse {
                quarter,
                escalation,
                decision,
                department,
                note,
            },
        )
        .await?;
    output::emit(&r, json, |r| {
        println!("responded to {}: {}", r.escalation, r.decision)
    })
}

pub async fn overview(
    data: DataArg,
    json: bool,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    let list: Vec<ConcernOverview> = client(&data)?.get("/api/v1/overview/concerns", &[]).await?;
    output::emit(&list, json, |list| output::print_overview(list))
}
