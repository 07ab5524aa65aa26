"""What a job submitted through the API may make the cluster run or read.

The job API serves many users on one cluster, so nothing a request names is imported or opened unless
the operator put it there: rewards and environments are built-ins, installed plugins (entry points, see
grpo/plugins.py) or import paths on the operator's allow-list (RAYGRPO_ALLOWED_REWARDS,
RAYGRPO_ALLOWED_ENVIRONMENTS); every model a request names goes through `resolve_model` (model roots,
ownership of job and session folders, the Hub switch). These checks run before anything is imported, loaded
or started. Code a caller sends (reward source) is compiled here, never run: it runs only in the sandbox
(grpo/sandbox.py). The operator's own CLI (`python -m grpo.run`) is not bound by them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.api.jsonrpc import NOT_FOUND, VALIDATION_FAILED, RPCError
from app.settings import Settings

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def check_import_spec(field: str, spec: str | None, allowed: list[str], *, kind: str, variable: str) -> None:
    """Refuse an import path (`module:attr`) that the operator has not allowed. Names (no ':') are looked
    up among built-ins and installed plugins only, so they cannot reach an arbitrary module."""
    if spec is None or ":" not in spec or spec in allowed:
        return
    raise RPCError(VALIDATION_FAILED, f"{field}: {spec!r} is not allowed on this server: name a built-in or "
                   f"installed {kind} plugin, or ask the operator to add the import path to {variable}",
                   {"field": field, "allowed": sorted(allowed)})


def check_job_imports(mapping: dict, settings: Settings, *, reward_field: str, environment_field: str) -> None:
    check_import_spec(reward_field, mapping.get("reward"), settings.allowed_rewards, kind="reward",
                      variable="RAYGRPO_ALLOWED_REWARDS")
    check_import_spec(environment_field, mapping.get("environment"), settings.allowed_environments,
                      kind="environment", variable="RAYGRPO_ALLOWED_ENVIRONMENTS")


# A model named by reference instead of by path: a checkpoint of one of your jobs, or weights a training
# session of yours saved (sessions.save_weights answers with this reference).
_REFERENCE = re.compile(r"^(checkpoint|weights):(.{1,200})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelRef:
    """A model a request may use: what the engine loads, and what replies may show."""

    load: str
    """an absolute directory on the server, or a Hugging Face Hub id"""
    shown: str
    """the caller's own words for it (a reference, a Hub id, the path as they gave it): never a resolved path"""
    checkpoint_id: str | None = None
    local: bool = False


def session_weights_dir(settings: Settings, session_id: str, name: str) -> Path:
    """Where sessions.save_weights puts a session's weights (inside home/models, so it must be owner-checked)."""
    return settings.home / "models" / "sessions" / session_id / name


def _not_found(field: str, value: str) -> RPCError:
    return RPCError(NOT_FOUND, f"{field}: model not found: {value[:200]}", {"field": field})


def _owner_area(real: Path, settings: Settings) -> tuple[str, str | None] | None:
    """Whose folder a resolved path lies in: ("job", id), ("session", id), ("server", None) for the server's own
    (staging, the folders above jobs), or None outside every owned area."""
    areas = ((settings.runs_dir.resolve(), "job"), ((settings.home / "models" / "sessions").resolve(), "session"))
    for base, kind in areas:
        if real == base or real.is_relative_to(base):
            parts = real.relative_to(base).parts
            if kind == "job" and parts[:1] == ("sessions",):  # runs_dir/sessions/<id>: sessions' saved states
                kind, parts = "session", parts[1:]
            if not parts or parts[0] == "staging":
                return "server", None
            return kind, parts[0]
    return None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long, a NUL byte: not a directory of ours
        return False


def resolve_model(field: str, value: str, *, settings: Settings, session: Any) -> ModelRef:
    """The one way a request's model reaches the cluster (training.start_grpo, sessions.create, models.deploy):
    checkpoint:<id> and weights:<session_id>/<name> references, a directory, or a Hub id.

    - A directory must lie under the model roots (RAYGRPO_MODEL_ROOTS, home/models, the default model's
      folder; symlinks followed), or inside a job's or session's folder of the caller's own. Another user's
      folder, checkpoint or weights are "not found", exactly like missing ones, so their existence does not leak.
    - A Hub id is taken only while RAYGRPO_ALLOW_HUB_MODELS is on.
    Called before anything is loaded; the reply never shows what a reference resolved to."""
    from app.api.auth import current_principal
    from app.data.tables import PolicyCheckpoint, TrainingJob, TrainingSession

    me = current_principal()
    ref = _REFERENCE.match(value)
    if ref is not None:
        kind, rest = ref.groups()
        if kind == "checkpoint":
            ckpt = session.get(PolicyCheckpoint, rest)
            job = session.get(TrainingJob, ckpt.job_id) if ckpt is not None else None
            if job is None or not me.owns(job.owner):
                raise _not_found(field, value)
            return ModelRef(load=ckpt.path, shown=value, checkpoint_id=ckpt.id, local=True)
        session_id, _, name = rest.partition("/")
        row = session.get(TrainingSession, session_id) if _NAME.match(session_id) and _NAME.match(name) else None
        path = session_weights_dir(settings, session_id, name)
        if row is None or not me.owns(row.owner) or not _is_dir(path):
            raise _not_found(field, value)
        return ModelRef(load=str(path.resolve()), shown=value, local=True)
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith((".", "~")) or _is_dir(path):
        try:
            real = path.resolve()
        except (OSError, RuntimeError, ValueError):  # a name too long, a symlink loop, a NUL byte
            raise RPCError(VALIDATION_FAILED, f"{field}: {value[:100]!r} is not a usable path", {"field": field}) from None
        area = _owner_area(real, settings)
        if area is not None:
            kind, owner_id = area
            table = TrainingJob if kind == "job" else TrainingSession
            row = session.get(table, owner_id) if owner_id else None
            if row is None or not me.owns(row.owner) or not _is_dir(real):
                raise _not_found(field, value)
            return ModelRef(load=str(real), shown=value, local=True)
        if not any(real == root or real.is_relative_to(root) for root in settings.model_root_dirs):
            raise RPCError(VALIDATION_FAILED, f"{field}: local models must lie under this server's model roots "
                           "(RAYGRPO_MODEL_ROOTS, home/models, the default model's folder); register the model or "
                           "ask the operator", {"field": field})
        return ModelRef(load=str(real), shown=value, local=True)
    if ".." in Path(value).parts:
        raise RPCError(VALIDATION_FAILED, f"{field}: {value[:100]!r} climbs out of its folder ('..')",
                       {"field": field})
    if not _HUB_ID.match(value) or ".." in value:
        raise RPCError(VALIDATION_FAILED, f"{field}: {value[:100]!r} is neither a Hugging Face Hub id "
                       "(org/name) nor a model directory on this server", {"field": field})
    if not settings.allow_hub_models:
        raise RPCError(VALIDATION_FAILED, f"{field}: this server does not download models from the Hub "
                       "(RAYGRPO_ALLOW_HUB_MODELS=false); name a model under its model roots", {"field": field})
    return ModelRef(load=value, shown=value)
