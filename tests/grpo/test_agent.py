"""Multi-turn agents: tool-call parsing, environments that misbehave, masks and log-prob alignment
across turns, step credit, the built-in environments."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from grpo import loss as L
from grpo.agents.environments import (
    PythonEnv,
    SearchEnv,
    ToolCallError,
    calculate,
    format_tool_call,
    load_corpus,
    make_environment,
    parse_tool_call,
)
from grpo.agents.episodes import (
    AgentSettings,
    Shaping,
    TurnFormat,
    agent_stats,
    concat_agent_rollouts,
    demonstrations,
    run_episodes,
    to_rollout,
)
from grpo.config import ConfigError, GRPOConfig, load_config
from grpo.learner import Learner, score_agent_batch, training_tensors
from grpo.rollout import RolloutWorker
from grpo.sampling import sampling_generator
from grpo.tasks import Sample
from grpo.tiny import build_tokenizer

HERE = str(Path(__file__).parent)


@pytest.fixture
def helpers(monkeypatch):
    monkeypatch.syspath_prepend(HERE)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def worker(tiny_model_dir) -> RolloutWorker:
    return RolloutWorker(tiny_model_dir)


def play(tok, samples, actions, *, env="calculator", max_steps=4, timeout=5.0, concurrency=8, **kw):
    settings = AgentSettings(environment=env, instructions=False, tool_timeout_s=kw.pop("tool_timeout_s", 5.0))
    trajs, _ = asyncio.run(run_episodes(
        samples, group_size=1, make_env=settings.make_env, generate=None, tokenizer=tok, fmt=TurnFormat(tok),
        max_steps=max_steps, max_new_tokens=64, max_total_tokens=10_000, max_prompt_tokens=256, temperature=1.0,
        top_p=1.0, seed=None, concurrency=concurrency, step_timeout_s=timeout, forced=actions, **kw))
    return to_rollout(trajs, group_size=1, pad_id=tok.pad_token_id, version=0, gen_seconds=0.0, tokenizer=tok)


# ---- the tool-call format -------------------------------------------------------------------------


def test_tool_call_parsing_is_strict():
    assert parse_tool_call("the answer is 7") is None
    call = parse_tool_call('thinking... <tool>{"name": "calc", "arguments": {"expr": "1+2"}}</tool>\n')
    assert (call.name, call.arguments) == ("calc", {"expr": "1+2"})
    assert parse_tool_call(format_tool_call("calc", expr="3*4")).arguments == {"expr": "3*4"}
    bad = {
        '<tool>{"name": "calc", "arguments": {"expr": "1"}}': "not closed",
        '<tool>{"name": "calc", arguments: {}}</tool>': "not valid JSON",
        '<tool>{"name": "calc", "arguments": {}, "x": 1}</tool>': "no other keys",
        '<tool>["calc"]</tool>': "no other keys",
        '<tool>{"name": "", "arguments": {}}</tool>': "name must be",
        '<tool>{"name": "calc", "arguments": "1+2"}</tool>': "arguments must be",
        '<tool>{"name": "calc", "arguments": {}}</tool> and more': "text after",
        '<tool><tool>{"name": "calc", "arguments": {}}</tool>': "one tool call",
    }
    for text, message in bad.items():
        with pytest.raises(ToolCallError, match=message):
            parse_tool_call(text)


def test_calculator_tool_is_exact_and_never_evals():
    assert calculate("12*7") == "84"
    assert calculate("(1+2)*-3") == "-9"
    assert calculate("7/2") == "3.5"
    for evil in ("__import__('os')", "2**100", "x+1", ""):
        with pytest.raises(ValueError):
            calculate(evil)


# ---- tools and environments that misbehave --------------------------------------------------------


def test_malformed_and_unknown_calls_become_observations_and_the_episode_goes_on(tok):
    s = Sample("3+4=", "7")
    ro = play(tok, [s], [['<tool>{"name": "calc"</tool>', format_tool_call("nope", x="1"),
                          format_tool_call("calc", y="1"), format_tool_call("calc", expr="3+4"), "7"]], max_steps=5)
    steps = ro.records[0]
    assert [r.get("error") for r in steps] == ["malformed_tool_call", "unknown_tool", "bad_arguments", None, None]
    assert "not valid JSON" in steps[0]["tool_result"] and "unknown tool 'nope'" in steps[1]["tool_result"]
    assert steps[3]["tool_result"] == "7" and steps[4]["done"] and steps[4]["reward"] == 1.0
    assert ro.finish_reasons == ["stop"]
    # shaping: -0.1 per failed call, +0.5 per good one, -0.01 per step
    ro = play(tok, [s], [[format_tool_call("nope", x="1"), format_tool_call("calc", expr="3+4"), "7"]],
              shaping=Shaping(tool_call=0.5, tool_error=-0.1, step=-0.01))
    assert ro.step_rewards[0].tolist() == pytest.approx([-0.11, 0.49, 0.99])
    assert agent_stats(ro) == {"tool_use": 1.0, "tool_calls": 1.0, "tool_errors": 1.0, "agent_steps": 3.0,
                               "env_errors": 0.0, "env_reward": 1.0}


def test_a_tool_that_raises_or_hangs_times_out_and_the_trajectory_continues(tok, helpers):
    s = Sample("q", "done")
    actions = [[format_tool_call("boom", x="1"), format_tool_call("slow", x="1"), format_tool_call("stuck", x="1"),
                format_tool_call("echo", x="hi"), "done"]]
    ro = play(tok, [s], actions, env="agent_helpers:FlakyTools", max_steps=5, tool_timeout_s=0.3)
    steps = ro.records[0]
    assert [r.get("error") for r in steps] == ["tool_error", "tool_timeout", "tool_timeout", None, None]
    assert "ZeroDivisionError: boom" in steps[0]["tool_result"] and "timed out after 0.3s" in steps[1]["tool_result"]
    assert steps[3]["tool_result"] == "hi" and ro.finish_reasons == ["stop"] and ro.step_rewards[0, -1] == 1.0


@pytest.mark.parametrize("env,reason", [("HangingEnv", "env_timeout"), ("SyncHangingEnv", "env_timeout"),
                                        ("RaisingEnv", "env_error")])
def test_an_environment_that_hangs_or_raises_ends_its_trajectory_cleanly(tok, helpers, env, reason):
    ro = play(tok, [Sample("q", "a")] * 2, [["x", "y"]] * 2, env=f"agent_helpers:{env}", timeout=0.5)
    assert ro.finish_reasons == [reason, reason]
    assert all(len(r) == 1 and r[0]["error"] == reason and r[0]["done"] for r in ro.records)
    # the action it made is still there (and trained on with reward 0): nothing after it
    assert tok.decode(ro.completion_ids[0][ro.loss_mask[0]]) == "x"


def test_max_steps_and_token_budget_end_trajectories(tok, helpers):
    ro = play(tok, [Sample("q", "a")], [["a", "b", "c", "d"]], env="agent_helpers:EchoEnv", max_steps=3)
    assert ro.finish_reasons == ["max_steps"] and len(ro.records[0]) == 3
    assert ro.step_rewards[0].tolist() == [0.5, 0.5, 0.5]


# ---- masks and log-prob alignment across turns ----------------------------------------------------


def test_masks_cover_exactly_the_policy_tokens_of_a_hand_built_trajectory(tok):
    s = Sample("12*7=", "84")
    ro = demonstrations([s], AgentSettings(environment="calculator", instructions=False), tok, pad_id=256,
                        max_prompt_tokens=256)
    call = format_tool_call("calc", expr="12*7")
    ids, loss, attn = ro.completion_ids[0], ro.loss_mask[0], ro.completion_mask[0]
    assert tok.decode(ro.prompt_ids[0]) == "12*7="
    assert tok.decode(ids[attn]) == call + "\n<result>84</result>\n84<|eos|>"
    assert tok.decode(ids[loss]) == call + "84<|eos|>"  # the policy's tokens, EOS included
    assert tok.decode(ids[attn & ~loss]) == "\n<result>84</result>\n"  # the observation: attended, not trained
    # every policy token knows its action; observation tokens belong to none
    n_call = len(tok(call, add_special_tokens=False)["input_ids"])
    assert ro.token_step[0][loss].tolist() == [0] * n_call + [1] * 3
    assert (ro.token_step[0][~loss] == -1).all()


def test_sampled_logprobs_line_up_with_the_trainer_across_turns(tiny_model_dir, worker, helpers):
    """Sample multi-turn trajectories (an environment that never ends, so observations sit between
    actions), then recompute every action token's log-prob the way the learner does — both layouts —
    and one token at a time from its exact prefix: all three agree with what the sampler reported."""
    from transformers import AutoModelForCausalLM

    settings = AgentSettings(environment="agent_helpers:EchoEnv", max_steps=3, max_new_tokens=5, max_total_tokens=40)
    samples = [Sample("digit 1:", "1"), Sample("a much longer prompt 22:", "2")]
    ro = worker.generate_agent(samples, settings=settings, group_size=2, seed=5)
    assert (ro.step_mask.sum(1) >= 2).all(), "every trajectory should have several turns"
    obs = ro.completion_mask & ~ro.loss_mask
    assert obs.any() and (ro.logprobs[obs] == 0).all()
    cfg = GRPOConfig(model=tiny_model_dir, eval_size=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    learner = Learner(cfg, model, ref_model=None, pad_id=worker.pad_id)
    with torch.no_grad():
        ids, mask, pos = training_tensors(ro, worker.pad_id)
        full, _ = learner._stats(model, ids, mask, pos, ro.completion_ids, 1.0)
        shared, _ = learner._shared_prefix_stats(model, ro, torch.arange(2), ro.completion_ids, 1.0)
        m = ro.loss_mask
        assert torch.allclose(full[m], ro.logprobs[m], atol=1e-4)
        assert torch.allclose(shared[m], ro.logprobs[m], atol=1e-4)
        # the naive reference: each action token from its own unpadded prefix
        for i in range(ro.completion_ids.shape[0]):
            prefix = ro.prompt_ids[i // 2]
            toks = ro.completion_ids[i][ro.completion_mask[i]].tolist()
            seq = torch.tensor([prefix + toks])
            logits = model(input_ids=seq).logits[0, len(prefix) - 1 : -1]  # (T, V): predicts toks
            ref = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(toks)[:, None]).squeeze(1)
            own = ro.loss_mask[i][ro.completion_mask[i]]
            assert torch.allclose(ref[own], ro.logprobs[i][ro.completion_mask[i]][own], atol=1e-4)


def test_batched_turns_match_one_trajectory_at_a_time(worker, helpers):
    """Many live environments in one batch (left-padded contexts of different lengths) sample exactly
    what one-at-a-time does, greedily."""
    samples = [Sample("digit 3:", "3"), Sample("12+7=", "19"), Sample("a longer prompt here:", "x")]
    out = []
    for concurrency in (1, 64):
        settings = AgentSettings(environment="agent_helpers:EchoEnv", max_steps=3, max_new_tokens=4,
                                 max_total_tokens=30, concurrency=concurrency)
        out.append(worker.generate_agent(samples, settings=settings, group_size=2, temperature=0.0))
    a, b = out
    assert a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_sampling_generator_is_built_on_the_device_it_is_given(monkeypatch):
    """torch.multinomial needs the generator on the logits' device, so the helper must pass the device
    through (a CPU-only machine cannot make a CUDA generator: record what torch.Generator is given)."""
    assert sampling_generator(torch.device("cpu"), None) is None
    real = torch.Generator
    gen = sampling_generator(torch.device("cpu"), 3)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=real().manual_seed(3)))
    given = []

    class Recorder:
        def __init__(self, device=None):
            given.append(device)

        def manual_seed(self, seed):
            given.append(seed)
            return self

    monkeypatch.setattr(torch, "Generator", Recorder)
    assert isinstance(sampling_generator(torch.device("cuda", 1), 7), Recorder)
    assert given == [torch.device("cuda", 1), 7]


def test_seeded_turns_sample_with_a_generator_on_the_models_device(worker, helpers, monkeypatch):
    """run_episodes makes the seeded generator on the turn generator's (the model's) device, not the
    default CPU one that makes seeded multi-turn sampling fail on CUDA."""
    import grpo.agents.episodes as episodes

    real_generator, real_sample = torch.Generator, episodes.sample_token
    made, seen = [], []

    def generator(device=None):  # records the device each generator is made for
        made.append(device)
        return real_generator(device=device or "cpu")

    def sample(logits, temperature, top_p, gen):
        seen.append((gen.device, logits.device))
        return real_sample(logits, temperature, top_p, gen)

    monkeypatch.setattr(torch, "Generator", generator)
    monkeypatch.setattr(episodes, "sample_token", sample)
    settings = AgentSettings(environment="agent_helpers:EchoEnv", max_steps=2, max_new_tokens=3, max_total_tokens=20)
    worker.generate_agent([Sample("digit 1:", "1")], settings=settings, group_size=2, seed=4)
    assert made == [worker.device]  # one generator per call, on the model's device object
    assert seen and all(g == d == worker.device for g, d in seen)


def test_learner_trains_on_policy_tokens_only(tiny_model_dir, worker, helpers):
    """Changing observation tokens' advantages (or their sampling log-probs) cannot move the update."""
    from transformers import AutoModelForCausalLM

    settings = AgentSettings(environment="agent_helpers:EchoEnv", max_steps=2, max_new_tokens=4, max_total_tokens=30)
    ro = worker.generate_agent([Sample("digit 1:", "1"), Sample("digit 2:", "2")], settings=settings,
                               group_size=2, seed=1)
    cfg = GRPOConfig(model=tiny_model_dir, environment="agent_helpers:EchoEnv", credit_assignment="discounted",
                     gamma=0.5, eval_size=0, async_rollouts=True)
    batch = score_agent_batch(ro, cfg)
    assert batch.advantages.shape == ro.completion_ids.shape and batch.num_tokens == int(ro.loss_mask.sum())

    def grads(adv, logps):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        learner = Learner(cfg, model, ref_model=None, pad_id=worker.pad_id)
        learner.optimizer.step = lambda: None  # keep the gradient, skip the update
        learner.optimizer.zero_grad = lambda **k: None
        b = type(batch)(rollout=type(ro)(**{**ro.__dict__, "logprobs": logps}), rewards=batch.rewards,
                        advantages=adv, keep=batch.keep)
        learner.step(b, num_tokens=b.num_tokens, num_seqs=b.num_seqs)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    obs = ro.completion_mask & ~ro.loss_mask
    base = grads(batch.advantages, ro.logprobs)
    assert base.abs().sum() > 0
    noisy = grads(batch.advantages + 5.0 * obs, ro.logprobs + 3.0 * obs)
    assert torch.allclose(base, noisy, atol=1e-6)


