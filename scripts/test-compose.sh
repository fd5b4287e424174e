#!/usr/bin/env bash
# The compose test: compose/docker-compose.yml really run, scaled, through faults.
#
#   1. builds the images (scripts/build-images.sh --profile dev: unoptimised binaries, quicker
#      to build from nothing) under the tag `test`, so that it never replaces the `dev` images;
#   2. brings the stack up as a project of its own with 3 schedulers, 2 registries and 6 agents
#      (`docker-compose up --scale`) and the secrets key on; checks that every container is
#      healthy, that 6 workers are ready, each agent container with a worker id of its own, and
#      that a job gets its secret value, masked in its output;
#   3. submits $JOBS jobs that each append `start` and `end` lines (job id, attempt, worker,
#      exit code) to a ledger in a folder every agent container mounts, and hold an exclusive
#      flock there while they run, so that a second copy running at the same time writes
#      `overlap`; every fifth job exits 3 (and is not retried); then the example pipeline
#      build-test-deploy;
#   4. once 12 jobs have started, kills (`docker kill`) one scheduler container and the agent
#      container that started the most of them, and waits for every job and the pipeline to end;
#   5. checks against the jobs of record (`hodei get`), as tests/system/tests/chaos.rs does:
#      every job ran to its end exactly once (one `end`, no `overlap`) and its recorded state,
#      exit code, final attempt and worker are those of that `end`; a job started twice only
#      if its earlier attempt was on the killed agent and is recorded `lost` there
#      (docs/ARCHITECTURE.md, "Liveness and failure"); only the jobs meant to fail failed; the
#      pipeline succeeded; the jobs ran on all 6 agents; at least 2 schedulers placed jobs; a
#      job submitted after the kills succeeds;
#   6. tears everything down (`down -v`), whatever happened.
#
# Waits are polls with deadlines, never fixed sleeps. Prints one line per check and
# `compose: N passed, M failed`; exits 1 when a check failed (with the services' last log
# lines), 2 when the stack could not be brought up at all.
#
# Environment:
#   HODEI_IMAGE_PROFILE   dev (default) or release: the binaries build-images.sh builds
#   HODEI_IMAGE_TAG       the images' tag (default test)
#   HODEI_COMPOSE_KEEP=1  leave the stack up at the end (it prints how to take it down)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/deps.sh
source "$ROOT/scripts/lib/deps.sh"

JOBS=30
SCALE=(--scale scheduler=3 --scale registry=2 --scale agent=6)
PROFILE="${HODEI_IMAGE_PROFILE:-dev}"
export HODEI_IMAGE_TAG="${HODEI_IMAGE_TAG:-test}"
PROJECT="hodei-test-$$-$RANDOM"
STARTED=$SECONDS
PASSED=0
FAILED=0
FAILURES=()

say() {
    printf 'compose: [%3ds] %s\n' "$((SECONDS - STARTED))" "$*" >&2
}

check() {
    local what="$1"
    shift
    if "$@"; then
        PASSED=$((PASSED + 1))
        say "ok: $what"
    else
        FAILED=$((FAILED + 1))
        FAILURES+=("$what")
        say "FAILED: $what"
    fi
}

if ! command -v docker-compose >/dev/null 2>&1; then
    _hodei_apt_install docker-compose
fi
if ! command -v python3 >/dev/null 2>&1; then
    _hodei_apt_install python3
fi
if ! command -v curl >/dev/null 2>&1; then
    _hodei_apt_install curl ca-certificates
fi

say "building the images ($PROFILE, tag $HODEI_IMAGE_TAG)"
scripts/build-images.sh --profile "$PROFILE"
HODEI="$ROOT/target/images/x86_64-unknown-linux-gnu/$([ "$PROFILE" = dev ] && echo debug || echo release)/hodei"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/hodei-compose.XXXXXX")"
LEDGER="$WORK/ledger"
mkdir -p "$LEDGER/locks"
touch "$LEDGER/ledger"
# The jobs run as the agents' user, uid 10001.
chown -R 10001:10001 "$LEDGER"
cat >"$WORK/ledger.yml" <<EOF
services:
  agent:
    volumes:
      - $LEDGER:/ledger
EOF
# The gateway and its web console on free ports of the host's loopback.
export HODEI_GRPC_PUBLISH=127.0.0.1: HODEI_CONSOLE_PUBLISH=127.0.0.1:
compose=(docker-compose --project-name "$PROJECT" --file "$ROOT/compose/docker-compose.yml" --file "$WORK/ledger.yml")

