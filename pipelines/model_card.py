"""Hub model cards for distilled students.

One entry point, :func:`write_model_card`, called once by the export path: it writes the student's sample files
(one image or GIF per validation prompt, a grid or a GIF strip), renders ``README.md`` from the Jinja templates in
``model_cards/`` with huggingface_hub's ``ModelCardData`` for the metadata (renders offline), and returns the text.
:func:`refresh_model_card` renders a finished student folder's card again from what the folder holds (its
``training_config.json``, scheduler, samples and card), e.g. with an ``evaluate.py`` report measured afterwards.

What the card holds: Hub metadata (``base_model`` when the teacher came from the Hub, ``pipeline_tag``,
``library_name: diffusers``, tags, the teacher's licence, ``widget`` examples), the samples, a teacher-vs-student
table (steps, NFE, guidance, seconds per image, and the metrics of an ``evaluate.py`` report when given), the exact
schedule, a usage snippet with a real prompt of the run, the training command and hyperparameters. No machine path
is ever written: a local teacher appears as "a local teacher", paths in the command become placeholders
(``<teacher>``, ``<output_dir>``, ``<name>``), and the rendered text is scrubbed once more before it is saved.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

TEMPLATES = {"image": "image_full.md", "image_lora": "image_lora.md", "video": "video_full.md",
             "video_lora": "video_lora.md"}

METHODS = {
    "dmdx": ("DMDX (ADP pre-training + ADM fine-tuning)",
             "Adversarial Distillation Pre-training on teacher ODE pairs (latent + SAM pixel hinge discriminators), "
             "then Adversarial Distribution Matching: a hinge GAN on one-step PF-ODE predictions of the teacher "
             "(with CFG) and an online fake score, discriminated by the frozen teacher with trainable heads."),
    "adm": ("ADM (Adversarial Distribution Matching)",
            "A hinge GAN on one-step PF-ODE predictions of the teacher (with CFG) and an online fake score, "
            "discriminated by the frozen teacher with trainable heads; data-free (prompts only)."),
    "adp": ("ADP (Adversarial Distillation Pre-training)",
            "Velocity-parametrised one-step generator trained on teacher ODE pairs against a latent discriminator "
            "(frozen teacher + heads) and a pixel discriminator (frozen SAM encoder + heads), hinge losses."),
    "dmd": ("DMD2 (distribution matching distillation, baseline)",
            "DMD2's normalised distribution-matching loss with an online fake score (the baseline the ADM paper "
            "compares against)."),
}
# Hub tags per method ("dmd" is DMD2's loss; DMDX's final stage is ADM).
METHOD_TAGS = {"dmdx": ["adm"], "adm": ["adm"], "adp": ["adp"], "dmd": ["dmd2"]}

SAMPLES_DIR = "samples"
DEFAULT_PROMPT = "a photo of a cat"  # only when the run knows no prompt at all
# Appended to the usage snippet's load line when it points at the local output folder; push_to_hub removes it
# when it points the snippet at the Hub repo.
LOCAL_NOTE = "  # the folder training wrote (run from its parent); after pushing, its Hub id"

# evaluate.py's report.json: columns shown (in this order) with their labels; other numeric keys follow.
REPORT_COLUMNS = {
    "num_inference_steps": "steps", "nfe": "NFE", "guidance_scale": "guidance", "seconds_per_image": "s / image",
    # distances to the teacher's own samples (what judges a distillation; empty in the reference's own row)
    "fid_to_teacher": "FID to teacher ↓", "class_hist_tv_to_teacher": "class-hist TV ↓",
    "mode_hist_tv_to_teacher": "mode-hist TV ↓",
    "digit_fid": "digit-FID ↓", "prompt_accuracy": "prompt acc. ↑", "mode_entropy": "mode entropy ↑",
    "modes_covered": "modes covered", "diversity": "diversity (rel.)",
    "training_cost.adp_seconds": "ADP s", "training_cost.distillation_seconds": "distillation s",
    # video reports (moving digits)
    "seconds_per_video": "s / video", "direction_hist_tv_to_teacher": "direction-hist TV ↓",
    "direction_accuracy": "direction acc. ↑", "temporal_consistency": "temporal consistency ↑",
    # the general mode (any prompts): distances in DINOv2 / CLIP features, CLIP score, PickScore, VBench consistency
    "fd_dinov2_to_teacher": "FD_DINOv2 to teacher ↓", "fd_clip_to_teacher": "FD_CLIP to teacher ↓",
    "fd_dinov2_real": "FD_DINOv2 to real ↓", "clip_score": "CLIP score ↑", "pickscore": "PickScore ↑",
    "subject_consistency": "subject consistency ↑", "motion_magnitude": "motion (rel.)",
    "peak_memory_gb": "peak GiB",
}
REPORT_HIDDEN = {"diversity_raw", "num_images_per_prompt", "num_class_free_images", "num_videos_per_prompt",
                 "num_frames", "num_videos", "num_images", "num_prompts", "motion_magnitude_raw", "seed"}
_SECRET = re.compile(r"(^|_)(token|password|secret|key)($|_)", re.I)


# ---- teacher: Hub id, licence -------------------------------------------------------------------------------------
def hub_base_model(path_or_id: str | os.PathLike | None) -> str | None:
    """The Hub repo id of a teacher, or None when it is a local folder (or not a valid id).

    An existing local path is local, except a snapshot in the Hugging Face cache
    (``.../models--org--name/snapshots/<rev>``), which names its repo. A string that is not a local path and reads
    as ``org/name`` (a valid repo id with a namespace) is a Hub id."""
    if not path_or_id:
        return None
    text = os.fspath(path_or_id)
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        parts = os.path.normpath(os.path.realpath(expanded)).split(os.sep)
        for i, part in enumerate(parts[:-2]):
            if part.startswith("models--") and parts[i + 1] == "snapshots":
                org_name = part[len("models--"):].split("--")
                return "/".join(org_name) if len(org_name) == 2 else None
        return None
    if text.count("/") != 1 or text.startswith(("/", ".", "~")) or "\\" in text:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def hub_offline() -> bool:
    """True when huggingface_hub must not touch the network (HF_HUB_OFFLINE, read now or at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def teacher_license(base_model: str | os.PathLike | None) -> dict[str, str] | None:
    """``{"license": ..., ["license_name": ..., "license_link": ...]}`` from the teacher's model card, or None.

    A local teacher folder's ``README.md`` is read with ``ModelCard.load`` (a DMDX student folder without a card
    stands for its own teacher, from its ``training_config.json``); a Hub id's card is read from the local
    Hub cache, else looked up only when online (offline it never waits or errors). A relative ``license_link`` is
    made absolute for a Hub teacher; for a local teacher whose folder holds the linked file it stays relative, with
    ``license_file`` naming the file to ship beside the card (else it is dropped)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    if not base_model:
        return None
    local = os.path.expanduser(os.fspath(base_model))
    if not os.path.isfile(os.path.join(local, "README.md")) and os.path.isfile(os.path.join(local, TRAINING_CONFIG)):
        # a DMDX student as the base (a LoRA trained on an ADP generator): the licence is its teacher's
        with open(os.path.join(local, TRAINING_CONFIG)) as f:
            teacher = json.load(f).get("pretrained_model_name_or_path")
        if teacher and os.path.realpath(os.path.expanduser(str(teacher))) != os.path.realpath(local):
            return teacher_license(teacher)
    hub_id = hub_base_model(base_model)
    try:
        cached = try_to_load_from_cache(hub_id, "README.md") if hub_id else None
        if os.path.isfile(os.path.join(local, "README.md")):
            data = ModelCard.load(os.path.join(local, "README.md"), ignore_metadata_errors=True).data
        elif isinstance(cached, str):
            data = ModelCard.load(cached, ignore_metadata_errors=True).data
        elif hub_id and not hub_offline():
            data = ModelCard.load(hub_id, ignore_metadata_errors=True).data
        else:
            return None
    except Exception:  # noqa: BLE001 (no card, no network, malformed metadata: the fallback licence applies)
        return None
    lic = data.get("license")
    if not lic:
        return None
    out = {"license": lic if isinstance(lic, str) else str(lic[0])}
    if data.get("license_name"):
        out["license_name"] = str(data.get("license_name"))
    link = data.get("license_link")
    if link:
        link = str(link)
        if link.startswith(("http://", "https://")):
            out["license_link"] = link
        elif hub_id:
            out["license_link"] = f"https://huggingface.co/{hub_id}/blob/main/{link.lstrip('./')}"
        elif not os.path.isabs(link) and ".." not in link.split("/") and os.path.isfile(os.path.join(local, link)):
            # a local teacher's licence text: shipped beside the student's card (write_model_card copies it)
            out["license_link"] = os.path.normpath(link).replace(os.sep, "/")
            out["license_file"] = os.path.join(local, link)
    return out



def licence_text(teacher_md: str, lora: bool, lic: Mapping[str, str], inherited: bool) -> str:
    """The card's licence paragraph: the teacher's licence when its card declared one, else a warning."""
    subject = (f"The adapter is a derivative of {teacher_md} and is" if lora
               else f"The weights are a derivative of {teacher_md} and are")
    if not inherited:
        return f"{subject} released under its licence (`{lic['license']}`); check the teacher's terms before use."
    terms = f" ([terms]({lic['license_link']}))" if lic.get("license_link") else ""
    return (f"{subject} released under the teacher's\nlicence, `{lic.get('license_name') or lic['license']}`{terms}, "
            "as its model card declares.")

# ---- the schedule -------------------------------------------------------------------------------------------------
def student_schedule(scheduler_or_dir, num_inference_steps: int) -> dict[str, Any]:
    """The exact schedule a scheduler runs for ``num_inference_steps``: ``{"scheduler_class", "timesteps",
    "sigmas" (None when the scheduler has none), "config"}``. ``scheduler_or_dir`` is a diffusers scheduler or a
    folder holding ``scheduler_config.json`` (a pipeline folder's ``scheduler/`` is found too)."""
    import copy

    if isinstance(scheduler_or_dir, (str, os.PathLike)):
        import diffusers

        folder = os.fspath(scheduler_or_dir)
        if os.path.isfile(os.path.join(folder, "scheduler", "scheduler_config.json")):
            folder = os.path.join(folder, "scheduler")
        with open(os.path.join(folder, "scheduler_config.json")) as f:
            class_name = json.load(f)["_class_name"]
        scheduler = getattr(diffusers, class_name).from_pretrained(folder)
    else:
        scheduler = copy.deepcopy(scheduler_or_dir)
    scheduler.set_timesteps(num_inference_steps)
    sigmas = getattr(scheduler, "sigmas", None)
    return {
        "scheduler_class": type(scheduler).__name__,
        "timesteps": [float(t) for t in scheduler.timesteps],
        "sigmas": None if sigmas is None else [float(s) for s in sigmas],
        "config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
    }


def _numbers(values: Sequence[float] | None) -> list | None:
    if values is None:
        return None
    return [int(v) if float(v).is_integer() else round(float(v), 4) for v in (float(x) for x in values)]


# ---- machine paths ------------------------------------------------------------------------------------------------
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


class _PathScrubber:
    """Maps machine paths to what a card may show: the teacher -> ``<teacher>``, the output folder ->
    ``<output_dir>``, files of this repository -> their path in it, any other absolute path -> ``<its name>``."""

    def __init__(self, output_dir: str | None, teacher: str | None):
        folders = [(output_dir, "<output_dir>"), (teacher and os.path.expanduser(teacher), "<teacher>")]
        self.roots = sorted(((os.path.realpath(p), name) for p, name in folders if p), key=lambda r: -len(r[0]))
        self.raw = {os.path.abspath(p): name for p, name in folders if p}

    def path(self, value: str) -> str:
        """One token that may be a path."""
        if not value or value.startswith(("http://", "https://", "<")):
            return value
        expanded = os.path.expanduser(value)
        looks_like_path = (os.path.isabs(expanded) or value.startswith(("..", "~"))
                           or (os.path.sep in value and os.path.exists(expanded)))
        real = os.path.realpath(expanded)
        for root, name in self.roots:
            if real == root or real.startswith(root + os.sep):
                return name + real[len(root):].replace(os.sep, "/") if looks_like_path or real == root else value
        if not looks_like_path:
            return value
        if real.startswith(_REPO_ROOT + os.sep):
            return os.path.relpath(real, _REPO_ROOT).replace(os.sep, "/")
        if not (os.path.isabs(expanded) or value.startswith(("..", "~"))):
            return value  # a relative path below the working directory: shows no machine layout
        return f"<{os.path.basename(real.rstrip(os.sep)) or 'path'}>"

    def text(self, text: str) -> str:
        """Whatever slipped through: every spelling of the two folders, then this repository's root."""
        spellings = {**self.raw}
        for root, name in self.roots:
            spellings[root] = name
        for spelling in sorted(spellings, key=len, reverse=True):
            if spelling and os.path.isabs(spelling) and spelling != os.sep:
                text = text.replace(spelling, spellings[spelling])
        return text.replace(_REPO_ROOT + os.sep, "")


def format_training_command(argv: Sequence[str], scrub: _PathScrubber | None = None, *,
                            output_dir: str | None = None, teacher: str | None = None) -> str:
    """``argv`` (e.g. ``sys.argv``) as a shell command with one flag per line. A ``.py`` first item gets
    ``accelerate launch`` in front; machine paths become placeholders; values of secret flags (``--hub_token``)
    become ``<token>``."""
    scrub = scrub or _PathScrubber(output_dir, teacher)
    argv = [str(a) for a in argv]
    if not argv:
        return ""
    head = ["accelerate", "launch"] if argv[0].endswith(".py") else []

    def quote(token: str) -> str:
        return token if re.fullmatch(r"<[^<>\s]+>(/[\w./-]*)?", token) else shlex.quote(token)

    tokens, secret = [], False
    for token in argv:
        if secret:
            tokens.append("<token>")
            secret = False
            continue
        if re.match(r"^--?[A-Za-z]", token):
            flag, eq, value = token.partition("=")
            if _SECRET.search(flag.lstrip("-")):
                if eq:
                    tokens.append(f"{flag}=<token>")
                else:
                    tokens.append(flag)
                    secret = True
                continue
            tokens.append(f"{flag}={quote(scrub.path(value))}" if eq else token)
        else:
            tokens.append(quote(scrub.path(token)))
    lines, current = [], [*head]
    for i, token in enumerate(tokens):
        if token.startswith("-") and re.match(r"^--?[A-Za-z]", token) and current and i > 0:
            lines.append(" ".join(current))
            current = []
        current.append(token)
    lines.append(" ".join(current))
    return " \\\n  ".join(lines)


def _format_value(value: Any, scrub: _PathScrubber) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v, scrub) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(dict(value), default=str)
    if isinstance(value, (str, os.PathLike)):
        return scrub.path(os.fspath(value))
    return str(value)


# ---- images -------------------------------------------------------------------------------------------------------
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


def _write_samples(output_dir: str, samples: Sequence, video: bool, fps: float) -> tuple[list[str], str]:
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
            loaded.append(_frames(src, output_dir) if video else _to_pil(_open_rgb(src)))
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


def indefinite_article(number: int) -> str:
    """"an" before a number said with a leading vowel sound (8, 11, 18, 80-89, 800-899, ...), else "a"."""
    digits = str(int(number))
    return "an" if digits.startswith("8") or (len(digits) in (2, 5) and digits[:2] in ("11", "18")) else "a"


def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


# ---- the dtype and variant a student loads with -------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F16": "torch.float16", "BF16": "torch.bfloat16", "F32": None}
_DTYPE_SOURCES = {"fp16": "torch.float16", "float16": "torch.float16", "torch.float16": "torch.float16",
                  "bf16": "torch.bfloat16", "bfloat16": "torch.bfloat16", "torch.bfloat16": "torch.bfloat16",
                  "fp32": None, "float32": None, "torch.float32": None, "no": None}


def dtype_source(dtype) -> str | None:
    """Python source of a ``torch_dtype`` argument (``"torch.bfloat16"``) from ``bf16`` / ``torch.bfloat16`` / a
    ``torch.dtype``; None for fp32 (diffusers' default)."""
    if dtype is None:
        return None
    key = dtype if isinstance(dtype, str) else str(dtype)
    if key not in _DTYPE_SOURCES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of fp32, bf16, fp16.")
    return _DTYPE_SOURCES[key]


def saved_weights_format(folder: str) -> tuple[str | None, str | None]:
    """``(torch_dtype source, variant)`` of the denoiser a pipeline folder holds (``unet/`` or ``transformer/``):
    the dtype from the safetensors header (None for fp32 or no weights), the variant from the file name
    (``diffusion_pytorch_model.fp16.safetensors``)."""
    import struct

    for sub in ("unet", "transformer"):
        path = os.path.join(folder, sub)
        if not os.path.isdir(path):
            continue
        names = sorted(n for n in os.listdir(path) if re.fullmatch(
            r"diffusion_pytorch_model(\.[A-Za-z0-9_]+)?(-\d+-of-\d+)?\.safetensors", n))
        if not names:
            continue
        match = re.fullmatch(r"diffusion_pytorch_model\.([A-Za-z0-9_]+)(-\d+-of-\d+)?\.safetensors", names[0])
        variant = match.group(1) if match else None
        try:
            with open(os.path.join(path, names[0]), "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        except (OSError, ValueError, KeyError, struct.error):
            dtypes = set()
        dtype = _SAFETENSORS_DTYPES.get(dtypes.pop()) if len(dtypes) == 1 else None
        return dtype, variant
    return None, None


def _load_kwargs(dtype: str | None, variant: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    out = {}
    if dtype:
        out["torch_dtype"] = dtype
    if variant:
        out["variant"] = _py(variant)
    out.update(extra or {})
    return out


# ---- card sections ------------------------------------------------------------------------------------------------
def _py(s: str) -> str:
    """A Python string literal (double quotes)."""
    return json.dumps(s, ensure_ascii=False)


def usage_snippet(repo_id: str, pipeline_class: str, num_inference_steps: int, guidance_scale: float,
                  lora: bool = False, base_model: str | None = None, prompt: str = DEFAULT_PROMPT,
                  scheduler_class: str = "LCMScheduler", video: bool = False, fps: int = 8,
                  pipeline_kwargs: Mapping[str, str] | None = None, load_note: str = "",
                  call_kwargs: Mapping[str, str] | None = None) -> str:
    """Python that loads the student with stock diffusers and generates. ``repo_id``: the student (Hub id or
    folder); ``base_model``: for LoRA, the pipeline the adapter loads into; ``pipeline_kwargs``: extra
    ``from_pretrained`` keyword arguments as Python source (e.g. ``{"text_encoder_3": "None"}``); ``call_kwargs``:
    extra keyword arguments of the generating call, as Python source (e.g. a video's ``{"num_frames": "49"}``)."""
    extra = "".join(f", {k}={v}" for k, v in (pipeline_kwargs or {}).items())
    call_extra = "".join(f", {k}={v}" for k, v in (call_kwargs or {}).items())
    call = (f"pipe({_py(prompt)}, num_inference_steps={num_inference_steps}, guidance_scale={guidance_scale}"
            f"{call_extra})")
    imports = ["import torch", f"from diffusers import {'DiffusionPipeline' if not lora else pipeline_class}"
               + (f", {scheduler_class}" if lora else "")]
    if video:
        imports.append("from diffusers.utils import export_to_gif")
        generate = [f"frames = {call}.frames[0]", f'export_to_gif(frames, "sample.gif", fps={fps})']
    else:
        generate = [f"image = {call}.images[0]", 'image.save("sample.png")']
    if not lora:
        load = [f"pipe = DiffusionPipeline.from_pretrained({_py(repo_id)}{extra}){load_note}"]
    else:
        load = [f"pipe = {pipeline_class}.from_pretrained({_py(base_model or '<path to the teacher>')}{extra})",
                f"pipe.load_lora_weights({_py(repo_id)}){load_note}",
                f"pipe.scheduler = {scheduler_class}.from_pretrained({_py(repo_id)}, subfolder=\"scheduler\")"]
    device = 'pipe.to("cuda" if torch.cuda.is_available() else "cpu")'
    return "\n".join([*imports, "", *load, device, *generate])


def _nfe(steps, guidance) -> int | None:
    if steps is None:
        return None
    return int(steps) * (2 if guidance is not None and float(guidance) > 1.0 else 1)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_evaluation_report(report: Mapping | str | os.PathLike) -> dict[str, dict]:
    """``evaluate.py``'s ``report.json`` (a path or the loaded dict): ``{pipeline name: {metric: value}}``."""
    if isinstance(report, (str, os.PathLike)):
        with open(report) as f:
            report = json.load(f)
    if "pipelines" in report and isinstance(report["pipelines"], Mapping):
        report = report["pipelines"]
    rows = {str(k): dict(v) for k, v in report.items() if isinstance(v, Mapping)}
    if not rows:
        raise ValueError("The evaluation report holds no pipeline rows ({name: {metric: value}}).")
    return rows


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def evaluation_table(report: Mapping[str, Mapping[str, Any]], this: str | None = None) -> str:
    """A Markdown table of an ``evaluate.py`` report: one row per pipeline (``this`` marked as this model), the
    known columns first (steps, NFE, guidance, s / image, digit-FID, ...), then any other numeric ones."""
    rows = {name: _flatten(r) for name, r in report.items()}
    present = [k for k in REPORT_COLUMNS if any(k in r for r in rows.values())]
    others = sorted({k for r in rows.values() for k, v in r.items() if _is_number(v)}
                    - set(present) - REPORT_HIDDEN)
    columns = present + others
    labels = [REPORT_COLUMNS.get(k, k.replace("_", " ").replace(".", ": ")) for k in columns]
    lines = ["| pipeline | " + " | ".join(labels) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows.items():
        label = f"**{_md_cell(name)}** (this model)" if name == this else _md_cell(name)
        lines.append(f"| {label} | " + " | ".join(_cell(r.get(k)) for k in columns) + " |")
    return "\n".join(lines)


def _this_row(report: Mapping[str, Mapping], output_dir: str, method: str) -> str | None:
    out = os.path.realpath(output_dir)
    for name, r in report.items():
        if isinstance(r.get("path"), str) and os.path.realpath(os.path.expanduser(r["path"])) == out:
            return name
    for name in (method, *METHOD_TAGS.get(method, []), "student"):
        if name in report:
            return name
    return None


# ---- the card -----------------------------------------------------------------------------------------------------
def _templates_dir() -> str:
    return str(resources.files("dmdx.model_cards"))


def write_model_card(
    output_dir: str,
    *,
    base_model: str,
    pipeline_class: str,
    num_inference_steps: int,
    timesteps: Sequence[float] | None = None,
    guidance_scale: float,
    method: str,
    lora: bool = False,
    sigmas: Sequence[float] | None = None,
    scheduler_class: str | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    sample_images: Sequence | None = None,
    sample_prompts: Sequence[str] | None = None,
    video: bool = False,
    fps: int = 8,
    evaluation_report: Mapping | str | os.PathLike | None = None,
    evaluation_name: str | None = None,
    teacher_num_inference_steps: int | None = None,
    teacher_guidance_scale: float | None = None,
    teacher_seconds_per_image: float | None = None,
    student_seconds_per_image: float | None = None,
    hardware: str | None = None,
    training_command: Sequence[str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    prompt: str | None = None,
    pipeline_kwargs: Mapping[str, str] | None = None,
    call_kwargs: Mapping[str, str] | None = None,
    full_pipeline: bool | None = None,
    extra_sections: Mapping[str, str] | None = None,
    sample_grid: str | None = None,
    template: str | None = None,
    training_details: Mapping[str, Any] | None = None,
    torch_dtype: str | None = None,
    variant: str | None = None,
) -> str:
    """Write the student's samples and ``output_dir/README.md``; return the card's text.

    Args:
        output_dir: the exported student folder (a stock pipeline folder, and/or LoRA weights).
        base_model: the teacher as the run was given it (``--pretrained_model_name_or_path``): a Hub id becomes
            the ``base_model`` metadata; a local folder is omitted and shown as "a local teacher".
        pipeline_class: the stock diffusers pipeline class name (``StableDiffusionXLPipeline``, ...).
        num_inference_steps: the student's step count.
        timesteps: the student's timesteps; None reads them from ``output_dir/scheduler`` (:func:`student_schedule`).
        guidance_scale: the guidance scale to sample the student with (0.0 for distilled students).
        method: ``dmdx``, ``adm``, ``adp`` or ``dmd`` (DMD2; tagged ``dmd2``).
        lora: the student is a LoRA adapter (``pytorch_lora_weights.safetensors``) on the teacher.
        sigmas: the student's sigmas (None: read from the saved scheduler when ``timesteps`` is None too).
        scheduler_class: the student's scheduler class name (None: read from ``output_dir/scheduler``).
        scheduler_config: the scheduler's config, shown in the schedule section (None: the saved one, if any).
        sample_images: the final student's samples on ``sample_prompts``, one per prompt: PIL images, arrays or
            tensors, or paths (relative to ``output_dir`` or absolute); for video, each a list of frames (or a
            (F, H, W, C) array, or a GIF path). Written to ``samples/{i}.png`` (video ``.gif``) plus
            ``samples/grid.png`` (video: ``grid.gif``, a strip), and listed as ``widget`` examples.
        sample_prompts: the prompt of each sample (required with ``sample_images``).
        video: a text-to-video student (``pipeline_tag: text-to-video``, GIF samples, ``.frames`` usage).
        fps: frame rate of the GIFs and of the usage snippet's export.
        evaluation_report: ``distill_scripts/evaluate.py``'s ``report.json`` (dict or path) to render as the
            comparison table; its row for this model is ``evaluation_name``.
        evaluation_name: this student's row in the report (default: the row whose path is ``output_dir``, else
            the row named after the method, else ``student``).
        teacher_num_inference_steps: the teacher's step count for the comparison table (no report given).
        teacher_guidance_scale: the teacher's guidance scale for the comparison table (NFE doubles above 1).
        teacher_seconds_per_image: the teacher's measured seconds per image (or per video).
        student_seconds_per_image: the student's measured seconds per image (or per video).
        hardware: where the seconds were measured (e.g. ``"1x NVIDIA H100"``).
        training_command: the argv the run was launched with (``sys.argv``), shown as a shell command with
            machine paths as placeholders and secrets (``--hub_token``) hidden.
        hyperparameters: key hyperparameters, shown as a table (None values and secret keys are left out).
        repo_id: the Hub id the student is pushed to, used in the usage snippet (default: the output folder's
            name, a snippet that runs from the folder's parent; ``push_to_hub`` points it at the repo).
        license: the licence; None inherits the teacher's (its card's ``license:``), else ``other``.
        tags: extra Hub tags.
        prompt: the usage snippet's prompt (default: the first sample prompt).
        pipeline_kwargs: extra ``from_pretrained`` keyword arguments for the snippet, as Python source.
        call_kwargs: extra keyword arguments of the snippet's generating call, as Python source (a video
            student's ``height``, ``width``, ``num_frames``).
        full_pipeline: for LoRA, the folder is also a complete pipeline with the adapter fused (None: detect
            ``model_index.json``); the card then shows that usage too.
        extra_sections: ``{title: markdown}`` sections added before the licence.
        sample_grid: (legacy) an existing grid image, relative to ``output_dir``; used when no ``sample_images``.
        template: (legacy) ``image``, ``image_lora``, ``video`` or ``video_lora``; None follows ``lora``/``video``.
        training_details: (legacy) merged into ``hyperparameters``.
        torch_dtype: the dtype the usage snippet loads with (``fp16``, ``bf16``, ``fp32``); None: the saved
            denoiser's dtype, for LoRA the run's ``mixed_precision`` (``training_config.json``).
        variant: the weights variant the snippet loads; None: the saved denoiser files' variant, for LoRA the
            run's ``--variant`` (the base's files).
    """
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHODS)}.")
    if template is not None:
        if template not in TEMPLATES:
            raise ValueError(f"Unknown model-card template {template!r}; expected one of {sorted(TEMPLATES)}.")
        video = video or template.startswith("video")
        lora = lora or template.endswith("_lora")
    template = ("video" if video else "image") + ("_lora" if lora else "")
    if sample_images is not None and (sample_prompts is None or len(sample_prompts) != len(sample_images)):
        raise ValueError(f"sample_prompts must give one prompt per sample ({len(sample_images)} samples, "
                         f"{None if sample_prompts is None else len(sample_prompts)} prompts).")
    sample_prompts = [str(p) for p in sample_prompts or []]
    hub_id = hub_base_model(base_model)
    scrub = _PathScrubber(output_dir, None if hub_id else base_model)
    method_name, method_description = METHODS[method]

    # schedule: one source of truth, the scheduler saved with the student
    if os.path.isfile(os.path.join(output_dir, "scheduler", "scheduler_config.json")):
        schedule = student_schedule(output_dir, num_inference_steps)
        if timesteps is None:
            timesteps, sigmas = schedule["timesteps"], schedule["sigmas"] if sigmas is None else sigmas
        elif len(timesteps) != len(schedule["timesteps"]) or any(
                abs(float(a) - b) > 0.5 for a, b in zip(timesteps, schedule["timesteps"])):
            warnings.warn(f"The card's timesteps {list(timesteps)} differ from those of the saved scheduler "
                          f"{schedule['timesteps']}.", stacklevel=2)
        elif sigmas is None:
            sigmas = schedule["sigmas"]
        scheduler_class = scheduler_class or schedule["scheduler_class"]
        scheduler_config = scheduler_config if scheduler_config is not None else schedule["config"]
    elif timesteps is None:
        raise ValueError(f"No timesteps given and no saved scheduler in {output_dir}/scheduler.")
    scheduler_class = scheduler_class or "LCMScheduler"
    timesteps, sigmas = _numbers(timesteps), _numbers(sigmas)

    # samples -> files, grid, widget
    sample_files, grid = [], None
    if sample_images is not None and len(sample_images):
        sample_files, grid = _write_samples(output_dir, sample_images, video, fps)
    elif sample_grid:
        grid = scrub.path(sample_grid) if os.path.isabs(sample_grid) else sample_grid
        grid = grid.replace("<output_dir>/", "")
    prompt = prompt or (sample_prompts[0] if sample_prompts else DEFAULT_PROMPT)

    # metadata
    inherited = teacher_license(base_model) if license is None else None
    lic = dict(inherited or {"license": license or "other"})
    license_file = lic.pop("license_file", None)
    if license_file:  # the teacher's licence text travels with the weights derived from it
        import shutil

        target = os.path.join(output_dir, lic["license_link"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(license_file, target)
    all_tags = ["diffusers", "distillation", "dmdx", *METHOD_TAGS[method], "few-step",
                *(["lora"] if lora else []), "text-to-video" if video else "text-to-image", *tags]
    card_data = ModelCardData(
        base_model=hub_id, library_name="diffusers", pipeline_tag="text-to-video" if video else "text-to-image",
        tags=list(dict.fromkeys(all_tags)), **lic,
        widget=[{"text": p, "output": {"url": f}} for p, f in zip(sample_prompts, sample_files)] or None,
    )

    # usage
    if lora and full_pipeline is None:
        full_pipeline = os.path.isfile(os.path.join(output_dir, "model_index.json"))
    local_ref = repo_id is None
    repo_ref = repo_id or os.path.basename(os.path.normpath(os.path.abspath(output_dir)))
    note = LOCAL_NOTE if local_ref else ""
    # load with the dtype the student was trained / saved in and the variant its files (or its base's) carry
    saved_dtype, saved_variant = saved_weights_format(output_dir)
    run = {}
    if os.path.isfile(os.path.join(output_dir, TRAINING_CONFIG)):
        with open(os.path.join(output_dir, TRAINING_CONFIG)) as f:
            run = json.load(f)
    if lora:  # the adapter loads into its base, in the precision it was trained against
        load_dtype = dtype_source(torch_dtype) if torch_dtype else (
            dtype_source(run.get("mixed_precision")) if run.get("mixed_precision") else saved_dtype)
        load_variant = variant if variant is not None else run.get("variant")
    else:
        load_dtype = dtype_source(torch_dtype) if torch_dtype else saved_dtype
        load_variant = variant if variant is not None else saved_variant
    common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, prompt=prompt,
                  scheduler_class=scheduler_class, video=video, fps=fps, call_kwargs=call_kwargs)
    usage = usage_snippet(repo_ref, pipeline_class, lora=lora, base_model=hub_id, load_note=note,
                          pipeline_kwargs=_load_kwargs(load_dtype, load_variant, pipeline_kwargs), **common)
    full_usage = (usage_snippet(repo_ref, pipeline_class, lora=False, load_note=note,
                                pipeline_kwargs=_load_kwargs(saved_dtype, saved_variant, pipeline_kwargs), **common)
                  if lora and full_pipeline else None)

    # comparison
    report_rows = load_evaluation_report(evaluation_report) if evaluation_report is not None else None
    this_row = (evaluation_name or _this_row(report_rows, output_dir, method)) if report_rows else None
    if report_rows is not None and evaluation_name and evaluation_name not in report_rows:
        raise ValueError(f"evaluation_name {evaluation_name!r} is not a row of the report ({sorted(report_rows)}).")
    teacher_nfe = _nfe(teacher_num_inference_steps, teacher_guidance_scale)
    student_nfe = _nfe(num_inference_steps, guidance_scale)
    first = next(iter(report_rows.values())) if report_rows else {}

    hyper = {**dict(training_details or {}), **dict(hyperparameters or {})}
    hyper = {_md_cell(k): "`" + _md_cell(_format_value(v, scrub)).replace("`", "'") + "`" for k, v in hyper.items()
             if v is not None and not _SECRET.search(str(k))}

    guidance_text = (f"Use it without classifier-free guidance (`guidance_scale={guidance_scale}`)."
                     if float(guidance_scale) <= 1.0 else f"Use it with `guidance_scale={guidance_scale}`.")
    teacher_md = f"`{hub_id}`" if hub_id else (
        f"a local teacher (`{os.path.basename(os.path.normpath(os.fspath(base_model)))}`)" if base_model
        else "a local teacher")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_templates_dir()), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    text = env.get_template(TEMPLATES[template]).render(
        card_data=card_data.to_yaml(),
        title=f"{method_name.split(' (')[0]} {num_inference_steps}-step "
              f"{'video ' if video else ''}student of {hub_id or 'a local teacher'}",
        teacher=teacher_md, hub_teacher=hub_id, teacher_short=f"`{hub_id}`" if hub_id else "local",
        pipeline_class=pipeline_class,
        num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale,
        steps_article=indefinite_article(num_inference_steps), scheduler_class=scheduler_class,
        scheduler_config=json.dumps(dict(scheduler_config), indent=2, sort_keys=True, default=str)
        if scheduler_config else None,
        method_name=method_name, method_description=method_description,
        grid=grid, samples=list(zip(sample_prompts, sample_files)), sample_prompts=sample_prompts, video=video,
        usage=usage, full_usage=full_usage, local_ref=local_ref, repo_ref=repo_ref,
        evaluation_table=evaluation_table(report_rows, this_row) if report_rows else None,
        evaluation_samples=first.get("num_images_per_prompt"), evaluation_prompt_set=first.get("prompt_set"),
        evaluation_models=", ".join(f"{label} `{first[key]}`" for key, label in (
            ("dinov2_model", "DINOv2"), ("clip_model", "CLIP"), ("pickscore_model", "PickScore"))
            if isinstance(first.get(key), str)) or None,
        teacher_steps=teacher_num_inference_steps, teacher_guidance=teacher_guidance_scale,
        teacher_nfe=teacher_nfe, student_nfe=student_nfe,
        teacher_seconds=teacher_seconds_per_image, student_seconds=student_seconds_per_image,
        nfe_ratio=teacher_nfe / student_nfe if teacher_nfe and student_nfe else None,
        speedup=teacher_seconds_per_image / student_seconds_per_image
        if teacher_seconds_per_image and student_seconds_per_image else None,
        hardware=hardware, cell=_cell,
        training_command=format_training_command(training_command, scrub) if training_command else None,
        hyperparameters=hyper, extra_sections=dict(extra_sections or {}),
        licence_text=licence_text(teacher_md, lora, lic, bool(inherited)), lora=lora, guidance_text=guidance_text,
    )
    card = ModelCard(scrub.text(text))
    card.save(os.path.join(output_dir, "README.md"))
    return str(card)


# ---- re-rendering a finished student's card ---------------------------------------------------------------------
TRAINING_CONFIG = "training_config.json"


def training_hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The card's hyperparameter table from a run's flags (``training_config.json``, or ``vars(args)``): for
    ``method == "adp"`` what ``dmdx.training.adp`` shows, else what ``dmdx.training.loop`` shows."""
    def kind(rank):
        return f"LoRA r={rank}" if rank else "full"

    common = {"resolution": config.get("resolution"), "generator updates": config.get("max_train_steps"),
              "batch size per device": config.get("train_batch_size")}
    if config.get("num_frames"):  # a video run: frames x height x width
        common["frames x height x width"] = f"{config['num_frames']}x{config.get('height')}x{config.get('width')}"
    if config.get("method") == "adp":
        weights = (f"{config['latent_weight']} / {config['pixel_weight']}"
                   if "latent_weight" in config and "pixel_weight" in config else None)
        return {**common, "latent / pixel weights": weights, "velocity MSE weight": config.get("velocity_mse_weight")}
    return {**common, "teacher guidance scale": config.get("guidance_scale"), "ODE step dt": config.get("ode_step_dt"),
            "generator": kind(config.get("lora_rank")), "fake score": kind(config.get("fake_score_lora_rank"))}


def card_training_command(readme_path: str) -> list[str] | None:
    """The training command a card shows (its "Launched with" block) as argv tokens, placeholders kept, so that
    :func:`format_training_command` renders it again unchanged; None when the card shows none."""
    if not os.path.isfile(readme_path):
        return None
    with open(readme_path, encoding="utf-8") as f:
        match = re.search(r"^Launched with[^\n]*\n+```bash\n(.*?)\n```", f.read(), re.S | re.M)
    return shlex.split(match.group(1).replace(" \\\n  ", " ")) if match else None


def _card_samples(student_dir: str, config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(files relative to the folder, prompts) of the samples a card shows: its ``widget`` entries whose files exist,
    else ``samples/{i}.png`` (or ``.gif``) for each of the run's ``validation_prompts``; both only when complete."""
    from huggingface_hub import ModelCard

    readme = os.path.join(student_dir, "README.md")
    widget = []
    if os.path.isfile(readme):
        try:
            widget = ModelCard.load(readme, ignore_metadata_errors=True).data.get("widget") or []
        except Exception:  # noqa: BLE001 (an unreadable card: fall back to the run's prompts)
            widget = []
    pairs = [(w["output"]["url"], str(w["text"])) for w in widget if isinstance(w, Mapping)
             and isinstance(w.get("output"), Mapping) and w["output"].get("url") and w.get("text") is not None]
    if pairs and all(os.path.isfile(os.path.join(student_dir, f)) for f, _ in pairs):
        return [f for f, _ in pairs], [p for _, p in pairs]
    prompts = [str(p) for p in config.get("validation_prompts") or []]
    files = []
    for i in range(len(prompts)):
        found = [f"{SAMPLES_DIR}/{i}.{ext}" for ext in ("png", "gif")
                 if os.path.isfile(os.path.join(student_dir, SAMPLES_DIR, f"{i}.{ext}"))]
        if not found:
            return [], []
        files.append(found[0])
    return files, prompts


def _architecture_extras(student_dir: str, pipeline_class: str, config: Mapping[str, Any]) -> dict:
    """What the teacher adapter of ``pipeline_class`` adds to a card (``card_extras``), built on the student's
    folder with the run's architecture flags; {} when no adapter knows the class."""
    import inspect

    try:
        from dmdx.pipelines.teachers import ADAPTERS, TeacherAdapter
    except ImportError:
        return {}
    for cls in ADAPTERS.values():
        if cls.pipeline_class != pipeline_class:
            continue
        own = set(inspect.signature(cls.__init__).parameters) - set(
            inspect.signature(TeacherAdapter.__init__).parameters)
        try:
            return dict(cls(student_dir, what="the student", **{k: config[k] for k in own if k in config})
                        .card_extras())
        except Exception:  # noqa: BLE001 (a folder the adapter rejects: no architecture extras)
            return {}
    return {}


def refresh_model_card(
    student_dir: str,
    *,
    evaluation_report: Mapping | str | os.PathLike | None = None,
    evaluation_name: str | None = None,
    training_command: Sequence[str] | None = None,
    **overrides: Any,
) -> str:
    """Re-render the card of a finished student folder (what training exported), e.g. to attach an
    ``evaluate.py`` report measured afterwards; returns the new ``README.md`` text.

    Everything comes from the folder: the method, step count, flags and teacher from ``training_config.json``,
    the pipeline class from ``model_index.json``, the schedule from ``scheduler/``, LoRA from
    ``pytorch_lora_weights.safetensors``, the samples and their prompts from the card's ``widget`` entries (else
    ``samples/{i}.png`` for the run's ``validation_prompts``), the training command from the card being replaced
    (or ``training_config.json``'s ``training_command``), architecture extras (SD3 without T5) from the teacher
    adapter. ``overrides`` are further :func:`write_model_card` arguments (``hardware``, ``repo_id``, ...)."""
    config_path = os.path.join(student_dir, TRAINING_CONFIG)
    index_path = os.path.join(student_dir, "model_index.json")
    for path in (config_path, index_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{student_dir} is not a finished student folder (no {os.path.basename(path)}).")
    with open(config_path) as f:
        config = json.load(f)
    with open(index_path) as f:
        pipeline_class = json.load(f)["_class_name"]
    from .export import LORA_WEIGHT_NAME

    lora = os.path.isfile(os.path.join(student_dir, LORA_WEIGHT_NAME))
    files, prompts = _card_samples(student_dir, config)
    video = any(f.endswith(".gif") for f in files) or "Video" in pipeline_class
    if training_command is None:
        training_command = config.get("training_command") or card_training_command(
            os.path.join(student_dir, "README.md"))
    kwargs = dict(
        # as the export path names it: a LoRA is relative to the weights it was trained on
        base_model=(config.get("pretrained_generator_name_or_path") if lora else None)
        or config.get("pretrained_model_name_or_path"),
        pipeline_class=pipeline_class, num_inference_steps=int(config["num_student_steps"]), guidance_scale=0.0,
        method=config["method"], lora=lora, video=video, sample_images=files or None,
        sample_prompts=prompts or None, training_command=training_command,
        hyperparameters=training_hyperparameters(config), repo_id=config.get("hub_model_id"),
        evaluation_report=evaluation_report, evaluation_name=evaluation_name,
        **_architecture_extras(student_dir, pipeline_class, config),
    )
    kwargs.update(overrides)
    return write_model_card(student_dir, **kwargs)
