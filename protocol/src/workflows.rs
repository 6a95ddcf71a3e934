//! The counter-current workflows (Gegenstromprinzip): the frame the centre
//! sets in the city document (directives, consultations, budget frames,
//! responses) and the quarters' input in their own documents (proposals
//! with supports, consultation answers, budget allocations, acknowledgements,
//! escalations, moderation), the rules that connect the two, and the views
//! both sides read. Items refer to each other by id; every item lives in the
//! document of the side that owns it.
//!
//! The rules are plain functions over documents, so the daemons, the tests
//! and any other tool apply the same ones.

use std::collections::BTreeMap;

use automerge::Automerge;
use autosurgeon::{Hydrate, Reconcile};
use serde::{Deserialize, Serialize};

use crate::ids::QuarterSlug;
use crate::schema::{self, Concern, Hidden, Item, SchemaError};

/// Longest title accepted.
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest free text accepted (descriptions, positions, notes).
pub const MAX_TEXT_CHARS: usize = 4_000;

/// Largest amount accepted anywhere, in cents (100 billion euros).
pub const MAX_AMOUNT_CENTS: i64 = 10_000_000_000_000;

/// Largest vote count accepted in an answer.
pub const MAX_VOTES: u64 = 10_000_000;

fn invalid<T>(msg: impl Into<String>) -> Result<T, SchemaError> {
    Err(SchemaError::Invalid(msg.into()))
}

fn not_found<T>(msg: impl Into<String>) -> Result<T, SchemaError> {
    Err(SchemaError::NotFound(msg.into()))
}

fn refused<T>(msg: impl Into<String>) -> Result<T, SchemaError> {
    Err(SchemaError::Refused(msg.into()))
}

/// Checks a required text field.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), SchemaError> {
    if value.trim().is_empty() {
        return invalid(format!("{field} is empty"));
    }
    if value.chars().count() > max {
        return invalid(format!("{field} is longer than {max} characters"));
    }
    Ok(())
}

fn targets_include(targets: &[String], quarter: &QuarterSlug) -> bool {
    targets.is_empty() || targets.iter().any(|t| t == quarter.as_str())
}

fn fmt_ms(ms: i64) -> String {
    schema::format_time(ms, false)
}

fn fmt_cents(c: i64) -> String {
    schema::format_cents(c)
}

// ---------------------------------------------------------------- top-down

/// A directive (Weisung) from the centre.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Directive {
    pub id: String,
    pub title: String,
    pub text: String,
    pub issued_ms: i64,
    /// Date it takes effect, as given (e.g. 2026-12-01).
    pub effective: String,
    /// Target quarters; empty means all.
    pub targets: Vec<String>,
    /// Acknowledgements are due by then (unix ms).
    pub ack_due_ms: Option<i64>,
}

impl Item for Directive {
    const CONTAINER: &'static str = "directives";
    fn item_key(&self) -> String {
        self.id.clone()
    }
}

/// A consultation (Anhörung) the centre puts to quarters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Consultation {
    pub id: String,
    pub question: String,
    pub options: Vec<String>,
    pub deadline_ms: i64,
    /// Target quarters; empty means all.
    pub targets: Vec<String>,
    /// `open` or `closed`.
    pub status: String,
    pub created_ms: i64,
}

impl Item for Consultation {
    const CONTAINER: &'static str = "consultations";
    fn item_key(&self) -> String {
        self.id.clone()
    }
}

/// A quarter's budget frame for a year, in cents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Frame {
    pub year: i64,
    pub quarter: String,
    pub amount_cents: i64,
    /// When the frame was computed as inhabitants × rate per head.
    pub inhabitants: Option<i64>,
    pub rate_per_head_cents: Option<i64>,
}

impl Item for Frame {
    const CONTAINER: &'static str = "frames";
    fn item_key(&self) -> String {
        format!("{}/{}", self.year, self.quarter)
    }
}

/// The centre's answer to an escalation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Response {
    /// `<quarter>/<escalation id>`.
    pub escalation: String,
    /// `accepted`, `declined` or `forwarded`.
    pub decision: String,
    /// The department it was forwarded to.
    pub department: Option<String>,
    pub note: String,
    pub at_ms: i64,
}

