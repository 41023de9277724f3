//! Sandbox recording (seed 002, "Enable sandbox recording"): a sandbox created with
//! `recording: true` keeps a transcript of every command run through the data plane and
//! of every terminal session, as artifacts in the object store snapshots use.
//!
//! - Commands: one JSON-lines transcript (`commands.jsonl`): a `recording` header line,
//!   then per command one `start` object (`argv` or the shell line `cmd`, `cwd`, `user`,
//!   `background`, `time`), `output` objects (`stream`, `data` or `dataBase64`, `t`:
//!   seconds since its start) and one `exit` object (`exitCode`, `signal`,
//!   `durationMs`), or `detached` / `error` when its stream ended otherwise. Commands
//!   run at once interleave; `seq` (and `pid`) say whose line it is. A background
//!   command's output is recorded as it streams to whoever attaches.
//! - Terminals: one asciicast v2 file per session (`pty-<n>.cast`): the header (`width`,
//!   `height`, `timestamp`), then `[t, "o", text]` for output and `[t, "r",
//!   "COLSxROWS"]` for resizes. Keystrokes are not recorded: typed with echo off they
//!   are passwords, and what the terminal echoes is in its output.
//!
//! Transcripts are written as they stream, line by line, to files under
//! `<state>/recordings/<team>/<sandbox>/` (never kept in memory), and uploaded to the
//! store as parts of [`PART_BYTES`] plus a `meta.json` written last:
//! `recordings/<team>/<sandbox>/<recording ID>/{00000000, 00000001, …, meta.json}`. The
//! team is part of every key, and a caller only ever reads under its own team's prefix.
//! Uploads happen when the sandbox pauses, hibernates or ends, and before its recordings
//! are listed or downloaded while it runs here; a full part is uploaded once. A pool
//! manager that crashes loses nothing it wrote: the next start uploads the files of
//! sandboxes that no longer run here, and goes on appending to the others'.
//!
//! Bounded: a sandbox records at most [`MAX_RECORDED_BYTES`] (every transcript it made,
//! on every host, counted). Past it a transcript gets one marker (a `truncated` object,
//! or an asciicast `m` event) and nothing more is written, whatever the guest prints.

use super::Manager;
use crate::error::ApiError;
use crate::model::{iso8601, InternalState, SandboxRecord};
use agent_protocol::Command;
use api_model::{is_recording_id, is_sandbox_id};
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use storage::{ObjectStore, Store, StoreError};
use tracing::{info, warn};

/// The most one sandbox records, in bytes (its transcripts together).
pub const MAX_RECORDED_BYTES: u64 = 64 << 20;

/// The size of the parts a transcript is stored in: what one upload or one step of a
/// download holds in memory.
pub const PART_BYTES: u64 = 1 << 20;

/// The most transcripts one sandbox makes (each terminal session is one).
const MAX_TRANSCRIPTS: usize = 1024;

/// The most commands whose start is remembered for a later attach (background commands
/// that nobody attaches to would otherwise pile up).
const MAX_RUNNING: usize = 4096;

/// How long opening a recorder waits for the store's list of earlier recordings before
/// it names new ones without it: a slow store must not hold up a command.
const LIST_DEADLINE: Duration = Duration::from_secs(5);

/// The prefix of every recording key in the store.
const STORE_ROOT: &str = "recordings";

/// What a recording records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The commands transcript (JSON lines).
    Commands,
    /// One terminal session (asciicast v2).
    Pty,
}

impl Kind {
    /// The kind a (valid) recording ID names.
    fn of(id: &str) -> Self {
        if id.ends_with(".cast") {
            Kind::Pty
        } else {
            Kind::Commands
        }
    }

    /// The media type of its bytes.
    pub fn content_type(self) -> &'static str {
        match self {
            Kind::Commands => "application/x-ndjson",
            Kind::Pty => "application/x-asciicast",
        }
    }
}

/// What can go wrong with recordings.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// Not a name recordings are given.
    #[error("{0:?} is not a recording ID: they are commands.jsonl, commands-N.jsonl or pty-N.cast (GET /sandboxes/{{id}}/recordings lists them)")]
    InvalidId(String),
    /// No such recording of this sandbox.
    #[error("recording {0} does not exist (GET /sandboxes/{{id}}/recordings lists them)")]
    NotFound(String),
    /// The object store failed.
    #[error("the recording store: {0}")]
    Store(#[from] StoreError),
    /// A stored description that does not parse.
    #[error("recording description {key} is unreadable: {source}")]
    Corrupt {
        /// Its key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A local transcript file could not be read.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl From<RecordingError> for ApiError {
    fn from(e: RecordingError) -> Self {
        match &e {
            RecordingError::InvalidId(_) => {
                ApiError::bad_request(e.to_string()).with_details(json!({ "field": "recordingID" }))
            }
            RecordingError::NotFound(id) => ApiError::not_found("recording", id).with_details(
                json!({ "hint": "GET /sandboxes/{id}/recordings lists the sandbox's recordings" }),
            ),
            RecordingError::Store(_) => {
                ApiError::storage(format!("{e}; check the snapshot store and retry"))
            }
            RecordingError::Corrupt { .. } | RecordingError::Io { .. } => {
                ApiError::internal(e.to_string())
            }
        }
    }
}

/// A stored recording's description (`meta.json`, written after its parts).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(rename = "recordingID")]
    recording_id: String,
    kind: Kind,
    /// Bytes of the recording the stored parts hold (the last part may hold more: a
    /// reader stops here).
    size_bytes: u64,
    part_bytes: u64,
    created_at_ms: i64,
    truncated: bool,
}

/// A recording as callers see it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordingView {
    /// `commands.jsonl` (`commands-N.jsonl` after a move) or `pty-N.cast`.
    #[serde(rename = "recordingID")]
    pub recording_id: String,
    /// Commands or a terminal session.
    pub kind: Kind,
    /// Its size as stored.
    pub size_bytes: u64,
    /// When it began (RFC 3339).
    pub created_at: String,
    /// It reached the sandbox's cap and ends with a marker.
    pub truncated: bool,
}

