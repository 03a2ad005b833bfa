"""The end of a run, shared by the ADM / DMD2 loop (``loop``) and ADP (``adp``): validation through the stock
pipeline, and the export of the student (pipeline folder, training config, model card, optional upload).

What only ``dmdx.pipelines`` knows (the pipeline classes, the model card, the Hub upload) is reached through the
teacher adapter the run was given, so ``dmdx.training`` never imports ``dmdx.pipelines`` (docs/design.md#imports).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch

from .freezing import reshard_fsdp
from .lora import LoraView, fused_copy
from .plumbing import (
    TRAINING_CONFIG_NAME,
    ema_weights,
    parameter_checksum,
    rank_checksums,
    save_validation,
    write_training_config,
)

logger = logging.getLogger("dmdx")


def finish_and_export(adapter, args, accelerator, models, *, method: str, generator_path: str | None, samples,
                      fields: dict) -> None:
    """After the last step, on every process: the EMA weights into the generator, the ranks' weight checksums, the
    gathered state; then the main process exports (``export_student``); then everyone ends together."""
    accelerator.wait_for_everyone()
    generator = accelerator.unwrap_model(models.generator)
    if models.ema is not None:
        reshard_fsdp(generator)  # FSDP: copy into the shards (a no_grad forward may have left units gathered)
        models.ema.copy_to(generator.parameters())
    checksums = None if accelerator.distributed_type.name == "FSDP" else rank_checksums(accelerator, models.generator)
    state = accelerator.get_state_dict(models.generator) if not isinstance(generator, LoraView) else None
    final_checksum = parameter_checksum(generator)  # every rank: on FSDP's DTensors the sum is a collective
    if accelerator.is_main_process:
        export_student(adapter, args, models, generator, state, method=method, generator_path=generator_path,
                       samples=samples, schedule_fields=fields, final_checksum=final_checksum,
                       generator_checksum_per_rank=checksums)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # gloo's worker thread frees a finished barrier's (and the collectives' before it) tensors after the barrier
        # has returned, and needs the GIL for that; if this thread meanwhile frees the DDP reducer, whose process
        # group joins that worker while holding the GIL, the process never exits (seen in tests/test_fsdp.py's DDP
        # run). Sleeping releases the GIL so the worker finishes first.
        time.sleep(0.5)


@torch.no_grad()
def validate(models, adapter, args, accelerator, step: int, val_cond: dict, vae) -> tuple | None:
    """The validation prompts through the stock pipeline exactly as users will run the student (its scheduler,
    K steps, no CFG), with the EMA weights when kept; a grid in ``validation/step-N.png`` (video: a strip in
    ``step-N.gif``) and the trackers. Returns (samples, prompts) on the main process: images, or frame lists."""
    import copy

    generator = accelerator.unwrap_model(models.generator)
    with ema_weights(models.ema, generator):
        if isinstance(generator, LoraView):
            generator.activate()
        denoiser = generator.base if isinstance(generator, LoraView) else generator
        pipe = adapter.pipeline(denoiser, copy.deepcopy(models.student_scheduler), vae)
        rng = torch.Generator(accelerator.device).manual_seed(args.seed)  # its own: the training stream is untouched
        with accelerator.autocast():
            images = adapter.generate(pipe, {k: v.to(accelerator.device) for k, v in val_cond.items()},
                                      len(models.student_timesteps), rng, args.resolution)
    if not accelerator.is_main_process:
        return None
    save_validation(accelerator, images, args.validation_prompts, os.path.join(
        args.output_dir, "validation", f"step-{step:06d}.{'gif' if adapter.video else 'png'}"), step)
    return images, list(args.validation_prompts)


def export_student(adapter, args, models, generator, state, *, method: str, generator_path: str | None,
                   samples: tuple | None, schedule_fields: dict, final_checksum: float, **extra) -> None:
    """Main process: the stock pipeline folder (+ LoRA weights), training config, model card with the final
    validation ``samples`` (images, prompts), upload. ``state``: the full generator's state dict (gathered), None
    for a LoRA generator; ``final_checksum``: its weights' checksum (every rank computes it: a collective under
    FSDP)."""
    lora = isinstance(generator, LoraView)
    if lora:
        denoiser = fused_copy(adapter, generator_path, generator, args.lora_rank,
                              args.lora_alpha, adapter.lora_target_modules)
        lora_state = generator.lora_state_dict()
    else:
        denoiser = adapter.load_denoiser(torch.float32, path=generator_path)
        denoiser.load_state_dict({k: v.float() for k, v in state.items()})
        lora_state = None
    unchanged = schedule_fields.get("generator_initial_checksum") == final_checksum
    if unchanged:
        logger.warning("THE GENERATOR DID NOT CHANGE during training: the exported student is its starting point "
                       "(learning rates, warm-up and --max_train_steps?).")
    try:
        adapter.export(args.output_dir, denoiser, models.student_scheduler, models.weight_dtype, lora_state)
    except (OSError, RuntimeError) as e:
        raise OSError(f"Could not export the student to {args.output_dir}: {e} (full disk or no permission?). The "
                      "last checkpoint is complete: fix the cause and resume to export.") from e
    write_training_config(args.output_dir, args, **schedule_fields, generator_unchanged=unchanged,
                          training_command=sys.argv, **extra)
    # A LoRA is relative to the weights it was trained on; full weights derive from the teacher.
    base = (generator_path if lora else None) or args.pretrained_model_name_or_path
    images, prompts = samples if samples else (None, None)
    adapter.write_model_card(
        args.output_dir, base_model=base, pipeline_class=adapter.pipeline_class,
        num_inference_steps=schedule_fields["num_student_steps"], guidance_scale=0.0, method=method, lora=lora,
        video=adapter.video,
        sample_images=images, sample_prompts=prompts, training_command=sys.argv,
        hyperparameters=adapter.training_hyperparameters({**vars(args), "method": method}),
        repo_id=args.hub_model_id,
        **adapter.card_extras())
    logger.info("exported the student pipeline to %s (%s)", args.output_dir, TRAINING_CONFIG_NAME)
    if args.push_to_hub:
        adapter.push_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
