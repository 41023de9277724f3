/**
 * Seed 004's API reference names as functions: `createSandbox`, `getSandbox`,
 * `getHost`, `setTimeout`. Each is the `Sandbox` call of the same meaning. (Importing
 * `setTimeout` by name shadows the global timer in that module: import it under
 * another name, or use `sandbox.setTimeout`, if the module also needs timers.)
 *
 * @module
 */

import { Config, type ConnectionOpts } from "./config.js";
import { invalid } from "./errors.js";
import { call } from "./http.js";
import type { SandboxInfo } from "./models.js";
import { checkPort, type SandboxOpts } from "./options.js";
import type { Preview } from "./previews.js";
import { Sandbox } from "./sandbox.js";

function idOf(sandbox: string | Sandbox): string {
  const id = typeof sandbox === "string" ? sandbox : sandbox?.sandboxId;
  if (typeof id !== "string" || !id) throw invalid(`sandbox must be a sandbox ID or a Sandbox; got ${JSON.stringify(sandbox)}`);
  return id;
}

/** Creates a sandbox (seed 004's `createSandbox`; same as `Sandbox.create`). */
export function createSandbox(template?: string | SandboxOpts, opts?: SandboxOpts): Promise<Sandbox> {
  return Sandbox.create(template, opts);
}

/**
 * A sandbox's description, read-only (seed 004's `getSandbox`; same as
 * `Sandbox.getInfoById`): with `fields`, an object of just those names.
 */
export function getSandbox(sandboxId: string, opts: ConnectionOpts & { fields: string[] }): Promise<Record<string, unknown>>;
export function getSandbox(sandboxId: string, opts?: ConnectionOpts): Promise<SandboxInfo>;
export function getSandbox(
  sandboxId: string,
  opts: ConnectionOpts & { fields?: string[] } = {},
): Promise<SandboxInfo | Record<string, unknown>> {
  return Sandbox.getInfoById(sandboxId, opts as ConnectionOpts);
}

/**
 * The preview host name of a sandbox's port (seed 004's `getHost`):
 * `<port>-<sandboxId>.<preview domain>`.
 */
export async function getHost(sandbox: string | Sandbox, port: number, opts: ConnectionOpts = {}): Promise<string> {
  if (typeof sandbox !== "string") return sandbox.getHost(port, opts);
  const doc = await call<Preview>(Config.resolve(opts), "POST", `/sandboxes/${encodeURIComponent(idOf(sandbox))}/previews`, {
    json: { port: checkPort(port) },
  });
  return doc.host;
}

/** Sets a sandbox's timeout, `timeout` seconds from now (seed 004's `setTimeout`). */
export async function setTimeout(sandbox: string | Sandbox, timeout: number, opts: ConnectionOpts = {}): Promise<void> {
  if (typeof sandbox !== "string") return sandbox.setTimeout(timeout, opts);
  if (typeof timeout !== "number" || !Number.isInteger(timeout) || timeout < 1) {
    throw invalid(`timeout is in seconds, an integer from 1; got ${JSON.stringify(timeout)}`);
  }
  await call(Config.resolve(opts), "POST", `/sandboxes/${encodeURIComponent(idOf(sandbox))}/timeout`, { json: { timeout } });
}
