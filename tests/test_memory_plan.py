"""benchmarks/memory_plan.py and benchmarks/gpu_check.py: the plan's arithmetic on a tiny MMDiT (every byte count
from its parameter counts, checked against modules built on the CPU), the self-check through the real loop on a
tiny teacher (its ratio is finite), and gpu_check's CPU smoke mode (and its clear stop without CUDA)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, script_env

BENCHMARKS = Path(REPO) / "benchmarks"
TINY_SD3 = {"sample_size": 16, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 3,
            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
            "caption_projection_dim": 32, "pooled_projection_dim": 64, "pos_embed_max_size": 16}
TINY_WAN = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
            "out_channels": 4, "text_dim": 24, "freq_dim": 16, "ffn_dim": 40, "num_layers": 5, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 32}


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mp():
    return _load("memory_plan")


@pytest.fixture(scope="module")
def tiny_facts(mp):
    spec = {"class": "SD3Transformer2DModel", "config": TINY_SD3, "family": "sd3", "source": "test",
            "text_encoders": [], "units": ("JointTransformerBlock",), "lora_targets": mp.SD3_LORA, "lora_rank": 4,
            "resolution": (128, 128), "frames": None, "text_tokens": 8}
    return mp.architecture_facts("tiny", spec, head_channels=16)


def test_meta_counts_match_modules_built_on_the_cpu(mp, tiny_facts):
    from diffusers import SD3Transformer2DModel

    from dmdx.training import BackboneFeatures, DiscriminatorHeads

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY_SD3)
    assert tiny_facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert tiny_facts["buffer_elements"] == sum(b.numel() for b in model.buffers())
    units = [sum(p.numel() for p in b.parameters()) for b in model.transformer_blocks]
    assert tiny_facts["largest_unit_parameters"] == max(units)
    assert tiny_facts["root_parameters"] == tiny_facts["parameters"] - sum(units)
    # LoRA: rank x (in + out) for every targeted linear layer
    lora = sum(4 * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(mp.SD3_LORA))
    assert tiny_facts["lora_parameters"] == lora > 0
    # D: the real features on the CPU give the meta forward's shapes and the same heads
    geometry = mp.latent_geometry({"config": TINY_SD3, "family": "sd3", "resolution": (128, 128), "frames": None})
    features = BackboneFeatures(model, tiny_facts["discriminator_blocks"], select=mp.feature_selector("sd3", geometry))
    with torch.no_grad():
        shapes = [list(f.shape[1:]) for f in features(lambda: mp.call_denoiser(
            model, mp.denoiser_inputs("sd3", TINY_SD3, 1, geometry, 8)))]
    assert tiny_facts["discriminator_blocks"] == [f"transformer_blocks.{i}" for i in range(3)]
    assert shapes == tiny_facts["feature_shapes"] == [[32, 8, 8]] * 3
    heads = DiscriminatorHeads([tuple(s) for s in shapes], hidden_channels=16)
    assert tiny_facts["heads_parameters"] == sum(p.numel() for p in heads.parameters())


def test_wan_meta_facts_match_the_model_and_the_adapter(mp):
    """The plan's Wan facts (meta device) against a tiny WanTransformer3DModel built on the CPU: parameters, rotary
    buffers, FSDP units, LoRA size, and D's features, which equal what WanTeacher's own selector makes of the same
    blocks' outputs (the blocks WanTeacher picks by default)."""
    from types import SimpleNamespace

    from diffusers import WanTransformer3DModel

    from dmdx.pipelines.teachers.base import transformer_block_names
    from dmdx.pipelines.teachers.wan import WanTeacher
    from dmdx.training import BackboneFeatures, DiscriminatorHeads

    spec = {"class": "WanTransformer3DModel", "config": TINY_WAN, "family": "wan", "source": "test",
            "text_encoders": [], "units": ("WanTransformerBlock",), "lora_targets": mp.ATTN_LORA, "lora_rank": 4,
            "resolution": (32, 48), "frames": 9, "text_tokens": 6}
    f = mp.architecture_facts("tiny-wan", spec, head_channels=16)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_WAN).eval()
    assert f["parameters"] == sum(p.numel() for p in model.parameters())
    assert f["buffer_elements"] == sum(b.numel() for b in model.buffers()) > 0  # the rotary tables
    units = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    assert (f["fsdp_units"], f["largest_unit_parameters"]) == (5, max(units))
    assert f["root_parameters"] == f["parameters"] - sum(units)
    lora = sum(4 * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(mp.ATTN_LORA))
    assert f["lora_parameters"] == lora > 0
    # 9 frames -> 3 latent frames (VAE time factor 4), 32 x 48 px -> 4 x 6 latent -> 2 x 3 patches: 18 video tokens
    geometry = mp.latent_geometry(spec)
    assert (tuple(geometry["latent"]), geometry["tokens"], f["geometry"]["tokens"]) == ((4, 3, 4, 6), 18, 18)
    blocks = [f"blocks.{n.rsplit('.', 1)[1]}" for n in transformer_block_names(None, 5)]  # WanTeacher's default
    assert f["discriminator_blocks"] == blocks == ["blocks.0", "blocks.1", "blocks.3", "blocks.4"]
    inputs = mp.denoiser_inputs("wan", TINY_WAN, 1, geometry, 6)
    plan_features = BackboneFeatures(model, blocks, select=mp.feature_selector("wan", geometry))
    adapter_select = WanTeacher.feature_selector(SimpleNamespace(denoiser_config=TINY_WAN), geometry["latent"])
    with torch.no_grad():
        ours = plan_features(lambda: mp.call_denoiser(model, inputs))
        plan_features.remove()
        theirs = BackboneFeatures(model, blocks, select=adapter_select)(lambda: mp.call_denoiser(model, inputs))
    assert [list(x.shape[1:]) for x in ours] == f["feature_shapes"] == [[32, 3, 2, 3]] * 4
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    heads = DiscriminatorHeads([tuple(s) for s in f["feature_shapes"]], hidden_channels=16)
    assert f["heads_parameters"] == sum(p.numel() for p in heads.parameters())


