"""benchmarks/mixture_faithful.py at tiny budgets: artifacts and their fields, every remedy's code path, the gradient
paths of the faithful ADM step, the target rule, and flags that must fail before any training."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mixture_faithful as mf  # noqa: E402

TINY = ["--teacher_steps", "30", "--start_steps", "10", "--fake_score_warmup_steps", "5", "--num_pairs", "128",
        "--ode_steps", "4", "--num_eval_samples", "200", "--max_train_steps", "6", "--eval_every", "3",
        "--log_every", "3", "--train_batch_size", "32"]


def test_grid_smoke_writes_artifacts(tmp_path):
    out = mf.main(["--grid", "--cells", "dmd_1to1", "adm_paper", "--seeds", "0", "--output_dir", str(tmp_path),
                   *TINY])
    saved = json.loads((tmp_path / "mixture_faithful.json").read_text())
    assert (tmp_path / "mixture_faithful.png").stat().st_size > 1000
    assert set(saved["cells"]) == {"dmd_1to1", "adm_paper"} == set(out["cells"])
    adm = saved["cells"]["adm_paper"]
    assert adm["method"] == "adm" and adm["settings"]["ode_step_dt"] == pytest.approx(1 / 64)
    run = adm["runs"][0]
    assert [h["update"] for h in run["history"]] == [0, 3, 6]
    assert {"modes_covered", "energy_to_teacher", "energy_to_true", "seconds"} <= set(run["history"][-1])
    logged = run["diagnostics"][-1]
    for key in ("d_accuracy", "d_accuracy_band0", "d_accuracy_band1", "logit_gap_band1", "d_pair_order",
                "pred_gap_rel", "batch_coherence", "cos_adm_dmd_params", "cos_adm_dmd_per_sample", "output_shift",
                "output_shift_common_fraction", "dmd_loss"):
        assert key in logged, key
    assert 0 <= logged["d_pair_order"] <= 1 and -1 <= logged["batch_coherence"] <= 1
    dmd_logged = saved["cells"]["dmd_1to1"]["runs"][0]["diagnostics"][-1]
    assert "batch_coherence" in dmd_logged and "d_accuracy" not in dmd_logged
    summary = adm["summary"]["final"]
    assert 0 <= summary["modes_covered"]["mean"] <= 5 and summary["energy_to_teacher"]["mean"] > 0
    assert saved["references"]["teacher"]["modes_covered"]["mean"] >= 0
    assert set(saved["target"]["cells"]) == {"adm_paper"}
    assert saved["target"]["references"]["best_dmd"] == "dmd_1to1"
    md = (tmp_path / "mixture_faithful.md").read_text()
    for text in ("## Target (issue 11)", "| adm_paper | adm |", "| dmd_1to1 | dmd |", "energy to teacher",
                 "coherence early / late", "--cells dmd_1to1 adm_paper"):
        assert text in md, text


def test_every_remedy_runs_in_one_custom_cell(tmp_path):
    out = mf.main(["--method", "adm", "--seeds", "1", "--output_dir", str(tmp_path), "--no_plot", "--dim", "4",
                   "--generator_gradient", "remove_batch_mean", "--max_grad_norm", "1.0", "--r1_weight", "0.1",
                   "--r2_weight", "0.1", "--r1", "exact", "--discriminator_update_ratio", "2",
                   "--discriminator_warmup_steps", "2",
                   "--ode_step_mode", "relative", "--ode_step_dt", "1/32", "--renoise", "shared",
                   "--renoise_min_fraction", "0.5", "--head_layers", "1", "--fake_score_update_ratio", "2",
                   "--discriminator_input_precision", "bf16", "--schedule", "vp", *TINY])
    run = out["cells"]["adm_custom"]["runs"][0]
    assert run["final"]["update"] == 6 and math.isfinite(run["final"]["energy_to_teacher"])
    assert not (tmp_path / "mixture_faithful.png").exists()
    assert (tmp_path / "mixture_faithful.md").exists()
    assert out["target"] == {}
    approximate = mf.main(["--method", "adm", "--seeds", "0", "--output_dir", str(tmp_path), "--no_plot",
                           "--r1_weight", "10", "--r2_weight", "10", "--r1", "approximate", "--generator_gradient",
                           "normalize", *TINY])
    assert math.isfinite(approximate["cells"]["adm_custom"]["runs"][0]["final"]["energy_to_teacher"])


@pytest.fixture(scope="module")
def tiny_setup():
    args = mf.parse_args(["--seeds", "0", *TINY])
    return args, mf.Setup(args, 0)


def test_adm_generator_update_reaches_only_the_generator(tiny_setup):
    args, setup = tiny_setup
    run = mf.Run(args, setup)
    try:
        before = {name: [p.detach().clone() for p in net.parameters()]
                  for name, net in (("fake_score", run.fake_score), ("heads", run.heads), ("teacher", run.teacher))}
        torch.nn.init.normal_(run.heads.heads[0][-1].weight)  # a non-zero D, so the generator gets a gradient
        run.update_generator(diagnose=False)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in run.generator.parameters())
        for net in (run.fake_score, run.heads, run.teacher):
            assert all(p.grad is None for p in net.parameters())
        for name, net in (("fake_score", run.fake_score), ("teacher", run.teacher)):
            assert all(torch.equal(a, b) for a, b in zip(before[name], net.parameters()))
        assert all(p.requires_grad for p in run.fake_score.parameters())  # unfrozen again after the step
        assert not any(p.requires_grad for p in run.teacher.parameters())
    finally:
        run.close()


def test_discriminator_is_heads_on_the_teachers_block_features(tiny_setup):
    args, setup = tiny_setup
    run = mf.Run(args, setup)
    try:
        x, level = torch.randn(8, args.dim), torch.full((8,), 300.0)
        assert torch.equal(run.discriminate(x, level), torch.zeros(8))  # zero-initialised heads: chance
        features = run.taps(lambda: setup.teacher(x, level))
        assert [f.shape for f in features] == [(8, args.hidden)] * len(mf.FEATURE_BLOCKS)
        batch = run.update_discriminator()
        assert batch["logits_real"].shape == (args.train_batch_size,)
        assert all(p.grad is None for p in run.generator.parameters())
        assert any(p.grad is not None for p in run.heads.parameters())
    finally:
        run.close()


def cell(method, modes, energy, ema=None):
    final = {"late_modes_covered": {"mean": modes, "sd": 0.0}, "late_energy_to_teacher": {"mean": energy, "sd": 0.0}}
    if ema is not None:
        final.update(ema_modes_covered={"mean": ema[0], "sd": 0.0}, ema_energy_to_teacher={"mean": ema[1], "sd": 0.0})
    return {"method": method, "summary": {"final": final}}


def test_target_rule():
    cells = {"dmd_1to1": cell("dmd", 4, 0.020), "dmd_5to1": cell("dmd", 5, 0.010),
             "adm_a": cell("adm", 5, 0.0125), "adm_b": cell("adm", 5, 0.0126), "adm_c": cell("adm", 4, 0.005)}
    target = mf.target_check(cells)
    assert target["references"] == {"best_dmd": "dmd_5to1", "dmd_1to1": "dmd_1to1"}
    assert target["cells"]["adm_a"]["best_dmd"]["meets"]  # 1.25x exactly
    assert not target["cells"]["adm_b"]["best_dmd"]["meets"]
    assert not target["cells"]["adm_c"]["best_dmd"]["meets"] and target["cells"]["adm_c"]["dmd_1to1"]["meets"]
    assert "ema" not in target
    assert mf.target_check({"adm_a": cell("adm", 5, 0.01)}) == {}
    with_ema = mf.target_check({"dmd_1to1": cell("dmd", 4, 0.02, ema=(4, 0.01)),
                                "adm_a": cell("adm", 3, 0.02, ema=(4, 0.012))})
    assert not with_ema["cells"]["adm_a"]["best_dmd"]["meets"]  # fewer modes on the raw generator
    assert with_ema["ema"]["cells"]["adm_a"]["best_dmd"]["meets"]  # 1.2x on the EMA generators


def test_from_json_rewrites_the_artifacts(tmp_path):
    mf.main(["--grid", "--cells", "dmd_1to1", "adm_lr_low", "--seeds", "0", "--output_dir", str(tmp_path / "a"),
             "--no_plot", *TINY])
    saved = tmp_path / "a" / "mixture_faithful.json"
    again = mf.main(["--from_json", str(saved), "--output_dir", str(tmp_path / "b")])
    first, second = json.loads(saved.read_text()), json.loads((tmp_path / "b" / "mixture_faithful.json").read_text())
    assert second["cells"] == first["cells"] and second["target"] == first["target"]
    assert second["command"] == first["command"] and set(again["cells"]) == {"dmd_1to1", "adm_lr_low"}
    assert (tmp_path / "b" / "mixture_faithful.png").exists()
    assert (tmp_path / "b" / "mixture_faithful.md").read_text() == (tmp_path / "a" / "mixture_faithful.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--grid", "--cells", "adm_paper", "adm_nope"], "unknown --cells"),
    (["--cells", "adm_paper"], "--cells needs --grid"),
    (["--generator_gradient", "clip"], "invalid choice"),
    (["--ode_step_dt", "2"], "--ode_step_dt"),
    (["--ode_step_dt", "1/8"], "--min_timestep_percent >= --ode_step_dt"),
    (["--dim", "1"], "--dim"),
    (["--weights", "1,2"], "--weights needs 5"),
    (["--generator_gradient", "remove_batch_mean", "--train_batch_size", "1"], "remove_batch_mean"),
    (["--from_json", "/nonexistent/mixture_faithful.json"], "is not a file"),
])
def test_bad_flags_fail_before_training(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        mf.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
