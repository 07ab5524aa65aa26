"""`sessions.*`: training sessions over JSON-RPC, for clients that write their own RL loop.

A session is a model held on the cluster (grpo.session: policy workers and a sampler in one placement
group, behind one named host actor) and a `TrainingSession` row (owner, what was asked, cost). The methods
are the engine's primitives: `forward_backward`, `optim_step`, `sample`, `save_state`, `load_state`,
`save_weights`, with `create`, `get`, `list`, `close`. Training calls carry the client's sequence number
(`seq`: 1, 2, ...) and run in that order whatever order they arrive in, so a client can send the next call
before the last one answered (the SDK's futures do). Only the owner (or an admin) sees a session; another
caller gets "not found". A session frees its resources after `idle_timeout_s` without a call, and is
closed when its cost reaches `max_budget_usd`.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.auth import caller_is_admin, current_principal
from app.api.context import Context, money, registry
from app.api.jsonrpc import BUDGET_EXCEEDED, INVALID_PARAMS, NOT_FOUND, VALIDATION_FAILED, RPCError
from app.data import db
from app.data.tables import TrainingSession, utcnow
from app.jobs.trust import resolve_model, session_weights_dir

FINAL = ("closed", "expired", "failed", "budget_exceeded")
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
CALL_TIMEOUT_S = 900.0


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateParams(_Params):
    base_model: str | None = Field(None, max_length=1024, description="HF id or a path under the model roots; "
                                   "default: the server's default model")
    num_workers: int = Field(1, ge=1, le=64, description="policy workers (gradients all-reduced across them)")
    cpus_per_worker: float = Field(1.0, gt=0, le=256)
    gpus_per_worker: float | None = Field(None, ge=0, le=8, description="default: 1 on a cluster with GPUs, else 0")
    lora_rank: int | None = Field(None, ge=1, le=1024)
    lora_alpha: float | None = Field(None, gt=0)
    lora_target_modules: list[str] | None = Field(None, max_length=64)
    idle_timeout_s: float = Field(600.0, ge=5, le=7 * 86400, description="free everything after this long without a call")
    max_budget_usd: Decimal | None = Field(None, gt=0, max_digits=14, decimal_places=6)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    chat_template: bool | None = None
    max_seq_len: int = Field(2048, ge=2, le=131_072)
    max_rows: int = Field(1024, ge=1, le=65_536, description="rows in one forward_backward")


class SessionParams(_Params):
    session_id: str = Field(max_length=64)


# The training calls' own inputs are checked in the call, not by the schema: a numbered call refused by the
# schema would never reach the session, and the calls numbered after it would wait for it.

class ForwardBackwardParams(SessionParams):
    data: Any = Field(description="rows: [{tokens, weights?, advantages?, logprobs?}]")
    loss_fn: Any = Field(description="cross_entropy | importance_sampling | ppo | grpo")
    loss_config: Any = Field(default_factory=dict, description="clip_low, clip_high, normalize (token-mean | sum)")
    seq: int | None = Field(None, ge=1)


class AdamParams(_Params):
    learning_rate: float = Field(1e-4, gt=0, le=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(None, gt=0)


class OptimStepParams(SessionParams):
    adam: dict[str, Any] = Field(default_factory=dict, description="AdamParams: learning_rate, beta1, beta2, eps, "
                                 "weight_decay, max_grad_norm; checked in the call, so a refused step still frees its seq")
    seq: int | None = Field(None, ge=1)


class SampleParams(SessionParams):
    prompts: list[str] | None = Field(None, min_length=1, max_length=1024)
    prompt_tokens: list[list[int]] | None = Field(None, min_length=1, max_length=1024)
    num_samples: int = Field(1, ge=1, le=256)
    max_tokens: int = Field(32, ge=1, le=8192)
    temperature: float = Field(1.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    after_seq: int | None = Field(None, ge=1, description="sample on the weights after this training call")

    @model_validator(mode="after")
    def _one_source(self) -> SampleParams:
        if (self.prompts is None) == (self.prompt_tokens is None):
            raise ValueError("give exactly one of prompts (text) and prompt_tokens (token ids)")
        if self.prompt_tokens is not None and any(not 1 <= len(p) <= 8192 for p in self.prompt_tokens):
            raise ValueError("prompt_tokens: each prompt has 1 to 8192 tokens")
        return self


class SaveParams(SessionParams):
    name: Any = Field(description="letters, digits, '.', '_', '-'; 64 at most")
    seq: int | None = Field(None, ge=1)


class LoadParams(SessionParams):
    state_id: str = Field(max_length=200, description="as save_state returned it: <session_id>/<name>")
    seq: int | None = Field(None, ge=1)


class ListParams(_Params):
    status: str | None = None
    limit: int = Field(50, ge=1, le=500)


# ---- helpers ---------------------------------------------------------------------------------------

def _ray() -> Any:
    import ray

    if not ray.is_initialized():
        raise RPCError(VALIDATION_FAILED, "sessions need the API on a Ray cluster (start it with `raygrpo up` or "
                       "`python -m app.api.serve`)", {"field": "session_id"})
    return ray


def _row(s: Any, session_id: str) -> TrainingSession:
    row = s.get(TrainingSession, session_id)
    if row is None or not current_principal().owns(row.owner):  # another user's session does not exist for them
        raise RPCError(NOT_FOUND, f"session {session_id} not found", {"field": "session_id"})
    return row


def _rate_per_s(spec: dict[str, Any], ctx: Context) -> Decimal:
    n = int(spec.get("num_workers", 1)) + 1  # the workers and the sampler
    hourly = (Decimal(str(spec.get("cpus_per_worker", 1))) * ctx.settings.cpu_hour_usd
              + Decimal(str(spec.get("gpus_per_worker", 0))) * ctx.settings.gpu_hour_usd) * n
    return hourly / Decimal(3600)


def _describe(row: TrainingSession, live: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = row.spec
    shown = row.base_model if caller_is_admin() else spec.get("model_ref", "default")  # paths: admins only
    return {"session_id": row.id, "status": row.status, "base_model": shown, "owner": row.owner,
            "num_workers": spec.get("num_workers"), "lora": spec.get("lora"), "idle_timeout_s": spec.get("idle_timeout_s"),
            "steps": row.steps, "cost_usd": money(row.cost_usd), "budget_usd": money(row.budget_usd),
            "error": row.error, "created_at": row.created_at, "last_used_at": row.last_used_at, "ended_at": row.ended_at,
            **({"weights_version": live.get("sampler_version"), "idle_s": live.get("idle_s"),
                "vocab_size": live.get("vocab_size")} if live else {})}


def _sync(ctx: Context, session_id: str, live: dict[str, Any] | None, *, used: bool = False) -> TrainingSession:
    """Store what the host says (state, steps, cost); a host that is gone ended the session."""
    with db.session_scope(ctx.engine) as s:
        row = _row(s, session_id)
        if row.status in FINAL:
            return row
        if live is None:  # no host: it freed itself after the idle timeout and left, or it was lost
            idle = (utcnow() - row.last_used_at).total_seconds()
            row.status = "expired" if idle >= float(row.spec.get("idle_timeout_s", 600)) - 5 else "failed"
            row.error = row.error or ("idle timeout" if row.status == "expired" else "the session's host actor is gone")
            row.ended_at = utcnow()
        else:
            row.status = live["state"]
            row.steps = int(live.get("version") or 0)
            row.cost_usd = (_rate_per_s(row.spec, ctx) * Decimal(str(live.get("held_s", 0)))).quantize(Decimal("0.000001"))
            row.error = live.get("error")
            if used:
                row.last_used_at = utcnow()
            if row.status in FINAL:
                row.ended_at = utcnow()
        s.add(row)
        s.flush()
        s.refresh(row)
    if live is not None and row.status in FINAL:  # its final state is stored: the host (a process) may go
        host = _HOSTS.pop(session_id, None) or _host(session_id)
        if host is not None:
            _ray().kill(host)
            _HOSTS.pop(session_id, None)
    return row


def _live(host: Any) -> dict[str, Any] | None:
    ray = _ray()
    if host is None:
        return None
    try:
        return ray.get(host.status.remote(), timeout=60)
    except Exception:  # died between the lookup and the call
        return None


_HOSTS: dict[str, Any] = {}
"""session id -> its host actor's handle, looked up once per replica (a lookup is a round trip to the GCS)"""


