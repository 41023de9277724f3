//! Nullspace's public API host: wasmtime serving the API component over HTTP, in front
//! of a pool manager. The `nullspace-api` binary runs it as a process of its own (a
//! cluster's API tier); the pool manager can also run it in-process
//! (`--public-listen`), where the component's outbound calls go straight to its control
//! routes without a socket ([`upstream::Upstream::in_process`]).

pub mod config;
// The pool manager's flag layering (command line, environment, file), shared.
#[path = "../../pool-manager/src/layered.rs"]
mod layered;
pub mod runtime;
pub mod server;
pub mod upstream;
