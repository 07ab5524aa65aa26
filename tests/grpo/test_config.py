"""The run config: validation names the field, YAML + overrides, and bad configs stop before Ray."""

from __future__ import annotations

import pytest

from grpo.config import ConfigError, GRPOConfig, load_config, parse_overrides


def test_defaults_and_derived_values(tiny_model_dir):
    cfg = GRPOConfig(model=tiny_model_dir, prompts_per_step=16, num_policy_workers=2, group_size=4)
    assert cfg.prompts_per_worker == 8
    assert cfg.completions_per_step == 64
    assert cfg.tokenizer_path == tiny_model_dir
    assert cfg.run_dir.name == "grpo"


def test_yaml_then_overrides(tmp_path, tiny_model_dir):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model: {tiny_model_dir}\ngroup_size: 4\nlearning_rate: 0.01\n")
    cfg = load_config(path, ["group_size=16", "async_rollouts=true", "--kl-coef=0.05"])
    assert cfg.group_size == 16 and cfg.async_rollouts is True
    assert cfg.learning_rate == 0.01 and cfg.kl_coef == 0.05


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("group_size=1", "group_size"),
        ("learning_rate=-1", "learning_rate"),
        ("loss_agg=token-sum", "loss_agg"),
        ("kl_estimator=k4", "kl_estimator"),
        ("temperature=0", "temperature"),
        ("no_such_key=3", "no_such_key"),
        ("prompts_per_step=15", "prompts_per_step"),
        ("strategy=zero3", "strategy"),
        ("dataset=/nonexistent/rows.jsonl", "dataset"),
        ("run_name=../escape", "run_name"),
    ],
)
def test_bad_values_name_the_field(tiny_model_dir, override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model={tiny_model_dir}", "num_policy_workers=2", override])
    assert field in str(err.value)


def test_unknown_key_is_called_unknown(tiny_model_dir):
    with pytest.raises(ConfigError, match="grup_size: unknown key"):
        load_config(None, {"model": tiny_model_dir, "grup_size": 4})


def test_missing_model_path_and_not_a_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="model: no such directory"):
        load_config(None, {"model": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model: .* is not a Hugging Face model directory"):
        load_config(None, {"model": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="model"):
        load_config(None, {})


def test_hub_ids_are_accepted_without_a_local_dir():
    # Real users name hub models; nothing is downloaded at validation time.
    assert GRPOConfig(model="Qwen/Qwen2.5-0.5B-Instruct").model == "Qwen/Qwen2.5-0.5B-Instruct"


def test_dataset_sets_task(tmp_path, tiny_model_dir):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "1+1=", "expected_outcome": "2"}\n')
    cfg = GRPOConfig(model=tiny_model_dir, dataset=str(rows))
    assert cfg.task == "jsonl"
    with pytest.raises(ConfigError, match="dataset: required"):
        load_config(None, {"model": tiny_model_dir, "task": "jsonl"})


def test_override_syntax():
    assert parse_overrides(["a=1", "b=x", "c=[1, 2]", "d="]) == {"a": 1, "b": "x", "c": [1, 2], "d": None}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["justakey"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_cli_rejects_bad_config_before_ray_starts(tiny_model_dir, capsys):
    import ray

    from grpo.run import main

    was_up = ray.is_initialized()
    assert main([f"model={tiny_model_dir}", "group_size=100"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert ray.is_initialized() == was_up
    assert main([f"model={tiny_model_dir}", "reward=no_such_module:score"]) == 2
    assert "reward" in capsys.readouterr().err
    assert ray.is_initialized() == was_up


def test_config_reference_doc_is_current():
    from pathlib import Path

    from grpo.config import config_reference

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text() == config_reference(), "regenerate: python -m grpo.config > docs/config.md"
    assert "| `group_size` | int | `8` | >= 2, <= 64 | completions sampled per prompt |" in doc.read_text()


def test_reward_actors_may_ask_for_a_custom_resource(tiny_model_dir):
    """reward_worker_resources places reward actors (and the user code they sandbox) on a group of the operator's
    choosing, e.g. the gVisor group of kuberay/raycluster.yaml: each reward actor's bundle carries it."""
    from grpo.run import actor_bundles

    cfg = load_config(None, {"model": tiny_model_dir, "num_rollout_workers": 1, "num_reward_workers": 2,
                             "reward_worker_resources": {"sandbox": 1}})
    assert actor_bundles(cfg) == [{"CPU": 1.0}, {"CPU": 0.5, "sandbox": 1.0}, {"CPU": 0.5, "sandbox": 1.0}]
    for bad in ({"CPU": 1}, {"sandbox": 0}, {"": 1}):
        with pytest.raises(ConfigError, match="reward_worker_resources"):
            load_config(None, {"model": tiny_model_dir, "reward_worker_resources": bad})


def test_a_model_folder_is_checked_without_transformers_and_deeply_where_asked(tmp_path, tiny_model_dir):
    """A run's own process checks the model folder from its files (importing transformers there costs every
    start 2-3 s of CPU); the job API asks for the deep check, which also has transformers parse the config."""
    import shutil
    import subprocess
    import sys

    from grpo.run import check_model

    def broken(name: str, config: str):
        path = tmp_path / name
        shutil.copytree(tiny_model_dir, path)
        (path / "config.json").write_text(config)
        return str(path)

    check_model("model", tiny_model_dir, deep=True)
    for config, words in [('{"model_type": "llama"', "not a loadable model"), ("[1, 2]", "names no model_type"),
                          ('{"hidden_size": 8}', "names no model_type")]:
        for deep in (False, True):
            with pytest.raises(ConfigError, match=f"model: .* {words}"):
                check_model("model", broken(f"m{len(list(tmp_path.iterdir()))}", config), deep=deep)
    unknown = broken("unknown", '{"model_type": "no-such-architecture"}')
    check_model("model", unknown)  # left to the workers that load it
    with pytest.raises(ConfigError, match="model: .* not a loadable model: .*no-such-architecture"):
        check_model("model", unknown, deep=True)
    probe = ("import sys; from grpo.run import check_model; check_model('model', sys.argv[1]); "
             "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", probe, tiny_model_dir], check=True)
