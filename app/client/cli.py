"""`raygrpo`: the command line of the job API (typer + rich), built on the SDK (app.client).

`raygrpo up` starts a local Ray (random free ports, never 6379) and the job API on Serve in a
background process and writes `<home>/stack.json`, so every later command finds the API, the Ray
dashboard and the local JWT secret without flags; `raygrpo down` stops exactly that process. Against
a remote API pass `--url` and `--token`/`--api-key` (or RAYGRPO_URL, RAYGRPO_TOKEN, RAYGRPO_API_KEY).

Human output (tables, progress bars) goes to stderr, the result a script wants to stdout: a job id,
a path, or with `--json` the JSON reply. Exit codes: 0 ok, 1 the job failed or was cancelled,
2 bad usage (typer), 3 the API answered with an error, 4 the API could not be reached.
Shell completion: `raygrpo --install-completion`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.client import sdk

EXIT_JOB_FAILED, EXIT_API_ERROR, EXIT_UNREACHABLE = 1, 3, 4

cli = typer.Typer(name="raygrpo", help="Train LLM agents with GRPO on Ray, and serve them.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
err = Console(stderr=True, soft_wrap=True)  # messages stay one line, whatever the width


def _print_table(table: Table) -> None:
    """A table on a terminal; tab-separated lines, nothing cut, when stdout is a pipe or a file."""
    if sys.stdout.isatty():
        Console().print(table)
        return
    print("\t".join(str(c.header) for c in table.columns))
    for row in zip(*(c.cells for c in table.columns), strict=True):
        print("\t".join(str(v) for v in row))


def _eval_text(ckpt) -> str:
    return "" if ckpt.eval_reward is None else f", eval reward {ckpt.eval_reward:.3f}"

def needs(extra: str, *modules: str) -> None:
    """A command that runs part of the server side checks for it first: with only `raygrpo[client]`
    installed it says which extra to add (exit 2) instead of failing on an ImportError."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        err.print(f"[red]this command needs raygrpo\\[{extra}][/red] ({', '.join(missing)} not installed): "
                  f"pip install 'raygrpo\\[{extra}]'")
        raise typer.Exit(2)


class Opts:
    """The global options, resolved once per invocation."""

    def __init__(self, url: str | None, token: str | None, api_key: str | None, home: Path, as_json: bool):
        self.home, self.as_json = home, as_json
        self.state = read_state(home)
        self.url = url or (self.state or {}).get("api_url")
        self.token, self.api_key = token, api_key
        if not (token or api_key) and self.state is not None and self.url == self.state["api_url"]:
            # the stack this machine started: sign a token with its local secret (never for another URL)
            needs("api", "jwt", "pydantic_settings")
            from app.api.auth import mint_token
            from app.settings import Settings

            self.token = mint_token(Settings(home=home), os.environ.get("USER") or "local", "admin", ttl_s=3600)

    def client(self) -> sdk.Client:
        return sdk.Client(self.url, token=self.token, api_key=self.api_key, timeout=300)

    def out(self, value: Any, text: str | None = None) -> None:
        """The result: JSON with --json, else `text` (when given) on stdout."""
        if self.as_json:
            typer.echo(json.dumps(value.model_dump(mode="json") if hasattr(value, "model_dump") else value,
                                  indent=2, default=str))
        elif text is not None:
            typer.echo(text)


def state_path(home: Path) -> Path:
    return home / "stack.json"


def read_state(home: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(state_path(home).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return state if _alive(state.get("pid")) else None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@cli.callback()
def main_options(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(envvar="RAYGRPO_URL", help="the API (default: the `up` stack)")] = None,
    token: Annotated[str | None, typer.Option(envvar="RAYGRPO_TOKEN", help="a JWT")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="RAYGRPO_API_KEY", help="an API key")] = None,
    home: Annotated[Path, typer.Option(envvar="RAYGRPO_HOME", help="local state: database, jobs, secret")] = Path(
        "runs"),
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")] = False,
) -> None:
    ctx.obj = Opts(url, token, api_key, home.resolve(), as_json)


