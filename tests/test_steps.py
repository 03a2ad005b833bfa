"""dmdx.training.steps: the distribution loss chosen once from --distribution_loss, and what each answers."""

from __future__ import annotations

import types
from contextlib import nullcontext

import pytest

from dmdx.training.cli import distillation_parser
from dmdx.training.steps import ADM, DMD, distribution_loss


def _args(*argv: str):
    return distillation_parser("test").parse_args(["--pretrained_model_name_or_path", "teacher", *argv])


def test_the_flag_chooses_the_object():
    assert isinstance(distribution_loss(_args()), ADM)  # the CLI's default is the paper's loss
    assert isinstance(distribution_loss(_args("--distribution_loss", "dmd")), DMD)
    assert distribution_loss(_args()).has_discriminator and not distribution_loss(
        _args("--distribution_loss", "dmd")).has_discriminator


def test_method_names_on_the_card():
    """ADM from the teacher is "adm", from an ADP student "dmdx" (the paper's two-stage method); DMD2 is "dmd"."""
    assert ADM().method(None) == "adm" and ADM().method("adp-student") == "dmdx"
    assert DMD().method(None) == DMD().method("adp-student") == "dmd"


def test_frozen_pass_checkpointing_is_adm_only():
    """DMD2's frozen passes run without gradients: --gradient_checkpointing_frozen_passes changes nothing there (the
    ADM side, which recomputes blocks, is tests/test_frozen_checkpointing.py)."""
    flag = lambda on: types.SimpleNamespace(args=types.SimpleNamespace(gradient_checkpointing_frozen_passes=on))
    assert isinstance(DMD().frozen_passes(flag(True)), nullcontext)
    assert isinstance(ADM().frozen_passes(flag(False)), nullcontext)


def test_unknown_loss_is_refused():
    with pytest.raises(KeyError):
        distribution_loss(types.SimpleNamespace(distribution_loss="gan"))
