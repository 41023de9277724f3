// One sandbox: header and actions, then tabs (overview, events, metrics, logs, previews,
// files, terminal, desktop, snapshots, volumes).
import {
  ApiError,
  type FileInfo,
  type LogLine,
  type MetricSample,
  type Preview,
  type Sandbox,
  type SandboxEvent,
  type Snapshot,
  api,
  asApiError,
  dp,
  dpJson,
  enc,
  forgetAccess,
  runtimeAccess,
  wsProtocols,
  wsUrl,
} from "../api";
import { lineChart } from "../components/chart";
import { confirmDialog } from "../components/dialog";
import { errorBox, loading, notice } from "../components/feedback";
import { kvList, row, table } from "../components/table";
import { openTerminal } from "../components/terminal";
import { type Child, field, fmtBytes, fmtDate, fmtRelative, h, httpUrl, replace } from "../dom";
import { eventState, followLifecycle } from "../live";
import { type PageContext, href } from "../router";
import { stateBadge } from "./sandboxes";

type TabId = "overview" | "events" | "metrics" | "logs" | "previews" | "files" | "terminal" | "desktop" | "snapshots" | "volumes";

const TABS: { id: TabId; label: string }[] = [
  { id: "overview", label: "Overview" },
  { id: "events", label: "Events" },
  { id: "metrics", label: "Metrics" },
  { id: "logs", label: "Logs" },
  { id: "previews", label: "Previews" },
  { id: "files", label: "Files" },
  { id: "terminal", label: "Terminal" },
  { id: "desktop", label: "Desktop" },
  { id: "snapshots", label: "Snapshots" },
  { id: "volumes", label: "Volumes" },
];

/** Tabs that need the sandbox running (they use its data plane). */
const NEEDS_RUNNING: TabId[] = ["files", "terminal", "desktop"];

