// A sandbox's lifecycle events over the data plane's WebSocket
// (`/v1/sandboxes/{id}/lifecycle/ws`, live.rs): one JSON event per text message.
// Reconnects (resuming after the last event seen) until closed.
import { type SandboxEvent, dataPlaneUrl, getKey, wsProtocols, wsUrl } from "./api";

export interface LifecycleOpts {
  /** Resume after this event; default: live only. */
  afterEventId?: number;
  onEvent: (e: SandboxEvent) => void;
  onStatus?: (connected: boolean) => void;
}

export function followLifecycle(id: string, opts: LifecycleOpts): () => void {
  let closed = false;
  let ws: WebSocket | null = null;
  let after = opts.afterEventId;
  let retry = 0;
  let timer = 0;

  const open = async () => {
    if (closed) return;
    const key = getKey();
    let base: string | null = null;
    try {
      base = await dataPlaneUrl();
    } catch {
      base = null;
    }
    if (closed || !key || !base) return;
    const query: Record<string, string | number> = after !== undefined ? { after_event_id: after } : { live_only: "true" };
    const sock = new WebSocket(wsUrl(base, `/v1/sandboxes/${encodeURIComponent(id)}/lifecycle/ws`, query), wsProtocols(key));
    ws = sock;
    sock.onopen = () => {
      retry = 0;
      opts.onStatus?.(true);
    };
    sock.onmessage = (ev: MessageEvent) => {
      if (typeof ev.data !== "string") return;
      try {
        const e = JSON.parse(ev.data) as SandboxEvent;
        if (typeof e.id === "number") after = e.id;
        opts.onEvent(e);
      } catch {
        // not an event
      }
    };
    sock.onclose = () => {
      opts.onStatus?.(false);
      ws = null;
      if (closed) return;
      retry = Math.min(retry + 1, 6);
      timer = window.setTimeout(() => void open(), 1000 * 2 ** (retry - 1));
    };
  };
  void open();
  return () => {
    closed = true;
    window.clearTimeout(timer);
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "left the page");
    ws = null;
  };
}

/** The state an event reports, if any (`sandbox.<state>` events carry data.state). */
export function eventState(e: SandboxEvent): string | null {
  const s = e.data && typeof e.data === "object" ? (e.data as Record<string, unknown>)["state"] : undefined;
  if (typeof s === "string") return s;
  const m = /^sandbox\.(starting|running|paused|deleted|error|killed)$/.exec(e.type);
  if (m) return m[1] === "killed" ? "deleted" : m[1];
  return null;
}
