//! Host side of the guest-agent protocol.
//!
//! [`AgentClient`] owns one connection to a VM's agent port (a unix socket that QEMU
//! serves for the virtio-serial port) and multiplexes any number of concurrent
//! operations over it. Each operation is a stream; its frames are routed to the
//! [`Stream`] that opened it. The connection stays open for the VM's whole life: a guest
//! reading an unconnected port spins on EOF.

mod process;
#[cfg(test)]
mod tests;
mod tunnel;

pub use process::{Output, Process, ProcessEvent, StdinWriter};
pub use tunnel::{PtyOptions, Watch, MAX_WATCH_LINE};

use agent_protocol::{
    AgentError, Channel, Decoded, ErrorCode, ExecRequest, FileInfo, Frame, FrameDecoder,
    OutputPiece, ProcessInfo, Reply, Request, DATA_CHUNK, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Notify};

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
    /// The connection already has [`MAX_OPEN_STREAMS`] streams open.
    #[error("the sandbox already has {limit} operations open (commands, file transfers, watches, terminals, tunnels); finish or close some, then retry")]
    TooManyStreams { limit: usize },
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

/// Unread output a stream may hold on the host before it is cut off: a consumer that
/// stops reading must not make the host buffer a guest's output without bound. Every
/// frame counts, not only data: its payload plus a fixed per-event overhead. (A safety
/// net: per-stream flow control, where the agent waits for the host's credit, would slow
/// the guest down instead.)
pub const MAX_UNREAD_BYTES: usize = 64 * 1024 * 1024;

/// Unread output all streams of one connection (one VM) may hold together. Many
/// stalled streams, each under [`MAX_UNREAD_BYTES`], would otherwise add up; past this
/// bound the stream holding the most is cut off (its buffered output dropped, the
/// operation cancelled in the guest), so the host's memory per VM stays bounded.
pub const MAX_UNREAD_BYTES_PER_VM: usize = 256 * 1024 * 1024;

/// Unread output all connections of this process (every VM on the host) may hold
/// together. With 150-300 VMs per host the bound per VM alone would allow tens of GiB;
/// past this one, the connection whose frame would cross it cuts off its own stream
/// holding the most: a VM's frames only ever cut its own streams, never another VM's
/// held output. (While the host is full, though, whichever VM receives output next pays;
/// filling it takes at least four VMs at their bound per VM.)
pub const MAX_UNREAD_BYTES_TOTAL: usize = 1024 * 1024 * 1024;

/// Streams one connection may have open at once. Every command, file transfer, watch,
/// terminal and tunnel is a stream until its handle drops; opening more fails with
/// [`ClientError::TooManyStreams`].
pub const MAX_OPEN_STREAMS: usize = 1024;

/// Largest control reply accepted from the agent; a larger one ends its stream with an
/// error rather than being buffered (the frame decoder skips it unread).
pub const MAX_REPLY_BYTES: usize = MAX_FRAME_PAYLOAD;

/// What one buffered event costs beyond its payload (its queue slot, plus an allocation
/// header), so a flood of empty frames counts against the bounds too.
const EVENT_OVERHEAD: usize = std::mem::size_of::<(StreamEvent, usize)>() + 32;

/// The unread output of every connection that shares it, against one bound. Every
/// change to a connection's `unread` is mirrored here, and a connection returns what it
/// still counts when it drops, so a budget never leaks.
#[derive(Debug)]
struct Budget {
    limit: usize,
    used: AtomicUsize,
}

/// The process-wide budget: [`MAX_UNREAD_BYTES_TOTAL`] over all connections.
static TOTAL: Budget = Budget::new(MAX_UNREAD_BYTES_TOTAL);

impl Budget {
    const fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Takes `bytes` if they fit (atomically: connections route concurrently), or
    /// regardless if `force`.
    fn take(&self, bytes: usize, force: bool) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                let total = used.saturating_add(bytes);
                (force || total <= self.limit).then_some(total)
            })
            .is_ok()
    }
}

/// Output bytes (and per-event overhead) all connections of this process hold unread:
/// at most [`MAX_UNREAD_BYTES_TOTAL`].
pub fn total_unread_bytes() -> usize {
    TOTAL.used.load(Ordering::Relaxed)
}

/// The bounds one connection enforces; tests shrink them and give it its own budget.
#[derive(Debug, Clone, Copy)]
struct Limits {
    per_stream: usize,
    per_vm: usize,
    streams: usize,
    total: &'static Budget,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_stream: MAX_UNREAD_BYTES,
            per_vm: MAX_UNREAD_BYTES_PER_VM,
            streams: MAX_OPEN_STREAMS,
            total: &TOTAL,
        }
    }
}

