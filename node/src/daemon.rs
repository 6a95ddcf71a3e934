//! Starting and stopping a node daemon: lock the data directory, open the
//! store, start the replicator and the HTTP API, publish the API address.
//! Shared by `iq-node` and `iq-center` (and the in-process demo).

use std::net::SocketAddr;

use axum::Router;
use iq_protocol::datadir::{DataDir, DataDirError, DirLock, Role};
use iq_protocol::replicator::{Handle, Replicator, ReplicatorConfig, ReplicatorError};
use iq_protocol::store::{Store, StoreError};
use iq_protocol::transport_addr::Protocol;
use iq_protocol::{DocId, Multiaddr, PeerId};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Why a daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Replicator(#[from] ReplicatorError),
    #[error("invalid {what} {value:?} in config.toml: {reason}")]
    Config {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("Open311 settings: {0}; fix the file, or remove it to use the default services")]
    Open311(String),
    #[error("cannot serve the HTTP API on {addr}: {source} (is another program using that port?)")]
    Api {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    replicator: Replicator,
    http: JoinHandle<std::io::Result<()>>,
    stop_http: oneshot::Sender<()>,
    /// Ends the pages' event streams, which would otherwise hold the
    /// graceful HTTP shutdown open for as long as a browser stays.
    stopping: tokio::sync::watch::Sender<bool>,
    data: DataDir,
    _lock: DirLock,
    pub api_addr: SocketAddr,
    /// The libp2p address peers reach this node at, with `/p2p/<PeerId>`.
    pub listen: String,
    pub peer_id: PeerId,
}

/// Parses a multiaddr ending in `/p2p/<PeerId>`.
pub fn parse_peer_addr(s: &str) -> Result<(PeerId, Multiaddr), String> {
    let addr: Multiaddr = s.parse().map_err(|e| {
        format!(
            "{s:?} is not a multiaddr ({e}); expected e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW..."
        )
    })?;
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Ok((peer, addr)),
        _ => Err(format!(
            "{s:?} does not end in /p2p/<PeerId>; append the centre's PeerId printed by `iq-center init`"
        )),
    }
}

impl Daemon {
    /// Starts the daemon for `data`, serving `routes` on the API.
    pub async fn start(
        data: DataDir,
        role: Role,
        routes: impl FnOnce(Handle) -> Router,
    ) -> Result<Self, DaemonError> {
        let config = data.config(role)?;
        let open311 = crate::open311::config::Open311Config::load(data.path())
            .map_err(DaemonError::Open311)?;
        let lock = data.lock()?;
        let identity = data.identity()?;
        let peer_id = identity.peer_id();
        let listen: Multiaddr =
            config
                .listen
                .parse()
                .map_err(
                    |e: iq_protocol::transport_addr::Error| DaemonError::Config {
                        what: "listen address",
                        value: config.listen.clone(),
                        reason: e.to_string(),
                    },
                )?;
        let (own_doc, center) = match role {
            Role::Center => (DocId::City, None),
            Role::Quarter => {
                let quarter = config.quarter.clone().ok_or_else(|| DaemonError::Config {
                    what: "quarter",
                    value: String::new(),
                    reason: "a quarter node needs a [quarter] section".into(),
                })?;
                let center_s = config.center.clone().unwrap_or_default();
                let center = parse_peer_addr(&center_s).map_err(|reason| DaemonError::Config {
                    what: "center",
                    value: center_s,
                    reason,
                })?;
                (DocId::quarter(&quarter.slug), Some(center))
            }
        };
        let advertise = match &config.advertise {
            Some(a) => Some(a.parse::<Multiaddr>().map_err(|e| DaemonError::Config {
                what: "advertise address",
                value: a.clone(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let psk = if config.private_network {
            Some(data.psk()?)
        } else {
            None
        };
        let store = Store::open(&data.store_path())?;
        let replicator = Replicator::spawn(ReplicatorConfig {
            identity,
            role,
            own_doc,
            listen: listen.clone(),
            advertise,
            center,
            store,
            psk,
            replicate: config.replicate,
        })
        .await?;
        let listener = tokio::net::TcpListener::bind(config.api)
            .await
            .map_err(|source| DaemonError::Api {
                addr: config.api,
                source,
            })?;
        let api_addr = listener.local_addr().map_err(|source| DaemonError::Api {
            addr: config.api,
            source,
        })?;
        // Metrics and health answer any host (a Prometheus server scrapes
        // from another machine); everything else only this machine.
        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let app = routes(replicator.handle())
            .merge(crate::open311::router(replicator.handle(), open311))
            .layer(axum::middleware::from_fn_with_state(
                api_addr,
                crate::api::same_machine_only,
            ))
            .merge(crate::ops::public_routes().with_state(replicator.handle()))
            .layer(axum::Extension(crate::ops::Stopping(stopping_rx)));
        let (stop_http, stopped) = oneshot::channel::<()>();
        let http = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        data.write_api_addr(api_addr)?;
        Ok(Self {
            replicator,
            http,
            stop_http,
            stopping,
            data,
            _lock: lock,
            api_addr,
            listen: format!("{listen}/p2p/{peer_id}"),
            peer_id,
        })
    }

    pub fn handle(&self) -> Handle {
        self.replicator.handle()
    }

    pub fn data(&self) -> &DataDir {
        &self.data
    }

    /// Runs until ctrl-c / SIGTERM, or until the replicator stops by itself.
    pub async fn run_until_signal(self) -> Result<(), DaemonError> {
        let mut poll = tokio::time::interval(std::time::Duration::from_millis(500));
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = async { loop { poll.tick().await; if self.replicator.is_finished() { break; } } } => {}
        }
        self.shutdown().await
    }

    /// Stops the API and the replicator, waits for both, and releases the directory.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        self.data.remove_api_addr();
        self.stopping.send_replace(true);
        let _ = self.stop_http.send(());
        let _ = self.http.await;
        let result = self.replicator.shutdown().await;
        drop(self._lock);
        Ok(result?)
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
