#!/usr/bin/env python
"""Collect teacher ODE pairs (initial noise, final latent, prompt) for ADP pre-training (docs/method.md#ode-pairs).

    accelerate launch distill_scripts/collect_ode_pairs.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --prompts_file prompts.txt --num_pairs 10000 --output_dir sdxl-ode-pairs

Any teacher with an adapter in ``dmdx.pipelines.teachers`` works (SDXL, SD3), loaded as its stock pipeline. The
teacher's sampler is made deterministic so every latent is the probability-flow ODE solution of its noise:
DDPM-family teachers (SDXL) sample with ``DDIMScheduler`` (eta 0, trailing timesteps so the ODE starts at
t = T - 1 from the stored noise); flow teachers (SD3) keep their flow-matching Euler scheduler. The manifest
records which.

Output: ``shard-00000.safetensors`` ... each holding ``noise`` and ``latents`` (N, C, h, w) in the denoiser's latent
space and the prompts (JSON in the safetensors metadata), plus ``manifest.json`` (teacher, resolution, steps,
guidance, sampler). Shard ``i`` uses seed ``--seed + i`` and is written atomically, so a rerun skips finished shards
and any number of processes (``accelerate launch``; process r writes shards i with i % world == r) gives the
same data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

import torch

logger = logging.getLogger("collect_ode_pairs")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--prompts_file", default=None, help="Text file, one prompt per line.")
    parser.add_argument("--dataset_name", default=None,
                        help="A datasets name or a local .json/.jsonl/.csv/.parquet file with a caption column.")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--dataset_split", default="train")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--output_dir", default="ode-pairs")
    parser.add_argument("--num_pairs", type=int, default=10000)
    parser.add_argument("--shard_size", type=int, default=1000, help="Pairs per shard file.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.0)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                        help="dtype of the teacher (the VAE is not used: latents are saved).")
    parser.add_argument("--save_dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(input_args)
    if (args.prompts_file is None) == (args.dataset_name is None):
        parser.error("give exactly one of --prompts_file or --dataset_name.")
    for name in ("num_pairs", "shard_size", "batch_size", "num_inference_steps", "resolution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.guidance_scale < 0:
        parser.error(f"--guidance_scale must be >= 0, got {args.guidance_scale}.")
    return args


def deterministic_scheduler(pipe):
    """The teacher's scheduler made a deterministic ODE solver; returns (scheduler, description)."""
    from diffusers import DDIMScheduler

    from dmdx.training import schedule_from_scheduler_config

    schedule = schedule_from_scheduler_config(pipe.scheduler.config)
    if schedule.kind == "flow":
        if getattr(pipe.scheduler.config, "stochastic_sampling", False):
            raise ValueError("The flow teacher's scheduler samples stochastically; ODE pairs need a deterministic one.")
        return pipe.scheduler, type(pipe.scheduler).__name__
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                          set_alpha_to_one=True)
    return scheduler, "DDIMScheduler(eta=0, timestep_spacing=trailing)"


def manifest_for(args, pipe, sampler: str, latent_shape) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "teacher": args.pretrained_model_name_or_path,
        "pipeline_class": type(pipe).__name__,
        "resolution": args.resolution,
        "latent_shape": list(latent_shape),
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "sampler": sampler,
        "seed": args.seed,
        "num_pairs": args.num_pairs,
        "shard_size": args.shard_size,
        "prompts": args.prompts_file or f"{args.dataset_name}[{args.caption_column}]",
    }


def check_manifest(output_dir: str, manifest: dict) -> None:
    """Refuse to mix pairs of another configuration into an existing output folder."""
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    keys = ("teacher", "resolution", "num_inference_steps", "guidance_scale", "sampler", "seed", "shard_size")
    diff = {k: (old.get(k), manifest[k]) for k in keys if old.get(k) != manifest[k]}
    if diff:
        from dmdx.training.errors import UsageError

        raise UsageError(f"--output_dir {output_dir} already holds ODE pairs made with other settings {diff}; use "
                         f"a new --output_dir.")


def shard_path(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, f"shard-{index:05d}.safetensors")


