#!/usr/bin/env python
"""Adversarial Distillation Pre-training (ADP) of a one-step SDXL student: the first stage of DMDX.

    accelerate launch distill_scripts/train_adp_sdxl.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --ode_pairs_dir sdxl-ode-pairs --pixel_discriminator_model facebook/sam-vit-base \
        --prompts_file prompts.txt --output_dir sdxl-adp

Method (paper_spec §3, §12): teacher ODE pairs (noise x_T, clean latent x_0, prompt) from collect_ode_pairs.py.
  * Generator: the SDXL UNet re-parametrised as a **rectified-flow velocity model**. On the straight line between
    the pair, x_t = (1 - t/T) x_0 + (t/T) x_T, the UNet's output at timestep t is read as v = x_T - x_0, so
    x0 = x_t - (t/T) v. Its weights start from the teacher's epsilon UNet (at high noise epsilon ~ x_T, the
    best available start); t is drawn from the cubic schedule (1 - u^3) T, biased to high noise. At inference the
    student sees pure noise at t = 999 (sigma 0.999).
  * Latent discriminator: the frozen teacher UNet + trainable heads on its down/mid-block features, on x0 re-noised
    with the teacher's own (VP) forward process at a uniform timestep (fake: the generator's x0; real: the teacher's).
  * Pixel discriminator: a frozen SAM vision encoder (transformers' SamVisionModel) + heads on 4 evenly spaced
    encoder layers, on VAE-decoded images (gradients flow through the VAE decoder to the generator).
  * Losses: hinge for the discriminators, -(0.85 D_latent + 0.15 D_pixel) for the generator; optional velocity MSE
    (``--velocity_mse_weight``, default 0: the paper is ambiguous about it).
Output: a stock StableDiffusionXLPipeline folder whose scheduler is DPMSolverMultistepScheduler with flow sigmas
(order 1, shift 1, trailing, final sigma 0): one step = timestep 999, exactly what the generator was trained for.
This folder is the ``--pretrained_generator_name_or_path`` of train_adm_sdxl.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from train_adm_sdxl import (
    Cond,
    _accumulated_update,
    add_common_args,
    add_lora,
    check_sdxl_checkpoint,
    default_discriminator_blocks,
    encode_prompts,
    export_student,
    feature_shapes,
    log_step,
    make_optimizer,
    record_rank_checksums,
    scheduler_config,
    training_config,
    unet_output,
    validate_common_args,
    validate_student,
)

logger = logging.getLogger("train_adp_sdxl")

# The student's scheduler (DESIGN.md §4.5): a rectified-flow DPM-Solver of order 1 (= Euler), trailing timesteps.
STUDENT_SCHEDULER = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0, solver_order=1,
                         final_sigmas_type="zero", timestep_spacing="trailing", num_train_timesteps=1000)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    g = parser.add_argument_group("ADP")
    g.add_argument("--ode_pairs_dir", required=True, help="Output folder of collect_ode_pairs.py.")
    g.add_argument("--pixel_discriminator_model", required=True,
                   help="A SAM checkpoint (e.g. facebook/sam-vit-base) for the pixel discriminator, or `none`.")
    g.add_argument("--pixel_discriminator_layers", type=int, default=4, help="Evenly spaced SAM encoder layers.")
    g.add_argument("--latent_weight", type=float, default=0.85)
    g.add_argument("--pixel_weight", type=float, default=0.15)
    g.add_argument("--velocity_mse_weight", type=float, default=0.0)
    g.add_argument("--discriminator_lr", type=float, default=1e-5)
    parser.set_defaults(generator_lr=1e-5, output_dir="sdxl-adp")
    args = parser.parse_args(input_args)
    if args.prompts_file or args.dataset_name:
        raise ValueError("ADP takes its prompts from the ODE pairs (--ode_pairs_dir); drop --prompts_file / "
                         "--dataset_name.")
    validate_common_args(args, needs_prompts=False)
    if args.latent_weight < 0 or args.pixel_weight < 0:
        raise ValueError("--latent_weight and --pixel_weight must be >= 0.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# ODE pairs
# ----------------------------------------------------------------------------------------------------------------
class ODEPairs:
    """Random access to the (noise, latent, prompt) shards written by collect_ode_pairs.py (memory-mapped)."""

    def __init__(self, folder: str, teacher: str, resolution: int, latent_shape):
        from safetensors import safe_open

        path = os.path.join(folder, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--ode_pairs_dir {folder!r} has no manifest.json (run collect_ode_pairs.py).")
        with open(path) as f:
            self.manifest = json.load(f)
        if _norm(self.manifest["teacher"]) != _norm(teacher):
            raise ValueError(f"ODE pairs in {folder} come from teacher {self.manifest['teacher']!r}, not from "
                             f"--pretrained_model_name_or_path {teacher!r}.")
        if int(self.manifest["resolution"]) != resolution or list(self.manifest["latent_shape"]) != list(latent_shape):
            raise ValueError(f"ODE pairs in {folder} are at resolution {self.manifest['resolution']} (latents "
                             f"{self.manifest['latent_shape']}); this run uses --resolution {resolution} "
                             f"(latents {list(latent_shape)}).")
        self.files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                            if n.startswith("shard-") and n.endswith(".safetensors"))
        self.index, self.prompts = [], []
        for i, file in enumerate(self.files):
            with safe_open(file, "pt") as f:
                prompts = json.loads(f.metadata()["prompts"])
                self.index += [(i, row) for row in range(len(prompts))]
                self.prompts += prompts
        if not self.index:
            raise ValueError(f"--ode_pairs_dir {folder!r} holds no finished shards.")
        self._open = {}

    def __len__(self) -> int:
        return len(self.index)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """A random batch (drawn with the global torch RNG, so a resumed run draws the same pairs)."""
        from safetensors import safe_open

        rows = torch.randint(len(self.index), (batch_size,)).tolist()
        noise, latents = [], []
        for r in rows:
            file, row = self.index[r]
            if file not in self._open:
                self._open[file] = safe_open(self.files[file], "pt")
            handle = self._open[file]
            noise.append(handle.get_slice("noise")[row:row + 1].float())  # stored in --save_dtype
            latents.append(handle.get_slice("latents")[row:row + 1].float())
        return torch.cat(noise), torch.cat(latents), [self.prompts[r] for r in rows]


def _norm(path: str) -> str:
    return os.path.abspath(path) if os.path.exists(path) else path


# ----------------------------------------------------------------------------------------------------------------
# Models and one iteration (importable)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ADPModels:
    teacher: Any  # frozen UNet: latent-discriminator backbone
    generator: Any
    heads: Any  # nn.ModuleDict {"latent": DiscriminatorHeads, "pixel": DiscriminatorHeads}
    latent_features: Any
    sam: Any  # frozen SamVisionModel or None
    pixel_features: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    teacher_schedule: Any
    student_scheduler: Any
    student_schedule: Any
    student_timesteps: torch.Tensor
    latent_shape: tuple
    weight_dtype: torch.dtype
    force_zeros_for_empty_prompt: bool = True
    optimizers: dict = field(default_factory=dict)
    lr_schedulers: dict = field(default_factory=dict)
    ema: Any = None


def channels_last_to_first(output) -> torch.Tensor:
    """SAM encoder layers return (B, H, W, C); the heads take (B, C, H, W)."""
    from dmdx.training import first_tensor

    return first_tensor(output).permute(0, 3, 1, 2)


def build_models(args, accelerator) -> ADPModels:
    from diffusers import AutoencoderKL, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from torch import nn
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from dmdx.training import BackboneFeatures, DiscriminatorHeads, schedule_from_scheduler_config, student_timesteps

    path, load, device = args.pretrained_model_name_or_path, {"cache_dir": args.cache_dir}, accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=s, **load) for s in ("tokenizer", "tokenizer_2")]
    text_encoders = [
        CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **load),
        CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=args.variant, **load)]
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **load)
    teacher = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant,
                                                   torch_dtype=weight_dtype, **load)
    generator = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant,
                                                     torch_dtype=torch.float32, **load)
    for module in (teacher, vae, *text_encoders):
        module.requires_grad_(False).eval().to(device)
    for encoder in text_encoders:
        encoder.to(dtype=weight_dtype)
    if args.lora_rank > 0:
        generator.requires_grad_(False).to(device, dtype=weight_dtype)
        add_lora(generator, args.lora_rank, args.lora_alpha)
        cast_training_params(generator, dtype=torch.float32)
    else:
        generator.requires_grad_(True).to(device)
    generator.train()
    if args.gradient_checkpointing:
        teacher.enable_gradient_checkpointing()
        generator.enable_gradient_checkpointing()

    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (teacher.config.in_channels, args.resolution // vae_factor, args.resolution // vae_factor)
    blocks = args.discriminator_blocks.split(",") if args.discriminator_blocks else \
        default_discriminator_blocks(teacher.config)
    latent_features = BackboneFeatures(teacher, blocks)
    heads = nn.ModuleDict({"latent": DiscriminatorHeads(
        feature_shapes(teacher, latent_features, latent_shape, text_encoders, tokenizers, args.resolution, device),
        hidden_channels=args.discriminator_head_channels)})

    sam = pixel_features = None
    if args.pixel_discriminator_model.lower() != "none":
        from transformers import SamVisionModel

        sam = SamVisionModel.from_pretrained(args.pixel_discriminator_model, torch_dtype=weight_dtype, **load)
        sam.requires_grad_(False).eval().to(device)
        n = sam.config.num_hidden_layers
        k = min(args.pixel_discriminator_layers, n)
        layers = [f"vision_encoder.layers.{round((i + 1) * n / k) - 1}" for i in range(k)]
        pixel_features = BackboneFeatures(sam, layers, select=channels_last_to_first)
        size = sam.config.image_size
        with torch.no_grad():
            feats = pixel_features(lambda: sam(pixel_values=torch.zeros(1, 3, size, size, device=device,
                                                                         dtype=weight_dtype)))
        heads["pixel"] = DiscriminatorHeads([tuple(f.shape[1:]) for f in feats],
                                            hidden_channels=args.discriminator_head_channels)
    heads.to(device).train()

    student_scheduler = DPMSolverMultistepScheduler(**STUDENT_SCHEDULER)
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(generator.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                       model_config=generator.config)
        ema.to(device)
    zeros = DiffusionPipeline.load_config(path, **load).get("force_zeros_for_empty_prompt", True)
    return ADPModels(
        teacher=teacher, generator=generator, heads=heads, latent_features=latent_features, sam=sam,
        pixel_features=pixel_features, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
        teacher_schedule=schedule_from_scheduler_config(scheduler_config(path, **load)),
        student_scheduler=student_scheduler, student_schedule=schedule_from_scheduler_config(
        {**student_scheduler.config, "_class_name": type(student_scheduler).__name__}),
        student_timesteps=student_timesteps(student_scheduler, 1), latent_shape=latent_shape,
        weight_dtype=weight_dtype, ema=ema, force_zeros_for_empty_prompt=zeros)


def create_optimizers(args, models: ADPModels) -> None:
    from diffusers.optimization import get_scheduler

    n = getattr(args, "num_processes", 1)
    for name, module, lr in (("generator", models.generator, args.generator_lr),
                             ("discriminator", models.heads, args.discriminator_lr)):
        optimizer = make_optimizer(args, module.parameters(), lr)
        models.optimizers[name] = optimizer
        models.lr_schedulers[name] = get_scheduler(args.lr_scheduler, optimizer,
                                                   num_warmup_steps=args.lr_warmup_steps * n,
                                                   num_training_steps=args.max_train_steps * n)


def prepare(accelerator, models: ADPModels) -> None:
    (models.generator, models.heads, models.optimizers["generator"], models.optimizers["discriminator"],
     models.lr_schedulers["generator"], models.lr_schedulers["discriminator"]) = accelerator.prepare(
        models.generator, models.heads, models.optimizers["generator"], models.optimizers["discriminator"],
        models.lr_schedulers["generator"], models.lr_schedulers["discriminator"])
    if models.ema is not None:
        accelerator.register_for_checkpointing(models.ema)


def to_sam_pixels(models: ADPModels, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents with the VAE (differentiable) and normalise for SAM: [-1, 1] -> [0, 1] -> ImageNet
    mean/std at SAM's input size."""
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    vae = models.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample.float()
    images = ((images + 1) / 2).clamp(0, 1)
    size = models.sam.config.image_size
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def train_iteration(args, accelerator, models: ADPModels, pairs: ODEPairs, global_step: int) -> dict[str, float]:
    """One ADP iteration: one generator update, then one discriminator update on the same samples."""
    from dmdx.training import (
        adp_discriminator_loss,
        adp_generator_loss,
        cubic_timesteps,
        discriminator_diagnostics,
        frozen_parameters,
        interpolate_ode_pair,
        ode_pair_velocity,
        uniform_timesteps,
        velocity_regression_loss,
    )

    m, device, logs, saved = models, accelerator.device, {}, {}
    T = m.teacher_schedule.T
    heads_plain = accelerator.unwrap_model(m.heads)
    pixel = m.sam is not None and args.pixel_weight > 0

    def d_latent(heads, x, t, cond: Cond, grad: bool):
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            feats = m.latent_features(lambda: unet_output(m.teacher, x, t, cond))
        return heads["latent"](feats)

    def d_pixel(heads, pixels, grad: bool):
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            feats = m.pixel_features(lambda: m.sam(pixel_values=pixels.to(m.weight_dtype)))
        return heads["pixel"](feats)

    with accelerator.autocast():
        # 1. Generator: velocity model on the ODE pair's straight line at a cubic (high-noise) timestep.
        def generator_loss():
            noise, x0_real, prompts = pairs.sample(args.train_batch_size)
            noise, x0_real = noise.to(device), x0_real.to(device)
            cond, _ = encode_prompts(prompts, m.tokenizers, m.text_encoders, args.resolution, device,
                                     m.force_zeros_for_empty_prompt)
            t = cubic_timesteps(noise.shape[0], T).to(device)
            x_t = interpolate_ode_pair(noise, x0_real, t, T)
            v = unet_output(m.generator, x_t, t, cond)
            x0_fake = m.student_schedule.to_x0_noise(v, x_t, t)[0]  # x_t - (t/T) v
            # Latent D: re-noise both x0 with the teacher's own forward process at a uniform timestep.
            tp = uniform_timesteps(noise.shape[0], 0.0, T - 1).to(device)
            fake_lat = m.teacher_schedule.add_noise(x0_fake, torch.randn_like(x0_fake), tp)
            real_lat = m.teacher_schedule.add_noise(x0_real, torch.randn_like(x0_real), tp)
            logits_lat = d_latent(heads_plain, fake_lat, tp, cond, grad=True)
            logits_pix = None
            if pixel:  # Pixel D: SAM on VAE-decoded images; gradient through the decoder
                pix_fake = to_sam_pixels(m, x0_fake)
                logits_pix = d_pixel(heads_plain, pix_fake, grad=True)
                with torch.no_grad():
                    saved.update(pix_fake=pix_fake.detach(), pix_real=to_sam_pixels(m, x0_real))
            loss = adp_generator_loss(logits_lat, logits_pix, args.latent_weight, args.pixel_weight).mean()
            terms = {"generator_adversarial_loss": loss}
            if args.velocity_mse_weight > 0:
                mse = velocity_regression_loss(v, ode_pair_velocity(noise, x0_real)).mean()
                loss = loss + args.velocity_mse_weight * mse
                terms["velocity_mse"] = mse
            saved.update(fake_lat=fake_lat.detach(), real_lat=real_lat, tp=tp, cond=cond)
            return loss, {"generator_loss": loss, **terms}

        with frozen_parameters(m.heads):  # D's gradient flows through its inputs to the generator only
            _accumulated_update(accelerator, args, m.generator, "generator", m, generator_loss, logs)
        if m.ema is not None:
            m.ema.step(accelerator.unwrap_model(m.generator).parameters())

        # 2. Discriminators: hinge on the generator's (detached) samples vs the teacher's ODE endpoints.
        def discriminator_loss():
            if "fake_lat" not in saved:  # later micro-batches: fresh samples without generator gradients
                with torch.no_grad():
                    generator_loss()
            fake_lat, real_lat, tp, cond = (saved.pop(k) for k in ("fake_lat", "real_lat", "tp", "cond"))
            logits = d_latent(m.heads, torch.cat([real_lat, fake_lat]), torch.cat([tp, tp]), cond.cat(cond),
                              grad=False)
            lat_real, lat_fake = logits.chunk(2)
            pix_real = pix_fake = None
            if pixel:
                pix = d_pixel(m.heads, torch.cat([saved.pop("pix_real"), saved.pop("pix_fake")]), grad=False)
                pix_real, pix_fake = pix.chunk(2)
                logs.update({f"pixel_{k}": v for k, v in discriminator_diagnostics(pix_real, pix_fake).items()})
            logs.update({f"latent_{k}": v for k, v in discriminator_diagnostics(lat_real, lat_fake).items()})
            loss = adp_discriminator_loss(lat_real, lat_fake, pix_real, pix_fake, args.latent_weight,
                                          args.pixel_weight).mean()
            return loss, {"discriminator_loss": loss}

        _accumulated_update(accelerator, args, m.heads, "discriminator", m, discriminator_loss, logs)

    for name, scheduler in m.lr_schedulers.items():
        logs[f"lr_{name}"] = scheduler.get_last_lr()[0]
    return logs


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def main(args=None):
    args = args if args is not None else parse_args()
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from dmdx.training.checkpointing import checkpoint_step, find_resume_checkpoint, save_checkpoint

    # 0. Refuse bad input before heavy work: non-SDXL teacher, bad resolution, pairs from another teacher/size.
    unet_config = check_sdxl_checkpoint(args.pretrained_model_name_or_path, args.resolution, cache_dir=args.cache_dir)
    from diffusers import AutoencoderKL

    vae_factor = 2 ** (len(AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae",
                                                      cache_dir=args.cache_dir)["block_out_channels"]) - 1)
    latent_shape = (unet_config["in_channels"], args.resolution // vae_factor, args.resolution // vae_factor)
    pairs = ODEPairs(args.ode_pairs_dir, args.pretrained_model_name_or_path, args.resolution, latent_shape)

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args.num_processes = accelerator.num_processes
    set_seed(args.seed, device_specific=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # 1. Frozen teacher (latent D backbone), frozen SAM (pixel D backbone), VAE; generator; heads; accelerate.
    models = build_models(args, accelerator)
    create_optimizers(args, models)
    prepare(accelerator, models)
    logger.info("ADP on %d ODE pairs (%s); pixel discriminator: %s; student timesteps %s (flow velocity model)",
                len(pairs), pairs.manifest["sampler"], args.pixel_discriminator_model,
                models.student_timesteps.tolist())
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "training_config.json"), "w") as f:
            json.dump({**training_config(args, models, "adp"), "ode_pairs": pairs.manifest}, f, indent=2,
                      default=str)
        accelerator.init_trackers("dmdx-adp-sdxl", config={k: v for k, v in vars(args).items()
                                                           if isinstance(v, (int, float, str, bool))})

    # 2. Resume (models, optimizers, schedulers, EMA, RNG; step from the folder name).
    global_step = 0
    checkpoint = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint:
        accelerator.load_state(checkpoint)
        global_step = checkpoint_step(checkpoint)
        logger.info("Resumed from %s at step %d", checkpoint, global_step)

    # 3. Train: each iteration = one generator update, one discriminator update.
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="ADP steps",
                    disable=not accelerator.is_local_main_process)
    while global_step < args.max_train_steps:
        logs = train_iteration(args, accelerator, models, pairs, global_step)
        global_step += 1
        progress.update(1)
        progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.endswith("loss")})
        log_step(accelerator, args, logs, global_step)
        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        if args.validation_prompts and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            validate_student(accelerator, args, models, 1, global_step)
    progress.close()

    # 4. Export: a stock SDXL pipeline with the flow scheduler (the ADM stage's generator), model card.
    record_rank_checksums(accelerator, args, models.generator)
    if accelerator.is_main_process:
        generator = accelerator.unwrap_model(models.generator)
        if models.ema is not None:
            models.ema.copy_to(generator.parameters())
        export_student(accelerator, args, models, generator, "adp", base_model=args.pretrained_model_name_or_path)
        logger.info("Saved the ADP student pipeline to %s", args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
