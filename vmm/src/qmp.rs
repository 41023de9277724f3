//! A QMP (QEMU Machine Protocol) client: JSON lines over a unix socket.
//!
//! After the greeting and `qmp_capabilities`, commands carry an `id`; a reader task
//! routes each response to its caller and publishes asynchronous events on a broadcast
//! channel (STOP, RESUME, MIGRATION, ...).

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

/// QMP errors.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP command {0} got no answer within {1:?}")]
    Timeout(String, Duration),
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Value>>>>>;

/// A negotiated QMP connection.
pub struct Qmp {
    writer: tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<Value>,
}

/// The longest QMP message read. QEMU's largest answers are a few KiB; a QEMU a guest
/// took over must not make the daemon buffer a line without end.
const MAX_MESSAGE: u64 = 4 << 20;

/// One message (a line), at most [`MAX_MESSAGE`] bytes; `None` at the end.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(MAX_MESSAGE)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && n as u64 == MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a QMP message over {MAX_MESSAGE} bytes"),
        ));
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

impl Qmp {
    /// Reads the greeting and enters command mode.
    pub async fn connect(socket: UnixStream) -> Result<Self, QmpError> {
        let (read_half, write_half) = socket.into_split();
        let mut lines = BufReader::new(read_half);
        // QEMU serves one QMP client at a time: a greeting that never comes means another
        // client still holds the monitor.
        let wait = Duration::from_secs(10);
        let greeting = tokio::time::timeout(wait, read_line(&mut lines))
            .await
            .map_err(|_| {
                QmpError::Timeout(
                    "the QMP greeting (is another client connected?)".into(),
                    wait,
                )
            })??
            .ok_or(QmpError::Closed)?;
        if !greeting.contains("\"QMP\"") {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting: {greeting}"
            )));
        }
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(64);
        let qmp = Self {
            writer: tokio::sync::Mutex::new(write_half),
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
            events: events.clone(),
        };
        tokio::spawn(async move {
            while let Ok(Some(line)) = read_line(&mut lines).await {
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if msg.get("event").is_some() {
                    let _ = events.send(msg);
                } else if let Some(id) = msg.get("id").and_then(Value::as_u64) {
                    let tx = pending.lock().unwrap().as_mut().and_then(|p| p.remove(&id));
                    if let Some(tx) = tx {
                        let _ = tx.send(msg);
                    }
                }
            }
            *pending.lock().unwrap() = None;
        });
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, Duration::from_secs(30))
            .await
    }

    /// Runs a command, failing if QEMU does not answer within `timeout`.
    pub async fn execute_within(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().unwrap().as_mut() {
            Some(p) => p.insert(id, tx),
            None => return Err(QmpError::Closed),
        };
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).expect("json");
        line.push(b'\n');
        self.writer.lock().await.write_all(&line).await?;
        let response = tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| QmpError::Timeout(command.to_string(), timeout))?
            .map_err(|_| QmpError::Closed)?;
        if let Some(err) = response.get("error") {
            return Err(QmpError::Command {
                command: command.to_string(),
                class: err["class"].as_str().unwrap_or("").to_string(),
                desc: err["desc"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(response.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Subscribes to asynchronous events from now on.
    pub fn events(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }
}