def _run(fn: Any) -> Any:
    """Call the API; errors become a red line and an exit code."""
    try:
        return fn()
    except sdk.TransportError as e:
        err.print(f"[red]cannot reach the API:[/red] {e.message}\n(start one with `raygrpo up`, or pass --url)")
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except sdk.Unauthenticated as e:
        err.print(f"[red]error {e.code}:[/red] {e.message}\n(pass --token or set RAYGRPO_TOKEN: `raygrpo token` "
                  "mints one for the local stack; or --api-key / RAYGRPO_API_KEY)")
        raise typer.Exit(EXIT_API_ERROR) from None
    except sdk.RaygrpoError as e:
        err.print(f"[red]error {e.code}:[/red] {e.message}")
        raise typer.Exit(EXIT_API_ERROR) from None


def _paced(fn: Any, attempts: int = 10) -> Any:
    """`_run`, waiting out the API's rate limit (Retry-After) instead of failing: paging through a
    large export makes many calls of a limited method."""
    for _ in range(attempts - 1):
        try:
            return fn()
        except sdk.RateLimited as e:
            time.sleep(e.retry_after_s or 5.0)
        except sdk.RaygrpoError:
            break  # reported by _run below (the calls paced here only read)
    return _run(fn)


# ---- the local stack --------------------------------------------------------------------------------

@cli.command()
def up(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="HTTP port of Serve (0: a free one)")] = 8001,
    num_cpus: Annotated[int | None, typer.Option(help="logical CPUs of the local Ray (default: max(cores, 8))")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the API")] = 180.0,
    replicas: Annotated[int | None, typer.Option(help="API replicas, fixed (default: autoscaled from 1): "
                                                      "2 or more keep it answering when one dies")] = None,
) -> None:
    """Start a local Ray and the job API on it in the background (SQLite under --home, no Redis)."""
    o: Opts = ctx.obj
    needs("api", "ray", "fastapi", "sqlmodel", "torch")
    if o.state is not None:
        err.print(f"already up: {o.state['api_url']} (pid {o.state['pid']})")
        o.out(o.state, o.state["api_url"])
        return
    o.home.mkdir(parents=True, exist_ok=True)
    state_path(o.home).unlink(missing_ok=True)
    log = o.home / "stack.log"
    cmd = [sys.executable, "-m", "app.client.cli", "--home", str(o.home), "serve-stack", "--port", str(port or _free_port()),
           "--num-cpus", str(num_cpus or max(os.cpu_count() or 1, 8)), *(["--replicas", str(replicas)] if replicas else [])]
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # outlives this command
    deadline = time.monotonic() + timeout
    with err.status("starting Ray and the job API ..."):
        while time.monotonic() < deadline:
            state = read_state(o.home)
            if state is not None:
                err.print(f"[green]up[/green]: API {state['api_url']}  dashboard {state['dashboard_url']}  "
                          f"(pid {state['pid']}, log {log})")
                o.out(state, state["api_url"])
                return
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.terminate()
    tail = log.read_text(errors="replace").splitlines()[-15:]
    err.print("[red]the stack did not come up[/red]; the end of " + str(log) + ":\n" + "\n".join(tail))
    raise typer.Exit(EXIT_UNREACHABLE)


