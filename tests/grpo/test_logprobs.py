"""Log-probs and entropy in chunks (grpo.logprobs): the same numbers and gradients as the full logits, with a
peak memory that does not grow with batch x length x vocabulary."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo import logprobs, memory
from grpo import loss as L


def _model(vocab: int, *, hidden: int = 32, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _inputs(vocab: int, b: int, t: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t + 4), generator=g)  # 4 prompt tokens, t completion tokens
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, pos, ids[:, 4:]


def _full(model, ids, mask, pos, targets, temperature):
    """Today's reference: the whole (B, T, V) logits, upcast, then log-softmax statistics."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                   logits_to_keep=targets.shape[1] + 1).logits[:, :-1].float()
    return L.token_logprobs(logits, targets, temperature), L.entropy(logits.detach(), temperature)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
@pytest.mark.parametrize("tie", [False, True])
def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits(chunk, tie):
    temperature = 0.7
    ids, mask, pos, targets = _inputs(300, 3, 9)
    grads = []
    results = []
    for chunked in (False, True):
        model = _model(300, tie=tie)
        if chunked:
            logp, ent = logprobs.token_stats(model, targets, temperature=temperature, chunk_tokens=chunk,
                                             input_ids=ids, attention_mask=mask, position_ids=pos,
                                             logits_to_keep=targets.shape[1] + 1)
        else:
            logp, ent = _full(model, ids, mask, pos, targets, temperature)
        # a loss that weighs tokens differently, so every position's gradient counts
        w = torch.linspace(-1.0, 2.0, logp.numel()).reshape(logp.shape)
        (logp * w).sum().backward()
        results.append((logp.detach(), ent))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert not ent.requires_grad
        assert type(model.lm_head).__name__ == "Linear", "the output embedding is put back after the forward"
    (lp_a, ent_a), (lp_b, ent_b) = results
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, atol=1e-5, rtol=1e-5)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_the_head_is_restored_when_the_forward_raises():
    model = _model(64)
    head = model.lm_head
    with pytest.raises(RuntimeError):
        logprobs.token_stats(model, torch.zeros(1, 3, dtype=torch.long), input_ids=torch.zeros(1, 2, dtype=torch.long),
                             logits_to_keep=4)  # 3 targets but only 2 positions: the reshape fails
    assert model.lm_head is head


def test_bf16_autocast_matches_the_full_logits_under_the_same_autocast():
    ids, mask, pos, targets = _inputs(200, 2, 6)
    model = _model(200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = _full(model, ids, mask, pos, targets, 1.0)
        b, _ = logprobs.token_stats(model, targets, chunk_tokens=5, input_ids=ids, attention_mask=mask,
                                    position_ids=pos, logits_to_keep=targets.shape[1] + 1)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)  # bf16 logits, the same upcast: bit for bit


def _peak_of_step(vocab: int, chunked: bool, *, b: int = 16, t: int = 128, chunk: int = 256) -> int:
    """Peak resident bytes above the resting set of one forward + backward of the log-prob loss."""
    model = _model(vocab, hidden=32)
    ids, mask, pos, targets = _inputs(vocab, b, t)
    gc.collect()
    base = memory.resident_bytes()
    memory.reset_peak()
    if chunked:
        logp, _ = logprobs.token_stats(model, targets, chunk_tokens=chunk, input_ids=ids, attention_mask=mask,
                                       position_ids=pos, logits_to_keep=t + 1)
    else:
        logp, _ = _full(model, ids, mask, pos, targets, 1.0)
    logp.sum().backward()
    peak = memory.peak_bytes() - base
    del model, logp
    gc.collect()
    return peak


def test_peak_memory_is_flat_in_vocabulary_beyond_one_chunk():
    """16 x 128 positions; vocabulary 4k -> 32k. The full logits grow by 16*128*28k*4 B = 224 MiB at least
    (more with their gradient); the chunked step may grow by a few 256-position blocks (28 MiB each) and the
    larger embedding and its gradient (about 7 MiB)."""
    if memory.resident_bytes() == 0:
        pytest.skip("no /proc/self/status: resident memory cannot be read here")
    _peak_of_step(1024, True)  # warm the allocator and the kernels once
    grow_full = _peak_of_step(32768, False) - _peak_of_step(4096, False)
    grow_chunked = _peak_of_step(32768, True) - _peak_of_step(4096, True)
    one_full = 16 * 128 * (32768 - 4096) * 4
    one_chunk = 256 * (32768 - 4096) * 4
    print(f"peak growth 4k -> 32k vocabulary: full logits {grow_full / 2**20:.0f} MiB, "
          f"chunked {grow_chunked / 2**20:.0f} MiB")
    assert grow_full >= one_full
    assert grow_chunked <= 6 * one_chunk + 16 * 2**20
