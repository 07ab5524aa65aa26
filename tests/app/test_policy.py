"""PolicyEngine and the OpenAI request models without Ray: sampling per row, limits, stop strings,
streamed deltas, usage counts, and the greedy output of the served model equal to HF `generate`."""

from __future__ import annotations

import pytest
import torch

from app.serving.policy import (
    BadRequest,
    GenRequest,
    PolicyEngine,
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
    greedy = sample_rows(logits, torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1e-6, 1e-6]))
    # temperature 0 is argmax; a nucleus of (almost) no mass keeps only the most likely token
    assert torch.equal(greedy, logits.argmax(dim=-1))
    draws = torch.stack([sample_rows(logits[:1].expand(200, -1), torch.ones(200), torch.full((200,), 0.9))])
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
