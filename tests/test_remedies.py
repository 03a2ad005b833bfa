"""dmdx.training.remedies: known values, 2-D / 4-D / 5-D shapes, gradients, and agreement with the schedule's own
forward process (float64 where formulas are compared)."""

import pytest
import torch

from dmdx.training import NoiseSchedule, schedule_from_scheduler_config
from dmdx.training.losses import ODE_STEP_MODES, ode_step_target
from dmdx.training.remedies import (
    GENERATOR_GRADIENT_MODES,
    approximate_r1_penalty,
    r1_penalty,
    sample_renoise_level,
    shape_generator_gradient,
    shared_renoise,
)

SHAPES = [(4, 3), (4, 2, 5, 5), (4, 2, 3, 4, 4)]
SHAPE_IDS = ["2d", "4d", "5d"]


def per_sample_norms(x):
    return x.reshape(x.shape[0], -1).norm(dim=1)


def vp_schedule():
    return schedule_from_scheduler_config({
        "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon"})


def flow_schedule():
    return NoiseSchedule("flow", 1000, "flow")


# ---- shape_generator_gradient -----------------------------------------------------------------------------------
def test_modes_are_declared():
    assert GENERATOR_GRADIENT_MODES == ("none", "normalize", "remove_batch_mean")
    assert ODE_STEP_MODES == ("fixed", "relative")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_normalize_gives_every_sample_the_mean_norm(shape):
    torch.manual_seed(0)
    grad = torch.randn(shape, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=torch.float64).reshape(
        (-1,) + (1,) * (len(shape) - 1))
    shaped = shape_generator_gradient(grad, "normalize")
    assert shaped.shape == grad.shape and shaped.dtype == grad.dtype
    norms = per_sample_norms(shaped)
    torch.testing.assert_close(norms, per_sample_norms(grad).mean().expand(4))
    # Directions are kept: each sample is a positive multiple of its input.
    cos = (shaped * grad).reshape(4, -1).sum(1) / (per_sample_norms(shaped) * per_sample_norms(grad))
    torch.testing.assert_close(cos, torch.ones(4, dtype=torch.float64))


def test_normalize_keeps_zero_gradients_zero():
    grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(shape_generator_gradient(grad, "normalize"), torch.tensor([[1.5, 2.0], [0.0, 0.0]]))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_remove_batch_mean(shape):
    torch.manual_seed(0)
    common = torch.randn(shape[1:], dtype=torch.float64)
    own = torch.randn(shape, dtype=torch.float64)
    own = own - own.mean(0, keepdim=True)
    shaped = shape_generator_gradient(own + common, "remove_batch_mean")
    torch.testing.assert_close(shaped, own)
    torch.testing.assert_close(shaped.mean(0), torch.zeros(shape[1:], dtype=torch.float64))
    assert shape_generator_gradient(own, "none") is own


def test_gradient_modes_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        shape_generator_gradient(torch.ones(1, 3), "remove_batch_mean")
    with pytest.raises(ValueError, match="Unknown generator gradient mode"):
        shape_generator_gradient(torch.ones(2, 3), "clip")