export function sandboxPage(root: HTMLElement, ctx: PageContext, params: string[]): void {
  const id = params[0] ?? "";
  document.title = `${id} — Nullspace`;
  let sb: Sandbox | null = null;
  let tab: TabId = (new URLSearchParams(location.search).get("tab") as TabId | null) ?? "overview";
  if (!TABS.some((t) => t.id === tab)) tab = "overview";
  let tabCtx: PageContext | null = null;
  let gone = false;
  const liveEvents: ((e: SandboxEvent) => void)[] = [];

  const head = h("div", { class: "sandbox-head" });
  const actionStatus = h("div", { class: "action-status", "data-testid": "action-status", "aria-live": "polite" });
  const tabBar = h("div", { class: "tabs", role: "tablist", "aria-label": "Sandbox sections" });
  const panel = h("section", { class: "tab-panel card", role: "tabpanel", "data-testid": "tab-panel" });

  // ---- header and actions
  const pauseBtn = actionButton("Pause", "action-pause");
  const resumeBtn = actionButton("Resume", "action-resume");
  const hibernateBtn = actionButton("Hibernate", "action-hibernate");
  const snapshotBtn = actionButton("Snapshot", "action-snapshot");
  const forkCount = h("input", { type: "number", min: 1, max: 16, value: 1, class: "narrow", "data-testid": "fork-count" });
  const forkVolumes = h(
    "select",
    { "data-testid": "fork-volumes", title: "What the children get of its read-write volumes" },
    h("option", { value: "readonly" }, "volumes read-only"),
    h("option", { value: "copy" }, "volumes copied"),
  );
  const forkBtn = actionButton("Fork", "action-fork");
  const timeoutInput = h("input", { type: "number", min: 1, max: 604800, value: 300, class: "narrow", "data-testid": "timeout-seconds" });
  const timeoutBtn = actionButton("Set timeout", "action-timeout");
  const killBtn = actionButton("Kill", "action-kill", "btn btn-danger");
  const actions = h(
    "div",
    { class: "actions", role: "group", "aria-label": "Actions" },
    pauseBtn,
    resumeBtn,
    hibernateBtn,
    snapshotBtn,
    h("span", { class: "inline-field" }, field("Fork count", forkCount), field("Volumes", forkVolumes), forkBtn),
    h("span", { class: "inline-field" }, field("Timeout (s)", timeoutInput), timeoutBtn),
    killBtn,
  );

  function renderHead(): void {
    if (!sb) return;
    replace(
      head,
      h(
        "div",
        { class: "page-head" },
        h("h1", null, h("code", { "data-testid": "sandbox-id" }, sb.sandboxID)),
        stateBadge(sb.state, "sandbox-state"),
      ),
      h(
        "p",
        { class: "muted" },
        "Template ",
        h("a", { href: href(`/templates/${enc(sb.templateID ?? "")}`), "data-testid": "sandbox-template" }, sb.templateID ?? "—"),
        sb.expiresAt ? ` · expires ${fmtDate(sb.expiresAt)} (${fmtRelative(sb.expiresAt)})` : "",
        sb.hibernated ? " · hibernated" : "",
      ),
    );
    const st = sb.state ?? "";
    const dead = st === "deleted";
    pauseBtn.disabled = st !== "running";
    resumeBtn.disabled = st !== "paused";
    hibernateBtn.disabled = !(st === "running" || st === "paused") || (st === "paused" && !!sb.hibernated);
    snapshotBtn.disabled = !(st === "running" || st === "paused");
    forkBtn.disabled = !(st === "running" || st === "paused");
    timeoutBtn.disabled = dead;
    killBtn.disabled = dead;
    // The desktop tab is there for the desktop template only.
    for (const b of tabBar.querySelectorAll<HTMLButtonElement>("button[data-tab=desktop]")) b.hidden = sb.templateID !== "desktop";
  }

  function showNotFound(err: ApiError): void {
    gone = true;
    tabCtx?.dispose();
    replace(
      root,
      h(
        "div",
        { class: "card", "data-testid": "sandbox-not-found" },
        h("h1", null, "Sandbox not found"),
        h("p", null, h("code", null, id)),
        errorBox(err),
        h("p", null, h("a", { href: href("/sandboxes") }, "Back to the sandboxes")),
      ),
    );
  }

  async function refresh(): Promise<void> {
    if (gone) return;
    let next: Sandbox;
    try {
      next = await api<Sandbox>("GET", `/sandboxes/${enc(id)}`, { signal: ctx.signal });
    } catch (e) {
      if (!ctx.alive) return;
      const err = asApiError(e);
      if (err.status === 404) showNotFound(err);
      else if (!sb) replace(root, h("h1", null, "Sandbox"), errorBox(err, "Could not load the sandbox"));
      else replace(actionStatus, errorBox(err, "Could not refresh"));
      return;
    }
    if (!ctx.alive) return;
    update(next);
  }

  function update(next: Sandbox): void {
    const first = sb === null;
    const stateChanged = sb?.state !== next.state;
    sb = next;
    if (first) layout();
    renderHead();
    if (first || (stateChanged && (NEEDS_RUNNING.includes(tab) || tab === "overview"))) renderTab();
    else if (tab === "overview" || tab === "volumes") renderTab();
  }

  function layout(): void {
    replace(
      root,
      head,
      actions,
      actionStatus,
      tabBar,
      panel,
    );
    replace(
      tabBar,
      ...TABS.map((t) => {
        const b = h(
          "button",
          { type: "button", role: "tab", class: "tab", "data-tab": t.id, "data-testid": `tab-${t.id}`, id: `tab-${t.id}`, "aria-controls": "tab-panel" },
          t.label,
        );
        b.addEventListener("click", () => selectTab(t.id));
        return b;
      }),
    );
    panel.id = "tab-panel";
    panel.tabIndex = 0;
    // The WAI-ARIA tabs pattern: one tab in the Tab order; arrows, Home and End move.
    tabBar.addEventListener("keydown", (ev) => {
      if (!["ArrowRight", "ArrowLeft", "Home", "End"].includes(ev.key)) return;
      const visible = [...tabBar.querySelectorAll<HTMLButtonElement>("button[role=tab]")].filter((b) => !b.hidden);
      if (!visible.length) return;
      ev.preventDefault();
      const i = visible.findIndex((b) => b.dataset.tab === tab);
      const n =
        ev.key === "Home"
          ? visible[0]
          : ev.key === "End"
            ? visible[visible.length - 1]
            : visible[(i + (ev.key === "ArrowRight" ? 1 : visible.length - 1)) % visible.length];
      if (n?.dataset.tab) {
        selectTab(n.dataset.tab as TabId);
        n.focus();
      }
    });
  }

  function selectTab(t: TabId): void {
    tab = t;
    const u = new URL(location.href);
    u.searchParams.set("tab", t);
    history.replaceState(null, "", u.pathname + u.search);
    renderTab();
  }

  function renderTab(): void {
    if (!sb) return;
    if (tab === "desktop" && sb.templateID !== "desktop") tab = "overview";
    for (const b of tabBar.querySelectorAll<HTMLButtonElement>("button[role=tab]")) {
      const on = b.dataset.tab === tab;
      b.setAttribute("aria-selected", on ? "true" : "false");
      b.tabIndex = on ? 0 : -1;
      b.classList.toggle("active", on);
    }
    panel.setAttribute("aria-labelledby", `tab-${tab}`);
    tabCtx?.dispose();
    liveEvents.length = 0;
    tabCtx = ctx.child();
    const c = tabCtx;
    if (NEEDS_RUNNING.includes(tab) && sb.state !== "running") {
      replace(
        panel,
        h(
          "p",
          { class: "paused-note", "data-testid": "needs-running" },
          sb.state === "paused" ? "The sandbox is paused: resume it to use this." : `The sandbox is ${sb.state ?? "not running"}: this needs a running sandbox.`,
        ),
      );
      return;
    }
    const s = sb;
    switch (tab) {
      case "overview":
        return overviewTab(panel, s);
      case "events":
        return eventsTab(panel, c, id, liveEvents);
      case "metrics":
        return metricsTab(panel, c, id);
      case "logs":
        return logsTab(panel, c, id);
      case "previews":
        return previewsTab(panel, c, id);
      case "files":
        return filesTab(panel, c, id);
      case "terminal":
        return terminalTab(panel, c, id, () => renderTab());
      case "desktop":
        return desktopTab(panel, c, id);
      case "snapshots":
        return snapshotsTab(panel, c, id, refresh);
      case "volumes":
        return volumesTab(panel, s);
    }
  }

  // ---- actions
  async function act(btn: HTMLButtonElement, label: string, run: () => Promise<void>): Promise<void> {
    btn.disabled = true;
    replace(actionStatus, loading(`${label}…`));
    try {
      await run();
    } catch (e) {
      if (ctx.alive) replace(actionStatus, errorBox(e, `${label} failed`));
    } finally {
      if (ctx.alive && !gone) {
        await refresh();
      }
    }
  }

  const post = (path: string, body: unknown = {}) => api<Sandbox>("POST", `/sandboxes/${enc(id)}/${path}`, { body });

  pauseBtn.addEventListener("click", async () => {
    if (!(await confirmDialog({ title: "Pause this sandbox?", message: `${id} will be paused: its processes stop until you resume it.`, confirmLabel: "Pause" }))) return;
    await act(pauseBtn, "Pausing", async () => {
      const s = await post("pause");
      forgetAccess(id);
      if (s?.sandboxID) update(s);
      replace(actionStatus, notice("Paused."));
    });
  });
  resumeBtn.addEventListener("click", () =>
    act(resumeBtn, "Resuming", async () => {
      const s = await post("resume");
      forgetAccess(id);
      if (s?.sandboxID) update(s);
      replace(actionStatus, notice("Resumed."));
    }),
  );
  hibernateBtn.addEventListener("click", async () => {
    if (!(await confirmDialog({ title: "Hibernate this sandbox?", message: `${id} will be paused and its memory saved to storage; resuming takes longer.`, confirmLabel: "Hibernate" }))) return;
    await act(hibernateBtn, "Hibernating", async () => {
      const s = await post("hibernate");
      forgetAccess(id);
      if (s?.sandboxID) update(s);
      replace(actionStatus, notice("Hibernated."));
    });
  });
  snapshotBtn.addEventListener("click", () =>
    act(snapshotBtn, "Taking a snapshot", async () => {
      const snap = await api<Snapshot>("POST", `/sandboxes/${enc(id)}/snapshots`, { body: {} });
      replace(actionStatus, notice(`Snapshot ${snap.snapshotID} taken (${fmtBytes(snap.sizeBytes)}).`));
    }),
  );
  forkBtn.addEventListener("click", () =>
    act(forkBtn, "Forking", async () => {
      const count = Math.max(1, Math.min(16, Number(forkCount.value) || 1));
      const volumes = forkVolumes.value === "copy" ? "copy" : "readonly";
      const doc = await api<{ sandboxes: Sandbox[] }>("POST", `/sandboxes/${enc(id)}/fork`, { body: { count, volumes } });
      replace(
        actionStatus,
        h(
          "p",
          { class: "notice", role: "status" },
          `Forked into ${doc.sandboxes.length}: `,
          ...doc.sandboxes.map((s, i) => [i ? ", " : "", h("a", { href: href(`/sandboxes/${enc(s.sandboxID)}`) }, s.sandboxID)]),
        ),
      );
    }),
  );
  timeoutBtn.addEventListener("click", () =>
    act(timeoutBtn, "Setting the timeout", async () => {
      const timeout = Number(timeoutInput.value);
      if (!Number.isInteger(timeout) || timeout < 1) throw new Error("The timeout is a whole number of seconds (1 or more).");
      const s = await post("timeout", { timeout });
      if (s?.sandboxID) update(s);
      replace(actionStatus, notice(`Timeout set: expires in ${timeout} s.`));
    }),
  );
  killBtn.addEventListener("click", async () => {
    if (!(await confirmDialog({ title: "Kill this sandbox?", message: `${id} and everything in it will be deleted. This cannot be undone.`, confirmLabel: "Kill", danger: true }))) return;
    await act(killBtn, "Killing", async () => {
      await api("DELETE", `/sandboxes/${enc(id)}`);
      forgetAccess(id);
      if (sb) update({ ...sb, state: "deleted" });
      replace(actionStatus, notice("Killed: the sandbox is deleted."));
    });
  });

  // ---- start
  replace(root, loading("Loading the sandbox…"));
  void refresh();
  ctx.every(10_000, refresh);
  const stop = followLifecycle(id, {
    onEvent: (e) => {
      for (const fn of liveEvents) fn(e);
      const st = eventState(e);
      if (st && sb && st !== sb.state) void refresh();
    },
  });
  ctx.onCleanup(stop);
}

