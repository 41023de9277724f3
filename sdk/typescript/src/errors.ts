/**
 * Typed errors. Every error the SDK throws is a {@link SandboxError} carrying the API's
 * `code` (`not_found`, `invalid_request`, `unauthorized`, ...), the HTTP `status` (0 for
 * an error the SDK raised itself), the `message` and the API's `details`. A subclass per
 * well-known code lets callers `catch (e) { if (e instanceof NotFoundError) ... }`.
 *
 * @module
 */

/**
 * An error the API answered with, or one the SDK raised before sending anything
 * (then `status` is 0; `code` is `invalid_request` for a bad argument, `config` for a
 * missing API key, `protocol` for a stream that broke its contract, `timeout` for a
 * deadline that passed, `unreachable` when the server could not be reached).
 */
export class SandboxError extends Error {
  /** The API's error code, e.g. `not_found`, `invalid_request`, `invalid_state`. */
  readonly code: string;
  /** The HTTP status of the answer; 0 when the SDK raised the error itself. */
  readonly status: number;
  /** The API's `details` object, if it sent one (e.g. a failed build's step). */
  readonly details: unknown;
  /** The message as the API (or the SDK) wrote it, without the status and code prefix. */
  readonly reason: string;

  /**
   * @param code - the error code (the API's, or the SDK's own)
   * @param message - what went wrong and what to send instead
   * @param status - the HTTP status (0: raised locally)
   * @param details - the API's details, if any
   * @param options - `cause`: the underlying error
   */
  constructor(code: string, message: string, status = 0, details?: unknown, options?: { cause?: unknown }) {
    super(status ? `${status} ${code}: ${message}` : `${code}: ${message}`, options);
    this.name = new.target.name;
    this.code = code;
    this.status = status;
    this.details = details;
    this.reason = message;
  }
}

/** The API answered `not_found` (404): no such sandbox, template, snapshot, volume, file. */
export class NotFoundError extends SandboxError {}

/** A request the API (or the SDK, before sending) refused: code `invalid_request`. */
export class InvalidRequestError extends SandboxError {}

/** The API key is missing, unknown or revoked: code `unauthorized` (401). */
export class AuthenticationError extends SandboxError {}

/** The key may not do this (e.g. a team key on a built-in warm pool): code `forbidden`. */
export class ForbiddenError extends SandboxError {}

/** The sandbox (or volume, template) is not in a state that allows this: `invalid_state`. */
export class InvalidStateError extends SandboxError {}

/** A team limit was reached: code `quota_exceeded`. */
export class QuotaExceededError extends SandboxError {}

/** Too many requests: code `rate_limited`. */
export class RateLimitError extends SandboxError {}

/** A deadline passed: the API's `timeout`, or a wait or request of the SDK that ran out. */
export class SandboxTimeoutError extends SandboxError {}

/** `warmPoolMode: "require"` found no ready instance: code `warm_pool_unavailable`. */
export class WarmPoolUnavailableError extends SandboxError {}

/** A template build failed: code `build_failed`; `details` says which step and why. */
export class BuildFailedError extends SandboxError {}

/** No API key anywhere (argument, environment, dev env file): code `config`. */
export class ConfigError extends SandboxError {}

/** The server could not be reached at all: code `unreachable`; `cause` has the reason. */
export class ConnectionError extends SandboxError {}

/**
 * A stream (command output, event stream) broke its contract or could not be resumed:
 * code `protocol` or `stream_failed`.
 */
export class StreamError extends SandboxError {}

/**
 * A command's output stream ended because another client attached to the same
 * command (only one waiter follows a command at a time): code `detached`. The command
 * keeps running; wait on it again to take it back.
 */
export class CommandDetachedError extends StreamError {}

const BY_CODE: Record<string, new (code: string, message: string, status?: number, details?: unknown) => SandboxError> = {
  not_found: NotFoundError,
  invalid_request: InvalidRequestError,
  unauthorized: AuthenticationError,
  forbidden: ForbiddenError,
  invalid_state: InvalidStateError,
  quota_exceeded: QuotaExceededError,
  rate_limited: RateLimitError,
  timeout: SandboxTimeoutError,
  warm_pool_unavailable: WarmPoolUnavailableError,
  build_failed: BuildFailedError,
  config: ConfigError,
  unreachable: ConnectionError,
  protocol: StreamError,
  stream_failed: StreamError,
  detached: CommandDetachedError,
  token_revoked: AuthenticationError,
};

/** The class for an HTTP status when the code alone does not name one. */
function byStatus(status: number, code: string): (typeof BY_CODE)[string] | undefined {
  switch (status) {
    case 401:
      return AuthenticationError;
    case 403:
      return ForbiddenError;
    case 404:
      return NotFoundError;
    case 409:
      return InvalidStateError;
    case 429:
      return /quota/.test(code) ? QuotaExceededError : RateLimitError;
    default:
      return undefined;
  }
}

/**
 * The typed error for an error code: `errorFor("not_found", ...)` is a
 * {@link NotFoundError}. A code it does not know is typed by the HTTP `status` (401
 * {@link AuthenticationError}, 403 {@link ForbiddenError}, 404 {@link NotFoundError},
 * 409 {@link InvalidStateError}, 429 {@link RateLimitError} or
 * {@link QuotaExceededError}); else it is a plain {@link SandboxError}.
 */
export function errorFor(code: string, message: string, status = 0, details?: unknown): SandboxError {
  const cls = BY_CODE[code] ?? byStatus(status, code) ?? SandboxError;
  return new cls(code, message, status, details);
}

/** A bad argument, refused before anything is sent (`invalid_request`, status 0). */
export function invalid(message: string): InvalidRequestError {
  return new InvalidRequestError("invalid_request", message);
}

/**
 * The error of a non-2xx answer: the API's `{code, message, details}` body when it sent
 * one, else `http_error` with the body's text.
 */
export function errorFromBody(status: number, text: string): SandboxError {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    doc = undefined;
  }
  if (doc && typeof doc === "object" && !Array.isArray(doc)) {
    const d = doc as { code?: unknown; message?: unknown; details?: unknown };
    const code = typeof d.code === "string" ? d.code : "http_error";
    const message = typeof d.message === "string" ? d.message : text;
    return errorFor(code, message, status, d.details);
  }
  return errorFor("http_error", text || `HTTP ${status}`, status);
}
