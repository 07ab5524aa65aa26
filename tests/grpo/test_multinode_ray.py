"""Several Ray nodes on this machine (each its own raylet and object store, Ray's own
`ray.cluster_utils.Cluster`): the shared-folder probe a run makes before it starts. A run spread over two
nodes with its files in a bucket, losing one mid-run, is tests/app/test_multinode_api_ray.py (the dispatcher's
Ray Job is `python -m grpo.run` against the cluster, as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


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
