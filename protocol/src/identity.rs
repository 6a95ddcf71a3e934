//! Node identity: an ed25519 key that is the node's libp2p PeerId and, through
//! its public key, the node's automerge actor id.

use std::fs;
use std::io::Write;
use std::path::Path;

use automerge::ActorId;
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read identity key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write identity key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("identity key {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
}

/// A node's key pair with the ids derived from it.
#[derive(Clone)]
pub struct Identity {
    keypair: Keypair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh random ed25519 identity.
    pub fn generate() -> Self {
        Self {
            keypair: Keypair::generate_ed25519(),
        }
    }

    /// Loads the key at `path`.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let bytes = fs::read(path).map_err(|source| IdentityError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let keypair =
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        if keypair.public().clone().try_into_ed25519().is_err() {
            return Err(IdentityError::Corrupt {
                path: path.display().to_string(),
                reason: "not an ed25519 key".into(),
            });
        }
        Ok(Self { keypair })
    }

    /// Writes the key to `path` (mode 0600), durably, refusing to overwrite.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        let err = |source| IdentityError::Write {
            path: path.display().to_string(),
            source,
        };
        let bytes = self
            .keypair
            .to_protobuf_encoding()
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut file = opts.open(path).map_err(err)?;
        file.write_all(&bytes).map_err(err)?;
        file.sync_all().map_err(err)
    }

    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// The 32-byte ed25519 secret, for signing changes.
    pub fn ed25519_secret(&self) -> Option<[u8; 32]> {
        let kp = self.keypair.clone().try_into_ed25519().ok()?;
        let secret = kp.secret();
        <[u8; 32]>::try_from(secret.as_ref()).ok()
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// The automerge actor id: the raw 32-byte ed25519 public key, so every
    /// change names the key that may sign for it and stays stable across restarts.
    pub fn actor_id(&self) -> ActorId {
        actor_id_of(&self.keypair.public()).unwrap_or_else(|| ActorId::from(&[0u8; 32][..]))
    }
}

/// The actor id that belongs to `key`, if it is an ed25519 key.
pub fn actor_id_of(key: &PublicKey) -> Option<ActorId> {
    let ed = key.clone().try_into_ed25519().ok()?;
    Some(ActorId::from(&ed.to_bytes()[..]))
}

/// The actor id that belongs to `peer`, if the PeerId inlines an ed25519 key
/// (libp2p inlines keys of up to 42 bytes, so ed25519 PeerIds always do).
pub fn actor_id_of_peer(peer: &PeerId) -> Option<ActorId> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None; // not an identity multihash
    }
    let key = PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    actor_id_of(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_save_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        let id = Identity::generate();
        id.save_new(&path).expect("save");
        let loaded = Identity::load(&path).expect("load");
        assert_eq!(id.peer_id(), loaded.peer_id());
        assert_eq!(id.actor_id(), loaded.actor_id());
        assert_eq!(actor_id_of_peer(&id.peer_id()), Some(id.actor_id()));
        assert!(id.save_new(&path).is_err(), "overwrote an existing key");
    }

    #[test]
    fn corrupt_key_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        fs::write(&path, b"garbage").expect("write");
        let err = Identity::load(&path).expect_err("garbage accepted");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
