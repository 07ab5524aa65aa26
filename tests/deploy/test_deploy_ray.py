"""The shipped KubeRay objects, run on a real local Ray: what KubeRay would do with them, minus Kubernetes.

One `ray start --head` (127.0.0.1, free ports, its own temp dir, token auth on as in the manifests) for
the module. KubeRay deploys a RayService by sending serveConfigV2 to the dashboard, and runs a RayJob
by `ray job submit` of its entrypoint and runtimeEnvYAML; the tests do exactly that with the strings
from kuberay/, changing only the HTTP port (and key=value overrides that shrink the run). Cleanup
kills only the processes of this cluster (found by its temp dir), never a bare `ray stop`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "kuberay"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _own_processes(marker: str) -> list[int]:
    """Pids whose command line names `marker` (the cluster's temp dir), read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _stop_cluster(temp_dir: str) -> None:
    """`ray stop` for this cluster only: every process whose command line names its temp dir."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in _own_processes(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _own_processes(temp_dir) and time.time() < deadline:
            time.sleep(0.2)


def _manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local head like the manifests' (token auth on), joined only through its dashboard."""
    temp_dir = tempfile.mkdtemp(prefix="rgk-", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, serve = _free_ports(8)
    home = tmp_path_factory.mktemp("raygrpo-home")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "DATABASE_URL", "REDIS_URL") and not k.startswith("RAYGRPO_")}
    env.update(_api_env(home.parent / "secrets"))
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),  # as KubeRay's authOptions sets them
        "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{env.get('PATH', '')}",
        "RAYGRPO_HOME": str(home), "RAY_DASHBOARD_URL": f"http://127.0.0.1:{dashboard}",
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    })
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
           "--num-cpus", "4", "--temp-dir", temp_dir, "--disable-usage-stats"]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        yield {"env": env, "address": f"http://127.0.0.1:{dashboard}", "serve_port": serve, "home": home}
    finally:
        _stop_cluster(temp_dir)
        assert not _own_processes(temp_dir), "processes of the test's Ray cluster survived cleanup"
        shutil.rmtree(temp_dir, ignore_errors=True)


def _api_env(secrets_dir: Path) -> dict[str, str]:
    """The API pods' environment from rayservice.yaml: plain values as they are, each mounted secret file
    written with a random value (DATABASE_URL/REDIS_URL, from Secrets, are left out: SQLite, no Redis)."""
    head = _manifest("rayservice.yaml")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    secrets_dir.mkdir(exist_ok=True)
    env = {}
    for var in head["containers"][0]["env"]:
        if "value" not in var:
            continue
        value = var["value"]
        if var["name"].endswith("_FILE"):
            path = secrets_dir / Path(value).name
            path.write_text(secrets.token_hex(32))
            value = str(path)
        env[var["name"]] = value
    return env


def _cli(ray_head: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*args], env=ray_head["env"], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_rayservice_serve_config_serves_the_api(ray_head, tmp_path):
    """serveConfigV2, deployed through the dashboard like KubeRay does, answers /health/ready and JSON-RPC."""
    config = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    config["http_options"].update(host="127.0.0.1", port=ray_head["serve_port"])  # 8000 in the pod; free here
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    out = _cli(ray_head, str(BIN / "serve"), "deploy", str(path), "--address", ray_head["address"])
    assert out.returncode == 0, out.stdout + out.stderr

    base = f"http://127.0.0.1:{ray_head['serve_port']}"
    deadline, last = time.time() + 240, None
    with httpx.Client(timeout=10) as http:
        while time.time() < deadline:
            try:
                last = http.get(f"{base}/health/ready")
                if last.status_code == 200:
                    break
            except httpx.TransportError as e:
                last = e
            time.sleep(1)
        else:
            status = _cli(ray_head, str(BIN / "serve"), "status", "--address", ray_head["address"])
            pytest.fail(f"the API never became ready: {last!r}\n{status.stdout}{status.stderr}")
        assert last.json()["checks"]["database"] == "ok"
        assert http.get(f"{base}/health/live").json() == {"status": "ok"}
        reply = http.post(f"{base}/api/v1/jsonrpc", json={"jsonrpc": "2.0", "method": "rpc.discover", "id": 1}).json()
    assert reply["id"] == 1 and "error" not in reply, reply
    methods = {m["name"] for m in reply["result"]["methods"]}
    assert {"training.start_grpo", "training.get_status", "training.cancel"} <= methods
    status = _cli(ray_head, str(BIN / "serve"), "status", "--address", ray_head["address"])
    assert "raygrpo-api" in status.stdout and "RUNNING" in status.stdout, status.stdout + status.stderr


def test_the_rayjob_entrypoint_runs_with_ray_job_submit(ray_head, tiny_model_dir, tmp_path):
    """The RayJob's entrypoint and runtimeEnvYAML, submitted as KubeRay's submitter does, run a GRPO run to the end."""
    spec = _manifest("rayjob-grpo.yaml")["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # The shipped run wants 8 GPUs and Qwen; these key=value overrides (grpo.run applies them last) shrink it.
    small = {"model": tiny_model_dir, "dtype": "float32", "num_steps": 2, "group_size": 2, "prompts_per_step": 2,
             "max_new_tokens": 4, "num_policy_workers": 1, "num_rollout_workers": 1, "num_reward_workers": 1,
             "gpus_per_worker": 0, "cpus_per_worker": 1, "cpus_per_reward_worker": 0.5, "eval_size": 0,
             "checkpoint_interval": 0, "output_dir": str(tmp_path / "runs")}
    entrypoint = shlex.split(spec["entrypoint"]) + [f"{k}={v}" for k, v in small.items()]
    submission_id = f"rayjob-smoke-{secrets.token_hex(4)}"
    out = _cli(ray_head, str(BIN / "ray"), "job", "submit", "--address", ray_head["address"],
               "--submission-id", submission_id, "--runtime-env-json", json.dumps(runtime_env),
               "--entrypoint-num-cpus", str(spec["entrypointNumCpus"]), "--", *entrypoint,
               timeout=600)
    status = _cli(ray_head, str(BIN / "ray"), "job", "status", "--address", ray_head["address"], submission_id)
    said = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)  # the CLI's colours
    assert f"Job '{submission_id}' succeeded" in said, out.stdout[-3000:] + said
    run_dir = tmp_path / "runs" / yaml.safe_load((ROOT / _config_path(spec["entrypoint"])).read_text())["run_name"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def _config_path(entrypoint: str) -> str:
    args = shlex.split(entrypoint)
    return args[args.index("--config") + 1]
