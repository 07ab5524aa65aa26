"""Multi-turn rollout throughput: many live environments per rollout actor vs one trajectory at a time.

    python bench/bench_agent_rollout.py [--prompts 16] [--group 4] [--steps 4] [--turn-tokens 16]
                                        [--latency-ms 0,50] [--concurrency 1,8,64] [--repeats 3] [--threads 1]

One `RolloutWorker` (the random-init tiny Llama of grpo.tiny, CPU) plays P x G trajectories of an
environment that never ends early: every action gets a short observation after `--latency-ms` (an
async sleep standing in for a tool: a sandbox run, a search request), up to `--steps` actions of at
most `--turn-tokens` tokens each. The baseline is `--concurrency 1`: one trajectory at a time, which
is what a per-trajectory loop around `generate` does. With concurrency C, up to C environments are
live and their pending turns are generated as one batch while the other environments' tool calls
run. Figures: trajectories/s and policy tokens/s (sampled action tokens per wall second), medians
over `--repeats`; the ratio is against concurrency 1 at the same latency.
Not covered: the policy update, Ray round trips (one actor, in this process).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from grpo.agents import environments as agent
from grpo.agents.environments import Action, StepResult
from grpo.agents.episodes import AgentSettings
from grpo.rollout import RolloutWorker
from grpo.tasks import Sample
from grpo.tiny import save_tiny_model


class LatencyEnv:
    """Answers every action with "ok" after LATENCY_S; never done (episodes end at max steps)."""

    LATENCY_S = 0.0

    async def reset(self, sample: Sample) -> str:
        return sample.prompt

    async def step(self, action: Action) -> StepResult:
        await asyncio.sleep(self.LATENCY_S)
        return StepResult("ok")


def run_once(worker: RolloutWorker, samples: list[Sample], args: argparse.Namespace, concurrency: int,
             seed: int) -> tuple[float, int, int]:
    settings = AgentSettings(environment="bench-latency", max_steps=args.steps, max_new_tokens=args.turn_tokens,
                             max_total_tokens=args.steps * (args.turn_tokens + 16), concurrency=concurrency)
    t0 = time.perf_counter()
    ro = worker.generate_agent(samples, settings=settings, group_size=args.group, seed=seed)
    seconds = time.perf_counter() - t0
    return seconds, len(ro.texts), int(ro.loss_mask.sum())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="actions per trajectory")
    p.add_argument("--turn-tokens", type=int, default=16, help="max tokens per action")
    p.add_argument("--latency-ms", default="0,50", help="simulated tool latency per step, comma-separated")
    p.add_argument("--concurrency", default="1,8,64", help="live environments per actor, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    agent.ENVIRONMENTS["bench-latency"] = LatencyEnv  # a bench-only environment, by name
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_model(Path(tmp) / "tiny")
        worker = RolloutWorker(str(model), torch_threads=args.threads)
        samples = [Sample(f"{a}+{b}=", str(a + b)) for a, b in zip(range(10, 99, 5), range(90, 1, -5), strict=False)]
        samples = samples[: args.prompts]
        run_once(worker, samples[:2], args, 8, seed=0)  # warm-up
        levels = [int(c) for c in args.concurrency.split(",")]
        print(f"== multi-turn rollout throughput, {datetime.date.today()} ==")
        print(f"machine: {platform.processor() or platform.machine()}, torch threads {args.threads}; "
              f"{len(samples)} prompts x {args.group} = {len(samples) * args.group} trajectories, "
              f"{args.steps} actions of <= {args.turn_tokens} tokens each, tiny Llama (4 layers, hidden 128)")
        print(f"{'latency ms':>10} {'concurrency':>11} {'wall s':>8} {'traj/s':>8} {'tok/s':>8} {'x one-at-a-time':>16}")
        for latency in [float(x) for x in args.latency_ms.split(",")]:
            LatencyEnv.LATENCY_S = latency / 1000
            base = None
            for c in levels:
                runs = [run_once(worker, samples, args, c, seed=r) for r in range(args.repeats)]
                secs = statistics.median(r[0] for r in runs)
                n_traj, n_tok = runs[0][1], statistics.median(r[2] for r in runs)
                traj_s = n_traj / secs
                base = base or traj_s
                print(f"{latency:>10g} {c:>11} {secs:>8.2f} {traj_s:>8.1f} {n_tok / secs:>8.0f} {traj_s / base:>15.1f}x",
                      flush=True)


if __name__ == "__main__":
    main()
