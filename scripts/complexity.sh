#!/usr/bin/env bash
# Cyclomatic complexity per function of the production code (libs/, services/, cli/; test
# modules, integration tests, the bench harness and generated code left out), measured by
# Mozilla's rust-code-analysis (installed when missing). A closure counts in the function that
# holds it. Prints the average, the distribution and the most complex functions.
#
# Usage: scripts/complexity.sh [TOP]   (TOP: how many of the most complex to list, default 15)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
top="${1:-15}"

command -v rust-code-analysis-cli >/dev/null 2>&1 ||
    cargo install rust-code-analysis-cli --locked

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
mapfile -t files < <(git ls-files 'libs/*/src/*.rs' 'libs/*/src/**/*.rs' 'services/*/src/*.rs' \
    'services/*/src/**/*.rs' 'cli/src/*.rs' 'cli/src/**/*.rs' | grep -v '^libs/test-support/' | sort -u)
for f in "${files[@]}"; do
    rust-code-analysis-cli -m -O json -p "$f" >"$out/$(echo "$f" | tr / _).json"
done

python3 - "$out" "$top" "${files[@]}" <<'PY'
import json, os, re, sys
out, top, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def test_start(path):
    """First line of the file's `#[cfg(test)]` item: what follows is test code."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if re.match(r'\s*#\[cfg\(test\)\]', line):
                return n
    return 10**9

functions = []
def walk(node, path, cut):
    if node["kind"] == "function" and node["name"] != "<anonymous>":
        if node["start_line"] < cut:
            functions.append((node["metrics"]["cyclomatic"]["sum"], path, node["start_line"], node["name"]))
        return  # closures and nested functions count in this one
    for child in node["spaces"]:
        walk(child, path, cut)

for path in files:
    with open(os.path.join(out, path.replace("/", "_") + ".json")) as f:
        walk(json.load(f), path, test_start(path))

values = sorted(v for v, *_ in functions)
n = len(values)
print(f"functions: {n}")
print(f"average cyclomatic complexity: {sum(values) / n:.2f}")
print(f"median: {values[n // 2]:.0f}, 90th percentile: {values[int(n * 0.9)]:.0f}, max: {values[-1]:.0f}")
for lo, hi in [(1, 5), (6, 10), (11, 20), (21, 10**9)]:
    count = sum(1 for v in values if lo <= v <= hi)
    label = f"{lo}-{hi}" if hi < 10**9 else f">{lo - 1}"
    print(f"  {label:>6}: {count:5d} ({100 * count / n:.1f}%)")
print(f"most complex:")
for v, path, line, name in sorted(functions, reverse=True)[:top]:
    print(f"  {v:4.0f}  {path}:{line} {name}")
PY
