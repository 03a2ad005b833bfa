"""distill_scripts/evaluate.py: its metrics on known inputs, the report (teacher-referenced columns, failures,
multi-seed aggregation) on synthetic results, and a subprocess run on the committed digits teacher."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "distill_scripts"))
TEACHER = os.path.join(ROOT, "distill_scripts", "digits", "assets", "digits-sdxl-teacher")

import evaluate  # noqa: E402


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 4))
    assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([3.0, 0.0, 0.0, 0.0])
    assert evaluate.frechet_distance(a, shifted) == pytest.approx(9.0, rel=1e-6)
    scaled = 2.0 * a  # same mean, covariance x4: trace term (1 + 4 - 2 * 2) per dimension
    assert evaluate.frechet_distance(a, scaled) == pytest.approx(4.0, rel=0.1)


def test_entropy_and_pairwise_distance():
    assert evaluate.normalised_entropy(torch.ones(10)) == pytest.approx(1.0)
    assert evaluate.normalised_entropy(torch.tensor([5, 0, 0, 0, 0, 0, 0, 0, 0, 0])) == 0.0
    assert 0 < evaluate.normalised_entropy(torch.tensor([5, 5, 0, 0, 0, 0, 0, 0, 0, 0])) < 1
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert evaluate.mean_pairwise_distance(feats) == pytest.approx(5.0)


def test_pipeline_argument_parsing():
    spec = evaluate.parse_pipeline_arg("teacher=/a/b:c/teacher:25:5.0")
    assert (spec.name, spec.path, spec.num_inference_steps, spec.guidance_scale) == ("teacher", "/a/b:c/teacher",
                                                                                      25, 5.0)
    assert spec.nfe == 50 and evaluate.parse_pipeline_arg("s=/x:1:0").nfe == 1
    with pytest.raises(argparse.ArgumentTypeError):
        evaluate.parse_pipeline_arg("no-name-or-steps")


def test_total_variation_known_values():
    assert evaluate.total_variation([3, 1, 0], [3, 1, 0]) == 0.0
    assert evaluate.total_variation([6, 2, 0], [3, 1, 0]) == pytest.approx(0.0)  # counts are normalised
    assert evaluate.total_variation([5, 0, 0], [0, 2, 3]) == pytest.approx(1.0)  # disjoint
    assert evaluate.total_variation([1, 1], [1, 0]) == pytest.approx(0.5)


def fake_samples(seed: int, per_prompt: int = 30, shift: float = 0.0, label_offset: int = 0):
    """Features and predicted classes of 11 prompts as a pipeline's: class prompt k predicted as k + offset."""
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.randn(per_prompt, 4, generator=gen) + shift for _ in range(11)]
    preds = [torch.full((per_prompt,), (k + label_offset) % 10) for k in range(10)]
    preds.append((torch.arange(per_prompt) + label_offset) % 10)
    return feats, preds


