#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests and the end-to-end tests that
# boot real microVMs. Installs and builds whatever is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${NULLSPACE_CACHE:-/var/cache/nullspace}/target}

deploy/install-deps.sh
deploy/build.sh >/dev/null
deploy/install-wasmtime-cli.sh >/dev/null
cargo fmt --all -- --check
for crate in api-component api-component/componentize; do
    cargo fmt --manifest-path "$crate/Cargo.toml" -- --check
done
cargo clippy --quiet --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the real daemon binary.
cargo build --quiet --workspace --bins --locked
# Snapshot tests store in a real S3 server: SeaweedFS on loopback, this run's own.
s3_dir=$(mktemp -d /tmp/nullspace-test-s3-XXXXXX)
trap 'deploy/seaweedfs.sh stop "$s3_dir"; rm -rf "$s3_dir"' EXIT
NULLSPACE_TEST_S3=$(deploy/seaweedfs.sh start "$s3_dir" 19433)
export NULLSPACE_TEST_S3
cargo nextest run --workspace --locked --profile ci
# The public API against its own OpenAPI document, on a live stack of its own.
deploy/schemathesis.sh "$CARGO_TARGET_DIR/debug"
# The Python SDK's tests, on a live stack of their own.
deploy/test-python-sdk.sh "$CARGO_TARGET_DIR/debug"
