"""The GRPO loop that runs on every Ray Train policy worker (Train V2 API).

`train_loop` reads top to bottom: `setup` (model, reference, optimizer, resume, warm-up, first publish),
then per step `train_step` (sample → score → advantages → update → publish) and `report_step` (metrics
to the driver, evaluation, checkpoint, stop). With `async_rollouts` the next step's rollouts are
collected in a background thread while this step trains. Checkpoints hold a Hugging Face directory of
the full model (for serving and `from_pretrained`) and the sharded model and optimizer state
(`torch.distributed.checkpoint`, one shard per worker), so a resumed run continues exactly.

Not here: building the actors and the trainer (grpo.run), the loss math (grpo.loss), the update itself
(grpo.learner), how the model is distributed (grpo.parallel).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import pickle
import random
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.util import ActorPool

from grpo import loading, lora, memory, parallel, storage
from grpo.config import GRPOConfig
from grpo.learner import Learner, ScoredBatch, scheduled_lr, score_agent_batch, score_batch
from grpo.sampling import Rollout, concat_rollouts
from grpo.tasks import Dataset, Sample

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
REFERENCE_DIR = "reference"  # the KL reference, when a warm-up made it differ from the base model


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
    raw_rewards: list[float] | None = None  # single-turn rewards before shaping (to re-score a refilled batch)
    sampling_rounds: int = 0  # extra rounds dynamic sampling took to refill dropped groups


def _sample_seed(cfg: GRPOConfig, step: int, offset: int, round: int = 0) -> int:
    # Deterministic per (run seed, step, first prompt of the chunk in the step's batch, refill round): a
    # retried generate re-samples the same, and so does any split of the batch across workers.
    return (cfg.seed * 1_000_003 + step * 10_007 + offset * 101 + round * 7919) % (2**63 - 1)


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


def sample_and_score(cfg: GRPOConfig, samples: list[Sample], step: int, *, offset: int, round: int, actors: list,
                     reward_actors: list, min_version: int) -> Collected:
    """Sample G completions for each of `samples` on `actors` and score them; `offset` is the first
    sample's index in the step's batch (it seeds the sampling)."""
    t0 = time.perf_counter()
    per = -(-len(samples) // len(actors))
    parts = [(j * per, samples[j * per : (j + 1) * per]) for j in range(-(-len(samples) // per))]
    if cfg.environment is not None:  # multi-turn: the environments score, no reward pool
        from grpo.agents import episodes as mt

        settings = mt.AgentSettings.from_config(cfg)
        futures = [
            actor.generate_agent.remote(
                part, settings=settings, group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                seed=_sample_seed(cfg, step, offset + start, round), min_version=min_version,
            )
            for actor, (start, part) in zip(actors, parts, strict=False)
        ]
        ro = mt.concat_agent_rollouts(ray.get(futures))
        return Collected(step, samples, score_agent_batch(ro, cfg), 0, 0, time.perf_counter() - t0,
                         agent=mt.agent_stats(ro))
    futures = [
        actor.generate.remote(
            [s.input for s in part], group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, seed=_sample_seed(cfg, step, offset + start, round),
            min_version=min_version,
        )
        for actor, (start, part) in zip(actors, parts, strict=False)
    ]
    rollout: Rollout = concat_rollouts(ray.get(futures))
    g = cfg.group_size
    items = [(samples[i // g].prompt, text, samples[i // g].expected) for i, text in enumerate(rollout.texts)]
    rewards, errors, timeouts = score(reward_actors, items)
    return Collected(step, samples, score_batch(rollout, rewards, cfg), errors, timeouts, time.perf_counter() - t0,
                     raw_rewards=rewards)


def merge(a: Collected, b: Collected, cfg: GRPOConfig, *, groups: int) -> Collected:
    """`b` (a refill round) appended to `a`, re-scored as one batch; at most `groups` groups are kept
    (the first ones), so a refilled step trains on exactly a full batch."""
    if cfg.environment is not None:
        from grpo.agents import episodes as mt

        batch = score_agent_batch(mt.concat_agent_rollouts([a.batch.rollout, b.batch.rollout]), cfg)
        agent = {k: a.agent.get(k, 0.0) + b.agent.get(k, 0.0) for k in {*a.agent, *b.agent}} if a.agent else None
        raw = None
    else:
        raw = (a.raw_rewards or []) + (b.raw_rewards or [])
        batch = score_batch(concat_rollouts([a.batch.rollout, b.batch.rollout]), raw, cfg)
        agent = None
    g = cfg.group_size
    kept = batch.keep.view(-1, g).all(dim=1)  # (P,)
    kept &= kept.cumsum(dim=0) <= groups
    batch.keep = kept.repeat_interleave(g)  # (P*G,)
    return Collected(a.step, a.samples + b.samples, batch, a.reward_errors + b.reward_errors,
                     a.reward_timeouts + b.reward_timeouts, a.seconds + b.seconds, agent=agent, raw_rewards=raw,
                     sampling_rounds=a.sampling_rounds + 1)


def collect(
    cfg: GRPOConfig, dataset: Dataset, step: int, *, rank: int, world: int, actors: list, reward_actors: list,
    min_version: int,
) -> Collected:
    """Sample and score this worker's shard of step `step` (whole groups stay on one worker). With dynamic
    sampling, groups dropped as flat are refilled from extra prompts, up to `max_sampling_rounds` rounds."""
    n = cfg.prompts_per_worker
    mine = my_rollout_actors(actors, rank, world)
    kw = dict(actors=mine, reward_actors=reward_actors, min_version=min_version)
    samples = dataset.batch(step, cfg.prompts_per_step, cfg.seed)[rank * n : (rank + 1) * n]
    got = sample_and_score(cfg, samples, step, offset=rank * n, round=0, **kw)
    for r in range(1, cfg.max_sampling_rounds + 1 if cfg.dynamic_sampling else 1):
        if got.batch.num_seqs >= n * cfg.group_size:
            break
        extra = dataset.batch(step, cfg.prompts_per_step, cfg.seed, round=r)[rank * n : (rank + 1) * n]
        got = merge(got, sample_and_score(cfg, extra, step, offset=rank * n, round=r, **kw), cfg, groups=n)
    return got


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
        a.generate.remote([s.input for s in p], group_size=1, max_new_tokens=cfg.max_new_tokens,
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
        (num_tokens,) = learner.collectives.sum([float(ro.train_mask.sum())])
        loss = learner.sft_step(ro, num_tokens=num_tokens, world_size=world)
    learner.optimizer = learner.new_optimizer(cfg.learning_rate)  # GRPO starts without the warm-up's moments
    return loss


def _load_model(path: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def build_policy(cfg: GRPOConfig, device: torch.device, resume_dir: Path | None) -> torch.nn.Module:
    """The trainable policy, fp32 master weights, wrapped for the strategy. Under FSDP2 it is built on the
    meta device and each rank reads only its shards (grpo.loading), so no rank ever holds the whole model;
    a resume with a sharded checkpoint reads no weights here at all (resume() loads the shards). A model
    without safetensors covering it loads whole first, the plain way."""
    wrap = functools.partial(parallel.wrap_policy, strategy=cfg.strategy, dtype=cfg.dtype, device=device,
                             activation_checkpointing=cfg.uses_activation_checkpointing)
    lora_kw = cfg.lora_config()
    sharded_resume = resume_dir is not None and parallel.has_shards(resume_dir)
    if lora_kw is not None:  # the base, then a fresh adapter; a resume restores the adapter from the shards
        if cfg.strategy == "fsdp":  # the adapter goes on the meta model; the base's rows are read by name
            return loading.sharded(cfg.model, torch.float32, lambda m: wrap(lora.add_adapter(m, lora_kw)), device,
                                   read=not sharded_resume)
        return wrap(lora.add_adapter(_load_model(str(cfg.model), torch.float32), lora_kw))
    path = resume_dir or Path(cfg.model)
    if cfg.strategy == "fsdp":
        return loading.sharded(path, torch.float32, wrap, device, read=not sharded_resume)
    return wrap(_load_model(str(path), torch.float32))


def build_reference(cfg: GRPOConfig, device: torch.device, path: Path) -> torch.nn.Module:
    """The frozen KL reference in the compute dtype (it never updates: no fp32 master, no gradients). Under
    FSDP2 it is sharded like the policy (meta device, each rank its rows), so each rank holds 1/N of it and
    gathers a layer at a time in the forward; under DDP every rank holds it whole, as it does the policy."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.strategy == "fsdp":
        ref = loading.sharded(path, dtype, functools.partial(parallel.shard, device=device), device)
    else:
        ref = _load_model(str(path), dtype).to(device)
    return ref.requires_grad_(False).eval()


