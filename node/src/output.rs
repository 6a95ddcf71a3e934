//! Human-readable output of the CLIs (the `--json` forms print the API's JSON).

use iq_protocol::datadir::{Replicate, Role};
use iq_protocol::replicator::Status;

use crate::api::ConcernView;

/// Prints `value` as pretty JSON, or with `human`.
pub fn emit<T: serde::Serialize>(
    value: &T,
    json: bool,
    human: impl FnOnce(&T),
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

/// Shortens a hash or PeerId for tables.
pub fn short(s: &str) -> String {
    if s.len() > 12 {
        format!("{}…", &s[..12])
    } else {
        s.to_string()
    }
}

fn ago(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "never".into() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{:.1}s ago", now.saturating_sub(ms) as f64 / 1000.0)
}

pub fn print_concerns(list: &[ConcernView]) {
    if list.is_empty() {
        println!("no concerns");
        return;
    }
    println!(
        "{:<36}  {:<16}  {:<14}  {:<6}  {:<20}  DESCRIPTION",
        "ID", "QUARTER", "CATEGORY", "STATUS", "CREATED"
    );
    for c in list {
        let mut desc: String = c.description.chars().take(60).collect();
        if c.description.chars().count() > 60 {
            desc.push('…');
        }
        let created: String = c.created.chars().take(19).collect();
        println!(
            "{:<36}  {:<16}  {:<14}  {:<6}  {:<20}  {}",
            c.id,
            c.quarter,
            c.category,
            c.status,
            created,
            desc.replace('\n', " ")
        );
    }
    println!("{} concern(s)", list.len());
}

/// One concern in full.
pub fn print_concern(c: &ConcernView) {
    println!(
        "{}  [{} / {}] {} in {}",
        c.id,
        c.status,
        c.detailed_status.as_deref().unwrap_or("-"),
        c.category,
        c.quarter
    );
    println!("    {}", c.description);
    if let (Some(lat), Some(long)) = (c.lat, c.long) {
        println!("    at {lat}, {long}");
    }
    for (label, value) in [
        ("address", &c.address),
        ("media", &c.media_url),
        ("agency", &c.agency),
    ] {
        if let Some(v) = value {
            println!("    {label}: {v}");
        }
    }
    println!(
        "    created {}{}",
        c.created,
        c.updated
            .as_deref()
            .map(|u| format!(", updated {u}"))
            .unwrap_or_default()
    );
    for n in &c.notes {
        println!("    {} {} ({}): {}", n.at, n.status, n.by, n.note);
    }
    for (field, values) in &c.conflicts {
        println!("    CONFLICT in {field}: {}", values.join(" | "));
    }
}

pub fn print_status(s: &Status) {
    println!("peer id:   {}", s.peer_id);
    println!("writes:    {}", s.own_doc);
    if s.role == Role::Quarter {
        println!(
            "replicas:  {}",
            match s.replicate {
                Replicate::All => "every quarter on the roster, and the city",
                Replicate::Own => "its own quarter and the city only",
            }
        );
    }
    for l in &s.listen {
        println!("listening: {l}");
    }
    println!("store:     {} bytes on disk", s.store_bytes);
    if s.loading > 0 {
        println!(
            "loading:   {} more stored document(s); the node joins the network once they are loaded",
            s.loading
        );
    }
    let r = &s.refusals;
    println!(
        "refused:   {} connection(s), {} request(s), {} over rate, {} message(s) with {} unauthorised change(s)",
        r.connections, r.requests, r.rate_limited, r.messages, r.changes
    );
    println!();
    println!(
        "{:<24}  {:>7}  {:>7}  HEADS",
        "DOCUMENT", "SCHEMA", "CHANGES"
    );
    for d in &s.documents {
        let heads: Vec<String> = d.heads.iter().map(|h| short(h)).collect();
        let schema = d
            .schema_version
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<24}  {:>7}  {:>7}  {}",
            d.id,
            schema,
            d.changes,
            heads.join(",")
        );
    }
    println!();
    if s.peers.is_empty() {
        println!("no peers up");
    } else {
        println!(
            "{:<54}  {:<9}  {:>12}  {:>12}  LAST SYNC",
            "PEER", "CONNECTED", "SENT (SESS)", "RECV (SESS)"
        );
        for p in &s.peers {
            println!(
                "{:<54}  {:<9}  {:>12}  {:>12}  {}",
                p.peer_id,
                if p.connected { "yes" } else { "no" },
                p.stats.session_bytes_sent,
                p.stats.session_bytes_received,
                ago(p.last_sync_ms)
            );
        }
    }
}

/// Euros from cents, for tables.
pub fn euros(cents: i64) -> String {
    format!("{} €", iq_protocol::schema::format_cents(cents))
}

/// Parses euros as typed (`1500`, `1500.5`, `1500,50`) into cents.
pub fn parse_euros(s: &str) -> Result<i64, String> {
    let t = s.trim().replace(',', ".");
    let (whole, frac) = t.split_once('.').unwrap_or((&t, ""));
    let bad = || format!("{s:?} is not an amount in euros (e.g. 1500 or 1500.50)");
    if whole.is_empty()
        || !whole.chars().all(|c| c.is_ascii_digit())
        || frac.len() > 2
        || !frac.chars().all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    let frac: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<2}").parse().map_err(|_| bad())?
    };
    whole
        .checked_mul(100)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)
}

