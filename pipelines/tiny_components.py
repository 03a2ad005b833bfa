"""Small diffusers pipelines of the real architectures, built from configs with tokenizers made in code.

Nothing here downloads. These build the embedded default's teachers (trained on real digits by the demo) and the
tests' tiny models; the training scripts never see this module: they load whatever ``save_pretrained`` folder
they are given, exactly as they would load stabilityai/stable-diffusion-xl-base-1.0.
"""

from __future__ import annotations

import torch

BOS_ID, EOS_ID = 512, 513


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character map (the base alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def byte_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer whose vocabulary is the 512 byte-level base symbols plus BOS/EOS: it encodes any
    string without merges (one token per byte)."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, pad_token=pad_token,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def clip_text_config(hidden_size: int, projection_dim: int, num_layers: int = 1, max_positions: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=514, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, max_position_embeddings=max_positions, projection_dim=projection_dim,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, hidden_act="gelu",
    )


def sdxl_components(
    sample_size: int = 16,
    block_out_channels=(32, 64),
    latent_channels: int = 4,
    text_hidden: int = 32,
    text_layers: int = 1,
    vae_block_out_channels=(32, 64),
    layers_per_block: int = 1,
    max_text_length: int = 32,
    seed: int = 0,
):
    """Components of a ``StableDiffusionXLPipeline`` (UNet with text_time conditioning, two CLIP encoders, VAE,
    epsilon DDPM scheduler with SDXL's betas). ``sample_size`` is the latent size; pixels are
    ``sample_size * 2 ** (len(vae_block_out_channels) - 1)``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    projection_dim = text_hidden
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(block_out_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(block_out_channels) - 1) + ("UpBlock2D",),
        attention_head_dim=tuple(max(2, c // 16) for c in block_out_channels), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=tuple([1] * len(block_out_channels)),
        projection_class_embeddings_input_dim=6 * 8 + projection_dim,
        cross_attention_dim=2 * text_hidden, norm_num_groups=min(32, block_out_channels[0]),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        block_out_channels=tuple(vae_block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * len(vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_block_out_channels),
        layers_per_block=1, norm_num_groups=min(32, vae_block_out_channels[0]),
        sample_size=sample_size * 2 ** (len(vae_block_out_channels) - 1),
    )
    text_encoder = CLIPTextModel(clip_text_config(text_hidden, projection_dim, text_layers, max_text_length))
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_text_config(text_hidden, projection_dim, text_layers, max_text_length))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    return {
        "unet": unet, "vae": vae, "scheduler": scheduler,
        "text_encoder": text_encoder, "tokenizer": byte_clip_tokenizer(max_text_length),
        "text_encoder_2": text_encoder_2, "tokenizer_2": byte_clip_tokenizer(max_text_length, pad_token="!"),
        "image_encoder": None, "feature_extractor": None,
    }


def t5_tokenizer(model_max_length: int = 32):
    """A T5 tokenizer with a byte-ish vocabulary: one piece per printable ASCII character (with and without the
    word-start marker), built in code."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = [chr(c) for c in range(33, 127)]
    pieces += [("\u2581" + c, -1.0) for c in chars] + [(c, -2.0) for c in chars] + [("\u2581", -3.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length,
                           pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def sd3_components(
    sample_size: int = 16,
    num_layers: int = 2,
    patch_size: int = 1,
    attention_head_dim: int = 8,
    num_attention_heads: int = 4,
    latent_channels: int = 16,
    text_hidden: int = 32,
    vae_block_out_channels=(32, 64),
    qk_norm: str | None = None,
    max_text_length: int = 32,
    shift: float = 3.0,
    with_t5: bool = True,
    seed: int = 0,
):
    """Components of a ``StableDiffusion3Pipeline`` (MMDiT, two CLIP encoders, optional T5, 16-channel VAE,
    flow-matching scheduler with the teacher's ``shift``). ``qk_norm="rms_norm"`` gives the SD3.5 variant."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    kwargs = {"qk_norm": qk_norm} if qk_norm else {}
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=patch_size, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=num_layers, attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        caption_projection_dim=attention_head_dim * num_attention_heads, joint_attention_dim=text_hidden,
        pooled_projection_dim=2 * text_hidden, pos_embed_max_size=max(32, sample_size), **kwargs,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        block_out_channels=tuple(vae_block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * len(vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_block_out_channels),
        layers_per_block=1, norm_num_groups=min(32, vae_block_out_channels[0]),
        sample_size=sample_size * 2 ** (len(vae_block_out_channels) - 1),
        shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModelWithProjection(clip_text_config(text_hidden, text_hidden, 1, max_text_length))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(text_hidden, text_hidden, 1, max_text_length))
    components = {
        "transformer": transformer, "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift),
        "text_encoder": text_encoder, "tokenizer": byte_clip_tokenizer(max_text_length),
        "text_encoder_2": text_encoder_2, "tokenizer_2": byte_clip_tokenizer(max_text_length),
        "text_encoder_3": None, "tokenizer_3": None, "image_encoder": None, "feature_extractor": None,
    }
    if with_t5:
        t5 = T5EncoderModel(T5Config(vocab_size=3 + 2 * 94 + 1, d_model=text_hidden, d_kv=8, d_ff=2 * text_hidden,
                                     num_layers=1, num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=8))
        components.update(text_encoder_3=t5.eval(), tokenizer_3=t5_tokenizer(max_text_length))
    return components


def cogvideox_components(
    sample_size: int = 8,
    sample_frames: int = 9,
    num_layers: int = 2,
    patch_size: int = 2,
    attention_head_dim: int = 16,
    num_attention_heads: int = 2,
    latent_channels: int = 4,
    text_hidden: int = 32,
    vae_block_out_channels=(16, 32),
    temporal_compression_ratio: int = 2,
    use_rotary_positional_embeddings: bool = True,
    max_text_length: int = 48,
    patch_size_t: int | None = None,
    seed: int = 0,
):
    """Components of a ``CogVideoXPipeline``: a 3-D transformer (v-prediction), the causal 3-D VAE, T5, and the
    teacher's ``CogVideoXDDIMScheduler``. ``sample_size`` is the latent height/width and ``sample_frames`` the
    pixel frame count the positional embeddings are built for. The VAE halves height/width once per block after
    the first and compresses time by ``temporal_compression_ratio``; with rotary embeddings (CogVideoX-5b style)
    ``attention_head_dim`` must be a multiple of 8 (diffusers splits it into 1/4 time, 3/8 height, 3/8 width).
    ``patch_size_t`` (e.g. 2) gives the CogVideoX 1.5 variant that also patches time."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=latent_channels,
        out_channels=latent_channels, time_embed_dim=attention_head_dim * num_attention_heads,
        text_embed_dim=text_hidden, num_layers=num_layers, sample_width=sample_size, sample_height=sample_size,
        sample_frames=sample_frames, patch_size=patch_size, temporal_compression_ratio=temporal_compression_ratio,
        max_text_seq_length=max_text_length, use_rotary_positional_embeddings=use_rotary_positional_embeddings,
        patch_size_t=patch_size_t,
    )
    blocks = len(vae_block_out_channels)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("CogVideoXDownBlock3D",) * blocks, up_block_types=("CogVideoXUpBlock3D",) * blocks,
        block_out_channels=tuple(vae_block_out_channels), layers_per_block=1,
        norm_num_groups=min(32, vae_block_out_channels[0]), temporal_compression_ratio=temporal_compression_ratio,
        sample_height=sample_size * 2 ** (blocks - 1), sample_width=sample_size * 2 ** (blocks - 1),
        scaling_factor=1.0,
    )
    t5 = T5EncoderModel(T5Config(vocab_size=3 + 2 * 94 + 1, d_model=text_hidden, d_kv=8, d_ff=2 * text_hidden,
                                 num_layers=1, num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=8))
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       set_alpha_to_one=True, timestep_spacing="trailing", snr_shift_scale=1.0)
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler, "text_encoder": t5.eval(),
            "tokenizer": t5_tokenizer(max_text_length)}


