#!/usr/bin/env node
// End-to-end test of the dashboard against a live Nullspace stack, driving Debian's
// Chromium with playwright-core (no browser download).
//
// Env: NULLSPACE_API_URL (the public API origin, which serves /dashboard/),
//      NULLSPACE_API_KEY (a team key), NULLSPACE_OPERATOR_KEY (operator key),
//      NULLSPACE_ARTIFACTS (directory for screenshots), CHROMIUM (optional binary path).
import { chromium } from "playwright-core";
import { copyFile, mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { randomBytes } from "node:crypto";

const API = (process.env.NULLSPACE_API_URL || "").replace(/\/+$/, "");
const KEY = process.env.NULLSPACE_API_KEY || "";
const OPERATOR = process.env.NULLSPACE_OPERATOR_KEY || "";
const ARTIFACTS = process.env.NULLSPACE_ARTIFACTS || "./e2e-artifacts";
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
  let failed = null;
  const consoleErrors = [];
  const deadline = setTimeout(() => {
    failed = failed || new Error(`the whole test ran past ${TOTAL_MS / 1000} s`);
    log(`✘ overall timeout during step: ${currentStep}`);
    // Closing the browser makes the pending wait fail, so cleanup runs.
    browser.close().catch(() => {});
  }, TOTAL_MS);

  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
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

    await step("7. screenshots of every page", async () => {
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

    await step("8. another team's sandbox is not found", async () => {
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

    await step("9. kill from the page", async () => {
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
    if (other?.id) await deleteSandbox(other.id, other.key);
  }
  if (failed) process.exit(1);
  log("all steps passed");
}

main().catch((e) => {
  console.error(`e2e crashed: ${e.stack || e}`);
  process.exit(1);
});
