"""PolicyEngine and the OpenAI request models without Ray: sampling per row, limits, stop strings,
streamed deltas, usage counts, and the greedy output of the served model equal to HF `generate`."""

from __future__ import annotations

import pytest
import torch

from app.serving.policy import (
    BadRequest,
    GenRequest,
    PolicyEngine,
    _completion_reply,
    parse_request,
    sample_rows,
    weights_digest,
)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> PolicyEngine:
    return PolicyEngine(tiny_model_dir, device="cpu", torch_threads=1)


def test_sample_rows_greedy_and_nucleus_per_row():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy, logp = sample_rows(logits, torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1e-6, 1e-6]))
    # temperature 0 is argmax; a nucleus of (almost) no mass keeps only the most likely token
    assert torch.equal(greedy, logits.argmax(dim=-1))
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1))  # temperature 1 and greedy: the model's own
    draws = torch.stack([sample_rows(logits[:1].expand(200, -1), torch.ones(200), torch.full((200,), 0.9))[0]])
    top = logits[0].softmax(-1).sort(descending=True)
    kept = top.indices[: int((top.values.cumsum(0) - top.values <= 0.9).sum())]
    assert set(draws.flatten().tolist()) <= set(kept.tolist()) and len(set(draws.flatten().tolist())) > 1


def test_greedy_generation_equals_hf_generate(engine, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert engine.digest == weights_digest(model)
    prompts = ["digit 3:", "hello there"]
    ids = [engine.encode(p) for p in prompts]
    # in one batch with other rows of other lengths and limits, each row decodes as it would alone
    out = engine.generate([GenRequest(ids[0], 7, 0.0, 1.0), GenRequest(ids[1], 3, 0.0, 1.0, n=2),
                           GenRequest(engine.encode("x"), 5, 1.0, 0.9)])
    for p, res, limit in zip(ids, out[:2], (7, 3), strict=False):
        ref = model.generate(torch.tensor([p]), max_new_tokens=limit, do_sample=False)[0, len(p):]
        want = engine.tokenizer.decode(ref, skip_special_tokens=True)
        assert all(t == want for t in res.texts)
        assert res.prompt_tokens == len(p) and res.completion_tokens == limit * len(res.texts)
        assert res.finish_reasons == ["length"] * len(res.texts)


def test_stop_strings_cut_the_text_and_stream_deltas_add_up(engine):
    ids = engine.encode("digit 3:")
    (full,) = engine.generate([GenRequest(ids, 12, 0.0, 1.0)])
    stop = full.texts[0][4:6]  # a string the greedy completion is known to contain
    deltas: list[tuple[int, str, str | None]] = []
    (res,) = engine.generate([GenRequest(ids, 12, 0.0, 1.0, stop=[stop],
                                         on_delta=lambda j, t, f: deltas.append((j, t, f)))])
    assert res.texts[0] == full.texts[0][: full.texts[0].find(stop)] and res.finish_reasons == ["stop"]
    assert "".join(t for _, t, _ in deltas) == res.texts[0]
    assert deltas[-1][2] == "stop" and all(f is None for _, _, f in deltas[:-1])


def test_requests_are_validated_with_the_field_named(engine):
    with pytest.raises(BadRequest, match="max_tokens") as err:
        parse_request("completion", {"prompt": "x", "max_tokens": 0})
    assert err.value.param == "max_tokens" and err.value.status == 400
    with pytest.raises(BadRequest, match="stop"):
        parse_request("completion", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})
    with pytest.raises(BadRequest, match="messages"):
        parse_request("chat", {"messages": []})
    chat = parse_request("chat", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3,
                                  "presence_penalty": 0})
    assert chat.max_completion_tokens == 3 and chat.stop == []
    with pytest.raises(BadRequest, match="context"):
        engine.check_fits(engine.encode("x" * 10), 4096, "prompt")
    assert engine.chat_prompt(chat.messages).endswith("assistant:")