function actionButton(label: string, testid: string, cls = "btn"): HTMLButtonElement {
  return h("button", { type: "button", class: cls, "data-testid": testid }, label);
}

function dl(pairs: [string, Child][]): HTMLElement {
  return h("dl", { class: "props" }, ...pairs.map(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
}

// ---- tabs

function overviewTab(panel: HTMLElement, s: Sandbox): void {
  const r = s.resources;
  replace(
    panel,
    h("h2", null, "Overview"),
    s.diagnostic && s.diagnostic.message
      ? h("div", { class: "error", role: "alert" }, h("p", null, s.diagnostic.message), s.diagnostic.action ? h("p", null, h("strong", null, "Suggested: "), s.diagnostic.action) : null)
      : null,
    h(
      "div",
      { class: "grid" },
      h(
        "div",
        null,
        h("h3", null, "Resources"),
        dl([
          ["vCPUs", r ? String(r.vcpus) : "—"],
          ["Memory", r ? `${r.memMiB} MiB` : "—"],
          ["Disk", r ? `${r.diskSizeMiB} MiB` : "—"],
          ["Host", s.hostID ?? "—"],
        ]),
      ),
      h(
        "div",
        null,
        h("h3", null, "Lifecycle"),
        dl([
          ["Created", fmtDate(s.createdAt)],
          ["Expires", `${fmtDate(s.expiresAt)} ${fmtRelative(s.expiresAt)}`],
          ["Timeout", s.timeout !== undefined ? `${s.timeout} s` : "—"],
          ["On timeout", s.lifecycle?.onTimeout ?? "—"],
          ["Auto-resume", s.lifecycle?.autoResume ? "yes" : "no"],
          ["Idle timeout", s.lifecycle?.idleTimeout ? `${s.lifecycle.idleTimeout} s` : "off"],
          ["Snapshot interval", s.snapshotInterval ? `${s.snapshotInterval} s` : "off"],
          ["Recording", s.recording ? "on" : "off"],
        ]),
      ),
      h("div", null, h("h3", null, "Metadata"), kvList(s.metadata)),
    ),
    h("h3", null, "Timeline"),
    s.timeline && s.timeline.length
      ? h("ol", { class: "timeline" }, ...s.timeline.map((t) => h("li", null, h("time", { datetime: t.at }, fmtDate(t.at)), " ", h("strong", null, t.step), t.detail ? ` — ${t.detail}` : "")))
      : h("p", { class: "muted" }, "No timeline."),
  );
}

const EVENTS_PAGE = 100;

function eventsTab(panel: HTMLElement, ctx: PageContext, id: string, liveEvents: ((e: SandboxEvent) => void)[]): void {
  const body = h("tbody");
  const seen = new Set<number>();
  /** Newest first: a row goes before the first row with a smaller ID. */
  const add = (e: SandboxEvent) => {
    if (typeof e.id !== "number" || seen.has(e.id)) return;
    seen.add(e.id);
    const data = e.data && Object.keys(e.data).length ? JSON.stringify(e.data) : "";
    const tr = row([String(e.id), fmtDate(e.at), h("code", null, e.type), h("code", { class: "wrap" }, data)], { "data-testid": "event-row", "data-event-id": String(e.id) });
    let before: Element | null = null;
    for (const r of body.children) {
      if (Number((r as HTMLElement).dataset.eventId) < e.id) {
        before = r;
        break;
      }
    }
    body.insertBefore(tr, before);
  };
  const status = h("div", null, loading());
  const more = h("button", { type: "button", class: "btn btn-small", "data-testid": "events-more", hidden: true }, "Load more events");
  replace(
    panel,
    h("h2", null, "Events"),
    h("p", { class: "muted" }, `Newest first; new events appear live. ${EVENTS_PAGE} at a time from the first.`),
    status,
    h(
      "div",
      { class: "table-wrap", tabindex: 0, role: "region", "aria-label": "Events" },
      h("table", { "data-testid": "events-table" }, h("thead", null, h("tr", null, ...["#", "At", "Type", "Data"].map((t) => h("th", { scope: "col" }, t)))), body),
    ),
    h("div", { class: "form-actions" }, more),
  );
  // One bounded page per request; "Load more" asks for the next. Live events are shown
  // at once (rows are kept in ID order whatever arrives first).
  liveEvents.push(add);
  let after = 0;
  const loadPage = async () => {
    more.disabled = true;
    try {
      const doc = await api<{ events: SandboxEvent[] }>("GET", `/sandboxes/${enc(id)}/events`, { query: { after_event_id: after, limit: EVENTS_PAGE }, signal: ctx.signal });
      if (!ctx.alive) return;
      const evs = doc.events ?? [];
      evs.forEach(add);
      if (evs.length) after = evs[evs.length - 1].id;
      more.hidden = evs.length < EVENTS_PAGE;
      replace(status, seen.size ? null : h("p", { class: "muted" }, "No events yet."));
    } catch (e) {
      if (ctx.alive) replace(status, errorBox(e, "Could not read the events"));
    } finally {
      more.disabled = false;
    }
  };
  more.addEventListener("click", () => void loadPage());
  void loadPage();
}

function metricsTab(panel: HTMLElement, ctx: PageContext, id: string): void {
  const charts = h("div", { class: "charts" }, loading());
  const status = h("div");
  replace(panel, h("h2", null, "Metrics"), h("p", { class: "muted" }, "Over the sandbox's lifetime; refreshed every 5 s."), status, charts);
  const load = async () => {
    try {
      const doc = await api<{ metrics: MetricSample[] }>("GET", `/sandboxes/${enc(id)}/metrics`, { signal: ctx.signal });
      if (!ctx.alive) return;
      const ms = (doc.metrics ?? []).filter((m) => typeof m.timestamp === "number");
      const memTotal = Math.max(0, ...ms.map((m) => m.memTotalMiB ?? 0));
      replace(status);
      replace(
        charts,
        lineChart({
          title: "CPU",
          unit: "%",
          points: ms.filter((m) => typeof m.cpuUsedPct === "number").map((m) => ({ x: m.timestamp as number, y: m.cpuUsedPct as number })),
          yMax: 100,
          testid: "metrics-chart",
        }),
        lineChart({
          title: "Memory",
          unit: "MiB",
          points: ms.filter((m) => typeof m.memUsedMiB === "number").map((m) => ({ x: m.timestamp as number, y: m.memUsedMiB as number })),
          yMax: memTotal > 0 ? memTotal : undefined,
          testid: "metrics-chart-memory",
          format: (y) => `${Math.round(y)}`,
        }),
        h("p", { class: "muted" }, `${ms.length} sample${ms.length === 1 ? "" : "s"}.`),
      );
    } catch (e) {
      if (ctx.alive) replace(status, errorBox(e, "Could not read the metrics"));
    }
  };
  void load();
  ctx.every(5_000, load);
}

const LOGS_PAGE = 500;

function logsTab(panel: HTMLElement, ctx: PageContext, id: string): void {
  const out = h("pre", { class: "log", "data-testid": "logs", tabindex: 0 }, "Loading…");
  const status = h("div");
  const reload = h("button", { type: "button", class: "btn btn-small" }, "Refresh");
  const earlier = h("button", { type: "button", class: "btn btn-small", "data-testid": "logs-earlier", disabled: true }, "Earlier lines");
  const later = h("button", { type: "button", class: "btn btn-small", "data-testid": "logs-later", disabled: true }, "Later lines");
  const range = h("span", { class: "muted", "data-testid": "logs-range" });
  replace(panel, h("div", { class: "page-head" }, h("h2", null, "Logs"), reload), status, out, h("div", { class: "pager" }, earlier, range, later));
  // One page (offset/limit) at a time; the timer refreshes the page shown.
  let offset = 0;
  const load = async () => {
    try {
      const doc = await api<{ logs: LogLine[]; next?: number | null }>("GET", `/sandboxes/${enc(id)}/logs`, { query: { offset, limit: LOGS_PAGE }, signal: ctx.signal });
      if (!ctx.alive) return;
      const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 8;
      const lines = doc.logs ?? [];
      out.textContent = lines.length ? lines.map((l) => `${l.time ? `${l.time} ` : ""}[${l.source}] ${l.text}`).join("\n") : offset ? "No lines here." : "No logs yet.";
      if (atBottom) out.scrollTop = out.scrollHeight;
      earlier.disabled = offset === 0;
      later.disabled = typeof doc.next !== "number";
      range.textContent = lines.length ? `lines ${offset + 1}–${offset + lines.length}` : "";
      replace(status);
    } catch (e) {
      if (ctx.alive) replace(status, errorBox(e, "Could not read the logs"));
    }
  };
  earlier.addEventListener("click", () => {
    offset = Math.max(0, offset - LOGS_PAGE);
    void load();
  });
  later.addEventListener("click", () => {
    offset += LOGS_PAGE;
    void load();
  });
  reload.addEventListener("click", () => void load());
  void load();
  ctx.every(10_000, load);
}

function previewsTab(panel: HTMLElement, ctx: PageContext, id: string): void {
  const port = h("input", { type: "number", min: 1, max: 65535, required: true, placeholder: "8080", "data-testid": "preview-port" });
  const submit = h("button", { type: "submit", class: "btn btn-primary", "data-testid": "preview-submit" }, "Get preview URL");
  const status = h("div", { "aria-live": "polite" });
  const list = h("ul", { class: "previews", "data-testid": "previews" });
  const form = h("form", { class: "inline-form" }, field("Port", port), submit);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const p = Number(port.value);
    if (!Number.isInteger(p) || p < 1 || p > 65535) {
      replace(status, errorBox(new Error("A port is a number from 1 to 65535.")));
      return;
    }
    submit.disabled = true;
    replace(status, loading());
    try {
      const pv = await api<Preview>("POST", `/sandboxes/${enc(id)}/previews`, { body: { port: p }, signal: ctx.signal });
      if (!ctx.alive) return;
      const url = httpUrl(pv.url);
      if (!url) throw new ApiError(0, "bad_response", "The API returned a preview URL that is not an http(s) URL; it is not shown.");
      replace(status);
      list.prepend(
        h(
          "li",
          null,
          h("strong", null, `Port ${pv.port}: `),
          h("a", { href: url, target: "_blank", rel: "noopener noreferrer", referrerpolicy: "no-referrer", "data-testid": "preview-link" }, url),
          h("small", { class: "muted block" }, `${pv.public ? "public" : "signed"} · expires ${fmtDate(pv.expiresAt)}`),
        ),
      );
    } catch (e) {
      if (ctx.alive) replace(status, errorBox(e, "Could not make a preview URL"));
    } finally {
      if (ctx.alive) submit.disabled = false;
    }
  });
  replace(panel, h("h2", null, "Previews"), h("p", { class: "muted" }, "A signed URL that reaches a port inside the sandbox."), form, status, list);
}

