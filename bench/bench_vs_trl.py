"""One GRPO step of raygrpo against Hugging Face TRL's `GRPOTrainer`, side by side, on CPU.

    python bench/bench_vs_trl.py [--steps 20] [--warmup 3] [--repeats 2] [--prompts 16] [--group 8] [--max-new 8]
                                 [--threads 1] [--sides ours-inproc,trl,trl-gc,ours-ray,ours-ray-async] [--profile]

Every side trains the same random-init tiny Llama (grpo.tiny, saved once to a temp directory) on the
`digit` task ("digit d:" prompts, reward grpo.rewards.digit_reward) with the same batch: P prompts x G
completions per optimizer step, at most L new tokens, temperature 1.0, lr 1e-3, no KL term, token-mean
loss, micro-batches of 64 sequences, torch.set_num_threads(threads). Sides, run one after another:

  ours-inproc  RolloutWorker.generate -> reward -> score_batch -> Learner.step -> load_weights into the
               rollout model, all in this process (the engine's pieces without Ray)
  ours-ray     the real engine, grpo.run.run: Ray Train with 1 policy worker, 1 rollout actor, 1 reward
               actor on a local ray.init; step time from its metrics.jsonl, wall time per step from the
               differences of `elapsed_s` between rows (includes the per-step Ray round trips)
  ours-ray-async  the same with async_rollouts: step k+1 is sampled on the other core while step k trains
  trl          trl.GRPOTrainer (transformers generate, no vLLM), per_device_train_batch_size 64 with
               gradient_accumulation_steps 2 and num_generations G, so one optimizer step is one
               generation batch of P*G completions and TRL skips its extra old-logprob forward pass

Warm-up steps are excluded from every figure; the sides run `--repeats` times, every other pass in reverse
order, and figures are medians over the pooled steps, so background load on a shared machine lands on all
sides alike. tok/CPU-s (one-process sides) divides by this process's CPU time instead of wall time, which a
neighbour process hardly moves. The headline is completion tokens per second, ours / TRL.
The phase split printed for ours-inproc (and TRL's generate share) is what docs/benchmarks.md quotes.
Not covered: learning speed (reward per step); both sides use the same loss, so per-step work is equal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

LEARNING_RATE = 1e-3
"""the rate DESIGN.md measured the digit task learning at"""
MICRO_BATCH = 64
"""sequences per forward/backward on both sides (our default micro_batch_size)"""


@dataclass
class SideResult:
    """Steady-state figures of one side over the measured steps."""

    name: str
    step_times: list[float]  # seconds per optimizer step, warm-up excluded
    tokens: list[int]  # completion tokens per measured step
    wall_times: list[float] = field(default_factory=list)  # wall seconds between steps (ours-ray only)
    cpu_times: list[float] = field(default_factory=list)  # this process's CPU seconds per step (one-process sides)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step by phase, where known

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times)

    @property
    def wall_s(self) -> float:
        return statistics.median(self.wall_times) if self.wall_times else self.step_s

    # Medians of per-step rates: one step slowed by a neighbour process does not move them.
    @property
    def tokens_per_s(self) -> float:
        return statistics.median(n / t for n, t in zip(self.tokens, self.step_times, strict=True))

    @property
    def tokens_per_cpu_s(self) -> float | None:
        if not self.cpu_times:
            return None
        return statistics.median(n / t for n, t in zip(self.tokens, self.cpu_times, strict=True))

    @property
    def wall_tokens_per_s(self) -> float:
        if not self.wall_times:
            return self.tokens_per_s
        return statistics.median(n / t for n, t in zip(self.tokens, self.wall_times, strict=False))

    def merge(self, other: SideResult) -> SideResult:
        """Pool the measured steps of two passes of the same side."""
        n, m = len(self.step_times), len(other.step_times)
        phases = {k: (v * n + other.phases.get(k, v) * m) / (n + m) for k, v in self.phases.items()}
        return SideResult(self.name, self.step_times + other.step_times, self.tokens + other.tokens,
                          self.wall_times + other.wall_times, self.cpu_times + other.cpu_times, phases)


def base_config(model_dir: Path, args: argparse.Namespace, **extra):
    from grpo.config import GRPOConfig

    return GRPOConfig(
        model=str(model_dir), task="digit", prompts_per_step=args.prompts, group_size=args.group,
        max_new_tokens=args.max_new, temperature=1.0, learning_rate=LEARNING_RATE, kl_coef=0.0,
        micro_batch_size=MICRO_BATCH, torch_threads=args.threads, eval_size=0, checkpoint_interval=0,
        seed=args.seed, **extra,
    )


# ---- ours, in one process ------------------------------------------------------------------------


def bench_ours_inproc(model_dir: Path, args: argparse.Namespace, profile: bool = False) -> SideResult:
    """The engine's pieces in one process: the loop grpo.trainer runs, minus Ray."""
    from transformers import AutoModelForCausalLM

    from grpo.learner import Learner, score_batch
    from grpo.rewards import resolve
    from grpo.rollout import RolloutWorker
    from grpo.tasks import load_dataset

    torch.manual_seed(args.seed)
    cfg = base_config(model_dir, args)
    worker = RolloutWorker(str(model_dir), torch_threads=args.threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    learner = Learner(cfg, model, ref_model=None, pad_id=worker.pad_id)
    reward_fn = resolve("digit")
    dataset = load_dataset("digit", eval_size=0, seed=args.seed)

    phase_names = ("generate", "reward", "update", "publish")
    phases = {k: 0.0 for k in phase_names}
    step_times: list[float] = []
    cpu_times: list[float] = []
    tokens: list[int] = []
    profiler = None
    for step in range(1, args.warmup + args.steps + 1):
        measured = step > args.warmup
        if measured and profile and profiler is None:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        cpu0 = time.process_time()
        t = [time.perf_counter()]
        samples = dataset.batch(step, args.prompts, args.seed)
        # 1. sample G completions per prompt (KV cache, one prefill per prompt)
        rollout = worker.generate([s.prompt for s in samples], group_size=args.group,
                                  max_new_tokens=args.max_new, temperature=1.0, seed=step)
        t.append(time.perf_counter())
        # 2. score, 3. group advantages
        g = args.group
        rewards = [reward_fn(samples[i // g].prompt, text, samples[i // g].expected)
                   for i, text in enumerate(rollout.texts)]
        batch = score_batch(rollout, rewards, cfg)
        t.append(time.perf_counter())
        # 4. policy update
        learner.step(batch, num_tokens=batch.num_tokens, num_seqs=batch.num_seqs, world_size=1)
        t.append(time.perf_counter())
        # 5. publish: the learner's weights into the sampling model
        worker.load_weights(learner.base_model.state_dict(), step)
        t.append(time.perf_counter())
        if measured:
            step_times.append(t[-1] - t[0])
            cpu_times.append(time.process_time() - cpu0)
            tokens.append(rollout.num_tokens)
            for name, a, b in zip(phase_names, t, t[1:], strict=False):
                phases[name] += (b - a) / args.steps
    if profiler is not None:
        profiler.__exit__(None, None, None)
        print("\n== torch.profiler, ours-inproc, measured steps (self CPU time) ==")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    return SideResult("ours-inproc", step_times, tokens, cpu_times=cpu_times, phases=phases)


# ---- ours, through the real Ray engine ------------------------------------------------------------


def bench_ours_ray(model_dir: Path, args: argparse.Namespace, out_dir: Path, async_rollouts: bool = False) -> SideResult:
    """grpo.run.run with 1 policy worker, 1 rollout actor, 1 reward actor on a local Ray; with
    `async_rollouts` the rollout actor samples step k+1 (on the other core) while step k trains."""
    import ray

    from grpo.run import run

    cfg = base_config(
        model_dir, args, num_steps=args.warmup + args.steps, num_policy_workers=1, num_rollout_workers=1,
        num_reward_workers=1, output_dir=str(out_dir), run_name="bench-vs-trl", async_rollouts=async_rollouts,
    )
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False, log_to_driver=False)
    try:
        result = run(cfg)
    finally:
        ray.shutdown()
    if result.status != "completed":
        raise RuntimeError(f"ours-ray: run ended {result.status}: {result.error}")
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["step"])
    measured = [r for r in rows if r["step"] > args.warmup]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows}
    walls = [elapsed[r["step"]] - elapsed.get(r["step"] - 1, 0.0) for r in measured]  # elapsed_s starts at step 1
    train = statistics.mean(r["train_time_s"] for r in measured)
    step = statistics.mean(r["step_time_s"] for r in measured)
    return SideResult(
        "ours-ray-async" if async_rollouts else "ours-ray", [r["step_time_s"] for r in measured], [int(r["completion_tokens"]) for r in measured],
        wall_times=walls, phases={"update": train, "rest (sample+score+publish+report)": step - train},
    )