impl Item for Response {
    const CONTAINER: &'static str = "responses";
    fn item_key(&self) -> String {
        self.escalation.clone()
    }
}

// --------------------------------------------------------------- bottom-up

/// What was done for a proposal, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Milestone {
    pub text: String,
    pub at_ms: i64,
}

/// A proposal (Vorschlag) in a quarter, with its supports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Proposal {
    pub id: String,
    pub title: String,
    pub description: String,
    /// `open` → `qualified` → `accepted` | `rejected` → `implemented`.
    pub status: String,
    /// Supports needed to qualify.
    pub threshold: u64,
    /// Supporter reference → when they supported (one support each).
    pub supports: BTreeMap<String, i64>,
    pub milestones: Vec<Milestone>,
    pub created_ms: i64,
    pub hidden: Option<Hidden>,
}

impl Item for Proposal {
    const CONTAINER: &'static str = "proposals";
    fn item_key(&self) -> String {
        self.id.clone()
    }
}

/// A quarter's answer to a consultation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Answer {
    pub consultation_id: String,
    /// Chosen option(s).
    pub options: Vec<String>,
    pub position: String,
    pub yes: u64,
    pub no: u64,
    pub abstain: u64,
    /// Which body decided (e.g. Stadtbezirksbeirat).
    pub body: String,
    /// Date of the decision, as given.
    pub decided_on: String,
    pub answered_ms: i64,
}

impl Item for Answer {
    const CONTAINER: &'static str = "answers";
    fn item_key(&self) -> String {
        self.consultation_id.clone()
    }
}

/// Part of a quarter's frame spent on a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Allocation {
    pub id: String,
    pub title: String,
    pub amount_cents: i64,
    pub proposal_id: Option<String>,
    pub year: i64,
    pub created_ms: i64,
}

impl Item for Allocation {
    const CONTAINER: &'static str = "allocations";
    fn item_key(&self) -> String {
        self.id.clone()
    }
}

/// A quarter's acknowledgement of a directive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Ack {
    pub directive_id: String,
    /// `received` or `implemented`.
    pub state: String,
    pub comment: String,
    pub at_ms: i64,
}

impl Item for Ack {
    const CONTAINER: &'static str = "acks";
    fn item_key(&self) -> String {
        self.directive_id.clone()
    }
}

/// A concern or proposal handed up to the city.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reconcile, Hydrate)]
pub struct Escalation {
    pub id: String,
    /// `concern` or `proposal`.
    pub kind: String,
    pub item_id: String,
    pub reason: String,
    pub at_ms: i64,
}

impl Item for Escalation {
    const CONTAINER: &'static str = "escalations";
    fn item_key(&self) -> String {
        self.id.clone()
    }
}

/// A fresh random id for a new item.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

// ------------------------------------------------------------------- rules

/// Checks target slugs against the roster; empty means all quarters.
pub fn check_targets(targets: &[String], roster: &[QuarterSlug]) -> Result<(), SchemaError> {
    for t in targets {
        if !roster.iter().any(|q| q.as_str() == t) {
            return not_found(format!(
                "unknown quarter '{t}' in targets: see `iq-center quarters`"
            ));
        }
    }
    Ok(())
}

/// A new directive, checked.
pub fn directive(
    title: &str,
    text: &str,
    effective: &str,
    targets: Vec<String>,
    ack_due_ms: Option<i64>,
    roster: &[QuarterSlug],
    now_ms: i64,
) -> Result<Directive, SchemaError> {
    check_text("title", title, MAX_TITLE_CHARS)?;
    check_text("text", text, MAX_TEXT_CHARS)?;
    check_targets(&targets, roster)?;
    Ok(Directive {
        id: new_id(),
        title: title.trim().into(),
        text: text.into(),
        issued_ms: now_ms,
        effective: effective.trim().into(),
        targets,
        ack_due_ms,
    })
}

