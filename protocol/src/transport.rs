//! The libp2p side: TCP + Noise + Yamux on tokio, carrying the sync protocol
//! ([`crate::wire`]) as request-response with CBOR-encoded, size-capped messages.

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

use crate::identity::Identity;
use crate::wire::{self, Request, Response};

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
pub const MAX_PENDING_INCOMING: u32 = 32;
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
    pub sync: request_response::cbor::Behaviour<Request, Response>,
    /// Liveness of each connection (see [`PING_INTERVAL`]).
    pub ping: ping::Behaviour,
}

fn swarm_config(c: libp2p::swarm::Config) -> libp2p::swarm::Config {
    c.with_idle_connection_timeout(IDLE_TIMEOUT)
        .with_per_connection_event_buffer_size(CONNECTION_EVENT_BUFFER)
}

/// Builds the swarm for `identity`.
fn behaviour() -> Behaviour {
    let codec = request_response::cbor::codec::Codec::default()
        .set_request_size_maximum(wire::MAX_REQUEST_BYTES)
        .set_response_size_maximum(wire::MAX_RESPONSE_BYTES);
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
            codec,
            [(
                StreamProtocol::new(wire::SYNC_PROTOCOL),
                ProtocolSupport::Full,
            )],
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
/// strangers are dropped before the Noise handshake.
pub fn build_swarm(
    identity: &Identity,
    psk: Option<PreSharedKey>,
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
            .with_behaviour(|_| behaviour())
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
            .with_behaviour(|_| behaviour())
            .map_err(|e| TransportError::Build(e.to_string()))?
            .with_swarm_config(swarm_config)
            .build(),
    };
    Ok(swarm)
}
