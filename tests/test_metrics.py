"""dmdx.pipelines.metrics: each metric on known inputs, and through tiny random-weight DINOv2 / CLIP / PickScore-shaped
models built from configs, saved with ``save_pretrained`` and loaded back by path (the code a Hub id goes through),
moved by a known perturbation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


# ---- tiny metric models (also used by test_evaluate_general.py) ----------------------------------------------------
def save_tiny_dinov2(path, image_size: int = 32) -> str:
    """A random-weight ``Dinov2Model`` (2 layers, 32-d) and its image processor, saved to ``path``."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=image_size, patch_size=8)).save_pretrained(str(path))
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      do_center_crop=True).save_pretrained(str(path))
    return str(path)


def tiny_clip(image_size: int = 32):
    """A random-weight ``CLIPModel`` (1 layer per tower, 16-d projection) and a ``CLIPProcessor`` whose tokenizer
    is made in code (byte-level, no files)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    from dmdx.pipelines.tiny_components import byte_clip_tokenizer, clip_text_config

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=8, projection_dim=16)
    model = CLIPModel(CLIPConfig(text_config=clip_text_config(32, 16).to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=16)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=byte_clip_tokenizer())
    return model, processor


def save_tiny_clip(path, image_size: int = 32) -> str:
    model, processor = tiny_clip(image_size)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return str(path)


def smooth_images(n: int, seed: int = 0, size: int = 48) -> list[Image.Image]:
    """Images with structure at several scales (upsampled random grids), so blur and noise change them visibly."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        out.append(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
    return out


def add_noise(images, sigma: float, seed: int = 1) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + rng.normal(0, sigma, (*im.size[::-1], 3)),
                                    0, 255).astype(np.uint8)) for im in images]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    return {"dinov2": save_tiny_dinov2(root / "dinov2"), "clip": save_tiny_clip(root / "clip")}


# ---- known inputs ----------------------------------------------------------------------------------------------------
def test_frechet_distance_known_values():
    from dmdx.pipelines.metrics import frechet_distance

    a = np.random.default_rng(0).normal(size=(2000, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + np.array([3.0, 0, 0, 0])) == pytest.approx(9.0, rel=1e-6)
    assert frechet_distance(a, 2.0 * a) == pytest.approx(4.0, rel=0.1)  # trace term (1 + 4 - 2 * 2) per dimension


def test_clip_score_is_torchmetrics_definition():
    from dmdx.pipelines.metrics import clip_score

    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    image = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 3.0 ** 0.5]])  # cos 1, 0, -1, 0.5
    assert clip_score(image, text).tolist() == pytest.approx([100.0, 0.0, 0.0, 50.0])  # negative cos clipped to 0


def test_subject_consistency_and_motion_known_values():
    from dmdx.pipelines.metrics import diversity, motion_magnitude, subject_consistency

    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert subject_consistency(torch.stack([a, a, a])) == pytest.approx(1.0)
    # frame 1 equals both its predecessor and the first (1), frame 2 is orthogonal to both (0)
    assert subject_consistency(torch.stack([a, a, b])) == pytest.approx(0.5)
    assert subject_consistency(torch.stack([a, -a])) == 0.0  # negative cosines count as 0, as in VBench
    frozen = [Image.new("RGB", (8, 8), (10, 20, 30))] * 4
    assert motion_magnitude(frozen) == 0.0
    assert motion_magnitude(np.array([np.zeros((2, 2)), np.ones((2, 2)), np.ones((2, 2))])) == pytest.approx(0.5)
    assert diversity([torch.zeros(3, 4), torch.tensor([[0.0, 0.0], [3.0, 4.0]])]) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        subject_consistency(torch.ones(1, 3))


# ---- through the tiny models -----------------------------------------------------------------------------------------
def test_fd_dinov2_zero_to_itself_and_grows_with_noise(models):
    from dmdx.pipelines.metrics import DINOv2Features, frechet_distance

    dino = DINOv2Features(models["dinov2"])
    images = smooth_images(24)
    feats = dino(images)
    assert feats.shape == (24, 32) and feats.dtype == torch.float64
    assert frechet_distance(feats.numpy(), dino(images).numpy()) == pytest.approx(0.0, abs=1e-6)
    distances = [frechet_distance(feats.numpy(), dino(add_noise(images, s)).numpy()) for s in (8, 32, 96)]
    assert 0 < distances[0] < distances[1] < distances[2], distances
    # the folder loads exactly as a Hub id would: the same class and processor from_pretrained resolves
    assert type(dino.model).__name__ == "Dinov2Model" and dino.name == models["dinov2"]


def test_fd_clip_features_and_diversity_collapse(models):
    from dmdx.pipelines.metrics import CLIPFeatures, diversity, frechet_distance

    clip = CLIPFeatures(models["clip"])
    images = smooth_images(20)
    feats = clip.image_features(images)
    assert feats.shape == (20, 16)
    assert frechet_distance(feats.numpy(), feats.numpy()) == pytest.approx(0.0, abs=1e-6)
    near = frechet_distance(feats.numpy(), clip.image_features(add_noise(images, 16)).numpy())
    far = frechet_distance(feats.numpy(), clip.image_features(add_noise(images, 96)).numpy())
    assert 0 < near < far
    collapsed = clip.image_features([images[0]] * 4)  # one image for every seed
    assert diversity([collapsed]) < 1e-6 < diversity([feats[:4]])


def _correlated_clip(path, images, prompts) -> str:
    """The tiny CLIP with its text projection solved (least squares) so that each prompt's embedding matches its
    image's: matched pairs then score near 100, so a score that mixed up the pairing would be caught."""
    model, processor = tiny_clip()
    with torch.no_grad():
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_emb = model.get_image_features(pixel_values=pixels)
        image_emb = image_emb if isinstance(image_emb, torch.Tensor) else image_emb.pooler_output
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        pooled = model.text_model(**tokens).pooler_output  # (N, 32) before the projection
        solution = torch.linalg.lstsq(pooled, image_emb).solution  # (32, 16)
        model.text_projection.weight.copy_(solution.T)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return str(path)


def test_clip_score_drops_when_pairs_are_shuffled(tmp_path):
    from dmdx.pipelines.metrics import CLIPFeatures, CLIPScore

    images = smooth_images(6, seed=3)
    prompts = ["a red fox", "a blue car", "two green apples", "a city at night", "a bowl of soup", "an old map"]
    score = CLIPScore(CLIPFeatures(_correlated_clip(tmp_path / "clip", images, prompts)))
    matched = score(images, prompts)
    shuffled = score(images, prompts[1:] + prompts[:1])
    assert ((0 <= matched) & (matched <= 100)).all() and ((0 <= shuffled) & (shuffled <= 100)).all()
    # random image embeddings share one large direction (cosines near 0.9 between any two), so the margin is a
    # few points; every image still scores lower against another image's prompt than against its own
    assert matched.min() > 99.9 and (shuffled < matched - 1).all(), (matched, shuffled)
    with pytest.raises(ValueError, match="6 images, 5 prompts"):
        score(images, prompts[:5])


def test_pickscore_with_a_separate_processor(models, tmp_path):
    """PickScore loads a CLIP-shaped model and, as PickScore_v1 does, a processor from another repo."""
    from transformers import CLIPModel

    from dmdx.pipelines.metrics import CLIPFeatures, PickScore

    model_only = tmp_path / "pickscore"
    CLIPModel.from_pretrained(models["clip"]).save_pretrained(str(model_only))  # no processor files
    pick = PickScore(str(model_only), processor_name_or_path=models["clip"])
    images, prompts = smooth_images(3), ["a cat", "a dog", "a tree"]
    scores = pick(images, prompts)
    clip = CLIPFeatures(models["clip"])
    cos = torch.nn.functional.cosine_similarity(clip.image_features(images), clip.text_features(prompts), dim=-1)
    assert scores.tolist() == pytest.approx((cos * float(clip.model.logit_scale.detach().exp())).tolist(), rel=1e-6)


def test_subject_consistency_drops_when_frames_turn_to_noise(models):
    from dmdx.pipelines.metrics import DINOv2Features, motion_magnitude, subject_consistency

    dino = DINOv2Features(models["dinov2"])
    base = np.asarray(smooth_images(1, size=64)[0])
    moving = [Image.fromarray(np.roll(base, 2 * t, axis=1)[8:56, 8:56]) for t in range(6)]  # a slow pan
    noise = [Image.fromarray(a) for a in np.random.default_rng(5).integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)]
    frozen = [moving[0]] * 6
    assert subject_consistency(dino(frozen)) == pytest.approx(1.0)
    steady, broken = subject_consistency(dino(moving)), subject_consistency(dino(moving[:2] + noise[2:]))
    assert broken < steady < 1.0, (broken, steady)
    assert motion_magnitude(frozen) == 0.0 < motion_magnitude(moving) < motion_magnitude(moving[:2] + noise[2:])


def test_missing_metric_model_names_it(tmp_path):
    from dmdx.pipelines.metrics import DINOv2Features

    with pytest.raises(OSError, match="no-such-model"):
        DINOv2Features(str(tmp_path / "no-such-model"))
