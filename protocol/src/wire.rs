//! Wire messages between nodes, versioned so old and new nodes can tell each
//! other apart instead of misreading each other.
//!
//! Every request carries one automerge sync message for one document. The
//! response acknowledges it (or says why it was refused). The receiver's own
//! sync message for that document travels as its own request, so both
//! directions are symmetric; when it carries no changes and the request
//! allows it, it rides in the acknowledgement instead
//! ([`ResponseV1::Answer`]), which saves a stream and a round trip.

use serde::{Deserialize, Serialize};

use crate::ids::DocId;

/// The libp2p protocol name of iq sync, v1: requests and responses in
/// plain CBOR. Nodes also speak `/iq/sync/2`, the same messages with
/// deflated request bodies (`crate::codec`).
pub const SYNC_PROTOCOL: &str = "/iq/sync/1";

/// Largest sync request a node accepts (a whole document on first sync).
pub const MAX_REQUEST_BYTES: u64 = 32 * 1024 * 1024;

/// Largest response a node accepts: an acknowledgement, with at most an
/// answer of [`MAX_ANSWER_BYTES`].
pub const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

/// Largest sync message a node sends as [`ResponseV1::Answer`] (a larger
/// one goes as a request): within [`MAX_RESPONSE_BYTES`] with room for the
/// CBOR around it. A message without changes is heads, the hashes the
/// node needs and a Bloom filter of its recent changes: a few hundred
/// bytes, and about 1.2 KB per thousand changes since the last sync.
pub const MAX_ANSWER_BYTES: usize = 60 * 1024;

/// A request on the sync protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    V1(RequestV1),
}

impl Request {
    /// A sync request as a node of the first version sends it: `data` with
    /// the signatures whole in `sigs`, and none of the flags later versions
    /// add (no answer asked for, no whole documents, no short signatures).
    pub fn first_version(doc: DocId, data: Vec<u8>, sigs: Vec<SignedHash>) -> Self {
        Request::V1(RequestV1::Sync {
            doc,
            data,
            sigs,
            answer: false,
            documents: false,
            signed: Vec::new(),
            prefixed: false,
            compressed: false,
            vouched: false,
        })
    }
}

/// Version 1 requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestV1 {
    /// One automerge sync message for `doc`, with its authors' signatures
    /// that vouch for every change it carries (see `authorship`, `vouch`).
    Sync {
        doc: DocId,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        sigs: Vec<SignedHash>,
        /// The sender reads [`ResponseV1::Answer`]. Nodes of earlier
        /// versions leave it out (it reads as false) and ignore it when a
        /// request carries it, so they are answered, and answer, as before.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        answer: bool,
        /// The sender reads whole documents: a document it holds nothing
        /// of but the genesis may be sent to it as one document chunk
        /// (`engine::Engine::peer_takes_documents`). Nodes of earlier
        /// versions leave it out and are sent changes, as before.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        documents: bool,
        /// Signatures in the short form, [`PREFIXED_SIGNATURE_LEN`] bytes
        /// each: the first [`HASH_PREFIX_LEN`] bytes of the signed change's
        /// hash, then the 64-byte signature. Only to a peer that said
        /// `prefixed`; the receiver finds the change by the prefix among
        /// those the message carries. Alongside `sigs` or instead of it.
        #[serde(default, skip_serializing_if = "Vec::is_empty", with = "serde_bytes")]
        signed: Vec<u8>,
        /// The sender reads signatures in `signed`. Nodes of earlier
        /// versions leave it out and are sent `sigs`, as before.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prefixed: bool,
        /// The sender reads whole documents with compressed columns (as
        /// `Automerge::save` writes them). Nodes of earlier versions leave
        /// it out and are sent whole documents uncompressed, as before.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        compressed: bool,
        /// The sender relays changes it was sent vouched for by a later
        /// change of their author (without their own signatures) only with
        /// a signature that vouches for them (`vouch`), so it may be sent
        /// only the signatures it needs. Nodes of earlier versions leave it
        /// out and are sent every signature, as before.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        vouched: bool,
    },
}

/// Bytes of a change's hash that name it in [`RequestV1::Sync::signed`].
pub const HASH_PREFIX_LEN: usize = 8;

/// Bytes of one signature in [`RequestV1::Sync::signed`]: the hash prefix
/// and the 64-byte signature.
pub const PREFIXED_SIGNATURE_LEN: usize = HASH_PREFIX_LEN + 64;

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
    /// The message was applied, and `data` is the receiver's sync message
    /// for the same document in answer, without changes; only to a request
    /// that said `answer`, and at most [`MAX_ANSWER_BYTES`].
    Answer {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// As in [`RequestV1::Sync`]: the answering node reads whole
        /// documents. Nodes of the version before it leave it out.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        documents: bool,
        /// As in [`RequestV1::Sync`]: the answering node reads signatures
        /// in the short form.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prefixed: bool,
        /// As in [`RequestV1::Sync`]: the answering node reads whole
        /// documents with compressed columns.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        compressed: bool,
        /// As in [`RequestV1::Sync`]: the answering node relays changes
        /// sent vouched for only with a signature that vouches for them.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        vouched: bool,
    },
}