def test_plan_arithmetic(mp, tiny_facts):
    f = tiny_facts
    P, B, H, L = f["parameters"], f["buffer_elements"], f["heads_parameters"], f["lora_parameters"]
    acts = {k: 1000.0 * (i + 1) for i, k in enumerate(mp.BACKBONE_KINDS + mp.HEAD_KINDS)}
    full = mp.setup_from(f, 0, 0, batch=2, gradient_checkpointing=True, ema=True, activations=acts,
                         text_encoders=False)
    one = mp.predict(full)
    assert one["frozen_weights"] == 2 * (P + B)  # the bf16 teacher, one copy (real score = D backbone)
    assert one["trainable_weights"] == 4 * 2 * (P + B)  # fp32 generator and fake score
    assert one["optimizer_states"] == 8 * 2 * P  # AdamW: two fp32 moments
    assert one["discriminator_heads"] == 12 * H and one["ema"] == 4 * P and one["engine_buffers"] == 0
    assert one["total"] == sum(v for k, v in one.items() if k not in ("total", "peak_phase"))
    # at tiny size the generator's optimizer step is the peak: its gradients, foreach temporaries, autocast's cache
    assert one["peak_phase"] == "generator_step"
    assert (one["gradients"], one["optimizer_temporaries"], one["autocast_cache"]) == (4 * P, 4 * P, 2 * 2 * P)
    # the generator update's activations: checkpointed G + checkpointed fake (input grad) + D backbone + heads, x batch
    phases = mp.predict({**full, "activations": {**acts, "train_gc": 1e12}})
    assert phases["peak_phase"] == "generator"
    assert phases["activations"] == 2 * (1e12 + acts["input_gc"] + acts["d_backbone"] + acts["heads_input"])

    ddp = mp.predict(full, "ddp", 8)
    assert ddp["engine_buffers"] == 4 * (2 * P + H) and ddp["frozen_weights"] == one["frozen_weights"]
    rep, shd = mp.predict(full, "fsdp2_teacher_replicated", 8), mp.predict(full, "fsdp2_teacher_sharded", 8)
    assert rep["trainable_weights"] == 4 * 2 * (P / 8 + B) and rep["optimizer_states"] == 8 * 2 * P / 8
    assert rep["frozen_weights"] == 2 * (P + B) and shd["frozen_weights"] == 2 * (P / 8 + B)
    assert rep["autocast_cache"] == 0 and rep["ema"] == 4 * P  # bf16 gathers; EMA built unsharded
    unit, root = f["largest_unit_parameters"], f["root_parameters"]
    assert rep["engine_buffers"] == (2 * unit + root) * 2 + 2 * unit

    lora = mp.predict(mp.setup_from(f, 4, 4, batch=2, gradient_checkpointing=True, ema=True, activations=acts,
                                    text_encoders=False))
    assert lora["frozen_weights"] == 2 * (P + B) and lora["trainable_weights"] == 4 * 2 * L
    assert lora["optimizer_states"] == 8 * 2 * L and lora["ema"] == 0  # no EMA for a LoRA generator
    # a frozen LoRA fake-score view does not checkpoint: its pass costs "input", not "input_gc"
    big = mp.predict(mp.setup_from(f, 4, 4, batch=1, gradient_checkpointing=True, ema=False, text_encoders=False,
                                   activations={**acts, "input": 1e12}))
    assert big["peak_phase"] == "generator" and big["activations"] > 1e12

    adam8 = mp.predict(mp.setup_from(f, 0, 0, batch=2, gradient_checkpointing=True, ema=False, activations=acts,
                                     text_encoders=False, adam_8bit=True))
    assert adam8["optimizer_states"] == 2 * 2 * P and adam8["discriminator_heads"] == 6 * H
    assert adam8["optimizer_temporaries"] == 0  # bitsandbytes steps tensor by tensor

    measured = {"width": 16, "bytes_per_token": {"input": 10.0},
                "heads": {"32": {k: {"bytes_per_pixel": 3.0} for k in mp.HEAD_KINDS}}}
    per_sample = mp.activations_per_sample(f, measured)
    assert per_sample["input"] == 10.0 * (32 / 16) * (64 + 8)  # slope x width ratio x (image + text tokens)
    assert per_sample["heads_input"] == 3.0 * 3 * 64


