"""LoRA on one base (docs/design.md#lora): the generator and the fake score are named peft adapters on the one frozen
teacher, the real score is that base with its adapters switched off, and the discriminator's backbone is the same
object. Each role is a :class:`LoraView`, a module whose parameters (and so optimizer, DDP, checkpoint) are its
own adapter's alone; calling it switches the base to that adapter.

Switching writes peft's per-layer state directly: peft's own ``set_adapter`` / ``enable_adapters`` also reset
``requires_grad``, which would undo what the training loop froze. Under gradient checkpointing only a view whose
parameters are being trained checkpoints its blocks, and the update re-activates it before its backward
(``activate``), so no block is ever recomputed under another role's adapter.
"""

from __future__ import annotations

import torch
from torch import nn

KEY_SEP = "__"  # parameter names of the base, "." -> "__" (ParameterDict keys cannot hold dots)


def add_lora_adapter(base: nn.Module, name: str, rank: int, alpha: int, target_modules, seed: int) -> None:
    """A gaussian-initialised LoRA adapter ``name`` on ``base`` (a diffusers model), in fp32 on the base's device;
    the same initialisation on every rank and on resume (seeded)."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    base.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(target_modules)), adapter_name=name)
    for param_name, param in base.named_parameters():
        if f".{name}." in param_name:
            param.data = param.data.float()
            param.requires_grad_(True)
        elif "lora_" not in param_name:
            param.requires_grad_(False)


class LoraView(nn.Module):
    """One role on a shared base: adapter ``adapter_name`` on, or (``adapter_name=None``) every adapter off."""

    def __init__(self, base: nn.Module, adapter_name: str | None, gradient_checkpointing: bool = False):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: parameters() hold this adapter's weights only
        self.adapter_name = adapter_name
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_frozen = False  # checkpoint even while frozen (training.freezing.checkpointed_passes)
        marker = f".{adapter_name}."
        self.adapter = nn.ParameterDict({n.replace(".", KEY_SEP): p for n, p in base.named_parameters()
                                         if adapter_name and marker in n})
        if adapter_name and not len(self.adapter):
            raise ValueError(f"The base model has no LoRA adapter named {adapter_name!r}.")
        self._layers = [m for m in base.modules() if hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters")]
        self._checkpointed = [m for m in base.modules() if hasattr(m, "gradient_checkpointing")
                              and isinstance(m.gradient_checkpointing, bool)]

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def config(self):
        return self.base.config

    def activate(self) -> None:
        """Put the base in this role's state (adapter and gradient checkpointing)."""
        for layer in self._layers:
            layer._disable_adapters = self.adapter_name is None
            if self.adapter_name is not None:
                layer._active_adapter = [self.adapter_name]
        checkpoint = self.checkpoint_frozen or (self.gradient_checkpointing
                                                and any(p.requires_grad for p in self.adapter.values()))
        for module in self._checkpointed:
            module.gradient_checkpointing = checkpoint

    def forward(self, *args, **kwargs):
        self.activate()
        return self.base(*args, **kwargs)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """peft's state dict of this adapter (keys without the adapter name), for export and save_lora_weights."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.base, adapter_name=self.adapter_name)


def fused_copy(adapter, path: str | None, view: LoraView, rank: int, alpha: int, target_modules):
    """A fresh fp32 denoiser from ``path`` (the view's base weights) with the view's adapter fused in and removed:
    what a full student pipeline ships."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    denoiser = adapter.load_denoiser(torch.float32, path=path)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules)))
    set_peft_model_state_dict(denoiser, {k: v.float().cpu() for k, v in view.lora_state_dict().items()})
    denoiser.fuse_lora()
    denoiser.unload_lora()
    return denoiser
