//! Port tunnels, terminals, directory watches and metrics: the streams beyond processes
//! and files.

use crate::process::Process;
use crate::{unexpected, AgentClient, ClientError, Stream, StreamEvent};
use agent_protocol::{FsEvent, GuestMetrics, Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Bytes buffered in each direction of a tunnel on the host.
const TUNNEL_BUFFER: usize = 256 * 1024;

/// A terminal to open: see [`AgentClient::pty`].
pub use agent_protocol::PtyRequest as PtyOptions;

/// Longest line a watch accepts from the guest: a real event is a few hundred bytes
/// (paths are at most 4 KiB); a longer line is dropped, not buffered without end.
pub const MAX_WATCH_LINE: usize = 64 * 1024;

/// A directory watch: [`Watch::next`] yields its events.
pub struct Watch {
    stream: Stream,
    lines: LineSplitter,
}

impl Watch {
    /// The next change; `None` once the watch ended. Lines over [`MAX_WATCH_LINE`] are
    /// skipped (counted in [`Watch::dropped_lines`]); an unreadable line ends the watch
    /// with an error.
    pub async fn next(&mut self) -> Result<Option<FsEvent>, ClientError> {
        loop {
            if let Some(line) = self.lines.next_line() {
                return serde_json::from_slice(line)
                    .map(Some)
                    .map_err(|e| ClientError::Protocol(format!("a watch event: {e}")));
            }
            match self.stream.next().await? {
                StreamEvent::Data(_, bytes) => {
                    let dropped = self.lines.dropped;
                    self.lines.feed(&bytes);
                    if self.lines.dropped > dropped && self.lines.dropped.is_power_of_two() {
                        tracing::warn!(
                            dropped = self.lines.dropped,
                            "the guest sent watch lines over {MAX_WATCH_LINE} bytes; skipped (logged at powers of two)"
                        );
                    }
                }
                StreamEvent::Eof(_) => {}
                StreamEvent::Reply(Reply::Error(e)) => return Err(e.into()),
                StreamEvent::Reply(_) => return Ok(None),
            }
        }
    }

    /// Lines skipped so far for being over [`MAX_WATCH_LINE`].
    pub fn dropped_lines(&self) -> u64 {
        self.lines.dropped
    }
}

/// Splits bytes into lines of at most `max` bytes, in linear time: a read cursor
/// instead of draining each line off the front, and a scan that never revisits bytes.
struct LineSplitter {
    buf: Vec<u8>,
    /// Start of the first line not yet returned.
    start: usize,
    /// Where the search for the next newline resumes.
    scanned: usize,
    /// Inside an over-long line: its bytes are thrown away up to its newline.
    skipping: bool,
    max: usize,
    dropped: u64,
}

impl LineSplitter {
    fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            skipping: false,
            max,
            dropped: 0,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        if self.skipping {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(n) => {
                    self.skipping = false;
                    bytes = &bytes[n + 1..];
                }
                None => return,
            }
        }
        // What was returned is no longer needed; what is left is one partial line.
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line (without its newline), if one is buffered.
    fn next_line(&mut self) -> Option<&[u8]> {
        loop {
            match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                Some(n) => {
                    let (start, end) = (self.start, self.scanned + n);
                    self.start = end + 1;
                    self.scanned = end + 1;
                    if end - start > self.max {
                        self.dropped += 1;
                        continue;
                    }
                    return Some(&self.buf[start..end]);
                }
                None => {
                    self.scanned = self.buf.len();
                    if self.buf.len() - self.start > self.max {
                        // A line already too long: stop holding it.
                        self.dropped += 1;
                        self.skipping = true;
                        self.buf.clear();
                        (self.start, self.scanned) = (0, 0);
                    }
                    return None;
                }
            }
        }
    }
}

impl Process {
    /// Resizes the terminal of a process started with [`AgentClient::pty`].
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<(), ClientError> {
        self.stream
            .send_control(&Request::Resize { cols, rows })
            .await
    }
}

impl AgentClient {
    /// A TCP connection to `port` on the guest's loopback, as a local byte stream: what
    /// is written to it reaches the port, what the port sends can be read. Dropping it
    /// (or shutting down its write side) closes the connection.
    pub async fn connect_port(&self, port: u16) -> Result<DuplexStream, ClientError> {
        let mut stream = self.open(&Request::ConnectPort { port }).await?;
        match stream.next().await? {
            StreamEvent::Reply(Reply::Connected) => {}
            StreamEvent::Reply(Reply::Error(e)) => return Err(e.into()),
            StreamEvent::Reply(other) => return Err(unexpected(other)),
            other => return Err(ClientError::Protocol(format!("{other:?}"))),
        }
        let (ours, theirs) = tokio::io::duplex(TUNNEL_BUFFER);
        tokio::spawn(bridge(stream, ours));
        Ok(theirs)
    }

