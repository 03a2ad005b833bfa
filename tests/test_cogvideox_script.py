"""distill_scripts/train_adm_cogvideox.py on tiny CogVideoX teachers, launched as users launch it.

One session fixture saves two tiny teachers with ``save_pretrained``: a CogVideoX-2b-style one (sin-cos positional
embeddings, 226 T5 tokens) and a CogVideoX-5b-style one (rotary embeddings, 48 T5 tokens); 9 frames at 16x16 px,
latents (5, 4, 8, 8). The subprocess runs are the README's recipes (distill_scripts/recipes/cogvideox_2b, _5b) with
tiny sizes; the exported folders are then loaded by stock diffusers in a process that never imports dmdx.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_ACCELERATE_CONFIG, recipe_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "distill_scripts" / "train_adm_cogvideox.py"
PROMPTS = ["a red circle moving right", "a blue square", "a green cat", "the digit 3 spinning", "a small house"]
TIMESTEPS = [999.0, 874.0, 749.0, 624.0, 499.0, 374.0, 249.0, 124.0]

pytestmark = pytest.mark.slow






@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    from diffusers import CogVideoXPipeline

    from dmdx.pipelines.tiny_components import cogvideox_components

    root = tmp_path_factory.mktemp("cogvideox_script")
    CogVideoXPipeline(**cogvideox_components(use_rotary_positional_embeddings=False, max_text_length=226)
                      ).save_pretrained(root / "cog2b")
    CogVideoXPipeline(**cogvideox_components()).save_pretrained(root / "cog5b")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "cpu.yaml").write_text(CPU_ACCELERATE_CONFIG)
    return root


# What makes a recipe tiny: the tiny teachers' sizes, a CPU run of a few steps (later flags win).
TINY = ["--num_frames", "9", "--height", "16", "--width", "16", "--mixed_precision", "no", "--report_to", "none",
        "--discriminator_head_channels", "16", "--gradient_accumulation_steps", "1", "--validation_prompts",
        "a red circle", "a cat"]


def _recipe(workdir, recipe: str, teacher: str, output_dir: str, *overrides):
    """``bash distill_scripts/recipes/<recipe>/train.sh`` (the documented real recipe) on a tiny teacher, on CPU."""
    env = recipe_env(workdir / "hf_home", CONFIG=workdir / "cpu.yaml", TEACHER=teacher, PROMPTS="prompts.txt",
                     OUTPUT_DIR=output_dir)
    cmd = ["bash", str(REPO / "distill_scripts" / "recipes" / recipe / "train.sh"), *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{recipe} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


# Runs in a fresh interpreter that never imports dmdx: stock diffusers only. Per folder: the pipeline, its scheduler's
# timesteps, a video at the trained size; for a LoRA student also the teacher + load_lora_weights vs the fused student.
CHECKER = r"""
import json, sys
import torch
from diffusers import DiffusionPipeline
results = {}
for student_dir, teacher_dir, lora in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(student_dir)
    pipe.set_progress_bar_config(disable=True)
    video = pipe("a red circle", num_inference_steps=8, guidance_scale=0.0, height=16, width=16, num_frames=9,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    result = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
              "timesteps": pipe.scheduler.timesteps.tolist(), "video_shape": list(video.shape),
              "finite": bool(torch.isfinite(video).all())}
    if lora:
        teacher = DiffusionPipeline.from_pretrained(teacher_dir)
        g = torch.Generator().manual_seed(1)
        x, text = torch.randn(2, 5, 4, 8, 8, generator=g), torch.randn(2, 48, 32, generator=g)
        rotary = pipe._prepare_rotary_positional_embeddings(16, 16, 5, "cpu")
        t = torch.tensor([700.0, 250.0])
        def run(transformer):
            with torch.no_grad():
                return transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, image_rotary_emb=rotary,
                                   return_dict=False)[0]
        before = run(teacher.transformer)
        teacher.load_lora_weights(student_dir)
        after = run(teacher.transformer)
        result["lora_change"] = (after - before).abs().max().item()
        result["lora_vs_fused"] = (after - run(pipe.transformer)).abs().max().item()
    results[student_dir] = result
