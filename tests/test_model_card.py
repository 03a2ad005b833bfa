"""Model cards: metadata that parses back with a stock ``ModelCard.load``, sample files and widgets, no machine path,
the teacher's licence, the comparison table, the schedule, the usage snippet and the upload folder (mocked Hub)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

PROMPTS = ["a handwritten digit three", "a handwritten digit seven", "a handwritten digit"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the Hub: offline as in CI, and the Hub cache never holds the teacher's card."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)


def _images(n: int, size=(32, 32)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _teacher(tmp_path, card: str | None = "license: openrail++") -> str:
    path = tmp_path / "machine-specific-dir" / "my-teacher"
    path.mkdir(parents=True)
    (path / "model_index.json").write_text("{}")
    if card is not None:
        (path / "README.md").write_text(f"---\n{card}\n---\n\n# A teacher\n")
    return str(path)


def _student(tmp_path, name="student", scheduler=None) -> str:
    out = tmp_path / "runs" / name
    out.mkdir(parents=True)
    (out / "model_index.json").write_text("{}")
    if scheduler is not None:
        scheduler.save_pretrained(str(out / "scheduler"))
    return str(out)


def _snippet(text: str, index: int = 0) -> str:
    return re.findall(r"```python\n(.*?)```", text, re.S)[index]


def _assert_no_machine_path(text: str, *paths: str):
    for p in paths:
        for spelling in {p, os.path.abspath(p), os.path.realpath(p)}:
            assert spelling not in text, spelling
    assert "machine-specific-dir" not in text and "/runs/" not in text


def test_hub_base_model(tmp_path, monkeypatch):
    from dmdx.pipelines.model_card import hub_base_model

    assert hub_base_model("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    local = tmp_path / "org"
    (local / "name").mkdir(parents=True)
    assert hub_base_model(str(local / "name")) is None  # exists locally: a folder, not a Hub id
    monkeypatch.chdir(tmp_path)
    assert hub_base_model("org/name") is None  # the relative path exists
    snapshot = tmp_path / "hub" / "models--THUDM--CogVideoX-2b" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert hub_base_model(str(snapshot)) == "THUDM/CogVideoX-2b"  # a Hub cache snapshot names its repo
    for not_an_id in ("/abs/missing/teacher", "teacher", "a/b/c", "./x/y", "~/x", "org/bad--name", "", None):
        assert hub_base_model(not_an_id) is None, not_an_id


def test_image_card_local_teacher(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from huggingface_hub import ModelCard

    from dmdx.pipelines.model_card import student_schedule, write_model_card

    teacher = _teacher(tmp_path)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.25)
    out = _student(tmp_path, scheduler=scheduler)
    images = _images(4)
    argv = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill_scripts",
                         "train_adm_sd3.py"),
            "--pretrained_model_name_or_path", teacher, f"--output_dir={out}", "--hub_token", "hf_SECRET",
            "--validation_prompts", *PROMPTS, "--cache_dir", str(tmp_path / "machine-specific-dir" / "cache"),
            "--generator_lr", "1e-06"]
    kwargs = dict(base_model=teacher, pipeline_class="StableDiffusion3Pipeline", num_inference_steps=4,
                  guidance_scale=0.0, method="adm", training_command=argv,
                  hyperparameters={"generator lr": 1e-6, "teacher guidance scale": 7.0, "hub_token": "hf_SECRET",
                                   "cache dir": str(tmp_path / "machine-specific-dir" / "cache"), "unset": None},
                  teacher_num_inference_steps=28, teacher_guidance_scale=7.0, teacher_seconds_per_image=2.0,
                  student_seconds_per_image=0.25, hardware="1x test CPU")
    write_model_card(out, sample_images=images, sample_prompts=["old"] * 4, **kwargs)  # an earlier card
    text = write_model_card(out, sample_images=images[:3], sample_prompts=PROMPTS, **kwargs)
    assert text == open(os.path.join(out, "README.md")).read()

    card = ModelCard.load(os.path.join(out, "README.md"))  # a stock loader reads the metadata back
    data = card.data.to_dict()
    assert "base_model" not in data  # a local folder is no Hub id
    assert data["pipeline_tag"] == "text-to-image" and data["library_name"] == "diffusers"
    assert data["license"] == "openrail++"  # inherited from the teacher's card
    assert {"distillation", "dmdx", "adm", "few-step"} <= set(data["tags"]) and "lora" not in data["tags"]
    assert "dmd2" not in data["tags"]
    assert data["widget"] == [{"text": p, "output": {"url": f"samples/{i}.png"}} for i, p in enumerate(PROMPTS)]
    for i, w in enumerate(data["widget"]):  # each sample its own file, at the student's resolution
        with Image.open(os.path.join(out, w["output"]["url"])) as im:
            assert im.size == (32, 32) and np.array_equal(np.asarray(im.convert("RGB")), np.asarray(images[i]))
    assert not os.path.exists(os.path.join(out, "samples", "3.png"))  # stale sample of the earlier card removed
    with Image.open(os.path.join(out, "samples", "grid.png")) as grid:
        assert grid.width > 3 * 32  # tiny samples are shown enlarged

    _assert_no_machine_path(text, teacher, out, str(tmp_path))
    assert "a local teacher (`my-teacher`)" in text and "# ADM 4-step student of a local teacher" in text
    assert "![Samples](samples/grid.png)" in text
    snippet = _snippet(text)
    assert f'pipe("{PROMPTS[0]}", num_inference_steps=4, guidance_scale=0.0)' in snippet
    assert 'DiffusionPipeline.from_pretrained("student")' in snippet and "a photo of a cat" not in text
    # the schedule is the saved scheduler's
    schedule = student_schedule(scheduler, 4)
    assert "`FlowMatchEulerDiscreteScheduler`" in text
    assert f"timesteps: `{[int(t) if t.is_integer() else round(t, 4) for t in schedule['timesteps']]}`" in text
    assert f"sigmas: `{[int(s) if s.is_integer() else round(s, 4) for s in schedule['sigmas']]}`" in text
    assert '"shift_terminal": 0.25' in text
    # the comparison table without a report: steps, NFE (CFG doubles), guidance, seconds, and what is missing
    assert "| teacher (local) | 28 | 56 | 7 | 2 |" in text and "| **this student** | 4 | 4 | 0 | 0.25 |" in text
    assert "14x fewer network evaluations" in text and "8x faster" in text
    assert "python distill_scripts/evaluate.py --prompts_file <prompts.txt> --pipeline " \
           "teacher=<teacher>:STEPS:GUIDANCE --pipeline student=<output_dir>:4:0.0" in text
    # the training command: placeholders for machine paths, no secret, the script as a repo path
    command = re.search(r"```bash\n(accelerate launch .*?)```", text, re.S).group(1)
    assert command.startswith("accelerate launch distill_scripts/train_adm_sd3.py \\\n")
    assert "--pretrained_model_name_or_path <teacher>" in command and "--output_dir=<output_dir>" in command
    assert "--hub_token <token>" in command and "hf_SECRET" not in text and "<cache>" in command
    assert "'a handwritten digit three'" in command and "--generator_lr 1e-06" in command
    assert "| generator lr | `1e-06` |" in text and "| cache dir | `<cache>` |" in text
    assert "| hub_token |" not in text and "| unset |" not in text


def test_image_lora_card_hub_teacher(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from dmdx.pipelines import model_card
    from dmdx.pipelines.model_card import write_model_card

    def no_network(*args, **kwargs):
        raise AssertionError(f"ModelCard.load{args} offline")

    out = _student(tmp_path, "sdxl-lora")
    (tmp_path / "runs" / "sdxl-lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with monkeypatch.context() as m:
        m.setattr(ModelCard, "load", no_network)
        text = write_model_card(out, base_model="stabilityai/stable-diffusion-xl-base-1.0",
                                pipeline_class="StableDiffusionXLPipeline", num_inference_steps=4,
                                timesteps=[999, 749, 499, 249], guidance_scale=0.0, method="dmd", lora=True,
                                scheduler_class="LCMScheduler", sample_images=[np.asarray(i) for i in _images(2)],
                                sample_prompts=PROMPTS[:2], repo_id="me/sdxl-dmd2-lora")
    data = ModelCard.load(os.path.join(out, "README.md")).data.to_dict()
    assert data["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0" and data["license"] == "other"
    assert {"lora", "dmd2", "few-step", "distillation"} <= set(data["tags"]) and "adm" not in data["tags"]
    assert [w["output"]["url"] for w in data["widget"]] == ["samples/0.png", "samples/1.png"]
    assert all(os.path.isfile(os.path.join(out, w["output"]["url"])) for w in data["widget"])
    lora = _snippet(text)
    assert 'StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")' in lora
    assert 'pipe.load_lora_weights("me/sdxl-dmd2-lora")' in lora
    assert 'pipe.scheduler = LCMScheduler.from_pretrained("me/sdxl-dmd2-lora", subfolder="scheduler")' in lora
    assert f'pipe("{PROMPTS[0]}", num_inference_steps=4' in lora and "LoRA adapter" in text
    full = _snippet(text, 1)  # the folder is also a full pipeline (model_index.json): that usage too
    assert 'DiffusionPipeline.from_pretrained("me/sdxl-dmd2-lora")' in full
    _assert_no_machine_path(text, out, str(tmp_path))

    # A local base: the snippet names no path, the metadata no base model.
    teacher = _teacher(tmp_path, card=None)
    text = write_model_card(out, base_model=teacher, pipeline_class="StableDiffusionXLPipeline",
                            num_inference_steps=1, timesteps=[999], guidance_scale=0.0, method="dmdx", lora=True,
                            full_pipeline=False, prompt="a handwritten digit five")
    assert 'StableDiffusionXLPipeline.from_pretrained("<path to the teacher>")' in _snippet(text)
    assert "base_model" not in ModelCard.load(os.path.join(out, "README.md")).data.to_dict()
    assert len(re.findall(r"```python", text)) == 1 and "a handwritten digit five" in _snippet(text)
    _assert_no_machine_path(text, teacher, out, str(tmp_path))
    assert model_card.hub_offline()


def test_video_card_with_evaluation_report(tmp_path):
    from huggingface_hub import ModelCard

    from dmdx.pipelines.model_card import write_model_card

    out = _student(tmp_path, "cogvideox-student")
    teacher = _teacher(tmp_path, card="license: apache-2.0")
    frames = [_images(3, (24, 16)), _images(5, (24, 16))]
    report = {
        "teacher": {"digit_fid": 1.25, "prompt_accuracy": 0.9, "mode_entropy": 0.98, "modes_covered": 10,
                    "diversity": 1.0, "nfe": 100, "seconds_per_image": 3.5, "num_inference_steps": 50,
                    "guidance_scale": 6.0, "path": teacher, "per_class_accuracy": [0.9] * 10,
                    "diversity_raw": 2.0, "num_images_per_prompt": 20, "training_cost": None},
        "dmd2": {"digit_fid": 3.5, "prompt_accuracy": 0.7, "nfe": 8, "seconds_per_image": 0.3,
                 "num_inference_steps": 8, "guidance_scale": 0.0, "path": str(tmp_path / "runs" / "dmd2")},
        "dmdx": {"digit_fid": 2.75, "prompt_accuracy": 0.8, "mode_entropy": 0.95, "modes_covered": 9,
                 "diversity": 0.9, "nfe": 8, "seconds_per_image": 0.3, "num_inference_steps": 8,
                 "guidance_scale": 0.0, "path": out, "training_cost": {"distillation_seconds": 120.0}},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    text = write_model_card(out, base_model=teacher, pipeline_class="CogVideoXPipeline", num_inference_steps=8,
                            timesteps=[999, 874, 749, 624, 499, 374, 249, 124], guidance_scale=0.0, method="adm",
                            scheduler_class="CogVideoXDDIMScheduler", video=True, fps=4, sample_images=frames,
                            sample_prompts=PROMPTS[:2], evaluation_report=str(tmp_path / "report.json"))
    data = ModelCard.load(os.path.join(out, "README.md")).data.to_dict()
    assert data["pipeline_tag"] == "text-to-video" and data["license"] == "apache-2.0"
    assert "text-to-video" in data["tags"] and "base_model" not in data
    assert [w["output"]["url"] for w in data["widget"]] == ["samples/0.gif", "samples/1.gif"]
    for w, clip in zip(data["widget"], frames):
        with Image.open(os.path.join(out, w["output"]["url"])) as gif:
            assert gif.n_frames == len(clip)
    with Image.open(os.path.join(out, "samples", "grid.gif")) as strip:  # the samples side by side, per frame
        assert strip.n_frames == 5 and strip.width > 2 * strip.height
    assert "![Samples](samples/grid.gif)" in text and "video student" in text
    snippet = _snippet(text)
    assert f'pipe("{PROMPTS[0]}", num_inference_steps=8, guidance_scale=0.0).frames[0]' in snippet
    assert 'export_to_gif(frames, "sample.gif", fps=4)' in snippet and ".images[0]" not in snippet
    # the report's rows and metric columns; machine paths and per-class lists stay out
    assert "| pipeline | steps | NFE | guidance | s / image | digit-FID ↓ | prompt acc. ↑ | mode entropy ↑ |" in text
    assert "| teacher | 50 | 100 | 6 | 3.5 | 1.25 | 0.9 | 0.98 | 10 | 1 | – |" in text
    assert "| **dmdx** (this model) | 8 | 8 | 0 | 0.3 | 2.75 | 0.8 | 0.95 | 9 | 0.9 | 120 |" in text
    assert "| dmd2 | 8 | 8 | 0 | 0.3 | 3.5 | 0.7 | – |" in text and "(20 samples per prompt)" in text
    assert "diversity_raw" not in text and "per_class" not in text and "evaluate.py --pipeline" not in text
    assert "python distill_scripts/evaluate.py --pipeline" not in text  # measured: no hint how to measure
    _assert_no_machine_path(text, teacher, out, str(tmp_path))
    with pytest.raises(ValueError, match="not a row"):
        write_model_card(out, base_model=teacher, pipeline_class="CogVideoXPipeline", num_inference_steps=8,
                         timesteps=[999], guidance_scale=0.0, method="adm", video=True, evaluation_report=report,
                         evaluation_name="student")


def test_licence_inheritance(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, constants

    from dmdx.pipelines.model_card import teacher_license, write_model_card

    sd3 = _teacher(tmp_path, card="license: other\nlicense_name: stabilityai-ai-community\nlicense_link: LICENSE.md")
    assert teacher_license(sd3) == {"license": "other", "license_name": "stabilityai-ai-community"}  # local link
    out = _student(tmp_path)
    common = dict(pipeline_class="StableDiffusion3Pipeline", num_inference_steps=4, timesteps=[1000, 750, 500, 250],
                  guidance_scale=0.0, method="adm")
    text = write_model_card(out, base_model=sd3, **common)
    data = ModelCard.load(os.path.join(out, "README.md")).data.to_dict()
    assert data["license"] == "other" and data["license_name"] == "stabilityai-ai-community"
    assert "`stabilityai-ai-community`" in text and "as its model card declares" in text
    # the linked licence text in the local teacher's folder travels with the student, linked relatively
    with open(os.path.join(sd3, "LICENSE.md"), "w") as f:
        f.write("STABILITY AI COMMUNITY LICENSE\n")
    text = write_model_card(out, base_model=sd3, **common)
    data = ModelCard.load(os.path.join(out, "README.md")).data.to_dict()
    assert data["license_link"] == "LICENSE.md" and "([terms](LICENSE.md))" in text
    assert open(os.path.join(out, "LICENSE.md")).read() == "STABILITY AI COMMUNITY LICENSE\n"
    # an explicit licence wins; no card means "other"
    write_model_card(out, base_model=sd3, license="mit", **common)
    assert ModelCard.load(os.path.join(out, "README.md")).data.license == "mit"
    bare = tmp_path / "bare-teacher"
    bare.mkdir()
    assert teacher_license(str(bare)) is None and teacher_license("org/model") is None  # offline: no lookup

    # online, a Hub teacher's card is read and its relative licence link made absolute
    hub_card = ModelCard("---\nlicense: other\nlicense_name: custom\nlicense_link: LICENSE.md\n---\n# t\n")
    loaded = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, repo, **kw: loaded.append(repo) or hub_card))
    assert teacher_license("org/model") == {"license": "other", "license_name": "custom",
                                            "license_link": "https://huggingface.co/org/model/blob/main/LICENSE.md"}
    assert loaded == ["org/model"]
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, repo, **kw: (_ for _ in ()).throw(OSError())))
    assert teacher_license("org/model") is None  # unreachable: the fallback applies, no error


def test_training_command_and_legacy_arguments(tmp_path):
    from dmdx.pipelines.model_card import format_training_command, write_model_card

    out = str(tmp_path / "out")
    cmd = format_training_command(["train.py", "--output_dir", out, "--resume_from_checkpoint",
                                   os.path.join(out, "checkpoint-5"), "--api_key=abc", "--scale", "-1",
                                   "--prompt", "it's"], output_dir=out, teacher=None)
    assert cmd.split(" \\\n  ") == ["accelerate launch train.py", "--output_dir <output_dir>",
                                    "--resume_from_checkpoint <output_dir>/checkpoint-5", "--api_key=<token>",
                                    "--scale -1", "--prompt 'it'\"'\"'s'"]
    os.makedirs(out)
    with pytest.raises(ValueError, match="one prompt per sample"):
        write_model_card(out, base_model="org/base", pipeline_class="P", num_inference_steps=1, timesteps=[999],
                         guidance_scale=0.0, method="adm", sample_images=_images(2), sample_prompts=["one"])
    with pytest.raises(ValueError, match="No timesteps"):
        write_model_card(out, base_model="org/base", pipeline_class="P", num_inference_steps=1, guidance_scale=0.0,
                         method="adm")
    # sample paths: one inside the folder stays, one outside is copied in
    Image.new("RGB", (8, 8), "red").save(tmp_path / "outside.png")
    os.makedirs(os.path.join(out, "validation"))
    Image.new("RGB", (8, 8), "blue").save(os.path.join(out, "validation", "step-10.png"))
    text = write_model_card(out, base_model="org/base", pipeline_class="P", num_inference_steps=1, timesteps=[999],
                            guidance_scale=2.0, method="dmdx", template="image",
                            sample_images=[str(tmp_path / "outside.png"), "validation/step-10.png"],
                            sample_prompts=["red", "blue"], training_details={"resolution": 8})
    assert "url: samples/0.png" in text and "url: validation/step-10.png" in text
    assert os.path.isfile(os.path.join(out, "samples", "0.png")) and "| resolution | `8` |" in text
    assert "Use it with `guidance_scale=2.0`" in text and "| **this student** | 1 | 2 | 2 |" in text
    _assert_no_machine_path(text, out, str(tmp_path))


def test_push_to_hub_uploads_card_and_samples(tmp_path, monkeypatch):
    import huggingface_hub

    from dmdx.pipelines.hub import push_to_hub, upload_file_list
    from dmdx.pipelines.model_card import LOCAL_NOTE, write_model_card

    out = _student(tmp_path, "sdxl-dmdx")
    os.makedirs(os.path.join(out, "checkpoint-10"))
    open(os.path.join(out, "checkpoint-10", "model.safetensors"), "w").write("x")
    calls = {}

    class Repo:
        repo_id = "me/sdxl-dmdx"

    def fake_create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return Repo()

    def fake_upload_folder(**kwargs):  # what would be sent, as upload_folder filters it
        calls["uploaded"] = upload_file_list(kwargs["folder_path"], kwargs["ignore_patterns"],
                                             kwargs.get("allow_patterns"))
        calls["readme"] = open(os.path.join(kwargs["folder_path"], "README.md")).read()

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    with pytest.raises(FileNotFoundError, match="README.md"):
        push_to_hub(out, "sdxl-dmdx")
    text = write_model_card(out, base_model="org/base", pipeline_class="StableDiffusionXLPipeline",
                            num_inference_steps=1, timesteps=[999], guidance_scale=0.0, method="dmdx",
                            sample_images=_images(2), sample_prompts=PROMPTS[:2])  # no repo id: the local folder
    assert LOCAL_NOTE in text
    os.remove(os.path.join(out, "samples", "1.png"))
    with pytest.raises(FileNotFoundError, match="samples/1.png"):
        push_to_hub(out, "sdxl-dmdx")
    assert "create_repo" not in calls  # checked before any network call
    write_model_card(out, base_model="org/base", pipeline_class="StableDiffusionXLPipeline", num_inference_steps=1,
                     timesteps=[999], guidance_scale=0.0, method="dmdx", sample_images=_images(2),
                     sample_prompts=PROMPTS[:2])

    assert push_to_hub(out, "sdxl-dmdx", token="tok") == "me/sdxl-dmdx"
    assert calls["create_repo"] == ("sdxl-dmdx", {"token": "tok", "private": False, "exist_ok": True})
    uploaded = set(calls["uploaded"])
    assert {"README.md", "model_index.json", "samples/0.png", "samples/1.png", "samples/grid.png"} <= uploaded
    assert not any(f.startswith("checkpoint-") for f in uploaded)
    readme = calls["readme"]  # the snippet now loads the Hub repo
    assert 'DiffusionPipeline.from_pretrained("me/sdxl-dmdx")' in readme and LOCAL_NOTE not in readme
    from huggingface_hub import ModelCard

    widget = ModelCard.load(os.path.join(out, "README.md")).data.widget
    assert {w["output"]["url"] for w in widget} <= uploaded


def test_refresh_model_card_from_a_finished_student(tmp_path):
    """A student folder as the export path leaves it, its card rendered again with an evaluation report measured
    afterwards: the same samples, prompt, command and hyperparameters, now with the comparison table."""
    from diffusers import LCMScheduler
    from huggingface_hub import ModelCard

    from dmdx.pipelines.model_card import refresh_model_card, write_model_card

    teacher = _teacher(tmp_path)
    out = _student(tmp_path, "student", scheduler=LCMScheduler())
    (tmp_path / "runs" / "student" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    adp = str(tmp_path / "machine-specific-dir" / "adp")
    config = {"pretrained_model_name_or_path": teacher, "pretrained_generator_name_or_path": adp,
              "output_dir": out, "validation_prompts": PROMPTS, "resolution": 16, "max_train_steps": 3,
              "train_batch_size": 4, "guidance_scale": 3.0, "ode_step_dt": 1 / 64, "lora_rank": 0,
              "fake_score_lora_rank": 0, "hub_model_id": None, "hub_token": None, "method": "dmdx",
              "num_student_steps": 1, "student_scheduler": "LCMScheduler"}
    (tmp_path / "runs" / "student" / "training_config.json").write_text(json.dumps(config))
    argv = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill_scripts",
                         "train_adm_sdxl.py"), "--pretrained_model_name_or_path", teacher,
            "--pretrained_generator_name_or_path", adp, "--validation_prompts", *PROMPTS, "--output_dir", out]
    hyper = {"resolution": 16, "generator updates": 3, "batch size per device": 4, "teacher guidance scale": 3.0,
             "ODE step dt": 1 / 64, "generator": "full", "fake score": "full"}
    exported = write_model_card(out, base_model=teacher, pipeline_class="StableDiffusionXLPipeline",
                                num_inference_steps=1, guidance_scale=0.0, method="dmdx", sample_images=_images(3),
                                sample_prompts=PROMPTS, training_command=argv, hyperparameters=hyper)
    report = {"teacher": {"nfe": 50, "num_inference_steps": 25, "guidance_scale": 3.0, "digit_fid": 1.5,
                          "path": teacher},
              "dmdx": {"nfe": 1, "num_inference_steps": 1, "guidance_scale": 0.0, "digit_fid": 2.5, "path": out,
                       "training_cost": {"distillation_seconds": 12.0}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    before = {f: open(os.path.join(out, "samples", f), "rb").read() for f in ("0.png", "1.png", "2.png")}

    text = refresh_model_card(out, evaluation_report=str(tmp_path / "report.json"), evaluation_name="dmdx")
    assert text == open(os.path.join(out, "README.md")).read()
    data = ModelCard.load(os.path.join(out, "README.md")).data.to_dict()
    assert data["widget"] == [{"text": p, "output": {"url": f"samples/{i}.png"}} for i, p in enumerate(PROMPTS)]
    assert {f: open(os.path.join(out, "samples", f), "rb").read() for f in before} == before  # kept as they were
    assert os.path.isfile(os.path.join(out, "samples", "grid.png")) and "![Samples](samples/grid.png)" in text
    assert "| teacher | 25 | 50 | 3 | 1.5 | – |" in text and "| **dmdx** (this model) | 1 | 1 | 0 | 2.5 | 12 |" in text
    assert "| teacher (local) |" not in text  # the report replaces the table without one
    # what did not change: title, usage prompt, schedule, the command and the hyperparameters of the export
    same = ("# DMDX 1-step student of a local teacher", f'pipe("{PROMPTS[0]}", num_inference_steps=1',
            "`LCMScheduler`", "| ODE step dt | `0.015625` |", "| generator | `full` |", "| resolution | `16` |")
    assert all(s in exported and s in text for s in same)
    command = re.compile(r"```bash\n(accelerate launch .*?)```", re.S)
    assert command.search(text).group(1) == command.search(exported).group(1)
    assert "--pretrained_generator_name_or_path <adp>" in text and "'a handwritten digit three'" in text
    _assert_no_machine_path(text, teacher, out, adp, str(tmp_path))

    # no card left: samples from the run's validation prompts, no command; a LoRA names the weights it adapts
    os.remove(os.path.join(out, "README.md"))
    (tmp_path / "runs" / "student" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    config.update(pretrained_generator_name_or_path="org/sdxl-adp", lora_rank=8, hub_model_id="me/sdxl-dmdx")
    (tmp_path / "runs" / "student" / "training_config.json").write_text(json.dumps(config))
    text = refresh_model_card(out)
    data = ModelCard.load(os.path.join(out, "README.md")).data.to_dict()
    assert data["base_model"] == "org/sdxl-adp" and "lora" in data["tags"]
    assert [w["text"] for w in data["widget"]] == PROMPTS and "Launched with" not in text
    assert 'pipe.load_lora_weights("me/sdxl-dmdx")' in text and "| generator | `LoRA r=8` |" in text
    with pytest.raises(FileNotFoundError, match="training_config.json"):
        refresh_model_card(str(tmp_path / "runs"))


def test_refresh_model_card_architecture_extras(tmp_path):
    """An SD3 student trained with --drop_t5: the refreshed card keeps the adapter's loading arguments."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dmdx.pipelines.model_card import refresh_model_card

    out = _student(tmp_path, "sd3-student", scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    (tmp_path / "runs" / "sd3-student" / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "runs" / "sd3-student" / "transformer").mkdir()
    (tmp_path / "runs" / "sd3-student" / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "SD3Transformer2DModel"}))
    (tmp_path / "runs" / "sd3-student" / "training_config.json").write_text(json.dumps(
        {"pretrained_model_name_or_path": "stabilityai/stable-diffusion-3-medium-diffusers", "method": "adm",
         "num_student_steps": 4, "drop_t5": True, "shift_terminal": 0.25, "max_sequence_length": 256}))
    text = refresh_model_card(out)
    assert 'from_pretrained("sd3-student", text_encoder_3=None, tokenizer_3=None)' in _snippet(text)
    assert "## Without T5" in text and "base_model: stabilityai/stable-diffusion-3-medium-diffusers" in text