impl From<&Meta> for RecordingView {
    fn from(m: &Meta) -> Self {
        Self {
            recording_id: m.recording_id.clone(),
            kind: m.kind,
            size_bytes: m.size_bytes,
            created_at: iso8601(m.created_at_ms),
            truncated: m.truncated,
        }
    }
}

/// A recording's bytes, streamed from the store part by part.
pub struct Download {
    /// What it records (its media type).
    pub kind: Kind,
    /// Its length: the body's `Content-Length`.
    pub size_bytes: u64,
    /// Its bytes; an error mid-way ends the body short of `size_bytes`.
    pub body: futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>,
}

/// The key segment of a team: its ID when that is a plain segment, else a hash of it
/// in a namespace (`h-`) no plain segment uses, so two teams never share one.
fn team_segment(team: &str) -> String {
    let plain = !team.is_empty()
        && team.len() <= 64
        && !team.starts_with('.')
        && !team.starts_with("h-")
        && team
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        return team.to_string();
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(team.as_bytes());
    let hex = hex::encode(&digest[..16]);
    format!("h-{hex}")
}

/// The store prefix of a sandbox's recordings (ends with `/`).
fn store_prefix(team_segment: &str, sandbox: &str) -> String {
    format!("{STORE_ROOT}/{team_segment}/{sandbox}/")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Seconds since `since`, to the microsecond (asciicast and `t` offsets).
fn offset(since: Instant) -> f64 {
    since.elapsed().as_micros() as f64 / 1e6
}

fn line(v: &serde_json::Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("json");
    out.push(b'\n');
    out
}

/// Bytes as text for an asciicast event: a terminal's UTF-8 split across reads is
/// joined (an incomplete sequence waits for the next read); invalid bytes become U+FFFD.
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn decode(&mut self, bytes: &[u8]) -> String {
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(bytes);
        let mut out = String::with_capacity(buf.len());
        let mut rest = &buf[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(good).expect("checked"));
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &bad[n..];
                        }
                        None => {
                            self.pending = bad.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// What is left at the end: an incomplete sequence, as U+FFFD.
    fn finish(&mut self) -> Option<String> {
        (!std::mem::take(&mut self.pending).is_empty()).then(|| "\u{FFFD}".to_string())
    }
}

/// One transcript file of a recorder.
struct Transcript {
    kind: Kind,
    path: PathBuf,
    /// Open while it is written (the commands transcript, a live terminal).
    file: Option<std::fs::File>,
    /// Bytes written: always a whole number of lines.
    len: u64,
    created_ms: i64,
    truncated: bool,
    /// Bytes the store's `meta.json` says are stored.
    uploaded_len: u64,
    /// Parts of `PART_BYTES` in the store that are full (never uploaded again).
    uploaded_parts: u64,
}

impl Transcript {
    /// The marker that ends a transcript at the cap.
    fn marker(&self, t: f64) -> Vec<u8> {
        let why = format!(
            "recording truncated: this sandbox recorded its limit of {MAX_RECORDED_BYTES} bytes"
        );
        match self.kind {
            Kind::Commands => line(&json!({
                "type": "truncated",
                "time": iso8601(now_ms()),
                "limitBytes": MAX_RECORDED_BYTES,
                "message": why,
            })),
            Kind::Pty => line(&json!([t, "m", why])),
        }
    }
}

/// A command the recorder saw start: what an attach to it records under.
#[derive(Clone, Copy)]
struct Running {
    seq: u64,
    started: Instant,
}

struct State {
    /// Bytes recorded, against [`MAX_RECORDED_BYTES`] (markers not counted).
    recorded: u64,
    /// Finished: nothing more is written.
    closed: bool,
    transcripts: BTreeMap<String, Transcript>,
    /// The ID of the commands transcript (made at the first command).
    commands: String,
    next_pty: u64,
    next_seq: u64,
    running: HashMap<u32, Running>,
}

impl State {
    /// Appends one line to transcript `id`, within the cap: past it the transcript gets
    /// its marker once. `t` is the line's time offset (for a terminal's marker).
    fn write(&mut self, id: &str, t: f64, bytes: &[u8]) {
        if self.closed {
            return;
        }
        let over = self.recorded + bytes.len() as u64 > MAX_RECORDED_BYTES;
        let Some(transcript) = self.transcripts.get_mut(id) else {
            return;
        };
        if transcript.truncated || transcript.file.is_none() {
            return;
        }
        let marker;
        let (bytes, counted) = if over {
            transcript.truncated = true;
            marker = transcript.marker(t);
            (&marker[..], false)
        } else {
            (bytes, true)
        };
        let file = transcript.file.as_mut().expect("checked");
        match file.write_all(bytes) {
            Ok(()) => {
                transcript.len += bytes.len() as u64;
                if counted {
                    self.recorded += bytes.len() as u64;
                }
            }
            Err(e) => {
                // A full disk, most likely: the transcript stays whole up to here.
                warn!(path = %transcript.path.display(), error = %e, "writing a recording failed; it ends here");
                let _ = file.set_len(transcript.len);
                transcript.truncated = true;
                transcript.file = None;
            }
        }
    }

    /// Makes transcript `id` in `dir` with its first line; false if it cannot be made.
    fn create(&mut self, dir: &Path, id: &str, header: &[u8]) -> bool {
        if self.closed || self.transcripts.len() >= MAX_TRANSCRIPTS {
            return false;
        }
        let path = dir.join(id);
        let opened = std::fs::create_dir_all(dir).and_then(|()| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
        });
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "a recording could not be made");
                return false;
            }
        };
        self.transcripts.insert(
            id.to_string(),
            Transcript {
                kind: Kind::of(id),
                path,
                file: Some(file),
                len: 0,
                created_ms: now_ms(),
                truncated: false,
                uploaded_len: 0,
                uploaded_parts: 0,
            },
        );
        // The header is written whatever the cap (a transcript without one is not
        // one); a transcript made past the cap ends with its marker at once.
        let t = self.transcripts.get_mut(id).expect("inserted");
        let file = t.file.as_mut().expect("opened");
        if let Err(e) = file.write_all(header) {
            warn!(path = %t.path.display(), error = %e, "a recording could not be made");
            let _ = std::fs::remove_file(&t.path);
            self.transcripts.remove(id);
            return false;
        }
        t.len = header.len() as u64;
        self.recorded += t.len;
        if self.recorded > MAX_RECORDED_BYTES {
            self.force_marker(id);
        }
        true
    }

    /// Ends transcript `id` with its marker now (it was made past the cap).
    fn force_marker(&mut self, id: &str) {
        let Some(t) = self.transcripts.get_mut(id) else {
            return;
        };
        if t.truncated {
            return;
        }
        let marker = t.marker(0.0);
        if let Some(f) = t.file.as_mut() {
            if f.write_all(&marker).is_ok() {
                t.len += marker.len() as u64;
            }
        }
        t.truncated = true;
    }
}

