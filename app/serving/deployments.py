"""`models.deploy`, `models.undeploy`, `models.deployments`: serve checkpoints on Ray Serve.

A deployment is a name: its own Serve application (`policy-<name>`) next to the job API, answering
the OpenAI routes under `/policies/<name>/v1` (app.serving.policy). What was asked is a `PolicyDeployment` row
(the database stays the source of truth); how it is doing (deploying, running, failed, replicas) is
read from Serve on every `models.deployments` call, never stored. `models.deploy` replies as soon as
Serve has accepted the application: loading a large model takes minutes, and the caller polls.

Not here: the stored-model registry (`models.register` ...), which a deployment may later name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.auth import caller_is_admin, current_principal
from app.api.context import Context, registry
from app.api.jsonrpc import DEPLOYMENT_FAILED, FORBIDDEN, NOT_FOUND, VALIDATION_FAILED, RPCError
from app.data import db
from app.data.tables import PolicyDeployment
from app.jobs.trust import ModelRef, resolve_model
from app.serving.access import API_APP

NAME = r"^[a-z0-9][a-z0-9-]{0,47}$"
APP_PREFIX = "policy-"

_STATUS = {"RUNNING": "running", "DEPLOYING": "deploying", "DEPLOY_FAILED": "failed", "UNHEALTHY": "unhealthy",
           "DELETING": "deleting", "NOT_STARTED": "deploying"}


def app_name(name: str) -> str:
    return APP_PREFIX + name


def route_prefix(name: str) -> str:
    return f"/policies/{name}"


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    checkpoint_id: str | None = Field(None, min_length=1, max_length=64)
    """a checkpoint of one of your jobs (training.get_status's best_checkpoint)"""
    model: str | None = Field(None, min_length=1, max_length=1000)
    """or a model reference (checkpoint:<id>, weights:<session_id>/<name>), a directory under the model roots, or
    a Hub id (when the server allows them)"""
    session_id: str | None = Field(None, min_length=1, max_length=64)
    """or one of your training sessions: its newest weights, followed as it trains"""

    @model_validator(mode="after")
    def _one_source(self) -> Source:
        if sum(x is not None for x in (self.checkpoint_id, self.model, self.session_id)) != 1:
            raise ValueError("give exactly one of checkpoint_id, model and session_id")
        return self


class VariantParams(Source):
    name: str = Field(pattern=NAME)
    """the variant's name: a client selects it with `model`, replies carry it in X-Raygrpo-Variant"""
    weight: float = Field(1.0, gt=0.0, le=1000.0)
    """share of the requests that name the deployment (weights are relative)"""


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    min_replicas: int = Field(1, ge=0, le=64)
    max_replicas: int = Field(4, ge=1, le=64)
    target_ongoing_requests: float = Field(16.0, gt=0.0, le=1024.0)
    """requests in flight per replica that Serve's autoscaler aims for"""

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class DeployParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: str = Field(pattern=NAME)
    """lower-case letters, digits and dashes; served under /policies/<name>/v1"""
    checkpoint_id: str | None = Field(None, min_length=1, max_length=64)
    """a checkpoint of one of your jobs"""
    model: str | None = Field(None, min_length=1, max_length=1000)
    """or a model reference (checkpoint:<id>, weights:<session_id>/<name>), a directory under the model roots, or
    a Hub id (when the server allows them)"""
    session_id: str | None = Field(None, min_length=1, max_length=64)
    """or one of your training sessions: its newest weights, loaded before each generation when they changed"""
    variants: list[VariantParams] | None = Field(None, min_length=2, max_length=4)
    """or two to four variants routed by weight (an A/B comparison)"""
    replicas: int = Field(1, ge=1, le=64)
    """replicas per variant (ignored with autoscaling)"""
    autoscaling: Autoscaling | None = None
    """Serve autoscaling per variant instead of a fixed count"""
    gpus_per_replica: float | None = Field(None, ge=0.0, le=8.0)
    """GPUs per replica; 1 when the cluster has GPUs, else 0, when left out"""
    cpus_per_replica: float = Field(1.0, gt=0.0, le=64.0)
    batching: bool = True
    """dynamic request batching (@serve.batch)"""
    max_batch_size: int = Field(16, ge=1, le=256)
    """rows decoded together when batching"""
    shared: bool = False
    """admins only: every authenticated user may call it (else its owner and admins)"""

    @model_validator(mode="after")
    def _one_source(self) -> DeployParams:
        given = [k for k in ("checkpoint_id", "model", "session_id", "variants") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of checkpoint_id, model, session_id and variants")
        if self.variants and len({v.name for v in self.variants}) != len(self.variants):
            raise ValueError("variant names must differ")
        return self


class NameParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: str = Field(pattern=NAME)
    """the deployment's name"""


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: str | None = Field(None, pattern=NAME)
    """only this deployment"""


def _session_variant(s: Any, field: str, session_id: str, name: str, weight: float) -> Any:
    """A variant serving a training session's newest weights: its base model, its LoRA settings."""
    from app.data.tables import TrainingSession
    from app.serving.policy import VariantSpec

    row = s.get(TrainingSession, session_id)
    if row is None or not current_principal().owns(row.owner):
        raise RPCError(NOT_FOUND, f"session not found: {session_id}", {"field": field})
    if row.status not in ("starting", "waiting", "active"):
        raise RPCError(VALIDATION_FAILED, f"{field}: session {session_id} is {row.status}; deploy its saved weights "
                       "(sessions.save_weights, then model: weights:<session_id>/<name>)", {"field": field})
    return VariantSpec(name=name, path=row.spec["model"], source=f"session:{session_id}",
                       weight=weight, session_id=session_id, lora=row.spec.get("lora"))


def _resolve(s: Any, settings: Any, field: str, checkpoint_id: str | None, model: str | None) -> ModelRef:
    """What a source serves, through the one model policy (app.jobs.trust.resolve_model): another user's
    checkpoint or folder is "not found" like a missing one."""
    if checkpoint_id is not None:
        try:
            return resolve_model(field, f"checkpoint:{checkpoint_id}", settings=settings, session=s)
        except RPCError:
            raise RPCError(NOT_FOUND, f"checkpoint not found: {checkpoint_id}",
                           {"checkpoint_id": checkpoint_id}) from None
    assert model is not None
    ref = resolve_model(field, model, settings=settings, session=s)
    here = Path(ref.load)
    if ref.local and not ((here / "config.json").exists() or (here / "adapter_config.json").exists()):
        raise RPCError(VALIDATION_FAILED, f"{field}: no Hugging Face model (or PEFT adapter) directory at {model}",
                       {"field": field})
    return ref


def _ray() -> Any:
    import ray

    if not ray.is_initialized():
        raise RPCError(DEPLOYMENT_FAILED, "deployment failed: this API is not running on a Ray cluster "
                       "(start it with `raygrpo up` or `python -m app.api.serve`)")
    return ray


def describe(row: PolicyDeployment, apps: dict[str, Any] | None) -> dict[str, Any]:
    """A deployment as the methods reply with it; `apps` is Serve's status (None: not connected to Ray)."""
    status, message, replicas = "unknown", "this API is not connected to Ray", {}
    if apps is not None:
        app = apps.get(app_name(row.name))
        if app is None:
            status, message = "not_running", "Serve has no such application (was Serve restarted?)"
        else:
            state = _name(app.status)
            status, message = _STATUS.get(state, state.lower()), app.message or ""
            for dname, dep in app.deployments.items():
                if dname.startswith("PolicyServer-"):
                    running = sum(n for state, n in dep.replica_states.items() if _name(state) == "RUNNING")
                    replicas[dname.removeprefix("PolicyServer-")] = running
                    if dep.message and not message:
                        message = dep.message
    admin = caller_is_admin()
    variants = [{k: v for k, v in variant.items() if admin or k != "path"} for variant in row.variants]
    return {"name": row.name, "status": status, "message": message, "url": route_prefix(row.name) + "/v1",
            "variants": variants, "running_replicas": replicas, **row.spec, "owner": row.owner,
            "shared": bool(row.shared), "created_at": row.created_at}


def _name(state: Any) -> str:
    """Serve's status enums as their plain names (RUNNING, DEPLOYING, ...)."""
    return str(getattr(state, "value", state))


def _serve_apps() -> dict[str, Any] | None:
    import ray

    if not ray.is_initialized():
        return None
    from ray import serve

    return dict(serve.status().applications)


@registry.method("models.deploy", params=DeployParams, mutates=True, errors=(NOT_FOUND, VALIDATION_FAILED,
                 DEPLOYMENT_FAILED), permission="models:deploy",
                 summary="Serve a checkpoint (or two, by weight) with an OpenAI-compatible API on Ray Serve")
def deploy(p: DeployParams, ctx: Context) -> dict[str, Any]:
    from app.serving.policy import VariantSpec

    if p.shared and not current_principal().is_admin:
        raise RPCError(FORBIDDEN, "shared: only an admin may open a deployment to every user", {"field": "shared"})

    with db.session_scope(ctx.engine) as s:
        if p.variants:
            variants = []
            for i, v in enumerate(p.variants):
                if v.session_id is not None:
                    variants.append(_session_variant(s, f"variants.{i}.session_id", v.session_id, v.name, v.weight))
                    continue
                ref = _resolve(s, ctx.settings, f"variants.{i}", v.checkpoint_id, v.model)
                variants.append(VariantSpec(name=v.name, path=ref.load, source=ref.shown, weight=v.weight,
                                            checkpoint_id=ref.checkpoint_id))
        elif p.session_id is not None:
            variants = [_session_variant(s, "session_id", p.session_id, p.name, 1.0)]
        else:
            ref = _resolve(s, ctx.settings, "checkpoint_id" if p.checkpoint_id else "model", p.checkpoint_id, p.model)
            variants = [VariantSpec(name=p.name, path=ref.load, source=ref.shown, checkpoint_id=ref.checkpoint_id)]
        if s.get(PolicyDeployment, p.name) is not None:
            raise RPCError(VALIDATION_FAILED, f"name: a deployment named {p.name} exists; models.undeploy it first",
                           {"field": "name"})
    ray = _ray()
    gpus = p.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    spec = {"replicas": p.replicas, "autoscaling": p.autoscaling.model_dump() if p.autoscaling else None,
            "gpus_per_replica": gpus, "cpus_per_replica": p.cpus_per_replica, "batching": p.batching,
            "max_batch_size": p.max_batch_size}
    row = PolicyDeployment(name=p.name, owner=current_principal().subject, shared=p.shared,
                           variants=[v.model_dump() for v in variants], spec=spec)
    try:
        with db.session_scope(ctx.engine) as s:
            s.add(row)
    except Exception:  # the primary key: someone deployed the same name meanwhile
        raise RPCError(VALIDATION_FAILED, f"name: a deployment named {p.name} exists", {"field": "name"}) from None
    try:
        start_app(p.name, variants, spec)
    except Exception as e:
        with db.session_scope(ctx.engine) as s:
            stale = s.get(PolicyDeployment, p.name)
            if stale is not None:
                s.delete(stale)
        raise RPCError(DEPLOYMENT_FAILED, f"deployment failed: {type(e).__name__}: {str(e)[:500]}",
                       {"name": p.name}) from None
    with db.session_scope(ctx.engine) as s:
        return describe(s.get(PolicyDeployment, p.name), _serve_apps())


def start_app(name: str, variants: list[Any], spec: dict[str, Any]) -> None:
    """Deploy (or deploy again) one policy application on Serve without waiting for its replicas."""
    from ray import serve

    from app.serving.policy import VariantSpec, build_policy_app

    variants = [v if isinstance(v, VariantSpec) else VariantSpec.model_validate(v) for v in variants]
    application = build_policy_app(name, variants, replicas=spec["replicas"], autoscaling=spec["autoscaling"],
                                   gpus_per_replica=spec["gpus_per_replica"], cpus_per_replica=spec["cpus_per_replica"],
                                   batching=spec["batching"], max_batch_size=spec["max_batch_size"], gate=API_APP)
    # serve.run waits for the replicas (model loads take minutes on a big model); run_many, Serve's exported
    # developer API, can hand the application over without waiting: the API answers at once and
    # models.deployments shows the progress
    serve.run_many([serve.RunTarget(application, name=app_name(name), route_prefix=route_prefix(name))],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)


def reconcile(engine: Any) -> dict[str, str]:
    """Make Serve run what the database says is deployed. A policy application Serve does not have — a new
    cluster after a RayService upgrade, a Serve restart, one deleted behind the API's back — is deployed again
    from its row. -> {name: "redeployed" | "failed: <why>"} for each one that was missing. Needs Ray and a
    running Serve (the API's own application); without them there is nothing to compare with."""
    from sqlmodel import select

    try:
        apps = _serve_apps()
    except Exception:  # Serve not started on this cluster
        return {}
    if apps is None:
        return {}
    with db.session_scope(engine) as s:
        rows = [(r.name, list(r.variants), dict(r.spec)) for r in s.exec(select(PolicyDeployment))]
    out: dict[str, str] = {}
    for name, variants, spec in rows:
        if app_name(name) in apps:
            continue
        with db.session_scope(engine) as s:  # undeployed meanwhile: leave it gone
            if s.get(PolicyDeployment, name) is None:
                continue
        try:
            start_app(name, variants, spec)
            out[name] = "redeployed"
        except Exception as e:  # kept in the database: models.deployments shows it not running, with the cause
            out[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return out


class ShareParams(NameParams):
    shared: bool = True
    """true: every authenticated user may call it; false: its owner and admins again"""


@registry.method("models.share", params=ShareParams, mutates=True, errors=(NOT_FOUND, FORBIDDEN),
                 permission="models:deploy",
                 summary="Admins: open a deployment's OpenAI routes to every authenticated user, or close them again")
def share(p: ShareParams, ctx: Context) -> dict[str, Any]:
    if not current_principal().is_admin:
        raise RPCError(FORBIDDEN, "forbidden: only an admin may share a deployment", {"field": "shared"})
    with db.session_scope(ctx.engine) as s:
        row = _owned(s, p.name)
        row.shared = p.shared
        s.add(row)
    return {"name": p.name, "shared": p.shared}


def _owned(s: Any, name: str) -> PolicyDeployment:
    row = s.get(PolicyDeployment, name)
    if row is None or not current_principal().owns(row.owner):
        raise RPCError(NOT_FOUND, f"deployment not found: {name}", {"name": name})
    return row


@registry.method("models.undeploy", params=NameParams, mutates=True, errors=(NOT_FOUND,),
                 permission="models:deploy", summary="Stop serving a deployment and free its replicas")
def undeploy(p: NameParams, ctx: Context) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:  # the row first: the reconcile must not bring back what goes
        s.delete(_owned(s, p.name))
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.delete(app_name(p.name), _blocking=False)
    return {"name": p.name, "status": "deleting"}


@registry.method("models.deployments", params=ListParams, permission="models:read",
                 summary="Your deployments with their live status, replicas and URL")
def deployments(p: ListParams, ctx: Context) -> dict[str, Any]:
    from sqlmodel import col, select

    apps = _serve_apps()
    with db.session_scope(ctx.engine) as s:
        query = select(PolicyDeployment).order_by(col(PolicyDeployment.created_at))
        if p.name is not None:
            query = query.where(PolicyDeployment.name == p.name)
        me = current_principal()
        if not me.is_admin:
            query = query.where(PolicyDeployment.owner == me.subject)
        return {"deployments": [describe(row, apps) for row in s.exec(query)]}
