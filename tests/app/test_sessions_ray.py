"""Training sessions (sessions.*) over HTTP on the real job API on Ray Serve, driven by the SDK: the docs'
client loop runs, an update goes the way of its advantages, state saved in one session continues in another, the idle timeout frees
the resources, another user cannot touch a session, bad input gets a clear JSON-RPC error."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import httpx
import pytest
from raygrpo_test_services import serve_stack

from app.client import sdk

pytestmark = [pytest.mark.ray]
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "session_grpo.py"


@pytest.fixture(scope="module")
def stack(ray_session, tmp_path_factory, tiny_model_dir):
    from app.api.auth import mint_token
    from app.settings import Settings

    home = tmp_path_factory.mktemp("sessions-home")
    with serve_stack(home, tiny_model_dir, RAYGRPO_RATE_LIMITS="default=0") as url:
        settings = Settings(home=home)
        tokens = {name: mint_token(settings, f"{name}-user", "researcher") for name in ("alice", "bob")}
        tokens["admin"] = mint_token(settings, "admin-user", "admin")
        yield url, tokens, home


@pytest.fixture(scope="module")
def alice(stack):
    url, tokens, _ = stack
    with sdk.Client(url, token=tokens["alice"], timeout=600) as c:
        yield c


@pytest.fixture(scope="module")
def bob(stack):
    url, tokens, _ = stack
    with sdk.Client(url, token=tokens["bob"], timeout=600) as c:
        yield c


@pytest.fixture(scope="module")
def session(alice):
    s = alice.create_session(cpus_per_worker=0.5, idle_timeout_s=900, max_rows=8)
    yield s
    s.close()


def _wait(predicate, timeout_s: float = 180.0, what: str = "condition"):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(samples: list[dict], advantages: list[float]) -> list[dict]:
    rows = []
    for s, adv in zip(samples, advantages, strict=True):
        n = len(s["prompt_tokens"]) - 1
        rows.append({"tokens": s["prompt_tokens"] + s["tokens"], "weights": [0.0] * n + [1.0] * len(s["tokens"]),
                     "advantages": adv, "logprobs": [0.0] * n + s["logprobs"]})
    return rows


def test_the_docs_client_loop_runs_its_steps_and_closes_its_session(alice):
    """The docs' example loop, four steps: sample, score, advantages, update, and the session closed with its
    steps and cost. (Run to its target it learns the digit task like the engine does; the suite keeps one
    learning run, test_engine_ray.py's, and checks here that a session's update goes the advantages' way.)"""
    spec = importlib.util.spec_from_file_location("session_grpo", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    lines: list[str] = []
    out = example.train(alice, steps=4, target=2.0, log=lines.append, idle_timeout_s=600, cpus_per_worker=0.5)
    assert out["steps"] == 4 and len(lines) == 4 and 0.0 <= out["reward"] <= 1.0, lines
    info = alice.session(out["session_id"]).info()
    assert info["status"] == "closed" and info["steps"] == 4 and float(info["cost_usd"]) > 0


def test_a_grpo_update_raises_what_it_rewards_and_lowers_what_it_penalises(alice):
    """The direction of learning: one "grpo" step on a fresh session raises the objective it was given, the
    advantage-weighted log-likelihood of the sampled completions (a sign error in the session's loss would
    pass every other test here)."""
    with alice.create_session(cpus_per_worker=0.5, max_rows=8, seed=0) as s:
        samples = s.sample(["digit 3:", "digit 7:"], num_samples=2, max_tokens=5, seed=11).result()["samples"]
        advantages = [1.0, -1.0, 1.0, -1.0]
        s.forward_backward(_rows(samples, advantages), "grpo")
        s.optim_step(learning_rate=1e-3).result()
        after = s.forward_backward(_rows(samples, advantages), "cross_entropy").result()["logprobs"]
    # before the step: the sampler's log-probs, which are the trainer's (the next test)
    gain = sum(adv * (sum(a[-len(x["tokens"]):]) - sum(x["logprobs"]))
               for x, adv, a in zip(samples, advantages, after, strict=True))
    assert gain > 0, gain


def test_the_sampler_reports_the_log_probs_the_trainer_computes(session):
    """On-policy means ratio 1: the trainer's log-probs of the sampled tokens equal the sampler's."""
    samples = session.sample(["digit 4:"], num_samples=4, max_tokens=6, seed=1).result()["samples"]
    rows = _rows(samples, [0.0] * 4)
    out = session.forward_backward(rows, "cross_entropy", {"normalize": "sum"}).result()
    for s, lp in zip(samples, out["logprobs"], strict=True):
        assert lp[-len(s["tokens"]):] == pytest.approx(s["logprobs"], abs=1e-4)
    # the weighted sum of -log p is the loss
    assert out["metrics"]["loss"] == pytest.approx(-sum(sum(s["logprobs"]) for s in samples), rel=1e-4)
    session.optim_step(learning_rate=1e-9).result()  # the accumulated gradient goes; the model barely moves


def test_state_saved_in_one_session_continues_identically_in_another(alice, session):
    samples = session.sample(["digit 1:", "digit 2:"], num_samples=2, max_tokens=5, seed=3).result()["samples"]
    rows = _rows(samples, [1.0, -1.0, 0.5, -0.5])
    for _ in range(2):
        session.forward_backward(rows, "ppo")
        session.optim_step(learning_rate=1e-3)
    saved = session.save_state("two-steps").result()
    assert saved["state_id"] == f"{session.id}/two-steps"
    session.forward_backward(rows, "ppo")
    session.optim_step(learning_rate=1e-3)
    after_a = session.forward_backward(rows, "cross_entropy").result()["logprobs"]
    session.optim_step(learning_rate=1e-9).result()

    with alice.create_session(cpus_per_worker=0.5, max_rows=8) as other:
        assert other.load_state(saved["state_id"]).result()["step"] == saved["step"]
        other.forward_backward(rows, "ppo")
        other.optim_step(learning_rate=1e-3)
        after_b = other.forward_backward(rows, "cross_entropy").result()["logprobs"]
        # Adam's moments came along: the third step lands where it did in the first session
        for a, b in zip(after_a, after_b, strict=True):
            assert b == pytest.approx(a, abs=1e-5)
        # and the sampler serves the loaded weights
        again = other.sample(["digit 1:"], num_samples=1, max_tokens=5, temperature=0).result()
        assert again["weights_version"] == saved["step"] + 1


def test_training_calls_run_in_the_clients_order_whatever_order_they_arrive(stack, session):
    """seq 2 (optim_step) is sent first, seq 1 (forward_backward) a second later: optim_step waits for it."""
    import threading

    url, tokens, _ = stack
    base = session.info()["steps"]
    samples = session.sample(["digit 7:"], num_samples=2, max_tokens=4, seed=5).result()["samples"]
    rows = _rows(samples, [1.0, -1.0])
    seq0 = session._seq
    replies: dict[str, dict] = {}

    def send(method: str, params: dict) -> None:
        with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {tokens['alice']}"}) as h:
            replies[method] = h.post(sdk._rpc_url(url), json={
                "jsonrpc": "2.0", "id": 1, "method": method, "params": {"session_id": session.id, **params}}).json()

    late = threading.Thread(target=send, args=("sessions.optim_step", {"adam": {"learning_rate": 1e-3}, "seq": seq0 + 2}))
    late.start()
    time.sleep(1.0)  # only to send them out of order; nothing waits on it
    send("sessions.forward_backward", {"data": rows, "loss_fn": "ppo", "seq": seq0 + 1})
    late.join(timeout=300)
    session._seq = seq0 + 2
    assert "result" in replies["sessions.forward_backward"], replies
    assert replies["sessions.optim_step"]["result"]["step"] == base + 1
    assert replies["sessions.optim_step"]["result"]["metrics"]["grad_norm"] > 0  # it saw the gradients
    again = session.forward_backward(rows, "ppo")  # a used seq number is refused, not applied twice
    again.result()
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {tokens['alice']}"}) as h:
        reply = h.post(sdk._rpc_url(url), json={"jsonrpc": "2.0", "id": 1, "method": "sessions.forward_backward",
                                                      "params": {"session_id": session.id, "data": rows, "loss_fn": "ppo",
                                                                 "seq": seq0 + 1}}).json()
    assert reply["error"]["code"] == -40002 and reply["error"]["data"]["field"] == "seq"
    session.optim_step(learning_rate=1e-9).result()


@pytest.mark.parametrize(("call", "field", "words"), [
    (lambda s, r: s.forward_backward([{**r, "weights": r["weights"][:-1]}], "ppo"), "data[0].weights", "one per target"),
    (lambda s, r: s.forward_backward([r], "dpo"), "loss_fn", "unknown loss"),
    (lambda s, r: s.forward_backward([{**r, "tokens": r["tokens"][:-1] + [10**6]}], "ppo"), "data[0].tokens",
     "outside the vocabulary"),
    (lambda s, r: s.forward_backward([r] * 9, "ppo"), "data", "at most 8"),
    (lambda s, r: s.forward_backward([{"tokens": r["tokens"]}], "importance_sampling"), "data[0].advantages",
     "required"),
    (lambda s, r: s.sample(prompt_tokens=[[1, 2, 999_999]]), "prompt_tokens[0]", "outside the vocabulary"),
])
def test_bad_input_gets_a_clear_error_naming_the_field(session, call, field, words):
    samples = session.sample(["digit 2:"], num_samples=1, max_tokens=3, seed=0).result()["samples"]
    row = _rows(samples, [1.0])[0]
    with pytest.raises(sdk.ValidationFailed) as info:
        call(session, row).result()
    assert info.value.data["field"] == field and words in str(info.value), str(info.value)
    assert session.info()["status"] == "active"  # the session lives on


def test_params_the_schema_refuses_are_invalid_params(alice, session):
    with pytest.raises(sdk.InvalidParams, match="exactly one of prompts"):
        alice.call("sessions.sample", session_id=session.id, prompts=["a"], prompt_tokens=[[1]])
    with pytest.raises(sdk.InvalidParams, match="learning_rate"):
        alice.call("sessions.optim_step", session_id=session.id, adam={"learning_rate": -1})


def test_another_user_cannot_see_or_touch_a_session(bob, session):
    for method, params in [("sessions.get", {}), ("sessions.close", {}),
                           ("sessions.forward_backward", {"data": [{"tokens": [1, 2]}], "loss_fn": "cross_entropy"}),
                           ("sessions.sample", {"prompts": ["x"]})]:
        with pytest.raises(sdk.NotFound):
            bob.call(method, session_id=session.id, **params)
    assert session.id not in [s["session_id"] for s in bob.call("sessions.list")["sessions"]]
    with pytest.raises(sdk.NotFound):
        bob.call("sessions.load_state", session_id=session.id, state_id=f"{session.id}/two-steps")
    assert session.info()["status"] == "active"


def test_the_idle_timeout_frees_the_sessions_resources(alice):
    from ray.util import placement_group_table
    from ray.util.state import list_actors

    from grpo.session import host_name

    s = alice.create_session(cpus_per_worker=0.5, idle_timeout_s=5)
    pg = [p for p in placement_group_table().values() if p["name"] == host_name(s.id)]
    assert pg and pg[0]["state"] == "CREATED"
    info = _wait(lambda: (i := s.info())["status"] == "expired" and i, what="the session to expire")
    assert "idle" in info["error"]
    _wait(lambda: all(p["state"] == "REMOVED" for p in placement_group_table().values()
                      if p["name"] == host_name(s.id)), what="its placement group to go")
    assert not [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                if a.placement_group_id == pg[0]["placement_group_id"]]
    with pytest.raises(sdk.ValidationFailed, match="expired"):
        s.sample(["digit 1:"]).result()


def test_a_session_the_cluster_can_never_hold_is_refused(alice):
    with pytest.raises(sdk.ValidationFailed, match="cannot hold this session") as info:
        alice.call("sessions.create", num_workers=40)
    assert info.value.data["field"] == "num_workers"


def test_two_workers_take_the_same_step_as_one(alice, session):
    """The batch is split over the workers and their gradients all-reduced: the step is the whole batch's."""
    samples = session.sample(["digit 5:", "digit 6:", "digit 8:"], num_samples=2, max_tokens=5, seed=9).result()["samples"]
    rows = _rows(samples, [1.0, -1.0, 0.3, -0.3, 2.0, 0.0])
    after = []
    for workers in (1, 2):
        with alice.create_session(cpus_per_worker=0.5, num_workers=workers, seed=0) as s:
            s.forward_backward(rows, "grpo")
            step = s.optim_step(learning_rate=1e-2).result()
            after.append((step["metrics"]["grad_norm"], s.forward_backward(rows, "cross_entropy").result()["logprobs"]))
    (norm1, lp1), (norm2, lp2) = after
    assert norm2 == pytest.approx(norm1, rel=1e-4)
    for a, b in zip(lp1, lp2, strict=True):
        assert b == pytest.approx(a, abs=1e-4)


def test_a_session_is_closed_when_its_cost_reaches_its_budget(alice):
    s = alice.create_session(cpus_per_worker=0.5, max_budget_usd="0.000001")  # 1 CPU at $0.05/h: crossed in a second
    with pytest.raises(sdk.BudgetExceeded, match="reached its budget"):
        s.sample(["digit 1:"]).result()
    info = s.info()
    assert info["status"] == "budget_exceeded" and float(info["cost_usd"]) >= 0.000001
    with pytest.raises(sdk.ValidationFailed, match="budget_exceeded"):
        s.sample(["digit 1:"]).result()


def test_a_deployed_session_answers_the_openai_client_with_its_newest_weights(alice, bob, session):
    """models.deploy(session_id=...): agent frameworks roll out against the session by base_url, and each
    optimizer step is what the next request is answered with."""
    import openai

    with pytest.raises(sdk.NotFound):
        bob.deploy("bobs", session_id=session.id)
    alice.deploy("live", session_id=session.id)
    _wait(lambda: alice.deployments(name="live").deployments[0].status == "running", what="the deployment")
    oa = openai.OpenAI(base_url=alice.policy_url("live"), api_key=alice.policy_key, max_retries=0)

    def greedy() -> tuple[str, str]:
        served = oa.completions.create(model="live", prompt="digit 6:", max_tokens=6, temperature=0).choices[0].text
        own = session.sample(["digit 6:"], max_tokens=6, temperature=0).result()["samples"][0]["text"]
        return served, own

    served, own = greedy()
    assert served == own
    # a few large steps towards one completion: the session's greedy text changes, and so does the served one
    samples = session.sample(["digit 6:"], num_samples=1, max_tokens=6, temperature=0).result()["samples"]
    target = dict(samples[0], tokens=[54] * 6, logprobs=[0.0] * 6)  # "666666"
    for _ in range(5):
        session.forward_backward(_rows([target], [1.0]), "cross_entropy")
        step = session.optim_step(learning_rate=1e-2)
    step.result()  # the server's own order covers the session's calls; an outside client waits for the step
    served2, own2 = greedy()
    assert own2 != own and served2 == own2
    info = {m.id: m.model_extra for m in oa.models.list().data}["live"]
    assert info["session_id"] == session.id and info["weights_generation"] == session.info()["steps"]
    alice.undeploy("live")


def test_a_lora_session_trains_the_adapter_and_saves_a_peft_directory(alice, stack, tiny_model_dir):
    """Only the adapter trains and reaches the sampler; save_weights writes what PeftModel loads."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with alice.create_session(cpus_per_worker=0.5, lora_rank=8, lora_target_modules=["q_proj", "v_proj", "lm_head"]) as s:
        assert s.info()["lora"]["r"] == 8
        before = s.sample(["digit 6:"], max_tokens=6, temperature=0).result()["samples"][0]
        target = dict(before, tokens=[54] * 6, logprobs=[0.0] * 6)
        for _ in range(4):
            s.forward_backward(_rows([target], [1.0]), "cross_entropy")
            s.optim_step(learning_rate=5e-2)
        after = s.sample(["digit 6:"], max_tokens=6, temperature=0).result()
        assert after["weights_version"] == 4 and after["samples"][0]["tokens"] != before["tokens"]
        saved = s.save_weights("adapter").result()
        assert saved["model"] == f"weights:{s.id}/adapter" and "path" not in saved  # paths: admins' replies only
        path = stack[2] / "models" / "sessions" / s.id / "adapter"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path).eval()
    ids = torch.tensor([after["samples"][0]["prompt_tokens"]])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert greedy == after["samples"][0]["tokens"]  # the saved adapter is the one the sampler used


def test_session_calls_are_audited_and_admins_see_every_session(stack, alice, session):
    url, tokens, _ = stack
    with sdk.Client(url, token=tokens["admin"]) as admin:
        entries = admin.audit_query(principal="alice-user", method="sessions.optim_step")
        assert entries["entries"] and all(e["outcome"] == "ok" for e in entries["entries"][:3])
        assert session.id in [x["session_id"] for x in admin.call("sessions.list")["sessions"]]
        assert admin.call("sessions.get", session_id=session.id)["owner"] == "alice-user"


def test_a_session_whose_worker_dies_fails_with_the_reason_and_frees_the_rest(alice):
    import os
    import signal

    from ray.util import placement_group_table
    from ray.util.state import list_actors

    from grpo.session import host_name

    s = alice.create_session(cpus_per_worker=0.5)
    (pg,) = [p for p in placement_group_table().values() if p["name"] == host_name(s.id) and p["state"] == "CREATED"]
    (worker,) = [a for a in list_actors(filters=[("class_name", "=", "SessionWorker"), ("state", "=", "ALIVE")], detail=True)
                 if a.placement_group_id == pg["placement_group_id"]]
    os.kill(worker.pid, signal.SIGKILL)  # what an out-of-memory kill does
    with pytest.raises(sdk.ValidationFailed, match="is failed") as info:
        s.forward_backward([{"tokens": [1, 2, 3]}], "cross_entropy").result()
    assert "worker of the session died" in str(info.value)
    got = s.info()
    assert got["status"] == "failed" and "died" in got["error"]
    _wait(lambda: all(p["state"] == "REMOVED" for p in placement_group_table().values()
                      if p["name"] == host_name(s.id)), what="its placement group to go")
