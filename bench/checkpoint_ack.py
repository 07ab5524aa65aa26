"""What a durable checkpoint costs: `python -m grpo.run` with the acknowledged checkpoint against the engine
before it (a checkout of an older commit), on the same run.

    python bench/checkpoint_ack.py --before /path/to/older/checkout [--steps 30] [--intervals 1,10] [--rounds 2]

Since "no step lost at a checkpoint", rank 0 waits before every checkpoint until the driver has stored every
record posted so far, and the driver drains as soon as something is posted instead of every 0.5 s. The run:
the digit task on the random-init tiny Llama (grpo.tiny), 8 prompts x 4 completions, 6 new tokens, one policy
worker, one rollout and one reward actor, each side in its own process and local Ray, the sides alternating.
The figure is the median time between consecutive steps (`elapsed_s` in metrics.jsonl, the first 3 steps
dropped) and the time from the first to the last step; printed per checkpoint interval with the ratio
after / before.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(tree: Path, model: str, out: Path, steps: int, interval: int) -> dict[str, float]:
    args = [f"model={model}", f"output_dir={out}", "run_name=r", "task=digit", f"num_steps={steps}",
            "prompts_per_step=8", "group_size=4", "max_new_tokens=6", f"checkpoint_interval={interval}",
            "eval_size=0", "learning_rate=1e-3", "cpus_per_worker=1", "cpus_per_reward_worker=0.5"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tree)
    done = subprocess.run([sys.executable, "-m", "grpo.run", *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "r" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = [r["elapsed_s"] for r in rows]
    gaps = [b - a for a, b in zip(elapsed[3:], elapsed[4:], strict=False)]
    return {"step_s": statistics.median(gaps), "first_to_last_s": elapsed[-1] - elapsed[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="a checkout of the engine before the acknowledged checkpoint")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--intervals", default="1,10")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from grpo.tiny import save_tiny_model

    with tempfile.TemporaryDirectory(prefix="raygrpo-ckpt-bench-") as tmp:
        model = str(save_tiny_model(Path(tmp) / "tiny", seed=0))
        sides = {"before": Path(args.before).resolve(), "after": ROOT}
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for interval in [int(x) for x in args.intervals.split(",")]:
            for r in range(args.rounds):
                for name, tree in (sides.items() if r % 2 == 0 else reversed(sides.items())):
                    out = Path(tmp) / f"{name}-{interval}-{r}"
                    results.setdefault((name, interval), []).append(one_run(tree, model, out, args.steps, interval))
                    print(f"interval {interval} round {r} {name}: {results[(name, interval)][-1]}", flush=True)
        print(f"\n{datetime.date.today()} on {os.cpu_count()} cores, {args.steps} steps, median of {args.rounds} rounds")
        for interval in sorted({i for _, i in results}):
            b = {k: statistics.median(x[k] for x in results[("before", interval)]) for k in ("step_s", "first_to_last_s")}
            a = {k: statistics.median(x[k] for x in results[("after", interval)]) for k in ("step_s", "first_to_last_s")}
            print(f"checkpoint every {interval}: step {b['step_s'] * 1000:.0f} -> {a['step_s'] * 1000:.0f} ms "
                  f"({a['step_s'] / b['step_s']:.2f}x); first to last step {b['first_to_last_s']:.1f} -> "
                  f"{a['first_to_last_s']:.1f} s ({a['first_to_last_s'] / b['first_to_last_s']:.2f}x)")


if __name__ == "__main__":
    main()