@cli.command("serve-stack", hidden=True)
def serve_stack(ctx: typer.Context, port: int = 8001, num_cpus: int = 8, replicas: int = 0) -> None:
    """The process `up` starts: a Ray head (`ray start --block`, its child) + Serve + the API until SIGTERM.

    Every port of the head is a free one: Ray's fixed defaults (6379, the dashboard agent's 52365, the
    client server's 10001) may belong to another cluster on this machine. `ray start --block` stops
    all of its node's processes when it gets SIGTERM, and only those.
    """
    o: Opts = ctx.obj
    os.environ["RAYGRPO_HOME"] = str(o.home)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Measured 1.5x the throughput of Serve's defaults on the job API (docs/benchmarks.md).
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # Serve's proxy must not answer 500 to a header it cannot decode (app.api.proxy).
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "app.api.proxy:middlewares")
    ray_exe = Path(sys.executable).with_name("ray")
    # Ray's token auth, as ray.init gives a new local cluster; set before Ray is imported, which reads it.
    if not os.environ.get("RAY_AUTH_MODE"):
        if not (os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists()):
            subprocess.run([str(ray_exe), "get-auth-token", "--generate"], check=True, capture_output=True)
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    from app.api.serve import start

    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                             "runtime-env-agent-port", "ray-client-server-port")}
    # A temp dir of its own: `ray start` records its address there, and in /tmp/ray that record would
    # make every plain `ray.init()` on this machine join this cluster.
    temp_dir = tempfile.mkdtemp(prefix="raygrpo-ray-", dir="/tmp")
    head = subprocess.Popen([str(ray_exe), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             "--disable-usage-stats", f"--temp-dir={temp_dir}",
                             *(f"--{k}={v}" for k, v in ports.items())],
                            # `down` of a local stack: no proxies elsewhere to drain traffic to first
                            env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})

    def stop(*_: Any) -> None:
        raise SystemExit(0)  # unwinds to the `finally` below

    try:
        address = f"127.0.0.1:{ports['port']}"
        deadline = time.monotonic() + 120
        # Connect once the head is up (its dashboard answers): a ray.init that failed leaves this process
        # unable to connect again.
        while not _listening(ports["dashboard-port"]):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start (exit code {head.poll()})")
            time.sleep(0.5)
        ray.init(address=address, namespace="raygrpo", log_to_driver=False)
        # after ray.init, which installs its own SIGTERM handler for drivers
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
        env = {"RAYGRPO_HOME": str(o.home), "RAY_DASHBOARD_URL": dashboard}
        # A developer's own stack: local models may come from the folder it was started in, unless the
        # operator says otherwise (docs/operations.md, Security).
        env["RAYGRPO_MODEL_ROOTS"] = os.environ.get("RAYGRPO_MODEL_ROOTS") or str(Path.cwd())
        for key in ("DATABASE_URL", "REDIS_URL", "RAYGRPO_JWT_SECRET", "RAYGRPO_DEFAULT_MODEL", "PYTHONPATH",
                    "RAYGRPO_ALLOWED_REWARDS", "RAYGRPO_ALLOWED_ENVIRONMENTS", "RAYGRPO_ALLOW_HUB_MODELS"):
            if os.environ.get(key):
                env[key] = os.environ[key]
        api_url = start(port=port, env=env, replicas=replicas or None)
        _wait_for_jobs_agent(dashboard)
        state = {"pid": os.getpid(), "api_url": api_url.removesuffix("/api/v1/jsonrpc"), "rpc_url": api_url,
                 "dashboard_url": dashboard, "ray_address": address, "home": str(o.home),
                 "ray_logs": str(Path(temp_dir) / "session_latest" / "logs"), "started_at": time.time()}
        tmp = state_path(o.home).with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_path(o.home))
        print(f"up: {state}", flush=True)
        while head.poll() is None:
            time.sleep(1.0)
    finally:  # never leave a head behind
        state_path(o.home).unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(Exception):
            ray.shutdown()
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_agent(dashboard: str, timeout: float = 120.0) -> None:
    """Up means ready to run jobs: the Jobs API refuses submissions ("No available agent") until the
    node's dashboard agent has registered, and the dispatcher would fail the first job on that. A
    no-op probe job is accepted once it has."""
    import uuid

    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            JobSubmissionClient(dashboard).submit_job(entrypoint="true", submission_id=f"raygrpo-up-{uuid.uuid4().hex[:8]}")
            return
        except Exception:  # the client raises plain RuntimeError/ConnectionError while the agent starts
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


@cli.command()
def down(ctx: typer.Context, timeout: float = 60.0) -> None:
    """Stop the stack `up` started (its Serve apps, jobs and Ray)."""
    o: Opts = ctx.obj
    if o.state is None:
        err.print(f"nothing to stop under {o.home}")
        return
    pid = o.state["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with err.status("stopping ..."):
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.3)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    state_path(o.home).unlink(missing_ok=True)
    err.print("[green]down[/green]")


