//! `nullspace sandbox play`: a recording back in the terminal. An asciicast v2 terminal
//! session is written at its own pace (scaled by `--speed`, pauses capped so an idle
//! hour does not replay as an hour); a commands transcript (JSON lines) is printed as a
//! shell session would have looked.

use std::io::Write;
use std::time::Duration;

/// The longest pause replayed, in seconds (asciinema's idle limit does the same).
const MAX_PAUSE_S: f64 = 2.0;

/// Plays `bytes` (an asciicast v2 file, or a commands transcript) to stdout.
pub async fn play(bytes: &[u8], speed: f64) -> anyhow::Result<()> {
    if !(speed >= 0.0 && speed.is_finite()) {
        anyhow::bail!("--speed {speed} is not a speed; send 0 (no pauses) or a positive number");
    }
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.lines();
    let Some(first) = lines.next() else {
        return Ok(());
    };
    let head: serde_json::Value = serde_json::from_str(first)
        .map_err(|e| anyhow::anyhow!("the recording does not start with JSON: {e}"))?;
    if head.get("version").and_then(|v| v.as_u64()) == Some(2) {
        play_cast(lines, speed).await
    } else {
        print_transcript(std::iter::once(first).chain(lines))
    }
}

async fn play_cast<'a>(lines: impl Iterator<Item = &'a str>, speed: f64) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    let mut last = 0.0f64;
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let event: (f64, String, String) = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("an asciicast event is not [time, code, data]: {e}"))?;
        let (at, code, data) = event;
        if speed > 0.0 {
            let pause = (at - last).clamp(0.0, MAX_PAUSE_S) / speed;
            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        }
        last = at;
        match code.as_str() {
            "o" => {
                out.write_all(data.as_bytes())?;
                out.flush()?;
            }
            // A resize cannot be replayed on the viewer's terminal: say it happened.
            "r" => eprintln!("\r\n[resized to {data}]"),
            _ => {}
        }
    }
    Ok(())
}

/// A commands transcript (`recording.rs` on the pool manager writes it): `start`,
/// `output` and `exit` lines per command; other kinds are shown as they are.
fn print_transcript<'a>(lines: impl Iterator<Item = &'a str>) -> anyhow::Result<()> {
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("a transcript line is not JSON: {e}"))?;
        match v["type"].as_str() {
            // The header: what was recorded, not what happened.
            Some("recording") => {}
            Some("start") => match (v["cmd"].as_str(), &v["argv"]) {
                (Some(cmd), _) => println!("$ {cmd}"),
                (None, argv) => println!("$ {argv}"),
            },
            Some("output") => print!("{}", v["data"].as_str().unwrap_or_default()),
            Some("exit") => println!("[exit {}]", v["exitCode"]),
            Some("truncated") => println!("[the recording was truncated here: its size limit]"),
            _ => println!("{line}"),
        }
    }
    Ok(())
}