# ---- Hugging Face TRL --------------------------------------------------------------------------------


def bench_trl(model_dir: Path, args: argparse.Namespace, out_dir: Path, *, checkpointing: bool) -> SideResult:
    """trl.GRPOTrainer on the same model, tokenizer, prompts and reward.

    TRL turns activation (gradient) checkpointing on by default, which recomputes the forward pass
    in backward. Ours does not checkpoint, so the headline `trl` side turns it off (the same work);
    `trl-gc` keeps TRL's default to show what an out-of-the-box TRL run costs.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.rewards import resolve
    from grpo.tasks import load_dataset

    total = args.warmup + args.steps
    n_completions = args.prompts * args.group
    if n_completions % MICRO_BATCH:
        raise SystemExit(f"--prompts x --group ({n_completions}) must be a multiple of {MICRO_BATCH}")
    digit = resolve("digit")
    samples = load_dataset("digit", eval_size=0, seed=args.seed).train
    rows = [samples[i % len(samples)] for i in range(total * args.prompts)]
    train_dataset = Dataset.from_dict({"prompt": [s.prompt for s in rows], "expected": [s.expected for s in rows]})

    counted: list[int] = []  # completion tokens of each generation batch, in order

    def digit_reward(prompts, completions, expected, completion_ids, **kwargs) -> list[float]:
        counted.append(sum(len(c) for c in completion_ids))
        return [digit(p, c, e) for p, c, e in zip(prompts, completions, expected, strict=True)]

    class StepTimer(TrainerCallback):
        """Wall time between the ends of consecutive optimizer steps (generation included)."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu: list[float] = []

        def on_train_begin(self, *a, **k):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    gen_seconds: list[float] = []
    generate = model.generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            gen_seconds.append(time.perf_counter() - t0)

    model.generate = timed_generate  # TRL calls the unwrapped model's generate on one CPU process
    config = GRPOConfig(
        output_dir=str(out_dir), max_steps=total, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta2=0.99, max_grad_norm=1.0,
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=n_completions // MICRO_BATCH,
        num_generations=args.group, max_completion_length=args.max_new, temperature=1.0, top_p=1.0,
        beta=0.0, loss_type="dapo", epsilon=0.2, num_iterations=1, use_vllm=False, use_cpu=True,
        bf16=False, fp16=False, report_to="none", logging_strategy="no", save_strategy="no",
        disable_tqdm=True, seed=args.seed, dataloader_num_workers=0, gradient_checkpointing=checkpointing,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=digit_reward, args=config, train_dataset=train_dataset,
                          processing_class=tokenizer, callbacks=[timer])
    torch.set_num_threads(args.threads)  # after the trainer is built, in case anything reset it
    trainer.train()
    if len(counted) != total or len(timer.ends) != total + 1:
        raise RuntimeError(f"trl: expected {total} generations and steps, got {len(counted)} and {len(timer.ends) - 1}")
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    step_times = steps[args.warmup :]
    cpu_times = [b - a for a, b in zip(timer.cpu, timer.cpu[1:], strict=False)][args.warmup :]
    gen = statistics.mean(gen_seconds[args.warmup :])
    return SideResult("trl-gc" if checkpointing else "trl", step_times, counted[args.warmup :], cpu_times=cpu_times,
                      phases={"generate": gen, "rest (reward+forward/backward+optimizer)": statistics.mean(step_times) - gen})


