"""The asynchronous SDK: ``AsyncSandbox``, the same calls as coroutines."""

from __future__ import annotations

import asyncio
import base64
import shlex
import uuid
import json
import time
from datetime import datetime
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Union

import httpx

from ._core import (DESKTOP_ENV, DESKTOP_VIEW_ONLY_PORT, DESKTOP_VIEWER_PORT, desktop_check, desktop_command, parse_windows, viewer_url, CODE_ARGV_LIMIT, CODE_HELPER, CodeContext, CodeEventReader, Execution, ExecutionError, Result, code_command, code_context_args, context_event, StoredSnapshot, AuditPage, AuditRecord, CommandResult, Config, EntryInfo,
                    SandboxError, SandboxInfo, SandboxLifecycle, SandboxMetrics,
                    SandboxNetworkOpts, SecurityPolicy, SnapshotInfo, apply_event, audit_params,
                    check_port, create_body, egress_body,
                    fields_query, list_page, logs_params, list_params, only_fields, metrics_params, raise_for,
                    fork_body, ready_or_raise, restore_body, restore_snapshot_id, run_body)


async def _call(client: httpx.AsyncClient, config: Config, method: str, path: str,
                body: Optional[Dict[str, Any]] = None, params: Any = None,
                request_timeout: Optional[float] = None) -> Any:
    resp = await client.request(method, config.url(path), json=body, params=params,
                                headers=config.headers(),
                                timeout=request_timeout or config.request_timeout)
    raise_for(resp.status_code, resp.content)
    return None if resp.status_code == 204 else resp.json()


class AsyncCommandHandle:
    """A command started with ``background=True``."""

    def __init__(self, sandbox: "AsyncSandbox", pid: int):
        self._sandbox = sandbox
        self.pid = pid

    async def wait(self, on_stdout: Optional[Callable[[str], Any]] = None,
                   on_stderr: Optional[Callable[[str], Any]] = None,
                   request_timeout: Optional[float] = None) -> CommandResult:
        """Waits for the end; output produced so far is replayed first."""
        return await self._sandbox.commands._stream("GET", f"/commands/{self.pid}", None,
                                                    on_stdout, on_stderr, request_timeout)

    async def send_stdin(self, data: Union[str, bytes], eof: bool = False) -> None:
        """Writes to its stdin while someone waits on it (started with ``stdin=True``)."""
        await self._sandbox.commands.send_stdin(self.pid, data, eof=eof)

    async def kill(self) -> bool:
        return await self._sandbox.commands.kill(self.pid)


class AsyncCommands:
    """Commands in one sandbox."""

    def __init__(self, sandbox: "AsyncSandbox"):
        self._sandbox = sandbox

    async def _stream(self, method, path, body, on_stdout, on_stderr,
                      request_timeout=None) -> CommandResult:
        result = CommandResult()
        ended = False
        async with self._sandbox._data_stream(method, path, json=body,
                                              request_timeout=request_timeout) as resp:
            if resp.status_code >= 300:
                await resp.aread()
                raise_for(resp.status_code, resp.content)
            async for line in resp.aiter_lines():
                if line.strip():
                    ended |= apply_event(json.loads(line), result, on_stdout, on_stderr)
        if not ended:
            raise SandboxError("protocol", "the command's stream ended before its exit")
        return result

    async def run(self, cmd: str, background: bool = False,
                  envs: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                  user: Optional[str] = None, on_stdout: Optional[Callable[[str], Any]] = None,
                  on_stderr: Optional[Callable[[str], Any]] = None,
                  stdin: bool = False, request_timeout: Optional[float] = None
                  ) -> Union[CommandResult, AsyncCommandHandle]:
        """Runs ``cmd`` with ``/bin/sh -c`` (see ``Sandbox.commands.run``)."""
        body = run_body(cmd, background, envs, cwd, user, stdin)
        if background:
            resp = await self._sandbox._data("POST", "/commands", json=body,
                                             request_timeout=request_timeout)
            raise_for(resp.status_code, resp.content)
            return AsyncCommandHandle(self._sandbox, resp.json()["pid"])
        return await self._stream("POST", "/commands", body, on_stdout, on_stderr,
                                  request_timeout)

    async def list(self) -> List[Dict[str, Any]]:
        resp = await self._sandbox._data("GET", "/commands")
        raise_for(resp.status_code, resp.content)
        return resp.json()["processes"]

    async def kill(self, pid: int) -> bool:
        resp = await self._sandbox._data("POST", f"/commands/{pid}/signal", json={"signal": 9})
        if resp.status_code == 404:
            return False
        raise_for(resp.status_code, resp.content)
        return True

    async def send_stdin(self, pid: int, data: Union[str, bytes], eof: bool = False) -> None:
        payload = data.encode() if isinstance(data, str) else data
        resp = await self._sandbox._data("POST", f"/commands/{pid}/stdin",
                                         params={"eof": "true" if eof else "false"},
                                         content=payload)
        raise_for(resp.status_code, resp.content)

    def connect(self, pid: int) -> AsyncCommandHandle:
        """A handle on a running command (``await handle.wait()`` re-attaches)."""
        return AsyncCommandHandle(self._sandbox, pid)


