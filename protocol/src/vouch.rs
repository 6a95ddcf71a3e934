//! Which signatures a message of changes needs.
//!
//! Every change but a document's genesis carries its author's signature
//! (see `authorship`). A change's hash covers the hashes of its
//! dependencies, so an author's signature on one change also fixes every
//! change below it: a receiver takes an author's signed change as vouching
//! for the author's earlier changes among its ancestors in the same message
//! (`engine::Engine::check_authors`), so one signature per author and
//! message is enough, besides the checkpoints ([`plan`]).
//!
//! A node keeps the signatures it was sent, and no more: of a run of an
//! author's changes it was sent vouched for, it holds the signature of the
//! run's last change, and of every [`CHECKPOINT`]-th. So what it relays of
//! the run must reach up to one of those, or the receiver would refuse it.
//! `change_cache` makes sure of that when it cuts a message ([`plan`] says
//! which changes nothing vouches for yet). The centre, which relays every
//! change, is sent every signature (`replicator`).

use std::collections::HashMap;

use automerge::{ActorId, ChangeHash};

/// Every change of an author whose sequence number is a multiple of this
/// keeps its own signature on the wire, though a later change vouches for
/// it: a node that relays part of a long run of changes it was sent
/// vouched for then needs to carry at most this many more of them to reach
/// a signature it holds (if they fit `change_cache::VOUCHED_CHANGE_BYTES`;
/// otherwise what lies beyond stays back, see `docs/security.md`).
pub const CHECKPOINT: u64 = 256;

/// What the authorship check reads of a change: a parsed change, or a
/// loaded document's metadata of one.
pub(crate) trait Authored {
    fn hash(&self) -> ChangeHash;
    fn actor(&self) -> &ActorId;
    fn seq(&self) -> u64;
    fn deps(&self) -> &[ChangeHash];
}

impl Authored for automerge::Change {
    fn hash(&self) -> ChangeHash {
        automerge::Change::hash(self)
    }
    fn actor(&self) -> &ActorId {
        self.actor_id()
    }
    fn seq(&self) -> u64 {
        automerge::Change::seq(self)
    }
    fn deps(&self) -> &[ChangeHash] {
        automerge::Change::deps(self)
    }
}

impl Authored for automerge::ChangeMetadata<'_> {
    fn hash(&self) -> ChangeHash {
        self.hash
    }
    fn actor(&self) -> &ActorId {
        &self.actor
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn deps(&self) -> &[ChangeHash] {
        &self.deps
    }
}

/// Indices of `batch`, each author's changes latest first (by sequence
/// number), so a signature checked early vouches for what comes after.
pub(crate) fn vouched_order<C: Authored>(batch: &[&C]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by(|a, b| batch[*b].seq().cmp(&batch[*a].seq()));
    order
}

/// Walks a batch of changes down their dependencies, to find the earlier
/// changes of an author that a signed change of theirs vouches for.
pub(crate) struct Ancestry<'a, C> {
    batch: &'a [&'a C],
    index: HashMap<ChangeHash, usize>,
    /// Per author, the changes already walked from one of their changes:
    /// what lies below those was found then, so no change is walked twice
    /// per author (the walk stays linear in the batch).
    walked: HashMap<ActorId, Vec<bool>>,
}

impl<'a, C: Authored> Ancestry<'a, C> {
    pub(crate) fn new(batch: &'a [&'a C]) -> Self {
        let index = batch
            .iter()
            .enumerate()
            .map(|(i, c)| (c.hash(), i))
            .collect();
        Self {
            batch,
            index,
            walked: HashMap::new(),
        }
    }

    /// The changes of the batch by the author of `batch[top]` that
    /// `batch[top]` depends on, directly or through other changes of the
    /// batch (not those found by an earlier call for the same author).
    pub(crate) fn same_author_below(&mut self, top: usize) -> Vec<usize> {
        let batch = self.batch;
        let author = batch[top].actor();
        let walked = self
            .walked
            .entry(author.clone())
            .or_insert_with(|| vec![false; batch.len()]);
        let mut found = Vec::new();
        if walked[top] {
            return found;
        }
        walked[top] = true;
        let mut stack = vec![top];
        while let Some(i) = stack.pop() {
            for dep in batch[i].deps() {
                if let Some(&j) = self.index.get(dep)
                    && !walked[j]
                {
                    walked[j] = true;
                    if batch[j].actor() == author {
                        found.push(j);
                    }
                    stack.push(j);
                }
            }
        }
        found
    }
}

