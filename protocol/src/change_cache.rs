//! Change bytes kept as they arrived, so outgoing sync messages carry them
//! as they are.
//!
//! automerge keeps no change bytes: it holds a document as columns of
//! operations and rebuilds each change it sends from them
//! (`generate_sync_message`). For the centre, which passes every quarter's
//! changes on to every other node, that rebuilding was about half of its CPU
//! time during a catch-up (see `docs/benchmarks.md`). Every change a node
//! receives or writes is already at hand as bytes once, so a bounded cache
//! keeps them, and [`sync_message`] lets automerge decide everything but the
//! change bytes. It falls back to automerge's own message whenever the cache
//! lacks a change that is due.
//!
//! The bytes of a change fix its hash (the hash is computed from them when a
//! change is parsed or built), so a cached entry can never stand in for
//! another change.

use std::collections::{HashMap, HashSet, VecDeque};

use automerge::sync::{self, SyncDoc};
use automerge::{ActorId, Automerge, ChangeHash, ReadDoc};

use crate::chunks::{MAX_CHANGES_PER_MESSAGE, MAX_DECLARED_VALUES};
use crate::vouch;

/// Bytes of changes kept at most; the oldest go first.
pub const CACHE_BYTES: usize = 32 << 20;

/// Most bytes of changes, with their hashes and signatures (96 bytes a
/// change), one sync message carries beyond its first change: a session
/// sends the rest in its next messages, each after the peer's answer says
/// what it then holds. A document's first sync may otherwise exceed the
/// request bound (`wire::MAX_REQUEST_BYTES`, 32 MiB), and be refused every
/// time it is sent.
pub const MESSAGE_CHANGE_BYTES: usize = 8 << 20;

/// Most bytes of changes a message carries when it goes on past
/// [`MESSAGE_CHANGE_BYTES`] to reach a signature that vouches for the
/// changes before it (see [`vouched`]).
pub const VOUCHED_CHANGE_BYTES: usize = 2 * MESSAGE_CHANGE_BYTES;

/// Most bytes of a whole document with its signatures (96 bytes a change)
/// in one message; a larger document goes as changes, a part at a time.
pub const WHOLE_DOCUMENT_BYTES: usize = 24 << 20;

/// Bytes a change's hash and signature take in a request.
const SIGNED_HASH_BYTES: usize = 96;

/// Recently received or written changes, by hash, oldest evicted first.
#[derive(Debug)]
pub struct ChangeCache {
    bytes: HashMap<ChangeHash, Vec<u8>>,
    order: VecDeque<ChangeHash>,
    held: usize,
    budget: usize,
    /// Messages built from the cache, and by automerge.
    hits: u64,
    misses: u64,
}

impl Default for ChangeCache {
    fn default() -> Self {
        Self::with_budget(CACHE_BYTES)
    }
}

impl ChangeCache {
    pub fn with_budget(budget: usize) -> Self {
        Self {
            bytes: HashMap::new(),
            order: VecDeque::new(),
            held: 0,
            budget,
            hits: 0,
            misses: 0,
        }
    }

    /// Keeps the bytes of the change with `hash` (which must be the hash of
    /// `bytes`: callers take both from one parsed or built change).
    pub fn insert(&mut self, hash: ChangeHash, bytes: &[u8]) {
        if bytes.len() > self.budget || self.bytes.contains_key(&hash) {
            return;
        }
        while self.held + bytes.len() > self.budget {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.bytes.remove(&old) {
                self.held -= b.len();
            }
        }
        self.held += bytes.len();
        self.bytes.insert(hash, bytes.to_vec());
        self.order.push_back(hash);
    }

    pub fn get(&self, hash: &ChangeHash) -> Option<&[u8]> {
        self.bytes.get(hash).map(Vec::as_slice)
    }

    /// Bytes held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Messages with changes built from the cache, and by automerge.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

/// The signatures a node holds, and which of them its messages carry.
#[derive(Clone, Copy)]
pub struct Vouching<'a> {
    /// Whether the node holds the signature of a change.
    pub holds: &'a dyn Fn(&ChangeHash) -> bool,
    /// Only those the receiver needs (see `vouch::plan`): the peer relays
    /// what it is sent vouched for only with a signature that vouches for
    /// it. Otherwise every one held goes.
    pub least: bool,
    /// Whether the session may send nothing when the changes due all
    /// stay back and its message would only repeat the last one (see
    /// [`repeats`]); not while it answers a message with changes, as the
    /// peer may wait for the answer to send the rest.
    pub may_fall_silent: bool,
}

impl std::fmt::Debug for Vouching<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vouching")
            .field("least", &self.least)
            .field("may_fall_silent", &self.may_fall_silent)
            .finish_non_exhaustive()
    }
}

impl Vouching<'_> {
    /// A node that holds every signature and sends them all (tests).
    #[cfg(test)]
    pub const ALL: Vouching<'static> = Vouching {
        holds: &|_| true,
        least: false,
        may_fall_silent: true,
    };
}

/// What a message carries: its changes, and those whose signatures go with
/// them (see [`Vouching`]).
#[derive(Debug, Default)]
pub struct Carried {
    pub hashes: Vec<ChangeHash>,
    pub signed: Vec<ChangeHash>,
}

/// The next sync message of a session, like automerge's
/// `generate_sync_message`, but with the changes it carries taken from
/// `cache` when all of them are there, no more of them than
/// [`MESSAGE_CHANGE_BYTES`] hold (or [`VOUCHED_CHANGE_BYTES`], to reach a
/// signature that vouches for them), and none that the signatures this
/// node holds do not vouch for ([`vouched`]). Returns the message and what it
/// carries.
pub fn sync_message(
    am: &Automerge,
    state: &mut sync::State,
    cache: &mut ChangeCache,
    vouching: Vouching<'_>,
) -> Option<(sync::Message, Carried)> {
    sync_message_within(am, state, cache, MESSAGE_CHANGE_BYTES, vouching)
}

