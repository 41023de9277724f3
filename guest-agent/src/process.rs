//! Processes: start, stream output, stdin, signals, background and re-attach.
//!
//! A process outlives the stream that started it when it runs in the background or the
//! stream detaches. Its output then collects in a bounded backlog that the next stream to
//! attach receives first, followed by live output and the exit status.

use crate::session::{Inbound, Outbox};
use crate::users;
use agent_protocol::{
    AgentError, Channel, Command, ErrorCode, ExecRequest, ExitStatus, OutputPiece, ProcessInfo,
    Reply, DATA_CHUNK, DEFAULT_CWD, DEFAULT_USER, PROCESS_HISTORY_BYTES,
};
use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::{watch, Mutex};

/// Output kept for a detached process; older bytes are dropped first.
const BACKLOG_LIMIT: usize = 1024 * 1024;
/// How long output is gathered into one frame after its first bytes arrive.
const COALESCE_WINDOW: std::time::Duration = std::time::Duration::from_millis(2);
/// A kept-output piece grows by joining small writes of the same stream up to this.
const HISTORY_PIECE_BYTES: usize = 16 * 1024;
/// Most JSON bytes of kept output one reply carries (below a frame's payload limit).
const MAX_OUTPUT_REPLY_BYTES: usize = 900 * 1024;
/// Finished, never-collected processes kept for a later attach or list.
const FINISHED_KEPT: usize = 64;

/// The processes this agent started.
#[derive(Clone, Default)]
pub struct ProcessTable {
    procs: Arc<Mutex<BTreeMap<u32, Arc<Proc>>>>,
}

struct Proc {
    info: ProcessInfo,
    state: Mutex<ProcState>,
    stdin: Mutex<Option<ChildStdin>>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

#[derive(Default)]
struct ProcState {
    /// The stream output goes to, if any.
    attached: Option<Outbox>,
    /// Output produced while detached: (channel, bytes).
    backlog: VecDeque<(Channel, Vec<u8>)>,
    backlog_bytes: usize,
    /// A background process's output as kept for logs, attached or not: (channel, when
    /// in ms since the epoch, bytes), at most [`PROCESS_HISTORY_BYTES`].
    history: VecDeque<(Channel, u64, Vec<u8>)>,
    history_bytes: usize,
}

impl ProcState {
    fn push_history(&mut self, channel: Channel, bytes: &[u8]) {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // A piece larger than the whole history keeps its end.
        let bytes = &bytes[bytes.len().saturating_sub(PROCESS_HISTORY_BYTES)..];
        self.history_bytes += bytes.len();
        // Small writes (a progress bar's byte at a time) join the piece before: one
        // piece each would make the reply many times the bytes.
        match self.history.back_mut() {
            Some((c, _, last))
                if *c == channel && last.len() + bytes.len() <= HISTORY_PIECE_BYTES =>
            {
                last.extend_from_slice(bytes)
            }
            _ => self.history.push_back((channel, at_ms, bytes.to_vec())),
        }
        while self.history_bytes > PROCESS_HISTORY_BYTES {
            let Some((_, _, old)) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= old.len();
        }
    }

    fn push_backlog(&mut self, channel: Channel, bytes: Vec<u8>) {
        self.backlog_bytes += bytes.len();
        self.backlog.push_back((channel, bytes));
        while self.backlog_bytes > BACKLOG_LIMIT {
            let Some((_, old)) = self.backlog.pop_front() else {
                break;
            };
            self.backlog_bytes -= old.len();
        }
    }
}

impl ProcessTable {
    /// Every process not yet collected, oldest first.
    pub async fn list(&self) -> Vec<ProcessInfo> {
        let procs: Vec<Arc<Proc>> = self.procs.lock().await.values().cloned().collect();
        let mut out = Vec::with_capacity(procs.len());
        for p in procs {
            let mut info = p.info.clone();
            info.attached = p.state.lock().await.attached.is_some();
            info.exit = *p.exit.borrow();
            out.push(info);
        }
        out
    }

    /// Signals a process's whole process group (it leads its own session).
    pub async fn signal(&self, pid: u32, signal: i32) -> Result<(), AgentError> {
        let proc = self.get(pid).await?;
        if proc.exit.borrow().is_some() {
            return Err(AgentError::new(
                ErrorCode::NotFound,
                format!("process {pid} has already exited"),
            ));
        }
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(-(pid as i32), signal) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            let code = if err.raw_os_error() == Some(libc::EINVAL) {
                ErrorCode::InvalidArgument
            } else {
                ErrorCode::Io
            };
            return Err(AgentError::new(
                code,
                format!("signal {signal} to process {pid}: {err}"),
            ));
        }
        Ok(())
    }

    /// Detaches every process from its stream (the host that held them is gone).
    pub async fn detach_all(&self) {
        let procs: Vec<Arc<Proc>> = self.procs.lock().await.values().cloned().collect();
        for p in procs {
            p.state.lock().await.attached = None;
        }
    }

