#!/usr/bin/env bash
# Brings the whole Hodei system up locally and runs a demo end to end:
#   a private nats-server (2.10+, JetStream, store in .hodei/nats), a private PostgreSQL
#   cluster, the api-gateway, scheduler, registry and two agents (agent-gpu with gpu=true,
#   agent-cpu without), then submits demo jobs and a demo pipeline with the `hodei` CLI and
#   prints what happened. Security is on: the API is served over TLS with certificates of a
#   local CA (.hodei/tls, made once by `hodei-admin tls init`), and the demo calls it with an
#   admin token made by `hodei-admin token create` (kept in .hodei/token, readable by you only).
#   The gateway also serves the web console over HTTPS on 127.0.0.1:8080 (HODEI_CONSOLE_PORT,
#   or a free port when 8080 is taken); the script prints its URL.
#   NATS takes TLS with the same CA and admits only the nkeys of `hodei-admin nats`
#   (.hodei/nats-auth): one per service and per agent, each allowed only its own subjects.
#   Secret env values are sealed with the key of `hodei-admin secrets init` (.hodei/secrets.xk).
#
# On a terminal the system stays up until Ctrl-C (use `target/debug/hodei --help` meanwhile);
# otherwise, or with HODEI_DEMO_EXIT=1, everything is stopped once the demo ends.
# Logs of every process: .hodei/run/*.log
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/deps.sh
source "$ROOT/scripts/lib/deps.sh"

RUN="$ROOT/.hodei/run"
mkdir -p "$RUN"
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "${HODEI_PG_STARTED_HERE:-0}" = 1 ]; then
        hodei_stop_postgres || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> installing what is missing (nats-server, postgresql, build tools)"
hodei_ensure_build_deps
hodei_ensure_nats
hodei_ensure_postgres

echo "==> building"
cargo build --quiet --bins

BIN="$ROOT/target/debug"
NATS_PORT="$(_hodei_free_port)"
GRPC_PORT="${HODEI_GRPC_PORT:-50051}"
if (echo >"/dev/tcp/127.0.0.1/$GRPC_PORT") 2>/dev/null; then
    GRPC_PORT="$(_hodei_free_port)"
fi
CONSOLE_PORT="${HODEI_CONSOLE_PORT:-8080}"
if (echo >"/dev/tcp/127.0.0.1/$CONSOLE_PORT") 2>/dev/null; then
    CONSOLE_PORT="$(_hodei_free_port)"
fi
CONSOLE_URL="https://127.0.0.1:$CONSOLE_PORT/"
export HODEI_NATS_URL="nats://127.0.0.1:$NATS_PORT"
export HODEI_DATABASE_URL
export HODEI_SERVER="https://127.0.0.1:$GRPC_PORT"
export HODEI_HEARTBEAT_INTERVAL_MS=500

TLS="$ROOT/.hodei/tls"
if [ ! -f "$TLS/ca.pem" ]; then
    echo "==> making a local CA and the gateway's certificate in $TLS"
    "$BIN/hodei-admin" tls init --dir "$TLS" --name localhost --name 127.0.0.1 >/dev/null
fi
export HODEI_CA="$TLS/ca.pem"

# NATS credentials: the services' keys are made once; each agent is enrolled afresh (a new
# key, its old one revoked) before the server reads the authorization block.
NATS_AUTH="$ROOT/.hodei/nats-auth"
"$BIN/hodei-admin" nats init --dir "$NATS_AUTH" \
    --tls-cert "$TLS/server.pem" --tls-key "$TLS/server-key.pem" >/dev/null
GPU_NKEY="$("$BIN/hodei-admin" nats agent-add --dir "$NATS_AUTH" --id agent-gpu 2>/dev/null)"
CPU_NKEY="$("$BIN/hodei-admin" nats agent-add --dir "$NATS_AUTH" --id agent-cpu 2>/dev/null)"
cat >"$NATS_AUTH/nats.conf" <<CONF
host: "127.0.0.1"
port: $NATS_PORT
jetstream { store_dir: "$ROOT/.hodei/nats" }
pid_file: "$RUN/nats.pid"
include auth.conf
CONF
export HODEI_NATS_CA="$TLS/ca.pem"
# The control plane's secrets key: the gateway seals to its public half, schedulers open.
SECRETS_PUBLIC_KEY="$("$BIN/hodei-admin" secrets init --file "$ROOT/.hodei/secrets.xk")"

start() {
    local name="$1"
    shift
    "$@" >"$RUN/$name.log" 2>&1 &
    PIDS+=("$!")
}

echo "==> starting nats-server on port $NATS_PORT"
mkdir -p "$ROOT/.hodei/nats"
start nats "$HODEI_NATS_SERVER" --config "$NATS_AUTH/nats.conf"

echo "==> starting api-gateway ($HODEI_SERVER), scheduler, registry and two agents"
HODEI_GRPC_ADDR="127.0.0.1:$GRPC_PORT" HODEI_CONSOLE_ADDR="127.0.0.1:$CONSOLE_PORT" HODEI_TLS_CERT="$TLS/server.pem" HODEI_TLS_KEY="$TLS/server-key.pem" \
    HODEI_NATS_NKEY_FILE="$NATS_AUTH/api-gateway.nk" HODEI_SECRETS_PUBLIC_KEY="$SECRETS_PUBLIC_KEY" \
    start api-gateway "$BIN/hodei-api-gateway"
