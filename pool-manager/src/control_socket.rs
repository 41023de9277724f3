//! The control API on a Unix socket (`--control-socket PATH`), for an API host on the
//! same machine (`nullspace-api --pool-manager unix:PATH`): the same routes and the same
//! API-key checks as the TCP listener, without the TCP/IP stack on either side of every
//! request.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The longest path a Unix socket address holds (`sun_path`, less its NUL).
const MAX_PATH: usize = 107;

/// Owner and group: the API host runs as the daemon's user or in its group. The API key
/// is checked on this listener as on the TCP one; the mode only keeps other local users
/// from the daemon's connection slots.
const MODE: u32 = 0o660;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    /// The path cannot be a socket address.
    #[error("--control-socket {0}: {1}")]
    BadPath(PathBuf, &'static str),
    /// Something that is not a socket is there: never removed.
    #[error("--control-socket {0}: something other than a socket is there; remove it or pick another path")]
    NotASocket(PathBuf),
    /// A live daemon answers on it (or one this daemon may not connect to).
    #[error("--control-socket {0}: another process is listening there (a pool manager on the same state?); stop it or pick another path")]
    InUse(PathBuf),
    /// Other users could replace the socket between this daemon's runs.
    #[error("--control-socket {0}: its directory is writable by every user, who could take the path over; put it in a directory only the daemon's user (and group) can write, e.g. the state directory")]
    OpenDirectory(PathBuf),
    /// A system call failed.
    #[error("--control-socket {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// A bound control socket; its file is removed when this is dropped.
pub struct ControlSocket {
    listener: Option<tokio::net::UnixListener>,
    path: PathBuf,
    /// Device and inode of the socket this bound: only that one is removed on drop,
    /// never a later daemon's.
    identity: (u64, u64),
}

impl ControlSocket {
    /// Binds `path`, replacing a stale socket a crashed daemon left (never a live one,
    /// never anything else), with mode 0660.
    pub fn bind(path: &Path) -> Result<Self, ControlSocketError> {
        let bad = |why| ControlSocketError::BadPath(path.to_path_buf(), why);
        if !path.is_absolute() {
            return Err(bad("send an absolute path"));
        }
        if path.as_os_str().len() > MAX_PATH {
            return Err(bad(
                "longer than the 107 bytes a Unix socket address holds; pick a shorter path",
            ));
        }
        let io = |e| ControlSocketError::Io(path.to_path_buf(), e);
        let parent = path.parent().unwrap_or(Path::new("/"));
        let dir = std::fs::metadata(parent).map_err(io)?;
        if dir.permissions().mode() & 0o002 != 0 {
            return Err(ControlSocketError::OpenDirectory(path.to_path_buf()));
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                // Stale only when nothing listens (refused); a live socket, or one this
                // user may not even connect to, is left alone.
                match std::os::unix::net::UnixStream::connect(path) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    _ => return Err(ControlSocketError::InUse(path.to_path_buf())),
                }
                std::fs::remove_file(path).map_err(io)?;
            }
            Ok(_) => return Err(ControlSocketError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
        let meta = std::fs::symlink_metadata(path).map_err(io)?;
        let socket = Self {
            listener: Some(listener),
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(MODE)).map_err(io)?;
        Ok(socket)
    }

    /// The listener, once; the file stays until `self` is dropped.
    pub fn take_listener(&mut self) -> Option<tokio::net::UnixListener> {
        self.listener.take()
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "nullspace-csock-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[tokio::test]
    async fn binds_replaces_a_stale_socket_and_refuses_a_live_one_or_a_file() {
        let dir = scratch();
        let path = dir.join("control.sock");
        // A stale socket: bound, then its listener gone without removing the file.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = ControlSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let e = ControlSocket::bind(&path).err().unwrap().to_string();
        assert!(e.contains("another process is listening"), "{e}");
        drop(live);
        assert!(!path.exists(), "removed when dropped");

        let file = dir.join("file");
        std::fs::write(&file, "keep me").unwrap();
        let e = ControlSocket::bind(&file).err().unwrap().to_string();
        assert!(e.contains("other than a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

        let e = ControlSocket::bind(Path::new("control.sock"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
        let long = dir.join("x".repeat(120));
        let e = ControlSocket::bind(&long).err().unwrap().to_string();
        assert!(e.contains("107 bytes"), "{e}");

        // A directory every user may write: refused.
        let open = dir.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ControlSocket::bind(&open.join("control.sock"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("writable by every user"), "{e}");

        // A socket another daemon bound after this one's went is not removed by it.
        let first = ControlSocket::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let second = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(first);
        assert!(path.exists(), "the newer socket stays");
        drop(second);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
