"""Prediction-type algebra (dmdx.training.parametrization): round trips, and agreement with diffusers' own
schedulers in float64."""

import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from dmdx.training import (
    PREDICTION_TYPES,
    NoiseSchedule,
    apply_cfg,
    normalize_prediction_type,
    schedule_from_scheduler_config,
)

SDXL_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
COGVIDEOX = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
                 set_alpha_to_one=True, clip_sample=False, timestep_spacing="trailing")
F64 = torch.float64


def vp_schedule(prediction_type):
    return schedule_from_scheduler_config(dict(SDXL_BETAS, prediction_type=prediction_type,
                                               _class_name="DDPMScheduler"))


def flow_schedule(prediction_type):
    return NoiseSchedule("flow", 1000, prediction_type)


@pytest.mark.parametrize("make", [vp_schedule, flow_schedule], ids=["vp", "flow"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("shape", [(6, 3), (6, 4, 5, 5), (6, 4, 2, 3, 3)], ids=["2d", "4d", "5d"])
def test_round_trip(make, prediction_type, shape):
    schedule = make(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    t = torch.tensor([1.0, 17.5, 250.0, 500.25, 811.0, 998.0], dtype=F64)
    x_t = schedule.add_noise(x0, noise, t)
    out = schedule.model_target(x0, noise, t)
    x0_hat, noise_hat = schedule.to_x0_noise(out, x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(noise_hat, noise, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.x0_to_noise(x0, x_t, t), noise, rtol=1e-9, atol=1e-9)
    # An exact x0 keeps the ODE on the sample's own line: x_s = alpha_s x0 + sigma_s noise.
    s = t * 0.5
    torch.testing.assert_close(schedule.ode_step(x_t, x0, t, s), schedule.add_noise(x0, noise, s))


def test_unknown_types_raise():
    with pytest.raises(ValueError, match="Unknown prediction type"):
        NoiseSchedule("flow", 1000, "x0_and_noise")
    with pytest.raises(ValueError, match="Unknown prediction type"):
        normalize_prediction_type("v")
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule("ve", 1000, "epsilon")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule("vp", 1000, "epsilon")
    with pytest.raises(ValueError, match="Unsupported scheduler class"):
        schedule_from_scheduler_config({"_class_name": "KarrasVeScheduler", "num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="Unknown prediction type"):
        schedule_from_scheduler_config(dict(SDXL_BETAS, _class_name="DDIMScheduler", prediction_type="foo"))
    assert normalize_prediction_type("flow_prediction") == "flow"


def test_add_noise_and_velocity_match_ddpm():
    scheduler = DDPMScheduler(**SDXL_BETAS, prediction_type="v_prediction")
    schedule = schedule_from_scheduler_config(scheduler)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g, dtype=F64), torch.randn(5, 4, 8, 8, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 400, 873, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedule.model_target(x0, noise, t), scheduler.get_velocity(x0, noise, t),
                               rtol=1e-12, atol=1e-12)


def test_fractional_vp_timesteps_interpolate():
    schedule = vp_schedule("epsilon")
    a, s = schedule.alpha_sigma(torch.tensor([10.0, 10.5, 11.0], dtype=F64))
    acp = schedule.alphas_cumprod
    torch.testing.assert_close(a**2, torch.stack([acp[10], 0.5 * (acp[10] + acp[11]), acp[11]]))
    torch.testing.assert_close(a**2 + s**2, torch.ones(3, dtype=F64))


def test_scale_noise_matches_flow_match():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    schedule = schedule_from_scheduler_config(scheduler.config)  # a nameless config is still read as flow
    assert (schedule.kind, schedule.prediction_type, schedule.shift) == ("flow", "flow", 3.0)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(1, 4, 6, 6, generator=g, dtype=F64), torch.randn(1, 4, 6, 6, generator=g, dtype=F64)
    for t in scheduler.timesteps:
        expected = scheduler.scale_noise(x0, t[None], noise)
        torch.testing.assert_close(schedule.add_noise(x0, noise, t[None].to(F64)), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ode_step_matches_ddim(prediction_type, spacing):
    scheduler = DDIMScheduler(**SDXL_BETAS, prediction_type=prediction_type, set_alpha_to_one=False,
                              clip_sample=False, steps_offset=1, timestep_spacing=spacing)
    schedule = schedule_from_scheduler_config(scheduler)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=F64)
    step = scheduler.config.num_train_timesteps // 4
    for t in scheduler.timesteps:
        out = torch.randn(x.shape, generator=g, dtype=F64)
        expected = scheduler.step(out, t, x, eta=0.0).prev_sample
        tt = t.to(F64).expand(2)
        s = (tt - step).clamp_min(0)  # set_alpha_to_one=False: the last step lands on alphas_cumprod[0]
        x0_hat = schedule.to_x0_noise(out, x, tt)[0]
        ours = schedule.ode_step(x, x0_hat, tt, s)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_ode_step_matches_flow_match_euler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = schedule_from_scheduler_config(dict(scheduler.config, _class_name="FlowMatchEulerDiscreteScheduler"))
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=F64)
    for i, t in enumerate(scheduler.timesteps):
        out = torch.randn(x.shape, generator=g, dtype=F64)
        expected = scheduler.step(out, t, x).prev_sample
        tt = t.to(F64).expand(2)
        s = (scheduler.sigmas[i + 1].to(F64) * 1000).expand(2)
        ours = schedule.ode_step(x, schedule.to_x0_noise(out, x, tt)[0], tt, s)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        x = expected
    assert scheduler.sigmas[-1] == 0


@pytest.mark.parametrize("num_steps", [1, 4])
def test_ode_step_matches_dpm_solver_flow(num_steps):
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                                            solver_order=1, final_sigmas_type="zero", timestep_spacing="trailing")
    schedule = schedule_from_scheduler_config(scheduler)
    assert (schedule.kind, schedule.prediction_type, schedule.shift) == ("flow", "flow", 3.0)
    scheduler.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=F64)
    for i, t in enumerate(scheduler.timesteps):
        out = torch.randn(x.shape, generator=g, dtype=F64)
        expected = scheduler.step(out, t, x).prev_sample
        tt = (scheduler.sigmas[i].to(F64) * 1000).expand(2)
        s = (scheduler.sigmas[i + 1].to(F64) * 1000).expand(2)
        ours = schedule.ode_step(x, schedule.to_x0_noise(out, x, tt)[0], tt, s)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_schedule_from_configs():
    ddim = DDIMScheduler(**SDXL_BETAS, set_alpha_to_one=False, clip_sample=False)
    for config in (ddim, ddim.config, dict(ddim.config, _class_name="DDIMScheduler")):
        schedule = schedule_from_scheduler_config(config)
        assert (schedule.kind, schedule.prediction_type) == ("vp", "epsilon")
        torch.testing.assert_close(schedule.alphas_cumprod, ddim.alphas_cumprod.to(F64), rtol=0, atol=0)
    # Euler with zero-terminal SNR keeps its own (non-zero) last alphas_cumprod
    euler = EulerDiscreteScheduler(**SDXL_BETAS, rescale_betas_zero_snr=True)
    torch.testing.assert_close(schedule_from_scheduler_config(euler).alphas_cumprod, euler.alphas_cumprod.to(F64))


def test_cogvideox_zero_snr_v_prediction():
    scheduler = CogVideoXDDIMScheduler(**COGVIDEOX)
    for config in (scheduler, scheduler.config, dict(scheduler.config, _class_name="CogVideoXDDIMScheduler")):
        schedule = schedule_from_scheduler_config(config)
        assert (schedule.kind, schedule.prediction_type) == ("vp", "v_prediction")
        # snr_shift_scale and the zero-SNR rescaling act on alphas_cumprod: a DDPMScheduler would miss the shift
        torch.testing.assert_close(schedule.alphas_cumprod, scheduler.alphas_cumprod.to(F64), rtol=0, atol=1e-12)
    assert schedule.alphas_cumprod[-1] == 0
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(3, 4, 2, 4, 4, generator=g, dtype=F64), torch.randn(3, 4, 2, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(schedule.model_target(x0, noise, t), scheduler.get_velocity(x0, noise, t))
    # at zero SNR (t = 999, alpha = 0) v-prediction still recovers x0 and noise
    x0_hat, noise_hat = schedule.to_x0_noise(schedule.model_target(x0, noise, t), schedule.add_noise(x0, noise, t), t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(noise_hat, noise)


def test_alpha_sigma_dtype_and_cfg():
    schedule = flow_schedule("flow")
    a, s = schedule.alpha_sigma(torch.tensor([250, 750]), ndim=4, dtype=torch.bfloat16)
    assert a.shape == (2, 1, 1, 1) and a.dtype == torch.bfloat16
    torch.testing.assert_close(s.flatten().float(), torch.tensor([0.25, 0.75]))
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    torch.testing.assert_close(apply_cfg(cond, uncond, 1.0), cond)
    torch.testing.assert_close(apply_cfg(cond, uncond, 5.0), torch.tensor([6.0]))
