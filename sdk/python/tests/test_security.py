"""Seed 001's security proxy through the Python SDK against a live stack: a policy at
create, env masking seen from inside the guest, a TLS request the PII policy blocks and
the audit record it leaves (paged and iterated), a live policy change, and the async
class with the ``sandbox.audit`` and ``sandbox.security_policy_updated`` events.

The guest's TLS requests go to the test network's HTTP server (``curl -k``: the proxy
terminates TLS with the team CA); a blocked request never reaches it, and an allowed one
fails upstream (that server speaks no TLS), which the audit records as ``error``."""

import asyncio
import json
import time

import pytest

from nullspace import AsyncSandbox, AuditDetection, Sandbox, SandboxError, SecurityPolicy

SMALL = {"cpu": 1, "memory_mb": 512, "disk_mb": 1024}
SECRET = "sk-live-0123456789abcdef"
CARD = "4111 1111 1111 1111"


def post(url: str, payload: dict) -> str:
    """A guest command POSTing JSON over TLS to ``url``; prints the body and the status."""
    body = json.dumps(payload).replace("'", "")
    return (f"curl -sk -m 10 -X POST -H 'content-type: application/json' --data '{body}' "
            f"-w ' %{{http_code}}' {url} || echo FAIL")


def eventually(fetch, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fetch()
        if got:
            return got
        assert time.monotonic() < deadline, f"nothing within {timeout} s"
        time.sleep(0.5)


def test_policy_masking_audit_and_a_live_change(testnet):
    url = f"https://{testnet.addr(2)}:8080/pay?order=7"
    hosts = (testnet.addr(2), f"{testnet.addr(2)}:8080")
    policy = SecurityPolicy(
        pii={"detectors": {"card": "block", "email": "redact"}},
        env_masking={"secrets": [{"name": "OPENAI_API_KEY", "hosts": ["api.openai.com"]}]})
    sbx = Sandbox.create(template="base", resources=SMALL, timeout=180, security_policy=policy,
                         envs={"OPENAI_API_KEY": SECRET, "PLAIN": "visible"})
    try:
        sp = sbx.get_info().security_policy
        assert sp["pii"]["detectors"] == {"card": "block", "email": "redact"}
        (secret,) = sp["envMasking"]["secrets"]
        placeholder = secret["placeholder"]
        assert (secret["name"], secret["hosts"]) == ("OPENAI_API_KEY", ["api.openai.com"])
        assert len(placeholder) >= 16 and SECRET not in json.dumps(sp)
        # The guest only ever sees the placeholder; other variables are as given.
        out = sbx.commands.run("echo $OPENAI_API_KEY $PLAIN").stdout
        assert out == f"{placeholder} visible\n" and SECRET not in out

        # A card number in a request body: blocked by the proxy, kept in the audit.
        out = sbx.commands.run(post(url, {"card": CARD})).stdout
        assert out.endswith(" 403") and "blocked_by_policy" in out, out
        blocked = eventually(lambda: [r for r in sbx.audit() if r.action == "blocked"])
        r = blocked[-1]
        assert (r.method, r.path, r.status) == ("POST", "/pay?order=7", 403), r
        assert r.host in hosts, r
        assert AuditDetection("card", "requestBody", "block") in r.detections
        assert r.timestamp is not None and r.duration_ms >= 0

        # Pages of one record chain to what audit() iterates.
        all_records = list(sbx.audit())
        paged, after = [], 0
        while True:
            page = sbx.get_audit(after=after, limit=1)
            paged += page.records
            assert page.next == (page.records[-1].id if page.records else after)
            if not page.more:
                break
            after = page.next
        assert [p.id for p in paged] == [a.id for a in all_records]
        assert sbx.get_audit(after=all_records[-1].id).records == []

        # Live: cards are only logged now; the request leaves (and fails upstream).
        changed = dict(sp, pii={"detectors": {"card": "log"}})
        updated = sbx.set_security_policy(changed)
        assert updated.security_policy["pii"]["detectors"] == {"card": "log"}
        assert updated.security_policy["envMasking"]["secrets"][0]["placeholder"] == placeholder
        assert sbx.get_info().security_policy == updated.security_policy
        last = all_records[-1].id
        out = sbx.commands.run(post(url, {"card": CARD})).stdout
        assert "blocked_by_policy" not in out, out
        logged = eventually(lambda: list(sbx.audit(after=last)))
        assert logged[-1].action != "blocked", logged
        assert AuditDetection("card", "requestBody", "log") in logged[-1].detections

        # A secret not given at create cannot be added live.
        with pytest.raises(SandboxError) as e:
            sbx.set_security_policy({"envMasking": {"secrets": [
                {"name": "NEW_TOKEN", "hosts": ["api.example.com"]}]}})
        assert e.value.status == 400, e.value
        # What the SDK refuses itself never reaches the API.
        with pytest.raises(SandboxError) as e:
            sbx.set_security_policy({"transforms": {"host": "api.example.com"}})
        assert e.value.code == "invalid_request" and e.value.status == 0
    finally:
        sbx.kill()
        sbx.close()


def test_a_policy_the_api_refuses_says_what_to_send():
    with pytest.raises(SandboxError) as e:
        Sandbox.create(template="minimal", resources=SMALL,
                       security_policy={"pii": {"detectors": {"card": "shred"}}})
    assert e.value.status == 400 and "securityPolicy" in e.value.message, e.value
    # A masked secret needs its value in envs.
    with pytest.raises(SandboxError) as e:
        Sandbox.create(template="minimal", resources=SMALL, security_policy={
            "envMasking": {"secrets": [{"name": "TOKEN", "hosts": ["api.example.com"]}]}})
    assert e.value.status == 400, e.value
    assert "TOKEN" in e.value.message or "envVars" in e.value.message, e.value


async def test_the_async_sandbox_audits_and_streams_the_events(testnet):
    url = f"https://{testnet.addr(2)}:8080/contact"
    sbx = await AsyncSandbox.create(template="base", resources=SMALL, timeout=180,
                                    security_policy={"pii": {"detectors": {"email": "block"}}})
    try:
        events = sbx.stream_events()
        out = (await sbx.commands.run(post(url, {"to": "alice@example.com"}))).stdout
        assert out.endswith(" 403"), out

        async def seen(kind: str) -> dict:
            async for event in events:
                if event["type"] == kind:
                    return event["data"]
            raise AssertionError(f"the stream ended before {kind}")

        data = await asyncio.wait_for(seen("sandbox.audit"), 60)
        assert data["total"] >= 1 and 1 <= len(data["records"]) <= 20, data
        record = data["records"][-1]
        assert record["action"] == "blocked" and record["method"] == "POST", record
        assert {"kind": "email", "where": "requestBody", "action": "block"} in record[
            "detections"]

        records = [r async for r in sbx.audit()]
        assert records and records[-1].action == "blocked"
        page = await sbx.get_audit(after=0, limit=1000)
        assert [r.id for r in page.records] == [r.id for r in records]

        info = await sbx.set_security_policy(SecurityPolicy(
            pii={"detectors": {"email": "redact"}}, injection_defense={"action": "flag"}))
        assert info.security_policy["injectionDefense"] == {"action": "flag"}
        data = await asyncio.wait_for(seen("sandbox.security_policy_updated"), 60)
        assert data["securityPolicy"]["pii"]["detectors"] == {"email": "redact"}
        await events.aclose()
    finally:
        await sbx.kill()
        await sbx.close()
