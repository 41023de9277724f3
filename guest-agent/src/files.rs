//! Files: streamed read and write, list, stat, mkdir, remove, rename.
//!
//! Relative paths are taken relative to [`DEFAULT_CWD`]. A write goes to a temporary
//! file beside the target and is renamed over it only once every byte arrived, so a
//! failed or cancelled upload never leaves a half-written file where the old one was.

use crate::session::{Inbound, Outbox};
use crate::users;
use agent_protocol::{
    AgentError, Channel, ErrorCode, FileInfo, FileType, Reply, Request, DATA_CHUNK, DEFAULT_CWD,
    DEFAULT_USER,
};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn resolve(path: &str) -> Result<PathBuf, AgentError> {
    if path.is_empty() {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            "path is empty; send an absolute path or one relative to /workspace",
        ));
    }
    if path.contains('\0') {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            "path contains a NUL byte",
        ));
    }
    Ok(Path::new(DEFAULT_CWD).join(path))
}

fn info(path: &Path) -> Result<FileInfo, AgentError> {
    let display = path.display().to_string();
    let meta = std::fs::symlink_metadata(path).map_err(|e| AgentError::from_io(&e, &display))?;
    let ft = meta.file_type();
    let file_type = if ft.is_file() {
        FileType::File
    } else if ft.is_dir() {
        FileType::Dir
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::Other
    };
    Ok(FileInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        path: display,
        file_type,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        symlink_target: ft
            .is_symlink()
            .then(|| std::fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    })
}

/// Streams a file back as output data, then `Done` with its size. A cancel from the host
/// (or the end of its session) stops it between chunks: a file without end (`/dev/zero`)
/// must not stream on after the host stopped wanting it.
pub async fn read(path: &str, out: &Outbox, inbox: mpsc::Receiver<Inbound>) {
    if let Err(e) = read_inner(path, out, inbox).await {
        out.error(e).await;
    }
}

async fn read_inner(
    path: &str,
    out: &Outbox,
    mut inbox: mpsc::Receiver<Inbound>,
) -> Result<(), AgentError> {
    let path = resolve(path)?;
    let display = path.display().to_string();
    if path.is_dir() {
        return Err(AgentError::new(
            ErrorCode::IsADirectory,
            format!("{display} is a directory; list it instead of reading it"),
        ));
    }
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| AgentError::from_io(&e, &display))?;
    let mut total = 0u64;
    loop {
        // Checked once per chunk: cheap, and a cancel waits at most one chunk.
        while let Ok(message) = inbox.try_recv() {
            match message {
                Inbound::Abort(err) => return Err(err),
                Inbound::SessionEnded => {
                    return Err(AgentError::new(
                        ErrorCode::Cancelled,
                        "the host session that asked for this file ended",
                    ))
                }
                // Nothing else means anything to a download.
                Inbound::Data(_) | Inbound::Eof | Inbound::Detach | Inbound::Resize { .. } => {}
            }
        }
        let mut buf = vec![0u8; DATA_CHUNK];
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| AgentError::from_io(&e, &display))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        total += n as u64;
        out.data(Channel::Output, buf).await;
    }
    out.eof(Channel::Output).await;
    out.reply(&Reply::Done { bytes: Some(total) }).await;
    Ok(())
}

/// Receives a file's bytes and replaces the target with them atomically.
pub async fn write(
    path: &str,
    mode: Option<u32>,
    user: Option<&str>,
    out: &Outbox,
    inbox: mpsc::Receiver<Inbound>,
) {
    match write_inner(path, mode, user, inbox).await {
        Ok(bytes) => out.reply(&Reply::Done { bytes: Some(bytes) }).await,
        Err(e) => out.error(e).await,
    }
}

