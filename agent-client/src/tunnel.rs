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

/// A directory watch: [`Watch::next`] yields its events.
pub struct Watch {
    stream: Stream,
    pending: Vec<u8>,
}

impl Watch {
    /// The next change; `None` once the watch ended.
    pub async fn next(&mut self) -> Result<Option<FsEvent>, ClientError> {
        loop {
            if let Some(n) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=n).collect();
                return serde_json::from_slice(&line[..n])
                    .map(Some)
                    .map_err(|e| ClientError::Protocol(format!("a watch event: {e}")));
            }
            match self.stream.next().await? {
                StreamEvent::Data(_, bytes) => self.pending.extend(bytes),
                StreamEvent::Eof(_) => {}
                StreamEvent::Reply(Reply::Error(e)) => return Err(e.into()),
                StreamEvent::Reply(_) => return Ok(None),
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
                pending: Vec::new(),
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