/// A new open consultation, checked.
pub fn consultation(
    question: &str,
    options: Vec<String>,
    deadline_ms: i64,
    targets: Vec<String>,
    roster: &[QuarterSlug],
    now_ms: i64,
) -> Result<Consultation, SchemaError> {
    check_text("question", question, MAX_TEXT_CHARS)?;
    let options: Vec<String> = options.into_iter().map(|o| o.trim().to_string()).collect();
    if options.len() < 2 {
        return invalid("a consultation needs at least two options");
    }
    for (i, o) in options.iter().enumerate() {
        check_text("option", o, MAX_TITLE_CHARS)?;
        if options[..i].contains(o) {
            return invalid(format!("option '{o}' is given twice"));
        }
    }
    if deadline_ms <= now_ms {
        return invalid("the deadline is in the past");
    }
    check_targets(&targets, roster)?;
    Ok(Consultation {
        id: new_id(),
        question: question.into(),
        options,
        deadline_ms,
        targets,
        status: "open".into(),
        created_ms: now_ms,
    })
}

/// A budget frame, checked: either an amount, or inhabitants × rate per head.
pub fn frame(
    year: i64,
    quarter: &QuarterSlug,
    amount_cents: Option<i64>,
    per_head: Option<(i64, i64)>,
    roster: &[QuarterSlug],
) -> Result<Frame, SchemaError> {
    if !roster.contains(quarter) {
        return not_found(format!(
            "unknown quarter '{quarter}': see `iq-center quarters`"
        ));
    }
    if !(2000..=2200).contains(&year) {
        return invalid("year must be between 2000 and 2200");
    }
    let (amount, inhabitants, rate) = match (amount_cents, per_head) {
        (Some(a), None) => (a, None, None),
        (None, Some((inh, rate))) => {
            if inh <= 0 || rate <= 0 {
                return invalid("inhabitants and rate per head must be positive");
            }
            let amount = inh.checked_mul(rate).ok_or(SchemaError::Invalid(
                "inhabitants × rate is too large".into(),
            ))?;
            (amount, Some(inh), Some(rate))
        }
        _ => return invalid("give either an amount or inhabitants and a rate per head"),
    };
    if !(0..=MAX_AMOUNT_CENTS).contains(&amount) {
        return invalid("the frame must be between 0 and 100,000,000,000.00");
    }
    Ok(Frame {
        year,
        quarter: quarter.to_string(),
        amount_cents: amount,
        inhabitants,
        rate_per_head_cents: rate,
    })
}

/// The centre's response to an escalation, checked against the quarter's document.
pub fn response(
    quarter_doc: &Automerge,
    quarter: &QuarterSlug,
    escalation_id: &str,
    decision: &str,
    department: Option<String>,
    note: &str,
    now_ms: i64,
) -> Result<Response, SchemaError> {
    if schema::item::<Escalation>(quarter_doc, escalation_id)?.is_none() {
        return not_found(format!(
            "quarter '{quarter}' has no escalation '{escalation_id}': see `iq-center inbox`"
        ));
    }
    match decision {
        "accepted" | "declined" => {}
        "forwarded" if department.as_deref().is_some_and(|d| !d.trim().is_empty()) => {}
        "forwarded" => return invalid("a forwarded escalation needs --department"),
        other => {
            return invalid(format!(
                "decision '{other}' is not one of accepted, declined, forwarded"
            ));
        }
    }
    check_text("note", note, MAX_TEXT_CHARS)?;
    Ok(Response {
        escalation: format!("{quarter}/{escalation_id}"),
        decision: decision.into(),
        department,
        note: note.into(),
        at_ms: now_ms,
    })
}

/// A new proposal, checked.
pub fn proposal(
    title: &str,
    description: &str,
    threshold: u64,
    now_ms: i64,
) -> Result<Proposal, SchemaError> {
    check_text("title", title, MAX_TITLE_CHARS)?;
    check_text("description", description, MAX_TEXT_CHARS)?;
    if threshold == 0 || threshold > 1_000_000 {
        return invalid("threshold must be between 1 and 1000000 supports");
    }
    Ok(Proposal {
        id: new_id(),
        title: title.trim().into(),
        description: description.into(),
        status: "open".into(),
        threshold,
        supports: BTreeMap::new(),
        milestones: Vec::new(),
        created_ms: now_ms,
        hidden: None,
    })
}

