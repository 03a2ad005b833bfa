"""Subprocess smoke tests of the SDXL DMDX scripts on a tiny SDXL teacher (CPU, `accelerate launch`).

Few, larger tests: every launch pays ~5 s of imports on 2 cores. The commands are the ones the README section
"SDXL one-step (DMDX)" gives, with tiny models and a few steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, accelerate_cmd, script_env
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TINY_ADM = ["--resolution", 32, "--train_batch_size", 2, "--generator_lr", 1e-4, "--fake_score_lr", 1e-4,
            "--discriminator_lr", 1e-3]

# Runs in a fresh interpreter that never imports dmdx: the student must load and run with stock diffusers only.
STOCK_LOAD = r"""
import json, sys
import torch
from diffusers import DiffusionPipeline
folder, steps = sys.argv[1], int(sys.argv[2])
pipe = DiffusionPipeline.from_pretrained(folder)
trained = json.load(open(folder + "/training_config.json"))["student_timesteps"]
pipe.scheduler.set_timesteps(steps)
image = pipe("a red circle", num_inference_steps=steps, guidance_scale=0.0, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
assert not [m for m in sys.modules if m.split(".")[0] == "dmdx"], "the stock load imported dmdx"
print(json.dumps({"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                  "timesteps": pipe.scheduler.timesteps.float().tolist(), "trained": trained,
                  "shape": list(image.shape), "finite": bool(torch.isfinite(torch.from_numpy(image)).all())}))
"""


def run(cmd, expect_ok=True, cwd=REPO, timeout=300):
    result = subprocess.run(cmd, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def stock_load(folder: str, steps: int) -> dict:
    out = run([sys.executable, "-c", STOCK_LOAD, folder, str(steps)], cwd="/").stdout
    return json.loads(out.strip().splitlines()[-1])


def with_flag(args: list, flag: str, value) -> list:
    """A copy of a command-line list with ``flag``'s value replaced."""
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def read_log(folder: str) -> list[dict]:
    with open(os.path.join(folder, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_adm_run_resume_and_stock_export(tiny_sdxl, prompts_file, tmp_path):
    """ADM one-step from the teacher: artifacts, atomic checkpoints, exact resume, stock one-step loading."""
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--pretrained_model_name_or_path", tiny_sdxl, "--prompts_file", prompts_file, *TINY_ADM,
              "--max_train_steps", 4, "--checkpointing_steps", 2, "--use_ema",  # the export is the EMA
              "--diagnostics_steps", 2]
    run(accelerate_cmd("train_adm_sdxl.py", *common, "--output_dir", out_a, "--checkpoints_total_limit", 2,
                       "--validation_prompts", "a red circle", "a cat", "--validation_steps", 2))

    # Artifacts: pipeline folder, LCM scheduler with the trained timesteps, checkpoints, logs, card, grids.
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "vae", "text_encoder_2", "README.md", "samples/grid.png", "samples/1.png",
                 "validation/step-000002.png", "checkpoint-2", "checkpoint-4", "training_config.json"):
        assert os.path.exists(os.path.join(out_a, name)), name
    assert not [n for n in os.listdir(out_a) if n.endswith(".tmp") or n.startswith(".export")]
    logs = read_log(out_a)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    for key in ("loss_fake_score", "loss_generator", "loss_discriminator", "logits_real", "logits_fake",
                "d_accuracy", "d_pair_order", "dmd_loss_recorded", "pred_gap_abs", "pred_gap_rel"):
        assert all(key in entry and entry[key] == entry[key] for entry in logs), key
    # the generator diagnostics (every --diagnostics_steps): ADM's output gradient against DMD's, coherence, shift
    for key in ("grad_cosine_adm_dmd", "grad_coherence", "dmd_grad_coherence", "output_shift",
                "output_shift_common_fraction"):
        assert key in logs[2] and -1 <= logs[2].get("grad_cosine_adm_dmd", 0) <= 1, key
    # D's last layer starts at zero, so G's first gradient is zero; from the second update on D's signal reaches G.
    assert logs[0]["grad_norm_generator"] == 0 and all(entry["grad_norm_generator"] > 0 for entry in logs[1:])
    card = open(os.path.join(out_a, "README.md")).read()
    assert "num_inference_steps=1" in card and "[999]" in card and "samples/grid.png" in card
    assert tmp_path.as_posix() not in card  # no machine path in a card that may be published

    teacher_unet = load_file(os.path.join(tiny_sdxl, "unet/diffusion_pytorch_model.safetensors"))
    student_unet = load_file(os.path.join(out_a, "unet/diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(teacher_unet[k], student_unet[k]) for k in teacher_unet), "generator never moved"

    # Resume from checkpoint-2 in a fresh folder: continues at step 3 and ends in exactly the same state.
    os.makedirs(out_b)
    shutil.copytree(os.path.join(out_a, "checkpoint-2"), os.path.join(out_b, "checkpoint-2"))
    run(accelerate_cmd("train_adm_sdxl.py", *common, "--output_dir", out_b, "--resume_from_checkpoint", "latest"))
    assert [entry["step"] for entry in read_log(out_b)] == [3, 4]
    for name in ("model.safetensors", "model_1.safetensors", "model_2.safetensors"):  # G, fake score, D heads
        a, b = (load_file(os.path.join(o, "checkpoint-4", name)) for o in (out_a, out_b))
        assert all(torch.equal(a[k], b[k]) for k in a), f"resumed {name} differs from the uninterrupted run"
    resumed_unet = load_file(os.path.join(out_b, "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(student_unet[k], resumed_unet[k]) for k in student_unet)

    # Stock diffusers, no dmdx: loads, its scheduler gives the trained timesteps, generates in one step.
    info = stock_load(out_a, 1)
    assert info["pipeline"] == "StableDiffusionXLPipeline" and info["scheduler"] == "LCMScheduler"
    assert info["timesteps"] == info["trained"] == [999.0]
    assert info["shape"] == [1, 32, 32, 3] and info["finite"]


def test_dmd_baseline_multistep_lora(tiny_sdxl, prompts_file, tmp_path):
    """DMD2 baseline, 2-step student with backward simulation, generator LoRA: exported LoRA loads on the teacher."""
    out = str(tmp_path / "dmd")
    captions = tmp_path / "captions.jsonl"  # prompts through `datasets` (offline, local file)
    captions.write_text("".join(json.dumps({"caption": p}) + "\n" for p in open(prompts_file).read().split("\n")
                                if p))
    run(accelerate_cmd("train_adm_sdxl.py", "--pretrained_model_name_or_path", tiny_sdxl, "--dataset_name",
                       captions, "--caption_column", "caption", *TINY_ADM, "--distribution_loss", "dmd",
                       "--num_student_steps", 2,
                       "--lora_rank", 4, "--fake_score_lora_rank", 4, "--fake_score_update_ratio", 2,
                       "--max_train_steps", 2,
                       "--gradient_checkpointing", "--output_dir", out))
    logs = read_log(out)
    assert len(logs) == 2 and "loss_discriminator" not in logs[0] and logs[0]["loss_generator"] >= 0
    assert all(entry["grad_norm_generator"] > 0 for entry in logs)  # through LoRA + gradient checkpointing
    config = json.load(open(os.path.join(out, "training_config.json")))
    assert config["student_timesteps"] == [999.0, 499.0] and config["method"] == "dmd"
    info = stock_load(out, 2)
    assert info["timesteps"] == info["trained"] == [999.0, 499.0]

    check_lora = r"""
import sys, torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1])
before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
pipe.load_lora_weights(sys.argv[2])
pipe.fuse_lora()
pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
after = pipe.unet.state_dict()
merged = load_file(sys.argv[2] + "/unet/diffusion_pytorch_model.safetensors")
changed = [k for k in before if not torch.equal(before[k], after[k])]
assert changed, "the LoRA changed nothing"
worst = max((after[k] - merged[k]).abs().max().item() for k in before)
assert worst < 1e-5, worst
print("ok", len(changed))
"""
    assert "ok" in run([sys.executable, "-c", check_lora, tiny_sdxl, out], cwd="/").stdout


def test_two_process_ddp(tiny_sdxl, prompts_file, tmp_path):
    """CPU DDP over gloo (2 ranks): ODE-pair collection splits the shards between processes; ADM finishes with
    identical generator weights on both ranks."""
    pairs = str(tmp_path / "pairs")
    result = run(accelerate_cmd("collect_ode_pairs.py", "--pretrained_model_name_or_path", tiny_sdxl, "--prompts_file",
                                prompts_file, "--resolution", 32, "--num_pairs", 6, "--shard_size", 2, "--batch_size",
                                2, "--num_inference_steps", 2, "--output_dir", pairs, num_processes=2))
    assert "Process 0 wrote 2 shards" in result.stderr and "Process 1 wrote 1 shards" in result.stderr
    assert sorted(os.listdir(pairs)) == ["manifest.json", *(f"shard-0000{i}.safetensors" for i in range(3))]

    out = str(tmp_path / "ddp")
    run(accelerate_cmd("train_adm_sdxl.py", "--pretrained_model_name_or_path", tiny_sdxl, "--prompts_file",
                       prompts_file, *TINY_ADM, "--max_train_steps", 2, "--gradient_accumulation_steps", 2,
                       "--output_dir", out, num_processes=2))
    checksums = json.load(open(os.path.join(out, "training_config.json")))["generator_checksum_per_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert len(read_log(out)) == 2


def _sdxl_variant(src: str, dst: str, edit_index=None, edit_unet=None, nan_unet: bool = False) -> str:
    shutil.copytree(src, dst)
    for name, edit in (("model_index.json", edit_index), ("unet/config.json", edit_unet)):
        if edit:
            path = os.path.join(dst, name)
            config = json.load(open(path))
            edit(config)
            json.dump(config, open(path, "w"))
    if nan_unet:  # a corrupted checkpoint: the teacher (and so the fake score) predicts NaN
        from safetensors.torch import save_file

        path = os.path.join(dst, "unet/diffusion_pytorch_model.safetensors")
        weights = load_file(path)
        weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], float("nan"))
        save_file(weights, path)
    return dst


def test_clear_errors(tiny_sdxl, prompts_file, tmp_path, capsys):
    """Bad input stops before heavy work with a message naming the flag or file (flags: argparse's exit 2; configs
    and data: UsageError, which the script prints without a traceback); a non-finite loss stops the run, names the
    term and writes no checkpoint."""
    sys.path.insert(0, os.path.join(REPO, "distill_scripts"))
    import train_adm_sdxl as adm

    from dmdx.training.errors import UsageError

    def args_with(*extra, teacher=tiny_sdxl, prompts=prompts_file):
        source = ["--prompts_file", prompts] if prompts else []
        return adm.parse_args(["--pretrained_model_name_or_path", teacher, *source, *map(str, TINY_ADM),
                               "--output_dir", str(tmp_path / "out"), *map(str, extra)])

    def flag_error(*extra, **kw):
        with pytest.raises(SystemExit) as e:
            args_with(*extra, **kw)
        assert e.value.code == 2
        return capsys.readouterr().err

    def set_sd(config):
        config["_class_name"] = "StableDiffusionPipeline"

    def drop_text_time(config):
        config["addition_embed_type"] = None

    not_sdxl = _sdxl_variant(tiny_sdxl, str(tmp_path / "sd"), edit_index=set_sd, edit_unet=drop_text_time)
    with pytest.raises(UsageError, match="StableDiffusionPipeline.*distills StableDiffusionXLPipeline teachers"):
        adm.main(args_with(teacher=not_sdxl))
    with pytest.raises(UsageError, match="--resolution 30 must be a positive multiple of 4"):
        adm.main(args_with("--resolution", 30))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UsageError, match="No prompts"):
        adm.main(args_with(prompts=str(empty)))
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"caption": "a cat"}\n')
    with pytest.raises(UsageError, match="--caption_column 'text' not in"):
        adm.main(args_with("--dataset_name", captions, prompts=None))
    assert not os.path.exists(tmp_path / "out")  # nothing was written for any of them
    assert "exactly one of --prompts_file or --dataset_name" in flag_error(prompts=None)
    assert "--ode_step_dt (0.5)" in flag_error("--ode_step_dt", 0.5)
    assert "--generator_lr must be > 0" in flag_error("--generator_lr", 0)
    assert "--lora_rank must be >= 0" in flag_error("--lora_rank", -4)
    assert "--prompts_file 'nope.txt' does not exist" in flag_error(prompts="nope.txt")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert "pip install bitsandbytes" in flag_error("--use_8bit_adam")

    # As a user runs it (python; `accelerate launch` adds its own report of the exit status): one line naming the
    # problem, exit status 2, no traceback.
    result = run([sys.executable, os.path.join(REPO, "distill_scripts", "train_adm_sdxl.py"),
                  "--pretrained_model_name_or_path", not_sdxl, "--prompts_file", prompts_file, "--output_dir",
                  str(tmp_path / "cli")], expect_ok=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --pretrained_model_name_or_path" in result.stderr

    # Non-finite loss: subprocess (a real run), stops naming the term, leaves no checkpoint.
    nan_teacher = _sdxl_variant(tiny_sdxl, str(tmp_path / "nan"), nan_unet=True)
    out = str(tmp_path / "nan-run")
    result = run(accelerate_cmd("train_adm_sdxl.py", "--pretrained_model_name_or_path", nan_teacher,
                                "--prompts_file", prompts_file, *TINY_ADM, "--max_train_steps", 2,
                                "--checkpointing_steps", 1, "--output_dir", out), expect_ok=False)
    assert result.returncode != 0
    assert "Non-finite loss in loss_fake_score" in result.stderr
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint")]
    assert not os.path.exists(os.path.join(out, "model_index.json"))


def _tiny_sam(path: str) -> str:
    from transformers import SamVisionConfig, SamVisionModel

    config = SamVisionConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8,
                             output_channels=16, mlp_dim=64, window_size=2, global_attn_indexes=[1, 3],
                             num_pos_feats=8, initializer_range=0.02)  # the default 1e-10 gives ~zero features
    torch.manual_seed(0)
    SamVisionModel(config).save_pretrained(path)
    return path


def test_dmdx_collect_adp_then_adm(tiny_sdxl, prompts_file, tmp_path):
    """The full DMDX path: ODE pairs (resumable) -> ADP (latent + SAM pixel D, exact resume) -> ADM from the ADP
    student (flow scheduler), with gradient checkpointing and EMA; the result loads in stock diffusers."""
    pairs, adp, adp_resumed, dmdx = (str(tmp_path / n) for n in ("pairs", "adp", "adp-resumed", "dmdx"))
    sam = _tiny_sam(str(tmp_path / "tiny-sam"))
    collect = ["--pretrained_model_name_or_path", tiny_sdxl, "--prompts_file", prompts_file, "--resolution", 32,
               "--num_pairs", 10, "--shard_size", 4, "--batch_size", 4, "--num_inference_steps", 4,
               "--guidance_scale", 5.0, "--output_dir", pairs]
    run(accelerate_cmd("collect_ode_pairs.py", *collect))
    shards = sorted(n for n in os.listdir(pairs) if n.endswith(".safetensors"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    manifest = json.load(open(os.path.join(pairs, "manifest.json")))
    assert manifest["sampler"].startswith("DDIMScheduler") and manifest["guidance_scale"] == 5.0
    first = load_file(os.path.join(pairs, shards[0]))
    assert first["noise"].shape == first["latents"].shape == (4, 4, 16, 16)
    assert torch.isfinite(first["latents"].float()).all() and not torch.equal(first["noise"], first["latents"])

    # Resume: finished shards are skipped; a missing one is rebuilt bit-identically (seed per shard).
    removed = load_file(os.path.join(pairs, shards[1]))
    os.remove(os.path.join(pairs, shards[1]))
    mtime = os.path.getmtime(os.path.join(pairs, shards[0]))
    result = run(accelerate_cmd("collect_ode_pairs.py", *collect))
    assert "skipping 2 finished shards" in result.stderr
    assert os.path.getmtime(os.path.join(pairs, shards[0])) == mtime
    rebuilt = load_file(os.path.join(pairs, shards[1]))
    assert all(torch.equal(removed[k], rebuilt[k]) for k in removed)
    sys.path.insert(0, os.path.join(REPO, "distill_scripts"))  # error paths in-process: no launch cost
    import collect_ode_pairs
    import train_adp_sdxl

    with pytest.raises(ValueError, match="already holds ODE pairs made with other settings"):
        collect_ode_pairs.main(collect_ode_pairs.parse_args(
            list(map(str, with_flag(collect, "--guidance_scale", 3.0)))))

    # ADP: 3 steps, checkpoint at 2; a resumed run from checkpoint-2 ends identical.
    adp_args = ["--pretrained_model_name_or_path", tiny_sdxl, "--ode_pairs_dir", pairs,
                "--pixel_discriminator_model", sam, "--resolution", 32, "--train_batch_size", 2,
                "--generator_lr", 1e-4, "--discriminator_lr", 1e-3, "--max_train_steps", 3, "--checkpointing_steps", 2]
    run(accelerate_cmd("train_adp_sdxl.py", *adp_args, "--output_dir", adp, "--validation_prompts", "a red circle"))
    logs = read_log(adp)
    assert len(logs) == 3 and {"latent_d_accuracy", "pixel_d_accuracy", "loss_discriminator"} <= set(logs[-1])
    assert logs[-1]["pixel_logits_real"] != 0 and logs[-1]["latent_logits_real"] != 0  # both heads are learning
    assert logs[-1]["grad_norm_generator"] > 0
    config = json.load(open(os.path.join(adp, "scheduler/scheduler_config.json")))
    assert config["_class_name"] == "DPMSolverMultistepScheduler" and config["prediction_type"] == "flow_prediction"
    os.makedirs(adp_resumed)
    shutil.copytree(os.path.join(adp, "checkpoint-2"), os.path.join(adp_resumed, "checkpoint-2"))
    run(accelerate_cmd("train_adp_sdxl.py", *adp_args, "--output_dir", adp_resumed, "--resume_from_checkpoint",
                       "latest"))
    a, b = (load_file(os.path.join(o, "unet/diffusion_pytorch_model.safetensors")) for o in (adp, adp_resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Pairs from another resolution are refused before any training.
    with pytest.raises(ValueError, match="are at resolution 32"):
        train_adp_sdxl.main(train_adp_sdxl.parse_args(
            list(map(str, with_flag(adp_args, "--resolution", 64))) + ["--output_dir", str(tmp_path / "wrong")]))
    other_teacher = shutil.copytree(tiny_sdxl, str(tmp_path / "other-teacher"))
    with pytest.raises(ValueError, match="come from teacher"):
        train_adp_sdxl.main(train_adp_sdxl.parse_args(
            list(map(str, with_flag(adp_args, "--pretrained_model_name_or_path", other_teacher)))
            + ["--output_dir", str(tmp_path / "wrong")]))

    # ADM from the ADP student (DMDX): its flow scheduler is the student's; stock diffusers runs it in one step.
    run(accelerate_cmd("train_adm_sdxl.py", "--pretrained_model_name_or_path", tiny_sdxl,
                       "--pretrained_generator_name_or_path", adp, "--prompts_file", prompts_file, *TINY_ADM,
                       "--max_train_steps", 2, "--gradient_checkpointing", "--use_ema", "--output_dir", dmdx))
    config = json.load(open(os.path.join(dmdx, "training_config.json")))
    assert config["method"] == "dmdx" and config["student_prediction_type"] == "flow"
    info = stock_load(dmdx, 1)
    assert info["scheduler"] == "DPMSolverMultistepScheduler"
    assert info["timesteps"] == info["trained"] == [999.0] and info["finite"]
