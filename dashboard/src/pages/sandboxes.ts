// The sandboxes list: filters, pagination (nextToken stack), live states, "New sandbox".
import { type Sandbox, type SandboxList, type Template, api, asApiError, enc } from "../api";
import { errorBox, loading } from "../components/feedback";
import { kvList, table } from "../components/table";
import { field, fmtDate, fmtRelative, h, parseMetadata, replace } from "../dom";
import { eventState, followLifecycle } from "../live";
import { type PageContext, href, navigate } from "../router";

const STATES = ["starting", "running", "paused", "error", "deleted"];
const PAGE_SIZE = 20;

export function stateBadge(state: string | undefined, testid?: string): HTMLElement {
  const s = state ?? "unknown";
  return h("span", { class: `badge state-${s.replace(/[^a-z]/g, "")}`, "data-testid": testid ?? null, "data-state": s }, s);
}

export function sandboxesPage(root: HTMLElement, ctx: PageContext): void {
  document.title = "Sandboxes — Nullspace";
  const checked = new Set(["starting", "running", "paused", "error"]);
  let metadata = "";
  const tokens: (string | null)[] = [null]; // token of each page shown so far
  let pageIndex = 0;
  // Live state of the sandboxes shown: one lifecycle socket per row, kept across the
  // 15 s refresh (not reopened), closed when its row goes or the page is left.
  const follows = new Map<string, { stop: () => void; cell: HTMLElement }>();
  ctx.onCleanup(() => {
    for (const f of follows.values()) f.stop();
    follows.clear();
  });

  const listArea = h("div", { class: "list-area", "data-testid": "sandboxes-list" }, loading());
  const pager = h("div", { class: "pager" });
  const prev = h("button", { type: "button", class: "btn", "data-testid": "page-prev" }, "Previous");
  const next = h("button", { type: "button", class: "btn", "data-testid": "page-next" }, "Next");
  const pageLabel = h("span", { class: "muted" });
  pager.append(prev, pageLabel, next);

  // ---- filters
  const stateBoxes = STATES.map((s) => {
    const cb = h("input", { type: "checkbox", name: "state", value: s, checked: checked.has(s), "data-testid": `filter-state-${s}` });
    cb.addEventListener("change", () => {
      if (cb.checked) checked.add(s);
      else checked.delete(s);
    });
    return h("label", { class: "check" }, cb, ` ${s}`);
  });
  const metaInput = h("input", { type: "text", name: "metadata", placeholder: "key=value, key2=value2", "data-testid": "filter-metadata" });
  const filters = h(
    "form",
    { class: "filters card", "aria-label": "Filter sandboxes" },
    h("fieldset", { class: "states" }, h("legend", null, "State"), ...stateBoxes),
    field("Metadata", metaInput),
    h("div", { class: "form-actions" }, h("button", { type: "submit", class: "btn" }, "Apply filters")),
  );
  filters.addEventListener("submit", (ev) => {
    ev.preventDefault();
    metadata = metaInput.value;
    tokens.length = 1;
    pageIndex = 0;
    void load(true);
  });

  // ---- list
  async function load(showLoading = false): Promise<void> {
    if (showLoading) replace(listArea, loading());
    let meta: Record<string, string>;
    try {
      meta = parseMetadata(metadata);
    } catch (e) {
      replace(listArea, errorBox(e));
      return;
    }
    let doc: SandboxList;
    try {
      doc = await api<SandboxList>("GET", "/sandboxes", {
        query: {
          state: checked.size ? [...checked].join(",") : undefined,
          metadata: Object.entries(meta).map(([k, v]) => `${k}=${v}`),
          limit: PAGE_SIZE,
          nextToken: tokens[pageIndex] ?? undefined,
        },
        signal: ctx.signal,
      });
    } catch (e) {
      if (ctx.alive) replace(listArea, errorBox(e, "Could not list sandboxes"));
      return;
    }
    if (!ctx.alive) return;
    tokens.length = pageIndex + 1;
    if (doc.nextToken) tokens.push(doc.nextToken);
    prev.disabled = pageIndex === 0;
    next.disabled = !doc.nextToken;
    pageLabel.textContent = `Page ${pageIndex + 1}`;
    show(doc.sandboxes ?? []);
  }

  function show(list: Sandbox[]): void {
    const rows = list.map((s) => {
      const cell = h("td", null, stateBadge(s.state));
      const tr = h(
        "tr",
        { "data-testid": "sandbox-row", "data-id": s.sandboxID },
        h("td", null, h("a", { href: href(`/sandboxes/${enc(s.sandboxID)}`) }, h("code", null, s.sandboxID))),
        h("td", null, s.templateID ?? "—"),
        cell,
        h("td", null, fmtDate(s.createdAt)),
        h("td", null, fmtDate(s.expiresAt), s.expiresAt ? h("small", { class: "muted block" }, fmtRelative(s.expiresAt)) : null),
        h("td", null, kvList(s.metadata)),
      );
      return { tr, cell, id: s.sandboxID };
    });
    replace(
      listArea,
      table(["ID", "Template", "State", "Created", "Expires", "Metadata"], rows.map((r) => r.tr), {
        testid: "sandboxes-table",
        caption: "Sandboxes",
        empty: "No sandboxes match.",
      }),
    );
    const shown = new Set(rows.map((r) => r.id));
    for (const [id, f] of follows) {
      if (!shown.has(id)) {
        f.stop();
        follows.delete(id);
      }
    }
    if (!ctx.alive) return;
    for (const r of rows) {
      const f = follows.get(r.id);
      if (f) {
        f.cell = r.cell;
        continue;
      }
      const entry = { cell: r.cell, stop: () => undefined as void };
      entry.stop = followLifecycle(r.id, {
        onEvent: (e) => {
          const st = eventState(e);
          if (st) replace(entry.cell, stateBadge(st));
        },
      });
      follows.set(r.id, entry);
    }
  }

  prev.addEventListener("click", () => {
    if (pageIndex > 0) {
      pageIndex--;
      void load(true);
    }
  });
  next.addEventListener("click", () => {
    if (tokens[pageIndex + 1]) {
      pageIndex++;
      void load(true);
    }
  });

  replace(
    root,
    h("div", { class: "page-head" }, h("h1", null, "Sandboxes"), h("a", { class: "btn btn-primary", href: "#new-sandbox" }, "New sandbox")),
    filters,
    listArea,
    pager,
    newSandboxForm(ctx),
  );
  void load(true);
  ctx.every(15_000, () => load(false));
}

