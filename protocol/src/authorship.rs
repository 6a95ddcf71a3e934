//! Who wrote a change, and may they: every change's actor id is its author's
//! ed25519 public key, every change carries its author's signature over its
//! hash, and a change is accepted only if its author is a writer of the
//! document (`city`: the centre; `quarter/<slug>`: that quarter's writer
//! nodes on the roster). A relay (the centre) passes signatures on unchanged,
//! so it can neither alter nor invent another node's changes.
//!
//! A change's hash covers the hashes of the changes it depends on, so an
//! author's signature over its latest change vouches for every earlier
//! change of that author it builds on. The engine uses that: of a batch of
//! changes it verifies the signature of each author's latest change and
//! accepts that author's earlier changes in the batch if they are among its
//! ancestors (see `engine`), which makes catching up on a thousand changes
//! cost one signature check instead of a thousand.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::{ActorId, Change, ChangeHash};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use crate::ids::{DocId, QuarterSlug};
use crate::schema;

/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Signs this node's changes.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("actor", &self.actor())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from the 32-byte ed25519 secret key.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// The actor id this signer writes as: its public key.
    pub fn actor(&self) -> ActorId {
        ActorId::from(&self.key.verifying_key().to_bytes()[..])
    }

    pub fn sign(&self, hash: &ChangeHash) -> Vec<u8> {
        self.key.sign(hash.as_ref()).to_bytes().to_vec()
    }
}

/// Checks `sig` over `hash` against the key that `actor` is.
pub fn verify(actor: &ActorId, hash: &ChangeHash, sig: &[u8]) -> bool {
    let Ok(key_bytes) = <[u8; 32]>::try_from(actor.to_bytes()) else {
        return false;
    };
    let Ok(key) = VerifyingKey::from_bytes(&key_bytes) else {
        return false;
    };
    let Ok(sig) = <[u8; SIGNATURE_LEN]>::try_from(sig) else {
        return false;
    };
    key.verify_strict(hash.as_ref(), &Signature::from_bytes(&sig))
        .is_ok()
}

/// The signatures a node holds, by the hash of the change each signs.
///
/// The centre holds one for every change of the city (640,000 at 64
/// quarters of 10,000 concerns), so this is kept compact: the signatures
/// sit side by side in one vector, and the map holds an index into it,
/// about 130 bytes a signature against about 170 for a map to a byte
/// vector per signature (`docs/benchmarks.md`, "Where the centre's memory
/// goes"). Signatures are only ever added.
#[derive(Debug, Default)]
pub struct SignatureTable {
    index: HashMap<ChangeHash, usize>,
    sigs: Vec<[u8; SIGNATURE_LEN]>,
}

impl SignatureTable {
    /// Keeps `sig` for `hash`, in place of one held for it before. A
    /// signature that is not [`SIGNATURE_LEN`] bytes cannot be an ed25519
    /// signature and is not kept: `false` says so.
    pub fn insert(&mut self, hash: ChangeHash, sig: &[u8]) -> bool {
        let Ok(sig) = <[u8; SIGNATURE_LEN]>::try_from(sig) else {
            return false;
        };
        match self.index.get(&hash) {
            Some(&i) => {
                if let Some(held) = self.sigs.get_mut(i) {
                    *held = sig;
                }
            }
            None => {
                self.index.insert(hash, self.sigs.len());
                self.sigs.push(sig);
            }
        }
        true
    }

    pub fn get(&self, hash: &ChangeHash) -> Option<&[u8; SIGNATURE_LEN]> {
        self.index.get(hash).and_then(|&i| self.sigs.get(i))
    }

    pub fn contains(&self, hash: &ChangeHash) -> bool {
        self.index.contains_key(hash)
    }

    pub fn len(&self) -> usize {
        self.sigs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sigs.is_empty()
    }

    /// Every signature held, with its hash, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (ChangeHash, &[u8; SIGNATURE_LEN])> {
        self.index
            .iter()
            .filter_map(|(hash, &i)| self.sigs.get(i).map(|sig| (*hash, sig)))
    }

    /// Takes in every signature of `other`; where both hold one for a
    /// hash, `other`'s is kept.
    pub fn absorb(&mut self, other: &SignatureTable) {
        for (hash, sig) in other.iter() {
            self.insert(hash, sig);
        }
    }
}

