//! The libp2p side: TCP + Noise + Yamux on tokio, carrying the sync protocol
//! ([`crate::wire`]) as request-response with CBOR-encoded, size-capped
//! messages, deflated between nodes that both speak `/iq/sync/2`
//! ([`crate::codec`]).

use std::sync::Arc;
use std::time::Duration;

use libp2p::Transport as _;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::core::upgrade::Version;
use libp2p::pnet::PnetConfig;
pub use libp2p::pnet::PreSharedKey;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, Swarm, noise, ping, tcp, yamux};

use crate::codec::{self, SyncCodec, WireCounters};
use crate::identity::Identity;
use crate::wire;

/// How long a sync request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections stay open while idle: peers push changes over them at once.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Every connection is pinged this often; a ping unanswered within
/// [`PING_TIMEOUT`] closes the connection, so a connection that a network
/// partition silently broke is redialled instead of waiting for TCP's
/// retransmission backoff (up to two minutes) after the network heals.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Yamux streams one connection may have open (yamux's default is 512).
/// Sync keeps at most one request per (peer, document) in flight in each
/// direction, so a federation needs about twice its document count.
pub const MAX_STREAMS_PER_CONNECTION: usize = 300;

/// Events one connection may queue for the node's event loop (libp2p's
/// default is 7). A connection whose queue is full stops reading, and so
/// stops answering pings: with the default, a node busy applying a large
/// catch-up let its peers' pings time out and lost the connections (at 64
/// quarters × 1,000 concerns on two cores). What a peer can make a
/// connection queue is bounded anyway, by one outstanding message per
/// document and the peer's window of messages with changes
/// (`engine::Engine::peer_window`).
pub const CONNECTION_EVENT_BUFFER: usize = 64;

/// Concurrent sync requests per connection, both directions together:
/// room for 128 documents (127 quarters and the city).
pub const MAX_CONCURRENT_REQUESTS: usize = 256;

/// Connections a node holds: handshakes in progress, per peer, in total.
/// Room for every quarter of a city of 127 to reconnect at once when the
/// centre restarts: with 32, a restarted centre with 64 quarters refused 9
/// of their first dials, and those quarters came up 6 to 8 s after the
/// others (`docs/benchmarks.md`, run 75).
pub const MAX_PENDING_INCOMING: u32 = 128;
pub const MAX_ESTABLISHED_PER_PEER: u32 = 2;
pub const MAX_ESTABLISHED: u32 = 1024;

/// Why the transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot set up noise encryption: {0}")]
    Noise(#[from] noise::Error),
    #[error("cannot build the libp2p swarm: {0}")]
    Build(String),
}

/// The node's libp2p behaviour.
// The derive generates an event enum without Debug for the behaviour itself.
#[allow(missing_debug_implementations)]
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Admission: only peers on the allow list (the roster, or a quarter's
    /// centre) get a connection; removing a peer closes its connections.
    pub allow: allow_block_list::Behaviour<AllowedPeers>,
    pub limits: connection_limits::Behaviour,
    pub sync: request_response::Behaviour<SyncCodec>,
    /// Liveness of each connection (see [`PING_INTERVAL`]).
    pub ping: ping::Behaviour,
}

/// The address the centre dials writer node `peer` at, as an operator gave
/// it on the roster (`iq-center quarter add --addr`): a libp2p multiaddr
/// with a transport, and with `/p2p/` only if it names `peer` (it is left
/// out of what is stored). Errors say what was wrong and what to give.
pub fn roster_addr(peer: &libp2p::PeerId, given: &str) -> Result<libp2p::Multiaddr, String> {
    use libp2p::multiaddr::Protocol;
    let mut addr: libp2p::Multiaddr = given.trim().parse().map_err(|e| {
        format!("{given:?} is not a multiaddr ({e}); give where the quarter node listens, e.g. /ip4/10.0.0.5/tcp/4001 or /dns4/quarter.example.org/tcp/4001")
    })?;
    if let Some(Protocol::P2p(named)) = addr.iter().last() {
        if named != *peer {
            return Err(format!(
                "{given:?} names node {named}, not {peer}; give the address of {peer}, or leave out /p2p/"
            ));
        }
        addr.pop();
    }
    if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
        return Err(format!(
            "{given:?} has /p2p/ inside it; give the node's own address, e.g. /ip4/10.0.0.5/tcp/4001"
        ));
    }
    let unspecified = addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    });
    if unspecified {
        return Err(format!(
            "{given:?} is a wildcard, not an address to dial; give the quarter node's own IP address or DNS name"
        ));
    }
    let dialable = addr
        .iter()
        .any(|p| matches!(p, Protocol::Tcp(port) if port != 0));
    if !dialable {
        return Err(format!(
            "{given:?} has no TCP port to dial; give where the quarter node listens, e.g. /ip4/10.0.0.5/tcp/4001"
        ));
    }
    Ok(addr)
}

