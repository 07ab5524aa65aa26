"""Security and observability of the job API, in process over HTTP (FastAPI's TestClient):
authentication (JWT and API keys), permissions per role and scope, one user's jobs hidden from
another, rate limits (in process and in the real Redis, shared by two app instances as by two Serve
replicas), the audit log, /metrics, request ids and readiness. The Serve-level check with two real
replicas is in test_api_ray.py.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

import jwt
import pytest
from fastapi.testclient import TestClient
from raygrpo_test_services import bearer

from app.api.auth import PERMISSIONS, ROLES, mint_token
from app.api.jsonrpc import FORBIDDEN, NOT_FOUND, RATE_LIMITED, UNAUTHENTICATED
from app.settings import Settings

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(4)]
SECRET = "s3cret-for-tests-only-" + "x" * 20


def make_app(tmp_path, tiny_model_dir, **over):
    from app.api.main import create_app

    kw = dict(home=tmp_path / "home", database_url=None, redis_url=None, default_model=tiny_model_dir,
              jwt_secret=SECRET, rate_limits={"default": 0}, cancel_wait_s=0.2)
    settings = Settings(**(kw | over))
    return create_app(settings), settings


@pytest.fixture
def api(tmp_path, tiny_model_dir):
    app, settings = make_app(tmp_path, tiny_model_dir)
    with TestClient(app) as client:
        client.settings = settings
        yield client


def call(client, method, params=None, headers=None, id=1):
    body = {"jsonrpc": "2.0", "method": method, "id": id, **({"params": params} if params is not None else {})}
    return client.post("/api/v1/jsonrpc", json=body, headers=headers or {})


def start_job(client, headers, **over):
    params = {"agent_id": "agent-1", "training_data": ROWS,
              "config": {"n_iterations": 3, "batch_size": 2, "reward": "digit", "max_budget_usd": "1"}} | over
    r = call(client, "training.start_grpo", params, headers)
    assert r.status_code == 200 and "result" in r.json(), r.text
    return r.json()["result"]["job_id"]


def permissioned_methods():
    import app.api.main  # noqa: F401  every module that registers methods
    from app.api.context import registry

    return sorted(m.name for m in registry.methods() if m.permission is not None)


def token(claims: dict, key: str = SECRET, alg: str = "HS256") -> dict[str, str]:
    now = int(time.time())
    base = {"sub": "alice", "role": "admin", "iat": now, "exp": now + 600, "aud": "raygrpo", "iss": "raygrpo"}
    payload = {k: v for k, v in (base | claims).items() if v is not None}
    return {"Authorization": f"Bearer {jwt.encode(payload, key, algorithm=alg)}"}


def bad_credentials() -> dict[str, tuple[dict[str, str], str]]:
    """Made when a test runs, not at import: a token valid for 10 minutes must still be valid then."""
    return {
        "missing": ({}, "credentials required"),
        "not bearer": ({"Authorization": "Basic YWxpY2U6cHc="}, "Bearer"),
        "malformed": ({"Authorization": "Bearer not.a.jwt"}, "malformed"),
        "expired": (token({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}), "expired"),
        "wrong audience": (token({"aud": "someone-else"}), "audience"),
        "wrong issuer": (token({"iss": "evil"}), "issuer"),
        "no exp": (token({"exp": None}), "exp"),
        "wrong signature": (token({}, key="another-secret-of-enough-length-000"), "signature"),
        "alg none": ({"Authorization": "Bearer " + jwt.encode({"sub": "alice", "role": "admin"}, None, algorithm="none")},
                     "algorithm"),
        "unknown role": (token({"role": "root"}), "role"),
        "unknown api key": ({"X-API-Key": "rg_" + "a" * 43}, "unknown API key"),
        "malformed api key": ({"X-API-Key": "hunter2"}, "malformed API key"),
    }


@pytest.mark.parametrize("method", permissioned_methods())
def test_every_method_refuses_bad_credentials(api, method):
    for name, (headers, reason) in bad_credentials().items():
        r = call(api, method, {}, headers)
        assert r.status_code == 401, (name, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        error = r.json()["error"]
        assert error["code"] == UNAUTHENTICATED and reason in error["message"], (name, error)
        assert "secret" not in json.dumps(error).lower() or name == "missing"


def test_discover_and_health_need_no_credentials(api):
    assert call(api, "rpc.discover").json()["result"]["openrpc"].startswith("1.")
    assert api.get("/health").status_code == 200 and api.get("/health/ready").status_code == 200
    assert api.get("/metrics").status_code == 200


def test_revoked_and_expired_api_keys_are_refused(api):
    admin = bearer(api.settings)
    key = call(api, "auth.create_api_key", {"owner": "carol", "role": "researcher", "name": "ci"}, admin).json()
    key = key["result"]
    me = call(api, "auth.whoami", {}, {"X-API-Key": key["api_key"]}).json()["result"]
    assert me["subject"] == "carol" and me["role"] == "researcher" and me["auth_method"] == "api_key"
    listed = call(api, "auth.list_api_keys", {"owner": "carol"}, admin).json()["result"]["keys"]
    assert [k["key_id"] for k in listed] == [key["key_id"]] and "api_key" not in listed[0]
    assert key["api_key"] not in json.dumps(listed)  # only its prefix is ever shown again
    assert call(api, "auth.revoke_api_key", {"key_id": key["key_id"]}, admin).status_code == 200
    for method in permissioned_methods():
        r = call(api, method, {}, {"X-API-Key": key["api_key"]})
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"], method
    assert call(api, "auth.list_api_keys", {"owner": "carol"}, admin).json()["result"]["keys"] == []

    from app.data import db
    from app.data.tables import ApiKey, utcnow

    short = call(api, "auth.create_api_key", {"owner": "dave", "expires_in_days": 1}, admin).json()["result"]
    with db.session_scope(api.app.state.ctx.engine) as s:
        row = s.get(ApiKey, short["key_id"])
        row.expires_at = utcnow()
        s.add(row)
    r = call(api, "auth.whoami", {}, {"X-API-Key": short["api_key"]})
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_permission_is_enforced_for_each_role(api, role):
    from app.api.context import registry

    headers = bearer(api.settings, f"user-{role}", role)
    for method in registry.methods():
        if method.permission is None:
            continue
        reply = call(api, method.name, {"job_id": "job_x"} if "job_id" in method.param_names() else {}, headers)
        code = reply.json().get("error", {}).get("code")
        if method.permission == "authenticated" or method.permission in ROLES[role]:
            assert code != FORBIDDEN, (role, method.name, reply.text)
        else:
            assert code == FORBIDDEN and reply.status_code == 403, (role, method.name, reply.text)
            assert method.permission in reply.json()["error"]["message"]


def test_scoped_tokens_and_keys_narrow_the_role(api):
    scoped = bearer(api.settings, "erin", "researcher", scopes=["training:view"])
    assert call(api, "training.list_jobs", {}, scoped).status_code == 200
    assert call(api, "training.start_grpo", {}, scoped).json()["error"]["code"] == FORBIDDEN
    admin = bearer(api.settings)
    key = call(api, "auth.create_api_key", {"owner": "frank", "role": "admin", "scopes": ["training:view"]},
               admin).json()["result"]["api_key"]
    assert call(api, "auth.list_api_keys", {}, {"X-API-Key": key}).json()["error"]["code"] == FORBIDDEN
    bad = call(api, "auth.create_api_key", {"owner": "x", "scopes": ["root:all"]}, admin).json()["error"]
    assert bad["code"] == -32602 and bad["data"]["field"] == "scopes"
    assert set(ROLES["admin"]) == set(PERMISSIONS)


def test_one_user_cannot_see_or_touch_another_users_job(api):
    alice, bob = bearer(api.settings, "alice", "researcher"), bearer(api.settings, "bob", "researcher")
    admin = bearer(api.settings, "root", "admin")
    job = start_job(api, alice, idempotency_key="same-key")
    missing = "job_" + uuid.uuid4().hex
    for method, extra in [("training.get_status", {}), ("training.cancel", {"wait": False}),
                          ("training.export_trajectories", {}), ("training.evaluate", {}),
                          ("training.pause", {}), ("training.resume", {})]:
        theirs = call(api, method, {"job_id": job, **extra}, bob).json()["error"]
        nobody = call(api, method, {"job_id": missing, **extra}, bob).json()["error"]
        assert theirs["code"] == nobody["code"] == NOT_FOUND, (method, theirs)
        assert theirs["message"].replace(job, "ID") == nobody["message"].replace(missing, "ID")  # nothing leaks
    assert call(api, "training.get_status", {"job_id": job}, alice).json()["result"]["status"] == "queued"
    assert call(api, "training.get_status", {"job_id": job}, admin).json()["result"]["status"] == "queued"
    assert call(api, "training.list_jobs", {}, bob).json()["result"]["jobs"] == []
    assert [j["job_id"] for j in call(api, "training.list_jobs", {}, alice).json()["result"]["jobs"]] == [job]
    assert job in [j["job_id"] for j in call(api, "training.list_jobs", {}, admin).json()["result"]["jobs"]]
    # the same idempotency key from another user is another job, not a way to read alice's
    bobs = start_job(api, bob, idempotency_key="same-key")
    assert bobs != job
    assert call(api, "training.cancel", {"job_id": job, "wait": False}, bob).json()["error"]["code"] == NOT_FOUND
    assert call(api, "training.get_status", {"job_id": job}, alice).json()["result"]["status"] == "queued"
    assert call(api, "training.cancel", {"job_id": job, "wait": False}, admin).json()["result"]["status"] == "cancelled"


def _redis() -> str:
    """The real Redis, database 13 (this module's; buckets and counters use unique keys or deltas)."""
    import os

    import redis
    from raygrpo_test_services import DEFAULT_REDIS_URL, unavailable

    url = (os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL).rsplit("/", 1)[0] + "/13"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        unavailable("Redis", e)
    return url


def _limited_app(tmp_path, tiny_model_dir, limits, redis_url=None):
    app, settings = make_app(tmp_path, tiny_model_dir, rate_limits=limits, redis_url=redis_url)
    return app, settings


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.services)])
def test_rate_limits_trip_at_the_configured_count_with_headers(tmp_path, tiny_model_dir, backend):
    redis_url = _redis() if backend == "redis" else None
    app, settings = _limited_app(tmp_path, tiny_model_dir, {"training.list_jobs": 5, "default": 0}, redis_url)
    headers = bearer(settings, f"rl-{uuid.uuid4().hex[:8]}", "viewer")
    with TestClient(app) as client:
        replies = [call(client, "training.list_jobs", {}, headers) for _ in range(5)]
        assert [r.status_code for r in replies] == [200] * 5
        assert [r.headers["X-RateLimit-Remaining"] for r in replies] == ["4", "3", "2", "1", "0"]
        assert all(r.headers["X-RateLimit-Limit"] == "5" and int(r.headers["X-RateLimit-Reset"]) >= 1
                   for r in replies)
        over = call(client, "training.list_jobs", {}, headers)
        assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
        err = over.json()["error"]
        assert err["code"] == RATE_LIMITED and err["data"]["retry_after_s"] >= 1 and err["data"]["limit"] == 5
        # other methods and other callers have buckets of their own
        assert call(client, "auth.whoami", {}, headers).status_code == 200
        assert call(client, "training.list_jobs", {}, bearer(settings, "someone-else", "viewer")).status_code == 200


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.services)])
def test_batches_count_each_call(tmp_path, tiny_model_dir, backend):
    redis_url = _redis() if backend == "redis" else None
    app, settings = _limited_app(tmp_path, tiny_model_dir, {"training.list_jobs": 3, "default": 0}, redis_url)
    headers = bearer(settings, f"batch-{uuid.uuid4().hex[:8]}", "viewer")
    with TestClient(app) as client:
        batch = [{"jsonrpc": "2.0", "method": "training.list_jobs", "id": i} for i in range(5)]
        replies = client.post("/api/v1/jsonrpc", json=batch, headers=headers)
        assert replies.status_code == 200
        codes = sorted(r.get("error", {}).get("code", 0) for r in replies.json())
        assert codes == [RATE_LIMITED, RATE_LIMITED, 0, 0, 0]
        assert replies.headers["X-RateLimit-Remaining"] == "0"


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.services)])
def test_a_bucket_refills_at_the_configured_rate(backend):
    from app.api.ratelimit import RateLimiter

    redis_url = _redis() if backend == "redis" else None
    limiter = RateLimiter({"m": 600}, redis_url)  # 10 tokens a second
    who = f"refill-{uuid.uuid4().hex[:8]}"
    decisions = [limiter.take(who, "m") for _ in range(600)]
    assert sum(d.allowed for d in decisions) >= 599  # a token may refill while taking 600
    while limiter.take(who, "m").allowed:  # drain what refilled meanwhile
        pass
    refused = limiter.take(who, "m")
    assert not refused.allowed and 0 < refused.retry_after_s <= 0.1
    time.sleep(0.35)
    assert limiter.take(who, "m").allowed and limiter.take(who, "m").allowed  # ~3 tokens back
    assert limiter.take("other", "m").remaining == 599


