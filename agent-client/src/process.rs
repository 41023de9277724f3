//! A process running in the guest, seen from the host.

use crate::{unexpected, ClientError, Stream, StreamEvent};
use agent_protocol::{Channel, ExitStatus, Reply, Request};

/// Something a process did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// Bytes it wrote to stdout.
    Stdout(Vec<u8>),
    /// Bytes it wrote to stderr.
    Stderr(Vec<u8>),
    /// It ended. The last event.
    Exited(ExitStatus),
    /// This handle was detached (by [`Process::detach`] or because another handle
    /// attached); the process keeps running. The last event.
    Detached,
}

/// What a finished process wrote, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its stdout (only the end of it if collected by [`Process::wait_tail`]).
    pub stdout: Vec<u8>,
    /// Its stderr (likewise).
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
    /// Bytes dropped from the front of stdout and stderr together to keep the tail
    /// bound; 0 for [`Process::wait`].
    pub omitted: u64,
}

impl Output {
    /// stdout as text (lossy).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (lossy).
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A handle on a process, streaming its output. Dropping the handle of a foreground
/// process kills it; a background process keeps running.
pub struct Process {
    pid: u32,
    pub(crate) stream: Stream,
    ended: bool,
}

impl Process {
    /// Waits for the agent to confirm the start (or to say why it could not).
    pub(crate) async fn start(mut stream: Stream) -> Result<Self, ClientError> {
        match stream.next().await? {
            StreamEvent::Reply(Reply::Started { pid }) => Ok(Self {
                pid,
                stream,
                ended: false,
            }),
            StreamEvent::Reply(Reply::Error(e)) => Err(e.into()),
            StreamEvent::Reply(other) => Err(unexpected(other)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The process ID inside the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next thing the process did; `None` after its last event.
    pub async fn next_event(&mut self) -> Result<Option<ProcessEvent>, ClientError> {
        while !self.ended {
            let event = match self.stream.next().await? {
                StreamEvent::Data(Channel::Error, bytes) => ProcessEvent::Stderr(bytes),
                StreamEvent::Data(_, bytes) => ProcessEvent::Stdout(bytes),
                StreamEvent::Eof(_) => continue,
                StreamEvent::Reply(Reply::Exited(status)) => ProcessEvent::Exited(status),
                StreamEvent::Reply(Reply::Detached) => ProcessEvent::Detached,
                StreamEvent::Reply(Reply::Error(e)) => {
                    self.ended = true;
                    return Err(e.into());
                }
                StreamEvent::Reply(other) => return Err(unexpected(other)),
            };
            self.ended = matches!(event, ProcessEvent::Exited(_) | ProcessEvent::Detached);
            return Ok(Some(event));
        }
        Ok(None)
    }

    /// A handle that writes this process's stdin from elsewhere (another task or
    /// request) while this handle streams its output.
    pub fn stdin(&self) -> StdinWriter {
        StdinWriter {
            client: self.stream.client.clone(),
            stream: self.stream.id,
        }
    }

    /// Writes to the process's stdin (it must have been started with `stdin: true`).
    pub async fn write_stdin(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.send_data(bytes.to_vec()).await
    }

    /// Closes the process's stdin.
    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        self.stream.send_eof().await
    }

    /// Stops receiving output; the process keeps running and can be attached again.
    pub async fn detach(mut self) -> Result<(), ClientError> {
        self.stream.send_control(&Request::Detach).await?;
        while let Some(event) = self.next_event().await? {
            if event == ProcessEvent::Detached || matches!(event, ProcessEvent::Exited(_)) {
                break;
            }
        }
        Ok(())
    }

    /// Waits for the end, calling `on_stdout` / `on_stderr` as output arrives.
    pub async fn wait_with(
        mut self,
        mut on_stdout: impl FnMut(&[u8]),
        mut on_stderr: impl FnMut(&[u8]),
    ) -> Result<ExitStatus, ClientError> {
        while let Some(event) = self.next_event().await? {
            match event {
                ProcessEvent::Stdout(b) => on_stdout(&b),
                ProcessEvent::Stderr(b) => on_stderr(&b),
                ProcessEvent::Exited(status) => return Ok(status),
                ProcessEvent::Detached => break,
            }
        }
        Err(ClientError::Protocol(
            "the process was detached by another handle before it ended".into(),
        ))
    }

    /// Waits for the end and collects all output. Only for commands whose output is
    /// known to be small: a guest can print without end; see [`Process::wait_tail`].
    pub async fn wait(self) -> Result<Output, ClientError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self
            .wait_with(
                |b| stdout.extend_from_slice(b),
                |b| stderr.extend_from_slice(b),
            )
            .await?;
        Ok(Output {
            stdout,
            stderr,
            status,
            omitted: 0,
        })
    }

    /// Waits for the end, keeping only the last `keep` bytes of stdout and of stderr
    /// (what an error message needs), however much the process prints.
    pub async fn wait_tail(self, keep: usize) -> Result<Output, ClientError> {
        let (mut stdout, mut stderr) = (Tail::new(keep), Tail::new(keep));
        let status = self
            .wait_with(|b| stdout.push(b), |b| stderr.push(b))
            .await?;
        Ok(Output {
            omitted: stdout.omitted + stderr.omitted,
            stdout: stdout.into_bytes(),
            stderr: stderr.into_bytes(),
            status,
        })
    }
}

/// The last `keep` bytes of a byte stream, in at most twice that memory; trimming
/// happens once per `keep` bytes pushed, so the cost stays linear.
struct Tail {
    buf: Vec<u8>,
    keep: usize,
    omitted: u64,
}

impl Tail {
    fn new(keep: usize) -> Self {
        Self {
            buf: Vec::new(),
            keep,
            omitted: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        // Of a chunk larger than the bound, only its end can survive.
        let skip = bytes.len().saturating_sub(self.keep);
        self.omitted += skip as u64;
        self.buf.extend_from_slice(&bytes[skip..]);
        if self.buf.len() > 2 * self.keep {
            self.trim();
        }
    }

    fn trim(&mut self) {
        let excess = self.buf.len().saturating_sub(self.keep);
        self.buf.drain(..excess);
        self.omitted += excess as u64;
    }

    fn into_bytes(mut self) -> Vec<u8> {
        self.trim();
        self.buf
    }
}

/// Writes a process's stdin through the stream that is attached to it.
#[derive(Clone)]
pub struct StdinWriter {
    client: crate::AgentClient,
    stream: u32,
}

impl StdinWriter {
    /// Writes bytes to stdin.
    pub async fn write(&self, bytes: &[u8]) -> Result<(), ClientError> {
        for chunk in bytes.chunks(agent_protocol::DATA_CHUNK) {
            let frame = agent_protocol::Frame::Data {
                stream: self.stream,
                channel: Channel::Input,
                bytes: chunk.to_vec(),
            };
            self.client.send_frame(frame.encode()).await?;
        }
        Ok(())
    }

    /// Closes stdin.
    pub async fn close(&self) -> Result<(), ClientError> {
        let frame = agent_protocol::Frame::Eof {
            stream: self.stream,
            channel: Channel::Input,
        };
        self.client.send_frame(frame.encode()).await
    }
}

#[cfg(test)]
mod tests {
    use super::Tail;

    #[test]
    fn a_tail_keeps_the_last_bytes_and_counts_the_rest() {
        let mut t = Tail::new(10);
        let mut pushed = 0;
        for i in 0..1000u32 {
            let chunk = format!("{i},");
            pushed += chunk.len() as u64;
            t.push(chunk.as_bytes());
            assert!(t.buf.len() <= 20);
        }
        t.push(&[b'x'; 25]);
        assert_eq!(t.omitted + t.buf.len() as u64, pushed + 25);
        assert_eq!(t.into_bytes(), vec![b'x'; 10]);
        let mut t = Tail::new(10);
        t.push(b"short");
        assert_eq!((t.omitted, t.into_bytes()), (0, b"short".to_vec()));
    }
}
