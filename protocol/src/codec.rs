//! How sync requests and responses travel on a stream: CBOR, as libp2p's
//! `cbor` codec writes it, and on [`SYNC_PROTOCOL_V2`] a request body
//! deflated when that makes it smaller.
//!
//! A message with changes is mostly automerge change chunks, which repeat
//! their actor, field names and values from change to change: deflate at
//! its fastest level takes a concern change from about 380 to about 110
//! bytes, at roughly 400 MB/s. Signatures do not compress. Requests of
//! [`REUSE_ABOVE`] or more are deflated at the default level instead.
//!
//! Nodes offer both protocols, `/iq/sync/2` first, so a node of this
//! version talks deflated requests with its own kind and plain CBOR with a
//! node that knows only `/iq/sync/1`: quarters can be updated one by one.
//!
//! A request body on `/iq/sync/2` is one byte saying how the rest is
//! written ([`PLAIN`] or [`DEFLATED`]), then the CBOR request, deflated or
//! not. What a deflated body inflates to is bounded by
//! [`wire::MAX_REQUEST_BYTES`], the same bound as a plain one, and by
//! [`MAX_INFLATE_RATIO`] times its own size, so a small request cannot make
//! a node hold much more than a large one could.

use std::borrow::Cow;
use std::io::{self, Read as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::prelude::*;
use libp2p::StreamProtocol;
use libp2p::request_response::{self, Codec as _, cbor};

use crate::chunks;
use crate::wire::{self, Request, RequestV1, Response, ResponseV1};

/// The sync protocol with deflated request bodies (see the module docs).
pub const SYNC_PROTOCOL_V2: &str = "/iq/sync/2";

/// Request bodies up to this size go as they are: a message carrying only
/// heads (a few hundred bytes of hashes) gains nothing from deflate.
pub const DEFLATE_ABOVE: usize = 512;

/// A deflated body inflates to at most this many times its own size (and
/// to at most [`wire::MAX_REQUEST_BYTES`]); a sender deflates a request only
/// when it stays within that, and sends it plain otherwise. Deflate reaches
/// about 1,000:1, so without this a listed peer could make a node inflate
/// and decode a 32 MiB request for every 40 KB it sends, and keep 256 of
/// them per connection waiting for the node: a peer now sends at least a
/// sixteenth of what it makes a node hold. Sync messages of concern
/// changes deflate to about a third, their signatures not at all.
pub const MAX_INFLATE_RATIO: usize = 16;

/// First byte of a `/iq/sync/2` request body: the CBOR request follows as is.
pub const PLAIN: u8 = 0;
/// First byte of a `/iq/sync/2` request body: the CBOR request follows deflated.
pub const DEFLATED: u8 = 1;

/// Bytes the node's sync streams carried, as written on them: requests
/// (deflated or not) and responses, without libp2p's framing, Noise or
/// Yamux; and requests that did not decode. Shared by every stream's codec.
#[derive(Debug, Default)]
pub struct WireCounters {
    sent: AtomicU64,
    received: AtomicU64,
    unreadable: AtomicU64,
    answers_sent: AtomicU64,
    answers_received: AtomicU64,
    bodies_reused: AtomicU64,
}

impl WireCounters {
    /// Bytes written on sync streams since the node started.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes read from sync streams since the node started.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Requests refused since the node started because they did not
    /// decode: larger than [`wire::MAX_REQUEST_BYTES`], not CBOR, not a
    /// request, or a deflated body that does not inflate within its bounds
    /// (see [`unframe`]). Requests cut off are not counted. libp2p closes their
    /// streams without an answer and without telling the node (the sender
    /// sees its request fail).
    pub fn unreadable(&self) -> u64 {
        self.unreadable.load(Ordering::Relaxed)
    }

    /// Sync messages this node sent in an acknowledgement
    /// ([`ResponseV1::Answer`]) instead of a request of their own.
    pub fn answers_sent(&self) -> u64 {
        self.answers_sent.load(Ordering::Relaxed)
    }

    /// Sync messages peers sent in their acknowledgements.
    pub fn answers_received(&self) -> u64 {
        self.answers_received.load(Ordering::Relaxed)
    }

    /// Large requests sent with a body deflated for an identical request
    /// before, instead of deflating them again (see [`REUSE_ABOVE`]).
    pub fn bodies_reused(&self) -> u64 {
        self.bodies_reused.load(Ordering::Relaxed)
    }

    fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Requests at least this large, once deflated, are kept for reuse
/// ([`Deflated`]). They are deflated at zlib's default level rather than
/// its fastest: a whole document of 1,000 concerns with its signatures
/// (422 KB of CBOR) deflates to 160 KB instead of 188 KB in 4.3 ms instead
/// of 1.7 ms, and the centre deflates it once for every quarter it sends
/// it to (`docs/benchmarks.md`, run 52).
pub const REUSE_ABOVE: usize = 64 * 1024;

/// Bytes of deflated request bodies kept for reuse at most: room for a
/// city's quarter documents (a quarter's 1,000 concerns deflate, with
/// their signatures, to about 190 KB), which the centre sends to the
/// quarters in no fixed order.
pub const REUSED_BYTES: usize = 16 << 20;

/// Recently deflated large request bodies, by the SHA-256 of the CBOR
/// request they deflate, newest last, [`REUSED_BYTES`] at most. A node often sends the very same
/// request to many peers: the centre sends a quarter's whole document,
/// with the same signatures and sync message, to every quarter that holds
/// none of it (63 times at 64 quarters), and deflating it was a third of
/// the centre's CPU in that catch-up. A body is reused only for a request
/// whose bytes hash the same, so it is always the deflated form of exactly
/// that request.
#[derive(Debug, Default)]
struct Deflated {
    bodies: std::collections::VecDeque<([u8; 32], Arc<Vec<u8>>)>,
    /// Bytes of `bodies`.
    held: usize,
}

/// The codec of both sync protocols (see the module docs).
#[derive(Clone)]
pub struct SyncCodec {
    cbor: cbor::codec::Codec<Request, Response>,
    counters: Arc<WireCounters>,
    deflated: Arc<std::sync::Mutex<Deflated>>,
}

impl std::fmt::Debug for SyncCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncCodec")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl SyncCodec {
    pub fn new(counters: Arc<WireCounters>) -> Self {
        let cbor = cbor::codec::Codec::default()
            .set_request_size_maximum(wire::MAX_REQUEST_BYTES)
            .set_response_size_maximum(wire::MAX_RESPONSE_BYTES);
        Self {
            cbor,
            counters,
            deflated: Arc::default(),
        }
    }

    /// The `/iq/sync/2` body for the CBOR request `plain` ([`deflated`]),
    /// taken from the bodies deflated lately when it is one of them.
    fn deflated_body(&self, plain: &[u8]) -> io::Result<Option<Arc<Vec<u8>>>> {
        use sha2::{Digest, Sha256};
        if plain.len() < REUSE_ABOVE {
            return Ok(deflated(plain, flate2::Compression::fast())?.map(Arc::new));
        }
        let key: [u8; 32] = Sha256::digest(plain).into();
        if let Ok(kept) = self.deflated.lock()
            && let Some((_, body)) = kept.bodies.iter().find(|(k, _)| *k == key)
        {
            let body = Arc::clone(body);
            self.counters.bodies_reused.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(body));
        }
        let Some(body) = deflated(plain, flate2::Compression::default())? else {
            return Ok(None);
        };
        let body = Arc::new(body);
        if body.len() <= REUSED_BYTES
            && let Ok(mut kept) = self.deflated.lock()
        {
            kept.held += body.len();
            kept.bodies.push_back((key, Arc::clone(&body)));
            while kept.held > REUSED_BYTES {
                let Some((_, old)) = kept.bodies.pop_front() else {
                    break;
                };
                kept.held -= old.len();
            }
        }
        Ok(Some(body))
    }

    /// The request in `body` (at most `limit` bytes), with no copy of a
    /// plain one; an inflated one is decoded after `body` is dropped.
    async fn decode(
        &mut self,
        protocol: &StreamProtocol,
        body: Vec<u8>,
        limit: u64,
    ) -> io::Result<Request> {
        if body.len() as u64 > limit {
            return Err(invalid(format!(
                "a sync request larger than {} bytes",
                wire::MAX_REQUEST_BYTES
            )));
        }
        if !deflates(protocol) {
            return self.cbor.read_request(protocol, &mut body.as_slice()).await;
        }
        match unframe(&body)? {
            Cow::Borrowed(plain) => self.cbor.read_request(protocol, &mut &plain[..]).await,
            Cow::Owned(plain) => {
                drop(body);
                self.cbor
                    .read_request(protocol, &mut plain.as_slice())
                    .await
            }
        }
    }
}

