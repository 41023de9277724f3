/**
 * A sandbox's filesystem (`sandbox.files`): read and write whole files or streams,
 * upload and download local files, list, stat, make directories, rename, remove,
 * watch a directory, and presign URLs that need no credential. Relative paths are
 * under `/workspace`.
 *
 * @module
 */

import { createReadStream, createWriteStream } from "node:fs";
import { rename, stat, unlink } from "node:fs/promises";
import { Readable } from "node:stream";

import { invalid } from "./errors.js";
import {
  type Body,
  type DataPlane,
  INSPECT,
  MAX_TIMER_MS,
  type Streaming,
  chunks,
  expectOk,
  hide,
  json,
  ndjson,
  text,
} from "./http.js";
import { type EntryInfo, parseEntry } from "./models.js";

/** Data a file can be written from: text, bytes, a Blob, or a stream of bytes. */
export type WriteData = string | Uint8Array | ArrayBuffer | Blob | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

/** What a write reports: the absolute path and the bytes written. */
export interface WriteInfo {
  /** The path as written. */
  path: string;
  /** Bytes written. */
  bytes: number;
}

/** A change under a watched directory. */
export interface FilesystemEvent {
  /** What happened. */
  type: "create" | "write" | "remove" | "rename" | "chmod";
  /** The path it happened to. */
  path: string;
  /** The old path of a rename. */
  from?: string;
  /** Whether the path is a directory. */
  dir: boolean;
}

/** A URL for one path and method that needs no other credential until it expires. */
export interface PresignedUrl {
  /** The URL; no other credential needed. */
  url: string;
  /** The one method it allows. */
  method: "GET" | "PUT";
  /** The one path it allows. */
  path: string;
  /** When it stops working (ISO 8601). */
  expiresAt: string;
}

/** Options of a watch. */
export interface WatchOpts {
  /** Also changes in subdirectories. */
  recursive?: boolean;
  /** Stop after this many milliseconds (the iteration just ends). Default: never. */
  timeoutMs?: number;
  /** Stops the watch (the iteration ends). */
  signal?: AbortSignal;
}

function toStream(iter: AsyncIterable<Uint8Array>): ReadableStream<Uint8Array> {
  const it = iter[Symbol.asyncIterator]();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const r = await it.next();
      if (r.done) controller.close();
      else controller.enqueue(r.value);
    },
    async cancel() {
      await it.return?.();
    },
  });
}

/**
 * A streamed answer as a ReadableStream whose `cancel()` aborts the request at once
 * (even while a read is pending), not after the next chunk.
 */
function answerStream(s: Streaming): ReadableStream<Uint8Array> {
  const it = chunks(s);
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const r = await it.next();
      if (r.done) controller.close();
      else controller.enqueue(r.value);
    },
    async cancel() {
      s.deadline.done();
      s.deadline.controller.abort();
      s.response.body?.cancel().catch(() => undefined);
      await it.return?.().catch(() => undefined);
    },
  });
}

function body(data: WriteData): Body {
  if (typeof data === "string") return new TextEncoder().encode(data);
  if (data instanceof Uint8Array || data instanceof ArrayBuffer) return data;
  if (typeof Blob !== "undefined" && data instanceof Blob) return data;
  if (typeof ReadableStream !== "undefined" && data instanceof ReadableStream) return data;
  if (data && typeof (data as AsyncIterable<Uint8Array>)[Symbol.asyncIterator] === "function") {
    return toStream(data as AsyncIterable<Uint8Array>);
  }
  throw invalid("data must be a string, a Uint8Array, an ArrayBuffer, a Blob, a ReadableStream or an async iterable of bytes");
}

/** The filesystem of one sandbox: `sandbox.files`. */
export class Filesystem {
  private declare readonly dp: DataPlane;

  /** @internal */
  constructor(dp: DataPlane) {
    hide(this, "dp", dp);
  }

  /** What `console.log` shows: the sandbox ID, no credential. */
  [INSPECT](): string {
    return `Filesystem { sandboxId: '${this.dp.sandboxId}' }`;
  }

  /**
   * The whole file: as text (default, invalid UTF-8 replaced), as bytes
   * (`format: "bytes"`), or as a stream of bytes (`format: "stream"`, for large files;
   * cancelling the stream aborts the download). `requestTimeoutMs` bounds the wait for
   * the answer and then each silence while its body arrives, not the whole transfer.
   */
  read(path: string, opts?: { format?: "text" }): Promise<string>;
  read(path: string, opts: { format: "bytes" }): Promise<Uint8Array>;
  read(path: string, opts: { format: "stream" }): Promise<ReadableStream<Uint8Array>>;
  async read(
    path: string,
    opts: { format?: "text" | "bytes" | "stream" } = {},
  ): Promise<string | Uint8Array | ReadableStream<Uint8Array>> {
    const format = opts.format ?? "text";
    if (format === "stream") {
      const s = await this.dp.stream("GET", "/files", { query: { path } });
      return answerStream(s);
    }
    if (format !== "text" && format !== "bytes") {
      throw invalid(`format must be "text", "bytes" or "stream"; got ${JSON.stringify(format)}`);
    }
    const a = expectOk(await this.dp.request("GET", "/files", { query: { path } }));
    return format === "bytes" ? a.bytes : text(a);
  }

