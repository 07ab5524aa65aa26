"""Agent jobs through the job API: `config.agent` is validated and mapped onto the engine, and the
steps of multi-turn trajectories (as the engine's rollout produced them) come back from
`training.export_trajectories`. On SQLite and PostgreSQL; no Ray (the run's part is played with the
engine's own classes in this process, as test_api.py does with app.data.db)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from raygrpo_test_services import bearer

from app.data import db
from app.settings import Settings

ROWS = [{"query": f"{a}+{b}=", "expected_outcome": str(a + b)} for a, b in [(12, 7), (30, 45), (8, 9), (21, 21)]]
AGENT = {"environment": "calculator", "tools": ["calc"], "max_steps": 3, "credit_assignment": "discounted",
         "gamma": 0.9, "reward_tool_call": 0.1, "tool_instructions": False}


@pytest.fixture
def client(tmp_path, db_url, engine, tiny_model_dir):
    from app.api.main import create_app

    settings = Settings(home=tmp_path / "home", database_url=db_url, default_model=tiny_model_dir,
                        rate_limits={"default": 0})
    app = create_app(settings)
    with TestClient(app, headers=bearer(settings)) as c:
        c.ctx = app.state.ctx
        yield c


def call(client, method, params):
    r = client.post("/api/v1/jsonrpc", json={"jsonrpc": "2.0", "method": method, "id": 1, "params": params})
    assert r.status_code == 200, r.text
    return r.json()


def start(client, config):
    return call(client, "training.start_grpo", {"agent_id": "calc-agent", "training_data": ROWS,
                                                "config": {"n_iterations": 3, "batch_size": 2, "max_budget_usd": "1",
                                                           "max_new_tokens": 64, **config}})


def test_agent_job_is_accepted_and_mapped_onto_the_engine(client):
    reply = start(client, {"agent": AGENT})["result"]
    assert reply["status"] == "queued"
    with db.session_scope(client.ctx.engine) as s:
        cfg = db.get_job(s, job_id=reply["job_id"]).engine_config
    assert cfg["environment"] == "calculator" and cfg["tools"] == ["calc"]
    assert cfg["max_steps_per_trajectory"] == 3 and cfg["gamma"] == 0.9 and cfg["credit_assignment"] == "discounted"
    assert cfg["reward_tool_call"] == 0.1 and cfg["tool_instructions"] is False
    # max steps and gamma may also come from the top-level fields
    reply = start(client, {"max_steps_per_trajectory": 6, "gamma": 0.5, "agent": {"environment": "search"}})["result"]
    with db.session_scope(client.ctx.engine) as s:
        cfg = db.get_job(s, job_id=reply["job_id"]).engine_config
    assert (cfg["environment"], cfg["max_steps_per_trajectory"], cfg["gamma"]) == ("search", 6, 0.5)


@pytest.mark.parametrize(("config", "code", "words"), [
    ({"max_steps_per_trajectory": 3}, -40002, "config.agent"),
    ({"agent": {"environment": "nope"}}, -40002, "environment: unknown environment 'nope'"),
    ({"agent": {"environment": "calculator", "tools": ["python"]}}, -40002, "tools: python not offered"),
    ({"agent": {"environment": "nomodule:Env"}}, -40002, "environment"),
    ({"agent": {"environment": "calculator", "gamma": 2}}, -32602, "config.agent.gamma"),
    ({"agent": {"tools": ["calc"]}}, -32602, "config.agent.environment"),
    ({"agent": {"environment": "calculator", "shaping": 1}}, -32602, "config.agent.shaping"),
    ({"engine": {"environment": "calculator"}}, -40002, "use config.agent.environment"),
    ({"engine": {"max_steps_per_trajectory": 2}}, -40002, "use config.agent.max_steps"),
])
def test_bad_agent_configs_are_refused_naming_the_field(client, config, code, words):
    err = start(client, config)["error"]
    assert err["code"] == code and words in json.dumps(err), err


def test_exported_trajectory_shows_every_step_as_the_model_and_tools_produced_it(client):
    """A real rollout (the engine's RolloutWorker playing the calculator environment: sampled
    trajectories from the random model and demonstrated ones) goes through the run's DB reporter and
    comes back from export_trajectories step for step."""
    from app.jobs.reporter import DBReporter
    from grpo.agents.environments import CalculatorEnv
    from grpo.agents.episodes import AgentSettings, concat_agent_rollouts
    from grpo.config import GRPOConfig
    from grpo.learner import score_agent_batch
    from grpo.rollout import RolloutWorker
    from grpo.tasks import Sample
    from grpo.trainer import Collected, trajectories

    job = start(client, {"agent": AGENT})["result"]["job_id"]
    with db.session_scope(client.ctx.engine) as s:
        db.mark_running(s, job_id=job, ray_submission_id=job)
        cfg = GRPOConfig(**db.get_job(s, job_id=job).engine_config)
    worker = RolloutWorker(cfg.model)
    settings = AgentSettings.from_config(cfg)
    samples = [Sample(r["query"], r["expected_outcome"]) for r in ROWS[:2]]
    sampled = worker.generate_agent(samples, settings=settings, group_size=2, seed=3)
    shown = worker.generate_agent(samples, settings=settings, group_size=2,
                                  forced=[CalculatorEnv.demonstration(s) for s in samples])
    ro = concat_agent_rollouts([shown, sampled])
    ro.prompt_ids, ro.group_size = ro.prompt_ids[:2] * 2, 2
    rows = trajectories(Collected(1, samples * 2, score_agent_batch(ro, cfg), 0, 0, 0.1))
    DBReporter(cfg=cfg, job_id=job, db_url=client.ctx.settings.db_url).on_trajectories(rows)

    out = call(client, "training.export_trajectories", {"job_id": job, "limit": 100})["result"]
    assert out["total_count"] == 8
    for t in out["trajectories"]:
        assert len(t["steps"]) >= 1
        assert all(set(s) >= {"step", "observation", "action", "reward", "timestamp", "duration_s"} for s in t["steps"])

    def canonical(steps):  # NULs in model text are stored as U+FFFD (PostgreSQL refuses NUL)
        return json.dumps(steps, sort_keys=True).replace("\\u0000", "\\ufffd")

    assert sorted(canonical(t["steps"]) for t in out["trajectories"]) == sorted(canonical(r["steps"]) for r in rows)
    demo = next(t for t in out["trajectories"] if t["success"])
    call_step, answer = demo["steps"]
    assert call_step["action"] == '<tool>{"name":"calc","arguments":{"expr":"12+7"}}</tool>'
    assert call_step["tool"] == "calc" and call_step["tool_result"] == "19" and call_step["observation"] == "12+7="
    assert call_step["reward"] == pytest.approx(0.1)  # the tool-call shaping
    assert answer["action"] == "19" and answer["observation"] == "19" and answer["reward"] == 1.0 and answer["done"]
    assert demo["completion"] == call_step["action"] + "\n<result>19</result>\n19" and demo["reward"] == pytest.approx(1.1)
