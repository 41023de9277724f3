# Shared by the deploy scripts (sourced, not run): named steps with elapsed time, so a
# long build is never silent and a failure says which step it was.
#
#   step "building the release binaries" cargo build --release ...
#
# `set -e` does not apply inside a function run by `step` (bash ignores it there), so
# such a function must return non-zero itself (`|| return`).
#
# prints "[nullspace] ▶ building the release binaries" before, a line a minute while it
# runs, "[nullspace] ✓ … (93 s)" after, or "[nullspace] ✗ … failed after 93 s (exit 101)"
# and exits with the command's status.

step() {
    local name=$1 start=$SECONDS status=0 ticker
    shift
    echo "[nullspace] ▶ $name" >&2
    # A line a minute while it runs: a long build is never silent.
    # Its sleep holds no output: a caller capturing stdout must not wait for it.
    (while sleep 60 </dev/null >/dev/null 2>&1 && kill -0 $$ 2>/dev/null; do
        echo "[nullspace] … $name: $((SECONDS - start)) s so far" >&2
    done) >/dev/null &
    ticker=$!
    "$@" || status=$?
    kill "$ticker" 2>/dev/null || true
    wait "$ticker" 2>/dev/null || true
    if [ "$status" -ne 0 ]; then
        echo "[nullspace] ✗ $name failed after $((SECONDS - start)) s (exit $status)" >&2
        exit "$status"
    fi
    echo "[nullspace] ✓ $name ($((SECONDS - start)) s)" >&2
}

# Dies with a message that names the fix.
die() {
    echo "[nullspace] ✗ $*" >&2
    exit 1
}
