"""app.data.db on SQLite and PostgreSQL: every data-access function, and the invariants concurrent writers
rely on (one job per idempotency key, one claimer per job, the first final state wins)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlmodel import Session

from app.data import db
from app.data.tables import JobStatus, TrainingJob, utcnow


def new_job(session: Session, *, key: str | None = None, priority: int = 0, agent_id: str = "agent-a",
            owner: str | None = "alice", commit: bool = True) -> TrainingJob:
    job, created = db.create_job(
        session, agent_id=agent_id, owner=owner, config={"task": "digit"}, engine_config={"lr": 1e-3},
        total_iterations=10, budget_usd=Decimal("5.00"), priority=priority, idempotency_key=key,
        training_rows=16, evaluation_rows=4,
    )
    assert created
    if commit:
        session.commit()
    return job


def in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(i) in n threads released together; re-raise the first failure."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def target(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # collected and re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_get_engine_is_cached_per_url(db_url):
    assert db.get_engine(db_url) is db.get_engine(db_url)


def test_sqlite_pragmas(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    try:
        with db.get_engine(url).connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    finally:
        db.dispose_engine(url)


def test_session_scope_commits_and_rolls_back(engine):
    with db.session_scope(engine) as s:
        job = new_job(s, commit=False)
    with pytest.raises(RuntimeError), db.session_scope(engine) as s:
        new_job(s, key="lost", commit=False)
        raise RuntimeError("boom")
    with db.session_scope(engine) as s:
        assert db.get_job(s, job_id=job.id) is not None
        assert db.list_jobs(s)[0] == [db.get_job(s, job_id=job.id)]
    assert job.agent_id == "agent-a"  # still readable after the scope closed


def test_create_and_get_job_round_trip(session):
    job = new_job(session)
    session.expunge_all()
    got = db.get_job(session, job_id=job.id)
    assert got is not None and got is not job
    assert (got.status, got.agent_id, got.owner, got.priority) == ("queued", "agent-a", "alice", 0)
    assert got.config == {"task": "digit"} and got.engine_config == {"lr": 1e-3}
    assert (got.training_rows, got.evaluation_rows, got.total_iterations) == (16, 4, 10)
    assert got.budget_usd == Decimal("5.00") and got.cost_usd == Decimal("0")
    assert got.created_at.tzinfo is not None and abs(got.created_at - utcnow()) < timedelta(minutes=1)
    assert db.get_job(session, job_id="job_missing") is None


def test_decimal_money_round_trip(session):
    job = new_job(session)
    db.record_progress(session, job_id=job.id, step=1, metrics={}, cost_usd=Decimal("1.234567"))
    session.commit()
    session.expunge_all()
    got = db.get_job(session, job_id=job.id)
    assert isinstance(got.cost_usd, Decimal) and got.cost_usd == Decimal("1.234567")
    assert isinstance(got.budget_usd, Decimal) and got.budget_usd == Decimal("5")


def test_idempotency_key_sequential(session):
    first = new_job(session, key="k1")
    again, created = db.create_job(
        session, agent_id="other", owner=None, config={}, engine_config={}, total_iterations=1,
        budget_usd=None, priority=5, idempotency_key="k1", training_rows=0, evaluation_rows=0,
    )
    session.commit()
    assert not created and again.id == first.id and again.agent_id == "agent-a"
    new_job(session, key="k2")
    new_job(session)  # no key: always a new job
    new_job(session)
    assert len(db.list_jobs(session, limit=100)[0]) == 4


def test_idempotency_key_under_concurrency(engine):
    def create(i: int) -> tuple[str, bool]:
        with db.session_scope(engine) as s:
            job, created = db.create_job(
                s, agent_id=f"agent-{i}", owner=None, config={}, engine_config={}, total_iterations=1,
                budget_usd=None, priority=0, idempotency_key="same-key", training_rows=0, evaluation_rows=0,
            )
            return job.id, created

    results = in_threads(20, create)
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with db.session_scope(engine) as s:
        assert len(db.list_jobs(s, limit=100)[0]) == 1


def test_claim_next_job_priority_then_age(session):
    old_low = new_job(session, priority=0)
    high = new_job(session, priority=5)
    young_low = new_job(session, priority=0)
    running = new_job(session, priority=9)
    db.mark_running(session, job_id=running.id, ray_submission_id=running.id)
    session.commit()

    order = []
    while (job := db.claim_next_job(session)) is not None:
        session.commit()
        assert job.status == "running" and job.attempts == 1 and job.started_at is not None
        order.append(job.id)
    assert order == [high.id, old_low.id, young_low.id]


def test_claim_next_job_never_double_claims(engine):
    with db.session_scope(engine) as s:
        ids = {new_job(s, priority=i % 3, commit=False).id for i in range(20)}

    def claim_all(_: int) -> list[str]:
        got = []
        while True:
            with db.session_scope(engine) as s:
                job = db.claim_next_job(s)
                if job is None:
                    return got
                got.append(job.id)

    claims = [job_id for got in in_threads(8, claim_all) for job_id in got]
    assert sorted(claims) == sorted(ids)  # every job claimed exactly once
    with db.session_scope(engine) as s:
        jobs = db.jobs_in_states(s, states=["running"])
        assert len(jobs) == 20 and all(j.attempts == 1 for j in jobs)


def test_mark_running_only_from_queued(session):
    job = new_job(session)
    got = db.mark_running(session, job_id=job.id, ray_submission_id="sub-1")
    session.commit()
    assert got.status == "running" and got.ray_submission_id == "sub-1" and got.attempts == 1
    assert db.mark_running(session, job_id=job.id, ray_submission_id="sub-2") is None
    assert db.mark_running(session, job_id="job_missing", ray_submission_id="x") is None
    assert db.get_job(session, job_id=job.id).ray_submission_id == "sub-1"


def test_list_jobs_walks_every_job_once_with_filters(session):
    made = []
    for i in range(23):
        job = new_job(session, agent_id="a" if i % 2 else "b", owner="alice" if i % 3 else "bob")
        made.append(job)
    # same created_at for a few jobs: the id breaks the tie and no job is lost at a page boundary
    for job in made[5:9]:
        job.created_at = made[5].created_at
        session.add(job)
    session.commit()
    db.finish_job(session, job_id=made[0].id, status=JobStatus.failed)
    session.commit()

    def walk(**filters: Any) -> list[str]:
        seen, cursor = [], None
        while True:
            page, cursor = db.list_jobs(session, limit=4, cursor=cursor, **filters)
            assert len(page) <= 4
            seen += [j.id for j in page]
            if cursor is None:
                return seen

    expected = sorted(made, key=lambda j: (j.created_at, j.id), reverse=True)
    assert walk() == [j.id for j in expected]
    assert walk(agent_id="a") == [j.id for j in expected if j.agent_id == "a"]
    assert walk(owner="bob", agent_id="b") == [j.id for j in expected if j.owner == "bob" and j.agent_id == "b"]
    assert walk(status="failed") == [made[0].id]
    assert walk(status=JobStatus.queued) == [j.id for j in expected if j.id != made[0].id]
    assert db.list_jobs(session, agent_id="nobody") == ([], None)
    page, cursor = db.list_jobs(session, limit=23)
    assert len(page) == 23 and cursor is None


@pytest.mark.parametrize("cursor", ["not base64 !!", "bm90IGpzb24", "eyJpZCI6IDF9", "W10"])
def test_list_jobs_bad_cursor(session, cursor):
    with pytest.raises(ValueError, match="^cursor: "):
        db.list_jobs(session, cursor=cursor)


def test_record_progress_keeps_the_highest_step_and_drops_nan(session):
    job = new_job(session)
    got = db.record_progress(
        session, job_id=job.id, step=3,
        metrics={"loss": float("nan"), "kl": float("inf"), "reward_mean": 0.5, "hist": [1.0, -math.inf]},
        cost_usd=Decimal("0.10"),
    )
    session.commit()
    assert got.current_iteration == 3
    db.record_progress(session, job_id=job.id, step=2, metrics={"reward_mean": 0.4}, cost_usd=Decimal("0.2"))
    session.commit()
    session.expunge_all()
    got = db.get_job(session, job_id=job.id)
    assert got.current_iteration == 3  # a late report of an older step does not go back
    assert got.metrics == {"reward_mean": 0.4}  # replaced, not merged
    assert got.cost_usd == Decimal("0.2") and got.updated_at >= got.created_at

    db.record_progress(session, job_id=job.id, step=4, metrics={"loss": float("nan")}, cost_usd=Decimal("0.3"))
    session.commit()
    session.expunge_all()
    assert db.get_job(session, job_id=job.id).metrics == {"loss": None}
    with pytest.raises(db.NotFoundError, match="^job_id: "):
        db.record_progress(session, job_id="job_missing", step=1, metrics={}, cost_usd=Decimal("0"))


def test_nan_inside_nested_metrics_is_stored_as_null(session):
    job = new_job(session)
    db.record_progress(session, job_id=job.id, step=1, metrics={"a": {"b": [float("nan"), 1.0]}},
                       cost_usd=Decimal("0"))
    session.commit()
    session.expunge_all()
    assert db.get_job(session, job_id=job.id).metrics == {"a": {"b": [None, 1.0]}}


def test_finish_job_first_final_state_wins(session):
    job = new_job(session)
    db.mark_running(session, job_id=job.id, ray_submission_id=job.id)
    done = db.finish_job(session, job_id=job.id, status=JobStatus.completed, stop_reason="done")
    session.commit()
    assert done.status == "completed" and done.finished_at is not None and done.cancelled_at is None
    finished_at = done.finished_at

    again = db.finish_job(session, job_id=job.id, status=JobStatus.failed, error_message="late error")
    session.commit()
    assert (again.status, again.error_message, again.finished_at) == ("completed", None, finished_at)

    other = new_job(session)
    failed = db.finish_job(session, job_id=other.id, status=JobStatus.failed, error_message="OOM")
    assert (failed.status, failed.error_message) == ("failed", "OOM")
    cancelled = db.finish_job(session, job_id=new_job(session).id, status=JobStatus.cancelled)
    assert cancelled.cancelled_at is not None and cancelled.finished_at is not None
    with pytest.raises(ValueError, match="^status: "):
        db.finish_job(session, job_id=other.id, status=JobStatus.running)
    with pytest.raises(db.NotFoundError):
        db.finish_job(session, job_id="job_missing", status=JobStatus.failed)


def test_finish_job_concurrent_finishers_agree(engine):
    with db.session_scope(engine) as s:
        job = new_job(s, commit=False)
    statuses = [JobStatus.completed, JobStatus.failed, JobStatus.cancelled] * 3

    def finish(i: int) -> str:
        with db.session_scope(engine) as s:
            return db.finish_job(s, job_id=job.id, status=statuses[i]).status

    seen = in_threads(len(statuses), finish)
    with db.session_scope(engine) as s:
        final = db.get_job(s, job_id=job.id).status
    assert final in {"completed", "failed", "cancelled"}
    assert seen.count(final) >= 1 and all(status.is_final for status in map(JobStatus, seen))


def test_request_cancel_queued_vs_running(session):
    queued = new_job(session)
    got = db.request_cancel(session, job_id=queued.id, reason="user asked")
    session.commit()
    assert got.status == "cancelled" and got.cancel_requested and got.stop_reason == "user asked"
    assert got.cancelled_at is not None and got.finished_at is not None

    running = new_job(session)
    db.mark_running(session, job_id=running.id, ray_submission_id=running.id)
    got = db.request_cancel(session, job_id=running.id, reason=None)
    session.commit()
    assert got.status == "running" and got.cancel_requested and got.stop_reason == "cancelled"
    assert got.cancelled_at is None and got.finished_at is None
    # the run sees the flag, stops, and finishes the job itself
    got = db.finish_job(session, job_id=running.id, status=JobStatus.cancelled)
    assert got.status == "cancelled" and got.cancelled_at is not None

    done = new_job(session)
    db.finish_job(session, job_id=done.id, status=JobStatus.completed)
    got = db.request_cancel(session, job_id=done.id, reason="too late")
    assert got.status == "completed" and not got.cancel_requested and got.stop_reason is None
    with pytest.raises(db.NotFoundError):
        db.request_cancel(session, job_id="job_missing", reason=None)
    with pytest.raises(ValueError, match="^reason: "):
        db.request_cancel(session, job_id=running.id, reason="x" * 65)


def test_set_status_pause_and_resume(session):
    job = new_job(session)
    db.mark_running(session, job_id=job.id, ray_submission_id=job.id)
    paused = db.set_status(session, job_id=job.id, status=JobStatus.paused, only_from=["running"],
                           stop_reason="paused")
    session.commit()
    assert paused.status == "paused" and paused.stop_reason == "paused"
    assert db.set_status(session, job_id=job.id, status="paused", only_from=["running"]) is None
    resumed = db.set_status(session, job_id=job.id, status=JobStatus.queued, only_from=["paused"],
                            stop_reason=None, cancel_requested=False)
    session.commit()
    assert resumed.status == "queued" and resumed.stop_reason is None
    assert db.claim_next_job(session).id == job.id
    assert db.get_job(session, job_id=job.id).attempts == 2
    with pytest.raises(ValueError, match="^nonsense: "):
        db.set_status(session, job_id=job.id, status="queued", nonsense=1)
    assert db.set_status(session, job_id="job_missing", status="queued") is None


def test_jobs_in_states(session):
    a, b, c = new_job(session), new_job(session), new_job(session)
    db.mark_running(session, job_id=b.id, ray_submission_id=b.id)
    db.finish_job(session, job_id=c.id, status=JobStatus.failed)
    session.commit()
    assert [j.id for j in db.jobs_in_states(session, states=["queued", "running"])] == [a.id, b.id]
    assert [j.id for j in db.jobs_in_states(session, states=[JobStatus.failed])] == [c.id]
    assert db.jobs_in_states(session, states=[]) == []


def trajectory_rows(n: int, step: int = 0) -> list[dict[str, Any]]:
    # the keys grpo.trainer.trajectories produces
    return [
        {"step": step + i // 8, "prompt": f"digit {i % 10}:", "completion": str(i % 10) * 6,
         "expected": str(i % 10), "reward": (i % 4) / 3, "advantage": 0.1 * (i % 5) - 0.2,
         "finish_reason": "length", "tokens": 6, "policy_version": step}
        for i in range(n)
    ]


def test_add_trajectories_bulk_and_export(session):
    job = new_job(session)
    rows = trajectory_rows(3000)
    assert db.add_trajectories(session, job_id=job.id, rows=rows) == 3000
    assert db.add_trajectories(session, job_id=job.id, rows=[]) == 0
    session.commit()
    session.expunge_all()
    assert db.get_job(session, job_id=job.id).trajectories_generated == 3000

    page, total = db.export_trajectories(session, job_id=job.id, success_only=False, min_reward=None,
                                         limit=10, offset=0)
    assert total == 3000 and len(page) == 10
    first = page[0]
    assert (first.step, first.query, first.completion, first.expected) == (0, "digit 0:", "000000", "0")
    assert (first.finish_reason, first.tokens, first.policy_version, first.success) == ("length", 6, 0, False)
    assert [(t.step, t.id) for t in page] == sorted((t.step, t.id) for t in page)

    wins, total = db.export_trajectories(session, job_id=job.id, success_only=True, min_reward=None,
                                         limit=5000, offset=0)
    assert total == 750 == len(wins) and all(t.reward == 1.0 and t.success for t in wins)
    tail, total = db.export_trajectories(session, job_id=job.id, success_only=False, min_reward=0.5,
                                         limit=100, offset=1450)
    assert total == 1500 and len(tail) == 50 and all(t.reward >= 0.5 for t in tail)
    everything = db.export_trajectories(session, job_id=job.id, success_only=False, min_reward=0.5,
                                        limit=5000, offset=0)[0]
    assert [t.id for t in tail] == [t.id for t in everything[1450:]]
    other = new_job(session)
    assert db.export_trajectories(session, job_id=other.id, success_only=False, min_reward=None,
                                  limit=10, offset=0) == ([], 0)


def test_add_trajectories_success_flag_and_counter(session):
    job = new_job(session)
    rows = trajectory_rows(4)
    rows[3]["success"] = False  # reward 1.0, but the row says otherwise
    rows[0]["success"] = True
    rows[1]["steps"] = [{"action": "x", "reward": float("nan")}]
    db.add_trajectories(session, job_id=job.id, rows=rows)
    db.add_trajectories(session, job_id=job.id, rows=trajectory_rows(2, step=1))
    session.commit()
    page, _ = db.export_trajectories(session, job_id=job.id, success_only=False, min_reward=None,
                                     limit=10, offset=0)
    assert [t.success for t in page[:4]] == [True, False, False, False]
    assert page[1].steps == [{"action": "x", "reward": None}]
    assert db.get_job(session, job_id=job.id).trajectories_generated == 6
    with pytest.raises(db.NotFoundError):
        db.add_trajectories(session, job_id="job_missing", rows=rows)


def test_a_resume_discards_what_a_lost_attempt_stored_after_the_checkpoint(session):
    """Steps 1-3 stored, the run resumed after step 1 (its checkpoint): steps 2-3 go, and the counters
    follow, so the re-run steps end up stored once."""
    job = new_job(session)
    for step in (1, 2, 3):
        db.add_trajectories(session, job_id=job.id, rows=trajectory_rows(4, step=step))
    db.record_progress(session, job_id=job.id, step=3, metrics={"step": 3}, cost_usd=Decimal("0.1"))
    session.commit()
    assert db.discard_steps_after(session, job_id=job.id, step=1) == 8
    db.add_trajectories(session, job_id=job.id, rows=trajectory_rows(4, step=2))  # the re-run step 2
    session.commit()
    session.expunge_all()
    page, total = db.export_trajectories(session, job_id=job.id, success_only=False, min_reward=None,
                                         limit=100, offset=0)
    assert total == 8 and sorted({t.step for t in page}) == [1, 2]
    job = db.get_job(session, job_id=job.id)
    assert job.trajectories_generated == 8 and job.current_iteration == 1
    assert db.discard_steps_after(session, job_id=job.id, step=5) == 0  # nothing after a later step


def test_checkpoints_and_the_best_flag(session):
    job = new_job(session)
    c1 = db.add_checkpoint(session, job_id=job.id, step=10, path="/ck/10", eval_reward=0.4)
    c2 = db.add_checkpoint(session, job_id=job.id, step=20, path="/ck/20")
    c3 = db.add_checkpoint(session, job_id=job.id, step=30, path="/ck/30", eval_reward=0.9)
    session.commit()
    assert [c.id for c in db.list_checkpoints(session, job_id=job.id)] == [c1.id, c2.id, c3.id]
    assert db.get_checkpoint(session, checkpoint_id=c2.id).eval_reward is None

    got = db.set_best_checkpoint(session, job_id=job.id, checkpoint_id=c1.id)
    assert got.best_checkpoint_id == c1.id
    got = db.set_best_checkpoint(session, job_id=job.id, checkpoint_id=c3.id)
    session.commit()
    session.expunge_all()
    assert got.best_checkpoint_id == c3.id
    assert [c.is_best for c in db.list_checkpoints(session, job_id=job.id)] == [False, False, True]
    assert db.get_job(session, job_id=job.id).best_checkpoint_id == c3.id

    other = new_job(session)
    with pytest.raises(db.NotFoundError, match="^checkpoint_id: "):
        db.set_best_checkpoint(session, job_id=other.id, checkpoint_id=c1.id)
    assert db.get_checkpoint(session, checkpoint_id="ckpt_missing") is None
    assert db.list_checkpoints(session, job_id=other.id) == []


def test_model_output_with_nul_characters_is_stored(session):
    """A random-init model can emit byte 0; PostgreSQL text refuses NUL, so it is replaced, not lost."""
    from app.data.db import add_trajectories, create_job, export_trajectories

    job, _ = create_job(session, agent_id="a", owner=None, config={}, engine_config={}, total_iterations=1,
                        budget_usd=None, priority=0, idempotency_key=None, training_rows=1, evaluation_rows=0)
    add_trajectories(session, job_id=job.id, rows=[{"step": 1, "prompt": "p\x00", "completion": "a\x00b",
                                                    "expected": "x", "reward": 0.0}])
    session.commit()
    rows, total = export_trajectories(session, job_id=job.id, success_only=False, min_reward=None, limit=10,
                                      offset=0)
    assert total == 1 and rows[0].completion == "a\ufffdb" and rows[0].query == "p\ufffd"
