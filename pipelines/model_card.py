"""Model cards for distilled students, rendered from the Jinja templates in ``model_cards/`` with
huggingface_hub's ``ModelCard`` / ``ModelCardData`` (renders offline)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

TEMPLATES = {"image": "image_full.md", "image_lora": "image_lora.md", "video": "video_full.md"}

METHODS = {
    "dmdx": ("DMDX (ADP pre-training + ADM fine-tuning)",
             "Adversarial Distillation Pre-training on teacher ODE pairs (latent + SAM pixel hinge discriminators), "
             "then Adversarial Distribution Matching: a hinge GAN on one-step PF-ODE predictions of the teacher "
             "(with CFG) and an online fake score, discriminated by the frozen teacher with trainable heads."),
    "adm": ("ADM (Adversarial Distribution Matching)",
            "A hinge GAN on one-step PF-ODE predictions of the teacher (with CFG) and an online fake score, "
            "discriminated by the frozen teacher with trainable heads; data-free (prompts only)."),
    "adp": ("ADP (Adversarial Distillation Pre-training)",
            "Velocity-parametrised one-step generator trained on teacher ODE pairs against a latent discriminator "
            "(frozen teacher + heads) and a pixel discriminator (frozen SAM encoder + heads), hinge losses."),
    "dmd": ("DMD2 (distribution matching distillation, baseline)",
            "DMD2's normalised distribution-matching loss with an online fake score (the baseline the ADM paper "
            "compares against)."),
}


def _template_path(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"Unknown model-card template {template!r}; expected one of {sorted(TEMPLATES)}.")
    return str(resources.files("dmdx.model_cards").joinpath(TEMPLATES[template]))


def usage_snippet(repo_id: str, pipeline_class: str, num_inference_steps: int, guidance_scale: float,
                  lora: bool = False, base_model: str | None = None, prompt: str = "a photo of a cat",
                  scheduler_class: str = "LCMScheduler") -> str:
    """Python that loads the student with stock diffusers and generates; runs as written."""
    if not lora:
        return (
            "import torch\n"
            "from diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")\n'
            'pipe.to("cuda" if torch.cuda.is_available() else "cpu")\n'
            f'image = pipe("{prompt}", num_inference_steps={num_inference_steps}, '
            f"guidance_scale={guidance_scale}).images[0]\n"
            'image.save("sample.png")'
        )
    return (
        "import torch\n"
        f"from diffusers import {pipeline_class}, {scheduler_class}\n\n"
        f'pipe = {pipeline_class}.from_pretrained("{base_model}")\n'
        f'pipe.load_lora_weights("{repo_id}")\n'
        f'pipe.scheduler = {scheduler_class}.from_pretrained("{repo_id}", subfolder="scheduler")\n'
        'pipe.to("cuda" if torch.cuda.is_available() else "cpu")\n'
        f'image = pipe("{prompt}", num_inference_steps={num_inference_steps}, '
        f"guidance_scale={guidance_scale}).images[0]\n"
        'image.save("sample.png")'
    )


def write_model_card(
    output_dir: str,
    *,
    base_model: str,
    pipeline_class: str,
    num_inference_steps: int,
    timesteps: Sequence[float],
    guidance_scale: float,
    method: str,
    lora: bool = False,
    sample_grid: str | None = None,
    repo_id: str | None = None,
    template: str = "image",
    license: str = "other",
    training_details: Mapping[str, Any] | None = None,
    tags: Sequence[str] = (),
    prompt: str = "a photo of a cat",
    scheduler_class: str = "LCMScheduler",
) -> str:
    """Render ``output_dir/README.md`` and return its text.

    ``sample_grid`` is a path relative to ``output_dir``; ``repo_id`` is the name used in the usage snippet
    (default: the local folder, so the snippet runs as written on this machine). ``method`` is one of
    ``dmdx``, ``adm``, ``adp``, ``dmd``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHODS)}.")
    if lora and template == "image":
        template = "image_lora"
    method_name, method_description = METHODS[method]
    timesteps = [int(t) if float(t).is_integer() else round(float(t), 4) for t in timesteps]
    repo_id = repo_id or os.path.abspath(output_dir)
    card_data = ModelCardData(
        base_model=base_model, library_name="diffusers", license=license,
        pipeline_tag="text-to-video" if template == "video" else "text-to-image",
        tags=["diffusers", "distillation", method, "dmdx", *(["lora"] if lora else []), *tags],
    )
    card = ModelCard.from_template(
        card_data, template_path=_template_path(template),
        title=f"{method_name.split(' (')[0]} {num_inference_steps}-step student of {base_model}",
        base_model=base_model, pipeline_class=pipeline_class, num_inference_steps=num_inference_steps,
        timesteps=timesteps, guidance_scale=guidance_scale, method_name=method_name,
        method_description=method_description, sample_grid=sample_grid, license=license,
        usage=usage_snippet(repo_id, pipeline_class, num_inference_steps, guidance_scale, lora, base_model, prompt,
                            scheduler_class),
        training_details=dict(training_details or {}),
    )
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return str(card)
