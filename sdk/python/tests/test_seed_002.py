"""Seeds 000, 002 and 003 behaviours through the Python SDK against a live stack: wake on
SDK calls, idle timeouts, application logs, presigned file URLs, named snapshots as a
start source, regions."""

import os
import time

import httpx
import pytest

from nullspace import Sandbox, SandboxError

SMALL = {"cpu": 1, "memory_mb": 512, "disk_mb": 1024}


def until(what, check, within=60.0):
    deadline = time.monotonic() + within
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} within {within} s"
        time.sleep(0.25)


def test_idle_wake_logs_presign_and_named_snapshots():
    with pytest.raises(SandboxError) as e:
        Sandbox.create(template="minimal", resources=SMALL, region="mars")
    assert e.value.code == "invalid_request" and "no regions" in e.value.message
    with pytest.raises(SandboxError) as e:
        Sandbox.create(template="minimal", snapshot_name="x")
    assert "start source" in e.value.message

    sbx = Sandbox.create(template="minimal", resources=SMALL, timeout=600, on_timeout="pause",
                         auto_resume=True, idle_timeout=6)
    try:
        # A background command's output is in the logs, with its source.
        sbx.commands.run("echo py-bg-out; sleep 1", background=True)
        lines = until("background output in the logs", lambda: [
            l for l in sbx.logs() if l["source"] == "process" and l["text"] == "py-bg-out"])
        assert lines[0]["stream"] == "stdout" and lines[0]["pid"] > 0
        assert len(sbx.logs(offset=0, limit=1)) == 1

        # Presigned URLs work without any credential, for their path and method only.
        sbx.files.write("report.txt", "presigned")
        get = sbx.files.presign("report.txt", expires=120)
        assert httpx.get(get["url"]).text == "presigned"
        assert httpx.put(get["url"], content=b"no").status_code == 403
        put = sbx.files.presign("upload.txt", method="PUT")
        assert httpx.put(put["url"], content=b"uploaded").status_code == 200
        assert sbx.files.read("upload.txt") == "uploaded"

        # Idle for its idleTimeout: paused (onTimeout); the next SDK call wakes it.
        until("the idle pause", lambda: Sandbox.get_info_by_id(sbx.sandbox_id).state == "paused")
        assert sbx.commands.run("echo awake").stdout == "awake\n"
        assert sbx.is_running()

        # A named snapshot is a start source (seed 002's snapshotName).
        name = f"py-{os.getpid()}"
        snap = sbx.snapshot(name=name)
        assert snap.name == name
        assert [s.name for s in sbx.list_snapshots() if s.id == snap.id] == [name]
        with pytest.raises(SandboxError) as e:
            sbx.snapshot(name=name)
        assert e.value.status == 409
        with Sandbox.create(snapshot_name=name, snapshot_id=snap.id, resources=SMALL) as child:
            assert child.files.read("report.txt") == "presigned"
            child.kill()
        snap.delete()
        with pytest.raises(SandboxError) as e:
            Sandbox.create(snapshot_name=name)
        assert e.value.status == 404
    finally:
        sbx.kill()
        sbx.close()
