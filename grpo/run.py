"""`python -m grpo.run --config cfg.yaml [key=value ...]`: one GRPO run on Ray.

Usable directly, as a `ray job submit -- python -m grpo.run ...` entrypoint, and by the job API
(which passes `--job-id` and a reporter). The driver validates everything first (config, task,
reward function) and only then starts actors: rollout actors, a reward ActorPool, the weight board
and the run monitor, then a Ray Train `TorchTrainer` running grpo.trainer.train_loop. While
training, the driver polls the monitor: progress in the log, metrics/trajectories to the
reporters, and stop requests (SIGTERM from `ray job stop`, a reporter's cancel, the budget).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from grpo.config import ConfigError, GRPOConfig, load_config
from grpo.report import LocalReporter, RayMetricsReporter, Reporter, RunMonitor, notify_resume

log = logging.getLogger("grpo.run")


@dataclass
class RunResult:
    status: str  # completed | cancelled | paused | budget_exceeded | failed
    steps: int
    error: str | None = None
    checkpoint: str | None = None
    best_checkpoints: list[str] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)
    cost_usd: float = 0.0


def preflight(cfg: GRPOConfig) -> None:
    """Everything that can be checked before an actor starts: the task/dataset and the reward."""
    from grpo.rewards import RewardError, resolve

    try:
        dataset = cfg.load_dataset()
    except (ValueError, OSError) as e:
        raise ConfigError(f"task: {e}") from None
    try:
        resolve(cfg.reward or dataset.reward)
    except RewardError as e:
        raise ConfigError(f"reward: {e}") from None
    if cfg.environment is not None:
        from grpo.agents.episodes import AgentSettings

        try:
            AgentSettings.from_config(cfg).make_env()
        except Exception as e:  # a user environment that cannot be built: fail before any actor
            raise ConfigError(f"environment: {type(e).__name__}: {e}") from None
        if cfg.sft_warmup_steps:
            from grpo.agents.environments import environment_class

            try:
                environment_class(cfg.environment).demonstration(dataset.train[0])
            except Exception as e:
                raise ConfigError(f"sft_warmup_steps: {type(e).__name__}: {e}") from None


def required_cpus(cfg: GRPOConfig) -> float:
    return (cfg.num_policy_workers + cfg.num_rollout_workers) * cfg.cpus_per_worker + (
        cfg.num_reward_workers * cfg.cpus_per_reward_worker
    )


def cost_usd(cfg: GRPOConfig, seconds: float) -> float:
    """Compute cost of the run so far: reserved CPUs and GPUs times their hourly price."""
    gpus = (cfg.num_policy_workers + cfg.num_rollout_workers) * cfg.gpus_per_worker
    return seconds / 3600.0 * (required_cpus(cfg) * cfg.cpu_hour_usd + gpus * cfg.gpu_hour_usd)


def build_actors(cfg: GRPOConfig) -> dict[str, Any]:
    """Rollout actors, reward actors, weight board and monitor. Rollout and reward actors restart
    when killed and their in-flight calls are retried, so a lost actor costs time, not the run."""
    import ray

    from grpo.rewards import RewardWorker
    from grpo.rollout import RolloutWorker, WeightBoard

    reward_spec = cfg.reward or cfg.load_dataset().reward
    board = ray.remote(num_cpus=0)(WeightBoard).remote()
    monitor = ray.remote(num_cpus=0)(RunMonitor).remote()
    rollout_cls = ray.remote(
        num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, max_restarts=-1, max_task_retries=-1
    )(RolloutWorker)
    reward_cls = ray.remote(num_cpus=cfg.cpus_per_reward_worker, max_restarts=-1, max_task_retries=-1)(RewardWorker)
    rollout_actors = [
        rollout_cls.remote(cfg.model, cfg.tokenizer, dtype=cfg.dtype, torch_threads=cfg.torch_threads,
                           max_prompt_tokens=cfg.max_prompt_tokens, weight_board=board)
        for _ in range(cfg.num_rollout_workers)
    ]
    reward_actors = [reward_cls.remote(reward_spec, cfg.reward_timeout_s) for _ in range(cfg.num_reward_workers)]
    # Surface constructor errors (bad model files, unimportable reward) now, not mid-step.
    ray.get([a.ping.remote() for a in rollout_actors] + [a.score.remote([]) for a in reward_actors])
    return {"rollout_actors": rollout_actors, "reward_actors": reward_actors, "weight_board": board, "monitor": monitor}


def load_reporter(spec: str, cfg: GRPOConfig, job_id: str | None) -> Reporter:
    """`package.module:Factory`, called as Factory(cfg=cfg, job_id=job_id)."""
    mod, _, name = spec.partition(":")
    if not name:
        raise ConfigError(f"reporter: expected 'module:factory', got {spec!r}")
    return getattr(importlib.import_module(mod), name)(cfg=cfg, job_id=job_id)


class _Progress:
    """A tqdm bar on a terminal; a plain line every few steps in a job log (no carriage returns)."""

    def __init__(self, total: int, initial: int):
        self.total, self.tty = total, sys.stdout.isatty()
        self.every = max(1, total // 50)
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="grpo", unit="step", dynamic_ncols=True)

    def update(self, m: dict[str, float], cost: float) -> None:
        text = {"reward": f"{m['reward_mean']:.3f}", "tok/s": f"{m['tokens_per_s']:.0f}", "cost": f"${cost:.4f}"}
        if m.get("eval_reward") is not None and not math.isnan(m["eval_reward"]):
            text["eval"] = f"{m['eval_reward']:.3f}"
        if self.bar is not None:
            self.bar.n = int(m["step"])
            self.bar.set_postfix(text, refresh=True)
        elif int(m["step"]) % self.every == 0 or int(m["step"]) == self.total:
            print(f"step {int(m['step'])}/{self.total} " + " ".join(f"{k} {v}" for k, v in text.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(cfg: GRPOConfig, *, reporters: list[Reporter] | None = None, job_id: str | None = None,
        poll_s: float = 0.5, handles: dict[str, Any] | None = None) -> RunResult:
    """Run (or resume) one GRPO run to its end on the Ray cluster `ray.init` finds or starts.

    `handles` (from `build_actors`) lets a caller keep the actors after the run, e.g. to inspect
    the rollout actors' weights; actors built here are shut down at the end.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from grpo.trainer import train_loop

    preflight(cfg)
    # ray.train.report waits for the Train controller's health-check poll; 2 s by default is longer
    # than a small step, so checkpoints would stall the run. Set before Ray starts its processes.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:  # a local cluster: declare enough logical CPUs for the actors this run asks for
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(required_cpus(cfg))))
    reporters = [LocalReporter(cfg.run_dir), RayMetricsReporter(job_id), *(reporters or [])]
    for r in reporters:
        r.on_start(cfg, job_id=job_id)

    owned = handles is None
    handles = handles or build_actors(cfg)
    monitor = handles["monitor"]
    evaluating = cfg.eval_size > 0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(), **handles},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_policy_workers, use_gpu=cfg.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})},
        ),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=str(cfg.run_dir.parent),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="eval_reward" if evaluating else None,
                checkpoint_score_order="max",
            ),
            # A policy worker that dies restarts the worker group from the latest checkpoint.
            failure_config=FailureConfig(max_failures=3),
        ),
    )

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as e:  # reported as the run's failure below, with its message
            outcome["error"] = e

    stop_reason: dict[str, str] = {}

    def request_stop(reason: str) -> None:
        if reason not in stop_reason.values():
            stop_reason.setdefault("reason", reason)
            monitor.request_stop.remote(reason)

    def on_sigterm(signum: int, frame: Any) -> None:  # `ray job stop` and Ctrl-C: checkpoint, then exit
        request_stop("cancelled")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGINT, on_sigterm)

    t0 = time.time()
    worker = threading.Thread(target=fit, name="trainer-fit", daemon=True)
    worker.start()
    progress: _Progress | None = None
    last: dict[str, float] = {}
    warned: set[int] = set()
    while True:
        alive = worker.is_alive()
        resumed_at, metrics, rows = ray.get(monitor.drain.remote())
        if resumed_at is not None:  # a (re)start: the steps after it are re-run, stored again once
            notify_resume(reporters, resumed_at)
        for r in reporters:
            if rows:
                r.on_trajectories(rows)
        cost = cost_usd(cfg, time.time() - t0)
        for m in metrics:
            m["cost_usd"] = cost
            if progress is None:
                progress = _Progress(cfg.num_steps, int(m["step"]) - 1)
            progress.update(m, cost)
            for r in reporters:
                r.on_step(m)
            last = m
        if cfg.max_budget_usd:
            used = cost / cfg.max_budget_usd
            for pct in (75, 90):
                if used * 100 >= pct and pct not in warned:
                    warned.add(pct)
                    log.warning("run has used %d%% of its budget ($%.4f of $%.2f)", pct, cost, cfg.max_budget_usd)
            if used >= 1.0:
                request_stop("budget_exceeded")
        for r in reporters:
            reason = r.should_stop()
            if reason:
                request_stop(reason)
        if not alive:
            break
        worker.join(timeout=poll_s)
    if progress is not None:
        progress.close()

    result = outcome.get("result")
    error = outcome.get("error") or (result.error if result is not None else None)
    summary = RunResult(status="failed" if error else stop_reason.get("reason", "completed"),
                        steps=int(last.get("step", 0)), last_metrics=last, cost_usd=cost_usd(cfg, time.time() - t0))
    if error is not None:
        summary.error = f"{type(error).__name__}: {error}"
    if result is not None and result.checkpoint is not None:
        summary.checkpoint = result.checkpoint.path
        summary.best_checkpoints = [c.path for c, _ in (result.best_checkpoints or [])]
    for r in reporters:
        r.on_end(summary.status, error=summary.error, summary={
            "steps": summary.steps, "checkpoint": summary.checkpoint, "best_checkpoints": summary.best_checkpoints,
            "cost_usd": summary.cost_usd, "last_metrics": summary.last_metrics,
        })
    if owned:
        for h in handles["rollout_actors"] + handles["reward_actors"] + [handles["weight_board"], monitor]:
            ray.kill(h)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--job-id", help="job id of the job API that launched this run")
    parser.add_argument("--reporter", help="extra reporter, 'package.module:factory'")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    if os.environ.get("RAYGRPO_LOG_FORMAT") in ("json", "text"):  # a run of the job API: its log format
        from grpo.logs import configure, job_id

        configure(os.environ["RAYGRPO_LOG_FORMAT"])
        job_id.set(args.job_id)
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        reporters = [load_reporter(args.reporter, cfg, args.job_id)] if args.reporter else []
        preflight(cfg)
    except (ConfigError, ImportError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(cfg, reporters=reporters, job_id=args.job_id)
    print(f"run {cfg.run_name}: {result.status} after {result.steps} steps; output in {cfg.run_dir}"
          + (f"; error: {result.error}" if result.error else ""), flush=True)
    return 0 if result.status in ("completed", "cancelled", "paused", "budget_exceeded") else 1


if __name__ == "__main__":
    sys.exit(main())
