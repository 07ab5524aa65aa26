"""bench/gpu_check.py as a subprocess: the tiny CPU run (gloo) here, the full run where CUDA is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *args: str, timeout: int) -> dict:
    out = tmp_path / "o.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", *args, "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_tiny_run_on_cpu_passes_its_checks_and_reports_throughput(tmp_path):
    summary = _run(tmp_path, "--device", "cpu", "--tiny", timeout=300)
    assert summary["backend"] == "gloo"
    assert all(summary["checks"].values()), summary["checks"]
    assert summary["rollout_tokens"] == 2 * 2 * 16  # no stop token: every row decodes all its tokens
    assert summary["rollout_tokens_per_s"] > 0
    assert summary["update_tokens_per_s"] > 0
    assert summary["mfu"] is None  # no peak is known for a CPU


@pytest.mark.gpu
def test_full_run_on_cuda_passes_its_checks(tmp_path):
    summary = _run(tmp_path, "--device", "cuda", timeout=600)
    assert summary["backend"] == "nccl"
    assert all(summary["checks"].values()), summary["checks"]
    assert summary["rollout_tokens"] == 64 * 512
    assert summary["update_tokens_per_s"] > 0
    if summary["mfu"] is not None:
        assert 0 < summary["mfu"] < 1
