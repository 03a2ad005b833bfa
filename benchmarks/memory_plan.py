"""The memory plan: what one ADM run of the real teachers holds per GPU, before a user rents the GPUs.

    python benchmarks/memory_plan.py                    # all seven teachers + the self-check (~1 h on 2 shared cores)
    python benchmarks/memory_plan.py --reuse benchmarks/results/memory_plan.json --skip_self_check  # measure only
                                                        # what that plan lacks (a new teacher, a new pass kind)
    python benchmarks/memory_plan.py --models sdxl sd3-medium --skip_self_check
    python benchmarks/memory_plan.py --self_check_only --tiny --out /tmp/plan   # what the test runs

What it computes, per teacher (SDXL, SD3-Medium, SD3.5-Large, CogVideoX-2b, CogVideoX-5b, Wan 2.1 T2V 1.3B and 14B),
per training mode (full fine-tuning of the generator and the fake score, LoRA adapters on the shared teacher, and the
recipe's own mix where it differs), at 1, 8 and 64 GPUs with DDP and with FSDP2 (FULL_SHARD of the trainable
models; the frozen teacher replicated, or sharded too), in bytes per GPU:

- frozen weights: the teacher in the mixed-precision dtype (bf16), one copy, as ``dmdx.training.loop.build_models``
  keeps it (real score = discriminator backbone = the LoRA roles' base); its buffers too (SD3's position table);
- trainable weights: fp32 master weights of each fully trained network (its buffers too), or its LoRA adapter;
- gradients: fp32, of the network being updated at the peak (``accumulated_update`` frees each network's gradients
  after its step, so one network's are alive at a time);
- AdamW states: two fp32 moments per trainable parameter (``torch.optim.AdamW``; ``--use_8bit_adam`` would hold 2
  bytes per parameter instead of 8);
- discriminator heads: weights + AdamW (12 bytes per parameter; their gradients count under gradients), the real
  ``DiscriminatorHeads`` built on the meta device from the feature shapes the teacher's blocks give at the recipe's
  size (found with the real ``BackboneFeatures`` on a meta-device forward);
- EMA: one fp32 copy of the generator when the recipe keeps one (``EMAModel`` is built from the unsharded generator,
  so under FSDP2 every GPU holds it whole);
- engine: DDP's gradient buckets (one more fp32 gradient-sized buffer per DDP-wrapped network, accelerate's default
  ``gradient_as_bucket_view=False``), or FSDP2's gathered units (bf16 all-gather of the largest wrapped block, current
  + prefetched, the root's own parameters, and one block's unsharded bf16 gradients before the reduce-scatter);
- text encoders: 0 in every recipe row (their conditioning is read from the text-embedding cache, memory-mapped on
  the host; ``TEXT_CACHE``); the bf16 encoders when loaded (each model's "text encoders loaded" variant);
- activations at the recipe's batch / resolution / frames (below).

Every parameter count comes from the real diffusers / transformers classes built from the published config values
written below, on the meta device (no weights, no download).

Activations (measured, then extrapolated). The peak of an ADM iteration is the generator update: the generator's
forward/backward (trainable), the fake score with a gradient through its input (parameters frozen), and the teacher
backbone up to the last discriminator block with a gradient through its input, plus the heads, all alive at once
for one micro-batch. For each architecture a SMALL configuration of the same class is built (the same blocks and
depth, the same head dim (64; Wan's 128), fewer heads / channels: one head for the transformers (Wan: its FFN
width scaled with it, ffn_dim / heads), channels / 5 for the UNet)
and one forward+backward of each pass kind is run on the CPU under bf16 autocast at two input sizes, each in a fresh
worker process, measuring the resident-set high-water mark (VmHWM reset through /proc/self/clear_refs, glibc
trimmed, MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the resident set). Pass kinds: ``train`` /
``train_gc`` (fp32 parameters under autocast, with / without gradient checkpointing), ``input`` / ``input_gc`` (bf16
frozen parameters, gradient to the input), ``d_backbone`` (bf16 frozen, gradient to the input, the forward cut after
the last discriminator block as ``BackboneFeatures`` cuts it), ``d_backbone_gc`` (the same with the blocks
checkpointed: ``--gradient_checkpointing_frozen_passes``, which also turns the fake score's pass into ``input_gc``).
The slope between the two sizes is the bytes per token
(image + text tokens of the joint transformers; latent pixels of the UNet; Wan: video + text tokens, though its
512 UMT5 tokens enter only the cross-attention, an over-count of under 2%); the constant part (gradients of the small
model, allocator, thread pools) cancels. The real size's activations = slope x (real width / small width) x real
tokens x micro-batch. The heads are measured the same way with the real feature channel counts at two small spatial
sizes (bytes per feature pixel). CUDA's autocast runs layer_norm and group_norm in fp32; CPU's does not, so the
measurement runs them in fp32 under autocast (``cuda_norm_policy``) to match the GPU.

Assumptions of that extrapolation: activations are linear in tokens (flash / memory-efficient attention, true of
CPU's flash SDPA and of CUDA's) and linear in width at a fixed head dim; text tokens cost what image tokens cost in
the joint blocks; a LoRA generator's checkpointed pass costs what a full one's does; the no-grad passes (teacher with
CFG, backward simulation) leave only transients of one block; the CUDA allocator's fragmentation and the CUDA
context (~0.5-1 GiB) are not counted: a row "fits" an 80 GiB GPU below 72 GiB (10% headroom), is "tight" up to 80.

ADP (SDXL's DMDX stage 2, ``adp_plan``): the SDXL VAE decoder's backward (fp32 weights under bf16 autocast) measured
at two latent sizes with its real config (bytes per latent pixel, x 128 x 128 at 1024 px), SAM ViT-B's pass with a
gradient to its 1024 px input measured at that size, the pixel heads per feature pixel; plus the generator, the
teacher as latent D and the latent heads from SDXL's measurement.

Self-check: a small SD3-architecture teacher (saved as a pipeline folder) runs ``build_models`` /
``build_discriminator`` / ``prepare_models`` / two ``train_iteration`` in bf16 on the CPU in a fresh process,
full generator and fake score with gradient checkpointing; its measured peak (VmHWM above the process's resident set
after the imports, default allocator) is compared with what this plan predicts for the same setup, its activations
extrapolated (4x in width, 4x in tokens) from a still smaller configuration measured as above with CPU autocast's own
policy. Writes memory_plan.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
FIT_GIB, GPU_GIB = 72.0, 80.0

# ---- published configurations (the denoisers' config.json values) ---------------------------------------------------
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters, as published)
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
SD3_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}
# stabilityai/stable-diffusion-3.5-large, transformer/config.json (38 x 64 = 2432 wide, QK RMS-norm, no dual attention)
SD35_LARGE = {**SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
              "qk_norm": "rms_norm"}
# THUDM/CogVideoX-2b and THUDM/CogVideoX-5b, transformer/config.json (also diffusers'
# scripts/convert_cogvideox_to_diffusers.py: 2B = 30 layers, 30 heads, sin-cos positions; 5B = 42, 48, RoPE)
COGVIDEOX = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64, "dropout": 0.0,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16, "max_text_seq_length": 226,
    "norm_elementwise_affine": True, "norm_eps": 1e-5, "out_channels": 16, "patch_size": 2, "sample_frames": 49,
    "sample_height": 60, "sample_width": 90, "spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4,
    "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096, "time_embed_dim": 512,
    "timestep_activation_fn": "silu",
}
COGVIDEOX_2B = {**COGVIDEOX, "num_attention_heads": 30, "num_layers": 30, "use_rotary_positional_embeddings": False}
COGVIDEOX_5B = {**COGVIDEOX, "num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json (rotary positions
# computed inside the model; the VAE compresses time by 4 and space by 8: vae/config.json scale_factor_temporal /
# scale_factor_spatial, what WanPipeline reads)
WAN_2_1 = {
    "patch_size": [1, 2, 2], "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
    "freq_dim": 256, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
WAN_1_3B = {**WAN_2_1, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
WAN_14B = {**WAN_2_1, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
WAN_TEMPORAL_RATIO = 4
# Text encoders (their config.json): CLIP ViT-L/14 text tower, OpenCLIP bigG text tower, T5 v1.1 XXL encoder
TEXT_ENCODERS = {
    "clip_l": ("CLIPTextModel", {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                                 "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                                 "projection_dim": 768}),
    "clip_l_proj": ("CLIPTextModelWithProjection", {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                                                    "num_hidden_layers": 12, "num_attention_heads": 12,
                                                    "max_position_embeddings": 77, "projection_dim": 768}),
    "clip_g": ("CLIPTextModelWithProjection", {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                                               "num_hidden_layers": 32, "num_attention_heads": 20,
                                               "max_position_embeddings": 77, "projection_dim": 1280}),
    "t5_xxl": ("T5EncoderModel", {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                                  "num_heads": 64, "feed_forward_proj": "gated-gelu"}),
    # google/umt5-xxl encoder (Wan's text_encoder/config.json): T5 v1.1 XXL's shape, a 256k vocabulary, and a
    # relative-position bias in every layer
    "umt5_xxl": ("UMT5EncoderModel", {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240,
                                      "num_layers": 24, "num_heads": 64, "feed_forward_proj": "gated-gelu",
                                      "relative_attention_num_buckets": 32, "tie_word_embeddings": False}),
}
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (83.7 M parameters); ADP decodes the generator's latents
# with it and back-propagates through the decoder (training/adp.py, to_sam_pixels)
SDXL_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 1024, "scaling_factor": 0.13025}
# facebook/sam-vit-base config.json, vision_config: ViT-B/16 at 1024 px, windowed attention (14) with four global
# layers; ADP's pixel discriminator reads --pixel_discriminator_layers 4 evenly spaced layers (2, 5, 8, 11)
SAM_VIT_B = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_dim": 3072,
             "image_size": 1024, "patch_size": 16, "window_size": 14, "global_attn_indexes": [2, 5, 8, 11],
             "output_channels": 256, "use_rel_pos": True, "num_pos_feats": 128}
SAM_LAYERS = [f"vision_encoder.layers.{i}" for i in (2, 5, 8, 11)]
ADP_RECIPE = {"batch": 1, "resolution": 1024, "adam_8bit": True, "gradient_checkpointing": True,
              "recipe": "recipes/sdxl/dmdx.sh stage 2: 1024 px, batch 1 x 8, full generator, gradient checkpointing "
                        "(the VAE decoder's too), 8-bit Adam, latent D = the bf16 teacher + heads, pixel D = SAM "
                        "ViT-B (bf16) + heads on 4 layers, VAE decoder in fp32 weights under bf16 autocast, text "
                        "encoders loaded, DDP x 8"}
# (name, micro-batch, VAE decoder checkpointed): the recipe first, then what it was before this plan counted ADP
ADP_SETUPS = (("recipe: batch 1 x 8, VAE decoder checkpointed", 1, True),
              ("batch 2 x 4, VAE decoder checkpointed", 2, True),
              ("batch 2 x 4, VAE decoder not checkpointed (the recipe before)", 2, False))
SD3_LORA = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out")  # = SD3Teacher.lora_target_modules
ATTN_LORA = ("to_k", "to_q", "to_v", "to_out.0")  # = SDXLTeacher's; diffusers' CogVideoX LoRA example's

# What each recipe trains on (README and distill_scripts/recipes). modes: (generator LoRA rank, fake-score LoRA rank),
# 0 = full fine-tuning; the first is the recipe's own.
MODELS = {
    "sdxl": {
        "title": "SDXL", "class": "UNet2DConditionModel", "config": SDXL_UNET, "family": "unet",
        "source": "stabilityai/stable-diffusion-xl-base-1.0 unet/config.json",
        "text_encoders": ["clip_l", "clip_g"], "units": ("BasicTransformerBlock", "ResnetBlock2D"),
        "lora_targets": ATTN_LORA, "resolution": (1024, 1024), "frames": None, "text_tokens": 77, "batch": 2,
        "gradient_checkpointing": True, "ema": True, "lora_rank": 64, "modes": [(0, 64), (0, 0), (64, 64)],
        "adam_8bit": True,  # the recipe's --use_8bit_adam (its own mode only; the other modes: torch AdamW)
        "recipe_engine": (8, "ddp"), "frozen_checkpointing": True,
        "recipe": "README 'SDXL one-step' stage 3: 1024 px, batch 2 x 4 accumulation, gradient checkpointing, EMA, "
                  "8-bit Adam, full generator (the ADP student), fake score LoRA 64",
        "small": {"block_out_channels": [64, 128, 256], "attention_head_dim": [1, 2, 4]}, "sizes": [32, 64],
    },
    "sd3-medium": {
        "title": "SD3-Medium", "class": "SD3Transformer2DModel", "config": SD3_MEDIUM, "family": "sd3",
        "source": "stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json",
        "text_encoders": ["clip_l_proj", "clip_g", "t5_xxl"], "units": ("JointTransformerBlock",),
        "lora_targets": SD3_LORA, "resolution": (1024, 1024), "frames": None, "text_tokens": 77 + 256, "batch": 2,
        "gradient_checkpointing": True, "ema": False, "lora_rank": 64, "modes": [(64, 64), (0, 0)],
        "recipe": "recipes/sd3_medium: 1024 px, batch 2 x 4, LoRA 64 / 64, gradient checkpointing, T5 256 tokens",
        "recipe_engine": (8, "ddp"), "frozen_checkpointing": False,
        "small": {"num_attention_heads": 1, "caption_projection_dim": 64}, "sizes": [32, 64],
    },
    "sd3.5-large": {
        "title": "SD3.5-Large", "class": "SD3Transformer2DModel", "config": SD35_LARGE, "family": "sd3",
        "source": "stabilityai/stable-diffusion-3.5-large transformer/config.json",
        "text_encoders": ["clip_l_proj", "clip_g", "t5_xxl"], "units": ("JointTransformerBlock",),
        "lora_targets": SD3_LORA, "resolution": (1024, 1024), "frames": None, "text_tokens": 77 + 256, "batch": 1,
        "gradient_checkpointing": True, "ema": False, "lora_rank": 64, "modes": [(0, 0), (64, 64)],
        "recipe": "recipes/sd35_large: 1024 px, batch 1 x 8, full / full, gradient checkpointing, FSDP2 x 8",
        "recipe_engine": (8, "fsdp2_teacher_replicated"), "frozen_checkpointing": True,
        "small": {"num_attention_heads": 1, "caption_projection_dim": 64}, "sizes": [32, 64],
    },
    "cogvideox-2b": {
        "title": "CogVideoX-2b", "class": "CogVideoXTransformer3DModel", "config": COGVIDEOX_2B, "family": "cog",
        "source": "THUDM/CogVideoX-2b transformer/config.json",
        "text_encoders": ["t5_xxl"], "units": ("CogVideoXBlock",), "lora_targets": ATTN_LORA,
        "resolution": (480, 720), "frames": 49, "text_tokens": 226, "batch": 1, "gradient_checkpointing": True,
        "ema": False, "lora_rank": 64, "modes": [(0, 0), (64, 64)],
        "recipe": "recipes/cogvideox_2b: 480x720, 49 frames, batch 1 x 8, full / full, gradient checkpointing, "
                  "FSDP2 x 8",
        "recipe_engine": (8, "fsdp2_teacher_replicated"), "frozen_checkpointing": True,
        "small": {"num_attention_heads": 1, "max_text_seq_length": 32}, "sizes": [16, 32],
    },
    "cogvideox-5b": {
        "title": "CogVideoX-5b", "class": "CogVideoXTransformer3DModel", "config": COGVIDEOX_5B, "family": "cog",
        "source": "THUDM/CogVideoX-5b transformer/config.json",
        "text_encoders": ["t5_xxl"], "units": ("CogVideoXBlock",), "lora_targets": ATTN_LORA,
        "resolution": (480, 720), "frames": 49, "text_tokens": 226, "batch": 1, "gradient_checkpointing": True,
        "ema": False, "lora_rank": 64, "modes": [(0, 0), (64, 64)],
        "recipe": "recipes/cogvideox_5b: 480x720, 49 frames, batch 1 x 8, full / full, gradient checkpointing, "
                  "FSDP2 x 8",
        "recipe_engine": (8, "fsdp2_teacher_replicated"), "frozen_checkpointing": True,
        "small": {"num_attention_heads": 1, "max_text_seq_length": 32}, "sizes": [16, 32],
    },
    # Wan: the small configuration keeps the real head dim (128) and the FFN's ratio to the width (ffn_dim / heads)
    "wan2.1-1.3b": {
        "title": "Wan 2.1 T2V 1.3B", "class": "WanTransformer3DModel", "config": WAN_1_3B, "family": "wan",
        "source": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json",
        "text_encoders": ["umt5_xxl"], "units": ("WanTransformerBlock",), "lora_targets": ATTN_LORA,
        "resolution": (480, 832), "frames": 81, "text_tokens": 512, "batch": 1, "gradient_checkpointing": True,
        "ema": False, "lora_rank": 64, "modes": [(0, 0), (64, 64)],
        "recipe": "recipes/wan_1_3b: 480x832, 81 frames, batch 1 x 4, full / full, gradient checkpointing and "
                  "frozen-pass checkpointing, UMT5 512 tokens, FSDP2 x 8",
        "recipe_engine": (8, "fsdp2_teacher_replicated"), "frozen_checkpointing": True,
        "small": {"num_attention_heads": 1, "ffn_dim": round(8960 / 12)}, "sizes": [16, 32],
        # the recipe's mode with its flags changed (appended flags, CONFIG=...): the DDP alternative
        # (accelerate_ddp.yaml, for LoRA roles, which FSDP refuses) with and without frozen-pass checkpointing
        "size_variants": [(81, 480, 832, 8, "ddp", True), (81, 480, 832, 8, "ddp", False)],
    },
    "wan2.1-14b": {
        "title": "Wan 2.1 T2V 14B", "class": "WanTransformer3DModel", "config": WAN_14B, "family": "wan",
        "source": "Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json",
        "text_encoders": ["umt5_xxl"], "units": ("WanTransformerBlock",), "lora_targets": ATTN_LORA,
        "resolution": (480, 832), "frames": 33, "text_tokens": 512, "batch": 1, "gradient_checkpointing": True,
        "ema": False, "lora_rank": 64, "modes": [(0, 0), (64, 64)],
        "recipe": "recipes/wan_14b: 480x832, 33 frames, batch 1 x 4, full / full, gradient checkpointing and "
                  "frozen-pass checkpointing, UMT5 512 tokens, FSDP2 x 8 on 141 GB cards (H200)",
        "recipe_engine": (8, "fsdp2_teacher_replicated"), "frozen_checkpointing": True,
        "card_gib": 141e9 / GiB,  # the recipe names 141 GB cards (H200); every other recipe 80 GB
        "small": {"num_attention_heads": 1, "ffn_dim": round(13824 / 40)}, "sizes": [16, 32],
        "size_variants": [(49, 480, 832, 8, "fsdp2_teacher_replicated", True),
                          (81, 480, 832, 8, "fsdp2_teacher_replicated", True),
                          (81, 720, 1280, 8, "fsdp2_teacher_replicated", True),
                          (81, 720, 1280, 64, "fsdp2_teacher_replicated", True),
                          (49, 480, 832, 64, "fsdp2_teacher_replicated", True)],
    },
}
# Every recipe reads its prompts' conditioning from the text-embedding cache (bf16, memory-mapped on the host): the
# text encoders are not loaded during training, so no GPU holds them
TEXT_CACHE = True
HEAD_CHANNELS, HEAD_DEPTH = 256, 3  # --discriminator_head_channels / --discriminator_head_depth defaults
BACKBONE_KINDS = ("train", "train_gc", "input", "input_gc", "d_backbone", "d_backbone_gc")
HEAD_KINDS = ("heads_input", "heads_train")
GPU_COUNTS = (1, 8, 64)
ENGINES = ("ddp", "fsdp2_teacher_replicated", "fsdp2_teacher_sharded")
ENGINE_NAMES = {"single": "1 GPU", "ddp": "DDP", "fsdp2_teacher_replicated": "FSDP2, teacher replicated",
                "fsdp2_teacher_sharded": "FSDP2, teacher sharded"}
# DMD2's published SDXL setup (github.com/tianweiy/DMD2, experiments/sdxl/README.md and the 4-step script; main/
# sdxl/create_sdxl_fsdp_configs.py; main/sd_guidance.py): 8 nodes x 8 GPUs, accelerate FSDP with sharding strategy 4
# (HYBRID_SHARD: sharded over the 8 GPUs of a node, replicated across nodes), batch 2 per GPU at 1024 px (128 in
# all), fp32 generator and fake UNet under bf16 autocast, real UNet in bf16, no gradient checkpointing flag,
# fake:generator updates 5:1, 19k iterations in 57 hours.
DMD2_SDXL = {"gpus": 64, "shard_group": 8, "batch": 2, "gradient_checkpointing": False,
             "source": "github.com/tianweiy/DMD2 experiments/sdxl (8 nodes x 8 GPUs, FSDP HYBRID_SHARD, batch 2 at "
                       "1024 px, 19k iterations in 57 h)"}


# ---- architecture facts from the meta device ------------------------------------------------------------------------
def build_denoiser(cls_name: str, config: dict, device="meta"):
    import diffusers

    with torch.device(device):
        return getattr(diffusers, cls_name)(**config)


def latent_geometry(spec: dict, resolution=None, frames=None) -> dict:
    """Latent size, patch grid and tokens of a generation at ``resolution`` (pixels; VAE factor 8) and ``frames``."""
    config, family = spec["config"], spec["family"]
    height, width = resolution or spec["resolution"]
    frames = frames if frames is not None else spec["frames"]
    lh, lw = height // 8, width // 8
    if family == "unet":
        return {"latent": (config["in_channels"], lh, lw), "tokens": lh * lw, "grid": (lh, lw), "frames": None}
    p = config["patch_size"]
    if family == "sd3":
        return {"latent": (config["in_channels"], lh, lw), "tokens": (lh // p) * (lw // p), "grid": (lh // p, lw // p),
                "frames": None}
    if family == "wan":  # (C, F, H, W), as WanPipeline.prepare_latents; 3-D patches (p_t, p_h, p_w)
        p_t, p_h, p_w = p
        lf = (frames - 1) // WAN_TEMPORAL_RATIO + 1
        return {"latent": (config["in_channels"], lf, lh, lw), "tokens": (lf // p_t) * (lh // p_h) * (lw // p_w),
                "grid": (lh // p_h, lw // p_w), "frames": lf // p_t}
    lf = (frames - 1) // config["temporal_compression_ratio"] + 1
    return {"latent": (lf, config["in_channels"], lh, lw), "tokens": lf * (lh // p) * (lw // p),
            "grid": (lh // p, lw // p), "frames": lf}


def default_discriminator_blocks(family: str, config: dict) -> list[str]:
    """As the teacher adapters choose them (SDXLTeacher / SD3Teacher.discriminator_blocks): every UNet down block and
    the mid block; four evenly spaced transformer blocks including the last (CogVideoX: the same rule, assumed)."""
    if family == "unet":
        return [f"down_blocks.{i}" for i in range(len(config["down_block_types"]))] + ["mid_block"]
    n = config["num_layers"]
    prefix = "blocks" if family == "wan" else "transformer_blocks"  # WanTeacher.discriminator_blocks
    return [f"{prefix}.{i}" for i in sorted({round(i * (n - 1) / 3) for i in range(4)})]


def feature_selector(family: str, geometry: dict):
    from dmdx.training import first_tensor, tokens_to_map

    gh, gw = geometry["grid"]
    if family == "unet":
        return first_tensor
    if family == "sd3":  # JointTransformerBlock returns (encoder_hidden_states, hidden_states)
        return lambda out: tokens_to_map(out[1], gh, gw)
    if family == "wan":  # WanTransformerBlock returns the video tokens (WanTeacher.feature_selector)
        return lambda out: tokens_to_map(first_tensor(out), gh, gw, frames=geometry["frames"])
    return lambda out: tokens_to_map(out[0], gh, gw, geometry["frames"])  # CogVideoXBlock: (hidden, encoder_hidden)


def denoiser_inputs(family: str, config: dict, batch: int, geometry: dict, text_tokens: int, dtype=torch.float32,
                    device="cpu") -> dict:
    """Keyword inputs of one denoiser call, as the teacher adapters / pipelines build them."""
    kw = {"device": device, "dtype": dtype}
    x = torch.randn((batch, *geometry["latent"]), **kw)
    t = torch.full((batch,), 500.0, **kw)
    if family == "unet":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        return {"sample": x, "timestep": t,
                "encoder_hidden_states": torch.randn((batch, 77, config["cross_attention_dim"]), **kw),
                "added_cond_kwargs": {"text_embeds": torch.randn((batch, pooled), **kw),
                                      "time_ids": torch.full((batch, 6), 64.0, **kw)}}
    if family == "sd3":
        return {"hidden_states": x, "timestep": t, "return_dict": False,
                "encoder_hidden_states": torch.randn((batch, text_tokens, config["joint_attention_dim"]), **kw),
                "pooled_projections": torch.randn((batch, config["pooled_projection_dim"]), **kw)}
    if family == "wan":  # as WanTeacher.predict: UMT5 embeddings, one timestep per sample (Wan 2.1)
        return {"hidden_states": x, "timestep": t, "return_dict": False,
                "encoder_hidden_states": torch.randn((batch, text_tokens, config["text_dim"]), **kw)}
    inputs = {"hidden_states": x, "timestep": t, "return_dict": False,
              "encoder_hidden_states": torch.randn((batch, text_tokens, config["text_embed_dim"]), **kw)}
    if config.get("use_rotary_positional_embeddings"):  # as CogVideoXPipeline._prepare_rotary_positional_embeddings
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        gh, gw = geometry["grid"]
        p = config["patch_size"]
        crops = get_resize_crop_region_for_grid((gh, gw), config["sample_width"] // p, config["sample_height"] // p)
        cos, sin = get_3d_rotary_pos_embed(embed_dim=config["attention_head_dim"], crops_coords=crops,
                                           grid_size=(gh, gw), temporal_size=geometry["frames"], device=device)
        inputs["image_rotary_emb"] = (cos.to(device), sin.to(device))
    return inputs


def primary_input(family: str) -> str:
    return "sample" if family == "unet" else "hidden_states"


def call_denoiser(model, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.sample if hasattr(out, "sample") else out[0]


def lora_parameters(cls_name: str, config: dict, targets, rank: int) -> int:
    """Parameters of one rank-``rank`` adapter added exactly as the loop adds it (``add_lora_adapter``)."""
    from dmdx.training.lora import add_lora_adapter

    model = build_denoiser(cls_name, config)
    with torch.device("meta"):
        add_lora_adapter(model, "plan", rank, rank, targets, seed=0)
    return sum(p.numel() for n, p in model.named_parameters() if ".plan." in n)


def architecture_facts(key: str, spec: dict | None = None, head_channels: int = HEAD_CHANNELS) -> dict:
    """Parameter counts (denoiser, buffers, largest FSDP unit, LoRA adapters, heads, text encoders) and the
    discriminator's feature shapes at the recipe's size, all from meta-device modules."""
    import transformers

    from dmdx.training import BackboneFeatures, DiscriminatorHeads

    spec = spec or MODELS[key]
    cls, config, family = spec["class"], spec["config"], spec["family"]
    model = build_denoiser(cls, config)
    params = sum(p.numel() for p in model.parameters())
    units = [m for m in model.modules() if type(m).__name__ in spec["units"]]
    unit_sizes = [sum(p.numel() for p in m.parameters()) for m in units]
    geometry = latent_geometry(spec)
    blocks = default_discriminator_blocks(family, config)
    features = BackboneFeatures(model, blocks, select=feature_selector(family, geometry))
    with torch.device("meta"), torch.no_grad():
        inputs = denoiser_inputs(family, config, 1, geometry, spec["text_tokens"], device="meta")
        inputs.pop("image_rotary_emb", None)  # shapes only: the rotary table changes no shape
        shapes = [tuple(f.shape[1:]) for f in features(lambda: call_denoiser(model, inputs))]
        heads = DiscriminatorHeads(shapes, hidden_channels=head_channels, num_downsamples=HEAD_DEPTH)
    text = {}
    for name in spec["text_encoders"]:
        model_cls, cfg = TEXT_ENCODERS[name]
        config_cls = (transformers.UMT5Config if name.startswith("umt5") else transformers.T5Config
                      if name.startswith("t5") else transformers.CLIPTextConfig)
        with torch.device("meta"):
            text[name] = sum(p.numel() for p in getattr(transformers, model_cls)(config_cls(**cfg)).parameters())
    rank = spec["lora_rank"]
    return {
        "denoiser_class": cls, "config_source": spec["source"], "parameters": params,
        "buffer_elements": sum(b.numel() for b in model.buffers()),
        "fsdp_unit_classes": list(spec["units"]), "fsdp_units": len(units), "largest_unit_parameters": max(unit_sizes),
        "root_parameters": params - sum(unit_sizes), "lora_rank": rank,
        "lora_parameters": lora_parameters(cls, config, spec["lora_targets"], rank) if rank else 0,
        "lora_targets": list(spec["lora_targets"]), "discriminator_blocks": blocks,
        "feature_shapes": [list(s) for s in shapes], "feature_elements": sum(math.prod(s) for s in shapes),
        "heads_parameters": sum(p.numel() for p in heads.parameters()), "head_channels": head_channels,
        "text_encoder_parameters": text,
        "geometry": {"latent": list(geometry["latent"]), "tokens": geometry["tokens"],
                     "text_tokens": spec["text_tokens"] if family != "unet" else 0},
        "width": model_width(family, config),
    }


def model_width(family: str, config: dict) -> int:
    if family == "unet":
        return config["block_out_channels"][0]
    return config["num_attention_heads"] * config["attention_head_dim"]


# ---- activation measurement (worker processes) ----------------------------------------------------------------------
def _trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":")), 0)


def reset_peak() -> int:
    """Collect, trim, reset VmHWM to the current resident set (Linux >= 4.0); returns that baseline."""
    gc.collect()
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_above(base: int) -> int:
    return _status("VmHWM") - base


@contextlib.contextmanager
def cuda_norm_policy(enabled: bool = True):
    """Run layer_norm / group_norm in fp32 under CPU autocast, as CUDA's autocast does (CPU's keeps them in bf16)."""
    F = torch.nn.functional
    layer_norm, group_norm = F.layer_norm, F.group_norm

    def up(t):
        return t.float() if isinstance(t, torch.Tensor) and torch.is_autocast_enabled("cpu") else t

    def ln(x, shape, weight=None, bias=None, eps=1e-5):
        return layer_norm(up(x), shape, up(weight), up(bias), eps)

    def gn(x, groups, weight=None, bias=None, eps=1e-5):
        return group_norm(up(x), groups, up(weight), up(bias), eps)

    if enabled:
        F.layer_norm, F.group_norm = ln, gn
    try:
        yield
    finally:
        F.layer_norm, F.group_norm = layer_norm, group_norm


def measure_pass(model, kind: str, family: str, geometry: dict, text_tokens: int, blocks=None) -> int:
    """Peak resident bytes of one forward+backward of ``kind`` at batch 1 (inputs made before the baseline)."""
    from dmdx.training import BackboneFeatures

    dtype = next(model.parameters()).dtype
    inputs = denoiser_inputs(family, model.config, 1, geometry, text_tokens, dtype=dtype)
    name = primary_input(family)
    inputs[name] = inputs[name].float().requires_grad_(not kind.startswith("train"))  # cast to the weights' dtype
    features = (BackboneFeatures(model, blocks, select=feature_selector(family, geometry))
                if kind.startswith("d_backbone") else None)
    for p in model.parameters():  # gradients exist before the baseline: the plan counts them itself
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    base = reset_peak()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run = lambda: call_denoiser(model, {**inputs, name: inputs[name].to(dtype)})  # noqa: E731
        if features is not None:
            loss = sum(f.float().mean() for f in features(run))
        else:
            loss = run().float().mean()
    loss.backward()
    del loss
    peak = peak_above(base)
    if features is not None:
        features.remove()
    model.zero_grad(set_to_none=True)
    return peak


def measure_heads(shape, kind: str, channels: int = HEAD_CHANNELS) -> int:
    from dmdx.training import DiscriminatorHeads

    heads = DiscriminatorHeads([shape], hidden_channels=channels, num_downsamples=HEAD_DEPTH)
    heads.requires_grad_(kind == "heads_train")
    for p in heads.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    feature = torch.randn((1, *shape), dtype=torch.bfloat16).requires_grad_(kind == "heads_input")
    base = reset_peak()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = heads([feature]).float().mean()
    loss.backward()
    del loss
    return peak_above(base)


def measure_worker(job: dict) -> dict:
    """Per-token slopes of each pass kind on the small configuration, per-pixel slopes of the heads."""
    torch.manual_seed(0)
    family, text_tokens, sizes = job["family"], job["text_tokens"], job["sizes"]
    spec = {"config": job["config"], "family": family, "resolution": None, "frames": job.get("frames")}
    geometries = [latent_geometry(spec, (8 * s, 8 * s)) for s in sizes]
    tokens = [g["tokens"] + (text_tokens if family != "unet" else 0) for g in geometries]
    trainable = build_denoiser(job["class"], job["config"], device="cpu").train()
    frozen = copy.deepcopy(trainable).to(torch.bfloat16).requires_grad_(False).eval()
    blocks = default_discriminator_blocks(family, job["config"])
    points, slopes = {}, {}
    with cuda_norm_policy(job["policy"] == "cuda"):
        for kind in job["kinds"]:
            model = trainable if kind.startswith("train") else frozen
            if kind.endswith("_gc"):
                model.enable_gradient_checkpointing()
            for geometry in geometries:  # warm-up at both sizes: per-shape kernel caches, thread pools
                measure_pass(model, kind, family, geometry, text_tokens, blocks)
            values = [measure_pass(model, kind, family, geometry, text_tokens, blocks) for geometry in geometries]
            if kind.endswith("_gc"):
                model.disable_gradient_checkpointing()
            points[kind] = list(zip(tokens, values))
            slopes[kind] = (values[1] - values[0]) / (tokens[1] - tokens[0])
        heads = {}
        for shape_pair in job.get("head_shapes", []):
            channels = shape_pair[0][0]
            pixels = [math.prod(s[1:]) for s in shape_pair]
            entry = {}
            for kind in HEAD_KINDS:
                channels_hidden = job.get("head_channels", HEAD_CHANNELS)
                for shape in shape_pair:  # warm-up
                    measure_heads(tuple(shape), kind, channels_hidden)
                values = [measure_heads(tuple(shape), kind, channels_hidden) for shape in shape_pair]
                entry[kind] = {"points": list(zip(pixels, values)),
                               "bytes_per_pixel": (values[1] - values[0]) / (pixels[1] - pixels[0])}
            heads[str(channels) + ("x3d" if len(shape_pair[0]) == 4 else "")] = entry
    return {"width": model_width(family, job["config"]), "points": points, "bytes_per_token": slopes,
            "heads": heads, "tokens_measured": tokens}


def measure_adp_worker(job: dict) -> dict:
    """ADP's own passes (training/adp.py) with a gradient to their input, frozen weights, bf16 autocast with CUDA's norm
    policy: the SDXL VAE decoder (fp32 weights) at two latent sizes (bytes per latent pixel: it is convolutional, its
    one attention runs through SDPA); SAM ViT-B (bf16) at its fixed 1024 px input, cut after its last hooked layer;
    the pixel heads on SAM's 768-channel features at two sizes (bytes per feature pixel)."""
    torch.manual_seed(0)
    parts = job.get("parts", ["vae_decode", "vae_decode_gc", "sam", "pixel_heads"])
    out = {}
    with cuda_norm_policy(True):
        for part in parts:
            if part.startswith("vae_decode"):
                out[part] = _measure_vae_decoder(job["vae_latents"], checkpointing=part.endswith("_gc"))
            elif part == "sam":
                out.update(_measure_sam())
            else:
                out["pixel_heads"] = _measure_pixel_heads(job["pixel_head_sizes"])
    return out


