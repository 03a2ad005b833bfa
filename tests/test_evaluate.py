"""distill_scripts/evaluate.py: its metrics on known inputs, and a subprocess run on the committed digits teacher."""

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


@pytest.mark.slow
def test_evaluate_subprocess_on_committed_teacher(tmp_path):
    assert os.path.isfile(os.path.join(TEACHER, "model_index.json")), "the committed digits teacher is missing"
    out = tmp_path / "eval"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, os.path.join(ROOT, "distill_scripts", "evaluate.py"),
           "--pipeline", f"teacher={TEACHER}:25:5.0", "--pipeline", f"teacher_2steps={TEACHER}:2:0",
           "--num_images_per_prompt", "4", "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["teacher", "teacher_2steps"]
    for name, r in report.items():
        for key in evaluate.METRIC_KEYS:
            assert key in r, (name, key)
        assert np.isfinite(r["digit_fid"]) and r["digit_fid"] >= 0
        assert 0.0 <= r["prompt_accuracy"] <= 1.0 and 0.0 <= r["mode_entropy"] <= 1.0
        assert 0 <= r["modes_covered"] <= 10 and sum(r["class_free_class_counts"]) == 4
        assert r["seconds_per_image"] > 0 and r["diversity"] > 0
        assert r["pipeline_class"] == "StableDiffusionXLPipeline"
    assert report["teacher"]["nfe"] == 50 and report["teacher_2steps"]["nfe"] == 2
    assert report["teacher"]["diversity"] == pytest.approx(1.0)
    # the teacher at 25 steps with CFG follows the prompts far better than chance (0.1)
    assert report["teacher"]["prompt_accuracy"] >= 0.6
    md = (out / "report.md").read_text()
    assert "| teacher |" in md and "| teacher_2steps |" in md and "digit-FID" in md
    from PIL import Image

    with Image.open(out / "samples.png") as im:
        assert im.size[0] > 500 and im.size[1] > 100