class AsyncFilesystem:
    """The filesystem of one sandbox; relative paths are under /workspace."""

    def __init__(self, sandbox: "AsyncSandbox"):
        self._sandbox = sandbox

    async def read(self, path: str, format: str = "text") -> Union[str, bytes]:
        resp = await self._sandbox._data("GET", "/files", params={"path": path})
        raise_for(resp.status_code, resp.content)
        return resp.content if format == "bytes" else resp.content.decode(errors="replace")

    async def write(self, path: str, data: Union[str, bytes]) -> None:
        payload = data.encode() if isinstance(data, str) else data
        resp = await self._sandbox._data("PUT", "/files", params={"path": path}, content=payload)
        raise_for(resp.status_code, resp.content)

    async def upload(self, local_path: str, path: str) -> int:
        """Streams a local file into the sandbox; returns its size."""
        import os

        async def chunks():
            with open(local_path, "rb") as f:
                while True:
                    chunk = await asyncio.to_thread(f.read, 256 * 1024)
                    if not chunk:
                        return
                    yield chunk

        resp = await self._sandbox._data("PUT", "/files", params={"path": path},
                                         content=chunks())
        raise_for(resp.status_code, resp.content)
        return os.path.getsize(local_path)

    async def download(self, path: str, local_path: str) -> int:
        """Streams a file out of the sandbox; only a complete download takes the name."""
        import os
        tmp = local_path + ".nullspace-partial"
        n = 0
        async with self._sandbox._data_stream("GET", "/files", params={"path": path}) as resp:
            if resp.status_code >= 300:
                await resp.aread()
                raise_for(resp.status_code, resp.content)
            with open(tmp, "wb") as out:
                async for chunk in resp.aiter_bytes():
                    out.write(chunk)
                    n += len(chunk)
        os.replace(tmp, local_path)
        return n

    async def list(self, path: str) -> List[EntryInfo]:
        resp = await self._sandbox._data("GET", "/files/list", params={"path": path})
        raise_for(resp.status_code, resp.content)
        return [EntryInfo.parse(e) for e in resp.json()["entries"]]

    async def get_info(self, path: str) -> EntryInfo:
        resp = await self._sandbox._data("GET", "/files/stat", params={"path": path})
        raise_for(resp.status_code, resp.content)
        return EntryInfo.parse(resp.json())

    async def watch_dir(self, path: str, recursive: bool = False,
                        timeout: Optional[float] = None) -> AsyncIterator[Dict[str, Any]]:
        """Yields changes under ``path`` (see ``Sandbox.files.watch_dir``) until the caller
        stops iterating (or ``timeout`` seconds pass)."""
        async with self._sandbox._data_stream(
                "GET", "/files/watch", params={"path": path, "recursive": str(recursive).lower()},
                request_timeout=timeout or 365 * 24 * 3600.0) as resp:
            if resp.status_code >= 300:
                await resp.aread()
                raise_for(resp.status_code, resp.content)
            async for line in resp.aiter_lines():
                if line.strip():
                    yield json.loads(line)

    async def presign(self, path: str, method: str = "GET",
                      expires: int = 3600) -> Dict[str, Any]:
        """A URL for ``path`` that needs no credential (see ``Sandbox.files.presign``)."""
        resp = await self._sandbox._data("POST", "/files/presign",
                                         json={"path": path, "method": method,
                                               "expires": expires})
        raise_for(resp.status_code, resp.content)
        return resp.json()

    async def exists(self, path: str) -> bool:
        resp = await self._sandbox._data("GET", "/files/stat", params={"path": path})
        if resp.status_code == 404:
            return False
        raise_for(resp.status_code, resp.content)
        return True

    async def make_dir(self, path: str) -> None:
        resp = await self._sandbox._data("POST", "/files/mkdir", json={"path": path})
        raise_for(resp.status_code, resp.content)

    async def remove(self, path: str) -> None:
        resp = await self._sandbox._data("DELETE", "/files", params={"path": path})
        raise_for(resp.status_code, resp.content)

    async def rename(self, old_path: str, new_path: str) -> None:
        resp = await self._sandbox._data("POST", "/files/rename",
                                         json={"from": old_path, "to": new_path})
        raise_for(resp.status_code, resp.content)