function joinPath(dir: string, name: string): string {
  return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
}

function parentPath(p: string): string {
  const t = p.replace(/\/+$/, "");
  const i = t.lastIndexOf("/");
  return i <= 0 ? "/" : t.slice(0, i);
}

const FILES_SHOWN = 1000;

function filesTab(panel: HTMLElement, ctx: PageContext, id: string): void {
  let cwd = "/workspace";
  const pathLabel = h("code", { "data-testid": "files-path" }, cwd);
  const up = h("button", { type: "button", class: "btn btn-small", "data-testid": "files-up" }, "Up");
  const reload = h("button", { type: "button", class: "btn btn-small" }, "Refresh");
  const listing = h("div", null, loading());
  const status = h("div", { "aria-live": "polite" });
  const fileInput = h("input", { type: "file", "data-testid": "files-upload-input" });
  const uploadBtn = h("button", { type: "submit", class: "btn", "data-testid": "files-upload" }, "Upload");
  const uploadForm = h("form", { class: "inline-form" }, field("Upload a file here", fileInput), uploadBtn);

  const load = async () => {
    pathLabel.textContent = cwd;
    up.disabled = cwd === "/";
    replace(listing, loading());
    try {
      const doc = await dpJson<{ entries: FileInfo[] }>(id, "GET", "/files/list", { path: cwd }, undefined, ctx.signal);
      if (!ctx.alive) return;
      const all = [...(doc.entries ?? [])].sort((a, b) => (a.type === "dir" ? 0 : 1) - (b.type === "dir" ? 0 : 1) || a.name.localeCompare(b.name));
      const entries = all.slice(0, FILES_SHOWN);
      replace(
        listing,
        all.length > FILES_SHOWN ? h("p", { class: "muted" }, `The first ${FILES_SHOWN} of ${all.length} entries (directories first, by name).`) : null,
        table(
          ["Name", "Type", "Size", "Modified", ""],
          entries.map((e) => {
            const path = e.path || joinPath(cwd, e.name);
            let name: Child;
            let action: Child = null;
            if (e.type === "dir") {
              const b = h("button", { type: "button", class: "link", "data-testid": "file-dir" }, `${e.name}/`);
              b.addEventListener("click", () => {
                cwd = path;
                void load();
              });
              name = b;
            } else {
              name = h("span", { "data-testid": "file-name" }, e.name, e.symlink_target ? ` → ${e.symlink_target}` : "");
              if (e.type === "file") {
                const d = h("button", { type: "button", class: "btn btn-small", "data-testid": "file-download" }, "Download");
                d.addEventListener("click", () => void download(path, e.name, d));
                action = d;
              }
            }
            return row([name, e.type, e.type === "dir" ? "" : fmtBytes(e.size), e.mtime ? fmtDate(new Date(e.mtime * 1000).toISOString()) : "—", action], { "data-testid": "file-row" });
          }),
          { testid: "files-table", caption: "Files", empty: "This directory is empty." },
        ),
      );
    } catch (e) {
      if (ctx.alive) replace(listing, errorBox(e, `Could not list ${cwd}`));
    }
  };

  const download = async (path: string, name: string, btn: HTMLButtonElement) => {
    btn.disabled = true;
    try {
      const res = await dp(id, "GET", "/files", { path }, undefined, ctx.signal);
      const blob = await res.blob();
      if (!ctx.alive) return;
      const url = URL.createObjectURL(blob);
      const a = h("a", { href: url, download: name, class: "visually-hidden" });
      document.body.appendChild(a);
      a.click();
      a.remove();
      window.setTimeout(() => URL.revokeObjectURL(url), 30_000);
    } catch (e) {
      if (ctx.alive) replace(status, errorBox(e, `Could not download ${path}`));
    } finally {
      btn.disabled = false;
    }
  };

  uploadForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = fileInput.files?.[0];
    if (!f) {
      replace(status, errorBox(new Error("Choose a file first.")));
      return;
    }
    uploadBtn.disabled = true;
    const path = joinPath(cwd, f.name);
    replace(status, loading(`Uploading ${f.name}…`));
    try {
      await dp(id, "PUT", "/files", { path }, f, ctx.signal);
      if (!ctx.alive) return;
      replace(status, notice(`Uploaded ${path} (${fmtBytes(f.size)}).`));
      fileInput.value = "";
      await load();
    } catch (e) {
      if (ctx.alive) replace(status, errorBox(e, `Could not upload ${path}`));
    } finally {
      uploadBtn.disabled = false;
    }
  });
  up.addEventListener("click", () => {
    cwd = parentPath(cwd);
    void load();
  });
  reload.addEventListener("click", () => void load());
  replace(panel, h("h2", null, "Files"), h("div", { class: "toolbar" }, up, pathLabel, reload), status, listing, uploadForm);
  void load();
}

