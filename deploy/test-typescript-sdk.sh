#!/usr/bin/env bash
# Checks the TypeScript SDK (sdk/typescript): installs its dev dependencies (npm ci, with
# npm's cache under the Nullspace cache: offline once warm), builds it (ES modules and
# CommonJS, with declarations), packs it and checks the tarball (its files, types for
# both formats, `require` and `import` from a project it is unpacked into, a strict
# TypeScript consumer of each format), then runs its tests (node --test: offline ones and
# live ones) against a live stack of its own (deploy/with-stack.sh).
#
#   deploy/test-typescript-sdk.sh [BIN_DIR]     (default: $CARGO_TARGET_DIR/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
export NULLSPACE_BIN=${1:-${CARGO_TARGET_DIR:-$cache/target}/debug}
sdk=$PWD/sdk/typescript

die() { echo "[typescript-sdk] ✗ $*" >&2; exit 1; }
say() { echo "[typescript-sdk] $*" >&2; }

# Node 20 or newer, and npm. (Debian bookworm's own nodejs is 18: too old.)
fix="install Node.js 20 or newer with npm (NodeSource's nodejs 20.x package for Debian, or the nodejs.org tarball), then run this again"
command -v node >/dev/null || die "node is not installed: $fix"
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || die "node $(node --version) is too old for the TypeScript SDK: $fix"
command -v npm >/dev/null || die "npm is not installed: $fix"

# npm's cache lives with the rest of the Nullspace cache; a warm one needs no network.
export npm_config_cache="$cache/npm" npm_config_prefer_offline=true npm_config_audit=false \
    npm_config_fund=false npm_config_update_notifier=false npm_config_loglevel=error
start=$SECONDS
(cd "$sdk" && npm ci --no-progress >/dev/null) ||
    die "npm ci failed in sdk/typescript (its output is above): with an empty cache it needs the npm registry once"
(cd "$sdk" && node scripts/build.mjs) || die "the build (tsc) failed: its errors are above"
say "✓ installed and built ($((SECONDS - start)) s)"

# The tarball: what a user installs.
work=$(mktemp -d /tmp/nullspace-ts-pack-XXXXXX)
trap 'rm -rf "$work"' EXIT
(cd "$sdk" && npm pack --ignore-scripts --pack-destination "$work" >/dev/null)
tarball=$(ls "$work"/nullspace-*.tgz)
listing=$(tar -tzf "$tarball")
for f in package/package.json package/README.md \
    package/dist/esm/index.js package/dist/esm/index.d.ts package/dist/esm/sandbox.d.ts \
    package/dist/cjs/index.js package/dist/cjs/index.d.ts package/dist/cjs/sandbox.d.ts \
    package/dist/cjs/package.json; do
    grep -qx "$f" <<<"$listing" || die "the tarball lacks $f"
done
if grep -E '^package/(src|test|scripts|node_modules)/' <<<"$listing" >/dev/null; then
    die "the tarball carries sources or tests: $(grep -E '^package/(src|test|scripts|node_modules)/' <<<"$listing" | head -3)"
fi
# Unpacked into a project of its own, next to its one dependency (ws) and Node's types.
app=$work/app
mkdir -p "$app/node_modules/@types"
tar -xzf "$tarball" -C "$work" && mv "$work/package" "$app/node_modules/nullspace"
ln -s "$sdk/node_modules/ws" "$app/node_modules/ws"
ln -s "$sdk/node_modules/@types/node" "$app/node_modules/@types/node"
echo '{ "name": "app", "private": true }' >"$app/package.json"
(
    cd "$app"
    cjs=$(node -e 'const n = require("nullspace"); if (typeof n.Sandbox.create !== "function") throw new Error("no Sandbox.create"); console.log(Object.keys(n).sort().join(" "))')
    esm=$(node --input-type=module -e 'const n = await import("nullspace"); if (typeof n.Sandbox.create !== "function") throw new Error("no Sandbox.create"); console.log(Object.keys(n).sort().join(" "))')
    [ "$cjs" = "$esm" ] || { echo "require and import export different names:"; diff <(tr ' ' '\n' <<<"$cjs") <(tr ' ' '\n' <<<"$esm"); exit 1; }
    # Strict TypeScript consumers of each format resolve the package's own declarations.
    printf '%s\n' 'import { Sandbox, NotFoundError, type SandboxInfo } from "nullspace";' \
        'export async function f(): Promise<SandboxInfo> { const s = await Sandbox.create("base", { timeout: 60 }); return s.getInfo(); }' \
        'export const e: NotFoundError | undefined = undefined;' >esm.mts
    printf '%s\n' 'import nullspace = require("nullspace");' \
        'export async function f(): Promise<nullspace.SandboxInfo> { const s = await nullspace.Sandbox.create("base", { timeout: 60 }); return s.getInfo(); }' >cjs.cts
    node "$sdk/node_modules/typescript/bin/tsc" --noEmit --strict --module nodenext --target es2022 --types node esm.mts cjs.cts
    # A mistake in a consumer is caught by those declarations.
    echo 'import { Sandbox } from "nullspace"; await Sandbox.create("base", { timeout: "60" });' >bad.mts
    if node "$sdk/node_modules/typescript/bin/tsc" --noEmit --strict --module nodenext --target es2022 --types node bad.mts >/dev/null; then
        echo "the declarations accepted a string timeout"; exit 1
    fi
) || die "the packed tarball does not work as installed (above)"
say "✓ npm pack: $(basename "$tarball"), $(wc -l <<<"$listing") files, ES modules and CommonJS with types"

# The tests: offline ones, then live ones, on a stack of their own (2 files at a time,
# each test bounded).
NULLSPACE_TEAM_QUOTA=6 deploy/with-stack.sh node --test --test-concurrency=2 --test-timeout=300000 \
    "$sdk"/test/offline/*.test.mjs "$sdk"/test/live/*.test.mjs