    async fn get(&self, pid: u32) -> Result<Arc<Proc>, AgentError> {
        self.procs.lock().await.get(&pid).cloned().ok_or_else(|| {
            AgentError::new(
                ErrorCode::NotFound,
                format!(
                    "no process {pid} was started by the agent; list processes to see which exist"
                ),
            )
        })
    }

    async fn insert(&self, proc: Arc<Proc>) {
        let mut procs = self.procs.lock().await;
        procs.insert(proc.info.pid, proc);
        // Forget the oldest finished processes nobody collected.
        let finished: Vec<u32> = procs
            .iter()
            .filter(|(_, p)| p.exit.borrow().is_some())
            .map(|(pid, _)| *pid)
            .collect();
        for pid in finished
            .iter()
            .take(finished.len().saturating_sub(FINISHED_KEPT))
        {
            procs.remove(pid);
        }
    }

    async fn remove(&self, pid: u32) {
        self.procs.lock().await.remove(&pid);
    }

    /// The output background process `pid` produced, as kept for logs.
    pub async fn output(&self, pid: u32) -> Result<Vec<OutputPiece>, AgentError> {
        let proc = self.get(pid).await?;
        let state = proc.state.lock().await;
        let mut pieces: VecDeque<OutputPiece> = state
            .history
            .iter()
            .map(|(channel, at_ms, bytes)| OutputPiece {
                stream: if *channel == Channel::Error {
                    "stderr"
                } else {
                    "stdout"
                }
                .into(),
                text: String::from_utf8_lossy(bytes).into_owned(),
                at_ms: *at_ms,
            })
            .collect();
        // Escaped as JSON (NULs, invalid UTF-8) the text can outgrow a frame: the oldest
        // pieces go until the reply fits.
        let size = |p: &OutputPiece| serde_json::to_string(p).map_or(0, |s| s.len());
        let mut total: usize = pieces.iter().map(size).sum();
        while total > MAX_OUTPUT_REPLY_BYTES {
            let Some(p) = pieces.pop_front() else { break };
            total -= size(&p);
        }
        Ok(pieces.into())
    }
}

/// A command run as `user` in `cwd`: a clean environment (PATH, HOME, USER, LOGNAME,
/// SHELL, LANG) plus `env`, in a session of its own (so a signal reaches its children),
/// with the user's identity; `controlling_tty` makes its stdin (a terminal) the
/// session's controlling terminal.
pub fn command_as(
    program: &str,
    args: &[String],
    user: &users::User,
    cwd: &str,
    env: &BTreeMap<String, String>,
    controlling_tty: bool,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", &user.shell)
        .env("LANG", "C.UTF-8")
        .envs(env);
    let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0
                || (controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0)
                || libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Starts a process and serves it on `out`'s stream.
pub async fn exec(
    req: ExecRequest,
    out: Outbox,
    inbox: tokio::sync::mpsc::Receiver<Inbound>,
    table: ProcessTable,
) {
    let attach = req.attach;
    let proc = match spawn(req, &table).await {
        Ok(p) => p,
        Err(e) => return out.error(e).await,
    };
    if attach {
        serve_attached(proc, out, inbox, table).await;
    } else {
        out.reply(&Reply::Started { pid: proc.info.pid }).await;
        out.reply(&Reply::Detached).await;
    }
}

/// Attaches `out`'s stream to a process started earlier.
pub async fn attach(
    pid: u32,
    out: Outbox,
    inbox: tokio::sync::mpsc::Receiver<Inbound>,
    table: ProcessTable,
) {
    match table.get(pid).await {
        Ok(proc) => serve_attached(proc, out, inbox, table).await,
        Err(e) => out.error(e).await,
    }
}

async fn spawn(req: ExecRequest, table: &ProcessTable) -> Result<Arc<Proc>, AgentError> {
    let user = users::lookup(req.user.as_deref().unwrap_or(DEFAULT_USER))?;
    let cwd = req.cwd.clone().unwrap_or_else(|| DEFAULT_CWD.to_string());
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(AgentError::new(
                ErrorCode::NotADirectory,
                format!(
                    "working directory {cwd} is not a directory; send an existing directory as cwd"
                ),
            ))
        }
        Err(e) => {
            return Err(AgentError::new(
                ErrorCode::NotFound,
                format!("working directory {cwd}: {e}; create it first or send another cwd"),
            ))
        }
    }
    let argv: Vec<String> = match &req.command {
        Command::Argv(argv) if argv.is_empty() || argv[0].is_empty() => {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                "argv is empty; send at least the program to run",
            ))
        }
        Command::Argv(argv) => argv.clone(),
        Command::Shell(line) => vec!["/bin/sh".into(), "-c".into(), line.clone()],
    };
    let mut cmd = command_as(&argv[0], &argv[1..], &user, &cwd, &req.env, false);
    cmd.stdin(if req.stdin {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    })
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => ErrorCode::NotFound,
                std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
                _ => ErrorCode::Io,
            };
            AgentError::new(
                code,
                format!(
                    "cannot start '{}': {e}; send an installed program (or a shell command line)",
                    argv[0]
                ),
            )
        })?;
    let pid = child.id().expect("a just-spawned child has a pid");
    let (exit_tx, exit_rx) = watch::channel(None);
    let proc = Arc::new(Proc {
        info: ProcessInfo {
            pid,
            command: req.command,
            user: user.name,
            cwd,
            background: req.background,
            attached: false,
            exit: None,
        },
        state: Mutex::new(ProcState::default()),
        stdin: Mutex::new(child.stdin.take()),
        exit: exit_rx,
    });
    table.insert(proc.clone()).await;

    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let p = proc.clone();
    let table = table.clone();
    tokio::spawn(async move {
        let (_, _, status) = tokio::join!(
            pump(&p, Channel::Output, stdout),
            pump(&p, Channel::Error, stderr),
            child.wait()
        );
        let status = match status {
            Ok(s) => ExitStatus {
                code: s.code(),
                signal: s.signal(),
            },
            Err(_) => ExitStatus {
                code: None,
                signal: None,
            },
        };
        *p.stdin.lock().await = None;
        let mut state = p.state.lock().await;
        let _ = exit_tx.send(Some(status));
        if let Some(out) = state.attached.take() {
            // Collected: gone from the table before the host hears of the exit.
            table.remove(p.info.pid).await;
            out.reply(&Reply::Exited(status)).await;
        }
    });
    Ok(proc)
}

