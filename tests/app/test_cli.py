"""The `raygrpo` CLI against a local stack it starts itself: `up` (a private Ray head on free ports and the
API on Serve, in a background process), a real GRPO job submitted and followed, every command on it,
the trained checkpoint served to the `openai` client, and `down`.

Commands run in-process through typer's CliRunner (stdout and stderr apart, exit codes checked);
`up` starts its stack as a real subprocess. One stack and one trained job for the module.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from app.client.cli import cli, read_state

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(10)]
STEPS, BATCH, GROUP = 4, 4, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-home")


@pytest.fixture(scope="module", autouse=True)
def embedded_defaults(tiny_model_dir):
    """The stack on its embedded defaults (SQLite under --home, no Redis), whatever DATABASE_URL and
    REDIS_URL the test run has (CI sets them for the services tests); `up` passes its environment on,
    and the folder of the tiny model is where its jobs' local models may come from."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("DATABASE_URL", "REDIS_URL", "RAYGRPO_HOME", "RAY_ADDRESS", "RAY_DASHBOARD_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("RAYGRPO_MODEL_ROOTS", str(Path(tiny_model_dir).parent))
        mp.setenv("RAYGRPO_FAULT_HOOKS", "1")  # runs act on a FAULT file a test puts in their folder, none other
        yield


def run(home: Path, *args: str, code: int | None = 0):
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    if code is not None:
        assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def stack(home):
    result = run(home, "up", "--port", str(_free_port()), "--num-cpus", "6")
    yield read_state(home), result
    if read_state(home) is not None:
        run(home, "down")


