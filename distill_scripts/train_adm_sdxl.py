#!/usr/bin/env python
"""Adversarial Distribution Matching (ADM) for SDXL: the second stage of DMDX, and DMD2 as the baseline.

    accelerate launch distill_scripts/train_adm_sdxl.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --pretrained_generator_name_or_path sdxl-adp \
        --prompts_file prompts.txt --output_dir sdxl-dmdx

One iteration = one generator update (paper_spec §2, §12):
  1. fake score f_psi: ordinary denoising loss on detached generator samples (``--fake_score_update_ratio`` times);
  2. generator G: x0 = G(z); x_t = add_noise(x0, eps, t), t ~ U[2%, 98%] of T; from the same x_t one PF-ODE step
     t -> s = t - dt with the teacher (with CFG) and with the fake score (parameters frozen, gradient through its
     input); loss = -D(x_fake, s), D = the **same frozen teacher UNet object** + trainable heads on its
     down/mid-block features (one teacher copy in memory);
  3. discriminator heads: hinge loss on the detached x_real / x_fake of step 2 (``--discriminator_update_ratio``).
With ``--distribution_loss dmd`` step 2 is DMD2's normalised distribution-matching loss, there is no discriminator,
and the fake score updates 5 times per generator update unless told otherwise.

The student's parametrisation and training timesteps come from the scheduler it ships with (DESIGN.md §4.5):
the generator folder's scheduler (an ADP output ships a rectified-flow DPMSolver config; its UNet predicts
v = noise - x0), or, when the generator is the teacher itself, an ``LCMScheduler`` built from the teacher's config
(epsilon, trailing timesteps [999] / [999, 749, 499, 249]). The final ``--output_dir`` is a stock
``StableDiffusionXLPipeline`` folder with that scheduler.

The per-iteration work lives in importable functions (``build_models``, ``train_iteration``) so a benchmark can time
exactly this script's step; nothing runs at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("train_adm_sdxl")

SDXL_PIPELINES = ("StableDiffusionXLPipeline",)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the SDXL training scripts (diffusers' vocabulary, DESIGN.md §4.4)."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="The SDXL teacher (Hub id or folder).")
    g.add_argument("--variant", default=None, help="Weights variant of the teacher, e.g. fp16.")
    g.add_argument("--prompts_file", default=None, help="Text file, one prompt per line.")
    g.add_argument("--dataset_name", default=None,
                   help="A datasets name or a local .json/.jsonl/.csv/.parquet/folder with a caption column.")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--resolution", type=int, default=1024, help="Training (and student) image size in pixels.")
    g.add_argument("--output_dir", default="sdxl-dmdx")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cache_dir", default=None)

    g = parser.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=1, help="Per device.")
    g.add_argument("--max_train_steps", type=int, default=1000, help="Generator updates.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches accumulated into every update (of each network).")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--generator_lr", type=float, default=5e-7)
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=10.0)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (must be installed).")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Frozen models are kept in this dtype; trainable ones in fp32 under autocast.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the generator (exported if set).")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--lora_rank", type=int, default=0, help="Generator LoRA rank; 0 = full fine-tuning.")
    g.add_argument("--lora_alpha", type=int, default=None, help="Defaults to the rank.")
    g.add_argument("--discriminator_head_channels", type=int, default=256)
    g.add_argument("--discriminator_blocks", default=None,
                   help="Comma-separated UNet blocks feeding D heads; default: every down block and the mid block.")

    g = parser.add_argument_group("logging, checkpoints, export")
    g.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb", "all"])
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')
    g.add_argument("--validation_prompts", nargs="+", default=None)
    g.add_argument("--validation_steps", type=int, default=500)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g.add_argument("--hub_private_repo", action="store_true")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    g = parser.add_argument_group("ADM / DMD2")
    g.add_argument("--pretrained_generator_name_or_path", default=None,
                   help="Generator initialisation: an ADP output folder (DMDX) or, by default, the teacher.")
    g.add_argument("--distribution_loss", default="adm", choices=["adm", "dmd"])
    g.add_argument("--num_student_steps", type=int, default=1)
    g.add_argument("--guidance_scale", type=float, default=8.0, help="Teacher CFG of the real score (DMD2: 8).")
    g.add_argument("--ode_step_dt", type=float, default=1 / 64, help="ADM's PF-ODE step, as a fraction of T.")
    g.add_argument("--min_timestep_percent", type=float, default=0.02)
    g.add_argument("--max_timestep_percent", type=float, default=0.98)
    g.add_argument("--fake_score_update_ratio", type=int, default=None,
                   help="Fake-score updates per generator update (default 1 for adm, 5 for dmd).")
    g.add_argument("--discriminator_update_ratio", type=int, default=1)
    g.add_argument("--discriminator_warmup_steps", type=int, default=0,
                   help="The first N iterations update the fake score and D only; the generator is frozen.")
    g.add_argument("--fake_score_lr", type=float, default=None, help="Defaults to --generator_lr.")
    g.add_argument("--discriminator_lr", type=float, default=1e-5)
    g.add_argument("--fake_score_lora_rank", type=int, default=0, help="Fake-score LoRA rank; 0 = full copy.")
    args = parser.parse_args(input_args)

    if args.fake_score_update_ratio is None:
        args.fake_score_update_ratio = 5 if args.distribution_loss == "dmd" else 1
    if args.fake_score_lr is None:
        args.fake_score_lr = args.generator_lr
    validate_common_args(args)
    if args.num_student_steps < 1:
        raise ValueError("--num_student_steps must be >= 1.")
    if not 0 < args.ode_step_dt <= args.min_timestep_percent:
        raise ValueError(f"--ode_step_dt {args.ode_step_dt} must be in (0, --min_timestep_percent "
                         f"{args.min_timestep_percent}] so that s = t - dt stays >= 0.")
    if not 0 <= args.min_timestep_percent < args.max_timestep_percent <= 1:
        raise ValueError("Need 0 <= --min_timestep_percent < --max_timestep_percent <= 1.")
    if min(args.fake_score_update_ratio, args.discriminator_update_ratio) < 1:
        raise ValueError("Update ratios must be >= 1.")
    return args


def validate_common_args(args, needs_prompts: bool = True) -> None:
    if needs_prompts and (args.prompts_file is None) == (args.dataset_name is None):
        raise ValueError("Give exactly one of --prompts_file or --dataset_name.")
    if args.use_ema and args.lora_rank > 0:
        raise ValueError("--use_ema is for full fine-tuning; it is not supported with --lora_rank.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from e
    if min(args.train_batch_size, args.max_train_steps, args.gradient_accumulation_steps,
           args.checkpointing_steps, args.validation_steps) < 1:
        raise ValueError("Batch size, steps and intervals must be >= 1.")


# ----------------------------------------------------------------------------------------------------------------
# SDXL-specific helpers (also used by train_adp_sdxl.py)
# ----------------------------------------------------------------------------------------------------------------
def check_sdxl_checkpoint(path: str, resolution: int | None = None, what: str = "--pretrained_model_name_or_path",
                          **kwargs) -> dict:
    """Read configs only (no weights) and refuse anything that is not an SDXL pipeline, or a resolution its VAE and
    UNet cannot take. Returns the UNet config."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    try:
        index = DiffusionPipeline.load_config(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the flag named
        raise ValueError(f"{what}={path!r} is not a diffusers pipeline folder or Hub id ({e}).") from e
    unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", **kwargs) if "unet" in index else {}
    if index.get("_class_name") not in SDXL_PIPELINES or unet_config.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"{what}={path!r} is a {index.get('_class_name')} whose denoiser is not an SDXL UNet "
            f"(addition_embed_type={unet_config.get('addition_embed_type')!r}); this script needs an SDXL checkpoint "
            f"such as stabilityai/stable-diffusion-xl-base-1.0 (see train_adm_sd3.py for SD3).")
    if resolution is not None:
        vae_config = AutoencoderKL.load_config(path, subfolder="vae", **kwargs)
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1) * 2 ** (len(unet_config["down_block_types"]) - 1)
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"--resolution {resolution} must be a positive multiple of {factor} (VAE factor x "
                             f"UNet downsampling) for {path}.")
    return unet_config


