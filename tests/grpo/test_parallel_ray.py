"""The distributed strategies on a real local Ray, CPU and gloo: the real train_loop with 2 policy workers
for DDP and FSDP2, each in fp32 and bf16 mixed precision. One step's update equals a single worker's on
the same batch (the batch is the same because sampling is seeded by each prompt's place in the step's
batch, not by the worker); an FSDP2 run stopped and resumed from its sharded checkpoint reaches exactly
the optimizer state of an uninterrupted one. What a CPU cannot show (NCCL, bf16 kernels on a GPU) is in
bench/gpu_check.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grpo import parallel
from grpo.config import GRPOConfig
from grpo.run import run

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def digit_model(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with its output layer turned towards the digits: a random-init policy almost never
    emits the named digit, so every group would be flat and a step would have nothing to update on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    digits = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
    digits[ord("0") : ord("9") + 1] = True  # byte-level vocabulary: a digit's id is its byte
    with torch.no_grad():
        model.lm_head.weight[~digits] = 0.0
        model.lm_head.weight[digits] *= 30.0
    out = tmp_path_factory.mktemp("digits") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def _cfg(tiny_model_dir: str, tmp_path: Path, name: str, **over) -> GRPOConfig:
    # 2 rollout actors in every run: one worker splits its 8 prompts over both, two workers take one each,
    # so the same prompts reach the same sampler with the same seed either way.
    base = dict(model=tiny_model_dir, output_dir=str(tmp_path / "runs"), run_name=name, prompts_per_step=8,
                group_size=4, max_new_tokens=6, num_steps=1, checkpoint_interval=0, eval_size=0,
                learning_rate=1e-3, kl_coef=0.02, num_rollout_workers=2, num_reward_workers=1,
                cpus_per_worker=1, cpus_per_reward_worker=0.5)
    return GRPOConfig(**{**base, **over})


def _weights(path: str | Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(str(path)).state_dict().items()}


def _checkpoints(cfg: GRPOConfig) -> dict[int, Path]:
    """The run's checkpoints by step."""
    found = {}
    for state in cfg.run_dir.glob("checkpoint_*/trainer_state.pt"):
        found[int(torch.load(state, weights_only=False)["step"])] = state.parent
    return found


def _update_gap(base: dict, a: dict, b: dict) -> tuple[float, float]:
    """How far update b is from update a: relative norm of the difference, and the share of weights whose
    updates differ by more than a tenth of the learning rate's step."""
    da = torch.cat([(a[k] - base[k]).flatten() for k in base])
    db = torch.cat([(b[k] - base[k]).flatten() for k in base])
    rel = float((da - db).norm() / da.norm())
    frac = float(((da - db).abs() > 1e-4).float().mean())
    return rel, frac


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_workers_make_the_one_worker_update_with_ddp_and_fsdp2(ray_session, digit_model, tmp_path, dtype):
    initial = _weights(digit_model)
    one: dict[str, dict] = {}
    # fp32: one single-worker baseline serves both strategies (the same math). bf16: FSDP2's mixed precision
    # (every op in bf16, fp32 gradients and update) against one worker under the same policy; DDP's bf16 is
    # autocast around the same code whose fp32 equivalence the fp32 case shows.
    strategies = ("ddp", "fsdp") if dtype == "float32" else ("fsdp",)
    for strategy in ("ddp",) if dtype == "float32" else ("fsdp",):
        single = run(_cfg(digit_model, tmp_path, f"one-{strategy}-{dtype}", dtype=dtype, strategy=strategy))
        assert single.status == "completed", single.error
        assert single.last_metrics["reward_std"] > 0  # the batch had signal: the update is a real one
        one[strategy] = _weights(single.checkpoint)
        assert _update_gap(initial, one[strategy], initial)[0] == 1.0  # the step moved the policy
    for strategy in strategies:
        cfg = _cfg(digit_model, tmp_path, f"two-{strategy}-{dtype}", dtype=dtype, strategy=strategy,
                   num_policy_workers=2)
        result = run(cfg)
        assert result.status == "completed", result.error
        rel, frac = _update_gap(initial, one[strategy] if strategy in one else one["ddp"], _weights(result.checkpoint))
        # fp32: the same sums in another order. bf16: the same bf16 compute, fp32 gradients and update;
        # Adam's first step is lr * g/|g|, so only weights with a near-zero gradient can differ.
        assert rel < (0.02 if dtype == "float32" else 0.1), (strategy, rel, frac)
        assert frac < (0.002 if dtype == "float32" else 0.02), (strategy, rel, frac)
        shards = sorted(p.name for p in (Path(result.checkpoint) / parallel.SHARDS_DIR).glob("*.distcp"))
        assert len(shards) == 2, shards  # one shard a worker, merged into one checkpoint
        # the trajectories of both workers reached the log, once
        rows = [json.loads(x) for x in (cfg.run_dir / "trajectories.jsonl").read_text().splitlines()]
        assert len(rows) == 8 * 4
        # the fullest policy rank's peak resident memory that step: at least the loaded libraries and model
        steps = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(0.2 < s["peak_memory_gib"] < 16 for s in steps), [s.get("peak_memory_gib") for s in steps]
        # where each rank ran: both on this one-node cluster's node
        import ray

        node = ray.get_runtime_context().get_node_id()
        assert result.rank_nodes == [node, node]
        assert json.loads((cfg.run_dir / "summary.json").read_text())["rank_nodes"] == [node, node]


