#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (cc, a nats-server
# >= 2.10 for the test helpers, a private PostgreSQL cluster, grpcurl and
# Python's grpcio-reflection for the reflection test, Chromium for the web
# console's browser test), checks the
# formatting, the clippy lints (-D warnings) and the Kubernetes manifests
# (scripts/check-k8s.sh), builds the service binaries that the system tests
# start as processes, runs `cargo nextest run` (or `cargo test` without
# nextest) and the doc tests, then, where Docker answers, the compose test
# (scripts/test-compose.sh: images built offline, the stack scaled, a
# scheduler and an agent killed).
#
# Environment:
#   HODEI_KEEP_PG=1   leave the private PostgreSQL cluster running at exit
#                     (a cluster that was already running is always left running)
# Exit code: the tests' exit code (the first failing run's).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=scripts/lib/deps.sh
source "$ROOT/scripts/lib/deps.sh"

# shellcheck disable=SC2329 # invoked by the EXIT trap
stop_pg() {
    if [ "${HODEI_KEEP_PG:-0}" != 1 ] && [ "${HODEI_PG_STARTED_HERE:-0}" = 1 ]; then
        hodei_stop_postgres || echo "hodei: could not stop the private postgresql cluster" >&2
    fi
}
trap stop_pg EXIT

hodei_ensure_build_deps
hodei_ensure_nats
hodei_ensure_postgres
hodei_ensure_grpc_clients
hodei_ensure_chromium
export HODEI_NATS_SERVER HODEI_TEST_DATABASE_URL HODEI_DATABASE_URL HODEI_PG_PORT
export HODEI_GRPCURL HODEI_GRPC_PYTHONPATH HODEI_CHROMIUM

# The lints the workspace declares are enforced before any test runs.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The Kubernetes manifests: rendered, checked against the API schemas and cross-referenced.
scripts/check-k8s.sh

# The system tests run the services as separate processes from the workspace's binaries;
# `cargo test` builds another package's binaries only as test harnesses.
cargo build --workspace --bins

rc=0
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-targets --no-tests=warn --no-fail-fast || rc=$?
else
    cargo test --workspace --all-targets || rc=$?
fi
doc_rc=0
cargo test --workspace --doc || doc_rc=$?
if [ "$rc" -eq 0 ]; then
    rc="$doc_rc"
fi
# The compose stack, scaled, with a scheduler and an agent killed (scripts/test-compose.sh),
# wherever Docker answers; it builds its own images (static debug binaries in target/images).
if docker info >/dev/null 2>&1; then
    compose_rc=0
    scripts/test-compose.sh || compose_rc=$?
    if [ "$rc" -eq 0 ]; then
        rc="$compose_rc"
    fi
else
    echo "hodei: docker does not answer here: the compose test did not run" >&2
fi
exit "$rc"
