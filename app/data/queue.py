"""The Redis fast path of the job queue, and the `job:{id}:status` keys.

Covers: `RedisQueue`, which keeps queued job ids in the Redis list `training_jobs` and jobs taken by
the dispatcher in `training_jobs_processing` (the names the runbook gives; operators run LLEN on them),
plus a short-lived copy of each job's DB status. `JobQueue` is the Protocol it shares with the
DB-backed queue. Not here: that DB queue, the dispatcher, and the job rows themselves (the DB is the
source of truth; this is a fast copy of "what is waiting").

Why lists and Lua: a pop is one LMOVE/BLMOVE from `training_jobs` to `training_jobs_processing`, so a
crash between "taken" and "started" leaves the id in the processing list, where the dispatcher finds
it on restart; it is never lost. Priorities keep the lists (a sorted set would break the runbook's
LLEN and the atomic move): `training_jobs` is kept sorted by (priority desc, enqueue order asc) by
inserting with a Lua script, so popping the head gives the highest priority, FIFO within one. Every
change that touches more than one key is one Lua script, so there is no read-modify-write race.

Keys (all under `prefix`):
    training_jobs                list, head = next job
    training_jobs_processing     list, oldest pop at the head
    training_jobs:priority       hash id -> priority, for every job queued or processing
    training_jobs:seq            hash id -> enqueue sequence number (its age), same jobs
    training_jobs:next_seq       counter behind training_jobs:seq
    job:{id}:status              string with a TTL
"""

from __future__ import annotations

from typing import Protocol

import redis


class JobQueue(Protocol):
    """A queue of training job ids: priority first, then age; taken jobs wait in `processing` until acked."""

    def push(self, job_id: str, *, priority: int = 0) -> None:
        """Enqueue; pushing a job already queued or processing does nothing."""
        ...

    def pop(self, *, timeout_s: float = 0.0) -> str | None:
        """Move the next job to processing atomically; wait up to `timeout_s` when empty (0: don't wait)."""
        ...

    def ack(self, job_id: str) -> None:
        """Done with a taken job: drop it from processing."""
        ...

    def requeue(self, job_id: str) -> None:
        """Move a taken job back to queued, at the place its priority and age give it."""
        ...

    def remove(self, job_id: str) -> bool:
        """Drop a queued (not yet taken) job; True if it was queued."""
        ...

    def queued(self) -> list[str]: ...

    def processing(self) -> list[str]: ...

    def lengths(self) -> dict[str, int]:
        """{"training_jobs": n, "training_jobs_processing": m}, for the redis_queue_length metric."""
        ...

    def set_status(self, job_id: str, status: str, *, ttl_s: int = 86400) -> None: ...

    def get_status(self, job_id: str) -> str | None: ...


# Shared by push and requeue. KEYS: queue, priority hash, seq hash. An element ranks before the new id
# when its priority is higher, or equal and it is older; the id goes right after the last such element
# (scanning from the tail stops at once in the usual case: a new push of the lowest priority in use).
# Ids without a priority or seq (pushed by hand with RPUSH) count as priority 0, oldest.
_INSERT_LUA = """
local function insert(id, prio, seq)
    local ids = redis.call('LRANGE', KEYS[1], 0, -1)
    for i = #ids, 1, -1 do
        local p = tonumber(redis.call('HGET', KEYS[2], ids[i])) or 0
        local s = tonumber(redis.call('HGET', KEYS[3], ids[i])) or 0
        if p > prio or (p == prio and s < seq) then
            redis.call('LINSERT', KEYS[1], 'AFTER', ids[i], id)
            return
        end
    end
    redis.call('LPUSH', KEYS[1], id)
end
"""

# KEYS: queue, priority, seq, processing, next_seq. ARGV: id, priority. Returns 1 if enqueued.
# The hashes alone could go stale (an operator DELs a list), so membership is checked in the lists.
_PUSH_LUA = (
    _INSERT_LUA
    + """
local id = ARGV[1]
if redis.call('HEXISTS', KEYS[2], id) == 1
        and (redis.call('LPOS', KEYS[1], id) or redis.call('LPOS', KEYS[4], id)) then
    return 0
end
local prio = tonumber(ARGV[2])
local seq = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[2], id, prio)
redis.call('HSET', KEYS[3], id, seq)
insert(id, prio, seq)
return 1
"""
)

