/**
 * The desktop of a `desktop` sandbox (`sandbox.desktop`): Xvfb on display `:0` with
 * openbox, viewed in a browser through noVNC (ports 6080, and 6081 view-only). The SDK
 * drives it with `xdotool`, `wmctrl` and `scrot` over the commands data plane
 * (docs/TEMPLATES.md, "The desktop").
 *
 * @module
 */

import { randomUUID } from "node:crypto";

import type { Commands } from "./commands.js";
import type { RequestOpts } from "./config.js";
import { SandboxError, invalid } from "./errors.js";
import type { Filesystem } from "./files.js";
import { INSPECT, hide } from "./http.js";
import type { CommandResult } from "./models.js";
import { checkKeys } from "./options.js";
import type { Preview } from "./previews.js";
import { shellQuote } from "./shell.js";

/** @internal The noVNC viewer's port (interactive). */
export const DESKTOP_VIEWER_PORT = 6080;
/** @internal The noVNC viewer's port (view-only). */
export const DESKTOP_VIEW_ONLY_PORT = 6081;
/** @internal The environment of every desktop command. */
export const DESKTOP_ENV: Readonly<Record<string, string>> = Object.freeze({ DISPLAY: ":0" });

/** A window on the desktop, as `wmctrl -l -p -G` lists it. */
export interface WindowInfo {
  /** The X window ID (`0x00e00003`). */
  id: string;
  /** Its virtual desktop (-1: on all of them). */
  desktop: number;
  /** The process that owns it (0 if unknown). */
  pid: number;
  /** Its left edge, in pixels. */
  x: number;
  /** Its top edge, in pixels. */
  y: number;
  /** Its width, in pixels. */
  width: number;
  /** Its height, in pixels. */
  height: number;
  /** Its title. */
  title: string;
}

/** Options of `desktop.viewerUrl`. */
export interface ViewerUrlOpts extends RequestOpts {
  /** The view-only viewer (port 6081): it shows the screen and sends no input. */
  viewOnly?: boolean;
}

/**
 * noVNC's page for a signed preview URL of the viewer's port: path `/vnc.html`, which
 * connects at once, scales to the window and reconnects; the preview token is kept.
 *
 * @internal
 */
export function viewerUrl(previewUrl: string, viewOnly: boolean): string {
  const u = new URL(previewUrl);
  const query = new URLSearchParams(u.search);
  query.set("autoconnect", "1");
  query.set("resize", "scale");
  query.set("reconnect", "1");
  query.set("path", "websockify");
  if (viewOnly) query.set("view_only", "1");
  u.pathname = "/vnc.html";
  u.search = query.toString();
  u.hash = "";
  return u.toString();
}

function int(name: string, value: unknown): number {
  if (typeof value !== "number" || !Number.isInteger(value)) {
    throw invalid(`${name} must be an integer; got ${typeof value === "number" ? String(value) : JSON.stringify(value)}`);
  }
  return value;
}

function text(name: string, value: unknown): string {
  if (typeof value !== "string") throw invalid(`${name} must be a string; got ${JSON.stringify(value)}`);
  return value;
}

/** The place of a click: both coordinates, or neither (where the pointer is). */
function point(x: unknown, y: unknown): [number, number] | undefined {
  if (x === undefined && y === undefined) return undefined;
  if (x === undefined || y === undefined) throw invalid("give both x and y, or neither (to click where the pointer is)");
  return [coordinate("x", x), coordinate("y", y)];
}

/** A screen coordinate: a safe integer of 0 or more (xdotool reads `-5` as an option). */
function coordinate(name: string, value: unknown): number {
  const n = int(name, value);
  if (n < 0 || !Number.isSafeInteger(n)) throw invalid(`${name} ${n} is off the screen; send an integer of 0 or more`);
  return n;
}

/**
 * The shell command of one desktop action, as the Python SDK's `desktop_command`
 * writes it (xdotool, wmctrl, scrot; every caller's string quoted).
 *
 * @internal
 */
