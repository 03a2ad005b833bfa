#!/usr/bin/env python
"""Four-step ADM distillation of SD3-Medium / SD3.5-Large (MMDiT, rectified flow) into a stock
``StableDiffusion3Pipeline`` whose ``FlowMatchEulerDiscreteScheduler`` already encodes the student's schedule.

    accelerate launch distill_scripts/train_adm_sd3.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3-medium-diffusers \
        --prompts_file prompts.txt --output_dir sd3-medium-adm --lora_rank 64 --max_train_steps 4000

Recipes (launch commands + accelerate configs): distill_scripts/recipes/sd3_medium (LoRA, DDP) and
distill_scripts/recipes/sd35_large (full fine-tuning, FSDP2 or DeepSpeed ZeRO-2); the README sections "SD3-Medium"
and "SD3.5-Large" explain them.

The method (paper_spec §2, §5, §12), one iteration:
  0. the student's input at one of its own K timesteps, by backward simulation of its earlier steps (DMD2 style);
     x0 = G(x_k, t_k)
  1. fake score f: denoising loss on sg(x0), ``--fake_score_update_ratio`` times
  2. generator: x_t = add_noise(x0, eps, t) (with grad); one PF-ODE (Euler) step t -> s = t - dt from the same x_t
     with the teacher (CFG) and with f (parameters frozen, gradient through its input): x_real, x_fake;
     loss = -D(x_fake, s)  (``--distribution_loss dmd``: DMD2's loss on the two x0 predictions instead)
  3. discriminator D = the frozen teacher (the same object as the real score) + small heads on the hidden states
     of chosen transformer blocks: hinge loss on the detached x_real / x_fake of step 2.

Choices where the paper is silent are marked "Choice:" below and in the README. The per-iteration work lives in
importable functions (``build_models``, ``train_iteration``) so a benchmark can time exactly this script's
iteration; nothing runs at import time.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

logger = logging.getLogger("train_adm_sd3")

SD3_PIPELINE = "StableDiffusion3Pipeline"
SD3_TRANSFORMER = "SD3Transformer2DModel"
# Attention projections of the MMDiT joint blocks that LoRA adapts (as diffusers' SD3 LoRA example does).
LORA_TARGET_MODULES = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                       "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
TRAINING_CONFIG_NAME = "dmdx_training_config.json"


# ------------------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------------------
def parse_args(input_args=None):
    p = argparse.ArgumentParser(description="ADM (or DMD2) distillation of SD3 / SD3.5 into a few-step student.")
    # model and data
    p.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                   help="An SD3 / SD3.5 diffusers checkpoint (Hub id or local folder): the teacher.")
    p.add_argument("--revision", type=str, default=None)
    p.add_argument("--variant", type=str, default=None, help="e.g. 'fp16' weights of the teacher.")
    p.add_argument("--prompts_file", type=str, default=None, help="Training prompts: a text file, one per line.")
    p.add_argument("--dataset_name", type=str, default=None,
                   help="Or a datasets name, or a local .json/.jsonl/.csv/.parquet file or folder, whose "
                        "--caption_column holds the prompts (ADM is data-free: only prompts are used).")
    p.add_argument("--dataset_config_name", type=str, default=None)
    p.add_argument("--dataset_split", type=str, default="train")
    p.add_argument("--caption_column", type=str, default="text")
    p.add_argument("--max_train_prompts", type=int, default=None, help="Use only the first N prompts.")
    p.add_argument("--output_dir", type=str, default="sd3-adm")
    p.add_argument("--cache_dir", type=str, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--train_batch_size", type=int, default=1, help="Per device.")
    p.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens (the SD3 pipeline's default).")
    p.add_argument("--drop_t5", action="store_true",
                   help="Train and ship without the T5 encoder (text_encoder_3=None; its embeddings are zeros).")
    p.add_argument("--precompute_text_embeddings", action="store_true",
                   help="Encode all prompts once, then free the text encoders for the rest of training.")
    # the student
    p.add_argument("--num_student_steps", type=int, default=4)
    p.add_argument("--shift_terminal", type=float, default=0.25,
                   help="FlowMatchEulerDiscreteScheduler shift_terminal of the shipped scheduler (0 = stock). "
                        "With the stock shift 3.0 a 4-step schedule's last sigma is 0.009, a near no-op step.")
    p.add_argument("--lora_rank", type=int, default=64, help="Generator LoRA rank; 0 = full fine-tuning.")
    p.add_argument("--lora_alpha", type=int, default=None, help="Defaults to the rank.")
    p.add_argument("--fake_score_lora_rank", type=int, default=None,
                   help="Fake-score LoRA rank; 0 = full. Default: the same as --lora_rank.")
    # the method
    p.add_argument("--distribution_loss", type=str, default="adm", choices=["adm", "dmd"])
    p.add_argument("--guidance_scale", type=float, default=7.0,
                   help="Teacher CFG for the real score (SD3-Medium's pipeline default 7.0; SD3.5-Large: 3.5).")
    p.add_argument("--ode_step_dt", type=float, default=1 / 64, help="ADM's PF-ODE step, a fraction of T (sigma).")
    p.add_argument("--min_timestep_percent", type=float, default=0.02)
    p.add_argument("--max_timestep_percent", type=float, default=0.98)
    p.add_argument("--timestep_sampling", type=str, default="uniform", choices=["uniform", "shifted"],
                   help="ADM noise level: uniform in sigma, or uniform then mapped through the teacher's shift.")
    p.add_argument("--fake_score_update_ratio", type=int, default=None,
                   help="Fake-score updates per generator update (default 1 for adm, 5 for dmd).")
    p.add_argument("--discriminator_update_ratio", type=int, default=1,
                   help="Discriminator updates per generator update (on the same detached predictions).")
    p.add_argument("--discriminator_warmup_steps", type=int, default=0,
                   help="Steps in which only the fake score and the discriminator train (the generator waits).")
    p.add_argument("--discriminator_blocks", type=str, default=None,
                   help="Comma-separated transformer_blocks indices feeding D heads (default: 4 evenly spaced).")
    p.add_argument("--discriminator_head_channels", type=int, default=256)
    # optimisation
    p.add_argument("--generator_lr", type=float, default=1e-5)
    p.add_argument("--fake_score_lr", type=float, default=None, help="Default: --generator_lr.")
    p.add_argument("--discriminator_lr", type=float, default=2e-5)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=10.0)
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (must be installed).")
    p.add_argument("--lr_scheduler", type=str, default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"])
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--max_train_steps", type=int, default=4000, help="Generator updates.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches accumulated into every update (of each network).")
    p.add_argument("--use_ema", action="store_true", help="Keep an EMA of the generator (full fine-tuning only; "
                   "exported and validated when set).")
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    # checkpoints, logging, validation, export
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder or 'latest'.")
    p.add_argument("--report_to", type=str, default="none", choices=["none", "tensorboard", "wandb", "all"])
    p.add_argument("--logging_dir", type=str, default="logs")
    p.add_argument("--validation_prompts", type=str, nargs="+", default=None)
    p.add_argument("--validation_steps", type=int, default=500)
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", type=str, default=None)
    p.add_argument("--hub_token", type=str, default=None)
    p.add_argument("--hub_private_repo", action="store_true")
    args = p.parse_args(input_args)

    if args.fake_score_lora_rank is None:
        args.fake_score_lora_rank = args.lora_rank
    if args.fake_score_update_ratio is None:
        args.fake_score_update_ratio = 5 if args.distribution_loss == "dmd" else 1
    if args.fake_score_lr is None:
        args.fake_score_lr = args.generator_lr
    if args.lora_alpha is None:
        args.lora_alpha = args.lora_rank
    if (args.prompts_file is None) == (args.dataset_name is None):
        p.error("Give exactly one of --prompts_file or --dataset_name (the training prompts).")
    if args.use_ema and args.lora_rank > 0:
        p.error("--use_ema is for full fine-tuning (--lora_rank 0); it is not supported with a LoRA generator.")
    if not 0 < args.ode_step_dt < 1:
        p.error(f"--ode_step_dt must be in (0, 1) (a fraction of T), got {args.ode_step_dt}.")
    if not 0 <= args.min_timestep_percent < args.max_timestep_percent <= 1:
        p.error("Need 0 <= --min_timestep_percent < --max_timestep_percent <= 1.")
    if args.min_timestep_percent < args.ode_step_dt and args.distribution_loss == "adm":
        p.error(f"--min_timestep_percent ({args.min_timestep_percent}) must be >= --ode_step_dt "
                f"({args.ode_step_dt}) so that s = t - dt stays >= 0.")
    for name in ("num_student_steps", "fake_score_update_ratio", "discriminator_update_ratio", "max_train_steps",
                 "train_batch_size", "checkpointing_steps", "validation_steps", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1.")
    if args.lora_rank < 0 or args.fake_score_lora_rank < 0:
        p.error("LoRA ranks must be >= 0 (0 = full fine-tuning).")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            p.error("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.")
    return args


# ------------------------------------------------------------------------------------------------------------------
# Checks before any heavy work
# ------------------------------------------------------------------------------------------------------------------
def inspect_teacher(args) -> dict:
    """Read the teacher's configs (not its weights) and reject anything that is not SD3 / SD3.5, or a resolution
    the VAE and patching cannot take. Returns what the rest of the script needs to know."""
    from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel

    kw = {"revision": args.revision, "cache_dir": args.cache_dir}
    path = args.pretrained_model_name_or_path
    try:
        index = DiffusionPipeline.load_config(path, **kw)
    except Exception as e:  # a missing folder or a model repo without model_index.json
        raise ValueError(f"{path!r} is not a diffusers pipeline folder (no readable model_index.json): {e}") from e
    if index.get("_class_name") != SD3_PIPELINE or "transformer" not in index:
        raise ValueError(f"{path!r} is a {index.get('_class_name')!r} checkpoint; this script distills "
                         f"{SD3_PIPELINE} teachers (SD3-Medium, SD3.5-Large). For SDXL use train_adm_sdxl.py.")
    transformer_config = SD3Transformer2DModel.load_config(path, subfolder="transformer", **kw)
    if transformer_config.get("_class_name") != SD3_TRANSFORMER:
        raise ValueError(f"{path!r}'s transformer is a {transformer_config.get('_class_name')!r}, "
                         f"not an {SD3_TRANSFORMER}.")
    vae_config = AutoencoderKL.load_config(path, subfolder="vae", **kw)
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    patch = transformer_config["patch_size"]
    multiple = vae_factor * patch
    if args.resolution % multiple != 0:
        raise ValueError(f"--resolution {args.resolution} is not divisible by {multiple} (VAE factor {vae_factor} "
                         f"x patch size {patch}); try {max(multiple, args.resolution // multiple * multiple)}.")
    grid = args.resolution // multiple
    if grid > transformer_config["pos_embed_max_size"]:
        raise ValueError(f"--resolution {args.resolution} gives a {grid}x{grid} patch grid, larger than the "
                         f"transformer's pos_embed_max_size {transformer_config['pos_embed_max_size']}.")
    has_t5 = (index.get("text_encoder_3") or [None])[0] is not None
    if not has_t5 and not args.drop_t5:
        raise ValueError(f"{path!r} has no T5 encoder (text_encoder_3 is null in model_index.json): pass --drop_t5 "
                         "to train (and ship) without it.")
    num_layers = transformer_config["num_layers"]
    if args.discriminator_blocks:
        blocks = sorted({int(b) for b in args.discriminator_blocks.split(",")})
    else:  # Choice: 4 evenly spaced blocks, including the last (paper_spec §2.6 "several blocks")
        blocks = sorted({round(i * (num_layers - 1) / 3) for i in range(4)})
    bad = [b for b in blocks if not 0 <= b < num_layers]
    if bad:
        raise ValueError(f"--discriminator_blocks {bad} out of range: the transformer has {num_layers} blocks.")
    return {"index": index, "transformer_config": transformer_config, "vae_factor": vae_factor, "patch_size": patch,
            "latent_size": args.resolution // vae_factor, "grid": grid, "discriminator_blocks": blocks,
            "has_t5": has_t5}


def load_prompts(args) -> list[str]:
    """Prompts from ``--prompts_file`` (one per line) or a datasets dataset's ``--caption_column``."""
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts_file {str(path)!r} does not exist.")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = args.prompts_file
    else:
        from datasets import load_dataset

        name, ext = args.dataset_name, os.path.splitext(args.dataset_name)[1].lstrip(".")
        if os.path.isfile(name) and ext in ("json", "jsonl", "csv", "parquet"):
            ds = load_dataset({"jsonl": "json"}.get(ext, ext), data_files=name, split="train",
                              cache_dir=args.cache_dir)
        else:
            ds = load_dataset(name, args.dataset_config_name, split=args.dataset_split, cache_dir=args.cache_dir)
        if args.caption_column not in ds.column_names:
            raise ValueError(f"--caption_column {args.caption_column!r} not in {name} columns {ds.column_names}.")
        prompts = [str(c).strip() for c in ds[args.caption_column] if c is not None and str(c).strip()]
        source = f"{name}[{args.caption_column}]"
    if args.max_train_prompts:
        prompts = prompts[: args.max_train_prompts]
    if not prompts:
        raise ValueError(f"No prompts in {source}: it is empty.")
    return prompts


