#!/bin/sh
# `hodei-compose-agent` (in hodei/agent): runs hodei-agent as a free agent slot of a compose
# deployment. NATS admits an agent only with the nkey made for its worker id, and the replicas
# of `docker-compose up --scale agent=N` are alike, so each one claims a slot: a worker id
# agent-K whose seed is /etc/hodei/agent-K.nk (made by hodei-compose-init). A slot is held by an
# exclusive flock on /var/lib/hodei/slots/agent-K.lock, in a volume every replica shares; the
# lock is held by a `sleep` that lives as long as the container, so it is released when the
# container stops or is killed, and the agent's jobs never inherit it. A container that
# restarts tries the slot it had first: the registry then sees the worker return as a new
# incarnation, which reports what the old one left in its work folder.
set -eu

keys=/etc/hodei
locks=/var/lib/hodei/slots
# In the container's own file system: survives a restart, not a new container.
last=/var/lib/hodei/work/.slot

claim() {
    [ -f "$keys/$1.nk" ] || return 1
    exec 9>>"$locks/$1.lock"
    if ! flock -n 9; then
        exec 9>&-
        return 1
    fi
    # The lock stays with this open file, which the sleeper keeps.
    sleep infinity &
    exec 9>&-
}

id=""
previous="$(cat "$last" 2>/dev/null || true)"
case "${previous#agent-}" in
"$previous" | '' | *[!0-9]*) previous="" ;;
esac
if [ -n "$previous" ] && claim "$previous"; then
    id="$previous"
else
    i=1
    while [ -f "$keys/agent-$i.nk" ]; do
        if claim "agent-$i"; then
            id="agent-$i"
            break
        fi
        i=$((i + 1))
    done
fi
if [ -z "$id" ]; then
    echo "hodei-compose-agent: every agent slot is taken; raise HODEI_AGENT_SLOTS" >&2
    exit 1
fi
echo "$id" >"$last"
echo "hodei-compose-agent: running as worker $id" >&2
HODEI_WORKER_ID="$id"
HODEI_NATS_NKEY_FILE="$keys/$id.nk"
HODEI_WORK_DIR="${HODEI_WORK_DIR:-/var/lib/hodei/work}/$id"
export HODEI_WORKER_ID HODEI_NATS_NKEY_FILE HODEI_WORK_DIR
exec /usr/local/bin/hodei-agent "$@"