/// [`sync_message`], with changes beyond the first up to `max_bytes` (see
/// [`within`]). The changes due come in the order automerge sends them:
/// those the peer named as needed first, then the rest in causal order; so
/// a part applies on what the peer holds, but for a needed change whose
/// own dependency is in a later part, which waits in the peer's queue until
/// it comes. Those left out are not counted as sent.
fn sync_message_within(
    am: &Automerge,
    state: &mut sync::State,
    cache: &mut ChangeCache,
    max_bytes: usize,
    vouching: Vouching<'_>,
) -> Option<(sync::Message, Carried)> {
    // A peer that advertised capabilities may be sent whole documents (v2
    // messages); iq nodes advertise none (see `engine`), so this path is theirs.
    if state.their_capabilities.is_none()
        && let Some(mut hashes) = hashes_to_send(am, state)
        && let Some(sizes) = hashes
            .iter()
            .map(|h| cache.get(h).map(<[u8]>::len))
            .collect::<Option<Vec<_>>>()
    {
        // automerge builds the rest of the message (heads, need, the bloom
        // filter, when to stay silent) but, told the peer takes no changes,
        // builds none; they are put in from the cache.
        let read_only = state.peer_read_only;
        let repeats = repeats(am, state);
        state.peer_read_only = true;
        let msg = am.generate_sync_message(state);
        state.peer_read_only = read_only;
        let mut msg = msg?;
        if read_only || hashes.is_empty() {
            return Some((msg, Carried::default()));
        }
        let weights: Vec<(usize, Option<u64>)> = hashes
            .iter()
            .zip(sizes)
            .map(|(h, size)| {
                let values = cache.get(h).and_then(crate::chunks::values_declared);
                (size, values)
            })
            .collect();
        let part = within(weights.iter().copied(), max_bytes);
        let bound = || within(weights.iter().copied(), max_bytes.max(VOUCHED_CHANGE_BYTES));
        let chosen = vouched(am, &hashes, part, bound, vouching);
        if chosen.is_empty() && vouching.may_fall_silent && repeats(&msg) {
            return None;
        }
        hashes = chosen.kept.into_iter().map(|i| hashes[i]).collect();
        let mut bytes: Vec<Vec<u8>> = hashes
            .iter()
            .filter_map(|h| cache.get(h).map(<[u8]>::to_vec))
            .collect();
        state.sent_hashes.extend(hashes.iter().copied());
        for hash in chosen.again {
            if let Some(b) = cache
                .get(&hash)
                .map(<[u8]>::to_vec)
                .or_else(|| rebuilt(am, &hash))
            {
                bytes.push(b);
                hashes.push(hash);
            }
        }
        msg.changes = bytes.into();
        cache.hits += 1;
        let signed = chosen.signed;
        return Some((msg, Carried { hashes, signed }));
    }
    // automerge's own message, its changes rebuilt from the document; they
    // are kept, as the next peer is likely to need the same.
    let repeats = repeats(am, state);
    let mut msg = am.generate_sync_message(state)?;
    let weights: Vec<(usize, Option<u64>)> = msg
        .changes
        .iter()
        .map(|c| (c.len(), crate::chunks::values_declared(c)))
        .collect();
    let part = within(weights.iter().copied(), max_bytes);
    // The change in each element (automerge puts one in each; our own
    // message, so it parses: if it ever did not, the peer refuses it).
    let elements: Vec<Vec<ChangeHash>> = msg
        .changes
        .iter()
        .map(|element| {
            let mut found = Vec::new();
            let _ = crate::chunks::hashes_in(element, &mut found);
            found
        })
        .collect();
    let single: Option<Vec<ChangeHash>> = elements
        .iter()
        .map(|found| match found[..] {
            [hash] => Some(hash),
            _ => None,
        })
        .collect();
    let chosen = match &single {
        Some(due) => {
            let bound = || within(weights.iter().copied(), max_bytes.max(VOUCHED_CHANGE_BYTES));
            vouched(am, due, part, bound, vouching)
        }
        // automerge builds one change per element; were it ever otherwise,
        // every signature held goes, as before signatures were left out.
        None => Chosen {
            kept: (0..part).collect(),
            again: Vec::new(),
            signed: elements[..part].iter().flatten().copied().collect(),
        },
    };
    let Chosen {
        kept,
        again,
        signed,
    } = chosen;
    if kept.is_empty()
        && again.is_empty()
        && !msg.changes.is_empty()
        && vouching.may_fall_silent
        && repeats(&msg)
    {
        for hash in elements.into_iter().flatten() {
            state.sent_hashes.remove(&hash);
        }
        return None;
    }
    let mut keep = vec![false; msg.changes.len()];
    for &i in &kept {
        keep[i] = true;
    }
    let mut changes = Vec::with_capacity(kept.len());
    let mut hashes = Vec::new();
    for ((element, found), keep) in msg.changes.iter().zip(elements).zip(keep) {
        if !keep {
            // Not sent after all: automerge counted it as sent.
            for hash in found {
                state.sent_hashes.remove(&hash);
            }
            continue;
        }
        if let [hash] = found[..] {
            cache.insert(hash, element);
        }
        changes.push(element.to_vec());
        hashes.extend(found);
    }
    for hash in again {
        if let Some(b) = rebuilt(am, &hash) {
            changes.push(b);
            hashes.push(hash);
        }
    }
    msg.changes = changes.into();
    if !hashes.is_empty() {
        cache.misses += 1;
    }
    Some((msg, Carried { hashes, signed }))
}

