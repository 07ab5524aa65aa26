"""The FastAPI app of the job API: an ordinary object the tests drive directly; Serve only wraps it.

Routes: `POST /api/v1/jsonrpc` (JSON-RPC 2.0; the body is read as JSON whatever the Content-Type
says, because operators call it with plain `curl -d`), `GET /api/v1/jsonrpc/methods`, `GET /metrics`
(Prometheus), and the health endpoints. No request can make it answer 5xx: a failure anywhere becomes
a JSON-RPC internal error with a reference that is logged.

Each request gets a request id (the client's `X-Request-ID` when it sends a sane one), echoed in the
reply's `X-Request-ID` and on every log line written while it is handled. Credentials are checked
once per request (app.api.auth); the permission of each call, and its rate limit, are checked by the
registry's guards. A single call refused as unauthenticated, forbidden or rate-limited is also answered
with HTTP 401, 403 or 429 (and `WWW-Authenticate` / `Retry-After`) so proxies and clients that only look at
the status see it; batches always answer 200.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

import app.api.admin  # noqa: F401  registers the auth.* and audit.* methods
import app.jobs.sessions  # noqa: F401  sessions.* (training sessions: your own loop on the cluster)
import app.jobs.training  # noqa: F401  training.*
import app.research.catalog  # noqa: F401  the research registry: models.*, prompts.*
import app.research.datasets  # noqa: F401  datasets.* (and the dataset file routes)
import app.research.evaluations  # noqa: F401  evaluations.*
import app.research.experiments  # noqa: F401  experiments.*, runs.*
import app.research.metrics  # noqa: F401  metrics.*
import app.serving.deployments  # noqa: F401  registers models.deploy, models.undeploy, models.deployments
from app.api.auth import RequestState, authenticate, reset_request_state, set_request_state
from app.api.context import Context, registry
from app.api.jsonrpc import (
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    RATE_LIMITED,
    UNAUTHENTICATED,
    CallRecord,
)
from app.api.metrics import render, sees_per_job
from app.settings import Settings, get_settings
from grpo import logs

log = logging.getLogger("app.api.main")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_HTTP_STATUS = {UNAUTHENTICATED: 401, FORBIDDEN: 403, RATE_LIMITED: 429}
_ROUTES = {"/api/v1/jsonrpc", "/api/v1/jsonrpc/methods", "/metrics", "/health", "/health/live", "/health/ready"}


def _error(code: int, message: str, data: dict | None = None) -> JSONResponse:
    err = {"code": code, "message": message, **({"data": data} if data else {})}
    return JSONResponse({"jsonrpc": "2.0", "error": err, "id": None})


def _rpc_observer(record: CallRecord) -> None:
    from app.api.auth import request_state

    state = request_state()
    if state is not None:
        # Counted by the HTTP middleware with the request itself (one Redis round trip per request).
        # Unknown method names are client input: one label for all of them keeps the series bounded.
        state.rpc_calls.append((record.name if record.method is not None else "unknown", record.code))


registry.add_observer(_rpc_observer)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.configure(settings.log_format)
    ctx = Context.open(settings)
    app = FastAPI(title="raygrpo job API", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.ctx = ctx

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        supplied = request.headers.get("x-request-id", "")
        request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        state = RequestState(request_id=request_id, client_ip=request.client.host if request.client else None,
                             services=ctx)
        token = set_request_state(state)
        log_token = logs.request_id.set(request_id)
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
        finally:
            logs.request_id.reset(log_token)
            reset_request_state(token)
            path = request.url.path if request.url.path in _ROUTES else "other"
            elapsed = time.perf_counter() - started
            try:
                args = (f"{request.method} {path}", status, elapsed, state.rpc_calls)
                if ctx.counters.shared:
                    await asyncio.to_thread(ctx.counters.record_http, *args)
                else:  # an in-process increment: no thread hop
                    ctx.counters.record_http(*args)
            except Exception:  # metrics must never fail a request
                log.warning("could not record request metrics", exc_info=True)
        response.headers["X-Request-ID"] = request_id
        for name, value in state.headers.items():
            response.headers[name] = value
        return response

    @app.post("/api/v1/jsonrpc")
    async def jsonrpc(request: Request) -> Response:
        limit = registry.max_body_bytes
        body = bytearray()
        async for chunk in request.stream():  # stop reading at the limit instead of buffering anything sent
            body += chunk
            if len(body) > limit:
                return _error(INVALID_REQUEST, f"request too large: more than {limit} bytes")
        from app.api.auth import request_state

        state = request_state()
        authorization, api_key = request.headers.get("authorization"), request.headers.get("x-api-key")
        if authorization or api_key or settings.auth == "off":
            state.principal, state.auth_error = await asyncio.to_thread(
                authenticate, settings, ctx.engine, authorization, api_key)
        if state.principal is not None:
            logs.principal.set(state.principal.subject)
        reply = await registry.handle(bytes(body), ctx)
        if reply is None:  # notifications only
            return Response(status_code=204)
        status = 200
        if isinstance(reply, dict) and "error" in reply:
            status = _HTTP_STATUS.get(reply["error"]["code"], 200)
        response = JSONResponse(jsonable_encoder(reply), status_code=status)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="raygrpo"'
        return response

    from app.research.datasets import install_routes

    install_routes(app, ctx)  # PUT/GET of dataset files: streamed, with signed links

    @app.get("/api/v1/jsonrpc/methods")
    def methods() -> list[dict]:
        return registry.describe()

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        per_job = sees_per_job(settings, ctx.engine, request.headers.get("authorization"),
                               request.headers.get("x-api-key"))
        if per_job is None:
            return Response("unauthenticated: the scrape credential (RAYGRPO_METRICS_TOKEN) or an admin's token\n",
                            status_code=401, media_type="text/plain", headers={"WWW-Authenticate": 'Bearer realm="raygrpo"'})
        return Response(render(ctx, per_job=per_job), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    @app.get("/health/live")
    def live() -> dict:
        return {"status": "ok"}

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        checks = {"database": "ok", "redis": "disabled" if ctx.queue is None else "ok", "ray": _ray_check()}
        try:
            with ctx.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as e:  # any driver error means not ready
            checks["database"] = f"error: {type(e).__name__}"
        if ctx.queue is not None and not ctx.queue.ping():
            checks["redis"] = "error: no answer to PING"
        ok = all(v in ("ok", "disabled", "not connected") for v in checks.values())
        failing = [name for name, v in checks.items() if v.startswith("error")]
        body = {"status": "ok" if ok else "unavailable", "checks": checks}
        if failing:
            body["failing"] = failing
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error %s on %s", ref, request.url.path)
        return _error(INTERNAL_ERROR, "internal error", {"reference": ref})

    return app


def _ray_check() -> str:
    """`ok` when this process is connected to a live Ray cluster (always so inside Serve), `not connected`
    for the app run outside Ray (tests, tools), an error when the connection is broken."""
    try:
        import ray

        if not ray.is_initialized():
            return "not connected"
        return "ok" if any(n.get("Alive") for n in ray.nodes()) else "error: no live Ray node"
    except Exception as e:
        return f"error: {type(e).__name__}"
