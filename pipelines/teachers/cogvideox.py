"""CogVideoX-2b / 5b (and 1.5): CogVideoXTransformer3DModel (v-prediction on CogVideoXDDIMScheduler's schedule), T5,
the causal 3-D VAE. Latents are (B, F, C, H, W): frames first, as the pipeline and the transformer take them."""

from __future__ import annotations

import inspect

import torch

from dmdx.training.errors import UsageError

from .base import PipelineT5Text, TeacherAdapter, merge_card_extras, model_dtype, transformer_block_names

TILED_DECODE_ABOVE = 256  # px; see load_vae


class CogVideoXTeacher(PipelineT5Text, TeacherAdapter):
    pipeline_class = "CogVideoXPipeline"
    denoiser_name = "transformer"
    denoiser_class = "CogVideoXTransformer3DModel"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")  # as diffusers' CogVideoX LoRA example
    sibling_script = "text-to-video CogVideoX-2b/5b/1.5; for images use train_adm_sdxl.py or train_adm_sd3.py"
    video = True

    def __init__(self, path: str, *, resolution: int | None = None, num_frames: int | None = None,
                 max_sequence_length: int | None = None, height: int | None = None, width: int | None = None,
                 **kwargs):
        """``num_frames`` (pixel frames) defaults to the transformer's ``sample_frames``, ``max_sequence_length``
        (T5 tokens) to its ``max_text_seq_length``, ``height`` / ``width`` to ``resolution`` (a square) or else to the
        pipeline's own default size (the transformer's sample size x the VAE factor: 480 x 720 for CogVideoX)."""
        super().__init__(path, resolution=resolution, **kwargs)
        config, vae = self.denoiser_config, self.read_config("vae")
        self.temporal_ratio = int(vae.get("temporal_compression_ratio", 4))
        factor = self.vae_factor()
        self.size_flags = {"height": "--height" if height else "--resolution" if resolution else "the default height",
                           "width": "--width" if width else "--resolution" if resolution else "the default width"}
        self.height = int(height or resolution or config["sample_height"] * factor)
        self.width = int(width or resolution or config["sample_width"] * factor)
        self.num_frames = int(num_frames or config["sample_frames"])
        self.max_sequence_length = int(max_sequence_length or config["max_text_seq_length"])
        self.options = {"num_frames": self.num_frames, "max_sequence_length": self.max_sequence_length,
                        "height": self.height, "width": self.width}
        self._rotary: dict = {}
        r = self.temporal_ratio
        if self.num_frames < 1 or (self.num_frames - 1) % r:
            below = max(1, (self.num_frames - 1) // r * r + 1)
            raise UsageError(f"--num_frames {self.num_frames}: the VAE compresses time by {r}, so (num_frames - 1) "
                             f"must be divisible by {r} (the pipeline would silently drop frames); try {below} or "
                             f"{below + r}.")
        if self.max_sequence_length < 1:
            raise UsageError(f"--max_sequence_length must be >= 1, got {self.max_sequence_length}.")
        if not config.get("use_rotary_positional_embeddings") and \
                self.max_sequence_length != config["max_text_seq_length"]:
            raise UsageError(f"--max_sequence_length {self.max_sequence_length}: this transformer (sin-cos positional "
                             f"embeddings, CogVideoX-2b style) takes exactly max_text_seq_length = "
                             f"{config['max_text_seq_length']} text tokens.")

    def is_my_denoiser(self, config: dict) -> bool:
        return config.get("_class_name") == self.denoiser_class

    def provenance_fields(self) -> dict:
        return dict(self.options)

    # ---- shapes ---------------------------------------------------------------------------------------------------
    def _size(self, resolution: int | None) -> tuple[int, int, dict]:
        """(height, width, flag names): this adapter's own size, or a square ``resolution`` given for another one."""
        if resolution is None or resolution == self.resolution:
            return self.height, self.width, self.size_flags
        return resolution, resolution, {"height": "--resolution", "width": "--resolution"}

    def latent_frames(self) -> int:
        """Latent frames of ``num_frames`` pixel frames; with ``patch_size_t`` (CogVideoX 1.5) padded up to a multiple
        of it, as CogVideoXPipeline pads them (it drops the padding frames before decoding)."""
        frames = (self.num_frames - 1) // self.temporal_ratio + 1
        p_t = self.denoiser_config.get("patch_size_t")
        return frames + (-frames) % p_t if p_t else frames

    def latent_shape(self, resolution: int | None = None) -> tuple[int, ...]:
        """(F_latent, C, H / 8, W / 8) for the run's frames and size (``resolution`` None: this adapter's size)."""
        config = self.denoiser_config
        height, width, flags = self._size(resolution)
        factor, patch = self.vae_factor(), config["patch_size"]
        multiple = factor * patch
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                raise UsageError(f"{flags[name]} {value} is not divisible by {multiple} (VAE factor {factor} x patch "
                                 f"size {patch}); try {max(multiple, value // multiple * multiple)}.")
        if config.get("use_learned_positional_embeddings") and (
                height != config["sample_height"] * factor or width != config["sample_width"] * factor):
            raise UsageError(f"This transformer has learned positional embeddings for "
                             f"{config['sample_height'] * factor}x{config['sample_width'] * factor} only; "
                             f"--height/--width {height}x{width} cannot be used.")
        return (self.latent_frames(), config["in_channels"], height // factor, width // factor)

    def discriminator_blocks(self, spec: str | None) -> list[str]:
        """``--discriminator_blocks`` as ``transformer_blocks`` indices; default 4 evenly spaced ones including the
        last, as for SD3."""
        return transformer_block_names(spec, self.denoiser_config["num_layers"])

    def feature_selector(self, latent_shape):
        """A CogVideoXBlock returns (hidden_states, encoder_hidden_states): the video tokens come first, laid out
        frame-major by CogVideoXPatchEmbed (frame, row, column); as (B, C, F', h, w) maps for the 3-D heads."""
        from dmdx.training import tokens_to_map

        frames, _, height, width = latent_shape
        patch, p_t = self.denoiser_config["patch_size"], self.denoiser_config.get("patch_size_t")
        grid_frames = frames // p_t if p_t else frames
        return lambda out: tokens_to_map(out[0], height // patch, width // patch, frames=grid_frames)

    # ---- schedules ------------------------------------------------------------------------------------------------
    def default_student_scheduler(self, num_steps: int):
        """The teacher's CogVideoXDDIMScheduler (same v-prediction, betas, SNR shift and zero-terminal-SNR rescale)
        with trailing timesteps: 8 steps -> [999, 874, ..., 124], each step a DDIM step to the next."""
        from diffusers import CogVideoXDDIMScheduler

        accepted = inspect.signature(CogVideoXDDIMScheduler.__init__).parameters
        config = {k: v for k, v in self.scheduler_config().items() if k in accepted}
        return CogVideoXDDIMScheduler.from_config(config, timestep_spacing="trailing")

    # ---- weights --------------------------------------------------------------------------------------------------
    def load_vae(self, device, dtype=torch.float32):
        """The causal 3-D VAE, decoding one video at a time (slicing); frames larger than 256 px decode in tiles
        (diffusers' tiled decode saves memory there; on tiny frames its tile arithmetic returns frames of the wrong
        size: 16 px decoded to 18 px, measured with diffusers 0.42.1)."""
        from diffusers import AutoencoderKLCogVideoX

        vae = AutoencoderKLCogVideoX.from_pretrained(self.path, subfolder="vae", variant=self.variant,
                                                     **self.load_kwargs)
        vae.enable_slicing()
        if max(self.height, self.width) > TILED_DECODE_ABOVE:
            vae.enable_tiling()
        return vae.requires_grad_(False).eval().to(device, dtype=dtype)

    # ---- the denoiser ---------------------------------------------------------------------------------------------
    def rotary_embedding(self, latent_shape, device):
        """``image_rotary_emb`` as CogVideoXPipeline._prepare_rotary_positional_embeddings builds it (diffusers'
        get_3d_rotary_pos_embed; 1.0: crop region of the base grid, 1.5: "slice" grid), cached per shape; None when
        the transformer has no rotary embeddings (CogVideoX-2b)."""
        config = self.denoiser_config
        if not config.get("use_rotary_positional_embeddings"):
            return None
        key = (tuple(latent_shape), str(device))
        if key not in self._rotary:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            frames, _, height, width = latent_shape
            p, p_t = config["patch_size"], config.get("patch_size_t")
            grid = (height // p, width // p)
            base_height, base_width = config["sample_height"] // p, config["sample_width"] // p
            if p_t is None:
                self._rotary[key] = get_3d_rotary_pos_embed(
                    embed_dim=config["attention_head_dim"],
                    crops_coords=get_resize_crop_region_for_grid(grid, base_width, base_height), grid_size=grid,
                    temporal_size=frames, device=device)
            else:
                self._rotary[key] = get_3d_rotary_pos_embed(
                    embed_dim=config["attention_head_dim"], crops_coords=None, grid_size=grid,
                    temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_height, base_width),
                    device=device)
        return self._rotary[key]

    def predict(self, model, x, t, cond):
        """The v-prediction at (x, t). The timestep stays fp32: CogVideoXPipeline passes its DDIM scheduler's integer
        timesteps, which fp32 holds exactly, and ADM's t - T/64 is fractional (bf16 would round it)."""
        dtype = model_dtype(model)
        return model(hidden_states=x.to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                     timestep=t.float(), image_rotary_emb=self.rotary_embedding(x.shape[1:], x.device),
                     return_dict=False)[0].float()

    # ---- validation and export ------------------------------------------------------------------------------------
    def generate(self, pipe, cond: dict, num_inference_steps: int, generator, resolution: int | None) -> list:
        height, width, _ = self._size(resolution)
        return pipe(prompt_embeds=cond["prompt_embeds"], num_inference_steps=num_inference_steps, guidance_scale=0.0,
                    height=height, width=width, num_frames=self.num_frames, generator=generator).frames

    def card_extras(self) -> dict:
        """The size and frames the student was trained for, in the card's call; T5 length when not the pipeline's."""
        from diffusers import CogVideoXPipeline

        call = {"height": str(self.height), "width": str(self.width), "num_frames": str(self.num_frames)}
        stock = inspect.signature(CogVideoXPipeline.__call__).parameters["max_sequence_length"].default
        if self.max_sequence_length != stock:
            call["max_sequence_length"] = str(self.max_sequence_length)
        return merge_card_extras(super().card_extras(), {"call_kwargs": call, "extra_sections": {"Memory": (
            f"The student was trained on {self.num_frames} frames at {self.height}x{self.width}. As for the teacher, "
            "`pipe.vae.enable_slicing()` and `pipe.vae.enable_tiling()` lower the memory of decoding, and "
            "`pipe.enable_model_cpu_offload()` that of the whole pipeline.")}})