function newSandboxForm(ctx: PageContext): HTMLElement {
  const select = h("select", { name: "templateID", required: true, "data-testid": "new-template" }, h("option", { value: "" }, "Loading templates…"));
  const timeout = h("input", { type: "number", name: "timeout", min: 1, max: 604800, value: 300, required: true, "data-testid": "new-timeout" });
  const meta = h("input", { type: "text", name: "metadata", placeholder: "key=value, key2=value2", "data-testid": "new-metadata" });
  const submit = h("button", { type: "submit", class: "btn btn-primary", "data-testid": "new-submit" }, "Create sandbox");
  const status = h("div", { "aria-live": "polite", "data-testid": "new-status" });
  const form = h(
    "form",
    { class: "card", id: "new-sandbox", "data-testid": "new-sandbox-form", "aria-labelledby": "new-sandbox-title" },
    h("h2", { id: "new-sandbox-title" }, "New sandbox"),
    h("div", { class: "grid" }, field("Template", select), field("Timeout (seconds)", timeout), field("Metadata (optional)", meta)),
    status,
    h("div", { class: "form-actions" }, submit),
  );
  void api<{ templates: Template[] }>("GET", "/templates", { signal: ctx.signal })
    .then((doc) => {
      const ts = (doc.templates ?? []).filter((t) => t.status !== "failed");
      replace(
        select,
        ...ts.map((t) => h("option", { value: t.templateID, selected: t.templateID === "base" }, t.name && t.name !== t.templateID ? `${t.templateID} (${t.name})` : t.templateID)),
      );
      if (!ts.length) replace(select, h("option", { value: "" }, "No templates"));
    })
    .catch((e) => {
      if (!ctx.alive) return;
      replace(select, h("option", { value: "" }, "Templates unavailable"));
      replace(status, errorBox(e, "Could not list templates"));
    });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let metadata: Record<string, string>;
    try {
      metadata = parseMetadata(meta.value);
    } catch (e) {
      replace(status, errorBox(e));
      return;
    }
    const body: Record<string, unknown> = { templateID: select.value, timeout: Number(timeout.value) };
    if (Object.keys(metadata).length) body.metadata = metadata;
    submit.disabled = true;
    replace(status, loading("Creating the sandbox… (this can take a while)"));
    try {
      const s = await api<Sandbox>("POST", "/sandboxes", { body });
      navigate(`/sandboxes/${enc(s.sandboxID)}`);
    } catch (e) {
      if (!ctx.alive) return;
      submit.disabled = false;
      replace(status, errorBox(asApiError(e), "Could not create the sandbox"));
    }
  });
  return form;
}