fn date(ms: i64) -> String {
    iq_protocol::schema::format_time(ms, false)
}

pub fn print_directives(list: &[iq_protocol::workflows::DirectiveStatus]) {
    if list.is_empty() {
        println!("no directives");
        return;
    }
    for d in list {
        let due = d
            .directive
            .ack_due_ms
            .map(date)
            .unwrap_or_else(|| "-".into());
        println!("{}  {}", d.directive.id, d.directive.title);
        let targets = if d.directive.targets.is_empty() {
            "all quarters".to_string()
        } else {
            d.directive.targets.join(", ")
        };
        println!(
            "    to: {targets}; effective {}; acknowledge by {due}",
            if d.directive.effective.is_empty() {
                "-"
            } else {
                &d.directive.effective
            }
        );
        let acks: Vec<String> = d
            .acks
            .iter()
            .map(|(q, a)| format!("{q} ({})", a.state))
            .collect();
        println!(
            "    acknowledged: {}",
            if acks.is_empty() {
                "none".into()
            } else {
                acks.join(", ")
            }
        );
        if !d.pending.is_empty() {
            println!("    pending: {}", d.pending.join(", "));
        }
        if !d.overdue.is_empty() {
            println!("    OVERDUE: {}", d.overdue.join(", "));
        }
    }
}

pub fn print_consultations(list: &[iq_protocol::workflows::ConsultationResults]) {
    if list.is_empty() {
        println!("no consultations");
        return;
    }
    for r in list {
        let c = &r.consultation;
        println!("{}  [{}] {}", c.id, c.status, c.question);
        println!(
            "    deadline {}; to {}",
            date(c.deadline_ms),
            if c.targets.is_empty() {
                "all quarters".to_string()
            } else {
                c.targets.join(", ")
            }
        );
        for o in &r.options {
            println!(
                "    {:<20} {} quarter(s) {:<30} yes {:>4}  no {:>4}  abstain {:>4}",
                o.option,
                o.quarters.len(),
                format!("({})", o.quarters.join(", ")),
                o.yes,
                o.no,
                o.abstain
            );
        }
        if !r.missing.is_empty() {
            println!("    not answered yet: {}", r.missing.join(", "));
        }
    }
}

pub fn print_budget(list: &[iq_protocol::workflows::BudgetLine]) {
    if list.is_empty() {
        println!("no budget frames");
        return;
    }
    println!(
        "{:<6}  {:<16}  {:>16}  {:>16}  {:>16}  FLAG",
        "YEAR", "QUARTER", "FRAME", "ALLOCATED", "REMAINING"
    );
    for b in list {
        println!(
            "{:<6}  {:<16}  {:>16}  {:>16}  {:>16}  {}",
            b.year,
            b.quarter,
            euros(b.frame_cents),
            euros(b.allocated_cents),
            euros(b.remaining_cents),
            if b.over_frame { "OVER FRAME" } else { "" }
        );
    }
}

pub fn print_escalations(list: &[iq_protocol::workflows::InboxEntry]) {
    if list.is_empty() {
        println!("no escalations");
        return;
    }
    for e in list {
        println!(
            "{}  {} {} from {} at {}",
            e.escalation.id,
            e.escalation.kind,
            e.escalation.item_id,
            e.quarter,
            date(e.escalation.at_ms)
        );
        println!("    item:   {}", e.item);
        println!("    reason: {}", e.escalation.reason);
        match &e.response {
            Some(r) => println!(
                "    response: {}{} — {}",
                r.decision,
                r.department
                    .as_deref()
                    .map(|d| format!(" to {d}"))
                    .unwrap_or_default(),
                r.note
            ),
            None => println!("    response: none yet"),
        }
    }
}

pub fn print_proposals(list: &[crate::workflow_api::ProposalView]) {
    if list.is_empty() {
        println!("no proposals");
        return;
    }
    println!(
        "{:<36}  {:<16}  {:<11}  {:>9}  TITLE",
        "ID", "QUARTER", "STATUS", "SUPPORTS"
    );
    for p in list {
        println!(
            "{:<36}  {:<16}  {:<11}  {:>9}  {}",
            p.proposal.id,
            p.quarter,
            p.proposal.status,
            format!("{}/{}", p.support_count, p.proposal.threshold),
            p.proposal.title
        );
    }
}

pub fn print_overview(list: &[iq_protocol::workflows::ConcernOverview]) {
    println!(
        "{:<16}  {:>6}  {:<30}  BY CATEGORY",
        "QUARTER", "TOTAL", "BY STATUS"
    );
    for o in list {
        let st: Vec<String> = o
            .by_status
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let cat: Vec<String> = o
            .by_category
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "{:<16}  {:>6}  {:<30}  {}",
            o.quarter,
            o.total,
            st.join(", "),
            cat.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euros_parse_and_print() {
        assert_eq!(parse_euros("1500"), Ok(150_000));
        assert_eq!(parse_euros("1500.5"), Ok(150_050));
        assert_eq!(parse_euros("1500,05"), Ok(150_005));
        assert!(parse_euros("-3").is_err());
        assert!(parse_euros("1.234").is_err());
        assert!(parse_euros("abc").is_err());
        assert_eq!(euros(150_005), "1500.05 €");
        assert_eq!(euros(-1_000), "-10.00 €");
    }
}
