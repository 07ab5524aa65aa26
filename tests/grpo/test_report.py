"""Exactly-once steps across a restart, without Ray: the run monitor drops what the lost attempt left in
its mailbox, and the run folder's files are cut back to the steps the checkpoint holds."""

from __future__ import annotations

import asyncio
import json

from grpo.report import LocalReporter, RunMonitor, notify_resume


def test_the_monitor_drops_the_lost_attempts_steps_and_reports_the_resume_first():
    async def go():
        m = RunMonitor()
        for step in (1, 2, 3):
            await m.record(step, {"reward_mean": 0.5}, [{"step": step, "i": 0}])
        await m.add_trajectories([{"step": 3, "i": 1}])
        await m.resumed(2)  # the worker group restarted from the step-2 checkpoint
        await m.record(3, {"reward_mean": 0.7}, [{"step": 3, "i": 0}])
        posts, resumed_at, metrics, rows = m.drain()
        assert posts == 5 and resumed_at == 2
        assert [(x["step"], x["reward_mean"]) for x in metrics] == [(1, 0.5), (2, 0.5), (3, 0.7)]
        assert rows == [{"step": 1, "i": 0}, {"step": 2, "i": 0}, {"step": 3, "i": 0}]
        assert m.drain() == (5, None, [], [])

    asyncio.run(go())


def test_the_target_stops_the_run_at_the_step_that_reached_it():
    """The monitor answers rank 0's record of the very step whose window reached the target (the driver
    learns of a step after the next has begun: deciding there cost a step or two); a resume forgets the
    rewards of the steps it re-runs."""
    async def go():
        m = RunMonitor(target_reward=0.5, target_window=3)
        steps = ((1, 0.9), (2, 0.1), (3, 0.3), (4, 0.8), (5, 0.7))
        got = [await m.record(step, {"reward_mean": r}, []) for step, r in steps]
        assert got == [None, None, None, None, "completed"]  # steps 3-5: 0.6; 2-4: 0.4; 1-3: 0.43
        m2 = RunMonitor(target_reward=0.5, target_window=3)
        assert [await m2.record(s, {"reward_mean": r}, []) for s, r in ((1, 0.2), (2, 0.6), (3, 0.6))] == [None, None, None]
        await m2.resumed(2)  # step 3 runs again, lower
        assert await m2.record(3, {"reward_mean": 0.1}, []) is None  # (0.2 + 0.6 + 0.1) / 3 = 0.3
        assert await m2.record(4, {"reward_mean": 0.9}, []) == "completed"  # (0.6 + 0.1 + 0.9) / 3 = 0.53
        assert await RunMonitor().record(1, {"reward_mean": 1.0}, []) is None  # no target: never

    asyncio.run(go())


def test_a_checkpoint_waits_until_every_post_before_it_is_stored():
    """Rank 0 asks `wait_stored` before any rank writes a checkpoint: it returns only once the driver has
    acknowledged a drain holding every post made before the call (rank 0's record and the other ranks'
    trajectories), not on an acknowledgement of an earlier drain."""
    async def go():
        m = RunMonitor()
        await m.record(1, {"reward_mean": 0.5}, [{"step": 1, "rank": 0}])
        early = m.drain()[0]  # the driver drains rank 0's record...
        await m.add_trajectories([{"step": 1, "rank": 1}])  # ...before rank 1's rows of the same step arrive
        waiting = asyncio.create_task(m.wait_stored())
        await m.stored(early)  # stored: the first drain only
        await asyncio.sleep(0.05)
        assert not waiting.done()  # rank 1's rows are not durable yet: no checkpoint
        late = m.drain()[0]
        await asyncio.sleep(0.05)
        assert not waiting.done()  # drained but not acknowledged (the reporters may still be writing)
        await m.stored(late)
        assert await asyncio.wait_for(waiting, 1) == 2
        # nothing new posted: the wait returns at once
        assert await asyncio.wait_for(m.wait_stored(), 1) == 2
        # the driver wakes for a post instead of sleeping out its poll
        woken = asyncio.create_task(m.wait_posted(2, 30))
        await m.record(2, {"reward_mean": 0.6}, [])
        assert await asyncio.wait_for(woken, 1) == 3
        assert await m.wait_posted(3, 0.01) == 3  # nothing new: back after the timeout

    asyncio.run(go())


def test_the_run_folder_keeps_each_step_once_after_a_resume(tmp_path):
    r = LocalReporter(tmp_path)
    for step in (1, 2, 3, 4):
        r.on_step({"step": step, "reward_mean": 0.1})
        r.on_trajectories([{"step": step, "completion": "a"}, {"step": step, "completion": "b"}])
    notify_resume([r, object()], 2)  # a reporter without on_resume is left alone
    for step in (3, 4):  # the re-run
        r.on_step({"step": step, "reward_mean": 0.9})
        r.on_trajectories([{"step": step, "completion": "c"}, {"step": step, "completion": "d"}])
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["reward_mean"]) for m in metrics] == [(1, 0.1), (2, 0.1), (3, 0.9), (4, 0.9)]
    rows = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert [(x["step"], x["completion"]) for x in rows] == [(1, "a"), (1, "b"), (2, "a"), (2, "b"),
                                                           (3, "c"), (3, "d"), (4, "c"), (4, "d")]
    r.on_resume(0)  # a run that restarts before its first checkpoint keeps nothing of the lost attempt
    assert (tmp_path / "metrics.jsonl").read_text() == "" == (tmp_path / "trajectories.jsonl").read_text()
