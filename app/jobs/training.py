"""The `training.*` JSON-RPC methods: thin handlers over the data functions in app.data.db.

Each method has a pydantic params model (which also feeds `rpc.discover`) and a result model.
Starting a job validates everything, stores the job as `queued` and enqueues it: the run itself
is the Dispatcher's business (app.jobs.dispatcher), so no request ever waits on training.
Not here: HTTP (app.api.main), auth and rate limits (the security issue), the registry endpoints.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
import sys
import tempfile
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from app.api.auth import caller_is_admin, current_principal
from app.api.context import Context, money, registry
from app.api.jsonrpc import (
    BUDGET_EXCEEDED,
    CANNOT_CANCEL,
    EVALUATION_FAILED,
    EXPORT_LIMIT_EXCEEDED,
    FORBIDDEN,
    NOT_FOUND,
    VALIDATION_FAILED,
    RPCError,
)
from app.data import db
from app.data.tables import JobStatus, TrainingJob
from app.jobs.trust import check_job_imports, resolve_model
from app.research.datasets import Row, training_rows
from app.settings import Settings
from grpo import storage
from grpo.config import ConfigError, GRPOConfig, load_config

EXPORT_LIMIT = 10_000


# ---- params and results ------------------------------------------------------------------------

class AgentConfig(BaseModel):
    """A multi-turn agent job: the environment the model acts in, its tools, and how steps are scored."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    environment: str = Field(min_length=1, max_length=300)
    """`calculator`, `python`, `search`, an installed plugin's name (entry points `raygrpo.environments`), or a
    `package.module:Class` the operator allows (RAYGRPO_ALLOWED_ENVIRONMENTS)"""
    tools: list[str] | None = Field(None, min_length=1, max_length=64)
    """tools of the environment to offer (all when left out)"""
    max_steps: int | None = Field(None, ge=1, le=100)
    """agent turns per trajectory; defaults to config.max_steps_per_trajectory (4 when that is 1)"""
    gamma: float | None = Field(None, ge=0.0, le=1.0)
    """discount of step rewards; defaults to config.gamma"""
    credit_assignment: Literal["outcome", "discounted"] = "outcome"
    """outcome: group advantage of the trajectory's summed reward; discounted: per-step returns with gamma"""
    max_trajectory_tokens: int | None = Field(None, ge=1, le=131_072)
    """token budget of a trajectory after its prompt (actions and observations)"""
    tool_timeout_s: float | None = Field(None, gt=0.0, le=3600.0)
    """a slower tool call is reported to the model as timed out"""
    reward_tool_call: float = Field(0.0, ge=-100.0, le=100.0)
    """shaping per successful tool call"""
    reward_tool_error: float = Field(0.0, ge=-100.0, le=100.0)
    """shaping per malformed or failing tool call"""
    reward_verification: float = Field(0.0, ge=-100.0, le=100.0)
    """shaping per verification step"""
    reward_step: float = Field(0.0, ge=-100.0, le=100.0)
    """shaping per step"""
    sft_warmup_steps: int = Field(0, ge=0, le=100_000)
    """supervised steps on the environment's demonstrations before GRPO"""
    tool_instructions: bool = True
    """put the tool list and the call format before each query"""
    chat_template: bool | None = None
    """render prompts and tool turns with the tokenizer's chat template (left out: when it has one)"""


# AgentConfig field -> engine key, where the names differ (the rest are the same name).
AGENT_KEYS = {"max_steps": "max_steps_per_trajectory"}
AGENT_ENGINE_KEYS = ("environment", "tools", "tool_instructions", "chat_template", "max_steps_per_trajectory",
                     "max_trajectory_tokens", "max_new_tokens", "max_prompt_tokens", "tool_timeout_s",
                     "env_step_timeout_s", "env_concurrency")
"""what an evaluation of an agent job needs to play its episodes the way the run did"""


