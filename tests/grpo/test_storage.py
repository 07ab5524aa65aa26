"""Run files at a URL (grpo.storage), against a real S3-compatible server on loopback (moto in server mode):
checkpoints found and judged complete in a bucket, the driver's files uploaded and continued by a resumed
driver, inputs staged once and copied once per node, and a local folder refused on nodes that do not see it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from test_resume_point import _checkpoint

from grpo import storage
from grpo.config import ConfigError, GRPOConfig
from grpo.report import LocalReporter
from grpo.run import check_shared_storage, latest_checkpoint, stage_inputs
from grpo.trainer import checkpoint_step, resume_point


def test_urls_and_local_paths():
    assert storage.is_url("s3://bucket/prefix") and storage.is_url("gs://b/x")
    assert not storage.is_url("/tmp/runs") and not storage.is_url("runs") and not storage.is_url("file:///tmp/x")
    assert storage.join("s3://b/p/", "run", "checkpoint_1") == "s3://b/p/run/checkpoint_1"
    assert storage.join("/tmp/p", "run") == "/tmp/p/run"
    with pytest.raises(ValueError, match="nope://x"):
        storage.resolve("nope://x")


def test_a_run_at_a_url_keeps_output_dir_as_given_and_a_local_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    cfg = GRPOConfig(model="HuggingFaceTB/SmolLM2-135M", storage="s3://b/runs", run_name="r1")
    assert cfg.output_dir == "s3://b/runs" and cfg.run_storage == "s3://b/runs/r1"
    assert cfg.run_dir.is_relative_to(tmp_path / "cache" / "runs")
    local = GRPOConfig(model="HuggingFaceTB/SmolLM2-135M", output_dir=str(tmp_path / "runs"), run_name="r1")
    assert local.run_storage == str(tmp_path / "runs" / "r1") == str(local.run_dir)


def test_checkpoints_in_a_bucket_are_judged_like_local_ones(tmp_path, s3_bucket):
    run = f"{s3_bucket}/runs/r"
    for step in (3, 6):
        storage.upload(_checkpoint(tmp_path / "local", step), storage.join(run, f"checkpoint_{step:04d}"))
    assert checkpoint_step(f"{run}/checkpoint_0003") == 3
    assert latest_checkpoint(run) == f"{run}/checkpoint_0006"
    chosen = resume_point(None, run)
    assert storage.url_of(chosen.filesystem, chosen.path) == f"{run}/checkpoint_0006"
    # an upload cut short: a shard shorter than the byte ranges the metadata names
    shards = f"{run}/checkpoint_0006/dcp"
    shard = next(n for n in storage.listdir(shards) if n.endswith(".distcp"))
    storage.write_bytes(f"{shards}/{shard}", storage.read_bytes(f"{shards}/{shard}")[:100])
    assert checkpoint_step(f"{run}/checkpoint_0006") is None
    assert latest_checkpoint(run) == f"{run}/checkpoint_0003"
    # a rank's RNG file missing
    fs, path = storage.resolve(f"{run}/checkpoint_0003/rng/rank1.pt")
    fs.delete_file(path)
    assert checkpoint_step(f"{run}/checkpoint_0003") is None and latest_checkpoint(run) is None
    assert resume_point(None, run) is None and latest_checkpoint(f"{s3_bucket}/nothing") is None


def test_the_drivers_files_reach_the_bucket_and_a_resumed_driver_continues_them(tmp_path, s3_bucket):
    run = f"{s3_bucket}/runs/r"
    first = LocalReporter(tmp_path / "a", storage_url=run, checkpoint_interval=2, sync_s=3600)
    for step in (1, 2, 3):
        first.on_trajectories([{"step": step, "text": f"t{step}"}])
        first.on_step({"step": step, "reward": step / 10})
    # step 2 is a checkpoint step: everything up to it is in the bucket before that checkpoint is written
    assert [json.loads(x)["step"] for x in storage.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()] == [1, 2]
    # the driver dies; another (on another machine) resumes from the checkpoint of step 2
    second = LocalReporter(tmp_path / "b", storage_url=run, checkpoint_interval=2, sync_s=3600)
    second.on_resume(2)
    second.on_trajectories([{"step": 3, "text": "again"}])
    second.on_step({"step": 3, "reward": 0.3})
    second.on_end("completed", error=None, summary={"steps": 3})
    metrics = [json.loads(x) for x in storage.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()]
    trajectories = [json.loads(x) for x in storage.read_bytes(f"{run}/trajectories.jsonl").decode().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and [t["step"] for t in trajectories] == [1, 2, 3]
    assert trajectories[-1]["text"] == "again"  # the re-run step once: the new attempt's
    assert json.loads(storage.read_bytes(f"{run}/summary.json"))["status"] == "completed"
    assert storage.is_file(f"{run}/curves.png")


def test_local_inputs_are_staged_once_and_copied_once_per_node(tmp_path, s3_bucket, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    cfg = GRPOConfig(model=tiny_model_dir, dataset=str(data), storage=f"{s3_bucket}/runs", run_name="r")
    staged = stage_inputs(cfg)
    assert staged.model == f"{s3_bucket}/runs/r/inputs/model/{Path(tiny_model_dir).name}"
    assert staged.dataset == f"{s3_bucket}/runs/r/inputs/dataset/data.jsonl" and staged.tokenizer is None
    assert set(storage.listdir(staged.model)) == {p.name for p in Path(tiny_model_dir).iterdir()}
    # a worker's view: what it loads is this node's copy, identical to the original
    worker = GRPOConfig(**staged.model_dump()).localized()
    assert Path(worker.model).is_relative_to(tmp_path / "cache")
    original = Path(tiny_model_dir) / "model.safetensors"
    assert (Path(worker.model) / "model.safetensors").read_bytes() == original.read_bytes()
    assert Path(worker.dataset).read_text() == data.read_text()
    assert GRPOConfig(**staged.model_dump()).localized().model == worker.model  # cached: not copied again
    # a resumed run stages nothing again (same sizes), and the copies on the node are not refreshed
    def mtimes() -> dict:
        fs, path = storage.resolve(staged.model)
        return {i.base_name: i.mtime for i in fs.get_file_info(pafs.FileSelector(path))}

    before = mtimes()
    assert stage_inputs(cfg).model == staged.model
    assert mtimes() == before
    # a local run is left alone
    local = GRPOConfig(model=tiny_model_dir, output_dir=str(tmp_path / "runs"))
    assert stage_inputs(local) is local


def test_a_missing_input_at_a_url_is_refused_naming_the_field(s3_bucket, tiny_model_dir):
    from grpo.run import preflight

    with pytest.raises(ConfigError, match="model: no such folder"):
        preflight(GRPOConfig(model=f"{s3_bucket}/models/none"))
    storage.upload(Path(tiny_model_dir) / "config.json", f"{s3_bucket}/models/half/config.json")
    with pytest.raises(ConfigError, match="model: .* holds no config.json and weights"):
        preflight(GRPOConfig(model=f"{s3_bucket}/models/half", tokenizer=tiny_model_dir))
    with pytest.raises(ConfigError, match="dataset: no such file"):
        preflight(GRPOConfig(model=tiny_model_dir, dataset=f"{s3_bucket}/data/none.jsonl"))


def test_a_local_folder_that_some_nodes_do_not_see_is_refused(tmp_path, monkeypatch):
    """The decision; the probe itself (a Ray task per node) runs in test_multinode_ray.py."""
    import ray

    nodes = [{"NodeID": f"{c}" * 40, "Alive": True, "Resources": {"CPU": 2.0}} for c in "abc"]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    cfg = GRPOConfig(model="HuggingFaceTB/SmolLM2-135M", output_dir=str(tmp_path / "runs"))
    seen: list[str] = []

    def probe(path: str, ids: list[str]) -> list[str]:
        seen.append(path)
        assert Path(path).is_file()  # the marker is there while the nodes look
        return ids[1:]

    with pytest.raises(ConfigError, match=r"output_dir: .* 2 of the cluster's 3 nodes do not see .*s3://"):
        check_shared_storage(cfg, probe=probe)
    assert not Path(seen[0]).exists()  # the marker is gone
    check_shared_storage(cfg, probe=lambda path, ids: [])  # a shared mount: accepted
    check_shared_storage(cfg.model_copy(update={"output_dir": "s3://b/runs"}), probe=probe)  # a URL: not probed
    assert len(seen) == 1
    monkeypatch.setattr(ray, "nodes", lambda: nodes[:1])
    check_shared_storage(cfg, probe=probe)  # one node: nothing to check
    assert len(seen) == 1
    shutil.rmtree(tmp_path / "runs")
