//! `backup` and `restore`: a consistent snapshot of a node, and a data
//! directory made from one.
//!
//! A backup file is gzip (whose CRC-32 catches a damaged file) around:
//! the magic `IQ-BACKUP\0`, a `u32` format version, then records — `F` a file
//! of the data directory (`config.toml`, `identity.key`, `swarm.key`), `T` a
//! store tree with its entries — and `E` at the end. Lengths are big-endian
//! (`u32` for names and keys, `u64` for values and counts).
//!
//! The store part comes from the running daemon (`GET /backup/store`, read in
//! one step of the replicator, the store's only writer) or, when no daemon
//! runs, from the store opened under the data directory's lock. The key and
//! config are read from the directory by the CLI, so the key never crosses
//! HTTP. Restore builds the new directory beside the target and renames it
//! into place, so a crash leaves the old directory or the new one, never half
//! of either.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use iq_protocol::datadir::{DataDir, DataDirError, Role};
use iq_protocol::store::{Store, StoreError, StoreExport};

use crate::client::{Client, ClientError};

const MAGIC: &[u8; 10] = b"IQ-BACKUP\0";
const VERSION: u32 = 1;

/// Files of a data directory that a backup carries. The lock and `api.addr`
/// belong to a running process and are left out.
pub const FILES: [&str; 3] = ["config.toml", "identity.key", "swarm.key"];

/// Longest key or file name accepted when reading a backup.
const MAX_NAME: u64 = 1 << 20;
/// Largest single value accepted when reading a backup.
const MAX_VALUE: u64 = 1 << 32;

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not an iq backup (wrong magic); give a file written by `backup`")]
    NotABackup(String),
    #[error("the backup is damaged: {0}; use another copy")]
    Damaged(String),
    #[error(
        "the backup is of format {0}, this iq reads format {VERSION}; restore it with the iq version that wrote it"
    )]
    Version(u32),
    #[error("the backup lacks {0}; it was not written by `backup`")]
    Incomplete(&'static str),
    #[error(
        "{0} is not empty: restore refuses to overwrite a data directory. Choose an empty or new directory, or pass --force to move this one aside first"
    )]
    NotEmpty(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A backup's contents.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Backup {
    /// (file name, contents), names from [`FILES`].
    pub files: Vec<(String, Vec<u8>)>,
    pub store: StoreExport,
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8], wide: bool) {
    if wide {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    } else {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

/// Encodes a backup (gzip-compressed).
pub fn encode(backup: &Backup) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    raw.extend_from_slice(MAGIC);
    raw.extend_from_slice(&VERSION.to_be_bytes());
    for (name, data) in &backup.files {
        raw.push(b'F');
        put_bytes(&mut raw, name.as_bytes(), false);
        put_bytes(&mut raw, data, true);
    }
    for (tree, entries) in &backup.store {
        raw.push(b'T');
        put_bytes(&mut raw, tree.as_bytes(), false);
        raw.extend_from_slice(&(entries.len() as u64).to_be_bytes());
        for (k, v) in entries {
            put_bytes(&mut raw, k, false);
            put_bytes(&mut raw, v, true);
        }
    }
    raw.push(b'E');
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&raw)?;
    gz.finish()
}

/// Encodes a store export alone (what the daemon hands the CLI).
pub fn encode_store(store: &StoreExport) -> std::io::Result<Vec<u8>> {
    encode(&Backup {
        files: Vec::new(),
        store: store.clone(),
    })
}

/// Reads backups without trusting their length fields: every read is
/// bounded, and memory grows only with data actually present.
struct Reader<R> {
    inner: R,
}

impl<R: Read> Reader<R> {
    fn exact<const N: usize>(&mut self, what: &str) -> Result<[u8; N], BackupError> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| BackupError::Damaged(format!("cannot read {what}: {e}")))?;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u64, BackupError> {
        Ok(u64::from(u32::from_be_bytes(self.exact::<4>(what)?)))
    }

    fn u64(&mut self, what: &str) -> Result<u64, BackupError> {
        Ok(u64::from_be_bytes(self.exact::<8>(what)?))
    }

    fn bytes(&mut self, len: u64, max: u64, what: &str) -> Result<Vec<u8>, BackupError> {
        if len > max {
            return Err(BackupError::Damaged(format!(
                "{what} claims {len} bytes, more than the {max} allowed"
            )));
        }
        let mut out = Vec::new();
        let n = (&mut self.inner)
            .take(len)
            .read_to_end(&mut out)
            .map_err(|e| BackupError::Damaged(format!("cannot read {what}: {e}")))?;
        if n as u64 != len {
            return Err(BackupError::Damaged(format!("{what} is cut short")));
        }
        Ok(out)
    }

    fn name(&mut self, what: &str) -> Result<String, BackupError> {
        let len = self.u32(what)?;
        let bytes = self.bytes(len, MAX_NAME, what)?;
        String::from_utf8(bytes).map_err(|_| BackupError::Damaged(format!("{what} is not UTF-8")))
    }
}

