//! The floor: the same concern-shaped changes synced in one process with
//! automerge's own sync protocol — no network, no disk, no signatures. What
//! iq could at best reach on this machine.

use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ObjType, ROOT, ScalarValue};

use crate::Rng;

/// How the two sides of the floor talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// automerge's defaults: a peer with nothing may get the whole document
    /// in one compressed message (sync protocol v2).
    Default,
    /// Change lists only, as iq syncs (it advertises no capabilities, so
    /// whole documents are never sent; see `engine::generate`).
    ChangesOnly,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Default => "floor",
            Mode::ChangesOnly => "floor-changes",
        }
    }
}

/// One concern: a map of six scalar fields, written in one change.
pub fn put_concern(doc: &mut Automerge, concerns: &automerge::ObjId, rng: &mut Rng, n: usize) {
    let id = format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64());
    let mut tx = doc.transaction();
    // A transaction on a map we created cannot fail; if it ever did the
    // benchmark would measure the wrong thing, so stop loudly.
    let c = tx
        .put_object(concerns, id.as_str(), ObjType::Map)
        .unwrap_or_else(|e| panic!("floor: put_object: {e}"));
    let fields: [(&str, ScalarValue); 6] = [
        ("id", ScalarValue::Str(id.as_str().into())),
        ("category", ScalarValue::Str("road-damage".into())),
        (
            "description",
            ScalarValue::Str(format!("Pothole number {n} at the corner").into()),
        ),
        ("status", ScalarValue::Str("open".into())),
        ("created_ms", ScalarValue::Int(1_780_000_000_000 + n as i64)),
        ("lat", ScalarValue::F64(51.05 + (n % 1000) as f64 * 1e-5)),
    ];
    for (k, v) in fields {
        tx.put(&c, k, v)
            .unwrap_or_else(|e| panic!("floor: put {k}: {e}"));
    }
    tx.commit();
}

/// A quarter document with a `concerns` map and `m` concerns.
pub fn quarter_doc(q: usize, m: usize, rng: &mut Rng) -> (Automerge, automerge::ObjId) {
    let mut doc = Automerge::new();
    doc.set_actor(ActorId::from(format!("quarter-{q}").into_bytes()));
    let mut tx = doc.transaction();
    let concerns = tx
        .put_object(ROOT, "concerns", ObjType::Map)
        .unwrap_or_else(|e| panic!("floor: concerns map: {e}"));
    tx.commit();
    for n in 0..m {
        put_concern(&mut doc, &concerns, rng, n);
    }
    (doc, concerns)
}

/// Syncs `a` and `b` until neither has anything to say; returns the bytes
/// of all messages (encoded, then decoded by the receiver as a peer would).
pub fn sync_pair(
    a: &mut Automerge,
    sa: &mut sync::State,
    b: &mut Automerge,
    sb: &mut sync::State,
    mode: Mode,
) -> Result<u64, String> {
    let mut bytes = 0u64;
    // Two documents converge in a handful of rounds; the bound only
    // guards against a bug looping forever.
    for _ in 0..10_000 {
        let ab = one_message(a, sa, b, sb, mode)?;
        let ba = one_message(b, sb, a, sa, mode)?;
        bytes += ab.unwrap_or(0) + ba.unwrap_or(0);
        if ab.is_none() && ba.is_none() {
            return Ok(bytes);
        }
    }
    Err("floor: sync did not settle in 10 000 rounds".into())
}

/// Sends `from`'s next message to `to`, if it has one; returns its size.
fn one_message(
    from: &mut Automerge,
    sf: &mut sync::State,
    to: &mut Automerge,
    st: &mut sync::State,
    mode: Mode,
) -> Result<Option<u64>, String> {
    let Some(mut msg) = from.generate_sync_message(sf) else {
        return Ok(None);
    };
    if mode == Mode::ChangesOnly {
        msg.flags = None;
    }
    let data = msg.encode();
    let msg = sync::Message::decode(&data).map_err(|e| e.to_string())?;
    to.receive_sync_message(st, msg)
        .map_err(|e| e.to_string())?;
    Ok(Some(data.len() as u64))
}

