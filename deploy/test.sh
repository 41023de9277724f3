#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests and the end-to-end tests that
# boot real microVMs. Installs and builds whatever is missing first; each step names
# itself with its elapsed time, and the host check runs before any VM does.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${NULLSPACE_CACHE:-/var/cache/nullspace}/target}
# A test run builds each crate once: incremental state would only cost disk (GiB).
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
total=$SECONDS

step "installing and checking system packages" deploy/install-deps.sh
step "building the guest agent, API component and guest images" deploy/build.sh >/dev/null
step "installing stock wasmtime (portability test)" deploy/install-wasmtime-cli.sh >/dev/null
check_format() {
    cargo fmt --all -- --check || return
    for crate in api-component api-component/componentize; do
        cargo fmt --manifest-path "$crate/Cargo.toml" -- --check || return
    done
}
step "checking formatting" check_format
step "linting (clippy -D warnings)" cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the real daemon binary.
step "building the binaries" cargo build --workspace --bins --locked
# A host that cannot run VMs stops here, with the fix, before any test boots one.
host_check() {
    local state
    state=$(mktemp -d /tmp/nullspace-check-XXXXXX) || return
    chmod 711 "$state" || return
    "$CARGO_TARGET_DIR/debug/nullspace-pool-manager" check --state-dir "$state" || { rm -rf "$state"; return 1; }
    rm -rf "$state"
}
step "checking the host (nullspace-pool-manager check)" host_check
# Snapshot tests store in a real S3 server: SeaweedFS on loopback, this run's own; the
# catalog's tests run on PostgreSQL too: a cluster on loopback, this run's own.
s3_dir=$(mktemp -d /tmp/nullspace-test-s3-XXXXXX)
pg_dir=$(mktemp -d /tmp/nullspace-test-pg-XXXXXX)
trap 'deploy/postgres.sh stop "$pg_dir" || true; rm -rf "$pg_dir"; deploy/seaweedfs.sh stop "$s3_dir"; rm -rf "$s3_dir"' EXIT
# A signal (a CI run cut short) ends the script through its EXIT trap too: bash runs
# none for an untrapped SIGTERM, and the servers and VM directories would outlive it.
trap 'exit 143' TERM HUP
trap 'exit 130' INT
NULLSPACE_TEST_S3=$(deploy/seaweedfs.sh start "$s3_dir" 19433)
export NULLSPACE_TEST_S3
NULLSPACE_TEST_POSTGRES=$(deploy/postgres.sh start "$pg_dir" 19543)
export NULLSPACE_TEST_POSTGRES
# Every PostgreSQL test runs here: one that finds no server fails instead of skipping.
export NULLSPACE_TEST_REQUIRE_POSTGRES=1
step "running the tests (cargo nextest, 2 threads)" cargo nextest run --workspace --locked --profile ci
# The component's own routing tests (a workspace of its own, built for the host here).
step "testing the API component's routes (cargo test)" env \
    CARGO_TARGET_DIR="${NULLSPACE_CACHE:-/var/cache/nullspace}/api-component-test-target" \
    cargo test --locked --manifest-path api-component/Cargo.toml
# The deployment manifests (Kubernetes, Nomad, systemd, Spin), rendered and checked offline.
step "checking the deployment manifests" deploy/check-manifests.sh "$CARGO_TARGET_DIR/debug"
# The public API against its own OpenAPI document, on a live stack of its own.
step "fuzzing the public API (schemathesis)" deploy/schemathesis.sh "$CARGO_TARGET_DIR/debug"
# The Python SDK's tests, on a live stack of their own.
step "testing the Python SDK (pytest)" deploy/test-python-sdk.sh "$CARGO_TARGET_DIR/debug"
# The TypeScript SDK: npm ci (cached), build, npm pack checked, node --test on a live stack of its own.
step "testing the TypeScript SDK (node --test)" deploy/test-typescript-sdk.sh "$CARGO_TARGET_DIR/debug"
# The web dashboard in headless Chromium (Playwright), on a live stack of its own.
step "testing the dashboard in Chromium (Playwright)" deploy/test-dashboard.sh "$CARGO_TARGET_DIR/debug"
echo "[nullspace] ✓ all tests passed in $((SECONDS - total)) s" >&2
