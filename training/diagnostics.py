"""Diagnostics of an ADM / DMD2 run: cheap, pure functions over tensors, meant to be logged every N steps.

They answer the questions of issue 11 (docs/method.md#gap): is the discriminator's signal there even when its sign
accuracy reads 0.5 (per noise band, and as pair order), how large the two latent predictions' difference is against
the spread of the samples, whether ADM's generator gradient still points along DMD's, how coherent the per-sample
generator gradients are across the batch, and how far (and how much as one common translation) the generator's
outputs move per update. Everything works on 2-D toy points, 4-D image latents and 5-D video latents (batch first)
and returns plain Python floats, ready for a tracker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _per_sample_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, k, ...) logits -> (B,) float64: extra dims (e.g. one logit per head or per patch) averaged."""
    logits = logits.detach().to(torch.float64)
    return logits.reshape(logits.shape[0], -1).mean(dim=1) if logits.ndim > 1 else logits


def _sign_accuracy(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Mean of "real > 0" and "fake < 0"; a logit of exactly 0 is a coin flip and counts as half right, so zero-
    initialised heads read 0.5 (the convention of ``losses.discriminator_diagnostics``)."""
    right_real = (real > 0).double() + 0.5 * (real == 0).double()
    right_fake = (fake < 0).double() + 0.5 * (fake == 0).double()
    return 0.5 * (right_real.mean() + right_fake.mean()).item()


def _pair_order(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fraction of pairs (from the same x_t) with D(real) > D(fake); ties count half, so chance reads 0.5."""
    return ((real > fake).double() + 0.5 * (real == fake).double()).mean().item()


@torch.no_grad()
def band_discriminator_diagnostics(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, t: torch.Tensor, T: float, num_bands: int = 2
) -> dict[str, float]:
    """The discriminator's sign accuracy and logit gap (mean real - mean fake), overall and per noise band.

    ``t`` (shape (B,)) is the noise level of each pair as D saw it, in [0, T]; the bands split [0, T] into
    ``num_bands`` equal intervals, band 0 the lowest noise (the last band includes T). A band with no sample reports
    nan. ``d_pair_order`` is the fraction of pairs with ``logits_real[i] > logits_fake[i]``: the pairs share one
    x_t, so D can order them well (issue 11: 60-90%) while its sign accuracy sits at 0.5.
    """
    if num_bands < 1:
        raise ValueError(f"num_bands must be >= 1, got {num_bands}.")
    real, fake = _per_sample_logits(logits_real), _per_sample_logits(logits_fake)
    if real.shape != fake.shape:
        raise ValueError(f"logits_real {tuple(real.shape)} and logits_fake {tuple(fake.shape)} differ per sample.")
    t = torch.as_tensor(t).detach().to(device=real.device, dtype=torch.float64).reshape(-1)
    if t.shape != real.shape:
        raise ValueError(f"t has {t.numel()} levels for {real.numel()} samples.")
    out = {
        "d_accuracy": _sign_accuracy(real, fake),
        "logit_gap": (real.mean() - fake.mean()).item(),
        "d_pair_order": _pair_order(real, fake),
    }
    band = (t / float(T) * num_bands).floor().clamp(0, num_bands - 1).long()
    for i in range(num_bands):
        members = band == i
        if members.any():
            out[f"d_accuracy_band{i}"] = _sign_accuracy(real[members], fake[members])
            out[f"logit_gap_band{i}"] = (real[members].mean() - fake[members].mean()).item()
        else:
            out[f"d_accuracy_band{i}"] = out[f"logit_gap_band{i}"] = math.nan
    return out


def _batch_spread(x0: torch.Tensor) -> torch.Tensor:
    """Std over the batch of each element (each coordinate / latent position), averaged over elements: how far
    apart the samples are, which is what the two predictions' difference should be compared with."""
    flat = x0.detach().to(torch.float64).reshape(x0.shape[0], -1)
    if flat.shape[0] < 2:
        return torch.tensor(math.nan, dtype=torch.float64)
    return flat.std(dim=0).mean()


@torch.no_grad()
def prediction_gap(x_real: torch.Tensor, x_fake: torch.Tensor, x0: torch.Tensor) -> dict[str, float]:
    """How far apart ADM's two latent predictions are: ``pred_gap_abs`` = mean |x_real - x_fake| per element,
    ``pred_gap_rel`` = that over the spread of the generator's samples x0 (the per-element std over the batch,
    averaged over elements; nan for a batch of one). At dt = T/64 the gap is ~0.004 per element on the SDXL digits
    teacher, which bf16 rounding of D's input can erase (docs/method.md#gap)."""
    gap = (x_real.detach().to(torch.float64) - x_fake.detach().to(torch.float64)).abs().mean()
    spread = _batch_spread(x0)
    return {"pred_gap_abs": gap.item(), "pred_gap_rel": (gap / spread).item()}


def _flatten_pairs(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]):
    if len(a) != len(b):
        raise ValueError(f"Gradient lists differ in length: {len(a)} vs {len(b)}.")
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    for x, y in pairs:
        if x.shape != y.shape:
            raise ValueError(f"Paired gradients differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}.")
    if not pairs:
        return None, None
    flat_a = torch.cat([x.detach().to(torch.float64).reshape(-1) for x, _ in pairs])
    flat_b = torch.cat([y.detach().to(torch.float64).reshape(-1).to(flat_a.device) for _, y in pairs])
    return flat_a, flat_b


