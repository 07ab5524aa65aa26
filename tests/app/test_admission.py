"""Admission by resources: the Dispatcher starts the next job only when the cluster can hold all of it.

The issue's deadlock: 8 logical CPUs, README-shaped jobs of 5 CPUs (2 policy workers and 2 rollout
actors at 1 CPU, 2 reward actors at 0.5), two admitted by count; each run got its actors and both
Train worker groups waited for CPUs forever. Here the Dispatcher runs on a fresh database per test
(SQLite; PostgreSQL under `services`), with the database or Redis as the queue, a fake Ray Jobs
client and a fake cluster: no Ray.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from raygrpo_test_services import DEFAULT_REDIS_URL, unavailable

from app.data import db
from app.data.tables import JobStatus
from app.jobs.dispatcher import ClusterResources, Dispatcher, admit, job_demand, stored_config
from app.jobs.training import status_of
from app.settings import Settings

README_JOB = {"num_policy_workers": 2, "num_rollout_workers": 2, "num_reward_workers": 2,
              "cpus_per_worker": 1.0, "cpus_per_reward_worker": 0.5}
"""5 CPUs: (2 + 2) x 1 + 2 x 0.5"""

BASE = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


class FakeJobs:
    """The Ray Jobs API as the Dispatcher uses it: submitted runs are RUNNING until a test ends them."""

    def __init__(self):
        self.status: dict[str, str] = {}

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        self.status[submission_id] = "RUNNING"
        return submission_id

    def get_job_status(self, sid):
        if sid not in self.status:
            raise RuntimeError(f"Job {sid} does not exist")
        return self.status[sid]

    def get_job_logs(self, sid):
        return self.logs.get(sid, "")

    logs: dict[str, str] = {}


class FakeCluster:
    """What `ray_cluster_resources` answers; tests change it between rounds."""

    def __init__(self, **capacity: float):
        self.capacity, self.in_use = dict(capacity), {}
        self.asked = 0

    def __call__(self) -> ClusterResources:
        self.asked += 1
        return ClusterResources(capacity=dict(self.capacity), in_use=dict(self.in_use))


@pytest.fixture(params=["db-queue", pytest.param("redis", marks=pytest.mark.services)])
def queue_url(request) -> str | None:
    """None: the database is the queue; else the real Redis (skip without it, fail under CI)."""
    if request.param == "db-queue":
        return None
    import redis

    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        unavailable("Redis", e)
    return url


@pytest.fixture
def make_dispatcher(request, tmp_path, db_url, queue_url):
    # SQLite: the Dispatcher creates the embedded file itself, as in production; PostgreSQL: the tables
    # come from the `engine` fixture (production runs Alembic there).
    if not db_url.startswith("sqlite"):
        request.getfixturevalue("engine")
    made = []

    def make(cluster: FakeCluster, **settings) -> Dispatcher:
        s = Settings(home=tmp_path / "home", database_url=db_url, redis_url=queue_url, **settings)
        d = Dispatcher(s, jobs_client=FakeJobs(), capacity=cluster)
        if d.queue is not None:  # the Redis server is shared: keys of this test alone
            from app.data.queue import RedisQueue

            d.queue = RedisQueue(queue_url, prefix=f"t-{uuid.uuid4().hex}:")
        made.append(d)
        return d

    yield make
    for d in made:
        if d.queue is not None:
            q = d.queue
            q.redis.delete(q.queue_key, q.processing_key, q.priority_key, q.seq_key, q.next_seq_key)


def add_job(d: Dispatcher, n: int, *, priority: int = 0, **engine) -> str:
    """A queued job, the n-th by age, with this engine config (defaults for what it leaves out)."""
    with db.session_scope(d.engine) as s:
        job, _ = db.create_job(s, agent_id="agent", owner=None, config={},
                               engine_config={"output_dir": str(d.settings.runs_dir / f"job{n}"), **engine},
                               total_iterations=5, budget_usd=Decimal("1"), priority=priority,
                               idempotency_key=None, training_rows=1, evaluation_rows=0)
        job.created_at = BASE + timedelta(seconds=n)
        s.add(job)
        job_id = job.id
    if d.queue is not None:
        d.queue.push(job_id, priority=priority)
    return job_id


def view(d: Dispatcher, job_id: str) -> dict:
    """What training.get_status replies for the job."""
    with db.session_scope(d.engine) as s:
        return status_of(db.get_job(s, job_id=job_id), None)


def finish(d: Dispatcher, job_id: str) -> None:
    """Play the run: it reports completion and its Ray Job succeeds."""
    with db.session_scope(d.engine) as s:
        sid = db.get_job(s, job_id=job_id).ray_submission_id
        db.finish_job(s, job_id=job_id, status=JobStatus.completed)
    d.client.status[sid] = "SUCCEEDED"


# ---- the pure parts -----------------------------------------------------------------------------

def test_demand_is_what_the_run_reserves():
    assert job_demand(stored_config(README_JOB)) == {"CPU": 5.0, "GPU": 0.0}
    assert job_demand(stored_config({})) == {"CPU": 2.5, "GPU": 0.0}  # engine defaults: 1 + 1 + 0.5
    gpu = stored_config({"num_policy_workers": 2, "num_rollout_workers": 2, "gpus_per_worker": 0.5})
    assert job_demand(gpu) == {"CPU": 4.5, "GPU": 2.0}


def test_admit_counts_running_jobs_whole_and_other_work():
    cluster = ClusterResources(capacity={"CPU": 8.0})
    five = {"CPU": 5.0, "GPU": 0.0}
    assert admit(five, cluster=cluster, running=[], max_running=2).decision == "started"
    # A run still starting holds little, but is counted whole: that is what prevents the deadlock.
    starting = ClusterResources(capacity={"CPU": 8.0}, in_use={"CPU": 1.0})
    waiting = admit(five, cluster=starting, running=[five], max_running=2)
    assert waiting.decision == "waiting"
    assert waiting.reason == ("waiting for resources: needs 5 CPU, free 3 CPU of 8 "
                              "(5 CPU reserved by 1 running job)")
    # Serve replicas and other Ray jobs take from the same CPUs.
    busy = ClusterResources(capacity={"CPU": 8.0}, in_use={"CPU": 3.5})
    verdict = admit(five, cluster=busy, running=[{"CPU": 2.5}], max_running=2)
    assert verdict.reason == ("waiting for resources: needs 5 CPU, free 4.5 CPU of 8 "
                              "(2.5 CPU reserved by 1 running job, 1 CPU in use by other work)")
    assert admit({"CPU": 4.5}, cluster=busy, running=[{"CPU": 3.5}], max_running=2).decision == "started"


def test_admit_refuses_what_can_never_fit_and_keeps_the_count_bound():
    cluster = ClusterResources(capacity={"CPU": 8.0})
    refused = admit({"CPU": 12.0, "GPU": 0.0}, cluster=cluster, running=[], max_running=2)
    assert refused.decision == "refused"
    assert refused.reason == "cannot fit this cluster: needs 12 CPU, the cluster has at most 8 CPU"
    gpu = admit({"CPU": 2.0, "GPU": 1.0}, cluster=cluster, running=[], max_running=2)
    assert gpu.decision == "refused" and "needs 1 GPU, the cluster has at most 0 GPU" in gpu.reason
    slot = admit({"CPU": 1.0}, cluster=cluster, running=[{"CPU": 1.0}], max_running=1)
    assert slot.decision == "waiting" and "RAYGRPO_MAX_RUNNING_JOBS" in slot.reason


# ---- the Dispatcher -----------------------------------------------------------------------------

def test_three_readme_jobs_on_eight_cpus_run_one_at_a_time(make_dispatcher):
    d = make_dispatcher(FakeCluster(CPU=8.0), max_running_jobs=2)
    first, second, third = (add_job(d, n, **README_JOB) for n in range(3))

    assert d.tick()["started"] == [first]
    assert view(d, first)["status"] == "running"
    assert view(d, first)["admission"]["decision"] == "started"
    status = view(d, second)
    assert status["status"] == "queued"
    assert status["admission"]["decision"] == "waiting"
    assert status["admission"]["reason"] == ("waiting for resources: needs 5 CPU, free 3 CPU of 8 "
                                             "(5 CPU reserved by 1 running job)")
    assert status["admission"]["demand"] == {"CPU": 5.0, "GPU": 0.0}
    assert view(d, third)["status"] == "queued" and view(d, third)["admission"] is None  # behind the next one

    assert d.tick()["started"] == []  # nothing changed: still one at a time
    finish(d, first)
    assert d.tick()["started"] == [second]
    assert view(d, second)["status"] == "running" and view(d, second)["admission"]["decision"] == "started"
    assert view(d, third)["admission"]["decision"] == "waiting"
    finish(d, second)
    assert d.tick()["started"] == [third]


def test_two_jobs_that_fit_together_start_in_one_round(make_dispatcher):
    d = make_dispatcher(FakeCluster(CPU=10.0), max_running_jobs=2)
    jobs = [add_job(d, n, **README_JOB) for n in range(3)]
    assert d.tick()["started"] == jobs[:2]
    assert "RAYGRPO_MAX_RUNNING_JOBS" in view(d, jobs[2])["admission"]["reason"]  # the count still bounds


def test_a_job_that_can_never_fit_fails_naming_the_missing_cpus(make_dispatcher):
    d = make_dispatcher(FakeCluster(CPU=8.0))
    big = add_job(d, 0, **{**README_JOB, "num_policy_workers": 4, "num_rollout_workers": 4, "num_reward_workers": 8})
    after = add_job(d, 1, **README_JOB)

    result = d.tick()
    assert result["refused"] == [big] and result["started"] == [after]  # the next job is not held up
    status = view(d, big)
    assert status["status"] == "failed"
    assert status["error_message"] == (
        "cannot fit this cluster: needs 12 CPU, the cluster has at most 8 CPU (CPU = (num_policy_workers 4 + "
        "num_rollout_workers 4) x cpus_per_worker 1 + num_reward_workers 8 x cpus_per_reward_worker 0.5)")
    assert status["admission"]["decision"] == "refused"
    assert not d.client.status.get(big)  # never submitted
    if d.queue is not None:
        assert big not in d.queue.queued() + d.queue.processing()


def test_gpu_demands_count_too(make_dispatcher):
    cluster = FakeCluster(CPU=32.0, GPU=2.0)
    d = make_dispatcher(cluster, max_running_jobs=4)
    two_gpus = {"num_policy_workers": 2, "num_rollout_workers": 2, "gpus_per_worker": 0.5}
    one_gpu = {"num_policy_workers": 1, "num_rollout_workers": 1, "gpus_per_worker": 0.5}
    first, second = add_job(d, 0, **two_gpus), add_job(d, 1, **one_gpu)

    assert d.tick()["started"] == [first]
    assert view(d, second)["admission"]["reason"] == ("waiting for resources: needs 1 GPU, free 0 GPU of 2 "
                                                      "(2 GPU reserved by 1 running job)")
    too_many = add_job(d, 2, num_policy_workers=4, num_rollout_workers=4, gpus_per_worker=1.0)
    finish(d, first)
    result = d.tick()
    assert result["started"] == [second] and result["refused"] == [too_many]
    assert "needs 8 GPU, the cluster has at most 2 GPU" in view(d, too_many)["error_message"]
    assert "gpus_per_worker 1" in view(d, too_many)["error_message"]


def test_a_waiting_head_holds_back_smaller_jobs_behind_it(make_dispatcher):
    d = make_dispatcher(FakeCluster(CPU=8.0), max_running_jobs=3)
    running = add_job(d, 0, **README_JOB)
    assert d.tick()["started"] == [running]
    big = add_job(d, 1, **README_JOB)  # 5 CPUs: does not fit the 3 left
    small = add_job(d, 2)  # 2.5 CPUs would fit, but starting it could keep `big` waiting forever
    assert d.tick()["started"] == []
    assert view(d, big)["admission"]["decision"] == "waiting"
    assert view(d, small)["status"] == "queued"
    finish(d, running)
    assert d.tick()["started"] == [big, small]  # 5 + 2.5 of 8


def test_priority_then_age_decides_which_job_is_next(make_dispatcher):
    d = make_dispatcher(FakeCluster(CPU=5.0))
    old = add_job(d, 0, **README_JOB)
    urgent = add_job(d, 1, priority=5, **README_JOB)
    assert d.tick()["started"] == [urgent]
    assert view(d, old)["admission"]["decision"] == "waiting"


def test_other_work_on_the_cluster_is_left_its_resources(make_dispatcher):
    cluster = FakeCluster(CPU=8.0)
    cluster.in_use = {"CPU": 4.0}  # a PolicyServer replica or another Ray job
    d = make_dispatcher(cluster)
    job = add_job(d, 0, **README_JOB)
    assert d.tick()["started"] == []
    assert "4 CPU in use by other work" in view(d, job)["admission"]["reason"]
    cluster.in_use = {}
    assert d.tick()["started"] == [job]


def test_the_wait_reason_is_written_only_when_it_changes(make_dispatcher):
    d = make_dispatcher(FakeCluster(CPU=8.0))
    add_job(d, 0, **README_JOB)
    waiting = add_job(d, 1, **README_JOB)
    d.tick()
    decided = view(d, waiting)["admission"]["decided_at"]
    d.tick()
    assert view(d, waiting)["admission"]["decided_at"] == decided


def test_a_cancelled_job_is_never_started(make_dispatcher):
    d = make_dispatcher(FakeCluster(CPU=8.0))
    job = add_job(d, 0, **README_JOB)
    with db.session_scope(d.engine) as s:
        db.request_cancel(s, job_id=job, reason="changed my mind")  # the queue entry stays (a stale id)
    assert d.tick() == {"finalised": [], "acked": [], "pushed": [], "started": [], "refused": []}
    assert view(d, job)["status"] == "cancelled"
    if d.queue is not None:
        assert d.queue.queued() == []


def test_no_password_reaches_the_ray_job(tmp_path, make_dispatcher, db_url, monkeypatch):
    """The runtime env and entrypoint show in the dashboard and `ray job list`: a database URL with a
    password goes to the driver as a private file, which a driver's Settings read back."""
    from sqlalchemy.engine import make_url

    monkeypatch.delenv("DATABASE_URL_FILE", raising=False)
    secret = "pw-" + uuid.uuid4().hex
    with_password = make_url(db_url).set(password=secret).render_as_string(hide_password=False)
    if db_url.startswith("sqlite"):  # SQLite has no passwords: the URL goes as it is
        with_password = db_url
    d = make_dispatcher(FakeCluster(CPU=8))
    d.settings = Settings(home=d.settings.home, database_url=with_password)
    seen = []
    d.client.submit_job = lambda **kw: seen.append(kw) or kw["submission_id"]
    job = add_job(d, 1, **README_JOB)
    d.tick()
    assert len(seen) == 1, status_of_job(d, job)
    env = seen[0]["runtime_env"]["env_vars"]
    assert secret not in repr(seen)
    if db_url.startswith("sqlite"):
        assert env["DATABASE_URL"] == db_url
        return
    path = env["DATABASE_URL_FILE"]
    assert env["DATABASE_URL"] == ""  # an inherited variable must not win over the file
    assert (os.stat(path).st_mode & 0o777) == 0o600
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("DATABASE_URL_FILE", path)
    assert Settings().db_url == with_password


