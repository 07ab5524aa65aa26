"""Tests for grpo/loss.py: hand-computed numbers, each variant's switch, and batch-split invariance."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.loss import (
    aggregate,
    clipped_surrogate,
    dynamic_sampling_mask,
    entropy,
    group_advantages,
    kl_penalty,
    overlong_penalty,
    policy_loss,
    token_logprobs,
    truncated_is_weights,
)

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---- advantages -------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350
    # group 2: all equal -> 0 (not NaN)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # 0.866024...
    close(group_advantages(rewards, 4), [a, -a, -a, a, 0, 0, 0, 0])


def test_group_advantages_scale_switch():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    close(group_advantages(rewards, 4, scale=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # Dr. GRPO keeps the reward scale: doubling rewards doubles advantages; GRPO is scale-free.
    close(group_advantages(2 * rewards, 4, scale=False), [1.0, -1.0, -1.0, 1.0, 0, 0, 0, 0])
    close(group_advantages(2 * rewards, 4), group_advantages(rewards, 4), atol=1e-5)


def test_group_advantages_bad_group_size():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)


# ---- log-probs and entropy --------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    tokens = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = token_logprobs(logits, tokens, temperature)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    close(got, expected, atol=1e-5)


def test_token_logprobs_bf16_logits_give_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9).to(torch.bfloat16)
    tokens = torch.randint(0, 9, (2, 4))
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = token_logprobs(logits, tokens)
    assert got.dtype == torch.float32
    close(got, expected, atol=1e-5)


def test_entropy_uniform_is_log_v():
    close(entropy(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)), atol=1e-6)
    close(entropy(torch.full((1, 2, 5), 3.0), temperature=0.5), torch.full((1, 2), math.log(5)))


def test_entropy_matches_definition_with_temperature():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6)
    logp = torch.log_softmax(logits / 0.8, dim=-1)
    close(entropy(logits, 0.8), -(logp.exp() * logp).sum(-1), atol=1e-5)


# ---- KL estimators ----------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    ln2 = math.log(2)
    logp = torch.tensor([[0.0, ln2, -ln2]])
    ref = torch.zeros(1, 3)
    close(kl_penalty(logp, ref, "k1"), [[0.0, ln2, -ln2]])
    close(kl_penalty(logp, ref, "k2"), [[0.0, 0.5 * ln2**2, 0.5 * ln2**2]])  # 0.240227
    # k3 = exp(-lr) - 1 + lr: lr=ln2 -> 0.5 - 1 + 0.693147 = 0.193147; lr=-ln2 -> 2 - 1 - 0.693147
    close(kl_penalty(logp, ref, "k3"), [[0.0, 0.5 - 1 + ln2, 2 - 1 - ln2]])


def test_k3_nonnegative_and_zero_at_equal_policies():
    torch.manual_seed(0)
    logp, ref = torch.randn(4, 8), torch.randn(4, 8)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    close(kl_penalty(logp, logp.clone(), "k3"), torch.zeros(4, 8))


def test_kl_log_ratio_is_clamped():
    out = kl_penalty(torch.tensor([[100.0, -100.0]]), torch.zeros(1, 2), "k1")
    close(out, [[20.0, -20.0]])
    assert torch.isfinite(kl_penalty(torch.tensor([[-100.0]]), torch.zeros(1, 1), "k3")).all()


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ---- clipped surrogate ------------------------------------------------------------------------


def _two_tokens():
    # ratios [1.5, 0.5] for one sequence with A = +1 and one with A = -1
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))
    return logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0])


def test_clipped_surrogate_by_hand():
    logp, old, adv = _two_tokens()
    loss, clipped = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # A>0: ratio 1.5 -> clamp 1.28 < 1.5 (clipped at 1+eps_high); ratio 0.5 -> 0.5 < 0.8 (kept)
    # A<0: ratio 1.5 -> -1.5 < -1.28 (kept);        ratio 0.5 -> -0.8 < -0.5 (clipped at 1-eps_low)
    close(loss, [[-1.28, -0.5], [1.5, 0.8]])
    assert clipped.tolist() == [[True, False], [False, True]]


def test_clip_higher_switch():
    logp, old, adv = _two_tokens()
    sym, _ = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.2)
    high, _ = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    low, _ = clipped_surrogate(logp, old, adv, eps_low=0.3, eps_high=0.2)
    close(sym, [[-1.2, -0.5], [1.5, 0.8]])
    # eps_high only moves the A>0, ratio>1 token; eps_low only the A<0, ratio<1 token
    close(high - sym, [[-0.08, 0.0], [0.0, 0.0]])
    close(low - sym, [[0.0, 0.0], [0.0, -0.1]])


def test_clipped_tokens_get_no_gradient():
    logp, old, adv = _two_tokens()
    logp.requires_grad_(True)
    loss, clipped = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    assert (logp.grad[clipped] == 0).all() and (logp.grad[~clipped] != 0).all()


# ---- aggregation ------------------------------------------------------------------------------

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
UNEQUAL = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_aggregate_modes_by_hand():
    close(aggregate(VALUES, UNEQUAL, "token-mean"), (1 + 2 + 3 + 4) / 4)  # 2.5
    close(aggregate(VALUES, UNEQUAL, "seq-mean-token-mean"), (6 / 3 + 4 / 1) / 2)  # 3.0
    close(aggregate(VALUES, UNEQUAL, "seq-mean-token-sum-norm"), 10 / (2 * 3))  # 1.6667
    close(aggregate(VALUES, UNEQUAL, "seq-mean-token-sum-norm", norm_len=5), 10 / (2 * 5))  # 1.0


def test_aggregate_modes_differ_on_unequal_lengths_and_coincide_on_equal():
    unequal = [aggregate(VALUES, UNEQUAL, m).item() for m in AGG_MODES]
    assert len(set(unequal)) == 3
    equal = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # every row has 2 tokens: (1+2+4+5)/4 = (1.5+4.5)/2 = 12/(2*2) = 3
    close(aggregate(VALUES, equal, "token-mean"), 3.0)
    close(aggregate(VALUES, equal, "seq-mean-token-mean"), 3.0)
    close(aggregate(VALUES, equal, "seq-mean-token-sum-norm", norm_len=2), 3.0)


def test_aggregate_global_counts():
    close(aggregate(VALUES, UNEQUAL, "token-mean", num_tokens=8), 10 / 8)
    close(aggregate(VALUES, UNEQUAL, "seq-mean-token-mean", num_seqs=4), 6 / 4)
    close(aggregate(VALUES, UNEQUAL, "seq-mean-token-sum-norm", num_seqs=4, norm_len=5), 10 / 20)


def test_aggregate_empty_rows_contribute_zero():
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    for mode in AGG_MODES:
        assert torch.isfinite(aggregate(VALUES, mask, mode))
    close(aggregate(VALUES, mask, "token-mean"), 6 / 3)
    close(aggregate(VALUES, mask, "seq-mean-token-mean"), 2.0)  # local num_seqs counts non-empty rows
    close(aggregate(VALUES, mask, "seq-mean-token-mean", num_seqs=2), 1.0)
    for mode in AGG_MODES:
        close(aggregate(VALUES, torch.zeros(2, 3), mode), 0.0)


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="seq-sum"):
        aggregate(VALUES, UNEQUAL, "seq-sum")


# ---- policy loss ------------------------------------------------------------------------------


def test_policy_loss_kl_term_adds_kl_coef_times_kl():
    logp, old, adv = _two_tokens()
    ref = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    kw = dict(eps_low=0.2, eps_high=0.28, agg="token-mean", ref_logp=ref)
    base = policy_loss(logp, old, adv, mask, kl_coef=0.0, **kw)
    with_kl = policy_loss(logp, old, adv, mask, kl_coef=0.1, **kw)
    expected_kl = aggregate(kl_penalty(logp, ref, "k3"), mask, "token-mean")
    close(with_kl.kl, expected_kl)
    close(with_kl.loss, base.loss + 0.1 * expected_kl)
    close(with_kl.pg_loss, base.pg_loss)
    # tokens [-1.28, -0.5, 1.5] and clip flags [1, 0, 0] under the mask, token-mean over 3
    close(base.pg_loss, (-1.28 - 0.5 + 1.5) / 3)
    close(base.clip_frac, 1 / 3)


def test_policy_loss_without_reference():
    logp, old, adv = _two_tokens()
    out = policy_loss(logp, old, adv, torch.ones(2, 2), eps_low=0.2, eps_high=0.2, agg="token-mean")
    close(out.kl, 0.0)
    assert not out.pg_loss.requires_grad and not out.kl.requires_grad and not out.clip_frac.requires_grad
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(
            logp, old, adv, torch.ones(2, 2), eps_low=0.2, eps_high=0.2, agg="token-mean", kl_coef=0.1
        )


def test_policy_loss_unknown_agg():
    logp, old, adv = _two_tokens()
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, torch.ones(2, 2), eps_low=0.2, eps_high=0.2, agg="sum")


# ---- truncated importance sampling (async rollouts) -------------------------------------------


def test_truncated_is_weights_by_hand():
    logp = torch.tensor([[-1.0, -0.5], [-2.0, -0.1]], requires_grad=True)
    behaviour = torch.tensor([[-1.0, -1.0], [-1.5, -3.0]])
    w = truncated_is_weights(logp, behaviour, cap=2.0)
    # raw exp(logp - behaviour) = [1, e^0.5 = 1.6487, e^-0.5 = 0.6065, e^2.9 = 18.17 -> capped at 2]
    close(w, [[1.0, math.exp(0.5)], [math.exp(-0.5), 2.0]])
    assert not w.requires_grad
    # a log-ratio whose exp overflows float32 is still exactly the cap, never inf or NaN
    close(truncated_is_weights(torch.zeros(1, 1), torch.full((1, 1), -200.0), cap=3.0), [[3.0]])


def test_policy_loss_with_unit_is_weights_is_todays_loss_exactly():
    logp, old, adv = _two_tokens()
    mask = torch.tensor([[1, 1], [1, 0]])
    kw = dict(eps_low=0.2, eps_high=0.28, agg="seq-mean-token-mean", kl_coef=0.1,
              ref_logp=torch.tensor([[0.1, -0.2], [0.3, 0.0]]))
    outs, grads = [], []
    for weights in (None, torch.ones(2, 2)):
        x = logp.clone().requires_grad_(True)
        out = policy_loss(x, old, adv, mask, is_weights=weights, is_cap=2.0, **kw)
        out.loss.backward()
        outs.append(out)
        grads.append(x.grad)
    assert torch.equal(outs[0].loss, outs[1].loss) and torch.equal(grads[0], grads[1])
    for out in outs:
        close(out.is_weight_mean, 1.0)
        close(out.is_clip_frac, 0.0)


def test_is_weights_scale_the_surrogate_not_the_kl():
    logp, old, adv = _two_tokens()
    ref = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    kw = dict(eps_low=0.2, eps_high=0.28, agg="token-mean", kl_coef=0.1, ref_logp=ref)
    plain = policy_loss(logp, old, adv, mask, **kw)
    w = torch.tensor([[2.0, 0.5], [1.0, 0.25]])
    out = policy_loss(logp, old, adv, mask, is_weights=w, is_cap=2.0, **kw)
    # surrogate tokens [-1.28, -0.5, 1.5] (4th masked) times weights [2, 0.5, 1], token-mean over 3
    close(out.pg_loss, (-2.56 - 0.25 + 1.5) / 3)
    close(out.kl, plain.kl)
    close(out.loss, out.pg_loss + 0.1 * plain.kl)
    close(out.is_weight_mean, (2.0 + 0.5 + 1.0) / 3)
    close(out.is_clip_frac, 1 / 3)  # the weight of 2 sits at the cap
    assert not out.is_weight_mean.requires_grad and not out.is_clip_frac.requires_grad


def test_a_very_stale_token_gives_a_bounded_loss_with_tis():
    """The sampler gave the token log-prob -30, the policy now gives -0.1, and A = -1. Today's
    formula (old = the sampler's log-probs) has ratio e^29.9 ~ 1e13 and the A<0 branch never clips
    it; TIS takes the ratio against the policy's own detached log-probs (1) and weights by min(e^29.9, 2)."""
    behaviour, adv, mask = torch.tensor([[-30.0]]), torch.tensor([-1.0]), torch.ones(1, 1)
    kw = dict(eps_low=0.2, eps_high=0.28, agg="token-mean")
    cap = 2.0
    bound = cap * 1.0  # |loss| <= cap * |A| (ratio 1, weight <= cap); the gradient likewise

    logp = torch.tensor([[-0.1]], requires_grad=True)
    w = truncated_is_weights(logp, behaviour, cap)
    tis = policy_loss(logp, logp.detach(), adv, mask, is_weights=w, is_cap=cap, **kw)
    tis.loss.backward()
    close(tis.loss.detach(), 2.0)  # -min(1 * -1, clip(1) * -1) * 2
    close(logp.grad, [[2.0]])  # d/dlogp of -w * A * exp(logp - logp.detach())
    assert abs(tis.loss.item()) <= bound and abs(logp.grad.item()) <= bound
    close(tis.is_weight_mean, 2.0)
    close(tis.is_clip_frac, 1.0)

    stale = torch.tensor([[-0.1]], requires_grad=True)
    today = policy_loss(stale, behaviour, adv, mask, **kw)
    today.loss.backward()
    assert today.loss.item() == pytest.approx(math.exp(29.9), rel=1e-4)
    assert today.loss.item() > 1e12 * bound and stale.grad.item() > 1e12 * bound


def test_tis_on_policy_is_the_sync_loss():
    """Sampled by the current policy, every weight is exp(0) = 1: the sync loss and gradient exactly."""
    torch.manual_seed(0)
    logp0 = -torch.rand(3, 4) * 3
    adv, mask = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    kw = dict(eps_low=0.2, eps_high=0.28, agg="token-mean")
    grads = []
    for tis in (False, True):
        logp = logp0.clone().requires_grad_(True)
        w = truncated_is_weights(logp, logp0, 2.0) if tis else None
        policy_loss(logp, logp.detach(), adv, mask, is_weights=w, **kw).loss.backward()
        grads.append(logp.grad)
    assert torch.equal(grads[0], grads[1])


# ---- invariance: one worker == sum of two shards with global counts ---------------------------


def _grad(model, x, tokens, old, ref, adv, mask, agg, **counts):
    model.zero_grad()
    logp = token_logprobs(model(x), tokens)  # (b, T)
    out = policy_loss(
        logp, old, adv, mask, eps_low=0.2, eps_high=0.28, agg=agg, kl_coef=0.05, ref_logp=ref, **counts
    )
    out.loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("agg", AGG_MODES)
def test_split_batch_gradient_equals_whole_batch(agg):
    torch.manual_seed(0)
    B, T, D, V = 4, 5, 6, 7
    model = torch.nn.Linear(D, V)
    x = torch.randn(B, T, D)
    tokens = torch.randint(0, V, (B, T))
    lengths = torch.tensor([5, 1, 3, 2])  # unequal, so the three modes weigh tokens differently
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()  # (B, T)
    with torch.no_grad():
        logp0 = token_logprobs(model(x), tokens)
    old = logp0 + 0.3 * torch.randn(B, T)  # off-policy enough that some tokens clip
    ref = logp0 + 0.2 * torch.randn(B, T)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])

    whole = _grad(model, x, tokens, old, ref, adv, mask, agg)
    counts = {"num_tokens": float(mask.sum()), "num_seqs": float(B), "norm_len": T}
    halves = [
        _grad(model, x[s], tokens[s], old[s], ref[s], adv[s], mask[s], agg, **counts)
        for s in (slice(0, 2), slice(2, 4))
    ]
    for g, g0, g1 in zip(whole, *halves, strict=True):
        torch.testing.assert_close(g0 + g1, g, atol=1e-6, rtol=0)


