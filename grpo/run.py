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
import collections
import importlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo import storage
from grpo.config import ConfigError, GRPOConfig, load_config
from grpo.gang import Booking
from grpo.report import (
    LocalReporter,
    RayMetricsReporter,
    Reporter,
    RunMonitor,
    notify_placed,
    notify_resume,
    notify_waiting,
)

log = logging.getLogger("grpo.run")


@dataclass
class RunResult:
    status: str  # completed | cancelled | paused | budget_exceeded | failed
    steps: int
    error: str | None = None
    checkpoint: str | None = None
    best_checkpoints: list[str] = field(default_factory=list)
    """the kept checkpoints, best first (highest eval_reward, then the later step); newest first unscored"""
    checkpoint_scores: dict[str, float] = field(default_factory=dict)
    """eval_reward of each kept checkpoint that was evaluated"""
    last_metrics: dict[str, float] = field(default_factory=dict)
    cost_usd: float = 0.0
    rank_nodes: list[str] = field(default_factory=list)
    """the Ray node id of each policy rank, rank 0 first (where the last attempt ran)"""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "adapter_model.safetensors")


def check_model(field: str, path: str, *, tokenizer: bool = False, deep: bool = False) -> None:
    """A local model (or tokenizer) directory that `from_pretrained` will load: its config.json is a JSON
    object naming a `model_type` and its weights (tokenizer files) are there. `deep` also has transformers
    parse the config (an unknown architecture): the job API does, once per job; a run's own process does not,
    since importing transformers there costs its start 2-3 s of CPU and every worker that loads the model
    says the same at once. Hub ids are left to the workers, which download them; a URL is checked by its
    listing (nothing is downloaded to the driver)."""
    if storage.is_url(path):
        try:
            names = set(storage.listdir(path))
        except OSError as e:
            raise ConfigError(f"{field}: {path}: cannot list it ({e})") from None
        wanted = ("tokenizer.json", "tokenizer_config.json", "vocab.json") if tokenizer else WEIGHT_FILES
        if not names:
            raise ConfigError(f"{field}: no such folder: {path}")
        if not names & set(wanted) or (not tokenizer and "config.json" not in names):
            raise ConfigError(f"{field}: {path} holds no {'tokenizer files' if tokenizer else 'config.json and weights'}")
        return
    local = Path(path)
    if not local.is_dir():
        return
    if tokenizer:
        if not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise ConfigError(f"{field}: {path} has no tokenizer files (tokenizer.json or tokenizer_config.json)")
        return
    try:
        config = json.loads((local / "config.json").read_text())
        if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
            raise ValueError("config.json names no model_type")
        if deep:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, JSON errors: all say the directory is not a model
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{field}: {path} is not a loadable model: {first}") from None
    if not any((local / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"{field}: {path} has a config but no weights ({', '.join(WEIGHT_FILES[:3])}, ...)")


def preflight(cfg: GRPOConfig, *, probe_source: Callable[[str, float], None] | None = None,
              deep: bool = False) -> None:
    """Everything that can be checked before an actor starts: the model files, the task/dataset and the
    reward. A reward given as source is probed in the sandbox by `probe_source(source, timeout_s)`: here by
    default; the job API runs it as a Ray task instead, so no user code runs below its own process. `deep`:
    transformers parses the model's config too (`check_model`)."""
    from grpo.rewards import RewardError, resolve

    check_model("model", cfg.model, deep=deep)
    check_model("tokenizer", cfg.tokenizer or cfg.model, tokenizer=True)

    for name in ("dataset", "eval_dataset"):
        if (value := getattr(cfg, name)) is not None and storage.is_url(value) and not storage.is_file(value):
            raise ConfigError(f"{name}: no such file: {value}")
    try:
        dataset = cfg.load_dataset()
    except (ValueError, OSError) as e:
        raise ConfigError(f"task: {e}") from None
    # User code (a reward given as source, the `code` reward over completions, the `python` tool) runs only
    # in the bubblewrap sandbox: where it cannot start, the run is refused here, saying why.
    uses_sandbox = {"reward_source": bool(cfg.reward_source),
                    "reward": not cfg.reward_source and (cfg.reward or dataset.reward) == "code",
                    "environment": cfg.environment == "python"}
    if any(uses_sandbox.values()):
        from grpo.sandbox import status

        sandbox = status()
        if not sandbox.available:
            field = next(k for k, v in uses_sandbox.items() if v)
            raise ConfigError(f"{field}: refused: this runs user code, and {sandbox.reason}")
    try:
        if cfg.reward_source:
            from grpo.rewards import probe_reward_source

            (probe_source or probe_reward_source)(cfg.reward_source, cfg.reward_timeout_s)
        else:
            resolve(cfg.reward or dataset.reward)
    except RewardError as e:
        raise ConfigError(str(e) if cfg.reward_source else f"reward: {e}") from None
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


def required_gpus(cfg: GRPOConfig) -> float:
    return (cfg.num_policy_workers + cfg.num_rollout_workers) * cfg.gpus_per_worker


def cluster_capacity() -> tuple[dict[str, float], dict[str, float]]:
    """(the most CPU and GPU the cluster can ever hold, the autoscaler's maximum as known): the larger of what
    it has and what its autoscaler publishes (Ray's cluster config in the GCS, where it is there), and
    RAYGRPO_CLUSTER_CAPACITY (JSON, e.g. {"CPU": 96}) wins for what it names. The second is empty when no
    maximum is known beyond the nodes there are."""
    import json

    import ray

    now = ray.cluster_resources()
    capacity = {k: float(now.get(k, 0.0)) for k in ("CPU", "GPU")}
    try:
        from ray._private.state import state

        published = {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()
                     if k in capacity}
    except Exception:  # a private API of Ray: without it, count the cluster as it is now
        published = {}
    for k in capacity:
        capacity[k] = max(capacity[k], published.get(k, 0.0))
    try:
        declared = {k: float(v) for k, v in json.loads(os.environ.get("RAYGRPO_CLUSTER_CAPACITY") or "{}").items()
                    if k in capacity}
    except (ValueError, AttributeError, TypeError):
        declared = {}
    capacity.update(declared)
    return capacity, {**published, **declared}


def check_fits_cluster(cfg: GRPOConfig) -> None:
    """ConfigError, naming what is missing, for a run the cluster this driver joined can never hold: its
    total, or one worker on the largest node. The autoscaler's maximum counts where Ray publishes it
    (autoscaler v2, KubeRay), and RAYGRPO_CLUSTER_CAPACITY (JSON, e.g. {"CPU": 96}) overrides. Without
    this a `ray job submit` of a run bigger than the cluster waited for resources forever."""
    import ray

    capacity, published = cluster_capacity()
    demand = {"CPU": required_cpus(cfg), "GPU": required_gpus(cfg)}
    short = [f"{need:g} {k} (the cluster has at most {capacity[k]:g})" for k, need in demand.items()
             if need > capacity[k] + 1e-9]
    if not published:  # no autoscaler to add a bigger node: one worker must fit on a node there is
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        biggest = {k: max((float(n.get(k, 0.0)) for n in nodes), default=0.0) for k in ("CPU", "GPU")}
        for k, per_worker in (("CPU", cfg.cpus_per_worker), ("GPU", cfg.gpus_per_worker)):
            if per_worker > biggest[k] + 1e-9 and k not in {s.split()[1] for s in short}:
                short.append(f"{per_worker:g} {k} on one node for one worker (the largest node has {biggest[k]:g})")
    if cfg.placement_strategy == "STRICT_SPREAD" and not published:
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        if cfg.num_policy_workers > alive:
            short.append(f"{cfg.num_policy_workers} nodes for placement_strategy STRICT_SPREAD (the cluster has "
                         f"{alive}; SPREAD places where it can)")
    if short:
        raise ConfigError("the cluster cannot hold this run: it needs " + " and ".join(short) + "; lower "
                          "num_policy_workers, num_rollout_workers, num_reward_workers or the per-worker "
                          "resources, or add nodes")


def nodes_needed(demand: dict[str, float]) -> str | None:
    """Why a booked run still waits on its placement groups, or None when what is free holds it: the cluster
    lacks the nodes (an autoscaler adds them, up to the maximum it publishes), or other work holds them."""
    import ray

    free = ray.available_resources()
    short = {k: v for k, v in demand.items() if v and free.get(k, 0.0) + 1e-9 < v}
    if not short:
        return None
    needs = ", ".join(f"{v:g} {k} (free {free.get(k, 0.0):g})" for k, v in sorted(short.items()))
    now = ray.cluster_resources()
    capacity, published = cluster_capacity()
    if all(capacity.get(k, 0.0) + 1e-9 >= v for k, v in short.items()) and \
            any(published.get(k, 0.0) > float(now.get(k, 0.0)) + 1e-9 for k in short):
        most = ", ".join(f"{capacity.get(k, 0.0):g} {k}" for k in sorted(short))
        return f"waiting for nodes: needs {needs}; the autoscaler adds them (the cluster may grow to {most})"
    return f"waiting for resources held by other work: needs {needs}"


def check_memory_plan(cfg: GRPOConfig, resources: dict[str, float] | None = None) -> GRPOConfig:
    """The memory plan (grpo.memplan) before any actor starts: `strategy: auto` resolved to ddp or fsdp, and a
    run whose policy workers or rollout actors would not fit one device refused, with the number and the knob
    to turn. Device memory: `device_memory_gib`, else (GPU runs) the GPU model Ray reports in `resources`.
    A model without a local config.json (a Hub id the workers download) is not planned: auto means ddp."""
    from grpo import memplan

    try:
        dims = memplan.ModelDims.from_config(storage.local_copy(storage.join(cfg.model, "config.json"))
                                             if storage.is_url(cfg.model) else cfg.model)
    except (ValueError, OSError):
        dims = None
    if dims is None:
        return cfg if cfg.strategy != "auto" else cfg.model_copy(update={"strategy": "ddp"})
    device = "gpu" if cfg.gpus_per_worker > 0 else "cpu"
    memory = cfg.device_memory_gib
    if memory is None and device == "gpu" and resources:
        memory = memplan.device_memory_from_cluster(resources)
    p = memplan.plan(cfg, dims, device_memory_gib=memory, device=device)
    if p.fits is False:
        raise ConfigError(f"memory: {p.message()} (`raygrpo plan` shows the whole plan)")
    if cfg.strategy == "auto":
        log.info("strategy auto: %s (a policy worker's planned peak %.1f GiB)", p.strategy, p.policy_peak_gib)
    return cfg.model_copy(update={"strategy": p.strategy})


def cost_usd(cfg: GRPOConfig, seconds: float) -> float:
    """Compute cost of the run so far: reserved CPUs and GPUs times their hourly price."""
    gpus = (cfg.num_policy_workers + cfg.num_rollout_workers) * cfg.gpus_per_worker
    return seconds / 3600.0 * (required_cpus(cfg) * cfg.cpu_hour_usd + gpus * cfg.gpu_hour_usd)


def actor_bundles(cfg: GRPOConfig) -> list[dict[str, float]]:
    """The placement group bundles of a run's actors: one per rollout actor, then one per reward actor
    (none for actors that need no resources: Ray refuses an empty bundle)."""
    rollout = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    bundles = [rollout] * cfg.num_rollout_workers if any(rollout.values()) else []
    if cfg.cpus_per_reward_worker:
        bundles += [{"CPU": cfg.cpus_per_reward_worker, **cfg.reward_worker_resources}] * cfg.num_reward_workers
    return bundles


def build_actors(cfg: GRPOConfig, *, wait: bool = True, placement_group: Any = None) -> dict[str, Any]:
    """Rollout actors, reward actors, weight board and monitor. Rollout and reward actors restart
    when killed and their in-flight calls are retried, so a lost actor costs time, not the run.
    With wait=False the handles come back at once and `handles["ready"]` holds the calls that finish when
    every actor is up (constructor errors surface there). With a `placement_group` (bundles as
    `actor_bundles` lists them) each actor takes its own bundle, so the actors start all or none."""
    import ray
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    from grpo.board import WeightBoard
    from grpo.rewards import RewardWorker
    from grpo.rollout import RolloutWorker

    reward_spec = cfg.reward or cfg.load_dataset().reward
    # The board and the monitor hold the run's state and are not restarted: they live on the driver's node,
    # whose loss ends the run anyway, never on a worker node that may go (the head holds one published copy
    # of the weights in its object store: docs/deploy.md sizes it).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ray.remote(num_cpus=0)(WeightBoard).options(scheduling_strategy=here).remote()
    monitor = ray.remote(num_cpus=0)(RunMonitor).options(scheduling_strategy=here).remote(cfg.target_reward,
                                                                                         cfg.target_window)
    rollout_cls = ray.remote(
        num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, max_restarts=-1, max_task_retries=-1
    )(RolloutWorker)
    reward_cls = ray.remote(num_cpus=cfg.cpus_per_reward_worker, resources=dict(cfg.reward_worker_resources) or None,
                            max_restarts=-1, max_task_retries=-1)(RewardWorker)
    bundle = iter(range(len(actor_bundles(cfg)))) if placement_group is not None else None

    def placed(cls: Any, needs: bool) -> Any:
        if bundle is None or not needs:
            return cls
        return cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=next(bundle)))

    rollout_needs = bool(cfg.cpus_per_worker or cfg.gpus_per_worker)
    rollout_actors = [
        placed(rollout_cls, rollout_needs).remote(cfg.model, cfg.tokenizer, dtype=cfg.dtype, torch_threads=cfg.torch_threads,
                           max_prompt_tokens=cfg.max_prompt_tokens, weight_board=board, chat_template=cfg.chat_template,
                           lora=cfg.lora_config())
        for _ in range(cfg.num_rollout_workers)
    ]
    reward_actors = [placed(reward_cls, bool(cfg.cpus_per_reward_worker)).remote(reward_spec, cfg.reward_timeout_s, cfg.reward_source)
                     for _ in range(cfg.num_reward_workers)]
    # Surface constructor errors (bad model files, unimportable reward) now, not mid-step.
    ready = [a.ping.remote() for a in rollout_actors] + [a.score.remote([]) for a in reward_actors]
    if wait:
        ray.get(ready)
    handles = {"rollout_actors": rollout_actors, "reward_actors": reward_actors, "weight_board": board,
               "monitor": monitor}
    return handles if wait else {**handles, "ready": ready}


