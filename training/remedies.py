"""Remedies for ADM's weak, coherent discriminator signal (issue 11), as pure functions over tensors.

Each is a knob a training loop can switch on by a flag; none knows about args, accelerators or diffusers:

* the generator's step against a coherent D signal: :func:`shape_generator_gradient` (a tensor hook on the
  generator's output that normalises the per-sample gradients or removes their batch-common part);
* limits on D's slope: :func:`r1_penalty` (exact R1, or R2 on fake inputs, as in R3GAN) and
  :func:`approximate_r1_penalty` (FastGen's finite-difference R1);
* where ADM's ODE step ends: ``--ode_step_mode relative`` of :func:`dmdx.training.losses.ode_step_target` (a
  fraction of t instead of the paper's fixed dt; re-exported here);
* re-noising both latent predictions with the same fresh noise to a higher level before D (PCM's SD3
  discriminator): :func:`shared_renoise` and :func:`sample_renoise_level`.

All work on 2-D toy points, 4-D image latents and 5-D video latents (batch first) and return per-sample values
where they return a loss.
"""

from __future__ import annotations

import torch

from .parametrization import NoiseSchedule

GENERATOR_GRADIENT_MODES = ("none", "normalize", "remove_batch_mean")


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped to broadcast over ``x``."""
    norm = x.reshape(x.shape[0], -1).norm(dim=1)
    return norm.reshape((-1,) + (1,) * (x.ndim - 1))


def shape_generator_gradient(grad: torch.Tensor, mode: str) -> torch.Tensor:
    """Reshape the gradient w.r.t. the generator's output ``x0`` before it reaches the generator's parameters.

    * ``none``: unchanged.
    * ``normalize``: every sample's gradient rescaled to the batch's mean per-sample norm (a zero gradient stays
      zero), so a few samples with a steep D cannot dominate the step and the total scale is kept.
    * ``remove_batch_mean``: the batch-mean gradient is subtracted. On the faithful toy ADM's per-sample gradients
      are nearly parallel (cosine 0.64-0.88), so Adam moves the whole distribution as one translation; this keeps
      only what differs between samples. Needs a batch of at least two.

    Meant as a tensor hook: ``x0_gen.register_hook(lambda g: shape_generator_gradient(g, mode))``.
    """
    if mode not in GENERATOR_GRADIENT_MODES:
        raise ValueError(f"Unknown generator gradient mode {mode!r}; expected one of {GENERATOR_GRADIENT_MODES}.")
    if mode == "none":
        return grad
    if mode == "remove_batch_mean":
        if grad.shape[0] < 2:
            raise ValueError("generator gradient mode 'remove_batch_mean' needs a batch of at least 2 samples "
                             "(with one sample it removes the whole gradient).")
        return grad - grad.mean(dim=0, keepdim=True)
    work = grad.to(torch.promote_types(grad.dtype, torch.float32))  # half-precision norms overflow
    norm = _per_sample_norm(work)
    scale = torch.where(norm > 0, norm.mean() / norm.clamp_min(torch.finfo(work.dtype).tiny), torch.zeros_like(norm))
    return (work * scale).to(grad.dtype)


def _logits_per_sample(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(logits.shape[0], -1)


def approximate_r1_penalty(logits_clean: torch.Tensor, logits_perturbed: torch.Tensor) -> torch.Tensor:
    """FastGen's approximate R1, per sample: the mean squared change of D's logits under a small input perturbation,
    ``mean_k (D(x + alpha * noise) - D(x))^2`` (the caller computes both logits; FastGen uses alpha = 0.1 and a
    weight of 100-1000). About ``alpha^2 ||dD/dx||^2`` for small alpha, with no double backward. Gradients flow into
    both logits; detach ``logits_clean`` to penalise only the perturbed side."""
    if logits_clean.shape != logits_perturbed.shape:
        raise ValueError(f"Logit shapes differ: {tuple(logits_clean.shape)} vs {tuple(logits_perturbed.shape)}.")
    change = _logits_per_sample(logits_perturbed.float()) - _logits_per_sample(logits_clean.float())
    return (change**2).mean(dim=1)


def r1_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Exact R1 per sample: ``||dD(x)/dx||^2`` summed over the input's elements (``inputs`` must require grad and
    ``logits`` be computed from it; extra logit dims are summed first). On real inputs this is R1, on fake inputs
    R2 (R3GAN uses both). The graph is kept (``create_graph=True``) so the penalty trains D. The sum over the batch
    is differentiated once, which gives every sample's own gradient as long as D treats samples independently
    (no batch norm)."""
    if not inputs.requires_grad:
        raise ValueError("r1_penalty needs inputs that require grad (call inputs.requires_grad_() before D).")
    (grad,) = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
    return grad.float().reshape(grad.shape[0], -1).pow(2).sum(dim=1)


def sample_renoise_level(s: torch.Tensor, T: float, min_fraction: float, generator=None) -> torch.Tensor:
    """Per sample, a level ``t' ~ U[max(s, min_fraction * T), T)`` to re-noise the two predictions to.

    Uniform up to T, like ADP's re-noising level (docs/method.md#adp): high levels give D overlapping inputs (smooth
    gradients), low ones keep detail. ``min_fraction`` sets a floor for PCM-style "always noisier" re-noising;
    the level never goes below ``s``, since noise can only be added.
    """
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}.")
    s = torch.as_tensor(s)
    s = s if s.is_floating_point() else s.float()
    low = s.clamp_min(min_fraction * T).clamp_max(T)
    u = torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype)
    return low + (T - low) * u


def shared_renoise(
    x_real: torch.Tensor,
    x_fake: torch.Tensor,
    schedule: NoiseSchedule,
    s: torch.Tensor,
    t_renoise: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-noise both ODE-step outputs from level ``s`` to ``t_renoise >= s`` with the **same** ``noise``
    (PCM's SD3 discriminator): the forward process from s to t', for VP and flow alike,

        x_{t'} = (a_{t'} / a_s) x_s + sqrt(sig_{t'}^2 - (a_{t'} / a_s)^2 sig_s^2) * noise,

    so an ``x_s = a_s x0 + sig_s n`` becomes a sample of ``a_{t'} x0 + sig_{t'} n'``. At s = 0 on a flow schedule
    this is ``schedule.add_noise(x_0, noise, t')``. Sharing the noise keeps the pair's difference (scaled by
    a_{t'}/a_s) the only thing that differs. Gradients flow through both inputs.
    """
    s = torch.as_tensor(s).to(x_real.device)
    t_renoise = torch.as_tensor(t_renoise).to(x_real.device)
    if (t_renoise < s).any():
        raise ValueError("shared_renoise can only add noise: every t_renoise must be >= s.")
    alpha_s, sigma_s = schedule.alpha_sigma(s, ndim=x_real.ndim, dtype=torch.float64)
    alpha_r, sigma_r = schedule.alpha_sigma(t_renoise, ndim=x_real.ndim, dtype=torch.float64)
    if (alpha_s <= 0).any():
        raise ValueError("shared_renoise needs a_s > 0 (s below the pure-noise end of the schedule).")
    ratio = alpha_r / alpha_s
    added_std = (sigma_r**2 - ratio**2 * sigma_s**2).clamp_min(0).sqrt()
    ratio, added_std = ratio.to(x_real.dtype), added_std.to(x_real.dtype)
    added = added_std * noise.to(x_real.dtype)
    return ratio * x_real + added, ratio * x_fake.to(x_real.dtype) + added
