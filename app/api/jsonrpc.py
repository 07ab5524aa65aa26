"""JSON-RPC 2.0 core of the job API: parsing, validation, dispatch, batches, notifications, error
mapping, and the OpenRPC document (`rpc.discover`) built from the same pydantic models that
validate the params.

It is framework-agnostic: the FastAPI route hands `Registry.handle` the raw body bytes and sends back
whatever it returns (or 204 for `None`). HTTP status codes, authentication, rate limits and the
methods themselves live elsewhere. `handle` never raises: every input, however malformed, gets a
JSON-RPC reply that `json.dumps(..., allow_nan=False)` can encode, so no request can produce a 5xx.

Guards (`add_guard`: authentication, permissions, rate limits) run before a call's params are
validated; observers (`add_observer`: metrics, audit) see every answered call.

Not covered: result validation against `result_model` (it only documents the reply).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.json_schema import models_json_schema
from pydantic_core import to_jsonable_python

logger = logging.getLogger(__name__)

# JSON-RPC 2.0 reserved codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# job API codes
NOT_FOUND = -32001
BUDGET_EXCEEDED = -40001
VALIDATION_FAILED = -40002
CANNOT_CANCEL = -40003
EVALUATION_FAILED = -40004
EXPORT_LIMIT_EXCEEDED = -40005
DEPLOYMENT_FAILED = -40006
UNAUTHENTICATED = -40100
FORBIDDEN = -40300
RATE_LIMITED = -42900

ERROR_MESSAGES: dict[int, str] = {
    PARSE_ERROR: "parse error",
    INVALID_REQUEST: "invalid request",
    METHOD_NOT_FOUND: "method not found",
    INVALID_PARAMS: "invalid params",
    INTERNAL_ERROR: "internal error",
    NOT_FOUND: "not found",
    BUDGET_EXCEEDED: "budget exceeded",
    VALIDATION_FAILED: "validation failed",
    CANNOT_CANCEL: "cannot cancel",
    EVALUATION_FAILED: "evaluation failed",
    EXPORT_LIMIT_EXCEEDED: "export limit exceeded",
    DEPLOYMENT_FAILED: "deployment failed",
    UNAUTHENTICATED: "unauthenticated",
    FORBIDDEN: "forbidden",
    RATE_LIMITED: "rate limit exceeded",
}

DISCOVER = "rpc.discover"
_MAX_ECHO = 100  # characters of a client-supplied method name echoed back
_MAX_TEXT = 200  # characters of one validation message or field path
MAX_PARAMS_DEPTH = 64
"""deepest nesting of arrays/objects accepted in params (params itself is level 1): deeper values are
refused before any handler, validator or serializer walks them recursively, and so are never stored"""
_MAX_ERRORS = 20  # validation errors listed; a 10 MB list of bad items must not yield a 10 MB reply
# A JSON string escape for a UTF-16 surrogate; only bodies containing one need the slower check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class RPCError(Exception):
    """An error a handler raises to answer with a specific JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_dict(self) -> dict:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    def __repr__(self) -> str:
        return f"RPCError({self.code}, {self.message!r})"


@dataclass
class Method:
    name: str
    params_model: type[BaseModel]
    result_model: type[BaseModel] | None
    handler: Callable[[Any, Any], Any]
    summary: str
    description: str
    errors: list[int]
    mutates: bool
    permission: str | None = None
    """what the caller must hold (app.api.auth); None: anyone, unauthenticated included"""

    def param_names(self) -> list[str]:
        """Names as the client sends them (the alias when a field has one), in declaration order."""
        return [field.alias or name for name, field in self.params_model.model_fields.items()]


@dataclass
class CallRecord:
    """One answered call, for observers (metrics, audit): `method` is None when no method was found."""

    name: str
    method: Method | None
    params: BaseModel | None
    result: Any
    error: RPCError | None
    duration_s: float

    @property
    def code(self) -> int:
        return 0 if self.error is None else self.error.code