def test_frozen_pass_checkpointing_and_text_cache_in_the_plan(mp, tiny_facts):
    """--gradient_checkpointing_frozen_passes turns the generator update's fake-score pass into input_gc (a LoRA view
    too) and D's backbone pass into d_backbone_gc; the text cache leaves the encoders off the GPU."""
    f = tiny_facts
    acts = {k: 1000.0 * (i + 1) for i, k in enumerate(mp.BACKBONE_KINDS + mp.HEAD_KINDS)}
    acts["train_gc"] = 1e12  # the generator update is the peak
    for ranks in ((0, 0), (4, 4)):
        plain = mp.predict(mp.setup_from(f, *ranks, batch=2, gradient_checkpointing=True, ema=False,
                                         activations=acts, text_encoders=False))
        frozen = mp.predict(mp.setup_from(f, *ranks, batch=2, gradient_checkpointing=True, ema=False,
                                          activations=acts, text_encoders=False, frozen_checkpointing=True))
        assert frozen["peak_phase"] == plain["peak_phase"] == "generator"
        fake_before = acts["input_gc"] if ranks[1] == 0 else acts["input"]
        assert plain["activations"] == 2 * (1e12 + fake_before + acts["d_backbone"] + acts["heads_input"])
        assert frozen["activations"] == 2 * (1e12 + acts["input_gc"] + acts["d_backbone_gc"] + acts["heads_input"])
    with_text = mp.setup_from({**f, "text_encoder_parameters": {"t5": 1000}}, 0, 0, batch=1,
                              gradient_checkpointing=True, ema=False, activations=None)
    assert mp.predict(with_text)["text_encoders"] == 2 * 1000  # bf16 encoders when loaded


