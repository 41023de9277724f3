//! Framing: how messages of many concurrent streams share one byte stream.
//!
//! Every frame is a fixed 12-byte header followed by `len` payload bytes:
//!
//! ```text
//! magic: u16 BE (0x4E53, "NS") | kind: u8 | channel: u8 | stream: u32 BE | len: u32 BE
//! ```
//!
//! The magic lets a reader find the next frame again if bytes were ever lost (a
//! virtio-serial port drops data written while the other side is not open). An
//! oversized frame is skipped without being buffered and reported, so one bad sender
//! cannot make the reader allocate without bound or lose its place.

use crate::MAX_FRAME_PAYLOAD;

/// First two bytes of every frame.
pub const MAGIC: u16 = 0x4E53;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;

/// What a frame's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON control message ([`crate::Request`] towards the agent,
    /// [`crate::Reply`] towards the host).
    Control = 1,
    /// Raw bytes on a channel of the stream.
    Data = 2,
    /// The end of a channel of the stream; no payload.
    Eof = 3,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Control),
            2 => Some(Self::Data),
            3 => Some(Self::Eof),
            _ => None,
        }
    }
}

/// Byte channels inside a stream. A process uses all three; a file transfer uses
/// [`Channel::Input`] (host → agent) or [`Channel::Output`] (agent → host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    /// Towards the agent: a process's stdin, or the body of a file being written.
    Input = 0,
    /// Towards the host: a process's stdout, or the body of a file being read.
    Output = 1,
    /// Towards the host: a process's stderr.
    Error = 2,
}

impl Channel {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Input),
            1 => Some(Self::Output),
            2 => Some(Self::Error),
            _ => None,
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A JSON control message (still encoded; see [`crate::Request`], [`crate::Reply`]).
    Control { stream: u32, json: Vec<u8> },
    /// Bytes on a channel.
    Data {
        stream: u32,
        channel: Channel,
        bytes: Vec<u8>,
    },
    /// A channel ended.
    Eof { stream: u32, channel: Channel },
}

impl Frame {
    /// The stream this frame belongs to.
    pub fn stream(&self) -> u32 {
        match self {
            Frame::Control { stream, .. }
            | Frame::Data { stream, .. }
            | Frame::Eof { stream, .. } => *stream,
        }
    }

    /// Appends the encoded frame to `out`.
    ///
    /// Panics in debug builds if the payload exceeds [`MAX_FRAME_PAYLOAD`]; callers
    /// chunk data and check control messages before they get here.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (kind, channel, stream, payload): (FrameKind, u8, u32, &[u8]) = match self {
            Frame::Control { stream, json } => (FrameKind::Control, 0, *stream, json),
            Frame::Data {
                stream,
                channel,
                bytes,
            } => (FrameKind::Data, *channel as u8, *stream, bytes),
            Frame::Eof { stream, channel } => (FrameKind::Eof, *channel as u8, *stream, &[]),
        };
        debug_assert!(payload.len() <= MAX_FRAME_PAYLOAD);
        encode_header(out, kind as u8, channel, stream, payload.len() as u32);
        out.extend_from_slice(payload);
    }

    /// The encoded frame as a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// Writes a raw header. Public so tests can produce frames a well-behaved sender never
/// would (oversized, unknown kind).
pub fn encode_header(out: &mut Vec<u8>, kind: u8, channel: u8, stream: u32, len: u32) {
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.push(kind);
    out.push(channel);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// What the decoder found in the bytes fed to it so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A well-formed frame.
    Frame(Frame),
    /// A frame whose payload exceeds the limit; its bytes are being skipped.
    Oversized { stream: u32, len: u32 },
    /// A frame with an unknown kind or channel; skipped.
    Malformed { stream: u32, reason: String },
    /// Bytes that were not a frame header were dropped while looking for the next one.
    Resynced { skipped: usize },
}

