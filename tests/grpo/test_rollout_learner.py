"""Rollout sampling and the policy update as plain classes (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.config import GRPOConfig
from grpo.learner import Learner, score_batch, training_tensors
from grpo.rollout import RolloutWorker
from grpo.sampling import concat_rollouts, left_pad, position_ids, sample_token


@pytest.fixture(scope="module")
def worker(tiny_model_dir) -> RolloutWorker:
    return RolloutWorker(tiny_model_dir, torch_threads=1)


def test_generate_shapes_and_finish_reasons(worker):
    r = worker.generate(["digit 1:", "digit 22:"], group_size=3, max_new_tokens=5, seed=0)
    assert r.completion_ids.shape[0] == 6 and r.completion_ids.shape[1] <= 5
    assert len(r.texts) == len(r.finish_reasons) == 6
    for i in range(6):
        n = int(r.lengths[i])
        ended = bool((r.completion_ids[i, :n] == worker.eos_id).any())
        assert r.finish_reasons[i] == ("stop" if ended else "length")
        assert (r.logprobs[i, n:] == 0).all() and (r.logprobs[i, :n] < 0).all()


def test_same_seed_same_samples_and_retries_are_deterministic(worker):
    a = worker.generate(["digit 3:"] * 4, group_size=4, max_new_tokens=6, seed=7)
    b = worker.generate(["digit 3:"] * 4, group_size=4, max_new_tokens=6, seed=7)
    c = worker.generate(["digit 3:"] * 4, group_size=4, max_new_tokens=6, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def _nucleus_mass(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probability mass of the top-p nucleus of each position: (..., V) log-probs -> (...)."""
    p = logp.exp().sort(dim=-1, descending=True).values  # (..., V)
    return (p * (p.cumsum(dim=-1) - p <= top_p)).sum(dim=-1)  # (...)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_logprobs_match_a_full_forward_with_padding(worker, top_p):
    # Prompts of different lengths are left-padded; the KV-cached log-probs must equal what the
    # trainer recomputes on the padded layout (the trainer's ratio relies on it). Under top-p the
    # sampler reports the renormalised nucleus: the full value minus log(nucleus mass).
    r = worker.generate(["digit 1:", "a much longer prompt 9:"], group_size=2, max_new_tokens=6,
                        temperature=0.7, top_p=top_p, seed=3)
    ids, mask, pos = training_tensors(r, worker.pad_id)
    with torch.no_grad():
        logits = worker.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    full = torch.log_softmax(logits[:, -r.completion_ids.shape[1] - 1 : -1].float() / 0.7, dim=-1)  # (N, L, V)
    lp = full.gather(-1, r.completion_ids[..., None]).squeeze(-1) - _nucleus_mass(full, top_p).log()  # (N, L)
    torch.testing.assert_close(lp[r.completion_mask], r.logprobs[r.completion_mask], atol=1e-4, rtol=1e-4)


def test_greedy_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    tok, lp = sample_token(logits, 0.0, 1.0, None)
    assert tok.tolist() == [1, 0]
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1))
    gen = torch.Generator().manual_seed(0)
    draws = [sample_token(logits[:1], 1.0, 0.5, gen) for _ in range(50)]
    assert {int(t) for t, _ in draws} == {1}  # top-p 0.5 keeps only the dominant token...
    assert max(abs(float(lp)) for _, lp in draws) < 1e-6  # ...which the sampler then draws with probability 1