def rank_checkpoints(kept: list[tuple[Any, dict[str, Any]]]) -> tuple[list[str], dict[str, float]]:
    """Ray Train's kept (checkpoint, metrics) pairs -> their paths best first, and each one's eval_reward.

    Ray lists them in its own order (ascending by score), so the order is made here: the highest
    eval_reward first, a tie going to the later step; checkpoints without a score after the scored ones,
    newest first."""
    scores: dict[str, float] = {}
    ranked: list[tuple[bool, float, int, str]] = []
    for checkpoint, metrics in kept:
        value = (metrics or {}).get("eval_reward")
        scored = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if scored:
            scores[storage.url_of(getattr(checkpoint, "filesystem", None), checkpoint.path)] = float(value)
        ranked.append((scored, float(value) if scored else 0.0, int((metrics or {}).get("step", 0)),
                       storage.url_of(getattr(checkpoint, "filesystem", None), checkpoint.path)))
    ranked.sort(reverse=True)
    return [path for *_, path in ranked], scores


class FaultHook:
    """A fault a test arms to hit a window on purpose, not by luck: with RAYGRPO_FAULT_HOOKS=1 in the driver's
    environment, a file `<run_dir>/FAULT` reading `after-checkpoint <step> kill|hold` makes the driver, once the
    checkpoint of that step exists and before its next drain, SIGKILL itself (`kill`) or write
    `<run_dir>/FAULT-HELD` and stop draining for good (`hold`: the test then kills the whole stack). One shot:
    the file goes when it fires, so the resumed run is not hit again. Inert without the variable."""

    def __init__(self, run_dir: Path, run_storage: str):
        self.path, self.run_storage = run_dir / "FAULT", run_storage
        self.armed = os.environ.get("RAYGRPO_FAULT_HOOKS") == "1"

    def check(self) -> None:
        if not self.armed or not self.path.is_file():
            return
        try:
            what, step, action = self.path.read_text().split()
            step = int(step)
        except ValueError:
            return
        from grpo.trainer import checkpoint_step

        latest = latest_checkpoint(self.run_storage)
        if what != "after-checkpoint" or latest is None or (checkpoint_step(latest) or -1) < step:
            return
        self.path.unlink(missing_ok=True)
        log.warning("fault hook: the checkpoint of step %d exists; %s before the next drain", step, action)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        (self.path.parent / "FAULT-HELD").write_text(str(step))
        while True:  # hold: never drain again; the test kills the stack
            time.sleep(3600)


