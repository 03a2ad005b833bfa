"""The losses of ADM, ADP and DMD2, as small pure functions over tensors.

Every loss returns **one value per sample** (shape ``(B,)``) and works on any sample shape (2-D toy points,
4-D image latents, 5-D video latents). Where a loss needs a network it takes a callable built by the script
(``denoise(x_t, t) -> x0``, as k-diffusion does) so nothing here knows about diffusers model classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .parametrization import NoiseSchedule

ODE_STEP_MODES = ("fixed", "relative")  # --ode_step_mode

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> x0_hat


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


# ---- GAN terms (ADM and ADP) ------------------------------------------------------------------------------------
def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``max(0, 1 - D(real)) + max(0, 1 + D(fake))`` per sample (paper Eq. for L_GAN(tau)). Logits with more than
    one value per sample (per-position heads: (B, heads, *map)) take the hinge per position, then the mean per
    sample (docs/adm_probe.md)."""
    if logits_real.shape != logits_fake.shape:
        raise ValueError(f"logits_real {tuple(logits_real.shape)} and logits_fake {tuple(logits_fake.shape)} differ.")
    loss = F.relu(1.0 - logits_real) + F.relu(1.0 + logits_fake)
    return per_sample_mean(loss) if loss.ndim > 1 else loss


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``-D(fake)`` per sample (paper Eq. for L_GAN(theta)); per-position logits: the mean over positions."""
    return -per_sample_mean(logits_fake) if logits_fake.ndim > 1 else -logits_fake


# ---- ADM --------------------------------------------------------------------------------------------------------
def adm_latent_predictions(
    x_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    real_denoise: Denoiser,
    fake_denoise: Denoiser,
    schedule: NoiseSchedule,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PF-ODE step ``t -> s`` from the **same** ``x_t`` with the real (teacher, CFG inside ``real_denoise``)
    and the fake score: the two "latent predictions" ADM's discriminator compares (docs/method.md#ode-step)."""
    x_real = schedule.ode_step(x_t, real_denoise(x_t, t), t, s)
    x_fake = schedule.ode_step(x_t, fake_denoise(x_t, t), t, s)
    return x_real, x_fake


def ode_step_target(t: torch.Tensor, dt: float, T: float, mode: str) -> torch.Tensor:
    """The level ``s`` where ADM's one PF-ODE step from ``t`` ends, clamped at 0.

    * ``fixed``: ``s = t - dt * T`` (the paper: dt = 1/64);
    * ``relative``: ``s = t * (1 - dt)``: the step is a fraction of t, so low-noise steps are small where the two
      predictions already differ most. ``dt = 1/32`` matches the fixed T/64 step on average over t ~ U[0, T].
    """
    if mode not in ODE_STEP_MODES:
        raise ValueError(f"Unknown ODE step mode {mode!r}; expected one of {ODE_STEP_MODES}.")
    if not 0 < dt <= 1:
        raise ValueError(f"dt is a fraction of T (fixed) or of t (relative) in (0, 1], got {dt}.")
    t = torch.as_tensor(t)
    t = t if t.is_floating_point() else t.float()
    s = t - dt * T if mode == "fixed" else t * (1 - dt)
    return s.clamp_min(0)


def fake_score_denoising_loss(
    model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """Ordinary denoising loss of the fake score on (detached) generator samples, in the model's own
    prediction type: ``mean ||output - target||^2`` per sample."""
    target = schedule.model_target(x0.detach(), noise, t)
    return per_sample_mean((model_output.float() - target.float()) ** 2)


# ---- DMD2 baseline ----------------------------------------------------------------------------------------------
def dmd_loss(x0_gen: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's distribution-matching loss in its normalised form, per sample.

    ``p_real = x0 - x0_real``, ``p_fake = x0 - x0_fake``, ``grad = (p_real - p_fake) / mean|p_real|`` (mean per
    sample over all non-batch dims, measured from the generator's clean output ``x0``), and
    ``loss = 0.5 * ||x0 - sg(x0 - grad)||^2`` (mean over elements), whose gradient w.r.t. ``x0`` is ``grad / N``.
    """
    x0_gen_f = x0_gen.float()
    with torch.no_grad():
        p_real = x0_gen_f - x0_real.float()
        p_fake = x0_gen_f - x0_fake.float()
        normaliser = per_sample_mean(p_real.abs()).clamp_min(1e-8)
        normaliser = normaliser.reshape((-1,) + (1,) * (x0_gen.ndim - 1))
        grad = torch.nan_to_num((p_real - p_fake) / normaliser)
        target = x0_gen_f - grad
    return 0.5 * per_sample_mean((x0_gen_f - target) ** 2)


# ---- ADP (one-step pre-training on teacher ODE pairs) ---------------------------------------------------------
def interpolate_ode_pair(noise: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """Linear interpolation ``x_t = (1 - t/T) x0 + (t/T) noise`` of a teacher ODE pair (rectified-flow style)."""
    s = (t.to(x0.dtype) / T).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1 - s) * x0 + s * noise


def ode_pair_velocity(noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The velocity of an ODE pair on its straight line: ``noise - x0``."""
    return noise - x0


def adp_generator_loss(
    logits_latent_fake: torch.Tensor,
    logits_pixel_fake: torch.Tensor | None,
    latent_weight: float = 0.85,
    pixel_weight: float = 0.15,
) -> torch.Tensor:
    """``-(lambda1 * D_latent(fake) + lambda2 * D_pixel(fake))`` per sample; the pixel term is optional."""
    loss = latent_weight * generator_adversarial_loss(logits_latent_fake)
    if logits_pixel_fake is not None:
        loss = loss + pixel_weight * generator_adversarial_loss(logits_pixel_fake)
    return loss


def adp_discriminator_loss(
    logits_latent_real: torch.Tensor,
    logits_latent_fake: torch.Tensor,
    logits_pixel_real: torch.Tensor | None = None,
    logits_pixel_fake: torch.Tensor | None = None,
    latent_weight: float = 0.85,
    pixel_weight: float = 0.15,
) -> torch.Tensor:
    """Weighted hinge losses of the latent and pixel discriminators, per sample."""
    loss = latent_weight * hinge_discriminator_loss(logits_latent_real, logits_latent_fake)
    if logits_pixel_real is not None:
        loss = loss + pixel_weight * hinge_discriminator_loss(logits_pixel_real, logits_pixel_fake)
    return loss


def velocity_regression_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """Optional ADP warm-up term (paper ambiguous, off by default): ``mean ||v_pred - v_target||^2``."""
    return per_sample_mean((v_pred.float() - v_target.float()) ** 2)


# ---- diagnostics ------------------------------------------------------------------------------------------------
@torch.no_grad()
def discriminator_diagnostics(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> dict[str, float]:
    """Mean logits, their gap, and the discriminator's accuracy (real > 0, fake < 0): the first thing to look at,
    since ADM's discriminator signal can sit near chance (docs/method.md#gap)."""
    real, fake = logits_real.float(), logits_fake.float()
    # A logit of exactly 0 (zero-initialised heads) is a coin flip, counted as half right, so chance reads 0.5.
    right_real = (real > 0).float() + 0.5 * (real == 0).float()
    right_fake = (fake < 0).float() + 0.5 * (fake == 0).float()
    accuracy = 0.5 * (right_real.mean() + right_fake.mean())
    return {
        "logits_real": real.mean().item(),
        "logits_fake": fake.mean().item(),
        "logit_gap": (real.mean() - fake.mean()).item(),
        "d_accuracy": accuracy.item(),
    }
