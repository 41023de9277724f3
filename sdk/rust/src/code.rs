//! The code interpreter: code run in a Jupyter kernel of a `code-interpreter` sandbox.
//! The helper the template installs (`nullspace-code`) runs through the commands data
//! plane and prints one JSON event a line (docs/TEMPLATES.md); this reads them into an
//! [`Execution`].

use crate::commands::RunOptions;
use crate::{Error, Result, Sandbox};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The helper the code-interpreter template installs.
pub const CODE_HELPER: &str = "/usr/local/bin/nullspace-code";
/// Code longer than this (base64) goes through a file, not the command line.
const ARGV_LIMIT: usize = 96 * 1024;

/// One output of an execution: the kernel's MIME bundle. `png` and `jpeg` are base64.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CodeResult {
    pub text: Option<String>,
    pub html: Option<String>,
    pub markdown: Option<String>,
    pub svg: Option<String>,
    pub png: Option<String>,
    pub jpeg: Option<String>,
    pub latex: Option<String>,
    pub json: Option<Value>,
    pub javascript: Option<String>,
    /// The cell's value (`execute_result`), not a `display()` or a figure.
    pub is_main_result: bool,
    /// The whole bundle, by MIME type.
    pub raw: Map<String, Value>,
}

impl CodeResult {
    fn parse(data: &Map<String, Value>, is_main_result: bool) -> Self {
        let text = |mime: &str| {
            data.get(mime).map(|v| match v {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts.iter().filter_map(Value::as_str).collect(),
                other => other.to_string(),
            })
        };
        Self {
            text: text("text/plain"),
            html: text("text/html"),
            markdown: text("text/markdown"),
            svg: text("image/svg+xml"),
            png: text("image/png").map(|s| s.replace('\n', "")),
            jpeg: text("image/jpeg").map(|s| s.replace('\n', "")),
            latex: text("text/latex"),
            json: data.get("application/json").cloned(),
            javascript: text("application/javascript"),
            is_main_result,
            raw: data.clone(),
        }
    }

    /// The PNG, decoded.
    pub fn png_bytes(&self) -> Option<Vec<u8>> {
        self.png.as_deref().and_then(base64_decode)
    }
}

/// The exception an execution raised.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionError {
    pub name: String,
    pub value: String,
    pub traceback: Vec<String>,
}

/// What an execution printed, chunk by chunk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Logs {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// An execution's outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Execution {
    pub results: Vec<CodeResult>,
    pub logs: Logs,
    pub error: Option<ExecutionError>,
    pub execution_count: Option<u64>,
    /// The kernel was interrupted when the timeout passed.
    pub timed_out: bool,
}

impl Execution {
    /// The main result's text (the cell's value).
    pub fn text(&self) -> Option<&str> {
        self.results
            .iter()
            .find(|r| r.is_main_result)
            .and_then(|r| r.text.as_deref())
    }
}

/// A separate kernel (its own state).
#[derive(Debug, Clone, PartialEq)]
pub struct CodeContext {
    pub id: String,
    pub language: String,
    pub cwd: String,
}

/// A callback for a result.
pub type ResultCallback = Box<dyn FnMut(&CodeResult) + Send>;

/// Options of [`Sandbox::run_code`].
pub struct CodeOptions {
    /// `python` (default) or `bash`.
    pub language: String,
    /// The context (default: the sandbox's default kernel).
    pub context: Option<String>,
    /// Seconds before the kernel is interrupted (default 60).
    pub timeout: Duration,
    pub envs: BTreeMap<String, String>,
    pub on_stdout: Option<crate::OutputCallback>,
    pub on_stderr: Option<crate::OutputCallback>,
    pub on_result: Option<ResultCallback>,
}

impl Default for CodeOptions {
    fn default() -> Self {
        Self {
            language: "python".into(),
            context: None,
            timeout: Duration::from_secs(60),
            envs: BTreeMap::new(),
            on_stdout: None,
            on_stderr: None,
            on_result: None,
        }
    }
}