def test_gradient_hook_reaches_the_generator_parameters():
    # As the loop uses it: a hook on x0_gen; with a loss whose x0 gradient is one common vector for every sample,
    # remove_batch_mean leaves the generator nothing to learn.
    torch.manual_seed(0)
    generator = torch.nn.Linear(3, 3)
    z = torch.randn(8, 3)
    x0_gen = generator(z)
    x0_gen.register_hook(lambda g: shape_generator_gradient(g, "remove_batch_mean"))
    (x0_gen @ torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    for p in generator.parameters():
        torch.testing.assert_close(p.grad, torch.zeros_like(p))
    generator.zero_grad()
    x0_gen = generator(z)
    x0_gen.register_hook(lambda g: shape_generator_gradient(g, "none"))
    (x0_gen @ torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    assert generator.bias.grad.abs().sum() > 0


# ---- R1 ----------------------------------------------------------------------------------------------------------
def test_approximate_r1_values_and_gradient():
    clean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    perturbed = torch.tensor([[2.0, 2.0], [3.0, -1.0]], requires_grad=True)
    penalty = approximate_r1_penalty(clean, perturbed)
    torch.testing.assert_close(penalty, torch.tensor([0.5, 5.0]))
    penalty.sum().backward()
    torch.testing.assert_close(perturbed.grad, torch.tensor([[1.0, 0.0], [3.0, -1.0]]))  # 2 * change / k
    torch.testing.assert_close(clean.grad, -perturbed.grad)
    assert approximate_r1_penalty(torch.zeros(3), torch.ones(3)).shape == (3,)
    with pytest.raises(ValueError, match="shapes"):
        approximate_r1_penalty(torch.zeros(3), torch.zeros(3, 2))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_exact_r1_on_a_quadratic_discriminator(shape):
    # D(x) = 0.5 * sum(w * x^2) per sample: dD/dx = w * x, so R1 = sum((w x)^2) per sample.
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1:], dtype=torch.float64)
    w_param = w.clone().requires_grad_()
    logits = 0.5 * (w_param * x**2).reshape(shape[0], -1).sum(1)
    penalty = r1_penalty(logits, x)
    expected = ((w * x.detach()) ** 2).reshape(shape[0], -1).sum(1)
    torch.testing.assert_close(penalty.double(), expected, rtol=1e-5, atol=1e-8)
    # create_graph: the penalty trains D's parameters (d/dw sum (w x)^2 = sum_b 2 w x^2).
    (grad_w,) = torch.autograd.grad(penalty.sum(), w_param)
    torch.testing.assert_close(grad_w.double(), (2 * w * x.detach() ** 2).sum(0), rtol=1e-5, atol=1e-8)


def test_exact_and_approximate_r1_agree_for_small_alpha():
    torch.manual_seed(0)
    disc = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    exact = r1_penalty(disc(x).squeeze(-1), x)
    alpha, trials = 1e-3, 4000
    noise = torch.randn(trials, 6, 4, dtype=torch.float64)
    with torch.no_grad():
        approx = torch.stack([approximate_r1_penalty(disc(x), disc(x + alpha * n)) for n in noise]).mean(0)
    torch.testing.assert_close(approx.float() / alpha**2, exact.detach().float(), rtol=0.1, atol=1e-6)


def test_exact_r1_needs_grad_inputs():
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(torch.zeros(2), torch.zeros(2, 3))


# ---- ODE step target -------------------------------------------------------------------------------------------
def test_ode_step_target_values():
    t = torch.tensor([1000.0, 500.0, 10.0])
    torch.testing.assert_close(ode_step_target(t, 1 / 64, 1000, "fixed"), torch.tensor([984.375, 484.375, 0.0]))
    torch.testing.assert_close(ode_step_target(t, 1 / 4, 1000, "relative"), torch.tensor([750.0, 375.0, 7.5]))
    assert ode_step_target(torch.tensor([999, 20]), 1 / 64, 1000, "fixed").is_floating_point()
    with pytest.raises(ValueError, match="Unknown ODE step mode"):
        ode_step_target(t, 1 / 64, 1000, "adaptive")
    with pytest.raises(ValueError, match="dt"):
        ode_step_target(t, 0.0, 1000, "fixed")


def test_relative_dt_one_thirty_second_matches_fixed_on_average():
    t = torch.linspace(0, 1000, 100_001, dtype=torch.float64)
    mean_fixed = (t - ode_step_target(t, 1 / 64, 1000, "fixed")).mean()
    mean_relative = (t - ode_step_target(t, 1 / 32, 1000, "relative")).mean()
    assert mean_relative.item() == pytest.approx(1000 / 64, rel=1e-3)
    assert mean_fixed.item() < 1000 / 64  # clamped at 0 near t = 0


