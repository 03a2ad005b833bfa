"""Timestep samplers and the student's own schedule (read from the scheduler it ships with)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .parametrization import NoiseSchedule


def uniform_timesteps(batch_size: int, t_min: float, t_max: float, device=None, generator=None) -> torch.Tensor:
    """``t ~ U[t_min, t_max]`` (float, model-timestep units). ADM's noise level and ADP's discriminator level."""
    if not 0 <= t_min <= t_max:
        raise ValueError(f"Need 0 <= t_min <= t_max, got {t_min}, {t_max}.")
    u = torch.rand(batch_size, device=device, generator=generator)
    return t_min + (t_max - t_min) * u


def cubic_timesteps(batch_size: int, T: float, device=None, generator=None) -> torch.Tensor:
    """ADP's generator timestep ``t = (1 - u^3) T``, ``u ~ U[0, 1]``: biased towards high noise (docs/method.md#adp)."""
    u = torch.rand(batch_size, device=device, generator=generator)
    return (1 - u**3) * T


def student_timesteps(scheduler, num_inference_steps: int) -> torch.Tensor:
    """The timesteps the shipped scheduler will use for ``num_inference_steps``: the one source of truth for the
    student's training timesteps (docs/method.md#schedule). Float, in model-timestep units."""
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps.detach().float().cpu()
    if not torch.isfinite(timesteps).all() or len(timesteps) != num_inference_steps:
        raise ValueError(f"{type(scheduler).__name__} gives timesteps {timesteps.tolist()} for "
                         f"{num_inference_steps} steps; choose a scheduler config where every step is valid.")
    return timesteps


def renoise_mode(scheduler) -> str:
    """How the shipped scheduler moves between steps: ``fresh_noise`` (LCM/TCD, stochastic flow sampling:
    predict x0 then re-noise with new noise) or ``ode`` (DDIM/Euler/DPM-Solver order 1: deterministic)."""
    name = type(scheduler).__name__
    if name in ("LCMScheduler", "TCDScheduler") or getattr(scheduler.config, "stochastic_sampling", False):
        return "fresh_noise"
    if name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler") and \
            getattr(scheduler.config, "solver_order", 1) != 1:
        raise ValueError(f"{name} with solver_order > 1 is a multistep solver; train students for solver_order=1.")
    return "ode"


@torch.no_grad()
def backward_simulate(
    generator_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    num_steps: int,
    schedule: NoiseSchedule,
    mode: str = "ode",
) -> torch.Tensor:
    """The student's own input at step ``num_steps`` of its schedule (DMD2's backward simulation): start from pure
    noise, run the student's first ``num_steps`` steps without gradients, moving between timesteps exactly as the
    shipped scheduler does (``mode`` from :func:`renoise_mode`)."""
    if mode not in ("ode", "fresh_noise"):
        raise ValueError(f"Unknown re-noising mode {mode!r}.")
    x = noise
    batch = noise.shape[0]
    for i in range(num_steps):
        t = timesteps[i].expand(batch).to(noise.device)
        s = timesteps[i + 1].expand(batch).to(noise.device)
        x0 = generator_x0(x, t)
        if mode == "ode":
            x = schedule.ode_step(x, x0, t, s)
        else:
            x = schedule.add_noise(x0, torch.randn_like(x0), s)
    return x


def adm_noise_levels(u: torch.Tensor, min_percent: float, max_percent: float, T: float,
                     shift: float | None = None) -> torch.Tensor:
    """ADM's (and the fake score's) noise level t from ``u ~ U[0, 1]``: uniform in ``[min%, max%]`` of T, or, with
    a flow teacher's ``shift``, that sigma mapped through the shift (``shift s / (1 + (shift - 1) s)``) so the
    levels follow the distribution the teacher was trained on. Model-timestep units."""
    sigma = min_percent + (max_percent - min_percent) * u
    if shift is not None:
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return sigma * T