def latest_checkpoint(run_storage: str) -> str | None:
    """The newest complete checkpoint a run's storage holds (by the step it saved), for a run that ended
    without Ray Train's result (aborted): a local path or a URL."""
    from grpo.trainer import checkpoint_step

    found = [(step, d) for name in storage.listdir(run_storage) if name.startswith("checkpoint_")
             if (step := checkpoint_step(d := storage.join(run_storage, name))) is not None]
    return max(found)[1] if found else None


def abort_training() -> int:
    """Stop this driver's Ray Train run where it is: its TrainController is SIGKILLed (Ray Train pins it to
    the driver's node), which takes its worker group with it. For a cancel that cannot wait for a step
    boundary: a worker group that never got its resources, or a step that does not end. Returns how many
    controllers were stopped."""
    import ray
    from ray.util.state import list_actors

    job = ray.get_runtime_context().get_job_id()
    found = list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE"),
                                 ("job_id", "=", job)])
    log.debug("aborting the training: %d Train controller(s) of job %s: pids %s", len(found), job,
             [a.pid for a in found])
    for actor in found:
        try:
            os.kill(actor.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # The worker group's placement group goes with its job, and Ray Train's cleaner removes it once the
    # controller is gone, but only after it was granted: one still pending would wait on and, once the
    # CPUs came free, hold them for nobody. This run creates no other placement group.
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_placement_groups

    for pg in list_placement_groups(filters=[("creator_job_id", "=", job)]):
        if pg.state != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg.placement_group_id))))
    return len(found)


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


