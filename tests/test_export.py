"""Export, model card, Hub upload (mocked) and checkpointing helpers (in-process, a few seconds)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import script_env


def _tiny_student(teacher: str, out: str):
    """A stock SDXL folder with the DMDX flow scheduler, written by save_student_pipeline."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    from dmdx.pipelines.export import save_student_pipeline

    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0, solver_order=1,
        final_sigmas_type="zero", timestep_spacing="trailing", num_train_timesteps=1000)
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "keep.txt"), "w").write("other files in the output folder stay")
    return save_student_pipeline(teacher, out, {"unet": unet}, scheduler=scheduler)


def test_export_and_model_card_usage_runs(tiny_sdxl, tmp_path, monkeypatch):
    from dmdx.pipelines.model_card import write_model_card

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the teacher's licence is not looked up on the Hub

    out = str(tmp_path / "student")
    _tiny_student(tiny_sdxl, out)
    assert os.path.isfile(os.path.join(out, "model_index.json")) and os.path.isfile(os.path.join(out, "keep.txt"))
    assert not [n for n in os.listdir(out) if n.startswith(".export")]
    assert not [f for _, _, files in os.walk(out) for f in files if f.endswith((".bin", ".pt", ".pkl"))]

    text = write_model_card(out, base_model="stabilityai/stable-diffusion-xl-base-1.0",
                            pipeline_class="StableDiffusionXLPipeline", num_inference_steps=1, timesteps=[999.0],
                            guidance_scale=0.0, method="dmdx", sample_grid="samples.png",
                            training_details={"resolution": 32})
    assert text == open(os.path.join(out, "README.md")).read()
    assert "base_model: stabilityai/stable-diffusion-xl-base-1.0" in text and "license: other" in text
    assert "DMDX (ADP pre-training + ADM fine-tuning)" in text and "`[999]`" in text
    assert "![Samples](samples.png)" in text and "arxiv.org/abs/2507.18569" in text
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    # no machine path: the snippet loads the folder by its name, from its parent (the Hub id once pushed)
    assert 'from_pretrained("student")' in snippet and "num_inference_steps=1" in snippet
    assert os.path.abspath(out) not in text and str(tmp_path) not in text
    # The usage snippet runs as written (stock diffusers, CPU, from the folder's parent) and writes its image.
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=script_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "sample.png")

    lora = write_model_card(str(tmp_path), base_model="org/base", pipeline_class="StableDiffusionXLPipeline",
                            num_inference_steps=4, timesteps=[999, 749, 499, 249], guidance_scale=0.0,
                            method="adm", lora=True, repo_id="org/student-lora")
    assert 'pipe.load_lora_weights("org/student-lora")' in lora and "LCMScheduler.from_pretrained" in lora
    assert "- lora" in lora and "[999, 749, 499, 249]" in lora
    video = write_model_card(str(tmp_path), base_model="THUDM/CogVideoX-2b", pipeline_class="CogVideoXPipeline",
                             num_inference_steps=8, timesteps=[999, 874], guidance_scale=0.0, method="adm",
                             template="video")
    assert "pipeline_tag: text-to-video" in video and "video student" in video
    with pytest.raises(ValueError, match="Unknown method"):
        write_model_card(str(tmp_path), base_model="b", pipeline_class="P", num_inference_steps=1, timesteps=[1],
                         guidance_scale=0.0, method="sdxl-turbo")


def test_push_to_hub_calls(tmp_path, monkeypatch):
    import huggingface_hub

    from dmdx.pipelines.hub import push_to_hub

    calls = {}

    class Repo:
        repo_id = "me/sdxl-dmdx"

    def fake_create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return Repo()

    def fake_upload_folder(**kwargs):
        calls["upload_folder"] = kwargs

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    with pytest.raises(FileNotFoundError, match="no exported pipeline"):
        push_to_hub(str(tmp_path), "me/sdxl-dmdx")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="README.md"):  # a student is never published without its card
        push_to_hub(str(tmp_path), "me/sdxl-dmdx")
    (tmp_path / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# A student\n")
    assert push_to_hub(str(tmp_path), "me/sdxl-dmdx", token="tok", private=True) == "me/sdxl-dmdx"
    assert calls["create_repo"] == ("me/sdxl-dmdx", {"token": "tok", "private": True, "exist_ok": True})
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/sdxl-dmdx" and upload["folder_path"] == str(tmp_path)
    assert upload["token"] == "tok" and "checkpoint-*" in upload["ignore_patterns"]


def test_checkpointing_atomic_prune_resume_rng(tmp_path):
    from accelerate import Accelerator

    from dmdx.training.checkpointing import (
        NonFiniteLossError,
        check_finite,
        find_resume_checkpoint,
        list_checkpoints,
        save_checkpoint,
    )

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    out = str(tmp_path)
    assert find_resume_checkpoint(out, "latest") is None and find_resume_checkpoint(out, None) is None
    for step in (1, 2, 3):
        save_checkpoint(accelerator, out, step, total_limit=2)
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    os.makedirs(os.path.join(out, "checkpoint-9.tmp"))  # an interrupted save is never resumed from
    assert find_resume_checkpoint(out, "latest").endswith("checkpoint-3")
    assert find_resume_checkpoint(out, "checkpoint-2").endswith("checkpoint-2")
    with pytest.raises(FileNotFoundError):
        find_resume_checkpoint(out, "checkpoint-7")

    # load_state restores the weights and the RNG stream as of the save.
    weights = model.weight.detach().clone()
    expected = torch.randn(4)
    with torch.no_grad():
        model.weight.add_(1.0)
    accelerator.load_state(find_resume_checkpoint(out, "latest"))
    # the checkpoint was saved before `expected` was drawn
    assert torch.equal(model.weight, weights) and torch.equal(torch.randn(4), expected)

    check_finite({"a": torch.tensor(1.0)})
    with pytest.raises(NonFiniteLossError, match="generator_loss"):
        check_finite({"fake_score_loss": torch.tensor(0.5), "generator_loss": torch.tensor(float("nan"))})
