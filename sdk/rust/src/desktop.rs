//! The desktop of a `desktop` sandbox (Xvfb on `:0`, openbox, x11vnc and noVNC;
//! docs/TEMPLATES.md): its viewer's signed URL, screenshots, the mouse and keyboard
//! (xdotool), opening URLs and files, and its windows (wmctrl). Every action is a
//! command through the commands data plane, as the Python and TypeScript SDKs do it.

use crate::code::{quote, uuid_like};
use crate::commands::RunOptions;
use crate::{CommandResult, Error, Result, Sandbox};
use std::collections::BTreeMap;

/// The desktop template's viewer ports: noVNC over x11vnc, interactive and view-only.
pub const DESKTOP_VIEWER_PORT: u16 = 6080;
/// The view-only viewer's port.
pub const DESKTOP_VIEW_ONLY_PORT: u16 = 6081;

/// The noVNC page of a signed preview URL: connects at once and scales to the window.
pub fn desktop_viewer_url(preview_url: &str, view_only: bool) -> Result<String> {
    let mut url = reqwest::Url::parse(preview_url)
        .map_err(|e| Error::Protocol(format!("preview URL {preview_url:?}: {e}")))?;
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| {
            !matches!(
                k.as_ref(),
                "autoconnect" | "resize" | "reconnect" | "path" | "view_only"
            )
        })
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.set_path("/vnc.html");
    {
        let mut q = url.query_pairs_mut();
        q.clear();
        for (k, v) in &kept {
            q.append_pair(k, v);
        }
        q.append_pair("autoconnect", "1");
        q.append_pair("resize", "scale");
        q.append_pair("reconnect", "1");
        q.append_pair("path", "websockify");
        if view_only {
            q.append_pair("view_only", "1");
        }
    }
    Ok(url.to_string())
}

/// A window on the desktop, as `wmctrl -l -p -G` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The X window ID (`0x…`).
    pub id: String,
    /// Its virtual desktop (-1: sticky).
    pub desktop: i32,
    /// The process that owns it (0 when unknown).
    pub pid: u32,
    /// Left edge, in pixels.
    pub x: i32,
    /// Top edge, in pixels.
    pub y: i32,
    /// Width, in pixels.
    pub width: u32,
    /// Height, in pixels.
    pub height: u32,
    /// Its title.
    pub title: String,
}

/// Parses `wmctrl -l -p -G` output; lines that are not a window are skipped.
pub fn parse_windows(out: &str) -> Vec<Window> {
    out.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let id = f.next()?.to_string();
            let desktop = f.next()?.parse().ok()?;
            let pid = f.next()?.parse().ok()?;
            let x = f.next()?.parse().ok()?;
            let y = f.next()?.parse().ok()?;
            let width = f.next()?.parse().ok()?;
            let height = f.next()?.parse().ok()?;
            let _machine = f.next()?;
            let title = f.collect::<Vec<_>>().join(" ");
            Some(Window {
                id,
                desktop,
                pid,
                x,
                y,
                width,
                height,
                title,
            })
        })
        .collect()
}

/// The most steps one scroll may take.
const MAX_SCROLL: u32 = 1000;

/// Screen coordinates are never negative (xdotool would read `-5` as an option).
fn check_point(at: Option<(i32, i32)>) -> Result<()> {
    match at {
        Some((x, y)) if x < 0 || y < 0 => Err(Error::invalid(format!(
            "({x}, {y}) is off the screen; send coordinates of 0 or more"
        ))),
        _ => Ok(()),
    }
}

/// A mouse button, as xdotool numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Button {
    Left = 1,
    Right = 3,
}

/// The shell command of a click: `repeat` presses of `button`, at `at` if given.
fn click_command(button: Button, repeat: u32, at: Option<(i32, i32)>) -> String {
    let moved = at
        .map(|(x, y)| format!("xdotool mousemove --sync {x} {y} && "))
        .unwrap_or_default();
    format!(
        "{moved}xdotool click --repeat {repeat} --delay 80 {}",
        button as u8
    )
}

