"""Losses of ADM / ADP / DMD2 (dmdx.training.losses): values, shapes, gradients, and where gradients go when the
ADM and DMD updates are wired up with tiny MLPs (generator, fake score, frozen backbone + discriminator heads)."""

import copy

import pytest
import torch
from torch import nn

from dmdx.training import (
    BackboneFeatures,
    DiscriminatorHeads,
    NoiseSchedule,
    adm_latent_predictions,
    adp_discriminator_loss,
    adp_generator_loss,
    discriminator_diagnostics,
    dmd_loss,
    fake_score_denoising_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    interpolate_ode_pair,
    ode_pair_velocity,
    per_sample_mean,
    velocity_regression_loss,
)

SHAPES = [(4, 3), (4, 2, 5, 5), (4, 2, 3, 4, 4)]
SHAPE_IDS = ["2d", "4d", "5d"]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_every_loss_is_per_sample(shape):
    torch.manual_seed(0)
    schedule = NoiseSchedule("flow", 1000, "flow")
    x0, noise, out = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    t = torch.rand(shape[0]) * 1000
    logits = torch.randn(shape[0])
    assert per_sample_mean(x0).shape == (shape[0],)
    assert fake_score_denoising_loss(out, x0, noise, t, schedule).shape == (shape[0],)
    assert dmd_loss(x0, torch.randn(shape), torch.randn(shape)).shape == (shape[0],)
    assert velocity_regression_loss(out, noise).shape == (shape[0],)
    assert hinge_discriminator_loss(logits, -logits).shape == (shape[0],)
    assert adp_generator_loss(logits, logits).shape == (shape[0],)
    assert adp_discriminator_loss(logits, logits, logits, logits).shape == (shape[0],)


def test_hinge_and_generator_values():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])
    fake = torch.tensor([-2.0, 0.5, 1.0, 0.0])
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), torch.tensor([0.0, 2.0, 4.0, 2.0]))
    torch.testing.assert_close(generator_adversarial_loss(fake), -fake)
    torch.testing.assert_close(adp_generator_loss(fake, real), -(0.85 * fake + 0.15 * real))
    torch.testing.assert_close(adp_generator_loss(fake, None), -0.85 * fake)
    torch.testing.assert_close(adp_discriminator_loss(real, fake), 0.85 * torch.tensor([0.0, 2.0, 4.0, 2.0]))
    torch.testing.assert_close(adp_discriminator_loss(real, fake, fake, real, 0.5, 0.25),
                               0.5 * torch.tensor([0.0, 2.0, 4.0, 2.0]) + 0.25 * torch.tensor([6.0, 2.0, 0.0, 2.0]))
    d = discriminator_diagnostics(torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -1.0]))
    assert d["d_accuracy"] == pytest.approx(0.75)
    assert d["logit_gap"] == pytest.approx(1.0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_dmd_gradient_is_normalised_score_difference(shape):
    torch.manual_seed(1)
    x0 = torch.randn(shape, dtype=torch.float64)
    x0_real, x0_fake = torch.randn(shape), torch.randn(shape)
    x0_var = x0.float().requires_grad_(True)
    dmd_loss(x0_var, x0_real, x0_fake).sum().backward()
    n = x0[0].numel()
    normaliser = per_sample_mean((x0.float() - x0_real).abs()).reshape((-1,) + (1,) * (len(shape) - 1))
    expected = (x0_fake - x0_real) / normaliser / n
    torch.testing.assert_close(x0_var.grad, expected, rtol=1e-5, atol=1e-7)
    # no gradient reaches the teacher's or the fake score's predictions
    real_var, fake_var = x0_real.clone().requires_grad_(True), x0_fake.clone().requires_grad_(True)
    loss = dmd_loss(x0.float().requires_grad_(True), real_var, fake_var).sum()
    loss.backward()
    assert real_var.grad is None and fake_var.grad is None


def test_bf16_inputs_give_finite_float_losses():
    torch.manual_seed(2)
    schedule = NoiseSchedule("flow", 1000, "flow")
    bf = lambda *s: torch.randn(*s).to(torch.bfloat16)
    x0 = bf(2, 4, 8, 8)
    t = torch.tensor([10.0, 990.0])
    for loss in (dmd_loss(x0, bf(2, 4, 8, 8), bf(2, 4, 8, 8)), dmd_loss(x0, x0, x0),  # x0 == x0_real: 0/0 guard
                 fake_score_denoising_loss(bf(2, 4, 8, 8), x0, bf(2, 4, 8, 8), t, schedule),
                 velocity_regression_loss(bf(2, 4, 8, 8), bf(2, 4, 8, 8))):
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_fake_score_loss_value_and_detach():
    schedule = NoiseSchedule("vp", 1000, "v_prediction", alphas_cumprod=torch.linspace(0.99, 0.01, 1000).double())
    torch.manual_seed(3)
    x0 = torch.randn(3, 2, 4, 4, requires_grad=True)
    noise, out, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([5.0, 500.0, 995.5])
    loss = fake_score_denoising_loss(out, x0, noise, t, schedule)
    torch.testing.assert_close(loss, per_sample_mean((out - schedule.model_target(x0, noise, t)) ** 2))
    assert not loss.requires_grad  # the target is built from a detached x0


def test_adm_predictions_differ_by_the_step_size():
    """The two one-step predictions differ only through the x0 difference, scaled by a factor O(dt)."""
    torch.manual_seed(4)
    schedule = NoiseSchedule("flow", 1000, "flow")
    x_t = torch.randn(5, 3)
    x0_real, x0_fake = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([100.0, 300.0, 500.0, 800.0, 1000.0])
    s = t - 1000 / 64
    x_real, x_fake = adm_latent_predictions(x_t, t, s, lambda x, tt: x0_real, lambda x, tt: x0_fake, schedule)
    a_t, s_t = schedule.alpha_sigma(t, ndim=2)
    a_s, s_s = schedule.alpha_sigma(s, ndim=2)
    torch.testing.assert_close(x_real - x_fake, (a_s - s_s * a_t / s_t) * (x0_real - x0_fake))
    assert ((a_s - s_s * a_t / s_t) <= 1 / 64 / 0.1 + 1e-6).all()
    same_real, same_fake = adm_latent_predictions(x_t, t, s, lambda x, tt: x0_real, lambda x, tt: x0_real, schedule)
    torch.testing.assert_close(same_real, same_fake)


def test_ode_pair_helpers_match_flow_schedule():
    schedule = NoiseSchedule("flow", 1000, "flow")
    torch.manual_seed(5)
    noise, x0, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0.0, 250.0, 1000.0])
    torch.testing.assert_close(interpolate_ode_pair(noise, x0, t, 1000.0), schedule.add_noise(x0, noise, t))
    torch.testing.assert_close(ode_pair_velocity(noise, x0), schedule.model_target(x0, noise, t))


