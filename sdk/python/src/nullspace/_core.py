"""What the sync and async clients share: configuration, errors, request shapes, parsing."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

DEFAULT_URL = "http://127.0.0.1:7080"
DEFAULT_REQUEST_TIMEOUT = 300.0


class SandboxError(Exception):
    """An error the API answered with (``code``, ``status``, ``message``, ``details``),
    or a local one (``code`` ``"config"`` / ``"protocol"``)."""

    def __init__(self, code: str, message: str, status: int = 0, details: Any = None):
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.details = details


class NotFoundError(SandboxError):
    """The API answered ``not_found``."""


def _dev_env() -> Dict[str, str]:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    path = Path(base) / "nullspace" / "dev.env"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (l.partition("=") for l in lines) if _}


@dataclass(frozen=True)
class Config:
    """Where the API is and who calls it."""

    api_url: str
    api_key: str
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT

    @staticmethod
    def resolve(api_key: Optional[str] = None, domain: Optional[str] = None,
                request_timeout: Optional[float] = None) -> "Config":
        env = _dev_env()
        key = api_key or os.environ.get("NULLSPACE_API_KEY") or env.get("NULLSPACE_API_KEY")
        if not key:
            raise SandboxError("config", "no API key: pass api_key= or set NULLSPACE_API_KEY "
                               "(deploy/up.sh writes one to ~/.local/state/nullspace/dev.env)")
        url = domain or os.environ.get("NULLSPACE_API_URL") or env.get("NULLSPACE_API_URL") or DEFAULT_URL
        return Config(_normalize(url), key, request_timeout or DEFAULT_REQUEST_TIMEOUT)

    def url(self, path: str) -> str:
        return f"{self.api_url}/api/v1{path}"

    def headers(self) -> Dict[str, str]:
        return {"X-API-Key": self.api_key}


def _normalize(url: str) -> str:
    url = url.strip().rstrip("/")
    if url.endswith("/api/v1"):
        url = url[: -len("/api/v1")]
    return url if "://" in url else f"http://{url}"


def raise_for(status: int, body: bytes) -> None:
    """Raises the API's error for a non-2xx answer."""
    if 200 <= status < 300:
        return
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    code = doc.get("code", "http_error") if isinstance(doc, dict) else "http_error"
    message = doc.get("message", body.decode(errors="replace")) if isinstance(doc, dict) else str(doc)
    cls = NotFoundError if code == "not_found" else SandboxError
    raise cls(code, message, status, doc.get("details") if isinstance(doc, dict) else None)


@dataclass
class SandboxInfo:
    """A sandbox as the API describes it."""

    sandbox_id: str
    template_id: str
    state: str
    metadata: Dict[str, str]
    timeout: int
    created_at: str
    expires_at: str
    resources: Optional[Dict[str, int]] = None
    timeline: List[Dict[str, Any]] = field(default_factory=list)
    diagnostic: Optional[Dict[str, str]] = None
    runtime: Optional[Dict[str, Any]] = None
    snapshot_interval: int = 0
    hibernated: bool = False
    egress: Optional[Dict[str, Any]] = None
    mounts: List[Dict[str, str]] = field(default_factory=list)

    @staticmethod
    def parse(doc: Dict[str, Any]) -> "SandboxInfo":
        return SandboxInfo(
            sandbox_id=doc["sandboxID"],
            template_id=doc.get("templateID", ""),
            state=doc.get("state", ""),
            metadata=doc.get("metadata") or {},
            timeout=doc.get("timeout", 0),
            created_at=doc.get("createdAt", ""),
            expires_at=doc.get("expiresAt", ""),
            resources=doc.get("resources"),
            timeline=doc.get("timeline") or [],
            diagnostic=doc.get("diagnostic"),
            runtime=doc.get("runtime"),
            snapshot_interval=doc.get("snapshotInterval", 0),
            hibernated=bool(doc.get("hibernated", False)),
            egress=doc.get("egress"),
            mounts=doc.get("mounts") or [],
        )