/// Decodes and checks a backup; `source` names it in errors.
pub fn decode(bytes: &[u8], source: &str) -> Result<Backup, BackupError> {
    let mut r = Reader {
        inner: GzDecoder::new(bytes),
    };
    let magic = r
        .exact::<10>("the header")
        .map_err(|_| BackupError::NotABackup(source.to_string()))?;
    if &magic != MAGIC {
        return Err(BackupError::NotABackup(source.to_string()));
    }
    let version = u32::from_be_bytes(r.exact::<4>("the version")?);
    if version != VERSION {
        return Err(BackupError::Version(version));
    }
    let mut backup = Backup::default();
    loop {
        match r.exact::<1>("a record tag")?[0] {
            b'F' => {
                let name = r.name("a file name")?;
                if !FILES.contains(&name.as_str()) {
                    return Err(BackupError::Damaged(format!(
                        "it names an unexpected file {name:?}"
                    )));
                }
                let len = r.u64("a file length")?;
                let data = r.bytes(len, MAX_VALUE, &name)?;
                backup.files.push((name, data));
            }
            b'T' => {
                let tree = r.name("a tree name")?;
                let count = r.u64("an entry count")?;
                let mut entries = Vec::new();
                for _ in 0..count {
                    let klen = r.u32("a key length")?;
                    let k = r.bytes(klen, MAX_NAME, "a key")?;
                    let vlen = r.u64("a value length")?;
                    let v = r.bytes(vlen, MAX_VALUE, "a value")?;
                    entries.push((k, v));
                }
                backup.store.push((tree, entries));
            }
            b'E' => break,
            other => {
                return Err(BackupError::Damaged(format!(
                    "unknown record tag {other:#04x}"
                )));
            }
        }
    }
    // Reading to the end makes gzip check its CRC and length trailer.
    let mut rest = Vec::new();
    r.inner
        .read_to_end(&mut rest)
        .map_err(|e| BackupError::Damaged(format!("its checksum does not match ({e})")))?;
    if !rest.is_empty() {
        return Err(BackupError::Damaged("data after the end record".into()));
    }
    Ok(backup)
}

/// Reads the store of `data`: from its running daemon if there is one,
/// otherwise directly, holding the directory's lock so no daemon starts
/// meanwhile.
async fn store_of(data: &DataDir, role: Role) -> Result<StoreExport, BackupError> {
    match Client::new(data, role) {
        Ok(client) => match client.get_bytes("/backup/store").await {
            Ok(bytes) => return Ok(decode(&bytes, "the daemon's answer")?.store),
            Err(ClientError::NotRunning { .. }) => {}
            Err(e) => return Err(e.into()),
        },
        Err(ClientError::DataDir(DataDirError::NotRunning(_))) => {}
        Err(e) => return Err(e.into()),
    }
    let _lock = data.lock()?;
    let store = Store::open(&data.store_path())?;
    Ok(store.export()?)
}

