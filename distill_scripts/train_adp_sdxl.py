#!/usr/bin/env python
"""Adversarial Distillation Pre-training (ADP) of a one-step SDXL student: the first stage of DMDX.

    accelerate launch distill_scripts/train_adp_sdxl.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --ode_pairs_dir sdxl-ode-pairs --pixel_discriminator_model facebook/sam-vit-base \
        --output_dir sdxl-adp

The method (docs/method.md#adp) is ``dmdx.training.adp``; SDXL's specifics are ``dmdx.pipelines.teachers.sdxl``.
The output is a stock StableDiffusionXLPipeline folder whose scheduler is a rectified-flow DPMSolverMultistep
(order 1, trailing: one step = timestep 999): the ``--pretrained_generator_name_or_path`` of train_adm_sdxl.py.
"""

from dmdx.pipelines.teachers import SDXLTeacher
from dmdx.training.adp import adp_distill
from dmdx.training.cli import common_parser, finish_common_args
from dmdx.training.plumbing import exit_on_usage_error


def parse_args(input_args=None):
    parser = common_parser(__doc__.split("\n")[0])
    g = parser.add_argument_group("ADP")
    g.add_argument("--ode_pairs_dir", required=True, help="Output folder of collect_ode_pairs.py (pairs + prompts).")
    g.add_argument("--pixel_discriminator_model", required=True,
                   help="A SAM checkpoint (e.g. facebook/sam-vit-base) for the pixel discriminator, or `none`.")
    g.add_argument("--pixel_discriminator_layers", type=int, default=4, help="Evenly spaced SAM encoder layers.")
    g.add_argument("--latent_weight", type=float, default=0.85)
    g.add_argument("--pixel_weight", type=float, default=0.15)
    g.add_argument("--velocity_mse_weight", type=float, default=0.0)
    parser.set_defaults(generator_lr=1e-5, discriminator_lr=1e-5, output_dir="sdxl-adp")
    args = parser.parse_args(input_args)
    if args.prompts_file or args.dataset_name:
        parser.error("ADP takes its prompts from the ODE pairs (--ode_pairs_dir); drop --prompts_file / "
                     "--dataset_name.")
    finish_common_args(parser, args, needs_prompts=False)
    for name in ("latent_weight", "pixel_weight", "velocity_mse_weight"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.pixel_discriminator_layers < 1:
        parser.error("--pixel_discriminator_layers must be >= 1.")
    return args


def main(args):
    teacher = SDXLTeacher(args.pretrained_model_name_or_path, resolution=args.resolution, revision=args.revision,
                          variant=args.variant, cache_dir=args.cache_dir)
    adp_distill(teacher, args)


if __name__ == "__main__":
    exit_on_usage_error(lambda: main(parse_args()))
