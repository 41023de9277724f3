//! Control messages: what travels in [`crate::Frame::Control`] frames, as JSON.
//!
//! A stream is opened by the host with one [`Request`]. The agent answers with any number
//! of non-final replies and data frames, and ends the stream with exactly one final reply
//! ([`Reply::is_final`]). Stream kinds that later issues add (PTY, file watch, metrics,
//! port tunnels) are new `Request` variants on the same framing; a new agent answers an
//! unknown request with [`ErrorCode::Unsupported`], so old hosts and new agents coexist.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the protocol spoken by this build. Bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;
/// Most bytes one [`Request::Reseed`] carries.
pub const MAX_RESEED_BYTES: usize = 512;

/// Host → agent control messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Handshake. Sent (and re-sent until answered) after every (re)connect; the agent
    /// answers with [`Reply::Hello`] echoing `nonce`.
    Hello {
        /// Protocol versions the host speaks, lowest and highest.
        min_version: u32,
        max_version: u32,
        nonce: u64,
        /// The host's wall clock (ns since the Unix epoch). The guest clock stands still
        /// while a VM is paused or snapshotted, so the agent sets it from this.
        #[serde(default)]
        host_time_ns: Option<u64>,
    },
    /// Start a process. Its output streams back on this stream.
    Exec(ExecRequest),
    /// Mix `entropy` (hex, at most [`MAX_RESEED_BYTES`] bytes) into the kernel's entropy
    /// pool, credited, and reseed its CRNG at once. Sent after every handshake: guests
    /// restored from one snapshot would otherwise share their random output. An agent
    /// that predates it answers `unsupported`.
    Reseed { entropy: String },
    /// Attach this stream to a running (or just finished) process started earlier.
    Attach { pid: u32 },
    /// Attach this stream to the terminal ([`Request::Pty`]) of process `pid`, whose
    /// stream ended when its host went away (a live migration, a restarted host): what
    /// it wrote meanwhile comes first. Resized to `cols`×`rows` if given.
    PtyAttach {
        pid: u32,
        #[serde(default)]
        cols: Option<u16>,
        #[serde(default)]
        rows: Option<u16>,
    },
    /// Stop forwarding output to this stream; the process keeps running.
    Detach,
    /// Cancel the operation of this stream (kills a foreground process).
    Cancel,
    /// List the processes the agent started that are running or not yet collected.
    ListProcesses,
    /// Send a signal to a process (and its process group).
    Signal { pid: u32, signal: i32 },
    /// Stream a file's contents back on [`crate::Channel::Output`].
    ReadFile { path: String },
    /// Write a file from the [`crate::Channel::Input`] bytes that follow; replaced
    /// atomically when the input ends.
    WriteFile {
        path: String,
        /// Permission bits of a newly created file; default 0o644.
        #[serde(default)]
        mode: Option<u32>,
        /// Owner of the new file; default the agent's default user.
        #[serde(default)]
        user: Option<String>,
    },
    /// List a directory.
    ListDir { path: String },
    /// Describe one path.
    Stat { path: String },
    /// Create a directory and its missing parents.
    Mkdir {
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Remove a file, or a directory with everything under it.
    Remove { path: String },
    /// Rename (move) a path.
    Rename { from: String, to: String },
    /// Grow the root filesystem to its disk's size (after the host grew the disk).
    ResizeRootfs,
    /// Connect to a TCP port on the guest's loopback and bridge it to this stream:
    /// [`Reply::Connected`], then input bytes go to the socket and the socket's bytes come
    /// back on the output channel (preview URLs and `sandbox proxy`; no guest network
    /// needed). Ends with `Done` once both directions are closed.
    ConnectPort { port: u16 },
    /// Start a process on a new pseudo-terminal (a login shell unless `command` is
    /// given): [`Reply::Started`], then terminal output on the output channel and input
    /// from the input channel; [`Request::Resize`] on the same stream resizes it. Ends
    /// with `Exited`.
    Pty(PtyRequest),
    /// Resize the terminal of this stream's PTY.
    Resize { cols: u16, rows: u16 },
    /// Watch a directory: [`Reply::Watching`], then one JSON [`FsEvent`] per line on the
    /// output channel until the host cancels.
    WatchDir {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// The guest's resource counters now.
    Metrics,
    /// The output a background process produced, as kept for logs (the last
    /// [`PROCESS_HISTORY_BYTES`] of it, whether or not a stream received it):
    /// [`Reply::ProcessOutput`]. An agent that predates it answers `unsupported`.
    ProcessOutput { pid: u32 },
}

/// Output of a background process an agent keeps for logs (older bytes go first).
pub const PROCESS_HISTORY_BYTES: usize = 128 * 1024;

/// A piece of a process's kept output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputPiece {
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The bytes, as UTF-8 (invalid sequences replaced).
    pub text: String,
    /// When it was produced (ms since the Unix epoch, guest clock).
    pub at_ms: u64,
}

/// A terminal to open: see [`Request::Pty`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PtyRequest {
    /// A shell command line; default the user's login shell.
    #[serde(default)]
    pub command: Option<String>,
    pub cols: u16,
    pub rows: u16,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub cwd: Option<String>,
}

