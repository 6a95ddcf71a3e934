//! `iq-node` commands of the counter-current workflows: proposals and
//! supports, consultation answers, budget allocations, directive
//! acknowledgements, escalations and moderation. Each calls the running
//! node's HTTP API; `--json` prints the API's answer.

use clap::Subcommand;
use iq_protocol::workflows::{
    Ack, Allocation, Answer, BudgetLine, ConsultationResults, DirectiveStatus, Escalation,
    InboxEntry, Proposal,
};

use crate::cli::{DataArg, JsonArg};
use crate::client::Client;
use crate::output;
use crate::workflow_api::{
    Hidden, HideItem, NewAck, NewAllocation, NewAnswer, NewEscalation, NewMilestone, NewProposal,
    NewStatus, NewSupport, ProposalView,
};

#[derive(Debug, Subcommand)]
pub enum ProposalCommand {
    /// Put a proposal up for support; prints its id.
    Add {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        title: String,
        #[arg(long)]
        description: String,
        /// Supports needed to qualify.
        #[arg(long, default_value_t = 10)]
        threshold: u64,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Proposals of this quarter and the replicas it holds.
    List {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        quarter: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Move a proposal on: accepted, rejected, implemented.
    Status {
        #[command(flatten)]
        data: DataArg,
        id: String,
        status: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Record what was done for a proposal.
    Milestone {
        #[command(flatten)]
        data: DataArg,
        id: String,
        #[arg(long)]
        text: String,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConsultationCommand {
    /// Consultations from the centre with their answers so far.
    List {
        #[command(flatten)]
        data: DataArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Answer a consultation (before its deadline).
    Answer {
        #[command(flatten)]
        data: DataArg,
        /// The consultation's id.
        id: String,
        /// A chosen option (repeat for several).
        #[arg(long = "option", required = true)]
        options: Vec<String>,
        /// The quarter's position.
        #[arg(long)]
        position: String,
        #[arg(long, default_value_t = 0)]
        yes: u64,
        #[arg(long, default_value_t = 0)]
        no: u64,
        #[arg(long, default_value_t = 0)]
        abstain: u64,
        /// Which body decided, e.g. "Stadtbezirksbeirat".
        #[arg(long)]
        body: String,
        /// Date of the decision.
        #[arg(long, default_value = "")]
        decided_on: String,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum BudgetCommand {
    /// Spend part of the quarter's frame on a project.
    Allocate {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        title: String,
        /// Amount in euros, e.g. 1500 or 1500.50.
        #[arg(long)]
        amount: String,
        #[arg(long)]
        year: i64,
        /// The proposal it implements.
        #[arg(long)]
        proposal: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Frames against allocations.
    Show {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        year: Option<i64>,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum DirectiveCommand {
    /// Directives from the centre with who acknowledged them.
    List {
        #[command(flatten)]
        data: DataArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Acknowledge a directive: received or implemented.
    Ack {
        #[command(flatten)]
        data: DataArg,
        id: String,
        #[arg(long, default_value = "received")]
        state: String,
        #[arg(long, default_value = "")]
        comment: String,
        #[command(flatten)]
        json: JsonArg,
    },
}

fn show_proposal(p: &Proposal, json: bool) -> anyhow::Result<()> {
    output::emit(p, json, |p| {
        println!(
            "{}  [{}] {} ({} of {} supports)",
            p.id,
            p.status,
            p.title,
            p.supports.len(),
            p.threshold
        );
        for m in &p.milestones {
            println!("    milestone: {}", m.text);
        }
    })
}

pub async fn proposal(
    cmd: ProposalCommand,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    match cmd {
        ProposalCommand::Add {
            data,
            title,
            description,
            threshold,
            json,
        } => {
            let p: Proposal = client(&data)?
                .post(
                    "/api/v1/proposals",
                    &NewProposal {
                        title,
                        description,
                        threshold: Some(threshold),
                    },
                )
                .await?;
            output::emit(&p, json.json, |p| println!("{}", p.id))
        }
        ProposalCommand::List {
            data,
            quarter,
            json,
        } => {
            let q: Vec<(&str, &str)> = quarter
                .as_deref()
                .map(|q| ("quarter", q))
                .into_iter()
                .collect();
            let list: Vec<ProposalView> = client(&data)?.get("/api/v1/proposals", &q).await?;
            output::emit(&list, json.json, |list| output::print_proposals(list))
        }
        ProposalCommand::Status {
            data,
            id,
            status,
            json,
        } => {
            let p: Proposal = client(&data)?
                .post(
                    &format!("/api/v1/proposals/{id}/status"),
                    &NewStatus { status },
                )
                .await?;
            show_proposal(&p, json.json)
        }
        ProposalCommand::Milestone {
            data,
            id,
            text,
            json,
        } => {
            let p: Proposal = client(&data)?
                .post(
                    &format!("/api/v1/proposals/{id}/milestones"),
                    &NewMilestone { text },
                )
                .await?;
            show_proposal(&p, json.json)
        }
    }
}

pub async fn support(
    data: DataArg,
    id: String,
    supporter: String,
    json: bool,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    let p: Proposal = client(&data)?
        .post(
            &format!("/api/v1/proposals/{id}/supports"),
            &NewSupport { supporter },
        )
        .await?;
    show_proposal(&p, json)
}

pub async fn consultation(
    cmd: ConsultationCommand,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    match cmd {
        ConsultationCommand::List { data, json } => {
            let list: Vec<ConsultationResults> =
                client(&data)?.get("/api/v1/consultations", &[]).await?;
            output::emit(&list, json.json, |list| output::print_consultations(list))
        }
        ConsultationCommand::Answer {
            data,
            id,
            options,
            position,
            yes,
            no,
            abstain,
            body,
            decided_on,
            json,
        } => {
            let a: Answer = client(&data)?
                .post(
                    &format!("/api/v1/consultations/{id}/answer"),
                    &NewAnswer {
                        options,
                        position,
                        yes,
                        no,
                        abstain,
                        body,
                        decided_on,
                    },
                )
                .await?;
            output::emit(&a, json.json, |a| {
                println!("answered {id}: {}", a.options.join(", "))
            })
        }
    }
}

pub async fn budget(
    cmd: BudgetCommand,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    match cmd {
        BudgetCommand::Allocate {
            data,
            title,
            amount,
            year,
            proposal,
            json,
        } => {
            let amount_cents =
                output::parse_euros(&amount).map_err(|e| anyhow::anyhow!("--amount: {e}"))?;
            let a: Allocation = client(&data)?
                .post(
                    "/api/v1/allocations",
                    &NewAllocation {
                        title,
                        amount_cents,
                        year,
                        proposal_id: proposal,
                    },
                )
                .await?;
            output::emit(&a, json.json, |a| {
                println!(
                    "{}  {} for {}",
                    a.id,
                    output::euros(a.amount_cents),
                    a.title
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

pub async fn directive(
    cmd: DirectiveCommand,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    match cmd {
        DirectiveCommand::List { data, json } => {
            let list: Vec<DirectiveStatus> = client(&data)?.get("/api/v1/directives", &[]).await?;
            output::emit(&list, json.json, |list| output::print_directives(list))
        }
        DirectiveCommand::Ack {
            data,
            id,
            state,
            comment,
            json,
        } => {
            let a: Ack = client(&data)?
                .post(
                    &format!("/api/v1/directives/{id}/ack"),
                    &NewAck { state, comment },
                )
                .await?;
            output::emit(&a, json.json, |a| {
                println!("acknowledged {id}: {}", a.state)
            })
        }
    }
}

pub async fn escalate(
    data: DataArg,
    kind: String,
    id: String,
    reason: String,
    json: bool,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    let e: Escalation = client(&data)?
        .post(
            "/api/v1/escalations",
            &NewEscalation {
                kind,
                item_id: id,
                reason,
            },
        )
        .await?;
    output::emit(&e, json, |e| println!("{}", e.id))
}

pub async fn escalations(
    data: DataArg,
    quarter: Option<String>,
    json: bool,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    let q: Vec<(&str, &str)> = quarter
        .as_deref()
        .map(|q| ("quarter", q))
        .into_iter()
        .collect();
    let list: Vec<InboxEntry> = client(&data)?.get("/api/v1/escalations", &q).await?;
    output::emit(&list, json, |list| output::print_escalations(list))
}

pub async fn hide(
    data: DataArg,
    kind: String,
    id: String,
    reason: String,
    json: bool,
    client: impl Fn(&DataArg) -> anyhow::Result<Client>,
) -> anyhow::Result<()> {
    let h: Hidden = client(&data)?
        .post("/api/v1/hide", &HideItem { kind, id, reason })
        .await?;
    output::emit(&h, json, |h| {
        println!("{} {} is hidden from public views", h.kind, h.id)
    })
}