def test_adp_plan_arithmetic(mp, tiny_facts):
    """ADP's rows: the VAE decoder's per-latent-pixel slope at 1024 px (128 x 128 latents), SAM's measured pass, the
    pixel heads per feature pixel, plus the generator and the latent D from the model's own measurement."""
    f = {**tiny_facts, "text_encoder_parameters": {"clip": 100}}
    acts = {k: 1000.0 * (i + 1) for i, k in enumerate(mp.BACKBONE_KINDS + mp.HEAD_KINDS)}
    acts["train_gc"] = 1e12  # the generator update is the peak
    measured = {"vae_decode": {"bytes_per_latent_pixel": 10.0}, "vae_decode_gc": {"bytes_per_latent_pixel": 3.0},
                "sam_input": {"bytes": 5e6},
                "sam_feature_shape": [16, 4, 4],
                "pixel_heads": {"heads_input": {"bytes_per_pixel": 2.0}, "heads_train": {"bytes_per_pixel": 1.0}}}
    plan = mp.adp_plan(f, acts, measured)
    per = plan["activations_per_sample"]  # the recipe's setup: the decoder checkpointed
    assert per["VAE decoder backward"] == 3.0 * 128 * 128 and per["SAM"] == 5e6
    before = plan["activations_per_sample_by_setup"][mp.ADP_SETUPS[-1][0]]
    assert before["VAE decoder backward"] == 10.0 * 128 * 128
    assert per["pixel heads"] == 4 * 2.0 * 16 and per["latent D backbone (d_backbone)"] == acts["d_backbone"]
    assert len(plan["rows"]) == 2 * len(mp.ADP_SETUPS)
    one, ddp = plan["rows"][:2]
    assert (one["gpus"], ddp["gpus"], ddp["engine"], one["batch"]) == (1, 8, "ddp", mp.ADP_RECIPE["batch"])
    P = f["parameters"]
    assert one["trainable_weights"] == 4 * (P + f["buffer_elements"]) and one["optimizer_states"] == 2 * P  # 8-bit
    assert ddp["total"] - one["total"] == ddp["engine_buffers"] > 4 * P
    assert one["text_encoders"] == 200 and one["peak_phase"] == "generator"
    assert one["activations"] == mp.ADP_RECIPE["batch"] * sum(per.values())
    assert one["total"] == sum(v for k, v in one.items() if k not in (
        "total", "peak_phase", "gpus", "engine", "setup", "batch", "vae_checkpointing"))


def test_teacher_choice_is_in_row_order(mp):
    rows = [{"model": "m", "mode": mode, "gpus": n, "engine": e, "total": 10 * mp.GiB}
            for mode in ("b", "a", "c") for n in mp.GPU_COUNTS[1:] for e in mp.ENGINES]
    facts = {"parameters": 1e9}
    for _ in range(3):
        assert list(mp.teacher_choice("m", facts, rows)) == ["b x8", "a x8", "c x8", "b x64", "a x64", "c x64"]


def test_committed_plan_fits_every_recipe_on_its_cards():
    """benchmarks/results/memory_plan.json as committed: every recipe, as its train.sh runs it (frozen-pass
    checkpointing where set, the text cache), fits the cards it names with 10% headroom (80 GB; Wan 14B: 141 GB,
    H200), and so does SDXL's ADP stage."""
    result = json.loads((BENCHMARKS / "results" / "memory_plan.json").read_text())
    gib = result["gib"]
    cards = {"wan2.1-14b": 141e9 / gib}  # GiB per card; every other recipe names 80 GB cards
    for key, model in result["models"].items():
        recipe = model["recipe_variants"]["recipe"]
        card = cards.get(key, result["gpu_gib"])
        assert recipe["text_encoders"] == 0 and recipe["card_gib"] == pytest.approx(card), key
        assert recipe["total"] / gib <= result["fit_gib"] / result["gpu_gib"] * card, (key, recipe["total"] / gib)
    assert set(result["models"]) >= {"sdxl", "sd3-medium", "sd3.5-large", "cogvideox-2b", "cogvideox-5b",
                                      "wan2.1-1.3b", "wan2.1-14b"}
    for key in ("wan2.1-1.3b", "wan2.1-14b"):  # measured on Wan's own small configuration
        measured = result["models"][key]["activation_measurement"]
        assert measured["width"] == 128 and all(v > 0 for v in measured["bytes_per_token"].values()), key
    recipe = next(r for r in result["adp"]["rows"] if r["setup"].startswith("recipe") and r["engine"] == "ddp")
    assert recipe["total"] / gib <= result["gpu_gib"]
    assert result["adp"]["activations_per_sample"]["VAE decoder backward"] > 0


RECIPES = Path(REPO) / "distill_scripts" / "recipes"
WAN_RECIPES = {"wan_1_3b": "wan2.1-1.3b", "wan_14b": "wan2.1-14b"}


