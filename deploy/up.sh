#!/usr/bin/env bash
# Sets up this machine (Debian bookworm, root) and runs Nullspace locally: the pool
# manager, which also serves the public API (the wasm component in its process:
# --public-listen), on loopback, with a development team and key. Safe to run again: every step is cached.
#
#   deploy/up.sh                 run in the foreground; Ctrl-C stops everything, VMs included
#   deploy/up.sh --background    start, print how to reach it, return; deploy/down.sh stops it
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${NULLSPACE_CACHE:-/var/cache/nullspace}/target}
background=false
case "${1:-}" in
    "") ;;
    --background) background=true ;;
    *) echo "usage: deploy/up.sh [--background]" >&2; exit 2 ;;
esac

total=$SECONDS
step "installing and checking system packages" deploy/install-deps.sh
images=$(deploy/build.sh)
echo "Guest image set: $images" >&2
step "building the release binaries" \
    cargo build --release --locked -p pool-manager -p api-host -p nullspace-cli -p nullspace-tests --bins
bin="$CARGO_TARGET_DIR/release"
component="${NULLSPACE_CACHE:-/var/cache/nullspace}/components/nullspace-api.wasm"

state=${NULLSPACE_STATE_DIR:-/var/lib/nullspace}
mkdir -p "$state"
chmod 711 "$state" # QEMU runs as nullspace-vm and opens pause snapshots under it
# Everything a VM needs, one line each with the fix; stops here on a host that cannot.
step "checking the host (nullspace-pool-manager check)" "$bin/nullspace-pool-manager" check --state-dir "$state"
step "booting a base microVM (smoke test)" "$bin/vmctl" --rootfs base -- \
    '. /etc/os-release; echo "guest: $PRETTY_NAME, kernel $(uname -r), $(python3 --version)"'

env_dir=${XDG_STATE_HOME:-$HOME/.local/state}/nullspace
control=127.0.0.1:7070 edge=127.0.0.1:7071 preview=127.0.0.1:7072 public=127.0.0.1:7080
mkdir -p "$env_dir"
for addr in $control $edge $preview $public; do
    if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then
        echo "Something already listens on $addr: stop it first (deploy/down.sh stops a stack this script started)." >&2
        exit 1
    fi
done

# A development team and key, once; the env file clients read.
pm="$bin/nullspace-pool-manager"
if [ ! -s "$env_dir/dev.env" ] || ! grep -q NULLSPACE_API_KEY "$env_dir/dev.env"; then
    "$pm" admin team create dev --state-dir "$state" >/dev/null 2>&1 || true
    key=$("$pm" admin key create --team dev --state-dir "$state")
else
    key=$(sed -n 's/^NULLSPACE_API_KEY=//p' "$env_dir/dev.env")
fi
umask 077
cat >"$env_dir/dev.env" <<ENV
NULLSPACE_API_URL=http://$public
NULLSPACE_API_KEY=$key
NULLSPACE_DATA_PLANE_URL=http://$edge
ENV
umask 022

# Start both in sessions of their own (a terminal Ctrl-C reaches only this script, whose
# trap stops them in order); remember their PIDs for deploy/down.sh.
# The public API runs in the pool manager's process (--public-listen): on one host that
# saves every call a round trip between processes (bench-api: in-process vs api-host).
setsid nohup "$pm" serve --listen $control --edge-listen $edge --preview-listen $preview \
    --public-listen $public --public-component "$component" \
    --state-dir "$state" --on-exit end \
    >"$state/pool-manager.log" 2>&1 &
pm_pid=$!
echo "$pm_pid" >"$state/pool-manager.pid"
# Until the built-in templates are made; the daemon exits (non-zero) when they cannot
# be, and this stops at once with its error, never with a success banner.
echo "[nullspace] ▶ starting the pool manager and making the template snapshots" >&2
started=$SECONDS
while ! grep -q "template snapshots ready" "$state/pool-manager.log" 2>/dev/null; do
    if ! kill -0 $pm_pid 2>/dev/null || grep -q "template snapshots failed" "$state/pool-manager.log"; then
        echo "[nullspace] ✗ the pool manager stopped; its log ($state/pool-manager.log) ends:" >&2
        tail -20 "$state/pool-manager.log" >&2
        deploy/down.sh >/dev/null 2>&1 || true
        exit 1
    fi
    if [ $((SECONDS - started)) -ge 600 ]; then
        echo "[nullspace] ✗ no template snapshots after 600 s; the log ends:" >&2
        tail -20 "$state/pool-manager.log" >&2
        deploy/down.sh >/dev/null 2>&1 || true
        exit 1
    fi
    sleep 1
done
echo "[nullspace] ✓ pool manager ready ($((SECONDS - started)) s)" >&2
# Its listeners' line comes once the API component is compiled.
for _ in $(seq 1 240); do
    grep -q "public API http://" "$state/pool-manager.log" 2>/dev/null && break
    kill -0 $pm_pid 2>/dev/null || break
    sleep 0.5
done
if ! grep -q "public API http://" "$state/pool-manager.log" 2>/dev/null; then
    echo "[nullspace] ✗ the pool manager serves no public API; its log ($state/pool-manager.log) ends:" >&2
    tail -20 "$state/pool-manager.log" >&2
    deploy/down.sh >/dev/null 2>&1 || true
    exit 1
fi

cat <<MSG

Nullspace is running on this machine (set up in $((SECONDS - total)) s):
  public API   http://$public/api/v1   (OpenAPI: http://$public/api/v1/openapi.json)
  dashboard    http://$public/dashboard/   (open it in a browser; sign in with the API key below)
  API key      $key
  data plane   http://$edge   (reached with the runtime token a create returns)
  previews     http://PORT-SANDBOXID.localhost:${preview#*:}   (POST /api/v1/sandboxes/ID/previews {"port":N} signs one)
  env file     $env_dir/dev.env   (NULLSPACE_API_URL, NULLSPACE_API_KEY, NULLSPACE_DATA_PLANE_URL)
  log          $state/pool-manager.log

  set -a; . $env_dir/dev.env; set +a
  curl -s -XPOST \$NULLSPACE_API_URL/api/v1/sandboxes -H "X-API-Key: \$NULLSPACE_API_KEY" \\
       -d '{"templateID":"base"}'
  curl -sN -XPOST <runtime.target.baseUrl>/commands -H "Authorization: Bearer <runtime.token>" \\
       -d '{"cmd":"python3 -c \\"print(6*7)\\""}'

MSG
if $background; then
    echo "Stop everything (VMs included) with: deploy/down.sh"
    exit 0
fi
echo "Ctrl-C stops everything, VMs included (or run deploy/down.sh from another shell)."
trap 'deploy/down.sh; exit 0' INT TERM
while kill -0 $pm_pid 2>/dev/null; do sleep 1; done
echo "A service stopped on its own; see the logs above. Stopping the rest." >&2
deploy/down.sh
exit 1