/// Adds one support (idempotent per supporter); qualifies at the threshold.
pub fn support(proposal: &mut Proposal, supporter: &str, now_ms: i64) -> Result<bool, SchemaError> {
    check_text("supporter", supporter, MAX_TITLE_CHARS)?;
    if proposal.status != "open" && proposal.status != "qualified" {
        return refused(format!(
            "proposal is {}; supports are closed",
            proposal.status
        ));
    }
    let new = !proposal.supports.contains_key(supporter);
    if new {
        proposal.supports.insert(supporter.to_string(), now_ms);
    }
    if proposal.status == "open" && proposal.supports.len() as u64 >= proposal.threshold {
        proposal.status = "qualified".into();
    }
    Ok(new)
}

/// Moves a proposal along its lifecycle.
pub fn set_proposal_status(proposal: &mut Proposal, to: &str) -> Result<(), SchemaError> {
    let ok = matches!(
        (proposal.status.as_str(), to),
        ("qualified", "accepted")
            | ("open" | "qualified", "rejected")
            | ("accepted", "implemented")
    );
    if !ok {
        return refused(format!(
            "a proposal cannot go from {} to {to} (open → qualified by supports → accepted | rejected; accepted → implemented)",
            proposal.status
        ));
    }
    proposal.status = to.into();
    Ok(())
}

/// The consultations in `city` that target `quarter`.
pub fn consultation_for(
    city: &Automerge,
    quarter: &QuarterSlug,
    id: &str,
) -> Result<Consultation, SchemaError> {
    let Some(c) = schema::item::<Consultation>(city, id)? else {
        return not_found(format!(
            "no consultation '{id}': see `iq-node consultation list`"
        ));
    };
    if !targets_include(&c.targets, quarter) {
        return refused(format!("consultation '{id}' is not addressed to {quarter}"));
    }
    Ok(c)
}

/// A quarter's answer, checked against the consultation in its city replica.
#[allow(clippy::too_many_arguments)]
pub fn answer(
    city: &Automerge,
    quarter: &QuarterSlug,
    consultation_id: &str,
    options: Vec<String>,
    position: &str,
    votes: (u64, u64, u64),
    body: &str,
    decided_on: &str,
    now_ms: i64,
) -> Result<Answer, SchemaError> {
    let c = consultation_for(city, quarter, consultation_id)?;
    if c.status != "open" {
        return refused(format!("consultation '{consultation_id}' is closed"));
    }
    if now_ms > c.deadline_ms {
        return refused(format!(
            "the deadline of consultation '{consultation_id}' passed at {}",
            fmt_ms(c.deadline_ms)
        ));
    }
    if options.is_empty() {
        return invalid(format!(
            "choose at least one option: {}",
            c.options.join(", ")
        ));
    }
    for o in &options {
        if !c.options.contains(o) {
            return invalid(format!(
                "'{o}' is not an option; the options are: {}",
                c.options.join(", ")
            ));
        }
    }
    check_text("position", position, MAX_TEXT_CHARS)?;
    check_text("body", body, MAX_TITLE_CHARS)?;
    if votes.0.max(votes.1).max(votes.2) > MAX_VOTES {
        return invalid(format!("vote counts above {MAX_VOTES} are not accepted"));
    }
    Ok(Answer {
        consultation_id: consultation_id.into(),
        options,
        position: position.into(),
        yes: votes.0,
        no: votes.1,
        abstain: votes.2,
        body: body.trim().into(),
        decided_on: decided_on.trim().into(),
        answered_ms: now_ms,
    })
}

/// Sum of a quarter's allocations for `year`.
pub fn allocated(allocations: &[Allocation], year: i64) -> i64 {
    allocations
        .iter()
        .filter(|a| a.year == year)
        .fold(0i64, |sum, a| sum.saturating_add(a.amount_cents))
}

/// A new allocation, checked against the frame in the city replica and what
/// the quarter has already allocated that year.
#[allow(clippy::too_many_arguments)]
pub fn allocation(
    city: &Automerge,
    quarter: &QuarterSlug,
    existing: &[Allocation],
    title: &str,
    amount_cents: i64,
    proposal_id: Option<String>,
    year: i64,
    now_ms: i64,
) -> Result<Allocation, SchemaError> {
    check_text("title", title, MAX_TITLE_CHARS)?;
    if amount_cents <= 0 {
        return invalid("the amount must be positive");
    }
    let key = format!("{year}/{quarter}");
    let Some(frame) = schema::item::<Frame>(city, &key)? else {
        return refused(format!(
            "the centre has set no budget frame for {quarter} in {year}"
        ));
    };
    let already = allocated(existing, year);
    if amount_cents > MAX_AMOUNT_CENTS {
        return invalid("the amount is larger than any budget iq accepts");
    }
    if already
        .checked_add(amount_cents)
        .is_none_or(|total| total > frame.amount_cents)
    {
        return refused(format!(
            "over the frame: {} already allocated + {} requested > frame {} for {year}",
            fmt_cents(already),
            fmt_cents(amount_cents),
            fmt_cents(frame.amount_cents)
        ));
    }
    Ok(Allocation {
        id: new_id(),
        title: title.trim().into(),
        amount_cents,
        proposal_id,
        year,
        created_ms: now_ms,
    })
}

