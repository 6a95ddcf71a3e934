//! The daemon core both node kinds run: one actor task that owns the sync
//! engine, the store and the libp2p swarm, and a cloneable [`Handle`] through
//! which the HTTP API reads and writes.
//!
//! Order of effects is the durability contract: a batch of changes is
//! committed (fsynced) before any message that carries it is sent, before an
//! incoming message is acknowledged, and before a local write is reported
//! back to its caller. A store that cannot write stops the node (fail-stop):
//! carrying on would acknowledge what is not on disk.
//!
//! The fsync runs on a thread of its own ([`Durability`]), so the actor goes
//! on applying while the disk catches up, and batches written meanwhile
//! reach the disk with one fsync (group commit). Until then, what depends on
//! them waits: outgoing messages and acknowledgements are held in order, and
//! a local write's caller waits for the batch's ticket. Changes are readable
//! through the API as soon as they are applied: a change received from a
//! peer is durable at that peer already, and a local write that a crash
//! takes back was never acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::transaction::Transaction;
use automerge::{ActorId, ChangeHash};
use futures::{FutureExt as _, StreamExt};
use libp2p::request_response::{self, InboundRequestId, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::authorship::{SIGNATURE_LEN, Signer, Writers};
use crate::codec::WireCounters;
use crate::datadir::{Replicate, Role};
use crate::engine::{
    Activity, ChangeError, DocumentsFrom, Effects, Engine, Outgoing, PeerStats, Signatures,
    SyncError,
};
use crate::identity::{Identity, actor_id_of_peer};
use crate::ids::{DocId, QuarterSlug};
use crate::read_ahead::Readers;
use crate::schema::{self, SchemaError};
use crate::store::{Batch, Store, StoreError};
use crate::transport::{self, Behaviour, BehaviourEvent, TransportError};
use crate::wire::{self, Request, RequestV1, Response, ResponseV1, SignedHash};

/// Interval of the engine's timer (retries, stalled sessions, redial, compaction).
const TICK: Duration = Duration::from_millis(250);
/// A turn of the event loop that takes longer is logged (debug).
const SLOW_TURN: Duration = Duration::from_millis(50);

/// A quarter node redials the centre this often while disconnected.
const REDIAL: Duration = Duration::from_secs(1);

/// How long a quarter node goes without the centre before it pushes its own
/// document to the other quarters directly: long enough that a restarting
/// centre does not set that off.
const CENTRE_GRACE: Duration = Duration::from_secs(3);

/// A quarter node also pushes its own document to the other quarters while
/// a message to the centre has gone unanswered this long, nothing else came
/// from the centre meanwhile, no ping to it succeeded for
/// [`CENTRE_PONG_FRESH`], and the centre has not confirmed the quarter's
/// own changes. Long enough that a centre slowed by a catch-up of many
/// quarters at once is not taken for a partitioned one.
const CENTRE_STALL: Duration = Duration::from_secs(10);

/// A ping the centre answered within this long shows the path to it works:
/// a centre that is slow to answer sync messages is busy, not cut off, and
/// quarters pushing their documents to each other would only add to its
/// load (see `docs/benchmarks.md`). One ping interval plus slack, so a
/// working connection always has a fresh answer.
const CENTRE_PONG_FRESH: Duration = Duration::from_secs(15);

/// A quarter node also relays what it holds to the other quarters once the
/// centre has been gone this long (until then each pushes its own document).
/// Relaying is for quarters that cannot reach each other directly, which
/// matters in a long outage; pushing their own documents already covers
/// those that can. A starved centre can fail handshakes for minutes (three,
/// at 64 quarters × 1,000 concerns on two cores), and relaying every
/// document over every pair of quarters then multiplied the traffic about
/// four times (`docs/benchmarks.md`).
const CENTRE_OUTAGE: Duration = Duration::from_secs(300);

/// Longest wait between dials of an unreachable neighbouring quarter.
const MAX_NEIGHBOUR_BACKOFF: Duration = Duration::from_secs(60);

/// Compact a document once this many loose changes have piled up and no
/// sync message came for [`COMPACT_WHEN_QUIET`]: saving a document whole
/// costs about as much as applying its changes, so a node catching up does
/// it afterwards, once per document, rather than midway.
const COMPACT_AFTER_CHANGES: usize = 512;

/// See [`COMPACT_AFTER_CHANGES`].
const COMPACT_WHEN_QUIET: Duration = Duration::from_secs(2);

/// A document with this many loose changes is compacted even while sync
/// messages keep coming, so a node that is never quiet still compacts.
const COMPACT_ANYWAY_CHANGES: usize = 16 * COMPACT_AFTER_CHANGES;

/// How much a stored chunk counts towards compacting its document
/// ([`COMPACT_AFTER_CHANGES`]): a change one, a whole document stored as
/// it came (`chunks::is_document`) the threshold itself, so the node
/// compacts it into the document's snapshot once quiet. Left loose in the
/// store's tree of changes, next to the small entries later writes add,
/// the whole documents made those writes dearer (`perf` showed sled
/// splitting and rewriting pages inside `Store::write`): with them
/// compacted, the quarters spent 6 % less CPU per live write at
/// 64 × 1,000 (`docs/benchmarks.md`, runs 124 to 129).
fn loose_weight(chunk: &[u8]) -> usize {
    if crate::chunks::is_document(chunk) {
        COMPACT_AFTER_CHANGES
    } else {
        crate::chunks::count(chunk)
    }
}

/// On a clean stop, compact every document with at least this many.
const COMPACT_ON_STOP_CHANGES: usize = 16;

/// Capacity of the command channel: callers wait when the actor is busy.
const COMMAND_QUEUE: usize = 256;

/// Requests held while the node loads its documents at start-up (see
/// `Actor::run`): enough that requests which run at once (status, own
/// writes) are not stuck behind a burst of others during the load.
const HELD_JOBS: usize = 4096;

/// Events taken from the network and not yet handled (see `Actor::run`):
/// at most this many, and at most [`INBOX_BYTES`] in all, counting each
/// event's own size and the sync messages in it. A quarter that receives
/// the roster opens a session for every document at once, so a centre
/// with 64 quarters is sent about 4,000 small messages within seconds
/// (`docs/benchmarks.md`: with room for 1,024 the inbox filled and new
/// connections waited 4 s again in run 88; up to 2,558 waited in it at
/// once in run 89); messages with changes are bounded by each peer's
/// window (`engine::PEER_WINDOW`).
const INBOX_EVENTS: usize = 16 * 1024;
const INBOX_BYTES: usize = 64 << 20;

/// The network events a node has taken from the swarm and not handled
/// yet, at most [`INBOX_EVENTS`] and [`INBOX_BYTES`]: those that go first
/// (`Actor::take_in` says which), in order, then the rest, in order.
#[derive(Debug)]
struct Inbox<E> {
    first: VecDeque<(E, usize)>,
    rest: VecDeque<(E, usize)>,
    bytes: usize,
}

impl<E> Default for Inbox<E> {
    fn default() -> Self {
        Self {
            first: VecDeque::new(),
            rest: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<E> Inbox<E> {
    fn has_room(&self) -> bool {
        self.len() < INBOX_EVENTS && self.bytes < INBOX_BYTES
    }

    fn len(&self) -> usize {
        self.first.len() + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `event`, counted as `bytes`, ahead of the rest if `first`.
    fn push(&mut self, event: E, bytes: usize, first: bool) {
        self.bytes += bytes;
        match first {
            true => self.first.push_back((event, bytes)),
            false => self.rest.push_back((event, bytes)),
        }
    }

    fn pop(&mut self) -> Option<E> {
        let (event, bytes) = self.first.pop_front().or_else(|| self.rest.pop_front())?;
        self.bytes -= bytes;
        Some(event)
    }
}

/// Sync requests a peer may send per second on average, and in a burst.
const REQUESTS_PER_SECOND: f64 = 200.0;
const REQUEST_BURST: f64 = 400.0;

/// A token bucket: one peer's request allowance.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full() -> Self {
        Self {
            tokens: REQUEST_BURST,
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * REQUESTS_PER_SECOND;
        self.tokens = (self.tokens + refill).min(REQUEST_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the replicator is started with.
#[derive(Debug)]
pub struct ReplicatorConfig {
    pub identity: Identity,
    pub role: Role,
    /// The document this node writes (`city` or its quarter's).
    pub own_doc: DocId,
    pub listen: Multiaddr,
    /// Quarter nodes: the address other quarters should dial, when `listen`
    /// is a wildcard or not reachable as is.
    pub advertise: Option<Multiaddr>,
    /// Quarter nodes: the centre's PeerId and address.
    pub center: Option<(PeerId, Multiaddr)>,
    pub store: Store,
    /// The federation's pre-shared key, if it runs as a private network.
    pub psk: Option<transport::PreSharedKey>,
    /// Quarter nodes: which quarter documents it replicates (the centre
    /// replicates every quarter's whatever this says).
    pub replicate: Replicate,
}

/// Why the replicator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("node key: {0}")]
    Key(String),
    #[error("the replicator task ended abnormally: {0}")]
    Crashed(String),
    #[error("stored document {doc} cannot be loaded: {reason}")]
    Load { doc: DocId, reason: String },
    #[error("the node has stopped")]
    Stopped,
}

/// Why a local write was not made.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("this node does not own {0}; only its owner may write it")]
    NotOwner(DocId),
    #[error(transparent)]
    Invalid(#[from] SchemaError),
    #[error("the node has stopped")]
    Stopped,
}

type Job = Box<dyn FnOnce(&mut Actor) + Send>;

/// What loads at start-up off the actor: the documents, each with why it
/// did not load, and the stored signatures (needed only to send changes,
/// so only once the node joins the network).
struct Loaded {
    docs: Vec<(DocId, Result<automerge::Automerge, String>)>,
    signatures: Result<crate::authorship::SignatureTable, StoreError>,
}

enum Command {
    /// Runs once every stored document is loaded (see [`Actor::new`]).
    Job(Job),
    /// Runs at once, even while the other documents still load: it may
    /// touch only the node's own document, the city document and the store.
    Now(Job),
    Shutdown,
}

/// Builds the stored documents on as many threads as there are cores
/// (automerge loads one document on one core), in the order given; a
/// document that fails to load says why. Each document's stored bytes are
/// dropped as soon as it is built, so the bytes of every document and the
/// documents built from them are not all held at once.
fn load_in_parallel(
    stored: Vec<crate::store::StoredDoc>,
    actor: &automerge::ActorId,
) -> Vec<(DocId, Result<automerge::Automerge, String>)> {
    let load = |doc: crate::store::StoredDoc| {
        let chunks = doc.chunks.iter().map(Vec::as_slice);
        match std::panic::catch_unwind(|| crate::engine::load_chunks(&doc.id, actor, chunks)) {
            Ok(Ok(am)) => Ok(am),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("automerge panicked loading it".to_string()),
        }
    };
    let ids: Vec<DocId> = stored.iter().map(|doc| doc.id.clone()).collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, ids.len().max(1));
    // Each thread takes the next document not yet taken, so a thread that
    // was slowed (by a big document, or by the node's other threads on the
    // same cores) takes fewer; each comes back to its place in the input.
    let queue = std::sync::Mutex::new(stored.into_iter().enumerate());
    let mut loaded: Vec<Option<Result<automerge::Automerge, String>>> =
        ids.iter().map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        // A poisoned queue ends this thread; what it did not
                        // build is reported below.
                        let next = queue.lock().ok().and_then(|mut q| q.next());
                        let Some((i, doc)) = next else {
                            return done;
                        };
                        done.push((i, load(doc)));
                    }
                })
            })
            .collect();
        for (i, am) in workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
        {
            if let Some(slot) = loaded.get_mut(i) {
                *slot = Some(am);
            }
        }
    });
    ids.into_iter()
        .zip(loaded)
        .map(|(id, am)| {
            let am = am.unwrap_or_else(|| Err("its loading thread stopped".to_string()));
            (id, am)
        })
        .collect()
}

/// A cloneable handle to the running replicator.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    own_doc: DocId,
    role: Role,
    /// Counts changes to what a page shows: documents and connections.
    changed: watch::Receiver<u64>,
    /// Every document's heads, published by the actor after each batch of
    /// changes, so reading them never waits for the actor.
    heads: watch::Receiver<Heads>,
    /// The last store ticket known durable (see [`Durability`]).
    durable: watch::Receiver<u64>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Job(_) => "Job",
            Command::Now(_) => "Now",
            Command::Shutdown => "Shutdown",
        })
    }
}

