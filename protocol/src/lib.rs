//! iq-protocol: what quarter nodes and the centre node share.
//!
//! # Layout
//! - [`ids`]: document ids and quarter slugs.
//! - [`authorship`]: change signatures and who may write which document.
//! - [`chunks`]: bounded reading of the automerge chunks a peer sends.
//! - [`change_cache`]: change bytes kept as received, put into outgoing sync messages.
//! - [`identity`]: the node's ed25519 key, its PeerId and automerge actor id.
//! - [`schema`]: document schemas (genesis, concerns, roster) over automerge.
//! - [`wire`]: versioned wire messages of the sync protocol.
//! - [`engine`]: the sans-IO sync engine, one automerge sync state per (peer, document).
//! - [`store`]: the durable sled store behind one narrow interface.
//! - [`transport`]: the libp2p swarm (TCP + Noise + Yamux) that carries sync messages.
//! - [`datadir`]: the data directory: lock, config, identity and API address files.
//! - [`replicator`]: the daemon core that drives engine, store and transport.
//! - [`workflows`]: the counter-current items, their rules and the views over them.

pub mod authorship;
pub mod change_cache;
pub mod chunks;
pub mod codec;
pub mod datadir;
pub mod engine;
pub mod identity;
pub mod ids;
pub mod read_ahead;
pub mod replicator;
pub mod schema;
pub mod store;
pub mod transport;
pub mod vouch;
pub mod wire;
pub mod workflows;

pub use ids::{DocId, QuarterSlug};
pub use libp2p::{Multiaddr, PeerId};
/// Multiaddr protocol parts, for code that inspects addresses.
pub mod transport_addr {
    pub use libp2p::multiaddr::{Error, Protocol};
}
