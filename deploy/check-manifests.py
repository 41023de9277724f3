"""Checks the deployment manifests offline (run by deploy/check-manifests.sh, which
installs what this imports and renders what it reads).

- Spin: api-component/spin.toml and deploy/k8s/spin.toml, TOML read as JSON, against
  deploy/schemas/spin-manifest-v2.schema.json; their upstream variable and the
  component's NULLSPACE_UPSTREAM agree; the route and the source are the component's.
- Kubernetes: every object kustomize rendered, against the Kubernetes OpenAPI schemas
  kubernetes-validate bundles (strict: unknown fields fail), the SpinApp and
  SpinAppExecutor against deploy/schemas/spinkube-v1alpha1.schema.json; then what the
  deployment needs: the pool manager's DaemonSet (privileged, host network, /dev/kvm,
  /dev/net/tun, host ID from the node name, preStop drain within the grace period),
  Services that select pods, references to Secrets and ConfigMaps that exist, the
  Ingress's hosts and backends, the SpinApp's upstream. Renderings of one overlay by
  different kustomize versions must be the same objects.
- Nomad: each job file parses (python-hcl2), names only binaries the workspace builds
  (or the listed outside ones), and what each job needs (system job, raw_exec, a
  kill_timeout above the drain wait, services with health checks, wasmtime serve with
  -Scli and --env NULLSPACE_UPSTREAM).
- systemd: the rendered units' keys (hardening, ordering, restart, stop), beside
  systemd-analyze verify (in the shell script).
- Every command line above that runs a workspace binary (or wasmtime) uses only flags
  that binary's --help lists.
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import hcl2
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import latest_version

ROOT = Path(__file__).resolve().parent.parent
FAILURES: list[str] = []
PASSED = 0
VERBOSE = False


def check(ok: bool, what: str) -> bool:
    """Records one check; prints it."""
    global PASSED
    if ok:
        PASSED += 1
        if VERBOSE:
            print(f"  ✓ {what}")
    else:
        FAILURES.append(what)
        print(f"  ✗ {what}")
    return ok


_SECTION = {"name": None, "start": 0}


def section(name: str | None) -> None:
    """Closes the section before (its count of checks passed) and opens `name`."""
    if _SECTION["name"] is not None:
        print(f"[check-manifests] {_SECTION['name']}: {PASSED - _SECTION['start']} checks passed")
    _SECTION.update(name=name, start=PASSED)


def schema_errors(schema: dict, doc) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]


# Command lines (binary, argv) found in the manifests, for the --help check.
INVOCATIONS: list[tuple[str, str, list[str]]] = []


def note_invocation(where: str, argv: list[str]) -> None:
    name = Path(argv[0]).name
    if name.startswith("nullspace-") or name == "wasmtime":
        INVOCATIONS.append((where, name, argv[1:]))


# ---------------------------------------------------------------- Spin


def check_spin(schema: dict, path: Path) -> dict:
    rel = path.relative_to(ROOT)
    manifest = tomllib.loads(path.read_text())
    errors = schema_errors(schema, json.loads(json.dumps(manifest)))
    check(not errors, f"{rel}: valid against the Spin manifest v2 schema" + "".join(f"\n      {e}" for e in errors))
    if errors:
        return manifest
    triggers = manifest["trigger"].get("http", [])
    check(
        [t["route"] for t in triggers] == ["/api/v1/...", "/dashboard/..."],
        f"{rel}: two HTTP triggers, /api/v1/... and /dashboard/... (the dashboard the component serves)",
    )
    components = manifest.get("component", {})
    for t in triggers:
        check(t.get("component") in components, f"{rel}: the trigger's component {t.get('component')!r} is defined")
    variables = manifest.get("variables", {})
    for cid, comp in components.items():
        check(
            str(comp["source"]).endswith("/nullspace-api.wasm"),
            f"{rel}: component {cid}'s source is the built component ({comp['source']})",
        )
        hosts = comp.get("allowed_outbound_hosts", [])
        check(hosts == ["{{ upstream }}"], f"{rel}: component {cid} may reach only the upstream variable")
        for expr in re.findall(r"\{\{\s*([a-z0-9_]+)\s*\}\}", json.dumps(comp)):
            check(expr in variables, f"{rel}: variable {expr!r} used by {cid} is declared")
        env = comp.get("environment", {}).get("NULLSPACE_UPSTREAM")
        default = variables.get("upstream", {}).get("default")
        check(
            env is not None and env == default,
            f"{rel}: NULLSPACE_UPSTREAM ({env}) and the upstream variable's default ({default}) agree",
        )
    return manifest


# ---------------------------------------------------------------- Kubernetes

K8S_VERSIONS = ["1.30.0", latest_version()]


def normalized(obj):
    """An object without what kustomize versions differ on and the API server drops
    (empty annotation maps)."""
    if isinstance(obj, dict):
        return {k: normalized(v) for k, v in obj.items() if not (k == "annotations" and v == {})}
    if isinstance(obj, list):
        return [normalized(v) for v in obj]
    return obj


def flag_value(argv: list[str], flag: str):
    """The value after `flag` in argv; None if it is not there."""
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def container_argv(c: dict) -> list[str]:
    return list(c.get("command", [])) + list(c.get("args", []))


def shell_invocations(script: str) -> list[list[str]]:
    """The workspace binaries' command lines in a shell script: continuation lines
    joined, each command cut at the first shell operator. A variable set to a path
    (`pm=/usr/local/bin/nullspace-pool-manager`) stands for that binary."""
    script = re.sub(r"\\\n\s*", " ", script)
    aliases: dict[str, str] = {}
    found = []
    for line in script.splitlines():
        m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=(\S*nullspace-[a-z-]+)\s*$", line)
        if m:
            aliases[m.group(1)] = m.group(2)
            continue
        for part in re.split(r"\|\||&&|;|\||&(?!\d)", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            for i, w in enumerate(words):
                w = re.sub(r"^\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?$", lambda m: aliases.get(m.group(1), m.group(0)), w)
                name = Path(w).name
                if name in ("nullspace-pool-manager", "nullspace-api", "wasmtime") and (i == 0 or words[i - 1] == "exec"):
                    found.append([w] + words[i + 1 :])
                    break
    return found


def check_k8s(label: str, path: Path, spinkube_schema: dict, k8s_spin: dict) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if VERBOSE:
        print(f"  ({label}: {len(docs)} objects)")
    for d in docs:
        kn = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if d.get("apiVersion", "").startswith("core.spinkube.dev/"):
            errors = schema_errors(spinkube_schema, d)
            check(not errors, f"{label}: {kn} valid against SpinKube's v1alpha1 schema" + "".join(f"\n      {e}" for e in errors[:5]))
            continue
        for v in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, v, strict=True)
                check(True, f"{label}: {kn} valid against Kubernetes {v} (strict)")
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                check(False, f"{label}: {kn} against Kubernetes {v}: {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                check(False, f"{label}: {kn}: {e.message}")
    check(all(d["metadata"].get("namespace") == "nullspace" for d in docs if d["kind"] != "Namespace"),
          f"{label}: every namespaced object is in the namespace nullspace")

    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    kinds = sorted({d["kind"] for d in docs})
    for need in ["Namespace", "StatefulSet", "DaemonSet", "Service", "Job", "SpinApp", "SpinAppExecutor", "Ingress", "Secret", "ConfigMap"]:
        check(need in kinds, f"{label}: has a {need}")

    # Secrets and ConfigMaps that pods and the SpinApp refer to exist, with the key.
    def refs(obj, out):
        if isinstance(obj, dict):
            for kind, key in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if kind in obj:
                    out.append((key, obj[kind]["name"], obj[kind]["key"]))
            for v in obj.values():
                refs(v, out)
        elif isinstance(obj, list):
            for v in obj:
                refs(v, out)
        return out

    for kind, name, key in sorted(set(refs(docs, []))):
        target = by.get((kind, name))
        data = {} if target is None else {**target.get("data", {}), **target.get("stringData", {})}
        check(key in data, f"{label}: {kind} {name} has the key {key} that is referred to")

    # Services select some workload's pods, on ports those pods name.
    pods = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            pods.append((d, d["spec"]["template"]["metadata"].get("labels", {}), d["spec"]["template"]["spec"]))
    for d in docs:
        if d["kind"] != "Service":
            continue
        sel = d["spec"].get("selector", {})
        matches = [(w, spec) for w, labels, spec in pods if sel and all(labels.get(k) == v for k, v in sel.items())]
        check(bool(matches), f"{label}: Service {d['metadata']['name']} selects the pods of {', '.join(w['metadata']['name'] for w, _ in matches) or 'nothing'}")
        names = {p.get("name") for _, spec in matches for c in spec["containers"] for p in c.get("ports", [])}
        for p in d["spec"]["ports"]:
            t = p.get("targetPort", p["port"])
            check(isinstance(t, int) or t in names, f"{label}: Service {d['metadata']['name']} port {p['port']} → {t}, a port its pods name")

    # The pool manager's DaemonSet.
    ds = by.get(("DaemonSet", "nullspace-pool-manager"))
    if check(ds is not None, f"{label}: DaemonSet nullspace-pool-manager"):
        spec = ds["spec"]["template"]["spec"]
        c = spec["containers"][0]
        argv = container_argv(c)
        note_invocation(f"{label} DaemonSet", argv)
        for ic in spec.get("initContainers", []):
            for inv in shell_invocations(" ".join(container_argv(ic)[2:])) if container_argv(ic)[:2] == ["/bin/sh", "-c"] else [container_argv(ic)]:
                note_invocation(f"{label} DaemonSet init {ic['name']}", inv)
        check(spec.get("hostNetwork") is True, f"{label}: the pool manager is on the host's network")
        check(spec.get("dnsPolicy") == "ClusterFirstWithHostNet", f"{label}: ... and resolves cluster Services (ClusterFirstWithHostNet)")
        check(c.get("securityContext", {}).get("privileged") is True, f"{label}: the pool manager is privileged")
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        for dev in ("/dev/kvm", "/dev/net/tun"):
            v = vols.get(mounts.get(dev, ""), {})
            check(v.get("hostPath", {}).get("path") == dev and v["hostPath"].get("type") == "CharDevice",
                  f"{label}: {dev} from the host (a CharDevice hostPath)")
        state = flag_value(argv, "--state-dir")
        v = vols.get(mounts.get(state, ""), {})
        check(state is not None and "hostPath" in v, f"{label}: the state directory {state} is the host's")
        env = {e["name"]: e for e in c.get("env", [])}
        node = env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        check(node == "spec.nodeName" and flag_value(argv, "--host-id") == "$(NODE_NAME)",
              f"{label}: --host-id is the node's name (downward API)")
        for e in env.values():
            for ref in re.findall(r"\$\(([A-Z_]+)\)", e.get("value", "")):
                check(ref in env and list(env).index(ref) < list(env).index(e["name"]),
                      f"{label}: env {e['name']} uses $({ref}), defined before it")
        for a in argv:
            for ref in re.findall(r"\$\(([A-Z_]+)\)", a):
                check(ref in env, f"{label}: argument {a} uses $({ref}), which the container defines")
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        drains = shell_invocations(" ".join(pre[2:])) if pre[:2] == ["/bin/sh", "-c"] else [pre]
        drain = next((d for d in drains if d[1:4] == ["admin", "host", "drain"]), None)
        if check(drain is not None and "--wait-s" in drain, f"{label}: preStop drains the host and waits (admin host drain --wait-s)"):
            note_invocation(f"{label} preStop", drain)
            wait = int(flag_value(drain, "--wait-s"))
            grace = spec.get("terminationGracePeriodSeconds", 30)
            check(grace >= wait + 30, f"{label}: terminationGracePeriodSeconds {grace} ≥ the drain's {wait} s + 30 s for the daemon's stop")
        check(ds["spec"].get("updateStrategy", {}).get("type") == "OnDelete", f"{label}: pool managers are replaced host by host, by hand (OnDelete)")
        check(flag_value(argv, "--on-exit") == "end", f"{label}: --on-exit end (a pod's VMs cannot outlive it)")

    job = by.get(("Job", "nullspace-migrate"))
    if check(job is not None, f"{label}: the migration Job"):
        container = job["spec"]["template"]["spec"]["containers"][0]
        argv = container_argv(container)
        note_invocation(f"{label} Job", argv)
        envs = {e.get("name") for e in container.get("env", [])}
        # The catalog URL carries its password: from the environment, never argv (/proc).
        check(
            argv[1:2] == ["migrate"] and "--catalog" not in argv and "NULLSPACE_CATALOG" in envs,
            f"{label}: the Job runs migrate on the catalog (NULLSPACE_CATALOG, not in argv)",
        )

    for name in ("nullspace-control", "nullspace-edge"):
        check(("Service", name) in by, f"{label}: Service {name}")

    app = by.get(("SpinApp", "nullspace-api"))
    if check(app is not None, f"{label}: SpinApp nullspace-api"):
        ex = by.get(("SpinAppExecutor", app["spec"]["executor"]))
        check(ex is not None and ex["spec"].get("deploymentConfig", {}).get("runtimeClassName") == "wasmtime-spin-v2",
              f"{label}: its executor {app['spec']['executor']} runs it with the Spin shim's runtime class (wasmtime-spin-v2)")
        variables = {v["name"]: v.get("value") for v in app["spec"].get("variables", [])}
        upstream = variables.get("upstream", "")
        env = k8s_spin["component"]["nullspace-api"]["environment"]["NULLSPACE_UPSTREAM"]
        check(upstream == env, f"{label}: the SpinApp's upstream ({upstream}) is deploy/k8s/spin.toml's NULLSPACE_UPSTREAM")
        m = re.match(r"^http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)$", upstream)
        svc = by.get(("Service", m.group(1))) if m else None
        check(svc is not None and m.group(2) == svc["metadata"]["namespace"] and int(m.group(3)) in [p["port"] for p in svc["spec"]["ports"]],
              f"{label}: the upstream is the control Service's name, namespace and port")
        check(app["spec"].get("checks", {}).get("readiness", {}).get("httpGet", {}).get("path") == "/api/v1/health",
              f"{label}: the SpinApp is ready when /api/v1/health answers")

    ing = by.get(("Ingress", "nullspace"))
    if check(ing is not None, f"{label}: Ingress nullspace"):
        cm = by.get(("ConfigMap", "nullspace-config"), {}).get("data", {})
        hosts = {r["host"]: r for r in ing["spec"]["rules"]}
        check(f"*.{cm.get('preview-domain')}" in hosts, f"{label}: the Ingress routes the preview domain's wildcard *.{cm.get('preview-domain')}")
        check(any(not h.startswith("*") for h in hosts), f"{label}: the Ingress has the API's host")
        for h, r in hosts.items():
            for p in r["http"]["paths"]:
                b = p["backend"]["service"]
                name, port = b["name"], b["port"]["number"]
                if name == "nullspace-api":
                    ok = app is not None  # the spin-operator makes this Service (port 80)
                    check(ok and port == 80 and p["path"] in ("/api/v1", "/dashboard"), f"{label}: {h}{p['path']} → the SpinApp's Service nullspace-api:80")
                else:
                    svc = by.get(("Service", name))
                    check(svc is not None and port in [x["port"] for x in svc["spec"]["ports"]], f"{label}: {h}{p['path']} → Service {name}:{port}")
    return docs


# ---------------------------------------------------------------- Nomad


def unquote(v):
    """A value as python-hcl2 gives it, without HCL's quoting: strings lose their
    quotes, heredocs their markers and (<<-) their common indentation."""
    if isinstance(v, list):
        return [unquote(x) for x in v]
    if isinstance(v, dict):
        return {unquote(k): unquote(x) for k, x in v.items() if k != "__is_block__"}
    if not isinstance(v, str):
        return v
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        inner = v[1:-1]
        m = re.match(r"^<<(-?)([A-Z]+)\n(.*)\n\s*\2$", inner, re.S)
        if m:
            lines = m.group(3).split("\n")
            if m.group(1):
                indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
                lines = [line[indent:] for line in lines]
            return "\n".join(lines) + "\n"
        return json.loads(v) if "\\" in v else inner
    return v


def blocks(d: dict, key: str) -> list:
    return d.get(key, []) if isinstance(d.get(key), list) else []


def duration_s(s: str) -> int:
    total = 0
    for n, unit in re.findall(r"(\d+)([smh])", s):
        total += int(n) * {"s": 1, "m": 60, "h": 3600}[unit]
    return total


def interpolate(s: str, variables: dict) -> str:
    return re.sub(r"\$\{var\.([a-z_]+)\}", lambda m: str(variables.get(m.group(1), m.group(0))), s)


def check_nomad(path: Path, binaries: set[str]) -> None:
    rel = path.relative_to(ROOT)
    try:
        with path.open() as f:
            raw = hcl2.load(f)
    except Exception as e:  # the parser's own error names the line
        check(False, f"{rel}: parses as HCL: {e}")
        return
    check(True, f"{rel}: parses as HCL (python-hcl2)")
    doc = unquote(raw)
    variables = {}
    for v in doc.get("variable", []):
        for name, body in v.items():
            if "default" in body:
                variables[name] = body["default"]
    jobs = doc.get("job", [])
    check(len(jobs) == 1, f"{rel}: one job")
    for job in jobs:
        for jname, j in job.items():
            outside = {"sh": "/bin/sh runs the drain-on-stop wrapper", "wasmtime": "stock wasmtime (deploy/install-wasmtime-cli.sh)"}
            for group in j.get("group", []):
                for gname, g in group.items():
                    services = blocks(g, "service")
                    check(bool(services), f"{rel}: group {gname} registers a service")
                    for s in services:
                        checks_ = blocks(s, "check")
                        check(bool(checks_) and all(c.get("type") in ("http", "tcp") and "interval" in c for c in checks_),
                              f"{rel}: service {s.get('name')} has a health check")
                    for task in g.get("task", []):
                        for tname, t in task.items():
                            driver = t.get("driver")
                            cfg = blocks(t, "config")[0] if blocks(t, "config") else {}
                            if driver in ("raw_exec", "exec"):
                                cmd = interpolate(str(cfg.get("command", "")), variables)
                                args = [interpolate(str(a), variables) for a in cfg.get("args", [])]
                                name = Path(cmd).name
                                check(name in binaries or name in outside,
                                      f"{rel}: task {tname} runs {cmd}: " + (f"a binary this workspace builds" if name in binaries else outside.get(name, "NOT one the workspace builds")))
                                argvs = shell_invocations(args[1]) if name == "sh" and args[:1] == ["-c"] else [[cmd] + args]
                                for argv in argvs:
                                    named = Path(argv[0]).name
                                    check(named in binaries or named in outside, f"{rel}: task {tname} calls {named}")
                                    note_invocation(f"{rel} {tname}", argv)
                                for word in sorted(set(re.findall(r"/(nullspace-[a-z-]+)(?![a-z.-])", " ".join([cmd] + args)))):
                                    check(word in binaries, f"{rel}: task {tname} names {word}, a binary the workspace builds")
                            elif driver == "docker":
                                check(bool(cfg.get("image")), f"{rel}: task {tname} runs the image {cfg.get('image')}")
                            else:
                                check(False, f"{rel}: task {tname}: driver {driver} is none this project uses")
                            if jname == "nullspace-pool-manager":
                                check(j.get("type") == "system", f"{rel}: a system job (one pool manager per client)")
                                check(driver == "raw_exec", f"{rel}: raw_exec (the daemon runs as root)")
                                script = interpolate(cfg.get("args", ["", ""])[1], variables)
                                argvs = shell_invocations(script)
                                drain = next((a for a in argvs if a[1:4] == ["admin", "host", "drain"]), None)
                                serve = next((a for a in argvs if a[1:2] == ["serve"]), None)
                                check(drain is not None and "--wait-s" in drain and "trap" in script,
                                      f"{rel}: a stop drains the host first (trap → admin host drain --wait-s)")
                                wait = int(variables.get("drain_wait_s", 0))
                                kill = duration_s(t.get("kill_timeout", "5s"))
                                check(kill >= wait + 30, f"{rel}: kill_timeout {kill} s ≥ the drain's {wait} s + 30 s")
                                check(serve is not None and flag_value(serve, "--on-exit") == "end",
                                      f"{rel}: serve --on-exit end (a stopped task's VMs end)")
                            if jname == "nullspace-api":
                                args = [interpolate(str(a), variables) for a in cfg.get("args", [])]
                                check(args[:2] == ["serve", "-Scli"] and str(flag_value(args, "--env")).startswith("NULLSPACE_UPSTREAM=http://"),
                                      f"{rel}: wasmtime serve -Scli --env NULLSPACE_UPSTREAM=... (the component's upstream at run time)")
                                check(args[-1].endswith("nullspace-api.wasm"), f"{rel}: serves the API component")


# ---------------------------------------------------------------- systemd


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections, each a list of (key, value) (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        elif current is not None and "=" in line:
            k, v = line.split("=", 1)
            current.append((k.strip(), v.strip()))
    return sections


def systemd_expand(line: str, env: dict[str, str]) -> list[str]:
    """An Exec line as systemd runs it (the subset our units use): words split on
    whitespace outside quotes, ${NAME} replaced in place, $$ a literal $."""
    words = shlex.split(line)
    out = []
    for w in words:
        w = re.sub(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), w)
        out.append(w.replace("$$", "$"))
    return out


def check_units(units: Path) -> None:
    pm = read_unit(units / "nullspace-pool-manager.service")
    api = read_unit(units / "nullspace-api.service")
    sw = read_unit(units / "nullspace-seaweedfs.service")
    for name, u in (("pool manager", pm), ("API", api), ("SeaweedFS", sw)):
        svc = dict(u.get("Service", []))
        check(svc.get("Restart") == "on-failure", f"systemd {name}: Restart=on-failure")
        for key, want in (("ProtectSystem", None), ("ProtectHome", "yes"), ("PrivateTmp", "yes")):
            check(key in svc and (want is None or svc[key] == want), f"systemd {name}: {key}={svc.get(key)}")
        check(dict(u.get("Install", [])).get("WantedBy") == "multi-user.target", f"systemd {name}: started on boot (WantedBy=multi-user.target)")
    svc = pm["Service"]
    d = dict(svc)
    check(d.get("ProtectSystem") == "full", "systemd pool manager: ProtectSystem=full (not strict: QEMU's state, cache and run directories, /run/netns)")
    check("PrivateDevices" not in d and "DevicePolicy" not in d and "DeviceAllow" not in d, "systemd pool manager: no device restrictions (/dev/kvm, /dev/net/tun)")
    check(d.get("KillMode") == "process", "systemd pool manager: KillMode=process (the daemon ends or keeps its VMs, as NULLSPACE_ON_EXIT says)")
    env = dict(v.split("=", 1) for k, v in svc if k == "Environment")
    check(env.get("NULLSPACE_ON_EXIT") in ("keep", "end"), f"systemd pool manager: NULLSPACE_ON_EXIT defaults to {env.get('NULLSPACE_ON_EXIT')}")
    start = systemd_expand(d["ExecStart"], env)
    note_invocation("systemd pool manager ExecStart", start)
    check(start[1:2] == ["serve"] and flag_value(start, "--on-exit") == env.get("NULLSPACE_ON_EXIT"), "systemd pool manager: serve --on-exit ${NULLSPACE_ON_EXIT}")
    stop = systemd_expand(d["ExecStop"], env)
    drains = shell_invocations(stop[2]) if stop[:2] == ["/bin/sh", "-c"] else []
    drain = next((a for a in drains if a[1:4] == ["admin", "host", "drain"]), None)
    if check(drain is not None and "--wait-s" in drain, "systemd pool manager: ExecStop drains the host when NULLSPACE_DRAIN_ON_STOP=yes"):
        note_invocation("systemd pool manager ExecStop", [a.replace('"$NULLSPACE_DRAIN_WAIT_S"', "600") for a in drain])
    timeout = duration_s(d.get("TimeoutStopSec", "90s").replace("min", "m"))
    check(timeout >= int(env.get("NULLSPACE_DRAIN_WAIT_S", "0")) + 60, f"systemd pool manager: TimeoutStopSec ({timeout} s) covers the drain ({env.get('NULLSPACE_DRAIN_WAIT_S')} s) and the stop")
    a = api["Service"]
    aenv = dict(v.split("=", 1) for k, v in a if k == "Environment")
    note_invocation("systemd API ExecStart", systemd_expand(dict(a)["ExecStart"], aenv))
    after = " ".join(v for k, v in api["Unit"] if k == "After").split()
    check("nullspace-pool-manager.service" in after, "systemd API: After=nullspace-pool-manager.service (starts after it, stops before it)")
    pm_listen, api_upstream = env.get("NULLSPACE_LISTEN"), aenv.get("NULLSPACE_POOL_MANAGER")
    check(api_upstream == f"http://{pm_listen}", f"systemd: the API's default pool manager ({api_upstream}) is where the pool manager listens ({pm_listen})")
    check(dict(a).get("DynamicUser") == "yes", "systemd API: runs as a user of its own (DynamicUser=yes)")
    before = " ".join(v for k, v in sw["Unit"] if k == "Before").split()
    check("nullspace-pool-manager.service" in before, "systemd SeaweedFS: Before=nullspace-pool-manager.service")


# ---------------------------------------------------------------- flags


def help_flags(binary: Path, path: list[str]) -> set[str] | None:
    try:
        out = subprocess.run([str(binary), *path, "--help"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    if out.returncode != 0:
        return None
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][A-Za-z0-9-]*)", out.stdout + out.stderr))


SUBCOMMANDS = {"serve", "check", "migrate", "admin", "host", "team", "key", "drain", "undrain", "list", "create", "quota", "revoke", "rotate"}


def check_wasmtime(where: str, binary: Path, args: list[str]) -> None:
    """wasmtime answers no `serve --help` (its parser takes the module's own arguments
    after it): parse the same command line with a component that does not exist, which
    it reports only once every flag parsed. Nomad's run-time values get stand-ins."""
    argv = [re.sub(r"\$\{NOMAD_ADDR_[a-z]+\}", "127.0.0.1:0", a) for a in args[:-1]]
    argv = [re.sub(r"\$\{[^}]+\}", "127.0.0.1", a) for a in argv] + ["/nonexistent/nullspace-check.wasm"]
    out = subprocess.run([str(binary), *argv], capture_output=True, text=True, timeout=30)
    text = (out.stdout + out.stderr).strip()
    check("failed to open wasm module" in text,
          f"{where}: wasmtime {' '.join(args[:-1])} parses (wasmtime {' '.join(argv)}: {text.splitlines()[0] if text else out.returncode})")


