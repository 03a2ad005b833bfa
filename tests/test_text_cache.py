"""The on-disk text-embedding cache (dmdx.training.text_cache): built once, sharded over processes, read
memory-mapped; a training run whose teacher folder holds no text encoder trains from it and exports; a cache of other
text encoders is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import TINY_PROMPTS, accelerate_cmd, script_env

FINGERPRINT = {"pipeline_class": "P", "tokenizer": "abc", "text_encoder.weights?": "w1"}


def fake_encode(prompts):
    """Deterministic conditioning of a prompt (what a text encoder returns: fp32, batch-first)."""
    calls.append(list(prompts))
    rows = [torch.Generator().manual_seed(sum(map(ord, p)) + len(p)) for p in prompts]
    return {"prompt_embeds": torch.stack([torch.randn(3, 4, generator=g) for g in rows]),
            "pooled_prompt_embeds": torch.stack([torch.full((2,), float(len(p))) for p in prompts])}


calls: list = []


def fake_negative():
    return {"prompt_embeds": torch.zeros(1, 3, 4), "pooled_prompt_embeds": torch.ones(1, 2)}


def test_build_read_extend_and_refuse(tmp_path):
    from dmdx.training.errors import UsageError
    from dmdx.training.text_cache import TextEmbeddingCache

    folder = str(tmp_path / "cache")
    calls.clear()
    cache = TextEmbeddingCache(folder, FINGERPRINT)
    assert not cache.exists and cache.missing(["a", "b", "a"]) == ["a", "b"]
    prompts = ["a red circle", "a blue square", "a green cat", "a red circle", "two dots"]
    assert cache.build(prompts, fake_encode, fake_negative, shard_size=2) == 4  # duplicates encoded once
    assert sorted(os.listdir(folder)) == ["index.json", "negative.safetensors", "shard-00000.safetensors",
                                          "shard-00001.safetensors"]
    assert cache.covers(prompts) and cache.num_prompts == 4

    # read back: the bf16 rounding of what the encoder returned, as fp32, in the order asked
    asked = ["two dots", "a red circle", "two dots"]
    got = cache.conditioning(asked)
    want = fake_encode(asked)
    for key in want:
        assert got[key].dtype == torch.float32 and got[key].shape == want[key].shape
        assert torch.equal(got[key], want[key].to(torch.bfloat16).float())
    assert torch.equal(cache.negative()["pooled_prompt_embeds"], torch.ones(1, 2))

    # reopening reads the index; prompts it lacks are encoded into new shards, the old ones are not touched
    before = os.path.getmtime(os.path.join(folder, "shard-00000.safetensors"))
    calls.clear()
    reopened = TextEmbeddingCache(folder, FINGERPRINT)
    assert reopened.missing(prompts + ["a cow"]) == ["a cow"]
    reopened.build(prompts + ["a cow"], fake_encode, fake_negative, shard_size=2)
    assert calls == [["a cow"]] and reopened.num_prompts == 5
    assert os.path.getmtime(os.path.join(folder, "shard-00000.safetensors")) == before
    assert torch.equal(reopened.conditioning(["a cow"])["pooled_prompt_embeds"], torch.full((1, 2), 5.0))

    # the optional weights key is not compared when one side lacks it (encoders deleted); other differences refuse
    TextEmbeddingCache(folder, {k: v for k, v in FINGERPRINT.items() if not k.endswith("?")})
    with pytest.raises(UsageError, match="other text encoders or options.*tokenizer"):
        TextEmbeddingCache(folder, {**FINGERPRINT, "tokenizer": "other"})
    with pytest.raises(UsageError, match="text_encoder.weights"):
        TextEmbeddingCache(folder, {**FINGERPRINT, "text_encoder.weights?": "w2"})
    with pytest.raises(UsageError, match="does not hold 1 of the prompts"):
        reopened.conditioning(["never encoded"])


def test_an_interrupted_build_is_not_read_and_resumes(tmp_path):
    """Shards written before the index are invisible; the next build keeps those that match and writes the rest."""
    from dmdx.training.text_cache import TextEmbeddingCache

    folder = str(tmp_path / "cache")
    prompts = [f"prompt {i}" for i in range(6)]
    calls.clear()

    def dying_barrier():  # rank 0 of 1: the second barrier is the one before the index is written
        dying_barrier.n += 1
        if dying_barrier.n == 2:
            raise KeyboardInterrupt
    dying_barrier.n = 0
    with pytest.raises(KeyboardInterrupt):
        TextEmbeddingCache(folder, FINGERPRINT).build(prompts, fake_encode, fake_negative, shard_size=2,
                                                      barrier=dying_barrier)
    assert "index.json" not in os.listdir(folder) and len(calls) == 3
    cache = TextEmbeddingCache(folder, FINGERPRINT)
    assert not cache.exists and cache.missing(prompts) == prompts
    # a shard from another fingerprint, left at a name the build will use, is rewritten, not trusted
    other = TextEmbeddingCache(str(tmp_path / "other"), {**FINGERPRINT, "tokenizer": "x"})
    other.build(prompts[4:], fake_encode, fake_negative, shard_size=2)
    shutil.copy(os.path.join(other.folder, "shard-00000.safetensors"), os.path.join(folder, "shard-00002.safetensors"))
    calls.clear()
    cache.build(prompts, fake_encode, fake_negative, shard_size=2)
    assert calls == [prompts[4:]]  # shards 0 and 1 were kept
    assert cache.covers(prompts) and cache.num_prompts == 6


def _train(cwd, teacher, output_dir, *extra, num_processes=1, check=True):
    cmd = accelerate_cmd("train_adm_sdxl.py", "--pretrained_model_name_or_path", teacher, "--prompts_file",
                         "prompts.txt", "--output_dir", output_dir, "--resolution", "32", "--max_train_steps", "1",
                         "--checkpointing_steps", "1", "--discriminator_head_channels", "16", "--report_to", "none",
                         "--text_embeddings_cache", "cache", "--validation_prompts", "a cat", "a dog",
                         "--validation_steps", "1", *extra, num_processes=num_processes)
    proc = subprocess.run(cmd, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=400)
    if check:
        assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_training_reads_the_cache_without_text_encoders(tiny_sdxl, tmp_path, monkeypatch):
    """Done when: two processes build the cache (each its own shards), then a run whose teacher folder holds no text
    encoder trains from it and exports a stock pipeline that loads with the teacher's encoders; a cache of other
    text encoders stops the run before any weights load."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    (tmp_path / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    shutil.copytree(tiny_sdxl, tmp_path / "teacher")
    # 6 prompts + 2 validation prompts in shards of 2: 4 shards, 2 per process
    proc = _train(tmp_path, "teacher", "run-a", "--text_embeddings_shard_size", "2", num_processes=2)
    log = proc.stdout + proc.stderr
    assert "process 0 encoded 4 prompts" in log and "process 1 encoded 4 prompts" in log, log[-3000:]
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert [s["num_prompts"] for s in index["shards"]] == [2, 2, 2, 2] and index["dtype"] == "bfloat16"

    shutil.copytree(tmp_path / "teacher", tmp_path / "no-encoders")
    for name in ("text_encoder", "text_encoder_2"):
        shutil.rmtree(tmp_path / "no-encoders" / name)
    proc = _train(tmp_path, "no-encoders", "run-b")
    assert "0 of this run's to encode" in proc.stdout + proc.stderr
    student = tmp_path / "run-b"
    assert json.loads((student / "model_index.json").read_text())["text_encoder"] == [None, None]
    card = (student / "README.md").read_text()
    assert "ships without text_encoder, text_encoder_2" in card and "CLIPTextModel.from_pretrained(" in card
    assert (student / "validation" / "step-000001.png").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(
        student, text_encoder=CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2"))
    image = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)

    # in-process (cheaper): a prompt the cache lacks, with no encoder to encode it, is a clear error before any
    # denoiser loads; other tokenizers than the cache was built with are refused before anything loads
    from dmdx.training.errors import UsageError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    script = _load_script("train_adm_sdxl")
    argv = ["--pretrained_model_name_or_path", "no-encoders", "--prompts_file", "prompts.txt", "--resolution", "32",
            "--text_embeddings_cache", "cache", "--report_to", "none"]
    monkeypatch.setattr("dmdx.training.loop.build_models", lambda *a, **k: pytest.fail("a denoiser would load"))
    with pytest.raises(UsageError, match="lacks 1 prompts \\(e.g. 'a cow'\\), and the text encoders"):
        script.main(script.parse_args([*argv, "--output_dir", "run-c", "--validation_prompts", "a cow"]))
    tokenizer_config = tmp_path / "no-encoders" / "tokenizer" / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "model_max_length": 76}))
    with pytest.raises(UsageError, match="was built for other text encoders or options \\(tokenizer:"):
        script.main(script.parse_args([*argv, "--output_dir", "run-d"]))
    assert not (tmp_path / "run-d").exists()


