//! iq-center: the centre node. The city administration runs it; it owns the
//! city document (the roster, later the frame it sets) and holds a replica
//! of every quarter's document, relaying changes so every node converges.
//!
//! # Layout
//! - [`api`]: the centre's HTTP API (common routes + roster).
//! - [`cli`]: the `iq-center` command line.
//! - [`demo`]: a demo federation of a centre and three quarters in one process.

pub mod api;
pub mod cli;
pub mod demo;
