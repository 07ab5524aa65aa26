"""The JSON-RPC core on a tiny registry: every error path with its exact code, id echo rules,
params by name and by position, notifications, batches, and the OpenRPC document."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from app.api.jsonrpc import (
    BUDGET_EXCEEDED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    PARSE_ERROR,
    Registry,
    RPCError,
)


class TrainConfig(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")
    batch_size: int = Field(8, ge=1, le=64)
    """prompts per step"""
    lr: float = Field(1e-6, gt=0, le=1)
    """learning rate"""


class Example(BaseModel):
    query: str = Field(min_length=1)
    expected: str | None = None


class CreateParams(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")
    agent_id: str = Field(min_length=1, max_length=64)
    """agent to train"""
    config: TrainConfig = TrainConfig()
    """training settings"""
    training_data: list[Example] = Field(default_factory=list, max_length=1000)
    """query/expected pairs"""
    api_key: str | None = None
    """secret; must never be echoed back"""


class JobPublic(BaseModel):
    id: str
    batch_size: int


class GetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str


class AddParams(BaseModel):
    a: int
    b: int = 0


class Seen:
    """A ctx that records what the handlers were called with."""

    def __init__(self) -> None:
        self.calls: list[str] = []


def make_registry(**limits: int) -> Registry:
    rpc = Registry(**limits)

    @rpc.method("job.create", params=CreateParams, result=JobPublic, errors=(BUDGET_EXCEEDED,), mutates=True)
    async def create(params: CreateParams, ctx: Seen | None) -> JobPublic:
        """Create a training job.

        Queues the job and returns its id."""
        if ctx is not None:
            ctx.calls.append(params.agent_id)
        await asyncio.sleep(0)
        return JobPublic(id=f"job_{params.agent_id}", batch_size=params.config.batch_size)

    @rpc.method("job.get", params=GetParams, summary="Read one job.", errors=(NOT_FOUND,))
    def get(params: GetParams, ctx: Any) -> dict:
        if params.job_id == "missing":
            raise RPCError(NOT_FOUND, "job not found", {"job_id": params.job_id})
        if params.job_id == "boom":
            raise RuntimeError("database password is hunter2")
        if params.job_id == "nan":
            return {"loss": float("nan")}
        if params.job_id == "object":
            return {"when": object()}
        return {"id": params.job_id, "status": "queued"}

    @rpc.method("math.add", params=AddParams)
    def add(params: AddParams, ctx: Any) -> int:
        return params.a + params.b

    @rpc.method("math.slow_add", params=AddParams)
    async def slow_add(params: AddParams, ctx: Any) -> int:
        # Later members finish first, so only gather's ordering keeps the replies in order.
        await asyncio.sleep(0.001 * (10 - params.a))
        return params.a + params.b

    return rpc


def call(rpc: Registry, body: Any, ctx: Any = None) -> Any:
    raw = body if isinstance(body, bytes | str) else json.dumps(body)
    answer = asyncio.run(rpc.handle(raw, ctx))
    json.dumps(answer, allow_nan=False)  # every answer must be strict JSON
    return answer


def req(method: str, params: Any = None, id: Any = 1) -> dict:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        request["params"] = params
    return request


def note(method: str, params: Any = None) -> dict:
    request = req(method, params)
    del request["id"]
    return request


def error_code(answer: dict) -> int:
    assert set(answer) == {"jsonrpc", "error", "id"}, answer
    return answer["error"]["code"]


# ---- single calls and params ----


def test_by_name_and_sync_handler():
    rpc = make_registry()
    assert call(rpc, req("math.add", {"a": 2, "b": 3})) == {"jsonrpc": "2.0", "result": 5, "id": 1}
    assert call(rpc, req("job.get", {"job_id": "j1"}, id="abc"))["result"] == {"id": "j1", "status": "queued"}


def test_async_handler_model_result_is_dumped_and_ctx_passed():
    rpc, seen = make_registry(), Seen()
    answer = call(rpc, req("job.create", {"agent_id": "a1", "config": {"batch_size": 16}}), ctx=seen)
    assert answer["result"] == {"id": "job_a1", "batch_size": 16}
    assert seen.calls == ["a1"]


def test_by_position_maps_fields_in_declaration_order():
    rpc = make_registry()
    assert call(rpc, req("math.add", [2, 3]))["result"] == 5
    assert call(rpc, req("math.add", [2]))["result"] == 2
    answer = call(rpc, req("job.create", ["a1", {"batch_size": 4}]))
    assert answer["result"] == {"id": "job_a1", "batch_size": 4}


def test_too_many_positional_params():
    answer = call(make_registry(), req("math.add", [1, 2, 3]))
    assert error_code(answer) == INVALID_PARAMS
    assert "at most 2" in answer["error"]["message"]


def test_absent_params_mean_empty_object():
    rpc = make_registry()
    answer = call(rpc, req("math.add"))
    assert error_code(answer) == INVALID_PARAMS
    assert answer["error"]["data"]["errors"] == [
        {"field": "a", "message": "Field required", "type": "missing"}
    ]
    assert call(rpc, req("rpc.discover"))["result"]["openrpc"].startswith("1.3")


@pytest.mark.parametrize("params", ["a=1", 3, True, None])
def test_params_of_the_wrong_json_type(params):
    request = req("math.add", id=7)
    request["params"] = params
    answer = call(make_registry(), request)
    assert error_code(answer) == INVALID_PARAMS
    assert answer["id"] == 7


def test_invalid_params_names_nested_field():
    answer = call(make_registry(), req("job.create", {"agent_id": "a", "config": {"batch_size": 0}}))
    assert error_code(answer) == INVALID_PARAMS
    assert answer["error"]["message"].startswith("invalid params: config.batch_size: ")
    [error] = answer["error"]["data"]["errors"]
    assert error["field"] == "config.batch_size"
    assert error["type"] == "greater_than_equal"


def test_invalid_params_names_list_index_and_several_fields():
    data = [{"query": "q0"}, {"query": "q1"}, {"query": "q2"}, {"query": ""}]
    answer = call(make_registry(), req("job.create", {"agent_id": "", "training_data": data, "extra": 1}))
    fields = [e["field"] for e in answer["error"]["data"]["errors"]]
    assert fields == ["agent_id", "training_data.3.query", "extra"]
    message = answer["error"]["message"]
    assert "agent_id: " in message and "training_data.3.query: " in message and "; " in message


def test_invalid_params_never_echo_the_input():
    secret = "sk-very-secret-" + "x" * 50
    answer = call(make_registry(), req("job.create", {"agent_id": "a", "api_key": {"nested": secret}}))
    assert error_code(answer) == INVALID_PARAMS
    assert "api_key" in answer["error"]["message"]
    assert secret not in json.dumps(answer)


def test_many_validation_errors_are_capped():
    data = [{"query": ""}] * 500
    answer = call(make_registry(), req("job.create", {"agent_id": "a", "training_data": data}))
    assert len(answer["error"]["data"]["errors"]) == 20
    assert answer["error"]["message"].endswith("; and 480 more")


# ---- envelope and id rules ----


@pytest.mark.parametrize(
    "request_, echoed",
    [
        ({"jsonrpc": "1.0", "method": "math.add", "id": 3}, 3),
        ({"jsonrpc": 2.0, "method": "math.add", "id": "x"}, "x"),
        ({"method": "math.add", "id": 3}, 3),
        ({"jsonrpc": "2.0", "method": 1, "id": 3}, 3),
        ({"jsonrpc": "2.0", "id": 3}, 3),
        ({"jsonrpc": "2.0", "method": "math.add", "id": True}, None),
        ({"jsonrpc": "2.0", "method": "math.add", "id": {"a": 1}}, None),
        ({"jsonrpc": "2.0", "method": "math.add", "id": [1]}, None),
        ({"jsonrpc": "2.0", "method": None}, None),  # invalid, so not a notification: it gets a reply
    ],
)
def test_invalid_request_and_id_echo(request_, echoed):
    answer = call(make_registry(), request_)
    assert error_code(answer) == INVALID_REQUEST
    assert answer["id"] == echoed


@pytest.mark.parametrize("body", ["1", '"hello"', "null", "true"])
def test_top_level_json_that_is_not_a_request(body):
    answer = call(make_registry(), body)
    assert error_code(answer) == INVALID_REQUEST
    assert answer["id"] is None


@pytest.mark.parametrize("request_id", ["abc", 0, -5, 2.5, None, 10**30])
def test_valid_ids_are_echoed(request_id):
    assert call(make_registry(), req("math.add", [1, 1], id=request_id)) == {
        "jsonrpc": "2.0",
        "result": 2,
        "id": request_id,
    }


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc": "2.0", "method": "math.add", "id": 1',
        b"\xff\xfe{}",
        b'{"jsonrpc": "2.0", "method": "math.add", "params": [NaN], "id": 1}',
        b'{"jsonrpc": "2.0", "method": "math.add", "params": [1e400], "id": 1}',
        b'{"jsonrpc": "2.0", "method": "math.add", "params": [-Infinity], "id": 1}',
        b'{"jsonrpc": "2.0", "method": "\\ud800", "id": 1}',
        b"[" * 100_000,
        b'{"a":' * 50_000,
        b"9" * 5000,
        b"",
    ],
)
def test_parse_errors(body):
    answer = call(make_registry(), body)
    assert error_code(answer) == PARSE_ERROR
    assert answer["id"] is None


def test_str_body_with_lone_surrogate_is_a_parse_error():
    assert error_code(call(make_registry(), '{"jsonrpc": "2.0", "method": "\ud800", "id": 1}')) == PARSE_ERROR


def test_surrogate_pairs_are_fine():
    request = req("job.get", {"job_id": "\U0001f600"})
    answer = call(make_registry(), json.dumps(request))  # ensure_ascii writes "\ud83d\ude00"
    assert answer["result"]["id"] == "\U0001f600"


def test_body_too_large():
    rpc = make_registry(max_body_bytes=200)
    body = json.dumps(req("job.get", {"job_id": "x" * 300}))
    for raw in (body, body.encode()):
        answer = call(rpc, raw)
        assert error_code(answer) == INVALID_REQUEST
        assert "too large" in answer["error"]["message"]
    assert call(rpc, req("math.add", [1, 2]))["result"] == 3


def test_unknown_method_is_named_and_truncated():
    rpc = make_registry()
    answer = call(rpc, req("job.nope"))
    assert error_code(answer) == METHOD_NOT_FOUND
    assert "job.nope" in answer["error"]["message"]
    long = call(rpc, req("m" * 5000))
    assert error_code(long) == METHOD_NOT_FOUND
    assert long["error"]["message"].count("m") <= 110


# ---- handler failures ----


def test_handler_rpc_error_passes_through_with_data():
    answer = call(make_registry(), req("job.get", {"job_id": "missing"}, id=9))
    assert answer == {
        "jsonrpc": "2.0",
        "error": {"code": NOT_FOUND, "message": "job not found", "data": {"job_id": "missing"}},
        "id": 9,
    }


def test_internal_error_does_not_leak_and_is_logged(caplog):
    with caplog.at_level(logging.ERROR, logger="app.api.jsonrpc"):
        answer = call(make_registry(), req("job.get", {"job_id": "boom"}, id=4))
    assert error_code(answer) == INTERNAL_ERROR
    assert answer["id"] == 4
    assert answer["error"]["message"] == "internal error"
    reference = answer["error"]["data"]["reference"]
    assert "hunter2" not in json.dumps(answer) and "RuntimeError" not in json.dumps(answer)
    assert reference in caplog.text and "hunter2" in caplog.text  # the traceback goes to the log


@pytest.mark.parametrize("job_id", ["nan", "object"])
def test_unserialisable_result_is_an_internal_error(job_id):
    answer = call(make_registry(), req("job.get", {"job_id": job_id}))
    assert error_code(answer) == INTERNAL_ERROR


def test_unserialisable_rpc_error_data_is_an_internal_error():
    rpc = Registry()

    @rpc.method("bad", params=AddParams)
    def bad(params: AddParams, ctx: Any) -> None:
        raise RPCError(NOT_FOUND, "nope", {"at": object()})

    assert error_code(call(rpc, req("bad", [1]))) == INTERNAL_ERROR


# ---- notifications and batches ----


def test_single_notification_gets_no_reply_but_runs():
    rpc, seen = make_registry(), Seen()
    assert call(rpc, note("job.create", {"agent_id": "n1"}), ctx=seen) is None
    assert seen.calls == ["n1"]


def test_failing_notifications_get_no_reply():
    rpc = make_registry()
    assert call(rpc, note("job.nope")) is None
    assert call(rpc, note("math.add", {"a": "x"})) is None
    assert call(rpc, note("job.get", {"job_id": "boom"})) is None


def test_batch_order_preserved_with_a_failing_member_and_notifications():
    rpc = make_registry()
    batch = [req("math.slow_add", [i, 100], id=i) for i in range(6)]
    batch[2] = req("math.slow_add", {"a": "two"}, id=2)
    batch.insert(4, note("math.add", [1, 1]))
    answer = call(rpc, batch)
    assert [r["id"] for r in answer] == [0, 1, 2, 3, 4, 5]
    assert [r.get("result") for r in answer] == [100, 101, None, 103, 104, 105]
    assert error_code(answer[2]) == INVALID_PARAMS


def test_batch_members_that_are_not_objects():
    answer = call(make_registry(), [1, req("math.add", [1, 2], id="ok"), "x"])
    assert [error_code(answer[0]), answer[1]["result"], error_code(answer[2])] == [
        INVALID_REQUEST,
        3,
        INVALID_REQUEST,
    ]
    assert answer[0]["id"] is None


def test_batch_of_only_notifications_is_none():
    rpc, seen = make_registry(), Seen()
    assert call(rpc, [note("job.create", {"agent_id": "b1"}), note("job.nope")], ctx=seen) is None
    assert seen.calls == ["b1"]


def test_empty_batch_is_one_invalid_request():
    answer = call(make_registry(), [])
    assert isinstance(answer, dict)
    assert error_code(answer) == INVALID_REQUEST and answer["id"] is None


def test_oversized_batch_is_one_invalid_request_naming_the_limit():
    rpc = make_registry(max_batch=3)
    answer = call(rpc, [req("math.add", [i], id=i) for i in range(4)])
    assert isinstance(answer, dict)
    assert error_code(answer) == INVALID_REQUEST
    assert "at most 3" in answer["error"]["message"]
    assert len(call(rpc, [req("math.add", [i], id=i) for i in range(3)])) == 3


# ---- registration, discovery and describe ----


def test_registration_rules():
    rpc = make_registry()
    with pytest.raises(ValueError):
        rpc.method("math.add", params=AddParams)(lambda p, c: 0)
    with pytest.raises(ValueError):
        rpc.method("rpc.mine", params=AddParams)(lambda p, c: 0)
    with pytest.raises(TypeError):
        rpc.method("x", params=dict)  # type: ignore[arg-type]
    method = rpc.get("job.create")
    assert method is not None and method.mutates and method.summary == "Create a training job."
    assert rpc.get("nope") is None


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_rpc_discover_returns_openrpc_document():
    rpc = make_registry()
    doc = call(rpc, req("rpc.discover"))["result"]
    assert doc == rpc.openrpc()
    assert doc["openrpc"].startswith("1.3") and doc["info"]["title"] == "raygrpo"
    assert doc["servers"][0]["url"] == "/api/v1/jsonrpc"
    methods = {m["name"]: m for m in doc["methods"]}
    assert sorted(methods) == ["job.create", "job.get", "math.add", "math.slow_add"]

    create = methods["job.create"]
    assert create["paramStructure"] == "either"
    assert create["summary"] == "Create a training job."
    params = {p["name"]: p for p in create["params"]}
    assert list(params) == ["agent_id", "config", "training_data", "api_key"]
    assert params["agent_id"]["required"] is True and params["config"]["required"] is False
    assert params["agent_id"]["description"] == "agent to train"
    assert params["agent_id"]["schema"]["maxLength"] == 64
    assert {"code": BUDGET_EXCEEDED, "message": "budget exceeded"} in create["errors"]
    assert {"code": NOT_FOUND, "message": "not found"} in methods["job.get"]["errors"]
    assert methods["math.add"]["result"]["schema"] == {}

    schemas = doc["components"]["schemas"]
    assert {"TrainConfig", "Example", "JobPublic"} <= set(schemas)
    assert schemas["TrainConfig"]["properties"]["batch_size"]["maximum"] == 64
    refs = _refs(doc)
    assert refs and all(r.startswith("#/components/schemas/") for r in refs)
    assert all(r.rsplit("/", 1)[1] in schemas for r in refs)
    assert "$defs" not in json.dumps(doc)


def test_models_with_the_same_class_name_get_distinct_components():
    def make(bound: int) -> type[BaseModel]:
        class Inner(BaseModel):
            n: int = Field(le=bound)

        class Params(BaseModel):
            inner: Inner

        return Params

    rpc = Registry()
    rpc.method("a", params=make(1))(lambda p, c: None)
    rpc.method("b", params=make(2))(lambda p, c: None)
    doc = rpc.openrpc(title="t", version="9")
    maxima = sorted(
        s["properties"]["n"]["maximum"]
        for s in doc["components"]["schemas"].values()
        if "n" in s["properties"]
    )
    assert maxima == [1, 2]
    assert all(r.rsplit("/", 1)[1] in doc["components"]["schemas"] for r in _refs(doc))


def test_describe_lists_methods_sorted_with_discover():
    assert make_registry().describe() == [
        {
            "name": "job.create",
            "summary": "Create a training job.",
            "params": ["agent_id", "config", "training_data", "api_key"],
            "mutates": True,
            "permission": None,
        },
        {"name": "job.get", "summary": "Read one job.", "params": ["job_id"], "mutates": False, "permission": None},
        {"name": "math.add", "summary": "", "params": ["a", "b"], "mutates": False, "permission": None},
        {"name": "math.slow_add", "summary": "", "params": ["a", "b"], "mutates": False, "permission": None},
        {
            "name": "rpc.discover",
            "summary": "The OpenRPC document of this endpoint.",
            "params": [],
            "mutates": False,
            "permission": None,
        },
    ]


class _Seq(BaseModel):
    n: int


def test_calls_that_wait_for_each_other_never_starve_for_a_thread():
    """A session's numbered calls run in order on the server: call n blocks until call n-1 is done. 40 calls
    sent at once, last first: with asyncio's default executor (cpu + 4 threads, at most 32) the early
    arrivals held every thread while call 1 waited for one, until their order timeout failed them all."""
    import threading

    reg = Registry(sync_in_thread=True)
    done = {"n": 0}
    cv = threading.Condition()

    @reg.method("ordered", params=_Seq)
    def ordered(p: _Seq, ctx: Any) -> int:
        with cv:
            if not cv.wait_for(lambda: done["n"] == p.n - 1, timeout=60):
                raise RPCError(INVALID_PARAMS, f"call {p.n} waited for call {done['n'] + 1}")
            done["n"] = p.n
            cv.notify_all()
        return p.n

    async def send_all() -> list:
        calls = [reg.handle(json.dumps({"jsonrpc": "2.0", "id": n, "method": "ordered", "params": {"n": n}}))
                 for n in range(40, 0, -1)]
        return await asyncio.gather(*calls)

    answers = asyncio.run(send_all())
    assert sorted(a["result"] for a in answers) == list(range(1, 41)), [a.get("error") for a in answers][:3]
