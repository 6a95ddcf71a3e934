//! The libp2p side: TCP + Noise + Yamux on tokio, carrying the sync protocol
//! ([`crate::wire`]) as request-response with CBOR-encoded, size-capped messages.

use std::time::Duration;

use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, Swarm, noise, tcp, yamux};

use crate::identity::Identity;
use crate::wire::{self, Request, Response};

/// How long a sync request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections stay open while idle: peers push changes over them at once.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

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
    pub sync: request_response::cbor::Behaviour<Request, Response>,
}

/// Builds the swarm for `identity`.
pub fn build_swarm(identity: &Identity) -> Result<Swarm<Behaviour>, TransportError> {
    let codec = request_response::cbor::codec::Codec::default()
        .set_request_size_maximum(wire::MAX_REQUEST_BYTES)
        .set_response_size_maximum(wire::MAX_RESPONSE_BYTES);
    let config = request_response::Config::default()
        .with_request_timeout(REQUEST_TIMEOUT)
        .with_max_concurrent_streams(256);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity.keypair().clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| Behaviour {
            sync: request_response::Behaviour::with_codec(
                codec,
                [(
                    StreamProtocol::new(wire::SYNC_PROTOCOL),
                    ProtocolSupport::Full,
                )],
                config,
            ),
        })
        .map_err(|e| TransportError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
        .build();
    Ok(swarm)
}
