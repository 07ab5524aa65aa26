"""Instruct-shaped models: prompts through the chat template, every listed stop token ends a completion.

The model is grpo.tiny's chat variant (Qwen2-shaped, ChatML template, generation_config listing <|im_end|>
and <|eos|>), built offline like the base tiny model.
"""

from __future__ import annotations

import json

import pytest
import torch

from grpo.rollout import RolloutWorker
from grpo.sampling import PromptFormat, stop_token_ids
from grpo.tasks import Sample, read_jsonl

IM_END, EOS = 260, 257


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> str:
    from grpo.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2-chat", arch="qwen2", hidden_size=64,
                               num_layers=2, chat=True))


@pytest.fixture(scope="module")
def chat_worker(chat_model_dir) -> RolloutWorker:
    return RolloutWorker(chat_model_dir, torch_threads=1)


def test_chat_model_lists_two_stop_tokens(chat_worker):
    assert chat_worker.stop_ids == [IM_END, EOS]  # generation_config's list; the tokenizer's eos is only 257
    assert chat_worker.tokenizer.eos_token_id == EOS


def test_prompts_get_exactly_the_templates_ids(chat_worker):
    tok = chat_worker.tokenizer
    text = "digit 3:"
    conversation = (("system", "Answer with one digit."), ("user", "digit 3:"))
    got = chat_worker.encode_prompts([text, conversation])
    assert got[0] == tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert got[1] == tok.apply_chat_template([{"role": r, "content": c} for r, c in conversation],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got[0][0] == 259 and got[0][-len("assistant\n") - 1] == 259  # <|im_start|>user ... <|im_start|>assistant
    # forced raw text: the bytes as written, no template and no special tokens
    raw = RolloutWorker.__new__(RolloutWorker)
    raw.format, raw.max_prompt_tokens = PromptFormat(tok, chat=False), 256
    assert raw.encode_prompts([text]) == [list(text.encode())]


def test_base_model_keeps_raw_prompts_and_a_forced_template_fails(tiny_model_dir):
    worker = RolloutWorker(tiny_model_dir)
    assert worker.format.chat is False and worker.encode_prompts(["digit 3:"]) == [list(b"digit 3:")]
    with pytest.raises(ValueError, match="chat_template: the tokenizer has no chat template"):
        RolloutWorker(tiny_model_dir, chat_template=True)


class _Force:
    """Adds a large logit to one token, so even sampling at temperature 1 picks it."""

    def __init__(self, model, token: int):
        self.token, self.handle = token, model.lm_head.register_forward_hook(self)

    def __call__(self, module, args, out):
        out = out.clone()
        out[..., self.token] += 1e4
        return out


@pytest.mark.parametrize("stop", [IM_END, EOS])
def test_a_completion_stops_at_each_listed_stop_token(chat_worker, stop):
    force = _Force(chat_worker.model, stop)
    try:
        ro = chat_worker.generate(["digit 3:", "digit 4:"], group_size=3, max_new_tokens=8, seed=0)
    finally:
        force.handle.remove()
    assert ro.finish_reasons == ["stop"] * 6
    assert ro.completion_ids.shape[1] == 1 and (ro.completion_ids[:, 0] == stop).all()
    assert ro.completion_mask.all()  # the stop token is the completion's last trained token


@pytest.mark.parametrize("stop", [IM_END, EOS])
def test_agent_turns_and_the_policy_server_stop_at_each_listed_token(chat_worker, chat_model_dir, stop):
    from app.serving.policy import GenRequest, PolicyEngine
    from grpo.agents.episodes import TurnGenerator

    turns = TurnGenerator(chat_worker.model, chat_worker.tokenizer, pad_id=chat_worker.pad_id,
                          eos_ids=chat_worker.stop_ids, device=chat_worker.device)
    force = _Force(chat_worker.model, stop)
    try:
        out = turns([chat_worker.encode_prompts(["digit 3:"])[0]], [8], temperature=1.0, top_p=1.0, gen=None)
    finally:
        force.handle.remove()
    assert out[0][0] == [stop] and out[0][2] == "eos"

    engine = PolicyEngine(chat_model_dir, device="cpu", torch_threads=1)
    assert engine.stop_ids == {IM_END, EOS}
    force = _Force(engine.model, stop)
    try:
        res = engine.generate([GenRequest(prompt_ids=engine.encode("digit 3:"), max_tokens=8, temperature=1.0,
                                          top_p=1.0, n=2, stop=[])])
    finally:
        force.handle.remove()
    assert res[0].finish_reasons == ["stop", "stop"] and res[0].texts == ["", ""]


def test_stop_token_ids_reads_lists_ints_and_the_tokenizer():
    class Tok:
        eos_token_id = 5

    class Gen:
        eos_token_id = [7, 5]

    assert stop_token_ids(Tok(), Gen()) == [7, 5]
    Gen.eos_token_id = 9
    assert stop_token_ids(Tok(), Gen()) == [9, 5]
    assert stop_token_ids(Tok(), None) == [5]
    Tok.eos_token_id = None
    with pytest.raises(ValueError, match="no stop token"):
        stop_token_ids(Tok(), None)


def test_jsonl_rows_may_be_message_lists(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "digit 3:"}],
             "expected_outcome": "3"},
            {"query": "digit 4:", "expected_outcome": "4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = read_jsonl(path)
    assert a == Sample("digit 3:", "3", (("system", "Be brief."), ("user", "digit 3:")))
    assert a.input == (("system", "Be brief."), ("user", "digit 3:")) and b.input == "digit 4:"
    for bad, field in (([], "non-empty list"), ([{"role": "user"}], r"\[0\] must be"),
                       ([{"role": "wizard", "content": "x"}], r"\[0\] must be"),
                       ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "end with a user")):
        path.write_text(json.dumps({"messages": bad, "expected_outcome": "1"}) + "\n")
        with pytest.raises(ValueError, match=f"rows.jsonl:1: field 'messages'.*{field}"):
            read_jsonl(path)