def _measure_vae_decoder(sizes: list[int], checkpointing: bool = False) -> dict:
    """``checkpointing``: the decoder's own gradient checkpointing (ADP sets it with --gradient_checkpointing)."""
    import diffusers

    vae = diffusers.AutoencoderKL(**SDXL_VAE).requires_grad_(False).eval()
    if checkpointing:
        vae.enable_gradient_checkpointing()

    def decode(size):
        z = torch.randn((1, 4, size, size)).requires_grad_(True)
        base = reset_peak()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = vae.decode(z).sample.float().mean()
        loss.backward()
        del loss
        return peak_above(base)

    for size in sizes:  # warm-up
        decode(size)
    values = [decode(size) for size in sizes]
    return {"points": list(zip([s * s for s in sizes], values)),
            "bytes_per_latent_pixel": (values[1] - values[0]) / (sizes[1] ** 2 - sizes[0] ** 2)}


def _measure_sam() -> dict:
    import transformers

    from dmdx.training import BackboneFeatures, first_tensor

    sam = transformers.SamVisionModel(transformers.SamVisionConfig(**SAM_VIT_B)).to(torch.bfloat16)
    sam.requires_grad_(False).eval()
    features = BackboneFeatures(sam, SAM_LAYERS, select=lambda o: first_tensor(o).permute(0, 3, 1, 2))
    size = SAM_VIT_B["image_size"]

    def run():
        x = torch.randn((1, 3, size, size)).requires_grad_(True)
        base = reset_peak()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(f.float().mean() for f in features(lambda: sam(pixel_values=x.to(torch.bfloat16))))
        loss.backward()
        del loss
        return peak_above(base)

    run()  # warm-up
    grid = size // SAM_VIT_B["patch_size"]
    return {"sam_input": {"bytes": run(), "parameters": sum(p.numel() for p in sam.parameters())},
            "sam_feature_shape": [SAM_VIT_B["hidden_size"], grid, grid]}


