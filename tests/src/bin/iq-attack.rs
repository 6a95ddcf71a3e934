//! `iq-attack`: a hostile peer for the trust tests. It connects to a node
//! with a given key (typically a listed quarter's, to test what an insider
//! can do) and sends crafted sync requests over the real protocol, printing
//! one JSON line per request: `{"scenario", "outcome", "reason"}`.
//!
//! Scenarios: `connect`, `forge-city`, `forge-quarter` (claims `--victim`'s
//! actor), `forge-whole-doc` (a forged change in a whole document of a
//! quarter the sender does not write),
//! `inflating-doc` (a document of the sender's whose compressed column
//! inflates to 64 MiB and one byte of zeros, from about 65 KB),
//! `run-length-bomb` (a change of the sender's, signed, whose 70 bytes of
//! run-length encoding declare 2^63-1 operations),
//! `garbage`, `bloom`, `bomb`, `oversized` (40 MiB
//! that do not deflate), `deflated-oversized` (40 MiB that the codec deflates
//! to under a quarter on `/iq/sync/2`, so it travels deflated and inflates
//! beyond the bound at the node), `flood` (`--count` requests, `--window` of
//! them in flight at once).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use automerge::sync;
use automerge::{ActorId, Automerge};
use futures::StreamExt;
use iq_protocol::authorship::Signer;
use iq_protocol::codec::WireCounters;
use iq_protocol::identity::{Identity, actor_id_of_peer};
use iq_protocol::schema::{self, Concern, RosterEntry};
use iq_protocol::transport::{self, BehaviourEvent};
use iq_protocol::wire::{Request, Response, ResponseV1, SignedHash};
use iq_protocol::{DocId, Multiaddr, PeerId, QuarterSlug};
use libp2p::request_response::{Event, Message};
use libp2p::swarm::SwarmEvent;

/// One request to send: document, sync message bytes, signatures.
type Outgoing = (DocId, Vec<u8>, Vec<SignedHash>);

