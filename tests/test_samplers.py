"""Timestep samplers, the student's schedule read from its scheduler, and backward simulation."""

import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)

from dmdx.training import (
    NoiseSchedule,
    backward_simulate,
    cubic_timesteps,
    renoise_mode,
    schedule_from_scheduler_config,
    student_timesteps,
    uniform_timesteps,
)

SDXL_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DPM_FLOW = dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", solver_order=1,
                final_sigmas_type="zero", timestep_spacing="trailing")


def test_uniform_timesteps_range_and_errors():
    g = torch.Generator().manual_seed(0)
    t = uniform_timesteps(20_000, 15.625, 980.0, generator=g)
    assert t.shape == (20_000,) and t.min() >= 15.625 and t.max() <= 980.0
    assert t.mean().item() == pytest.approx((15.625 + 980) / 2, rel=0.02)
    assert torch.equal(uniform_timesteps(8, 0, 1000, generator=torch.Generator().manual_seed(1)),
                       uniform_timesteps(8, 0, 1000, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError):
        uniform_timesteps(4, 500, 100)
    with pytest.raises(ValueError):
        uniform_timesteps(4, -1, 100)


def test_cubic_timesteps_bias_to_high_noise():
    t = cubic_timesteps(200_000, 1000.0, generator=torch.Generator().manual_seed(2))
    assert t.min() >= 0 and t.max() <= 1000
    # E[1 - u^3] = 3/4; the standard error at 2e5 samples is ~6e-4
    assert (t / 1000).mean().item() == pytest.approx(0.75, abs=5e-3)
    # P(t/T > 1/2) = P(u^3 < 1/2) = 2^(-1/3)
    assert (t > 500).float().mean().item() == pytest.approx(2 ** (-1 / 3), abs=5e-3)


def test_student_timesteps_from_shipped_schedulers():
    lcm = LCMScheduler(**SDXL_BETAS, original_inference_steps=4)
    assert student_timesteps(lcm, 4).tolist() == [999, 749, 499, 249]
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.25)
    expected = torch.tensor([1.0, 0.8923077, 0.6989247, 0.25]) * 1000
    torch.testing.assert_close(student_timesteps(flow, 4), expected, rtol=1e-5, atol=1e-3)
    dpm = DPMSolverMultistepScheduler(**DPM_FLOW)
    assert student_timesteps(dpm, 1).tolist() == [999]
    euler = EulerDiscreteScheduler(**SDXL_BETAS, timestep_spacing="trailing")
    assert student_timesteps(euler, 1).tolist() == [999]
    cog = CogVideoXDDIMScheduler(timestep_spacing="trailing")
    assert student_timesteps(cog, 8).tolist() == [999, 874, 749, 624, 499, 374, 249, 124]
    out = student_timesteps(lcm, 4)
    assert out.dtype == torch.float32 and out.device.type == "cpu"


def test_renoise_mode_per_scheduler():
    assert renoise_mode(LCMScheduler(**SDXL_BETAS)) == "fresh_noise"
    assert renoise_mode(TCDScheduler(**SDXL_BETAS)) == "fresh_noise"
    assert renoise_mode(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)) == "fresh_noise"
    assert renoise_mode(FlowMatchEulerDiscreteScheduler(shift=3.0)) == "ode"
    assert renoise_mode(DDIMScheduler(**SDXL_BETAS)) == "ode"
    assert renoise_mode(EulerDiscreteScheduler(**SDXL_BETAS)) == "ode"
    assert renoise_mode(CogVideoXDDIMScheduler()) == "ode"
    assert renoise_mode(DPMSolverMultistepScheduler(**DPM_FLOW)) == "ode"
    with pytest.raises(ValueError, match="solver_order"):
        renoise_mode(DPMSolverMultistepScheduler(**dict(DPM_FLOW, solver_order=2)))


def _oracle(x0):
    """A generator that always returns the true x0, whatever its input."""
    calls = []

    def generator_x0(x, t):
        calls.append((x.clone(), t.clone()))
        return x0

    return generator_x0, calls


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_backward_simulate_ode_with_exact_oracle(kind):
    if kind == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.25)
        schedule = NoiseSchedule("flow", 1000, "flow")
    else:
        scheduler = DDIMScheduler(**SDXL_BETAS, timestep_spacing="trailing")
        schedule = schedule_from_scheduler_config(scheduler)
    timesteps = student_timesteps(scheduler, 4)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    t0 = timesteps[0].expand(2).to(torch.float64)
    implied = schedule.x0_to_noise(x0, noise, t0)  # the noise the start point implies, kept by every ODE step
    if kind == "flow":
        torch.testing.assert_close(implied, noise)  # t0 = T: pure noise
    for k in range(4):
        oracle, calls = _oracle(x0)
        out = backward_simulate(oracle, noise, timesteps, k, schedule, mode="ode")
        tk = timesteps[k].expand(2).to(torch.float64)
        expected = noise if k == 0 else schedule.add_noise(x0, implied, tk)
        torch.testing.assert_close(out, expected)
        assert len(calls) == k
        assert [c[1][0].item() for c in calls] == timesteps[:k].tolist()  # the generator saw its own timesteps


def test_backward_simulate_fresh_noise():
    scheduler = LCMScheduler(**SDXL_BETAS, original_inference_steps=4)
    schedule = schedule_from_scheduler_config(scheduler)
    timesteps = student_timesteps(scheduler, 4)
    x0 = torch.full((4, 4, 16, 16), 0.5)
    noise = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    out = backward_simulate(_oracle(x0)[0], noise, timesteps, 2, schedule, mode="fresh_noise")
    alpha, sigma = schedule.alpha_sigma(timesteps[2].expand(4), ndim=4)
    fresh = (out - alpha * x0) / sigma
    assert fresh.mean().abs() < 0.05 and (fresh.std() - 1).abs() < 0.05  # new standard-normal noise ...
    assert not torch.allclose(fresh, schedule.x0_to_noise(x0, noise, timesteps[0].expand(4)), atol=0.1)  # not the old
    torch.manual_seed(5)
    again = backward_simulate(_oracle(x0)[0], noise, timesteps, 2, schedule, mode="fresh_noise")
    torch.testing.assert_close(out, again)  # reproducible from torch's global seed
    with pytest.raises(ValueError, match="re-noising mode"):
        backward_simulate(_oracle(x0)[0], noise, timesteps, 1, schedule, mode="sde")


def test_backward_simulate_has_no_graph():
    net = torch.nn.Linear(3, 3)
    schedule = NoiseSchedule("flow", 1000, "flow")
    out = backward_simulate(lambda x, t: net(x), torch.randn(2, 3), torch.tensor([1000.0, 500.0]), 1, schedule)
    assert not out.requires_grad
