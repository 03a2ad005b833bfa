"""Discriminator pieces (dmdx.training.discriminator): backbone feature hooks and the 2-D / 3-D heads."""

import argparse
import os

import pytest
import torch
from torch import nn

from dmdx.training import BackboneFeatures, DiscriminatorHeads, first_tensor, tokens_to_map


class Counting(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.lin(x)), "extra"  # a tuple output, as many diffusers blocks return


class Backbone(nn.Module):
    def __init__(self, dim=6):
        super().__init__()
        self.blocks = nn.ModuleList([Counting(dim) for _ in range(4)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)[0]
        return x


def manual_features(backbone, x):
    outs = []
    for block in backbone.blocks:
        x = block(x)[0]
        outs.append(x)
    return outs


def test_features_in_requested_order_and_stop_early():
    torch.manual_seed(0)
    bb = Backbone().requires_grad_(False)
    x = torch.randn(3, 6)
    expected = manual_features(bb, x)
    extractor = BackboneFeatures(bb, ["blocks.2", "blocks.0"])
    for block in bb.blocks:
        block.calls = 0
    feats = extractor(lambda: bb(x))
    torch.testing.assert_close(feats[0], expected[2])
    torch.testing.assert_close(feats[1], expected[0])
    assert [b.calls for b in bb.blocks] == [1, 1, 1, 0]  # blocks after the last hooked one never ran
    full = BackboneFeatures(bb, ["blocks.1"], stop_early=False)
    for block in bb.blocks:
        block.calls = 0
    full(lambda: bb(x))
    assert [b.calls for b in bb.blocks] == [1, 1, 1, 1]


def test_gradients_reach_the_backbone_input_not_its_weights():
    torch.manual_seed(1)
    bb = Backbone().requires_grad_(False)
    extractor = BackboneFeatures(bb, ["blocks.0", "blocks.1"])
    x = torch.randn(2, 6, requires_grad=True)
    sum(f.sum() for f in extractor(lambda: bb(x))).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_backbone_outside_the_call_is_unaffected():
    torch.manual_seed(2)
    bb = Backbone()
    x = torch.randn(2, 6)
    reference = bb(x)
    extractor = BackboneFeatures(bb, ["blocks.1"])
    extractor(lambda: bb(x))
    torch.testing.assert_close(bb(x), reference)  # runs to the end, no _StopForward escapes, nothing captured
    assert extractor._captured == {}
    extractor.remove()
    torch.testing.assert_close(bb(x), reference)


def test_feature_errors():
    bb = Backbone()
    with pytest.raises(ValueError, match="no modules named"):
        BackboneFeatures(bb, ["blocks.9"])
    extractor = BackboneFeatures(bb, ["blocks.3"])
    with pytest.raises(RuntimeError, match="did not run"):
        extractor(lambda: bb.blocks[0](torch.randn(1, 6)))


@pytest.mark.parametrize("size", [1, 2, 3, 8])
@pytest.mark.parametrize("zero_init", [True, False])
def test_2d_heads_on_small_maps(size, zero_init):
    torch.manual_seed(3)
    heads = DiscriminatorHeads([(4, size, size), (6, size, 2 * size)], hidden_channels=8, zero_init=zero_init)
    feats = [torch.randn(5, 4, size, size, requires_grad=True), torch.randn(5, 6, size, 2 * size)]
    logits = heads(feats)
    assert logits.shape == (5,) and torch.isfinite(logits).all()
    if zero_init:
        assert torch.equal(logits, torch.zeros(5))
    else:  # the head's features are not normalised away, even at 1x1: inputs change the logits
        assert logits.std() > 0
        logits.sum().backward()
        assert feats[0].grad.abs().sum() > 0


@pytest.mark.parametrize("frames,size", [(1, 1), (2, 2), (3, 4)])
def test_3d_heads(frames, size):
    torch.manual_seed(4)
    heads = DiscriminatorHeads([(4, frames, size, size)], hidden_channels=8, zero_init=False)
    x = torch.randn(3, 4, frames, size, size, requires_grad=True)
    logits = heads([x])
    assert logits.shape == (3,) and logits.std() > 0
    logits.sum().backward()
    assert x.grad.abs().sum() > 0


def test_heads_errors_and_dtype():
    with pytest.raises(ValueError, match="neither"):
        DiscriminatorHeads([(4, 8)])
    heads = DiscriminatorHeads([(4, 2, 2)], hidden_channels=8)
    with pytest.raises(ValueError, match="features for"):
        heads([torch.randn(1, 4, 2, 2)] * 2)
    assert heads([torch.randn(2, 4, 2, 2, dtype=torch.bfloat16)]).dtype == torch.float32


def test_tokens_to_map_and_first_tensor():
    x = torch.arange(2 * 6 * 3).float().reshape(2, 6, 3)  # (B, N=H*W, C)
    m = tokens_to_map(x, 2, 3)
    assert m.shape == (2, 3, 2, 3)
    torch.testing.assert_close(m[1, :, 1, 2], x[1, 5])
    v = torch.randn(2, 2 * 4 * 3, 5)  # frame-major tokens
    mv = tokens_to_map(v, 4, 3, frames=2)
    assert mv.shape == (2, 5, 2, 4, 3)
    torch.testing.assert_close(mv[0, :, 1, 2, 1], v[0, 1 * 12 + 2 * 3 + 1])
    with pytest.raises(ValueError):
        tokens_to_map(x, 4, 4)

    class Out:
        sample = torch.ones(1)

    t = torch.zeros(1)
    assert first_tensor(t) is t and first_tensor(("a", t)) is t and first_tensor(Out()) is Out.sample
    with pytest.raises(TypeError):
        first_tensor(("a", 1))


# ---- per-position heads (--discriminator_head_output per_position, docs/adm_probe.md) ----------------------------
def test_per_position_shapes_2d_and_3d():
    torch.manual_seed(5)
    # depth 1: an 8x8 map ends 4x4, a 4x4 map 2x2 (repeated to 4x4 so each head weighs equally per position)
    heads = DiscriminatorHeads([(4, 8, 8), (6, 4, 4)], hidden_channels=8, num_downsamples=1, zero_init=False,
                               output="per_position")
    feats = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)]
    logits = heads(feats)
    assert logits.shape == (3, 2, 4, 4) and torch.isfinite(logits).all()
    second = heads.heads[1](feats[1])
    assert second.shape == (3, 2, 2)
    torch.testing.assert_close(logits[:, 1, ::2, ::2], second)
    torch.testing.assert_close(logits[:, 1, 1::2, 1::2], second)
    video = DiscriminatorHeads([(4, 3, 8, 8)], hidden_channels=8, num_downsamples=1, zero_init=False,
                               output="per_position")
    x = torch.randn(2, 4, 3, 8, 8, requires_grad=True)
    vlogits = video([x])
    assert vlogits.shape == (2, 1, 3, 4, 4) and vlogits.std() > 0
    vlogits.sum().backward()
    assert x.grad.abs().sum() > 0
    zero = DiscriminatorHeads([(4, 8, 8)], hidden_channels=8, num_downsamples=1, output="per_position")
    assert torch.equal(zero([feats[0]]), torch.zeros(3, 1, 4, 4))  # zero-initialised: a coin flip everywhere
    with pytest.raises(ValueError, match="not one of"):
        DiscriminatorHeads([(4, 8, 8)], output="patch")