def test_sampling_log_probs_are_those_of_the_template_context(chat_worker):
    """The rollout's prompt ids are the template's and its log-probs are the model's on exactly that context:
    what the learner recomputes from prompt_ids + completion matches what was sampled."""
    conversation = (("system", "Be brief."), ("user", "digit 3:"))
    ro = chat_worker.generate([conversation], group_size=2, max_new_tokens=4, seed=1)
    assert ro.prompt_ids[0] == chat_worker.encode_prompts([conversation])[0]
    for row in range(2):
        n = int(ro.completion_mask[row].sum())
        completion = ro.completion_ids[row, :n].tolist()
        ids = torch.tensor([ro.prompt_ids[0] + completion])
        with torch.no_grad():
            logits = chat_worker.model(input_ids=ids).logits[0, len(ro.prompt_ids[0]) - 1 : -1].float()
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        torch.testing.assert_close(ro.logprobs[row, :n], want, atol=1e-4, rtol=1e-4)


# ---- tools through the chat template -------------------------------------------------------------


def test_template_tool_calls_parse_like_ours():
    from grpo.agents.environments import ToolCall, ToolCallError, parse_tool_call

    assert parse_tool_call('<tool_call>{"name": "calc", "arguments": {"expr": "2*3"}}</tool_call>') == \
        ToolCall("calc", {"expr": "2*3"})
    assert parse_tool_call('think first <tool>{"name": "calc", "arguments": {}}</tool>') == ToolCall("calc", {})
    assert parse_tool_call("the answer is 6") is None
    with pytest.raises(ToolCallError, match="expected </tool_call>"):
        parse_tool_call('<tool_call>{"name": "calc", "arguments": {}}')
    with pytest.raises(ToolCallError, match="text after </tool_call>"):
        parse_tool_call('<tool_call>{"name": "calc", "arguments": {}}</tool_call> and more')
    with pytest.raises(ToolCallError, match="one tool call per turn"):
        parse_tool_call('<tool_call>{"name": "calc", <tool>x</tool>}</tool_call>')


