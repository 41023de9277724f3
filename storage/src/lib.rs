//! Object storage for snapshots and volumes.
//!
//! - [`ObjectStore`]: the one interface (put, conditional put, get, list, delete) with a
//!   local-directory backend ([`LocalStore`]); the S3 backend joins it.
//! - [`chunks`]: files (memory images, disk layers) stored as content-addressed chunks
//!   (`chunks/<sha256>`), page-aligned, holes and zero chunks skipped, so a fork family or
//!   periodic snapshots of one sandbox share most bytes; every chunk is verified when read
//!   back.

pub mod chunks;
mod local;
mod store;

pub use chunks::{restore_file, upload_file, FileManifest, UploadStats, CHUNK_SIZE};
pub use local::LocalStore;
pub use store::{ObjectStore, StoreError};
