//! Several hosts as one platform: each pool manager registers itself in the shared
//! catalog and heartbeats (`hosts.rs`); a request about a sandbox another host owns
//! is forwarded there (`routing.rs`, `forward.rs`).
//!
//! The host this process is, set once at start: records it makes are this host's
//! (`SandboxRecord::host_id`), and its catalog reads of background work are scoped to
//! it (`Catalog::set_host`).

pub mod forward;
pub mod hosts;
pub mod placement;
pub mod routing;
pub mod tunnel;

use std::sync::OnceLock;

static THIS_HOST: OnceLock<String> = OnceLock::new();

/// This process's host ID, once [`set_this_host`] ran.
pub fn this_host() -> Option<&'static str> {
    THIS_HOST.get().map(String::as_str)
}

/// Sets this process's host ID (the first call wins; later ones are ignored).
pub fn set_this_host(id: &str) {
    let _ = THIS_HOST.set(id.to_string());
}