def test_per_position_logits_are_local_pooled_are_not():
    """A per-position logit depends only on its receptive field of the head's input (depth 1 on 8x8: the logit at
    row/column 3 of the 4x4 map sees input rows/columns 3..7); a pooled head's logit sees every position."""
    torch.manual_seed(6)
    local = DiscriminatorHeads([(4, 8, 8)], hidden_channels=8, num_downsamples=1, zero_init=False,
                               output="per_position")
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    local([x])[:, 0, 3, 3].sum().backward()
    grad = x.grad.abs().sum(dim=(0, 1))
    assert grad[:3, :].sum() == 0 and grad[:, :3].sum() == 0  # outside the receptive field: exactly no effect
    assert (grad[3:, 3:] > 0).all()
    moved = x.detach().clone()
    moved[:, :, 0, 0] += 5.0  # one input position changes: far logits unchanged, the near one moves
    before, after = local([x.detach()]), local([moved])
    torch.testing.assert_close(after[:, 0, 2:, 2:], before[:, 0, 2:, 2:])
    assert (after[:, 0, 0, 0] - before[:, 0, 0, 0]).abs().min() > 0
    pooled = DiscriminatorHeads([(4, 8, 8)], hidden_channels=8, num_downsamples=1, zero_init=False)
    y = x.detach().clone().requires_grad_(True)
    pooled([y]).sum().backward()
    assert (y.grad.abs().sum(dim=(0, 1)) > 0).all()


