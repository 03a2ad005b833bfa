"""Hub model cards for distilled students: the data a card shows, computed from the run; the words are in the Jinja
templates of ``model_cards/`` (``base.md`` and an intro per kind of student; ``usage.md`` the usage snippet;
``macros.md`` the method descriptions, guidance advice, licence paragraph and report table).

One entry point, :func:`write_model_card`, called once by the export path: it writes the student's sample files
(``dmdx.pipelines.card_samples``), renders ``README.md`` with huggingface_hub's ``ModelCardData`` for the metadata
(renders offline), and returns the text. :func:`refresh_model_card` renders a finished student folder's card again
from what the folder holds (its ``training_config.json``, scheduler, samples and card), e.g. with an
``evaluate.py`` report measured afterwards.

What the card holds: Hub metadata (``base_model`` when the teacher came from the Hub, ``pipeline_tag``,
``library_name: diffusers``, tags, the teacher's licence, ``widget`` examples), the samples, a teacher-vs-student
table (steps, NFE, guidance, seconds per image, and the metrics of an ``evaluate.py`` report when given), the exact
schedule, a usage snippet with a real prompt of the run, the training command and hyperparameters. No machine path
is ever written (``dmdx.pipelines.card_paths``): a local teacher appears as "a local teacher", paths in the command
become placeholders (``<teacher>``, ``<output_dir>``, ``<name>``), and the rendered text is scrubbed once more
before it is saved.
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

from .card_paths import SECRET, PathScrubber, format_training_command, format_value
from .card_samples import SAMPLES_DIR, image_grid, write_samples

__all__ = ["LOCAL_NOTE", "SAMPLES_DIR", "card_training_command", "dtype_source", "evaluation_table",
           "format_training_command", "hub_base_model", "hub_offline", "image_grid", "indefinite_article",
           "licence_text", "load_evaluation_report", "refresh_model_card", "saved_weights_format", "student_schedule",
           "teacher_license", "training_hyperparameters", "usage_snippet", "write_model_card"]

TEMPLATES = {"image": "image_full.md", "image_lora": "image_lora.md", "video": "video_full.md",
             "video_lora": "video_lora.md"}
# The methods a card describes (their names and descriptions are in macros.md), with their Hub tags ("dmd" is
# DMD2's loss; DMDX's final stage is ADM).
METHOD_TAGS = {"dmdx": ["adm"], "adm": ["adm"], "adp": ["adp"], "dmd": ["dmd2"]}

DEFAULT_PROMPT = "a photo of a cat"  # only when the run knows no prompt at all
# Appended to the usage snippet's load line when it points at the local output folder; push_to_hub removes it
# when it points the snippet at the Hub repo.
LOCAL_NOTE = "  # the folder training wrote (run from its parent); after pushing, its Hub id"
TRAINING_CONFIG = "training_config.json"

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
# The models an evaluate.py report names for its metrics, as the card lists them.
METRIC_MODELS = (("dinov2_model", "DINOv2"), ("clip_model", "CLIP"), ("pickscore_model", "PickScore"))


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
    """The card's licence paragraph (``macros.md``): the teacher's licence when its card declared one
    (``inherited``), else a warning. ``teacher_md``: the teacher as the card names it (```org/name``` ...)."""
    return str(_macros().licence_paragraph(teacher_md, lora, lic, inherited))


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


def _card_schedule(output_dir: str, num_inference_steps: int, timesteps, sigmas, scheduler_class,
                   scheduler_config) -> dict[str, Any]:
    """The schedule the card shows. One source of truth, the scheduler saved with the student: given timesteps
    that differ from it are kept with a warning; what is not given is read from it."""
    if os.path.isfile(os.path.join(output_dir, "scheduler", "scheduler_config.json")):
        schedule = student_schedule(output_dir, num_inference_steps)
        if timesteps is None:
            timesteps, sigmas = schedule["timesteps"], schedule["sigmas"] if sigmas is None else sigmas
        elif len(timesteps) != len(schedule["timesteps"]) or any(
                abs(float(a) - b) > 0.5 for a, b in zip(timesteps, schedule["timesteps"])):
            warnings.warn(f"The card's timesteps {list(timesteps)} differ from those of the saved scheduler "
                          f"{schedule['timesteps']}.", stacklevel=3)
        elif sigmas is None:
            sigmas = schedule["sigmas"]
        scheduler_class = scheduler_class or schedule["scheduler_class"]
        scheduler_config = scheduler_config if scheduler_config is not None else schedule["config"]
    elif timesteps is None:
        raise ValueError(f"No timesteps given and no saved scheduler in {output_dir}/scheduler.")
    return {"timesteps": _numbers(timesteps), "sigmas": _numbers(sigmas),
            "scheduler_class": scheduler_class or "LCMScheduler",
            "scheduler_config": json.dumps(dict(scheduler_config), indent=2, sort_keys=True, default=str)
            if scheduler_config else None}


def indefinite_article(number: int) -> str:
    """"an" before a number said with a leading vowel sound (8, 11, 18, 80-89, 800-899, ...), else "a"."""
    digits = str(int(number))
    return "an" if digits.startswith("8") or (len(digits) in (2, 5) and digits[:2] in ("11", "18")) else "a"


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


# ---- rendering ----------------------------------------------------------------------------------------------------
def _py(s: str) -> str:
    """A Python string literal (double quotes)."""
    return json.dumps(s, ensure_ascii=False)


def _cell(value) -> str:
    """A number as a table cell: 4 significant digits, "–" when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _environment():
    """The Jinja environment of ``model_cards/``: a variable a template uses but is not given is an error."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resources.files("dmdx.model_cards"))),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(py=_py, cell=_cell, article=indefinite_article)
    return env


def _macros():
    return _environment().get_template("macros.md").module


# ---- the usage snippet --------------------------------------------------------------------------------------------
def usage_snippet(repo_id: str, pipeline_class: str, num_inference_steps: int, guidance_scale: float,
                  lora: bool = False, base_model: str | None = None, prompt: str = DEFAULT_PROMPT,
                  scheduler_class: str = "LCMScheduler", video: bool = False, fps: int = 8,
                  pipeline_kwargs: Mapping[str, str] | None = None, load_note: str = "",
                  call_kwargs: Mapping[str, str] | None = None) -> str:
    """Python that loads the student with stock diffusers and generates (``usage.md``). ``repo_id``: the student
    (Hub id or folder); ``base_model``: for LoRA, the pipeline the adapter loads into; ``pipeline_kwargs``: extra
    ``from_pretrained`` keyword arguments as Python source (e.g. ``{"text_encoder_3": "None"}``); ``call_kwargs``:
    extra keyword arguments of the generating call, as Python source (e.g. a video's ``{"num_frames": "49"}``)."""
    return str(_environment().get_template("usage.md").module.usage(_snippet_data(**locals())))


def _snippet_data(**kwargs) -> dict[str, Any]:
    """What ``usage.md`` renders: :func:`usage_snippet`'s arguments, with no keyword arguments as ``{}``."""
    return {**kwargs, "pipeline_kwargs": dict(kwargs.get("pipeline_kwargs") or {}),
            "call_kwargs": dict(kwargs.get("call_kwargs") or {})}


def _usage(output_dir: str, *, lora: bool, repo_id: str | None, hub_id: str | None, full_pipeline: bool | None,
           torch_dtype, variant, pipeline_kwargs, **common) -> tuple[dict, dict | None]:
    """The usage snippets' data: the student (for LoRA: the adapter on its base) and, for a LoRA folder that also
    holds the fused pipeline, that pipeline; each loads with the dtype and variant it was trained / saved in."""
    if lora and full_pipeline is None:
        full_pipeline = os.path.isfile(os.path.join(output_dir, "model_index.json"))
    repo_ref = repo_id or os.path.basename(os.path.normpath(os.path.abspath(output_dir)))
    note = LOCAL_NOTE if repo_id is None else ""
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
    usage = _snippet_data(repo_id=repo_ref, lora=lora, base_model=hub_id, load_note=note,
                          pipeline_kwargs=_load_kwargs(load_dtype, load_variant, pipeline_kwargs), **common)
    full = (_snippet_data(repo_id=repo_ref, lora=False, base_model=None, load_note=note,
                          pipeline_kwargs=_load_kwargs(saved_dtype, saved_variant, pipeline_kwargs), **common)
            if lora and full_pipeline else None)
    return usage, full


# ---- the comparison: evaluate.py's report, or steps and seconds -----------------------------------------------------
def _nfe(steps, guidance) -> int | None:
    if steps is None:
        return None
    return int(steps) * (2 if _guided(guidance) else 1)


def _guided(guidance_scale) -> bool:
    """Classifier-free guidance is on (each step evaluates the network twice)."""
    return guidance_scale is not None and float(guidance_scale) > 1.0


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


def _evaluation_rows(report: Mapping[str, Mapping[str, Any]], this: str | None) -> dict[str, list]:
    """The report's table as data: the known columns first (steps, NFE, guidance, s / image, digit-FID, ...), then
    any other numeric ones; one row per pipeline, ``this`` marking this card's model."""
    rows = {name: _flatten(r) for name, r in report.items()}
    present = [k for k in REPORT_COLUMNS if any(k in r for r in rows.values())]
    others = sorted({k for r in rows.values() for k, v in r.items() if _is_number(v)}
                    - set(present) - REPORT_HIDDEN)
    columns = present + others
    return {"labels": [REPORT_COLUMNS.get(k, k.replace("_", " ").replace(".", ": ")) for k in columns],
            "rows": [{"name": _md_cell(name), "this": name == this, "cells": [_cell(r.get(k)) for k in columns]}
                     for name, r in rows.items()]}


def evaluation_table(report: Mapping[str, Mapping[str, Any]], this: str | None = None) -> str:
    """A Markdown table of an ``evaluate.py`` report: one row per pipeline (``this`` marked as this model), the
    known columns first (steps, NFE, guidance, s / image, digit-FID, ...), then any other numeric ones."""
    return str(_macros().evaluation_table(_evaluation_rows(report, this)))


def _this_row(report: Mapping[str, Mapping], output_dir: str, method: str) -> str | None:
    out = os.path.realpath(output_dir)
    for name, r in report.items():
        if isinstance(r.get("path"), str) and os.path.realpath(os.path.expanduser(r["path"])) == out:
            return name
    for name in (method, *METHOD_TAGS.get(method, []), "student"):
        if name in report:
            return name
    return None


def _evaluation(evaluation_report, evaluation_name: str | None, output_dir: str, method: str) -> dict | None:
    """The report's part of the card: its table, and the prompt set, samples per prompt and metric models of its
    first row (evaluate.py writes them on every row)."""
    if evaluation_report is None:
        return None
    rows = load_evaluation_report(evaluation_report)
    if evaluation_name and evaluation_name not in rows:
        raise ValueError(f"evaluation_name {evaluation_name!r} is not a row of the report ({sorted(rows)}).")
    first = next(iter(rows.values()))
    return {"table": _evaluation_rows(rows, evaluation_name or _this_row(rows, output_dir, method)),
            "samples_per_prompt": first.get("num_images_per_prompt"), "prompt_set": first.get("prompt_set"),
            "metric_models": [(label, first[key]) for key, label in METRIC_MODELS if isinstance(first.get(key), str)]}


def _comparison(teacher_steps, teacher_guidance, teacher_seconds, student_steps, student_guidance,
                student_seconds) -> dict[str, Any]:
    """The table without a report: steps, network evaluations (classifier-free guidance doubles them), seconds,
    and the ratios the card states."""
    teacher_nfe, student_nfe = _nfe(teacher_steps, teacher_guidance), _nfe(student_steps, student_guidance)
    return {"teacher_steps": teacher_steps, "teacher_guidance": teacher_guidance, "teacher_nfe": teacher_nfe,
            "student_nfe": student_nfe, "teacher_seconds": teacher_seconds, "student_seconds": student_seconds,
            "nfe_ratio": teacher_nfe / student_nfe if teacher_nfe and student_nfe else None,
            "speedup": teacher_seconds / student_seconds if teacher_seconds and student_seconds else None}


# ---- metadata and licence -----------------------------------------------------------------------------------------
def _licence(output_dir: str, base_model: str, license: str | None) -> tuple[dict[str, str], bool]:
    """(the card's licence fields, whether they are the teacher's): ``license`` when given, else the teacher's
    card's, else ``other``. A local teacher's linked licence file is copied beside the card."""
    inherited = teacher_license(base_model) if license is None else None
    lic = dict(inherited or {"license": license or "other"})
    license_file = lic.pop("license_file", None)
    if license_file:  # the teacher's licence text travels with the weights derived from it
        import shutil

        target = os.path.join(output_dir, lic["license_link"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(license_file, target)
    return lic, bool(inherited)


def _card_data(*, hub_id, method, lora, video, tags, lic, sample_prompts, sample_files):
    """The card's YAML metadata (huggingface_hub's ``ModelCardData``)."""
    from huggingface_hub import ModelCardData

    all_tags = ["diffusers", "distillation", "dmdx", *METHOD_TAGS[method], "few-step",
                *(["lora"] if lora else []), "text-to-video" if video else "text-to-image", *tags]
    return ModelCardData(
        base_model=hub_id, library_name="diffusers", pipeline_tag="text-to-video" if video else "text-to-image",
        tags=list(dict.fromkeys(all_tags)), **lic,
        widget=[{"text": p, "output": {"url": f}} for p, f in zip(sample_prompts, sample_files)] or None,
    )


# ---- the card -----------------------------------------------------------------------------------------------------
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
    from huggingface_hub import ModelCard

    if method not in METHOD_TAGS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHOD_TAGS)}.")
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
    scrub = PathScrubber(output_dir, None if hub_id else base_model)
    schedule = _card_schedule(output_dir, num_inference_steps, timesteps, sigmas, scheduler_class, scheduler_config)

    sample_files, grid = [], None
    if sample_images is not None and len(sample_images):
        sample_files, grid = write_samples(output_dir, sample_images, video, fps)
    elif sample_grid:
        grid = scrub.path(sample_grid) if os.path.isabs(sample_grid) else sample_grid
        grid = grid.replace("<output_dir>/", "")
    lic, inherited = _licence(output_dir, base_model, license)
    usage, full_usage = _usage(
        output_dir, lora=lora, repo_id=repo_id, hub_id=hub_id, full_pipeline=full_pipeline, torch_dtype=torch_dtype,
        variant=variant, pipeline_kwargs=pipeline_kwargs, pipeline_class=pipeline_class,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        prompt=prompt or (sample_prompts[0] if sample_prompts else DEFAULT_PROMPT),
        scheduler_class=schedule["scheduler_class"], video=video, fps=fps, call_kwargs=call_kwargs)
    hyper = {**dict(training_details or {}), **dict(hyperparameters or {})}

    # every variable of base.md and the intro templates
    text = _environment().get_template(TEMPLATES[template]).render(
        card_data=_card_data(hub_id=hub_id, method=method, lora=lora, video=video, tags=tags, lic=lic,
                             sample_prompts=sample_prompts, sample_files=sample_files).to_yaml(),
        method=method, lora=lora, video=video, pipeline_class=pipeline_class,
        hub_teacher=hub_id, teacher_folder=None if hub_id or not base_model
        else os.path.basename(os.path.normpath(os.fspath(base_model))),
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, guided=_guided(guidance_scale),
        **schedule,  # timesteps, sigmas, scheduler_class, scheduler_config
        grid=grid, samples=list(zip(sample_prompts, sample_files)), usage=usage, full_usage=full_usage,
        evaluation=_evaluation(evaluation_report, evaluation_name, output_dir, method),
        **_comparison(teacher_num_inference_steps, teacher_guidance_scale, teacher_seconds_per_image,
                      num_inference_steps, guidance_scale, student_seconds_per_image),
        hardware=hardware,
        training_command=format_training_command(training_command, scrub) if training_command else None,
        hyperparameters={_md_cell(k): _md_cell(format_value(v, scrub)).replace("`", "'") for k, v in hyper.items()
                         if v is not None and not SECRET.search(str(k))},
        extra_sections=dict(extra_sections or {}), licence=lic, licence_inherited=inherited,
    )
    card = ModelCard(scrub.text(text))
    card.save(os.path.join(output_dir, "README.md"))
    return str(card)


# ---- re-rendering a finished student's card ---------------------------------------------------------------------
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
    """The training command a card shows (the "Launched with" block of ``base.md``) as argv tokens, placeholders
    kept, so that :func:`format_training_command` renders it again unchanged; None when the card shows none."""
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