# ---- gradient routing with tiny MLPs -----------------------------------------------------------------------------
class TinyDenoiser(nn.Module):
    """(x_t, t) -> flow velocity; named blocks so a discriminator can hook them."""

    def __init__(self, dim=3, width=16):
        super().__init__()
        self.block0 = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU())
        self.block1 = nn.Sequential(nn.Linear(width, width), nn.SiLU())
        self.block2 = nn.Linear(width, dim)

    def forward(self, x, t):
        h = self.block0(torch.cat([x, t[:, None] / 1000], dim=1))
        return self.block2(self.block1(h))


class Setup:
    def __init__(self):
        torch.manual_seed(6)
        self.schedule = NoiseSchedule("flow", 1000, "flow")
        self.G = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 3))
        self.teacher = TinyDenoiser().requires_grad_(False)  # frozen real score and discriminator backbone
        self.fake = copy.deepcopy(self.teacher).requires_grad_(True)
        with torch.no_grad():  # a fake score that has drifted from the teacher, so real and fake differ
            for p in self.fake.parameters():
                p.add_(0.1 * torch.randn_like(p))
        to_map = lambda out: out.reshape(out.shape[0], 4, 2, 2)  # (B, 16) -> (B, 4, 2, 2) feature maps
        self.features = BackboneFeatures(self.teacher, ["block0", "block1"], select=to_map)
        self.heads = DiscriminatorHeads([(4, 2, 2), (4, 2, 2)], hidden_channels=8, zero_init=False)

    def x0(self, net):
        return lambda x_t, t: self.schedule.to_x0_noise(net(x_t, t), x_t, t)[0]

    def D(self, x, t):
        return self.heads(self.features(lambda: self.teacher(x, t)))

    def batch(self, requires_grad=True):
        z = torch.randn(8, 3)
        x0 = self.G(z) if requires_grad else self.G(z).detach()
        t = torch.rand(8) * 900 + 100
        return x0, t, t - 1000 / 64, torch.randn(8, 3)

    def snapshot(self, module):
        return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return [not torch.equal(b, p) for b, p in zip(before, module.parameters())]


