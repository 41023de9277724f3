"""What the sync and async clients share: configuration, errors, request shapes, parsing."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:
    from datetime import datetime

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
    #: Its security policy as the API keeps it (REST names: ``pii``,
    #: ``injectionDefense``, ``transforms``, ``audit``, ``envMasking``, each masked
    #: secret with its generated ``placeholder``, never a real value); None without one.
    security_policy: Optional[Dict[str, Any]] = None
    #: Its page in the web dashboard (``dashboardUrl``).
    dashboard_url: str = ""

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
            security_policy=doc.get("securityPolicy"),
            dashboard_url=doc.get("dashboardUrl", ""),
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
    name: Optional[str] = None
    #: Only on the snapshot just taken: the bytes it sent to the store (what the store
    #: lacked of it; the rest it shares with other snapshots).
    uploaded_bytes: Optional[int] = None

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
            name=doc.get("name"),
            uploaded_bytes=doc.get("uploadedBytes"),
        )


class StoredSnapshot(SnapshotInfo):
    """A ``SnapshotInfo`` that knows its client configuration, with the seed's names
    (``id``, ``created``, ``size``); the sync and async ``Snapshot`` add ``restore`` and
    ``delete``."""

    def __init__(self, info: SnapshotInfo, config: "Config"):
        super().__init__(**{f.name: getattr(info, f.name) for f in fields(info)})
        self._config = config

    @property
    def id(self) -> str:
        return self.snapshot_id

    @property
    def created(self) -> Optional["datetime"]:
        """When it was taken (UTC)."""
        return parse_time(self.created_at)

    @property
    def size(self) -> int:
        """Bytes a restore materializes."""
        return self.size_bytes

    @property
    def info(self) -> SnapshotInfo:
        return SnapshotInfo(**{f.name: getattr(self, f.name) for f in fields(SnapshotInfo)})


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


#: What a fork child or a restored copy does with the original's read-write volumes.
VOLUME_INHERITANCE = ("readonly", "copy")


def volumes_mode(volumes: Optional[str]) -> Optional[str]:
    """Checks ``volumes`` of a fork or restore: ``"readonly"`` (the same volume, mounted
    read-only; the default), ``"copy"`` (a new volume of the original's content), or None."""
    if volumes is not None and volumes not in VOLUME_INHERITANCE:
        raise ValueError(f"volumes={volumes!r}: send \"readonly\" (the default: the same "
                         "volume, read-only) or \"copy\" (a new volume of its content)")
    return volumes


def restore_body(sandbox_id: str, snapshot_id: Optional[str], timeout: Optional[int],
                 metadata: Optional[Dict[str, str]],
                 volumes: Optional[str] = None) -> Dict[str, Any]:
    body: Dict[str, Any] = {"sandboxID": sandbox_id}
    if snapshot_id is not None:
        body["snapshotID"] = snapshot_id
    if timeout is not None:
        body["timeout"] = timeout
    if metadata is not None:
        body["metadata"] = metadata
    if volumes_mode(volumes) is not None:
        body["volumes"] = volumes
    return body


def fork_body(count: int, volumes: Optional[str]) -> Dict[str, Any]:
    body: Dict[str, Any] = {"count": count}
    if volumes_mode(volumes) is not None:
        body["volumes"] = volumes
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


ALL_TRAFFIC_V4 = "0.0.0.0/0"
ALL_TRAFFIC_V6 = "::/0"
ON_TIMEOUT_VALUES = ("kill", "pause", "hibernate")
WARM_POOL_MODES = ("require", "prefer")


def _invalid(message: str) -> SandboxError:
    return SandboxError("invalid_request", message)


def _strings(name: str, value: Any) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"{name} must be a list of strings (IPs, CIDRs or domains), "
                       f"e.g. [\"10.0.0.0/8\", \"example.com\"]; got {value!r}")
    return [v.strip() for v in value]