def _host(session_id: str) -> Any | None:
    from grpo.session import get_host

    host = _HOSTS.get(session_id)
    if host is None:
        host = get_host(session_id)
        if host is not None:
            _HOSTS[session_id] = host
    return host


def _ended(ctx: Context, session_id: str, row: TrainingSession) -> RPCError:
    _HOSTS.pop(session_id, None)
    return RPCError(VALIDATION_FAILED, f"session {session_id} is {row.status}" + (f" ({row.error})" if row.error else ""),
                    {"field": "session_id"})


def _open(ctx: Context, session_id: str) -> Any:
    """The host of a live session the caller owns (one database read), or a clear error."""
    with db.session_scope(ctx.engine) as s:
        row = _row(s, session_id)
        over = row.budget_usd is not None and row.cost_usd >= row.budget_usd
    _ray()
    if row.status in FINAL:
        raise _ended(ctx, session_id, row)
    host = _host(session_id)
    if host is None:
        raise _ended(ctx, session_id, _sync(ctx, session_id, None))
    if over:
        _end_over_budget(ctx, host, session_id)
    return host


def _end_over_budget(ctx: Context, host: Any, session_id: str) -> None:
    ray = _ray()
    live = ray.get(host.close.remote("budget_exceeded"), timeout=120)
    row = _sync(ctx, session_id, live)
    with db.session_scope(ctx.engine) as s:
        s.get(TrainingSession, session_id).status = "budget_exceeded"
    _HOSTS.pop(session_id, None)
    raise RPCError(BUDGET_EXCEEDED, f"session {session_id} reached its budget: cost ${row.cost_usd} of "
                   f"${row.budget_usd}; it is closed", {"field": "max_budget_usd"})


