#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests: `postgres.sh start DIR` makes a cluster in DIR, starts it on a free
# loopback port and prints its DSN (postgresql://postgres@127.0.0.1:PORT); `postgres.sh stop DIR` stops it.
# For the outage tests: `restart DIR` (pg_ctl restart -m fast: every session is ended), `down DIR` (a fast
# shutdown) and `up DIR` (started again on the same port).
# Needs Debian's postgresql package (its binaries under /usr/lib/postgresql/<version>/bin).
set -euo pipefail
action=$1 dir=$(realpath -m "$2")
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "postgres.sh: no PostgreSQL under /usr/lib/postgresql" >&2; exit 1; }
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }  # it refuses root
case $action in
start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    as_owner "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >"$dir/initdb.log"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=${PG_MAX_CONNECTIONS:-300}" >"$dir/options"
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 start -o "$(cat "$dir/options")" >/dev/null
    echo "postgresql://postgres@127.0.0.1:$port" ;;
stop)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null ;;
restart)
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w -t 30 restart \
        -o "$(cat "$dir/options")" >/dev/null ;;
down)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null ;;
up)
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 start -o "$(cat "$dir/options")" >/dev/null ;;
*)
    echo "usage: postgres.sh start|stop|restart|down|up DIR" >&2; exit 2 ;;
esac
