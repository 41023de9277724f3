#!/usr/bin/env bash
# A cluster of Nullspace hosts on this machine (Debian bookworm, root), for development
# and the end-to-end tests: PostgreSQL (the catalog the hosts share) and SeaweedFS (the
# bucket their snapshots share), N pool managers each in a network namespace of its own
# with its own address, and the public API (nullspace-api) in front of host 1.
#
#   deploy/cluster.sh up [--hosts N]   start N hosts (1 to 20, default 3); writes DIR/dev.env
#   deploy/cluster.sh down             stop everything (VMs included) and remove what up made
#
# The network: a bridge (NAME + br0) at SUBNET.1/24 in this namespace; host i in the
# namespace NAME-host-i, its end of a veth pair (NAME + p + i, `eth0` in there) at
# SUBNET.(10+i), the bridge's end NAME + v + i (`ip link set NAMEv2 down` cuts host 2
# off: a partition). PostgreSQL, SeaweedFS and the public API listen on SUBNET.1; each
# host on its own address (control :7070, edge :7071, previews :7072). The namespaces
# have no route out: guests reach no outside network. (10.78.0.0/16 is no subnet the
# pool manager uses: each VM's own namespace has 10.0.2.0/24; tests/src/netns.rs uses
# 198.18.0.0/16. A firewall that filters bridged traffic, br_netfilter with a FORWARD
# policy of DROP, would cut the hosts off from each other.)
#
# Everything it makes is under DIR (state, logs, PID files, what `down` needs), but the
# hosts' VM run directories (tmpfs: /dev/shm/nullspace-cluster-NAME/host-i). `up`
# refuses to start over a cluster DIR holds (running or not): `down` first. The pool
# managers run with `--on-exit end`: stopping them ends their VMs; `down` kills any
# QEMU a host left in its run directory.
#
# It builds nothing: it needs the binaries (`deploy/up.sh` builds them, or cargo), the
# guest images and the API component (deploy/build.sh), PostgreSQL's packages and root.
#
# Environment:
#   NULLSPACE_CLUSTER_DIR        DIR (default /tmp/nullspace-cluster)
#   NULLSPACE_CLUSTER_NAME       NAME: prefix of its interfaces and namespaces, 1 to 10
#                                lower-case letters and digits (default nscl)
#   NULLSPACE_CLUSTER_SUBNET     SUBNET: the /24's first three numbers (default 10.78.0)
#   NULLSPACE_BIN_DIR            the built binaries (default $CARGO_TARGET_DIR/release)
#   NULLSPACE_API_COMPONENT      the public API component (default from the cache)
#   NULLSPACE_CLUSTER_TEMPLATES_DIR  template snapshots the hosts share (default DIR/templates)
#   NULLSPACE_CLUSTER_OWNER_PID  a process whose end takes the cluster down (tests: a
#                                test killed by its timeout leaves nothing behind)
#   NULLSPACE_CLUSTER_PG_PORT    PostgreSQL's port on SUBNET.1 (default 7432)
#   NULLSPACE_CLUSTER_S3_PORT    SeaweedFS's base port (default 7333; it takes BASE to
#                                BASE+5 and BASE+10000 to BASE+10004, some of them on
#                                127.0.0.1 too: two clusters need two bases)
#   NULLSPACE_CLUSTER_SERVE_FLAGS  extra `serve` flags for every host (word-split)
#   NULLSPACE_WORKSPACE_TEMPLATES  which workspace templates each host builds (default
#                                off: minutes each under emulation; `all` for the three)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
self="$root/deploy/cluster.sh"
. "$root/deploy/lib.sh"
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
dir=$(realpath -m "${NULLSPACE_CLUSTER_DIR:-/tmp/nullspace-cluster}")
conf="$dir/cluster.env"
usage="usage: deploy/cluster.sh up [--hosts N] | down"

# Whether process $1 runs (a zombie, ended but not yet reaped by its parent, does not).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [ "$(cut -d' ' -f1 <<<"${stat##*) }")" != Z ]
}

# Waits up to $2 tenths of a second for process $1 to end.
wait_gone() {
    for _ in $(seq 1 "$2"); do
        alive "$1" || return 0
        sleep 0.1
    done
    ! alive "$1"
}

# The PID in file $1 if that process still runs and its command line contains $2 (not
# a stale file's reused PID).
live_pid() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$2" || return 1
    echo "$pid"
}

# QEMU processes of the VMs in run directory $1.
qemus_in() {
    local p
    for p in /proc/[0-9]*; do
        tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q "qemu-system.*$1/" && echo "${p#/proc/}"
    done
    return 0
}

