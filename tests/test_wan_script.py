"""distill_scripts/train_adm_wan.py on tiny Wan teachers, launched as users launch it (docs/wan.md).

Two teachers are saved with ``save_pretrained``: a Wan 2.1-style one from the shared builder
(``tiny_components.wan_components``: 9 frames at 16x16 px, latents (4, 5, 8, 8), flow shift 3, a character-level
T5 tokenizer), and one built here from the model classes alone, not through that builder: Wan 2.2 TI2V-style
(``expand_timesteps``, a residual VAE that patchifies its input, 8 latent channels, three blocks of three heads,
flow shift 5, its own word-level tokenizer), trained on 5 frames at 32x64 px. The runs are the recipes
(distill_scripts/recipes/wan_1_3b, wan_14b) with tiny sizes; the exported folders are then loaded by stock diffusers in
a process that never imports dmdx, and the denoiser calls of a generation are counted with a forward hook. The
wan_14b recipe runs as configured, FSDP2, on 2 CPU processes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_ACCELERATE_CONFIG, free_port, recipe_env

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moving right", "a blue square", "a green cat", "a small house spinning", "a big dog"]

pytestmark = pytest.mark.slow


def own_wan_teacher(path: Path) -> None:
    """A Wan 2.2 TI2V-style teacher with sizes and a tokenizer of its own, from the model classes' configs."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(1)
    words = "a the red blue green cat dog circle square moving left right spinning small big house".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    letters = [chr(c) for c in range(97, 123)]
    pieces += [("\u2581" + c, -5.0) for c in letters] + [(c, -6.0) for c in letters] + [("\u2581", -8.0)]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=24, pad_token="<pad>", eos_token="</s>",
                                unk_token="<unk>")
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=24, d_kv=6, d_ff=48, num_layers=2,
                                               num_heads=4, dropout_rate=0.0, relative_attention_num_buckets=8))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=12,
                                        in_channels=8, out_channels=8, text_dim=24, freq_dim=16, ffn_dim=48,
                                        num_layers=3, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                           is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                           latents_mean=[0.1 * i for i in range(8)], latents_std=[1 + 0.1 * i for i in range(8)],
                           scale_factor_temporal=2, scale_factor_spatial=8)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae, scheduler=scheduler,
                transformer=transformer, expand_timesteps=True).save_pretrained(path)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    from diffusers import WanPipeline

    from dmdx.pipelines.tiny_components import wan_components

    root = tmp_path_factory.mktemp("wan_script")
    WanPipeline(**wan_components()).save_pretrained(root / "wan")
    own_wan_teacher(root / "own")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "cpu.yaml").write_text(CPU_ACCELERATE_CONFIG)
    return root


TINY = ["--mixed_precision", "no", "--report_to", "none", "--discriminator_head_channels", "16",
        "--gradient_accumulation_steps", "1", "--generator_lr", "1e-3", "--discriminator_warmup_steps", "0"]
SHARED = ["--num_frames", "9", "--height", "16", "--width", "16", "--max_sequence_length", "32"]
OWN = ["--num_frames", "5", "--height", "32", "--width", "64", "--max_sequence_length", "24"]


def _fsdp_config(workdir) -> Path:
    """The wan_14b recipe's own FSDP2 accelerate config with 2 processes and a free port; nothing else changed."""
    import yaml

    config = yaml.safe_load((REPO / "distill_scripts" / "recipes" / "wan_14b" / "accelerate_fsdp.yaml").read_text())
    config.update(num_processes=2, main_process_port=free_port())
    (workdir / "fsdp.yaml").write_text(yaml.safe_dump(config))
    return workdir / "fsdp.yaml"


