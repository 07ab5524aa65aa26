"""What sampling produces and the token-level pieces every sampler shares.

`Rollout` is the batch of P prompts x G completions that rollout workers hand the learner;
`left_pad`, `position_ids` and `sample` (one sampling step: temperature, nucleus, seeded generators, the
log-probs) are the steps of a KV-cached decode that the single-turn sampler (grpo.rollout), the multi-turn
episodes (grpo.agents.episodes) and the policy server (app.serving.policy) all take, so a fix to one lands in
all (tests/app/test_policy.py checks the three draw the same tokens for a seed); `sampling_generator` builds
the seeded generator on the logits' device; `PromptFormat` and `stop_token_ids` say how a prompt becomes ids
(chat template or raw text) and which tokens end a completion. Not here: models, Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """What sampling produced for P prompts x G completions; rows are grouped by prompt."""

    prompt_ids: list[list[int]]  # P prompts, unpadded token ids
    completion_ids: Tensor  # (P*G, L) int64, pad after the end
    completion_mask: Tensor  # (P*G, L) bool, True on sampled tokens (the EOS included)
    logprobs: Tensor  # (P*G, L) float32, log-prob of each sampled token under the sampling policy
    finish_reasons: list[str]  # P*G of "stop" (EOS sampled) or "length"
    texts: list[str]  # P*G decoded completions, special tokens removed
    group_size: int
    version: int  # policy version that sampled these
    gen_seconds: float = 0.0
    meta: dict[str, float] = field(default_factory=dict)
    loss_mask: Tensor | None = None
    """(P*G, L) bool, the tokens the loss trains on when they differ from completion_mask (multi-turn:
    the policy's own tokens, not observations); None means completion_mask"""

    @property
    def train_mask(self) -> Tensor:
        return self.completion_mask if self.loss_mask is None else self.loss_mask  # (P*G, L)

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(dim=1)  # (P*G,)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())



def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """Join rollouts of the same step (e.g. from several rollout actors), keeping group order."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.completion_ids.shape[1] for p in parts)

    def pad(t: Tensor, value: float | int | bool) -> Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # (N, width)

    pad_id = int(parts[0].meta.get("pad_id", 0))
    return Rollout(
        prompt_ids=[p for r in parts for p in r.prompt_ids],
        completion_ids=torch.cat([pad(r.completion_ids, pad_id) for r in parts]),
        completion_mask=torch.cat([pad(r.completion_mask, False) for r in parts]),
        logprobs=torch.cat([pad(r.logprobs, 0.0) for r in parts]),
        finish_reasons=[f for r in parts for f in r.finish_reasons],
        texts=[t for r in parts for t in r.texts],
        group_size=parts[0].group_size,
        version=min(r.version for r in parts),
        gen_seconds=max(r.gen_seconds for r in parts),
        meta=dict(parts[0].meta),
        loss_mask=None if parts[0].loss_mask is None else torch.cat([pad(r.train_mask, False) for r in parts]),
    )


# ---- prompts and stop tokens ----------------------------------------------------------------------

Prompt = str | list[dict[str, Any]] | tuple[tuple[str, str], ...]
"""what a policy is prompted with: text, OpenAI-style messages, or (role, content) pairs (tasks.Sample)"""


def as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """A prompt as chat messages: text is one user turn; (role, content) pairs become message dicts."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in prompt]


class PromptFormat:
    """How a prompt becomes the policy's input ids: the tokenizer's chat template where it has one, else the
    text as written (no special tokens added: a base model's prompt is what the data says).

    `chat` None renders with the template when the tokenizer carries one (an Instruct model); True insists
    on it (ValueError without one); False forces raw text, where a message list becomes its contents joined
    by newlines. Ids are exactly what `apply_chat_template(messages, add_generation_prompt=True)` gives;
    `tools` (OpenAI function specs) go to templates that take them.
    """

    def __init__(self, tokenizer: Any, chat: bool | None = None):
        has = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has:
            raise ValueError("chat_template: the tokenizer has no chat template")
        self.tokenizer, self.chat = tokenizer, has if chat is None else bool(chat)

    def text(self, prompt: Prompt, tools: list[dict[str, Any]] | None = None) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True,
                                                      **({"tools": tools} if tools else {}))
        return prompt if isinstance(prompt, str) else "\n".join(str(m["content"]) for m in as_messages(prompt))

    def ids(self, prompt: Prompt, tools: list[dict[str, Any]] | None = None) -> list[int]:
        if self.chat:
            return list(self.tokenizer.apply_chat_template(
                as_messages(prompt), tokenize=True, add_generation_prompt=True, return_dict=False,
                **({"tools": tools} if tools else {})))
        return list(self.tokenizer(self.text(prompt), add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every token id that ends a completion: the generation config's `eos_token_id` (an id or a list, e.g.
    Qwen's `<|im_end|>` and `<|endoftext|>`) and the tokenizer's eos, in that order, without repeats."""
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for i in ([*eos] if isinstance(eos, list | tuple) else [eos]) + [getattr(tokenizer, "eos_token_id", None)]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    if not ids:
        raise ValueError("the model has no stop token: neither generation_config.eos_token_id nor the tokenizer's eos")
    return ids


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists so every prompt ends at the same column (generation appends on the right)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (N, Lp)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)  # (N, Lp)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = True
    return ids, mask


def position_ids(mask: Tensor) -> Tensor:
    """Positions that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (N, T)


def sampling_generator(device: torch.device | str, seed: int | None) -> torch.Generator | None:
    """A seeded generator on `device` (None without a seed): the device the logits it samples live on.

    torch.multinomial refuses a generator on another device, so a default (CPU) generator breaks seeded
    sampling from CUDA logits. One helper keeps that choice in one place, checkable without a GPU.
    """
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def sample(logits: Tensor, temperature: float | Tensor, top_p: float | Tensor, *,
           generator: torch.Generator | None = None,
           row_generators: list[torch.Generator | None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The one sampling step every sampler takes: a token per row, with the row's own temperature and
    nucleus mass (scalars apply to every row) and a seeded generator for the batch or per row.

    logits (N, V) -> token (N,), its log-prob under the distribution it was drawn from (N,) float32, and the
    tempered log-probs before the nucleus cut (N, V). The distribution drawn from is softmax(logits / T) cut
    to the top-p nucleus and renormalised: async training weights each token by pi_now / pi_sampler, so it
    needs the sampler's own probability, which the full tempered one understates by the nucleus mass; the
    policy server reports the uncut ones, as OpenAI does. Temperature 0 is greedy: the argmax, with its
    untempered log-prob, and it draws nothing from the generators. A row with its own generator draws from it
    alone, so what it samples does not depend on its batch-mates.
    """
    n = logits.shape[0]
    temps = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(n)  # (N,)
    nucleus = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device).expand(n)  # (N,)
    greedy = temps <= 0.0  # (N,)
    logp = torch.log_softmax(logits.float() / torch.where(greedy, 1.0, temps)[:, None], dim=-1)  # (N, V)
    drawn_logp = logp
    if bool(greedy.all()):
        token = logp.argmax(dim=-1)  # (N,)
    else:
        probs = logp.exp()  # (N, V)
        if bool((nucleus < 1.0).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)  # (N, V)
            outside = (sorted_p.cumsum(dim=-1) - sorted_p > nucleus[:, None]) & (nucleus[:, None] < 1.0)
            sorted_p = sorted_p.masked_fill(outside, 0.0)  # mass before this token already > p
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)  # (N, V)
            # Renormalise over the nucleus; only nucleus tokens are drawn, so the others' values never
            # leave this function. The top token is always kept, so the mass is > 0.
            drawn_logp = logp - sorted_p.sum(dim=-1, keepdim=True).log()  # (N, V)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (N,)
        for i, g in enumerate(row_generators or []):
            if g is not None:
                token[i] = torch.multinomial(probs[i], 1, generator=g)[0]
        token = torch.where(greedy, logp.argmax(dim=-1), token)  # (N,)
    return token, drawn_logp.gather(-1, token[:, None]).squeeze(-1), logp


def sample_token(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """`sample` with one temperature, nucleus and generator for the batch: token (N,), its log-prob (N,)."""
    token, logp, _ = sample(logits, temperature, top_p, generator=gen)
    return token, logp
