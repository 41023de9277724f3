#!/usr/bin/env bash
# Sets up this machine (Debian bookworm, root) and runs what exists of Nullspace locally.
# Safe to run again: every step is cached.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/nullspace/target}

deploy/install-deps.sh
images=$(deploy/build.sh)
cargo build --quiet --release --locked -p nullspace-tests -p pool-manager --bins
bin="$CARGO_TARGET_DIR/release"

echo "Guest image set: $images" >&2
"$bin/vmctl" --rootfs base -- '. /etc/os-release; echo "guest: $PRETTY_NAME, kernel $(uname -r), $(python3 --version)"'

# The pool manager: a development team and key, then the daemon on loopback.
state=${NULLSPACE_STATE_DIR:-/var/lib/nullspace}
mkdir -p "$state"
pm="$bin/nullspace-pool-manager"
if [ ! -s "$state/dev.env" ]; then
    "$pm" admin team create dev --state-dir "$state" >/dev/null 2>&1 || true
    key=$("$pm" admin key create --team dev --state-dir "$state")
    printf 'NULLSPACE_API_URL=http://127.0.0.1:7070\nNULLSPACE_API_KEY=%s\n' "$key" >"$state/dev.env"
    chmod 600 "$state/dev.env"
fi
if curl -fsS http://127.0.0.1:7070/v1/health >/dev/null 2>&1; then
    echo "A pool manager already answers on 127.0.0.1:7070; leaving it running." >&2
else
    nohup "$pm" serve --state-dir "$state" >"$state/pool-manager.log" 2>&1 &
    for _ in $(seq 1 240); do
        grep -q "template snapshots ready" "$state/pool-manager.log" 2>/dev/null && break
        sleep 1
    done
    grep -q "template snapshots ready" "$state/pool-manager.log" || { tail -20 "$state/pool-manager.log" >&2; exit 1; }
fi
. "$state/dev.env"

cat <<MSG

Nullspace is running on this machine:
  control API  $NULLSPACE_API_URL   (key in $state/dev.env; log $state/pool-manager.log)
  data plane   http://127.0.0.1:7071 (use the runtime token a create returns)

  . $state/dev.env
  curl -s -XPOST \$NULLSPACE_API_URL/v1/sandboxes -H "X-API-Key: \$NULLSPACE_API_KEY" \\
       -d '{"templateID":"base"}'
  curl -sN -XPOST <runtime.target.baseUrl>/commands -H "Authorization: Bearer <runtime.token>" \\
       -d '{"cmd":"python3 -c \\"print(6*7)\\""}'

  $bin/vmctl --rootfs base -- <command>    a throwaway microVM without the daemon
  $bin/bench                               guest-runtime numbers
Stop the daemon with: pkill -TERM -f nullspace-pool-manager
MSG
