"""Training sessions: the engine's model work behind primitives a client drives (bring-your-own-loop).

A client writes the RL loop; a session holds the model on the cluster and runs what the loop asks for:

    forward_backward(data, loss_fn)  log-probs of the targets, loss, gradients accumulated
    optim_step(adam)                 one AdamW step on the whole batch's gradients (summed over the workers)
    sample(prompts, n, ...)          completions from the session's sampler, on the latest weights
    save_state / load_state          model and optimizer (torch.distributed.checkpoint), resumable
    save_weights                     a Hugging Face (or PEFT adapter) directory

Pieces: `SessionWorker` (one per policy worker: the model, its optimizer, a gloo/NCCL group over the
workers; with several workers and no LoRA the model is sharded with FSDP2 as the trainer's policy is,
each worker reading only its rows of the model's files; under LoRA the small adapter's gradients are
all-reduced instead), the sampler (a `RolloutWorker`, the same sampler runs use), and `SessionHost`, one named Ray
actor per session that owns them, places them in one placement group (booked whole, grpo.gang), orders
the training calls by the client's sequence numbers, meters cost and frees everything after an idle
timeout. `app.jobs.sessions` serves them over JSON-RPC; nothing here imports `app`.

Data: a row is a token sequence `tokens` (T ids) and, per target token (T-1 values: position t predicts
tokens[t+1]), `weights` (0 masks the prompt; default 1), `advantages` (or one number for the row) and
`logprobs` (the sampler's). Losses, summed over target tokens and divided by the batch's total weight
(`normalize: "sum"` keeps the plain sum, as Tinker does):
    cross_entropy        -w * logp
    importance_sampling  -w * exp(logp - logprobs) * A
    ppo                  w * clipped surrogate(logp, logprobs, A; clip_low, clip_high)   (0.2, 0.2)
    grpo                 ppo with DAPO's clip-higher (0.2, 0.28), our run's default surrogate
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo import parallel

LOSS_FNS = ("cross_entropy", "importance_sampling", "ppo", "grpo")
NEEDS = {"cross_entropy": (), "importance_sampling": ("advantages", "logprobs"),
         "ppo": ("advantages", "logprobs"), "grpo": ("advantages", "logprobs")}
CLIP = {"ppo": (0.2, 0.2), "grpo": (0.2, 0.28)}
NAMESPACE = "raygrpo"


def host_name(session_id: str) -> str:
    return f"raygrpo-session-{session_id}"


class SessionInputError(ValueError):
    """Bad input from the client, naming the field (`data[2].weights`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:  # crosses Ray's process boundary intact
        return SessionInputError, (self.field, self.reason)


@dataclass
class Limits:
    vocab_size: int
    max_seq_len: int = 2048
    max_rows: int = 1024
    max_tokens: int = 262_144


def check_batch(data: Any, loss_fn: str, loss_config: dict[str, Any], limits: Limits) -> float:
    """Validate a forward_backward batch; returns its total weight (the token-mean denominator)."""
    if not isinstance(loss_config, dict):
        raise SessionInputError("loss_config", "an object (clip_low, clip_high, normalize)")
    if not isinstance(loss_fn, str) or loss_fn not in LOSS_FNS:
        raise SessionInputError("loss_fn", f"unknown loss {loss_fn!r}; one of {', '.join(LOSS_FNS)}")
    unknown = set(loss_config) - {"clip_low", "clip_high", "normalize"}
    if unknown:
        raise SessionInputError("loss_config", f"unknown keys {sorted(unknown)}; known: clip_low, clip_high, normalize")
    if loss_config.get("normalize", "token-mean") not in ("token-mean", "sum"):
        raise SessionInputError("loss_config.normalize", "'token-mean' or 'sum'")
    for k in ("clip_low", "clip_high"):
        v = loss_config.get(k)
        if v is not None and not (isinstance(v, (int, float)) and 0 <= v < 10):
            raise SessionInputError(f"loss_config.{k}", "a number in [0, 10)")
    if not isinstance(data, list) or not data:
        raise SessionInputError("data", "a non-empty list of rows")
    if len(data) > limits.max_rows:
        raise SessionInputError("data", f"{len(data)} rows; at most {limits.max_rows} in one call")
    total_tokens, total_weight = 0, 0.0
    for i, row in enumerate(data):
        where = f"data[{i}]"
        if not isinstance(row, dict):
            raise SessionInputError(where, "an object with `tokens`")
        extra = set(row) - {"tokens", "weights", "advantages", "logprobs"}
        if extra:
            raise SessionInputError(where, f"unknown keys {sorted(extra)}")
        tokens = row.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise SessionInputError(f"{where}.tokens", "a list of token ids (integers)")
        if not 2 <= len(tokens) <= limits.max_seq_len:
            raise SessionInputError(f"{where}.tokens", f"{len(tokens)} tokens; between 2 and {limits.max_seq_len}")
        bad = next((t for t in tokens if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise SessionInputError(f"{where}.tokens", f"token id {bad} is outside the vocabulary (0..{limits.vocab_size - 1})")
        total_tokens += len(tokens)
        n = len(tokens) - 1
        for key in ("weights", "advantages", "logprobs"):
            v = row.get(key)
            if v is None:
                if key in NEEDS[loss_fn]:
                    raise SessionInputError(f"{where}.{key}", f"required by loss {loss_fn!r}")
                continue
            if key == "advantages" and isinstance(v, (int, float)) and not isinstance(v, bool):
                v = [float(v)] * n
            if not isinstance(v, list) or len(v) != n:
                raise SessionInputError(f"{where}.{key}", f"{n} numbers, one per target token (tokens[1:]); "
                                        f"got {len(v) if isinstance(v, list) else type(v).__name__}")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
                raise SessionInputError(f"{where}.{key}", "finite numbers only")
        w = row.get("weights")
        total_weight += float(sum(w)) if w is not None else float(n)
    if total_tokens > limits.max_tokens:
        raise SessionInputError("data", f"{total_tokens} tokens; at most {limits.max_tokens} in one call")
    return total_weight


def _pad(rows: list[dict[str, Any]], key: str, n: int, fill: float) -> torch.Tensor:
    out = torch.full((len(rows), n), fill, dtype=torch.float32)
    for i, r in enumerate(rows):
        v = r.get(key)
        if v is None:
            continue
        t = len(r["tokens"]) - 1
        out[i, :t] = torch.tensor([float(v)] * t if isinstance(v, (int, float)) else v, dtype=torch.float32)
    return out


def row_losses(logp: torch.Tensor, rows: list[dict[str, Any]], loss_fn: str, loss_config: dict[str, Any],
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (B, T-1) and per-token clipped flags for a padded batch; `mask` marks real targets."""
    n = logp.shape[1]
    w = _pad(rows, "weights", n, 1.0) * mask
    if loss_fn == "cross_entropy":
        return -logp * w, torch.zeros_like(w, dtype=torch.bool)
    adv = _pad(rows, "advantages", n, 0.0)
    old = _pad(rows, "logprobs", n, 0.0)
    if loss_fn == "importance_sampling":
        return -torch.exp(logp - old) * adv * w, torch.zeros_like(w, dtype=torch.bool)
    from grpo.loss import clipped_surrogate

    low, high = CLIP[loss_fn]
    loss, clipped = clipped_surrogate(logp, old, adv, float(loss_config.get("clip_low", low)),
                                      float(loss_config.get("clip_high", high)))
    return loss * w, clipped & (w > 0)


class SessionWorker:
    """One policy worker of a session: the model, its AdamW, and (with several) a process group."""

    def __init__(self, model: str, tokenizer: str | None = None, *, rank: int = 0, world: int = 1,
                 dtype: str = "float32", torch_threads: int = 1, lora: dict | None = None, seed: int = 0):
        from transformers import AutoModelForCausalLM

        from grpo.storage import local_copy

        model = local_copy(model)  # a checkpoint at the storage URL (checkpoint:<id>): this node's copy
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.rank, self.world = rank, world
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # fp32 master weights and AdamW state whatever `dtype` says; bfloat16 is the compute dtype (autocast), as
        # in the trainer: bf16 weights would round an lr-1e-6 update away
        self.compute_dtype = dtype
        self.model_path = model
        # Several workers without LoRA shard the model with FSDP2 once their process group exists (`join`):
        # until then the model is only its structure on the meta device (grpo.loading), no weights.
        self.sharded = world > 1 and lora is None
        if self.sharded:
            from grpo.loading import empty_model

            self.model = empty_model(model, torch.float32)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(self.device)
        self.lora = lora
        if lora is not None:
            from grpo.lora import add_adapter

            self.model = add_adapter(self.model, lora)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0

    # ---- group -------------------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def join(self, ip: str, port: int) -> int:
        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    init_method=f"tcp://{ip}:{port}", rank=self.rank, world_size=self.world)
        if self.sharded and not parallel.is_fsdp(self.model):
            self._shard()
        return self.rank

    def _shard(self) -> None:
        """FSDP2 over the session's workers, as the trainer's policy: fp32 master shards, bf16 compute when
        asked, each worker reading only its rows of the model's safetensors (whole first where the files do
        not cover it)."""
        from grpo import loading

        wrap = functools.partial(parallel.wrap_policy, strategy="fsdp", dtype=self.compute_dtype, device=self.device)
        self.model = loading.sharded(self.model_path, torch.float32, wrap, self.device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    # ---- primitives ----------------------------------------------------------------------------------
    def forward_backward(self, rows: list[dict[str, Any]], loss_fn: str, loss_config: dict[str, Any],
                         denominator: float) -> dict[str, Any]:
        """This worker's share of a batch: gradients accumulate until optim_step."""
        from grpo import logprobs

        if not rows:
            if parallel.is_fsdp(self.model):  # the others gather each layer with this worker: a zero-weight pass
                ids = torch.zeros((1, 2), dtype=torch.long, device=self.device)
                logp, _ = logprobs.token_stats(self.model, ids[:, 1:], input_ids=ids[:, :-1], use_cache=False)
                (logp.sum() * 0.0).backward()
            return {"logprobs": [], "loss": 0.0, "clipped": 0.0, "weight": 0.0}
        lengths = [len(r["tokens"]) for r in rows]
        width = max(lengths)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : lengths[i]] = torch.tensor(r["tokens"])
            attn[i, : lengths[i]] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        with parallel.compute_context(self.model, dtype=self.compute_dtype, device=self.device):
            logp, _ = logprobs.token_stats(self.model, ids[:, 1:], input_ids=ids[:, :-1], attention_mask=attn[:, :-1],
                                           use_cache=False)  # (B, T-1), fp32, no (B, T-1, V) logits
        logp = logp.cpu()
        mask = attn[:, 1:].cpu().float()
        per_tok, clipped = row_losses(logp, rows, loss_fn, loss_config, mask)
        scale = 1.0 if loss_config.get("normalize", "token-mean") == "sum" else 1.0 / max(denominator, 1e-8)
        loss = per_tok.sum() * scale
        # FSDP2's reduce-scatter averages over the workers; the sum is wanted (each worker's loss already
        # carries the whole batch's divisor), so its backward is scaled by the world size
        grad_scale = self.world if parallel.is_fsdp(self.model) else 1
        (loss * grad_scale).to(self.device).backward()
        return {"logprobs": [logp[i, : n - 1].tolist() for i, n in enumerate(lengths)],
                "loss": float(loss.detach()), "clipped": float(clipped.sum()),
                "weight": float((_pad(rows, "weights", logp.shape[1], 1.0) * mask).sum())}

    def optim_step(self, adam: dict[str, Any]) -> dict[str, float]:
        import torch.distributed as dist

        lr = float(adam.get("learning_rate", 1e-4))
        betas = (float(adam.get("beta1", 0.9)), float(adam.get("beta2", 0.95)))
        eps, wd = float(adam.get("eps", 1e-8)), float(adam.get("weight_decay", 0.0))
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
        for g in self.optimizer.param_groups:  # Tinker's shape: the caller sets them every step
            g.update(lr=lr, betas=betas, eps=eps, weight_decay=wd)
        max_norm = adam.get("max_grad_norm")
        if parallel.is_fsdp(self.model):  # the gradients are reduced shards already; the norm is reduced across workers
            norm = torch.tensor(parallel.clip_grad_norm(self.model, float(max_norm or 0)))
        else:
            if self.world > 1:
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)  # sum: each worker's loss already carries the whole batch's divisor
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
                if grads else torch.tensor(0.0)
            if max_norm:
                torch.nn.utils.clip_grad_norm_(self.params, float(max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"grad_norm": float(norm), "learning_rate": lr, "step": self.steps}

    def weights(self) -> dict[str, torch.Tensor]:
        """What the sampler loads: the full state dict, or the adapter's tensors under LoRA; from rank 0 (under
        FSDP2 every worker must call this: they gather together; the others return nothing)."""
        if parallel.is_fsdp(self.model):
            return parallel.full_state_dict(self.model, dtype=getattr(torch, self.compute_dtype))
        if self.rank != 0:
            return {}
        if self.lora is not None:
            from grpo.lora import adapter_state

            return adapter_state(self.model, dtype=getattr(torch, self.compute_dtype))
        dtype = getattr(torch, self.compute_dtype)  # what the sampler holds: half the bytes in bf16
        return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype, copy=True)
                for k, v in self.model.state_dict().items()}

    def _optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:  # a state saved before the first step still has an optimizer to load into
            self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        return self.optimizer

    def save_state(self, path: str) -> int:
        parallel.save_sharded(self.model, self._optimizer(), Path(path))
        if self.rank == 0:
            (Path(path) / "session_state.json").write_text(f'{{"steps": {self.steps}}}')
        return self.steps

    def load_state(self, path: str) -> int:
        import json

        parallel.load_sharded(self.model, self._optimizer(), Path(path))
        self.steps = int(json.loads((Path(path) / "session_state.json").read_text())["steps"])
        return self.steps

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state as plain tensors (tests compare two sessions' after a load)."""
        return {} if self.optimizer is None else self.optimizer.state_dict()

    def save_weights(self, path: str, tokenizer: str) -> str:
        """A Hugging Face directory (a PEFT one under LoRA), written by rank 0; under FSDP2 every worker calls
        this (the gathers)."""
        from transformers import AutoTokenizer

        if parallel.is_fsdp(self.model):
            parallel.save_hf(self.model, Path(path) if self.rank == 0 else None)
        elif self.rank == 0:
            self.model.save_pretrained(path)
        if self.rank == 0:
            from grpo.storage import local_copy

            AutoTokenizer.from_pretrained(local_copy(tokenizer)).save_pretrained(path)
        return path


class SessionHost:
    """One session on the cluster (a named, detached Ray actor; it needs no CPU itself)."""

    def __init__(self, session_id: str, spec: dict[str, Any]):
        self.id, self.spec = session_id, spec
        self.state = "starting"
        self.error: str | None = None
        self.workers: list[Any] = []
        self.sampler: Any = None
        self.pg: Any = None
        self.version = 0  # optimizer steps taken
        self.generation = 0  # changes of the weights (steps and loads): what a policy server following it compares
        self.sampler_version = 0
        self.done_seq = 0  # every numbered call up to this one is done
        self.finished: set[int] = set()  # done (or skipped) after a gap
        self.seq_cv = threading.Condition()
        self.train_lock = threading.Lock()
        self.sample_lock = threading.Lock()
        self.last_used = time.monotonic()
        self.in_flight = 0  # primitives running or waiting their turn: never idle while there are any
        self.held_since: float | None = None
        self.limits: Limits | None = None
        threading.Thread(target=self._start, name="session-start", daemon=True).start()
        threading.Thread(target=self._watch_idle, name="session-idle", daemon=True).start()

    # ---- life ------------------------------------------------------------------------------------
    def _start(self) -> None:
        """Book the resources, place them, start the workers and the sampler; then active (or, if the session
        was closed while it started, freed again)."""
        try:
            if not self._place():
                return
            self._spawn()
            if self.state == "starting":
                self.state = "active"
                self.last_used = time.monotonic()
            else:  # closed while it started: what it made goes too
                self._free(self.state)
        except Exception as e:  # a worker that cannot load the model, a placement group never granted
            self.error = f"{type(e).__name__}: {e}"
            self._free("failed")

    def _sizes(self) -> tuple[int, float, float]:
        s = self.spec
        return int(s.get("num_workers", 1)), float(s.get("cpus_per_worker", 1.0)), float(s.get("gpus_per_worker", 0.0))

    def _place(self) -> bool:
        """The gang booking (grpo.gang: waits while the cluster cannot hold it), then one placement group of
        a bundle per worker and one for the sampler. False: the session ended while it waited."""
        import ray
        from ray.util.placement_group import placement_group

        from grpo.gang import Booking

        n, cpus, gpus = self._sizes()
        booking = Booking(f"session-{self.id}", {"CPU": cpus * (n + 1), "GPU": gpus * (n + 1)})
        while not booking.try_book():
            if self.state in ("closed", "expired", "failed"):
                return False
            self.state, self.error = "waiting", booking.reason
            time.sleep(0.5)
        if self.state in ("closed", "expired", "failed"):
            booking.release()
            return False
        self.state, self.error = "starting", None
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([bundle] * (n + 1), strategy="PACK", name=host_name(self.id))
        ray.get(self.pg.ready(), timeout=float(self.spec.get("start_timeout_s", 600)))
        self.held_since = time.monotonic()
        booking.release()
        return True

    def _spawn(self) -> None:
        """The training workers (bundles 0..n-1, joined in one process group when n > 1) and the sampler
        (bundle n); the input limits from the model's vocabulary."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from grpo.rollout import RolloutWorker

        s = self.spec
        n, cpus, gpus = self._sizes()

        def at(i: int) -> Any:
            return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=i)

        threads = int(s.get("torch_threads", 1))
        worker_cls = ray.remote(num_cpus=cpus, num_gpus=gpus)(SessionWorker)
        self.workers = [worker_cls.options(scheduling_strategy=at(i)).remote(
            s["model"], s.get("tokenizer"), rank=i, world=n, dtype=s.get("dtype", "float32"), torch_threads=threads,
            lora=s.get("lora"), seed=int(s.get("seed", 0))) for i in range(n)]
        sampler_cls = ray.remote(num_cpus=cpus, num_gpus=gpus)(RolloutWorker)
        self.sampler = sampler_cls.options(scheduling_strategy=at(n)).remote(
            s["model"], s.get("tokenizer"), dtype=s.get("dtype", "float32"), torch_threads=threads,
            max_prompt_tokens=int(s.get("max_prompt_tokens", 1024)), chat_template=s.get("chat_template"),
            lora=s.get("lora"))
        if n > 1:
            ip, port = ray.get(self.workers[0].address.remote())
            ray.get([w.join.remote(ip, port) for w in self.workers])
        self.limits = Limits(vocab_size=ray.get(self.workers[0].vocab_size.remote()),
                             max_seq_len=int(s.get("max_seq_len", 2048)), max_rows=int(s.get("max_rows", 1024)),
                             max_tokens=int(s.get("max_tokens", 262_144)))
        ray.get(self.sampler.ping.remote())

    def _watch_idle(self) -> None:
        """Free everything after `idle_timeout_s` without a call; the host itself (no CPU, only the final
        status for the API to read) goes `linger_s` after the session ended."""
        import ray

        idle = float(self.spec.get("idle_timeout_s", 600))
        while self.state not in ("closed", "expired", "failed"):
            time.sleep(min(1.0, idle / 4))
            if self.state == "active" and not self.in_flight and time.monotonic() - self.last_used > idle:
                self.error = f"idle for more than {idle:g} s"
                self._free("expired")
        time.sleep(float(self.spec.get("linger_s", 600)))
        ray.kill(ray.get_runtime_context().current_actor)

    def _free(self, state: str) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.held_since is not None:
            self.spent_s = time.monotonic() - self.held_since
        self.state = state
        for a in [*self.workers, self.sampler]:
            if a is not None:
                ray.kill(a)
        self.workers, self.sampler = [], None
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    def close(self, reason: str = "closed") -> dict[str, Any]:
        if self.state not in ("closed", "expired", "failed"):
            self._free("closed")
            self.error = None if reason == "closed" else reason
        return self.status()

    def held_seconds(self) -> float:
        if self.held_since is None:
            return 0.0
        return getattr(self, "spent_s", None) or (time.monotonic() - self.held_since)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error, "version": self.version, "generation": self.generation,
                "sampler_version": self.sampler_version,
                "done_seq": self.done_seq, "held_s": round(self.held_seconds(), 3),
                "idle_s": round(time.monotonic() - self.last_used, 3),
                "vocab_size": self.limits.vocab_size if self.limits else None}

    # ---- ordering ----------------------------------------------------------------------------------
    def _finish(self, seq: int) -> None:
        """Call `seq` is done (or skipped): the calls after it may run, in order."""
        with self.seq_cv:
            self.finished.add(seq)
            while self.done_seq + 1 in self.finished:
                self.done_seq += 1
                self.finished.discard(self.done_seq)
            self.seq_cv.notify_all()

    def skip(self, seq: int) -> int:
        """A numbered call the API refused before it got here: the calls after it must not wait for it."""
        if seq > self.done_seq and seq not in self.finished:
            self._finish(seq)
        return self.done_seq

    def _ordered(self, seq: int | None, fn: Any) -> Any:
        """Run a training call after every call the client numbered before it (`seq` 1, 2, ...). A call that
        fails (bad input included) still counts as done, so the ones after it run."""
        timeout = float(self.spec.get("order_timeout_s", 300))
        if seq is not None:
            with self.seq_cv:
                if seq <= self.done_seq or seq in self.finished:
                    raise SessionInputError("seq", f"{seq} was already used (the session has done {self.done_seq})")
                if not self.seq_cv.wait_for(lambda: self.done_seq == seq - 1 or self.state != "active", timeout):
                    self._finish(seq)
                    raise SessionInputError("seq", f"call {seq} waited {timeout:g} s for call {self.done_seq + 1}")
        try:
            with self.train_lock:
                self._check_active()
                self.last_used = time.monotonic()
                return fn()
        finally:
            self.last_used = time.monotonic()
            if seq is not None:
                self._finish(seq)

    def _check_active(self) -> None:
        if self.state != "active":
            raise RuntimeError(f"session is {self.state}" + (f": {self.error}" if self.error else ""))

    # ---- primitives ----------------------------------------------------------------------------------
    def call(self, method: str, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """A primitive and the session's status after it, in one round trip (what the API stores)."""
        if method not in ("forward_backward", "optim_step", "sample", "save_state", "load_state", "save_weights"):
            raise SessionInputError("method", f"{method!r} is not a primitive")
        from ray.exceptions import RayActorError

        with self.seq_cv:
            self.in_flight += 1
        try:
            out = getattr(self, method)(*args, **kwargs)
        except RayActorError as e:  # a worker or the sampler died (out of memory, a lost node): the session is over
            self.error = f"a worker of the session died: {str(e).splitlines()[0][:300]}"
            self._free("failed")
            raise RuntimeError(f"session is failed: {self.error}") from None
        finally:
            with self.seq_cv:
                self.in_flight -= 1
                self.last_used = time.monotonic()
        return out, self.status()

    def forward_backward(self, data: list[dict[str, Any]], loss_fn: str, loss_config: dict[str, Any] | None = None,
                         seq: int | None = None) -> dict[str, Any]:
        import ray

        loss_config = loss_config or {}

        def go() -> dict[str, Any]:
            denominator = check_batch(data, loss_fn, loss_config, self.limits)
            t0 = time.perf_counter()
            n = len(self.workers)
            shards = [data[i::n] for i in range(n)]  # round-robin: every worker gets a share of a small batch
            outs = ray.get([w.forward_backward.remote(sh, loss_fn, loss_config, denominator)
                            for w, sh in zip(self.workers, shards, strict=True)])
            logprobs: list[list[float]] = [[] for _ in data]
            for i, out in enumerate(outs):
                for j, lp in enumerate(out["logprobs"]):
                    logprobs[i + j * n] = lp
            weight = sum(o["weight"] for o in outs)
            return {"logprobs": logprobs, "metrics": {
                "loss": sum(o["loss"] for o in outs), "num_rows": len(data),
                "num_target_tokens": sum(len(r["tokens"]) - 1 for r in data), "total_weight": weight,
                "clip_fraction": sum(o["clipped"] for o in outs) / weight if weight else 0.0,
                "seconds": time.perf_counter() - t0}}

        return self._ordered(seq, go)

    def optim_step(self, adam: dict[str, Any], seq: int | None = None) -> dict[str, Any]:
        import ray

        def go() -> dict[str, Any]:
            outs = ray.get([w.optim_step.remote(adam) for w in self.workers])
            self.version = int(outs[0]["step"])
            self.generation += 1
            return {"step": self.version, "metrics": {"grad_norm": outs[0]["grad_norm"],
                                                      "learning_rate": outs[0]["learning_rate"]}}

        return self._ordered(seq, go)

    def _weight_refs(self) -> list:
        """Every worker's `weights` call (under FSDP2 they gather together); rank 0's, first, holds them."""
        return [w.weights.remote() for w in self.workers]

    def _publish(self) -> None:
        import ray

        if self.sampler_version != self.version:
            version = self.version
            refs = self._weight_refs()
            ray.get(self.sampler.load_weights.remote(refs[0], version))
            ray.get(refs[1:])
            self.sampler_version = version

    def sample(self, prompts: list[str] | None = None, prompt_tokens: list[list[int]] | None = None, *, n: int = 1,
               max_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
               after_seq: int | None = None) -> dict[str, Any]:
        """`n` completions per prompt on the weights of every optim_step the client sent before (`after_seq`)."""
        import ray

        self._check_active()
        if after_seq:
            with self.seq_cv:
                self.seq_cv.wait_for(lambda: self.done_seq >= after_seq or self.state != "active",
                                     float(self.spec.get("order_timeout_s", 300)))
        if prompt_tokens is not None:
            bad = next(((i, t) for i, p in enumerate(prompt_tokens) for t in p if not 0 <= t < self.limits.vocab_size), None)
            if bad is not None:
                raise SessionInputError(f"prompt_tokens[{bad[0]}]", f"token id {bad[1]} is outside the vocabulary "
                                        f"(0..{self.limits.vocab_size - 1})")
        with self.sample_lock:
            self._check_active()
            self.last_used = time.monotonic()
            with self.train_lock:  # weights of a finished step, never of one half-applied
                self._publish()
                version = self.sampler_version
            t0 = time.perf_counter()
            ro = ray.get(self.sampler.generate.remote(
                prompts,
                prompt_ids=prompt_tokens, group_size=n, max_new_tokens=max_tokens, temperature=temperature,
                top_p=top_p, seed=seed, min_version=0))
            self.last_used = time.monotonic()
        out = []
        for i in range(ro.completion_ids.shape[0]):
            live = ro.completion_mask[i]
            out.append({"prompt_index": i // n, "prompt_tokens": ro.prompt_ids[i // n],
                        "tokens": ro.completion_ids[i][live].tolist(), "logprobs": ro.logprobs[i][live].tolist(),
                        "text": ro.texts[i], "finish_reason": ro.finish_reasons[i]})
        return {"samples": out, "weights_version": version, "seconds": time.perf_counter() - t0}

    def save_state(self, path: str, seq: int | None = None) -> dict[str, Any]:
        import ray

        def go() -> dict[str, Any]:
            os.makedirs(path, exist_ok=True)
            ray.get([w.save_state.remote(path) for w in self.workers])
            return {"step": self.version}

        return self._ordered(seq, go)

    def load_state(self, path: str, seq: int | None = None) -> dict[str, Any]:
        import ray

        def go() -> dict[str, Any]:
            steps = ray.get([w.load_state.remote(path) for w in self.workers])
            self.version = int(steps[0])
            self.generation += 1
            self.sampler_version = -1  # the sampler takes the loaded weights at the next sample
            return {"step": self.version}

        return self._ordered(seq, go)

    def save_weights(self, path: str, seq: int | None = None) -> dict[str, Any]:
        import ray

        def go() -> dict[str, Any]:
            tokenizer = self.spec.get("tokenizer") or self.spec["model"]
            ray.get([w.save_weights.remote(path, tokenizer) for w in self.workers])
            return {"path": path, "step": self.version}

        return self._ordered(seq, go)

    def optimizer_state(self) -> Any:
        import ray

        return ray.get(self.workers[0].optimizer_state.remote())

    def weights_ref(self) -> tuple[int, Any]:
        """(generation, object ref of the newest weights) for a policy server following this session."""
        with self.train_lock:
            self._check_active()
            return self.generation, self._weight_refs()[0]


def start_host(session_id: str, spec: dict[str, Any]) -> Any:
    import ray

    return ray.remote(num_cpus=0, max_concurrency=16)(SessionHost).options(
        name=host_name(session_id), namespace=NAMESPACE, lifetime="detached").remote(session_id, spec)


def get_host(session_id: str) -> Any | None:
    import ray

    try:
        return ray.get_actor(host_name(session_id), namespace=NAMESPACE)
    except ValueError:
        return None