def test_grpo_starts_after_the_warmup_with_a_fresh_optimizer(tiny_model_dir, worker):
    """The warm-up trains at sft_learning_rate; GRPO then gets an AdamW with no moments at
    learning_rate (the warm-up's large second moments would otherwise shrink GRPO's steps)."""
    from transformers import AutoModelForCausalLM

    from grpo.trainer import sft_warmup

    cfg = GRPOConfig(model=tiny_model_dir, environment="calculator", tool_instructions=False,
                     max_steps_per_trajectory=3, sft_warmup_steps=3, sft_batch_size=4, sft_learning_rate=1e-2,
                     learning_rate=1e-4, eval_size=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    learner = Learner(cfg, model, ref_model=None, pad_id=worker.pad_id)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen_lrs = []
    step = learner.sft_step
    learner.sft_step = lambda *a, **k: (seen_lrs.append(learner.optimizer.param_groups[0]["lr"]), step(*a, **k))[1]
    loss = sft_warmup(cfg, cfg.load_dataset(), learner, worker.tokenizer, worker.pad_id, rank=0, world=1)
    assert seen_lrs == [1e-2] * 3 and loss > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert learner.optimizer.state == {} and learner.optimizer.param_groups[0]["lr"] == 1e-4


def test_learning_rate_ramps_over_lr_warmup_steps(tiny_model_dir):
    from grpo.learner import scheduled_lr

    cfg = GRPOConfig(model=tiny_model_dir, learning_rate=1e-3, lr_warmup_steps=4, eval_size=0)
    assert [scheduled_lr(cfg, s) for s in (1, 2, 4, 5, 100)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    assert scheduled_lr(cfg.model_copy(update={"lr_warmup_steps": 0}), 1) == 1e-3


# ---- credit assignment ----------------------------------------------------------------------------


def test_discounted_returns_by_hand():
    r = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, True], [True, False, False]])
    out = L.discounted_returns(r, m, 0.5)
    assert out.flatten().tolist() == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert L.discounted_returns(r, m, 1.0)[0].tolist() == pytest.approx([1.5, 1.5, 1.0])


