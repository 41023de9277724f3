#!/usr/bin/env bash
# Fuzzes the public API against its own OpenAPI document with schemathesis: a live stack
# (pool manager + api-host + the component) of its own, a team with a small sandbox
# quota, a capped number of examples. Fails on any 5xx or any response that breaks the
# schema; afterwards every sandbox is deleted, the stack stopped, and the run fails if a
# VM process, a VM directory or a sandbox is left over.
#
#   deploy/schemathesis.sh [BIN_DIR]     (default: $CARGO_TARGET_DIR/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
bin=${1:-${CARGO_TARGET_DIR:-$cache/target}/debug}
examples=${NULLSPACE_FUZZ_EXAMPLES:-15}

venv="$cache/venv-schemathesis-4.32.5"
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'schemathesis==4.32.5'
    touch "$venv/.complete"
fi

state=$(mktemp -d /tmp/nullspace-fuzz-XXXXXX)
chmod 711 "$state" # QEMU runs as nullspace-vm and opens pause snapshots here
run_dir="/dev/shm/nullspace-fuzz-$$"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    rm -rf "$state"
}
trap cleanup EXIT

"$bin/nullspace-pool-manager" admin team create fuzz --max-sandboxes 2 --state-dir "$state" >/dev/null
key=$("$bin/nullspace-pool-manager" admin key create --team fuzz --state-dir "$state")

wait_for() { # FILE PATTERN SECONDS
    for _ in $(seq 1 $(($3 * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "timed out waiting for '$2' in $1:" >&2; tail -20 "$1" >&2; return 1
}
NULLSPACE_RUN_DIR="$run_dir" RUST_LOG=warn "$bin/nullspace-pool-manager" serve \
    --listen 127.0.0.1:0 --edge-listen 127.0.0.1:0 --state-dir "$state" \
    --templates-dir "$cache/test-templates" 2>"$state/pool-manager.log" &
pids+=($!)
wait_for "$state/pool-manager.log" "template snapshots ready" 300
control=$(grep -o 'control API http://[0-9.:]*' "$state/pool-manager.log" | awk '{print $3}')
RUST_LOG=warn "$bin/nullspace-api" --component "$cache/components/nullspace-api.wasm" \
    --listen 127.0.0.1:0 --pool-manager "$control" 2>"$state/api.log" &
pids=("$!" "${pids[@]}")
wait_for "$state/api.log" "public API http://" 60
api=$(grep -o 'public API http://[0-9.:]*' "$state/api.log" | awk '{print $3}')

echo "[fuzz] schemathesis against $api ($examples examples per operation)" >&2
status=0
"$venv/bin/schemathesis" run "$api/api/v1/openapi.json" \
    --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
    --header "X-API-Key: $key" --max-examples "$examples" --workers 1 --seed 7 \
    --request-timeout 120 --phases examples,coverage,fuzzing --no-color \
    --report junit --report-dir "$state/report" || status=$?

# Whatever the fuzzer made, delete it through the API, then stop the stack.
ids=$(curl -fsS "$api/api/v1/sandboxes?state=starting,running,paused,error&limit=100" \
    -H "X-API-Key: $key" | python3 -c 'import json,sys; print(" ".join(s["sandboxID"] for s in json.load(sys.stdin)["sandboxes"]))')
for id in $ids; do
    curl -fsS -o /dev/null -X DELETE "$api/api/v1/sandboxes/$id" -H "X-API-Key: $key" ||
        { echo "[fuzz] deleting $id failed" >&2; status=1; }
done
left=$(curl -fsS "$api/api/v1/sandboxes?state=starting,running,paused,error" -H "X-API-Key: $key")
cleanup
pids=()
trap - EXIT
[ "$left" = '{"nextToken":null,"sandboxes":[]}' ] || { echo "[fuzz] sandboxes left: $left" >&2; status=1; }
if pgrep -f "$run_dir" >/dev/null; then
    echo "[fuzz] VM processes outlived the stack:" >&2; pgrep -af "$run_dir" >&2; status=1
fi
if [ -n "$(ls -A "$run_dir" 2>/dev/null)" ]; then
    echo "[fuzz] VM files left in $run_dir:" >&2; ls -la "$run_dir" >&2; status=1
fi
rm -rf "$run_dir"
echo "[fuzz] done: $( [ $status = 0 ] && echo passed || echo FAILED)" >&2
exit $status
