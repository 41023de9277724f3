#!/usr/bin/env python3
"""Writes code-interpreter.json with the helper's source in its files step (the spec is
the same JSON a user would POST to /api/v1/templates). Run after editing
code-interpreter/nullspace-code.py; a pool-manager unit test checks they agree."""
import json, os

here = os.path.dirname(os.path.abspath(__file__))
helper = open(os.path.join(here, "code-interpreter", "nullspace-code.py")).read()
spec = {
    "from": "base",
    "steps": [
        # Byte-compiling all 179 packages' modules in their postinst scripts is most of
        # the package step under emulation (TCG): py3compile is a no-op while they
        # install, and the modules the helper and the warm kernel import are compiled
        # by importing them as root below (the rest compile on first import, as
        # Python does without a cache).
        {"run": "dpkg-divert --local --rename --add /usr/bin/py3compile && ln -s /bin/true /usr/bin/py3compile"},
        {"packages": ["python3-ipykernel", "python3-jupyter-client", "python3-numpy",
                      "python3-pandas", "python3-matplotlib", "python3-matplotlib-inline"],
         "timeout": 1500},
        {"run": "rm /usr/bin/py3compile && dpkg-divert --local --rename --remove /usr/bin/py3compile"},
        {"files": [{"path": "/usr/local/bin/nullspace-code", "content": helper,
                    "mode": "0755"}]},
        {"run": "install -d -o user -g user -m 0755 /var/lib/nullspace-code && python3 -c 'import ipykernel, ipykernel_launcher, ipykernel.kernelapp, IPython, jupyter_client, jupyter_client.connect, zmq, numpy, pandas, matplotlib, matplotlib.pyplot, matplotlib_inline.backend_inline, PIL.PngImagePlugin'"},
        {"env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline",
                 "PYTHONUNBUFFERED": "1"}},
    ],
    "startCmd": "exec /usr/local/bin/nullspace-code kernel --warm",
    "readyCmd": "test -f /var/lib/nullspace-code/default.ready",
    "readyTimeout": 600,
}
with open(os.path.join(here, "code-interpreter.json"), "w") as f:
    json.dump(spec, f, indent=2)
    f.write("\n")

desktop = open(os.path.join(here, "desktop", "nullspace-desktop.sh")).read()
spec = {
    "from": "base",
    "steps": [
        {"packages": ["xvfb", "openbox", "xterm", "chromium", "x11vnc", "novnc",
                      "python3-websockify", "xdotool", "wmctrl", "scrot", "x11-utils",
                      "xdg-utils", "fonts-dejavu-core"],
         "timeout": 1500},
        {"files": [{"path": "/usr/local/bin/nullspace-desktop", "content": desktop,
                    "mode": "0755"},
                   {"path": "/etc/chromium.d/nullspace",
                    "content": "export CHROMIUM_FLAGS=\"$CHROMIUM_FLAGS --no-sandbox --no-first-run --disable-gpu --disable-dev-shm-usage --password-store=basic\"\n"}]},
        {"run": "ln -sf vnc.html /usr/share/novnc/index.html && update-alternatives --set x-www-browser /usr/bin/chromium || true"},
        {"env": {"DISPLAY": ":0"}},
    ],
    "startCmd": "exec /usr/local/bin/nullspace-desktop",
    "readyCmd": "xdotool getdisplaygeometry && curl -sf -o /dev/null http://127.0.0.1:6080/vnc.html && curl -sf -o /dev/null http://127.0.0.1:6081/vnc.html",
    "readyTimeout": 300,
}
with open(os.path.join(here, "desktop.json"), "w") as f:
    json.dump(spec, f, indent=2)
    f.write("\n")