def status_of_job(d, job_id):
    with db.session_scope(d.engine) as s:
        return db.get_job(s, job_id=job_id)


def test_a_failed_runs_message_is_its_cause_first_not_a_log_tail():
    from app.jobs.dispatcher import failure_cause

    log = ("2026-12-01 INFO starting\n" + "x" * 5000 + "\nTraceback (most recent call last):\n"
           '  File "grpo/run.py", line 1, in <module>\n    raise OSError("no file")\n'
           "ray.exceptions.RayTaskError(OSError): ray::RolloutWorker.__init__() failed\n"
           "OSError: /models/x does not appear to have a file named config.json\n")
    assert failure_cause(log) == "OSError: /models/x does not appear to have a file named config.json"
    assert failure_cause("error: invalid config: model: required\n") == "error: invalid config: model: required"
    assert failure_cause("just a line\n\n") == "just a line" and failure_cause("") == "the run left no log"


def test_a_run_whose_driver_died_silently_is_queued_again_a_bounded_number_of_times(make_dispatcher):
    """A Ray Job that ended FAILED without its run reporting and without an error in its log (the driver was
    killed, its node lost) goes back to the queue to resume from its checkpoint, RAYGRPO_DRIVER_RESTARTS times;
    one whose log names its error fails at once with it."""
    cluster = FakeCluster(CPU=8)
    d = make_dispatcher(cluster, driver_restarts=2)
    d.client.logs = {}
    job = add_job(d, 1)
    for restart in (1, 2):
        d.launch()
        sid = view_sid(d, job)
        d.client.status[sid] = "FAILED"
        d.client.logs[sid] = "step 3/6 reward 0.2\nstep 4/6 reward 0.3\n"  # killed mid-run: no last word
        d.watch_running()
        with db.session_scope(d.engine) as s:
            row = db.get_job(s, job_id=job)
            assert row.status == JobStatus.queued and row.metrics["driver_restarts"] == restart
    d.launch()
    assert len({view_sid(d, job)}) == 1 and view_sid(d, job).endswith("-a3")  # each attempt its own Ray Job
    d.client.status[view_sid(d, job)] = "FAILED"
    d.watch_running()
    with db.session_scope(d.engine) as s:
        row = db.get_job(s, job_id=job)
        assert row.status == JobStatus.failed and "without reporting" in row.error_message  # the limit

    crashed = add_job(d, 2)
    d.launch()
    d.client.status[view_sid(d, crashed)] = "FAILED"
    d.client.logs[view_sid(d, crashed)] = "Traceback (most recent call last):\nValueError: bad rows\n"
    d.watch_running()
    with db.session_scope(d.engine) as s:
        row = db.get_job(s, job_id=crashed)
        assert row.status == JobStatus.failed and row.error_message.startswith("ValueError: bad rows")


