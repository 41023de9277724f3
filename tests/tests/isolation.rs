//! Isolation between teams (issue 19, item 7): every route of the control API (public and
//! internal), the data plane, the preview listener and the WebSockets, called by team B
//! with team A's IDs and names, answers exactly as for a thing that does not exist (404,
//! or the refusal an unknown ID gets too), and A's sandbox, event log, snapshot, volume,
//! template, warm pool, keys and previews stay as they were.
//!
//! Every call is made twice: with A's IDs and names, and with the same IDs and names
//! turned into ones that exist nowhere (the same shape, every hex digit a 0: a
//! "ghost"). The two answers must be the same once A's values are written as the ghost's:
//! an answer that differs says that A's thing exists.

use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::Stack;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The same ID with every hex digit after its prefix (`sbx-`, `snap-`, `tpl-`, `team-`)
/// a 0: the same shape, and nothing of that ID exists.
fn ghost(id: &str) -> String {
    let (prefix, rest) = match id.split_once('-') {
        Some((p, r)) if !p.bytes().all(|b| b.is_ascii_hexdigit()) => (format!("{p}-"), r),
        _ => (String::new(), id),
    };
    let zeroed: String = rest
        .chars()
        .map(|c| if c.is_ascii_hexdigit() { '0' } else { c })
        .collect();
    format!("{prefix}{zeroed}")
}

/// A's values and what stands for each in the ghost twin of a request.
struct Subs(Vec<(String, String)>);

impl Subs {
    fn apply(&self, s: &str) -> String {
        self.0
            .iter()
            .fold(s.to_string(), |acc, (from, to)| acc.replace(from, to))
    }

    fn apply_json(&self, v: &Value) -> Value {
        serde_json::from_str(&self.apply(&v.to_string())).unwrap()
    }
}

/// One call of the control API matrix.
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
    /// What a caller gets for a thing that does not exist (404, or 403 on the
    /// operator's routes, which a team key never passes whatever the team).
    expect: StatusCode,
}

fn call(method: Method, path: String, body: Option<Value>) -> Call {
    Call {
        method,
        path,
        body,
        expect: StatusCode::NOT_FOUND,
    }
}

/// The view of a sandbox without its runtime access (a fresh token on every read).
fn without_runtime(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("runtime");
    v
}

async fn fetch_ok(api: &Api, path: &str) -> Value {
    let (status, v) = api.fetch(path).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {v}");
    v
}

/// Everything of A's that the matrix must leave as it was.
async fn state_of_a(a: &Api, sbx: &str, vol: &str, tpl: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("detail", without_runtime(a.get(sbx).await)),
        (
            "events",
            fetch_ok(a, &format!("/v1/sandboxes/{sbx}/events")).await,
        ),
        (
            "snapshots",
            fetch_ok(a, &format!("/v1/sandboxes/{sbx}/snapshots")).await,
        ),
        ("volume", fetch_ok(a, &format!("/v1/volumes/{vol}")).await),
        ("volumes", fetch_ok(a, "/v1/volumes").await),
        (
            "template",
            fetch_ok(a, &format!("/v1/templates/{tpl}")).await,
        ),
        (
            "warm pool",
            fetch_ok(a, &format!("/v1/templates/{tpl}/warm-pool")).await,
        ),
        ("keys", fetch_ok(a, "/v1/keys").await),
        ("sandboxes", {
            let mut v = fetch_ok(a, "/v1/sandboxes").await;
            for s in v["sandboxes"].as_array_mut().unwrap() {
                s.as_object_mut().unwrap().remove("runtime");
            }
            v
        }),
    ]
}

/// Requests to the preview listener under a preview host name.
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

    async fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
        let mut req = self
            .http
            .get(format!("{}{path}", self.listener))
            .header("Host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }
}