/// An acknowledgement, checked against the directive in the city replica.
pub fn ack(
    city: &Automerge,
    quarter: &QuarterSlug,
    directive_id: &str,
    state: &str,
    comment: &str,
    now_ms: i64,
) -> Result<Ack, SchemaError> {
    let Some(d) = schema::item::<Directive>(city, directive_id)? else {
        return not_found(format!(
            "no directive '{directive_id}': see `iq-node directive list`"
        ));
    };
    if !targets_include(&d.targets, quarter) {
        return refused(format!(
            "directive '{directive_id}' is not addressed to {quarter}"
        ));
    }
    if state != "received" && state != "implemented" {
        return invalid(format!(
            "state '{state}' is not one of received, implemented"
        ));
    }
    if comment.chars().count() > MAX_TEXT_CHARS {
        return invalid(format!(
            "comment is longer than {MAX_TEXT_CHARS} characters"
        ));
    }
    Ok(Ack {
        directive_id: directive_id.into(),
        state: state.into(),
        comment: comment.into(),
        at_ms: now_ms,
    })
}

/// An escalation of one of the quarter's own concerns or proposals.
pub fn escalation(
    kind: &str,
    item_id: &str,
    exists: bool,
    reason: &str,
    now_ms: i64,
) -> Result<Escalation, SchemaError> {
    if kind != "concern" && kind != "proposal" {
        return invalid(format!("kind '{kind}' is not one of concern, proposal"));
    }
    if !exists {
        return not_found(format!("this quarter has no {kind} '{item_id}'"));
    }
    check_text("reason", reason, MAX_TEXT_CHARS)?;
    Ok(Escalation {
        id: new_id(),
        kind: kind.into(),
        item_id: item_id.into(),
        reason: reason.into(),
        at_ms: now_ms,
    })
}

/// Marks a concern or proposal hidden (it stays in the document).
pub fn hide(
    tx: &mut automerge::transaction::Transaction<'_>,
    kind: &str,
    id: &str,
    reason: &str,
    now_ms: i64,
) -> Result<(), SchemaError> {
    check_text("reason", reason, MAX_TEXT_CHARS)?;
    let mark = Some(Hidden {
        reason: reason.into(),
        at_ms: now_ms,
    });
    match kind {
        "concern" => {
            let Some(mut c) = schema::item_in::<Concern>(tx, id)? else {
                return not_found(format!("this quarter has no concern '{id}'"));
            };
            c.hidden = mark;
            schema::put_item(tx, &c)
        }
        "proposal" => {
            let Some(mut p) = schema::item_in::<Proposal>(tx, id)? else {
                return not_found(format!("this quarter has no proposal '{id}'"));
            };
            p.hidden = mark;
            schema::put_item(tx, &p)
        }
        other => invalid(format!("kind '{other}' is not one of concern, proposal")),
    }
}

// ------------------------------------------------------------------- views

/// A quarter document with its slug, as the views read them.
pub type QuarterDocs<'a> = Vec<(QuarterSlug, &'a Automerge)>;

/// Budget frame against allocations for one quarter and year.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetLine {
    pub year: i64,
    pub quarter: String,
    pub frame_cents: i64,
    pub allocated_cents: i64,
    pub remaining_cents: i64,
    /// Allocated more than the frame (the centre lowered it after allocations).
    pub over_frame: bool,
    pub allocations: Vec<Allocation>,
}

