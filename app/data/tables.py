"""Tables of the job API (sqlmodel). The database is the source of truth for jobs, trajectories and
checkpoints; Redis only carries the queue and fast status copies.

Families follow the FastAPI template: `*Base` (shared columns), the `table=True` class, and the
public reply shapes live beside the JSON-RPC methods that return them. Money is `Decimal` in a
NUMERIC column, never a float.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    paused = "paused"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


MONEY = Numeric(14, 6)


class UTCDateTime(TypeDecorator[datetime]):
    """A UTC instant: stored naive in UTC (the same on SQLite and PostgreSQL), always read back aware.

    Plain `DateTime` drops the zone on SQLite and returns naive values everywhere, so `utcnow() - started_at`
    would raise and cursors would compare local against UTC times.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class TrainingJob(SQLModel, table=True):
    """One GRPO training job: what was asked, where it is, what it cost."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        UniqueConstraint("idempotency_key", name="uq_training_jobs_idempotency_key"),
        Index("ix_training_jobs_agent_created", "agent_id", "created_at"),
        Index("ix_training_jobs_status_priority", "status", "priority", "created_at"),
    )

    id: str = Field(default_factory=lambda: new_id("job"), primary_key=True, max_length=64)
    agent_id: str = Field(index=True, max_length=256)
    owner: str | None = Field(default=None, index=True, max_length=256)
    status: str = Field(default=JobStatus.queued, index=True, max_length=16)
    priority: int = Field(default=0)
    idempotency_key: str | None = Field(default=None, max_length=256)

    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """the request's config as accepted (API field names)"""
    engine_config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """the resolved grpo.config.GRPOConfig the run starts with"""
    training_rows: int = 0
    evaluation_rows: int = 0

    total_iterations: int
    current_iteration: int = 0
    trajectories_generated: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """the latest step's metrics (loss, reward_mean, reward_std, kl, ...)"""

    budget_usd: Decimal | None = Field(default=None, sa_column=Column(MONEY, nullable=True))
    cost_usd: Decimal = Field(default=Decimal("0"), sa_column=Column(MONEY, nullable=False, server_default="0"))
    budget_warned_pct: int = 0
    """highest budget warning sent (0, 75, 90)"""

    cancel_requested: bool = False
    stop_reason: str | None = Field(default=None, max_length=64)
    """why a run stopped early: cancelled, budget_exceeded, paused"""
    error_message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    best_checkpoint_id: str | None = Field(default=None, max_length=64)
    ray_submission_id: str | None = Field(default=None, max_length=128)
    attempts: int = 0

    created_at: datetime = Field(default_factory=utcnow, index=True, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cancelled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Trajectory(SQLModel, table=True):
    """One sampled completion (or agent trajectory) with its reward, as the run produced it."""

    __tablename__ = "trajectories"
    __table_args__ = (
        Index("ix_trajectories_job_step", "job_id", "step"),
        Index("ix_trajectories_job_reward", "job_id", "reward"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="training_jobs.id", max_length=64)
    step: int
    query: str = Field(sa_column=Column(Text, nullable=False))
    completion: str = Field(sa_column=Column(Text, nullable=False))
    expected: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    reward: float
    advantage: float = 0.0
    success: bool = False
    finish_reason: str | None = Field(default=None, max_length=16)
    tokens: int = 0
    policy_version: int = 0
    steps: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """multi-turn agent steps (observation, action, tool result, reward, timestamps), when any"""
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PolicyCheckpoint(SQLModel, table=True):
    """A checkpoint of a job: a Hugging Face directory on the run's storage."""

    __tablename__ = "policy_checkpoints"
    __table_args__ = (Index("ix_policy_checkpoints_job_step", "job_id", "step"),)

    id: str = Field(default_factory=lambda: new_id("ckpt"), primary_key=True, max_length=64)
    job_id: str = Field(foreign_key="training_jobs.id", max_length=64)
    step: int
    path: str = Field(sa_column=Column(Text, nullable=False))
    eval_reward: float | None = None
    is_best: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ApiKey(SQLModel, table=True):
    """An API key: only its SHA-256 is stored; the key itself is shown once, when issued."""

    __tablename__ = "api_keys"

    id: str = Field(default_factory=lambda: new_id("key"), primary_key=True, max_length=64)
    key_hash: str = Field(unique=True, max_length=64)
    """hex SHA-256 of the whole key"""
    prefix: str = Field(max_length=16)
    """the key's first characters, to tell keys apart in listings"""
    owner: str = Field(index=True, max_length=256)
    role: str = Field(max_length=32)
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """permissions of the key; empty means all of the role's"""
    name: str | None = Field(default=None, max_length=256)
    created_by: str | None = Field(default=None, max_length=256)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class AuditEntry(SQLModel, table=True):
    """One state-changing call: who, what, when, from where, and how it ended."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_principal_created", "principal", "created_at"),
        Index("ix_audit_log_method_created", "method", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow, index=True, sa_type=UTCDateTime)
    principal: str = Field(max_length=256)
    auth_method: str = Field(max_length=16)
    """jwt, api_key, or local"""
    method: str = Field(max_length=128)
    target: str | None = Field(default=None, max_length=256)
    """the object acted on (job id, key id, ...) when there is one"""
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """the call's params with secrets and bulk data left out"""
    outcome: str = Field(max_length=16)
    """ok or error"""
    error_code: int | None = None
    client_ip: str | None = Field(default=None, max_length=64)
    request_id: str | None = Field(default=None, max_length=64)


class PolicyDeployment(SQLModel, table=True):
    """A policy served on Ray Serve (models.deploy): what was asked; Serve reports how it is doing."""

    __tablename__ = "policy_deployments"

    name: str = Field(primary_key=True, max_length=64)
    """also the Serve application (`policy-<name>`) and the route prefix (`/policies/<name>`)"""
    owner: str | None = Field(default=None, index=True, max_length=256)
    variants: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """[{name, path, weight, checkpoint_id}] as app.serving.policy.VariantSpec"""
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """replicas, autoscaling, gpus_per_replica, cpus_per_replica, batching, max_batch_size"""
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# ---- research registry (app.research): experiments, runs, metric series, models, datasets, prompts, evaluations

class ExperimentStatus(StrEnum):
    draft = "draft"
    active = "active"
    paused = "paused"
    completed = "completed"
    failed = "failed"
    archived = "archived"


EXPERIMENT_TRANSITIONS: dict[str, frozenset[str]] = {
    "draft": frozenset({"active"}),
    "active": frozenset({"paused", "completed", "failed"}),
    "paused": frozenset({"active", "completed", "failed"}),
    "completed": frozenset({"archived"}),
    "failed": frozenset({"archived"}),
    "archived": frozenset(),
}
"""The legal moves of an experiment; anything else is refused (-40002) naming the allowed ones."""


class RegistryMember(SQLModel, table=True):
    """A collaborator of a registry object (experiment, model, dataset, template): may read and write it.

    The object's `collaborators` column keeps the same list for replies; this table is what list
    filters query, so "everything I may see" is one indexed lookup on any database."""

    __tablename__ = "registry_members"
    __table_args__ = (Index("ix_registry_members_kind_subject", "kind", "subject"),)

    kind: str = Field(primary_key=True, max_length=16)
    object_id: str = Field(primary_key=True, max_length=64)
    subject: str = Field(primary_key=True, max_length=256)


class RegistryTag(SQLModel, table=True):
    """A tag of a registry object, for the `tag` filter of every list (the row's `tags` column is the copy replies read)."""

    __tablename__ = "registry_tags"
    __table_args__ = (Index("ix_registry_tags_kind_tag", "kind", "tag"),)

    kind: str = Field(primary_key=True, max_length=16)
    object_id: str = Field(primary_key=True, max_length=64)
    tag: str = Field(primary_key=True, max_length=64)


class Experiment(SQLModel, table=True):
    """A research question with its runs; owned by one user, shared with collaborators."""

    __tablename__ = "experiments"
    __table_args__ = (Index("ix_experiments_created", "created_at", "id"),)

    id: str = Field(default_factory=lambda: new_id("exp"), primary_key=True, max_length=64)
    name: str = Field(max_length=256, index=True)
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    hypothesis: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    owner: str = Field(max_length=256, index=True)
    collaborators: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    """free-form metadata (`metadata` on the wire; the attribute name is SQLAlchemy's own)"""
    status: str = Field(default=ExperimentStatus.draft, max_length=16, index=True)
    run_count: int = 0
    """runs created so far: the next run's number is run_count + 1"""
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    """soft delete: the experiment's runs, series and evaluations stay for the record"""


class Run(SQLModel, table=True):
    """One attempt under an experiment, numbered 1, 2, ... per experiment; optionally a training job's."""

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("experiment_id", "number", name="uq_runs_experiment_number"),
        Index("ix_runs_experiment_created", "experiment_id", "created_at", "id"),
    )

    id: str = Field(default_factory=lambda: new_id("run"), primary_key=True, max_length=64)
    experiment_id: str = Field(foreign_key="experiments.id", max_length=64)
    number: int
    name: str | None = Field(default=None, max_length=256)
    status: str = Field(default="running", max_length=16)
    """running, completed or failed"""
    job_id: str | None = Field(default=None, foreign_key="training_jobs.id", max_length=64, index=True)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    final_metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error_message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_by: str = Field(max_length=256)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class MetricSeries(SQLModel, table=True):
    """One named metric of one run. Points refer to it by a small integer, so a million points do not
    repeat the run id and metric name a million times (in the rows or in the index)."""

    __tablename__ = "metric_series"
    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_metric_series_run_name"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.id", max_length=64)
    name: str = Field(max_length=256)


