//! The workspace templates (`templates/*.json`), built by the daemon with the template
//! builder, as the operator's, in the background after start: listed with their status,
//! a create before the build is done is a 503 that says how far it is (never a wait),
//! every team starts from them by name once ready, a restart builds nothing, and what
//! each one is for works in a real VM: the agent template's tools, the code
//! interpreter's kernel (state kept across runs, a matplotlib figure as PNG, a
//! traceback, a separate context, an interrupt on timeout).
//!
//! Each build is minutes under TCG (measured ones are in docs/TEMPLATES.md), so every
//! wait here has its own deadline, and the daemon builds only the templates a test asks
//! for (`--workspace-templates NAME`).

use nullspace_tests::http::{Api, Runtime};
use nullspace_tests::Stack;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The longest a workspace template's build may take here (the builder's own deadline
/// is 30 minutes).
const BUILD_WITHIN: Duration = Duration::from_secs(30 * 60);

/// Waits for workspace template `name` to be ready; returns its view.
async fn wait_built(api: &Api, name: &str) -> Value {
    let deadline = Instant::now() + BUILD_WITHIN;
    let mut last = String::new();
    loop {
        let (status, t) = api.fetch(&format!("/v1/templates/{name}")).await;
        assert_eq!(status, StatusCode::OK, "{t}");
        assert_eq!(t["builtin"], true, "{t}");
        match t["status"].as_str() {
            Some("ready") => return t,
            Some("failed") => panic!("the {name} template failed to build: {t}"),
            _ => {}
        }
        let now = t["steps"].to_string();
        if now != last {
            eprintln!("{name}: {now}");
            last = now;
        }
        assert!(
            Instant::now() < deadline,
            "the {name} template was not built within {BUILD_WITHIN:?}: {t}"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// A create of `name` while it builds: a 503 naming its progress, at once.
async fn create_while_building(api: &Api, name: &str) {
    let asked = Instant::now();
    let (status, v) = api
        .post("/v1/sandboxes", json!({ "templateID": name }))
        .await;
    assert!(asked.elapsed() < Duration::from_secs(10), "a create waited");
    if status == StatusCode::CREATED {
        // Built already (a host whose catalog had it): nothing to check here.
        let id = v["sandboxID"].as_str().unwrap().to_string();
        api.delete(&id).await;
        return;
    }
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["code"], "template_building", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("being built")
            || v["message"].as_str().unwrap().contains("queued"),
        "{v}"
    );
    assert_eq!(v["details"]["templateID"], name, "{v}");
    assert!(v["details"]["progress"].is_string(), "{v}");
}

/// The helper's JSON events of one `nullspace-code` call.
async fn code(rt: &Runtime, args: &str, source: &str) -> Vec<Value> {
    let b64 = base64(source.as_bytes());
    let (out, err, status) = rt
        .run(&format!("nullspace-code {args} --code-b64 {b64}"))
        .await;
    let events: Vec<Value> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}\n{err}")))
        .collect();
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some(json!("done")),
        "exit {status}: {out}\n{err}"
    );
    events
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | ((*b as u32) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = B64.iter().position(|b| *b == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A PNG's width and height, from its IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&png[16..20]), be(&png[20..24]))
}

#[tokio::test]
async fn the_agent_template_builds_once_and_every_team_starts_from_it() {
    let stack = Stack::start_with("ws-agent", &["--workspace-templates", "agent"], &[]);
    let key = stack.daemon.team_key("acme");
    let api = stack.public(key.clone());
    let other = stack.public(stack.daemon.team_key("other"));

    // Listed at once with its status; a create before it is built is a 503.
    let (_, list) = api.fetch("/v1/templates").await;
    let ids: Vec<&str> = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["templateID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "minimal", "agent"], "{list}");
    create_while_building(&api, "agent").await;
    // Not a name a team may take, nor delete.
    let (status, v) = api
        .post("/v1/templates", json!({ "name": "agent", "steps": [] }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = api
        .call(reqwest::Method::DELETE, "/v1/templates/agent", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    // A host that does not build one says so.
    let (status, v) = api
        .post("/v1/sandboxes", json!({ "templateID": "desktop" }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    let started = Instant::now();
    let t = wait_built(&api, "agent").await;
    eprintln!(
        "agent template: built in {} ms (waited {:.0} s): {t}",
        t["buildMs"],
        started.elapsed().as_secs_f64()
    );

    // Every team starts from it by name: git, node, npm as the non-root user, in
    // /workspace, with a home made for coding agents.
    for api in [&api, &other] {
        let sbx = api.create(json!({ "templateID": "agent" })).await;
        let rt = Runtime::of(&sbx);
        let (out, err, status) = rt
            .run("id -un; pwd; git --version; node --version; npm --version; rg --version | head -1; jq --version; cc --version | head -1; pip3 --version | cut -c1-3; echo $PATH; git config --global init.defaultBranch")
            .await;
        assert_eq!(status, 0, "{out}\n{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "user", "{out}");
        assert_eq!(lines[1], "/workspace", "{out}");
        assert!(lines[2].starts_with("git version"), "{out}");
        assert!(lines[3].starts_with('v'), "node: {out}");
        assert!(
            lines[4].chars().next().unwrap().is_ascii_digit(),
            "npm: {out}"
        );
        assert!(lines[5].starts_with("ripgrep"), "{out}");
        assert!(lines[6].starts_with("jq-"), "{out}");
        assert!(out.contains("pip"), "{out}");
        assert!(out.contains("/home/user/.npm-global/bin"), "{out}");
        assert!(out.trim_end().ends_with("main"), "{out}");
        // A repository in the work tree, committed as the user.
        let (out, err, status) = rt
            .run("cd /workspace && git init -q demo && cd demo && echo hi > a && git add a && git commit -qm first && git log --format=%an")
            .await;
        assert_eq!((status, out.trim()), (0, "Sandbox Agent"), "{err}");
        assert_eq!(
            api.delete(sbx["sandboxID"].as_str().unwrap()).await,
            StatusCode::NO_CONTENT
        );
    }

    // A restart finds it built: ready at once, nothing rebuilt.
    let mut stack = stack;
    stack
        .daemon
        .restart_with(&["--workspace-templates", "agent"]);
    let api = Api::new(&stack.daemon, key);
    let (status, again) = api.fetch("/v1/templates/agent").await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["status"], "ready", "{again}");
    assert_eq!(again["readyAt"], t["readyAt"], "the same build: {again}");
}

#[test]
fn base64_round_trips() {
    for s in ["", "a", "ab", "abc", "abcd", "hello world!"] {
        assert_eq!(unbase64(&base64(s.as_bytes())), s.as_bytes());
    }
    assert_eq!(base64(b"hello"), "aGVsbG8=");
}

#[tokio::test]
async fn the_code_interpreter_keeps_state_returns_a_figure_and_reports_a_traceback() {
    let stack = Stack::start_with(
        "ws-code",
        &["--workspace-templates", "code-interpreter"],
        &[],
    );
    let api = stack.public(stack.daemon.team_key("acme"));
    create_while_building(&api, "code-interpreter").await;
    let t = wait_built(&api, "code-interpreter").await;
    eprintln!(
        "code-interpreter template: built in {} ms: {t}",
        t["buildMs"]
    );

    let created = Instant::now();
    let sbx = api
        .create(json!({ "templateID": "code-interpreter" }))
        .await;
    let rt = Runtime::of(&sbx);
    // The first run finds the kernel warm (it is in the template's snapshot).
    let events = code(&rt, "run --timeout 60", "x = 40\nx + 2").await;
    eprintln!(
        "create → first run_code result: {} ms",
        created.elapsed().as_millis()
    );
    let results = of_type(&events, "result");
    assert_eq!(results.len(), 1, "{events:?}");
    assert_eq!(results[0]["isMainResult"], true);
    assert_eq!(results[0]["data"]["text/plain"], "42");

    // State kept across calls; output streamed as it comes.
    let events = code(
        &rt,
        "run",
        "print('x is', x)\nimport sys; print('oops', file=sys.stderr)",
    )
    .await;
    let out: String = of_type(&events, "stdout")
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(out, "x is 40\n", "{events:?}");
    assert_eq!(of_type(&events, "stderr")[0]["text"], "oops\n");

    // A matplotlib figure comes back as a PNG.
    let events = code(
        &rt,
        "run --timeout 120",
        "import matplotlib.pyplot as plt\nfig = plt.figure(figsize=(4, 3), dpi=100)\nplt.plot([1, 2, 3], [4, 1, 9])\nplt.show()",
    )
    .await;
    let png = of_type(&events, "result")
        .into_iter()
        .find_map(|r| r["data"]["image/png"].as_str())
        .unwrap_or_else(|| panic!("no PNG: {events:?}"));
    let png = unbase64(&png.replace('\n', ""));
    let (w, h) = png_size(&png);
    assert!(
        (300..=500).contains(&w) && (200..=400).contains(&h),
        "{w}x{h}"
    );
    assert!(png.len() > 2000, "{} bytes", png.len());

    // An exception: its name, value and traceback.
    let events = code(&rt, "run", "def f():\n    return 1 / 0\nf()").await;
    let err = of_type(&events, "error");
    assert_eq!(err.len(), 1, "{events:?}");
    assert_eq!(err[0]["name"], "ZeroDivisionError");
    assert_eq!(err[0]["value"], "division by zero");
    let tb = err[0]["traceback"].to_string();
    assert!(tb.contains("f()") && !tb.contains("\\u001b["), "{tb}");

    // A context of its own: separate state.
    let (out, err, status) = rt.run("nullspace-code create-context").await;
    assert_eq!(status, 0, "{out}\n{err}");
    let ctx: Value = serde_json::from_str(out.trim()).unwrap();
    let ctx = ctx["id"].as_str().unwrap().to_string();
    let events = code(&rt, &format!("run --context {ctx}"), "x").await;
    assert_eq!(
        of_type(&events, "error")[0]["name"],
        "NameError",
        "{events:?}"
    );

    // Past its timeout the kernel is interrupted, and it keeps its state.
    let asked = Instant::now();
    let events = code(&rt, "run --timeout 3", "import time\ntime.sleep(60)").await;
    assert!(asked.elapsed() < Duration::from_secs(30), "{events:?}");
    assert_eq!(of_type(&events, "timeout").len(), 1, "{events:?}");
    assert_eq!(of_type(&events, "error")[0]["name"], "KeyboardInterrupt");
    let events = code(&rt, "run", "x").await;
    assert_eq!(of_type(&events, "result")[0]["data"]["text/plain"], "40");

    // Bash.
    let events = code(&rt, "run --language bash", "echo $((6 * 7))").await;
    assert_eq!(of_type(&events, "stdout")[0]["text"], "42\n", "{events:?}");
}

/// Runs headless Chromium on `url` until `connected()` says the page did what it should
/// (or `within` passes); returns whether it did. Chromium is killed either way.
async fn browse_until<F, Fut>(url: &str, within: Duration, mut connected: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let profile = nullspace_tests::ScratchDir::new("chromium-desktop");
    let mut browser = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        // A group of its own: its renderer and GPU processes end with it.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("chromium (deploy/install-deps.sh installs it)");
    let deadline = Instant::now() + within;
    let mut ok = false;
    while Instant::now() < deadline {
        if connected().await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(pid) = browser.id() {
        // SAFETY: kill(2) on a process group this test made.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    }
    let _ = browser.kill().await;
    // Helpers that left its group (crashpad) would write into the profile after its
    // removal: end whatever still names it.
    let _ = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &profile.path().display().to_string()])
        .status();
    ok
}

/// Decodes a PNG to RGB(A) rows: (width, height, channels, pixels).
fn decode_png(png: &[u8]) -> (u32, u32, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("a PNG frame");
    buf.truncate(info.buffer_size());
    (info.width, info.height, info.color_type.samples(), buf)
}

/// The share of pixels inside `(x, y, w, h)` of a decoded screenshot close to `rgb`.
fn share_of(shot: &(u32, u32, usize, Vec<u8>), area: (u32, u32, u32, u32), rgb: [u8; 3]) -> f64 {
    let (width, height, channels, pixels) = shot;
    let (x0, y0, w, h) = area;
    let (mut near, mut all) = (0u64, 0u64);
    for y in y0..(y0 + h).min(*height) {
        for x in x0..(x0 + w).min(*width) {
            let i = (y as usize * *width as usize + x as usize) * channels;
            let p = &pixels[i..i + 3];
            all += 1;
            if p.iter().zip(rgb).all(|(a, b)| a.abs_diff(b) < 24) {
                near += 1;
            }
        }
    }
    near as f64 / all.max(1) as f64
}

/// Polls `windows()` until one's title contains `title`.
async fn wait_window(
    desktop: &nullspace::Desktop<'_>,
    title: &str,
    within: Duration,
) -> nullspace::Window {
    let deadline = Instant::now() + within;
    loop {
        // wmctrl can meet a window that closed while it listed (BadWindow): look again.
        let windows = desktop.windows().await.unwrap_or_default();
        if let Some(w) = windows.into_iter().find(|w| w.title.contains(title)) {
            return w;
        }
        assert!(
            Instant::now() < deadline,
            "no window titled {title:?} within {within:?}: {:?}",
            desktop.windows().await
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn the_desktop_shows_its_viewer_and_an_opened_window_and_takes_clicks_and_keys() {
    let stack = Stack::start_with("ws-desktop", &["--workspace-templates", "desktop"], &[]);
    let key = stack.daemon.team_key("acme");
    let api = stack.public(key.clone());
    create_while_building(&api, "desktop").await;
    let t = wait_built(&api, "desktop").await;
    eprintln!("desktop template: built in {} ms", t["buildMs"]);

    let config = nullspace::ConnectionConfig::new(&stack.api.url, key);
    let sbx = nullspace::Sandbox::create(&config, &nullspace::CreateOptions::new("desktop"))
        .await
        .unwrap();
    let desktop = sbx.desktop();
    let log = |path: &'static str| {
        let sbx = &sbx;
        async move {
            sbx.commands()
                .run(&format!("cat {path} 2>/dev/null"))
                .await
                .map(|o| o.stdout)
                .unwrap_or_default()
        }
    };

    // The screen as the SDK sees it: 1280x800, nothing open yet.
    let before = decode_png(&desktop.screenshot().await.unwrap());
    assert_eq!((before.0, before.1), (1280, 800));

    // A real browser on the host loads the viewer through its signed preview URL, and
    // its WebSocket reaches the VNC server behind it: while the browser is open,
    // websockify holds a TCP connection to x11vnc (5900, or 5901 view-only).
    for (view_only, port_hex) in [(false, "170C"), (true, "170D")] {
        let url = desktop.viewer_url(view_only).await.unwrap();
        assert!(
            url.contains("/vnc.html?") && url.contains("autoconnect=1"),
            "{url}"
        );
        assert_eq!(url.contains("view_only=1"), view_only, "{url}");
        // Established (01) connections whose remote end is 127.0.0.1:<port>.
        let probe =
            format!("awk '$3 == \"0100007F:{port_hex}\" && $4 == \"01\"' /proc/net/tcp | wc -l");
        let (sbx_ref, probe) = (&sbx, &probe);
        let vnc_clients = move || async move {
            sbx_ref
                .commands()
                .run(probe)
                .await
                .map(|o| o.stdout.trim().parse::<u32>().unwrap_or(0))
                .unwrap_or(0)
        };
        assert_eq!(vnc_clients().await, 0, "a VNC client before the browser");
        let connected = browse_until(&url, Duration::from_secs(90), move || async move {
            vnc_clients().await > 0
        })
        .await;
        let page = sbx
            .commands()
            .run("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:6080/vnc.html; tail -5 /tmp/novnc*.log")
            .await
            .map(|o| o.stdout)
            .unwrap_or_default();
        assert!(connected, "the viewer ({url}) never reached x11vnc: {page}");
    }
    // By hand, on the preview listener: the viewer URL's token (percent-encoded, as the
    // SDKs' URL library writes it) is taken; without it, nothing.
    let viewer = reqwest::Url::parse(&desktop.viewer_url(false).await.unwrap()).unwrap();
    let (host, port) = (
        viewer.host_str().unwrap().to_string(),
        viewer.port().unwrap(),
    );
    let client = reqwest::Client::builder()
        .resolve(&host, ([127, 0, 0, 1], port).into())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let with_token = client.get(viewer.as_str()).send().await.unwrap();
    assert!(
        with_token.status().is_redirection() && with_token.headers().contains_key("set-cookie"),
        "{:?}",
        with_token
    );
    let bare = client
        .get(format!("http://{host}:{port}/vnc.html"))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), StatusCode::UNAUTHORIZED);

    // open(): a page in the desktop's browser; the SDK's screenshot shows its window.
    sbx.files()
        .write(
            "/tmp/hello.html",
            b"<html><head><title>nullspace-hello</title></head><body style='background:#cc0000'></body></html>".to_vec(),
        )
        .await
        .unwrap();
    desktop.open("file:///tmp/hello.html").await.unwrap();
    let w = wait_window(&desktop, "nullspace-hello", Duration::from_secs(240)).await;
    // Give the page a moment to paint after the title appears.
    let mut red = 0.0;
    for _ in 0..30 {
        let shot = decode_png(&desktop.screenshot().await.unwrap());
        let area = (
            w.x.max(0) as u32 + w.width / 4,
            w.y.max(0) as u32 + w.height / 2,
            w.width / 2,
            w.height / 4,
        );
        red = share_of(&shot, area, [0xcc, 0, 0]);
        if red > 0.9 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        red > 0.9,
        "the window {w:?} is not on the screenshot ({red:.2} red)"
    );
    assert!(
        share_of(&before, (0, 0, 1280, 800), [0xcc, 0, 0]) < 0.01,
        "red before anything was opened"
    );
    sbx.commands().run("pkill -f chromium; true").await.unwrap();

    // Clicks, scrolls and keys reach an application: xev prints what it gets.
    sbx.commands()
        .run("setsid -f sh -c 'DISPLAY=:0 exec stdbuf -oL xev -geometry 400x300+100+100 > /tmp/xev.log 2>&1' </dev/null >/dev/null 2>&1")
        .await
        .unwrap();
    let w = wait_window(&desktop, "Event Tester", Duration::from_secs(60)).await;
    let (cx, cy) = (w.x + w.width as i32 / 2, w.y + w.height as i32 / 2);
    desktop.left_click(Some((cx, cy))).await.unwrap();
    desktop.right_click(Some((cx, cy))).await.unwrap();
    desktop.double_click(None).await.unwrap();
    desktop.scroll(2).await.unwrap();
    desktop.type_text("hi").await.unwrap();
    desktop.press(&["Return"]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let seen = log("/tmp/xev.log").await;
        let pressed = |b: u8| seen.contains(&format!("button {b}, same_screen"));
        if pressed(1)
            && pressed(3)
            && pressed(5)
            && seen.contains("(keysym 0x68, h)")
            && seen.contains("(keysym 0x69, i)")
            && seen.contains("(keysym 0xff0d, Return)")
        {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "xev did not get them all: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        seen.matches("ButtonPress event").count() >= 5,
        "a click, a right click, a double click, two scrolls: {seen}"
    );
    // Bad input is refused with what to send instead.
    let e = desktop.press(&[]).await.unwrap_err();
    assert!(e.to_string().contains("at least one key"), "{e}");
    sbx.kill().await.unwrap();
}
