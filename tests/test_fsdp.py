"""FSDP2 through accelerate, on CPU: the SD3.5-Large recipe (``recipes/sd35_large``, full fine-tuning) on a tiny
SD3.5-style teacher, 2 processes over gloo, launched as users launch it (``bash train.sh`` -> ``accelerate launch
--config_file <the recipe's FSDP config with 2 processes>``).

accelerate 1.15 never selects FSDP for CPU processes (its device gate, see ``tests/fsdp_cpu/sitecustomize.py``);
the FSDP runs here put that folder on ``PYTHONPATH``, which lifts only that gate. Everything else (``fully_shard``
via ``accelerator.prepare``, sharded ``save_state`` / ``load_state``, ``get_state_dict`` for the export) is
accelerate's and torch's own code, unpatched.

Three runs of one seed and one set of flags (an EMA of the generator included, kept sharded under FSDP): A = FSDP,
4 steps, checkpoints at 2 and 4; B = FSDP resumed from a copy of A's step-2 checkpoint; C = the same run under
2-process DDP (the unsharded reference: with per-rank seeding both engines see the same per-rank micro-batches and
average the same gradients, so C computes what A computes; 1 process would draw only rank 0's batches).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port, recipe_env

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "distill_scripts" / "recipes" / "sd35_large"
GATE_PATCH = Path(__file__).resolve().parent / "fsdp_cpu"
PROMPTS = ["a red circle", "a blue square", "a green cat", "the digit 3", "a small house"]

pytestmark = pytest.mark.slow

# The recipe's flags, then what makes them tiny (later flags win). --adam_epsilon 1e-3: Adam's first updates are
# nearly sign(g) * lr with the default 1e-8, so a gradient element that is zero up to rounding would move by +-lr in
# one engine and -+lr in the other; with a large epsilon the update is proportional to the gradient and the two
# engines' rounding differences stay small (see test_fsdp_matches_ddp for the tolerance).
TINY = ["--resolution", "16", "--max_sequence_length", "32", "--mixed_precision", "no", "--report_to", "none",
        "--discriminator_head_channels", "64", "--discriminator_warmup_steps", "1", "--drop_t5",
        "--precompute_text_embeddings", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
        "--validation_steps", "100", "--generator_lr", "1e-2", "--fake_score_lr", "1e-2", "--discriminator_lr", "1e-2",
        "--adam_epsilon", "1e-3", "--max_train_steps", "4", "--use_ema", "--ema_decay", "0.5"]
NETWORKS = ("generator", "fake_score", "discriminator")  # accelerate's model order: pytorch_model_fsdp_{0,1,2}


def _config(workdir: Path, name: str, recipe_yaml: Path) -> Path:
    """The recipe's accelerate config with 2 processes and a free port; nothing else changed."""
    config = yaml.safe_load(recipe_yaml.read_text())
    config.update(num_processes=2, main_process_port=free_port())
    path = workdir / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SD3.5-style teacher; runs A (FSDP), B (FSDP, resumed from A's step 2) and C (DDP). Returns the folder
    and each run's combined output."""
    from diffusers import StableDiffusion3Pipeline

    from dmdx.pipelines.tiny_components import sd3_components

    root = tmp_path_factory.mktemp("fsdp")
    components = sd3_components(sample_size=8, num_layers=2, qk_norm="rms_norm")
    components = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
    StableDiffusion3Pipeline(**components).save_pretrained(root / "sd35")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")

    def run(output_dir: str, config: Path, fsdp: bool) -> str:
        env = recipe_env(root / "hf_home", CONFIG=config, TEACHER="sd35", PROMPTS="prompts.txt",
                         OUTPUT_DIR=output_dir,
                         ACCELERATE_USE_CPU="true")  # CPU processes over gloo (the recipe's use_cpu: false is for GPUs)
        env.pop("PYTHONPATH", None)
        if fsdp:
            env["PYTHONPATH"] = str(GATE_PATCH)
        proc = subprocess.run(["bash", str(RECIPE / "train.sh"), *TINY], cwd=root, env=env, capture_output=True,
                              text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{output_dir} failed ({proc.returncode}):\n{out[-8000:]}"
        return out

    fsdp_config = _config(root, "fsdp.yaml", RECIPE / "accelerate_fsdp.yaml")
    logs = {"A": run("A", fsdp_config, fsdp=True)}
    (root / "B").mkdir()
    shutil.copytree(root / "A" / "checkpoint-2", root / "B" / "checkpoint-2")
    logs["B"] = run("B", fsdp_config, fsdp=True)
    ddp_config = _config(root, "ddp.yaml", REPO / "distill_scripts" / "recipes" / "sd3_medium" / "accelerate_ddp.yaml")
    logs["C"] = run("C", ddp_config, fsdp=False)
    return root, logs


def _sharded(checkpoint: Path, index: int) -> dict[str, torch.Tensor]:
    """A network of a sharded (DCP) checkpoint as one full state dict, read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint.parent / f".full-{checkpoint.name}-{index}.pt"
    if not target.is_file():
        dcp_to_torch_save(str(checkpoint / f"pytorch_model_fsdp_{index}"), str(target))
    return torch.load(target, weights_only=True)["model"]  # accelerate saves {"model": state_dict}


def _unsharded(checkpoint: Path, index: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")))


def _exported(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp_shards_checkpoints_and_resumes_exactly(runs):
    """The recipe's config really runs FSDP2: the trainable networks are sharded (each rank writes its own shard of
    every weight), the frozen teacher is not prepared, and a resume from the sharded step-2 checkpoint ends in
    exactly the uninterrupted run's state."""
    from torch.distributed.checkpoint import FileSystemReader

    root, logs = runs
    a, b = root / "A", root / "B"
    assert sorted(p.name for p in a.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    checkpoint = a / "checkpoint-2"
    assert not list(checkpoint.glob("model*.safetensors"))  # no full copy: a sharded state dict
    for index in range(len(NETWORKS)):  # generator, fake score, D heads; nothing for the frozen teacher
        for kind in ("pytorch_model_fsdp", "optimizer"):
            folder = checkpoint / f"{kind}_{index}"
            assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], folder
    assert not (checkpoint / "pytorch_model_fsdp_3").exists()
    # the generator's EMA is kept sharded and saved gathered: full tensors, the shapes of the teacher's weights
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)["shadow_params"]
    full = _sharded(checkpoint, 0)
    assert [tuple(p.shape) for p in ema] == [tuple(v.shape) for k, v in full.items() if k != "pos_embed.pos_embed"]
    meta = FileSystemReader(str(checkpoint / "pytorch_model_fsdp_0")).read_metadata().state_dict_metadata
    weight = meta["model.transformer_blocks.0.attn.to_q.weight"]  # (32, 32): dim 0 split in two, one half per rank
    assert sorted(tuple(c.offsets) for c in weight.chunks) == [(0, 0), (16, 0)]
    assert all(tuple(c.sizes) == (16, 32) for c in weight.chunks)

    assert "resumed from" in logs["B"] and "at step 2" in logs["B"]
    for index, name in enumerate(NETWORKS):
        assert _max_diff(_sharded(a / "checkpoint-4", index), _sharded(b / "checkpoint-4", index)) == 0, name
    assert _max_diff(_exported(a), _exported(b)) == 0
    # ... and the steps after the checkpoint changed the generator (the comparison is not vacuous)
    assert _max_diff(_sharded(a / "checkpoint-2", 0), _sharded(a / "checkpoint-4", 0)) > 1e-3
    # sharded forwards in validation: every rank took part, the main process wrote the grid
    assert (a / "validation" / "step-000004.png").is_file()


