#!/usr/bin/env python
"""Four-step ADM distillation of SD3-Medium / SD3.5-Large (MMDiT, rectified flow), and DMD2 as the baseline.

    accelerate launch distill_scripts/train_adm_sd3.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3-medium-diffusers \
        --prompts_file prompts.txt --output_dir sd3-medium-adm --lora_rank 64 --max_train_steps 4000

The algorithm is ``dmdx.training.loop`` (shared with SDXL); SD3's specifics are ``dmdx.pipelines.teachers.sd3``.
The student ships as a stock ``StableDiffusion3Pipeline`` whose ``FlowMatchEulerDiscreteScheduler`` (the teacher's,
with ``--shift_terminal``) already encodes its schedule. In LoRA mode the generator and the fake score are named
adapters on the one frozen teacher. Recipes: distill_scripts/recipes/sd3_medium (LoRA, DDP) and
distill_scripts/recipes/sd35_large (full fine-tuning, FSDP2); README sections "SD3-Medium" and "SD3.5-Large".
"""

from dmdx.pipelines.teachers import SD3Teacher
from dmdx.training.cli import distillation_parser, finish_distillation_args
from dmdx.training.loop import distill
from dmdx.training.plumbing import exit_on_usage_error


def parse_args(input_args=None):
    parser = distillation_parser(__doc__.split("\n")[0])
    g = parser.add_argument_group("SD3")
    g.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens (the SD3 pipeline's default).")
    g.add_argument("--drop_t5", action="store_true",
                   help="Train and ship without the T5 encoder (text_encoder_3=None; its embeddings are zeros).")
    g.add_argument("--shift_terminal", type=float, default=0.25,
                   help="FlowMatchEulerDiscreteScheduler shift_terminal of the shipped scheduler (0 = stock). With "
                        "the stock shift 3.0 a 4-step schedule's last sigma is 0.009, a near no-op step.")
    # SD3-Medium recipe defaults (the paper's Table 2: four steps, LoRA; CFG 7 is the pipeline's)
    parser.set_defaults(output_dir="sd3-adm", num_student_steps=4, guidance_scale=7.0, lora_rank=64,
                        generator_lr=1e-5, discriminator_lr=2e-5, max_train_steps=4000)
    args = finish_distillation_args(parser, parser.parse_args(input_args))
    if args.max_sequence_length < 1:
        parser.error(f"--max_sequence_length must be >= 1, got {args.max_sequence_length}.")
    return args


def main(args):
    teacher = SD3Teacher(args.pretrained_model_name_or_path, resolution=args.resolution, revision=args.revision,
                         variant=args.variant, cache_dir=args.cache_dir, max_sequence_length=args.max_sequence_length,
                         drop_t5=args.drop_t5, shift_terminal=args.shift_terminal)
    distill(teacher, args, tracker_project="dmdx-adm-sd3")


if __name__ == "__main__":
    exit_on_usage_error(lambda: main(parse_args()))