/// Copies one output pipe to the attached stream, or to the backlog while detached.
async fn pump(proc: &Proc, channel: Channel, mut pipe: impl AsyncRead + Unpin) {
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        let mut n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Programs often write in small pieces (a line, 4 KiB). Every frame costs a
        // VM exit, so gather what follows within a moment into one frame; the added
        // latency is at most COALESCE_WINDOW.
        let deadline = tokio::time::Instant::now() + COALESCE_WINDOW;
        while n < buf.len() {
            match tokio::time::timeout_at(deadline, pipe.read(&mut buf[n..])).await {
                Ok(Ok(m)) if m > 0 => n += m,
                _ => break,
            }
        }
        let mut state = proc.state.lock().await;
        if proc.info.background {
            state.push_history(channel, &buf[..n]);
        }
        match &state.attached {
            Some(out) => out.data(channel, buf[..n].to_vec()).await,
            None => state.push_backlog(channel, buf[..n].to_vec()),
        }
    }
}

/// Makes `out` the process's stream (taking it over from a previous one), replays the
/// backlog, then serves stdin and detach/cancel until the process ends or the stream
/// detaches.
async fn serve_attached(
    proc: Arc<Proc>,
    out: Outbox,
    mut inbox: tokio::sync::mpsc::Receiver<Inbound>,
    table: ProcessTable,
) {
    let pid = proc.info.pid;
    {
        let mut state = proc.state.lock().await;
        if let Some(previous) = state.attached.take() {
            previous.reply(&Reply::Detached).await;
        }
        out.reply(&Reply::Started { pid }).await;
        for (channel, bytes) in std::mem::take(&mut state.backlog) {
            out.data(channel, bytes).await;
        }
        state.backlog_bytes = 0;
        let exited = *proc.exit.borrow();
        if let Some(status) = exited {
            table.remove(pid).await;
            out.reply(&Reply::Exited(status)).await;
            return;
        }
        state.attached = Some(out.clone());
    }
    let mut exit = proc.exit.clone();
    loop {
        tokio::select! {
            msg = inbox.recv() => match msg {
                Some(Inbound::Data(bytes)) => {
                    let mut stdin = proc.stdin.lock().await;
                    if let Some(pipe) = stdin.as_mut() {
                        if pipe.write_all(&bytes).await.is_err() {
                            *stdin = None;
                        }
                    }
                }
                Some(Inbound::Eof) => *proc.stdin.lock().await = None,
                Some(Inbound::Resize { .. }) => {}
                Some(Inbound::Detach) => {
                    if detach(&proc, &out).await {
                        out.reply(&Reply::Detached).await;
                    }
                    return;
                }
                Some(Inbound::SessionEnded) => {
                    detach(&proc, &out).await;
                    return;
                }
                Some(Inbound::Abort(err)) => {
                    if proc.info.background {
                        if detach(&proc, &out).await {
                            out.error(err).await;
                        }
                        return;
                    }
                    // A foreground process dies with its stream; the exit status still
                    // comes back as the final reply.
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
                }
                None => return,
            },
            _ = exit.changed() => {
                // The pump task sent the final reply if this stream was still attached.
                return;
            }
        }
    }
}

/// Detaches `out` if it is still the attached stream; false if another stream took over.
async fn detach(proc: &Proc, out: &Outbox) -> bool {
    let mut state = proc.state.lock().await;
    match &state.attached {
        Some(current) if current.stream() == out.stream() => {
            state.attached = None;
            true
        }
        _ => false,
    }
}