def _recipe_flags(name: str) -> tuple[dict, Path]:
    """The flags train.sh passes (the last value of each; a bare flag is True) and its default CONFIG file."""
    import shlex

    text = (RECIPES / name / "train.sh").read_text()
    config = text.split("CONFIG=${CONFIG:-$ROOT/", 1)[1].split("}", 1)[0]
    launch = text.split("accelerate launch", 1)[1].split('"$@"', 1)[0].replace("\\\n", " ")
    flags, words = {}, shlex.split(launch)
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
            flags[word[2:]] = value
    return flags, Path(REPO) / config


def test_the_plans_wan_recipes_are_the_recipes_as_written(mp):
    """The plan's "(recipe)" rows are the Wan recipes as train.sh runs them: size, frames, batch, full roles,
    frozen-pass checkpointing, and the engine and GPU count of its default accelerate config. The 1.3B's FSDP config is
    the 14B's (which tests/test_wan_script.py runs on 2 CPU processes) apart from its comments."""
    import yaml

    engines = {}
    for name, key in WAN_RECIPES.items():
        flags, config_path = _recipe_flags(name)
        spec = mp.MODELS[key]
        config = yaml.safe_load(config_path.read_text())
        engines[name] = config
        assert (int(flags["height"]), int(flags["width"])) == spec["resolution"], name
        assert int(flags["num_frames"]) == spec["frames"] and int(flags["train_batch_size"]) == spec["batch"], name
        assert (int(flags["lora_rank"]), int(flags["fake_score_lora_rank"])) == spec["modes"][0] == (0, 0), name
        assert flags.get("gradient_checkpointing") is True and spec["gradient_checkpointing"], name
        assert flags.get("gradient_checkpointing_frozen_passes", False) is spec["frozen_checkpointing"] is True, name
        engine = {"MULTI_GPU": "ddp", "FSDP": "fsdp2_teacher_replicated"}[config["distributed_type"]]
        if engine != "ddp":  # FSDP2 of the trainable roles; the teacher is never prepared (replicated)
            assert config["fsdp_config"]["fsdp_version"] == 2, name
            assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] in spec["units"], name
        assert (config["num_processes"], engine) == spec["recipe_engine"], name
    assert engines["wan_1_3b"] == engines["wan_14b"]


def test_wan_recipes_quote_the_plan():
    """The Wan recipes' headers and accelerate configs give the committed plan's per-GPU figures: every "N GiB" they
    write is a figure of the plan (a row's or variant's component, total, resident part, or activations per sample,
    to 0.1 GiB; the card's 131 / 118 GiB), the recipe's own total among them, and the 14B's names what 720x1280
    would need."""
    import re

    result = json.loads((BENCHMARKS / "results" / "memory_plan.json").read_text())
    gib = result["gib"]
    transient = ("gradients", "autocast_cache", "activations", "optimizer_temporaries")
    for name, key in WAN_RECIPES.items():
        model = result["models"][key]
        figures = {f"{v / gib:.1f}" for v in model["activations"].values()}
        for row in [*model["rows"], *model["recipe_variants"].values(), *model["size_variants"]]:
            numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("gpus", "card_gib")}
            figures |= {f"{v / gib:.1f}" for v in numbers.values()}
            if "frozen_weights" in row:
                figures.add(f"{(row['total'] - sum(row[k] for k in transient)) / gib:.1f}")  # resident
                figures.add(f"{(row['trainable_weights'] + row['optimizer_states']) / gib:.1f}")
        card = model["recipe_variants"]["recipe"]["card_gib"]
        figures |= {f"{card:.0f}", f"{result['fit_gib'] / result['gpu_gib'] * card:.0f}"}
        flags, config = _recipe_flags(name)
        texts = {"train.sh": " ".join(line.lstrip("# ") for line in (RECIPES / name / "train.sh").read_text()
                                      .splitlines() if line.startswith("#"))}
        for yaml_file in sorted((RECIPES / name).glob("*.yaml")):
            texts[yaml_file.name] = " ".join(line.lstrip("# ") for line in yaml_file.read_text().splitlines()
                                             if line.startswith("#"))
        for where, text in texts.items():
            quoted = re.findall(r"(\d+(?:\.\d+)?) GiB", text)
            assert quoted, (name, where)
            assert not set(quoted) - figures, (name, where, sorted(set(quoted) - figures))
        recipe = f"{model['recipe_variants']['recipe']['total'] / gib:.1f} GiB"
        assert recipe in texts["train.sh"] and recipe in texts[config.name], (name, recipe)
    large = result["models"]["wan2.1-14b"]["size_variants"]
    hd = next(v for v in large if (v["height"], v["frames"], v["gpus"]) == (720, 81, 8))["total"] / gib
    assert hd > 141e9 / gib and f"{hd:.1f} GiB" in texts["train.sh"] and "sequence parallelism" in texts["train.sh"]


