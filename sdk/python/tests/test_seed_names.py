"""The seed documents' names, checked without a stack: how each create parameter becomes
REST, the conflicts that are refused, and the async class's parity with the sync one."""

import inspect
from datetime import datetime, timedelta, timezone

import pytest

import nullspace
from nullspace import (AsyncSandbox, Sandbox, SandboxError, SandboxLifecycle,
                       SandboxNetworkOpts, SecurityPolicy)
from nullspace._core import create_body, fields_query, metrics_params


def body(**kw):
    return create_body(kw.pop("template", None), None, None, None, kw.pop("lifecycle", None),
                       kw.pop("resources", None), **kw)


def refused(**kw) -> str:
    with pytest.raises(SandboxError) as e:
        body(**kw)
    assert e.value.code == "invalid_request"
    return e.value.message


def test_network_names_become_the_egress_policy():
    assert body(allow_internet_access=False)["egress"] == {
        "internet": False, "allow": [], "deny": []}
    assert "egress" not in body(allow_internet_access=True)
    # network overrides allow_internet_access (seed 001).
    opened = body(allow_internet_access=False,
                  network=SandboxNetworkOpts(deny_out=["203.0.113.9"]))
    assert opened["egress"] == {"internet": True, "allow": [], "deny": ["203.0.113.9"]}
    closed = body(network={"allow_out": ["198.51.100.0/24", "api.example.com"],
                           "deny_out": ["0.0.0.0/0", "::/0"]})
    assert closed["egress"] == {"internet": False,
                                "allow": ["198.51.100.0/24", "api.example.com"], "deny": []}
    # Here deny wins; an allow inside a deny is refused, not silently blocked.
    assert "10.1.2.3" in refused(network={"allow_out": ["10.1.2.3"], "deny_out": ["10.0.0.0/8"]})
    assert "*.example.com" in refused(network={"allow_out": ["a.example.com"],
                                               "deny_out": ["*.example.com"]})
    assert "egress" in body(network={"allow_out": ["example.com"],
                                     "deny_out": ["*.example.com"]})
    assert "allow_out" in refused(network={"allow": ["1.2.3.4"]})
    assert "send one" in refused(network={"deny_out": []}, egress={"internet": False})
    assert "send one" in refused(allow_internet_access=False, egress={"internet": False})
    assert "list of strings" in refused(network={"allow_out": "1.2.3.4"})


def test_lifecycle_security_and_pool_names():
    assert body(on_timeout="pause", auto_resume=True)["lifecycle"] == {
        "onTimeout": "pause", "autoResume": True}
    assert body(lifecycle=SandboxLifecycle(on_timeout="hibernate"))["lifecycle"] == {
        "onTimeout": "hibernate"}
    assert body(lifecycle={"on_timeout": "pause"}, on_timeout="pause")["lifecycle"] == {
        "onTimeout": "pause"}
    assert "disagree" in refused(lifecycle={"on_timeout": "kill"}, on_timeout="pause")
    assert "'kill', 'pause' or 'hibernate'" in refused(on_timeout="sleep")
    assert "unknown keys" in refused(lifecycle={"on_timeout": "pause", "idle": 3})
    assert body(lifecycle={"on_timeout": "pause"}, idle_timeout=30)["lifecycle"] == {
        "onTimeout": "pause", "idleTimeout": 30}
    assert body(lifecycle=SandboxLifecycle(idle_timeout=30))["lifecycle"] == {"idleTimeout": 30}
    assert "disagree" in refused(lifecycle={"idle_timeout": 30}, idle_timeout=60)
    assert body(warm_pool_mode="require")["warmPool"] == "require"
    assert "disagree" in refused(warm_pool="prefer", warm_pool_mode="require")
    assert "'require' or 'prefer'" in refused(warm_pool_mode="always")
    assert "securityPolicy" not in body(secure=False)
    assert body(secure=True)["securityPolicy"] == {}
    masking = {"secrets": [{"name": "TOKEN", "hosts": ["api.example.com"]}]}
    assert body(security_policy=SecurityPolicy(pii={"detectors": {"email": "redact"}},
                                                env_masking=masking))["securityPolicy"] == {
        "pii": {"detectors": {"email": "redact"}}, "envMasking": masking}
    assert "send one" in refused(secure=False, security_policy={"audit": True})
    assert "env_masking must be a dict" in refused(
        security_policy=SecurityPolicy(env_masking=True))
    assert body(image_name="web", image_id="tpl-1")["imageName"] == "web"
    assert "templateID" not in body(snapshot_name="s", snapshot_id="snap-1")
    assert body(region="eu")["region"] == "eu"
    assert "start source" in refused(template="base", image_name="web")
    assert "image_name" in refused(image_id="tpl-1")
    assert body(wait_ready=False)["waitReady"] is False
    assert "waitReady" not in body()
    assert body(resources={"cpu": 1, "memory_mb": 512, "disk_mb": 1024})["resources"] == {
        "vcpus": 1, "memMiB": 512, "diskSizeMiB": 1024}


