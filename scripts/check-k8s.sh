#!/usr/bin/env bash
# Checks the Kubernetes manifests in deploy/k8s without a cluster: renders the base and every
# overlay (with a real kustomize when one is installed, and always with the subset of
# kustomize in scripts/lib/check_k8s.py, the two renders having to agree), validates every
# object strictly against the Kubernetes JSON schemas of the pinned kubernetes-validate, and
# checks the objects against each other and against the binaries' source (see
# docs/DEPLOYMENT.md, "What the checker checks"). Installs its Python packages, pinned, into
# .hodei/tools/k8s the first time (from PyPI).
#
#   scripts/check-k8s.sh               one line per render, then "k8s: N passed, M failed"
#   scripts/check-k8s.sh --self-test   also breaks a copy of the trial's render once per
#                                      check and shows that check catching it
#   scripts/check-k8s.sh --print overlays/trial   the render, as YAML
#
# Exit code: 0 when every render passes, 1 on any finding, 2 when the check cannot run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=scripts/lib/deps.sh
source "$ROOT/scripts/lib/deps.sh"

# kubernetes-validate ships the schemas; the rest are its dependencies, pinned too.
HODEI_K8S_REQUIREMENTS="kubernetes-validate==1.37.0 PyYAML==6.0.3 jsonschema==4.26.0 \
jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 \
importlib-resources==7.1.0 packaging==26.4 typing-extensions==4.16.0"

_hodei_ensure_k8s_tools_locked() {
    # shellcheck disable=SC2086 # the list of pinned requirements
    _hodei_pip_tools "$HODEI_ROOT/.hodei/tools/k8s" $HODEI_K8S_REQUIREMENTS
}

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    _hodei_err "scripts/check-k8s.sh needs python3 3.11 or newer (tomllib)"
    exit 2
fi
mkdir -p "$HODEI_ROOT/.hodei/tools"
_hodei_with_lock "$HODEI_ROOT/.hodei/tools/.k8s.lock" _hodei_ensure_k8s_tools_locked || exit 2

PYTHONPATH="$HODEI_ROOT/.hodei/tools/k8s" exec python3 "$ROOT/scripts/lib/check_k8s.py" "$@"
