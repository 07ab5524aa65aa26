"""The Python SDK of the job API: `Client` (sync) and `AsyncClient` (asyncio), both on httpx.

Every JSON-RPC method is a method with typed keyword arguments; replies come back as pydantic models
(attribute access, a readable repr in a notebook; `.model_dump()` for the dict) and JSON-RPC errors as
exceptions of one class per error code (`NotFound`, `InvalidParams`, `Forbidden`, ...), all
`RaygrpoError`. Connection failures are retried with exponential backoff; a call whose request may
have reached the server (a read error) is retried only when the method changes nothing.

    from app.client import Client
    c = Client("http://127.0.0.1:8001", token=...)          # or RAYGRPO_URL / RAYGRPO_TOKEN / RAYGRPO_API_KEY
    job = c.start_grpo("my-agent", rows, config={"model": "Qwen/Qwen2.5-0.5B-Instruct"})
    c.wait(job.job_id, on_status=print)

`AsyncClient` has the same methods, each returning an awaitable of the same type. Not covered: the
stored-model registry's methods (call them with `call(name, **params)`).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict

from app.api import jsonrpc as codes

T = TypeVar("T")
FINAL = ("completed", "failed", "cancelled")
MUTATING = {"training.start_grpo", "training.cancel", "training.pause", "training.resume", "auth.create_api_key",
            "auth.revoke_api_key", "models.deploy", "models.undeploy", "models.share", "sessions.create", "sessions.close",
            "sessions.forward_backward", "sessions.optim_step", "sessions.save_state", "sessions.load_state",
            "sessions.save_weights"}
"""methods a retry could apply twice: retried only when the request surely never left, unless keyed"""
KEYED = {"training.start_grpo"}
"""changing methods the server deduplicates by `idempotency_key`: the SDK sets a key on every call that has
none, so any retry (a read timeout, a 502 after the replica ran it) returns the job the first attempt made"""


# ---- errors ---------------------------------------------------------------------------------------

class RaygrpoError(Exception):
    """A JSON-RPC error reply: `code`, `message`, `data`, and the `method` called."""

    code: int = 0

    def __init__(self, message: str, *, code: int | None = None, data: Any = None, method: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.message, self.data, self.method, self.status = message, data, method, status
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.message} (code {self.code}{f', {self.method}' if self.method else ''})"


class ParseError(RaygrpoError):
    code = codes.PARSE_ERROR


class InvalidRequest(RaygrpoError):
    code = codes.INVALID_REQUEST


class MethodNotFound(RaygrpoError):
    code = codes.METHOD_NOT_FOUND


class InvalidParams(RaygrpoError):
    code = codes.INVALID_PARAMS


class InternalError(RaygrpoError):
    code = codes.INTERNAL_ERROR


class NotFound(RaygrpoError):
    code = codes.NOT_FOUND


class BudgetExceeded(RaygrpoError):
    code = codes.BUDGET_EXCEEDED


class ValidationFailed(RaygrpoError):
    code = codes.VALIDATION_FAILED


class CannotCancel(RaygrpoError):
    code = codes.CANNOT_CANCEL


class EvaluationFailed(RaygrpoError):
    code = codes.EVALUATION_FAILED


class ExportLimitExceeded(RaygrpoError):
    code = codes.EXPORT_LIMIT_EXCEEDED


class DeploymentFailed(RaygrpoError):
    code = codes.DEPLOYMENT_FAILED


class Unauthenticated(RaygrpoError):
    code = codes.UNAUTHENTICATED


class Forbidden(RaygrpoError):
    code = codes.FORBIDDEN


class RateLimited(RaygrpoError):
    code = codes.RATE_LIMITED

    @property
    def retry_after_s(self) -> float | None:
        return (self.data or {}).get("retry_after_s") if isinstance(self.data, dict) else None


class TransportError(RaygrpoError):
    """No JSON-RPC reply: the server could not be reached (after the retries) or answered something else."""


ERRORS: dict[int, type[RaygrpoError]] = {cls.code: cls for cls in RaygrpoError.__subclasses__() if cls.code}


def error_from(error: dict, method: str | None, status: int | None = None) -> RaygrpoError:
    code = error.get("code", 0)
    cls = ERRORS.get(code, RaygrpoError)
    return cls(str(error.get("message", "error")), code=code, data=error.get("data"), method=method, status=status)


# ---- replies ----------------------------------------------------------------------------------------

class Reply(BaseModel):
    """A reply object: its fields as attributes; fields a newer server adds are kept too."""

    model_config = ConfigDict(extra="allow")

    def __getitem__(self, key: str) -> Any:  # c.get_status(j)["status"] reads like the JSON
        return getattr(self, key)


class StartResult(Reply):
    job_id: str
    status: str
    agent_id: str
    total_iterations: int
    budget_usd: str
    created_at: datetime
    created: bool


class Metrics(Reply):
    loss: float | None = None
    avg_reward: float | None = None
    reward_std: float | None = None
    kl: float | None = None
    eval_reward: float | None = None
    trajectories_generated: int = 0
    tokens_per_s: float | None = None
    peak_memory_gib: float | None = None
    """the last step's largest peak over the policy ranks: device memory on GPUs, resident memory on CPUs"""