def _host_memory(log: str) -> dict[int, dict[str, float]]:
    """Per process: the MiB of trainable weights it read before sharding and its peak resident set after prepare (the
    loop logs both on every process)."""
    out: dict[int, dict[str, float]] = {}
    for rank, mib in re.findall(r"process (\d+): ([\d.]+) MiB of trainable weights read", log):
        out.setdefault(int(rank), {})["weights_read_MiB"] = float(mib)
    for rank, mib in re.findall(r"process (\d+): peak host memory ([\d.]+) MiB", log):
        out.setdefault(int(rank), {})["peak_rss_MiB"] = float(mib)
    return out


def test_fsdp_reads_the_trainable_weights_once(runs):
    """Host RAM per process under FSDP: only the main process reads the generator's and the fake score's fp32 weights;
    the other process holds them on the meta device until prepare broadcasts them into its shards (the runs' sharded
    checkpoints and their agreement with DDP, above, show the weights arrived). Under DDP (run C) every process reads
    both full copies, as every FSDP process did before. Parameter bytes are the deterministic figure; the peak
    resident sets are printed (at this size the imports dominate them)."""
    root, logs = runs
    from safetensors.torch import load_file

    one_copy = sum(v.numel() * 4 for k, v in load_file(str(
        root / "sd35" / "transformer" / "diffusion_pytorch_model.safetensors")).items() if k != "pos_embed.pos_embed"
                   ) / 2**20  # the parameters (pos_embed.pos_embed is a buffer)
    fsdp, ddp = _host_memory(logs["A"]), _host_memory(logs["C"])
    print("host memory per process, FSDP:", fsdp, "DDP:", ddp, f"(one fp32 copy: {one_copy:.2f} MiB)")
    assert sorted(fsdp) == sorted(ddp) == [0, 1]
    assert fsdp[1]["weights_read_MiB"] == 0
    # generator + fake score: two fp32 copies (the log rounds to 0.1 MiB)
    assert fsdp[0]["weights_read_MiB"] == ddp[0]["weights_read_MiB"] == ddp[1]["weights_read_MiB"]
    assert abs(fsdp[0]["weights_read_MiB"] - 2 * one_copy) <= 0.051
    assert all(v["peak_rss_MiB"] > 0 for v in (*fsdp.values(), *ddp.values()))