@dataclass
class Worker:
    """Everything one policy worker holds across steps."""

    cfg: GRPOConfig
    rank: int
    world: int
    tokenizer: Any
    pad_id: int
    dataset: Dataset
    learner: Learner
    actors: list
    reward_actors: list
    board: Any
    monitor: Any
    start_step: int = 0
    version: int = 0
    warmup_loss: float | None = None
    ref_from_warmup: bool = False
    loading: list = field(default_factory=list)
    pending: dict[int, Future] = field(default_factory=dict)
    executor: ThreadPoolExecutor | None = None
    t_start: float = 0.0
    publish_bytes: int = 0
    """bytes this worker published last (the full weights, or the adapter only with LoRA)"""

    @property
    def collectives(self) -> parallel.Collectives:
        return self.learner.collectives


def setup(config: dict[str, Any]) -> Worker:
    """Model (fp32 master weights, wrapped for the strategy), reference, optimizer; resumed from the latest
    checkpoint when there is one; the warm-up on a fresh agent run; the first weights published."""
    from transformers import AutoTokenizer

    cfg = GRPOConfig(**config["cfg"]).localized()  # inputs at a URL: this node's copy
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads)
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    checkpoint = resume_point(ray.train.get_checkpoint(), cfg.run_storage)
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as found:
        resume_dir = Path(found) if found else None
        if resume_dir is None:
            torch.manual_seed(cfg.seed)
        model = build_policy(cfg, device, resume_dir)
        lora_on = cfg.lora_rank > 0
        ref_model = None
        if cfg.kl_coef > 0 and lora_on:  # the base is the policy with its adapter off: no copy
            ref_model = lora.AdapterOff(parallel.unwrap(model))
        elif cfg.kl_coef > 0:  # the initial policy, or the warm-up's result saved with the checkpoints
            saved_ref = resume_dir / REFERENCE_DIR if resume_dir is not None else None
            ref_model = build_reference(cfg, device, saved_ref if saved_ref and saved_ref.is_dir() else Path(cfg.model))
        w = Worker(cfg=cfg, rank=rank, world=world, tokenizer=tokenizer, pad_id=pad_id,
                   dataset=cfg.load_dataset(), learner=Learner(cfg, model, ref_model=ref_model, pad_id=pad_id),
                   actors=config["rollout_actors"], reward_actors=config["reward_actors"],
                   board=config["weight_board"], monitor=config["monitor"])
        if resume_dir is not None:
            resume(w, resume_dir)
        elif cfg.environment is not None and cfg.sft_warmup_steps:  # fresh agent runs only
            w.warmup_loss = sft_warmup(cfg, w.dataset, w.learner, tokenizer, pad_id, rank=rank, world=world)
            if ref_model is not None and not lora_on:  # KL then holds the policy near what the warm-up taught
                parallel.copy_weights(ref_model, model)
                w.ref_from_warmup = True
    w.version = w.start_step
    w.monitor.rank_node.remote(rank, ray.get_runtime_context().get_node_id())  # summary.json's rank_nodes
    if rank == 0:  # before anything of this attempt reaches the driver: it drops the lost attempt's steps
        ray.get(w.monitor.resumed.remote(w.start_step))
    publish(w, w.version, restart=True)  # a resumed attempt replaces what the lost one published
    w.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts") if cfg.async_rollouts else None
    w.t_start = time.perf_counter()
    return w