# ---- re-noising ----------------------------------------------------------------------------------------------
def test_sample_renoise_level_range_and_generator():
    s = torch.tensor([0.0, 100.0, 900.0, 999.0] * 500, dtype=torch.float64)
    level = sample_renoise_level(s, 1000, 0.5, generator=torch.Generator().manual_seed(0))
    low = s.clamp_min(500.0)
    assert (level >= low).all() and (level <= 1000).all()
    assert level[s == 0].min() < 520 and level[s == 0].max() > 980  # spans [500, 1000)
    again = sample_renoise_level(s, 1000, 0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(level, again)
    assert (sample_renoise_level(s, 1000, 0.0) >= s).all()
    with pytest.raises(ValueError, match="min_fraction"):
        sample_renoise_level(s, 1000, 1.5)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_shared_renoise_from_zero_is_add_noise_on_flow(shape):
    torch.manual_seed(0)
    schedule = flow_schedule()
    x0, other, noise = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    s = torch.zeros(shape[0], dtype=torch.float64)
    t_r = torch.tensor([0.0, 250.0, 700.0, 999.0], dtype=torch.float64)
    real_r, fake_r = shared_renoise(x0, other, schedule, s, t_r, noise)
    torch.testing.assert_close(real_r, schedule.add_noise(x0, noise, t_r))
    torch.testing.assert_close(fake_r, schedule.add_noise(other, noise, t_r))


def test_shared_renoise_from_small_s_approaches_add_noise_on_vp():
    torch.manual_seed(0)
    schedule = vp_schedule()
    x0, noise = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t_r = torch.tensor([100.0, 400.0, 800.0, 999.0], dtype=torch.float64)
    real_r, _ = shared_renoise(x0, x0, schedule, torch.zeros(4, dtype=torch.float64), t_r, noise)
    # a_0 = sqrt(1 - beta_0) ~ 0.99957, sigma_0 ~ 0.029: the s = 0 limit of the forward process, to ~1e-3.
    torch.testing.assert_close(real_r, schedule.add_noise(x0, noise, t_r), rtol=0, atol=3e-3)


@pytest.mark.parametrize("make_schedule", [flow_schedule, vp_schedule], ids=["flow", "vp"])
def test_shared_renoise_is_the_forward_process_from_s(make_schedule):
    # x_s = a_s x0 + sig_s n1 re-noised to t' must be a_t' x0 + sig_t' n' with n' ~ N(0, 1): check its mean and std
    # over many noise draws (float64), and that the pair's difference is only rescaled by a_t'/a_s.
    torch.manual_seed(0)
    schedule = make_schedule()
    n = 200_000
    x0 = torch.full((n, 2), 0.7, dtype=torch.float64)
    s = torch.full((n,), 300.0, dtype=torch.float64)
    t_r = torch.full((n,), 750.0, dtype=torch.float64)
    x_s = schedule.add_noise(x0, torch.randn_like(x0), s)
    x_other = x_s + 0.01
    real_r, fake_r = shared_renoise(x_s, x_other, schedule, s, t_r, torch.randn_like(x0))
    alpha_r, sigma_r = schedule.alpha_sigma(t_r[:1], dtype=torch.float64)
    alpha_s, _ = schedule.alpha_sigma(s[:1], dtype=torch.float64)
    implied_noise = (real_r - alpha_r * x0) / sigma_r
    assert implied_noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert implied_noise.std().item() == pytest.approx(1.0, abs=0.01)
    torch.testing.assert_close(fake_r - real_r, (0.01 * alpha_r / alpha_s).expand(n, 2))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_shared_renoise_shapes_gradient_and_errors(shape):
    schedule = flow_schedule()
    x_real = torch.randn(shape)
    x_fake = torch.randn(shape, requires_grad=True)
    s = torch.full((shape[0],), 200.0)
    t_r = torch.full((shape[0],), 600.0)
    real_r, fake_r = shared_renoise(x_real, x_fake, schedule, s, t_r, torch.randn(shape))
    assert real_r.shape == fake_r.shape == shape and fake_r.dtype == torch.float32
    fake_r.sum().backward()  # d/dx_fake = a_t'/a_s = 0.4 / 0.8
    torch.testing.assert_close(x_fake.grad, torch.full(shape, 0.5))
    with pytest.raises(ValueError, match="only add noise"):
        shared_renoise(x_real, x_real, schedule, t_r, s, torch.randn(shape))
