#!/usr/bin/env bash
# Fuzzes the public API against its own OpenAPI document with schemathesis, on a live
# stack of its own (deploy/with-stack.sh: a team with a quota of 2, everything deleted
# and checked for leftovers afterwards). Fails on any 5xx or any response that breaks
# the schema.
#
#   deploy/schemathesis.sh [BIN_DIR]     (default: $CARGO_TARGET_DIR/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
export NULLSPACE_BIN=${1:-${CARGO_TARGET_DIR:-$cache/target}/debug}
examples=${NULLSPACE_FUZZ_EXAMPLES:-15}

venv="$cache/venv-schemathesis-4.32.5"
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'schemathesis==4.32.5'
    touch "$venv/.complete"
fi

echo "[fuzz] schemathesis ($examples examples per operation)" >&2
NULLSPACE_TEAM_QUOTA=2 deploy/with-stack.sh bash -c '
    exec "$0/bin/schemathesis" run "$NULLSPACE_API_URL/api/v1/openapi.json" \
        --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
        --header "X-API-Key: $NULLSPACE_API_KEY" --max-examples "$1" --workers 1 --seed 7 \
        --request-timeout 120 --phases examples,coverage,fuzzing --no-color' "$venv" "$examples"
echo "[fuzz] passed" >&2