class AsyncPtyHandle:
    """An interactive terminal (async): ``send``, ``recv``, ``resize``; after the shell
    exits ``recv`` returns None and ``exit_code`` is set."""

    def __init__(self, ws: Any):
        self._ws = ws
        self.exit_code: Optional[int] = None

    async def send(self, data: Union[str, bytes]) -> None:
        await self._ws.send(data.encode() if isinstance(data, str) else bytes(data))

    async def resize(self, cols: int, rows: int) -> None:
        await self._ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def recv(self, timeout: Optional[float] = None) -> Optional[bytes]:
        """The terminal's next output (raising ``TimeoutError`` after ``timeout``
        seconds); None once the process has exited."""
        while self.exit_code is None:
            try:
                message = await asyncio.wait_for(self._ws.recv(), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise TimeoutError(f"no terminal output within {timeout} s") from None
            except Exception:
                return None
            if isinstance(message, bytes):
                return message
            event = json.loads(message)
            if event.get("type") == "exit":
                self.exit_code = event.get("exitCode")
        return None

    async def close(self) -> None:
        await self._ws.close()

    async def __aenter__(self) -> "AsyncPtyHandle":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncPty:
    """Terminals in a sandbox (async)."""

    def __init__(self, sandbox: "AsyncSandbox"):
        self._sandbox = sandbox

    async def create(self, cols: int = 80, rows: int = 24, cmd: Optional[str] = None,
                     user: Optional[str] = None) -> AsyncPtyHandle:
        """Opens a terminal (the user's login shell, or ``cmd``)."""
        from urllib.parse import urlencode

        from websockets.asyncio.client import connect as ws_connect
        query: Dict[str, Any] = {"cols": cols, "rows": rows}
        if cmd:
            query["cmd"] = cmd
        if user:
            query["user"] = user
        sbx = self._sandbox
        ws = await ws_connect(sbx._ws_url("/pty?" + urlencode(query)),
                              additional_headers={
                                  "Authorization": f"Bearer {sbx._runtime['token']}"},
                              open_timeout=30)
        return AsyncPtyHandle(ws)


class AsyncSnapshot(StoredSnapshot):
    """A stored snapshot (async; see ``nullspace.Snapshot``)."""

    async def restore(self, timeout: Optional[int] = None,
                      metadata: Optional[Dict[str, str]] = None,
                      request_timeout: Optional[float] = None,
                      volumes: Optional[str] = None) -> "AsyncSandbox":
        """Starts a new sandbox from it and returns it connected (``volumes``: see
        ``AsyncSandbox.restore``)."""
        return await AsyncSandbox.restore(self.sandbox_id, self.snapshot_id, timeout, metadata,
                                          self._config.api_key, self._config.api_url,
                                          request_timeout or self._config.request_timeout,
                                          volumes)

    async def delete(self, request_timeout: Optional[float] = None) -> None:
        """Deletes it from the store."""
        async with httpx.AsyncClient(timeout=self._config.request_timeout) as client:
            await _call(client, self._config, "DELETE",
                        f"/sandboxes/{self.sandbox_id}/snapshots/{self.snapshot_id}",
                        request_timeout=request_timeout)



class AsyncDesktop:
    """The desktop of a ``desktop`` sandbox: its viewer's URL, screenshots, mouse and
    keyboard (xdotool on display ``:0``), opening URLs or files, its windows."""

    def __init__(self, sandbox: "AsyncSandbox"):
        self._sandbox = sandbox

    async def _run(self, cmd: str, what: str) -> CommandResult:
        result = await self._sandbox.commands.run(cmd, envs=DESKTOP_ENV)
        assert isinstance(result, CommandResult)
        desktop_check(result, what)
        return result

    async def viewer_url(self, view_only: bool = False) -> str:
        """A signed preview URL of the noVNC viewer (interactive, or view-only)."""
        port = DESKTOP_VIEW_ONLY_PORT if view_only else DESKTOP_VIEWER_PORT
        return viewer_url((await self._sandbox.get_preview_url(port))["url"], view_only)

    async def screenshot(self) -> bytes:
        """The screen as PNG bytes."""
        path = f"/tmp/nullspace-screenshot-{uuid.uuid4().hex}.png"
        await self._run(desktop_command("screenshot", path), "the screenshot")
        data = await self._sandbox.files.read(path, format="bytes")
        await self._sandbox.files.remove(path)
        assert isinstance(data, bytes)
        return data

    async def move_mouse(self, x: int, y: int) -> None:
        await self._run(desktop_command("move", x, y), "moving the mouse")

    async def left_click(self, x: Optional[int] = None, y: Optional[int] = None) -> None:
        await self._run(desktop_command("click", 1, 1, x, y), "the click")

    async def right_click(self, x: Optional[int] = None, y: Optional[int] = None) -> None:
        await self._run(desktop_command("click", 3, 1, x, y), "the click")

    async def double_click(self, x: Optional[int] = None, y: Optional[int] = None) -> None:
        await self._run(desktop_command("click", 1, 2, x, y), "the double click")

    async def scroll(self, amount: int = 1) -> None:
        """Scrolls down ``amount`` steps (up when negative)."""
        await self._run(desktop_command("scroll", amount), "scrolling")

    async def type_text(self, text: str) -> None:
        await self._run(desktop_command("type", text), "typing")

    async def press(self, *keys: str) -> None:
        """Presses keys or chords in turn (xdotool names: ``Return``, ``ctrl+l``)."""
        await self._run(desktop_command("press", keys), "the key press")

    async def open(self, target: str) -> None:
        """Opens a URL in the browser, or a file with its application."""
        await self._run(desktop_command("open", target), "opening " + target)

    async def windows(self) -> List[Dict[str, Any]]:
        """The windows on the screen: ``{id, pid, x, y, width, height, title}``."""
        return parse_windows((await self._run(desktop_command("windows"), "listing windows")).stdout)


class AsyncSandbox:
    """A connected sandbox (async). ``await AsyncSandbox.create(...)``; every call of
    ``Sandbox`` as a coroutine (iterators as async iterators)."""

    def __init__(self, info: SandboxInfo, config: Config, client: httpx.AsyncClient):
        self._config = config
        self._client = client
        self.sandbox_id = info.sandbox_id
        self._runtime = info.runtime
        self.commands = AsyncCommands(self)
        self.files = AsyncFilesystem(self)
        self.pty = AsyncPty(self)
        self.desktop = AsyncDesktop(self)

    @classmethod
    async def create(cls, template: Optional[str] = None, timeout: Optional[int] = None,
                     metadata: Optional[Dict[str, str]] = None,
                     envs: Optional[Dict[str, str]] = None,
                     secure: Optional[bool] = None,
                     allow_internet_access: Optional[bool] = None,
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
                     mounts: Optional[Dict[str, Any]] = None) -> "AsyncSandbox":
        """Creates a sandbox and returns it connected (see ``Sandbox.create``)."""
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
        client = httpx.AsyncClient(timeout=config.request_timeout)
        try:
            doc = await _call(client, config, "POST", "/sandboxes", body)
        except Exception:
            await client.aclose()
            raise
        return cls(SandboxInfo.parse(doc), config, client)

    @classmethod
    async def connect(cls, sandbox_id: str, timeout: Optional[int] = None,
                      api_key: Optional[str] = None, domain: Optional[str] = None,
                      request_timeout: Optional[float] = None) -> "AsyncSandbox":
        config = Config.resolve(api_key, domain, request_timeout)
        client = httpx.AsyncClient(timeout=config.request_timeout)
        try:
            doc = await _call(client, config, "POST", f"/sandboxes/{sandbox_id}/connect",
                              {} if timeout is None else {"timeout": timeout})
        except Exception:
            await client.aclose()
            raise
        return cls(SandboxInfo.parse(doc), config, client)

    @classmethod
    async def list(cls, query: Optional[Dict[str, Any]] = None, limit: Optional[int] = None,
                   next_token: Optional[str] = None, api_key: Optional[str] = None,
                   domain: Optional[str] = None,
                   request_timeout: Optional[float] = None,
                   fields: Optional[List[str]] = None) -> Dict[str, Any]:
        """One page of raw dictionaries (see ``Sandbox.list``)."""
        params = list_params(query, limit, next_token, fields)
        config = Config.resolve(api_key, domain, request_timeout)
        async with httpx.AsyncClient(timeout=config.request_timeout) as client:
            doc = await _call(client, config, "GET", "/sandboxes", params=params)
        return list_page(doc, fields)

    @classmethod
    async def get_info_by_id(cls, sandbox_id: str, api_key: Optional[str] = None,
                             domain: Optional[str] = None,
                             request_timeout: Optional[float] = None,
                             fields: Optional[List[str]] = None
                             ) -> Union[SandboxInfo, Dict[str, Any]]:
        """A sandbox's description, read-only (see ``Sandbox.get_info_by_id``)."""
        projection = fields_query(fields)
        config = Config.resolve(api_key, domain, request_timeout)
        async with httpx.AsyncClient(timeout=config.request_timeout) as client:
            doc = await _call(client, config, "GET", f"/sandboxes/{sandbox_id}",
                              params=None if projection is None else {"fields": projection})
        return only_fields(doc, fields) if fields is not None else SandboxInfo.parse(doc)

    @classmethod
    async def restore(cls, sandbox_id: str,
                      snapshot_id: Optional[Union[str, SnapshotInfo]] = None,
                      timeout: Optional[int] = None, metadata: Optional[Dict[str, str]] = None,
                      api_key: Optional[str] = None, domain: Optional[str] = None,
                      request_timeout: Optional[float] = None,
                      volumes: Optional[str] = None) -> "AsyncSandbox":
        """Starts a new sandbox from a snapshot of ``sandbox_id`` (which may be deleted or
        on another worker): ``snapshot_id``, or the newest (pause, then periodic, then
        manual). Returns it connected. ``volumes``: what it does with the original's
        read-write volumes, ``"readonly"`` (default) or ``"copy"``."""
        config = Config.resolve(api_key, domain, request_timeout)
        client = httpx.AsyncClient(timeout=config.request_timeout)
        try:
            doc = await _call(client, config, "POST", "/sandboxes/restore",
                              restore_body(sandbox_id, restore_snapshot_id(snapshot_id),
                                           timeout, metadata, volumes))
        except Exception:
            await client.aclose()
            raise
        return cls(SandboxInfo.parse(doc), config, client)

    @classmethod
    async def run_once(cls, cmd: str, template: str = "base", **create_args: Any) -> CommandResult:
        sbx = await cls.create(template=template, **create_args)
        try:
            return await sbx.commands.run(cmd)
        finally:
            await sbx.kill()
            await sbx.close()

    async def _control(self, method: str, action: str = "",
                       body: Optional[Dict[str, Any]] = None,
                       request_timeout: Optional[float] = None) -> Any:
        path = f"/sandboxes/{self.sandbox_id}" + (f"/{action}" if action else "")
        return await _call(self._client, self._config, method, path, body,
                           request_timeout=request_timeout)

    def _target(self, path: str):
        if not self._runtime:
            raise SandboxError("config", f"no data-plane access to {self.sandbox_id}: "
                               "connect to it first (it may be paused)")
        return (self._runtime["target"]["baseUrl"] + path,
                {"Authorization": f"Bearer {self._runtime['token']}"})

    async def _data(self, method: str, path: str, request_timeout: Optional[float] = None,
                    **kwargs: Any) -> httpx.Response:
        url, headers = self._target(path)
        return await self._client.request(method, url, headers=headers,
                                          timeout=request_timeout or self._config.request_timeout,
                                          **kwargs)

    def _data_stream(self, method: str, path: str, request_timeout: Optional[float] = None,
                     **kwargs: Any):
        url, headers = self._target(path)
        return self._client.stream(method, url, headers=headers,
                                   timeout=request_timeout or self._config.request_timeout,
                                   **kwargs)

    def _ws_url(self, path: str) -> str:
        url, _ = self._target(path)
        return ("wss://" + url[8:] if url.startswith("https://") else "ws://" + url[7:])

    async def get_info(self, request_timeout: Optional[float] = None) -> SandboxInfo:
        return SandboxInfo.parse(await self._control("GET", request_timeout=request_timeout))

    async def is_running(self, request_timeout: Optional[float] = None) -> bool:
        return (await self.get_info(request_timeout)).state == "running"

    async def wait_ready(self, timeout: float = 60.0,
                         request_timeout: Optional[float] = None) -> None:
        """Waits until it runs and takes its data-plane access (see
        ``Sandbox.wait_ready``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            info = await self.get_info(request_timeout or max(min(left, 30.0), 1.0))
            if ready_or_raise(info):
                self._runtime = info.runtime
                return
            if left <= 0:
                raise SandboxError("timeout", f"sandbox {self.sandbox_id} is still "
                                   f"{info.state} after {timeout} s")
            await asyncio.sleep(min(0.2, max(left, 0.0)))

    async def kill(self, request_timeout: Optional[float] = None) -> bool:
        try:
            await self._control("DELETE", request_timeout=request_timeout)
            return True
        except SandboxError as e:
            if e.code == "not_found":
                return False
            raise

    async def set_timeout(self, timeout: int, request_timeout: Optional[float] = None) -> None:
        await self._control("POST", "timeout", {"timeout": timeout}, request_timeout)

    async def set_egress(self, internet: bool = True, allow: Optional[List[str]] = None,
                         deny: Optional[List[str]] = None,
                         request_timeout: Optional[float] = None) -> SandboxInfo:
        """Replaces its egress policy; a running sandbox follows it at once."""
        return SandboxInfo.parse(await self._control("PUT", "egress",
                                                     egress_body(internet, allow, deny),
                                                     request_timeout))

    async def set_security_policy(self, policy: Union[SecurityPolicy, Dict[str, Any]],
                                  request_timeout: Optional[float] = None) -> SandboxInfo:
        """Replaces its security policy (see ``Sandbox.set_security_policy``)."""
        body = SecurityPolicy.body_of(policy)
        return SandboxInfo.parse(await self._control("PUT", "security-policy", body,
                                                     request_timeout))

    async def get_audit(self, after: int = 0, limit: int = 100,
                        request_timeout: Optional[float] = None) -> AuditPage:
        """One page of its audit (see ``Sandbox.get_audit``)."""
        params = audit_params(after, limit)
        doc = await _call(self._client, self._config, "GET",
                          f"/sandboxes/{self.sandbox_id}/audit",
                          params=params, request_timeout=request_timeout)
        return AuditPage.parse(doc, after)

    def audit(self, after: int = 0,
              request_timeout: Optional[float] = None) -> AsyncIterator[AuditRecord]:
        """Every audit record with an ID above ``after``, page after page, as an async
        iterator (see ``Sandbox.audit``)."""
        audit_params(after, 1)
        return self._audit(after, request_timeout)

    async def _audit(self, after: int,
                     request_timeout: Optional[float]) -> AsyncIterator[AuditRecord]:
        while True:
            page = await self.get_audit(after, 1000, request_timeout)
            for record in page.records:
                yield record
            if not page.more or page.next <= after:
                return
            after = page.next

    async def refresh(self, duration: Optional[int] = None,
                      request_timeout: Optional[float] = None) -> None:
        await self._control("POST", "refreshes",
                            {} if duration is None else {"duration": duration}, request_timeout)

    async def get_preview_url(self, port: int,
                              request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """A signed preview URL for ``port`` (see ``Sandbox.get_preview_url``)."""
        return await self._control("POST", "previews", {"port": port}, request_timeout)

    async def create_preview_proxy_target(self, port: int,
                                          request_timeout: Optional[float] = None
                                          ) -> Dict[str, Any]:
        """``{url, header, token}`` for application proxies."""
        return (await self.get_preview_url(port, request_timeout))["proxyTarget"]

    async def set_port_public(self, port: int, public: bool = True,
                              request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """Makes ``port`` reachable without a token (or private again)."""
        return await self._control("POST", "previews", {"port": port, "public": public},
                                   request_timeout)

    async def get_host(self, port: int, request_timeout: Optional[float] = None) -> str:
        """The preview host name of ``port`` (see ``Sandbox.get_host``)."""
        port = check_port(port)
        return (await self._control("POST", "previews", {"port": port}, request_timeout))["host"]

    async def get_metrics(self, start: Optional[Union[datetime, float]] = None,
                          end: Optional[Union[datetime, float]] = None,
                          request_timeout: Optional[float] = None) -> List[SandboxMetrics]:
        """Resource samples (see ``Sandbox.get_metrics``)."""
        params = metrics_params(start, end)
        doc = await _call(self._client, self._config, "GET",
                          f"/sandboxes/{self.sandbox_id}/metrics",
                          params=params, request_timeout=request_timeout)
        return [SandboxMetrics.parse(m) for m in doc["metrics"]]

    async def stream_events(self, after_event_id: Optional[int] = None,
                            live_only: bool = False) -> AsyncIterator[Dict[str, Any]]:
        """Yields lifecycle events as they happen (see ``Sandbox.stream_events``):
        reconnects by itself, no gap, no duplicate; ends after ``sandbox.deleted``."""
        from websockets.asyncio.client import connect as ws_connect
        last = after_event_id
        failures = 0
        while True:
            if last is not None:
                query = f"?after_event_id={last}"
            else:
                query = "?live_only=true" if live_only else ""
            try:
                async with ws_connect(self._ws_url("/lifecycle/ws" + query),
                                      additional_headers={"X-API-Key": self._config.api_key},
                                      open_timeout=30) as ws:
                    failures = 0
                    async for message in ws:
                        event = json.loads(message)
                        if last is not None and event["id"] <= last:
                            continue
                        last = event["id"]
                        yield event
                        if event["type"] == "sandbox.deleted":
                            return
            except (GeneratorExit, asyncio.CancelledError):
                raise
            except Exception as e:  # a dropped connection, a restarting pool manager
                failures += 1
                status = getattr(getattr(e, "response", None), "status_code", 0)
                if status in (401, 403, 404) or failures > 60:
                    raise SandboxError("stream_failed", f"event stream: {e}", status)
            await asyncio.sleep(min(0.1 * 2 ** min(failures, 5), 2.0))
            try:
                info = await AsyncSandbox.get_info_by_id(self.sandbox_id, self._config.api_key,
                                                         self._config.api_url)
                if info.runtime:
                    self._runtime = info.runtime
            except SandboxError:
                pass

    async def list_recordings(self, request_timeout: Optional[float] = None
                              ) -> List[Dict[str, Any]]:
        """Its recordings (see ``Sandbox.list_recordings``)."""
        doc = await self._control("GET", "recordings", request_timeout=request_timeout)
        return doc["recordings"]

    async def get_recording(self, recording_id: str,
                            request_timeout: Optional[float] = None) -> bytes:
        """A recording's bytes (see ``Sandbox.get_recording``)."""
        resp = await self._client.get(
            self._config.url(f"/sandboxes/{self.sandbox_id}/recordings/{recording_id}"),
            headers=self._config.headers(),
            timeout=request_timeout or self._config.request_timeout)
        raise_for(resp.status_code, resp.content)
        return resp.content

    async def logs(self, request_timeout: Optional[float] = None, offset: int = 0,
                   limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """Its logs from ``offset`` (see ``Sandbox.logs``)."""
        lines: List[Dict[str, Any]] = []
        while True:
            doc = await _call(self._client, self._config, "GET",
                              f"/sandboxes/{self.sandbox_id}/logs",
                              params=logs_params(offset, limit), request_timeout=request_timeout)
            lines.extend(doc["logs"])
            if limit is not None or doc.get("next") is None:
                return lines
            offset = doc["next"]

    async def pause(self, request_timeout: Optional[float] = None) -> None:
        await self._control("POST", "pause", {}, request_timeout)

    async def resume(self, request_timeout: Optional[float] = None) -> None:
        doc = await self._control("POST", "resume", {}, request_timeout)
        self._runtime = SandboxInfo.parse(doc).runtime

    async def hibernate(self, request_timeout: Optional[float] = None) -> None:
        """Pauses into object storage: any worker sharing the store can resume it."""
        await self._control("POST", "hibernate", {}, request_timeout)

    async def migrate(self, host: Optional[str] = None,
                      request_timeout: Optional[float] = None) -> Dict[str, Any]:
        """Moves it to another host of the cluster without stopping it (an operator
        key): to ``host``, or where placement chooses. Returns the report: ``from``,
        ``to``, ``downtimeMs``, ``totalMs``, ``ramBytes``, ``diskBytes``, ``passes``,
        ``postcopy``."""
        body: Dict[str, Any] = {} if host is None else {"host": host}
        return await self._control("POST", "migrate", body, request_timeout)

    async def create_snapshot(self, request_timeout: Optional[float] = None,
                        name: Optional[str] = None) -> SnapshotInfo:
        """Takes a snapshot to object storage; the sandbox keeps running. Its ID works as
        a template ID."""
        return SnapshotInfo.parse(await self._control(
            "POST", "snapshots", {} if name is None else {"name": name}, request_timeout))

    async def snapshot(self, request_timeout: Optional[float] = None,
                       name: Optional[str] = None) -> AsyncSnapshot:
        """A manual snapshot (see ``Sandbox.snapshot``)."""
        return AsyncSnapshot(await self.create_snapshot(request_timeout, name), self._config)

    async def list_snapshots(self, request_timeout: Optional[float] = None
                             ) -> List[AsyncSnapshot]:
        """Its snapshots (pause, periodic, manual), newest first."""
        doc = await self._control("GET", "snapshots", request_timeout=request_timeout)
        return [AsyncSnapshot(SnapshotInfo.parse(d), self._config) for d in doc["snapshots"]]

    async def delete_snapshot(self, snapshot_id: str,
                              request_timeout: Optional[float] = None) -> None:
        await self._control("DELETE", f"snapshots/{snapshot_id}", request_timeout=request_timeout)

    async def fork(self, count: int = 1,
                   request_timeout: Optional[float] = None,
                   volumes: Optional[str] = None) -> List["AsyncSandbox"]:
        """Branches it into ``count`` running children with its memory, processes and
        disk; it keeps running. Each child has its own HTTP client: close it when done.
        ``volumes``: what the children do with its read-write volumes, ``"readonly"``
        (default: the same volume, read-only; a write fails with EROFS) or ``"copy"``
        (each child a new volume of their content, named in its ``mounts``)."""
        doc = await self._control("POST", "fork", fork_body(count, volumes), request_timeout)
        return [type(self)(SandboxInfo.parse(c), self._config,
                           httpx.AsyncClient(timeout=self._config.request_timeout))
                for c in doc["sandboxes"]]

    async def run_code(self, code: str, language: Optional[str] = None,
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
            await self.files.write(path, code)
        execution = Execution()
        reader = CodeEventReader(execution, on_stdout, on_stderr, on_result, on_error)
        result = await self.commands.run(code_command(ctx, lang, timeout, b64, path), envs=envs,
                                   on_stdout=reader.feed,
                                   request_timeout=request_timeout or timeout + 60)
        assert isinstance(result, CommandResult)
        if path:
            await self.files.remove(path)
        return reader.finish(result)

    async def create_code_context(self, language: str = "python", cwd: Optional[str] = None,
                            request_timeout: Optional[float] = None) -> CodeContext:
        """A new kernel of its own (separate variables and imports) for ``run_code``."""
        _, lang = code_context_args(None, language)
        cmd = f"{CODE_HELPER} create-context --language {lang}"
        if cwd:
            cmd += f" --cwd {shlex.quote(cwd)}"
        result = await self.commands.run(cmd, request_timeout=request_timeout or 120)
        assert isinstance(result, CommandResult)
        event = context_event(result)
        return CodeContext(event["id"], event.get("language", lang), event.get("cwd", "/workspace"))

    async def remove_code_context(self, context: Union[CodeContext, str],
                            request_timeout: Optional[float] = None) -> None:
        """Ends a context's kernel."""
        ctx, _ = code_context_args(context, None)
        result = await self.commands.run(f"{CODE_HELPER} remove-context {shlex.quote(ctx)}",
                                   request_timeout=request_timeout)
        assert isinstance(result, CommandResult)
        context_event(result)

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
