"""Settings of the control plane, read once from the environment (never from request data).

`DATABASE_URL` selects PostgreSQL (SQLite file under `RAYGRPO_HOME` by default), `REDIS_URL` turns on
the Redis fast path (queue, status keys); without it the database serves as the queue.
"""

from __future__ import annotations

import os
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field


def _secret(name: str) -> str | None:
    """A secret from NAME, or from the file NAME_FILE points at (Kubernetes Secrets mount as files)."""
    if os.environ.get(name):
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    return Path(path).read_text().strip() if path else None


class Settings(BaseModel):
    home: Path = Field(default_factory=lambda: Path(os.environ.get("RAYGRPO_HOME", "runs")).resolve())
    """root folder: the SQLite file, uploaded training data, run outputs"""
    database_url: str | None = Field(default_factory=lambda: os.environ.get("DATABASE_URL"))
    """SQLAlchemy URL; None means the SQLite file `home/raygrpo.db`"""
    redis_url: str | None = Field(default_factory=lambda: os.environ.get("REDIS_URL") or None)
    """Redis for the queue and status keys; None: the database alone"""
    api_port: int = Field(default_factory=lambda: int(os.environ.get("RAYGRPO_API_PORT", "8001")))
    """port of the Serve HTTP proxy for the job API"""
    gpu_hour_usd: Decimal = Field(default_factory=lambda: Decimal(os.environ.get("RAYGRPO_GPU_HOUR_USD", "2.50")))
    """price of one GPU for one hour"""
    cpu_hour_usd: Decimal = Field(default_factory=lambda: Decimal(os.environ.get("RAYGRPO_CPU_HOUR_USD", "0.05")))
    """price of one logical CPU for one hour"""

    default_model: str | None = Field(default_factory=lambda: os.environ.get("RAYGRPO_DEFAULT_MODEL") or None)
    """model a job trains when its config names none"""
    min_step_seconds: float = Field(default_factory=lambda: float(os.environ.get("RAYGRPO_MIN_STEP_SECONDS", "1.0")))
    """the shortest a step is assumed to take when checking that a budget covers one step"""
    cancel_wait_s: float = Field(default_factory=lambda: float(os.environ.get("RAYGRPO_CANCEL_WAIT_S", "60")))
    """how long training.cancel waits for a running job to checkpoint and stop"""
    max_running_jobs: int = Field(default_factory=lambda: int(os.environ.get("RAYGRPO_MAX_RUNNING_JOBS", "2")))
    """jobs the dispatcher runs at once; the rest wait in the queue"""
    ray_dashboard_url: str | None = Field(default_factory=lambda: os.environ.get("RAY_DASHBOARD_URL") or None)
    """the Ray Jobs API the dispatcher submits runs to; None: the dashboard of the cluster it runs on"""

    webhook_urls: list[str] = Field(
        default_factory=lambda: [u.strip() for u in os.environ.get("RAYGRPO_WEBHOOK_URLS", "").split(",") if u.strip()])
    """where job events are POSTed (comma-separated in the environment)"""
    webhook_secret: str | None = Field(default_factory=lambda: _secret("RAYGRPO_WEBHOOK_SECRET"), repr=False)
    """HMAC key of the webhook signatures (from the variable, or a file named by RAYGRPO_WEBHOOK_SECRET_FILE)"""

    auth: str = Field(default_factory=lambda: os.environ.get("RAYGRPO_AUTH", "on"), pattern="^(on|off)$")
    """`on`: every method but rpc.discover needs a JWT or API key; `off` (RAYGRPO_AUTH=off): every caller is
    a local admin, for a developer's own machine only"""
    jwt_secret: str | None = Field(default_factory=lambda: _secret("RAYGRPO_JWT_SECRET"), repr=False)
    """HS256 key (RAYGRPO_JWT_SECRET or the file RAYGRPO_JWT_SECRET_FILE); a local one under `home` when unset"""
    jwt_public_key: str | None = Field(default_factory=lambda: _secret("RAYGRPO_JWT_PUBLIC_KEY"), repr=False)
    """PEM public key: tokens are then RS256 only (RAYGRPO_JWT_PUBLIC_KEY or RAYGRPO_JWT_PUBLIC_KEY_FILE)"""
    jwt_audience: str = Field(default_factory=lambda: os.environ.get("RAYGRPO_JWT_AUDIENCE", "raygrpo"))
    jwt_issuer: str = Field(default_factory=lambda: os.environ.get("RAYGRPO_JWT_ISSUER", "raygrpo"))
    jwt_leeway_s: int = Field(default_factory=lambda: int(os.environ.get("RAYGRPO_JWT_LEEWAY_S", "30")))
    """clock skew tolerated on exp/iat"""
    rate_limits: dict[str, int] = Field(default_factory=lambda: _rate_limits(os.environ.get("RAYGRPO_RATE_LIMITS", "")))
    """calls per minute per principal and method; RAYGRPO_RATE_LIMITS="training.start_grpo=10,default=600" """
    dataset_storage_url: str | None = Field(
        default_factory=lambda: os.environ.get("RAYGRPO_DATASET_STORAGE_URL") or None)
    """where dataset files go: None means `home/datasets` (file://); `s3://bucket/prefix` (or any fsspec URL)
    needs fsspec and the protocol's package (s3fs)"""
    log_format: str = Field(default_factory=lambda: os.environ.get("RAYGRPO_LOG_FORMAT", "json"))
    """json (one object a line, with request and job ids) or text"""

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'raygrpo.db'}"

    @property
    def runs_dir(self) -> Path:
        return self.home / "jobs"


DEFAULT_RATE_LIMITS = {
    "training.start_grpo": 10, "training.get_status": 100, "training.cancel": 20, "training.evaluate": 5,
    "training.export_trajectories": 10, "default": 300,
}


def _rate_limits(spec: str) -> dict[str, int]:
    """`method=N,...` over the defaults; `default=N` applies to every method not named; 0 disables a limit."""
    limits = dict(DEFAULT_RATE_LIMITS)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"RAYGRPO_RATE_LIMITS: {part!r} is not method=N")
        limits[name.strip()] = int(value)
    return limits


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