def load_prompts(args) -> list[str]:
    """Prompts from ``--prompts_file`` (one per line) or a datasets dataset's ``--caption_column``."""
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise FileNotFoundError(f"--prompts_file {args.prompts_file!r} does not exist.")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        source = args.prompts_file
    else:
        from datasets import load_dataset

        name, ext = args.dataset_name, os.path.splitext(args.dataset_name)[1].lstrip(".")
        if os.path.isfile(name) and ext in ("json", "jsonl", "csv", "parquet", "txt"):
            builder = {"jsonl": "json"}.get(ext, ext)
            dataset = load_dataset(builder, data_files=name, split="train", cache_dir=args.cache_dir)
        else:
            dataset = load_dataset(name, args.dataset_config_name, split=args.dataset_split,
                                   cache_dir=args.cache_dir)
        if args.caption_column not in dataset.column_names:
            raise ValueError(f"--caption_column {args.caption_column!r} not in {args.dataset_name} columns "
                             f"{dataset.column_names}.")
        prompts = [str(p).strip() for p in dataset[args.caption_column] if p is not None and str(p).strip()]
        source = f"{args.dataset_name}[{args.caption_column}]"
    if not prompts:
        raise ValueError(f"No prompts in {source}: it is empty.")
    return prompts


@dataclass
class Cond:
    """SDXL conditioning of a batch: prompt embeddings, pooled text embeddings, added time ids."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    def cat(self, other: Cond) -> Cond:
        return Cond(*(torch.cat([a, b]) for a, b in zip((self.embeds, self.pooled, self.time_ids),
                                                         (other.embeds, other.pooled, other.time_ids))))


@torch.no_grad()
def encode_prompts(prompts: list[str], tokenizers, text_encoders, resolution: int, device,
                   zero_uncond: bool = True) -> tuple[Cond, Cond]:
    """(conditional, unconditional) SDXL conditioning, as StableDiffusionXLPipeline.encode_prompt builds it:
    penultimate hidden states of both CLIP encoders, pooled output of the second; empty-prompt embeddings are zeros
    when the pipeline says ``force_zeros_for_empty_prompt``."""

    def run(texts):
        embeds, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1).float(), pooled.float()

    embeds, pooled = run(prompts)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device,
                            dtype=torch.float32).repeat(len(prompts), 1)
    if zero_uncond:
        uncond = Cond(torch.zeros_like(embeds), torch.zeros_like(pooled), time_ids)
    else:
        uncond = Cond(*run([""] * len(prompts)), time_ids)
    return Cond(embeds, pooled, time_ids), uncond


def unet_output(unet, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """A UNet's raw prediction at ``(x, t)`` under ``cond``, in fp32."""
    return unet(x, t, encoder_hidden_states=cond.embeds,
                added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample.float()


def default_discriminator_blocks(unet_config: dict) -> list[str]:
    return [f"down_blocks.{i}" for i in range(len(unet_config["down_block_types"]))] + ["mid_block"]


def add_lora(unet, rank: int, alpha: int | None):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    return unet


def make_optimizer(args, params, lr: float):
    params = [p for p in params if p.requires_grad]
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
               eps=args.adam_epsilon)


