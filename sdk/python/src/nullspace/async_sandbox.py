"""The asynchronous SDK: ``AsyncSandbox``, the same calls as coroutines."""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Union

import httpx

from ._core import (CommandResult, Config, EntryInfo, SandboxError, SandboxInfo, SnapshotInfo,
                    metrics_params,
                    apply_event, create_body, egress_body, list_params, raise_for, restore_body,
                    run_body)


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
                   on_stderr: Optional[Callable[[str], Any]] = None) -> CommandResult:
        return await self._sandbox.commands._stream("GET", f"/commands/{self.pid}", None,
                                                    on_stdout, on_stderr)

    async def send_stdin(self, data: Union[str, bytes], eof: bool = False) -> None:
        await self._sandbox.commands.send_stdin(self.pid, data, eof=eof)

    async def kill(self) -> bool:
        return await self._sandbox.commands.kill(self.pid)


class AsyncCommands:
    """Commands in one sandbox."""

    def __init__(self, sandbox: "AsyncSandbox"):
        self._sandbox = sandbox

    async def _stream(self, method, path, body, on_stdout, on_stderr) -> CommandResult:
        result = CommandResult()
        ended = False
        async with self._sandbox._data_stream(method, path, json=body) as resp:
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
                  stdin: bool = False) -> Union[CommandResult, AsyncCommandHandle]:
        body = run_body(cmd, background, envs, cwd, user, stdin)
        if background:
            resp = await self._sandbox._data("POST", "/commands", json=body)
            raise_for(resp.status_code, resp.content)
            return AsyncCommandHandle(self._sandbox, resp.json()["pid"])
        return await self._stream("POST", "/commands", body, on_stdout, on_stderr)

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

    async def list(self, path: str) -> List[EntryInfo]:
        resp = await self._sandbox._data("GET", "/files/list", params={"path": path})
        raise_for(resp.status_code, resp.content)
        return [EntryInfo.parse(e) for e in resp.json()["entries"]]

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