# ------------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------------
def add_lora(transformer, rank: int, alpha: float, seed: int):
    from peft import LoraConfig

    torch.manual_seed(seed)  # the same LoRA initialisation on every rank and on resume
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGET_MODULES))


def build_models(args, accelerator, teacher_info: dict, weight_dtype=torch.float32):
    """Teacher (frozen; real score AND discriminator backbone, one object), generator and fake score (copies of
    the teacher, LoRA or full), discriminator heads, text encoding, the student scheduler and its timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.training_utils import cast_training_params

    from dmdx.training import BackboneFeatures, DiscriminatorHeads, schedule_from_scheduler_config, student_timesteps
    from dmdx.training import renoise_mode as get_renoise_mode

    path, device = args.pretrained_model_name_or_path, accelerator.device
    kw = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}

    # The student's scheduler is the teacher's with shift_terminal: it is what ships, and its timesteps are the
    # training timesteps (DESIGN §4.5). Euler on a flow model is a deterministic ODE step ("ode" re-noising).
    teacher_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler",
                                                                        revision=args.revision)
    student_scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        teacher_scheduler.config, shift_terminal=args.shift_terminal or None)
    timesteps = student_timesteps(student_scheduler, args.num_student_steps)
    sigmas = student_scheduler.sigmas.detach().float().cpu()
    schedule = schedule_from_scheduler_config(student_scheduler.config)

    # Frozen weights live in the mixed-precision dtype; trainable ones (LoRA or full) in fp32 master weights.
    teacher = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=weight_dtype, **kw)
    teacher.requires_grad_(False).eval().to(device)
    # Under FSDP / DeepSpeed, prepare() shards full trainable models and moves them: keep them on the CPU until then.
    sharded = accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")

    def trainable_copy(rank: int, alpha: int, seed_offset: int):
        if rank > 0:  # LoRA on a frozen copy of the teacher's weights (in the mixed-precision dtype)
            model = copy.deepcopy(teacher)
            add_lora(model, rank, alpha, args.seed + seed_offset)
            cast_training_params(model, dtype=torch.float32)
        else:  # full fine-tuning, loaded again in fp32 (not up-cast from the low-precision copy)
            model = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.float32,
                                                          **kw)
            model.requires_grad_(True)
            if not sharded:
                model.to(device)
        model.train()
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    generator = trainable_copy(args.lora_rank, args.lora_alpha, 0)
    fake_score = trainable_copy(args.fake_score_lora_rank, args.fake_score_lora_rank, 1)
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(generator.parameters(), decay=args.ema_decay, model_cls=SD3Transformer2DModel,
                       model_config=generator.config)
    if args.enable_xformers_memory_efficient_attention:
        for model in (teacher, generator, fake_score):
            model.enable_xformers_memory_efficient_attention()

    # Discriminator (ADM only; DMD2 has none): heads on hidden states of chosen teacher blocks. JointTransformerBlock
    # returns (encoder_hidden_states, hidden_states): the image tokens are the second item.
    grid = teacher_info["grid"]
    heads = features = None
    if args.distribution_loss == "adm":
        block_names = [f"transformer_blocks.{i}" for i in teacher_info["discriminator_blocks"]]
        features = BackboneFeatures(teacher, block_names, select=lambda out: out[1])
        inner_dim = teacher.config.num_attention_heads * teacher.config.attention_head_dim
        heads = DiscriminatorHeads([(inner_dim, grid, grid)] * len(block_names),
                                   hidden_channels=args.discriminator_head_channels).to(device)
        heads.train()

    # Text encoding with the stock pipeline's encode_prompt (no transformer weights needed beyond the teacher's
    # config for the T5-less zeros).
    text_kw = {"text_encoder_3": None, "tokenizer_3": None} if args.drop_t5 else {}
    text_pipe = StableDiffusion3Pipeline.from_pretrained(path, transformer=teacher, vae=None, torch_dtype=weight_dtype,
                                                         **text_kw, **kw)
    text_pipe.set_progress_bar_config(disable=True)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(text_pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval().to(device)

    return SimpleNamespace(
        teacher=teacher, generator=generator, fake_score=fake_score, heads=heads, features=features,
        text_pipe=text_pipe, student_scheduler=student_scheduler, timesteps=timesteps, sigmas=sigmas,
        schedule=schedule, renoise_mode=get_renoise_mode(student_scheduler),
        teacher_shift=float(teacher_scheduler.config.shift), latent_channels=teacher.config.in_channels,
        latent_size=teacher_info["latent_size"], grid=grid, weight_dtype=weight_dtype, ema=ema,
    )


@torch.no_grad()
def encode_prompts(text_pipe, prompts: list[str], args, device, batch_size: int = 16, negative: bool = True) -> dict:
    """Prompt embeddings (and, with ``negative``, the empty prompt's, for CFG) in the stock pipeline's format."""
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):  # (no prompts: only the negative embeddings are returned)
        chunk = prompts[i: i + batch_size]
        e, _, p, _ = text_pipe.encode_prompt(chunk, None, None, device=device, do_classifier_free_guidance=False,
                                             max_sequence_length=args.max_sequence_length)
        embeds.append(e)
        pooled.append(p)
    out = {"prompt_embeds": torch.cat(embeds), "pooled_prompt_embeds": torch.cat(pooled)} if prompts else {}
    if not negative:
        return out
    ue, _, up, _ = text_pipe.encode_prompt([""], None, None, device=device, do_classifier_free_guidance=False,
                                           max_sequence_length=args.max_sequence_length)
    return {**out, "negative_prompt_embeds": ue, "negative_pooled_prompt_embeds": up}


def free_text_encoders(models):
    from diffusers.training_utils import free_memory

    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(models.text_pipe, name, None) is not None:
            setattr(models.text_pipe, name, None)
    models.text_pipe = None
    free_memory()


# ------------------------------------------------------------------------------------------------------------------
# One iteration
# ------------------------------------------------------------------------------------------------------------------
def _call(model, x, t, text, dtype):
    """A transformer's raw output (velocity) at (x, t), computed in ``dtype`` and returned in fp32."""
    out = model(hidden_states=x.to(dtype), timestep=t.to(dtype), encoder_hidden_states=text[0].to(dtype),
                pooled_projections=text[1].to(dtype), return_dict=False)[0]
    return out.float()


def sample_batch(models, args, step: int, rank: int, micro: int, prompt_source, device) -> dict:
    """Everything random in one micro-batch, drawn from a generator seeded by (seed, step, rank, micro-batch): an
    interrupted and resumed run draws exactly what the uninterrupted run would, whatever the RNG state."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 7919 + rank * 131 + micro)
    b, n_t = args.train_batch_size, args.fake_score_update_ratio + 1
    idx = torch.randint(0, prompt_source["count"], (b,), generator=gen)
    c, h = models.latent_channels, models.latent_size
    lo, hi = args.min_timestep_percent, args.max_timestep_percent
    sigma_t = lo + (hi - lo) * torch.rand(n_t, b, generator=gen)  # Choice: ADM's noise level uniform in sigma
    if args.timestep_sampling == "shifted":  # ... or mapped through the teacher's shift, as it was trained
        shift = models.teacher_shift
        sigma_t = shift * sigma_t / (1 + (shift - 1) * sigma_t)
    T = models.schedule.T
    t = sigma_t * T
    s = (t - args.ode_step_dt * T).clamp_min(0)  # Choice: dt is applied in sigma after any shift
    return {
        "prompt_idx": idx,
        "step_index": int(torch.randint(0, args.num_student_steps, (1,), generator=gen)),
        "z": torch.randn(b, c, h, h, generator=gen).to(device),
        "eps": torch.randn(n_t, b, c, h, h, generator=gen).to(device),
        "t": t.to(device), "s": s.to(device),  # rows 0..ratio-1: fake-score updates; last row: G / D
    }


def text_for(prompt_source, models, idx, args, device):
    """(cond, uncond) text conditionings of a batch, each a (prompt_embeds, pooled_prompt_embeds) tuple."""
    if "prompt_embeds" in prompt_source:
        cond = (prompt_source["prompt_embeds"][idx].to(device), prompt_source["pooled_prompt_embeds"][idx].to(device))
    else:
        enc = encode_prompts(models.text_pipe, [prompt_source["prompts"][i] for i in idx.tolist()], args, device,
                             negative=False)
        cond = (enc["prompt_embeds"], enc["pooled_prompt_embeds"])
    neg = (prompt_source["negative_prompt_embeds"].to(device),
           prompt_source["negative_pooled_prompt_embeds"].to(device))
    b = idx.shape[0]
    return cond, (neg[0].expand(b, -1, -1), neg[1].expand(b, -1))


def _param_dtype(module) -> torch.dtype:
    """The dtype a model's inputs are cast to: that of its (first) weights (frozen LoRA bases: the mixed-precision
    dtype; full fp32 master weights: fp32, computed under autocast; DeepSpeed engines: their own dtype)."""
    return next(module.parameters()).dtype


def _update(accelerator, args, module, optimizer, lr_scheduler, micro_losses, logs, name):
    """One optimizer update of ``module`` over the micro-batches: ``micro_losses`` yields each micro-batch's
    ``(loss, terms)``; every term is checked for NaN/inf (stop, naming it) before its backward."""
    from dmdx.training.checkpointing import check_finite

    k = args.gradient_accumulation_steps
    if accelerator.distributed_type.name == "DEEPSPEED":
        # Three trainable networks = three DeepSpeed engines; accelerator.backward drives only one, so each engine
        # runs its own backward/step (it scales by, and steps at the end of, its gradient_accumulation_steps = k;
        # clipping is the DeepSpeed config's gradient_clipping). Untested here: no DeepSpeed / GPU on CI.
        for loss, terms in micro_losses:
            check_finite(terms, accelerator)
            module.backward(loss)
            module.step()
            for key, value in terms.items():
                logs[key] = logs.get(key, 0.0) + value.detach().float().item() / k
        norm = module.get_global_grad_norm()
        logs[f"grad_norm_{name}"] = float(norm) if norm is not None else float("nan")
        return
    # Start clean: a pass in which this network was frozen must not leave gradients behind (under FSDP2 a
    # requires_grad toggle on the sharded parameters need not reach the gathered ones).
    optimizer.zero_grad(set_to_none=True)
    micro_losses = iter(micro_losses)
    for i in range(k):
        # DDP decides in the forward whether the backward syncs: draw the micro-batch's loss inside no_sync
        with accelerator.no_sync(module) if i < k - 1 else nullcontext():
            loss, terms = next(micro_losses)
            check_finite(terms, accelerator)
            accelerator.backward(loss / k)
        for key, value in terms.items():
            logs[key] = logs.get(key, 0.0) + value.detach().float().item() / k
    logs[f"grad_norm_{name}"] = float(accelerator.clip_grad_norm_(
        [p for p in module.parameters() if p.requires_grad], args.max_grad_norm))
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_iteration(models, opt, args, accelerator, prompt_source, step: int) -> dict[str, float]:
    """One ADM (or DMD2) iteration = one generator update, each network's update accumulated over
    ``--gradient_accumulation_steps`` micro-batches. ``opt``: the prepared models, optimizers, LR schedulers.
    Returns every loss term and diagnostic (floats)."""
    from dmdx.training import (
        adm_latent_predictions,
        apply_cfg,
        backward_simulate,
        discriminator_diagnostics,
        dmd_loss,
        fake_score_denoising_loss,
        frozen_parameters,
        generator_adversarial_loss,
        hinge_discriminator_loss,
        tokens_to_map,
    )

    schedule, wd, device = models.schedule, models.weight_dtype, accelerator.device
    g_dtype, f_dtype = _param_dtype(opt.generator), _param_dtype(opt.fake_score)
    # DDP wraps trainable models; a pass with their parameters frozen (gradient only through the input) goes
    # through the unwrapped module so DDP's reducer is not armed. FSDP2 shards in place: the object itself works.
    direct = accelerator.distributed_type.name in ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU",
                                                   "DEEPSPEED")
    fake_frozen = accelerator.unwrap_model(opt.fake_score) if direct else opt.fake_score
    heads_frozen = accelerator.unwrap_model(opt.heads) if direct and opt.heads is not None else opt.heads
    k_micro = args.gradient_accumulation_steps
    train_generator = step >= args.discriminator_warmup_steps
    logs: dict[str, float] = {}
    autocast = accelerator.autocast

    def gen_x0(model, x, t, cond):
        return schedule.to_x0_noise(_call(model, x, t, cond, g_dtype), x, t)[0]

    def real_x0(x, t, cond, uncond):  # the teacher with CFG: the real score (never needs gradients)
        with torch.no_grad():  # conditional and unconditional halves in one batched call
            both = (torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]]))
            out_c, out_u = _call(models.teacher, torch.cat([x, x]), torch.cat([t, t]), both, wd).chunk(2)
            return schedule.to_x0_noise(apply_cfg(out_c, out_u, args.guidance_scale), x, t)[0]

    def fake_x0(x, t, cond):  # the fake score without CFG (DMD2's convention), parameters frozen
        return schedule.to_x0_noise(_call(fake_frozen, x, t, cond, f_dtype), x, t)[0]

    def student_denoiser(cond):
        return lambda x, t: gen_x0(opt.generator, x, t, cond)

    def teacher_features(x, s, cond):  # hidden states of the chosen teacher blocks at (x, s), as (C, h, w) maps
        features = models.features(lambda: _call(models.teacher, x, s, cond, wd))
        return [tokens_to_map(f, models.grid, models.grid) for f in features]

    def discriminate(heads, x, s, cond):  # D(x, s) = heads(teacher block features at (x, s))
        return heads(teacher_features(x, s, cond)).float()

    # 0. each micro-batch: the student's input at a random step k of its own schedule (backward simulation, no
    #    grad) and x0 = G(x_k, t_k). With one micro-batch the generator's graph is kept for step 2.
    ts = models.timesteps.to(device)
    micro = []
    for i in range(k_micro):
        batch = sample_batch(models, args, step, accelerator.process_index, i, prompt_source, device)
        cond, uncond = text_for(prompt_source, models, batch["prompt_idx"], args, device)
        b = batch["z"].shape[0]
        with autocast():
            x_k = backward_simulate(student_denoiser(cond), batch["z"], ts, batch["step_index"], schedule,
                                    models.renoise_mode)
            t_k = ts[batch["step_index"]].expand(b)
            with torch.set_grad_enabled(train_generator and k_micro == 1):
                x0 = gen_x0(opt.generator, x_k, t_k, cond)
        micro.append({**batch, "cond": cond, "uncond": uncond, "x_k": x_k, "t_k": t_k, "x0": x0})
    logs["student_step_index"] = sum(m["step_index"] for m in micro) / k_micro

    # 1. fake score: ordinary denoising loss on sg(x0) (TTUR: --fake_score_update_ratio updates)
    def fake_losses(r):
        for m in micro:
            t, eps = m["t"][r], m["eps"][r]
            x_t = schedule.add_noise(m["x0"].detach(), eps, t)
            with autocast():
                out = _call(opt.fake_score, x_t, t, m["cond"], f_dtype)
                loss = fake_score_denoising_loss(out, m["x0"], eps, t, schedule).mean()
            yield loss, {"loss_fake_score": loss}

    for r in range(args.fake_score_update_ratio):
        if r:
            logs.pop("loss_fake_score")
        _update(accelerator, args, opt.fake_score, opt.fake_optimizer, opt.fake_lr_scheduler, fake_losses(r), logs,
                "fake_score")

    # 2. generator: x_t = add_noise(x0, eps, t) (gradient flows to G); one PF-ODE (Euler) step t -> s from the same
    #    x_t with the teacher (CFG) and the fake score (frozen, gradient through its input); loss = -D(x_fake, s).
    #    dmd: DMD2's loss on the two x0 predictions instead. The detached x_real / x_fake are kept for step 3.
    def generator_loss(m):
        t, s, eps = m["t"][-1], m["s"][-1], m["eps"][-1]
        with autocast():
            x0 = m["x0"] if k_micro == 1 or not train_generator else gen_x0(opt.generator, m["x_k"], m["t_k"],
                                                                             m["cond"])
            x_t = schedule.add_noise(x0, eps, t)
            if args.distribution_loss == "dmd":
                with torch.no_grad():
                    x0_real, x0_fake = real_x0(x_t, t, m["cond"], m["uncond"]), fake_x0(x_t, t, m["cond"])
                loss = dmd_loss(x0, x0_real, x0_fake).mean()
                return loss, {"loss_generator_dmd": loss}
            cache = {}

            def real(x, tt):
                cache["real"] = real_x0(x.detach(), tt, m["cond"], m["uncond"])
                return cache["real"]

            def fake(x, tt):
                cache["fake"] = fake_x0(x, tt, m["cond"])
                return cache["fake"]

            x_real, x_fake = adm_latent_predictions(x_t, t, s, real, fake, schedule)
            loss = generator_adversarial_loss(discriminate(heads_frozen, x_fake, s, m["cond"])).mean()
        m["x_real"], m["x_fake"] = x_real.detach(), x_fake.detach()
        # recorded, not optimised (as the paper's Fig. 3): the DMD loss of the current samples
        recorded = dmd_loss(x0.detach(), cache["real"], cache["fake"].detach()).mean()
        return loss, {"loss_generator_adv": loss, "dmd_loss_recorded": recorded}

    def generator_losses():
        for m in micro:
            yield generator_loss(m)

    with frozen_parameters(fake_frozen, heads_frozen):  # backward inside: checkpointed recomputation sees one graph
        if train_generator:
            _update(accelerator, args, opt.generator, opt.generator_optimizer, opt.generator_lr_scheduler,
                    generator_losses(), logs, "generator")
        else:  # discriminator warm-up: the same predictions, no generator update
            from dmdx.training.checkpointing import check_finite

            with torch.no_grad():
                for _, terms in generator_losses():
                    check_finite(terms, accelerator)
                    for key, value in terms.items():
                        logs[key] = logs.get(key, 0.0) + value.float().item() / k_micro

    # 3. discriminator heads: hinge loss on the detached x_real (teacher step) vs x_fake (fake-score step); the
    #    backbone runs without autograd, only the heads get gradients.
    if args.distribution_loss == "adm":
        diag = []

        def discriminator_losses():
            for m in micro:
                s = m["s"][-1]
                with autocast():
                    with torch.no_grad():  # the backbone's features need no autograd here; real and fake batched
                        cond2 = tuple(torch.cat([c, c]) for c in m["cond"])
                        feats = teacher_features(torch.cat([m["x_real"], m["x_fake"]]), torch.cat([s, s]), cond2)
                    logits_real, logits_fake = opt.heads(feats).float().chunk(2)
                    loss = hinge_discriminator_loss(logits_real, logits_fake).mean()
                diag.append((logits_real.detach(), logits_fake.detach(), m["t"][-1]))
                yield loss, {"loss_discriminator": loss}

        for r in range(args.discriminator_update_ratio):
            if r:
                logs.pop("loss_discriminator")
                diag.clear()
            _update(accelerator, args, opt.heads, opt.discriminator_optimizer, opt.discriminator_lr_scheduler,
                    discriminator_losses(), logs, "discriminator")
        logits_real, logits_fake, t = (torch.cat(x) for x in zip(*diag))
        logs.update(discriminator_diagnostics(logits_real, logits_fake))
        # the logit gap per noise band: ADM's signal may sit only at low noise (DESIGN §2)
        high = t >= schedule.T / 2
        for band, mask in (("high_noise", high), ("low_noise", ~high)):
            if mask.any():
                logs[f"logit_gap_{band}"] = (logits_real[mask].mean() - logits_fake[mask].mean()).item()
    return logs


# ------------------------------------------------------------------------------------------------------------------
# Validation, export
# ------------------------------------------------------------------------------------------------------------------
def log_validation(models, opt, args, accelerator, step: int, val_text: dict, vae) -> str | None:
    """Generate the validation prompts with the student exactly as the exported pipeline will (its scheduler,
    ``num_inference_steps=K``, ``guidance_scale=0``), save a grid, log it to the trackers."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import make_image_grid

    pipe = StableDiffusion3Pipeline(
        transformer=accelerator.unwrap_model(opt.generator), scheduler=copy.deepcopy(models.student_scheduler),
        vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(accelerator.device).manual_seed(args.seed)
    with accelerator.autocast(), torch.no_grad():
        images = pipe(prompt_embeds=val_text["prompt_embeds"].to(accelerator.device),
                      pooled_prompt_embeds=val_text["pooled_prompt_embeds"].to(accelerator.device),
                      num_inference_steps=args.num_student_steps, guidance_scale=0.0, height=args.resolution,
                      width=args.resolution, generator=gen).images
    if not accelerator.is_main_process:
        return None
    grid = make_image_grid(images, rows=1, cols=len(images))
    path = os.path.join(args.output_dir, "validation", f"step_{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step,
                                      dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in
                                        zip(images, args.validation_prompts)]}, step=step)
    logger.info(f"validation grid: {path}")
    return path