@pytest.mark.services
def test_two_app_instances_share_buckets_and_request_counters_through_redis(tmp_path, tiny_model_dir):
    """As two Serve replicas do: the limit holds across both, and /metrics of either counts both."""
    limits = {"training.list_jobs": 4, "default": 0}
    redis_url = _redis()
    a, settings = _limited_app(tmp_path / "a", tiny_model_dir, limits, redis_url)
    b, _ = _limited_app(tmp_path / "b", tiny_model_dir, limits, redis_url)
    headers = bearer(settings, f"shared-{uuid.uuid4().hex[:8]}", "viewer")
    with TestClient(a) as ca, TestClient(b) as cb:
        before = _sample(cb.get("/metrics").text, 'jsonrpc_requests_total{method="training.list_jobs",code="-42900"}')
        codes = [call(c, "training.list_jobs", {}, headers).status_code for c in (ca, cb) * 4]
        assert codes.count(200) == 4 and codes.count(429) == 4
        after = _sample(cb.get("/metrics").text, 'jsonrpc_requests_total{method="training.list_jobs",code="-42900"}')
        assert after - before == 4  # b reports a's refusals too
        assert _sample(ca.get("/metrics").text,
                       'jsonrpc_requests_total{method="training.list_jobs",code="-42900"}') == after