class CheckpointRef(Reply):
    checkpoint_id: str
    step: int
    model: str | None = None
    """`checkpoint:<id>`: what models.deploy, sessions.create and start_grpo take"""
    path: str | None = None
    """the server's folder of it: in admins' replies only"""
    eval_reward: float | None = None
    """the held-out reward it scored when saved (None: the run did not evaluate)"""


class JobStatus(Reply):
    job_id: str
    agent_id: str
    status: str
    current_iteration: int
    total_iterations: int
    progress_percent: float
    metrics: Metrics
    cost_usd: str | None = None
    budget_usd: str | None = None
    budget_remaining_usd: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    estimated_completion: datetime | None = None
    best_checkpoint: CheckpointRef | None = None
    error_message: str | None = None
    stop_reason: str | None = None
    admission: dict[str, Any] | None = None
    """the dispatcher's decision: {decision: waiting | started | refused, reason, demand, decided_at}"""

    @property
    def done(self) -> bool:
        return self.status in FINAL


class JobPage(Reply):
    jobs: list[JobStatus]
    next_cursor: str | None = None
    has_more: bool = False


class CancelResult(Reply):
    job_id: str
    status: str
    iterations_completed: int = 0
    checkpoint_saved: bool = False
    checkpoint_id: str | None = None


class Trajectory(Reply):
    id: int
    step: int
    query: str
    completion: str
    reward: float
    success: bool


class TrajectoryPage(Reply):
    job_id: str
    trajectories: list[Trajectory]
    total_count: int
    has_more: bool


class Evaluation(Reply):
    job_id: str
    checkpoint_id: str
    n_queries: int
    success_rate: float
    avg_reward: float


class Deployment(Reply):
    name: str
    status: str
    url: str
    variants: list[dict[str, Any]]
    running_replicas: dict[str, int] = {}
    """variant name -> replicas serving now"""


class Deployments(Reply):
    deployments: list[Deployment]


# ---- the clients ----------------------------------------------------------------------------------

def _params(**kw: Any) -> dict[str, Any]:
    """Arguments left at None are left out, so the server's defaults apply."""
    return {k: v for k, v in kw.items() if v is not None}


def _rpc_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/api/v1/jsonrpc") else url + "/api/v1/jsonrpc"