def write_training_config(args, models, teacher_info, path: str, **extra):
    """The run's settings and the student's schedule (timesteps and sigmas the shipped scheduler must reproduce)."""
    config = {k: v for k, v in vars(args).items() if k != "hub_token"}
    config.update(
        student_timesteps=models.timesteps.tolist(), student_sigmas=models.sigmas.tolist(),
        student_scheduler=dict(models.student_scheduler.config), discriminator_blocks=
        teacher_info["discriminator_blocks"], renoise_mode=models.renoise_mode, **extra,
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def export_student(models, opt, args, accelerator):
    """Full: a stock StableDiffusion3Pipeline folder (teacher VAE/text encoders, distilled transformer, student
    scheduler; no T5 with --drop_t5). LoRA: the same folder with the adapter fused, plus
    ``pytorch_lora_weights.safetensors`` for ``StableDiffusion3Pipeline.load_lora_weights`` on the teacher."""
    import tempfile

    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from dmdx.pipelines.export import LORA_WEIGHT_NAME, save_student_pipeline

    state = accelerator.get_state_dict(opt.generator)  # gathers sharded (FSDP / ZeRO) weights on the main process
    if not accelerator.is_main_process:
        return
    path = args.pretrained_model_name_or_path
    kw = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **kw)
    if args.lora_rank > 0:
        lora_state = get_peft_model_state_dict(accelerator.unwrap_model(opt.generator), state_dict=state)
        tmp = tempfile.mkdtemp(prefix=".lora-", dir=args.output_dir)
        StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=lora_state,
                                                   weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
        os.replace(os.path.join(tmp, LORA_WEIGHT_NAME), os.path.join(args.output_dir, LORA_WEIGHT_NAME))
        os.rmdir(tmp)
        add_lora(transformer, args.lora_rank, args.lora_alpha, args.seed)
        set_peft_model_state_dict(transformer, lora_state)
        transformer.fuse_lora()
        transformer.unload_lora()
    else:
        transformer.load_state_dict({k: v.float() for k, v in state.items()})
    components = {"transformer": transformer.to(models.weight_dtype)}
    if args.drop_t5:
        components.update(text_encoder_3=None, tokenizer_3=None)
    save_student_pipeline(path, args.output_dir, components, models.student_scheduler,
                          torch_dtype=models.weight_dtype, **kw)
    logger.info(f"exported the student pipeline to {args.output_dir}")