/// The shell command that scrolls `amount` steps (down when positive).
fn scroll_command(amount: i32) -> String {
    let button = if amount > 0 { 5 } else { 4 };
    format!(
        "xdotool click --repeat {} --delay 30 {button}",
        amount.unsigned_abs()
    )
}

/// The shell command that opens a URL in the browser, or a file with its application,
/// detached from the command (it outlives it).
fn open_command(target: &str) -> String {
    let opener = if target.contains("://") {
        "x-www-browser"
    } else {
        "xdg-open"
    };
    format!(
        "setsid -f {opener} {} >/dev/null 2>&1 </dev/null",
        quote(target)
    )
}

/// The desktop of a `desktop` sandbox; see [`Sandbox::desktop`].
pub struct Desktop<'a> {
    sandbox: &'a Sandbox,
}

impl Desktop<'_> {
    async fn run(&self, cmd: &str, what: &str) -> Result<CommandResult> {
        let envs = BTreeMap::from([("DISPLAY".to_string(), ":0".to_string())]);
        let out = self
            .sandbox
            .commands()
            .run_with(
                cmd,
                RunOptions {
                    envs,
                    ..RunOptions::default()
                },
            )
            .await?;
        if out.exit_code != Some(0) {
            return Err(Error::local(
                "desktop",
                format!(
                    "{what} failed (exit code {:?}): {}; is this a desktop sandbox?",
                    out.exit_code,
                    out.stderr.trim()
                ),
            ));
        }
        Ok(out)
    }

    /// A signed preview URL of the viewer (noVNC): interactive, or view-only.
    pub async fn viewer_url(&self, view_only: bool) -> Result<String> {
        let port = if view_only {
            DESKTOP_VIEW_ONLY_PORT
        } else {
            DESKTOP_VIEWER_PORT
        };
        desktop_viewer_url(&self.sandbox.get_preview_url(port).await?.url, view_only)
    }

    /// The whole screen as PNG bytes.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        let path = format!("/tmp/nullspace-screenshot-{}.png", uuid_like());
        let shot = self
            .run(&format!("scrot -o -z {}", quote(&path)), "the screenshot")
            .await;
        let png = match shot {
            Ok(_) => self.sandbox.files().read(&path).await,
            Err(e) => Err(e),
        };
        // Removed whatever happened (scrot may have written it before failing).
        let _ = self.sandbox.files().remove(&path).await;
        png
    }

    /// Moves the pointer to (`x`, `y`).
    pub async fn move_mouse(&self, x: i32, y: i32) -> Result<()> {
        check_point(Some((x, y)))?;
        self.run(
            &format!("xdotool mousemove --sync {x} {y}"),
            "moving the mouse",
        )
        .await
        .map(drop)
    }

    /// Clicks the left button, at `at` if given (else where the pointer is).
    pub async fn left_click(&self, at: Option<(i32, i32)>) -> Result<()> {
        check_point(at)?;
        self.run(&click_command(Button::Left, 1, at), "the click")
            .await
            .map(drop)
    }

    /// Clicks the right button, at `at` if given.
    pub async fn right_click(&self, at: Option<(i32, i32)>) -> Result<()> {
        check_point(at)?;
        self.run(&click_command(Button::Right, 1, at), "the click")
            .await
            .map(drop)
    }

    /// Double-clicks the left button, at `at` if given.
    pub async fn double_click(&self, at: Option<(i32, i32)>) -> Result<()> {
        check_point(at)?;
        self.run(&click_command(Button::Left, 2, at), "the double click")
            .await
            .map(drop)
    }

    /// Scrolls `amount` steps: down when positive, up when negative.
    pub async fn scroll(&self, amount: i32) -> Result<()> {
        if amount == 0 {
            return Ok(());
        }
        if amount.unsigned_abs() > MAX_SCROLL {
            return Err(Error::invalid(format!(
                "scroll {amount} steps is too many; send at most {MAX_SCROLL} either way"
            )));
        }
        self.run(&scroll_command(amount), "scrolling")
            .await
            .map(drop)
    }

    /// Types `text` into the focused window.
    pub async fn type_text(&self, text: &str) -> Result<()> {
        self.run(
            &format!("xdotool type --delay 15 -- {}", quote(text)),
            "typing",
        )
        .await
        .map(drop)
    }

    /// Presses keys or chords in turn, by xdotool's names (`Return`, `ctrl+l`).
    pub async fn press(&self, keys: &[&str]) -> Result<()> {
        if keys.is_empty() {
            return Err(Error::invalid(
                "press needs at least one key (xdotool names: Return, ctrl+l)",
            ));
        }
        let keys: Vec<String> = keys.iter().map(|k| quote(k)).collect();
        self.run(
            &format!("xdotool key -- {}", keys.join(" ")),
            "the key press",
        )
        .await
        .map(drop)
    }

    /// Opens a URL in the browser, or a file with its application.
    pub async fn open(&self, target: &str) -> Result<()> {
        if target.is_empty() {
            return Err(Error::invalid("open needs a URL or a file path"));
        }
        self.run(&open_command(target), &format!("opening {target}"))
            .await
            .map(drop)
    }

    /// The windows on the screen.
    pub async fn windows(&self) -> Result<Vec<Window>> {
        let out = self.run("wmctrl -l -p -G", "listing windows").await?;
        Ok(parse_windows(&out.stdout))
    }
}