/// The recorder of one sandbox on this host: its transcripts and what of them is stored.
pub struct Recorder {
    sandbox: String,
    dir: PathBuf,
    prefix: String,
    store: Store,
    state: Mutex<State>,
    /// One upload at a time: each starts where the previous one ended.
    uploading: tokio::sync::Mutex<()>,
}

/// How a command was asked for, for its `start` line.
pub struct CommandStart<'a> {
    /// Its process ID (none: it never started).
    pub pid: Option<u32>,
    /// The program and its arguments, or the shell line.
    pub command: &'a Command,
    /// The working directory asked for (none: the default, `/workspace`).
    pub cwd: Option<&'a str>,
    /// The user asked for (none: the default, `user`).
    pub user: Option<&'a str>,
    /// Started detached, its output kept for an attach.
    pub background: bool,
}

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The commands transcript, made (with its header) if this is the first command.
    fn commands_transcript(&self, st: &mut State) -> Option<String> {
        let id = st.commands.clone();
        if st.transcripts.contains_key(&id) {
            return Some(id);
        }
        let header = line(&json!({
            "type": "recording",
            "version": 1,
            "sandboxID": self.sandbox,
            "startedAt": iso8601(now_ms()),
        }));
        st.create(&self.dir, &id, &header).then_some(id)
    }

    /// Records a command's start; returns what records the rest of its life.
    pub fn command_started(self: &Arc<Self>, c: CommandStart<'_>) -> CommandLog {
        let started = Instant::now();
        let mut st = self.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        if let Some(pid) = c.pid {
            if st.running.len() < MAX_RUNNING {
                st.running.insert(pid, Running { seq, started });
            }
        }
        let mut start = json!({
            "type": "start",
            "seq": seq,
            "pid": c.pid,
            "time": iso8601(now_ms()),
            "cwd": c.cwd,
            "user": c.user,
            "background": c.background,
        });
        match c.command {
            Command::Argv(argv) => start["argv"] = json!(argv),
            Command::Shell(cmd) => start["cmd"] = json!(cmd),
        }
        if let Some(id) = self.commands_transcript(&mut st) {
            st.write(&id, 0.0, &line(&start));
        }
        CommandLog {
            recorder: self.clone(),
            seq: Some(seq),
            pid: c.pid,
            started,
        }
    }

    /// What records a command someone attaches to: under the `seq` it started with if
    /// this recorder saw it start.
    pub fn command_attached(self: &Arc<Self>, pid: u32) -> CommandLog {
        let known = self.lock().running.get(&pid).copied();
        CommandLog {
            recorder: self.clone(),
            seq: known.map(|r| r.seq),
            pid: Some(pid),
            started: known.map_or_else(Instant::now, |r| r.started),
        }
    }

    /// Starts the recording of a terminal session of `cols` × `rows` running `command`
    /// (the login shell if none). None if the sandbox made as many as it may.
    pub fn pty_opened(
        self: &Arc<Self>,
        cols: u16,
        rows: u16,
        command: Option<&str>,
    ) -> Option<PtyLog> {
        let mut st = self.lock();
        let n = st.next_pty;
        let id = format!("pty-{n}.cast");
        let mut header = json!({
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": now_ms() / 1000,
            "title": format!("{} terminal {n}", self.sandbox),
        });
        if let Some(c) = command {
            header["command"] = json!(c);
        }
        if !st.create(&self.dir, &id, &line(&header)) {
            return None;
        }
        st.next_pty += 1;
        Some(PtyLog {
            recorder: self.clone(),
            id,
            started: Instant::now(),
            output: Utf8Stream::default(),
        })
    }

    /// Ends recording: nothing more is written, and the files are closed.
    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        for t in st.transcripts.values_mut() {
            t.file = None;
        }
    }

    /// Uploads what was written since the last upload: the parts from the first one not
    /// yet full in the store, then each transcript's `meta.json`.
    pub async fn upload(&self) -> Result<(), RecordingError> {
        let _one = self.uploading.lock().await;
        struct Pending {
            id: String,
            path: PathBuf,
            meta: Meta,
            from_part: u64,
        }
        let pending: Vec<Pending> = self
            .lock()
            .transcripts
            .iter()
            .filter(|(_, t)| t.len != t.uploaded_len)
            .map(|(id, t)| Pending {
                id: id.clone(),
                path: t.path.clone(),
                // Lines are written whole under the lock: `len` ends one.
                meta: Meta {
                    recording_id: id.clone(),
                    kind: t.kind,
                    size_bytes: t.len,
                    part_bytes: PART_BYTES,
                    created_at_ms: t.created_ms,
                    truncated: t.truncated,
                },
                from_part: t.uploaded_parts,
            })
            .collect();
        for p in pending {
            let len = p.meta.size_bytes;
            for part in p.from_part..len.div_ceil(PART_BYTES) {
                let start = part * PART_BYTES;
                let end = (start + PART_BYTES).min(len);
                let bytes = read_range(&p.path, start, end).await?;
                self.store
                    .put(&format!("{}{}/{part:08}", self.prefix, p.id), bytes)
                    .await?;
            }
            let meta = serde_json::to_vec(&p.meta).expect("json");
            self.store
                .put(&format!("{}{}/meta.json", self.prefix, p.id), meta.into())
                .await?;
            if let Some(t) = self.lock().transcripts.get_mut(&p.id) {
                t.uploaded_len = len;
                t.uploaded_parts = len / PART_BYTES;
            }
        }
        Ok(())
    }
}

