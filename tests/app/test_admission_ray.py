"""Admission against a real local Ray (the session's `ray.init(num_cpus=8)`): the default capacity reads
the cluster, the Dispatcher refuses what can never fit it, and training.start_grpo refuses such a job
at once when it runs on the cluster. No training runs here: the Ray Jobs client is a fake.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from fastapi.testclient import TestClient

from app.data import db
from app.data.tables import JobStatus
from app.jobs.dispatcher import Dispatcher, ray_cluster_resources
from app.settings import Settings

pytestmark = pytest.mark.ray

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(10)]
TOO_BIG = {"num_policy_workers": 4, "num_rollout_workers": 4, "num_reward_workers": 8}
"""12 CPUs: (4 + 4) x 1 + 8 x 0.5"""


class FakeJobs:
    def __init__(self):
        self.submitted: list[str] = []

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        self.submitted.append(submission_id)
        return submission_id

    def get_job_status(self, sid):
        return "RUNNING"

    def get_job_logs(self, sid):
        return ""


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'raygrpo.db'}", redis_url=None,
                    rate_limits={"default": 0})


def test_the_default_capacity_reads_the_cluster(ray_session, settings):
    cluster = ray_cluster_resources(settings)
    assert cluster.capacity["CPU"] == 8.0  # no autoscaler here: what the cluster has
    assert 0.0 <= cluster.in_use["CPU"] <= 8.0
    capped = ray_cluster_resources(settings.model_copy(update={"cluster_capacity": {"CPU": 4.0, "GPU": 2.0}}))
    assert capped.capacity["CPU"] == 4.0 and capped.capacity["GPU"] == 2.0  # the setting wins for what it names


def test_the_dispatcher_admits_by_the_real_cluster(ray_session, settings):
    d = Dispatcher(settings, jobs_client=FakeJobs())  # the default capacity: this Ray
    ids = []
    with db.session_scope(d.engine) as s:
        for n, (priority, engine) in enumerate([(1, TOO_BIG), (0, {})]):  # the big one first
            job, _ = db.create_job(s, agent_id="agent", owner=None, config={},
                                   engine_config={"output_dir": str(settings.runs_dir / f"j{n}"), **engine},
                                   total_iterations=5, budget_usd=Decimal("1"), priority=priority,
                                   idempotency_key=None, training_rows=1, evaluation_rows=0)
            ids.append(job.id)
    big, small = ids
    result = d.tick()
    assert result["refused"] == [big] and result["started"] == [small]
    assert d.client.submitted == [small]
    with db.session_scope(d.engine) as s:
        failed = db.get_job(s, job_id=big)
        assert failed.status == JobStatus.failed
        assert failed.error_message.startswith("cannot fit this cluster: needs 12 CPU, the cluster has at most 8 CPU")


def test_start_grpo_refuses_a_job_the_cluster_can_never_hold(ray_session, settings, tiny_model_dir):
    from app.api.auth import mint_token
    from app.api.main import create_app

    settings = settings.model_copy(update={"default_model": tiny_model_dir})
    app = create_app(settings)
    token = mint_token(settings, "alice", "admin")
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        def start(**config):
            params = {"agent_id": "agent", "training_data": ROWS,
                      "config": {"n_iterations": 2, "batch_size": 4, "reward": "digit", "max_budget_usd": "1",
                                 **config}}
            body = {"jsonrpc": "2.0", "method": "training.start_grpo", "params": params, "id": 1}
            return client.post("/api/v1/jsonrpc", json=body).json()

        reply = start(**TOO_BIG)
        assert reply["error"]["code"] == -40002
        message = reply["error"]["message"]
        assert message.startswith("config: cannot fit this cluster: needs 12 CPU, the cluster has at most 8 CPU")
        assert "num_reward_workers 8 x cpus_per_reward_worker 0.5" in message
        assert reply["error"]["data"]["fields"] == [
            "config.num_policy_workers", "config.num_rollout_workers", "config.engine.cpus_per_worker",
            "config.num_reward_workers", "config.engine.cpus_per_reward_worker"]
        with db.session_scope(app.state.ctx.engine) as s:
            assert db.list_jobs(s, agent_id=None, status=None, limit=10, cursor=None, owner=None)[0] == []

        gpus = start(num_policy_workers=2, num_rollout_workers=2, gpus_per_worker=8.0)["error"]
        assert gpus["data"]["needs"] == {"GPU": 32.0} and "gpus_per_worker 8" in gpus["message"]
        assert start()["result"]["status"] == "queued"  # 2.5 CPUs fit


def test_the_dispatcher_makes_the_clusters_reservation_ledger_when_it_starts(ray_session, settings):
    """The first job's driver would otherwise wait for the ledger's process before asking for anything."""
    import time

    import ray

    from grpo.gang import LEDGER_NAME, NAMESPACE

    def ledger_exists() -> bool:
        try:
            ray.get_actor(LEDGER_NAME, namespace=NAMESPACE)
            return True
        except ValueError:
            return False

    if ledger_exists():  # made by an earlier test's run: this one needs a cluster without it
        ray.kill(ray.get_actor(LEDGER_NAME, namespace=NAMESPACE))
        deadline = time.monotonic() + 60
        while ledger_exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not ledger_exists()
    d = Dispatcher(settings, jobs_client=FakeJobs())
    d.start()
    try:
        deadline = time.monotonic() + 60
        while not ledger_exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ledger_exists()
    finally:
        d.stop()