@dataclass
class SandboxNetworkOpts:
    """Seed 001's fine-grained network configuration. ``deny_out=["0.0.0.0/0"]`` closes
    all outbound traffic, and ``allow_out`` then lists what stays reachable.

    It becomes the REST ``egress`` policy: ``0.0.0.0/0`` in ``deny_out`` turns
    ``internet`` off (``::/0`` goes with it), ``allow_out`` → ``allow``, the rest of
    ``deny_out`` → ``deny``. Here a deny rule wins over an allow rule, so an
    ``allow_out`` entry inside a remaining ``deny_out`` entry is refused rather than
    silently blocked."""

    allow_out: List[str] = field(default_factory=list)
    deny_out: List[str] = field(default_factory=list)

    @staticmethod
    def parse(value: Any) -> "SandboxNetworkOpts":
        if isinstance(value, SandboxNetworkOpts):
            return value
        if not isinstance(value, dict):
            raise _invalid(f"network must be a SandboxNetworkOpts or a dict with allow_out "
                           f"and deny_out; got {type(value).__name__}")
        unknown = set(value) - {"allow_out", "deny_out"}
        if unknown:
            raise _invalid(f"network has unknown keys {sorted(unknown)}; send allow_out "
                           "and deny_out (lists of IPs, CIDRs, domains)")
        return SandboxNetworkOpts(_strings("network.allow_out", value.get("allow_out")),
                                  _strings("network.deny_out", value.get("deny_out")))

    def egress(self) -> Dict[str, Any]:
        """The REST ``egress`` policy this stands for."""
        allow = _strings("network.allow_out", self.allow_out)
        deny_out = _strings("network.deny_out", self.deny_out)
        closed = ALL_TRAFFIC_V4 in deny_out
        deny = [d for d in deny_out
                if d != ALL_TRAFFIC_V4 and not (closed and d == ALL_TRAFFIC_V6)]
        for a in allow:
            for d in deny:
                if _covers(d, a):
                    raise _invalid(
                        f"network.allow_out {a!r} is inside network.deny_out {d!r}, and a "
                        f"deny rule wins here; remove {a!r} from allow_out or narrow {d!r}")
        return {"internet": not closed, "allow": allow, "deny": deny}


def _covers(deny: str, allow: str) -> bool:
    """Whether destination rule ``deny`` matches everything ``allow`` names."""
    import ipaddress
    try:
        d_net = ipaddress.ip_network(deny, strict=False)
        a_net = ipaddress.ip_network(allow, strict=False)
    except ValueError:
        d_net = a_net = None
    if d_net is not None and a_net is not None:
        return d_net.version == a_net.version and a_net.subnet_of(d_net)  # type: ignore[arg-type]
    d, a = deny.lower().rstrip("."), allow.lower().rstrip(".")
    if d.startswith("*."):
        suffix = d[1:]
        return a.endswith(suffix) and a != suffix[1:]
    return d == a


@dataclass
class SandboxLifecycle:
    """What the timeout does: ``on_timeout`` ``"kill"`` (default), ``"pause"`` or
    ``"hibernate"``; ``auto_resume=True`` (only with pause or hibernate) wakes the paused
    sandbox on preview traffic and SDK calls; ``idle_timeout`` (seconds without SDK
    calls, preview traffic or a running foreground command) applies ``on_timeout``
    early."""

    on_timeout: Optional[str] = None
    auto_resume: Optional[bool] = None
    idle_timeout: Optional[int] = None

    @staticmethod
    def parse(value: Any) -> "SandboxLifecycle":
        if isinstance(value, SandboxLifecycle):
            return SandboxLifecycle(value.on_timeout, value.auto_resume, value.idle_timeout)
        if not isinstance(value, dict):
            raise _invalid(f"lifecycle must be a SandboxLifecycle or a dict with on_timeout "
                           f"and auto_resume; got {type(value).__name__}")
        names = {"on_timeout": "on_timeout", "onTimeout": "on_timeout",
                 "auto_resume": "auto_resume", "autoResume": "auto_resume",
                 "idle_timeout": "idle_timeout", "idleTimeout": "idle_timeout"}
        unknown = set(value) - set(names)
        if unknown:
            raise _invalid(f"lifecycle has unknown keys {sorted(unknown)}; send on_timeout, "
                           "auto_resume and idle_timeout")
        lc = SandboxLifecycle()
        for key, v in value.items():
            setattr(lc, names[key], v)
        return lc


