"""Publishing weights to the rollout side: bounded buckets gathered from the shards, and a weight board whose
objects outlive the trainer worker that made them."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import fsdp_buckets, run_ranks
from transformers import AutoModelForCausalLM

from grpo import parallel
from grpo.board import WeightBoard
from grpo.rollout import RolloutWorker


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_buckets_are_bounded_and_together_are_the_whole_model_in_the_compute_dtype(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    limit = 300_000
    buckets = list(parallel.weight_buckets(model, dtype=torch.bfloat16, bucket_bytes=limit))
    assert len(buckets) > 3
    for b in buckets:  # over the limit only when one tensor alone is larger
        assert sum(map(_tensor_bytes, b.values())) <= limit or len(b) == 1
    merged = {k: v for b in buckets for k, v in b.items()}
    sd = model.state_dict()
    assert merged.keys() == sd.keys()
    for k, v in sd.items():
        assert merged[k].dtype == torch.bfloat16
        torch.testing.assert_close(merged[k], v.to(torch.bfloat16), atol=0, rtol=0, msg=k)


def test_fsdp2_buckets_on_two_ranks_gather_everything_to_rank_0_only(tiny_model_dir, tmp_path):
    ranks = run_ranks(fsdp_buckets, tmp_path, tiny_model_dir, 400_000)
    zero, one = ranks
    assert one["buckets"] == [] and one["full_keys"] == [], "rank 1 gathers with rank 0 but keeps nothing"
    merged = {k: v for b in zero["buckets"] for k, v in b.items()}
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert sorted(merged) == sorted(reference) == zero["full_keys"]
    for k, v in reference.items():
        torch.testing.assert_close(merged[k], v.to(torch.bfloat16), atol=0, rtol=0, msg=k)
    assert len(zero["buckets"]) > 1


def test_the_board_hands_out_weights_after_rank_0_died_and_forgets_a_lost_attempt(ray_session, tiny_model_dir):
    """Ray Train restarts the worker group (rank 0 died after publishing version 12) from the checkpoint of
    step 10, and a rollout actor restarts after that: it must get the resumed attempt's weights, never an
    object whose owner is gone nor the lost attempt's newer version."""
    ray = ray_session

    class _Rank0:
        """Stands in for trainer rank 0: sends buckets to the board and posts the version, as trainer.publish does."""

        def publish(self, board, model_dir: str, version: int, scale: float, restart: bool) -> int:
            import ray

            model = AutoModelForCausalLM.from_pretrained(model_dir)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(scale)
            puts = [board.put.remote(parallel.pack_bucket(bucket))  # as trainer.publish sends them
                    for bucket in parallel.weight_buckets(model, dtype=torch.float32, bucket_bytes=500_000)]
            return len(ray.get(board.publish.remote(version, puts, restart)))

    board = ray.remote(num_cpus=0)(WeightBoard).remote()
    lost = ray.remote(num_cpus=0)(_Rank0).remote()
    assert ray.get(lost.publish.remote(board, tiny_model_dir, 12, 2.0, False)) > 1
    ray.kill(lost, no_restart=True)  # the owner of anything it put is gone

    Actor = ray.remote(num_cpus=0)(RolloutWorker)
    reader = Actor.remote(tiny_model_dir, weight_board=board)
    assert ray.get(reader.pull_weights.remote(12)) == 12  # the board's own objects: still there
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    got = ray.get(reader.state_dict.remote())
    torch.testing.assert_close(got["lm_head.weight"], base["lm_head.weight"] * 2.0)

    resumed = ray.remote(num_cpus=0)(_Rank0).remote()
    ray.get(resumed.publish.remote(board, tiny_model_dir, 10, 3.0, True))  # the resumed attempt's first publish
    assert ray.get(board.latest.remote())[0] == 10
    ray.kill(reader, no_restart=True)
    restarted = Actor.remote(tiny_model_dir, weight_board=board)
    assert ray.get(restarted.pull_weights.remote(10)) == 10
    got = ray.get(restarted.state_dict.remote())
    torch.testing.assert_close(got["lm_head.weight"], base["lm_head.weight"] * 3.0)
    with pytest.raises(ray.exceptions.RayTaskError, match="version 10, 11 needed"):
        ray.get(restarted.pull_weights.remote(11))
    for h in (resumed, restarted, board):
        ray.kill(h, no_restart=True)


def test_load_weights_refuses_buckets_that_do_not_cover_the_model(tiny_model_dir):
    worker = RolloutWorker(tiny_model_dir)
    sd = worker.state_dict()
    part = dict(list(sd.items())[:3])
    with pytest.raises(ValueError, match="missing="):
        worker.load_weights([part], 1)
    assert worker.load_weights([dict(list(sd.items())[:5]), dict(list(sd.items())[5:])], 2) == 2


def test_a_tied_head_is_sent_once_and_the_receiver_stays_tied(tmp_path):
    from grpo.tiny import save_tiny_model

    path = str(save_tiny_model(tmp_path / "tied", hidden_size=32, num_layers=1, num_heads=2, tie_embeddings=True))
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    buckets = list(parallel.weight_buckets(model, dtype=torch.float32, bucket_bytes=1 << 30))
    sent = [k for b in buckets for k in b]
    assert "model.embed_tokens.weight" in sent and "lm_head.weight" not in sent
    worker = RolloutWorker(path)
    assert worker.load_weights(buckets, 3) == 3
    torch.testing.assert_close(worker.model.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("shard_bytes", [2 << 30, 300_000])
def test_the_checkpoint_export_is_a_hugging_face_directory_written_a_file_at_a_time(tiny_model_dir, tmp_path,
                                                                                     shard_bytes):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    parallel.save_hf(model, tmp_path / "out", shard_bytes=shard_bytes)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    if shard_bytes > 1 << 30:
        assert files == ["model.safetensors"]
    else:  # HF's names and index, each file bounded (a tensor larger than the bound alone in its file)
        assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0, msg=k)
    assert loaded.generation_config.to_dict() == model.generation_config.to_dict()
