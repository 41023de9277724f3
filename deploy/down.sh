#!/usr/bin/env bash
# Stops the local stack deploy/up.sh started: the API first, then the pool manager,
# which ends every VM (--on-exit end). Waits until both are gone.
set -euo pipefail
state=${NULLSPACE_STATE_DIR:-/var/lib/nullspace}
stop() { # NAME PIDFILE
    [ -s "$2" ] || return 0
    local pid
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$1 did not stop within 30 s; killing it" >&2
            kill -KILL "$pid"
        fi
        echo "stopped $1" >&2
    fi
    rm -f "$2"
}
stop "the public API" "$state/api.pid"
stop "the pool manager (and its VMs)" "$state/pool-manager.pid"