/// Bytes `start..end` of a file, read on a blocking thread.
async fn read_range(path: &Path, start: u64, end: u64) -> Result<Bytes, RecordingError> {
    let owned = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(&owned)?;
        let mut buf = vec![0; (end - start) as usize];
        file.read_exact_at(&mut buf, start)?;
        Ok(buf)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    read.map(Bytes::from).map_err(|source| RecordingError::Io {
        op: "reading",
        path: path.to_path_buf(),
        source,
    })
}

/// Records one command's stream (its start was recorded by [`Recorder::command_started`]).
pub struct CommandLog {
    recorder: Arc<Recorder>,
    seq: Option<u64>,
    pid: Option<u32>,
    started: Instant,
}

impl CommandLog {
    fn event(&self, mut v: serde_json::Value) {
        let t = offset(self.started);
        v["seq"] = json!(self.seq);
        v["pid"] = json!(self.pid);
        v["t"] = json!(t);
        let recorder = &self.recorder;
        let mut st = recorder.lock();
        if let Some(id) = recorder.commands_transcript(&mut st) {
            st.write(&id, t, &line(&v));
        }
    }

    /// Output on `stream` (`stdout` or `stderr`): text if it is UTF-8, else base64.
    pub fn output(&self, stream: &str, bytes: &[u8]) {
        let v = match std::str::from_utf8(bytes) {
            Ok(text) => json!({ "type": "output", "stream": stream, "data": text }),
            Err(_) => json!({
                "type": "output",
                "stream": stream,
                "dataBase64": base64::engine::general_purpose::STANDARD.encode(bytes),
            }),
        };
        self.event(v);
    }

    /// It ended.
    pub fn exited(&self, code: Option<i32>, signal: Option<i32>) {
        if let Some(pid) = self.pid {
            self.recorder.lock().running.remove(&pid);
        }
        self.event(json!({
            "type": "exit",
            "exitCode": code,
            "signal": signal,
            "durationMs": self.started.elapsed().as_millis() as u64,
        }));
    }

    /// Its stream ended with the command still running (detached, or taken over).
    pub fn detached(&self) {
        self.event(json!({ "type": "detached" }));
    }

    /// Its stream (or its start) failed.
    pub fn failed(&self, message: &str) {
        self.event(json!({ "type": "error", "message": message }));
    }
}

/// Records one terminal session (asciicast v2 events); the file closes when it drops.
pub struct PtyLog {
    recorder: Arc<Recorder>,
    id: String,
    started: Instant,
    output: Utf8Stream,
}

impl PtyLog {
    fn event(&self, code: &str, data: &str) {
        let t = offset(self.started);
        self.recorder
            .lock()
            .write(&self.id, t, &line(&json!([t, code, data])));
    }

    /// Bytes the terminal wrote.
    pub fn output(&mut self, bytes: &[u8]) {
        let text = self.output.decode(bytes);
        if !text.is_empty() {
            self.event("o", &text);
        }
    }

    /// The terminal was resized.
    pub fn resized(&mut self, cols: u16, rows: u16) {
        self.event("r", &format!("{cols}x{rows}"));
    }
}

impl Drop for PtyLog {
    fn drop(&mut self) {
        if let Some(rest) = self.output.finish() {
            self.event("o", &rest);
        }
        // The session is over: its file is complete (the store gets it at the next
        // upload), and a sandbox with many sessions holds no descriptor for each.
        if let Some(t) = self.recorder.lock().transcripts.get_mut(&self.id) {
            t.file = None;
        }
    }
}

type Opening = Arc<tokio::sync::OnceCell<Arc<Recorder>>>;

/// Every recorder of this host, and the store recordings go to.
#[derive(Clone)]
pub struct Recordings {
    root: PathBuf,
    store: Store,
    /// By sandbox ID; each opened once (its local files read, the store listed).
    open: Arc<Mutex<HashMap<String, Opening>>>,
}

impl Recordings {
    /// Recordings under `<state_dir>/recordings`, stored in `store`.
    pub fn new(state_dir: &Path, store: Store) -> Self {
        Self {
            root: state_dir.join("recordings"),
            store,
            open: Arc::default(),
        }
    }

    fn dir(&self, team_segment: &str, sandbox: &str) -> PathBuf {
        self.root.join(team_segment).join(sandbox)
    }

    /// The recorder of sandbox `r` (None unless it is recorded), opened at its first
    /// use on this host.
    pub async fn recorder(&self, r: &SandboxRecord) -> Option<Arc<Recorder>> {
        if !r.recording || !is_sandbox_id(&r.id) {
            return None;
        }
        let cell = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(r.id.clone())
            .or_default()
            .clone();
        let seg = team_segment(&r.team_id);
        Some(
            cell.get_or_init(|| self.open_recorder(&seg, &r.id))
                .await
                .clone(),
        )
    }