/// A stream's events waiting for its consumer.
#[derive(Default)]
struct Inbox {
    queue: Mutex<Queue>,
    /// Woken once per push; a stored permit covers a push before the consumer waits.
    ready: Notify,
}

#[derive(Default)]
struct Queue {
    /// Events with the cost each was counted at.
    events: VecDeque<(StreamEvent, usize)>,
    /// Sum of the costs in `events`.
    bytes: usize,
    /// Nothing more will be queued: the final reply arrived, the stream was cut off, or
    /// the connection closed. Frames for it are dropped unbuffered.
    ended: bool,
}

/// State the reader, the writer and the handles of one connection share.
struct Conn {
    /// Open streams (until their handle drops); `None` once the connection is gone.
    routes: Mutex<Option<HashMap<u32, Arc<Inbox>>>>,
    /// The cost of every event queued in any inbox: the bound per VM. Also counted in
    /// `limits.total`; only [`Conn::release`] lowers it.
    unread: AtomicUsize,
    /// Streams to cancel in the agent. Not on the bounded frame queue: a cancel must not
    /// be lost because uploads fill it, or a cut-off stream would keep streaming.
    cancels: Mutex<Vec<u32>>,
    cancel_ready: Notify,
    limits: Limits,
}

impl Conn {
    fn new(limits: Limits) -> Self {
        Self {
            routes: Mutex::new(Some(HashMap::new())),
            unread: AtomicUsize::new(0),
            cancels: Mutex::new(Vec::new()),
            cancel_ready: Notify::new(),
            limits,
        }
    }

    /// Registers a stream; refused past the open-stream bound unless `exempt`.
    fn register(&self, id: u32, exempt: bool) -> Result<Arc<Inbox>, ClientError> {
        let inbox = Arc::new(Inbox::default());
        let mut guard = self.routes.lock().unwrap();
        let table = guard.as_mut().ok_or(ClientError::Disconnected)?;
        if !exempt && table.len() >= self.limits.streams {
            return Err(ClientError::TooManyStreams {
                limit: self.limits.streams,
            });
        }
        table.insert(id, inbox.clone());
        Ok(inbox)
    }

    /// Forgets a stream whose handle went: later frames for it are dropped, what it
    /// still held is released. Returns whether the agent may still be running it.
    fn unregister(&self, id: u32, inbox: &Inbox) -> bool {
        if let Some(table) = self.routes.lock().unwrap().as_mut() {
            // Only this stream's own entry (a re-sent hello re-registers stream 0).
            if table
                .get(&id)
                .is_some_and(|i| std::ptr::eq(Arc::as_ptr(i), inbox))
            {
                table.remove(&id);
            }
        }
        let mut q = inbox.queue.lock().unwrap();
        self.release(std::mem::take(&mut q.bytes));
        q.events.clear();
        !std::mem::replace(&mut q.ended, true)
    }