@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.0])
def test_top_p_1_keeps_the_full_tempered_logprob(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.3, -0.2, 1.5, 0.0]])
    tok, lp = sample_token(logits, temperature, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(lp, torch.log_softmax(logits / temperature, -1).gather(-1, tok[:, None]).squeeze(-1))


@pytest.mark.parametrize(("temperature", "top_p", "scaled"), [(1.0, 0.85, 1.0), (0.5, 0.9, 2.0)])
def test_top_p_logprobs_are_the_renormalised_nucleus(temperature, top_p, scaled):
    """logits [2, 1, 0, -1]. At T=1: p = [.644, .237, .087, .032]; the mass before token 2 is .881 >
    0.85, so the nucleus is {0, 1}. At T=0.5 the logits are [4, 2, 0, -2]: p = [.865, .117, .016,
    .002], mass before token 2 .982 > 0.9: nucleus {0, 1} again. Renormalised over the nucleus, with
    d = the tempered logit gap (1 or 2): log p0 = -log(1 + e^-d), log p1 = -d - log(1 + e^-d)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)  # (400, V): one draw per row
    tok, lp = sample_token(logits, temperature, top_p, torch.Generator().manual_seed(0))
    want = {0: -math.log1p(math.exp(-scaled)), 1: -scaled - math.log1p(math.exp(-scaled))}
    assert set(tok.tolist()) == {0, 1}  # both nucleus tokens drawn, nothing outside it
    for t, expected in want.items():
        torch.testing.assert_close(lp[tok == t], torch.full_like(lp[tok == t], expected))
    # what the sampler used is a distribution: the nucleus's probabilities sum to 1
    assert sum(math.exp(v) for v in want.values()) == pytest.approx(1.0)
    assert float(lp[tok == 0][0].exp() + lp[tok == 1][0].exp()) == pytest.approx(1.0, abs=1e-6)


def test_padding_helpers():
    ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[True, True], [False, True]]
    assert position_ids(mask).tolist() == [[0, 1], [0, 0]]


def test_concat_keeps_group_order(worker):
    a = worker.generate(["digit 1:"], group_size=2, max_new_tokens=3, seed=1)
    b = worker.generate(["digit 2:"], group_size=2, max_new_tokens=5, seed=2)
    c = concat_rollouts([a, b])
    assert c.texts == a.texts + b.texts and c.prompt_ids == a.prompt_ids + b.prompt_ids
    assert c.completion_ids.shape == (4, max(a.completion_ids.shape[1], b.completion_ids.shape[1]))
    assert c.num_tokens == a.num_tokens + b.num_tokens


def test_load_weights_changes_samples_and_version(tiny_model_dir, worker):
    other = RolloutWorker(tiny_model_dir)
    sd = {k: v + 0.05 * torch.randn_like(v) for k, v in worker.state_dict().items()}
    other.load_weights(sd, version=3)
    assert other.version == 3
    assert torch.equal(other.state_dict()["lm_head.weight"], sd["lm_head.weight"])
    with pytest.raises(ValueError, match="do not fit"):
        other.load_weights({"nonsense.weight": torch.zeros(1)}, version=4)
    with pytest.raises(RuntimeError, match="no weight board"):
        other.generate(["digit 1:"], group_size=2, max_new_tokens=2, min_version=9)


def _learner(cfg: GRPOConfig, pad_id: int) -> Learner:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(cfg.model)
    ref = AutoModelForCausalLM.from_pretrained(cfg.model) if cfg.kl_coef else None
    return Learner(cfg, model, ref_model=ref, pad_id=pad_id)


@pytest.mark.parametrize("overrides", [{}, {"kl_coef": 0.1}, {"loss_agg": "seq-mean-token-sum-norm",
                                                              "scale_advantages": False}])
def test_update_moves_parameters_towards_rewarded_samples(tiny_model_dir, worker, overrides):
    cfg = GRPOConfig(model=tiny_model_dir, learning_rate=1e-3, max_new_tokens=6, **overrides)
    learner = _learner(cfg, worker.pad_id)
    r = worker.generate(["digit 4:"] * 2, group_size=8, max_new_tokens=6, seed=0)
    # Reward the samples whose first character is '4'-ish: any deterministic, non-constant rule.
    rewards = [float(i % 3 == 0) for i in range(len(r.texts))]
    batch = score_batch(r, rewards, cfg)
    before = {k: v.clone() for k, v in learner.base_model.state_dict().items()}
    ids, mask, pos = training_tensors(r, worker.pad_id)

    def mean_logp(rows):
        with torch.no_grad():
            logits = learner.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        lp = torch.log_softmax(logits[:, -r.completion_ids.shape[1] - 1 : -1], -1)
        lp = lp.gather(-1, r.completion_ids[..., None]).squeeze(-1) * r.completion_mask
        return float(lp[rows].sum() / r.completion_mask[rows].sum())

    good = torch.tensor([x > 0 for x in rewards])
    gap_before = mean_logp(good) - mean_logp(~good)
    stats = learner.step(batch, num_tokens=batch.num_tokens, num_seqs=batch.num_seqs)
    after = learner.base_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert mean_logp(good) - mean_logp(~good) > gap_before  # rewarded samples became likelier
    assert stats["grad_norm"] > 0 and stats["entropy"] > 0
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    if cfg.kl_coef:
        again = learner.step(batch, num_tokens=batch.num_tokens, num_seqs=batch.num_seqs)
        assert again["kl"] > 0  # the updated policy has moved away from the frozen reference


def test_dynamic_sampling_drops_flat_groups_and_still_steps(tiny_model_dir, worker):
    cfg = GRPOConfig(model=tiny_model_dir, dynamic_sampling=True, max_new_tokens=4)
    r = worker.generate(["digit 1:", "digit 2:"], group_size=4, max_new_tokens=4, seed=0)
    batch = score_batch(r, [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0], cfg)
    assert batch.keep.tolist() == [False] * 4 + [True] * 4
    flat = score_batch(r, [0.5] * 8, cfg)
    assert flat.num_seqs == 0
    learner = _learner(cfg, worker.pad_id)
    before = learner.base_model.lm_head.weight.clone()
    stats = learner.step(flat, num_tokens=0, num_seqs=0)  # nothing to learn: a zero-weight pass
    assert torch.equal(before, learner.base_model.lm_head.weight) and stats["loss"] == 0


def test_overlong_penalty_shapes_rewards(tiny_model_dir, worker):
    cfg = GRPOConfig(model=tiny_model_dir, max_new_tokens=6, overlong_buffer=2, overlong_penalty=1.0)
    r = worker.generate(["digit 1:"], group_size=4, max_new_tokens=6, seed=0)
    batch = score_batch(r, [1.0] * 4, cfg)
    for i in range(4):
        n = int(r.lengths[i])
        expected = 1.0 - max(0, n - 4) / 2
        assert float(batch.rewards[i]) == pytest.approx(expected)


def test_prompt_shared_once_per_group_gives_the_same_logprobs_and_update(tiny_model_dir, worker):
    # Prompts of different lengths (left padding) and completions that stop early (right padding).
    r = worker.generate(["digit 1:", "a longer prompt, digit 7:", "x"], group_size=4, max_new_tokens=6, seed=5)
    rewards = [float(i % 2) for i in range(len(r.texts))]
    learners = {}
    for share in (True, False):
        cfg = GRPOConfig(model=tiny_model_dir, max_new_tokens=6, share_prompt_prefix=share, kl_coef=0.1,
                         micro_batch_size=8)
        learners[share] = _learner(cfg, worker.pad_id)
        # Plain SGD so the parameter change IS the gradient: Adam's g/sqrt(v) would blow float noise
        # in near-zero gradients up to a full +-lr step.
        learners[share].optimizer = torch.optim.SGD(learners[share].model.parameters(), lr=1.0)
    shared, plain = learners[True], learners[False]
    ids, mask, pos = training_tensors(r, worker.pad_id)
    with torch.no_grad():
        a = shared._shared_prefix_stats(shared.model, r, torch.arange(3), r.completion_ids, 1.0)
        b = plain._stats(plain.model, ids, mask, pos, r.completion_ids, 1.0)
    m = r.completion_mask
    for x, y in zip(a, b, strict=True):  # log-probs, then entropies
        torch.testing.assert_close(x[m], y[m], atol=2e-5, rtol=1e-4)
    for learner in (shared, plain):
        cfg = learner.cfg
        batch = score_batch(r, rewards, cfg)
        learner.step(batch, num_tokens=batch.num_tokens, num_seqs=batch.num_seqs)
        learner.step(batch, num_tokens=batch.num_tokens, num_seqs=batch.num_seqs)  # KL now non-zero
    for (k, v), (_, w) in zip(shared.base_model.state_dict().items(), plain.base_model.state_dict().items(),
                              strict=True):
        torch.testing.assert_close(v, w, atol=1e-5, rtol=1e-4, msg=k)


def _take_groups(r, groups: list[int]):
    """The rollout of some groups only: what one policy worker sees of a step."""
    from grpo.sampling import Rollout

    g = r.group_size
    rows = torch.tensor([p * g + j for p in groups for j in range(g)])
    return Rollout(prompt_ids=[r.prompt_ids[p] for p in groups], completion_ids=r.completion_ids[rows],
                   completion_mask=r.completion_mask[rows], logprobs=r.logprobs[rows],
                   finish_reasons=[r.finish_reasons[i] for i in rows.tolist()],
                   texts=[r.texts[i] for i in rows.tolist()], group_size=g, version=r.version)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_two_workers_with_global_counts_make_the_one_worker_update(tiny_model_dir, worker, agg):
    """What DDP relies on: each worker's loss over global counts; the gradients of the shards SUM to the
    gradient of the whole batch (DDP averages, and the Learner multiplies by world size)."""
    r = worker.generate(["digit 1:", "digit 22:", "digit 3:", "digit 4:"], group_size=4, max_new_tokens=6, seed=9)
    rewards = [float((i * 7) % 3 == 0) for i in range(16)]
    cfg = GRPOConfig(model=tiny_model_dir, max_new_tokens=6, loss_agg=agg, max_grad_norm=0.0)

    def delta(rollout, raw, num_tokens, num_seqs):
        learner = _learner(cfg, worker.pad_id)
        learner.optimizer = torch.optim.SGD(learner.model.parameters(), lr=1.0)
        before = {k: v.clone() for k, v in learner.base_model.state_dict().items()}
        learner.step(score_batch(rollout, raw, cfg), num_tokens=num_tokens, num_seqs=num_seqs)
        return {k: before[k] - v for k, v in learner.base_model.state_dict().items()}

    whole = score_batch(r, rewards, cfg)
    n_tok, n_seq = whole.num_tokens, whole.num_seqs
    one = delta(r, rewards, n_tok, n_seq)
    a = delta(_take_groups(r, [0, 1]), rewards[:8], n_tok, n_seq)
    b = delta(_take_groups(r, [2, 3]), rewards[8:], n_tok, n_seq)
    for k in one:
        torch.testing.assert_close(a[k] + b[k], one[k], atol=1e-6, rtol=1e-4, msg=k)


def test_without_stop_tokens_every_row_decodes_to_the_limit_on_every_seed(tiny_model_dir):
    worker = RolloutWorker(tiny_model_dir)
    worker.set_stop_ids([])
    for seed in range(6):
        r = worker.generate(["digit 1:", "x"], group_size=4, max_new_tokens=12, seed=seed)
        assert bool((r.lengths == 12).all()) and set(r.finish_reasons) == {"length"}, (seed, r.lengths)


@pytest.mark.parametrize("sync_every", [1, 3])
def test_rows_that_stop_leave_the_decode_batch_and_draw_the_same_tokens(tiny_model_dir, sync_every):
    worker = RolloutWorker(tiny_model_dir)
    prompts = ["digit 1:", "a much longer prompt 7:"]
    worker.set_stop_ids([])
    free = worker.generate(prompts, group_size=4, max_new_tokens=16, seed=5)
    # A row draws the same tokens whatever ends the others: stop on what row 0 drew third and row 5 ninth, and
    # every row's length follows from its free run
    stops = sorted({int(free.completion_ids[0, 2]), int(free.completion_ids[5, 8])})
    expected = [next((k + 1 for k, tok in enumerate(row) if tok in stops), 16) for row in free.completion_ids.tolist()]
    assert min(expected) < 16 and len(set(expected)) > 1
    worker.set_stop_ids(stops)
    batches: list[int] = []
    hook = worker.model.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    try:
        plain = worker.generate(prompts, group_size=4, max_new_tokens=16, seed=5, compact=False, sync_every=1)
        plain_batches, batches[:] = batches[:], []
        packed = worker.generate(prompts, group_size=4, max_new_tokens=16, seed=5, compact=True, sync_every=sync_every)
    finally:
        hook.remove()
    assert plain.lengths.tolist() == expected == packed.lengths.tolist()
    width = plain.completion_ids.shape[1]
    assert not packed.completion_mask[:, width:].any()  # columns after the last read of the device: all stopped
    assert torch.equal(packed.completion_ids[:, :width], plain.completion_ids)
    torch.testing.assert_close(packed.logprobs[:, :width], plain.logprobs, atol=1e-4, rtol=1e-4)
    assert packed.finish_reasons == plain.finish_reasons
    for i, n in enumerate(expected):
        assert packed.completion_ids[i, :n].tolist() == free.completion_ids[i, :n].tolist()
    # the uncompacted loop runs every decode step on all 8 rows; the compacted one on the rows still sampling
    assert set(plain_batches[1:]) == {8}
    alive_after = [sum(n > t for n in expected) for t in range(1, 16)]
    assert min(batches[1:]) < 8 and sum(batches[1:]) < sum(plain_batches[1:])
    assert all(b >= a for b, a in zip(batches[1:], alive_after, strict=False))  # never drops a row still sampling