def test_real_configs_give_the_published_counts(mp):
    model = mp.build_denoiser("SD3Transformer2DModel", mp.SD3_MEDIUM)
    assert sum(p.numel() for p in model.parameters()) == 2_028_328_000
    assert mp.latent_geometry(mp.MODELS["cogvideox-5b"])["tokens"] == 13 * 30 * 45
    assert mp.default_discriminator_blocks("sd3", mp.SD35_LARGE) == [f"transformer_blocks.{i}" for i in (0, 12, 25, 37)]
    # Wan 2.1: 81 frames at 480x832 / 720x1280 -> 21 latent frames, 32,760 / 75,600 video tokens; UMT5-XXL 5.68 B
    assert mp.latent_geometry(mp.MODELS["wan2.1-1.3b"])["latent"] == (16, 21, 60, 104)
    assert mp.latent_geometry(mp.MODELS["wan2.1-1.3b"])["tokens"] == 32_760
    assert mp.latent_geometry(mp.MODELS["wan2.1-14b"], (720, 1280), 81)["tokens"] == 75_600
    assert mp.latent_geometry(mp.MODELS["wan2.1-14b"])["tokens"] == 9 * 30 * 52  # the recipe's 33 frames at 480x832
    assert mp.default_discriminator_blocks("wan", mp.WAN_14B) == [f"blocks.{i}" for i in (0, 13, 26, 39)]
    import transformers

    cls, config = mp.TEXT_ENCODERS["umt5_xxl"]
    with torch.device("meta"):
        umt5 = getattr(transformers, cls)(transformers.UMT5Config(**config))
    assert round(sum(p.numel() for p in umt5.parameters()) / 1e7) == 568  # UMT5-XXL's encoder: 5.68 B


def test_self_check_runs_and_its_ratio_is_finite(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "memory_plan.py"), "--self_check_only", "--tiny",
                           "--threads", "1", "--out", str(tmp_path)], env=script_env(HF_HOME=str(tmp_path / "hf")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "memory_plan.json").read_text())
    sc = result["self_check"]
    assert sc["measured_peak_bytes"] > 0 and math.isfinite(sc["measured_over_predicted"])
    assert sc["measured_over_predicted"] > 0
    assert sc["parameters_meta_vs_run"][0] == sc["parameters_meta_vs_run"][1]  # meta count = the loop's teacher
    assert sc["heads_parameters_meta_vs_run"][0] == sc["heads_parameters_meta_vs_run"][1]
    assert sc["feature_shapes_meta_vs_run"][0] == sc["feature_shapes_meta_vs_run"][1]
    assert "measured / predicted" in (tmp_path / "memory_plan.md").read_text()


def test_gpu_check_stops_clearly_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    gpu_check = _load("gpu_check")
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([])
    assert stop.value.code == 2 and "--device cpu --tiny" in capsys.readouterr().err


def test_gpu_check_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gpu_check = _load("gpu_check")
    summary = gpu_check.main(["--device", "cpu", "--tiny", "--cases", "sdxl_b1", "sd3m_lora", "sd3m_lora_frozen_gc",
                              "--warmup", "0",
                              "--repeats", "1", "--plan", str(tmp_path / "none.json"), "--out", str(tmp_path)])
    assert [c["case"] for c in summary["cases"]] == ["sdxl_b1", "sd3m_lora", "sd3m_lora_frozen_gc"]
    assert [c["frozen_checkpointing"] for c in summary["cases"]] == [False, False, True]
    for case in summary["cases"]:
        assert case["seconds_per_iteration"] > 0 and math.isfinite(case["peak_over_plan"])
        assert all(math.isfinite(v) for v in case["losses"].values())
        assert case["plan"]["total"] > 0
    assert json.loads((tmp_path / "memory_plan_gpu_check.json").read_text())["tiny"] is True
