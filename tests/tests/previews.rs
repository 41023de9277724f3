//! Preview URLs through a real browser and by hand: tokens, cookies, proxy targets,
//! public ports, WebSockets, and auto-resume of a paused sandbox.

use nullspace_tests::http::{Api, Runtime};
use nullspace_tests::Stack;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A page and a WebSocket echo on one port, with Python's standard library only.
const SERVER: &str = r#"
import base64, hashlib, http.server, socketserver, struct, threading, time
ECHOED = threading.Event()
PAGE = b"""<html><body><div id=page>preview page</div><div id=out>waiting</div><script>
const ws = new WebSocket('ws://' + location.host + '/ws');
ws.onopen = () => ws.send('ping');
ws.onmessage = (e) => { document.getElementById('out').textContent = 'echo:' + e.data; };
ws.onerror = () => { document.getElementById('out').textContent = 'ws error'; };
</script><img src="/after-echo"></body></html>"""
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith('/ws'):
            key = self.headers['Sec-WebSocket-Key']
            acc = base64.b64encode(hashlib.sha1((key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').encode()).digest()).decode()
            self.send_response(101)
            self.send_header('Upgrade', 'websocket')
            self.send_header('Connection', 'Upgrade')
            self.send_header('Sec-WebSocket-Accept', acc)
            self.end_headers()
            self.wfile.flush()
            while True:
                hdr = self.rfile.read(2)
                if len(hdr) < 2:
                    return
                op, ln = hdr[0] & 0x0f, hdr[1] & 0x7f
                if ln == 126:
                    ln = struct.unpack('>H', self.rfile.read(2))[0]
                elif ln == 127:
                    ln = struct.unpack('>Q', self.rfile.read(8))[0]
                mask = self.rfile.read(4) if hdr[1] & 0x80 else b'\0\0\0\0'
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(ln)))
                if op == 8:
                    return
                if op == 1:
                    self.wfile.write(bytes([0x81, len(data)]) + data)
                    self.wfile.flush()
                    ECHOED.set()
        if self.path.startswith('/after-echo'):
            # Holds the page's load event (when the browser dumps the DOM) until the
            # WebSocket has echoed.
            # The echo was written before ECHOED was set, but the browser may not have run
            # onmessage yet: a moment more keeps this response behind it.
            ECHOED.wait(20)
            time.sleep(0.5)
        body = PAGE if self.path.split('?')[0] in ('/', '/index.html') else ('path=' + self.path + ' host=' + self.headers['Host'] + ' proxy=' + str(self.headers.get('x-nullspace-preview-proxy-token')) + ' cookie=' + str(self.headers.get('Cookie'))).encode()
        self.send_response(200)
        if self.path.startswith('/setcookie'):
            self.send_header('Set-Cookie', 'app=2; Domain=.parent.test; Path=/')
        self.send_header('Content-Type', 'text/html')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
S(('127.0.0.1', 8000), H).serve_forever()
"#;

/// Starts the server in a sandbox and waits until it answers inside.
async fn serve(rt: &Runtime) {
    let resp = rt
        .http
        .put(format!("{}/files?path=/workspace/server.py", rt.base))
        .bearer_auth(&rt.token)
        .body(SERVER)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let resp = rt
        .post(
            "/commands",
            json!({ "cmd": "python3 /workspace/server.py", "background": true }),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, code) = rt.run("curl -sf http://127.0.0.1:8000/ >/dev/null").await;
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A preview request: to the preview listener, with the preview host name.
struct Preview {
    http: reqwest::Client,
    listener: String,
    domain: String,
}

impl Preview {
    fn new(stack: &Stack) -> Self {
        let domain = stack
            .daemon
            .preview
            .trim_start_matches("http://")
            .to_string();
        let port = domain.rsplit_once(':').unwrap().1.to_string();
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            listener: format!("http://127.0.0.1:{port}"),
            domain,
        }
    }

    fn host(&self, sandbox: &str, port: u16) -> String {
        format!("{port}-{sandbox}.{}", self.domain)
    }

    async fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self
            .http
            .get(format!("{}{path}", self.listener))
            .header("Host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }
}

async fn preview(api: &Api, id: &str, body: Value) -> Value {
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{id}/previews"), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

/// Loads `url` in headless Chromium (every *.localhost name is loopback to it) and
/// returns the DOM after its scripts ran.
fn chromium_dom(url: &str) -> String {
    let profile = nullspace_tests::ScratchDir::new("chromium-profile");
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("chromium (deploy/install-deps.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_browser_loads_a_preview_and_its_websocket_and_tokens_guard_private_ports() {
    let stack = Stack::start("previews");
    let api = stack.public(stack.daemon.team_key("acme"));
    let other = stack.public(stack.daemon.team_key("other"));
    let sbx = api
        .create(json!({ "templateID": "base", "resources": { "vcpus": 1, "memMiB": 512, "diskSizeMiB": 2048 } }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let rt = Runtime::of(&sbx);
    serve(&rt).await;
    let p = Preview::new(&stack);
    let host = p.host(&id, 8000);

    let v = preview(&api, &id, json!({ "port": 8000 })).await;
    assert_eq!(v["public"], false);
    assert_eq!(v["host"], host.as_str());
    let url = v["url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with(&format!("http://{host}/?ns_preview_token=")),
        "{url}"
    );
    let (status, _) = other
        .post(
            &format!("/v1/sandboxes/{id}/previews"),
            json!({ "port": 8000 }),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, e) = api
        .post(
            &format!("/v1/sandboxes/{id}/previews"),
            json!({ "port": 0 }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");

    // A real browser: the signed URL trades its token for a cookie, the page loads, and
    // its WebSocket echoes through the same preview host.
    // The echo races the page's load event (when the DOM is dumped) inside the browser:
    // a second load tells a slow browser from a broken WebSocket.
    let mut dom = chromium_dom(&url);
    if !dom.contains("echo:ping") {
        dom = chromium_dom(&url);
    }
    assert!(
        dom.contains("preview page") && dom.contains("echo:ping"),
        "{dom}"
    );

    // By hand: no token, a forged one, another port's, the runtime token.
    let token = v["token"].as_str().unwrap();
    let resp = p.get(&host, "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let forged = format!("{}x", token);
    let resp = p
        .get(&host, &format!("/?ns_preview_token={forged}"), &[])
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let other_port = preview(&api, &id, json!({ "port": 9000 })).await;
    let resp = p
        .get(
            &host,
            &format!(
                "/?ns_preview_token={}",
                other_port["token"].as_str().unwrap()
            ),
            &[],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = p
        .get(
            &host,
            "/",
            &[("x-nullspace-preview-proxy-token", &rt.token)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // The URL token becomes a cookie (and leaves the URL); the cookie opens the port.
    let resp = p
        .get(&host, &format!("/x?a=1&ns_preview_token={token}"), &[])
        .await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(resp.headers()["location"], "/x?a=1");
    let cookie = resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let resp = p
        .get(&host, "/x?a=1", &[("cookie", &format!("{cookie}; app=1"))])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("path=/x?a=1") && body.contains(&format!("host={host}")),
        "{body}"
    );
    // The application gets its own cookies, never ours.
    assert!(
        body.contains("cookie=app=1") && !body.contains("ns_preview"),
        "{body}"
    );
    // A cookie the application sets stays on its own preview host.
    let resp = p.get(&host, "/setcookie", &[("cookie", &cookie)]).await;
    assert_eq!(resp.headers()["set-cookie"], "app=2; Path=/");
    // A sandbox that does not exist answers as a private port does.
    let private = p.get(&host, "/", &[]).await;
    let missing = p
        .get(&p.host("sbx-00000000000000000000", 8000), "/", &[])
        .await;
    assert_eq!(
        (private.status(), missing.status()),
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED)
    );
    let (private, missing): (Value, Value) =
        (private.json().await.unwrap(), missing.json().await.unwrap());
    assert_eq!(private["code"], missing["code"]);
    // The proxy target: the token in a header, which the application never sees.
    let target = &v["proxyTarget"];
    assert_eq!(target["header"], "x-nullspace-preview-proxy-token");
    let resp = p
        .get(
            &host,
            "/via-proxy",
            &[(
                "x-nullspace-preview-proxy-token",
                target["token"].as_str().unwrap(),
            )],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.text().await.unwrap().contains("proxy=None"));
    // A preview token is not a proxy token.
    let resp = p
        .get(&host, "/", &[("x-nullspace-preview-proxy-token", token)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Nothing listens on 9000: a clear 502.
    let resp = p
        .get(
            &p.host(&id, 9000),
            &format!(
                "/?ns_preview_token={}",
                other_port["token"].as_str().unwrap()
            ),
            &[(
                "x-nullspace-preview-proxy-token",
                other_port["proxyTarget"]["token"].as_str().unwrap(),
            )],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    // A public port needs no token; private again, it does.
    let v = preview(&api, &id, json!({ "port": 8000, "public": true })).await;
    assert_eq!(v["url"], format!("http://{host}/"));
    assert_eq!(p.get(&host, "/", &[]).await.status(), StatusCode::OK);
    preview(&api, &id, json!({ "port": 8000, "public": false })).await;
    assert_eq!(
        p.get(&host, "/", &[]).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // And the port's URLs and cookies from before it was made private end with it.
    let resp = p
        .get(&host, &format!("/?ns_preview_token={token}"), &[])
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = p.get(&host, "/", &[("cookie", &cookie)]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Not a preview host at all.
    assert_eq!(
        p.get("example.com", "/", &[]).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn preview_traffic_wakes_an_auto_resume_sandbox_and_others_answer_503() {
    let stack = Stack::start("previews-wake");
    let api = stack.public(stack.daemon.team_key("acme"));
    let (status, e) = api
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "base", "lifecycle": { "autoResume": true } }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert!(e["message"].as_str().unwrap().contains("onTimeout"), "{e}");
    let p = Preview::new(&stack);
    let shape = json!({ "vcpus": 1, "memMiB": 512, "diskSizeMiB": 2048 });
    let (mut ids, mut runtimes) = (Vec::new(), Vec::new());
    for auto in [true, false] {
        let sbx = api
            .create(json!({ "templateID": "base", "resources": shape, "lifecycle": { "onTimeout": "pause", "autoResume": auto } }))
            .await;
        assert_eq!(sbx["lifecycle"]["autoResume"], auto, "{sbx}");
        let rt = Runtime::of(&sbx);
        serve(&rt).await;
        runtimes.push(rt);
        ids.push(sbx["sandboxID"].as_str().unwrap().to_string());
    }
    let mut targets = Vec::new();
    for id in &ids {
        let v = preview(&api, id, json!({ "port": 8000 })).await;
        targets.push(v["proxyTarget"]["token"].as_str().unwrap().to_string());
        let (status, v) = api
            .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    // autoResume: the request wakes it and is answered.
    let started = Instant::now();
    let resp = p
        .get(
            &p.host(&ids[0], 8000),
            "/woken",
            &[("x-nullspace-preview-proxy-token", &targets[0])],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.text().await.unwrap().contains("path=/woken"));
    eprintln!(
        "auto-resume wake + request: {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(api.get(&ids[0]).await["state"], "running");
    // Without it: 503 with Retry-After, and the sandbox stays paused.
    let resp = p
        .get(
            &p.host(&ids[1], 8000),
            "/",
            &[("x-nullspace-preview-proxy-token", &targets[1])],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "5");
    assert!(resp.text().await.unwrap().contains("autoResume"));
    assert_eq!(api.get(&ids[1]).await["state"], "paused");
    // A data-plane call (an SDK's command) wakes it the same way, with the token it had;
    // without autoResume it is refused and the sandbox stays paused.
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{}/pause", ids[0]), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (out, _, code) = runtimes[0].run("echo woken-by-sdk").await;
    assert_eq!((out.as_str(), code), ("woken-by-sdk\n", 0));
    assert_eq!(api.get(&ids[0]).await["state"], "running");
    let (_, events) = api.fetch(&format!("/v1/sandboxes/{}/events", ids[0])).await;
    let woken: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "sandbox.auto_resumed")
        .map(|e| e["data"]["by"].as_str().unwrap())
        .collect();
    assert_eq!(woken, ["preview", "data-plane"], "{events}");
    let refused = runtimes[1]
        .http
        .post(format!("{}/commands", runtimes[1].base))
        .bearer_auth(&runtimes[1].token)
        .json(&json!({ "cmd": "true" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert_eq!(api.get(&ids[1]).await["state"], "paused");
    // A deleted sandbox's previews are gone: its tokens get what a sandbox that never
    // existed answers (whether an ID existed is no one else's business either).
    api.delete(&ids[0]).await;
    let resp = p
        .get(
            &p.host(&ids[0], 8000),
            "/",
            &[("x-nullspace-preview-proxy-token", &targets[0])],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let missing = p
        .get(&p.host("sbx-00000000000000000000", 8000), "/", &[])
        .await;
    let (deleted, missing): (Value, Value) =
        (resp.json().await.unwrap(), missing.json().await.unwrap());
    assert_eq!(
        deleted["message"]
            .as_str()
            .unwrap()
            .replace(&ids[0], "sbx-00000000000000000000"),
        missing["message"].as_str().unwrap()
    );
}

#[tokio::test]
async fn metrics_sample_over_time_and_summary_and_prometheus_say_what_there_is() {
    let stack = Stack::start("observability");
    let api = stack.public(stack.daemon.team_key("acme"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": { "vcpus": 1, "memMiB": 512, "diskSizeMiB": 1024 } }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap();
    // Busy for a while, then samples show it (the sampler runs every 5 s).
    Runtime::of(&sbx)
        .post(
            "/commands",
            json!({ "cmd": "timeout 12 sh -c 'while :; do :; done'", "background": true }),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let samples = loop {
        let (status, v) = api.fetch(&format!("/v1/sandboxes/{id}/metrics")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let s = v["metrics"].as_array().unwrap().clone();
        if s.len() >= 3 {
            break s;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        samples
            .iter()
            .any(|s| s["cpuUsedPct"].as_f64().unwrap() > 50.0),
        "{samples:?}"
    );
    assert!(samples
        .iter()
        .all(|s| s["memTotalMiB"].as_u64().unwrap() > 0 && s["tasks"].as_u64().unwrap() > 0));
    let (status, v) = api
        .fetch(&format!("/v1/sandboxes/{id}/metrics?start=10&end=5"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = api.fetch(&format!("/v1/sandboxes/{id}/logs")).await;
    assert_eq!(status, StatusCode::OK);
    let logs = v["logs"].as_array().unwrap();
    assert!(
        logs.iter().any(|l| l["source"] == "console"),
        "the boot console: {v}"
    );
    assert!(
        logs.iter().any(|l| l["source"] == "lifecycle"
            && l["text"].as_str().unwrap().starts_with("sandbox.running")),
        "{v}"
    );

    let (status, s) = api.fetch("/v1/observability/summary").await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["usage"]["running"], 1, "{s}");
    assert_eq!(s["quotaChecks"][0]["used"], 1, "{s}");
    assert!(
        s["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["status"] == "ok"),
        "{s}"
    );

    let text = reqwest::get(format!("{}/metrics", stack.daemon.control))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("nullspace_sandboxes{state=\"running\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "nullspace_sandbox_host_cpu_percent{{sandbox=\"{id}\"}}"
        )),
        "{text}"
    );
    let text = reqwest::get(format!("{}/metrics", stack.api.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("nullspace_api_responses_total{class=\"2xx\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn an_idle_sandbox_times_out_while_a_running_command_keeps_it_busy() {
    let stack = Stack::start("idle-timeout");
    let api = stack.public(stack.daemon.team_key("acme"));
    let (status, e) = api
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "minimal", "lifecycle": { "idleTimeout": 2 } }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["details"]["field"], "lifecycle.idleTimeout", "{e}");
    let sbx = api
        .create(json!({
            "templateID": "minimal",
            "resources": nullspace_tests::http::small(),
            "timeout": 600,
            "lifecycle": { "onTimeout": "pause", "autoResume": true, "idleTimeout": 5 },
        }))
        .await;
    assert_eq!(sbx["lifecycle"]["idleTimeout"], 5, "{sbx}");
    let id = sbx["sandboxID"].as_str().unwrap();
    let rt = Runtime::of(&sbx);
    // A foreground command that runs past the idle timeout keeps the sandbox busy.
    let (out, _, code) = rt.run("sleep 8; echo still-here").await;
    assert_eq!((out.as_str(), code), ("still-here\n", 0));
    assert_eq!(api.get(id).await["state"], "running");
    // Left alone, it is paused (its onTimeout) though its lifetime has long to go.
    api.wait_state(id, "paused", Duration::from_secs(90)).await;
    let (_, events) = api.fetch(&format!("/v1/sandboxes/{id}/events")).await;
    let timeouts: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "sandbox.timeout")
        .map(|e| &e["data"]["reason"])
        .collect();
    assert_eq!(timeouts, [&json!("idleTimeout")], "{events}");
    // autoResume: the next SDK call wakes it, and its idle clock starts over.
    let (out, _, _) = rt.run("echo back").await;
    assert_eq!(out, "back\n");
    // Woken, it stays up for a new idle period (a clock left over would pause it at
    // once), then idles out again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.get(id).await["state"], "running");
    api.wait_state(id, "paused", Duration::from_secs(90)).await;
    api.delete(id).await;
}
