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


def run_two_iterations(tiny_sdxl, tmp_path, *flags) -> tuple[dict, dict, list[dict]]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dmdx.pipelines.teachers import SDXLTeacher
    from dmdx.training.cli import distillation_parser, finish_distillation_args
    from dmdx.training.loop import PromptSource, build_discriminator, build_models, prepare_models, train_iteration

    parser = distillation_parser("test")
    args = finish_distillation_args(parser, _parse(parser, tiny_sdxl, tmp_path, flags))
    teacher = SDXLTeacher(tiny_sdxl, resolution=32)
    accelerator = Accelerator(cpu=True)
    try:
        torch.manual_seed(0)
        models = build_models(teacher, args, accelerator, None)
        teacher.load_text_encoders("cpu", torch.float32)
        source = PromptSource(teacher, TINY_PROMPTS, "cpu", precompute=True)
        build_discriminator(teacher, args, models, source.negative, "cpu")
        prepare_models(args, accelerator, models)
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
            args.discriminator_head_depth) == ("none", "fixed", "none", 0.0, 3)
    for flags, message in ((["--generator_gradient", "remove_batch_mean", "--train_batch_size", "1"],
                            "needs --train_batch_size >= 2"),
                           (["--discriminator_r1_weight", "-1"], "--discriminator_r1_weight must be >= 0"),
                           (["--discriminator_renoise_min", "2"], "--discriminator_renoise_min is a fraction"),
                           (["--ode_step_mode", "sometimes"], "invalid choice")):
        with pytest.raises(SystemExit):
            finish_distillation_args(parser, _parse(parser, tiny_sdxl, tmp_path, flags))
        assert message in capsys.readouterr().err