pub fn budget(city: &Automerge, quarters: &QuarterDocs<'_>, year: Option<i64>) -> Vec<BudgetLine> {
    let frames = schema::items::<Frame>(city).unwrap_or_default();
    let mut out = Vec::new();
    for f in frames
        .into_iter()
        .filter(|f| year.is_none_or(|y| y == f.year))
    {
        let allocations: Vec<Allocation> = quarters
            .iter()
            .find(|(q, _)| q.as_str() == f.quarter)
            .map(|(_, doc)| schema::items::<Allocation>(doc).unwrap_or_default())
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.year == f.year)
            .collect();
        let allocated = allocated(&allocations, f.year);
        out.push(BudgetLine {
            year: f.year,
            quarter: f.quarter.clone(),
            frame_cents: f.amount_cents,
            allocated_cents: allocated,
            remaining_cents: f.amount_cents.saturating_sub(allocated),
            over_frame: allocated > f.amount_cents,
            allocations,
        });
    }
    out.sort_by(|a, b| (a.year, &a.quarter).cmp(&(b.year, &b.quarter)));
    out
}

/// A directive with who acknowledged it and who is overdue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectiveStatus {
    pub directive: Directive,
    /// Quarter → its acknowledgement.
    pub acks: BTreeMap<String, Ack>,
    /// Targeted quarters that have not acknowledged yet.
    pub pending: Vec<String>,
    /// Pending quarters whose acknowledgement is past due.
    pub overdue: Vec<String>,
}

pub fn directives(
    city: &Automerge,
    quarters: &QuarterDocs<'_>,
    now_ms: i64,
) -> Vec<DirectiveStatus> {
    let mut out: Vec<DirectiveStatus> = schema::items::<Directive>(city)
        .unwrap_or_default()
        .into_iter()
        .map(|d| {
            let mut acks = BTreeMap::new();
            let mut pending = Vec::new();
            for (q, doc) in quarters
                .iter()
                .filter(|(q, _)| targets_include(&d.targets, q))
            {
                match schema::item::<Ack>(doc, &d.id).ok().flatten() {
                    Some(a) => {
                        acks.insert(q.to_string(), a);
                    }
                    None => pending.push(q.to_string()),
                }
            }
            let overdue = if d.ack_due_ms.is_some_and(|due| now_ms > due) {
                pending.clone()
            } else {
                Vec::new()
            };
            DirectiveStatus {
                directive: d,
                acks,
                pending,
                overdue,
            }
        })
        .collect();
    out.sort_by_key(|d| std::cmp::Reverse(d.directive.issued_ms));
    out
}

/// Totals for one option of a consultation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptionTotal {
    pub option: String,
    /// Quarters that chose it.
    pub quarters: Vec<String>,
    pub yes: u64,
    pub no: u64,
    pub abstain: u64,
}

/// A consultation's results per option and per quarter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsultationResults {
    pub consultation: Consultation,
    pub options: Vec<OptionTotal>,
    pub answers: BTreeMap<String, Answer>,
    /// Targeted quarters that have not answered.
    pub missing: Vec<String>,
}

pub fn consultation_results(
    city: &Automerge,
    quarters: &QuarterDocs<'_>,
) -> Vec<ConsultationResults> {
    let mut out: Vec<ConsultationResults> = schema::items::<Consultation>(city)
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            let mut options: Vec<OptionTotal> = c
                .options
                .iter()
                .map(|o| OptionTotal {
                    option: o.clone(),
                    quarters: vec![],
                    yes: 0,
                    no: 0,
                    abstain: 0,
                })
                .collect();
            let mut answers = BTreeMap::new();
            let mut missing = Vec::new();
            for (q, doc) in quarters
                .iter()
                .filter(|(q, _)| targets_include(&c.targets, q))
            {
                match schema::item::<Answer>(doc, &c.id).ok().flatten() {
                    Some(a) => {
                        for t in options.iter_mut().filter(|t| a.options.contains(&t.option)) {
                            t.quarters.push(q.to_string());
                            t.yes = t.yes.saturating_add(a.yes);
                            t.no = t.no.saturating_add(a.no);
                            t.abstain = t.abstain.saturating_add(a.abstain);
                        }
                        answers.insert(q.to_string(), a);
                    }
                    None => missing.push(q.to_string()),
                }
            }
            ConsultationResults {
                consultation: c,
                options,
                answers,
                missing,
            }
        })
        .collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.consultation.created_ms));
    out
}