def checkpoint_step(d: str | Path) -> int | None:
    """The step of the checkpoint folder `d` (a local path or a URL) if every rank's part of it is there in
    full, else None: rank 0's state, each rank's RNG file, and every byte range the sharded checkpoint's
    metadata points at (a checkpoint is uploaded rank by rank; one whose upload a kill cut short must not be
    resumed). A few listings and two small reads, so it costs little on an object store too."""
    d = str(d)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(storage.join(d, STATE_FILE))), map_location="cpu",
                           weights_only=False)
        world = int(state["config"].get("num_policy_workers", 1))
        rngs = storage.sizes(storage.join(d, "rng"))
        if not all(f"rank{r}.pt" in rngs for r in range(world)):
            return None
        shards = storage.join(d, parallel.SHARDS_DIR)
        files = storage.sizes(shards)
        if ".metadata" in files:  # the format torch.distributed.checkpoint's FileSystemWriter writes: a pickle
            ends: dict[str, int] = {}
            for info in pickle.loads(storage.read_bytes(storage.join(shards, ".metadata"))).storage_data.values():
                ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
            if any(files.get(f, -1) < end for f, end in ends.items()):
                return None
        return int(state["step"])
    except Exception:  # missing, unreadable, truncated (pickle errors), or not a checkpoint of this engine
        return None