/// The headers of a WebSocket upgrade request.
const UPGRADE: &[(&str, &str)] = &[
    ("connection", "upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// One call of the data plane: method, URL, headers, body; status and body text.
async fn edge_call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (StatusCode, String) {
    let mut req = http.request(method, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b.to_vec());
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.text().await.unwrap_or_default())
}

#[tokio::test]
async fn another_teams_ids_and_names_answer_as_unknown_ones_and_change_nothing() {
    let stack = Stack::start("isolation");
    let d = &stack.daemon;
    let team_a: Value = serde_json::from_str(&d.admin(&["team", "create", "alpha"])).unwrap();
    let a_team_id = team_a["id"].as_str().unwrap().to_string();
    let a = stack.public(d.admin(&["key", "create", "--team", "alpha"]));
    let b = stack.public(d.team_key("bravo"));
    let b_internal = Api::new(d, b.key.clone());

    // Team A makes one of everything. The template build first: it runs beside the
    // creates.
    let (a_vol_name, a_tpl_name) = ("alpha-vol-7f3", "alpha-tpl-7f3");
    let (status, tpl) = a
        .post(
            "/v1/templates",
            json!({ "name": a_tpl_name, "from": "minimal", "resources": small() }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{tpl}");
    let a_tpl = tpl["templateID"].as_str().unwrap().to_string();
    let a_sbx = a
        .create(json!({
            "templateID": "minimal",
            "resources": small(),
            "metadata": { "owner": "alpha", "secret": "alpha-meta-7f3" },
            "timeout": 900
        }))
        .await;
    let a_id = a_sbx["sandboxID"].as_str().unwrap().to_string();
    let a_rt = Runtime::of(&a_sbx);
    let b_sbx = b
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 900 }))
        .await;
    let b_id = b_sbx["sandboxID"].as_str().unwrap().to_string();
    let b_rt = Runtime::of(&b_sbx);

    let (status, snap) = a
        .post(&format!("/v1/sandboxes/{a_id}/snapshots"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let a_snap = snap["snapshotID"].as_str().unwrap().to_string();
    let (status, vol) = a
        .post("/v1/volumes", json!({ "name": a_vol_name, "sizeMiB": 16 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{vol}");
    let a_vol = vol["volumeID"].as_str().unwrap().to_string();
    let (_, keys) = a.fetch("/v1/keys").await;
    let a_key_id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1, "{keys}");

    // A web server in A's sandbox, and a preview of its port.
    let resp = a_rt
        .post(
            "/commands",
            json!({
                "cmd": "mkdir -p /tmp/www && echo isolation-page > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:8000 -h /tmp/www",
                "background": true
            }),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let (status, a_preview) = a
        .post(
            &format!("/v1/sandboxes/{a_id}/previews"),
            json!({ "port": 8000 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{a_preview}");
    let p = Preview::new(&stack);
    let a_host = p.host(&a_id, 8000);
    let a_proxy_token = a_preview["proxyTarget"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let a_url_token = a_preview["token"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, page) = p
            .get(
                &a_host,
                "/",
                &[("x-nullspace-preview-proxy-token", &a_proxy_token)],
            )
            .await;
        if status == StatusCode::OK {
            assert!(page.contains("isolation-page"), "{page}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's preview never served: {status} {page}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The template's build ends; A gives it a warm pool (empty: no VM).
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let t = fetch_ok(&a, &format!("/v1/templates/{a_tpl}")).await;
        if t["status"] != "building" {
            assert_eq!(t["status"], "ready", "{t}");
            break;
        }
        assert!(Instant::now() < deadline, "the build never ended: {t}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (status, pool) = a
        .call(
            Method::PUT,
            &format!("/v1/templates/{a_tpl}/warm-pool"),
            Some(json!({ "size": 0 })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{pool}");

    let before = state_of_a(&a, &a_id, &a_vol, &a_tpl).await;
    let last_event = before[1].1["events"].as_array().unwrap().last().unwrap()["id"].clone();
    assert!(last_event.is_u64(), "{}", before[1].1);

    let subs = Subs(vec![
        (a_snap.clone(), ghost(&a_snap)),
        (a_id.clone(), ghost(&a_id)),
        (a_vol.clone(), ghost(&a_vol)),
        (a_vol_name.into(), "ghost-vol-000".into()),
        (a_tpl.clone(), ghost(&a_tpl)),
        (a_tpl_name.into(), "ghost-tpl-000".into()),
        (a_key_id.clone(), ghost(&a_key_id)),
        (a_team_id.clone(), ghost(&a_team_id)),
        ("alpha".into(), "ghost".into()),
    ]);
    for (from, to) in &subs.0 {
        assert_ne!(from, to);
    }

    // The control API matrix: B with A's IDs and names. Harmless calls first, the ones
    // that would destroy something (were they to pass) last.
    let get = |path: String| call(Method::GET, path, None);
    let post = |path: String, body: Value| call(Method::POST, path, Some(body));
    let delete = |path: String| call(Method::DELETE, path, None);
    let sbx = format!("/v1/sandboxes/{a_id}");
    let small_with = |extra: Value| {
        let mut body = json!({ "templateID": "minimal", "resources": small() });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let mut calls = vec![
        get(sbx.clone()),
        get(format!("{sbx}?fields=state,metadata")),
        get(format!("{sbx}/events")),
        get(format!("{sbx}/events?after_event_id=0&limit=10")),
        get(format!("{sbx}/logs")),
        get(format!("{sbx}/metrics")),
        get(format!("{sbx}/snapshots")),
        post(format!("{sbx}/connect"), json!({})),
        post(format!("{sbx}/connect"), json!({ "timeout": 60 })),
        post(format!("{sbx}/timeout"), json!({ "timeout": 60 })),
        post(format!("{sbx}/refreshes"), json!({ "duration": 60 })),
        post(format!("{sbx}/refreshes"), json!({})),
        post(format!("{sbx}/previews"), json!({ "port": 8000 })),
        post(
            format!("{sbx}/previews"),
            json!({ "port": 8000, "public": true }),
        ),
        call(
            Method::PUT,
            format!("{sbx}/egress"),
            Some(json!({ "internet": false, "allow": ["example.com"] })),
        ),
        post(format!("{sbx}/pause"), json!({})),
        post(format!("{sbx}/resume"), json!({})),
        post(format!("{sbx}/hibernate"), json!({})),
        post(format!("{sbx}/snapshots"), json!({})),
        post(format!("{sbx}/fork"), json!({ "count": 1 })),
        post("/v1/sandboxes/restore".into(), json!({ "sandboxID": a_id })),
        post(
            "/v1/sandboxes/restore".into(),
            json!({ "sandboxID": a_id, "snapshotID": a_snap }),
        ),
        post(
            "/v1/sandboxes/restore".into(),
            json!({ "sandboxID": b_id, "snapshotID": a_snap }),
        ),
        post(
            "/v1/sandboxes".into(),
            json!({ "templateID": a_snap, "timeout": 60 }),
        ),
        post(
            "/v1/sandboxes".into(),
            json!({ "templateID": a_tpl, "timeout": 60 }),
        ),
        post(
            "/v1/sandboxes".into(),
            json!({ "templateID": a_tpl_name, "timeout": 60 }),
        ),
        post(
            "/v1/sandboxes".into(),
            json!({ "templateID": a_tpl, "warmPool": "require" }),
        ),
        post(
            "/v1/sandboxes".into(),
            small_with(json!({ "mounts": { "/mnt/a": { "id": a_vol_name } } })),
        ),
        post(
            "/v1/sandboxes".into(),
            small_with(json!({ "mounts": { "/mnt/a": { "id": a_vol, "type": "ro" } } })),
        ),
        get(format!("/v1/volumes/{a_vol}")),
        get(format!("/v1/volumes/{a_vol_name}")),
        get(format!("/v1/templates/{a_tpl}")),
        get(format!("/v1/templates/{a_tpl_name}")),
        get(format!("/v1/templates/{a_tpl}/logs")),
        get(format!("/v1/templates/{a_tpl_name}/logs?after=0&wait=0")),
        get(format!("/v1/templates/{a_tpl}/warm-pool")),
        get(format!("/v1/templates/{a_tpl_name}/warm-pool")),
        call(
            Method::PUT,
            format!("/v1/templates/{a_tpl}/warm-pool"),
            Some(json!({ "size": 1, "resources": small() })),
        ),
        call(
            Method::PUT,
            format!("/v1/templates/{a_tpl_name}/warm-pool"),
            Some(json!({ "size": 0 })),
        ),
    ];
    // The operator's routes: a team key is refused whatever the team, A's or none.
    for team in [a_team_id.as_str(), "alpha"] {
        for c in [
            get(format!("/v1/teams/{team}")),
            get(format!("/v1/teams/{team}/quota")),
            call(
                Method::PUT,
                format!("/v1/teams/{team}/quota"),
                Some(json!({ "sandboxes": 100 })),
            ),
            get(format!("/v1/teams/{team}/keys")),
            post(format!("/v1/teams/{team}/keys"), json!({})),
        ] {
            calls.push(Call {
                expect: StatusCode::FORBIDDEN,
                ..c
            });
        }
    }
    calls.extend([
        delete(format!("/v1/sandboxes/{b_id}/snapshots/{a_snap}")),
        delete(format!("{sbx}/snapshots/{a_snap}")),
        delete(format!("/v1/volumes/{a_vol_name}")),
        delete(format!("/v1/volumes/{a_vol}")),
        delete(format!("/v1/templates/{a_tpl_name}")),
        delete(format!("/v1/templates/{a_tpl}")),
        post(format!("/v1/keys/{a_key_id}/rotate"), json!({})),
        post(
            format!("/v1/keys/{a_key_id}/rotate"),
            json!({ "graceSeconds": 0 }),
        ),
        delete(format!("/v1/keys/{a_key_id}")),
        delete(sbx.clone()),
    ]);

    let mut leaks: Vec<String> = Vec::new();
    for (api, which) in [(&b, "public"), (&b_internal, "internal")] {
        for c in &calls {
            let route = format!(
                "{which} {} {}{}",
                c.method,
                c.path,
                c.body.as_ref().map(|b| format!(" {b}")).unwrap_or_default()
            );
            let (status, v) = api.call(c.method.clone(), &c.path, c.body.clone()).await;
            let (ghost_status, ghost_v) = api
                .call(
                    c.method.clone(),
                    &subs.apply(&c.path),
                    c.body.as_ref().map(|b| subs.apply_json(b)),
                )
                .await;
            if status != c.expect {
                leaks.push(format!(
                    "{route}: {status} {v} (expected {})",
                    c.expect.as_u16()
                ));
            } else if (status, subs.apply(&v.to_string())) != (ghost_status, ghost_v.to_string()) {
                leaks.push(format!(
                    "{route}: {status} {v}, but for an unknown one: {ghost_status} {ghost_v}"
                ));
            }
        }
    }
    let control_routes = calls.len();

    // B's lists name nothing of A's; the operator's list is not B's to read.
    let a_values: Vec<&String> = subs.0.iter().map(|(from, _)| from).collect();
    for path in [
        "/v1/sandboxes",
        "/v1/sandboxes?metadata=owner%3Dalpha",
        "/v1/sandboxes?state=running,paused",
        "/v1/volumes",
        "/v1/templates",
        "/v1/keys",
        "/v1/observability/summary",
    ] {
        let (status, v) = b.fetch(path).await;
        let text = v.to_string();
        if status != StatusCode::OK {
            leaks.push(format!("public GET {path}: {status} {v} (expected 200)"));
        }
        for value in &a_values {
            if text.contains(value.as_str()) {
                leaks.push(format!("public GET {path} names A's {value}: {v}"));
            }
        }
    }
    let (_, v) = b.fetch("/v1/sandboxes?metadata=owner%3Dalpha").await;
    if v["sandboxes"] != json!([]) {
        leaks.push(format!("B's list by A's metadata: {v}"));
    }
    let (status, v) = b.fetch("/v1/teams").await;
    if status != StatusCode::FORBIDDEN {
        leaks.push(format!("public GET /v1/teams by a team key: {status} {v}"));
    }
    // The public host's own metrics (no key) name no sandbox. (The pool manager's
    // `/metrics` does, keyless, by design: it is bound to loopback with the control API.)
    let text = reqwest::get(format!("{}/metrics", stack.api.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    if text.contains(&a_id) {
        leaks.push(format!(
            "the public host's /metrics names A's sandbox {a_id}"
        ));
    }

    // The data plane with B's credentials on A's sandbox: refused as for a sandbox that
    // does not exist (B's runtime token: 403, it is another sandbox's; B's API key on the
    // lifecycle stream: 404).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let a_base = b_rt.base.replace(&b_id, &a_id);
    let bearer_token = format!("Bearer {}", b_rt.token);
    let bearer_key = format!("Bearer {}", b.key);
    let token = ("authorization", bearer_token.as_str());
    let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
    // (method, path, a WebSocket upgrade?, credentials, body, the answer expected)
    type EdgeCall<'a> = (
        Method,
        &'a str,
        bool,
        (&'a str, &'a str),
        Option<&'a [u8]>,
        u16,
    );
    let dataplane: Vec<EdgeCall> = vec![
        (
            post.clone(),
            "/commands",
            false,
            token,
            Some(&br#"{"cmd":"echo leaked > /tmp/leak"}"#[..]),
            403,
        ),
        (get.clone(), "/commands", false, token, None, 403),
        (get.clone(), "/commands/1", false, token, None, 403),
        (
            post.clone(),
            "/commands/1/stdin?eof=true",
            false,
            token,
            Some(&b"x"[..]),
            403,
        ),
        (
            post.clone(),
            "/commands/1/signal",
            false,
            token,
            Some(&br#"{"signal":9}"#[..]),
            403,
        ),
        (
            get.clone(),
            "/files?path=/tmp/www/index.html",
            false,
            token,
            None,
            403,
        ),
        (
            put,
            "/files?path=/tmp/www/index.html",
            false,
            token,
            Some(&b"leaked"[..]),
            403,
        ),
        (delete, "/files?path=/tmp/www", false, token, None, 403),
        (
            get.clone(),
            "/files/list?path=/tmp",
            false,
            token,
            None,
            403,
        ),
        (
            get.clone(),
            "/files/stat?path=/tmp",
            false,
            token,
            None,
            403,
        ),
        (
            post.clone(),
            "/files/mkdir",
            false,
            token,
            Some(&br#"{"path":"/tmp/leak"}"#[..]),
            403,
        ),
        (
            post,
            "/files/rename",
            false,
            token,
            Some(&br#"{"from":"/tmp/www","to":"/tmp/gone"}"#[..]),
            403,
        ),
        (
            get.clone(),
            "/files/watch?path=/tmp",
            false,
            token,
            None,
            403,
        ),
        (get.clone(), "/lifecycle/ws", true, token, None, 403),
        (
            get.clone(),
            "/lifecycle/ws?after_event_id=0",
            true,
            ("x-api-key", b.key.as_str()),
            None,
            404,
        ),
        (
            get.clone(),
            "/lifecycle/ws?live_only=true",
            true,
            ("authorization", bearer_key.as_str()),
            None,
            404,
        ),
        (get.clone(), "/pty", true, token, None, 403),
        (get.clone(), "/pty?cmd=id", true, token, None, 403),
        (get, "/ports/8000/ws", true, token, None, 403),
    ];
    let dataplane_routes = dataplane.len();
    for (method, path, ws, auth, body, expect) in &dataplane {
        let mut headers: Vec<(&str, &str)> = if *ws { UPGRADE.to_vec() } else { Vec::new() };
        headers.push(*auth);
        let url = format!("{a_base}{path}");
        let route = format!("data plane {method} {url} with {}", auth.0);
        let (status, text) = edge_call(&http, method.clone(), &url, &headers, *body).await;
        let (ghost_status, ghost_text) =
            edge_call(&http, method.clone(), &subs.apply(&url), &headers, *body).await;
        if status.as_u16() != *expect {
            leaks.push(format!("{route}: {status} {text} (expected {expect})"));
        } else if (status, subs.apply(&text)) != (ghost_status, ghost_text.clone()) {
            leaks.push(format!(
                "{route}: {status} {text}, but for an unknown sandbox: {ghost_status} {ghost_text}"
            ));
        }
    }

    // The preview listener: A's host with what B holds (a preview of B's own port 8000,
    // B's runtime token, nothing) answers exactly as an unknown sandbox's host.
    let (status, b_preview) = b
        .post(
            &format!("/v1/sandboxes/{b_id}/previews"),
            json!({ "port": 8000 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{b_preview}");
    let b_url_token = b_preview["token"].as_str().unwrap().to_string();
    let b_proxy_token = b_preview["proxyTarget"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let url_path = format!("/?ns_preview_token={b_url_token}");
    let b_cookie = format!("ns_preview_8000={b_url_token}");
    // (what B sends, the path, the headers)
    type PreviewCall<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
    let previews: Vec<PreviewCall> = vec![
        ("B's preview URL token", url_path.as_str(), vec![]),
        (
            "B's proxy token",
            "/",
            vec![("x-nullspace-preview-proxy-token", b_proxy_token.as_str())],
        ),
        (
            "B's preview cookie",
            "/",
            vec![("cookie", b_cookie.as_str())],
        ),
        (
            "B's runtime token as a proxy token",
            "/",
            vec![("x-nullspace-preview-proxy-token", b_rt.token.as_str())],
        ),
        ("no token", "/", vec![]),
        (
            "a WebSocket upgrade with B's proxy token",
            "/ws",
            UPGRADE
                .iter()
                .copied()
                .chain([("x-nullspace-preview-proxy-token", b_proxy_token.as_str())])
                .collect(),
        ),
    ];
    let preview_routes = previews.len();
    for (what, path, headers) in &previews {
        let route = format!("preview {a_host}{path} with {what}");
        let (status, text) = p.get(&a_host, path, headers).await;
        let (ghost_status, ghost_text) = p.get(&subs.apply(&a_host), path, headers).await;
        if !status.is_client_error() {
            leaks.push(format!("{route}: {status} {text} (expected a refusal)"));
        } else if (status, subs.apply(&text)) != (ghost_status, ghost_text.clone()) {
            leaks.push(format!(
                "{route}: {status} {text}, but for an unknown sandbox: {ghost_status} {ghost_text}"
            ));
        }
    }

    // After it all, A's things are as they were: the sandbox (state, metadata, timeout,
    // expiry, timeline, egress), its event log, its snapshot, the volume, the template
    // and its warm pool, A's key.
    let after = state_of_a(&a, &a_id, &a_vol, &a_tpl).await;
    for ((what, was), (_, is)) in before.iter().zip(&after) {
        assert_eq!(was, is, "A's {what} changed");
    }
    assert_eq!(
        after[1].1["events"].as_array().unwrap().last().unwrap()["id"],
        last_event
    );
    assert!(
        after[2].1["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["snapshotID"] == a_snap.as_str()),
        "{}",
        after[2].1
    );
    // A's runtime token, preview token and port are A's still, and the port private.
    let (out, _, code) = a_rt.run("cat /tmp/www/index.html; ls /tmp").await;
    assert_eq!(code, 0);
    assert_eq!(out, "isolation-page\nwww\n", "B wrote into A's sandbox");
    let (status, page) = p
        .get(
            &a_host,
            "/",
            &[("x-nullspace-preview-proxy-token", &a_proxy_token)],
        )
        .await;
    assert_eq!(
        (status, page.contains("isolation-page")),
        (StatusCode::OK, true),
        "{page}"
    );
    let (status, _) = p
        .get(&a_host, &format!("/?ns_preview_token={a_url_token}"), &[])
        .await;
    assert_eq!(status, StatusCode::FOUND);
    let (status, _) = p.get(&a_host, "/", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "A's port became public");

    // Names are per team: B may have a volume named as A's, and nothing says A has one.
    let (status, v) = b
        .post("/v1/volumes", json!({ "name": a_vol_name, "sizeMiB": 16 }))
        .await;
    if status != StatusCode::CREATED {
        leaks.push(format!(
            "public POST /v1/volumes named as A's volume: {status} {v} (expected 201)"
        ));
    } else {
        let (status, _) = b
            .call(
                Method::DELETE,
                &format!("/v1/volumes/{}", v["volumeID"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }

    eprintln!(
        "isolation: {control_routes} control API calls (public and internal), {dataplane_routes} data-plane calls, {preview_routes} preview calls; each also with unknown IDs"
    );
    assert!(
        leaks.is_empty(),
        "LEAKS: team B reached or learned of team A's things ({}):\n{}",
        leaks.len(),
        leaks.join("\n")
    );

    // Nothing is left behind.
    let (status, v) = a
        .call(
            Method::DELETE,
            &format!("/v1/sandboxes/{a_id}/snapshots/{a_snap}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(a.delete(&a_id).await, StatusCode::NO_CONTENT);
    assert_eq!(b.delete(&b_id).await, StatusCode::NO_CONTENT);
    let (status, v) = a
        .call(Method::DELETE, &format!("/v1/volumes/{a_vol}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (status, v) = a
        .call(Method::DELETE, &format!("/v1/templates/{a_tpl}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    for api in [&a, &b] {
        let (_, v) = api.fetch("/v1/sandboxes").await;
        assert_eq!(v["sandboxes"], json!([]), "{v}");
        let (_, v) = api.fetch("/v1/volumes").await;
        assert_eq!(v, json!([]), "{v}");
    }
}