# ---- report ----------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {cpu}"


def versions() -> str:
    import ray
    import transformers
    import trl

    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"trl {trl.__version__}, ray {ray.__version__}")


def report(results: list[SideResult], args: argparse.Namespace) -> None:
    trl = next((r for r in results if r.name == "trl"), None)
    print(f"\n== one GRPO step vs TRL GRPOTrainer, {datetime.date.today().isoformat()} ==")
    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    print(f"settings: task digit, {args.prompts} prompts x {args.group} completions, max {args.max_new} new tokens, "
          f"lr {LEARNING_RATE}, beta 0, micro-batch {MICRO_BATCH}, torch threads {args.threads}, "
          f"{args.steps} measured steps after {args.warmup} warm-up x {args.repeats} passes "
          f"(medians over all measured steps)")
    print()
    header = (f"| {'side':<14} | {'step s':>7} | {'wall/step s':>11} | {'tokens/step':>11} | {'tok/s':>8} "
              f"| {'x TRL':>6} | {'tok/CPU-s':>9} | {'x TRL':>6} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        # Ray sides are rated on wall time between steps: what a user waits, Ray round trips included.
        ratio = f"{r.wall_tokens_per_s / trl.tokens_per_s:.2f}" if trl else "-"
        per_cpu, cpu_ratio = "-", "-"
        if r.tokens_per_cpu_s is not None:
            per_cpu = f"{r.tokens_per_cpu_s:.0f}"
            if trl and trl.tokens_per_cpu_s:
                cpu_ratio = f"{r.tokens_per_cpu_s / trl.tokens_per_cpu_s:.2f}"
        print(f"| {r.name:<14} | {r.step_s:>7.3f} | {r.wall_s:>11.3f} | {statistics.mean(r.tokens):>11.1f} | "
              f"{r.wall_tokens_per_s:>8.0f} | {ratio:>6} | {per_cpu:>9} | {cpu_ratio:>6} |")
    if trl:
        for r in results:
            if r.name.startswith("ours"):
                print(f"headline {r.name}/trl completion tokens/s: {r.wall_tokens_per_s / trl.tokens_per_s:.2f}x"
                      + (" (wall time between steps)" if r.wall_times else ""))
    for r in results:
        if r.phases:
            split = ", ".join(f"{k} {v:.3f}s" for k, v in r.phases.items())
            print(f"phases per step, {r.name}: {split}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before measuring")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new", type=int, default=8, help="max completion tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on every side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2,
                        help="passes over the sides, every other one in reverse order; steps are pooled")
    parser.add_argument("--sides", default="ours-inproc,trl,trl-gc,ours-ray,ours-ray-async",
                        help="comma-separated sides to run")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table for ours-inproc")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - {"ours-inproc", "ours-ray", "ours-ray-async", "trl", "trl-gc"}
    if unknown:
        parser.error(f"--sides: unknown {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from grpo.tiny import save_tiny_model

    pooled: dict[str, SideResult] = {}
    loads: list[float] = []
    # Alternating the order (A B C, C B A, ...) spreads drifting background load evenly over the sides.
    order = [(i, side) for i in range(args.repeats) for side in (sides if i % 2 == 0 else sides[::-1])]
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        model_dir = save_tiny_model(Path(tmp) / "tiny", seed=args.seed)
        for i, side in order:
            load = os.getloadavg()[0]
            if load > 0.5:
                print(f"[{side}] warning: load average {load:.1f} before start; other processes share these cores",
                      flush=True)
            loads.append(load)
            t0 = time.perf_counter()
            if side == "ours-inproc":
                got = bench_ours_inproc(model_dir, args, profile=args.profile and i == 0)
            elif side in ("trl", "trl-gc"):
                got = bench_trl(model_dir, args, Path(tmp) / f"{side}-{i}", checkpointing=side == "trl-gc")
            else:
                got = bench_ours_ray(model_dir, args, Path(tmp) / f"{side}-{i}", async_rollouts=side == "ours-ray-async")
            pooled[side] = pooled[side].merge(got) if side in pooled else got
            torch.set_num_threads(args.threads)
            print(f"[{side}] pass {i + 1} done in {time.perf_counter() - t0:.1f}s: {got.step_s:.3f} s/step",
                  flush=True)
    report([pooled[s] for s in sides], args)
    print(f"1-min load average before each side: {', '.join(f'{x:.2f}' for x in loads)} (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