Guard = Callable[[Method], Any]
Observer = Callable[[CallRecord], Any]


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Registry:
    """The methods of one JSON-RPC endpoint, and the code that answers a request body with them."""

    def __init__(self, *, max_body_bytes: int = 10 * 2**20, max_batch: int = 100, sync_in_thread: bool = False,
                 handler_threads: int = 256):
        self.max_body_bytes = max_body_bytes
        self.max_batch = max_batch
        self.sync_in_thread = sync_in_thread
        self.handler_threads = handler_threads
        """threads for sync handlers (sync_in_thread): more than the calls a replica admits at once
        (Serve's max_ongoing_requests, 64), so no admitted call waits for a thread. A call may block on
        another call (a session's numbered calls run in order): asyncio's default executor (cpu + 4
        threads) let calls that arrived early hold every thread while the call they wait for had none."""
        self._executor: Any = None
        self._methods: dict[str, Method] = {}
        self._guards: list[Guard] = []
        self._observers: list[Observer] = []
        self._methods[DISCOVER] = Method(
            name=DISCOVER,
            params_model=_NoParams,
            result_model=None,
            handler=lambda params, ctx: self.openrpc(),
            summary="The OpenRPC document of this endpoint.",
            description="",
            errors=[],
            mutates=False,
        )

    # ---- registration and introspection ----

    def method(
        self,
        name: str,
        *,
        params: type[BaseModel],
        result: type[BaseModel] | None = None,
        summary: str = "",
        errors: tuple[int, ...] = (),
        mutates: bool = False,
        permission: str | None = None,
    ) -> Callable[[Callable], Callable]:
        """Register `handler(params, ctx)` under `name`; the handler is returned unchanged."""
        if not name or name.startswith("rpc."):
            raise ValueError(f"method name {name!r} is empty or in the reserved rpc. namespace")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise TypeError(f"params of {name!r} must be a pydantic model class")

        def register(handler: Callable) -> Callable:
            doc = inspect.getdoc(handler) or ""
            self._methods[name] = Method(
                name=name,
                params_model=params,
                result_model=result,
                handler=handler,
                summary=summary or doc.split("\n", 1)[0],
                description=doc,
                errors=list(errors),
                mutates=mutates,
                permission=permission,
            )
            return handler

        return register

    def add_guard(self, guard: Guard) -> None:
        """`guard(method)` runs before a call's params are validated; it refuses by raising RPCError
        (authentication, permissions, rate limits). Guards run in the order added; may be async."""
        self._guards.append(guard)

    def add_observer(self, observer: Observer) -> None:
        """`observer(record)` sees every answered call, notifications and failures included (metrics,
        audit). An observer that raises is logged and ignored: it never changes the reply."""
        self._observers.append(observer)

    def methods(self) -> list[Method]:
        return list(self._methods.values())

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def describe(self) -> list[dict]:
        """A short listing for GET /api/v1/jsonrpc/methods."""
        return [
            {"name": m.name, "summary": m.summary, "params": m.param_names(), "mutates": m.mutates,
             "permission": m.permission}
            for m in sorted(self._methods.values(), key=lambda m: m.name)
        ]

    def openrpc(
        self, *, title: str = "raygrpo", version: str = "0.1.0", server_url: str = "/api/v1/jsonrpc"
    ) -> dict:
        """OpenRPC 1.3 document. All models go through one `models_json_schema` call so that two
        models sharing a class name get distinct component names, and every $ref points into
        `components.schemas`."""
        methods = [m for name, m in sorted(self._methods.items()) if not name.startswith("rpc.")]
        wanted: dict[tuple[type[BaseModel], str], None] = {}
        for m in methods:
            wanted[(m.params_model, "validation")] = None
            if m.result_model is not None:
                wanted[(m.result_model, "serialization")] = None
        top, defs = models_json_schema(list(wanted), ref_template="#/components/schemas/{model}")
        schemas = defs.get("$defs", {})

        def resolve(schema: dict) -> dict:
            ref = schema.get("$ref", "")
            return schemas.get(ref.rsplit("/", 1)[-1], schema) if ref else schema

        described = []
        for m in methods:
            params_schema = resolve(top[(m.params_model, "validation")])
            properties = params_schema.get("properties", {})
            required = set(params_schema.get("required", []))
            params = []
            for name, field in m.params_model.model_fields.items():
                key = field.alias or name
                param: dict[str, Any] = {"name": key, "required": key in required}
                if field.description:
                    param["description"] = field.description
                param["schema"] = properties.get(key, {})
                params.append(param)
            result_schema = top[(m.result_model, "serialization")] if m.result_model is not None else {}
            # Every method with params can fail validation, so -32602 is always listed.
            codes = [INVALID_PARAMS, *(c for c in m.errors if c != INVALID_PARAMS)]
            if m.permission is not None:
                codes += [c for c in (UNAUTHENTICATED, FORBIDDEN, RATE_LIMITED) if c not in codes]
            entry: dict[str, Any] = {"name": m.name, "summary": m.summary}
            if m.description:
                entry["description"] = m.description
            if m.permission is not None:
                entry["x-permission"] = m.permission
            entry |= {
                "params": params,
                "paramStructure": "either",
                "result": {"name": "result", "schema": result_schema},
                "errors": [{"code": c, "message": ERROR_MESSAGES.get(c, "error")} for c in codes],
            }
            described.append(entry)
        return {
            "openrpc": "1.3.2",
            "info": {"title": title, "version": version},
            "servers": [{"name": title, "url": server_url}],
            "methods": described,
            "components": {"schemas": schemas},
        }

    # ---- answering requests ----

    def _handler_executor(self) -> Any:
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(self.handler_threads, thread_name_prefix="rpc-handler")
        return self._executor

    async def handle(self, body: bytes | str, ctx: Any = None) -> dict | list | None:
        """Answer one HTTP body: a reply object, a list of replies (batch), or None when nothing is
        owed (a notification, or a batch of only notifications)."""
        try:
            try:
                payload = self._parse(body)
            except RPCError as err:
                return _error_reply(None, err)
            if not isinstance(payload, list):
                return await self._handle_one(payload, ctx)
            if not payload:
                return _error_reply(None, RPCError(INVALID_REQUEST, "invalid request: empty batch"))
            if len(payload) > self.max_batch:
                message = f"invalid request: batch of {len(payload)} requests, at most {self.max_batch}"
                return _error_reply(None, RPCError(INVALID_REQUEST, message))
            # Members run concurrently; gather keeps the replies in request order.
            replies = await asyncio.gather(*(self._handle_one(member, ctx) for member in payload))
            return [r for r in replies if r is not None] or None
        except Exception:
            # Last line of defence: _handle_one already catches handler failures, so reaching this
            # is a bug here, but the client still gets a JSON-RPC answer rather than a 500.
            return _internal_error(None, "request")

    def _parse(self, body: bytes | str) -> Any:
        # A str never has more characters than its UTF-8 encoding has bytes, so a str that is too
        # long is refused before the copy that encoding makes.
        if isinstance(body, str) and len(body) > self.max_body_bytes:
            raise _too_large(len(body), self.max_body_bytes)
        # surrogatepass lets a str with a lone surrogate through here so that decode() below refuses
        # it with the same parse error as bytes that are not UTF-8.
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
        if len(raw) > self.max_body_bytes:
            raise _too_large(len(raw), self.max_body_bytes)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RPCError(PARSE_ERROR, "parse error: body is not valid UTF-8") from None
        try:
            # NaN, Infinity and 1e400 would parse into floats that strict JSON cannot encode again,
            # so an echoed id or param could make the reply itself unserialisable.
            payload = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        except json.JSONDecodeError as exc:
            raise RPCError(
                PARSE_ERROR, f"parse error: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        except ValueError as exc:  # non-finite numbers, integers over the 4300-digit limit
            raise RPCError(PARSE_ERROR, f"parse error: {str(exc)[:_MAX_TEXT]}") from None
        except RecursionError:
            raise RPCError(PARSE_ERROR, "parse error: nested too deeply") from None
        # json.loads accepts lone surrogate escapes ("\ud800"); those strings cannot be encoded as
        # UTF-8 when the reply is sent, so refuse them here while no id has been echoed yet.
        if _SURROGATE_ESCAPE.search(text) and not _all_strings_encodable(payload):
            raise RPCError(PARSE_ERROR, "parse error: string contains an unpaired UTF-16 surrogate")
        return payload

    async def _handle_one(self, request: Any, ctx: Any) -> dict | None:
        request_id = None
        try:
            if not isinstance(request, dict):
                raise RPCError(INVALID_REQUEST, "invalid request: expected an object")
            if "id" in request and _valid_id(request["id"]):
                request_id = request["id"]
            if request.get("jsonrpc") != "2.0":
                raise RPCError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be exactly "2.0"')
            if not isinstance(request.get("method"), str):
                raise RPCError(INVALID_REQUEST, 'invalid request: "method" must be a string')
            if "id" in request and not _valid_id(request["id"]):
                raise RPCError(INVALID_REQUEST, 'invalid request: "id" must be a string, number or null')
        except RPCError as err:
            # Not a valid request, so not a valid notification either: the spec wants an answer.
            return _error_reply(request_id, err)

        # From here on the request is well formed; a notification gets no reply even when it fails.
        is_notification = "id" not in request
        method_name = request["method"][:_MAX_ECHO]
        record = CallRecord(method_name, self._methods.get(request["method"]), None, None, None, 0.0)
        started = time.perf_counter()
        try:
            result = await self._call(request["method"], request.get("params", _ABSENT), ctx, record)
            reply = {"jsonrpc": "2.0", "result": result, "id": request_id}
        except RPCError as err:
            reply = _error_reply(request_id, err)
            record.error = err
        except Exception:
            reply = _internal_error(request_id, method_name)
            record.error = RPCError(INTERNAL_ERROR, "internal error")
        if not is_notification:
            try:
                # Prove here that the reply encodes the way the HTTP layer will encode it (strict JSON,
                # UTF-8), so a bad handler result becomes -32603 and never a 500 after we return.
                json.dumps(reply, ensure_ascii=False, allow_nan=False).encode("utf-8")
            except Exception:
                reply = _internal_error(request_id, method_name)
                record.error = RPCError(INTERNAL_ERROR, "internal error")
        record.duration_s = time.perf_counter() - started
        await self._observe(record)
        return None if is_notification else reply

    async def _observe(self, record: CallRecord) -> None:
        for observer in self._observers:
            try:
                outcome = observer(record)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                logger.exception("observer %r failed on %s", observer, record.name)

    async def _call(self, name: str, raw_params: Any, ctx: Any, record: CallRecord | None = None) -> Any:
        method = self._methods.get(name)
        if method is None:
            raise RPCError(METHOD_NOT_FOUND, f"method not found: {name[:_MAX_ECHO]}")
        for guard in self._guards:  # before validation: an unauthenticated caller learns nothing of params
            outcome = guard(method)
            if inspect.isawaitable(outcome):
                await outcome
        params = self._validate(method, raw_params)
        if record is not None:
            record.params = params
        # By default sync handlers run on the event loop: a `ctx` holding a database session is not
        # thread-safe. A registry whose handlers open their own sessions (sync_in_thread=True) runs
        # them in worker threads instead, so a blocking query does not stall other requests.
        if self.sync_in_thread and not inspect.iscoroutinefunction(method.handler):
            result = await asyncio.get_running_loop().run_in_executor(
                self._handler_executor(), contextvars.copy_context().run, method.handler, params, ctx)
        else:
            result = method.handler(params, ctx)
        if inspect.isawaitable(result):
            result = await result
        if record is not None:
            record.result = result
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        # Plain results get pydantic's JSON mode too: datetimes as ISO 8601, Decimals as strings.
        return to_jsonable_python(result)

    def _validate(self, method: Method, raw_params: Any) -> BaseModel:
        if raw_params is _ABSENT:
            raw_params = {}
        elif isinstance(raw_params, list):
            names = method.param_names()
            if len(raw_params) > len(names):
                message = (
                    f"invalid params: expected at most {len(names)} positional params, got {len(raw_params)}"
                )
                raise RPCError(INVALID_PARAMS, message)
            raw_params = dict(zip(names, raw_params, strict=False))
        elif not isinstance(raw_params, dict):
            raise RPCError(INVALID_PARAMS, 'invalid params: "params" must be an object or an array')
        if (where := _too_deep(raw_params, MAX_PARAMS_DEPTH)) is not None:
            raise RPCError(INVALID_PARAMS, f"invalid params: {where} is nested deeper than {MAX_PARAMS_DEPTH} "
                           "levels of arrays and objects", {"field": where, "max_depth": MAX_PARAMS_DEPTH})
        try:
            return method.params_model.model_validate(raw_params)
        except ValidationError as exc:
            raise _invalid_params(exc) from None


_ABSENT = object()


def _too_deep(value: Any, limit: int) -> str | None:
    """The top-level param under which `value` nests containers more than `limit` deep, else None.
    Iterative, so the check itself cannot hit the recursion limit."""
    stack: list[tuple[Any, int, str]] = [(v, 2, str(k)[:_MAX_ECHO]) for k, v in value.items()]
    while stack:
        item, depth, top = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return top
        stack.extend((child, depth + 1, top) for child in children)
    return None


def _valid_id(value: Any) -> bool:
    # bool is a subclass of int, but true/false are not valid ids
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def _error_reply(request_id: Any, err: RPCError) -> dict:
    return {"jsonrpc": "2.0", "error": err.to_dict(), "id": request_id}


def _internal_error(request_id: Any, method_name: str) -> dict:
    """Log the current exception with a reference the client can quote; send only the reference."""
    reference = uuid.uuid4().hex[:12]
    logger.exception("internal error %s in JSON-RPC method %s", reference, method_name)
    return _error_reply(request_id, RPCError(INTERNAL_ERROR, "internal error", {"reference": reference}))


def _too_large(size: int, limit: int) -> RPCError:
    return RPCError(INVALID_REQUEST, f"invalid request: request too large ({size} bytes, at most {limit})")


def _invalid_params(exc: ValidationError) -> RPCError:
    # include_input=False: the rejected value may be a secret or megabytes of training data.
    raw = exc.errors(include_url=False, include_context=False, include_input=False)
    errors = [
        {"field": _field_path(e["loc"]), "message": str(e["msg"])[:_MAX_TEXT], "type": e["type"]}
        for e in raw[:_MAX_ERRORS]
    ]
    message = "invalid params: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    if len(raw) > len(errors):
        message += f"; and {len(raw) - len(errors)} more"
    return RPCError(INVALID_PARAMS, message, {"errors": errors})


def _field_path(loc: tuple) -> str:
    """("training_data", 3, "query") -> "training_data.3.query"; the empty path is the params object."""
    return ".".join(str(part) for part in loc)[:_MAX_TEXT] or "params"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _all_strings_encodable(payload: Any) -> bool:
    # Iterative, because the payload may be nested close to the recursion limit.
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True