def check_flags(bin_dir: Path, wasmtime: Path | None) -> None:
    cache: dict[tuple, set[str] | None] = {}
    for where, name, args in INVOCATIONS:
        binary = wasmtime if name == "wasmtime" else bin_dir / name
        if binary is None or not binary.exists():
            check(False, f"{where}: {name} to check its flags against (not at {binary})")
            continue
        if name == "wasmtime":
            check_wasmtime(where, binary, args)
            continue
        path = []
        for a in args:
            if a.startswith("-") or (name == "nullspace-pool-manager" and a not in SUBCOMMANDS) or (name == "wasmtime" and path):
                break
            path.append(a)
        key = (name, tuple(path))
        if key not in cache:
            cache[key] = help_flags(binary, path)
        known = cache[key]
        shown = " ".join([name, *path])
        if not check(known is not None, f"{where}: {shown} --help answers"):
            continue
        used = sorted({a.split("=", 1)[0] for a in args if a.startswith("-") and not re.match(r"^-\d", a)})
        for flag in used:
            check(flag in known, f"{where}: {shown} takes {flag}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin-dir", type=Path, required=True)
    p.add_argument("--wasmtime", type=Path)
    p.add_argument("--units", type=Path, required=True, help="the units as deploy/install-systemd.sh --render writes them")
    p.add_argument("--rendered", action="append", default=[], metavar="OVERLAY:RENDERER=FILE",
                   help="kustomize's output for an overlay, by one renderer (repeatable)")
    p.add_argument("--verbose", action="store_true", help="print every check, not only the failed ones")
    a = p.parse_args()
    global VERBOSE
    VERBOSE = a.verbose

    binaries = set()
    for cargo in ROOT.glob("*/Cargo.toml"):
        text = cargo.read_text()
        binaries |= set(re.findall(r'\[\[bin\]\]\s*\nname\s*=\s*"([^"]+)"', text))
    print(f"[check-manifests] binaries the workspace builds: {', '.join(sorted(binaries))}")

    section("Spin manifests")
    spin_schema = json.loads((ROOT / "deploy/schemas/spin-manifest-v2.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(spin_schema)
    check_spin(spin_schema, ROOT / "api-component/spin.toml")
    k8s_spin = check_spin(spin_schema, ROOT / "deploy/k8s/spin.toml")

    section(f"Kubernetes (kubernetes-validate {kubernetes_validate.__version__}, schemas {', '.join(K8S_VERSIONS)})")
    spinkube_schema = json.loads((ROOT / "deploy/schemas/spinkube-v1alpha1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(spinkube_schema)
    renderings: dict[str, list[tuple[str, list[dict]]]] = {}
    for spec in a.rendered:
        label, file = spec.split("=", 1)
        overlay = label.split(":")[0]
        renderings.setdefault(overlay, []).append((label, check_k8s(label, Path(file), spinkube_schema, k8s_spin)))
    check(set(renderings) >= {"base", "dev"}, "both the base and the dev overlay were rendered")
    for overlay, rs in renderings.items():
        first_label, first = rs[0]
        for label, docs in rs[1:]:
            key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
            same = sorted(map(json.dumps, map(normalized, sorted(first, key=key)))) == sorted(map(json.dumps, map(normalized, sorted(docs, key=key))))
            check(same, f"{overlay}: {label} renders the same objects as {first_label}")

    section(f"Nomad (python-hcl2 {getattr(hcl2, '__version__', '')})".replace(" )", ")"))
    for f in sorted((ROOT / "deploy/nomad").glob("*.nomad.hcl")):
        check_nomad(f, binaries)

    section("systemd units")
    check_units(a.units)

    section(f"flags against --help ({a.bin_dir})")
    check_flags(a.bin_dir, a.wasmtime)

    section(None)
    print(f"[check-manifests] {'✗' if FAILURES else '✓'} {PASSED} checks passed, {len(FAILURES)} failed")
    for f in FAILURES:
        print(f"  ✗ {f}", file=sys.stderr)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