/// P1 on the floor: Q quarter documents with M concerns each are synced
/// into one centre's document set, then (unless the quarters hold their
/// own document only) from it to every quarter.
#[derive(Debug, Clone)]
pub struct CatchUp {
    pub to_centre: Duration,
    pub to_centre_bytes: u64,
    pub to_all: Option<Duration>,
    pub to_all_bytes: u64,
}

pub fn catch_up(
    q: usize,
    m: usize,
    mode: Mode,
    seed: u64,
    every_node: bool,
) -> Result<CatchUp, String> {
    let mut rng = Rng::new(seed);
    let quarters: Vec<Automerge> = (0..q).map(|i| quarter_doc(i, m, &mut rng).0).collect();
    // Every quarter's replica set: its own document plus empty ones it will fill.
    let mut replicas: Vec<Vec<Automerge>> = quarters
        .into_iter()
        .enumerate()
        .map(|(i, own)| {
            (0..q)
                .map(|j| {
                    if i == j {
                        own.clone()
                    } else {
                        Automerge::new()
                    }
                })
                .collect()
        })
        .collect();
    let mut centre: Vec<Automerge> = (0..q).map(|_| Automerge::new()).collect();
    let start = Instant::now();
    let mut to_centre_bytes = 0;
    for (i, replica) in replicas.iter_mut().enumerate() {
        let (mut sq, mut sc) = (sync::State::new(), sync::State::new());
        to_centre_bytes += sync_pair(&mut replica[i], &mut sq, &mut centre[i], &mut sc, mode)?;
    }
    let to_centre = start.elapsed();
    let mut to_all_bytes = to_centre_bytes;
    if !every_node {
        return Ok(CatchUp {
            to_centre,
            to_centre_bytes,
            to_all: None,
            to_all_bytes,
        });
    }
    for (i, replica) in replicas.iter_mut().enumerate() {
        for (j, doc) in replica.iter_mut().enumerate() {
            if i == j {
                continue;
            }
            let (mut sq, mut sc) = (sync::State::new(), sync::State::new());
            to_all_bytes += sync_pair(doc, &mut sq, &mut centre[j], &mut sc, mode)?;
        }
    }
    let to_all = start.elapsed();
    for (i, replica) in replicas.iter().enumerate() {
        for (j, doc) in replica.iter().enumerate() {
            if doc.get_heads() != centre[j].get_heads() {
                return Err(format!("floor: quarter {i} differs from the centre on {j}"));
            }
        }
    }
    Ok(CatchUp {
        to_centre,
        to_centre_bytes,
        to_all: Some(to_all),
        to_all_bytes,
    })
}

/// P2 on the floor: every node holds every document and keeps its sync
/// states; one concern at a time at a random quarter, synced to the centre
/// and from there to every other quarter. Latencies per write.
pub fn live(
    q: usize,
    writes: usize,
    mode: Mode,
    seed: u64,
) -> Result<Vec<(Duration, Duration)>, String> {
    let mut rng = Rng::new(seed);
    let mut maps = Vec::new();
    let mut own = Vec::new();
    for i in 0..q {
        let (doc, concerns) = quarter_doc(i, 0, &mut rng);
        own.push(doc);
        maps.push(concerns);
    }
    let mut centre: Vec<Automerge> = (0..q).map(|_| Automerge::new()).collect();
    let mut replicas: Vec<Vec<Automerge>> = (0..q)
        .map(|i| {
            (0..q)
                .map(|j| {
                    if i == j {
                        own[i].clone()
                    } else {
                        Automerge::new()
                    }
                })
                .collect()
        })
        .collect();
    // Sync states: quarter i ↔ centre, for document j, on both sides.
    let mut states: Vec<Vec<(sync::State, sync::State)>> = (0..q)
        .map(|_| {
            (0..q)
                .map(|_| (sync::State::new(), sync::State::new()))
                .collect()
        })
        .collect();
    let exchange = |replicas: &mut Vec<Vec<Automerge>>,
                    centre: &mut Vec<Automerge>,
                    states: &mut Vec<Vec<(sync::State, sync::State)>>,
                    i: usize,
                    j: usize|
     -> Result<u64, String> {
        let (sq, sc) = &mut states[i][j];
        sync_pair(&mut replicas[i][j], sq, &mut centre[j], sc, mode)
    };
    for i in 0..q {
        exchange(&mut replicas, &mut centre, &mut states, i, i)?;
    }
    for i in 0..q {
        for j in 0..q {
            exchange(&mut replicas, &mut centre, &mut states, i, j)?;
        }
    }
    let mut out = Vec::with_capacity(writes);
    for n in 0..writes {
        let w = (rng.next_u64() % q as u64) as usize;
        let start = Instant::now();
        put_concern(&mut replicas[w][w], &maps[w], &mut rng, n);
        exchange(&mut replicas, &mut centre, &mut states, w, w)?;
        let at_centre = start.elapsed();
        for i in (0..q).filter(|i| *i != w) {
            exchange(&mut replicas, &mut centre, &mut states, i, w)?;
        }
        out.push((at_centre, start.elapsed()));
    }
    Ok(out)
}

