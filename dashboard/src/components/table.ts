// A table that scrolls horizontally on narrow screens.
import { type Child, h } from "../dom";

export interface TableOpts {
  testid?: string;
  caption?: string;
  empty?: string;
}

export function table(headers: string[], rows: HTMLTableRowElement[], opts: TableOpts = {}): HTMLElement {
  const body = h("tbody", null, ...rows);
  if (rows.length === 0) {
    body.appendChild(h("tr", null, h("td", { colspan: headers.length, class: "empty" }, opts.empty ?? "Nothing here.")));
  }
  return h(
    "div",
    { class: "table-wrap", tabindex: 0, role: "region", "aria-label": opts.caption ?? "table" },
    h(
      "table",
      { "data-testid": opts.testid },
      opts.caption ? h("caption", { class: "visually-hidden" }, opts.caption) : null,
      h("thead", null, h("tr", null, ...headers.map((t) => h("th", { scope: "col" }, t)))),
      body,
    ),
  );
}

export function row(cells: Child[], attrs: Record<string, string> = {}): HTMLTableRowElement {
  return h("tr", attrs, ...cells.map((c) => h("td", null, c)));
}

/** key=value chips for metadata. */
export function kvList(obj: Record<string, string> | undefined | null): HTMLElement {
  const entries = Object.entries(obj ?? {});
  if (!entries.length) return h("span", { class: "muted" }, "—");
  return h("span", { class: "kv" }, ...entries.map(([k, v]) => h("code", { class: "chip" }, `${k}=${v}`)));
}