class _Methods:
    """The typed methods, written once: `_call` is sync in Client and returns an awaitable in AsyncClient."""

    def _call(self, method: str, params: dict[str, Any], result: type[T] | None = None) -> Any:
        raise NotImplementedError

    def call(self, method: str, **params: Any) -> Any:
        """Any method by name, its result as the server sent it."""
        return self._call(method, params)

    # training.*
    def start_grpo(self, agent_id: str, training_data: list[dict[str, str]], *, config: dict[str, Any] | None = None,
                   evaluation_data: list[dict[str, str]] | None = None, priority: int | None = None,
                   idempotency_key: str | None = None) -> StartResult:
        return self._call("training.start_grpo", _params(
            agent_id=agent_id, training_data=training_data, config=config, evaluation_data=evaluation_data,
            priority=priority, idempotency_key=idempotency_key), StartResult)

    def get_status(self, job_id: str) -> JobStatus:
        return self._call("training.get_status", {"job_id": job_id}, JobStatus)

    def cancel(self, job_id: str, *, reason: str | None = None, wait: bool | None = None) -> CancelResult:
        return self._call("training.cancel", _params(job_id=job_id, reason=reason, wait=wait), CancelResult)

    def list_jobs(self, *, agent_id: str | None = None, status: str | None = None, limit: int | None = None,
                  cursor: str | None = None) -> JobPage:
        return self._call("training.list_jobs", _params(agent_id=agent_id, status=status, limit=limit,
                                                          cursor=cursor), JobPage)

    def export_trajectories(self, job_id: str, *, success_only: bool | None = None, min_reward: float | None = None,
                            limit: int | None = None, offset: int | None = None) -> TrajectoryPage:
        return self._call("training.export_trajectories", _params(
            job_id=job_id, success_only=success_only, min_reward=min_reward, limit=limit, offset=offset),
            TrajectoryPage)

    def evaluate(self, job_id: str, *, checkpoint_id: str | None = None,
                 evaluation_queries: list[dict[str, str]] | None = None,
                 max_queries: int | None = None) -> Evaluation:
        return self._call("training.evaluate", _params(job_id=job_id, checkpoint_id=checkpoint_id,
                                                         evaluation_queries=evaluation_queries,
                                                         max_queries=max_queries), Evaluation)

    def pause(self, job_id: str) -> Reply:
        return self._call("training.pause", {"job_id": job_id}, Reply)

    def resume(self, job_id: str) -> Reply:
        return self._call("training.resume", {"job_id": job_id}, Reply)

    # models.* (serving)
    def deploy(self, name: str, *, checkpoint_id: str | None = None, model: str | None = None,
               session_id: str | None = None, variants: list[dict[str, Any]] | None = None, replicas: int | None = None,
               autoscaling: dict[str, Any] | None = None, gpus_per_replica: float | None = None,
               cpus_per_replica: float | None = None, batching: bool | None = None,
               max_batch_size: int | None = None, shared: bool | None = None) -> Deployment:
        return self._call("models.deploy", _params(
            name=name, checkpoint_id=checkpoint_id, model=model, session_id=session_id, variants=variants,
            replicas=replicas,
            autoscaling=autoscaling, gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
            batching=batching, max_batch_size=max_batch_size, shared=shared), Deployment)

    def share(self, name: str, shared: bool = True) -> Reply:
        """Admins: open a deployment to every authenticated user (or close it again with shared=False)."""
        return self._call("models.share", {"name": name, "shared": shared}, Reply)

    def undeploy(self, name: str) -> Reply:
        return self._call("models.undeploy", {"name": name}, Reply)

    def deployments(self, *, name: str | None = None) -> Deployments:
        return self._call("models.deployments", _params(name=name), Deployments)

    # auth.*, audit.*, rpc.discover
    def create_api_key(self, owner: str, *, role: str | None = None, scopes: list[str] | None = None,
                       name: str | None = None, expires_in_days: int | None = None) -> Reply:
        return self._call("auth.create_api_key", _params(owner=owner, role=role, scopes=scopes, name=name,
                                                          expires_in_days=expires_in_days), Reply)

    def list_api_keys(self, *, owner: str | None = None, include_revoked: bool | None = None) -> Reply:
        return self._call("auth.list_api_keys", _params(owner=owner, include_revoked=include_revoked), Reply)

    def revoke_api_key(self, key_id: str) -> Reply:
        return self._call("auth.revoke_api_key", {"key_id": key_id}, Reply)

    def whoami(self) -> Reply:
        return self._call("auth.whoami", {}, Reply)

    def audit_query(self, *, principal: str | None = None, method: str | None = None, target: str | None = None,
                    outcome: str | None = None, since: datetime | None = None, until: datetime | None = None,
                    limit: int | None = None, cursor: int | None = None) -> Reply:
        return self._call("audit.query", _params(
            principal=principal, method=method, target=target, outcome=outcome,
            since=since.isoformat() if since else None, until=until.isoformat() if until else None,
            limit=limit, cursor=cursor), Reply)

    def discover(self) -> dict[str, Any]:
        return self._call("rpc.discover", {})


