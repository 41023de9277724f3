"""Fixtures shared by the live tests."""

import os
import socket
import subprocess
import time

import pytest


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert out.returncode == 0, f"ip {' '.join(args)}: {out.stderr}"


class TestNet:
    """Hosts ``198.18.N.2`` and ``.3`` in a network namespace of this test run, joined to
    the host by a veth pair, each answering HTTP on :8080 with ``who:<address>`` (the
    same scheme as the Rust suite's ``nullspace_tests::netns::TestNet``, whose reaper
    also removes a namespace a killed run left). Never an outside address."""

    __test__ = False  # a fixture's type, not a test class
    _made = 0  # nets made by this process: each gets its own subnet and link names

    def __init__(self) -> None:
        # A fresh subnet per net: the kernel tears down a deleted namespace's veth pair
        # asynchronously, so reusing the previous test's names can meet "File exists".
        TestNet._made += 1
        self.subnet = 20 + (os.getpid() + TestNet._made) % 200
        self.name = f"nstest-{os.getpid()}-{self.subnet}"
        host_end, peer = f"vt{self.subnet}h", f"vt{self.subnet}n"
        self.host_end = host_end
        # A link of that name left by a killed run is stale: remove it first.
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        self.servers = []
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", host_end, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", self.name)
            _ip("addr", "add", f"198.18.{self.subnet}.1/24", "dev", host_end)
            _ip("link", "set", host_end, "up")
            self._exec("ip", "link", "set", "lo", "up")
            self._exec("ip", "link", "set", peer, "up")
            for h in (2, 3):
                self._exec("ip", "addr", "add", f"{self.addr(h)}/24", "dev", peer)
            script = (
                "import http.server\n"
                "class H(http.server.BaseHTTPRequestHandler):\n"
                "    def do_GET(self):\n"
                "        body = ('who:' + self.connection.getsockname()[0]).encode()\n"
                "        self.send_response(200); self.send_header('Content-Length', "
                "str(len(body))); self.end_headers(); self.wfile.write(body)\n"
                "    def log_message(self, *a): pass\n"
                "http.server.ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()\n")
            self.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", self.name, "python3", "-c", script],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection((self.addr(2), 8080), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the test HTTP server never answered"
                    time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def addr(self, h: int) -> str:
        return f"198.18.{self.subnet}.{h}"

    def url(self, h: int) -> str:
        return f"http://{self.addr(h)}:8080/"

    def _exec(self, *cmd: str) -> None:
        _ip("netns", "exec", self.name, *cmd)

    def close(self) -> None:
        for s in self.servers:
            s.kill()
            s.wait()
        # Deleting the host end removes the pair at once (synchronously), unlike the
        # namespace's deferred teardown.
        subprocess.run(["ip", "link", "del", self.host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def testnet():
    net = TestNet()
    try:
        yield net
    finally:
        net.close()