def record_rank_checksums(accelerator, generator):
    """Checksums of the generator's trainable weights on every process (DDP must keep the ranks identical)."""
    with torch.no_grad():
        params = [p.detach().double() for p in accelerator.unwrap_model(generator).parameters() if p.requires_grad]
        local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)]).reshape(1, 2)
    checksums = accelerator.gather(local.to(accelerator.device)).cpu().tolist()
    if accelerator.is_main_process and any(c != checksums[0] for c in checksums):
        logger.warning(f"generator weights differ between ranks: {checksums}")
    return checksums


def build_prompt_source(args, models, prompts: list[str], device) -> dict:
    """What ``train_iteration`` draws its text conditioning from: every prompt's embeddings (encoded once, kept on the
    CPU, text encoders freed) with ``--precompute_text_embeddings``, else the prompts (encoded batch by batch); the
    empty prompt's embeddings (CFG's unconditional half) either way."""
    if args.precompute_text_embeddings:
        source = {k: v.cpu() for k, v in encode_prompts(models.text_pipe, prompts, args, device).items()}
        free_text_encoders(models)
    else:
        negative = encode_prompts(models.text_pipe, [], args, device)
        source = {"prompts": prompts, **negative}
    source["count"] = len(prompts)
    return source


def prepare_training(args, accelerator, models) -> SimpleNamespace:
    """Optimizers (trainable parameters only: LoRA or full weights; ADM's heads) and LR schedulers, prepared with
    accelerate network by network. Returns the namespace ``train_iteration`` takes as ``opt``."""
    from accelerate.utils import DistributedType
    from diffusers.optimization import get_scheduler

    if args.use_8bit_adam:
        import bitsandbytes as bnb

        adam = bnb.optim.AdamW8bit
    else:
        adam = torch.optim.AdamW

    def make_opt(model, lr):
        return adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(args.adam_beta1,
                    args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    def make_sched(optimizer, updates_per_step):
        return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * updates_per_step
                             * accelerator.num_processes, num_training_steps=args.max_train_steps *
                             updates_per_step * accelerator.num_processes)

    g_opt = make_opt(models.generator, args.generator_lr)
    f_opt = make_opt(models.fake_score, args.fake_score_lr)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # no dataloader is prepared: say the batch size
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
        if ds_config.get("gradient_accumulation_steps", 1) not in (args.gradient_accumulation_steps, "auto"):
            raise ValueError(f"The DeepSpeed config's gradient_accumulation_steps "
                             f"({ds_config['gradient_accumulation_steps']}) must equal --gradient_accumulation_steps "
                             f"({args.gradient_accumulation_steps}).")
        ds_config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    # one prepare call per network (DeepSpeed makes one engine per call; DDP/FSDP do not mind)
    opt = SimpleNamespace()
    opt.generator, opt.generator_optimizer, opt.generator_lr_scheduler = accelerator.prepare(
        models.generator, g_opt, make_sched(g_opt, 1))
    opt.fake_score, opt.fake_optimizer, opt.fake_lr_scheduler = accelerator.prepare(
        models.fake_score, f_opt, make_sched(f_opt, args.fake_score_update_ratio))
    opt.heads = opt.discriminator_optimizer = opt.discriminator_lr_scheduler = None
    if models.heads is not None:
        d_opt = make_opt(models.heads, args.discriminator_lr)
        opt.heads, opt.discriminator_optimizer, opt.discriminator_lr_scheduler = accelerator.prepare(
            models.heads, d_opt, make_sched(d_opt, args.discriminator_update_ratio))
    if models.ema is not None:
        models.ema.to(accelerator.device)
        accelerator.register_for_checkpointing(models.ema)

    return opt


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def register_lora_checkpoint_hooks(accelerator, opt) -> bool:
    """Checkpoints of LoRA networks hold only their trainable (adapter) weights, not the frozen base that is the
    teacher's (SD3-Medium: ~150 MB instead of ~4 GB per network). Only without FSDP/DeepSpeed, which save their own
    way. Returns whether any network is trimmed (resume then loads non-strictly and checks the adapters itself)."""
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        return False
    lora = [accelerator.unwrap_model(m) for m in (opt.generator, opt.fake_score)]
    lora = [m for m in lora if getattr(m, "peft_config", None)]

    def save_hook(models, weights, _output_dir):
        for model, state in zip(models, weights):
            unwrapped = accelerator.unwrap_model(model)
            if any(unwrapped is m for m in lora):
                keep = _trainable_names(unwrapped)
                for key in [k for k in state if k not in keep]:
                    del state[key]

    if lora:
        accelerator.register_save_state_pre_hook(save_hook)
    return bool(lora)