/// Which signatures a batch of changes needs, from those a node holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Indices of the changes whose own signature goes with the batch:
    /// those that vouch for the rest (each author's latest, and any
    /// earlier one the latest does not reach), and those at a
    /// [`CHECKPOINT`]. Latest first, per author.
    pub signed: Vec<usize>,
    /// Indices of the changes that nothing the node holds vouches for:
    /// neither is their own signature held, nor that of a later change of
    /// their author in the batch that depends on them. A change without
    /// dependencies whose signature is not held is taken for a document's
    /// genesis, which needs none, and is not among them (any other such
    /// change is refused by the receiver, as it was before).
    pub unvouched: Vec<usize>,
}

/// Which of the signatures that `holds` says this node has `batch` needs,
/// as a receiver checks it: walking each author's changes latest first, a
/// change not vouched for yet goes with its own signature, which then
/// vouches for the author's earlier changes below it.
pub(crate) fn plan<C: Authored>(batch: &[&C], holds: impl Fn(&ChangeHash) -> bool) -> Plan {
    let mut plan = Plan::default();
    let mut vouched = vec![false; batch.len()];
    let mut ancestry = Ancestry::new(batch);
    for i in vouched_order(batch) {
        let change = batch[i];
        let held = holds(&change.hash());
        if vouched[i] {
            if held && change.seq().is_multiple_of(CHECKPOINT) {
                plan.signed.push(i);
            }
            continue;
        }
        if !held {
            // A document's genesis needs no signature; any other change
            // without dependencies does, and is refused without one.
            if !change.deps().is_empty() {
                plan.unvouched.push(i);
            }
            continue;
        }
        plan.signed.push(i);
        for j in ancestry.same_author_below(i) {
            vouched[j] = true;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ROOT};

    /// `n` changes by one actor, the first without dependencies.
    fn changes(n: u64) -> Vec<automerge::Change> {
        let mut am = Automerge::new();
        am.set_actor(ActorId::from(vec![7; 16]));
        for i in 0..n {
            am.transact(|tx| tx.put(ROOT, format!("k{i}"), i).map(|_| ()))
                .expect("a put on a fresh map");
        }
        am.get_changes(&[])
    }

    #[test]
    fn the_latest_change_vouches_for_the_rest_and_checkpoints_keep_their_own() {
        let all = changes(600);
        let batch: Vec<&automerge::Change> = all.iter().collect();
        let signed = plan(&batch, |_| true);
        assert!(signed.unvouched.is_empty());
        let seqs: Vec<u64> = signed.signed.iter().map(|&i| batch[i].seq()).collect();
        assert_eq!(seqs, [600, 512, 256]);
        // Without the latest change's signature, nothing vouches for it;
        // the one before it vouches for the rest.
        let latest = batch[599].hash();
        let without = plan(&batch, |h| *h != latest);
        assert_eq!(without.unvouched, [599]);
        assert_eq!(batch[without.signed[0]].seq(), 599);
    }

    /// A change without dependencies goes with its signature when it is
    /// held (only a document's genesis needs none), and without one is
    /// taken for the genesis.
    #[test]
    fn a_change_without_dependencies_is_signed_when_its_signature_is_held() {
        let all = changes(1);
        let batch: Vec<&automerge::Change> = all.iter().collect();
        assert!(batch[0].deps().is_empty());
        assert_eq!(plan(&batch, |_| true).signed, [0]);
        assert_eq!(plan(&batch, |_| false), Plan::default());
    }
}
