#!/usr/bin/env bash
# Four-step ADM student of Wan 2.1 T2V 14B, full fine-tuning with FSDP2 over 8 x 141 GB GPUs (H200), 33 frames at
# 480x832 (the 14B's 480p use; flow shift 5.0 from its scheduler config). See docs/wan.md for every value's source and
# what is tested.
# Needs: prompts.txt and 8 GPUs of 141 GB (131 GiB; fits below 118 GiB with 10% headroom). Memory per GPU by the plan
# (benchmarks/results/memory_plan.md, docs/memory.md; not measured on GPUs): 105.6 GiB = 69.2 GiB resident (sharded
# fp32 weights and Adam states of both roles 39.9 GiB, the bf16 teacher replicated 26.6 GiB, FSDP gathers 2.4 GiB) +
# 6.7 GiB of gradients + 29.8 GiB of activations for one sample (9 latent frames, 14,040 video tokens), with
# --gradient_checkpointing_frozen_passes (set below; without it 212.0 GiB).
# Longer clips: --num_frames 49 is 118.4 GiB (tight), 81 frames at 480x832 144.0 GiB (over). The 14B's 720p use, 81
# frames at 720x1280 (75,600 tokens), is 231.8 GiB per GPU over 8 and still 190.9 GiB over 64 (156.0 GiB of
# activations per sample): it needs a sample's tokens split over GPUs (sequence parallelism), not in this toolkit.
# On 80 GB cards no size fits 8 GPUs (the resident part alone is 69.2 GiB); 64 x 80 GB at 49 frames: 77.4 GiB (tight).
# LoRA roles are DDP-only in this toolkit (FSDP shards per role); a LoRA run of the 14B is not a recipe here.
# Run from anywhere; TEACHER / PROMPTS / OUTPUT_DIR / TEXT_CACHE / CONFIG override the defaults. Extra flags are appended
# ("$@") and later flags win (tests/test_wan_script.py runs this file on tiny models exactly so).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CONFIG=${CONFIG:-$ROOT/distill_scripts/recipes/wan_14b/accelerate_fsdp.yaml}
TEACHER=${TEACHER:-Wan-AI/Wan2.1-T2V-14B-Diffusers}
PROMPTS=${PROMPTS:-prompts.txt}
OUTPUT_DIR=${OUTPUT_DIR:-wan2.1-14b-adm-4step}
# Text embeddings: every prompt encoded once into this cache, then read memory-mapped; UMT5 is not loaded again
# while it holds the prompts (docs/gpus.md).
TEXT_CACHE=${TEXT_CACHE:-$OUTPUT_DIR-text-embeddings}

accelerate launch --config_file "$CONFIG" "$ROOT/distill_scripts/train_adm_wan.py" \
  --pretrained_model_name_or_path "$TEACHER" --prompts_file "$PROMPTS" --output_dir "$OUTPUT_DIR" \
  --num_frames 33 --height 480 --width 832 --max_sequence_length 512 \
  --text_embeddings_cache "$TEXT_CACHE" \
  --train_batch_size 1 --gradient_accumulation_steps 4 \
  --num_student_steps 4 --shift_terminal 0.25 \
  --lora_rank 0 --fake_score_lora_rank 0 \
  --distribution_loss adm --guidance_scale 5.0 --ode_step_dt 0.015625 \
  --min_timestep_percent 0.02 --max_timestep_percent 0.98 --timestep_sampling uniform \
  --fake_score_update_ratio 1 --discriminator_update_ratio 1 --discriminator_warmup_steps 200 \
  --generator_lr 1e-6 --fake_score_lr 1e-6 --discriminator_lr 1e-5 --max_grad_norm 10 \
  --mixed_precision bf16 --gradient_checkpointing --gradient_checkpointing_frozen_passes --allow_tf32 --max_train_steps 8000 \
  --checkpointing_steps 250 --checkpoints_total_limit 2 --resume_from_checkpoint latest \
  --validation_prompts "a panda playing a guitar in a bamboo forest" "waves breaking on a rocky shore at sunset" \
  --validation_steps 500 --report_to tensorboard "$@"

# Baseline on the same teacher and budget: DMD2's loss (fake score updated 5x per generator update):
#   bash distill_scripts/recipes/wan_14b/train.sh --distribution_loss dmd --fake_score_update_ratio 5 \
#     --output_dir wan2.1-14b-dmd2-4step
