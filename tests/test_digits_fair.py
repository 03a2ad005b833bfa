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


def test_fair_commands_parse_with_each_entry_script(tmp_path):
    """Every teacher's grid command is one its real entry script accepts, with the cell's guidance scale (a grid axis
    only when --guidance_scales is given, so older results keep their run names) and the teacher's ADM flags."""
    import importlib.util

    sys.path.insert(0, str(REPO / "benchmarks"))
    import digits_fair

    assert digits_fair.run_name("dmd", 2e-5, 1, 0) == "dmd_lr2e-05_r1_s0"
    assert digits_fair.run_name("dmd", 2e-5, 1, 2, 2.5) == "dmd_lr2e-05_r1_g2.5_s2"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit seven moving left\n")
    for teacher, guidance, expected_dt in (("sd3", None, 1 / 64), ("cogvideox", 2.0, 1 / 8)):
        args = digits_fair.parse_args(["--teacher", teacher, "--output_dir", str(tmp_path)])
        script = REPO / "distill_scripts" / digits_fair.TEACHERS[teacher]["script"]
        spec = importlib.util.spec_from_file_location(f"fair_{teacher}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for method in ("adm", "dmd"):
            cmd = digits_fair.train_command(args, str(prompts), method, 1e-5, 5, guidance, 1, str(tmp_path / "run"))
            parsed = module.parse_args(cmd[2:])
            assert parsed.guidance_scale == (5.0 if guidance is None else guidance)
            assert parsed.num_student_steps == digits_fair.TEACHERS[teacher]["steps"]
            assert (parsed.generator_lr, parsed.fake_score_update_ratio, parsed.seed) == (1e-5, 5, 1)
            assert parsed.distribution_loss == method
            if method == "adm":
                assert parsed.ode_step_dt == pytest.approx(expected_dt)


def test_merge_per_method_results(tmp_path):
    """Per-method runs of one grid merge into one result; other reference samples or a repeated method are refused."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import digits_fair

    reference = {"teacher": {"fid_to_teacher": None}, "start": {"fid_to_teacher": 18.25}}

    def result(method, fid, ref=reference):
        path = tmp_path / f"{method}_{fid}.json"
        path.write_text(json.dumps({"teacher": "cogvideox", "reference": ref, "best": {method: {"cell": method}},
                                    "grid": [{"run": f"{method}_s0"}], "curves": {f"{method}_s0": [{"step": 1}]}}))
        return str(path)

    merged = digits_fair.merge_results([result("adm", 30), result("dmd", 10)])
    assert list(merged["best"]) == ["adm", "dmd"] and [r["run"] for r in merged["grid"]] == ["adm_s0", "dmd_s0"]
    assert set(merged["curves"]) == {"adm_s0", "dmd_s0"} and merged["reference"] == reference
    other = {"teacher": {"fid_to_teacher": None}, "start": {"fid_to_teacher": 19.0}}
    with pytest.raises(SystemExit, match="other reference samples"):
        digits_fair.merge_results([result("adm", 30), result("dmd", 11, other)])
    with pytest.raises(SystemExit, match="repeats a method"):
        digits_fair.merge_results([result("adm", 30), result("adm", 31)])
