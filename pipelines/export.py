"""Turn a trained denoiser into a stock diffusers pipeline folder (docs/design.md#export).

The student ships as the teacher's own pipeline class with the distilled denoiser swapped in and the student's
scheduler, so ``DiffusionPipeline.from_pretrained(folder)`` needs no custom code and
``pipe(prompt, num_inference_steps=N, guidance_scale=0.0)`` runs exactly the trained timesteps. Everything is
written into a temporary folder first and moved into place with ``model_index.json`` last: a folder is never left
looking loadable while half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _move_into(src_dir: str, output_dir: str, last: tuple[str, ...] = ("model_index.json",)) -> None:
    """Move every entry of ``src_dir`` into ``output_dir`` (replacing what is there), the names in ``last`` last."""
    names = sorted(os.listdir(src_dir), key=lambda n: (n in last, n))
    if any(n in last for n in names):  # invalidate the old folder first, so a crash never mixes old and new
        for name in last:
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
    for name in names:
        src, dst = os.path.join(src_dir, name), os.path.join(output_dir, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)


def save_student_pipeline(teacher_path: str, output_dir: str, components: dict[str, Any], scheduler,
                          **load_kwargs):
    """Assemble ``DiffusionPipeline.from_pretrained(teacher_path, **components, scheduler=scheduler)`` and save it
    (safetensors) into ``output_dir``, which may already hold other files (checkpoints, logs): those are kept.

    ``components`` are the trained modules (e.g. ``{"unet": unet}``); the others (VAE, text encoders, tokenizers)
    come from the teacher. ``load_kwargs`` go to ``from_pretrained`` (``torch_dtype``, ``variant``, ...).
    Returns the pipeline.
    """
    import diffusers
    from diffusers import DiffusionPipeline

    # The teacher's own class, not DiffusionPipeline: diffusers 0.42's DiffusionPipeline.from_pretrained silently loads
    # the teacher's weights over a passed component that the class lists as optional (WanPipeline's transformer).
    name = DiffusionPipeline.load_config(teacher_path, **load_kwargs).get("_class_name", "")
    pipeline_class = getattr(diffusers, name, DiffusionPipeline)
    pipe = pipeline_class.from_pretrained(teacher_path, **components, scheduler=scheduler, **load_kwargs)
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=output_dir)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _move_into(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pipe
