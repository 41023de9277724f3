/**
 * Stored snapshots as objects that restore and delete themselves (what
 * `sandbox.snapshot()` and `sandbox.listSnapshots()` return). A snapshot outlives its
 * sandbox; its ID also works as a template.
 *
 * @module
 */

import type { Config, RequestOpts } from "./config.js";
import { call } from "./http.js";
import type { Resources, SnapshotInfo } from "./models.js";
import { Sandbox, type RestoreOpts } from "./sandbox.js";

/**
 * A stored snapshot: every {@link SnapshotInfo} field, the seed's names `id`, `created`
 * and `size`, and `restore()` / `delete()`.
 */
export class Snapshot implements SnapshotInfo {
  /** Its ID (`snap-…`); works as a template. */
  snapshotId: string;
  /** The sandbox it was taken of. */
  sandboxId: string;
  /** The template that sandbox started from. */
  templateId: string;
  /** `pause`, `periodic` or `manual`. */
  kind: "pause" | "periodic" | "manual";
  /** When it was taken (ISO 8601). */
  createdAt: string;
  /** Bytes a restore materializes. */
  sizeBytes: number;
  /** Bytes of data it references in the store. */
  storedBytes: number;
  /** `object` (any worker sharing the store) or `local`. */
  storage: "object" | "local";
  /** The VM shape it restores with. */
  resources?: Resources;
  /** The team-unique name it was given, if any. */
  name?: string;
  /** Only on the snapshot just taken: the bytes it sent to the store. */
  uploadedBytes?: number;

  /** @internal */
  constructor(
    info: SnapshotInfo,
    private readonly config: Config,
  ) {
    this.snapshotId = info.snapshotId;
    this.sandboxId = info.sandboxId;
    this.templateId = info.templateId;
    this.kind = info.kind;
    this.createdAt = info.createdAt;
    this.sizeBytes = info.sizeBytes;
    this.storedBytes = info.storedBytes;
    this.storage = info.storage;
    if (info.resources) this.resources = info.resources;
    if (info.name !== undefined) this.name = info.name;
    if (info.uploadedBytes !== undefined) this.uploadedBytes = info.uploadedBytes;
    Object.defineProperty(this, "config", { enumerable: false });
  }

  /** Same as `snapshotId`. */
  get id(): string {
    return this.snapshotId;
  }

  /** When it was taken. */
  get created(): Date {
    return new Date(this.createdAt);
  }

  /** Bytes a restore materializes. */
  get size(): number {
    return this.sizeBytes;
  }

  /** Its fields as a plain {@link SnapshotInfo}. */
  get info(): SnapshotInfo {
    return { ...this };
  }

  /** Starts a new sandbox from it; resolves to it, connected. */
  restore(opts: Omit<RestoreOpts, "snapshotId"> = {}): Promise<Sandbox> {
    return Sandbox.restore(this.sandboxId, {
      apiKey: this.config.apiKey,
      domain: this.config.apiUrl,
      requestTimeoutMs: this.config.requestTimeoutMs,
      ...opts,
      snapshotId: this.snapshotId,
    });
  }

  /** Deletes it from the store. */
  async delete(opts: RequestOpts = {}): Promise<void> {
    await call(this.config, "DELETE", `/sandboxes/${this.sandboxId}/snapshots/${encodeURIComponent(this.snapshotId)}`, opts);
  }
}
