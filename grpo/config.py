"""The run config: one flat, typed, validated model for `python -m grpo.run`.

Covers what a GRPO run needs to start (model, task, sampling, loss variant, workers, checkpoints)
and where it is loaded from (YAML, then `key=value` overrides from the command line). It does not
cover the job API's request schema; the API maps its request onto this model.

Every check that can fail does so here, before any Ray actor starts, with the field named.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from grpo.storage import cache_root, is_url, join, local_copy


class ConfigError(ValueError):
    """A config that cannot run. The message names the offending field(s)."""


LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3"]


def _looks_local(path: str) -> bool:
    """A model string that can only mean a local directory (an HF id is `name` or `org/name`)."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.sep == "\\"


class GRPOConfig(BaseModel):
    """Everything one GRPO run needs. Unknown keys are errors, not silently ignored."""

    # Attribute docstrings become field descriptions: the JSON schema and docs/config.md use them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    # ---- model -------------------------------------------------------------------------------
    model: str = Field(min_length=1)
    """HF model id or local directory (anything `from_pretrained` takes); also the KL reference"""
    tokenizer: str | None = None
    """tokenizer id or directory; defaults to `model`"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """compute dtype. bfloat16 is mixed precision: the policy keeps fp32 master weights and AdamW state and
    computes in bf16 (FSDP2's policy or autocast); the reference and the rollout copies are bf16"""

    # ---- data ----------------------------------------------------------------------------------
    task: str = Field("digit", min_length=1)
    """built-in task (`digit`, `arithmetic`, `countdown`, `code`) or `jsonl` with `dataset`; unused with environment"""
    dataset: str | None = None
    """JSONL file of `{query, expected_outcome}` rows; sets task to `jsonl`"""
    eval_dataset: str | None = None
    """JSONL file of held-out rows for evaluation (jsonl task); else the dataset's tail is held out"""
    reward: str | None = None
    """reward function: a registered name, an installed plugin's or `module:function`; defaults to the task's
    verifier"""
    reward_source: str | None = Field(None, min_length=1, max_length=65536)
    """the reward as Python source defining `reward(prompt, completion, expected) -> float`, run only in the
    code sandbox (grpo/sandbox.py), one process per batch; instead of `reward`"""
    eval_size: int = Field(32, ge=0, le=100_000)
    """held-out prompts scored greedily at each evaluation (0 disables evaluation)"""
    eval_interval: int = Field(0, ge=0, le=1_000_000)
    """evaluate every N steps (0: only at checkpoints and at the end)"""

    # ---- sampling ------------------------------------------------------------------------------
    group_size: int = Field(8, ge=2, le=64)
    """completions sampled per prompt"""
    prompts_per_step: int = Field(16, ge=1, le=4096)
    """prompts per optimizer step, across all policy workers"""
    max_prompt_tokens: int = Field(256, ge=1, le=32_768)
    """prompts longer than this are truncated from the left"""
    max_new_tokens: int = Field(8, ge=1, le=32_768)
    """completion length limit"""
    temperature: float = Field(1.0, gt=0.0, le=2.0)
    """sampling temperature; log-probs are taken from the same tempered distribution"""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """nucleus sampling mass"""

    # ---- optimisation --------------------------------------------------------------------------
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    """AdamW learning rate"""
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    """AdamW weight decay"""
    lr_warmup_steps: int = Field(0, ge=0, le=100_000)
    """GRPO steps over which the learning rate ramps linearly up to learning_rate (0: none)"""
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6)
    """gradient clipping norm (0 disables)"""
    num_steps: int = Field(100, ge=1, le=10_000_000)
    """optimizer steps in the run"""
    target_reward: float | None = Field(None, ge=-1e9, le=1e9)
    """end the run as completed once the mean training reward of the last `target_window` steps reaches this:
    the step that reached it is the last, with its checkpoint; None runs all `num_steps`"""
    target_window: int = Field(10, ge=1, le=10_000)
    """steps in the running mean `target_reward` is checked against"""
    micro_batch_size: int = Field(64, ge=1, le=65_536)
    """sequences per forward/backward on one policy worker, rounded to whole groups (accumulated above it)"""
    share_prompt_prefix: bool = True
    """in the update, run each prompt once per group and share its KV cache with the G completions (DDP)"""
    logprob_chunk_tokens: int = Field(1024, ge=1, le=1_048_576)
    """positions whose logits exist at once when the update computes log-probs and entropy (grpo.logprobs): the
    (micro-batch, length, vocabulary) logits are never built, one (chunk, vocabulary) block at a time instead"""

    # ---- GRPO loss -----------------------------------------------------------------------------
    kl_coef: float = Field(0.0, ge=0.0, le=10.0)
    """weight of the KL penalty to the frozen reference (0: no reference model is loaded)"""
    kl_estimator: KLEstimator = "k3"
    """k1 = log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r (Schulman's unbiased, low variance)"""
    clip_eps_low: float = Field(0.2, ge=0.0, le=1.0)
    """lower clip of the ratio: 1 - eps_low"""
    clip_eps_high: float = Field(0.2, ge=0.0, le=10.0)
    """upper clip of the ratio: 1 + eps_high (DAPO clip-higher uses 0.28)"""
    loss_agg: LossAgg = "token-mean"
    """how per-token losses become one number; changes the length bias (see grpo.loss.aggregate)"""
    scale_advantages: bool = True
    """divide group advantages by the group std (GRPO); False is Dr. GRPO's mean-only"""
    dynamic_sampling: bool = False
    """drop groups whose rewards are all equal (DAPO): they carry no gradient signal"""
    max_sampling_rounds: int = Field(3, ge=0, le=64)
    """dynamic sampling: extra rounds of prompts sampled to refill the dropped groups up to a full batch;
    a batch still short after them trains on what it has (`sampling_rounds` in the metrics)"""
    overlong_buffer: int = Field(0, ge=0, le=32_768)
    """soft overlong penalty over the last N tokens before max_new_tokens (0 disables)"""
    overlong_penalty: float = Field(1.0, ge=0.0, le=100.0)
    """size of the soft overlong penalty at max_new_tokens"""

    # ---- multi-turn agents (grpo.agents.environments, grpo.agents.episodes) -----------------------------------------
    environment: str | None = Field(None, min_length=1)
    """agent environment: `calculator`, `python`, `search` or `module:Class`; set, trajectories are multi-turn"""
    tools: list[str] | None = None
    """tools of the environment to offer (all when left out)"""
    tool_instructions: bool = True
    """put the tool list and the call format before each query"""
    chat_template: bool | None = None
    """prompts (single- and multi-turn) and tool turns through the tokenizer's chat template: left out, when the
    tokenizer has one (Instruct models); false forces raw text; true requires a template"""
    max_steps_per_trajectory: int = Field(4, ge=1, le=100)
    """agent turns (actions) per trajectory; max_new_tokens bounds each turn"""
    max_trajectory_tokens: int = Field(256, ge=1, le=131_072)
    """token budget of a trajectory after its prompt: actions plus observations"""
    env_concurrency: int = Field(64, ge=1, le=65_536)
    """live environments per rollout actor; their turns are generated as one batch"""
    env_actor_cpus: float | None = Field(None, gt=0.0, le=256.0)
    """run each environment in its own Ray actor with this many CPUs (heavy environments); None: in the rollout actor"""
    env_step_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    """an environment step (or reset) slower than this ends its trajectory as `env_timeout`"""
    tool_timeout_s: float = Field(10.0, gt=0.0, le=3600.0)
    """a tool call slower than this is reported to the model as timed out; the trajectory goes on"""
    credit_assignment: Literal["outcome", "discounted"] = "outcome"
    """outcome: group advantage of the summed reward on every token; discounted: per-step returns"""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """discount of step rewards (credit_assignment: discounted)"""
    reward_tool_call: float = Field(0.0, ge=-100.0, le=100.0)
    """shaping: added per successful tool call"""
    reward_tool_error: float = Field(0.0, ge=-100.0, le=100.0)
    """shaping: added per malformed, unknown, failing or timed-out tool call"""
    reward_verification: float = Field(0.0, ge=-100.0, le=100.0)
    """shaping: added per verification step (e.g. running the tests)"""
    reward_step: float = Field(0.0, ge=-100.0, le=100.0)
    """shaping: added per step"""
    sft_warmup_steps: int = Field(0, ge=0, le=100_000)
    """supervised steps on the environment's demonstrations before GRPO starts (fresh runs only)"""
    sft_learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    """learning rate of the warm-up; defaults to learning_rate"""
    sft_batch_size: int | None = Field(None, ge=1, le=65_536)
    """demonstrations per warm-up step, across all policy workers; defaults to prompts_per_step"""

    # ---- LoRA (the lora extra: peft) ------------------------------------------------------------
    lora_rank: int = Field(0, ge=0, le=1024)
    """LoRA rank r (0: full fine-tuning). With LoRA only the adapter trains, is all-reduced and is published
    to the rollout actors each step; the KL reference is the base model with the adapter disabled; checkpoints
    are PEFT adapter directories"""
    lora_alpha: float = Field(16.0, gt=0.0, le=1e6)
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_rank"""
    lora_target_modules: list[str] | None = None
    """module names that get adapters, e.g. [q_proj, v_proj]; "all-linear" for every linear layer; left out,
    PEFT's default for the architecture (Llama and Qwen2: q_proj, v_proj)"""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """dropout on the adapter's input (0 keeps training and sampling log-probs identical)"""
    lora_merged_export: bool = False
    """also write the adapter merged into the base weights (an ordinary HF model) as `merged/` in each checkpoint"""

    # ---- cluster -------------------------------------------------------------------------------
    num_policy_workers: int = Field(1, ge=1, le=1024)
    """Ray Train workers updating the policy (DDP/FSDP)"""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """parallel strategy of the policy workers: ddp (a full copy each) or fsdp (FSDP2: each decoder layer
    sharded across the workers, sharded checkpoints); both run on GPUs (NCCL) and CPUs (gloo). auto: the
    memory plan (grpo.memplan) picks FSDP2 when a whole replica's training state would not fit one device
    (with LoRA: the frozen base and the adapter's state), DDP otherwise and where the device memory is unknown"""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """how Ray places the policy workers (Ray Train's placement group strategy): PACK on as few nodes as
    possible, SPREAD over as many, STRICT_SPREAD one node each (refused at once where there are fewer nodes),
    STRICT_PACK all on one node. Where they landed: `rank_nodes` in summary.json"""
    device_memory_gib: float | None = Field(None, gt=0.0, le=1_000_000.0)
    """memory of one device for the memory plan, GiB; None: the GPU model Ray reports (GPU runs), or no check
    (CPU runs). A run whose plan does not fit is refused before any actor starts"""
    publish_bucket_mb: int = Field(256, ge=1, le=65_536)
    """the weights go to the rollout actors in buckets of about this many MiB, each gathered from the shards
    when it is sent: no process holds a full copy for publishing"""
    activation_checkpointing: bool | None = None
    """recompute each decoder layer's activations in the backward instead of keeping them (memory for about a
    third more compute); None: on under FSDP2, off under DDP (where it would also turn off the shared prompt
    prefix, which needs the KV cache in training)"""
    num_rollout_workers: int = Field(1, ge=1, le=1024)
    """rollout actors sampling completions"""
    num_reward_workers: int = Field(1, ge=1, le=1024)
    """reward actors in the ActorPool"""
    gpus_per_worker: float = Field(0.0, ge=0.0, le=8.0)
    """GPUs for each policy worker and each rollout actor (0: CPU)"""
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0)
    """logical CPUs reserved by each policy worker and rollout actor"""
    cpus_per_reward_worker: float = Field(0.5, gt=0.0, le=256.0)
    """logical CPUs reserved by each reward actor"""
    reward_worker_resources: dict[str, float] = Field(default_factory=dict, max_length=8)
    """custom Ray resources each reward actor also asks for, e.g. {"sandbox": 1} to put reward actors (and the
    user code they sandbox) on the KubeRay group that runs under gVisor (kuberay/raycluster.yaml)"""
    torch_threads: int = Field(1, ge=1, le=256)
    """intra-op threads of torch in every worker process"""
    reward_timeout_s: float = Field(10.0, gt=0.0, le=3600.0)
    """a reward call slower than this scores 0 and is counted as a timeout"""

    # ---- checkpoints and output ----------------------------------------------------------------
    output_dir: str = Field("runs", validation_alias=AliasChoices("output_dir", "storage"))
    """where runs keep their files (also `storage`): a local folder, or a URL (`s3://bucket/prefix`, any pyarrow
    filesystem; credentials from the standard variables) for runs whose workers span nodes; checkpoints,
    metrics.jsonl, trajectories and the plot go to output_dir/run_name"""
    run_name: str = Field("grpo", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    """run folder name; starting a run with an existing name resumes it from its latest checkpoint"""
    checkpoint_interval: int = Field(10, ge=0, le=1_000_000)
    """checkpoint every N steps (0: only at the end)"""
    keep_checkpoints: int = Field(3, ge=1, le=1000)
    """checkpoints kept: the best k by eval reward when evaluation runs, else the latest k"""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """seeds the prompt order, the sampling and the model init of the tiny factory"""

    # ---- async ---------------------------------------------------------------------------------
    async_rollouts: bool = False
    """sample step k+1 while step k trains; the loss importance-weights against sampling log-probs"""
    max_staleness: int = Field(1, ge=1, le=16)
    """how many policy versions a rollout may lag the policy it trains (async only)"""
    tis_cap: float = Field(2.0, gt=1.0, le=100.0)
    """async only: per-token importance weights pi_now/pi_sampler are truncated at this (verl's TIS); bounds the loss of stale samples"""

    # ---- accounting ----------------------------------------------------------------------------
    max_budget_usd: float | None = Field(None, gt=0.0, le=1e7)
    """stop the run (with a checkpoint) before its compute cost would pass this; warn at 75% and 90%"""
    budget_stop_reserve_s: float = Field(5.0, ge=0.0, le=3600.0)
    """seconds of the run's resources the budget keeps for the end: the final checkpoint and the release of
    the workers, which cost while they happen. The run stops when the next step and this would pass it"""
    cpu_hour_usd: float = Field(0.05, ge=0.0, le=1000.0)
    """price of one logical CPU for one hour, for the cost metric"""
    gpu_hour_usd: float = Field(2.5, ge=0.0, le=1000.0)
    """price of one GPU for one hour, for the cost metric"""

    def lora_config(self) -> dict[str, Any] | None:
        """peft.LoraConfig keyword arguments, or None without LoRA; the policy and its samplers build the
        same adapter from it, so the published adapter tensors fit the rollout actors' copies."""
        if not self.lora_rank:
            return None
        kw: dict[str, Any] = {"r": self.lora_rank, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                              "task_type": "CAUSAL_LM"}
        if self.lora_target_modules:
            only = self.lora_target_modules
            kw["target_modules"] = only[0] if only == ["all-linear"] else list(only)
        return kw

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        if self.dataset is not None:
            if is_url(self.dataset):  # read where it is used (grpo.storage.local_copy); preflight checks it
                pass
            elif not Path(self.dataset).expanduser().is_file():
                raise ValueError(f"dataset: no such file: {self.dataset}")
            else:
                object.__setattr__(self, "dataset", str(Path(self.dataset).expanduser().resolve()))
            if self.task not in ("digit", "jsonl"):
                raise ValueError("task: must be 'jsonl' (or left out) when dataset is given")
            object.__setattr__(self, "task", "jsonl")
        elif self.task == "jsonl":
            raise ValueError("dataset: required when task is 'jsonl'")
        if self.eval_dataset is not None:
            if self.dataset is None:
                raise ValueError("eval_dataset: needs dataset (the jsonl task)")
            if not is_url(self.eval_dataset):
                if not Path(self.eval_dataset).expanduser().is_file():
                    raise ValueError(f"eval_dataset: no such file: {self.eval_dataset}")
                object.__setattr__(self, "eval_dataset", str(Path(self.eval_dataset).expanduser().resolve()))
        for field in ("model", "tokenizer"):
            value = getattr(self, field)
            if value is None or is_url(value):  # a URL is checked by preflight, copied where it is used
                continue
            local = Path(value).expanduser()
            try:
                exists = local.exists()
            except OSError as e:  # a name too long for the filesystem, say
                raise ValueError(f"{field}: {value[:100]!r} is not a usable path ({e.strerror})") from None
            if exists:
                if not local.is_dir() or not any(local.glob("*.json")):
                    raise ValueError(f"{field}: {value} is not a Hugging Face model directory")
                # Absolute, so Ray workers with another working directory load the same files.
                object.__setattr__(self, field, str(local.resolve()))
            elif _looks_local(value):
                raise ValueError(f"{field}: no such directory: {value}")
        if self.prompts_per_step % self.num_policy_workers:
            raise ValueError(
                f"prompts_per_step: {self.prompts_per_step} must be a multiple of "
                f"num_policy_workers ({self.num_policy_workers}) so that whole groups land on each worker"
            )
        if self.sft_batch_size is not None and self.sft_batch_size % self.num_policy_workers:
            raise ValueError("sft_batch_size: must be a multiple of num_policy_workers")
        if self.reward and self.reward_source:
            raise ValueError("reward_source: set either reward or reward_source")
        for name, amount in self.reward_worker_resources.items():
            if name in ("CPU", "GPU", "memory") or not name or amount <= 0:
                raise ValueError(f"reward_worker_resources: {name!r}: a custom resource with a positive amount "
                                 "(CPUs are cpus_per_reward_worker)")
        if self.lora_rank:
            if self.strategy == "fsdp" and self.lora_merged_export:
                raise ValueError("lora_merged_export: not with strategy 'fsdp' (merging gathers the whole model on one "
                                 "rank); merge the adapter directory of a checkpoint offline, or use 'ddp'")
            try:
                import peft  # noqa: F401
            except ImportError:
                raise ValueError("lora_rank: needs peft (pip install 'raygrpo[lora]')") from None
        if self.environment is None:
            for name in ("tools", "sft_warmup_steps"):
                if getattr(self, name):
                    raise ValueError(f"{name}: needs environment")
        else:
            from grpo.agents.environments import ToolEnvironment, environment_class

            try:
                env_cls = environment_class(self.environment)
            except ValueError as e:
                raise ValueError(f"environment: {e}") from None
            if self.task not in ("digit", "jsonl"):
                raise ValueError("task: leave it out with environment (the environment brings its samples) "
                                 "or give dataset")
            if self.tools is not None:
                if not (isinstance(env_cls, type) and issubclass(env_cls, ToolEnvironment)):
                    raise ValueError("tools: the environment is not a ToolEnvironment")
                try:
                    env_cls(tools=self.tools)
                except ValueError as e:
                    raise ValueError(str(e)) from None
            if self.overlong_buffer:
                raise ValueError("overlong_buffer: not used with environment (use max_trajectory_tokens, reward_step)")
        if self.overlong_buffer >= self.max_new_tokens and self.overlong_buffer:
            raise ValueError("overlong_buffer: must be smaller than max_new_tokens")
        return self

    # ---- derived values, computed in one place -------------------------------------------------
    @property
    def run_storage(self) -> str:
        """Where the run's files live: output_dir/run_name as a URL, or as an absolute local path."""
        if is_url(self.output_dir):
            return join(self.output_dir, self.run_name)
        return str(Path(self.output_dir.removeprefix("file://")).expanduser().resolve() / self.run_name)

    @property
    def run_dir(self) -> Path:
        """The local folder the driver writes the run's files in: the run folder itself, or (storage at a URL)
        this machine's copy of what the driver writes (metrics, trajectories, summary), uploaded as it goes."""
        if is_url(self.output_dir):
            key = hashlib.sha256(self.run_storage.encode()).hexdigest()[:16]
            return cache_root() / "runs" / f"{self.run_name}-{key}"
        return Path(self.run_storage)

    def localized(self) -> GRPOConfig:
        """This config with each input given as a URL (model, tokenizer, dataset) replaced by this node's
        cached copy of it: what a worker or actor loads from."""
        update = {f: local_copy(v) for f in ("model", "tokenizer", "dataset", "eval_dataset")
                  if (v := getattr(self, f)) is not None and is_url(v)}
        return self.model_copy(update=update) if update else self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def uses_activation_checkpointing(self) -> bool:
        return self.activation_checkpointing_for(self.strategy)

    def activation_checkpointing_for(self, strategy: str) -> bool:
        """Whether the policy recomputes activations under `strategy` (the run's, once auto is resolved)."""
        return strategy == "fsdp" if self.activation_checkpointing is None else self.activation_checkpointing

    @property
    def prompts_per_worker(self) -> int:
        return self.prompts_per_step // self.num_policy_workers

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    def load_dataset(self):  # -> grpo.tasks.Dataset
        """The run's train/eval prompts, as every process of the run loads them."""
        from grpo.tasks import load_dataset

        if self.environment is not None and self.dataset is None:
            from grpo.agents.environments import environment_class

            return environment_class(self.environment).load_dataset(self.eval_size, self.seed)
        cfg = self.localized()
        return load_dataset(cfg.task, dataset_path=cfg.dataset, eval_size=cfg.eval_size, seed=cfg.seed,
                            eval_path=cfg.eval_dataset)


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        # a model-level check (no loc) already names its field: "model: no such directory: ..."
        named = not e["loc"] and re.match(r"^[a-z_][a-z0-9_.]*: ", msg)
        lines.append(msg if named or msg.startswith(f"{loc}:") else f"{loc}: {msg}")
    return "invalid config: " + "; ".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict; values are parsed as YAML scalars (`lr=1e-3`, `async_rollouts=true`)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"invalid override {item!r}: expected key=value")
        out[key] = yaml.safe_load(value) if value.strip() else None
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> GRPOConfig:
    """Load a YAML config, apply overrides, validate. Raises ConfigError naming the field."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        data.update(loaded)
    if overrides:
        data.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    try:
        return GRPOConfig(**data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def config_reference() -> str:
    """docs/config.md, generated from the fields (kept in sync by a test)."""
    lines = [
        "# Run config reference",
        "",
        "Generated by `python -m grpo.config` from `grpo/config.py`; do not edit by hand.",
        "Every key can be set in the YAML file given to `--config` or as a `key=value` override.",
        "",
        "| key | type | default | bounds | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, f in GRPOConfig.model_fields.items():
        bounds = []
        for m in f.metadata:
            for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "len >=")):
                if getattr(m, attr, None) is not None:
                    bounds.append(f"{sym} {getattr(m, attr)}")
        ann = str(f.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("|", "\\|")
        default = "required" if f.is_required() else f"`{f.get_default(call_default_factory=True)!r}`"
        meaning = " ".join((f.description or "").split())  # a docstring over several lines: one table row
        lines.append(f"| `{name}` | {ann} | {default} | {', '.join(bounds)} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
