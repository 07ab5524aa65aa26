"""The GRPO math: advantages, log-probabilities, KL estimators, the clipped surrogate, loss aggregation.

Covers pure tensor functions only, each with its shapes: group-normalised advantages (GRPO and
Dr. GRPO), per-token log-probs and entropy from logits, the k1/k2/k3 KL estimators, the PPO clipped
surrogate with separate low/high clip ranges (DAPO clip-higher), truncated importance weights for
stale (async) samples, the three loss aggregations, and DAPO's dynamic-sampling filter and soft
overlong penalty.

It does not cover config objects, Ray, I/O, sampling, or the optimiser step: the trainer picks a
variant from its config once and passes plain values here. Shape letters: P prompts, G completions
per prompt, B sequences (rows), T completion tokens, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LossOutput",
    "aggregate",
    "clipped_surrogate",
    "discounted_returns",
    "dynamic_sampling_mask",
    "group_step_advantages",
    "entropy",
    "group_advantages",
    "kl_penalty",
    "overlong_penalty",
    "policy_loss",
    "token_logprobs",
    "truncated_is_weights",
]

# exp() of a log-ratio beyond this overflows float32 gradients long before it means anything;
# a policy that far from its reference is already broken, so the estimate is bounded instead.
_LOG_RATIO_CLAMP = 20.0


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    rewards (P*G,), the G completions of a prompt contiguous -> (P*G,). `scale=True` divides by the
    group's (unbiased) std, as in GRPO; `scale=False` only subtracts the mean (Dr. GRPO), which
    removes the bias towards prompts whose rewards barely vary.
    """
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide {rewards.numel()} rewards")
    if scale and group_size < 2:
        raise ValueError("group_size must be >= 2 when scale=True (the std of one sample is undefined)")
    r = rewards if rewards.is_floating_point() else rewards.float()
    r = r.reshape(-1, group_size)  # (P, G)
    a = r - r.mean(dim=1, keepdim=True)  # (P, G)
    if scale:
        # A group whose rewards are all equal has std 0 and mean-centred rewards 0: eps keeps it 0.
        a = a / (r.std(dim=1, keepdim=True) + eps)  # (P, G)
    return a.reshape(-1)  # (P*G,)


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(token) under softmax(logits / temperature), in float32.

    logits (B, T, V) where logits[:, t] predicts tokens[:, t]; tokens (B, T) -> (B, T) float32.
    Computed as gathered logit - logsumexp rather than log_softmax + gather: a full (B, T, V)
    log_softmax is never built. Rows are done one at a time so the float32 upcast of bf16 logits
    costs (T, V), not (B, T, V), extra memory. The temperature must match the sampler's.
    """
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float() / temperature  # (B, T)
    lse = torch.stack(
        [torch.logsumexp(row.float() / temperature, dim=-1) for row in logits]  # B x (T,)
    )  # (B, T)
    return picked - lse  # (B, T)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, in float32: (B, T, V) -> (B, T).

    Uses H = logsumexp(x) - sum(p * x), one row at a time for the same memory reason as
    `token_logprobs`. A diagnostic (entropy collapse is the usual sign of a dying run), not a loss term.
    """
    out = []
    for row in logits:  # row (T, V)
        x = row.float() / temperature  # (T, V)
        p = torch.softmax(x, dim=-1)  # (T, V)
        out.append(torch.logsumexp(x, dim=-1) - (p * x).sum(dim=-1))  # (T,)
    return torch.stack(out)  # (B, T)


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of the sampled tokens: (B, T) each -> (B, T).

    With log_ratio = logp - ref_logp (clamped to [-20, 20]) and r = ref / pi = exp(-log_ratio):
    "k1" = log_ratio (unbiased, high variance, can be negative); "k2" = 0.5 * log_ratio**2 (biased,
    low variance); "k3" = r - 1 - log r (Schulman's: unbiased, low variance, always >= 0).
    """
    log_ratio = (logp - ref_logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # (B, T)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown kl estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token, with separate clip ranges below and above 1.

    logp, old_logp (B, T), advantages (B,) or per token (B, T) -> (loss (B, T), clipped (B, T) bool).
    loss = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A), ratio = pi / pi_old.
    eps_high > eps_low is DAPO's clip-higher: low-probability tokens with A > 0 may grow further,
    which keeps exploration (entropy) alive. `clipped` marks tokens where the clipped branch was
    strictly the smaller term, i.e. tokens that get no gradient.
    """
    ratio = torch.exp(logp - old_logp)  # (B, T)
    # (B, 1): one advantage for every token of a sequence; (B, T) as given (multi-turn step credit)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    unclipped = ratio * adv  # (B, T)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv  # (B, T)
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_len: int | None = None,
) -> Tensor:
    """Reduce per-token values to one scalar; the mode decides how much each token weighs.

    values, mask (B, T) -> (). Modes:
      "token-mean":              sum(v*m) / num_tokens. Every token weighs the same, so long answers
                                 weigh more in total (DAPO's choice).
      "seq-mean-token-mean":     sum_i(sum_t(v*m)_i / len_i) / num_seqs. Each sequence weighs the
                                 same, so per-token weight shrinks with length: original GRPO, which
                                 this length bias lets grow long wrong answers.
      "seq-mean-token-sum-norm": sum(v*m) / (num_seqs * norm_len). A constant normaliser, no length
                                 bias (Dr. GRPO).
    num_tokens / num_seqs are the global counts over the whole step batch across all workers; the
    result is then this shard's contribution, and shards' contributions sum to the whole-batch
    value. Defaults: the local mask's counts (tokens, non-empty rows); norm_len defaults to T.
    Empty rows contribute 0 and never produce NaN.
    """
    m = mask.to(values.dtype)  # (B, T)
    lens = m.sum(dim=-1)  # (B,)
    if num_tokens is None:
        num_tokens = lens.sum()
    if num_seqs is None:
        num_seqs = (lens > 0).sum()
    if norm_len is None:
        norm_len = mask.shape[-1]
    # Counts are at least 1 wherever the numerator is non-zero, so clamping only guards empty batches.
    n_tok = torch.as_tensor(num_tokens, dtype=values.dtype, device=values.device).clamp(min=1)  # ()
    n_seq = torch.as_tensor(num_seqs, dtype=values.dtype, device=values.device).clamp(min=1)  # ()
    masked = values * m  # (B, T)
    if mode == "token-mean":
        return masked.sum() / n_tok
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / lens.clamp(min=1)  # (B,)
        return per_seq.sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (n_seq * norm_len)
    raise ValueError(
        f"unknown aggregation {mode!r}; expected 'token-mean', 'seq-mean-token-mean' or 'seq-mean-token-sum-norm'"
    )


