"""The synchronous SDK: ``Sandbox``, with ``.commands`` and ``.files``."""

from __future__ import annotations

import base64
import shlex
import uuid
import json
import time
from datetime import datetime
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import httpx

from ._core import (DESKTOP_ENV, DESKTOP_VIEW_ONLY_PORT, DESKTOP_VIEWER_PORT, desktop_check, desktop_command, parse_windows, viewer_url, CODE_ARGV_LIMIT, CODE_HELPER, CodeContext, CodeEventReader, Execution, ExecutionError, Result, code_command, code_context_args, context_event, StoredSnapshot, AuditPage, AuditRecord, CommandResult, Config, EntryInfo,
                    SandboxError, SandboxInfo, SandboxMetrics, SnapshotInfo, apply_event,
                    audit_params, check_port, create_body, egress_body,
                    fields_query, list_page, logs_params, list_params, only_fields, metrics_params, raise_for,
                    fork_body, ready_or_raise, resources_body, restore_body, restore_snapshot_id, run_body,
                    SandboxLifecycle, SandboxNetworkOpts, SecurityPolicy)


def _call(client: httpx.Client, config: Config, method: str, path: str,
          body: Optional[Dict[str, Any]] = None, params: Any = None,
          request_timeout: Optional[float] = None) -> Any:
    resp = client.request(method, config.url(path), json=body, params=params,
                          headers=config.headers(),
                          timeout=request_timeout or config.request_timeout)
    raise_for(resp.status_code, resp.content)
    return None if resp.status_code == 204 else resp.json()


def _call_once(method: str, path: str, body: Optional[Dict[str, Any]] = None,
               api_key: Optional[str] = None, domain: Optional[str] = None,
               request_timeout: Optional[float] = None) -> Any:
    """One control-plane call with its own configuration and client."""
    config = Config.resolve(api_key, domain, request_timeout)
    with httpx.Client(timeout=config.request_timeout) as client:
        return _call(client, config, method, path, body)


class CommandHandle:
    """A command started with ``background=True``."""

    def __init__(self, sandbox: "Sandbox", pid: int):
        self._sandbox = sandbox
        self.pid = pid

    def wait(self, on_stdout: Optional[Callable[[str], Any]] = None,
             on_stderr: Optional[Callable[[str], Any]] = None,
             request_timeout: Optional[float] = None) -> CommandResult:
        """Waits for the end; output produced so far is replayed first."""
        return self._sandbox.commands._stream("GET", f"/commands/{self.pid}", None,
                                              on_stdout, on_stderr, request_timeout)

    def send_stdin(self, data: Union[str, bytes], eof: bool = False) -> None:
        """Writes to its stdin while someone waits on it (started with ``stdin=True``)."""
        self._sandbox.commands.send_stdin(self.pid, data, eof=eof)

    def kill(self) -> bool:
        return self._sandbox.commands.kill(self.pid)


class Commands:
    """Commands in one sandbox."""

    def __init__(self, sandbox: "Sandbox"):
        self._sandbox = sandbox

    def _stream(self, method: str, path: str, body: Optional[Dict[str, Any]],
                on_stdout, on_stderr, request_timeout) -> CommandResult:
        result = CommandResult()
        ended = False
        with self._sandbox._data(method, path, json=body, stream=True,
                                 request_timeout=request_timeout) as resp:
            if resp.status_code >= 300:
                resp.read()
                raise_for(resp.status_code, resp.content)
            for line in resp.iter_lines():
                if line.strip():
                    ended |= apply_event(json.loads(line), result, on_stdout, on_stderr)
        if not ended:
            raise SandboxError("protocol", "the command's stream ended before its exit")
        return result

    def run(self, cmd: str, background: bool = False, envs: Optional[Dict[str, str]] = None,
            cwd: Optional[str] = None, user: Optional[str] = None,
            on_stdout: Optional[Callable[[str], Any]] = None,
            on_stderr: Optional[Callable[[str], Any]] = None, stdin: bool = False,
            request_timeout: Optional[float] = None) -> Union[CommandResult, CommandHandle]:
        """Runs ``cmd`` with ``/bin/sh -c``: waits and returns a ``CommandResult``, or with
        ``background=True`` returns a ``CommandHandle`` at once."""
        body = run_body(cmd, background, envs, cwd, user, stdin)
        if background:
            resp = self._sandbox._data("POST", "/commands", json=body, request_timeout=request_timeout)
            raise_for(resp.status_code, resp.content)
            return CommandHandle(self._sandbox, resp.json()["pid"])
        return self._stream("POST", "/commands", body, on_stdout, on_stderr, request_timeout)

    def list(self) -> List[Dict[str, Any]]:
        resp = self._sandbox._data("GET", "/commands")
        raise_for(resp.status_code, resp.content)
        return resp.json()["processes"]

    def kill(self, pid: int) -> bool:
        """SIGKILL to the process group; False if there was no such process."""
        resp = self._sandbox._data("POST", f"/commands/{pid}/signal", json={"signal": 9})
        if resp.status_code == 404:
            return False
        raise_for(resp.status_code, resp.content)
        return True

    def send_stdin(self, pid: int, data: Union[str, bytes], eof: bool = False) -> None:
        payload = data.encode() if isinstance(data, str) else data
        resp = self._sandbox._data("POST", f"/commands/{pid}/stdin",
                                   params={"eof": "true" if eof else "false"}, content=payload)
        raise_for(resp.status_code, resp.content)

    def connect(self, pid: int) -> CommandHandle:
        return CommandHandle(self._sandbox, pid)