impl Handle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The document this node writes.
    pub fn own_doc(&self) -> &DocId {
        &self.own_doc
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The node's status. Answers while the node still loads its documents
    /// at start-up: [`Status::loading`] then counts those not yet loaded,
    /// which `documents` does not list yet.
    pub async fn status(&self) -> Result<Status, ReplicatorError> {
        self.read_now(|view| view.status()).await
    }

    /// Runs `f` on a read-only view at once, even while the node still
    /// loads its documents at start-up. Until [`View::loading`] is 0, only
    /// the node's own document and the city document are there: `f` must
    /// not take a missing document for an empty one.
    pub async fn read_now<R: Send + 'static>(
        &self,
        f: impl FnOnce(View<'_>) -> R + Send + 'static,
    ) -> Result<R, ReplicatorError> {
        self.run_now(move |actor| f(actor.view())).await
    }

    /// A counter that moves whenever a document changes (a local write or
    /// a change from a peer) or a peer connects or disconnects; pages wait
    /// on it to refresh.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// Every entry of the store, read in one step of the actor (the only
    /// writer), so the copy is consistent.
    pub async fn export_store(&self) -> Result<crate::store::StoreExport, ReplicatorError> {
        self.run_now(|actor| actor.store.export())
            .await?
            .map_err(ReplicatorError::from)
    }

    /// Every replicated document's heads, with the version they belong to
    /// (cheap: no change counts, no store size, unlike [`View::status`]).
    /// Read from what the actor last published, so a node busy catching up
    /// still answers at once.
    pub async fn heads(&self) -> Result<Heads, ReplicatorError> {
        if self.tx.is_closed() {
            return Err(ReplicatorError::Stopped);
        }
        Ok(self.heads.borrow().clone())
    }

    /// Waits until the node's documents changed after `version` (see
    /// [`Heads::version`]), for at most `timeout`. Returns at once if they
    /// already have; a timeout is not an error, the caller reads again.
    pub async fn changed_after(&self, version: u64, timeout: Duration) {
        let mut rx = self.heads.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|h| h.version > version)).await;
    }

    /// Runs `f` on the actor once every stored document is loaded.
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Actor) -> R + Send + 'static,
    ) -> Result<R, ReplicatorError> {
        self.send(f, Command::Job).await
    }

    /// Runs `f` on the actor at once, even while the documents other than
    /// the node's own and the city's still load (see [`Command::Now`]).
    async fn run_now<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Actor) -> R + Send + 'static,
    ) -> Result<R, ReplicatorError> {
        self.send(f, Command::Now).await
    }

    async fn send<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Actor) -> R + Send + 'static,
        command: fn(Job) -> Command,
    ) -> Result<R, ReplicatorError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |actor| {
            let _ = tx.send(f(actor));
        });
        self.tx
            .send(command(job))
            .await
            .map_err(|_| ReplicatorError::Stopped)?;
        rx.await.map_err(|_| ReplicatorError::Stopped)
    }

    /// Runs `f` on a read-only view of the node's state, once the node has
    /// loaded every stored document (at start-up, that waits for the load).
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(View<'_>) -> R + Send + 'static,
    ) -> Result<R, ReplicatorError> {
        self.run(move |actor| f(actor.view())).await
    }

    /// Writes node-local data (never replicated), durably.
    pub async fn local_put(&self, key: String, value: Vec<u8>) -> Result<(), ReplicatorError> {
        self.run_now(move |actor| actor.store.local_put(&key, &value))
            .await?
            .map_err(ReplicatorError::from)
    }

    /// Reads node-local data.
    pub async fn local_get(&self, key: String) -> Result<Option<Vec<u8>>, ReplicatorError> {
        self.run_now(move |actor| actor.store.local_get(&key))
            .await?
            .map_err(ReplicatorError::from)
    }

    /// Writes node-local data durably unless `key` is taken; returns whether
    /// it was written (check and write in one step of the actor).
    pub async fn local_put_new(
        &self,
        key: String,
        value: Vec<u8>,
    ) -> Result<bool, ReplicatorError> {
        self.run_now(move |actor| actor.store.local_put_new(&key, &value))
            .await?
            .map_err(ReplicatorError::from)
    }

    /// Node-local entries whose keys start with `prefix`.
    pub async fn local_scan(
        &self,
        prefix: String,
    ) -> Result<Vec<(String, Vec<u8>)>, ReplicatorError> {
        self.run_now(move |actor| actor.store.local_scan(&prefix))
            .await?
            .map_err(ReplicatorError::from)
    }

    /// Reads what a write depends on (the city's frame, a consultation's
    /// deadline…) and writes `doc` in the same step of the actor, so no other
    /// change comes between the check and the write. At start-up it waits
    /// until every stored document is loaded, as [`Handle::read`] does.
    pub async fn write_with<C: Send + 'static, R: Send + 'static>(
        &self,
        doc: DocId,
        read: impl FnOnce(&View<'_>) -> Result<C, SchemaError> + Send + 'static,
        write: impl FnOnce(C, &mut Transaction<'_>) -> Result<R, SchemaError> + Send + 'static,
    ) -> Result<R, WriteError> {
        let (value, ticket) = self
            .run(move |actor| {
                let context = read(&actor.view())?;
                let value = actor.local_write(&doc, |tx| write(context, tx))?;
                Ok::<_, WriteError>((value, actor.written))
            })
            .await
            .map_err(|_| WriteError::Stopped)??;
        self.durable_after(ticket).await?;
        Ok(value)
    }

    /// Waits until the store write with `ticket` is durable.
    async fn durable_after(&self, ticket: u64) -> Result<(), WriteError> {
        let mut durable = self.durable.clone();
        durable
            .wait_for(|d| *d >= ticket)
            .await
            .map(|_| ())
            .map_err(|_| WriteError::Stopped)
    }

    /// Writes `doc` (which this node must own) and returns once the change
    /// is durable on disk; it is then pushed to every connected peer. Runs
    /// while the node still loads the other documents at start-up: its own
    /// document is loaded first.
    pub async fn write<R: Send + 'static>(
        &self,
        doc: DocId,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, SchemaError> + Send + 'static,
    ) -> Result<R, WriteError> {
        let (value, ticket) = self
            .run_now(move |actor| {
                let value = actor.local_write(&doc, f)?;
                Ok::<_, WriteError>((value, actor.written))
            })
            .await
            .map_err(|_| WriteError::Stopped)??;
        self.durable_after(ticket).await?;
        Ok(value)
    }
}

/// A read-only look at the node's state, valid inside [`Handle::read`].
#[derive(Debug)]
pub struct View<'a> {
    pub engine: &'a Engine<PeerId>,
    pub role: Role,
    pub peer_id: PeerId,
    pub own_doc: &'a DocId,
    /// Which quarter documents the node replicates.
    pub replicate: Replicate,
    connected: &'a BTreeSet<PeerId>,
    refusals: Refusals,
    listen: Vec<String>,
    started: (Instant, SystemTime),
    store_bytes: u64,
    loading: usize,
    wire: WireBytes,
}

/// The heads of every document, with the version they belong to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Heads {
    /// Grows with every batch of document changes this node applies.
    pub version: u64,
    /// Document id → its heads (hex change hashes, sorted).
    pub documents: BTreeMap<String, Vec<String>>,
    /// Stored documents still loading at start-up, not in `documents` yet
    /// (see [`Status::loading`]).
    #[serde(default)]
    pub loading: usize,
}

/// The node's status as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub peer_id: String,
    pub role: Role,
    pub own_doc: String,
    /// Which quarter documents the node replicates: `all` (the roster's)
    /// or `own` (its own quarter's and the city's).
    #[serde(default)]
    pub replicate: Replicate,
    pub listen: Vec<String>,
    pub store_bytes: u64,
    /// What this node refused since it started.
    pub refusals: Refusals,
    pub documents: Vec<DocStatus>,
    pub peers: Vec<PeerStatus>,
    /// Stored documents still loading at start-up (not in `documents` yet);
    /// the node joins the network once this is 0.
    #[serde(default)]
    pub loading: usize,
    /// What the sync streams carried, as written on them.
    #[serde(default)]
    pub wire: WireBytes,
}

/// Bytes on the node's sync streams since it started, as written on them:
/// requests (deflated between nodes of this version, `crate::codec`) and
/// responses, without libp2p's framing, Noise or Yamux. The peers' counters
/// in [`Status`] count the sync messages themselves, before deflate.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireBytes {
    pub sent: u64,
    pub received: u64,
    /// Sync messages this node sent in its acknowledgement of a peer's
    /// message rather than as a request of their own
    /// (`wire::ResponseV1::Answer`), and received so from peers.
    #[serde(default)]
    pub answers_sent: u64,
    #[serde(default)]
    pub answers_received: u64,
    /// Large requests sent with the body deflated for an identical one
    /// before (a whole document to many quarters), not deflated again.
    #[serde(default)]
    pub bodies_reused: u64,
}

/// Counters of refused input, for `status` (peers that are up also carry their own).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refusals {
    /// Connections refused at admission (not on the roster, or over a limit).
    pub connections: u64,
    /// Requests refused before the sync engine (malformed, or from a non-partner).
    pub requests: u64,
    /// Requests refused because their peer sent more than its rate allows.
    pub rate_limited: u64,
    /// Sync messages refused by the engine (malformed, hostile, unauthorised changes).
    pub messages: u64,
    /// Changes refused for their authorship.
    pub changes: u64,
}

/// One document in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DocStatus {
    pub id: String,
    pub heads: Vec<String>,
    pub changes: usize,
    pub schema_version: Option<u64>,
}

/// One peer in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer_id: String,
    pub connected: bool,
    /// Unix time (ms) of the last sync message received from it.
    pub last_sync_ms: Option<u64>,
    #[serde(flatten)]
    pub stats: PeerStats,
}

impl View<'_> {
    /// Converts engine time to unix milliseconds.
    pub fn wall_ms(&self, engine_ms: u64) -> u64 {
        let started = self
            .started
            .1
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        started + engine_ms
    }

    /// The quarter documents this node replicates, with their slugs.
    pub fn quarter_docs(&self) -> crate::workflows::QuarterDocs<'_> {
        self.engine
            .docs()
            .filter(|(id, _)| self.engine.accepts(id))
            .filter_map(|(id, am)| id.quarter_slug().map(|q| (q.clone(), am)))
            .collect()
    }

    /// The city document (every node holds one, from genesis on).
    pub fn city(&self) -> Option<&automerge::Automerge> {
        self.engine.doc(&DocId::City)
    }

    /// The quarters on the roster.
    pub fn roster_slugs(&self) -> Vec<QuarterSlug> {
        self.city()
            .and_then(|c| schema::roster(c).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected.contains(peer)
    }

    /// Peers with an open connection (sync partners or not yet).
    pub fn connected_count(&self) -> usize {
        self.connected.len()
    }

    /// The refusal counters (as in [`Status`]).
    pub fn refusals(&self) -> Refusals {
        self.refusals
    }

    /// Bytes the store occupies on disk.
    pub fn store_bytes(&self) -> u64 {
        self.store_bytes
    }

    /// Addresses the node listens on, with `/p2p/<PeerId>`.
    pub fn listen_addrs(&self) -> &[String] {
        &self.listen
    }

    /// Seconds since the node started.
    pub fn uptime_secs(&self) -> u64 {
        self.started.0.elapsed().as_secs()
    }

    /// Stored documents still loading at start-up (0 once all are loaded).
    pub fn loading(&self) -> usize {
        self.loading
    }

    /// Bytes on the sync streams (see [`WireBytes`]).
    pub fn wire(&self) -> WireBytes {
        self.wire
    }

    pub fn status(&self) -> Status {
        let documents = self
            .engine
            .docs()
            .filter(|(id, _)| self.engine.accepts(id))
            .map(|(id, am)| DocStatus {
                id: id.to_string(),
                heads: am.get_heads().iter().map(|h| h.to_string()).collect(),
                changes: am.get_changes_meta(&[]).len(),
                schema_version: schema::schema_version(am),
            })
            .collect();
        let peers = self
            .engine
            .peers()
            .map(|(p, stats)| PeerStatus {
                peer_id: p.to_string(),
                connected: self.connected.contains(p),
                last_sync_ms: stats.last_received_ms.map(|t| self.wall_ms(t)),
                stats: stats.clone(),
            })
            .collect();
        Status {
            peer_id: self.peer_id.to_string(),
            role: self.role,
            own_doc: self.own_doc.to_string(),
            replicate: self.replicate,
            listen: self.listen.clone(),
            store_bytes: self.store_bytes,
            refusals: self.refusals,
            documents,
            peers,
            loading: self.loading,
            wire: self.wire,
        }
    }
}

/// The running replicator: its handle and the task that owns its state.
#[derive(Debug)]
pub struct Replicator {
    handle: Handle,
    task: JoinHandle<Result<(), ReplicatorError>>,
}

impl Replicator {
    /// Loads the store, starts listening and runs the actor. Returns once
    /// the node's own document and the city document are loaded; the other
    /// documents load behind it (see [`Actor::new`]).
    pub async fn spawn(config: ReplicatorConfig) -> Result<Self, ReplicatorError> {
        Self::run_actor(Actor::new(config)?)
    }

    fn run_actor(mut actor: Actor) -> Result<Self, ReplicatorError> {
        actor.start()?;
        if actor.pending_load.is_none() {
            actor.loaded(Loaded {
                docs: Vec::new(),
                signatures: Ok(Default::default()),
            });
            if let Some(e) = actor.fatal.take() {
                return Err(e);
            }
        }
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let handle = Handle {
            tx,
            peer_id: actor.peer_id,
            own_doc: actor.own_doc.clone(),
            role: actor.role,
            changed: actor.changed.subscribe(),
            heads: actor.heads.subscribe(),
            durable: actor.durable_tx.subscribe(),
        };
        let task = tokio::spawn(actor.run(rx));
        Ok(Self { handle, task })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Stops the actor and waits for it; returns the error it stopped with.
    pub async fn shutdown(self) -> Result<(), ReplicatorError> {
        let _ = self.handle.tx.send(Command::Shutdown).await;
        self.wait().await
    }

    /// Waits until the actor stops by itself (a fatal error).
    pub async fn wait(self) -> Result<(), ReplicatorError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ReplicatorError::Crashed(e.to_string())),
        }
    }

    /// Resolves if the actor stopped on its own.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// The state the replicator task owns.