# ---- jobs ---------------------------------------------------------------------------------------------

def load_job_spec(path: Path) -> dict[str, Any]:
    """A YAML/JSON file of training.start_grpo params; `training_file`/`evaluation_file` name JSONL rows
    (relative to the file), and a `config.model` that is a local directory is made absolute."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"{path}: {e}") from None
    if not isinstance(spec, dict):
        raise typer.BadParameter(f"{path}: expected a mapping of training.start_grpo params")
    for key, target in (("training_file", "training_data"), ("evaluation_file", "evaluation_data")):
        if key in spec:
            rows_path = (path.parent / spec.pop(key)).resolve()
            try:
                spec[target] = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
            except (OSError, ValueError) as e:
                raise typer.BadParameter(f"{key}: {rows_path}: {e}") from None
    model = (spec.get("config") or {}).get("model")
    if isinstance(model, str):
        for base in (Path.cwd(), path.parent):
            if (base / model / "config.json").exists():
                spec["config"]["model"] = str((base / model).resolve())
                break
    return spec


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("reward {task.fields[reward]}  loss {task.fields[loss]}  cost ${task.fields[cost]}"),
                    TimeElapsedColumn(), console=err, transient=False)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def follow(o: Opts, c: sdk.Client, job_id: str, poll_s: float = 1.0) -> sdk.JobStatus:
    """Poll a job to its end on a live progress bar (plain lines when stderr is not a terminal)."""
    with _progress() as bar:
        task = bar.add_task(job_id, total=None, reward="-", loss="-", cost="0")
        last_line = -1
        while True:
            s = _run(lambda: c.get_status(job_id))
            bar.update(task, total=s.total_iterations, completed=s.current_iteration, description=s.status,
                       reward=_fmt(s.metrics.avg_reward), loss=_fmt(s.metrics.loss), cost=s.cost_usd or "0")
            if not err.is_terminal and s.current_iteration >= last_line + max(1, s.total_iterations // 10):
                last_line = s.current_iteration
                err.print(f"step {s.current_iteration}/{s.total_iterations} reward {_fmt(s.metrics.avg_reward)} "
                          f"cost ${s.cost_usd}")
            if s.done:
                return s
            time.sleep(poll_s)


def _summary(s: sdk.JobStatus) -> None:
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(s.status, "white")
    err.print(f"[{colour}]{s.job_id}: {s.status}[/{colour}] after {s.current_iteration}/{s.total_iterations} steps, "
              f"reward {_fmt(s.metrics.avg_reward)}, eval {_fmt(s.metrics.eval_reward)}, cost ${s.cost_usd}")
    if s.error_message:
        err.print(f"[red]error:[/red] {s.error_message}")
    if s.best_checkpoint:
        err.print(f"best checkpoint: {s.best_checkpoint.checkpoint_id} (step {s.best_checkpoint.step}"
                  f"{_eval_text(s.best_checkpoint)}) {s.best_checkpoint.path or ''}")


@cli.command()
def submit(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="YAML/JSON of start_grpo params")],
    detach: Annotated[bool, typer.Option("--detach", "-d", help="print the job id and return at once")] = False,
    poll: Annotated[float, typer.Option(help="seconds between status polls")] = 1.0,
) -> None:
    """Queue a GRPO job; follow it on a progress bar (iterations, reward, cost) until it ends."""
    o: Opts = ctx.obj
    spec = load_job_spec(config)
    with o.client() as c:
        job = _run(lambda: c.call("training.start_grpo", **spec))
        job_id = job["job_id"]
        err.print(f"submitted [bold]{job_id}[/bold] ({job['status']})")
        if detach:
            o.out(job, job_id)
            return
        status = follow(o, c, job_id, poll)
    _summary(status)
    o.out(status, job_id)
    if status.status != "completed":
        raise typer.Exit(EXIT_JOB_FAILED)


@cli.command()
def plan(
    config: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the YAML `submit` takes (or a grpo.run "
                                                                           "YAML)")],
    device_memory: Annotated[float | None, typer.Option("--device-memory", help="GiB per GPU (or per CPU worker); "
                                                       "default: the job's device_memory_gib, else the GPU "
                                                       "model the Ray cluster at RAY_ADDRESS reports")] = None,
    model_config: Annotated[Path | None, typer.Option("--model-config", help="the model's config.json, when "
                                                      "config.model is not a local directory")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the plan as JSON")] = False,
) -> None:
    """The memory plan of a job, offline: predicted peak per device of policy workers and rollout actors.
    Exit 0 when it fits, 1 when it does not (the reason and the knob to turn are printed)."""
    from grpo import memplan
    from grpo.config import ConfigError

    try:
        spec = yaml.safe_load(config.read_text())
        cfg = memplan.config_from_spec(spec if isinstance(spec, dict) else {})
        dims = memplan.ModelDims.from_config(model_config or cfg.model)
    except (ConfigError, ValueError, OSError, yaml.YAMLError) as e:
        err.print(f"[red]plan[/red]: {e}")
        raise typer.Exit(2) from None
    memory = device_memory or cfg.device_memory_gib
    if memory is None and cfg.gpus_per_worker > 0 and os.environ.get("RAY_ADDRESS") \
            and importlib.util.find_spec("ray") is not None:
        import ray

        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
        try:
            memory = memplan.device_memory_from_cluster(ray.cluster_resources())
        finally:
            ray.shutdown()
    p = memplan.plan(cfg, dims, device_memory_gib=memory)
    typer.echo(json.dumps(p.as_dict(), indent=2) if as_json else memplan.render(p))
    if p.fits is False:
        raise typer.Exit(1)


@cli.command()
def status(ctx: typer.Context, job_id: str,
           follow_: Annotated[bool, typer.Option("--follow", "-f", help="poll until the job ends")] = False) -> None:
    """Status, progress, metrics and cost of a job."""
    o: Opts = ctx.obj
    with o.client() as c:
        s = follow(o, c, job_id) if follow_ else _run(lambda: c.get_status(job_id))
    if not o.as_json:
        table = Table(show_header=False, box=None)
        for key in ("job_id", "agent_id", "status", "current_iteration", "total_iterations", "progress_percent",
                    "cost_usd", "budget_usd", "created_at", "started_at", "finished_at", "stop_reason",
                    "error_message"):
            table.add_row(key, str(getattr(s, key)))
        for key, value in s.metrics.model_dump().items():
            table.add_row(f"metrics.{key}", str(value))
        if s.best_checkpoint:
            table.add_row("best_checkpoint", f"{s.best_checkpoint.checkpoint_id} step {s.best_checkpoint.step}"
                                             f"{_eval_text(s.best_checkpoint)} {s.best_checkpoint.path or ''}")
        err.print(table)
    o.out(s, s.status)


@cli.command("list")
def list_(
    ctx: typer.Context,
    agent: Annotated[str | None, typer.Option(help="only this agent's jobs")] = None,
    state: Annotated[str | None, typer.Option("--status", help="only jobs in this state")] = None,
    limit: int = 20,
) -> None:
    """Jobs, newest first, as a table."""
    o: Opts = ctx.obj
    with o.client() as c:
        page = _run(lambda: c.list_jobs(agent_id=agent, status=state, limit=limit))
    table = Table("job", "agent", "status", "steps", "reward", "cost $", "created")
    for j in page.jobs:
        table.add_row(j.job_id, j.agent_id, j.status, f"{j.current_iteration}/{j.total_iterations}",
                      _fmt(j.metrics.avg_reward), j.cost_usd or "", f"{j.created_at:%Y-%m-%d %H:%M:%S}")
    if not o.as_json:
        _print_table(table)
    o.out(page)


@cli.command()
def cancel(ctx: typer.Context, job_id: str, reason: str | None = None,
           wait: Annotated[bool, typer.Option(help="wait for a running job to checkpoint and stop")] = True) -> None:
    """Cancel a queued or running job (a running one checkpoints first)."""
    o: Opts = ctx.obj
    with o.client() as c:
        r = _run(lambda: c.cancel(job_id, reason=reason, wait=wait))
    err.print(f"{r.job_id}: {r.status} after {r.iterations_completed} steps"
              + (f", checkpoint {r.checkpoint_id}" if r.checkpoint_id else ""))
    o.out(r, r.status)


def _ray_token_auth() -> None:
    """Send this machine's Ray token (as ray.init's clusters expect) when the environment says nothing."""
    if not os.environ.get("RAY_AUTH_MODE") and (os.environ.get("RAY_AUTH_TOKEN")
                                                or (Path.home() / ".ray" / "auth_token").exists()):
        os.environ["RAY_AUTH_MODE"] = "token"


def _dashboard(o: Opts) -> str:
    return os.environ.get("RAY_DASHBOARD_URL") or (o.state or {}).get("dashboard_url") or "http://127.0.0.1:8265"


@cli.command()
def logs(ctx: typer.Context, job_id: str,
         follow_: Annotated[bool, typer.Option("--follow", "-f", help="stream until the run ends")] = False) -> None:
    """The log of the job's run: its Ray Job's driver output (from the Ray Jobs API)."""
    o: Opts = ctx.obj
    needs("engine", "ray")
    _ray_token_auth()
    from ray.job_submission import JobSubmissionClient

    try:
        jobs = JobSubmissionClient(_dashboard(o))
        runs = sorted((j for j in jobs.list_jobs() if (j.submission_id or "").startswith(job_id)),
                      key=lambda j: j.start_time or 0)
    except Exception as e:  # the dashboard's client raises plain exceptions for every failure
        err.print(f"[red]cannot reach the Ray Jobs API at {_dashboard(o)}:[/red] {e}")
        raise typer.Exit(EXIT_UNREACHABLE) from None
    if not runs:
        err.print(f"[red]no Ray Job for {job_id}[/red] (a queued job has not started yet)")
        raise typer.Exit(EXIT_API_ERROR)
    submission = runs[-1].submission_id
    if not follow_:
        sys.stdout.write(jobs.get_job_logs(submission))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(submission):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


@cli.command()
def evaluate(ctx: typer.Context, job_id: str,
             checkpoint: Annotated[str | None, typer.Option(help="a checkpoint id (default: the best)")] = None,
             max_queries: int = 200) -> None:
    """Score a checkpoint against its base model on the job's evaluation queries."""
    o: Opts = ctx.obj
    with o.client() as c, err.status("evaluating on the cluster ..."):
        r = _run(lambda: c.evaluate(job_id, checkpoint_id=checkpoint, max_queries=max_queries))
    table = Table("model", "success rate", "avg reward")
    table.add_row(f"{r.checkpoint_id} (step {r.step})", _fmt(r.success_rate), _fmt(r.avg_reward))
    table.add_row(f"base {r.base_model['model']}", _fmt(r.base_model["success_rate"]),
                  _fmt(r.base_model["avg_reward"]))
    err.print(table)
    o.out(r, f"{r.success_rate}")