class AsyncSandbox:
    """A connected sandbox (async). ``await AsyncSandbox.create(...)``."""

    def __init__(self, info: SandboxInfo, config: Config, client: httpx.AsyncClient):
        self._config = config
        self._client = client
        self.sandbox_id = info.sandbox_id
        self._runtime = info.runtime
        self.commands = AsyncCommands(self)
        self.files = AsyncFilesystem(self)

    @classmethod
    async def create(cls, template: str = "base", timeout: Optional[int] = None,
                     metadata: Optional[Dict[str, str]] = None,
                     envs: Optional[Dict[str, str]] = None,
                     lifecycle: Optional[Dict[str, Any]] = None,
                     resources: Optional[Dict[str, int]] = None,
                     snapshot_interval: Optional[int] = None, warm_pool: Optional[str] = None,
                     egress: Optional[Dict[str, Any]] = None,
                     mounts: Optional[Dict[str, Any]] = None,
                     api_key: Optional[str] = None,
                     domain: Optional[str] = None,
                     request_timeout: Optional[float] = None) -> "AsyncSandbox":
        config = Config.resolve(api_key, domain, request_timeout)
        client = httpx.AsyncClient(timeout=config.request_timeout)
        try:
            doc = await _call(client, config, "POST", "/sandboxes",
                              create_body(template, timeout, metadata, envs, lifecycle, resources,
                                          snapshot_interval, warm_pool, egress, mounts))
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
                   request_timeout: Optional[float] = None) -> Dict[str, Any]:
        config = Config.resolve(api_key, domain, request_timeout)
        async with httpx.AsyncClient(timeout=config.request_timeout) as client:
            doc = await _call(client, config, "GET", "/sandboxes",
                              params=list_params(query, limit, next_token))
        return {"sandboxes": doc["sandboxes"], "next_token": doc.get("nextToken")}

    @classmethod
    async def get_info_by_id(cls, sandbox_id: str, api_key: Optional[str] = None,
                             domain: Optional[str] = None,
                             request_timeout: Optional[float] = None) -> SandboxInfo:
        config = Config.resolve(api_key, domain, request_timeout)
        async with httpx.AsyncClient(timeout=config.request_timeout) as client:
            return SandboxInfo.parse(await _call(client, config, "GET", f"/sandboxes/{sandbox_id}"))

    @classmethod
    async def restore(cls, sandbox_id: str, snapshot_id: Optional[str] = None,
                 timeout: Optional[int] = None, metadata: Optional[Dict[str, str]] = None,
                 api_key: Optional[str] = None, domain: Optional[str] = None,
                 request_timeout: Optional[float] = None) -> "AsyncSandbox":
        """Starts a new sandbox from a snapshot of ``sandbox_id`` (which may be deleted or
        on another worker): ``snapshot_id``, or the newest (pause, then periodic, then
        manual). Returns it connected."""
        config = Config.resolve(api_key, domain, request_timeout)
        client = httpx.AsyncClient(timeout=config.request_timeout)
        try:
            doc = await _call(client, config, "POST", "/sandboxes/restore",
                              restore_body(sandbox_id, snapshot_id, timeout, metadata))
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

    async def _data(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url, headers = self._target(path)
        return await self._client.request(method, url, headers=headers, **kwargs)

    def _data_stream(self, method: str, path: str, **kwargs: Any):
        url, headers = self._target(path)
        return self._client.stream(method, url, headers=headers, **kwargs)

    async def get_info(self, request_timeout: Optional[float] = None) -> SandboxInfo:
        return SandboxInfo.parse(await self._control("GET", request_timeout=request_timeout))

    async def is_running(self, request_timeout: Optional[float] = None) -> bool:
        return (await self.get_info(request_timeout)).state == "running"

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

    async def get_metrics(self, start: Optional[int] = None, end: Optional[int] = None,
                          request_timeout: Optional[float] = None) -> List[Dict[str, Any]]:
        """Resource samples (see ``Sandbox.get_metrics``)."""
        doc = await _call(self._client, self._config, "GET",
                          f"/sandboxes/{self.sandbox_id}/metrics",
                          params=metrics_params(start, end), request_timeout=request_timeout)
        return doc["metrics"]

    async def logs(self, request_timeout: Optional[float] = None) -> List[Dict[str, Any]]:
        """``[{time, source, text}]``: boot console, lifecycle events, diagnostics."""
        return (await self._control("GET", "logs", request_timeout=request_timeout))["logs"]

    async def pause(self, request_timeout: Optional[float] = None) -> None:
        await self._control("POST", "pause", {}, request_timeout)

    async def resume(self, request_timeout: Optional[float] = None) -> None:
        doc = await self._control("POST", "resume", {}, request_timeout)
        self._runtime = SandboxInfo.parse(doc).runtime

    async def hibernate(self, request_timeout: Optional[float] = None) -> None:
        """Pauses into object storage: any worker sharing the store can resume it."""
        await self._control("POST", "hibernate", {}, request_timeout)

    async def create_snapshot(self, request_timeout: Optional[float] = None) -> SnapshotInfo:
        """Takes a snapshot to object storage; the sandbox keeps running. Its ID works as
        a template ID."""
        return SnapshotInfo.parse(await self._control("POST", "snapshots", {}, request_timeout))

    async def snapshot(self, request_timeout: Optional[float] = None) -> SnapshotInfo:
        """A manual snapshot: they accumulate and survive ``kill()``; restore one with
        ``Sandbox.restore``."""
        return await self.create_snapshot(request_timeout)

    async def list_snapshots(self, request_timeout: Optional[float] = None) -> List[SnapshotInfo]:
        """Its snapshots (pause, periodic, manual), newest first."""
        doc = await self._control("GET", "snapshots", request_timeout=request_timeout)
        return [SnapshotInfo.parse(d) for d in doc["snapshots"]]

    async def delete_snapshot(self, snapshot_id: str,
                              request_timeout: Optional[float] = None) -> None:
        await self._control("DELETE", f"snapshots/{snapshot_id}", request_timeout=request_timeout)

    async def fork(self, count: int = 1,
                   request_timeout: Optional[float] = None) -> List["AsyncSandbox"]:
        """Branches it into ``count`` running children with its memory, processes and
        disk; it keeps running. Each child has its own HTTP client: close it when done."""
        doc = await self._control("POST", "fork", {"count": count}, request_timeout)
        return [type(self)(SandboxInfo.parse(c), self._config,
                           httpx.AsyncClient(timeout=self._config.request_timeout))
                for c in doc["sandboxes"]]

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