pub struct Actor {
    engine: Engine<PeerId>,
    store: Arc<Store>,
    /// Makes store writes durable off the actor (see the module docs).
    durability: Durability,
    /// Stored documents still loading at start-up, off the actor (see
    /// [`Actor::new`]); 0 once every document is loaded.
    loading: usize,
    /// Where they come from while they load.
    pending_load: Option<oneshot::Receiver<Loaded>>,
    /// Requests that wait for every document (`Command::Job`), in order,
    /// while the node loads.
    held_jobs: VecDeque<Job>,
    /// Network events taken from the swarm, handled one per turn (see
    /// `Actor::run` and `take_in`).
    inbox: Inbox<SwarmEvent<BehaviourEvent>>,
    /// Large sync messages in the inbox, read on other cores before their
    /// turn (see `take_in`).
    readers: Readers<InboundRequestId>,
    /// The actor (key) of each sync partner that sent a message, read off
    /// its peer id (`Actor::writes`); at most one per peer ever allowed.
    actors: HashMap<PeerId, Option<ActorId>>,
    /// Ticket of the last store write that must reach the disk.
    written: u64,
    /// Ticket of the last store write known durable.
    durable: u64,
    durable_tx: watch::Sender<u64>,
    /// Which write each document's messages and acknowledgements wait for.
    tickets: Tickets,
    /// Messages and acknowledgements waiting for a write to be durable,
    /// with its ticket, in the order they were made.
    held_sends: VecDeque<(u64, Vec<Outgoing<PeerId>>)>,
    held_acks: VecDeque<(u64, HeldAck)>,
    /// Sync states not yet stored, the newest of each (peer, document)
    /// session (see `Actor::apply`).
    unstored_sync: BTreeMap<(String, DocId), Vec<u8>>,
    swarm: Swarm<Behaviour>,
    /// What the sync streams carried (see `WireBytes`).
    wire: Arc<WireCounters>,
    role: Role,
    peer_id: PeerId,
    own_doc: DocId,
    /// Which quarter documents this node replicates (`All` at the centre,
    /// whatever its config says).
    replicate: Replicate,
    listen: Multiaddr,
    advertise: Option<Multiaddr>,
    center: Option<(PeerId, Multiaddr)>,
    /// Peers this node syncs with (centre: roster writers; quarter: the centre).
    allowed: BTreeSet<PeerId>,
    connected: BTreeSet<PeerId>,
    /// Requests in flight: their (peer, document, session epoch).
    pending: HashMap<OutboundRequestId, (PeerId, DocId, u64)>,
    /// This node's messages travelling as the response to a peer's request
    /// (`ResponseV1::Answer`): their (peer, document, session epoch), until
    /// the response is written or fails.
    answering: HashMap<InboundRequestId, (PeerId, DocId, u64)>,
    /// Loose changes stored per document since its last compaction, a
    /// whole document stored as it came counted as a compaction's worth
    /// (`loose_weight`).
    chunks: HashMap<DocId, usize>,
    started: (Instant, SystemTime),
    next_dial: Instant,
    /// Quarter nodes: since when the centre is not connected.
    centre_down_since: Option<Instant>,
    /// When a sync message or answer last came from each peer.
    heard: HashMap<PeerId, Instant>,
    /// Quarter nodes: when the first message to the centre since anything
    /// last came from it was sent (failed requests count: they went
    /// unanswered too).
    centre_waiting_since: Option<Instant>,
    /// Quarter nodes: when a ping to the centre last succeeded.
    centre_pong: Option<Instant>,
    /// Quarters' writer nodes (other than this one) and where they listen
    /// (from their documents; at the centre also from the roster), dialled
    /// directly: see `refresh_neighbours`.
    neighbours: HashMap<PeerId, Vec<Multiaddr>>,
    /// The same per quarter, and the roster they were read with.
    neighbours_of: BTreeMap<QuarterSlug, Vec<(PeerId, Multiaddr)>>,
    /// Documents changed since the neighbours were last read from them
    /// (read again at the next tick, not after every message).
    neighbours_due: BTreeSet<DocId>,
    /// The roster as last read from the city document, and the city
    /// document's heads it was read at (see [`Actor::roster`]).
    roster: Vec<(QuarterSlug, schema::RosterEntry)>,
    roster_heads: Option<Vec<ChangeHash>>,
    next_neighbour_dial: HashMap<PeerId, Instant>,
    neighbour_backoff: HashMap<PeerId, Duration>,
    fatal: Option<ReplicatorError>,
    /// Requests refused before they reached the engine (malformed envelope, not a partner).
    refused_requests: u64,
    /// Connections refused at admission (not on the allow list, or over a limit).
    refused_connections: u64,
    /// Requests refused because their peer was over its rate.
    rate_limited: u64,
    buckets: HashMap<PeerId, Bucket>,
    /// Moved on every document change and every connection change.
    changed: watch::Sender<u64>,
    /// Every document's heads, with a version bumped after every batch of
    /// document changes is applied, so API callers read them without
    /// waiting for the actor, and wait for the next change instead of polling.
    heads: watch::Sender<Heads>,
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl Actor {
    /// Reads the store and loads the node's own document and the city
    /// document; the others load on threads of their own, and the actor
    /// takes them in when all are loaded (`Actor::loaded`). Meanwhile
    /// the node answers what needs only those two documents (its status,
    /// its own writes: `Command::Now`) and holds everything else, and
    /// it stays off the network (no partner is allowed in and no dial goes
    /// out), so no session starts from documents not yet there. A quarter
    /// office can record a concern at once however many other quarters'
    /// documents its node holds.
    fn new(config: ReplicatorConfig) -> Result<Self, ReplicatorError> {
        let own_quarter: Vec<QuarterSlug> =
            config.own_doc.quarter_slug().cloned().into_iter().collect();
        let secret = config
            .identity
            .ed25519_secret()
            .ok_or_else(|| ReplicatorError::Key("the node key is not an ed25519 key".into()))?;
        let center_actor = match (&config.role, &config.center) {
            (Role::Center, _) => config.identity.actor_id(),
            (Role::Quarter, Some((peer, _))) => actor_id_of_peer(peer).ok_or_else(|| {
                ReplicatorError::Key(format!(
                    "the centre's PeerId {peer} does not carry an ed25519 key"
                ))
            })?,
            (Role::Quarter, None) => {
                return Err(ReplicatorError::Key(
                    "a quarter node needs the centre's PeerId".into(),
                ));
            }
        };
        let mut engine = Engine::new(
            Signer::from_secret(secret),
            Writers::new([center_actor]),
            own_quarter,
        );
        let loading = Instant::now();
        let mut chunks = HashMap::new();
        let replicate = match config.role {
            Role::Center => Replicate::All,
            Role::Quarter => config.replicate,
        };
        let (mut first, mut rest): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
        for stored in config.store.load_docs()? {
            if stored.id == config.own_doc || stored.id == DocId::City {
                first.push(stored);
            } else if replicate.is_all() {
                rest.push(stored);
            } else {
                // Stored before the node was set to replicate its own
                // quarter only: kept on disk, neither loaded nor synced.
                tracing::info!(doc = %stored.id, "not loaded: this node replicates its own quarter only");
            }
        }
        tracing::debug!(elapsed = ?loading.elapsed(), "documents read from the store");
        for stored in first.iter().chain(&rest) {
            // Loose entries, the snapshot not counted (see `compact`).
            let loose = stored
                .chunks
                .iter()
                .skip(usize::from(stored.snapshot))
                .map(|c| loose_weight(c))
                .sum::<usize>();
            chunks.insert(stored.id.clone(), loose);
        }
        for (id, loaded) in load_in_parallel(first, engine.actor()) {
            loaded
                .and_then(|am| engine.insert_loaded(&id, am).map_err(|e| e.to_string()))
                .map_err(|reason| ReplicatorError::Load {
                    doc: id.clone(),
                    reason,
                })?;
        }
        tracing::debug!(elapsed = ?loading.elapsed(), "own and city documents loaded");
        let store = Arc::new(config.store);
        let pending = rest.len();
        let pending_load = if rest.is_empty() {
            engine.load_signatures(store.signatures()?);
            None
        } else {
            // The signatures load beside the documents: the API does not
            // need them, and on two cores reading them first delayed it.
            let (tx, rx) = oneshot::channel();
            let actor = engine.actor().clone();
            let store = Arc::clone(&store);
            // If the thread cannot start or dies, the sender is dropped and
            // the actor stops with that (see `run`).
            let _ = std::thread::Builder::new()
                .name("iq-load".into())
                .spawn(move || {
                    let loaded = std::thread::scope(|scope| {
                        let signatures = scope.spawn(|| store.signatures());
                        let docs = load_in_parallel(rest, &actor);
                        // If reading them panicked, the sender is dropped.
                        let signatures = signatures.join().ok()?;
                        Some(Loaded { docs, signatures })
                    });
                    if let Some(loaded) = loaded {
                        let _ = tx.send(loaded);
                    }
                });
            Some(rx)
        };
        let wire = Arc::new(WireCounters::default());
        let swarm = transport::build_swarm(&config.identity, config.psk, Arc::clone(&wire))?;
        let actor = Self {
            engine,
            loading: pending,
            pending_load,
            held_jobs: VecDeque::new(),
            inbox: Inbox::default(),
            readers: Readers::for_this_machine(),
            actors: HashMap::new(),
            durability: Durability::start(Arc::clone(&store))?,
            store,
            written: 0,
            durable: 0,
            durable_tx: watch::Sender::new(0),
            tickets: Tickets::default(),
            held_sends: VecDeque::new(),
            held_acks: VecDeque::new(),
            unstored_sync: BTreeMap::new(),
            swarm,
            wire,
            role: config.role,
            peer_id: config.identity.peer_id(),
            own_doc: config.own_doc,
            replicate,
            listen: config.listen,
            advertise: config.advertise,
            center: config.center,
            allowed: BTreeSet::new(),
            connected: BTreeSet::new(),
            pending: HashMap::new(),
            answering: HashMap::new(),
            chunks,
            started: (Instant::now(), SystemTime::now()),
            next_dial: Instant::now(),
            centre_down_since: Some(Instant::now()),
            heard: HashMap::new(),
            centre_waiting_since: None,
            centre_pong: None,
            neighbours: HashMap::new(),
            neighbours_of: BTreeMap::new(),
            neighbours_due: BTreeSet::new(),
            roster: Vec::new(),
            roster_heads: None,
            next_neighbour_dial: HashMap::new(),
            neighbour_backoff: HashMap::new(),
            fatal: None,
            refused_requests: 0,
            refused_connections: 0,
            rate_limited: 0,
            buckets: HashMap::new(),
            changed: watch::Sender::new(0),
            heads: watch::Sender::new(Heads {
                version: 0,
                documents: BTreeMap::new(),
                loading: 0,
            }),
        };
        actor.publish_heads(None);
        Ok(actor)
    }

    /// Takes in the documents loaded at start-up, then joins the network:
    /// reads the roster (which lets partners in), finds the neighbours, and
    /// runs the requests that waited. A document that did not load stops
    /// the node with its name and the reason, as a start did before the API
    /// answered ahead of the load.
    fn loaded(&mut self, loaded: Loaded) {
        match loaded.signatures {
            Ok(sigs) => self.engine.load_signatures(sigs),
            Err(e) => {
                self.fatal = Some(e.into());
                return;
            }
        }
        let count = loaded.docs.len();
        for (id, am) in loaded.docs {
            let inserted = am.and_then(|am| {
                self.engine
                    .insert_loaded(&id, am)
                    .map_err(|e| e.to_string())
            });
            if let Err(reason) = inserted {
                self.fatal = Some(ReplicatorError::Load { doc: id, reason });
                return;
            }
        }
        self.loading = 0;
        tracing::info!(documents = count, elapsed = ?self.started.0.elapsed(), "stored documents loaded; joining the network");
        // Reading the roster also publishes every document's heads.
        if self.refresh_roster().is_err() {
            return;
        }
        self.refresh_neighbours(None);
        self.changed.send_modify(|n| *n += 1);
        // Where this node listens goes into its own document only now: a
        // start that stops on a document that did not load writes nothing.
        self.advertise();
        // Dial now rather than at the next tick, up to 250 ms away.
        self.handle_tick();
        while self.fatal.is_none() {
            let Some(job) = self.held_jobs.pop_front() else {
                break;
            };
            self.run_job(job);
        }
    }

    /// Runs one request. A request that panics (a bug, or data no check
    /// foresaw) fails alone; its caller sees the node as unavailable for
    /// that request, and the node carries on.
    fn run_job(&mut self, job: Job) {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(self)));
        if ran.is_err() {
            tracing::error!("a request panicked; it was dropped and the node carries on");
        }
    }

    fn start(&mut self) -> Result<(), ReplicatorError> {
        self.swarm
            .listen_on(self.listen.clone())
            .map_err(|e| ReplicatorError::Listen {
                addr: self.listen.to_string(),
                reason: e.to_string(),
            })?;
        if let Some((peer, addr)) = &self.center {
            self.swarm.add_peer_address(*peer, addr.clone());
        }
        Ok(())
    }

    fn now(&self) -> u64 {
        self.started.0.elapsed().as_millis() as u64
    }

    /// Publishes the heads of the `changed` documents (of all when `None`)
    /// under a new version.
    fn publish_heads(&self, changed: Option<&BTreeSet<DocId>>) {
        let engine = &self.engine;
        let heads_of = |am: &automerge::Automerge| {
            let mut heads: Vec<String> = am.get_heads().iter().map(|h| h.to_string()).collect();
            heads.sort();
            heads
        };
        self.heads.send_modify(|h| {
            h.version += 1;
            h.loading = self.loading;
            match changed {
                None => {
                    h.documents = engine
                        .docs()
                        .filter(|(id, _)| engine.accepts(id))
                        .map(|(id, am)| (id.to_string(), heads_of(am)))
                        .collect();
                }
                Some(docs) => {
                    for id in docs {
                        match engine.doc(id).filter(|_| engine.accepts(id)) {
                            Some(am) => h.documents.insert(id.to_string(), heads_of(am)),
                            None => h.documents.remove(&id.to_string()),
                        };
                    }
                }
            }
        });
    }

    fn view(&self) -> View<'_> {
        View {
            engine: &self.engine,
            role: self.role,
            peer_id: self.peer_id,
            own_doc: &self.own_doc,
            replicate: self.replicate,
            connected: &self.connected,
            refusals: Refusals {
                connections: self.refused_connections,
                // Requests that did not decode never reach the replicator:
                // the codec counts them.
                requests: self.refused_requests + self.wire.unreadable(),
                rate_limited: self.rate_limited,
                messages: self.engine.refusals().0,
                changes: self.engine.refusals().1,
            },
            listen: self
                .swarm
                .listeners()
                .map(|a| format!("{a}/p2p/{}", self.peer_id))
                .collect(),
            started: self.started,
            store_bytes: self.store.size_on_disk(),
            loading: self.loading,
            wire: WireBytes {
                sent: self.wire.sent(),
                received: self.wire.received(),
                answers_sent: self.wire.answers_sent(),
                answers_received: self.wire.answers_received(),
                bodies_reused: self.wire.bodies_reused(),
            },
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<(), ReplicatorError> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending_load = self.pending_load.take();
        loop {
            let branch: &str;
            let began: Instant;
            tokio::select! {
                // One ready branch at random: requests from the API, the
                // network's events (`inbox`) and the slices of answers and
                // relays (`flush`) share the actor, none starves the others.
                done = self.durability.done.recv() => {
                    branch = "durable";
                    began = Instant::now();
                    match done {
                        Some(Ok(ticket)) => self.now_durable(ticket),
                        Some(Err(e)) => self.fatal = Some(e.into()),
                        None => self.fatal = Some(ReplicatorError::Crashed("the durability thread stopped".into())),
                    }
                },
                loaded = async {
                    match pending_load.as_mut() {
                        Some(rx) => rx.await,
                        None => std::future::pending().await,
                    }
                }, if pending_load.is_some() => {
                    branch = "loaded";
                    began = Instant::now();
                    pending_load = None;
                    match loaded {
                        Ok(loaded) => self.loaded(loaded),
                        Err(_) => self.fatal = Some(ReplicatorError::Crashed("the thread loading the documents stopped".into())),
                    }
                },
                // While the node loads, requests that wait for it are held
                // here, up to `HELD_JOBS`; beyond that the queue fills and
                // every caller waits as it would for a busy actor.
                cmd = rx.recv(), if self.held_jobs.len() < HELD_JOBS => {
                    branch = "command";
                    began = Instant::now();
                    match cmd {
                        Some(Command::Job(job)) if self.loading > 0 => self.held_jobs.push_back(job),
                        Some(Command::Job(job) | Command::Now(job)) => self.run_job(job),
                        Some(Command::Shutdown) | None => break,
                    }
                },
                // The swarm is read until it has nothing more, and what it
                // gave is handled a turn at a time (`inbox` below): libp2p
                // takes in new connections only once its connections have
                // no events waiting, so a busy node that handled each event
                // as it came let dialling peers wait 5 to 10 s while it
                // caught up with the peers already connected.
                event = self.swarm.select_next_some(), if self.inbox.has_room() => {
                    branch = "network";
                    began = Instant::now();
                    self.take_in(event);
                    while self.inbox.has_room() {
                        match self.swarm.next().now_or_never() {
                            Some(Some(event)) => self.take_in(event),
                            _ => break,
                        }
                    }
                },
                () = std::future::ready(()), if !self.inbox.is_empty() => {
                    branch = "inbox";
                    began = Instant::now();
                    if let Some(event) = self.inbox.pop() {
                        self.handle_event(event);
                    }
                },
                _ = tick.tick() => {
                    branch = "tick";
                    began = Instant::now();
                    self.handle_tick();
                },
                () = std::future::ready(()), if self.engine.flush_due() => {
                    branch = "flush";
                    began = Instant::now();
                    self.flush();
                },
            }
            let took = began.elapsed();
            if took > SLOW_TURN {
                tracing::debug!(
                    branch,
                    ?took,
                    inbox = self.inbox.len(),
                    "slow turn of the node's event loop"
                );
            }
            if let Some(err) = self.fatal.take() {
                tracing::error!(error = %err, "stopping the node");
                return Err(err);
            }
            // The inbox and flush branches are ready whenever they have
            // work, so the loop could keep its worker thread for as long as
            // a backlog lasts; tasks woken on that worker (an API request
            // this loop just answered) would wait until it ran dry. This
            // gives the thread back once tokio's budget for the task is
            // spent (128 turns).
            tokio::task::coop::consume_budget().await;
        }
        // Whatever was written is made durable before the node goes, so
        // local writes still waiting are acknowledged; the sync states with
        // it, so the next start picks up each session where it was.
        if let Err(e) = self.store_sync_states() {
            tracing::error!(error = %e, "cannot store the last sync states");
        }
        match self.store.durable() {
            Ok(()) => {
                self.durable_tx.send_replace(self.written);
            }
            Err(e) => tracing::error!(error = %e, "cannot make the last writes durable"),
        }
        // Documents with many loose changes are saved whole, so the next
        // start loads snapshots (much faster than change by change).
        match self.compact(COMPACT_ON_STOP_CHANGES) {
            Ok(0) => {}
            Ok(n) => tracing::info!(documents = n, "compacted on stop"),
            Err(e) => tracing::warn!(error = %e, "cannot compact on stop"),
        }
        tracing::info!("replicator stopped");
        Ok(())
    }

    /// Queues a network event to be handled in its turn, counting its size
    /// and that of the sync message it carries.
    ///
    /// A sync message from a writer of its document (a quarter about its
    /// own document, the centre about the city's) goes ahead of the rest:
    /// a quarter that connects with its week's records is otherwise queued
    /// behind the other quarters' openings of sessions for every document
    /// (up to 2,900 events waited at a centre restarted under 64 quarters,
    /// `docs/benchmarks.md`, runs 105 and 106). So do the peers'
    /// connections coming up and going down, which the engine must have
    /// seen before it takes a peer's messages; a peer's connection events
    /// thus keep their order, as do a session's messages. A message of a
    /// connection that closed meanwhile may be handled after the peer went
    /// down (refused, its answer going nowhere) or came up again on another
    /// connection (taken as any message of the session).
    fn take_in(&mut self, event: SwarmEvent<BehaviourEvent>) {
        use request_response::{Event, Message};
        let (bytes, first) = match &event {
            SwarmEvent::Behaviour(BehaviourEvent::Sync(Event::Message {
                peer, message, ..
            })) => match message {
                Message::Request {
                    request_id,
                    request:
                        Request::V1(RequestV1::Sync {
                            doc,
                            data,
                            sigs,
                            signed,
                            ..
                        }),
                    ..
                } => {
                    if self.allowed.contains(peer) {
                        let documents_taken = self.engine.takes_documents(peer, doc);
                        self.readers.offer(*request_id, data, documents_taken);
                    }
                    (
                        data.len()
                            + signed.len()
                            + sigs
                                .iter()
                                .map(|s| s.hash.len() + s.sig.len())
                                .sum::<usize>(),
                        self.writes(peer, doc),
                    )
                }
                Message::Response {
                    response: Response::V1(ResponseV1::Answer { data, .. }),
                    ..
                } => (data.len(), false),
                Message::Response { .. } => (0, false),
            },
            SwarmEvent::ConnectionEstablished { .. } | SwarmEvent::ConnectionClosed { .. } => {
                (0, true)
            }
            _ => (0, false),
        };
        let bytes = bytes + std::mem::size_of::<SwarmEvent<BehaviourEvent>>();
        self.inbox.push(event, bytes, first);
    }

    /// Whether `peer` writes `doc`: the centre the city document, a sync
    /// partner the documents its key writes by the roster.
    fn writes(&mut self, peer: &PeerId, doc: &DocId) -> bool {
        if self.is_centre(peer) {
            return *doc == DocId::City;
        }
        if !self.allowed.contains(peer) {
            return false;
        }
        // Read off the key once per peer, not once per message.
        let actor = self
            .actors
            .entry(*peer)
            .or_insert_with(|| actor_id_of_peer(peer));
        actor
            .as_ref()
            .is_some_and(|actor| self.engine.may_write(doc, actor))
    }

    /// The store writes up to `ticket` are durable: what waited for them goes.
    fn now_durable(&mut self, ticket: u64) {
        self.durable = self.durable.max(ticket);
        self.durable_tx.send_replace(self.durable);
        self.tickets.durable(self.durable);
        for sends in take_durable(&mut self.held_sends, self.durable) {
            self.send_now(sends);
        }
        for (id, channel, response) in take_durable(&mut self.held_acks, self.durable) {
            self.respond(id, channel, response);
        }
    }

    /// Hands sync messages to the transport.
    fn send_now(&mut self, sends: Vec<Outgoing<PeerId>>) {
        for out in sends {
            tracing::trace!(peer = %out.peer, doc = %out.doc, bytes = out.data.len(), signatures = out.sigs.len(), "sync message sent");
            let (sigs, signed) = wire_signatures(out.sigs, self.engine.reads_prefixed(&out.peer));
            let request = Request::V1(RequestV1::Sync {
                doc: out.doc.clone(),
                data: out.data,
                sigs,
                answer: true,
                documents: true,
                signed,
                prefixed: true,
                compressed: true,
                vouched: true,
            });
            let id = self
                .swarm
                .behaviour_mut()
                .sync
                .send_request(&out.peer, request);
            if self.is_centre(&out.peer) && self.centre_waiting_since.is_none() {
                self.centre_waiting_since = Some(Instant::now());
            }
            self.pending.insert(id, (out.peer, out.doc, out.epoch));
        }
    }

    /// Persists, then sends once what was persisted is durable. On a store
    /// failure nothing is sent and the node stops.
    fn apply(&mut self, fx: Effects<PeerId>) -> Result<(), ()> {
        // Sync states need not be durable (`Store::write`): they wait, the
        // newest of each session, for the next write that must reach the
        // disk anyway, or for the tick. Stored one by one, they cost the
        // centre a store transaction for every quarter's answer to every
        // change it relayed (a tenth of its CPU in the live benchmark).
        for (peer, doc, state) in fx.sync_states {
            self.unstored_sync.insert((peer.to_string(), doc), state);
        }
        let must_be_durable = !fx.changes.is_empty() || !fx.signatures.is_empty();
        let batch = Batch {
            changes: fx.changes,
            sync_states: if must_be_durable {
                self.take_unstored_sync()
            } else {
                Vec::new()
            },
            signatures: fx.signatures.into_iter().map(|(h, s)| (h.0, s)).collect(),
        };
        match self.store.write(&batch) {
            Ok(false) => {}
            Ok(true) => {
                self.written += 1;
                self.tickets.wrote(
                    self.written,
                    batch.changes.iter().map(|(doc, _)| doc),
                    batch.changes.is_empty(),
                );
                if !self.durability.request(self.written) {
                    self.fatal = Some(ReplicatorError::Crashed(
                        "the durability thread stopped".into(),
                    ));
                    return Err(());
                }
            }
            Err(e) => {
                self.fatal = Some(e.into());
                return Err(());
            }
        }
        for (doc, chunks) in &batch.changes {
            let weight: usize = chunks.iter().map(|c| loose_weight(c)).sum();
            *self.chunks.entry(doc.clone()).or_default() += weight;
        }
        if !fx.sends.is_empty() {
            let mut now = Vec::new();
            let mut held: BTreeMap<u64, Vec<Outgoing<PeerId>>> = BTreeMap::new();
            for out in fx.sends {
                match self.tickets.of(&out.doc) {
                    t if t <= self.durable => now.push(out),
                    t => held.entry(t).or_default().push(out),
                }
            }
            self.send_now(now);
            self.held_sends.extend(held);
        }
        if !fx.changed.is_empty() {
            self.changed.send_modify(|n| *n += 1);
            self.publish_heads(Some(&fx.changed));
        }
        if fx.changed.contains(&DocId::City) {
            self.refresh_roster()?;
        }
        // The roster or a quarter's advertised addresses may have changed:
        // read at the next tick, once for all messages until then (reading
        // them after every message took a twentieth of a quarter's CPU in
        // the live benchmark).
        self.neighbours_due.extend(fx.changed);
        Ok(())
    }

    fn take_unstored_sync(&mut self) -> Vec<(String, DocId, Vec<u8>)> {
        std::mem::take(&mut self.unstored_sync)
            .into_iter()
            .map(|((peer, doc), state)| (peer, doc, state))
            .collect()
    }

    /// Stores the sync states waiting since the last write (see `apply`).
    fn store_sync_states(&mut self) -> Result<(), StoreError> {
        if self.unstored_sync.is_empty() {
            return Ok(());
        }
        let batch = Batch {
            sync_states: self.take_unstored_sync(),
            ..Batch::default()
        };
        self.store.write(&batch).map(|_| ())
    }

    /// Re-reads the roster after the city document changed: which quarters
    /// are replicated and which peers this node syncs with.
    fn refresh_roster(&mut self) -> Result<(), ()> {
        if self.loading > 0 {
            // Read once every document is loaded (`Actor::loaded`): it lets
            // the partners in.
            return Ok(());
        }
        let roster = self.roster().to_vec();
        let mut quarters: BTreeSet<QuarterSlug> = if self.replicate.is_all() {
            roster.iter().map(|(s, _)| s.clone()).collect()
        } else {
            BTreeSet::new()
        };
        if let Some(own) = self.own_doc.quarter_slug() {
            quarters.insert(own.clone());
        }
        let allowed: BTreeSet<PeerId> = match self.role {
            Role::Center => roster
                .iter()
                .flat_map(|(_, e)| e.writers.iter())
                .filter_map(|w| w.parse::<PeerId>().ok())
                .collect(),
            // The centre, and the other quarters' writer nodes.
            Role::Quarter => self
                .center
                .iter()
                .map(|(p, _)| *p)
                .chain(
                    roster
                        .iter()
                        .flat_map(|(_, e)| e.writers.iter())
                        .filter_map(|w| w.parse::<PeerId>().ok()),
                )
                .filter(|p| *p != self.peer_id)
                .collect(),
        };
        let writers: BTreeMap<QuarterSlug, BTreeSet<ActorId>> = roster
            .iter()
            .map(|(slug, entry)| {
                let actors = entry
                    .writers
                    .iter()
                    .filter_map(|w| w.parse::<PeerId>().ok())
                    .filter_map(|p| actor_id_of_peer(&p))
                    .collect();
                (slug.clone(), actors)
            })
            .collect();
        let mut retired: BTreeMap<QuarterSlug, BTreeSet<ChangeHash>> = BTreeMap::new();
        if let Some(city) = self.engine.doc(&DocId::City) {
            for key in schema::items::<schema::RetiredKey>(city).unwrap_or_default() {
                let Ok(slug) = QuarterSlug::new(&key.quarter) else {
                    continue;
                };
                let hashes = key
                    .changes
                    .iter()
                    .filter_map(|h| h.parse::<ChangeHash>().ok());
                retired.entry(slug).or_default().extend(hashes);
            }
        }
        let now = self.now();
        let mut fx = self.engine.set_writers(writers, retired, now);
        fx.extend(self.engine.set_quarters(quarters, now));
        // The documents replicated may have changed with the roster.
        self.publish_heads(None);
        let removed: Vec<PeerId> = self.allowed.difference(&allowed).copied().collect();
        let added: Vec<PeerId> = allowed.difference(&self.allowed).copied().collect();
        self.allowed = allowed;
        for p in removed {
            tracing::info!(peer = %p, "peer removed from the roster: refused from now on");
            self.engine.peer_down(&p);
            // Closes its open connections and refuses new ones.
            self.swarm.behaviour_mut().allow.disallow_peer(p);
        }
        for p in &added {
            self.swarm.behaviour_mut().allow.allow_peer(*p);
        }
        fx.extend(self.neighbour_activity());
        for p in added {
            if self.connected.contains(&p) {
                fx.extend(self.peer_up(p));
            }
        }
        if fx.is_empty() {
            Ok(())
        } else {
            self.apply(fx)
        }
    }

    /// The roster (empty while the city document holds none or it does
    /// not read), read again only once the city document has changed:
    /// after a change both `refresh_roster` and `refresh_neighbours` need
    /// it, and reading it hydrates every entry.
    fn roster(&mut self) -> &[(QuarterSlug, schema::RosterEntry)] {
        let city = self.engine.doc(&DocId::City);
        let heads = city.map(|c| c.get_heads());
        if heads != self.roster_heads {
            self.roster = city
                .and_then(|c| schema::roster(c).ok())
                .unwrap_or_default();
            self.roster_heads = heads;
        }
        &self.roster
    }

    /// Quarter nodes: the other quarters are passive partners while the
    /// centre is up (every document travels owner → centre → everyone, each
    /// once). Once it has been gone for [`CENTRE_GRACE`] or has been silent
    /// with a message unanswered for [`CENTRE_STALL`], without answering
    /// pings (see [`CENTRE_PONG_FRESH`]) and without confirming this
    /// quarter's own changes, each quarter pushes its own document to the
    /// others directly; once it has been gone for
    /// [`CENTRE_OUTAGE`], quarters also relay what they hold to each other.
    /// A centre slowed down by load can look gone for seconds; relaying
    /// every document over every pair of quarters then multiplies that load
    /// (see `docs/benchmarks.md`), pushing their own documents does not. See
    /// `engine::Activity`.
    fn neighbour_activity(&mut self) -> Effects<PeerId> {
        let mut fx = Effects::default();
        let Some((center, _)) = self.center else {
            return fx;
        };
        let gone = !self.engine.is_up(&center)
            && self
                .centre_down_since
                .is_some_and(|t| t.elapsed() >= CENTRE_GRACE);
        // A connection a partition broke looks up until pings fail (up to
        // 30 s); a message the centre has not answered for long, while
        // nothing else came from it and no ping got through either, tells
        // sooner. A centre busy catching up answers sync messages late but
        // its connections still answer pings.
        //
        // Only while the centre has not confirmed this quarter's own
        // changes does pushing them to the others help: once it holds
        // them, it relays them, however slowly.
        let stalled = self
            .centre_waiting_since
            .is_some_and(|t| t.elapsed() >= CENTRE_STALL)
            && self
                .centre_pong
                .is_none_or(|t| t.elapsed() >= CENTRE_PONG_FRESH)
            && !self.engine.peer_holds_own_docs(&center);
        let outage = !self.engine.is_up(&center)
            && self
                .centre_down_since
                .is_some_and(|t| t.elapsed() >= CENTRE_OUTAGE);
        let activity = if outage {
            Activity::Full
        } else if gone || stalled {
            Activity::OwnDocs
        } else {
            Activity::Passive
        };
        let now = self.now();
        let neighbours: Vec<PeerId> = self
            .allowed
            .iter()
            .filter(|p| **p != center && self.engine.activity(p) != activity)
            .copied()
            .collect();
        if !neighbours.is_empty() {
            tracing::debug!(
                ?activity,
                neighbours = neighbours.len(),
                "the centre's state changed: new activity towards the other quarters"
            );
        }
        for p in neighbours {
            fx.extend(self.engine.set_active(&p, activity, now));
        }
        fx
    }

    /// Whether a message came from `peer` within `within` (`None`: never).
    fn heard_within(&self, peer: &PeerId, within: Duration) -> Option<bool> {
        self.heard.get(peer).map(|t| t.elapsed() < within)
    }

    /// Quarter nodes: whether `peer` is the centre.
    fn is_centre(&self, peer: &PeerId) -> bool {
        self.center.as_ref().is_some_and(|(c, _)| c == peer)
    }

    /// What `peer` said it reads on its last request or answer, for the
    /// engine to send it so. A centre that says `vouched` is still sent
    /// every signature: it passes every quarter's changes on to every
    /// other node, in whatever parts its sessions call for, so it keeps
    /// them all. A node that holds only some relays a change only together
    /// with a later one that vouches for it (`change_cache::vouched`),
    /// which can lie too far on for one message (see `docs/security.md`).
    fn peer_reads(&mut self, peer: &PeerId, reads: PeerReads) {
        if reads.documents {
            self.engine.peer_takes_documents(peer);
        }
        if reads.prefixed {
            self.engine.peer_reads_prefixed(peer);
        }
        if reads.compressed {
            self.engine.peer_takes_compressed(peer);
        }
        if reads.vouched && !self.is_centre(peer) {
            self.engine.peer_takes_vouched(peer);
        }
    }

    fn peer_up(&mut self, peer: PeerId) -> Effects<PeerId> {
        if let Err(e) = self.store_sync_states() {
            tracing::warn!(error = %e, "cannot store sync states");
        }
        let persisted = self
            .store
            .sync_states(&peer.to_string())
            .unwrap_or_else(|e| {
                tracing::warn!(%peer, error = %e, "cannot read sync states; syncing from scratch");
                Vec::new()
            });
        tracing::info!(%peer, "peer up");
        let now = self.now();
        let fx = self.engine.peer_up(peer, persisted, now);
        // Whole documents only from the centre, or of the documents the
        // peer writes (`engine::DocumentsFrom`).
        let from = if self.is_centre(&peer) {
            DocumentsFrom::Centre
        } else {
            actor_id_of_peer(&peer).map_or(DocumentsFrom::Nobody, DocumentsFrom::Writer)
        };
        self.engine.take_documents_from(&peer, from);
        fx
    }

    fn local_write<R>(
        &mut self,
        doc: &DocId,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, SchemaError>,
    ) -> Result<R, WriteError> {
        if *doc != self.own_doc {
            return Err(WriteError::NotOwner(doc.clone()));
        }
        let now = self.now();
        let (value, fx) = self.engine.change(doc, now, f).map_err(|e| match e {
            ChangeError::UnknownDoc(d) => WriteError::NotOwner(d),
            ChangeError::Rejected(e) => WriteError::Invalid(e),
        })?;
        self.apply(fx).map_err(|()| WriteError::Stopped)?;
        Ok(value)
    }

    /// Reloads `doc` from the store after automerge panicked on it.
    fn reload(&mut self, doc: &DocId) {
        let now = self.now();
        let chunks = match self.store.load_doc(doc) {
            Ok(c) => c,
            Err(e) => {
                self.fatal = Some(e.into());
                return;
            }
        };
        match self
            .engine
            .reload_doc(doc, chunks.iter().map(|c| c.as_slice()), now)
        {
            Ok(fx) => {
                self.publish_heads(None);
                let _ = self.apply(fx);
            }
            Err(e) => {
                self.fatal = Some(ReplicatorError::Load {
                    doc: doc.clone(),
                    reason: e.to_string(),
                });
            }
        }
    }

    /// Re-reads where the quarters' writer nodes listen (other than this
    /// node): all quarters' documents when `changed` is `None` or holds the
    /// city (the roster), else only the changed quarters'. Quarter nodes
    /// dial them to keep syncing while the centre is down; the centre dials
    /// them so that, back from an outage, it does not wait for every
    /// quarter's next redial. The centre also dials the addresses the
    /// roster gives (`RosterEntry::addrs`), which it has before it holds
    /// the quarter's document; quarter nodes take only what the quarters'
    /// own documents say, so they do not open a connection to every other
    /// quarter before they hold anything to sync with it.
    fn refresh_neighbours(&mut self, changed: Option<&BTreeSet<DocId>>) {
        if self.loading > 0 {
            return;
        }
        let all = changed.is_none_or(|c| c.contains(&DocId::City));
        if all {
            self.roster();
            self.neighbours_of.clear();
        }
        let quarters: Vec<(QuarterSlug, schema::RosterEntry)> = self
            .roster
            .iter()
            .filter(|(slug, _)| all || changed.is_some_and(|c| c.contains(&DocId::quarter(slug))))
            .cloned()
            .collect();
        for (slug, entry) in quarters {
            let mut found = Vec::new();
            // Only a quarter's own document says where its writers listen.
            if let Some(doc) = self.engine.doc(&DocId::quarter(&slug)) {
                for node in schema::items::<schema::NodeAddr>(doc).unwrap_or_default() {
                    if let (Ok(peer), Ok(addr)) =
                        (node.peer.parse::<PeerId>(), node.addr.parse::<Multiaddr>())
                        && peer != self.peer_id
                        && entry.writers.contains(&node.peer)
                        && self.allowed.contains(&peer)
                    {
                        found.push((peer, addr));
                    }
                }
            }
            if let Role::Center = self.role {
                for (peer, addr) in entry.addrs.iter().flatten() {
                    if let (Ok(peer), Ok(addr)) =
                        (peer.parse::<PeerId>(), addr.parse::<Multiaddr>())
                        && entry.writers.contains(&peer.to_string())
                        && self.allowed.contains(&peer)
                        && !found.contains(&(peer, addr.clone()))
                    {
                        found.push((peer, addr));
                    }
                }
            }
            self.neighbours_of.insert(slug, found);
        }
        let mut neighbours: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for (peer, addr) in self.neighbours_of.values().flatten() {
            neighbours.entry(*peer).or_default().push(addr.clone());
        }
        self.neighbours = neighbours;
    }

    /// A quarter node writes where it listens into its own document, once
    /// per address, so other quarters can dial it (not for wildcard addresses).
    fn advertise(&mut self) {
        let Role::Quarter = self.role else { return };
        let wildcard = self.listen.iter().any(|p| {
            matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified())
                || matches!(p, libp2p::multiaddr::Protocol::Ip6(ip) if ip.is_unspecified())
                || matches!(p, libp2p::multiaddr::Protocol::Tcp(0))
        });
        let addr = match (&self.advertise, wildcard) {
            (Some(a), _) => a.clone(),
            (None, false) => self.listen.clone(),
            (None, true) => return,
        };
        let entry = schema::NodeAddr {
            peer: self.peer_id.to_string(),
            addr: addr.to_string(),
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
        };
        let current = self.engine.doc(&self.own_doc).and_then(|d| {
            schema::item::<schema::NodeAddr>(d, &entry.peer)
                .ok()
                .flatten()
        });
        if current.as_ref() != Some(&entry) {
            let own = self.own_doc.clone();
            if let Err(e) = self.local_write(&own, |tx| schema::put_item(tx, &entry)) {
                tracing::warn!(error = %e, "cannot advertise this node's address");
            }
        }
    }

    /// Answers and relays what peers sent (see `Engine::flush`).
    fn flush(&mut self) {
        let now = self.now();
        let fx = self.engine.flush(now);
        if !fx.is_empty() {
            let _ = self.apply(fx);
        }
    }

    fn handle_tick(&mut self) {
        if let Err(e) = self.store_sync_states() {
            self.fatal = Some(e.into());
            return;
        }
        if self.loading > 0 {
            // Off the network until every document is loaded (`Actor::new`).
            return;
        }
        if !self.neighbours_due.is_empty() {
            let due = std::mem::take(&mut self.neighbours_due);
            self.refresh_neighbours(Some(&due));
        }
        let fx = self.neighbour_activity();
        if !fx.is_empty() && self.apply(fx).is_err() {
            return;
        }
        let now = self.now();
        let fx = self.engine.tick(now);
        if !fx.is_empty() && self.apply(fx).is_err() {
            return;
        }
        if let Some((peer, addr)) = self.center.clone()
            && !self.connected.contains(&peer)
            && Instant::now() >= self.next_dial
        {
            // Due on the tick about `REDIAL` after this one: a deadline of a
            // whole `REDIAL` would just miss that tick and wait for the next,
            // redialling every 1.25 s (runs 105 and 106, in their logs).
            self.next_dial = Instant::now() + REDIAL - TICK / 2;
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(vec![addr])
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, error = %e, "dial failed");
            }
        }
        let now = Instant::now();
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .neighbours
            .iter()
            .filter(|(p, _)| !self.connected.contains(p))
            .filter(|(p, _)| self.next_neighbour_dial.get(p).is_none_or(|t| now >= *t))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (peer, addrs) in due {
            // Back off exponentially, up to a minute, while a neighbour is unreachable.
            let backoff = self.neighbour_backoff.get(&peer).copied().unwrap_or(REDIAL);
            self.neighbour_backoff
                .insert(peer, (backoff * 2).min(MAX_NEIGHBOUR_BACKOFF));
            self.next_neighbour_dial.insert(peer, now + backoff);
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addrs)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, error = %e, "dial to neighbour failed");
            }
        }
        let quiet = self
            .heard
            .values()
            .max()
            .is_none_or(|t| t.elapsed() >= COMPACT_WHEN_QUIET);
        let threshold = if quiet {
            COMPACT_AFTER_CHANGES
        } else {
            COMPACT_ANYWAY_CHANGES
        };
        if let Err(e) = self.compact(threshold) {
            self.fatal = Some(e.into());
        }
    }

    /// Replaces the stored changes of every document with at least
    /// `threshold` loose changes by one snapshot; says how many were
    /// compacted.
    fn compact(&mut self, threshold: usize) -> Result<usize, StoreError> {
        let due: Vec<DocId> = self
            .chunks
            .iter()
            .filter(|(_, n)| **n >= threshold)
            .map(|(d, _)| d.clone())
            .collect();
        let mut done = 0;
        for doc in due {
            let Some(snapshot) = self.engine.snapshot(&doc) else {
                continue;
            };
            self.store.compact(&doc, &snapshot)?;
            self.chunks.insert(doc.clone(), 0);
            done += 1;
            tracing::debug!(%doc, bytes = snapshot.len(), "compacted");
        }
        Ok(done)
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                established_in,
                ..
            } => {
                tracing::debug!(peer = %peer_id, dialer = endpoint.is_dialer(), ?established_in, "connection established");
                self.neighbour_backoff.remove(&peer_id);
                let first = self.connected.insert(peer_id);
                if first {
                    self.changed.send_modify(|n| *n += 1);
                }
                if first && self.allowed.contains(&peer_id) {
                    if self.is_centre(&peer_id) {
                        self.centre_down_since = None;
                        self.centre_waiting_since = None;
                        // The handshake just went through: as good as a
                        // ping answered (the first ping comes later).
                        self.centre_pong = Some(Instant::now());
                    }
                    let mut fx = self.peer_up(peer_id);
                    fx.extend(self.neighbour_activity());
                    let _ = self.apply(fx);
                } else if first {
                    tracing::debug!(peer = %peer_id, "connected peer is not a sync partner (yet)");
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                if self.connected.remove(&peer_id) {
                    self.changed.send_modify(|n| *n += 1);
                }
                if self.engine.is_up(&peer_id) {
                    tracing::info!(peer = %peer_id, "peer down");
                    self.engine.peer_down(&peer_id);
                    if self.is_centre(&peer_id) {
                        self.centre_down_since = Some(Instant::now());
                    }
                    let fx = self.neighbour_activity();
                    if !fx.is_empty() {
                        let _ = self.apply(fx);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.handle_sync(event),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(libp2p::ping::Event {
                peer,
                result: Ok(_),
                ..
            })) if self.is_centre(&peer) => {
                self.centre_pong = Some(Instant::now());
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(libp2p::ping::Event {
                peer,
                connection,
                result: Err(failure),
            })) if !matches!(failure, libp2p::ping::Failure::Unsupported) => {
                // (A peer without ping, an older node, keeps its connection.)
                // On a busy link a ping can time out while messages still
                // arrive (behind the sync messages on the same connection,
                // or while this node's event loop is behind; see
                // `transport::CONNECTION_EVENT_BUFFER`), and closing then
                // would restart every session. (After a partition, nothing
                // arrives for a ping interval.)
                if self.heard_within(&peer, transport::PING_INTERVAL) == Some(true) {
                    tracing::debug!(%peer, %failure, "ping failed, but the peer's messages arrive: keeping the connection");
                } else {
                    tracing::info!(%peer, %failure, "ping failed; closing the connection to redial");
                    self.swarm.close_connection(connection);
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                self.refused_connections += 1;
                tracing::debug!(%send_back_addr, %error, "incoming connection refused");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
            }
            _ => {}
        }
    }

    /// Sends the response to request `id`, now that it may go.
    fn respond(
        &mut self,
        id: InboundRequestId,
        channel: ResponseChannel<Response>,
        response: ResponseV1,
    ) {
        let sent = self
            .swarm
            .behaviour_mut()
            .sync
            .send_response(channel, Response::V1(response));
        if sent.is_err() {
            // The stream is gone (its connection closed, or it timed out).
            self.answer_failed(id);
        }
    }

    /// The response to request `id` did not reach its peer: if it carried
    /// this node's answer, the answer's session retries as after a lost
    /// message (`Engine::send_failed`).
    fn answer_failed(&mut self, id: InboundRequestId) {
        if let Some((peer, doc, epoch)) = self.answering.remove(&id) {
            let now = self.now();
            self.engine.send_failed(&peer, &doc, epoch, now);
        }
    }

    /// `peer` acknowledged this node's message for `doc` (session `epoch`)
    /// with its answer: taken in as a message of its own. When it cannot
    /// be taken in, the session announces its heads again after a while, as
    /// after a lost message, so the peer answers anew.
    fn receive_answer(&mut self, peer: PeerId, doc: DocId, epoch: u64, data: &[u8]) {
        let now = self.now();
        match self.engine.receive(&peer, &doc, data, &[], now) {
            Ok(fx) => {
                tracing::trace!(%peer, %doc, bytes = data.len(), sends = fx.sends.len(), "answer received");
                let _ = self.apply(fx);
            }
            Err(SyncError::Poisoned(doc)) => {
                tracing::error!(%peer, %doc, "automerge panicked on an answer; reloading the document and dropping the peer");
                self.reload(&doc);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Err(e) => {
                tracing::debug!(%peer, %doc, error = %e, "refused the answer in an acknowledgement");
                self.engine.send_failed(&peer, &doc, epoch, now);
            }
        }
    }

    fn handle_sync(&mut self, event: request_response::Event<Request, Response>) {
        use request_response::{Event, Message};
        if let Event::Message { peer, .. } = &event
            && self.allowed.contains(peer)
        {
            self.heard.insert(*peer, Instant::now());
            if self.is_centre(peer) {
                self.centre_waiting_since = None;
            }
        }
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request_id,
                        request,
                        channel,
                    },
                ..
            } => {
                let Request::V1(RequestV1::Sync {
                    doc,
                    data,
                    sigs,
                    answer,
                    documents,
                    signed,
                    prefixed,
                    compressed,
                    vouched,
                }) = request;
                // Dropped unread if the message is refused before it is read.
                let turn = self.readers.turn(&request_id);
                let sigs =
                    parse_sigs(sigs).filter(|_| signed.len() % wire::PREFIXED_SIGNATURE_LEN == 0);
                let Some(sigs) = sigs else {
                    self.refused_requests += 1;
                    let response = ResponseV1::Refused {
                        reason: "malformed signature list".into(),
                    };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_response(channel, Response::V1(response));
                    return;
                };
                let now = self.now();
                let within_rate = self.buckets.entry(peer).or_insert_with(Bucket::full).take();
                let response = if !within_rate {
                    self.rate_limited += 1;
                    ResponseV1::Busy
                } else if !self.allowed.contains(&peer) {
                    self.refused_requests += 1;
                    ResponseV1::Refused {
                        reason: "not a sync partner of this node (not on the roster)".into(),
                    }
                } else {
                    let received = Instant::now();
                    self.peer_reads(
                        &peer,
                        PeerReads {
                            documents,
                            prefixed,
                            compressed,
                            vouched,
                        },
                    );
                    let signatures = Signatures {
                        whole: &sigs,
                        prefixed: &signed,
                    };
                    let read = turn.take();
                    match self
                        .engine
                        .receive_read(&peer, &doc, &data, signatures, now, read)
                    {
                        Ok(mut fx) => {
                            let reply = if answer {
                                take_answer(&mut fx.sends, &peer, &doc)
                            } else {
                                None
                            };
                            let (changes, sends) = (fx.changes.len(), fx.sends.len());
                            let applied = received.elapsed();
                            if self.apply(fx).is_err() {
                                return; // no ack for what is not durable
                            }
                            tracing::trace!(%peer, %doc, bytes = data.len(), changes, sends, answered = reply.is_some(), ?applied, total = ?received.elapsed(), "sync message received");
                            match reply {
                                Some(out) => {
                                    self.answering
                                        .insert(request_id, (peer, doc.clone(), out.epoch));
                                    ResponseV1::Answer {
                                        data: out.data,
                                        documents: true,
                                        prefixed: true,
                                        compressed: true,
                                        vouched: true,
                                    }
                                }
                                None => ResponseV1::Ack,
                            }
                        }
                        Err(e @ SyncError::NotAccepted(_)) => {
                            // Usual while the roster is still on its way.
                            tracing::debug!(%peer, %doc, error = %e, "refused sync message");
                            ResponseV1::Refused {
                                reason: e.to_string(),
                            }
                        }
                        Err(SyncError::Poisoned(doc)) => {
                            tracing::error!(%peer, %doc, "automerge panicked on a message; reloading the document and dropping the peer");
                            self.reload(&doc);
                            let _ = self.swarm.disconnect_peer_id(peer);
                            ResponseV1::Refused {
                                reason: "the message could not be applied".into(),
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%peer, %doc, error = %e, "refused sync message");
                            ResponseV1::Refused {
                                reason: e.to_string(),
                            }
                        }
                    }
                };
                let ticket = self.tickets.of(&doc);
                if matches!(response, ResponseV1::Ack | ResponseV1::Answer { .. })
                    && self.durable < ticket
                {
                    // Acknowledged once durable (see `now_durable`).
                    self.held_acks
                        .push_back((ticket, (request_id, channel, response)));
                } else {
                    self.respond(request_id, channel, response);
                }
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((_, doc, epoch)) = self.pending.remove(&request_id) else {
                    return;
                };
                let now = self.now();
                match response {
                    Response::V1(ResponseV1::Ack) => {
                        self.engine.delivered(&peer, &doc, epoch, now);
                    }
                    Response::V1(ResponseV1::Answer {
                        data,
                        documents,
                        prefixed,
                        compressed,
                        vouched,
                    }) => {
                        self.peer_reads(
                            &peer,
                            PeerReads {
                                documents,
                                prefixed,
                                compressed,
                                vouched,
                            },
                        );
                        self.engine.delivered(&peer, &doc, epoch, now);
                        self.receive_answer(peer, doc, epoch, &data);
                    }
                    Response::V1(ResponseV1::Busy) => {
                        tracing::debug!(%peer, %doc, "peer is busy; retrying later");
                        self.engine.busy(&peer, &doc, epoch, now);
                    }
                    Response::V1(ResponseV1::Refused { reason }) => {
                        tracing::debug!(%peer, %doc, %reason, "peer refused sync message");
                        self.engine.refused(&peer, &doc, epoch, now);
                    }
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, doc, epoch)) = self.pending.remove(&request_id) {
                    tracing::debug!(%peer, %doc, %error, "sync message not delivered");
                    let now = self.now();
                    self.engine.send_failed(&peer, &doc, epoch, now);
                }
            }
            Event::InboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "inbound sync request failed");
                self.answer_failed(request_id);
            }
            Event::ResponseSent { request_id, .. } => {
                if let Some((peer, doc, epoch)) = self.answering.remove(&request_id) {
                    let now = self.now();
                    self.engine.delivered(&peer, &doc, epoch, now);
                }
            }
        }
    }
}

