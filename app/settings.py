"""Settings of the control plane: typed, read once from the environment (never from request data).

Each field's variable is `RAYGRPO_<FIELD>` unless its alias says otherwise (`DATABASE_URL`, `REDIS_URL`,
`RAY_DASHBOARD_URL`); any of them may instead name a file in `<VARIABLE>_FILE` (Kubernetes Secrets mount as
files), which is how secrets should arrive. A bad value fails at start-up naming the variable, e.g.
`invalid setting RAYGRPO_API_PORT: Input should be a valid integer`.
`DATABASE_URL` selects PostgreSQL (SQLite file under `RAYGRPO_HOME` by default), `REDIS_URL` turns on
the Redis fast path (queue, status keys, rate-limit buckets); without it the database serves as the queue.
Read by every app package; it imports nothing of the project.
"""

from __future__ import annotations

import os
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic_settings
from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

PREFIX = "RAYGRPO_"
PLACEHOLDER = "CHANGE-ME"
"""how every value of kuberay/secrets.yaml starts: a server given one refuses to start"""
MIN_JWT_SECRET_BYTES = 32


class SettingsError(ValueError):
    """A setting from the environment that does not parse; the message names the variable."""


def _alias(name: str) -> AliasChoices:
    """A field read from a variable without the RAYGRPO_ prefix (and by its own name in code)."""
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    # env_ignore_empty: a variable set to "" counts as unset, so its `_FILE` (or the default) applies
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", populate_by_name=True,
                                      use_attribute_docstrings=True, validate_default=True, env_ignore_empty=True)

    home: Path = Path("runs")
    """root folder: the SQLite file, uploaded training data, run outputs (RAYGRPO_HOME)"""
    database_url: str | None = Field(None, validation_alias=_alias("DATABASE_URL"), repr=False)
    """SQLAlchemy URL (DATABASE_URL); None means the SQLite file `home/raygrpo.db`. Holds a password in
    production, so it is kept out of repr and logs"""
    redis_url: str | None = Field(None, validation_alias=_alias("REDIS_URL"), repr=False)
    """Redis for the queue and status keys (REDIS_URL); None: the database alone"""
    api_port: int = Field(8001, ge=1, le=65535)
    """port of the Serve HTTP proxy for the job API"""
    gpu_hour_usd: Decimal = Field(Decimal("2.50"), ge=0)
    """price of one GPU for one hour"""
    cpu_hour_usd: Decimal = Field(Decimal("0.05"), ge=0)
    """price of one logical CPU for one hour"""

    default_model: str | None = None
    """model a job trains when its config names none"""
    storage_url: str | None = None
    """where jobs keep their run files (checkpoints, metrics, trajectories): a URL such as s3://bucket/prefix
    (any pyarrow filesystem; credentials from the nodes' own AWS_* variables, never passed to a job), needed
    once workers span nodes; unset: home/jobs, one node or a folder every node mounts"""
    min_step_seconds: float = Field(1.0, gt=0)
    """the shortest a step is assumed to take when checking that a budget covers one step"""
    cancel_wait_s: float = Field(60.0, ge=0)
    """how long training.cancel waits for a running job to checkpoint and stop"""
    deployment_reconcile_s: float = Field(30.0, ge=0)
    """how often the dispatcher makes Serve run every policy deployment the database holds (a new cluster, a
    Serve restart, an application deleted behind the API's back); 0 turns it off"""
    driver_restarts: int = Field(2, ge=0, le=100)
    """how often a job whose run's driver died without reporting (killed, out of memory, its node lost) is queued
    again, to resume from its checkpoint; 0: such a job fails"""
    max_running_jobs: int = Field(2, ge=0)
    """the most jobs the dispatcher runs at once (0: it starts none); below it, resources decide"""
    cluster_capacity: dict[str, Annotated[float, Field(ge=0)]] = {}
    """the most of each resource the cluster can ever have, for admitting jobs, as JSON:
    RAYGRPO_CLUSTER_CAPACITY='{"CPU": 96, "GPU": 8}'. Resources left out: the autoscaler's maximum where Ray
    publishes it (autoscaler v2, KubeRay), else what the cluster has now; set it for a v1 autoscaler"""
    ray_dashboard_url: str | None = Field(None, validation_alias=_alias("RAY_DASHBOARD_URL"))
    """the Ray Jobs API the dispatcher submits runs to (RAY_DASHBOARD_URL); None: the dashboard of the
    cluster it runs on"""

    allowed_rewards: Annotated[list[str], NoDecode] = []
    """`module:function` rewards jobs may name besides the built-ins and the `raygrpo.rewards` entry points
    (comma-separated in RAYGRPO_ALLOWED_REWARDS); any other import path in a request is refused"""
    allowed_environments: Annotated[list[str], NoDecode] = []
    """`module:Class` environments jobs may name besides the built-ins and the `raygrpo.environments` entry
    points (RAYGRPO_ALLOWED_ENVIRONMENTS, comma-separated)"""
    model_roots: Annotated[list[Path], NoDecode] = []
    """folders a job's local `model`/`tokenizer` must lie under (RAYGRPO_MODEL_ROOTS, comma-separated); always
    also `home/models` and the folder of `default_model`"""
    reward_worker_resources: dict[str, Annotated[float, Field(gt=0)]] = {}
    """custom Ray resources every job's reward actors ask for, as JSON, e.g. RAYGRPO_REWARD_WORKER_RESOURCES=
    '{"sandbox": 1}' to run the user code of every job on the gVisor group (kuberay/); jobs cannot change it"""
    allow_hub_models: bool = True
    """whether a job may name a Hugging Face Hub id (downloaded by the workers) as its model"""

    webhook_urls: Annotated[list[str], NoDecode] = []
    """where job events are POSTed (comma-separated in RAYGRPO_WEBHOOK_URLS)"""
    webhook_secret: str | None = Field(None, repr=False)
    """HMAC key of the webhook signatures (RAYGRPO_WEBHOOK_SECRET or the file RAYGRPO_WEBHOOK_SECRET_FILE)"""

    auth: Literal["on", "off"] = "on"
    """`on`: every method but rpc.discover needs a JWT or API key; `off` (RAYGRPO_AUTH=off): every caller is
    a local admin, for a developer's own machine only"""
    jwt_secret: str | None = Field(None, repr=False)
    """HS256 key (RAYGRPO_JWT_SECRET or the file RAYGRPO_JWT_SECRET_FILE); a local one under `home` when unset"""
    jwt_public_key: str | None = Field(None, repr=False)
    """PEM public key: tokens are then RS256 only (RAYGRPO_JWT_PUBLIC_KEY or RAYGRPO_JWT_PUBLIC_KEY_FILE)"""
    jwt_audience: str = "raygrpo"
    jwt_issuer: str = "raygrpo"
    jwt_leeway_s: int = Field(30, ge=0, le=3600)
    """clock skew tolerated on exp/iat"""
    metrics_token: str | None = Field(None, repr=False)
    """the scrape credential of GET /metrics (RAYGRPO_METRICS_TOKEN or the file RAYGRPO_METRICS_TOKEN_FILE), sent as
    `Authorization: Bearer <token>`; it, or an admin's token or key, sees per-job series, anyone else the rest"""
    rate_limits: Annotated[dict[str, int], NoDecode] = {}
    """calls per minute per principal and method over the defaults; RAYGRPO_RATE_LIMITS="training.start_grpo=10,default=600" """
    dataset_storage_url: str | None = None
    """where dataset files go: None means `home/datasets` (file://); `s3://bucket/prefix` (or any fsspec URL)
    needs fsspec and the protocol's package (s3fs)"""
    log_format: Literal["json", "text"] = "json"
    """json (one object a line, with request and job ids) or text"""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            first = e.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "?"
            raise SettingsError(f"invalid setting {env_name(field)}: {first['msg']}") from None
        except pydantic_settings.SettingsError as e:  # a source failed: ours carries the message
            cause = e.__cause__ or e.__context__
            raise (cause if isinstance(cause, SettingsError) else SettingsError(str(e))) from None

    @field_validator("home", mode="after")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("database_url", "redis_url", "ray_dashboard_url", "default_model", "dataset_storage_url",
                     "webhook_secret", "jwt_secret", "jwt_public_key", "metrics_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("jwt_secret", "webhook_secret", "metrics_token", mode="after")
    @classmethod
    def _not_a_placeholder(cls, v: str | None, info: Any) -> str | None:
        """Refuse the shipped placeholders (kuberay/secrets.yaml: CHANGE-ME-...) and, for the signing key, anything
        shorter than 32 bytes: a key anyone can read or guess would let anyone mint an admin's token."""
        if v is None:
            return v
        if v.startswith(PLACEHOLDER):
            raise ValueError("is the shipped placeholder (CHANGE-ME-...); set a random key, e.g. openssl rand -hex 32")
        if info.field_name == "jwt_secret" and len(v.encode()) < MIN_JWT_SECRET_BYTES:
            raise ValueError(f"is {len(v.encode())} bytes; an HS256 key needs at least {MIN_JWT_SECRET_BYTES} "
                             "(openssl rand -hex 32)")
        return v

    @field_validator("storage_url", mode="after")
    @classmethod
    def _a_storage_url(cls, v: str | None) -> str | None:
        """A URL pyarrow opens (s3://bucket/prefix); the shipped placeholder and local paths are refused (a
        local folder is RAYGRPO_HOME's business)."""
        if v is None or not v.strip():
            return None
        if v.startswith(PLACEHOLDER):
            raise ValueError("is the shipped placeholder (CHANGE-ME...); set your bucket (s3://bucket/prefix) or "
                             "leave RAYGRPO_STORAGE_URL unset to keep runs under RAYGRPO_HOME")
        from grpo.storage import is_url

        if not is_url(v):
            raise ValueError(f"{v[:100]!r} is not a URL (s3://bucket/prefix); a shared folder is RAYGRPO_HOME")
        return v.rstrip("/")

    @field_validator("webhook_urls", "allowed_rewards", "allowed_environments", "model_roots", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        return [u.strip() for u in v.split(",") if u.strip()] if isinstance(v, str) else v

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _limits(cls, v: Any) -> Any:
        """`method=N,...` over the defaults; `default=N` applies to every method not named; 0 disables a
        limit. A dict given in code replaces the defaults."""
        if not isinstance(v, str):
            return v if v else dict(DEFAULT_RATE_LIMITS)
        limits = dict(DEFAULT_RATE_LIMITS)
        for part in filter(None, (p.strip() for p in v.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit():
                raise ValueError(f"{part!r} is not method=N")
            limits[name.strip()] = int(value)
        return limits

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        return init_settings, env_settings, FileVariableSource(settings_cls)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'raygrpo.db'}"

    @property
    def model_root_dirs(self) -> list[Path]:
        """Every folder a job's local model may come from, resolved (symlinks followed)."""
        roots = [self.home / "models", *self.model_roots]
        if self.default_model and Path(self.default_model).expanduser().is_dir():
            roots.append(Path(self.default_model).expanduser().parent)
        return [Path(r).expanduser().resolve() for r in roots]

    @property
    def runs_dir(self) -> Path:
        return self.home / "jobs"


DEFAULT_RATE_LIMITS = {
    "training.start_grpo": 10, "training.get_status": 100, "training.cancel": 20, "training.evaluate": 5,
    "training.export_trajectories": 10, "policy.generate": 600, "default": 300,
}


def env_name(field: str) -> str:
    """The variable a field is read from."""
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        return str(info.validation_alias.choices[0])
    return f"{PREFIX}{field.upper()}"


class FileVariableSource(EnvSettingsSource):
    """`<VARIABLE>_FILE`: the value is the content of that file (trailing newline stripped). Consulted after
    the variables themselves, so a value set directly wins."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        path = os.environ.get(env_name(field_name) + "_FILE")
        if not path:
            return None, field_name, False
        try:
            return Path(path).read_text().strip(), field_name, False
        except OSError as e:
            raise SettingsError(f"invalid setting {env_name(field_name)}_FILE: cannot read {path}: "
                                f"{e.strerror}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
