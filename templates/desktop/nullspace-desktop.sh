#!/bin/sh
# nullspace-desktop: the desktop template's start command. Xvfb on :0, openbox, and the
# viewer: x11vnc (interactive on 5900, view-only on 5901, loopback only) behind noVNC's
# websockify (6080 interactive, 6081 view-only, on loopback too: previews tunnel to
# 127.0.0.1; the target by address: "localhost" may
# resolve to ::1 first, where x11vnc does not listen), reached through preview URLs. Logs in
# /tmp (xvfb, openbox, x11vnc, x11vnc-view, novnc, novnc-view).
set -u
export DISPLAY=:0
W=${NULLSPACE_DESKTOP_WIDTH:-1280}
H=${NULLSPACE_DESKTOP_HEIGHT:-800}
Xvfb :0 -screen 0 "${W}x${H}x24" -nolisten tcp -ac >/tmp/xvfb.log 2>&1 &
i=0
while ! xdpyinfo >/dev/null 2>&1; do
  i=$((i + 1)); [ "$i" -gt 600 ] && { echo "Xvfb did not start" >&2; exit 1; }
  sleep 0.1
done
openbox >/tmp/openbox.log 2>&1 &
x11vnc -display :0 -forever -shared -nopw -localhost -rfbport 5900 -quiet >/tmp/x11vnc.log 2>&1 &
x11vnc -display :0 -forever -shared -nopw -localhost -rfbport 5901 -viewonly -quiet >/tmp/x11vnc-view.log 2>&1 &
websockify --web /usr/share/novnc 127.0.0.1:6081 127.0.0.1:5901 >/tmp/novnc-view.log 2>&1 &
exec websockify --web /usr/share/novnc 127.0.0.1:6080 127.0.0.1:5900 >/tmp/novnc.log 2>&1
