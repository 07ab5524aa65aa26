"""The memory plan: what one run will hold on each device, predicted before anything starts.

`plan(cfg, dims, device_memory_gib=...)` reads the model's dimensions (`ModelDims.from_config`: only its
`config.json`, no weights) and the run config (strategy, world size, dtypes, micro-batch, lengths, KL,
LoRA, activation checkpointing, log-prob chunk) and adds up, per policy worker and per rollout actor, the
bytes that exist at the step's peak:

- training state: fp32 master weights, fp32 gradients and AdamW's two fp32 moments (16 bytes a trainable
  parameter, 4 a frozen one): whole on every DDP rank (plus DDP's gradient buckets, another 4), 1/N of it on
  each FSDP2 rank;
- FSDP2's working set: the root (embeddings, head) gathered for the step in the compute dtype, and two
  decoder layers gathered at a time (the one running and the one prefetched); the root's unsharded gradient
  and its fp32 reduce-scatter input at the end of the backward (at a 152k vocabulary and untied head, the
  largest transient of a 7B step);
- DDP under bf16 autocast: the bf16 copy of every weight autocast keeps for the backward;
- the frozen KL reference (compute dtype): whole on every DDP rank, 1/N of it on each FSDP2 rank;
- activations of one micro-batch: every layer's saved tensors, or with activation checkpointing each
  layer's input plus one layer being recomputed; the log-prob head's one chunk of logits (grpo.logprobs);
- publishing: one gathered tensor and one bucket (grpo.parallel.weight_buckets);
- the runtime: CUDA context and allocator slack on a GPU, the interpreter and its libraries on a CPU.

A rollout actor holds the model in the compute dtype, the KV cache of its batch, a row of logits per
sequence, and one bucket of the next weights. The figures are estimates meant to be within about 20 % of
the measured peak (docs/benchmarks.md has the measurements); `fits` leaves `HEADROOM` of the device free.

`raygrpo plan JOB.yaml` and `python -m grpo.memplan` print it; `grpo.run` refuses a run whose plan does not
fit the device memory it knows (`device_memory_gib`, or the GPU model Ray reports), naming the knob to turn.

Not here: measuring memory (grpo.memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
HEADROOM = 0.05
"""the share of device memory the plan keeps free (fragmentation, temporary buffers it does not count)"""
GPU_RUNTIME_GIB = 1.5
"""CUDA context, NCCL communicators and the caching allocator's slack on each GPU"""
CPU_RUNTIME_GIB = 0.48
"""a Ray Train worker's resident set once it has imported the engine (Python, torch, transformers, Ray), joined
its gloo group and loaded the tokenizer and dataset, before a model: 0.475 GiB measured on the CPU machine of
docs/benchmarks.md"""

# Device memory of the GPUs Ray names in its `accelerator_type:<name>` resources, GiB (datasheets).
ACCELERATOR_GIB = {"A10G": 24, "L4": 24, "L40S": 48, "A100-40G": 40, "A100-80G": 80, "A100": 80, "H100": 80,
                   "H200": 141, "B200": 180, "V100": 16, "T4": 16}


@dataclass(frozen=True)
class ModelDims:
    """What a decoder-only causal LM's memory depends on, from its config.json."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool = False
    qkv_bias: bool = False
    model_type: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any] | str | Path) -> ModelDims:
        """From a config dict, a config.json file, or a model directory holding one."""
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise ValueError(f"{path}: no config.json to read the model's dimensions from")
            config = json.loads(path.read_text())
        c = config.get("text_config", config)  # multimodal configs nest the language model's
        try:
            hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            dims = cls(vocab=int(c["vocab_size"]), hidden=hidden, layers=int(c["num_hidden_layers"]),
                       intermediate=int(c.get("intermediate_size") or 4 * hidden), heads=heads,
                       kv_heads=int(c.get("num_key_value_heads") or heads),
                       tied=bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", False))),
                       qkv_bias=bool(c.get("attention_bias", False)) or c.get("model_type") == "qwen2",
                       model_type=str(c.get("model_type", "")))
        except KeyError as e:
            raise ValueError(f"config.json has no {e.args[0]}: not a decoder-only causal LM this plan knows") from None
        return dims

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * h * self.intermediate + 2 * h  # + SwiGLU MLP + two RMSNorms

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)  # input embedding (+ an untied head)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params + self.hidden

    def lora_params(self, rank: int, targets: list[str] | str | None) -> int:
        """Trainable parameters of a LoRA adapter of `rank` on the named projections of every layer."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        names = (["q_proj", "v_proj"] if not targets  # PEFT's default for Llama and Qwen2
                 else list(shapes) if targets in ("all-linear", ["all-linear"]) else [targets] if isinstance(targets, str)
                 else targets)
        return self.layers * sum(rank * sum(shapes[n]) for n in names if n in shapes)