class TrainingConfig(BaseModel):
    """A job's training settings: the familiar fields of the old service plus the engine's own."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    n_iterations: int = Field(100, ge=1, le=100_000)
    """optimizer steps"""
    batch_size: int = Field(16, ge=1, le=4096)
    """queries per step"""
    n_trajectories_per_query: int = Field(8, ge=2, le=64)
    """completions sampled per query (the GRPO group size)"""
    learning_rate: float = Field(1e-5, gt=0.0, le=1.0)
    """AdamW learning rate"""
    max_budget_usd: Decimal = Field(Decimal("100"), gt=0, le=Decimal("1000000"), decimal_places=6)
    """the run stops (with a checkpoint) when its cost reaches this"""
    checkpoint_interval: int = Field(10, ge=0, le=100_000)
    """checkpoint every N steps (0: only at the end)"""
    max_steps_per_trajectory: int = Field(1, ge=1, le=100)
    """agent turns per trajectory (1: single-turn completions)"""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """discount of step rewards in multi-turn trajectories"""
    agent: AgentConfig | None = None
    """multi-turn agent settings: the environment and its tools (single-turn completions when left out)"""
    model: str | None = Field(None, min_length=1, max_length=1000)
    """HF Hub id or a directory under the server's model roots; the server's default model when left out"""
    reward: str | None = Field(None, min_length=1, max_length=300)
    """reward function: a built-in or installed plugin's name (default exact_match); module:function only
    when the operator allows it (RAYGRPO_ALLOWED_REWARDS)"""
    reward_source: str | None = Field(None, min_length=1, max_length=65536)
    """the reward as Python source defining `reward(prompt, completion, expected) -> float` (standard library
    only). The API only compiles it; it runs only in the bubblewrap code sandbox (own namespaces, a throwaway
    uid, no network, nothing of the server's files, a timeout per item), never in the API or a worker.
    Instead of `reward`"""
    grpo_variant: Literal["grpo", "dr_grpo", "dapo"] | None = None
    """preset of advantage scaling, loss aggregation and clipping; engine defaults when left out"""
    max_new_tokens: int | None = Field(None, ge=1, le=32_768)
    """completion length limit"""
    temperature: float | None = Field(None, gt=0.0, le=2.0)
    """sampling temperature"""
    kl_coef: float | None = Field(None, ge=0.0, le=10.0)
    """KL penalty weight against the initial model"""
    target_reward: float | None = Field(None, ge=-1e9, le=1e9)
    """the job completes early (with a checkpoint) once the mean training reward of the last 10 steps
    (engine.target_window) reaches this"""
    num_policy_workers: int | None = Field(None, ge=1, le=1024)
    """Ray Train workers"""
    num_rollout_workers: int | None = Field(None, ge=1, le=1024)
    """rollout actors"""
    num_reward_workers: int | None = Field(None, ge=1, le=1024)
    """reward actors"""
    gpus_per_worker: float | None = Field(None, ge=0.0, le=8.0)
    """GPUs per policy worker and rollout actor"""
    lora_rank: int | None = Field(None, ge=0, le=1024)
    """train a LoRA adapter of this rank instead of the whole model (0 or left out: full fine-tuning)"""
    lora_alpha: float | None = Field(None, gt=0.0, le=1e6)
    """LoRA scaling numerator (engine default 16)"""
    lora_target_modules: list[str] | None = Field(None, min_length=1, max_length=64)
    """modules that get adapters, e.g. ["q_proj", "v_proj"], or ["all-linear"]; PEFT's default when left out"""
    lora_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    """dropout on the adapter's input (engine default 0)"""
    engine: dict[str, Any] = Field(default_factory=dict)
    """any other grpo.config.GRPOConfig key (see docs/config.md)"""


# Engine keys a job may not set through config.engine: the server owns them (paths, prices, the
# budget it enforces), or an API field already maps onto them.
SERVER_OWNED = {"output_dir", "storage", "run_name", "dataset", "eval_dataset", "task", "cpu_hour_usd", "gpu_hour_usd",
                "max_budget_usd"}
MAPPED = {"num_steps": "n_iterations", "prompts_per_step": "batch_size", "group_size": "n_trajectories_per_query",
          "learning_rate": "learning_rate", "checkpoint_interval": "checkpoint_interval", "model": "model",
          "reward": "reward", "reward_source": "reward_source", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
          "kl_coef": "kl_coef", "target_reward": "target_reward", "num_policy_workers": "num_policy_workers",
          "num_rollout_workers": "num_rollout_workers", "num_reward_workers": "num_reward_workers",
          "gpus_per_worker": "gpus_per_worker", "lora_rank": "lora_rank", "lora_alpha": "lora_alpha",
          "lora_target_modules": "lora_target_modules", "lora_dropout": "lora_dropout",
          **{AGENT_KEYS.get(k, k): f"agent.{k}" for k in AgentConfig.model_fields}}

VARIANTS: dict[str, dict[str, Any]] = {
    "grpo": {"scale_advantages": True, "loss_agg": "seq-mean-token-mean", "clip_eps_high": 0.2},
    "dr_grpo": {"scale_advantages": False, "loss_agg": "seq-mean-token-sum-norm", "clip_eps_high": 0.2},
    "dapo": {"scale_advantages": True, "loss_agg": "token-mean", "clip_eps_high": 0.28, "dynamic_sampling": True},
}


class DatasetRef(BaseModel):
    """A dataset version of the research registry (datasets.create_version)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    dataset_id: str = Field(min_length=1, max_length=64)
    version: int | None = Field(None, ge=1, le=2**31 - 1)
    """the latest version when left out"""


class StartParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    agent_id: str = Field(min_length=1, max_length=256)
    """the agent this job trains"""
    config: TrainingConfig = Field(default_factory=TrainingConfig)
    """training settings"""
    training_data: list[Row] | None = Field(None, min_length=1, max_length=1_000_000,
                                            validation_alias=AliasChoices("training_data", "training_queries"))
    """rows of {query, expected_outcome}; `training_queries` is accepted as an alias"""
    dataset: DatasetRef | None = None
    """a registry dataset version to train on, instead of training_data (its file is checked against its hash)"""
    evaluation_data: list[Row] | None = Field(None, max_length=100_000)
    """held-out rows scored greedily at evaluations"""
    priority: int = Field(0, ge=0, le=10)
    """higher runs first; above 0 only for admins (a researcher's job cannot jump everyone's queue)"""
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)
    """the same key never creates two jobs"""

    @model_validator(mode="after")
    def _one_source(self) -> StartParams:
        if (self.training_data is None) == (self.dataset is None):
            raise ValueError("give exactly one of training_data and dataset")
        return self


class StartResult(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)
    job_id: str
    status: str
    agent_id: str
    total_iterations: int
    budget_usd: str
    created_at: datetime
    created: bool
    """False when the idempotency key matched an existing job (which is returned)"""


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    job_id: str = Field(min_length=1, max_length=64)
    """the job's id, as training.start_grpo returned it"""


class CancelParams(JobParams):
    reason: str | None = Field(None, max_length=64)
    """why; stored as the job's stop_reason"""
    wait: bool = True
    """wait (up to a bound) for a running job to stop and checkpoint before replying"""


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    agent_id: str | None = Field(None, max_length=256)
    """only this agent's jobs"""
    status: JobStatus | None = None
    """only jobs in this state"""
    limit: int = Field(20, ge=1, le=100)
    """jobs per page"""
    cursor: str | None = Field(None, max_length=1000)
    """next_cursor of the previous page"""


class ExportParams(JobParams):
    success_only: bool = False
    """only trajectories that solved their query"""
    min_reward: float | None = None
    """only trajectories with at least this reward"""
    limit: int = Field(1000, ge=1)
    """rows per call, at most 10000 (-40005 above)"""
    offset: int = Field(0, ge=0)
    """rows to skip"""

    @field_validator("min_reward")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and v != v:
            raise ValueError("must be a number")
        return v


# ---- helpers -----------------------------------------------------------------------------------

def write_rows(f: Any, rows: list[Row]) -> None:
    for row in rows:
        f.write(json.dumps(row.engine_row()) + "\n")


def engine_config(params: StartParams, *, settings: Settings, engine: Any, dataset: Path,
                  eval_dataset: Path | None, output_dir: Path) -> GRPOConfig:
    """Map the API's config onto the engine's, validating it the way `grpo.run` will."""
    c = params.config
    if c.max_steps_per_trajectory > 1 and c.agent is None:
        raise RPCError(VALIDATION_FAILED, "config.max_steps_per_trajectory: multi-turn trajectories need "
                       "config.agent (the environment the agent acts in)", {"field": "config.agent"})
    tokenizer = c.engine.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise RPCError(VALIDATION_FAILED, "config.engine.tokenizer: a model reference, directory or Hub id",
                       {"field": "config.engine.tokenizer"})
    with db.session_scope(engine) as s:  # before anything is looked at: the one model policy (app.jobs.trust)
        model = resolve_model("config.model", c.model, settings=settings, session=s).load if c.model \
            else settings.default_model
        if tokenizer is not None:
            tokenizer = resolve_model("config.engine.tokenizer", tokenizer, settings=settings, session=s).load
    if not model:
        raise RPCError(VALIDATION_FAILED, "config.model: required (this server has no default model)",
                       {"field": "config.model"})
    if c.reward and c.reward_source:
        raise RPCError(VALIDATION_FAILED, "config.reward_source: set either config.reward or config.reward_source",
                       {"field": "config.reward_source"})
    mapping: dict[str, Any] = {
        "model": model, "dataset": str(dataset), "reward": None if c.reward_source else (c.reward or "exact_match"),
        "reward_source": c.reward_source,
        "num_steps": c.n_iterations, "prompts_per_step": c.batch_size, "group_size": c.n_trajectories_per_query,
        "learning_rate": c.learning_rate, "checkpoint_interval": c.checkpoint_interval,
        "max_budget_usd": float(c.max_budget_usd), "output_dir": str(output_dir), "run_name": "run",
        "cpu_hour_usd": float(settings.cpu_hour_usd), "gpu_hour_usd": float(settings.gpu_hour_usd),
    }
    if eval_dataset is None:
        mapping["eval_size"] = 0
    else:
        mapping["eval_dataset"], mapping["eval_size"] = str(eval_dataset), len(params.evaluation_data or [])
    mapping.update(VARIANTS.get(c.grpo_variant or "", {}))
    if c.agent is not None:
        agent = {AGENT_KEYS.get(k, k): v for k, v in c.agent.model_dump(exclude_none=True).items()}
        agent.setdefault("max_steps_per_trajectory", c.max_steps_per_trajectory if c.max_steps_per_trajectory > 1 else 4)
        agent.setdefault("gamma", c.gamma)
        mapping.update(agent)
    for key in ("max_new_tokens", "temperature", "kl_coef", "target_reward", "num_policy_workers", "num_rollout_workers",
                "num_reward_workers", "gpus_per_worker", "lora_rank", "lora_alpha", "lora_target_modules",
                "lora_dropout"):
        if getattr(c, key) is not None:
            mapping[key] = getattr(c, key)
    for key in c.engine:
        if key in SERVER_OWNED:
            raise RPCError(VALIDATION_FAILED, f"config.engine.{key}: set by the server, not by a job",
                           {"field": f"config.engine.{key}"})
        if key in MAPPED:
            raise RPCError(VALIDATION_FAILED, f"config.engine.{key}: use config.{MAPPED[key]}",
                           {"field": f"config.engine.{key}"})
    mapping.update(c.engine)
    if settings.reward_worker_resources:  # the operator's placement of user code (a gVisor group): not the job's
        if "reward_worker_resources" in c.engine:
            raise RPCError(VALIDATION_FAILED, "config.engine.reward_worker_resources: set by the server, not by a job",
                           {"field": "config.engine.reward_worker_resources"})
        mapping["reward_worker_resources"] = dict(settings.reward_worker_resources)
    if tokenizer is not None:
        mapping["tokenizer"] = tokenizer
    # Before anything is imported or loaded: only what the operator installed or allowed.
    check_job_imports(mapping, settings, reward_field="config.reward", environment_field="config.agent.environment")
    try:
        cfg = load_config(None, mapping)
        from grpo.run import check_memory_plan, preflight

        preflight(cfg, probe_source=functools.partial(probe_on_cluster, resources=settings.reward_worker_resources),
                  deep=True)
        ray = sys.modules.get("ray")
        check_memory_plan(cfg, ray.cluster_resources() if ray is not None and ray.is_initialized() else None)
    except ConfigError as e:
        message = str(e).replace("invalid config: ", "")
        raise RPCError(VALIDATION_FAILED, "config: " + message, {"field": _api_field(message)}) from None
    return cfg


def placed_on(resources: dict[str, float]) -> dict[str, float] | None:
    """Ray resources that put a short task on the nodes offering `resources`, taking almost none of them."""
    return {name: 0.001 for name in resources} or None


def probe_on_cluster(source: str, timeout_s: float, *, resources: dict[str, float]) -> None:
    """Probe a caller's reward source in the sandbox of a Ray task (on the operator's reward group where
    RAYGRPO_REWARD_WORKER_RESOURCES names one), never below the API's own process; in-process only for the
    app run outside Ray (tests, tools). RewardError with the reason when the source fails its probe."""
    from grpo.rewards import RewardError, probe_reward_source

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        probe_reward_source(source, timeout_s)
        return
    # No CPU held (a probe must not wait behind the jobs filling the cluster) and a sliver of the reward group's
    # resource: it places the task there without competing with reward actors for it.
    task = ray.remote(num_cpus=0, resources=placed_on(resources), max_retries=0)(probe_reward_source)
    try:
        ray.get(task.remote(source, timeout_s), timeout=timeout_s + 120)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
        if isinstance(cause, RewardError):
            raise RewardError(str(cause)) from None
        raise RewardError(f"reward_source: the probe could not run: {type(cause or e).__name__}") from None
    except ray.exceptions.GetTimeoutError:
        raise RewardError("reward_source: the probe could not start on the cluster in time; retry") from None


def _api_field(engine_message: str) -> str:
    """The request field an engine config error is about: `model: ...` -> config.model, `group_size: ...`
    -> config.n_trajectories_per_query, an engine-only key -> config.engine.<key>; else `config`."""
    match = re.match(r"^([a-z_]+)(?:\.[\w.]+)?: ", engine_message)
    if match is None:
        return "config"
    key = match.group(1)
    if key in MAPPED:
        return "config." + MAPPED[key]
    return f"config.engine.{key}" if key in GRPOConfig.model_fields else "config"


def check_fits_cluster(cfg: GRPOConfig, settings: Settings) -> None:
    """Refuse a job the cluster can never hold, when this process runs on the cluster (a Serve replica)
    and can ask it; elsewhere (tests, tools without Ray) the dispatcher refuses such a job instead."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from app.jobs.dispatcher import (
        RESOURCE_FIELDS,
        cannot_fit_message,
        demand_formula,
        job_demand,
        ray_cluster_resources,
        shortfall,
    )

    short = shortfall(job_demand(cfg), ray_cluster_resources(settings).capacity)
    if not short:
        return
    made_of = "; ".join(f"{k} = {demand_formula(cfg, k)}" for k in short)
    fields = [f"config.{name}" if name in TrainingConfig.model_fields else f"config.engine.{name}"
              for name in dict.fromkeys(name for k in short for name in RESOURCE_FIELDS[k])]
    raise RPCError(VALIDATION_FAILED, f"config: {cannot_fit_message(short)} ({made_of}); lower "
                   f"{', '.join(fields)}", {"field": "config", "fields": fields,
                                            "needs": {k: need for k, (need, _) in short.items()},
                                            "cluster_max": {k: most for k, (_, most) in short.items()}})


def step_cost_usd(cfg: GRPOConfig, settings: Settings) -> Decimal:
    """The least one step can cost: the run's reserved resources for `min_step_seconds`."""
    from grpo.run import cost_usd

    return Decimal(str(cost_usd(cfg, settings.min_step_seconds)))


def _owned_key(key: str | None) -> str | None:
    """Idempotency keys are per caller: two users sending the same key get two jobs, never each other's."""
    if key is None:
        return None
    return hashlib.sha256(f"{current_principal().subject}\x00{key}".encode()).hexdigest()


def _get(session: Any, job_id: str) -> TrainingJob:
    """The job, if the caller may see it: another user's job is "not found", exactly like a missing one."""
    job = db.get_job(session, job_id=job_id)
    if job is None or not current_principal().owns(job.owner):
        raise RPCError(NOT_FOUND, f"job not found: {job_id}", {"job_id": job_id})
    return job


def status_of(job: TrainingJob, best: Any | None) -> dict[str, Any]:
    m = job.metrics or {}
    progress = 100.0 * job.current_iteration / job.total_iterations if job.total_iterations else 0.0
    eta = None
    if job.status == JobStatus.running and job.started_at and job.current_iteration:
        started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=UTC)
        per_step = (datetime.now(UTC) - started) / job.current_iteration
        eta = datetime.now(UTC) + per_step * (job.total_iterations - job.current_iteration)
    remaining = None if job.budget_usd is None else max(job.budget_usd - job.cost_usd, Decimal("0"))
    return {
        "job_id": job.id, "agent_id": job.agent_id, "status": job.status,
        "current_iteration": job.current_iteration, "total_iterations": job.total_iterations,
        "progress_percent": round(progress, 2),
        "metrics": {"loss": m.get("loss"), "avg_reward": m.get("reward_mean"), "reward_std": m.get("reward_std"),
                    "kl": m.get("kl"), "eval_reward": m.get("eval_reward"),
                    "trajectories_generated": job.trajectories_generated, "tokens_per_s": m.get("tokens_per_s"),
                    "peak_memory_gib": m.get("peak_memory_gib")},
        "cost_usd": money(job.cost_usd), "budget_usd": money(job.budget_usd),
        "budget_remaining_usd": money(remaining),
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
        "estimated_completion": eta,
        "best_checkpoint": None if best is None else {
            "checkpoint_id": best.id, "step": best.step, "eval_reward": best.eval_reward,
            "model": f"checkpoint:{best.id}",  # what models.deploy, sessions.create and start_grpo take
            **({"path": best.path} if caller_is_admin() else {})},  # server paths: admins only
        "error_message": job.error_message, "stop_reason": job.stop_reason,
        "admission": admission_of(job),
        "rank_nodes": m.get("rank_nodes"),  # the Ray node of each policy rank, from the attempt's first step
    }