struct Args {
    key: PathBuf,
    target: String,
    scenario: String,
    doc: Option<String>,
    victim: Option<String>,
    count: usize,
    /// Requests kept in flight at once.
    window: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        key: PathBuf::new(),
        target: String::new(),
        scenario: String::new(),
        doc: None,
        victim: None,
        count: 1,
        window: 16,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--key" => args.key = value()?.into(),
            "--target" => args.target = value()?,
            "--scenario" => args.scenario = value()?,
            "--doc" => args.doc = Some(value()?),
            "--victim" => args.victim = Some(value()?),
            "--count" => args.count = value()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--window" => args.window = value()?.parse().map_err(|e| format!("--window: {e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn concern(id: &str) -> Concern {
    Concern::new("graffiti".into(), format!("forged {id}"), None, None, 0)
}

/// A change to `doc` on top of genesis, written as `actor` and signed by `signer`.
fn forged_change(
    doc: &DocId,
    actor: ActorId,
    signer: &Signer,
) -> Result<(automerge::Change, Automerge, SignedHash), String> {
    let mut am = schema::genesis(doc);
    am.set_actor(actor);
    am.transact::<_, _, schema::SchemaError>(|tx| match doc {
        DocId::City => schema::put_roster_entry(
            tx,
            &QuarterSlug::new("evil").map_err(|e| schema::SchemaError::Invalid(e.to_string()))?,
            &RosterEntry {
                name: "Evil".into(),
                writers: vec![],
                addrs: None,
            },
        ),
        DocId::Quarter(_) => schema::put_concern(tx, &concern("x")),
    })
    .map_err(|e| format!("{:?}", e.error))?;
    let change = am.get_last_local_change().ok_or("no change")?;
    let sig = SignedHash {
        hash: change.hash().0.to_vec(),
        sig: signer.sign(&change.hash()),
    };
    Ok((change, am, sig))
}

fn message(
    heads: Vec<automerge::ChangeHash>,
    changes: Vec<Vec<u8>>,
    version: sync::MessageVersion,
) -> Vec<u8> {
    sync::Message {
        heads,
        need: vec![],
        have: vec![],
        changes: changes.into(),
        flags: None,
        version,
    }
    .encode()
}

/// The requests a scenario sends: (doc, data, sigs).
fn requests(args: &Args, identity: &Identity) -> Result<Vec<Outgoing>, String> {
    let signer = Signer::from_secret(identity.ed25519_secret().ok_or("not an ed25519 key")?);
    let doc: DocId = args
        .doc
        .as_deref()
        .unwrap_or("city")
        .parse()
        .map_err(|e| format!("--doc: {e}"))?;
    let mut out = Vec::new();
    match args.scenario.as_str() {
        "connect" => {}
        "forge-city" => {
            let (c, _, sig) = forged_change(&DocId::City, signer.actor(), &signer)?;
            out.push((
                DocId::City,
                message(
                    vec![c.hash()],
                    vec![c.raw_bytes().to_vec()],
                    sync::MessageVersion::V1,
                ),
                vec![sig],
            ));
        }
        "forge-quarter" => {
            let victim: PeerId = args
                .victim
                .as_deref()
                .ok_or("--victim needed")?
                .parse()
                .map_err(|e| format!("--victim: {e}"))?;
            let actor = actor_id_of_peer(&victim).ok_or("victim has no ed25519 key")?;
            let (c, _, sig) = forged_change(&doc, actor, &signer)?;
            out.push((
                doc,
                message(
                    vec![c.hash()],
                    vec![c.raw_bytes().to_vec()],
                    sync::MessageVersion::V1,
                ),
                vec![sig],
            ));
        }
        "forge-whole-doc" => {
            let (c, am, sig) = forged_change(&doc, signer.actor(), &signer)?;
            out.push((
                doc,
                message(
                    vec![c.hash()],
                    vec![am.save_nocompress()],
                    sync::MessageVersion::V2,
                ),
                vec![sig],
            ));
        }
        "inflating-doc" => {
            // automerge would inflate every compressed column whole before
            // it read anything else.
            let document = iq_protocol::chunks::forge::inflating_document(
                signer.actor().to_bytes(),
                iq_protocol::chunks::MAX_INFLATED_DOCUMENT as usize + 1,
            );
            out.push((
                doc,
                message(vec![], vec![document], sync::MessageVersion::V2),
                vec![],
            ));
        }
        "run-length-bomb" => {
            // automerge would read the operations one by one, for good.
            let change = iq_protocol::chunks::forge::run_length_change(
                signer.actor().to_bytes(),
                i64::MAX,
                i64::MAX,
            );
            let mut hashes = Vec::new();
            iq_protocol::chunks::hashes_in(&change, &mut hashes).map_err(|e| e.to_string())?;
            let sigs = hashes
                .iter()
                .map(|h| SignedHash {
                    hash: h.0.to_vec(),
                    sig: signer.sign(h),
                })
                .collect();
            out.push((
                doc,
                message(hashes, vec![change], sync::MessageVersion::V1),
                sigs,
            ));
        }
        "garbage" => out.push((doc, vec![0x42; 4096], vec![])),
        "bloom" => {
            out.push((doc, hostile_bloom_message(), vec![]));
        }
        "bomb" => out.push((doc, bomb_message(), vec![])),
        "oversized" => out.push((doc, incompressible(40 * 1024 * 1024), vec![])),
        "deflated-oversized" => out.push((doc, sparse(40 * 1024 * 1024), vec![])),
        "flood" => {
            for _ in 0..args.count {
                out.push((doc.clone(), vec![0x42; 16], vec![]));
            }
        }
        other => return Err(format!("unknown scenario {other}")),
    }
    Ok(out)
}

/// A sync message (type 0x42, as automerge encodes it) with no heads, no
/// needs and one `have` whose bloom filter claims 2^32-1 probes.
fn hostile_bloom_message() -> Vec<u8> {
    let mut m = vec![0x42, 0, 0, 1, 0];
    let bloom: &[u8] = &[1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff, 0xff];
    m.push(bloom.len() as u8);
    m.extend_from_slice(bloom);
    m.push(0);
    m
}

/// `n` bytes that deflate cannot shrink (xorshift), so they travel as they are.
fn incompressible(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `n` bytes that deflate to about a fifth: one random byte in sixteen, the
/// rest zeros (within `codec::MAX_INFLATE_RATIO`, so the codec deflates them).
fn sparse(n: usize) -> Vec<u8> {
    let mut random = incompressible(n / 16 + 1).into_iter();
    (0..n)
        .map(|i| {
            if i % 16 == 0 {
                random.next().unwrap_or(1)
            } else {
                0
            }
        })
        .collect()
}

/// A sync message whose one change chunk is a 16 MiB compression bomb.
fn bomb_message() -> Vec<u8> {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1024 * 1024];
    for _ in 0..16 {
        let _ = enc.write_all(&zeros);
    }
    let body = enc.finish().unwrap_or_default();
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2];
    iq_protocol::chunks::forge::uleb(body.len() as u64, &mut chunk);
    chunk.extend_from_slice(&body);
    message(vec![], vec![chunk], sync::MessageVersion::V1)
}

/// Sends queued requests until `window` are in flight.
fn refill(
    swarm: &mut libp2p::Swarm<transport::Behaviour>,
    target: PeerId,
    todo: &mut Vec<Outgoing>,
    pending: &mut usize,
    window: usize,
) {
    while *pending < window
        && let Some((doc, data, sigs)) = todo.pop()
    {
        let request = Request::first_version(doc, data, sigs);
        swarm.behaviour_mut().sync.send_request(&target, request);
        *pending += 1;
    }
}

/// What this program's sync streams carried, for the reports.
static WIRE: std::sync::OnceLock<Arc<WireCounters>> = std::sync::OnceLock::new();

/// One report line; `wire_sent` is what the sync streams carried so far
/// (deflated on `/iq/sync/2`).
fn report(scenario: &str, outcome: &str, reason: &str) {
    let wire_sent = WIRE.get().map_or(0, |w| w.sent());
    println!(
        "{}",
        serde_json::json!({"scenario": scenario, "outcome": outcome, "reason": reason, "wire_sent": wire_sent})
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let identity = Identity::load(&args.key).map_err(|e| e.to_string())?;
    let target: Multiaddr = args.target.parse().map_err(|e| format!("--target: {e}"))?;
    let Some(libp2p::multiaddr::Protocol::P2p(target_peer)) = target.iter().last() else {
        return Err("--target must end in /p2p/<PeerId>".into());
    };
    let mut todo = requests(&args, &identity)?;
    let mut swarm =
        transport::build_swarm(&identity, None, Arc::clone(WIRE.get_or_init(Arc::default)))
            .map_err(|e| e.to_string())?;
    swarm.behaviour_mut().allow.allow_peer(target_peer);
    swarm.dial(target).map_err(|e| e.to_string())?;
    // Generous: a loaded 2-core machine moves 40 MiB through a debug build slowly.
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    let mut pending = 0usize;
    let mut connected = false;
    loop {
        tokio::select! {
            _ = &mut deadline => {
                report(&args.scenario, "timeout", &format!("{pending} requests unanswered"));
                return Ok(());
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == target_peer => {
                    connected = true;
                    if args.scenario == "connect" {
                        // Admission may still close it right after the handshake.
                        let settle = tokio::time::sleep(Duration::from_secs(1));
                        tokio::pin!(settle);
                        loop {
                            tokio::select! {
                                _ = &mut settle => break,
                                event = swarm.select_next_some() => {
                                    if let SwarmEvent::ConnectionClosed { peer_id, .. } = event
                                        && peer_id == target_peer
                                    {
                                        break;
                                    }
                                }
                            }
                        }
                        let outcome = if swarm.is_connected(&target_peer) { "connected" } else { "closed" };
                        report(&args.scenario, outcome, "");
                        return Ok(());
                    }
                    refill(&mut swarm, target_peer, &mut todo, &mut pending, args.window);
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    report(&args.scenario, "refused", &error.to_string());
                    return Ok(());
                }
                SwarmEvent::ConnectionClosed { peer_id, cause, .. } if peer_id == target_peer && pending > 0 => {
                    report(&args.scenario, "closed", &format!("{cause:?}"));
                    return Ok(());
                }
                SwarmEvent::ConnectionClosed { peer_id, .. } if peer_id == target_peer && args.scenario == "connect" && !connected => {
                    report(&args.scenario, "closed", "");
                    return Ok(());
                }
                SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => match event {
                    Event::Message { message: Message::Response { response, .. }, .. } => {
                        pending -= 1;
                        refill(&mut swarm, target_peer, &mut todo, &mut pending, args.window);
                        match response {
                            Response::V1(ResponseV1::Ack | ResponseV1::Answer { .. }) => report(&args.scenario, "ack", ""),
                            Response::V1(ResponseV1::Refused { reason }) => report(&args.scenario, "refused", &reason),
                            Response::V1(ResponseV1::Busy) => report(&args.scenario, "busy", "over the request rate"),
                        }
                    }
                    Event::OutboundFailure { error, .. } => {
                        pending -= 1;
                        refill(&mut swarm, target_peer, &mut todo, &mut pending, args.window);
                        report(&args.scenario, "failed", &error.to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        if connected && pending == 0 && todo.is_empty() {
            return Ok(());
        }
    }
}
