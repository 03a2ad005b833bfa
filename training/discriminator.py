"""Diffusion-based discriminator: a frozen backbone's block features + small trainable heads.

The paper's discriminator (docs/method.md#discriminator) is the frozen teacher itself with lightweight heads on
several blocks. ``BackboneFeatures`` takes those features with forward hooks, so one teacher object serves as both the
real score and the discriminator backbone (one copy in memory), and gradients still flow through the backbone to
its input (needed for the generator's update). ``DiscriminatorHeads`` maps the feature list to one logit per
sample (mean over heads), or with ``output="per_position"`` to a map of logits per sample (a logit per position of
each head's last map, as patch discriminators do; docs/adm_probe.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn


def _group_norm(channels: int) -> nn.GroupNorm:
    """Up to 32 groups of at least 4 channels: after the last downsampling a map can be 1x1, and a group of one
    channel at 1x1 normalises every input to zero (a dead head)."""
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, channels)


HEAD_OUTPUTS = ("pooled", "per_position")


class PositionGroupNorm(nn.Module):
    """GroupNorm's statistics taken at each position separately (over a group's channels only), with GroupNorm's
    per-channel affine. The per-position heads use it instead of GroupNorm, whose statistics pool the whole map and
    would make every logit depend on every position."""

    def __init__(self, channels: int):
        super().__init__()
        self.groups = _group_norm(channels).num_groups
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        g = x.reshape(b, self.groups, c // self.groups, *spatial)
        mean = g.mean(dim=2, keepdim=True)
        var = g.var(dim=2, keepdim=True, unbiased=False)
        x = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        affine = (1, c) + (1,) * len(spatial)
        return x * self.weight.reshape(affine) + self.bias.reshape(affine)


def _norm(channels: int, output: str) -> nn.Module:
    if output not in HEAD_OUTPUTS:
        raise ValueError(f"Head output {output!r} is not one of {HEAD_OUTPUTS}.")
    return PositionGroupNorm(channels) if output == "per_position" else _group_norm(channels)


class DiscriminatorHead2D(nn.Module):
    """The SDXL-Lightning-style head of docs/method.md#heads: three stride-2 4x4 convs, one 3x3 conv (each
    GroupNorm + SiLU), global average pooling, a linear layer to one logit. A stride-2 conv whose input is already
    smaller than 2x2 becomes a stride-1 3x3 conv, so the head also works on the small maps of tiny models.

    ``output="per_position"``: no pooling; the linear layer becomes a 1x1 conv, so the head returns a (B, H', W')
    map of logits over its last map, and each logit depends only on its receptive field of the input (the
    normalisation is per position too)."""

    def __init__(self, in_channels: int, input_size: Sequence[int], hidden_channels: int = 256,
                 num_downsamples: int = 3, zero_init: bool = True, output: str = "pooled"):
        super().__init__()
        layers: list[nn.Module] = []
        size = min(input_size)
        channels = in_channels
        for _ in range(num_downsamples):
            if size >= 2:
                layers.append(nn.Conv2d(channels, hidden_channels, 4, stride=2, padding=1))
                size //= 2
            else:
                layers.append(nn.Conv2d(channels, hidden_channels, 3, stride=1, padding=1))
            layers += [_norm(hidden_channels, output), nn.SiLU()]
            channels = hidden_channels
        layers += [nn.Conv2d(channels, hidden_channels, 3, padding=1), _norm(hidden_channels, output), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.output = output
        self.out = nn.Linear(hidden_channels, 1) if output == "pooled" else nn.Conv2d(hidden_channels, 1, 1)
        if zero_init:  # logits start at 0, so the first updates are the discriminator's (paper-silent choice)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        h = self.body(feature)
        if self.output == "per_position":
            return self.out(h).squeeze(1)  # (B, H', W')
        return self.out(h.mean(dim=(-2, -1))).squeeze(-1)


class DiscriminatorHead3D(nn.Module):
    """The video head (docs/method.md#heads, the 3-D variant): 3x3x3 convs that downsample space (not time), GroupNorm +
    SiLU, average over space, then over time (the AvgPool1d), and a linear layer. Input: (B, C, F, H, W).
    ``output="per_position"``: no pooling, a 1x1x1 conv to a (B, F, H', W') map of logits (as the 2-D head)."""

    def __init__(self, in_channels: int, input_size: Sequence[int], hidden_channels: int = 256,
                 num_downsamples: int = 3, zero_init: bool = True, output: str = "pooled"):
        super().__init__()
        layers: list[nn.Module] = []
        size = min(input_size[-2:])
        channels = in_channels
        for _ in range(num_downsamples):
            stride = (1, 2, 2) if size >= 2 else 1
            size = size // 2 if size >= 2 else size
            layers += [nn.Conv3d(channels, hidden_channels, 3, stride=stride, padding=1),
                       _norm(hidden_channels, output), nn.SiLU()]
            channels = hidden_channels
        layers += [nn.Conv3d(channels, hidden_channels, 3, padding=1), _norm(hidden_channels, output), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.output = output
        self.out = nn.Linear(hidden_channels, 1) if output == "pooled" else nn.Conv3d(hidden_channels, 1, 1)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.output == "per_position":
            return self.out(self.body(feature)).squeeze(1)  # (B, F, H', W')
        h = self.body(feature).mean(dim=(-2, -1))  # (B, C, F)
        h = nn.functional.adaptive_avg_pool1d(h, 1).squeeze(-1)  # over time
        return self.out(h).squeeze(-1)


class DiscriminatorHeads(nn.Module):
    """One head per feature map; the logit of a sample is the mean over heads.

    ``output="per_position"``: (B, n_heads, *map) logits instead of (B,): each head's logit map, brought to the
    largest head map's size by nearest-neighbour repetition (so each head keeps an equal share of the mean over
    positions). The losses take the hinge per position and average per sample (``losses.hinge_discriminator_loss``).
    """

    def __init__(self, feature_shapes: Sequence[Sequence[int]], hidden_channels: int = 256,
                 num_downsamples: int = 3, zero_init: bool = True, fp32: bool = False, output: str = "pooled"):
        """``feature_shapes``: per feature, (C, H, W) for 2-D heads or (C, F, H, W) for 3-D (video) heads.
        ``fp32``: run in fp32 even under autocast (accelerate's mixed precision wraps a prepared module's forward in
        autocast; the heads must not round fp32 backbone features back to bf16). ``output``: "pooled" (the paper's
        heads) or "per_position"."""
        super().__init__()
        if output not in HEAD_OUTPUTS:
            raise ValueError(f"Head output {output!r} is not one of {HEAD_OUTPUTS}.")
        self.fp32, self.output = fp32, output
        heads = []
        for shape in feature_shapes:
            head_cls = DiscriminatorHead2D if len(shape) == 3 else DiscriminatorHead3D
            if len(shape) not in (3, 4):
                raise ValueError(f"Feature shape {tuple(shape)} is neither (C, H, W) nor (C, F, H, W).")
            heads.append(head_cls(shape[0], shape[1:], hidden_channels, num_downsamples, zero_init, output))
        self.heads = nn.ModuleList(heads)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"Got {len(features)} features for {len(self.heads)} heads.")
        dtype = next(self.parameters()).dtype
        with torch.autocast(features[0].device.type, enabled=False) if self.fp32 else nullcontext():
            logits = [head(f.to(dtype)) for head, f in zip(self.heads, features)]
        if self.output == "pooled":
            return torch.stack(logits, dim=0).mean(dim=0)
        size = [max(sizes) for sizes in zip(*(m.shape[1:] for m in logits))]
        logits = [m if list(m.shape[1:]) == size else
                  nn.functional.interpolate(m.unsqueeze(1), size=size, mode="nearest").squeeze(1) for m in logits]
        return torch.stack(logits, dim=1)


class _StopForward(Exception):
    pass


def first_tensor(output: Any) -> torch.Tensor:
    """Default feature selector: a block's output, or the first tensor of a tuple output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    if hasattr(output, "sample"):
        return output.sample
    raise TypeError(f"Cannot take a feature tensor from a {type(output).__name__} output.")


