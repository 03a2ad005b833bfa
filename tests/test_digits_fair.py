"""benchmarks/digits_fair.py end to end at toy budgets on the committed SD3 digits teacher: budgeted runs of the real
script stopped by SIGTERM, checkpoints exported and scored by evaluate.py (one seed: CI time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_fair_benchmark_smoke(tmp_path):
    out = tmp_path / "fair"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "digits_fair.py"), "--teacher", "sd3", "--output_dir",
                    str(out), "--generator_lrs", "1e-5", "--fake_score_ratios", "1", "--seeds", "0",
                    "--budget_s", "2", "--checkpointing_steps", "2", "--train_batch_size", "2",
                    "--num_images_per_prompt", "2", "--num_class_free_images", "2", "--teacher_steps", "2"],
                   check=True, env=env, cwd=REPO, capture_output=True, text=True)
    result = json.loads((out / "fair.json").read_text())
    assert set(result["best"]) == {"adm", "dmd"}
    for method, row in result["best"].items():
        assert row["cell"] == f"{method}_lr1e-05_r1" and row["seeds"] == 1
        assert row["fid_to_teacher"][0] > 0 and row["fid_to_teacher"][1] >= 0
    for name in ("adm_lr1e-05_r1_s0", "dmd_lr1e-05_r1_s0"):
        budget = json.loads((out / "runs" / name / "budget.json").read_text())
        # stopped by the budget (SIGTERM), not by --max_train_steps, after at least the budget's CPU seconds
        assert budget["cpu_s"] >= 2 and budget["steps"] < 100000
        points = result["curves"][name]
        assert points and [p["step"] for p in points] == sorted(p["step"] for p in points)
        assert points[-1]["step"] == budget["steps"]  # the SIGTERM checkpoint is the last point
        assert all(p["fid_to_teacher"] is not None for p in points)
    assert result["reference"]["start"]["fid_to_teacher"] > 0
    assert "| DMD2 |" in (out / "fair.md").read_text() and (out / "fair.png").stat().st_size > 0