def _load_script(name: str):
    import importlib.util

    from conftest import SCRIPTS

    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ode_pairs_from_the_cache_use_each_prompt_once_per_pass(tiny_sdxl, tmp_path, monkeypatch):
    """collect_ode_pairs with the cache loads the teacher without text encoders (here: deleted) and gives the pairs
    the stock pipeline gives from the prompts (up to the cache's bf16 rounding); 12 pairs of 6 prompts use each
    prompt twice; a resume deals the unfinished shards out evenly."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    (tmp_path / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    collect = _load_script("collect_ode_pairs")
    common = ["--prompts_file", "prompts.txt", "--resolution", "32", "--num_pairs", "12", "--shard_size", "4",
              "--batch_size", "4", "--num_inference_steps", "2", "--guidance_scale", "3.0"]
    collect.main(collect.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, *common, "--output_dir", "plain"]))
    shutil.copytree(tiny_sdxl, tmp_path / "teacher")
    collect.main(collect.parse_args(["--pretrained_model_name_or_path", "teacher", *common, "--output_dir", "warm",
                                     "--text_embeddings_cache", "cache"]))  # builds the cache
    for name in ("text_encoder", "text_encoder_2"):
        shutil.rmtree(tmp_path / "teacher" / name)
    collect.main(collect.parse_args(["--pretrained_model_name_or_path", "teacher", *common, "--output_dir", "cached",
                                     "--text_embeddings_cache", "cache"]))
    used = []
    for i in range(3):
        plain, cached = (load_file(tmp_path / d / f"shard-0000{i}.safetensors") for d in ("plain", "cached"))
        assert torch.equal(plain["noise"], cached["noise"])
        scale = plain["latents"].float().abs().max()
        assert (plain["latents"].float() - cached["latents"].float()).abs().max() < 0.02 * scale
        with safe_open(tmp_path / "cached" / f"shard-0000{i}.safetensors", "pt") as f:
            used += json.loads(f.metadata()["prompts"])
    assert sorted(used) == sorted(TINY_PROMPTS * 2)
    assert sorted(used[:6]) == sorted(TINY_PROMPTS)  # the first pass is a permutation

    # pair j's prompt does not depend on how the pairs are split into shards
    split = collect.prompt_indices(6, 0, 0, 5) + collect.prompt_indices(6, 0, 5, 7)
    assert collect.prompt_indices(6, 0, 0, 12) == split
    # a resume where rank 0 had finished its shards (0, 2, 4) and rank 1 none: the rest is split evenly again
    assert [collect.deal([1, 3, 5], r, 2) for r in (0, 1)] == [[1, 5], [3]]
