//! iq-node: the quarter node. A quarter office runs it; it holds the
//! quarter's own document, replicas of the city and the other quarters, and
//! keeps working offline, syncing with the centre whenever it can.
//!
//! # Layout
//! - [`daemon`]: start/stop a node daemon (shared with `iq-center`).
//! - [`api`]: the local HTTP API under `/api/v1` and its errors.
//! - [`workflow_api`]: the counter-current views and a quarter's actions over HTTP.
//! - [`openapi`]: the OpenAPI description of the API, from one route table.
//! - [`open311`]: Open311 GeoReport v2 under `/open311/v2`, and its API keys.
//! - [`ops`]: `/metrics`, `/healthz`, `/readyz`, live updates (`/events`), the store export.
//! - [`backup`]: `backup` and `restore`: the snapshot file format and the directory swap.
//! - [`pages`]: the quarter office's page at `/` and the assets both pages share.
//! - [`client`]: the CLIs' client for a running daemon's API.
//! - [`cli`]: the `iq-node` command line.
//! - [`workflow_cli`]: the `iq-node` commands of the counter-current workflows.
//! - [`output`]: human-readable tables for the CLIs.

pub mod api;
pub mod backup;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod open311;
pub mod openapi;
pub mod ops;
pub mod output;
pub mod pages;
pub mod workflow_api;
pub mod workflow_cli;
