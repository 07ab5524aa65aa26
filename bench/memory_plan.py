"""The memory plan against what the policy workers measure: `python -m grpo.run` on CPU with 2 policy workers
(gloo), for random-init models of three sizes, up to Qwen2.5-0.5B's real dimensions and vocabulary.

    python bench/memory_plan.py [--cases small,smol,qwen05] [--strategies fsdp,ddp] [--steps 3] [--lora RANK]

Each run's `metrics.jsonl` carries `peak_memory_gib` per step (the larger peak resident set of the two policy
workers, reset at the start of each step: the update and the publish, not the checkpoint); the figure is the
largest over the steps. Printed per case and strategy: the plan's policy-worker peak (grpo.memplan, device
"cpu"), the measured one, measured / plan, and the FSDP2 / DDP ratio where both ran. The digit task, 4 prompts
x 4 completions, prompts of at most 16 tokens, 16 new tokens; the plan is given the same lengths. `--lora R`
trains a rank-R adapter on the attention projections instead of the whole model (the frozen base is held
whole by each DDP worker, sharded under FSDP2).

The plan counts live tensors. glibc's default malloc raises its mmap threshold each time a large block is
freed (up to 32 MiB), after which freed tensors stay in the heap, resident, and the resident set stops
saying what is live (measured: +0.7 GiB on the ~135M model under FSDP2). The runs here fix the threshold at
64 KiB (`MALLOC_MMAP_THRESHOLD_=65536` in the Ray workers' environment) so that freed tensors go back to the
system; `--glibc-default` measures without it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {  # name: grpo.tiny arguments (qwen2-shaped)
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=1024, vocab_size=32000),
    "smol": dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                 vocab_size=49152, tie_embeddings=True),  # ~135M, SmolLM2-135M's shape
    "mid": dict(hidden_size=384, num_layers=12, num_heads=6, num_kv_heads=2, intermediate_size=1536,
                vocab_size=65536),  # ~75M, untied: a case the plan was not tuned on
    "qwen05": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                   vocab_size=151936, tie_embeddings=True),  # Qwen2.5-0.5B's dimensions and vocabulary
}


def settings(model: Path, out: Path, strategy: str, steps: int, lora: int = 0) -> list[str]:
    adapter = [f"lora_rank={lora}", "lora_target_modules=[q_proj,k_proj,v_proj,o_proj]"] if lora else []
    return [*adapter, f"model={model}", f"output_dir={out}", "run_name=r", "task=digit", f"num_steps={steps}",
            "prompts_per_step=4", "group_size=4", "max_new_tokens=16", "max_prompt_tokens=16",
            "micro_batch_size=8", "num_policy_workers=2", f"strategy={strategy}", "checkpoint_interval=0",
            "eval_size=0", "learning_rate=1e-5", "cpus_per_worker=1", "cpus_per_reward_worker=0.5"]


def planned(args: list[str]) -> float:
    from grpo import memplan
    from grpo.config import load_config

    cfg = load_config(None, args)
    return memplan.plan(cfg, memplan.ModelDims.from_config(cfg.model), device="cpu").policy_peak_gib


def measured(model: Path, out: Path, strategy: str, steps: int, keep_malloc: bool, lora: int = 0) -> float:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    if not keep_malloc:  # glibc: large tensors mmapped and given back when freed (see the docstring)
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run([sys.executable, "-m", "grpo.run", *settings(model, out, strategy, steps, lora)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{model.name} {strategy}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "r" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="small,smol,mid,qwen05")
    parser.add_argument("--strategies", default="fsdp,ddp")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-ddp", default="qwen05", help="cases too large for DDP on this machine")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's dynamic mmap threshold on")
    parser.add_argument("--plan-only", action="store_true", help="print the plans, run nothing")
    parser.add_argument("--lora", type=int, default=0, help="train a LoRA adapter of this rank, not the model")
    args = parser.parse_args()
    from grpo.tiny import save_tiny_model

    results: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            model = save_tiny_model(Path(tmp) / case, arch="qwen2", max_position_embeddings=4096, **CASES[case])
            for strategy in args.strategies.split(","):
                if strategy == "ddp" and case in args.skip_ddp.split(","):
                    continue
                out = Path(tmp) / f"{case}-{strategy}"
                plan = planned(settings(model, out, strategy, args.steps, args.lora))
                if args.plan_only:
                    print(f"{case} {strategy}: plan {plan:.2f} GiB", flush=True)
                    continue
                got = measured(model, out, strategy, args.steps, args.glibc_default, args.lora)
                results[(case, strategy)] = (plan, got)
                print(f"{case} {strategy}: plan {plan:.2f} GiB, measured {got:.2f} GiB ({got / plan:.2f}x)", flush=True)
    print(f"\n{datetime.date.today()} on {os.cpu_count()} cores, 2 policy workers (gloo), peak resident memory of "
          "a policy worker per step" + (f"; LoRA rank {args.lora} on the attention projections" if args.lora else ""))
    for (case, strategy), (plan, got) in results.items():
        print(f"{case:>7} {strategy}: plan {plan:6.2f} GiB  measured {got:6.2f} GiB  measured/plan {got / plan:.2f}")
    for case in CASES:
        if (case, "fsdp") in results and (case, "ddp") in results:
            f, d = results[(case, "fsdp")][1], results[(case, "ddp")][1]
            print(f"{case}: FSDP2 / DDP measured peak {f:.2f} / {d:.2f} GiB = {f / d:.2f}x")


if __name__ == "__main__":
    main()