def truncated_is_weights(logp: Tensor, behaviour_logp: Tensor, cap: float) -> Tensor:
    """Per-token importance weights pi_now / pi_sampler, truncated at `cap` (verl's TIS).

    logp (B, T), the current policy's log-probs; behaviour_logp (B, T), the sampler's -> (B, T),
    detached, values in [0, cap]. A stale sampler can have given a token far less probability than
    the policy now does; the raw ratio is then unbounded, so it is truncated: a little bias for a
    bounded loss and gradient. Truncated weights equal `cap` exactly (clamp), so `>= cap` finds them.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    # exp may overflow to inf for a huge log-ratio; clamp still maps it to cap, never NaN.
    return torch.exp(logp.detach() - behaviour_logp).clamp(max=cap)  # (B, T)


@dataclass
class LossOutput:
    """What one loss evaluation hands the trainer: the loss to backprop and its parts for logging."""

    loss: Tensor
    """scalar, differentiable: aggregated surrogate + kl_coef * aggregated KL"""
    pg_loss: Tensor
    """scalar, detached: aggregated clipped surrogate"""
    kl: Tensor
    """scalar, detached: aggregated KL estimate (0 when there is no reference)"""
    clip_frac: Tensor
    """scalar, detached: aggregated fraction of clipped tokens (same aggregation and counts)"""
    is_weight_mean: Tensor
    """scalar, detached: token-mean of the importance weights (1 over the whole batch without weights)"""
    is_clip_frac: Tensor
    """scalar, detached: token-mean fraction of weights truncated at is_cap (0 without weights)"""


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    agg: str,
    kl_coef: float = 0.0,
    ref_logp: Tensor | None = None,
    kl_estimator: str = "k3",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_len: int | None = None,
    is_weights: Tensor | None = None,
    is_cap: float = math.inf,
) -> LossOutput:
    """The GRPO loss: clipped surrogate + kl_coef * KL(pi || ref), aggregated with `agg`.

    logp, old_logp, mask, ref_logp, is_weights (B, T), advantages (B,) or (B, T) -> LossOutput of scalars.
    The KL is added per token before aggregation (as a loss term, not folded into the reward), so it
    shares the surrogate's weighting; with the global counts the shards' losses sum to the whole-batch loss.

    `is_weights` (detached, from `truncated_is_weights`) multiplies each token's surrogate, not its KL:
    for stale samples pass old_logp = logp.detach() (ratio 1, the on-policy gradient) and let the
    truncated weight correct for the sampler, so one unlikely stale token cannot blow the loss up.
    `is_cap` is only read to report is_clip_frac. Both diagnostics are token-means over the mask (a
    mean weight is per token whatever `agg` is), and with the global num_tokens they sum over shards.
    """
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference policy's log-probs)")
    counts = {"num_tokens": num_tokens, "num_seqs": num_seqs, "norm_len": norm_len}

    pg_tok, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)  # (B, T) each
    if ref_logp is not None:
        kl_tok = kl_penalty(logp, ref_logp, kl_estimator)  # (B, T)
    else:
        kl_tok = torch.zeros_like(pg_tok)  # (B, T)

    # No weights is weight 1 everywhere: the same loss, and diagnostics that read "on-policy".
    weights = torch.ones_like(pg_tok) if is_weights is None else is_weights.detach().to(pg_tok.dtype)  # (B, T)
    if is_weights is not None:
        pg_tok = pg_tok * weights  # (B, T)

    pg = aggregate(pg_tok, mask, agg, **counts)
    kl = aggregate(kl_tok, mask, agg, **counts)
    clip_frac = aggregate(clipped.to(pg_tok.dtype), mask, agg, **counts)
    is_weight_mean = aggregate(weights, mask, "token-mean", num_tokens=num_tokens)
    is_clip_frac = aggregate((weights >= is_cap).to(pg_tok.dtype), mask, "token-mean", num_tokens=num_tokens)
    # aggregate is linear, so aggregating the parts and summing equals aggregating the sum.
    return LossOutput(
        loss=pg + kl_coef * kl,
        pg_loss=pg.detach(),
        kl=kl.detach(),
        clip_frac=clip_frac.detach(),
        is_weight_mean=is_weight_mean.detach(),
        is_clip_frac=is_clip_frac.detach(),
    )


def dynamic_sampling_mask(rewards: Tensor, group_size: int, tol: float = 1e-8) -> Tensor:
    """Which prompts to keep: those whose completions' rewards are not all equal (DAPO dynamic sampling).

    rewards (P*G,) -> (P,) bool. A group of equal rewards has zero advantage everywhere, so it adds
    no gradient but still dilutes the aggregation's denominators; the trainer drops it and resamples.
    """
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide {rewards.numel()} rewards")
    r = rewards.reshape(-1, group_size)  # (P, G)
    spread = r.max(dim=1).values - r.min(dim=1).values  # (P,)
    return spread > tol  # (P,)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward: (B,) int lengths -> (B,) float.

    0 up to max_len - buffer, then a linear ramp down to -factor at max_len, and -factor beyond.
    The ramp tells the policy "shorter" before truncation, instead of a cliff that punishes
    otherwise-correct answers that happened to be cut off. buffer == 0 turns it off.
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)  # (B,)
    length = lengths.float()  # (B,)
    start = max_len - buffer
    ramp = (start - length) / buffer * factor  # (B,)
    penalty = torch.where(length <= start, torch.zeros_like(length), ramp)  # (B,)
    return torch.where(length > max_len, torch.full_like(length, -factor), penalty)  # (B,)


def discounted_returns(step_rewards: Tensor, step_mask: Tensor, gamma: float) -> Tensor:
    """Return of each step of a multi-turn trajectory: G_k = r_k + gamma * G_{k+1}.

    step_rewards, step_mask (B, S) -> (B, S) float32, 0 on steps that did not happen. The outcome
    reward sits on the last step, so with gamma < 1 earlier steps get it discounted by their
    distance from the end: credit moves towards the steps that led to the answer.
    """
    r = (step_rewards.float() * step_mask).clone()  # (B, S)
    out = torch.zeros_like(r)  # (B, S)
    running = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)  # (B,)
    for k in range(r.shape[1] - 1, -1, -1):
        running = r[:, k] + gamma * running * step_mask[:, k]  # (B,)
        out[:, k] = running
    return out * step_mask


def group_step_advantages(returns: Tensor, step_mask: Tensor, group_size: int, scale: bool = True,
                          eps: float = 1e-6) -> Tensor:
    """Step returns made group-relative: every step's return minus the mean over all steps of the
    group's trajectories (divided by their std when `scale`).

    returns, step_mask (P*G, S) -> (P*G, S), 0 on missing steps. Pooling the group's steps (rather than
    comparing step k with step k only) keeps groups whose trajectories have different lengths
    comparable; with one step per trajectory it is exactly `group_advantages`.
    """
    p = returns.shape[0] // group_size
    r = returns.float().reshape(p, -1)  # (P, G*S)
    m = step_mask.reshape(p, -1).float()  # (P, G*S)
    n = m.sum(dim=1, keepdim=True).clamp(min=1)  # (P, 1)
    mean = (r * m).sum(dim=1, keepdim=True) / n  # (P, 1)
    a = (r - mean) * m  # (P, G*S)
    if scale:
        var = (a**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)  # (P, 1), unbiased like group_advantages
        a = a / (var.sqrt() + eps)
    return a.reshape(returns.shape) * step_mask  # (P*G, S)
