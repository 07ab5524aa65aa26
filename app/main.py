"""The FastAPI app of the job API: an ordinary object the tests drive directly; Serve only wraps it.

Routes: `POST /api/v1/jsonrpc` (JSON-RPC 2.0; the body is read as JSON whatever the Content-Type
says, because operators call it with plain `curl -d`), `GET /api/v1/jsonrpc/methods`, and the
health endpoints. No request can make it answer 5xx: a failure anywhere becomes a JSON-RPC
internal error with a reference that is logged.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from app.jsonrpc import INTERNAL_ERROR, INVALID_REQUEST
from app.settings import Settings, get_settings
from app.training import Context, registry

log = logging.getLogger("app.main")


def _error(code: int, message: str, data: dict | None = None) -> JSONResponse:
    err = {"code": code, "message": message, **({"data": data} if data else {})}
    return JSONResponse({"jsonrpc": "2.0", "error": err, "id": None})


def create_app(settings: Settings | None = None) -> FastAPI:
    ctx = Context.open(settings or get_settings())
    app = FastAPI(title="raygrpo job API", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.ctx = ctx

    @app.post("/api/v1/jsonrpc")
    async def jsonrpc(request: Request) -> Response:
        limit = registry.max_body_bytes
        body = bytearray()
        async for chunk in request.stream():  # stop reading at the limit instead of buffering anything sent
            body += chunk
            if len(body) > limit:
                return _error(INVALID_REQUEST, f"request too large: more than {limit} bytes")
        reply = await registry.handle(bytes(body), ctx)
        if reply is None:  # notifications only
            return Response(status_code=204)
        return JSONResponse(jsonable_encoder(reply))

    @app.get("/api/v1/jsonrpc/methods")
    def methods() -> list[dict]:
        return registry.describe()

    @app.get("/health")
    @app.get("/health/live")
    def live() -> dict:
        return {"status": "ok"}

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        checks = {"database": "ok", "redis": "disabled" if ctx.queue is None else "ok"}
        try:
            with ctx.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as e:  # any driver error means not ready
            checks["database"] = f"error: {type(e).__name__}"
        if ctx.queue is not None and not ctx.queue.ping():
            checks["redis"] = "error"
        ok = all(v in ("ok", "disabled") for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error %s on %s", ref, request.url.path)
        return _error(INTERNAL_ERROR, "internal error", {"reference": ref})

    return app