/// Why a change was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorError {
    #[error("change {hash} in {doc} is by {actor}, who is not a writer of {doc}")]
    NotAWriter {
        doc: DocId,
        actor: String,
        hash: ChangeHash,
    },
    #[error("change {hash} in {doc} carries no signature of its author")]
    Unsigned { doc: DocId, hash: ChangeHash },
    #[error("change {hash} in {doc} has a signature that does not verify against its author's key")]
    BadSignature { doc: DocId, hash: ChangeHash },
    #[error("change {hash} in {doc} claims to be the genesis change but is not")]
    FakeGenesis { doc: DocId, hash: ChangeHash },
}

/// Which actors may write which document.
#[derive(Debug, Clone)]
pub struct Writers {
    center: BTreeSet<ActorId>,
    quarters: BTreeMap<QuarterSlug, BTreeSet<ActorId>>,
    /// Changes by removed keys that stay acceptable, per quarter.
    retired: BTreeMap<QuarterSlug, BTreeSet<ChangeHash>>,
    genesis: BTreeMap<DocId, (ActorId, ChangeHash)>,
}

impl Writers {
    /// The centre's actors write `city`; quarters get writers via [`Writers::set_quarters`].
    pub fn new(center: impl IntoIterator<Item = ActorId>) -> Self {
        Self {
            center: center.into_iter().collect(),
            quarters: BTreeMap::new(),
            retired: BTreeMap::new(),
            genesis: BTreeMap::new(),
        }
    }

    /// Replaces the quarters' writer sets (from the roster); says whether
    /// anything changed.
    pub fn set_quarters(&mut self, quarters: BTreeMap<QuarterSlug, BTreeSet<ActorId>>) -> bool {
        let changed = self.quarters != quarters;
        self.quarters = quarters;
        changed
    }

    /// Replaces the changes of removed keys that stay acceptable; says
    /// whether anything changed.
    pub fn set_retired(&mut self, retired: BTreeMap<QuarterSlug, BTreeSet<ChangeHash>>) -> bool {
        let changed = self.retired != retired;
        self.retired = retired;
        changed
    }

    fn retired_change(&self, doc: &DocId, hash: &ChangeHash) -> bool {
        doc.quarter_slug()
            .and_then(|q| self.retired.get(q))
            .is_some_and(|set| set.contains(hash))
    }

    pub fn may_write(&self, doc: &DocId, actor: &ActorId) -> bool {
        match doc {
            DocId::City => self.center.contains(actor),
            DocId::Quarter(q) => self.quarters.get(q).is_some_and(|w| w.contains(actor)),
        }
    }

    fn genesis_of(&mut self, doc: &DocId) -> (ActorId, ChangeHash) {
        self.genesis
            .entry(doc.clone())
            .or_insert_with(|| {
                let am = schema::genesis(doc);
                let change = am.get_changes(&[]).into_iter().next();
                let hash = change
                    .as_ref()
                    .map(|c| c.hash())
                    .unwrap_or_else(|| ChangeHash([0; 32]));
                let actor = change
                    .map(|c| c.actor_id().clone())
                    .unwrap_or_else(|| ActorId::from(&[0u8][..]));
                (actor, hash)
            })
            .clone()
    }

    /// Checks who wrote one change of `doc`: the document's genesis change,
    /// or a change whose actor is a writer of `doc` (or a retired writer's
    /// change that stays acceptable). Says whether the change needs its
    /// author's signature (every change but the genesis does; see
    /// [`Writers::check_signature`]).
    pub fn check_author(&mut self, doc: &DocId, change: &Change) -> Result<bool, AuthorError> {
        self.check_author_of(doc, change.actor_id(), change.hash())
    }

