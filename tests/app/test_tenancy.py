"""One tenant never reaches another's models, files or deployments through the API (no Ray here: the policy
checks run before anything is loaded or started; tests/app/test_hostile_tenant.py plays the same against a
live stack).

- every model a request names goes through one policy (app.jobs.trust.resolve_model): another user's job
  folder, checkpoint or session weights are "not found", exactly like missing ones;
- replies name checkpoints by id and show server paths to admins only;
- a researcher cannot jump the queue (priority), attach a dataset file by a hash they merely learnt, or call
  another user's deployed policy (app.serving.access.check_policy_call);
- Serve's proxy is spared headers it cannot decode (app.api.proxy).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil

import pytest
from fastapi.testclient import TestClient
from raygrpo_test_services import bearer

from app.api.jsonrpc import FORBIDDEN, NOT_FOUND, VALIDATION_FAILED
from app.data import db
from app.data.tables import PolicyDeployment, TrainingSession
from app.settings import Settings

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(4)]


@pytest.fixture
def api(tmp_path, tiny_model_dir):
    from app.api.main import create_app

    settings = Settings(home=tmp_path / "home", database_url=None, redis_url=None, default_model=tiny_model_dir,
                        rate_limits={"default": 0, "policy.generate": 3}, jwt_secret="t" * 40)
    app = create_app(settings)
    with TestClient(app) as client:
        client.settings, client.ctx = settings, app.state.ctx
        yield client


def rpc(client, method, params, who="alice", role="researcher"):
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    return client.post("/api/v1/jsonrpc", json=body, headers=bearer(client.settings, who, role)).json()


def start(client, who="alice", role="researcher", **config):
    return rpc(client, "training.start_grpo", {"agent_id": "a", "training_data": ROWS, "config": {
        "n_iterations": 2, "batch_size": 2, "reward": "digit", "max_budget_usd": "1", **config}}, who, role)


@pytest.fixture
def carols(api, tiny_model_dir):
    """Carol's job with a checkpoint in its folder, and her session's saved weights (what a run and
    sessions.save_weights leave on the server's disk)."""
    job_id = start(api, "carol")["result"]["job_id"]
    ckpt_dir = api.settings.runs_dir / job_id / "run" / "checkpoints" / "step_2"
    shutil.copytree(tiny_model_dir, ckpt_dir)
    weights = api.settings.home / "models" / "sessions" / "sess_carol" / "w1"
    shutil.copytree(tiny_model_dir, weights)
    staging = api.settings.runs_dir / "staging" / "left"
    shutil.copytree(tiny_model_dir, staging)
    with db.session_scope(api.ctx.engine) as s:
        ckpt = db.add_checkpoint(s, job_id=job_id, step=2, path=str(ckpt_dir))
        db.set_best_checkpoint(s, job_id=job_id, checkpoint_id=ckpt.id)
        ckpt_id = ckpt.id
        s.add(TrainingSession(id="sess_carol", owner="carol", base_model=tiny_model_dir, spec={"model": tiny_model_dir},
                              budget_usd=None))
    return {"job": job_id, "ckpt_dir": str(ckpt_dir), "ckpt": ckpt_id, "weights": str(weights),
            "staging": str(staging)}


def test_another_users_folders_checkpoints_and_weights_are_not_found_like_missing_ones(api, carols):
    missing_job = str(api.settings.runs_dir / "job_nope" / "run" / "checkpoints" / "step_2")
    missing_weights = str(api.settings.home / "models" / "sessions" / "sess_nope" / "w1")
    attempts = {carols["ckpt_dir"]: missing_job, f"checkpoint:{carols['ckpt']}": "checkpoint:ckpt_nope",
                carols["weights"]: missing_weights, "weights:sess_carol/w1": "weights:sess_nope/w1"}
    for theirs, missing in attempts.items():
        for method, params in (("training.start_grpo", None), ("models.deploy", {"name": "x", "model": None}),
                               ("sessions.create", {"base_model": None})):
            def ask(model, method=method, params=params):
                if method == "training.start_grpo":
                    return start(api, "alice", model=model)["error"]
                key = "model" if method == "models.deploy" else "base_model"
                return rpc(api, method, {**params, key: model})["error"]
            got, nothing = ask(theirs), ask(missing)
            assert got["code"] == nothing["code"] == NOT_FOUND, (method, theirs, got)
            assert got["message"].replace(theirs, "<m>") == nothing["message"].replace(missing, "<m>"), (got, nothing)
    # the server's own folders are nobody's: not found even for their "owner"
    assert start(api, "carol", model=carols["staging"])["error"]["code"] == NOT_FOUND
    # the owner and admins may use them, by path or by reference (the same function serves models.deploy and
    # sessions.create: nothing is deployed or started here, this test may share a process with a live Ray)
    from app.api.auth import Principal, RequestState, reset_request_state, set_request_state
    from app.jobs.trust import resolve_model

    for model in (carols["ckpt_dir"], f"checkpoint:{carols['ckpt']}", carols["weights"], "weights:sess_carol/w1"):
        assert "result" in start(api, "carol", model=model), model
        assert "result" in start(api, "root", "admin", model=model), model
        token = set_request_state(RequestState(request_id="t", principal=Principal.of("carol", "researcher")))
        try:
            with db.session_scope(api.ctx.engine) as s:
                ref = resolve_model("model", model, settings=api.settings, session=s)
        finally:
            reset_request_state(token)
        assert ref.local and ref.shown == model and ref.load in (carols["ckpt_dir"], carols["weights"])


def test_the_hub_switch_holds_for_sessions_and_deployments_too(tmp_path, tiny_model_dir):
    from app.api.main import create_app

    settings = Settings(home=tmp_path / "home", database_url=None, redis_url=None, default_model=tiny_model_dir,
                        rate_limits={"default": 0}, jwt_secret="t" * 40, allow_hub_models=False)
    with TestClient(create_app(settings)) as api:
        api.settings = settings
        for method, key, extra in (("sessions.create", "base_model", {}), ("models.deploy", "model", {"name": "h"})):
            err = rpc(api, method, {key: "Qwen/Qwen2.5-0.5B-Instruct", **extra})["error"]
            assert err["code"] == VALIDATION_FAILED and "RAYGRPO_ALLOW_HUB_MODELS" in err["message"], err
            assert err["data"]["field"] == key


def test_replies_name_checkpoints_by_id_and_show_paths_to_admins_only(api, carols):
    mine = rpc(api, "training.get_status", {"job_id": carols["job"]}, "carol")["result"]["best_checkpoint"]
    assert mine == {"checkpoint_id": carols["ckpt"], "step": 2, "eval_reward": None,
                    "model": f"checkpoint:{carols['ckpt']}"}
    admin = rpc(api, "training.get_status", {"job_id": carols["job"]}, "root", "admin")["result"]["best_checkpoint"]
    assert admin["path"] == carols["ckpt_dir"]
    listed = rpc(api, "training.list_jobs", {}, "carol")["result"]["jobs"]
    assert str(api.settings.home) not in json.dumps(listed)


def test_only_admins_queue_above_the_default_priority(api):
    err = rpc(api, "training.start_grpo", {"agent_id": "a", "training_data": ROWS, "priority": 10,
                                           "config": {"n_iterations": 2, "reward": "digit"}})["error"]
    assert err["code"] == FORBIDDEN and err["data"]["field"] == "priority"
    assert rpc(api, "training.list_jobs", {})["result"]["jobs"] == []
    ok = rpc(api, "training.start_grpo", {"agent_id": "a", "training_data": ROWS, "priority": 10,
                                          "config": {"n_iterations": 2, "reward": "digit"}}, "root", "admin")
    assert ok["result"]["status"] == "queued"


def test_a_dataset_file_hash_is_not_a_read_key(api):
    data = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)
    digest = hashlib.sha256(data).hexdigest()
    bobs = rpc(api, "datasets.create", {"name": "bob's"}, "bob")["result"]
    up = api.put(f"/api/v1/datasets/{bobs['id']}/file", content=data, headers=bearer(api.settings, "bob", "researcher"))
    assert up.status_code == 200 and up.json()["content_hash"] == digest
    alices = rpc(api, "datasets.create", {"name": "alice's"})["result"]
    err = rpc(api, "datasets.create_version", {"dataset_id": alices["id"], "content_hash": digest})["error"]
    nothing = rpc(api, "datasets.create_version", {"dataset_id": alices["id"], "content_hash": "0" * 64})["error"]
    assert err["code"] == nothing["code"] == NOT_FOUND and err["message"].replace(digest, "h") == \
        nothing["message"].replace("0" * 64, "h")
    # bob attaches his own upload; a version of his still does not open it to alice
    assert rpc(api, "datasets.create_version", {"dataset_id": bobs["id"], "content_hash": digest}, "bob")["result"]
    assert rpc(api, "datasets.create_version", {"dataset_id": alices["id"], "content_hash": digest})["error"]["code"] \
        == NOT_FOUND
    # once bob lets her read his dataset, the file is hers to reuse
    assert "result" in rpc(api, "datasets.update", {"id": bobs["id"], "collaborators": ["alice"]}, "bob")
    v = rpc(api, "datasets.create_version", {"dataset_id": alices["id"], "content_hash": digest})["result"]
    assert v["content_hash"] == digest
    # base64 content is the caller's own bytes: always fine
    other = rpc(api, "datasets.create", {"name": "inline"})["result"]
    assert rpc(api, "datasets.create_version", {"dataset_id": other["id"],
                                                "content_base64": base64.b64encode(data).decode()})["result"]