def image_grid(images, cols: int | None = None):
    from PIL import Image

    cols = cols or min(len(images), 4)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def log_validation(accelerator, args, unet, vae, text_encoders, tokenizers, scheduler, num_inference_steps: int,
                   step: int, path: str, force_zeros_for_empty_prompt: bool = True):
    """Generate the validation prompts with the student exactly as users will (stock pipeline, the shipped
    scheduler, no CFG), save a PNG grid at ``path`` and log it to the trackers. Uses its own torch.Generator, so
    the training RNG stream is untouched (resumed runs stay identical)."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=copy.deepcopy(scheduler),
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    images = []
    with accelerator.autocast():
        for prompt in args.validation_prompts:
            images += pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=0.0,
                           height=args.resolution, width=args.resolution, generator=generator).images
    grid = image_grid(images)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                      dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(i, caption=p) for i, p in zip(images, args.validation_prompts)]})
    return grid


def validate_student(accelerator, args, models, num_inference_steps: int, step: int):
    """Main process: ``log_validation`` on the generator (its EMA weights when ``--use_ema``, then the training
    weights are put back), into ``output_dir/validation/step-N.png``."""
    generator = accelerator.unwrap_model(models.generator)
    if models.ema is not None:
        models.ema.store(generator.parameters())
        models.ema.copy_to(generator.parameters())
    log_validation(accelerator, args, generator, models.vae, models.text_encoders, models.tokenizers,
                   models.student_scheduler, num_inference_steps, step,
                   os.path.join(args.output_dir, "validation", f"step-{step:06d}.png"),
                   models.force_zeros_for_empty_prompt)
    if models.ema is not None:
        models.ema.restore(generator.parameters())


def load_student_scheduler(generator_path: str, teacher_path: str, num_student_steps: int, **kwargs):
    """The scheduler the student will ship with: the generator folder's own (an ADP output) or, for a generator
    initialised from the teacher, an LCMScheduler on the teacher's betas with trailing timesteps
    (1 step -> [999], 4 steps -> [999, 749, 499, 249])."""
    import diffusers
    from diffusers import LCMScheduler

    if os.path.abspath(generator_path) != os.path.abspath(teacher_path):
        config = scheduler_config(generator_path, **kwargs)
        cls = getattr(diffusers, config["_class_name"], None)
        if cls is None:
            raise ValueError(f"Unknown scheduler class {config['_class_name']!r} in {generator_path}.")
        return cls.from_config(config)
    import inspect

    accepted = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in scheduler_config(teacher_path, **kwargs).items() if k in accepted}
    return LCMScheduler.from_config(config, timestep_spacing="trailing", original_inference_steps=num_student_steps)


# ----------------------------------------------------------------------------------------------------------------
# Models and one training iteration (importable: the step-cost benchmark times these)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ADMModels:
    teacher: Any  # frozen UNet: the real score AND the discriminator backbone (one copy)
    generator: Any
    fake_score: Any
    heads: Any  # DiscriminatorHeads (None for dmd)
    features: Any  # BackboneFeatures hooks on the teacher (None for dmd)
    vae: Any
    text_encoders: list
    tokenizers: list
    teacher_schedule: Any
    student_scheduler: Any
    student_schedule: Any
    student_timesteps: torch.Tensor
    renoise: str
    latent_shape: tuple
    weight_dtype: torch.dtype
    force_zeros_for_empty_prompt: bool = True
    optimizers: dict = field(default_factory=dict)
    lr_schedulers: dict = field(default_factory=dict)
    ema: Any = None


def build_models(args, accelerator) -> ADMModels:
    """Load teacher, generator, fake score, discriminator heads, VAE and text encoders; freeze what is frozen."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from dmdx.training import (
        BackboneFeatures,
        DiscriminatorHeads,
        renoise_mode,
        schedule_from_scheduler_config,
        student_timesteps,
    )

    teacher_path = args.pretrained_model_name_or_path
    generator_path = args.pretrained_generator_name_or_path or teacher_path
    load = {"cache_dir": args.cache_dir}
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    tokenizers = [AutoTokenizer.from_pretrained(teacher_path, subfolder=s, **load)
                  for s in ("tokenizer", "tokenizer_2")]
    text_encoders = [
        CLIPTextModel.from_pretrained(teacher_path, subfolder="text_encoder", variant=args.variant, **load),
        CLIPTextModelWithProjection.from_pretrained(teacher_path, subfolder="text_encoder_2", variant=args.variant,
                                                    **load),
    ]
    vae = AutoencoderKL.from_pretrained(teacher_path, subfolder="vae", variant=args.variant, **load)
    teacher = UNet2DConditionModel.from_pretrained(teacher_path, subfolder="unet", variant=args.variant,
                                                   torch_dtype=weight_dtype, **load)
    gen_variant = args.variant if generator_path == teacher_path else None
    generator = UNet2DConditionModel.from_pretrained(generator_path, subfolder="unet", variant=gen_variant,
                                                     torch_dtype=torch.float32, **load)
    fake_score = UNet2DConditionModel.from_pretrained(teacher_path, subfolder="unet", variant=args.variant,
                                                      torch_dtype=torch.float32, **load)
    index = DiffusionPipeline.load_config(teacher_path, **load)

    # Frozen: teacher, VAE (fp32: SDXL's VAE overflows in fp16), text encoders. In eval mode, no gradients.
    for module in (teacher, vae, *text_encoders):
        module.requires_grad_(False).eval().to(device)
    for encoder in text_encoders:
        encoder.to(dtype=weight_dtype)

    # Trainable: generator and fake score (full fp32 master weights, or LoRA adapters in fp32 on a frozen base).
    for module, rank in ((generator, args.lora_rank), (fake_score, getattr(args, "fake_score_lora_rank", 0))):
        if rank > 0:
            module.requires_grad_(False).to(device, dtype=weight_dtype)  # frozen base in the mixed-precision dtype
            add_lora(module, rank, args.lora_alpha)
            cast_training_params(module, dtype=torch.float32)
        else:
            module.requires_grad_(True).to(device)
        module.train()
    if args.gradient_checkpointing:
        for module in (teacher, generator, fake_score):
            module.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available() or device.type != "cuda":
            raise ValueError("--enable_xformers_memory_efficient_attention needs xformers and a CUDA device.")
        for module in (teacher, generator, fake_score):
            module.enable_xformers_memory_efficient_attention()

    # The student's schedule: one source of truth, its shipped scheduler.
    student_scheduler = load_student_scheduler(generator_path, teacher_path, args.num_student_steps, **load)
    teacher_schedule = schedule_from_scheduler_config(scheduler_config(teacher_path, **load))
    student_schedule = schedule_from_scheduler_config(
        {**student_scheduler.config, "_class_name": type(student_scheduler).__name__})
    timesteps = student_timesteps(student_scheduler, args.num_student_steps)

    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (teacher.config.in_channels, args.resolution // vae_factor, args.resolution // vae_factor)

    heads = features = None
    if args.distribution_loss == "adm":
        blocks = args.discriminator_blocks.split(",") if args.discriminator_blocks else \
            default_discriminator_blocks(teacher.config)
        features = BackboneFeatures(teacher, blocks)
        shapes = feature_shapes(teacher, features, latent_shape, text_encoders, tokenizers, args.resolution, device)
        heads = DiscriminatorHeads(shapes, hidden_channels=args.discriminator_head_channels).to(device).train()

    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(generator.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                       model_config=generator.config)
        ema.to(device)
    return ADMModels(teacher=teacher, generator=generator, fake_score=fake_score, heads=heads, features=features,
                     vae=vae, text_encoders=text_encoders, tokenizers=tokenizers, teacher_schedule=teacher_schedule,
                     student_scheduler=student_scheduler, student_schedule=student_schedule,
                     student_timesteps=timesteps, renoise=renoise_mode(student_scheduler), latent_shape=latent_shape,
                     weight_dtype=weight_dtype, ema=ema,
                     force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))