def _recipe(workdir, recipe: str, teacher: str, output_dir: str, *overrides, fsdp: bool = False):
    """``bash distill_scripts/recipes/<recipe>/train.sh`` (the documented real recipe) on a tiny teacher, on CPU: one
    process, or with ``fsdp`` the recipe's FSDP2 config on 2 CPU processes over gloo (tests/fsdp_cpu lifts only
    accelerate's GPU gate, as tests/test_fsdp.py does)."""
    env = recipe_env(workdir / "hf_home", CONFIG=_fsdp_config(workdir) if fsdp else workdir / "cpu.yaml",
                     TEACHER=teacher, PROMPTS="prompts.txt", OUTPUT_DIR=output_dir)
    env.pop("PYTHONPATH", None)
    if fsdp:
        env.update(ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO / "tests" / "fsdp_cpu"))
    cmd = ["bash", str(REPO / "distill_scripts" / "recipes" / recipe / "train.sh"), *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{recipe} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stderr + proc.stdout


# A fresh interpreter that never imports dmdx: stock diffusers only. Per folder: the pipeline, its scheduler, a video of
# the trained size with the denoiser's calls counted; for a LoRA student, teacher + load_lora_weights vs the student.
CHECKER = r"""
import json, sys
import torch
from diffusers import DiffusionPipeline
results = {}
for student_dir, teacher_dir, lora, size in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(student_dir)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["timestep"]),
                                           with_kwargs=True)
    video = pipe("a red circle", num_inference_steps=4, guidance_scale=0.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **size).frames
    result = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
              "scheduler_config": dict(pipe.scheduler.config), "expand_timesteps": pipe.config.expand_timesteps,
              "timesteps": pipe.scheduler.timesteps.tolist(), "sigmas": pipe.scheduler.sigmas.tolist(),
              "video_shape": list(video.shape), "finite": bool(torch.isfinite(video).all()),
              "denoiser_calls": len(calls), "timestep_dtypes": sorted({str(t.dtype) for t in calls})}
    if lora:
        teacher = DiffusionPipeline.from_pretrained(teacher_dir)
        g = torch.Generator().manual_seed(1)
        x, text = torch.randn(2, 4, 5, 8, 8, generator=g), torch.randn(2, 32, 32, generator=g)
        t = torch.tensor([700.0, 250.0])
        def run(transformer):
            with torch.no_grad():
                return transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        before = run(teacher.transformer)
        teacher.load_lora_weights(student_dir)
        after = run(teacher.transformer)
        result["lora_change"] = (after - before).abs().max().item()
        result["lora_vs_fused"] = (after - run(pipe.transformer)).abs().max().item()
    results[student_dir] = result
results["dmdx_imported"] = any(m == "dmdx" or m.startswith("dmdx.") for m in sys.modules)
print("RESULT" + json.dumps(results))
"""


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"


@pytest.fixture(scope="module")
def runs(workdir):
    """Every run once (4 script launches + 1 checker), then the tests read what they left."""
    logs = {}
    # wan_1_3b recipe: full generator and fake score, ADM, gradient checkpointing; checkpoints at 2 and 4
    logs["full"] = _recipe(workdir, "wan_1_3b", "wan", "full", *SHARED, "--max_train_steps", "4",
                           "--checkpointing_steps", "2", "--validation_steps", "4",
                           "--validation_prompts", "a red circle", "a cat")
    # ... resumed from the first run's step-2 checkpoint: must end in the identical state
    (workdir / "resumed").mkdir()
    shutil.copytree(workdir / "full" / "checkpoint-2", workdir / "resumed" / "checkpoint-2")
    logs["resumed"] = _recipe(workdir, "wan_1_3b", "wan", "resumed", *SHARED, "--max_train_steps", "4",
                              "--checkpointing_steps", "2", "--validation_steps", "100",
                              "--validation_prompts", "a cat")
    # LoRA generator and fake score with DMD2's loss
    logs["lora"] = _recipe(workdir, "wan_1_3b", "wan", "lora_dmd", *SHARED, "--lora_rank", "4",
                           "--fake_score_lora_rank", "4", "--distribution_loss", "dmd", "--max_train_steps", "2",
                           "--checkpointing_steps", "2", "--validation_steps", "100", "--validation_prompts", "a cat")
    # the teacher the shared builder did not make, through the 14B recipe as configured (FSDP2, full roles, ADM) on 2
    # CPU processes, at its own sizes
    logs["own"] = _recipe(workdir, "wan_14b", "own", "own_full", *OWN, "--max_train_steps", "2",
                          "--checkpointing_steps", "2", "--validation_steps", "2", "--validation_prompts", "a red cat",
                          fsdp=True)
    shared_size = {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 32}
    own_size = {"height": 32, "width": 64, "num_frames": 5, "max_sequence_length": 24}
    spec = json.dumps([[str(workdir / "full"), str(workdir / "wan"), False, shared_size],
                       [str(workdir / "lora_dmd"), str(workdir / "wan"), True, shared_size],
                       [str(workdir / "own_full"), str(workdir / "own"), False, own_size]])
    proc = subprocess.run([sys.executable, "-c", CHECKER, spec], cwd=workdir, env=recipe_env(workdir / "hf_home"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checks = json.loads(proc.stdout.split("RESULT", 1)[1])
    return workdir, logs, checks


def _check_student(workdir, checks, name: str, shape: list, shift: float):
    """What every exported folder must show in stock diffusers: a WanPipeline with the trained 4-step Euler schedule
    (the teacher's flow shift, shift_terminal 0.25), 4 denoiser calls with fp32 timesteps, a finite video."""
    assert checks["dmdx_imported"] is False
    result = checks[str(workdir / name)]
    assert result["pipeline"] == "WanPipeline" and result["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert result["denoiser_calls"] == 4 and result["timestep_dtypes"] == ["torch.float32"]
    assert result["video_shape"] == shape and result["finite"]
    assert result["scheduler_config"]["shift"] == shift and result["scheduler_config"]["shift_terminal"] == 0.25
    config = json.loads((workdir / name / "training_config.json").read_text())
    torch.testing.assert_close(torch.tensor(result["timesteps"]), torch.tensor(config["student_timesteps"]),
                               rtol=0, atol=1e-4)
    assert result["sigmas"][3] == pytest.approx(0.25, abs=1e-6)  # the last step does work
    card = (workdir / name / "README.md").read_text()
    assert "pipeline_tag: text-to-video" in card and 'output_type="pil"' in card and ".frames[0]" in card
    return result, config


def test_full_adm_resumes_bit_identically_and_exports(runs):
    """wan_1_3b recipe, full ADM: checkpoints with D heads, a resumed run ends bit-identical, a GIF validation strip,
    and the export runs in stock diffusers in 4 denoiser calls."""
    workdir, logs, checks = runs
    full, resumed = workdir / "full", workdir / "resumed"
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert "resumed from" in logs["resumed"] and "at step 2" in logs["resumed"]
    for name in ("model.safetensors", "model_1.safetensors", "model_2.safetensors"):  # generator, fake score, D
        _assert_same_tensors(full / "checkpoint-4" / name, resumed / "checkpoint-4" / name)
    exported = "transformer/diffusion_pytorch_model.safetensors"
    _assert_same_tensors(full / exported, resumed / exported)
    before, after = _tensors(full / "checkpoint-2" / "model.safetensors"), _tensors(full / "checkpoint-4" /
                                                                                    "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the comparison is not vacuous
    teacher = _tensors(workdir / "wan" / exported)
    assert any(not torch.equal(_tensors(full / exported)[k], teacher[k]) for k in teacher)

    _, config = _check_student(workdir, checks, "full", [1, 9, 3, 16, 16], 3.0)
    assert config["discriminator_blocks"] == ["blocks.0", "blocks.1"]
    assert (config["num_frames"], config["height"], config["width"], config["max_sequence_length"]) == (9, 16, 16, 32)
    assert config["gradient_checkpointing"] and config["lora_rank"] == 0 and config["method"] == "adm"

    from PIL import Image

    gif = Image.open(full / "validation" / "step-000004.gif")  # frame t shows both prompts' frame t
    assert gif.n_frames == 9 and gif.size == (32, 16)


def test_lora_dmd_exports_adapter_weights(runs):
    """DMD2's loss with LoRA roles: no discriminator, LoRA weights that load onto the teacher and equal the fused
    student."""
    workdir, logs, checks = runs
    out = workdir / "lora_dmd"
    assert "no discriminator (dmd)" in logs["lora"]
    assert not (out / "checkpoint-2" / "model_2.safetensors").exists()
    for name in ("model.safetensors", "model_1.safetensors"):  # only the adapters, not the shared frozen base
        keys = _tensors(out / "checkpoint-2" / name).keys()
        assert keys and all("lora_" in k for k in keys), name
    result, config = _check_student(workdir, checks, "lora_dmd", [1, 9, 3, 16, 16], 3.0)
    assert config["distribution_loss"] == "dmd" and config["lora_rank"] == 4
    assert result["lora_change"] > 1e-6 and result["lora_vs_fused"] < 1e-4
    assert "load_lora_weights" in (out / "README.md").read_text()


def test_a_wan_teacher_the_tests_did_not_build_becomes_a_stock_4_step_pipeline(runs):
    """Done when (issue 26): a Wan-architecture teacher of other sizes with its own tokenizer, Wan 2.2 TI2V-style
    (per-token timesteps), goes through train_adm_wan.py (the 14B recipe) and comes out as a stock WanPipeline that
    generates a 4-step video of the trained size, with the teacher's flow shift 5.0."""
    workdir, logs, checks = runs
    result, config = _check_student(workdir, checks, "own_full", [1, 5, 3, 32, 64], 5.0)
    assert result["expand_timesteps"] is True  # the teacher's pipeline config ships with the student
    assert config["discriminator_blocks"] == ["blocks.0", "blocks.1", "blocks.2"]
    assert (config["num_frames"], config["height"], config["width"]) == (5, 32, 64)
    assert (workdir / "own_full" / "validation" / "step-000002.gif").is_file()
    checkpoint = workdir / "own_full" / "checkpoint-2"  # sharded by FSDP2: each rank wrote its part of every network
    assert all((checkpoint / f"pytorch_model_fsdp_{i}").is_dir() for i in range(3))
    assert not (checkpoint / "model.safetensors").exists()
    exported = "transformer/diffusion_pytorch_model.safetensors"
    student, teacher = _tensors(workdir / "own_full" / exported), _tensors(workdir / "own" / exported)
    assert student.keys() == teacher.keys() and any(not torch.equal(student[k], teacher[k]) for k in student)
    tokenizer = json.loads((workdir / "own_full" / "tokenizer" / "tokenizer.json").read_text())
    pieces = {piece for piece, _ in tokenizer["model"]["vocab"]}
    assert "\u2581circle" in pieces  # the teacher's own word-level tokenizer ships with the student


def test_adapter_conditioning_and_schedule_match_the_stock_pipeline(workdir):
    """In-process: the adapter's prompt embeddings are WanPipeline.encode_prompt's (trimmed to each prompt's length,
    zero-padded); its predict is the transformer called as WanPipeline calls it; one student step in the loop's flow
    algebra equals FlowMatchEulerDiscreteScheduler.step; D's features are 3-D maps of the latent grid."""
    from diffusers import WanPipeline

    from dmdx.pipelines.teachers import WanTeacher, adapter_for
    from dmdx.training import schedule_from_scheduler_config

    path = str(workdir / "wan")
    teacher = WanTeacher(path, num_frames=9, height=16, width=16, max_sequence_length=32)
    assert type(adapter_for(path)) is WanTeacher
    assert teacher.latent_shape() == (4, 5, 8, 8)
    assert teacher.discriminator_blocks(None) == ["blocks.0", "blocks.1"]
    pipe = WanPipeline.from_pretrained(path)
    teacher.load_text_encoders("cpu", torch.float32, denoiser=pipe.transformer)
    cond = teacher.encode_prompts(["a red circle", "a cat"], "cpu")
    with torch.no_grad():  # as WanPipeline.__call__ runs it
        stock, _ = pipe.encode_prompt(["a red circle", "a cat"], do_classifier_free_guidance=False,
                                      max_sequence_length=32)
    assert torch.equal(cond["prompt_embeds"], stock)
    assert stock[1, -1].abs().sum() == 0  # zero padding after the short prompt's tokens

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *teacher.latent_shape(), generator=g)
    scheduler = teacher.student_scheduler(4)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[1:2]
    with torch.no_grad():
        v = teacher.predict(pipe.transformer, x, t, {"prompt_embeds": cond["prompt_embeds"][:1]})
        stock_v = pipe.transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=stock[:1],
                                   return_dict=False)[0]
    assert torch.equal(v, stock_v)
    schedule = schedule_from_scheduler_config(scheduler)
    x0 = schedule.to_x0_noise(v, x, t)[0]
    ours = schedule.ode_step(x, x0, t, scheduler.timesteps[2:3])
    scheduler._step_index = 1
    torch.testing.assert_close(ours, scheduler.step(v, t, x, return_dict=False)[0], rtol=0, atol=1e-5)

    from dmdx.training import BackboneFeatures

    features = BackboneFeatures(pipe.transformer, teacher.discriminator_blocks(None),
                                select=teacher.feature_selector(teacher.latent_shape()))
    with torch.no_grad():
        maps = features(lambda: teacher.predict(pipe.transformer, x, t, {"prompt_embeds": stock[:1]}))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 5, 4, 4)] * 2  # (B, C, F', h, w)