@cli.command()
def export(
    ctx: typer.Context,
    job_id: str,
    out: Annotated[Path | None, typer.Option("--output", "-o", help="file (default: <job>.<format>)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or parquet")] = "jsonl",
    success_only: bool = False,
    min_reward: float | None = None,
) -> None:
    """Write a job's trajectories to JSONL or Parquet (paged through training.export_trajectories)."""
    o: Opts = ctx.obj
    if fmt not in ("jsonl", "parquet"):
        raise typer.BadParameter("--format: jsonl or parquet")
    out = out or Path(f"{job_id}.{fmt}")
    rows: list[dict[str, Any]] = []
    with o.client() as c:
        while True:
            page = _paced(lambda offset=len(rows): c.export_trajectories(
                job_id, success_only=success_only or None, min_reward=min_reward, limit=10_000, offset=offset))
            rows += [t.model_dump(mode="json") for t in page.trajectories]
            if not page.has_more:
                break
    if fmt == "jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        needs("plot", "pyarrow")
        import pyarrow as pa
        import pyarrow.parquet as pq

        for r in rows:  # nested agent steps as JSON text: one column type for every row
            r["steps"] = None if r.get("steps") is None else json.dumps(r["steps"])
        pq.write_table(pa.Table.from_pylist(rows), out)
    err.print(f"{len(rows)} trajectories -> {out}")
    o.out({"path": str(out), "rows": len(rows)}, str(out))