def _measure_pixel_heads(sizes: list[int]) -> dict:
    heads = {}
    for kind in HEAD_KINDS:
        shapes = [(SAM_VIT_B["hidden_size"], h, h) for h in sizes]
        for shape in shapes:  # warm-up
            measure_heads(shape, kind)
        values = [measure_heads(shape, kind) for shape in shapes]
        pixels = [h * h for h in sizes]
        heads[kind] = {"points": list(zip(pixels, values)),
                       "bytes_per_pixel": (values[1] - values[0]) / (pixels[1] - pixels[0])}
    return heads


def adp_plan(facts: dict, activations: dict, measured: dict) -> dict:
    """SDXL's ADP stage (recipes/sdxl/dmdx.sh stage 2) per GPU, 1 GPU and 8 x DDP: the same accounting as
    :func:`predict` with ADP's networks (training/adp.py): a frozen bf16 teacher (latent D's backbone), the fp32
    generator (its gradients, 8-bit AdamW, DDP buckets, autocast's bf16 copy), the VAE (fp32 weights), SAM ViT-B in
    bf16, latent + pixel heads; the generator update's activations: the checkpointed generator, the teacher to its
    last D block and the latent heads (gradient to the input), the VAE decoder's backward at 1024 px, SAM's pass at
    1024 px and the pixel heads (gradient to the input), per sample x batch."""
    import diffusers
    import transformers

    from dmdx.training import DiscriminatorHeads

    with torch.device("meta"):
        vae_params = sum(p.numel() for p in diffusers.AutoencoderKL(**SDXL_VAE).parameters())
        sam_params = sum(p.numel() for p in transformers.SamVisionModel(
            transformers.SamVisionConfig(**SAM_VIT_B)).parameters())
        shape = tuple(measured["sam_feature_shape"])
        pixel_heads = sum(p.numel() for p in DiscriminatorHeads([shape] * len(SAM_LAYERS),
                                                                 hidden_channels=HEAD_CHANNELS).parameters())
    P, H = facts["parameters"], facts["heads_parameters"] + pixel_heads
    latent_pixels = (ADP_RECIPE["resolution"] // 8) ** 2
    opt = 2 if ADP_RECIPE["adam_8bit"] else 8
    pixel_heads_train = len(SAM_LAYERS) * max(0.0, measured["pixel_heads"]["heads_train"]["bytes_per_pixel"]) * \
        shape[1] * shape[2]
    rows, per_sample_of = [], {}
    for name, b, vae_gc in ADP_SETUPS:
        vae = measured["vae_decode_gc" if vae_gc else "vae_decode"]
        per_sample = per_sample_of[name] = {
            "generator (train_gc)": activations["train_gc"],
            "latent D backbone (d_backbone)": activations["d_backbone"],
            "latent heads": activations["heads_input"],
            "VAE decoder backward": max(0.0, vae["bytes_per_latent_pixel"]) * latent_pixels,
            "SAM": measured["sam_input"]["bytes"],
            "pixel heads": len(SAM_LAYERS) * max(0.0, measured["pixel_heads"]["heads_input"]["bytes_per_pixel"])
            * shape[1] * shape[2],
        }
        for n, engine in ((1, "single"), (8, "ddp")):
            out = {"frozen_weights": 2 * (P + facts["buffer_elements"]) + 4 * vae_params + 2 * sam_params,
                   "trainable_weights": 4 * (P + facts["buffer_elements"]), "optimizer_states": opt * P,
                   "discriminator_heads": (4 + opt) * H, "ema": 0.0,
                   "engine_buffers": 4 * (P + H) if n > 1 else 0.0,
                   "text_encoders": 2 * sum(facts["text_encoder_parameters"].values())}
            phases = {"generator": (4 * P, 2 * P, b * sum(per_sample.values())),
                      "discriminator": (4 * H, 2 * (P + H), 2 * b * (activations["heads_train"] + pixel_heads_train))}
            phase = max(phases, key=lambda k: sum(phases[k]))
            out["gradients"], out["autocast_cache"], out["activations"] = phases[phase]
            out["optimizer_temporaries"] = 0.0  # bitsandbytes' 8-bit step works tensor by tensor
            out["total"] = sum(out.values())
            rows.append({"setup": name, "batch": b, "vae_checkpointing": vae_gc, "gpus": n, "engine": engine,
                         "peak_phase": phase, **out})
    per_sample = per_sample_of[ADP_SETUPS[0][0]]
    return {"recipe": ADP_RECIPE["recipe"], "vae_parameters": vae_params, "sam_parameters": sam_params,
            "pixel_heads_parameters": pixel_heads, "activations_per_sample": per_sample,
            "activations_per_sample_by_setup": per_sample_of, "rows": rows,
            "measurement": measured}


def small_job(key: str, facts: dict, policy: str = "cuda") -> dict:
    spec = MODELS[key]
    config = {**spec["config"], **spec["small"]}
    text = spec["small"].get("max_text_seq_length", 32) if spec["family"] != "unet" else 0
    head_shapes = []
    for shape in {tuple(s) for s in facts["feature_shapes"]}:
        c = shape[0]
        head_shapes.append([(c, 16, 16), (c, 32, 32)] if len(shape) == 3 else [(c, shape[1], 8, 8),
                                                                                (c, shape[1], 16, 16)])
    return {"class": spec["class"], "config": config, "family": spec["family"], "text_tokens": text,
            "sizes": spec["sizes"], "frames": 13 if spec["family"] in ("cog", "wan") else None, "policy": policy,
            "kinds": [k for k in BACKBONE_KINDS if k != "train" or key == "sdxl"],  # "train": DMD2's row (no GC)
            "head_shapes": sorted(head_shapes)}


def run_worker_process(kind: str, job: dict, threads: int) -> dict:
    """One measurement in a fresh process (its own allocator and resident set)."""
    with tempfile.TemporaryDirectory(prefix="memory_plan_") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w") as f:
            json.dump({**job, "worker": kind, "out": out_path, "threads": threads}, f)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONWARNINGS": "ignore"}
        if kind in ("measure", "adp"):
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", job_path], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out_path) as f:
            return json.load(f)


def activations_per_sample(facts: dict, measured: dict) -> dict:
    """Bytes per sample of each pass kind at the recipe's size: small-model slope x width ratio x tokens; heads: per
    feature-pixel slope (real channels) x pixels, summed over the heads."""
    ratio = facts["width"] / measured["width"]
    tokens = facts["geometry"]["tokens"] + facts["geometry"]["text_tokens"]
    out = {kind: max(0.0, slope) * ratio * tokens for kind, slope in measured["bytes_per_token"].items()}
    for kind in HEAD_KINDS:
        total = 0.0
        for shape in facts["feature_shapes"]:
            entry = measured["heads"][str(shape[0]) + ("x3d" if len(shape) == 4 else "")]
            total += max(0.0, entry[kind]["bytes_per_pixel"]) * math.prod(shape[1:])
        out[kind] = total
    return out


# ---- the plan -----------------------------------------------------------------------------------------------------
def setup_from(facts: dict, generator_rank: int, fake_rank: int, *, batch: int, gradient_checkpointing: bool,
               ema: bool, activations: dict | None, text_encoders: bool = True, frozen_bytes: int = 2,
               adam_8bit: bool = False, frozen_checkpointing: bool = False) -> dict:
    """One training configuration: everything :func:`predict` needs (parameter counts, activations per sample)."""
    lora = facts["lora_parameters"] if facts["lora_rank"] else 0
    if (generator_rank and generator_rank != facts["lora_rank"]) or (fake_rank and fake_rank != facts["lora_rank"]):
        raise ValueError("LoRA ranks must be the rank the facts were counted at")
    return {
        "parameters": facts["parameters"], "buffers": facts["buffer_elements"],
        "unit": facts["largest_unit_parameters"], "root": facts["root_parameters"],
        "generator_rank": generator_rank, "fake_rank": fake_rank,
        "generator_lora": lora if generator_rank else 0, "fake_lora": lora if fake_rank else 0,
        "heads": facts["heads_parameters"], "feature_elements": facts["feature_elements"],
        "text_encoders": sum(facts["text_encoder_parameters"].values()) if text_encoders else 0,
        "ema": bool(ema and generator_rank == 0), "batch": batch, "gradient_checkpointing": gradient_checkpointing,
        "frozen_bytes": frozen_bytes, "activations": activations, "frozen_checkpointing": frozen_checkpointing,
        "optimizer_bytes": 2 if adam_8bit else 8,  # bitsandbytes AdamW8bit: two 1-byte moments (block stats aside)
    }


def predict(s: dict, engine: str = "single", n: int = 1, foreach: bool = True) -> dict:
    """Bytes per GPU of one ADM run (``s`` from :func:`setup_from`) with ``engine`` over ``n`` GPUs.

    Resident all along: frozen / trainable weights, AdamW states, heads, EMA, DDP buckets or FSDP2 gathers, text
    encoders. On top, the largest of the iteration's phases, in its order (fake score, generator, discriminator):
    the updated network's gradients, its activations, the optimizer step's temporaries (``foreach``: torch's CUDA
    AdamW makes one fp32 temporary the size of the whole parameter group; the CPU path loops per tensor), and
    autocast's cache: inside the iteration's one ``accelerator.autocast()`` every fp32 weight that requires grad is
    cast to bf16 once and kept until the context exits (the fake score's from its update on, then the generator's,
    then the heads'). Under FSDP2 the bf16 mixed-precision policy gathers bf16 weights: nothing to cache."""
    fsdp = engine.startswith("fsdp2") and n > 1
    shard = n if fsdp else 1  # trainable models and heads (prepared: FSDP2 FULL_SHARD)
    teacher_shard = n if fsdp and engine == "fsdp2_teacher_sharded" else 1
    fb, P = s["frozen_bytes"], s["parameters"]
    full = [role for role in ("generator", "fake") if s[f"{role}_rank"] == 0]
    trainable = {role: (P if s[f"{role}_rank"] == 0 else s[f"{role}_lora"]) / shard for role in ("generator", "fake")}
    heads = s["heads"] / shard
    out = {
        "frozen_weights": (P / teacher_shard + s["buffers"]) * fb,
        "trainable_weights": 4 * sum(trainable.values()) + 4 * s["buffers"] * len(full),
        "optimizer_states": s["optimizer_bytes"] * sum(trainable.values()),
        "discriminator_heads": (4 + s["optimizer_bytes"]) * heads,
        "ema": 4 * P if s["ema"] else 0.0,
        "engine_buffers": 0.0,
        "text_encoders": s["text_encoders"] * fb,
    }
    if engine == "ddp" and n > 1:  # one gradient-sized fp32 bucket set per DDP-wrapped network
        out["engine_buffers"] = 4 * (sum(trainable.values()) + heads)
    elif fsdp:  # bf16 all-gather of the largest unit (current + prefetched) and the root, one unit's bf16 grads
        out["engine_buffers"] = (2 * s["unit"] + s["root"]) * 2 + 2 * s["unit"]
    cast = 0 if fsdp else 2  # bytes per trainable parameter in autocast's cache
    cache = {"fake": cast * trainable["fake"], "generator": cast * (trainable["fake"] + trainable["generator"]),
             "discriminator": cast * (trainable["fake"] + trainable["generator"] + heads)}
    foreach = foreach and s["optimizer_bytes"] == 8  # bitsandbytes' 8-bit step works tensor by tensor
    temp = {role: 4 * count if foreach else 0.0 for role, count in (*trainable.items(), ("heads", heads))}
    a, b = s["activations"], s["batch"]
    phases = {  # name: (gradients, autocast cache, activations, optimizer temporaries)
        "fake_score_step": (4 * trainable["fake"], cache["fake"], 0.0, temp["fake"]),
        "generator_step": (4 * trainable["generator"], cache["generator"], 0.0, temp["generator"]),
        "discriminator_step": (4 * heads, cache["discriminator"], 0.0, temp["heads"]),
    }
    if a is not None:
        gc_ = s["gradient_checkpointing"]
        # the fake score's pass inside the generator update: a full copy keeps its own gradient checkpointing; a LoRA
        # view with its adapter frozen does not checkpoint (LoraView.activate); D's backbone (the teacher) does not
        # either, unless --gradient_checkpointing_frozen_passes checkpoints both frozen passes
        frozen_gc = s.get("frozen_checkpointing", False)
        fake_kind = "input_gc" if (gc_ and s["fake_rank"] == 0) or frozen_gc else "input"
        d_kind = "d_backbone_gc" if frozen_gc else "d_backbone"
        train_kind = "train_gc" if gc_ else "train"
        phases.update({
            "fake_score": (4 * trainable["fake"], cache["fake"], b * a[train_kind], 0.0),
            "generator": (4 * trainable["generator"], cache["generator"],
                          b * (a[train_kind] + a[fake_kind] + a[d_kind] + a["heads_input"]), 0.0),
            "discriminator": (4 * heads, cache["discriminator"],
                              2 * b * (a["heads_train"] + s["feature_elements"] * fb), 0.0),
        })
    phase = max(phases, key=lambda k: sum(phases[k]))
    out["gradients"], out["autocast_cache"], out["activations"], out["optimizer_temporaries"] = phases[phase]
    out["total"] = sum(out.values())
    out["peak_phase"] = phase
    return out


def plan_rows(key: str, facts: dict, activations: dict) -> list[dict]:
    spec = MODELS[key]
    rows = []
    for generator_rank, fake_rank in spec["modes"]:
        s = setup_from(facts, generator_rank, fake_rank, batch=spec["batch"],
                       gradient_checkpointing=spec["gradient_checkpointing"], ema=spec["ema"], activations=activations,
                       adam_8bit=spec.get("adam_8bit", False) and (generator_rank, fake_rank) == spec["modes"][0],
                       text_encoders=not TEXT_CACHE, frozen_checkpointing=spec.get("frozen_checkpointing", False))
        for n in GPU_COUNTS:
            for engine in (("single",) if n == 1 else ENGINES):
                rows.append({"model": key, "mode": mode_name(generator_rank, fake_rank, s["optimizer_bytes"] == 2),
                         "gpus": n, "engine": engine,
                             "recipe_mode": (generator_rank, fake_rank) == spec["modes"][0],
                             **predict(s, engine, n)})
    return rows


def recipe_variants(key: str, facts: dict, activations: dict) -> dict:
    """The recipe's own mode and engine with the two savings switched off one at a time: what frozen-pass
    checkpointing and the text cache each save (GiB per GPU)."""
    spec = MODELS[key]
    (g, f), (n, engine) = spec["modes"][0], spec["recipe_engine"]
    common = dict(batch=spec["batch"], gradient_checkpointing=spec["gradient_checkpointing"], ema=spec["ema"],
                  activations=activations, adam_8bit=spec.get("adam_8bit", False))
    out = {}
    for name, frozen, cache in (("recipe", spec.get("frozen_checkpointing", False), TEXT_CACHE),
                                ("no frozen-pass checkpointing", False, TEXT_CACHE),
                                ("frozen-pass checkpointing", True, TEXT_CACHE),
                                ("text encoders loaded", spec.get("frozen_checkpointing", False), False)):
        row = predict(setup_from(facts, g, f, text_encoders=not cache, frozen_checkpointing=frozen, **common),
                      engine, n)
        out[name] = {"gpus": n, "engine": engine, "total": row["total"], "activations": row["activations"],
                     "text_encoders": row["text_encoders"], "card_gib": spec.get("card_gib", GPU_GIB)}
    return out


def size_variants(key: str, measured: dict) -> list[dict]:
    """The recipe's mode at other sizes / engines / frozen-pass settings (``size_variants`` of the spec: frames,
    height, width, GPUs, engine, --gradient_checkpointing_frozen_passes), from the same small-config measurement:
    what a user can change with appended flags (or CONFIG=) when the recipe as written does not fit."""
    spec = MODELS[key]
    (g, f) = spec["modes"][0]
    out = []
    for frames, height, width, n, engine, frozen in spec.get("size_variants", []):
        facts = architecture_facts(key, {**spec, "resolution": (height, width), "frames": frames})
        activations = activations_per_sample(facts, measured)
        setup = setup_from(facts, g, f, batch=spec["batch"], gradient_checkpointing=spec["gradient_checkpointing"],
                           ema=spec["ema"], activations=activations, text_encoders=not TEXT_CACHE,
                           frozen_checkpointing=frozen)
        row = predict(setup, engine, n)
        out.append({"frames": frames, "height": height, "width": width, "gpus": n, "engine": engine,
                    "frozen_checkpointing": frozen, "tokens": facts["geometry"]["tokens"], "total": row["total"],
                    "activations": row["activations"], "peak_phase": row["peak_phase"]})
    return out


def dmd2_row(facts: dict, activations: dict) -> dict:
    """DMD2's published SDXL setup in this plan's terms: full / full, batch 2, no gradient checkpointing, sharded over
    a node's 8 GPUs (HYBRID_SHARD = FULL_SHARD within the shard group), the teacher replicated on each GPU."""
    s = setup_from(facts, 0, 0, batch=DMD2_SDXL["batch"], gradient_checkpointing=DMD2_SDXL["gradient_checkpointing"],
                   ema=False, activations=activations)
    return {"model": "sdxl", "mode": "full / full (DMD2's setup)", "gpus": DMD2_SDXL["gpus"],
            "engine": "fsdp2_teacher_replicated", "shard_group": DMD2_SDXL["shard_group"],
            **predict(s, "fsdp2_teacher_replicated", DMD2_SDXL["shard_group"])}


def mode_name(generator_rank: int, fake_rank: int, adam_8bit: bool = False) -> str:
    kind = lambda r: "full" if r == 0 else f"LoRA {r}"  # noqa: E731
    return f"G {kind(generator_rank)} / fake {kind(fake_rank)}{', 8-bit Adam' if adam_8bit else ''}"


MARKS = {"fits": "✓", "tight": "~", "over": "✗"}


def verdict(total_bytes: float, card_gib: float = GPU_GIB) -> str:
    g = total_bytes / GiB  # the same 10% headroom on any card
    return "fits" if g <= FIT_GIB * card_gib / GPU_GIB else "tight" if g <= card_gib else "over"


def teacher_choice(key: str, facts: dict, rows: list[dict]) -> dict:
    """Replicated or sharded teacher under FSDP2: replicated costs no communication; sharded all-gathers the whole
    teacher (bf16) for each of its passes (with CFG, D in the generator update, D's own update: >= 3 per
    micro-batch). Replicate whenever it fits; shard only when that is what makes the run fit."""
    choice = {}
    for n in GPU_COUNTS[1:]:
        for mode in dict.fromkeys(r["mode"] for r in rows if r["model"] == key):  # in the rows' order
            rep, shd = (next(r for r in rows if r["model"] == key and r["mode"] == mode and r["gpus"] == n
                             and r["engine"] == e) for e in ENGINES[1:])
            gather = 3 * 2 * facts["parameters"] * (n - 1) / n
            best = "replicated" if verdict(rep["total"]) == "fits" or verdict(shd["total"]) != "fits" else "sharded"
            choice[f"{mode} x{n}"] = {"better": best, "saves_GiB": (rep["total"] - shd["total"]) / GiB,
                                      "extra_all_gather_GiB_per_microbatch": gather / GiB}
    return choice


# ---- self-check: the real loop on a small teacher, predicted vs measured ---------------------------------------------
SELF_CHECK = {  # an SD3-architecture teacher; the activation measurement uses 1 head (width 64) and smaller latents
    "default": {"num_layers": 6, "heads": 4, "latent": 64, "measure_latents": [16, 32], "batch": 2,
                "head_channels": 256, "head_sizes": [8, 16]},
    "tiny": {"num_layers": 2, "heads": 2, "latent": 16, "measure_latents": [8, 12], "batch": 2,
             "head_channels": 32, "head_sizes": [4, 8]},
}


def self_check_worker(job: dict) -> dict:
    """Build the teacher folder, then (baseline) the loop's models, D, optimizers and two ADM iterations; VmHWM."""
    import diffusers  # noqa: F401  (import costs outside the baseline)
    import peft  # noqa: F401
    from accelerate import Accelerator
    from diffusers import StableDiffusion3Pipeline

    from dmdx.pipelines.teachers import SD3Teacher
    from dmdx.pipelines.tiny_components import sd3_components
    from dmdx.training.loop import PromptSource, build_discriminator, build_models, prepare_models, train_iteration

    cfg, tmp = job["self_check"], job["tmp"]
    teacher_dir = os.path.join(tmp, "teacher")
    parts = sd3_components(sample_size=cfg["latent"], num_layers=cfg["num_layers"], patch_size=2,
                           attention_head_dim=64, num_attention_heads=cfg["heads"], with_t5=False)
    StableDiffusion3Pipeline(**{k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}
                             ).save_pretrained(teacher_dir)
    del parts
    args = script_args("train_adm_sd3", [
        "--pretrained_model_name_or_path", teacher_dir, "--prompts_file", write_prompts(tmp), "--output_dir",
        os.path.join(tmp, "out"), "--resolution", str(2 * cfg["latent"]), "--train_batch_size", str(cfg["batch"]),
        "--mixed_precision", "bf16", "--gradient_checkpointing", "--lora_rank", "0", "--fake_score_lora_rank", "0",
        "--discriminator_head_channels", str(cfg["head_channels"]), "--discriminator_warmup_steps", "0",
        "--diagnostics_steps", "0", "--precompute_text_embeddings", "--drop_t5", "--max_sequence_length", "32"])
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    base = reset_peak()
    adapter = SD3Teacher(teacher_dir, resolution=args.resolution, max_sequence_length=args.max_sequence_length,
                         drop_t5=True, shift_terminal=args.shift_terminal)
    models = build_models(adapter, args, accelerator, None)
    adapter.load_text_encoders(accelerator.device, models.weight_dtype, denoiser=models.teacher_base)
    source = PromptSource(adapter, ["a red circle", "a blue square", "a green cat", "two dots"], accelerator.device,
                          True)
    adapter.free_text_encoders()
    build_discriminator(adapter, args, models, source.negative, accelerator.device)
    prepare_models(args, accelerator, models)
    seconds = []
    for step in range(2):  # the second iteration runs with every AdamW state allocated
        start = time.perf_counter()
        train_iteration(models, adapter, args, accelerator, source, step)
        seconds.append(time.perf_counter() - start)
    peak = peak_above(base)
    denoiser_params = sum(p.numel() for p in models.teacher_base.parameters())
    return {"peak_bytes": peak, "iteration_seconds": seconds, "text_tokens": source.embeds["prompt_embeds"].shape[1],
            "transformer_config": dict(models.teacher_base.config), "denoiser_parameters": denoiser_params,
            "heads_parameters": sum(p.numel() for p in models.discriminator_heads.parameters()),
            "feature_shapes": [list(f) for f in feature_shapes_of(models, adapter, source)]}


def feature_shapes_of(models, adapter, source):
    x = torch.zeros((1, *models.latent_shape))
    t = torch.full((1,), models.teacher_schedule.T / 2)
    with torch.no_grad():
        return [tuple(f.shape[1:]) for f in models.features(lambda: adapter.predict(models.teacher, x, t,
                                                                                    source.negative))]


def script_args(script: str, argv: list[str]):
    """The entry script's own parse_args (its recipe defaults), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(script, os.path.join(ROOT, "distill_scripts", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(argv)


def write_prompts(tmp: str) -> str:
    path = os.path.join(tmp, "prompts.txt")
    with open(path, "w") as f:
        f.write("a red circle\na blue square\na green cat\ntwo dots\n")
    return path


def self_check(size: str, threads: int) -> dict:
    cfg = SELF_CHECK[size]
    with tempfile.TemporaryDirectory(prefix="memory_plan_self_check_") as tmp:
        run = run_worker_process("self_check", {"self_check": cfg, "tmp": tmp}, threads)
    config = {k: v for k, v in run["transformer_config"].items() if not k.startswith("_")}
    text = run["text_tokens"]
    spec = {"class": "SD3Transformer2DModel", "config": config, "family": "sd3", "text_encoders": [],
            "source": "dmdx.pipelines.tiny_components.sd3_components (the self-check's teacher)",
            "units": ("JointTransformerBlock",), "lora_targets": SD3_LORA, "lora_rank": 0, "frames": None,
            "resolution": (8 * cfg["latent"], 8 * cfg["latent"]), "text_tokens": text}  # latent_geometry: factor 8
    facts = architecture_facts("self-check", spec, head_channels=cfg["head_channels"])
    measure_config = {**config, "num_attention_heads": 1, "caption_projection_dim": 64}
    job = {"class": spec["class"], "config": measure_config, "family": "sd3", "text_tokens": text,
           "sizes": cfg["measure_latents"], "frames": None, "policy": "cpu", "kinds": list(BACKBONE_KINDS[1:]),
           "head_channels": cfg["head_channels"],
           "head_shapes": [[(c, h, h) for h in cfg["head_sizes"]] for c in {s[0] for s in facts["feature_shapes"]}]}
    measured = run_worker_process("measure", job, threads)
    activations = activations_per_sample(facts, measured)
    s = setup_from(facts, 0, 0, batch=cfg["batch"], gradient_checkpointing=True, ema=False, activations=activations,
                   text_encoders=False)
    predicted = predict(s, foreach=False)  # torch's AdamW on the CPU loops per tensor (no foreach kernels)
    return {"size": size, "config": cfg, "measured_peak_bytes": run["peak_bytes"], "predicted": predicted,
            "measured_over_predicted": run["peak_bytes"] / predicted["total"],
            "parameters_meta_vs_run": [facts["parameters"], run["denoiser_parameters"]],
            "heads_parameters_meta_vs_run": [facts["heads_parameters"], run["heads_parameters"]],
            "feature_shapes_meta_vs_run": [facts["feature_shapes"], run["feature_shapes"]],
            "iteration_seconds": run["iteration_seconds"], "facts": facts, "activation_measurement": measured,
            "activations": activations}


# ---- output --------------------------------------------------------------------------------------------------------
def gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def markdown(result: dict) -> str:
    lines = ["# Memory plan (per GPU, GiB; ADM iteration; `benchmarks/memory_plan.py`)", "",
             "Parameter counts from the published configs on the meta device; activations extrapolated from peak "
             "memory measured on small configurations of the same classes (method and assumptions: the script's "
             "docstring). Fits = below 72 GiB (10% headroom on 80 GiB), tight = up to 80 GiB. Every row reads the "
             "prompts' conditioning from the text-embedding cache (text encoders not loaded) and uses its recipe's "
             "--gradient_checkpointing_frozen_passes setting (SDXL stage 3, SD3.5-Large, CogVideoX, Wan: on; "
             "SD3-Medium: off). Every recipe names 80 GB cards except Wan 14B's (141 GB, H200: 131 GiB; fits below "
             "118 GiB, tight up to 131), which its \"Recipe\" line judges; every other verdict is for 80 GiB.", ""]
    sc = result.get("self_check")
    if sc:
        lines += [f"**Self-check** ({sc['size']}): a small SD3-architecture teacher through the real loop on the CPU, "
                  f"full generator and fake score, bf16, gradient checkpointing, batch {sc['config']['batch']}: "
                  f"measured peak {sc['measured_peak_bytes'] / 2**20:.0f} MiB vs predicted "
                  f"{sc['predicted']['total'] / 2**20:.0f} MiB: **measured / predicted = "
                  f"{sc['measured_over_predicted']:.2f}**.", ""]
    for key, model in result["models"].items():
        f = model["facts"]
        spec = MODELS[key]
        lines += [f"## {spec['title']}", "",
                  f"{f['denoiser_class']} ({f['config_source']}): {f['parameters'] / 1e9:.3f} B parameters, "
                  f"largest FSDP unit {f['largest_unit_parameters'] / 1e6:.0f} M ({'/'.join(f['fsdp_unit_classes'])}"
                  f"), LoRA {f['lora_rank']} adapter {f['lora_parameters'] / 1e6:.1f} M, D heads "
                  f"{f['heads_parameters'] / 1e6:.1f} M on {', '.join(f['discriminator_blocks'])}, text encoders "
                  f"{sum(f['text_encoder_parameters'].values()) / 1e9:.2f} B. Recipe: {spec['recipe']}. Tokens per "
                  f"sample: {f['geometry']['tokens']} + {f['geometry']['text_tokens']} text.", "",
                  "Activations per sample (GiB): " + ", ".join(f"{k} {v / GiB:.2f}"
                                                               for k, v in model["activations"].items()), "",
                  "| mode | GPUs | engine | frozen | trainable | grads | AdamW | heads | EMA | DDP/FSDP buffers | "
                  "text enc. | autocast cache | activations | optim. temp. | **total** | 80 GiB | peak in |",
                  "|" + "---|" * 17]
        for r in model["rows"]:
            lines.append(f"| {r['mode']}{' (recipe)' if r['recipe_mode'] else ''} | {r['gpus']} | "
                         f"{ENGINE_NAMES[r['engine']]} | {gib(r['frozen_weights'])} | {gib(r['trainable_weights'])} | "
                         f"{gib(r['gradients'])} | {gib(r['optimizer_states'])} | {gib(r['discriminator_heads'])} | "
                         f"{gib(r['ema'])} | {gib(r['engine_buffers'])} | {gib(r['text_encoders'])} | "
                         f"{gib(r['autocast_cache'])} | {gib(r['activations'])} | {gib(r['optimizer_temporaries'])} | "
                         f"**{gib(r['total'])}** | {verdict(r['total'])} | {r['peak_phase']} |")
        variants = model.get("recipe_variants")
        if variants:
            v = variants["recipe"]
            card = v.get("card_gib", GPU_GIB)
            lines += ["", f"Recipe ({v['gpus']} x {ENGINE_NAMES[v['engine']]}): **{gib(v['total'])} GiB** per GPU "
                      f"({verdict(v['total'], card)} on {card:.0f} GiB cards); with "
                      f"--gradient_checkpointing_frozen_passes "
                      f"{gib(variants['frozen-pass checkpointing']['total'])}, without "
                      f"{gib(variants['no frozen-pass checkpointing']['total'])}; with the text encoders loaded "
                      f"instead of the cache {gib(variants['text encoders loaded']['total'])}."]
        if model.get("size_variants"):
            lines += ["", "The recipe's mode with its flags changed (per GPU): " + "; ".join(
                f"{v['frames']} frames at {v['height']}x{v['width']} ({v['tokens']} video tokens), {v['gpus']} x "
                f"{ENGINE_NAMES[v['engine']]}, frozen-pass checkpointing {'on' if v['frozen_checkpointing'] else 'off'}"
                f": **{gib(v['total'])} GiB** ({verdict(v['total'])}; activations {gib(v['activations'])})"
                for v in model["size_variants"]) + "."]
        lines += ["", "Teacher under FSDP2: " + "; ".join(
            f"{k}: {v['better']} (sharding saves {v['saves_GiB']:.1f} GiB, costs "
            f"{v['extra_all_gather_GiB_per_microbatch']:.0f} GiB all-gathered per micro-batch)"
            for k, v in model["teacher_choice"].items()), ""]
    if "adp" in result:
        adp = result["adp"]
        lines += ["## SDXL ADP (DMDX stage 2)", "", f"Recipe: {adp['recipe']}. VAE {adp['vae_parameters'] / 1e6:.1f} M "
                  f"parameters, SAM ViT-B {adp['sam_parameters'] / 1e6:.1f} M, pixel heads "
                  f"{adp['pixel_heads_parameters'] / 1e6:.1f} M. Generator-update activations per sample (GiB): "
                  + ", ".join(f"{k} {v / GiB:.2f}" for k, v in adp["activations_per_sample"].items())
                  + " (SAM measured at its 1024 px input on the CPU, whose SDPA materialises the global layers' "
                    "attention: an upper bound for CUDA's kernels).", "",
                  "| setup | GPUs | engine | frozen (teacher, VAE, SAM) | trainable | grads | AdamW | heads | DDP "
                  "buffers | text enc. | autocast cache | activations | **total** | 80 GiB | peak in |",
                  "|" + "---|" * 15]
        for r in adp["rows"]:
            lines.append(f"| {r['setup']} | {r['gpus']} | {ENGINE_NAMES[r['engine']]} | {gib(r['frozen_weights'])} | "
                         f"{gib(r['trainable_weights'])} | {gib(r['gradients'])} | {gib(r['optimizer_states'])} | "
                         f"{gib(r['discriminator_heads'])} | {gib(r['engine_buffers'])} | {gib(r['text_encoders'])} | "
                         f"{gib(r['autocast_cache'])} | {gib(r['activations'])} | **{gib(r['total'])}** | "
                         f"{verdict(r['total'])} | {r['peak_phase']} |")
        lines.append("")
    if "dmd2" in result:
        r = result["dmd2"]
        lines += ["## DMD2's published SDXL setup in this plan", "", DMD2_SDXL["source"] + ".", "",
                  "This loop's ADM iteration at that setup (DMD2's own iteration differs: its distribution-matching "
                  "passes run without gradients, its GAN classifier runs the fake UNet's encoder with one). "
                  f"Full generator + full fake score, batch 2 at 1024 px, no gradient checkpointing, sharded over 8: "
                  f"frozen {gib(r['frozen_weights'])}, trainable {gib(r['trainable_weights'])}, grads "
                  f"{gib(r['gradients'])}, AdamW {gib(r['optimizer_states'])}, activations {gib(r['activations'])}, "
                  f"text {gib(r['text_encoders'])}, FSDP buffers {gib(r['engine_buffers'])}: **{gib(r['total'])} GiB "
                  f"per GPU** ({verdict(r['total'])}).", ""]
    return "\n".join(lines) + "\n"


def summary_table(result: dict) -> str:
    """docs/results.md's 'what fits where' table: the recipe-size total per GPU for each mode and setup."""
    lines = ["| teacher | mode | per GPU: 1 GPU | 8 x DDP | 8 x FSDP2 (teacher replicated) | 8 x FSDP2 (teacher "
             "sharded) | 64 x FSDP2 (teacher sharded) |", "|---|---|---|---|---|---|---|"]
    for key, model in result["models"].items():
        for mode in dict.fromkeys(r["mode"] for r in model["rows"]):
            rows = {(r["gpus"], r["engine"]): r for r in model["rows"] if r["mode"] == mode}
            recipe = rows[(1, "single")]["recipe_mode"]
            cells = [rows[(1, "single")], rows[(8, "ddp")], rows[(8, "fsdp2_teacher_replicated")],
                     rows[(8, "fsdp2_teacher_sharded")], rows[(64, "fsdp2_teacher_sharded")]]
            lines.append(f"| {MODELS[key]['title']} | {mode}{' (recipe)' if recipe else ''} | " + " | ".join(
                f"{gib(r['total'])} {MARKS[verdict(r['total'])]}" for r in cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--skip_self_check", action="store_true")
    p.add_argument("--self_check_only", action="store_true")
    p.add_argument("--tiny", action="store_true", help="The self-check on a tiny teacher (what the test runs).")
    p.add_argument("--reuse", default=None, help="A memory_plan.json whose activation measurements to reuse (and, "
                   "with --skip_self_check, its self-check).")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the worker processes.")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        with open(args.worker) as f:
            job = json.load(f)
        torch.set_num_threads(job.get("threads") or 1)
        workers = {"measure": measure_worker, "adp": measure_adp_worker, "self_check": self_check_worker}
        result = workers[job["worker"]](job)
        with open(job["out"], "w") as f:
            json.dump(result, f)
        return None
    reused, reused_self_check, previous_adp = {}, None, None
    if args.reuse:
        with open(args.reuse) as f:
            previous = json.load(f)
        reused = {k: v["activation_measurement"] for k, v in previous.get("models", {}).items()}
        reused_self_check = previous.get("self_check")
        previous_adp = previous.get("adp", {}).get("measurement")
    result = {"command": "python benchmarks/memory_plan.py " + " ".join(sys.argv[1:]), "gib": GiB,
              "fit_gib": FIT_GIB, "gpu_gib": GPU_GIB, "method": __doc__, "models": {}}
    for key in [] if args.self_check_only else args.models:
        start = time.perf_counter()
        facts = architecture_facts(key)
        job = small_job(key, facts)
        measured = reused.get(key)
        missing = [k for k in job["kinds"] if k not in (measured or {}).get("bytes_per_token", {})]
        if measured is None:
            measured = run_worker_process("measure", job, args.threads)
        elif missing:  # measure only the pass kinds the reused plan lacks (same small config, same sizes)
            extra = run_worker_process("measure", {**job, "kinds": missing, "head_shapes": []}, args.threads)
            assert extra["tokens_measured"] == measured["tokens_measured"], (extra, measured)
            measured = {**measured, "points": {**measured["points"], **extra["points"]},
                        "bytes_per_token": {**measured["bytes_per_token"], **extra["bytes_per_token"]}}
        activations = activations_per_sample(facts, measured)
        rows = plan_rows(key, facts, activations)
        result["models"][key] = {"facts": facts, "activation_measurement": measured, "activations": activations,
                                 "rows": rows, "teacher_choice": teacher_choice(key, facts, rows),
                                 "recipe_variants": recipe_variants(key, facts, activations)}
        if MODELS[key].get("size_variants"):
            result["models"][key]["size_variants"] = size_variants(key, measured)
        if key == "sdxl":
            result["dmd2"] = {**dmd2_row(facts, activations), "source": DMD2_SDXL["source"]}
            adp_job = {"vae_latents": [16, 32], "pixel_head_sizes": [16, 32]}
            adp_measured = previous_adp or run_worker_process("adp", adp_job, args.threads)
            if "vae_decode_gc" not in adp_measured:  # a plan from before the decoder was checkpointed
                adp_measured = {**adp_measured, **run_worker_process("adp", {**adp_job, "parts": ["vae_decode_gc"]},
                                                                     args.threads)}
            result["adp"] = adp_plan(facts, activations, adp_measured)
            print(f"SDXL ADP: 8 x DDP {gib(result['adp']['rows'][1]['total'])} GiB per GPU", flush=True)
        recipe = next(r for r in rows if r["recipe_mode"] and r["gpus"] == 8 and r["engine"] == "ddp")
        print(f"{MODELS[key]['title']}: {facts['parameters'] / 1e9:.3f} B parameters; recipe mode "
              f"{recipe['mode']}, 8 x DDP: {gib(recipe['total'])} GiB per GPU ({time.perf_counter() - start:.0f} s)",
              flush=True)
    if args.skip_self_check and reused_self_check:
        result["self_check"] = {**reused_self_check, "reused_from": args.reuse}
    if not args.skip_self_check:
        sc = result["self_check"] = self_check("tiny" if args.tiny else "default", args.threads)
        print(f"self-check ({sc['size']}): measured peak {sc['measured_peak_bytes'] / 2**20:.0f} MiB, predicted "
              f"{sc['predicted']['total'] / 2**20:.0f} MiB, measured / predicted {sc['measured_over_predicted']:.2f}",
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "memory_plan")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=list)
    text = markdown(result)
    if result["models"]:
        text += "\n## What fits where (total per GPU, GiB; ✓ fits, ~ tight, ✗ over 80 GiB)\n\n" + summary_table(result)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text + f"Wrote {stem}.json and {stem}.md")
    return result


if __name__ == "__main__":
    main()