def test_only_admins_share_a_deployment(api):
    with db.session_scope(api.ctx.engine) as s:
        s.add(PolicyDeployment(name="mine", owner="alice", variants=[], spec={}))
    err = rpc(api, "models.share", {"name": "mine"})["error"]
    assert err["code"] == FORBIDDEN
    assert rpc(api, "models.share", {"name": "mine"}, "root", "admin")["result"] == {"name": "mine", "shared": True}
    err = rpc(api, "models.deploy", {"name": "s", "model": str(api.settings.default_model), "shared": True})["error"]
    assert err["code"] == FORBIDDEN and err["data"]["field"] == "shared"


def test_the_policy_gate_answers_each_call_as_the_api_would(api):
    from app.serving.access import check_policy_call

    key = rpc(api, "auth.create_api_key", {"owner": "alice", "role": "researcher", "name": "nb"}, "root",
              "admin")["result"]["api_key"]
    with db.session_scope(api.ctx.engine) as s:
        s.add(PolicyDeployment(name="alices", owner="alice", variants=[], spec={}))
        s.add(PolicyDeployment(name="open", owner="root", variants=[], spec={}, shared=True))

    def ask(name, headers):
        return check_policy_call(api.ctx, name, headers.get("Authorization"), headers.get("X-API-Key"))

    alice, bob = bearer(api.settings, "alice", "researcher"), bearer(api.settings, "bob", "researcher")
    assert ask("alices", {}).status == 401 and ask("alices", {}).headers["WWW-Authenticate"]
    assert ask("alices", {"Authorization": "Bearer forged"}).status == 401
    assert ask("alices", bob).status == ask("nope", bob).status == 404  # another user's: "not found"
    assert ask("alices", bob).body["error"]["code"] == "model_not_found"
    assert ask("open", bob).status == 200 and ask("open", bearer(api.settings, "v", "viewer")).status == 200
    narrow = bearer(api.settings, "alice", "researcher", scopes=["training:view"])
    assert ask("alices", narrow).status == 403
    # the OpenAI client sends its api_key as a bearer token: API keys work that way too
    assert ask("alices", {"Authorization": f"Bearer {key}"}).status == 200
    assert ask("alices", {"X-API-Key": key}).status == 200
    ok = ask("alices", alice)  # the 3-a-minute bucket of this test: alice has used 2 of them now
    assert ok.status == 200 and ok.subject == "alice" and ok.headers["X-RateLimit-Limit"] == "3"
    limited = ask("alices", alice)
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1


