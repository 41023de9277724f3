//! The same `.wasm` under stock `wasmtime serve`: the component is portable, and its
//! checks do not depend on our host.
//!
//! A stock host sends the component's outbound calls where the component says: to
//! `NULLSPACE_UPSTREAM` from its environment, read at run time (wasi:cli/environment:
//! `wasmtime serve -Scli --env NULLSPACE_UPSTREAM=URL`). The test starts a pool manager
//! on a free loopback port and points `wasmtime serve` at it that way, as
//! `deploy/nomad/api.nomad.hcl` does.

use nullspace_tests::{stop_child, wasmtime_serve, Daemon};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::Duration;

/// One HTTP/1.1 exchange over a fresh connection.
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
    let daemon = Daemon::start("wasmtime-serve");
    let key = daemon.team_key("acme");
    let (mut serve, addr) = wasmtime_serve(&daemon.control);
    let addr = addr.as_str();
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

    // The upstream is read when a request comes, not built in: a host that names a
    // broken one gets a 502 that says which setting to fix, from the same `.wasm`.
    let (mut broken, addr) = wasmtime_serve("pool-manager:7070");
    let (status, v) = call(&addr, "GET", "/api/v1/sandboxes", &auth, "");
    assert_eq!(
        (status, v["code"].as_str()),
        (502, Some("upstream_unavailable")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("NULLSPACE_UPSTREAM"),
        "{v}"
    );
    // Requests that need no upstream are still served: health, and the dashboard's
    // page and assets (built into the same `.wasm`).
    let (status, v) = call(&addr, "GET", "/api/v1/health", &[], "");
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")), "{v}");
    for path in ["/dashboard/", "/dashboard/assets/app.js"] {
        let (status, _) = call(&addr, "GET", path, &[], "");
        assert_eq!(status, 200, "{path} from stock wasmtime serve");
    }
    stop_child(&mut broken, libc::SIGTERM, "wasmtime serve");
    drop(daemon);
}
