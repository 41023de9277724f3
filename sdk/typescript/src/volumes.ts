/**
 * Durable volumes: content kept in the store, outliving every sandbox and worker. Mount
 * one at create: `Sandbox.create("base", { mounts: { "/mnt/work": volumeId } })`
 * (read-write; one writer at a time) or `{ "/mnt/work": { id: volumeId, type: "ro" } }`.
 *
 * @module
 */

import { Config, type ConnectionOpts } from "./config.js";
import { call } from "./http.js";

/** A volume and who holds it. */
export interface VolumeInfo {
  /** Its ID (a UUID). */
  volumeId: string;
  /** The team-unique name it was created with. */
  name?: string;
  /** Its size, MiB. */
  sizeMiB: number;
  /** When it was created (ISO 8601). */
  createdAt: string;
  /** Times its content was saved. */
  version: number;
  /** When its content was last saved (ISO 8601). */
  savedAt?: string;
  /** The sandboxes that hold it, where, and how. */
  attachments: Array<{ sandboxId: string; path: string; type: "rw" | "ro" }>;
}

type Doc = Record<string, any>;

function parseVolume(doc: Doc): VolumeInfo {
  const v: VolumeInfo = {
    volumeId: doc.volumeID,
    sizeMiB: doc.sizeMiB,
    createdAt: doc.createdAt,
    version: doc.version ?? 0,
    attachments: (doc.attachments ?? []).map((a: Doc) => ({ sandboxId: a.sandboxID, path: a.path, type: a.type })),
  };
  if (doc.name !== undefined && doc.name !== null) v.name = doc.name;
  if (doc.savedAt) v.savedAt = doc.savedAt;
  return v;
}

/** Durable volumes (all static). */
export class Volume {
  private constructor() {}

  /** Creates an empty volume (`sizeMiB` default the server's). */
  static async create(opts: ConnectionOpts & { name?: string; sizeMiB?: number } = {}): Promise<VolumeInfo> {
    const body: Doc = {};
    if (opts.name !== undefined) body.name = opts.name;
    if (opts.sizeMiB !== undefined) body.sizeMiB = opts.sizeMiB;
    return parseVolume(await call<Doc>(Config.resolve(opts), "POST", "/volumes", { json: body }));
  }

  /** A volume by ID or name, with its saved version and holders. */
  static async get(volumeId: string, opts: ConnectionOpts = {}): Promise<VolumeInfo> {
    return parseVolume(await call<Doc>(Config.resolve(opts), "GET", `/volumes/${encodeURIComponent(volumeId)}`));
  }

  /** The team's volumes, oldest first. */
  static async list(opts: ConnectionOpts = {}): Promise<VolumeInfo[]> {
    const doc = await call<Doc | Doc[]>(Config.resolve(opts), "GET", "/volumes");
    const items = Array.isArray(doc) ? doc : (doc.volumes ?? []);
    return items.map(parseVolume);
  }

  /** Deletes a volume and its content; refused (409 `invalid_state`) while a sandbox holds it. */
  static async delete(volumeId: string, opts: ConnectionOpts = {}): Promise<void> {
    await call(Config.resolve(opts), "DELETE", `/volumes/${encodeURIComponent(volumeId)}`);
  }
}
