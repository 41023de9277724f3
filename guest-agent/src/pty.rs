//! Interactive terminals: a process on a new pseudo-terminal, its output streamed, input
//! and resizes from the host.

use crate::session::{Inbound, Outbox};
use crate::users;
use agent_protocol::{
    AgentError, Channel, ErrorCode, ExitStatus, PtyRequest, Reply, DATA_CHUNK, DEFAULT_CWD,
    DEFAULT_USER,
};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn winsize(cols: u16, rows: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A new master/slave pair of this size.
fn open_pty(cols: u16, rows: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (0, 0);
    let ws = winsize(cols, rows);
    // SAFETY: out-parameters are valid; name and termios may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty returned two new descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

/// How long a terminal whose host went away (a live migration, a restarted pool
/// manager) waits for a stream to attach again before its session gets a hangup.
const DETACHED_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);
/// The most output a detached terminal keeps for the next stream (the oldest goes).
const BACKLOG_LIMIT: usize = 1 << 20;

/// A stream handed to a terminal: it serves it until the terminal ends, the host goes
/// away or another stream takes it over; `done` is dropped then.
struct Attachment {
    out: Outbox,
    inbox: mpsc::Receiver<Inbound>,
    done: tokio::sync::oneshot::Sender<()>,
    /// The size to set as it attaches.
    size: Option<(u16, u16)>,
}

/// The terminals alive, by their process's PID: where a stream attaches.
fn terminals() -> &'static std::sync::Mutex<HashMap<u32, mpsc::Sender<Attachment>>> {
    static TERMINALS: std::sync::OnceLock<
        std::sync::Mutex<HashMap<u32, mpsc::Sender<Attachment>>>,
    > = std::sync::OnceLock::new();
    TERMINALS.get_or_init(Default::default)
}

/// Opens a terminal and serves it on `out`'s stream. It outlives the stream if the host
/// goes away (its output kept for [`attach`]), not if the host ends the stream.
pub async fn run(req: PtyRequest, out: Outbox, inbox: mpsc::Receiver<Inbound>) {
    let (child, master) = match start(&req) {
        Ok(x) => x,
        Err(e) => return out.error(e).await,
    };
    let pid = child.id().unwrap_or(0);
    let (tx, rx) = mpsc::channel(4);
    terminals().lock().unwrap().insert(pid, tx.clone());
    tokio::spawn(serve(pid, child, master, (tx.clone(), rx)));
    hand_over(&tx, out, inbox, None).await;
}

/// Attaches `out`'s stream to the terminal of process `pid` (taking it over from a
/// stream still attached); resized to `size` if given. What it wrote meanwhile comes
/// first.
pub async fn attach(
    pid: u32,
    size: Option<(u16, u16)>,
    out: Outbox,
    inbox: mpsc::Receiver<Inbound>,
) {
    let Some(tx) = terminals().lock().unwrap().get(&pid).cloned() else {
        return out
            .error(AgentError::new(
                ErrorCode::NotFound,
                format!("no terminal of process {pid}: it ended, or waited unattached longer than {} s; open a new one", DETACHED_LIMIT.as_secs()),
            ))
            .await;
    };
    hand_over(&tx, out, inbox, size).await;
}

/// Gives the stream to the terminal and waits while it serves it.
async fn hand_over(
    tx: &mpsc::Sender<Attachment>,
    out: Outbox,
    inbox: mpsc::Receiver<Inbound>,
    size: Option<(u16, u16)>,
) {
    let (done, served) = tokio::sync::oneshot::channel();
    let stream = out.clone();
    let attachment = Attachment {
        out,
        inbox,
        done,
        size,
    };
    if tx.send(attachment).await.is_err() {
        return stream
            .error(AgentError::new(ErrorCode::NotFound, "the terminal ended"))
            .await;
    }
    let _ = served.await;
}