def own_cluster_address() -> str | None:
    """The GCS address of the cluster whose Ray Job this process is the entrypoint of; None outside a Ray Job.

    Ray hands a job's entrypoint `RAY_ADDRESS` resolved from "auto", i.e. from the address file of the
    newest cluster started on the machine: with two local clusters (a test session's and a `raygrpo up`
    stack) a run could land on the other one. The job supervisor that started us is a worker process of
    the right cluster, and its command line names that cluster's GCS."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return None
    pid = os.getppid()
    while pid > 1:  # up the process tree (Linux /proc): sh -c, then the supervisor
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        for arg in args:
            if arg.startswith(b"--gcs-address="):
                return arg.split(b"=", 1)[1].decode()
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return None


def run(cfg: GRPOConfig, *, reporters: list[Reporter] | None = None, job_id: str | None = None,
        poll_s: float = 0.5, handles: dict[str, Any] | None = None, stop_grace_s: float = 10.0) -> RunResult:
    """Run (or resume) one GRPO run to its end on the Ray cluster `ray.init` finds or starts.

    `handles` (from `build_actors`) lets a caller keep the actors after the run, e.g. to inspect
    the rollout actors' weights; actors built here are shut down at the end.

    A stop (cancel, budget, SIGTERM) takes effect in every state: while the actors start, the run ends at
    once; while training, the loop checkpoints and stops at its next step boundary, and if it has not got
    there within `stop_grace_s` (a worker group still waiting for resources, a step that does not end)
    the training is aborted and the run ends with the checkpoint it last saved.

    The steps: connect and check (`_connect`), book the whole demand (`_Driver.book`), start the actors and
    the trainer together (`_start`), drive the run to its end (`_Driver.drive`), report and clean up.
    """
    cfg = _connect(cfg)
    remote = cfg.run_storage if storage.is_url(cfg.run_storage) else None
    reporters = [LocalReporter(cfg.run_dir, storage_url=remote, checkpoint_interval=cfg.checkpoint_interval),
                 RayMetricsReporter(job_id), *(reporters or [])]
    for r in reporters:
        r.on_start(cfg, job_id=job_id)
    driver = _Driver(cfg, reporters, poll_s=poll_s, stop_grace_s=stop_grace_s)
    driver.handle_signals()
    owned = handles is None
    # Gang reservation (grpo.gang): book the whole demand before asking Ray for anything; while the
    # cluster cannot hold it next to the runs starting, hold nothing and wait (a stop ends the wait).
    demand = {"CPU": required_cpus(cfg) if owned else cfg.num_policy_workers * cfg.cpus_per_worker,
              "GPU": required_gpus(cfg) if owned else cfg.num_policy_workers * cfg.gpus_per_worker}
    booking = Booking(job_id or f"{cfg.run_name}-{uuid.uuid4().hex[:8]}", demand)
    if not driver.book(booking):
        return driver.finish(RunResult(status=driver.stop_reason["reason"], steps=0, last_metrics={}, cost_usd=0.0))
    handles, ready, actor_pg = _start(cfg, booking.run) if owned else (handles, [], None)
    driver.drive(_trainer(cfg, handles), handles["monitor"], ready, booking)
    log.info("training ended %.1f s after the start", time.time() - driver.t0)
    summary = driver.result()
    summary.rank_nodes = _rank_nodes(handles["monitor"])
    driver.finish(summary)
    booking.release()
    if owned:
        _shutdown(handles, actor_pg)
    log.info("run ended %.1f s after the start", time.time() - driver.t0)
    return summary


def _connect(cfg: GRPOConfig) -> GRPOConfig:
    """Preflight, the cluster (the Ray Job's own, RAY_ADDRESS's, or a local one), then what must hold before
    anything is asked of it: the run fits the cluster, and its memory plan fits the devices (strategy auto
    resolved)."""
    import ray

    preflight(cfg)
    # ray.train.report waits for the Train controller's health-check poll; 2 s by default is longer
    # than a small step, so checkpoints would stall the run. Set before Ray starts its processes.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if not ray.is_initialized():
        if own := own_cluster_address():  # a Ray Job's driver: the cluster the job was submitted to
            ray.init(address=own)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:  # a local cluster: declare enough logical CPUs for the actors this run asks for
            # Ray Train's preemption watcher waits for a cloud's notice that a node will go: one process (and
            # a second of CPU at every start) for nothing on this machine. Read by the processes Ray starts.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(required_cpus(cfg))))
    check_fits_cluster(cfg)  # before any reporter marks the run started or any actor is asked for
    check_shared_storage(cfg)
    return stage_inputs(check_memory_plan(cfg, ray.cluster_resources()))


INPUTS = ("model", "tokenizer", "dataset", "eval_dataset")


def stage_inputs(cfg: GRPOConfig) -> GRPOConfig:
    """With the run's storage at a URL, each input given as a local path (model or tokenizer folder, dataset
    file) is uploaded under `<run>/inputs/<field>/` (file by file, skipped where a file of that size is there:
    a resumed run uploads nothing) and every worker and actor is given the URL, which each node copies once
    (grpo.storage.local_copy): no process needs a path that exists only on the driver's machine. Hub ids and
    URLs stay as they are; a big model is better named by its URL (nothing to upload)."""
    if not storage.is_url(cfg.run_storage):
        return cfg
    update: dict[str, str] = {}
    staged: dict[str, str] = {}
    for name in INPUTS:
        value = getattr(cfg, name)
        if value is None or storage.is_url(value) or not Path(value).exists():
            continue
        if value not in staged:
            local = Path(value)
            dest = storage.join(cfg.run_storage, "inputs", name, local.name)
            files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
            for f in files:
                target = dest if local.is_file() else storage.join(dest, *f.relative_to(local).parts)
                if not storage.same_file(f, target):
                    storage.upload(f, target)
            staged[value] = dest
            log.info("%s: staged %s to %s (%d files)", name, value, dest, len(files))
        update[name] = staged[value]
    return cfg.model_copy(update=update) if update else cfg


def check_shared_storage(cfg: GRPOConfig, *, probe: Callable[[str, list[str]], list[str]] | None = None) -> None:
    """A run on a cluster of several nodes with a local output_dir: every node that can hold a worker must see
    the same folder (a shared mount), or a checkpoint written on one node could not be resumed on another.
    Checked for real: a marker file written here is looked for on every such node (`probe`, a Ray task per
    node by default); a node that does not see it refuses the run, naming the fix."""
    import ray

    if storage.is_url(cfg.run_storage):
        return
    nodes = [n["NodeID"] for n in ray.nodes()
             if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]
    if len(nodes) < 2:
        return
    root = Path(cfg.run_storage).parent
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".raygrpo-shared-{uuid.uuid4().hex}"
    marker.write_text("raygrpo: is this folder shared by every node?\n")
    try:
        blind = (probe or _nodes_not_seeing)(str(marker), nodes)
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError(
            f"output_dir: {root} is a local folder that {len(blind)} of the cluster's {len(nodes)} nodes do not see "
            f"({', '.join(n[:12] for n in blind)}): a worker there would keep its checkpoint where no other node can "
            "resume it. Set output_dir (storage) to a URL (s3://bucket/prefix, credentials from AWS_* variables) "
            "or to a folder every node mounts (docs/deploy.md)")


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _nodes_not_seeing(path: str, nodes: list[str]) -> list[str]:
    """The nodes on which `path` does not exist: a zero-CPU task pinned to each (one that does not answer
    within 60 s is not counted either way, with a warning)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    look = ray.remote(num_cpus=0, max_retries=0)(_exists)
    calls = {n: look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(path)
             for n in nodes}
    done, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=60)
    blind = []
    for node, ref in calls.items():
        if ref not in done:
            log.warning("node %s did not answer whether it sees %s; not counted", node[:12], path)
            ray.cancel(ref, force=True)
        elif not ray.get(ref):
            blind.append(node)
    return blind