down() {
    if [ ! -f "$conf" ]; then
        echo "[nullspace] no cluster in $dir (nothing to stop)" >&2
        # A half-made DIR of an `up` that died before writing its config.
        [ -d "$dir" ] && rm -rf "$dir"
        return 0
    fi
    # shellcheck source=/dev/null
    . "$conf"
    local pid i pids=() qemus
    # The owner's watch first (unless this is it, taking the cluster down).
    if pid=$(live_pid "$dir/pids/watch.pid" "cluster.sh") && [ "$pid" != $$ ]; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # The API, then every pool manager at once: each ends its VMs (--on-exit end).
    if pid=$(live_pid "$dir/pids/api.pid" "nullspace-api"); then
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid" 100 || kill -KILL "$pid" 2>/dev/null || true
        echo "[nullspace] stopped the public API" >&2
    fi
    for i in $(seq 1 "$HOSTS"); do
        if pid=$(live_pid "$dir/pids/host-$i.pid" "$dir/host-$i"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$i:$pid")
        fi
    done
    for entry in "${pids[@]}"; do
        i=${entry%%:*} pid=${entry#*:}
        if ! wait_gone "$pid" 300; then
            echo "[nullspace] host-$i's pool manager did not stop within 30 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone "$pid" 50 || true
        fi
        echo "[nullspace] stopped host-$i (and its VMs)" >&2
    done
    # Whatever else runs in the namespaces (a pool manager whose PID file an interrupted
    # `up` never wrote, a command run there).
    for i in $(seq 1 "$HOSTS"); do
        if [ -e "/run/netns/$NAME-host-$i" ]; then
            for pid in $(ip netns pids "$NAME-host-$i" 2>/dev/null); do
                kill -KILL "$pid" 2>/dev/null || true
                wait_gone "$pid" 50 || true
            done
        fi
    done
    # VMs a pool manager left (one killed, or one that could not end them all); each VM
    # has a namespace of its own, not its host's.
    for i in $(seq 1 "$HOSTS"); do
        qemus=$(qemus_in "$RUN_BASE/host-$i")
        if [ -n "$qemus" ]; then
            echo "[nullspace] killing host-$i's leftover VMs: $(tr "\n" " " <<<"$qemus")" >&2
            # shellcheck disable=SC2086
            kill -KILL $qemus 2>/dev/null || true
            for pid in $qemus; do wait_gone "$pid" 100 || echo "[nullspace] QEMU $pid does not end" >&2; done
        fi
    done
    # The namespaces (their veths go with them), any veth left, the bridge.
    for i in $(seq 1 "$HOSTS"); do
        if [ -e "/run/netns/$NAME-host-$i" ]; then
            ip netns del "$NAME-host-$i" 2>/dev/null || true
        fi
        ip link del "${NAME}v$i" 2>/dev/null || true
    done
    ip link del "${NAME}br0" 2>/dev/null || true
    # The shared services last (both at once: each takes seconds).
    "$root/deploy/seaweedfs.sh" stop "$dir/s3" &
    local weed=$!
    "$root/deploy/postgres.sh" stop "$dir/postgres" || true
    wait "$weed" || true
    rm -rf "$RUN_BASE" "$dir"
    echo "[nullspace] the cluster in $dir is down" >&2
}

up() {
    local hosts=3
    while [ $# -gt 0 ]; do
        case "$1" in
        --hosts)
            hosts=${2:?$usage}
            shift 2
            ;;
        *) echo "$usage" >&2; exit 2 ;;
        esac
    done
    [[ "$hosts" =~ ^[0-9]+$ ]] && [ "$hosts" -ge 1 ] && [ "$hosts" -le 20 ] ||
        die "--hosts $hosts: send 1 to 20"
    local cl=${NULLSPACE_CLUSTER_NAME:-nscl} subnet=${NULLSPACE_CLUSTER_SUBNET:-10.78.0}
    [[ "$cl" =~ ^[a-z0-9]{1,10}$ ]] ||
        die "NULLSPACE_CLUSTER_NAME=$cl: send 1 to 10 lower-case letters or digits (it prefixes interface names, at most 15 characters)"
    [[ "$subnet" =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] &&
        [ "${BASH_REMATCH[1]}" -le 255 ] && [ "${BASH_REMATCH[2]}" -le 255 ] && [ "${BASH_REMATCH[3]}" -le 255 ] ||
        die "NULLSPACE_CLUSTER_SUBNET=$subnet: send the first three numbers of a free /24, e.g. 10.78.0"

    # Everything it needs, each with its fix, before anything is made.
    [ "$(id -u)" = 0 ] || die "run deploy/cluster.sh as root (namespaces, veths, a bridge; the pool managers run VMs as root)"
    local tool
    for tool in ip nsenter runuser curl; do
        command -v "$tool" >/dev/null || die "no \`$tool\`: apt-get install iproute2 util-linux curl (deploy/install-deps.sh installs them)"
    done
    local target=${CARGO_TARGET_DIR:-$cache/target}
    local bin=${NULLSPACE_BIN_DIR:-$target/release}
    local b
    for b in nullspace-pool-manager nullspace-api; do
        [ -x "$bin/$b" ] ||
            die "no $bin/$b: build it with \`CARGO_TARGET_DIR=$target cargo build --release --locked -p pool-manager -p api-host --bins\` (or set NULLSPACE_BIN_DIR to a target/debug that \`cargo build --workspace --bins\` made)"
    done
    local component=${NULLSPACE_API_COMPONENT:-$cache/components/nullspace-api.wasm}
    [ -f "$component" ] || die "no API component at $component: run deploy/build-component.sh (or set NULLSPACE_API_COMPONENT)"
    local images=${NULLSPACE_IMAGES:-$cache/images/current}
    [ -e "$images" ] || die "no guest images at $images: run deploy/build.sh (or set NULLSPACE_IMAGES)"
    "$root/deploy/postgres.sh" version >/dev/null

    if [ -e "$conf" ]; then
        die "a cluster was started from $dir (running or not): \`deploy/cluster.sh down\` first (with the same NULLSPACE_CLUSTER_DIR), or set another NULLSPACE_CLUSTER_DIR"
    fi
    local bridge="${cl}br0" i
    ip link show "$bridge" >/dev/null 2>&1 &&
        die "the bridge $bridge exists: another cluster named $cl runs (its \`deploy/cluster.sh down\`), or set another NULLSPACE_CLUSTER_NAME"
    for i in $(seq 1 "$hosts"); do
        [ -e "/run/netns/$cl-host-$i" ] &&
            die "the namespace $cl-host-$i exists: another cluster named $cl runs, or set another NULLSPACE_CLUSTER_NAME"
        ip link show "${cl}v$i" >/dev/null 2>&1 &&
            die "the interface ${cl}v$i exists: another cluster named $cl runs, or set another NULLSPACE_CLUSTER_NAME"
    done
    local pg_port=${NULLSPACE_CLUSTER_PG_PORT:-7432} s3_port=${NULLSPACE_CLUSTER_S3_PORT:-7333}
    [[ "$pg_port" =~ ^[0-9]+$ ]] && [ "$pg_port" -ge 1 ] && [ "$pg_port" -le 65535 ] ||
        die "NULLSPACE_CLUSTER_PG_PORT=$pg_port: send a TCP port"
    [[ "$s3_port" =~ ^[0-9]+$ ]] && [ "$s3_port" -ge 1 ] && [ "$s3_port" -le 55530 ] ||
        die "NULLSPACE_CLUSTER_S3_PORT=$s3_port: send a TCP port up to 55530 (it takes ports up to 10005 above)"
    [[ "${NULLSPACE_CLUSTER_OWNER_PID:-1}" =~ ^[1-9][0-9]*$ ]] ||
        die "NULLSPACE_CLUSTER_OWNER_PID=$NULLSPACE_CLUSTER_OWNER_PID: send a process ID"
    local taken
    taken=$(ip -o -4 addr show | awk -v p="$subnet." 'index($4, p) == 1 { print $2 " " $4 }' | head -1)
    [ -z "$taken" ] || die "$subnet.0/24 is in use here ($taken): set NULLSPACE_CLUSTER_SUBNET to a free /24"

    # From here on, a failure takes down what was made.
    local run_base="/dev/shm/nullspace-cluster-$cl"
    mkdir -p "$dir/pids"
    chmod 711 "$dir" # the postgres user and QEMU (the VM users) go through it
    local gw="$subnet.1"
    cat >"$conf" <<CONF
NAME=$cl
SUBNET=$subnet
HOSTS=$hosts
RUN_BASE=$run_base
CONF
    trap 'status=$?; if [ "$status" -ne 0 ]; then echo "[nullspace] ✗ up failed; taking down what it made" >&2; down; fi' EXIT
    # The owner's watch: the owner's end (a test killed by its timeout) takes the
    # cluster down, whatever state it is in.
    if [ -n "${NULLSPACE_CLUSTER_OWNER_PID:-}" ]; then
        NULLSPACE_CLUSTER_DIR="$dir" setsid nohup bash -c \
            'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec "$2" down' \
            cluster.sh "$NULLSPACE_CLUSTER_OWNER_PID" "$self" >/dev/null 2>&1 </dev/null &
        echo $! >"$dir/pids/watch.pid"
    fi

    make_network() {
        ip link add "$bridge" type bridge || return
        ip addr add "$gw/24" dev "$bridge" || return
        ip link set "$bridge" up || return
        local i ns
        for i in $(seq 1 "$hosts"); do
            ns="$cl-host-$i"
            ip netns add "$ns" || return
            ip link add "${cl}v$i" type veth peer name "${cl}p$i" || return
            ip link set "${cl}p$i" netns "$ns" || return
            ip -n "$ns" link set "${cl}p$i" name eth0 || return
            ip -n "$ns" addr add "$subnet.$((10 + i))/24" dev eth0 || return
            ip -n "$ns" link set lo up || return
            ip -n "$ns" link set eth0 up || return
            ip link set "${cl}v$i" master "$bridge" up || return
        done
    }
    step "making the network ($bridge $gw/24, $hosts namespaces)" make_network

    local catalog s3
    catalog=$("$root/deploy/postgres.sh" start "$dir/postgres" "$pg_port" "$gw/24") ||
        die "PostgreSQL did not start (its log ends above): is $gw:$pg_port taken? set NULLSPACE_CLUSTER_PG_PORT"
    echo "[nullspace] ✓ PostgreSQL: $catalog" >&2
    s3=$("$root/deploy/seaweedfs.sh" start "$dir/s3" "$s3_port" "$gw") ||
        die "SeaweedFS did not start (its log ends above): its ports $s3_port to $((s3_port + 5)) and $((s3_port + 10000)) to $((s3_port + 10004)) must be free, on 127.0.0.1 too; another cluster's SeaweedFS holds them? set NULLSPACE_CLUSTER_S3_PORT"
    echo "[nullspace] ✓ SeaweedFS: $s3" >&2
    local pm="$bin/nullspace-pool-manager"
    step "migrating the catalog" "$pm" migrate --catalog "$catalog"

    local templates=${NULLSPACE_CLUSTER_TEMPLATES_DIR:-$dir/templates}
    mkdir -p "$templates" "$run_base"
    chmod 711 "$run_base"
    for i in $(seq 1 "$hosts"); do
        mkdir -p "$dir/host-$i" "$run_base/host-$i"
        chmod 711 "$dir/host-$i"
    done
    # A host that cannot run VMs stops here, with the fixes.
    step "checking the host (nullspace-pool-manager check)" \
        env NULLSPACE_RUN_DIR="$run_base/host-1" "$pm" check --state-dir "$dir/host-1"

    # One team and key for the whole cluster.
    "$pm" admin team create dev --catalog "$catalog" --state-dir "$dir/host-1" >/dev/null ||
        die "creating the team dev in the catalog failed (the error is above)"
    local key
    key=$("$pm" admin key create --team dev --catalog "$catalog" --state-dir "$dir/host-1") ||
        die "making an API key for the team dev failed (the error is above)"

    export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-nullspace-dev}
    export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-nullspace-dev}
    local addr
    for i in $(seq 1 "$hosts"); do
        addr="$subnet.$((10 + i))"
        # shellcheck disable=SC2086 # extra flags are words
        NULLSPACE_RUN_DIR="$run_base/host-$i" setsid nohup \
            nsenter --net="/run/netns/$cl-host-$i" -- \
            "$pm" serve --listen "$addr:7070" --edge-listen "$addr:7071" --preview-listen "$addr:7072" \
            --host-id "host-$i" --advertise-host "$addr" --state-dir "$dir/host-$i" \
            --catalog "$catalog" --templates-dir "$templates" --on-exit end \
            --snapshot-store s3 --s3-endpoint "$s3" --s3-bucket nullspace \
            --workspace-templates "${NULLSPACE_WORKSPACE_TEMPLATES:-off}" \
            ${NULLSPACE_CLUSTER_SERVE_FLAGS:-} \
            >"$dir/host-$i/pool-manager.log" 2>&1 </dev/null &
        echo $! >"$dir/pids/host-$i.pid"
    done

    wait_hosts() {
        local i started=$SECONDS log pid
        for i in $(seq 1 "$hosts"); do
            log="$dir/host-$i/pool-manager.log"
            pid=$(cat "$dir/pids/host-$i.pid")
            until grep -q "template snapshots ready" "$log" 2>/dev/null; do
                if ! kill -0 "$pid" 2>/dev/null || grep -q "template snapshots failed" "$log"; then
                    echo "[nullspace] ✗ host-$i's pool manager stopped; its log ($log) ends:" >&2
                    tail -20 "$log" >&2
                    return 1
                fi
                if [ $((SECONDS - started)) -ge 600 ]; then
                    echo "[nullspace] ✗ host-$i: no template snapshots after 600 s; its log ends:" >&2
                    tail -20 "$log" >&2
                    return 1
                fi
                sleep 0.5
            done
        done
        # Each registered and heartbeating.
        local listed
        while :; do
            listed=$("$pm" admin host list --catalog "$catalog" --state-dir "$dir/host-1") || return
            [ "$(grep -c '"state":"ready"' <<<"$listed")" -ge "$hosts" ] && return 0
            if [ $((SECONDS - started)) -ge 600 ]; then
                echo "[nullspace] ✗ not every host registered ready; the catalog lists:" >&2
                echo "$listed" >&2
                return 1
            fi
            sleep 0.5
        done
    }
    step "starting $hosts pool managers and making the template snapshots" wait_hosts

    local public="$gw:7080"
    setsid nohup "$bin/nullspace-api" --component "$component" --listen "$public" \
        --pool-manager "http://$subnet.11:7070" >"$dir/api.log" 2>&1 </dev/null &
    echo $! >"$dir/pids/api.pid"
    wait_api() {
        local pid
        pid=$(cat "$dir/pids/api.pid")
        for _ in $(seq 1 240); do
            grep -q "public API http://" "$dir/api.log" 2>/dev/null && return 0
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        echo "[nullspace] ✗ the public API did not start; its log ($dir/api.log) ends:" >&2
        tail -20 "$dir/api.log" >&2
        return 1
    }
    step "starting the public API" wait_api

    umask 077
    {
        echo "NULLSPACE_API_URL=http://$public"
        echo "NULLSPACE_API_KEY=$key"
        echo "NULLSPACE_DATA_PLANE_URL=http://$subnet.11:7071"
        echo "NULLSPACE_CATALOG=$catalog"
        echo "NULLSPACE_S3_ENDPOINT=$s3"
        echo "NULLSPACE_CLUSTER_DIR=$dir"
        echo "NULLSPACE_CLUSTER_HOSTS=$hosts"
        for i in $(seq 1 "$hosts"); do
            addr="$subnet.$((10 + i))"
            echo "NULLSPACE_HOST_${i}_ID=host-$i"
            echo "NULLSPACE_HOST_${i}_ADDR=$addr"
            echo "NULLSPACE_HOST_${i}_CONTROL_URL=http://$addr:7070"
            echo "NULLSPACE_HOST_${i}_EDGE_URL=http://$addr:7071"
            echo "NULLSPACE_HOST_${i}_NETNS=$cl-host-$i"
            echo "NULLSPACE_HOST_${i}_LINK=${cl}v$i"
            echo "NULLSPACE_HOST_${i}_STATE_DIR=$dir/host-$i"
            echo "NULLSPACE_HOST_${i}_RUN_DIR=$run_base/host-$i"
        done
    } >"$dir/dev.env"
    umask 022
    trap - EXIT

    cat <<MSG

A Nullspace cluster of $hosts hosts runs on this machine:
  public API   http://$public/api/v1   (in front of host-1)
  API key      $key
  hosts        $(for i in $(seq 1 "$hosts"); do printf 'host-%s %s  ' "$i" "$subnet.$((10 + i))"; done)
               (control :7070, edge :7071; namespace $cl-host-N, link ${cl}vN)
  catalog      $catalog
  snapshots    $s3 (bucket nullspace)
  env file     $dir/dev.env
  logs         $dir/host-N/pool-manager.log, $dir/api.log

  set -a; . $dir/dev.env; set +a
  curl -s -XPOST \$NULLSPACE_API_URL/api/v1/sandboxes -H "X-API-Key: \$NULLSPACE_API_KEY" \\
       -d '{"templateID":"minimal"}'
  ip link set ${cl}v2 down   # partition host-2 (ip link set ${cl}v2 up heals it)

Stop everything (VMs included) with: deploy/cluster.sh down
MSG
}

case "${1:-}" in
up)
    shift
    up "$@"
    ;;
down)
    [ $# -eq 1 ] || { echo "$usage" >&2; exit 2; }
    [ "$(id -u)" = 0 ] || die "run deploy/cluster.sh as root"
    down
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
