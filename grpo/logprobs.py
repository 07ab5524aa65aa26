"""Per-token log-probs and entropy of a causal LM without its (B, T, V) logits.

A policy's forward normally ends in `lm_head`, whose output is the whole (B, T, V) logit tensor; the loss
then upcasts it to fp32 and autograd keeps it for the backward. At a 152k vocabulary, 64 sequences of 1k
tokens that is 40 GB for one micro-batch. `token_stats` instead puts a `TokenStatsHead` where the model's
output embedding is, for one forward: it takes the final hidden states, and over chunks of
`chunk_tokens` positions computes each chunk's logits, the log-prob of the token that follows and the
entropy, and drops the logits. With gradients on, each chunk runs under non-reentrant activation
checkpointing, so the backward recomputes one chunk's logits at a time. Peak memory grows with the
vocabulary by one chunk (chunk_tokens x V floats, a few times over for softmax and its gradient), not by
B x T x V. Cost: the lm_head matmul once more in the backward.

The head is swapped on the model object itself, inside its own forward, so DDP's reducer, FSDP2's root
(which gathers the output embedding for that forward and keeps it through the backward) and PEFT wrappers
see an ordinary forward. The original head module computes each chunk, so biases, tied embeddings and
adapters on the head behave as before.

Not here: the loss (grpo.loss), which positions are trained (grpo.learner).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 1024


def causal_lm(model: Any) -> Any:
    """The object holding the output embedding: under a DDP wrapper or the LoRA reference's `AdapterOff`."""
    model = getattr(model, "peft_model", model)  # lora.AdapterOff
    return getattr(model, "module", model)  # DDP


def _chunk_stats(head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """hidden (C, H), targets (C,) -> log p(target) (C,) with gradient, entropy (C,) without; fp32."""
    x = head(hidden).float() / temperature  # (C, V): the only vocabulary-sized tensors live in this call
    lse = torch.logsumexp(x, dim=-1)  # (C,)
    logp = x.gather(-1, targets[:, None]).squeeze(-1) - lse  # (C,)
    with torch.no_grad():
        p = torch.exp(x.detach() - lse.detach()[:, None])  # (C, V)
        ent = lse.detach() - (p * x.detach()).sum(dim=-1)  # (C,)
    return logp, ent


class TokenStatsHead(nn.Module):
    """Stands in for the output embedding during one forward. Given hidden states (B, T', H), T' >= T, it
    returns (B, T, 2): [..., 0] the log-prob of `targets` (B, T) at each of the first T positions (with
    gradient), [..., 1] the entropy there (no gradient), in fp32 at `temperature`."""

    def __init__(self, head: nn.Module, targets: Tensor, temperature: float, chunk_tokens: int):
        super().__init__()
        self.head = head
        self.targets = targets
        self.temperature = temperature
        self.chunk_tokens = max(1, int(chunk_tokens))

    def forward(self, hidden: Tensor) -> Tensor:
        b, t = self.targets.shape
        h = hidden[:, :t].reshape(b * t, hidden.shape[-1])  # (B*T, H)
        tg = self.targets.reshape(b * t).to(h.device)  # (B*T,)
        logps, ents = [], []
        for i in range(0, b * t, self.chunk_tokens):
            hc, tc = h[i : i + self.chunk_tokens], tg[i : i + self.chunk_tokens]
            if torch.is_grad_enabled() and hc.requires_grad:
                lp, ent = checkpoint(_chunk_stats, self.head, hc, tc, self.temperature, use_reentrant=False)
            else:
                lp, ent = _chunk_stats(self.head, hc, tc, self.temperature)
            logps.append(lp)
            ents.append(ent)
        if not logps:
            return hidden.new_zeros((b, t, 2), dtype=torch.float32)
        return torch.stack([torch.cat(logps), torch.cat(ents)], dim=-1).reshape(b, t, 2)  # (B, T, 2)


@contextlib.contextmanager
def stats_head(model: Any, targets: Tensor, temperature: float, chunk_tokens: int) -> Iterator[None]:
    """Within the block, `model`'s forward returns TokenStatsHead's (B, T, 2) as its `logits`."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embedding to compute log-probs from")
    lm.set_output_embeddings(TokenStatsHead(head, targets, temperature, chunk_tokens))
    try:
        yield
    finally:
        lm.set_output_embeddings(head)


def token_stats(model: Any, targets: Tensor, *, temperature: float = 1.0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                **forward: Any) -> tuple[Tensor, Tensor]:
    """One forward of `model(**forward)` whose first T kept positions predict `targets` (B, T): returns the
    log-probs (B, T) and entropies (B, T), fp32, never building the (B, T, V) logits. The caller keeps
    at least T positions (`logits_to_keep`)."""
    with stats_head(model, targets, temperature, chunk_tokens):
        out = model(**forward).logits  # (B, T, 2)
    return out[..., 0], out[..., 1].detach()
