"""What a job submitted through the API may make the cluster run or read.

The job API serves many users on one cluster, so nothing a request names is imported or opened unless
the operator put it there: rewards and environments are built-ins, installed plugins (entry points, see
grpo/plugins.py) or import paths on the operator's allow-list (RAYGRPO_ALLOWED_REWARDS,
RAYGRPO_ALLOWED_ENVIRONMENTS); a local model or tokenizer lies under an operator-set root, and a Hub id
is taken only while RAYGRPO_ALLOW_HUB_MODELS is on. These checks run before anything is imported, loaded
or started. The operator's own CLI (`python -m grpo.run`) is not bound by them.
"""

from __future__ import annotations

import re
from pathlib import Path

from app.api.jsonrpc import VALIDATION_FAILED, RPCError
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


def check_model_source(field: str, value: str | None, settings: Settings, *, resolved: bool = True) -> None:
    """A path (absolute, or starting with `.` or `~`) must lie under a model root, symlinks followed;
    anything else is a Hub id. Called on the request's value before any file is looked at, and again on
    the engine config's, where a relative name that is a local directory has become an absolute path."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith((".", "~")):
        real = path.resolve()
        roots = settings.model_root_dirs
        if any(real == root or real.is_relative_to(root) for root in roots):
            return
        raise RPCError(VALIDATION_FAILED, f"{field}: local models must lie under this server's model roots "
                       "(RAYGRPO_MODEL_ROOTS, home/models, the default model's folder); register the model or "
                       "ask the operator", {"field": field})
    if ".." in Path(value).parts:
        raise RPCError(VALIDATION_FAILED, f"{field}: {value[:100]!r} climbs out of its folder ('..')",
                       {"field": field})
    if not resolved:  # a relative name: a local folder or a Hub id, told apart once the config resolved it
        return
    if not _HUB_ID.match(value) or ".." in value:
        raise RPCError(VALIDATION_FAILED, f"{field}: {value[:100]!r} is neither a Hugging Face Hub id "
                       "(org/name) nor a model directory on this server", {"field": field})
    if not settings.allow_hub_models:
        raise RPCError(VALIDATION_FAILED, f"{field}: this server does not download models from the Hub "
                       "(RAYGRPO_ALLOW_HUB_MODELS=false); name a model under its model roots", {"field": field})