/// Whether `req` carries a whole document saved with compressed columns
/// (`Automerge::save`, what nodes of this version send each other): its
/// columns are deflated already and its signatures do not compress, so
/// deflating it again costs the sender and the receiver time for almost
/// nothing. It goes plain (`docs/benchmarks.md`, runs 133 to 137: deflate
/// was two fifths of the quarters' CPU in the first 0.3 s of a catch-up,
/// and leaving it out added 0.03 % to the bytes).
fn carries_compressed_document(req: &Request) -> bool {
    let Request::V1(RequestV1::Sync { data, .. }) = req;
    data.len() > DEFLATE_ABOVE
        && automerge::sync::Message::decode(data)
            .is_ok_and(|msg| msg.changes.iter().any(chunks::compressed_document))
}

fn deflates(protocol: &StreamProtocol) -> bool {
    protocol.as_ref() == SYNC_PROTOCOL_V2
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The deflated `/iq/sync/2` request body for the CBOR request `plain`,
/// at `level`, if deflating is worth it and stays within
/// [`MAX_INFLATE_RATIO`]; otherwise the body is [`PLAIN`] and `plain` as
/// it is.
fn deflated(plain: &[u8], level: flate2::Compression) -> io::Result<Option<Vec<u8>>> {
    if plain.len() <= DEFLATE_ABOVE {
        return Ok(None);
    }
    let mut body = Vec::with_capacity(plain.len() / 2 + 64);
    body.push(DEFLATED);
    deflate_into(plain, level, &mut body)?;
    let deflated = body.len() - 1;
    let worth_it = body.len() < plain.len() && deflated * MAX_INFLATE_RATIO >= plain.len();
    Ok(worth_it.then_some(body))
}

/// Appends `plain`, raw-deflated at `level`, to `out`, with a compressor
/// kept per thread and level and reset for each use. A fresh one, with
/// about 300 KB of state, costs about as much as deflating a small
/// message: making them took 8 % of the centre's CPU time while it
/// relayed live writes (run 119, `docs/benchmarks.md`).
fn deflate_into(plain: &[u8], level: flate2::Compression, out: &mut Vec<u8>) -> io::Result<()> {
    use flate2::{Compress, FlushCompress, Status};
    thread_local! {
        static KEPT: std::cell::RefCell<Vec<(u32, Compress)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        let i = match kept.iter().position(|(l, _)| *l == level.level()) {
            Some(i) => {
                kept[i].1.reset();
                i
            }
            None => {
                kept.push((level.level(), Compress::new(level, false)));
                kept.len() - 1
            }
        };
        let c = &mut kept[i].1;
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.len().max(4096));
            }
            let (read, written) = (c.total_in(), c.total_out());
            let rest = usize::try_from(read)
                .ok()
                .and_then(|n| plain.get(n..))
                .unwrap_or_default();
            match c.compress_vec(rest, out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => return Ok(()),
                Ok(Status::Ok | Status::BufError) => {
                    if c.total_in() == read && c.total_out() == written {
                        // Room for output and no progress: not to be retried.
                        return Err(io::Error::other("deflate made no progress"));
                    }
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    })
}

