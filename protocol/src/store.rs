//! The durable store: sled behind one narrow interface, so the engine can be
//! replaced without touching the daemon.
//!
//! Layout (one sled tree each):
//! - `snapshots`: doc id → the document saved whole (compacted form);
//! - `changes`:   doc id, 0, 8-byte id → the changes one commit added to the
//!   document (one local write or one received message), concatenated as
//!   automerge loads them: one sled entry per message, not per change;
//! - `sync`:      peer, 0, doc id → encoded automerge sync state;
//! - `sigs`:      0xff, 8-byte id → the signatures one commit added, each
//!   as change hash (32 bytes), length (2 bytes, big-endian), signature
//!   (stores written before this layout hold change hash → signature);
//! - `local`:     key → value, node-local data that is never replicated.
//!
//! Durability: sled's `flush` writes its log with `sync_file_range` on Linux,
//! which neither persists file metadata nor flushes the disk cache (sled issue
//! 1452), and it never fsyncs the files of large values in `blobs/`. So every
//! acknowledged write also `fsync`s the log file, new blob files and their
//! directory before [`Store::commit`] returns.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use automerge::ChangeHash;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::authorship::SignatureTable;
use crate::ids::DocId;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path} is in use by another process (sled: {source})")]
    Locked { path: String, source: sled::Error },
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
    #[error("store i/o error while making data durable: {0}")]
    Io(#[from] std::io::Error),
    #[error("store holds a malformed key in tree {tree}")]
    BadKey { tree: &'static str },
    #[error("store holds a malformed value in tree {tree}")]
    BadValue { tree: &'static str },
    #[error("a backup names an unknown store tree {0:?}; it was made by another version of iq")]
    UnknownTree(String),
}

/// A change hash and its author's signature, as stored.
pub type StoredSignature = ([u8; 32], Vec<u8>);

/// Everything one commit makes durable together.
#[derive(Debug, Default)]
pub struct Batch {
    pub changes: Vec<(DocId, Vec<Vec<u8>>)>,
    /// (peer, doc, encoded sync state)
    pub sync_states: Vec<(String, DocId, Vec<u8>)>,
    /// (change hash, signature)
    pub signatures: Vec<StoredSignature>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.sync_states.is_empty() && self.signatures.is_empty()
    }
}

/// A document as stored: its snapshot (if compacted) and later change chunks.
#[derive(Debug)]
pub struct StoredDoc {
    pub id: DocId,
    pub chunks: Vec<Vec<u8>>,
    /// Whether the first of `chunks` is the document's snapshot (the rest
    /// are its loose entries).
    pub snapshot: bool,
}

/// Every tree of a store with its entries (key, value), for backups.
pub type StoreExport = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

/// The trees a store holds, by name (the order of a backup).
pub const TREES: [&str; 5] = ["snapshots", "changes", "sync", "sigs", "local"];

/// The sled-backed store of one node.
#[derive(Debug)]
pub struct Store {
    db: sled::Db,
    snapshots: sled::Tree,
    changes: sled::Tree,
    sync: sled::Tree,
    sigs: sled::Tree,
    local: sled::Tree,
    dir: PathBuf,
    /// Blob files already fsynced.
    synced_blobs: Mutex<HashSet<std::ffi::OsString>>,
}

fn change_prefix(doc: &DocId) -> Vec<u8> {
    let mut k = doc.to_string().into_bytes();
    k.push(0);
    k
}

/// First key byte of an entry of the `sigs` tree that holds a commit's
/// signatures (an older entry's key is a 32-byte change hash).
const SIGNATURE_BATCH: u8 = 0xff;

fn encode_signatures(sigs: &[StoredSignature]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(sigs.len() * (32 + 2 + 64));
    for (hash, sig) in sigs {
        let len = u16::try_from(sig.len()).map_err(|_| bad_value())?;
        out.extend_from_slice(hash);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(sig);
    }
    Ok(out)
}

fn decode_signatures(
    mut v: &[u8],
    mut each: impl FnMut([u8; 32], &[u8]),
) -> Result<(), StoreError> {
    while !v.is_empty() {
        let (hash, rest) = v.split_first_chunk::<32>().ok_or_else(bad_value)?;
        let (len, rest) = rest.split_first_chunk::<2>().ok_or_else(bad_value)?;
        let len = usize::from(u16::from_be_bytes(*len));
        let (sig, rest) = rest.split_at_checked(len).ok_or_else(bad_value)?;
        each(*hash, sig);
        v = rest;
    }
    Ok(())
}

fn bad_value() -> StoreError {
    StoreError::BadValue { tree: "sigs" }
}

fn sync_key(peer: &str, doc: &DocId) -> Vec<u8> {
    let mut k = peer.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(doc.to_string().as_bytes());
    k
}

/// sled's page cache (its default is 1 GiB). The store is read whole at
/// start and then mostly written, so a small cache costs nothing measurable
/// and keeps a node's memory to its documents.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked {
                        path: dir.display().to_string(),
                        source: e,
                    }
                }
                other => StoreError::Sled(other),
            })?;
        let store = Self {
            snapshots: db.open_tree("snapshots")?,
            changes: db.open_tree("changes")?,
            sync: db.open_tree("sync")?,
            sigs: db.open_tree("sigs")?,
            local: db.open_tree("local")?,
            db,
            dir: dir.to_owned(),
            synced_blobs: Mutex::new(HashSet::new()),
        };
        store.durable()?;
        Ok(store)
    }

    /// Flushes sled and fsyncs what its flush leaves unsynced: everything
    /// written before the call is durable once it returns. Safe to call
    /// from another thread than the writer's.
    pub fn durable(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        File::open(self.dir.join("db"))?.sync_all()?;
        let blobs = self.dir.join("blobs");
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
            let mut any = false;
            for entry in entries.flatten() {
                let name = entry.file_name();
                if !synced.contains(&name) {
                    if let Ok(f) = File::open(entry.path()) {
                        f.sync_all()?;
                        any = true;
                    }
                    synced.insert(name);
                }
            }
            if any {
                File::open(&blobs)?.sync_all()?;
            }
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// Every stored document with its chunks in the order to load them.
    pub fn load_docs(&self) -> Result<Vec<StoredDoc>, StoreError> {
        let mut docs: std::collections::BTreeMap<DocId, Vec<Vec<u8>>> = Default::default();
        let mut snapshots = std::collections::BTreeSet::new();
        for item in self.snapshots.iter() {
            let (k, v) = item?;
            let id = std::str::from_utf8(&k)
                .ok()
                .and_then(|s| s.parse::<DocId>().ok())
                .ok_or(StoreError::BadKey { tree: "snapshots" })?;
            snapshots.insert(id.clone());
            docs.entry(id).or_default().push(v.to_vec());
        }
        for item in self.changes.iter() {
            let (k, v) = item?;
            let doc = k
                .iter()
                .position(|b| *b == 0)
                .and_then(|i| std::str::from_utf8(&k[..i]).ok())
                .and_then(|s| s.parse::<DocId>().ok())
                .ok_or(StoreError::BadKey { tree: "changes" })?;
            docs.entry(doc).or_default().push(v.to_vec());
        }
        Ok(docs
            .into_iter()
            .map(|(id, chunks)| StoredDoc {
                snapshot: snapshots.contains(&id),
                id,
                chunks,
            })
            .collect())
    }

    /// The stored chunks of one document, in the order to load them.
    pub fn load_doc(&self, doc: &DocId) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut chunks = Vec::new();
        if let Some(snapshot) = self.snapshots.get(doc.to_string())? {
            chunks.push(snapshot.to_vec());
        }
        for item in self.changes.scan_prefix(change_prefix(doc)) {
            chunks.push(item?.1.to_vec());
        }
        Ok(chunks)
    }

    /// Writes a batch atomically and returns once it is durable on disk
    /// (see [`Store::write`] for a batch of sync states only).
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if self.write(batch)? {
            self.durable()?;
        }
        Ok(())
    }

    /// Writes a batch atomically, without waiting for the disk; says
    /// whether it must still be made durable ([`Store::durable`]) before
    /// anything that depends on it is acknowledged or sent. Sync states
    /// alone need not: one lost in a crash only makes the next sync with
    /// that peer start further back (sled writes them out with its next
    /// flush).
    pub fn write(&self, batch: &Batch) -> Result<bool, StoreError> {
        if batch.is_empty() {
            return Ok(false);
        }
        // Ids are taken before the transaction, which may be retried. The
        // changes of one document go into one entry: a message of a
        // thousand changes is one insert, not a thousand.
        let mut keyed = Vec::new();
        for (doc, chunks) in &batch.changes {
            if chunks.is_empty() {
                continue;
            }
            let mut key = change_prefix(doc);
            key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
            keyed.push((key, chunks.concat()));
        }
        // Likewise the signatures: one entry per commit.
        let signatures = if batch.signatures.is_empty() {
            None
        } else {
            let mut key = vec![SIGNATURE_BATCH];
            key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
            Some((key, encode_signatures(&batch.signatures)?))
        };
        (&self.changes, &self.sync, &self.sigs)
            .transaction(|(changes, sync, sigs)| {
                for (key, chunk) in &keyed {
                    changes.insert(key.as_slice(), chunk.as_slice())?;
                }
                if let Some((key, value)) = &signatures {
                    sigs.insert(key.as_slice(), value.as_slice())?;
                }
                for (peer, doc, state) in &batch.sync_states {
                    sync.insert(sync_key(peer, doc), state.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(unabort)?;
        Ok(!batch.changes.is_empty() || !batch.signatures.is_empty())
    }

    /// Number of change entries stored for `doc` since its last compaction
    /// (one per commit that added changes to it).
    pub fn chunk_count(&self, doc: &DocId) -> usize {
        self.changes.scan_prefix(change_prefix(doc)).count()
    }

    /// Replaces the snapshot and all change chunks of `doc` by `snapshot`,
    /// which must contain every stored change (the whole document saved).
    pub fn compact(&self, doc: &DocId, snapshot: &[u8]) -> Result<(), StoreError> {
        let keys: Vec<sled::IVec> = self
            .changes
            .scan_prefix(change_prefix(doc))
            .keys()
            .collect::<Result<_, _>>()?;
        let id = doc.to_string();
        (&self.snapshots, &self.changes)
            .transaction(|(snapshots, changes)| {
                snapshots.insert(id.as_bytes(), snapshot)?;
                for k in &keys {
                    changes.remove(k)?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(unabort)?;
        self.durable()
    }

    /// Every stored signature, by change hash, read straight into the
    /// table the engine keeps them in. A stored value of another length
    /// than an ed25519 signature's cannot vouch for anything: it is left
    /// out, and counted in a warning.
    pub fn signatures(&self) -> Result<SignatureTable, StoreError> {
        let mut table = SignatureTable::default();
        let mut unusable = 0usize;
        let mut keep = |hash: [u8; 32], sig: &[u8]| {
            if !table.insert(ChangeHash(hash), sig) {
                unusable += 1;
            }
        };
        for item in self.sigs.iter() {
            let (k, v) = item?;
            if k.len() == 9 && k[0] == SIGNATURE_BATCH {
                decode_signatures(&v, &mut keep)?;
            } else {
                // One signature per entry, as stores before batches held them.
                let hash = <[u8; 32]>::try_from(&k[..])
                    .map_err(|_| StoreError::BadKey { tree: "sigs" })?;
                keep(hash, &v);
            }
        }
        if unusable > 0 {
            tracing::warn!(
                unusable,
                "stored signatures of the wrong length left out (a damaged store): the changes they signed go to peers without them, and peers refuse those"
            );
        }
        Ok(table)
    }

    /// Persisted sync states for `peer`.
    pub fn sync_states(&self, peer: &str) -> Result<Vec<(DocId, Vec<u8>)>, StoreError> {
        let mut prefix = peer.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.sync.scan_prefix(&prefix) {
            let (k, v) = item?;
            if let Some(doc) = std::str::from_utf8(&k[prefix.len()..])
                .ok()
                .and_then(|s| s.parse::<DocId>().ok())
            {
                out.push((doc, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Reads a node-local value.
    pub fn local_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.local.get(key)?.map(|v| v.to_vec()))
    }

    /// Writes a node-local value durably.
    pub fn local_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.local.insert(key, value)?;
        self.durable()
    }

    /// Writes a node-local value durably unless `key` already holds one;
    /// returns whether it was written.
    pub fn local_put_new(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let swapped = self
            .local
            .compare_and_swap(key, None as Option<&[u8]>, Some(value))?;
        if swapped.is_err() {
            return Ok(false);
        }
        self.durable()?;
        Ok(true)
    }

    /// Node-local values whose keys start with `prefix`, in key order.
    pub fn local_scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.local.scan_prefix(prefix) {
            let (k, v) = entry?;
            if let Ok(key) = std::str::from_utf8(&k) {
                out.push((key.to_owned(), v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Every entry of every tree. Consistent as long as nothing writes
    /// meanwhile: the replicator calls it inside one step of its actor,
    /// which is the only writer.
    pub fn export(&self) -> Result<StoreExport, StoreError> {
        let mut out = Vec::with_capacity(TREES.len());
        for (name, tree) in TREES.iter().zip(self.trees()) {
            let mut entries = Vec::new();
            for item in tree.iter() {
                let (k, v) = item?;
                entries.push((k.to_vec(), v.to_vec()));
            }
            out.push((name.to_string(), entries));
        }
        Ok(out)
    }

    /// Creates a store in `dir` (which must not hold one) from an export and
    /// makes it durable. Trees the export does not name are refused, so a
    /// backup of another format is not half-imported.
    pub fn import(dir: &Path, export: &StoreExport) -> Result<Self, StoreError> {
        if let Some((name, _)) = export.iter().find(|(n, _)| !TREES.contains(&n.as_str())) {
            return Err(StoreError::UnknownTree(name.clone()));
        }
        let store = Self::open(dir)?;
        for (name, entries) in export {
            let Some(tree) = TREES
                .iter()
                .position(|t| t == name)
                .map(|i| store.trees()[i].clone())
            else {
                continue;
            };
            let mut batch = sled::Batch::default();
            for (k, v) in entries {
                batch.insert(k.as_slice(), v.as_slice());
            }
            tree.apply_batch(batch)?;
        }
        store.durable()?;
        Ok(store)
    }

    fn trees(&self) -> [&sled::Tree; 5] {
        [
            &self.snapshots,
            &self.changes,
            &self.sync,
            &self.sigs,
            &self.local,
        ]
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

fn unabort(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(e) => StoreError::Sled(e),
        // No closure above aborts.
        TransactionError::Abort(()) => {
            StoreError::Sled(sled::Error::Unsupported("transaction aborted".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::QuarterSlug;

    fn doc() -> DocId {
        DocId::quarter(&QuarterSlug::new("prohlis").expect("slug"))
    }

    #[test]
    fn committed_changes_and_sync_states_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            let batch = Batch {
                changes: vec![(doc(), vec![b"one".to_vec(), b"two".to_vec()])],
                sync_states: vec![("peer".into(), doc(), b"state".to_vec())],
                signatures: vec![([7; 32], vec![9; 64])],
            };
            store.commit(&batch).expect("commit");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let docs = store.load_docs().expect("load");
        assert_eq!(docs.len(), 1);
        // One entry per commit and document, its changes concatenated.
        assert_eq!(docs[0].chunks, vec![b"onetwo".to_vec()]);
        assert!(!docs[0].snapshot, "no snapshot yet");
        assert_eq!(
            store.sync_states("peer").expect("states"),
            vec![(doc(), b"state".to_vec())]
        );
        assert!(store.sync_states("other").expect("states").is_empty());
        let sigs = store.signatures().expect("sigs");
        assert_eq!(sigs.len(), 1);
        assert_eq!(sigs.get(&ChangeHash([7; 32])), Some(&[9; 64]));
    }

    #[test]
    fn signatures_are_stored_a_commit_at_a_time_and_older_entries_still_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        // An entry as stores before signature batches wrote it.
        store.sigs.insert([1; 32], vec![2; 64]).expect("old entry");
        let batch = Batch {
            changes: vec![],
            sync_states: vec![],
            signatures: vec![([3; 32], vec![4; 64]), ([5; 32], vec![6; 7])],
        };
        store.commit(&batch).expect("commit");
        assert_eq!(store.sigs.len(), 2, "one entry per commit");
        let sigs = store.signatures().expect("sigs");
        assert_eq!(sigs.get(&ChangeHash([1; 32])), Some(&[2; 64]));
        assert_eq!(sigs.get(&ChangeHash([3; 32])), Some(&[4; 64]));
        // Seven bytes are no signature: left out, the rest still loads.
        assert!(!sigs.contains(&ChangeHash([5; 32])));
        assert_eq!(sigs.len(), 2);
        // A truncated entry is an error, not a silently shorter list.
        let mut key = vec![SIGNATURE_BATCH];
        key.extend_from_slice(&9u64.to_be_bytes());
        store.sigs.insert(key, vec![7; 40]).expect("bad entry");
        assert!(matches!(
            store.signatures(),
            Err(StoreError::BadValue { tree: "sigs" })
        ));
    }

    #[test]
    fn local_values_are_written_once_scanned_by_prefix_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            assert!(store.local_put_new("keys/a", b"1").expect("put"));
            assert!(!store.local_put_new("keys/a", b"2").expect("put again"));
            store.local_put("keys/b", b"3").expect("put b");
            store.local_put("other/c", b"4").expect("put c");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            store.local_scan("keys/").expect("scan"),
            vec![
                ("keys/a".to_string(), b"1".to_vec()),
                ("keys/b".to_string(), b"3".to_vec())
            ]
        );
    }

    #[test]
    fn an_export_imports_into_an_identical_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("a")).expect("open");
        let batch = Batch {
            changes: vec![(doc(), vec![b"one".to_vec()])],
            sync_states: vec![("peer".into(), doc(), b"state".to_vec())],
            signatures: vec![([7; 32], vec![9; 64])],
        };
        store.commit(&batch).expect("commit");
        store.local_put("reporter/x", b"Erika").expect("local");
        let export = store.export().expect("export");
        let copy = Store::import(&dir.path().join("b"), &export).expect("import");
        assert_eq!(copy.export().expect("export"), export);
        assert_eq!(
            copy.local_get("reporter/x").expect("get"),
            Some(b"Erika".to_vec())
        );
        let unknown = vec![("elsewhere".to_string(), vec![])];
        assert!(matches!(
            Store::import(&dir.path().join("c"), &unknown),
            Err(StoreError::UnknownTree(_))
        ));
    }

    #[test]
    fn compaction_replaces_chunks_with_a_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let batch = Batch {
            changes: vec![(doc(), vec![b"a".to_vec(), b"b".to_vec()])],
            sync_states: vec![],
            signatures: vec![],
        };
        store.commit(&batch).expect("commit");
        store.commit(&batch).expect("commit");
        assert_eq!(store.chunk_count(&doc()), 2);
        store.compact(&doc(), b"snap").expect("compact");
        assert_eq!(store.chunk_count(&doc()), 0);
        let batch = Batch {
            changes: vec![(doc(), vec![b"c".to_vec()])],
            sync_states: vec![],
            signatures: vec![],
        };
        store.commit(&batch).expect("commit");
        let docs = store.load_docs().expect("load");
        assert_eq!(docs[0].chunks, vec![b"snap".to_vec(), b"c".to_vec()]);
        assert!(docs[0].snapshot, "the first chunk is the snapshot");
    }
}
