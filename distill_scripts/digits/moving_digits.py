"""Real moving digits for the video demo: scikit-learn's real 8x8 handwritten digits moving across a 16x16 frame.

A clip is ``num_frames`` frames of one real digit, at its native 8x8 size, moving one pixel per frame in a prompted
direction ("a handwritten digit seven moving left"); with 9 frames it crosses the frame from edge to edge. The
position across the motion (the row for left/right, the column for up/down) is drawn per clip. Values are in
[-1, 1] (background -1, ink +1), 3 channels, as ``digits_data`` images. The train/held-out split of the digits is
``digits_data``'s, so the teacher and the judge never see the held-out digits.

The judge reads a clip frame by frame with the image digit classifier: ``digit_centres`` finds the digit (centre of
ink mass) and ``crop_digits`` cuts the 8x8 window around it and upsamples it to the classifier's 16x16 input, the form
the classifier was trained on. The centres' trajectory gives the motion direction (``motion_directions``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from digits_data import DIGIT_NAMES, SPLIT_SEED, split_indices, upsample_digits

DIRECTIONS = ("left", "right", "up", "down")
# (row, column) displacement per frame
DIRECTION_STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
FRAME_SIZE = 16
DIGIT_SIZE = 8


def video_prompt(label: int, direction: str) -> str:
    """``"a handwritten digit seven moving left"``."""
    return f"a handwritten digit {DIGIT_NAMES[int(label)]} moving {direction}"


def video_prompts() -> list[tuple[str, int, str]]:
    """The 40 evaluation prompts as (prompt, label, direction), label-major."""
    return [(video_prompt(k, d), k, d) for k in range(10) for d in DIRECTIONS]


def parse_video_prompt(prompt: str) -> tuple[int, str]:
    """(label, direction) of a ``video_prompt``; ValueError for any other text."""
    words = prompt.strip().split()
    if len(words) != 6 or " ".join(words[:3]) != "a handwritten digit" or words[4] != "moving" \
            or words[3] not in DIGIT_NAMES or words[5] not in DIRECTIONS:
        raise ValueError(f"Not a moving-digits prompt: {prompt!r} (expected e.g. {video_prompt(7, 'left')!r}).")
    return DIGIT_NAMES.index(words[3]), words[5]


def make_clips(digits_8x8: np.ndarray, directions: list[str], offsets, num_frames: int = 9,
               frame_size: int = FRAME_SIZE) -> torch.Tensor:
    """(N, 8, 8) digits (values 0..16) -> (N, num_frames, 3, S, S) clips in [-1, 1]. Clip i moves
    ``directions[i]`` one pixel per frame; ``offsets[i]`` is its position across the motion (0..S-8)."""
    travel = frame_size - DIGIT_SIZE
    if num_frames - 1 > travel:
        raise ValueError(f"{num_frames} frames at one pixel per frame leave a {frame_size}px frame; "
                         f"at most {travel + 1} frames.")
    digits = upsample_digits(digits_8x8, DIGIT_SIZE)[:, :1]  # (N, 1, 8, 8) in [-1, 1]
    clips = torch.full((len(digits), num_frames, 1, frame_size, frame_size), -1.0)
    start_along = (travel - (num_frames - 1)) // 2  # centre the path when it is shorter than the frame
    for i, (digit, direction, offset) in enumerate(zip(digits, directions, offsets)):
        d_row, d_col = DIRECTION_STEPS[direction]
        for f in range(num_frames):
            along = start_along + f if (d_row + d_col) > 0 else travel - start_along - f
            row, col = (along, int(offset)) if d_row else (int(offset), along)
            clips[i, f, :, row:row + DIGIT_SIZE, col:col + DIGIT_SIZE] = digit
    return clips.repeat(1, 1, 3, 1, 1).contiguous()


def load_moving_digits(split: str = "train", num_frames: int = 9, clips_per_digit: int = 4, seed: int = 0,
                       offsets: str = "random"):
    """Clips of one split of the real digits: each digit in ``clips_per_digit`` clips, the directions cycling through
    ``DIRECTIONS`` (so every digit moves every way when ``clips_per_digit`` is 4), the position across the motion
    drawn with ``seed`` (``offsets="random"``) or the frame's centre line for every clip (``"centre"``).
    Returns ``(clips (N, F, 3, 16, 16), labels (N,), directions (list of N), prompts (list of N))``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train_idx, held_idx = split_indices(labels, seed=SPLIT_SEED)
    idx = {"train": train_idx, "held_out": held_idx}.get(split)
    if idx is None:
        raise ValueError(f"Unknown split {split!r}; expected 'train' or 'held_out'.")
    idx = np.repeat(idx, clips_per_digit)
    rng = np.random.default_rng(seed)
    directions = [DIRECTIONS[(i + j) % len(DIRECTIONS)] for i in range(len(idx) // clips_per_digit)
                  for j in range(clips_per_digit)]
    if offsets not in ("random", "centre"):
        raise ValueError(f"Unknown offsets {offsets!r}; expected 'random' or 'centre'.")
    across = (np.full(len(idx), (FRAME_SIZE - DIGIT_SIZE) // 2) if offsets == "centre"
              else rng.integers(0, FRAME_SIZE - DIGIT_SIZE + 1, len(idx)))
    clips = make_clips(digits.images[idx], directions, across, num_frames)
    prompts = [video_prompt(k, d) for k, d in zip(labels[idx], directions)]
    return clips, torch.as_tensor(labels[idx]), directions, prompts


def digit_centres(frames: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) frames in [-1, 1] -> (..., 2) centre of ink mass (row, column) in pixels; the frame centre
    when a frame holds no ink."""
    ink = ((frames.float().mean(-3) + 1) / 2).clamp(0, 1)  # (..., H, W)
    h, w = ink.shape[-2:]
    mass = ink.sum((-2, -1))
    rows = torch.arange(h, dtype=ink.dtype)
    cols = torch.arange(w, dtype=ink.dtype)
    centre = torch.stack([(ink.sum(-1) * rows).sum(-1), (ink.sum(-2) * cols).sum(-1)], -1)
    empty = mass < 1e-6
    centre = centre / mass.clamp_min(1e-6).unsqueeze(-1)
    centre[empty] = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=ink.dtype)
    return centre


def crop_digits(frames: torch.Tensor, centres: torch.Tensor | None = None, resolution: int = 16) -> torch.Tensor:
    """(N, C, H, W) frames -> (N, 3, resolution, resolution): the 8x8 window centred on each digit (padded with
    background at the borders), upsampled as ``digits_data`` upsamples the real digits for the classifier."""
    if centres is None:
        centres = digit_centres(frames)
    half = (DIGIT_SIZE - 1) / 2
    pad = DIGIT_SIZE
    padded = F.pad(frames.float(), (pad, pad, pad, pad), value=-1.0)
    tops = (centres[:, 0] - half).round().long() + pad
    lefts = (centres[:, 1] - half).round().long() + pad
    crops = torch.stack([padded[i, :, t:t + DIGIT_SIZE, s:s + DIGIT_SIZE] for i, (t, s) in
                         enumerate(zip(tops.tolist(), lefts.tolist()))])
    crops = F.interpolate(crops, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return crops.mean(1, keepdim=True).repeat(1, 3, 1, 1)


def motion_directions(centres: torch.Tensor) -> list[str]:
    """(N, F, 2) per-frame centres -> the direction of each clip's least-squares motion (the axis that moves most)."""
    frames = centres.shape[1]
    t = torch.arange(frames, dtype=centres.dtype) - (frames - 1) / 2
    slope = (centres * t[None, :, None]).sum(1) / (t ** 2).sum().clamp_min(1e-6)  # (N, 2) pixels per frame
    out = []
    for d_row, d_col in slope.tolist():
        if abs(d_col) >= abs(d_row):
            out.append("right" if d_col > 0 else "left")
        else:
            out.append("down" if d_row > 0 else "up")
    return out


@torch.no_grad()
def judge_clips(classifier, clips: torch.Tensor) -> dict:
    """Clips (N, F, 3, H, W) in [0, 1] read frame by frame by the digit classifier: ``feats`` (N, F, D) and ``preds``
    (N, F) of the digit cropped around its centre of ink, and each clip's motion ``directions``."""
    frames = clips.float().cpu() * 2 - 1
    n, f = frames.shape[:2]
    centres = digit_centres(frames)
    feats = classifier.features(crop_digits(frames.flatten(0, 1), centres.flatten(0, 1)).to(
        next(classifier.parameters()).device)).cpu()
    return {"feats": feats.view(n, f, -1), "preds": classifier.head(feats).argmax(1).view(n, f),
            "directions": motion_directions(centres)}


def clip_scores(judged: list[dict]) -> dict:
    """Per prompt of ``video_prompts()`` (one ``judge_clips`` dict each): the share of frames showing the prompted
    digit (``accuracy``), of clips moving the prompted way (``direction``), and per clip the share of frames agreeing
    with its most frequent class, averaged (``consistency``); ``per_class``: accuracy averaged over directions."""
    accuracy, direction, consistency = [], [], []
    for j, (_, label, moving) in zip(judged, video_prompts()):
        accuracy.append(float((j["preds"] == label).float().mean()))
        direction.append(float(np.mean([d == moving for d in j["directions"]])))
        majority = j["preds"].mode(dim=1).values
        consistency.append(float((j["preds"] == majority[:, None]).float().mean()))
    k = len(DIRECTIONS)
    return {"accuracy": accuracy, "direction": direction, "consistency": consistency,
            "per_class": [float(np.mean(accuracy[k * c:k * c + k])) for c in range(len(DIGIT_NAMES))]}
