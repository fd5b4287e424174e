#!/usr/bin/env bash
# What PostgreSQL writes during one hodei-bench run: rows inserted, updated (HOT or not) and
# deleted per table, and the WAL the run made, by record type and by relation.
#
#   bench/scripts/pg_writes.sh target/release/hodei-bench throughput --jobs 20000
#
# Needs HODEI_DATABASE_URL (as the bench does), the pg_walinspect extension in the `postgres`
# database (`CREATE EXTENSION pg_walinspect`, PostgreSQL 15+, a superuser), and the run's WAL
# still on disk at the end: set wal_keep_size above the run's WAL (about 17 KB a job) first,
# e.g. `ALTER SYSTEM SET wal_keep_size = '4GB'; SELECT pg_reload_conf();`.
# Writes bench.txt, tables.txt, wal_records.txt and wal_relations.txt in $OUT (default
# ./pg-writes) and prints them. Run nothing else against the server meanwhile.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 <hodei-bench> <scenario> [args...]" >&2
    exit 2
fi
: "${HODEI_DATABASE_URL:?set HODEI_DATABASE_URL}"
server="${HODEI_DATABASE_URL%/*}"
out="${OUT:-pg-writes}"
mkdir -p "$out"
sql() { psql -Atq -F' ' "$server/$1" -c "$2"; }

start="$(sql postgres "SELECT pg_current_wal_lsn()")"
"$@" >"$out/bench.txt" 2>&1 &
bench=$!
# The bench makes a database of its own and drops it at the end: read its statistics and its
# relations' file numbers while it runs, keeping the last reading.
while kill -0 "$bench" 2>/dev/null; do
    db="$(sql postgres "SELECT datname FROM pg_database
        WHERE datname NOT IN ('postgres', 'template0', 'template1', 'hodei')
        ORDER BY oid DESC LIMIT 1" || true)"
    if [ -n "$db" ]; then
        sql "$db" "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del
            FROM pg_stat_user_tables WHERE n_tup_ins + n_tup_upd + n_tup_del > 0
            ORDER BY n_tup_ins + n_tup_upd + n_tup_del DESC" >"$out/tables.new" 2>/dev/null &&
            mv "$out/tables.new" "$out/tables.txt" || true
        sql "$db" "SELECT pg_relation_filenode(oid), relname FROM pg_class
            WHERE pg_relation_filenode(oid) IS NOT NULL" >"$out/relations.new" 2>/dev/null &&
            mv "$out/relations.new" "$out/relations.txt" || true
    fi
    sleep 1
done
wait "$bench"
end="$(sql postgres "SELECT pg_current_wal_lsn()")"

sql postgres "SELECT \"resource_manager/record_type\", count, record_size + fpi_size
    FROM pg_get_wal_stats('$start', '$end', true) WHERE count > 0 ORDER BY count DESC" \
    >"$out/wal_records.txt"
sql postgres "SELECT substring(block_ref FROM 'rel [0-9]+/[0-9]+/([0-9]+)'), count(*),
        sum(record_length)
    FROM pg_get_wal_records_info('$start', '$end') WHERE block_ref IS NOT NULL
    GROUP BY 1 ORDER BY 2 DESC LIMIT 40" |
    awk 'NR == FNR { name[$1] = $2; next } { print (($1 in name) ? name[$1] : $1), $2, $3 }' \
        "$out/relations.txt" - >"$out/wal_relations.txt"

grep -E "jobs/s" "$out/bench.txt" | head -3 || true
echo "WAL: $(sql postgres "SELECT pg_size_pretty(pg_wal_lsn_diff('$end', '$start'))")"
echo "-- rows: table, inserted, updated, of which HOT, deleted"
cat "$out/tables.txt"
echo "-- WAL records: type, count, bytes"
cat "$out/wal_records.txt"
echo "-- WAL records by relation: relation, records, bytes"
cat "$out/wal_relations.txt"
