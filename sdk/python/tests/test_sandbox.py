"""The Python SDK against a live stack (deploy/test-python-sdk.sh starts one and sets
NULLSPACE_API_URL / NULLSPACE_API_KEY, and an operator key as NULLSPACE_OPERATOR_KEY)."""

import os

import pytest

from nullspace import AsyncSandbox, NotFoundError, Sandbox, SandboxError

SMALL = {"vcpus": 1, "memMiB": 512, "diskSizeMiB": 1024}


def test_sync_sandbox_end_to_end(tmp_path):
    chunks = []
    with Sandbox.create(template="minimal", timeout=120, metadata={"suite": "py"},
                        envs={"GREETING": "hello"}, resources=SMALL) as sbx:
        assert sbx.is_running()
        result = sbx.commands.run("echo $GREETING $EXTRA; echo oops >&2; exit 3",
                                  envs={"EXTRA": "py"}, on_stdout=chunks.append)
        assert (result.stdout, result.stderr, result.exit_code) == ("hello py\n", "oops\n", 3)
        assert "".join(chunks) == result.stdout

        handle = sbx.commands.run("echo later; sleep 0.2", background=True)
        assert any(p["pid"] == handle.pid for p in sbx.commands.list())
        assert handle.wait().stdout == "later\n"
        sleeper = sbx.commands.run("sleep 300", background=True)
        assert sbx.commands.kill(sleeper.pid)
        assert sleeper.wait().signal == 9

        sbx.files.write("notes/a.txt", "alpha")
        assert sbx.files.read("notes/a.txt") == "alpha"
        sbx.files.make_dir("notes/deep")
        sbx.files.rename("notes/a.txt", "notes/b.txt")
        assert [e.name for e in sbx.files.list("notes")] == ["b.txt", "deep"]
        assert sbx.files.get_info("notes/b.txt").size == 5
        assert not sbx.files.exists("notes/a.txt")
        blob = bytes(i * 7 % 251 for i in range(2_000_000))
        (tmp_path / "up.bin").write_bytes(blob)
        assert sbx.files.upload(str(tmp_path / "up.bin"), "/workspace/up.bin") == len(blob)
        assert sbx.files.download("/workspace/up.bin", str(tmp_path / "down.bin")) == len(blob)
        assert (tmp_path / "down.bin").read_bytes() == blob
        assert sbx.files.read("up.bin", format="bytes") == blob
        sbx.files.remove("notes")
        with pytest.raises(NotFoundError):
            sbx.files.read("notes/b.txt")

        page = Sandbox.list(query={"metadata": {"suite": "py"}, "state": ["running"]})
        assert [s["sandboxID"] for s in page["sandboxes"]] == [sbx.sandbox_id]
        sbx.set_timeout(90)
        assert sbx.get_info().timeout == 90
        before = sbx.get_info().expires_at
        sbx.refresh(3600)
        assert sbx.get_info().expires_at > before
        sbx.pause()
        info = Sandbox.get_info_by_id(sbx.sandbox_id)
        assert info.state == "paused" and info.runtime is None
        assert info.dashboard_url.endswith(f"/dashboard/sandboxes/{sbx.sandbox_id}")
        sbx.resume()
        assert sbx.files.read("up.bin", format="bytes") == blob
        sandbox_id = sbx.sandbox_id
    # The context manager closed the client; the sandbox still runs.
    assert Sandbox.get_info_by_id(sandbox_id).state == "running"
    again = Sandbox.connect(sandbox_id, timeout=60)
    assert again.kill() is True
    assert again.kill() is False
    again.close()


def test_errors_carry_the_api_code_and_overrides_work(monkeypatch, tmp_path):
    with pytest.raises(NotFoundError) as e:
        Sandbox.get_info_by_id("sbx-0123456789abcdef0123")
    assert e.value.status == 404
    with pytest.raises(SandboxError) as e:
        Sandbox.list(api_key="ns_0123456789abcdef0123456789abcdef")
    assert e.value.code == "unauthorized"
    with pytest.raises(SandboxError) as e:
        Sandbox.create(template="no-such-template")
    assert e.value.code == "not_found"
    with pytest.raises(SandboxError) as e:
        Sandbox.create(template="minimal", resources={"memory": 512})
    assert e.value.code == "invalid_request" and "memory" in e.value.message
    # domain as host:port, per call.
    host_port = os.environ["NULLSPACE_API_URL"].split("://", 1)[1]
    monkeypatch.setenv("NULLSPACE_API_URL", "http://127.0.0.1:9")
    assert "sandboxes" in Sandbox.list(domain=host_port)
    # No key anywhere: a config error that says where to get one.
    monkeypatch.delenv("NULLSPACE_API_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    with pytest.raises(SandboxError) as e:
        Sandbox.list()
    assert e.value.code == "config" and "NULLSPACE_API_KEY" in e.value.message


def test_run_once_cleans_up():
    result = Sandbox.run_once("echo once", template="minimal", resources=SMALL)
    assert result.stdout == "once\n"
    assert Sandbox.list()["sandboxes"] == []


async def test_async_sandbox():
    async with await AsyncSandbox.create(template="minimal", resources=SMALL) as sbx:
        result = await sbx.commands.run("echo $((6*7))")
        assert result.stdout == "42\n"
        changed = await sbx.set_egress(internet=False, allow=["192.0.2.0/24"])
        assert changed.egress == {"internet": False, "allow": ["192.0.2.0/24"], "deny": []}
        await sbx.files.write("x.txt", "async")
        assert await sbx.files.read("x.txt") == "async"
        handle = await sbx.commands.run("echo bg", background=True)
        assert (await handle.wait()).stdout == "bg\n"
        assert (await AsyncSandbox.get_info_by_id(sbx.sandbox_id)).state == "running"
        await sbx.set_timeout(120, request_timeout=30)
        assert (await sbx.get_info(request_timeout=30)).timeout == 120
        assert await sbx.kill()
        assert not await sbx.kill()
    once = await AsyncSandbox.run_once("echo async-once", template="minimal", resources=SMALL)
    assert once.stdout == "async-once\n"


def test_snapshots_restore_fork_and_hibernate():
    sbx = Sandbox.create(template="minimal", timeout=120, resources=SMALL)
    try:
        sbx.files.write("/workspace/state.txt", "v1")
        snap = sbx.create_snapshot()
        assert (snap.kind, snap.storage) == ("manual", "object")
        assert [s.snapshot_id for s in sbx.list_snapshots()] == [snap.snapshot_id]

        (child,) = sbx.fork(1)
        with child:
            assert child.files.read("/workspace/state.txt") == "v1"
            assert child.kill()

        sbx.hibernate()
        info = sbx.get_info()
        assert info.state == "paused" and info.hibernated
        sbx.resume()
        sbx.files.write("/workspace/state.txt", "v2")
    finally:
        sbx.kill()
        sbx.close()

    # The manual snapshot outlives the sandbox and restores the state it had.
    with Sandbox.restore(sbx.sandbox_id, snapshot_id=snap.snapshot_id) as restored:
        assert restored.files.read("/workspace/state.txt") == "v1"
        assert restored.kill()
    with pytest.raises(NotFoundError):
        Sandbox.restore("sbx-0123456789abcdef0123")


@pytest.mark.asyncio
async def test_async_snapshots():
    sbx = await AsyncSandbox.create(template="minimal", timeout=120, resources=SMALL)
    try:
        snap = await sbx.snapshot()
        listed = await sbx.list_snapshots()
        assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
        await sbx.delete_snapshot(snap.snapshot_id)
        assert await sbx.list_snapshots() == []
    finally:
        await sbx.kill()
        await sbx.close()


def test_warm_pool_checkout():
    import time

    from nullspace import Template

    # The built-in templates' pools are the operator's: a team key is refused.
    operator = os.environ["NULLSPACE_OPERATOR_KEY"]
    with pytest.raises(SandboxError) as err:
        Template.set_warm_pool("minimal", 1, resources=SMALL)
    assert (err.value.status, err.value.code) == (403, "forbidden"), err.value
    with pytest.raises(SandboxError) as err:
        Template.set_warm_pool("minimal", 99, api_key=operator)
    assert err.value.code == "invalid_request"
    Template.set_warm_pool("minimal", 1, resources=SMALL, api_key=operator)
    deadline = time.time() + 120
    while Template.get_warm_pool("minimal")["ready"] < 1:
        assert time.time() < deadline, "the pool never filled"
        time.sleep(0.25)
    try:
        with Sandbox.create(template="minimal", resources=SMALL, warm_pool="require",
                            envs={"FROM": "pool"}) as sbx:
            assert sbx.commands.run("echo $FROM").stdout == "pool\n"
            steps = [t.get("detail") for t in sbx.get_info().timeline]
            assert "checked out from the warm pool" in steps
            sbx.kill()
        with pytest.raises(SandboxError) as err:
            Sandbox.create(template="minimal", warm_pool="always")
        assert err.value.code == "invalid_request"
    finally:
        Template.set_warm_pool("minimal", 0, resources=SMALL, api_key=operator)


def test_template_build_streams_its_log_and_failures_say_why():
    from nullspace import Template

    shape = {"vcpus": 1, "memMiB": 512, "diskSizeMiB": 2048}
    lines = []
    tpl = Template.build(
        name="py-tpl", resources=shape, on_log=lines.append,
        steps=[{"env": {"FROM_PY": "yes"}},
               {"files": [{"path": "/etc/py-note", "content": "note\n"}]},
               {"run": "echo from python $FROM_PY"}])
    try:
        assert tpl["status"] == "ready"
        assert any(l["text"] == "from python yes" and l["stream"] == "stdout" for l in lines)
        assert [l["seq"] for l in lines] == sorted({l["seq"] for l in lines})
        assert "py-tpl" in [t.get("name") for t in Template.list()]
        with Sandbox.create(template="py-tpl") as sbx:
            out = sbx.commands.run("cat /etc/py-note; echo $FROM_PY").stdout
            assert out == "note\nyes\n"
            sbx.kill()
        with pytest.raises(SandboxError) as err:
            Template.build(resources=shape, steps=[{"run": "echo nope >&2; exit 9"}])
        assert err.value.code == "build_failed"
        assert err.value.details["step"] == 0 and err.value.details["exitCode"] == 9
        assert "nope" in err.value.details["outputTail"]
        with pytest.raises(SandboxError) as err:
            Template.build(steps=[{"run": "true", "env": {"A": "1"}}])
        assert err.value.code == "invalid_request"
    finally:
        Template.delete(tpl["templateID"])
    with pytest.raises(NotFoundError):
        Template.get("py-tpl")


def test_previews_metrics_logs_watch_and_the_event_stream():
    import threading

    from nullspace import redact_preview_token, redact_preview_url

    with Sandbox.create(template="minimal", resources=SMALL, timeout=300) as sbx:
        p = sbx.get_preview_url(8000)
        assert "ns_preview_token=" in p["url"]
        red = redact_preview_url(p["url"])
        assert p["token"] not in red and red.endswith("ns_preview_token=REDACTED")
        assert p["token"] not in redact_preview_token(p["token"])
        target = sbx.create_preview_proxy_target(8000)
        assert target["header"] == "x-nullspace-preview-proxy-token" and target["token"]
        assert sbx.set_port_public(8000)["public"] is True

        samples = sbx.get_metrics()
        assert samples and samples[-1].mem_total_mib > 0
        assert any(l["source"] == "lifecycle" for l in sbx.logs())

        changes = []
        def watch():
            for change in sbx.files.watch_dir("/workspace", timeout=30):
                changes.append(change)
                if change["type"] == "write":
                    return
        watcher = threading.Thread(target=watch)
        watcher.start()
        import time
        time.sleep(1)
        sbx.commands.run("echo hi > /workspace/watched")
        watcher.join(30)
        assert {"type": "write", "path": "/workspace/watched", "dir": False} in changes

        events = sbx.stream_events()
        first = next(events)
        assert first["id"] == 1 and first["type"] == "sandbox.created"
        seen = [first]
        sbx.pause()
        for e in events:
            seen.append(e)
            if e["type"] == "sandbox.paused":
                break
        ids = [e["id"] for e in seen]
        assert ids == list(range(1, len(ids) + 1))
        sbx.kill()


def test_pty_round_trip_with_resize():
    with Sandbox.create(template="minimal", resources=SMALL, timeout=120) as sbx:
        with sbx.pty.create(cols=80, rows=24) as term:
            out = b""
            def until(want: bytes) -> None:
                nonlocal out
                while want not in out:
                    chunk = term.recv(timeout=20)
                    assert chunk is not None, out
                    out += chunk
            term.send("stty size; echo py-$((6*7))\n")
            until(b"py-42")
            until(b"24 80")
            term.resize(100, 30)
            term.send("stty size\n")
            until(b"30 100")
            term.send("exit 4\n")
            while term.recv(timeout=20) is not None:
                pass
            assert term.exit_code == 4
        sbx.kill()


def test_volumes_and_egress():
    from nullspace import Volume
    vol = Volume.create(name=f"py-{os.getpid()}", size_mib=32)
    assert vol["version"] == 0 and vol["sizeMiB"] == 32
    with pytest.raises(SandboxError) as bad:
        Sandbox.create(template="minimal", resources=SMALL,
                       egress={"allow": ["not a host"]})
    assert bad.value.code == "invalid_request" and "egress.allow[0]" in str(bad.value)
    with Sandbox.create(template="minimal", resources=SMALL, timeout=120,
                        egress={"internet": False}, mounts={"/mnt/py": vol["name"]}) as sbx:
        info = sbx.get_info()
        assert info.egress == {"internet": False, "allow": [], "deny": []}
        assert info.mounts == [{"path": "/mnt/py", "volumeID": vol["volumeID"], "type": "rw"}]
        assert sbx.commands.run("echo kept > /mnt/py/f && cat /mnt/py/f").stdout == "kept\n"
        assert sbx.set_egress(deny=["10.0.0.0/8"]).egress["deny"] == ["10.0.0.0/8"]
        with pytest.raises(SandboxError) as held:
            Volume.delete(vol["volumeID"])
        assert held.value.code == "invalid_state"
        assert Volume.get(vol["volumeID"])["attachments"][0]["sandboxID"] == sbx.sandbox_id
        assert sbx.kill()  # the writer ends: its writes are saved
    assert Volume.get(vol["name"])["version"] == 1
    assert any(v["volumeID"] == vol["volumeID"] for v in Volume.list())
    Volume.delete(vol["volumeID"])
    with pytest.raises(NotFoundError):
        Volume.get(vol["volumeID"])