async fn write_inner(
    path: &str,
    mode: Option<u32>,
    user: Option<&str>,
    mut inbox: mpsc::Receiver<Inbound>,
) -> Result<u64, AgentError> {
    let path = resolve(path)?;
    let display = path.display().to_string();
    let owner = users::lookup(user.unwrap_or(DEFAULT_USER))?;
    if path.is_dir() {
        return Err(AgentError::new(
            ErrorCode::IsADirectory,
            format!("{display} is a directory; send the path of a file inside it"),
        ));
    }
    let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    mkdir_all(&parent, owner.uid, owner.gid)?;
    let tmp = parent.join(format!(
        ".{}.nullspace-upload-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        upload_nonce()
    ));
    let result = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| AgentError::from_io(&e, &display))?;
        let mut total = 0u64;
        loop {
            match inbox.recv().await {
                Some(Inbound::Data(bytes)) => {
                    total += bytes.len() as u64;
                    file.write_all(&bytes)
                        .await
                        .map_err(|e| AgentError::from_io(&e, &display))?;
                }
                Some(Inbound::Eof) => break,
                Some(Inbound::Abort(err)) => return Err(err),
                Some(Inbound::SessionEnded) => {
                    return Err(AgentError::new(
                        ErrorCode::Cancelled,
                        "the host session that sent this upload ended",
                    ))
                }
                Some(Inbound::Detach) | Some(Inbound::Resize { .. }) => {}
                None => {
                    return Err(AgentError::new(
                        ErrorCode::Cancelled,
                        "the upload's stream closed before its end",
                    ))
                }
            }
        }
        file.sync_all()
            .await
            .map_err(|e| AgentError::from_io(&e, &display))?;
        let perms = std::fs::Permissions::from_mode(mode.unwrap_or(0o644) & 0o7777);
        std::fs::set_permissions(&tmp, perms).map_err(|e| AgentError::from_io(&e, &display))?;
        std::os::unix::fs::chown(&tmp, Some(owner.uid), Some(owner.gid))
            .map_err(|e| AgentError::from_io(&e, &display))?;
        std::fs::rename(&tmp, &path).map_err(|e| AgentError::from_io(&e, &display))?;
        Ok(total)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A number that differs between concurrent uploads to the same directory.
fn upload_nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Creates `dir` and missing parents, giving the new ones to `uid:gid`.
fn mkdir_all(dir: &Path, uid: u32, gid: u32) -> Result<(), AgentError> {
    let display = dir.display().to_string();
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        mkdir_all(parent, uid, gid)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(|e| AgentError::from_io(&e, &display)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(AgentError::from_io(&e, &display)),
    }
}

/// The one-reply file operations.
pub async fn simple(request: Request) -> Result<Reply, AgentError> {
    tokio::task::spawn_blocking(move || simple_blocking(request))
        .await
        .unwrap_or_else(|e| {
            Err(AgentError::new(
                ErrorCode::Io,
                format!("agent task failed: {e}"),
            ))
        })
}

fn simple_blocking(request: Request) -> Result<Reply, AgentError> {
    let done = Reply::Done { bytes: None };
    match request {
        Request::Stat { path } => Ok(Reply::Stat {
            info: info(&resolve(&path)?)?,
        }),
        Request::ListDir { path } => {
            let dir = resolve(&path)?;
            let display = dir.display().to_string();
            let read = std::fs::read_dir(&dir).map_err(|e| AgentError::from_io(&e, &display))?;
            let mut entries = Vec::new();
            for entry in read {
                let entry = entry.map_err(|e| AgentError::from_io(&e, &display))?;
                // An entry removed while listing is simply not listed.
                if let Ok(i) = info(&entry.path()) {
                    entries.push(i);
                }
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(Reply::Entries { entries })
        }
        Request::Mkdir { path, user } => {
            let owner = users::lookup(user.as_deref().unwrap_or(DEFAULT_USER))?;
            let dir = resolve(&path)?;
            if dir.exists() && !dir.is_dir() {
                return Err(AgentError::new(
                    ErrorCode::AlreadyExists,
                    format!("{} exists and is not a directory", dir.display()),
                ));
            }
            mkdir_all(&dir, owner.uid, owner.gid)?;
            Ok(done)
        }
        Request::Remove { path } => {
            let target = resolve(&path)?;
            let display = target.display().to_string();
            if target == Path::new("/") {
                return Err(AgentError::new(
                    ErrorCode::InvalidArgument,
                    "refusing to remove /; send a path below it",
                ));
            }
            let meta = std::fs::symlink_metadata(&target)
                .map_err(|e| AgentError::from_io(&e, &display))?;
            if meta.is_dir() {
                std::fs::remove_dir_all(&target)
            } else {
                std::fs::remove_file(&target)
            }
            .map_err(|e| AgentError::from_io(&e, &display))?;
            Ok(done)
        }
        Request::Rename { from, to } => {
            let (from, to) = (resolve(&from)?, resolve(&to)?);
            std::fs::rename(&from, &to).map_err(|e| {
                AgentError::from_io(&e, &format!("{} -> {}", from.display(), to.display()))
            })?;
            Ok(done)
        }
        other => Err(AgentError::new(
            ErrorCode::Unsupported,
            format!("request {other:?} is not supported by this agent"),
        )),
    }
}
