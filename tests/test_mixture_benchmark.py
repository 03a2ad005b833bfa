"""benchmarks/mixture.py as a subprocess with a handful of steps: artifacts, metrics of the exact teacher, flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mixture.py"
TINY = ["--steps", "6", "--fake_score_warmup_steps", "3", "--init_steps", "3", "--batch_size", "32",
        "--num_eval_samples", "2000", "--log_every", "3"]


def run(tmp_path, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_default_ring(tmp_path):
    proc = run(tmp_path, *TINY, "--init", "good", "--discriminator_warmup_steps", "2", "--discriminator_zero_init",
               "--discriminator_condition_on_xt", "--discriminator_input", "step_difference")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "mixture.json").read_text())
    assert (tmp_path / "mixture.png").stat().st_size > 1000
    results = out["results"]
    assert {"teacher", "adm", "adm_ema", "dmd", "dmd_ema"} <= set(results)
    for row in results.values():
        assert {"modes_covered", "off_mode_fraction", "energy_distance"} <= set(row)
        assert 0 <= row["off_mode_fraction"] <= 1 and 0 <= row["modes_covered"] <= 8
    teacher = results["teacher"]
    assert teacher["modes_covered"] == teacher["num_modes"] == 8
    assert teacher["off_mode_fraction"] < 0.03  # 1.1% of a 2-D Gaussian lies beyond 3 std
    assert teacher["energy_distance"] < 0.02
    assert out["settings"]["init"] == "good" and out["settings"]["ode_step_dt"] == pytest.approx(1 / 64)
    assert [h["iteration"] for h in out["history"]["adm"]] == [3, 6, 8]  # 2 warm-up + 6 generator updates
    assert "d_accuracy" in out["history"]["adm"][-1] and "modes_covered" in out["history"]["adm"][-1]


def test_weights_and_grid_are_honoured(tmp_path):
    proc = run(tmp_path, *TINY, "--modes", "4", "--layout", "grid", "--weights", "1,2,3,4", "--methods", "dmd",
               "--ode_step_dt", "1/8", "--ema_decay", "0", "--no_plot")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "mixture.json").read_text())
    assert set(out["results"]) == {"teacher", "init", "dmd"}
    assert out["weights"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert sorted(map(tuple, out["means"])) == [(-2.0, -2.0), (-2.0, 2.0), (2.0, -2.0), (2.0, 2.0)]
    teacher = out["results"]["teacher"]
    assert teacher["modes_covered"] == 4 and teacher["off_mode_fraction"] < 0.03
    assert teacher["mode_fractions"] == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.03)
    assert out["settings"]["ode_step_dt"] == pytest.approx(0.125)
    assert not (tmp_path / "mixture.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--modes", "3", "--weights", "1,2"], "--weights needs 3"),
    (["--modes", "8", "--layout", "grid"], "square number"),
    (["--methods", "adm,gan"], "--methods"),
])
def test_bad_flags_fail_fast(tmp_path, args, message):
    proc = run(tmp_path, *args)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "mixture.json").exists()