def _skip(ctx: Context, session_id: str, seq: int | None) -> None:
    """A numbered call refused here never reaches the host: tell it, or the calls after it wait for it (only
    for the session's owner: nobody else may move another's sequence)."""
    import ray

    if seq is None or not ray.is_initialized():
        return
    with db.session_scope(ctx.engine) as s:
        row = s.get(TrainingSession, session_id)
        if row is None or not current_principal().owns(row.owner):
            return
    host = _host(session_id)
    if host is not None:
        try:
            ray.get(host.skip.remote(seq), timeout=30)
        except Exception:  # the host is gone: nothing waits on it
            pass


def _call(ctx: Context, session_id: str, method: str, *args: Any, check: Any = None, **kwargs: Any) -> Any:
    """One primitive on the session's host: one database read, one actor call (the host answers with its
    state as well), one database write. Input errors name their field; `check` runs first (input the schema
    lets through); whatever refuses the call here frees its `seq`."""
    from ray.exceptions import RayActorError

    from grpo.session import SessionInputError

    try:
        if check is not None:
            check()
        host = _open(ctx, session_id)
    except Exception:
        _skip(ctx, session_id, kwargs.get("seq"))
        raise
    ray = _ray()
    try:
        out, live = ray.get(host.call.remote(method, *args, **kwargs), timeout=CALL_TIMEOUT_S)
    except SessionInputError as e:
        raise RPCError(VALIDATION_FAILED, str(e), {"field": e.field}) from None
    except RayActorError:  # the host died (or left after its idle timeout) between the lookup and the call
        raise _ended(ctx, session_id, _sync(ctx, session_id, None)) from None
    except RuntimeError as e:
        if "session is" not in str(e):
            raise
        row = _sync(ctx, session_id, _live(host))
        if row.status in FINAL:
            raise _ended(ctx, session_id, row) from None
        raise RPCError(VALIDATION_FAILED, f"session {session_id} is {row.status}, not active yet"
                       + (f": {row.error}" if row.error else "") + "; poll sessions.get", {"field": "session_id"}) from None
    row = _sync(ctx, session_id, live, used=True)
    if row.budget_usd is not None and row.cost_usd >= row.budget_usd:
        _end_over_budget(ctx, host, session_id)
    return out


# ---- methods -----------------------------------------------------------------------------------------

@registry.method("sessions.create", params=CreateParams, mutates=True, errors=(VALIDATION_FAILED,),
                 permission="training:start",
                 summary="Hold a model on the cluster for your own training loop; replies at once (poll sessions.get)")