@pytest.mark.long
def test_an_fsdp2_run_resumed_from_its_sharded_checkpoint_continues_exactly(ray_session, digit_model, tmp_path):
    over = dict(strategy="fsdp", num_policy_workers=2, checkpoint_interval=1, keep_checkpoints=2)
    whole = _cfg(digit_model, tmp_path, "whole", num_steps=2, **over)
    assert run(whole).status == "completed"
    first = _cfg(digit_model, tmp_path, "stopped", num_steps=1, **over)
    assert run(first).status == "completed"
    again = _cfg(digit_model, tmp_path, "stopped", num_steps=2, **over)  # the same run dir: resumes
    resumed = run(again)
    assert resumed.status == "completed" and resumed.steps == 2, resumed.error
    metrics = [json.loads(x) for x in (again.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # step 2 ran once, after the resume

    a, b = (parallel.read_sharded(_checkpoints(c)[2]) for c in (whole, again))
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys() and a["optim"]["state"]
    for name, state in a["optim"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(b["optim"]["state"][name][key], state[key], rtol=0, atol=1e-7)
    for name, weight in a["model"].items():
        torch.testing.assert_close(b["model"][name], weight, rtol=0, atol=1e-7)


def test_dynamic_sampling_refills_the_flat_groups_to_a_full_batch(ray_session, digit_model, tmp_path):
    """The digit-leaning policy emits some digits and never others: the groups of the digits it never
    emits are flat (all 0) and dropped. Refill rounds draw more prompts until the batch is full again."""
    import ray

    from grpo.run import build_actors
    from grpo.trainer import collect

    cfg = _cfg(digit_model, tmp_path, "dyn", dynamic_sampling=True, max_sampling_rounds=0, kl_coef=0.0)
    handles = build_actors(cfg)
    try:
        kw = dict(rank=0, world=1, actors=handles["rollout_actors"], reward_actors=handles["reward_actors"],
                  min_version=0)
        once = collect(cfg, cfg.load_dataset(), 1, **kw)
        full = 8 * 4
        assert once.sampling_rounds == 0 and 0 < once.batch.num_seqs < full  # some groups were flat
        refill = cfg.model_copy(update={"max_sampling_rounds": 8})
        got = collect(refill, refill.load_dataset(), 1, **kw)
        assert got.batch.num_seqs == full and got.sampling_rounds >= 1  # the update gets the full batch
        kept = got.batch.keep.view(-1, 4).all(dim=1)
        assert all(float(got.batch.rewards.view(-1, 4)[i].std()) > 0 for i in kept.nonzero().flatten())
        # the round-0 groups are the same as without refill: refill only appends
        assert got.samples[: len(once.samples)] == once.samples
    finally:
        for h in handles["rollout_actors"] + handles["reward_actors"]:
            ray.kill(h)


def test_warmup_with_kl_on_two_workers_keeps_its_reference_across_a_resume(ray_session, tmp_path):
    """The warm-up's policy becomes the KL reference on every rank (rank 1 used to get an empty state dict
    and crash), and the checkpoint carries it, so a resumed run keeps it instead of the base model. Under
    FSDP2, where the reference is sharded like the policy: copied shard by shard, gathered only to save."""
    from grpo.tiny import save_tiny_model
    from grpo.trainer import REFERENCE_DIR

    model = save_tiny_model(tmp_path / "tiny", hidden_size=64, num_layers=2, seed=0)
    over = dict(environment="calculator", tool_instructions=False, max_new_tokens=16, max_trajectory_tokens=48,
                max_steps_per_trajectory=2, sft_warmup_steps=3, sft_learning_rate=2e-3, kl_coef=0.05,
                num_policy_workers=2, prompts_per_step=4, group_size=2, strategy="fsdp")
    first = run(_cfg(str(model), tmp_path, "warm", num_steps=1, **over))
    assert first.status == "completed", first.error
    ref = _weights(Path(first.checkpoint) / REFERENCE_DIR)
    base = _weights(model)
    assert any(not torch.equal(ref[k], base[k]) for k in base)  # the warm-up's policy, not the base model
    resumed = run(_cfg(str(model), tmp_path, "warm", num_steps=2, **over))
    assert resumed.status == "completed" and resumed.steps == 2, resumed.error
    # an agent run's record: the warm-up's loss once, tool use per step, every trajectory with its turns
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "warm" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["sft_warmup_loss"] > 0
    assert all(0 <= m["tool_use_rate"] <= 1 and "env_reward_mean" in m for m in metrics)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "warm" / "trajectories.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * 2 and all(r["steps"] and "action" in r["steps"][0] for r in rows)
    for k, v in _weights(Path(resumed.checkpoint) / REFERENCE_DIR).items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)  # the same reference after the resume
