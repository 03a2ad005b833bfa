"""The flags every distillation script shares, in diffusers' vocabulary (docs/design.md#flags), and their checks.

Entry scripts call :func:`distillation_parser` / :func:`adp_parser`, add their architecture's own flags, set their
recipe defaults with ``parser.set_defaults`` and call :func:`finish_distillation_args` (or :func:`finish_common_args`).
Every check here reads only the flags: a bad value stops with argparse's exit status 2 and a message naming the
flag, before anything loads.
"""

from __future__ import annotations

import argparse
import os

LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


def common_parser(description: str) -> argparse.ArgumentParser:
    """Model, data, optimisation, logging, checkpoint and export flags of every training script."""
    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="The teacher (Hub id or local folder).")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="Weights variant of the teacher, e.g. fp16.")
    g.add_argument("--prompts_file", default=None, help="Training prompts: a text file, one per line.")
    g.add_argument("--dataset_name", default=None,
                   help="Or a datasets name, or a local .json/.jsonl/.csv/.parquet file, whose --caption_column holds "
                        "the prompts (distillation is data-free: only prompts are used).")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--max_train_prompts", type=int, default=None, help="Use only the first N prompts.")
    g.add_argument("--output_dir", default="dmdx-student")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Write into an --output_dir that already holds another run (its files are replaced as this "
                        "run writes its own; without this flag such a folder is refused).")
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resolution", type=int, default=1024, help="Training (and student) image size in pixels.")
    g.add_argument("--precompute_text_embeddings", action="store_true",
                   help="Shorthand for --text_embeddings_cache OUTPUT_DIR/text_embeddings.")
    g.add_argument("--text_embeddings_cache", default=None,
                   help="A folder of text embeddings (bf16 safetensors shards + index.json): every prompt, the empty "
                        "prompt and the validation prompts encoded once, spread over the processes, then read "
                        "memory-mapped; built (or extended) where it lacks prompts, otherwise the text encoders are "
                        "not loaded at all. Refused when made for other text encoders or options (docs/gpus.md).")
    g.add_argument("--text_embeddings_shard_size", type=int, default=256,
                   help="Prompts per cache shard (the unit of work spread over the processes).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=1, help="Per device.")
    g.add_argument("--max_train_steps", type=int, default=1000, help="Generator updates.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches accumulated into every update (of each network).")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--generator_lr", type=float, default=1e-5)
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=10.0)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (must be installed).")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Frozen models are kept in this dtype; trainable ones in fp32 master weights under autocast.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the generator (full fine-tuning only; "
                   "validated and exported when set).")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--lora_rank", type=int, default=0, help="Generator LoRA rank; 0 = full fine-tuning.")
    g.add_argument("--lora_alpha", type=int, default=None, help="Defaults to the rank.")
    g.add_argument("--discriminator_lr", type=float, default=1e-5)
    g.add_argument("--discriminator_blocks", default=None,
                   help="Denoiser blocks feeding the discriminator heads (the teacher adapter's default if unset).")
    g.add_argument("--discriminator_head_channels", type=int, default=256)

    g = p.add_argument_group("logging, checkpoints, validation, export")
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
    return p