# The dispatcher's decision that belongs with each state: a queued job shows why it waits, a running job
# why it started (until its first step's metrics replace it), a refused job why it can never run here.
# A running job may still wait: its run books its whole demand first (grpo.gang) and holds nothing until then.
ADMISSION_OF_STATUS = {JobStatus.queued: ("waiting",), JobStatus.running: ("started", "waiting"),
                       JobStatus.failed: ("refused",)}


def admission_of(job: TrainingJob) -> dict[str, Any] | None:
    """The dispatcher's last admission decision on the job ({decision, reason, demand, decided_at}), or None
    when it has made none that fits the job's state (a queued job behind the next one to start)."""
    admission = (job.metrics or {}).get("admission")
    if not isinstance(admission, dict) or admission.get("decision") not in ADMISSION_OF_STATUS.get(job.status, ()):
        return None
    return admission


# ---- methods -----------------------------------------------------------------------------------

@registry.method("training.start_grpo", params=StartParams, result=StartResult, mutates=True,
                 summary="Queue a GRPO training job; replies at once with its id",
                 errors=(BUDGET_EXCEEDED, VALIDATION_FAILED, NOT_FOUND, FORBIDDEN), permission="training:start")
def start_grpo(p: StartParams, ctx: Context) -> StartResult:
    if p.priority > 0 and not current_principal().is_admin:
        raise RPCError(FORBIDDEN, "priority: only an admin may queue a job above the default priority (0)",
                       {"field": "priority"})
    jobs_dir = ctx.settings.runs_dir
    jobs_dir.mkdir(parents=True, exist_ok=True)
    rows, lineage = p.training_data, {}
    if p.dataset is not None:

        rows, source = training_rows(ctx, p.dataset.dataset_id, p.dataset.version, jobs_dir / "staging")
        lineage = {"dataset": source}  # kept in the job's config: which file trained it
    # The data goes to a file first: the engine reads it as a JSONL dataset, and validating the
    # config needs it to exist. It moves into the job's folder once the job has an id.
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", dir=jobs_dir, delete=False) as f:
        write_rows(f, rows)
    tmp, tmp_eval = Path(f.name), None
    try:
        if p.evaluation_data:
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl", dir=jobs_dir, delete=False) as f:
                write_rows(f, p.evaluation_data)
            tmp_eval = Path(f.name)
        staging = jobs_dir / "staging"
        cfg = engine_config(p, settings=ctx.settings, engine=ctx.engine, dataset=tmp, eval_dataset=tmp_eval, output_dir=staging)
        one_step = step_cost_usd(cfg, ctx.settings)
        if one_step > p.config.max_budget_usd:
            raise RPCError(BUDGET_EXCEEDED, f"config.max_budget_usd: {money(p.config.max_budget_usd)} cannot cover "
                           f"one step (at least {money(max(one_step, Decimal('0.000001')))} USD)",
                           {"field": "config.max_budget_usd"})
        check_fits_cluster(cfg, ctx.settings)
        with db.session_scope(ctx.engine) as s:
            job, created = db.create_job(
                s, agent_id=p.agent_id, owner=current_principal().subject,
                config=p.config.model_dump(mode="json") | lineage,
                engine_config={}, total_iterations=p.config.n_iterations, budget_usd=p.config.max_budget_usd,
                priority=p.priority, idempotency_key=_owned_key(p.idempotency_key), training_rows=len(rows),
                evaluation_rows=len(p.evaluation_data or []),
            )
            if created:
                job_dir = jobs_dir / job.id
                job_dir.mkdir(parents=True, exist_ok=True)
                data = job_dir / "data.jsonl"
                tmp.replace(data)
                # the run's files: the job's folder, or its place at the cluster's storage URL (the data file
                # stays here, on the driver's node, which stages it into the run's storage for the workers)
                out = storage.join(ctx.settings.storage_url, "jobs", job.id) if ctx.settings.storage_url else str(job_dir)
                paths = {"dataset": str(data), "output_dir": out}
                if tmp_eval is not None:
                    tmp_eval.replace(job_dir / "eval.jsonl")
                    paths["eval_dataset"] = str(job_dir / "eval.jsonl")
                job.engine_config = cfg.model_dump(mode="json") | paths
                s.add(job)
            result = StartResult(job_id=job.id, status=job.status, agent_id=job.agent_id,
                                 total_iterations=job.total_iterations, budget_usd=money(job.budget_usd),
                                 created_at=job.created_at, created=created)
            priority = job.priority
        if created and ctx.queue is not None:
            ctx.queue.push(result.job_id, priority=priority)
            ctx.queue.set_status(result.job_id, JobStatus.queued)
        if created:
            from app.jobs.dispatcher import wake_dispatcher

            wake_dispatcher()
        return result
    finally:
        for leftover in (tmp, tmp_eval):
            if leftover is not None:
                leftover.unlink(missing_ok=True)