/// The CBOR request in a `/iq/sync/2` request body, inflated to at most
/// [`wire::MAX_REQUEST_BYTES`] and to at most [`MAX_INFLATE_RATIO`] times
/// its deflated size (public for the fuzz target `wire`).
///
/// Errors: a body that ends early (its stream was cut off) fails with
/// [`io::ErrorKind::UnexpectedEof`], as a cut-off plain request does, so it
/// is not taken for a hostile one; anything else is
/// [`io::ErrorKind::InvalidData`].
pub fn unframe(body: &[u8]) -> io::Result<Cow<'_, [u8]>> {
    match body.split_first() {
        Some((&PLAIN, rest)) => Ok(Cow::Borrowed(rest)),
        Some((&DEFLATED, rest)) => {
            let bound = wire::MAX_REQUEST_BYTES.min((rest.len() * MAX_INFLATE_RATIO) as u64);
            let mut plain = Vec::new();
            flate2::read::DeflateDecoder::new(rest)
                .take(bound + 1)
                .read_to_end(&mut plain)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("a deflated sync request ends early: {e}"),
                    ),
                    _ => invalid(format!("a deflated sync request does not inflate: {e}")),
                })?;
            if plain.len() as u64 > bound {
                return Err(invalid(format!(
                    "a deflated sync request of {} bytes inflates beyond {bound} bytes \
                     ({MAX_INFLATE_RATIO} times its size, at most {})",
                    rest.len(),
                    wire::MAX_REQUEST_BYTES
                )));
            }
            Ok(Cow::Owned(plain))
        }
        Some((other, _)) => Err(invalid(format!(
            "a sync request body starts with {other}, neither {PLAIN} (plain) nor {DEFLATED} (deflated)"
        ))),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "an empty sync request",
        )),
    }
}

