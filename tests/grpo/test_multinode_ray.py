"""A run across Ray nodes: several nodes on this machine (each its own raylet and object store, started with
Ray's own `ray.cluster_utils.Cluster`), the run's files in a bucket on a loopback S3 server, and a node lost
mid-run. The run is `python -m grpo.run` against the cluster named by RAY_ADDRESS, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from grpo import storage
from grpo.run import latest_checkpoint
from grpo.trainer import checkpoint_step


def _rows(url: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_spread_over_two_nodes_survives_losing_one_and_resumes_from_the_bucket(tiny_model_dir, tmp_path,
                                                                                      s3_bucket, monkeypatch,
                                                                                      local_nodes):
    """Two policy ranks with STRICT_SPREAD (one per node), checkpoints in the bucket. Once the first checkpoint
    is there, the node of a policy rank is removed and a fresh node added: Ray Train restarts the worker group
    on the new node from the checkpoint in the bucket, and every step is stored exactly once."""
    from ray.util.state import list_actors

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # The head holds no CPU: the policy ranks, actors and rewards all run on the worker nodes.
    cluster, nodes = local_nodes(0, 3, 3)
    dashboard = cluster.dashboard_url
    proc = None
    try:
        run = f"{s3_bucket}/runs/spread"
        steps = 10
        args = ["-m", "grpo.run", f"model={tiny_model_dir}", f"storage={s3_bucket}/runs", "run_name=spread",
                f"num_steps={steps}", "checkpoint_interval=2", "prompts_per_step=8", "group_size=4",
                "max_new_tokens=6", "eval_size=0", "num_policy_workers=2", "num_rollout_workers=1",
                "num_reward_workers=1", "cpus_per_worker=1", "cpus_per_reward_worker=0.5",
                "placement_strategy=STRICT_SPREAD"]
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []

        def read_until(pred, timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            while not pred():
                assert proc.poll() is None or pred(), "".join(lines)[-4000:]
                assert time.monotonic() < deadline, "".join(lines)[-4000:]
                time.sleep(0.2)

        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        read_until(lambda: (latest := latest_checkpoint(run)) is not None and checkpoint_step(latest) >= 2, 400)
        assert proc.poll() is None  # still training: the loss lands mid-run
        workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                          ("state", "=", "ALIVE")])
        spread = {w.node_id for w in workers}
        assert len(workers) == 2 and len(spread) == 2  # one rank per node
        lost = next(n for n in nodes if n.node_id in spread)
        cluster.remove_node(lost, allow_graceful=False)
        fresh = cluster.add_node(num_cpus=3)
        proc.wait(timeout=600)
        reader.join(timeout=10)
        out = "".join(lines)
        (tmp_path / "driver.log").write_text(out)
        ours = "".join(line for line in lines if "grpo" in line or line.startswith("run ") or "Error" in line)
        assert proc.returncode == 0, ours[-4000:]

        summary = json.loads(storage.read_bytes(f"{run}/summary.json"))
        assert summary["status"] == "completed" and summary["steps"] == steps, out[-3000:]
        # two nodes, the lost one replaced by the fresh one
        assert len(set(summary["rank_nodes"])) == 2 and fresh.node_id in summary["rank_nodes"]
        assert lost.node_id not in summary["rank_nodes"]
        # every step exactly once, in the bucket
        assert [m["step"] for m in _rows(f"{run}/metrics.jsonl")] == list(range(1, steps + 1))
        assert Counter(r["step"] for r in _rows(f"{run}/trajectories.jsonl")) == dict.fromkeys(range(1, steps + 1), 32)
        assert summary["checkpoint"].startswith(run) and checkpoint_step(summary["checkpoint"]) == steps
        resumed = [int(m) for m in re.findall(r"resumed from the checkpoint of step (\d+)", out)]
        assert len(resumed) == 1 and resumed[0] >= 2, out[-3000:]  # from the bucket's checkpoint, not from step 0
        # the inputs a worker loaded came from the bucket, not from a path on the head
        assert storage.listdir(f"{run}/inputs/model")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()


@pytest.mark.ray
def test_the_shared_folder_probe_runs_a_task_on_every_node(local_nodes, tmp_path):
    """check_shared_storage's probe for real: a zero-CPU task pinned to each node looks for the marker. On one
    machine every node sees every folder, so a path that exists is seen by all and a missing one by none."""
    cluster, _ = local_nodes(1, 1)
    here = tmp_path / "marker"
    here.write_text("x")
    script = ("import json, sys, ray; from grpo.run import _nodes_not_seeing; ray.init(); "
              "ids = [n['NodeID'] for n in ray.nodes() if n['Alive']]; "
              "print(json.dumps([len(ids), _nodes_not_seeing(sys.argv[1], ids), len(_nodes_not_seeing(sys.argv[2], ids))]))")
    out = subprocess.run([sys.executable, "-c", script, str(here), str(tmp_path / "missing")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": cluster.address})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2, [], 2]
