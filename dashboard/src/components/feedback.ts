// Loading and error states.
import { ApiError, asApiError } from "../api";
import { h } from "../dom";

export function loading(what = "Loading…"): HTMLElement {
  return h("p", { class: "loading", role: "status", "aria-live": "polite" }, what);
}

/** The API's message, its code and suggested action, if any. */
export function errorBox(e: unknown, prefix?: string): HTMLElement {
  const err: ApiError = asApiError(e);
  const suggestion = err.suggestion;
  return h(
    "div",
    { class: "error", role: "alert", "data-testid": "error" },
    h("p", { class: "error-message" }, prefix ? `${prefix}: ` : "", err.message),
    suggestion ? h("p", { class: "error-action" }, h("strong", null, "Suggested: "), suggestion) : null,
    err.code && err.status ? h("p", { class: "error-code" }, `${err.code} (HTTP ${err.status})`) : null,
  );
}

/** A status line for a form: success or error. */
export function notice(text: string): HTMLElement {
  return h("p", { class: "notice", role: "status" }, text);
}
