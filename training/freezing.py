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


def _adapter_state(module: nn.Module) -> list:
    """Which peft LoRA adapters each layer of ``module`` runs now (the roles sharing one base switch them)."""
    return [(m, m._disable_adapters, m._active_adapter) for m in module.modules()
            if hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters")]


def _set_adapter_state(state: list) -> None:
    for m, disabled, active in state:
        m._disable_adapters, m._active_adapter = disabled, active


def role_preserving_checkpoint(block: nn.Module, *args):
    """diffusers' ``gradient_checkpointing_func`` (torch.utils.checkpoint, non-reentrant, as diffusers' default), whose
    recomputation in the backward runs the block under the LoRA adapters that were active in its forward. Roles that
    share one base switch its adapters between passes; without this a block of one role would be recomputed under
    whichever role ran last."""
    import torch.utils.checkpoint

    state = _adapter_state(block)

    def run(*inputs):
        now = _adapter_state(block)
        _set_adapter_state(state)
        try:
            return block(*inputs)
        finally:
            _set_adapter_state(now)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def _checkpoint_flags(module: nn.Module) -> list:
    return [m for m in module.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]


def _prepare(module: nn.Module) -> None:
    """Install :func:`role_preserving_checkpoint` as the checkpointing function of every block of a diffusers model (a
    LoRA base included), leaving the blocks' on/off flags as they were."""
    flags = _checkpoint_flags(module)
    if all(getattr(m, "_gradient_checkpointing_func", None) is role_preserving_checkpoint for m in flags):
        return
    saved = [(m, m.gradient_checkpointing) for m in flags]
    module.enable_gradient_checkpointing(role_preserving_checkpoint)
    for m, flag in saved:
        m.gradient_checkpointing = flag


@contextmanager
def checkpointed_passes(*modules):
    """Inside the block every pass with gradients enabled through ``modules`` (diffusers models, or LoRA views on one;
    ``None`` skipped) checkpoints its blocks, with the parameters frozen too: the activations of a frozen pass that
    carries a gradient to its input (ADM's generator update: the fake score's ODE step, the discriminator's backbone)
    are recomputed in the backward instead of kept (docs/memory.md). Passes without gradients are unaffected. Keep
    the backward inside the block; on exit every flag is what it was."""
    views = [m for m in modules if m is not None and hasattr(m, "checkpoint_frozen")]
    plain = [m for m in modules if m is not None and not hasattr(m, "checkpoint_frozen")]
    for module in {id(m): m for m in [*plain, *(v.base for v in views)]}.values():
        _prepare(module)
    saved_views = [(v, v.checkpoint_frozen) for v in views]
    saved_flags = [(m, m.gradient_checkpointing) for module in plain for m in _checkpoint_flags(module)]
    for m, _ in saved_flags:
        m.gradient_checkpointing = True
    for v, _ in saved_views:
        v.checkpoint_frozen = True
    try:
        yield
    finally:
        for m, flag in saved_flags:
            m.gradient_checkpointing = flag
        for v, flag in saved_views:
            v.checkpoint_frozen = flag
