//! pgswitch: a PostgreSQL wire-protocol proxy with connection pooling and built-in failover.
//!
//! Data flows one way: client socket → `frontend` (TLS, startup, auth) → `pool` (a server
//! connection to the current primary) → `session` relay loop → back. Beside it, `cluster`
//! diagnoses the nodes and publishes a `Topology` that pools and sessions read.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod buffers;
pub mod cancel;
pub mod client_error;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod coord;
pub mod demo;
pub mod failover;
pub mod frontend;
pub mod harness;
pub mod metrics;
pub mod params;
pub mod pool;
pub mod prepared;
pub mod server;
pub mod session;
pub mod status;
pub mod stream;
pub mod wire;
