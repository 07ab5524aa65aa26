"""The GRPO loop that runs on every Ray Train policy worker (Train V2 API).

One step, top to bottom: take this worker's shard of prompts → rollout actors sample G completions
each → the reward ActorPool scores them → group advantages → clipped policy loss (+ KL) → DDP/FSDP
step → rank 0 publishes the new weights once (object store) → every rank reports; checkpoints are
HF directories plus optimizer/RNG/step state. With `async_rollouts` the next step's rollouts are
collected in a background thread while this step trains.

Not here: building the actors and the trainer (grpo.run), the loss math (grpo.loss), the update
itself (grpo.learner).
"""

from __future__ import annotations

import random
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.util import ActorPool

from grpo.config import GRPOConfig
from grpo.learner import Learner, ScoredBatch, scheduled_lr, score_agent_batch, score_batch
from grpo.sampling import Rollout, concat_rollouts
from grpo.tasks import Dataset, Sample

STATE_FILE = "trainer_state.pt"


@dataclass
class Collected:
    """One worker's scored shard of a step, with what it cost to make."""

    step: int
    samples: list[Sample]
    batch: ScoredBatch
    reward_errors: int
    reward_timeouts: int
    seconds: float
    agent: dict[str, float] | None = None  # multi-turn sums (grpo.agents.episodes.AGENT_STATS), None single-turn


def _sample_seed(cfg: GRPOConfig, step: int, rank: int, part: int) -> int:
    # Deterministic per (run seed, step, worker, chunk): a retried generate call re-samples the same.
    return (cfg.seed * 1_000_003 + step * 10_007 + rank * 101 + part) % (2**63 - 1)


def my_rollout_actors(actors: list, rank: int, world: int) -> list:
    """Rollout actors this policy worker sends to: its own slice when there are enough to go round."""
    if len(actors) >= world:
        return [a for i, a in enumerate(actors) if i % world == rank]
    return [actors[rank % len(actors)]]