@cli.command()
def plot(ctx: typer.Context, job_id: str,
         out: Annotated[Path | None, typer.Option("--output", "-o", help="PNG (default: <job>.png)")] = None) -> None:
    """Reward (train, eval), loss and KL curves of a job to a PNG, from the run's metrics.jsonl."""
    o: Opts = ctx.obj
    needs("plot", "matplotlib")
    from grpo.report import plot_curves, read_metrics

    with o.client() as c:
        s = _run(lambda: c.get_status(job_id))
    candidates = [o.home / "jobs" / job_id / "run" / "metrics.jsonl"]
    best = s.best_checkpoint.path if s.best_checkpoint and s.best_checkpoint.path else None  # an admin's reply
    if best and "://" in best:  # the run's files in a bucket (RAYGRPO_STORAGE_URL): read with the engine's storage
        try:
            from grpo import storage
        except ImportError:
            err.print("[red]the run's files are in a bucket[/red]: plot it where raygrpo[engine] is installed")
            raise typer.Exit(EXIT_API_ERROR) from None
        remote = storage.join(best.rsplit("/", 1)[0], "metrics.jsonl")
        local = Path(tempfile.mkdtemp(prefix="raygrpo-plot-")) / "metrics.jsonl"
        if storage.is_file(remote):
            storage.download(remote, local)
        candidates.insert(0, local)
    elif best:
        candidates.insert(0, Path(best).parent / "metrics.jsonl")
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        err.print(f"[red]no metrics for {job_id}[/red]: looked at {', '.join(map(str, candidates))} "
                  "(plot runs where the job's storage is mounted; a queued job has none yet)")
        raise typer.Exit(EXIT_API_ERROR)
    rows = read_metrics(path)
    out = plot_curves(rows, out or Path(f"{job_id}.png"))
    err.print(f"{len(rows)} steps -> {out}")
    o.out({"path": str(out), "steps": len(rows)}, str(out))