def _sample(text: str, series: str) -> float:
    """The value of `name{a="x",b="y"}` in a Prometheus text page, whatever order the labels are in."""
    from prometheus_client.parser import text_string_to_metric_families

    name, _, rest = series.partition("{")
    want = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == want:
                return sample.value
    return 0.0


def test_state_changes_are_audited_and_only_admins_read_the_log(api):
    alice, viewer = bearer(api.settings, "alice", "researcher"), bearer(api.settings, "vic", "viewer")
    admin = bearer(api.settings, "root", "admin")
    job = start_job(api, alice)
    call(api, "training.cancel", {"job_id": job, "wait": False}, alice)
    assert call(api, "training.start_grpo", {}, viewer).json()["error"]["code"] == FORBIDDEN
    call(api, "training.get_status", {"job_id": job}, alice)  # a read: not audited
    assert call(api, "audit.query", {}, alice).json()["error"]["code"] == FORBIDDEN
    entries = call(api, "audit.query", {}, admin).json()["result"]["entries"]
    got = [(e["principal"], e["method"], e["outcome"], e["error_code"]) for e in entries]
    assert got == [("vic", "training.start_grpo", "error", FORBIDDEN), ("alice", "training.cancel", "ok", None),
                   ("alice", "training.start_grpo", "ok", None)]
    started = entries[-1]
    assert started["target"] == job and started["auth_method"] == "jwt" and started["client_ip"]
    assert started["params"]["training_data"] == "<4 items>"  # bulk data is not copied into the log
    assert re.fullmatch(r"[0-9a-f]{32}", started["request_id"])
    page = call(api, "audit.query", {"limit": 2}, admin).json()["result"]
    rest = call(api, "audit.query", {"limit": 2, "cursor": page["next_cursor"]}, admin).json()["result"]
    assert len(page["entries"]) == 2 and page["has_more"] and [e["id"] for e in rest["entries"]] == [started["id"]]
    only = call(api, "audit.query", {"principal": "alice", "method": "training.cancel"}, admin).json()["result"]
    assert [e["target"] for e in only["entries"]] == [job]


