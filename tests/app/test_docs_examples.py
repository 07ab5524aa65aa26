"""docs/api.md stays true: every documented request is sent to a fresh app and must get a reply of the
documented shape.

The page marks its examples: `<!-- request [state=S] [raw] [as=ROLE|none] -->` before a ```json
request block, `<!-- reply [status=N] -->` before the ```json reply block that follows it (no block
for `status=204`), `<!-- get PATH -->` for a GET endpoint. Requests go with an admin's token, or
with a token of ROLE, or with none (`as=none`). Requests run in page order against one app
(SQLite, no Redis, no Ray). Job ids the page shows are mapped onto the jobs this test creates: a
documented `training.start_grpo` reply maps its id; any other documented job id gets a job of its
own on first use. `state=running|paused|completed` puts the jobs a request names into that state
first, playing the dispatcher and the run (app.data.db, app.jobs.reporter.DBReporter) as test_api.py does.
"Same shape" means: the same error code, or the same result keys (and the same `status`, where the
result has one); for batches, member by member.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from raygrpo_test_services import bearer

from app.data import db
from app.data.tables import JobStatus
from app.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
DOC_MODEL = "/tmp/raygrpo/models/tiny-llama"  # the model directory the page's examples ran with
MARK = re.compile(r"<!--\s*(request|reply|get)\b([^>]*?)-->[ \t]*\n(?:\s*```json\n(.*?)\n```)?", re.S)
JOB_ID = re.compile(r"\bjob_[0-9a-f]{32}\b")
REGISTRY_ID = re.compile(r"(?:exp|run|mdl|ds|tpl|eval|key)_[0-9a-f]{32}")
CURL = re.compile(r"curl -s (?:-i )?http://\S+/api/v1/jsonrpc(?: -H \"[^\"]*\")* -d '(.*)'")
ROWS = [{"query": f"digit {d}:", "expected_outcome": str(d)} for d in range(10)]


@dataclass
class Example:
    kind: str  # "request" | "get"
    line: int
    body: str | None  # the request text (None for a GET)
    path: str = ""
    state: str | None = None
    raw: bool = False
    caller: str | None = None
    """`as=ROLE` sends the request with a token of that role, `as=none` without credentials"""
    reply: Any = None
    reply_status: int = 200
    attrs: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"docs/api.md:{self.line} ({self.kind} {self.path or (self.body or '')[:60]!r})"


def parse(text: str) -> list[Example]:
    examples: list[Example] = []
    for m in MARK.finditer(text):
        kind, attrs, block = m.group(1), m.group(2).split(), m.group(3)
        line = text.count("\n", 0, m.start()) + 1
        opts = dict(a.split("=", 1) for a in attrs if "=" in a)
        if kind == "reply":
            assert examples and examples[-1].reply is None and examples[-1].reply_status == 200, \
                f"docs/api.md:{line}: a reply marker without a request before it"
            examples[-1].reply_status = int(opts.get("status", 200))
            if examples[-1].reply_status != 204:
                assert block is not None, f"docs/api.md:{line}: reply marker without a ```json block"
                examples[-1].reply = json.loads(block)
            continue
        if kind == "get":
            examples.append(Example("get", line, None, path=attrs[0]))
            continue
        assert block is not None, f"docs/api.md:{line}: request marker without a ```json block"
        examples.append(Example("request", line, block, state=opts.get("state"), raw="raw" in attrs,
                                caller=opts.get("as")))
    for ex in examples:
        assert ex.reply is not None or ex.reply_status == 204, f"{ex}: no <!-- reply --> after it"
    return examples


EXAMPLES = parse(DOC.read_text())


class Runner:
    """One app, the id map, and the run's side of each job."""

    def __init__(self, client: TestClient, settings: Settings, tmp: Path):
        self.client, self.settings, self.tmp = client, settings, tmp
        self.ids: dict[str, str] = {}

    def rpc(self, body: Any) -> Any:
        r = self.client.post("/api/v1/jsonrpc", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def new_job(self) -> str:
        params = {"agent_id": "docs-agent", "training_data": ROWS,
                  "config": {"reward": "digit", "n_iterations": 50, "max_budget_usd": "1"}}
        return self.rpc({"jsonrpc": "2.0", "method": "training.start_grpo", "params": params, "id": 0})["result"][
            "job_id"]

    def status(self, job_id: str) -> str:
        with db.session_scope(self.client.app.state.ctx.engine) as s:
            return db.get_job(s, job_id=job_id).status

    def reporter(self, job_id: str):
        from app.jobs.reporter import DBReporter
        from grpo.config import GRPOConfig

        return DBReporter(cfg=GRPOConfig(model=self.settings.default_model), job_id=job_id,
                          db_url=self.settings.db_url)

    def checkpoint(self, job_id: str, step: int) -> str:
        import torch

        path = self.tmp / job_id / f"checkpoint_{step}"
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"step": step}, path / "trainer_state.pt")
        return str(path)

    def put_in_state(self, job_id: str, state: str) -> None:
        """Play the dispatcher and the run until the job is in `state` (nothing if it already is)."""
        assert state in ("running", "paused", "completed"), f"unknown state {state!r} in docs/api.md"
        current = self.status(job_id)
        if current == state:
            return
        if current == JobStatus.queued:
            with db.session_scope(self.client.app.state.ctx.engine) as s:
                assert db.mark_running(s, job_id=job_id, ray_submission_id=job_id) is not None
        assert self.status(job_id) == JobStatus.running, f"{job_id} is {self.status(job_id)}, cannot make it {state}"
        rep = self.reporter(job_id)
        rep.on_trajectories([
            {"step": 1, "prompt": "digit 3:", "completion": "333333", "expected": "3", "reward": 1.0,
             "advantage": 0.5, "finish_reason": "length", "tokens": 6},
            {"step": 1, "prompt": "digit 3:", "completion": "3338", "expected": "3", "reward": 0.5,
             "advantage": -0.5, "finish_reason": "stop", "tokens": 4},
        ])
        rep.on_step({"step": 1, "loss": 0.1, "reward_mean": 0.75, "reward_std": 0.25, "kl": 0.0, "cost_usd": 0.001})
        if state == "running":
            return
        ckpt = self.checkpoint(job_id, 1)
        summary = {"checkpoint": ckpt, "best_checkpoints": [ckpt], "last_metrics": {"step": 1}, "cost_usd": 0.001}
        rep.on_end(state, error=None, summary=summary)
        assert self.status(job_id) == state

    def learn_ids(self, documented: Any, actual: Any) -> None:
        """Map the registry ids a documented reply shows (experiments, runs, ...) onto the ones this run got,
        walking both replies in step, so later requests naming them reach the same objects."""
        if isinstance(documented, str) and isinstance(actual, str):
            if REGISTRY_ID.fullmatch(documented) and REGISTRY_ID.fullmatch(actual):
                self.ids.setdefault(documented, actual)
        elif isinstance(documented, dict) and isinstance(actual, dict):
            for key in documented.keys() & actual.keys():
                self.learn_ids(documented[key], actual[key])
        elif isinstance(documented, list) and isinstance(actual, list):
            for d, a in zip(documented, actual, strict=False):
                self.learn_ids(d, a)

    def resolve(self, text: str, not_found: set[str]) -> str:
        """Give every documented job id a real job (except those the page shows as not found)."""
        for doc_id in dict.fromkeys(JOB_ID.findall(text)):
            if doc_id not in self.ids and doc_id not in not_found:
                self.ids[doc_id] = self.new_job()
        for doc_id, real in self.ids.items():
            text = text.replace(doc_id, real)
        return text.replace(DOC_MODEL, self.settings.default_model)


