"""What runs in Ray Serve's HTTP proxy before Serve itself looks at a request.

Serve's proxy decodes a few header values as UTF-8 on its own (`X-Request-ID`, the multiplexed model id, the
session id: ray/serve/_private/proxy.py), before any application runs, so one non-UTF-8 `X-Request-ID` made
every route answer 500, `/health` included. `middlewares()` is the proxy callback Serve documents for
this (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.api.proxy:middlewares, set by `raygrpo up`,
`python -m app.api.serve`, the image and the KubeRay head): it drops those headers when their value is not
UTF-8, so Serve makes up its own request id and the request goes on. Everything else passes untouched.
"""

from __future__ import annotations

import os
from typing import Any

CALLBACK = "app.api.proxy:middlewares"
"""the value of RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"""

# Header names as Serve compares them: lower-case, '-' and '_' alike (its own normalisation).
_DECODED_BY_SERVE = {"x_request_id", "serve_multiplexed_model_id",
                     os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id").lower().replace("-", "_")}


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class DropUndecodableHeaders:
    """Pure ASGI middleware: remove the headers Serve decodes whose value is not valid UTF-8."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            headers = scope.get("headers") or []
            kept = [(k, v) for k, v in headers
                    if _utf8(k) and (k.decode().lower().replace("-", "_") not in _DECODED_BY_SERVE or _utf8(v))]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def middlewares() -> list:
    """Serve's HTTP proxy callback: the Starlette middlewares to run around the proxy."""
    from starlette.middleware import Middleware

    return [Middleware(DropUndecodableHeaders)]
