"""Fuzz the HTTP endpoint: malformed JSON, wrong types, huge and nested payloads, any Content-Type.

Every answer is 200 with valid JSON-RPC 2.0 (or 204 for notifications), never a 5xx, and the
service keeps serving. The JSON-RPC core has its own, deeper fuzz test (test_jsonrpc_fuzz.py).
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raygrpo_test_services import bearer

from app.settings import Settings

METHODS = ["training.start_grpo", "training.get_status", "training.cancel", "training.list_jobs",
           "training.export_trajectories", "training.pause", "training.resume", "rpc.discover", "x"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
requests = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "1.0", 2]), "method": st.sampled_from(METHODS) | st.text(max_size=20)},
    optional={"id": st.integers() | st.text(max_size=5) | st.none(), "params": json_values},
)
bodies = (
    requests.map(json.dumps)
    | st.lists(requests, max_size=5).map(json.dumps)
    | json_values.map(json.dumps)
    | st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
    | st.integers(1, 50_000).map(lambda n: "[" * n + "]" * n)
    | st.integers(1, 3_000_000).map(lambda n: json.dumps({"jsonrpc": "2.0", "method": "x", "id": 1, "p": "a" * n}))
)
content_types = st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain", ""])


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_dir):
    from app.api.main import create_app

    home = tmp_path_factory.mktemp("fuzz")
    settings = Settings(home=home, database_url=None, redis_url=None, default_model=tiny_model_dir,
                        rate_limits={"default": 0})
    app = create_app(settings)
    with TestClient(app, headers=bearer(settings)) as c:
        yield c


def _valid(reply) -> bool:
    if isinstance(reply, list):
        return bool(reply) and all(_valid(r) for r in reply)
    ok = isinstance(reply, dict) and reply.get("jsonrpc") == "2.0" and "id" in reply
    ok = ok and (("result" in reply) != ("error" in reply))
    if ok and "error" in reply:
        ok = isinstance(reply["error"].get("code"), int) and isinstance(reply["error"].get("message"), str)
    return ok


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=bodies, content_type=content_types)
def test_every_answer_is_json_rpc_and_never_5xx(client, body, content_type):
    r = client.post("/api/v1/jsonrpc", content=body.encode("utf-8", "surrogatepass"),
                    headers={"Content-Type": content_type} if content_type else {})
    assert r.status_code in (200, 204), (r.status_code, r.text[:300])
    if r.status_code == 200:
        assert _valid(r.json()), r.text[:300]
    # and it keeps serving
    ok = client.post("/api/v1/jsonrpc", json={"jsonrpc": "2.0", "method": "training.list_jobs", "id": 1})
    assert ok.status_code == 200 and "result" in ok.json()


def test_a_body_over_the_limit_is_refused_without_reading_it_all(client):
    big = b'{"jsonrpc": "2.0", "method": "x", "id": 1, "p": "' + b"a" * (11 * 2**20) + b'"}'
    r = client.post("/api/v1/jsonrpc", content=big)
    assert r.status_code == 200 and r.json()["error"]["code"] == -32600 and "too large" in r.json()["error"]["message"]


# ---- hostile headers and deep nesting, on both databases ----------------------------------------

HOSTILE_METHODS = ["training.start_grpo", "experiments.create", "experiments.list", "datasets.create",
                   "prompts.create", "training.list_jobs", "models.register"]
header_values = (st.binary(min_size=0, max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)
                 | st.sampled_from([b"abc\xe9", "\u00e9\u4e2d".encode(), b"\xff\xfe", b"a" * 5000, b"Bearer \xe9",
                                    b"Bearer " + b"a." * 2000, b"rg_" + b"\x00" * 43]))
header_names = st.sampled_from([b"X-Request-ID", b"Authorization", b"X-API-Key", b"Content-Type",
                                b"Idempotency-Key", b"X-Forwarded-For", b"Accept", b"X-Anything"])


def _nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@st.composite
def hostile_requests(draw):
    method = draw(st.sampled_from(HOSTILE_METHODS))
    depth = draw(st.integers(1, 100_000) | st.sampled_from([62, 63, 64, 65, 300, 998, 1_000]))
    field = draw(st.sampled_from(["config", "metadata", "training_data", "tags", "x"]))
    value = _nested(depth, draw(st.sampled_from(["array", "object"])))
    body = ('{"jsonrpc": "2.0", "id": 1, "method": "' + method + '", "params": {"name": "n", "agent_id": "a", "'
            + field + '": ' + value + "}}")
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=4))
    return body, headers


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def hostile_client(request, tmp_path_factory, tiny_model_dir):
    from raygrpo_test_services import fresh_postgres

    from app.api.main import create_app

    home = tmp_path_factory.mktemp("hostile")
    with (fresh_postgres() if request.param == "postgresql" else _nothing()) as url:
        if url is not None:  # a server database is migrated by the operator (`raygrpo db upgrade`)
            from app.data.db import get_engine, init_db

            init_db(get_engine(url))
        settings = Settings(home=home, database_url=url, redis_url=None, default_model=tiny_model_dir,
                            rate_limits={"default": 0})
        with TestClient(create_app(settings), headers=bearer(settings), raise_server_exceptions=False) as c:
            yield c


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@settings(max_examples=1_250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(req=hostile_requests())
def test_hostile_headers_and_deep_params_get_a_json_rpc_error_not_a_5xx(hostile_client, req):
    """Headers with any bytes (non-ASCII request ids, junk credentials) and params nested up to 100,000
    deep; 1,250 examples of two hostile requests each (the call, and /health with its headers) per
    database, 5,000 in all: every answer is JSON-RPC, never a 5xx and never -32603; nothing stored breaks a later read."""
    body, headers = req
    r = hostile_client.post("/api/v1/jsonrpc", content=body.encode(),
                            headers=[(b"Content-Type", b"application/json"), *headers])
    # 4xx are answers too (401 for junk credentials); each carries a JSON-RPC error
    assert r.status_code < 500, (r.status_code, r.text[:300])
    reply = r.json()
    assert _valid(reply) and (r.status_code == 200 or "error" in reply), r.text[:300]
    assert reply.get("error", {}).get("code") != -32603, r.text[:300]
    health = hostile_client.get("/health", headers=headers)
    assert health.status_code == 200, (health.status_code, health.text[:300])
    after = hostile_client.post("/api/v1/jsonrpc", json={"jsonrpc": "2.0", "method": "experiments.list", "id": 2})
    assert after.status_code == 200 and "result" in after.json(), after.text[:300]