@registry.method("training.get_status", params=JobParams, summary="Status, progress, metrics and cost of a job",
                 errors=(NOT_FOUND,), permission="training:view")
def get_status(p: JobParams, ctx: Context) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        job = _get(s, p.job_id)
        best = db.get_checkpoint(s, checkpoint_id=job.best_checkpoint_id) if job.best_checkpoint_id else None
        return status_of(job, best)


@registry.method("training.cancel", params=CancelParams, mutates=True, summary="Cancel a queued or running job",
                 errors=(NOT_FOUND, CANNOT_CANCEL), permission="training:cancel")
async def cancel(p: CancelParams, ctx: Context) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        job = _get(s, p.job_id)
        if JobStatus(job.status).is_final:
            raise RPCError(CANNOT_CANCEL, f"job {p.job_id} is {job.status} and cannot be cancelled",
                           {"job_id": p.job_id, "status": job.status})
        job = db.request_cancel(s, job_id=p.job_id, reason=p.reason or "cancelled")
        was_queued = job.status == JobStatus.cancelled
    if was_queued and ctx.queue is not None:
        ctx.queue.remove(p.job_id)
        ctx.queue.set_status(p.job_id, JobStatus.cancelled)
    # A running job stops at its next step boundary, saves a checkpoint and marks itself cancelled.
    deadline = asyncio.get_running_loop().time() + (ctx.settings.cancel_wait_s if p.wait else 0.0)
    while True:
        with db.session_scope(ctx.engine) as s:
            job = _get(s, p.job_id)
            best = db.get_checkpoint(s, checkpoint_id=job.best_checkpoint_id) if job.best_checkpoint_id else None
            done = JobStatus(job.status).is_final
            reply = {"job_id": job.id, "status": job.status if done else "cancelling",
                     "cancelled_at": job.cancelled_at, "iterations_completed": job.current_iteration,
                     "checkpoint_saved": best is not None, "checkpoint_id": best.id if best else None}
        if done or asyncio.get_running_loop().time() >= deadline:
            return reply
        await asyncio.sleep(0.25)