def test_metrics_report_jobs_requests_and_queue(api):
    alice = bearer(api.settings, "alice", "researcher")
    job = start_job(api, alice)
    start_job(api, alice)
    call(api, "training.cancel", {"job_id": job, "wait": False}, alice)
    call(api, "no.such.method", {}, alice)
    text = api.get("/metrics", headers=bearer(api.settings)).text  # an admin sees per-job series
    assert _sample(text, "training_jobs_total") == 2
    assert _sample(text, "training_jobs_cancelled_total") == 1 and _sample(text, "training_jobs_active") == 0
    assert _sample(text, 'redis_queue_length{queue="database"}') == 1
    assert _sample(text, 'jsonrpc_requests_total{method="training.start_grpo",code="0"}') == 2
    assert _sample(text, 'jsonrpc_requests_total{method="unknown",code="-32601"}') == 1  # bounded labels
    assert _sample(text, 'http_requests_total{method="POST /api/v1/jsonrpc",status="200"}') == 4
    assert _sample(text, 'http_request_duration_seconds_count{method="POST /api/v1/jsonrpc"}') == 4
    assert _sample(text, 'http_request_duration_seconds_bucket{method="POST /api/v1/jsonrpc",le="+Inf"}') == 4
    assert _sample(text, f'training_job_budget_usd{{job_id="{job}"}}') == 1.0
    assert "training_job_duration_seconds_bucket" in text and "db_pool_connections_max" in text