/// Whether a message of this session, built now, would only repeat what
/// the last one said: the same heads, nothing needed. Sent without the
/// changes that were due (none of them vouched for yet, see [`vouched`]),
/// it would only draw the same answer, and that answer the same message:
/// automerge's sessions go back and forth for as long as the two
/// documents differ.
fn repeats(am: &Automerge, state: &sync::State) -> impl Fn(&sync::Message) -> bool + use<> {
    let said = state.have_responded.then(|| state.last_sent_heads.clone());
    let heads = am.get_heads();
    move |msg| said.as_ref() == Some(&heads) && msg.heads == heads && msg.need.is_empty()
}

/// Of `due`, the changes a session sends next in the order they go, which
/// the next message carries, and whose signatures go with them (see
/// [`Vouching`]): the first `part`, and where those hold a change of an
/// author that no signature held vouches for, on to that author's next
/// change whose signature is held, up to the first `bound()`; then
/// without any change still not vouched for and the changes that depend on
/// it. Those go once a signature for them is held (a later change that
/// waits in automerge's queue for its dependencies, say). Returns indices
/// into `due`, in order, and the hashes whose signatures go.
fn vouched(
    am: &Automerge,
    due: &[ChangeHash],
    part: usize,
    bound: impl FnOnce() -> usize,
    vouching: Vouching<'_>,
) -> Chosen {
    let holds = vouching.holds;
    if !vouching.least && due[..part].iter().all(holds) {
        return Chosen {
            kept: (0..part).collect(),
            again: Vec::new(),
            signed: due[..part].to_vec(),
        };
    }
    let meta = |h: &ChangeHash| am.get_change_meta_by_hash(h);
    let mut metas: Vec<(Option<usize>, automerge::ChangeMetadata<'_>)> = due[..part]
        .iter()
        .enumerate()
        .filter_map(|(i, h)| Some((Some(i), meta(h)?)))
        .collect();
    let mut plan = plan_of(&metas, holds);
    if !plan.unvouched.is_empty() {
        // On to each such author's next change whose signature is held,
        // and again for the authors of the changes that brought in.
        let limit = bound().min(due.len());
        let mut ahead: Vec<Option<automerge::ChangeMetadata<'_>>> = Vec::new();
        let mut end = part;
        loop {
            let mut waiting: HashSet<ActorId> = plan
                .unvouched
                .iter()
                .map(|&k| metas[k].1.actor.clone().into_owned())
                .collect();
            let mut reach = end;
            let mut i = end;
            while !waiting.is_empty() && i < limit {
                if i - part == ahead.len() {
                    ahead.push(meta(&due[i]));
                }
                if let Some(m) = &ahead[i - part]
                    && holds(&m.hash)
                    && waiting.remove(m.actor.as_ref())
                {
                    reach = i + 1;
                }
                i += 1;
            }
            if reach == end {
                break;
            }
            for i in end..reach {
                if let Some(m) = ahead[i - part].take() {
                    metas.push((Some(i), m));
                }
            }
            end = reach;
            plan = plan_of(&metas, holds);
            if plan.unvouched.is_empty() {
                break;
            }
        }
    }
    if !plan.unvouched.is_empty() {
        let carried: HashSet<ChangeHash> = metas.iter().map(|(_, m)| m.hash).collect();
        let again = sent_again(am, &metas, &plan.unvouched, &carried, holds);
        if !again.is_empty() {
            metas.extend(again.into_iter().map(|m| (None, m)));
            plan = plan_of(&metas, holds);
        }
    }
    // Without what is still not vouched for, and what depends on it.
    while !plan.unvouched.is_empty() {
        let mut dropped: HashSet<ChangeHash> =
            plan.unvouched.iter().map(|&k| metas[k].1.hash).collect();
        let mut grew = true;
        while grew {
            grew = false;
            for (_, m) in &metas {
                if !dropped.contains(&m.hash) && m.deps.iter().any(|d| dropped.contains(d)) {
                    dropped.insert(m.hash);
                    grew = true;
                }
            }
        }
        metas.retain(|(_, m)| !dropped.contains(&m.hash));
        plan = plan_of(&metas, holds);
    }
    let signed = if vouching.least {
        plan.signed.iter().map(|&k| metas[k].1.hash).collect()
    } else {
        metas.iter().map(|(_, m)| m.hash).filter(holds).collect()
    };
    let mut chosen = Chosen {
        signed,
        ..Chosen::default()
    };
    for (i, m) in metas {
        match i {
            Some(i) => chosen.kept.push(i),
            None => chosen.again.push(m.hash),
        }
    }
    chosen
}

/// What [`vouched`] chose for a message.
#[derive(Debug, Default)]
struct Chosen {
    /// Indices into the changes due.
    kept: Vec<usize>,
    /// Changes sent before that go again (see [`sent_again`]).
    again: Vec<ChangeHash>,
    /// The changes whose signatures go.
    signed: Vec<ChangeHash>,
}

impl Chosen {
    fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.again.is_empty()
    }
}

/// Most changes sent before that one message carries again (see
/// [`sent_again`]).
const MAX_SENT_AGAIN: usize = 4 * vouch::CHECKPOINT as usize;