def scheduler_config(path: str, **kwargs) -> dict:
    """A pipeline folder's scheduler config (any scheduler class; ConfigMixin.load_config only reads the file)."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(path, subfolder="scheduler", **kwargs))


@torch.no_grad()
def feature_shapes(unet, features, latent_shape, text_encoders, tokenizers, resolution, device) -> list[tuple]:
    """(C, H, W) of each hooked block's output, from one dry run of the teacher."""
    cond, _ = encode_prompts([""], tokenizers, text_encoders, resolution, device)
    x = torch.zeros((1, *latent_shape), device=device, dtype=unet.dtype)
    t = torch.tensor([500.0], device=device)
    feats = features(lambda: unet_output(unet, x, t, _cast(cond, unet.dtype)))
    return [tuple(f.shape[1:]) for f in feats]


def _cast(cond: Cond, dtype) -> Cond:
    return Cond(cond.embeds.to(dtype), cond.pooled.to(dtype), cond.time_ids.to(dtype))


def create_optimizers(args, models: ADMModels) -> None:
    from diffusers.optimization import get_scheduler

    specs = {"generator": (models.generator, args.generator_lr, 1),
             "fake_score": (models.fake_score, args.fake_score_lr, args.fake_score_update_ratio)}
    if models.heads is not None:
        specs["discriminator"] = (models.heads, args.discriminator_lr, args.discriminator_update_ratio)
    for name, (module, lr, ratio) in specs.items():
        optimizer = make_optimizer(args, module.parameters(), lr)
        models.optimizers[name] = optimizer
        # AcceleratedScheduler steps once per process per call, hence the num_processes factor (as in diffusers).
        n = getattr(args, "num_processes", 1)
        models.lr_schedulers[name] = get_scheduler(args.lr_scheduler, optimizer,
                                                   num_warmup_steps=args.lr_warmup_steps * ratio * n,
                                                   num_training_steps=args.max_train_steps * ratio * n)


