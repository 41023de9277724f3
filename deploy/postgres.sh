#!/usr/bin/env bash
# PostgreSQL (Debian's packages, the newest version installed) on loopback, for the
# catalog's tests and for development: a cluster of its own in DIR, owned by the
# postgres user, listening on 127.0.0.1 only, with its unix socket inside DIR (no
# socket in a shared directory), trust auth on 127.0.0.1 only, fsync on.
#
#   deploy/postgres.sh start DIR [PORT]   start (if not already running); prints the URL
#                                         postgres://postgres@127.0.0.1:PORT/postgres
#   deploy/postgres.sh start DIR PORT ADDR/PREFIX
#                                         the same, listening on ADDR (an address of this
#                                         host, e.g. a bridge's) instead of 127.0.0.1 and
#                                         trusting the network ADDR/PREFIX too (network
#                                         namespaces behind that bridge: deploy/cluster.sh);
#                                         prints postgres://postgres@ADDR:PORT/postgres
#   deploy/postgres.sh stop DIR           stop the cluster in DIR; no process is left
#   deploy/postgres.sh version            the server version it would run
#
# Needs root (the cluster runs as the postgres user) or the postgres user itself.
set -euo pipefail
usage="usage: postgres.sh start DIR [PORT [ADDR/PREFIX]] | stop DIR | version"
action=${1:?$usage}

die() {
    echo "[postgres] ✗ $*" >&2
    exit 1
}

# The newest installed server's binaries (/usr/lib/postgresql/<version>/bin).
bindir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1 || true)
need_binaries() {
    [ -n "$bindir" ] && [ -x "$bindir/postgres" ] && [ -x "$bindir/initdb" ] && [ -x "$bindir/pg_ctl" ] ||
        die "no PostgreSQL server binaries under /usr/lib/postgresql/<version>/bin: apt-get install postgresql (deploy/install-deps.sh installs it)"
}

if [ "$action" = version ]; then
    need_binaries
    "$bindir/postgres" --version
    exit 0
fi

dir=${2:?$usage}
port=${3:-19543}
clients=${4:-}
listen=127.0.0.1
if [ -n "$clients" ]; then
    [[ "$clients" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$ ]] ||
        die "ADDR/PREFIX $clients: send this host's address on the clients' network with its prefix, e.g. 10.78.0.1/24"
    listen=${clients%/*}
fi
dir=$(realpath -m "$dir")
data="$dir/data"
sockets="$dir/run"
log="$dir/postgres.log"
url="postgres://postgres@$listen:$port/postgres"

# Runs a command as the postgres user.
as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# The postmaster of DIR's cluster, if it runs (a PID in postmaster.pid that is a
# postgres of this data directory, not a stale file's reused PID).
postmaster() {
    local pid
    [ -f "$data/postmaster.pid" ] || return 1
    pid=$(head -1 "$data/postmaster.pid" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$data" || return 1
    echo "$pid"
}

# Waits up to $2 tenths of a second for process $1 to end.
wait_gone() {
    for _ in $(seq 1 "$2"); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    ! kill -0 "$1" 2>/dev/null
}

stop() {
    local pid
    pid=$(postmaster) || return 0
    # Fast shutdown (SIGINT): sessions end, the cluster checkpoints; then immediate
    # (SIGQUIT); then SIGKILL for the postmaster and whatever it left.
    kill -INT "$pid" 2>/dev/null || true
    wait_gone "$pid" 300 && return 0
    kill -QUIT "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 && return 0
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 50 || die "postgres $pid (of $data) did not stop"
}

case "$action" in
stop) stop; exit 0 ;;
start) ;;
*) echo "$usage" >&2; exit 2 ;;
esac

need_binaries
[[ "$port" =~ ^[0-9]+$ ]] || die "PORT $port: send a TCP port number"
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "no postgres user: apt-get install postgresql (its packages make it)"
elif [ "$(id -un)" != postgres ]; then
    die "run deploy/postgres.sh as root (the cluster runs as the postgres user) or as postgres"
fi

if pid=$(postmaster); then
    # Already running from DIR: say where (its port, which may not be PORT).
    running_port=$(sed -n 4p "$data/postmaster.pid")
    running_addr=$(sed -n 6p "$data/postmaster.pid")
    echo "postgres://postgres@${running_addr:-127.0.0.1}:$running_port/postgres"
    exit 0
fi

mkdir -p "$dir"
if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$dir"
fi
chmod 700 "$dir"
as_postgres test -w "$dir" ||
    die "the postgres user cannot write to $dir: pick a DIR whose parents it may enter (e.g. under /tmp)"
as_postgres mkdir -p "$sockets"
if [ ! -f "$data/PG_VERSION" ]; then
    as_postgres "$bindir/initdb" -D "$data" --username=postgres --encoding=UTF8 --no-locale \
        --auth-local=peer --auth-host=reject >"$dir/initdb.log" 2>&1 ||
        { tail -20 "$dir/initdb.log" >&2; die "initdb failed (its log is above, and in $dir/initdb.log)"; }
    as_postgres tee -a "$data/postgresql.conf" >/dev/null <<EOF

# deploy/postgres.sh: loopback only (or the address given at start), its socket
# inside its own directory, durable.
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sockets'
fsync = on
synchronous_commit = on
full_page_writes = on
max_connections = 300
EOF
fi
# Trust for 127.0.0.1 (tests and development on this host) and, when given, for the
# clients' network; the socket, in DIR, for the postgres user only; nothing else.
# Written at each start: it follows ADDR/PREFIX.
{
    echo "# Written by deploy/postgres.sh."
    echo "local all postgres peer"
    echo "host  all all 127.0.0.1/32 trust"
    if [ -n "$clients" ]; then
        echo "host  all all $clients trust"
    fi
} | as_postgres tee "$data/pg_hba.conf" >/dev/null

if ! as_postgres "$bindir/pg_ctl" -D "$data" -l "$log" \
    -o "-p $port -c listen_addresses=$listen" -w -t 60 start >&2; then
    echo "PostgreSQL did not start; its log ($log) ends:" >&2
    tail -20 "$log" >&2 || true
    stop
    exit 1
fi
if [ -x "$bindir/pg_isready" ] && ! "$bindir/pg_isready" -q -h "$listen" -p "$port" -t 30; then
    echo "PostgreSQL started but does not answer on $listen:$port; its log ($log) ends:" >&2
    tail -20 "$log" >&2 || true
    stop
    exit 1
fi
echo "$url"
