#!/usr/bin/env python
"""Eight-step ADM distillation of CogVideoX-2b / 5b (3-D transformer, v-prediction), and DMD2 as the baseline.

    accelerate launch --config_file distill_scripts/recipes/cogvideox_2b/accelerate_fsdp.yaml \
        distill_scripts/train_adm_cogvideox.py --pretrained_model_name_or_path THUDM/CogVideoX-2b \
        --prompts_file prompts.txt --output_dir cogvideox-2b-adm --gradient_checkpointing --mixed_precision bf16

The algorithm is ``dmdx.training.loop`` (shared with SDXL and SD3); CogVideoX's specifics (T5 conditioning, rotary
embeddings, frame-major video tokens as (C, F, h, w) maps for 3-D discriminator heads) are
``dmdx.pipelines.teachers.cogvideox``. The student ships as a stock ``CogVideoXPipeline`` whose
``CogVideoXDDIMScheduler`` (the teacher's, trailing timesteps: 999, 874, ..., 124) already encodes its schedule.
Recipes: distill_scripts/recipes/cogvideox_2b and cogvideox_5b; README section "CogVideoX".
"""

from dmdx.pipelines.teachers import CogVideoXTeacher
from dmdx.training.cli import check_video_size_args, distillation_parser, finish_distillation_args
from dmdx.training.loop import distill
from dmdx.training.plumbing import exit_on_usage_error


def parse_args(input_args=None):
    parser = distillation_parser(__doc__.split("\n")[0])
    g = parser.add_argument_group("CogVideoX")
    g.add_argument("--num_frames", type=int, default=None,
                   help="Pixel frames per video ((F - 1) divisible by the VAE's temporal compression); default: the "
                        "transformer's sample_frames (49 for CogVideoX-2b/5b).")
    g.add_argument("--height", type=int, default=None, help="Default: the pipeline's own (480 for CogVideoX).")
    g.add_argument("--width", type=int, default=None, help="Default: the pipeline's own (720 for CogVideoX).")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="T5 tokens; default: the transformer's max_text_seq_length (226).")
    # Recipe defaults (the paper: eight steps, 8k iterations; full FT, CFG 6: docs/method.md). --resolution
    # is a square shortcut for --height/--width.
    parser.set_defaults(output_dir="cogvideox-adm", resolution=None, num_student_steps=8, guidance_scale=6.0,
                        lora_rank=0, generator_lr=1e-6, discriminator_lr=1e-5, max_train_steps=8000)
    args = finish_distillation_args(parser, parser.parse_args(input_args))
    check_video_size_args(parser, args)
    return args


def main(args):
    teacher = CogVideoXTeacher(args.pretrained_model_name_or_path, resolution=args.resolution, revision=args.revision,
                               variant=args.variant, cache_dir=args.cache_dir, num_frames=args.num_frames,
                               height=args.height, width=args.width, max_sequence_length=args.max_sequence_length)
    for name, value in teacher.options.items():  # the resolved sizes go into training_config.json
        setattr(args, name, value)
    distill(teacher, args, tracker_project="dmdx-adm-cogvideox")


if __name__ == "__main__":
    exit_on_usage_error(lambda: main(parse_args()))