dump_logs() {
    say "the last lines of every service's log:"
    "${compose[@]}" logs --no-color --tail 40 >&2 2>&1 || true
}

teardown() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        FAILED=$((FAILED + 1))
        FAILURES+=("the test stopped early (exit $rc)")
        say "FAILED: the test stopped early (exit $rc)"
    fi
    if [ "$FAILED" -ne 0 ]; then
        dump_logs
    fi
    if [ "${HODEI_COMPOSE_KEEP:-0}" = 1 ]; then
        say "left up: ${compose[*]} down -v"
    else
        "${compose[@]}" down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 ||
            say "could not take the stack down: ${compose[*]} down -v"
        rm -rf "$WORK"
    fi
    # Again after the logs, so that the end of a long output still names what failed.
    local failure
    for failure in "${FAILURES[@]}"; do
        say "FAILED: $failure"
    done
    say "$PASSED passed, $FAILED failed ($((SECONDS - STARTED)) s)"
    echo "compose: $PASSED passed, $FAILED failed"
    if [ "$rc" -eq 0 ] && [ "$FAILED" -ne 0 ]; then
        rc=1
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# Polls "$@" every 0.5 s until it succeeds; fails after $1 seconds.
wait_until() {
    local seconds="$1" what="$2" deadline
    shift 2
    deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "gave up after ${seconds} s waiting for $what"
            return 1
        fi
        sleep 0.5
    done
}

# --- up ---------------------------------------------------------------------------------------
say "bringing up project $PROJECT: ${SCALE[*]}"
# init first, for the secrets key the gateway is given.
"${compose[@]}" run --rm -T init >/dev/null 2>&1 || {
    say "the init service failed"
    exit 2
}
HODEI_SECRETS_PUBLIC_KEY="$("${compose[@]}" run --rm -T admin cat /etc/hodei/secrets.pub 2>/dev/null)"
export HODEI_SECRETS_PUBLIC_KEY
if ! "${compose[@]}" up --detach "${SCALE[@]}" >"$WORK/up.log" 2>&1; then
    cat "$WORK/up.log" >&2
    exit 2
fi
say "up"

HODEI_CA="$WORK/ca.pem"
"${compose[@]}" run --rm -T admin cat /etc/hodei/tls/ca.pem >"$HODEI_CA" 2>/dev/null
HODEI_SERVER="https://127.0.0.1:$("${compose[@]}" port api-gateway 50051 | cut -d: -f2)"
HODEI_TOKEN="$("${compose[@]}" run --rm -T admin hodei-admin token create --name compose-test --role admin 2>/dev/null)"
export HODEI_CA HODEI_SERVER HODEI_TOKEN

containers() {
    "${compose[@]}" ps --quiet "$1"
}

all_healthy() {
    local id
    for id in $(containers api-gateway) $(containers scheduler) $(containers registry) $(containers agent); do
        [ "$(docker inspect --format '{{.State.Health.Status}}' "$id")" = healthy ] || return 1
    done
}

ready_workers() {
    "$HODEI" workers --output json | python3 -c '
import json, sys
workers = json.load(sys.stdin)
workers = workers.get("workers", workers) if isinstance(workers, dict) else workers
print(sorted(w["id"] for w in workers if w.get("status") == "ready"))
sys.exit(0 if sum(w.get("status") == "ready" for w in workers) >= int(sys.argv[1]) else 1)' "$1"
}

counts_ok() {
    [ "$(containers scheduler | wc -l)" -eq 3 ] && [ "$(containers registry | wc -l)" -eq 2 ] &&
        [ "$(containers agent | wc -l)" -eq 6 ]
}
check "3 schedulers, 2 registries and 6 agents run" counts_ok
check "every service's health check passes (/healthz and /readyz)" wait_until 120 "healthy containers" all_healthy
check "6 agents are ready workers" wait_until 60 "6 ready workers" ready_workers 6
console_lists_workers() {
    local url page
    url="https://127.0.0.1:$("${compose[@]}" port api-gateway 8080 | cut -d: -f2)"
    page="$(curl --silent --show-error --fail --cacert "$HODEI_CA" \
        --header "authorization: Bearer $HODEI_TOKEN" "$url/workers")" || return 1
    [ "$(grep -o 'data-worker="agent-[0-9]*"' <<<"$page" | sort -u | wc -l)" -eq 6 ]
}
check "the web console answers over TLS and lists the 6 workers" console_lists_workers

