#!/usr/bin/env node
// End-to-end test of the dashboard against a live Nullspace stack, driving Debian's
// Chromium with playwright-core (no browser download).
//
// Env: NULLSPACE_API_URL (the public API origin, which serves /dashboard/),
//      NULLSPACE_API_KEY (a team key), NULLSPACE_OPERATOR_KEY (operator key),
//      NULLSPACE_ARTIFACTS (directory for screenshots), CHROMIUM (optional binary path),
//      NULLSPACE_DASHBOARD_DIST (optional: a dashboard/dist whose assets/app.js and
//      app.css the browser gets instead of those embedded in the API component — to test
//      a frontend change against a live stack without rebuilding the component).
import { chromium } from "playwright-core";
import { copyFile, mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { randomBytes } from "node:crypto";

const API = (process.env.NULLSPACE_API_URL || "").replace(/\/+$/, "");
const KEY = process.env.NULLSPACE_API_KEY || "";
const OPERATOR = process.env.NULLSPACE_OPERATOR_KEY || "";
const ARTIFACTS = process.env.NULLSPACE_ARTIFACTS || "./e2e-artifacts";
const DIST = process.env.NULLSPACE_DASHBOARD_DIST || "";
const TOTAL_MS = 8 * 60_000;
const CREATE_MS = 120_000;

if (!API || !KEY || !OPERATOR) {
  console.error("e2e: set NULLSPACE_API_URL, NULLSPACE_API_KEY and NULLSPACE_OPERATOR_KEY");
  process.exit(2);
}

const started = Date.now();
const elapsed = () => `${((Date.now() - started) / 1000).toFixed(1)}s`;
const log = (msg) => console.log(`[${elapsed()}] ${msg}`);
const runId = randomBytes(4).toString("hex");

let currentStep = "setup";
async function step(name, fn) {
  currentStep = name;
  log(`▶ ${name}`);
  const t = Date.now();
  const out = await fn();
  log(`✔ ${name} (${((Date.now() - t) / 1000).toFixed(1)}s)`);
  return out;
}

function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

/** A call to the public API with fetch (cleanup, the other team). */
async function call(method, path, { key = KEY, body, timeoutMs = 30_000 } = {}) {
  const res = await fetch(`${API}/api/v1${path}`, {
    method,
    headers: { "X-API-Key": key, ...(body !== undefined ? { "Content-Type": "application/json" } : {}) },
    body: body !== undefined ? JSON.stringify(body) : undefined,
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  let doc = null;
  try {
    doc = text ? JSON.parse(text) : null;
  } catch {
    doc = text;
  }
  return { status: res.status, doc };
}

async function deleteSandbox(id, key) {
  try {
    const r = await call("DELETE", `/sandboxes/${encodeURIComponent(id)}`, { key, timeoutMs: 60_000 });
    log(`cleanup: DELETE ${id} → ${r.status}`);
  } catch (e) {
    log(`cleanup: DELETE ${id} failed: ${e.message}`);
  }
}

/** Decodes a PNG in a fresh about:blank page and checks it is not blank. */
async function checkNotBlank(browser, png, label) {
  const page = await browser.newPage();
  try {
    await page.goto("about:blank");
    const stats = await page.evaluate(async (dataUrl) => {
      const img = new Image();
      img.src = dataUrl;
      await img.decode();
      const c = document.createElement("canvas");
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
      const g = c.getContext("2d");
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      const counts = new Map();
      for (let i = 0; i < d.length; i += 4) {
        const k = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2];
        counts.set(k, (counts.get(k) || 0) + 1);
      }
      const total = d.length / 4;
      let top = 0;
      for (const v of counts.values()) top = Math.max(top, v);
      return { colors: counts.size, topShare: top / total, w: c.width, h: c.height };
    }, `data:image/png;base64,${png.toString("base64")}`);
    log(`  ${label}: ${stats.w}x${stats.h}, ${stats.colors} colors, top color ${(stats.topShare * 100).toFixed(1)}%`);
    assert(stats.colors > 8, `${label}: looks blank (${stats.colors} distinct colors)`);
    assert(stats.topShare < 0.95, `${label}: looks blank (${(stats.topShare * 100).toFixed(1)}% one color)`);
  } finally {
    await page.close();
  }
}

async function main() {
  await mkdir(ARTIFACTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
    headless: true,
  });
  let page = null;
  let sandboxId = null;
  let other = null; // { id, key }
  let createdVolume = null;
  const createdTemplates = [];
  let poolSet = false;
  let failed = null;
  const consoleErrors = [];
  const deadline = setTimeout(() => {
    failed = failed || new Error(`the whole test ran past ${TOTAL_MS / 1000} s`);
    log(`✘ overall timeout during step: ${currentStep}`);
    // Closing the browser makes the pending wait fail, so cleanup runs.
    browser.close().catch(() => {});
  }, TOTAL_MS);

  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, acceptDownloads: true });
    if (DIST) {
      // The page itself (and its CSP) still comes from the component; only the bundle is swapped.
      const assets = { "app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8" };
      for (const [name, type] of Object.entries(assets)) {
        const body = await readFile(join(DIST, "assets", name));
        await context.route(`${API}/dashboard/assets/${name}`, (route) => route.fulfill({ status: 200, contentType: type, body }));
      }
      log(`serving the dashboard bundle from ${DIST} (not the component's)`);
    }
    page = await context.newPage();
    page.setDefaultTimeout(30_000);
    page.on("console", (m) => {
      if (m.type() === "error") consoleErrors.push(m.text());
    });
    page.on("pageerror", (e) => consoleErrors.push(`pageerror: ${e.message}`));
    const stateIs = (s, timeout) => page.locator(`[data-testid="sandbox-state"][data-state="${s}"]`).waitFor({ timeout });

    await step("1. sign in with a wrong key is refused", async () => {
      await page.goto(`${API}/dashboard/`);
      await page.locator('[data-testid="signin-key"]').fill("ns_wrong");
      await page.locator('[data-testid="signin-submit"]').click();
      const alert = page.locator('[data-testid="signin-error"] [role="alert"]');
      await alert.waitFor({ timeout: 20_000 });
      const text = (await alert.textContent()) || "";
      log(`  refusal shown: ${text.trim().slice(0, 160)}`);
      assert(text.trim().length > 0, "no refusal message shown");
      // "<message> (unauthorized, HTTP 401)": the code is set apart from the message.
      assert(/\S \(unauthorized, HTTP 401\)/.test(text), `the refusal does not read "<message> (unauthorized, HTTP 401)": ${text.trim()}`);
      assert((await page.locator('[data-testid="sandboxes-list"]').count()) === 0, "the sandboxes list is shown with a wrong key");
      assert((await page.locator('[data-testid="signin-form"]').count()) === 1, "the sign-in form is gone");
    });

    await step("2. sign in with the real key", async () => {
      await page.locator('[data-testid="signin-key"]').fill(KEY);
      await page.locator('[data-testid="signin-submit"]').click();
      await page.locator('[data-testid="sandboxes-table"]').waitFor({ timeout: 30_000 });
    });

    await step("3. create a sandbox from the page", async () => {
      await page.locator('[data-testid="new-template"] option[value="base"]').waitFor({ state: "attached", timeout: 30_000 });
      await page.locator('[data-testid="new-template"]').selectOption("base");
      await page.locator('[data-testid="new-timeout"]').fill("600");
      await page.locator('[data-testid="new-metadata"]').fill(`dash-e2e=${runId}`);
      await page.locator('[data-testid="new-submit"]').click();
      await page.waitForURL(/\/dashboard\/sandboxes\/[^/?#]+/, { timeout: CREATE_MS + 30_000 });
      sandboxId = decodeURIComponent(new URL(page.url()).pathname.split("/").pop());
      log(`  sandbox ${sandboxId}`);
      await stateIs("running", CREATE_MS);
    });

    await step("4. terminal runs a command", async () => {
      await page.locator('[data-testid="tab-terminal"]').click();
      const term = page.locator('[data-testid="terminal"]');
      await term.waitFor();
      await page.locator('[data-testid="terminal-status"]', { hasText: "Connected" }).waitFor({ timeout: 45_000 });
      let ok = false;
      for (let attempt = 1; attempt <= 3 && !ok; attempt++) {
        await page.waitForTimeout(1500); // let the shell print its prompt
        await term.click();
        await page.keyboard.type("echo dash-$((6*7))");
        await page.keyboard.press("Enter");
        ok = await page
          .waitForFunction(
            () => (document.querySelector('[data-testid="terminal"] .xterm-rows')?.textContent || "").includes("dash-42"),
            null,
            { timeout: 20_000 },
          )
          .then(() => true)
          .catch(() => false);
        if (!ok) log(`  attempt ${attempt}: no dash-42 yet`);
      }
      assert(ok, "the terminal never showed dash-42");
    });

    await step("5. metrics chart has points", async () => {
      await page.locator('[data-testid="tab-metrics"]').click();
      await page.waitForFunction(() => document.querySelectorAll('[data-testid="metrics-chart"] circle').length >= 2, null, { timeout: 90_000 });
    });

    await step("6. pause (confirmed) then resume", async () => {
      await page.locator('[data-testid="action-pause"]').click();
      const dlg = page.locator('[data-testid="confirm-dialog"]');
      await dlg.waitFor();
      await dlg.locator('[data-testid="confirm-ok"]').click();
      await stateIs("paused", 120_000);
      await page.locator('[data-testid="action-resume"]:not([disabled])').click({ timeout: 30_000 });
      await stateIs("running", 120_000);
    });

    // The sandbox's tabs, each opened with the keyboard-reachable tab buttons.
    const noPanelError = async (what) => {
      const err = page.locator('[data-testid="tab-panel"] [data-testid="error"]');
      if ((await err.count()) > 0) throw new Error(`${what} shows an error: ${((await err.first().textContent()) || "").trim()}`);
    };
    const openTab = async (name) => {
      await page.locator(`[data-testid="tab-${name}"]`).click();
      await page.locator(`[data-testid="tab-${name}"][aria-selected="true"]`).waitFor({ timeout: 10_000 });
    };

    await step("7. files: upload into /workspace, list, download the same bytes", async () => {
      await openTab("files");
      await page.locator('[data-testid="files-path"]', { hasText: "/workspace" }).waitFor({ timeout: 10_000 });
      await page.locator('[data-testid="files-table"], [data-testid="error"]').first().waitFor({ timeout: 30_000 });
      await noPanelError("the files tab");
      const name = `dash-e2e-${runId}.bin`;
      // Text and every byte value: the round trip must be byte-exact, not text-decoded.
      const bytes = Buffer.concat([Buffer.from(`hello from the dashboard test ${runId}\n`), Buffer.from(Array.from({ length: 256 }, (_, i) => i))]);
      await page.locator('[data-testid="files-upload-input"]').setInputFiles({ name, mimeType: "application/octet-stream", buffer: bytes });
      await page.locator('[data-testid="files-upload"]').click();
      const row = page.locator('[data-testid="file-row"]', { has: page.locator('[data-testid="file-name"]', { hasText: name }) });
      await row.waitFor({ timeout: 30_000 });
      const rowText = (await row.textContent()) || "";
      log(`  listed: ${rowText.trim().slice(0, 120)}`);
      const [download] = await Promise.all([
        page.waitForEvent("download", { timeout: 30_000 }),
        row.locator('[data-testid="file-download"]').click(),
      ]);
      assert(download.suggestedFilename() === name, `the download is named ${download.suggestedFilename()}, not ${name}`);
      const path = await download.path();
      const got = await readFile(path);
      assert(Buffer.compare(got, bytes) === 0, `the download has ${got.length} bytes that differ from the ${bytes.length} uploaded`);
      log(`  downloaded ${got.length} bytes, identical`);
    });

    await step("8. previews: a URL for port 8000 shown as an http(s) link", async () => {
      await openTab("previews");
      await page.locator('[data-testid="preview-port"]').fill("8000");
      await page.locator('[data-testid="preview-submit"]').click();
      const link = page.locator('[data-testid="preview-link"]').first();
      await page.locator('[data-testid="preview-link"], [data-testid="tab-panel"] [data-testid="error"]').first().waitFor({ timeout: 30_000 });
      await noPanelError("the previews tab");
      const hrefAttr = (await link.getAttribute("href")) || "";
      const u = new URL(hrefAttr);
      assert(u.protocol === "http:" || u.protocol === "https:", `the preview link's href is not http(s): ${hrefAttr}`);
      assert(u.hostname.startsWith(`8000-`), `the preview URL's host does not name port 8000: ${u.host}`);
      assert((await link.getAttribute("rel") || "").includes("noopener"), "the preview link opens without rel=noopener");
      log(`  preview ${u.origin}${u.pathname}`);
      // A preview URL that is not http(s) (a compromised or buggy API) is never a link.
      const hostile = `${API}/api/v1/sandboxes/${encodeURIComponent(sandboxId)}/previews`;
      await page.route(hostile, (route) =>
        route.fulfill({
          status: 201,
          contentType: "application/json",
          body: JSON.stringify({ port: 8001, public: false, host: "x", url: "javascript:alert(document.domain)", token: "t", expiresAt: new Date().toISOString(), proxyTarget: { url: "x", header: "x", token: "t" } }),
        }),
      );
      try {
        await page.locator('[data-testid="preview-port"]').fill("8001");
        await page.locator('[data-testid="preview-submit"]').click();
        await page.locator('[data-testid="tab-panel"] [data-testid="error"]').waitFor({ timeout: 10_000 });
      } finally {
        await page.unroute(hostile);
      }
      const bad = await page.evaluate(() => [...document.querySelectorAll("a[href], iframe[src]")].map((e) => e.getAttribute("href") ?? e.getAttribute("src")).filter((v) => /^\s*(javascript|data|vbscript):/i.test(v)));
      assert(bad.length === 0, `a link or frame with a script URL is on the page: ${bad.join(", ")}`);
      assert((await page.locator('[data-testid="preview-link"]').count()) === 1, "the hostile preview was listed");
    });

    await step("9. events: the creation event is listed", async () => {
      await openTab("events");
      await page.locator('[data-testid="event-row"]').first().waitFor({ timeout: 30_000 });
      await page.locator('[data-testid="event-row"]', { hasText: "sandbox.created" }).first().waitFor({ timeout: 10_000 });
      await noPanelError("the events tab");
      // A first page short of the page size: nothing more to load.
      assert(!(await page.locator('[data-testid="events-more"]').isVisible()), "'Load more events' is offered with every event shown");
      log(`  ${await page.locator('[data-testid="event-row"]').count()} events shown`);
    });

    await step("10. logs: rendered without an error", async () => {
      await openTab("logs");
      const logs = page.locator('[data-testid="logs"]');
      await logs.waitFor({ timeout: 10_000 });
      await page.waitForFunction(() => {
        const t = document.querySelector('[data-testid="logs"]')?.textContent || "";
        return t !== "" && t !== "Loading…";
      }, null, { timeout: 30_000 });
      await noPanelError("the logs tab");
      const text = (await logs.textContent()) || "";
      log(`  ${text.split("\n").length} log lines, ${(await page.locator('[data-testid="logs-range"]').textContent()) || "no range"}`);
    });

    await step("10b. keyboard: tabs by arrows, Home and End; the skip link keeps the page", async () => {
      const selected = () => page.locator('[role="tab"][aria-selected="true"]').getAttribute("data-tab");
      await page.locator('[data-testid="tab-logs"]').focus();
      await page.keyboard.press("ArrowRight");
      assert((await selected()) === "previews", `ArrowRight from logs selected ${await selected()}`);
      assert(await page.evaluate(() => document.activeElement?.getAttribute("data-tab") === "previews"), "focus did not follow the selected tab");
      await page.keyboard.press("Home");
      assert((await selected()) === "overview", `Home selected ${await selected()}`);
      await page.keyboard.press("End");
      assert((await selected()) === "volumes", `End selected ${await selected()}`);
      await page.keyboard.press("ArrowLeft");
      assert((await selected()) === "snapshots", `ArrowLeft from volumes selected ${await selected()}`);
      // Only the selected tab is in the Tab order.
      const inOrder = await page.locator('[role="tab"][tabindex="0"]').count();
      assert(inOrder === 1, `${inOrder} tabs are in the Tab order`);
      await page.keyboard.press("Home");
      // The skip link moves focus to the content without re-rendering the page.
      await page.evaluate(() => {
        window.__e2ePanel = document.querySelector('[data-testid="tab-panel"]');
      });
      await page.locator("a.skip").focus();
      await page.keyboard.press("Enter");
      await page.waitForFunction(() => document.activeElement?.id === "main", null, { timeout: 5_000 });
      await page.waitForTimeout(300);
      assert(await page.evaluate(() => window.__e2ePanel === document.querySelector('[data-testid="tab-panel"]') && window.__e2ePanel.isConnected), "the skip link re-rendered the page");
    });

    await step("11. volumes: create, listed, delete with confirmation", async () => {
      const volName = `dash-e2e-${runId}`;
      await page.locator('[data-testid="nav-volumes"]').click();
      await page.locator('[data-testid="volumes-table"]').waitFor({ timeout: 30_000 });
      await page.locator('[data-testid="volume-name"]').fill(volName);
      await page.locator('[data-testid="volume-size"]').fill("64");
      await page.locator('[data-testid="volume-create"]').click();
      const row = page.locator('[data-testid="volume-row"]', { hasText: volName });
      await row.waitFor({ timeout: 60_000 });
      const listed = await call("GET", "/volumes");
      const made = (Array.isArray(listed.doc) ? listed.doc : listed.doc?.volumes || []).find((v) => v.name === volName);
      assert(made && made.sizeMiB === 64, `the API does not list volume ${volName} with 64 MiB: ${JSON.stringify(listed.doc)}`);
      createdVolume = made.volumeID;
      log(`  volume ${made.volumeID}`);
      // Cancel first: nothing is deleted.
      await row.locator('[data-testid="volume-delete"]').click();
      const dlg = page.locator('[data-testid="confirm-dialog"]');
      await dlg.waitFor({ timeout: 10_000 });
      await dlg.locator('[data-testid="confirm-cancel"]').click();
      await dlg.waitFor({ state: "detached", timeout: 10_000 });
      assert((await row.count()) === 1, "cancelling the delete removed the volume row");
      await row.locator('[data-testid="volume-delete"]').click();
      await dlg.waitFor({ timeout: 10_000 });
      await dlg.locator('[data-testid="confirm-ok"]').click();
      await row.waitFor({ state: "detached", timeout: 60_000 });
      const after = await call("GET", `/volumes/${encodeURIComponent(made.volumeID)}`);
      assert(after.status === 404, `the deleted volume still answers ${after.status}`);
      createdVolume = null;
    });

    await step("12. templates: the list shows base", async () => {
      await page.locator('[data-testid="nav-templates"]').click();
      await page.locator('[data-testid="templates-table"]').waitFor({ timeout: 30_000 });
      const base = page.locator('[data-testid="template-row"]', { has: page.locator("code", { hasText: /^base$/ }) }).first();
      await base.waitFor({ timeout: 10_000 });
      // Its page: a built-in template offers no delete.
      await base.locator("a").first().click();
      await page.locator('[data-testid="build-log"]').waitFor({ timeout: 30_000 });
      await page.locator("h1 code", { hasText: /^base$/ }).waitFor({ timeout: 30_000 });
      assert(!(await page.locator('[data-testid="template-delete"]').isVisible()), "a built-in template offers Delete");
      await page.locator('[data-testid="nav-sandboxes"]').click();
      await page.locator('[data-testid="sandboxes-table"]').waitFor({ timeout: 30_000 });
    });

    await step("12b. templates: a failed build's log and explanation, then delete", async () => {
      // A build whose step fails at once: the page must say where and what to do.
      const name = `dash-fail-${runId}`;
      const r = await call("POST", "/templates", {
        body: { name, from: "base", steps: [{ run: "echo dash-step-output; exit 3" }] },
        timeoutMs: 60_000,
      });
      assert(r.status === 202 || r.status === 201 || r.status === 200, `template build answered ${r.status}: ${JSON.stringify(r.doc)}`);
      const id = r.doc.templateID;
      createdTemplates.push(id);
      await page.goto(`${API}/dashboard/templates/${encodeURIComponent(id)}`);
      const failure = page.locator('[data-testid="template-failure"]');
      await failure.filter({ hasText: /exit/i }).waitFor({ timeout: 180_000 });
      const text = await failure.innerText();
      log(`  failure shown: ${text.replace(/\s+/g, " ").slice(0, 160)}`);
      assert(/step/i.test(text), `the failure names its phase: ${text}`);
      await page.locator('[data-testid="build-log"]', { hasText: "dash-step-output" }).waitFor({ timeout: 30_000 });
      await page.locator('[data-testid="template-delete"]').click();
      await page.locator('[data-testid="confirm-ok"]').click();
      await page.locator('[data-testid="templates-table"]').waitFor({ timeout: 30_000 });
      const gone = await call("GET", `/templates/${encodeURIComponent(id)}`);
      assert(gone.status === 404, `the deleted template answers ${gone.status}`);
      createdTemplates.splice(createdTemplates.indexOf(id), 1);
    });

    await step("12c. warm pools: the page follows a pool as it fills", async () => {
      // Built-in pools are the operator's: it sets one; the team's page shows it live.
      await page.locator('[data-testid="nav-pools"]').click();
      const row = page.locator('[data-testid="pool-row"]', { has: page.locator("code", { hasText: /^minimal$/ }) });
      await row.waitFor({ timeout: 30_000 });
      const r = await call("PUT", "/templates/minimal/warm-pool", { key: OPERATOR, body: { size: 1 } });
      assert(r.status === 200, `setting the pool answered ${r.status}: ${JSON.stringify(r.doc)}`);
      poolSet = true;
      // Columns: template, target, ready, …: no reload, the page refreshes itself.
      await page.waitForFunction(
        () => {
          const rows = [...document.querySelectorAll('[data-testid="pool-row"]')];
          const cells = rows.find((tr) => tr.querySelector("code")?.textContent === "minimal")?.querySelectorAll("td");
          return cells && cells[1].textContent === "1" && cells[2].textContent === "1";
        },
        null,
        { timeout: 120_000 },
      );
      log("  minimal: target 1, ready 1, seen without a reload");
      const off = await call("PUT", "/templates/minimal/warm-pool", { key: OPERATOR, body: { size: 0 } });
      assert(off.status === 200, `emptying the pool answered ${off.status}`);
      poolSet = false;
    });

    await step("13. screenshots of every page", async () => {
      const shots = [
        ["sandboxes", "/dashboard/sandboxes", '[data-testid="sandboxes-table"]'],
        ["sandbox", `/dashboard/sandboxes/${encodeURIComponent(sandboxId)}`, '[data-testid="sandbox-state"]'],
        ["templates", "/dashboard/templates", '[data-testid="templates-table"]'],
        ["pools", "/dashboard/pools", '[data-testid="pools-table"]'],
        ["volumes", "/dashboard/volumes", '[data-testid="volumes-table"]'],
        ["overview", "/dashboard/overview", '[data-testid="quota"]'],
      ];
      await page.setViewportSize({ width: 1280, height: 800 });
      for (const [name, path, ready] of shots) {
        await page.goto(`${API}${path}`);
        await page.locator(`${ready}, [data-testid="error"]`).first().waitFor({ timeout: 30_000 });
        await page.waitForTimeout(500);
        const png = await page.screenshot({ path: join(ARTIFACTS, `${name}.png`) });
        await checkNotBlank(browser, png, name);
      }
      await copyFile(join(ARTIFACTS, "sandbox.png"), join(ARTIFACTS, "sandbox-page.png"));
      await page.setViewportSize({ width: 390, height: 844 });
      await page.goto(`${API}/dashboard/sandboxes/${encodeURIComponent(sandboxId)}`);
      await page.locator('[data-testid="sandbox-state"]').waitFor();
      await page.waitForTimeout(500);
      const phone = await page.screenshot({ path: join(ARTIFACTS, "sandbox-phone.png") });
      await checkNotBlank(browser, phone, "sandbox-phone");
      await page.setViewportSize({ width: 1280, height: 800 });
    });

    await step("14. another team's sandbox is not found", async () => {
      const team = `dash-other-${randomBytes(4).toString("hex")}`;
      const t = await call("POST", "/teams", { key: OPERATOR, body: { name: team } });
      assert(t.status === 201 || t.status === 200, `POST /teams → ${t.status} ${JSON.stringify(t.doc)}`);
      const teamRef = t.doc?.id || team;
      const k = await call("POST", `/teams/${encodeURIComponent(teamRef)}/keys`, { key: OPERATOR, body: { role: "team" } });
      assert((k.status === 201 || k.status === 200) && k.doc?.key, `POST /teams/${teamRef}/keys → ${k.status} ${JSON.stringify(k.doc)}`);
      other = { id: null, key: k.doc.key };
      const s = await call("POST", "/sandboxes", { key: other.key, body: { templateID: "base", timeout: 300 }, timeoutMs: CREATE_MS + 30_000 });
      if (s.doc?.sandboxID) other.id = s.doc.sandboxID;
      assert(s.status === 201 && other.id, `the other team's create → ${s.status} ${JSON.stringify(s.doc)}`);
      log(`  other team ${team}, sandbox ${other.id}`);
      await page.goto(`${API}/dashboard/sandboxes/${encodeURIComponent(other.id)}`);
      await page.locator('[data-testid="sandbox-not-found"]').waitFor({ timeout: 30_000 });
      const body = (await page.locator("body").textContent()) || "";
      assert(/not found/i.test(body), "the page does not say not found");
      assert((await page.locator('[data-testid="sandbox-state"]').count()) === 0, "another team's sandbox state is shown");
    });

    await step("15. kill from the page", async () => {
      await page.goto(`${API}/dashboard/sandboxes/${encodeURIComponent(sandboxId)}`);
      await page.locator('[data-testid="action-kill"]:not([disabled])').click();
      const dlg = page.locator('[data-testid="confirm-dialog"]');
      await dlg.waitFor();
      await dlg.locator('[data-testid="confirm-ok"]').click();
      await page.locator('[data-testid="sandbox-state"][data-state="deleted"], [data-testid="sandbox-not-found"]').first().waitFor({ timeout: 120_000 });
      const r = await call("GET", `/sandboxes/${encodeURIComponent(sandboxId)}`);
      assert(r.status === 404 || r.doc?.state === "deleted", `the sandbox is still there: ${r.status} ${JSON.stringify(r.doc)}`);
    });
  } catch (e) {
    failed = failed || e;
  } finally {
    clearTimeout(deadline);
    if (failed) {
      console.error(`✘ FAILED at step "${currentStep}": ${failed.stack || failed.message || failed}`);
      if (consoleErrors.length) console.error(`browser console errors:\n  ${consoleErrors.slice(-20).join("\n  ")}`);
      try {
        if (page && !page.isClosed()) await page.screenshot({ path: join(ARTIFACTS, "failure.png"), fullPage: true });
        if (page && !page.isClosed()) await writeFile(join(ARTIFACTS, "failure.html"), await page.content());
      } catch (e) {
        console.error(`(no failure screenshot: ${e.message})`);
      }
    }
    await browser.close().catch(() => {});
    // Delete what the test made, whatever happened.
    const mine = new Set(sandboxId ? [sandboxId] : []);
    try {
      const r = await call("GET", `/sandboxes?state=starting,running,paused,error&metadata=${encodeURIComponent(`dash-e2e=${runId}`)}&limit=100`);
      for (const s of r.doc?.sandboxes ?? []) mine.add(s.sandboxID);
    } catch (e) {
      log(`cleanup: listing failed: ${e.message}`);
    }
    for (const id of mine) await deleteSandbox(id, KEY);
    // And the test's volume, if a step failed before deleting it.
    try {
      const vols = new Set(createdVolume ? [createdVolume] : []);
      const r = await call("GET", "/volumes");
      for (const v of Array.isArray(r.doc) ? r.doc : r.doc?.volumes ?? []) if (v.name === `dash-e2e-${runId}`) vols.add(v.volumeID);
      for (const v of vols) {
        const d = await call("DELETE", `/volumes/${encodeURIComponent(v)}`);
        log(`cleanup: DELETE volume ${v} → ${d.status}`);
      }
    } catch (e) {
      log(`cleanup: volumes: ${e.message}`);
    }
    if (poolSet) {
      const d = await call("PUT", "/templates/minimal/warm-pool", { key: OPERATOR, body: { size: 0 } }).catch((e) => ({ status: e.message }));
      log(`cleanup: minimal's warm pool back to 0 → ${d.status}`);
    }
    for (const t of createdTemplates) {
      const d = await call("DELETE", `/templates/${encodeURIComponent(t)}`).catch((e) => ({ status: e.message }));
      log(`cleanup: DELETE template ${t} → ${d.status}`);
    }
    if (other?.id) await deleteSandbox(other.id, other.key);
  }
  if (failed) process.exit(1);
  log("all steps passed");
}

main().catch((e) => {
  console.error(`e2e crashed: ${e.stack || e}`);
  process.exit(1);
});