    /// Returns the cost of events no longer held, to this VM's count and the budget.
    fn release(&self, bytes: usize) {
        self.unread.fetch_sub(bytes, Ordering::Relaxed);
        self.limits.total.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Asks the writer to cancel `stream` in the agent.
    fn cancel(&self, stream: u32) {
        self.cancels.lock().unwrap().push(stream);
        self.cancel_ready.notify_one();
    }

    /// The next event of `inbox`: `None` while there is none yet, `Disconnected` once
    /// none will come.
    fn pop(&self, inbox: &Inbox) -> Option<Result<StreamEvent, ClientError>> {
        let mut q = inbox.queue.lock().unwrap();
        match q.events.pop_front() {
            Some((event, cost)) => {
                q.bytes -= cost;
                self.release(cost);
                Some(Ok(event))
            }
            None if q.ended => Some(Err(ClientError::Disconnected)),
            None => None,
        }
    }

    /// Waits for the next event of `inbox`.
    async fn recv(&self, inbox: &Inbox) -> Result<StreamEvent, ClientError> {
        loop {
            if let Some(event) = self.pop(inbox) {
                return event;
            }
            inbox.ready.notified().await;
        }
    }

    /// Ends a stream with `error`: what it held is dropped (the consumer will not get it
    /// now), the error is its last event, and the agent is asked to stop it.
    fn cut_off(&self, stream: u32, inbox: &Inbox, q: &mut Queue, error: AgentError) {
        self.release(std::mem::take(&mut q.bytes));
        q.events.clear();
        // The error costs nothing: it replaces what was dropped and nothing follows it.
        q.events
            .push_back((StreamEvent::Reply(Reply::Error(error)), 0));
        let running = !std::mem::replace(&mut q.ended, true);
        inbox.ready.notify_one();
        if running && stream != 0 {
            self.cancel(stream);
        }
    }

    /// Routes one decoded item to its stream, within the bounds.
    fn route(&self, item: Decoded, complaints: &mut Complaints) {
        enum Incoming {
            Event(StreamEvent),
            Reply(Vec<u8>),
            Failed(AgentError),
        }
        let (stream, incoming, cost) = match item {
            Decoded::Frame(Frame::Data {
                stream,
                channel,
                bytes,
            }) => {
                let cost = bytes.len() + EVENT_OVERHEAD;
                (
                    stream,
                    Incoming::Event(StreamEvent::Data(channel, bytes)),
                    cost,
                )
            }
            Decoded::Frame(Frame::Eof { stream, channel }) => (
                stream,
                Incoming::Event(StreamEvent::Eof(channel)),
                EVENT_OVERHEAD,
            ),
            Decoded::Frame(Frame::Control { stream, json }) => {
                let cost = json.len() + EVENT_OVERHEAD;
                (stream, Incoming::Reply(json), cost)
            }
            Decoded::Oversized { stream, len } => {
                complaints.note(&format!("a frame of {len} bytes on stream {stream}"));
                let error = AgentError::new(
                    ErrorCode::Io,
                    format!(
                        "the guest agent sent a frame of {len} bytes, over the {MAX_FRAME_PAYLOAD} byte limit; the operation was stopped"
                    ),
                );
                (stream, Incoming::Failed(error), 0)
            }
            other => {
                complaints.note(&other);
                return;
            }
        };
        let guard = self.routes.lock().unwrap();
        let Some(table) = guard.as_ref() else { return };
        // Unknown (never opened, or its handle is gone) or ended: dropped unbuffered.
        let Some(inbox) = table.get(&stream) else {
            return;
        };
        let mut q = inbox.queue.lock().unwrap();
        if q.ended {
            return;
        }
        let event = match incoming {
            Incoming::Event(event) => event,
            Incoming::Failed(error) => return self.cut_off(stream, inbox, &mut q, error),
            Incoming::Reply(json) if json.len() > MAX_REPLY_BYTES => {
                let error = AgentError::new(
                    ErrorCode::Io,
                    format!(
                        "the guest agent sent a reply of {} bytes, over the {MAX_REPLY_BYTES} byte limit; the operation was stopped",
                        json.len()
                    ),
                );
                return self.cut_off(stream, inbox, &mut q, error);
            }
            Incoming::Reply(json) => match serde_json::from_slice::<Reply>(&json) {
                Ok(reply) => StreamEvent::Reply(reply),
                // The handshake re-sends its hello; an answer it cannot read is noise.
                Err(e) if stream == 0 => return complaints.note(&e),
                Err(e) => {
                    complaints.note(&e);
                    let error = AgentError::new(
                        ErrorCode::Io,
                        format!("the guest agent sent an unreadable reply ({e}); the operation was stopped"),
                    );
                    return self.cut_off(stream, inbox, &mut q, error);
                }
            },
        };
        if q.bytes + cost > self.limits.per_stream {
            tracing::info!(stream, "cutting off a stream whose output goes unread");
            let error = AgentError::new(
                ErrorCode::Busy,
                format!(
                    "more than {} bytes of output went unread; read the stream as it arrives, or run the command in the background and attach later",
                    self.limits.per_stream
                ),
            );
            return self.cut_off(stream, inbox, &mut q, error);
        }
        // Over the bound per VM, or the host's over its total: cut off this VM's streams
        // holding the most until this fits (never another VM's). Each holds at least a
        // share of the bound, so this takes few rounds. The total is taken here (this VM's
        // count below); the handshake's tiny replies are never refused for it, so a full
        // host still lets VMs start and resume.
        loop {
            let over_vm = self.unread.load(Ordering::Relaxed) + cost > self.limits.per_vm;
            let (what, error) = if over_vm {
                (
                    "the VM's unread output is over its bound",
                    format!(
                        "the sandbox's streams held more than {} bytes of unread output together and this one held the most; read output as it arrives, or run commands in the background and attach later",
                        self.limits.per_vm
                    ),
                )
            } else if self.limits.total.take(cost, stream == 0) {
                break;
            } else {
                (
                    "the host's unread output is over its bound",
                    format!(
                        "the host held more than {} bytes of unread output of all sandboxes together, and this stream held the most of this sandbox's; read output as it arrives, or run commands in the background and attach later",
                        self.limits.total.limit
                    ),
                )
            };
            let error = AgentError::new(ErrorCode::Busy, error);
            let largest = table
                .iter()
                .filter(|(id, _)| **id != stream)
                .map(|(id, i)| (i.queue.lock().unwrap().bytes, *id, i))
                .max_by_key(|(bytes, ..)| *bytes);
            match largest {
                Some((bytes, id, other)) if bytes > q.bytes => {
                    tracing::info!(stream = id, "cutting off a stream: {what}");
                    let mut other_q = other.queue.lock().unwrap();
                    self.cut_off(id, other, &mut other_q, error);
                }
                _ => {
                    tracing::info!(stream, "cutting off a stream: {what}");
                    return self.cut_off(stream, inbox, &mut q, error);
                }
            }
        }
        if let StreamEvent::Reply(reply) = &event {
            q.ended = reply.is_final();
        }
        q.events.push_back((event, cost));
        q.bytes += cost;
        // (Already taken from the total above.)
        self.unread.fetch_add(cost, Ordering::Relaxed);
        inbox.ready.notify_one();
    }

    /// The connection is gone: every stream ends (`Disconnected` after what it holds).
    fn disconnect(&self) {
        let table = self.routes.lock().unwrap().take();
        for inbox in table.into_iter().flat_map(HashMap::into_values) {
            inbox.queue.lock().unwrap().ended = true;
            inbox.ready.notify_one();
        }
    }
}

impl Drop for Conn {
    /// Returns what inboxes still count (one a cancelled handshake left registered, say)
    /// to the budget, which would otherwise shrink for good.
    fn drop(&mut self) {
        let unread = *self.unread.get_mut();
        self.limits.total.used.fetch_sub(unread, Ordering::Relaxed);
    }
}

/// Counts the agent's protocol violations and logs them sparingly: a hostile guest can
/// send millions, and each must not cost a log line.
#[derive(Default)]
struct Complaints {
    count: u64,
}

impl Complaints {
    fn note(&mut self, what: &dyn std::fmt::Debug) {
        self.count += 1;
        if self.count.is_power_of_two() {
            tracing::warn!(count = self.count, latest = ?what, "bad frames from the agent (logged at powers of two)");
        }
    }
}

/// A connection to one guest agent. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// Encoded frames for the writer task; bounded so uploads wait for the socket.
    writer: mpsc::Sender<Vec<u8>>,
    conn: Arc<Conn>,
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
        Self::handshake_within(socket, timeout, Limits::default()).await
    }

    async fn handshake_within(
        socket: UnixStream,
        timeout: Duration,
        limits: Limits,
    ) -> Result<Self, ClientError> {
        let (read_half, write_half) = socket.into_split();
        let (writer, frames) = mpsc::channel::<Vec<u8>>(64);
        let conn = Arc::new(Conn::new(limits));
        tokio::spawn(write_loop(write_half, frames, conn.clone()));
        tokio::spawn(read_loop(read_half, conn.clone()));
        let nonce = now_ns();
        let (version, agent_version) = hello_exchange(&writer, &conn, nonce, timeout).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer,
                conn,
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
            &self.inner.conn,
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

    /// Output bytes (and per-event overhead) the host holds for this connection's streams,
    /// not yet taken by their consumers: at most [`MAX_UNREAD_BYTES_PER_VM`].
    pub fn unread_bytes(&self) -> usize {
        self.inner.conn.unread.load(Ordering::Relaxed)
    }

    /// Streams open on this connection (at most [`MAX_OPEN_STREAMS`]).
    pub fn open_streams(&self) -> usize {
        self.inner
            .conn
            .routes
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, HashMap::len)
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

    /// Opens a stream with `request`; refused with [`ClientError::TooManyStreams`] while
    /// [`MAX_OPEN_STREAMS`] are open.
    pub async fn open(&self, request: &Request) -> Result<Stream, ClientError> {
        let id = self.next_stream_id();
        let frame = control_frame(id, request)?;
        let inbox = self.inner.conn.register(id, false)?;
        let stream = Stream {
            id,
            inbox,
            client: self.clone(),
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

    /// Runs a process to completion and collects its output. Only for commands whose
    /// output is known to be small; see [`AgentClient::run_tail`].
    pub async fn run(&self, request: ExecRequest) -> Result<Output, ClientError> {
        self.exec(request).await?.wait().await
    }

    /// Runs a process to completion, keeping only the last `keep` bytes of its stdout
    /// and of its stderr: host memory stays bounded whatever the guest prints.
    pub async fn run_tail(&self, request: ExecRequest, keep: usize) -> Result<Output, ClientError> {
        self.exec(request).await?.wait_tail(keep).await
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

    /// The output background process `pid` produced, as the agent keeps it for logs.
    pub async fn process_output(&self, pid: u32) -> Result<Vec<OutputPiece>, ClientError> {
        match self.call(&Request::ProcessOutput { pid }).await? {
            Reply::ProcessOutput { pieces } => Ok(pieces),
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
        // A closed connection leaves the stream unrouted: it reports `Disconnected`.
        let inbox = self.inner.conn.register(id, true).unwrap_or_else(|_| {
            let inbox = Arc::new(Inbox::default());
            inbox.queue.lock().unwrap().ended = true;
            inbox
        });
        Stream {
            id,
            inbox,
            client: self.clone(),
        }
    }
}

/// Sends hellos on stream 0 until the agent answers this nonce or `timeout` passes; the
/// agent may still be booting, and a port can drop bytes written before it was opened.
async fn hello_exchange(
    writer: &mpsc::Sender<Vec<u8>>,
    conn: &Conn,
    nonce: u64,
    timeout: Duration,
) -> Result<(u32, String), ClientError> {
    let inbox = conn.register(0, true)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let result = loop {
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            nonce,
            host_time_ns: Some(now_ns()),
        };
        if let Err(e) = send_frame(writer, control_frame(0, &hello)?).await {
            break Err(e);
        }
        let resend = tokio::time::Instant::now() + Duration::from_millis(500);
        match tokio::time::timeout_at(resend.min(deadline), conn.recv(&inbox)).await {
            Ok(Ok(StreamEvent::Reply(Reply::Hello {
                version,
                agent_version,
                nonce: n,
            }))) if n == nonce => break Ok((version, agent_version)),
            Ok(Ok(StreamEvent::Reply(Reply::Error(e)))) => break Err(e.into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break Err(e),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                break Err(ClientError::Timeout(timeout))
            }
            Err(_) => {}
        }
    };
    // Late answers to re-sent hellos arrive on stream 0 and are dropped.
    conn.unregister(0, &inbox);
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

/// Writes queued frames to the socket, cancels first: a cancel ends output the host
/// has stopped wanting, so it must not wait behind a queue of uploads.
async fn write_loop(
    mut socket: OwnedWriteHalf,
    mut frames: mpsc::Receiver<Vec<u8>>,
    conn: Arc<Conn>,
) {
    loop {
        let buf = tokio::select! {
            biased;
            _ = conn.cancel_ready.notified() => {
                let ids = std::mem::take(&mut *conn.cancels.lock().unwrap());
                let mut buf = Vec::new();
                for id in ids {
                    Frame::Control {
                        stream: id,
                        json: serde_json::to_vec(&Request::Cancel).expect("requests always serialize"),
                    }
                    .encode_into(&mut buf);
                }
                buf
            }
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
        };
        if socket.write_all(&buf).await.is_err() {
            break;
        }
    }
}

/// Routes incoming frames to streams until the socket closes, then ends every stream.
async fn read_loop(mut socket: OwnedReadHalf, conn: Arc<Conn>) {
    let mut decoder = FrameDecoder::new();
    let mut complaints = Complaints::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match socket.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        decoder.feed(&buf[..n]);
        while let Some(item) = decoder.decode_next() {
            conn.route(item, &mut complaints);
        }
    }
    conn.disconnect();
}

/// One operation in flight. Dropping an unfinished stream cancels it in the agent.
pub struct Stream {
    id: u32,
    /// Events received but not yet taken.
    inbox: Arc<Inbox>,
    client: AgentClient,
}

impl Stream {
    /// The stream's ID on the connection.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The next event; `Disconnected` if the connection closed first (or after the
    /// stream's final reply).
    pub async fn next(&mut self) -> Result<StreamEvent, ClientError> {
        self.client.inner.conn.recv(&self.inbox).await
    }

    /// An event that has already arrived, without waiting.
    pub fn try_next(&mut self) -> Option<StreamEvent> {
        self.client.inner.conn.pop(&self.inbox)?.ok()
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
        let conn = &self.client.inner.conn;
        // Still running in the agent (no final reply, no cut-off): cancel it there.
        if conn.unregister(self.id, &self.inbox) {
            conn.cancel(self.id);
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