impl request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        // On `/iq/sync/2` the header byte comes on top of the bound.
        let limit = wire::MAX_REQUEST_BYTES + u64::from(deflates(protocol));
        let mut body = Vec::new();
        io.take(limit + 1).read_to_end(&mut body).await?;
        self.counters.add_received(body.len());
        let request = self.decode(protocol, body, limit).await;
        // A stream cut short (the sender went away) is no refusal.
        if let Err(e) = &request
            && e.kind() != io::ErrorKind::UnexpectedEof
        {
            let n = self.counters.unreadable.fetch_add(1, Ordering::Relaxed) + 1;
            // A hostile peer can send many: logged at the 1st, 2nd, 4th, …
            if n.is_power_of_two() {
                tracing::warn!(%protocol, error = %e, refused_so_far = n, "refused a sync request that does not decode");
            }
        }
        request
    }

    async fn read_response<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut body = Vec::new();
        io.take(wire::MAX_RESPONSE_BYTES)
            .read_to_end(&mut body)
            .await?;
        self.counters.add_received(body.len());
        let response = self
            .cbor
            .read_response(protocol, &mut body.as_slice())
            .await?;
        if matches!(response, Response::V1(ResponseV1::Answer { .. })) {
            self.counters
                .answers_received
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(response)
    }

    async fn write_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        // On `/iq/sync/2` the CBOR goes after a PLAIN header byte, so a
        // body that stays plain is not copied.
        let v2 = deflates(protocol);
        let deflate = v2 && !carries_compressed_document(&req);
        let mut body = Vec::new();
        if v2 {
            body.push(PLAIN);
        }
        self.cbor.write_request(protocol, &mut body, req).await?;
        if deflate && let Some(deflated) = self.deflated_body(&body[1..])? {
            drop(body);
            io.write_all(&deflated).await?;
            self.counters.add_sent(deflated.len());
            return Ok(());
        }
        io.write_all(&body).await?;
        self.counters.add_sent(body.len());
        Ok(())
    }

    async fn write_response<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        resp: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let answer = matches!(resp, Response::V1(ResponseV1::Answer { .. }));
        let mut body = Vec::new();
        self.cbor.write_response(protocol, &mut body, resp).await?;
        io.write_all(&body).await?;
        self.counters.add_sent(body.len());
        if answer {
            self.counters.answers_sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use libp2p::request_response::Codec as _;

    use super::*;
    use crate::ids::DocId;
    use crate::wire::{RequestV1, ResponseV1, SignedHash};
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use std::io::Write as _;

    /// The compressor kept per thread is reset between uses: the same
    /// input gives the same body again, also after other inputs at another
    /// level, and every body inflates back to its input.
    #[test]
    fn a_kept_compressor_deflates_each_body_as_a_fresh_one() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut noisy = |n: usize, every: usize| -> Vec<u8> {
            (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if i % every == 0 {
                        x as u8
                    } else {
                        b'a' + (i % 7) as u8
                    }
                })
                .collect()
        };
        let inputs = [noisy(600, 9), noisy(5_000, 4), noisy(300_000, 3)];
        let levels = [flate2::Compression::fast(), flate2::Compression::default()];
        let mut first = Vec::new();
        for round in 0..2 {
            for (i, plain) in inputs.iter().enumerate() {
                for (l, level) in levels.iter().enumerate() {
                    let body = deflated(plain, *level)
                        .expect("deflates")
                        .expect("worth it");
                    assert_eq!(unframe(&body).expect("inflates").as_ref(), &plain[..]);
                    if round == 0 {
                        first.push(body);
                    } else {
                        assert_eq!(body, first[i * levels.len() + l], "input {i}, level {l}");
                    }
                }
            }
        }
    }

    fn v1() -> StreamProtocol {
        StreamProtocol::new(wire::SYNC_PROTOCOL)
    }

    fn v2() -> StreamProtocol {
        StreamProtocol::new(SYNC_PROTOCOL_V2)
    }

    /// A request shaped like a catch-up: `n` change-like records that repeat
    /// their fields, and a signature each (random, as signatures are).
    fn request(n: usize) -> Request {
        let mut data = Vec::new();
        let mut sigs = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut random = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        for i in 0..n {
            data.extend_from_slice(b"category road-damage status open description Pothole ");
            data.extend_from_slice(i.to_string().as_bytes());
            data.extend_from_slice(&random(16));
            sigs.push(SignedHash {
                hash: random(32),
                sig: random(64),
            });
        }
        Request::V1(RequestV1::Sync {
            doc: DocId::City,
            data,
            sigs,
            answer: true,
            documents: true,
            signed: Vec::new(),
            prefixed: true,
            compressed: true,
            vouched: true,
        })
    }

    async fn written(codec: &mut SyncCodec, protocol: &StreamProtocol, req: Request) -> Vec<u8> {
        let mut body = Vec::new();
        codec
            .write_request(protocol, &mut body, req)
            .await
            .expect("writing to a Vec cannot fail");
        body
    }

    async fn read(
        codec: &mut SyncCodec,
        protocol: &StreamProtocol,
        body: &[u8],
    ) -> io::Result<Request> {
        codec.read_request(protocol, &mut &body[..]).await
    }

    #[tokio::test]
    async fn a_large_request_travels_deflated_on_v2_and_reads_back_the_same() {
        let counters = Arc::new(WireCounters::default());
        let mut codec = SyncCodec::new(Arc::clone(&counters));
        let req = request(1000);
        let body = written(&mut codec, &v2(), req.clone()).await;
        let plain = written(&mut codec, &v1(), req.clone()).await;
        assert_eq!(body[0], DEFLATED);
        assert!(
            body.len() < plain.len() * 3 / 4,
            "deflated {} of {} bytes",
            body.len(),
            plain.len()
        );
        assert_eq!(counters.sent(), (body.len() + plain.len()) as u64);
        assert_eq!(read(&mut codec, &v2(), &body).await.expect("reads"), req);
        assert_eq!(counters.received(), body.len() as u64);
    }

    /// A whole document with compressed columns goes plain on v2, as
    /// deflating it again gains almost nothing; the same document saved
    /// without compressed columns still goes deflated.
    #[tokio::test]
    async fn a_whole_document_with_compressed_columns_goes_plain_on_v2() {
        use automerge::transaction::Transactable as _;
        let mut am = automerge::Automerge::new();
        for i in 0..300 {
            let mut tx = am.transaction();
            tx.put(
                automerge::ROOT,
                format!("concern-{i}"),
                "litter, bins overflowing",
            )
            .expect("put");
            tx.commit();
        }
        let whole = |document: Vec<u8>| {
            let msg = automerge::sync::Message {
                heads: am.get_heads(),
                need: Vec::new(),
                have: Vec::new(),
                changes: automerge::sync::ChunkList::from(vec![document]),
                flags: None,
                version: automerge::sync::MessageVersion::V1,
            };
            let Request::V1(RequestV1::Sync { sigs, .. }) = request(20);
            Request::V1(RequestV1::Sync {
                doc: DocId::City,
                data: msg.encode(),
                sigs,
                answer: false,
                documents: true,
                signed: Vec::new(),
                prefixed: true,
                compressed: true,
                vouched: true,
            })
        };
        let mut codec = SyncCodec::new(Arc::default());
        let compressed = whole(am.save());
        let body = written(&mut codec, &v2(), compressed.clone()).await;
        assert_eq!(body[0], PLAIN);
        assert_eq!(
            read(&mut codec, &v2(), &body).await.expect("reads"),
            compressed
        );
        let plain = whole(am.save_nocompress());
        let body = written(&mut codec, &v2(), plain.clone()).await;
        assert_eq!(body[0], DEFLATED);
        assert_eq!(read(&mut codec, &v2(), &body).await.expect("reads"), plain);
    }

    #[tokio::test]
    async fn a_small_request_goes_plain_on_v2() {
        let mut codec = SyncCodec::new(Arc::default());
        let req = request(1);
        let body = written(&mut codec, &v2(), req.clone()).await;
        assert!(body.len() <= DEFLATE_ABOVE + 1, "{} bytes", body.len());
        assert_eq!(body[0], PLAIN);
        assert_eq!(read(&mut codec, &v2(), &body).await.expect("reads"), req);
    }

    /// A node of an earlier version speaks `/iq/sync/1` with libp2p's own
    /// CBOR codec: both directions must read as it writes and write as it
    /// reads.
    #[tokio::test]
    async fn v1_is_libp2ps_cbor_as_nodes_of_the_earlier_version_speak_it() {
        let mut ours = SyncCodec::new(Arc::default());
        let mut theirs = cbor::codec::Codec::<Request, Response>::default()
            .set_request_size_maximum(wire::MAX_REQUEST_BYTES);
        let req = request(1000);
        let mut from_them = Vec::new();
        theirs
            .write_request(&v1(), &mut from_them, req.clone())
            .await
            .expect("writes");
        assert_eq!(
            read(&mut ours, &v1(), &from_them).await.expect("reads"),
            req
        );
        let from_us = written(&mut ours, &v1(), req.clone()).await;
        assert_eq!(from_us, from_them);
        let refused = Response::V1(ResponseV1::Refused {
            reason: "no".into(),
        });
        let mut answer = Vec::new();
        ours.write_response(&v1(), &mut answer, refused.clone())
            .await
            .expect("writes");
        let back = theirs
            .read_response(&v1(), &mut &answer[..])
            .await
            .expect("reads");
        assert_eq!(back, refused);
    }

    #[tokio::test]
    async fn a_body_that_inflates_beyond_the_request_bound_is_refused() {
        let mut codec = SyncCodec::new(Arc::default());
        // One varying byte in sixteen: deflates well within the ratio.
        let mut enc =
            flate2::write::DeflateEncoder::new(vec![DEFLATED], flate2::Compression::fast());
        let mut block = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..=(wire::MAX_REQUEST_BYTES >> 20) {
            for b in block.iter_mut().step_by(16) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x >> 24) as u8;
            }
            enc.write_all(&block).expect("deflates");
        }
        let body = enc.finish().expect("deflates");
        assert!(
            (body.len() as u64) * (MAX_INFLATE_RATIO as u64) > wire::MAX_REQUEST_BYTES,
            "{} bytes deflated: the ratio, not the bound, would refuse it",
            body.len()
        );
        let err = read(&mut codec, &v2(), &body).await.expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let bound = format!("inflates beyond {} bytes", wire::MAX_REQUEST_BYTES);
        assert!(err.to_string().contains(&bound), "{err}");
    }

    #[tokio::test]
    async fn a_request_deflating_beyond_the_ratio_goes_plain_and_a_deflated_one_beyond_it_is_refused()
     {
        let mut codec = SyncCodec::new(Arc::default());
        let zeros = Request::first_version(DocId::City, vec![0; 1 << 20], Vec::new());
        let body = written(&mut codec, &v2(), zeros.clone()).await;
        assert_eq!(body[0], PLAIN, "a request deflating 1,000:1 went deflated");
        assert_eq!(read(&mut codec, &v2(), &body).await.expect("reads"), zeros);
        // A hostile peer deflates it anyway: about 1 KB that would inflate
        // to 1 MiB, far within the 32 MiB bound.
        let mut enc =
            flate2::write::DeflateEncoder::new(vec![DEFLATED], flate2::Compression::best());
        enc.write_all(&body[1..]).expect("deflates");
        let bomb = enc.finish().expect("deflates");
        assert!(bomb.len() < 8 * 1024, "{} bytes", bomb.len());
        let err = read(&mut codec, &v2(), &bomb).await.expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("16 times its size"), "{err}");
    }

    #[tokio::test]
    async fn a_body_neither_plain_nor_deflated_is_refused_with_what_was_wrong() {
        let counters = Arc::new(WireCounters::default());
        let mut codec = SyncCodec::new(Arc::clone(&counters));
        for (body, says) in [
            (&[7u8, 1, 2][..], "starts with 7"),
            (&[DEFLATED, 0xff, 0xff, 0xff][..], "does not inflate"),
        ] {
            let err = read(&mut codec, &v2(), body).await.expect_err("refused");
            assert!(err.to_string().contains(says), "{err}");
        }
        // Deflated garbage that inflates is still not a request.
        let mut enc =
            flate2::write::DeflateEncoder::new(vec![DEFLATED], flate2::Compression::fast());
        enc.write_all(b"not cbor at all").expect("deflates");
        let body = enc.finish().expect("deflates");
        assert!(read(&mut codec, &v2(), &body).await.is_err());
        // Over the bound (on v2 the header byte comes on top).
        let max = wire::MAX_REQUEST_BYTES as usize;
        for (protocol, len) in [(v1(), max + 1), (v2(), max + 2)] {
            let too_large = vec![PLAIN; len];
            let err = read(&mut codec, &protocol, &too_large)
                .await
                .expect_err("refused");
            assert!(err.to_string().contains("larger than"), "{err}");
        }
        assert_eq!(counters.unreadable(), 5, "every refusal is counted");
        // A request cut short (its sender went away), plain, deflated or
        // empty, is no refusal.
        for protocol in [v1(), v2()] {
            let whole = written(&mut codec, &protocol, request(1000)).await;
            let cut = read(&mut codec, &protocol, &whole[..whole.len() / 2])
                .await
                .expect_err("a request cut in half does not decode");
            assert_eq!(cut.kind(), io::ErrorKind::UnexpectedEof, "{cut}");
            let empty = read(&mut codec, &protocol, &[]).await.expect_err("refused");
            assert_eq!(empty.kind(), io::ErrorKind::UnexpectedEof, "{empty}");
        }
        assert_eq!(counters.unreadable(), 5);
    }

    /// A request of the largest size a peer accepts, which deflate cannot
    /// shrink, is read on both protocols (on v2 with its header byte).
    #[tokio::test]
    async fn a_request_of_the_largest_size_is_read_on_both_protocols() {
        let mut codec = SyncCodec::new(Arc::default());
        let with = |len: usize| {
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            Request::first_version(
                DocId::City,
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x >> 24) as u8
                    })
                    .collect(),
                Vec::new(),
            )
        };
        let max = wire::MAX_REQUEST_BYTES as usize;
        // CBOR adds a few bytes around the data: find how many.
        let overhead = written(&mut codec, &v1(), with(max / 2)).await.len() - max / 2;
        let largest = with(max - overhead);
        for protocol in [v1(), v2()] {
            let body = written(&mut codec, &protocol, largest.clone()).await;
            assert_eq!(body.len(), max + usize::from(protocol == v2()));
            assert_eq!(
                read(&mut codec, &protocol, &body).await.expect("reads"),
                largest
            );
        }
    }

    /// The request and response shapes of nodes before `answer` and
    /// `ResponseV1::Answer`, as they decode what they receive.
    mod earlier {
        use serde::{Deserialize, Serialize};

        use crate::ids::DocId;
        use crate::wire::SignedHash;

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Request {
            V1(RequestV1),
        }

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum RequestV1 {
            Sync {
                doc: DocId,
                #[serde(with = "serde_bytes")]
                data: Vec<u8>,
                sigs: Vec<SignedHash>,
            },
        }

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Response {
            V1(ResponseV1),
        }

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum ResponseV1 {
            Ack,
            Refused { reason: String },
            Busy,
        }
    }

    /// A request saying `answer` reads at a node of an earlier version as
    /// the same request without it, and its requests read here as ones that
    /// do not take an answer; an acknowledgement reads there as before.
    #[tokio::test]
    async fn nodes_of_earlier_versions_read_requests_that_take_answers_and_are_answered_as_before()
    {
        let mut ours = SyncCodec::new(Arc::default());
        let mut theirs = cbor::codec::Codec::<earlier::Request, earlier::Response>::default()
            .set_request_size_maximum(wire::MAX_REQUEST_BYTES);
        let Request::V1(RequestV1::Sync {
            doc, data, sigs, ..
        }) = request(3);
        let old = earlier::Request::V1(earlier::RequestV1::Sync {
            doc: doc.clone(),
            data: data.clone(),
            sigs: sigs.clone(),
        });
        let new = Request::V1(RequestV1::Sync {
            doc,
            data,
            sigs,
            answer: true,
            documents: true,
            signed: Vec::new(),
            prefixed: true,
            compressed: true,
            vouched: true,
        });
        for protocol in [v1(), v2()] {
            let body = written(&mut ours, &protocol, new.clone()).await;
            if protocol == v1() {
                let read = theirs
                    .read_request(&protocol, &mut &body[..])
                    .await
                    .expect("an earlier node reads it");
                assert_eq!(read, old);
            }
            let mut from_them = Vec::new();
            if protocol == v2() {
                from_them.push(PLAIN);
            }
            theirs
                .write_request(&v1(), &mut from_them, old.clone())
                .await
                .expect("writes");
            let read = read(&mut ours, &protocol, &from_them).await.expect("reads");
            assert!(
                matches!(
                    read,
                    Request::V1(RequestV1::Sync {
                        answer: false,
                        documents: false,
                        vouched: false,
                        ..
                    })
                ),
                "{read:?}"
            );
        }
        let mut ack = Vec::new();
        ours.write_response(&v1(), &mut ack, Response::V1(ResponseV1::Ack))
            .await
            .expect("writes");
        let read = theirs
            .read_response(&v1(), &mut &ack[..])
            .await
            .expect("an earlier node reads an acknowledgement");
        assert_eq!(read, earlier::Response::V1(earlier::ResponseV1::Ack));
    }

    /// The same large request sent to many peers is deflated once; a
    /// different one of the same size is not taken for it.
    #[tokio::test]
    async fn the_same_large_request_is_deflated_once_and_reads_back_the_same() {
        let counters = Arc::new(WireCounters::default());
        let mut codec = SyncCodec::new(Arc::clone(&counters));
        // Sixteen byte values in random order: deflates to about half.
        let with = |fill: u8| {
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            Request::V1(RequestV1::Sync {
                doc: DocId::City,
                data: (0..200_000u32)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        ((x >> 24) as u8 & 0x0f) ^ fill
                    })
                    .collect(),
                sigs: Vec::new(),
                answer: true,
                documents: true,
                signed: Vec::new(),
                prefixed: true,
                compressed: true,
                vouched: true,
            })
        };
        let first = written(&mut codec, &v2(), with(0)).await;
        assert_eq!(first[0], DEFLATED);
        assert_eq!(counters.bodies_reused(), 0);
        let again = written(&mut codec.clone(), &v2(), with(0)).await;
        assert_eq!(
            counters.bodies_reused(),
            1,
            "a clone (another stream) reuses it"
        );
        assert_eq!(again, first);
        let other = written(&mut codec, &v2(), with(1)).await;
        assert_eq!(counters.bodies_reused(), 1);
        assert_ne!(other, first);
        for (body, fill) in [(&again, 0), (&other, 1)] {
            assert_eq!(
                read(&mut codec, &v2(), body).await.expect("reads"),
                with(fill)
            );
        }
        // Small requests are deflated each time.
        let _ = written(&mut codec, &v2(), request(3)).await;
        let _ = written(&mut codec, &v2(), request(3)).await;
        assert_eq!(counters.bodies_reused(), 1);
    }

    /// A request large enough to be kept for reuse (a whole document the
    /// centre sends to many quarters) is deflated harder than a small one,
    /// which is deflated at the fastest level.
    #[tokio::test]
    async fn large_requests_are_deflated_at_the_default_level() {
        let mut codec = SyncCodec::new(Arc::default());
        for (n, large) in [(1000, true), (200, false)] {
            let plain = written(&mut codec, &v1(), request(n)).await;
            assert_eq!(plain.len() >= REUSE_ABOVE, large, "{} bytes", plain.len());
            let body = written(&mut codec, &v2(), request(n)).await;
            let at = |level| {
                deflated(&plain, level)
                    .expect("deflates")
                    .expect("worth it")
            };
            let (fast, default) = (
                at(flate2::Compression::fast()),
                at(flate2::Compression::default()),
            );
            assert!(
                default.len() <= fast.len() && default != fast,
                "{} {}",
                default.len(),
                fast.len()
            );
            assert_eq!(body, if large { default } else { fast });
        }
    }

    /// The shapes of nodes that read whole documents, uncompressed, but no
    /// signatures in the short form (before `prefixed` and `compressed`).
    mod whole_hashes {
        use serde::{Deserialize, Serialize};

        use crate::ids::DocId;
        use crate::wire::SignedHash;

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Request {
            V1(RequestV1),
        }

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum RequestV1 {
            Sync {
                doc: DocId,
                #[serde(with = "serde_bytes")]
                data: Vec<u8>,
                sigs: Vec<SignedHash>,
                #[serde(default, skip_serializing_if = "std::ops::Not::not")]
                answer: bool,
                #[serde(default, skip_serializing_if = "std::ops::Not::not")]
                documents: bool,
            },
        }

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Response {
            V1(ResponseV1),
        }

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum ResponseV1 {
            Ack,
            Refused {
                reason: String,
            },
            Busy,
            Answer {
                #[serde(with = "serde_bytes")]
                data: Vec<u8>,
                #[serde(default, skip_serializing_if = "std::ops::Not::not")]
                documents: bool,
            },
        }
    }

    /// A request and an answer of this version, with every flag said, read
    /// by a node of an earlier version (codec types `Req`, `Resp`): they
    /// must read as `old_request` and `old_answer`. Returns how those two,
    /// written by that node, read here.
    async fn with_an_earlier_node<Req, Resp>(
        old_request: Req,
        old_answer: Resp,
    ) -> (Request, Response)
    where
        Req: Serialize + DeserializeOwned + Send + Clone + PartialEq + std::fmt::Debug,
        Resp: Serialize + DeserializeOwned + Send + Clone + PartialEq + std::fmt::Debug,
    {
        let mut ours = SyncCodec::new(Arc::default());
        let mut theirs = cbor::codec::Codec::<Req, Resp>::default()
            .set_request_size_maximum(wire::MAX_REQUEST_BYTES)
            .set_response_size_maximum(wire::MAX_RESPONSE_BYTES);
        let body = written(&mut ours, &v1(), request(3)).await;
        let theirs_read = theirs
            .read_request(&v1(), &mut &body[..])
            .await
            .expect("the earlier node reads the request");
        assert_eq!(theirs_read, old_request);
        let mut from_them = Vec::new();
        theirs
            .write_request(&v1(), &mut from_them, old_request)
            .await
            .expect("writes");
        let request_read = read(&mut ours, &v1(), &from_them).await.expect("reads");
        let mut body = Vec::new();
        ours.write_response(
            &v1(),
            &mut body,
            Response::V1(ResponseV1::Answer {
                data: vec![0x42; 300],
                documents: true,
                prefixed: true,
                compressed: true,
                vouched: true,
            }),
        )
        .await
        .expect("writes");
        let theirs_read = theirs
            .read_response(&v1(), &mut &body[..])
            .await
            .expect("the earlier node reads the answer");
        assert_eq!(theirs_read, old_answer);
        let mut body = Vec::new();
        theirs
            .write_response(&v1(), &mut body, old_answer)
            .await
            .expect("writes");
        let answer_read = ours
            .read_response(&v1(), &mut &body[..])
            .await
            .expect("reads");
        (request_read, answer_read)
    }

    /// A node of the version before `prefixed` and `compressed` reads a
    /// request that says them (and carries whole hashes, as it is sent
    /// them) and an answer that says them as ones that do not; what it
    /// sends reads here as reading neither, so it is sent whole hashes and
    /// uncompressed documents, as before.
    #[tokio::test]
    async fn nodes_that_read_only_whole_hashes_read_requests_and_answers_that_offer_prefixes() {
        let Request::V1(RequestV1::Sync {
            doc, data, sigs, ..
        }) = request(3);
        let (request_read, answer_read) = with_an_earlier_node(
            whole_hashes::Request::V1(whole_hashes::RequestV1::Sync {
                doc,
                data,
                sigs,
                answer: true,
                documents: true,
            }),
            whole_hashes::Response::V1(whole_hashes::ResponseV1::Answer {
                data: vec![0x42; 300],
                documents: true,
            }),
        )
        .await;
        assert!(
            matches!(
                &request_read,
                Request::V1(RequestV1::Sync {
                    documents: true,
                    prefixed: false,
                    compressed: false,
                    signed,
                    sigs,
                    ..
                }) if signed.is_empty() && sigs.len() == 3
            ),
            "{request_read:?}"
        );
        assert_eq!(
            answer_read,
            Response::V1(ResponseV1::Answer {
                data: vec![0x42; 300],
                documents: true,
                prefixed: false,
                compressed: false,
                vouched: false,
            })
        );
    }

    /// The shapes of nodes that answer in acknowledgements but read no
    /// whole documents (before `documents`).
    mod answering {
        use serde::{Deserialize, Serialize};

        use crate::ids::DocId;
        use crate::wire::SignedHash;

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Request {
            V1(RequestV1),
        }

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum RequestV1 {
            Sync {
                doc: DocId,
                #[serde(with = "serde_bytes")]
                data: Vec<u8>,
                sigs: Vec<SignedHash>,
                #[serde(default, skip_serializing_if = "std::ops::Not::not")]
                answer: bool,
            },
        }

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Response {
            V1(ResponseV1),
        }

        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub enum ResponseV1 {
            Ack,
            Refused {
                reason: String,
            },
            Busy,
            Answer {
                #[serde(with = "serde_bytes")]
                data: Vec<u8>,
            },
        }
    }

    /// A node of the version before `documents` reads a request and an
    /// answer that say it as ones that do not, and what it sends reads
    /// here as not taking whole documents: it is sent changes, as before.
    #[tokio::test]
    async fn nodes_that_read_no_whole_documents_read_requests_and_answers_that_offer_them() {
        let Request::V1(RequestV1::Sync {
            doc, data, sigs, ..
        }) = request(3);
        let (request_read, answer_read) = with_an_earlier_node(
            answering::Request::V1(answering::RequestV1::Sync {
                doc,
                data,
                sigs,
                answer: true,
            }),
            answering::Response::V1(answering::ResponseV1::Answer {
                data: vec![0x42; 300],
            }),
        )
        .await;
        assert!(
            matches!(
                request_read,
                Request::V1(RequestV1::Sync {
                    answer: true,
                    documents: false,
                    ..
                })
            ),
            "{request_read:?}"
        );
        assert_eq!(
            answer_read,
            Response::V1(ResponseV1::Answer {
                data: vec![0x42; 300],
                documents: false,
                prefixed: false,
                compressed: false,
                vouched: false,
            })
        );
    }

    #[tokio::test]
    async fn an_answer_reads_back_and_is_counted_both_ways() {
        let counters = Arc::new(WireCounters::default());
        let mut codec = SyncCodec::new(Arc::clone(&counters));
        let answer = Response::V1(ResponseV1::Answer {
            data: vec![0x42; 300],
            documents: true,
            prefixed: true,
            compressed: true,
            vouched: true,
        });
        for resp in [answer.clone(), Response::V1(ResponseV1::Ack)] {
            let mut body = Vec::new();
            codec
                .write_response(&v2(), &mut body, resp.clone())
                .await
                .expect("writes");
            let read = codec
                .read_response(&v2(), &mut &body[..])
                .await
                .expect("reads");
            assert_eq!(read, resp);
        }
        assert_eq!(
            (counters.answers_sent(), counters.answers_received()),
            (1, 1)
        );
        // The largest answer a node sends fits in the largest response.
        let largest = Response::V1(ResponseV1::Answer {
            data: vec![0xff; wire::MAX_ANSWER_BYTES],
            documents: true,
            prefixed: true,
            compressed: true,
            vouched: true,
        });
        let mut body = Vec::new();
        codec
            .write_response(&v2(), &mut body, largest.clone())
            .await
            .expect("writes");
        assert!(
            body.len() as u64 <= wire::MAX_RESPONSE_BYTES,
            "{} B",
            body.len()
        );
        assert_eq!(
            codec
                .read_response(&v2(), &mut &body[..])
                .await
                .expect("reads"),
            largest
        );
    }
}
