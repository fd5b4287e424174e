#!/usr/bin/env bash
# Writes the files the Secrets of deploy/k8s/secrets are generated from, into
# deploy/k8s/secrets/files/ (git-ignored, readable by you only). Keeps every file already
# there, so running it again changes nothing; delete a file to make it anew.
#
#   deploy/k8s/secrets/make-secrets.sh [--namespace hodei] [--agents 8]
#       [--database-url postgres://USER:PASSWORD@HOST:5432/hodei] [--name EXTRA_TLS_NAME]...
#       [--agent-id WORKER_ID]...
#
#   --namespace     the namespace the overlay deploys to (default hodei): the server
#                   certificate is made valid for the gateway's and NATS' Service names in it
#   --agents        agent keys to make, hodei-agent-0 .. hodei-agent-(N-1) (default 8: the
#                   agents' HPA maxReplicas; a smaller number fails `kustomize build`)
#   --database-url  an existing PostgreSQL (overlays/external); without it, a random password
#                   for the trial's PostgreSQL and the URL that uses it
#   --name          another name the server certificate is valid for (a public DNS name of the
#                   gateway, an external NATS server's name); repeatable
#   --agent-id      a key for an agent with this worker id too (overlays/agent-daemonset: the
#                   node's name); repeatable
#
# Needs hodei-admin: $HODEI_ADMIN, else on PATH, else target/release or target/debug.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
FILES="$HERE/files"

namespace=hodei
agents=8
database_url=""
names=()
agent_ids=()
while [ $# -gt 0 ]; do
    case "$1" in
        --namespace) namespace="$2"; shift 2 ;;
        --agents) agents="$2"; shift 2 ;;
        --database-url) database_url="$2"; shift 2 ;;
        --name) names+=("$2"); shift 2 ;;
        --agent-id) agent_ids+=("$2"); shift 2 ;;
        -h | --help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "make-secrets: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$agents" in
    '' | *[!0-9]*) echo "make-secrets: --agents takes a number" >&2; exit 2 ;;
esac

admin="${HODEI_ADMIN:-}"
if [ -z "$admin" ]; then
    for candidate in "$(command -v hodei-admin || true)" "$ROOT/target/release/hodei-admin" \
        "$ROOT/target/debug/hodei-admin"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            admin="$candidate"
            break
        fi
    done
fi
if [ -z "$admin" ]; then
    echo "make-secrets: hodei-admin not found: build it (cargo build --bin hodei-admin) or set HODEI_ADMIN" >&2
    exit 1
fi

umask 077
mkdir -p "$FILES/tls" "$FILES/nats/agents"

# One CA and one server certificate, presented by the gateway and by the trial's NATS.
if [ ! -f "$FILES/tls/ca.pem" ]; then
    tls_names=(localhost 127.0.0.1)
    for service in hodei-api-gateway hodei-nats; do
        tls_names+=("$service" "$service.$namespace" "$service.$namespace.svc"
            "$service.$namespace.svc.cluster.local")
    done
    tls_names+=("${names[@]}")
    args=()
    for name in "${tls_names[@]}"; do
        args+=(--name "$name")
    done
    "$admin" tls init --dir "$FILES/tls" "${args[@]}" >/dev/null
fi

# The services' keys and auth.conf. The tls paths are where overlays/trial mounts the
# certificate in the NATS pod.
"$admin" nats init --dir "$FILES/nats" \
    --tls-cert /etc/nats/tls/server.pem --tls-key /etc/nats/tls/server-key.pem >/dev/null
for ((i = 0; i < agents; i++)); do
    agent_ids+=("hodei-agent-$i")
done
added=0
for id in "${agent_ids[@]}"; do
    if [ ! -f "$FILES/nats/agents/$id.nk" ]; then
        # It reminds to reload nats-server on every key: said once, below.
        if ! out="$("$admin" nats agent-add --dir "$FILES/nats" --id "$id" 2>&1)"; then
            echo "$out" >&2
            exit 1
        fi
        added=$((added + 1))
    fi
done

# The public key becomes an environment variable: no trailing newline.
public_key="$("$admin" secrets init --file "$FILES/secrets.xk")"
printf '%s' "$public_key" >"$FILES/secrets.pub"

if [ ! -f "$FILES/database-url" ]; then
    if [ -n "$database_url" ]; then
        printf '%s' "$database_url" >"$FILES/database-url"
        # Only the trial's PostgreSQL reads it.
        : >"$FILES/database-password"
    else
        password="$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"
        printf '%s' "$password" >"$FILES/database-password"
        printf 'postgres://hodei:%s@hodei-postgres:5432/hodei' "$password" >"$FILES/database-url"
    fi
fi

echo "secrets written to $FILES"
if [ "$added" -gt 0 ]; then
    echo "new agent keys: after applying, a running nats-server must reread auth.conf:"
    echo "  kubectl -n $namespace exec hodei-nats-0 -- nats-server --signal reload=/var/run/nats/nats.pid"
fi
