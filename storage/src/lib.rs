//! Object storage for snapshots and volumes.
//!
//! - [`ObjectStore`]: the one interface (put, conditional put, get, list, delete) with two
//!   backends, a local directory ([`LocalStore`]) and S3 ([`S3Store`]); [`Store`] is
//!   whichever the configuration names.
//! - [`chunks`]: files (memory images, disk layers) stored as content-addressed chunks
//!   (`chunks/<sha256>`), holes and zero chunks skipped: memory images at fixed offsets,
//!   streams and overlays at content-defined cut points, so a fork family or successive
//!   snapshots of one sandbox share most bytes; every chunk is verified when read back.
//! - [`pages`]: a memory chunk that differs from its base in a few pages stored as a
//!   patch of those pages.
//! - [`snapshots`]: a snapshot directory published as chunks plus a manifest written last
//!   with a conditional put, listed, fetched back, deleted, and the chunks no manifest
//!   references collected.
//! - [`volumes`]: durable volumes: records, saved contents (chunks too), the write lock
//!   and holders.
//! - [`gc`]: garbage collection shared by every worker of a bucket: one collector at a
//!   time (a lease), chunks deleted only after a grace period unreferenced, and claims
//!   that keep a publish's chunks until its manifest lands.

pub mod chunks;
pub mod gc;
mod local;
pub mod pages;
mod s3;
pub mod snapshots;
mod store;
pub mod volumes;

pub use chunks::{restore_file, upload_file, FileManifest, UploadStats, CHUNK_SIZE};
pub use local::LocalStore;
pub use s3::{S3Config, S3Store};
pub use store::{ObjectStore, Store, StoreError};
