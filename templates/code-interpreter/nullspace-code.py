#!/usr/bin/env python3
"""nullspace-code: runs code in a Jupyter kernel of this sandbox (the code-interpreter
template) and prints one JSON event per line on stdout. The SDKs run it through the
commands data plane; docs/TEMPLATES.md describes the events.

    nullspace-code kernel [--warm]        start the default context's kernel and wait
                                          on it (the template's start command)
    nullspace-code run [--context ID] [--language python|bash] [--timeout S]
                       (--code-b64 B64 | --code-file PATH)
    nullspace-code create-context [--language python|bash] [--cwd DIR]
    nullspace-code remove-context ID

Each context is a kernel of its own (its own state), started on demand and kept
running; `default` is started by the template and is in its snapshot, so the first run
of a new sandbox finds its kernel (and numpy, pandas, matplotlib) loaded.
"""

import argparse
import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import uuid

STATE = os.environ.get("NULLSPACE_CODE_DIR", "/var/lib/nullspace-code")
WARM = (
    "import numpy, pandas, matplotlib\n"
    "import matplotlib.pyplot as plt\n"
    "%matplotlib inline\n"
)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def emit(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def path(ctx, ext):
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", ctx):
        raise SystemExit(f"bad context id {ctx!r}")
    return os.path.join(STATE, f"{ctx}.{ext}")


def kernel_pid(ctx):
    try:
        with open(path(ctx, "pid")) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start_kernel(ctx, cwd=None, wait=False):
    """Starts the context's kernel (detached, in a session of its own)."""
    from jupyter_client.connect import write_connection_file

    os.makedirs(STATE, exist_ok=True)
    conn = path(ctx, "json")
    write_connection_file(conn, ip="127.0.0.1")
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    log = open(path(ctx, "log"), "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipykernel_launcher", "-f", conn],
        cwd=cwd or "/workspace" if os.path.isdir(cwd or "/workspace") else None,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env,
        start_new_session=True,
    )
    with open(path(ctx, "pid"), "w") as f:
        f.write(str(proc.pid))
    return proc


def client(ctx, timeout=60.0):
    from jupyter_client import BlockingKernelClient

    if kernel_pid(ctx) is None:
        if ctx != "default" and not os.path.exists(path(ctx, "json")):
            raise LookupError(f"no code context {ctx}; create one first")
        start_kernel(ctx)
    c = BlockingKernelClient(connection_file=path(ctx, "json"))
    c.load_connection_file()
    # No heartbeat: a kernel still starting (seconds under emulation) is not dead.
    c.start_channels(hb=False)
    deadline = time.monotonic() + timeout
    asked = set()
    shell_ok = iopub_ok = False
    while not (shell_ok and iopub_ok):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the kernel of context {ctx} did not answer within {timeout:g} s")
        if kernel_pid(ctx) is None:
            raise RuntimeError(f"the kernel of context {ctx} died; see {path(ctx, 'log')}")
        asked.add(c.kernel_info())
        # Until iopub has seen a reply too, output could be missed.
        end = time.monotonic() + 2
        while time.monotonic() < end and not (shell_ok and iopub_ok):
            try:
                if not shell_ok:
                    m = c.get_shell_msg(timeout=0.2)
                    shell_ok = m.get("parent_header", {}).get("msg_id") in asked
                m = c.get_iopub_msg(timeout=0.2)
                iopub_ok = iopub_ok or m.get("parent_header", {}).get("msg_id") in asked
            except queue.Empty:
                pass
    # What is left of the handshake must not be taken for the next run's.
    for get in (c.get_iopub_msg, c.get_shell_msg):
        try:
            while True:
                get(timeout=0.05)
        except queue.Empty:
            pass
    return c


