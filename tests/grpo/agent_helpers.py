"""Environments for test_agent.py, loaded as "agent_helpers:NAME" (the test puts this folder on sys.path).
The bad ones exist to show that one failing environment ends its own trajectory and nothing else."""

from __future__ import annotations

import asyncio
import time

from grpo.agents.environments import Action, StepResult, Tool, ToolEnvironment
from grpo.tasks import Sample


class EchoEnv:
    """Never done: every action is answered with the observation "ok" (sync methods on purpose)."""

    def reset(self, sample: Sample) -> str:
        return sample.prompt

    def step(self, action: Action) -> StepResult:
        return StepResult("ok", reward=0.5)


class HangingEnv:
    """Its step never returns in time (async)."""

    async def reset(self, sample: Sample) -> str:
        return sample.prompt

    async def step(self, action: Action) -> StepResult:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


class SyncHangingEnv(EchoEnv):
    """A sync step that blocks: it runs in a thread, so it cannot stall the other trajectories."""

    def step(self, action: Action) -> StepResult:
        time.sleep(2.0)
        return StepResult("late")


class RaisingEnv(EchoEnv):
    def step(self, action: Action) -> StepResult:
        raise RuntimeError("environment bug")


class FlakyTools(ToolEnvironment):
    """Tools that fail in every way a tool can: raise, hang (sync and async), or work."""

    name = "flaky"

    def make_tools(self) -> list[Tool]:
        def boom(x: str) -> str:
            raise ZeroDivisionError("boom")

        def slow(x: str) -> str:
            time.sleep(1.0)
            return "slow"

        async def stuck(x: str) -> str:
            await asyncio.sleep(3600)
            return "never"

        return [Tool("boom", "raises", {"x": "s"}, boom), Tool("slow", "sleeps", {"x": "s"}, slow),
                Tool("stuck", "hangs", {"x": "s"}, stuck), Tool("echo", "echoes", {"x": "s"}, lambda x: x)]

    def outcome(self, answer: str) -> float:
        return 1.0 if answer.strip() == "done" else 0.0
