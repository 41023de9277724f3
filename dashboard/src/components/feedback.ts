// Loading and error states.
import { ApiError, asApiError } from "../api";
import { h } from "../dom";

export function loading(what = "Loading…"): HTMLElement {
  return h("p", { class: "loading", role: "status", "aria-live": "polite" }, what);
}

/** "unauthorized, HTTP 401" (or "HTTP 502" for an answer with no API error code). */
function codeLabel(err: ApiError): string | null {
  if (!err.status) return null;
  const code = err.code && err.code !== `http_${err.status}` ? `${err.code}, ` : "";
  return `${code}HTTP ${err.status}`;
}

/**
 * The API's message with its code — "<message> (unauthorized, HTTP 401)" — and the
 * suggested action, if any, on a line of its own.
 */
export function errorBox(e: unknown, prefix?: string): HTMLElement {
  const err: ApiError = asApiError(e);
  const suggestion = err.suggestion;
  const code = codeLabel(err);
  return h(
    "div",
    { class: "error", role: "alert", "data-testid": "error" },
    h(
      "p",
      { class: "error-message" },
      prefix ? `${prefix}: ` : "",
      err.message,
      code ? " " : "",
      code ? h("span", { class: "error-code", "data-testid": "error-code" }, `(${code})`) : null,
    ),
    suggestion ? h("p", { class: "error-action", "data-testid": "error-action" }, h("strong", null, "Suggested: "), suggestion) : null,
  );
}

/** A status line for a form: success or error. */
export function notice(text: string): HTMLElement {
  return h("p", { class: "notice", role: "status" }, text);
}
