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


def discriminator_args(path: str):
    """The distillation CLI's own defaults for D (blocks, head depth and output, precision), small heads."""
    from dmdx.training.cli import distillation_parser

    return distillation_parser("test").parse_args(["--pretrained_model_name_or_path", path,
                                                   "--discriminator_head_channels", "16"])


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
    args = discriminator_args(path)
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


# ---- CogVideoX ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cogvideox(tmp_path_factory) -> str:
    """9 frames at 16x16 px -> latents (5, 4, 8, 8); rotary embeddings (CogVideoX-5b style), 48 T5 tokens."""
    from diffusers import CogVideoXPipeline

    from dmdx.pipelines.tiny_components import cogvideox_components

    path = str(tmp_path_factory.mktemp("tiny") / "tiny-cogvideox")
    CogVideoXPipeline(**cogvideox_components()).save_pretrained(path)
    return path


def test_cogvideox_adapter_shapes_schedule_and_blocks(tiny_cogvideox):
    """Configs only: frames-first latent shape, the resolved defaults, the 8-step trailing student schedule, the
    v-prediction teacher schedule, default blocks; chosen by adapter_for from model_index.json."""
    from dmdx.pipelines.teachers import CogVideoXTeacher, adapter_for

    teacher = CogVideoXTeacher(tiny_cogvideox)
    assert type(adapter_for(tiny_cogvideox)) is CogVideoXTeacher
    assert teacher.latent_shape() == (5, 4, 8, 8)  # (F_latent, C, H, W): (9 - 1) / 2 + 1 frames, 16 px / 2
    assert teacher.options == {"num_frames": 9, "max_sequence_length": 48, "height": 16, "width": 16}
    wide = CogVideoXTeacher(tiny_cogvideox, height=16, width=32, num_frames=5)
    assert wide.latent_shape() == (3, 4, 8, 16) and wide.latent_shape(8) == (3, 4, 4, 4)
    scheduler = teacher.default_student_scheduler(8)
    scheduler.set_timesteps(8)
    assert type(scheduler).__name__ == "CogVideoXDDIMScheduler"
    assert scheduler.timesteps.tolist() == [999, 874, 749, 624, 499, 374, 249, 124]
    schedule = teacher.teacher_schedule()
    assert schedule.kind == "vp" and schedule.prediction_type == "v_prediction"
    assert teacher.discriminator_blocks(None) == ["transformer_blocks.0", "transformer_blocks.1"]


@pytest.mark.parametrize("snr_shift_scale", [1.0, 3.0])  # the tiny teacher's; CogVideoX-2b's
def test_cogvideox_v_prediction_x0_and_step_match_the_scheduler(snr_shift_scale):
    """The loop's x0 from a v-prediction (and its DDIM step to the next student timestep) equal
    CogVideoXDDIMScheduler.step's pred_original_sample (and prev_sample) at every one of the 8 student timesteps,
    with the SNR shift and the zero-terminal-SNR rescale read from the scheduler class itself."""
    from diffusers import CogVideoXDDIMScheduler, DDPMScheduler

    from dmdx.training import schedule_from_scheduler_config

    config = dict(CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                         set_alpha_to_one=True, timestep_spacing="trailing",
                                         snr_shift_scale=snr_shift_scale).config)
    config["_class_name"] = "CogVideoXDDIMScheduler"  # as scheduler_config.json names it
    schedule = schedule_from_scheduler_config(config)
    scheduler = CogVideoXDDIMScheduler.from_config(config)
    scheduler.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    timesteps = scheduler.timesteps.tolist()
    for i, t in enumerate(timesteps):
        x, v = torch.randn(2, 5, 4, 8, 8, generator=g), torch.randn(2, 5, 4, 8, 8, generator=g)
        prev, x0 = scheduler.step(v, t, x, return_dict=False)
        tt = torch.full((2,), float(t))
        ours = schedule.to_x0_noise(v, x, tt)[0]
        torch.testing.assert_close(ours, x0, rtol=0, atol=2e-5)
        if i + 1 < len(timesteps):  # the last step goes to the scheduler's final alpha (1.0), not a timestep
            step = schedule.ode_step(x, ours, tt, torch.full((2,), float(timesteps[i + 1])))
            torch.testing.assert_close(step, prev, rtol=0, atol=2e-5)
    if snr_shift_scale != 1.0:  # the class matters: DDPMScheduler on the same config has no SNR shift
        ddpm = DDPMScheduler.from_config({k: v for k, v in config.items()
                                          if k not in ("_class_name", "snr_shift_scale")})
        assert (ddpm.alphas_cumprod[500] - scheduler.alphas_cumprod[500]).abs() > 1e-3


