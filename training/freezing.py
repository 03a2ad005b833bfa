"""Freezing a network's parameters for one pass while gradients still flow through its inputs.

ADM's generator update needs exactly this (docs/method.md#adm): the fake score and the discriminator heads take part
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
    reshard_fsdp(*modules)
    params = [p for module in modules if module is not None for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        reshard_fsdp(*modules)


def reshard_fsdp(*modules) -> None:
    """FSDP2 copies a parameter's ``requires_grad`` onto its gathered (unsharded) copy only when it gathers, and
    units with ``reshard_after_forward=False`` (the root, and the tail unit accelerate carves out of the final norm,
    e.g. SD3's ``norm_out``) stay gathered after a forward that no backward follows (a ``no_grad`` pass): their next
    forward then skips the gather and keeps the old flags. Reshard every unit (``reshard`` is not recursive), so
    ``parameters()`` are the sharded ones the flags belong to and the next forward gathers with the flags just set."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return
    for module in modules:
        for sub in module.modules() if module is not None else ():
            if isinstance(sub, FSDPModule):
                sub.reshard()
