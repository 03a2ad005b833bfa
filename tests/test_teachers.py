"""Teacher adapters on tiny SDXL / SD3 teachers, and the one loop they share (in-process, CPU)."""

from __future__ import annotations

import importlib.util
import os
import types

import pytest
import torch
from conftest import REPO, TINY_PROMPTS


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> str:
    from diffusers import StableDiffusion3Pipeline

    from dmdx.pipelines.tiny_components import sd3_components

    path = str(tmp_path_factory.mktemp("tiny") / "tiny-sd3")
    components = sd3_components(sample_size=8, num_layers=2)
    components = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
    StableDiffusion3Pipeline(**components).save_pretrained(path)
    return path


def adapter(kind: str, path: str):
    from dmdx.pipelines.teachers import SD3Teacher, SDXLTeacher

    if kind == "sdxl":
        return SDXLTeacher(path, resolution=32)
    return SD3Teacher(path, resolution=16, max_sequence_length=16)


@pytest.fixture
def teachers(tiny_sdxl, tiny_sd3):
    return {"sdxl": (tiny_sdxl, 32), "sd3": (tiny_sd3, 16)}


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_adapter_answers_the_protocol(kind, teachers):
    """Configs only: architecture, latent shape, blocks, schedules; then weights: conditioning, prediction,
    discriminator features, the stock pipeline around a denoiser."""
    from dmdx.pipelines.teachers import adapter_for
    from dmdx.training.loop import build_discriminator

    path, resolution = teachers[kind]
    teacher = adapter(kind, path)
    assert type(adapter_for(path)) is type(teacher)  # chosen from model_index.json alone
    shape = teacher.latent_shape(resolution)
    assert shape == ((4, 16, 16) if kind == "sdxl" else (16, 8, 8))
    scheduler = teacher.default_student_scheduler(4)
    scheduler.set_timesteps(4)
    expected = [999, 749, 499, 249] if kind == "sdxl" else [1000.0, 892.3077, 698.9247, 250.0]
    torch.testing.assert_close(scheduler.timesteps.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-3,
                               rtol=0)
    assert teacher.teacher_schedule().kind == ("vp" if kind == "sdxl" else "flow")

    denoiser = teacher.load_denoiser().eval()
    teacher.load_text_encoders("cpu", torch.float32, denoiser=denoiser)
    cond = teacher.encode_prompts(TINY_PROMPTS[:3], "cpu")
    negative = teacher.negative_conditioning("cpu")
    assert cond.keys() == negative.keys() and {"prompt_embeds", "pooled_prompt_embeds"} <= cond.keys()
    assert all(v.shape[0] == 3 for v in cond.values()) and all(v.shape[0] == 1 for v in negative.values())
    x = torch.randn(3, *shape)
    with torch.no_grad():
        out = teacher.predict(denoiser, x, torch.tensor([900.0, 500.0, 20.0]), cond)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()

    models = types.SimpleNamespace(teacher_base=denoiser, teacher=denoiser, latent_shape=shape,
                                   teacher_schedule=teacher.teacher_schedule())
    args = types.SimpleNamespace(discriminator_blocks=None, discriminator_head_channels=16)
    build_discriminator(teacher, args, models, negative, "cpu")
    assert models.discriminator_heads is not None and len(models.features.module_names) >= 2
    with torch.no_grad():
        feats = models.features(lambda: teacher.predict(denoiser, x, torch.full((3,), 500.0), cond))
    assert models.discriminator_heads(feats).shape == (3,)

    pipe = teacher.pipeline(denoiser, scheduler, teacher.load_vae("cpu"))
    assert type(pipe).__name__ == teacher.pipeline_class
    images = pipe(prompt_embeds=cond["prompt_embeds"][:1], pooled_prompt_embeds=cond["pooled_prompt_embeds"][:1],
                  num_inference_steps=2, guidance_scale=0.0, height=resolution, width=resolution,
                  output_type="np").images
    assert images.shape == (1, resolution, resolution, 3)


def _lora_args(**overrides):
    args = dict(lora_rank=4, lora_alpha=4, fake_score_lora_rank=4, seed=0, gradient_checkpointing=False,
                enable_xformers_memory_efficient_attention=False, use_ema=False, num_student_steps=4,
                timestep_sampling="uniform", resolution=16)
    args.update(overrides)
    return types.SimpleNamespace(**args)


def _build(path, args):
    from accelerate import Accelerator

    from dmdx.training.loop import build_models

    return build_models(adapter("sd3", path), args, Accelerator(cpu=True), None)


