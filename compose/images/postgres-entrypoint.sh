#!/bin/sh
# hodei/postgres's entry point, run as `postgres` (uid 10001). On the first start (no cluster
# in $PGDATA) it makes the cluster: superuser $POSTGRES_USER (default postgres) with password
# $POSTGRES_PASSWORD (required), scram-sha-256 for every connection over the network, trust on
# the container's own socket, and the database $POSTGRES_DB (default hodei). Then it runs the
# server on every address, JIT off (the image has no LLVM), with any options given as
# arguments (`-c max_connections=200`). A first argument that is not an option is run instead
# (`psql ...`).
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

PGDATA="${PGDATA:-/var/lib/postgresql/data/pgdata}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "hodei-postgres: set POSTGRES_PASSWORD to make the cluster" >&2
        exit 1
    fi
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-hodei}"
    case "$user$db" in
    *[!A-Za-z0-9_]*)
        echo "hodei-postgres: POSTGRES_USER and POSTGRES_DB take letters, digits and _ only" >&2
        exit 1
        ;;
    esac
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        echo "CREATE DATABASE $db" | postgres --single -D "$PGDATA" -c jit=off postgres >/dev/null
    fi
    echo "hodei-postgres: made the cluster in $PGDATA (superuser $user, database $db)" >&2
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c jit=off "$@"