def score(pool_actors: list, items: list[tuple[str, str, str]]) -> tuple[list[float], int, int]:
    """Score (prompt, completion, expected) items on the reward ActorPool, in order."""
    n_chunks = min(len(items), 2 * len(pool_actors))
    size = -(-len(items) // n_chunks)
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    rewards: list[float] = []
    errors = timeouts = 0
    for res in ActorPool(pool_actors).map(lambda a, c: a.score.remote(c), chunks):
        rewards += res.rewards
        errors += res.errors
        timeouts += res.timeouts
    return rewards, errors, timeouts


def collect(
    cfg: GRPOConfig, dataset: Dataset, step: int, *, rank: int, world: int, actors: list, reward_actors: list,
    min_version: int,
) -> Collected:
    """Sample and score this worker's shard of step `step` (whole groups stay on one worker)."""
    t0 = time.perf_counter()
    n = cfg.prompts_per_worker
    samples = dataset.batch(step, cfg.prompts_per_step, cfg.seed)[rank * n : (rank + 1) * n]
    mine = my_rollout_actors(actors, rank, world)
    per = -(-len(samples) // len(mine))
    parts = [samples[i : i + per] for i in range(0, len(samples), per)]
    if cfg.environment is not None:  # multi-turn: the environments score, no reward pool
        from grpo.agents import episodes as mt
        settings = mt.AgentSettings.from_config(cfg)
        futures = [
            actor.generate_agent.remote(
                part, settings=settings, group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                seed=_sample_seed(cfg, step, rank, j), min_version=min_version,
            )
            for j, (actor, part) in enumerate(zip(mine, parts, strict=False))
        ]
        ro = mt.concat_agent_rollouts(ray.get(futures))
        return Collected(step, samples, score_agent_batch(ro, cfg), 0, 0, time.perf_counter() - t0,
                         agent=mt.agent_stats(ro))
    futures = [
        actor.generate.remote(
            [s.prompt for s in part], group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, seed=_sample_seed(cfg, step, rank, j),
            min_version=min_version,
        )
        for j, (actor, part) in enumerate(zip(mine, parts, strict=False))
    ]
    rollout: Rollout = concat_rollouts(ray.get(futures))
    g = cfg.group_size
    items = [(samples[i // g].prompt, text, samples[i // g].expected) for i, text in enumerate(rollout.texts)]
    rewards, errors, timeouts = score(reward_actors, items)
    return Collected(step, samples, score_batch(rollout, rewards, cfg), errors, timeouts, time.perf_counter() - t0)


def evaluate(cfg: GRPOConfig, dataset: Dataset, actors: list, reward_actors: list, min_version: int) -> float:
    """Greedy completions on the held-out prompts, mean reward (rank 0 only)."""
    samples = dataset.eval[: cfg.eval_size]
    if not samples:
        return float("nan")
    per = -(-len(samples) // len(actors))
    parts = [samples[i : i + per] for i in range(0, len(samples), per)]
    if cfg.environment is not None:  # greedy episodes; the score is the environment's reward, no shaping
        from grpo.agents.episodes import AgentSettings

        settings = AgentSettings.from_config(cfg)
        rollouts = ray.get([a.generate_agent.remote(p, settings=settings, group_size=1, temperature=0.0,
                                                    min_version=min_version) for a, p in zip(actors, parts, strict=False)])
        env_rewards = [sum(r.get("env_reward", 0.0) for r in recs) for ro in rollouts for recs in ro.records]
        return sum(env_rewards) / len(env_rewards)
    futures = [
        a.generate.remote([s.prompt for s in p], group_size=1, max_new_tokens=cfg.max_new_tokens,
                          temperature=0.0, min_version=min_version)
        for a, p in zip(actors, parts, strict=False)
    ]
    texts = [t for r in ray.get(futures) for t in r.texts]
    rewards, _, _ = score(reward_actors, [(s.prompt, t, s.expected) for s, t in zip(samples, texts, strict=True)])
    return sum(rewards) / len(rewards)


def trajectories(got: Collected) -> list[dict[str, Any]]:
    """One row per completion, for the run's trajectory log (and the job API's export)."""
    b, ro, g = got.batch, got.batch.rollout, got.batch.rollout.group_size
    records = getattr(ro, "records", None)
    rows = []
    for i in range(len(ro.texts)):
        adv = b.advantages[i]
        row = {"step": got.step, "prompt": got.samples[i // g].prompt, "completion": ro.texts[i],
               "expected": got.samples[i // g].expected, "reward": float(b.rewards[i]),
               # per-token advantages (multi-turn step credit): the mean over the policy's tokens
               "advantage": float(adv if adv.dim() == 0 else adv[ro.train_mask[i]].mean().nan_to_num()),
               "finish_reason": ro.finish_reasons[i], "tokens": int(ro.lengths[i]), "policy_version": ro.version}
        if records is not None:
            row["steps"] = records[i]
            # success is the outcome (the environment's last reward), not the shaped sum
            row["success"] = bool(records[i]) and records[i][-1].get("env_reward", 0.0) >= 1.0
        rows.append(row)
    return rows


def sft_warmup(cfg: GRPOConfig, dataset: Dataset, learner: Learner, tokenizer: Any, pad_id: int, *,
               rank: int, world: int) -> float:
    """`sft_warmup_steps` supervised steps on demonstrations of this worker's shard of prompts,
    built here (no rollout actor needed); returns the last loss."""
    from grpo.agents.episodes import AgentSettings, demonstrations

    settings = AgentSettings.from_config(cfg)
    learner.set_lr(cfg.sft_learning_rate or cfg.learning_rate)  # a fresh run's optimizer: no moments yet
    # One demonstration per prompt (a demonstration is deterministic: G copies would teach nothing more).
    total = cfg.sft_batch_size or cfg.prompts_per_step
    n, loss = total // world, float("nan")
    for k in range(cfg.sft_warmup_steps):
        # Negative step numbers: the warm-up's prompts are drawn apart from the GRPO steps' ones.
        samples = dataset.batch(-1 - k, total, cfg.seed)[rank * n : (rank + 1) * n]
        ro = demonstrations(samples, settings, tokenizer, pad_id=pad_id, max_prompt_tokens=cfg.max_prompt_tokens)
        (num_tokens,) = _all_sum([float(ro.train_mask.sum())])
        loss = learner.sft_step(ro, num_tokens=num_tokens, world_size=world)
    learner.optimizer = learner.new_optimizer(cfg.learning_rate)  # GRPO starts without the warm-up's moments
    return loss


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Works for a plain module, DDP and FSDP alike: a full, unsharded CPU copy.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_model(cfg: GRPOConfig, path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype))


def train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of the TorchTrainer. `config` carries the run config and actor handles."""
    cfg = GRPOConfig(**config["cfg"])
    actors, reward_actors = config["rollout_actors"], config["reward_actors"]
    board, monitor = config["weight_board"], config["monitor"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = cfg.load_dataset()

    # 0. start or resume: a checkpoint holds the HF model plus optimizer, RNG and step
    start_step, state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model = _load_model(cfg, d)
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        start_step = int(state["step"])
    else:
        torch.manual_seed(cfg.seed)
        model = _load_model(cfg, cfg.model)
    model = ray.train.torch.prepare_model(model, parallel_strategy=cfg.strategy)
    ref_model = None
    if cfg.kl_coef > 0:
        # The frozen reference is the initial policy; it needs no wrapper since it never trains.
        ref_model = _load_model(cfg, cfg.model).to(ray.train.torch.get_device())
        ref_model.requires_grad_(False).eval()
    learner = Learner(cfg, model, ref_model=ref_model, pad_id=pad_id)
    if state is not None:
        learner.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])

    loading: list = []

    def publish(version: int) -> None:
        # Rank 0 puts the weights in the object store ONCE and hands every rollout actor the same
        # reference; the board keeps it for actors that restart or lag and pull later. The loads are
        # not awaited here: an actor runs rank 0's calls in order, so it loads before rank 0's next
        # generate, and any other caller's generate carries min_version and pulls if it got there first.
        sd = _full_state_dict(learner.model)
        if rank == 0:
            ref = ray.put(sd)
            ray.get(board.publish.remote(version, [ref]))
            ray.get(loading)  # the previous step's loads, long done: surfaces their errors
            loading[:] = [a.load_weights.remote(ref, version) for a in actors]

    def save_checkpoint(step: int, metrics: dict[str, float]) -> None:
        sd = _full_state_dict(learner.model)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            learner.base_model.save_pretrained(tmp, state_dict=sd)
            tokenizer.save_pretrained(tmp)
            torch.save(
                {"step": step, "optimizer": learner.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "py_rng": random.getstate(), "config": cfg.model_dump()},
                Path(tmp) / STATE_FILE,
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # 0b. supervised warm-up on the environment's demonstrations (fresh agent runs only)
    warmup_loss = None
    if cfg.environment is not None and cfg.sft_warmup_steps and start_step == 0:
        warmup_loss = sft_warmup(cfg, dataset, learner, tokenizer, pad_id, rank=rank, world=world)
        if ref_model is not None:  # KL then holds the policy near what the warm-up taught, not the init
            ref_model.load_state_dict(_full_state_dict(learner.model))

    version = start_step
    publish(version)
    evaluating = cfg.eval_size > 0
    pending: dict[int, Future] = {}
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts") if cfg.async_rollouts else None

    def collect_step(step: int, min_version: int) -> Collected:
        return collect(cfg, dataset, step, rank=rank, world=world, actors=actors, reward_actors=reward_actors,
                       min_version=min_version)

    def fetch(step: int, min_version: int) -> Collected:
        if executor is None:
            return collect_step(step, min_version)
        fut = pending.pop(step, None) or executor.submit(collect_step, step, min_version)
        # Keep up to max_staleness steps in flight: they sample with the weights of now.
        for ahead in range(step + 1, min(step + cfg.max_staleness, cfg.num_steps) + 1):
            if ahead not in pending:
                pending[ahead] = executor.submit(collect_step, ahead, min_version)
        return fut.result()

    t_start = time.perf_counter()
    for step in range(start_step + 1, cfg.num_steps + 1):
        t0 = time.perf_counter()
        # 1-3. sample, score, advantages (whole groups on this worker)
        got = fetch(step, version)
        staleness = version - got.batch.rollout.version
        if staleness > cfg.max_staleness:  # a lagging actor: throw it away and sample fresh
            got = collect_step(step, version)
            staleness = version - got.batch.rollout.version
        batch = got.batch
        num_tokens, num_seqs = _all_sum([batch.num_tokens, batch.num_seqs])

        # 4. policy update (DDP all-reduces the gradients)
        t_train = time.perf_counter()
        learner.set_lr(scheduled_lr(cfg, step))
        stats = learner.step(batch, num_tokens=num_tokens, num_seqs=num_seqs, world_size=world)
        train_s = time.perf_counter() - t_train

        # 5. publish the new weights once; every rollout actor loads them
        version = step
        t_pub = time.perf_counter()
        publish(version)
        publish_s = time.perf_counter() - t_pub

        # 6. metrics: sums across workers
        r = batch.rewards
        ro = batch.rollout
        keys = list(stats)
        agent_keys = sorted(got.agent or {})
        summed = _all_sum(
            [stats[k] for k in keys]
            + [float(r.sum()), float((r**2).sum()), float(r.numel()), float(ro.num_tokens),
               float(got.reward_errors), float(got.reward_timeouts),
               float(sum(f == "stop" for f in ro.finish_reasons)), float(staleness), float(batch.num_seqs)]
            + [got.agent[k] for k in agent_keys]
        )
        metrics = dict(zip(keys, summed[: len(keys)], strict=True))
        s, s2, n, toks, errs, tos, stops, stale, kept = summed[len(keys) : len(keys) + 9]
        agent = dict(zip(agent_keys, summed[len(keys) + 9 :], strict=True))
        step_s = time.perf_counter() - t0
        mean = s / n
        metrics.update(
            step=step, reward_mean=mean, reward_std=max(s2 / n - mean**2, 0.0) ** 0.5, completion_tokens=toks,
            completion_len_mean=toks / n, stop_frac=stops / n, reward_errors=errs, reward_timeouts=tos,
            staleness=stale / world, kept_frac=kept / n, step_time_s=step_s, train_time_s=train_s,
            rollout_time_s=t_train - t0, gen_time_s=got.batch.rollout.gen_seconds, publish_time_s=publish_s,
            tokens_per_s=toks / step_s, elapsed_s=time.perf_counter() - t_start, policy_version=version,
        )
        if agent:  # multi-turn: how the agent used its tools
            metrics.update(
                tool_use_rate=agent["tool_use"] / n, tool_calls_per_traj=agent["tool_calls"] / n,
                tool_error_rate=agent["tool_errors"] / max(agent["agent_steps"], 1.0),
                steps_per_traj=agent["agent_steps"] / n, env_errors=agent["env_errors"],
                env_reward_mean=agent["env_reward"] / n,
                trajectories_per_s=n / step_s,
            )
        if warmup_loss is not None and step == start_step + 1:
            metrics["sft_warmup_loss"] = warmup_loss

        # 7. report to the driver; it answers with a stop reason (cancel, budget) or None
        stop_flag = 0.0
        if rank == 0:
            do_eval = evaluating and (
                step == cfg.num_steps
                or (cfg.eval_interval and step % cfg.eval_interval == 0)
                or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0)
            )
            if do_eval:
                metrics["eval_reward"] = evaluate(cfg, dataset, actors, reward_actors, version)
            stop = ray.get(monitor.record.remote(step, metrics, trajectories(got)))
            stop_flag = 1.0 if stop else 0.0
        else:
            ray.get(monitor.add_trajectories.remote(trajectories(got)))
        stopping = _all_sum([stop_flag])[0] > 0
        last = step == cfg.num_steps or stopping
        if last or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0):
            if evaluating and "eval_reward" not in metrics and rank == 0:
                metrics["eval_reward"] = evaluate(cfg, dataset, actors, reward_actors, version)
            metrics.setdefault("eval_reward", float("nan"))
            save_checkpoint(step, metrics)
        # Only checkpoint steps call ray.train.report: in Ray 2.60 it is a barrier that waits for the
        # Train controller's poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), longer than a
        # small step. Per-step metrics go to the driver through the RunMonitor instead.
        if stopping:
            break
    ray.get(loading)  # the rollout actors hold the final weights when the run returns
    if executor is not None:
        executor.shutdown(wait=True, cancel_futures=True)