/// For each author of `unvouched` (indices into `metas`, the changes of a
/// message), the changes between the latest of them and the author's next
/// change whose signature is held, that the message does not carry
/// (`carried`). They were sent before, so they are no longer due: the
/// peer's Bloom filter wrongly showed the unvouched change as held and the
/// rest went and wait in the peer's queue, or the peer asks for the change
/// alone. The peer checks what waits in its queue again, so sent with
/// them, the later signature vouches for it. At most [`MAX_SENT_AGAIN`]
/// changes; none for an author whose next signature lies further on.
fn sent_again<'a>(
    am: &'a Automerge,
    metas: &[(Option<usize>, automerge::ChangeMetadata<'a>)],
    unvouched: &[usize],
    carried: &HashSet<ChangeHash>,
    holds: &dyn Fn(&ChangeHash) -> bool,
) -> Vec<automerge::ChangeMetadata<'a>> {
    let mut latest: HashMap<&ActorId, &automerge::ChangeMetadata<'a>> = HashMap::new();
    for &k in unvouched {
        let m = &metas[k].1;
        let slot = latest.entry(m.actor.as_ref()).or_insert(m);
        if m.seq > slot.seq {
            *slot = m;
        }
    }
    let mut again: Vec<automerge::ChangeMetadata<'a>> = Vec::new();
    let mut taken: HashSet<ChangeHash> = HashSet::new();
    for (actor, change) in latest {
        // Everything after the change, in causal order.
        let later = am.get_changes_meta(&[change.hash]);
        let Some(voucher) = later
            .iter()
            .position(|m| m.actor.as_ref() == actor && holds(&m.hash))
        else {
            continue;
        };
        // What the voucher depends on among them, the change included.
        let index: HashMap<ChangeHash, usize> =
            later.iter().enumerate().map(|(i, m)| (m.hash, i)).collect();
        let mut needed = vec![false; later.len()];
        needed[voucher] = true;
        let mut stack = vec![voucher];
        while let Some(i) = stack.pop() {
            for dep in &later[i].deps {
                if let Some(&j) = index.get(dep)
                    && !needed[j]
                {
                    needed[j] = true;
                    stack.push(j);
                }
            }
        }
        let path: Vec<usize> = (0..later.len())
            .filter(|&i| needed[i] && !carried.contains(&later[i].hash))
            .filter(|&i| !taken.contains(&later[i].hash))
            .collect();
        if again.len() + path.len() > MAX_SENT_AGAIN {
            continue;
        }
        for i in path {
            taken.insert(later[i].hash);
            again.push(later[i].clone());
        }
    }
    again
}

/// The bytes of a change, rebuilt by automerge.
fn rebuilt(am: &Automerge, hash: &ChangeHash) -> Option<Vec<u8>> {
    am.get_change_by_hash(hash).map(|c| c.raw_bytes().to_vec())
}