def members(reply: Any) -> list[dict]:
    return reply if isinstance(reply, list) else [reply]


def not_found_ids(request: Any, reply: Any) -> set[str]:
    """Ids of requests the page documents as answered -32001: they must stay unknown."""
    by_id = {r.get("id"): r for r in members(reply) if isinstance(r, dict)}
    out: set[str] = set()
    for req in members(request):
        rep = by_id.get(req.get("id")) if isinstance(req, dict) else None
        if rep is not None and rep.get("error", {}).get("code") == -32001:
            out |= set(JOB_ID.findall(json.dumps(req)))
    return out


def shape_problems(ex: Example, actual: Any, documented: Any) -> list[str]:
    if isinstance(documented, list):
        if not isinstance(actual, list) or len(actual) != len(documented):
            return [f"{ex}: documented a batch reply of {len(documented)}, got {actual!r:.300}"]
        return [p for a, d in zip(actual, documented, strict=True) for p in shape_problems(ex, a, d)]
    if actual.get("id") != documented.get("id"):
        return [f"{ex}: reply id {actual.get('id')!r}, documented {documented.get('id')!r}"]
    if "error" in documented:
        got = actual.get("error", {}).get("code")
        if got != documented["error"]["code"]:
            return [f"{ex}: documented error {documented['error']['code']}, got {actual!r:.400}"]
        return []
    if "result" not in actual:
        return [f"{ex}: documented a result, got {actual!r:.400}"]
    want, got = documented["result"], actual["result"]
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{ex}: result keys {sorted(got) if isinstance(got, dict) else got!r}, documented {sorted(want)}"]
        if "status" in want and got["status"] != want["status"]:
            return [f"{ex}: status {got['status']!r}, documented {want['status']!r}"]
    elif type(got) is not type(want):
        return [f"{ex}: result {got!r:.200}, documented {want!r:.200}"]
    return []