def umt5_config(vocab_size: int, text_hidden: int = 32, num_layers: int = 1):
    """A tiny UMT5 encoder config (Wan's text encoder family; per-layer relative attention), dropout 0 so identical
    calls give identical embeddings."""
    from transformers import UMT5Config

    return UMT5Config(vocab_size=vocab_size, d_model=text_hidden, d_kv=8, d_ff=2 * text_hidden, num_layers=num_layers,
                      num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=8, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)


def wan_components(
    num_layers: int = 2,
    attention_head_dim: int = 16,
    num_attention_heads: int = 2,
    latent_channels: int = 4,
    patch_size=(1, 2, 2),
    text_hidden: int = 32,
    vae_base_dim: int = 16,
    vae_dim_mult=(1, 2),
    temporal_downsample=(True,),
    flow_shift: float = 3.0,
    max_text_length: int = 32,
    tokenizer=None,
    seed: int = 0,
):
    """Components of a ``WanPipeline`` (Wan 2.1 text-to-video): ``WanTransformer3DModel`` (flow matching, rotary
    positions), the causal 3-D ``AutoencoderKLWan`` with per-channel ``latents_mean`` / ``latents_std``, a UMT5 encoder,
    and the teacher's ``UniPCMultistepScheduler`` with flow sigmas and ``flow_shift`` (as Wan's Diffusers checkpoints
    ship it). The VAE halves height/width once per ``vae_dim_mult`` level after the first, and time at each level whose
    ``temporal_downsample`` is True; its ``scale_factor_*`` config says so, since WanPipeline reads them. The rotary
    embedding splits ``attention_head_dim`` into time / height / width parts (2 * (d // 6) for each space axis): an
    even ``attention_head_dim`` of at least 12 keeps every part even."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    inner = attention_head_dim * num_attention_heads
    transformer = WanTransformer3DModel(
        patch_size=tuple(patch_size), num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
        in_channels=latent_channels, out_channels=latent_channels, text_dim=text_hidden, freq_dim=32,
        ffn_dim=2 * inner, num_layers=num_layers, rope_max_seq_len=64,
    )
    generator = torch.Generator().manual_seed(seed)  # per-channel latent statistics, as the real VAE carries them
    vae = AutoencoderKLWan(
        base_dim=vae_base_dim, z_dim=latent_channels, dim_mult=list(vae_dim_mult), num_res_blocks=1,
        temperal_downsample=list(temporal_downsample),
        latents_mean=(torch.randn(latent_channels, generator=generator) * 0.5).tolist(),
        latents_std=(1.0 + torch.rand(latent_channels, generator=generator)).tolist(),
        scale_factor_temporal=2 ** sum(bool(d) for d in temporal_downsample),
        scale_factor_spatial=2 ** (len(vae_dim_mult) - 1),
    )
    tokenizer = tokenizer or t5_tokenizer(max_text_length)
    text_encoder = UMT5EncoderModel(umt5_config(len(tokenizer), text_hidden))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=flow_shift, num_train_timesteps=1000)
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler, "text_encoder": text_encoder.eval(),
            "tokenizer": tokenizer, "transformer_2": None}
