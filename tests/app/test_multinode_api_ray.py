"""The job API on a Ray cluster of several nodes (Ray's own `ray.cluster_utils.Cluster`: a raylet and an object
store per node, on this machine), the run files at the cluster's storage URL on a loopback S3 server
(RAYGRPO_STORAGE_URL, credentials from the nodes' AWS_* variables as a KubeRay Secret gives them). The run
across two nodes is the engine's too (`python -m grpo.run` with `storage=`): this test's run is that command,
as the dispatcher's Ray Job.

The stack is `python -m app.api.serve` against RAY_ADDRESS, as on a cluster: its settings reach the replicas,
the dispatcher and every run's driver through the nodes' environment, never through a Ray Job's runtime_env."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time

import httpx
import pytest
from raygrpo_test_services import bearer, free_port

from app.settings import Settings
from grpo import storage
from grpo.run import latest_checkpoint
from grpo.trainer import checkpoint_step

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(10)]


def test_a_job_spread_over_two_nodes_with_its_files_in_a_bucket_survives_a_node_loss(tiny_model_dir, tmp_path,
                                                                                     s3_bucket, monkeypatch,
                                                                                     local_nodes):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    home, port, secret = tmp_path / "home", free_port(), secrets.token_urlsafe(32)
    env = {"RAYGRPO_HOME": str(home), "DATABASE_URL": f"sqlite:///{home / 'raygrpo.db'}", "REDIS_URL": "",
           "RAYGRPO_DEFAULT_MODEL": tiny_model_dir, "RAYGRPO_JWT_SECRET": secret, "RAYGRPO_API_PORT": str(port),
           "RAYGRPO_STORAGE_URL": f"{s3_bucket}/raygrpo", "RAYGRPO_CACHE": str(tmp_path / "cache"),
           "RAYGRPO_MAX_RUNNING_JOBS": "1", "RAYGRPO_RATE_LIMITS": "training.get_status=0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}
    for k, v in env.items():  # the nodes' environment, as a KubeRay pod spec sets it
        monkeypatch.setenv(k, v)
    # The head holds one CPU (the API replica and the dispatcher); the policy ranks need a node each.
    cluster, nodes = local_nodes(1, 3, 3)
    dashboard = cluster.dashboard_url
    stack = None
    try:
        stack = subprocess.Popen([sys.executable, "-m", "app.api.serve"], env={**os.environ, "RAY_ADDRESS": cluster.address},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}/api/v1/jsonrpc"
        client = httpx.Client(timeout=120, headers=bearer(Settings(jwt_secret=secret), "spread-tester", "researcher"))
        admin = httpx.Client(timeout=120, headers=bearer(Settings(jwt_secret=secret), "ops", "admin"))

        def rpc(method: str, who: httpx.Client = client, **params):
            body = who.post(url, json={"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).json()
            assert "result" in body, body
            return body["result"]

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert stack.poll() is None and time.monotonic() < deadline, "the API did not come up"
            time.sleep(0.5)

        steps = 10
        job = rpc("training.start_grpo", agent_id="spread", training_data=ROWS, config={
            "n_iterations": steps, "batch_size": 4, "n_trajectories_per_query": 4, "learning_rate": 1e-3,
            "reward": "digit", "max_new_tokens": 6, "checkpoint_interval": 2, "max_budget_usd": "5",
            "num_policy_workers": 2, "engine": {"cpus_per_worker": 1, "cpus_per_reward_worker": 0.5,
                                                "placement_strategy": "STRICT_SPREAD"}})
        job_id = job["job_id"]
        run = f"{s3_bucket}/raygrpo/jobs/{job_id}/run"

        def status() -> dict:
            return rpc("training.get_status", job_id=job_id)

        deadline = time.monotonic() + 400
        while (latest := latest_checkpoint(run)) is None or checkpoint_step(latest) < 2:
            current = status()
            assert current["status"] in ("queued", "running"), current
            assert time.monotonic() < deadline, current
            time.sleep(0.5)
        assert status()["status"] == "running"  # the loss lands mid-run
        workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        spread = {w.node_id for w in workers}
        assert len(workers) == 2 and len(spread) == 2  # one rank per node
        assert set(status()["rank_nodes"]) == spread  # shown while it runs
        lost = next(n for n in nodes if n.node_id in spread)
        cluster.remove_node(lost, allow_graceful=False)
        fresh = cluster.add_own_node(3)

        deadline = time.monotonic() + 600
        while (current := status())["status"] not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, current
            time.sleep(1)
        assert current["status"] == "completed", current["error_message"]
        assert current["current_iteration"] == steps
        ranks = current["rank_nodes"]
        assert len(set(ranks)) == 2 and lost.node_id not in ranks and fresh.node_id in ranks
        # every step exactly once, in the job's database and in the bucket
        out = rpc("training.export_trajectories", job_id=job_id, limit=1000)
        per_step: dict[int, int] = {}
        for t in out["trajectories"]:
            per_step[t["step"]] = per_step.get(t["step"], 0) + 1
        assert per_step == dict.fromkeys(range(1, steps + 1), 16)
        metrics = [json.loads(x) for x in storage.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, steps + 1))
        # resumed from the bucket's checkpoint, not from step 0 (the driver on the head lived: one Ray Job);
        # the inputs a worker loaded came from the bucket, not from a path on the head
        logs = JobSubmissionClient(dashboard).get_job_logs(job_id)
        resumed = [int(m) for m in re.findall(r"resumed from the checkpoint of step (\d+)", logs)]
        assert len(resumed) == 1 and resumed[0] >= 2, logs[-3000:]
        assert storage.listdir(f"{run}/inputs/model")
        # the best checkpoint lives in the bucket (admins see where), and serves an evaluation on the cluster
        best = rpc("training.get_status", admin, job_id=job_id)["best_checkpoint"]
        assert best["path"].startswith(run) and checkpoint_step(best["path"]) == best["step"]
        assert "path" not in current["best_checkpoint"]
        ev = rpc("training.evaluate", job_id=job_id, max_queries=5)
        assert ev["n_queries"] == 5
        # no credential travelled with the Ray Job
        jobs = JobSubmissionClient(dashboard).list_jobs()
        shown = json.dumps([{"env": (j.runtime_env or {}), "meta": j.metadata} for j in jobs])
        assert jobs and "AWS_SECRET_ACCESS_KEY" not in shown and os.environ["AWS_SECRET_ACCESS_KEY"] not in shown
    finally:
        if stack is not None and stack.poll() is None:
            stack.terminate()
            try:
                stack.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stack.kill()
