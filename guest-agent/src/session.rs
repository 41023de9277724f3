//! Routing frames to streams.
//!
//! The reader thread owns the stream table: a frame that opens a stream spawns its
//! handler task; later frames of that stream go to the handler's inbox. Handlers reply
//! through [`Outbox`], which the writer thread drains onto the port.

use crate::{files, process};
use agent_protocol::{
    AgentError, Channel, Decoded, ErrorCode, Frame, Reply, Request, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

/// What a stream's handler receives after the opening request.
#[derive(Debug)]
pub enum Inbound {
    /// Bytes on the input channel (stdin or a file body).
    Data(Vec<u8>),
    /// The input channel ended.
    Eof,
    /// The host asked to detach from a process.
    Detach,
    /// The host resized the stream's terminal.
    Resize { cols: u16, rows: u16 },
    /// The stream must end with this error: the host cancelled it, or sent a frame
    /// for it that could not be read.
    Abort(AgentError),
    /// The host that opened the stream is gone (a new host session started, e.g. after
    /// a restore). Processes are detached, not killed: the user's work goes on.
    SessionEnded,
}

/// Sends frames for one stream to the writer thread.
#[derive(Clone)]
pub struct Outbox {
    stream: u32,
    tx: mpsc::Sender<Frame>,
}

impl Outbox {
    /// Outbox of another stream on the same port.
    pub fn for_stream(&self, stream: u32) -> Outbox {
        Outbox {
            stream,
            tx: self.tx.clone(),
        }
    }

    /// The stream this outbox writes to.
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// Sends a control reply. Errors mean the port is gone; there is no one to tell.
    pub async fn reply(&self, reply: &Reply) {
        let json = serde_json::to_vec(reply).expect("replies always serialize");
        let _ = self
            .tx
            .send(Frame::Control {
                stream: self.stream,
                json,
            })
            .await;
    }

    /// Sends an error as the final reply.
    pub async fn error(&self, err: AgentError) {
        self.reply(&Reply::Error(err)).await;
    }

    /// Sends bytes on an output channel.
    pub async fn data(&self, channel: Channel, bytes: Vec<u8>) {
        let _ = self
            .tx
            .send(Frame::Data {
                stream: self.stream,
                channel,
                bytes,
            })
            .await;
    }

    /// Ends an output channel.
    pub async fn eof(&self, channel: Channel) {
        let _ = self
            .tx
            .send(Frame::Eof {
                stream: self.stream,
                channel,
            })
            .await;
    }
}

type StreamTable = Arc<Mutex<HashMap<u32, mpsc::Sender<Inbound>>>>;

/// Serves the port until it fails.
pub fn serve(port_path: &Path, rt: Handle) -> std::io::Result<()> {
    let reader = crate::port::open(port_path)?;
    let writer = reader.try_clone()?;
    let (tx, rx) = mpsc::channel::<Frame>(256);
    std::thread::spawn(move || crate::port::write_loop(writer, rx));

    let mut session = Session {
        rt,
        root: Outbox { stream: 0, tx },
        streams: Arc::default(),
        processes: process::ProcessTable::default(),
        host_nonce: None,
    };
    let err = crate::port::read_loop(reader, |item| session.dispatch(item));
    Err(err)
}

/// The state the reader thread keeps for the host connected to the port.
struct Session {
    rt: Handle,
    root: Outbox,
    streams: StreamTable,
    processes: process::ProcessTable,
    /// The nonce of the host session's handshake. A hello with another nonce is a new
    /// host (a restored VM talks to a new QEMU and client): the old streams are gone.
    host_nonce: Option<u64>,
}

impl Session {
    fn dispatch(&mut self, item: Decoded) {
        let Session {
            rt, root, streams, ..
        } = self;
        match item {
            Decoded::Frame(Frame::Control { stream, json }) => {
                match serde_json::from_slice::<Request>(&json) {
                    Ok(Request::Hello {
                        min_version,
                        max_version,
                        nonce,
                        host_time_ns,
                    }) => self.hello(stream, min_version..=max_version, nonce, host_time_ns),
                    parsed => self.control(stream, parsed),
                }
            }
            other => dispatch_frame(other, rt, root, streams),
        }
    }

    /// Answers a handshake; sets the clock (it stood still while the VM was paused or
    /// snapshotted); on a new host session, ends the old one.
    fn hello(
        &mut self,
        stream: u32,
        versions: std::ops::RangeInclusive<u32>,
        nonce: u64,
        host_time_ns: Option<u64>,
    ) {
        if let Some(ns) = host_time_ns {
            set_clock(ns);
        }
        if self.host_nonce != Some(nonce) {
            if self.host_nonce.is_some() {
                self.end_host_session();
            }
            self.host_nonce = Some(nonce);
            // On the console, which the host keeps as the sandbox's log: every boot,
            // restore and resume shows up there.
            eprintln!("nullspace-agent: host session {nonce:016x} connected");
        }
        let out = self.root.for_stream(stream);
        self.rt.spawn(async move {
            if versions.contains(&PROTOCOL_VERSION) {
                out.reply(&Reply::Hello {
                    version: PROTOCOL_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    nonce,
                })
                .await;
            } else {
                out.error(AgentError::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "agent speaks protocol {PROTOCOL_VERSION}, host asked for {}..={}; rebuild the guest image",
                        versions.start(),
                        versions.end()
                    ),
                ))
                .await;
            }
        });
    }

    /// Ends every stream of the previous host; processes keep running, detached, so
    /// their output waits for the new host to attach.
    fn end_host_session(&mut self) {
        let old: Vec<_> = self.streams.lock().unwrap().drain().collect();
        for (_, inbox) in old {
            let _ = inbox.try_send(Inbound::SessionEnded);
        }
        let processes = self.processes.clone();
        self.rt.block_on(processes.detach_all());
    }

    fn control(&mut self, stream: u32, parsed: Result<Request, serde_json::Error>) {
        let Session {
            rt,
            root,
            streams,
            processes,
            ..
        } = self;
        let existing = streams.lock().unwrap().get(&stream).cloned();
        let out = root.for_stream(stream);
        match parsed {
            Ok(req @ (Request::Detach | Request::Cancel | Request::Resize { .. })) => {
                // Without a stream it crossed the stream's final reply: nothing to do.
                if let Some(inbox) = existing {
                    let msg = match req {
                        Request::Detach => Inbound::Detach,
                        Request::Resize { cols, rows } => Inbound::Resize { cols, rows },
                        _ => Inbound::Abort(AgentError::new(
                            ErrorCode::Cancelled,
                            "cancelled by the host",
                        )),
                    };
                    let _ = inbox.blocking_send(msg);
                }
            }
            Ok(_) if existing.is_some() => spawn_error(
                rt,
                out,
                ErrorCode::InvalidArgument,
                format!("stream {stream} is already open; open each request on a new stream ID"),
            ),
            Ok(request) => open_stream(request, out, rt, streams, processes),
            // An op this agent does not know comes from a newer host: say so in a
            // way the host can act on, rather than as a malformed request.
            Err(e) if e.to_string().starts_with("unknown variant") => spawn_error(
                rt,
                out,
                ErrorCode::Unsupported,
                format!(
                    "this agent ({}) does not support that request: {e}; update the guest image",
                    env!("CARGO_PKG_VERSION")
                ),
            ),
            Err(e) => spawn_error(
                rt,
                out,
                ErrorCode::InvalidArgument,
                format!("unreadable request: {e}"),
            ),
        }
    }
}