export const desktopCommand = {
  move: (x: number, y: number): string => `xdotool mousemove --sync ${coordinate("x", x)} ${coordinate("y", y)}`,
  click: (button: number, repeat: number, at?: [number, number]): string => {
    const move = at ? `xdotool mousemove --sync ${at[0]} ${at[1]} && ` : "";
    return `${move}xdotool click --repeat ${repeat} --delay 80 ${button}`;
  },
  scroll: (amount: number): string => {
    const n = int("amount", amount);
    if (Math.abs(n) > 1000) throw invalid(`scroll ${n} steps is too many; send -1000 to 1000`);
    return `xdotool click --repeat ${Math.abs(n)} --delay 30 ${n > 0 ? 5 : 4}`;
  },
  type: (s: string): string => `xdotool type --delay 15 -- ${shellQuote(text("text", s))}`,
  press: (keys: string[]): string => {
    if (!keys.length) throw invalid('press takes at least one key (xdotool names: "Return", "ctrl+l")');
    return `xdotool key -- ${keys.map((k) => shellQuote(text("a key", k))).join(" ")}`;
  },
  open: (target: string): string => {
    const t = text("the URL or file to open", target);
    if (!t) throw invalid("open takes a URL or a file path; got an empty string");
    const opener = t.includes("://") ? "x-www-browser" : "xdg-open";
    return `setsid -f ${opener} ${shellQuote(t)} >/dev/null 2>&1 </dev/null`;
  },
  screenshot: (path: string): string => `scrot -o -z ${shellQuote(path)}`,
  windows: (): string => "wmctrl -l -p -G",
};

/** `s` split on runs of whitespace into at most `n + 1` parts, as Python's `s.split(None, n)`. */
function splitWords(s: string, n: number): string[] {
  const parts: string[] = [];
  let rest = s.replace(/^\s+/, "");
  while (rest && parts.length < n) {
    const m = /\s+/.exec(rest);
    if (!m) {
      parts.push(rest);
      rest = "";
      break;
    }
    parts.push(rest.slice(0, m.index));
    rest = rest.slice(m.index + m[0].length);
  }
  if (rest) parts.push(rest);
  return parts;
}

/**
 * `wmctrl -l -p -G` lines (`id desktop pid x y width height host title`) as
 * {@link WindowInfo}s; a line that is not one is left out.
 *
 * @internal
 */
export function parseWindows(out: string): WindowInfo[] {
  const windows: WindowInfo[] = [];
  for (const line of out.split(/\r?\n/)) {
    const parts = splitWords(line, 8);
    if (parts.length < 8) continue;
    const nums = parts.slice(1, 7).map((p) => (/^-?\d+$/.test(p) ? Number.parseInt(p, 10) : NaN));
    if (nums.some(Number.isNaN)) continue;
    const [desktop, pid, x, y, width, height] = nums as [number, number, number, number, number, number];
    windows.push({ id: parts[0]!, desktop, pid, x, y, width, height, title: parts[8] ?? "" });
  }
  return windows;
}

/** @internal A failed desktop command as a `desktop` error. */
export function desktopCheck(result: CommandResult, what: string): void {
  if (result.exitCode !== 0) {
    throw new SandboxError(
      "desktop",
      `${what} failed (exit code ${result.exitCode ?? "none"}): ${result.stderr.trim().slice(-2000)}; is this a desktop sandbox?`,
    );
  }
}

/** What the desktop needs of a sandbox. @internal */
export interface DesktopHost {
  readonly sandboxId: string;
  readonly commands: Commands;
  readonly files: Filesystem;
  getPreviewUrl(port: number, opts?: RequestOpts): Promise<Preview>;
}

/**
 * The desktop of a `desktop` sandbox (`sandbox.desktop`): its viewer's URL, screenshots,
 * mouse and keyboard (xdotool on display `:0`), opening URLs or files, its windows. A
 * failing action throws a {@link SandboxError} with code `desktop` and the tool's stderr.
 */
