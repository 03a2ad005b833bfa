#!/usr/bin/env bash
# Eight-step ADM student of CogVideoX-5b, full fine-tuning (the paper: 8 steps, 8k iterations; full fine-tuning is
# our reading, docs/method.md#choices). See the README section "CogVideoX" for every value's source.
# Needs: prompts.txt (one prompt per line; the paper uses OpenVid-1M / Vript / Open-Sora-Plan captions), 8 x 80 GB GPUs
# (FSDP2). Planned peak 52.2 GiB per GPU (benchmarks/results/memory_plan.md, CogVideoX-5b, full / full, 8 x FSDP2,
# teacher replicated; 49 frames at 480x720, batch 1, gradient checkpointing, --gradient_checkpointing_frozen_passes,
# text encoders not loaded): a plan, not a measurement. Without the frozen-pass checkpointing the plan is 113.1 GiB
# (docs/memory.md).
# Run from anywhere; TEACHER / PROMPTS / OUTPUT_DIR / TEXT_CACHE / CONFIG override the defaults. Extra flags are appended
# ("$@") and later flags win (tests/test_cogvideox_script.py runs this file on tiny models exactly so).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CONFIG=${CONFIG:-$ROOT/distill_scripts/recipes/cogvideox_5b/accelerate_fsdp.yaml}
TEACHER=${TEACHER:-THUDM/CogVideoX-5b}
PROMPTS=${PROMPTS:-prompts.txt}
OUTPUT_DIR=${OUTPUT_DIR:-cogvideox-5b-adm-8step}
# Text embeddings: every prompt encoded once into this cache, then read memory-mapped; the text encoders are
# not loaded again while it holds the prompts (docs/gpus.md). Shared by reruns and the baseline below.
TEXT_CACHE=${TEXT_CACHE:-$OUTPUT_DIR-text-embeddings}

accelerate launch --config_file "$CONFIG" "$ROOT/distill_scripts/train_adm_cogvideox.py" \
  --pretrained_model_name_or_path "$TEACHER" --prompts_file "$PROMPTS" --output_dir "$OUTPUT_DIR" \
  --text_embeddings_cache "$TEXT_CACHE" \
  --num_frames 49 --height 480 --width 720 --max_sequence_length 226 \
  --train_batch_size 1 --gradient_accumulation_steps 8 \
  --num_student_steps 8 \
  --lora_rank 0 --fake_score_lora_rank 0 \
  --distribution_loss adm --guidance_scale 6.0 --ode_step_dt 0.015625 \
  --min_timestep_percent 0.02 --max_timestep_percent 0.98 --timestep_sampling uniform \
  --fake_score_update_ratio 1 --discriminator_update_ratio 1 --discriminator_warmup_steps 200 \
  --generator_lr 1e-6 --fake_score_lr 1e-6 --discriminator_lr 1e-5 --max_grad_norm 10 \
  --mixed_precision bf16 --gradient_checkpointing --allow_tf32 --max_train_steps 8000 \
  --gradient_checkpointing_frozen_passes \
  --checkpointing_steps 250 --checkpoints_total_limit 2 --resume_from_checkpoint latest \
  --validation_prompts "a panda playing a guitar in a bamboo forest" "waves breaking on a rocky shore at sunset" \
  --validation_steps 500 --report_to tensorboard "$@"

# Baseline on the same teacher and budget: DMD2's loss (fake score updated 5x per generator update):
#   bash distill_scripts/recipes/cogvideox_5b/train.sh --distribution_loss dmd --fake_score_update_ratio 5 \
#     --output_dir cogvideox-5b-dmd2-8step
