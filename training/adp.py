"""Adversarial Distillation Pre-training (ADP, docs/method.md#adp): DMDX's first stage for one-step students.

Teacher ODE pairs (noise x_T, clean latent x_0, prompt) come from collect_ode_pairs.py.
  * Generator: the teacher's denoiser re-parametrised as a rectified-flow velocity model. On the straight line
    between the pair, x_t = (1 - t/T) x_0 + (t/T) x_T, its output at t is read as v = x_T - x_0, so
    x0 = x_t - (t/T) v; t from the cubic schedule (1 - u^3) T, biased to high noise. Its weights start from the
    teacher's (at high noise epsilon ~ x_T, the best available start).
  * Latent discriminator: the frozen teacher + trainable heads on its blocks, on x0 re-noised with the teacher's
    own forward process at a uniform timestep (fake: the generator's x0; real: the teacher's).
  * Pixel discriminator: a frozen SAM vision encoder (transformers' SamVisionModel) + heads on evenly spaced
    encoder layers, on VAE-decoded images (gradients flow through the VAE decoder to the generator).
  * Losses: hinge for the discriminators, -(0.85 D_latent + 0.15 D_pixel) for the generator; optional velocity MSE
    (``--velocity_mse_weight``; the paper is ambiguous about it).
The student ships with a rectified-flow DPM-Solver of order 1 (= Euler), trailing: one step = timestep 999.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import UsageError
from .lora import LoraView, add_lora_adapter
from .plumbing import (
    accumulated_update,
    check_output_dir,
    check_provenance,
    clean_leftovers,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    parameter_checksum,
    resume,
    tracker_config,
    training_loop,
    weight_dtype_of,
    weights_fingerprint,
    write_training_config,
)

logger = logging.getLogger("dmdx")

# The ADP student's scheduler (docs/method.md#schedule): flow DPM-Solver, order 1 (= Euler), trailing timesteps.
STUDENT_SCHEDULER = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0, solver_order=1,
                         final_sigmas_type="zero", timestep_spacing="trailing", num_train_timesteps=1000)


class ODEPairs:
    """Random access to the (noise, latent, prompt) shards written by collect_ode_pairs.py (memory-mapped)."""

    def __init__(self, folder: str, teacher: str, resolution: int, latent_shape):
        from safetensors import safe_open

        path = os.path.join(folder, "manifest.json")
        if not os.path.isfile(path):
            raise UsageError(f"--ode_pairs_dir {folder!r} has no manifest.json (run collect_ode_pairs.py).")
        with open(path) as f:
            self.manifest = json.load(f)
        if _norm(self.manifest["teacher"]) != _norm(teacher):
            raise UsageError(f"ODE pairs in {folder} come from teacher {self.manifest['teacher']!r}, not from "
                             f"--pretrained_model_name_or_path {teacher!r}.")
        if int(self.manifest["resolution"]) != resolution or list(self.manifest["latent_shape"]) != list(latent_shape):
            raise UsageError(f"ODE pairs in {folder} are at resolution {self.manifest['resolution']} (latents "
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
            raise UsageError(f"--ode_pairs_dir {folder!r} holds no finished shards.")
        self._open = {}

    def __len__(self) -> int:
        return len(self.index)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """A random batch (drawn with the global torch RNG, which each iteration seeds from its step)."""
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


@dataclass
class ADPModels:
    teacher: Any  # frozen denoiser: the latent discriminator's backbone
    generator: Any
    heads: Any  # nn.ModuleDict {"latent": DiscriminatorHeads, "pixel": DiscriminatorHeads}
    latent_features: Any
    sam: Any  # frozen SamVisionModel or None
    pixel_features: Any
    vae: Any
    teacher_schedule: Any
    student_scheduler: Any
    student_schedule: Any
    latent_shape: tuple
    weight_dtype: torch.dtype
    ema: Any = None
    optimizers: dict = field(default_factory=dict)
    lr_schedulers: dict = field(default_factory=dict)
    student_timesteps: torch.Tensor = field(default_factory=lambda: torch.tensor([999.0]))  # one step


def _channels_last_to_first(output) -> torch.Tensor:
    """SAM encoder layers return (B, H, W, C); the heads take (B, C, H, W)."""
    from . import first_tensor

    return first_tensor(output).permute(0, 3, 1, 2)


def build_adp_models(adapter, args, accelerator, negative: dict) -> ADPModels:
    from diffusers import DPMSolverMultistepScheduler
    from torch import nn

    from . import BackboneFeatures, DiscriminatorHeads, schedule_from_scheduler_config

    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    teacher = adapter.load_denoiser(weight_dtype).requires_grad_(False).eval().to(device)
    if args.lora_rank > 0:  # the adapter on a frozen copy: the teacher's own weights stay the discriminator's
        base = adapter.load_denoiser(weight_dtype).requires_grad_(False).eval().to(device)
        add_lora_adapter(base, "generator", args.lora_rank, args.lora_alpha, adapter.lora_target_modules, args.seed)
        if args.gradient_checkpointing:
            base.enable_gradient_checkpointing()
        generator = LoraView(base, "generator", args.gradient_checkpointing)
    else:
        generator = adapter.load_denoiser(torch.float32).requires_grad_(True).train().to(device)
        if args.gradient_checkpointing:
            generator.enable_gradient_checkpointing()
    latent_shape = adapter.latent_shape(args.resolution)
    latent_features = BackboneFeatures(teacher, adapter.discriminator_blocks(args.discriminator_blocks),
                                       select=adapter.feature_selector(latent_shape))
    with torch.no_grad():
        x = torch.zeros((1, *latent_shape), device=device)
        feats = latent_features(lambda: adapter.predict(teacher, x, torch.full((1,), 500.0, device=device), negative))
    heads = nn.ModuleDict({"latent": DiscriminatorHeads([tuple(f.shape[1:]) for f in feats],
                                                        hidden_channels=args.discriminator_head_channels)})
    sam = pixel_features = None
    if args.pixel_discriminator_model.lower() != "none":
        from transformers import SamVisionModel

        sam = SamVisionModel.from_pretrained(args.pixel_discriminator_model, torch_dtype=weight_dtype,
                                             cache_dir=args.cache_dir)
        sam.requires_grad_(False).eval().to(device)
        n = sam.config.num_hidden_layers
        k = min(args.pixel_discriminator_layers, n)
        layers = [f"vision_encoder.layers.{round((i + 1) * n / k) - 1}" for i in range(k)]
        pixel_features = BackboneFeatures(sam, layers, select=_channels_last_to_first)
        size = sam.config.image_size
        with torch.no_grad():
            feats = pixel_features(lambda: sam(pixel_values=torch.zeros(1, 3, size, size, device=device,
                                                                         dtype=weight_dtype)))
        heads["pixel"] = DiscriminatorHeads([tuple(f.shape[1:]) for f in feats],
                                            hidden_channels=args.discriminator_head_channels)
    heads.to(device).train()
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(generator.parameters(), decay=args.ema_decay, model_cls=type(generator),
                       model_config=generator.config)
        ema.to(device)
    student_scheduler = DPMSolverMultistepScheduler(**STUDENT_SCHEDULER)
    vae = adapter.load_vae(device)
    if args.gradient_checkpointing:  # the generator's gradient goes back through the decoder at full resolution
        vae.enable_gradient_checkpointing()  # (docs/memory.md: ~19 GiB per 1024 px sample otherwise)
    return ADPModels(teacher=teacher, generator=generator, heads=heads, latent_features=latent_features, sam=sam,
                     pixel_features=pixel_features, vae=vae, teacher_schedule=
                     adapter.teacher_schedule(), student_scheduler=student_scheduler,
                     student_schedule=schedule_from_scheduler_config(student_scheduler), latent_shape=latent_shape,
                     weight_dtype=weight_dtype, ema=ema)


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


def adp_iteration(models: ADPModels, adapter, args, accelerator, pairs: ODEPairs, encode, step: int) -> dict:
    """One ADP iteration: one generator update, then one discriminator update on the same samples."""
    from . import (
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
    from .conditioning import cat_conditioning
    from .plumbing import iteration_seed

    torch.manual_seed(iteration_seed(args.seed, step, accelerator.process_index))
    m, device, logs, saved = models, accelerator.device, {}, {}
    T = m.teacher_schedule.T
    heads_plain = accelerator.unwrap_model(m.heads)
    pixel = m.sam is not None and args.pixel_weight > 0

    def d_latent(heads, x, t, cond, grad: bool):
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            feats = m.latent_features(lambda: adapter.predict(m.teacher, x, t, cond))
        return heads["latent"](feats)

    def d_pixel(heads, pixels, grad: bool):
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            feats = m.pixel_features(lambda: m.sam(pixel_values=pixels.to(m.weight_dtype)))
        return heads["pixel"](feats)

    with accelerator.autocast():
        # 1. Generator: velocity model on the ODE pair's straight line at a cubic (high-noise) timestep.
        def generator_losses():
            for _ in range(args.gradient_accumulation_steps):
                noise, x0_real, prompts = pairs.sample(args.train_batch_size)
                noise, x0_real = noise.to(device), x0_real.to(device)
                cond = encode(prompts)
                t = cubic_timesteps(noise.shape[0], T).to(device)
                x_t = interpolate_ode_pair(noise, x0_real, t, T)
                v = adapter.predict(m.generator, x_t, t, cond)
                x0_fake = m.student_schedule.to_x0_noise(v, x_t, t)[0]  # x_t - (t/T) v
                # Latent D: both x0 re-noised with the teacher's own forward process at a uniform timestep.
                tp = uniform_timesteps(noise.shape[0], 0.0, T - 1).to(device)
                fake_lat = m.teacher_schedule.add_noise(x0_fake, torch.randn_like(x0_fake), tp)
                real_lat = m.teacher_schedule.add_noise(x0_real, torch.randn_like(x0_real), tp)
                logits_lat = d_latent(heads_plain, fake_lat, tp, cond, grad=True)
                logits_pix = None
                if pixel:  # Pixel D: SAM on VAE-decoded images; gradient through the decoder
                    pix_fake = to_sam_pixels(m, x0_fake)
                    logits_pix = d_pixel(heads_plain, pix_fake, grad=True)
                    with torch.no_grad():
                        saved.setdefault("pix", []).append((to_sam_pixels(m, x0_real), pix_fake.detach()))
                loss = adp_generator_loss(logits_lat, logits_pix, args.latent_weight, args.pixel_weight).mean()
                terms = {"generator_adversarial_loss": loss}
                if args.velocity_mse_weight > 0:
                    mse = velocity_regression_loss(v, ode_pair_velocity(noise, x0_real)).mean()
                    loss = loss + args.velocity_mse_weight * mse
                    terms["velocity_mse"] = mse
                saved.setdefault("latent", []).append((real_lat, fake_lat.detach(), tp, cond))
                yield loss, {"loss_generator": loss, **terms}

        with frozen_parameters(m.heads):  # D's gradient flows through its inputs to the generator only
            accumulated_update(accelerator, args, m.generator, m.optimizers["generator"],
                               m.lr_schedulers["generator"], generator_losses(), logs, "generator")
        if m.ema is not None:
            m.ema.step(accelerator.unwrap_model(m.generator).parameters())

        # 2. Discriminators: hinge on the generator's (detached) samples vs the teacher's ODE endpoints.
        def discriminator_losses():
            for i in range(args.gradient_accumulation_steps):
                real_lat, fake_lat, tp, cond = saved["latent"][i]
                logits = d_latent(m.heads, torch.cat([real_lat, fake_lat]), torch.cat([tp, tp]),
                                  cat_conditioning(cond, cond), grad=False)
                lat_real, lat_fake = logits.chunk(2)
                pix_real = pix_fake = None
                if pixel:
                    pix_real, pix_fake = d_pixel(m.heads, torch.cat(saved["pix"][i]), grad=False).chunk(2)
                    logs.update({f"pixel_{k}": v for k, v in discriminator_diagnostics(pix_real, pix_fake).items()})
                logs.update({f"latent_{k}": v for k, v in discriminator_diagnostics(lat_real, lat_fake).items()})
                loss = adp_discriminator_loss(lat_real, lat_fake, pix_real, pix_fake, args.latent_weight,
                                              args.pixel_weight).mean()
                yield loss, {"loss_discriminator": loss}

        accumulated_update(accelerator, args, m.heads, m.optimizers["discriminator"],
                           m.lr_schedulers["discriminator"], discriminator_losses(), logs, "discriminator")
    for name, scheduler in m.lr_schedulers.items():
        logs[f"lr_{name}"] = scheduler.get_last_lr()[0]
    return logs


def refuse_fsdp(accelerator) -> None:
    """ADP trains under DDP only: its generator, latent and pixel discriminators have never run sharded (the ADM loop
    has; tests/test_fsdp.py), so an FSDP config stops here rather than failing, or silently mis-syncing, later."""
    if accelerator.distributed_type.name == "FSDP":
        raise UsageError("train_adp_sdxl.py runs under DDP only (its FSDP path is untested); launch it with a DDP "
                         "accelerate config such as distill_scripts/recipes/sdxl/accelerate_ddp_bf16.yaml.")


def adp_prompt_source(adapter, args, accelerator, prompts: list[str]):
    """The pairs' prompts as conditioning: from the text-embedding cache (``--text_embeddings_cache``; built for what
    it lacks, the text encoders freed before the models load) or from text encoders kept loaded."""
    from .loop import PromptSource, fill_text_cache, open_text_cache

    device, dtype = accelerator.device, weight_dtype_of(accelerator)
    wanted = prompts + list(args.validation_prompts or [])
    cache = open_text_cache(adapter, args, wanted)
    if cache is None:
        adapter.load_text_encoders(device, dtype)
    else:
        fill_text_cache(adapter, cache, wanted, device, dtype, rank=accelerator.process_index,
                        world=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
                        shard_size=args.text_embeddings_shard_size)
    return PromptSource(adapter, [], device, cache=cache)


def adp_distill(adapter, args) -> None:
    """The whole ADP run: checks, models, loop (checkpoints, validation, logs), export of a stock pipeline with the
    flow scheduler (the ADM stage's ``--pretrained_generator_name_or_path``)."""
    from accelerate.utils import set_seed

    from .checkpointing import find_resume_checkpoint
    from .finish import finish_and_export, validate

    # 0. Before any weights: the output folder, the teacher's architecture and resolution, pairs from this teacher
    #    at this size, the SAM path, a resumable checkpoint.
    check_output_dir(args)
    latent_shape = adapter.latent_shape(args.resolution)
    adapter.discriminator_blocks(args.discriminator_blocks)
    sam = args.pixel_discriminator_model
    if sam.lower() != "none" and not os.path.isdir(sam) and (os.path.isabs(sam) or sam.startswith(".")
                                                               or os.path.isdir(os.path.dirname(sam))):
        raise UsageError(f"--pixel_discriminator_model {sam!r} is not a folder (give a SAM checkpoint folder, a Hub "
                         "id such as facebook/sam-vit-base, or none).")
    pairs = ODEPairs(args.ode_pairs_dir, args.pretrained_model_name_or_path, args.resolution, latent_shape)
    provenance = {"script": "dmdx-adp", "teacher": f"{adapter.pipeline_class}:"
                  f"{weights_fingerprint(adapter.path, adapter.denoiser_name)}", "lora_rank": args.lora_rank,
                  "resolution": args.resolution, "pixel_discriminator": sam.lower() != "none",
                  "discriminator": [args.discriminator_blocks, args.discriminator_head_channels],
                  "run_id": uuid.uuid4().hex}
    checkpoint = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint:
        provenance["run_id"] = check_provenance(checkpoint, provenance, args.max_train_steps)

    accelerator = make_accelerator(args, "dmdx-adp")
    refuse_fsdp(accelerator)
    set_seed(args.seed)
    if accelerator.is_main_process:
        clean_leftovers(args.output_dir)
    source = adp_prompt_source(adapter, args, accelerator, pairs.prompts)
    models = build_adp_models(adapter, args, accelerator, source.negative)
    val_cond = source.conditioning(list(args.validation_prompts)) if args.validation_prompts else None
    for name, attr, lr in (("generator", "generator", args.generator_lr),
                           ("discriminator", "heads", args.discriminator_lr)):
        optimizer = make_optimizer(args, getattr(models, attr), lr)
        scheduler = make_lr_scheduler(args, optimizer, 1, accelerator.num_processes)
        module, optimizer, scheduler = accelerator.prepare(getattr(models, attr), optimizer, scheduler)
        setattr(models, attr, module)
        models.optimizers[name], models.lr_schedulers[name] = optimizer, scheduler
    if models.ema is not None:
        accelerator.register_for_checkpointing(models.ema)
    fields = {"method": "adp", "num_student_steps": 1, "student_timesteps": [999.0],
              "student_scheduler": type(models.student_scheduler).__name__,
              "student_scheduler_config": dict(models.student_scheduler.config),
              "student_prediction_type": models.student_schedule.prediction_type, "ode_pairs": pairs.manifest,
              "run_id": provenance["run_id"]}
    if not checkpoint:
        fields["generator_initial_checksum"] = parameter_checksum(models.generator)
    logger.info("ADP on %d ODE pairs (%s); pixel discriminator: %s; student: one step at t = 999 (flow velocity)",
                len(pairs), pairs.manifest["sampler"], args.pixel_discriminator_model)
    if accelerator.is_main_process:
        config = write_training_config(args.output_dir, args, **fields)
        fields["generator_initial_checksum"] = config.get("generator_initial_checksum")  # a resume: the first start's
        accelerator.init_trackers("dmdx-adp", config=tracker_config(args))
    step = resume(accelerator, args, checkpoint)

    encode = source.conditioning
    validate_fn = None
    if args.validation_prompts:
        def validate_fn(at: int):
            if accelerator.is_main_process:
                return validate(models, adapter, args, accelerator, at, val_cond, models.vae)

    samples = training_loop(accelerator, args, step,
                            lambda at: adp_iteration(models, adapter, args, accelerator, pairs, encode, at),
                            validate_fn, provenance, "ADP steps")

    finish_and_export(adapter, args, accelerator, models, method="adp", generator_path=None, samples=samples,
                      fields=fields)