/// `backup`: writes a snapshot of `data` to `to` (replacing it atomically),
/// readable by its owner only (it holds the node's key). Returns the
/// number of store entries written.
pub async fn backup(data: &DataDir, role: Role, to: &Path) -> Result<usize, BackupError> {
    data.config(role)?;
    let store = store_of(data, role).await?;
    let mut files = Vec::new();
    for name in FILES {
        let path = data.path().join(name);
        match fs::read(&path) {
            Ok(bytes) => files.push((name.to_string(), bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == "swarm.key" => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    let entries = store.iter().map(|(_, e)| e.len()).sum();
    let bytes = encode(&Backup { files, store }).map_err(io(to))?;
    write_private(to, &bytes)?;
    Ok(entries)
}

/// Writes `bytes` to `path` through a temporary file and a rename, mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> Result<(), BackupError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io(parent))
}

/// A sibling of `dir` named `dir<suffix>`.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// What `restore` did.
#[derive(Debug)]
pub struct Restored {
    pub entries: usize,
    /// Where the directory that was there before went (with `--force`).
    pub moved_aside: Option<PathBuf>,
}

/// `restore`: makes `data` from the backup at `from`. Refuses a non-empty
/// `data` unless `force`, which moves it aside (never deletes it) once no
/// daemon holds it. The new directory is built beside `data` and renamed
/// into place.
pub fn restore(
    data: &DataDir,
    role: Role,
    from: &Path,
    force: bool,
) -> Result<Restored, BackupError> {
    let bytes = fs::read(from).map_err(io(from))?;
    let backup = decode(&bytes, &from.display().to_string())?;
    for required in ["config.toml", "identity.key"] {
        if !backup.files.iter().any(|(n, _)| n == required) {
            return Err(BackupError::Incomplete(required));
        }
    }
    let target = data.path();
    let occupied = match fs::read_dir(target) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(target)(e)),
    };
    if occupied && !force {
        return Err(BackupError::NotEmpty(target.display().to_string()));
    }

    let staging = sibling(target, ".restoring");
    if staging.exists() {
        // Left by an interrupted restore: it was never in place.
        fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    fs::create_dir_all(&staging).map_err(io(&staging))?;
    for (name, contents) in &backup.files {
        let path = staging.join(name);
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&path).map_err(io(&path))?;
        f.write_all(contents).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
    }
    // The config must be one of this binary's kind of node.
    let staged = DataDir::new(&staging);
    staged.config(role)?;
    staged.identity()?;
    // Sync states describe what peers held when the backup was made; an
    // older backup's would make both sides start from a shared history the
    // node no longer has. Without them the first sync starts from scratch
    // (only a little more traffic) and fetches what the node lacks.
    let store: StoreExport = backup
        .store
        .iter()
        .filter(|(tree, _)| tree != "sync")
        .cloned()
        .collect();
    drop(Store::import(&staged.store_path(), &store)?);
    File::open(&staging)
        .and_then(|d| d.sync_all())
        .map_err(io(&staging))?;

    let moved_aside = if occupied {
        // No daemon may hold the directory while it is moved.
        let lock = data.lock()?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = sibling(target, &format!(".before-restore-{secs}"));
        fs::rename(target, &aside).map_err(io(target))?;
        drop(lock);
        Some(aside)
    } else {
        if target.exists() {
            fs::remove_dir(target).map_err(io(target))?;
        }
        None
    };
    fs::rename(&staging, target).map_err(io(target))?;
    sync_parent(target)?;
    Ok(Restored {
        entries: backup.store.iter().map(|(_, e)| e.len()).sum(),
        moved_aside,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Backup {
        Backup {
            files: vec![("config.toml".into(), b"role = 'quarter'".to_vec())],
            store: vec![
                (
                    "changes".into(),
                    vec![(b"k1".to_vec(), vec![1; 1000]), (b"k2".to_vec(), vec![])],
                ),
                ("local".into(), vec![]),
            ],
        }
    }

    #[test]
    fn a_backup_decodes_to_what_was_encoded() {
        let bytes = encode(&sample()).expect("encode");
        assert_eq!(decode(&bytes, "test").expect("decode"), sample());
    }

    #[test]
    fn damaged_or_foreign_files_are_refused() {
        let bytes = encode(&sample()).expect("encode");
        // Cut short anywhere: refused, never a partial backup.
        for cut in [5, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], "test").is_err(), "cut at {cut}");
        }
        // One flipped bit in the compressed data or the CRC.
        for at in [bytes.len() / 2, bytes.len() - 6] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(decode(&bad, "test").is_err(), "flip at {at}");
        }
        assert!(matches!(
            decode(b"not gzip at all", "x"),
            Err(BackupError::NotABackup(_))
        ));
        // A length field claiming more than is there.
        let mut raw = MAGIC.to_vec();
        raw.extend_from_slice(&VERSION.to_be_bytes());
        raw.push(b'F');
        put_bytes(&mut raw, b"config.toml", false);
        raw.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&raw).expect("gzip");
        let bytes = gz.finish().expect("gzip");
        assert!(matches!(decode(&bytes, "x"), Err(BackupError::Damaged(_))));
    }

    #[test]
    fn file_names_outside_the_data_directory_are_refused() {
        let mut b = sample();
        b.files.push(("../../etc/passwd".into(), vec![]));
        let bytes = encode(&b).expect("encode");
        assert!(matches!(decode(&bytes, "x"), Err(BackupError::Damaged(_))));
    }
}
