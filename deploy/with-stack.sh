#!/usr/bin/env bash
# Runs a command against a live stack of its own — a pool manager serving the public API
# in its process (--public-listen, as deploy/up.sh runs it) on free loopback ports, a fresh state directory, a team with
# a small sandbox quota — with NULLSPACE_API_URL, NULLSPACE_API_KEY (the team's key) and
# NULLSPACE_OPERATOR_KEY (an operator key: teams, quotas, keys, built-in warm pools)
# exported. Then deletes every sandbox through the API, stops the stack, and fails if a
# sandbox, a QEMU process or a VM directory is left over.
#
#   deploy/with-stack.sh COMMAND [ARGS...]
#   NULLSPACE_BIN (default $CARGO_TARGET_DIR/debug), NULLSPACE_TEAM_QUOTA (default 4)
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
bin=${NULLSPACE_BIN:-${CARGO_TARGET_DIR:-$cache/target}/debug}
[ $# -gt 0 ] || { echo "usage: deploy/with-stack.sh COMMAND [ARGS...]" >&2; exit 2; }

state=$(mktemp -d /tmp/nullspace-stack-XXXXXX)
chmod 711 "$state" # QEMU runs as nullspace-vm and opens pause snapshots here
run_dir="/dev/shm/nullspace-stack-$$"
pids=()
stop_all() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    pids=()
}
trap 'stop_all; rm -rf "$state" "$run_dir"' EXIT
# A signal (a CI run cut short) ends the script through its EXIT trap too: bash runs
# none for an untrapped SIGTERM, and the servers and VM directories would outlive it.
trap 'exit 143' TERM HUP
trap 'exit 130' INT

"$bin/nullspace-pool-manager" admin team create ci --max-sandboxes "${NULLSPACE_TEAM_QUOTA:-4}" \
    --state-dir "$state" >/dev/null
key=$("$bin/nullspace-pool-manager" admin key create --team ci --state-dir "$state")
operator_key=$("$bin/nullspace-pool-manager" admin key create --operator --state-dir "$state")

wait_for() { # FILE PATTERN SECONDS PID: fails at once when PID exits
    for _ in $(seq 1 $(($3 * 10))); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        kill -0 "$4" 2>/dev/null || { echo "[stack] the process writing $1 exited:" >&2; tail -20 "$1" >&2; return 1; }
        sleep 0.1
    done
    echo "timed out waiting for '$2' in $1:" >&2; tail -20 "$1" >&2; return 1
}
NULLSPACE_RUN_DIR="$run_dir" RUST_LOG=warn "$bin/nullspace-pool-manager" serve \
    --listen 127.0.0.1:0 --edge-listen 127.0.0.1:0 --preview-listen 127.0.0.1:0 --state-dir "$state" \
    --templates-dir "$cache/test-templates" --workspace-templates "${NULLSPACE_WORKSPACE_TEMPLATES:-off}" \
    --public-listen 127.0.0.1:0 --public-component "$cache/components/nullspace-api.wasm" \
    2>"$state/pool-manager.log" &
pids+=($!)
wait_for "$state/pool-manager.log" "template snapshots ready" 300 "${pids[0]}"
# The public API as deploy/up.sh runs it: in the pool manager's process (its line comes
# once the component is compiled).
wait_for "$state/pool-manager.log" "public API http://" 120 "${pids[0]}"
api=$(grep -o 'public API http://[0-9.:]*' "$state/pool-manager.log" | awk '{print $3}')
[ -n "$api" ] || { echo "[stack] the pool manager serves no public API:" >&2; tail -20 "$state/pool-manager.log" >&2; exit 1; }

status=0
NULLSPACE_API_URL="$api" NULLSPACE_API_KEY="$key" NULLSPACE_OPERATOR_KEY="$operator_key" "$@" ||
    status=$?

# Whatever the command made, delete it through the API, then stop the stack.
list() { curl -fsS "$api/api/v1/sandboxes?state=starting,running,paused,error&limit=100" -H "X-API-Key: $key"; }
for id in $(list | python3 -c 'import json,sys; print(" ".join(s["sandboxID"] for s in json.load(sys.stdin)["sandboxes"]))'); do
    curl -fsS -o /dev/null -X DELETE "$api/api/v1/sandboxes/$id" -H "X-API-Key: $key" ||
        { echo "[stack] deleting $id failed" >&2; status=1; }
done
left=$(list)
stop_all
[ "$left" = '{"nextToken":null,"sandboxes":[]}' ] || { echo "[stack] sandboxes left: $left" >&2; status=1; }
if pgrep -f "$run_dir" >/dev/null; then
    echo "[stack] VM processes outlived the stack:" >&2; pgrep -af "$run_dir" >&2; status=1
fi
if [ -n "$(ls -A "$run_dir" 2>/dev/null)" ]; then
    echo "[stack] VM files left in $run_dir:" >&2; ls -la "$run_dir" >&2; status=1
fi
exit $status
