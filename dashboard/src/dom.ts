// A tiny DOM builder. Text always goes through textContent / text nodes: the API returns
// data that a guest or user controls (metadata, logs, file names), so nothing is ever
// parsed as HTML.

export type Child = Node | string | number | null | undefined | false | Child[];

export type Attrs = {
  [name: string]: string | number | boolean | null | undefined | EventListener;
};

/** Creates an element: attributes (`on…` functions become listeners), then children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs | null = null,
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  if (attrs) setAttrs(el, attrs);
  append(el, ...children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** Creates an SVG element (attributes only as strings/numbers). */
export function svg<K extends keyof SVGElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number> = {},
  ...children: Child[]
): SVGElementTagNameMap[K] {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  append(el, ...children);
  return el;
}

/** An absolute http(s) URL from the API (a preview, a data plane), or null for anything
 * else (`javascript:`, `data:`, relative, unparsable). */
export function httpUrl(s: unknown): string | null {
  if (typeof s !== "string" || !s) return null;
  try {
    const u = new URL(s);
    return u.protocol === "http:" || u.protocol === "https:" ? u.toString() : null;
  } catch {
    return null;
  }
}

/** Attributes that take a URL: only same-app paths, fragments, http(s) and blob: URLs. */
const URL_ATTRS = new Set(["href", "src", "action", "formaction", "poster", "xlink:href"]);

function safeUrlAttr(v: string): string {
  const t = v.trim();
  if (t.startsWith("#") || (t.startsWith("/") && !t.startsWith("//"))) return v;
  try {
    const u = new URL(t);
    if (u.protocol === "http:" || u.protocol === "https:" || u.protocol === "blob:") return v;
  } catch {
    // not absolute: relative paths are not used by the app
  }
  return "about:blank";
}

function setAttrs(el: HTMLElement, attrs: Attrs): void {
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (typeof v === "function") {
      el.addEventListener(k.replace(/^on/, "").toLowerCase(), v);
    } else if (k === "value" && "value" in el) {
      (el as HTMLInputElement).value = String(v);
    } else if (k === "checked" && el instanceof HTMLInputElement) {
      el.checked = Boolean(v);
    } else if (v === true) {
      el.setAttribute(k, "");
    } else if (URL_ATTRS.has(k.toLowerCase())) {
      // Never a javascript:/data: URL from data the API (or a guest) controls.
      el.setAttribute(k, safeUrlAttr(String(v)));
    } else {
      el.setAttribute(k, String(v));
    }
  }
}

/** Appends children; strings and numbers become text nodes. */
export function append(el: Node, ...children: Child[]): void {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, ...c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
}

/** Replaces all children of `el`. */
export function replace(el: Node, ...children: Child[]): void {
  while (el.firstChild) el.removeChild(el.firstChild);
  append(el, ...children);
}

export function fmtDate(s: string | undefined | null): string {
  if (!s) return "—";
  const d = new Date(s);
  if (Number.isNaN(d.getTime())) return s;
  return d.toLocaleString();
}

/** "in 5 min" / "3 h ago" next to an absolute time. */
export function fmtRelative(s: string | undefined | null): string {
  if (!s) return "";
  const t = new Date(s).getTime();
  if (Number.isNaN(t)) return "";
  const diff = Math.round((t - Date.now()) / 1000);
  const abs = Math.abs(diff);
  const v =
    abs < 60 ? `${abs} s` : abs < 3600 ? `${Math.round(abs / 60)} min` : abs < 86400 ? `${Math.round(abs / 3600)} h` : `${Math.round(abs / 86400)} d`;
  return diff >= 0 ? `in ${v}` : `${v} ago`;
}

export function fmtBytes(n: number | undefined | null): string {
  if (n === undefined || n === null) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

/** "key=value, k2=v2" → object; throws on a malformed pair. */
export function parseMetadata(s: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of s.split(",")) {
    const p = part.trim();
    if (!p) continue;
    const eq = p.indexOf("=");
    if (eq <= 0) throw new Error(`metadata "${p}" is not key=value`);
    out[p.slice(0, eq).trim()] = p.slice(eq + 1).trim();
  }
  return out;
}

/** A labelled form field: <label>text <input></label>. */
export function field(label: string, control: HTMLElement, hint?: string): HTMLLabelElement {
  return h("label", { class: "field" }, h("span", { class: "field-label" }, label), control, hint ? h("small", { class: "hint" }, hint) : null);
}