class Filesystem:
    """The filesystem of one sandbox; relative paths are under /workspace."""

    def __init__(self, sandbox: "Sandbox"):
        self._sandbox = sandbox

    def read(self, path: str, format: str = "text") -> Union[str, bytes]:
        """The whole file, as text (``format="text"``) or bytes (``"bytes"``)."""
        resp = self._sandbox._data("GET", "/files", params={"path": path})
        raise_for(resp.status_code, resp.content)
        return resp.content if format == "bytes" else resp.content.decode(errors="replace")

    def write(self, path: str, data: Union[str, bytes]) -> None:
        """Replaces the file atomically; missing parents are created."""
        payload = data.encode() if isinstance(data, str) else data
        resp = self._sandbox._data("PUT", "/files", params={"path": path}, content=payload)
        raise_for(resp.status_code, resp.content)

    def upload(self, local_path: str, path: str) -> int:
        """Streams a local file into the sandbox; returns its size."""
        import os
        with open(local_path, "rb") as f:
            resp = self._sandbox._data("PUT", "/files", params={"path": path},
                                       content=iter(lambda: f.read(256 * 1024), b""))
        raise_for(resp.status_code, resp.content)
        return os.path.getsize(local_path)

    def download(self, path: str, local_path: str) -> int:
        """Streams a file out of the sandbox; only a complete download takes the name."""
        import os
        tmp = local_path + ".nullspace-partial"
        n = 0
        with self._sandbox._data("GET", "/files", params={"path": path}, stream=True) as resp:
            if resp.status_code >= 300:
                resp.read()
                raise_for(resp.status_code, resp.content)
            with open(tmp, "wb") as out:
                for chunk in resp.iter_bytes():
                    out.write(chunk)
                    n += len(chunk)
        os.replace(tmp, local_path)
        return n

    def list(self, path: str) -> List[EntryInfo]:
        resp = self._sandbox._data("GET", "/files/list", params={"path": path})
        raise_for(resp.status_code, resp.content)
        return [EntryInfo.parse(e) for e in resp.json()["entries"]]

    def get_info(self, path: str) -> EntryInfo:
        resp = self._sandbox._data("GET", "/files/stat", params={"path": path})
        raise_for(resp.status_code, resp.content)
        return EntryInfo.parse(resp.json())

    def presign(self, path: str, method: str = "GET", expires: int = 3600) -> Dict[str, Any]:
        """A URL that downloads (``GET``) or uploads (``PUT``, the request body) ``path``
        with no other credential until it expires (``expires`` seconds, at most a day):
        ``{url, method, path, expiresAt}``. Bound to that path and method."""
        resp = self._sandbox._data("POST", "/files/presign",
                                   json={"path": path, "method": method, "expires": expires})
        raise_for(resp.status_code, resp.content)
        return resp.json()

    def exists(self, path: str) -> bool:
        resp = self._sandbox._data("GET", "/files/stat", params={"path": path})
        if resp.status_code == 404:
            return False
        raise_for(resp.status_code, resp.content)
        return True

    def make_dir(self, path: str) -> None:
        resp = self._sandbox._data("POST", "/files/mkdir", json={"path": path})
        raise_for(resp.status_code, resp.content)

    def remove(self, path: str) -> None:
        resp = self._sandbox._data("DELETE", "/files", params={"path": path})
        raise_for(resp.status_code, resp.content)

    def watch_dir(self, path: str, recursive: bool = False,
                  timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """Yields changes under ``path``: ``{type: create|write|remove|rename|chmod, path,
        from?, dir}``, until the caller stops iterating (or ``timeout`` seconds pass)."""
        with self._sandbox._data("GET", "/files/watch", stream=True,
                                 params={"path": path, "recursive": str(recursive).lower()},
                                 request_timeout=timeout or 365 * 24 * 3600.0) as resp:
            if resp.status_code >= 300:
                resp.read()
                raise_for(resp.status_code, resp.content)
            for line in resp.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def rename(self, old_path: str, new_path: str) -> None:
        resp = self._sandbox._data("POST", "/files/rename", json={"from": old_path, "to": new_path})
        raise_for(resp.status_code, resp.content)


class PtyHandle:
    """An interactive terminal: ``send`` keystrokes, ``recv`` output, ``resize``; after
    the shell exits, ``recv`` returns None and ``exit_code`` is set."""

    def __init__(self, ws: Any):
        self._ws = ws
        self.exit_code: Optional[int] = None

    def send(self, data: Union[str, bytes]) -> None:
        self._ws.send(data.encode() if isinstance(data, str) else bytes(data))

    def resize(self, cols: int, rows: int) -> None:
        self._ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    def recv(self, timeout: Optional[float] = None) -> Optional[bytes]:
        """The terminal's next output (waiting up to ``timeout`` seconds, raising
        ``TimeoutError`` after); None once the process has exited."""
        while self.exit_code is None:
            try:
                message = self._ws.recv(timeout)
            except Exception as e:
                if isinstance(e, TimeoutError):
                    raise
                return None
            if isinstance(message, bytes):
                return message
            event = json.loads(message)
            if event.get("type") == "exit":
                self.exit_code = event.get("exitCode")
        return None

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "PtyHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Pty:
    """Terminals in a sandbox."""

    def __init__(self, sandbox: "Sandbox"):
        self._sandbox = sandbox

    def create(self, cols: int = 80, rows: int = 24, cmd: Optional[str] = None,
               user: Optional[str] = None) -> PtyHandle:
        """Opens a terminal (the user's login shell, or ``cmd``)."""
        from urllib.parse import urlencode

        from websockets.sync.client import connect as ws_connect
        query: Dict[str, Any] = {"cols": cols, "rows": rows}
        if cmd:
            query["cmd"] = cmd
        if user:
            query["user"] = user
        sbx = self._sandbox
        ws = ws_connect(sbx._ws_url("/pty?" + urlencode(query)),
                        additional_headers={"Authorization": f"Bearer {sbx._runtime['token']}"},
                        open_timeout=30)
        return PtyHandle(ws)



class Desktop:
    """The desktop of a ``desktop`` sandbox: its viewer's URL, screenshots, mouse and
    keyboard (xdotool on display ``:0``), opening URLs or files, its windows."""

    def __init__(self, sandbox: "Sandbox"):
        self._sandbox = sandbox

    def _run(self, cmd: str, what: str) -> CommandResult:
        result = self._sandbox.commands.run(cmd, envs=DESKTOP_ENV)
        assert isinstance(result, CommandResult)
        desktop_check(result, what)
        return result

    def viewer_url(self, view_only: bool = False) -> str:
        """A signed preview URL of the noVNC viewer (interactive, or view-only)."""
        port = DESKTOP_VIEW_ONLY_PORT if view_only else DESKTOP_VIEWER_PORT
        return viewer_url(self._sandbox.get_preview_url(port)["url"], view_only)

    def screenshot(self) -> bytes:
        """The screen as PNG bytes."""
        path = f"/tmp/nullspace-screenshot-{uuid.uuid4().hex}.png"
        self._run(desktop_command("screenshot", path), "the screenshot")
        data = self._sandbox.files.read(path, format="bytes")
        self._sandbox.files.remove(path)
        assert isinstance(data, bytes)
        return data

    def move_mouse(self, x: int, y: int) -> None:
        self._run(desktop_command("move", x, y), "moving the mouse")

    def left_click(self, x: Optional[int] = None, y: Optional[int] = None) -> None:
        self._run(desktop_command("click", 1, 1, x, y), "the click")

    def right_click(self, x: Optional[int] = None, y: Optional[int] = None) -> None:
        self._run(desktop_command("click", 3, 1, x, y), "the click")

    def double_click(self, x: Optional[int] = None, y: Optional[int] = None) -> None:
        self._run(desktop_command("click", 1, 2, x, y), "the double click")

    def scroll(self, amount: int = 1) -> None:
        """Scrolls down ``amount`` steps (up when negative)."""
        self._run(desktop_command("scroll", amount), "scrolling")

    def type_text(self, text: str) -> None:
        self._run(desktop_command("type", text), "typing")

    def press(self, *keys: str) -> None:
        """Presses keys or chords in turn (xdotool names: ``Return``, ``ctrl+l``)."""
        self._run(desktop_command("press", keys), "the key press")

    def open(self, target: str) -> None:
        """Opens a URL in the browser, or a file with its application."""
        self._run(desktop_command("open", target), "opening " + target)

    def windows(self) -> List[Dict[str, Any]]:
        """The windows on the screen: ``{id, pid, x, y, width, height, title}``."""
        return parse_windows(self._run(desktop_command("windows"), "listing windows").stdout)


class Sandbox:
    """A connected sandbox. Create with ``Sandbox.create`` or ``Sandbox.connect``."""

    def __init__(self, info: SandboxInfo, config: Config, client: Optional[httpx.Client] = None):
        self._config = config
        self._client = client or httpx.Client(timeout=config.request_timeout)
        self.sandbox_id = info.sandbox_id
        self._runtime = info.runtime
        self.commands = Commands(self)
        self.files = Filesystem(self)
        self.pty = Pty(self)
        self.desktop = Desktop(self)

    # -- class methods -------------------------------------------------------------------

    @classmethod
    def create(cls, template: Optional[str] = None, timeout: Optional[int] = None,
               metadata: Optional[Dict[str, str]] = None, envs: Optional[Dict[str, str]] = None,
               secure: Optional[bool] = None, allow_internet_access: Optional[bool] = None,
               network: Optional[Union[SandboxNetworkOpts, Dict[str, Any]]] = None,
               security_policy: Optional[Union[SecurityPolicy, Dict[str, Any]]] = None,
               resources: Optional[Dict[str, int]] = None,
               lifecycle: Optional[Union[SandboxLifecycle, Dict[str, Any]]] = None,
               api_key: Optional[str] = None, domain: Optional[str] = None,
               request_timeout: Optional[float] = None,
               on_timeout: Optional[str] = None, auto_resume: Optional[bool] = None,
               warm_pool_mode: Optional[str] = None, wait_ready: bool = True,
               idle_timeout: Optional[int] = None,
               image_name: Optional[str] = None, image_id: Optional[str] = None,
               snapshot_name: Optional[str] = None, snapshot_id: Optional[str] = None,
               region: Optional[str] = None, recording: Optional[bool] = None,
               snapshot_interval: Optional[int] = None, warm_pool: Optional[str] = None,
               egress: Optional[Dict[str, Any]] = None,
               mounts: Optional[Dict[str, Any]] = None) -> "Sandbox":
        """Creates a sandbox and returns it connected (seed 001's parameters; see the
        README for how each becomes a REST field). With ``wait_ready=False`` it returns
        while the sandbox is still ``starting``: call ``wait_ready()`` before commands."""
        body = create_body(template, timeout, metadata, envs, lifecycle, resources,
                           snapshot_interval, warm_pool, egress, mounts,
                           allow_internet_access=allow_internet_access, network=network,
                           secure=secure, security_policy=security_policy,
                           on_timeout=on_timeout, auto_resume=auto_resume,
                           warm_pool_mode=warm_pool_mode, wait_ready=wait_ready,
                           idle_timeout=idle_timeout, image_name=image_name,
                           image_id=image_id, snapshot_name=snapshot_name,
                           snapshot_id=snapshot_id, region=region, recording=recording)
        config = Config.resolve(api_key, domain, request_timeout)
        client = httpx.Client(timeout=config.request_timeout)
        try:
            doc = _call(client, config, "POST", "/sandboxes", body)
        except Exception:
            client.close()
            raise
        return cls(SandboxInfo.parse(doc), config, client)

    @classmethod
    def connect(cls, sandbox_id: str, timeout: Optional[int] = None,
                api_key: Optional[str] = None, domain: Optional[str] = None,
                request_timeout: Optional[float] = None) -> "Sandbox":
        """Connects to an existing sandbox, resuming it if paused."""
        config = Config.resolve(api_key, domain, request_timeout)
        client = httpx.Client(timeout=config.request_timeout)
        try:
            doc = _call(client, config, "POST", f"/sandboxes/{sandbox_id}/connect",
                        {} if timeout is None else {"timeout": timeout})
        except Exception:
            client.close()
            raise
        return cls(SandboxInfo.parse(doc), config, client)

    @classmethod
    def list(cls, query: Optional[Dict[str, Any]] = None, limit: Optional[int] = None,
             next_token: Optional[str] = None, api_key: Optional[str] = None,
             domain: Optional[str] = None, request_timeout: Optional[float] = None,
             fields: Optional[List[str]] = None) -> Dict[str, Any]:
        """One page: ``{"sandboxes": [...], "next_token": ...}`` (raw dictionaries).
        ``query`` takes ``state`` (str or list) and ``metadata`` (dict); ``fields`` (e.g.
        ``["id", "status"]``) makes each sandbox a dict of just those names."""
        params = list_params(query, limit, next_token, fields)
        config = Config.resolve(api_key, domain, request_timeout)
        with httpx.Client(timeout=config.request_timeout) as client:
            doc = _call(client, config, "GET", "/sandboxes", params=params)
        return list_page(doc, fields)

    @classmethod
    def get_info_by_id(cls, sandbox_id: str, api_key: Optional[str] = None,
                       domain: Optional[str] = None,
                       request_timeout: Optional[float] = None,
                       fields: Optional[List[str]] = None) -> Union[SandboxInfo, Dict[str, Any]]:
        """A sandbox's description; read-only, never wakes a paused one. With ``fields``
        (e.g. ``["id", "status"]``) a raw dict of just those names."""
        projection = fields_query(fields)
        config = Config.resolve(api_key, domain, request_timeout)
        with httpx.Client(timeout=config.request_timeout) as client:
            doc = _call(client, config, "GET", f"/sandboxes/{sandbox_id}",
                        params=None if projection is None else {"fields": projection})
        return only_fields(doc, fields) if fields is not None else SandboxInfo.parse(doc)

    @classmethod
    def restore(cls, sandbox_id: str, snapshot_id: Optional[Union[str, SnapshotInfo]] = None,
                timeout: Optional[int] = None, metadata: Optional[Dict[str, str]] = None,
                api_key: Optional[str] = None, domain: Optional[str] = None,
                request_timeout: Optional[float] = None,
                volumes: Optional[str] = None) -> "Sandbox":
        """Starts a new sandbox from a snapshot of ``sandbox_id`` (which may be deleted or
        on another worker): ``snapshot_id``, or the newest (pause, then periodic, then
        manual). Returns it connected. ``volumes``: what it does with the original's
        read-write volumes, ``"readonly"`` (default) or ``"copy"``."""
        config = Config.resolve(api_key, domain, request_timeout)
        client = httpx.Client(timeout=config.request_timeout)
        try:
            doc = _call(client, config, "POST", "/sandboxes/restore",
                        restore_body(sandbox_id, restore_snapshot_id(snapshot_id), timeout,
                                     metadata, volumes))
        except Exception:
            client.close()
            raise
        return cls(SandboxInfo.parse(doc), config, client)

    @classmethod
    def run_once(cls, cmd: str, template: str = "base", **create_args: Any) -> CommandResult:
        """Creates a sandbox, runs ``cmd``, kills the sandbox whatever happened."""
        sbx = cls.create(template=template, **create_args)
        try:
            return sbx.commands.run(cmd)
        finally:
            sbx.kill()
            sbx.close()

    # -- instance methods ----------------------------------------------------------------

    def _control(self, method: str, action: str = "", body: Optional[Dict[str, Any]] = None,
                 request_timeout: Optional[float] = None) -> Any:
        path = f"/sandboxes/{self.sandbox_id}" + (f"/{action}" if action else "")
        return _call(self._client, self._config, method, path, body,
                     request_timeout=request_timeout)

    def _data(self, method: str, path: str, stream: bool = False,
              request_timeout: Optional[float] = None, **kwargs: Any):
        if not self._runtime:
            raise SandboxError("config", f"no data-plane access to {self.sandbox_id}: "
                               "connect to it first (it may be paused)")
        url = self._runtime["target"]["baseUrl"] + path
        headers = {"Authorization": f"Bearer {self._runtime['token']}"}
        timeout = request_timeout or self._config.request_timeout
        if stream:
            return self._client.stream(method, url, headers=headers, timeout=timeout, **kwargs)
        return self._client.request(method, url, headers=headers, timeout=timeout, **kwargs)

    def get_info(self, request_timeout: Optional[float] = None) -> SandboxInfo:
        return SandboxInfo.parse(self._control("GET", request_timeout=request_timeout))

    def is_running(self, request_timeout: Optional[float] = None) -> bool:
        return self.get_info(request_timeout).state == "running"

    def wait_ready(self, timeout: float = 60.0, request_timeout: Optional[float] = None) -> None:
        """Waits until it runs (after ``create(..., wait_ready=False)``) and takes its
        data-plane access; raises ``SandboxError`` code ``timeout`` after ``timeout``
        seconds, or the failure's code if it ends in ``error``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            info = self.get_info(request_timeout or max(min(left, 30.0), 1.0))
            if ready_or_raise(info):
                self._runtime = info.runtime
                return
            if left <= 0:
                raise SandboxError("timeout", f"sandbox {self.sandbox_id} is still "
                                   f"{info.state} after {timeout} s")
            time.sleep(min(0.2, max(left, 0.0)))

    def kill(self, request_timeout: Optional[float] = None) -> bool:
        """Ends the sandbox; False if it was already gone."""
        try:
            self._control("DELETE", request_timeout=request_timeout)
            return True
        except SandboxError as e:
            if e.code == "not_found":
                return False
            raise

    def set_timeout(self, timeout: int, request_timeout: Optional[float] = None) -> None:
        self._control("POST", "timeout", {"timeout": timeout}, request_timeout)

    def set_egress(self, internet: bool = True, allow: Optional[List[str]] = None,
                   deny: Optional[List[str]] = None,
                   request_timeout: Optional[float] = None) -> SandboxInfo:
        """Replaces its egress policy; a running sandbox follows it at once (open
        connections it no longer allows are reset)."""
        return SandboxInfo.parse(self._control("PUT", "egress", egress_body(internet, allow, deny),
                                               request_timeout))

    def set_security_policy(self, policy: Union[SecurityPolicy, Dict[str, Any]],
                            request_timeout: Optional[float] = None) -> SandboxInfo:
        """Replaces its security policy (a ``SecurityPolicy`` or a dict, see there); a
        running sandbox follows it at once. Masked secrets keep their placeholders; one
        not given at create cannot be added live (400). Returns the new description,
        with ``security_policy`` as the API keeps it."""
        body = SecurityPolicy.body_of(policy)
        return SandboxInfo.parse(self._control("PUT", "security-policy", body, request_timeout))

    def get_audit(self, after: int = 0, limit: int = 100,
                  request_timeout: Optional[float] = None) -> AuditPage:
        """One page of its audit (a sandbox with a security policy records each HTTP
        request it makes): at most ``limit`` (1 to 1000) records with an ID above
        ``after``, oldest first. Pass the page's ``next`` as ``after`` for the next
        page; ``more`` says whether there are more now. Without a security policy the
        page is empty (``next`` 0)."""
        params = audit_params(after, limit)
        doc = _call(self._client, self._config, "GET", f"/sandboxes/{self.sandbox_id}/audit",
                    params=params, request_timeout=request_timeout)
        return AuditPage.parse(doc, after)

    def audit(self, after: int = 0,
              request_timeout: Optional[float] = None) -> Iterator[AuditRecord]:
        """Every audit record with an ID above ``after``, oldest first, page after page,
        up to the newest there is now (see ``get_audit``)."""
        audit_params(after, 1)
        return self._audit(after, request_timeout)

    def _audit(self, after: int, request_timeout: Optional[float]) -> Iterator[AuditRecord]:
        while True:
            page = self.get_audit(after, 1000, request_timeout)
            yield from page.records
            if not page.more or page.next <= after:
                return
            after = page.next

    def refresh(self, duration: Optional[int] = None,
                request_timeout: Optional[float] = None) -> None:
        """Extends its life by ``duration`` seconds from now (default: its timeout)."""
        self._control("POST", "refreshes", {} if duration is None else {"duration": duration},
                      request_timeout)

    def pause(self, request_timeout: Optional[float] = None) -> None:
        self._control("POST", "pause", {}, request_timeout)

    def resume(self, request_timeout: Optional[float] = None) -> None:
        doc = self._control("POST", "resume", {}, request_timeout)
        self._runtime = SandboxInfo.parse(doc).runtime

    def hibernate(self, request_timeout: Optional[float] = None) -> None:
        """Pauses into object storage: any worker sharing the store can resume it."""
        self._control("POST", "hibernate", {}, request_timeout)

    def migrate(self, host: Optional[str] = None,
                request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """Moves it to another host of the cluster without stopping it (an operator
        key): to ``host``, or where placement chooses. Returns the report: ``from``,
        ``to``, ``downtimeMs``, ``totalMs``, ``ramBytes``, ``diskBytes``, ``passes``,
        ``postcopy``."""
        body: Dict[str, Any] = {} if host is None else {"host": host}
        return self._control("POST", "migrate", body, request_timeout)

    def create_snapshot(self, request_timeout: Optional[float] = None,
                        name: Optional[str] = None) -> SnapshotInfo:
        """Takes a snapshot to object storage; the sandbox keeps running. Its ID works as
        a template ID."""
        return SnapshotInfo.parse(self._control(
            "POST", "snapshots", {} if name is None else {"name": name}, request_timeout))

    def snapshot(self, request_timeout: Optional[float] = None,
                 name: Optional[str] = None) -> "Snapshot":
        """A manual snapshot: they accumulate and survive ``kill()``. The ``Snapshot``
        restores (``snap.restore()``) and deletes itself. A ``name`` (unique in the team)
        lets ``Sandbox.create(snapshot_name=...)`` start from it."""
        return Snapshot(self.create_snapshot(request_timeout, name), self._config)

    def list_snapshots(self, request_timeout: Optional[float] = None) -> List["Snapshot"]:
        """Its snapshots (pause, periodic, manual), newest first."""
        doc = self._control("GET", "snapshots", request_timeout=request_timeout)
        return [Snapshot(SnapshotInfo.parse(d), self._config) for d in doc["snapshots"]]

    def delete_snapshot(self, snapshot_id: str,
                        request_timeout: Optional[float] = None) -> None:
        self._control("DELETE", f"snapshots/{snapshot_id}", request_timeout=request_timeout)

    def fork(self, count: int = 1,
             request_timeout: Optional[float] = None,
             volumes: Optional[str] = None) -> List["Sandbox"]:
        """Branches it into ``count`` running children with its memory, processes and
        disk; it keeps running. Each child has its own HTTP client: close it when done.
        ``volumes``: what the children do with its read-write volumes, ``"readonly"``
        (default: the same volume, read-only; a write fails with EROFS) or ``"copy"``
        (each child a new volume of their content, named in its ``mounts``)."""
        doc = self._control("POST", "fork", fork_body(count, volumes), request_timeout)
        return [type(self)(SandboxInfo.parse(c), self._config,
                           httpx.Client(timeout=self._config.request_timeout))
                for c in doc["sandboxes"]]

    # -- previews, logs, metrics, events, terminals -----------------------------------------

    def get_preview_url(self, port: int, request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """A signed preview URL for ``port``: ``{url, token, host, expiresAt, public,
        proxyTarget}``. Redact it before logging (``redact_preview_url``)."""
        return self._control("POST", "previews", {"port": port}, request_timeout)

    def create_preview_proxy_target(self, port: int,
                                    request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """For application proxies: ``{url, header, token}`` — forward to ``url`` with
        ``token`` in the ``x-nullspace-preview-proxy-token`` header."""
        return self.get_preview_url(port, request_timeout)["proxyTarget"]

    def set_port_public(self, port: int, public: bool = True,
                        request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """Makes ``port`` reachable without a token (or private again)."""
        return self._control("POST", "previews", {"port": port, "public": public},
                             request_timeout)

    def get_host(self, port: int, request_timeout: Optional[float] = None) -> str:
        """The preview host name of ``port`` (``<port>-<sandbox>.<preview domain>``);
        a browser needs ``get_preview_url`` (its token) unless the port is public."""
        port = check_port(port)
        return self._control("POST", "previews", {"port": port}, request_timeout)["host"]

    def get_metrics(self, start: Optional[Union[datetime, float]] = None,
                    end: Optional[Union[datetime, float]] = None,
                    request_timeout: Optional[float] = None) -> List[SandboxMetrics]:
        """Resource samples from ``start`` (default: the sandbox's creation) to ``end``
        (default: now), as datetimes (naive ones are UTC) or Unix seconds. Every 5 s for
        the last hour, merged into coarser buckets before."""
        params = metrics_params(start, end)
        doc = _call(self._client, self._config, "GET", f"/sandboxes/{self.sandbox_id}/metrics",
                    params=params, request_timeout=request_timeout)
        return [SandboxMetrics.parse(m) for m in doc["metrics"]]

    def list_recordings(self, request_timeout: Optional[float] = None) -> List[Dict[str, Any]]:
        """Its recordings (created with ``recording=True``): ``[{recordingID, kind:
        commands|pty, sizeBytes, createdAt}]``; also after it was killed."""
        return self._control("GET", "recordings", request_timeout=request_timeout)["recordings"]

    def get_recording(self, recording_id: str,
                      request_timeout: Optional[float] = None) -> bytes:
        """A recording's bytes: JSON lines of commands, or an asciicast v2 terminal
        session."""
        resp = self._client.get(
            self._config.url(f"/sandboxes/{self.sandbox_id}/recordings/{recording_id}"),
            headers=self._config.headers(),
            timeout=request_timeout or self._config.request_timeout)
        raise_for(resp.status_code, resp.content)
        return resp.content

    def logs(self, request_timeout: Optional[float] = None, offset: int = 0,
             limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """``[{time, source, text, pid?, stream?}]`` from line ``offset`` (at most
        ``limit``, 1 to 1000): boot console, lifecycle events, diagnostics, and the output
        of the template's start command (``source="start"``) and background commands
        (``"process"``). Without ``limit``, every page from ``offset`` on."""
        lines: List[Dict[str, Any]] = []
        while True:
            doc = _call(self._client, self._config, "GET", f"/sandboxes/{self.sandbox_id}/logs",
                        params=logs_params(offset, limit), request_timeout=request_timeout)
            lines.extend(doc["logs"])
            if limit is not None or doc.get("next") is None:
                return lines
            offset = doc["next"]

    def _ws_url(self, path: str) -> str:
        if not self._runtime:
            raise SandboxError("config", f"no data-plane access to {self.sandbox_id}: "
                               "connect to it first (it may be paused)")
        base = self._runtime["target"]["baseUrl"]
        return ("wss://" + base[8:] if base.startswith("https://") else "ws://" + base[7:]) + path

    def stream_events(self, after_event_id: Optional[int] = None,
                      live_only: bool = False) -> Iterator[Dict[str, Any]]:
        """Yields lifecycle events ``{id, at, type, data}`` as they happen. Reconnects by
        itself and resumes after the last event it yielded: no gap, no duplicate (also
        across a pool manager restart). Ends after ``sandbox.deleted``. Every type is
        passed through, those of a security policy included: ``sandbox.audit`` (``data``
        ``{records: [...], total}``: up to 20 records with detections or not allowed,
        in the REST shape) and ``sandbox.security_policy_updated`` (``{securityPolicy}``)."""
        from websockets.sync.client import connect as ws_connect
        last = after_event_id
        failures = 0
        while True:
            if last is not None:
                query = f"?after_event_id={last}"
            else:
                query = "?live_only=true" if live_only else ""
            try:
                with ws_connect(self._ws_url("/lifecycle/ws" + query),
                                additional_headers={"X-API-Key": self._config.api_key},
                                open_timeout=30) as ws:
                    failures = 0
                    for message in ws:
                        event = json.loads(message)
                        if last is not None and event["id"] <= last:
                            continue
                        last = event["id"]
                        yield event
                        if event["type"] == "sandbox.deleted":
                            return
            except GeneratorExit:
                raise
            except Exception as e:  # a dropped connection, a restarting pool manager
                failures += 1
                status = getattr(getattr(e, "response", None), "status_code", 0)
                if status in (401, 403, 404) or failures > 60:
                    raise SandboxError("stream_failed", f"event stream: {e}", status)
            time.sleep(min(0.1 * 2 ** min(failures, 5), 2.0))
            try:
                info = Sandbox.get_info_by_id(self.sandbox_id, self._config.api_key,
                                              self._config.api_url)
                if info.runtime:
                    self._runtime = info.runtime
            except SandboxError:
                pass

    def run_code(self, code: str, language: Optional[str] = None,
                 context: Optional[Union[CodeContext, str]] = None,
                 on_stdout: Optional[Callable[[str], Any]] = None,
                 on_stderr: Optional[Callable[[str], Any]] = None,
                 on_result: Optional[Callable[[Result], Any]] = None,
                 on_error: Optional[Callable[[ExecutionError], Any]] = None,
                 envs: Optional[Dict[str, str]] = None, timeout: float = 60.0,
                 request_timeout: Optional[float] = None) -> Execution:
        """Runs ``code`` in a Jupyter kernel of a ``code-interpreter`` sandbox (the
        default context, or ``context``'s own kernel) and returns its ``Execution``:
        ``results`` (each with ``text``, ``png``, ``svg``, ``html``, ``json``, ``markdown``
        where the kernel gave them), ``logs`` and ``error``. State is kept between calls
        in a context. Past ``timeout`` seconds the kernel is interrupted
        (``execution.timed_out``). ``language="bash"`` runs the code with bash."""
        ctx, lang = code_context_args(context, language)
        b64, path = base64.b64encode(code.encode()).decode(), None
        if len(b64) > CODE_ARGV_LIMIT:
            path, b64 = f"/tmp/nullspace-code-{uuid.uuid4().hex}", None
            self.files.write(path, code)
        execution = Execution()
        reader = CodeEventReader(execution, on_stdout, on_stderr, on_result, on_error)
        result = self.commands.run(code_command(ctx, lang, timeout, b64, path), envs=envs,
                                   on_stdout=reader.feed,
                                   request_timeout=request_timeout or timeout + 60)
        assert isinstance(result, CommandResult)
        if path:
            self.files.remove(path)
        return reader.finish(result)

    def create_code_context(self, language: str = "python", cwd: Optional[str] = None,
                            request_timeout: Optional[float] = None) -> CodeContext:
        """A new kernel of its own (separate variables and imports) for ``run_code``."""
        _, lang = code_context_args(None, language)
        cmd = f"{CODE_HELPER} create-context --language {lang}"
        if cwd:
            cmd += f" --cwd {shlex.quote(cwd)}"
        result = self.commands.run(cmd, request_timeout=request_timeout or 120)
        assert isinstance(result, CommandResult)
        event = context_event(result)
        return CodeContext(event["id"], event.get("language", lang), event.get("cwd", "/workspace"))

    def remove_code_context(self, context: Union[CodeContext, str],
                            request_timeout: Optional[float] = None) -> None:
        """Ends a context's kernel."""
        ctx, _ = code_context_args(context, None)
        result = self.commands.run(f"{CODE_HELPER} remove-context {shlex.quote(ctx)}",
                                   request_timeout=request_timeout)
        assert isinstance(result, CommandResult)
        context_event(result)

    def close(self) -> None:
        """Closes the HTTP client; the sandbox keeps running."""
        self._client.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Snapshot(StoredSnapshot):
    """A stored snapshot (what ``sbx.snapshot()`` and ``list_snapshots()`` return): its
    ``snapshot_id`` (also ``id``), ``kind``, ``created`` and ``size``, every
    ``SnapshotInfo`` field, and ``restore()`` / ``delete()``. It outlives its sandbox."""

    def restore(self, timeout: Optional[int] = None, metadata: Optional[Dict[str, str]] = None,
                request_timeout: Optional[float] = None,
                volumes: Optional[str] = None) -> Sandbox:
        """Starts a new sandbox from it and returns it connected (``volumes``: see
        ``Sandbox.restore``)."""
        return Sandbox.restore(self.sandbox_id, self.snapshot_id, timeout, metadata,
                               self._config.api_key, self._config.api_url,
                               request_timeout or self._config.request_timeout, volumes)

    def delete(self, request_timeout: Optional[float] = None) -> None:
        """Deletes it from the store."""
        _call_once("DELETE", f"/sandboxes/{self.sandbox_id}/snapshots/{self.snapshot_id}",
                   None, self._config.api_key, self._config.api_url,
                   request_timeout or self._config.request_timeout)


class Volume:
    """Durable volumes: content kept in the store, outliving every sandbox and worker.
    Mount one at create: ``Sandbox.create(mounts={"/mnt/work": volume_id})`` (read-write;
    one writer at a time) or ``{"/mnt/work": {"id": volume_id, "type": "ro"}}``."""

    @staticmethod
    def create(name: Optional[str] = None, size_mib: Optional[int] = None,
               api_key: Optional[str] = None, domain: Optional[str] = None,
               request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """An empty volume: ``{volumeID, name, sizeMiB, createdAt, version, attachments}``."""
        body: Dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if size_mib is not None:
            body["sizeMiB"] = size_mib
        return _call_once("POST", "/volumes", body, api_key, domain, request_timeout)

    @staticmethod
    def get(volume_id: str, api_key: Optional[str] = None, domain: Optional[str] = None,
            request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """A volume by ID or name, with its saved version and holders."""
        return _call_once("GET", f"/volumes/{volume_id}", None, api_key, domain, request_timeout)

    @staticmethod
    def list(api_key: Optional[str] = None, domain: Optional[str] = None,
             request_timeout: Optional[float] = None) -> List[Dict[str, Any]]:
        """The team's volumes, oldest first."""
        return _call_once("GET", "/volumes", None, api_key, domain, request_timeout)

    @staticmethod
    def delete(volume_id: str, api_key: Optional[str] = None, domain: Optional[str] = None,
               request_timeout: Optional[float] = None) -> None:
        """Deletes a volume and its content; refused (409) while a sandbox holds it."""
        _call_once("DELETE", f"/volumes/{volume_id}", None, api_key, domain, request_timeout)


class Template:
    """Templates: custom template builds (steps, a start command and a ready check,
    ending as a snapshot of the ready VM) and warm pools (ready capacity that
    ``Sandbox.create(warm_pool=...)`` checks out)."""

    @staticmethod
    def build(steps: Optional[List[Dict[str, Any]]] = None, name: Optional[str] = None,
              from_template: str = "base", start_cmd: Optional[str] = None,
              ready_cmd: Optional[str] = None, ready_timeout: Optional[int] = None,
              resources: Optional[Dict[str, int]] = None,
              on_log: Optional[Callable[[Dict[str, Any]], None]] = None, wait: bool = True,
              api_key: Optional[str] = None, domain: Optional[str] = None,
              request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """Builds a template from ``from_template`` and ``steps`` (each one of
        ``{"run": cmd}``, ``{"packages": [...]}``, ``{"files": [{"path", "content"}]}``,
        ``{"env": {...}}``). With ``wait`` (default) the build log streams to ``on_log``
        line by line and the ready template is returned; a failed build raises
        ``SandboxError`` with code ``build_failed``, saying which step failed and why
        (the failure is in ``details``)."""
        config = Config.resolve(api_key, domain, request_timeout)
        body: Dict[str, Any] = {"from": from_template, "steps": steps or []}
        for key, value in (("name", name), ("startCmd", start_cmd), ("readyCmd", ready_cmd),
                           ("readyTimeout", ready_timeout)):
            if value is not None:
                body[key] = value
        if resources:
            body["resources"] = resources_body(resources)
        with httpx.Client(timeout=config.request_timeout) as client:
            template = _call(client, config, "POST", "/templates", body)
        if not wait:
            return template
        return Template.wait_built(template["templateID"], on_log, api_key, domain,
                                   request_timeout)

    @staticmethod
    def wait_built(template_id: str, on_log: Optional[Callable[[Dict[str, Any]], None]] = None,
                   api_key: Optional[str] = None, domain: Optional[str] = None,
                   request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """Follows a build's log to its end; returns the template once ready (see
        ``build``)."""
        config = Config.resolve(api_key, domain, request_timeout)
        after = 0
        # A page waits up to 20 s for a line: the client must wait longer.
        timeout = max(config.request_timeout, 40.0)
        with httpx.Client(timeout=timeout) as client:
            while True:
                page = _call(client, config, "GET",
                             f"/templates/{template_id}/logs?after={after}&wait=20",
                             request_timeout=timeout)
                for line in page["lines"]:
                    if on_log:
                        on_log(line)
                after = page["next"]
                if page["status"] != "building" and not page["lines"]:
                    break
            template = _call(client, config, "GET", f"/templates/{template_id}")
        if template["status"] != "ready":
            error = template.get("error") or {}
            raise SandboxError("build_failed",
                               f"template {template_id} failed to build: "
                               f"{error.get('message', 'no reason recorded')}",
                               422, error)
        return template

    @staticmethod
    def get(template_id: str, api_key: Optional[str] = None, domain: Optional[str] = None,
            request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """A template (built-in or the team's, by ID or name)."""
        return _call_once("GET", f"/templates/{template_id}", None, api_key, domain, request_timeout)

    @staticmethod
    def list(api_key: Optional[str] = None, domain: Optional[str] = None,
             request_timeout: Optional[float] = None) -> List[Dict[str, Any]]:
        """The built-in templates and the team's own."""
        return _call_once("GET", "/templates", None, api_key, domain,
                          request_timeout)["templates"]

    @staticmethod
    def delete(template_id: str, api_key: Optional[str] = None, domain: Optional[str] = None,
               request_timeout: Optional[float] = None) -> None:
        """Deletes a template (cancelling its build if it runs); its sandboxes keep
        running."""
        _call_once("DELETE", f"/templates/{template_id}", None, api_key, domain, request_timeout)

    @staticmethod
    def get_warm_pool(template: str, api_key: Optional[str] = None,
                      domain: Optional[str] = None,
                      request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """``{templateID, target, ready, warming, checkouts, misses, resources, refill}``."""
        return _call_once("GET", f"/templates/{template}/warm-pool", None, api_key, domain, request_timeout)

    @staticmethod
    def set_warm_pool(template: str, size: int, resources: Optional[Dict[str, int]] = None,
                      refill: bool = True, api_key: Optional[str] = None,
                      domain: Optional[str] = None,
                      request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """Keeps ``size`` ready instances of ``template`` with this shape; it fills in the
        background."""
        body: Dict[str, Any] = {"size": size, "refill": refill}
        if resources:
            body["resources"] = resources_body(resources)
        return _call_once("PUT", f"/templates/{template}/warm-pool", body, api_key, domain,
                          request_timeout)