def _start(cfg: GRPOConfig, run_id: str) -> tuple[dict[str, Any], list, Any]:
    """The actors, asked for at once (not awaited: `ready` holds their constructors). They and Ray Train's
    worker group start together: each loads torch and the model in its own process, and waiting for one
    before asking for the other made start-up their sum. The train loop's first calls on an actor still
    starting queue until it is up. The actors share one placement group: placed all together or not at all."""
    from ray.util.placement_group import placement_group

    actor_pg = None
    if bundles := actor_bundles(cfg):
        actor_pg = placement_group(bundles, strategy="PACK", name=f"raygrpo-actors-{run_id}")
    handles = build_actors(cfg, wait=False, placement_group=actor_pg)
    return handles, handles.pop("ready"), actor_pg


def _trainer(cfg: GRPOConfig, handles: dict[str, Any]) -> Any:
    """Ray Train's TorchTrainer for grpo.trainer.train_loop: the policy workers, their checkpoints (the best by
    eval reward when evaluating), and a restart of the worker group from the latest checkpoint on a failure."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from grpo.trainer import train_loop

    gpus = {"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {}
    if storage.is_url(cfg.output_dir):  # Ray Train writes through the same pyarrow filesystem (credentials:
        filesystem, storage_path = storage.resolve(cfg.output_dir)  # the standard variables on each node)
    else:
        filesystem, storage_path = None, str(Path(cfg.run_storage).parent)
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(), **handles},
        scaling_config=ScalingConfig(num_workers=cfg.num_policy_workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **gpus},
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="eval_reward" if cfg.eval_size > 0 else None,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=3),  # a dead policy worker: restart from the checkpoint
        ),
    )


def _rank_nodes(monitor: Any) -> list[str]:
    import ray

    try:
        return ray.get(monitor.rank_nodes.remote(), timeout=30)
    except Exception:  # the monitor is gone: the summary goes without it
        return []


def _shutdown(handles: dict[str, Any], actor_pg: Any) -> None:
    import ray

    for h in handles["rollout_actors"] + handles["reward_actors"] + [handles["weight_board"], handles["monitor"]]:
        ray.kill(h)
    if actor_pg is not None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(actor_pg)


class _Driver:
    """The driver's side of one run while it lives: waiting for resources, then polling the run monitor
    (metrics and trajectories to the reporters, progress, the target reward, the budget, stop requests)
    until the trainer's fit ends, aborting a fit that does not reach a step boundary after a stop."""

    def __init__(self, cfg: GRPOConfig, reporters: list[Reporter], *, poll_s: float, stop_grace_s: float):
        self.cfg, self.reporters, self.poll_s, self.stop_grace_s = cfg, reporters, poll_s, stop_grace_s
        self.t0 = time.time()
        self.stop_reason: dict[str, str] = {}
        self.stop_requested: dict[str, float] = {}
        self.outcome: dict[str, Any] = {}
        self.progress: _Progress | None = None
        self.last: dict[str, float] = {}
        self.warned: set[int] = set()
        self.recent: collections.deque[float] = collections.deque(maxlen=cfg.target_window)
        self.metered_from: float | None = None
        """the cost meter starts once the run holds resources: its actors are up (not while they waited)"""
        self.stored_through = 0
        """the mailbox's posts this driver's reporters have stored (RunMonitor.stored)"""
        self.monitor: Any = None
        self.waiting_for_nodes = False
        """booked, but the cluster has not the nodes yet: shown as waiting until the first step"""
        self.placed = False
        """the reporters know where this attempt's policy ranks are (notify_placed at its first step)"""

    # ---- stops ---------------------------------------------------------------------------------------
    def check_stop(self) -> str | None:
        for r in self.reporters:
            reason = r.should_stop()
            if reason:
                self.stop_reason.setdefault("reason", reason)
        return self.stop_reason.get("reason")

    def handle_signals(self) -> None:
        """`ray job stop` and Ctrl-C: checkpoint, then exit (the poll loop passes the stop on)."""

        def on_sigterm(signum: int, frame: Any) -> None:
            self.stop_reason.setdefault("reason", "cancelled")

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
            signal.signal(signal.SIGINT, on_sigterm)

    def request_stop(self, reason: str, *, now: bool = False) -> None:
        """Ask the train loop to stop at its next step boundary; `now`: no step can end, abort at once."""
        self.stop_reason.setdefault("reason", reason)
        if "at" not in self.stop_requested:
            self.stop_requested["at"] = time.monotonic()
            self.monitor.request_stop.remote(self.stop_reason["reason"])
        if now:
            self.stop_requested["at"] = time.monotonic() - self.stop_grace_s - 1

    # ---- the phases ----------------------------------------------------------------------------------
    def book(self, booking: Booking) -> bool:
        """Wait until the booking holds (False: a stop came first)."""
        waited = ""
        while not booking.try_book():
            if booking.reason != waited:
                waited = booking.reason
                log.info("%s", waited)
                notify_waiting(self.reporters, waited)
            if self.check_stop():
                return False
            time.sleep(self.poll_s)
        if waited:
            log.info("resources booked after %.1f s of waiting", time.time() - self.t0)
            notify_waiting(self.reporters, None)
        if reason := nodes_needed(booking.demand):
            log.info("%s", reason)
            if reason.startswith("waiting for nodes"):  # shown until the first step (the job API: admission)
                notify_waiting(self.reporters, reason)
                self.waiting_for_nodes = True
        return True

    def drive(self, trainer: Any, monitor: Any, ready: list, booking: Booking) -> None:
        """The trainer's fit in a thread, and this loop until it ends."""
        import ray

        self.monitor, self.ready, self.pending, self.booking = monitor, ready, list(ready), booking
        self.metered_from = None if self.pending else time.time()

        def fit() -> None:
            try:
                self.outcome["result"] = trainer.fit()
            except Exception as e:  # reported as the run's failure, with its message
                self.outcome["error"] = e

        worker = threading.Thread(target=fit, name="trainer-fit", daemon=True)
        worker.start()
        fault = FaultHook(self.cfg.run_dir, self.cfg.run_storage)
        while True:
            alive = worker.is_alive()
            self._poll_actors()
            fault.check()  # a test's armed fault (kill or hold right after a checkpoint, before this drain)
            posts = self._drain()
            self._check_budget()
            if reason := self.check_stop():
                self.request_stop(reason)
            if not alive:
                break
            if "at" in self.stop_requested and time.monotonic() - self.stop_requested["at"] > self.stop_grace_s:
                self._abort(worker)
                continue
            # Until the next post (drained at once, so a checkpoint waiting on it is not held up) or the poll.
            ray.get(monitor.wait_posted.remote(posts, self.poll_s))
        if self.progress is not None:
            self.progress.close()

    def _poll_actors(self) -> None:
        """Whether the actors are up; an actor that cannot start fails the run with its own error, and a stop
        before they are up ends the run at once (nothing can have trained: no step boundary to wait for)."""
        import ray

        if not self.pending:
            return
        try:
            _, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            if not self.pending:
                ray.get(self.ready)  # constructor errors (bad model files, unimportable reward) surface here
                self.metered_from = time.time()
                log.info("actors up %.1f s after the start", self.metered_from - self.t0)
        except Exception as e:
            self.outcome["actor_error"] = e
            self.pending = []
            self.request_stop("failed", now=True)
        if self.pending and (reason := self.check_stop()):
            self.request_stop(reason, now=True)

    def cost(self) -> float:
        return cost_usd(self.cfg, time.time() - self.metered_from) if self.metered_from is not None else 0.0

    def _drain(self) -> int:
        """What the train loop posted: a (re)start, trajectories and each step's metrics to the reporters,
        progress, the target reward; then tells the monitor they are stored. Returns the posts seen."""
        import ray

        posts, resumed_at, metrics, rows = ray.get(self.monitor.drain.remote())
        if resumed_at is not None:  # a (re)start: the steps after it are re-run, stored again once
            if resumed_at > 0:
                log.info("policy workers resumed from the checkpoint of step %d: the steps after it run again",
                         resumed_at)
            notify_resume(self.reporters, resumed_at)
            self.placed = False  # this attempt's ranks may sit on other nodes
        for r in self.reporters:
            if rows:
                r.on_trajectories(rows)
        cost = self.cost()
        if metrics and not self.placed:
            self.placed = True
            notify_placed(self.reporters, _rank_nodes(self.monitor))
        for m in metrics:
            m["cost_usd"] = cost
            if self.progress is None:
                self.progress = _Progress(self.cfg.num_steps, int(m["step"]) - 1)
                log.info("first step %.1f s after the start", time.time() - self.t0)
                self.booking.release()  # its workers train and its actors are up (or coming): Ray counts them now
                if self.waiting_for_nodes:
                    notify_waiting(self.reporters, None)
                    self.waiting_for_nodes = False
            self.progress.update(m, cost)
            for r in self.reporters:
                r.on_step(m)
            self.last = m
            self._check_target(m)
        if posts > self.stored_through:  # every reporter has these now: a checkpoint after them may be written
            self.monitor.stored.remote(posts)
            self.stored_through = posts
        return posts

    def _check_target(self, m: dict[str, float]) -> None:
        """Done when the mean reward over the last `target_window` steps reaches `target_reward`: the step in
        flight ends, then a final checkpoint."""
        cfg, recent = self.cfg, self.recent
        recent.append(float(m.get("reward_mean", 0.0)))
        if (cfg.target_reward is not None and len(recent) == recent.maxlen
                and sum(recent) / len(recent) >= cfg.target_reward and "at" not in self.stop_requested):
            log.info("mean reward %.3f over the last %d steps reached the target %.3g at step %d: stopping",
                     sum(recent) / len(recent), len(recent), cfg.target_reward, int(m["step"]))
            self.request_stop("completed")

    def _check_budget(self) -> None:
        """Warnings at 75 and 90 %; a stop before the step that would cross the budget: the step in flight ends
        first (the loop stops at a boundary), then the final checkpoint and the workers' release, which cost
        too; so stop when the cost after the step in flight, one more and that reserve would be over."""
        cfg = self.cfg
        if not cfg.max_budget_usd:
            return
        cost = self.cost()
        used = cost / cfg.max_budget_usd
        for pct in (75, 90):
            if used * 100 >= pct and pct not in self.warned:
                self.warned.add(pct)
                log.warning("run has used %d%% of its budget ($%.6g of $%.6g)", pct, cost, cfg.max_budget_usd)
        ahead = cost_usd(cfg, 2 * float(self.last.get("step_time_s", 0.0)) + cfg.budget_stop_reserve_s) \
            if self.last else 0.0
        if used >= 1.0 or (self.last and cost + ahead > cfg.max_budget_usd):
            self.request_stop("budget_exceeded")

    def _abort(self, worker: threading.Thread) -> None:
        """No step boundary within the grace after a stop: abort the training. Again each round until the fit
        ends: a controller still being created is not there to stop yet."""
        if not self.outcome.get("aborted") and self.metered_from is not None and "actor_error" not in self.outcome:
            log.warning("no step boundary %.0f s after the stop (%s): aborting the training", self.stop_grace_s,
                        self.stop_reason["reason"])
        self.outcome["aborted"] = True
        abort_training()
        worker.join(timeout=max(self.poll_s, 2.0))
        self.outcome.pop("error", None)  # the abort's own error: the run ended because it was stopped

    # ---- the end -------------------------------------------------------------------------------------
    def result(self) -> RunResult:
        outcome = self.outcome
        result = outcome.get("result")
        error = outcome.get("actor_error") or outcome.get("error") or (result.error if result is not None else None)
        summary = RunResult(status="failed" if error else self.stop_reason.get("reason", "completed"),
                            steps=int(self.last.get("step", 0)), last_metrics=self.last, cost_usd=self.cost())
        if error is not None:
            summary.error = f"{type(error).__name__}: {error}"
        if result is not None and result.checkpoint is not None:
            summary.checkpoint = storage.url_of(result.checkpoint.filesystem, result.checkpoint.path)
            summary.best_checkpoints, summary.checkpoint_scores = rank_checkpoints(result.best_checkpoints or [])
        elif outcome.get("aborted"):
            summary.checkpoint = latest_checkpoint(self.cfg.run_storage)
        return summary

    def finish(self, summary: RunResult) -> RunResult:
        for r in self.reporters:
            r.on_end(summary.status, error=summary.error, summary={
                "steps": summary.steps, "checkpoint": summary.checkpoint,
                "best_checkpoints": summary.best_checkpoints, "checkpoint_scores": summary.checkpoint_scores,
                "cost_usd": summary.cost_usd, "last_metrics": summary.last_metrics, "rank_nodes": summary.rank_nodes,
            })
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
    try:
        result = run(cfg, reporters=reporters, job_id=args.job_id)
    except ConfigError as e:  # the cluster cannot hold the run: say so at once
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run {cfg.run_name}: {result.status} after {result.steps} steps; output in {cfg.run_storage}"
          + (f"; error: {result.error}" if result.error else ""), flush=True)
    return 0 if result.status in ("completed", "cancelled", "paused", "budget_exceeded") else 1


def exit_now(code: int) -> None:
    """Leave the process once the run is over: everything it writes is stored and closed by then (reporters,
    summary.json, checkpoints). Ray is shut down (a local cluster this process started is stopped with it),
    logs and streams are flushed, and the interpreter's own teardown (finalising torch, transformers and
    the rest, ~2.3 s on 2 cores, measured) is skipped: a user waits for the prompt to come back."""
    import ray

    _stop_autoscaler_monitor()
    ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop_autoscaler_monitor() -> None:
    """The autoscaler monitor of a local cluster this process started: `ray.shutdown` stops its processes one
    by one, giving each 1 s to leave on SIGTERM, and the monitor always takes all of it (measured, Ray 2.60:
    1.0 of the 1.1 s of the shutdown; raylet, GCS and dashboard go in 0.03 s each). Nothing needs it once the
    run is over: it is killed first. A cluster this process did not start has no such process here."""
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        for info in (node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []):
            info.process.kill()
    except Exception:  # noqa: BLE001 - Ray's internals moved: ray.shutdown still stops it, 1 s slower
        pass


if __name__ == "__main__":
    exit_now(main())