/// Incremental frame decoder: feed it bytes as they arrive, take frames out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Payload bytes of an oversized frame still to be thrown away.
    skip: u64,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the transport.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.skip > 0 {
            let n = (self.skip as usize).min(bytes.len());
            self.skip -= n as u64;
            self.buf.extend_from_slice(&bytes[n..]);
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next decoded item, or `None` when more bytes are needed.
    pub fn decode_next(&mut self) -> Option<Decoded> {
        if self.skip > 0 {
            let n = (self.skip as usize).min(self.buf.len());
            self.buf.drain(..n);
            self.skip -= n as u64;
            if self.skip > 0 {
                return None;
            }
        }
        if self.buf.len() < 2 {
            return None;
        }
        if u16::from_be_bytes([self.buf[0], self.buf[1]]) != MAGIC {
            let magic = MAGIC.to_be_bytes();
            let found = self.buf.windows(2).position(|w| w == magic);
            // Keep a trailing first magic byte: its partner may arrive in the next read.
            let skipped = found.unwrap_or(if self.buf.last() == Some(&magic[0]) {
                self.buf.len() - 1
            } else {
                self.buf.len()
            });
            self.buf.drain(..skipped);
            return Some(Decoded::Resynced { skipped });
        }
        if self.buf.len() < HEADER_LEN {
            return None;
        }
        let kind = self.buf[2];
        let channel = self.buf[3];
        let stream = u32::from_be_bytes(self.buf[4..8].try_into().unwrap());
        let len = u32::from_be_bytes(self.buf[8..12].try_into().unwrap());
        if len as usize > MAX_FRAME_PAYLOAD {
            self.buf.drain(..HEADER_LEN);
            self.skip = len as u64;
            // Drop what we already hold of the payload.
            let n = (self.skip as usize).min(self.buf.len());
            self.buf.drain(..n);
            self.skip -= n as u64;
            return Some(Decoded::Oversized { stream, len });
        }
        let total = HEADER_LEN + len as usize;
        if self.buf.len() < total {
            return None;
        }
        let payload: Vec<u8> = self.buf[HEADER_LEN..total].to_vec();
        self.buf.drain(..total);
        let Some(kind) = FrameKind::from_u8(kind) else {
            return Some(Decoded::Malformed {
                stream,
                reason: format!("unknown frame kind {kind}"),
            });
        };
        let frame = match kind {
            FrameKind::Control => Frame::Control {
                stream,
                json: payload,
            },
            FrameKind::Data | FrameKind::Eof => {
                let Some(channel) = Channel::from_u8(channel) else {
                    return Some(Decoded::Malformed {
                        stream,
                        reason: format!("unknown channel {channel}"),
                    });
                };
                if kind == FrameKind::Data {
                    Frame::Data {
                        stream,
                        channel,
                        bytes: payload,
                    }
                } else {
                    Frame::Eof { stream, channel }
                }
            }
        };
        Some(Decoded::Frame(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut FrameDecoder) -> Vec<Decoded> {
        std::iter::from_fn(|| d.decode_next()).collect()
    }

    #[test]
    fn round_trips_frames_split_at_every_byte() {
        let frames = vec![
            Frame::Control {
                stream: 7,
                json: b"{\"op\":\"x\"}".to_vec(),
            },
            Frame::Data {
                stream: 7,
                channel: Channel::Error,
                bytes: vec![1, 2, 3],
            },
            Frame::Eof {
                stream: 9,
                channel: Channel::Input,
            },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode_into(&mut wire);
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &wire {
            d.feed(std::slice::from_ref(b));
            got.extend(decode_all(&mut d));
        }
        let want: Vec<Decoded> = frames.into_iter().map(Decoded::Frame).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn oversized_frame_is_skipped_and_the_next_frame_still_decodes() {
        let mut wire = Vec::new();
        let big = MAX_FRAME_PAYLOAD as u32 + 10;
        encode_header(&mut wire, FrameKind::Data as u8, 0, 3, big);
        wire.extend(std::iter::repeat_n(0xAA, big as usize));
        Frame::Eof {
            stream: 4,
            channel: Channel::Input,
        }
        .encode_into(&mut wire);
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(4096) {
            d.feed(chunk);
            got.extend(decode_all(&mut d));
        }
        assert_eq!(
            got,
            vec![
                Decoded::Oversized {
                    stream: 3,
                    len: big
                },
                Decoded::Frame(Frame::Eof {
                    stream: 4,
                    channel: Channel::Input
                })
            ]
        );
    }

    #[test]
    fn garbage_before_a_frame_is_skipped() {
        let mut wire = b"garbageN".to_vec();
        Frame::Eof {
            stream: 1,
            channel: Channel::Output,
        }
        .encode_into(&mut wire);
        let mut d = FrameDecoder::new();
        d.feed(&wire);
        let got = decode_all(&mut d);
        assert!(matches!(got[0], Decoded::Resynced { .. }));
        assert_eq!(
            got.last(),
            Some(&Decoded::Frame(Frame::Eof {
                stream: 1,
                channel: Channel::Output
            }))
        );
    }

    #[test]
    fn unknown_kind_is_reported_not_fatal() {
        let mut wire = Vec::new();
        encode_header(&mut wire, 99, 0, 5, 1);
        wire.push(0);
        let mut d = FrameDecoder::new();
        d.feed(&wire);
        assert!(matches!(
            d.decode_next(),
            Some(Decoded::Malformed { stream: 5, .. })
        ));
        assert_eq!(d.decode_next(), None);
    }
}
