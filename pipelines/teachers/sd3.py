"""SD3-Medium / SD3.5-Large: SD3Transformer2DModel (MMDiT, rectified flow), CLIP-L/G + T5 text encoders."""

from __future__ import annotations

import torch

from dmdx.training.errors import UsageError

from .base import TeacherAdapter, merge_card_extras, model_dtype, transformer_block_names


class SD3Teacher(TeacherAdapter):
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    # the attention projections of the joint blocks, as diffusers' SD3 LoRA example adapts them
    lora_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                           "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    sibling_script = "SD3-Medium, SD3.5-Large; for SDXL use train_adm_sdxl.py"

    def __init__(self, path: str, *, max_sequence_length: int = 256, drop_t5: bool = False,
                 shift_terminal: float = 0.25, **kwargs):
        super().__init__(path, **kwargs)
        self.max_sequence_length, self.drop_t5, self.shift_terminal = max_sequence_length, drop_t5, shift_terminal
        self.options = {"max_sequence_length": max_sequence_length, "drop_t5": drop_t5,
                        "shift_terminal": shift_terminal}
        self.has_t5 = (self.index.get("text_encoder_3") or [None])[0] is not None
        if not self.has_t5 and not drop_t5:
            raise UsageError(f"{self.what} {path!r} has no T5 encoder (text_encoder_3 is null in model_index.json): "
                             "pass --drop_t5 to train (and ship) without it.")
        if not 0 <= shift_terminal < 1:
            raise UsageError(f"--shift_terminal {shift_terminal} must be in [0, 1) (the last sigma of the student's "
                             "schedule; 0 = the stock schedule).")

    def is_my_denoiser(self, config: dict) -> bool:
        return config.get("_class_name") == self.denoiser_class

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        vae_factor, patch = self.vae_factor(), self.denoiser_config["patch_size"]
        multiple = vae_factor * patch
        if resolution <= 0 or resolution % multiple:
            raise UsageError(f"--resolution {resolution} is not divisible by {multiple} (VAE factor {vae_factor} x "
                             f"patch size {patch}); try {max(multiple, resolution // multiple * multiple)}.")
        grid = resolution // multiple
        if grid > self.denoiser_config["pos_embed_max_size"]:
            raise UsageError(f"--resolution {resolution} gives a {grid}x{grid} patch grid, larger than the "
                             f"transformer's pos_embed_max_size {self.denoiser_config['pos_embed_max_size']}.")
        return super().latent_shape(resolution)

    def discriminator_blocks(self, spec: str | None) -> list[str]:
        """``--discriminator_blocks`` as ``transformer_blocks`` indices; default 4 evenly spaced ones including the
        last (the paper says "several blocks": docs/method.md#heads)."""
        return transformer_block_names(spec, self.denoiser_config["num_layers"])

    def default_student_scheduler(self, num_steps: int):
        """The teacher's FlowMatchEulerDiscreteScheduler with ``shift_terminal``: with the stock shift 3.0 a 4-step
        schedule ends at sigma 0.009 (a near no-op step); shift_terminal 0.25 gives [1.0, 0.892, 0.699, 0.25]."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config(),
                                                           shift_terminal=self.shift_terminal or None)

    def text_components(self) -> list[str]:
        drop = ("text_encoder_3", "tokenizer_3") if self.drop_t5 else ()
        return [name for name in super().text_components() if name not in drop]

    def text_options(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length, "drop_t5": self.drop_t5}

    def load_text_encoders(self, device, dtype, denoiser=None) -> None:
        """The stock pipeline's own encode_prompt; without T5 it reads the transformer's config for the zeros (a
        weightless meta-device transformer when none is given: the text-embedding cache encodes before any
        denoiser loads)."""
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        if denoiser is None and self.drop_t5:
            from accelerate import init_empty_weights

            with init_empty_weights():
                denoiser = SD3Transformer2DModel.from_config(self.denoiser_config)
        no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if self.drop_t5 else {}
        text_pipe = StableDiffusion3Pipeline.from_pretrained(
            self.path, transformer=denoiser, vae=None, torch_dtype=dtype, variant=self.variant, **no_t5,
            **self.load_kwargs)
        text_pipe.set_progress_bar_config(disable=True)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(text_pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval().to(device)
        self.text_modules = {"pipe": text_pipe}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        embeds, pooled = [], []
        for i in range(0, len(prompts), 16):
            e, _, p, _ = self.text_modules["pipe"].encode_prompt(
                prompts[i: i + 16], None, None, device=device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length)
            embeds.append(e.float())
            pooled.append(p.float())
        return {"prompt_embeds": torch.cat(embeds), "pooled_prompt_embeds": torch.cat(pooled)}

    def negative_conditioning(self, device) -> dict[str, torch.Tensor]:
        return self.encode_prompts([""], device)

    def predict(self, model, x, t, cond):
        """The flow velocity at (x, t). The timestep stays fp32, as StableDiffusion3Pipeline passes its scheduler's
        timesteps: in bf16 the scheduler's t = 698.92 would arrive as 700 (bf16's grid spacing is 2-4 above t = 256)."""
        dtype = model_dtype(model)
        return model(hidden_states=x.to(dtype), timestep=t.float(),
                     encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                     pooled_projections=cond["pooled_prompt_embeds"].to(dtype), return_dict=False)[0].float()

    def feature_selector(self, latent_shape):
        """A JointTransformerBlock returns (encoder_hidden_states, hidden_states): the image tokens, as a map."""
        from dmdx.training import tokens_to_map

        grid = latent_shape[-1] // self.denoiser_config["patch_size"]
        return lambda out: tokens_to_map(out[1], grid, grid)

    def export_components(self) -> dict:
        return {"text_encoder_3": None, "tokenizer_3": None} if self.drop_t5 else {}

    def card_extras(self) -> dict:
        if not self.drop_t5:
            return super().card_extras()
        # diffusers loads a component saved as [null, null] only when it is passed as None
        return merge_card_extras(super().card_extras(), {
            "pipeline_kwargs": {"text_encoder_3": "None", "tokenizer_3": "None"},
            "extra_sections": {"Without T5": "This student was trained without the T5 text encoder and ships "
                               "without it: load it with `text_encoder_3=None, tokenizer_3=None`."}})
