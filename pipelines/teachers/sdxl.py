"""SDXL: UNet2DConditionModel (epsilon, 1000-step DDPM schedule), two CLIP text encoders, added time ids."""

from __future__ import annotations

import inspect

import torch

from dmdx.training.errors import UsageError

from .base import TeacherAdapter, model_dtype


class SDXLTeacher(TeacherAdapter):
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_name = "unet"
    denoiser_class = "UNet2DConditionModel"
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    lora_in_diffusers_format = True  # as diffusers' SDXL LoRA examples save it
    sibling_script = "SDXL, e.g. stabilityai/stable-diffusion-xl-base-1.0; for SD3 use train_adm_sd3.py"

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        self.force_zeros_for_empty_prompt = self.index.get("force_zeros_for_empty_prompt", True)

    def is_my_denoiser(self, config: dict) -> bool:
        return config.get("addition_embed_type") == "text_time"

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        factor = self.vae_factor() * 2 ** (len(self.denoiser_config["down_block_types"]) - 1)
        if resolution <= 0 or resolution % factor:
            raise UsageError(f"--resolution {resolution} must be a positive multiple of {factor} (VAE factor x UNet "
                             f"downsampling) for {self.path}.")
        return super().latent_shape(resolution)

    def discriminator_blocks(self, spec: str | None) -> list[str]:
        """``--discriminator_blocks`` as UNet module names; default: every down block and the mid block."""
        valid = [f"down_blocks.{i}" for i in range(len(self.denoiser_config["down_block_types"]))] + ["mid_block"]
        blocks = [b.strip() for b in spec.split(",")] if spec else valid
        bad = [b for b in blocks if b not in valid + [f"up_blocks.{i}" for i in range(len(valid) - 1)]]
        if bad:
            raise UsageError(f"--discriminator_blocks {bad}: not UNet blocks; choose from {valid} (or up_blocks.i).")
        return blocks

    def default_student_scheduler(self, num_steps: int):
        """LCMScheduler on the teacher's betas with trailing timesteps: 1 step -> [999], 4 -> [999, 749, 499, 249];
        the student predicts epsilon like its teacher and is re-noised with fresh noise between steps."""
        from diffusers import LCMScheduler

        accepted = inspect.signature(LCMScheduler.__init__).parameters
        config = {k: v for k, v in self.scheduler_config().items() if k in accepted}
        return LCMScheduler.from_config(config, timestep_spacing="trailing", original_inference_steps=num_steps)

    def load_text_encoders(self, device, dtype, denoiser=None) -> None:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        kw = {**self.load_kwargs, "variant": self.variant}
        tokenizers = [AutoTokenizer.from_pretrained(self.path, subfolder=s, **self.load_kwargs)
                      for s in ("tokenizer", "tokenizer_2")]
        encoders = [CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder", **kw),
                    CLIPTextModelWithProjection.from_pretrained(self.path, subfolder="text_encoder_2", **kw)]
        for encoder in encoders:
            encoder.requires_grad_(False).eval().to(device, dtype=dtype)
        self.text_modules = {"tokenizers": tokenizers, "encoders": encoders}

    @torch.no_grad()
    def _encode(self, prompts: list[str], device):
        """As StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of both CLIP encoders, pooled
        output of the second."""
        embeds, pooled = [], None
        for tokenizer, encoder in zip(self.text_modules["tokenizers"], self.text_modules["encoders"]):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1).float(), pooled.float()

    def fixed_conditioning(self, n: int, device) -> dict[str, torch.Tensor]:
        """The added time ids (original size, crop top-left, target size), as the pipeline builds them."""
        r = self.resolution
        return {"time_ids": torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=torch.float32).repeat(n, 1)}

    def text_options(self) -> dict:
        return {"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}

    def encode_prompts(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        embeds, pooled = self._encode(prompts, device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                **self.fixed_conditioning(len(prompts), device)}

    def negative_conditioning(self, device) -> dict[str, torch.Tensor]:
        """The empty prompt: zeros when the pipeline says ``force_zeros_for_empty_prompt`` (SDXL base does)."""
        cond = self.encode_prompts([""], device)
        if self.force_zeros_for_empty_prompt:
            cond["prompt_embeds"] = torch.zeros_like(cond["prompt_embeds"])
            cond["pooled_prompt_embeds"] = torch.zeros_like(cond["pooled_prompt_embeds"])
        return cond

    def predict(self, model, x, t, cond):
        """The epsilon prediction at (x, t). The timestep is fp32, as StableDiffusionXLPipeline passes its
        scheduler's (EulerDiscreteScheduler's are fp32; integer ones, e.g. DDIM's, are exact in fp32 too); the added
        time ids go in the weights' dtype, as the pipeline casts them to its prompt embeddings' dtype."""
        dtype = model_dtype(model)
        return model(x.to(dtype), t.float(), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                     added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"].to(dtype),
                                        "time_ids": cond["time_ids"].to(dtype)}).sample.float()

    def export_dtype(self, weight_dtype):
        return torch.float32  # SDXL's VAE overflows in fp16; the UNet is small enough to ship in fp32

    def pipeline(self, denoiser, scheduler, vae=None):
        pipe = super().pipeline(denoiser, scheduler, vae)
        pipe.register_to_config(force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
        return pipe