def test_indefinite_article_before_step_counts():
    from dmdx.pipelines.model_card import indefinite_article

    assert [indefinite_article(n) for n in (1, 4, 8, 11, 18, 25, 80, 111)] == \
        ["a", "a", "an", "an", "an", "a", "an", "a"]


def _finished_student(tmp_path, name: str, config: dict, lora: bool = False, dtype=None, variant=None) -> str:
    """A student folder as export leaves it: model_index.json, a scheduler, a denoiser's safetensors (in ``dtype``,
    file named with ``variant``), the teacher's VAE / text encoder folders, training_config.json, LoRA weights."""
    import torch
    from diffusers import LCMScheduler
    from safetensors.torch import save_file

    out = _student(tmp_path, name, scheduler=LCMScheduler())
    root = tmp_path / "runs" / name
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    for sub in ("unet", "vae", "text_encoder"):
        (root / sub).mkdir()
        (root / sub / "config.json").write_text("{}")
    weights = f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors"
    save_file({"w": torch.zeros(2, dtype=dtype or torch.float32)}, str(root / "unet" / weights))
    save_file({"w": torch.zeros(2)}, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    (root / "training_config.json").write_text(json.dumps(config))
    if lora:
        save_file({"lora.w": torch.zeros(2)}, str(root / "pytorch_lora_weights.safetensors"))
    return out


def general_report(student_path: str, teacher_path: str) -> dict:
    """report.json of evaluate.py's general mode (the keys it writes), for a teacher, a second seed and a student."""
    common = {"prompt_set": "coco2014_val_captions.txt, first 1000 prompts", "dinov2_model": "facebook/dinov2-large",
              "clip_model": "openai/clip-vit-large-patch14", "pickscore_model": None, "num_prompts": 1000,
              "num_images_per_prompt": 2, "num_images": 2000, "reference_pipeline": "teacher", "torch_dtype": "fp16",
              "diversity_raw": 30.0, "pipeline_class": "StableDiffusionXLPipeline", "seed": 0}
    row = {"fd_dinov2_to_teacher": None, "fd_clip_to_teacher": None, "fd_dinov2_real": None, "clip_score": 31.9,
           "pickscore": None, "diversity": 1.0, "nfe": 50, "seconds_per_image": 3.1, "peak_memory_gb": 10.2,
           "num_inference_steps": 25, "guidance_scale": 5.0, "path": teacher_path}
    return {"teacher": row | common,
            "teacher_seed1": row | common | {"fd_dinov2_to_teacher": 41.7, "fd_clip_to_teacher": 0.8, "seed": 1},
            "student": row | common | {"fd_dinov2_to_teacher": 212.4, "fd_clip_to_teacher": 3.25, "clip_score": 30.6,
                                      "diversity": 0.74, "nfe": 1, "seconds_per_image": 0.12, "num_inference_steps": 1,
                                      "guidance_scale": 0.0, "path": student_path}}


def test_refresh_model_card_from_a_general_report(tmp_path):
    """A real student's card: the teacher-vs-student table of evaluate.py's general mode (FD_DINOv2 / FD_CLIP to
    the teacher, CLIP score, diversity, cost) with the prompt set, sample counts and metric models named."""
    from dmdx.pipelines.model_card import refresh_model_card

    teacher = _teacher(tmp_path)
    config = {"pretrained_model_name_or_path": teacher, "method": "adm", "num_student_steps": 1,
              "validation_prompts": PROMPTS[:1]}
    out = _finished_student(tmp_path, "student", config)
    before = refresh_model_card(out)
    assert "were not\nmeasured for this card" in before and "--prompts_file <prompts.txt>" in before
    (tmp_path / "report.json").write_text(json.dumps(general_report(out, teacher)))
    text = refresh_model_card(out, evaluation_report=str(tmp_path / "report.json"))
    header = next(line for line in text.splitlines() if line.startswith("| pipeline |"))
    assert header.startswith("| pipeline | steps | NFE | guidance | s / image | diversity (rel.) | FD_DINOv2 to "
                             "teacher ↓ | FD_CLIP to teacher ↓ | FD_DINOv2 to real ↓ | CLIP score ↑ | PickScore ↑ |")
    assert "| teacher | 25 | 50 | 5 | 3.1 | 1 | – | – | – | 31.9 | – | 10.2 |" in text
    assert "| teacher_seed1 | 25 | 50 | 5 | 3.1 | 1 | 41.7 | 0.8 | – | 31.9 |" in text
    assert "| **student** (this model) | 1 | 1 | 0 | 0.12 | 0.74 | 212.4 | 3.25 | – | 30.6 | – | 10.2 |" in text
    assert "on coco2014_val_captions.txt, first 1000 prompts (2 samples per prompt)" in text
    assert "Metric models: DINOv2 `facebook/dinov2-large`, CLIP `openai/clip-vit-large-patch14`." in text
    assert "were not\nmeasured" not in text and "diversity_raw" not in text and "num prompts" not in text
    _assert_no_machine_path(text, teacher, out, str(tmp_path))


def test_lora_card_dtype_variant_licence_and_grammar(tmp_path):
    """A LoRA trained in bf16 on an fp16-variant base: the adapter snippet loads the base that way, the fused
    pipeline's snippet as its files are saved; the licence comes from the teacher behind the ADP generator the
    LoRA was trained on; the licence sentence is grammatical."""
    import torch

    from dmdx.pipelines.model_card import refresh_model_card, saved_weights_format

    teacher = _teacher(tmp_path, card="license: openrail++")
    adp = tmp_path / "adp-student"  # an earlier DMDX student (no card of its own) as the LoRA's base
    adp.mkdir()
    (adp / "training_config.json").write_text(json.dumps({"pretrained_model_name_or_path": teacher}))
    config = {"pretrained_model_name_or_path": teacher, "pretrained_generator_name_or_path": str(adp),
              "method": "adm", "num_student_steps": 4, "lora_rank": 8, "mixed_precision": "bf16", "variant": "fp16"}
    out = _finished_student(tmp_path, "lora-student", config, lora=True, dtype=torch.float16, variant="fp16")
    assert saved_weights_format(out) == ("torch.float16", "fp16")
    text = refresh_model_card(out)
    lora, full = _snippet(text), _snippet(text, 1)
    assert 'from_pretrained("<path to the teacher>", torch_dtype=torch.bfloat16, variant="fp16")' in lora
    assert 'DiffusionPipeline.from_pretrained("lora-student", torch_dtype=torch.float16, variant="fp16")' in full
    assert "license: openrail++" in text and "as its model card declares" in text
    assert "The adapter is a derivative of" in text and "and is released under the teacher's" in text
    assert "adapter are" not in text
    # explicit arguments win; an fp32 folder without a variant adds nothing
    from dmdx.pipelines.model_card import write_model_card

    text = write_model_card(out, base_model=teacher, pipeline_class="StableDiffusionXLPipeline", num_inference_steps=4,
                            guidance_scale=0.0, method="adm", lora=True, torch_dtype="fp16", variant=None)
    assert 'from_pretrained("<path to the teacher>", torch_dtype=torch.float16, variant="fp16")' in _snippet(text)
    plain = _finished_student(tmp_path, "full-student", {"method": "adm", "num_student_steps": 1})
    assert saved_weights_format(plain) == (None, None)
    text = write_model_card(plain, base_model=teacher, pipeline_class="StableDiffusionXLPipeline",
                            num_inference_steps=1, guidance_scale=0.0, method="adm")
    assert 'DiffusionPipeline.from_pretrained("full-student")' in _snippet(text)
    assert "The weights are a derivative of" in text and "and are released" in text


def test_push_lora_adapter_only_by_default(tmp_path, monkeypatch):
    """A LoRA folder (which also holds the fused pipeline with the teacher's VAE and text encoders) publishes the
    adapter, its scheduler, card, samples and training config only, and its card no longer offers the fused
    pipeline; adapter_only=False publishes everything."""
    import huggingface_hub

    from dmdx.pipelines.hub import push_to_hub, upload_file_list
    from dmdx.pipelines.model_card import refresh_model_card

    teacher = _teacher(tmp_path)
    config = {"pretrained_model_name_or_path": teacher, "method": "adm", "num_student_steps": 1, "lora_rank": 4,
              "validation_prompts": PROMPTS[:2]}
    out = _finished_student(tmp_path, "lora", config, lora=True)
    for i in range(2):
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        _images(1)[0].save(os.path.join(out, "samples", f"{i}.png"))
    assert "complete `StableDiffusionXLPipeline`" in refresh_model_card(out)
    calls = []

    class Repo:
        repo_id = "me/lora"

    def fake_upload_folder(**kwargs):
        calls.append((set(upload_file_list(kwargs["folder_path"], kwargs["ignore_patterns"],
                                           kwargs.get("allow_patterns"))),
                      open(os.path.join(kwargs["folder_path"], "README.md")).read()))

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    push_to_hub(out, "me/lora")
    sent, readme = calls[-1]
    assert sent == {"pytorch_lora_weights.safetensors", "README.md", "scheduler/scheduler_config.json",
                    "samples/0.png", "samples/1.png", "samples/grid.png", "training_config.json"}, sent
    assert "complete `StableDiffusionXLPipeline`" not in readme and len(re.findall(r"```python", readme)) == 1
    assert 'pipe.load_lora_weights("me/lora")' in readme
    refresh_model_card(out)
    push_to_hub(out, "me/lora", adapter_only=False)
    sent, readme = calls[-1]
    assert {"model_index.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json"} <= sent
    assert "complete `StableDiffusionXLPipeline`" in readme
    full = _finished_student(tmp_path, "full", {"method": "adm", "num_student_steps": 1})
    with pytest.raises(FileNotFoundError, match="adapter_only"):
        push_to_hub(full, "me/full", adapter_only=True)


def test_push_reads_the_hub_teachers_licence_missed_offline(tmp_path, monkeypatch):
    """Exported offline, a Hub teacher's card was not in the cache: `license: other`. Publishing is online, so the
    teacher's licence is read then and put on the card (metadata and the Licence section) before upload."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    from dmdx.pipelines import model_card
    from dmdx.pipelines.hub import push_to_hub

    out = _student(tmp_path, "sdxl-student")
    text = model_card.write_model_card(out, base_model="stabilityai/stable-diffusion-xl-base-1.0",
                                       pipeline_class="StableDiffusionXLPipeline", num_inference_steps=1,
                                       timesteps=[999], guidance_scale=0.0, method="adm")
    assert "license: other" in text and "check the teacher's terms before use" in text
    sent = {}

    class Repo:
        repo_id = "me/sdxl-student"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda **k: sent.update(readme=open(os.path.join(k["folder_path"], "README.md")).read()))
    looked_up = []
    monkeypatch.setattr(model_card, "teacher_license",
                        lambda base: looked_up.append(base) or {"license": "openrail++"})
    push_to_hub(out, "me/sdxl-student")
    assert looked_up == ["stabilityai/stable-diffusion-xl-base-1.0"]
    data = ModelCard.load(os.path.join(out, "README.md")).data.to_dict()
    assert data["license"] == "openrail++" and data["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "`openrail++`, as its model card declares" in sent["readme"] and "check the teacher's terms" not in \
        sent["readme"]
    assert 'from_pretrained("me/sdxl-student")' in sent["readme"]  # the rest of the card is kept
    push_to_hub(out, "me/sdxl-student")  # a declared licence is not looked up again
    assert looked_up == ["stabilityai/stable-diffusion-xl-base-1.0"]


def test_templates_use_exactly_the_data_python_gives(tmp_path, monkeypatch):
    """Words live in model_cards/, data in model_card.py: every variable a template reads, in any branch, is one
    write_model_card gives (StrictUndefined only catches the branches a card happens to render), and every one it
    gives is read; the same for the usage snippet's fields."""
    import jinja2
    from jinja2 import meta, nodes

    from dmdx.pipelines import model_card

    given = {}
    render = jinja2.Template.render
    monkeypatch.setattr(jinja2.Template, "render", lambda self, *a, **kw: given.update(kw) or render(self, *a, **kw))
    model_card.write_model_card(_student(tmp_path), base_model="org/base", pipeline_class="StableDiffusionXLPipeline",
                                num_inference_steps=1, timesteps=[999], guidance_scale=0.0, method="adm", lora=True)
    env = model_card._environment()

    def parse(name):
        return env.parse(env.loader.get_source(env, name)[0])

    base = parse("base.md")
    defined = {a.target.name for a in base.find_all(nodes.Assign)}
    defined |= {n[1] if isinstance(n, tuple) else n for i in base.find_all(nodes.FromImport) for n in i.names}
    used = meta.find_undeclared_variables(base)
    for name in model_card.TEMPLATES.values():  # the intros also read what base.md defines (teacher, method_name)
        used |= meta.find_undeclared_variables(parse(name)) - defined
    assert used == set(given)
    fields = {g.attr for g in parse("usage.md").find_all(nodes.Getattr)
              if isinstance(g.node, nodes.Name) and g.node.name == "s"}
    assert fields == set(given["usage"]) == set(model_card._snippet_data(**given["usage"]))
