// xterm.js over the data plane's pty WebSocket (pool-manager/src/edge/live.rs):
// binary frames carry the terminal's bytes both ways; we send a text frame
// {"type":"resize","cols":C,"rows":R} on resize; the server's last text frame is
// {"type":"exit","exitCode":N,"signal":S}.
import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";

export interface TerminalOpts {
  /** The ws:// URL for the initial size (cols/rows query) and the credential subprotocols. */
  connect: (cols: number, rows: number) => Promise<{ url: string; protocols: string[] }>;
  onStatus: (text: string) => void;
}

export function openTerminal(container: HTMLElement, opts: TerminalOpts): () => void {
  const term = new Terminal({
    cursorBlink: true,
    convertEol: false,
    fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace",
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#0b1020", foreground: "#e6e9f2" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(container);
  try {
    fit.fit();
  } catch {
    // not laid out yet
  }
  let ws: WebSocket | null = null;
  let disposed = false;
  const encoder = new TextEncoder();

  const sendResize = (cols: number, rows: number) => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", cols, rows }));
  };

  const connect = async () => {
    opts.onStatus("Connecting…");
    let target: { url: string; protocols: string[] };
    try {
      target = await opts.connect(term.cols, term.rows);
    } catch (e) {
      opts.onStatus(`Could not open the terminal: ${e instanceof Error ? e.message : String(e)}`);
      return;
    }
    if (disposed) return;
    const sock = new WebSocket(target.url, target.protocols);
    sock.binaryType = "arraybuffer";
    ws = sock;
    sock.onopen = () => {
      opts.onStatus("Connected");
      sendResize(term.cols, term.rows);
      term.focus();
    };
    sock.onmessage = (ev: MessageEvent) => {
      if (typeof ev.data === "string") {
        try {
          const m = JSON.parse(ev.data) as { type?: string; exitCode?: number | null; signal?: number | null };
          if (m.type === "exit") {
            const how = m.signal ? `signal ${m.signal}` : `exit code ${m.exitCode ?? "?"}`;
            term.write(`\r\n[process ended: ${how}]\r\n`);
            opts.onStatus(`Process ended (${how})`);
          }
        } catch {
          term.write(ev.data);
        }
      } else {
        term.write(new Uint8Array(ev.data as ArrayBuffer));
      }
    };
    sock.onerror = () => opts.onStatus("Terminal connection error");
    sock.onclose = (ev: CloseEvent) => {
      if (!disposed) opts.onStatus(`Disconnected${ev.reason ? `: ${ev.reason}` : ""} (code ${ev.code})`);
    };
  };

  const dataSub = term.onData((d) => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d));
  });
  const binSub = term.onBinary((d) => {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    const b = new Uint8Array(d.length);
    for (let i = 0; i < d.length; i++) b[i] = d.charCodeAt(i) & 0xff;
    ws.send(b);
  });
  const resizeSub = term.onResize(({ cols, rows }) => sendResize(cols, rows));
  let pending = 0;
  const onWindowResize = () => {
    window.clearTimeout(pending);
    pending = window.setTimeout(() => {
      try {
        fit.fit();
      } catch {
        // hidden
      }
    }, 100);
  };
  window.addEventListener("resize", onWindowResize);
  void connect();

  return () => {
    disposed = true;
    window.removeEventListener("resize", onWindowResize);
    window.clearTimeout(pending);
    dataSub.dispose();
    binSub.dispose();
    resizeSub.dispose();
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "closed");
    term.dispose();
  };
}