def prepare(accelerator, models: ADMModels) -> None:
    """accelerator.prepare the trainable networks, their optimizers and LR schedulers (DDP, autocast)."""
    names = list(models.optimizers)
    modules = {"generator": models.generator, "fake_score": models.fake_score, "discriminator": models.heads}
    prepared = accelerator.prepare(*(modules[n] for n in names), *(models.optimizers[n] for n in names),
                                   *(models.lr_schedulers[n] for n in names))
    k = len(names)
    for i, name in enumerate(names):
        setattr(models, {"discriminator": "heads"}.get(name, name), prepared[i])
        models.optimizers[name] = prepared[k + i]
        models.lr_schedulers[name] = prepared[2 * k + i]
    if models.ema is not None:
        accelerator.register_for_checkpointing(models.ema)


class _Step:
    """Shared pieces of an iteration: prompt batches, conditioning, the three denoisers and D."""

    def __init__(self, args, accelerator, models: ADMModels, prompts: list[str]):
        self.args, self.acc, self.m, self.prompts = args, accelerator, models, prompts
        self.T = models.teacher_schedule.T
        self.device = accelerator.device

    def batch(self) -> tuple[Cond, Cond]:
        idx = torch.randint(len(self.prompts), (self.args.train_batch_size,)).tolist()
        return encode_prompts([self.prompts[i] for i in idx], self.m.tokenizers, self.m.text_encoders,
                              self.args.resolution, self.device, self.m.force_zeros_for_empty_prompt)

    def noise_level(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ADM's t ~ U[min%, max%] of T and s = t - dt * T (float model timesteps)."""
        from dmdx.training import uniform_timesteps

        t = uniform_timesteps(n, self.args.min_timestep_percent * self.T, self.args.max_timestep_percent * self.T)
        t = t.to(self.device)
        return t, t - self.args.ode_step_dt * self.T

    def generate(self, generator, cond: Cond) -> torch.Tensor:
        """x0 = G(student input). One step: pure noise at the first student timestep. More steps: a random step k
        whose input comes from the student's own first k steps without gradients (backward simulation)."""
        from dmdx.training import backward_simulate

        m = self.m
        n = cond.embeds.shape[0]
        z = torch.randn((n, *m.latent_shape), device=self.device)
        k = int(torch.randint(len(m.student_timesteps), ()).item()) if len(m.student_timesteps) > 1 else 0
        gen_plain = self.acc.unwrap_model(generator)
        gen_x0 = lambda g: lambda x, t: m.student_schedule.to_x0_noise(unet_output(g, x, t, cond), x, t)[0]
        x = backward_simulate(gen_x0(gen_plain), z, m.student_timesteps, k, m.student_schedule, m.renoise) \
            if k else z
        t = m.student_timesteps[k].expand(n).to(self.device)
        return gen_x0(generator)(x, t)

    def real_x0(self, x_t, t, cond: Cond, uncond: Cond) -> torch.Tensor:
        """Teacher x0 with CFG (no gradient)."""
        from dmdx.training import apply_cfg

        with torch.no_grad():
            out = unet_output(self.m.teacher, torch.cat([x_t, x_t]).detach(), torch.cat([t, t]), uncond.cat(cond))
            out_uncond, out_cond = out.chunk(2)
            eps = apply_cfg(out_cond, out_uncond, self.args.guidance_scale)
            return self.m.teacher_schedule.to_x0_noise(eps, x_t.detach(), t)[0]

    def fake_x0(self, fake, x_t, t, cond: Cond) -> torch.Tensor:
        return self.m.teacher_schedule.to_x0_noise(unet_output(fake, x_t, t, cond), x_t, t)[0]

    def discriminate(self, heads, x, s, cond: Cond, backbone_grad: bool) -> torch.Tensor:
        """D(x, s) = heads(teacher block features at (x, s)). ``backbone_grad=False`` runs the backbone without
        autograd (the D update only needs gradients for the heads)."""
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            feats = self.m.features(lambda: unet_output(self.m.teacher, x, s, cond))
        return heads(feats)


def _accumulated_update(acc, args, module, name, models, micro_loss_fn, logs, log_weight: float = 1.0) -> None:
    """One optimizer update of ``module`` over ``--gradient_accumulation_steps`` micro-batches: every loss term is
    checked for non-finite values before backward (stop naming it), then clip, step, LR-schedule step. Loss terms
    are added to ``logs`` averaged over micro-batches and times ``log_weight`` (1 / update ratio)."""
    from dmdx.training.checkpointing import check_finite

    optimizer, k = models.optimizers[name], args.gradient_accumulation_steps
    optimizer.zero_grad(set_to_none=True)
    for i in range(k):
        with acc.no_sync(module) if i < k - 1 else contextlib.nullcontext():  # all-reduce on the last only
            loss, terms = micro_loss_fn()
            check_finite(terms, acc)
            acc.backward(loss / k)
        for key, value in terms.items():
            logs[key] = logs.get(key, 0.0) + value.detach().float().item() * log_weight / k
    params = [p for p in module.parameters() if p.requires_grad]
    logs[f"grad_norm_{name}"] = float(acc.clip_grad_norm_(params, args.max_grad_norm))
    optimizer.step()
    models.lr_schedulers[name].step()
    optimizer.zero_grad(set_to_none=True)


def train_iteration(args, accelerator, models: ADMModels, prompts: list[str], global_step: int) -> dict[str, float]:
    """One ADM (or DMD2) iteration = one generator update; returns every loss term and diagnostic."""
    from dmdx.training import (
        adm_latent_predictions,
        discriminator_diagnostics,
        dmd_loss,
        fake_score_denoising_loss,
        frozen_parameters,
        generator_adversarial_loss,
        hinge_discriminator_loss,
        uniform_timesteps,
    )

    st, m, logs = _Step(args, accelerator, models, prompts), models, {}
    fake_plain, heads_plain = accelerator.unwrap_model(m.fake_score), None
    warmup = global_step < args.discriminator_warmup_steps

    with accelerator.autocast():
        # 1. Fake score: denoising loss on detached generator samples (TTUR: --fake_score_update_ratio).
        def fake_loss():
            cond, _ = st.batch()
            with torch.no_grad():
                x0 = st.generate(m.generator, cond)
            t = uniform_timesteps(x0.shape[0], args.min_timestep_percent * st.T,
                                  args.max_timestep_percent * st.T).to(st.device)
            noise = torch.randn_like(x0)
            x_t = m.teacher_schedule.add_noise(x0, noise, t)
            loss = fake_score_denoising_loss(unet_output(m.fake_score, x_t, t, cond), x0, noise, t,
                                             m.teacher_schedule).mean()
            return loss, {"fake_score_loss": loss}

        for _ in range(args.fake_score_update_ratio):
            _accumulated_update(accelerator, args, m.fake_score, "fake_score", m, fake_loss, logs,
                                1 / args.fake_score_update_ratio)

        # 2. Generator: x0 = G(z), x_t = add_noise(x0, eps, t); one PF-ODE step t -> s = t - dt from the same x_t
        #    with the teacher (CFG) and the fake score (frozen, gradient through its input); loss = -D(x_fake, s).
        if m.heads is not None:
            heads_plain = accelerator.unwrap_model(m.heads)
        saved = {}

        def generator_loss():
            cond, uncond = st.batch()
            x0 = st.generate(m.generator, cond)
            t, s = st.noise_level(x0.shape[0])
            noise = torch.randn_like(x0)
            if args.distribution_loss == "dmd":  # DMD2: x_t from sg(x0); gradient only through x0
                x_t = m.teacher_schedule.add_noise(x0.detach(), noise, t)
                with torch.no_grad():
                    x0_real, x0_fake = st.real_x0(x_t, t, cond, uncond), st.fake_x0(fake_plain, x_t, t, cond)
                loss = dmd_loss(x0, x0_real, x0_fake).mean()
                return loss, {"generator_loss": loss}
            x_t = m.teacher_schedule.add_noise(x0, noise, t)
            x0_hat = {}
            real = lambda x, tt: x0_hat.setdefault("real", st.real_x0(x, tt, cond, uncond))
            fake = lambda x, tt: x0_hat.setdefault("fake", st.fake_x0(fake_plain, x, tt, cond))
            x_real, x_fake = adm_latent_predictions(x_t, t, s, real, fake, m.teacher_schedule)
            logits_fake = st.discriminate(heads_plain, x_fake, s, cond, backbone_grad=True)
            loss = generator_adversarial_loss(logits_fake).mean()
            saved.update(x_real=x_real.detach(), x_fake=x_fake.detach(), s=s, cond=cond)
            with torch.no_grad():  # recorded, not optimised (the paper's Fig. 3 signal)
                dmd_monitor = dmd_loss(x0.detach(), x0_hat["real"], x0_hat["fake"].detach()).mean()
            return loss, {"generator_loss": loss, "dmd_loss_monitor": dmd_monitor,
                          "latent_prediction_gap": (x_real - x_fake).detach().abs().mean()}

        with frozen_parameters(m.fake_score, m.heads):  # gradient flows through their inputs to G only
            if warmup:  # D warm-up: the generator is frozen; losses still computed for D's inputs and the logs
                with torch.no_grad():
                    loss, terms = generator_loss()
                logs.update({k: v.float().item() for k, v in terms.items()})
            else:
                _accumulated_update(accelerator, args, m.generator, "generator", m, generator_loss, logs)
                if m.ema is not None:
                    m.ema.step(accelerator.unwrap_model(m.generator).parameters())

        # 3. Discriminator heads: hinge loss on the detached x_real (teacher) vs x_fake (fake score) of step 2.
        if m.heads is not None:
            diagnostics = {}

            def discriminator_loss():
                if not saved:  # further D updates (ratio > 1) draw fresh predictions
                    cond, uncond = st.batch()
                    with torch.no_grad():
                        x0 = st.generate(m.generator, cond)
                        t, s = st.noise_level(x0.shape[0])
                        x_t = m.teacher_schedule.add_noise(x0, torch.randn_like(x0), t)
                        x_real, x_fake = adm_latent_predictions(
                            x_t, t, s, lambda x, tt: st.real_x0(x, tt, cond, uncond),
                            lambda x, tt: st.fake_x0(fake_plain, x, tt, cond), m.teacher_schedule)
                    saved.update(x_real=x_real, x_fake=x_fake, s=s, cond=cond)
                x_real, x_fake, s, cond = saved.pop("x_real"), saved.pop("x_fake"), saved.pop("s"), saved.pop("cond")
                logits = st.discriminate(m.heads, torch.cat([x_real, x_fake]), torch.cat([s, s]), cond.cat(cond),
                                         backbone_grad=False)
                logits_real, logits_fake = logits.chunk(2)
                diagnostics.update(discriminator_diagnostics(logits_real, logits_fake))
                # Per noise band: at dt = T/64 D's signal tends to sit at low noise only (DESIGN.md §2).
                for band, mask in (("high_noise", s >= st.T / 2), ("low_noise", s < st.T / 2)):
                    if mask.any():
                        band_diag = discriminator_diagnostics(logits_real[mask], logits_fake[mask])
                        diagnostics[f"d_accuracy_{band}"] = band_diag["d_accuracy"]
                        diagnostics[f"logit_gap_{band}"] = band_diag["logit_gap"]
                loss = hinge_discriminator_loss(logits_real, logits_fake).mean()
                return loss, {"discriminator_loss": loss}

            for _ in range(args.discriminator_update_ratio):
                _accumulated_update(accelerator, args, m.heads, "discriminator", m, discriminator_loss, logs,
                                    1 / args.discriminator_update_ratio)
            logs.update(diagnostics)

    for name, scheduler in m.lr_schedulers.items():
        logs[f"lr_{name}"] = scheduler.get_last_lr()[0]
    logs["generator_frozen"] = float(warmup)
    return logs


# ----------------------------------------------------------------------------------------------------------------
# Export, shared by the SDXL scripts
# ----------------------------------------------------------------------------------------------------------------
def training_config(args, models, method: str) -> dict:
    """What the run trained: the student's timesteps (== what the exported scheduler gives), parametrisation and
    every argument. Written to ``output_dir/training_config.json``."""
    config = {k: v for k, v in vars(args).items() if k != "hub_token"}
    return {
        "method": method,
        "student_timesteps": [float(t) for t in models.student_timesteps],
        "num_student_steps": len(models.student_timesteps),
        "student_scheduler": type(models.student_scheduler).__name__,
        "student_prediction_type": models.student_schedule.prediction_type,
        "args": config,
    }


def export_student(accelerator, args, models, generator, method: str, base_model: str) -> None:
    """Main process: full SDXL pipeline folder (+ LoRA weights), sample grid, training config, model card, upload."""
    from dmdx.pipelines.export import merged_copy, save_lora_adapter, save_student_pipeline
    from dmdx.pipelines.hub import push_to_hub
    from dmdx.pipelines.model_card import write_model_card

    lora = args.lora_rank > 0
    unet = merged_copy(generator) if lora else generator
    save_student_pipeline(args.pretrained_model_name_or_path, args.output_dir, {"unet": unet},
                          scheduler=models.student_scheduler, cache_dir=args.cache_dir)
    if lora:
        save_lora_adapter(args.output_dir, generator)
    sample_grid = None
    if args.validation_prompts:
        log_validation(accelerator, args, unet, models.vae, models.text_encoders, models.tokenizers,
                       models.student_scheduler, len(models.student_timesteps), args.max_train_steps,
                       os.path.join(args.output_dir, "samples.png"), models.force_zeros_for_empty_prompt)
        sample_grid = "samples.png"
    path = os.path.join(args.output_dir, "training_config.json")
    config = training_config(args, models, method)
    if os.path.isfile(path):
        with open(path) as f:
            config = {**json.load(f), **config}
    with open(path, "w") as f:
        json.dump(config, f, indent=2, default=str)
    write_model_card(
        args.output_dir, base_model=base_model, pipeline_class="StableDiffusionXLPipeline",
        num_inference_steps=len(models.student_timesteps), timesteps=config["student_timesteps"],
        guidance_scale=0.0, method=method, lora=lora, sample_grid=sample_grid, repo_id=args.hub_model_id,
        scheduler_class=config["student_scheduler"],
        training_details={"resolution": args.resolution, "generator updates": args.max_train_steps,
                          "batch size per device": args.train_batch_size},
    )
    if args.push_to_hub:
        push_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)