def check_resumed_weights(accelerator, checkpoint: str):
    """After a non-strict resume: every trainable weight of every model must have been in the checkpoint."""
    from safetensors import safe_open

    for i, model in enumerate(accelerator._models):
        path = os.path.join(checkpoint, "model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not os.path.isfile(path):
            continue  # another serialization (e.g. .bin); accelerate's own loading raised if it was unreadable
        with safe_open(path, "pt") as f:
            missing = _trainable_names(accelerator.unwrap_model(model)) - set(f.keys())
        if missing:
            raise ValueError(f"{checkpoint} does not match this run: {path} lacks trainable weights "
                             f"{sorted(missing)[:5]} (different --lora_rank / --fake_score_lora_rank?).")


def _kind(rank: int) -> str:
    return f"LoRA r={rank}" if rank else "full"


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------
def main(args):
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from dmdx.pipelines.hub import push_to_hub
    from dmdx.pipelines.model_card import write_model_card
    from dmdx.training.checkpointing import checkpoint_step, find_resume_checkpoint, save_checkpoint

    teacher_info = inspect_teacher(args)  # clear errors before any weights load
    prompts = load_prompts(args)

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    log = get_logger(__name__)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    models = build_models(args, accelerator, teacher_info, weight_dtype)
    d_text = (f"discriminator on transformer_blocks {teacher_info['discriminator_blocks']}"
              if models.heads is not None else "no discriminator (dmd)")
    log.info(f"student timesteps {models.timesteps.tolist()}, sigmas {models.sigmas.tolist()}; {d_text}",
             main_process_only=True)

    val_text = (encode_prompts(models.text_pipe, args.validation_prompts, args, accelerator.device)
                if args.validation_prompts else None)
    source = build_prompt_source(args, models, prompts, accelerator.device)
    vae = None
    if args.validation_prompts:
        vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae",
                                            revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
        vae.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)

    opt = prepare_training(args, accelerator, models)
    trimmed = register_lora_checkpoint_hooks(accelerator, opt)

    if accelerator.is_main_process:
        write_training_config(args, models, teacher_info, os.path.join(args.output_dir, TRAINING_CONFIG_NAME))
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("dmdx-sd3", config=tracker_config)

    # Resume
    global_step = 0
    resume = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume:
        if trimmed:  # LoRA networks' checkpoints hold only their adapters: load non-strictly, then check
            accelerator.load_state(resume, strict=False)
            check_resumed_weights(accelerator, resume)
        else:
            accelerator.load_state(resume)
        global_step = checkpoint_step(resume)
        log.info(f"resumed from {resume} at step {global_step}", main_process_only=True)
    elif args.resume_from_checkpoint:
        log.info("no checkpoint to resume from: starting a new run", main_process_only=True)

    log.info(f"***** {args.distribution_loss.upper()} distillation: {len(prompts)} prompts, batch "
             f"{args.train_batch_size} x {accelerator.num_processes} processes, {args.max_train_steps} steps, "
             f"generator {_kind(args.lora_rank)}, fake score {_kind(args.fake_score_lora_rank)} *****",
             main_process_only=True)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    grid_path = None
    everyone_validates = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    while global_step < args.max_train_steps:
        logs = train_iteration(models, opt, args, accelerator, source, global_step)
        if models.ema is not None and global_step >= args.discriminator_warmup_steps:
            models.ema.step(accelerator.unwrap_model(opt.generator).parameters())
        global_step += 1
        logs["lr_generator"] = opt.generator_lr_scheduler.get_last_lr()[0]
        progress.update(1)
        progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss") or k == "d_accuracy"})
        accelerator.log(logs, step=global_step)
        if accelerator.is_main_process:  # every term, also as JSON lines for quick inspection
            with open(os.path.join(args.output_dir, "train_log.jsonl"), "a") as f:
                f.write(json.dumps({"step": global_step, **logs}) + "\n")
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        if args.validation_prompts and (global_step % args.validation_steps == 0 or
                                        global_step == args.max_train_steps):
            if accelerator.is_main_process or everyone_validates:
                params = accelerator.unwrap_model(opt.generator).parameters
                if models.ema is not None:  # validate the EMA weights, then put the training weights back
                    models.ema.store(params())
                    models.ema.copy_to(params())
                grid_path = log_validation(models, opt, args, accelerator, global_step, val_text, vae) or grid_path
                if models.ema is not None:
                    models.ema.restore(params())
    progress.close()

    accelerator.wait_for_everyone()
    if models.ema is not None:  # the EMA weights are the ones exported
        models.ema.copy_to(accelerator.unwrap_model(opt.generator).parameters())
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    checksums = None if sharded else record_rank_checksums(accelerator, opt.generator)
    export_student(models, opt, args, accelerator)
    if accelerator.is_main_process:
        write_training_config(args, models, teacher_info, os.path.join(args.output_dir, TRAINING_CONFIG_NAME),
                              generator_checksum_per_rank=checksums)
        write_model_card(
            args.output_dir, base_model=args.pretrained_model_name_or_path, pipeline_class="StableDiffusion3Pipeline",
            num_inference_steps=args.num_student_steps, timesteps=models.timesteps.tolist(), guidance_scale=0.0,
            method=args.distribution_loss, lora=args.lora_rank > 0, repo_id=args.hub_model_id,
            sample_grid=os.path.relpath(grid_path, args.output_dir) if grid_path else None,
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            training_details={"steps": args.max_train_steps, "teacher guidance scale": args.guidance_scale,
                              "ODE step dt": args.ode_step_dt, "generator": _kind(args.lora_rank),
                              "T5": "dropped" if args.drop_t5 else "kept"},
        )
        with open(os.path.join(args.output_dir, "README.md"), "a") as f:
            if args.lora_rank > 0:
                f.write("\n\n## Full pipeline\n\nThis folder is also a complete `StableDiffusion3Pipeline` with the "
                        "adapter fused into the transformer and the student's scheduler: "
                        "`DiffusionPipeline.from_pretrained(repo)`.\n")
            if args.drop_t5:  # diffusers loads a component saved as [null, null] only when it is passed as None
                f.write("\n\n## Without T5\n\nThis student was trained without the T5 text encoder and ships "
                        "without it. Load it with\n`DiffusionPipeline.from_pretrained(repo, text_encoder_3=None, "
                        "tokenizer_3=None)`.\n")
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
    accelerator.wait_for_everyone()  # no rank tears the process group down while the main one still exports
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
