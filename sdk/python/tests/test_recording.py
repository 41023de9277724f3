"""Seed 002's sandbox recording through the Python SDK: commands and a terminal session
of a sandbox created with recording=True, listed and downloaded after it ended."""

import json
import time

from nullspace import AsyncSandbox, Sandbox

SMALL = {"cpu": 1, "memory_mb": 512, "disk_mb": 1024}


def test_a_recorded_sandbox_keeps_its_commands_and_terminal_sessions():
    sbx = Sandbox.create(template="minimal", resources=SMALL, timeout=120, recording=True)
    try:
        assert sbx.commands.run("echo recorded; echo oops >&2; exit 3").exit_code == 3
        with sbx.pty.create(cols=80, rows=24) as term:
            term.send("echo in-the-pty\n")
            out = b""
            while b"in-the-pty\r\n" not in out:
                chunk = term.recv(timeout=20)
                assert chunk is not None, out
                out += chunk
            term.resize(100, 30)
            term.send("exit\n")
            while term.recv(timeout=20) is not None:
                pass
    finally:
        sbx.kill()
    deadline = time.monotonic() + 30
    while True:
        recs = sbx.list_recordings()
        if sorted(r["kind"] for r in recs) == ["commands", "pty"]:
            break
        assert time.monotonic() < deadline, recs
        time.sleep(0.5)
    by_kind = {r["kind"]: r for r in recs}
    lines = [json.loads(l) for l in
             sbx.get_recording(by_kind["commands"]["recordingID"]).decode().splitlines()]
    starts = [l for l in lines if l.get("type") == "start"]
    assert any(l.get("cmd", "").startswith("echo recorded") for l in starts), lines
    assert any(l.get("type") == "exit" and l.get("exitCode") == 3 for l in lines), lines
    outputs = "".join(l.get("data", "") for l in lines if l.get("type") == "output")
    assert "recorded\n" in outputs and "oops\n" in outputs
    cast = sbx.get_recording(by_kind["pty"]["recordingID"]).decode().splitlines()
    header = json.loads(cast[0])
    assert header["version"] == 2 and header["width"] == 80
    events = [json.loads(l) for l in cast[1:]]
    assert ["r", "100x30"] in [e[1:] for e in events]
    assert any(e[1] == "o" and "in-the-pty" in e[2] for e in events)
    sbx.close()


async def test_the_async_sandbox_lists_recordings_too():
    sbx = await AsyncSandbox.create(template="minimal", resources=SMALL, timeout=120)
    try:
        assert await sbx.list_recordings() == []
    finally:
        await sbx.kill()
        await sbx.close()
