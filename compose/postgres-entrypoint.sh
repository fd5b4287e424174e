#!/bin/sh
# The hodei/postgres image's entry point: on first start, makes the cluster in $PGDATA with
# the superuser `postgres` (password $POSTGRES_PASSWORD, required for connections over the
# network) and the database $POSTGRES_DB (default hodei); then runs the server on every
# address. Runs as the image's user (hodei, uid 10001).
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
db="${POSTGRES_DB:-hodei}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username=postgres --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C -D "$PGDATA" >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k /var/run/postgresql" -w start >/dev/null
    createdb -h /var/run/postgresql -U postgres "$db"
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "hodei-postgres: made the cluster and database $db" >&2
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql
