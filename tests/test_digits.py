"""The embedded default's data (real sklearn digits) and the committed digit classifier."""

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_DIR = os.path.join(ROOT, "distill_scripts", "digits")
sys.path.insert(0, DIGITS_DIR)

import digit_classifier  # noqa: E402
import digits_data  # noqa: E402


def test_split_shapes_range_and_stratification():
    x_train, _ = digits_data.load_digits_split("train")
    x_held, y_held = digits_data.load_digits_split("held_out")
    assert x_train.shape == (1437, 3, 16, 16) and x_held.shape == (360, 3, 16, 16)
    assert x_train.dtype == torch.float32
    assert x_train.min() == -1.0 and x_train.max() == 1.0
    assert torch.equal(x_train[:, 0], x_train[:, 2])  # grey replicated to 3 channels
    counts = torch.bincount(y_held, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified 20%
    labels = digits_data.load_digits_split("all")[1].numpy()
    train_idx, held_idx = digits_data.split_indices(labels)
    assert not set(train_idx) & set(held_idx) and len(train_idx) + len(held_idx) == 1797
    # fixed split: the same call gives the same indices
    assert np.array_equal(train_idx, digits_data.split_indices(labels)[0])
    x32, _ = digits_data.load_digits_split("held_out", resolution=32)
    assert x32.shape == (360, 3, 32, 32)


def test_captions():
    assert digits_data.digit_prompt(7) == "a handwritten digit seven"
    prompts = digits_data.evaluation_prompts()
    assert len(prompts) == 11 and prompts[-1] == "a handwritten digit" and prompts[0].endswith("zero")
    labels = np.repeat(np.arange(10), 100)
    captions = digits_data.make_captions(labels, class_free_fraction=0.2, seed=0)
    class_free = [c == digits_data.CLASS_FREE_PROMPT for c in captions]
    assert 0.15 < np.mean(class_free) < 0.25
    for c, k in zip(captions, labels):
        assert c in (digits_data.CLASS_FREE_PROMPT, digits_data.digit_prompt(k))
    assert captions == digits_data.make_captions(labels, class_free_fraction=0.2, seed=0)
    with pytest.raises(ValueError):
        digits_data.make_captions(labels, class_free_fraction=1.5)


def test_imagefolder_writer_loads_with_datasets(tmp_path):
    from datasets import load_dataset

    out = digits_data.write_imagefolder(str(tmp_path / "digits"), split="held_out", resolution=16)
    with open(os.path.join(out, "prompts.txt")) as f:
        assert f.read().splitlines() == digits_data.evaluation_prompts()
    ds = load_dataset("imagefolder", data_dir=out, split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 360 and {"image", "text", "label"} <= set(ds.column_names)
    assert ds[0]["image"].size == (16, 16)
    rows = [json.loads(line) for line in open(os.path.join(out, "metadata.jsonl"))]
    for row in rows:
        assert row["text"] in (digits_data.CLASS_FREE_PROMPT, digits_data.digit_prompt(row["label"]))


def test_committed_classifier_accuracy_and_features():
    model = digit_classifier.load_classifier()
    x_held, y_held = digits_data.load_digits_split("held_out")
    with torch.no_grad():
        acc = (model(x_held).argmax(1) == y_held).float().mean().item()
        feats = model.features(x_held[:8])
        feats32 = model.features(digits_data.load_digits_split("held_out", resolution=32)[0][:8])
    assert acc >= 0.97, acc
    assert feats.shape == (8, model.config["feature_dim"])
    assert torch.allclose(feats, feats32, atol=0.5 * feats.abs().max().item())  # resolution-agnostic input
    with torch.no_grad():
        conf_real = model(x_held[:32]).softmax(1).max(1).values.mean()
    assert conf_real > 0.8


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["sd3"])
def test_teacher_trainer_smoke(architecture, tmp_path):
    """A few steps of the teacher trainer: a stock pipeline folder with a fitted VAE scaling and its check.
    (The SDXL path is exercised in full by the committed teacher, which test_evaluate.py runs.)"""
    import subprocess

    out = tmp_path / f"digits-{architecture}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, os.path.join(DIGITS_DIR, "train_digits_teacher.py"), "--architecture",
                           architecture, "--output_dir", str(out), "--vae_train_steps", "3", "--max_train_steps", "3",
                           "--validation_steps", "2", "--num_validation_images", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "digits_teacher_info.json").read_text())
    assert info["pipeline_class"] == "StableDiffusion3Pipeline" and 0 <= info["prompt_accuracy"] <= 1
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 1.0 and vae["shift_factor"] != 0.0  # fitted to the latents
    assert not (tmp_path / f"digits-{architecture}.tmp").exists()