fn swarm_config(c: libp2p::swarm::Config) -> libp2p::swarm::Config {
    c.with_idle_connection_timeout(IDLE_TIMEOUT)
        .with_per_connection_event_buffer_size(CONNECTION_EVENT_BUFFER)
}

/// The sync protocols a node of this version speaks, the preferred first:
/// deflated, then plain CBOR with nodes of an earlier version.
pub const SYNC_PROTOCOLS: [&str; 2] = [codec::SYNC_PROTOCOL_V2, wire::SYNC_PROTOCOL];

/// The behaviour, speaking `protocols` on sync streams counted in `counters`.
fn behaviour(counters: Arc<WireCounters>, protocols: &[&'static str]) -> Behaviour {
    let config = request_response::Config::default()
        .with_request_timeout(REQUEST_TIMEOUT)
        .with_max_concurrent_streams(MAX_CONCURRENT_REQUESTS);
    let limits = ConnectionLimits::default()
        .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
        .with_max_established_per_peer(Some(MAX_ESTABLISHED_PER_PEER))
        .with_max_established(Some(MAX_ESTABLISHED));
    Behaviour {
        allow: allow_block_list::Behaviour::default(),
        limits: connection_limits::Behaviour::new(limits),
        sync: request_response::Behaviour::with_codec(
            SyncCodec::new(counters),
            protocols
                .iter()
                .map(|p| (StreamProtocol::new(p), ProtocolSupport::Full)),
            config,
        ),
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(PING_INTERVAL)
                .with_timeout(PING_TIMEOUT),
        ),
    }
}

fn yamux_config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    cfg.set_max_num_streams(MAX_STREAMS_PER_CONNECTION);
    cfg
}

/// Builds the swarm for `identity`. With a pre-shared key (libp2p private
/// networks), every connection first proves knowledge of the key, so
/// strangers are dropped before the Noise handshake. What the sync streams
/// carry is counted in `counters`.
pub fn build_swarm(
    identity: &Identity,
    psk: Option<PreSharedKey>,
    counters: Arc<WireCounters>,
) -> Result<Swarm<Behaviour>, TransportError> {
    build_swarm_speaking(identity, psk, counters, &SYNC_PROTOCOLS)
}

