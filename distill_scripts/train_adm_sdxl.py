#!/usr/bin/env python
"""Adversarial Distribution Matching (ADM) for SDXL: the second stage of DMDX, and DMD2 as the baseline.

    accelerate launch distill_scripts/train_adm_sdxl.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --pretrained_generator_name_or_path sdxl-adp \
        --prompts_file prompts.txt --output_dir sdxl-dmdx

The algorithm is ``dmdx.training.loop`` (shared with SD3); SDXL's specifics are ``dmdx.pipelines.teachers.sdxl``.
The student's parametrisation and timesteps come from the scheduler it ships with: the generator folder's (an ADP
output ships a rectified-flow DPM-Solver: one step at t = 999) or, when the generator is the teacher itself, an
LCMScheduler on the teacher's betas with trailing timesteps ([999]; 4 steps [999, 749, 499, 249]). The output is a
stock ``StableDiffusionXLPipeline`` folder with that scheduler. Recipe: distill_scripts/recipes/sdxl/dmdx.sh and the
README section "SDXL one-step (DMDX)".
"""

from dmdx.pipelines.teachers import SDXLTeacher
from dmdx.training.cli import distillation_parser, finish_distillation_args
from dmdx.training.loop import distill
from dmdx.training.plumbing import exit_on_usage_error


def parse_args(input_args=None):
    parser = distillation_parser(__doc__.split("\n")[0])
    # SDXL recipe defaults (docs/method.md: one step, teacher CFG 8 as DMD2, generator lr 5e-7 after ADP)
    parser.set_defaults(output_dir="sdxl-dmdx", num_student_steps=1, guidance_scale=8.0, generator_lr=5e-7,
                        discriminator_lr=1e-5, fake_score_lora_rank=0)
    return finish_distillation_args(parser, parser.parse_args(input_args))


def main(args):
    teacher = SDXLTeacher(args.pretrained_model_name_or_path, resolution=args.resolution, revision=args.revision,
                          variant=args.variant, cache_dir=args.cache_dir)
    distill(teacher, args, tracker_project="dmdx-adm-sdxl")


if __name__ == "__main__":
    exit_on_usage_error(lambda: main(parse_args()))