@registry.method("training.list_jobs", params=ListParams, summary="Jobs, newest first, with cursor pagination",
                 permission="training:view")
def list_jobs(p: ListParams, ctx: Context) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        try:
            me = current_principal()
            jobs, cursor = db.list_jobs(s, agent_id=p.agent_id, status=p.status, limit=p.limit, cursor=p.cursor,
                                        owner=None if me.is_admin else me.subject)
        except ValueError as e:
            raise RPCError(-32602, f"invalid params: {e}", {"field": "cursor"}) from None
        return {"jobs": [status_of(j, None) for j in jobs], "next_cursor": cursor, "has_more": cursor is not None}


@registry.method("training.export_trajectories", params=ExportParams,
                 summary="Trajectories of a job with their rewards", errors=(NOT_FOUND, EXPORT_LIMIT_EXCEEDED), permission="data:export")
def export_trajectories(p: ExportParams, ctx: Context) -> dict[str, Any]:
    if p.limit > EXPORT_LIMIT:
        raise RPCError(EXPORT_LIMIT_EXCEEDED, f"limit: at most {EXPORT_LIMIT} trajectories per call, use offset",
                       {"field": "limit", "max": EXPORT_LIMIT})
    with db.session_scope(ctx.engine) as s:
        _get(s, p.job_id)
        rows, total = db.export_trajectories(s, job_id=p.job_id, success_only=p.success_only,
                                             min_reward=p.min_reward, limit=p.limit, offset=p.offset)
        out = [{"id": r.id, "step": r.step, "query": r.query, "completion": r.completion, "expected": r.expected,
                "reward": r.reward, "advantage": r.advantage, "success": r.success, "tokens": r.tokens,
                "finish_reason": r.finish_reason, "steps": r.steps, "created_at": r.created_at} for r in rows]
        return {"job_id": p.job_id, "trajectories": out, "total_count": total,
                "has_more": p.offset + len(out) < total}