/// A change in a watched directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvent {
    /// `create`, `write`, `remove`, `rename` or `chmod`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The path it happened to (for a rename, the new path).
    pub path: String,
    /// For a rename: the old path, if it was inside the watched tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Whether the path is a directory.
    #[serde(default)]
    pub dir: bool,
}

/// The guest's resource counters at one moment (cumulative counters since boot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMetrics {
    /// CPU time of all CPUs, busy and idle, in clock ticks (USER_HZ, 100 per second).
    pub cpu_total_ticks: u64,
    /// Of which idle (idle + iowait).
    pub cpu_idle_ticks: u64,
    pub cpus: u32,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub disk_total_bytes: u64,
    pub disk_used_bytes: u64,
    /// Bytes through every interface but loopback.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// Tasks (processes) running in the guest.
    pub tasks: u32,
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub command: Command,
    /// Extra environment variables (on top of PATH, HOME, USER, LANG).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; default `/workspace`.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as; default [`DEFAULT_USER`].
    #[serde(default)]
    pub user: Option<String>,
    /// Keep the process running when this stream goes away.
    #[serde(default)]
    pub background: bool,
    /// Whether the process gets a stdin pipe (else /dev/null).
    #[serde(default)]
    pub stdin: bool,
    /// Stream output to this stream. `false` starts it detached: the stream ends with
    /// `Detached` right after `Started`, and all output waits for an attach.
    #[serde(default = "attach_by_default")]
    pub attach: bool,
}

fn attach_by_default() -> bool {
    true
}

/// The user processes and files belong to unless a request names another.
pub const DEFAULT_USER: &str = "user";
/// The working directory processes start in unless a request names another.
pub const DEFAULT_CWD: &str = "/workspace";

/// A program and its arguments, or a shell command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Executed directly; `argv[0]` is looked up in PATH.
    Argv(Vec<String>),
    /// Run by `/bin/sh -c`.
    Shell(String),
}

/// Agent → host control messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Reply {
    /// Handshake answer.
    Hello {
        version: u32,
        agent_version: String,
        nonce: u64,
    },
    /// The process started (also the first reply to an attach).
    Started { pid: u32 },
    /// The process ended. Final.
    Exited(ExitStatus),
    /// The stream detached from a process that keeps running. Final.
    Detached,
    /// The operation succeeded. Final.
    Done {
        /// Bytes transferred, where that applies.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
    },
    /// Directory listing. Final.
    Entries { entries: Vec<FileInfo> },
    /// One path's description. Final.
    Stat { info: FileInfo },
    /// Process listing. Final.
    Processes { processes: Vec<ProcessInfo> },
    /// A background process's kept output, oldest first. Final.
    ProcessOutput { pieces: Vec<OutputPiece> },
    /// The operation failed. Final.
    Error(AgentError),
    /// A port tunnel is connected.
    Connected,
    /// A directory watch is in place.
    Watching,
    /// Resource counters. Final.
    Metrics(GuestMetrics),
}

impl Reply {
    /// Whether this reply ends its stream.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Reply::Hello { .. } | Reply::Started { .. } | Reply::Connected | Reply::Watching
        )
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// The signal that killed it, otherwise.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Kind of a filesystem entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

/// A filesystem entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// Target of a symlink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// A process the agent started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub command: Command,
    pub user: String,
    pub cwd: String,
    pub background: bool,
    /// Whether a stream currently receives its output.
    pub attached: bool,
    /// Set once it has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
}

/// Why an operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    InvalidArgument,
    UnknownUser,
    FrameTooLarge,
    UnsupportedVersion,
    Unsupported,
    Busy,
    Cancelled,
    Io,
}

/// A failed operation: a machine-readable code and a message for people that says what
/// to do instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct AgentError {
    pub code: ErrorCode,
    pub message: String,
}

impl AgentError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Maps an I/O error about `what` to the closest code.
    pub fn from_io(err: &std::io::Error, what: &str) -> Self {
        use std::io::ErrorKind as K;
        let code = match err.kind() {
            K::NotFound => ErrorCode::NotFound,
            K::PermissionDenied => ErrorCode::PermissionDenied,
            K::AlreadyExists => ErrorCode::AlreadyExists,
            K::NotADirectory => ErrorCode::NotADirectory,
            K::IsADirectory => ErrorCode::IsADirectory,
            K::InvalidInput => ErrorCode::InvalidArgument,
            _ => ErrorCode::Io,
        };
        Self::new(code, format!("{what}: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request::Exec(ExecRequest {
            command: Command::Shell("echo hi".into()),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            background: false,
            stdin: false,
            attach: true,
        });
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"op":"exec","command":{"shell":"echo hi"},"env":{},"cwd":null,"user":null,"background":false,"stdin":false,"attach":true}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<Request>(r#"{"op":"stat","path":"/","bogus":1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn only_hello_and_started_leave_a_stream_open() {
        assert!(!Reply::Started { pid: 1 }.is_final());
        assert!(Reply::Detached.is_final());
        assert!(Reply::Error(AgentError::new(ErrorCode::Io, "x")).is_final());
    }
}
