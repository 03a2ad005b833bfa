"""distill_scripts/train_adm_sd3.py on tiny SD3 / SD3.5-style teachers, launched as users launch it.

One session fixture saves two tiny teachers (SD3: MMDiT + two CLIPs + T5; SD3.5-style: the same with
``qk_norm="rms_norm"``) with ``save_pretrained``. The subprocess runs are the README's SD3-Medium / SD3.5-Large
recipes with tiny sizes; the exported folders are then loaded by stock diffusers in a process that never imports
dmdx.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_ACCELERATE_CONFIG, recipe_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "distill_scripts" / "train_adm_sd3.py"
PROMPTS = ["a red circle", "a blue square", "a green cat", "the digit 3", "a small house"]

pytestmark = pytest.mark.slow




@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    from dmdx.pipelines.tiny_components import sd3_components

    root = tmp_path_factory.mktemp("sd3_script")
    for name, kwargs in (("sd3", {}), ("sd35", {"qk_norm": "rms_norm"})):
        components = sd3_components(sample_size=8, num_layers=2, **kwargs)
        components = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
        StableDiffusion3Pipeline(**components).save_pretrained(root / name)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "cpu.yaml").write_text(CPU_ACCELERATE_CONFIG)
    return root


# What makes a recipe tiny: the sizes of the tiny teachers, a CPU run of a few steps (later flags win).
TINY = ["--resolution", "16", "--max_sequence_length", "32", "--mixed_precision", "no", "--report_to", "none",
        "--discriminator_head_channels", "64", "--discriminator_warmup_steps", "1"]


def _run(cmd, workdir, env_extra=None, check=True):
    env = {**recipe_env(workdir / "hf_home"), **(env_extra or {})}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _recipe(workdir, recipe: str, teacher: str, output_dir: str, *overrides):
    """``bash distill_scripts/recipes/<recipe>/train.sh`` (the documented real recipe) on a tiny teacher, on CPU."""
    return _run(["bash", str(REPO / "distill_scripts" / "recipes" / recipe / "train.sh"), *TINY, *overrides],
                workdir, {"CONFIG": str(workdir / "cpu.yaml"), "TEACHER": teacher, "PROMPTS": "prompts.txt",
                          "OUTPUT_DIR": output_dir})


def _launch(workdir, *args, check=True):
    """The script with plain python (one process, no accelerate launcher)."""
    common = ["--prompts_file", "prompts.txt", "--resolution", "16", "--max_sequence_length", "32"]
    return _run([sys.executable, str(SCRIPT), *common, *args], workdir, check=check)


# Runs in a fresh interpreter that never imports dmdx: stock diffusers only.
CHECKER = r"""
import json, sys
import torch
from diffusers import DiffusionPipeline
student_dir, teacher_dir, lora = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
index = json.load(open(student_dir + "/model_index.json"))
# diffusers needs a component saved as [null, null] (T5 dropped) to be passed as None explicitly
no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if index["text_encoder_3"] == [None, None] else {}
pipe = DiffusionPipeline.from_pretrained(student_dir, **no_t5)
pipe.set_progress_bar_config(disable=True)
out = pipe("a red circle", num_inference_steps=4, guidance_scale=0.0, height=16, width=16, output_type="np",
           generator=torch.Generator().manual_seed(0)).images
result = {
    "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
    "sigmas": pipe.scheduler.sigmas.tolist(), "timesteps": pipe.scheduler.timesteps.tolist(),
    "image_shape": list(out.shape), "finite": bool(abs(out).max() < 1e9),
    "text_encoder_3": pipe.text_encoder_3 is not None, "qk_norm": pipe.transformer.config.qk_norm,
}
if lora:
    teacher = DiffusionPipeline.from_pretrained(teacher_dir)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g)
    text = torch.randn(2, 5, 32, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    t = torch.tensor([700.0, 250.0])
    def run(transformer):
        with torch.no_grad():
            return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                               return_dict=False)[0]
    before = run(teacher.transformer)
    teacher.load_lora_weights(student_dir)
    after = run(teacher.transformer)
    fused = run(pipe.transformer)
    result["lora_change"] = (after - before).abs().max().item()
    result["lora_vs_fused"] = (after - fused).abs().max().item()
