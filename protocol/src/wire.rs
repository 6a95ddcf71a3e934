//! Wire messages between nodes, versioned so old and new nodes can tell each
//! other apart instead of misreading each other.
//!
//! Every request carries one automerge sync message for one document. The
//! response only acknowledges it (or says why it was refused); the peer's own
//! sync message travels as its own request, so both directions are symmetric.

use serde::{Deserialize, Serialize};

use crate::ids::DocId;

/// The libp2p protocol name of iq sync, v1: requests and responses in
/// plain CBOR. Nodes also speak `/iq/sync/2`, the same messages with
/// deflated request bodies (`crate::codec`).
pub const SYNC_PROTOCOL: &str = "/iq/sync/1";

/// Largest sync request a node accepts (a whole document on first sync).
pub const MAX_REQUEST_BYTES: u64 = 32 * 1024 * 1024;

/// Largest response a node accepts: responses only acknowledge.
pub const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

/// A request on the sync protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    V1(RequestV1),
}

/// Version 1 requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestV1 {
    /// One automerge sync message for `doc`, with its author's signature
    /// for every change it carries (see `authorship`).
    Sync {
        doc: DocId,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        sigs: Vec<SignedHash>,
    },
}

/// A change hash and its author's ed25519 signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHash {
    /// 32 bytes.
    #[serde(with = "serde_bytes")]
    pub hash: Vec<u8>,
    /// 64 bytes.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    V1(ResponseV1),
}

/// Version 1 responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseV1 {
    /// The message was applied.
    Ack,
    /// The message was not applied; the sender should not resend it as is.
    Refused { reason: String },
    /// The receiver is over its rate for this sender: retry later.
    Busy,
}