def record_rank_checksums(accelerator, args, generator) -> None:
    """Gather a checksum of the generator's weights from every process into training_config.json: DDP must keep
    the ranks identical, and this records that it did."""
    with torch.no_grad():
        params = [p.detach().double() for p in accelerator.unwrap_model(generator).parameters()]
        local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])
    checksums = accelerator.gather(local.to(accelerator.device).reshape(1, 2)).cpu().tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = os.path.join(args.output_dir, "training_config.json")
        with open(path) as f:
            config = json.load(f)
        config["generator_checksum_per_rank"] = checksums
        with open(path, "w") as f:
            json.dump(config, f, indent=2, default=str)
        if any(c != checksums[0] for c in checksums):
            logger.warning("Generator weights differ between ranks: %s", checksums)


def log_step(accelerator, args, logs: dict, step: int) -> None:
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "train_log.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def main(args=None):
    args = args if args is not None else parse_args()
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from dmdx.training.checkpointing import checkpoint_step, find_resume_checkpoint, save_checkpoint

    # 0. Refuse bad input before any heavy work: non-SDXL checkpoints, bad resolution, missing/empty prompts.
    check_sdxl_checkpoint(args.pretrained_model_name_or_path, args.resolution, cache_dir=args.cache_dir)
    if args.pretrained_generator_name_or_path:
        check_sdxl_checkpoint(args.pretrained_generator_name_or_path, args.resolution,
                              what="--pretrained_generator_name_or_path", cache_dir=args.cache_dir)
    prompts = load_prompts(args)

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args.num_processes = accelerator.num_processes
    set_seed(args.seed, device_specific=True)  # different noise and prompts on every rank
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # 1. Teacher (real score + D backbone, frozen), generator, fake score, D heads; optimizers; accelerate.
    models = build_models(args, accelerator)
    create_optimizers(args, models)
    prepare(accelerator, models)
    method = "dmd" if args.distribution_loss == "dmd" else (
        "dmdx" if args.pretrained_generator_name_or_path else "adm")
    logger.info("Student: %s (%s), timesteps %s; %d prompts; %s loss; fake:G:D = %d:1:%s", type(
        models.student_scheduler).__name__, models.student_schedule.prediction_type,
        models.student_timesteps.tolist(), len(prompts), args.distribution_loss, args.fake_score_update_ratio,
        args.discriminator_update_ratio if models.heads is not None else "-")
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "training_config.json"), "w") as f:
            json.dump(training_config(args, models, method), f, indent=2, default=str)
        accelerator.init_trackers("dmdx-adm-sdxl", config={k: v for k, v in vars(args).items()
                                                           if isinstance(v, (int, float, str, bool))})

    # 2. Resume: models, optimizers, LR schedulers, EMA and every process's RNG state; the step from the name.
    global_step = 0
    checkpoint = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint:
        accelerator.load_state(checkpoint)
        global_step = checkpoint_step(checkpoint)
        logger.info("Resumed from %s at step %d", checkpoint, global_step)
    elif args.resume_from_checkpoint:
        logger.info("No checkpoint in %s; starting a fresh run.", args.output_dir)

    # 3. Train: each iteration = fake-score update(s), one generator update, discriminator update(s).
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="generator updates",
                    disable=not accelerator.is_local_main_process)
    while global_step < args.max_train_steps:
        logs = train_iteration(args, accelerator, models, prompts, global_step)
        global_step += 1
        progress.update(1)
        progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.endswith("loss") or k == "d_accuracy"})
        log_step(accelerator, args, logs, global_step)
        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        if args.validation_prompts and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            validate_student(accelerator, args, models, len(models.student_timesteps), global_step)
    progress.close()

    # 4. Export a stock StableDiffusionXLPipeline with the student's scheduler, model card, optional upload.
    record_rank_checksums(accelerator, args, models.generator)
    if accelerator.is_main_process:
        generator = accelerator.unwrap_model(models.generator)
        if models.ema is not None:
            models.ema.copy_to(generator.parameters())
        # A LoRA is relative to the generator it was trained on; full weights derive from the teacher.
        base = args.pretrained_generator_name_or_path if args.lora_rank > 0 else None
        export_student(accelerator, args, models, generator, method,
                       base_model=base or args.pretrained_model_name_or_path)
        logger.info("Saved the student pipeline to %s", args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
