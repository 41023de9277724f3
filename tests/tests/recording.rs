//! Sandbox recording end to end, through the public API (the wasm component in the
//! api-host) and a real pool manager with real VMs: a sandbox created with
//! `recording: true` runs commands (one failing, one in the background and attached to)
//! and a terminal session (typed into, resized, exited); once it is deleted its
//! recordings are listed and downloaded, and read as what happened. Another team sees
//! none of it; a sandbox without recording has none; a recording ID that is not one
//! goes nowhere.

use futures::{SinkExt, StreamExt};
use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::Stack;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A terminal of the sandbox behind `rt`, `cols` × `rows`.
async fn terminal(rt: &Runtime, cols: u16, rows: u16) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}/pty?cols={cols}&rows={rows}", rt.base).replacen("http://", "ws://", 1);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", rt.token).parse().unwrap(),
    );
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("the terminal opens within 30 s")
    .unwrap();
    ws
}

/// Reads the terminal until its screen (everything it wrote) contains `want`, or it
/// sends its exit message when `want` is `"exit"`; returns the screen.
async fn read_until(ws: &mut Ws, screen: &mut String, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if want != "exit" && screen.contains(want) {
            return;
        }
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} within 60 s; the screen: {screen:?}"))
            .expect("the terminal open")
            .expect("a message");
        match msg {
            Message::Binary(b) => screen.push_str(&String::from_utf8_lossy(&b)),
            Message::Text(t) if want == "exit" && t.contains("\"exit\"") => return,
            Message::Close(_) => panic!("the terminal closed before {want:?}: {screen:?}"),
            _ => {}
        }
    }
}

