"""`make demo`'s script in its --quick form: every stage runs (the real scripts, as subprocesses) and the outputs
a user looks for are there and load with stock diffusers."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "distill_scripts"))

pytestmark = pytest.mark.slow


def run_demo(tmp_path, out, *args) -> subprocess.CompletedProcess:
    """demo.py --quick as a user runs it (offline, its own HF_HOME); fails the test with its output if it fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "distill_scripts", "demo.py"), "--quick",
                           "--output_dir", str(out), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_demo_quick_end_to_end(tmp_path):
    import evaluate

    out = tmp_path / "demo_output"
    proc = run_demo(tmp_path, out)
    for stage in ("[1/6] collect_ode_pairs", "[2/6] adp", "[3/6] adm", "[4/6] dmd", "[5/6] evaluate"):
        assert stage in proc.stdout

    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["teacher", "adp", "dmd2", "dmdx"]
    for name, r in report.items():
        assert all(k in r for k in evaluate.METRIC_KEYS), name
        assert 0 <= r["prompt_accuracy"] <= 1 and 0 <= r["mode_entropy"] <= 1
    assert (report["teacher"]["nfe"], report["dmd2"]["nfe"], report["dmdx"]["nfe"]) == (50, 1, 1)
    assert report["dmdx"]["training_cost"]["distillation_seconds"] > 0
    assert (out / "samples.png").stat().st_size > 0 and "| dmdx |" in (out / "report.md").read_text()
    commands = (out / "commands.sh").read_text()
    for script in ("collect_ode_pairs.py", "train_adp_sdxl.py", "train_adm_sdxl.py", "evaluate.py"):
        assert script in commands
    assert "--distribution_loss adm" in commands and "--distribution_loss dmd" in commands
    assert commands.count("--validation_prompts") == 2 and "refresh_model_card" in commands

    # the student's Hub card: samples, widget metadata, the comparison table of report.json, a digit prompt
    from huggingface_hub import ModelCard

    readme = (out / "student" / "README.md").read_text()
    widget = ModelCard.load(str(out / "student" / "README.md")).data.widget
    assert len(widget) >= 2 and all(w["text"].startswith("a handwritten digit") for w in widget)
    assert all((out / "student" / w["output"]["url"]).stat().st_size > 0 for w in widget)
    assert (out / "student" / "samples" / "grid.png").is_file() and "![Samples](samples/grid.png)" in readme
    assert "\n| teacher | 25 | 50 | 3 |" in readme and "\n| **dmdx** (this model) | 1 | 1 | 0 |" in readme
    assert "\n| dmd2 |" in readme and "| **dmd2** (this model) |" in (out / "dmd2" / "README.md").read_text()
    usage = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'pipe("{widget[0]["text"]}", num_inference_steps=1' in usage and "a photo of a cat" not in readme
    for text in (readme, (out / "dmd2" / "README.md").read_text()):
        assert str(tmp_path) not in text and os.path.realpath(tmp_path) not in text and ROOT not in text

    # the DMDX student is an ordinary diffusers pipeline that generates in one step
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out / "student"))
    images = pipe("a handwritten digit three", num_inference_steps=1, guidance_scale=0.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


@pytest.mark.heavy  # the --teacher cogvideox test below runs the same demo stages (run_from_teacher) in CI
def test_demo_quick_sd3_end_to_end(tmp_path):
    """`--teacher sd3`: four-step ADM (DMDX's SD3 recipe) and DMD2 with train_adm_sd3.py on the SD3 digits
    teacher, evaluated by the same evaluate.py; the student is a stock StableDiffusion3Pipeline folder."""
    import evaluate

    out = tmp_path / "demo_output_sd3"
    proc = run_demo(tmp_path, out, "--teacher", "sd3")
    for stage in ("[1/4] adm", "[2/4] dmd", "[3/4] evaluate"):
        assert stage in proc.stdout

    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["teacher", "init", "dmd2", "dmdx"]
    for name, r in report.items():
        assert all(k in r for k in evaluate.METRIC_KEYS), name
    assert (report["teacher"]["nfe"], report["init"]["nfe"], report["dmdx"]["nfe"]) == (50, 4, 4)
    assert report["dmdx"]["pipeline_class"] == "StableDiffusion3Pipeline"
    assert report["dmdx"]["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert report["dmdx"]["training_cost"]["distillation_seconds"] > 0
    commands = (out / "commands.sh").read_text()
    assert "train_adm_sd3.py" in commands and "train_adp_sdxl.py" not in commands
    assert "--distribution_loss adm" in commands and "--distribution_loss dmd" in commands
    assert "Teacher `sd3`" in (out / "report.md").read_text()

    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out / "student"))
    images = pipe("a handwritten digit three", num_inference_steps=4, guidance_scale=0.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_demo_quick_cogvideox_end_to_end(tmp_path):
    """`--teacher cogvideox`: eight-step video ADM and DMD2 with train_adm_cogvideox.py on the committed moving-digits
    teacher, evaluated by evaluate.py's video path; the student is a stock CogVideoXPipeline folder."""
    import evaluate

    out = tmp_path / "demo_output_cogvideox"
    proc = run_demo(tmp_path, out, "--teacher", "cogvideox")
    assert "teacher: using the committed distill_scripts/digits/assets/digits-cogvideox-teacher" in proc.stdout
    for stage in ("[1/4] adm", "[2/4] dmd", "[3/4] evaluate"):
        assert stage in proc.stdout

    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["teacher", "init", "dmd2", "dmdx"]
    for name, r in report.items():
        assert all(k in r for k in evaluate.VIDEO_METRIC_KEYS), name
        assert r["num_frames"] == 9 and r["pipeline_class"] == "CogVideoXPipeline"
    assert (report["teacher"]["nfe"], report["init"]["nfe"], report["dmdx"]["nfe"]) == (8, 8, 8)
    assert report["dmdx"]["scheduler_class"] == "CogVideoXDDIMScheduler"
    assert report["dmdx"]["training_cost"]["distillation_seconds"] > 0
    assert (out / "samples.gif").stat().st_size > 0 and "direction acc." in (out / "report.md").read_text()
    commands = (out / "commands.sh").read_text()
    assert "train_adm_cogvideox.py" in commands and "--distribution_loss dmd" in commands
    readme = (out / "student" / "README.md").read_text()
    assert "| **dmdx** (this model) | 8 | 8 | 0 |" in readme and "direction acc." in readme
    assert "moving" in readme and ".gif" in readme

    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out / "student"))
    frames = pipe("a handwritten digit three moving left", num_inference_steps=8, guidance_scale=0.0,
                  num_frames=9, max_sequence_length=48, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 9, 16, 16, 3) and torch.isfinite(torch.from_numpy(frames)).all()