def test_fields_and_metric_times():
    assert fields_query(["id", "status"]) == "id,status"
    for bad in ([], "id", [""], [3]):
        with pytest.raises(SandboxError):
            fields_query(bad)
    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    naive = t.replace(tzinfo=None)
    assert metrics_params(t, naive + timedelta(seconds=0.5)) == {
        "start": int(t.timestamp()), "end": int(t.timestamp()) + 1}
    assert metrics_params(10.7, None) == {"start": 10}
    with pytest.raises(SandboxError):
        metrics_params("yesterday", None)


def _surface(cls) -> dict:
    """Public members → their parameter names (None for non-callables)."""
    out = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in ("__enter__", "__exit__"):
            continue
        if callable(member):
            out[name] = [p for p in inspect.signature(member).parameters if p != "self"]
        else:
            out[name] = None
    return out


ASYNC_ONLY = {"__aenter__", "__aexit__"}
SYNC_ONLY = {"__enter__", "__exit__"}


@pytest.mark.parametrize("sync, async_", [
    (nullspace.Sandbox, nullspace.AsyncSandbox),
    (nullspace.Commands, nullspace.AsyncCommands),
    (nullspace.CommandHandle, nullspace.AsyncCommandHandle),
    (nullspace.Filesystem, nullspace.AsyncFilesystem),
    (nullspace.Pty, nullspace.AsyncPty),
    (nullspace.PtyHandle, nullspace.AsyncPtyHandle),
    (nullspace.Snapshot, nullspace.AsyncSnapshot),
    (nullspace.Desktop, nullspace.AsyncDesktop),
])
def test_the_async_classes_have_every_call_of_the_sync_ones(sync, async_):
    s, a = _surface(sync), _surface(async_)
    missing = sorted(set(s) - set(a) - SYNC_ONLY)
    extra = sorted(set(a) - set(s) - ASYNC_ONLY)
    assert not missing, f"{async_.__name__} lacks {missing}"
    assert not extra, f"{async_.__name__} has {extra} that {sync.__name__} lacks"
    differ = {n: (s[n], a[n]) for n in s if n in a and s[n] != a[n]}
    assert not differ, f"parameters differ: {differ}"
    # The sub-modules too, by the attributes an instance sets.
    if sync is Sandbox:
        src_s = inspect.getsource(Sandbox.__init__)
        src_a = inspect.getsource(AsyncSandbox.__init__)
        for attr in ("self.commands", "self.files", "self.pty", "self.desktop"):
            assert attr in src_s and attr in src_a, attr


def test_create_takes_every_seed_001_and_004_parameter():
    seed = ["template", "timeout", "metadata", "envs", "secure", "allow_internet_access",
            "network", "security_policy", "resources", "lifecycle", "api_key", "domain",
            "request_timeout", "on_timeout", "auto_resume", "warm_pool_mode", "wait_ready",
            "idle_timeout", "image_name", "image_id", "snapshot_name", "snapshot_id", "region"]
    for cls in (Sandbox, AsyncSandbox):
        params = list(inspect.signature(cls.create).parameters)
        assert params[:13] == seed[:13], params  # seed 001's order, positionally
        assert set(seed) <= set(params)
        assert "fields" in inspect.signature(cls.list).parameters
        assert "fields" in inspect.signature(cls.get_info_by_id).parameters
