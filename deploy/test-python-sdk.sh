#!/usr/bin/env bash
# Runs the Python SDK's tests (pytest) against a live stack of its own
# (deploy/with-stack.sh). The venv is cached; the SDK is installed into it fresh.
#
#   deploy/test-python-sdk.sh [BIN_DIR]     (default: $CARGO_TARGET_DIR/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
export NULLSPACE_BIN=${1:-${CARGO_TARGET_DIR:-$cache/target}/debug}
venv="$cache/venv-sdk-python-2"
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'httpx==0.28.1' 'websockets==15.0.1' 'pytest==9.2.0' 'pytest-asyncio==1.5.0'
    touch "$venv/.complete"
fi
"$venv/bin/pip" install --quiet --no-deps --force-reinstall ./sdk/python
NULLSPACE_TEAM_QUOTA=4 deploy/with-stack.sh "$venv/bin/python" -m pytest -q -p no:cacheprovider sdk/python/tests
