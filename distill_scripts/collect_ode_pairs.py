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
guidance, sampler). Pair j takes prompt ``perm_p[j mod P]`` of the P prompts, ``perm_p`` a permutation drawn for
pass p = j // P: every prompt is used once per pass. Shard ``i`` draws its noise with seed ``--seed + i`` and is
written atomically, so a rerun skips finished shards and any number of processes gives the same data. Keep shards
small (``--shard_size``): a preemption loses at most the shard in progress of each process. The shards still to do
are dealt out afresh at every start (round-robin over the processes), so a resumed run keeps the ranks even.

With ``--text_embeddings_cache`` the prompts are encoded once into the text-embedding cache (spread over the
processes; docs/gpus.md) and the teacher pipeline is loaded without its text encoders: it is called with the
cached ``prompt_embeds`` (and the empty prompt's as ``negative_prompt_embeds``). A ``--dataset_name`` is streamed,
its caption column only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os

import torch

logger = logging.getLogger("collect_ode_pairs")

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: prompts by a permutation per pass (1 drew them with replacement)


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
    parser.add_argument("--shard_size", type=int, default=64,
                        help="Pairs per shard file: the work a preemption can lose per process (64 SDXL pairs at "
                             "1024 px, 25 steps with CFG: minutes on one GPU).")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.0)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                        help="dtype of the teacher (the VAE is not used: latents are saved).")
    parser.add_argument("--save_dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--text_embeddings_cache", default=None,
                        help="Text-embedding cache folder (built where it lacks prompts; docs/gpus.md): the teacher "
                             "then loads without its text encoders.")
    parser.add_argument("--text_embeddings_shard_size", type=int, default=256, help="Prompts per cache shard.")
    parser.add_argument("--process_group_timeout", type=int, default=7200,
                        help="Seconds a process waits at a barrier for the others (torch.distributed's timeout; "
                             "NCCL's default 10 minutes can be shorter than one shard on a slow rank).")
    args = parser.parse_args(input_args)
    if (args.prompts_file is None) == (args.dataset_name is None):
        parser.error("give exactly one of --prompts_file or --dataset_name.")
    for name in ("num_pairs", "shard_size", "batch_size", "num_inference_steps", "resolution",
                 "text_embeddings_shard_size", "process_group_timeout"):
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
        "prompt_order": "permutation per pass",
    }


def check_manifest(output_dir: str, manifest: dict) -> None:
    """Refuse to mix pairs of another configuration into an existing output folder."""
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    keys = ("teacher", "resolution", "num_inference_steps", "guidance_scale", "sampler", "seed", "shard_size",
            "prompt_order")
    diff = {k: (old.get(k), manifest[k]) for k in keys if old.get(k) != manifest[k]}
    if diff:
        from dmdx.training.errors import UsageError

        raise UsageError(f"--output_dir {output_dir} already holds ODE pairs made with other settings {diff}; use "
                         f"a new --output_dir.")


def shard_path(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, f"shard-{index:05d}.safetensors")


def prompt_indices(num_prompts: int, seed: int, start: int, count: int) -> list[int]:
    """Prompt index of pairs start .. start + count - 1: pair j takes ``perm_p[j mod P]``, ``perm_p`` a random
    permutation of the P prompts for pass p = j // P (seeded by ``seed`` and p), so each prompt is used once per pass
    whichever shard or process draws it."""
    out, perms = [], {}
    for j in range(start, start + count):
        p = j // num_prompts
        if p not in perms:
            perms[p] = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + p))
        out.append(int(perms[p][j % num_prompts]))
    return out


def deal(unfinished: list[int], rank: int, world: int) -> list[int]:
    """Process ``rank``'s share of the unfinished shards: round-robin over what is left (not over all shards), so
    after a resume every process has within one shard of the same work."""
    return unfinished[rank::world]