impl Sandbox {
    /// The desktop of this `desktop` sandbox: viewer, screenshots, mouse, keyboard.
    pub fn desktop(&self) -> Desktop<'_> {
        Desktop { sandbox: self }
    }

    /// A signed preview URL of a `desktop` sandbox's viewer (noVNC), interactive or
    /// view-only. The same as `desktop().viewer_url(view_only)`.
    pub async fn desktop_viewer_url(&self, view_only: bool) -> Result<String> {
        self.desktop().viewer_url(view_only).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_viewer_url_keeps_the_token_and_connects_at_once() {
        let u = desktop_viewer_url(
            "http://6080-sbx-1.localhost:7072/?ns_preview_token=abc",
            true,
        )
        .unwrap();
        assert!(
            u.starts_with(
                "http://6080-sbx-1.localhost:7072/vnc.html?ns_preview_token=abc&autoconnect=1"
            ),
            "{u}"
        );
        assert!(u.ends_with("&view_only=1"), "{u}");
    }

    #[test]
    fn windows_parse_and_odd_lines_are_skipped() {
        let out = "0x00400001  0 812    10 20   640 480  sbx xterm: cat > /tmp/x\nnot a window\n0x00600003 -1 0 0 0 1280 800 sbx \n";
        let w = parse_windows(out);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(w[0].title, "xterm: cat > /tmp/x");
        assert_eq!((w[0].pid, w[0].x, w[0].width), (812, 10, 640));
        assert_eq!((w[1].desktop, w[1].title.as_str()), (-1, ""));
    }

    #[test]
    fn points_off_the_screen_are_refused() {
        assert!(check_point(Some((-5, 10))).is_err());
        assert!(check_point(Some((0, 0))).is_ok());
        assert!(check_point(None).is_ok());
    }

    #[test]
    fn commands_quote_what_the_caller_gave() {
        assert_eq!(
            click_command(Button::Left, 2, Some((5, 6))),
            "xdotool mousemove --sync 5 6 && xdotool click --repeat 2 --delay 80 1"
        );
        assert_eq!(scroll_command(-3), "xdotool click --repeat 3 --delay 30 4");
        assert_eq!(
            open_command("/tmp/a b'c"),
            r"setsid -f xdg-open '/tmp/a b'\''c' >/dev/null 2>&1 </dev/null"
        );
        assert!(open_command("https://x.test/").contains("x-www-browser"));
    }
}
