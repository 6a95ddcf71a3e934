//! Human-readable output of the CLIs (the `--json` forms print the API's JSON).

use iq_protocol::replicator::Status;

use crate::api::ConcernView;

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

pub fn print_status(s: &Status) {
    println!("peer id:   {}", s.peer_id);
    println!("writes:    {}", s.own_doc);
    for l in &s.listen {
        println!("listening: {l}");
    }
    println!("store:     {} bytes on disk", s.store_bytes);
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
