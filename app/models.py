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

from sqlalchemy import JSON, Column, DateTime, Dialect, Index, Numeric, Text, TypeDecorator, UniqueConstraint
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
    """[{name, path, weight, checkpoint_id}] as app.policy.VariantSpec"""
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """replicas, autoscaling, gpus_per_replica, cpus_per_replica, batching, max_batch_size"""
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
