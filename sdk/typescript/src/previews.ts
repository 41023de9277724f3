/**
 * Preview URLs: a port inside a sandbox served at `<port>-<sandboxId>.<preview domain>`
 * by the pool manager's preview listener, guarded by a signed token (in the URL, traded
 * for a cookie) unless the port is public; application proxies forward with the
 * `x-nullspace-preview-proxy-token` header instead. Redact tokens before logging them.
 *
 * @module
 */

/** Where an application proxy forwards a port's traffic, and the header it adds. */
export interface PreviewProxyTarget {
  /** `http://<port>-<sandboxId>.<preview domain>/` */
  url: string;
  /** `x-nullspace-preview-proxy-token` */
  header: string;
  /** The proxy token to send in `header`. */
  token: string;
}

/** A port's preview. */
export interface Preview {
  /** The port inside the sandbox. */
  port: number;
  /** Reachable without a token. */
  public: boolean;
  /** `<port>-<sandboxId>.<preview domain>` */
  host: string;
  /** Opens the port in a browser; carries the token unless the port is public. */
  url: string;
  /** The signed preview token (redact it before logging). */
  token: string;
  /** ISO 8601. */
  expiresAt: string;
  /** For application proxies: forward with the token in a header. */
  proxyTarget: PreviewProxyTarget;
}

/** The query parameter a preview URL carries its token in. */
export const PREVIEW_TOKEN_PARAM = "ns_preview_token";

/** The header an application proxy sends the proxy token in. */
export const PREVIEW_PROXY_HEADER = "x-nullspace-preview-proxy-token";

/** `url` with any preview token replaced by `REDACTED`, for logs. */
export function redactPreviewUrl(url: string): string {
  const q = url.indexOf("?");
  if (q < 0) return url;
  const base = url.slice(0, q);
  const parts = url
    .slice(q + 1)
    .split("&")
    .map((kv) => {
      const eq = kv.indexOf("=");
      return eq >= 0 && kv.slice(0, eq) === PREVIEW_TOKEN_PARAM ? `${PREVIEW_TOKEN_PARAM}=REDACTED` : kv;
    });
  return `${base}?${parts.join("&")}`;
}

/** A token with all but its first 6 characters hidden, for logs. */
export function redactPreviewToken(token: string): string {
  return `${token.slice(0, 6)}…REDACTED`;
}
