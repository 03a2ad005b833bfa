"""Real handwritten digits for the embedded default: scikit-learn's 1,797 8x8 digits, captioned from their labels.

Everything here is deterministic and needs no download. Images are upsampled (bilinear) to ``resolution`` pixels,
replicated to 3 channels and scaled to [-1, 1] (background -1, ink +1), the range diffusers' VAEs expect.
The train/held-out split is fixed (80/20, stratified by class, seed 0): the teacher and the classifier only ever
see the train split; the evaluation compares against the held-out split.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_FREE_PROMPT = "a handwritten digit"
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2


def digit_prompt(label: int) -> str:
    """The caption of class ``label``: ``"a handwritten digit seven"``."""
    return f"{CLASS_FREE_PROMPT} {DIGIT_NAMES[int(label)]}"


def class_prompts() -> list[str]:
    """The ten class prompts, in label order."""
    return [digit_prompt(k) for k in range(10)]


def evaluation_prompts() -> list[str]:
    """The ten class prompts followed by the class-free prompt (the columns of the evaluation grid)."""
    return class_prompts() + [CLASS_FREE_PROMPT]


def upsample_digits(images_8x8: np.ndarray, resolution: int = 16) -> torch.Tensor:
    """(N, 8, 8) arrays with values 0..16 -> (N, 3, R, R) float32 tensor in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images_8x8), dtype=torch.float32).unsqueeze(1) / 16.0
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1).contiguous()


def split_indices(labels: np.ndarray, held_out_fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED):
    """Fixed stratified split: ``(train_idx, held_out_idx)`` as sorted int arrays."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, held_idx = train_test_split(idx, test_size=held_out_fraction, random_state=seed, stratify=labels)
    return np.sort(train_idx), np.sort(held_idx)


def load_digits_split(split: str = "train", resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of one split (``"train"``, ``"held_out"`` or ``"all"``)."""
    from sklearn.datasets import load_digits

    if split not in ("train", "held_out", "all"):
        raise ValueError(f"Unknown split {split!r}; expected 'train', 'held_out' or 'all'.")
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    if split == "all":
        idx = np.arange(len(labels))
    else:
        train_idx, held_idx = split_indices(labels)
        idx = train_idx if split == "train" else held_idx
    return upsample_digits(digits.images[idx], resolution), torch.as_tensor(labels[idx])


def make_captions(labels, class_free_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """One caption per image: the class prompt, or (for a fixed random ``class_free_fraction`` share) the
    class-free prompt ``"a handwritten digit"``, so that the teacher learns an unconditional-over-classes mode."""
    if not 0.0 <= class_free_fraction <= 1.0:
        raise ValueError(f"class_free_fraction must lie in [0, 1], got {class_free_fraction}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    class_free = rng.random(len(labels)) < class_free_fraction
    return [CLASS_FREE_PROMPT if cf else digit_prompt(k) for k, cf in zip(labels, class_free)]


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(N, 3, R, R) in [-1, 1] -> (N, R, R, 3) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def write_imagefolder(output_dir: str, split: str = "train", resolution: int = 16, class_free_fraction: float = 0.2,
                      seed: int = 0) -> str:
    """Write a ``datasets`` imagefolder (PNG files + ``metadata.jsonl`` with ``file_name``/``text``/``label``)
    and ``prompts.txt`` (the evaluation prompts, one per line). Returns ``output_dir``. Load it with
    ``datasets.load_dataset("imagefolder", data_dir=output_dir)``."""
    from PIL import Image

    images, labels = load_digits_split(split, resolution)
    captions = make_captions(labels.numpy(), class_free_fraction, seed)
    os.makedirs(output_dir, exist_ok=True)
    pixels = to_uint8_images(images)
    with open(os.path.join(output_dir, "metadata.jsonl"), "w") as f:
        for i, (arr, label, text) in enumerate(zip(pixels, labels.tolist(), captions)):
            name = f"{i:05d}.png"
            Image.fromarray(arr).save(os.path.join(output_dir, name))
            f.write(json.dumps({"file_name": name, "text": text, "label": int(label)}) + "\n")
    with open(os.path.join(output_dir, "prompts.txt"), "w") as f:
        f.write("\n".join(evaluation_prompts()) + "\n")
    return output_dir


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the digits as an imagefolder (PNG + metadata.jsonl).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--split", default="train", choices=["train", "held_out", "all"])
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--class_free_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = write_imagefolder(args.output_dir, args.split, args.resolution, args.class_free_fraction, args.seed)
    print(f"Wrote {out}")