def distillation_parser(description: str) -> argparse.ArgumentParser:
    """:func:`common_parser` plus the ADM / DMD2 flags (the method's own names)."""
    p = common_parser(description)
    g = p.add_argument_group("ADM / DMD2")
    g.add_argument("--pretrained_generator_name_or_path", default=None,
                   help="Generator initialisation: a pipeline folder of the same architecture (e.g. an ADP output: "
                        "DMDX) whose scheduler the student keeps; by default the teacher.")
    g.add_argument("--distribution_loss", default="adm", choices=["adm", "dmd"],
                   help="adm: the paper's adversarial loss on one-step PF-ODE predictions; dmd: DMD2's baseline.")
    g.add_argument("--num_student_steps", type=int, default=1)
    g.add_argument("--guidance_scale", type=float, default=7.0, help="Teacher CFG of the real score.")
    g.add_argument("--ode_step_dt", type=float, default=1 / 64, help="ADM's PF-ODE step, a fraction of T.")
    g.add_argument("--min_timestep_percent", type=float, default=0.02)
    g.add_argument("--max_timestep_percent", type=float, default=0.98)
    g.add_argument("--timestep_sampling", default="uniform", choices=["uniform", "shifted"],
                   help="Noise levels of ADM / the fake score: uniform in t, or (flow teachers) uniform in sigma then "
                        "mapped through the teacher's shift, as it was trained.")
    g.add_argument("--fake_score_update_ratio", type=int, default=None,
                   help="Fake-score updates per generator update (default 1 for adm, 5 for dmd).")
    g.add_argument("--fake_score_lr", type=float, default=None, help="Defaults to --generator_lr.")
    g.add_argument("--fake_score_lora_rank", type=int, default=None,
                   help="Fake-score LoRA rank; 0 = full copy. Default: --lora_rank.")
    g.add_argument("--discriminator_update_ratio", type=int, default=1,
                   help="Discriminator updates per generator update. The first reuses the generator step's "
                        "predictions; each further one draws a fresh batch.")
    g.add_argument("--discriminator_warmup_steps", type=int, default=0,
                   help="The first N iterations train only the fake score and D; the generator waits.")
    g = p.add_argument_group("ADM remedies (docs/results.md#remedies; the defaults are the paper's method)")
    g.add_argument("--generator_gradient", default="none", choices=["none", "normalize", "remove_batch_mean"],
                   help="Reshape the gradient at the generator's output: normalize each sample's to the batch mean "
                        "norm, or remove the batch-common part (ADM's per-sample gradients point the same way).")
    g.add_argument("--ode_step_mode", default="fixed", choices=["fixed", "relative"],
                   help="ADM's ODE step: s = t - dt*T (fixed, the paper) or s = t*(1 - dt) (relative to t).")
    g.add_argument("--discriminator_renoise", default="none", choices=["none", "shared"],
                   help="shared: re-noise both ODE-step outputs with the same fresh noise to a level drawn in "
                        "[max(s, --discriminator_renoise_min*T), T) before D (PCM's SD3 discriminator).")
    g.add_argument("--discriminator_renoise_min", type=float, default=0.0)
    g.add_argument("--discriminator_r1_weight", type=float, default=0.0,
                   help="Weight of an R1 penalty on D's slope at real inputs (0 = off; FastGen: 100-1000).")
    g.add_argument("--discriminator_r2_weight", type=float, default=0.0,
                   help="Weight of an R2 penalty on D's slope at fake inputs (0 = off; R3GAN uses R1 and R2 with "
                        "one weight).")
    g.add_argument("--discriminator_r1", default="approximate", choices=["approximate", "exact"],
                   help="How the R1 and R2 penalties are computed. approximate: FastGen's finite difference (one "
                        "extra backbone pass, no double backward); exact: ||dD/dx||^2 through the teacher (a double "
                        "backward).")
    g.add_argument("--discriminator_r1_alpha", type=float, default=0.1, help="Perturbation scale of approximate R1.")
    g.add_argument("--discriminator_precision", default="mixed", choices=["mixed", "fp32"],
                   help="fp32: D's backbone passes run on an fp32 copy of the teacher with autocast off, so the small "
                        "gap between the two ODE-step outputs D compares survives bf16 / fp16 rounding (costs one fp32 "
                        "teacher copy of memory; the same as mixed under --mixed_precision no).")
    g.add_argument("--discriminator_head_depth", type=int, default=3,
                   help="Downsampling convs per discriminator head (docs/method.md#heads: 3).")
    g.add_argument("--discriminator_head_output", default="pooled", choices=["pooled", "per_position"],
                   help="pooled: each head averages its map to one logit per sample (the paper's heads). "
                        "per_position: a logit per position of each head's last map, the hinge taken per position "
                        "(a patch discriminator; docs/adm_probe.md). With --discriminator_head_depth 3 a small map "
                        "ends at 1x1, i.e. pooled: use a smaller depth to keep positions.")
    g.add_argument("--diagnostics_steps", type=int, default=25,
                   help="Every N steps also log how far the generator's outputs move in one update and, for adm, "
                        "how ADM's generator gradient relates to DMD's (0 = never; costs one generator forward).")
    g.add_argument("--gradient_checkpointing_frozen_passes", action="store_true",
                   help="Gradient checkpointing of the frozen passes that carry the generator's gradient (adm: the "
                        "fake score's ODE step and the discriminator's backbone pass in the generator update): their "
                        "blocks keep only their inputs until the backward and are recomputed one at a time, as "
                        "--gradient_checkpointing does for the trained networks (LoRA roles included). Gradients are "
                        "unchanged; costs one more forward of each of those passes per micro-batch "
                        "(docs/memory.md). No effect with --distribution_loss dmd (its frozen passes run without "
                        "gradients).")
    return p