    /// The recorder of a sandbox if one is open here.
    fn opened(&self, sandbox: &str) -> Option<Arc<Recorder>> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sandbox)
            .and_then(|c| c.get().cloned())
    }

    /// Opens a sandbox's recorder: it goes on with the transcripts a previous run of
    /// this daemon left (a restart), and names new ones after every recording the store
    /// holds (earlier hosts' or runs'), so none is ever overwritten.
    async fn open_recorder(&self, team_segment: &str, sandbox: &str) -> Arc<Recorder> {
        let dir = self.dir(team_segment, sandbox);
        let prefix = store_prefix(team_segment, sandbox);
        let local = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || read_local(&dir))
                .await
                .unwrap_or_default()
        };
        let stored = match tokio::time::timeout(LIST_DEADLINE, list_metas(&self.store, &prefix))
            .await
        {
            Ok(Ok(metas)) => Some(metas),
            Ok(Err(e)) => {
                warn!(sandbox, error = %e, "listing earlier recordings failed; new ones get fresh numbers");
                None
            }
            Err(_) => {
                warn!(
                    sandbox,
                    "listing earlier recordings took too long; new ones get fresh numbers"
                );
                None
            }
        };
        let mut transcripts = BTreeMap::new();
        let mut recorded = 0;
        for (id, mut t) in local {
            if let Some(m) = stored.iter().flatten().find(|m| m.recording_id == id) {
                // Stored before the restart: only what came after goes up again.
                if m.size_bytes <= t.len {
                    t.uploaded_len = m.size_bytes;
                    t.uploaded_parts = m.size_bytes / PART_BYTES;
                }
            }
            recorded += t.len;
            transcripts.insert(id, t);
        }
        let mut taken: Vec<String> = transcripts.keys().cloned().collect();
        for m in stored.iter().flatten() {
            if !transcripts.contains_key(&m.recording_id) {
                recorded += m.size_bytes;
                taken.push(m.recording_id.clone());
            }
        }
        let number = |id: &str| -> u64 {
            id.trim_start_matches("commands")
                .trim_start_matches("pty")
                .trim_start_matches('-')
                .split('.')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1)
        };
        let (commands, next_pty) = if stored.is_none() {
            // Without the store's list, numbers no other run is likely to have used.
            let base = rand::Rng::gen_range(&mut rand::thread_rng(), 1_000_000..1_000_000_000u64);
            (format!("commands-{base}.jsonl"), base)
        } else {
            // The commands transcript this host was writing goes on; else the first
            // name not taken.
            let local_commands = transcripts
                .iter()
                .filter(|(_, t)| t.kind == Kind::Commands)
                .map(|(id, _)| id.clone())
                .max_by_key(|id| number(id));
            let commands = local_commands.unwrap_or_else(|| {
                (1..)
                    .map(|n| {
                        if n == 1 {
                            "commands.jsonl".to_string()
                        } else {
                            format!("commands-{n}.jsonl")
                        }
                    })
                    .find(|id| !taken.contains(id))
                    .expect("a free name")
            });
            let next_pty = taken
                .iter()
                .filter(|id| Kind::of(id) == Kind::Pty)
                .map(|id| number(id))
                .max()
                .unwrap_or(0)
                + 1;
            (commands, next_pty)
        };
        // The commands transcript a previous run wrote is appended to; finished terminal
        // sessions are not.
        for (id, t) in transcripts.iter_mut() {
            if *id == commands {
                t.file = std::fs::OpenOptions::new().append(true).open(&t.path).ok();
            }
        }
        if !transcripts.is_empty() {
            info!(
                sandbox,
                transcripts = transcripts.len(),
                "recording continues from the files a previous run left"
            );
        }
        Arc::new(Recorder {
            sandbox: sandbox.to_string(),
            dir,
            prefix,
            store: self.store.clone(),
            state: Mutex::new(State {
                recorded,
                closed: false,
                transcripts,
                commands,
                next_pty,
                next_seq: 1,
                running: HashMap::new(),
            }),
            uploading: tokio::sync::Mutex::new(()),
        })
    }

    /// Uploads what sandbox `sandbox` recorded so far, if it records here (a pause:
    /// the transcripts go on when it resumes).
    pub async fn flush(&self, sandbox: &str) {
        if let Some(recorder) = self.opened(sandbox) {
            if let Err(e) = recorder.upload().await {
                warn!(sandbox, error = %e, "uploading the recording failed; it is kept on this host and uploaded later");
            }
        }
    }

    /// Ends sandbox `r`'s recording on this host (it ended, or hibernated and may resume
    /// anywhere): everything is uploaded and the local files go. If the upload fails
    /// they stay, and the next start of this daemon uploads them.
    pub async fn finish(&self, r: &SandboxRecord) {
        let seg = team_segment(&r.team_id);
        let dir = self.dir(&seg, &r.id);
        let recorder = match self.opened(&r.id) {
            Some(recorder) => recorder,
            None if r.recording && dir.exists() => self.open_recorder(&seg, &r.id).await,
            None => return,
        };
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&r.id);
        recorder.close();
        match recorder.upload().await {
            Ok(()) => {
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            }
            Err(e) => {
                warn!(sandbox = %r.id, error = %e, "uploading the recording failed; it is kept on this host and uploaded at the next start")
            }
        }
    }

    /// After a start: uploads (and then removes) the recordings a previous run left of
    /// sandboxes that no longer record here; `keep` names the ones that still do.
    pub async fn upload_leftovers(&self, keep: impl Fn(&str) -> bool) {
        let Ok(teams) = std::fs::read_dir(&self.root) else {
            return;
        };
        for team in teams.flatten() {
            let seg = team.file_name().to_string_lossy().into_owned();
            for entry in std::fs::read_dir(team.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let sandbox = entry.file_name().to_string_lossy().into_owned();
                if !is_sandbox_id(&sandbox) || keep(&sandbox) {
                    continue;
                }
                let recorder = self.open_recorder(&seg, &sandbox).await;
                recorder.close();
                match recorder.upload().await {
                    Ok(()) => {
                        info!(sandbox, "uploaded a recording a previous run left");
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                    Err(e) => {
                        warn!(sandbox, error = %e, "uploading a recording a previous run left failed; retried at the next start")
                    }
                }
            }
            // Gone if it is empty now.
            let _ = std::fs::remove_dir(team.path());
        }
    }

    /// The recordings stored of `sandbox` of `team`, oldest first.
    pub async fn list(
        &self,
        team: &str,
        sandbox: &str,
    ) -> Result<Vec<RecordingView>, RecordingError> {
        let prefix = store_prefix(&team_segment(team), sandbox);
        Ok(list_metas(&self.store, &prefix)
            .await?
            .iter()
            .map(RecordingView::from)
            .collect())
    }

    /// Recording `id` of `sandbox` of `team`, streamed from the store.
    pub async fn download(
        &self,
        team: &str,
        sandbox: &str,
        id: &str,
    ) -> Result<Download, RecordingError> {
        if !is_recording_id(id) {
            return Err(RecordingError::InvalidId(id.to_string()));
        }
        let prefix = format!("{}{id}/", store_prefix(&team_segment(team), sandbox));
        let meta = match read_meta(&self.store, &format!("{prefix}meta.json")).await {
            Err(RecordingError::Store(StoreError::NotFound(_))) => {
                return Err(RecordingError::NotFound(id.to_string()))
            }
            other => other?,
        };
        let store = self.store.clone();
        let size = meta.size_bytes;
        // Part by part: at most one part in memory, whatever the recording's size.
        let body = futures::stream::unfold((0u64, size), move |(part, left)| {
            let (store, prefix) = (store.clone(), prefix.clone());
            async move {
                if left == 0 {
                    return None;
                }
                let key = format!("{prefix}{part:08}");
                let chunk = match store.get(&key).await {
                    Ok(bytes) if !bytes.is_empty() => {
                        bytes.slice(..(bytes.len() as u64).min(left) as usize)
                    }
                    Ok(_) => {
                        let e = std::io::Error::other(format!("recording part {key} is empty"));
                        return Some((Err(e), (part, 0)));
                    }
                    Err(e) => return Some((Err(std::io::Error::other(e.to_string())), (part, 0))),
                };
                let left = left - chunk.len() as u64;
                Some((Ok(chunk), (part + 1, left)))
            }
        });
        Ok(Download {
            kind: meta.kind,
            size_bytes: size,
            body: Box::pin(body),
        })
    }
}

