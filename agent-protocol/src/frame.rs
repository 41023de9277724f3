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
///
/// Linear in the bytes fed: decoding only advances a read cursor into the buffer, and
/// the consumed prefix is dropped by [`FrameDecoder::feed`] only once it is at least as
/// long as what remains, so each byte is moved at most a constant number of times
/// however small the frames are (a peer sending many tiny frames cannot make the reader
/// quadratic).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the bytes not yet decoded in `buf`.
    pos: usize,
    /// Payload bytes of an oversized frame still to be thrown away.
    skip: u64,
    /// Bytes moved by compactions so far (tests check the decoder stays linear).
    moved: u64,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the transport.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        if self.skip > 0 {
            // Still inside an oversized payload (whose held bytes `decode_next` already
            // dropped): throw it away before buffering anything.
            let n = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            self.skip -= n as u64;
            bytes = &bytes[n..];
        }
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Drops the decoded prefix once it is no shorter than the rest: the copy is paid
    /// for by the bytes already consumed, so the total work stays linear.
    fn compact(&mut self) {
        if self.pos == 0 {
            return;
        }
        let rest = self.buf.len() - self.pos;
        if rest == 0 {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos >= rest {
            self.buf.copy_within(self.pos.., 0);
            self.buf.truncate(rest);
            self.moved += rest as u64;
            self.pos = 0;
        }
    }

    /// Bytes fed but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next decoded item, or `None` when more bytes are needed.
    pub fn decode_next(&mut self) -> Option<Decoded> {
        if self.skip > 0 {
            let n = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(self.pending());
            self.pos += n;
            self.skip -= n as u64;
            if self.skip > 0 {
                return None;
            }
        }
        let rest = &self.buf[self.pos..];
        if rest.len() < 2 {
            return None;
        }
        let magic = MAGIC.to_be_bytes();
        if rest[..2] != magic {
            let found = rest.windows(2).position(|w| w == magic);
            // Keep a trailing first magic byte: its partner may arrive in the next read.
            let skipped = found.unwrap_or(if rest.last() == Some(&magic[0]) {
                rest.len() - 1
            } else {
                rest.len()
            });
            self.pos += skipped;
            return Some(Decoded::Resynced { skipped });
        }
        if rest.len() < HEADER_LEN {
            return None;
        }
        let kind = rest[2];
        let channel = rest[3];
        let stream = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let len = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let available = rest.len();
        if len as usize > MAX_FRAME_PAYLOAD {
            // Drop the header and what we already hold of the payload; `feed` throws
            // the rest away as it arrives.
            let held = (available - HEADER_LEN).min(len as usize);
            self.pos += HEADER_LEN + held;
            self.skip = u64::from(len) - held as u64;
            return Some(Decoded::Oversized { stream, len });
        }
        let total = HEADER_LEN + len as usize;
        if available < total {
            return None;
        }
        let payload = self.pos + HEADER_LEN..self.pos + total;
        self.pos += total;
        let Some(kind) = FrameKind::from_u8(kind) else {
            return Some(Decoded::Malformed {
                stream,
                reason: format!("unknown frame kind {kind}"),
            });
        };
        let frame = match kind {
            FrameKind::Control => Frame::Control {
                stream,
                json: self.buf[payload].to_vec(),
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
                        bytes: self.buf[payload].to_vec(),
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
    fn many_small_frames_decode_in_linear_time() {
        const FRAMES: u32 = 100_000;
        let mut wire = Vec::new();
        for i in 0..FRAMES {
            if i % 2 == 0 {
                Frame::Eof {
                    stream: i,
                    channel: Channel::Output,
                }
                .encode_into(&mut wire);
            } else {
                Frame::Data {
                    stream: i,
                    channel: Channel::Output,
                    bytes: vec![i as u8],
                }
                .encode_into(&mut wire);
            }
        }
        // All in one buffer: decoding only moves the cursor, no byte is ever shifted
        // (a decoder that drained each frame off the front would move ~25 GB here).
        let mut d = FrameDecoder::new();
        d.feed(&wire);
        let mut n = 0u32;
        while let Some(item) = d.decode_next() {
            let Decoded::Frame(f) = item else {
                panic!("{item:?}")
            };
            assert_eq!(f.stream(), n);
            n += 1;
        }
        assert_eq!(n, FRAMES);
        assert_eq!(d.moved, 0);
        assert_eq!(d.pending(), 0);
        // In reads that cut frames anywhere: compaction moves at most what was fed.
        for read in [7, 1000, 4096, 65_536] {
            let mut d = FrameDecoder::new();
            let mut n = 0u32;
            for chunk in wire.chunks(read) {
                d.feed(chunk);
                n += decode_all(&mut d).len() as u32;
            }
            assert_eq!(n, FRAMES, "reads of {read}");
            assert!(
                d.moved <= wire.len() as u64,
                "reads of {read}: {} bytes moved for {} fed",
                d.moved,
                wire.len()
            );
        }
    }

    #[test]
    fn an_oversized_payload_is_never_buffered() {
        let mut wire = Vec::new();
        let big = 8 * MAX_FRAME_PAYLOAD as u32;
        encode_header(&mut wire, FrameKind::Control as u8, 0, 3, big);
        wire.extend(std::iter::repeat_n(0x4E, big as usize));
        Frame::Eof {
            stream: 4,
            channel: Channel::Input,
        }
        .encode_into(&mut wire);
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(100_000) {
            d.feed(chunk);
            assert!(d.buf.len() <= 2 * 100_000, "{} bytes held", d.buf.len());
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
    fn garbage_between_frames_in_one_buffer_resyncs() {
        let mut wire = Vec::new();
        for i in 0..3 {
            wire.extend_from_slice(b"\x00junk\x4E");
            Frame::Eof {
                stream: i,
                channel: Channel::Output,
            }
            .encode_into(&mut wire);
        }
        let mut d = FrameDecoder::new();
        d.feed(&wire);
        let frames: Vec<_> = decode_all(&mut d)
            .into_iter()
            .filter_map(|item| match item {
                Decoded::Frame(f) => Some(f.stream()),
                Decoded::Resynced { .. } => None,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(frames, vec![0, 1, 2]);
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