def test_fsdp_host_memory_on_a_larger_teacher(tmp_path):
    """The peak resident set per process, at a size where the weights show: a 35.6 M-parameter SD3.5-style teacher
    (two fp32 copies = 272 MiB), one step of the recipe under FSDP on 2 processes. Process 1 reads no trainable
    weights; its peak stays below process 0's by most of the two copies (measured on this CPU in two runs: 791 / 850
    MiB vs 1035 / 1106 MiB; the same step under DDP: 1059 and 1065 MiB)."""
    from diffusers import StableDiffusion3Pipeline

    from dmdx.pipelines.tiny_components import sd3_components

    components = sd3_components(sample_size=8, num_layers=4, attention_head_dim=64, num_attention_heads=8,
                                qk_norm="rms_norm")
    StableDiffusion3Pipeline(**{k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
                             ).save_pretrained(tmp_path / "sd35")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    env = recipe_env(tmp_path / "hf_home", CONFIG=_config(tmp_path, "fsdp.yaml", RECIPE / "accelerate_fsdp.yaml"),
                     TEACHER="sd35", PROMPTS="prompts.txt", OUTPUT_DIR="out", ACCELERATE_USE_CPU="true",
                     PYTHONPATH=str(GATE_PATCH))
    one_step = ["--max_train_steps", "1", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "100",
                "--discriminator_warmup_steps", "0"]
    proc = subprocess.run(["bash", str(RECIPE / "train.sh"), *TINY, *one_step], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    memory = _host_memory(log)
    print("host memory per process, 35.6 M-parameter teacher under FSDP:", memory)
    two_copies = memory[0]["weights_read_MiB"]
    assert memory[1]["weights_read_MiB"] == 0 and two_copies > 250
    assert memory[1]["peak_rss_MiB"] < memory[0]["peak_rss_MiB"] - 0.5 * two_copies


def test_fsdp_matches_ddp(runs):
    """A (FSDP2) and C (DDP) of one seed end with the same weights, up to the engines' rounding.

    Tolerance: each network's largest difference between the two engines must stay below 2% of how far that network
    moved over steps 2-4 (measured on this CPU: 0.16% generator, 0.04% fake score, 0.38% D heads). They cannot
    agree bit for bit: FSDP reduce-scatters gradient shards where DDP all-reduces buckets, computes the gradient norm
    from per-shard sums, and runs element-wise optimizer kernels on shards at other offsets; that leaves ~1e-7
    relative differences at step 1, which ADM's low-signal generator gradient (the discriminator's logits differ by
    ~1e-5) amplifies over the following steps. A wrong shard, a missing gradient or a stale gathered weight moves a
    network by a sizeable part of what training moves it (the stale gathered norm_out unit this test found: 26-118%)."""
    root, _ = runs
    a, c = root / "A", root / "C"
    for index, name in enumerate(NETWORKS):
        fsdp, ddp = _sharded(a / "checkpoint-4", index), _unsharded(c / "checkpoint-4", index)
        moved = _max_diff(_unsharded(c / "checkpoint-2", index), ddp)
        assert moved > 1e-4, name
        assert _max_diff(fsdp, ddp) < 0.02 * moved, (name, _max_diff(fsdp, ddp), moved)
    from safetensors.torch import load_file

    # the exports: FSDP gathers the full weights (accelerator.get_state_dict); measured against the teacher's start
    start = load_file(str(root / "sd35" / "transformer" / "diffusion_pytorch_model.safetensors"))
    reference = _exported(c)
    assert _max_diff(_exported(a), reference) < 0.02 * _max_diff(start, reference)


# Runs in a fresh interpreter that never imports dmdx: stock diffusers only.
CHECKER = r"""
import json, sys
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], text_encoder_3=None, tokenizer_3=None)
pipe.set_progress_bar_config(disable=True)
out = pipe("a red circle", num_inference_steps=4, guidance_scale=0.0, height=16, width=16, output_type="np",
           generator=torch.Generator().manual_seed(0)).images
print("RESULT" + json.dumps({"pipeline": type(pipe).__name__, "sigmas": pipe.scheduler.sigmas.tolist(),
                             "shape": list(out.shape), "finite": bool(abs(out).max() < 1e9),
                             "qk_norm": pipe.transformer.config.qk_norm,
                             "dmdx": any(m.split(".")[0] == "dmdx" for m in sys.modules)}))
"""


def test_fsdp_export_is_a_stock_pipeline(runs):
    """The FSDP run's export is a full-weight stock StableDiffusion3Pipeline: every weight of the teacher's
    transformer, unsharded, loading and generating with stock diffusers at the trained sigmas."""
    root, _ = runs
    out = root / "A"
    student = _exported(out)
    from safetensors.torch import load_file

    teacher = load_file(str(root / "sd35" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert student.keys() == teacher.keys()
    assert all(student[k].shape == teacher[k].shape for k in teacher)  # full tensors, not one rank's shard
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", CHECKER, str(out)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["dmdx"] is False and result["pipeline"] == "StableDiffusion3Pipeline"
    assert result["shape"] == [1, 16, 16, 3] and result["finite"] and result["qk_norm"] == "rms_norm"
    config = json.loads((out / "training_config.json").read_text())
    torch.testing.assert_close(torch.tensor(result["sigmas"]), torch.tensor(config["student_sigmas"]),
                               rtol=0, atol=1e-6)
    assert config["generator_unchanged"] is False


def test_recipe_config_is_what_the_test_runs():
    """The test runs the recipe's own FSDP config: FSDP2, JointTransformerBlock units, resharded after forward,
    sharded checkpoints; only the process count (and port) differ here."""
    config = yaml.safe_load((RECIPE / "accelerate_fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP"
    assert config["fsdp_config"] == {
        "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "JointTransformerBlock", "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_offload_params": False,
        "fsdp_cpu_ram_efficient_loading": False, "fsdp_activation_checkpointing": False}
    assert "--lora_rank 0 --fake_score_lora_rank 0" in (RECIPE / "train.sh").read_text()