@torch.no_grad()
def collect_shard(pipe, prompts: list[str], args, index: int, latent_shape, device, progress=None) -> None:
    """Sample shard ``index`` (seed ``--seed + index``) and write it atomically."""
    from safetensors.torch import save_file

    start = index * args.shard_size
    count = min(args.shard_size, args.num_pairs - start)
    generator = torch.Generator("cpu").manual_seed(args.seed + index)
    order = torch.randint(len(prompts), (count,), generator=generator).tolist()
    shard_prompts = [prompts[i] for i in order]
    noise = torch.randn((count, *latent_shape), generator=generator)
    latents = []
    for b in range(0, count, args.batch_size):
        batch_noise = noise[b:b + args.batch_size]
        out = pipe(shard_prompts[b:b + args.batch_size], num_inference_steps=args.num_inference_steps,
                   guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
                   latents=batch_noise.to(device, pipe.dtype), output_type="latent")
        latents.append(out.images.float().cpu())
        if progress is not None:
            progress.update(len(batch_noise))
    latents = torch.cat(latents)
    if not torch.isfinite(latents).all():
        raise FloatingPointError(f"The teacher produced non-finite latents in shard {index}; try --mixed_precision "
                                 f"no or bf16.")
    dtype = getattr(torch, args.save_dtype)
    metadata = {"prompts": json.dumps(shard_prompts), "teacher": args.pretrained_model_name_or_path,
                "resolution": str(args.resolution), "shard": str(index)}
    path = shard_path(args.output_dir, index)
    tmp = path + ".tmp"
    save_file({"noise": noise.to(dtype).contiguous(), "latents": latents.to(dtype).contiguous()}, tmp, metadata)
    os.replace(tmp, path)


def main(args=None):
    args = args if args is not None else parse_args()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    from dmdx.pipelines.teachers import adapter_for
    from dmdx.training.cli import load_prompts
    from dmdx.training.errors import UsageError

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Before any weights load: the teacher's architecture (one of the adapters') and resolution, the prompts.
    teacher = adapter_for(args.pretrained_model_name_or_path, cache_dir=args.cache_dir, variant=args.variant,
                          resolution=args.resolution)
    if teacher.video:
        raise UsageError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} is a "
                         f"{teacher.pipeline_class}: ODE pairs feed ADP, which pre-trains one-step image students; "
                         "video students are distilled from the teacher directly (train_adm_cogvideox.py).")
    latent_shape = teacher.latent_shape(args.resolution)
    prompts = load_prompts(args)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as AcceleratorState reads it
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)

    # 1. Teacher pipeline with a deterministic sampler.
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=dtype,
                                             variant=args.variant, cache_dir=args.cache_dir)
    pipe.scheduler, sampler = deterministic_scheduler(pipe)
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)
    manifest = manifest_for(args, pipe, sampler, latent_shape)

    # 2. Manifest (main process), refusing a folder made with other settings.
    if state.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        check_manifest(args.output_dir, manifest)
        with open(os.path.join(args.output_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
    state.wait_for_everyone()

    # 3. This process's shards (i % world == rank), skipping finished ones.
    num_shards = math.ceil(args.num_pairs / args.shard_size)
    mine = [i for i in range(num_shards) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not os.path.isfile(shard_path(args.output_dir, i))]
    if len(todo) < len(mine):
        logger.info("Process %d: skipping %d finished shards.", state.process_index, len(mine) - len(todo))
    total = sum(min(args.shard_size, args.num_pairs - i * args.shard_size) for i in todo)
    progress = tqdm(total=total, desc=f"ODE pairs (process {state.process_index})", unit="pair")
    for index in todo:
        collect_shard(pipe, prompts, args, index, latent_shape, state.device, progress)
    progress.close()
    state.wait_for_everyone()
    logger.info("Process %d wrote %d shards to %s (%s, %d steps, CFG %.1f).", state.process_index, len(todo),
                args.output_dir, sampler, args.num_inference_steps, args.guidance_scale)


if __name__ == "__main__":
    from dmdx.training.plumbing import exit_on_usage_error

    exit_on_usage_error(main)