@pytest.fixture(scope="module")
def job(stack, home, tiny_model_dir, tmp_path_factory):
    """A real GRPO job of the tiny model, submitted and followed by `raygrpo submit`."""
    spec = tmp_path_factory.mktemp("spec") / "job.yaml"
    (spec.parent / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec.write_text(yaml.safe_dump({
        "agent_id": "cli-agent", "training_file": "rows.jsonl", "evaluation_data": ROWS[:4],
        "config": {"model": tiny_model_dir, "reward": "digit", "n_iterations": STEPS, "batch_size": BATCH,
                   "n_trajectories_per_query": GROUP, "learning_rate": 1e-3, "max_new_tokens": 6,
                   "checkpoint_interval": 2, "max_budget_usd": "5", "num_policy_workers": 1,
                   "num_rollout_workers": 1, "num_reward_workers": 1,
                   "engine": {"cpus_per_worker": 1, "cpus_per_reward_worker": 0.5, "eval_interval": 2}}}))
    result = run(home, "submit", str(spec))
    job_id = result.stdout.strip().splitlines()[-1]
    return job_id, result, spec


def test_up_starts_a_stack_and_is_idempotent(stack, home):
    state, result = stack
    assert state is not None and state["api_url"].startswith("http://127.0.0.1:")
    assert result.stdout.strip() == state["api_url"] and "up" in result.stderr
    assert not state["ray_address"].endswith(":6379")
    again = run(home, "up")
    assert "already up" in again.stderr and read_state(home)["pid"] == state["pid"]


def test_token_and_db_upgrade(home, tmp_path):
    import jwt

    from app.api.auth import verify_jwt
    from app.settings import Settings

    out = json.loads(run(home, "--json", "token", "--sub", "ci", "--role", "viewer", "--ttl", "60").stdout)
    principal = verify_jwt(Settings(home=home), out["token"])
    assert principal.subject == "ci" and principal.role == "viewer"
    assert jwt.decode(out["token"], options={"verify_signature": False})["exp"] - time.time() <= 61
    assert "unknown role" in run(home, "token", "--role", "bogus", code=2).stderr

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert run(home, "db", "upgrade", "--url", url).stdout.strip() == url
    from sqlalchemy import create_engine, inspect

    assert "alembic_version" in inspect(create_engine(url)).get_table_names()
    # the stack's own SQLite is created through Alembic now (stamped at head), so it upgrades too
    assert "upgraded" in run(home, "db", "upgrade").stderr


def test_submit_follows_the_job_to_completed(job):
    job_id, result, _ = job
    assert job_id.startswith("job_")
    assert f"submitted {job_id}" in result.stderr
    assert f"{job_id}: completed after {STEPS}/{STEPS} steps" in " ".join(result.stderr.split())
    assert "best checkpoint: ckpt_" in result.stderr


def test_status_and_list(job, home):
    job_id, _, _ = job
    status = json.loads(run(home, "--json", "status", job_id).stdout)
    assert status["status"] == "completed" and status["current_iteration"] == STEPS
    plain = run(home, "status", job_id)
    assert plain.stdout.strip() == "completed" and "best_checkpoint" in plain.stderr
    assert "eval reward" in plain.stderr  # the run evaluated its checkpoints: the best one's score shows
    listed = run(home, "list", "--agent", "cli-agent")  # not a terminal: tab-separated, nothing cut
    header, row = listed.stdout.strip().splitlines()
    assert header.split("\t")[0] == "job" and row.split("\t")[:3] == [job_id, "cli-agent", "completed"]
    refused = run(home, "--token", "not.a.jwt", "list", code=None)
    assert refused.exit_code != 0 and "-40100" in refused.stderr and "raygrpo token" in refused.stderr
    page = json.loads(run(home, "--json", "list", "--agent", "cli-agent").stdout)
    assert [j["job_id"] for j in page["jobs"]] == [job_id]
    assert "not found" in run(home, "status", "job_" + "0" * 32, code=3).stderr


def test_logs_show_the_ray_job(job, home):
    job_id, _, _ = job
    logs = run(home, "logs", job_id).stdout
    assert f"step {STEPS}/{STEPS}" in logs and "completed" in logs
    assert run(home, "logs", "-f", job_id).stdout.count(f"step {STEPS}/{STEPS}") >= 1  # ends with the job
    assert "no Ray Job" in run(home, "logs", "job_none", code=3).stderr


def test_export_jsonl_and_parquet(job, home, tmp_path):
    import pyarrow.parquet as pq

    job_id, _, _ = job
    out = tmp_path / "t.jsonl"
    assert run(home, "export", job_id, "-o", str(out)).stdout.strip() == str(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == STEPS * BATCH * GROUP and {r["step"] for r in rows} == set(range(1, STEPS + 1))
    table = pq.read_table(run(home, "export", job_id, "--format", "parquet", "-o", str(tmp_path / "t.parquet"))
                          .stdout.strip())
    assert table.num_rows == len(rows) and sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    run(home, "export", job_id, "--format", "csv", code=2)


def test_plot_draws_reward_loss_and_kl(job, home, tmp_path):
    import numpy as np
    from PIL import Image

    job_id, _, _ = job
    png = Path(run(home, "plot", job_id, "-o", str(tmp_path / "curves.png")).stdout.strip())
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)  # (H, W, 3)
    width = pixels.shape[1]

    def near(rgb, panel):  # pixels of this line colour in one of the three panels
        third = pixels[:, panel * width // 3:(panel + 1) * width // 3]
        return int((np.abs(third - np.array(rgb)).sum(axis=-1) < 40).sum())

    assert near((31, 119, 180), 0) > 50  # reward: matplotlib's first colour, left panel
    assert near((214, 39, 40), 1) > 50  # loss: tab:red, middle
    assert near((44, 160, 44), 2) > 50  # KL: tab:green, right
    assert near((214, 39, 40), 0) == 0 and near((44, 160, 44), 1) == 0  # each curve in its own panel


def test_evaluate(job, home):
    job_id, _, _ = job
    result = json.loads(run(home, "--json", "evaluate", job_id, "--max-queries", "4").stdout)
    assert result["n_queries"] == 4 and 0.0 <= result["success_rate"] <= 1.0
    assert "base_model" in result and result["job_id"] == job_id


def test_deploy_serves_the_trained_checkpoint_to_openai(job, home):
    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.serving.policy import weights_digest

    job_id, _, _ = job
    status = json.loads(run(home, "--json", "status", job_id).stdout)
    ckpt = status["best_checkpoint"]["path"]
    url = run(home, "deploy", "trained", job_id).stdout.strip()
    assert url.endswith("/policies/trained/v1")

    token = json.loads(run(home, "--json", "token", "--sub", "stranger", "--role", "viewer").stdout)["token"]
    with pytest.raises(openai.AuthenticationError):  # deployed policies answer to the API's credentials only
        openai.OpenAI(base_url=url, api_key="unused", max_retries=0).models.list()
    oa = openai.OpenAI(base_url=url, api_key=token, max_retries=0)
    with pytest.raises(openai.NotFoundError):  # a viewer who is not its owner: not found
        oa.models.list()
    oa = openai.OpenAI(base_url=url, api_key=json.loads(run(home, "--json", "token").stdout)["token"], max_retries=0)
    (model_info,) = oa.models.list().data
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model_info.model_extra["weights_sha256"] == weights_digest(trained)  # the checkpoint's weights
    assert model_info.model_extra["checkpoint_id"] == status["best_checkpoint"]["checkpoint_id"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = torch.tensor([tok("digit 4:", add_special_tokens=False)["input_ids"]])
    greedy = tok.decode(trained.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:],
                        skip_special_tokens=True)
    out = oa.completions.create(model="trained", prompt="digit 4:", max_tokens=6, temperature=0)
    assert out.choices[0].text == greedy
    streamed = "".join(c.choices[0].text for c in oa.completions.create(
        model="trained", prompt="digit 4:", max_tokens=6, temperature=0, stream=True))
    assert streamed == greedy

    listed = run(home, "deployments")
    assert "trained" in listed.stdout and "running" in listed.stdout
    assert run(home, "undeploy", "trained").stdout.strip() == "deleting"
    assert "not found" in run(home, "undeploy", "trained", code=3).stderr
    assert "give SOURCE or --variant" in run(home, "deploy", "x", code=2).stderr


def test_detach_cancel_and_bad_config(job, home, tmp_path):
    _, _, spec_path = job
    spec = yaml.safe_load(spec_path.read_text())
    spec["config"]["n_iterations"] = 5000
    long_spec = spec_path.parent / "long.yaml"
    long_spec.write_text(yaml.safe_dump(spec))
    job_id = run(home, "submit", "--detach", str(long_spec)).stdout.strip()
    cancelled = json.loads(run(home, "--json", "cancel", job_id, "--reason", "ci").stdout)
    assert cancelled["status"] in ("cancelled", "cancelling")

    spec["config"]["engine"] = {"output_dir": "/tmp/elsewhere"}
    bad = spec_path.parent / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    assert "config.engine.output_dir" in run(home, "submit", str(bad), code=3).stderr
    assert "expected a mapping" in run(home, "submit", str(_write(tmp_path / "x.yaml", "[1, 2]")), code=2).stderr


def test_readme_shaped_jobs_at_once_all_complete_and_never_share_the_cluster(job, home):
    """Two jobs used to deadlock: each got its actors, then both worker groups waited for CPUs forever.
    Two jobs of the README's shape (2 policy workers, 2 rollout and 2 reward actors: 5 CPUs) submitted at
    once on a 6-CPU stack: the dispatcher admits one at a time by resources, the other waits as `queued`
    with the reason shown, and both complete. One that no cluster of this size can hold is refused at once.
    (Three jobs at once on the job API's own stack: tests/app/test_api_ray.py, dispatcher kill.)"""
    _, _, spec_path = job
    spec = yaml.safe_load(spec_path.read_text())
    spec.pop("evaluation_data")
    spec["config"].update(n_iterations=3, checkpoint_interval=0, num_policy_workers=2, num_rollout_workers=2,
                          num_reward_workers=2, engine={"cpus_per_worker": 1, "cpus_per_reward_worker": 0.5})
    shaped = _write(spec_path.parent / "readme-shaped.yaml", yaml.safe_dump(spec))
    spec["config"]["num_policy_workers"] = 4  # 4 + 2 + 1 = 7 CPUs on a 6-CPU stack
    too_big = _write(spec_path.parent / "too-big.yaml", yaml.safe_dump(spec))
    refused = run(home, "submit", "--detach", str(too_big), code=3).stderr  # refused at once, nothing queued
    assert "-40002" in refused and "cannot fit this cluster: needs 7 CPU" in refused, refused
    ids = [run(home, "submit", "--detach", str(shaped)).stdout.strip() for _ in range(2)]

    most_running, waited, final = 0, set(), {}
    deadline = time.time() + 600
    while len(final) < 2 and time.time() < deadline:
        statuses = {j: json.loads(run(home, "--json", "status", j).stdout) for j in ids}
        most_running = max(most_running, sum(s["status"] == "running" for s in statuses.values()))
        waited |= {j for j, s in statuses.items()
                   if s["status"] == "queued" and (s.get("admission") or {}).get("decision") == "waiting"}
        final = {j: s for j, s in statuses.items() if s["status"] in ("completed", "failed", "cancelled")}
        time.sleep(1.0)
    assert {j: s["status"] for j, s in final.items()} == dict.fromkeys(ids, "completed"), final
    assert most_running == 1  # never two runs holding part of the cluster each
    assert waited, "no job was seen waiting for resources"


@pytest.mark.long
def test_down_then_up_mid_job_resumes_it_and_stores_every_step_once(stack, home, tiny_model_dir, tmp_path):
    """`raygrpo down` right after the checkpoint of step 8 is written and before the run's next drain (its
    fault hook holds the driver there: the window that lost step 8's records), then `up` on the same home:
    the job goes on after step 8 and each step's trajectories are stored exactly prompts x group times (the
    steps the lost run did after its checkpoint are run again and replace what it wrote)."""
    state, _ = stack
    steps = 16
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = {"agent_id": "cli-agent", "training_file": "rows.jsonl", "config": {
        "model": tiny_model_dir, "reward": "digit", "n_iterations": steps, "batch_size": BATCH,
        "n_trajectories_per_query": GROUP, "learning_rate": 1e-3, "max_new_tokens": 6, "checkpoint_interval": 4,
        "max_budget_usd": "5", "num_policy_workers": 1, "num_rollout_workers": 1, "num_reward_workers": 1,
        "engine": {"cpus_per_worker": 1, "cpus_per_reward_worker": 0.5}}}
    job_id = run(home, "submit", "--detach", str(_write(tmp_path / "restart.yaml", yaml.safe_dump(spec)))).stdout.strip()
    run_dir = home / "jobs" / job_id / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "FAULT").write_text("after-checkpoint 8 hold")
    deadline = time.time() + 300
    while not (run_dir / "FAULT-HELD").exists():
        assert time.time() < deadline, json.loads(run(home, "--json", "status", job_id).stdout)
        time.sleep(0.2)
    assert json.loads(run(home, "--json", "status", job_id).stdout)["current_iteration"] == 8  # 8 stored, not 9
    run(home, "down")
    port = state["api_url"].rsplit(":", 1)[1].split("/")[0]
    run(home, "up", "--port", port, "--num-cpus", "6")
    deadline = time.time() + 420
    while (status := json.loads(run(home, "--json", "status", job_id).stdout))["status"] not in (
            "completed", "failed", "cancelled"):
        assert time.time() < deadline, status
        time.sleep(1.0)
    assert status["status"] == "completed" and status["current_iteration"] == steps, status
    out = home / "restart.jsonl"
    run(home, "export", job_id, "-o", str(out))
    per_step = Counter(json.loads(line)["step"] for line in out.read_text().splitlines() if line.strip())
    assert per_step == dict.fromkeys(range(1, steps + 1), BATCH * GROUP), per_step


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unreachable_api_exits_4(tmp_path):
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "--url", f"http://127.0.0.1:{_free_port()}",
                                      "--token", "x", "list"], env={"RAYGRPO_URL": None})
    assert result.exit_code == 4 and "cannot reach the API" in result.stderr


def test_down_stops_the_stack(stack, home):
    state, _ = stack
    run(home, "down")
    assert read_state(home) is None and not (home / "stack.json").exists()
    deadline = time.time() + 30
    while time.time() < deadline and os.path.exists(f"/proc/{state['pid']}"):
        time.sleep(0.2)
    import httpx

    with pytest.raises(httpx.TransportError):
        httpx.get(state["api_url"] + "/health", timeout=2)
    assert "nothing to stop" in run(home, "down").stderr
