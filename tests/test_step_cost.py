"""benchmarks/step_cost.py: its recipe defaults are the entry scripts'; on the tiny SDXL teacher (ADM, DMD2 and the
side-by-side process) and on the reduced real-size SD3 path in bf16 it times the shared loop through the teacher
adapter and writes complete artifacts: bytes held add up, ratios are finite, the passes it counted are what the
update ratios imply. Timings are recorded, never asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, script_env

BENCHMARK = Path(REPO) / "benchmarks" / "step_cost.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_defaults_mirror_the_entry_scripts(tmp_path, prompts_file):
    recipes = _load(BENCHMARK, "step_cost").RECIPES
    for name, script in (("sdxl", "train_adm_sdxl"), ("sd3", "train_adm_sd3")):
        module = _load(Path(REPO) / "distill_scripts" / f"{script}.py", script)
        args = vars(module.parse_args(["--pretrained_model_name_or_path", str(tmp_path), "--prompts_file",
                                       prompts_file]))
        assert {k: args[k] for k in recipes[name]} == recipes[name], name


def _run(tmp_path, *args) -> dict:
    proc = subprocess.run([sys.executable, str(BENCHMARK), *args, "--repeats", "1", "--warmup", "1", "--device", "cpu",
                           "--num_threads", "1", "--out", str(tmp_path)], env=script_env(HF_HOME=str(tmp_path / "hf")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = tmp_path / f"step_cost_{args[1]}_{args[3]}"
    assert "iteration / sum of parts" in stem.with_suffix(".md").read_text()
    return json.loads(stem.with_suffix(".json").read_text())


def _check_run(run: dict, loss: str) -> dict:
    """Artifacts complete and consistent; returns the passes counted in the (one) timed iteration."""
    held = run["bytes_held"]
    assert held["total"] == sum(held[k] for k in ("weights_frozen", "weights_trainable", "gradients",
                                                  "optimizer_states"))
    assert held["gradients"] == held["weights_trainable"] > 0
    assert held["optimizer_states"] == 2 * held["weights_trainable"]  # AdamW: two fp32 moments per trainable weight
    assert run["peak_memory_bytes"] > 0 and math.isfinite(run["peak_over_held"])
    assert len(run["iteration_seconds"]) == 1 and run["iteration_seconds_median"] > 0
    assert math.isfinite(run["iteration_over_sum_of_parts"]) and run["iteration_over_sum_of_parts"] > 0
    logs = run["last_iteration_logs"]
    assert all(math.isfinite(v) for k, v in logs.items() if k.startswith(("loss", "grad_norm"))), logs
    counts, = run["part_counts_per_iteration"]
    assert set(counts) <= set(run["parts_seconds_median"])  # every counted pass was timed alone
    ratio = run["run_args"]["fake_score_update_ratio"]
    assert (run["run_args"]["distribution_loss"], ratio) == (loss, 1 if loss == "adm" else 5)
    # one generator update, `ratio` fake-score updates, and (ADM) one D update reusing the generator step's passes
    assert counts["generator_fwd_bwd"] == counts["optimizer_generator"] == counts["teacher_cfg_forward"] == 1
    assert counts["fake_score_fwd_bwd"] == counts["optimizer_fake_score"] == ratio
    assert counts["generator_forward_nograd"] >= ratio  # the fake score's inputs, plus any backward simulation
    d_passes = ("fake_score_fwd_bwd_input_grad", "discriminator_fwd_bwd_input_grad", "discriminator_update_fwd_bwd",
                "optimizer_discriminator")
    if loss == "adm":
        assert [counts[p] for p in d_passes] == [1, 1, 1, 1] and "fake_score_forward_nograd" not in counts
    else:
        assert counts["fake_score_forward_nograd"] == 1 and not set(d_passes) & set(counts)
        assert "discriminator_heads_trainable" not in run["parameters"]  # DMD2 builds no heads
    return counts


def test_step_cost_tiny_sdxl(tmp_path, tiny_sdxl):
    """--size tiny's SDXL teacher is the tests' tiny_sdxl (32 px): passed as --teacher_dir, it is not built again."""
    summary = _run(tmp_path, "--script", "sdxl", "--size", "tiny", "--teacher_dir", tiny_sdxl)
    assert summary["teacher"] == {"teacher": tiny_sdxl} and set(summary["runs"]) == {"adm", "dmd"}
    for loss, run in summary["runs"].items():
        assert run["adapter"] == "SDXLTeacher" and run["run_args"]["guidance_scale"] == 8.0
        counts = _check_run(run, loss)
        ratio = run["run_args"]["fake_score_update_ratio"]
        # a one-step student has no backward simulation; every batch drawn is encoded (SDXL's default)
        assert counts["generator_forward_nograd"] == ratio and counts["text_encode"] == ratio + 1
        # the frozen teacher is one object (real score + D backbone): a second copy would add exactly its bytes
        assert run["teacher_second_copy_bytes"] == 4 * run["parameters"]["teacher_frozen"]  # fp32, no mixed prec.
    for key in ("adm_over_dmd_update_cost_measured", "adm_over_dmd_update_cost_from_parts",
                "adm_over_dmd_update_cost_paired"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    paired = summary["paired_iterations"]["iteration_seconds"]  # ADM and DMD2 in one process, alternated
    assert len(paired["adm"]) == len(paired["dmd"]) == 1


@pytest.mark.heavy  # 3 CPU-min; step_cost's own smoke stays in CI (test_step_cost_tiny_sdxl); run: make test-heavy
def test_step_cost_full_path_reduced_sd3(tmp_path):
    """The --size full path (real text-encoder and conditioning widths, T5's 256 tokens, the 1024-px VAE config)
    with a one-block MMDiT, at 128 px in bf16, with SD3's recipe: LoRA generator and fake score on the teacher."""
    summary = _run(tmp_path, "--script", "sd3", "--size", "full", "--reduced_denoiser", "--resolution", "128",
                   "--mixed_precision", "bf16", "--distribution_loss", "adm")
    assert "REDUCED" in summary["teacher"]["teacher"] and set(summary["runs"]) == {"adm"}
    run = summary["runs"]["adm"]
    assert run["adapter"] == "SD3Teacher" and run["discriminator_blocks"] == ["transformer_blocks.0"]
    args = run["run_args"]
    assert (args["max_sequence_length"], args["mixed_precision"], args["num_student_steps"], args["lora_rank"],
            args["fake_score_lora_rank"]) == (256, "bf16", 4, 64, 64)
    _check_run(run, "adm")
    # LoRA roles are adapters on the one bf16 teacher: no frozen copy of it for the generator or the fake score
    parameters = run["parameters"]
    assert parameters["generator_trainable"] > 0 and parameters["fake_score_trainable"] > 0
    assert "generator_frozen" not in parameters and "fake_score_frozen" not in parameters
    assert run["teacher_second_copy_bytes"] == 2 * parameters["teacher_frozen"]  # frozen teacher kept in bf16
    assert os.path.isfile(tmp_path / "step_cost_sd3_full.md")