    /// Starts a process on a new terminal in the guest. Its output (the terminal's)
    /// comes as stdout events; write input with [`Process::write_stdin`], resize with
    /// [`Process::resize`].
    pub async fn pty(&self, options: PtyOptions) -> Result<Process, ClientError> {
        Process::start(self.open(&Request::Pty(options)).await?).await
    }

    /// Attaches to the terminal of process `pid`, opened by [`AgentClient::pty`] on a
    /// stream that ended with its host (a live migration, a restarted host): what it
    /// wrote meanwhile comes first; resized to `size` (cols, rows) if given.
    pub async fn pty_attach(
        &self,
        pid: u32,
        size: Option<(u16, u16)>,
    ) -> Result<Process, ClientError> {
        let request = Request::PtyAttach {
            pid,
            cols: size.map(|s| s.0),
            rows: size.map(|s| s.1),
        };
        Process::start(self.open(&request).await?).await
    }

    /// Watches a directory (and, if `recursive`, everything under it).
    pub async fn watch_dir(&self, path: &str, recursive: bool) -> Result<Watch, ClientError> {
        let mut stream = self
            .open(&Request::WatchDir {
                path: path.to_string(),
                recursive,
            })
            .await?;
        match stream.next().await? {
            StreamEvent::Reply(Reply::Watching) => Ok(Watch {
                stream,
                lines: LineSplitter::new(MAX_WATCH_LINE),
            }),
            StreamEvent::Reply(Reply::Error(e)) => Err(e.into()),
            StreamEvent::Reply(other) => Err(unexpected(other)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The guest's resource counters now.
    pub async fn metrics(&self) -> Result<GuestMetrics, ClientError> {
        match self.call(&Request::Metrics).await? {
            Reply::Metrics(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }
}

/// Moves bytes between a tunnel's stream and the local end until both sides close.
async fn bridge(mut stream: Stream, local: DuplexStream) {
    let (mut from_local, mut to_local) = tokio::io::split(local);
    let mut buf = vec![0u8; agent_protocol::DATA_CHUNK];
    let (mut sending, mut receiving) = (true, true);
    while sending || receiving {
        tokio::select! {
            n = from_local.read(&mut buf), if sending => match n {
                Ok(n) if n > 0 => {
                    if stream.send_data(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
                _ => {
                    let _ = stream.send_eof().await;
                    sending = false;
                }
            },
            event = stream.next(), if receiving => match event {
                Ok(StreamEvent::Data(_, bytes)) => {
                    if to_local.write_all(&bytes).await.is_err() {
                        // The local side is gone: so is the connection.
                        return;
                    }
                }
                Ok(StreamEvent::Eof(_)) => {
                    let _ = to_local.shutdown().await;
                    receiving = false;
                }
                // A final reply or a lost connection: nothing more will come.
                Ok(StreamEvent::Reply(_)) | Err(_) => return,
            },
        }
    }
    // Both directions closed: wait for the agent's final reply, so the stream ends
    // cleanly rather than being cancelled on drop.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next()).await;
}

#[cfg(test)]
mod tests {
    use super::LineSplitter;

    fn lines(s: &mut LineSplitter) -> Vec<String> {
        std::iter::from_fn(|| {
            s.next_line()
                .map(|l| String::from_utf8_lossy(l).into_owned())
        })
        .collect()
    }

    #[test]
    fn lines_are_split_across_chunks() {
        let mut s = LineSplitter::new(16);
        s.feed(b"one\ntw");
        assert_eq!(lines(&mut s), ["one"]);
        s.feed(b"o\nthree\n");
        assert_eq!(lines(&mut s), ["two", "three"]);
        assert_eq!(s.dropped, 0);
    }

    #[test]
    fn an_over_long_line_is_dropped_without_being_held() {
        let mut s = LineSplitter::new(16);
        s.feed(b"ok\n");
        assert_eq!(lines(&mut s), ["ok"]);
        // A line that never ends: memory stays bounded by the chunk size.
        for _ in 0..10_000 {
            s.feed(&[b'x'; 100]);
            assert!(lines(&mut s).is_empty());
            assert!(s.buf.len() <= 16 + 100, "{} bytes held", s.buf.len());
        }
        assert_eq!(s.dropped, 1);
        // Its end, then the next line is whole again.
        s.feed(b"xxxx\nafter\n");
        assert_eq!(lines(&mut s), ["after"]);
        // One over-long line inside a chunk is dropped; its neighbours are kept.
        s.feed(&[b"a\n".as_slice(), &[b'y'; 40], b"\nb\n"].concat());
        assert_eq!(lines(&mut s), ["a", "b"]);
        assert_eq!(s.dropped, 2);
    }
}
