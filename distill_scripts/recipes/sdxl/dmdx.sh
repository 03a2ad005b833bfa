#!/usr/bin/env bash
# DMDX for one-step SDXL: ODE pairs -> ADP -> ADM. See the README section "SDXL one-step (DMDX)" for where every value comes from.
# Needs: prompts.txt (one prompt per line; the paper uses JourneyDB captions), 8 x 80 GB GPUs.
# Run from anywhere (outputs go to the current folder); TEACHER / PROMPTS / TEXT_CACHE / CONFIG override the defaults.
# The three stages share one text-embedding cache: the prompts are encoded once (stage 1), the later stages read them
# memory-mapped and load no text encoder unless a prompt is missing (their validation prompts; docs/gpus.md).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CONFIG=${CONFIG:-$ROOT/distill_scripts/recipes/sdxl/accelerate_ddp_bf16.yaml}
TEACHER=${TEACHER:-stabilityai/stable-diffusion-xl-base-1.0}
PROMPTS=${PROMPTS:-prompts.txt}
TEXT_CACHE=${TEXT_CACHE:-sdxl-text-embeddings}

# 1. Teacher ODE pairs (deterministic DDIM, 25 steps, CFG 7): 8 processes write their own shards; rerun to resume.
accelerate launch --config_file "$CONFIG" "$ROOT/distill_scripts/collect_ode_pairs.py" \
  --pretrained_model_name_or_path "$TEACHER" --variant fp16 --mixed_precision fp16 \
  --prompts_file "$PROMPTS" --text_embeddings_cache "$TEXT_CACHE" --num_pairs 10000 --shard_size 64 --batch_size 8 \
  --num_inference_steps 25 --guidance_scale 7.0 --resolution 1024 --output_dir sdxl-ode-pairs

# 2. ADP: one-step velocity generator vs latent (teacher + heads) and pixel (SAM + heads) hinge discriminators.
accelerate launch --config_file "$CONFIG" "$ROOT/distill_scripts/train_adp_sdxl.py" \
  --pretrained_model_name_or_path "$TEACHER" --variant fp16 --ode_pairs_dir sdxl-ode-pairs \
  --text_embeddings_cache "$TEXT_CACHE" \
  --pixel_discriminator_model facebook/sam-vit-base --latent_weight 0.85 --pixel_weight 0.15 \
  --resolution 1024 --gradient_checkpointing \
  --train_batch_size 1 --gradient_accumulation_steps 8 \
  --generator_lr 1e-5 --discriminator_lr 1e-5 --max_train_steps 5000 --use_8bit_adam \
  --checkpointing_steps 500 --checkpoints_total_limit 3 --resume_from_checkpoint latest \
  --validation_prompts "a photo of a cat" "a lighthouse at dusk, oil painting" --validation_steps 500 \
  --report_to tensorboard --output_dir sdxl-adp

# 3. ADM from the ADP student: teacher CFG 8 real score, online fake score, D = frozen teacher + heads.
accelerate launch --config_file "$CONFIG" "$ROOT/distill_scripts/train_adm_sdxl.py" \
  --pretrained_model_name_or_path "$TEACHER" --variant fp16 --pretrained_generator_name_or_path sdxl-adp \
  --prompts_file "$PROMPTS" --text_embeddings_cache "$TEXT_CACHE" \
  --resolution 1024 --train_batch_size 2 --gradient_accumulation_steps 4 \
  --gradient_checkpointing --use_8bit_adam --fake_score_lora_rank 64 \
  --gradient_checkpointing_frozen_passes \
  --distribution_loss adm --guidance_scale 8.0 --ode_step_dt 0.015625 \
  --min_timestep_percent 0.02 --max_timestep_percent 0.98 \
  --fake_score_update_ratio 1 --discriminator_update_ratio 1 --discriminator_warmup_steps 200 \
  --generator_lr 5e-7 --fake_score_lr 1e-5 --discriminator_lr 1e-5 --max_train_steps 5000 --use_ema \
  --checkpointing_steps 500 --checkpoints_total_limit 3 --resume_from_checkpoint latest \
  --validation_prompts "a photo of a cat" "a lighthouse at dusk, oil painting" --validation_steps 500 \
  --report_to tensorboard --output_dir sdxl-dmdx

# Baseline on the same teacher and budget: DMD2's loss (fake score updated 5x per generator update).
# accelerate launch --config_file "$CONFIG" "$ROOT/distill_scripts/train_adm_sdxl.py" ... --distribution_loss dmd --output_dir sdxl-dmd2
