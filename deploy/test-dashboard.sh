#!/usr/bin/env bash
# Tests the web dashboard in a real browser: Debian's Chromium, headless, driven by
# Playwright (playwright-core from npm; it never downloads a browser) through
# dashboard/test/e2e.mjs, against a live stack of its own (deploy/with-stack.sh: the
# pool manager serving the public API and the dashboard in its process). Screenshots of
# every page are kept in $NULLSPACE_ARTIFACTS/dashboard (default: the cache's
# artifacts/dashboard).
#
#   deploy/test-dashboard.sh [BIN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
die() { echo "dashboard test: $*" >&2; exit 1; }
[ $# -gt 0 ] && export NULLSPACE_BIN=$1

chromium=${CHROMIUM:-/usr/bin/chromium}
[ -x "$chromium" ] || die "no Chromium at $chromium: run deploy/install-deps.sh (it installs Debian's chromium), or set CHROMIUM"
# The dashboard's dependencies (Playwright among them) and its build.
deploy/build-dashboard.sh >/dev/null || die "the dashboard does not build (above)"
[ -f dashboard/node_modules/playwright-core/package.json ] ||
    die "playwright-core is missing from dashboard/node_modules: run deploy/build-dashboard.sh"
artifacts=${NULLSPACE_ARTIFACTS:-$cache/artifacts}/dashboard
rm -rf "$artifacts"
mkdir -p "$artifacts"
# The test makes a second team's sandbox beside its own: a quota of 3 for the first.
CHROMIUM="$chromium" NULLSPACE_ARTIFACTS="$artifacts" NULLSPACE_TEAM_QUOTA=3 \
    timeout --signal=TERM --kill-after=30 900 deploy/with-stack.sh node dashboard/test/e2e.mjs
echo "[dashboard] ✓ screenshots in $artifacts" >&2
