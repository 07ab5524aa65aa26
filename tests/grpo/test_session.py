"""Training sessions' input checks and losses (grpo.session), without Ray; the served path is in
tests/app/test_sessions_ray.py."""

import math

import pytest
import torch

from grpo.session import Limits, SessionInputError, SessionWorker, check_batch, row_losses

LIMITS = Limits(vocab_size=100, max_seq_len=8, max_rows=3, max_tokens=20)


@pytest.mark.parametrize(("data", "loss_fn", "config", "field"), [
    ([{"tokens": [1, 2]}], "kl", {}, "loss_fn"),
    ([{"tokens": [1, 2]}], "ppo", {}, "data[0].advantages"),
    ([{"tokens": [1, 2], "advantages": 1.0}], "ppo", {}, "data[0].logprobs"),
    ([{"tokens": [1, 2, 3], "weights": [1.0]}], "cross_entropy", {}, "data[0].weights"),
    ([{"tokens": [1, 200]}], "cross_entropy", {}, "data[0].tokens"),
    ([{"tokens": [1]}], "cross_entropy", {}, "data[0].tokens"),
    ([{"tokens": list(range(9))}], "cross_entropy", {}, "data[0].tokens"),
    ([{"tokens": [1, 2]}] * 4, "cross_entropy", {}, "data"),
    ([{"tokens": [1, 2, 3, 4, 5, 6, 7]}] * 3, "cross_entropy", {}, "data"),  # 21 tokens > 20
    ([{"tokens": [1, 2], "weights": [float("nan")]}], "cross_entropy", {}, "data[0].weights"),
    ([{"tokens": [1, True]}], "cross_entropy", {}, "data[0].tokens"),
    ([{"tokens": [1, 2], "extra": 1}], "cross_entropy", {}, "data[0]"),
    ([{"tokens": [1, 2]}], "cross_entropy", {"temperature": 2}, "loss_config"),
    ([{"tokens": [1, 2]}], "cross_entropy", {"normalize": "mean"}, "loss_config.normalize"),
    ([{"tokens": [1, 2]}], "cross_entropy", [], "loss_config"),
    ([], "cross_entropy", {}, "data"),
])
def test_bad_batches_name_their_field(data, loss_fn, config, field):
    with pytest.raises(SessionInputError) as info:
        check_batch(data, loss_fn, config, LIMITS)
    assert info.value.field == field


def test_the_token_mean_divisor_is_the_batches_total_weight():
    data = [{"tokens": [1, 2, 3], "weights": [0.0, 1.0]}, {"tokens": [4, 5, 6, 7]}]
    assert check_batch(data, "cross_entropy", {}, LIMITS) == 1.0 + 3.0


def test_losses_per_token():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.8, 0.1]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the second row has one target token
    rows = [{"tokens": [1, 2, 3], "advantages": [1.0, -1.0], "logprobs": [math.log(0.5), math.log(0.5)],
             "weights": [1.0, 2.0]},
            {"tokens": [1, 2], "advantages": 2.0, "logprobs": [math.log(0.4)]}]
    ce, _ = row_losses(logp, rows, "cross_entropy", {}, mask)
    torch.testing.assert_close(ce, torch.tensor([[-math.log(0.5), -2 * math.log(0.25)], [-math.log(0.8), 0.0]]))
    is_, _ = row_losses(logp, rows, "importance_sampling", {}, mask)
    # ratio 1 (row 0, token 0): -A; ratio 0.5 and weight 2 (row 0, token 1): +1; ratio 2 and A 2 (row 1): -4
    torch.testing.assert_close(is_, torch.tensor([[-1.0, 1.0], [-4.0, 0.0]]))
    ppo, clipped = row_losses(logp, rows, "ppo", {}, mask)
    # row 1: ratio 2 with A > 0 is clipped at 1.2
    torch.testing.assert_close(ppo[1, 0], torch.tensor(-1.2 * 2.0))
    assert clipped[1, 0] and not clipped[0, 0] and not clipped[1, 1]
    grpo, _ = row_losses(logp, rows, "grpo", {}, mask)
    torch.testing.assert_close(grpo[1, 0], torch.tensor(-1.28 * 2.0))  # clip-higher: 0.28 above