def test_cogvideox_predict_rotary_features_and_pipeline(tiny_cogvideox):
    """Weights: T5 conditioning; the prediction uses the rotary embedding the stock pipeline builds; the block
    features are frame-major (B, C, F, h, w) maps that get 3-D heads; the stock pipeline samples frame lists."""
    from diffusers import CogVideoXPipeline

    from dmdx.pipelines.teachers import CogVideoXTeacher
    from dmdx.training import DiscriminatorHead3D
    from dmdx.training.loop import build_discriminator

    teacher = CogVideoXTeacher(tiny_cogvideox)
    shape = teacher.latent_shape()
    denoiser = teacher.load_denoiser().eval()
    teacher.load_text_encoders("cpu", torch.float32, denoiser=denoiser)
    cond = teacher.encode_prompts(TINY_PROMPTS[:3], "cpu")
    negative = teacher.negative_conditioning("cpu")
    assert cond.keys() == negative.keys() == {"prompt_embeds"}
    assert cond["prompt_embeds"].shape == (3, 48, 32) and negative["prompt_embeds"].shape == (1, 48, 32)

    x, t = torch.randn(3, *shape), torch.tensor([900.0, 500.5, 20.0])
    pipe = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
    rotary = pipe._prepare_rotary_positional_embeddings(16, 16, shape[0], "cpu")
    with torch.no_grad():
        out = teacher.predict(denoiser, x, t, cond)
        stock = denoiser(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"], timestep=t,
                         image_rotary_emb=rotary, return_dict=False)[0]
        plain = denoiser(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"], timestep=t,
                         return_dict=False)[0]
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, stock, rtol=0, atol=1e-6)
    assert (out - plain).abs().max() > 1e-4  # the rotary embedding is really applied
    assert teacher.rotary_embedding(shape, "cpu") is teacher.rotary_embedding(shape, "cpu")  # cached per shape

    # frame-major tokens: the selector on the patch embedding's video tokens == its conv on each frame (no positional
    # embedding is added with rotary embeddings), so token (f, i, j) lands at map[:, :, f, i, j]
    select = teacher.feature_selector(shape)
    with torch.no_grad():
        tokens = denoiser.patch_embed(cond["prompt_embeds"], x)[:, 48:]
        per_frame = denoiser.patch_embed.proj(x.flatten(0, 1)).unflatten(0, (3, shape[0])).transpose(1, 2)
    torch.testing.assert_close(select((tokens, None)), per_frame, rtol=0, atol=1e-6)

    models = types.SimpleNamespace(teacher_base=denoiser, teacher=denoiser, latent_shape=shape,
                                   teacher_schedule=teacher.teacher_schedule())
    build_discriminator(teacher, discriminator_args(tiny_cogvideox),
                        models, negative, "cpu")
    with torch.no_grad():
        feats = models.features(lambda: teacher.predict(denoiser, x, torch.full((3,), 500.0), cond))
    assert [tuple(f.shape) for f in feats] == [(3, 32, 5, 4, 4)] * 2  # (B, C, F, h, w)
    assert all(isinstance(h, DiscriminatorHead3D) for h in models.discriminator_heads.heads)
    assert models.discriminator_heads(feats).shape == (3,)

    scheduler = teacher.default_student_scheduler(8)
    videos = teacher.generate(teacher.pipeline(denoiser, scheduler, teacher.load_vae("cpu")), cond, 2,
                              torch.Generator().manual_seed(0), None)
    assert len(videos) == 3 and len(videos[0]) == 9 and videos[0][0].size == (16, 16)