result["dmdx_imported"] = any(m == "dmdx" or m.startswith("dmdx.") for m in sys.modules)
print("RESULT" + json.dumps(result))
"""


def _check_export(workdir, out_dir, teacher, lora):
    proc = subprocess.run([sys.executable, "-c", CHECKER, str(out_dir), str(workdir / teacher), "1" if lora else "0"],
                          cwd=workdir, env=recipe_env(workdir / "hf_home"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["dmdx_imported"] is False
    assert result["pipeline"] == "StableDiffusion3Pipeline"
    assert result["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert result["image_shape"] == [1, 16, 16, 3] and result["finite"]
    # the shipped scheduler runs exactly the trained schedule
    config = json.loads((out_dir / "training_config.json").read_text())
    assert len(result["sigmas"]) == 5 and len(config["student_sigmas"]) == 5
    torch.testing.assert_close(torch.tensor(result["sigmas"]), torch.tensor(config["student_sigmas"]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(result["timesteps"]), torch.tensor(config["student_timesteps"]),
                               rtol=0, atol=1e-4)
    assert result["sigmas"][3] == pytest.approx(0.25, abs=1e-6)  # shift_terminal: the last step does work
    return result


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6, msg=f"{k} differs")


def test_sd3_medium_lora_adm_resume_and_export(workdir):
    """SD3-Medium recipe (LoRA generator and fake score, ADM): runs, checkpoints, resumes exactly, exports a
    stock pipeline with the trained sigmas and LoRA weights that load onto the teacher."""
    tiny = ["--lora_rank", "4", "--fake_score_lora_rank", "4", "--gradient_accumulation_steps", "1",
            "--max_train_steps", "4", "--checkpointing_steps", "2", "--generator_lr", "1e-3", "--discriminator_lr",
            "1e-3"]
    _recipe(workdir, "sd3_medium", "sd3", "lora_a", *tiny, "--validation_steps", "2")
    a, b = workdir / "lora_a", workdir / "lora_b"
    assert sorted(p.name for p in a.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(a.glob("*.tmp"))
    # LoRA checkpoints hold only the adapters (generator, fake score), not the frozen teacher-copy bases
    for name in ("model.safetensors", "model_1.safetensors"):
        keys = _tensors(a / "checkpoint-2" / name).keys()
        assert keys and all("lora_" in k for k in keys), name
    assert (a / "validation" / "step-000004.png").is_file()
    card = (a / "README.md").read_text()
    assert "FlowMatchEulerDiscreteScheduler" in card and "load_lora_weights" in card

    # resume: a second run starts from the first run's step-2 checkpoint and must end in the identical state
    b.mkdir()
    shutil.copytree(a / "checkpoint-2", b / "checkpoint-2")
    proc = _recipe(workdir, "sd3_medium", "sd3", "lora_b", *tiny, "--validation_steps", "100")
    assert "resumed from" in proc.stderr + proc.stdout and "at step 2" in proc.stderr + proc.stdout
    for name in ("model.safetensors", "model_1.safetensors", "model_2.safetensors"):  # generator, fake score, D
        _assert_same_tensors(a / "checkpoint-4" / name, b / "checkpoint-4" / name)
    _assert_same_tensors(a / "pytorch_lora_weights.safetensors", b / "pytorch_lora_weights.safetensors")
    # ... and the steps after the checkpoint did change the state (the comparison is not vacuous)
    before, after = _tensors(a / "checkpoint-2" / "model.safetensors"), _tensors(a / "checkpoint-4" /
                                                                                 "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora" in k)

    result = _check_export(workdir, a, "sd3", lora=True)
    assert result["text_encoder_3"] is True
    assert result["lora_change"] > 1e-6  # the LoRA changes the teacher's output
    assert result["lora_vs_fused"] < 1e-4  # teacher + LoRA == the exported (fused) student transformer


def test_sd35_large_full_adm_drop_t5_precompute(workdir):
    """SD3.5-Large recipe (full generator and fake score, ADM) with T5 dropped, embeddings precomputed, gradient
    checkpointing, gradient accumulation and an EMA of the generator."""
    _recipe(workdir, "sd35_large", "sd35", "full", "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--gradient_accumulation_steps", "2", "--drop_t5", "--precompute_text_embeddings", "--use_ema",
            "--ema_decay", "0.5", "--validation_steps", "100")
    out = workdir / "full"
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and not (out / "text_encoder_3").exists()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert "text_encoder_3=None, tokenizer_3=None" in (out / "README.md").read_text()
    student, teacher = _tensors(out / "transformer" / "diffusion_pytorch_model.safetensors"), _tensors(
        workdir / "sd35" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # full fine-tuning changed the weights
    result = _check_export(workdir, out, "sd35", lora=False)
    assert result["text_encoder_3"] is False and result["qk_norm"] == "rms_norm"


def test_dmd_baseline_runs(workdir):
    """--distribution_loss dmd (DMD2's loss, fake-score ratio 5 by default) on the SD3 teacher."""
    proc = _recipe(workdir, "sd3_medium", "sd3", "dmd", "--lora_rank", "4", "--fake_score_lora_rank", "4",
                   "--distribution_loss", "dmd", "--fake_score_update_ratio", "5", "--gradient_accumulation_steps",
                   "1", "--max_train_steps", "1", "--validation_steps", "100", "--checkpointing_steps", "1")
    assert "DMD distillation" in proc.stderr + proc.stdout and "no discriminator (dmd)" in proc.stderr + proc.stdout
    # DMD2 has no discriminator: the checkpoint holds the generator and the fake score only (no heads, no D optimizer)
    checkpoint = workdir / "dmd" / "checkpoint-1"
    assert (checkpoint / "model_1.safetensors").is_file() and not (checkpoint / "model_2.safetensors").exists()
    config = json.loads((workdir / "dmd" / "training_config.json").read_text())
    assert config["fake_score_update_ratio"] == 5 and config["distribution_loss"] == "dmd"
    assert (workdir / "dmd" / "model_index.json").is_file()


def test_non_finite_loss_stops_without_checkpoint(workdir):
    """A teacher whose weights hold NaN: the run stops naming the loss term, leaving no checkpoint or export."""
    from safetensors.torch import load_file, save_file

    bad = workdir / "sd3_nan"
    if not bad.exists():
        shutil.copytree(workdir / "sd3", bad)
        path = bad / "transformer" / "diffusion_pytorch_model.safetensors"
        state = load_file(str(path))
        state["proj_out.weight"] = torch.full_like(state["proj_out.weight"], float("nan"))
        save_file(state, str(path))
    proc = _launch(workdir, "--pretrained_model_name_or_path", "sd3_nan", "--lora_rank", "4", "--max_train_steps",
                   "2", "--checkpointing_steps", "1", "--output_dir", "nan_run", check=False)
    assert proc.returncode != 0
    assert "NonFiniteLossError" in proc.stderr and "loss_fake_score" in proc.stderr
    assert not list((workdir / "nan_run").glob("checkpoint-*"))
    assert not (workdir / "nan_run" / "model_index.json").exists()


# ---- clear errors before any heavy work (in-process: only configs are read) ------------------------------------
@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_adm_sd3", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_non_sd3_checkpoint(workdir):
    from dmdx.pipelines.teachers import SD3Teacher
    from dmdx.training.errors import UsageError

    sdxl = workdir / "not_sd3"
    sdxl.mkdir(exist_ok=True)
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(UsageError, match="StableDiffusionXLPipeline.*train_adm_sdxl.py"):
        SD3Teacher(str(sdxl))
    with pytest.raises(UsageError, match="not a diffusers pipeline folder"):
        SD3Teacher(str(workdir / "nothing"))


def test_error_bad_resolution_blocks_and_t5(workdir):
    from dmdx.pipelines.teachers import SD3Teacher
    from dmdx.training.errors import UsageError

    teacher = SD3Teacher(str(workdir / "sd3"))
    with pytest.raises(UsageError, match="not divisible by 2"):
        teacher.latent_shape(15)
    with pytest.raises(UsageError, match="larger than the transformer's pos_embed_max_size"):
        teacher.latent_shape(128)
    with pytest.raises(UsageError, match=r"--discriminator_blocks \[5\] out of range"):
        teacher.discriminator_blocks("0,5")
    with pytest.raises(UsageError, match="--shift_terminal 1.5 must be in"):
        SD3Teacher(str(workdir / "sd3"), shift_terminal=1.5)
    no_t5 = workdir / "sd3_no_t5"  # configs are all a check reads
    for sub in ("transformer", "vae"):
        (no_t5 / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(workdir / "sd3" / sub / "config.json", no_t5 / sub / "config.json")
    index = json.loads((workdir / "sd3" / "model_index.json").read_text())
    (no_t5 / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None],
                                                        "tokenizer_3": [None, None]}))
    with pytest.raises(UsageError, match="has no T5 encoder.*--drop_t5"):
        SD3Teacher(str(no_t5))
    assert not SD3Teacher(str(no_t5), drop_t5=True).has_t5
    assert teacher.discriminator_blocks(None) == ["transformer_blocks.0", "transformer_blocks.1"]
    assert teacher.latent_shape(16) == (16, 8, 8) and teacher.has_t5