def test_the_proxy_middleware_drops_only_headers_serve_cannot_decode():
    from app.api.proxy import DropUndecodableHeaders

    seen = {}

    async def inner(scope, receive, send):
        seen["headers"] = scope["headers"]

    headers = [(b"x-request-id", b"\xff\xfe"), (b"serve_multiplexed_model_id", b"\xc3"), (b"x-session-id", b"ok"),
               (b"authorization", b"Bearer \xff"), (b"x-other", b"\xff")]
    asyncio.run(DropUndecodableHeaders(inner)({"type": "http", "headers": headers}, None, None))
    assert seen["headers"] == [(b"x-session-id", b"ok"), (b"authorization", b"Bearer \xff"), (b"x-other", b"\xff")]
    good = [(b"x-request-id", b"trace-1")]
    asyncio.run(DropUndecodableHeaders(inner)({"type": "http", "headers": good}, None, None))
    assert seen["headers"] == good


def test_the_operator_places_every_jobs_user_code(tmp_path, tiny_model_dir):
    from app.api.main import create_app

    settings = Settings(home=tmp_path / "home", database_url=None, redis_url=None, default_model=tiny_model_dir,
                        rate_limits={"default": 0}, jwt_secret="t" * 40, reward_worker_resources={"sandbox": 1})
    app = create_app(settings)
    with TestClient(app) as api:
        api.settings = settings
        job = start(api)["result"]["job_id"]
        with db.session_scope(app.state.ctx.engine) as s:
            assert db.get_job(s, job_id=job).engine_config["reward_worker_resources"] == {"sandbox": 1.0}
        err = start(api, engine={"reward_worker_resources": {"elsewhere": 1}})["error"]
        assert err["code"] == VALIDATION_FAILED and err["data"]["field"] == "config.engine.reward_worker_resources"