async fn read_meta(store: &Store, key: &str) -> Result<Meta, RecordingError> {
    let bytes = store.get(key).await?;
    let meta: Meta = serde_json::from_slice(&bytes).map_err(|source| RecordingError::Corrupt {
        key: key.to_string(),
        source,
    })?;
    if meta.part_bytes == 0 || !is_recording_id(&meta.recording_id) {
        return Err(RecordingError::Corrupt {
            key: key.to_string(),
            source: serde::de::Error::custom("invalid partBytes or recordingID"),
        });
    }
    Ok(meta)
}

/// The descriptions of the recordings under `prefix`, oldest first.
async fn list_metas(store: &Store, prefix: &str) -> Result<Vec<Meta>, RecordingError> {
    let mut metas = Vec::new();
    for key in store.list(prefix).await? {
        let Some(id) = key
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("/meta.json"))
        else {
            continue;
        };
        if !is_recording_id(id) {
            continue;
        }
        match read_meta(store, &key).await {
            Ok(m) => metas.push(m),
            // Deleted between the list and the read.
            Err(RecordingError::Store(StoreError::NotFound(_))) => {}
            Err(e) => return Err(e),
        }
    }
    metas.sort_by(|a, b| {
        (a.created_at_ms, &a.recording_id).cmp(&(b.created_at_ms, &b.recording_id))
    });
    Ok(metas)
}

/// The transcripts a previous run of this daemon left in `dir`, each cut back to its
/// last whole line (a crash may have cut the last one short).
fn read_local(dir: &Path) -> Vec<(String, Transcript)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        if !is_recording_id(&id) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path);
        let (len, created_ms, truncated) = match opened.and_then(|f| {
            let len = whole_lines(&f)?;
            f.set_len(len)?;
            Ok((len, first_line_time(&f), ends_with_marker(&f, len)))
        }) {
            Ok(found) => found,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "a recording file could not be read; left out");
                continue;
            }
        };
        out.push((
            id.clone(),
            Transcript {
                kind: Kind::of(&id),
                path,
                file: None,
                len,
                created_ms: created_ms.unwrap_or_else(now_ms),
                truncated,
                uploaded_len: 0,
                uploaded_parts: 0,
            },
        ));
    }
    out
}

/// The length of `file` up to and including its last newline.
fn whole_lines(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut end = file.metadata()?.len();
    let mut buf = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Whether a transcript's last line (ending at `len`) is the cap's marker: a
/// `truncated` object or an asciicast `m` event (guest bytes are only ever a string
/// inside another line, so they cannot pass for one).
fn ends_with_marker(file: &std::fs::File, len: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let start = len.saturating_sub(4096);
    let mut buf = vec![0u8; (len - start) as usize];
    if len == 0 || file.read_exact_at(&mut buf, start).is_err() {
        return false;
    }
    let body = &buf[..buf.len() - 1];
    let last = body.rsplit(|b| *b == b'\n').next().unwrap_or_default();
    match serde_json::from_slice::<serde_json::Value>(last) {
        Ok(v) => v["type"] == "truncated" || v[1] == "m",
        Err(_) => false,
    }
}

/// When a transcript began, from its first line: a commands header's `startedAt`, or an
/// asciicast header's `timestamp`.
fn first_line_time(file: &std::fs::File) -> Option<i64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    let n = file.read_at(&mut buf, 0).ok()?;
    let first = buf[..n].split(|b| *b == b'\n').next()?;
    let v: serde_json::Value = serde_json::from_slice(first).ok()?;
    if let Some(at) = v["startedAt"].as_str() {
        return chrono::DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|t| t.timestamp_millis());
    }
    v["timestamp"].as_i64().map(|s| s * 1000)
}