/// An acknowledgement waiting for a write to be durable: the request it
/// answers, where it goes, and what it says.
type HeldAck = (InboundRequestId, ResponseChannel<Response>, ResponseV1);

/// Which store write the messages and acknowledgements about each
/// document wait for (see `docs/architecture.md`, "Storage and
/// durability"): the last one that holds changes of it. A message carrying
/// a document's changes goes only once they are durable, and a message
/// is acknowledged only once what it brought is; neither waits for writes
/// of other documents, which it does not depend on. Before, every message
/// and acknowledgement waited for the node's last write, so a centre
/// taking in 64 quarters' documents held its answers about one document
/// behind the fsyncs of the others.
#[derive(Debug, Default)]
struct Tickets {
    /// Ticket of the last write holding changes of each document, while
    /// not yet durable.
    of_doc: HashMap<DocId, u64>,
    /// Ticket of the last write holding no document's changes (signatures
    /// alone): everything waits for it.
    of_all: u64,
}

impl Tickets {
    /// Write `ticket` holds changes of `docs`; or of none (`alone`).
    fn wrote<'a>(&mut self, ticket: u64, docs: impl Iterator<Item = &'a DocId>, alone: bool) {
        for doc in docs {
            self.of_doc.insert(doc.clone(), ticket);
        }
        if alone {
            self.of_all = ticket;
        }
    }

    /// The write a message or acknowledgement about `doc` waits for (0:
    /// none).
    fn of(&self, doc: &DocId) -> u64 {
        self.of_doc.get(doc).copied().unwrap_or(0).max(self.of_all)
    }

    /// Every write up to `ticket` is durable.
    fn durable(&mut self, ticket: u64) {
        self.of_doc.retain(|_, t| *t > ticket);
    }
}

