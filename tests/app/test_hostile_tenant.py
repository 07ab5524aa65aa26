"""A researcher attacks a live stack (`raygrpo up`) the way a hostile tenant would, while another user's job
runs; every attack ends as a refusal or a score of 0, the victim's job completes, and no reply, log line,
metric or stored row carries a secret.

The attacks ride on `config.reward_source`, the one way a caller sends code: the API compiles it and the
probe call runs in the bubblewrap sandbox (grpo/sandbox.py), so each attack's outcome comes back in the
refusal's message, exactly where the signing key once did. A second job's reward attacks on every item
during training, in the reward actors' sandboxes. Never probed: `kill(-1, ...)` and unbounded fork bombs
(were isolation missing, they would take the test runner down with everything else of its user).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from app.client.cli import cli, read_state

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("sandbox")]

ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(10)]
CANARY_ENV = "RAYGRPO_HOSTILE_CANARY"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(home: Path, *args: str):
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """A `raygrpo up` stack on its embedded defaults, with secrets where an operator keeps them: the JWT
    signing key (home/jwt_secret), a database URL file, and a canary in every stack process's environment."""
    home = tmp_path_factory.mktemp("hostile-home")
    secrets = {"env": "env-" + uuid.uuid4().hex, "db": "db-" + uuid.uuid4().hex}
    (home / "secrets").mkdir()
    (home / "secrets" / "database-url").write_text(f"postgresql://raygrpo:{secrets['db']}@db:5432/raygrpo\n")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("DATABASE_URL", "REDIS_URL", "RAYGRPO_HOME", "RAY_ADDRESS", "RAY_DASHBOARD_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("RAYGRPO_MODEL_ROOTS", str(Path(tiny_model_dir).parent))
        mp.setenv(CANARY_ENV, secrets["env"])
        mp.setenv("RAYGRPO_RATE_LIMITS", "training.start_grpo=200")  # the attacks, not the limiter, are tested
        run(home, "up", "--port", str(_free_port()), "--num-cpus", "6")
        try:
            from app.api.auth import hs256_secret
            from app.settings import Settings

            secrets["jwt"] = hs256_secret(Settings(home=home))  # the stack's signing key (created on first use)
            yield read_state(home), home, secrets
        finally:
            if read_state(home) is not None:
                CliRunner().invoke(cli, ["--home", str(home), "down"])


class Tenant:
    """One user of the stack: JSON-RPC calls with their own token; every reply kept for the secret scan."""

    replies: list[str] = []

    def __init__(self, state: dict, home: Path, subject: str, role: str = "researcher", model: str = ""):
        from app.api.auth import mint_token
        from app.settings import Settings

        self.url, self.subject, self.model = state["api_url"], subject, model
        self.token = mint_token(Settings(home=home), subject, role)
        self.http = httpx.Client(timeout=120, headers={"Authorization": f"Bearer {self.token}"})

    def call(self, method: str, params: dict) -> dict:
        r = self.http.post(self.url + "/api/v1/jsonrpc", json={"jsonrpc": "2.0", "id": 1, "method": method,
                                                               "params": params})
        Tenant.replies.append(r.text)
        return r.json()

    def start(self, reward_source: str, **config) -> dict:
        engine = {"cpus_per_worker": 1, "cpus_per_reward_worker": 0.5, "reward_timeout_s": 3}
        return self.call("training.start_grpo", {"agent_id": self.subject, "training_data": ROWS, "config": {
            "model": self.model, "n_iterations": 3, "batch_size": 2, "n_trajectories_per_query": 2,
            "max_new_tokens": 4, "max_budget_usd": "5", "num_policy_workers": 1, "num_rollout_workers": 1,
            "num_reward_workers": 1, "reward_source": reward_source, "engine": engine, **config}})

    def wait(self, job_id: str, timeout_s: float = 600) -> dict:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            status = self.call("training.get_status", {"job_id": job_id})["result"]
            if status["status"] in ("completed", "failed", "cancelled"):
                return status
            time.sleep(1)
        raise AssertionError(f"{job_id} did not end in {timeout_s}s: {status}")


# An attack: `_attack()` returns the loot when it worked and raises when it did not. The reward raises either
# way, so the job is refused at its probe with the outcome in the message ("LOOT:" only on a breach).
ATTACK = '''
import os, sys
HOME, ALICE_JOB, CANARY, CANARY_PID, PORTS, MARKER = {consts!r}
def reward(prompt, completion, expected):
    try:
        loot = _attack()
    except BaseException as e:
        raise RuntimeError("blocked: " + type(e).__name__) from None
    raise RuntimeError("LOOT:" + str(loot)[:300])
def _attack():
{body}
'''

ATTACKS = {
    "read the JWT signing key": "    return open(HOME + '/jwt_secret').read()",
    "read the database URL file": "    return open(HOME + '/secrets/database-url').read()",
    "read another user's job folder": "    return open(HOME + '/jobs/' + ALICE_JOB + '/data.jsonl').read()",
    "read every process's environment": (
        "    seen = ''\n"
        "    for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [str(os.getppid())]:\n"
        "        try:\n            seen += open('/proc/' + pid + '/environ').read()\n"
        "        except OSError:\n            pass\n"
        "    if CANARY not in seen:\n        raise PermissionError('no canary')\n"
        "    return seen"),
    "remount the root read-write": (
        "    import ctypes\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    if libc.mount(None, b'/', None, 0x20, None) != 0:\n        raise OSError(ctypes.get_errno(), 'mount')\n"
        "    return 'remounted'"),
    "write outside the work folder": (
        "    for path in (HOME + '/escaped', '/escaped', '/usr/lib/escaped'):\n"
        "        try:\n            open(path, 'w').write('x')\n            return path\n"
        "        except OSError:\n            pass\n"
        "    raise PermissionError('nowhere')"),
    "signal a process outside": "    os.kill(CANARY_PID, 0)\n    return 'the canary answered'",
    "start 500 processes": (
        "    import time\n    n = 0\n"
        "    for _ in range(500):\n"
        "        if os.fork() == 0:\n            time.sleep(2)\n            os._exit(0)\n"
        "        n += 1\n"
        "    return n"),
    "connect to Redis, PostgreSQL and the API": (
        "    import _socket\n    reached = []\n"
        "    for port in PORTS:\n"
        "        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n        s.settimeout(2)\n"
        "        try:\n            s.connect(('127.0.0.1', port))\n            reached.append(port)\n"
        "        except OSError:\n            pass\n"
        "    if not reached:\n        raise ConnectionError('nothing')\n"
        "    return reached"),
    "setsid() to outlive the timeout": (
        "    if os.fork() == 0:\n        os.setsid()\n"
        "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', MARKER])\n"
        "    raise ChildProcessError('forked; does it survive?')"),
    "allocate 4 GiB": "    x = bytearray(4 * 2 ** 30)\n    return len(x)",
    "print 1 GiB": "    chunk = b'x' * 2 ** 20\n    for _ in range(1024):\n        os.write(1, chunk)\n    return 'printed'",
}

# The reward of a job that passes its probe and attacks on every item during training: 1 for each attack
# that worked. Every item must score 0.
IN_RUN = '''
import os
HOME, CANARY_PID, PORTS = {consts!r}
def reward(prompt, completion, expected):
    if (prompt, completion, expected) == ("digit 1:", "1", "1"):
        return 0.0  # the probe
    hits = 0
    def secret(): return open(HOME + '/jwt_secret').read()
    def signal(): os.kill(CANARY_PID, 0)
    def connect():
        import _socket
        s = _socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', PORTS[0]))
    for attempt in (secret, signal, connect):
        try:
            attempt()
            hits += 1
        except BaseException:
            pass
    return float(hits)
'''


def _alive_with(marker: str) -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


def test_a_hostile_researcher_gets_nothing_and_the_victims_job_carries_on(stack, tiny_model_dir):
    state, home, secrets = stack
    alice, mallory = Tenant(state, home, "alice", model=tiny_model_dir), Tenant(state, home, "mallory", model=tiny_model_dir)
    admin = Tenant(state, home, "root", "admin")
    api_port = int(state["api_url"].rsplit(":", 1)[1])
    canary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)"])
    marker = f"raygrpo-escapee-{uuid.uuid4().hex}"
    try:
        # the victim's job, running all along (a reward of her own, in the sandbox too)
        victim = alice.start("def reward(p, c, e):\n    return sum(ch == e for ch in c[:4]) / 4\n",
                             n_iterations=8, checkpoint_interval=4, learning_rate=1e-3)["result"]["job_id"]
        # what an attacker can know: paths, the name of a variable, pids and ports; never a secret's value
        consts = (str(home), victim, CANARY_ENV + "=", canary.pid, [6379, 5432, api_port], marker)
        outcomes = {}
        for name, body in ATTACKS.items():
            reply = mallory.start(ATTACK.format(consts=consts, body=body))
            assert "error" in reply, (name, reply)
            outcomes[name] = reply["error"]
            assert reply["error"]["code"] == -40002 and reply["error"]["data"]["field"] == "config.reward_source"
            assert "LOOT:" not in reply["error"]["message"], (name, reply["error"])
            assert alice.call("training.get_status", {"job_id": victim})["result"]["status"] not in (
                "failed", "cancelled")  # the API answers between attacks and the victim's job goes on
        assert len(outcomes) == len(ATTACKS)  # every attack refused, none with loot
        assert "ended without scoring (exit -9)" in outcomes["print 1 GiB"]["message"]  # killed for flooding
        assert "BlockingIOError" in outcomes["start 500 processes"]["message"]  # RLIMIT_NPROC: EAGAIN
        assert "MemoryError" in outcomes["allocate 4 GiB"]["message"]
        deadline = time.time() + 20
        while _alive_with(marker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive_with(marker), "a setsid() child outlived its sandbox"
        assert canary.poll() is None
        assert not (home / "escaped").exists()

        # in training: a reward that attacks on every item scores 0 on every item
        attacker = mallory.start(IN_RUN.format(consts=(str(home), canary.pid, [6379, 5432, api_port])))
        attacker_job = attacker["result"]["job_id"]
        done = mallory.wait(attacker_job)
        assert done["status"] == "completed", done
        rewards = [t["reward"] for t in mallory.call("training.export_trajectories",
                                                     {"job_id": attacker_job, "limit": 1000})["result"]["trajectories"]]
        assert len(rewards) == 3 * 2 * 2 and set(rewards) == {0.0}

        status = alice.wait(victim)
        assert status["status"] == "completed" and status["current_iteration"] == 8, status
        steps = [t["step"] for t in alice.call("training.export_trajectories",
                                               {"job_id": victim, "limit": 1000})["result"]["trajectories"]]
        assert sorted(set(steps)) == list(range(1, 9)) and len(steps) == 8 * 2 * 2

        # her checkpoint is not his, by id or by path; her deployment does not answer him
        ckpt = status["best_checkpoint"]
        assert "path" not in ckpt and ckpt["model"] == f"checkpoint:{ckpt['checkpoint_id']}"
        ckpt_path = admin.call("training.get_status", {"job_id": victim})["result"]["best_checkpoint"]["path"]
        for source in ({"checkpoint_id": ckpt["checkpoint_id"]}, {"model": ckpt_path}, {"model": ckpt["model"]}):
            err = mallory.call("models.deploy", {"name": "stolen", **source})["error"]
            assert err["code"] == -32001, (source, err)
        assert alice.call("models.deploy", {"name": "alices", "checkpoint_id": ckpt["checkpoint_id"]})["result"]
        policy = state["api_url"] + "/policies/alices/v1"
        deadline = time.time() + 300
        while time.time() < deadline:
            r = alice.http.post(policy + "/completions", json={"prompt": "digit 3:", "max_tokens": 2})
            if r.status_code == 200:
                break
            time.sleep(1)
        assert r.status_code == 200, r.text
        assert httpx.post(policy + "/completions", json={"prompt": "digit 3:", "max_tokens": 2},
                          timeout=60).status_code == 401
        assert mallory.http.post(policy + "/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 404
        models = alice.http.get(policy + "/models").json()
        assert str(home) not in json.dumps(models)
        Tenant.replies += [r.text, json.dumps(models)]

        # /metrics: no tenant's job ids for anyone without the scrape credential
        anonymous = httpx.get(state["api_url"] + "/metrics", timeout=60).text
        assert victim not in anonymous and attacker_job not in anonymous
        assert victim in admin.http.get(state["api_url"] + "/metrics").text
        Tenant.replies.append(anonymous)
        # a non-UTF-8 request id is not a 500 (Serve's proxy decodes it itself; app.api.proxy drops it first)
        assert httpx.get(state["api_url"] + "/health", headers={"X-Request-ID": b"\xff"}, timeout=60).status_code == 200
    finally:
        canary.kill()
        canary.wait()

    # no reply, log line, metric or stored row carries a secret
    values = [secrets["jwt"], secrets["db"], secrets["env"]]
    for text in Tenant.replies:
        assert not any(v in text for v in values), text[:500]
    scanned = 0
    skip = {home / "jwt_secret", home / "secrets" / "database-url"}
    for root in (home, Path(state["ray_logs"])):
        for path in root.rglob("*"):
            if path.is_file() and path not in skip:
                data = path.read_bytes()
                scanned += 1
                leaked = [name for name, v in secrets.items() if v.encode() in data]
                assert not leaked, f"the {leaked} secret in {path}"
    assert scanned > 20  # the database, the jobs' files and Ray's logs were there to read