impl Manager {
    /// The record of sandbox `id` if it is `team`'s (it may be deleted); before the
    /// caller reads its recordings, what a sandbox recording here wrote so far is
    /// uploaded. An ID that cannot be a sandbox's is a 404 without a look anywhere.
    async fn recorded_sandbox(
        &self,
        team: &str,
        id: &str,
    ) -> Result<Option<SandboxRecord>, ApiError> {
        if !is_sandbox_id(id) {
            return Err(ApiError::not_found("sandbox", id));
        }
        let record = self.catalog.sandbox(id)?.filter(|r| r.team_id == team);
        if let Some(r) = &record {
            let here = r.state == InternalState::Active
                || (r.state == InternalState::Stopped && r.hibernated.is_none());
            if here {
                if let Some(recorder) = self.recordings.recorder(r).await {
                    if let Err(e) = recorder.upload().await {
                        warn!(sandbox = %id, error = %e, "uploading the recording before a read failed; the stored part is answered");
                    }
                }
            }
        }
        Ok(record)
    }

    /// The recordings of sandbox `id` of `team` (running, paused or deleted). Another
    /// team's sandbox, or one that never existed, is a 404; one without recording has
    /// none. A record already pruned still answers from the store (the key has the team).
    pub async fn list_recordings(
        &self,
        team: &str,
        id: &str,
    ) -> Result<Vec<RecordingView>, ApiError> {
        let record = self.recorded_sandbox(team, id).await?;
        let list = self.recordings.list(team, id).await?;
        if record.is_none() && list.is_empty() {
            return Err(ApiError::not_found("sandbox", id));
        }
        Ok(list)
    }

