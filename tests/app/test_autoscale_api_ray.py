"""The job API on a cluster that grows: the real Ray autoscaler (v2) driving Ray's fake multi-node provider, whose
"nodes" are local raylets started on demand. A job bigger than the nodes there are but within the cluster's
maximum is admitted and shows `waiting for nodes` (not refused, not stuck), the autoscaler adds nodes, the job
runs, and the nodes go once idle; a job over the maximum is refused at once.

Ray 2.60 publishes no maximum for a file-configured autoscaler (Ray's cluster config in the GCS stays empty),
so the cluster's maximum is declared as an operator does for one: RAYGRPO_CLUSTER_CAPACITY."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cluster_processes import MARKER_ENV, reap
from raygrpo_test_services import bearer, free_port

from app.settings import Settings

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(10)]
HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the fake provider's own head id


@contextlib.contextmanager
def fake_autoscaling_cluster(tmp: Path, *, head_cpus: int, node_cpus: int, max_nodes: int,
                             idle_timeout_s: float) -> Iterator[tuple[str, str]]:
    """A head started with `ray start --head --autoscaling-config` (its own ports, so it sits next to the test
    session's cluster and Redis), the v2 autoscaler adding and removing `node_cpus`-CPU nodes up to
    `max_nodes`. Yields (GCS address, dashboard URL). Only this cluster's processes are stopped after (never
    `ray stop`, which would stop every cluster of the machine)."""
    import ray

    ip = ray.util.get_node_ip_address()
    port, dashboard_port, client_port = free_port(), free_port(), free_port()
    config = {
        "cluster_name": "raygrpo-fake", "max_workers": max_nodes, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        # the fake provider by its class ("external"): its defaults file is not in Ray's wheel
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
                     "launch_multiple": True, "head_node_id": HEAD_NODE_ID, "gcs_address": f"{ip}:{port}"},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "cpu": {"resources": {"CPU": node_cpus}, "node_config": {}, "min_workers": 0, "max_workers": max_nodes}},
        "head_node_type": "ray.head.default", "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": []}
    path = tmp / "autoscaling.json"
    path.write_text(json.dumps(config))
    temp_dir = tempfile.mkdtemp(prefix="rg-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1",
           "RAY_CLOUD_INSTANCE_ID": HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": HEAD_NODE_ID,
           "RAY_AUTH_MODE": "disabled",
           # every process of this cluster carries it, the nodes the autoscaler adds included: how they are found
           # to be stopped after
           MARKER_ENV: temp_dir}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", f"--autoscaling-config={path}",
                    f"--num-cpus={head_cpus}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                    f"--ray-client-server-port={client_port}", f"--temp-dir={temp_dir}",
                    # every port of its own: the defaults (the agent's 52365, metrics) are the test session's
                    # cluster's, and a head without its dashboard agent cannot take a Ray Job
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"{ip}:{port}", f"http://127.0.0.1:{dashboard_port}"
    finally:
        # the cluster's processes by their marker, and by their command line those that name its folder or
        # address (with all they started)
        reap(temp_dir, also=lambda proc: any(temp_dir in arg or f"{ip}:{port}" in arg for arg in proc.cmdline()))
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_job_bigger_than_the_nodes_waits_for_the_autoscaler_runs_and_the_nodes_go_after(tiny_model_dir, tmp_path):
    from ray.util.state import list_nodes

    home, port, secret = tmp_path / "home", free_port(), "autoscale-" + os.urandom(16).hex()
    env = {"RAYGRPO_HOME": str(home), "DATABASE_URL": f"sqlite:///{home / 'raygrpo.db'}", "REDIS_URL": "",
           "RAYGRPO_DEFAULT_MODEL": tiny_model_dir, "RAYGRPO_JWT_SECRET": secret, "RAYGRPO_API_PORT": str(port),
           "RAYGRPO_MAX_RUNNING_JOBS": "1", "RAYGRPO_RATE_LIMITS": "training.get_status=0", "RAYGRPO_CLUSTER_CAPACITY": json.dumps({"CPU": 1 + 2 * 3}),
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the nodes' environment: the head and the nodes the autoscaler starts read it
    stack = None
    try:
        with fake_autoscaling_cluster(tmp_path, head_cpus=1, node_cpus=3, max_nodes=2, idle_timeout_s=6) as (gcs, dash):
            stack = subprocess.Popen([sys.executable, "-m", "app.api.serve"], env={**os.environ, "RAY_ADDRESS": gcs},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            url = f"http://127.0.0.1:{port}/api/v1/jsonrpc"
            client = httpx.Client(timeout=120, headers=bearer(Settings(jwt_secret=secret), "grower", "researcher"))

            def rpc(method: str, **params):
                body = client.post(url, json={"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).json()
                assert "result" in body, body
                return body["result"]

            def alive_nodes() -> int:
                return sum(n.state == "ALIVE" for n in list_nodes(address=dash, raise_on_missing_output=False))

            deadline = time.monotonic() + 300
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200:
                        break
                assert stack.poll() is None and time.monotonic() < deadline, "the API did not come up"
                time.sleep(0.5)
            assert alive_nodes() == 1  # the head alone: 1 CPU

            # Over the maximum (2 x 4 + 4 + 0.5 CPU > 7): refused at once, naming what is missing.
            body = client.post(url, json={"jsonrpc": "2.0", "method": "training.start_grpo", "id": 1, "params": {
                "agent_id": "grow", "training_data": ROWS, "config": {
                    "n_iterations": 2, "batch_size": 4, "n_trajectories_per_query": 4, "reward": "digit",
                    "max_new_tokens": 6, "max_budget_usd": "5", "num_policy_workers": 2,
                    "engine": {"cpus_per_worker": 4, "cpus_per_reward_worker": 0.5}}}}).json()
            assert body["error"]["code"] == -40002 and "cannot fit this cluster" in body["error"]["message"]
            assert body["error"]["data"]["cluster_max"] == {"CPU": 7.0}

            # 2 policy ranks + a rollout actor + a reward actor: 3.5 CPU, more than the head's 1, within 7.
            steps = 6
            job = rpc("training.start_grpo", agent_id="grow", training_data=ROWS, config={
                "n_iterations": steps, "batch_size": 4, "n_trajectories_per_query": 4, "reward": "digit",
                "learning_rate": 1e-3, "max_new_tokens": 6, "checkpoint_interval": 3, "max_budget_usd": "5",
                "num_policy_workers": 2, "engine": {"cpus_per_worker": 1, "cpus_per_reward_worker": 0.5}})
            seen: list[str] = []
            deadline = time.monotonic() + 600
            while (status := rpc("training.get_status", job_id=job["job_id"]))["status"] not in (
                    "completed", "failed", "cancelled"):
                if (admission := status.get("admission")) and admission["reason"] not in seen:
                    seen.append(admission["reason"])
                assert time.monotonic() < deadline, (status, seen)
                time.sleep(0.3)
            assert status["status"] == "completed", (status["error_message"], seen)
            assert any(r.startswith("waiting for nodes") for r in seen), seen  # admitted, then shown waiting
            assert status["current_iteration"] == steps
            assert len(set(status["rank_nodes"])) >= 1 and HEAD_NODE_ID not in status["rank_nodes"]

            # Idle again: the autoscaler gives the nodes back.
            deadline = time.monotonic() + 180
            while alive_nodes() > 1:
                assert time.monotonic() < deadline, "the idle nodes were not removed"
                time.sleep(1)
    finally:
        if stack is not None and stack.poll() is None:
            stack.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                stack.wait(timeout=30)
            if stack.poll() is None:
                stack.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