function terminalTab(panel: HTMLElement, ctx: PageContext, id: string, rerender: () => void): void {
  const status = h("span", { class: "muted", "data-testid": "terminal-status", "aria-live": "polite" }, "Starting…");
  const reconnect = h("button", { type: "button", class: "btn btn-small", "data-testid": "terminal-reconnect" }, "Reconnect");
  const box = h("div", { class: "terminal", "data-testid": "terminal" });
  replace(panel, h("div", { class: "page-head" }, h("h2", null, "Terminal"), status, reconnect), box);
  reconnect.addEventListener("click", () => {
    forgetAccess(id);
    rerender();
  });
  const dispose = openTerminal(box, {
    connect: async (cols, rows) => {
      const access = await runtimeAccess(id);
      return { url: wsUrl(access.target.baseUrl, "/pty", { cols, rows }), protocols: wsProtocols(access.token) };
    },
    onStatus: (t) => {
      if (ctx.alive) status.textContent = t;
    },
  });
  ctx.onCleanup(dispose);
}

function desktopTab(panel: HTMLElement, ctx: PageContext, id: string): void {
  const area = h("div", null, loading("Opening the desktop…"));
  replace(panel, h("h2", null, "Desktop"), area);
  void (async () => {
    try {
      const pv = await api<Preview>("POST", `/sandboxes/${enc(id)}/previews`, { body: { port: 6080 }, signal: ctx.signal });
      if (!ctx.alive) return;
      const base = httpUrl(pv.url);
      if (!base) throw new ApiError(0, "bad_response", "The API returned a preview URL that is not an http(s) URL.");
      const u = new URL(base);
      u.pathname = `${u.pathname.replace(/\/+$/, "")}/vnc.html`;
      u.searchParams.set("autoconnect", "true");
      u.searchParams.set("resize", "scale");
      replace(
        area,
        h("p", null, h("a", { href: u.toString(), target: "_blank", rel: "noopener noreferrer" }, "Open the desktop in a new tab")),
        h("iframe", {
          class: "desktop",
          src: u.toString(),
          title: `Desktop of ${id}`,
          "data-testid": "desktop-frame",
          referrerpolicy: "no-referrer",
          allow: "clipboard-read; clipboard-write; fullscreen",
        }),
      );
    } catch (e) {
      if (ctx.alive) replace(area, errorBox(e, "Could not open the desktop"));
    }
  })();
}

