"""How a run tells the world what it is doing: the reporter hook and the run monitor.

`Reporter` is the small interface `grpo.run` accepts: the job API passes a DB-backed one (issue
of the job API), the engine always adds `LocalReporter` (metrics.jsonl, trajectories.jsonl and a
reward/loss plot in the run folder). Reporters run in the driver process, never in a worker.

`RunMonitor` is the Ray actor between the policy workers and the driver: rank 0 posts each step's
metrics and trajectories and gets back a stop reason (cancel, budget) decided by the driver.

Exactly once: a run that restarts (its worker group after a crash, or the whole driver) re-runs the
steps after its last checkpoint. Rank 0 says where it resumed (`RunMonitor.resumed`) before it posts
anything of the new attempt, and every reporter's `on_resume(step)` drops what it stored for later
steps, so each step's metrics and trajectories end up stored once: the new attempt's.

No step lost at a checkpoint: a checkpoint of step k counts only once step k's records are durable.
Every post to the mailbox is numbered; the driver acknowledges (`stored`) the posts it has handed to the
reporters, and only after they returned; rank 0 waits (`wait_stored`) for everything posted so far (its
step's metrics and every rank's trajectories) before any rank writes the checkpoint. So a resume never
starts after a step whose records died in the mailbox with the driver.
"""

from __future__ import annotations

import importlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from grpo import storage
from grpo.config import GRPOConfig


class Reporter(Protocol):
    """Everything is optional to act on; every method must return quickly (it runs in the poll loop)."""

    def on_start(self, cfg: GRPOConfig, *, job_id: str | None) -> None: ...

    def on_step(self, metrics: dict[str, float]) -> None: ...

    def on_trajectories(self, rows: list[dict[str, Any]]) -> None: ...

    def should_stop(self) -> str | None:
        """A reason to stop now ("cancelled", ...) or None."""
        ...

    def on_end(self, status: str, *, error: str | None, summary: dict[str, Any]) -> None: ...

    # Optional (a reporter without it keeps what it stored): `on_resume(step)`, called when the run
    # (re)starts after `step`; what was stored for later steps belongs to an attempt that was lost.


def notify_waiting(reporters: list[Any], reason: str | None) -> None:
    """Optional `on_waiting(reason)`: the run waits for resources and holds none (None: it has them now)."""
    for r in reporters:
        if hasattr(r, "on_waiting"):
            r.on_waiting(reason)


def notify_placed(reporters: list[Any], rank_nodes: list[str]) -> None:
    """Optional `on_placed(rank_nodes)`: the Ray node of each policy rank, at the first step of each attempt."""
    for r in reporters:
        if hasattr(r, "on_placed"):
            r.on_placed(rank_nodes)


def notify_resume(reporters: list[Any], step: int) -> None:
    for r in reporters:
        if hasattr(r, "on_resume"):
            r.on_resume(step)


