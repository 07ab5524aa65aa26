"""grpo.parallel and the learner's use of it, in one process: collectives on the worker's device, equal
micro-batch counts on every rank, fp32 master weights under bf16 compute, bounded async loss.
The same code on 2 Ray Train workers: test_parallel_ray.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from grpo import parallel
from grpo.config import GRPOConfig
from grpo.learner import Learner, score_batch
from grpo.rollout import RolloutWorker


class Reached(Exception):
    """Raised by the stand-in all_reduce once it has seen the tensor."""


def test_every_collective_takes_its_tensor_on_the_workers_device(monkeypatch):
    """On GPUs Ray Train's process group is NCCL, which cannot reduce a CPU tensor. `meta` stands in for
    the GPU here: what reaches all_reduce must be on the device the worker reports, never the CPU."""
    seen: list[torch.device] = []

    def all_reduce(t: torch.Tensor, op=None) -> None:
        seen.append(t.device)
        raise Reached

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    c = parallel.Collectives(torch.device("meta"))
    for reduce in (c.sum, c.max):
        with pytest.raises(Reached):
            reduce([1.0, 2.0])
    assert seen == [torch.device("meta")] * 2


def test_collectives_without_a_process_group_are_the_identity():
    c = parallel.Collectives(torch.device("cpu"))
    assert c.sum([1.5, 2.0]) == [1.5, 2.0] and c.max([3.0]) == [3.0]


@pytest.fixture(scope="module")
def rollout(tiny_model_dir):
    worker = RolloutWorker(tiny_model_dir)
    ro = worker.generate(["digit 1:", "digit 2:"], group_size=4, max_new_tokens=5, seed=3)
    return worker.pad_id, ro


def _learner(tiny_model_dir: str, pad_id: int, *, dtype: str = "float32", **over) -> Learner:
    from transformers import AutoModelForCausalLM

    cfg = GRPOConfig(model=tiny_model_dir, max_new_tokens=5, group_size=4, dtype=dtype, kl_coef=0.0,
                     micro_batch_size=4, **over)
    model = parallel.wrap_policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir), strategy="ddp",
                                 dtype=dtype, device=torch.device("cpu"))
    return Learner(cfg, model, ref_model=None, pad_id=pad_id)


def _step(learner: Learner, ro, rewards) -> tuple[dict, dict[str, torch.Tensor]]:
    batch = score_batch(ro, rewards, learner.cfg)
    before = {k: v.detach().clone() for k, v in learner.base_model.state_dict().items()}
    stats = learner.step(batch, num_tokens=batch.num_tokens, num_seqs=batch.num_seqs)
    return stats, {k: before[k] - v for k, v in learner.base_model.state_dict().items()}


def test_a_rank_with_fewer_micro_batches_runs_zero_weight_passes_to_match(tiny_model_dir, rollout, monkeypatch):
    """Dynamic sampling can leave ranks different numbers of groups; every rank must still run as many
    forward/backward passes as the busiest (FSDP2 gathers weights in each). The extra passes add nothing."""
    pad_id, ro = rollout
    rewards = [float(i % 2) for i in range(8)]
    plain = _learner(tiny_model_dir, pad_id, share_prompt_prefix=False)
    _, update = _step(plain, ro, rewards)

    padded = _learner(tiny_model_dir, pad_id, share_prompt_prefix=False)  # one forward per micro-batch
    monkeypatch.setattr(padded.collectives, "max", lambda values: [5.0])  # the busiest rank has 5
    calls = []
    forward = padded.model.forward
    monkeypatch.setattr(padded.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    _, padded_update = _step(padded, ro, rewards)
    assert len(calls) == 5  # 2 groups of 4 = 2 micro-batches of its own, 3 zero-weight passes
    for k, v in update.items():
        torch.testing.assert_close(padded_update[k], v, rtol=1e-5, atol=1e-7)


def test_bf16_mixed_precision_keeps_fp32_master_weights_and_small_updates(tiny_model_dir, rollout):
    """At lr 1e-6 a pure-bf16 weight mostly cannot move (its spacing near 0.05 is ~2e-4); mixed precision keeps
    fp32 masters and AdamW state, so the update lands."""
    pad_id, ro = rollout
    rewards = [float(i % 2) for i in range(8)]
    learner = _learner(tiny_model_dir, pad_id, dtype="bfloat16", learning_rate=1e-6)
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    _, update = _step(learner, ro, rewards)
    moved = sum(int((u != 0).sum()) for u in update.values()) / sum(u.numel() for u in update.values())
    assert moved > 0.5
    state = next(iter(learner.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32

    pure = {k: v.to(torch.bfloat16) for k, v in learner.base_model.state_dict().items()}
    stepped = {k: (v.float() - 1e-6 * torch.sign(v.float())).to(torch.bfloat16) for k, v in pure.items()}
    # pure bf16: only weights within ~1e-4 of zero (a few percent) have a spacing fine enough to move
    assert sum(int((stepped[k] != pure[k]).sum()) for k in pure) < 0.05 * sum(v.numel() for v in pure.values())


def test_async_loss_stays_bounded_however_stale_the_sampler(tiny_model_dir, rollout):
    """Sampler log-probs of -30 (a policy that has moved far since): the truncated importance weights
    cap each token's contribution at tis_cap, so the loss is of the advantages' size, not e^30."""
    pad_id, ro = rollout
    stale = type(ro)(**{**ro.__dict__, "logprobs": torch.full_like(ro.logprobs, -30.0)})
    rewards = [float(i % 2) for i in range(8)]
    learner = _learner(tiny_model_dir, pad_id, async_rollouts=True, tis_cap=2.0)
    stats, update = _step(learner, stale, rewards)
    assert abs(stats["loss"]) <= 2.0 * 1.1 and stats["is_clip_frac"] == pytest.approx(1.0)
    assert all(torch.isfinite(u).all() for u in update.values())
