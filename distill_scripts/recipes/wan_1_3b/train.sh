#!/usr/bin/env bash
# Four-step ADM student of Wan 2.1 T2V 1.3B, full fine-tuning with FSDP2 over 8 x 80 GB GPUs, 81 frames at 480x832
# (WanPipeline's defaults), the generator update's frozen passes checkpointed. See docs/wan.md for every value's source
# and what is tested.
# Needs: prompts.txt (one prompt per line, e.g. captions of a video data set) and 8 GPUs of 80 GB. Memory per GPU by
# the plan (benchmarks/results/memory_plan.md, docs/memory.md: the real config's parameter counts, activations
# extrapolated from a small Wan measured on the CPU; not measured on GPUs): 26.1 GiB = 7.0 GiB resident (sharded fp32
# weights and Adam states of both roles, the bf16 teacher replicated, FSDP gathers) + 0.7 GiB of gradients + 18.5 GiB
# of activations for one sample (32,760 video tokens). --gradient_checkpointing_frozen_passes is what makes it fit:
# without it D's backbone pass in the generator update (the frozen teacher through all 30 blocks, a gradient to its
# input) keeps 69.0 GiB per sample, 87.8 GiB per GPU in all.
# LoRA roles (--lora_rank, --fake_score_lora_rank) are refused under FSDP: CONFIG=.../wan_1_3b/accelerate_ddp.yaml
# (DDP; LoRA 64 / 64: 23.8 GiB per GPU). Full fine-tuning under DDP is 74.9 GiB: tight on 80 GB, not the default.
# The text-embedding cache (TEXT_CACHE) keeps UMT5-XXL (5.68 B parameters, 10.6 GiB in bf16) off the GPUs.
# Run from anywhere; TEACHER / PROMPTS / OUTPUT_DIR / TEXT_CACHE / CONFIG override the defaults. Extra flags are appended
# ("$@") and later flags win (tests/test_wan_script.py runs this file on tiny models exactly so).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CONFIG=${CONFIG:-$ROOT/distill_scripts/recipes/wan_1_3b/accelerate_fsdp.yaml}
TEACHER=${TEACHER:-Wan-AI/Wan2.1-T2V-1.3B-Diffusers}
PROMPTS=${PROMPTS:-prompts.txt}
OUTPUT_DIR=${OUTPUT_DIR:-wan2.1-1.3b-adm-4step}
# Text embeddings: every prompt encoded once into this cache, then read memory-mapped; UMT5 is not loaded again
# while it holds the prompts (docs/gpus.md).
TEXT_CACHE=${TEXT_CACHE:-$OUTPUT_DIR-text-embeddings}

accelerate launch --config_file "$CONFIG" "$ROOT/distill_scripts/train_adm_wan.py" \
  --pretrained_model_name_or_path "$TEACHER" --prompts_file "$PROMPTS" --output_dir "$OUTPUT_DIR" \
  --num_frames 81 --height 480 --width 832 --max_sequence_length 512 \
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
#   bash distill_scripts/recipes/wan_1_3b/train.sh --distribution_loss dmd --fake_score_update_ratio 5 \
#     --output_dir wan2.1-1.3b-dmd2-4step