/// [`vouch::plan`] of a message's changes.
fn plan_of(
    metas: &[(Option<usize>, automerge::ChangeMetadata<'_>)],
    holds: &dyn Fn(&ChangeHash) -> bool,
) -> vouch::Plan {
    let batch: Vec<&automerge::ChangeMetadata<'_>> = metas.iter().map(|(_, m)| m).collect();
    vouch::plan(&batch, holds)
}

/// How many of the changes of the given sizes and declared values (see
/// `chunks::values_declared`) go in one message: the first, and then as
/// many as fit with it within `max_bytes`, [`MAX_DECLARED_VALUES`] and
/// [`MAX_CHANGES_PER_MESSAGE`], which the receiver holds a message to.
fn within(changes: impl Iterator<Item = (usize, Option<u64>)>, max_bytes: usize) -> usize {
    let (mut bytes, mut values, mut count) = (0usize, 0u64, 0usize);
    for (size, declared) in changes {
        bytes += size + SIGNED_HASH_BYTES;
        values = values.saturating_add(declared.unwrap_or(MAX_DECLARED_VALUES));
        if count > 0
            && (bytes > max_bytes
                || values > MAX_DECLARED_VALUES
                || count == MAX_CHANGES_PER_MESSAGE)
        {
            break;
        }
        count += 1;
    }
    count
}

/// Fewest changes a peer must lack for a document to go to it whole: below
/// this, the changes are about as small and as quick to apply.
pub const DOCUMENT_MIN_CHANGES: usize = 32;

/// The next sync message of a session as a whole document (`document(am)`,
/// saved with compressed columns for a peer that reads them, uncompressed
/// otherwise; `None` if it would not pass the receiver's check,
/// `chunks::check_document`), when the peer holds nothing of it but its root
/// change (the genesis every node starts from) and lacks at least
/// [`DOCUMENT_MIN_CHANGES`], and, if `only_by` names an actor, every other
/// change is by that actor, and the document with its signatures takes no
/// more than [`WHOLE_DOCUMENT_BYTES`]; otherwise `None`, and the caller builds the
/// message of changes ([`sync_message`]). Only for peers that read whole
/// documents (`Engine::peer_takes_documents`): the receiver loads it whole
/// instead of applying its changes one by one. automerge builds the rest of
/// the message, as in [`sync_message`], and counts every change the
/// document carries as sent. Returns the message and what it carries:
/// every change but the root, and the signatures that vouch for them (if
/// those held do not vouch for every one, `None`).
pub fn document_message(
    am: &Automerge,
    state: &mut sync::State,
    only_by: Option<&ActorId>,
    vouching: Vouching<'_>,
    document: impl FnOnce(&Automerge) -> Option<Vec<u8>>,
) -> Option<(sync::Message, Carried)> {
    if state.their_capabilities.is_some() || state.peer_read_only {
        return None;
    }
    let root = match state.their_heads.as_deref() {
        Some([root])
            if am
                .get_change_meta_by_hash(root)
                .is_some_and(|m| m.deps.is_empty()) =>
        {
            *root
        }
        _ => return None,
    };
    // What is due and not sent yet (none when automerge must answer with a
    // reset: the peer's last sync point names a change this node lacks).
    let due = hashes_to_send(am, state)?;
    if due.len() < DOCUMENT_MIN_CHANGES {
        return None;
    }
    // Signatures go for every change but the root, whatever the peer's
    // Bloom filter says: a change it wrongly shows as held still travels
    // in the document, and must travel with its signature (the latest of
    // its author's changes has nothing else to vouch for it).
    let metas = am.get_changes_meta(&[]);
    let others = |m: &&automerge::ChangeMetadata<'_>| m.hash != root;
    if let Some(author) = only_by
        && metas
            .iter()
            .filter(others)
            .any(|m| m.actor.as_ref() != author)
    {
        return None;
    }
    let hashes: Vec<ChangeHash> = metas.iter().filter(others).map(|m| m.hash).collect();
    // A document goes whole only if the signatures held vouch for all of it.
    let signed = if vouching.least || !hashes.iter().all(vouching.holds) {
        let batch: Vec<&automerge::ChangeMetadata<'_>> = metas.iter().filter(others).collect();
        let plan = vouch::plan(&batch, vouching.holds);
        if !plan.unvouched.is_empty() {
            return None;
        }
        match vouching.least {
            true => plan.signed.iter().map(|&i| batch[i].hash).collect(),
            false => hashes.iter().copied().filter(vouching.holds).collect(),
        }
    } else {
        hashes.clone()
    };
    let document = document(am)?;
    if document.len() + hashes.len() * SIGNED_HASH_BYTES > WHOLE_DOCUMENT_BYTES {
        // Too large for one message: as changes, a part at a time.
        return None;
    }
    state.peer_read_only = true;
    let msg = am.generate_sync_message(state);
    state.peer_read_only = false;
    let mut msg = msg?;
    state.sent_hashes.extend(hashes.iter().copied());
    msg.changes = vec![document].into();
    Some((msg, Carried { hashes, signed }))
}

/// The changes automerge would send next in this session (its
/// `get_hashes_to_send`, less those already sent), or `None` when automerge
/// must build the message itself: the peer's last sync point names a change
/// this node lacks (a reset).
fn hashes_to_send(am: &Automerge, state: &sync::State) -> Option<Vec<ChangeHash>> {
    let has = |h: &ChangeHash| am.get_change_meta_by_hash(h).is_some();
    let (Some(have), Some(need)) = (&state.their_have, &state.their_need) else {
        return Some(Vec::new());
    };
    if state.peer_read_only {
        return Some(Vec::new());
    }
    if let Some(first) = have.first()
        && !first.last_sync.iter().all(has)
    {
        return None;
    }
    let need: Vec<ChangeHash> = need.iter().filter(|h| has(h)).copied().collect();
    let all = if have.is_empty() {
        need
    } else {
        let mut last_sync: Vec<ChangeHash> = have
            .iter()
            .flat_map(|h| h.last_sync.iter().copied())
            .collect();
        last_sync.sort();
        last_sync.dedup();
        let metas = am.get_changes_meta(&last_sync);
        // Everything after the sync point the peer's filters do not show,
        // and whatever depends on it (the peer cannot apply a change whose
        // dependency it lacks, and a filter can err towards "held").
        let mut send: HashSet<ChangeHash> = HashSet::new();
        let mut dependents: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
        for m in &metas {
            for dep in &m.deps {
                dependents.entry(*dep).or_default().push(m.hash);
            }
            if have.iter().all(|h| !h.bloom.contains_hash(&m.hash)) {
                send.insert(m.hash);
            }
        }
        let mut stack: Vec<ChangeHash> = send.iter().copied().collect();
        while let Some(h) = stack.pop() {
            for d in dependents.get(&h).into_iter().flatten() {
                if send.insert(*d) {
                    stack.push(*d);
                }
            }
        }
        let mut out: Vec<ChangeHash> = need.into_iter().filter(|h| !send.contains(h)).collect();
        out.extend(metas.iter().map(|m| m.hash).filter(|h| send.contains(h)));
        out
    };
    Some(
        all.into_iter()
            .filter(|h| !state.sent_hashes.contains(h))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ROOT, ReadDoc};

    fn doc_with(actor: u8, keys: &[&str]) -> Automerge {
        let mut am = Automerge::new();
        am.set_actor(automerge::ActorId::from(vec![actor; 16]));
        for k in keys {
            am.transact(|tx| tx.put(ROOT, *k, *k).map(|_| ()))
                .expect("a put on a fresh map");
        }
        am
    }

    /// Syncs `a` and `b` until neither has anything to say; returns the
    /// messages that went and how many carried changes from the cache.
    fn sync_pair(
        a: &mut Automerge,
        b: &mut Automerge,
        cache_a: &mut ChangeCache,
        cache_b: &mut ChangeCache,
    ) -> usize {
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let mut messages = 0;
        for _ in 0..20 {
            let m1 = sync_message(a, &mut sa, cache_a, Vouching::ALL);
            if let Some((m, _)) = &m1 {
                b.receive_sync_message(&mut sb, as_sent(m))
                    .expect("applies");
                messages += 1;
            }
            let m2 = sync_message(b, &mut sb, cache_b, Vouching::ALL);
            if let Some((m, _)) = &m2 {
                a.receive_sync_message(&mut sa, as_sent(m))
                    .expect("applies");
                messages += 1;
            }
            if m1.is_none() && m2.is_none() {
                return messages;
            }
        }
        panic!("no quiescence after 20 rounds");
    }

    /// A message as the engine sends it: advertising no capabilities.
    fn as_sent(m: &sync::Message) -> sync::Message {
        let mut m = m.clone();
        m.flags = None;
        m
    }

    fn cache_all(am: &Automerge, cache: &mut ChangeCache) {
        for c in am.get_changes(&[]) {
            cache.insert(c.hash(), c.raw_bytes());
        }
    }

    /// A first sync larger than a message may be goes in parts, each
    /// within the bound and applying on what the peer then holds, whether
    /// the changes come from the cache or automerge rebuilds them.
    #[test]
    fn a_large_first_sync_goes_in_parts_within_the_bound() {
        let big = "x".repeat(10_000);
        for warm in [false, true] {
            let mut a = Automerge::new();
            a.set_actor(automerge::ActorId::from(vec![1; 16]));
            for i in 0..50 {
                a.transact(|tx| tx.put(ROOT, format!("k{i}"), big.as_str()).map(|_| ()))
                    .expect("a put on a fresh map");
            }
            let mut b = Automerge::new();
            let (mut cache_a, mut cache_b) = (ChangeCache::default(), ChangeCache::default());
            if warm {
                cache_all(&a, &mut cache_a);
            }
            let max = 64 * 1024;
            let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
            let mut parts = 0;
            for round in 0.. {
                assert!(round < 100, "no quiescence after 100 rounds");
                let m1 = sync_message_within(&a, &mut sa, &mut cache_a, max, Vouching::ALL);
                if let Some((m, carried)) = &m1 {
                    let hashes = &carried.hashes;
                    let bytes: usize = m.changes.iter().map(<[u8]>::len).sum();
                    assert!(bytes + hashes.len() * SIGNED_HASH_BYTES <= max, "{bytes} B");
                    parts += usize::from(!hashes.is_empty());
                    b.receive_sync_message(&mut sb, as_sent(m))
                        .expect("applies");
                    // Each part applies: nothing waits for a dependency.
                    assert!(b.get_missing_deps(&[]).is_empty());
                }
                let m2 = sync_message_within(&b, &mut sb, &mut cache_b, max, Vouching::ALL);
                if let Some((m, _)) = &m2 {
                    a.receive_sync_message(&mut sa, as_sent(m))
                        .expect("applies");
                }
                if m1.is_none() && m2.is_none() {
                    break;
                }
            }
            assert_eq!(b.get_heads(), a.get_heads(), "warm: {warm}");
            // 50 changes of 10 KB, six to a message of 64 KB.
            assert_eq!(parts, 9, "warm: {warm}");
        }
    }

    /// A change larger than the bound still goes, alone.
    #[test]
    fn a_change_larger_than_a_message_goes_alone() {
        let sized = |sizes: &[usize]| sizes.iter().map(|s| (*s, Some(1))).collect::<Vec<_>>();
        assert_eq!(within(sized(&[100_000, 10, 10]).into_iter(), 64 * 1024), 1);
        assert_eq!(within(sized(&[10, 10, 100_000]).into_iter(), 64 * 1024), 2);
        assert_eq!(within(std::iter::empty(), 64 * 1024), 0);
        // Nor more values than a receiver takes in one message, nor more
        // changes; one change declaring more still goes, alone.
        let half = Some(MAX_DECLARED_VALUES / 2 + 1);
        assert_eq!(within([(70, half), (70, half)].into_iter(), 64 * 1024), 1);
        assert_eq!(
            within(
                [(70, Some(MAX_DECLARED_VALUES + 1)), (70, Some(1))].into_iter(),
                64 * 1024
            ),
            1
        );
        let many = vec![(1, Some(1)); MAX_CHANGES_PER_MESSAGE + 1];
        assert_eq!(
            within(many.into_iter(), usize::MAX),
            MAX_CHANGES_PER_MESSAGE
        );
    }

    #[test]
    fn cached_and_rebuilt_messages_converge_the_same() {
        for warm in [false, true] {
            let mut a = doc_with(1, &["x", "y", "z"]);
            let mut b = doc_with(2, &["p", "q"]);
            let (mut ca, mut cb) = (ChangeCache::default(), ChangeCache::default());
            if warm {
                cache_all(&a, &mut ca);
                cache_all(&b, &mut cb);
            }
            sync_pair(&mut a, &mut b, &mut ca, &mut cb);
            assert_eq!(a.get_heads(), b.get_heads(), "warm={warm}");
            for k in ["x", "y", "z", "p", "q"] {
                assert!(a.get(ROOT, k).expect("reads").is_some(), "{k} in a");
                assert!(b.get(ROOT, k).expect("reads").is_some(), "{k} in b");
            }
        }
    }

    #[test]
    fn a_warm_cache_carries_the_same_changes_automerge_would_rebuild() {
        let a = doc_with(1, &["x", "y", "z"]);
        let b = doc_with(2, &[]);
        // A first exchange, so the next message from `a` carries changes.
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let hello_a = as_sent(&a.generate_sync_message(&mut sa).expect("a says hello"));
        let hello_b = as_sent(&b.generate_sync_message(&mut sb).expect("b says hello"));
        let mut b2 = b.clone();
        b2.receive_sync_message(&mut sb, hello_a).expect("applies");
        let mut a_plain = a.clone();
        let mut sa_plain = sa.clone();
        a_plain
            .receive_sync_message(&mut sa_plain, hello_b.clone())
            .expect("applies");
        let mut sa_cached = sa.clone();
        let mut a_cached = a.clone();
        a_cached
            .receive_sync_message(&mut sa_cached, hello_b)
            .expect("applies");

        let plain = a_plain
            .generate_sync_message(&mut sa_plain)
            .expect("changes are due");
        let mut cache = ChangeCache::default();
        cache_all(&a, &mut cache);
        let (cached, carried) = sync_message(&a_cached, &mut sa_cached, &mut cache, Vouching::ALL)
            .expect("changes are due");
        assert_eq!(carried.hashes.len(), 3);
        assert_eq!(cache.hits_and_misses(), (1, 0), "built from the cache");
        let plain_changes: Vec<Vec<u8>> = plain.changes.iter().map(<[u8]>::to_vec).collect();
        let cached_changes: Vec<Vec<u8>> = cached.changes.iter().map(<[u8]>::to_vec).collect();
        assert_eq!(plain_changes, cached_changes);
        assert_eq!(plain.heads, cached.heads);
        assert_eq!(plain.need, cached.need);
        assert_eq!(sa_plain.sent_hashes, sa_cached.sent_hashes);
    }

    #[test]
    fn a_cold_cache_falls_back_and_is_warmed() {
        let mut a = doc_with(1, &["x", "y"]);
        let mut b = doc_with(2, &[]);
        let (mut ca, mut cb) = (ChangeCache::default(), ChangeCache::default());
        sync_pair(&mut a, &mut b, &mut ca, &mut cb);
        assert_eq!(a.get_heads(), b.get_heads());
        assert_eq!(ca.hits_and_misses(), (0, 1), "built by automerge");
        for c in a.get_changes(&[]) {
            if c.actor_id() == &automerge::ActorId::from(vec![1u8; 16]) {
                assert_eq!(ca.get(&c.hash()), Some(c.raw_bytes()), "kept after sending");
            }
        }
    }

    #[test]
    fn the_budget_evicts_the_oldest() {
        let am = doc_with(1, &["a", "b", "c", "d"]);
        let changes = am.get_changes(&[]);
        let one = changes[0].raw_bytes().len();
        let mut cache = ChangeCache::with_budget(one * 2 + one / 2);
        for c in &changes {
            cache.insert(c.hash(), c.raw_bytes());
        }
        assert!(cache.held() <= one * 2 + one / 2);
        assert!(cache.get(&changes[0].hash()).is_none());
        assert!(cache.get(&changes[3].hash()).is_some());
    }

    /// `a`'s changes, latest last, with the sequence numbers 1 to `n` of
    /// its one author.
    fn by_seq(a: &Automerge) -> Vec<ChangeHash> {
        a.get_changes(&[]).iter().map(|c| c.hash()).collect()
    }

    /// Syncs `a` to a fresh document, a message at a time, `a` holding the
    /// signatures `held` and sending the least of them. Checks that every
    /// message's signatures are held and vouch for all it carries, as the
    /// receiver checks them; returns what each message with changes carried.
    fn sync_vouched(
        a: &Automerge,
        b: &mut Automerge,
        sa: &mut sync::State,
        sb: &mut sync::State,
        held: &HashSet<ChangeHash>,
        max: usize,
        warm: bool,
    ) -> Vec<Carried> {
        let mut cache_a = ChangeCache::default();
        if warm {
            cache_all(a, &mut cache_a);
        }
        let vouching = Vouching {
            holds: &|h| held.contains(h),
            least: true,
            may_fall_silent: true,
        };
        let mut carried_all = Vec::new();
        for round in 0.. {
            assert!(round < 100, "no quiescence after 100 rounds");
            let m1 = sync_message_within(a, sa, &mut cache_a, max, vouching);
            if let Some((m, carried)) = m1.as_ref() {
                let metas: Vec<automerge::ChangeMetadata<'_>> = carried
                    .hashes
                    .iter()
                    .map(|h| a.get_change_meta_by_hash(h).expect("a's own"))
                    .collect();
                let batch: Vec<&automerge::ChangeMetadata<'_>> = metas.iter().collect();
                let plan = vouch::plan(&batch, |h| carried.signed.contains(h));
                assert!(plan.unvouched.is_empty(), "round {round}: {plan:?}");
                assert!(carried.signed.iter().all(|h| held.contains(h)));
                b.receive_sync_message(sb, as_sent(m)).expect("applies");
            }
            let m2 = sync_message_within(b, sb, &mut ChangeCache::default(), max, Vouching::ALL);
            if let Some((m, _)) = &m2 {
                a.clone()
                    .receive_sync_message(sa, as_sent(m))
                    .expect("applies");
            }
            match m1 {
                Some((_, carried)) if !carried.hashes.is_empty() => carried_all.push(carried),
                None if m2.is_none() => break,
                _ => {}
            }
        }
        carried_all
    }

    /// A node that was sent a long run of one author's changes holds the
    /// signatures of the run's last change and of every checkpoint: each
    /// part it sends on reaches up to one of them, past the bound if need
    /// be, and goes with that one signature alone.
    #[test]
    fn a_relay_cuts_its_parts_at_the_signatures_it_holds() {
        let big = "x".repeat(2_000);
        let mut a = Automerge::new();
        a.set_actor(automerge::ActorId::from(vec![1; 16]));
        for i in 0..600 {
            a.transact(|tx| tx.put(ROOT, format!("k{i}"), big.as_str()).map(|_| ()))
                .expect("a put on a fresh map");
        }
        let hashes = by_seq(&a);
        let at = |seq: u64| hashes[seq as usize - 1];
        let held: HashSet<ChangeHash> = [at(256), at(512), at(600)].into();
        for warm in [false, true] {
            let mut b = Automerge::new();
            let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
            let sent = sync_vouched(&a, &mut b, &mut sa, &mut sb, &held, 64 * 1024, warm);
            assert_eq!(b.get_heads(), a.get_heads(), "warm: {warm}");
            // About 30 changes fit the bound; each part goes on to the
            // next signature held.
            let lasts: Vec<ChangeHash> = sent
                .iter()
                .filter_map(|c| c.hashes.last().copied())
                .collect();
            assert_eq!(lasts, vec![at(256), at(512), at(600)], "warm: {warm}");
            let signed: Vec<&[ChangeHash]> = sent.iter().map(|c| &c.signed[..]).collect();
            assert_eq!(
                signed,
                [&[at(256)][..], &[at(512)], &[at(600)]],
                "warm: {warm}"
            );
        }
        // Holding every signature, the parts keep to the bound, each with
        // its last change's signature, and the checkpoint's within it.
        let every: HashSet<ChangeHash> = hashes.iter().copied().collect();
        let mut b = Automerge::new();
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let sent = sync_vouched(&a, &mut b, &mut sa, &mut sb, &every, 64 * 1024, true);
        assert_eq!(b.get_heads(), a.get_heads());
        assert!(sent.len() > 15, "{} parts", sent.len());
        let checkpoint = sent
            .iter()
            .find(|c| c.hashes.contains(&at(256)))
            .expect("sent");
        assert_eq!(
            checkpoint.signed.len(),
            1 + usize::from(checkpoint.hashes.last() != Some(&at(256)))
        );
        assert!(checkpoint.signed.contains(&at(256)));
    }

    /// Changes that no signature held vouches for (their author's later
    /// change waits in automerge's queue, say) stay back, uncounted as
    /// sent, and the session falls silent rather than repeat itself; they
    /// go once a later change comes with its signature.
    #[test]
    fn changes_nothing_held_vouches_for_wait_until_something_does() {
        let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut a = doc_with(1, &keys);
        let hashes = by_seq(&a);
        let mut b = Automerge::new();
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let held: HashSet<ChangeHash> = [hashes[4]].into();
        let sent = sync_vouched(&a, &mut b, &mut sa, &mut sb, &held, 1 << 20, true);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].hashes, hashes[..5]);
        assert_eq!(sent[0].signed, [hashes[4]]);
        assert_eq!(b.get_heads(), vec![hashes[4]]);
        assert!(hashes[5..].iter().all(|h| !sa.sent_hashes.contains(h)));
        // The later change comes (here: is written), with its signature.
        a.transact(|tx| tx.put(ROOT, "k10", "k10").map(|_| ()))
            .expect("a put");
        let hashes = by_seq(&a);
        let held: HashSet<ChangeHash> = [hashes[4], hashes[10]].into();
        let sent = sync_vouched(&a, &mut b, &mut sa, &mut sb, &held, 1 << 20, true);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].hashes, hashes[5..]);
        assert_eq!(sent[0].signed, [hashes[10]]);
        assert_eq!(b.get_heads(), a.get_heads());
    }

    /// Going on to one author's next signature brings in changes of
    /// another whose own signature held lies further on: the part goes on
    /// to that one too, rather than leave both behind.
    #[test]
    fn a_part_goes_on_to_every_author_it_brings_in() {
        let big = "x".repeat(2_000);
        let put = |am: &mut Automerge, k: String| {
            am.transact(|tx| tx.put(ROOT, k, big.as_str()).map(|_| ()))
                .expect("a put on a fresh map");
        };
        let mut a = Automerge::new();
        a.set_actor(automerge::ActorId::from(vec![1; 16]));
        for i in 0..30 {
            put(&mut a, format!("a{i}"));
        }
        let mut b = a.fork().with_actor(automerge::ActorId::from(vec![2; 16]));
        for i in 0..10 {
            put(&mut b, format!("b{i}"));
        }
        a.merge(&mut b).expect("merges");
        put(&mut a, "a30".into());
        b.merge(&mut a).expect("merges");
        for i in 10..20 {
            put(&mut b, format!("b{i}"));
        }
        a.merge(&mut b).expect("merges");
        // Held: a's 31st change and b's 20th, each the last of its author.
        let last = |actor: u8| {
            a.get_changes_meta(&[])
                .iter()
                .rev()
                .find(|m| m.actor.to_bytes() == [actor; 16])
                .map(|m| m.hash)
                .expect("changes")
        };
        let held: HashSet<ChangeHash> = [last(1), last(2)].into();
        for warm in [false, true] {
            let mut peer = Automerge::new();
            let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
            let sent = sync_vouched(&a, &mut peer, &mut sa, &mut sb, &held, 64 * 1024, warm);
            assert_eq!(peer.get_heads(), a.get_heads(), "warm: {warm}");
            assert_eq!(sent.len(), 1, "warm: {warm}");
            assert_eq!(sent[0].hashes.len(), 51);
        }
    }

    /// A peer's Bloom filter wrongly showed a change as held: the changes
    /// after it went, and wait in the peer's queue; the peer asks for the
    /// change alone. A node that holds only the latest signature sends it
    /// again with what lies between, up to that signature.
    #[test]
    fn a_change_asked_for_alone_goes_with_the_changes_up_to_its_voucher() {
        let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let a = doc_with(1, &keys);
        let hashes = by_seq(&a);
        let mut b = Automerge::new();
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let mut cache = ChangeCache::default();
        cache_all(&a, &mut cache);
        let (hello, _) = sync_message(&b, &mut sb, &mut cache, Vouching::ALL).expect("hello");
        a.clone()
            .receive_sync_message(&mut sa, as_sent(&hello))
            .expect("applies");
        let (mut all, _) = sync_message(&a, &mut sa, &mut cache, Vouching::ALL).expect("changes");
        // The second change stays out, as if the filter had shown it held.
        let kept: Vec<Vec<u8>> = all
            .changes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, c)| c.to_vec())
            .collect();
        all.changes = kept.into();
        sa.sent_hashes.remove(&hashes[1]);
        b.receive_sync_message(&mut sb, as_sent(&all))
            .expect("queues");
        assert_eq!(b.get_heads(), [hashes[0]]);
        let (asks, _) = sync_message(&b, &mut sb, &mut cache, Vouching::ALL).expect("asks");
        assert_eq!(asks.need, [hashes[1]]);
        a.clone()
            .receive_sync_message(&mut sa, as_sent(&asks))
            .expect("applies");
        let held: HashSet<ChangeHash> = [hashes[9]].into();
        let vouching = Vouching {
            holds: &|h| held.contains(h),
            least: true,
            may_fall_silent: true,
        };
        for mut cache in [ChangeCache::default(), cache] {
            let (mut sa, mut sb, mut b) = (sa.clone(), sb.clone(), b.clone());
            let (m, carried) = sync_message(&a, &mut sa, &mut cache, vouching).expect("the change");
            assert_eq!(carried.hashes, hashes[1..]);
            assert_eq!(carried.signed, [hashes[9]]);
            b.receive_sync_message(&mut sb, as_sent(&m))
                .expect("applies");
            assert_eq!(b.get_heads(), a.get_heads());
        }
    }
}
