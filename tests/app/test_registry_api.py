"""The research registry over HTTP (FastAPI app in-process), on SQLite and PostgreSQL: experiments and
their state machine, runs, metric series, models, datasets and their files, prompt templates,
evaluations; ownership, pagination edges and bad input. No Ray: a job linked to a run is played
through app.data.db and app.jobs.reporter.DBReporter, as test_api.py does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from raygrpo_test_services import bearer

from app.data import db
from app.data.tables import EXPERIMENT_TRANSITIONS
from app.settings import Settings

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(10)]


@pytest.fixture
def client(tmp_path, db_url, engine, tiny_model_dir):  # engine: tables created
    from app.api.main import create_app

    settings = Settings(home=tmp_path / "home", database_url=db_url, redis_url=None, default_model=tiny_model_dir,
                        cancel_wait_s=0.5, rate_limits={"default": 0})
    app = create_app(settings)
    with TestClient(app, headers=bearer(settings)) as c:
        c.settings, c.ctx = settings, app.state.ctx
        yield c


def rpc(client, method, params=None, user=None, role="researcher"):
    headers = bearer(client.settings, user, role) if user else None
    body = {"jsonrpc": "2.0", "method": method, "params": params or {}, "id": 1}
    r = client.post("/api/v1/jsonrpc", json=body, headers=headers)
    return r.json()


def ok(client, method, params=None, **kw):
    reply = rpc(client, method, params, **kw)
    assert "result" in reply, reply
    return reply["result"]


def err(client, method, params=None, code=None, field=None, **kw):
    reply = rpc(client, method, params, **kw)
    assert "error" in reply, reply
    if code is not None:
        assert reply["error"]["code"] == code, reply
    if field is not None:
        assert field in reply["error"]["message"], reply
    return reply["error"]


# ---- experiments -------------------------------------------------------------------------------

PATH_TO = {"draft": [], "active": ["active"], "paused": ["active", "paused"],
           "completed": ["active", "completed"], "failed": ["active", "failed"],
           "archived": ["active", "completed", "archived"]}


def test_experiment_crud_and_every_illegal_transition(client):
    exp = ok(client, "experiments.create", {"name": "lr sweep", "hypothesis": "1e-5 beats 1e-4", "tags": ["lr", "lr"],
                                            "config": {"lr": [1e-5, 1e-4]}, "metadata": {"team": "rl"}})
    assert exp["status"] == "draft" and exp["tags"] == ["lr"] and exp["metadata"] == {"team": "rl"}
    assert exp["owner"] == "alice" and exp["allowed_transitions"] == ["active"] and exp["id"].startswith("exp_")
    upd = ok(client, "experiments.update", {"id": exp["id"], "description": "sweep", "tags": ["lr", "grpo"]})
    assert upd["description"] == "sweep" and upd["hypothesis"] == "1e-5 beats 1e-4" and upd["tags"] == ["lr", "grpo"]
    assert ok(client, "experiments.get", {"id": exp["id"]})["tags"] == ["lr", "grpo"]

    states = list(EXPERIMENT_TRANSITIONS)
    for start in states:
        e = ok(client, "experiments.create", {"name": f"from {start}"})["id"]
        for step in PATH_TO[start]:
            assert ok(client, "experiments.transition", {"id": e, "status": step})["status"] == step
        for target in states:
            if target in EXPERIMENT_TRANSITIONS[start]:
                continue
            error = err(client, "experiments.transition", {"id": e, "status": target}, code=-40002, field="status")
            assert error["data"] == {"field": "status", "from": start, "to": target,
                                     "allowed": sorted(EXPERIMENT_TRANSITIONS[start])}
        if start in ("draft", "paused", "completed", "archived"):
            err(client, "runs.create", {"experiment_id": e}, code=-40002, field="active")
        if start == "archived":
            err(client, "experiments.update", {"id": e, "name": "x"}, code=-40002, field="archived")
    # paused -> active is legal (the <=> of the machine)
    e = ok(client, "experiments.create", {"name": "toggle"})["id"]
    for step in ["active", "paused", "active", "paused", "completed", "archived"]:
        ok(client, "experiments.transition", {"id": e, "status": step})

    err(client, "experiments.transition", {"id": e, "status": "running"}, code=-32602, field="status")
    err(client, "experiments.create", {"name": ""}, code=-32602, field="name")
    err(client, "experiments.create", {"name": "x", "tags": ["a" * 65]}, code=-32602, field="tags")
    err(client, "experiments.create", {"name": "x", "nope": 1}, code=-32602, field="nope")
    err(client, "experiments.create", {"name": "a\x00b"}, code=-32602, field="name")  # PostgreSQL text refuses NUL
    err(client, "experiments.get", {"id": "exp_missing"}, code=-32001)
    deleted = ok(client, "experiments.delete", {"id": exp["id"]})
    assert deleted["deleted"] is True
    err(client, "experiments.get", {"id": exp["id"]}, code=-32001)
    assert exp["id"] not in [x["id"] for x in ok(client, "experiments.list", {"limit": 100})["experiments"]]


def test_pagination_edges_and_filters(client):
    empty = ok(client, "experiments.list", {})
    assert empty == {"experiments": [], "next_cursor": None, "has_more": False}
    ids = [ok(client, "experiments.create", {"name": f"Exp_{i}%", "tags": ["even" if i % 2 == 0 else "odd"]})["id"]
           for i in range(4)]

    def walk(limit, **filters):
        seen, cursor, pages = [], None, []
        while True:
            page = ok(client, "experiments.list", {"limit": limit, **filters, **({"cursor": cursor} if cursor else {})})
            pages.append(len(page["experiments"]))
            seen += [x["id"] for x in page["experiments"]]
            cursor = page["next_cursor"]
            assert page["has_more"] is (cursor is not None)
            if not page["has_more"]:
                return seen, pages

    assert walk(2) == (ids[::-1], [2, 2])  # exact pages: the last full page says has_more false
    assert walk(3) == (ids[::-1], [3, 1])  # a short last page
    assert walk(4) == (ids[::-1], [4])
    assert walk(100) == (ids[::-1], [4])
    assert walk(2, tag="even")[0] == [ids[2], ids[0]]
    assert walk(20, search="exp_1%")[0] == [ids[1]]  # case-insensitive; % and _ are literal
    assert walk(20, search="p_")[0] == ids[::-1]
    assert walk(20, search="zzz")[0] == []
    assert walk(20, owner="alice")[0] == ids[::-1] and walk(20, owner="bob")[0] == []
    ok(client, "experiments.transition", {"id": ids[3], "status": "active"})
    assert walk(20, status="active")[0] == [ids[3]]
    err(client, "experiments.list", {"status": "bogus"}, code=-32602, field="status")
    err(client, "experiments.list", {"limit": 0}, code=-32602, field="limit")
    err(client, "experiments.list", {"limit": 101}, code=-32602, field="limit")
    err(client, "experiments.list", {"cursor": "garbage!"}, code=-32602, field="cursor")
    for method in ("models.list", "datasets.list", "prompts.list"):
        key = {"models.list": "models", "datasets.list": "datasets", "prompts.list": "templates"}[method]
        assert ok(client, method, {}) == {key: [], "next_cursor": None, "has_more": False}


def test_owners_collaborators_strangers_and_roles(client):
    exp = ok(client, "experiments.create", {"name": "bob's", "collaborators": ["carol"]}, user="bob")
    assert exp["owner"] == "bob" and exp["collaborators"] == ["carol"]
    # a collaborator reads and writes it, but neither re-shares nor deletes it
    assert ok(client, "experiments.get", {"id": exp["id"]}, user="carol")["name"] == "bob's"
    ok(client, "experiments.update", {"id": exp["id"], "description": "by carol"}, user="carol")
    err(client, "experiments.update", {"id": exp["id"], "collaborators": ["dave"]}, user="carol", code=-40300)
    err(client, "experiments.delete", {"id": exp["id"]}, user="carol", code=-40300)
    # anyone else is told it does not exist, and does not see it listed
    err(client, "experiments.get", {"id": exp["id"]}, user="dave", code=-32001)
    err(client, "experiments.update", {"id": exp["id"], "name": "x"}, user="dave", code=-32001)
    err(client, "runs.list", {"experiment_id": exp["id"]}, user="dave", code=-32001)
    assert ok(client, "experiments.list", {}, user="dave")["experiments"] == []
    assert [x["id"] for x in ok(client, "experiments.list", {}, user="carol")["experiments"]] == [exp["id"]]
    assert [x["id"] for x in ok(client, "experiments.list", {})["experiments"]] == [exp["id"]]  # admin
    # a viewer reads what is shared with it but cannot write
    ok(client, "experiments.update", {"id": exp["id"], "collaborators": ["carol", "vera"]}, user="bob")
    assert ok(client, "experiments.get", {"id": exp["id"]}, user="vera", role="viewer")["id"] == exp["id"]
    err(client, "experiments.create", {"name": "v"}, user="vera", role="viewer", code=-40300)
    err(client, "models.register", {"name": "m", "provider": "openai", "model_identifier": "gpt-4o"},
        user="vera", role="viewer", code=-40300)
    err(client, "datasets.create", {"name": "d"}, user="vera", role="viewer", code=-40300)
    # the same rules for datasets
    ds = ok(client, "datasets.create", {"name": "bob data"}, user="bob")
    err(client, "datasets.get", {"id": ds["id"]}, user="dave", code=-32001)
    assert ok(client, "datasets.list", {}, user="dave")["datasets"] == []
    assert rpc(client, "experiments.list", {}, user=None)  # admin token of the fixture
    r = client.post("/api/v1/jsonrpc", json={"jsonrpc": "2.0", "method": "experiments.list", "id": 1},
                    headers={"Authorization": ""})
    assert r.status_code == 401


# ---- runs and metric series --------------------------------------------------------------------

def active_experiment(client, **kw):
    e = ok(client, "experiments.create", {"name": "exp"}, **kw)["id"]
    ok(client, "experiments.transition", {"id": e, "status": "active"}, **kw)
    return e


def test_runs_are_numbered_and_end_once(client):
    e = active_experiment(client)
    runs = [ok(client, "runs.create", {"experiment_id": e, "name": f"r{i}", "config": {"seed": i}}) for i in range(3)]
    assert [r["number"] for r in runs] == [1, 2, 3] and all(r["status"] == "running" for r in runs)
    assert ok(client, "experiments.get", {"id": e})["run_count"] == 3
    done = ok(client, "runs.complete", {"id": runs[0]["id"], "final_metrics": {"accuracy": 0.9}})
    assert done["status"] == "completed" and done["final_metrics"] == {"accuracy": 0.9} and done["finished_at"]
    failed = ok(client, "runs.fail", {"id": runs[1]["id"], "error": "OOM at step 3"})
    assert failed["status"] == "failed" and failed["error_message"] == "OOM at step 3"
    for method, params in (("runs.complete", {}), ("runs.fail", {"error": "x"})):
        for run in runs[:2]:
            e2 = err(client, method, {"id": run["id"], **params}, code=-40002, field="status")
            assert e2["data"]["from"] in ("completed", "failed")
    err(client, "runs.fail", {"id": runs[2]["id"]}, code=-32602, field="error")
    err(client, "runs.complete", {"id": runs[2]["id"], "final_metrics": {"a": "x"}}, code=-32602)
    err(client, "runs.get", {"id": "run_missing"}, code=-32001)
    err(client, "runs.create", {"experiment_id": e, "job_id": "job_missing"}, code=-32001, field="job")
    listed = ok(client, "runs.list", {"experiment_id": e, "limit": 2})
    assert [r["number"] for r in listed["runs"]] == [3, 2] and listed["has_more"]
    last = ok(client, "runs.list", {"experiment_id": e, "limit": 2, "cursor": listed["next_cursor"]})
    assert [r["number"] for r in last["runs"]] == [1] and not last["has_more"]
    assert [r["number"] for r in ok(client, "runs.list", {"experiment_id": e, "status": "failed"})["runs"]] == [2]
    assert [r["number"] for r in ok(client, "runs.list", {"experiment_id": e, "search": "R2"})["runs"]] == [3]
    err(client, "runs.list", {"experiment_id": e, "status": "done"}, code=-32602, field="status")
    assert ok(client, "runs.get", {"id": runs[2]["id"]})["config"] == {"seed": 2}


def test_metric_series_batches_ranges_downsampling_and_aggregates(client):
    e = active_experiment(client)
    run = ok(client, "runs.create", {"experiment_id": e})["id"]
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    # 2,500 points in one call (PostgreSQL takes the COPY path), loss = step
    points = [{"name": "loss", "step": s, "value": float(s), "timestamp": (t0 + timedelta(seconds=s)).isoformat()}
              for s in range(2500)]
    assert ok(client, "metrics.log", {"run_id": run, "points": points})["written"] == 2500
    # a small batch (multi-row INSERT), with a step written twice in it and one rewritten later
    small = [{"name": "reward", "step": 1, "value": 0.1}, {"name": "reward", "step": 2, "value": 0.2},
             {"name": "reward", "step": 2, "value": 0.25}, {"name": "loss", "step": 7, "value": 70.0}]
    assert ok(client, "metrics.log", {"run_id": run, "points": small})["written"] == 4 - 1

    raw = ok(client, "metrics.query", {"run_id": run, "names": ["reward"]})["series"]
    assert raw == [{"name": "reward", "downsampled": False, "bucket_steps": 1, "points": [
        {"step": 1, "value": 0.1, "timestamp": raw[0]["points"][0]["timestamp"]},
        {"step": 2, "value": 0.25, "timestamp": raw[0]["points"][1]["timestamp"]}]}]

    down = ok(client, "metrics.query", {"run_id": run, "names": ["loss"], "max_points": 100})["series"][0]
    assert down["downsampled"] and down["bucket_steps"] == 25 and len(down["points"]) == 100
    b0, b1 = down["points"][0], down["points"][1]
    # bucket 0 = steps 0..24 with step 7 rewritten to 70: hand-computed
    assert (b0["step_min"], b0["step"], b0["count"]) == (0, 24, 25)
    assert b0["min"] == 0.0 and b0["max"] == 70.0 and b0["value"] == 24.0
    assert b0["mean"] == pytest.approx((sum(range(25)) - 7 + 70) / 25)
    assert (b1["step_min"], b1["step"], b1["min"], b1["max"], b1["mean"]) == (25, 49, 25.0, 49.0, 37.0)

    rng = ok(client, "metrics.query", {"run_id": run, "names": ["loss"], "step_from": 100, "step_to": 109})
    assert [p["step"] for p in rng["series"][0]["points"]] == list(range(100, 110))
    timed = ok(client, "metrics.query", {"run_id": run, "names": ["loss"],
                                         "time_from": (t0 + timedelta(seconds=2000)).isoformat(),
                                         "time_to": (t0 + timedelta(seconds=2010)).isoformat()})
    assert [p["step"] for p in timed["series"][0]["points"]] == list(range(2000, 2010))

    agg = ok(client, "metrics.aggregate", {"run_id": run})["metrics"]
    assert agg["reward"] == {"count": 2, "min": 0.1, "max": 0.25, "mean": pytest.approx(0.175), "first_step": 1,
                             "last_step": 2, "last": 0.25}
    assert agg["loss"]["count"] == 2500 and agg["loss"]["last"] == 2499.0 and agg["loss"]["max"] == 2499.0
    part = ok(client, "metrics.aggregate", {"run_id": run, "names": ["loss"], "step_from": 10, "step_to": 19})
    assert part["metrics"]["loss"]["mean"] == pytest.approx(14.5)
    nothing = ok(client, "metrics.aggregate", {"run_id": run, "names": ["loss"], "step_from": 10**6})
    assert nothing["metrics"]["loss"]["count"] == 0 and nothing["metrics"]["loss"]["last"] is None
    listed = ok(client, "metrics.list", {"run_id": run})["metrics"]
    assert listed == [{"name": "loss", "count": 2500, "first_step": 0, "last_step": 2499},
                      {"name": "reward", "count": 2, "first_step": 1, "last_step": 2}]

    err(client, "metrics.query", {"run_id": run, "names": ["nope"]}, code=-32001, field="nope")
    err(client, "metrics.query", {"run_id": run, "step_from": 5, "step_to": 1}, code=-32602, field="step_from")
    err(client, "metrics.query", {"run_id": run, "max_points": 1}, code=-32602, field="max_points")
    err(client, "metrics.log", {"run_id": run, "points": []}, code=-32602, field="points")
    err(client, "metrics.log", {"run_id": run, "points": [{"name": "x", "step": -1, "value": 1}]}, code=-32602,
        field="points.0.step")
    err(client, "metrics.log", {"run_id": "run_missing", "points": small}, code=-32001)
    # a large batch rewriting stored steps (a resumed job): PostgreSQL's COPY conflicts and falls back to the upsert
    again = [{"name": "loss", "step": s, "value": -float(s)} for s in range(2400, 2700)]
    assert ok(client, "metrics.log", {"run_id": run, "points": again})["written"] == 300
    tail = ok(client, "metrics.aggregate", {"run_id": run, "names": ["loss"], "step_from": 2400})["metrics"]["loss"]
    assert tail["count"] == 300 and tail["max"] == -2400.0 and tail["last"] == -2699.0
    whole = ok(client, "metrics.aggregate", {"run_id": run, "names": ["loss"]})["metrics"]["loss"]  # from rollups
    assert whole["count"] == 2700 and whole["last"] == -2699.0 and (whole["min"], whole["max"]) == (-2699.0, 2399.0)
    assert whole["mean"] == pytest.approx((sum(range(2400)) - 7 + 70 - sum(range(2400, 2700))) / 2700)
    # buckets of whole rollup blocks (1,000 steps): steps 0..1999 and 2000..2699, with the rewrites in them
    coarse = ok(client, "metrics.query", {"run_id": run, "names": ["loss"], "max_points": 2})["series"][0]
    assert coarse["bucket_steps"] == 2000 and [(p["step_min"], p["step"], p["count"]) for p in coarse["points"]] \
        == [(0, 1999, 2000), (2000, 2699, 700)]
    first, second = coarse["points"]
    assert (first["min"], first["max"], first["value"]) == (0.0, 1999.0, 1999.0)
    assert first["mean"] == pytest.approx((sum(range(2000)) - 7 + 70) / 2000)
    assert (second["min"], second["max"], second["value"]) == (-2699.0, 2399.0, -2699.0)
    assert second["mean"] == pytest.approx((sum(range(2000, 2400)) - sum(range(2400, 2700))) / 700)
    # a range cutting blocks: whole blocks from the rollups, the cut ends from their points
    cut = ok(client, "metrics.query", {"run_id": run, "names": ["loss"], "max_points": 2, "step_from": 500})
    cut = cut["series"][0]
    assert cut["bucket_steps"] == 2000 and [(p["step_min"], p["step"], p["count"]) for p in cut["points"]] \
        == [(500, 1999, 1500), (2000, 2699, 700)]
    assert cut["points"][0]["mean"] == pytest.approx(sum(range(500, 2000)) / 1500)
    both = ok(client, "metrics.query", {"run_id": run, "names": ["loss"], "max_points": 2, "step_from": 500,
                                        "step_to": 2499})["series"][0]
    assert [(p["step_min"], p["step"], p["count"]) for p in both["points"]] == [(500, 1999, 1500), (2000, 2499, 500)]
    end = both["points"][1]
    assert (end["min"], end["max"], end["value"]) == (-2499.0, 2399.0, -2499.0)
    assert end["mean"] == pytest.approx((sum(range(2000, 2400)) - sum(range(2400, 2500))) / 500)
    inside = ok(client, "metrics.query", {"run_id": run, "names": ["loss"], "max_points": 2, "step_from": 1100,
                                          "step_to": 1800})["series"][0]  # within one block: from the points
    assert [(p["step_min"], p["step"]) for p in inside["points"]] == [(1100, 1450), (1451, 1800)]
    ok(client, "runs.complete", {"id": run})
    err(client, "metrics.log", {"run_id": run, "points": small}, code=-40002, field="completed")


def start_job(client, **over):
    params = {"agent_id": "agent-1", "config": {"n_iterations": 5, "batch_size": 4, "reward": "digit",
                                                 "max_budget_usd": "1"}, "training_data": ROWS, **over}
    return ok(client, "training.start_grpo", params)["job_id"]


def test_a_linked_job_streams_metrics_into_its_run_and_ends_it(client):
    from app.jobs.reporter import DBReporter
    from grpo.config import GRPOConfig

    e = active_experiment(client)
    job, failing = start_job(client), start_job(client)
    run = ok(client, "runs.create", {"experiment_id": e, "job_id": job})
    other = ok(client, "runs.create", {"experiment_id": e, "job_id": failing})
    assert run["job_id"] == job
    for j in (job, failing):
        with db.session_scope(client.ctx.engine) as s:
            db.mark_running(s, job_id=j, ray_submission_id=j)
    cfg = GRPOConfig(model=client.settings.default_model)
    rep = DBReporter(cfg=cfg, job_id=job, db_url=client.settings.db_url)
    for step in (1, 2, 3):
        rep.on_step({"step": step, "loss": 1.0 / step, "reward_mean": 0.2 * step, "kl": 0.01,
                     "cost_usd": 0.01 * step, "eval_reward": float("nan")})
    series = ok(client, "metrics.query", {"run_id": run["id"], "names": ["loss", "reward_mean"]})["series"]
    assert [p["step"] for p in series[0]["points"]] == [1, 2, 3]
    assert [p["value"] for p in series[1]["points"]] == pytest.approx([0.2, 0.4, 0.6])
    names = [m["name"] for m in ok(client, "metrics.list", {"run_id": run["id"]})["metrics"]]
    assert "eval_reward" not in names and "step" not in names and "kl" in names  # NaN is not a point
    rep.on_end("completed", error=None, summary={"last_metrics": {"step": 3, "loss": 0.3, "reward_mean": 0.6}})
    done = ok(client, "runs.get", {"id": run["id"]})
    assert done["status"] == "completed" and done["final_metrics"]["reward_mean"] == pytest.approx(0.6)
    assert done["final_metrics"]["loss"] == pytest.approx(0.3) and done["finished_at"]

    bad = DBReporter(cfg=cfg, job_id=failing, db_url=client.settings.db_url)
    bad.on_end("failed", error="CUDA error: out of memory", summary={})
    ended = ok(client, "runs.get", {"id": other["id"]})
    assert ended["status"] == "failed" and ended["error_message"] == "CUDA error: out of memory"


# ---- models and prompt templates ---------------------------------------------------------------

def test_models_registry(client, tmp_path):
    providers = [p["name"] for p in ok(client, "models.providers")["providers"]]
    assert providers == ["openai", "anthropic", "google", "cohere", "huggingface", "azure", "aws", "local", "custom"]
    m = ok(client, "models.register", {"name": "gpt", "provider": "openai", "model_identifier": "gpt-4o-mini",
                                       "version": "2024-07-18", "config": {"temperature": 0}, "tags": ["api"]})
    assert m["status"] == "registered" and m["id"].startswith("mdl_")
    err(client, "models.register", {"name": "gpt", "provider": "openai", "model_identifier": "gpt-4o-mini",
                                    "version": "2024-07-18"}, code=-40002, field="version")
    err(client, "models.register", {"name": "x", "provider": "openia", "model_identifier": "a"}, code=-32602,
        field="provider")
    err(client, "models.register", {"name": "x", "provider": "openai"}, code=-32602, field="model_identifier")
    # a training job's checkpoint: its path is the identifier
    job = start_job(client)
    with db.session_scope(client.ctx.engine) as s:
        ckpt = db.add_checkpoint(s, job_id=job, step=5, path=str(tmp_path / "ckpt"))
        db.set_best_checkpoint(s, job_id=job, checkpoint_id=ckpt.id)
    tuned = ok(client, "models.register", {"name": "tuned", "provider": "local", "job_id": job})
    assert tuned["checkpoint_id"] == ckpt.id and tuned["model_identifier"] == str(tmp_path / "ckpt")
    err(client, "models.register", {"name": "t2", "provider": "local", "checkpoint_id": "ckpt_nope"}, code=-32001)
    err(client, "models.register", {"name": "t3", "provider": "openai", "checkpoint_id": ckpt.id}, code=-40002,
        field="provider")
    err(client, "models.register", {"name": "t4", "provider": "local", "job_id": job}, user="bob", code=-32001)

    up = ok(client, "models.update", {"id": m["id"], "status": "production", "tags": ["api", "prod"]})
    assert up["status"] == "production" and up["tags"] == ["api", "prod"]
    assert [x["id"] for x in ok(client, "models.list", {"provider": "local"})["models"]] == [tuned["id"]]
    assert [x["id"] for x in ok(client, "models.list", {"tag": "prod"})["models"]] == [m["id"]]
    assert [x["id"] for x in ok(client, "models.list", {"status": "production"})["models"]] == [m["id"]]
    err(client, "models.list", {"status": "live"}, code=-32602, field="status")
    ok(client, "models.delete", {"id": m["id"]})
    err(client, "models.get", {"id": m["id"]}, code=-32001)
    assert [x["id"] for x in ok(client, "models.list", {})["models"]] == [tuned["id"]]


def test_prompt_templates_declare_and_check_variables(client):
    t = ok(client, "prompts.create", {"name": "qa", "template": "Q: {{ question }}\nContext: {{context}}",
                                      "variables": ["question", "context"]})
    assert t["version"] == 1 and t["latest_version"] == 1
    err(client, "prompts.create", {"name": "x", "template": "{{a}} {{b}}", "variables": ["a"]}, code=-40002,
        field="'b'")
    err(client, "prompts.create", {"name": "x", "template": "{{a}}", "variables": ["a", "c"]}, code=-40002,
        field="'c'")
    err(client, "prompts.create", {"name": "x", "template": "{{a}}", "variables": ["a", "a"]}, code=-32602)
    err(client, "prompts.create", {"name": "x", "template": "hi", "variables": ["not valid"]}, code=-32602)
    out = ok(client, "prompts.render", {"id": t["id"], "variables": {"question": "2+2?", "context": 4}})
    assert out == {"id": t["id"], "version": 1, "rendered": "Q: 2+2?\nContext: 4"}
    err(client, "prompts.render", {"id": t["id"], "variables": {"question": "q"}}, code=-40002,
        field="variables.context")
    err(client, "prompts.render", {"id": t["id"], "variables": {"question": "q", "context": "c", "extra": 1}},
        code=-40002, field="variables.extra")
    v2 = ok(client, "prompts.add_version", {"id": t["id"], "template": "{{question}}", "variables": ["question"],
                                            "change_description": "no context"})
    assert v2["version"] == 2 and v2["change_description"] == "no context"
    assert ok(client, "prompts.render", {"id": t["id"], "variables": {"question": "q"}})["rendered"] == "q"
    old = ok(client, "prompts.get", {"id": t["id"], "version": 1})
    assert old["variables"] == ["question", "context"] and old["latest_version"] == 2
    err(client, "prompts.get", {"id": t["id"], "version": 3}, code=-32001, field="version")
    assert [x["version"] for x in ok(client, "prompts.list", {"search": "QA"})["templates"]] == [2]
    err(client, "prompts.get", {"id": t["id"]}, user="bob", code=-32001)
    ok(client, "prompts.delete", {"id": t["id"]})
    err(client, "prompts.render", {"id": t["id"], "variables": {"question": "q"}}, code=-32001)


# ---- datasets ----------------------------------------------------------------------------------

def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_dataset_versions_files_links_and_a_job_trained_from_one(client):
    ds = ok(client, "datasets.create", {"name": "digits", "tags": ["toy"]})
    assert ds["latest_version"] is None
    err(client, "datasets.get_version", {"dataset_id": ds["id"]}, code=-32001, field="version")
    v1 = ok(client, "datasets.create_version", {"dataset_id": ds["id"], "change_description": "first",
                                                "content_base64": base64.b64encode(jsonl(ROWS[:5])).decode()})
    assert v1["version"] == 1 and v1["sample_count"] == 5
    assert v1["content_hash"] == hashlib.sha256(jsonl(ROWS[:5])).hexdigest()
    assert v1["schema"] == {"query": "string", "expected_outcome": "string"}
    stored = client.settings.home / "datasets" / v1["content_hash"][:2] / v1["content_hash"]
    from sqlmodel import select

    from app.data.tables import AuditEntry

    with db.session_scope(client.ctx.engine) as s:  # the audit row of the upload keeps no file content
        audit = s.exec(select(AuditEntry).where(AuditEntry.method == "datasets.create_version")).one()
        assert audit.params["content_base64"] == "<redacted>" and audit.target == ds["id"]
    assert stored.read_bytes() == jsonl(ROWS[:5]) and v1["storage_url"] == stored.as_uri()
    same = err(client, "datasets.create_version", {"dataset_id": ds["id"],
                                                   "content_base64": base64.b64encode(jsonl(ROWS[:5])).decode()},
               code=-40002, field="unchanged")
    assert same["data"]["version"] == 1
    err(client, "datasets.create_version", {"dataset_id": ds["id"], "content_base64": "!!"}, code=-32602,
        field="content_base64")
    err(client, "datasets.create_version", {"dataset_id": ds["id"], "content_base64": base64.b64encode(
        b'{"a": 1}\nnot json\n').decode()}, code=-40002, field="line 2")
    err(client, "datasets.create_version", {"dataset_id": ds["id"]}, code=-32602, field="exactly one")

    # the HTTP route, through a signed link (no other credentials), then a version from its hash
    link = ok(client, "datasets.upload_url", {"dataset_id": ds["id"], "expires_in_s": 60})
    assert link["method"] == "PUT" and link["url"].startswith(f"/api/v1/datasets/{ds['id']}/file?")
    anonymous = TestClient(client.app)
    r = anonymous.put(link["url"], content=jsonl(ROWS))
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["content_hash"] == hashlib.sha256(jsonl(ROWS)).hexdigest() and up["sample_count"] == 10
    assert anonymous.put(link["url"].replace("signature=", "signature=0"), content=b"{}").status_code == 401
    assert anonymous.put(f"/api/v1/datasets/{ds['id']}/file", content=b"{}").status_code == 401
    assert client.put(f"/api/v1/datasets/{ds['id']}/file", content=b"[1]\n").status_code == 400  # not objects
    r = client.put(f"/api/v1/datasets/{ds['id']}/file", content=b'{"q": 1}\n', headers=bearer(client.settings, "dave", "researcher"))
    assert r.status_code == 404  # someone else's dataset
    r = client.put(f"/api/v1/datasets/{ds['id']}/file", content=b'{"q": 1}\n', headers=bearer(client.settings, "vera",
                                                                                              "viewer"))
    assert r.status_code == 403 and "datasets:write" in r.text
    v2 = ok(client, "datasets.create_version", {"dataset_id": ds["id"], "content_hash": up["content_hash"],
                                                "change_description": "all ten"})
    assert v2["version"] == 2 and v2["sample_count"] == 10
    err(client, "datasets.create_version", {"dataset_id": ds["id"], "content_hash": "0" * 64}, code=-32001)

    # downloads: with credentials, with a signed link, never with an expired or foreign one
    got = client.get(f"/api/v1/datasets/{ds['id']}/versions/2/file")
    assert got.status_code == 200 and got.content == jsonl(ROWS) and got.headers["x-content-sha256"] == up["content_hash"]
    dl = ok(client, "datasets.download_url", {"dataset_id": ds["id"], "version": 1})
    assert anonymous.get(dl["url"]).content == jsonl(ROWS[:5])
    assert anonymous.get(dl["url"].replace("/versions/1/", "/versions/2/")).status_code == 401  # bound to its path
    from app.research.datasets import _signature

    expired = int(time.time()) - 1
    sig = _signature(client.settings, "GET", f"/api/v1/datasets/{ds['id']}/versions/1/file", expired, "alice")
    r = anonymous.get(f"/api/v1/datasets/{ds['id']}/versions/1/file?expires={expired}&by=alice&signature={sig}")
    assert r.status_code == 401 and "expired" in r.text
    assert client.get(f"/api/v1/datasets/{ds['id']}/versions/9/file").status_code == 404

    pages = ok(client, "datasets.list_versions", {"dataset_id": ds["id"], "limit": 1})
    assert [v["version"] for v in pages["versions"]] == [2] and pages["next_cursor"] == "2"
    last = ok(client, "datasets.list_versions", {"dataset_id": ds["id"], "limit": 1, "cursor": pages["next_cursor"]})
    assert [v["version"] for v in last["versions"]] == [1] and last["has_more"] is False
    assert ok(client, "datasets.get", {"id": ds["id"]})["latest"]["version"] == 2

    # a job from a dataset version: queued with exactly that file, its lineage kept
    job = ok(client, "training.start_grpo", {"agent_id": "a", "dataset": {"dataset_id": ds["id"], "version": 1},
                                             "config": {"n_iterations": 5, "batch_size": 4, "reward": "digit",
                                                        "max_budget_usd": "1"}})
    assert job["status"] == "queued"
    data = client.settings.runs_dir / job["job_id"] / "data.jsonl"
    assert [json.loads(line) for line in data.read_text().splitlines()] == ROWS[:5]
    with db.session_scope(client.ctx.engine) as s:
        stored_job = db.get_job(s, job_id=job["job_id"])
        assert stored_job.config["dataset"] == {"dataset_id": ds["id"], "version": 1,
                                                "content_hash": v1["content_hash"]}
        assert stored_job.training_rows == 5
    err(client, "training.start_grpo", {"agent_id": "a", "training_data": ROWS,
                                        "dataset": {"dataset_id": ds["id"]}}, code=-32602, field="exactly one")
    err(client, "training.start_grpo", {"agent_id": "a", "dataset": {"dataset_id": "ds_nope"}}, code=-32001,
        field="dataset")
    err(client, "training.start_grpo", {"agent_id": "a", "dataset": {"dataset_id": ds["id"]}}, user="dave",
        code=-32001)
    odd = ok(client, "datasets.create", {"name": "not training rows"})
    ok(client, "datasets.create_version", {"dataset_id": odd["id"],
                                           "content_base64": base64.b64encode(jsonl([{"text": "hi"}])).decode()})
    err(client, "training.start_grpo", {"agent_id": "a", "dataset": {"dataset_id": odd["id"]}}, code=-40002,
        field="line 1")

    # the content hash catches a file changed behind the registry's back
    assert ok(client, "datasets.verify", {"dataset_id": ds["id"], "version": 1})["ok"] is True
    stored.write_bytes(jsonl(ROWS[:4]))
    check = ok(client, "datasets.verify", {"dataset_id": ds["id"], "version": 1})
    assert check["ok"] is False and check["actual_hash"] == hashlib.sha256(jsonl(ROWS[:4])).hexdigest()
    err(client, "training.start_grpo", {"agent_id": "a", "dataset": {"dataset_id": ds["id"], "version": 1}},
        code=-40002, field="changed")
    assert client.get(f"/api/v1/datasets/{ds['id']}/versions/1/file").status_code == 409

    ok(client, "datasets.delete", {"id": ds["id"]})
    err(client, "datasets.get", {"id": ds["id"]}, code=-32001)
    assert [d["id"] for d in ok(client, "datasets.list", {})["datasets"]] == [odd["id"]]


def test_fsspec_storage_and_a_clear_error_without_the_protocol(tmp_path):
    from app.research.storage import Storage, StorageError

    store = Storage("memory://raygrpo-test/datasets", tmp_path / "tmp")
    stats = store.put_bytes(jsonl(ROWS[:3]))
    url = store.url_of(stats.content_hash)
    assert url == f"memory://raygrpo-test/datasets/{stats.content_hash[:2]}/{stats.content_hash}"
    assert store.exists(url) and store.hash_of(url) == stats.content_hash and stats.sample_count == 3
    target = tmp_path / "copy.jsonl"
    store.copy_to(url, target)
    assert target.read_bytes() == jsonl(ROWS[:3]) and list((tmp_path / "tmp").iterdir()) == []
    with pytest.raises(StorageError, match="nosuchproto"):
        Storage("nosuchproto://bucket/x", tmp_path / "tmp")


# ---- evaluations -------------------------------------------------------------------------------

def test_evaluations_record_list_and_weighted_aggregates(client):
    e = active_experiment(client)
    run = ok(client, "runs.create", {"experiment_id": e})["id"]
    m = ok(client, "models.register", {"name": "m", "provider": "huggingface", "model_identifier": "org/m"})["id"]
    a = ok(client, "evaluations.record", {"experiment_id": e, "run_id": run, "model_id": m, "name": "gsm8k",
                                         "samples": 100, "accuracy": 0.5, "avg_latency_ms": 200, "tokens": 1000,
                                         "cost_usd": "0.10", "metrics": {"f1": 0.4}})
    assert a["cost_usd"] == "0.100000" and a["id"].startswith("eval_")
    ok(client, "evaluations.record", {"experiment_id": e, "model_id": m, "name": "gsm8k", "samples": 300,
                                     "accuracy": 0.9, "tokens": 3000, "cost_usd": "0.30", "metrics": {"f1": 0.8}})
    ok(client, "evaluations.record", {"experiment_id": e, "name": "smoke", "samples": 10, "avg_latency_ms": 100})
    agg = ok(client, "evaluations.aggregate", {"experiment_id": e})
    assert agg["evaluations"] == 3 and agg["samples"] == 410 and agg["tokens"] == 4000
    assert agg["cost_usd"] == "0.400000"
    assert agg["accuracy"] == pytest.approx((0.5 * 100 + 0.9 * 300) / 400)  # weighted by samples, not 0.7
    assert agg["avg_latency_ms"] == pytest.approx((200 * 100 + 100 * 10) / 110)
    assert agg["metrics"] == {"f1": {"count": 2, "mean": pytest.approx(0.6), "min": 0.4, "max": 0.8}}
    by = {g["model_id"]: g for g in agg["by_model"]}
    assert by[m]["samples"] == 400 and by[None]["samples"] == 10
    only_run = ok(client, "evaluations.aggregate", {"experiment_id": e, "run_id": run})
    assert only_run["evaluations"] == 1 and only_run["accuracy"] == 0.5
    assert len(ok(client, "evaluations.list", {"experiment_id": e})["evaluations"]) == 3
    assert len(ok(client, "evaluations.list", {"model_id": m})["evaluations"]) == 2
    assert [x["name"] for x in ok(client, "evaluations.list", {"run_id": run})["evaluations"]] == ["gsm8k"]
    assert [x["name"] for x in ok(client, "evaluations.list", {"experiment_id": e, "search": "smo"})["evaluations"]] \
        == ["smoke"]
    page = ok(client, "evaluations.list", {"experiment_id": e, "limit": 2})
    assert len(page["evaluations"]) == 2 and page["has_more"]
    err(client, "evaluations.list", {}, code=-32602, field="experiment_id")
    other = active_experiment(client)
    err(client, "evaluations.record", {"experiment_id": other, "run_id": run, "name": "x", "samples": 1},
        code=-40002, field="run_id")
    err(client, "evaluations.record", {"experiment_id": e, "name": "x", "samples": 1, "accuracy": 1.5},
        code=-32602, field="accuracy")
    err(client, "evaluations.record", {"experiment_id": e, "name": "x", "samples": 1}, user="bob", code=-32001)
    err(client, "evaluations.list", {"model_id": m}, user="bob", code=-32001)
    err(client, "evaluations.aggregate", {"experiment_id": e}, user="bob", code=-32001)
