"""Learning curves that take minutes: what the engine learns, beyond what the test suite can afford.

    python bench/learning_curves.py [--curve agent-calculator|lora-digit|all] [--seed 0]

The test suite keeps one learning run (tests/grpo/test_engine_ray.py: the digit task from random init with a
sandboxed reward) and checks everything else by its mechanics in a few steps. The curves here are the runs
that used to be tests, with the same settings, on a local Ray (8 logical CPUs):

- agent-calculator: two-digit + and * with the `calc` tool from a random-init tiny model (hidden 64, 2
  layers): 320 supervised warm-up steps on the environment's demonstrations, then 50 GRPO steps (16 prompts
  x 8, up to 3 turns, 0.1 reward per good tool call). Printed: the first 10 GRPO steps' means against the
  last 20's for the outcome (env_reward_mean), tool use, reward and entropy.
- lora-digit: the digit task with a rank-8 adapter on attention and the head, 2 policy workers, until the
  mean reward of 20 steps reaches 0.8 (at most 300 steps). Printed: steps to the target, first 10 against
  last 20 steps' reward, seconds of training, bytes published per step against the full model.

A line of JSON per curve follows the table, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(key: str, rows: list[dict]) -> float:
    return sum(r[key] for r in rows) / len(rows)


def agent_calculator(out: Path, seed: int) -> dict:
    from grpo.config import GRPOConfig
    from grpo.run import run
    from grpo.tiny import save_tiny_model

    model = save_tiny_model(out / "tiny", hidden_size=64, num_layers=2, seed=seed)
    cfg = GRPOConfig(
        model=str(model), environment="calculator", tool_instructions=False, max_new_tokens=64,
        max_trajectory_tokens=128, max_steps_per_trajectory=3, group_size=8, prompts_per_step=16,
        sft_warmup_steps=320, sft_batch_size=16, sft_learning_rate=2e-3, learning_rate=5e-4, lr_warmup_steps=10,
        reward_tool_call=0.1, num_steps=50, eval_size=16, checkpoint_interval=0, output_dir=str(out / "runs"),
        run_name="calc", cpus_per_worker=1, cpus_per_reward_worker=0.5, seed=seed,
    )
    t0 = time.time()
    result = run(cfg)
    wall = time.time() - t0
    rows = _rows(cfg.run_dir / "metrics.jsonl")
    first, last = rows[:10], rows[-20:]
    keys = ("env_reward_mean", "tool_use_rate", "reward_mean", "entropy")
    return {"curve": "agent-calculator", "status": result.status, "steps": len(rows), "wall_s": round(wall, 1),
            "sft_warmup_loss": round(rows[0]["sft_warmup_loss"], 3),
            **{f"{k}_first10": round(_mean(k, first), 3) for k in keys},
            **{f"{k}_last20": round(_mean(k, last), 3) for k in keys},
            "eval_reward": rows[-1].get("eval_reward")}


def lora_digit(out: Path, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    from grpo.config import GRPOConfig
    from grpo.run import run
    from grpo.tiny import save_tiny_model

    model = save_tiny_model(out / "tiny", seed=seed)
    cfg = GRPOConfig(model=str(model), output_dir=str(out / "runs"), run_name="lora", num_steps=300,
                     prompts_per_step=16, group_size=8, max_new_tokens=6, learning_rate=2e-3, kl_coef=0.0,
                     loss_agg="token-mean", lora_rank=8,
                     lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
                     num_policy_workers=2, eval_size=10, checkpoint_interval=100, target_reward=0.8,
                     target_window=20, cpus_per_worker=1, cpus_per_reward_worker=0.5, seed=seed)
    t0 = time.time()
    result = run(cfg)
    wall = time.time() - t0
    rows = _rows(cfg.run_dir / "metrics.jsonl")
    full = sum(t.numel() * t.element_size() for t in AutoModelForCausalLM.from_pretrained(str(model)).state_dict().values())
    return {"curve": "lora-digit", "status": result.status, "steps": len(rows), "wall_s": round(wall, 1),
            "reward_first10": round(_mean("reward_mean", rows[:10]), 3),
            "reward_last20": round(_mean("reward_mean", rows[-20:]), 3),
            "training_s": round(rows[-1]["elapsed_s"], 1),
            "publish_bytes": rows[-1]["publish_bytes"], "model_bytes": full}


CURVES = {"agent-calculator": agent_calculator, "lora-digit": lora_digit}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curve", choices=[*CURVES, "all"], default="all")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import ray

    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    print(f"# {datetime.date.today()} {platform.machine()} {os.cpu_count()} cores, seed {args.seed}")
    results = []
    try:
        for name in CURVES if args.curve == "all" else [args.curve]:
            with tempfile.TemporaryDirectory() as tmp:
                results.append(CURVES[name](Path(tmp), args.seed))
            print(" ".join(f"{k}={v}" for k, v in results[-1].items()), flush=True)
    finally:
        ray.shutdown()
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