/// [`build_swarm`] speaking only `protocols` on sync streams (the tests
/// play a node of an earlier version with it).
fn build_swarm_speaking(
    identity: &Identity,
    psk: Option<PreSharedKey>,
    counters: Arc<WireCounters>,
    protocols: &[&'static str],
) -> Result<Swarm<Behaviour>, TransportError> {
    let builder =
        libp2p::SwarmBuilder::with_existing_identity(identity.keypair().clone()).with_tokio();
    let swarm = match psk {
        None => builder
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux_config,
            )?
            .with_behaviour(|_| behaviour(Arc::clone(&counters), protocols))
            .map_err(|e| TransportError::Build(e.to_string()))?
            .with_swarm_config(swarm_config)
            .build(),
        Some(psk) => builder
            .with_other_transport(|key| {
                let noise = noise::Config::new(key)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
                let transport = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                    .upgrade(Version::V1)
                    .authenticate(noise)
                    .multiplex(yamux_config());
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(transport)
            })
            .map_err(|e| TransportError::Build(e.to_string()))?
            .with_behaviour(|_| behaviour(counters, protocols))
            .map_err(|e| TransportError::Build(e.to_string()))?
            .with_swarm_config(swarm_config)
            .build(),
    };
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use libp2p::Multiaddr;
    use libp2p::request_response::{Event, Message};
    use libp2p::swarm::SwarmEvent;

    use super::*;
    use crate::ids::DocId;
    use crate::wire::{Request, RequestV1, Response, ResponseV1};

    /// A sync request of about `n` kilobytes that deflates as change
    /// chunks do: repeated field names with a few varying bytes.
    fn request(n: usize) -> Request {
        let mut data = Vec::new();
        let mut i: u32 = 0;
        while data.len() < n * 1024 {
            data.extend_from_slice(b"category road-damage status open id ");
            data.extend_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
            i += 1;
        }
        Request::V1(RequestV1::Sync {
            doc: DocId::City,
            data,
            sigs: Vec::new(),
            answer: true,
            documents: false,
            signed: Vec::new(),
            prefixed: false,
            compressed: false,
            vouched: false,
        })
    }

    fn node(protocols: &[&'static str]) -> (Swarm<Behaviour>, Arc<WireCounters>) {
        let counters = Arc::new(WireCounters::default());
        let swarm = build_swarm_speaking(
            &Identity::generate(),
            None,
            Arc::clone(&counters),
            protocols,
        )
        .expect("the swarm builds");
        (swarm, counters)
    }

    /// `a` dials `b`, sends it `req` and waits for its acknowledgement;
    /// returns the bytes `a` wrote on the stream for the request.
    async fn one_request(
        (a, a_wire): &mut (Swarm<Behaviour>, Arc<WireCounters>),
        (b, _): &mut (Swarm<Behaviour>, Arc<WireCounters>),
        req: Request,
    ) -> u64 {
        b.listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("an address"))
            .expect("listens");
        let addr: Multiaddr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = b.select_next_some().await {
                break address;
            }
        };
        a.behaviour_mut().allow.allow_peer(*b.local_peer_id());
        b.behaviour_mut().allow.allow_peer(*a.local_peer_id());
        a.dial(addr.clone()).expect("dials");
        a.behaviour_mut().sync.send_request_with_addresses(
            b.local_peer_id(),
            req.clone(),
            vec![addr],
        );
        let before = a_wire.sent();
        loop {
            tokio::select! {
                event = a.select_next_some() => match event {
                    SwarmEvent::Behaviour(BehaviourEvent::Sync(Event::Message {
                        message: Message::Response { response, .. }, ..
                    })) => {
                        assert_eq!(response, Response::V1(ResponseV1::Ack));
                        return a_wire.sent() - before;
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Sync(Event::OutboundFailure { error, .. })) => {
                        panic!("the request failed: {error}");
                    }
                    _ => {}
                },
                event = b.select_next_some() => {
                    if let SwarmEvent::Behaviour(BehaviourEvent::Sync(Event::Message {
                        message: Message::Request { request, channel, .. }, ..
                    })) = event {
                        assert_eq!(request, req, "the request arrived changed");
                        b.behaviour_mut()
                            .sync
                            .send_response(channel, Response::V1(ResponseV1::Ack))
                            .expect("the channel is open");
                    }
                }
            }
        }
    }

    async fn bytes_for_a_request(a: &[&'static str], b: &[&'static str]) -> u64 {
        let (mut a, mut b) = (node(a), node(b));
        tokio::time::timeout(
            Duration::from_secs(20),
            one_request(&mut a, &mut b, request(64)),
        )
        .await
        .expect("the request is answered within 20 s")
    }

    #[tokio::test]
    async fn nodes_of_this_version_deflate_and_talk_plain_cbor_with_earlier_ones() {
        let earlier = [wire::SYNC_PROTOCOL];
        let both = bytes_for_a_request(&SYNC_PROTOCOLS, &SYNC_PROTOCOLS).await;
        let to_earlier = bytes_for_a_request(&SYNC_PROTOCOLS, &earlier).await;
        let from_earlier = bytes_for_a_request(&earlier, &SYNC_PROTOCOLS).await;
        assert!(
            both < 32 * 1024,
            "{both} B for 64 KiB between two nodes of this version"
        );
        assert!(
            to_earlier > 64 * 1024,
            "{to_earlier} B to a node of an earlier version"
        );
        assert!(
            from_earlier > 64 * 1024,
            "{from_earlier} B from a node of an earlier version"
        );
    }

    #[test]
    fn a_roster_address_is_checked_and_stored_without_p2p() {
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let other = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let plain = "/ip4/10.0.0.5/tcp/4001";
        assert_eq!(roster_addr(&peer, plain).expect("plain").to_string(), plain);
        let named = format!("{plain}/p2p/{peer}");
        assert_eq!(
            roster_addr(&peer, &named).expect("named").to_string(),
            plain
        );
        let dns = "/dns4/quarter.example.org/tcp/4001";
        assert_eq!(roster_addr(&peer, dns).expect("dns").to_string(), dns);
        for (bad, says) in [
            ("10.0.0.5:4001".to_string(), "is not a multiaddr"),
            (format!("{plain}/p2p/{other}"), "not"),
            (format!("/p2p/{peer}{plain}"), "has /p2p/ inside"),
            ("/ip4/0.0.0.0/tcp/4001".to_string(), "wildcard"),
            ("/ip4/10.0.0.5/tcp/0".to_string(), "no TCP port"),
            ("/ip4/10.0.0.5".to_string(), "no TCP port"),
        ] {
            let err = roster_addr(&peer, &bad).expect_err(&bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