# ---- serving --------------------------------------------------------------------------------------------

def _source(c: sdk.Client, value: str) -> dict[str, str]:
    """A checkpoint id, a job id (its best checkpoint), or a model directory / hub id."""
    if value.startswith("ckpt_"):
        return {"checkpoint_id": value}
    if value.startswith("job_"):
        best = _run(lambda: c.get_status(value)).best_checkpoint
        if best is None:
            err.print(f"[red]{value} has no checkpoint yet[/red]")
            raise typer.Exit(EXIT_API_ERROR)
        return {"checkpoint_id": best.checkpoint_id}
    return {"model": str(Path(value).resolve()) if Path(value).exists() else value}


@cli.command()
def deploy(
    ctx: typer.Context,
    name: str,
    source: Annotated[str | None, typer.Argument(help="job id (its best checkpoint), checkpoint id, or model")] = None,
    variant: Annotated[list[str] | None, typer.Option(
        help="A/B: NAME=SOURCE[:WEIGHT], twice or more instead of SOURCE")] = None,
    replicas: int = 1,
    min_replicas: Annotated[int | None, typer.Option(help="autoscale between this ...")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="... and this")] = None,
    gpus: Annotated[float | None, typer.Option(help="GPUs per replica (default: 1 if the cluster has any)")] = None,
    batching: Annotated[bool, typer.Option(help="dynamic request batching")] = True,
    wait: Annotated[bool, typer.Option(help="wait until it serves")] = True,
    timeout: float = 300.0,
) -> None:
    """Serve a checkpoint with an OpenAI-compatible API; prints its base URL."""
    o: Opts = ctx.obj
    if (source is None) == (not variant):
        raise typer.BadParameter("give SOURCE or --variant (twice or more), not both")
    with o.client() as c:
        kw: dict[str, Any] = {"replicas": replicas, "gpus_per_replica": gpus, "batching": batching}
        if min_replicas is not None or max_replicas is not None:
            kw["autoscaling"] = {"min_replicas": min_replicas or 1, "max_replicas": max_replicas or 4}
        if variant:
            kw["variants"] = []
            for v in variant:
                vname, sep, rest = v.partition("=")
                if not sep:
                    raise typer.BadParameter(f"--variant {v!r}: expected NAME=SOURCE[:WEIGHT]")
                src, sep, weight = rest.rpartition(":")
                if not sep or not weight.replace(".", "", 1).isdigit():
                    src, weight = rest, "1"
                kw["variants"].append({"name": vname, "weight": float(weight), **_source(c, src)})
        else:
            kw.update(_source(c, source))
        dep = _run(lambda: c.deploy(name, **kw))
        deadline = time.monotonic() + timeout
        with err.status(f"deploying {name} ..."):
            while wait and dep.status != "running":
                if dep.status in ("failed", "unhealthy", "not_running") or time.monotonic() > deadline:
                    err.print(f"[red]{name}: {dep.status}[/red] {dep.model_extra.get('message', '')}")
                    raise typer.Exit(EXIT_API_ERROR)
                time.sleep(1.0)
                dep = _run(lambda: c.deployments(name=name)).deployments[0]
        url = c.policy_url(name)
    err.print(f"[green]{name}: {dep.status}[/green]  OpenAI base URL {url}")
    o.out(dep, url)


