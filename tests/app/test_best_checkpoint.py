"""The best checkpoint is the kept one with the highest evaluation reward, whatever order Ray Train lists
them in (ascending by score: its first was the worst kept one), and each checkpoint's score is stored."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace

import torch

from app.data import db
from app.data.tables import PolicyCheckpoint
from app.jobs.reporter import DBReporter
from app.jobs.webhooks import Webhooks
from grpo.config import GRPOConfig
from grpo.run import rank_checkpoints


def _ray_kept(*steps_scores):
    """What `Result.best_checkpoints` holds: (Checkpoint, metrics) pairs, here in ascending score order."""
    return [(SimpleNamespace(path=f"/runs/t/checkpoint_{step:06d}"), {"step": step, "eval_reward": score})
            for step, score in steps_scores]


def test_ranking_puts_the_highest_score_first_ties_to_the_later_step_unscored_last():
    paths, scores = rank_checkpoints(_ray_kept((150, 0.85), (100, None), (200, 0.90), (250, 0.90)))
    assert paths == ["/runs/t/checkpoint_000250", "/runs/t/checkpoint_000200", "/runs/t/checkpoint_000150",
                     "/runs/t/checkpoint_000100"]
    assert scores == {"/runs/t/checkpoint_000150": 0.85, "/runs/t/checkpoint_000200": 0.90,
                      "/runs/t/checkpoint_000250": 0.90}
    paths, scores = rank_checkpoints(_ray_kept((10, float("nan")), (20, None)))
    assert paths == ["/runs/t/checkpoint_000020", "/runs/t/checkpoint_000010"] and scores == {}


def test_the_job_points_at_the_highest_scoring_checkpoint_and_stores_every_score(tmp_path, db_url, tiny_model_dir):
    engine = db.get_engine(db_url)
    db.init_db(engine)
    with db.session_scope(engine) as s:
        job, _ = db.create_job(s, agent_id="a", owner=None, config={}, engine_config={}, total_iterations=250,
                               budget_usd=Decimal("1"), priority=0, idempotency_key=None, training_rows=1,
                               evaluation_rows=0)
        db.mark_running(s, job_id=job.id, ray_submission_id=job.id)
    cfg = GRPOConfig(model=tiny_model_dir, num_steps=250)
    rep = DBReporter(cfg=cfg, job_id=job.id, db_url=db_url, webhooks=Webhooks([], None))
    rep.on_start(cfg, job_id=job.id)
    # Even when a reporter gets the paths in Ray's own (ascending) order, the scores decide.
    kept = []
    for step, score in ((150, 0.85), (200, 0.90), (250, 0.875)):  # checkpoint folders as the trainer saves them
        folder = tmp_path / f"checkpoint_{step:06d}"
        folder.mkdir()
        torch.save({"step": step}, folder / "trainer_state.pt")
        kept.append((SimpleNamespace(path=str(folder)), {"step": step, "eval_reward": score}))
    rep.on_end("completed", error=None, summary={
        "checkpoint": kept[-1][0].path, "best_checkpoints": [c.path for c, _ in kept],
        "checkpoint_scores": {c.path: m["eval_reward"] for c, m in kept}, "cost_usd": 0.1,
        "last_metrics": {"step": 250}})
    with db.session_scope(engine) as s:
        rows = {c.step: c for c in s.query(PolicyCheckpoint).filter(PolicyCheckpoint.job_id == job.id)}
        assert {step: c.eval_reward for step, c in rows.items()} == {150: 0.85, 200: 0.90, 250: 0.875}
        assert [step for step, c in rows.items() if c.is_best] == [200]
        assert db.get_job(s, job_id=job.id).best_checkpoint_id == rows[200].id
    db.dispose_engine(db_url)