def create(p: CreateParams, ctx: Context) -> dict[str, Any]:
    from grpo.session import start_host

    lora = None
    if p.lora_rank is not None:
        lora = {"r": p.lora_rank, "lora_alpha": p.lora_alpha or 2 * p.lora_rank,
                "target_modules": p.lora_target_modules or "all-linear", "lora_dropout": 0.0}
    elif p.lora_alpha is not None or p.lora_target_modules is not None:
        raise RPCError(VALIDATION_FAILED, "lora_rank: required with lora_alpha or lora_target_modules",
                       {"field": "lora_rank"})
    from pathlib import Path

    if p.base_model:  # the one model policy: roots, ownership of job and session folders, the Hub switch
        with db.session_scope(ctx.engine) as s:
            ref = resolve_model("base_model", p.base_model, settings=ctx.settings, session=s)
        model, shown = ref.load, ref.shown
        if ref.local and not (Path(model) / "config.json").is_file():
            raise RPCError(VALIDATION_FAILED, f"base_model: no Hugging Face model directory at {p.base_model}",
                           {"field": "base_model"})
    else:
        model, shown = ctx.settings.default_model, "default"
    if not model:
        raise RPCError(VALIDATION_FAILED, "base_model: required (this server has no default model)", {"field": "base_model"})
    ray = _ray()
    gpus = p.gpus_per_worker if p.gpus_per_worker is not None else (
        1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0)
    from app.jobs.dispatcher import ray_cluster_resources

    capacity = ray_cluster_resources(ctx.settings).capacity
    need = {"CPU": p.cpus_per_worker * (p.num_workers + 1), "GPU": gpus * (p.num_workers + 1)}
    short = [f"{v:g} {k} (the cluster has at most {capacity.get(k, 0):g})" for k, v in need.items()
             if v > capacity.get(k, 0) + 1e-9]
    if short:
        raise RPCError(VALIDATION_FAILED, "num_workers: the cluster cannot hold this session: it needs "
                       + " and ".join(short) + " (num_workers + 1 sampler, each cpus_per_worker/gpus_per_worker)",
                       {"field": "num_workers"})
    spec = {"model": model, "model_ref": shown, "num_workers": p.num_workers, "cpus_per_worker": p.cpus_per_worker, "gpus_per_worker": gpus,
            "lora": lora, "idle_timeout_s": p.idle_timeout_s, "seed": p.seed, "chat_template": p.chat_template,
            "max_seq_len": p.max_seq_len, "max_rows": p.max_rows, "torch_threads": 1}
    with db.session_scope(ctx.engine) as s:
        row = TrainingSession(owner=current_principal().subject, base_model=model, spec=spec, budget_usd=p.max_budget_usd)
        s.add(row)
        s.flush()
        session_id = row.id
    try:
        start_host(session_id, spec)
    except Exception as e:
        with db.session_scope(ctx.engine) as s:
            row = s.get(TrainingSession, session_id)
            row.status, row.error, row.ended_at = "failed", f"{type(e).__name__}: {e}", utcnow()
        raise
    return {"session_id": session_id, "status": "starting"}


@registry.method("sessions.get", params=SessionParams, permission="training:view", errors=(NOT_FOUND,),
                 summary="A session's state (starting, waiting, active, closed, expired, failed), steps and cost")
def get(p: SessionParams, ctx: Context) -> dict[str, Any]:

    with db.session_scope(ctx.engine) as s:
        row = _row(s, p.session_id)
        final = row.status in FINAL
    if final:
        return _describe(row)
    live = _live(_host(p.session_id))
    if live is None:
        _HOSTS.pop(p.session_id, None)
    return _describe(_sync(ctx, p.session_id, live), live)


@registry.method("sessions.list", params=ListParams, permission="training:view", summary="Your sessions, newest first")
def list_sessions(p: ListParams, ctx: Context) -> dict[str, Any]:
    from sqlmodel import col, select

    me = current_principal()
    with db.session_scope(ctx.engine) as s:
        q = select(TrainingSession).order_by(col(TrainingSession.created_at).desc()).limit(p.limit)
        if not me.is_admin:
            q = q.where(TrainingSession.owner == me.subject)
        if p.status:
            q = q.where(TrainingSession.status == p.status)
        return {"sessions": [_describe(r) for r in s.exec(q).all()]}


@registry.method("sessions.close", params=SessionParams, mutates=True, permission="training:start",
                 errors=(NOT_FOUND,), summary="Free a session's resources now")
def close(p: SessionParams, ctx: Context) -> dict[str, Any]:

    with db.session_scope(ctx.engine) as s:
        row = _row(s, p.session_id)
        if row.status in FINAL:
            return _describe(row)
    ray = _ray()
    host = _host(p.session_id)
    try:
        live = ray.get(host.close.remote(), timeout=120) if host is not None else None
    except Exception:  # already gone
        live = None
    _HOSTS.pop(p.session_id, None)
    row = _sync(ctx, p.session_id, live)
    if host is not None:
        ray.kill(host)
    return _describe(row)


@registry.method("sessions.forward_backward", params=ForwardBackwardParams, mutates=True, permission="training:start",
                 errors=(NOT_FOUND, VALIDATION_FAILED, BUDGET_EXCEEDED),
                 summary="Log-probs and loss of a batch; gradients accumulate until optim_step")
def forward_backward(p: ForwardBackwardParams, ctx: Context) -> dict[str, Any]:
    return _call(ctx, p.session_id, "forward_backward", p.data, p.loss_fn, p.loss_config, seq=p.seq)


