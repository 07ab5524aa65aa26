"""The SDK (app.client) against the real job API on Ray Serve: every method, every error mapping, and
policies deployed with models.deploy answering the `openai` package.

One Serve instance for the module on the session's Ray; SQLite, no Redis. The dispatcher may run no
job (RAYGRPO_MAX_RUNNING_JOBS=0), so jobs stay queued and nothing here trains: serving a *trained*
checkpoint is covered end to end by tests/app/test_cli.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pydantic
import pytest
from raygrpo_test_services import free_port, serve_stack

from app.client import sdk

pytestmark = [pytest.mark.ray]

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(10)]


@pytest.fixture(scope="module")
def stack(ray_session, tmp_path_factory, tiny_model_dir):
    from app.api.auth import mint_token
    from app.settings import Settings

    home = tmp_path_factory.mktemp("sdk-home")
    # models the tests save under their tmp_path may be deployed: the session's temp folder is a model root
    with serve_stack(home, tiny_model_dir, RAYGRPO_RATE_LIMITS="auth.whoami=3", RAYGRPO_CANCEL_WAIT_S="1",
                     RAYGRPO_DEPLOYMENT_RECONCILE_S="2",
                     RAYGRPO_MODEL_ROOTS=str(tmp_path_factory.getbasetemp())) as url:
        settings = Settings(home=home)
        yield url, {role: mint_token(settings, f"{role}-user", role) for role in ("admin", "viewer", "researcher")}


@pytest.fixture
def admin(stack):
    url, tokens = stack
    with sdk.Client(url, token=tokens["admin"]) as c:
        yield c


def test_training_methods_and_their_errors(admin):
    job = admin.start_grpo("sdk-agent", ROWS, config={"reward": "digit", "n_iterations": 5, "max_budget_usd": "1"},
                           idempotency_key="k1")
    assert isinstance(job, sdk.StartResult) and job.status == "queued" and job.created
    again = admin.start_grpo("sdk-agent", ROWS, config={"reward": "digit", "n_iterations": 5,
                                                         "max_budget_usd": "1"}, idempotency_key="k1")
    assert again.job_id == job.job_id and not again.created

    status = admin.get_status(job.job_id)
    assert isinstance(status, sdk.JobStatus) and status.status == "queued" and not status.done
    assert status.total_iterations == 5 and status["job_id"] == job.job_id
    page = admin.list_jobs(agent_id="sdk-agent", limit=5)
    assert [j.job_id for j in page.jobs] == [job.job_id] and not page.has_more
    assert admin.export_trajectories(job.job_id, limit=10).total_count == 0

    with pytest.raises(sdk.EvaluationFailed, match="no checkpoint"):
        admin.evaluate(job.job_id)
    with pytest.raises(sdk.ValidationFailed, match="only running jobs pause"):
        admin.pause(job.job_id)
    with pytest.raises(sdk.ValidationFailed, match="only paused jobs resume"):
        admin.resume(job.job_id)
    cancelled = admin.cancel(job.job_id, reason="test")
    assert isinstance(cancelled, sdk.CancelResult) and cancelled.status == "cancelled"
    with pytest.raises(sdk.CannotCancel) as err:
        admin.cancel(job.job_id)
    assert err.value.code == -40003 and err.value.method == "training.cancel"

    with pytest.raises(sdk.NotFound):
        admin.get_status("job_" + "0" * 32)
    with pytest.raises(sdk.InvalidParams) as err:
        admin.start_grpo("a", [], config={"n_iterations": 0})
    fields = {e["field"] for e in err.value.data["errors"]}
    assert {"training_data", "config.n_iterations"} <= fields
    with pytest.raises(sdk.BudgetExceeded):
        admin.start_grpo("a", ROWS, config={"reward": "digit", "max_budget_usd": "0.000001"})
    with pytest.raises(sdk.ValidationFailed, match="config.engine.output_dir"):
        admin.start_grpo("a", ROWS, config={"engine": {"output_dir": "/tmp/x"}})
    with pytest.raises(sdk.ExportLimitExceeded):
        admin.export_trajectories(job.job_id, limit=20_000)
    with pytest.raises(sdk.MethodNotFound):
        admin.call("training.nope")
    assert {m["name"] for m in admin.discover()["methods"]} >= {"training.start_grpo", "models.deploy",
                                                                 "models.undeploy", "models.deployments"}


def test_auth_methods_and_refusals(stack, admin):
    url, tokens = stack
    assert admin.whoami().subject == "admin-user"
    issued = admin.create_api_key("bob", role="researcher", name="ci")
    with sdk.Client(url, api_key=issued.api_key) as bob:
        assert bob.whoami().subject == "bob"
        keys = admin.list_api_keys(owner="bob").keys
        assert [k["key_id"] for k in keys] == [issued.key_id]
        admin.revoke_api_key(issued.key_id)
        with pytest.raises(sdk.Unauthenticated, match="revoked") as err:
            bob.list_jobs()
        assert err.value.status == 401
    entries = admin.audit_query(method="auth.create_api_key").entries
    assert entries and entries[0]["principal"] == "admin-user"

    with sdk.Client(url, token=tokens["viewer"]) as viewer:
        with pytest.raises(sdk.Forbidden) as err:
            viewer.start_grpo("a", ROWS)
        assert err.value.status == 403 and err.value.data["permission"] == "training:start"
        with pytest.raises(sdk.Forbidden):
            viewer.deploy("x", model="/nonexistent")
        assert viewer.deployments().deployments == []
    with sdk.Client(url) as nobody, pytest.raises(sdk.Unauthenticated):
        nobody.get_status("job_x")
    with sdk.Client(url, token=tokens["researcher"]) as limited:  # RAYGRPO_RATE_LIMITS=auth.whoami=3
        for _ in range(3):
            limited.whoami()
        with pytest.raises(sdk.RateLimited) as err:
            limited.whoami()
        assert err.value.status == 429 and err.value.retry_after_s > 0


def test_async_client_same_methods_same_errors(stack):
    url, tokens = stack

    async def run():
        async with sdk.AsyncClient(url, token=tokens["admin"]) as c:
            job = await c.start_grpo("async-agent", ROWS[:2], config={"reward": "digit", "max_budget_usd": "1"})
            statuses = await asyncio.gather(*(c.get_status(job.job_id) for _ in range(5)))
            assert {s.status for s in statuses} == {"queued"}
            done = await c.cancel(job.job_id)
            final = await c.wait(job.job_id, poll_s=0.1, timeout_s=10)
            with pytest.raises(sdk.NotFound):
                await c.undeploy("no-such-policy")
            return done, final

    done, final = asyncio.run(run())
    assert done.status == "cancelled" and final.status == "cancelled" and final.done


def test_connection_errors_are_retried_and_reported(monkeypatch):
    port = free_port()  # nothing listens there
    c = sdk.Client(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01)
    sleeps: list[float] = []
    monkeypatch.setattr(sdk.time, "sleep", sleeps.append)
    with pytest.raises(sdk.TransportError, match="ConnectError"):
        c.list_jobs()
    # two retries, backing off: attempt i waits backoff * 2**i, jittered by +-50%
    assert len(sleeps) == 2
    for i, s in enumerate(sleeps):
        assert 0.01 * 2**i * 0.5 <= s <= 0.01 * 2**i * 1.5, (i, s)

    # A read error may mean the server ran the call: a method that changes nothing is retried, so is
    # start_grpo (under the idempotency key the SDK set, the same on every attempt), a cancel is not.
    calls: list[dict] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.read()))
        if len(calls) == 1:
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(200, json={"jsonrpc": "2.0", "result": {"jobs": [], "has_more": False}, "id": 1})

    c.http = httpx.Client(transport=httpx.MockTransport(flaky))
    assert c.list_jobs().jobs == [] and len(calls) == 2
    calls.clear()
    with pytest.raises(sdk.TransportError, match="ReadError"):
        c.cancel("job_x")
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(pydantic.ValidationError):  # the canned reply is no StartResult; both attempts went out
        c.start_grpo("a", ROWS)
    keys = [call["params"]["idempotency_key"] for call in calls]
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0].startswith("sdk-")


def _wait_running(c: sdk.Client, name: str, timeout: float = 120) -> sdk.Deployment:
    deadline = time.time() + timeout
    while time.time() < deadline:
        (dep,) = c.deployments(name=name).deployments
        if dep.status == "running":
            return dep
        assert dep.status in ("deploying", "unknown"), dep
        time.sleep(0.5)
    raise AssertionError(f"{name} not running after {timeout}s: {dep}")


def test_deploy_models_serves_the_openai_api_and_undeploy_frees_it(admin, stack, tiny_model_dir, tmp_path):
    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.serving.policy import weights_digest
    from grpo.tiny import save_tiny_model

    with pytest.raises(sdk.NotFound, match="checkpoint not found"):
        admin.deploy("p1", checkpoint_id="ckpt_missing")
    with pytest.raises(sdk.ValidationFailed, match="model: no Hugging Face model \(or PEFT adapter\) directory"):
        admin.deploy("p1", model=str(tmp_path))
    with pytest.raises(sdk.InvalidParams, match="exactly one of"):
        admin.deploy("p1", model=tiny_model_dir, checkpoint_id="ckpt_x")

    other = str(save_tiny_model(tmp_path / "seed1", seed=1))
    dep = admin.deploy("p1", model=tiny_model_dir, autoscaling={"min_replicas": 1, "max_replicas": 2})
    assert dep.status in ("deploying", "running") and dep.url == "/policies/p1/v1"
    assert dep.autoscaling["max_replicas"] == 2 and dep.gpus_per_replica == 0.0  # no GPU in this cluster
    ab = admin.deploy("ab", variants=[{"name": "ab-a", "model": tiny_model_dir, "weight": 3},
                                      {"name": "ab-b", "model": other, "weight": 1}])
    assert [v["name"] for v in ab.variants] == ["ab-a", "ab-b"]
    with pytest.raises(sdk.ValidationFailed, match="exists"):
        admin.deploy("p1", model=tiny_model_dir)
    _wait_running(admin, "p1")
    _wait_running(admin, "ab")

    # The policy answers to the job API's credentials, and to its owner (or everyone once an admin shares it).
    url, tokens = stack
    ask = {"model": "p1", "prompt": "digit 7:", "max_tokens": 2}
    anonymous = httpx.post(admin.policy_url("p1") + "/completions", json=ask, timeout=60)
    assert anonymous.status_code == 401 and "Bearer" in anonymous.headers["www-authenticate"], anonymous.text
    stranger = openai.OpenAI(base_url=admin.policy_url("p1"), api_key=tokens["researcher"], max_retries=0)
    with pytest.raises(openai.NotFoundError, match="deployment not found"):
        stranger.completions.create(**ask)
    with pytest.raises(openai.NotFoundError):
        stranger.models.list()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=admin.policy_url("p1"), api_key="rg_forged", max_retries=0).completions.create(**ask)
    admin.share("p1")
    assert stranger.completions.create(**ask).choices[0].text is not None
    admin.share("p1", shared=False)
    with pytest.raises(openai.NotFoundError):
        stranger.completions.create(**ask)
    big = httpx.post(admin.policy_url("p1") + "/completions", headers=admin.headers, timeout=60,
                     content=b'{"prompt": "' + b"x" * (11 * 2**20) + b'"}')
    assert big.status_code == 413, big.text
    # Serve's proxy decodes X-Request-ID itself: a non-UTF-8 one used to be a 500 on every route (app.api.proxy)
    for path in ("/health", "/api/v1/jsonrpc/methods"):
        r = httpx.get(url.removesuffix("/api/v1/jsonrpc") + path, headers={"X-Request-ID": b"\xff\xfe"}, timeout=60)
        assert r.status_code == 200 and r.headers["x-request-id"].isascii(), (path, r.status_code, r.text)

    oa = openai.OpenAI(base_url=admin.policy_url("p1"), api_key=admin.policy_key, max_retries=0)
    served = {m.id: m for m in oa.models.list().data}
    assert served["p1"].model_extra["root"] == tiny_model_dir  # what the deployer named, as they named it
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert served["p1"].model_extra["weights_sha256"] == weights_digest(model)  # the served weights are these

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tok("digit 7:", add_special_tokens=False)["input_ids"]])
    greedy = tok.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:],
                        skip_special_tokens=True)
    out = oa.completions.create(model="p1", prompt="digit 7:", max_tokens=6, temperature=0)
    assert out.choices[0].text == greedy and out.usage.completion_tokens == 6 and out.usage.prompt_tokens == 8
    many = oa.completions.create(model="p1", prompt=["digit 7:", "digit 1:"], max_tokens=4, n=3, temperature=1.0,
                                 top_p=0.9)
    assert len(many.choices) == 6 and [c.index for c in many.choices] == list(range(6))
    assert many.usage.prompt_tokens == 16 and 6 <= many.usage.completion_tokens <= 6 * 4  # EOS may end one early

    stream = oa.completions.create(model="p1", prompt="digit 7:", max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == greedy and chunks[-1].choices[0].finish_reason == "length"
    chat = oa.chat.completions.create(model="p1", messages=[{"role": "user", "content": "digit 7"}], max_tokens=5,
                                      temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    chat_stream = oa.chat.completions.create(model="p1", messages=[{"role": "user", "content": "digit 7"}],
                                             max_tokens=5, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
    parts = list(chat_stream)
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == chat.choices[0].message.content and parts[-1].usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oa.completions.create(model="p1", prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        oa.completions.create(model="other", prompt="x", max_tokens=2)

    # A/B: the deployment's name routes by weight, a variant's name routes to it
    seen = []
    with httpx.Client(timeout=60, headers=admin.headers) as h:  # policies answer to the API's credentials
        for _ in range(24):
            r = h.post(admin.policy_url("ab") + "/completions", json={"model": "ab", "prompt": "d", "max_tokens": 1})
            assert r.status_code == 200, r.text
            seen.append(r.headers["x-raygrpo-variant"])
        pinned = h.post(admin.policy_url("ab") + "/completions", json={"model": "ab-b", "prompt": "d",
                                                                        "max_tokens": 1})
    assert set(seen) == {"ab-a", "ab-b"} and seen.count("ab-a") > seen.count("ab-b")
    assert pinned.headers["x-raygrpo-variant"] == "ab-b" and pinned.json()["model"] == "ab-b"
    listed = {m.id: m.model_extra for m in openai.OpenAI(base_url=admin.policy_url("ab"), api_key=admin.policy_key)
              .models.list().data}
    assert listed["ab-b"]["weights_sha256"] == weights_digest(AutoModelForCausalLM.from_pretrained(other))
    assert listed["ab-a"]["weights_sha256"] != listed["ab-b"]["weights_sha256"]

    assert {d.name for d in admin.deployments().deployments} == {"p1", "ab"}
    assert admin.undeploy("p1").status == "deleting"
    assert admin.undeploy("ab").status == "deleting"
    with pytest.raises(sdk.NotFound):
        admin.undeploy("p1")
    assert admin.deployments().deployments == []
    deadline = time.time() + 60
    while time.time() < deadline and httpx.get(admin.policy_url("p1") + "/models", headers=admin.headers).status_code == 200:
        time.sleep(0.5)
    assert httpx.get(admin.policy_url("p1") + "/models", headers=admin.headers).status_code != 200


def test_a_deployed_lora_adapter_answers_the_openai_client_with_logprobs_seeds_and_stops(admin, tiny_model_dir,
                                                                                       tmp_path):
    """A PEFT adapter directory (what a LoRA run checkpoints) deploys on its base; the OpenAI surface: seeded
    sampling repeats, log-probs come back, a stop string ends a chat, a stream that cannot start is an HTTP
    400 (not an event on a 200), chat without max_tokens may use the rest of the context."""
    pytest.importorskip("peft")
    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.lora import add_adapter

    adapter = tmp_path / "adapter"
    torch.manual_seed(0)  # the adapter's weights, so what this test sees is the same every run
    policy = add_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         {"r": 8, "lora_alpha": 16, "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]})
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # an adapter that changes what the base says
    policy.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()

    admin.deploy("lora", model=str(adapter))
    _wait_running(admin, "lora")
    try:
        oa = openai.OpenAI(base_url=admin.policy_url("lora"), api_key=admin.policy_key, max_retries=0)
        ask = dict(model="lora", prompt="digit 7:", max_tokens=6, temperature=1.0, n=2, logprobs=2, seed=1234)
        a, b = oa.completions.create(**ask), oa.completions.create(**ask)
        assert [c.text for c in a.choices] == [c.text for c in b.choices]
        assert [c.logprobs.token_logprobs for c in a.choices] == [c.logprobs.token_logprobs for c in b.choices]
        assert a.choices[0].text != a.choices[1].text or a.choices[0].logprobs.tokens != a.choices[1].logprobs.tokens
        lp = a.choices[0].logprobs
        assert "".join(lp.tokens) == a.choices[0].text and all(x <= 0 for x in lp.token_logprobs)
        # two alternatives, keyed by text: a byte tokenizer's partial UTF-8 bytes share one ("\ufffd")
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs) and any(len(top) == 2 for top in lp.top_logprobs)
        assert oa.completions.create(**{**ask, "seed": 99}).choices[0].text != a.choices[0].text or \
            oa.completions.create(**{**ask, "seed": 98}).choices[0].text != a.choices[0].text

        greedy = oa.chat.completions.create(model="lora", messages=[{"role": "user", "content": "digit 7"}],
                                            max_tokens=12, temperature=0)
        text = greedy.choices[0].message.content
        assert len(text) >= 4
        stopped = oa.chat.completions.create(model="lora", messages=[{"role": "user", "content": "digit 7"}],
                                             max_tokens=12, temperature=0, stop=[text[2:4]], logprobs=True,
                                             top_logprobs=1)
        assert stopped.choices[0].message.content == text[: text.index(text[2:4])]
        assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].logprobs.content
        unbounded = oa.chat.completions.create(model="lora", messages=[{"role": "user", "content": "digit 7"}],
                                               temperature=0, stop=[text[2:4]])
        assert unbounded.choices[0].message.content == stopped.choices[0].message.content  # no 16-token default

        with httpx.Client(timeout=60, headers=admin.headers) as h:
            r = h.post(admin.policy_url("lora") + "/completions",
                       json={"model": "lora", "prompt": "x", "max_tokens": 0, "stream": True})
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
            r = h.post(admin.policy_url("lora") + "/completions",
                       json={"model": "lora", "prompt": "x", "max_tokens": 2, "stream": True, "logprobs": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    finally:
        admin.undeploy("lora")


def test_a_policy_application_lost_behind_the_apis_back_is_deployed_again(admin, tiny_model_dir):
    """What a RayService upgrade (a new cluster) or a Serve restart does to a deployment: its row says it runs,
    Serve has no application. The dispatcher's reconcile deploys it again from the row."""
    from ray import serve

    from app.serving.deployments import app_name

    admin.deploy("lost", model=tiny_model_dir)
    _wait_running(admin, "lost")
    try:
        # Behind the API's back. Not blocking: the reconcile (every 2 s here) may bring the application back
        # before Serve's own wait sees it gone, and that wait would then time out.
        serve.delete(app_name("lost"), _blocking=False)
        deadline, states = time.time() + 120, []
        while time.time() < deadline:  # not running first, then running again: only the redeploy does that
            (dep,) = admin.deployments(name="lost").deployments
            states.append(dep.status)
            if dep.status == "running" and any(s != "running" for s in states):
                break
            time.sleep(0.2)
        assert states[-1] == "running" and any(s != "running" for s in states), states[-5:]
        with httpx.Client(timeout=60, headers=admin.headers) as h:
            r = h.post(admin.policy_url("lost") + "/completions", json={"prompt": "digit 7:", "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    finally:
        admin.undeploy("lost")
