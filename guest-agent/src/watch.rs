//! Directory watches over inotify: create, write, remove, rename and chmod events, one
//! JSON line each on the stream's output channel.

use crate::session::{Inbound, Outbox};
use agent_protocol::{AgentError, Channel, FsEvent, Reply};
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF;

/// An inotify instance and the directories it watches.
struct Watcher {
    fd: i32,
    dirs: HashMap<i32, String>,
    recursive: bool,
}

impl Watcher {
    fn add(&mut self, dir: &str) -> std::io::Result<()> {
        let c = CString::new(dir)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid descriptor and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd, c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.dirs.insert(wd, dir.to_string());
        if self.recursive {
            for e in std::fs::read_dir(dir)?.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let _ = self.add(&e.path().display().to_string());
                }
            }
        }
        Ok(())
    }

    /// Reads the pending events (waits up to 200 ms for some).
    fn poll(&mut self, pending_moves: &mut HashMap<u32, (String, bool)>) -> Vec<FsEvent> {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            return unpaired_moves(pending_moves);
        }
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return unpaired_moves(pending_moves);
        }
        let mut events = Vec::new();
        let mut at = 0usize;
        let header = std::mem::size_of::<libc::inotify_event>();
        while at + header <= n as usize {
            // SAFETY: the kernel wrote whole events; read_unaligned copes with alignment.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let name_bytes = &buf[at + header..at + header + ev.len as usize];
            let name = String::from_utf8_lossy(name_bytes)
                .trim_end_matches('\0')
                .to_string();
            at += header + ev.len as usize;
            let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            let path = if name.is_empty() {
                dir.clone()
            } else {
                format!("{}/{name}", dir.trim_end_matches('/'))
            };
            let is_dir = ev.mask & libc::IN_ISDIR != 0;
            let event = |kind: &str, from: Option<String>| FsEvent {
                kind: kind.into(),
                path: path.clone(),
                from,
                dir: is_dir,
            };
            if ev.mask & libc::IN_CREATE != 0 {
                events.push(event("create", None));
                if is_dir && self.recursive {
                    let _ = self.add(&path);
                    // What was made in it before its watch was in place.
                    events.extend(scan(&path));
                }
            } else if ev.mask & libc::IN_CLOSE_WRITE != 0 {
                events.push(event("write", None));
            } else if ev.mask & libc::IN_DELETE != 0 {
                events.push(event("remove", None));
            } else if ev.mask & libc::IN_MOVED_FROM != 0 {
                pending_moves.insert(ev.cookie, (path.clone(), false));
            } else if ev.mask & libc::IN_MOVED_TO != 0 {
                if is_dir && self.recursive {
                    let _ = self.add(&path);
                }
                events.push(event(
                    "rename",
                    pending_moves.remove(&ev.cookie).map(|(p, _)| p),
                ));
            } else if ev.mask & libc::IN_ATTRIB != 0 {
                events.push(event("chmod", None));
            } else if ev.mask & libc::IN_DELETE_SELF != 0 {
                self.dirs.remove(&ev.wd);
            }
        }
        events.extend(unpaired_moves(pending_moves));
        events
    }
}

/// Everything under a directory that has just been created, as creates.
fn scan(dir: &str) -> Vec<FsEvent> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path().display().to_string();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        out.push(FsEvent {
            kind: "create".into(),
            path: path.clone(),
            from: None,
            dir: is_dir,
        });
        if is_dir {
            out.extend(scan(&path));
        }
    }
    out
}

/// Moves whose other half did not come within one more read: moves out of the tree,
/// which are removals. (The halves of one rename may arrive in separate reads.)
fn unpaired_moves(pending: &mut HashMap<u32, (String, bool)>) -> Vec<FsEvent> {
    let mut out = Vec::new();
    pending.retain(|_, (path, waited)| {
        if *waited {
            out.push(FsEvent {
                kind: "remove".into(),
                path: path.clone(),
                from: None,
                dir: false,
            });
            false
        } else {
            *waited = true;
            true
        }
    });
    out
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// Watches `path` until the host cancels the stream.
pub async fn watch(path: String, recursive: bool, out: Outbox, mut inbox: mpsc::Receiver<Inbound>) {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return out
            .error(AgentError::from_io(&std::io::Error::last_os_error(), &path))
            .await;
    }
    let mut watcher = Watcher {
        fd,
        dirs: HashMap::new(),
        recursive,
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return out
                .error(AgentError::new(
                    agent_protocol::ErrorCode::NotADirectory,
                    format!("{path} is not a directory; watch a directory"),
                ))
                .await
        }
        Err(e) => return out.error(AgentError::from_io(&e, &path)).await,
    }
    if let Err(e) = watcher.add(&path) {
        return out.error(AgentError::from_io(&e, &path)).await;
    }
    out.reply(&Reply::Watching).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::channel::<Vec<FsEvent>>(64);
    let stopping = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut moves = HashMap::new();
        while !stopping.load(Ordering::Relaxed) {
            let events = watcher.poll(&mut moves);
            if !events.is_empty() && tx.blocking_send(events).is_err() {
                break;
            }
        }
    });
    loop {
        tokio::select! {
            events = rx.recv() => match events {
                Some(events) => {
                    let mut lines = Vec::new();
                    for e in events {
                        lines.extend(serde_json::to_vec(&e).expect("json"));
                        lines.push(b'\n');
                    }
                    out.data(Channel::Output, lines).await;
                }
                None => break,
            },
            msg = inbox.recv() => match msg {
                Some(Inbound::Abort(_)) | Some(Inbound::SessionEnded) | None => break,
                _ => {}
            },
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    out.reply(&Reply::Done { bytes: None }).await;
}