@registry.method("sessions.optim_step", params=OptimStepParams, mutates=True, permission="training:start",
                 errors=(NOT_FOUND, VALIDATION_FAILED, BUDGET_EXCEEDED),
                 summary="One AdamW step with the accumulated gradients (all-reduced over the workers)")
def optim_step(p: OptimStepParams, ctx: Context) -> dict[str, Any]:
    adam: dict[str, Any] = {}

    def check() -> None:
        from pydantic import ValidationError

        try:
            adam.update(AdamParams.model_validate(p.adam).model_dump())
        except ValidationError as e:
            first = e.errors()[0]
            field = "adam." + ".".join(str(x) for x in first["loc"])
            raise RPCError(INVALID_PARAMS, f"{field}: {first['msg']}", {"field": field}) from None

    return _call(ctx, p.session_id, "optim_step", adam, seq=p.seq, check=check)


@registry.method("sessions.sample", params=SampleParams, permission="training:start",
                 errors=(NOT_FOUND, VALIDATION_FAILED, BUDGET_EXCEEDED),
                 summary="Completions (tokens, log-probs, text) from the session's latest weights")
def sample(p: SampleParams, ctx: Context) -> dict[str, Any]:
    return _call(ctx, p.session_id, "sample", p.prompts, p.prompt_tokens, n=p.num_samples, max_tokens=p.max_tokens,
                 temperature=p.temperature, top_p=p.top_p, seed=p.seed, after_seq=p.after_seq)


def _state_dir(ctx: Context, session_id: str, name: str) -> str:
    return str(ctx.settings.runs_dir / "sessions" / session_id / "state" / name)


def _check_name(name: Any) -> Any:
    def check() -> None:
        if not isinstance(name, str) or not re.match(NAME, name):
            raise RPCError(INVALID_PARAMS, f"name: {str(name)[:80]!r} is not a name (letters, digits, '.', '_', '-'; "
                           "64 at most, not starting with a symbol)", {"field": "name"})
    return check


@registry.method("sessions.save_state", params=SaveParams, mutates=True, permission="training:start",
                 errors=(NOT_FOUND, VALIDATION_FAILED), summary="Save model and optimizer (sharded) to resume later")
def save_state(p: SaveParams, ctx: Context) -> dict[str, Any]:
    out = _call(ctx, p.session_id, "save_state", _state_dir(ctx, p.session_id, str(p.name)), seq=p.seq,
                check=_check_name(p.name))
    return {"state_id": f"{p.session_id}/{p.name}", "step": out["step"]}


@registry.method("sessions.load_state", params=LoadParams, mutates=True, permission="training:start",
                 errors=(NOT_FOUND, VALIDATION_FAILED),
                 summary="Load a saved model and optimizer state (yours, from any session with the same model)")
def load_state(p: LoadParams, ctx: Context) -> dict[str, Any]:
    from pathlib import Path

    source, _, name = p.state_id.partition("/")
    path = _state_dir(ctx, source, name)

    def check() -> None:
        if not re.match(NAME, name or "") or not re.match(NAME, source or ""):
            raise RPCError(VALIDATION_FAILED, "state_id: <session_id>/<name> as save_state returned it",
                           {"field": "state_id"})
        with db.session_scope(ctx.engine) as s:
            src = s.get(TrainingSession, source)
            if src is None or not current_principal().owns(src.owner):
                raise RPCError(NOT_FOUND, f"state {p.state_id} not found", {"field": "state_id"})
        if not (Path(path) / "session_state.json").is_file():
            raise RPCError(NOT_FOUND, f"state {p.state_id} not found", {"field": "state_id"})

    out = _call(ctx, p.session_id, "load_state", path, seq=p.seq, check=check)
    return {"state_id": p.state_id, "step": out["step"]}


@registry.method("sessions.save_weights", params=SaveParams, mutates=True, permission="training:start",
                 errors=(NOT_FOUND, VALIDATION_FAILED),
                 summary="Save the weights as a Hugging Face (or PEFT adapter) directory that models.deploy serves")
def save_weights(p: SaveParams, ctx: Context) -> dict[str, Any]:
    path = str(session_weights_dir(ctx.settings, p.session_id, str(p.name)))
    out = _call(ctx, p.session_id, "save_weights", path, seq=p.seq, check=_check_name(p.name))
    # named by reference: models.deploy, sessions.create and start_grpo take it; the path is the admins' to see
    return {"model": f"weights:{p.session_id}/{p.name}", "step": out["step"],
            **({"path": out["path"]} if caller_is_admin() else {})}