/// Takes out of `held`, in their order, the items waiting for a write up
/// to `durable` (tickets are not in order: each waits for its document's).
fn take_durable<T>(held: &mut VecDeque<(u64, T)>, durable: u64) -> Vec<T> {
    let mut out = Vec::new();
    if held.iter().all(|(t, _)| *t > durable) {
        return out;
    }
    for (ticket, item) in std::mem::take(held) {
        if ticket <= durable {
            out.push(item);
        } else {
            held.push_back((ticket, item));
        }
    }
    out
}

/// The thread that makes store writes durable: the actor hands it the
/// ticket of each write that must reach the disk; it fsyncs (once for all
/// tickets that came in meanwhile) and reports the last ticket covered.
struct Durability {
    requests: std::sync::mpsc::Sender<u64>,
    done: mpsc::UnboundedReceiver<Result<u64, StoreError>>,
}

impl Durability {
    fn start(store: Arc<Store>) -> Result<Self, ReplicatorError> {
        let (requests, incoming) = std::sync::mpsc::channel::<u64>();
        let (report, done) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("iq-durability".into())
            .spawn(move || {
                // Ends when the actor drops its sender.
                while let Ok(mut ticket) = incoming.recv() {
                    while let Ok(later) = incoming.try_recv() {
                        ticket = ticket.max(later);
                    }
                    let result = store.durable().map(|()| ticket);
                    let failed = result.is_err();
                    if report.send(result).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| {
                ReplicatorError::Crashed(format!("cannot start the durability thread: {e}"))
            })?;
        Ok(Self { requests, done })
    }

    /// Asks for everything written up to `ticket` to be made durable; false
    /// if the thread is gone.
    fn request(&self, ticket: u64) -> bool {
        self.requests.send(ticket).is_ok()
    }
}

/// This node's answer to `peer` for `doc` among `sends`, taken out to
/// travel in the acknowledgement (`ResponseV1::Answer`): only one without
/// changes (an answer with changes goes as a request of its own, so the
/// peer can refuse it and this node learns of it) and within
/// [`wire::MAX_ANSWER_BYTES`].
fn take_answer(
    sends: &mut Vec<Outgoing<PeerId>>,
    peer: &PeerId,
    doc: &DocId,
) -> Option<Outgoing<PeerId>> {
    let i = sends.iter().position(|o| {
        o.peer == *peer
            && o.doc == *doc
            && !o.carries_changes
            && o.data.len() <= wire::MAX_ANSWER_BYTES
    })?;
    Some(sends.remove(i))
}

/// What a peer says it reads (`wire::RequestV1::Sync`, `ResponseV1::Answer`).
#[derive(Debug, Clone, Copy)]
struct PeerReads {
    documents: bool,
    prefixed: bool,
    compressed: bool,
    vouched: bool,
}

/// A message's signatures as they go on the wire: in the short form to a
/// peer that reads it (`wire::RequestV1::Sync::signed`), which saves 24 of
/// every 96 bytes and the CBOR around each; with whole hashes otherwise.
fn wire_signatures(sigs: Vec<(ChangeHash, Vec<u8>)>, prefixed: bool) -> (Vec<SignedHash>, Vec<u8>) {
    if !prefixed {
        let whole = sigs
            .into_iter()
            .map(|(h, sig)| SignedHash {
                hash: h.0.to_vec(),
                sig,
            })
            .collect();
        return (whole, Vec::new());
    }
    let mut signed = Vec::with_capacity(sigs.len() * wire::PREFIXED_SIGNATURE_LEN);
    let mut whole = Vec::new();
    for (h, sig) in sigs {
        if sig.len() == SIGNATURE_LEN {
            signed.extend_from_slice(&crate::engine::hash_prefix(&h));
            signed.extend_from_slice(&sig);
        } else {
            // Not a signature the short form can hold (the node keeps only
            // 64-byte ones); it goes as it came.
            whole.push(SignedHash {
                hash: h.0.to_vec(),
                sig,
            });
        }
    }
    (whole, signed)
}

/// Checks the signature list of a request: 32-byte hashes, 64-byte signatures.
fn parse_sigs(sigs: Vec<SignedHash>) -> Option<Vec<(ChangeHash, Vec<u8>)>> {
    sigs.into_iter()
        .map(|s| {
            let hash = <[u8; 32]>::try_from(s.hash.as_slice()).ok()?;
            (s.sig.len() == SIGNATURE_LEN).then_some((ChangeHash(hash), s.sig))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredDoc;
    use automerge::ReadDoc;
    use automerge::transaction::Transactable;

    fn slug(s: &str) -> QuarterSlug {
        QuarterSlug::new(s).expect("slug")
    }

    /// A quarter node's data directory as a node that ran before leaves it:
    /// its own document (`n` = 1), the city's with every quarter on the
    /// roster, and `others` quarters' documents (`n` = 2, 3, …), each stored
    /// as a snapshot; `damaged` names one stored as bytes that do not load.
    /// Returns the started actor, not yet running.
    fn quarter_actor(dir: &std::path::Path, others: usize, damaged: Option<usize>) -> Actor {
        let centre = Identity::generate().peer_id();
        quarter_actor_with(dir, others, damaged, centre, &[])
    }

    /// [`quarter_actor_with`] for a node that replicates its own quarter only.
    fn own_only_quarter_actor(dir: &std::path::Path, others: usize) -> Actor {
        let centre = Identity::generate().peer_id();
        quarter_actor_scoped(dir, others, None, centre, &[], Replicate::Own)
    }

    /// [`quarter_actor`] with the centre's PeerId given, and the writers
    /// of the first other quarters (`q0`, `q1`, …) on the roster.
    fn quarter_actor_with(
        dir: &std::path::Path,
        others: usize,
        damaged: Option<usize>,
        centre: PeerId,
        writers: &[PeerId],
    ) -> Actor {
        quarter_actor_scoped(dir, others, damaged, centre, writers, Replicate::All)
    }

    fn quarter_actor_scoped(
        dir: &std::path::Path,
        others: usize,
        damaged: Option<usize>,
        centre: PeerId,
        writers: &[PeerId],
        replicate: Replicate,
    ) -> Actor {
        let store = Store::open(dir).expect("store");
        let put = |id: &DocId, n: i64, f: &dyn Fn(&mut Transaction<'_>)| {
            let mut am = schema::genesis(id);
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, "n", n).expect("put");
            f(&mut tx);
            tx.commit();
            store.compact(id, &am.save()).expect("store");
        };
        let own = DocId::quarter(&slug("own"));
        put(&own, 1, &|_| {});
        let others: Vec<QuarterSlug> = (0..others).map(|i| slug(&format!("q{i}"))).collect();
        put(&DocId::City, 0, &|tx| {
            for (i, q) in others.iter().chain([slug("own")].iter()).enumerate() {
                let writer = match writers.get(i) {
                    Some(peer) if i < others.len() => *peer,
                    _ => Identity::generate().peer_id(),
                };
                let entry = schema::RosterEntry {
                    name: q.to_string(),
                    writers: vec![writer.to_string()],
                    addrs: None,
                };
                schema::put_roster_entry(tx, q, &entry).expect("roster");
            }
        });
        for (i, q) in others.iter().enumerate() {
            if damaged == Some(i) {
                store
                    .compact(&DocId::quarter(q), b"not a document")
                    .expect("store");
            } else {
                put(&DocId::quarter(q), i as i64 + 2, &|_| {});
            }
        }
        // One stored signature, as a synced node holds one per change.
        store
            .commit(&Batch {
                signatures: vec![([7; 32], vec![1; 64])],
                ..Batch::default()
            })
            .expect("store");
        Actor::new(ReplicatorConfig {
            identity: Identity::generate(),
            role: Role::Quarter,
            own_doc: own,
            listen: "/ip4/127.0.0.1/tcp/0".parse().expect("addr"),
            advertise: None,
            center: Some((centre, "/ip4/127.0.0.1/tcp/9".parse().expect("addr"))),
            store,
            psk: None,
            replicate,
        })
        .expect("actor")
    }

    /// The event loop gives the thread back to the runtime now and then
    /// while it has work ready (its inbox, or flushes), so a task sharing
    /// its worker (an API request woken by its answer, or sending one) is
    /// not held until the loop runs dry. On a one-thread runtime: the
    /// request is sent once the loop has begun its inbox of 40,000 events,
    /// and must be handled before the inbox is empty.
    #[tokio::test]
    async fn the_event_loop_yields_while_its_inbox_is_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut actor = quarter_actor(dir.path(), 0, None);
        for i in 0..40_000 {
            actor.take_in(SwarmEvent::Dialing {
                peer_id: None,
                connection_id: libp2p::swarm::ConnectionId::new_unchecked(i),
            });
        }
        let replicator = Replicator::run_actor(actor).expect("run");
        let h = replicator.handle();
        // The actor's first turns, until it gives the thread back.
        tokio::task::yield_now().await;
        let left = h.run_now(|actor| actor.inbox.len()).await.expect("run_now");
        assert!(
            left > 0,
            "the request waited until the loop had handled its whole inbox"
        );
        replicator.shutdown().await.expect("shutdown");
    }

    /// Sync states alone wait in memory, the newest of each session, and
    /// are stored with the next write that must be durable, at the tick, or
    /// before a peer's stored states are read as it comes up.
    #[tokio::test]
    async fn sync_states_alone_wait_for_the_next_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut actor = quarter_actor(dir.path(), 0, None);
        let (a, b) = (
            Identity::generate().peer_id(),
            Identity::generate().peer_id(),
        );
        let own = actor.own_doc.clone();
        let stored = |actor: &Actor, peer: &PeerId| {
            actor
                .store
                .sync_states(&peer.to_string())
                .expect("read sync states")
        };
        let states = |list: &[(PeerId, &[u8])]| {
            let mut fx = Effects::default();
            for (peer, state) in list {
                fx.sync_states.push((*peer, own.clone(), state.to_vec()));
            }
            fx
        };
        actor
            .apply(states(&[(a, b"a1"), (b, b"b1")]))
            .expect("apply");
        actor.apply(states(&[(a, b"a2")])).expect("apply");
        assert!(
            stored(&actor, &a).is_empty() && stored(&actor, &b).is_empty(),
            "sync states alone were stored at once"
        );
        // A write that must be durable (a signature here) takes them along.
        let mut fx = states(&[(b, b"b2")]);
        fx.signatures.push((ChangeHash([9; 32]), vec![2; 64]));
        actor.apply(fx).expect("apply");
        assert_eq!(stored(&actor, &a), vec![(own.clone(), b"a2".to_vec())]);
        assert_eq!(stored(&actor, &b), vec![(own.clone(), b"b2".to_vec())]);
        // Alone again: stored at the tick.
        actor.apply(states(&[(a, b"a3")])).expect("apply");
        assert_eq!(stored(&actor, &a), vec![(own.clone(), b"a2".to_vec())]);
        actor.handle_tick();
        assert_eq!(stored(&actor, &a), vec![(own.clone(), b"a3".to_vec())]);
        // Or as the peer comes up, before its stored states are read.
        actor.apply(states(&[(b, b"b3")])).expect("apply");
        let _ = actor.peer_up(b);
        assert_eq!(stored(&actor, &b), vec![(own.clone(), b"b3".to_vec())]);
        assert!(actor.fatal.is_none());
    }

    /// The roster is read from the city document once per change of it:
    /// `refresh_roster` and `refresh_neighbours` both need it after one.
    #[tokio::test]
    async fn the_roster_is_read_again_only_once_the_city_document_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut actor = quarter_actor(dir.path(), 2, None);
        let slugs = |actor: &mut Actor| -> Vec<String> {
            actor.roster().iter().map(|(s, _)| s.to_string()).collect()
        };
        assert_eq!(slugs(&mut actor), ["own", "q0", "q1"]);
        // Unchanged city document: what was read stands (emptied here to
        // tell a read from the cache).
        actor.roster.clear();
        assert!(slugs(&mut actor).is_empty(), "read again without a change");
        let now = actor.now();
        let (_, _fx) = actor
            .engine
            .change(&DocId::City, now, |tx| {
                let entry = schema::RosterEntry {
                    name: "Neu".into(),
                    writers: vec![Identity::generate().peer_id().to_string()],
                    addrs: None,
                };
                schema::put_roster_entry(tx, &slug("neu"), &entry)
            })
            .expect("change the city document");
        assert_eq!(slugs(&mut actor), ["neu", "own", "q0", "q1"]);
    }