def test_incremental_detokenisation_equals_a_full_decode(engine):
    """Byte tokens split multi-byte characters: the decoder holds a partial one back and never re-decodes all."""
    from app.serving.policy import IncrementalDecoder

    tok = engine.tokenizer
    for text in ["digit 3: 333", "naïve café — ✓ 日本語 🙂 end", "a\nb\tc  d"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        dec, pieces = IncrementalDecoder(tok), []
        for i in ids:
            pieces.append(dec.push(i))
            assert "\ufffd" not in pieces[-1]
        pieces.append(dec.finish())
        assert "".join(pieces) == dec.text == tok.decode(ids, skip_special_tokens=True) == text
    cut = IncrementalDecoder(tok)  # a stream that ends inside a character: what a full decode gives
    for i in list("é".encode())[:1]:
        assert cut.push(i) == ""
    cut.finish()
    assert cut.text == tok.decode(list("é".encode())[:1])


def test_a_seed_makes_sampling_repeatable_whatever_the_batch(engine):
    ids = engine.encode("digit 3:")

    def sample(*others: GenRequest) -> list[str]:
        return engine.generate([GenRequest(ids, 8, 1.0, 1.0, n=3, seed=42), *others])[0].texts

    alone = sample()
    assert sample(GenRequest(engine.encode("hello"), 5, 1.0, 1.0, n=4)) == alone  # batch-mates change nothing
    assert len(set(alone)) > 1  # each of the n its own stream
    assert engine.generate([GenRequest(ids, 8, 1.0, 1.0, n=3, seed=43)])[0].texts != alone


def test_logprobs_are_the_sampled_tokens_and_the_top_alternatives(engine):
    ids = engine.encode("digit 3:")
    (res,) = engine.generate([GenRequest(ids, 5, 0.0, 1.0, logprobs=3)])
    (rows,) = res.logprobs
    assert len(rows) == 5 and engine.tokenizer.decode([t for t, _, _ in rows]) == res.texts[0]
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([ids + [t for t, _, _ in rows]])).logits[0]
    want = torch.log_softmax(logits.float(), -1)[len(ids) - 1 : -1]
    for pos, (t, lp, alts) in enumerate(rows):
        assert lp == pytest.approx(float(want[pos, t]), abs=1e-4)
        assert [a for a, _ in alts] == want[pos].topk(3).indices.tolist() and alts[0][0] == t  # greedy: the top
    reply = _completion_reply("chat", "x", "m", [res], decode=engine.token_text)
    content = reply["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == [lp for _, lp, _ in rows] and len(content[0]["top_logprobs"]) == 3


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.8, 0.9)])
def test_rollouts_agent_turns_and_the_policy_server_draw_the_same_tokens_for_a_seed(engine, tiny_model_dir,
                                                                                    temperature, top_p):
    """One sampling step (grpo.sampling.sample) behind all three samplers: the same model, prompt and seed give
    the same tokens whichever path samples them."""
    from grpo.agents.episodes import TurnGenerator
    from grpo.rollout import RolloutWorker
    from grpo.sampling import sampling_generator

    worker = RolloutWorker(tiny_model_dir, torch_threads=1)
    ids = engine.encode("digit 3:")
    ro = worker.generate(["digit 3:"], group_size=1, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=7)
    rollout = ro.completion_ids[0][ro.completion_mask[0]].tolist()
    turns = TurnGenerator(worker.model, worker.tokenizer, pad_id=worker.pad_id, eos_ids=worker.stop_ids,
                          device=worker.device)
    (agent, _, _), = turns([ids], [10], temperature=temperature, top_p=top_p, gen=sampling_generator("cpu", 7))
    (served,) = engine.generate([GenRequest(ids, 10, temperature, top_p, seed=7, logprobs=0)])
    server = [t for t, _, _ in served.logprobs[0]]
    assert len(rollout) >= 3 and rollout == agent == server
    other = worker.generate(["digit 3:"], group_size=1, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=8)
    assert other.completion_ids[0][other.completion_mask[0]].tolist() != rollout  # the seed is what decides


def test_completion_top_logprobs_keyed_by_text_keep_the_likelier_of_two_ids_with_one_text():
    from app.serving.policy import _logprobs

    out = _logprobs("completion", [(65, -0.1, [(65, -0.1), (200, -1.0), (201, -2.0)])],
                    decode=lambda t: "A" if t == 65 else "\ufffd")
    assert out["top_logprobs"] == [{"A": -0.1, "\ufffd": -1.0}] and out["tokens"] == ["A"]


def test_a_checkpoint_in_a_bucket_serves_the_same_model(engine, tiny_model_dir, s3_bucket, tmp_path, monkeypatch):
    """models.deploy of a checkpoint whose run kept its files at a storage URL: the engine loads this node's
    copy of it, the same weights and the same greedy text as the local folder."""
    from pathlib import Path

    from grpo import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    url = f"{s3_bucket}/jobs/job_x/run/checkpoint_1"
    storage.upload(Path(tiny_model_dir), url)
    remote = PolicyEngine(url, device="cpu", torch_threads=1)
    assert remote.path == url and remote.digest == engine.digest
    ids = engine.encode("digit 3:")
    assert remote.generate([GenRequest(ids, 5, 0.0, 1.0)])[0].texts == engine.generate([GenRequest(ids, 5, 0.0, 1.0)])[0].texts
