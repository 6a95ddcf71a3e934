//! The data directory of a node: its config, key, store, lock and the
//! address of its local HTTP API.
//!
//! ```text
//! DIR/config.toml    what `init` decided (see docs/config.example.toml)
//! DIR/identity.key   the node's ed25519 key (0600)
//! DIR/store/         the sled store
//! DIR/lock           held by the running daemon
//! DIR/api.addr       where the running daemon's HTTP API listens
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::identity::{Identity, IdentityError};
use crate::ids::QuarterSlug;

const CONFIG: &str = "config.toml";
const IDENTITY: &str = "identity.key";
const LOCK: &str = "lock";
const API_ADDR: &str = "api.addr";
const STORE: &str = "store";
const PSK: &str = "swarm.key";

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "no iq data directory at {0}: create it first with `iq-node init --data {0} ...` (quarter) or `iq-center init --data {0}` (centre)"
    )]
    Missing(String),
    #[error(
        "{0} is not an initialised iq data directory (no config.toml): run `iq-node init --data {0} ...` or `iq-center init --data {0}` first"
    )]
    Uninitialised(String),
    #[error(
        "{0} is already initialised (config.toml exists); use another --data directory or remove this one"
    )]
    AlreadyInitialised(String),
    #[error(
        "data directory {0} is in use by another iq process (it holds {0}/lock); stop it first or use another --data directory"
    )]
    InUse(String),
    #[error("this data directory belongs to {found}, not {expected}")]
    WrongRole { expected: Role, found: Role },
    #[error("config {path} is invalid: {reason}")]
    BadConfig { path: String, reason: String },
    #[error(
        "the daemon for {0} is not running (no api.addr): start it with `iq-node run --data {0}` or `iq-center run --data {0}`"
    )]
    NotRunning(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Which daemon a data directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Quarter,
    Center,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Quarter => "a quarter node (iq-node)",
            Role::Center => "the centre node (iq-center)",
        })
    }
}

/// The quarter a quarter node serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarterConfig {
    pub slug: QuarterSlug,
    pub name: String,
}

/// Which quarter documents a quarter node keeps a replica of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replicate {
    /// Every quarter's document on the roster (the default): the office
    /// reads the whole city, and while the centre is down the quarters
    /// sync with each other directly.
    #[default]
    All,
    /// Its own quarter's document and the city's only: a node's memory and
    /// disk grow with its own quarter, not with the city. While the centre
    /// is down it still pushes its own document to the other quarters, but
    /// it holds none of theirs.
    Own,
}

impl Replicate {
    pub fn is_all(&self) -> bool {
        *self == Replicate::All
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Replicate::All => "all",
            Replicate::Own => "own",
        }
    }
}

impl std::fmt::Display for Replicate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Replicate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Replicate::All),
            "own" => Ok(Replicate::Own),
            other => Err(format!(
                "{other:?} is not a replication scope; use \"all\" (every quarter's document) or \"own\" (its own quarter's and the city's only)"
            )),
        }
    }
}

/// What a node runs with; written by `init`, read by `run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub role: Role,
    /// libp2p listen multiaddr.
    pub listen: String,
    /// Local HTTP API address.
    pub api: SocketAddr,
    /// Quarter nodes: which quarter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarter: Option<QuarterConfig>,
    /// Quarter nodes: the centre's multiaddr ending in `/p2p/<PeerId>`,
    /// the node's trust anchor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub center: Option<String>,
    /// Run as a libp2p private network with the pre-shared key in
    /// `DIR/swarm.key`: peers without the key are dropped before Noise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private_network: bool,
    /// Quarter nodes: the address other quarters dial for direct sync, when
    /// `listen` is a wildcard (0.0.0.0) or not reachable as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Quarter nodes: which quarter documents it replicates (`all` when
    /// absent). The centre always replicates every quarter's.
    #[serde(default, skip_serializing_if = "Replicate::is_all")]
    pub replicate: Replicate,
}

/// A node's data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    path: PathBuf,
}