def set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def test_adm_generator_update_reaches_only_the_generator():
    st = Setup()
    opt_G = torch.optim.SGD(st.G.parameters(), lr=0.1)
    before = {n: st.snapshot(m) for n, m in (("G", st.G), ("fake", st.fake), ("heads", st.heads))}
    set_requires_grad(st.fake, False)
    set_requires_grad(st.heads, False)
    x0, t, s, noise = st.batch()
    x_t = st.schedule.add_noise(x0, noise, t)
    x_fake = st.schedule.ode_step(x_t, st.x0(st.fake)(x_t, t), t, s)
    loss = generator_adversarial_loss(st.D(x_fake, s)).mean()
    loss.backward()
    set_requires_grad(st.fake, True)
    set_requires_grad(st.heads, True)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in st.G.parameters())
    for module in (st.fake, st.heads, st.teacher):
        assert all(p.grad is None for p in module.parameters())
    opt_G.step()
    assert all(changed(before["G"], st.G))
    assert not any(changed(before["fake"], st.fake)) and not any(changed(before["heads"], st.heads))


def test_adm_generator_gradient_flows_only_through_x_t():
    """Cut x_t from the generator and nothing reaches it: the gradient goes through the fake score's input."""
    st = Setup()
    x0, t, s, noise = st.batch()
    x_t = st.schedule.add_noise(x0, noise, t).detach()
    x_fake = st.schedule.ode_step(x_t, st.x0(st.fake)(x_t, t), t, s)
    assert not x_fake.requires_grad or all(
        g is None for g in torch.autograd.grad(st.D(x_fake, s).sum(), list(st.G.parameters()), allow_unused=True))


def test_discriminator_update_reaches_only_the_heads():
    st = Setup()
    x0, t, s, noise = st.batch(requires_grad=False)
    with torch.no_grad():
        x_t = st.schedule.add_noise(x0, noise, t)
        x_real, x_fake = adm_latent_predictions(x_t, t, s, st.x0(st.teacher), st.x0(st.fake), st.schedule)
    loss = hinge_discriminator_loss(st.D(x_real, s), st.D(x_fake, s)).mean()
    loss.backward()
    assert all(p.grad is not None for p in st.heads.parameters())
    assert sum(p.grad.abs().sum() for p in st.heads.parameters()) > 0
    for module in (st.G, st.fake, st.teacher):
        assert all(p.grad is None for p in module.parameters())


def test_fake_score_update_reaches_only_the_fake_score():
    st = Setup()
    x0, t, _, noise = st.batch()  # x0 carries the generator's graph: the loss must not use it
    x_t = st.schedule.add_noise(x0.detach(), noise, t)
    loss = fake_score_denoising_loss(st.fake(x_t, t), x0, noise, t, st.schedule).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in st.fake.parameters())
    for module in (st.G, st.heads, st.teacher):
        assert all(p.grad is None for p in module.parameters())


def test_dmd_update_reaches_only_the_generator():
    st = Setup()
    x0, t, _, noise = st.batch()
    with torch.no_grad():
        x_t = st.schedule.add_noise(x0, noise, t)
        x0_real, x0_fake = st.x0(st.teacher)(x_t, t), st.x0(st.fake)(x_t, t)
    dmd_loss(x0, x0_real, x0_fake).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in st.G.parameters())
    for module in (st.fake, st.heads, st.teacher):
        assert all(p.grad is None for p in module.parameters())


def test_discriminator_accuracy_counts_zero_logits_as_chance():
    from dmdx.training import discriminator_diagnostics

    assert discriminator_diagnostics(torch.zeros(4), torch.zeros(4))["d_accuracy"] == 0.5
    assert discriminator_diagnostics(torch.ones(4), -torch.ones(4))["d_accuracy"] == 1.0
    assert discriminator_diagnostics(-torch.ones(4), torch.ones(4))["d_accuracy"] == 0.0


def test_frozen_parameters_routes_gradient_through_input_and_restores_flags():
    from dmdx.training import frozen_parameters

    generator, critic = nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    critic[0].weight.requires_grad_(False)  # e.g. a frozen LoRA base: must stay frozen afterwards
    with frozen_parameters(critic, None):
        assert not any(p.requires_grad for p in critic.parameters())
        critic(generator(torch.randn(5, 3))).sum().backward()
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())
    assert [p.requires_grad for p in critic.parameters()] == [False, True, True, True]