def test_split_batch_with_local_counts_does_not_match():
    # why the global counts matter: token-mean with each shard's own token count reweights shards
    torch.manual_seed(0)
    vals = torch.randn(4, 5)
    mask = (torch.arange(5) < torch.tensor([[5], [1], [3], [2]])).long()
    whole = aggregate(vals, mask, "token-mean")
    local = aggregate(vals[:2], mask[:2], "token-mean") + aggregate(vals[2:], mask[2:], "token-mean")
    glob = sum(aggregate(vals[s], mask[s], "token-mean", num_tokens=11) for s in (slice(0, 2), slice(2, 4)))
    close(glob, whole)
    assert not torch.allclose(local / 2, whole)


# ---- DAPO: dynamic sampling and overlong penalty ----------------------------------------------


def test_dynamic_sampling_mask_by_hand():
    rewards = torch.tensor(
        [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0 + 1e-12],
        dtype=torch.float64,  # so the 1e-12 spread survives and it is the tolerance that drops it
    )
    assert dynamic_sampling_mask(rewards, 4).tolist() == [True, False, True, False]


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([5, 6, 7, 8, 10, 11])
    # max_len 10, buffer 4: free up to 6, then (6 - L) / 4, -1 beyond 10
    close(overlong_penalty(lengths, max_len=10, buffer=4), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    close(overlong_penalty(lengths, 10, 4, factor=0.5), [0.0, 0.0, -0.125, -0.25, -0.5, -0.5])
    close(overlong_penalty(lengths, 10, 0), torch.zeros(6))
    assert overlong_penalty(lengths, 10, 4).dtype == torch.float32
