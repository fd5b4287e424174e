#!/usr/bin/env python3
"""Where the scheduler's rounds and report batches spend their time.

Reads the JSON log lines of a `hodei-bench` run made with
    RUST_LOG=1 HODEI_LOG_FORMAT=json \
    HODEI_LOG=warn,hodei_scheduler::placement=debug,hodei_scheduler::reports=debug
(standard error) and prints, for each step of a placement round and of a report batch, its
p50, p90, p99 and mean in milliseconds, the sizes, and the share of the run the loop was busy.
"""
import json
import sys
from datetime import datetime

KINDS = {"placement round written": "round", "report batch recorded": "batch"}


def quantile(values, q):
    values = sorted(values)
    return values[int(q * (len(values) - 1))] if values else 0.0


def main(path):
    steps = {kind: {} for kind in KINDS.values()}
    times = []
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = KINDS.get(event.get("message"))
            if kind is None:
                continue
            times.append(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")))
            for key, value in event.items():
                if key.endswith("_ms") or key in ("requests", "transitions", "reports", "jobs"):
                    steps[kind].setdefault(key, []).append(float(value))
    span = (max(times) - min(times)).total_seconds() * 1e3 if len(times) > 1 else 0.0
    for kind, fields in steps.items():
        if not fields:
            continue
        total = [sum(parts) for parts in zip(*(v for k, v in fields.items() if k.endswith("_ms")))]
        busy = f", busy {100 * sum(total) / span:.0f}% of {span / 1e3:.1f} s" if span else ""
        print(f"{kind}: {len(total)}{busy}")
        for key, values in list(fields.items()) + [("total_ms", total)]:
            print(
                f"  {key:14} p50 {quantile(values, 0.5):8.2f}  p90 {quantile(values, 0.9):8.2f}"
                f"  p99 {quantile(values, 0.99):8.2f}  mean {sum(values) / len(values):8.2f}"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/dev/stdin")
