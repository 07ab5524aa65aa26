"""Shared fixtures: one local Ray per session, a tiny HF model directory per session.

Tests marked `gpu` are skipped without CUDA. Under CI (CI=true) tests marked `services` fail
instead of skipping when Redis/PostgreSQL are missing, and tests that run user code (the `sandbox`
fixture) fail instead of skipping when the bubblewrap sandbox cannot start.
"""

from __future__ import annotations

import os

import pytest
import torch

# Ray Train's preemption watcher (an actor per run polling the nodes for a drain notice, for spot instances)
# has nothing to watch on the local clusters of the tests: one process less to start per run. Set before any
# cluster starts, so every raylet a test starts, and the runs on it, inherit it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sandbox() -> None:
    """The code sandbox works here: skip without it on a developer's machine, fail under CI."""
    from grpo.sandbox import status

    state = status()
    if not state.available:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the code sandbox is required under CI: {state.reason}")
        pytest.skip(state.reason)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-init 4-layer Llama (hidden 128) and byte tokenizer, saved as an ordinary HF directory."""
    from grpo.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", seed=0))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session; logical CPUs above the 2 real cores so every actor fits."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Serve's proxy callback, as every stack of ours sets it (app.api.proxy): read by the proxy actors, which
    # inherit this process's environment through the raylet it starts
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "app.api.proxy:middlewares")
    # address="local": a new cluster even when `ray start` left one running on this machine
    context = ray.init(address="local", num_cpus=8, log_to_driver=True)
    # The dashboard takes another port when 8265 is busy (another local cluster): tests that call the
    # Jobs API read the real one here. Not RAY_DASHBOARD_URL: stacks the tests start must not inherit it.
    os.environ["RAYGRPO_TEST_DASHBOARD_URL"] = f"http://{context.dashboard_url}"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on loopback (moto in server mode) named by the standard AWS variables, set in
    this process's environment so the Ray nodes and runs a test starts after it inherit them (as a real
    cluster's nodes take them from their environment). Skips where moto is not installed, fails under CI."""
    import socket
    import subprocess
    import sys
    import time
    import uuid

    import httpx

    try:
        import moto  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("moto[server] is required under CI (pip install -e '.[dev]')")
        pytest.skip("moto[server] is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint, timeout=2)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the moto S3 server did not start")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="raygrpo-test", AWS_SECRET_ACCESS_KEY=f"secret-{uuid.uuid4().hex}",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the loopback S3 server: `s3://<name>`."""
    import uuid

    import boto3

    name = f"raygrpo-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def local_nodes(monkeypatch):
    """Ray nodes on this machine, a cluster of the test's own (Ray's `ray.cluster_utils.Cluster`: a raylet and
    an object store per node): `make(head_cpus, *node_cpus)` -> (cluster, nodes), its dashboard URL as
    `cluster.dashboard_url`, `cluster.add_own_node(cpus)` to add a node later. The nodes inherit this process's
    environment as it is then (set the test's variables first). Every cluster made is shut down after the
    test, and every process its nodes started with it (tests/cluster_processes.py)."""
    import socket
    import uuid

    from cluster_processes import MARKER_ENV, reap
    from ray.cluster_utils import Cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    marker = uuid.uuid4().hex
    monkeypatch.setenv(MARKER_ENV, marker)  # inherited by every process of the clusters made here
    made = []

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def make(head_cpus: float, *node_cpus: float):
        # Ports of its own: on the defaults (the dashboard's 8265, the agent's 52365) a second cluster on this
        # machine (the session's) has no dashboard and no agent, so no state API and no Ray Job
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "dashboard_host": "127.0.0.1",
                                                                "dashboard_port": port(),
                                                                "dashboard_agent_listen_port": port()})
        made.append(cluster)
        cluster.add_own_node = lambda cpus: cluster.add_node(num_cpus=cpus, dashboard_agent_listen_port=port())
        nodes = [cluster.add_own_node(n) for n in node_cpus]
        cluster.wait_for_nodes()
        cluster.dashboard_url = f"http://{cluster.head_node.address_info['webui_url']}"
        return cluster, nodes

    yield make
    for cluster in made:
        cluster.shutdown()
    if killed := reap(marker):
        print(f"killed {len(killed)} process(es) the cluster's shutdown left:", killed)