def test_group_step_advantages_reduce_to_group_advantages_with_one_step():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0])
    one = L.group_step_advantages(rewards[:, None], torch.ones(6, 1, dtype=torch.bool), 3)
    assert torch.allclose(one[:, 0], L.group_advantages(rewards, 3), atol=1e-6)
    # pooled over the group's steps, missing steps stay 0
    ret = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    m = torch.tensor([[True, True], [True, False]])
    a = L.group_step_advantages(ret, m, 2, scale=False)
    assert a.flatten().tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])


def test_outcome_credit_gives_every_token_the_group_advantage(tok):
    samples = [Sample("3+4=", "7")]
    good = play(tok, samples, [[format_tool_call("calc", expr="3+4"), "7"]])
    bad = play(tok, samples, [["5"]])
    ro = concat_agent_rollouts([good, bad])
    ro.group_size = 2
    cfg = GRPOConfig(model="gpt2", environment="calculator", eval_size=0)
    batch = score_agent_batch(ro, cfg)
    assert batch.rewards.tolist() == [1.0, 0.0] and batch.advantages.shape == (2,)
    assert batch.advantages[0] > 0 > batch.advantages[1]
    disc = score_agent_batch(ro, cfg.model_copy(update={"credit_assignment": "discounted", "gamma": 0.5}))
    a = disc.advantages  # (2, L): tool-call tokens get the discounted outcome, the answer the full one
    steps = ro.token_step[0]
    assert a[0][steps == 0].unique().numel() == 1 and a[0][steps == 1].unique().numel() == 1
    assert a[0][steps == 1][0] > a[0][steps == 0][0] and (a[0][steps == -1] == 0).all()


