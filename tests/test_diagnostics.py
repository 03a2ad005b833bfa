"""dmdx.training.diagnostics: known values, 2-D / 4-D / 5-D shapes, and the edge cases a training loop hits."""

import math

import pytest
import torch

from dmdx.training.diagnostics import (
    band_discriminator_diagnostics,
    batch_coherence,
    flat_cosine,
    output_shift,
    prediction_gap,
)

SHAPES = [(4, 3), (4, 2, 5, 5), (4, 2, 3, 4, 4)]
SHAPE_IDS = ["2d", "4d", "5d"]


def test_band_diagnostics_known_values():
    # band 0 = t in [0, 500): samples 0, 1; band 1 = [500, 1000]: samples 2, 3 (T itself is in the last band).
    t = torch.tensor([0.0, 499.0, 500.0, 1000.0])
    real = torch.tensor([1.0, 0.0, -1.0, 2.0])
    fake = torch.tensor([-1.0, -2.0, 1.0, 3.0])
    d = band_discriminator_diagnostics(real, fake, t, T=1000)
    # signs: real right 1, 0.5 (zero), 0, 1 -> 2.5/4; fake right 1, 1, 0, 0 -> 2/4.
    assert d["d_accuracy"] == pytest.approx(0.5 * (2.5 / 4 + 2 / 4))
    assert d["logit_gap"] == pytest.approx(0.5 - 0.25)
    assert d["d_pair_order"] == pytest.approx(0.5)  # real > fake for samples 0 and 1 only
    assert d["d_accuracy_band0"] == pytest.approx(0.5 * (1.5 / 2 + 1.0))
    assert d["logit_gap_band0"] == pytest.approx(0.5 - (-1.5))
    assert d["d_accuracy_band1"] == pytest.approx(0.5 * (0.5 + 0.0))
    assert d["logit_gap_band1"] == pytest.approx(0.5 - 2.0)


def test_band_diagnostics_chance_reads_half_and_pairs_can_be_ordered():
    # All logits positive: sign accuracy is exactly chance, but every pair is ordered right.
    real = torch.tensor([0.3, 0.5, 0.7, 0.9])
    fake = real - 0.1
    d = band_discriminator_diagnostics(real, fake, torch.tensor([10.0, 20.0, 30.0, 40.0]), T=1000)
    assert d["d_accuracy"] == pytest.approx(0.5)
    assert d["d_pair_order"] == pytest.approx(1.0)
    zeros = torch.zeros(4)
    z = band_discriminator_diagnostics(zeros, zeros, torch.tensor([10.0, 20.0, 30.0, 40.0]), T=1000)
    assert z["d_accuracy"] == 0.5 and z["d_pair_order"] == 0.5 and z["logit_gap"] == 0.0


def test_band_diagnostics_empty_band_is_nan_and_extra_dims_are_averaged():
    real = torch.tensor([[1.0, 3.0], [-1.0, -1.0]])  # per sample: 2, -1
    fake = torch.tensor([[0.0, 0.0], [-4.0, 0.0]])  # per sample: 0, -2
    d = band_discriminator_diagnostics(real, fake, torch.tensor([100.0, 200.0]), T=1000, num_bands=3)
    assert d["logit_gap"] == pytest.approx(0.5 - (-1.0))
    assert d["d_pair_order"] == 1.0
    assert not math.isnan(d["d_accuracy_band0"])
    assert math.isnan(d["d_accuracy_band1"]) and math.isnan(d["logit_gap_band2"])
    assert {f"d_accuracy_band{i}" for i in range(3)} <= set(d)