def view_sid(d: Dispatcher, job_id: str) -> str:
    with db.session_scope(d.engine) as s:
        return db.get_job(s, job_id=job_id).ray_submission_id


class FlakyJobs(FakeJobs):
    """The Jobs API of a head whose dashboard agent is still starting: `failures` submissions answer 500."""

    def __init__(self, failures: int, error: str = "Request failed with status code 500: No available agent to "
                                                  "submit job, please try again later."):
        super().__init__()
        self.failures, self.error, self.tries = failures, error, 0

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        self.tries += 1
        if self.tries <= self.failures:
            raise RuntimeError(self.error)
        return super().submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                                  metadata=metadata)


def test_a_submission_the_jobs_api_cannot_take_yet_is_tried_again_not_failed(make_dispatcher):
    """Found on a fresh autoscaling head: the first submission got "No available agent ... try again later"
    and the job failed for good. It goes back to the queue, shows why, and starts when the API takes it."""
    d = make_dispatcher(FakeCluster(CPU=8))
    d.client = FlakyJobs(failures=2)
    job = add_job(d, 1, **README_JOB)
    for _ in range(2):
        d.launch()
        shown = view(d, job)
        assert shown["status"] == "queued", shown
        assert shown["admission"]["reason"].startswith("waiting for the Ray Jobs API")
    d.launch()
    shown = view(d, job)
    assert shown["status"] == "running" and d.client.tries == 3
    with db.session_scope(d.engine) as s:
        assert db.get_job(s, job_id=job).attempts == 1  # the failed tries used no restart of the run
    # a refusal that trying again cannot change fails the job at once
    d2 = make_dispatcher(FakeCluster(CPU=16))  # the first job still runs
    d2.client = FlakyJobs(failures=1, error="Request failed with status code 400: bad runtime_env")
    other = add_job(d2, 2, **README_JOB)
    d2.launch()
    assert view(d2, other)["status"] == "failed" and "status code 400" in view(d2, other)["error_message"]


def test_a_queued_job_wakes_the_dispatcher_without_waiting_for_its_poll(make_dispatcher):
    """start_grpo wakes the dispatcher (wake_dispatcher): the job is submitted at once, not up to a poll later.
    The poll here is an hour: only the wake can start the second job within the bound."""
    import time

    d = make_dispatcher(FakeCluster(CPU=10.0), max_running_jobs=2)
    d.poll_s = 3600.0
    first = add_job(d, 0, **README_JOB)
    d.start()  # the first round runs at once and starts the first job
    try:
        deadline = time.monotonic() + 60
        while view(d, first)["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert view(d, first)["status"] == "running"
        second = add_job(d, 1, **README_JOB)
        d.wake()
        while view(d, second)["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert view(d, second)["status"] == "running"
    finally:
        d.stop()
        d._thread.join(timeout=60)
    assert not d._thread.is_alive()  # stop wakes the loop too
