"""Prediction-type algebra: the one place that knows how x_t, x0, noise and model outputs relate.

Every diffusion model here is written as ``x_t = alpha_t * x0 + sigma_t * noise`` with ``t`` in the model's own
timestep units (``0 <= t <= T``, ``T = num_train_timesteps``), i.e. the value passed to the network:

* ``vp`` (DDPM family: SDXL, CogVideoX): ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` with
  ``abar`` read from the scheduler's ``alphas_cumprod`` and linearly interpolated between integer steps, so
  that ``t - T/64`` is defined and integer ``t`` agrees with diffusers exactly.
* ``flow`` (rectified flow: SD3, and the DMDX one-step student): ``sigma_t = t / T``, ``alpha_t = 1 - sigma_t``.
  diffusers' flow schedulers feed the network ``timestep = sigma * T``, so this is the same convention.

Prediction types: ``epsilon``, ``v_prediction`` (``v = alpha * noise - sigma * x0``), ``flow``
(``v = noise - x0``; diffusers' ``flow_prediction``) and ``sample`` (x0 directly). Anything else raises.

A deterministic probability-flow ODE step from ``t`` to ``s`` (DDIM for ``vp``, Euler for ``flow``) is, in both
families, ``x_s = alpha_s * x0_hat + sigma_s * noise_hat`` with ``(x0_hat, noise_hat)`` predicted at ``(x_t, t)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow", "sample")

# Scheduler classes whose noise schedule is the DDPM (variance-preserving) one, described by betas.
_VP_SCHEDULERS = {
    "DDPMScheduler",
    "DDIMScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DEISMultistepScheduler",
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
}
_FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}


def normalize_prediction_type(prediction_type: str) -> str:
    """Map diffusers' names onto ours (``flow_prediction`` -> ``flow``); raise on anything unknown."""
    name = {"flow_prediction": "flow", "velocity": "flow"}.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")
    return name