/// The terminal of process `pid` for its whole life: its output to the attached stream
/// (or a bounded backlog while none is), input and resizes from it, a hangup when the
/// host ends the stream or none attaches within [`DETACHED_LIMIT`].
async fn serve(
    pid: u32,
    mut child: tokio::process::Child,
    master: OwnedFd,
    (me, mut attachments): (mpsc::Sender<Attachment>, mpsc::Receiver<Attachment>),
) {
    let master_fd = master.as_raw_fd();
    let mut reader = tokio::fs::File::from_std(std::fs::File::from(
        master.try_clone().expect("dup of a pty master"),
    ));
    let mut writer = tokio::fs::File::from_std(std::fs::File::from(master));
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut reading = true;
    // The attached stream's outbox (and its `done`), and its inbox apart: the select
    // reads one while writing to the other.
    let mut attached: Option<(Outbox, tokio::sync::oneshot::Sender<()>)> = None;
    let mut inbox: Option<mpsc::Receiver<Inbound>> = None;
    let mut backlog: VecDeque<Vec<u8>> = VecDeque::new();
    let mut backlog_bytes = 0usize;
    let mut exited: Option<ExitStatus> = None;
    let mut detached_since = tokio::time::Instant::now();
    let hang_up = |pid: u32| {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(-(pid as i32), libc::SIGHUP) };
    };
    loop {
        // The process ended and its output is all out: the attached stream gets the
        // exit; without one, it waits for a stream (or the limit) to tell.
        if let (Some(status), false) = (exited, reading) {
            if let Some((out, _done)) = attached.take() {
                out.eof(Channel::Output).await;
                out.reply(&Reply::Exited(status)).await;
                break;
            }
        }
        let inbound = async {
            match inbox.as_mut() {
                Some(i) => i.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = reader.read(&mut buf), if reading => match n {
                Ok(n) if n > 0 => match &attached {
                    Some((out, _)) => out.data(Channel::Output, buf[..n].to_vec()).await,
                    None => keep(&mut backlog, &mut backlog_bytes, &buf[..n]),
                },
                // EIO once the last process holding the slave has gone.
                _ => reading = false,
            },
            msg = inbound => match msg {
                Some(Inbound::Data(bytes)) => {
                    let _ = writer.write_all(&bytes).await;
                    let _ = writer.flush().await;
                }
                Some(Inbound::Resize { cols, rows }) => {
                    let ws = winsize(cols, rows);
                    // SAFETY: a valid descriptor and winsize.
                    unsafe { libc::ioctl(master_fd, libc::TIOCSWINSZ, &ws) };
                }
                Some(Inbound::Eof) | Some(Inbound::Detach) => {}
                // The host went away, not the terminal's user: it waits for the next.
                Some(Inbound::SessionEnded) | None => {
                    attached = None;
                    inbox = None;
                    detached_since = tokio::time::Instant::now();
                }
                Some(Inbound::Abort(_)) => {
                    // The terminal's user is gone: hang up on its session.
                    hang_up(pid);
                    break;
                }
            },
            next = attachments.recv() => {
                let Some(next) = next else { break };
                if let Some((cols, rows)) = next.size {
                    let ws = winsize(cols, rows);
                    // SAFETY: a valid descriptor and winsize.
                    unsafe { libc::ioctl(master_fd, libc::TIOCSWINSZ, &ws) };
                }
                if let Some((old, _)) = attached.take() {
                    old.error(AgentError::new(
                        ErrorCode::Cancelled,
                        "another stream took this terminal over",
                    ))
                    .await;
                }
                next.out.reply(&Reply::Started { pid }).await;
                for bytes in backlog.drain(..) {
                    next.out.data(Channel::Output, bytes).await;
                }
                backlog_bytes = 0;
                attached = Some((next.out, next.done));
                inbox = Some(next.inbox);
            },
            status = child.wait(), if exited.is_none() => {
                // Drain what the terminal still holds.
                while let Ok(Ok(n)) = tokio::time::timeout(std::time::Duration::from_millis(50), reader.read(&mut buf)).await {
                    if n == 0 { break; }
                    match &attached {
                        Some((out, _)) => out.data(Channel::Output, buf[..n].to_vec()).await,
                        None => keep(&mut backlog, &mut backlog_bytes, &buf[..n]),
                    }
                }
                reading = false;
                exited = Some(status.map(|s| ExitStatus { code: s.code(), signal: s.signal() })
                    .unwrap_or(ExitStatus { code: None, signal: None }));
            },
            _ = tokio::time::sleep_until(detached_since + DETACHED_LIMIT), if attached.is_none() => {
                if exited.is_none() {
                    hang_up(pid);
                }
                break;
            }
        }
    }
    {
        // Only its own entry: the PID may be a newer terminal's by now.
        let mut table = terminals().lock().unwrap();
        if table.get(&pid).is_some_and(|tx| tx.same_channel(&me)) {
            table.remove(&pid);
        }
    }
    if exited.is_none() {
        let _ = child.wait().await;
    }
}

/// Keeps `bytes` for the next stream, the oldest going past [`BACKLOG_LIMIT`].
fn keep(backlog: &mut VecDeque<Vec<u8>>, held: &mut usize, bytes: &[u8]) {
    *held += bytes.len();
    backlog.push_back(bytes.to_vec());
    while *held > BACKLOG_LIMIT {
        let Some(old) = backlog.pop_front() else {
            break;
        };
        *held -= old.len();
    }
}

fn start(req: &PtyRequest) -> Result<(tokio::process::Child, OwnedFd), AgentError> {
    let user = users::lookup(req.user.as_deref().unwrap_or(DEFAULT_USER))?;
    let cwd = req.cwd.clone().unwrap_or_else(|| DEFAULT_CWD.to_string());
    if !std::path::Path::new(&cwd).is_dir() {
        return Err(AgentError::new(
            ErrorCode::NotFound,
            format!("working directory {cwd} does not exist; send an existing directory as cwd"),
        ));
    }
    let (master, slave) = open_pty(req.cols, req.rows)
        .map_err(|e| AgentError::new(ErrorCode::Io, format!("opening a terminal: {e}")))?;
    let shell = if user.shell.is_empty() {
        "/bin/sh".to_string()
    } else {
        user.shell.clone()
    };
    let (program, args) = match &req.command {
        Some(line) => ("/bin/sh".to_string(), vec!["-c".to_string(), line.clone()]),
        None => (shell, vec!["-l".to_string()]),
    };
    let stdio = |fd: &OwnedFd| -> Result<std::process::Stdio, AgentError> {
        fd.try_clone()
            .map(std::process::Stdio::from)
            .map_err(|e| AgentError::new(ErrorCode::Io, e.to_string()))
    };
    let mut cmd = crate::process::command_as(&program, &args, &user, &cwd, &req.env, true);
    if !req.env.contains_key("TERM") {
        cmd.env("TERM", "xterm-256color");
    }
    cmd.stdin(stdio(&slave)?)
        .stdout(stdio(&slave)?)
        .stderr(stdio(&slave)?);
    let child = tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| {
            AgentError::new(
                ErrorCode::NotFound,
                format!("cannot start the terminal's program: {e}"),
            )
        })?;
    // Only the child keeps the slave open, so the master reads EIO when it is gone.
    drop(slave);
    Ok((child, master))
}