fn dispatch_frame(item: Decoded, rt: &Handle, root: &Outbox, streams: &StreamTable) {
    match item {
        Decoded::Frame(Frame::Control { .. }) => {
            unreachable!("control frames go to Session::control")
        }
        Decoded::Frame(Frame::Data { stream, bytes, .. }) => {
            let inbox = streams.lock().unwrap().get(&stream).cloned();
            if let Some(inbox) = inbox {
                let _ = inbox.blocking_send(Inbound::Data(bytes));
            }
        }
        Decoded::Frame(Frame::Eof { stream, .. }) => {
            let inbox = streams.lock().unwrap().get(&stream).cloned();
            if let Some(inbox) = inbox {
                let _ = inbox.blocking_send(Inbound::Eof);
            }
        }
        Decoded::Oversized { stream, len } => {
            let err = AgentError::new(
                ErrorCode::FrameTooLarge,
                format!(
                    "frame of {len} bytes exceeds the {} byte limit; send data in chunks of at most {} bytes",
                    agent_protocol::MAX_FRAME_PAYLOAD,
                    agent_protocol::DATA_CHUNK
                ),
            );
            // A stream that lost a frame cannot complete: its handler ends it with the
            // error. Without a handler, the error is the stream's only reply.
            let inbox = streams.lock().unwrap().get(&stream).cloned();
            match inbox {
                Some(inbox) => {
                    let _ = inbox.blocking_send(Inbound::Abort(err));
                }
                None => spawn_error(rt, root.for_stream(stream), err.code, err.message),
            }
        }
        Decoded::Malformed { stream, reason } => spawn_error(
            rt,
            root.for_stream(stream),
            ErrorCode::InvalidArgument,
            reason,
        ),
        Decoded::Resynced { skipped } => {
            eprintln!("nullspace-agent: skipped {skipped} bytes that were not a frame");
        }
    }
}

