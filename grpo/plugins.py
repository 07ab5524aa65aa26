"""Plugins an operator installs: rewards and environments published as Python entry points.

A package adds a reward or an environment under a plain name by declaring, in its pyproject.toml,

    [project.entry-points."raygrpo.rewards"]
    my_reward = "my_package.rewards:score"

    [project.entry-points."raygrpo.environments"]
    my_env = "my_package.envs:MyEnv"

Once it is installed on the cluster (the image, or the job's runtime_env), configs name them like the
built-ins (`reward: my_reward`). The job API lets callers name built-ins and plugins only; an import path
(`module:function`) from a request must be on the operator's allow-list (docs/operations.md, Security).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

REWARDS = "raygrpo.rewards"
ENVIRONMENTS = "raygrpo.environments"


def installed(group: str) -> dict[str, EntryPoint]:
    """The entry points of `group` by name (the first one wins when two packages use a name)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)
    return found
