"""The seed documents' examples (seeds 001 and 004), as written there, against a live
stack: network options proven from inside the guest, fields dictionaries, wait_ready,
get_host, metrics with datetimes, Snapshot objects, and the async class doing the same."""

import asyncio
import time
from datetime import datetime, timedelta, timezone

import pytest

from nullspace import (AsyncSandbox, Sandbox, SandboxError, SandboxLifecycle, SandboxMetrics,
                       SandboxNetworkOpts, SecurityPolicy, Snapshot)

SMALL = {"cpu": 1, "memory_mb": 512, "disk_mb": 1024}


def fetch(sbx, url: str) -> str:
    return sbx.commands.run(f"curl -s -m 5 {url} || echo FAIL").stdout.strip()


def test_network_options_hold_inside_the_guest(testnet):
    closed = Sandbox.create(template="base", resources=SMALL, timeout=120,
                            allow_internet_access=False)
    try:
        # With internet on, the same guest would reach .2 (the second sandbox shows it).
        assert fetch(closed, testnet.url(2)) == "FAIL"
        assert closed.get_info().egress == {"internet": False, "allow": [], "deny": []}
        closed.set_egress(internet=True)
        assert fetch(closed, testnet.url(2)) == f"who:{testnet.addr(2)}"
    finally:
        closed.kill()
        closed.close()
    denied = Sandbox.create(template="base", resources=SMALL, timeout=120,
                            network=SandboxNetworkOpts(deny_out=[testnet.addr(3)]))
    try:
        assert fetch(denied, testnet.url(2)) == f"who:{testnet.addr(2)}"
        assert fetch(denied, testnet.url(3)) == "FAIL"
        # The seed's closed form: everything denied, one destination allowed.
        denied.set_egress(**{"internet": False, "allow": [testnet.addr(3)], "deny": []})
        assert fetch(denied, testnet.url(3)) == f"who:{testnet.addr(3)}"
        assert fetch(denied, testnet.url(2)) == "FAIL"
    finally:
        denied.kill()
        denied.close()


def test_seed_001_walkthrough():
    # secure=True turns the security proxy on (the audit only); the sandbox says so.
    for ask in ({"secure": True}, {"security_policy": SecurityPolicy(audit=True)}):
        secured = Sandbox.create(template="minimal", resources=SMALL, timeout=60, **ask)
        try:
            assert isinstance(secured.get_info().security_policy, dict)
            page = secured.get_audit()
            assert page.records == [] and page.more is False
        finally:
            secured.kill()
            secured.close()

    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    sbx = Sandbox.create(template="minimal", timeout=120, metadata={"seed": "001"},
                         envs={"SEED": "one"}, secure=False, resources=SMALL,
                         lifecycle=SandboxLifecycle(on_timeout="pause", auto_resume=True),
                         wait_ready=False)
    try:
        assert Sandbox.get_info_by_id(sbx.sandbox_id).state in ("starting", "running")
        sbx.wait_ready(timeout=120)
        assert sbx.is_running()
        assert sbx.commands.run("echo $SEED").stdout == "one\n"
        info = sbx.get_info()
        assert info.resources == {"vcpus": 1, "memMiB": 512, "diskSizeMiB": 1024}
        # secure=False: no security policy, an empty audit.
        assert info.security_policy is None
        page = sbx.get_audit()
        assert (page.records, page.next, page.more) == ([], 0, False)

        # fields= gives compact raw dictionaries with the seed's names.
        assert Sandbox.get_info_by_id(sbx.sandbox_id, fields=["id", "status"]) == {
            "id": sbx.sandbox_id, "status": "running"}
        page = Sandbox.list(query={"metadata": {"seed": "001"}}, fields=["id", "status"])
        assert page["sandboxes"] == [{"id": sbx.sandbox_id, "status": "running"}]
        with pytest.raises(SandboxError) as e:
            Sandbox.list(fields=["id", "nope"])
        assert e.value.code == "invalid_request" and "nope" in e.value.message

        host = sbx.get_host(3000)
        assert host.startswith(f"3000-{sbx.sandbox_id}.")
        with pytest.raises(SandboxError):
            sbx.get_host(0)

        # Metrics from the sandbox's creation by default; datetimes or Unix seconds.
        deadline = time.monotonic() + 30
        while len(sbx.get_metrics()) < 2:
            assert time.monotonic() < deadline, "no second sample within 30 s"
            time.sleep(1)
        samples = sbx.get_metrics(start=before, end=datetime.now(timezone.utc))
        assert samples and all(isinstance(m, SandboxMetrics) for m in samples)
        assert all(before <= m.timestamp for m in samples)
        assert samples[-1].mem_total > 0 and samples[-1].cpu_count == 1
        by_seconds = sbx.get_metrics(start=before.timestamp())
        assert by_seconds and by_seconds[0].timestamp == samples[0].timestamp
        assert sbx.get_metrics(start=datetime.now(timezone.utc) + timedelta(hours=1),
                               end=datetime.now(timezone.utc) + timedelta(hours=2)) == []

        # snapshot() is a Snapshot that restores and deletes itself.
        sbx.files.write("state.txt", "v1")
        snap = sbx.snapshot()
        assert isinstance(snap, Snapshot) and snap.kind == "manual" and snap.size > 0
        assert snap.id == snap.snapshot_id and before <= snap.created
        assert [s.id for s in sbx.list_snapshots()] == [snap.id]
        with snap.restore(timeout=60) as restored:
            assert restored.files.read("state.txt") == "v1"
            assert restored.kill()
        snap.delete()
        assert sbx.list_snapshots() == []
    finally:
        sbx.kill()
        sbx.close()