@cli.command()
def undeploy(ctx: typer.Context, name: str) -> None:
    """Stop serving a deployment."""
    o: Opts = ctx.obj
    with o.client() as c:
        r = _run(lambda: c.undeploy(name))
    err.print(f"{name}: {r.status}")
    o.out(r, r.status)


@cli.command()
def deployments(ctx: typer.Context) -> None:
    """Deployed policies with their status and URL."""
    o: Opts = ctx.obj
    with o.client() as c:
        deps = _run(lambda: c.deployments())
        table = Table("name", "status", "variants", "replicas", "url")
        for d in deps.deployments:
            table.add_row(d.name, d.status, ", ".join(f"{v['name']}:{v['weight']:g}" for v in d.variants),
                          str(sum(d.running_replicas.values())), c.policy_url(d.name))
    if not o.as_json:
        _print_table(table)
    o.out(deps)


# ---- local administration ----------------------------------------------------------------------------

@cli.command()
def token(
    ctx: typer.Context,
    sub: Annotated[str, typer.Option(help="the subject (user)")] = os.environ.get("USER") or "local",
    role: Annotated[str, typer.Option(help="admin, researcher or viewer")] = "admin",
    ttl: Annotated[int, typer.Option(help="seconds until it expires")] = 24 * 3600,
    scope: Annotated[list[str] | None, typer.Option(help="narrow the role to these permissions")] = None,
) -> None:
    """Mint a JWT signed with RAYGRPO_JWT_SECRET or the local secret under --home."""
    o: Opts = ctx.obj
    needs("api", "jwt", "pydantic_settings")
    from app.api.auth import mint_token
    from app.settings import Settings

    try:
        value = mint_token(Settings(home=o.home), sub, role, ttl_s=ttl, scopes=scope)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    o.out({"token": value, "sub": sub, "role": role, "expires_in": ttl}, value)


@db_cli.command("upgrade")
def db_upgrade(ctx: typer.Context,
               url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: DATABASE_URL or "
                                                             "the SQLite file under --home)")] = None) -> None:
    """Migrate the database to the newest schema (alembic upgrade head)."""
    o: Opts = ctx.obj
    needs("api", "sqlalchemy", "alembic", "pydantic_settings")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from app.data.db import upgrade
    from app.settings import Settings

    target = url or Settings(home=o.home).db_url
    shown = make_url(target).render_as_string(hide_password=True)
    o.home.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(target)
    except (OperationalError, ProgrammingError) as e:
        err.print(f"[red]cannot upgrade {shown}:[/red] {str(e.orig)[:300]}\n(is the database reachable, and "
                  "is it one this API created?)")
        raise typer.Exit(EXIT_API_ERROR) from None
    err.print(f"upgraded {shown} to head")
    o.out({"url": shown, "revision": "head"}, shown)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
