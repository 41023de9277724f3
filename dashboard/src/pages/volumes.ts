// Volumes: list, create, delete.
import { type Volume, api, enc } from "../api";
import { confirmDialog } from "../components/dialog";
import { errorBox, loading, notice } from "../components/feedback";
import { row, table } from "../components/table";
import { field, fmtDate, h, replace } from "../dom";
import type { PageContext } from "../router";

export function volumesPage(root: HTMLElement, ctx: PageContext): void {
  document.title = "Volumes — Nullspace";
  const listing = h("div", { "data-testid": "volumes-list" }, loading());
  const status = h("div", { "aria-live": "polite" });

  const load = async () => {
    try {
      const vols = await api<Volume[] | { volumes: Volume[] }>("GET", "/volumes", { signal: ctx.signal });
      if (!ctx.alive) return;
      const list = Array.isArray(vols) ? vols : (vols?.volumes ?? []);
      replace(
        listing,
        table(
          ["Volume", "Name", "Size", "Created", "Version", "Saved", "Attached to", ""],
          list.map((v) => {
            const del = h("button", { type: "button", class: "btn btn-small btn-danger", "data-testid": "volume-delete" }, "Delete");
            del.addEventListener("click", async () => {
              const label = v.name ? `${v.name} (${v.volumeID})` : v.volumeID;
              if (!(await confirmDialog({ title: "Delete this volume?", message: `${label} and its data will be deleted. This cannot be undone.`, confirmLabel: "Delete", danger: true }))) return;
              del.disabled = true;
              try {
                await api("DELETE", `/volumes/${enc(v.volumeID)}`);
                if (!ctx.alive) return;
                replace(status, notice(`Deleted ${label}.`));
                await load();
              } catch (e) {
                if (ctx.alive) replace(status, errorBox(e, `Could not delete ${label}`));
                del.disabled = false;
              }
            });
            return row(
              [
                h("code", null, v.volumeID),
                v.name ?? "—",
                `${v.sizeMiB} MiB`,
                fmtDate(v.createdAt),
                String(v.version),
                fmtDate(v.savedAt),
                (v.attachments ?? []).length ? (v.attachments ?? []).map((a) => `${a.sandboxID ?? "?"}:${a.path ?? "?"} (${a.type ?? "rw"})`).join(", ") : "—",
                del,
              ],
              { "data-testid": "volume-row" },
            );
          }),
          { testid: "volumes-table", caption: "Volumes", empty: "No volumes." },
        ),
      );
    } catch (e) {
      if (ctx.alive) replace(listing, errorBox(e, "Could not list the volumes"));
    }
  };

  const name = h("input", { type: "text", maxlength: 64, pattern: "[A-Za-z0-9._\\-]+", placeholder: "optional", "data-testid": "volume-name" });
  const size = h("input", { type: "number", min: 16, max: 1048576, value: 1024, required: true, "data-testid": "volume-size" });
  const create = h("button", { type: "submit", class: "btn btn-primary", "data-testid": "volume-create" }, "Create volume");
  const form = h("form", { class: "card", "aria-labelledby": "vol-title" }, h("h2", { id: "vol-title" }, "New volume"), h("div", { class: "grid" }, field("Name", name), field("Size (MiB)", size)), h("div", { class: "form-actions" }, create));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body: Record<string, unknown> = { sizeMiB: Number(size.value) };
    if (name.value.trim()) body.name = name.value.trim();
    create.disabled = true;
    try {
      const v = await api<Volume>("POST", "/volumes", { body });
      if (!ctx.alive) return;
      replace(status, notice(`Created ${v.name ?? v.volumeID}.`));
      name.value = "";
      await load();
    } catch (e) {
      if (ctx.alive) replace(status, errorBox(e, "Could not create the volume"));
    } finally {
      create.disabled = false;
    }
  });
  replace(root, h("h1", null, "Volumes"), status, listing, form);
  void load();
}
