#!/usr/bin/env bash
# Four-step ADM student of SD3-Medium, LoRA (as in the paper's Table 2). See the README section "SD3-Medium" for every value's source.
# Needs: prompts.txt (one prompt per line; the paper uses JourneyDB captions), 8 x 80 GB GPUs (DDP).
# Run from anywhere; TEACHER / PROMPTS / OUTPUT_DIR / TEXT_CACHE / CONFIG override the defaults. Extra flags are appended
# ("$@") and later flags win (tests/test_sd3_script.py runs this file on tiny models exactly so): e.g. `bash train.sh --max_train_steps 100`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CONFIG=${CONFIG:-$ROOT/distill_scripts/recipes/sd3_medium/accelerate_ddp.yaml}
TEACHER=${TEACHER:-stabilityai/stable-diffusion-3-medium-diffusers}
PROMPTS=${PROMPTS:-prompts.txt}
OUTPUT_DIR=${OUTPUT_DIR:-sd3-medium-adm-4step}
# Text embeddings: every prompt encoded once into this cache, then read memory-mapped; the text encoders are
# not loaded again while it holds the prompts (docs/gpus.md). Shared by reruns and the baseline below.
TEXT_CACHE=${TEXT_CACHE:-$OUTPUT_DIR-text-embeddings}

accelerate launch --config_file "$CONFIG" "$ROOT/distill_scripts/train_adm_sd3.py" \
  --pretrained_model_name_or_path "$TEACHER" --prompts_file "$PROMPTS" --output_dir "$OUTPUT_DIR" \
  --text_embeddings_cache "$TEXT_CACHE" \
  --resolution 1024 --train_batch_size 2 --gradient_accumulation_steps 4 --max_sequence_length 256 \
  --num_student_steps 4 --shift_terminal 0.25 \
  --lora_rank 64 --fake_score_lora_rank 64 \
  --distribution_loss adm --guidance_scale 7.0 --ode_step_dt 0.015625 \
  --min_timestep_percent 0.02 --max_timestep_percent 0.98 --timestep_sampling uniform \
  --fake_score_update_ratio 1 --discriminator_update_ratio 1 --discriminator_warmup_steps 200 \
  --generator_lr 2e-5 --fake_score_lr 2e-5 --discriminator_lr 2e-5 --max_grad_norm 10 \
  --mixed_precision bf16 --gradient_checkpointing --allow_tf32 --max_train_steps 4000 \
  --checkpointing_steps 500 --checkpoints_total_limit 3 --resume_from_checkpoint latest \
  --validation_prompts "a photo of a cat" "a lighthouse at dusk, oil painting" --validation_steps 500 \
  --report_to tensorboard "$@"

# Baseline on the same teacher and budget: DMD2's loss (fake score updated 5x per generator update):
#   bash distill_scripts/recipes/sd3_medium/train.sh --distribution_loss dmd --fake_score_update_ratio 5 \
#     --output_dir sd3-medium-dmd2-4step
