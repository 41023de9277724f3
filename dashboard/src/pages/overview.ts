// The observability summary: usage, quotas ("used / limit" with a bar), endpoints.
import { type Summary, summary } from "../api";
import { errorBox, loading } from "../components/feedback";
import { row, table } from "../components/table";
import { h, replace } from "../dom";
import type { PageContext } from "../router";

function quotaBar(name: string, used: number | undefined, limit: number, ok: boolean, burst?: number): HTMLElement {
  const pct = used !== undefined && limit > 0 ? Math.min(100, (used / limit) * 100) : 0;
  const bar = h("div", { class: "bar-fill" });
  bar.style.width = `${pct.toFixed(1)}%`;
  return h(
    "div",
    { class: `quota${ok ? "" : " quota-over"}`, "data-testid": "quota" },
    h("div", { class: "quota-head" }, h("span", null, name), h("span", null, used !== undefined ? `${used} / ${limit}` : `${limit}${burst !== undefined ? ` (burst ${burst})` : ""}`)),
    used !== undefined ? h("div", { class: "bar", role: "meter", "aria-label": name, "aria-valuemin": 0, "aria-valuemax": limit, "aria-valuenow": used }, bar) : null,
  );
}

export function overviewPage(root: HTMLElement, ctx: PageContext): void {
  document.title = "Overview — Nullspace";
  const area = h("div", { "data-testid": "overview" }, loading());
  const load = async () => {
    let s: Summary;
    try {
      s = await summary(true);
    } catch (e) {
      if (ctx.alive) replace(area, errorBox(e, "Could not read the summary"));
      return;
    }
    if (!ctx.alive) return;
    const u = s.usage;
    replace(
      area,
      h("p", null, "Team ", h("code", null, s.teamID)),
      s.network?.warning ? h("div", { class: "error", role: "alert" }, h("p", null, s.network.warning)) : null,
      s.suggestedActions?.length ? h("div", { class: "card suggestions" }, h("h2", null, "Suggested actions"), h("ul", null, ...s.suggestedActions.map((a) => h("li", null, a)))) : null,
      h(
        "div",
        { class: "stats" },
        ...(
          [
            ["Live", u.live],
            ["Running", u.running],
            ["Paused", u.paused],
            ["Starting", u.starting],
            ["Error", u.error],
            ["Templates", u.templates],
          ] as [string, number][]
        ).map(([k, v]) => h("div", { class: "stat card" }, h("div", { class: "stat-value" }, String(v ?? 0)), h("div", { class: "stat-label" }, k))),
      ),
      h("h2", null, "Quotas"),
      h("div", { class: "quotas card" }, ...(s.quotaChecks ?? []).map((q) => quotaBar(q.name, q.used, q.limit, q.ok, q.burst))),
      h("h2", null, "Endpoints"),
      table(
        ["Name", "URL", "Status", "Detail"],
        (s.endpoints ?? []).map((e) => row([e.name ?? "—", e.url ? h("code", null, e.url) : "—", h("span", { class: `badge ${e.status === "ok" ? "state-running" : "state-error"}` }, e.status ?? "?"), e.detail ?? ""])),
        { caption: "Endpoints" },
      ),
      s.network?.mode ? h("p", { class: "muted" }, `Network mode: ${s.network.mode}`) : null,
    );
  };
  replace(root, h("h1", null, "Overview"), area);
  void load();
  ctx.every(15_000, load);
}
