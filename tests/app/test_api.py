"""The job API over HTTP (FastAPI app driven in-process), on SQLite and PostgreSQL, with and without Redis.

Runs no training: jobs stay queued unless a test plays the run's part through app.data.db. The Ray
Serve + Ray Jobs path is tested in test_api_ray.py.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.data import db
from app.settings import Settings

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(10)]


@pytest.fixture(params=["db-queue", pytest.param("redis", marks=pytest.mark.services)])
def queue_url(request) -> str | None:
    """None: the database is the queue; else the real Redis (skip without it, fail under CI)."""
    if request.param == "db-queue":
        return None
    import redis

    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is required under CI: {e}")
        pytest.skip(f"no Redis: {e}")
    return url


@pytest.fixture
def client(tmp_path, db_url, engine, queue_url, tiny_model_dir):  # engine: tables created
    redis_url = queue_url
    settings = Settings(home=tmp_path / "home", database_url=db_url, redis_url=redis_url,
                        default_model=tiny_model_dir, cancel_wait_s=0.5, rate_limits={"default": 0})
    from app.api.auth import mint_token
    from app.api.main import create_app

    app = create_app(settings)
    if app.state.ctx.queue is not None:
        q = app.state.ctx.queue
        q.redis.delete(q.queue_key, q.processing_key, q.priority_key, q.seq_key)
    with TestClient(app, headers={"Authorization": f"Bearer {mint_token(settings, 'alice', 'admin')}"}) as c:
        c.ctx = app.state.ctx
        yield c
    if app.state.ctx.queue is not None:
        q = app.state.ctx.queue
        q.redis.delete(q.queue_key, q.processing_key, q.priority_key, q.seq_key)


def call(client, method, params=None, id=1, **kw):
    body = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        body["params"] = params
    r = client.post("/api/v1/jsonrpc", json=body, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def start(client, **over):
    params = {"agent_id": "agent-1", "config": {"n_iterations": 5, "batch_size": 4, "reward": "digit",
                                                 "max_budget_usd": "1"}, "training_data": ROWS}
    params.update(over)
    if "training_queries" in params:
        params.pop("training_data")
    return call(client, "training.start_grpo", params)


def test_start_returns_queued_at_once_and_status_reads_it_back(client):
    reply = start(client)["result"]
    assert reply["status"] == "queued" and reply["total_iterations"] == 5 and reply["created"] is True
    assert reply["budget_usd"] == "1.000000" and reply["job_id"].startswith("job_")
    status = call(client, "training.get_status", {"job_id": reply["job_id"]})["result"]
    assert status["status"] == "queued" and status["progress_percent"] == 0.0
    assert status["budget_remaining_usd"] == "1.000000" and status["cost_usd"] == "0.000000"
    job_dir = client.ctx.settings.runs_dir / reply["job_id"]
    assert len((job_dir / "data.jsonl").read_text().splitlines()) == 10
    with db.session_scope(client.ctx.engine) as s:
        job = db.get_job(s, job_id=reply["job_id"])
        assert job.engine_config["num_steps"] == 5 and job.engine_config["group_size"] == 8
        assert job.engine_config["dataset"] == str(job_dir / "data.jsonl")
    if client.ctx.queue is not None:
        assert client.ctx.queue.queued() == [reply["job_id"]]
        assert client.ctx.queue.get_status(reply["job_id"]) == "queued"


def test_target_reward_reaches_the_engine_and_is_not_an_engine_key(client):
    reply = start(client, config={"n_iterations": 50, "reward": "digit", "target_reward": 0.9})["result"]
    with db.session_scope(client.ctx.engine) as s:
        assert db.get_job(s, job_id=reply["job_id"]).engine_config["target_reward"] == 0.9
    moved = start(client, config={"reward": "digit", "engine": {"target_reward": 0.9}})["error"]
    assert moved["code"] == -40002 and moved["data"]["field"] == "config.engine.target_reward"
    assert "use config.target_reward" in moved["message"]


def test_rows_may_be_conversations_and_reach_the_engine_as_messages(client):
    from grpo.tasks import read_jsonl

    convo = [{"role": "system", "content": "Answer with one digit."}, {"role": "user", "content": "digit 3:"}]
    reply = start(client, training_data=[{"messages": convo, "expected_outcome": "3"}, *ROWS[:4]])["result"]
    samples = read_jsonl(client.ctx.settings.runs_dir / reply["job_id"] / "data.jsonl")
    assert samples[0].messages == (("system", "Answer with one digit."), ("user", "digit 3:"))
    assert samples[0].prompt == "digit 3:" and samples[1].messages is None
    for row, says in (({"messages": convo, "query": "x", "expected_outcome": "3"}, "exactly one of query and messages"),
                      ({"expected_outcome": "3"}, "exactly one of query and messages"),
                      ({"messages": convo[:1], "expected_outcome": "3"}, "must end with a user turn"),
                      ({"messages": [{"role": "wizard", "content": "x"}], "expected_outcome": "3"},
                       "training_data.0.messages.0.role")):
        err = start(client, training_data=[row])["error"]
        assert err["code"] == -32602 and says in err["message"] and "training_data.0" in err["message"], err


def test_lora_settings_reach_the_engine(client):
    pytest.importorskip("peft")
    reply = start(client, config={"reward": "digit", "lora_rank": 8, "lora_alpha": 32,
                                  "lora_target_modules": ["q_proj", "v_proj"]})["result"]
    with db.session_scope(client.ctx.engine) as s:
        cfg = db.get_job(s, job_id=reply["job_id"]).engine_config
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_target_modules"]) == (8, 32.0, ["q_proj", "v_proj"])
    moved = start(client, config={"reward": "digit", "engine": {"lora_rank": 8}})["error"]
    assert moved["code"] == -40002 and "use config.lora_rank" in moved["message"]
    fsdp = start(client, config={"reward": "digit", "lora_rank": 8, "engine": {"strategy": "fsdp"}})["result"]
    with db.session_scope(client.ctx.engine) as s:  # LoRA on a sharded base (a base too big for one device)
        assert db.get_job(s, job_id=fsdp["job_id"]).engine_config["strategy"] == "fsdp"


def test_a_job_whose_memory_plan_does_not_fit_is_refused_with_the_number(client):
    err = start(client, config={"reward": "digit", "max_budget_usd": "1",
                                "engine": {"device_memory_gib": 0.05}})["error"]
    assert err["code"] == -40002 and "memory: needs" in err["message"] and "has 0.05" in err["message"], err
    with db.session_scope(client.ctx.engine) as s:  # nothing was queued
        assert db.list_jobs(s, limit=10)[0] == []


def test_training_queries_alias_and_idempotency(client):
    a = start(client, training_queries=ROWS, idempotency_key="k-1")
    # the same key again: the same job, not a second one
    b = start(client, idempotency_key="k-1")
    assert a["result"]["job_id"] == b["result"]["job_id"] and b["result"]["created"] is False
    listed = call(client, "training.list_jobs", {})["result"]
    assert [j["job_id"] for j in listed["jobs"]] == [a["result"]["job_id"]]


def test_the_sdk_retries_a_start_whose_reply_was_lost_and_one_job_exists(client):
    """The reply of the first start_grpo is lost after the server stored the job (a read timeout); the
    SDK retries under the key it set itself, and the user gets the one job, not two."""
    from app.client import sdk

    class LosesFirstReply:
        def __init__(self) -> None:
            self.sent: list[dict] = []

        def post(self, url: str, json: dict) -> httpx.Response:
            reply = client.post(url, json=json)  # the server ran it
            self.sent.append(json)
            if len(self.sent) == 1:
                raise httpx.ReadTimeout("the reply was lost", request=reply.request)
            return reply

    c = sdk.Client("http://testserver", retries=2, backoff_s=0.0)
    c.http = LosesFirstReply()
    job = c.start_grpo("agent-1", ROWS, config={"n_iterations": 5, "batch_size": 4, "reward": "digit",
                                                "max_budget_usd": "1"})
    assert len(c.http.sent) == 2 and job.created is False  # the retry found the first attempt's job
    listed = call(client, "training.list_jobs", {})["result"]
    assert [j["job_id"] for j in listed["jobs"]] == [job.job_id]


def test_form_content_type_is_still_json(client):
    body = json.dumps({"jsonrpc": "2.0", "method": "training.list_jobs", "params": {}, "id": 7})
    r = client.post("/api/v1/jsonrpc", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["id"] == 7 and "jobs" in r.json()["result"]


def test_batches_and_notifications(client):
    job = start(client)["result"]["job_id"]
    batch = [
        {"jsonrpc": "2.0", "method": "training.get_status", "params": {"job_id": job}, "id": "a"},
        {"jsonrpc": "2.0", "method": "training.get_status", "params": {"job_id": "job_missing"}, "id": "b"},
        {"jsonrpc": "2.0", "method": "training.list_jobs", "params": {"limit": 1}},  # notification
        {"jsonrpc": "2.0", "method": "no.such", "id": "c"},
    ]
    r = client.post("/api/v1/jsonrpc", json=batch)
    out = r.json()
    assert [o["id"] for o in out] == ["a", "b", "c"]
    assert out[0]["result"]["job_id"] == job
    assert out[1]["error"]["code"] == -32001 and out[2]["error"]["code"] == -32601
    r = client.post("/api/v1/jsonrpc", json={"jsonrpc": "2.0", "method": "training.list_jobs"})
    assert r.status_code == 204 and r.content == b""


@pytest.mark.parametrize(
    ("params", "code", "field"),
    [
        ({"agent_id": "a", "training_data": ROWS, "config": {"batch_size": 0}}, -32602, "config.batch_size"),
        ({"agent_id": "a", "training_data": [{"query": "x"}]}, -32602, "training_data.0.expected_outcome"),
        ({"agent_id": "a", "training_data": ROWS, "config": {"nope": 1}}, -32602, "config.nope"),
        ({"agent_id": "a", "training_data": ROWS, "config": {"model": "/no/such/model"}}, -40002, "config"),
        ({"agent_id": "a", "training_data": ROWS, "config": {"reward": "nomod:fn"}}, -40002, "reward"),
        ({"agent_id": "a", "training_data": ROWS, "config": {"max_steps_per_trajectory": 3}}, -40002,
         "max_steps_per_trajectory"),
        ({"agent_id": "a", "training_data": ROWS, "config": {"max_budget_usd": "0.000001"}}, -40001,
         "max_budget_usd"),
        ({"agent_id": "a", "training_data": ROWS, "config": {"engine": {"group_size": 1}}}, -40002, "group_size"),
    ],
)
def test_bad_starts_name_the_field_and_create_nothing(client, params, code, field):
    err = call(client, "training.start_grpo", params)["error"]
    assert err["code"] == code and field in err["message"], err
    assert call(client, "training.list_jobs", {})["result"]["jobs"] == []


def test_error_codes_of_the_other_methods(client):
    assert call(client, "training.get_status", {"job_id": "job_x"})["error"]["code"] == -32001
    assert call(client, "training.get_status", {})["error"]["code"] == -32602
    job = start(client)["result"]["job_id"]
    assert call(client, "training.export_trajectories", {"job_id": job, "limit": 10_001})["error"]["code"] == -40005
    assert call(client, "training.pause", {"job_id": job})["error"]["code"] == -40002  # queued, not running
    assert call(client, "training.resume", {"job_id": job})["error"]["code"] == -40002
    owned = call(client, "training.start_grpo", {"agent_id": "a", "training_data": ROWS,
                                                  "config": {"engine": {"cpu_hour_usd": 0}}})["error"]
    assert owned["code"] == -40002 and "config.engine.cpu_hour_usd" in owned["message"]  # prices are the server's
    mapped = call(client, "training.start_grpo", {"agent_id": "a", "training_data": ROWS,
                                                   "config": {"engine": {"num_steps": 99}}})["error"]
    assert mapped["code"] == -40002 and "config.n_iterations" in mapped["message"]
    bad = call(client, "training.list_jobs", {"cursor": "garbage!"})["error"]
    assert bad["code"] == -32602 and "cursor" in bad["message"]
    assert client.post("/api/v1/jsonrpc", content=b"{not json").json()["error"]["code"] == -32700


def test_cancel_a_queued_job_then_cannot_cancel_again(client):
    job = start(client)["result"]["job_id"]
    reply = call(client, "training.cancel", {"job_id": job, "reason": "changed my mind"})["result"]
    assert reply["status"] == "cancelled" and reply["cancelled_at"] and reply["checkpoint_saved"] is False
    assert call(client, "training.get_status", {"job_id": job})["result"]["status"] == "cancelled"
    again = call(client, "training.cancel", {"job_id": job})["error"]
    assert again["code"] == -40003 and "cancelled" in again["message"]
    if client.ctx.queue is not None:
        assert job not in client.ctx.queue.queued()


def test_a_run_waiting_for_resources_shows_it_in_get_status(client):
    """grpo.gang: a run that cannot book what it needs yet holds nothing and says why, until it can."""
    from app.jobs.reporter import DBReporter
    from grpo.config import GRPOConfig

    job = start(client)["result"]["job_id"]
    with db.session_scope(client.ctx.engine) as s:
        db.mark_running(s, job_id=job, ray_submission_id=job)
    rep = DBReporter(cfg=GRPOConfig(model=client.ctx.settings.default_model), job_id=job,
                     db_url=client.ctx.settings.db_url)
    rep.on_waiting("waiting for resources: needs 6 CPU; free 2 CPU")
    status = call(client, "training.get_status", {"job_id": job})["result"]
    assert status["status"] == "running" and status["admission"]["decision"] == "waiting"
    assert status["admission"]["reason"] == "waiting for resources: needs 6 CPU; free 2 CPU"
    assert Decimal(status["cost_usd"]) == 0
    rep.on_waiting(None)
    admission = call(client, "training.get_status", {"job_id": job})["result"]["admission"]
    assert admission["decision"] == "started" and "booked" in admission["reason"]


def test_progress_trajectories_and_checkpoints_recorded_by_a_run_show_through_the_api(client, tmp_path):
    from app.jobs.reporter import DBReporter
    from grpo.config import GRPOConfig

    job = start(client)["result"]["job_id"]
    with db.session_scope(client.ctx.engine) as s:
        db.mark_running(s, job_id=job, ray_submission_id=job)
    rep = DBReporter(cfg=GRPOConfig(model=client.ctx.settings.default_model), job_id=job,
                     db_url=client.ctx.settings.db_url)
    rows = [{"step": 1, "prompt": "digit 3:", "completion": "333333", "expected": "3", "reward": 1.0,
             "advantage": 0.5, "finish_reason": "length", "tokens": 6, "policy_version": 0},
            {"step": 1, "prompt": "digit 3:", "completion": "x", "expected": "3", "reward": 0.0,
             "advantage": -0.5, "finish_reason": "stop", "tokens": 1, "policy_version": 0}]
    rep.on_trajectories(rows)
    rep.on_step({"step": 2, "loss": 0.1, "reward_mean": 0.5, "reward_std": 0.5, "kl": 0.0,
                 "cost_usd": 0.25, "eval_reward": float("nan")})
    status = call(client, "training.get_status", {"job_id": job})["result"]
    assert status["current_iteration"] == 2 and status["progress_percent"] == 40.0
    assert status["metrics"]["avg_reward"] == 0.5 and status["metrics"]["trajectories_generated"] == 2
    assert status["metrics"]["eval_reward"] is None and Decimal(status["budget_remaining_usd"]) == Decimal("0.75")
    assert status["estimated_completion"] is not None
    out = call(client, "training.export_trajectories", {"job_id": job, "success_only": True})["result"]
    assert out["total_count"] == 1 and out["trajectories"][0]["completion"] == "333333"
    page = call(client, "training.export_trajectories", {"job_id": job, "limit": 1})["result"]
    assert page["total_count"] == 2 and page["has_more"] is True

    # cancel while running: the run sees the flag, checkpoints, and reports the end
    reply = call(client, "training.cancel", {"job_id": job, "wait": False})["result"]
    assert reply["status"] == "cancelling"
    assert rep.should_stop() == "cancelled"
    ckpt = tmp_path / "checkpoint_x"
    ckpt.mkdir()
    import torch

    torch.save({"step": 2}, ckpt / "trainer_state.pt")
    rep.on_end("cancelled", error=None, summary={"checkpoint": str(ckpt), "best_checkpoints": [str(ckpt)],
                                                  "last_metrics": {"step": 2}, "cost_usd": 0.3})
    status = call(client, "training.get_status", {"job_id": job})["result"]
    assert status["status"] == "cancelled" and status["stop_reason"] == "cancelled"
    assert status["best_checkpoint"]["step"] == 2 and status["best_checkpoint"]["path"] == str(ckpt)
    assert Path(status["best_checkpoint"]["path"]).is_dir() and status["cost_usd"] == "0.300000"


def test_list_jobs_paginates_and_filters(client):
    ids = [start(client, agent_id=f"agent-{i % 2}")["result"]["job_id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = call(client, "training.list_jobs", {"limit": 2, **({"cursor": cursor} if cursor else {})})["result"]
        seen += [j["job_id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    assert seen == ids[::-1]
    only = call(client, "training.list_jobs", {"agent_id": "agent-0", "status": "queued"})["result"]["jobs"]
    assert {j["job_id"] for j in only} == {ids[0], ids[2], ids[4]}


def test_discovery_methods_and_health(client):
    names = [m["name"] for m in client.get("/api/v1/jsonrpc/methods").json()]
    for n in ("training.start_grpo", "training.get_status", "training.cancel", "training.list_jobs",
              "training.export_trajectories", "training.pause", "training.resume", "rpc.discover"):
        assert n in names
    doc = call(client, "rpc.discover")["result"]
    start_doc = next(m for m in doc["methods"] if m["name"] == "training.start_grpo")
    assert {p["name"] for p in start_doc["params"]} >= {"agent_id", "config", "training_data"}
    assert client.get("/health").json()["status"] == "ok"
    ready = client.get("/health/ready").json()
    assert ready["status"] == "ok" and ready["checks"]["database"] == "ok"


def test_evaluate_compares_a_checkpoint_with_its_base_model(client, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from app.jobs.reporter import DBReporter
    from grpo.config import GRPOConfig

    job = start(client, evaluation_data=ROWS[:4])["result"]["job_id"]
    err = call(client, "training.evaluate", {"job_id": job})["error"]
    assert err["code"] == -40004 and "no checkpoint" in err["message"]
    # a "trained" checkpoint: the base model with its output layer perturbed
    ckpt = tmp_path / "ckpt"
    shutil.copytree(client.ctx.settings.default_model, ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(ckpt)
    torch.save({"step": 5}, ckpt / "trainer_state.pt")
    with db.session_scope(client.ctx.engine) as s:
        db.mark_running(s, job_id=job, ray_submission_id=job)
    rep = DBReporter(cfg=GRPOConfig(model=client.ctx.settings.default_model), job_id=job,
                     db_url=client.ctx.settings.db_url)
    rep.on_start(GRPOConfig(model=client.ctx.settings.default_model), job_id=job)
    rep.on_end("completed", error=None, summary={"checkpoint": str(ckpt), "best_checkpoints": [str(ckpt)]})

    out = call(client, "training.evaluate", {"job_id": job})["result"]
    assert out["n_queries"] == 4 and out["step"] == 5 and out["checkpoint_id"].startswith("ckpt_")
    assert 0 <= out["success_rate"] <= 1 and 0 <= out["avg_reward"] <= 1 and out["avg_steps"] == 1.0
    cmp = out["comparison"]
    assert cmp["improvement"] == pytest.approx(out["avg_reward"] - out["base_model"]["avg_reward"])
    assert 0 <= cmp["p_value"] <= 1 and isinstance(cmp["significant"], bool)
    queries = [{"query": "digit 1:", "expected_outcome": "1"}]
    one = call(client, "training.evaluate", {"job_id": job, "evaluation_queries": queries})["result"]
    assert one["n_queries"] == 1
    bad = call(client, "training.evaluate", {"job_id": job, "checkpoint_id": "ckpt_nope"})["error"]
    assert bad["code"] == -32001 and "ckpt_nope" in bad["message"]
