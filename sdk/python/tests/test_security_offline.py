"""The security policy and the audit without a stack: how a policy becomes
``securityPolicy``, what the SDK refuses itself, and the REST calls and parsing of
``set_security_policy``, ``get_audit`` and ``audit`` (sync and async) against a fake
transport."""

import json
from datetime import datetime, timezone

import httpx
import pytest

from nullspace import (AsyncSandbox, AuditDetection, AuditPage, AuditRecord, Sandbox,
                       SandboxError, SandboxInfo, SecurityPolicy)
from nullspace._core import Config, create_body, parse_time

SBX = "sbx-0123456789abcdef0123"
POLICY_DOC = {
    "pii": {"detectors": {"card": "block", "email": "redact"}},
    "injectionDefense": {"action": "flag"},
    "transforms": [{"host": "*.example.com", "requestHeaders": {"set": {"x-team": "a"},
                                                                "remove": ["cookie"]},
                    "upstreamHost": "eu.example.com:8443"}],
    "audit": {"enabled": True},
    "envMasking": {"secrets": [{"name": "OPENAI_API_KEY", "hosts": ["api.openai.com"],
                                "placeholder": "nsk_OPENAI_API_KEY_0123456789abcdef"}]},
}


def record(i: int, **kw) -> dict:
    doc = {"id": i, "time": "2026-01-02T03:04:05.123456789Z", "method": "POST",
           "host": "api.example.com", "path": "/v1/x?y", "status": 403, "bytesIn": 12,
           "bytesOut": 34, "durationMs": 3,
           "detections": [{"kind": "card", "where": "requestBody", "action": "block"}],
           "action": "blocked"}
    doc.update(kw)
    return doc


def view(**extra) -> dict:
    return {"sandboxID": SBX, "templateID": "base", "state": "running", **extra}


def refused(call) -> str:
    with pytest.raises(SandboxError) as e:
        call()
    assert e.value.code == "invalid_request"
    return e.value.message


class FakeApi:
    """Answers the control-plane routes of one sandbox and remembers each request."""

    def __init__(self, records=()):
        self.records = list(records)
        self.requests = []
        self.policy = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.headers["X-API-Key"] == "ns_test"
        path = request.url.path
        if path == f"/api/v1/sandboxes/{SBX}/security-policy":
            assert request.method == "PUT"
            self.policy = json.loads(request.content)
            return httpx.Response(200, json=view(securityPolicy=self.policy))
        if path == f"/api/v1/sandboxes/{SBX}/audit":
            after = int(request.url.params.get("after", "0"))
            limit = int(request.url.params.get("limit", "100"))
            rest = [r for r in self.records if r["id"] > after]
            page = rest[:limit]
            return httpx.Response(200, json={
                "records": page, "next": page[-1]["id"] if page else after,
                "more": len(rest) > len(page)})
        return httpx.Response(404, json={"code": "not_found", "message": path})


def sync_sandbox(api: FakeApi) -> Sandbox:
    return Sandbox(SandboxInfo.parse(view()), Config("http://api.test", "ns_test"),
                   httpx.Client(transport=httpx.MockTransport(api)))


def async_sandbox(api: FakeApi) -> AsyncSandbox:
    return AsyncSandbox(SandboxInfo.parse(view()), Config("http://api.test", "ns_test"),
                        httpx.AsyncClient(transport=httpx.MockTransport(api)))


def test_the_policy_becomes_security_policy_with_the_rest_names():
    policy = SecurityPolicy(
        pii={"detectors": {"card": "block", "email": "redact"}},
        injection_defense={"action": "flag"}, transforms=POLICY_DOC["transforms"],
        audit=True, env_masking=POLICY_DOC["envMasking"])
    body = create_body(None, None, None, {"OPENAI_API_KEY": "sk-real-value"}, None, None,
                       security_policy=policy)
    assert body["securityPolicy"] == {**POLICY_DOC, "audit": {"enabled": True}}
    # The real value travels in envVars under the secret's name.
    assert body["envVars"] == {"OPENAI_API_KEY": "sk-real-value"}
    # A dict with the SDK's names or the REST ones (an info's security_policy) is the same.
    assert SecurityPolicy.body_of(POLICY_DOC) == POLICY_DOC
    assert SecurityPolicy.body_of({"injection_defense": {"action": "strip"},
                                   "audit": False}) == {
        "injectionDefense": {"action": "strip"}, "audit": {"enabled": False}}
    assert SecurityPolicy.body_of(SecurityPolicy()) == {}
    # secure=True alone: interception with the audit only; secure=False: nothing.
    assert create_body(None, None, None, None, None, None, secure=True)["securityPolicy"] == {}
    assert "securityPolicy" not in create_body(None, None, None, None, None, None,
                                               secure=False)