def finish_common_args(parser: argparse.ArgumentParser, args, needs_prompts: bool = True):
    """Checks of the flags every script has."""
    if args.lora_alpha is None:
        args.lora_alpha = args.lora_rank
    if needs_prompts and (args.prompts_file is None) == (args.dataset_name is None):
        parser.error("give exactly one of --prompts_file or --dataset_name (the training prompts).")
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                 "validation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.text_embeddings_shard_size < 1:
        parser.error(f"--text_embeddings_shard_size must be >= 1, got {args.text_embeddings_shard_size}.")
    for name in ("lora_rank", "lr_warmup_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0 (LoRA rank 0 = full fine-tuning), got {getattr(args, name)}.")
    for name in ("generator_lr", "discriminator_lr"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)} (0 would ship the starting weights).")
    if args.max_grad_norm <= 0:
        parser.error(f"--max_grad_norm must be > 0, got {args.max_grad_norm}.")
    if not 0 < args.ema_decay < 1:
        parser.error(f"--ema_decay must be in (0, 1), got {args.ema_decay}.")
    if args.use_ema and args.lora_rank > 0:
        parser.error("--use_ema is for full fine-tuning (--lora_rank 0); it is not supported with a LoRA generator.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")
    if args.prompts_file and not os.path.isfile(args.prompts_file):
        parser.error(f"--prompts_file {args.prompts_file!r} does not exist.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            parser.error("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`, or all that the recipes use: "
                         "`pip install -e .[train]` (docs/gpus.md).")
    check_report_to(parser, args.report_to)
    return args


# --report_to value -> the packages accelerate logs with (any one of them)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_report_to(parser: argparse.ArgumentParser, report_to: str) -> None:
    """``--report_to X`` needs X's package: without it accelerate only warns and the run logs nothing. Checked
    with importlib's find_spec (nothing is imported); ``all`` needs at least one tracker."""
    import importlib.util

    def installed(name: str) -> bool:
        return any(importlib.util.find_spec(p) is not None for p in TRACKER_PACKAGES[name])

    if report_to in TRACKER_PACKAGES and not installed(report_to):
        parser.error(f"--report_to {report_to} needs the {TRACKER_PACKAGES[report_to][0]} package, which is not "
                     f"installed: `pip install {TRACKER_PACKAGES[report_to][0]}` (tensorboard comes with "
                     "`pip install -e .[train]`, docs/gpus.md), or pass --report_to none.")
    if report_to == "all" and not any(installed(name) for name in TRACKER_PACKAGES):
        parser.error(f"--report_to all: none of the trackers' packages ({', '.join(TRACKER_PACKAGES)}) is installed: "
                     "`pip install -e .[train]` brings tensorboard (docs/gpus.md).")


def check_video_size_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The video scripts' size flags: ``--resolution`` (a square) or ``--height``/``--width``, every given size >= 1
    (what the architecture can take is the adapter's check)."""
    if args.resolution is not None and (args.height or args.width):
        parser.error("give --resolution (a square) or --height/--width, not both.")
    for name in ("num_frames", "height", "width", "max_sequence_length", "resolution"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")


def finish_distillation_args(parser: argparse.ArgumentParser, args):
    """Defaults that depend on other flags, then every check of the ADM / DMD2 flags."""
    if args.fake_score_update_ratio is None:
        args.fake_score_update_ratio = 5 if args.distribution_loss == "dmd" else 1
    if args.fake_score_lr is None:
        args.fake_score_lr = args.generator_lr
    if args.fake_score_lora_rank is None:
        args.fake_score_lora_rank = args.lora_rank
    finish_common_args(parser, args)
    for name in ("num_student_steps", "fake_score_update_ratio", "discriminator_update_ratio"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("fake_score_lora_rank", "discriminator_warmup_steps", "diagnostics_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if not args.fake_score_lr > 0:
        parser.error(f"--fake_score_lr must be > 0, got {args.fake_score_lr}.")
    if not 0 <= args.min_timestep_percent < args.max_timestep_percent <= 1:
        parser.error("need 0 <= --min_timestep_percent < --max_timestep_percent <= 1.")
    if args.generator_gradient == "remove_batch_mean" and args.train_batch_size < 2:
        parser.error("--generator_gradient remove_batch_mean needs --train_batch_size >= 2 (with one sample it "
                     "removes the whole gradient).")
    for name in ("discriminator_r1_weight", "discriminator_r2_weight", "discriminator_r1_alpha"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if not 0 <= args.discriminator_renoise_min <= 1:
        parser.error(f"--discriminator_renoise_min is a fraction of T in [0, 1], got {args.discriminator_renoise_min}.")
    if args.discriminator_head_depth < 1:
        parser.error(f"--discriminator_head_depth must be >= 1, got {args.discriminator_head_depth}.")
    if args.distribution_loss == "adm":
        if not 0 < args.ode_step_dt < 1:
            parser.error(f"--ode_step_dt must be in (0, 1) (a fraction of T or, relative, of t), got "
                         f"{args.ode_step_dt}.")
        if args.ode_step_mode == "fixed" and args.min_timestep_percent < args.ode_step_dt:
            parser.error(f"--min_timestep_percent ({args.min_timestep_percent}) must be >= --ode_step_dt "
                         f"({args.ode_step_dt}) so that s = t - dt stays >= 0.")
        if args.discriminator_warmup_steps >= args.max_train_steps:
            parser.error(f"--discriminator_warmup_steps ({args.discriminator_warmup_steps}) must be below "
                         f"--max_train_steps ({args.max_train_steps}): otherwise the generator never trains.")
    return args


def load_prompts(args) -> list[str]:
    """Prompts from ``--prompts_file`` (one per line) or a datasets dataset's ``--caption_column``."""
    from dmdx.training.errors import UsageError

    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise UsageError(f"--prompts_file {args.prompts_file!r} does not exist.")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        source = f"--prompts_file {args.prompts_file!r}"
    else:
        from datasets import load_dataset

        # Streamed, caption column only: nothing else of the data set (e.g. its images) is downloaded or decoded.
        name, ext = args.dataset_name, os.path.splitext(args.dataset_name)[1].lstrip(".")
        limit = getattr(args, "max_train_prompts", None)
        try:
            if os.path.isfile(name) and ext in ("json", "jsonl", "csv", "parquet"):
                dataset = load_dataset({"jsonl": "json"}.get(ext, ext), data_files=name, split="train",
                                       cache_dir=args.cache_dir, streaming=True)
            else:
                dataset = load_dataset(name, args.dataset_config_name, split=args.dataset_split,
                                       cache_dir=args.cache_dir, streaming=True)
            columns = dataset.column_names
            if columns is not None and args.caption_column not in columns:
                raise UsageError(f"--caption_column {args.caption_column!r} not in {name} columns {columns}.")
            prompts = []
            for row in dataset.select_columns([args.caption_column]):
                caption = row[args.caption_column]
                if caption is not None and str(caption).strip():
                    prompts.append(str(caption).strip())
                    if limit and len(prompts) >= limit:
                        break
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - a missing/unreadable data set, named with its flag
            raise UsageError(f"--dataset_name {name!r} could not be loaded: {e}") from e
        source = f"--dataset_name {name}[{args.caption_column}]"
    if getattr(args, "max_train_prompts", None):
        prompts = prompts[: args.max_train_prompts]
    if not prompts:
        raise UsageError(f"No prompts in {source}: it is empty.")
    return prompts