def execute(ctx, code, timeout, language="python"):
    """Runs `code`, emitting its events; returns the exit status."""
    if language == "bash":
        code = "%%bash\n" + code
    try:
        c = client(ctx)
    except Exception as e:  # noqa: BLE001 - reported as an event
        emit({"type": "error", "name": type(e).__name__, "value": str(e), "traceback": []})
        emit({"type": "done", "executionCount": None})
        return 2
    msg_id = c.execute(code, store_history=True, allow_stdin=False)
    deadline = time.monotonic() + timeout
    interrupted = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            if interrupted:
                emit({"type": "error", "name": "TimeoutError",
                      "value": "the kernel did not stop after an interrupt; it was restarted",
                      "traceback": []})
                pid = kernel_pid(ctx)
                if pid:
                    os.killpg(pid, signal.SIGKILL)
                emit({"type": "done", "executionCount": None})
                return 124
            pid = kernel_pid(ctx)
            if pid:
                os.kill(pid, signal.SIGINT)
            emit({"type": "timeout", "seconds": timeout})
            interrupted = True
            deadline = time.monotonic() + 10
            continue
        try:
            msg = c.get_iopub_msg(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            emit({"type": content.get("name", "stdout"), "text": content.get("text", "")})
        elif kind in ("execute_result", "display_data"):
            emit({"type": "result", "isMainResult": kind == "execute_result",
                  "data": content.get("data", {})})
        elif kind == "error":
            emit({"type": "error", "name": content.get("ename", ""),
                  "value": content.get("evalue", ""),
                  "traceback": [ANSI.sub("", t) for t in content.get("traceback", [])]})
        elif kind == "status" and content.get("execution_state") == "idle":
            break
    count = None
    try:
        reply = c.get_shell_msg(timeout=5)
        count = reply["content"].get("execution_count")
    except queue.Empty:
        pass
    emit({"type": "done", "executionCount": count})
    return 124 if interrupted else 0


def main():
    p = argparse.ArgumentParser(prog="nullspace-code")
    sub = p.add_subparsers(dest="verb", required=True)
    k = sub.add_parser("kernel")
    k.add_argument("--warm", action="store_true")
    r = sub.add_parser("run")
    r.add_argument("--context", default="default")
    r.add_argument("--language", default="python", choices=["python", "bash"])
    r.add_argument("--timeout", type=float, default=300)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--code-b64")
    g.add_argument("--code-file")
    cc = sub.add_parser("create-context")
    cc.add_argument("--language", default="python", choices=["python", "bash"])
    cc.add_argument("--cwd")
    rc = sub.add_parser("remove-context")
    rc.add_argument("id")
    a = p.parse_args()

    if a.verb == "kernel":
        for ext in ("ready",):
            try:
                os.unlink(path("default", ext))
            except OSError:
                pass
        proc = start_kernel("default")
        if a.warm:
            c = client("default", timeout=600)
            msg_id = c.execute(WARM, store_history=False)
            while True:
                reply = c.get_shell_msg(timeout=600)
                if reply.get("parent_header", {}).get("msg_id") == msg_id:
                    break
            c.stop_channels()
        open(path("default", "ready"), "w").close()
        print("kernel ready", flush=True)
        sys.exit(proc.wait())
    if a.verb == "run":
        if a.code_b64 is not None:
            code = base64.b64decode(a.code_b64).decode()
        else:
            with open(a.code_file) as f:
                code = f.read()
        sys.exit(execute(a.context, code, a.timeout, a.language))
    if a.verb == "create-context":
        ctx = uuid.uuid4().hex[:16]
        start_kernel(ctx, a.cwd)
        c = client(ctx)
        if a.language == "python":
            execute_quiet = c.execute("%matplotlib inline", store_history=False)
            c.get_shell_msg(timeout=60)
            del execute_quiet
        emit({"type": "context", "id": ctx, "language": a.language,
              "cwd": a.cwd or "/workspace"})
        return
    if a.verb == "remove-context":
        pid = kernel_pid(a.id)
        if pid:
            os.killpg(pid, signal.SIGKILL)
        for ext in ("json", "pid", "log", "ready"):
            try:
                os.unlink(path(a.id, ext))
            except OSError:
                pass
        emit({"type": "removed", "id": a.id})


if __name__ == "__main__":
    main()