# The worker id each agent container took: its log's first line says.
declare -A CONTAINER_OF=()
for id in $(containers agent); do
    worker="$(docker logs "$id" 2>&1 | sed -n 's/^hodei-compose-agent: running as worker \(agent-[0-9]*\)$/\1/p' | sed -n 1p)"
    [ -n "$worker" ] && CONTAINER_OF[$worker]="$id"
done
unique_ids() {
    [ "${#CONTAINER_OF[@]}" -eq 6 ] &&
        [ "$(ready_workers 6 | tr -d "[]' " | tr ',' '\n' | sort | tr '\n' ' ')" = \
            "$(printf '%s\n' "${!CONTAINER_OF[@]}" | sort | tr '\n' ' ')" ]
}
check "each agent container has a worker id of its own ($(printf '%s ' "${!CONTAINER_OF[@]}"))" unique_ids

# --- a job with a secret ----------------------------------------------------------------------
secret_job() {
    local out
    # shellcheck disable=SC2016 # expanded by the job's shell
    out="$(COMPOSE_TEST_SECRET="s3cr3t-$RANDOM" "$HODEI" run --name compose-secret \
        --secret-env COMPOSE_TEST_SECRET -- sh -c 'test -n "$COMPOSE_TEST_SECRET" && echo "the secret is $COMPOSE_TEST_SECRET"' 2>&1)" || return 1
    ! grep -q s3cr3t <<<"$out" && grep -q 'the secret is' <<<"$out"
}
check "a job gets its secret value, masked in its output" secret_job

# --- jobs, a pipeline, and the kills ----------------------------------------------------------
# Writes start, sleeps, writes end; holds an exclusive lock on its own name meanwhile.
# shellcheck disable=SC2016 # expanded by the job's shell
JOB_SCRIPT='exec 9>>"/ledger/locks/$HODEI_JOB_ID"
flock -n 9 || echo "overlap $HODEI_JOB_ID $HODEI_ATTEMPT $HODEI_WORKER_ID" >>/ledger/ledger
echo "start $HODEI_JOB_ID $HODEI_ATTEMPT $HODEI_WORKER_ID" >>/ledger/ledger
sleep "$SECS"
echo "end $HODEI_JOB_ID $HODEI_ATTEMPT $HODEI_WORKER_ID $CODE" >>/ledger/ledger
exit "$CODE"'
say "submitting $JOBS jobs (4 to 8 s each) and the pipeline examples/pipelines/build-test-deploy.yaml"
: >"$WORK/jobs"
for i in $(seq 1 "$JOBS"); do
    code=0
    [ $((i % 5)) -eq 0 ] && code=3
    "$HODEI" submit --name "compose-$i" --label "suite=$PROJECT" --env "SECS=$((4 + i % 5))" \
        --env "CODE=$code" --timeout 300 --script "$JOB_SCRIPT" >>"$WORK/jobs"
done
run_id="$("$HODEI" pipeline submit -f "$ROOT/examples/pipelines/build-test-deploy.yaml")"

started_lines() {
    [ "$(grep -c '^start ' "$LEDGER/ledger")" -ge "$1" ]
}
check "jobs start on the agents" wait_until 60 "12 jobs to start" started_lines 12

# An agent that is running jobs now, and a scheduler.
victim_worker="$(awk '$1 == "start" { print $4 }' "$LEDGER/ledger" | sort | uniq -c | sort -rn | awk 'NR == 1 { print $2 }')"
victim="${CONTAINER_OF[$victim_worker]:-}"
scheduler="$(containers scheduler | sed -n 1p)"
killed_at=$SECONDS
if [ -n "$victim" ]; then
    docker kill "$scheduler" >/dev/null
    docker kill "$victim" >/dev/null
    say "killed scheduler ${scheduler:0:12} and agent ${victim:0:12} ($victim_worker, running $(awk -v w="$victim_worker" '$1 == "start" && $4 == w' "$LEDGER/ledger" | wc -l) jobs)"
fi
check "an agent running jobs and a scheduler were killed" test -n "$victim"

all_ended() {
    local id state
    while read -r id; do
        state="$("$HODEI" get "$id" --output json | python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])')" || return 1
        case "$state" in succeeded | failed | cancelled | timed_out) ;; *) return 1 ;; esac
    done <"$WORK/jobs"
}
# The killed agent's attempts are handed back after its lease and kill grace (25 s) of silence.
check "every job ends" wait_until 180 "every job to end" all_ended
say "every job ended $((SECONDS - killed_at)) s after the kills"

