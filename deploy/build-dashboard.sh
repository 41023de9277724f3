#!/usr/bin/env bash
# Builds the web dashboard (dashboard/): its dev dependencies from the npm registry
# (npm ci, pinned by package-lock.json, npm's cache under the Nullspace cache: offline
# once warm), a strict type check (tsc), then esbuild's bundle into dashboard/dist
# (index.html and assets/), which the API component embeds. Skipped when dist/ was built
# from exactly these sources. Prints dist/'s path.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
dir=dashboard
die() { echo "dashboard build: $*" >&2; exit 1; }

fix="install Node.js 20 or newer with npm (deploy/install-deps.sh names how), then run this again"
command -v node >/dev/null || die "node is not installed: $fix"
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || die "node $(node --version) is too old for the dashboard's toolchain: $fix"
command -v npm >/dev/null || die "npm is not installed: $fix"

# What dist/ is built from: a build from the same sources is reused.
stamp=$(cat "$dir/package-lock.json" "$dir/build.mjs" "$dir/tsconfig.json" \
    $(find "$dir/src" -type f | LC_ALL=C sort) | sha256sum | cut -d' ' -f1)
if [ -f "$dir/dist/.built-from" ] && [ "$(cat "$dir/dist/.built-from")" = "$stamp" ] &&
    [ -f "$dir/dist/index.html" ]; then
    echo "$PWD/$dir/dist"
    exit 0
fi

export npm_config_cache="$cache/npm" npm_config_prefer_offline=true npm_config_audit=false \
    npm_config_fund=false npm_config_update_notifier=false npm_config_loglevel=error
(cd "$dir" && npm ci --no-progress >/dev/null) ||
    die "npm ci failed in $dir (its output is above): with an empty cache it needs the npm registry once"
(cd "$dir" && node node_modules/typescript/bin/tsc --noEmit -p .) ||
    die "the type check (tsc) failed: its errors are above"
rm -rf "$dir/dist"
(cd "$dir" && node build.mjs) || die "the bundle (esbuild) failed: its errors are above"
[ -f "$dir/dist/index.html" ] && [ -d "$dir/dist/assets" ] ||
    die "build.mjs made no dist/index.html and dist/assets/"
echo "$stamp" >"$dir/dist/.built-from"
echo "$PWD/$dir/dist"
