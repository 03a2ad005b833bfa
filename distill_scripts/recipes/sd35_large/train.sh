#!/usr/bin/env bash
# Four-step ADM student of SD3.5-Large, full fine-tuning (as in the paper's Table 2). See the README section "SD3.5-Large".
# Needs: prompts.txt, 8 x 80 GB GPUs (FSDP2).
# Run from anywhere; TEACHER / PROMPTS / OUTPUT_DIR / TEXT_CACHE / CONFIG override the defaults. Extra flags are appended
# ("$@") and later flags win (tests/test_sd3_script.py runs this file on tiny models exactly so).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CONFIG=${CONFIG:-$ROOT/distill_scripts/recipes/sd35_large/accelerate_fsdp.yaml}
TEACHER=${TEACHER:-stabilityai/stable-diffusion-3.5-large}
PROMPTS=${PROMPTS:-prompts.txt}
OUTPUT_DIR=${OUTPUT_DIR:-sd35-large-adm-4step}
# Text embeddings: every prompt encoded once into this cache, then read memory-mapped; the text encoders are
# not loaded again while it holds the prompts (docs/gpus.md). Reruns reuse it.
TEXT_CACHE=${TEXT_CACHE:-$OUTPUT_DIR-text-embeddings}

accelerate launch --config_file "$CONFIG" "$ROOT/distill_scripts/train_adm_sd3.py" \
  --pretrained_model_name_or_path "$TEACHER" --prompts_file "$PROMPTS" --output_dir "$OUTPUT_DIR" \
  --text_embeddings_cache "$TEXT_CACHE" \
  --resolution 1024 --train_batch_size 1 --gradient_accumulation_steps 8 --max_sequence_length 256 \
  --num_student_steps 4 --shift_terminal 0.25 \
  --lora_rank 0 --fake_score_lora_rank 0 \
  --distribution_loss adm --guidance_scale 3.5 --ode_step_dt 0.015625 \
  --min_timestep_percent 0.02 --max_timestep_percent 0.98 --timestep_sampling uniform \
  --fake_score_update_ratio 1 --discriminator_update_ratio 1 --discriminator_warmup_steps 200 \
  --generator_lr 1e-6 --fake_score_lr 1e-6 --discriminator_lr 1e-5 --max_grad_norm 10 \
  --mixed_precision bf16 --gradient_checkpointing --allow_tf32 --max_train_steps 3000 \
  --gradient_checkpointing_frozen_passes \
  --checkpointing_steps 250 --checkpoints_total_limit 2 --resume_from_checkpoint latest \
  --validation_prompts "a photo of a cat" "a lighthouse at dusk, oil painting" --validation_steps 250 \
  --report_to tensorboard "$@"