def resume_point(registered: Any, run_storage: str) -> Any:
    """Where a (re)started worker group resumes: the newest complete checkpoint. Ray Train hands the last one
    its controller registered; a checkpoint is registered when the controller next polls (every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) after the workers put it on their result queue, so when the workers die
    in between, one that is complete on storage is not registered and the group would restart from an older
    one (or from step 0). Every rank reads the same storage (a folder or a URL) and picks the same one."""
    best = None
    if registered is not None:
        best = checkpoint_step(storage.url_of(registered.filesystem, registered.path))
        if best is None:  # a layout this cannot read: Ray Train's choice stands
            return registered
    newer = None
    for name in storage.listdir(run_storage):
        d = storage.join(run_storage, name)
        if name.startswith("checkpoint_") and (step := checkpoint_step(d)) is not None and (best is None or step > best):
            best, newer = step, d
    if newer is None:
        return registered
    log.warning("resuming from %s (step %d): complete on storage, newer than the checkpoint Ray Train registered "
                "(%s)", newer, best, registered.path if registered is not None else "none")
    fs, path = storage.resolve(newer)
    return ray.train.Checkpoint(path, filesystem=fs)


def resume(w: Worker, d: Path) -> None:
    """Step, optimizer and RNG from a checkpoint; sharded model and optimizer state where it has them
    (a checkpoint from before sharding holds the full optimizer state of a DDP run instead)."""
    state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)
    w.start_step = int(state["step"])
    w.ref_from_warmup = (d / REFERENCE_DIR).is_dir()
    if parallel.has_shards(d):
        parallel.load_sharded(w.learner.model, w.learner.optimizer, d)
    else:
        w.learner.optimizer.load_state_dict(state["optimizer"])
    rng = d / "rng" / f"rank{w.rank}.pt"
    rngs = torch.load(rng, weights_only=False) if rng.is_file() else state
    torch.set_rng_state(rngs["torch_rng"])
    random.setstate(rngs["py_rng"])


def publish(w: Worker, version: int, *, restart: bool = False) -> None:
    """The weights to the rollout side in the compute dtype (bf16 halves the bytes), in buckets of
    `publish_bucket_mb`: every rank takes part in gathering each tensor from the FSDP2 shards, rank 0 hands
    each bucket to the weight board as soon as it is full (the board owns the objects, so they outlive this
    worker), then posts the version and tells every rollout actor to load it bucket by bucket. The loads are
    not awaited here: an actor runs rank 0's calls in order, so it loads before rank 0's next generate, and
    any other caller's generate carries min_version and pulls from the board if it got there first."""
    dtype = getattr(torch, w.cfg.dtype)
    if w.cfg.lora_rank:  # the adapter only (a few MB): the actors hold the same base
        state = adapter_on_rank0(w, dtype=dtype)
        buckets = iter([state] if state is not None else [])
    else:
        buckets = parallel.weight_buckets(w.learner.model, dtype=dtype, bucket_bytes=w.cfg.publish_bucket_mb << 20)
    puts, nbytes = [], 0
    for bucket in buckets:  # on ranks > 0 this only runs the gathers
        nbytes += lora.nbytes(bucket)
        if len(puts) >= 2:  # at most two buckets on their way: memory stays bounded, the gathers overlap the puts
            ray.wait([puts[-2]])
        puts.append(w.board.put.remote(parallel.pack_bucket(bucket)))
        del bucket
    if w.rank == 0:
        w.publish_bytes = nbytes
        # one round trip: the board runs the puts in order before this call, and resolves them itself
        refs = ray.get(w.board.publish.remote(version, puts, restart))
        ray.get(w.loading)  # the previous step's loads, long done: surfaces their errors
        w.loading[:] = [a.load_weights.remote(refs, version) for a in w.actors]


