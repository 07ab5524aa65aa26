"""RedisQueue against a real Redis: order, idempotence, atomic moves, crash recovery, status keys.

Each test gets its own key prefix and deletes its keys afterwards. Without a reachable Redis the
tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import threading
from urllib.parse import urlsplit
from uuid import uuid4

import pytest
import redis

from app.data.queue import RedisQueue

pytestmark = pytest.mark.services

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _require_redis(url: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {url} is unreachable under CI=true: {e}")
        pytest.skip(f"Redis at {url} is unreachable: {e}")
    finally:
        client.close()


@pytest.fixture
def queue():
    _require_redis(REDIS_URL)
    prefix = f"test:{uuid4().hex}:"
    q = RedisQueue(REDIS_URL, prefix=prefix)
    yield q
    q.close()
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}*"))
    if keys:
        r.delete(*keys)
    r.close()


def test_priority_then_fifo(queue):
    for job_id, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 9), ("f", -1), ("g", 0)]:
        queue.push(job_id, priority=priority)
    assert queue.queued() == ["e", "b", "d", "a", "c", "g", "f"]
    assert [queue.pop() for _ in range(7)] == ["e", "b", "d", "a", "c", "g", "f"]
    assert queue.pop() is None


def test_push_is_idempotent_while_queued_or_processing(queue):
    queue.push("a", priority=1)
    queue.push("a", priority=7)  # neither duplicated nor re-prioritised
    queue.push("b", priority=3)
    assert queue.queued() == ["b", "a"]
    assert queue.pop() == "b"
    queue.push("b")
    assert queue.queued() == ["a"]
    assert queue.processing() == ["b"]
    queue.ack("b")
    queue.push("b")  # done and acked: the same id may be queued again
    assert queue.queued() == ["a", "b"]


def test_pop_moves_to_processing_and_ack_removes(queue):
    queue.push("a")
    queue.push("b")
    assert queue.pop() == "a"
    assert queue.queued() == ["b"]
    assert queue.processing() == ["a"]
    queue.ack("a")
    assert queue.processing() == []
    assert queue.queued() == ["b"]
    queue.ack("never-pushed")  # harmless


def test_requeue_returns_a_job_to_its_place(queue):
    queue.push("hi1", priority=5)
    queue.push("lo1", priority=1)
    assert queue.pop() == "hi1"
    queue.push("hi2", priority=5)
    queue.push("lo2", priority=1)
    queue.requeue("hi1")
    # same priority as hi2 but older: back in front of it, and ahead of every lower priority
    assert queue.queued() == ["hi1", "hi2", "lo1", "lo2"]
    assert queue.processing() == []
    queue.requeue("hi1")  # not in processing: nothing to do
    assert queue.queued() == ["hi1", "hi2", "lo1", "lo2"]


def test_requeue_of_several_keeps_their_age_order(queue):
    for job_id in ["a", "b", "c"]:
        queue.push(job_id)
    assert [queue.pop(), queue.pop()] == ["a", "b"]
    queue.push("d")
    for job_id in reversed(queue.processing()):  # the order of the requeue calls does not matter
        queue.requeue(job_id)
    assert queue.queued() == ["a", "b", "c", "d"]


def test_remove_drops_only_a_queued_job(queue):
    queue.push("a")
    queue.push("b")
    queue.push("c")
    assert queue.remove("b") is True
    assert queue.queued() == ["a", "c"]
    assert queue.remove("b") is False
    assert queue.pop() == "a"
    assert queue.remove("a") is False  # taken already: stopping it is the dispatcher's job
    assert queue.processing() == ["a"]
    queue.push("b")  # a removed job can be queued again
    assert queue.queued() == ["c", "b"]


def test_blocking_pop_wakes_when_another_thread_pushes(queue):
    assert queue.pop(timeout_s=0.1) is None
    got: list[str | None] = []
    popper = threading.Thread(target=lambda: got.append(queue.pop(timeout_s=5.0)))
    popper.start()
    queue.push("late")
    popper.join(timeout=10)
    assert not popper.is_alive()
    assert got == ["late"]
    assert queue.processing() == ["late"]


def test_pop_rejects_negative_timeout(queue):
    with pytest.raises(ValueError, match="timeout_s"):
        queue.pop(timeout_s=-1)


def test_concurrent_poppers_get_every_job_exactly_once(queue):
    job_ids = [f"job-{i}" for i in range(200)]
    pushed = threading.Event()
    taken: list[list[str]] = [[] for _ in range(8)]

    def popper(out: list[str]) -> None:
        while True:
            job_id = queue.pop(timeout_s=0.2)
            if job_id is not None:
                out.append(job_id)
            elif pushed.is_set():
                return

    threads = [threading.Thread(target=popper, args=(out,)) for out in taken]
    for t in threads:
        t.start()
    for i, job_id in enumerate(job_ids):
        queue.push(job_id, priority=i % 3)
    pushed.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    everything = [job_id for out in taken for job_id in out]
    assert sorted(everything) == sorted(job_ids)  # none lost, none twice
    assert sorted(queue.processing()) == sorted(job_ids)
    assert queue.queued() == []


def test_crash_after_pop_leaves_the_job_in_processing(queue):
    queue.push("a", priority=2)
    queue.push("b", priority=1)
    assert queue.pop() == "a"
    queue.close()  # the dispatcher dies before it acks

    restarted = RedisQueue(REDIS_URL, prefix=queue.prefix)
    try:
        assert restarted.processing() == ["a"]
        restarted.requeue("a")
        assert restarted.queued() == ["a", "b"]
        assert restarted.pop() == "a"
    finally:
        restarted.close()


def test_lengths(queue):
    assert queue.lengths() == {"training_jobs": 0, "training_jobs_processing": 0}
    for job_id in ["a", "b", "c"]:
        queue.push(job_id)
    queue.pop()
    assert queue.lengths() == {"training_jobs": 2, "training_jobs_processing": 1}


def test_status_keys_expire(queue):
    assert queue.get_status("a") is None
    queue.set_status("a", "queued", ttl_s=60)
    queue.set_status("a", "running", ttl_s=120)
    assert queue.get_status("a") == "running"
    assert 0 < queue.redis.ttl(f"{queue.prefix}job:a:status") <= 120
    with pytest.raises(ValueError, match="ttl_s"):
        queue.set_status("a", "done", ttl_s=0)


def test_ping(queue):
    assert queue.ping() is True
    unreachable = RedisQueue("redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert unreachable.ping() is False
    unreachable.close()


def test_runbook_key_names_without_prefix():
    # Unprefixed names are the production ones, so this test works in db 15, never the default db.
    url = urlsplit(REDIS_URL)._replace(path="/15").geturl()
    _require_redis(url)
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    q = RedisQueue(url)
    try:
        q.push("a")
        q.push("b")
        q.pop()
        q.set_status("a", "running")
        assert r.type("training_jobs") == "list"
        assert r.type("training_jobs_processing") == "list"
        assert r.lrange("training_jobs", 0, -1) == ["b"]
        assert r.lrange("training_jobs_processing", 0, -1) == ["a"]
        assert r.get("job:a:status") == "running"
        assert 0 < r.ttl("job:a:status") <= 86400
    finally:
        q.close()
        r.flushdb()
        r.close()
