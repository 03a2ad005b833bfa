"""The denoiser receives the timestep as the stock pipeline passes it: fp32 and exact, whatever the training
precision (bf16 weights, bf16 autocast). In bf16 a scheduler timestep such as 698.92 would arrive as 700.0, and
so would 700.5 (ADM's t - T/64 steps are fractional)."""

from __future__ import annotations

import pytest
import torch


def _save(kind: str, root) -> str:
    import diffusers

    from dmdx.pipelines import tiny_components

    if kind == "sdxl":
        cls, components = diffusers.StableDiffusionXLPipeline, tiny_components.sdxl_components(sample_size=16)
    elif kind == "sd3":
        cls, components = diffusers.StableDiffusion3Pipeline, tiny_components.sd3_components(sample_size=8,
                                                                                               num_layers=1)
        components = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
    else:
        cls, components = diffusers.CogVideoXPipeline, tiny_components.cogvideox_components()
    path = str(root / f"tiny-{kind}")
    cls(**components).save_pretrained(path)
    return path


def _adapter(kind: str, path: str):
    from dmdx.pipelines.teachers import CogVideoXTeacher, SD3Teacher, SDXLTeacher

    if kind == "sdxl":
        return SDXLTeacher(path, resolution=32)
    if kind == "sd3":
        return SD3Teacher(path, resolution=16, max_sequence_length=16)
    return CogVideoXTeacher(path)


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "cogvideox"])
def test_denoiser_receives_fp32_timesteps_under_bf16(kind, tmp_path):
    adapter = _adapter(kind, _save(kind, tmp_path))
    model = adapter.load_denoiser(torch.bfloat16).eval()
    adapter.load_text_encoders("cpu", torch.float32)
    cond = adapter.encode_prompts(["a red circle", "a blue square"], "cpu")
    seen = []

    def record(module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]  # the UNet takes it positionally
        seen.append((timestep.dtype, timestep.detach().clone()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    t = torch.tensor([698.9247, 700.5])  # both off bf16's grid (spacing 4 here)
    x = torch.randn((2, *adapter.latent_shape(adapter.resolution)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter.predict(model, x, t, cond)
    handle.remove()
    assert out.shape == x.shape and out.dtype == torch.float32
    (dtype, value), = seen
    assert dtype == torch.float32
    assert torch.equal(value, t)  # exact; bf16 would give [700.0, 700.0]