@registry.method("training.pause", params=JobParams, mutates=True, errors=(NOT_FOUND, VALIDATION_FAILED),
                 permission="training:cancel",
                 summary="Checkpoint a running job and release its resources; training.resume continues it")
def pause(p: JobParams, ctx: Context) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        job = _get(s, p.job_id)
        # Only from running, atomically: a run that ends meanwhile keeps its final state.
        flagged = db.set_status(s, job_id=job.id, status=JobStatus.running, only_from=[JobStatus.running],
                                cancel_requested=True, stop_reason="paused")
        if flagged is None:
            raise RPCError(VALIDATION_FAILED, f"job {p.job_id} is {job.status}; only running jobs pause",
                           {"job_id": p.job_id, "status": job.status})
        return {"job_id": job.id, "status": "pausing"}


@registry.method("training.resume", params=JobParams, mutates=True, errors=(NOT_FOUND, VALIDATION_FAILED),
                 permission="training:start",
                 summary="Queue a paused job again; it continues from its latest checkpoint")
def resume(p: JobParams, ctx: Context) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        job = _get(s, p.job_id)
        if job.status != JobStatus.paused:
            raise RPCError(VALIDATION_FAILED, f"job {p.job_id} is {job.status}; only paused jobs resume",
                           {"job_id": p.job_id, "status": job.status})
        db.set_status(s, job_id=job.id, status=JobStatus.queued, cancel_requested=False, stop_reason=None)
        priority = job.priority
    if ctx.queue is not None:
        ctx.queue.ack(p.job_id)  # its last run's entry may still be in the processing list; push skips those
        ctx.queue.push(p.job_id, priority=priority)
        ctx.queue.set_status(p.job_id, JobStatus.queued)
    from app.jobs.dispatcher import wake_dispatcher

    wake_dispatcher()
    return {"job_id": p.job_id, "status": "queued"}



