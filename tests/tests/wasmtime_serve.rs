//! The same `.wasm` under stock `wasmtime serve`: the component is portable, and its
//! checks do not depend on our host.
//!
//! A stock host sends the component's outbound calls where the component says: to its
//! built-in `http://127.0.0.1:7070`. So the test runs in a network namespace of its own
//! (root only, as CI is), where it starts a pool manager on that address and
//! `wasmtime serve` beside it, without touching anything on the machine's loopback.

use nullspace_tests::{api_component, cached_artifact, spawn_until, stop_child, Daemon};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::Duration;

/// `wasmtime` as `deploy/install-wasmtime-cli.sh` installs it (`NULLSPACE_WASMTIME`
/// overrides).
fn wasmtime_cli() -> std::path::PathBuf {
    cached_artifact(
        "NULLSPACE_WASMTIME",
        "tools/wasmtime-48.0.8/bin/wasmtime",
        "deploy/install-wasmtime-cli.sh",
    )
}

/// One HTTP/1.1 exchange over a fresh connection made from the calling thread (and so in
/// its network namespace).
fn call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to wasmtime serve");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// A request and what must come back: method, path, headers, body, status, a JSON
/// pointer into the answer and the value there.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a str,
    u16,
    &'a str,
    Value,
);

#[test]
fn the_component_runs_under_stock_wasmtime_serve() {
    let wasmtime = wasmtime_cli();
    let component = api_component();
    // Namespaces belong to threads: everything below runs on this one.
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which owns nothing shared with others.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) needs root: {}",
            std::io::Error::last_os_error()
        );
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(up.success());

        let state =
            std::env::temp_dir().join(format!("nullspace-wasmtime-serve-{}", std::process::id()));
        let daemon = Daemon::start_in_with(state, &["--listen", "127.0.0.1:7070"]);
        let key = daemon.team_key("acme");

        let mut cmd = std::process::Command::new(&wasmtime);
        cmd.args(["serve", "--addr", "127.0.0.1:8123"])
            .arg(&component);
        let (mut serve, _) = spawn_until(
            cmd,
            "wasmtime",
            &["Serving HTTP on"],
            Duration::from_secs(120),
        );
        let addr = "127.0.0.1:8123";
        let auth = [("X-API-Key", key.as_str())];

        let unknown_key = [("X-API-Key", "ns_0123456789abcdef0123456789abcdef")];
        let bad_key = [("X-API-Key", "nope")];
        // (method, path, headers, body, status, JSON pointer, value there)
        let cases: [Case; 7] = [
            // Made by the component alone.
            (
                "GET",
                "/api/v1/sandboxes",
                &[],
                "",
                401,
                "/code",
                json!("unauthorized"),
            ),
            (
                "GET",
                "/api/v1/sandboxes",
                &bad_key,
                "",
                401,
                "/code",
                json!("unauthorized"),
            ),
            (
                "POST",
                "/api/v1/sandboxes",
                &auth,
                r#"{"templateID":"minimal","timeoutMs":5}"#,
                400,
                "/details/field",
                json!("timeoutMs"),
            ),
            (
                "POST",
                "/api/v1/sandboxes",
                &auth,
                r#"{"templateID":"minimal","mcp":{}}"#,
                400,
                "/details/field",
                json!("mcp"),
            ),
            (
                "POST",
                "/api/v1/sandboxes",
                &auth,
                "{oops",
                400,
                "/code",
                json!("invalid_request"),
            ),
            // Needing the pool manager behind it: the stock outbound handler works.
            (
                "GET",
                "/api/v1/sandboxes",
                &unknown_key,
                "",
                401,
                "/code",
                json!("unauthorized"),
            ),
            (
                "GET",
                "/api/v1/sandboxes",
                &auth,
                "",
                200,
                "/sandboxes",
                json!([]),
            ),
        ];
        for (method, path, headers, body, status, pointer, want) in cases {
            let (got, v) = call(addr, method, path, headers, body);
            assert_eq!(
                (got, v.pointer(pointer)),
                (status, Some(&want)),
                "{method} {path} {body}: {v}"
            );
        }
        let (status, v) = call(
            addr,
            "POST",
            "/api/v1/sandboxes",
            &auth,
            r#"{"templateID":"minimal","resources":{"vcpus":1,"memMiB":512,"diskSizeMiB":1024}}"#,
        );
        assert_eq!((status, v["state"].as_str()), (201, Some("running")), "{v}");
        let id = v["sandboxID"].as_str().unwrap();
        let (status, _) = call(
            addr,
            "DELETE",
            &format!("/api/v1/sandboxes/{id}"),
            &auth,
            "",
        );
        assert_eq!(status, 204);

        stop_child(&mut serve, libc::SIGTERM, "wasmtime serve");
        drop(daemon);
    })
    .join()
    .expect("the wasmtime serve checks passed");
}