/// An escalation with the item it concerns and the centre's response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    pub quarter: String,
    pub escalation: Escalation,
    /// Title or description of the escalated item.
    pub item: String,
    pub response: Option<Response>,
}

/// Escalations across quarters, oldest first; `open_only` leaves out answered ones.
pub fn escalations(
    city: &Automerge,
    quarters: &QuarterDocs<'_>,
    open_only: bool,
) -> Vec<InboxEntry> {
    let mut out = Vec::new();
    for (q, doc) in quarters {
        for e in schema::items::<Escalation>(doc).unwrap_or_default() {
            let response = schema::item::<Response>(city, &format!("{q}/{}", e.id))
                .ok()
                .flatten();
            if open_only && response.is_some() {
                continue;
            }
            let item = match e.kind.as_str() {
                "concern" => schema::item::<Concern>(doc, &e.item_id)
                    .ok()
                    .flatten()
                    .map(|c| c.description),
                _ => schema::item::<Proposal>(doc, &e.item_id)
                    .ok()
                    .flatten()
                    .map(|p| p.title),
            }
            .unwrap_or_default();
            out.push(InboxEntry {
                quarter: q.to_string(),
                escalation: e,
                item,
                response,
            });
        }
    }
    out.sort_by_key(|e| e.escalation.at_ms);
    out
}

/// Concern counts of one quarter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcernOverview {
    pub quarter: String,
    pub total: u64,
    pub by_status: BTreeMap<String, u64>,
    pub by_category: BTreeMap<String, u64>,
    /// Hidden concerns are counted here, not above.
    pub hidden: u64,
}

pub fn concern_overview(quarters: &QuarterDocs<'_>) -> Vec<ConcernOverview> {
    quarters
        .iter()
        .map(|(q, doc)| {
            let mut o = ConcernOverview {
                quarter: q.to_string(),
                total: 0,
                by_status: BTreeMap::new(),
                by_category: BTreeMap::new(),
                hidden: 0,
            };
            for c in schema::concerns(doc).unwrap_or_default() {
                if c.hidden.is_some() {
                    o.hidden += 1;
                    continue;
                }
                o.total += 1;
                *o.by_status.entry(c.status).or_default() += 1;
                *o.by_category.entry(c.category).or_default() += 1;
            }
            o
        })
        .collect()
}