@dataclass
class Part:
    name: str
    bytes: float
    why: str
    phase: str = "held"
    """held: through the whole step; otherwise the phase that holds it ("update", "publish", "generate"): phases
    take turns, so the peak is what is held plus the largest phase"""


@dataclass
class RolePlan:
    role: str
    parts: list[Part] = field(default_factory=list)

    def add(self, name: str, nbytes: float, why: str, phase: str = "held") -> None:
        if nbytes > 0:
            self.parts.append(Part(name, float(nbytes), why, phase))

    def phase_gib(self, phase: str) -> float:
        return sum(p.bytes for p in self.parts if p.phase == phase) / GIB

    @property
    def total_gib(self) -> float:
        phases = {p.phase for p in self.parts} - {"held"}
        return self.phase_gib("held") + max((self.phase_gib(ph) for ph in phases), default=0.0)


@dataclass
class Plan:
    dims: ModelDims
    strategy: str
    world: int
    device: str  # "gpu" | "cpu"
    device_memory_gib: float | None
    policy: RolePlan
    rollout: RolePlan
    load_gib: float
    """a policy worker's peak while it loads: its shards under FSDP2 (read by rows), the whole model under DDP"""
    advice: list[str] = field(default_factory=list)

    @property
    def policy_peak_gib(self) -> float:
        return max(self.policy.total_gib, self.load_gib)

    @property
    def usable_gib(self) -> float | None:
        return None if self.device_memory_gib is None else self.device_memory_gib * (1 - HEADROOM)

    @property
    def fits(self) -> bool | None:
        if self.usable_gib is None:
            return None
        return self.policy_peak_gib <= self.usable_gib and self.rollout.total_gib <= self.usable_gib

    def as_dict(self) -> dict[str, Any]:
        def role(r: RolePlan) -> dict[str, Any]:
            return {"peak_gib": round(r.total_gib, 3),
                    "parts": {p.name: {"gib": round(p.bytes / GIB, 3), "phase": p.phase} for p in r.parts}}

        return {"params": self.dims.params, "strategy": self.strategy, "world": self.world, "device": self.device,
                "device_memory_gib": self.device_memory_gib, "fits": self.fits, "policy_worker": role(self.policy),
                "policy_load_gib": round(self.load_gib, 3), "rollout_actor": role(self.rollout),
                "advice": self.advice}

    def message(self) -> str:
        """One line for a refusal: the number, the device, the knob."""
        need = max(self.policy_peak_gib, self.rollout.total_gib)
        who = "policy worker" if self.policy_peak_gib >= self.rollout.total_gib else "rollout actor"
        text = (f"needs {need:.1f} GiB per {'GPU' if self.device == 'gpu' else 'worker'} ({who}), has "
                f"{self.device_memory_gib:g} ({self.usable_gib:.1f} usable)")
        return text + (": " + "; or ".join(self.advice) if self.advice else "")


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def _policy(cfg: Any, d: ModelDims, strategy: str, world: int, device: str) -> tuple[RolePlan, float]:
    c = _bytes(cfg.dtype)
    p = d.params
    shard = world if strategy == "fsdp" else 1
    lora = bool(getattr(cfg, "lora_rank", 0))
    trainable = d.lora_params(cfg.lora_rank, getattr(cfg, "lora_target_modules", None)) if lora else p
    r = RolePlan("policy worker")
    r.add("weights", 4 * p / shard, "fp32 master weights" + (" (1/N each)" if shard > 1 else ""))
    r.add("gradients", 4 * trainable / shard, "fp32 (freed after the optimizer step)", "update")
    r.add("optimizer", 8 * trainable / shard, "AdamW's two fp32 moments")
    if strategy == "ddp" and world > 1:
        r.add("ddp_buckets", 4 * trainable, "DDP's gradient buckets")
    if strategy == "fsdp":
        r.add("gathered", (d.embed_params + 2 * d.layer_params) * c + 4 * d.layer_params,
              "the root and two layers unsharded, one layer's gradient before its reduce-scatter", "update")
        r.add("root_grad", (c + 4) * d.embed_params,
              "the root's (embeddings, head) unsharded gradient and its fp32 reduce-scatter input", "update")
    elif cfg.dtype == "bfloat16":
        r.add("autocast", 2 * p, "bf16 copies autocast keeps for the backward", "update")
    if cfg.kl_coef > 0 and not lora:
        r.add("reference", c * p / shard, "the frozen KL reference" + (", sharded (1/N each)" if shard > 1
                                                                          else ", whole"))
    g = cfg.group_size
    rows = max(1, cfg.micro_batch_size // g) * g
    t_all = cfg.max_prompt_tokens + cfg.max_new_tokens
    tokens = rows * t_all
    per_layer = tokens * (10 * d.hidden + 4 * d.intermediate) * c  # q,k,v, attention out, norms, MLP in/outs
    if cfg.activation_checkpointing_for(strategy):
        r.add("activations", d.layers * tokens * d.hidden * c + per_layer,
              "each layer's input, one layer recomputed (activation checkpointing)", "update")
    else:
        r.add("activations", d.layers * per_layer, "every layer's saved tensors of one micro-batch", "update")
    chunk = min(cfg.logprob_chunk_tokens, rows * cfg.max_new_tokens)
    r.add("logprob_head", chunk * d.vocab * 4 * 4, "one chunk of fp32 logits, its softmax and gradient", "update")
    largest = d.vocab * d.hidden
    if device == "cpu":
        r.add("publish", 2 * _bucket(cfg, d, c) + largest * c, "one bucket, its serialized copy, one gathered tensor",
              "publish")
    else:
        r.add("publish", largest * c, "one gathered tensor (the bucket is host memory)", "publish")
    r.add("runtime", _runtime(device), "interpreter and libraries" if device == "cpu"
          else "CUDA context, NCCL, allocator slack")
    ref = c * p / shard if cfg.kl_coef > 0 and not lora else 0
    if shard > 1:  # built on the meta device (a LoRA adapter on it too), each rank reads its rows (grpo.loading)
        load = 4 * p / shard + 4 * largest / shard
    elif device == "cpu":  # the whole fp32 model read into host memory
        load = 4 * p + 4 * p / shard
    else:  # DDP moves it all to the device
        load = 4 * p
    return r, (load + ref + _runtime(device)) / GIB


def _bucket(cfg: Any, d: ModelDims, c: int) -> float:
    """One publish bucket: `publish_bucket_mb`, or the whole model when it is smaller."""
    return min(cfg.publish_bucket_mb * 2**20, d.params * c)


def _runtime(device: str) -> float:
    return (CPU_RUNTIME_GIB if device == "cpu" else GPU_RUNTIME_GIB) * GIB


def _rollout(cfg: Any, d: ModelDims, device: str, rollout_dtype: str) -> RolePlan:
    c = _bytes(rollout_dtype)
    r = RolePlan("rollout actor")
    r.add("weights", c * d.params, f"the policy in {rollout_dtype}")
    prompts = -(-cfg.prompts_per_step // max(1, cfg.num_rollout_workers))
    rows = prompts * cfg.group_size
    t_all = cfg.max_prompt_tokens + cfg.max_new_tokens
    r.add("kv_cache", rows * t_all * d.layers * 2 * d.kv_heads * d.head_dim * c, "keys and values of the batch",
          "generate")
    r.add("logits", rows * d.vocab * 4 * 3, "a row of fp32 logits per sequence, sampled", "generate")
    r.add("prefill", rows * cfg.max_prompt_tokens * (4 * d.hidden + 2 * d.intermediate) * c,
          "one layer's prompt pass", "generate")
    r.add("publish", _bucket(cfg, d, c), "one bucket of the next weights", "publish")
    r.add("runtime", _runtime(device), "")
    return r


def plan(cfg: Any, dims: ModelDims, *, device_memory_gib: float | None = None, strategy: str | None = None,
         device: str | None = None, with_advice: bool = True) -> Plan:
    """The plan of `cfg` (a GRPOConfig) for a model of `dims`. `strategy` overrides cfg's (auto resolved
    here); `device` is "gpu" or "cpu" (default: gpu when the config asks for GPUs). A plan that does not fit
    carries advice unless `with_advice` is off (the advice's own trial plans)."""
    device = device or ("gpu" if cfg.gpus_per_worker > 0 else "cpu")
    world = cfg.num_policy_workers
    strategy = strategy or cfg.strategy
    if strategy == "auto":
        strategy = choose_strategy(cfg, dims, device_memory_gib=device_memory_gib, device=device)
    rollout_dtype = "bfloat16" if cfg.dtype == "bfloat16" else "float32"
    policy, load = _policy(cfg, dims, strategy, world, device)
    out = Plan(dims=dims, strategy=strategy, world=world, device=device, device_memory_gib=device_memory_gib,
               policy=policy, rollout=_rollout(cfg, dims, device, rollout_dtype), load_gib=load)
    if with_advice and out.fits is False:
        out.advice = advise(cfg, dims, out)
    return out


def choose_strategy(cfg: Any, dims: ModelDims, *, device_memory_gib: float | None, device: str) -> str:
    """`strategy: auto`: DDP when a whole replica's training state fits one device (or nothing says how
    much a device has), FSDP2 when it would not (with LoRA: when the frozen base alone does not fit)."""
    if cfg.num_policy_workers == 1 or device_memory_gib is None:
        return "ddp"
    replica, _ = _policy(cfg, dims, "ddp", cfg.num_policy_workers, device)
    return "ddp" if replica.total_gib <= device_memory_gib * (1 - HEADROOM) else "fsdp"


def advise(cfg: Any, dims: ModelDims, p: Plan) -> list[str]:
    """What to turn so it fits, each checked against the plan: the rollout actors' count for them; for the
    policy workers the strategy, the micro-batch, more workers, bf16, or a micro-batch and workers together."""
    usable = p.usable_gib
    if usable is None:
        return []
    out = []

    def trial(**update: Any) -> Plan:
        return plan(cfg.model_copy(update=update), dims, device_memory_gib=p.device_memory_gib,
                    strategy=update.get("strategy", p.strategy), device=p.device, with_advice=False)

    def policy_fits(**update: Any) -> bool:
        return trial(**update).policy_peak_gib <= usable

    if p.rollout.total_gib > usable:
        n = next((n for n in (2, 4, 8, 16, 32, 64) if n > cfg.num_rollout_workers
                  and trial(num_rollout_workers=n).rollout.total_gib <= usable), None)
        out.append(f"use {n} rollout actors (num_rollout_workers)" if n else
                   "the rollout actors need a device with more memory or a smaller model")
    if p.policy_peak_gib <= usable:
        return out
    g, found = cfg.group_size, []
    if p.strategy == "ddp" and not getattr(cfg, "lora_rank", 0) and cfg.num_policy_workers > 1 \
            and policy_fits(strategy="fsdp"):
        found.append("use strategy fsdp (or auto)")
    mbs = cfg.micro_batch_size
    while mbs > g:
        mbs = max(g, mbs // 2)
        if policy_fits(micro_batch_size=mbs):
            found.append(f"lower micro_batch_size to {mbs}")
            break
    workers = [n for n in range(cfg.num_policy_workers + 1, 8 * cfg.num_policy_workers + 1)
               if cfg.prompts_per_step % n == 0]
    if p.strategy == "fsdp":
        n = next((n for n in workers if policy_fits(num_policy_workers=n)), None)
        if n is None:
            n = next((n for n in workers if policy_fits(num_policy_workers=n, micro_batch_size=g)), None)
            if n is not None:
                found.append(f"lower micro_batch_size to {g} and use {n - cfg.num_policy_workers} more policy "
                             f"workers ({n})")
        else:
            found.append(f"use {n - cfg.num_policy_workers} more policy workers ({n})")
    if cfg.dtype != "bfloat16" and policy_fits(dtype="bfloat16"):
        found.append("compute in bfloat16 (dtype)")
    return out + (found or ["the policy workers need a device with more memory or a smaller model"])


def device_memory_from_cluster(resources: dict[str, float]) -> float | None:
    """GiB per GPU from the `accelerator_type:<name>` resource Ray puts on GPU nodes, when it is one we know."""
    for key in resources:
        if key.startswith("accelerator_type:"):
            name = key.split(":", 1)[1].upper()
            for known, gib in sorted(ACCELERATOR_GIB.items(), key=lambda kv: -len(kv[0])):
                if name.startswith(known.upper()):
                    return float(gib)
    return None


# start_grpo's `config` keys that the plan depends on, and the engine keys they are (app.jobs.training.MAPPED)
JOB_KEYS = {"model": "model", "batch_size": "prompts_per_step", "n_trajectories_per_query": "group_size",
            "max_new_tokens": "max_new_tokens", "kl_coef": "kl_coef", "num_policy_workers": "num_policy_workers",
            "num_rollout_workers": "num_rollout_workers", "gpus_per_worker": "gpus_per_worker",
            "lora_rank": "lora_rank", "lora_target_modules": "lora_target_modules"}


def config_from_spec(spec: dict[str, Any]) -> Any:
    """A GRPOConfig from a `raygrpo submit` file (training.start_grpo params: `config` with its `engine`
    keys) or from a `grpo.run` YAML (engine keys at the top level), for planning only: nothing is loaded."""
    from grpo.config import load_config

    if isinstance(spec.get("config"), dict):
        c = spec["config"]
        data = {JOB_KEYS[k]: v for k, v in c.items() if k in JOB_KEYS and v is not None}
        data.update({k: v for k, v in (c.get("engine") or {}).items() if k not in ("dataset", "output_dir")})
    else:
        data = {k: v for k, v in spec.items() if k not in ("dataset", "output_dir")}
    data.setdefault("model", "unknown")  # the server's default model: the caller names its config.json
    data.pop("reward_source", None)
    return load_config(None, data)


def render(p: Plan) -> str:
    """The plan as text: each role's parts, its peak, and the verdict."""
    lines = [f"model: {p.dims.params / 1e9:.2f}B parameters ({p.dims.layers} layers, hidden {p.dims.hidden}, "
             f"vocabulary {p.dims.vocab}); strategy {p.strategy} on {p.world} policy worker(s), {p.device}"]
    for role in (p.policy, p.rollout):
        phases = sorted({p.phase for p in role.parts} - {"held"})
        lines.append(f"{role.role}: {role.total_gib:.2f} GiB at its peak = held {role.phase_gib('held'):.2f} + the "
                     f"larger of " + ", ".join(f"{ph} {role.phase_gib(ph):.2f}" for ph in phases))
        for part in role.parts:
            lines.append(f"  {part.name:<14} {part.bytes / GIB:8.2f} GiB  {part.phase:<8} {part.why}")
    lines.append(f"policy worker while loading: {p.load_gib:.2f} GiB")
    if p.device_memory_gib is None:
        lines.append("device memory unknown: give --device-memory to check that it fits")
    elif p.fits:
        lines.append(f"fits: {max(p.policy_peak_gib, p.rollout.total_gib):.1f} of {p.usable_gib:.1f} usable GiB "
                     f"({p.device_memory_gib:g} GiB less {HEADROOM:.0%} headroom)")
    else:
        lines.append("does not fit: " + p.message())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m grpo.memplan CONFIG.yaml [key=value ...] [--device-memory GIB] [--model-config PATH]`."""
    import argparse

    from grpo.config import load_config

    parser = argparse.ArgumentParser(prog="python -m grpo.memplan", description="The memory plan of a run.")
    parser.add_argument("config", nargs="?", help="a grpo.run YAML")
    parser.add_argument("overrides", nargs="*", help="key=value")
    parser.add_argument("--device-memory", type=float, default=None, help="GiB per device")
    parser.add_argument("--model-config", default=None, help="config.json of the model (default: the model's own)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    p = plan(cfg, ModelDims.from_config(args.model_config or cfg.model), device_memory_gib=args.device_memory)
    print(json.dumps(p.as_dict(), indent=2) if args.json else render(p))
    return 1 if p.fits is False else 0


if __name__ == "__main__":
    raise SystemExit(main())