@dataclass
class SecurityPolicy:
    """Seed 001's security policy: the sandbox's TLS connections are intercepted (the
    guest trusts its team's CA) and each HTTP request is checked, rewritten and audited.
    Sent as ``securityPolicy`` at create (``Sandbox.create(security_policy=...)``) or
    live (``sbx.set_security_policy(...)``); every part is optional:

    - ``pii``: ``{"detectors": {detector: "log" | "redact" | "block"}}`` for what the
      guest sends; detectors ``email``, ``phone``, ``card``, ``iban``, ``ipv4``,
      ``ipv6``, ``jwt``, ``privateKey``, ``apiKey`` (absent ones are off).
    - ``injection_defense``: ``{"action": "flag" | "strip" | "block"}`` for prompt
      injection in what the guest receives.
    - ``transforms``: ``[{"host": "api.example.com" or "*.example.com",
      "requestHeaders": {"set": {name: value}, "remove": [name]}, "responseHeaders":
      {...}, "upstreamHost": "host[:port]"}]``.
    - ``audit``: ``{"enabled": True}`` (the default; ``True``/``False`` are short for
      it): one record per request, read with ``sbx.get_audit()`` / ``sbx.audit()``.
    - ``env_masking``: ``{"secrets": [{"name": "OPENAI_API_KEY", "hosts":
      ["api.openai.com"], "placeholder": "optional, 16+ characters"}]}``. The real
      value goes in ``envs`` under the same name at create; the guest only ever sees
      the placeholder, which the proxy swaps for the value on requests to ``hosts``
      (a secret not given at create cannot be added live).

    ``secure=True`` without a policy sends ``{}``: interception with the audit only.
    A dict works too, with these names or the REST ones (``injectionDefense``,
    ``envMasking``), so a sandbox's ``SandboxInfo.security_policy`` can be sent back.
    The SDK checks each part's JSON type; the API checks the rest and says what to
    send instead."""

    pii: Any = None
    injection_defense: Any = None
    transforms: Any = None
    audit: Any = None
    env_masking: Any = None

    _WIRE = {"pii": "pii", "injection_defense": "injectionDefense",
             "transforms": "transforms", "audit": "audit", "env_masking": "envMasking"}
    _EXAMPLES = {
        "pii": '{"detectors": {"email": "redact", "card": "block"}}',
        "injection_defense": '{"action": "flag"}',
        "transforms": '[{"host": "api.example.com", "requestHeaders": {"set": {"x-team": "a"}}}]',
        "audit": '{"enabled": True}',
        "env_masking": '{"secrets": [{"name": "OPENAI_API_KEY", "hosts": ["api.openai.com"]}]}',
    }

    @staticmethod
    def body_of(value: Any) -> Dict[str, Any]:
        """The REST ``securityPolicy`` of a SecurityPolicy or a dict of its fields
        (the SDK's names or the REST ones)."""
        wire = SecurityPolicy._WIRE
        if isinstance(value, SecurityPolicy):
            items = {k: getattr(value, k) for k in wire}
        elif isinstance(value, dict):
            names = {**{k: k for k in wire}, **{w: k for k, w in wire.items()}}
            unknown = set(value) - set(names)
            if unknown:
                raise _invalid(f"security_policy has unknown keys {sorted(unknown)}; send "
                               f"{', '.join(wire)}")
            items = {}
            for key, v in value.items():
                if names[key] in items:
                    raise _invalid(f"security_policy has {names[key]} twice (as "
                                   f"{names[key]!r} and {wire[names[key]]!r}); send one")
                items[names[key]] = v
        else:
            raise _invalid(f"security_policy must be a SecurityPolicy or a dict; got "
                           f"{type(value).__name__}")
        body: Dict[str, Any] = {}
        for name, v in items.items():
            if v is None:
                continue
            if name == "audit" and isinstance(v, bool):
                v = {"enabled": v}
            expected = list if name == "transforms" else dict
            if not isinstance(v, expected):
                raise _invalid(f"security_policy.{name} must be a "
                               f"{'list' if expected is list else 'dict'}, e.g. "
                               f"{SecurityPolicy._EXAMPLES[name]}; got {v!r}")
            body[wire[name]] = v
        return body


@dataclass
class AuditDetection:
    """One thing the security policy found in a request or response: ``kind`` (a PII
    detector such as ``card``, ``injection:<rule>``, ``secret:<name>``, ...),
    ``where`` (``url``, ``requestHeader:<name>``, ``requestBody``, ``responseBody``,
    ...) and the ``action`` taken (``log``, ``redact``, ``block``, ``flag``, ...)."""

    kind: str
    where: str
    action: str

    @staticmethod
    def parse(doc: Dict[str, Any]) -> "AuditDetection":
        return AuditDetection(doc.get("kind", ""), doc.get("where", ""), doc.get("action", ""))


@dataclass
class AuditRecord:
    """One HTTP request a sandbox with a security policy made, as the audit keeps it.
    ``action`` is what became of it: ``allowed``, ``modified`` (redacted, stripped,
    secrets swapped), ``blocked`` or ``error`` (the upstream failed). ``path`` is what
    was sent upstream (after redaction, never with a real secret); ``status`` is 0 when
    the guest got no answer; ``bytes_in`` came from the upstream, ``bytes_out`` went
    to it."""

    id: int
    time: str
    method: str
    host: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    duration_ms: int
    detections: List[AuditDetection]
    action: str

    @property
    def timestamp(self) -> Optional["datetime"]:
        """``time`` as an aware datetime (UTC)."""
        return parse_time(self.time)

    @staticmethod
    def parse(doc: Dict[str, Any]) -> "AuditRecord":
        return AuditRecord(
            id=doc["id"], time=doc.get("time", ""), method=doc.get("method", ""),
            host=doc.get("host", ""), path=doc.get("path", ""), status=doc.get("status", 0),
            bytes_in=doc.get("bytesIn", 0), bytes_out=doc.get("bytesOut", 0),
            duration_ms=doc.get("durationMs", 0),
            detections=[AuditDetection.parse(d) for d in doc.get("detections") or []],
            action=doc.get("action", ""))