class _Transport:
    """What both clients share: the URL, the credentials, the request body, the reply and the backoff."""

    def __init__(self, url: str | None = None, *, token: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff_s: float = 0.5):
        self.url = _rpc_url(url or os.environ.get("RAYGRPO_URL") or "http://127.0.0.1:8001")
        self.base_url = self.url.removesuffix("/api/v1/jsonrpc")
        token = token or os.environ.get("RAYGRPO_TOKEN")
        api_key = api_key or os.environ.get("RAYGRPO_API_KEY")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        if api_key:
            self.headers["X-API-Key"] = api_key
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self._ids = 0

    def __repr__(self) -> str:
        auth = "token" if "Authorization" in self.headers else "api key" if "X-API-Key" in self.headers else "none"
        return f"{type(self).__name__}({self.base_url!r}, auth={auth})"

    def policy_url(self, name: str) -> str:
        """The OpenAI base URL of a deployed policy: `openai.OpenAI(base_url=c.policy_url(name),
        api_key=c.policy_key)`."""
        return f"{self.base_url}/policies/{name}/v1"

    @property
    def policy_key(self) -> str | None:
        """What an OpenAI client sends as its `api_key` to a deployed policy: this client's own token or API key
        (policies answer to the job API's credentials)."""
        bearer = self.headers.get("Authorization", "")
        return bearer.removeprefix("Bearer ") if bearer else self.headers.get("X-API-Key")

    def _body(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The request, sent unchanged on every attempt: a keyed method gets its key here, once."""
        self._ids += 1
        if method in KEYED and not params.get("idempotency_key"):
            params = {**params, "idempotency_key": f"sdk-{uuid.uuid4().hex}"}
        return {"jsonrpc": "2.0", "method": method, "params": params, "id": self._ids}

    def _retryable(self, method: str, exc: Exception | None, status: int | None) -> bool:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            return True  # the request never left
        if method in MUTATING and method not in KEYED:
            return status == 503  # the proxy had no replica to give it to; a 502/504 may have run it
        return status in (502, 503, 504) or isinstance(exc, httpx.TransportError)

    def _delay(self, attempt: int) -> float:
        return self.backoff_s * 2**attempt * (0.5 + random.random())

    def _result(self, method: str, response: httpx.Response, result: type[T] | None) -> Any:
        try:
            body = response.json()
        except ValueError:
            raise TransportError(f"HTTP {response.status_code}: not a JSON-RPC reply: {response.text[:200]}",
                                 method=method, status=response.status_code) from None
        if not isinstance(body, dict) or ("result" not in body and "error" not in body):
            raise TransportError(f"HTTP {response.status_code}: not a JSON-RPC reply", method=method,
                                 status=response.status_code)
        if "error" in body:
            raise error_from(body["error"], method, response.status_code)
        value = body["result"]
        return result.model_validate(value) if result is not None and issubclass(result, BaseModel) else value


class Client(_Transport, _Methods):
    """Synchronous client; also a context manager. Safe to use from a notebook cell."""

    def __init__(self, url: str | None = None, **kw: Any):
        super().__init__(url, **kw)
        self.http = httpx.Client(timeout=self.timeout, headers=self.headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, params: dict[str, Any], result: type[T] | None = None) -> Any:
        body = self._body(method, params)
        for attempt in range(self.retries + 1):
            exc, response = None, None
            try:
                response = self.http.post(self.url, json=body)
            except httpx.TransportError as e:
                exc = e
            status = response.status_code if response is not None else None
            if attempt < self.retries and self._retryable(method, exc, status):
                time.sleep(self._delay(attempt))
                continue
            if exc is not None:
                raise TransportError(f"{type(exc).__name__}: {exc} ({self.url})", method=method) from exc
            return self._result(method, response, result)
        raise AssertionError("unreachable")

    def wait(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
             on_status: Callable[[JobStatus], Any] | None = None) -> JobStatus:
        """Poll a job until it is completed, failed or cancelled; `on_status` sees every poll."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.get_status(job_id)
            if on_status is not None:
                on_status(status)
            if status.done:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.status} after {timeout_s}s")
            time.sleep(poll_s)


    # sessions.*: your own training loop on the cluster
    def create_session(self, *, base_model: str | None = None, num_workers: int | None = None,
                       lora_rank: int | None = None, idle_timeout_s: float | None = None,
                       max_budget_usd: str | float | None = None, wait_s: float = 600.0, poll_s: float = 0.5,
                       **options: Any) -> TrainingSession:
        """Start a training session and wait until it is active (its workers and sampler loaded)."""
        reply = self._call("sessions.create", _params(
            base_model=base_model, num_workers=num_workers, lora_rank=lora_rank, idle_timeout_s=idle_timeout_s,
            max_budget_usd=None if max_budget_usd is None else str(max_budget_usd), **options))
        session = TrainingSession(self, reply["session_id"])
        deadline = time.monotonic() + wait_s
        while (info := session.info())["status"] in ("starting", "waiting"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"session {session.id} still {info['status']} after {wait_s}s: {info.get('error')}")
            time.sleep(poll_s)
        if info["status"] != "active":
            raise RaygrpoError(f"session {session.id} is {info['status']}: {info.get('error')}", method="sessions.create")
        return session

    def session(self, session_id: str) -> TrainingSession:
        """An existing session of yours (for example after `save_state` in another process)."""
        return TrainingSession(self, session_id)