HODEI_NATS_NKEY_FILE="$NATS_AUTH/scheduler.nk" HODEI_SECRETS_KEY_FILE="$ROOT/.hodei/secrets.xk" \
    start scheduler "$BIN/hodei-scheduler"
HODEI_NATS_NKEY_FILE="$NATS_AUTH/registry.nk" start registry "$BIN/hodei-registry"
# As root, each agent runs every job as a uid of its own range (disjoint per agent on a host),
# so jobs cannot read the agent or each other; otherwise jobs run as your user.
GPU_JOBS="" CPU_JOBS=""
if [ "$(id -u)" = 0 ]; then
    GPU_JOBS=61184-61215 CPU_JOBS=61216-61247
fi
HODEI_WORKER_ID=agent-gpu HODEI_AGENT_LABELS="gpu=true,os=linux" HODEI_JOB_USER="$GPU_JOBS" \
    HODEI_NATS_NKEY_FILE="$GPU_NKEY" start agent-gpu "$BIN/hodei-agent"
HODEI_WORKER_ID=agent-cpu HODEI_AGENT_LABELS="os=linux" HODEI_JOB_USER="$CPU_JOBS" \
    HODEI_NATS_NKEY_FILE="$CPU_NKEY" start agent-cpu "$BIN/hodei-agent"

echo "==> making the demo's admin token (.hodei/token)"
HODEI_TOKEN="$("$BIN/hodei-admin" token create --name "demo $(date -u +%FT%TZ)" --role admin 2>/dev/null)"
export HODEI_TOKEN
(umask 077 && printf '%s\n' "$HODEI_TOKEN" >"$ROOT/.hodei/token")

HODEI="$BIN/hodei"
deadline=$((SECONDS + 60))
until [ "$("$HODEI" workers --output json 2>/dev/null | grep -c '"status": *"ready"' || true)" -ge 2 ]; do
    if [ "$SECONDS" -gt "$deadline" ]; then
        echo "hodei: the system did not come up within 60 s; logs in $RUN" >&2
        tail -n 20 "$RUN"/*.log >&2
        exit 1
    fi
    sleep 0.2
done
"$HODEI" workers
echo "web console: $CONSOLE_URL (sign in with the token in .hodei/token; the certificate is"
echo "signed by the local CA .hodei/tls/ca.pem: let your browser trust it, or accept the warning)"

echo
echo "==> demo 1: hodei run streams a job's output live and exits with its code"
"$HODEI" run --name demo-hello -- sh -c 'for i in 1 2 3; do echo "hello from $HODEI_WORKER_ID, line $i"; sleep 0.3; done'

echo
echo "==> demo 2: a job that needs gpu=true runs on agent-gpu"
"$HODEI" run --name demo-gpu --require gpu=true -- sh -c 'echo "running on $HODEI_WORKER_ID"'

echo
echo "==> demo 2b: a secret reaches the job sealed, and is masked in its output"
"$HODEI" run -f "$ROOT/examples/jobs/secret.yaml"

echo "==> demo 3: a failing job: its exit code comes back"
rc=0
"$HODEI" run --name demo-fail -- sh -c 'echo "about to fail" >&2; exit 3' || rc=$?
echo "hodei run exited with $rc"

echo
echo "==> demo 4: a job no worker can take waits, and says why"
waiting="$("$HODEI" submit --name demo-unplaceable --require arch=riscv -- true)"
sleep 1
"$HODEI" get "$waiting"
"$HODEI" cancel "$waiting" >/dev/null

echo
echo "==> demo 5: a pipeline: build, a 2x2 matrix of tests reading build's artifact, deploy, clean-up"
echo "(hodei pipeline run -f FILE does both steps below in one)"
run_id="$("$HODEI" pipeline submit -f "$ROOT/examples/pipelines/build-test-deploy.yaml")"
rc=0
"$HODEI" pipeline watch "$run_id" || rc=$?
echo "hodei pipeline watch exited with $rc"
"$HODEI" artifacts ls "$run_id"

echo
echo "==> all jobs"
"$HODEI" list

echo
echo "==> demo 6: tenants and roles: a viewer of team-b sees none of default's jobs and may not cancel"
viewer="$("$HODEI" token create --name demo-viewer --tenant team-b --role viewer --expires-in 1h 2>/dev/null)"
HODEI_TOKEN="$viewer" "$HODEI" whoami
echo "its job list:"
HODEI_TOKEN="$viewer" "$HODEI" list
rc=0
HODEI_TOKEN="$viewer" "$HODEI" cancel "$waiting" || rc=$?
echo "hodei cancel exited with $rc"
echo "the audit log, newest first:"
"$HODEI" audit --limit 8

if [ -t 0 ] && [ "${HODEI_DEMO_EXIT:-0}" != 1 ]; then
    echo
    echo "hodei is up: HODEI_SERVER=$HODEI_SERVER, NATS at $HODEI_NATS_URL; try"
    echo "  export HODEI_SERVER=$HODEI_SERVER HODEI_CA=$HODEI_CA HODEI_TOKEN=\$(cat .hodei/token)"
    echo "  $HODEI run -- uname -a"
    echo "and open the web console at $CONSOLE_URL (sign in with the token in .hodei/token)"
    echo "Ctrl-C stops everything."
    wait
fi