  /**
   * Writes the file (text, bytes, a Blob or a stream, streamed as it comes); it replaces
   * the old one atomically once every byte arrived. Missing parents are created. A large
   * body is sent in slices: `requestTimeoutMs` bounds each silence, not the whole upload.
   */
  async write(path: string, data: WriteData): Promise<WriteInfo> {
    const a = expectOk(await this.dp.request("PUT", "/files", { query: { path }, body: body(data) }));
    return a.bytes.length ? json<WriteInfo>(a) : { path, bytes: -1 };
  }

  /** Streams a local file into the sandbox; resolves to its size in bytes. */
  async upload(localPath: string, path: string): Promise<number> {
    const size = (await stat(localPath)).size;
    const stream = Readable.toWeb(createReadStream(localPath, { highWaterMark: 256 * 1024 })) as ReadableStream<Uint8Array>;
    await this.write(path, stream);
    return size;
  }

  /**
   * Streams a file out of the sandbox into `localPath`; only a complete download takes
   * the name. Resolves to the bytes written.
   */
  async download(path: string, localPath: string): Promise<number> {
    const s = await this.dp.stream("GET", "/files", { query: { path } });
    const tmp = `${localPath}.nullspace-partial`;
    const out = createWriteStream(tmp);
    // A write error (no space, no permission, a missing directory) rejects the download
    // instead of crashing the process as an unhandled 'error' event.
    let failed: Error | undefined;
    let onFail: ((e: Error) => void) | undefined;
    out.on("error", (e: Error) => {
      failed ??= e;
      onFail?.(e);
    });
    const check = () => {
      if (failed) throw failed;
    };
    let n = 0;
    try {
      for await (const chunk of chunks(s)) {
        check();
        n += chunk.byteLength;
        if (!out.write(chunk)) {
          await new Promise<void>((resolve, reject) => {
            const drained = () => {
              onFail = undefined;
              resolve();
            };
            onFail = (e) => {
              out.off("drain", drained);
              reject(e);
            };
            out.once("drain", drained);
            if (failed) onFail(failed);
          });
        }
      }
      check();
      await new Promise<void>((resolve, reject) => {
        onFail = reject;
        if (failed) return reject(failed);
        out.end(() => (failed ? reject(failed) : resolve()));
      });
      check();
    } catch (e) {
      out.destroy();
      await unlink(tmp).catch(() => undefined);
      throw e;
    }
    await rename(tmp, localPath);
    return n;
  }

  /** The entries of a directory. */
  async list(path: string): Promise<EntryInfo[]> {
    const a = expectOk(await this.dp.request("GET", "/files/list", { query: { path } }));
    return json<{ entries: Record<string, unknown>[] }>(a).entries.map(parseEntry);
  }

  /** Describes a path. */
  async getInfo(path: string): Promise<EntryInfo> {
    const a = expectOk(await this.dp.request("GET", "/files/stat", { query: { path } }));
    return parseEntry(json(a));
  }

  /** Whether a path exists. */
  async exists(path: string): Promise<boolean> {
    const a = await this.dp.request("GET", "/files/stat", { query: { path } });
    if (a.status === 404) return false;
    expectOk(a);
    return true;
  }

  /** Creates a directory and its parents. */
  async makeDir(path: string): Promise<void> {
    expectOk(await this.dp.request("POST", "/files/mkdir", { json: { path } }));
  }

  /** Removes a file or a directory tree. */
  async remove(path: string): Promise<void> {
    expectOk(await this.dp.request("DELETE", "/files", { query: { path } }));
  }

  /** Renames (moves) a path. */
  async rename(oldPath: string, newPath: string): Promise<void> {
    expectOk(await this.dp.request("POST", "/files/rename", { json: { from: oldPath, to: newPath } }));
  }

  /**
   * A URL that downloads (`GET`) or uploads (`PUT`, the request body) `path` with no
   * other credential until it expires (`expires` seconds, at most a day; default 3600).
   */
  async presign(path: string, opts: { method?: "GET" | "PUT"; expires?: number } = {}): Promise<PresignedUrl> {
    const a = expectOk(
      await this.dp.request("POST", "/files/presign", {
        json: { path, method: opts.method ?? "GET", expires: opts.expires ?? 3600 },
      }),
    );
    return json<PresignedUrl>(a);
  }

  /**
   * Changes under `path` as they happen, as an async iterator: `{ type: create | write |
   * remove | rename | chmod, path, from?, dir }`. Breaking out of the loop (or
   * `signal`, or `timeoutMs`) ends the watch.
   */
  async *watchDir(path: string, opts: WatchOpts = {}): AsyncGenerator<FilesystemEvent, void, undefined> {
    const stop = new AbortController();
    const onAbort = () => stop.abort();
    if (opts.signal) {
      if (opts.signal.aborted) return;
      opts.signal.addEventListener("abort", onAbort, { once: true });
    }
    const timer = opts.timeoutMs !== undefined ? setTimeout(() => stop.abort(), opts.timeoutMs) : undefined;
    try {
      const s = await this.dp.stream("GET", "/files/watch", {
        query: { path, recursive: opts.recursive ? "true" : "false" },
        // A watch is silent as long as nothing changes: no idle timeout of its own.
        requestTimeoutMs: MAX_TIMER_MS,
        signal: stop.signal,
      });
      for await (const ev of ndjson<FilesystemEvent>(s)) yield ev;
    } catch (e) {
      if (stop.signal.aborted) return; // stopped by the caller or its timeout
      throw e;
    } finally {
      if (timer !== undefined) clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
      stop.abort();
    }
  }

  /** Same as {@link Filesystem.watchDir}. */
  watch(path: string, opts: WatchOpts = {}): AsyncGenerator<FilesystemEvent, void, undefined> {
    return this.watchDir(path, opts);
  }
}