# ---- built-in environments and config -------------------------------------------------------------


def test_python_environment_runs_code_and_tests_in_the_sandbox(tok, monkeypatch):
    monkeypatch.setattr(PythonEnv, "timeout_s", 3.0)  # the sandbox's own limit ends the busy loop (and a loaded
    # machine still starts `print(6*7)` within it: at 1 s it timed out while the whole suite ran alongside)
    ds = PythonEnv.load_dataset(8, 0)
    s = ds.train[0]
    ro = play(tok, [s], [[format_tool_call("python", code="print(6*7)"),
                          format_tool_call("python", code="while True: pass"),
                          format_tool_call("test", code="def nope(): pass"), *PythonEnv.demonstration(s)]],
              env="python", max_steps=5, tool_timeout_s=20, timeout=30)
    steps = ro.records[0]
    assert steps[0]["tool_result"].startswith("exit 0") and "42" in steps[0]["tool_result"]
    assert steps[1]["tool_result"].startswith("timed out")
    assert steps[2]["verified"] and not steps[2]["passed"] and steps[2]["tool_result"].startswith("failed")
    assert steps[3]["verified"] and steps[3]["passed"] and steps[3]["tool_result"] == "passed"
    assert steps[4]["reward"] == 1.0


def test_search_corpus_answers_every_question_through_the_tool(tok):
    docs, questions = load_corpus()
    assert len(docs) >= 20 and len(questions) >= 20
    ds = SearchEnv.load_dataset(4, 0)
    samples = ds.train + ds.eval
    ro = play(tok, samples, [SearchEnv.demonstration(s) for s in samples], env="search", concurrency=64)
    assert all(r[-1]["reward"] == 1.0 for r in ro.records), [r[0]["tool_result"] for r in ro.records
                                                            if r[-1]["reward"] != 1.0][:3]
    # the answer is not in the question: the model has to search
    assert all(s.expected.lower() not in s.prompt.lower() for s in samples)