function snapshotsTab(panel: HTMLElement, ctx: PageContext, id: string, refreshSandbox: () => Promise<void>): void {
  const listing = h("div", null, loading());
  const status = h("div", { "aria-live": "polite" });
  const name = h("input", { type: "text", maxlength: 64, pattern: "[A-Za-z0-9._\\-]+", placeholder: "optional", "data-testid": "snapshot-name" });
  const take = h("button", { type: "submit", class: "btn btn-primary", "data-testid": "snapshot-take" }, "Take snapshot");
  const form = h("form", { class: "inline-form" }, field("Name", name), take);
  const load = async () => {
    try {
      const doc = await api<{ snapshots: Snapshot[] }>("GET", `/sandboxes/${enc(id)}/snapshots`, { signal: ctx.signal });
      if (!ctx.alive) return;
      replace(
        listing,
        table(
          ["ID", "Name", "Kind", "Created", "Size", "Stored", "Storage"],
          (doc.snapshots ?? []).map((s) =>
            row([h("code", null, s.snapshotID), s.name ?? "—", s.kind, fmtDate(s.createdAt), fmtBytes(s.sizeBytes), fmtBytes(s.storedBytes), s.storage], { "data-testid": "snapshot-row" }),
          ),
          { testid: "snapshots-table", caption: "Snapshots", empty: "No snapshots yet." },
        ),
      );
    } catch (e) {
      if (ctx.alive) replace(listing, errorBox(e, "Could not list the snapshots"));
    }
  };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    take.disabled = true;
    replace(status, loading("Taking a snapshot…"));
    try {
      const body = name.value.trim() ? { name: name.value.trim() } : {};
      const s = await api<Snapshot>("POST", `/sandboxes/${enc(id)}/snapshots`, { body });
      if (!ctx.alive) return;
      replace(status, notice(`Snapshot ${s.snapshotID} taken.`));
      name.value = "";
      await load();
      await refreshSandbox();
    } catch (e) {
      if (ctx.alive) replace(status, errorBox(e, "Could not take a snapshot"));
    } finally {
      take.disabled = false;
    }
  });
  replace(panel, h("h2", null, "Snapshots"), form, status, listing);
  void load();
}

function volumesTab(panel: HTMLElement, s: Sandbox): void {
  replace(
    panel,
    h("h2", null, "Volumes"),
    table(
      ["Path", "Volume", "Mode", "Inherited"],
      (s.mounts ?? []).map((m) =>
        row([
          h("code", null, m.path ?? "—"),
          h("code", null, m.volumeID ?? "—"),
          m.type ?? "—",
          m.inherited
            ? `${m.inherited.how === "copy" ? "a copy of" : "read-only from"} ${m.inherited.fromVolumeID ?? "?"} (${m.inherited.fromSandboxID ?? "?"})`
            : "—",
        ]),
      ),
      { testid: "mounts-table", caption: "Mounted volumes", empty: "No volumes mounted." },
    ),
  );
}