def test_a_template_that_takes_tools_gets_them_and_the_environment_writes_no_instructions(chat_worker,
                                                                                          tiny_model_dir):
    from grpo.agents.environments import make_environment
    from grpo.agents.episodes import TurnFormat

    tok = chat_worker.tokenizer
    env = make_environment("calculator")
    sample = env.load_dataset(eval_size=0, seed=0).train[0]
    fmt = TurnFormat(tok)
    assert fmt.chat and fmt.template_tools
    tools = fmt.tools_for(env)
    assert [t["function"]["name"] for t in tools] == ["calc"] and tools[0]["function"]["parameters"]["required"]
    first = env.reset(sample)
    assert first == sample.prompt  # the template states the tools, not our written instructions
    assert fmt.prompt(first, tools) == tok.apply_chat_template([{"role": "user", "content": sample.prompt}],
                                                              tools=tools, add_generation_prompt=True,
                                                              tokenize=False)
    assert '"name": "calc"' in fmt.prompt(first, tools)

    plain = make_environment("calculator")  # a base model without a template: our instructions, as before
    base = TurnFormat(RolloutWorker(tiny_model_dir).tokenizer)
    assert base.tools_for(plain) is None and "<tool>" in plain.reset(sample)


class _Spell:
    """Forces the model to spell `text` (a byte tokenizer: one token a byte), one token per forward."""

    def __init__(self, model, text: bytes):
        self.ids, self.i = list(text), 0
        self.handle = model.lm_head.register_forward_hook(self)

    def __call__(self, module, args, out):
        out = out.clone()
        out[:, -1, self.ids[min(self.i, len(self.ids) - 1)]] += 1e4
        self.i += 1
        return out


@pytest.mark.parametrize("close", ["</tool>", "</tool_call>"])
def test_an_agent_turn_ends_at_either_closing_tag(chat_worker, close):
    from grpo.agents.episodes import TurnGenerator

    turns = TurnGenerator(chat_worker.model, chat_worker.tokenizer, pad_id=chat_worker.pad_id,
                          eos_ids=chat_worker.stop_ids, device=chat_worker.device)
    spell = _Spell(chat_worker.model, b"x" + close.encode() + b"more text")
    try:
        ((ids, _, reason),) = turns([chat_worker.encode_prompts(["q"])[0]], [40], temperature=1.0, top_p=1.0,
                                    gen=None)
    finally:
        spell.handle.remove()
    assert bytes(ids).decode() == "x" + close and reason == "stop"


def test_the_policy_server_renders_tools_and_returns_tool_calls(chat_model_dir, tiny_model_dir):
    import json as _json

    from app.serving.policy import BadRequest, GenResult, PolicyEngine, _completion_reply, parse_request

    engine = PolicyEngine(chat_model_dir, device="cpu", torch_threads=1)
    calc = {"type": "function", "function": {"name": "calc", "description": "arithmetic",
                                             "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}
    req = parse_request("chat", {"messages": [
        {"role": "user", "content": "2*3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"expr": "2*3"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "6"}], "tools": [calc]})
    prompt = engine.chat_prompt(req.messages, req.tools)
    assert prompt == engine.tokenizer.apply_chat_template([m.turn() for m in req.messages], tools=[calc],
                                                         tokenize=False, add_generation_prompt=True)
    assert '"name": "calc"' in prompt and "<|im_start|>tool\n6<|im_end|>" in prompt

    called = GenResult(texts=['sure <tool_call>{"name": "calc", "arguments": {"expr": "7*8"}}</tool_call>'],
                       finish_reasons=["stop"], prompt_tokens=3, completion_tokens=9)
    choice = _completion_reply("chat", "x", "m", [called], tools=True)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "sure"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "calc" and _json.loads(call["function"]["arguments"]) == {"expr": "7*8"}
    plain = _completion_reply("chat", "x", "m", [called], tools=False)["choices"][0]  # no tools asked: text
    assert plain["finish_reason"] == "stop" and "tool_calls" not in plain["message"]

    with pytest.raises(BadRequest, match="tools: this model has no chat template") as err:
        PolicyEngine(tiny_model_dir, device="cpu", torch_threads=1).chat_prompt(req.messages, req.tools)
    assert err.value.param == "tools"
