"""The bad-input catalogue (README "Reliability"): every case, run as users run the scripts (the scripts'
``__main__`` path, in-process for speed), must exit non-zero with a message naming the flag or file, before any
model weights load, with no traceback, and leave the output folder byte-identical."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil

import pytest
from conftest import REPO

SCRIPTS = {name: os.path.join(REPO, "distill_scripts", f"{name}.py")
           for name in ("train_adm_sdxl", "train_adm_sd3", "train_adm_cogvideox", "train_adp_sdxl",
                        "collect_ode_pairs", "train_adm_wan")}
_modules = {}


def script(name: str):
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(f"cli_{name}", SCRIPTS[name])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


def snapshot(folder: str) -> dict:
    if not os.path.exists(folder):
        return {}
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tiny_sdxl, prompts_file, tmp_path_factory):
    """Teachers, prompts and prepared folders the cases point at (configs and small files only)."""
    from diffusers import CogVideoXPipeline, StableDiffusion3Pipeline

    from dmdx.pipelines.tiny_components import cogvideox_components, sd3_components

    root = tmp_path_factory.mktemp("bad_input")
    sd3 = str(root / "tiny-sd3")
    components = sd3_components(sample_size=8, num_layers=2)
    StableDiffusion3Pipeline(**{k: v for k, v in components.items()
                                if k not in ("image_encoder", "feature_extractor")}).save_pretrained(sd3)
    no_t5 = root / "sd3-no-t5"
    for sub in ("transformer", "vae", "scheduler"):
        shutil.copytree(os.path.join(sd3, sub), no_t5 / sub)
    index = json.loads(open(os.path.join(sd3, "model_index.json")).read())
    (no_t5 / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None],
                                                        "tokenizer_3": [None, None]}))
    teacher_copy = shutil.copytree(tiny_sdxl, root / "teacher-copy")  # a "generator" that is just the teacher
    (root / "empty.txt").write_text("\n \n")
    (root / "captions.jsonl").write_text('{"caption": "a cat"}\n')
    pairs = root / "pairs-64"  # ODE pairs of this teacher, but at another resolution
    pairs.mkdir()
    (pairs / "manifest.json").write_text(json.dumps({"teacher": tiny_sdxl, "resolution": 64,
                                                     "latent_shape": [4, 32, 32]}))
    (root / "no-pairs").mkdir()
    CogVideoXPipeline(**cogvideox_components()).save_pretrained(root / "cog")  # rotary (5b style), 48 T5 tokens
    CogVideoXPipeline(**cogvideox_components(use_rotary_positional_embeddings=False)).save_pretrained(
        root / "cog-sincos")  # sin-cos positional embeddings (2b style): exactly 48 T5 tokens
    from diffusers import WanPipeline

    from dmdx.pipelines.tiny_components import wan_components

    WanPipeline(**wan_components()).save_pretrained(root / "wan")  # 9 frames at 16x16, VAE factors 2 (time, space)
    two_experts = shutil.copytree(root / "wan", root / "wan-two-experts")  # Wan 2.2 A14B-style: two transformers
    shutil.copytree(root / "wan" / "transformer", two_experts / "transformer_2")
    index = json.loads((root / "wan" / "model_index.json").read_text())
    (two_experts / "model_index.json").write_text(json.dumps(
        {**index, "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}))
    return {"sdxl": tiny_sdxl, "sd3": sd3, "no_t5": str(no_t5), "copy": str(teacher_copy), "prompts": prompts_file,
            "wan": str(root / "wan"), "wan_two_experts": str(two_experts),
            "cog": str(root / "cog"), "cog_sincos": str(root / "cog-sincos"),
            "empty": str(root / "empty.txt"), "captions": str(root / "captions.jsonl"), "pairs64": str(pairs),
            "no_pairs": str(root / "no-pairs"), "root": root}


def finished_run(world, tmp_path, provenance_edit=None, step: int = 2) -> str:
    """An output folder as a finished SDXL ADM run leaves it: config, log, a checkpoint whose provenance is this
    run's own (``provenance_edit`` alters it, None-returning edits drop the file)."""
    from dmdx.pipelines.teachers import SDXLTeacher
    from dmdx.training import student_timesteps
    from dmdx.training.loop import run_provenance

    adm = script("train_adm_sdxl")
    out = tmp_path / "finished"
    args = adm.parse_args(["--pretrained_model_name_or_path", world["sdxl"], "--prompts_file", world["prompts"],
                           "--resolution", "32", "--output_dir", str(out)])
    teacher = SDXLTeacher(world["sdxl"], resolution=32)
    provenance = run_provenance(teacher, args, "dmdx-adm-sdxl", None, student_timesteps(
        teacher.student_scheduler(1), 1))
    checkpoint = out / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"not really")
    (out / "training_config.json").write_text(json.dumps({"run_id": provenance["run_id"]}))
    (out / "train_log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    if provenance_edit is not None:
        provenance = provenance_edit(provenance)
    if provenance is not None:
        (checkpoint / "dmdx_provenance.json").write_text(json.dumps({**provenance, "step": step}))
    return str(out)


def _adm(*extra, teacher="sdxl", prompts=True):
    def build(world, out):
        argv = ["--pretrained_model_name_or_path", world[teacher], "--resolution", "32" if teacher == "sdxl" else "16",
                "--output_dir", out, "--train_batch_size", "2"]
        if prompts:
            argv += ["--prompts_file", world["prompts"]]
        return "train_adm_sdxl" if teacher in ("sdxl", "copy") else "train_adm_sd3", argv + [
            a.format(**world) if isinstance(a, str) else str(a) for a in extra]
    return build


def _sd3(*extra, teacher="sd3"):
    def build(world, out):
        return "train_adm_sd3", ["--pretrained_model_name_or_path", world[teacher], "--prompts_file", world["prompts"],
                                 "--resolution", "16", "--output_dir", out, "--max_sequence_length", "16",
                                 *[a.format(**world) for a in extra]]
    return build


def _cog(*extra, teacher="cog"):
    def build(world, out):
        return "train_adm_cogvideox", ["--pretrained_model_name_or_path", world[teacher], "--prompts_file",
                                       world["prompts"], "--output_dir", out, "--num_frames", "9",
                                       *[a.format(**world) for a in extra]]
    return build


def _wan(*extra, teacher="wan"):
    def build(world, out):
        return "train_adm_wan", ["--pretrained_model_name_or_path", world[teacher], "--prompts_file",
                                 world["prompts"], "--output_dir", out, "--num_frames", "9", "--height", "16",
                                 "--width", "16", *[a.format(**world) for a in extra]]
    return build


def _adp(*extra, pairs="pairs64"):
    def build(world, out):
        return "train_adp_sdxl", ["--pretrained_model_name_or_path", world["sdxl"], "--ode_pairs_dir", world[pairs],
                                  "--pixel_discriminator_model", "none", "--resolution", "32", "--output_dir", out,
                                  *[a.format(**world) for a in extra]]
    return build


def _collect(*extra, teacher="sdxl"):
    def build(world, out):
        return "collect_ode_pairs", ["--pretrained_model_name_or_path", world[teacher], "--prompts_file",
                                     world["prompts"], "--output_dir", out, *[a.format(**world) for a in extra]]
    return build


CASES = {  # name: (command builder, text the message must contain)
    # numbers out of range, named by their flag
    "generator lr 0": (_adm("--generator_lr", 0), "--generator_lr must be > 0"),
    "negative generator lr": (_adm("--generator_lr=-1e-5"), "--generator_lr must be > 0"),
    "fake score lr 0": (_adm("--fake_score_lr", 0), "--fake_score_lr must be > 0"),
    "negative discriminator lr": (_adm("--discriminator_lr=-1e-5"), "--discriminator_lr must be > 0"),
    "negative LoRA rank": (_adm("--lora_rank", -4), "--lora_rank must be >= 0"),
    "negative fake-score LoRA rank": (_adm("--fake_score_lora_rank", -1), "--fake_score_lora_rank must be >= 0"),
    "batch size 0": (_adm("--train_batch_size", 0), "--train_batch_size must be >= 1"),
    "zero steps": (_adm("--max_train_steps", 0), "--max_train_steps must be >= 1"),
    "accumulation 0": (_adm("--gradient_accumulation_steps", 0), "--gradient_accumulation_steps must be >= 1"),
    "checkpointing every 0": (_adm("--checkpointing_steps", 0), "--checkpointing_steps must be >= 1"),
    "validation every 0": (_adm("--validation_steps", 0), "--validation_steps must be >= 1"),
    "zero student steps": (_adm("--num_student_steps", 0), "--num_student_steps must be >= 1"),
    "fake-score ratio 0": (_adm("--fake_score_update_ratio", 0), "--fake_score_update_ratio must be >= 1"),
    "D ratio 0": (_adm("--discriminator_update_ratio", 0), "--discriminator_update_ratio must be >= 1"),
    "ODE step beyond T": (_adm("--ode_step_dt", 1.5), "--ode_step_dt must be in (0, 1)"),
    "timestep range reversed": (_adm("--min_timestep_percent", 0.9, "--max_timestep_percent", 0.5),
                                "--min_timestep_percent < --max_timestep_percent"),
    "ODE step below the range": (_adm("--ode_step_dt", 0.5), "must be >= --ode_step_dt (0.5)"),
    "warm-up longer than the run": (_adm("--discriminator_warmup_steps", 5000), "the generator never trains"),
    "EMA decay above 1": (_adm("--ema_decay", 1.5), "--ema_decay must be in (0, 1)"),
    "EMA with LoRA": (_adm("--use_ema", "--lora_rank", 4), "--use_ema is for full fine-tuning"),
    "push without a repo": (_adm("--push_to_hub"), "--push_to_hub needs --hub_model_id"),
    "batch-mean removal on one sample": (_adm("--generator_gradient", "remove_batch_mean", "--train_batch_size", 1),
                                         "needs --train_batch_size >= 2"),
    "negative R1 weight": (_adm("--discriminator_r1_weight", -1), "--discriminator_r1_weight must be >= 0"),
    "unknown loss": (_adm("--distribution_loss", "sid"), "invalid choice: 'sid'"),
    # files and data
    "missing prompts file": (_adm("--prompts_file", "{root}/nope.txt"), "--prompts_file"),
    "no prompts given": (_adm(prompts=False), "exactly one of --prompts_file or --dataset_name"),
    "prompts twice": (_adm("--dataset_name", "{captions}"), "exactly one of --prompts_file or --dataset_name"),
    "empty prompts file": (_adm("--prompts_file", "{empty}"), "No prompts in --prompts_file"),
    "missing caption column": (_adm("--dataset_name", "{captions}", prompts=False), "--caption_column 'text' not in"),
    "teacher folder missing": (_adm("--pretrained_model_name_or_path", "{root}/missing"),
                               "--pretrained_model_name_or_path"),
    "SD3 teacher to the SDXL script": (_adm("--pretrained_model_name_or_path", "{sd3}"),
                                       "distills StableDiffusionXLPipeline teachers"),
    "resolution the UNet cannot take": (_adm("--resolution", 30), "--resolution 30 must be a positive multiple"),
    "unknown discriminator block": (_adm("--discriminator_blocks", "down_blocks.7"), "--discriminator_blocks"),
    "generator folder missing": (_adm("--pretrained_generator_name_or_path", "{root}/missing"),
                                 "--pretrained_generator_name_or_path"),
    "generator is a copy of the teacher": (_adm("--pretrained_generator_name_or_path", "{copy}"),
                                           "ships the teacher's own"),
    "shifted noise on a VP teacher": (_adm("--timestep_sampling", "shifted"), "--timestep_sampling shifted"),
    "fp16 on a CPU": (_adm("--mixed_precision", "fp16"), "--mixed_precision fp16 needs a CUDA device"),
    # SD3
    "SDXL teacher to the SD3 script": (_sd3(teacher="sdxl"), "train_adm_sdxl.py"),
    "shift_terminal above 1": (_sd3("--shift_terminal", "1.5"), "--shift_terminal 1.5 must be in [0, 1)"),
    "resolution off the patch grid": (_sd3("--resolution", "15"), "--resolution 15 is not divisible by 2"),
    "resolution beyond the position grid": (_sd3("--resolution", "128"), "pos_embed_max_size"),
    "T5-less teacher without --drop_t5": (_sd3(teacher="no_t5"), "--drop_t5"),
    "SD3 block out of range": (_sd3("--discriminator_blocks", "0,5"), "--discriminator_blocks [5] out of range"),
    "T5 length 0": (_sd3("--max_sequence_length", "0"), "--max_sequence_length must be >= 1"),
    # CogVideoX
    "SD3 teacher to the CogVideoX script": (_cog(teacher="sd3"), "distills CogVideoXPipeline teachers"),
    "CogVideoX teacher to the SD3 script": (_sd3(teacher="cog"), "distills StableDiffusion3Pipeline teachers"),
    "frames the video VAE cannot take": (_cog("--num_frames", "8"), "--num_frames 8: the VAE compresses time by 2"),
    "video resolution off the patch grid": (_cog("--resolution", "18"), "--resolution 18 is not divisible by 4"),
    "video width off the patch grid": (_cog("--width", "30"), "--width 30 is not divisible by 4"),
    "square and rectangle sizes at once": (_cog("--resolution", "16", "--height", "16"),
                                           "give --resolution (a square) or --height/--width"),
    "T5 length a sin-cos CogVideoX cannot take": (_cog("--max_sequence_length", "32", teacher="cog_sincos"),
                                                  "takes exactly max_text_seq_length = 48"),
    "CogVideoX block out of range": (_cog("--discriminator_blocks", "0,7"), "--discriminator_blocks [7] out of range"),
    # Wan
    "CogVideoX teacher to the Wan script": (_wan(teacher="cog"), "distills WanPipeline teachers"),
    "Wan teacher to the CogVideoX script": (_cog(teacher="wan"), "distills CogVideoXPipeline teachers"),
    "two-expert Wan 2.2 checkpoint": (_wan(teacher="wan_two_experts"), "two-expert Wan 2.2 checkpoint"),
    "frames the Wan VAE cannot take": (_wan("--num_frames", "8"), "--num_frames 8: the VAE compresses time by 2"),
    "Wan width off the patch grid": (_wan("--width", "30"), "--width 30 is not divisible by 4"),
    "Wan grid beyond the rotary positions": (_wan("--height", "1040"), "rotary positions reach 64"),
    "Wan block out of range": (_wan("--discriminator_blocks", "0,5"), "--discriminator_blocks [5] out of range"),
    "Wan shift_terminal above 1": (_wan("--shift_terminal", "1.5"), "--shift_terminal 1.5 must be in [0, 1)"),
    "Wan UMT5 length 0": (_wan("--max_sequence_length", "0"), "--max_sequence_length must be >= 1"),
    # ADP
    "ADP given prompts": (_adp("--prompts_file", "{prompts}"), "ADP takes its prompts from the ODE pairs"),
    "ODE pairs at another resolution": (_adp(), "are at resolution 64"),
    "ODE pairs folder without manifest": (_adp(pairs="no_pairs"), "--ode_pairs_dir"),
    "SAM checkpoint path missing": (_adp("--pixel_discriminator_model", "{root}/sam-missing"),
                                    "--pixel_discriminator_model"),
    "negative pixel weight": (_adp("--pixel_weight", "-1"), "--pixel_weight must be >= 0"),
    # ODE pairs
    "collect: resolution": (_collect("--resolution", "30"), "--resolution 30 must be a positive multiple"),
    "collect: no prompts": (lambda world, out: ("collect_ode_pairs", ["--pretrained_model_name_or_path",
                                                                      world["sdxl"], "--output_dir", out]),
                            "exactly one of --prompts_file or --dataset_name"),
    "collect: zero pairs": (_collect("--num_pairs", "0"), "--num_pairs must be >= 1"),
    "collect: a video teacher": (_collect(teacher="cog"), "ODE pairs feed ADP"),
}


def run_as_user(name: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """The script's ``__main__`` path in-process: parse, run; any attempt to load model weights fails the test."""
    import diffusers
    import transformers

    from dmdx.training.plumbing import exit_on_usage_error

    def no_weights(*_args, **_kwargs):
        raise AssertionError("model weights were loaded before the error")

    for cls in (diffusers.ModelMixin, diffusers.DiffusionPipeline, transformers.PreTrainedModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(no_weights))
    module = script(name)
    with pytest.raises(SystemExit) as stop:
        exit_on_usage_error(lambda: module.main(module.parse_args(argv)))
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_cleanly(case, world, tmp_path, monkeypatch, capsys):
    build, message = CASES[case]
    out = str(tmp_path / "out")
    name, argv = build(world, out)
    code, err = run_as_user(name, argv, monkeypatch, capsys)
    assert code not in (0, None), err
    assert message in err, err
    assert "Traceback" not in err
    assert not os.path.exists(out)


@pytest.mark.parametrize("case, edit, message", [
    ("a run's folder, no resume", None, "already holds a run"),
    ("a typo in the checkpoint name", "checkpoint-20", "no such complete checkpoint"),
    ("a checkpoint of another teacher", lambda p: {**p, "teacher": "StableDiffusionXLPipeline:0123456789abcdef"},
     "teacher: checkpoint"),
    ("a checkpoint of another LoRA rank", lambda p: {**p, "lora_rank": 8}, "lora_rank: checkpoint 8"),
    ("a checkpoint of another script", lambda p: {**p, "script": "dmdx-adm-sd3"}, "script: checkpoint"),
    ("a checkpoint beyond --max_train_steps", "beyond", "beyond --max_train_steps"),
    ("a checkpoint this toolkit did not write", lambda p: None, "has no dmdx_provenance.json"),
])
def test_a_finished_run_is_never_overwritten(case, edit, message, world, tmp_path, monkeypatch, capsys):
    """Re-running into a finished run's folder, or resuming a checkpoint another run made, stops before anything is
    loaded or written: the folder (its config included) stays byte-identical."""
    out = finished_run(world, tmp_path, provenance_edit=edit if callable(edit) else None,
                       step=50 if edit == "beyond" else 2)
    before = snapshot(out)
    argv = ["--pretrained_model_name_or_path", world["sdxl"], "--prompts_file", world["prompts"], "--resolution",
            "32", "--output_dir", out, "--max_train_steps", "10"]
    if edit is not None:
        argv += ["--resume_from_checkpoint", edit if edit == "checkpoint-20" else "latest"]
    code, err = run_as_user("train_adm_sdxl", argv, monkeypatch, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert snapshot(out) == before


def test_catalogue_size():
    assert len(CASES) + 7 >= 40


def test_over_long_prompts_warn_before_weights_load(world, tmp_path, monkeypatch, caplog):
    """Prompts longer than --max_sequence_length T5 tokens are truncated as diffusers truncates them; the CogVideoX
    script says how many, from the tokenizer alone, before any weights load."""
    import logging

    import diffusers
    import transformers

    loaded = []

    def no_weights(*_args, **_kwargs):
        loaded.append(True)
        raise RuntimeError("stop: weights")

    for cls in (diffusers.ModelMixin, diffusers.DiffusionPipeline, transformers.PreTrainedModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(no_weights))
    prompts = tmp_path / "long.txt"
    prompts.write_text("a red circle\n" + "a very long prompt " * 20 + "\n")
    module = script("train_adm_cogvideox")
    args = module.parse_args(["--pretrained_model_name_or_path", world["cog"], "--prompts_file", str(prompts),
                              "--output_dir", str(tmp_path / "out"), "--validation_prompts", "ok"])
    with caplog.at_level(logging.WARNING, logger="dmdx"), pytest.raises(RuntimeError, match="stop: weights"):
        module.main(args)
    warned = [r for r in caplog.records if "longer than --max_sequence_length 48" in r.getMessage()]
    assert len(warned) == 1 and "1 of 2 training prompts" in warned[0].getMessage() and loaded


def test_adp_refuses_fsdp_before_loading_models():
    """ADP has no sharded path: an FSDP accelerate config stops with a message naming the DDP config to use."""
    from types import SimpleNamespace

    from dmdx.training.adp import refuse_fsdp
    from dmdx.training.errors import UsageError

    refuse_fsdp(SimpleNamespace(distributed_type=SimpleNamespace(name="MULTI_GPU")))  # DDP: fine
    with pytest.raises(UsageError, match="DDP only.*accelerate_ddp_bf16.yaml"):
        refuse_fsdp(SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP")))