def test_lora_roles_share_one_base_and_the_teacher_is_exact(tiny_sd3):
    """In LoRA mode the generator and the fake score are adapters on the teacher's own module; with every adapter
    off it is exactly the teacher; switching roles never changes what the loop froze."""
    from accelerate.state import AcceleratorState

    from dmdx.training.lora import LoraView

    try:
        models = _build(tiny_sd3, _lora_args())
        teacher = adapter("sd3", tiny_sd3)
        assert isinstance(models.generator, LoraView) and isinstance(models.fake_score, LoraView)
        assert models.generator.base is models.fake_score.base is models.teacher_base
        assert isinstance(models.teacher, LoraView) and models.teacher.adapter_name is None
        assert not list(models.teacher.parameters())
        # the roles' parameters are their own adapters' only, trainable; the base stays frozen
        g, f = dict(models.generator.named_parameters()), dict(models.fake_score.named_parameters())
        assert g and f and not set(map(id, g.values())) & set(map(id, f.values()))
        assert all("lora_" in n and "__generator__" in n for n in g) and all("__fake_score__" in n for n in f)
        assert all(p.requires_grad for p in [*g.values(), *f.values()])
        assert not any(p.requires_grad for n, p in models.teacher_base.named_parameters() if "lora_" not in n)

        with torch.no_grad():  # make both adapters do something (LoRA B starts at zero)
            for p in [*g.values(), *f.values()]:
                p.add_(0.05 * torch.randn_like(p))
        fresh = teacher.load_denoiser().eval()
        x, t = torch.randn(2, 16, 8, 8), torch.tensor([700.0, 200.0])
        cond = {"prompt_embeds": torch.randn(2, 5, 32), "pooled_prompt_embeds": torch.randn(2, 64)}
        with torch.no_grad():
            reference = teacher.predict(fresh, x, t, cond)
            outputs = {role: teacher.predict(getattr(models, role), x, t, cond)
                       for role in ("generator", "teacher", "fake_score")}
            again = teacher.predict(models.teacher, x, t, cond)
        # the teacher to float rounding (peft's wrapped linear layers: 1.2e-7 measured), far below what LoRA moves
        torch.testing.assert_close(outputs["teacher"], reference, rtol=0, atol=1e-6)
        torch.testing.assert_close(again, reference, rtol=0, atol=1e-6)
        assert (outputs["generator"] - reference).abs().max() > 1e-4
        assert (outputs["fake_score"] - outputs["generator"]).abs().max() > 1e-4
        # freezing a role (as the generator pass freezes the fake score) survives switching adapters
        for p in f.values():
            p.requires_grad_(False)
        models.generator.activate()
        models.teacher.activate()
        assert not any(p.requires_grad for p in f.values()) and all(p.requires_grad for p in g.values())
    finally:
        AcceleratorState._reset_state(True)


def test_lora_gradient_checkpointing_recomputes_under_the_right_adapter(tiny_sd3):
    """The generator's loss runs G, then the fake score and the teacher on one shared base: with gradient
    checkpointing the generator's gradient must equal the one without it."""
    from accelerate.state import AcceleratorState

    from dmdx.training import frozen_parameters

    teacher = adapter("sd3", tiny_sd3)
    grads = []
    try:
        for checkpointing in (False, True):
            models = _build(tiny_sd3, _lora_args(gradient_checkpointing=checkpointing))
            torch.manual_seed(1)
            with torch.no_grad():
                for p in [*models.generator.parameters(), *models.fake_score.parameters()]:
                    p.add_(0.05 * torch.randn_like(p))
            x, t = torch.randn(2, 16, 8, 8), torch.tensor([700.0, 200.0])
            cond = {"prompt_embeds": torch.randn(2, 5, 32), "pooled_prompt_embeds": torch.randn(2, 64)}
            models.generator.train()
            with frozen_parameters(models.fake_score):
                x0 = teacher.predict(models.generator, x, t, cond)
                loss = (teacher.predict(models.fake_score, x0, t, cond) ** 2).mean() + \
                    (teacher.predict(models.teacher, x0, t, cond) ** 2).mean()
                models.generator.activate()  # as accumulated_update does before every backward
                loss.backward()
            grads.append({n: p.grad.clone() for n, p in models.generator.named_parameters()})
            AcceleratorState._reset_state(True)
    finally:
        AcceleratorState._reset_state(True)
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and any(g.abs().max() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "distill_scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_teachers_run_the_same_loop(teachers, prompts_file, tmp_path, monkeypatch):
    """train_adm_sdxl.py and train_adm_sd3.py are entry points over one algorithm: each run's iterations are
    ``dmdx.training.loop.train_iteration``, given that teacher's adapter."""
    from accelerate.state import AcceleratorState

    import dmdx.training.loop as loop

    seen = []
    original = loop.train_iteration

    def spy(models, adapter, *args, **kwargs):
        seen.append(type(adapter).__name__)
        return original(models, adapter, *args, **kwargs)

    monkeypatch.setattr(loop, "train_iteration", spy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    common = ["--prompts_file", prompts_file, "--max_train_steps", "2", "--train_batch_size", "2",
              "--discriminator_head_channels", "16", "--generator_lr", "1e-4", "--checkpointing_steps", "100"]
    extra = {"sdxl": [], "sd3": ["--max_sequence_length", "16", "--lora_rank", "4"]}
    for kind, script in (("sdxl", "train_adm_sdxl"), ("sd3", "train_adm_sd3")):
        path, resolution = teachers[kind]
        module = _load_script(script)
        try:
            module.main(module.parse_args(["--pretrained_model_name_or_path", path, "--resolution", str(resolution),
                                           "--output_dir", str(tmp_path / kind), *common, *extra[kind]]))
        finally:
            AcceleratorState._reset_state(True)
        assert os.path.isfile(tmp_path / kind / "model_index.json")
    assert seen == ["SDXLTeacher"] * 2 + ["SD3Teacher"] * 2
