#!/usr/bin/env bash
# Line coverage of the whole workspace with cargo-llvm-cov: every test of the suite, the
# service processes the system tests start included (they are built instrumented and write
# their own profiles). Prints the per-file table and the totals; writes an lcov file to
# target/llvm-cov/lcov.info.
#
# Needs the llvm-tools rustup component and cargo-llvm-cov; installs both when missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=scripts/lib/deps.sh
source "$ROOT/scripts/lib/deps.sh"
hodei_ensure_build_deps
hodei_ensure_nats
hodei_ensure_postgres
export HODEI_NATS_SERVER HODEI_TEST_DATABASE_URL HODEI_DATABASE_URL HODEI_PG_PORT

rustup component list --installed 2>/dev/null | grep -q '^llvm-tools' ||
    rustup component add llvm-tools-preview
cargo llvm-cov --version >/dev/null 2>&1 || cargo install cargo-llvm-cov --locked

# The environment that makes every build instrumented and every process write a profile.
# shellcheck disable=SC1090
source <(cargo llvm-cov show-env --export-prefix)
cargo llvm-cov clean --workspace
cargo build --workspace --bins
rc=0
cargo nextest run --workspace --all-targets --no-fail-fast || rc=$?
mkdir -p target/llvm-cov
cargo llvm-cov report --ignore-filename-regex '(/tests/|/bench/|/test-support/|/target/)' \
    --lcov --output-path target/llvm-cov/lcov.info
cargo llvm-cov report --ignore-filename-regex '(/tests/|/bench/|/test-support/|/target/)'
exit "$rc"
