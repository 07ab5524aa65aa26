"""Fuzzing `Registry.handle`: whatever the body (arbitrary JSON, request-shaped objects with wrong
types, batches, raw text with NaN or deep nesting, random bytes), the answer is None only for a valid
notification or all-notification batch, and otherwise strict JSON that is a valid JSON-RPC 2.0 reply.
The registry keeps serving normal calls afterwards."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from app.api.jsonrpc import NOT_FOUND, Registry, RPCError

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
MAX_BATCH = 20


class Config(BaseModel):
    batch_size: int = Field(8, ge=1, le=64)
    temperature: float = Field(1.0, ge=0, le=2)


class Row(BaseModel):
    query: str
    expected: str | None = None


class CreateParams(BaseModel):
    agent_id: str = Field(min_length=1, max_length=64)
    config: Config = Config()
    training_data: list[Row] = []


class EchoParams(BaseModel):
    value: Any = None


def make_registry() -> Registry:
    rpc = Registry(max_body_bytes=2**20, max_batch=MAX_BATCH)

    @rpc.method("job.create", params=CreateParams, mutates=True)
    async def create(params: CreateParams, ctx: Any) -> CreateParams:
        await asyncio.sleep(0)
        return params

    @rpc.method("echo", params=EchoParams)
    def echo(params: EchoParams, ctx: Any) -> Any:
        # Hands back whatever came in: deep or odd values must still end as a valid reply.
        if params.value == "missing":
            raise RPCError(NOT_FOUND, "not found", {"value": params.value})
        if params.value == "boom":
            raise RuntimeError("boom")
        if params.value == "nan":
            return {"value": float("nan")}  # not strict JSON: must become -32603, not a 500
        return {"value": params.value}

    return rpc


FIELDS = ["agent_id", "config", "training_data", "value", "batch_size", "query", "extra"]
METHODS = ["job.create", "echo", "rpc.discover", "nope", "", "rpc.nope"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(FIELDS + METHODS + ["2.0", "missing", "boom", "nan"])
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)  # json.dumps writes "\\udc00"
    | st.integers(0, 200_000).map(lambda n: "x" * n)  # huge strings, cheaply
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
params = (
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4)
    | st.fixed_dictionaries(
        {"agent_id": st.text(max_size=70)},
        optional={
            "config": st.dictionaries(st.sampled_from(["batch_size", "temperature", "x"]), json_values),
            "training_data": st.lists(st.dictionaries(st.sampled_from(["query", "expected"]), json_values)),
        },
    )
    | st.lists(json_values, max_size=5)
    | json_values
)
lone_surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
ids = st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10)
# Mostly well formed, so that the values reach validation, the handlers and the echoed id;
# the messy half puts any JSON value in any member.
well_formed = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"), "method": st.sampled_from(METHODS)},
    optional={
        "params": params
        | st.fixed_dictionaries({"value": st.sampled_from(["missing", "boom", "nan"]) | json_values}),
        "id": ids | lone_surrogates,
    },
)
messy = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.just("2.0") | json_values,
        "method": st.sampled_from(METHODS) | json_values,
        "params": params,
        "id": ids | json_values,
    },
)
requests = well_formed | messy
members = requests | json_values
bodies = members | st.lists(members, max_size=MAX_BATCH + 3)


def strict_loads(raw: bytes | str) -> Any:
    """The body as strict JSON, or a sentinel when it is not (then no reply may be None)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        text.encode("utf-8")

        def refuse(_: str) -> Any:
            raise ValueError

        return json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError):
        return NOT_JSON


NOT_JSON = object()


def is_notification(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("jsonrpc") == "2.0"
        and isinstance(value.get("method"), str)
        and "id" not in value
    )


def check_reply(reply: Any) -> None:
    assert isinstance(reply, dict), reply
    assert reply.get("jsonrpc") == "2.0"
    assert "id" in reply
    request_id = reply["id"]
    assert request_id is None or (
        isinstance(request_id, str | int | float) and not isinstance(request_id, bool)
    )
    assert ("result" in reply) != ("error" in reply)
    assert set(reply) == {"jsonrpc", "id", "result" if "result" in reply else "error"}
    if "error" in reply:
        error = reply["error"]
        assert isinstance(error["code"], int) and not isinstance(error["code"], bool)
        assert isinstance(error["message"], str)
        assert set(error) <= {"code", "message", "data"}


def check(rpc: Registry, raw: bytes | str) -> None:
    answer = asyncio.run(rpc.handle(raw))
    parsed = strict_loads(raw)
    if answer is None:
        silent = is_notification(parsed) or (
            isinstance(parsed, list) and 0 < len(parsed) <= MAX_BATCH and all(map(is_notification, parsed))
        )
        assert silent, raw[:200]
    else:
        # Exactly what the HTTP layer will do with it.
        json.dumps(answer, ensure_ascii=False, allow_nan=False).encode("utf-8")
        if isinstance(answer, list):
            assert answer
            for reply in answer:
                check_reply(reply)
            assert isinstance(parsed, list)
            assert len(answer) == sum(not is_notification(m) for m in parsed)
        else:
            check_reply(answer)
    # ... and the registry still answers a normal call.
    ok = asyncio.run(rpc.handle(b'{"jsonrpc": "2.0", "method": "echo", "params": [1], "id": "after"}'))
    assert ok == {"jsonrpc": "2.0", "result": {"value": 1}, "id": "after"}


RPC = make_registry()  # one registry across examples, so state leaking between calls would show


@FUZZ
@given(body=bodies)
def test_arbitrary_json_bodies(body):
    check(RPC, json.dumps(body))


@FUZZ
@given(
    body=bodies,
    junk=st.sampled_from(
        ["NaN", "-Infinity", "Infinity", "1e999", "-1e400", '"\\udc00"', "[", "}", ",", "\x00"]
    ),
    at=st.integers(0, 10_000),
)
def test_raw_text_with_non_json_numbers_and_junk(body, junk, at):
    text = json.dumps(body)
    at %= len(text) + 1
    check(RPC, text[:at] + junk + text[at:])


TOKENS = [
    "NaN",
    "-Infinity",
    "1e999",
    "-1e400",
    '"\\udc00"',
    "1",
    "null",
    '"x"',
    "true",
    "[]",
    "9" * 5000,
    '"nan"',
    '"boom"',
    '"missing"',
]


@FUZZ
@given(id_=st.sampled_from(TOKENS), value=st.sampled_from(TOKENS), method=st.sampled_from(["echo", "nope"]))
def test_non_json_numbers_in_otherwise_valid_requests(id_, value, method):
    check(RPC, f'{{"jsonrpc": "2.0", "method": "{method}", "params": {{"value": {value}}}, "id": {id_}}}')


@FUZZ
@given(raw=st.binary(max_size=500))
def test_random_bytes(raw):
    check(RPC, raw)


@settings(FUZZ, max_examples=60)
@given(depth=st.integers(1, 100_000), shape=st.sampled_from(["array", "object", "inside a request"]))
def test_deeply_nested(depth, shape):
    nested = "[" * depth + "1" + "]" * depth
    if shape == "object":
        nested = '{"a":' * depth + "1" + "}" * depth
    if shape == "inside a request":
        nested = '{"jsonrpc": "2.0", "method": "echo", "id": 1, "params": {"value": ' + nested + "}}"
    check(RPC, nested)


@settings(FUZZ, max_examples=20)
@given(depth=st.sampled_from([100_000, 200_000]))
def test_unclosed_brackets_as_bytes(depth):
    check(RPC, b"[" * depth)
