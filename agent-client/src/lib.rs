//! Host side of the guest-agent protocol.
//!
//! [`AgentClient`] owns one connection to a VM's agent port (a unix socket that QEMU
//! serves for the virtio-serial port) and multiplexes any number of concurrent
//! operations over it. Each operation is a stream; its frames are routed to the
//! [`Stream`] that opened it. The connection stays open for the VM's whole life: a guest
//! reading an unconnected port spins on EOF.

mod process;
mod tunnel;

pub use process::{Output, Process, ProcessEvent, StdinWriter};
pub use tunnel::{PtyOptions, Watch};

use agent_protocol::{
    AgentError, Channel, Decoded, ExecRequest, FileInfo, Frame, FrameDecoder, ProcessInfo, Reply,
    Request, DATA_CHUNK, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Errors of agent operations.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent ran the operation and it failed.
    #[error("{0}")]
    Agent(#[from] AgentError),
    /// The connection to the agent is gone (the VM stopped or was killed).
    #[error("the guest agent connection is closed")]
    Disconnected,
    /// The agent did not answer in time.
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    /// A request that cannot be sent as one frame.
    #[error("request of {size} bytes exceeds the {limit} byte frame limit; send large data as a file upload instead")]
    RequestTooLarge { size: usize, limit: usize },
    /// The agent answered something this client does not expect.
    #[error("unexpected reply from the guest agent: {0}")]
    Protocol(String),
    /// Reading a local source for an upload failed.
    #[error("reading the upload source: {0}")]
    Io(#[from] std::io::Error),
}

/// What a stream receives.
#[derive(Debug)]
pub enum StreamEvent {
    /// A control reply.
    Reply(Reply),
    /// Bytes on a channel.
    Data(Channel, Vec<u8>),
    /// A channel ended.
    Eof(Channel),
}

/// Where a stream's events go, and how many data bytes wait there unread.
struct Route {
    tx: mpsc::UnboundedSender<StreamEvent>,
    buffered: Arc<AtomicUsize>,
}

impl Route {
    fn new() -> (Self, mpsc::UnboundedReceiver<StreamEvent>, Arc<AtomicUsize>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let buffered = Arc::new(AtomicUsize::new(0));
        (
            Self {
                tx,
                buffered: buffered.clone(),
            },
            rx,
            buffered,
        )
    }
}

/// Unread output a stream may hold on the host before it is cut off: a consumer that
/// stops reading must not make the host buffer a guest's output without bound. (A safety
/// net: per-stream flow control, where the agent waits for the host's credit, would slow
/// the guest down instead.)
pub const MAX_UNREAD_BYTES: usize = 64 * 1024 * 1024;

type Routes = Arc<Mutex<Option<HashMap<u32, Route>>>>;

/// A connection to one guest agent. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// Encoded frames for the writer task; bounded so uploads wait for the socket.
    writer: mpsc::Sender<Vec<u8>>,
    /// Open streams; `None` once the connection is gone.
    routes: Routes,
    next_stream: AtomicU32,
    version: u32,
    agent_version: String,
    /// This host session's handshake nonce.
    nonce: u64,
}

impl AgentClient {
    /// Connects over `socket` and performs the version handshake, re-sending the hello
    /// until the agent answers or `timeout` passes (the agent may still be booting).
    pub async fn handshake(socket: UnixStream, timeout: Duration) -> Result<Self, ClientError> {
        let (read_half, mut write_half) = socket.into_split();
        let (writer, mut frames) = mpsc::channel::<Vec<u8>>(64);
        let routes: Routes = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(async move {
            while let Some(buf) = frames.recv().await {
                if write_half.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(read_loop(read_half, routes.clone(), writer.clone()));
        let nonce = now_ns();
        let (version, agent_version) = hello_exchange(&writer, &routes, nonce, timeout).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer,
                routes,
                // Stream IDs start somewhere new on every connection, so frames of an
                // earlier host session still in flight never match a stream of this one.
                next_stream: AtomicU32::new((nonce as u32 >> 1) | 1),
                version,
                agent_version,
                nonce,
            }),
        })
    }

    /// Repeats the handshake on the same session: the agent sets the guest clock from the
    /// host's (it stood still while the VM was paused). Call after every resume.
    pub async fn resync(&self, timeout: Duration) -> Result<(), ClientError> {
        hello_exchange(
            &self.inner.writer,
            &self.inner.routes,
            self.inner.nonce,
            timeout,
        )
        .await
        .map(drop)
    }

    /// Protocol version agreed in the handshake.
    pub fn protocol_version(&self) -> u32 {
        self.inner.version
    }

    /// The agent's own version string.
    pub fn agent_version(&self) -> &str {
        &self.inner.agent_version
    }

    /// A fresh stream ID; 0 is the handshake's.
    fn next_stream_id(&self) -> u32 {
        loop {
            let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    /// Opens a stream with `request`.
    pub async fn open(&self, request: &Request) -> Result<Stream, ClientError> {
        let id = self.next_stream_id();
        let frame = control_frame(id, request)?;
        let (route, rx, buffered) = Route::new();
        match self.inner.routes.lock().unwrap().as_mut() {
            Some(routes) => routes.insert(id, route),
            None => return Err(ClientError::Disconnected),
        };
        let stream = Stream {
            id,
            rx,
            buffered,
            client: self.clone(),
            finished: false,
        };
        send_frame(&self.inner.writer, frame).await?;
        Ok(stream)
    }

    /// Sends one request and returns its single final reply, turning an error reply
    /// into `Err`.
    pub async fn call(&self, request: &Request) -> Result<Reply, ClientError> {
        let mut stream = self.open(request).await?;
        loop {
            match stream.next().await? {
                StreamEvent::Reply(Reply::Error(e)) => return Err(e.into()),
                StreamEvent::Reply(r) if r.is_final() => return Ok(r),
                _ => {}
            }
        }
    }

    /// Starts a process.
    pub async fn exec(&self, request: ExecRequest) -> Result<Process, ClientError> {
        Process::start(self.open(&Request::Exec(request)).await?).await
    }

    /// Runs a process to completion and collects its output.
    pub async fn run(&self, request: ExecRequest) -> Result<Output, ClientError> {
        self.exec(request).await?.wait().await
    }

    /// Attaches to a process started earlier (background or detached), receiving the
    /// output it produced meanwhile and then live output.
    pub async fn attach(&self, pid: u32) -> Result<Process, ClientError> {
        Process::start(self.open(&Request::Attach { pid }).await?).await
    }

    /// Processes the agent started that are running or not yet collected.
    pub async fn processes(&self) -> Result<Vec<ProcessInfo>, ClientError> {
        match self.call(&Request::ListProcesses).await? {
            Reply::Processes { processes } => Ok(processes),
            other => Err(unexpected(other)),
        }
    }

    /// Sends `signal` to a process's group.
    pub async fn signal(&self, pid: u32, signal: i32) -> Result<(), ClientError> {
        self.call(&Request::Signal { pid, signal }).await.map(drop)
    }

    /// Reads a whole file into memory.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        let mut download = self.download(path).await?;
        while let Some(chunk) = download.chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Starts a streamed file download.
    pub async fn download(&self, path: &str) -> Result<Download, ClientError> {
        let stream = self
            .open(&Request::ReadFile {
                path: path.to_string(),
            })
            .await?;
        Ok(Download {
            stream,
            done: false,
        })
    }

    /// Writes a file from `source`, streamed in chunks; returns the bytes written. The
    /// target is replaced only once every byte arrived.
    pub async fn write_file(
        &self,
        path: &str,
        mut source: impl AsyncRead + Unpin,
        mode: Option<u32>,
        user: Option<&str>,
    ) -> Result<u64, ClientError> {
        let mut upload = self.upload(path, mode, user).await?;
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            let n = source.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            upload.send(&buf[..n]).await?;
        }
        upload.finish().await
    }

    /// Starts a streamed upload: [`Upload::send`] the bytes, then [`Upload::finish`].
    /// Dropping it unfinished cancels it and leaves the target untouched.
    pub async fn upload(
        &self,
        path: &str,
        mode: Option<u32>,
        user: Option<&str>,
    ) -> Result<Upload, ClientError> {
        let stream = self
            .open(&Request::WriteFile {
                path: path.to_string(),
                mode,
                user: user.map(str::to_string),
            })
            .await?;
        Ok(Upload { stream })
    }

    /// Lists a directory.
    pub async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>, ClientError> {
        match self
            .call(&Request::ListDir {
                path: path.to_string(),
            })
            .await?
        {
            Reply::Entries { entries } => Ok(entries),
            other => Err(unexpected(other)),
        }
    }

    /// Describes a path.
    pub async fn stat(&self, path: &str) -> Result<FileInfo, ClientError> {
        match self
            .call(&Request::Stat {
                path: path.to_string(),
            })
            .await?
        {
            Reply::Stat { info } => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// Has the guest kernel mix `entropy` into its pool and reseed its CRNG (see
    /// [`Request::Reseed`]).
    pub async fn reseed(&self, entropy: &[u8]) -> Result<(), ClientError> {
        let hex: String = entropy.iter().map(|b| format!("{b:02x}")).collect();
        self.call(&Request::Reseed { entropy: hex }).await.map(drop)
    }

    /// Creates a directory and its parents.
    pub async fn mkdir(&self, path: &str, user: Option<&str>) -> Result<(), ClientError> {
        self.call(&Request::Mkdir {
            path: path.to_string(),
            user: user.map(str::to_string),
        })
        .await
        .map(drop)
    }

    /// Removes a file or a directory tree.
    pub async fn remove(&self, path: &str) -> Result<(), ClientError> {
        self.call(&Request::Remove {
            path: path.to_string(),
        })
        .await
        .map(drop)
    }

    /// Renames a path.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), ClientError> {
        self.call(&Request::Rename {
            from: from.to_string(),
            to: to.to_string(),
        })
        .await
        .map(drop)
    }

    /// Grows the guest's root filesystem to fill its disk; returns the new size in
    /// bytes, or `None` if it already filled it.
    pub async fn resize_rootfs(&self) -> Result<Option<u64>, ClientError> {
        match self.call(&Request::ResizeRootfs).await? {
            Reply::Done { bytes } => Ok(bytes),
            other => Err(unexpected(other)),
        }
    }

    pub(crate) async fn send_frame(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        send_frame(&self.inner.writer, bytes).await
    }

    /// Writes raw bytes to the connection. Only for tests that must produce frames a
    /// well-behaved client never sends (oversized, malformed).
    #[doc(hidden)]
    pub async fn send_raw_for_test(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        send_frame(&self.inner.writer, bytes).await
    }

    /// Registers a route for a stream ID chosen by the caller (tests of raw frames).
    #[doc(hidden)]
    pub fn stream_for_test(&self) -> Stream {
        let id = self.next_stream_id();
        let (route, rx, buffered) = Route::new();
        if let Some(routes) = self.inner.routes.lock().unwrap().as_mut() {
            routes.insert(id, route);
        }
        Stream {
            id,
            rx,
            buffered,
            client: self.clone(),
            finished: false,
        }
    }
}

/// Sends hellos on stream 0 until the agent answers this nonce or `timeout` passes; the
/// agent may still be booting, and a port can drop bytes written before it was opened.
async fn hello_exchange(
    writer: &mpsc::Sender<Vec<u8>>,
    routes: &Routes,
    nonce: u64,
    timeout: Duration,
) -> Result<(u32, String), ClientError> {
    let (route, mut hello_rx, _) = Route::new();
    match routes.lock().unwrap().as_mut() {
        Some(r) => r.insert(0, route),
        None => return Err(ClientError::Disconnected),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let result = loop {
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            nonce,
            host_time_ns: Some(now_ns()),
        };
        send_frame(writer, control_frame(0, &hello)?).await?;
        let resend = tokio::time::Instant::now() + Duration::from_millis(500);
        match tokio::time::timeout_at(resend.min(deadline), hello_rx.recv()).await {
            Ok(Some(StreamEvent::Reply(Reply::Hello {
                version,
                agent_version,
                nonce: n,
            }))) if n == nonce => break Ok((version, agent_version)),
            Ok(Some(StreamEvent::Reply(Reply::Error(e)))) => break Err(e.into()),
            Ok(Some(_)) => {}
            Ok(None) => break Err(ClientError::Disconnected),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                break Err(ClientError::Timeout(timeout))
            }
            Err(_) => {}
        }
    };
    // Late answers to re-sent hellos arrive on stream 0 and are dropped.
    if let Some(r) = routes.lock().unwrap().as_mut() {
        r.remove(&0);
    }
    result
}

/// A file being uploaded.
pub struct Upload {
    stream: Stream,
}

impl Upload {
    /// Sends the next bytes of the file.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        // An early error (bad path, unknown user) ends the upload at once.
        if let Some(event) = self.stream.try_next() {
            return Err(self.end(event).err().unwrap_or_else(|| {
                ClientError::Protocol("the upload ended before its data did".into())
            }));
        }
        self.stream.send_data(bytes.to_vec()).await
    }

    /// Ends the file; returns the bytes written once the agent has replaced the target.
    pub async fn finish(mut self) -> Result<u64, ClientError> {
        if let Some(event) = self.stream.try_next() {
            return self.end(event);
        }
        self.stream.send_eof().await?;
        let event = self.stream.next().await?;
        self.end(event)
    }

    fn end(&mut self, event: StreamEvent) -> Result<u64, ClientError> {
        self.stream.finished = true;
        match event {
            StreamEvent::Reply(Reply::Done { bytes }) => Ok(bytes.unwrap_or(0)),
            StreamEvent::Reply(Reply::Error(e)) => Err(e.into()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}

fn unexpected(reply: Reply) -> ClientError {
    ClientError::Protocol(format!("{reply:?}"))
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

fn control_frame(stream: u32, request: &Request) -> Result<Vec<u8>, ClientError> {
    let json = serde_json::to_vec(request).expect("requests always serialize");
    if json.len() > MAX_FRAME_PAYLOAD {
        return Err(ClientError::RequestTooLarge {
            size: json.len(),
            limit: MAX_FRAME_PAYLOAD,
        });
    }
    Ok(Frame::Control { stream, json }.encode())
}

async fn send_frame(writer: &mpsc::Sender<Vec<u8>>, bytes: Vec<u8>) -> Result<(), ClientError> {
    writer
        .send(bytes)
        .await
        .map_err(|_| ClientError::Disconnected)
}

/// Routes incoming frames to streams until the socket closes, then closes every stream.
async fn read_loop(
    mut socket: tokio::net::unix::OwnedReadHalf,
    routes: Routes,
    writer: mpsc::Sender<Vec<u8>>,
) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match socket.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        decoder.feed(&buf[..n]);
        while let Some(item) = decoder.decode_next() {
            let (stream, event, last) = match item {
                Decoded::Frame(Frame::Control { stream, json }) => {
                    match serde_json::from_slice::<Reply>(&json) {
                        Ok(reply) => {
                            let last = reply.is_final();
                            (stream, StreamEvent::Reply(reply), last)
                        }
                        Err(e) => {
                            tracing::warn!(stream, error = %e, "unreadable reply from the agent");
                            continue;
                        }
                    }
                }
                Decoded::Frame(Frame::Data {
                    stream,
                    channel,
                    bytes,
                }) => (stream, StreamEvent::Data(channel, bytes), false),
                Decoded::Frame(Frame::Eof { stream, channel }) => {
                    (stream, StreamEvent::Eof(channel), false)
                }
                other => {
                    tracing::warn!(?other, "bad frame from the agent");
                    continue;
                }
            };
            let mut guard = routes.lock().unwrap();
            let Some(table) = guard.as_mut() else { return };
            let Some(route) = table.get(&stream) else {
                continue;
            };
            if let StreamEvent::Data(_, bytes) = &event {
                let unread = route.buffered.fetch_add(bytes.len(), Ordering::Relaxed) + bytes.len();
                if unread > MAX_UNREAD_BYTES {
                    // Cut the stream off: end it in the agent, tell the consumer why.
                    let _ = route.tx.send(StreamEvent::Reply(Reply::Error(AgentError::new(
                        agent_protocol::ErrorCode::Busy,
                        format!(
                            "more than {MAX_UNREAD_BYTES} bytes of output went unread; read the stream as it arrives, or run the command in the background and attach later"
                        ),
                    ))));
                    table.remove(&stream);
                    if let Ok(frame) = control_frame(stream, &Request::Cancel) {
                        let _ = writer.try_send(frame);
                    }
                    continue;
                }
            }
            let _ = route.tx.send(event);
            if last && stream != 0 {
                table.remove(&stream);
            }
        }
    }
    // Dropping every sender wakes every waiting stream with `Disconnected`.
    *routes.lock().unwrap() = None;
}

/// One operation in flight. Dropping an unfinished stream cancels it in the agent.
pub struct Stream {
    id: u32,
    rx: mpsc::UnboundedReceiver<StreamEvent>,
    /// Data bytes received but not yet taken by [`Stream::next`].
    buffered: Arc<AtomicUsize>,
    client: AgentClient,
    finished: bool,
}

impl Stream {
    /// The stream's ID on the connection.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next event; `Disconnected` if the connection closed first.
    pub async fn next(&mut self) -> Result<StreamEvent, ClientError> {
        let event = self.rx.recv().await.ok_or(ClientError::Disconnected)?;
        self.took(&event);
        Ok(event)
    }

    fn took(&mut self, event: &StreamEvent) {
        match event {
            StreamEvent::Reply(r) => self.finished |= r.is_final(),
            StreamEvent::Data(_, bytes) => {
                self.buffered.fetch_sub(bytes.len(), Ordering::Relaxed);
            }
            StreamEvent::Eof(_) => {}
        }
    }

    /// An event that has already arrived, without waiting.
    pub fn try_next(&mut self) -> Option<StreamEvent> {
        let event = self.rx.try_recv().ok()?;
        self.took(&event);
        Some(event)
    }

    /// Sends bytes on the input channel, in frames of at most [`DATA_CHUNK`] bytes.
    pub async fn send_data(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        for chunk in bytes.chunks(DATA_CHUNK) {
            let frame = Frame::Data {
                stream: self.id,
                channel: Channel::Input,
                bytes: chunk.to_vec(),
            };
            send_frame(&self.client.inner.writer, frame.encode()).await?;
        }
        Ok(())
    }

    /// Ends the input channel.
    pub async fn send_eof(&self) -> Result<(), ClientError> {
        let frame = Frame::Eof {
            stream: self.id,
            channel: Channel::Input,
        };
        send_frame(&self.client.inner.writer, frame.encode()).await
    }

    /// Sends a control message on this stream (detach, cancel).
    pub async fn send_control(&self, request: &Request) -> Result<(), ClientError> {
        send_frame(&self.client.inner.writer, control_frame(self.id, request)?).await
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(routes) = self.client.inner.routes.lock().unwrap().as_mut() {
            routes.remove(&self.id);
        }
        if !self.finished {
            if let Ok(frame) = control_frame(self.id, &Request::Cancel) {
                // Best effort: if the writer queue is full the connection is busy with
                // data for other streams; the agent ends the stream with the VM anyway.
                let _ = self.client.inner.writer.try_send(frame);
            }
        }
    }
}

/// A file being downloaded.
pub struct Download {
    stream: Stream,
    done: bool,
}

impl Download {
    /// The next chunk of the file, or `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        while !self.done {
            match self.stream.next().await? {
                StreamEvent::Data(_, bytes) => return Ok(Some(bytes)),
                StreamEvent::Eof(_) => {}
                StreamEvent::Reply(Reply::Done { .. }) => self.done = true,
                StreamEvent::Reply(Reply::Error(e)) => return Err(e.into()),
                StreamEvent::Reply(other) => return Err(unexpected(other)),
            }
        }
        Ok(None)
    }
}
