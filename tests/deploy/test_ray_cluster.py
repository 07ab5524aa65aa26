"""ray_cluster.yaml passes Ray's own cluster-launcher checks (prepare_config + validate_config) and says
what the deployment needs: a head that takes no work, GPU workers from zero, token auth, the API."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def load() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def prepared(config: dict) -> dict:
    """What `ray up` does with the file before it launches anything, plus what Ray lets through:
    a node type whose min_workers exceeds its max_workers (Ray accepts it and never starts the minimum)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    for name, node in config["available_node_types"].items():
        if node.get("min_workers", 0) > node.get("max_workers", config["max_workers"]):
            raise ValueError(f"available_node_types.{name}: min_workers {node['min_workers']} > "
                             f"max_workers {node['max_workers']}")
    return config


def test_ray_cluster_yaml_passes_ray_s_own_prepare_and_validate():
    import ray.autoscaler

    raw = load()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    config = prepared(raw)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head schedules no work
    gpu = nodes["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] and gpu["resources"]["GPU"] >= 1
    assert nodes["cpu_worker"]["min_workers"] >= 1  # the API's replicas need a CPU node
    assert config["idle_timeout_minutes"] > 0 and config["upscaling_speed"] > 0


def test_commands_install_the_project_start_the_api_and_keep_token_auth_on():
    config = prepared(load())
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "ray[default,train,serve]==2.60.0" in setup
    head = config["head_start_ray_commands"]
    start = next(c for c in head if "ray start --head" in c)
    assert "--dashboard-host=0.0.0.0" in start and "--metrics-export-port=8080" in start
    assert not any("6379" in c for c in head)  # Redis's port
    assert any("serve deploy" in c and "app.api.serve:app" in c for c in head)  # the job API on the head
    assert any("alembic" in c and "upgrade head" in c for c in head)
    for c in head + config["worker_start_ray_commands"]:
        if "ray start" in c:
            assert c.index("RAY_AUTH_MODE=token") < c.index("ray start"), c
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["file_mounts"]["/home/ray/raygrpo"] == "."
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-py311")  # the KubeRay image's base
    assert "raygrpo.env" in (ROOT / ".gitignore").read_text()  # the API's secrets never go into git


@pytest.mark.parametrize("path,value", [
    (("available_node_types", "gpu_worker", "min_workers"), "zero"),        # wrong type
    (("available_node_types", "gpu_worker", "max_worker"), 8),              # unknown field
    (("provider", "type"), "amazon"),                                       # bad enum: no such provider
    (("max_workers",), 0),                                                  # min_workers sum > max_workers
    (("head_node_type",), "gpu"),                                           # not a node type
    (("available_node_types", "gpu_worker", "min_workers"), 9),             # min > max of the type
])
def test_a_broken_copy_is_refused_by_ray(path, value):
    config = load()
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises((jsonschema.ValidationError, ValueError, NotImplementedError)):
        prepared(config)
