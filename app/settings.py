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
    ray_dashboard_url: str = Field(
        default_factory=lambda: os.environ.get("RAY_DASHBOARD_URL", "http://127.0.0.1:8265"))
    """the Ray Jobs API the dispatcher submits runs to"""

    webhook_urls: list[str] = Field(
        default_factory=lambda: [u.strip() for u in os.environ.get("RAYGRPO_WEBHOOK_URLS", "").split(",") if u.strip()])
    """where job events are POSTed (comma-separated in the environment)"""
    webhook_secret: str | None = Field(default_factory=lambda: _secret("RAYGRPO_WEBHOOK_SECRET"), repr=False)
    """HMAC key of the webhook signatures (from the variable, or a file named by RAYGRPO_WEBHOOK_SECRET_FILE)"""

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'raygrpo.db'}"

    @property
    def runs_dir(self) -> Path:
        return self.home / "jobs"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