/// Reads a point in time: RFC 3339 (`2026-12-15T12:00:00Z`) or a date
/// (`2026-12-15`, meaning the end of that day, UTC). Returns unix ms.
pub fn parse_when(s: &str) -> Result<i64, SchemaError> {
    let s = s.trim();
    let full = if s.len() == 10 {
        format!("{s}T23:59:59Z")
    } else {
        s.to_string()
    };
    let t = humantime::parse_rfc3339_weak(full.trim_end_matches('Z')).map_err(|_| {
        SchemaError::Invalid(format!(
            "{s:?} is not a date (2026-12-15) or time (2026-12-15T12:00:00Z)"
        ))
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| SchemaError::Invalid(format!("{s:?} is before 1970")))?
        .as_millis();
    i64::try_from(ms).map_err(|_| SchemaError::Invalid(format!("{s:?} is too far in the future")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::DocId;
    use automerge::ActorId;

    fn q(s: &str) -> QuarterSlug {
        QuarterSlug::new(s).expect("slug")
    }

    fn city_with(
        f: impl FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), SchemaError>,
    ) -> Automerge {
        let mut city = schema::genesis(&DocId::City).with_actor(ActorId::random());
        city.transact::<_, _, SchemaError>(f).expect("write");
        city
    }

    #[test]
    fn answers_respect_targets_options_and_the_deadline() {
        let roster = [q("prohlis"), q("johannstadt")];
        let c = consultation(
            "Tempo 30?",
            vec!["yes".into(), "no".into()],
            2_000,
            vec!["prohlis".into()],
            &roster,
            1_000,
        )
        .expect("consultation");
        let id = c.id.clone();
        let city = city_with(|tx| schema::put_item(tx, &c));
        let ok = answer(
            &city,
            &q("prohlis"),
            &id,
            vec!["yes".into()],
            "for it",
            (5, 1, 0),
            "Beirat",
            "2026-12-01",
            1_500,
        );
        assert!(ok.is_ok());
        let late = answer(
            &city,
            &q("prohlis"),
            &id,
            vec!["yes".into()],
            "for it",
            (5, 1, 0),
            "Beirat",
            "",
            2_001,
        );
        assert!(matches!(late, Err(SchemaError::Refused(m)) if m.contains("deadline")));
        let other = answer(
            &city,
            &q("johannstadt"),
            &id,
            vec!["yes".into()],
            "x",
            (0, 0, 0),
            "B",
            "",
            1_500,
        );
        assert!(matches!(other, Err(SchemaError::Refused(_))));
        let bad = answer(
            &city,
            &q("prohlis"),
            &id,
            vec!["maybe".into()],
            "x",
            (0, 0, 0),
            "B",
            "",
            1_500,
        );
        assert!(matches!(bad, Err(SchemaError::Invalid(m)) if m.contains("not an option")));
        let missing = answer(
            &city,
            &q("prohlis"),
            "nope",
            vec![],
            "x",
            (0, 0, 0),
            "B",
            "",
            1_500,
        );
        assert!(matches!(missing, Err(SchemaError::NotFound(_))));
    }

    #[test]
    fn allocations_stay_within_the_frame_and_a_lowered_frame_is_flagged() {
        let roster = [q("prohlis")];
        let f = frame(2027, &q("prohlis"), Some(10_000), None, &roster).expect("frame");
        let city = city_with(|tx| schema::put_item(tx, &f));
        let a =
            allocation(&city, &q("prohlis"), &[], "benches", 6_000, None, 2027, 0).expect("first");
        let huge = allocation(
            &city,
            &q("prohlis"),
            std::slice::from_ref(&a),
            "x",
            i64::MAX,
            None,
            2027,
            0,
        );
        assert!(
            huge.is_err(),
            "an overflowing amount slipped past the frame"
        );
        let over = allocation(
            &city,
            &q("prohlis"),
            std::slice::from_ref(&a),
            "more",
            5_000,
            None,
            2027,
            0,
        );
        assert!(matches!(over, Err(SchemaError::Refused(m)) if m.contains("over the frame")));
        let no_frame = allocation(&city, &q("prohlis"), &[], "x", 1, None, 2028, 0);
        assert!(matches!(no_frame, Err(SchemaError::Refused(_))));
        // The centre lowers the frame below what is allocated.
        let lower = frame(2027, &q("prohlis"), Some(5_000), None, &roster).expect("frame");
        let mut city = city;
        city.transact::<_, _, SchemaError>(|tx| schema::put_item(tx, &lower))
            .expect("lower");
        let mut quarter =
            schema::genesis(&DocId::quarter(&q("prohlis"))).with_actor(ActorId::random());
        quarter
            .transact::<_, _, SchemaError>(|tx| schema::put_item(tx, &a))
            .expect("alloc");
        let lines = budget(&city, &vec![(q("prohlis"), &quarter)], Some(2027));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].over_frame);
        assert_eq!(
            (
                lines[0].frame_cents,
                lines[0].allocated_cents,
                lines[0].remaining_cents
            ),
            (5_000, 6_000, -1_000)
        );
    }

    #[test]
    fn supports_are_idempotent_and_qualify_at_the_threshold() {
        let mut p = proposal("Bench", "A bench at the stop", 2, 0).expect("proposal");
        assert!(support(&mut p, "anna", 1).expect("support"));
        assert!(
            !support(&mut p, "anna", 2).expect("again"),
            "a second support by the same person counted"
        );
        assert_eq!(p.status, "open");
        support(&mut p, "ben", 3).expect("support");
        assert_eq!(p.status, "qualified");
        assert!(set_proposal_status(&mut p, "implemented").is_err());
        set_proposal_status(&mut p, "accepted").expect("accept");
        set_proposal_status(&mut p, "implemented").expect("implement");
    }

    #[test]
    fn dates_and_times_parse() {
        assert_eq!(parse_when("1970-01-01").expect("date"), 86_399_000);
        assert_eq!(parse_when("1970-01-01T00:00:01Z").expect("time"), 1_000);
        assert!(parse_when("tomorrow").is_err());
    }
}
