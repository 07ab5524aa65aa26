"""`models.*` (the model registry) and `prompts.*` (versioned prompt templates).

A registered model is a provider's model (provider, model identifier, version, config) or a training
job's checkpoint (then `provider` is `local` and the identifier defaults to the checkpoint's path).
A prompt template's text uses `{{ variable }}` placeholders; every version declares its variables,
and a version whose text uses an undeclared variable, or declares one it never uses, is refused.
Rendering requires exactly the declared variables. Prompt templates share the experiments
permissions (they are research artifacts, not deployable models).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator
from sqlalchemy import select
from sqlmodel import Session

from app.api.auth import current_principal
from app.api.context import registry
from app.api.jsonrpc import FORBIDDEN, NOT_FOUND, VALIDATION_FAILED, RPCError
from app.data import db
from app.data.tables import PolicyCheckpoint, PromptTemplate, PromptTemplateVersion, RegisteredModel
from app.research.common import (
    IdParams,
    Labels,
    ListParams,
    Strict,
    apply_update,
    get_visible,
    invalid,
    page,
    set_labels,
    soft_delete,
    touch,
)

PROVIDERS: dict[str, str] = {
    "openai": "OpenAI API models (gpt-*)",
    "anthropic": "Anthropic API models (claude-*)",
    "google": "Google Gemini / Vertex AI models",
    "cohere": "Cohere API models",
    "huggingface": "a Hugging Face Hub repository id",
    "azure": "Azure OpenAI deployments",
    "aws": "AWS Bedrock models",
    "local": "a local path or a checkpoint of a raygrpo training job",
    "custom": "anything else, described by its config",
}
Provider = Literal["openai", "anthropic", "google", "cohere", "huggingface", "azure", "aws", "local", "custom"]
STAGES = ("registered", "staging", "production", "deprecated")


# ---- models ------------------------------------------------------------------------------------

def model_view(m: RegisteredModel) -> dict[str, Any]:
    return {"id": m.id, "name": m.name, "provider": m.provider, "model_identifier": m.model_identifier,
            "version": m.version, "description": m.description, "config": m.config, "owner": m.owner,
            "collaborators": m.collaborators, "tags": m.tags, "status": m.status, "job_id": m.job_id,
            "checkpoint_id": m.checkpoint_id, "created_at": m.created_at, "updated_at": m.updated_at}


class RegisterModel(Labels):
    name: str = Field(min_length=1, max_length=256)
    provider: Provider
    model_identifier: str | None = Field(None, min_length=1, max_length=1000)
    """the provider's model id (or a path); a checkpoint's path when left out with checkpoint_id"""
    version: str = Field("1", min_length=1, max_length=64)
    description: str | None = Field(None, max_length=100_000)
    config: dict[str, Any] | None = None
    """provider settings (endpoint, temperature, ...); never secrets"""
    job_id: str | None = Field(None, min_length=1, max_length=64)
    """the training job that produced it"""
    checkpoint_id: str | None = Field(None, min_length=1, max_length=64)
    """a checkpoint of that job (its best one when only job_id is given)"""


class UpdateModel(Labels):
    id: str = Field(min_length=1, max_length=64)
    description: str | None = Field(None, max_length=100_000)
    config: dict[str, Any] | None = None
    status: Literal["registered", "staging", "production", "deprecated"] | None = None
    """lifecycle stage"""


class ListModels(ListParams):
    provider: Provider | None = None
    """only models of this provider"""


def _checkpoint_of(s: Session, job_id: str | None, checkpoint_id: str | None) -> tuple[str | None, PolicyCheckpoint | None]:
    job = db.get_job(s, job_id=job_id) if job_id else None
    if job_id and (job is None or not current_principal().owns(job.owner)):
        raise RPCError(NOT_FOUND, f"job not found: {job_id}", {"field": "job_id", "job_id": job_id})
    ckpt_id = checkpoint_id or (job.best_checkpoint_id if job is not None else None)
    if ckpt_id is None:
        return job_id, None
    ckpt = db.get_checkpoint(s, checkpoint_id=ckpt_id)
    if ckpt is not None and job is None:
        owner = db.get_job(s, job_id=ckpt.job_id)
        if owner is None or not current_principal().owns(owner.owner):
            ckpt = None
    if ckpt is None or (job_id is not None and ckpt.job_id != job_id):
        raise RPCError(NOT_FOUND, f"checkpoint not found: {ckpt_id}", {"field": "checkpoint_id"})
    return ckpt.job_id, ckpt


@registry.method("models.register", params=RegisterModel, mutates=True, permission="models:write",
                 errors=(NOT_FOUND, VALIDATION_FAILED),
                 summary="Register a model: a provider's model id and version, or a training job's checkpoint")
def register_model(p: RegisterModel, ctx: Any) -> dict[str, Any]:
    me = current_principal().subject
    with db.session_scope(ctx.engine) as s:
        job_id, ckpt = _checkpoint_of(s, p.job_id, p.checkpoint_id)
        if ckpt is not None and p.provider != "local":
            raise invalid("provider", "a checkpoint's model is `local`", VALIDATION_FAILED)
        identifier = p.model_identifier or (ckpt.path if ckpt is not None else None)
        if identifier is None:
            raise invalid("model_identifier", "required (unless a checkpoint is given)")
        clash = s.execute(select(RegisteredModel.id).where(
            RegisteredModel.owner == me, RegisteredModel.name == p.name, RegisteredModel.version == p.version,
            RegisteredModel.deleted_at.is_(None))).first()
        if clash is not None:
            raise RPCError(VALIDATION_FAILED, f"version: {p.name} version {p.version} is already registered "
                           f"({clash[0]}); register another version", {"field": "version", "id": clash[0]})
        m = RegisteredModel(name=p.name, provider=p.provider, model_identifier=identifier, version=p.version,
                            description=p.description, config=p.config or {}, owner=me, job_id=job_id,
                            checkpoint_id=ckpt.id if ckpt is not None else None)
        s.add(m)
        set_labels(s, "model", m, tags=p.tags or [], collaborators=p.collaborators or [])
        s.flush()
        return model_view(m)


@registry.method("models.get", params=IdParams, permission="models:read", errors=(NOT_FOUND,),
                 summary="A registered model")
def get_model(p: IdParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        return model_view(get_visible(s, RegisteredModel, p.id, "model"))


@registry.method("models.update", params=UpdateModel, mutates=True, permission="models:write",
                 errors=(NOT_FOUND, FORBIDDEN),
                 summary="Change a model's description, config, stage, tags or collaborators")
def update_model(p: UpdateModel, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        m = get_visible(s, RegisteredModel, p.id, "model", lock=True)
        apply_update(s, "model", m, p, ("description", "config", "status"))
        return model_view(m)


@registry.method("models.delete", params=IdParams, mutates=True, permission="models:write",
                 errors=(NOT_FOUND, FORBIDDEN),
                 summary="Delete a model (soft: evaluations that name it keep the reference)")
def delete_model(p: IdParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        m = get_visible(s, RegisteredModel, p.id, "model", lock=True)
        return soft_delete(s, m)


@registry.method("models.list", params=ListModels, permission="models:read",
                 summary="Registered models the caller may see, newest first (filters, cursor)")
def list_models(p: ListModels, ctx: Any) -> dict[str, Any]:
    if p.status is not None and p.status not in STAGES:
        raise invalid("status", f"one of {', '.join(STAGES)}")
    query = select(RegisteredModel)
    if p.provider is not None:
        query = query.where(RegisteredModel.provider == p.provider)
    with db.session_scope(ctx.engine) as s:
        return page(s, query, RegisteredModel, p, kind="model", view=model_view, key="models")


class _NoParams(Strict):
    pass


@registry.method("models.providers", params=_NoParams, permission="models:read",
                 summary="The providers a model can be registered with")
def providers(p: _NoParams, ctx: Any) -> dict[str, Any]:
    return {"providers": [{"name": k, "description": v} for k, v in PROVIDERS.items()]}


# ---- prompt templates --------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
VARIABLE = r"^[A-Za-z_][A-Za-z0-9_]*$"
P_READ, P_WRITE = "experiments:read", "experiments:write"


def _check_variables(template: str, variables: list[str]) -> None:
    used = list(dict.fromkeys(PLACEHOLDER.findall(template)))
    if undeclared := [v for v in used if v not in variables]:
        raise invalid("variables", f"the template uses {undeclared[0]!r}, which is not declared",
                      VALIDATION_FAILED, undeclared=undeclared)
    if unused := [v for v in variables if v not in used]:
        raise invalid("variables", f"{unused[0]!r} is declared but the template never uses it",
                      VALIDATION_FAILED, unused=unused)


class TemplateText(Strict):
    template: str = Field(min_length=1, max_length=200_000)
    """text with {{ variable }} placeholders"""
    variables: list[str] = Field(default_factory=list, max_length=200)
    """the variables the text uses, each exactly once in this list"""
    change_description: str | None = Field(None, max_length=10_000)

    @field_validator("variables")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.match(VARIABLE, name):
                raise ValueError(f"{name!r} is not a variable name (letters, digits, _)")
        if len(set(v)) != len(v):
            raise ValueError("a variable is declared twice")
        return v


class CreateTemplate(TemplateText, Labels):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = Field(None, max_length=100_000)


class AddVersion(TemplateText):
    id: str = Field(min_length=1, max_length=64)


class GetTemplate(Strict):
    id: str = Field(min_length=1, max_length=64)
    version: int | None = Field(None, ge=1, le=2**31 - 1)
    """a version number; the latest when left out"""


class RenderParams(GetTemplate):
    variables: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=200)
    """a value for each declared variable, and nothing else"""


def template_view(t: PromptTemplate, v: PromptTemplateVersion) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "description": t.description, "owner": t.owner,
            "collaborators": t.collaborators, "tags": t.tags, "latest_version": t.latest_version,
            "version": v.version, "template": v.template, "variables": v.variables,
            "change_description": v.change_description, "created_at": t.created_at, "updated_at": t.updated_at}


def _version(s: Session, t: PromptTemplate, version: int | None) -> PromptTemplateVersion:
    n = version or t.latest_version
    v = s.get(PromptTemplateVersion, (t.id, n))
    if v is None:
        raise RPCError(NOT_FOUND, f"version: template {t.id} has no version {n} (latest {t.latest_version})",
                       {"field": "version"})
    return v


@registry.method("prompts.create", params=CreateTemplate, mutates=True, permission=P_WRITE,
                 errors=(VALIDATION_FAILED,), summary="Create a prompt template (version 1)")
def create_template(p: CreateTemplate, ctx: Any) -> dict[str, Any]:
    _check_variables(p.template, p.variables)
    me = current_principal().subject
    with db.session_scope(ctx.engine) as s:
        t = PromptTemplate(name=p.name, description=p.description, owner=me, latest_version=1)
        v = PromptTemplateVersion(template_id=t.id, version=1, template=p.template, variables=p.variables,
                                  change_description=p.change_description, created_by=me)
        s.add(t)
        s.flush()
        s.add(v)
        set_labels(s, "prompt", t, tags=p.tags or [], collaborators=p.collaborators or [])
        s.flush()
        return template_view(t, v)


@registry.method("prompts.add_version", params=AddVersion, mutates=True, permission=P_WRITE,
                 errors=(NOT_FOUND, VALIDATION_FAILED),
                 summary="Add a version to a prompt template (earlier versions never change)")
def add_template_version(p: AddVersion, ctx: Any) -> dict[str, Any]:
    _check_variables(p.template, p.variables)
    with db.session_scope(ctx.engine) as s:
        t = get_visible(s, PromptTemplate, p.id, "prompt template", lock=True)
        t.latest_version += 1
        touch(t)
        v = PromptTemplateVersion(template_id=t.id, version=t.latest_version, template=p.template,
                                  variables=p.variables, change_description=p.change_description,
                                  created_by=current_principal().subject)
        s.add_all([t, v])
        s.flush()
        return template_view(t, v)


@registry.method("prompts.get", params=GetTemplate, permission=P_READ, errors=(NOT_FOUND,),
                 summary="A prompt template at a version (the latest by default)")
def get_template(p: GetTemplate, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        t = get_visible(s, PromptTemplate, p.id, "prompt template")
        return template_view(t, _version(s, t, p.version))


@registry.method("prompts.list", params=ListParams, permission=P_READ,
                 summary="Prompt templates the caller may see, newest first (filters, cursor), at their latest version")
def list_templates(p: ListParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        out = page(s, select(PromptTemplate), PromptTemplate, p, kind="prompt",
                   view=lambda t: t, key="templates")
        out["templates"] = [template_view(t, _version(s, t, None)) for t in out["templates"]]
        return out


@registry.method("prompts.delete", params=IdParams, mutates=True, permission=P_WRITE,
                 errors=(NOT_FOUND, FORBIDDEN), summary="Delete a prompt template (soft)")
def delete_template(p: IdParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        t = get_visible(s, PromptTemplate, p.id, "prompt template", lock=True)
        return soft_delete(s, t)


@registry.method("prompts.render", params=RenderParams, permission=P_READ, errors=(NOT_FOUND, VALIDATION_FAILED),
                 summary="Fill a template's variables; every declared variable is required, no others allowed")
def render_template(p: RenderParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        t = get_visible(s, PromptTemplate, p.id, "prompt template")
        v = _version(s, t, p.version)
    if missing := [name for name in v.variables if name not in p.variables]:
        raise invalid(f"variables.{missing[0]}", "required by the template", VALIDATION_FAILED, missing=missing)
    if unknown := [name for name in p.variables if name not in v.variables]:
        raise invalid(f"variables.{unknown[0]}", f"not a variable of version {v.version} "
                      f"(declared: {', '.join(v.variables) or 'none'})", VALIDATION_FAILED, unknown=unknown)
    values = {k: ("true" if x is True else "false" if x is False else str(x)) for k, x in p.variables.items()}
    rendered = PLACEHOLDER.sub(lambda m: values[m.group(1)], v.template)
    return {"id": t.id, "version": v.version, "rendered": rendered}
