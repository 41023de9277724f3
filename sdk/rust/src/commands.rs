//! Commands in a sandbox: run with streamed output, background handles, stdin, signals.

use crate::error::check;
use crate::models::{CommandResult, ProcessInfo};
use crate::{Error, Result, Sandbox};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// A callback for a chunk of output.
pub type OutputCallback = Box<dyn FnMut(&str) + Send>;

/// Options of a command.
#[derive(Default)]
pub struct RunOptions {
    /// Environment on top of the sandbox's.
    pub envs: BTreeMap<String, String>,
    /// Working directory (default `/workspace`).
    pub cwd: Option<String>,
    /// User (default `user`).
    pub user: Option<String>,
    /// Called with each chunk of standard output as it arrives.
    pub on_stdout: Option<OutputCallback>,
    /// Called with each chunk of standard error as it arrives.
    pub on_stderr: Option<OutputCallback>,
    /// Give the command a stdin pipe (background commands; see [`CommandHandle::send_stdin`]).
    pub stdin: bool,
}

impl RunOptions {
    fn body(&self, cmd: &str, background: bool) -> Value {
        let mut b = json!({ "cmd": cmd, "background": background, "stdin": self.stdin });
        if !self.envs.is_empty() {
            b["envs"] = json!(self.envs);
        }
        if let Some(c) = &self.cwd {
            b["cwd"] = json!(c);
        }
        if let Some(u) = &self.user {
            b["user"] = json!(u);
        }
        b
    }
}

/// The commands of one sandbox.
pub struct Commands<'a> {
    pub(crate) sandbox: &'a Sandbox,
}

/// A command started in the background.
#[derive(Debug, Clone)]
pub struct CommandHandle {
    sandbox: Sandbox,
    /// Its process ID in the sandbox.
    pub pid: u32,
}

impl Commands<'_> {
    /// Runs `cmd` with `/bin/sh -c` and waits for it.
    pub async fn run(&self, cmd: &str) -> Result<CommandResult> {
        self.run_with(cmd, RunOptions::default()).await
    }

    /// Runs `cmd` with options (streamed output callbacks among them) and waits for it.
    pub async fn run_with(&self, cmd: &str, mut options: RunOptions) -> Result<CommandResult> {
        let resp = self
            .sandbox
            .data(reqwest::Method::POST, "/commands")?
            .json(&options.body(cmd, false))
            .send()
            .await?;
        consume_events(check(resp).await?, &mut options).await
    }

    /// Starts `cmd` in the background; its output waits (last 1 MiB) until someone waits on it.
    pub async fn spawn(&self, cmd: &str, options: RunOptions) -> Result<CommandHandle> {
        let resp = self
            .sandbox
            .data(reqwest::Method::POST, "/commands")?
            .json(&options.body(cmd, true))
            .send()
            .await?;
        let v: Value = check(resp).await?.json().await?;
        let pid = v["pid"]
            .as_u64()
            .ok_or_else(|| Error::Protocol(format!("no pid in {v}")))? as u32;
        Ok(CommandHandle {
            sandbox: self.sandbox.clone(),
            pid,
        })
    }

    /// Processes the sandbox started that still run or were not collected.
    pub async fn list(&self) -> Result<Vec<ProcessInfo>> {
        let resp = self
            .sandbox
            .data(reqwest::Method::GET, "/commands")?
            .send()
            .await?;
        let v: Value = check(resp).await?.json().await?;
        serde_json::from_value(v["processes"].clone()).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Sends SIGKILL to a process group. `false` if there was no such process.
    pub async fn kill(&self, pid: u32) -> Result<bool> {
        match signal(self.sandbox, pid, 9).await {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A handle on a process started earlier (e.g. by another client).
    pub fn connect(&self, pid: u32) -> CommandHandle {
        CommandHandle {
            sandbox: self.sandbox.clone(),
            pid,
        }
    }
}

impl CommandHandle {
    /// Waits for the command to end; its output so far is replayed first.
    pub async fn wait(&self) -> Result<CommandResult> {
        self.wait_with(RunOptions::default()).await
    }

    /// Waits with output callbacks.
    pub async fn wait_with(&self, mut options: RunOptions) -> Result<CommandResult> {
        let resp = self
            .sandbox
            .data(reqwest::Method::GET, &format!("/commands/{}", self.pid))?
            .send()
            .await?;
        consume_events(check(resp).await?, &mut options).await
    }

    /// Writes to its stdin (started with `stdin: true`) while someone waits on the
    /// command ([`CommandHandle::wait`], here or elsewhere): the stdin pipe belongs to
    /// the attached stream. Without one the API answers 409 `invalid_state`.
    pub async fn send_stdin(&self, data: impl Into<Vec<u8>>) -> Result<()> {
        self.stdin(data.into(), false).await
    }

    /// Closes its stdin.
    pub async fn close_stdin(&self) -> Result<()> {
        self.stdin(Vec::new(), true).await
    }

    async fn stdin(&self, data: Vec<u8>, eof: bool) -> Result<()> {
        let resp = self
            .sandbox
            .data(
                reqwest::Method::POST,
                &format!("/commands/{}/stdin?eof={eof}", self.pid),
            )?
            .body(data)
            .send()
            .await?;
        check(resp).await.map(drop)
    }

    /// Sends SIGKILL to its process group.
    pub async fn kill(&self) -> Result<()> {
        signal(&self.sandbox, self.pid, 9).await
    }
}

async fn signal(sandbox: &Sandbox, pid: u32, signal: i32) -> Result<()> {
    let resp = sandbox
        .data(reqwest::Method::POST, &format!("/commands/{pid}/signal"))?
        .json(&json!({ "signal": signal }))
        .send()
        .await?;
    check(resp).await.map(drop)
}

/// Reads an NDJSON event stream to the command's end.
async fn consume_events(
    resp: reqwest::Response,
    options: &mut RunOptions,
) -> Result<CommandResult> {
    let mut result = CommandResult::default();
    let mut stream = resp.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut ended = false;
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk?);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let event: Value = serde_json::from_slice(&line)
                .map_err(|e| Error::Protocol(format!("a command event: {e}")))?;
            ended |= apply(&event, &mut result, options)?;
        }
    }
    if !ended {
        return Err(Error::Protocol(
            "the command's stream ended before its exit (the sandbox may have stopped)".into(),
        ));
    }
    Ok(result)
}

/// Applies one event; `true` once the command ended.
fn apply(event: &Value, result: &mut CommandResult, options: &mut RunOptions) -> Result<bool> {
    let text = || -> String {
        event["data"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| {
                event["dataBase64"]
                    .as_str()
                    .map(|b| format!("<{} base64 bytes>", b.len()))
                    .unwrap_or_default()
            })
    };
    match event["event"].as_str().unwrap_or_default() {
        "stdout" => {
            let t = text();
            if let Some(cb) = options.on_stdout.as_mut() {
                cb(&t);
            }
            result.stdout.push_str(&t);
        }
        "stderr" => {
            let t = text();
            if let Some(cb) = options.on_stderr.as_mut() {
                cb(&t);
            }
            result.stderr.push_str(&t);
        }
        "exit" => {
            result.exit_code = event["exitCode"].as_i64().map(|c| c as i32);
            result.signal = event["signal"].as_i64().map(|s| s as i32);
            return Ok(true);
        }
        "error" => {
            return Err(Error::Api {
                status: 200,
                code: event["code"]
                    .as_str()
                    .unwrap_or("sandbox_error")
                    .to_string(),
                message: event["message"].as_str().unwrap_or_default().to_string(),
                details: Value::Null,
            })
        }
        _ => {}
    }
    Ok(false)
}
