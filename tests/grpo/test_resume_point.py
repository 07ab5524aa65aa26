"""Where a restarted worker group resumes: the newest checkpoint complete on storage, even one Ray Train's
controller had not registered when the workers died (grpo.trainer.resume_point)."""

from __future__ import annotations

from pathlib import Path

import torch

from grpo import parallel
from grpo.trainer import STATE_FILE, checkpoint_step, resume_point


def _checkpoint(run_dir: Path, step: int, *, world: int = 2) -> Path:
    """A checkpoint folder as the trainer leaves it once every rank's upload finished."""
    import torch.distributed.checkpoint as dcp

    d = run_dir / f"checkpoint_{step:04d}"
    (d / "rng").mkdir(parents=True)
    torch.save({"step": step, "config": {"num_policy_workers": world}}, d / STATE_FILE)
    for r in range(world):
        torch.save({"torch_rng": torch.get_rng_state()}, d / "rng" / f"rank{r}.pt")
    dcp.save({"model": {"w": torch.full((64, 64), float(step))}}, checkpoint_id=str(d / parallel.SHARDS_DIR))
    return d


def test_a_checkpoint_counts_only_when_every_part_is_there_in_full(tmp_path):
    d = _checkpoint(tmp_path, 3)
    assert checkpoint_step(d) == 3
    (d / "rng" / "rank1.pt").unlink()  # rank 1's upload never happened
    assert checkpoint_step(d) is None
    d = _checkpoint(tmp_path, 6)
    shard = next((d / parallel.SHARDS_DIR).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # an upload cut short
    assert checkpoint_step(d) is None
    assert checkpoint_step(tmp_path / "missing") is None


def test_the_newest_complete_checkpoint_wins_over_an_older_registered_one(tmp_path):
    from ray.train import Checkpoint

    three, six = _checkpoint(tmp_path, 3), _checkpoint(tmp_path, 6)
    registered = Checkpoint.from_directory(str(three))
    assert Path(resume_point(registered, tmp_path).path) == six  # 6 was written, never registered
    assert Path(resume_point(None, tmp_path).path) == six  # nothing registered: not from step 0
    assert resume_point(Checkpoint.from_directory(str(six)), tmp_path).path == str(six)
    (six / STATE_FILE).write_bytes(b"partial")
    assert Path(resume_point(registered, tmp_path).path) == three  # 6 is not complete: Ray's choice stands
    assert resume_point(None, tmp_path / "empty") is None
    remote = Checkpoint(str(tmp_path / "other-node" / "checkpoint_9"))
    assert resume_point(remote, tmp_path) is remote  # not a folder here (remote storage): nothing to compare
