#!/usr/bin/env bash
# Builds what the platform runs from: the static guest agent, the public API component
# and the guest image set. Idempotent and cached (cargo's target dirs; images by content
# hash). Each step names itself with its elapsed time on stderr; prints the image set's
# directory on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${NULLSPACE_CACHE:-/var/cache/nullspace}/target}
target=x86_64-unknown-linux-gnu
# crt-static only for this target, so build scripts and proc macros stay dynamic.
build_agent() {
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --locked -p guest-agent --release --target "$target" >&2 || return
}
step "building the guest agent (static)" build_agent
step "building the public API component (wasm)" deploy/build-component.sh >&2
step "building the guest image set" deploy/guest-image/build.sh "$CARGO_TARGET_DIR/$target/release/nullspace-agent"