@pytest.mark.slow
def test_video_teacher_trainer_and_init_from(tmp_path):
    """The CogVideoX teacher trainer on moving digits (a few steps, 5 frames, one clip per digit), then a second run
    continuing it with ``--init_from``: the VAE and its normalisation are kept, the denoiser moves on from the first
    run's weights, and the check reports direction accuracy."""
    import subprocess

    from safetensors.torch import load_file

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    common = ["--architecture", "cogvideox", "--num_frames", "5", "--clips_per_digit", "1", "--max_train_steps", "2",
              "--train_batch_size", "4", "--validation_steps", "2", "--num_validation_images", "1"]
    first, second = tmp_path / "first", tmp_path / "second"
    for out, extra in ((first, ["--vae_train_steps", "2", "--vae_batch_size", "4"]),
                       (second, ["--init_from", str(first), "--vae_train_steps", "0"])):
        proc = subprocess.run([sys.executable, os.path.join(DIGITS_DIR, "train_digits_teacher.py"), *common, *extra,
                               "--output_dir", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((second / "digits_teacher_info.json").read_text())
    assert info["pipeline_class"] == "CogVideoXPipeline" and 0 <= info["direction_accuracy"] <= 1
    assert info["num_frames"] == 5 and info["args"]["init_from"] == str(first)
    assert json.loads((second / "vae" / "config.json").read_text())["scaling_factor"] == \
        json.loads((first / "vae" / "config.json").read_text())["scaling_factor"] != 1.0
    assert load_file(str(second / "vae" / "diffusion_pytorch_model.safetensors"))["encoder.conv_in.conv.weight"].equal(
        load_file(str(first / "vae" / "diffusion_pytorch_model.safetensors"))["encoder.conv_in.conv.weight"])
    w1 = load_file(str(first / "transformer" / "diffusion_pytorch_model.safetensors"))
    w2 = load_file(str(second / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not w1[k].equal(w2[k]) for k in w1)


@pytest.mark.slow
def test_video_teacher_word_vocabulary_trained_text_encoder_and_vae_from(tmp_path):
    """``--text_vocabulary words --train_text_encoder --vae_from``: the saved tokenizer gives each prompt word one
    piece (character pieces keep their ids), the T5 is trained with the denoiser (its weights leave their seeded
    initialisation) and reloads with stock diffusers, and the VAE comes unchanged from the other folder."""
    import subprocess

    import train_digits_teacher
    from diffusers import CogVideoXPipeline
    from safetensors.torch import load_file

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    common = ["--architecture", "cogvideox", "--num_frames", "5", "--clips_per_digit", "1", "--max_train_steps", "3",
              "--train_batch_size", "4", "--validation_steps", "2", "--num_validation_images", "1",
              "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--no-use_ema"]
    first, second = tmp_path / "first", tmp_path / "second"
    for out, extra in ((first, ["--vae_train_steps", "2", "--vae_batch_size", "4"]),
                       (second, ["--vae_from", str(first), "--vae_train_steps", "0", "--text_vocabulary", "words",
                                 "--train_text_encoder"])):
        proc = subprocess.run([sys.executable, os.path.join(DIGITS_DIR, "train_digits_teacher.py"), *common, *extra,
                               "--output_dir", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((second / "vae" / "config.json").read_text())["scaling_factor"] == \
        json.loads((first / "vae" / "config.json").read_text())["scaling_factor"] != 1.0
    assert load_file(str(second / "vae" / "diffusion_pytorch_model.safetensors"))["encoder.conv_in.conv.weight"].equal(
        load_file(str(first / "vae" / "diffusion_pytorch_model.safetensors"))["encoder.conv_in.conv.weight"])

    pipe = CogVideoXPipeline.from_pretrained(second)
    prompt = "a handwritten digit seven moving left"
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(prompt).input_ids) == \
        ["\u2581a", "\u2581handwritten", "\u2581digit", "\u2581seven", "\u2581moving", "\u2581left", "</s>"]
    chars = CogVideoXPipeline.from_pretrained(first).tokenizer
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("sevens").input_ids) == ["\u2581seven", "s", "</s>"]
    assert pipe.tokenizer.convert_tokens_to_ids(["s", "\u2581s"]) == chars.convert_tokens_to_ids(["s", "\u2581s"])
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) > chars.vocab_size
    args = train_digits_teacher.parse_args(common + ["--text_vocabulary", "words"])
    fresh = train_digits_teacher.build_pipeline(args).text_encoder.state_dict()
    trained = pipe.text_encoder.state_dict()
    assert fresh.keys() == trained.keys() and any(not fresh[k].equal(trained[k]) for k in fresh)
    with pytest.raises(ValueError, match="cogvideox"):
        train_digits_teacher.parse_args(["--architecture", "sd3", "--train_text_encoder"])