@torch.no_grad()
def flat_cosine(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """Cosine between two lists of parameter gradients, each flattened into one vector (entries where either side
    is None are skipped pairwise). Used for ADM's vs DMD's generator gradient on the same batch. nan when nothing
    is paired or a side is zero (the angle is undefined)."""
    flat_a, flat_b = _flatten_pairs(a, b)
    if flat_a is None:
        return math.nan
    norms = flat_a.norm() * flat_b.norm()
    if norms == 0:
        return math.nan
    return (flat_a @ flat_b / norms).item()


@torch.no_grad()
def batch_coherence(per_sample: torch.Tensor) -> float:
    """Mean off-diagonal cosine between the rows ``flatten(per_sample[i])``, e.g. the per-sample gradients w.r.t.
    the generator's outputs. Near 1 means every sample is pushed the same way, so the update is mostly a common
    translation of the whole distribution (issue 11: ADM 0.64-0.88, DMD 0.26-0.28 on the toy). A zero row counts
    as orthogonal to the others; nan for a batch of one."""
    rows = per_sample.detach().to(torch.float64).reshape(per_sample.shape[0], -1)
    b = rows.shape[0]
    if b < 2:
        return math.nan
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
    gram = unit @ unit.T
    return ((gram.sum() - gram.diagonal().sum()) / (b * (b - 1))).item()


@torch.no_grad()
def output_shift(x_before: torch.Tensor, x_after: torch.Tensor) -> dict[str, float]:
    """How far the generator's outputs for fixed inputs moved in one update.

    ``output_shift``: mean over samples of the L2 norm of each sample's displacement; ``output_shift_common``: the
    L2 norm of the batch-mean displacement (the common translation); ``output_shift_common_fraction``: their ratio,
    in [0, 1] (1 = every sample moved by the same vector; nan if nothing moved).
    """
    if x_before.shape != x_after.shape:
        raise ValueError(f"Shapes differ: {tuple(x_before.shape)} vs {tuple(x_after.shape)}.")
    move = (x_after.detach().to(torch.float64) - x_before.detach().to(torch.float64)).reshape(x_before.shape[0], -1)
    per_sample = move.norm(dim=1).mean()
    common = move.mean(dim=0).norm()
    fraction = (common / per_sample).item() if per_sample > 0 else math.nan
    return {"output_shift": per_sample.item(), "output_shift_common": common.item(),
            "output_shift_common_fraction": fraction}


@torch.no_grad()
def generator_gradient_diagnostics(grad_x0: torch.Tensor, x0_before: torch.Tensor, x0_after: torch.Tensor,
                                   x0_real: torch.Tensor | None = None,
                                   x0_fake: torch.Tensor | None = None) -> dict[str, float]:
    """One generator update seen from its output: how coherent the per-sample gradients ``grad_x0`` are across the
    batch (ADM's move as one common translation), how far the outputs moved (the same inputs before and after the
    update), and, given the teacher's and the fake score's x0 predictions, how ``grad_x0`` relates to DMD2's
    gradient on the same samples (overall and per sample cosine)."""
    from .losses import dmd_loss

    out = {"grad_coherence": batch_coherence(grad_x0), **output_shift(x0_before, x0_after)}
    if x0_real is not None and x0_fake is not None:
        x0 = x0_before.float().clone().requires_grad_(True)
        with torch.enable_grad():
            (dmd_grad,) = torch.autograd.grad(dmd_loss(x0, x0_real.float(), x0_fake.float()).sum(), x0)
        a, b = grad_x0.float().flatten(1), dmd_grad.flatten(1)
        out["grad_cosine_adm_dmd"] = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        out["grad_cosine_adm_dmd_per_sample"] = torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item()
        out["dmd_grad_coherence"] = batch_coherence(dmd_grad)
    return out


@torch.no_grad()
def sample_specific_alignment(direction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """How much of a per-sample ``direction`` (e.g. where the generator is pushed, dD(x_fake_i)/dx) points along
    that sample's own ``target`` (e.g. its one-step gap x_real_i - x_fake_i) beyond what the whole batch shares.

    ``alignment``: the cosine per sample between ``direction_i - mean(direction)`` and ``target_i - mean(target)``,
    averaged over samples (0 for a direction that is the same for every sample, 1 for one that follows each sample's
    own target); ``alignment_shuffled``: the same against the next sample's target (a control: the level reached by a
    direction that knows the batch but not the sample); ``alignment_raw``: the cosine without removing the means;
    ``common_fraction``: ||mean(direction)|| / mean ||direction_i|| (1 = every sample pushed the same way). A sample
    whose centred direction or target is zero counts as 0 (undefined angle); nan for a batch of one (docs/adm_probe.md).
    """
    if direction.shape != target.shape:
        raise ValueError(f"Shapes differ: {tuple(direction.shape)} vs {tuple(target.shape)}.")
    d = direction.detach().to(torch.float64).reshape(direction.shape[0], -1)
    g = target.detach().to(torch.float64).reshape(target.shape[0], -1).to(d.device)
    if d.shape[0] < 2:
        return {"alignment": math.nan, "alignment_shuffled": math.nan, "alignment_raw": math.nan,
                "common_fraction": math.nan}

    def mean_cosine(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-300).mean().item()

    dc, gc = d - d.mean(dim=0), g - g.mean(dim=0)
    norms = d.norm(dim=1).mean()
    return {"alignment": mean_cosine(dc, gc), "alignment_shuffled": mean_cosine(dc, gc.roll(1, dims=0)),
            "alignment_raw": mean_cosine(d, g),
            "common_fraction": (d.mean(dim=0).norm() / norms).item() if norms > 0 else math.nan}
