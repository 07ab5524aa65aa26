"""Time to a trained policy: seconds to a running mean reward of 0.9, ours against TRL and a bare loop.

    python bench/time_to_reward.py [--sides run,async,api,trl,bare] [--seeds 0,1] [--target 0.9] [--window 10]
                                   [--max-steps 400] [--prompts 16] [--group 8] [--max-new 6] [--lr 1e-3] [--threads 1]

What a user waits for is not one step but the whole run. Every side is its own process, started by this script,
on the same random-init tiny Llama (grpo.tiny, saved once to a temp directory) and the digit task: P prompts x G
completions per step, at most L new tokens, temperature 1, lr, no KL, token-mean loss, one optimizer step per
batch. Sides run one after another, every other seed in reverse order, so background load lands on all alike:

  run   `python -m grpo.run` with its defaults otherwise (a local Ray, 1 policy worker, 1 rollout and 1 reward
        actor) and `target_reward`/`target_window`, so it ends when done; rows of its metrics.jsonl are timed
        when this script first sees them (polled every 50 ms)
  async the same with `async_rollouts=true` (the next batch sampled while the policy updates: one step of
        staleness, truncated importance sampling)
  api   the same run through the job API: `raygrpo up` (a local Ray head, the API, embedded database) is started
        and waited for untimed, as a service is up before anyone submits; then `training.start_grpo` with the
        SDK, timed from the request; the job's metrics.jsonl rows as for `run`, and once it is `completed` the
        seconds until none of the run's actors is left on the cluster (Ray's state API)
  trl   this file with `--child trl`: TRL's GRPOTrainer (transformers generate, no vLLM) with one optimizer
        step per generation batch of P x G, loss "dapo" (token-mean), beta 0, no gradient checkpointing;
        needs the bench extra (`pip install -e ".[bench]"`)
  bare  this file with `--child bare`: HF `generate` (sampling, G sequences a prompt), the reward, group-
        normalised advantages, one forward for the log-probs, token-mean policy-gradient loss, AdamW; it
        prints one JSON line a step with its time since process start

For each side and seed: seconds from process start (api: from the request) to the first step, the step at
which the mean of the last `--window` steps' rewards first reaches `--target`, the seconds to that step, and
the seconds to the end as a user waits for it: the process's exit (api: `get_status` saying `completed` with
the final checkpoint stored), the last step stored and the seconds from it to the end. Then medians, the ratios ours / TRL and ours / bare on the time to the end (to
the target in brackets), and one JSON line with the medians and ratios.
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
import time
from pathlib import Path


def bare_child(args: argparse.Namespace) -> None:
    """The bare loop, in this process; one JSON line a step: {"step", "reward_mean", "t"} (t since start)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.rewards import resolve
    from grpo.tasks import load_dataset

    t0 = float(os.environ["TTR_T0"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    reward = resolve("digit")
    data = load_dataset("digit", eval_size=0, seed=args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    window: list[float] = []
    for step in range(1, args.max_steps + 1):
        samples = data.batch(step, args.prompts, args.seed)
        enc = tok([s.prompt for s in samples], return_tensors="pt", padding=True, add_special_tokens=False)
        model.eval()
        with torch.no_grad():
            seqs = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=args.max_new, num_return_sequences=args.group, pad_token_id=pad)
        prompt_len = enc["input_ids"].shape[1]
        completions = seqs[:, prompt_len:]
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        r = torch.tensor([reward(samples[i // args.group].prompt, t, samples[i // args.group].expected)
                          for i, t in enumerate(texts)])
        grouped = r.view(-1, args.group)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        # completion tokens up to and including the first EOS count; what generate padded after it does not
        done = (completions == tok.eos_token_id).int().cumsum(1)
        mask = ((done == 0) | ((done == 1) & (completions == tok.eos_token_id))).float()
        attn = torch.cat([enc["attention_mask"].repeat_interleave(args.group, 0), mask.long()], 1)
        model.train()
        logits = model(input_ids=seqs, attention_mask=attn).logits[:, prompt_len - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
        # on-policy: the ratio is 1 and its gradient is grad log p; token-mean over the whole batch
        loss = -(adv.unsqueeze(1) * logp * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        mean = float(r.mean())
        print(json.dumps({"step": step, "reward_mean": mean, "t": time.time() - t0}), flush=True)
        window = (window + [mean])[-args.window :]
        if len(window) == args.window and sum(window) / len(window) >= args.target:
            return


def trl_child(args: argparse.Namespace) -> None:
    """TRL's GRPOTrainer on the same setup, in this process; one JSON line per optimizer step as bare_child.

    One optimizer step is one generation batch of P x G completions (per-device batch 64, gradient
    accumulation P*G/64), as in bench_vs_trl.py: loss "dapo" (token-mean), beta 0 (no KL), one iteration
    (on-policy), constant lr, no gradient checkpointing (ours does not checkpoint either)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.rewards import resolve
    from grpo.tasks import load_dataset

    t0 = float(os.environ["TTR_T0"])
    micro = 64
    n = args.prompts * args.group
    if n % micro:
        raise SystemExit(f"--prompts x --group ({n}) must be a multiple of {micro}")
    digit = resolve("digit")
    data = load_dataset("digit", eval_size=0, seed=args.seed)
    rows = [s for step in range(1, args.max_steps + 1) for s in data.batch(step, args.prompts, args.seed)]
    train = Dataset.from_dict({"prompt": [s.prompt for s in rows], "expected": [s.expected for s in rows]})
    means: list[float] = []

    def digit_reward(prompts, completions, expected, **kwargs) -> list[float]:
        r = [digit(p, c, e) for p, c, e in zip(prompts, completions, expected, strict=True)]
        means.append(sum(r) / len(r))
        return r

    class Report(TrainerCallback):
        def __init__(self) -> None:
            self.window: list[float] = []

        def on_step_end(self, a, state, control, **k):
            mean = means[-1]
            print(json.dumps({"step": state.global_step, "reward_mean": mean, "t": time.time() - t0}), flush=True)
            self.window = (self.window + [mean])[-args.window :]
            if len(self.window) == args.window and sum(self.window) / args.window >= args.target:
                control.should_training_stop = True

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=micro,
            gradient_accumulation_steps=n // micro, num_generations=args.group, max_completion_length=args.max_new,
            temperature=1.0, top_p=1.0, beta=0.0, loss_type="dapo", num_iterations=1, use_vllm=False, use_cpu=True,
            bf16=False, fp16=False, report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True,
            seed=args.seed, dataloader_num_workers=0, gradient_checkpointing=False, shuffle_dataset=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=digit_reward, args=config, train_dataset=train,
                              processing_class=tok, callbacks=[Report()])
        torch.set_num_threads(args.threads)
        trainer.train()


CLI = str(Path(sys.executable).with_name("raygrpo"))  # the job API's command line, from this environment


def start_api(home: Path, model_dir: Path, env: dict[str, str]) -> tuple[dict[str, str], str, dict[str, str]]:
    """`raygrpo up` (a local Ray head on free ports and the job API on it, embedded database), waited for until
    it answers; -> (its stack.json: rpc_url, dashboard_url, ...), an admin token, and the environment that
    names its home. The caller runs `raygrpo down` with that environment."""
    import httpx

    env = {**env, "RAYGRPO_HOME": str(home), "RAYGRPO_MODEL_ROOTS": str(model_dir.parent)}
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "up.log", "w") as log:
        if subprocess.run([CLI, "up", "--port", "0"], env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"raygrpo up failed; see {home / 'up.log'}")
    stack = json.loads((home / "stack.json").read_text())
    deadline = time.time() + 300
    while httpx.get(f"{stack['api_url']}/health/ready", timeout=5).status_code != 200:
        if time.time() > deadline:
            raise SystemExit(f"the job API did not get ready; see {home / 'up.log'}")
        time.sleep(0.5)
    token = subprocess.run([CLI, "token", "--role", "admin"], env=env, check=True, capture_output=True,
                           text=True).stdout.strip()
    return stack, token, env


CLUSTER_ACTORS = {"ReservationLedger", "_AutoscalingCoordinatorActor"}


def alive_actors(dashboard: str) -> dict[str, str]:
    """{actor id: class name} of the cluster's live actors (Ray's state API on the stack's dashboard)."""
    os.environ["RAY_AUTH_MODE"] = "token"  # as `raygrpo up` runs its head: read when Ray is first imported
    from ray.util.state import list_actors

    return {a.actor_id: a.class_name for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")],
                                                          limit=10_000, raise_on_missing_output=False)}


def api_side(seed: int, model_dir: Path, out: Path, args: argparse.Namespace,
             env: dict[str, str]) -> tuple[list[tuple[int, float, float]], float, float, float]:
    """The same run through the job API on a running `raygrpo up` stack (embedded database, a local Ray head;
    its start-up is not timed: the service is up before a user submits), then `training.start_grpo` with the
    SDK. Timed from the request: the job's metrics.jsonl rows as they appear, and the end as a user sees it:
    `get_status` saying `completed` with the final checkpoint stored (polled every 0.2 s once the target is
    reached, else every second); then the seconds until the run's actors are gone from the cluster.
    -> (rows, t0, seconds to completed, seconds from completed to no actor of the run). The stack is stopped
    after (`raygrpo down`)."""
    from app.client.sdk import Client

    home = out / f"api-{seed}"
    stack, token, env = start_api(home, model_dir, env)
    url = stack["api_url"]
    try:
        before = alive_actors(stack["dashboard_url"])  # the service's own: Serve, the dispatcher
        from grpo.tasks import load_dataset

        data = load_dataset("digit", eval_size=0, seed=seed)
        rows = [{"query": s.prompt, "expected_outcome": s.expected} for s in data.train]
        client = Client(url, token=token)
        t0 = time.time()
        job = client.start_grpo("ttr", rows, config={
            "model": str(model_dir), "reward": "digit", "n_iterations": args.max_steps, "batch_size": args.prompts,
            "n_trajectories_per_query": args.group, "learning_rate": args.lr, "max_new_tokens": args.max_new,
            "kl_coef": 0.0, "checkpoint_interval": 0, "target_reward": args.target,
            "engine": {"loss_agg": "token-mean", "seed": seed, "target_window": args.window,
                       "torch_threads": args.threads, "eval_size": 0}})
        metrics = home / "jobs" / job.job_id / "run" / "metrics.jsonl"
        seen: list[tuple[int, float, float]] = []
        polls = 0
        while True:
            if metrics.exists():
                rows_ = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                now = time.time() - t0
                seen.extend((r["step"], r["reward_mean"], now) for r in rows_[len(seen):])
            polls += 1
            near = len(seen) >= args.window and sum(m for _, m, _ in seen[-args.window:]) / args.window >= args.target
            # the status every second, every 0.2 s once the target is reached (the end is near): finely timed
            # and inside the API's rate limit (100 calls a minute)
            if polls % (4 if near else 20) == 0:
                status = client.get_status(job.job_id)
                if status.done:
                    done_s = time.time() - t0
                    break
            time.sleep(0.05)
        if status.status != "completed":
            raise SystemExit(f"api seed {seed}: job {status.status}: {status.error_message}")
        if status.best_checkpoint is None:
            raise SystemExit(f"api seed {seed}: completed without a checkpoint")
        # the run's actors (Train controller and workers, rollout and reward actors, board, monitor) must go;
        # two detached actors are the cluster's, made by the first run and kept for the next: our reservation
        # ledger and Ray Train's autoscaling coordinator
        while left := {k: v for k, v in alive_actors(stack["dashboard_url"]).items()
                       if k not in before and v not in CLUSTER_ACTORS}:
            if time.time() - t0 - done_s > 120:
                raise SystemExit(f"api seed {seed}: the run's actors still alive 120 s after completed: {left}")
            time.sleep(0.2)
        return seen, t0, done_s, time.time() - t0 - done_s
    finally:
        subprocess.run([CLI, "down"], env=env, capture_output=True)


def run_side(side: str, seed: int, model_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    """Start one side's process and time it; -> {first_step_s, steps, seconds, total_s, reached}."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    env["TTR_T0"] = repr(t0)
    seen: list[tuple[int, float, float]] = []  # (step, reward_mean, seconds since start)
    if side in ("bare", "trl"):
        cmd = [sys.executable, __file__, "--child", side, "--model", str(model_dir), "--seed", str(seed),
               *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("prompts", "group", "max_new", "lr", "threads",
                                                                         "target", "window", "max_steps")]]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:
            if line.startswith('{"step"'):  # the child's rows (TRL prints its own dicts too)
                row = json.loads(line)
                seen.append((row["step"], row["reward_mean"], row["t"]))
        proc.wait()
    elif side in ("run", "async"):
        name = f"ttr-{side}-{seed}"
        cmd = [sys.executable, "-m", "grpo.run", f"model={model_dir}", "task=digit", f"output_dir={out}",
               f"run_name={name}", f"seed={seed}", f"prompts_per_step={args.prompts}", f"group_size={args.group}",
               f"max_new_tokens={args.max_new}", f"learning_rate={args.lr}", "kl_coef=0.0", "loss_agg=token-mean",
               "eval_size=0", "checkpoint_interval=0", f"num_steps={args.max_steps}", f"torch_threads={args.threads}",
               f"target_reward={args.target}", f"target_window={args.window}",
               f"async_rollouts={'true' if side == 'async' else 'false'}"]
        metrics = out / name / "metrics.jsonl"
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            alive = proc.poll() is None
            if metrics.exists():
                rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                now = time.time() - t0
                seen.extend((r["step"], r["reward_mean"], now) for r in rows[len(seen):])
            if not alive:
                break
            time.sleep(0.05)
        if proc.returncode:
            raise SystemExit(f"{side} seed {seed}: exit {proc.returncode}: {' '.join(cmd)}")
    elif side == "api":
        seen, t0, done_s, actors_gone_s = api_side(seed, model_dir, out, args, env)
    else:
        raise SystemExit(f"unknown side {side!r}")
    total = done_s if side == "api" else time.time() - t0
    reached = None
    for i in range(args.window - 1, len(seen)):
        if sum(m for _, m, _ in seen[i - args.window + 1 : i + 1]) / args.window >= args.target:
            reached = seen[i]
            break
    return {"side": side, "seed": seed, "first_step_s": seen[0][2] if seen else None, "total_s": total,
            "steps": reached[0] if reached else None, "seconds": reached[2] if reached else None,
            "last_step": seen[-1][0] if seen else None, "tail_s": total - seen[-1][2] if seen else None,
            **({"actors_gone_s": actors_gone_s} if side == "api" else {})}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default="run,bare")
    p.add_argument("--seeds", default="0")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "bare":
        return bare_child(args)
    if args.child == "trl":
        return trl_child(args)

    from grpo.tiny import save_tiny_model

    sides = args.sides.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(Path(tmp) / "tiny")
        results = []
        for n, seed in enumerate(seeds):
            for side in (sides if n % 2 == 0 else sides[::-1]):
                r = run_side(side, seed, Path(model_dir), Path(tmp) / "runs", args)
                print(json.dumps(r), flush=True)
                results.append(r)
    print(f"\n{datetime.date.today()}  {os.cpu_count()} cores, 1-min load at the end "
          f"{os.getloadavg()[0]:.1f}; digit task, {args.prompts} x {args.group}, {args.max_new} new tokens, "
          f"lr {args.lr}, target {args.target} over {args.window} steps, seeds {seeds}")
    print(f"{'side':<6} {'first step s':>12} {'steps to target':>16} {'s to target':>12} {'end s':>10} "
          f"{'last step':>9} {'after it s':>10}")
    def median(rows: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.median(vals) if vals else None

    def fmt(v: float | None, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"

    summary: dict[str, object] = {"date": str(datetime.date.today()), "cores": os.cpu_count(), "seeds": seeds}
    for side in sides:
        rows = [r for r in results if r["side"] == side]
        med = {k: median(rows, k) for k in ("first_step_s", "steps", "seconds", "total_s", "last_step", "tail_s",
                                            *(("actors_gone_s",) if side == "api" else ()))}
        med["reached"] = sum(r["steps"] is not None for r in rows)
        summary[side] = med
        print(f"{side:<6} {fmt(med['first_step_s'], 12, 1)} {fmt(med['steps'], 16, 0)} "
              f"{fmt(med['seconds'], 12, 1)} {fmt(med['total_s'], 10, 1)} {fmt(med['last_step'], 9, 0)} "
              f"{fmt(med['tail_s'], 10, 1)}   ({med['reached']}/{len(rows)} reached)"
              + (f"; actors gone {med['actors_gone_s']:.1f} s after completed" if side == "api" else ""))
    # What a user waits for: the process's exit (api: the job `completed` with its checkpoint)
    for ours in ("run", "async", "api"):
        for base in ("trl", "bare"):
            if ours in summary and base in summary:
                ratio = summary[ours]["total_s"] / summary[base]["total_s"]
                summary[f"{ours}/{base}"] = round(ratio, 3)
                to_target = (f"{summary[ours]['seconds'] / summary[base]['seconds']:.2f}x"
                             if summary[ours]["seconds"] and summary[base]["seconds"] else "-")
                print(f"to the end, {ours} / {base}: {ratio:.2f}x   (to the target: {to_target})")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