class TrainingSession:
    """A training session: the primitives return futures, so a loop can send the next call before the last
    one answered. Training calls (forward_backward, optim_step, save_state, load_state, save_weights) are
    numbered here and run on the server in that order; `sample` runs on the weights of every training call
    sent before it.

        s = client.create_session(base_model="Qwen/Qwen2.5-0.5B", lora_rank=16)
        out = s.sample(["2 + 2 ="], num_samples=8, max_tokens=16).result()
        s.forward_backward(rows, "ppo")
        s.optim_step(learning_rate=1e-5).result()
    """

    def __init__(self, client: Client, session_id: str, *, max_in_flight: int = 8):
        self.client, self.id = client, session_id
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix=f"session-{session_id[-6:]}")
        self._lock = threading.Lock()
        self._seq = 0

    def __repr__(self) -> str:
        return f"TrainingSession({self.id!r})"

    def __enter__(self) -> TrainingSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _submit(self, method: str, params: dict[str, Any], *, ordered: bool) -> Future:
        with self._lock:  # numbered and handed to the pool together: seq order is submission order
            if ordered:
                self._seq += 1
                params = {**params, "seq": self._seq}
            elif self._seq:
                params = {**params, "after_seq": self._seq}
            return self._pool.submit(self.client._call, method, {"session_id": self.id, **params})

    def forward_backward(self, data: list[dict[str, Any]], loss_fn: str,
                         loss_config: dict[str, Any] | None = None) -> Future:
        """Future of {logprobs: [[...] per row], metrics: {loss, clip_fraction, ...}}."""
        return self._submit("sessions.forward_backward", _params(data=data, loss_fn=loss_fn, loss_config=loss_config),
                            ordered=True)

    def optim_step(self, **adam: Any) -> Future:
        """Future of {step, metrics}; `adam`: learning_rate, beta1, beta2, eps, weight_decay, max_grad_norm."""
        return self._submit("sessions.optim_step", {"adam": adam}, ordered=True)

    def sample(self, prompts: list[str] | None = None, *, prompt_tokens: list[list[int]] | None = None,
               num_samples: int = 1, max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None) -> Future:
        """Future of {samples: [{prompt_index, prompt_tokens, tokens, logprobs, text, finish_reason}], ...}."""
        return self._submit("sessions.sample", _params(
            prompts=prompts, prompt_tokens=prompt_tokens, num_samples=num_samples, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, seed=seed), ordered=False)

    def save_state(self, name: str) -> Future:
        return self._submit("sessions.save_state", {"name": name}, ordered=True)

    def load_state(self, state_id: str) -> Future:
        return self._submit("sessions.load_state", {"state_id": state_id}, ordered=True)

    def save_weights(self, name: str) -> Future:
        return self._submit("sessions.save_weights", {"name": name}, ordered=True)

    def info(self) -> dict[str, Any]:
        return self.client._call("sessions.get", {"session_id": self.id})

    def close(self) -> dict[str, Any]:
        self._pool.shutdown(wait=True)
        return self.client._call("sessions.close", {"session_id": self.id})


class AsyncClient(_Transport, _Methods):
    """The asyncio client: the same methods as `Client`, each returning an awaitable."""

    def __init__(self, url: str | None = None, **kw: Any):
        super().__init__(url, **kw)
        self.http = httpx.AsyncClient(timeout=self.timeout, headers=self.headers)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _call(self, method: str, params: dict[str, Any], result: type[T] | None = None) -> Any:
        body = self._body(method, params)
        for attempt in range(self.retries + 1):
            exc, response = None, None
            try:
                response = await self.http.post(self.url, json=body)
            except httpx.TransportError as e:
                exc = e
            status = response.status_code if response is not None else None
            if attempt < self.retries and self._retryable(method, exc, status):
                await asyncio.sleep(self._delay(attempt))
                continue
            if exc is not None:
                raise TransportError(f"{type(exc).__name__}: {exc} ({self.url})", method=method) from exc
            return self._result(method, response, result)
        raise AssertionError("unreachable")

    async def wait(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
                   on_status: Callable[[JobStatus], Any] | None = None) -> JobStatus:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = await self.get_status(job_id)
            if on_status is not None:
                on_status(status)
            if status.done:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.status} after {timeout_s}s")
            await asyncio.sleep(poll_s)
