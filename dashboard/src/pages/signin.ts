// Sign-in: the API key is checked with GET /sandboxes?limit=1 and kept in sessionStorage.
import { api, asApiError, setKey } from "../api";
import { errorBox } from "../components/feedback";
import { field, h, replace } from "../dom";
import type { PageContext } from "../router";

export function signInPage(root: HTMLElement, ctx: PageContext, message: string | null, done: () => void): void {
  const input = h("input", {
    type: "password",
    name: "apiKey",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    placeholder: "ns_…",
    "data-testid": "signin-key",
  });
  const submit = h("button", { type: "submit", class: "btn btn-primary", "data-testid": "signin-submit" }, "Sign in");
  const status = h("div", { class: "signin-status", "data-testid": "signin-error", "aria-live": "polite" });
  if (message) replace(status, h("div", { class: "error", role: "alert" }, h("p", { class: "error-message" }, message)));
  const form = h(
    "form",
    { class: "card signin", "data-testid": "signin-form", novalidate: true },
    h("h1", null, "Nullspace dashboard"),
    h("p", { class: "muted" }, "Sign in with a team API key. It stays in this browser tab only (session storage)."),
    field("API key", input),
    status,
    h("div", { class: "form-actions" }, submit),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) {
      replace(status, h("div", { class: "error", role: "alert" }, h("p", { class: "error-message" }, "Enter an API key.")));
      input.focus();
      return;
    }
    submit.disabled = true;
    replace(status, h("p", { class: "loading" }, "Checking the key…"));
    try {
      await api("GET", "/sandboxes", { query: { limit: 1 }, key, signal: ctx.signal });
      setKey(key);
      done();
    } catch (e) {
      if (!ctx.alive) return;
      const err = asApiError(e);
      replace(status, errorBox(err, err.status === 401 || err.status === 403 ? "The API refused this key" : "Could not sign in"));
      submit.disabled = false;
      input.select();
    }
  });
  replace(root, h("main", { class: "main signin-main", id: "main" }, form));
  input.focus();
}
