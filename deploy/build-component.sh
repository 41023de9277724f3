#!/usr/bin/env bash
# Builds the public API component (with the web dashboard it serves, built first by
# deploy/build-dashboard.sh): the core module for wasm32-wasip1 with Debian's
# rustc-web and build-std (deploy/wasm-toolchain.sh), then a component with the preview1
# proxy adapter (api-component/componentize). Prints the component's path:
# $NULLSPACE_CACHE/components/nullspace-api.wasm.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
host_target=${CARGO_TARGET_DIR:-$cache/target}
step="toolchain"
trap 'echo "component build FAILED at step: $step" >&2' ERR

# The dashboard's files are embedded in the component (api-component/build.rs).
step="dashboard"
deploy/build-dashboard.sh >/dev/null

# The componentizer runs on the host: build it with the host toolchain first.
step="componentize"
CARGO_TARGET_DIR="$host_target" cargo build --release --locked \
    --manifest-path api-component/componentize/Cargo.toml
componentize="$host_target/release/componentize"

step="toolchain"
toolchain_env=$(deploy/wasm-toolchain.sh)
step="core module"
(
    eval "$toolchain_env"
    # A 128 KiB stack instead of Rust's 1 MiB: the stack sits at the bottom of linear
    # memory, which the host resets on every request, so its size is a per-request cost.
    export RUSTFLAGS="$RUSTFLAGS -C link-arg=-zstack-size=131072"
    CARGO_TARGET_DIR="$cache/wasm-target" cargo build --release --locked \
        -Zbuild-std=std,panic_abort --target wasm32-wasip1 \
        --manifest-path api-component/Cargo.toml
)
core="$cache/wasm-target/wasm32-wasip1/release/nullspace_api_component.wasm"

step="component"
mkdir -p "$cache/components"
out="$cache/components/nullspace-api.wasm"
"$componentize" "$core" "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
