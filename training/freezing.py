"""Freezing a network's parameters for one pass while gradients still flow through its inputs.

ADM's generator update needs exactly this (paper_spec §2.3): the fake score and the discriminator heads take part
in the pass, but only the generator may receive gradients. ``requires_grad=False`` on their parameters (rather
than ``torch.no_grad``) keeps the graph through their inputs back to the generator.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen_parameters(*modules: nn.Module | None):
    """Inside the block every parameter of ``modules`` (``None`` entries are skipped) has ``requires_grad=False``;
    on exit each gets back the flag it had (so frozen bases of LoRA models stay frozen). Keep the backward pass
    inside the block: a gradient-checkpointed recomputation must see the same graph."""
    params = [p for module in modules if module is not None for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
