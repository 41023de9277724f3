#!/usr/bin/env bash
# Installs the stock `wasmtime` CLI (48.0.8, the serve subcommand and what it needs) once,
# into $NULLSPACE_CACHE/tools/wasmtime-48.0.8, for the test that runs our component under
# `wasmtime serve`. ~10 CPU-minutes the first time, reused after; prints the binary's path.
set -euo pipefail
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
version=48.0.8
root="$cache/tools/wasmtime-$version"
if [ ! -x "$root/bin/wasmtime" ]; then
    echo "[wasmtime-cli] installing wasmtime-cli $version (once)" >&2
    # Its own target dir: the CLI's feature set differs from our host's, and keeping the
    # build there makes a re-install after a cache wipe of $root incremental.
    CARGO_TARGET_DIR="$cache/target-tools" cargo install wasmtime-cli \
        --version "$version" --locked --no-default-features \
        --features serve,run,cranelift,pooling-allocator,parallel-compilation,component-model,component-model-async \
        --root "$root" >&2
fi
"$root/bin/wasmtime" --version >&2
echo "$root/bin/wasmtime"
