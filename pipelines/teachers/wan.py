"""Wan 2.1 text-to-video (1.3B, 14B) and Wan 2.2 TI2V-5B used for text-to-video: WanTransformer3DModel (flow
matching, rotary positions computed inside the model), UMT5, the causal 3-D AutoencoderKLWan. Latents are
(B, C, F, H, W): channels first, as WanPipeline and the transformer take them. See docs/wan.md."""

from __future__ import annotations

import inspect

import torch

from dmdx.training.errors import UsageError

from .base import PipelineT5Text, TeacherAdapter, merge_card_extras, model_dtype, transformer_block_names

TILED_DECODE_ABOVE = 256  # px: AutoencoderKLWan's smallest tile; below it tiling has nothing to split


def _call_default(name: str):
    from diffusers import WanPipeline

    return inspect.signature(WanPipeline.__call__).parameters[name].default


class WanTeacher(PipelineT5Text, TeacherAdapter):
    text_encoder_label = "UMT5"
    pipeline_class = "WanPipeline"
    denoiser_name = "transformer"
    denoiser_class = "WanTransformer3DModel"
    # self-attention (attn1) and cross-attention (attn2) projections of every WanTransformerBlock
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    sibling_script = ("text-to-video Wan 2.1 T2V 1.3B/14B, Wan 2.2 TI2V-5B; for CogVideoX use train_adm_cogvideox.py, "
                      "for images train_adm_sdxl.py or train_adm_sd3.py")
    video = True

    def __init__(self, path: str, *, resolution: int | None = None, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, max_sequence_length: int | None = None,
                 shift_terminal: float = 0.25, **kwargs):
        """Sizes default to WanPipeline's own call defaults (81 frames at 480x832, 512 UMT5 tokens); ``resolution``
        is a square shortcut. ``shift_terminal``: the last sigma of the student's schedule (see
        :meth:`default_student_scheduler`)."""
        super().__init__(path, resolution=resolution, **kwargs)
        self.size_flags = {"height": "--height" if height else "--resolution" if resolution else "the default height",
                           "width": "--width" if width else "--resolution" if resolution else "the default width"}
        self.height = int(height or resolution or _call_default("height"))
        self.width = int(width or resolution or _call_default("width"))
        self.num_frames = int(num_frames or _call_default("num_frames"))
        self.max_sequence_length = int(max_sequence_length or _call_default("max_sequence_length"))
        self.shift_terminal = shift_terminal
        self.options = {"num_frames": self.num_frames, "height": self.height, "width": self.width,
                        "max_sequence_length": self.max_sequence_length, "shift_terminal": shift_terminal}
        vae = self.read_config("vae")
        self.temporal_ratio = int(vae.get("scale_factor_temporal") or 4)  # what WanPipeline reads
        r = self.temporal_ratio
        if self.num_frames < 1 or (self.num_frames - 1) % r:
            below = max(1, (self.num_frames - 1) // r * r + 1)
            raise UsageError(f"--num_frames {self.num_frames}: the VAE compresses time by {r}, so (num_frames - 1) "
                             f"must be divisible by {r} (WanPipeline would silently change it); try {below} or "
                             f"{below + r}.")
        if self.max_sequence_length < 1:
            raise UsageError(f"--max_sequence_length must be >= 1, got {self.max_sequence_length}.")
        if not 0 <= shift_terminal < 1:
            raise UsageError(f"--shift_terminal {shift_terminal} must be in [0, 1) (the last sigma of the student's "
                             "schedule; 0 = FlowMatchEulerDiscreteScheduler's own).")
        if self.teacher_schedule().kind != "flow":
            raise UsageError(f"{self.what} {path!r}: the scheduler is not a flow-matching one (Wan ships "
                             "UniPCMultistepScheduler with use_flow_sigmas and prediction_type flow_prediction).")

    def check_architecture(self) -> None:
        """Also refuse Wan 2.2's two-expert checkpoints (A14B: ``transformer_2`` + ``boundary_ratio``), from
        model_index.json alone: the student would be two networks switched at a boundary timestep, which the loop's
        one generator cannot be (docs/wan.md)."""
        super().check_architecture()
        second = (self.index.get("transformer_2") or [None])[0]
        if second is not None or self.index.get("boundary_ratio") is not None:
            raise UsageError(
                f"{self.what} {self.path!r} is a two-expert Wan 2.2 checkpoint (transformer_2 = "
                f"{self.index.get('transformer_2')}, boundary_ratio = {self.index.get('boundary_ratio')}): not "
                "supported; distill a single-transformer Wan (2.1 T2V 1.3B / 14B, 2.2 TI2V-5B).")

    def is_my_denoiser(self, config: dict) -> bool:
        # image-to-video transformers (image_dim set) need image conditioning WanPipeline does not give
        return config.get("_class_name") == self.denoiser_class and not config.get("image_dim")

    def provenance_fields(self) -> dict:
        return dict(self.options)

    # ---- shapes ---------------------------------------------------------------------------------------------------
    def vae_factor(self) -> int:
        return int(self.read_config("vae").get("scale_factor_spatial") or 8)  # what WanPipeline reads

    def _size(self, resolution: int | None) -> tuple[int, int, dict]:
        if resolution is None or resolution == self.resolution:
            return self.height, self.width, self.size_flags
        return resolution, resolution, {"height": "--resolution", "width": "--resolution"}

    def latent_shape(self, resolution: int | None = None) -> tuple[int, ...]:
        """(C, F_latent, H / f, W / f) as WanPipeline.prepare_latents makes them, checked against the patch grid."""
        config = self.denoiser_config
        height, width, flags = self._size(resolution)
        factor, (p_t, p_h, p_w) = self.vae_factor(), config["patch_size"]
        frames = (self.num_frames - 1) // self.temporal_ratio + 1
        for name, value, patch in (("height", height, p_h), ("width", width, p_w)):
            multiple = factor * patch
            if value <= 0 or value % multiple:
                raise UsageError(f"{flags[name]} {value} is not divisible by {multiple} (VAE factor {factor} x patch "
                                 f"size {patch}); try {max(multiple, value // multiple * multiple)}.")
        if frames % p_t:
            raise UsageError(f"--num_frames {self.num_frames} gives {frames} latent frames, not a multiple of the "
                             f"transformer's temporal patch size {p_t}.")
        grid = (frames // p_t, height // factor // p_h, width // factor // p_w)
        if max(grid) > config["rope_max_seq_len"]:
            raise UsageError(f"--num_frames/--height/--width give a {grid} patch grid; the transformer's rotary "
                             f"positions reach {config['rope_max_seq_len']} per axis.")
        return (config["in_channels"], frames, height // factor, width // factor)

    def discriminator_blocks(self, spec: str | None) -> list[str]:
        """``--discriminator_blocks`` as indices of the transformer's ``blocks``; default 4 evenly spaced ones including
        the last, as for the other transformer teachers."""
        names = transformer_block_names(spec, self.denoiser_config["num_layers"])
        return [f"blocks.{name.rsplit('.', 1)[1]}" for name in names]

    def feature_selector(self, latent_shape):
        """A WanTransformerBlock returns the video tokens, laid out as the patch-embedding Conv3d flattens them
        (frame, row, column); as (B, C, F', h, w) maps for the 3-D heads."""
        from dmdx.training import first_tensor, tokens_to_map

        _, frames, height, width = latent_shape
        p_t, p_h, p_w = self.denoiser_config["patch_size"]
        return lambda out: tokens_to_map(first_tensor(out), height // p_h, width // p_w, frames=frames // p_t)

    # ---- schedules ------------------------------------------------------------------------------------------------
    def default_student_scheduler(self, num_steps: int):
        """FlowMatchEulerDiscreteScheduler with the teacher's flow shift and ``shift_terminal``. Wan ships a
        second-order UniPC, whose steps mix the last two predictions; a few-step student is trained on single
        deterministic steps (the loop's backward simulation), which Euler takes exactly. shift_terminal 0.25 keeps
        the last step useful: 4 steps at shift 3.0 end at sigma 0.009 without it, at 0.25 with it
        ([1.0, 0.892, 0.699, 0.25]; shift 5.0: [1.0, 0.931, 0.783, 0.25])."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        schedule = self.teacher_schedule()
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift,
                                               shift_terminal=self.shift_terminal or None)

    # ---- weights --------------------------------------------------------------------------------------------------
    def load_vae(self, device, dtype=torch.float32):
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(self.path, subfolder="vae", variant=self.variant, **self.load_kwargs)
        vae.enable_slicing()
        if max(self.height, self.width) > TILED_DECODE_ABOVE:
            vae.enable_tiling()
        return vae.requires_grad_(False).eval().to(device, dtype=dtype)

    # ---- the denoiser ---------------------------------------------------------------------------------------------
    def predict(self, model, x, t, cond):
        """The flow velocity at (x, t). The timestep is fp32, as WanPipeline passes the student scheduler's; Wan 2.2
        TI2V (``expand_timesteps``) takes one per video token, as its pipeline expands it."""
        dtype = model_dtype(model)
        timestep = t.float()
        if self.index.get("expand_timesteps"):
            p_t, p_h, p_w = self.denoiser_config["patch_size"]
            tokens = x.shape[2] // p_t * (x.shape[3] // p_h) * (x.shape[4] // p_w)
            timestep = timestep[:, None].expand(-1, tokens)
        return model(hidden_states=x.to(dtype), timestep=timestep,
                     encoder_hidden_states=cond["prompt_embeds"].to(dtype), return_dict=False)[0].float()

    # ---- validation and export ------------------------------------------------------------------------------------
    def pipeline(self, denoiser, scheduler, vae=None):
        """The stock WanPipeline with the teacher's ``expand_timesteps`` (the base class would leave it unset)."""
        from diffusers import WanPipeline

        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=denoiser,
                           expand_timesteps=bool(self.index.get("expand_timesteps")))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(self, pipe, cond: dict, num_inference_steps: int, generator, resolution: int | None) -> list:
        height, width, _ = self._size(resolution)
        return pipe(prompt_embeds=cond["prompt_embeds"], num_inference_steps=num_inference_steps, guidance_scale=0.0,
                    height=height, width=width, num_frames=self.num_frames, generator=generator,
                    output_type="pil").frames

    def card_extras(self) -> dict:
        """The trained size and frames in the card's call (PIL frames for export_to_gif: WanPipeline returns
        arrays by default); the UMT5 length when not the pipeline's."""
        call = {"height": str(self.height), "width": str(self.width), "num_frames": str(self.num_frames),
                "output_type": '"pil"'}
        if self.max_sequence_length != _call_default("max_sequence_length"):
            call["max_sequence_length"] = str(self.max_sequence_length)
        return merge_card_extras(super().card_extras(), {"call_kwargs": call, "extra_sections": {"Memory": (
            f"The student was trained on {self.num_frames} frames at {self.height}x{self.width}. As for the teacher, "
            "`pipe.vae.enable_tiling()` lowers the memory of decoding and `pipe.enable_model_cpu_offload()` that of "
            "the whole pipeline.")}})