@dataclass
class SnapshotInfo:
    """A snapshot: a sandbox's memory, processes and disk at one instant. ``snapshot_id``
    works as a template (``Sandbox.create(template=snapshot_id)``)."""

    snapshot_id: str
    sandbox_id: str
    template_id: str
    kind: str
    created_at: str
    size_bytes: int
    stored_bytes: int
    storage: str
    resources: Optional[Dict[str, int]] = None

    @staticmethod
    def parse(doc: Dict[str, Any]) -> "SnapshotInfo":
        return SnapshotInfo(
            snapshot_id=doc["snapshotID"],
            sandbox_id=doc.get("sandboxID", ""),
            template_id=doc.get("templateID", ""),
            kind=doc.get("kind", ""),
            created_at=doc.get("createdAt", ""),
            size_bytes=doc.get("sizeBytes", 0),
            stored_bytes=doc.get("storedBytes", 0),
            storage=doc.get("storage", ""),
            resources=doc.get("resources"),
        )


def resources_body(resources: Dict[str, int]) -> Dict[str, int]:
    """``resources`` with the SDK's aliases (cpu, memory_mb, disk_mb) as the API's keys."""
    known = {"vcpus", "cpu", "memMiB", "memory_mb", "diskSizeMiB", "disk_mb"}
    unknown = set(resources) - known
    if unknown:
        raise SandboxError("invalid_request", f"resources has unknown keys {sorted(unknown)}; "
                           "send vcpus (or cpu), memMiB (or memory_mb), diskSizeMiB (or disk_mb)")
    return {
        "vcpus": resources.get("vcpus", resources.get("cpu", 2)),
        "memMiB": resources.get("memMiB", resources.get("memory_mb", 2048)),
        "diskSizeMiB": resources.get("diskSizeMiB", resources.get("disk_mb", 8192)),
    }


def restore_body(sandbox_id: str, snapshot_id: Optional[str], timeout: Optional[int],
                 metadata: Optional[Dict[str, str]]) -> Dict[str, Any]:
    body: Dict[str, Any] = {"sandboxID": sandbox_id}
    if snapshot_id is not None:
        body["snapshotID"] = snapshot_id
    if timeout is not None:
        body["timeout"] = timeout
    if metadata is not None:
        body["metadata"] = metadata
    return body


@dataclass
class CommandResult:
    """How a command ended, with its output."""

    stdout: str = ""
    stderr: str = ""
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    pid: Optional[int] = None