def test_metrics_show_tenants_job_ids_only_to_the_scraper_and_admins(tmp_path, tiny_model_dir):
    scrape = "scrape-" + "s" * 40
    app, settings = make_app(tmp_path, tiny_model_dir, metrics_token=scrape)
    with TestClient(app) as api:
        api.settings = settings
        job = start_job(api, bearer(settings, "alice", "researcher"))
        series = f'training_job_cost_usd{{job_id="{job}"}}'
        for headers in ({}, bearer(settings, "bob", "researcher"), bearer(settings, "alice", "viewer")):
            r = api.get("/metrics", headers=headers)
            assert r.status_code == 200 and job not in r.text and _sample(r.text, "training_jobs_total") == 1
            assert "# TYPE training_job_cost_usd gauge" in r.text  # the runbook's names stay, without series
        for headers in ({"Authorization": f"Bearer {scrape}"}, bearer(settings)):
            r = api.get("/metrics", headers=headers)
            assert r.status_code == 200 and series in r.text
        for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {scrape}x"}):
            r = api.get("/metrics", headers=headers)  # a scraper with the wrong credential is told, not served less
            assert r.status_code == 401 and job not in r.text


def test_request_ids_are_echoed_and_on_log_lines(api, caplog):
    r = call(api, "training.list_jobs", {}, bearer(api.settings) | {"X-Request-ID": "trace-42"})
    assert r.headers["X-Request-ID"] == "trace-42"
    generated = call(api, "rpc.discover", None, {"X-Request-ID": "bad id with spaces"}).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)

    from grpo.logs import JsonFormatter, principal, request_id

    tokens = request_id.set("req-1"), principal.set("alice")
    try:
        record = logging.LogRecord("app.x", logging.INFO, __file__, 1, "job %s done", ("job_1",), None)
        from grpo.logs import ContextFilter

        ContextFilter().filter(record)
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(tokens[0])
        principal.reset(tokens[1])
    assert line["message"] == "job job_1 done" and line["request_id"] == "req-1" and line["principal"] == "alice"
    assert line["level"] == "INFO" and line["ts"].endswith("+00:00")


def test_readiness_names_the_failing_dependency(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir, redis_url="redis://127.0.0.1:1/0")  # nothing listens on 1
    with TestClient(app) as client:
        r = client.get("/health/ready")
        assert r.status_code == 503 and r.json()["failing"] == ["redis"]
        assert client.get("/health/live").status_code == 200  # liveness has no dependencies
    app, _ = make_app(tmp_path / "pg", tiny_model_dir, database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    with TestClient(app) as client:
        r = client.get("/health/ready")
        assert r.status_code == 503 and r.json()["failing"] == ["database"]


def test_rs256_public_key_accepts_only_tokens_signed_by_its_private_key(tmp_path, tiny_model_dir):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    app, settings = make_app(tmp_path, tiny_model_dir, jwt_public_key=public)
    with TestClient(app) as client:
        good = {"Authorization": f"Bearer {mint_token(settings, 'rita', 'viewer', private_key=pem)}"}
        assert call(client, "auth.whoami", {}, good).json()["result"]["subject"] == "rita"
        # an HS256 token "signed" with the public key text is the classic confusion attack: refused
        forged = {"Authorization": "Bearer " + jwt.encode(
            {"sub": "rita", "role": "admin", "iat": int(time.time()), "exp": int(time.time()) + 60,
             "aud": "raygrpo", "iss": "raygrpo"}, SECRET, algorithm="HS256")}
        r = call(client, "auth.whoami", {}, forged)
        assert r.status_code == 401 and "algorithm" in r.json()["error"]["message"]


def test_auth_off_makes_every_caller_a_local_admin(tmp_path, tiny_model_dir):
    app, _ = make_app(tmp_path, tiny_model_dir, auth="off")
    with TestClient(app) as client:
        me = call(client, "auth.whoami", {}).json()["result"]
        assert me["subject"] == "local" and me["role"] == "admin"


def test_the_local_secret_is_created_once_private_and_used_by_the_token_command(tmp_path, capsys, monkeypatch):
    from app.api import auth
    settings = Settings(home=tmp_path / "h", jwt_secret=None)
    tok = mint_token(settings, "me", "viewer")
    secret_file = tmp_path / "h" / "jwt_secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert auth.verify_jwt(settings, tok).subject == "me"
    monkeypatch.setenv("RAYGRPO_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("RAYGRPO_JWT_SECRET", raising=False)
    from app.settings import get_settings

    get_settings.cache_clear()
    try:
        assert auth.main(["token", "--sub", "cli-user", "--role", "researcher"]) == 0
    finally:
        get_settings.cache_clear()
    printed = capsys.readouterr().out.strip()
    principal = auth.verify_jwt(settings, printed)
    assert principal.subject == "cli-user" and principal.role == "researcher"