async def test_the_async_sandbox_does_what_the_sync_one_does(tmp_path):
    sbx = await AsyncSandbox.create(template="minimal", resources=SMALL, timeout=120,
                                    on_timeout="pause", wait_ready=False,
                                    metadata={"seed": "async"})
    try:
        await sbx.wait_ready(timeout=120)
        assert await AsyncSandbox.get_info_by_id(sbx.sandbox_id, fields=["status"]) == {
            "status": "running"}
        listed = await AsyncSandbox.list(query={"metadata": {"seed": "async"}},
                                         fields=["id", "status"])
        assert listed["sandboxes"] == [{"id": sbx.sandbox_id, "status": "running"}]
        assert (await sbx.get_host(8080)).startswith(f"8080-{sbx.sandbox_id}.")
        assert (await sbx.set_port_public(8080))["public"] is True

        blob = bytes(i % 251 for i in range(600_000))
        (tmp_path / "up.bin").write_bytes(blob)
        assert await sbx.files.upload(str(tmp_path / "up.bin"), "up.bin") == len(blob)
        assert (await sbx.files.get_info("up.bin")).size == len(blob)
        assert await sbx.files.download("up.bin", str(tmp_path / "down.bin")) == len(blob)
        assert (tmp_path / "down.bin").read_bytes() == blob

        changes = []

        async def watch():
            async for change in sbx.files.watch_dir("/workspace", timeout=30):
                changes.append(change)
                if change["type"] == "write":
                    return
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(1)
        await sbx.commands.run("echo hi > /workspace/watched")
        await asyncio.wait_for(watcher, 30)
        assert {"type": "write", "path": "/workspace/watched", "dir": False} in changes

        handle = await sbx.commands.run("sleep 0.5; echo late", background=True)
        assert (await sbx.commands.connect(handle.pid).wait()).stdout == "late\n"

        async with await sbx.pty.create(cols=80, rows=24) as term:
            out = b""
            await term.send("echo apy-$((6*7)); exit 5\n")
            while True:
                chunk = await term.recv(timeout=20)
                if chunk is None:
                    break
                out += chunk
            assert b"apy-42" in out and term.exit_code == 5

        samples = await sbx.get_metrics(start=datetime.now(timezone.utc) - timedelta(hours=1))
        assert samples and isinstance(samples[0], SandboxMetrics)

        events = sbx.stream_events()
        first = await events.__anext__()
        assert (first["id"], first["type"]) == (1, "sandbox.created")
        await sbx.pause()
        async for e in events:
            if e["type"] == "sandbox.paused":
                break
        await events.aclose()
    finally:
        await sbx.kill()
        await sbx.close()
