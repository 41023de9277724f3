//! Interactive terminals: a process on a new pseudo-terminal, its output streamed, input
//! and resizes from the host.

use crate::session::{Inbound, Outbox};
use crate::users;
use agent_protocol::{
    AgentError, Channel, ErrorCode, ExitStatus, PtyRequest, Reply, DATA_CHUNK, DEFAULT_CWD,
    DEFAULT_USER,
};
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

/// Runs the terminal session on `out`'s stream until its process exits.
pub async fn run(req: PtyRequest, out: Outbox, mut inbox: mpsc::Receiver<Inbound>) {
    let started = start(&req);
    let (mut child, master) = match started {
        Ok(x) => x,
        Err(e) => return out.error(e).await,
    };
    let pid = child.id().unwrap_or(0);
    out.reply(&Reply::Started { pid }).await;
    let master_fd = master.as_raw_fd();
    let mut reader = tokio::fs::File::from_std(std::fs::File::from(
        master.try_clone().expect("dup of a pty master"),
    ));
    let mut writer = tokio::fs::File::from_std(std::fs::File::from(master));
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut reading = true;
    loop {
        tokio::select! {
            n = reader.read(&mut buf), if reading => match n {
                Ok(n) if n > 0 => out.data(Channel::Output, buf[..n].to_vec()).await,
                // EIO once the last process holding the slave has gone.
                _ => reading = false,
            },
            msg = inbox.recv() => match msg {
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
                Some(Inbound::Abort(_)) | Some(Inbound::SessionEnded) | None => {
                    // The terminal's user is gone: hang up on its session.
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(-(pid as i32), libc::SIGHUP) };
                    let _ = child.wait().await;
                    return;
                }
            },
            status = child.wait() => {
                // Drain what the terminal still holds.
                while let Ok(Ok(n)) = tokio::time::timeout(std::time::Duration::from_millis(50), reader.read(&mut buf)).await {
                    if n == 0 { break; }
                    out.data(Channel::Output, buf[..n].to_vec()).await;
                }
                out.eof(Channel::Output).await;
                let status = status.map(|s| ExitStatus { code: s.code(), signal: s.signal() })
                    .unwrap_or(ExitStatus { code: None, signal: None });
                return out.reply(&Reply::Exited(status)).await;
            }
        }
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
