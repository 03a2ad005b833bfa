"""The ADM discriminator probe (benchmarks/adm_probe.py) and its measure (diagnostics.sample_specific_alignment)."""

import json
import math
import os
import sys

import pytest
import torch

from dmdx.training.diagnostics import sample_specific_alignment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_alignment_known_cases():
    gaps = torch.eye(4, 8) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # orthogonal per-sample gaps
    common = torch.full((8,), 5.0)
    own = sample_specific_alignment(gaps + common, gaps)  # each sample's own gap on top of a common push
    assert own["alignment"] == pytest.approx(1.0)
    assert own["alignment_raw"] < 0.9  # without removing the means the common push hides it
    assert 0.5 < own["common_fraction"] < 1
    batch_only = sample_specific_alignment(common.expand(4, 8).clone(), gaps)  # the same push for every sample
    assert batch_only["alignment"] == 0.0 and batch_only["common_fraction"] == pytest.approx(1.0)
    other = sample_specific_alignment(gaps.roll(1, dims=0), gaps)  # another sample's gap
    assert other["alignment_shuffled"] == pytest.approx(1.0) and other["alignment"] < 0.5
    torch.manual_seed(0)
    noise = sample_specific_alignment(torch.randn(64, 4096), torch.randn(64, 4096))
    assert abs(noise["alignment"]) < 0.02 and abs(noise["alignment_shuffled"]) < 0.02
    flipped = sample_specific_alignment(-gaps, gaps)
    assert flipped["alignment"] == pytest.approx(-1.0)
    assert math.isnan(sample_specific_alignment(gaps[:1], gaps[:1])["alignment"])
    with pytest.raises(ValueError, match="differ"):
        sample_specific_alignment(gaps, gaps[:, :4])


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> str:
    from diffusers import StableDiffusion3Pipeline

    from dmdx.pipelines.tiny_components import sd3_components

    path = str(tmp_path_factory.mktemp("tiny") / "tiny-sd3")
    components = {k: v for k, v in sd3_components(sample_size=8, num_layers=2).items()
                  if k not in ("image_encoder", "feature_extractor")}
    StableDiffusion3Pipeline(**components).save_pretrained(path)
    return path


def test_probe_smoke(tiny_sd3, prompts_file, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import adm_probe

    out = tmp_path / "probe"
    adm_probe.main(["--teacher_dir", tiny_sd3, "--prompts_file", prompts_file, "--output_dir", str(out),
                    "--variants", "pooled:1", "per_position:1", "--train_batch_size", "4", "--max_updates", "6",
                    "--min_updates", "4", "--window", "2", "--pool_batches", "2", "--eval_batches", "1",
                    "--cost_iterations", "1", "--discriminator_lr", "1e-3"])
    result = json.loads((out / "adm_probe.json").read_text())
    assert "per_position:1" in (out / "adm_probe.md").read_text()
    assert [r["variant"] for r in result["variants"]] == ["pooled:1", "per_position:1"]
    for row in result["variants"]:
        assert 4 <= row["d_updates"] <= 6 and row["stopped"] in ("plateau", "max_updates")
        assert row["cpu_s_per_adm_iteration"] > 0 and row["cpu_s_per_head_update"] > 0
        assert row["before"]["hinge_loss"] == pytest.approx(2.0)  # zero-initialised heads: every logit 0
        for key in ("d_accuracy", "d_pair_order"):
            assert 0 <= row["after"][key] <= 1
        for key in ("alignment_adm", "alignment_adm_shuffled", "alignment_adm_raw", "alignment_dmd"):
            assert -1 <= row["after"][key] <= 1
        assert 0 <= row["after"]["adm_common_fraction"] <= 1 + 1e-9
        assert row["after"]["alignment_dmd"] > 0.5  # DMD's direction is the gap's, up to a per-sample scale
        assert all(math.isfinite(v) for v in row["hinge_windows"])
        assert row["after"]["alignment_adm_raw"] != 0  # the heads trained: D has a gradient now
    with pytest.raises(SystemExit):
        adm_probe.parse_args(["--output_dir", str(out), "--variants", "patch:1"])


def test_digits_fair_update_budget_and_published_cells():
    """The grid's update-count budget (one value or one per seed) and the published cells it is compared with."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import digits_fair

    args = digits_fair.parse_args(["--output_dir", "x", "--methods", "adm", "--seeds", "0", "1", "2",
                                   "--max_updates", "60", "87", "91", "--adm_flags",
                                   "--discriminator_head_output per_position"])
    assert [digits_fair.update_limit(args, s) for s in (0, 1, 2)] == [60, 87, 91]
    assert args.adm_flags == ["--discriminator_head_output", "per_position"]
    one = digits_fair.parse_args(["--output_dir", "x", "--max_updates", "50"])
    assert digits_fair.update_limit(one, 2) == 50
    assert digits_fair.update_limit(digits_fair.parse_args(["--output_dir", "x"]), 0) is None  # CPU budget
    for bad in (["--max_updates", "60", "87"], ["--max_updates", "20"]):
        with pytest.raises(SystemExit):
            digits_fair.parse_args(["--output_dir", "x", *bad])
    cells = digits_fair.published_cells(os.path.join(REPO, "benchmarks", "results", "digits_fair_sd3.json"))["cells"]
    assert cells["adm"]["cell"] == "adm_lr2e-06_r5"
    assert [v["step"] for v in cells["adm"]["per_seed"].values()] == [60, 87, 91]
