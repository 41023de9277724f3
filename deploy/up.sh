#!/usr/bin/env bash
# Sets up this machine (Debian bookworm, root) and runs what exists of Nullspace locally.
# Safe to run again: every step is cached.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/nullspace/target}

deploy/install-deps.sh
images=$(deploy/build.sh)
cargo build --quiet --release --locked -p nullspace-tests --bins
bin="$CARGO_TARGET_DIR/release"

echo "Guest image set: $images" >&2
"$bin/vmctl" --rootfs base -- '. /etc/os-release; echo "guest: $PRETTY_NAME, kernel $(uname -r), $(python3 --version)"'

cat <<MSG

Nullspace's guest runtime is set up. So far the platform is the guest runtime (the
pool manager and public API come next); reach it with:
  $bin/vmctl --rootfs base -- <shell command>     boot a microVM, run a command, tear it down
  $bin/vmctl --rootfs minimal --no-egress -- ...   the small test image, no outbound network
  $bin/bench                                       cold boot and agent round-trip numbers
MSG
