"""Every ADM remedy flag (issue 11) reaches the shared loop: on the tiny SDXL teacher, two iterations with the flag
end with a different generator or discriminator than the paper's default does from the same seed, every logged
value stays finite, and the remedy's own signal is logged where it has one. (The update-ratio, warm-up and lr flags
are exercised by the script tests.) (The remedies' formulas are tested in
test_remedies.py; what they do to quality is benchmarks/mixture_faithful.py's job.)"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PROMPTS

BASE = ["--resolution", "32", "--train_batch_size", "2", "--generator_lr", "1e-3", "--fake_score_lr", "1e-3",
        "--discriminator_lr", "1e-2", "--discriminator_head_channels", "16", "--diagnostics_steps", "0",
        "--guidance_scale", "3"]


def run_two_iterations(tiny_sdxl, tmp_path, *flags, mixed_precision: str = "no",
                       inspect=None) -> tuple[dict, dict, list[dict]]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dmdx.pipelines.teachers import SDXLTeacher
    from dmdx.training.cli import distillation_parser, finish_distillation_args
    from dmdx.training.loop import PromptSource, build_discriminator, build_models, prepare_models, train_iteration

    parser = distillation_parser("test")
    args = finish_distillation_args(parser, _parse(parser, tiny_sdxl, tmp_path, flags))
    teacher = SDXLTeacher(tiny_sdxl, resolution=32)
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    try:
        torch.manual_seed(0)
        models = build_models(teacher, args, accelerator, None)
        teacher.load_text_encoders("cpu", torch.float32)
        source = PromptSource(teacher, TINY_PROMPTS, "cpu", precompute=True)
        build_discriminator(teacher, args, models, source.negative, "cpu")
        prepare_models(args, accelerator, models)
        if inspect is not None:
            inspect(models, teacher, source)
        logs = [train_iteration(models, teacher, args, accelerator, source, step) for step in range(2)]
        params = lambda module: {n: p.detach().clone() for n, p in module.named_parameters()}
        return params(models.generator), params(models.discriminator_heads), logs
    finally:
        AcceleratorState._reset_state(True)


def _parse(parser, teacher, tmp_path, flags):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS))
    return parser.parse_args(["--pretrained_model_name_or_path", teacher, "--output_dir", str(tmp_path / "out"),
                              "--prompts_file", str(prompts), *BASE, *flags])


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def baseline(tiny_sdxl, tmp_path_factory):
    return run_two_iterations(tiny_sdxl, tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("flags, moves, logged", [
    (["--generator_gradient", "normalize"], "generator", None),
    (["--generator_gradient", "remove_batch_mean"], "generator", None),
    (["--ode_step_mode", "relative", "--ode_step_dt", "0.03125"], "generator", None),
    (["--discriminator_renoise", "shared", "--discriminator_renoise_min", "0.5"], "discriminator", None),
    (["--discriminator_r1_weight", "100"], "discriminator", "loss_r1"),
    (["--discriminator_r1_weight", "10", "--discriminator_r1", "exact"], "discriminator", "loss_r1"),
    (["--discriminator_r2_weight", "100"], "discriminator", "loss_r2"),
    (["--discriminator_r2_weight", "10", "--discriminator_r1", "exact"], "discriminator", "loss_r2"),
    (["--discriminator_head_depth", "1"], "discriminator", None),
])
def test_remedy_flag_changes_the_run(flags, moves, logged, baseline, tiny_sdxl, tmp_path):
    generator, heads, logs = run_two_iterations(tiny_sdxl, tmp_path, *flags)
    base_generator, base_heads, _ = baseline
    assert all(v == v and abs(v) != float("inf") for entry in logs for v in entry.values()), logs
    if moves == "generator":
        assert differs(generator, base_generator)
    elif flags[0] == "--discriminator_head_depth":
        assert len(heads) < len(base_heads)  # fewer layers per head
    else:  # D's first update already differs (the generator's follows one iteration later)
        assert differs(heads, base_heads)
    if logged:  # D's last layer starts at zero: its slope, and so the penalty, is zero at the first update
        assert logs[0][logged] == 0 and logs[1][logged] > 0, logged


def test_remedies_are_off_by_default_and_validated(tiny_sdxl, tmp_path, capsys):
    from dmdx.training.cli import distillation_parser, finish_distillation_args

    parser = distillation_parser("test")
    args = finish_distillation_args(parser, _parse(parser, tiny_sdxl, tmp_path, []))
    assert (args.generator_gradient, args.ode_step_mode, args.discriminator_renoise, args.discriminator_r1_weight,
            args.discriminator_r2_weight, args.discriminator_head_depth, args.discriminator_precision) == (
        "none", "fixed", "none", 0.0, 0.0, 3, "mixed")
    for flags, message in ((["--generator_gradient", "remove_batch_mean", "--train_batch_size", "1"],
                            "needs --train_batch_size >= 2"),
                           (["--discriminator_r1_weight", "-1"], "--discriminator_r1_weight must be >= 0"),
                           (["--discriminator_r2_weight", "-1"], "--discriminator_r2_weight must be >= 0"),
                           (["--discriminator_precision", "fp8"], "invalid choice"),
                           (["--discriminator_renoise_min", "2"], "--discriminator_renoise_min is a fraction"),
                           (["--ode_step_mode", "sometimes"], "invalid choice")):
        with pytest.raises(SystemExit):
            finish_distillation_args(parser, _parse(parser, tiny_sdxl, tmp_path, flags))
        assert message in capsys.readouterr().err


def test_fp32_discriminator_sees_the_gap_bf16_rounds_away(tiny_sdxl, tmp_path):
    """--discriminator_precision fp32 under bf16: D's backbone is an fp32 copy of the (bf16) teacher, and it and the
    heads run with autocast off. A change of 1e-4 to D's input (the size of the gap between ADM's two ODE-step
    outputs at dt = T/64) moves D's features and logits as an fp64 D says it should; through the bf16 teacher it is
    mostly rounding."""
    import copy
    import dataclasses

    from dmdx.training import BackboneFeatures
    from dmdx.training.steps import discriminator_features, discriminator_logits

    seen = {}

    def inspect(models, teacher, source):
        x = torch.randn((8, *models.latent_shape), generator=torch.Generator().manual_seed(0))
        s = torch.full((8,), 300.0)
        cond = {k: v.expand(8, *v.shape[1:]) for k, v in source.negative.items()}
        heads = copy.deepcopy(models.discriminator_heads)
        torch.manual_seed(0)
        for p in heads.parameters():  # D's last layer starts at zero: a random one gives non-zero logits
            if not p.any():
                torch.nn.init.normal_(p, std=0.1)

        def change(m, heads):
            before, after = (discriminator_features(m, teacher, x_in, s, cond) for x_in in (x, x + 1e-4))
            logits = [discriminator_logits(m, teacher, heads, x_in, s, cond, False) for x_in in (x, x + 1e-4)]
            return (torch.cat([(b - a).flatten() for a, b in zip(before, after)]),
                    (logits[1] - logits[0]).flatten())

        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            seen["backbone_dtype"] = next(models.discriminator_backbone.parameters()).dtype
            seen["teacher_dtype"] = next(models.teacher_base.parameters()).dtype
            seen["heads_fp32"] = models.discriminator_heads.fp32
            seen["fp32"] = change(models, heads)
            # the same blocks of the bf16 teacher itself, as without the flag
            on_teacher = BackboneFeatures(models.teacher_base, models.features.module_names,
                                          select=teacher.feature_selector(models.latent_shape))
            heads_plain = copy.deepcopy(heads)  # and heads that follow autocast, as without the flag
            heads_plain.fp32 = False
            seen["bf16"] = change(dataclasses.replace(models, discriminator_backbone=None, features=on_teacher),
                                  heads_plain)
            on_teacher.remove()
            models.discriminator_backbone.double()
            seen["fp64"] = change(models, copy.deepcopy(heads).double())
            models.discriminator_backbone.float()

    generator, heads, logs = run_two_iterations(tiny_sdxl, tmp_path, "--discriminator_precision", "fp32",
                                                mixed_precision="bf16", inspect=inspect)
    assert seen["teacher_dtype"] == torch.bfloat16 and seen["backbone_dtype"] == torch.float32 and seen["heads_fp32"]
    cosine = lambda a, b: torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()
    for part in (0, 1):  # features, logits
        assert cosine(seen["fp32"][part], seen["fp64"][part]) > 0.99, part
        assert cosine(seen["bf16"][part], seen["fp64"][part]) < 0.9, part
    assert all(v == v and abs(v) != float("inf") for entry in logs for v in entry.values()), logs
    # without mixed precision the flag changes nothing: no copy is made
    (tmp_path / "no").mkdir()
    run_two_iterations(tiny_sdxl, tmp_path / "no", "--discriminator_precision", "fp32",
                       inspect=lambda models, *_: seen.update(copy=models.discriminator_backbone))
    assert seen["copy"] is None
