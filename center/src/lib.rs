//! iq-center: the centre node. The city administration runs it; it owns the
//! city document (the roster, later the frame it sets) and holds a replica
//! of every quarter's document, relaying changes so every node converges.
//!
//! # Layout
//! - [`api`]: the centre's HTTP API (common routes + roster).
//! - [`frame_api`]: the centre's actions (directives, consultations, frames, responses) over HTTP.
//! - [`dashboard`]: the administration's dashboard page at `/`.
//! - [`cli`]: the `iq-center` command line.
//! - [`frame_cli`]: the centre's commands of the counter-current workflows.
//! - [`demo`]: a demo federation of a centre and three quarters in one process.

pub mod api;
pub mod cli;
pub mod dashboard;
pub mod demo;
pub mod frame_api;
pub mod frame_cli;
