"""The weight board: where rollout actors find the latest published policy weights.

Its own module, free of torch: the board's actor process imports only this (a Ray actor imports its class's
module), where importing grpo.rollout cost it torch and transformers (1.4 s of CPU at every run's start on 2
cores, for a process that only holds object references).
"""

from __future__ import annotations


class WeightBoard:
    """The latest published policy weights, as object-store references to their buckets (one small Ray actor).

    Trainer rank 0 sends the weights here one bucket at a time (`put`); the board puts each bucket in the
    object store itself, so the board OWNS the objects: they outlive the Ray Train worker that made them
    (a restarted worker group would otherwise leave the board handing out objects whose owner is dead,
    and a rollout actor that restarted then fails with OwnerDiedError). `publish` then posts the version;
    rollout workers that fall behind or restart pull it. A resumed attempt posts its first version with
    `restart=True`: the board then forgets what the lost attempt published, even if it was newer. Lists keep
    Ray from resolving the references in transit: the board holds references, never weights.
    """

    def __init__(self) -> None:
        self.version = -1
        self.refs: list = []

    def put(self, bucket: dict) -> list:
        import ray

        return [ray.put(bucket)]

    def publish(self, version: int, puts: list, restart: bool = False) -> list:
        """Post `version`, its buckets being those of `puts`: the results of this board's own `put` calls, which
        ran before this one, still pending for the caller (so it waits for one round trip, not one per bucket).
        Returns the version's bucket references."""
        import ray

        refs = [r for got in ray.get(puts) for r in got]
        if restart or version >= self.version:
            self.version, self.refs = version, refs
        return refs

    def latest(self) -> tuple[int, list]:
        return self.version, self.refs