@dataclass
class EntryInfo:
    """A file or directory in a sandbox."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: int

    @staticmethod
    def parse(doc: Dict[str, Any]) -> "EntryInfo":
        return EntryInfo(doc.get("name", ""), doc.get("path", ""), doc.get("type", ""),
                         doc.get("size", 0), doc.get("mode", 0), doc.get("mtime", 0))


def egress_body(internet: bool = True, allow: Optional[List[str]] = None,
                deny: Optional[List[str]] = None) -> Dict[str, Any]:
    """An egress policy: ``internet`` (False: only ``allow`` is reachable), ``allow`` and
    ``deny`` lists of IPs, CIDRs, domains and ``*.domains`` (deny wins)."""
    return {"internet": internet, "allow": list(allow or []), "deny": list(deny or [])}


def mount_body(m: Any) -> Dict[str, Any]:
    """A mount: a volume ID or name (read-write), or ``{"id": ..., "type": "rw"|"ro"}``."""
    if isinstance(m, str):
        return {"id": m, "type": "rw"}
    return dict(m)


def create_body(template: str, timeout: Optional[int], metadata: Optional[Dict[str, str]],
                envs: Optional[Dict[str, str]], lifecycle: Optional[Dict[str, Any]],
                resources: Optional[Dict[str, int]],
                snapshot_interval: Optional[int] = None,
                warm_pool: Optional[str] = None,
                egress: Optional[Dict[str, Any]] = None,
                mounts: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    body: Dict[str, Any] = {"templateID": template}
    if egress is not None:
        body["egress"] = egress_body(**egress)
    if mounts:
        body["mounts"] = {path: mount_body(m) for path, m in mounts.items()}
    if snapshot_interval is not None:
        body["snapshotInterval"] = snapshot_interval
    if warm_pool is not None:
        if warm_pool not in ("require", "prefer"):
            raise SandboxError("invalid_request", f"warm_pool {warm_pool!r} is not a mode; "
                               "send 'require' or 'prefer'")
        body["warmPool"] = warm_pool
    if timeout is not None:
        body["timeout"] = timeout
    if metadata:
        body["metadata"] = metadata
    if envs:
        body["envVars"] = envs
    if lifecycle:
        lc = {}
        if "on_timeout" in lifecycle:
            lc["onTimeout"] = lifecycle["on_timeout"]
        if "auto_resume" in lifecycle:
            lc["autoResume"] = lifecycle["auto_resume"]
        body["lifecycle"] = lc
    if resources:
        body["resources"] = resources_body(resources)
    return body


def list_params(query: Optional[Dict[str, Any]], limit: Optional[int],
                next_token: Optional[str]) -> List[tuple]:
    params: List[tuple] = []
    query = query or {}
    state = query.get("state")
    if state:
        params.append(("state", ",".join(state) if isinstance(state, (list, tuple)) else state))
    for k, v in (query.get("metadata") or {}).items():
        params.append(("metadata", f"{k}={v}"))
    if limit is not None:
        params.append(("limit", str(limit)))
    if next_token:
        params.append(("nextToken", next_token))
    return params


def run_body(cmd: str, background: bool, envs: Optional[Dict[str, str]], cwd: Optional[str],
             user: Optional[str], stdin: bool) -> Dict[str, Any]:
    body: Dict[str, Any] = {"cmd": cmd, "background": background, "stdin": stdin}
    if envs:
        body["envs"] = envs
    if cwd:
        body["cwd"] = cwd
    if user:
        body["user"] = user
    return body


def apply_event(event: Dict[str, Any], result: CommandResult,
                on_stdout: Optional[Callable[[str], Any]],
                on_stderr: Optional[Callable[[str], Any]]) -> bool:
    """Applies one NDJSON command event; True once the command ended."""
    kind = event.get("event")
    if kind == "start":
        result.pid = event.get("pid")
    elif kind in ("stdout", "stderr"):
        text = event.get("data")
        if text is None and "dataBase64" in event:
            import base64
            text = base64.b64decode(event["dataBase64"]).decode(errors="replace")
        text = text or ""
        if kind == "stdout":
            result.stdout += text
            if on_stdout:
                on_stdout(text)
        else:
            result.stderr += text
            if on_stderr:
                on_stderr(text)
    elif kind == "exit":
        result.exit_code = event.get("exitCode")
        result.signal = event.get("signal")
        return True
    elif kind == "error":
        raise SandboxError(event.get("code", "sandbox_error"), event.get("message", ""), 200)
    return False


def redact_preview_url(url: str) -> str:
    """``url`` with any preview token replaced by ``REDACTED``, for logs."""
    base, sep, query = url.partition("?")
    if not sep:
        return url
    parts = []
    for kv in query.split("&"):
        key, eq, _ = kv.partition("=")
        parts.append(f"{key}=REDACTED" if key == "ns_preview_token" and eq else kv)
    return base + "?" + "&".join(parts)


def redact_preview_token(token: str) -> str:
    """A token with all but its first 6 characters hidden, for logs."""
    return token[:6] + "…REDACTED"


def metrics_params(start: Optional[int], end: Optional[int]) -> Dict[str, int]:
    params = {}
    if start is not None:
        params["start"] = int(start)
    if end is not None:
        params["end"] = int(end)
    return params
