"""What the bubblewrap sandbox costs per run, against the sandbox before it (unshare + rlimits, a checkout of an
older commit): the latency of one sandboxed program, and of scoring a batch with a reward given as source.

    python bench/sandbox_latency.py --before /path/to/older/checkout [--runs 40] [--items 64]

Each side runs in its own interpreter with its own `grpo` on the path, the sides alternating. Printed: the
median milliseconds of `run_python("print(1)")` and of `SandboxedReward(...).score_batch(items)` (the digit
task's partial credit as source, `--items` completions, one sandbox per batch), and after / before.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, statistics, sys, time
from grpo.sandbox import run_python
from grpo.rewards import SandboxedReward
runs, items = int(sys.argv[1]), int(sys.argv[2])
source = "def reward(p, c, e):\n    return sum(ch == e for ch in c[:6]) / 6\n"
run_python("print(1)")  # the first run probes the machine
one, batch = [], []
for _ in range(runs):
    t = time.perf_counter(); assert run_python("print(1)").ok; one.append(time.perf_counter() - t)
r = SandboxedReward(source, timeout_s=10)
rows = [("digit 3:", "333" + str(i % 10) * 3, "3") for i in range(items)]
for _ in range(max(runs // 4, 3)):
    t = time.perf_counter(); r.score_batch(rows); batch.append(time.perf_counter() - t)
print(json.dumps({"one_ms": 1000 * statistics.median(one), "batch_ms": 1000 * statistics.median(batch)}))
"""


def side(tree: Path, runs: int, items: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(runs), str(items)], cwd=tree, env=env, capture_output=True,
                         text=True, timeout=900, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sides = {"before": Path(args.before).resolve(), "after": ROOT}
    got: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name, tree in (sides.items() if r % 2 == 0 else reversed(sides.items())):
            got[name].append(side(tree, args.runs, args.items))
            print(f"round {r} {name}: {got[name][-1]}", flush=True)

    def med(name: str, key: str) -> float:
        values = sorted(x[key] for x in got[name])
        return values[len(values) // 2]

    print(f"\n{datetime.date.today()} on {os.cpu_count()} cores, median of {args.rounds} rounds")
    for key, what in (("one_ms", "one program"), ("batch_ms", f"a reward-source batch of {args.items}")):
        b, a = med("before", key), med("after", key)
        print(f"{what}: {b:.1f} -> {a:.1f} ms ({a / b:.2f}x)")


if __name__ == "__main__":
    main()
