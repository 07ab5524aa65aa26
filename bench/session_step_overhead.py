"""One GRPO step driven through training-session primitives, against `grpo.run`'s in-cluster loop on the same step.

    python bench/session_step_overhead.py [--steps 40] [--skip 8] [--sides run,direct,api] [--threads 1]

The step: the digit task on the random-init tiny Llama (grpo.tiny), 16 prompts x 8 completions, at most 8 new
tokens, one AdamW step (lr 1e-3), one policy worker and one sampler. Each side runs `--steps` steps; the first
`--skip` are dropped (start-up, first compiles) and the median of the rest is the step time.

  run     `python -m grpo.run` (a local Ray; 1 policy worker, 1 rollout actor, 1 reward actor): the time between
          consecutive steps (`elapsed_s` in metrics.jsonl), the loop as it runs inside the cluster
  direct  the docs' client loop (docs/examples/session_grpo.py) on a session host driven over Ray calls from
          this process: the session's own work with no HTTP, no API, no database
  api     the same loop through the job API (`python -m app.api.serve`, embedded database, its own local Ray)
          and the SDK over HTTP, as a user runs it: what `api` adds over `direct` is the API's cost

Prints each side's median step and the ratios api / run, direct / run and api - direct (ms a step).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def load_example():
    spec = importlib.util.spec_from_file_location("session_grpo", ROOT / "docs" / "examples" / "session_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loop_times(client, args) -> list[float]:
    """Seconds between consecutive steps of the docs' loop (its log line ends each step)."""
    stamps: list[float] = []
    load_example().train(client, steps=args.steps, target=2.0, log=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


class DirectSession:
    """What the SDK's TrainingSession offers, on the host actor directly (Ray calls, no HTTP)."""

    def __init__(self, host, pool: ThreadPoolExecutor):
        self.host, self.pool, self.seq, self.id = host, pool, 0, "direct"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        import ray

        ray.get(self.host.close.remote())

    def _go(self, ref) -> Future:
        import ray

        return self.pool.submit(ray.get, ref)

    def sample(self, prompts, **kw) -> Future:
        return self._go(self.host.sample.remote(prompts, None, n=kw.pop("num_samples", 1), after_seq=self.seq, **kw))

    def forward_backward(self, rows, loss_fn, loss_config=None) -> Future:
        self.seq += 1
        return self._go(self.host.forward_backward.remote(rows, loss_fn, loss_config, seq=self.seq))

    def optim_step(self, **adam) -> Future:
        self.seq += 1
        return self._go(self.host.optim_step.remote(adam, seq=self.seq))


class DirectClient:
    def __init__(self, model: str, threads: int):
        self.model, self.threads = model, threads

    def create_session(self, **_):
        import ray

        from grpo.session import start_host

        host = start_host(f"bench-{os.getpid()}", {"model": self.model, "num_workers": 1, "idle_timeout_s": 3600,
                                                     "torch_threads": self.threads})
        while ray.get(host.status.remote())["state"] not in ("active", "failed"):
            time.sleep(0.2)
        return DirectSession(host, ThreadPoolExecutor(4))


def direct_child(args) -> None:
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    print(json.dumps({"times": loop_times(DirectClient(args.model, args.threads), args)}))


def run_side(model: Path, out: Path, args) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "grpo.run", f"model={model}", "task=digit", f"output_dir={out}", "run_name=step",
           "prompts_per_step=16", "group_size=8", "max_new_tokens=8", "learning_rate=0.001", "kl_coef=0.0",
           "eval_size=0", "checkpoint_interval=0", f"num_steps={args.steps}", f"torch_threads={args.threads}"]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "step" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:], strict=False)]


def api_side(model: Path, out: Path, args) -> list[float]:
    from time_to_reward import start_api

    from app.client.sdk import Client

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYGRPO_RATE_LIMITS"] = "default=0"
    api, url, token = start_api(out / "api", model, env)
    try:
        with Client(url, token=token, timeout=600) as client:
            return loop_times(_ModelClient(client, str(model)), args)
    finally:
        api.terminate()
        api.wait(timeout=120)


class _ModelClient:
    """The SDK client, creating the session on the bench's model."""

    def __init__(self, client, model: str):
        self.client, self.model = client, model

    def create_session(self, **kw):
        return self.client.create_session(base_model=self.model, **kw)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=8)
    ap.add_argument("--sides", default="run,direct,api")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "direct":
        direct_child(args)
        return
    from grpo.tiny import save_tiny_model

    out = Path(tempfile.mkdtemp(prefix="session-bench-"))
    model = save_tiny_model(out / "models" / "tiny", seed=0)
    medians: dict[str, float] = {}
    for side in args.sides.split(","):
        t0 = time.time()
        if side == "run":
            times = run_side(model, out / "run", args)
        elif side == "direct":
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            proc = subprocess.run([sys.executable, __file__, "--child", "direct", "--model", str(model),
                                   f"--steps={args.steps}", f"--threads={args.threads}"], env=env, check=True,
                                  capture_output=True, text=True)
            times = json.loads(proc.stdout.strip().splitlines()[-1])["times"]
        elif side == "api":
            times = api_side(model, out, args)
        else:
            raise SystemExit(f"unknown side {side!r}")
        kept = times[args.skip:]
        medians[side] = statistics.median(kept)
        print(f"{side:7s} median step {medians[side] * 1000:7.1f} ms over {len(kept)} steps "
              f"(p90 {sorted(kept)[int(0.9 * (len(kept) - 1))] * 1000:.1f} ms; side took {time.time() - t0:.0f} s)")
    print(f"# {datetime.date.today()} {os.cpu_count()} cores")
    if "run" in medians:
        for side in ("direct", "api"):
            if side in medians:
                print(f"{side} / run: {medians[side] / medians['run']:.2f}x")
    if "api" in medians and "direct" in medians:
        print(f"api - direct: {(medians['api'] - medians['direct']) * 1000:+.1f} ms a step")


if __name__ == "__main__":
    main()
