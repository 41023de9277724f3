// One template: its details, the build log (polled while building) and, for a failed
// build, the API's explanation.
import { type BuildLogPage, type Template, api, asApiError, enc } from "../api";
import { confirmDialog } from "../components/dialog";
import { errorBox, loading } from "../components/feedback";
import { fmtDate, h, replace } from "../dom";
import { type PageContext, href, navigate } from "../router";
import { templateBadge } from "./templates";

const LOG_PAGE = 500;

export function templatePage(root: HTMLElement, ctx: PageContext, params: string[]): void {
  const id = params[0] ?? "";
  document.title = `${id} — Templates — Nullspace`;
  const info = h("div", null, loading());
  const failure = h("div", { "data-testid": "template-failure" });
  const log = h("pre", { class: "log", "data-testid": "build-log", tabindex: 0 });
  const logStatus = h("div", { "aria-live": "polite" });
  let after = 0;
  let status = "";
  let logLoaded = false;
  const more = h("button", { type: "button", class: "btn btn-small", "data-testid": "build-log-more", hidden: true }, "Load more of the log");
  const actionStatus = h("div", { "aria-live": "polite" });
  const del = h("button", { type: "button", class: "btn btn-danger", "data-testid": "template-delete", hidden: true }, "Delete template");
  del.addEventListener("click", async () => {
    if (
      !(await confirmDialog({
        title: "Delete this template?",
        message: `${id} will be deleted: a running build is cancelled, its snapshot and warm pool go. Sandboxes made from it keep running. This cannot be undone.`,
        confirmLabel: "Delete",
        danger: true,
      }))
    )
      return;
    del.disabled = true;
    try {
      await api("DELETE", `/templates/${enc(id)}`);
      if (ctx.alive) navigate("/templates");
    } catch (e) {
      if (!ctx.alive) return;
      del.disabled = false;
      replace(actionStatus, errorBox(e, "Could not delete the template"));
    }
  });

  const loadTemplate = async () => {
    try {
      const t = await api<Template>("GET", `/templates/${enc(id)}`, { signal: ctx.signal });
      if (!ctx.alive) return;
      status = t.status;
      del.hidden = t.builtin;
      replace(
        info,
        h("div", { class: "page-head" }, h("h1", null, h("code", null, t.templateID)), templateBadge(t.status), del),
        actionStatus,
        h(
          "dl",
          { class: "props" },
          ...(
            [
              ["Name", t.name ?? "—"],
              ["From", t.from],
              ["Built in", t.builtin ? "yes" : "no"],
              ["Resources", t.resources ? `${t.resources.vcpus} vCPU · ${t.resources.memMiB} MiB · ${t.resources.diskSizeMiB} MiB disk` : "—"],
              ["Start command", t.startCmd ?? "—"],
              ["Ready command", t.readyCmd ?? "—"],
              ["Steps", String((t.steps ?? []).length)],
              ["Created", fmtDate(t.createdAt)],
              ["Ready", fmtDate(t.readyAt)],
              ["Build time", t.buildMs !== undefined ? `${(t.buildMs / 1000).toFixed(1)} s` : "—"],
            ] as [string, string][]
          ).map(([k, v]) => [h("dt", null, k), h("dd", null, v)]),
        ),
      );
      const err = t.error;
      replace(
        failure,
        t.status === "failed" && err
          ? h(
              "div",
              { class: "error", role: "alert" },
              h("h2", null, "The build failed"),
              h("p", { class: "error-message" }, err.message),
              h("p", null, `Phase: ${err.phase}`, err.step !== undefined ? ` · step ${err.step}` : "", err.exitCode !== undefined ? ` · exit code ${err.exitCode}` : ""),
              err.action ? h("p", { class: "error-action" }, h("strong", null, "Suggested: "), err.action) : null,
              err.outputTail ? h("details", { open: true }, h("summary", null, "Output (tail)"), h("pre", { class: "log" }, err.outputTail)) : null,
            )
          : t.status === "failed"
            ? h("div", { class: "error", role: "alert" }, h("p", null, "The build failed (no details given)."))
            : null,
      );
    } catch (e) {
      if (!ctx.alive) return;
      const err = asApiError(e);
      replace(info, h("h1", null, err.status === 404 ? "Template not found" : "Template"), errorBox(err));
    }
  };

  let logBusy = false;
  const loadLog = async () => {
    if (logBusy) return; // one page at a time: `after` moves with each
    logBusy = true;
    try {
      const page = await api<BuildLogPage>("GET", `/templates/${enc(id)}/logs`, { query: { after, limit: LOG_PAGE }, signal: ctx.signal });
      if (!ctx.alive) return;
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
      for (const l of page.lines ?? []) {
        log.append(`${l.stream === "stderr" ? "! " : l.stream === "build" ? "# " : "  "}${l.text}${l.text.endsWith("\n") ? "" : "\n"}`);
      }
      if (typeof page.next === "number") after = page.next;
      // A full page may have more after it (a finished build is not polled).
      more.hidden = (page.lines ?? []).length < LOG_PAGE;
      if (!logLoaded && !(page.lines ?? []).length) log.textContent = "";
      logLoaded = true;
      if (atBottom) log.scrollTop = log.scrollHeight;
      const was = status;
      status = page.status;
      replace(logStatus, status === "building" ? h("p", { class: "loading" }, "Building… the log updates live.") : null);
      if (was === "building" && status !== "building") void loadTemplate();
    } catch (e) {
      if (ctx.alive) replace(logStatus, errorBox(e, "Could not read the build log"));
    } finally {
      logBusy = false;
    }
  };

  more.addEventListener("click", () => void loadLog());
  replace(root, h("p", null, h("a", { href: href("/templates") }, "← Templates")), info, failure, h("h2", null, "Build log"), logStatus, log, h("div", { class: "form-actions" }, more));
  void loadTemplate().then(loadLog);
  ctx.every(2_000, async () => {
    if (status === "building") await loadLog();
  });
}