export class Desktop {
  private declare readonly host: DesktopHost;

  /** @internal */
  constructor(host: DesktopHost) {
    hide(this, "host", host);
  }

  /** What `console.log` shows: the sandbox ID, no credential. */
  [INSPECT](): string {
    return `Desktop { sandboxId: '${this.host.sandboxId}' }`;
  }

  private async run(cmd: string, what: string): Promise<CommandResult> {
    const result = await this.host.commands.run(cmd, { envs: { ...DESKTOP_ENV } });
    desktopCheck(result, what);
    return result;
  }

  /**
   * A signed preview URL of the noVNC viewer (port 6080; 6081 with `viewOnly`) that
   * opens the desktop in a browser: `/vnc.html?…&autoconnect=1&resize=scale&reconnect=1&
   * path=websockify[&view_only=1]`, the preview token kept (redact it before logging).
   */
  async viewerUrl(opts: ViewerUrlOpts = {}): Promise<string> {
    checkKeys("desktop.viewerUrl", opts, new Set(["viewOnly", "requestTimeoutMs"]));
    const viewOnly = Boolean(opts.viewOnly);
    const port = viewOnly ? DESKTOP_VIEW_ONLY_PORT : DESKTOP_VIEWER_PORT;
    const preview = await this.host.getPreviewUrl(port, { requestTimeoutMs: opts.requestTimeoutMs });
    return viewerUrl(preview.url, viewOnly);
  }

  /** The screen as PNG bytes (`scrot`). */
  async screenshot(): Promise<Uint8Array> {
    const path = `/tmp/nullspace-screenshot-${randomUUID().replace(/-/g, "")}.png`;
    await this.run(desktopCommand.screenshot(path), "the screenshot");
    let data: Uint8Array;
    try {
      data = await this.host.files.read(path, { format: "bytes" });
    } catch (e) {
      await this.host.files.remove(path).catch(() => undefined);
      throw e;
    }
    await this.host.files.remove(path);
    return data;
  }

  /** Moves the pointer to (`x`, `y`), in pixels from the top left. */
  async moveMouse(x: number, y: number): Promise<void> {
    await this.run(desktopCommand.move(x, y), "moving the mouse");
  }

  /** A left click at (`x`, `y`), or where the pointer is. */
  async leftClick(x?: number, y?: number): Promise<void> {
    await this.run(desktopCommand.click(1, 1, point(x, y)), "the click");
  }

  /** A right click at (`x`, `y`), or where the pointer is. */
  async rightClick(x?: number, y?: number): Promise<void> {
    await this.run(desktopCommand.click(3, 1, point(x, y)), "the click");
  }

  /** A double (left) click at (`x`, `y`), or where the pointer is. */
  async doubleClick(x?: number, y?: number): Promise<void> {
    await this.run(desktopCommand.click(1, 2, point(x, y)), "the double click");
  }

  /** Scrolls down `amount` steps (default 1; up when negative). */
  async scroll(amount = 1): Promise<void> {
    await this.run(desktopCommand.scroll(amount), "scrolling");
  }

  /** Types `text` as keystrokes into the focused window. */
  async typeText(text: string): Promise<void> {
    await this.run(desktopCommand.type(text), "typing");
  }

  /** Presses keys or chords in turn (xdotool names: `"Return"`, `"ctrl+l"`). */
  async press(...keys: string[]): Promise<void> {
    await this.run(desktopCommand.press(keys), "the key press");
  }

  /** Opens a URL (with `://`) in the browser, or a file with its application (`xdg-open`). */
  async open(target: string): Promise<void> {
    const cmd = desktopCommand.open(target);
    await this.run(cmd, `opening ${target}`);
  }

  /** The windows on the screen: `{ id, desktop, pid, x, y, width, height, title }`. */
  async windows(): Promise<WindowInfo[]> {
    return parseWindows((await this.run(desktopCommand.windows(), "listing windows")).stdout);
  }
}
