"""What a real run needs is installed by one command, and what is missing stops the run early and names the package:
``--report_to X`` at parse time, a tokenizer that cannot be read before any denoiser loads; the recipes run from any
folder and pass every SDXL stage the fp16 weights variant."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
from conftest import REPO, SCRIPTS, TINY_PROMPTS


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hide_packages(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in names else real(name, *a))


@pytest.mark.parametrize("report_to, package", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                                ("all", "tensorboard")])
def test_report_to_without_its_package_is_a_parse_error(report_to, package, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    _hide_packages(monkeypatch, "tensorboard", "tensorboardX", "wandb")
    script = _load_script("train_adm_sd3")
    argv = ["--pretrained_model_name_or_path", "unused", "--prompts_file", str(prompts)]
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([*argv, "--report_to", report_to])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--report_to {report_to}" in err and package in err and ("not installed" in err or "none of" in err), err
    assert script.parse_args([*argv, "--report_to", "none"]).report_to == "none"


def test_an_unreadable_tokenizer_stops_the_run_before_any_denoiser_loads(tmp_path, monkeypatch):
    """A T5 tokenizer folder holding only spiece.model (what CogVideoX ships) without sentencepiece: a UsageError
    naming the folder and the packages, raised before the transformer (here without weights) would load."""
    from diffusers import CogVideoXPipeline

    from dmdx.pipelines.tiny_components import cogvideox_components
    from dmdx.training.errors import UsageError

    teacher = tmp_path / "cog"
    CogVideoXPipeline(**cogvideox_components()).save_pretrained(teacher)
    for name in os.listdir(teacher / "tokenizer"):
        if name != "tokenizer_config.json":
            os.remove(teacher / "tokenizer" / name)
    (teacher / "tokenizer" / "spiece.model").write_bytes(b"\x00 not read without sentencepiece")
    for name in os.listdir(teacher / "transformer"):  # config only: loading the denoiser would fail
        if name.endswith(".safetensors"):
            os.remove(teacher / "transformer" / name)
    (tmp_path / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    script = _load_script("train_adm_cogvideox")
    args = script.parse_args(["--pretrained_model_name_or_path", "cog", "--prompts_file", "prompts.txt",
                              "--num_frames", "9", "--height", "16", "--width", "16", "--report_to", "none",
                              "--output_dir", "out"])
    monkeypatch.setattr("dmdx.training.loop.build_models", lambda *a, **k: pytest.fail("a denoiser would load"))
    hint = "sentencepiece" if importlib.util.find_spec("sentencepiece") is None else ""
    with pytest.raises(UsageError, match=f"'cog': cannot load tokenizer \\(T5Tokenizer.*{hint}"):
        script.main(args)


def test_recipes_run_from_any_folder_with_the_cache_and_every_sdxl_stage_takes_fp16():
    recipes = os.path.join(REPO, "distill_scripts", "recipes")
    for recipe in sorted(os.listdir(recipes)):
        for name in os.listdir(os.path.join(recipes, recipe)):
            if not name.endswith(".sh"):
                continue
            text = open(os.path.join(recipes, recipe, name)).read()
            commands = re.findall(r"^accelerate launch.*?(?<!\\)\n", text, flags=re.S | re.M)
            assert commands, name
            for command in commands:
                # the script and the config are found from the recipe's own folder, not the current one
                assert '"$ROOT/distill_scripts/' in command and "--config_file \"$CONFIG\"" in command, command
                assert "--text_embeddings_cache" in command, command
                if recipe == "sdxl":
                    assert "--variant fp16" in command, command
            assert 'ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)' in text
            assert "${CONFIG:-$ROOT/" in text


def test_one_command_installs_what_the_recipes_use():
    """The train extra and requirements-train.txt name the same packages: the tracker the recipes log to, the T5
    tokenizer's sentencepiece + protobuf, 8-bit Adam."""
    with open(os.path.join(REPO, "requirements-train.txt")) as f:
        pinned = {line.split("==")[0] for line in f if line.strip() and not line.startswith("#")}
    with open(os.path.join(REPO, "setup.py")) as f:
        extra = re.search(r'"train": \[(.*?)\]', f.read()).group(1)
    named = {re.match(r'"([A-Za-z0-9_-]+)', part.strip()).group(1) for part in extra.split(",") if part.strip()}
    assert pinned == named == {"tensorboard", "sentencepiece", "protobuf", "bitsandbytes"}
    recipes = os.path.join(REPO, "distill_scripts", "recipes")
    text = "".join(open(os.path.join(recipes, r, n)).read() for r in os.listdir(recipes)
                   for n in os.listdir(os.path.join(recipes, r)) if n.endswith(".sh"))
    assert "--report_to tensorboard" in text and "--use_8bit_adam" in text and "wandb" not in text