    /// Recording `recording` of sandbox `id` of `team`, streamed.
    pub async fn recording(
        &self,
        team: &str,
        id: &str,
        recording: &str,
    ) -> Result<Download, ApiError> {
        // Checked before anything is looked up: no other name reaches the store.
        if !is_recording_id(recording) {
            return Err(RecordingError::InvalidId(recording.to_string()).into());
        }
        let record = self.recorded_sandbox(team, id).await?;
        match self.recordings.download(team, id, recording).await {
            Err(RecordingError::NotFound(_)) if record.is_none() => {
                Err(ApiError::not_found("sandbox", id))
            }
            other => other.map_err(ApiError::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> Store {
        Store::local(storage::LocalStore::open(dir.join("store")).unwrap())
    }

    fn record(team: &str) -> SandboxRecord {
        SandboxRecord {
            recording: true,
            ..SandboxRecord::fresh(team, "base".into(), Default::default(), 60, 0)
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "nullspace-recording-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    async fn fetch(recordings: &Recordings, team: &str, sandbox: &str, id: &str) -> Vec<u8> {
        use futures::StreamExt;
        let mut d = recordings.download(team, sandbox, id).await.unwrap();
        let mut out = Vec::new();
        while let Some(chunk) = d.body.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(out.len() as u64, d.size_bytes);
        out
    }

    #[test]
    fn split_utf8_is_joined_and_garbage_replaced() {
        let mut s = Utf8Stream::default();
        let euro = "€".as_bytes();
        assert_eq!(s.decode(&euro[..1]), "");
        assert_eq!(s.decode(&euro[1..]), "€");
        assert_eq!(s.decode(b"a\xffb"), "a\u{FFFD}b");
        assert_eq!(s.decode(&euro[..2]), "");
        assert_eq!(s.finish().as_deref(), Some("\u{FFFD}"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn team_segments_are_plain_or_hashed_apart() {
        assert_eq!(team_segment("team-0123abcd"), "team-0123abcd");
        for odd in ["..", ".x", "a/b", "", "h-abc"] {
            let seg = team_segment(odd);
            assert!(seg.starts_with("h-") && seg.len() == 34, "{odd}: {seg}");
        }
        assert_ne!(team_segment("a/b"), team_segment("a b"));
    }

    #[tokio::test]
    async fn commands_and_terminals_are_recorded_uploaded_and_listed_per_team() {
        let dir = scratch("basic");
        let recordings = Recordings::new(&dir, store(&dir));
        let r = record("team-a");
        let rec = recordings.recorder(&r).await.unwrap();
        let cmd = Command::Argv(vec!["sh".into(), "-c".into(), "echo hi".into()]);
        let log = rec.command_started(CommandStart {
            pid: Some(7),
            command: &cmd,
            cwd: Some("/tmp"),
            user: None,
            background: false,
        });
        log.output("stdout", b"hi\n");
        log.output("stderr", b"\xff\xfe");
        log.exited(Some(3), None);
        let mut pty = rec.pty_opened(80, 24, None).unwrap();
        pty.output("€".as_bytes());
        pty.resized(100, 30);
        drop(pty);
        recordings.finish(&r).await;
        assert!(!recordings.dir(&team_segment("team-a"), &r.id).exists());

        let list = recordings.list("team-a", &r.id).await.unwrap();
        let ids: Vec<_> = list
            .iter()
            .map(|v| (v.recording_id.as_str(), v.kind))
            .collect();
        assert_eq!(
            ids,
            [
                ("commands.jsonl", Kind::Commands),
                ("pty-1.cast", Kind::Pty)
            ]
        );
        // Another team reads under its own prefix: nothing.
        assert!(recordings.list("team-b", &r.id).await.unwrap().is_empty());
        assert!(matches!(
            recordings.download("team-b", &r.id, "commands.jsonl").await,
            Err(RecordingError::NotFound(_))
        ));
        assert!(matches!(
            recordings.download("team-a", &r.id, "../meta.json").await,
            Err(RecordingError::InvalidId(_))
        ));

        let text =
            String::from_utf8(fetch(&recordings, "team-a", &r.id, "commands.jsonl").await).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["type"], "recording");
        assert_eq!(lines[1]["type"], "start");
        assert_eq!(lines[1]["argv"], json!(["sh", "-c", "echo hi"]));
        assert_eq!(lines[1]["cwd"], "/tmp");
        assert_eq!(lines[2]["data"], "hi\n");
        assert_eq!(lines[3]["dataBase64"], "//4=");
        assert_eq!(lines[4]["type"], "exit");
        assert_eq!(lines[4]["exitCode"], 3);
        assert!(lines.iter().skip(1).all(|l| l["seq"] == 1));

        let cast =
            String::from_utf8(fetch(&recordings, "team-a", &r.id, "pty-1.cast").await).unwrap();
        let events: Vec<serde_json::Value> = cast
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events[0]["version"], 2);
        assert_eq!(
            (events[0]["width"].as_u64(), events[0]["height"].as_u64()),
            (Some(80), Some(24))
        );
        assert_eq!(events[1][1], "o");
        assert_eq!(events[1][2], "€");
        assert_eq!(events[2][1], "r", "no keystrokes: {events:?}");
        assert_eq!(events[2][2], "100x30");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_flood_stops_at_the_cap_with_one_marker_and_streams_back_in_parts() {
        let dir = scratch("cap");
        let recordings = Recordings::new(&dir, store(&dir));
        let r = record("team-a");
        let rec = recordings.recorder(&r).await.unwrap();
        let cmd = Command::Shell("yes".into());
        let log = rec.command_started(CommandStart {
            pid: Some(9),
            command: &cmd,
            cwd: None,
            user: None,
            background: false,
        });
        let chunk = vec![b'y'; 60 << 10];
        for i in 0..((MAX_RECORDED_BYTES / (60 << 10)) + 10) {
            log.output("stdout", &chunk);
            // An upload midway: the next one goes on from the last full part.
            if i == 500 {
                rec.upload().await.unwrap();
            }
        }
        let on_disk = std::fs::metadata(
            recordings
                .dir(&team_segment("team-a"), &r.id)
                .join("commands.jsonl"),
        )
        .unwrap()
        .len();
        assert!(on_disk <= MAX_RECORDED_BYTES + 4096, "{on_disk}");
        // A terminal opened at the cap: its header, then the marker only.
        let mut pty = rec.pty_opened(80, 24, Some("top")).unwrap();
        pty.output(&chunk);
        pty.output(b"more");
        drop(pty);
        recordings.finish(&r).await;
        let list = recordings.list("team-a", &r.id).await.unwrap();
        assert!(list.iter().all(|v| v.truncated), "{list:?}");
        let bytes = fetch(&recordings, "team-a", &r.id, "commands.jsonl").await;
        assert_eq!(bytes.len() as u64, on_disk);
        let text = String::from_utf8(bytes).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["type"], "truncated");
        assert_eq!(text.matches("\"truncated\"").count(), 1);
        let cast =
            String::from_utf8(fetch(&recordings, "team-a", &r.id, "pty-1.cast").await).unwrap();
        assert_eq!(cast.lines().count(), 2, "{cast}");
        assert!(cast.lines().last().unwrap().contains("\"m\""));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_restart_goes_on_with_the_local_files_and_never_reuses_a_stored_name() {
        let dir = scratch("restart");
        let store = store(&dir);
        let r = record("team-a");
        let first = Recordings::new(&dir, store.clone());
        let rec = first.recorder(&r).await.unwrap();
        let cmd = Command::Shell("true".into());
        rec.command_started(CommandStart {
            pid: Some(1),
            command: &cmd,
            cwd: None,
            user: None,
            background: true,
        });
        drop(rec.pty_opened(80, 24, None));
        rec.upload().await.unwrap();
        // A crash mid-line: the torn line goes, the rest stays.
        let path = first
            .dir(&team_segment("team-a"), &r.id)
            .join("commands.jsonl");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"type\":\"outp")
            .unwrap();
        // The daemon restarts: the same files are continued.
        let second = Recordings::new(&dir, store.clone());
        let rec = second.recorder(&r).await.unwrap();
        rec.command_attached(1).exited(Some(0), None);
        drop(rec.pty_opened(80, 24, None));
        second.finish(&r).await;
        let list = second.list("team-a", &r.id).await.unwrap();
        let ids: Vec<_> = list.iter().map(|v| v.recording_id.as_str()).collect();
        assert_eq!(ids, ["commands.jsonl", "pty-1.cast", "pty-2.cast"]);
        let text =
            String::from_utf8(fetch(&second, "team-a", &r.id, "commands.jsonl").await).unwrap();
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
            "{text}"
        );
        assert!(text.lines().last().unwrap().contains("\"exit\""), "{text}");
        // It resumes on another host: new names beside the stored ones.
        let third = Recordings::new(&scratch("elsewhere"), store);
        let rec = third.recorder(&r).await.unwrap();
        rec.command_started(CommandStart {
            pid: Some(2),
            command: &cmd,
            cwd: None,
            user: None,
            background: false,
        });
        drop(rec.pty_opened(80, 24, None));
        third.finish(&r).await;
        let ids: Vec<String> = third
            .list("team-a", &r.id)
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.recording_id)
            .collect();
        assert!(ids.contains(&"commands-2.jsonl".to_string()), "{ids:?}");
        assert!(ids.contains(&"pty-3.cast".to_string()), "{ids:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn leftovers_of_ended_sandboxes_are_uploaded_and_removed() {
        let dir = scratch("leftovers");
        let store = store(&dir);
        let (gone, live) = (record("team-a"), record("team-a"));
        let first = Recordings::new(&dir, store.clone());
        for r in [&gone, &live] {
            let rec = first.recorder(r).await.unwrap();
            drop(rec.pty_opened(80, 24, None));
        }
        let second = Recordings::new(&dir, store);
        second.upload_leftovers(|id| id == live.id).await;
        assert_eq!(second.list("team-a", &gone.id).await.unwrap().len(), 1);
        assert!(second.list("team-a", &live.id).await.unwrap().is_empty());
        assert!(!second.dir(&team_segment("team-a"), &gone.id).exists());
        assert!(second.dir(&team_segment("team-a"), &live.id).exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