def test_band_diagnostics_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="levels"):
        band_discriminator_diagnostics(torch.zeros(4), torch.zeros(4), torch.zeros(3), T=1000)
    with pytest.raises(ValueError, match="num_bands"):
        band_discriminator_diagnostics(torch.zeros(4), torch.zeros(4), torch.zeros(4), T=1000, num_bands=0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prediction_gap_known_values(shape):
    torch.manual_seed(0)
    x0 = torch.randn(shape, dtype=torch.float64) * 3.0
    x_real = torch.randn(shape, dtype=torch.float64)
    x_fake = x_real + 0.01 * torch.sign(torch.randn(shape, dtype=torch.float64))
    gap = prediction_gap(x_real, x_fake, x0)
    assert gap["pred_gap_abs"] == pytest.approx(0.01)
    spread = x0.reshape(shape[0], -1).std(dim=0).mean().item()
    assert gap["pred_gap_rel"] == pytest.approx(0.01 / spread)
    assert math.isnan(prediction_gap(x_real[:1], x_fake[:1], x0[:1])["pred_gap_rel"])


def test_flat_cosine_values_and_none_entries():
    a = [torch.tensor([1.0, 0.0]), None, torch.tensor([[0.0]])]
    b = [torch.tensor([1.0, 1.0]), torch.tensor([5.0]), torch.tensor([[0.0]])]
    assert flat_cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    assert flat_cosine([torch.tensor([1.0, 2.0])], [torch.tensor([-2.0, -4.0])]) == pytest.approx(-1.0)
    assert math.isnan(flat_cosine([None], [torch.ones(2)]))
    assert math.isnan(flat_cosine([torch.zeros(2)], [torch.ones(2)]))
    with pytest.raises(ValueError, match="length"):
        flat_cosine([torch.ones(2)], [])
    with pytest.raises(ValueError, match="shape"):
        flat_cosine([torch.ones(2)], [torch.ones(3)])


def test_flat_cosine_of_real_parameter_gradients():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    x = torch.randn(8, 3)
    g1 = torch.autograd.grad(net(x).sum(), list(net.parameters()))
    g2 = torch.autograd.grad(-2 * net(x).sum(), list(net.parameters()))
    assert flat_cosine(g1, g1) == pytest.approx(1.0)
    assert flat_cosine(g1, g2) == pytest.approx(-1.0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batch_coherence_parallel_orthogonal_and_random(shape):
    torch.manual_seed(0)
    direction = torch.randn(shape[1:], dtype=torch.float64)
    scales = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64).reshape((-1,) + (1,) * (len(shape) - 1))
    assert batch_coherence(scales * direction) == pytest.approx(1.0)
    random = torch.randn((256,) + shape[1:], dtype=torch.float64)
    assert abs(batch_coherence(random)) < 0.05


def test_batch_coherence_known_value_and_edge_cases():
    # rows e1, e1, e2: cosines (0,1)=1, (0,2)=0, (1,2)=0 -> off-diagonal mean over 6 ordered pairs = 2/6.
    rows = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert batch_coherence(rows) == pytest.approx(1 / 3)
    assert batch_coherence(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    assert batch_coherence(torch.tensor([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(0.0)
    assert math.isnan(batch_coherence(torch.ones(1, 3)))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_output_shift_translation_vs_spread(shape):
    torch.manual_seed(0)
    before = torch.randn(shape, dtype=torch.float64)
    step = torch.randn(shape[1:], dtype=torch.float64)
    translated = output_shift(before, before + step)
    assert translated["output_shift"] == pytest.approx(step.norm().item())
    assert translated["output_shift_common"] == pytest.approx(step.norm().item())
    assert translated["output_shift_common_fraction"] == pytest.approx(1.0)
    opposite = torch.stack([step, -step, step, -step])  # moves that cancel in the mean
    spread = output_shift(before, before + opposite)
    assert spread["output_shift"] == pytest.approx(step.norm().item())
    assert spread["output_shift_common"] == pytest.approx(0.0, abs=1e-12)
    assert spread["output_shift_common_fraction"] == pytest.approx(0.0, abs=1e-12)


def test_output_shift_known_value_and_no_move():
    before = torch.zeros(2, 2)
    after = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # norms 5 and 0; mean move (1.5, 2) -> 2.5
    d = output_shift(before, after)
    assert d == pytest.approx({"output_shift": 2.5, "output_shift_common": 2.5, "output_shift_common_fraction": 1.0})
    assert math.isnan(output_shift(before, before)["output_shift_common_fraction"])
    with pytest.raises(ValueError, match="Shapes"):
        output_shift(before, torch.zeros(3, 2))


def test_generator_gradient_diagnostics_known_values():
    from dmdx.training import dmd_loss
    from dmdx.training.diagnostics import generator_gradient_diagnostics

    torch.manual_seed(0)
    x0, x0_real, x0_fake = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    x = x0.clone().requires_grad_(True)
    (dmd_grad,) = torch.autograd.grad(dmd_loss(x, x0_real, x0_fake).sum(), x)
    out = generator_gradient_diagnostics(2 * dmd_grad, x0, x0 + 0.5, x0_real, x0_fake)
    assert out["grad_cosine_adm_dmd"] == pytest.approx(1.0)
    assert out["grad_cosine_adm_dmd_per_sample"] == pytest.approx(1.0)
    assert out["output_shift_common_fraction"] == pytest.approx(1.0)  # every sample moved by the same +0.5
    assert out["dmd_grad_coherence"] == pytest.approx(out["grad_coherence"])
    same = generator_gradient_diagnostics(torch.ones(3, 4, 2, 2), x0, x0)
    assert same["grad_coherence"] == pytest.approx(1.0) and same["output_shift"] == 0
    assert "grad_cosine_adm_dmd" not in same
    opposite = generator_gradient_diagnostics(-dmd_grad, x0, x0, x0_real, x0_fake)
    assert opposite["grad_cosine_adm_dmd"] == pytest.approx(-1.0)