def test_a_worker_step_matches_a_hand_computed_adam_step(tiny_model_dir):
    """forward_backward's gradient is the token-mean cross-entropy's; optim_step is plain AdamW."""
    worker = SessionWorker(tiny_model_dir)
    reference = SessionWorker(tiny_model_dir)
    rows = [{"tokens": [10, 20, 30, 40]}, {"tokens": [5, 6, 7], "weights": [0.0, 1.0]}]
    out = worker.forward_backward(rows, "cross_entropy", {}, check_batch(rows, "cross_entropy", {}, LIMITS_BIG))
    ids = torch.tensor([10, 20, 30, 40])
    logits = reference.model(input_ids=ids[None, :-1]).logits[0]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[1:, None])[:, 0]
    ids2 = torch.tensor([5, 6, 7])
    lp2 = torch.log_softmax(reference.model(input_ids=ids2[None, :-1]).logits[0].float(), -1).gather(-1, ids2[1:, None])[:, 0]
    loss = -(lp.sum() + lp2[1]) / 4
    assert out["loss"] == pytest.approx(float(loss), rel=1e-5)
    torch.testing.assert_close(torch.tensor(out["logprobs"][0]), lp.detach(), atol=1e-5, rtol=0)
    loss.backward()
    for a, b in zip(worker.params, reference.params, strict=True):  # the same gradient
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
        b.grad = a.grad.clone()  # from here on the same numbers: Adam divides tiny gradients by their own size
    opt = torch.optim.AdamW(reference.params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    opt.step()
    worker.optim_step({"learning_rate": 1e-3})
    for a, b in zip(worker.params, reference.params, strict=True):
        torch.testing.assert_close(a, b)
        assert a.grad is None  # zeroed for the next batch


LIMITS_BIG = Limits(vocab_size=1000)


def test_a_bf16_session_keeps_fp32_master_weights_and_a_tiny_update_still_moves_them(tiny_model_dir):
    """dtype bfloat16 is the compute dtype: the weights and AdamW stay fp32, so lr 1e-6 does not round away
    (in bf16 weights, an update of 1e-6 on a weight of about 0.02 is below half an ulp); the sampler gets bf16."""
    worker = SessionWorker(tiny_model_dir, dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in worker.params)
    before = [p.detach().clone() for p in worker.params]
    rows = [{"tokens": [10, 20, 30, 40, 50]}, {"tokens": [5, 6, 7]}]
    out = worker.forward_backward(rows, "cross_entropy", {}, check_batch(rows, "cross_entropy", {}, LIMITS_BIG))
    assert all(isinstance(x, float) for x in out["logprobs"][0])
    worker.optim_step({"learning_rate": 1e-6})
    moved = sum(int((p != b).sum()) for p, b in zip(worker.params, before, strict=True))
    assert moved > 0.5 * sum(b.numel() for b in before)
    assert {v.dtype for v in worker.weights().values() if v.is_floating_point()} == {torch.bfloat16}


def test_two_sharded_workers_take_the_single_workers_step(tiny_model_dir, tmp_path):
    """With several workers a session shards the model with FSDP2 (1/N each); the whole batch's step is the
    same as one worker's, a worker with no rows of its own still takes part, and rank 0 hands the sampler
    and save_weights the whole model."""
    from dist_helpers import run_ranks, session_step
    from transformers import AutoModelForCausalLM

    rows = [{"tokens": [10, 20, 30, 40]}, {"tokens": [5, 6, 7], "weights": [0.0, 1.0]}, {"tokens": [9, 8, 7, 6, 5]}]
    denominator = check_batch(rows, "cross_entropy", {}, LIMITS_BIG)
    (one,) = run_ranks(session_step, _dir(tmp_path, "one"), tiny_model_dir, rows, denominator, world=1)
    two = run_ranks(session_step, _dir(tmp_path, "two"), tiny_model_dir, rows, denominator, world=2)
    assert not one["sharded"] and all(r["sharded"] for r in two)
    assert all(r["local"] < 0.6 * one["local"] for r in two)  # each holds about half
    assert two[0]["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert two[1]["weights"] == {}  # rank 0 holds what the sampler loads
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "saved").state_dict()
    for got in (two[0]["weights"], saved):
        assert got.keys() >= {k for k in base if k != "lm_head.weight"}
        # the same sums in another order; Adam's first step is lr * g/|g|, so only weights whose gradient is
        # near zero can move differently (test_parallel_ray.py's criterion for the trainer's workers)
        da = torch.cat([(one["weights"][k] - base[k]).flatten() for k in base if k in got])
        db = torch.cat([(got[k] - base[k]).flatten() for k in base if k in got])
        assert float((da - db).norm() / da.norm()) < 0.02
        assert float(((da - db).abs() > 1e-4).float().mean()) < 0.002
    lone = run_ranks(session_step, _dir(tmp_path, "lone"), tiny_model_dir, rows[:1], 3.0, world=2)
    assert lone[0]["logprobs"] and lone[1]["logprobs"] == []  # rank 1 had no rows and still stepped with rank 0


def _dir(tmp_path, name: str):
    (tmp_path / name).mkdir()
    return tmp_path / name