def test_per_position_hinge_differs_from_pooled_hinge():
    """The per-position hinge is not the hinge of the pooled logit: positions already past the margin stop
    contributing, others keep pulling. The generator's loss is the mean logit either way."""
    from dmdx.training import generator_adversarial_loss, hinge_discriminator_loss

    real = torch.tensor([[[3.0, -1.0]], [[0.5, 0.5]]])  # (B=2, heads=1, 2 positions)
    fake = torch.tensor([[[-3.0, 1.0]], [[-0.5, -0.5]]])
    per_position = hinge_discriminator_loss(real, fake)
    assert per_position.shape == (2,)
    torch.testing.assert_close(per_position, torch.tensor([(0 + 2 + 0 + 2) / 2, (0.5 + 0.5 + 0.5 + 0.5) / 2]))
    pooled = hinge_discriminator_loss(real.mean(dim=(1, 2)), fake.mean(dim=(1, 2)))
    torch.testing.assert_close(pooled, torch.tensor([0.0, 1.0]))  # sample 0: the mean logits 1 / -1 sit on the margin
    assert not torch.allclose(per_position, pooled)
    torch.testing.assert_close(generator_adversarial_loss(fake), -fake.mean(dim=(1, 2)))
    one = torch.randn(4, 1, 1, 1)  # a 1x1 map: per position is pooled
    torch.testing.assert_close(hinge_discriminator_loss(one, -one), hinge_discriminator_loss(one.flatten(),
                                                                                            -one.flatten()))
    with pytest.raises(ValueError, match="differ"):
        hinge_discriminator_loss(real, fake[:, :, :1])


def test_head_output_is_part_of_a_checkpoints_provenance(tmp_path):
    """Per-position heads hold other parameters than pooled ones: a resume across the two must be refused by the
    provenance check (with a message naming the field), not fail later on a state-dict shape; pooled runs keep the
    provenance they had before the flag existed, so their checkpoints still resume."""
    from dmdx.pipelines.teachers import SD3Teacher
    from dmdx.training.loop import run_provenance

    teacher = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill_scripts", "digits",
                           "assets", "digits-sd3-teacher")
    adapter = SD3Teacher(teacher, resolution=16)
    ts = torch.tensor([999.0, 750.0])

    def provenance(*extra):
        args = argparse.Namespace(distribution_loss="adm", lora_rank=0, fake_score_lora_rank=0, resolution=16,
                                  discriminator_blocks=None, discriminator_head_channels=64,
                                  discriminator_head_depth=1, discriminator_head_output="pooled")
        for key, value in extra:
            setattr(args, key, value)
        fields = run_provenance(adapter, args, "train_adm_sd3.py", None, ts)
        return {k: v for k, v in fields.items() if k != "run_id"}

    pooled, per_position = provenance(), provenance(("discriminator_head_output", "per_position"))
    assert pooled["discriminator"] == [None, 64, 1]
    assert per_position["discriminator"] == [None, 64, 1, "per_position"]
    assert {k for k in pooled if pooled[k] != per_position[k]} == {"discriminator"}