class BackboneFeatures:
    """Forward hooks on named blocks of a (frozen) backbone.

    ``features = extractor(lambda: backbone(x, t, ...))`` runs the backbone and returns the hooked blocks' outputs
    in ``module_names`` order. Hooks record only inside that call, so the same backbone used as the real score
    elsewhere is unaffected. With ``stop_early`` the forward is cut off after the last needed block (the rest of
    the network is never run). Nothing is detached: gradients flow to the backbone's input.
    """

    def __init__(self, backbone: nn.Module, module_names: Sequence[str],
                 select: Callable[[Any], torch.Tensor] = first_tensor, stop_early: bool = True):
        modules = dict(backbone.named_modules())
        missing = [n for n in module_names if n not in modules]
        if missing:
            raise ValueError(f"Backbone has no modules named {missing}. Some valid names: {list(modules)[:20]}")
        self.module_names = list(module_names)
        self.select = select
        self.stop_early = stop_early
        self._captured: dict[str, torch.Tensor] = {}
        self._active = False
        self._handles = [modules[n].register_forward_hook(self._make_hook(n)) for n in self.module_names]

    def _make_hook(self, name: str):
        def hook(_module, _inputs, output):
            if not self._active:
                return
            self._captured[name] = self.select(output)
            if self.stop_early and len(self._captured) == len(self.module_names):
                raise _StopForward

        return hook

    def __call__(self, run_backbone: Callable[[], Any]) -> list[torch.Tensor]:
        self._captured = {}
        self._active = True
        try:
            run_backbone()
        except _StopForward:
            pass
        finally:
            self._active = False
        missing = [n for n in self.module_names if n not in self._captured]
        if missing:
            raise RuntimeError(f"Blocks {missing} did not run in the backbone's forward.")
        features = [self._captured[n] for n in self.module_names]
        self._captured = {}
        return features

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def tokens_to_map(hidden_states: torch.Tensor, height: int, width: int, frames: int | None = None) -> torch.Tensor:
    """(B, N, C) transformer tokens -> (B, C, H, W), or (B, C, F, H, W) for video tokens laid out frame-major."""
    b, n, c = hidden_states.shape
    if frames is None:
        if n != height * width:
            raise ValueError(f"{n} tokens do not form a {height}x{width} map.")
        return hidden_states.transpose(1, 2).reshape(b, c, height, width)
    if n != frames * height * width:
        raise ValueError(f"{n} tokens do not form {frames} frames of {height}x{width}.")
    return hidden_states.reshape(b, frames, height, width, c).permute(0, 4, 1, 2, 3)