@dataclass
class AuditPage:
    """One page of a sandbox's audit: ``records`` oldest first, ``next`` (pass it as
    ``after`` for the next page) and ``more`` (whether records past ``next`` exist
    now)."""

    records: List[AuditRecord]
    next: int
    more: bool

    @staticmethod
    def parse(doc: Dict[str, Any], after: int = 0) -> "AuditPage":
        records = [AuditRecord.parse(r) for r in doc.get("records") or []]
        nxt = doc.get("next")
        if nxt is None:
            nxt = records[-1].id if records else after
        return AuditPage(records, nxt, bool(doc.get("more", False)))


def audit_params(after: Any, limit: Any) -> Dict[str, int]:
    """``after``/``limit`` of an audit page, checked."""
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise _invalid(f"after must be an audit record ID from 0 (a page's next); "
                       f"got {after!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise _invalid(f"limit must be 1 to 1000 records; got {limit!r}")
    return {"after": after, "limit": limit}


def _one_of(name: str, first: Any, other_name: str, other: Any) -> Any:
    if first is not None and other is not None and first != other:
        raise _invalid(f"{name}={first!r} and {other_name}={other!r} disagree; send one of them")
    return first if first is not None else other


def create_body(template: Optional[str], timeout: Optional[int], metadata: Optional[Dict[str, str]],
                envs: Optional[Dict[str, str]], lifecycle: Any,
                resources: Optional[Dict[str, int]],
                snapshot_interval: Optional[int] = None,
                warm_pool: Optional[str] = None,
                egress: Optional[Dict[str, Any]] = None,
                mounts: Optional[Dict[str, Any]] = None,
                *, allow_internet_access: Optional[bool] = None, network: Any = None,
                secure: Optional[bool] = None, security_policy: Any = None,
                on_timeout: Optional[str] = None, auto_resume: Optional[bool] = None,
                warm_pool_mode: Optional[str] = None,
                wait_ready: bool = True, idle_timeout: Optional[int] = None,
                image_name: Optional[str] = None, image_id: Optional[str] = None,
                snapshot_name: Optional[str] = None, snapshot_id: Optional[str] = None,
                region: Optional[str] = None,
                recording: Optional[bool] = None) -> Dict[str, Any]:
    """The REST create body for the SDK's parameters (seed 001 and 004 names included).
    The start source is ``template`` (default ``"base"``), ``image_name`` or
    ``snapshot_name`` (seed 002), exactly one."""
    sources = [n for n, v in (("template", template), ("image_name", image_name),
                              ("snapshot_name", snapshot_name)) if v is not None]
    if len(sources) > 1:
        raise _invalid(f"{' and '.join(sources)} are each a start source; send one of them")
    if image_id is not None and image_name is None:
        raise _invalid("image_id pins the build of image_name; send it with image_name")
    if snapshot_id is not None and snapshot_name is None:
        raise _invalid("snapshot_id pins the snapshot of snapshot_name; send it with "
                       "snapshot_name")
    body: Dict[str, Any] = {}
    if image_name is not None:
        body["imageName"] = image_name
        if image_id is not None:
            body["imageId"] = image_id
    elif snapshot_name is not None:
        body["snapshotName"] = snapshot_name
        if snapshot_id is not None:
            body["snapshotId"] = snapshot_id
    else:
        body["templateID"] = template if template is not None else "base"
    if region is not None:
        body["region"] = region
    if recording is not None:
        body["recording"] = bool(recording)
    # Network: `network` overrides `allow_internet_access` (seed 001); our own `egress`
    # is the REST form, and two sources of one policy are a mistake, not a merge.
    if egress is not None and (network is not None or allow_internet_access is not None):
        raise _invalid("egress and network/allow_internet_access both set the network "
                       "policy; send one of them")
    if network is not None:
        body["egress"] = SandboxNetworkOpts.parse(network).egress()
    elif allow_internet_access is not None:
        if not isinstance(allow_internet_access, bool):
            raise _invalid(f"allow_internet_access must be True or False; got "
                           f"{allow_internet_access!r}")
        if not allow_internet_access:
            body["egress"] = egress_body(internet=False)
    elif egress is not None:
        body["egress"] = egress_body(**egress)
    if secure is False and security_policy is not None:
        raise _invalid("secure=False turns the security proxy off, but security_policy "
                       "configures it; send one of them")
    if security_policy is not None:
        body["securityPolicy"] = SecurityPolicy.body_of(security_policy)
    elif secure:
        body["securityPolicy"] = {}
    if mounts:
        body["mounts"] = {path: mount_body(m) for path, m in mounts.items()}
    if snapshot_interval is not None:
        body["snapshotInterval"] = snapshot_interval
    mode = _one_of("warm_pool", warm_pool, "warm_pool_mode", warm_pool_mode)
    if mode is not None:
        if mode not in WARM_POOL_MODES:
            raise _invalid(f"warm_pool_mode {mode!r} is not a mode; send 'require' or 'prefer'")
        body["warmPool"] = mode
    if timeout is not None:
        body["timeout"] = timeout
    if metadata:
        body["metadata"] = metadata
    if envs:
        body["envVars"] = envs
    lc = SandboxLifecycle.parse(lifecycle) if lifecycle is not None else SandboxLifecycle()
    lc.on_timeout = _one_of("lifecycle.on_timeout", lc.on_timeout, "on_timeout", on_timeout)
    lc.auto_resume = _one_of("lifecycle.auto_resume", lc.auto_resume, "auto_resume",
                             auto_resume)
    lc.idle_timeout = _one_of("lifecycle.idle_timeout", lc.idle_timeout, "idle_timeout",
                              idle_timeout)
    if lc.on_timeout is not None and lc.on_timeout not in ON_TIMEOUT_VALUES:
        raise _invalid(f"on_timeout {lc.on_timeout!r} is not a timeout action; send "
                       "'kill', 'pause' or 'hibernate'")
    wire = (("onTimeout", lc.on_timeout), ("autoResume", lc.auto_resume),
            ("idleTimeout", lc.idle_timeout))
    if any(v is not None for _, v in wire):
        body["lifecycle"] = {k: v for k, v in wire if v is not None}
    if resources:
        body["resources"] = resources_body(resources)
    if not wait_ready:
        body["waitReady"] = False
    return body


def fields_query(fields: Optional[List[str]]) -> Optional[str]:
    """``fields=`` for the REST API, or None; the seeds' ``id`` and ``status`` included."""
    if fields is None:
        return None
    if isinstance(fields, str) or not fields or not all(
            isinstance(f, str) and f.strip() for f in fields):
        raise _invalid(f"fields must be a non-empty list of names, e.g. [\"id\", \"status\"]; "
                       f"got {fields!r}")
    return ",".join(f.strip() for f in fields)


def only_fields(doc: Dict[str, Any], fields: Optional[List[str]]) -> Dict[str, Any]:
    """A projected sandbox with exactly the names asked for (the API also keeps
    ``sandboxID`` in every projection)."""
    names = [f.strip() for f in fields or []]
    return {n: doc[n] for n in names if n in doc}


def list_page(doc: Dict[str, Any], fields: Optional[List[str]]) -> Dict[str, Any]:
    items = doc["sandboxes"]
    if fields is not None:
        items = [only_fields(d, fields) for d in items]
    return {"sandboxes": items, "next_token": doc.get("nextToken")}


def list_params(query: Optional[Dict[str, Any]], limit: Optional[int],
                next_token: Optional[str], fields: Optional[List[str]] = None) -> List[tuple]:
    params: List[tuple] = []
    projection = fields_query(fields)
    if projection is not None:
        params.append(("fields", projection))
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
    # One incremental UTF-8 decoder per stream (kept on the result, not a field): the
    # server sends raw chunks, and a character split across two of them arrives as
    # two base64 pieces that only decode together.
    decoders = result.__dict__.setdefault("_decoders", {})

    def emit(name: str, text: str) -> None:
        if not text:
            return
        if name == "stdout":
            result.stdout += text
            if on_stdout:
                on_stdout(text)
        else:
            result.stderr += text
            if on_stderr:
                on_stderr(text)

    if kind == "start":
        result.pid = event.get("pid")
    elif kind in ("stdout", "stderr"):
        import codecs
        if kind not in decoders:
            decoders[kind] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if event.get("data") is not None:
            raw = event["data"].encode("utf-8", errors="surrogatepass")
        elif "dataBase64" in event:
            import base64
            raw = base64.b64decode(event["dataBase64"])
        else:
            raw = b""
        emit(kind, decoders[kind].decode(raw))
    elif kind == "exit":
        for name, decoder in decoders.items():
            emit(name, decoder.decode(b"", final=True))
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


def _unix(name: str, value: Any, round_up: bool) -> int:
    import math
    from datetime import datetime, timezone
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"{name} must be a datetime or Unix seconds; got {value!r}")
    return int(math.ceil(value) if round_up else math.floor(value))