def adapter_on_rank0(w: Worker, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The LoRA adapter's tensors on rank 0, None on the others. Under FSDP2 every rank takes part in gathering
    them (a collective); under DDP rank 0 holds them whole and the others do nothing."""
    if w.rank != 0 and not parallel.is_fsdp(w.learner.model):
        return None
    state = lora.adapter_state(w.learner.model, dtype=dtype)
    return state if w.rank == 0 else None


def save_checkpoint(w: Worker, step: int, metrics: dict[str, float]) -> None:
    """Every rank writes its shard of model and optimizer and its RNG state; rank 0 also writes the full
    model as a Hugging Face directory (gathered and written one safetensors file at a time), the tokenizer,
    the step and (after a warm-up) the KL reference. Ray Train merges the ranks' directories into one
    checkpoint."""
    ref = w.learner.ref_model if w.ref_from_warmup and not w.cfg.lora_rank else None
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        parallel.save_sharded(w.learner.model, w.learner.optimizer, d)
        (d / "rng").mkdir()
        torch.save({"torch_rng": torch.get_rng_state(), "py_rng": random.getstate()}, d / "rng" / f"rank{w.rank}.pt")
        if not w.cfg.lora_rank:  # every rank gathers, rank 0 writes one safetensors file at a time
            parallel.save_hf(w.learner.model, d if w.rank == 0 else None)
        if ref is not None:  # the warm-up's reference, gathered the same way when it is sharded
            parallel.save_hf(ref, d / REFERENCE_DIR if w.rank == 0 else None, dtype=getattr(torch, w.cfg.dtype))
        adapter = adapter_on_rank0(w) if w.cfg.lora_rank else None
        if w.rank == 0:
            if w.cfg.lora_rank:  # a PEFT adapter directory (adapter_config.json names the base by its path)
                w.learner.base_model.save_pretrained(d, state_dict=adapter)
                if w.cfg.lora_merged_export:
                    merged = copy.deepcopy(w.learner.base_model).merge_and_unload()
                    merged.save_pretrained(d / "merged")
                    w.tokenizer.save_pretrained(d / "merged")
            w.tokenizer.save_pretrained(d)
            torch.save({"step": step, "config": w.cfg.model_dump(), "strategy": w.cfg.strategy}, d / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def fetch(w: Worker, step: int) -> Collected:
    """This worker's scored shard of `step`: collected now, or (async) taken from the background thread,
    which keeps up to max_staleness steps in flight sampling with the weights of now."""
    def collect_step(s: int, min_version: int) -> Collected:
        return collect(w.cfg, w.dataset, s, rank=w.rank, world=w.world, actors=w.actors,
                       reward_actors=w.reward_actors, min_version=min_version)

    if w.executor is None:
        return collect_step(step, w.version)
    fut = w.pending.pop(step, None) or w.executor.submit(collect_step, step, w.version)
    for ahead in range(step + 1, min(step + w.cfg.max_staleness, w.cfg.num_steps) + 1):
        if ahead not in w.pending:
            w.pending[ahead] = w.executor.submit(collect_step, ahead, w.version)
    got = fut.result()
    if w.version - got.batch.rollout.version > w.cfg.max_staleness:  # a lagging actor: sample fresh
        got = collect_step(step, w.version)
    return got


def train_step(w: Worker, step: int) -> tuple[dict[str, float], Collected]:
    """One GRPO step on this worker: 1-3 sample, score, advantages; 4 update; 5 publish; 6 metrics summed
    across workers (every rank returns the same global values)."""
    cfg, t0 = w.cfg, time.perf_counter()
    memory.reset_peak(w.learner.device)
    got = fetch(w, step)
    staleness = w.version - got.batch.rollout.version
    batch = got.batch
    num_tokens, num_seqs = w.collectives.sum([batch.num_tokens, batch.num_seqs])

    t_train = time.perf_counter()
    w.learner.set_lr(scheduled_lr(cfg, step))
    stats = w.learner.step(batch, num_tokens=num_tokens, num_seqs=num_seqs, world_size=w.world)
    train_s = time.perf_counter() - t_train

    w.version = step
    t_pub = time.perf_counter()
    publish(w, w.version)
    publish_s = time.perf_counter() - t_pub

    r, ro = batch.rewards, batch.rollout
    keys, agent_keys = list(stats), sorted(got.agent or {})
    summed = w.collectives.sum(
        [stats[k] for k in keys]
        + [float(r.sum()), float((r**2).sum()), float(r.numel()), float(ro.num_tokens),
           float(got.reward_errors), float(got.reward_timeouts),
           float(sum(f == "stop" for f in ro.finish_reasons)), float(staleness), float(batch.num_seqs),
           float(got.sampling_rounds)]
        + [got.agent[k] for k in agent_keys]
    )
    (peak,) = w.collectives.max([memory.peak_bytes(w.learner.device) / memory.GIB])  # the fullest rank
    metrics = dict(zip(keys, summed[: len(keys)], strict=True))
    s, s2, n, toks, errs, tos, stops, stale, kept, rounds = summed[len(keys) : len(keys) + 10]
    agent = dict(zip(agent_keys, summed[len(keys) + 10 :], strict=True))
    step_s = time.perf_counter() - t0
    mean = s / n
    metrics.update(
        step=step, reward_mean=mean, reward_std=max(s2 / n - mean**2, 0.0) ** 0.5, completion_tokens=toks,
        completion_len_mean=toks / n, stop_frac=stops / n, reward_errors=errs, reward_timeouts=tos,
        staleness=stale / w.world, kept_frac=kept / n, step_time_s=step_s, train_time_s=train_s,
        rollout_time_s=t_train - t0, gen_time_s=ro.gen_seconds, publish_time_s=publish_s,
        publish_bytes=float(w.publish_bytes), tokens_per_s=toks / step_s, elapsed_s=time.perf_counter() - w.t_start,
        policy_version=w.version, peak_memory_gib=peak,
    )
    if cfg.dynamic_sampling:  # the most refill rounds any worker needed, and how full the batch ended
        metrics.update(sampling_rounds=rounds / w.world, trained_frac=kept / (cfg.prompts_per_step * cfg.group_size))
    if agent:  # multi-turn: how the agent used its tools
        metrics.update(
            tool_use_rate=agent["tool_use"] / n, tool_calls_per_traj=agent["tool_calls"] / n,
            tool_error_rate=agent["tool_errors"] / max(agent["agent_steps"], 1.0),
            steps_per_traj=agent["agent_steps"] / n, env_errors=agent["env_errors"],
            env_reward_mean=agent["env_reward"] / n, trajectories_per_s=n / step_s,
        )
    if w.warmup_loss is not None and step == w.start_step + 1:
        metrics["sft_warmup_loss"] = w.warmup_loss
    return metrics, got


def report_step(w: Worker, step: int, metrics: dict[str, float], got: Collected) -> bool:
    """7. Metrics and trajectories to the driver, which answers with a stop reason (cancel, budget) or None;
    evaluation and a checkpoint when due. Returns True when the run stops after this step."""
    cfg = w.cfg
    evaluating = cfg.eval_size > 0
    checkpoint_due = bool(cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0)
    stop_flag = 0.0
    if w.rank == 0:
        if evaluating and (step == cfg.num_steps or checkpoint_due
                           or (cfg.eval_interval and step % cfg.eval_interval == 0)):
            metrics["eval_reward"] = evaluate(cfg, w.dataset, w.actors, w.reward_actors, w.version)
        stop = ray.get(w.monitor.record.remote(step, metrics, trajectories(got)))
        stop_flag = 1.0 if stop else 0.0
    else:
        ray.get(w.monitor.add_trajectories.remote(trajectories(got)))
    stopping = w.collectives.sum([stop_flag])[0] > 0
    if step == cfg.num_steps or stopping or checkpoint_due:
        if evaluating and "eval_reward" not in metrics and w.rank == 0:
            metrics["eval_reward"] = evaluate(cfg, w.dataset, w.actors, w.reward_actors, w.version)
        metrics.setdefault("eval_reward", float("nan"))
        if w.rank == 0:
            # No checkpoint of a step whose records are not durable: a resume starts after the checkpoint,
            # so records that died in the mailbox with the driver would be lost for good (grpo.report). Every
            # rank posted this step's trajectories before the stop vote above; the others wait in the
            # checkpoint's collectives meanwhile.
            ray.get(w.monitor.wait_stored.remote())
        save_checkpoint(w, step, metrics)
    # Only checkpoint steps call ray.train.report: in Ray 2.60 it is a barrier that waits for the Train
    # controller's poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), longer than a small step.
    # Per-step metrics go to the driver through the RunMonitor instead.
    return stopping


def train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of the TorchTrainer. `config` carries the run config and actor handles."""
    w = setup(config)
    for step in range(w.start_step + 1, w.cfg.num_steps + 1):
        metrics, got = train_step(w, step)
        if report_step(w, step, metrics, got):
            break
    ray.get(w.loading)  # the rollout actors hold the final weights when the run returns
    if w.executor is not None:
        w.executor.shutdown(wait=True, cancel_futures=True)
