#!/usr/bin/env bash
# The compose test (scripts/lib/compose_test.py): builds the images offline
# (scripts/build-images.sh), brings compose/docker-compose.yml up with 3 schedulers,
# 2 registries and 6 agents, runs jobs and the example pipeline, kills a scheduler and an
# agent, checks the jobs' own ledger, and tears everything down.
#
# Environment:
#   HODEI_IMAGE_PROFILE  dev (default: the debug binaries scripts/test.sh has built) or release
#   HODEI_IMAGE_TAG      the images' tag (default dev)
# Exit code: 0 when every check passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v docker-compose >/dev/null 2>&1; then
    # shellcheck source=scripts/lib/deps.sh
    source "$ROOT/scripts/lib/deps.sh"
    _hodei_apt_install docker-compose
fi
profile="${HODEI_IMAGE_PROFILE:-dev}"
scripts/build-images.sh --profile "$profile"
case "$profile" in
release) cli="$ROOT/target/release/hodei" ;;
*) cli="$ROOT/target/debug/hodei" ;;
esac
HODEI_ROOT="$ROOT" HODEI_CLI="$cli" exec python3 "$ROOT/scripts/lib/compose_test.py"