class EvaluateParams(JobParams):
    checkpoint_id: str | None = Field(None, max_length=64)
    """a checkpoint of this job; its best checkpoint when left out"""
    evaluation_queries: list[Row] | None = Field(None, min_length=1, max_length=1000)
    """queries to score; the job's evaluation data (else its training data) when left out"""
    max_queries: int = Field(200, ge=1, le=1000)
    """at most this many of the job's own queries"""


def evaluation_task(base_model: str, checkpoint: str, rows: list[dict[str, str]], reward: str,
                    max_new_tokens: int, agent: dict[str, Any] | None = None,
                    reward_source: str | None = None, chat_template: bool | None = None) -> dict[str, Any]:
    """Runs on the cluster (a Ray task): score the checkpoint and its base model on the same queries
    (agent jobs: greedy episodes in their environment), prompted as the run prompted them."""
    from grpo.evaluate import compare, evaluate_model
    from grpo.tasks import Sample

    samples = [Sample(r["query"], r["expected_outcome"],
                      tuple((m["role"], m["content"]) for m in r["messages"]) if r.get("messages") else None)
               for r in rows]
    kw = {"reward": reward, "reward_source": reward_source, "max_new_tokens": max_new_tokens, "agent": agent,
          "chat_template": chat_template}
    tuned = evaluate_model(checkpoint, samples, **kw)
    base = evaluate_model(base_model, samples, **kw)
    return {
        "n_queries": len(samples), "success_rate": tuned.success_rate, "avg_reward": tuned.avg_reward,
        "avg_steps": tuned.avg_steps,
        "base_model": {"model": base_model, "success_rate": base.success_rate, "avg_reward": base.avg_reward},
        "comparison": compare(base.rewards, tuned.rewards),
    }