@dataclass
class NoiseSchedule:
    """``alpha_t`` and ``sigma_t`` of one model family, as functions of the model timestep ``t``."""

    kind: str  # "vp" or "flow"
    num_train_timesteps: int
    prediction_type: str
    alphas_cumprod: torch.Tensor | None = None  # vp only, float64, length num_train_timesteps
    shift: float = 1.0  # flow only: the teacher's timestep shift (for sampling noise levels like it was trained)

    def __post_init__(self):
        if self.kind not in ("vp", "flow"):
            raise ValueError(f"Unknown schedule kind {self.kind!r}; expected 'vp' or 'flow'.")
        self.prediction_type = normalize_prediction_type(self.prediction_type)
        if self.kind == "vp" and self.alphas_cumprod is None:
            raise ValueError("A 'vp' schedule needs alphas_cumprod.")

    @property
    def T(self) -> float:
        return float(self.num_train_timesteps)

    def alpha_sigma(self, t: torch.Tensor, ndim: int | None = None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients at timesteps ``t`` (shape (B,)), reshaped to broadcast over ``ndim``-D samples."""
        t = torch.as_tensor(t)
        t64 = t.detach().to(torch.float64)
        if self.kind == "flow":
            sigma = t64 / self.T
            alpha = 1.0 - sigma
        else:
            acp = self.alphas_cumprod.to(t64.device)
            pos = t64.clamp(0, len(acp) - 1)
            lo = pos.floor().long()
            hi = (lo + 1).clamp(max=len(acp) - 1)
            frac = pos - lo.to(torch.float64)
            abar = acp[lo] * (1 - frac) + acp[hi] * frac
            alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        dtype = dtype or (t.dtype if t.is_floating_point() else torch.float32)
        alpha, sigma = alpha.to(dtype), sigma.to(dtype)
        if ndim is not None:
            shape = (-1,) + (1,) * (ndim - 1)
            alpha, sigma = alpha.reshape(shape), sigma.reshape(shape)
        return alpha, sigma

    # ---- the algebra -------------------------------------------------------------------------------------------
    def _coefs(self, t, like: torch.Tensor):
        return self.alpha_sigma(t.to(like.device), ndim=like.ndim, dtype=like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._coefs(t, x0)
        return alpha * x0 + sigma * noise

    def to_x0_noise(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """``(x0_hat, noise_hat)`` from a raw model output at ``(x_t, t)``."""
        alpha, sigma = self._coefs(t, x_t)
        p = self.prediction_type
        if p == "epsilon":
            noise = model_output
            x0 = (x_t - sigma * noise) / alpha
        elif p == "v_prediction":  # valid for any (alpha, sigma): x_t = a x0 + s n, v = a n - s x0
            norm = alpha**2 + sigma**2
            x0 = (alpha * x_t - sigma * model_output) / norm
            noise = (sigma * x_t + alpha * model_output) / norm
        elif p == "flow":  # v = noise - x0 and x_t = a x0 + s noise  =>  x0 = (x_t - s v) / (a + s)
            x0 = x_t - sigma * model_output
            noise = x_t + alpha * model_output
            if self.kind != "flow":  # a + s == 1 on a flow schedule; a flow-prediction model on a vp schedule
                x0, noise = x0 / (alpha + sigma), noise / (alpha + sigma)
        else:  # sample
            x0 = model_output
            noise = (x_t - alpha * x0) / sigma
        return x0, noise

    def x0_to_noise(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by an x0 prediction at ``(x_t, t)``."""
        alpha, sigma = self._coefs(t, x_t)
        return (x_t - alpha * x0) / sigma

    def model_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output at ``add_noise(x0, noise, t)``: the denoising-loss target."""
        p = self.prediction_type
        if p == "epsilon":
            return noise
        if p == "flow":
            return noise - x0
        if p == "sample":
            return x0
        alpha, sigma = self._coefs(t, x0)
        return alpha * noise - sigma * x0

    def ode_step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """One deterministic PF-ODE step from ``t`` to ``s`` given the x0 prediction at ``(x_t, t)``.

        DDIM (eta = 0) for ``vp``; for ``flow`` this equals Euler ``x_t + (sigma_s - sigma_t) * v``.
        """
        noise_hat = self.x0_to_noise(x0_hat, x_t, t)
        return self.add_noise(x0_hat, noise_hat, s)


def schedule_from_scheduler_config(config: Mapping[str, Any] | Any) -> NoiseSchedule:
    """Read the noise schedule of a diffusers scheduler (never re-derived by hand).

    ``config`` is a scheduler object, or its config as a mapping: ``SchedulerClass.load_config(...)`` (which names
    the class in ``_class_name``) or ``scheduler.config`` (which does not; then the class is read from the keys
    only diffusers' flow-match and CogVideoX schedulers have, and otherwise taken to be ``DDPMScheduler``).
    The DDPM family's ``alphas_cumprod`` comes from diffusers' own scheduler of that class, built from the config.
    A DPM-Solver/UniPC config with ``use_flow_sigmas`` describes a flow model, as the DMDX one-step student's
    scheduler does.
    """
    if not isinstance(config, Mapping) and hasattr(config, "config"):  # a scheduler object
        class_name = type(config).__name__
        config = dict(config.config)
    else:
        config = dict(config)
        class_name = config.get("_class_name", "")
        if not class_name and "shift" in config and "beta_schedule" not in config:
            class_name = "FlowMatchEulerDiscreteScheduler"
        elif not class_name and "snr_shift_scale" in config:
            class_name = "CogVideoXDDIMScheduler"
    T = int(config.get("num_train_timesteps", 1000))
    if class_name in _FLOW_SCHEDULERS or config.get("use_flow_sigmas", False):
        prediction_type = config.get("prediction_type", "flow_prediction")
        if prediction_type == "epsilon" and class_name in _FLOW_SCHEDULERS:
            prediction_type = "flow"  # flow-match schedulers carry no prediction_type; they are velocity models
        shift = float(config.get("shift", config.get("flow_shift", 1.0)) or 1.0)
        return NoiseSchedule("flow", T, prediction_type, shift=shift)
    if class_name and class_name not in _VP_SCHEDULERS:
        raise ValueError(f"Unsupported scheduler class {class_name!r}: cannot read its noise schedule.")
    import diffusers

    # Build the named class itself from the config and take its alphas_cumprod: classes differ in how they turn the
    # beta settings into it (CogVideoX's schedulers apply an SNR shift, ``snr_shift_scale``, and rescale to zero
    # terminal SNR on alphas_cumprod rather than on betas), so a DDPMScheduler rebuilt from the betas can be wrong.
    scheduler_cls = getattr(diffusers, class_name) if class_name else diffusers.DDPMScheduler
    scheduler = scheduler_cls.from_config(config)
    return NoiseSchedule(
        "vp", T, config.get("prediction_type", "epsilon"),
        alphas_cumprod=torch.as_tensor(scheduler.alphas_cumprod).to(torch.float64),
    )


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance. Linear, so it is the same on raw outputs or on x0 at a fixed ``(x_t, t)``."""
    return uncond + guidance_scale * (cond - uncond)