def test_what_the_sdk_refuses_itself():
    assert "unknown keys ['piii']" in refused(lambda: SecurityPolicy.body_of({"piii": {}}))
    assert "twice" in refused(lambda: SecurityPolicy.body_of(
        {"env_masking": {}, "envMasking": {}}))
    assert "transforms must be a list" in refused(lambda: SecurityPolicy.body_of(
        {"transforms": {"host": "a.example.com"}}))
    assert "pii must be a dict" in refused(lambda: SecurityPolicy.body_of(
        SecurityPolicy(pii=["email"])))
    assert "got NoneType" in refused(lambda: SecurityPolicy.body_of(None))
    sbx = sync_sandbox(FakeApi())
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": True}, {"after": -1},
                {"after": "3"}):
        message = refused(lambda: sbx.get_audit(**bad))
        assert ("1 to 1000" in message) if "limit" in bad else ("from 0" in message)
    assert "from 0" in refused(lambda: sbx.audit(after=-2))


def test_audit_records_parse_with_snake_case_names():
    page = AuditPage.parse({"records": [record(17)], "next": 17, "more": True})
    assert page.next == 17 and page.more is True
    r = page.records[0]
    assert isinstance(r, AuditRecord)
    assert (r.id, r.method, r.host, r.path, r.status, r.bytes_in, r.bytes_out,
            r.duration_ms, r.action) == (17, "POST", "api.example.com", "/v1/x?y", 403, 12,
                                         34, 3, "blocked")
    assert r.detections == [AuditDetection("card", "requestBody", "block")]
    assert r.timestamp == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
    empty = AuditPage.parse({"records": [], "next": 0, "more": False})
    assert (empty.records, empty.next, empty.more) == ([], 0, False)
    # Absent optional parts read as empty; a missing next is the last ID (or after).
    bare = AuditPage.parse({"records": [{"id": 4}]}, after=3)
    assert bare.next == 4 and bare.records[0].detections == []
    assert AuditPage.parse({"records": []}, after=9).next == 9
    assert parse_time("2026-01-02T03:04:05.5+01:00").microsecond == 500000


def test_sync_calls_send_the_contract_and_page_through():
    api = FakeApi([record(i, action="allowed", detections=[]) for i in range(1, 1206)])
    sbx = sync_sandbox(api)
    info = sbx.set_security_policy(SecurityPolicy(pii={"detectors": {"email": "log"}}))
    assert api.policy == {"pii": {"detectors": {"email": "log"}}}
    assert info.security_policy == api.policy and info.sandbox_id == SBX
    sbx.set_security_policy(info.security_policy)    # a described policy goes back as is
    assert api.requests[-1].method == "PUT"

    page = sbx.get_audit()
    req = api.requests[-1]
    assert (req.method, req.url.path) == ("GET", f"/api/v1/sandboxes/{SBX}/audit")
    assert dict(req.url.params) == {"after": "0", "limit": "100"}
    assert [r.id for r in page.records] == list(range(1, 101))
    assert (page.next, page.more) == (100, True)
    last = sbx.get_audit(after=1200, limit=10)
    assert [r.id for r in last.records] == [1201, 1202, 1203, 1204, 1205]
    assert (last.next, last.more) == (1205, False)
    assert sbx.get_audit(after=1205).next == 1205

    api.requests.clear()
    ids = [r.id for r in sbx.audit(after=3)]
    assert ids == list(range(4, 1206))
    assert [r.url.params["limit"] for r in api.requests] == ["1000", "1000"]
    assert [r.id for r in sbx.audit(after=1205)] == []
    sbx.close()


def test_a_sandbox_without_a_policy_has_an_empty_audit_and_no_policy():
    api = FakeApi()
    sbx = sync_sandbox(api)
    page = sbx.get_audit()
    assert (page.records, page.next, page.more) == ([], 0, False)
    assert list(sbx.audit()) == []
    assert SandboxInfo.parse(view()).security_policy is None
    assert SandboxInfo.parse(view(securityPolicy=POLICY_DOC)).security_policy == POLICY_DOC
    sbx.close()


async def test_the_async_calls_do_the_same():
    api = FakeApi([record(i) for i in range(1, 1502)])
    sbx = async_sandbox(api)
    info = await sbx.set_security_policy({"audit": True})
    assert api.policy == {"audit": {"enabled": True}} and info.security_policy == api.policy
    page = await sbx.get_audit(after=1500, limit=5)
    assert [r.id for r in page.records] == [1501] and page.more is False
    assert page.records[0].detections[0].kind == "card"
    ids = [r.id async for r in sbx.audit(after=1)]
    assert ids == list(range(2, 1502))
    with pytest.raises(SandboxError):
        await sbx.get_audit(limit=5000)
    with pytest.raises(SandboxError):
        sbx.audit(after=-1)
    await sbx.close()