class RunMonitor:
    """Mailbox between rank 0 and the driver (a Ray actor with num_cpus=0; async, so waits cost nothing)."""

    def __init__(self, target_reward: float | None = None, target_window: int = 1) -> None:
        import asyncio

        self.target_reward, self.target_window = target_reward, target_window
        self.rewards: dict[int, float] = {}
        """reward_mean by step, for the target: decided here, so the run stops at the step that reached it
        (the driver learns of a step only after the next one has begun)"""
        self.metrics: list[dict[str, float]] = []
        self.rows: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.resumed_at: int | None = None
        self.posted = 0
        """posts so far (each record and each batch of trajectories)"""
        self.acked = 0
        """the posts the driver has stored through its reporters (the highest `drain` number it acknowledged)"""
        self._changed = asyncio.Condition()
        self.nodes: dict[int, str] = {}
        """the Ray node id of each policy rank (the latest attempt's)"""

    def rank_node(self, rank: int, node_id: str) -> None:
        self.nodes[rank] = node_id

    def rank_nodes(self) -> list[str]:
        return [self.nodes[r] for r in sorted(self.nodes)]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def resumed(self, step: int) -> None:
        """The policy workers (re)started after `step`; what the mailbox holds for later steps came from
        the attempt that was lost, and the driver tells the reporters to drop what they stored of it."""
        self.metrics = [m for m in self.metrics if m["step"] <= step]
        self.rows = [r for r in self.rows if r["step"] <= step]
        self.rewards = {s: r for s, r in self.rewards.items() if s <= step}
        self.resumed_at = step if self.resumed_at is None else min(self.resumed_at, step)
        await self._notify()

    async def record(self, step: int, metrics: dict[str, float], rows: list[dict[str, Any]]) -> str | None:
        """Rank 0's step: its metrics and trajectories; returns why the run stops after it (None: go on)."""
        self.metrics.append(dict(metrics, step=step))
        self.rows += rows
        self.posted += 1
        self.rewards[step] = float(metrics.get("reward_mean", 0.0))
        if self.target_reward is not None:
            window = [self.rewards.get(s) for s in range(step - self.target_window + 1, step + 1)]
            if None not in window and sum(window) / len(window) >= self.target_reward:
                self.stop_reason = self.stop_reason or "completed"  # the target: stop at this very step
        await self._notify()
        return self.stop_reason

    async def add_trajectories(self, rows: list[dict[str, Any]]) -> None:
        self.rows += rows
        self.posted += 1
        await self._notify()

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def drain(self) -> tuple[int, int | None, list[dict[str, float]], list[dict[str, Any]]]:
        """(the number of posts handed out so far, the step a restart resumed after or None, metrics, trajectory
        rows), all in arrival order: the resume comes first, so the reporters drop the lost attempt's rows
        before storing the new ones. The driver acknowledges the number once its reporters stored them."""
        out = (self.posted, self.resumed_at, self.metrics, self.rows)
        self.resumed_at, self.metrics, self.rows = None, [], []
        return out

    async def stored(self, through: int) -> None:
        """The driver's reporters stored every post up to number `through` (a `drain`'s first value)."""
        self.acked = max(self.acked, through)
        await self._notify()

    async def wait_stored(self) -> int:
        """Returns once everything posted before this call is stored (rank 0, before a checkpoint)."""
        target = self.posted
        async with self._changed:
            await self._changed.wait_for(lambda: self.acked >= target)
        return target

    async def wait_posted(self, seen: int, timeout_s: float) -> int:
        """Returns the number of posts once it is above `seen` (or after `timeout_s`): the driver drains as
        soon as there is something, instead of on a fixed poll."""
        import asyncio

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.posted > seen or self.resumed_at is not None),
                                       timeout_s)
        except TimeoutError:
            pass
        return self.posted


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class LocalReporter:
    """Writes the run folder: metrics.jsonl (appended, so a resumed run continues the curve),
    trajectories.jsonl, and curves.png at the end. A resume cuts both files back to the steps the
    checkpoint holds, so a re-run step appears once.

    With the run's storage at a URL (`storage_url`), `run_dir` is this machine's copy: it starts from what
    the bucket holds (a run resumed by another driver continues its files), and the files are uploaded
    whole on every checkpoint step (before that checkpoint is written: rank 0 waits for this reporter),
    at most every `sync_s` seconds between them, on a resume and at the end."""

    def __init__(self, run_dir: Path, *, storage_url: str | None = None, checkpoint_interval: int = 0,
                 sync_s: float = 10.0):
        self.run_dir, self.storage_url = run_dir, storage_url
        self.checkpoint_interval, self.sync_s = checkpoint_interval, sync_s
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.traj_path = run_dir / "trajectories.jsonl"
        self.synced_at = time.monotonic()
        self.plot_imported = False
        if storage_url is not None:
            for path in (self.metrics_path, self.traj_path):
                remote = storage.join(storage_url, path.name)
                path.unlink(missing_ok=True)
                if storage.is_file(remote):
                    storage.download(remote, path)

    def sync(self) -> None:
        """The driver's files to the bucket (nothing to do for a local run folder)."""
        if self.storage_url is None:
            return
        for name in ("config.json", "metrics.jsonl", "trajectories.jsonl", "summary.json", "curves.png"):
            if (self.run_dir / name).is_file():
                storage.upload(self.run_dir / name, storage.join(self.storage_url, name))
        self.synced_at = time.monotonic()

    def on_start(self, cfg: GRPOConfig, *, job_id: str | None) -> None:
        (self.run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
        self.sync()

    def on_step(self, metrics: dict[str, float]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in metrics.items()}) + "\n")
        if not self.plot_imported:  # while the run trains, not after its last step (0.3 s of the end)
            self.plot_imported = True
            threading.Thread(target=importlib.import_module, args=("matplotlib.figure",), daemon=True,
                             name="import-matplotlib").start()
        step = int(metrics.get("step", 0))
        if (self.checkpoint_interval and step % self.checkpoint_interval == 0) or \
                time.monotonic() - self.synced_at > self.sync_s:
            self.sync()

    def on_trajectories(self, rows: list[dict[str, Any]]) -> None:
        with self.traj_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def on_resume(self, step: int) -> None:
        for path in (self.metrics_path, self.traj_path):
            if not path.exists():
                continue
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and int(json.loads(line)["step"]) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)  # atomic: a crash here leaves the old file or the new one
        self.sync()

    def should_stop(self) -> str | None:
        return None

    def on_end(self, status: str, *, error: str | None, summary: dict[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps({"status": status, "error": error, **summary}, indent=2,
                                                               default=str))
        if self.metrics_path.exists():
            plot_curves(read_metrics(self.metrics_path), self.run_dir / "curves.png")
        self.sync()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metric rows of a run; a resumed run's later rows win over replayed steps."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[int(row["step"])] = row
    return [by_step[k] for k in sorted(by_step)]


def plot_curves(rows: list[dict[str, Any]], out: Path) -> Path:
    """Reward (train and eval), loss and KL against step, one PNG. Matplotlib's object API with the Agg
    canvas: no pyplot (its import and global state cost the end of every run 0.1 s more)."""
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot(steps, [r.get("reward_mean") for r in rows], label="train reward")
    ev = [(r["step"], r["eval_reward"]) for r in rows if r.get("eval_reward") is not None]
    if ev:
        axes[0].plot(*zip(*ev, strict=True), "o-", label="eval reward")
    axes[0].set_title("reward")
    axes[0].legend()
    axes[1].plot(steps, [r.get("loss") for r in rows], color="tab:red")
    axes[1].set_title("loss")
    axes[2].plot(steps, [r.get("kl") for r in rows], color="tab:green")
    axes[2].set_title("KL to reference")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


# step metric -> (ray.util.metrics name, description); Prometheus sees them as ray_<name>{job_id=...}
RAY_GAUGES: dict[str, tuple[str, str]] = {
    "reward_mean": ("raygrpo_train_reward_mean", "mean reward of the step's completions"),
    "reward_std": ("raygrpo_train_reward_std", "reward standard deviation of the step"),
    "loss": ("raygrpo_train_loss", "policy loss"),
    "kl": ("raygrpo_train_kl", "KL to the reference policy"),
    "entropy": ("raygrpo_train_entropy", "mean token entropy"),
    "clip_frac": ("raygrpo_train_clip_fraction", "fraction of tokens whose ratio was clipped"),
    "tokens_per_s": ("raygrpo_train_tokens_per_second", "completion tokens per second of wall time"),
    "step_time_s": ("raygrpo_train_step_seconds", "wall time of the step"),
    "publish_time_s": ("raygrpo_train_weight_sync_seconds", "time to publish the new weights to rollout actors"),
    "rollout_time_s": ("raygrpo_train_rollout_seconds", "time waiting for rollouts and rewards"),
    "train_time_s": ("raygrpo_train_update_seconds", "time of the policy update"),
    "step": ("raygrpo_train_iteration", "the last finished step"),
    "eval_reward": ("raygrpo_train_eval_reward", "reward on the evaluation set"),
}
RAY_COUNTERS: dict[str, tuple[str, str]] = {
    "reward_errors": ("raygrpo_train_reward_failures_total", "completions whose reward function failed"),
    "reward_timeouts": ("raygrpo_train_reward_timeouts_total", "completions whose reward function timed out"),
}


class RayMetricsReporter:
    """Exports each step's metrics through `ray.util.metrics`, tagged with the job id, so they show in
    the Ray dashboard and in Prometheus (scraping Ray's metrics port) next to Ray's own."""

    def __init__(self, job_id: str | None):
        from ray.util import metrics

        self.tags = {"job_id": job_id or "local"}
        self.gauges = {key: metrics.Gauge(name, description=desc, tag_keys=("job_id",))
                       for key, (name, desc) in RAY_GAUGES.items()}
        self.counters = {key: metrics.Counter(name, description=desc, tag_keys=("job_id",))
                         for key, (name, desc) in RAY_COUNTERS.items()}
        self.trajectories = metrics.Counter("raygrpo_train_trajectories_total", description="trajectories sampled",
                                            tag_keys=("job_id",))
        self.checkpoints = metrics.Counter("raygrpo_train_checkpoints_total", description="checkpoints saved",
                                           tag_keys=("job_id",))

    def on_start(self, cfg: GRPOConfig, *, job_id: str | None) -> None:
        self.checkpoint_interval = cfg.checkpoint_interval

    def on_step(self, metrics: dict[str, float]) -> None:
        for key, gauge in self.gauges.items():
            value = metrics.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)
        for key, counter in self.counters.items():
            value = metrics.get(key)
            if isinstance(value, int | float) and value > 0:
                counter.inc(float(value), tags=self.tags)
        step = int(metrics.get("step", 0))
        if getattr(self, "checkpoint_interval", 0) and step and step % self.checkpoint_interval == 0:
            self.checkpoints.inc(1.0, tags=self.tags)  # the trainer checkpoints on these steps

    def on_trajectories(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.trajectories.inc(float(len(rows)), tags=self.tags)

    def should_stop(self) -> str | None:
        return None

    def on_end(self, status: str, *, error: str | None, summary: dict[str, Any]) -> None:
        pass