def metrics_params(start: Any, end: Any) -> Dict[str, int]:
    """``start``/``end`` (datetimes, naive ones in UTC, or Unix seconds) as the query."""
    params = {}
    if start is not None:
        params["start"] = _unix("start", start, round_up=False)
    if end is not None:
        params["end"] = _unix("end", end, round_up=True)
    return params


def parse_time(text: str) -> Optional["datetime"]:
    """An ISO 8601 time of the API as an aware datetime (None if absent)."""
    import re
    from datetime import datetime
    if not text:
        return None
    text = text.replace("Z", "+00:00").replace("z", "+00:00")
    # Older Pythons take exactly 3 or 6 fractional digits; the API may send up to 9.
    text = re.sub(r"\.(\d+)", lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    return datetime.fromisoformat(text)


@dataclass
class SandboxMetrics:
    """One resource sample (seed 001's ``SandboxMetrics``)."""

    timestamp: "datetime"
    cpu_used_pct: float
    cpu_count: int
    mem_used_mib: int
    mem_total_mib: int
    disk_used_bytes: int
    disk_total_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    tasks: int
    host_cpu_pct: float

    @property
    def mem_used(self) -> int:
        """Memory used, bytes."""
        return self.mem_used_mib * 1024 * 1024

    @property
    def mem_total(self) -> int:
        """Memory of the VM, bytes."""
        return self.mem_total_mib * 1024 * 1024

    @property
    def disk_used(self) -> int:
        """Root disk used, bytes."""
        return self.disk_used_bytes

    @property
    def disk_total(self) -> int:
        """Root disk size, bytes."""
        return self.disk_total_bytes

    @staticmethod
    def parse(doc: Dict[str, Any]) -> "SandboxMetrics":
        from datetime import datetime, timezone
        return SandboxMetrics(
            timestamp=datetime.fromtimestamp(doc["timestamp"], tz=timezone.utc),
            cpu_used_pct=doc.get("cpuUsedPct", 0.0), cpu_count=doc.get("cpuCount", 0),
            mem_used_mib=doc.get("memUsedMiB", 0), mem_total_mib=doc.get("memTotalMiB", 0),
            disk_used_bytes=doc.get("diskUsedBytes", 0),
            disk_total_bytes=doc.get("diskTotalBytes", 0),
            net_rx_bytes=doc.get("netRxBytes", 0), net_tx_bytes=doc.get("netTxBytes", 0),
            tasks=doc.get("tasks", 0), host_cpu_pct=doc.get("hostCpuPct", 0.0))


def logs_params(offset: int, limit: Optional[int]) -> Dict[str, int]:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise _invalid(f"offset must be a line number from 0; got {offset!r}")
    params = {"offset": offset}
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise _invalid(f"limit must be 1 to 1000 lines; got {limit!r}")
        params["limit"] = limit
    return params


def check_port(port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _invalid(f"port must be an integer from 1 to 65535; got {port!r}")
    return port


def ready_or_raise(info: "SandboxInfo") -> bool:
    """Whether a polled sandbox is running; raises if it never will be."""
    if info.state == "running":
        return True
    if info.state in ("error", "deleted"):
        d = info.diagnostic or {}
        raise SandboxError(d.get("code", "sandbox_failed"),
                           f"sandbox {info.sandbox_id} is {info.state}, it will not become "
                           f"ready: {d.get('message', 'no diagnostic recorded')}", 0, d or None)
    return False


def restore_snapshot_id(snapshot_id: Any) -> Optional[str]:
    """A snapshot ID, or the ID of a ``SnapshotInfo``/``Snapshot``."""
    return getattr(snapshot_id, "snapshot_id", snapshot_id)


# --- Code interpreter (the code-interpreter template's helper, docs/TEMPLATES.md) ---

#: The helper the code-interpreter template installs; it prints one JSON event a line.
CODE_HELPER = "/usr/local/bin/nullspace-code"
#: Code longer than this goes through a file rather than the command line.
CODE_ARGV_LIMIT = 96 * 1024


@dataclass
class Result:
    """One output of an execution: the kernel's MIME bundle, by format. ``is_main_result``
    is the cell's value (``execute_result``); others come from ``display()`` or figures.
    ``png`` and ``jpeg`` are base64 strings, as Jupyter gives them."""

    text: Optional[str] = None
    html: Optional[str] = None
    markdown: Optional[str] = None
    svg: Optional[str] = None
    png: Optional[str] = None
    jpeg: Optional[str] = None
    pdf: Optional[str] = None
    latex: Optional[str] = None
    json: Optional[Any] = None
    javascript: Optional[str] = None
    is_main_result: bool = False
    raw: Dict[str, Any] = field(default_factory=dict)

    MIME = {"text/plain": "text", "text/html": "html", "text/markdown": "markdown",
            "image/svg+xml": "svg", "image/png": "png", "image/jpeg": "jpeg",
            "application/pdf": "pdf", "text/latex": "latex", "application/json": "json",
            "application/javascript": "javascript"}

    @classmethod
    def parse(cls, data: Dict[str, Any], is_main_result: bool = False) -> "Result":
        r = cls(is_main_result=is_main_result, raw=dict(data))
        for mime, name in cls.MIME.items():
            if mime in data:
                value = data[mime]
                if isinstance(value, list) and name != "json":
                    value = "".join(value)
                if name in ("png", "jpeg") and isinstance(value, str):
                    value = value.replace("\n", "")
                setattr(r, name, value)
        return r

    def formats(self) -> List[str]:
        """The formats this result has (``text``, ``png``, ...)."""
        return [n for n in self.MIME.values() if getattr(self, n) is not None]

    def png_bytes(self) -> Optional[bytes]:
        """The PNG decoded, if there is one."""
        import base64
        return base64.b64decode(self.png) if self.png is not None else None

    def __str__(self) -> str:
        return self.text or ""


@dataclass
class ExecutionError:
    """The exception an execution raised: its class name, its message and the traceback."""

    name: str
    value: str
    traceback: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


@dataclass
class Logs:
    """What an execution printed, chunk by chunk."""

    stdout: List[str] = field(default_factory=list)
    stderr: List[str] = field(default_factory=list)


@dataclass
class Execution:
    """An execution's outcome: its results, its output and the error it raised (if any).
    ``timed_out`` says the kernel was interrupted when ``timeout`` passed."""

    results: List[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: Optional[ExecutionError] = None
    execution_count: Optional[int] = None
    timed_out: bool = False

    @property
    def text(self) -> Optional[str]:
        """The main result's text (the cell's value), if it had one."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None


@dataclass
class CodeContext:
    """A separate kernel (its own variables and imports) in a sandbox."""

    id: str
    language: str = "python"
    cwd: str = "/workspace"


def code_context_args(context: Any, language: Optional[str]) -> "tuple[str, str]":
    """The context ID and language a run uses."""
    if context is None:
        ctx, lang = "default", language or "python"
    elif isinstance(context, CodeContext):
        ctx, lang = context.id, language or context.language
    elif isinstance(context, str):
        ctx, lang = context, language or "python"
    else:
        raise SandboxError("invalid_request", "context must be a CodeContext, its id, or None")
    if lang not in ("python", "bash"):
        raise SandboxError("invalid_request",
                           f"language {lang!r} is not supported; send 'python' or 'bash'")
    return ctx, lang


def code_command(ctx: str, language: str, timeout: float, code_b64: Optional[str] = None,
                 code_file: Optional[str] = None) -> str:
    """The shell command that runs code through the helper."""
    import shlex
    src = f"--code-b64 {code_b64}" if code_b64 is not None else f"--code-file {shlex.quote(code_file or '')}"
    return (f"{CODE_HELPER} run --context {shlex.quote(ctx)} --language {language} "
            f"--timeout {float(timeout):g} {src}")


class CodeEventReader:
    """Reads the helper's events from stdout chunks into an ``Execution``, calling back."""

    def __init__(self, execution: Execution, on_stdout=None, on_stderr=None, on_result=None,
                 on_error=None):
        self.execution = execution
        self.callbacks = {"stdout": on_stdout, "stderr": on_stderr, "result": on_result,
                          "error": on_error}
        self.buffer = ""
        self.done = False
        self.pending: List[Any] = []

    def feed(self, chunk: str) -> None:
        self.buffer += chunk
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            if line.strip():
                self.event(json.loads(line))

    def event(self, e: Dict[str, Any]) -> None:
        kind = e.get("type")
        x = self.execution
        value: Any = None
        if kind in ("stdout", "stderr"):
            value = e.get("text", "")
            getattr(x.logs, kind).append(value)
        elif kind == "result":
            value = Result.parse(e.get("data") or {}, bool(e.get("isMainResult")))
            x.results.append(value)
        elif kind == "error":
            value = ExecutionError(e.get("name", ""), e.get("value", ""),
                                   list(e.get("traceback") or []))
            x.error = value
        elif kind == "timeout":
            x.timed_out = True
        elif kind == "done":
            x.execution_count = e.get("executionCount")
            self.done = True
        callback = self.callbacks.get(kind or "")
        if callback is not None and value is not None:
            self.pending.append(callback(value))

    def finish(self, result: "CommandResult") -> Execution:
        if self.buffer.strip():
            self.feed("\n")
        if not self.done:
            tail = (result.stderr or result.stdout or "")[-2000:]
            raise SandboxError(
                "code_interpreter",
                f"the code interpreter ended without a result (exit code {result.exit_code}); "
                f"is this a code-interpreter sandbox? {tail.strip()}")
        return self.execution


def context_event(result: "CommandResult") -> Dict[str, Any]:
    """The helper's one event of a context call."""
    for line in result.stdout.splitlines():
        if line.strip():
            return json.loads(line)
    raise SandboxError("code_interpreter",
                       f"the code interpreter gave no answer (exit code {result.exit_code}): "
                       f"{result.stderr.strip()[-2000:]}")


# --- Desktop (the desktop template: Xvfb + openbox + noVNC, docs/TEMPLATES.md) ---

#: The viewer's ports: noVNC over x11vnc, interactive and view-only.
DESKTOP_VIEWER_PORT = 6080
DESKTOP_VIEW_ONLY_PORT = 6081
DESKTOP_ENV = {"DISPLAY": ":0"}
#: Mouse buttons as xdotool numbers them.
MOUSE_BUTTONS = {"left": 1, "middle": 2, "right": 3}


def viewer_url(preview_url: str, view_only: bool) -> str:
    """The noVNC page of a signed preview URL: connects at once, scales to the window."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
    parts = urlsplit(preview_url)
    query = dict(parse_qsl(parts.query))
    query.update({"autoconnect": "1", "resize": "scale", "reconnect": "1",
                  "path": "websockify"})
    if view_only:
        query["view_only"] = "1"
    return urlunsplit((parts.scheme, parts.netloc, "/vnc.html", urlencode(query), ""))


def desktop_command(action: str, *args: Any) -> str:
    """The shell command of one desktop action (xdotool, wmctrl, scrot)."""
    import shlex
    q = shlex.quote
    if action in ("move", "click"):
        for v in args[-2:]:
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise SandboxError("invalid_request", f"coordinate {v!r} is not a screen "
                                   "position; send integers of 0 or more")
    if action == "scroll" and (not isinstance(args[0], int) or abs(args[0]) > 1000):
        raise SandboxError("invalid_request",
                           f"scroll {args[0]!r}: send an integer from -1000 to 1000")
    if action == "move":
        x, y = args
        return f"xdotool mousemove --sync {int(x)} {int(y)}"
    if action == "click":
        button, repeat, x, y = args
        move = f"xdotool mousemove --sync {int(x)} {int(y)} && " if x is not None else ""
        return f"{move}xdotool click --repeat {int(repeat)} --delay 80 {int(button)}"
    if action == "scroll":
        amount, = args
        button = 5 if amount > 0 else 4
        return f"xdotool click --repeat {abs(int(amount))} --delay 30 {button}"
    if action == "type":
        text, = args
        return f"xdotool type --delay 15 -- {q(text)}"
    if action == "press":
        keys, = args
        return "xdotool key -- " + " ".join(q(k) for k in keys)
    if action == "open":
        target, = args
        opener = "x-www-browser" if "://" in target else "xdg-open"
        return f"setsid -f {opener} {q(target)} >/dev/null 2>&1 </dev/null"
    if action == "screenshot":
        path, = args
        return f"scrot -o -z {q(path)}"
    if action == "windows":
        return "wmctrl -l -p -G"
    raise ValueError(action)


def parse_windows(out: str) -> List[Dict[str, Any]]:
    """``wmctrl -l -p -G`` lines as ``{id, desktop, pid, x, y, width, height, title}``."""
    windows = []
    for line in out.splitlines():
        parts = line.split(None, 8)
        if len(parts) < 8:
            continue
        windows.append({"id": parts[0], "desktop": int(parts[1]), "pid": int(parts[2]),
                        "x": int(parts[3]), "y": int(parts[4]), "width": int(parts[5]),
                        "height": int(parts[6]), "title": parts[8] if len(parts) > 8 else ""})
    return windows


def desktop_check(result: "CommandResult", what: str) -> None:
    if result.exit_code != 0:
        raise SandboxError("desktop", f"{what} failed (exit code {result.exit_code}): "
                                      f"{result.stderr.strip()[-2000:]}; is this a desktop sandbox?")