def pipeline_conditioning(cache, prompts: list[str], device, dtype) -> dict:
    """The stock pipeline's embedding arguments for ``prompts`` from the text-embedding cache: each cached key (e.g.
    ``prompt_embeds``, ``pooled_prompt_embeds``) and its ``negative_`` twin (the empty prompt, for CFG)."""
    cond, negative = cache.conditioning(prompts, device), cache.negative(device)
    kwargs = {k: v.to(dtype) for k, v in cond.items()}
    kwargs.update({f"negative_{k}": v.to(dtype).expand(len(prompts), *v.shape[1:]) for k, v in negative.items()})
    return kwargs


@torch.no_grad()
def collect_shard(pipe, prompts: list[str], args, index: int, latent_shape, device, progress=None,
                  cache=None) -> None:
    """Sample shard ``index`` (noise seed ``--seed + index``) and write it atomically."""
    from safetensors.torch import save_file

    start = index * args.shard_size
    count = min(args.shard_size, args.num_pairs - start)
    generator = torch.Generator("cpu").manual_seed(args.seed + index)
    shard_prompts = [prompts[i] for i in prompt_indices(len(prompts), args.seed, start, count)]
    noise = torch.randn((count, *latent_shape), generator=generator)
    latents = []
    for b in range(0, count, args.batch_size):
        batch_noise = noise[b:b + args.batch_size]
        batch_prompts = shard_prompts[b:b + args.batch_size]
        text = ({"prompt": batch_prompts} if cache is None else
                pipeline_conditioning(cache, batch_prompts, device, pipe.dtype))
        out = pipe(**text, num_inference_steps=args.num_inference_steps,
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
    from accelerate.utils import InitProcessGroupKwargs, parse_flag_from_env
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    from dmdx.pipelines.teachers import adapter_for
    from dmdx.training.cli import load_prompts
    from dmdx.training.errors import UsageError
    from dmdx.training.loop import fill_text_cache, open_text_cache

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
    cache = open_text_cache(teacher, args, prompts)  # None without --text_embeddings_cache
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.process_group_timeout)).to_kwargs()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **timeout)  # as AcceleratorState reads it
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)

    # 1. The prompts' embeddings (cache), then the teacher pipeline (without text encoders when the cache feeds it)
    #    with a deterministic sampler.
    no_text = {}
    if cache is not None:
        fill_text_cache(teacher, cache, prompts, state.device, dtype, rank=state.process_index,
                        world=state.num_processes, barrier=state.wait_for_everyone,
                        shard_size=args.text_embeddings_shard_size)
        no_text = {name: None for name in teacher.text_components()}
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=dtype,
                                             variant=args.variant, cache_dir=args.cache_dir, **no_text)
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

    # 3. The unfinished shards, dealt out round-robin: every process lists them before any writes one (the
    #    barrier), so all agree on the split; after a resume the ranks stay even.
    num_shards = math.ceil(args.num_pairs / args.shard_size)
    unfinished = [i for i in range(num_shards) if not os.path.isfile(shard_path(args.output_dir, i))]
    state.wait_for_everyone()
    todo = deal(unfinished, state.process_index, state.num_processes)
    if state.is_main_process and len(unfinished) < num_shards:
        logger.info("Resuming: skipping %d finished shards; %d left for %d processes.", num_shards - len(unfinished),
                    len(unfinished), state.num_processes)
    total = sum(min(args.shard_size, args.num_pairs - i * args.shard_size) for i in todo)
    progress = tqdm(total=total, desc=f"ODE pairs (process {state.process_index})", unit="pair")
    for index in todo:
        collect_shard(pipe, prompts, args, index, latent_shape, state.device, progress, cache=cache)
    progress.close()
    state.wait_for_everyone()
    logger.info("Process %d wrote %d shards to %s (%s, %d steps, CFG %.1f).", state.process_index, len(todo),
                args.output_dir, sampler, args.num_inference_steps, args.guidance_scale)


if __name__ == "__main__":
    from dmdx.training.plumbing import exit_on_usage_error

    exit_on_usage_error(main)