results["dmdx_imported"] = any(m == "dmdx" or m.startswith("dmdx.") for m in sys.modules)
print("RESULT" + json.dumps(results))
"""


def _check_exports(workdir, folders):
    """``folders``: [(student dir, teacher dir, lora)]; checks shared by every export, returns each one's result."""
    spec = json.dumps([[str(s), str(t), lora] for s, t, lora in folders])
    proc = subprocess.run([sys.executable, "-c", CHECKER, spec], cwd=workdir, env=recipe_env(workdir / "hf_home"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert results.pop("dmdx_imported") is False
    for student, _, _ in folders:
        result = results[str(student)]
        assert result["pipeline"] == "CogVideoXPipeline" and result["scheduler"] == "CogVideoXDDIMScheduler"
        assert result["video_shape"] == [1, 9, 3, 16, 16] and result["finite"]
        # one source of truth: the shipped scheduler runs exactly the trained timesteps, and the card shows them
        config = json.loads((student / "training_config.json").read_text())
        assert result["timesteps"] == config["student_timesteps"] == TIMESTEPS
        scheduler = json.loads((student / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["timestep_spacing"] == "trailing" and scheduler["prediction_type"] == "v_prediction"
        card = (student / "README.md").read_text()
        assert "pipeline_tag: text-to-video" in card and str([int(t) for t in TIMESTEPS]) in card
        assert "height=16, width=16, num_frames=9" in card and ".frames[0]" in card and "samples/grid.gif" in card
    return results


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def runs(workdir):
    """Both recipes on their tiny teachers, once: (2b ADM full output, 5b DMD LoRA output, the 5b run's log)."""
    # CogVideoX-2b recipe: full generator and fake score, ADM, gradient checkpointing, on the sin-cos teacher
    _recipe(workdir, "cogvideox_2b", "cog2b", "full", "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--validation_steps", "2", "--discriminator_warmup_steps", "1", "--generator_lr", "1e-3")
    # CogVideoX-5b recipe with LoRA roles and DMD2's loss, embeddings precomputed, on the rotary teacher
    proc = _recipe(workdir, "cogvideox_5b", "cog5b", "lora_dmd", "--lora_rank", "4", "--fake_score_lora_rank", "4",
                   "--distribution_loss", "dmd", "--fake_score_update_ratio", "1", "--max_sequence_length", "48",
                   "--precompute_text_embeddings", "--discriminator_warmup_steps", "0", "--max_train_steps", "1",
                   "--checkpointing_steps", "1", "--generator_lr", "1e-3")
    return workdir / "full", workdir / "lora_dmd", proc.stderr + proc.stdout


def test_cogvideox_2b_recipe_full_adm(workdir, runs):
    """Full fine-tuning with ADM: checkpoints with D heads, changed weights, the resolved video size in
    training_config.json, a GIF validation strip, GIF samples and the video card."""
    out = runs[0]
    assert (out / "checkpoint-2" / "model_2.safetensors").is_file()  # generator, fake score, D heads
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "CogVideoXPipeline"
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    config = json.loads((out / "training_config.json").read_text())
    assert (config["num_frames"], config["height"], config["width"], config["max_sequence_length"]) == (9, 16, 16, 226)
    assert config["discriminator_blocks"] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert config["gradient_checkpointing"] and config["lora_rank"] == 0
    student, teacher = _tensors(out / "transformer" / "diffusion_pytorch_model.safetensors"), _tensors(
        workdir / "cog2b" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert student.keys() == teacher.keys() and any(not torch.equal(student[k], teacher[k]) for k in student)

    from PIL import Image

    gif = Image.open(out / "validation" / "step-000002.gif")  # frame t shows both prompts' frame t
    assert gif.n_frames == 9 and gif.size == (32, 16)
    assert Image.open(out / "samples" / "0.gif").n_frames == 9
    card = (out / "README.md").read_text()
    assert "8-step video student" in card and "export_to_gif" in card
    assert "| frames x height x width | `9x16x16` |" in card


def test_cogvideox_5b_recipe_lora_dmd_baseline(runs):
    """DMD2's loss with LoRA roles: no discriminator, LoRA weights, the LoRA video card."""
    out, log = runs[1], runs[2]
    assert "no discriminator (dmd)" in log
    assert not (out / "checkpoint-1" / "model_2.safetensors").exists()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    config = json.loads((out / "training_config.json").read_text())
    assert config["distribution_loss"] == "dmd" and config["lora_rank"] == 4 and config["method"] == "dmd"
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "max_sequence_length=48" in card and "dmd2" in card


def test_exports_load_in_stock_diffusers(workdir, runs):
    """Both exported folders in a process that never imports dmdx: 8-step videos of the trained size from
    ``DiffusionPipeline.from_pretrained``; the LoRA loads onto the teacher and equals the fused student."""
    full, lora, _ = runs
    results = _check_exports(workdir, [(full, workdir / "cog2b", False), (lora, workdir / "cog5b", True)])
    assert results[str(lora)]["lora_change"] > 1e-6  # the LoRA changes the teacher's output ...
    assert results[str(lora)]["lora_vs_fused"] < 1e-4  # ... and teacher + LoRA == the exported (fused) student


def test_resume_with_other_frames_is_refused(workdir, runs, monkeypatch):
    """A resumed run must keep the frames and size it started with (the checkpoint's provenance), checked before any
    weights load."""
    import diffusers

    from dmdx.training.errors import UsageError

    spec = importlib.util.spec_from_file_location("train_adm_cogvideox", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def no_weights(*_args, **_kwargs):
        raise AssertionError("model weights were loaded before the error")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(no_weights))
    args = module.parse_args(["--pretrained_model_name_or_path", str(workdir / "cog2b"), "--prompts_file",
                              str(workdir / "prompts.txt"), "--output_dir", str(workdir / "full"), "--height", "16",
                              "--width", "16", "--num_frames", "5", "--max_train_steps", "4",
                              "--resume_from_checkpoint", "latest"])
    with pytest.raises(UsageError, match="num_frames: checkpoint 9, this run 5"):
        module.main(args)
