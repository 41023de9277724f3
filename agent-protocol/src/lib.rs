//! The wire protocol between the host and the guest agent.
//!
//! One virtio-serial port carries many concurrent streams. [`frame`] says how bytes are
//! cut into frames; [`message`] says what the JSON control frames mean. Neither does I/O:
//! the guest agent and the host-side client each drive a [`FrameDecoder`] with the bytes
//! they read, so both sides share one implementation of the format.

pub mod frame;
pub mod message;

pub use frame::{Channel, Decoded, Frame, FrameDecoder, FrameKind};
pub use message::*;

/// Largest payload of one frame. Data is sent in chunks of at most [`DATA_CHUNK`]; a
/// control message larger than this is refused by the sender.
pub const MAX_FRAME_PAYLOAD: usize = 1024 * 1024;

/// Size of the data chunks both sides send.
pub const DATA_CHUNK: usize = 64 * 1024;

/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "nullspace.agent";
