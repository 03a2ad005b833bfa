"""benchmarks/step_cost.py on the tiny SDXL teacher, one repeat, as a subprocess (ADM, DMD2 and the side-by-side
process): the JSON it writes is complete, memory and bytes held are positive, every ratio is finite. Timings are
recorded, never asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "step_cost.py"


def _run(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCHMARK), *args, "--repeats", "1", "--warmup", "1", "--device", "cpu",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_step_cost_tiny_sdxl(tmp_path):
    _run(tmp_path, "--script", "sdxl", "--size", "tiny")
    summary = json.loads((tmp_path / "step_cost_sdxl_tiny.json").read_text())
    assert "iteration / sum of parts" in (tmp_path / "step_cost_sdxl_tiny.md").read_text()

    assert set(summary["runs"]) == {"adm", "dmd"}
    for loss, run in summary["runs"].items():
        assert run["script_args"]["distribution_loss"] == loss
        assert run["script_args"]["fake_score_update_ratio"] == (1 if loss == "adm" else 5)
        held = run["bytes_held"]
        assert held["total"] == sum(held[k] for k in ("weights_frozen", "weights_trainable", "gradients",
                                                      "optimizer_states"))
        assert held["total"] > 0 and held["gradients"] == held["weights_trainable"] > 0
        assert held["optimizer_states"] == 2 * held["weights_trainable"]  # AdamW in fp32: two moments
        assert run["peak_memory_bytes"] > 0 and math.isfinite(run["peak_over_held"])
        assert len(run["iteration_seconds"]) == 1 and run["iteration_seconds_median"] > 0
        assert math.isfinite(run["iteration_over_sum_of_parts"]) and run["iteration_over_sum_of_parts"] > 0
        counts = run["part_counts_last_iteration"]
        assert counts["fake_score_fwd_bwd"] == run["script_args"]["fake_score_update_ratio"]
        assert set(counts) <= set(run["parts_seconds_median"])
        assert all(math.isfinite(v) for v in run["last_iteration_logs"].values())
    # the frozen teacher is one object (real score + D backbone): a second copy would add exactly its bytes
    adm = summary["runs"]["adm"]
    assert adm["teacher_second_copy_bytes"] == 4 * adm["parameters"]["teacher"]  # fp32 teacher (no mixed precision)
    assert "discriminator_update_fwd_bwd" in adm["part_counts_last_iteration"]
    assert "discriminator_update_fwd_bwd" not in summary["runs"]["dmd"]["part_counts_last_iteration"]
    assert math.isfinite(summary["adm_over_dmd_update_cost_measured"])
    assert math.isfinite(summary["adm_over_dmd_update_cost_from_parts"])
    # ADM and DMD2 side by side in one process, iterations alternated
    paired = summary["paired_iterations"]["iteration_seconds"]
    assert len(paired["adm"]) == len(paired["dmd"]) == 1
    assert math.isfinite(summary["adm_over_dmd_update_cost_paired"]) and summary["adm_over_dmd_update_cost_paired"] > 0


def test_step_cost_full_path_reduced_sd3(tmp_path):
    """The --size full path (real text-encoder / conditioning widths, T5's 256 tokens, 1024-px VAE config) with a
    one-block MMDiT, at 128 px in bf16: it builds, iterates and reports."""
    _run(tmp_path, "--script", "sd3", "--size", "full", "--reduced_denoiser", "--resolution", "128",
         "--mixed_precision", "bf16", "--distribution_loss", "adm")
    summary = json.loads((tmp_path / "step_cost_sd3_full.json").read_text())
    assert "REDUCED" in summary["teacher"]["teacher"] and set(summary["runs"]) == {"adm"}
    run = summary["runs"]["adm"]
    assert run["script_args"]["max_sequence_length"] == 256 and run["script_args"]["mixed_precision"] == "bf16"
    assert run["teacher_second_copy_bytes"] == 2 * run["parameters"]["teacher"]  # frozen teacher kept in bf16
    assert run["bytes_held"]["total"] > 0 and math.isfinite(run["iteration_over_sum_of_parts"])