fn spawn_error(rt: &Handle, out: Outbox, code: ErrorCode, message: String) {
    rt.spawn(async move { out.error(AgentError::new(code, message)).await });
}

fn open_stream(
    request: Request,
    out: Outbox,
    rt: &Handle,
    streams: &StreamTable,
    processes: &process::ProcessTable,
) {
    let (tx, inbox) = mpsc::channel(64);
    let stream = out.stream();
    streams.lock().unwrap().insert(stream, tx);
    let streams = streams.clone();
    let processes = processes.clone();
    rt.spawn(async move {
        handle(request, out, inbox, processes).await;
        streams.lock().unwrap().remove(&stream);
    });
}

async fn handle(
    request: Request,
    out: Outbox,
    inbox: mpsc::Receiver<Inbound>,
    processes: process::ProcessTable,
) {
    match request {
        Request::Exec(req) => process::exec(req, out, inbox, processes).await,
        Request::Attach { pid } => process::attach(pid, out, inbox, processes).await,
        Request::ListProcesses => {
            out.reply(&Reply::Processes {
                processes: processes.list().await,
            })
            .await
        }
        Request::Signal { pid, signal } => match processes.signal(pid, signal).await {
            Ok(()) => out.reply(&Reply::Done { bytes: None }).await,
            Err(e) => out.error(e).await,
        },
        Request::ReadFile { path } => files::read(&path, &out, inbox).await,
        Request::ResizeRootfs => match tokio::task::spawn_blocking(crate::rootfs::grow).await {
            Ok(Ok(bytes)) => out.reply(&Reply::Done { bytes }).await,
            Ok(Err(e)) => out.error(AgentError::new(ErrorCode::Io, e)).await,
            Err(e) => {
                out.error(AgentError::new(ErrorCode::Io, e.to_string()))
                    .await
            }
        },
        Request::WriteFile { path, mode, user } => {
            files::write(&path, mode, user.as_deref(), &out, inbox).await
        }
        Request::ConnectPort { port } => crate::tunnel::connect(port, out, inbox).await,
        Request::Pty(req) => crate::pty::run(req, out, inbox).await,
        Request::PtyAttach { pid, cols, rows } => {
            crate::pty::attach(pid, cols.zip(rows), out, inbox).await
        }
        Request::WatchDir { path, recursive } => {
            crate::watch::watch(path, recursive, out, inbox).await
        }
        Request::Reseed { entropy } => {
            match tokio::task::spawn_blocking(move || crate::entropy::reseed(&entropy)).await {
                Ok(Ok(reply)) => out.reply(&reply).await,
                Ok(Err(e)) => out.error(e).await,
                Err(e) => {
                    out.error(AgentError::new(ErrorCode::Io, e.to_string()))
                        .await
                }
            }
        }
        Request::Metrics => {
            let m = tokio::task::spawn_blocking(crate::metrics::read)
                .await
                .unwrap_or_default();
            out.reply(&Reply::Metrics(m)).await
        }
        Request::ProcessOutput { pid } => match processes.output(pid).await {
            Ok(pieces) => out.reply(&Reply::ProcessOutput { pieces }).await,
            Err(e) => out.error(e).await,
        },
        other => match files::simple(other).await {
            Ok(reply) => out.reply(&reply).await,
            Err(e) => out.error(e).await,
        },
    }
}

/// Sets the guest's wall clock. Failure is only logged: a wrong clock is better than no
/// agent.
fn set_clock(unix_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec pointer.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        eprintln!(
            "nullspace-agent: setting the clock failed: {}",
            std::io::Error::last_os_error()
        );
    }
}