/// Held while a daemon runs; released on drop (or by the OS when the
/// process dies, so a SIGKILL leaves no stale lock behind).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DataDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn show(&self) -> String {
        self.path.display().to_string()
    }

    /// Checks that the directory exists and was initialised.
    pub fn check_initialised(&self) -> Result<(), DataDirError> {
        if !self.path.is_dir() {
            return Err(DataDirError::Missing(self.show()));
        }
        if !self.path.join(CONFIG).is_file() {
            return Err(DataDirError::Uninitialised(self.show()));
        }
        Ok(())
    }

    /// Initialises a new data directory: key first, config last, so a
    /// directory counts as initialised only once everything is in place.
    /// A key left by an interrupted `init` is reused.
    /// `psk` is the federation's pre-shared key file, for private networks.
    pub fn init(&self, config: &Config, psk: Option<&str>) -> Result<Identity, DataDirError> {
        if self.path.join(CONFIG).exists() {
            return Err(DataDirError::AlreadyInitialised(self.show()));
        }
        fs::create_dir_all(&self.path).map_err(io_err(&self.path))?;
        let _lock = self.lock()?;
        let key = self.path.join(IDENTITY);
        let identity = if key.exists() {
            Identity::load(&key)?
        } else {
            let id = Identity::generate();
            id.save_new(&key)?;
            id
        };
        if let Some(psk) = psk {
            let _ = fs::remove_file(self.psk_path()); // left by an interrupted init
            self.write_psk(psk)?;
        }
        let text = toml::to_string_pretty(config).map_err(|e| DataDirError::BadConfig {
            path: self.path.join(CONFIG).display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.path.join(CONFIG), text.as_bytes())?;
        Ok(identity)
    }

    /// Reads the config and checks it belongs to `role`.
    pub fn config(&self, role: Role) -> Result<Config, DataDirError> {
        self.check_initialised()?;
        let path = self.path.join(CONFIG);
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        let config: Config = toml::from_str(&text).map_err(|e| DataDirError::BadConfig {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if config.role != role {
            return Err(DataDirError::WrongRole {
                expected: role,
                found: config.role,
            });
        }
        if config.role == Role::Center && !config.replicate.is_all() {
            return Err(DataDirError::BadConfig {
                path: path.display().to_string(),
                reason: format!(
                    "replicate = \"{}\" is for quarter nodes: the centre replicates every quarter's document; remove the line",
                    config.replicate
                ),
            });
        }
        Ok(config)
    }

    pub fn identity(&self) -> Result<Identity, DataDirError> {
        self.check_initialised()?;
        Ok(Identity::load(&self.path.join(IDENTITY))?)
    }

    /// Where the federation's pre-shared key lives.
    pub fn psk_path(&self) -> PathBuf {
        self.path.join(PSK)
    }

    /// A new random pre-shared key file (libp2p's `/key/swarm/psk/1.0.0/` format).
    pub fn new_psk_file() -> String {
        let secret = Identity::generate().ed25519_secret().unwrap_or([0; 32]);
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n")
    }

    /// Writes the federation's pre-shared key (0600), refusing to overwrite.
    pub fn write_psk(&self, psk_file_text: &str) -> Result<(), DataDirError> {
        let path = self.psk_path();
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&path).map_err(io_err(&path))?;
        f.write_all(psk_file_text.as_bytes())
            .map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))
    }

    /// Reads the federation's pre-shared key file.
    pub fn psk(&self) -> Result<libp2p::pnet::PreSharedKey, DataDirError> {
        let path = self.psk_path();
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        text.parse()
            .map_err(|e: libp2p::pnet::KeyParseError| DataDirError::BadConfig {
                path: path.display().to_string(),
                reason: format!("not a libp2p pre-shared key file ({e})"),
            })
    }

    pub fn store_path(&self) -> PathBuf {
        self.path.join(STORE)
    }

    /// Takes the directory's exclusive lock, or says who holds it.
    pub fn lock(&self) -> Result<DirLock, DataDirError> {
        let path = self.path.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(DataDirError::InUse(self.show())),
            Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    /// Records where the running daemon's API listens.
    pub fn write_api_addr(&self, addr: SocketAddr) -> Result<(), DataDirError> {
        write_atomic(&self.path.join(API_ADDR), addr.to_string().as_bytes())
    }

    pub fn remove_api_addr(&self) {
        let _ = fs::remove_file(self.path.join(API_ADDR));
    }

    /// Where the running daemon's API listens.
    pub fn api_addr(&self) -> Result<SocketAddr, DataDirError> {
        self.check_initialised()?;
        let path = self.path.join(API_ADDR);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataDirError::NotRunning(self.show()));
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        text.trim().parse().map_err(|_| DataDirError::BadConfig {
            path: path.display().to_string(),
            reason: format!("{:?} is not a socket address", text.trim()),
        })
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new
/// file, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

/// A free TCP port on `ip`. `init` records it so the node keeps its
/// address across restarts, so it is taken below the kernel's ephemeral
/// range (where outgoing connections get their local ports): a port from
/// that range could be in use by some connection when the node restarts.
/// Successive calls in one process scan upwards from a random start, so
/// they never hand out the same port twice (the demo and the test harness
/// set up many nodes at once, none of which holds its port yet). Falls back
/// to a port the OS picks if none is found.
pub fn free_port(ip: std::net::IpAddr) -> Result<u16, std::io::Error> {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    /// Offset into the range of the next port to try; 0 until first used.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_start > LOWEST + 1_000 {
        let span = ephemeral_start - LOWEST;
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let _ = NEXT.compare_exchange(
            0,
            1 + (random % u64::from(span - 1)) as u32,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        for _ in 0..256 {
            let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
            let Ok(port) = u16::try_from(LOWEST + offset) else {
                continue;
            };
            if std::net::TcpListener::bind((ip, port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_taken_below_the_ephemeral_range_and_are_free() {
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let port = free_port(ip).expect("port");
            assert!(port >= 10_000, "{port}");
            assert!(seen.insert(port), "port {port} handed out twice");
            std::net::TcpListener::bind((ip, port)).expect("the port is free");
        }
        if let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            && range.split_whitespace().next() == Some("32768")
        {
            assert!(free_port(ip).expect("port") < 32_768);
        }
    }

    fn config() -> Config {
        Config {
            role: Role::Center,
            listen: "/ip4/127.0.0.1/tcp/1".into(),
            api: "127.0.0.1:2".parse().expect("addr"),
            quarter: None,
            center: None,
            private_network: false,
            advertise: None,
            replicate: Replicate::All,
        }
    }

    #[test]
    fn missing_and_uninitialised_dirs_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = DataDir::new(dir.path().join("nope"));
        assert!(matches!(
            missing.config(Role::Center),
            Err(DataDirError::Missing(_))
        ));
        let empty = DataDir::new(dir.path());
        assert!(matches!(
            empty.config(Role::Center),
            Err(DataDirError::Uninitialised(_))
        ));
    }

    #[test]
    fn the_committed_example_config_parses() {
        let example: Config =
            toml::from_str(include_str!("../../docs/config.example.toml")).expect("example config");
        assert_eq!(example.role, Role::Quarter);
        assert!(example.quarter.is_some() && example.center.is_some());
        assert_eq!(example.replicate, Replicate::All);
    }

    #[test]
    fn the_replication_scope_is_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dd = DataDir::new(dir.path());
        let mut own = config();
        own.role = Role::Quarter;
        own.replicate = Replicate::Own;
        dd.init(&own, None).expect("init");
        let text = fs::read_to_string(dir.path().join(CONFIG)).expect("config");
        assert!(text.contains("replicate = \"own\""), "{text}");
        assert_eq!(
            dd.config(Role::Quarter).expect("config").replicate,
            Replicate::Own
        );
        // `all` is the default and is not written.
        assert!(
            !toml::to_string(&config())
                .expect("toml")
                .contains("replicate")
        );

        // A centre is refused the scope, with what to do.
        let centre = tempfile::tempdir().expect("tempdir");
        let mut bad = config();
        bad.replicate = Replicate::Own;
        let dd = DataDir::new(centre.path());
        dd.init(&bad, None).expect("init");
        let err = dd.config(Role::Center).expect_err("refused").to_string();
        assert!(err.contains("remove the line"), "{err}");

        // An unknown value names the ones there are.
        let typo = tempfile::tempdir().expect("tempdir");
        let dd = DataDir::new(typo.path());
        dd.init(&own, None).expect("init");
        let path = typo.path().join(CONFIG);
        let text = fs::read_to_string(&path).expect("config");
        fs::write(&path, text.replace("\"own\"", "\"mine\"")).expect("write");
        let err = dd.config(Role::Quarter).expect_err("refused").to_string();
        assert!(err.contains("mine") && err.contains("own"), "{err}");
        assert_eq!("own".parse::<Replicate>(), Ok(Replicate::Own));
        assert!(
            "mine"
                .parse::<Replicate>()
                .expect_err("refused")
                .contains("\"own\"")
        );
    }

    #[test]
    fn init_then_lock_is_exclusive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dd = DataDir::new(dir.path());
        dd.init(&config(), None).expect("init");
        assert!(matches!(
            dd.init(&config(), None),
            Err(DataDirError::AlreadyInitialised(_))
        ));
        assert_eq!(dd.config(Role::Center).expect("config"), config());
        assert!(matches!(
            dd.config(Role::Quarter),
            Err(DataDirError::WrongRole { .. })
        ));
        let held = dd.lock().expect("lock");
        assert!(matches!(dd.lock(), Err(DataDirError::InUse(_))));
        drop(held);
        dd.lock().expect("lock after release");
    }
}