def _args(script, workdir, *extra):
    return script.parse_args(["--prompts_file", str(workdir / "prompts.txt"), "--resolution", "16", *extra])


def test_error_bad_flags(script, workdir, capsys):
    base = ["--pretrained_model_name_or_path", str(workdir / "sd3")]
    with pytest.raises(SystemExit):
        _args(script, workdir, *base, "--min_timestep_percent", "0.01")
    assert "must be >= --ode_step_dt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args(script, workdir, *base, "--distribution_loss", "sid")
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(base)
    assert "exactly one of --prompts_file or --dataset_name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args(script, workdir, *base, "--discriminator_warmup_steps", "4000")
    assert "the generator never trains" in capsys.readouterr().err
    args = _args(script, workdir, *base, "--distribution_loss", "dmd", "--lora_rank", "0")
    assert args.fake_score_update_ratio == 5 and args.fake_score_lora_rank == 0


def test_inference_benchmark_times_the_student_at_its_own_steps(workdir):
    """benchmarks/inference_speed.py reads the student's step count from training_config.json and the network really
    runs that many times (counted with a forward hook), so a 4-step student is timed at 4 NFE."""
    out = workdir / "lora_a"
    if not (out / "training_config.json").is_file():
        pytest.skip("needs test_sd3_medium_lora_adm_resume_and_export's export")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import inference_speed

    result = inference_speed.main(["--teacher", str(workdir / "sd3"), "--student", str(out), "--teacher_steps", "3",
                                   "--repeats", "1", "--batch_size", "1", "--resolution", "16"])
    assert result["student"]["steps"] == 4 and result["student"]["denoiser_calls"] == 4
    assert result["student"]["nfe"] == 4 and result["teacher"]["nfe"] == 6 and result["teacher"]["denoiser_calls"] == 3
