"""The sample files of a model card: one image or GIF per validation prompt under ``samples/``, and a grid (images)
or a strip of the samples side by side (GIF) that the card shows first. ``dmdx.pipelines.model_card`` writes them
before it renders the card; nothing here writes words."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

SAMPLES_DIR = "samples"


def _to_pil(x):
    """A PIL image from a PIL image, an HWC/CHW numpy array or torch tensor (uint8, or float in [0, 1])."""
    import numpy as np
    from PIL import Image

    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = (np.clip(a.astype("float64"), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def _frames(x, output_dir: str) -> list:
    """The frames of one video sample: a list of images, a 4-D array (F, H, W, C) / (F, C, H, W), or a GIF path."""
    from PIL import Image, ImageSequence

    if isinstance(x, (str, os.PathLike)):
        path = os.path.join(output_dir, os.fspath(x))
        with Image.open(path) as im:
            return [f.convert("RGB") for f in ImageSequence.Iterator(im)]
    if isinstance(x, (list, tuple)) or (hasattr(x, "ndim") and x.ndim == 4):
        return [_to_pil(f) for f in x]
    raise ValueError(f"A video sample must be a list of frames, a 4-D array or a GIF path, got {type(x).__name__}.")


def _display_size(size: tuple[int, int], min_side: int, max_side: int) -> tuple[int, int]:
    w, h = size
    if max(w, h) < min_side:  # tiny samples (the embedded digits): integer nearest-neighbour upscale
        f = math.ceil(min_side / max(w, h))
        return w * f, h * f
    if max(w, h) > max_side:
        f = max_side / max(w, h)
        return max(1, round(w * f)), max(1, round(h * f))
    return w, h


def _resize(im, size):
    from PIL import Image

    if im.size == size:
        return im
    up = size[0] >= im.size[0]
    return im.resize(size, Image.NEAREST if up else Image.LANCZOS)


def image_grid(images: Sequence, columns: int | None = None, min_side: int = 256, max_side: int = 512, gap: int = 2):
    """One image of ``images`` in rows of ``columns`` (default: up to 4), each tile shown at a readable size."""
    from PIL import Image

    images = [_to_pil(i) for i in images]
    columns = columns or min(len(images), 4)
    rows = math.ceil(len(images) / columns)
    w, h = _display_size(images[0].size, min_side, max_side)
    grid = Image.new("RGB", (columns * w + (columns - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, im in enumerate(images):
        grid.paste(_resize(im, (w, h)), ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    return grid


def _save_gif(frames: Sequence, path: str, fps: float):
    frames = list(frames)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0)


def write_samples(output_dir: str, samples: Sequence, video: bool, fps: float) -> tuple[list[str], str]:
    """Each sample as its own file under ``samples/`` (``i.png``; video: ``i.gif``) and the grid
    (``grid.png``; video: ``grid.gif``, the samples side by side). Returns (per-sample paths, grid path), relative
    to ``output_dir``. A path given as a sample that already lies in ``output_dir`` is used where it is."""
    import shutil

    folder = os.path.join(output_dir, SAMPLES_DIR)
    os.makedirs(folder, exist_ok=True)
    out_real = os.path.realpath(output_dir)
    keep = set()
    for s in samples:
        if isinstance(s, (str, os.PathLike)):
            keep.add(os.path.realpath(os.path.join(output_dir, os.fspath(s))))
    for name in os.listdir(folder):  # stale files of an earlier card (fewer prompts now) would be uploaded
        path = os.path.join(folder, name)
        if re.fullmatch(r"(\d+|grid)\.(png|gif)", name) and os.path.realpath(path) not in keep:
            os.remove(path)

    ext = "gif" if video else "png"
    files, loaded = [], []
    for i, sample in enumerate(samples):
        if isinstance(sample, (str, os.PathLike)):
            src = os.path.realpath(os.path.join(output_dir, os.fspath(sample)))
            if not os.path.isfile(src):
                raise FileNotFoundError(f"Sample file {os.fspath(sample)!r} does not exist.")
            if src.startswith(out_real + os.sep):
                rel = os.path.relpath(src, out_real).replace(os.sep, "/")
            else:
                rel = f"{SAMPLES_DIR}/{i}{os.path.splitext(src)[1].lower() or '.' + ext}"
                shutil.copyfile(src, os.path.join(output_dir, rel))
            files.append(rel)
            loaded.append(_frames(src, output_dir) if video else _open_rgb(src))
            continue
        rel = f"{SAMPLES_DIR}/{i}.{ext}"
        if video:
            frames = _frames(sample, output_dir)
            w, h = _display_size(frames[0].size, 1, 384)
            _save_gif([_resize(f, (w, h)) for f in frames], os.path.join(output_dir, rel), fps)
            loaded.append(frames)
        else:
            im = _to_pil(sample)
            im.save(os.path.join(output_dir, rel))
            loaded.append(im)
        files.append(rel)

    grid_rel = f"{SAMPLES_DIR}/grid.{ext}"
    if video:
        from dmdx.training.plumbing import video_strip

        strip = video_strip(loaded, lambda frames: image_grid(frames, columns=len(frames), min_side=128,
                                                              max_side=256))
        _save_gif(strip, os.path.join(output_dir, grid_rel), fps)
    else:
        image_grid(loaded).save(os.path.join(output_dir, grid_rel))
    return files, grid_rel



def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
