// Templates: the list, and a form to build one (POST /templates).
import { type Template, api, enc } from "../api";
import { errorBox, loading } from "../components/feedback";
import { row, table } from "../components/table";
import { field, fmtDate, h, replace } from "../dom";
import { type PageContext, href, navigate } from "../router";

export function templateBadge(status: string): HTMLElement {
  return h("span", { class: `badge tpl-${status.replace(/[^a-z]/g, "")}`, "data-state": status }, status);
}

export function templatesPage(root: HTMLElement, ctx: PageContext): void {
  document.title = "Templates — Nullspace";
  const listing = h("div", { "data-testid": "templates-list" }, loading());
  const load = async () => {
    try {
      const doc = await api<{ templates: Template[] }>("GET", "/templates", { signal: ctx.signal });
      if (!ctx.alive) return;
      replace(
        listing,
        table(
          ["Template", "Name", "Status", "From", "Resources", "Created", "Built in"],
          (doc.templates ?? []).map((t) =>
            row(
              [
                h("a", { href: href(`/templates/${enc(t.templateID)}`) }, h("code", null, t.templateID)),
                t.name ?? "—",
                templateBadge(t.status),
                t.from,
                t.resources ? `${t.resources.vcpus} vCPU · ${t.resources.memMiB} MiB · ${t.resources.diskSizeMiB} MiB disk` : "—",
                fmtDate(t.createdAt),
                t.builtin ? "yes" : "no",
              ],
              { "data-testid": "template-row" },
            ),
          ),
          { testid: "templates-table", caption: "Templates", empty: "No templates." },
        ),
      );
    } catch (e) {
      if (ctx.alive) replace(listing, errorBox(e, "Could not list the templates"));
    }
  };
  replace(root, h("h1", null, "Templates"), listing, buildForm(ctx));
  void load();
  ctx.every(15_000, load);
}

function buildForm(ctx: PageContext): HTMLElement {
  const example = JSON.stringify({ name: "my-template", from: "base", steps: [{ run: "echo hello > /workspace/hello.txt" }] }, null, 2);
  const spec = h("textarea", { rows: 8, spellcheck: "false", class: "code", "data-testid": "template-spec" });
  spec.value = example;
  const submit = h("button", { type: "submit", class: "btn btn-primary" }, "Build template");
  const status = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "build-title" },
    h("h2", { id: "build-title" }, "Build a template"),
    h("p", { class: "muted" }, "The build request as JSON (see TemplateBuildRequest in the API's OpenAPI document)."),
    field("Build request (JSON)", spec),
    status,
    h("div", { class: "form-actions" }, submit),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let body: unknown;
    try {
      body = JSON.parse(spec.value);
    } catch (e) {
      replace(status, errorBox(new Error(`The build request is not valid JSON: ${e instanceof Error ? e.message : String(e)}`)));
      return;
    }
    submit.disabled = true;
    replace(status, loading("Starting the build…"));
    try {
      const t = await api<Template>("POST", "/templates", { body });
      navigate(`/templates/${enc(t.templateID)}`);
    } catch (e) {
      if (!ctx.alive) return;
      submit.disabled = false;
      replace(status, errorBox(e, "Could not start the build"));
    }
  });
  return form;
}