# KEYS: queue, priority, seq, processing. ARGV: id. Returns 1 if the id was in processing.
_REQUEUE_LUA = (
    _INSERT_LUA
    + """
local id = ARGV[1]
if redis.call('LREM', KEYS[4], 0, id) == 0 then
    return 0
end
local prio = tonumber(redis.call('HGET', KEYS[2], id)) or 0
local seq = tonumber(redis.call('HGET', KEYS[3], id)) or 0
insert(id, prio, seq)
return 1
"""
)

# KEYS: list to drop the id from, the other list, priority, seq. ARGV: id. Returns how many were removed.
# The priority and seq go with it unless the id is (oddly) still in the other list.
_DROP_LUA = """
local id = ARGV[1]
local n = redis.call('LREM', KEYS[1], 0, id)
if not redis.call('LPOS', KEYS[2], id) then
    redis.call('HDEL', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
end
return n
"""


class RedisQueue:
    """The job queue on Redis lists; see the module docstring for the keys and why."""

    def __init__(self, url: str, *, prefix: str = ""):
        self.prefix = prefix
        self.queue_key = f"{prefix}training_jobs"
        self.processing_key = f"{prefix}training_jobs_processing"
        self.priority_key = f"{prefix}training_jobs:priority"
        self.seq_key = f"{prefix}training_jobs:seq"
        self.next_seq_key = f"{prefix}training_jobs:next_seq"
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self._push = self.redis.register_script(_PUSH_LUA)
        self._requeue = self.redis.register_script(_REQUEUE_LUA)
        self._drop = self.redis.register_script(_DROP_LUA)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "") -> RedisQueue:
        return cls(url, prefix=prefix)

    def close(self) -> None:
        self.redis.close()

    def ping(self) -> bool:
        """True if Redis answers; False (never an exception) if it cannot be reached."""
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def status_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:status"

    def push(self, job_id: str, *, priority: int = 0) -> None:
        keys = [self.queue_key, self.priority_key, self.seq_key, self.processing_key, self.next_seq_key]
        self._push(keys=keys, args=[job_id, int(priority)])

    def pop(self, *, timeout_s: float = 0.0) -> str | None:
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        # BLMOVE's timeout 0 means "forever", so "don't wait" is the non-blocking LMOVE.
        if timeout_s == 0:
            return self.redis.lmove(self.queue_key, self.processing_key, "LEFT", "RIGHT")
        return self.redis.blmove(self.queue_key, self.processing_key, timeout_s, "LEFT", "RIGHT")

    def ack(self, job_id: str) -> None:
        self._drop(keys=[self.processing_key, self.queue_key, self.priority_key, self.seq_key], args=[job_id])

    def requeue(self, job_id: str) -> None:
        """Back to queued at its old place (priority, then age); does nothing if it is not in processing."""
        keys = [self.queue_key, self.priority_key, self.seq_key, self.processing_key]
        self._requeue(keys=keys, args=[job_id])

    def remove(self, job_id: str) -> bool:
        keys = [self.queue_key, self.processing_key, self.priority_key, self.seq_key]
        return self._drop(keys=keys, args=[job_id]) > 0

    def queued(self) -> list[str]:
        return self.redis.lrange(self.queue_key, 0, -1)

    def processing(self) -> list[str]:
        return self.redis.lrange(self.processing_key, 0, -1)

    def lengths(self) -> dict[str, int]:
        # MULTI so the two lengths are one snapshot (a job mid-move is counted once).
        pipe = self.redis.pipeline(transaction=True)
        pipe.llen(self.queue_key)
        pipe.llen(self.processing_key)
        n_queued, n_processing = pipe.execute()
        return {"training_jobs": n_queued, "training_jobs_processing": n_processing}

    def set_status(self, job_id: str, status: str, *, ttl_s: int = 86400) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.redis.set(self.status_key(job_id), status, ex=ttl_s)

    def get_status(self, job_id: str) -> str | None:
        return self.redis.get(self.status_key(job_id))