def test_teacher_distances_identical_disjoint_and_shifted():
    feats, preds = fake_samples(0)
    same = evaluate.teacher_distances(feats, preds, feats, preds)
    assert same["fid_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert same["class_hist_tv_to_teacher"] == 0.0 and same["mode_hist_tv_to_teacher"] == 0.0
    # every class prompt lands on another digit than the teacher's: disjoint histograms
    _, wrong = fake_samples(0, label_offset=1)
    wrong[10] = torch.zeros(30, dtype=torch.long)  # the class-free prompt collapses onto one digit
    apart = evaluate.teacher_distances(feats, wrong, feats, preds)
    assert apart["class_hist_tv_to_teacher"] == pytest.approx(1.0)
    assert apart["per_class_hist_tv_to_teacher"] == [1.0] * 10
    assert apart["mode_hist_tv_to_teacher"] == pytest.approx(0.9)  # 3 of its 30 teacher samples were zeros
    # FID over the class prompts only: shifting the class-free features changes nothing, shifting all by 1 in
    # each of 4 dims adds 4 to the mean term
    moved = [f + 1.0 for f in feats]
    assert evaluate.teacher_distances(moved, preds, feats, preds)["fid_to_teacher"] == pytest.approx(4.0, rel=1e-6)
    assert evaluate.teacher_distances(feats[:10] + [moved[10]], preds, feats, preds)["fid_to_teacher"] == \
        pytest.approx(0.0, abs=1e-6)


def test_reference_selection():
    assert evaluate.select_reference(["adp", "teacher", "dmdx"]) == "teacher"
    assert evaluate.select_reference(["init", "dmdx"]) == "init"
    assert evaluate.select_reference(["teacher", "dmdx"], "dmdx") == "dmdx"
    with pytest.raises(ValueError, match="nope"):
        evaluate.select_reference(["teacher", "dmdx"], "nope")
    args = evaluate.parse_args(["--pipeline", f"s={TEACHER}:1:0", "--pipeline", f"teacher={TEACHER}:25:5"])
    assert args.reference == "teacher"
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--pipeline", f"s={TEACHER}:1:0", "--reference", "teacher"])


def fake_result(seed: int, **kwargs) -> dict:
    feats, preds = fake_samples(seed, **kwargs)
    return {"metrics": evaluate.score_features(feats, preds, torch.randn(60, 4)) | {
        "num_inference_steps": 1, "guidance_scale": 0.0, "nfe": 1, "seconds_per_image": 0.01,
        "num_images_per_prompt": 30, "num_class_free_images": 30}, "feats": feats, "preds": preds}


def test_failed_pipeline_is_marked_and_the_others_are_reported():
    specs = [evaluate.PipelineSpec(n, f"/x/{n}", 1, 0.0) for n in ("student", "teacher", "broken", "copy")]

    def evaluate_one(spec):
        if spec.name == "broken":
            raise RuntimeError("CUDA out of memory")
        return fake_result(0, shift=3.0) if spec.name == "student" else fake_result(0)

    results, errors = evaluate.run_pipelines(specs, evaluate_one)
    assert list(results) == ["student", "teacher", "copy"] and errors == {"broken": "RuntimeError: CUDA out of memory"}
    report = evaluate.build_report(specs, results, errors, "teacher")
    assert list(report) == ["student", "teacher", "broken", "copy"]
    assert report["broken"]["error"] == "RuntimeError: CUDA out of memory" and report["broken"]["nfe"] == 1
    assert all(report["teacher"][k] is None for k in evaluate.TEACHER_METRIC_KEYS)  # no distance to itself
    assert report["copy"]["fid_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert report["student"]["fid_to_teacher"] == pytest.approx(9.0 * 4, rel=1e-6)  # every feature shifted by 3
    assert report["copy"]["class_hist_tv_to_teacher"] == 0.0
    assert report["teacher"]["diversity"] == 1.0 and report["student"]["reference_pipeline"] == "teacher"
    assert list(report["student"])[:4] == ["fid_to_teacher", "class_hist_tv_to_teacher", "mode_hist_tv_to_teacher",
                                           "digit_fid"]
    real_row = {"digit_fid": 1.0, "mode_entropy": 1.0, "modes_covered": 10, "diversity": 1.0}
    md = evaluate.markdown_table(report, real_row, "teacher")
    header = md.splitlines()[0]
    assert header.index("FID to teacher") < header.index("digit-FID (real)")
    assert "| broken | 1 | 0 | 1 | failed: RuntimeError: CUDA out of memory |" in md
    assert "| teacher | 1 | 0 | 1 | ref. | ref. | ref. |" in md and "| copy | 1 | 0 | 1 | 0.00 | 0.000 | 0.000 |" in md
    # the reference itself failed: the others still get their own metrics, without distances
    report = evaluate.build_report(specs, {k: v for k, v in results.items() if k != "teacher"},
                                   dict(errors, teacher="OSError: gone"), "teacher")
    assert report["copy"]["fid_to_teacher"] is None and report["copy"]["digit_fid"] >= 0
    assert "failed, so there are no teacher-referenced" in evaluate.markdown_table(report, real_row, "teacher")


def synthetic_report(fid: float, tv: float, student_error: bool = False) -> dict:
    teacher = {"fid_to_teacher": None, "class_hist_tv_to_teacher": None, "mode_hist_tv_to_teacher": None,
               "digit_fid": 5.0, "prompt_accuracy": 1.0, "mode_entropy": 0.9, "modes_covered": 9, "diversity": 1.0,
               "nfe": 50, "seconds_per_image": 0.02, "per_class_accuracy": [1.0] * 10, "num_inference_steps": 25,
               "guidance_scale": 3.0, "pipeline_class": "StableDiffusionXLPipeline", "reference_pipeline": "teacher",
               "path": f"/run{fid}/teacher", "training_cost": None}
    student = teacher | {"fid_to_teacher": fid, "class_hist_tv_to_teacher": tv, "mode_hist_tv_to_teacher": tv / 2,
                         "digit_fid": 2 * fid, "modes_covered": 8, "nfe": 1, "num_inference_steps": 1,
                         "guidance_scale": 0.0, "training_cost": {"distillation_seconds": 10 * fid}}
    if student_error:
        student = {"error": "OSError: no weights", "nfe": 1, "num_inference_steps": 1, "guidance_scale": 0.0}
    return {"teacher": teacher, "dmdx": student}


def test_aggregate_reports_mean_and_sd():
    reports = [synthetic_report(1.0, 0.1), synthetic_report(2.0, 0.2), synthetic_report(3.0, 0.3),
               synthetic_report(9.0, 0.9, student_error=True)]
    agg = evaluate.aggregate_reports(reports)
    assert list(agg) == ["teacher", "dmdx"]
    s, t = agg["dmdx"], agg["teacher"]
    assert (s["num_runs"], s["failed_runs"], t["num_runs"], t["failed_runs"]) == (3, 1, 4, 0)
    assert s["fid_to_teacher"] == {"mean": pytest.approx(2.0), "sd": pytest.approx(1.0), "n": 3}  # failed run left out
    assert s["class_hist_tv_to_teacher"]["mean"] == pytest.approx(0.2)
    assert s["digit_fid"]["sd"] == pytest.approx(2.0) and s["modes_covered"]["mean"] == 8.0
    assert s["training_cost.distillation_seconds"]["mean"] == pytest.approx(20.0)  # nested fields flattened
    assert t["fid_to_teacher"] is None and t["digit_fid"] == {"mean": 5.0, "sd": 0.0, "n": 4}
    assert t["pipeline_class"] == "StableDiffusionXLPipeline" and "path" not in t  # differing strings dropped
    assert "per_class_accuracy" not in t and list(s)[0] == "fid_to_teacher"
    assert evaluate.aggregate_reports([synthetic_report(1.0, 0.1)])["dmdx"]["fid_to_teacher"]["sd"] is None


def test_aggregate_cli_writes_mean_sd_tables(tmp_path):
    paths = []
    for i, fid in enumerate((1.0, 3.0)):
        paths.append(str(tmp_path / f"report{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(synthetic_report(fid, 0.1 * fid), f)
    out = tmp_path / "agg"
    evaluate.main(["--aggregate", *paths, "--output_dir", str(out)])
    agg = json.loads((out / "report.json").read_text())
    assert agg["dmdx"]["fid_to_teacher"]["mean"] == pytest.approx(2.0)
    md = (out / "report.md").read_text()
    assert "| dmdx | 1 | 0 | 1 | 2.00 ± 1.41 | 0.200 ± 0.141 |" in md and "| teacher | 25 | 3 | 50 | ref. |" in md
    assert "over 2 reports" in md
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--aggregate", str(tmp_path / "missing.json")])


@pytest.mark.slow
def test_evaluate_subprocess_on_committed_teacher(tmp_path):
    """Two real pipelines, an exact copy of the reference (same prompts and seeds: distances exactly 0), and a broken
    folder in between: the report holds the others, marks the failure, and the exit code says so."""
    assert os.path.isfile(os.path.join(TEACHER, "model_index.json")), "the committed digits teacher is missing"
    broken = tmp_path / "broken"
    broken.mkdir()  # a pipeline folder whose UNet has no config: fails at load
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    out = tmp_path / "eval"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, os.path.join(ROOT, "distill_scripts", "evaluate.py"),
           "--pipeline", f"teacher={TEACHER}:25:5.0", "--pipeline", f"teacher_2steps={TEACHER}:2:0",
           "--pipeline", f"broken={broken}:1:0", "--pipeline", f"copy_2steps={TEACHER}:2:0",
           "--reference", "teacher_2steps", "--num_images_per_prompt", "4", "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 4 pipelines failed (broken)" in proc.stderr, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["teacher", "teacher_2steps", "broken", "copy_2steps"]
    assert "error" in report["broken"] and report["broken"]["path"] == str(broken)
    done = {name: r for name, r in report.items() if name != "broken"}
    for name, r in done.items():
        assert "error" not in r, name
        for key in evaluate.METRIC_KEYS:
            assert key in r, (name, key)
        assert list(r)[:3] == list(evaluate.TEACHER_METRIC_KEYS) and r["reference_pipeline"] == "teacher_2steps"
        assert np.isfinite(r["digit_fid"]) and r["digit_fid"] >= 0
        assert 0.0 <= r["prompt_accuracy"] <= 1.0 and 0.0 <= r["mode_entropy"] <= 1.0
        assert 0 <= r["modes_covered"] <= 10 and sum(r["class_free_class_counts"]) == 4
        assert r["seconds_per_image"] > 0 and r["diversity"] > 0
        assert r["pipeline_class"] == "StableDiffusionXLPipeline"
    assert report["teacher"]["nfe"] == 50 and report["teacher_2steps"]["nfe"] == 2
    assert report["teacher_2steps"]["diversity"] == pytest.approx(1.0)
    # the reference has no distance to itself; its copy, sampled with the same seeds, is at distance 0
    assert all(report["teacher_2steps"][k] is None for k in evaluate.TEACHER_METRIC_KEYS)
    assert report["copy_2steps"]["fid_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert report["copy_2steps"]["class_hist_tv_to_teacher"] == 0.0
    assert report["copy_2steps"]["mode_hist_tv_to_teacher"] == 0.0
    # the 25-step CFG teacher is far from its own 2-step, unguided samples
    assert report["teacher"]["fid_to_teacher"] > 1.0 and 0 < report["teacher"]["class_hist_tv_to_teacher"] <= 1
    assert 0 <= report["teacher"]["mode_hist_tv_to_teacher"] <= 1
    # the teacher at 25 steps with CFG follows the prompts far better than chance (0.1)
    assert report["teacher"]["prompt_accuracy"] >= 0.6
    md = (out / "report.md").read_text()
    assert "| teacher |" in md and "| teacher_2steps |" in md and "| broken | 1 | 0 | 1 | failed: " in md
    header = md.splitlines()[0]
    assert header.index("FID to teacher") < header.index("digit-FID (real)")
    from PIL import Image

    with Image.open(out / "samples.png") as im:  # rows of the pipelines that finished
        assert im.size[0] > 500 and im.size[1] > 100