def test_instructions_and_chat_template(tok):
    env = make_environment("calculator")
    text = env.reset(Sample("3+4=", "7"))
    assert "calc" in text and "<tool>" in text and text.endswith("3+4=")
    assert make_environment("calculator", instructions=False).reset(Sample("3+4=", "7")) == "3+4="
    with pytest.raises(ValueError, match="no chat template"):
        TurnFormat(tok, chat=True)
    chat = build_tokenizer()
    chat.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fmt = TurnFormat(chat, chat=True)
    assert fmt.prompt("3+4=") == "<|user|>3+4=<|end|><|assistant|>"
    assert fmt.observation("7") == "<|end|><|tool|>7<|end|><|assistant|>"


def test_config_checks_the_agent_fields(tiny_model_dir, helpers):
    cfg = load_config(None, {"model": tiny_model_dir, "environment": "calculator", "tools": ["calc"]})
    assert cfg.load_dataset().name == "calculator"
    for bad, field in [({"environment": "nope"}, "environment: unknown environment"),
                       ({"environment": "calculator", "tools": ["python"]}, "tools: python not offered"),
                       ({"tools": ["calc"]}, "tools: needs environment"),
                       ({"sft_warmup_steps": 3}, "sft_warmup_steps: needs environment"),
                       ({"environment": "calculator", "task": "countdown"}, "task: leave it out"),
                       ({"environment": "calculator", "credit_assignment": "td"}, "credit_assignment"),
                       ({"environment": "calculator", "gamma": 1.5}, "gamma")]:
        with pytest.raises(ConfigError, match=field):
            load_config(None, {"model": tiny_model_dir, **bad})
    user = load_config(None, {"model": tiny_model_dir, "environment": "agent_helpers:EchoEnv",
                              "dataset": str(Path(HERE) / "agent_rows.jsonl")})
    assert user.load_dataset().train[0].prompt == "digit 1:"


def test_offline_evaluation_of_an_agent_model_plays_greedy_episodes(tiny_model_dir):
    """training.evaluate's engine side for agent jobs: one greedy episode per query, scored by the
    environment's outcome (a random model answers without the tool, so one step and reward 0)."""
    from grpo.evaluate import evaluate_model

    samples = [Sample("12+7=", "19"), Sample("30*2=", "60")]
    res = evaluate_model(tiny_model_dir, samples, reward="exact_match", max_new_tokens=16,
                         agent={"environment": "calculator", "tool_instructions": False, "max_steps_per_trajectory": 2})
    assert res.rewards == [0.0, 0.0] and res.steps is not None and 1 <= res.avg_steps <= 2
    assert len(res.completions) == 2
