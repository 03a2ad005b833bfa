#!/usr/bin/env python
"""Four-step ADM distillation of Wan 2.1 / 2.2 text-to-video (flow matching, UMT5), and DMD2 as the baseline.

    accelerate launch --config_file distill_scripts/recipes/wan_1_3b/accelerate_fsdp.yaml \
        distill_scripts/train_adm_wan.py --pretrained_model_name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers \
        --prompts_file prompts.txt --output_dir wan-1.3b-adm --text_embeddings_cache wan-1.3b-text-embeddings \
        --gradient_checkpointing --gradient_checkpointing_frozen_passes --mixed_precision bf16

The algorithm is ``dmdx.training.loop`` (shared with SDXL, SD3 and CogVideoX); Wan's specifics (UMT5 conditioning,
channels-first video latents, video tokens as (C, F, h, w) maps for 3-D discriminator heads, the two-expert refusal)
are ``dmdx.pipelines.teachers.wan``. The student ships as a stock ``WanPipeline`` whose
``FlowMatchEulerDiscreteScheduler`` (the teacher's flow shift, ``--shift_terminal``) already encodes its schedule.
Recipes: distill_scripts/recipes/wan_1_3b and wan_14b; docs/wan.md.
"""

from dmdx.pipelines.teachers import WanTeacher
from dmdx.training.cli import check_video_size_args, distillation_parser, finish_distillation_args
from dmdx.training.loop import distill
from dmdx.training.plumbing import exit_on_usage_error


def parse_args(input_args=None):
    parser = distillation_parser(__doc__.split("\n")[0])
    g = parser.add_argument_group("Wan")
    g.add_argument("--num_frames", type=int, default=None,
                   help="Pixel frames per video ((F - 1) divisible by the VAE's temporal compression, 4); default: "
                        "WanPipeline's 81.")
    g.add_argument("--height", type=int, default=None, help="Default: WanPipeline's own (480).")
    g.add_argument("--width", type=int, default=None, help="Default: WanPipeline's own (832).")
    g.add_argument("--max_sequence_length", type=int, default=None, help="UMT5 tokens; default: WanPipeline's 512.")
    g.add_argument("--shift_terminal", type=float, default=0.25,
                   help="FlowMatchEulerDiscreteScheduler shift_terminal of the shipped scheduler (0 = stock). With "
                        "Wan's shift 3.0 a 4-step schedule's last sigma is 0.009 without it, a near no-op step.")
    # Recipe defaults (4 steps as the Wan distillation work uses; WanPipeline's CFG 5; full fine-tuning; the paper's
    # video learning rates). --resolution is a square shortcut for --height/--width.
    parser.set_defaults(output_dir="wan-adm", resolution=None, num_student_steps=4, guidance_scale=5.0,
                        lora_rank=0, generator_lr=1e-6, discriminator_lr=1e-5, max_train_steps=8000)
    args = finish_distillation_args(parser, parser.parse_args(input_args))
    check_video_size_args(parser, args)
    return args


def main(args):
    teacher = WanTeacher(args.pretrained_model_name_or_path, resolution=args.resolution, revision=args.revision,
                         variant=args.variant, cache_dir=args.cache_dir, num_frames=args.num_frames,
                         height=args.height, width=args.width, max_sequence_length=args.max_sequence_length,
                         shift_terminal=args.shift_terminal)
    for name, value in teacher.options.items():  # the resolved sizes go into training_config.json
        setattr(args, name, value)
    distill(teacher, args, tracker_project="dmdx-adm-wan")


if __name__ == "__main__":
    exit_on_usage_error(lambda: main(parse_args()))