@pytest.fixture
def runner(tmp_path, tiny_model_dir):
    from app.api.main import create_app

    settings = Settings(home=tmp_path / "home", database_url=None, redis_url=None, default_model=tiny_model_dir,
                        cancel_wait_s=0.5, rate_limits={"default": 0})
    app = create_app(settings)
    with TestClient(app, headers=bearer(settings)) as client:
        yield Runner(client, settings, tmp_path / "checkpoints")
    db.dispose_engine(settings.db_url)


def test_the_page_has_examples_of_every_method():
    from app.api.context import registry

    requested = set()
    for ex in EXAMPLES:
        if ex.kind == "request" and not ex.raw:
            requested |= {m.get("method") for m in members(json.loads(ex.body)) if isinstance(m, dict)}
    documented = set(re.findall(r"^### (\S+)$", DOC.read_text(), re.M))
    names = {m["name"] for m in registry.describe()}
    assert names <= requested, f"methods without a request example: {sorted(names - requested)}"
    assert names <= documented, f"methods without a section: {sorted(names - documented)}"


def test_every_curl_sends_the_request_shown_below_it():
    text = DOC.read_text()
    payloads = CURL.findall(text)
    bodies = [ex.body for ex in EXAMPLES if ex.kind == "request"]
    assert len(payloads) == len(bodies)
    for payload, body in zip(payloads, bodies, strict=True):
        try:
            assert json.loads(payload) == json.loads(body), payload
        except json.JSONDecodeError:  # a request documented as malformed: the same text
            assert payload == body


def test_every_documented_request_gets_the_documented_reply(runner):
    problems: list[str] = []
    for ex in EXAMPLES:
        if ex.kind == "get":
            r = runner.client.get(ex.path)
            if r.status_code != 200:
                problems.append(f"{ex}: HTTP {r.status_code}")
            elif isinstance(ex.reply, list):
                got = [m.get("name") for m in r.json()]
                if got != [m["name"] for m in ex.reply]:
                    problems.append(f"{ex}: {got}, documented {[m['name'] for m in ex.reply]}")
            elif set(r.json()) != set(ex.reply) or r.json().get("status") != ex.reply.get("status"):
                problems.append(f"{ex}: {r.json()}, documented {ex.reply}")
            continue
        request = None if ex.raw else json.loads(ex.body)
        body = runner.resolve(ex.body, not_found_ids(request, ex.reply) if request is not None else set())
        if ex.state:
            for job_id in dict.fromkeys(JOB_ID.findall(body)):
                runner.put_in_state(job_id, ex.state)
        headers = {}
        if ex.caller == "none":
            headers = {"Authorization": ""}
        elif ex.caller:
            headers = bearer(runner.settings, f"docs-{ex.caller}", ex.caller)
        r = runner.client.post("/api/v1/jsonrpc", content=body.encode(), headers=headers)
        if ex.reply_status == 204:
            if r.status_code != 204 or r.content:
                problems.append(f"{ex}: documented 204 with no body, got {r.status_code} {r.text[:200]}")
            continue
        if r.status_code != ex.reply_status:
            problems.append(f"{ex}: HTTP {r.status_code} {r.text[:200]}, documented {ex.reply_status}")
            continue
        actual = r.json()
        problems += shape_problems(ex, actual, ex.reply)
        runner.learn_ids(ex.reply, actual)
        # A documented start maps the job id the page shows onto the job it created here.
        for req, doc_reply in zip(members(request), members(ex.reply), strict=False):
            if isinstance(req, dict) and req.get("method") == "training.start_grpo" and "result" in doc_reply:
                doc_id = doc_reply["result"]["job_id"]
                real = next(a for a in members(actual) if a.get("id") == req.get("id"))["result"]["job_id"]
                assert runner.ids.setdefault(doc_id, real) == real, f"{ex}: expected the same job again"
    assert not problems, "docs/api.md is out of date:\n" + "\n".join(problems)