/// A raw GET on the public API: status, content type, body.
async fn get_raw(api: &Api, path: &str) -> (StatusCode, String, Vec<u8>) {
    let resp = api
        .http
        .get(format!("{}{path}", api.base))
        .header("X-API-Key", &api.key)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.bytes().await.unwrap().to_vec();
    (status, content_type, body)
}

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8(bytes.to_vec())
        .expect("a transcript is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test]
async fn commands_and_terminals_are_recorded_and_read_back_after_the_sandbox_ends() {
    let stack = Stack::start("recording");
    let api = stack.public(stack.daemon.team_key("acme"));
    let other = stack.public(stack.daemon.team_key("umbrella"));
    let sbx = api
        .create(json!({
            "templateID": "minimal",
            "resources": small(),
            "timeout": 300,
            "recording": true,
            "envVars": { "SECRET_TOKEN": "never-in-a-transcript" },
        }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(
        (sbx["state"].as_str(), sbx["recording"].as_bool()),
        (Some("running"), Some(true)),
        "{sbx}"
    );
    let rt = Runtime::of(&sbx);

    // A command that fails, writing to both streams.
    let (out, err, code) = rt.run("echo out-$((6*7)); echo oops >&2; exit 3").await;
    assert_eq!(
        (out.as_str(), err.as_str(), code),
        ("out-42\n", "oops\n", 3)
    );

    // One in the background (argv, a cwd), attached to until it exits.
    let started = rt
        .post(
            "/commands",
            json!({
                "argv": ["sh", "-c", "sleep 1; echo bg-done; echo $SECRET_TOKEN | wc -c"],
                "cwd": "/tmp",
                "background": true,
            }),
        )
        .await;
    assert_eq!(started.status(), StatusCode::CREATED);
    let pid = started.json::<Value>().await.unwrap()["pid"]
        .as_u64()
        .unwrap();
    let attached = rt
        .http
        .get(format!("{}/commands/{pid}", rt.base))
        .bearer_auth(&rt.token)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(attached.status(), StatusCode::OK);
    let events = json_lines(&attached.bytes().await.unwrap());
    assert_eq!(
        events.last().unwrap()["event"],
        "exit",
        "the attach streams to the end: {events:?}"
    );

    // A terminal: typed into, resized, exited.
    let mut pty = terminal(&rt, 80, 24).await;
    let mut screen = String::new();
    pty.send(Message::Binary(b"echo pty-$((6*7))\n".to_vec().into()))
        .await
        .unwrap();
    read_until(&mut pty, &mut screen, "pty-42").await;
    pty.send(Message::Text(
        json!({ "type": "resize", "cols": 100, "rows": 30 })
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    pty.send(Message::Binary(b"stty size\n".to_vec().into()))
        .await
        .unwrap();
    read_until(&mut pty, &mut screen, "30 100").await;
    pty.send(Message::Binary(b"exit\n".to_vec().into()))
        .await
        .unwrap();
    read_until(&mut pty, &mut screen, "exit").await;
    drop(pty);

    // While it runs, what it recorded so far is listed.
    let (status, v) = api.fetch(&format!("/v1/sandboxes/{id}/recordings")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let running: Vec<&str> = v["recordings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["recordingID"].as_str().unwrap())
        .collect();
    assert!(running.contains(&"commands.jsonl"), "{v}");

    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);

    // After the delete: one commands transcript and one terminal session.
    let (status, v) = api.fetch(&format!("/v1/sandboxes/{id}/recordings")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let list = v["recordings"].as_array().unwrap();
    let ids: Vec<(&str, &str)> = list
        .iter()
        .map(|r| {
            (
                r["recordingID"].as_str().unwrap(),
                r["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [("commands.jsonl", "commands"), ("pty-1.cast", "pty")],
        "{v}"
    );
    for r in list {
        assert!(r["sizeBytes"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["truncated"], false, "{r}");
        assert!(r["createdAt"].as_str().unwrap().ends_with('Z'), "{r}");
    }
    // Nothing stays on the host; the store's keys are under the team.
    let local = stack.daemon.state_dir().join("recordings");
    for team in std::fs::read_dir(&local).into_iter().flatten().flatten() {
        assert!(
            !team.path().join(&id).exists(),
            "the local transcripts of {id} outlived their upload"
        );
    }
    let stored: Vec<String> =
        std::fs::read_dir(stack.daemon.state_dir().join("objects/recordings"))
            .unwrap()
            .flatten()
            .filter(|team| team.path().join(&id).is_dir())
            .map(|team| team.file_name().to_string_lossy().into_owned())
            .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].starts_with("team-"), "{stored:?}");

    // The commands transcript: what ran, how it ended, what it wrote.
    let (status, content_type, body) = get_raw(
        &api,
        &format!("/v1/sandboxes/{id}/recordings/commands.jsonl"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/x-ndjson");
    let text = String::from_utf8_lossy(&body).into_owned();
    assert!(!text.contains("never-in-a-transcript"), "{text}");
    let lines = json_lines(&body);
    assert_eq!(lines[0]["type"], "recording", "{text}");
    assert_eq!(lines[0]["sandboxID"], id.as_str());
    let starts: Vec<&Value> = lines.iter().filter(|l| l["type"] == "start").collect();
    assert_eq!(starts.len(), 2, "{text}");
    let (failing, background) = (starts[0], starts[1]);
    assert_eq!(
        failing["cmd"], "echo out-$((6*7)); echo oops >&2; exit 3",
        "{text}"
    );
    assert_eq!(failing["background"], false);
    assert!(failing["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        background["argv"],
        json!([
            "sh",
            "-c",
            "sleep 1; echo bg-done; echo $SECRET_TOKEN | wc -c"
        ])
    );
    assert_eq!(
        (
            background["cwd"].as_str(),
            background["background"].as_bool()
        ),
        (Some("/tmp"), Some(true))
    );
    assert_eq!(background["pid"].as_u64(), Some(pid));
    let of = |start: &Value, kind: &str| -> Vec<Value> {
        lines
            .iter()
            .filter(|l| l["seq"] == start["seq"] && l["type"] == kind)
            .cloned()
            .collect()
    };
    let output = |start: &Value, stream: &str| -> String {
        of(start, "output")
            .iter()
            .filter(|l| l["stream"] == stream)
            .map(|l| l["data"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(output(failing, "stdout"), "out-42\n", "{text}");
    assert_eq!(output(failing, "stderr"), "oops\n", "{text}");
    let exit = of(failing, "exit");
    assert_eq!(exit.len(), 1, "{text}");
    assert_eq!(
        (exit[0]["exitCode"].as_i64(), exit[0]["signal"].is_null()),
        (Some(3), true),
        "{text}"
    );
    assert!(
        exit[0]["durationMs"].is_u64() && exit[0]["t"].is_f64(),
        "{text}"
    );
    let bg_out = output(background, "stdout");
    assert!(bg_out.starts_with("bg-done\n"), "{text}");
    let exit = of(background, "exit");
    assert_eq!(exit.len(), 1, "{text}");
    assert_eq!(exit[0]["exitCode"], 0, "{text}");
    // Timed from its start, not the attach: it slept a second first.
    assert!(exit[0]["durationMs"].as_u64().unwrap() >= 1000, "{text}");

    // The terminal session: asciicast v2 with output, input and the resize.
    let (status, content_type, body) =
        get_raw(&api, &format!("/v1/sandboxes/{id}/recordings/pty-1.cast")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/x-asciicast");
    let cast = json_lines(&body);
    let header = &cast[0];
    assert_eq!(header["version"], 2, "{header}");
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(80), Some(24)),
        "{header}"
    );
    assert!(
        header["timestamp"].as_u64().unwrap() > 1_600_000_000,
        "{header}"
    );
    let mut last_t = 0.0;
    let (mut out, mut typed, mut resizes) = (String::new(), String::new(), Vec::new());
    for e in &cast[1..] {
        let e = e
            .as_array()
            .unwrap_or_else(|| panic!("an event is an array: {e}"));
        assert_eq!(e.len(), 3, "{e:?}");
        let t = e[0].as_f64().unwrap();
        assert!(t >= last_t, "events are in time order: {e:?}");
        last_t = t;
        let data = e[2].as_str().unwrap();
        match e[1].as_str().unwrap() {
            "o" => out.push_str(data),
            "i" => typed.push_str(data),
            "r" => resizes.push(data.to_string()),
            other => panic!("unexpected event {other}: {e:?}"),
        }
    }
    assert!(out.contains("pty-42") && out.contains("30 100"), "{out:?}");
    // Keystrokes are never recorded (passwords typed with echo off); the echo is.
    assert!(typed.is_empty(), "{typed:?}");
    assert!(out.contains("echo pty-$((6*7))"), "{out:?}");
    assert_eq!(resizes, ["100x30"]);

    // Another team: the sandbox does not exist for it, nor do its recordings.
    let (status, v) = other.fetch(&format!("/v1/sandboxes/{id}/recordings")).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{v}"
    );
    let (status, _, _) = get_raw(
        &other,
        &format!("/v1/sandboxes/{id}/recordings/commands.jsonl"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Names that are not recording IDs go nowhere: not through the component, not
    // straight to the pool manager (which decodes the path), not to a stored key.
    let direct = Api::at(&stack.daemon.control, api.key.clone());
    for bad in [
        "..%2F..",
        "..%2F..%2Fsnapshots",
        "commands.jsonl%2Fmeta.json",
        "pty-1.cast%2F00000000",
        "meta.json",
    ] {
        for caller in [&api, &direct] {
            let (status, _, body) =
                get_raw(caller, &format!("/v1/sandboxes/{id}/recordings/{bad}")).await;
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            assert_eq!(
                (status, v["code"].as_str()),
                (StatusCode::BAD_REQUEST, Some("invalid_request")),
                "{bad} via {}: {v}",
                caller.base
            );
        }
    }
    // A well-formed ID it does not have.
    let (status, v) = api
        .fetch(&format!("/v1/sandboxes/{id}/recordings/pty-2.cast"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    // A sandbox without recording has none, and says so.
    let plain = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 120 }))
        .await;
    let plain_id = plain["sandboxID"].as_str().unwrap();
    assert_eq!(plain["recording"], false, "{plain}");
    let (out, _, code) = Runtime::of(&plain).run("echo unrecorded").await;
    assert_eq!((out.as_str(), code), ("unrecorded\n", 0));
    let (status, v) = api
        .fetch(&format!("/v1/sandboxes/{plain_id}/recordings"))
        .await;
    assert_eq!((status, &v), (StatusCode::OK, &json!({ "recordings": [] })));
    assert_eq!(api.delete(plain_id).await, StatusCode::NO_CONTENT);
    let (status, v) = api
        .fetch(&format!("/v1/sandboxes/{plain_id}/recordings"))
        .await;
    assert_eq!((status, &v), (StatusCode::OK, &json!({ "recordings": [] })));
}
