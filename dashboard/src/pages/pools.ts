// Warm pools: each template's pool (GET /templates/{id}/warm-pool), refreshed every 5 s;
// set a pool's target size (PUT).
import { type Template, type WarmPool, api, asApiError, enc } from "../api";
import { errorBox, loading, notice } from "../components/feedback";
import { row, table } from "../components/table";
import { fmtDate, h, replace } from "../dom";
import type { PageContext } from "../router";

export function poolsPage(root: HTMLElement, ctx: PageContext): void {
  document.title = "Warm pools — Nullspace";
  const listing = h("div", { "data-testid": "pools-list" }, loading());
  const status = h("div", { "aria-live": "polite" });
  // Inputs keep what the user typed across refreshes.
  const inputs = new Map<string, HTMLInputElement>();

  const load = async () => {
    let templates: Template[];
    try {
      templates = (await api<{ templates: Template[] }>("GET", "/templates", { signal: ctx.signal })).templates ?? [];
    } catch (e) {
      if (ctx.alive) replace(listing, errorBox(e, "Could not list the templates"));
      return;
    }
    const pools = await Promise.all(
      templates.map(async (t) => {
        try {
          return { t, pool: await api<WarmPool>("GET", `/templates/${enc(t.templateID)}/warm-pool`, { signal: ctx.signal }), err: null };
        } catch (e) {
          return { t, pool: null, err: asApiError(e) };
        }
      }),
    );
    if (!ctx.alive) return;
    const rows = pools.map(({ t, pool, err }) => {
      let input = inputs.get(t.templateID);
      if (!input) {
        input = h("input", { type: "number", min: 0, max: 16, class: "narrow", "aria-label": `Target size of ${t.templateID}`, "data-testid": "pool-target-input" });
        input.value = String(pool?.target ?? 0);
        inputs.set(t.templateID, input);
      }
      const inp = input;
      const set = h("button", { type: "submit", class: "btn btn-small" }, "Set");
      const form = h("form", { class: "inline-form tight" }, inp, set);
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        const size = Number(inp.value);
        if (!Number.isInteger(size) || size < 0 || size > 16) {
          replace(status, errorBox(new Error("A pool's size is a whole number from 0 to 16.")));
          return;
        }
        set.disabled = true;
        try {
          await api<WarmPool>("PUT", `/templates/${enc(t.templateID)}/warm-pool`, { body: { size } });
          if (!ctx.alive) return;
          replace(status, notice(`The ${t.templateID} pool's target is now ${size}.`));
          await load();
        } catch (e) {
          if (ctx.alive) replace(status, errorBox(e, `Could not set the ${t.templateID} pool`));
        } finally {
          set.disabled = false;
        }
      });
      const last = pool?.lastError;
      return row(
        [
          h("code", null, t.templateID),
          pool ? String(pool.target) : "—",
          pool ? String(pool.ready) : "—",
          pool ? String(pool.warming) : "—",
          pool ? String(pool.checkouts) : "—",
          pool ? String(pool.misses) : "—",
          err
            ? h("span", { class: "muted" }, err.message)
            : last
              ? h("span", { class: "error-text" }, last.message, h("small", { class: "muted block" }, `${fmtDate(last.at)}${last.failures ? ` · ${last.failures} failures` : ""}${last.retryInS ? ` · retry in ${last.retryInS} s` : ""}`))
              : "—",
          form,
        ],
        { "data-testid": "pool-row" },
      );
    });
    replace(listing, table(["Template", "Target", "Ready", "Warming", "Checkouts", "Misses", "Last error", "Set target"], rows, { testid: "pools-table", caption: "Warm pools", empty: "No templates." }));
  };
  replace(root, h("h1", null, "Warm pools"), h("p", { class: "muted" }, "Sandboxes kept booted per template, refreshed every 5 s."), status, listing);
  void load();
  ctx.every(5_000, load);
}