def test_video_validation_strip_and_trackers(tmp_path, monkeypatch):
    """save_validation on video samples: a GIF strip (frame t = every prompt's frame t); tensorboard gets
    add_video with (N, T, C, H, W) uint8, wandb a Video of the strip; image samples keep their PNG grid."""
    import sys

    from PIL import Image

    from dmdx.training.plumbing import save_validation

    calls = []
    writer = types.SimpleNamespace(add_video=lambda *a, **k: calls.append(("add_video", a, k)),
                                   add_images=lambda *a, **k: calls.append(("add_images", a, k)))
    logged = types.SimpleNamespace(log=lambda data, step: calls.append(("wandb", data, step)), name="wandb")
    accelerator = types.SimpleNamespace(trackers=[types.SimpleNamespace(name="tensorboard", writer=writer), logged])
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        Video=lambda path, caption=None: ("Video", path, caption), Image=lambda im, caption=None: ("Image", caption)))
    clips = [[Image.new("RGB", (8, 8), (40 * f, 0, c * 200)) for f in range(5)] for c in range(2)]
    path = save_validation(accelerator, clips, ["a", "b"], str(tmp_path / "validation" / "step-000003.gif"), 3)
    gif = Image.open(path)
    assert gif.n_frames == 5 and gif.size == (16, 8)
    gif.seek(4)
    assert gif.convert("RGB").getpixel((12, 4))[2] > 150  # the second prompt's clip on the right
    (kind, (tag, video, step), kw), (_, data, wstep) = calls
    assert kind == "add_video" and video.shape == (2, 5, 3, 8, 8) and video.dtype.name == "uint8" and kw["fps"] == 8
    assert data["validation"] == ("Video", path, "a | b") and step == wstep == 3
    calls.clear()
    save_validation(accelerator, [clips[0][0], clips[1][0]], ["a", "b"], str(tmp_path / "step.png"), 4)
    assert calls[0][0] == "add_images" and Image.open(tmp_path / "step.png").size == (16, 8)


def test_cogvideox_15_time_patching(tmp_path):
    """CogVideoX 1.5 (``patch_size_t``): latent frames padded to a multiple of it as the pipeline pads them, the
    pipeline's "slice" rotary embedding, (F / p_t)-frame feature maps; the stock pipeline still returns 9 frames."""
    from diffusers import CogVideoXPipeline

    from dmdx.pipelines.teachers import CogVideoXTeacher
    from dmdx.pipelines.tiny_components import cogvideox_components

    CogVideoXPipeline(**cogvideox_components(patch_size_t=2)).save_pretrained(tmp_path / "cog15")
    teacher = CogVideoXTeacher(str(tmp_path / "cog15"))
    shape = teacher.latent_shape()
    assert shape == (6, 4, 8, 8)  # 9 frames -> 5 latent frames, padded to 6
    denoiser = teacher.load_denoiser().eval()
    pipe = CogVideoXPipeline.from_pretrained(tmp_path / "cog15")
    for ours, stock in zip(teacher.rotary_embedding(shape, "cpu"),
                           pipe._prepare_rotary_positional_embeddings(16, 16, shape[0], "cpu")):
        torch.testing.assert_close(ours, stock, rtol=0, atol=0)
    x, cond = torch.randn(2, *shape), {"prompt_embeds": torch.randn(2, 48, 32)}
    with torch.no_grad():
        assert teacher.predict(denoiser, x, torch.tensor([800.0, 100.0]), cond).shape == x.shape
    assert teacher.feature_selector(shape)((torch.randn(2, 3 * 4 * 4, 32), None)).shape == (2, 32, 3, 4, 4)
    videos = teacher.generate(teacher.pipeline(denoiser, teacher.default_student_scheduler(8), teacher.load_vae("cpu")),
                              {"prompt_embeds": cond["prompt_embeds"][:1]}, 2, torch.Generator().manual_seed(0), None)
    assert len(videos[0]) == 9