/// P3's cold start on the floor: automerge loading saved documents from
/// memory (no process start, no disk, no signatures), once each.
#[derive(Debug, Clone)]
pub struct ColdStart {
    /// One quarter's own document of M concerns, as a quarter's API waits
    /// for it.
    pub own_document: Duration,
    /// Every quarter's document, one after another on one thread, as a
    /// node holds them all.
    pub every_document: Duration,
    /// The saved bytes of the quarter's document.
    pub own_document_bytes: u64,
}

pub fn cold_start(q: usize, m: usize, seed: u64) -> Result<ColdStart, String> {
    let mut rng = Rng::new(seed);
    let saved: Vec<Vec<u8>> = (0..q)
        .map(|i| quarter_doc(i, m, &mut rng).0.save())
        .collect();
    let load = |bytes: &[u8]| -> Result<Automerge, String> {
        Automerge::load(bytes).map_err(|e| format!("floor: a saved document does not load: {e}"))
    };
    let first = saved.first().ok_or("floor: no quarter to load")?;
    let start = Instant::now();
    let own = load(first)?;
    let own_document = start.elapsed();
    let start = Instant::now();
    // Kept until the clock has stopped, so that no drop is timed.
    let mut loaded = Vec::with_capacity(saved.len());
    for bytes in &saved {
        loaded.push(load(bytes)?);
    }
    let every_document = start.elapsed();
    // Loaded whole (the concerns map's change and one per concern), or the
    // time measured the wrong thing.
    let changes = own.get_changes_meta(&[]).len();
    if changes != m + 1 {
        return Err(format!(
            "floor: the loaded document holds {changes} changes, not {}",
            m + 1
        ));
    }
    Ok(ColdStart {
        own_document,
        every_document,
        own_document_bytes: first.len() as u64,
    })
}

/// Mean bytes of one concern's change: the floor's six-field map, and the
/// concern iq's API writes (`schema::Concern`, as `POST /api/v1/concerns`
/// makes it), each without the signature iq adds on the wire.
pub fn change_bytes(seed: u64) -> Result<(f64, f64), String> {
    const N: usize = 200;
    let mut rng = Rng::new(seed);
    let (floor, _) = quarter_doc(0, N, &mut rng);
    let mean = |doc: &Automerge, skip: usize| {
        let changes = doc.get_changes(&[]);
        let sizes: Vec<usize> = changes
            .iter()
            .skip(skip)
            .map(|c| c.raw_bytes().len())
            .collect();
        sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64
    };
    let slug = iq_protocol::QuarterSlug::new("prohlis").map_err(|e| e.to_string())?;
    let mut iq = iq_protocol::schema::genesis(&iq_protocol::DocId::quarter(&slug));
    let genesis = iq.get_changes(&[]).len();
    iq.set_actor(ActorId::from(rng.next_u64().to_be_bytes().repeat(4)));
    for n in 0..N {
        let concern = iq_protocol::schema::Concern::new(
            "litter".into(),
            format!("Pothole number {n} at the corner"),
            None,
            None,
            1_780_000_000_000 + n as i64,
        );
        iq.transact(|tx| iq_protocol::schema::put_concern(tx, &concern))
            .map_err(|f| format!("iq concern: {}", f.error))?;
    }
    Ok((mean(&floor, 1), mean(&iq, genesis)))
}