pipeline_state() {
    "$HODEI" pipeline get "$run_id" --output json | python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])'
}
pipeline_ended() {
    case "$(pipeline_state)" in succeeded | failed | cancelled) return 0 ;; *) return 1 ;; esac
}
pipeline_succeeded() {
    [ "$(pipeline_state)" = succeeded ]
}
check "the pipeline ends" wait_until 120 "the pipeline to end" pipeline_ended
check "the pipeline succeeded" pipeline_succeeded

# --- the ledger against the record ------------------------------------------------------------
mkdir -p "$WORK/record"
while read -r id; do
    "$HODEI" get "$id" --output json >"$WORK/record/$id.json"
done <"$WORK/jobs"
ledger_matches() {
    python3 - "$LEDGER/ledger" "$WORK/record" "$victim_worker" <<'PY'
import json
import sys
from pathlib import Path

ledger_path, record_dir, victim = sys.argv[1:4]
runs = {}
for line in open(ledger_path):
    kind, job, attempt, worker, *rest = line.split()
    runs.setdefault(job, []).append((kind, int(attempt), worker, *map(int, rest)))
jobs = [json.loads(path.read_text()) for path in sorted(Path(record_dir).iterdir())]
failures, reruns = [], 0
for job in jobs:
    name, entries = job["spec"]["name"], runs.get(job["id"], [])
    ends = [e for e in entries if e[0] == "end"]
    starts = [e for e in entries if e[0] == "start"]
    if any(e[0] == "overlap" for e in entries):
        failures.append(f"{name} ran alongside a copy of itself: {entries}")
    if len(ends) != 1:
        failures.append(f"{name} must have run to its end exactly once: {entries}")
        continue
    _, attempt, worker, code = ends[0]
    last = job["attempts"][-1]
    state = "succeeded" if code == 0 else "failed"
    if (job["state"], job["exit_code"], last["attempt"], last["worker_id"]) != (state, code, attempt, worker):
        failures.append(
            f"{name}: recorded {job['state']} exit {job['exit_code']} attempt {last['attempt']} on "
            f"{last['worker_id']}, but ran to its end as attempt {attempt} on {worker} with exit {code}")
    if len(starts) > 1:
        reruns += 1
        earlier = job["attempts"][:-1]
        if not earlier or any(a["worker_id"] != victim or a["outcome"]["kind"] != "lost" for a in earlier):
            failures.append(f"{name} started again without its attempt being lost on {victim}: {job['attempts']}")
        if any(s[2] != victim for s in starts if s[1] != attempt):
            failures.append(f"{name} started on a healthy worker and again: {entries}")
expected_failures = sum(1 for j in jobs if j["spec"]["env"].get("CODE") == "3")
if sum(1 for j in jobs if j["state"] == "failed") != expected_failures:
    failures.append("a job failed that should not have")
for failure in failures:
    print(f"compose:   {failure}", file=sys.stderr)
print(f"compose:   {len(jobs)} jobs, {reruns} started again after the kill of {victim}", file=sys.stderr)
sys.exit(1 if failures else 0)
PY
}
check "every job ran to its end exactly once, alone, and its recorded outcome is what ran" ledger_matches

handed_back() {
    python3 -c '
import json, sys
from pathlib import Path
lost = sum(1 for path in Path(sys.argv[1]).iterdir()
           for a in json.loads(path.read_text())["attempts"]
           if (a.get("outcome") or {}).get("kind") == "lost")
sys.exit(0 if lost > 0 else 1)' "$WORK/record"
}
check "the killed agent's attempts were handed back (recorded lost) and run elsewhere" handed_back

spread_over_agents() {
    [ "$(awk '$1 == "start" { print $4 }' "$LEDGER/ledger" | sort -u | wc -l)" -eq 6 ]
}
check "the jobs ran on all 6 agents" spread_over_agents
# Every replica of the scheduler pulls placement requests from one durable consumer.
schedulers_share() {
    local id placing=0
    for id in $(containers scheduler); do
        # Not `| grep -q`: under pipefail, docker logs killed by SIGPIPE at grep's first
        # match would fail the pipeline.
        if grep -q ' job assigned ' <<<"$(docker logs "$id" 2>&1)"; then
            placing=$((placing + 1))
        fi
    done
    say "$placing of 3 schedulers placed jobs"
    [ "$placing" -ge 2 ]
}
check "the schedulers share the placements" schedulers_share
job_after() {
    # shellcheck disable=SC2016 # expanded by the job's shell
    "$HODEI" run --name compose-after -- sh -c 'echo "after the kills, on $HODEI_WORKER_ID"' >/dev/null
}
check "a job submitted after the kills succeeds" job_after