impl CodeOptions {
    /// Runs in `context`.
    pub fn context(mut self, context: &CodeContext) -> Self {
        self.context = Some(context.id.clone());
        self.language = context.language.clone();
        self
    }

    /// `python` or `bash`.
    pub fn language(mut self, language: &str) -> Self {
        self.language = language.into();
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// Reads the helper's events, line by line, into an [`Execution`].
#[derive(Default)]
pub(crate) struct EventReader {
    pub(crate) execution: Execution,
    buffer: String,
    pub(crate) done: bool,
    on_stdout: Option<crate::OutputCallback>,
    on_stderr: Option<crate::OutputCallback>,
    on_result: Option<ResultCallback>,
}

impl EventReader {
    pub(crate) fn feed(&mut self, chunk: &str) {
        self.buffer.push_str(chunk);
        while let Some(n) = self.buffer.find('\n') {
            let line: String = self.buffer.drain(..=n).collect();
            if let Ok(event) = serde_json::from_str::<Value>(line.trim()) {
                self.event(&event);
            }
        }
    }

    fn event(&mut self, e: &Value) {
        let x = &mut self.execution;
        let text = e["text"].as_str().unwrap_or_default().to_string();
        match e["type"].as_str().unwrap_or_default() {
            "stdout" => {
                if let Some(f) = self.on_stdout.as_mut() {
                    f(&text);
                }
                x.logs.stdout.push(text);
            }
            "stderr" => {
                if let Some(f) = self.on_stderr.as_mut() {
                    f(&text);
                }
                x.logs.stderr.push(text);
            }
            "result" => {
                let empty = Map::new();
                let r = CodeResult::parse(
                    e["data"].as_object().unwrap_or(&empty),
                    e["isMainResult"].as_bool().unwrap_or(false),
                );
                if let Some(f) = self.on_result.as_mut() {
                    f(&r);
                }
                x.results.push(r);
            }
            "error" => {
                x.error = Some(ExecutionError {
                    name: e["name"].as_str().unwrap_or_default().into(),
                    value: e["value"].as_str().unwrap_or_default().into(),
                    traceback: e["traceback"]
                        .as_array()
                        .map(|t| {
                            t.iter()
                                .filter_map(|l| l.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            }
            "timeout" => x.timed_out = true,
            "done" => {
                x.execution_count = e["executionCount"].as_u64();
                self.done = true;
            }
            _ => {}
        }
    }
}

/// Quotes `s` for `/bin/sh`.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Sandbox {
    /// Runs `code` in a Jupyter kernel of this `code-interpreter` sandbox (the default
    /// context's, or `options.context`'s) and returns its [`Execution`]: results (each
    /// with text, png, svg, html, json, markdown where the kernel gave them), logs and
    /// the error. Past `options.timeout` the kernel is interrupted.
    pub async fn run_code(&self, code: &str, options: CodeOptions) -> Result<Execution> {
        if !matches!(options.language.as_str(), "python" | "bash") {
            return Err(Error::invalid(format!(
                "language {:?} is not supported; send python or bash",
                options.language
            )));
        }
        let ctx = options.context.clone().unwrap_or_else(|| "default".into());
        let b64 = base64_encode(code.as_bytes());
        let file = (b64.len() > ARGV_LIMIT).then(|| format!("/tmp/nullspace-code-{}", uuid_like()));
        let source = match &file {
            Some(path) => {
                self.files().write(path, code.as_bytes().to_vec()).await?;
                format!("--code-file {}", quote(path))
            }
            None => format!("--code-b64 {b64}"),
        };
        let cmd = format!(
            "{CODE_HELPER} run --context {} --language {} --timeout {} {source}",
            quote(&ctx),
            options.language,
            options.timeout.as_secs_f64()
        );
        let reader = Arc::new(Mutex::new(EventReader {
            on_stdout: options.on_stdout,
            on_stderr: options.on_stderr,
            on_result: options.on_result,
            ..EventReader::default()
        }));
        let feed = reader.clone();
        let out = self
            .commands()
            .run_with(
                &cmd,
                RunOptions {
                    envs: options.envs,
                    on_stdout: Some(Box::new(move |chunk: &str| {
                        feed.lock().unwrap().feed(chunk)
                    })),
                    ..RunOptions::default()
                },
            )
            .await;
        // The code's file goes whether the run succeeded or not.
        if let Some(path) = &file {
            let _ = self.files().remove(path).await;
        }
        let out = out?;
        let mut reader = std::mem::take(&mut *reader.lock().unwrap());
        reader.feed("\n");
        if !reader.done {
            return Err(Error::local(
                "code_interpreter",
                format!(
                    "the code interpreter ended without a result (exit code {:?}); is this a code-interpreter sandbox? {}",
                    out.exit_code,
                    out.stderr.trim()
                ),
            ));
        }
        Ok(reader.execution)
    }

    /// A new kernel of its own (separate state) for [`Sandbox::run_code`].
    pub async fn create_code_context(
        &self,
        language: &str,
        cwd: Option<&str>,
    ) -> Result<CodeContext> {
        let mut cmd = format!(
            "{CODE_HELPER} create-context --language {}",
            quote(language)
        );
        if let Some(cwd) = cwd {
            cmd.push_str(&format!(" --cwd {}", quote(cwd)));
        }
        let out = self.commands().run(&cmd).await?;
        let event: Value = out
            .stdout
            .lines()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| {
                Error::local(
                    "code_interpreter",
                    format!(
                        "the code interpreter gave no context: {}",
                        out.stderr.trim()
                    ),
                )
            })?;
        Ok(CodeContext {
            id: event["id"].as_str().unwrap_or_default().into(),
            language: event["language"].as_str().unwrap_or(language).into(),
            cwd: event["cwd"].as_str().unwrap_or("/workspace").into(),
        })
    }

    /// Ends a context's kernel.
    pub async fn remove_code_context(&self, context: &CodeContext) -> Result<()> {
        self.commands()
            .run(&format!(
                "{CODE_HELPER} remove-context {}",
                quote(&context.id)
            ))
            .await
            .map(drop)
    }
}

pub(crate) fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}-{}", std::process::id())
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                B64[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
    {
        let v = B64.iter().position(|b| *b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_make_one_execution() {
        let lines = [
            r#"{"type":"stdout","text":"hi\n"}"#,
            r#"{"type":"result","isMainResult":false,"data":{"image/png":"iVBORw0K\nGgo=","text/plain":"<Figure>"}}"#,
            r#"{"type":"result","isMainResult":true,"data":{"text/plain":"42"}}"#,
            r#"{"type":"error","name":"ValueError","value":"bad","traceback":["a","b"]}"#,
            r#"{"type":"done","executionCount":7}"#,
        ]
        .join("\n")
            + "\n";
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut r = EventReader {
            on_stdout: Some(Box::new(move |t: &str| {
                s2.lock().unwrap().push(t.to_string())
            })),
            ..EventReader::default()
        };
        for chunk in lines.as_bytes().chunks(5) {
            r.feed(std::str::from_utf8(chunk).unwrap());
        }
        assert!(r.done);
        let x = r.execution;
        assert_eq!(x.logs.stdout, ["hi\n"]);
        assert_eq!(*seen.lock().unwrap(), ["hi\n"]);
        assert_eq!(x.text(), Some("42"));
        assert_eq!(
            x.results[0].png_bytes().unwrap(),
            b"\x89PNG\r\n\x1a\n".to_vec()
        );
        assert_eq!(x.error.unwrap().name, "ValueError");
        assert_eq!(x.execution_count, Some(7));
    }

    #[test]
    fn base64_round_trips_and_quotes_hold() {
        for s in ["", "a", "ab", "abc", "hello world"] {
            assert_eq!(
                base64_decode(&base64_encode(s.as_bytes())).unwrap(),
                s.as_bytes()
            );
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