    /// [`Writers::check_author`] for the change with `hash` by `actor`, as
    /// a loaded document's metadata names them.
    pub fn check_author_of(
        &mut self,
        doc: &DocId,
        actor: &ActorId,
        hash: ChangeHash,
    ) -> Result<bool, AuthorError> {
        let (genesis_actor, genesis_hash) = self.genesis_of(doc);
        if actor == &genesis_actor {
            return if hash == genesis_hash {
                Ok(false)
            } else {
                Err(AuthorError::FakeGenesis {
                    doc: doc.clone(),
                    hash,
                })
            };
        }
        if !self.may_write(doc, actor) && !self.retired_change(doc, &hash) {
            return Err(AuthorError::NotAWriter {
                doc: doc.clone(),
                actor: actor.to_hex_string(),
                hash,
            });
        }
        Ok(true)
    }

    /// Checks `sig`, the signature that came with a change of `doc`, against
    /// the change's author (its actor id).
    pub fn check_signature(
        doc: &DocId,
        change: &Change,
        sig: Option<&[u8]>,
    ) -> Result<(), AuthorError> {
        Self::check_signature_of(doc, change.actor_id(), change.hash(), sig)
    }

    /// [`Writers::check_signature`] for the change with `hash` by `actor`.
    pub fn check_signature_of(
        doc: &DocId,
        actor: &ActorId,
        hash: ChangeHash,
        sig: Option<&[u8]>,
    ) -> Result<(), AuthorError> {
        match sig {
            None => Err(AuthorError::Unsigned {
                doc: doc.clone(),
                hash,
            }),
            Some(sig) if verify(actor, &hash, sig) => Ok(()),
            Some(_) => Err(AuthorError::BadSignature {
                doc: doc.clone(),
                hash,
            }),
        }
    }

    /// Checks one change of `doc` whole: its author, then its signature.
    pub fn check(
        &mut self,
        doc: &DocId,
        change: &Change,
        sig: Option<&[u8]>,
    ) -> Result<(), AuthorError> {
        if self.check_author(doc, change)? {
            Self::check_signature(doc, change, sig)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_their_key_and_hash() {
        let a = Signer::from_secret([1; 32]);
        let b = Signer::from_secret([2; 32]);
        let hash = ChangeHash([7; 32]);
        let sig = a.sign(&hash);
        assert!(verify(&a.actor(), &hash, &sig));
        assert!(!verify(&b.actor(), &hash, &sig));
        assert!(!verify(&a.actor(), &ChangeHash([8; 32]), &sig));
        assert!(!verify(&a.actor(), &hash, &sig[..63]));
        assert!(!verify(&ActorId::from(&[1u8, 2, 3][..]), &hash, &sig));
    }

    #[test]
    fn the_signature_table_keeps_whole_signatures_by_hash() {
        let signer = Signer::from_secret([1; 32]);
        let (h1, h2) = (ChangeHash([1; 32]), ChangeHash([2; 32]));
        let mut table = SignatureTable::default();
        assert!(table.is_empty());
        assert!(table.insert(h1, &signer.sign(&h1)));
        assert!(!table.insert(h2, &[0; 63]), "63 bytes are not a signature");
        assert!(!table.contains(&h2));
        assert_eq!(table.len(), 1);
        assert!(verify(&signer.actor(), &h1, table.get(&h1).expect("held")));

        // A second signature for the same hash replaces the first.
        assert!(table.insert(h1, &[9; SIGNATURE_LEN]));
        assert_eq!(table.len(), 1);
        assert_eq!(table.get(&h1), Some(&[9; SIGNATURE_LEN]));

        let mut other = SignatureTable::default();
        assert!(other.insert(h2, &signer.sign(&h2)));
        assert!(other.insert(h1, &signer.sign(&h1)));
        table.absorb(&other);
        assert_eq!(table.len(), 2);
        for hash in [h1, h2] {
            assert!(verify(
                &signer.actor(),
                &hash,
                table.get(&hash).expect("held")
            ));
        }
        let mut listed: Vec<ChangeHash> = table.iter().map(|(h, _)| h).collect();
        listed.sort();
        assert_eq!(listed, vec![h1, h2]);
    }
}