    /// A quarter node set to replicate its own quarter only loads its own
    /// document and the city's, takes up none of the roster's other
    /// quarters, and leaves the other quarters' documents it stored before
    /// on disk. A node replicating all loads them (see the test after).
    #[tokio::test]
    async fn a_node_replicating_its_own_quarter_only_holds_no_other_quarter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let actor = own_only_quarter_actor(dir.path(), 2);
        assert_eq!(actor.loading, 0, "other quarters' documents were loaded");
        let replicator = Replicator::run_actor(actor).expect("run");
        let h = replicator.handle();
        let status = h.status().await.expect("status");
        assert_eq!(status.replicate, Replicate::Own);
        let listed: Vec<&str> = status.documents.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(listed, ["city", "quarter/own"]);
        let (roster, accepted, quarters) = h
            .read(|v| {
                let roster = v.roster_slugs().len();
                let accepted: Vec<String> = ["own", "q0", "q1"]
                    .into_iter()
                    .filter(|q| v.engine.accepts(&DocId::quarter(&slug(q))))
                    .map(str::to_owned)
                    .collect();
                (roster, accepted, v.quarter_docs().len())
            })
            .await
            .expect("read");
        assert_eq!(roster, 3, "the roster was read");
        assert_eq!(accepted, ["own"]);
        assert_eq!(quarters, 1);
        let heads = h.heads().await.expect("heads");
        assert_eq!(
            heads.documents.keys().collect::<Vec<_>>(),
            ["city", "quarter/own"]
        );
        let stored: Vec<String> = h
            .run_now(|actor| {
                let docs = actor.store.load_docs().expect("stored documents");
                docs.iter().map(|d| d.id.to_string()).collect()
            })
            .await
            .expect("run_now");
        assert_eq!(
            stored,
            ["city", "quarter/own", "quarter/q0", "quarter/q1"],
            "the other quarters' documents stay stored"
        );
        replicator.shutdown().await.expect("shutdown");
    }

    /// The node's API answers once its own and the city document are
    /// loaded: status and writes to its own document at once, everything
    /// else once the other quarters' documents are in, and no partner is
    /// let in before that.
    #[tokio::test]
    async fn a_node_answers_for_its_own_document_while_the_others_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut actor = quarter_actor(dir.path(), 3, None);
        assert_eq!(actor.loading, 3);
        // The test decides when the loading finishes.
        let (release, held) = oneshot::channel();
        let loading = actor.pending_load.replace(held).expect("loading");
        let replicator = Replicator::run_actor(actor).expect("run");
        let h = replicator.handle();
        let own = DocId::quarter(&slug("own"));

        let status = h.status().await.expect("status");
        assert_eq!(status.loading, 3);
        let listed: Vec<&str> = status.documents.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(listed, ["city", "quarter/own"]);
        h.write(own.clone(), |tx| {
            tx.put(automerge::ROOT, "recorded", true)?;
            Ok(())
        })
        .await
        .expect("a write to its own document while the others load");
        let heads = h.heads().await.expect("heads");
        assert_eq!(
            heads.documents.keys().collect::<Vec<_>>(),
            ["city", "quarter/own"]
        );
        assert_eq!(heads.loading, 3);
        // Partners are let in (and dialled) only from the roster, which is
        // read once everything is loaded: no other quarter is replicated yet.
        let replicated = |v: View<'_>| v.engine.accepts(&DocId::quarter(&slug("q0")));
        let early = h.read_now(replicated).await.expect("read");
        assert!(
            !early,
            "the roster was read before the documents were loaded"
        );
        let held_read = tokio::spawn({
            let h = h.clone();
            async move {
                h.read(|v| {
                    v.quarter_docs()
                        .into_iter()
                        .map(|(q, am)| {
                            let n = am.get(automerge::ROOT, "n").ok().flatten();
                            (q.to_string(), n.and_then(|(v, _)| v.as_i64()))
                        })
                        .collect::<Vec<_>>()
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !held_read.is_finished(),
            "a read of every quarter ran before the others were loaded"
        );
        // What runs at once is not stuck behind what is held.
        let status = tokio::time::timeout(Duration::from_secs(10), h.status())
            .await
            .expect("status answers while a read is held")
            .expect("status");
        assert_eq!(status.loading, 3);
        // The signatures load beside the other documents, not before the API.
        let signed = |v: View<'_>| v.engine.holds_signature(&ChangeHash([7; 32]));
        assert!(!h.read_now(signed).await.expect("read"));

        release
            .send(loading.await.expect("loaded"))
            .map_err(|_| "actor gone")
            .expect("release");
        let read = tokio::time::timeout(Duration::from_secs(20), held_read)
            .await
            .expect("the held read runs once the documents are loaded")
            .expect("join")
            .expect("read");
        assert_eq!(
            read,
            [
                ("own".to_string(), Some(1)),
                ("q0".to_string(), Some(2)),
                ("q1".to_string(), Some(3)),
                ("q2".to_string(), Some(4)),
            ]
        );
        let status = h.status().await.expect("status");
        assert_eq!(status.loading, 0);
        assert_eq!(status.documents.len(), 5);
        let kept = h
            .read(move |v| {
                let am = v.engine.doc(&own)?;
                am.get(automerge::ROOT, "recorded")
                    .ok()
                    .flatten()?
                    .0
                    .as_bool()
            })
            .await
            .expect("read");
        assert_eq!(kept, Some(true), "the write made while loading is kept");
        assert!(h.read(signed).await.expect("read"), "the signatures loaded");
        let heads = h.heads().await.expect("heads");
        assert_eq!((heads.documents.len(), heads.loading), (5, 0));
        replicator.shutdown().await.expect("shutdown");
    }

    /// The inbox hands out the events marked first in their order, then
    /// the others in theirs, and counts their bytes while they wait.
    /// A whole document stored as it came makes its document due for
    /// compaction once the node is quiet; a change counts one.
    #[test]
    fn a_whole_document_stored_loose_counts_a_compactions_worth() {
        let id = DocId::quarter(&crate::ids::QuarterSlug::new("q").expect("slug"));
        let mut am = crate::schema::genesis(&id);
        for i in 0..3 {
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, "n", i as i64).expect("put");
            tx.commit();
        }
        let changes: Vec<u8> = am
            .get_changes(&[])
            .iter()
            .flat_map(|c| c.raw_bytes().to_vec())
            .collect();
        assert_eq!(loose_weight(&changes), 4, "the genesis and three changes");
        assert_eq!(loose_weight(&am.save()), COMPACT_AFTER_CHANGES);
        assert_eq!(loose_weight(&am.save_nocompress()), COMPACT_AFTER_CHANGES);
    }

    /// A message or acknowledgement about a document waits for the last
    /// write holding that document's changes, not for other documents'
    /// writes; a write of signatures alone holds back everything.
    #[test]
    fn each_document_waits_for_its_own_writes_only() {
        let (a, b, c) = (
            DocId::quarter(&slug("a")),
            DocId::quarter(&slug("b")),
            DocId::City,
        );
        let mut tickets = Tickets::default();
        tickets.wrote(1, [&a].into_iter(), false);
        tickets.wrote(2, [&b, &a].into_iter(), false);
        tickets.wrote(3, [&b].into_iter(), false);
        assert_eq!((tickets.of(&a), tickets.of(&b), tickets.of(&c)), (2, 3, 0));
        tickets.durable(2);
        assert_eq!((tickets.of(&a), tickets.of(&b)), (0, 3));
        tickets.wrote(4, std::iter::empty(), true);
        assert_eq!((tickets.of(&a), tickets.of(&b), tickets.of(&c)), (4, 4, 4));
        tickets.durable(4);
        assert_eq!((tickets.of(&a), tickets.of(&b), tickets.of(&c)), (4, 4, 4));
        // Held items come out once their own ticket is durable, in order.
        let mut held: VecDeque<(u64, &str)> = [(3, "b1"), (1, "a1"), (3, "b2"), (2, "a2")].into();
        assert!(take_durable(&mut held, 0).is_empty());
        assert_eq!(take_durable(&mut held, 2), ["a1", "a2"]);
        assert_eq!(held, [(3, "b1"), (3, "b2")]);
        assert_eq!(take_durable(&mut held, 3), ["b1", "b2"]);
        assert!(held.is_empty());
    }

    #[test]
    fn the_inbox_hands_out_what_goes_first_first() {
        let mut inbox = Inbox::default();
        inbox.push("a", 1, false);
        inbox.push("b", 2, false);
        inbox.push("x", 10, true);
        inbox.push("c", 3, false);
        inbox.push("y", 20, true);
        assert_eq!((inbox.len(), inbox.bytes), (5, 36));
        let order: Vec<&str> = std::iter::from_fn(|| inbox.pop()).collect();
        assert_eq!(order, ["x", "y", "a", "b", "c"]);
        assert!(inbox.is_empty());
        assert_eq!(inbox.bytes, 0);
    }

    /// A running node (a quarter whose roster lists `peers` quarters, each
    /// written by one of the returned swarms, connected to it) whose event
    /// loop is kept busy: requests from its API that take 5 ms each, always
    /// one waiting, between which the node handles the network, until
    /// `stop`.
    struct BusyNode {
        replicator: Replicator,
        node: PeerId,
        addr: Multiaddr,
        /// The peers' swarms, each a writer of quarter `q{i}`, then one
        /// more allowed to dial the node but not connected yet.
        swarms: Vec<Swarm<Behaviour>>,
        busy: Arc<std::sync::atomic::AtomicBool>,
        jobs: Vec<tokio::task::JoinHandle<()>>,
    }

    impl BusyNode {
        async fn start(dir: &std::path::Path, peers: usize) -> Self {
            let ids: Vec<Identity> = (0..=peers).map(|_| Identity::generate()).collect();
            let writers: Vec<PeerId> = ids.iter().map(Identity::peer_id).collect();
            let mut swarms: Vec<Swarm<Behaviour>> = ids
                .iter()
                .map(|id| {
                    transport::build_swarm(id, None, Arc::new(WireCounters::default()))
                        .expect("swarm")
                })
                .collect();
            let actor = quarter_actor_with(
                dir,
                peers + 1,
                None,
                Identity::generate().peer_id(),
                &writers,
            );
            let replicator = Replicator::run_actor(actor).expect("run");
            let h = replicator.handle();
            let node = h.peer_id();
            let addr: Multiaddr = tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    let status = h.status().await.expect("status");
                    if status.loading == 0
                        && let Some(addr) = status.listen.first()
                    {
                        break addr.parse().expect("a listen address");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("the node loads and listens within 20 s");
            for swarm in &mut swarms {
                swarm.behaviour_mut().allow.allow_peer(node);
            }
            for swarm in &mut swarms[..peers] {
                swarm.dial(addr.clone()).expect("dial");
            }
            let mut connected = 0;
            let mut all = futures::stream::select_all(swarms[..peers].iter_mut());
            tokio::time::timeout(Duration::from_secs(20), async {
                while connected < peers {
                    if let Some(SwarmEvent::ConnectionEstablished { .. }) = all.next().await {
                        connected += 1;
                    }
                }
            })
            .await
            .expect("the peers connect within 20 s");
            drop(all);
            let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let jobs = (0..4)
                .map(|_| {
                    let (h, busy) = (h.clone(), Arc::clone(&busy));
                    tokio::spawn(async move {
                        while busy.load(std::sync::atomic::Ordering::Relaxed) {
                            let slow = |_: View<'_>| std::thread::sleep(Duration::from_millis(5));
                            if h.read_now(slow).await.is_err() {
                                break;
                            }
                        }
                    })
                })
                .collect();
            Self {
                replicator,
                node,
                addr,
                swarms,
                busy,
                jobs,
            }
        }

        /// `n` requests from the swarm `from` about `doc` that are not sync
        /// messages: each is refused, as any malformed request, and answered.
        fn send_malformed(&mut self, from: usize, doc: &DocId, n: usize) {
            for _ in 0..n {
                self.swarms[from].behaviour_mut().sync.send_request(
                    &self.node,
                    Request::first_version(doc.clone(), vec![0x42; 16], Vec::new()),
                );
            }
        }

        async fn stop(self) {
            self.busy.store(false, std::sync::atomic::Ordering::Relaxed);
            for job in self.jobs {
                job.await.expect("join");
            }
            self.replicator.shutdown().await.expect("shutdown");
        }
    }

    /// A node with a backlog of messages from the peers already connected
    /// takes in a new connection at once, not only once it has handled the
    /// backlog: libp2p takes in new connections only while its connections
    /// have no events waiting (see `Actor::run`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_node_lets_a_new_peer_in_before_it_has_handled_its_backlog() {
        use libp2p::request_response::{Event, Message};
        // Eight peers with 100 requests each: within what a peer may have
        // in flight on one connection (yamux allows 300 streams) and within
        // the node's inbox.
        const PEERS: usize = 8;
        const EACH: usize = 100;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut n = BusyNode::start(dir.path(), PEERS).await;
        let mut late = n.swarms.pop().expect("the late peer");
        // Every peer sends 100 requests and the late one dials.
        for i in 0..PEERS {
            n.send_malformed(i, &DocId::City, EACH);
        }
        let addr = n.addr.clone();
        let mut all = futures::stream::select_all(n.swarms.iter_mut());
        let mut answered = 0;
        let mut dialled = false;
        let answered_before = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                // The late peer dials once the node has answered the first
                // requests: the rest are on their way or waiting.
                if answered >= PEERS && !dialled {
                    late.dial(addr.clone()).expect("dial");
                    dialled = true;
                }
                tokio::select! {
                    event = all.next() => match event {
                        Some(SwarmEvent::Behaviour(BehaviourEvent::Sync(
                            Event::Message { message: Message::Response { .. }, .. },
                        ))) => answered += 1,
                        Some(SwarmEvent::Behaviour(BehaviourEvent::Sync(
                            Event::OutboundFailure { error, .. },
                        ))) => panic!("a request failed: {error}"),
                        _ => {}
                    },
                    event = late.select_next_some(), if dialled => {
                        if let SwarmEvent::ConnectionEstablished { .. } = event {
                            break answered;
                        }
                    }
                }
            }
        })
        .await
        .expect("the late peer connects within 60 s");
        assert!(
            answered_before < PEERS * EACH / 2,
            "the late peer got in only after {answered_before} of the {} requests \
             waiting were answered",
            PEERS * EACH
        );
        drop(all);
        n.stop().await;
    }

    /// A message from a writer of its document goes ahead of the messages
    /// already waiting: a quarter's own document is not queued behind the
    /// other quarters' openings of sessions (`Actor::take_in`). Seven peers
    /// send 100 messages each about the city document, which they do not
    /// write; once at least 200 of them wait in the node's inbox, the
    /// eighth sends one about its own document, and its answer must come
    /// before half of those waiting are answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writers_message_about_its_document_goes_ahead_of_the_backlog() {
        use libp2p::request_response::{Event, Message};
        const PEERS: usize = 8;
        const EACH: usize = 100;
        const WAITING: usize = 200;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut n = BusyNode::start(dir.path(), PEERS).await;
        n.swarms.pop();
        let writer = PEERS - 1;
        for i in 0..writer {
            n.send_malformed(i, &DocId::City, EACH);
        }
        let own = DocId::quarter(&slug(&format!("q{writer}")));
        let h = n.replicator.handle();
        let mut answered = 0;
        // (answered, waiting in the inbox) when the writer sent its message.
        let mut sent: Option<(usize, usize)> = None;
        let (at_send, waiting, answered_before) =
            tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    if sent.is_none() {
                        let waiting = h.run_now(|a| a.inbox.len()).await.expect("run_now");
                        if waiting >= WAITING {
                            n.send_malformed(writer, &own, 1);
                            sent = Some((answered, waiting));
                        }
                    }
                    let mut all = futures::stream::select_all(
                        n.swarms
                            .iter_mut()
                            .enumerate()
                            .map(|(i, s)| s.map(move |e| (i, e))),
                    );
                    let next = tokio::time::timeout(Duration::from_millis(10), all.next()).await;
                    drop(all);
                    let Ok(Some((from, event))) = next else {
                        continue;
                    };
                    match event {
                        SwarmEvent::Behaviour(BehaviourEvent::Sync(Event::Message {
                            message: Message::Response { .. },
                            ..
                        })) => match (from == writer, sent) {
                            (true, Some((at, waiting))) => break (at, waiting, answered),
                            (true, None) => panic!("the writer was answered before it sent"),
                            (false, _) => answered += 1,
                        },
                        SwarmEvent::Behaviour(BehaviourEvent::Sync(Event::OutboundFailure {
                            error,
                            ..
                        })) => panic!("a request failed: {error}"),
                        _ => {}
                    }
                }
            })
            .await
            .expect("the writer sends and is answered within 60 s");
        let overtaken_by = answered_before - at_send;
        assert!(
            overtaken_by < waiting / 2,
            "the writer's message about its own document was answered only after \
             {overtaken_by} of the {waiting} messages waiting before it"
        );
        n.stop().await;
    }

    /// A document that does not load stops the node, after the API
    /// answered, with the document's name.
    #[tokio::test]
    async fn a_document_that_fails_to_load_behind_the_api_stops_the_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let actor = quarter_actor(dir.path(), 3, Some(1));
        let replicator = Replicator::run_actor(actor).expect("run");
        let err = tokio::time::timeout(Duration::from_secs(20), replicator.wait())
            .await
            .expect("the node stops by itself")
            .expect_err("a damaged document loaded");
        match err {
            ReplicatorError::Load { doc, .. } => assert_eq!(doc, DocId::quarter(&slug("q1"))),
            other => panic!("stopped with {other}"),
        }
    }

    /// To a peer that reads the short form, signatures go as records of 72
    /// bytes, the hash's prefix and the signature; to any other peer they
    /// go with whole hashes.
    #[test]
    fn signatures_go_in_the_short_form_only_to_a_peer_that_reads_it() {
        let sigs: Vec<(ChangeHash, Vec<u8>)> = (0..3u8)
            .map(|i| (ChangeHash([i; 32]), vec![i + 100; SIGNATURE_LEN]))
            .collect();
        let (whole, signed) = wire_signatures(sigs.clone(), false);
        assert!(signed.is_empty());
        assert_eq!(parse_sigs(whole), Some(sigs.clone()));

        let (whole, signed) = wire_signatures(sigs.clone(), true);
        assert!(whole.is_empty());
        assert_eq!(signed.len(), 3 * wire::PREFIXED_SIGNATURE_LEN);
        for (record, (hash, sig)) in signed.chunks(wire::PREFIXED_SIGNATURE_LEN).zip(&sigs) {
            assert_eq!(
                record[..wire::HASH_PREFIX_LEN],
                hash.0[..wire::HASH_PREFIX_LEN]
            );
            assert_eq!(&record[wire::HASH_PREFIX_LEN..], sig.as_slice());
        }
    }

    /// Documents load on several threads but come back in the order given,
    /// and one that cannot be loaded says so without taking the others down.
    #[test]
    fn stored_documents_load_in_parallel_in_order() {
        let actor = automerge::ActorId::from(vec![9u8; 16]);
        let stored: Vec<StoredDoc> = (0..7)
            .map(|i| {
                let id =
                    DocId::quarter(&crate::ids::QuarterSlug::new(&format!("q{i}")).expect("slug"));
                let mut am = crate::schema::genesis(&id);
                am.set_actor(actor.clone());
                let mut tx = am.transaction();
                tx.put(automerge::ROOT, "n", i as i64).expect("put");
                tx.commit();
                // Even documents as a snapshot, odd ones as loose changes.
                let chunk = if i % 2 == 0 {
                    am.save()
                } else {
                    am.get_changes(&[])
                        .iter()
                        .flat_map(|c| c.raw_bytes().to_vec())
                        .collect()
                };
                StoredDoc {
                    id,
                    chunks: vec![chunk],
                    snapshot: i % 2 == 0,
                }
            })
            .chain(std::iter::once({
                // A snapshot damaged on disk: its checksum no longer fits.
                let mut snapshot = crate::schema::genesis(&DocId::City).save();
                let middle = snapshot.len() / 2;
                snapshot[middle] ^= 0xff;
                StoredDoc {
                    id: DocId::City,
                    chunks: vec![snapshot],
                    snapshot: true,
                }
            }))
            .collect();
        let want: Vec<DocId> = stored.iter().map(|doc| doc.id.clone()).collect();
        let loaded = load_in_parallel(stored, &actor);
        assert_eq!(loaded.len(), want.len());
        for (i, ((id, am), want)) in loaded.iter().zip(&want).enumerate() {
            assert_eq!(id, want);
            if want == &DocId::City {
                assert!(am.is_err(), "a damaged snapshot loaded");
                continue;
            }
            let am = am.as_ref().expect("a stored document loads");
            let n = am
                .get(automerge::ROOT, "n")
                .expect("read")
                .map(|(v, _)| v.as_i64());
            assert_eq!(n, Some(Some(i as i64)));
            assert_eq!(am.get_actor(), &actor);
        }
    }
}