@registry.method("training.evaluate", params=EvaluateParams, errors=(NOT_FOUND, EVALUATION_FAILED),
                 permission="training:evaluate",
                 summary="Score a checkpoint against its base model on evaluation queries (runs on the cluster)")
async def evaluate(p: EvaluateParams, ctx: Context) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        job = _get(s, p.job_id)
        ckpt_id = p.checkpoint_id or job.best_checkpoint_id
        ckpt = db.get_checkpoint(s, checkpoint_id=ckpt_id) if ckpt_id else None
    if p.checkpoint_id and (ckpt is None or ckpt.job_id != job.id):
        raise RPCError(NOT_FOUND, f"checkpoint not found for job {job.id}: {p.checkpoint_id}",
                       {"checkpoint_id": p.checkpoint_id})
    if ckpt is None:
        raise RPCError(EVALUATION_FAILED, f"job {job.id} has no checkpoint yet", {"job_id": job.id})
    cfg = job.engine_config
    if p.evaluation_queries:
        rows = [r.engine_row() for r in p.evaluation_queries]
    else:
        source = Path(cfg.get("eval_dataset") or cfg["dataset"])
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][: p.max_queries]
    agent = None
    if cfg.get("environment"):  # the engine's agent keys, as the run used them
        agent = {k: cfg[k] for k in AGENT_ENGINE_KEYS if k in cfg}
    args = (cfg["model"], ckpt.path, rows, cfg.get("reward") or "exact_match", int(cfg.get("max_new_tokens", 64)),
            agent, cfg.get("reward_source"), cfg.get("chat_template"))
    try:
        import ray

        if ray.is_initialized():  # on the cluster, never in the replica's process
            runs_user_code = bool(cfg.get("reward_source")) or cfg.get("reward") == "code" or \
                cfg.get("environment") == "python"
            resources = placed_on(cfg.get("reward_worker_resources") or {}) if runs_user_code else None
            result = await ray.remote(num_cpus=1, resources=resources)(evaluation_task).remote(*args)
        else:  # the app outside Serve (tests, local tools): a worker thread keeps the event loop free
            result = await asyncio.to_thread(evaluation_task, *args)
    except Exception as e:  # any failure to load or score is the client's -40004, with the reason
        reason = str(e)[:500]
        if not caller_is_admin():  # the reason may name server folders: those are the admins' to read
            reason = reason.replace(str(ctx.settings.home), "<home>")
        raise RPCError(EVALUATION_FAILED, f"evaluation failed: {type(e).__name__}: {reason}",
                       {"job_id": job.id, "checkpoint_id": ckpt.id}) from None
    # the base model as the job named it (a resolved server path is shown to admins only)
    named = (job.config or {}).get("model") or "the server's default model"
    result["base_model"]["model"] = result["base_model"]["model"] if caller_is_admin() else named
    return {"job_id": job.id, "checkpoint_id": ckpt.id, "step": ckpt.step, **result}
