"""What a request may make the cluster import or read (app/jobs/trust.py, grpo/plugins.py): import paths
only from the operator's allow-list, rewards and environments as built-ins or installed plugins (entry
points), local models only under the model roots. Refusals happen before anything is imported, loaded
or started, name the field, and create no job."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
from fastapi.testclient import TestClient
from raygrpo_test_services import bearer

from app.settings import Settings

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(4)]
PLUGIN = "raygrpo_plugin_probe"


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """An installed distribution with a reward and an environment entry point, and a module whose import
    leaves a marker file (so a test sees whether anything imported it)."""
    root = tmp_path / "site"
    (root / f"{PLUGIN}-1.0.dist-info").mkdir(parents=True)
    (root / f"{PLUGIN}-1.0.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 1.0\n")
    (root / f"{PLUGIN}-1.0.dist-info" / "entry_points.txt").write_text(
        f"[raygrpo.rewards]\nprobe_reward = {PLUGIN}:score\n\n[raygrpo.environments]\nprobe_env = {PLUGIN}:ProbeEnv\n")
    marker = tmp_path / "imported"
    (root / f"{PLUGIN}.py").write_text(textwrap.dedent("""
        def score(prompt, completion, expected):
            return 1.0 if completion.strip() == expected else 0.0

        class ProbeEnv:
            pass
        """))
    (root / "evil_probe.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                        "def fn(*a):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(root))
    yield root, marker
    for name in (PLUGIN, "evil_probe"):
        sys.modules.pop(name, None)


def make_client(tmp_path, tiny_model_dir, **over):
    from app.api.main import create_app

    settings = Settings(**({"home": tmp_path / "home", "database_url": None, "redis_url": None,
                            "default_model": tiny_model_dir, "rate_limits": {"default": 0}} | over))
    return TestClient(create_app(settings), headers=bearer(settings, role="researcher"))


def start(client, **config):
    body = {"jsonrpc": "2.0", "id": 1, "method": "training.start_grpo",
            "params": {"agent_id": "a", "training_data": ROWS, "config": {"n_iterations": 2, "batch_size": 2,
                                                                            "max_budget_usd": "1", **config}}}
    return client.post("/api/v1/jsonrpc", json=body).json()


def jobs(client):
    body = {"jsonrpc": "2.0", "id": 2, "method": "training.list_jobs", "params": {}}
    return client.post("/api/v1/jsonrpc", json=body).json()["result"]["jobs"]


@pytest.mark.parametrize("spec", ["os:getcwd", "subprocess:getoutput", "builtins:exec", "evil_probe:fn",
                                  "grpo.rewards:exact_match"])
def test_an_import_path_not_on_the_allow_list_is_refused_before_it_is_imported(tmp_path, tiny_model_dir,
                                                                               plugin_dir, spec):
    _, marker = plugin_dir
    with make_client(tmp_path, tiny_model_dir) as c:
        err = start(c, reward=spec)["error"]
        assert err["code"] == -40002 and err["data"]["field"] == "config.reward", err
        assert "RAYGRPO_ALLOWED_REWARDS" in err["message"]
        assert jobs(c) == []
    assert not marker.exists() and "evil_probe" not in sys.modules


@pytest.mark.parametrize("spec", ["os:fork", "os:abort", "evil_probe:fn"])
def test_an_environment_import_path_is_refused_unless_allowed(tmp_path, tiny_model_dir, plugin_dir, spec):
    _, marker = plugin_dir
    with make_client(tmp_path, tiny_model_dir) as c:
        err = start(c, agent={"environment": spec})["error"]
        assert err["code"] == -40002 and err["data"]["field"] == "config.agent.environment", err
        assert jobs(c) == []
    assert not marker.exists()


def test_an_allow_listed_import_path_and_installed_plugins_are_accepted(tmp_path, tiny_model_dir, plugin_dir):
    _, marker = plugin_dir
    with make_client(tmp_path, tiny_model_dir, allowed_rewards=["evil_probe:fn"]) as c:
        assert "result" in start(c, reward="evil_probe:fn")
        assert marker.exists()  # allowed, so it was imported (and probed) at start_grpo
        assert "result" in start(c, reward="probe_reward")  # a plugin, by its entry point's name
        assert len(jobs(c)) == 2


def test_plugins_resolve_by_name_in_the_engine(plugin_dir):
    from grpo.agents.environments import environment_class
    from grpo.rewards import RewardError, names, resolve

    assert "probe_reward" in names() and "exact_match" in names()
    assert resolve("probe_reward")("p", " 3", "3") == 1.0
    assert environment_class("probe_env").__name__ == "ProbeEnv"
    with pytest.raises(RewardError, match="unknown reward 'nope'.*probe_reward"):
        resolve("nope")
    with pytest.raises(ValueError, match="unknown environment 'nope'.*probe_env"):
        environment_class("nope")


def test_local_models_must_lie_under_the_model_roots(tmp_path, tiny_model_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    roots = tmp_path / "roots"
    (roots / "ours").mkdir(parents=True)
    os.symlink(tiny_model_dir, roots / "ours" / "model")  # a link into the default model's folder: allowed
    escape = tmp_path / "home" / "models"
    escape.mkdir(parents=True)
    os.symlink(outside, escape / "sneaky")  # a link under a root that leads out of it: refused
    with make_client(tmp_path, tiny_model_dir, model_roots=[roots]) as c:
        for model in ["/etc", str(outside), "../../../etc/passwd", "~/.ssh", str(escape / "sneaky"),
                      "org/../../etc", "a" * 300]:
            err = start(c, model=model)["error"]
            assert err["code"] in (-40002, -32602), (model, err)
            assert "config.model" in (err["data"].get("field", "") + err["message"]), (model, err)
        err = start(c, engine={"tokenizer": "/etc"})["error"]
        assert err["data"]["field"] == "config.engine.tokenizer", err
        assert jobs(c) == []
        assert "result" in start(c, model=str(roots / "ours" / "model"))
        assert "result" in start(c, model="HuggingFaceTB/SmolLM2-135M-Instruct")  # a Hub id: not fetched here
    with make_client(tmp_path / "b", tiny_model_dir, allow_hub_models=False) as c:
        err = start(c, model="HuggingFaceTB/SmolLM2-135M-Instruct")["error"]
        assert err["data"]["field"] == "config.model" and "RAYGRPO_ALLOW_HUB_MODELS" in err["message"]


def test_a_reward_given_as_source_is_probed_in_the_sandbox_at_start(tmp_path, tiny_model_dir):
    good = "def reward(prompt, completion, expected):\n    return float(completion.strip() == expected)\n"
    with make_client(tmp_path, tiny_model_dir) as c:
        assert "result" in start(c, reward_source=good)
        err = start(c, reward_source="def reward(:\n")["error"]
        assert err["code"] == -40002 and "SyntaxError" in err["message"], err
        err = start(c, reward_source="import os\ndef reward(p, c, e):\n    return os.getcwd()\n")["error"]
        assert err["code"] == -40002 and "not a number" in err["message"], err
        err = start(c, reward="digit", reward_source=good)["error"]
        assert err["code"] == -40002 and err["data"]["field"] == "config.reward_source", err
        assert len(jobs(c)) == 1


def test_a_model_that_cannot_load_is_refused_before_it_is_queued(tmp_path, tiny_model_dir):
    import shutil

    models = tmp_path / "home" / "models"
    no_weights, bad_config = models / "no-weights", models / "bad-config"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors*", "*.bin"))
    shutil.copytree(tiny_model_dir, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "no-such-architecture"')
    with make_client(tmp_path, tiny_model_dir) as c:
        for model, words in [(no_weights, "no weights"), (bad_config, "not a loadable model")]:
            err = start(c, model=str(model))["error"]
            assert err["code"] == -40002 and "model:" in err["message"] and words in err["message"], err
            assert len(err["message"]) < 600 and "Traceback" not in err["message"], err
        assert jobs(c) == []