class MetricPoint(SQLModel, table=True):
    """(series, step) -> value at a time. The primary key is the (run, metric, step) index range queries
    and downsampling scan; a step written twice (a resumed job re-running it) keeps the last value."""

    __tablename__ = "metric_points"

    series_id: int = Field(sa_column=Column(Integer, ForeignKey("metric_series.id"), primary_key=True,
                                            autoincrement=False))
    step: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    value: float
    ts: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class MetricRollup(SQLModel, table=True):
    """A block of ROLLUP_STEPS consecutive steps of one series, summarised (app.research.series): rewritten
    for the blocks each write touches, so a whole-run downsampled query reads a thousand of these
    instead of a million points."""

    __tablename__ = "metric_rollups"

    series_id: int = Field(sa_column=Column(Integer, ForeignKey("metric_series.id"), primary_key=True,
                                            autoincrement=False))
    block: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    """step // ROLLUP_STEPS"""
    n: int
    vmin: float
    vmax: float
    vsum: float
    step_min: int = Field(sa_column=Column(BigInteger, nullable=False))
    step_max: int = Field(sa_column=Column(BigInteger, nullable=False))
    last_value: float
    """the value at step_max"""
    last_ts: datetime = Field(sa_type=UTCDateTime)


class RegisteredModel(SQLModel, table=True):
    """A model the team uses: a provider's model id and version, or a training job's checkpoint."""

    __tablename__ = "registered_models"
    __table_args__ = (Index("ix_registered_models_created", "created_at", "id"),)

    id: str = Field(default_factory=lambda: new_id("mdl"), primary_key=True, max_length=64)
    name: str = Field(max_length=256, index=True)
    provider: str = Field(max_length=32)
    model_identifier: str = Field(max_length=1000)
    version: str = Field(max_length=64)
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    owner: str = Field(max_length=256, index=True)
    collaborators: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="registered", max_length=16)
    job_id: str | None = Field(default=None, foreign_key="training_jobs.id", max_length=64)
    checkpoint_id: str | None = Field(default=None, foreign_key="policy_checkpoints.id", max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Dataset(SQLModel, table=True):
    """A named dataset; its content lives in immutable versions."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_created", "created_at", "id"),)

    id: str = Field(default_factory=lambda: new_id("ds"), primary_key=True, max_length=64)
    name: str = Field(max_length=256, index=True)
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    owner: str = Field(max_length=256, index=True)
    collaborators: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="active", max_length=16)
    latest_version: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DatasetVersion(SQLModel, table=True):
    """An immutable file of a dataset: where it is stored and the SHA-256 that proves it unchanged."""

    __tablename__ = "dataset_versions"

    dataset_id: str = Field(foreign_key="datasets.id", primary_key=True, max_length=64)
    version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    content_hash: str = Field(max_length=64, index=True)
    """hex SHA-256 of the file"""
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    sample_count: int
    row_schema: dict[str, Any] = Field(default_factory=dict, sa_column=Column("schema", JSON, nullable=False))
    """field -> JSON type seen in the rows (`schema` on the wire)"""
    change_description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    storage_url: str = Field(sa_column=Column(Text, nullable=False))
    created_by: str = Field(max_length=256)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PromptTemplate(SQLModel, table=True):
    """A named prompt template; its text lives in versions."""

    __tablename__ = "prompt_templates"
    __table_args__ = (Index("ix_prompt_templates_created", "created_at", "id"),)

    id: str = Field(default_factory=lambda: new_id("tpl"), primary_key=True, max_length=64)
    name: str = Field(max_length=256, index=True)
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    owner: str = Field(max_length=256, index=True)
    collaborators: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="active", max_length=16)
    latest_version: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class PromptTemplateVersion(SQLModel, table=True):
    """An immutable template text with the variables it declares."""

    __tablename__ = "prompt_template_versions"

    template_id: str = Field(foreign_key="prompt_templates.id", primary_key=True, max_length=64)
    version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    template: str = Field(sa_column=Column(Text, nullable=False))
    variables: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    change_description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_by: str = Field(max_length=256)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Evaluation(SQLModel, table=True):
    """One evaluation result of an experiment (and optionally of one of its runs, and a model)."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_experiment_created", "experiment_id", "created_at", "id"),)

    id: str = Field(default_factory=lambda: new_id("eval"), primary_key=True, max_length=64)
    experiment_id: str = Field(foreign_key="experiments.id", max_length=64)
    run_id: str | None = Field(default=None, foreign_key="runs.id", max_length=64, index=True)
    model_id: str | None = Field(default=None, foreign_key="registered_models.id", max_length=64, index=True)
    name: str = Field(max_length=256)
    dataset_id: str | None = Field(default=None, max_length=64)
    dataset_version: int | None = None
    samples: int
    avg_latency_ms: float | None = None
    tokens: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    cost_usd: Decimal = Field(default=Decimal("0"), sa_column=Column(MONEY, nullable=False))
    accuracy: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """custom metrics, name -> number"""
    created_by: str = Field(max_length=256)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
