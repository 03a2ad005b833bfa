"""Evaluate diffusers pipelines against their teacher: on any prompt set with standard metrics (the general mode), or
on the digits with the digit classifier (the demos' mode, the default).

General mode (``--prompts_file`` or ``--dataset_name``; docs/evaluation.md gives the real-scale commands):

    python distill_scripts/evaluate.py --prompts_file prompts.txt \
        --pipeline teacher=stabilityai/stable-diffusion-xl-base-1.0:25:5 --pipeline student=OUT:1:0 \
        --torch_dtype fp16 --num_images_per_prompt 2 --output_dir eval_sdxl

Prompts come from a text file (one per line), a JSONL file (``prompt`` or ``text``), or a data set's caption column,
streamed (only that column is read: an image column is never downloaded). Each pipeline (a folder or a Hub id; a
``--spec`` entry may add ``call_kwargs`` such as ``negative_prompt`` or ``num_frames``, ``from_pretrained_kwargs``
such as ``{"text_encoder_3": null}``, its own ``torch_dtype``, ``variant`` or ``seed``) draws
``--num_images_per_prompt`` samples per prompt with one seed per (prompt, sample index), the same for every
pipeline. ``accelerate launch`` shards the generation over processes; every sample is written to
``OUTPUT_DIR/samples/NAME/`` as a PNG (video: its frames as PNGs and a GIF) with a ``metadata.jsonl`` record, so a
run that is interrupted resumes where it stopped and the metrics are always computed from disk. Metrics
(``dmdx.pipelines.metrics``; models loaded with transformers from ``--dinov2_model``, ``--clip_model``,
``--pickscore_model``, Hub ids or folders):

* ``fd_dinov2_to_teacher`` / ``fd_clip_to_teacher``: Frechet distance to the reference pipeline's samples in DINOv2
  and CLIP image features ("FID to teacher"; Stein et al. 2023 recommend DINOv2 over Inception); a second seed of
  the teacher (``--spec`` with ``"seed": 1``) measures what sampling noise alone gives; ``fd_dinov2_real`` to
  ``--reference_images``;
* ``clip_score`` (100 * max(cos, 0), torchmetrics' definition), ``pickscore`` (with ``--pickscore_model``);
* ``diversity``: mean pairwise DINOv2 distance among one prompt's samples, relative to the reference;
* video, per frame, plus ``subject_consistency`` (VBench's) and ``motion_magnitude`` (relative to the reference);
* ``seconds_per_image`` (or ``_video``) after a warm-up call, and ``peak_memory_gb`` (CUDA) per pipeline.

The digits mode (no prompt flags) follows.

Evaluate text-to-image pipelines trained on the digits: distance to the teacher, quality, prompt adherence, mode
coverage, diversity, cost.

Every pipeline is loaded with stock ``DiffusionPipeline.from_pretrained`` and called as a user would call it
(its own scheduler and VAE, ``output_type="pt"``). For each prompt ("a handwritten digit zero" ... "nine", and the
class-free "a handwritten digit") it generates ``--num_images_per_prompt`` samples with fixed seeds (the same
seeds for every pipeline) and scores them with the digit classifier trained on the real digits
(``distill_scripts/digits/digit_classifier.py``).

Distillation is judged against the teacher first (a student can beat its teacher on real-data FID, and then any
faithful distillation makes that figure worse). Against the ``--reference`` pipeline's samples (default: the one
named ``teacher``, else the first), for the same prompts and seeds:

* ``fid_to_teacher``: Frechet distance between classifier features of the ten class prompts' samples and the
  reference's;
* ``class_hist_tv_to_teacher``: total-variation distance between the predicted-class histograms of the samples of
  one class prompt and the reference's (0 = identical, 1 = disjoint), averaged over the ten class prompts
  (``per_class_hist_tv_to_teacher`` lists them);
* ``mode_hist_tv_to_teacher``: the same for the class-free prompt's samples (how far the mode mix is from the
  teacher's).
  The reference's own row holds ``null`` for these; ``reference_pipeline`` names it. Sampling noise alone makes them
  positive, so compare pipelines at the same sample counts.

Against the real digits and on their own:

* ``digit_fid``: Frechet distance between classifier features (64-d penultimate layer) of the samples of the ten
  class prompts and of the 360 held-out real digits (lower is better; small sample sizes bias it upwards, so compare
  pipelines at the same ``--num_images_per_prompt``; report.md also lists real train digits as a floor);
* ``prompt_accuracy``: share of class-prompt samples the classifier assigns to the prompted digit;
* ``mode_entropy``: normalised entropy of the predicted classes of the class-free prompt's samples (1.0 = uniform
  over the ten digits) and ``modes_covered``: digits holding >= 5% of those samples;
* ``diversity``: mean pairwise feature distance between samples of one prompt, averaged over prompts, relative to
  the reference pipeline (the teacher); ``diversity_raw`` is the absolute value;
* ``nfe``: network evaluations per image (steps, doubled with CFG), and ``seconds_per_image`` measured in this run
  after a warm-up call, so all pipelines are timed on the same hardware under the same load.

A pipeline that fails to load or generate does not cost the others: its entry is ``{"error": ..., path, steps,
guidance}``, the rest are evaluated and written, and the exit code is 1.

Usage:

    python distill_scripts/evaluate.py \
        --pipeline teacher=distill_scripts/digits/assets/digits-sdxl-teacher:25:5.0 \
        --pipeline dmdx=demo_output/student:1:0 --output_dir eval_output

or ``--spec spec.json`` holding ``[{"name": ..., "path": ..., "num_inference_steps": ..., "guidance_scale": ...}]``.
Writes ``report.json`` (one entry per pipeline name), ``report.md`` (a Markdown table) and ``samples.png``
(rows: pipelines, columns: prompts).

Video pipelines (``CogVideoXPipeline``, e.g. the video demo's teacher and students) are scored on the moving digits
(``distill_scripts/digits/moving_digits.py``): ``--num_images_per_prompt`` clips for each of the 40 prompts "a
handwritten digit <k> moving <left|right|up|down>", at the frame count and text length the transformer was built
for (``sample_frames``, ``max_text_seq_length``, as the students' model cards call them). Each frame is judged by
the same digit classifier (the digit found by its centre of ink mass, cropped to 8x8, upsampled as the real digits
are), so:

* ``fid_to_teacher`` / ``digit_fid``: per-frame classifier-feature FID to the reference's frames / to the frames of
  held-out real moving digits; ``class_hist_tv_to_teacher``: per prompt, the TV distance between the frames'
  predicted-class histograms and the reference's, averaged; ``direction_hist_tv_to_teacher``: the same for the
  clips' motion directions;
* ``prompt_accuracy``: share of frames showing the prompted digit; ``direction_accuracy``: share of clips whose
  digit moves the prompted way (least-squares trajectory of the centres); ``temporal_consistency``: per clip, the
  share of frames agreeing with its most frequent class, averaged (1.0: the digit never changes identity);
* ``diversity``: mean pairwise distance between clips of one prompt (mean frame feature), relative to the reference;
  ``seconds_per_video``. Besides ``samples.png`` (first, middle and last frame of one clip per pipeline and digit),
  ``samples.gif`` animates those clips.

Several runs (e.g. one per training seed) combine into mean ± sd per metric and pipeline:

    python distill_scripts/evaluate.py --aggregate seed0/report.json seed1/report.json seed2/report.json \
        --output_dir eval_seeds

writes ``report.json`` (``{pipeline: {metric: {"mean", "sd", "n"}}}``) and ``report.md`` with ``mean ± sd`` cells.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from dmdx.pipelines.metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINOV2_MODEL,
    DEFAULT_PICKSCORE_MODEL,
    DEFAULT_PICKSCORE_PROCESSOR,
    frechet_distance,
    mean_pairwise_distance,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits"))
from digit_classifier import ASSETS_DIR, load_classifier  # noqa: E402
from digits_data import CLASS_FREE_PROMPT, evaluation_prompts, load_digits_split  # noqa: E402
from moving_digits import DIRECTIONS, clip_scores, judge_clips, load_moving_digits, video_prompts  # noqa: E402

MODE_SHARE = 0.05
NUM_CLASSES = 10
TEACHER_METRIC_KEYS = ("fid_to_teacher", "class_hist_tv_to_teacher", "mode_hist_tv_to_teacher")
METRIC_KEYS = TEACHER_METRIC_KEYS + ("digit_fid", "prompt_accuracy", "mode_entropy", "modes_covered", "diversity",
                                     "nfe", "seconds_per_image")
# report.md columns after pipeline / steps / guidance / NFE: teacher-referenced first, then against real digits, cost
COLUMNS = (
    ("FID to teacher ↓", "fid_to_teacher", ".2f"),
    ("class-hist TV to teacher ↓", "class_hist_tv_to_teacher", ".3f"),
    ("mode-hist TV to teacher ↓", "mode_hist_tv_to_teacher", ".3f"),
    ("digit-FID (real) ↓", "digit_fid", ".2f"),
    ("prompt acc. ↑", "prompt_accuracy", ".3f"),
    ("mode entropy ↑", "mode_entropy", ".3f"),
    ("modes covered", "modes_covered", "d"),
    ("diversity (rel.)", "diversity", ".3f"),
    ("s / image", "seconds_per_image", ".4f"),
)


# text-to-video pipelines (model_index.json's _class_name); in the digits mode scored on the moving digits
VIDEO_PIPELINES = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "WanPipeline", "HunyuanVideoPipeline",
                   "LTXPipeline", "MochiPipeline")
VIDEO_TEACHER_METRIC_KEYS = ("fid_to_teacher", "class_hist_tv_to_teacher", "direction_hist_tv_to_teacher")
VIDEO_METRIC_KEYS = VIDEO_TEACHER_METRIC_KEYS + ("digit_fid", "prompt_accuracy", "direction_accuracy",
                                                 "temporal_consistency", "diversity", "nfe", "seconds_per_video")
VIDEO_COLUMNS = (
    ("FID to teacher ↓", "fid_to_teacher", ".2f"),
    ("class-hist TV to teacher ↓", "class_hist_tv_to_teacher", ".3f"),
    ("direction-hist TV to teacher ↓", "direction_hist_tv_to_teacher", ".3f"),
    ("digit-FID (real, per frame) ↓", "digit_fid", ".2f"),
    ("prompt acc. (frames) ↑", "prompt_accuracy", ".3f"),
    ("direction acc. ↑", "direction_accuracy", ".3f"),
    ("temporal consistency ↑", "temporal_consistency", ".3f"),
    ("diversity (rel.)", "diversity", ".3f"),
    ("s / video", "seconds_per_video", ".4f"),
)


def pipeline_class_name(path: str) -> str:
    """``_class_name`` of a pipeline's ``model_index.json``: read from a local folder, or for a Hub id (``org/name``
    that is not a local folder) through diffusers' own ``load_config`` (the Hub cache, or the Hub when online).
    Raises ``UsageError`` naming the path or id, before any weights load."""
    from dmdx.pipelines.model_card import hub_base_model
    from dmdx.training.errors import UsageError

    if os.path.isdir(path) or not hub_base_model(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise UsageError(f"{path!r} is not a diffusers pipeline folder (no model_index.json) nor a Hub id "
                             "(org/name).")
        with open(os.path.join(path, "model_index.json")) as f:
            return json.load(f).get("_class_name", "")
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path).get("_class_name", "")
    except Exception as err:  # noqa: BLE001 (offline, gated, missing: all mean the id cannot be loaded here)
        from dmdx.pipelines.model_card import hub_offline

        offline = " HF_HUB_OFFLINE is set and it is not in the local Hub cache;" if hub_offline() else ""
        raise UsageError(f"Hub id {path!r}: its model_index.json could not be read ({offline} {type(err).__name__}: "
                         f"{err}). Download it first (`hf download {path}`) or log in for a gated model.") from err


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPEC_KEYS = {"name", "path", "num_inference_steps", "guidance_scale", "call_kwargs", "from_pretrained_kwargs",
             "torch_dtype", "variant", "seed"}


@dataclass
class PipelineSpec:
    """One pipeline to evaluate. Beyond path, steps and guidance (``--pipeline``), a ``--spec`` entry may give
    ``call_kwargs`` (extra arguments of the generating call: ``negative_prompt``, ``num_frames``,
    ``max_sequence_length``, ...), ``from_pretrained_kwargs`` (e.g. ``{"text_encoder_3": null}`` for an SD3 student
    without T5), its own ``torch_dtype`` / ``variant``, and a ``seed`` other than ``--seed`` (the same pipeline at
    another seed: the sampling-noise floor of the distances)."""
    name: str
    path: str
    num_inference_steps: int
    guidance_scale: float
    call_kwargs: dict = field(default_factory=dict)
    from_pretrained_kwargs: dict = field(default_factory=dict)
    torch_dtype: str | None = None
    variant: str | None = None
    seed: int | None = None

    @property
    def nfe(self) -> int:
        return self.num_inference_steps * (2 if self.guidance_scale > 1.0 else 1)

    def error_row(self, message: str) -> dict:
        """The report's entry of a pipeline that failed: the error and what identifies the pipeline."""
        return {"error": message, "path": self.path, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "nfe": self.nfe}


def spec_from_dict(d: dict, where: str) -> PipelineSpec:
    """A ``--spec`` entry; unknown keys or a bad dtype are named."""
    unknown = set(d) - SPEC_KEYS
    if unknown or not {"name", "path", "num_inference_steps", "guidance_scale"} <= set(d):
        raise ValueError(f"{where}: each entry needs name, path, num_inference_steps, guidance_scale and may hold "
                         f"{sorted(SPEC_KEYS - {'name', 'path', 'num_inference_steps', 'guidance_scale'})}; got "
                         f"{sorted(d)}.")
    if d.get("torch_dtype") is not None and d["torch_dtype"] not in DTYPES:
        raise ValueError(f"{where}: {d['name']}: torch_dtype must be one of {sorted(DTYPES)}, got "
                         f"{d['torch_dtype']!r}.")
    return PipelineSpec(d["name"], d["path"], int(d["num_inference_steps"]), float(d["guidance_scale"]),
                        dict(d.get("call_kwargs") or {}), dict(d.get("from_pretrained_kwargs") or {}),
                        d.get("torch_dtype"), d.get("variant"), None if d.get("seed") is None else int(d["seed"]))


def parse_pipeline_arg(value: str) -> PipelineSpec:
    """``NAME=PATH:STEPS:GUIDANCE`` (the path may itself contain ':')."""
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"Expected NAME=PATH:STEPS:GUIDANCE, got {value!r}.")
    name, rest = value.split("=", 1)
    parts = rest.rsplit(":", 2)
    if len(parts) != 3 or not name:
        raise argparse.ArgumentTypeError(f"Expected NAME=PATH:STEPS:GUIDANCE, got {value!r}.")
    try:
        return PipelineSpec(name, parts[0], int(parts[1]), float(parts[2]))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"Bad steps or guidance in {value!r}: {err}") from err


def select_reference(names: list[str], requested: str | None = None) -> str:
    """The pipeline the others are measured against: ``requested``, else the one named ``teacher``, else the first."""
    if requested is not None:
        if requested not in names:
            raise ValueError(f"--reference {requested!r} is not one of the pipelines {names}.")
        return requested
    return "teacher" if "teacher" in names else names[0]


def check_metric_model(flag: str, value: str | None) -> None:
    """A metric model flag names a folder holding a transformers ``config.json``, or a Hub id that can be reached
    (offline: one in the local Hub cache). Checked before any pipeline loads."""
    from dmdx.pipelines.model_card import hub_base_model, hub_offline
    from dmdx.training.errors import UsageError

    if value is None:
        return
    if os.path.isdir(value):
        if not os.path.isfile(os.path.join(value, "config.json")):
            raise UsageError(f"{flag} {value!r} is a folder without a config.json (save the model with "
                             "save_pretrained, or give its Hub id).")
        return
    hub_id = hub_base_model(value)
    if hub_id is None:
        raise UsageError(f"{flag} {value!r} is neither a model folder nor a Hub id (org/name).")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
            raise UsageError(f"{flag} {hub_id!r}: HF_HUB_OFFLINE is set and the model is not in the local Hub "
                             f"cache; download it first (`hf download {hub_id}`) or give a local folder.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate diffusers pipelines against a reference (the teacher): "
                                                 "on the digits (default) or, with --prompts_file / --dataset_name, "
                                                 "on any prompts with DINOv2 / CLIP / PickScore metrics.")
    parser.add_argument("--pipeline", action="append", type=parse_pipeline_arg, default=[],
                        metavar="NAME=PATH:STEPS:GUIDANCE",
                        help="A pipeline folder or Hub id with its step count and guidance scale (repeatable).")
    parser.add_argument("--spec", default=None, help="JSON file: a list of {name, path, num_inference_steps, "
                                                     "guidance_scale[, call_kwargs, from_pretrained_kwargs, "
                                                     "torch_dtype, variant, seed]} (appended after --pipeline "
                                                     "entries).")
    parser.add_argument("--reference", default=None, metavar="NAME",
                        help="The pipeline whose samples the teacher-referenced distances and relative diversity "
                             "are measured against (default: the one named 'teacher', else the first).")
    parser.add_argument("--aggregate", nargs="+", default=None, metavar="REPORT_JSON",
                        help="Instead of evaluating: combine several report.json files (e.g. one per training seed) "
                             "into mean ± sd per metric, written to --output_dir.")
    parser.add_argument("--output_dir", default="eval_output")
    parser.add_argument("--num_images_per_prompt", type=int, default=None,
                        help="Samples per prompt (default: 50 on the digits, 1 on a prompt set; diversity needs 2).")
    parser.add_argument("--num_class_free_images", type=int, default=None,
                        help="Samples of the class-free prompt (mode coverage is noisy with few; default: "
                             "--num_images_per_prompt).")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Images per pipeline call (default: 100 on the digits, 4 on a prompt set).")
    parser.add_argument("--grid_images_per_cell", type=int, default=4, choices=[1, 4, 9],
                        help="Samples shown per (pipeline, prompt) cell of samples.png.")
    parser.add_argument("--classifier_dir", default=ASSETS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu (with accelerate "
                                                       "launch: each process's own device).")
    g = parser.add_argument_group("general mode (any prompts; selected by --prompts_file or --dataset_name)")
    g.add_argument("--prompts_file", default=None,
                   help="Prompts: a text file (one per line) or a .jsonl file with a 'prompt' or 'text' field.")
    g.add_argument("--dataset_name", default=None,
                   help="Or a datasets name (or a local .json/.jsonl/.csv/.parquet file), streamed; only "
                        "--caption_column is read (images are never downloaded or decoded).")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--caption_column", default="text",
                   help="The caption column (a list of captions per row: its first one).")
    g.add_argument("--split", default="train", help="The data set split to read prompts from.")
    g.add_argument("--max_prompts", type=int, default=None, help="Use the first N prompts.")
    g.add_argument("--torch_dtype", default="fp32", choices=sorted(DTYPES),
                   help="dtype every pipeline loads in (a --spec entry may give its own).")
    g.add_argument("--variant", default=None, help="Weights variant to load (e.g. fp16), as from_pretrained's.")
    g.add_argument("--dinov2_model", default=DEFAULT_DINOV2_MODEL,
                   help="DINOv2 model (Hub id or folder): FD_DINOv2 to the reference, to --reference_images, "
                        "diversity, subject consistency.")
    g.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL,
                   help="CLIP model (Hub id or folder, with its processor): CLIP score, FD in CLIP image features.")
    g.add_argument("--pickscore_model", default=None,
                   help=f"PickScore model (off unless given; e.g. {DEFAULT_PICKSCORE_MODEL}).")
    g.add_argument("--pickscore_processor", default=None,
                   help=f"Processor of --pickscore_model (default: {DEFAULT_PICKSCORE_PROCESSOR} for "
                        f"{DEFAULT_PICKSCORE_MODEL}, else the model's own).")
    g.add_argument("--reference_images", default=None, metavar="DIR",
                   help="A folder of real images: FD_DINOv2 of every pipeline's samples to them.")
    g.add_argument("--metric_batch_size", type=int, default=32, help="Images per metric-model forward.")
    args = parser.parse_args(argv)
    from dmdx.training.errors import UsageError

    specs = list(args.pipeline)
    if args.spec:
        if not os.path.isfile(args.spec):
            parser.error(f"--spec {args.spec!r} is not a file.")
        with open(args.spec) as f:
            try:
                specs += [spec_from_dict(d, f"--spec {args.spec}") for d in json.load(f)]
            except (ValueError, TypeError, KeyError) as err:
                parser.error(str(err))
    if args.aggregate is not None:
        if specs:
            parser.error("--aggregate combines existing reports; it takes no --pipeline or --spec.")
        for path in args.aggregate:
            if not os.path.isfile(path):
                parser.error(f"--aggregate: {path!r} is not a file.")
        return args
    if not specs:
        parser.error("Give at least one --pipeline NAME=PATH:STEPS:GUIDANCE or a --spec file.")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        parser.error(f"Pipeline names must be unique, got {names}.")
    args.general = bool(args.prompts_file or args.dataset_name)
    if args.prompts_file and args.dataset_name:
        parser.error("Give --prompts_file or --dataset_name, not both.")
    if args.prompts_file and not os.path.isfile(args.prompts_file):
        parser.error(f"--prompts_file {args.prompts_file!r} does not exist.")
    if args.max_prompts is not None and args.max_prompts < 1:
        parser.error("--max_prompts must be >= 1.")
    for s in specs:
        if s.num_inference_steps < 1:
            parser.error(f"{s.name}: num_inference_steps must be >= 1.")
        if (s.call_kwargs or s.from_pretrained_kwargs or s.torch_dtype or s.variant or s.seed is not None) \
                and not args.general:
            parser.error(f"{s.name}: call_kwargs, from_pretrained_kwargs, torch_dtype, variant and seed in --spec "
                         "belong to the general mode (--prompts_file or --dataset_name).")
    if args.general and args.pickscore_model == DEFAULT_PICKSCORE_MODEL and args.pickscore_processor is None:
        args.pickscore_processor = DEFAULT_PICKSCORE_PROCESSOR  # PickScore_v1 ships no processor of its own
    try:
        classes = {s.name: pipeline_class_name(s.path) for s in specs}
        if args.general:
            for flag in ("--dinov2_model", "--clip_model", "--pickscore_model", "--pickscore_processor"):
                check_metric_model(flag, getattr(args, flag[2:]))
    except UsageError as err:
        parser.error(str(err))
    kinds = {name: cls in VIDEO_PIPELINES for name, cls in classes.items()}
    if len(set(kinds.values())) > 1:
        parser.error(f"Mixed image and video pipelines ({', '.join(n for n, v in kinds.items() if v)} are video); "
                     "evaluate them in separate runs.")
    args.video = any(kinds.values())
    try:
        args.reference = select_reference(names, args.reference)
    except ValueError as err:
        parser.error(str(err))
    args.specs = specs
    if args.general:
        args.num_images_per_prompt = args.num_images_per_prompt or 1
        args.batch_size = args.batch_size or 4
        if args.num_images_per_prompt < 1 or args.batch_size < 1:
            parser.error("--num_images_per_prompt and --batch_size must be >= 1.")
        if args.reference_images and not os.path.isdir(args.reference_images):
            parser.error(f"--reference_images {args.reference_images!r} is not a folder.")
        return args
    args.num_images_per_prompt = args.num_images_per_prompt or 50
    args.batch_size = args.batch_size or 100
    args.num_class_free_images = args.num_class_free_images or args.num_images_per_prompt
    if min(args.num_images_per_prompt, args.num_class_free_images) < 2:
        parser.error("--num_images_per_prompt and --num_class_free_images must be >= 2 (diversity needs pairs).")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


# ---- metrics ----------------------------------------------------------------------------------------------------
def normalised_entropy(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return max(0.0, float(-(p * p.log()).sum() / math.log(len(counts))))


def total_variation(counts_a, counts_b) -> float:
    """Total-variation distance between two histograms given as counts (normalised here): 0 same, 1 disjoint."""
    p, q = np.asarray(counts_a, dtype=np.float64), np.asarray(counts_b, dtype=np.float64)
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def class_counts(preds: torch.Tensor) -> torch.Tensor:
    return torch.bincount(preds.flatten().long(), minlength=NUM_CLASSES)


def teacher_distances(feats: list[torch.Tensor], preds: list[torch.Tensor], ref_feats: list[torch.Tensor],
                      ref_preds: list[torch.Tensor]) -> dict:
    """Distances of one pipeline's samples to the reference's (per prompt: ten class prompts, then the class-free
    one; both generated from the same prompts and seeds)."""
    per_class = [total_variation(class_counts(p), class_counts(r)) for p, r in zip(preds[:10], ref_preds[:10])]
    return {
        "fid_to_teacher": frechet_distance(torch.cat(feats[:10]).double().numpy(),
                                           torch.cat(ref_feats[:10]).double().numpy()),
        "class_hist_tv_to_teacher": float(np.mean(per_class)),
        "mode_hist_tv_to_teacher": total_variation(class_counts(preds[10]), class_counts(ref_preds[10])),
        "per_class_hist_tv_to_teacher": [round(v, 4) for v in per_class],
    }


@torch.no_grad()
def classify(classifier, images_by_prompt: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Classifier features and predicted classes (on the CPU), one tensor per evaluation prompt."""
    feats, preds = [], []
    for images in images_by_prompt:
        f = classifier.features(images.float() * 2 - 1)
        feats.append(f.cpu())
        preds.append(classifier.head(f).argmax(1).cpu())
    return feats, preds


def score_features(feats: list[torch.Tensor], preds: list[torch.Tensor], real_feats: torch.Tensor) -> dict:
    """Metrics of one pipeline's samples against the real digits and on their own."""
    class_feats = torch.cat(feats[:10])
    accuracy = [float((p == k).float().mean()) for k, p in enumerate(preds[:10])]
    counts = class_counts(preds[10])
    return {
        "digit_fid": frechet_distance(class_feats.double().numpy(), real_feats.double().numpy()),
        "prompt_accuracy": float(np.mean(accuracy)),
        "per_class_accuracy": [round(a, 4) for a in accuracy],
        "mode_entropy": normalised_entropy(counts),
        "modes_covered": int((counts.double() / counts.sum() >= MODE_SHARE).sum()),
        "class_free_class_counts": counts.tolist(),
        "diversity_raw": float(np.mean([mean_pairwise_distance(f) for f in feats])),
    }


def score_samples(classifier, images_by_prompt: list[torch.Tensor], real_feats: torch.Tensor) -> dict:
    """Metrics of one pipeline's samples (images in [0, 1], one tensor per evaluation prompt)."""
    return score_features(*classify(classifier, images_by_prompt), real_feats)


# ---- video metrics ----------------------------------------------------------------------------------------------
def direction_counts(directions: list[str]) -> np.ndarray:
    return np.array([directions.count(d) for d in DIRECTIONS], dtype=np.float64)


def score_clips(judged: list[dict], real_feats: torch.Tensor) -> dict:
    """Metrics of one pipeline's clips (one ``judge_clips`` dict per prompt of ``video_prompts()``) against the
    real moving digits and on their own."""
    scores = clip_scores(judged)
    frames = torch.cat([j["feats"].flatten(0, 1) for j in judged])
    return {
        "digit_fid": frechet_distance(frames.double().numpy(), real_feats.double().numpy()),
        "prompt_accuracy": float(np.mean(scores["accuracy"])),
        "direction_accuracy": float(np.mean(scores["direction"])),
        "temporal_consistency": float(np.mean(scores["consistency"])),
        "per_class_accuracy": [round(a, 4) for a in scores["per_class"]],
        "diversity_raw": float(np.mean([mean_pairwise_distance(j["feats"].mean(1)) for j in judged])),
    }


def video_teacher_distances(judged: list[dict], ref: list[dict]) -> dict:
    """Distances of one pipeline's clips to the reference's (same prompts and seeds): per-frame feature FID, and per
    prompt the TV distance of the frames' class histograms and of the clips' direction histograms."""
    class_tv = [total_variation(class_counts(j["preds"]), class_counts(r["preds"])) for j, r in zip(judged, ref)]
    direction_tv = [total_variation(direction_counts(j["directions"]), direction_counts(r["directions"]))
                    for j, r in zip(judged, ref)]
    return {
        "fid_to_teacher": frechet_distance(torch.cat([j["feats"].flatten(0, 1) for j in judged]).double().numpy(),
                                           torch.cat([r["feats"].flatten(0, 1) for r in ref]).double().numpy()),
        "class_hist_tv_to_teacher": float(np.mean(class_tv)),
        "direction_hist_tv_to_teacher": float(np.mean(direction_tv)),
        "per_class_hist_tv_to_teacher": [round(float(np.mean(class_tv[k * len(DIRECTIONS):(k + 1) * len(DIRECTIONS)])),
                                               4) for k in range(NUM_CLASSES)],
    }


def image_teacher_distances(result: dict, ref: dict) -> dict:
    return teacher_distances(result["feats"], result["preds"], ref["feats"], ref["preds"])


@dataclass(frozen=True)
class Mode:
    """What an image or a video evaluation reports: its metrics, columns and distances to the reference."""
    metric_keys: tuple
    teacher_keys: tuple
    columns: tuple
    distances: object  # (result, reference result) -> dict


IMAGE = Mode(METRIC_KEYS, TEACHER_METRIC_KEYS, COLUMNS, image_teacher_distances)
VIDEO = Mode(VIDEO_METRIC_KEYS, VIDEO_TEACHER_METRIC_KEYS, VIDEO_COLUMNS,
             lambda result, ref: video_teacher_distances(result["judged"], ref["judged"]))


# ---- multi-seed aggregation -------------------------------------------------------------------------------------
def _flatten(row: dict, prefix: str = "") -> dict:
    """Nested dicts (e.g. the demo's ``training_cost``) as ``parent.child`` keys."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate_reports(reports: list[dict]) -> dict:
    """Mean and sd of every numeric metric per pipeline over several report.json dicts (one per training seed).

    Returns ``{pipeline: {metric: {"mean", "sd", "n"}, ..., "num_runs", "failed_runs"}}``; sd is the sample standard
    deviation (ddof 1; None from a single value). Runs where a pipeline failed (``"error"``) are left out of its
    statistics and counted; a metric that is None in every run (the reference's distance to itself) stays None;
    strings are kept where all runs agree; lists are dropped.
    """
    names = list(dict.fromkeys(name for report in reports for name in report))
    out = {}
    for name in names:
        rows = [report[name] for report in reports if name in report]
        ok = [_flatten(row) for row in rows if "error" not in row]
        keys = list(dict.fromkeys([k for k in METRIC_KEYS + VIDEO_METRIC_KEYS + GENERAL_VIDEO_METRIC_KEYS
                                  if any(k in row for row in ok)]
                                  + [k for row in ok for k in row]))
        entry = {}
        for key in keys:
            values = [row.get(key) for row in ok]
            numbers = [v for v in values if _is_number(v)]
            if numbers:
                sd = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else None
                entry[key] = {"mean": float(np.mean(numbers)), "sd": sd, "n": len(numbers)}
            elif all(v is None for v in values):
                entry[key] = None
            elif all(isinstance(v, str) for v in values) and len(set(values)) == 1:
                entry[key] = values[0]
        out[name] = entry | {"num_runs": len(ok), "failed_runs": len(rows) - len(ok)}
    return out


# ---- generation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(pipe, spec: PipelineSpec, prompt: str, num: int, batch_size: int, seed: int, video: bool = False):
    """``num`` samples of ``prompt`` in [0, 1]: images (N, 3, H, W), or clips (N, F, 3, H, W) of a video pipeline,
    called with ``video_call_kwargs``. For video the prompt is repeated rather than passed with
    ``num_videos_per_prompt``, which CogVideoXPipeline ignores (it resets it to 1; diffusers 0.42)."""
    out = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        gen = torch.Generator(device="cpu").manual_seed(seed + start)
        call = dict(num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale, generator=gen,
                    output_type="pt")
        if video:
            samples = pipe([prompt] * n, **call, **video_call_kwargs(pipe)).frames
        else:
            samples = pipe(prompt, num_images_per_prompt=n, **call).images
        out.append(samples.float().clamp(0, 1).cpu())
    return torch.cat(out)


def sample_pipeline(spec: PipelineSpec, prompts: list[str], counts: list[int], args, device, video: bool = False):
    """Load ``spec`` with stock ``from_pretrained``, warm it up (one untimed sample), then draw ``counts[i]`` samples
    of ``prompts[i]`` with the seeds every pipeline shares (so distances to the reference compare like with like).
    Returns ``(pipe, samples per prompt, seconds spent sampling)``."""
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    pipe = DiffusionPipeline.from_pretrained(spec.path).to(device)
    pipe.set_progress_bar_config(disable=True)
    generate(pipe, spec, prompts[0], 1, 1, args.seed, video)  # warm-up (not timed)
    samples, seconds = [], 0.0
    for i, (prompt, num) in enumerate(zip(tqdm(prompts, desc=f"{spec.name} ({spec.nfe} NFE)"), counts)):
        synchronize(device)
        start = time.perf_counter()
        samples.append(generate(pipe, spec, prompt, num, args.batch_size, args.seed * 10000 + 1000 * i, video))
        synchronize(device)
        seconds += time.perf_counter() - start
    return pipe, samples, seconds


def pipeline_fields(pipe, spec: PipelineSpec) -> dict:
    """What report.json says of every pipeline besides its metrics."""
    return dict(pipeline_class=type(pipe).__name__, scheduler_class=type(pipe.scheduler).__name__, path=spec.path,
                num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale, nfe=spec.nfe)


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def record_failure(errors: dict, name: str, err: Exception) -> None:
    """One pipeline's failure: printed with its traceback and kept (``{name: message}``) for the report."""
    traceback.print_exc()
    errors[name] = f"{type(err).__name__}: {err}"
    print(f"{name}: FAILED ({errors[name]}); continuing with the others.", file=sys.stderr, flush=True)


def run_pipelines(specs: list[PipelineSpec], evaluate_one) -> tuple[dict, dict]:
    """``evaluate_one(spec)`` for every spec; a failure is recorded (``{name: message}``) and the rest still run,
    so hours of finished evaluation are never lost to the last pipeline."""
    results, errors = {}, {}
    for spec in specs:
        try:
            results[spec.name] = evaluate_one(spec)
        except Exception as err:  # any failure of one pipeline must not cost the others
            record_failure(errors, spec.name, err)
    return results, errors


def diversity_base(results: dict, reference: str) -> float:
    """Raw diversity that ``diversity`` is relative to: the reference's, or the first finished one's if it failed."""
    row = results.get(reference) or next(iter(results.values()), None)
    return row["metrics"]["diversity_raw"] if row else float("nan")


def build_report(specs: list[PipelineSpec], results: dict, errors: dict, reference: str, mode: Mode = IMAGE) -> dict:
    """report.json: per pipeline, the metrics (teacher-referenced first), or its error. ``results[name]`` holds
    ``metrics`` and what ``mode.distances`` reads (``feats`` and ``preds``; ``judged`` for video) of a finished
    pipeline."""
    ref, base = results.get(reference), diversity_base(results, reference)
    report = {}
    for spec in specs:
        if spec.name in errors:
            report[spec.name] = spec.error_row(errors[spec.name])
            continue
        r = results[spec.name]
        m = dict(r["metrics"], reference_pipeline=reference,
                 diversity=r["metrics"]["diversity_raw"] / base if base > 0 else float("nan"))
        if ref is None or spec.name == reference:  # no distances to itself, or to a reference that failed
            m.update(dict.fromkeys(mode.teacher_keys + ("per_class_hist_tv_to_teacher",)))
        else:
            m.update(mode.distances(r, ref))
        keys = mode.metric_keys
        report[spec.name] = {k: m[k] for k in keys} | {k: v for k, v in m.items() if k not in keys}
    return report


# ---- reports ----------------------------------------------------------------------------------------------------
def _cell(value, fmt: str, key: str) -> str:
    """One table cell: a number, ``mean ± sd`` for an aggregated ``{"mean", "sd", "n"}``, or ``-``."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        fmt = ".1f" if fmt == "d" else fmt
        if value["sd"] is None:  # a single run
            return f"{value['mean']:{fmt}} (n=1)"
        return f"{value['mean']:{fmt}} ± {value['sd']:{fmt}}"
    text = format(int(value), "d") if fmt == "d" else format(value, fmt)
    return f"{text}/10" if key == "modes_covered" else text


def _mean(value):
    return value["mean"] if isinstance(value, dict) else value


def _escape(text: str, limit: int = 100) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _rows(report: dict, reference: str | None, labels: dict | None = None, mode: Mode = IMAGE) -> list[str]:
    lines = []
    for name, r in report.items():
        steps, guidance, nfe = (_mean(r[k]) for k in ("num_inference_steps", "guidance_scale", "nfe"))
        head = f"| {(labels or {}).get(name, name)} | {steps:g} | {guidance:g} | {nfe:g} |"
        if "error" in r:
            lines.append(f"{head} failed: {_escape(r['error'])} |" + " - |" * (len(mode.columns) - 1))
            continue
        cells = ["ref." if name == reference and key in mode.teacher_keys else _cell(r.get(key), fmt, key)
                 for _, key, fmt in mode.columns]
        lines.append(f"{head} {' | '.join(cells)} |")
    return lines


def _header(mode: Mode = IMAGE) -> list[str]:
    return ["| pipeline | steps | guidance | NFE | " + " | ".join(h for h, _, _ in mode.columns) + " |",
            "|---" * (4 + len(mode.columns)) + "|"]


def _teacher_note(reference: str, failed: bool) -> str:
    if failed:
        return (f"The reference pipeline `{reference}` failed, so there are no teacher-referenced distances in this "
                "report.")
    return (f"FID to teacher, class-hist / mode-hist TV to teacher: distances to `{reference}`'s samples for the same "
            "prompts and seeds (classifier-feature FID over the ten class prompts; total-variation distance between "
            "predicted-class histograms, averaged over the class prompts, and for the class-free prompt: 0 = same, "
            "1 = disjoint; sampling noise alone makes them positive). These judge a distillation; digit-FID (real) "
            "can favour a student that departs from its teacher.")


def markdown_table(report: dict, real_row: dict, reference: str | None = None) -> str:
    """report.md: teacher-referenced columns first, then real-data FID and the rest; real train digits as a floor."""
    reference = reference or next(iter(report))
    lines = _header() + _rows(report, reference)
    real_cells = ["-", "-", "-", f"{real_row['digit_fid']:.2f}", "-", f"{real_row['mode_entropy']:.3f}",
                  f"{real_row['modes_covered']}/10", f"{real_row['diversity']:.3f}", "-"]
    lines.append("| real digits (train split, reference) | - | - | - | " + " | ".join(real_cells) + " |")
    done = [r for r in report.values() if "error" not in r]
    n, n_free = (done[0]["num_images_per_prompt"], done[0]["num_class_free_images"]) if done else ("?", "?")
    failed = reference not in report or "error" in report[reference]
    return ("\n".join(lines) + f"\n\n{_teacher_note(reference, failed)} {n} samples per class prompt, {n_free} for the "
            f"class-free prompt (mode entropy, modes covered: classes with >= {MODE_SHARE:.0%} of them); digit-FID "
            "(real) against the 360 held-out real digits (classifier features); diversity relative to "
            f"`{reference}`.\n")


def video_markdown_table(report: dict, real_row: dict, reference: str) -> str:
    """report.md of a video evaluation; real train clips as a floor."""
    lines = _header(VIDEO) + _rows(report, reference, mode=VIDEO)
    real = {**real_row, **dict.fromkeys(VIDEO_TEACHER_METRIC_KEYS + ("seconds_per_video",))}
    lines.append("| real moving digits (train split) | - | - | - | "
                 + " | ".join(_cell(real.get(key), fmt, key) for _, key, fmt in VIDEO_COLUMNS) + " |")
    done = [r for r in report.values() if "error" not in r]
    n, frames = (done[0]["num_videos_per_prompt"], done[0]["num_frames"]) if done else ("?", "?")
    failed = reference not in report or "error" in report[reference]
    note = ("The reference pipeline failed, so there are no distances to it." if failed else
            f"FID / class-hist / direction-hist TV to teacher: distances to `{reference}`'s clips for the same prompts "
            "and seeds (per-frame classifier features; per prompt, the TV distance between histograms of frame "
            "classes and of clip directions, averaged; sampling noise alone makes them positive).")
    return ("\n".join(lines) + f"\n\n{note} {n} clips of {frames} frames for each of the 40 prompts 'a handwritten "
            "digit <k> moving <left/right/up/down>'; digit-FID (real) against the frames of the held-out real "
            "moving digits; each frame judged by the digit classifier on the 8x8 window around the digit's centre "
            f"of ink; diversity relative to `{reference}`.\n")


def aggregate_markdown(aggregate: dict, num_reports: int) -> str:
    """report.md of ``--aggregate``: ``mean ± sd`` cells in the single-run column order."""
    references = {r.get("reference_pipeline") for r in aggregate.values()} - {None}
    reference = references.pop() if len(references) == 1 else None
    general = any("fd_dinov2_to_teacher" in r for r in aggregate.values())
    if general:
        mode = GENERAL_VIDEO if any("subject_consistency" in r for r in aggregate.values()) else GENERAL_IMAGE
    else:
        mode = VIDEO if any("direction_accuracy" in r for r in aggregate.values()) else IMAGE
    lines = _header(mode)
    for name, r in aggregate.items():
        if not r["num_runs"]:
            failed = f"| {name} | - | - | - | failed in all {r['failed_runs']} runs |"
            lines.append(failed + " - |" * (len(mode.columns) - 1))
            continue
        label = f"{name} ({r['failed_runs']} of {r['failed_runs'] + r['num_runs']} runs failed)"
        lines += _rows({name: r}, reference, {name: label} if r["failed_runs"] else None, mode)
    if general:
        return ("\n".join(lines) + f"\n\nmean ± sd (sample standard deviation) over {num_reports} reports.\n\n"
                + general_note(aggregate, reference) + "\n")
    note = (_teacher_note(reference, False) + " ") if reference else ""
    return ("\n".join(lines) + f"\n\nmean ± sd (sample standard deviation) over {num_reports} reports. {note}"
            "digit-FID (real) against the 360 held-out real digits.\n")


def write_aggregate(paths: list[str], output_dir: str) -> dict:
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    aggregate = aggregate_reports(reports)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(aggregate, f, indent=2)
    table = aggregate_markdown(aggregate, len(reports))
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"Wrote report.json and report.md (mean ± sd over {len(reports)} reports) to {output_dir}")
    return aggregate


def save_grid(path: str, names: list[str], specs: list[PipelineSpec], samples: dict, per_cell: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = evaluation_prompts()
    side = int(round(per_cell ** 0.5))
    fig, axes = plt.subplots(len(names), len(prompts), figsize=(1.1 * len(prompts), 1.25 * len(names) + 0.3),
                             squeeze=False)
    for r, (name, spec) in enumerate(zip(names, specs)):
        for c, prompt in enumerate(prompts):
            imgs = samples[name][c][:per_cell]
            if len(imgs) < per_cell:  # too few samples for a mosaic: show the first one
                imgs, s = imgs[:1], 1
            else:
                s = side
            imgs = torch.nn.functional.pad(imgs, (0, 1, 0, 1), value=0.5)  # a grey line between samples
            tile = imgs.reshape(s, s, *imgs.shape[1:]).permute(0, 3, 1, 4, 2)  # (s, H, s, W, C)
            tile = tile.reshape(s * imgs.shape[2], s * imgs.shape[3], imgs.shape[1])[:-1, :-1].numpy()
            ax = axes[r][c]
            ax.imshow(tile, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(prompt.rsplit(" ", 1)[-1] if prompt != CLASS_FREE_PROMPT else "class-free",
                             fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{name}\n{spec.nfe} NFE", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def video_call_kwargs(pipe) -> dict:
    """Frames and T5 length the transformer was built for: what the students' model cards pass (CogVideoXPipeline's
    own defaults are 49 frames and 226 tokens, the real CogVideoX's)."""
    config = pipe.transformer.config
    return {"num_frames": config.sample_frames, "max_sequence_length": config.max_text_seq_length}


def evaluate_video_pipeline(spec: PipelineSpec, classifier, real_feats: torch.Tensor, args, device) -> dict:
    """As ``evaluate_pipeline``, for a text-to-video pipeline on the moving-digits prompts: ``metrics``, ``clips``
    (per prompt) and ``judged`` (per prompt, for the distances to the reference)."""
    n = args.num_images_per_prompt
    prompts = [prompt for prompt, _, _ in video_prompts()]
    pipe, clips, seconds = sample_pipeline(spec, prompts, [n] * len(prompts), args, device, video=True)
    judged = [judge_clips(classifier, c) for c in clips]
    metrics = score_clips(judged, real_feats)
    metrics.update(
        **pipeline_fields(pipe, spec), seconds_per_video=seconds / sum(len(c) for c in clips),
        num_videos_per_prompt=n, num_videos=sum(len(c) for c in clips), num_frames=int(clips[0].shape[1]),
        resolution=list(clips[0].shape[-2:]),
    )
    print(f"{spec.name}: digit_fid {metrics['digit_fid']:.2f}, prompt_accuracy {metrics['prompt_accuracy']:.3f}, "
          f"direction_accuracy {metrics['direction_accuracy']:.3f}, temporal_consistency "
          f"{metrics['temporal_consistency']:.3f}, {metrics['seconds_per_video']:.4f} s/video", flush=True)
    return {"metrics": metrics, "clips": clips, "judged": judged}


def real_clips_floor(classifier, args, num_frames: int) -> tuple[torch.Tensor, dict]:
    """Frame features of the held-out real moving digits, and real train clips (``--num_images_per_prompt`` per
    prompt, the same digit and direction) scored like a pipeline."""
    held, _, _, _ = load_moving_digits("held_out", num_frames, seed=args.seed)
    real_feats = judge_clips(classifier, held.add(1).div(2))["feats"].flatten(0, 1)
    train, labels, directions, _ = load_moving_digits("train", num_frames, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    judged = []
    for _, label, moving in video_prompts():
        idx = torch.tensor([i for i, (k, d) in enumerate(zip(labels.tolist(), directions))
                            if k == label and d == moving])
        pick = idx[torch.randperm(len(idx), generator=gen)[:args.num_images_per_prompt]]
        judged.append(judge_clips(classifier, train[pick].add(1).div(2)))
    return real_feats, score_clips(judged, real_feats)


def save_video_samples(output_dir: str, names: list[str], results: dict) -> None:
    """``samples.png``: per pipeline (rows) and digit (columns; directions cycle) the first clip's first, middle and
    last frame; ``samples.gif``: the same clips animated, 4x enlarged."""
    from diffusers.utils import export_to_gif, make_image_grid
    from PIL import Image

    from dmdx.training.plumbing import video_strip

    picks = [4 * k + k % len(DIRECTIONS) for k in range(NUM_CLASSES)]  # digit k moving DIRECTIONS[k % 4]

    def pil(frame: torch.Tensor) -> Image.Image:
        image = Image.fromarray((frame.permute(1, 2, 0) * 255).round().byte().numpy())
        return image.resize((image.width * 4, image.height * 4), Image.NEAREST)

    clips = [[pil(frame) for frame in results[name]["clips"][p][0]] for name in names for p in picks]
    still = [make_image_grid([clip[0], clip[len(clip) // 2], clip[-1]], rows=1, cols=3) for clip in clips]
    make_image_grid(still, rows=len(names), cols=len(picks)).save(os.path.join(output_dir, "samples.png"))
    strip = video_strip(clips, lambda frames: make_image_grid(frames, rows=len(names), cols=len(picks)))
    export_to_gif(strip, os.path.join(output_dir, "samples.gif"), fps=4)


def main_video(args, classifier, device) -> tuple[dict, str, dict, bool]:
    with open(os.path.join(args.specs[0].path, "transformer", "config.json")) as f:  # the real clips' frame count
        num_frames = json.load(f)["sample_frames"]
    real_feats, real_row = real_clips_floor(classifier, args, num_frames)
    results, errors = run_pipelines(args.specs, lambda spec: evaluate_video_pipeline(spec, classifier, real_feats,
                                                                                     args, device))
    report = build_report(args.specs, results, errors, args.reference, VIDEO)
    base = diversity_base(results, args.reference)
    real_row["diversity"] = real_row["diversity_raw"] / base if base > 0 else float("nan")
    table = video_markdown_table(report, real_row, args.reference)
    done = [s.name for s in args.specs if s.name in results]
    if done:
        save_video_samples(args.output_dir, done, results)
    return report, table, errors, bool(done)


def evaluate_pipeline(spec: PipelineSpec, classifier, real_feats: torch.Tensor, args, device) -> dict:
    """Load, warm up, generate every prompt's samples (timed) and score them: ``metrics``, ``images``, ``feats``,
    ``preds`` (the last two feed the distances to the reference)."""
    prompts, n, n_free = evaluation_prompts(), args.num_images_per_prompt, args.num_class_free_images
    counts = [n_free if prompt == CLASS_FREE_PROMPT else n for prompt in prompts]
    pipe, images_by_prompt, seconds = sample_pipeline(spec, prompts, counts, args, device)
    feats, preds = classify(classifier, [x.to(device) for x in images_by_prompt])
    metrics = score_features(feats, preds, real_feats)
    metrics.update(
        **pipeline_fields(pipe, spec), seconds_per_image=seconds / sum(len(x) for x in images_by_prompt),
        num_images_per_prompt=n, num_class_free_images=n_free, resolution=list(images_by_prompt[0].shape[-2:]),
    )
    print(f"{spec.name}: digit_fid {metrics['digit_fid']:.2f}, prompt_accuracy {metrics['prompt_accuracy']:.3f}, "
          f"mode_entropy {metrics['mode_entropy']:.3f}, modes_covered {metrics['modes_covered']}, "
          f"{metrics['seconds_per_image']:.4f} s/image", flush=True)
    return {"metrics": metrics, "images": images_by_prompt, "feats": feats, "preds": preds}


def real_digits_floor(classifier, args, device) -> tuple[torch.Tensor, dict]:
    """Features of the held-out real digits, and real train digits scored like a pipeline (the metric's floor at
    this sample size)."""
    n, n_free = args.num_images_per_prompt, args.num_class_free_images
    with torch.no_grad():
        held_images, _ = load_digits_split("held_out")
        real_feats = classifier.features(held_images.to(device)).cpu()
        train_images, train_labels = load_digits_split("train")
        gen = torch.Generator().manual_seed(args.seed)
        by_prompt = []
        for k in range(10):
            idx = torch.nonzero(train_labels == k).flatten()
            by_prompt.append(train_images[idx[torch.randperm(len(idx), generator=gen)[:n]]].add(1).div(2))
        by_prompt.append(train_images[torch.randperm(len(train_images), generator=gen)[:n_free]].add(1).div(2))
    return real_feats, score_samples(classifier, [x.to(device) for x in by_prompt], real_feats)


def main_image(args, classifier, device) -> tuple[dict, str, dict, bool]:
    real_feats, real_row = real_digits_floor(classifier, args, device)
    results, errors = run_pipelines(args.specs, lambda spec: evaluate_pipeline(spec, classifier, real_feats, args,
                                                                               device))
    report = build_report(args.specs, results, errors, args.reference)
    base = diversity_base(results, args.reference)
    real_row["diversity"] = real_row["diversity_raw"] / base if base > 0 else float("nan")
    done = [s for s in args.specs if s.name in results]
    if done:
        save_grid(os.path.join(args.output_dir, "samples.png"), [s.name for s in done], done,
                  {s.name: results[s.name]["images"] for s in done}, args.grid_images_per_cell)
    return report, markdown_table(report, real_row, args.reference), errors, bool(done)


# ---- general mode: any prompts, any teacher ---------------------------------------------------------------------
GENERAL_TEACHER_KEYS = ("fd_dinov2_to_teacher", "fd_clip_to_teacher")
GENERAL_METRIC_KEYS = GENERAL_TEACHER_KEYS + ("fd_dinov2_real", "clip_score", "pickscore", "diversity", "nfe",
                                              "seconds_per_image", "peak_memory_gb")
GENERAL_VIDEO_METRIC_KEYS = GENERAL_TEACHER_KEYS + ("fd_dinov2_real", "clip_score", "pickscore",
                                                    "subject_consistency", "motion_magnitude", "diversity", "nfe",
                                                    "seconds_per_video", "peak_memory_gb")
GENERAL_COLUMNS = (
    ("FD_DINOv2 to teacher ↓", "fd_dinov2_to_teacher", ".2f"),
    ("FD_CLIP to teacher ↓", "fd_clip_to_teacher", ".3f"),
    ("FD_DINOv2 to real ↓", "fd_dinov2_real", ".2f"),
    ("CLIP score ↑", "clip_score", ".2f"),
    ("PickScore ↑", "pickscore", ".3f"),
    ("diversity (rel.)", "diversity", ".3f"),
    ("s / image", "seconds_per_image", ".4f"),
    ("peak GiB", "peak_memory_gb", ".2f"),
)
GENERAL_VIDEO_COLUMNS = GENERAL_COLUMNS[:5] + (
    ("subject consistency ↑", "subject_consistency", ".4f"),
    ("motion (rel.)", "motion_magnitude", ".3f"),
    ("diversity (rel.)", "diversity", ".3f"),
    ("s / video", "seconds_per_video", ".4f"),
    ("peak GiB", "peak_memory_gb", ".2f"),
)
GENERAL_IMAGE = Mode(GENERAL_METRIC_KEYS, GENERAL_TEACHER_KEYS, GENERAL_COLUMNS, None)
GENERAL_VIDEO = Mode(GENERAL_VIDEO_METRIC_KEYS, GENERAL_TEACHER_KEYS, GENERAL_VIDEO_COLUMNS, None)
SAMPLES_DIR = "samples"
SETTINGS = "settings.json"


def _first_caption(value) -> str | None:
    """A caption cell: a string, or a list of captions (COCO has five per image): its first."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, dict):  # a caption record (Karpathy's format keeps the text under "raw")
        value = next((value[k] for k in ("raw", "caption", "text") if value.get(k)), None)
    return None if value is None else " ".join(str(value).split())


def load_prompt_set(args) -> tuple[list[str], str]:
    """The prompts of the general mode and a description of where they came from (for the report).

    ``--prompts_file``: one prompt per line, or JSONL (``.jsonl``) with a ``prompt`` or ``text`` field per line.
    ``--dataset_name``: streamed with ``datasets`` (``streaming=True``) and reduced to ``--caption_column`` before any
    row is read, so an image column is never downloaded or decoded; the first ``--max_prompts`` non-empty captions."""
    import itertools

    from dmdx.training.errors import UsageError

    if args.prompts_file:
        prompts = []
        with open(args.prompts_file, encoding="utf-8") as f:
            if args.prompts_file.endswith(".jsonl"):
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
                    if text is None:
                        raise UsageError(f"--prompts_file {args.prompts_file!r} line {i}: no 'prompt' or 'text' "
                                         "field.")
                    prompts.append(_first_caption(text))
            else:
                prompts = [" ".join(line.split()) for line in f]
        prompts = [p for p in prompts if p][:args.max_prompts]
        source = os.path.basename(args.prompts_file)
    else:
        from datasets import load_dataset

        name, ext = args.dataset_name, os.path.splitext(args.dataset_name)[1].lstrip(".")

        def stream(**kwargs):
            if os.path.isfile(name) and ext in ("json", "jsonl", "csv", "parquet"):
                return load_dataset({"jsonl": "json"}.get(ext, ext), data_files=name, split=args.split,
                                    streaming=True, **kwargs)
            return load_dataset(name, args.dataset_config_name, split=args.split, streaming=True, **kwargs)

        try:
            try:  # parquet data (most Hub data sets) reads only this column's bytes from the files
                dataset = stream(columns=[args.caption_column])
            except (TypeError, ValueError):  # a builder without a columns option: select_columns below
                dataset = stream()
        except Exception as err:  # noqa: BLE001 (missing, offline, bad split: named with its flag)
            raise UsageError(f"--dataset_name {name!r} (split {args.split!r}) could not be streamed: "
                             f"{type(err).__name__}: {err}") from err
        columns = dataset.column_names
        if columns is not None and args.caption_column not in columns:
            raise UsageError(f"--caption_column {args.caption_column!r} is not a column of {name} ({columns}).")
        rows = dataset.select_columns([args.caption_column])  # the other columns are never decoded
        captions = (_first_caption(row[args.caption_column]) for row in rows)
        prompts = list(itertools.islice((c for c in captions if c), args.max_prompts))
        source = (f"{os.path.basename(name) if os.path.isfile(name) else name}"
                  f"{'/' + args.dataset_config_name if args.dataset_config_name else ''} [{args.split}], column "
                  f"{args.caption_column!r}")
    if not prompts:
        raise UsageError(f"No prompts in {source}.")
    return prompts, f"{source}, {'first ' if args.max_prompts else ''}{len(prompts)} prompts"


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The noise seed of one (prompt, sample index): the same for every pipeline, independent of batching."""
    return seed * 1_000_000_007 + prompt_index * 1000 + sample_index


def spec_settings(spec: PipelineSpec, args) -> dict:
    """What a pipeline's samples depend on; a folder of samples made with other settings is never reused."""
    return {"path": spec.path, "num_inference_steps": spec.num_inference_steps,
            "guidance_scale": spec.guidance_scale, "call_kwargs": spec.call_kwargs,
            "from_pretrained_kwargs": spec.from_pretrained_kwargs, "torch_dtype": spec.torch_dtype or args.torch_dtype,
            "variant": spec.variant or args.variant, "seed": args.seed if spec.seed is None else spec.seed}


def sample_name(prompt_index: int, sample_index: int) -> str:
    return f"p{prompt_index:05d}_s{sample_index:03d}"


def read_metadata(folder: str) -> dict:
    """``{(prompt_index, sample_index): record}`` of the samples written to ``folder`` (every process's
    ``metadata*.jsonl``), keeping only those whose files exist: a sample is done once its record is written, and the
    record is written after its files."""
    import glob

    done = {}
    for path in sorted(glob.glob(os.path.join(folder, "metadata*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption
                    continue
                if os.path.isfile(os.path.join(folder, record["file"])):
                    done[(record["prompt_index"], record["sample_index"])] = record
    return done


def _save_sample(folder: str, name: str, sample, video: bool, fps: int = 8) -> dict:
    """One image as ``name.png``; one clip as ``name/000.png ...`` plus ``name.gif``. Written to a temporary name
    first, so an interrupted write never looks finished."""
    from diffusers.utils import export_to_gif

    if not video:
        tmp = os.path.join(folder, f".{name}.png")
        sample.convert("RGB").save(tmp, format="PNG")
        os.replace(tmp, os.path.join(folder, f"{name}.png"))
        return {"file": f"{name}.png"}
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    for t, frame in enumerate(sample):
        frame.convert("RGB").save(os.path.join(folder, name, f"{t:03d}.png"))
    tmp = os.path.join(folder, f".{name}.gif")
    export_to_gif(list(sample), tmp, fps=fps)
    os.replace(tmp, os.path.join(folder, f"{name}.gif"))
    return {"file": f"{name}.gif", "frames": name, "num_frames": len(sample)}


def load_sample(folder: str, record: dict, video: bool):
    """A written sample: a PIL image, or a clip's list of PIL frames."""
    from PIL import Image

    def rgb(path):
        with Image.open(path) as im:
            return im.convert("RGB")

    if not video:
        return rgb(os.path.join(folder, record["file"]))
    frames = os.path.join(folder, record["frames"])
    return [rgb(os.path.join(frames, f"{t:03d}.png")) for t in range(record["num_frames"])]


def general_call(pipe, spec: PipelineSpec, prompts: list[str], seeds: list[int], video: bool) -> list:
    """One batch through the pipeline as a user calls it: one prompt and one CPU generator per sample (so a
    sample's noise depends on its seed alone, not on its batch), PIL output. A video pipeline made by the digits
    demo gets the frame count and text length its transformer was built for unless ``call_kwargs`` give them."""
    call = dict(num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds], output_type="pil")
    if video and type(pipe).__name__ == "CogVideoXPipeline":
        call.update(video_call_kwargs(pipe))
    call.update(spec.call_kwargs)
    with torch.no_grad():
        out = pipe(prompt=list(prompts), **call)
    return list(out.frames) if video else list(out.images)


def generate_samples(spec: PipelineSpec, prompts: list[str], args, state, video: bool) -> int:
    """Write every (prompt, sample index) of ``spec`` not yet on disk, this process's share of them
    (``split_between_processes``). Returns how many this process wrote."""
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    folder = os.path.join(args.output_dir, SAMPLES_DIR, spec.name)
    done = read_metadata(folder)
    todo = [(p, s) for p in range(len(prompts)) for s in range(args.num_images_per_prompt) if (p, s) not in done]
    if state.is_main_process:
        print(f"{spec.name}: {len(done)} samples on disk, {len(todo)} to generate", flush=True)
    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    with state.split_between_processes(batches) as mine:
        mine = list(mine)
    if not mine:
        return 0
    settings = spec_settings(spec, args)
    device = torch.device(args.device) if args.device else state.device
    kwargs = dict(spec.from_pretrained_kwargs)
    if settings["variant"]:
        kwargs["variant"] = settings["variant"]
    pipe = DiffusionPipeline.from_pretrained(spec.path, torch_dtype=DTYPES[settings["torch_dtype"]], **kwargs)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    cuda = device.type == "cuda"
    seed = settings["seed"]
    p0, s0 = mine[0][0]
    general_call(pipe, spec, [prompts[p0]], [sample_seed(seed, p0, s0)], video)  # warm-up, not timed
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    written = 0
    with open(os.path.join(folder, f"metadata.rank{state.process_index}.jsonl"), "a", encoding="utf-8") as meta:
        for batch in tqdm(mine, desc=f"{spec.name} ({spec.nfe} NFE)", disable=not state.is_local_main_process):
            seeds = [sample_seed(seed, p, s) for p, s in batch]
            synchronize(device)
            start = time.perf_counter()
            samples = general_call(pipe, spec, [prompts[p] for p, _ in batch], seeds, video)
            synchronize(device)
            seconds = (time.perf_counter() - start) / len(batch)
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
            for (p, s), sample, sd in zip(batch, samples, seeds):
                record = _save_sample(folder, sample_name(p, s), sample, video)
                record.update(prompt_index=p, sample_index=s, prompt=prompts[p], seed=sd, seconds=seconds,
                              peak_memory_gb=peak)
                meta.write(json.dumps(record) + "\n")
                meta.flush()
                written += 1
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    return written


def prepare_output(args, prompts: list[str], source: str, state) -> None:
    """``prompts.json`` and each pipeline's ``settings.json`` in ``--output_dir``; a folder holding samples of other
    prompts or settings is refused (``UsageError``) rather than mixed into the report."""
    from dmdx.training.errors import UsageError

    path = os.path.join(args.output_dir, "prompts.json")
    wanted = {"prompt_set": source, "prompts": prompts, "num_images_per_prompt": args.num_images_per_prompt}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("prompts") != prompts:
            raise UsageError(f"--output_dir {args.output_dir!r} holds samples of other prompts ({old.get('prompt_set')}"
                             "); give another --output_dir.")
    for spec in args.specs:
        settings_path = os.path.join(args.output_dir, SAMPLES_DIR, spec.name, SETTINGS)
        if os.path.isfile(settings_path):
            with open(settings_path, encoding="utf-8") as f:
                old = json.load(f)
            new = spec_settings(spec, args)
            if old != new:
                diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
                raise UsageError(f"--output_dir {args.output_dir!r} holds samples of {spec.name!r} made with other "
                                 f"settings {diff} (was, now); give another --output_dir or another name.")
    state.wait_for_everyone()
    if state.is_main_process:
        for spec in args.specs:
            folder = os.path.join(args.output_dir, SAMPLES_DIR, spec.name)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, SETTINGS), "w", encoding="utf-8") as f:
                json.dump(spec_settings(spec, args), f, indent=2)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(wanted, f, indent=2)
    state.wait_for_everyone()


def merge_metadata(folder: str) -> dict:
    """Every process's records as one ``metadata.jsonl`` sorted by (prompt, sample); returns them."""
    import glob

    done = read_metadata(folder)
    tmp = os.path.join(folder, ".metadata.jsonl")
    with open(tmp, "w", encoding="utf-8") as f:
        for key in sorted(done):
            f.write(json.dumps(done[key]) + "\n")
    os.replace(tmp, os.path.join(folder, "metadata.jsonl"))
    for path in glob.glob(os.path.join(folder, "metadata.rank*.jsonl")):
        os.remove(path)
    return done


class MetricModels:
    """The metric models of a general evaluation, loaded once (main process)."""

    def __init__(self, args, device):
        from dmdx.pipelines.metrics import CLIPFeatures, DINOv2Features, PickScore

        common = dict(device=device, batch_size=args.metric_batch_size)
        self.dinov2 = DINOv2Features(args.dinov2_model, **common)
        self.clip = CLIPFeatures(args.clip_model, **common)
        self.pickscore = (PickScore(args.pickscore_model, args.pickscore_processor, **common)
                          if args.pickscore_model else None)
        self._text = {}

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        key = tuple(prompts)
        if key not in self._text:
            self._text[key] = self.clip.text_features(prompts)
        return self._text[key]


def sample_features(folder: str, records: dict, prompts: list[str], models: MetricModels, video: bool,
                    chunk: int = 64) -> dict:
    """Features and per-sample scores of one pipeline's samples read back from disk (in chunks, so 10k images never
    sit in memory at once). Video: every frame is scored; per clip, subject consistency and motion magnitude."""
    from dmdx.pipelines.metrics import clip_score, motion_magnitude, subject_consistency

    text = models.text_features(prompts)
    keys = sorted(records)
    dino, clip, clip_scores, picks, consistency, motion, video_dino = [], [], [], [], [], [], []
    for start in range(0, len(keys), chunk):
        part = keys[start:start + chunk]
        samples = [load_sample(folder, records[k], video) for k in part]
        frames = [f for clip_frames in samples for f in clip_frames] if video else samples
        owner = [p for (p, _), s in zip(part, samples) for _ in (s if video else [s])]  # prompt of each image
        d = models.dinov2(frames)
        c = models.clip.image_features(frames)
        dino.append(d)
        clip.append(c)
        clip_scores.append(clip_score(c, text[owner]))
        if models.pickscore is not None:
            picks.append(models.pickscore(frames, [prompts[p] for p in owner]))
        if video:
            offsets = np.cumsum([0] + [len(s) for s in samples])
            for i, s in enumerate(samples):
                video_dino.append(d[offsets[i]:offsets[i + 1]])
                consistency.append(subject_consistency(video_dino[-1]))
                motion.append(motion_magnitude(s))
    out = {"keys": keys, "dinov2": torch.cat(dino), "clip": torch.cat(clip),
           "clip_score": torch.cat(clip_scores), "pickscore": torch.cat(picks) if picks else None}
    if video:
        out.update(subject_consistency=consistency, motion=motion,
                   video_mean=torch.stack([f.mean(0) for f in video_dino]))  # one DINOv2 vector per video
    return out


def reference_image_features(folder: str, models: MetricModels, chunk: int = 64) -> torch.Tensor:
    """DINOv2 features of every image file in ``--reference_images`` (sorted names; any PIL-readable format)."""
    from PIL import Image

    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(exts))
    feats = []
    for start in range(0, len(names), chunk):
        images = []
        for n in names[start:start + chunk]:
            with Image.open(os.path.join(folder, n)) as im:
                images.append(im.convert("RGB"))
        feats.append(models.dinov2(images))
    if not feats:
        raise ValueError(f"--reference_images {folder!r} holds no images ({', '.join(exts)}).")
    return torch.cat(feats)


def general_metrics(spec: PipelineSpec, feats: dict, records: dict, args, real: torch.Tensor | None,
                    video: bool) -> dict:
    """One pipeline's own metrics (the reference-relative ones are added by ``general_report``)."""
    from dmdx.pipelines.metrics import diversity

    n = args.num_images_per_prompt
    per_prompt = feats["video_mean"] if video else feats["dinov2"]
    groups = [per_prompt[[i for i, (p, _) in enumerate(feats["keys"]) if p == q]]
              for q in sorted({p for p, _ in feats["keys"]})]
    seconds = [r["seconds"] for r in records.values() if r.get("seconds") is not None]
    peaks = [r["peak_memory_gb"] for r in records.values() if r.get("peak_memory_gb") is not None]
    metrics = {
        "fd_dinov2_real": frechet_distance(feats["dinov2"].numpy(), real.numpy()) if real is not None else None,
        "clip_score": float(feats["clip_score"].mean()),
        "pickscore": float(feats["pickscore"].mean()) if feats["pickscore"] is not None else None,
        "diversity_raw": diversity(groups) if n >= 2 else None,
        ("seconds_per_video" if video else "seconds_per_image"): float(np.mean(seconds)) if seconds else None,
        "peak_memory_gb": max(peaks) if peaks else None,
        "num_prompts": len({p for p, _ in feats["keys"]}), "num_images_per_prompt": n,
        ("num_videos" if video else "num_images"): len(feats["keys"]),
    }
    if video:
        metrics.update(subject_consistency=float(np.mean(feats["subject_consistency"])),
                       motion_magnitude_raw=float(np.mean(feats["motion"])))
    first = next(iter(records.values()))
    metrics.update(pipeline_class=pipeline_class_name(spec.path), path=spec.path,
                   num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale, nfe=spec.nfe,
                   torch_dtype=spec.torch_dtype or args.torch_dtype, variant=spec.variant or args.variant,
                   seed=args.seed if spec.seed is None else spec.seed,
                   call_kwargs=spec.call_kwargs or None, samples_dir=f"{SAMPLES_DIR}/{spec.name}")
    if video:
        metrics["num_frames"] = first["num_frames"]
    return metrics


def general_report(specs: list[PipelineSpec], results: dict, errors: dict, reference: str, args,
                   prompt_set: str, video: bool) -> dict:
    """report.json of the general mode: per pipeline, the metrics (distances to the reference first), or its
    error. Relative diversity and motion are ratios to the reference's (1.0: as the teacher)."""
    mode = GENERAL_VIDEO if video else GENERAL_IMAGE
    ref = results.get(reference)
    report = {}
    for spec in specs:
        if spec.name in errors:
            report[spec.name] = spec.error_row(errors[spec.name])
            continue
        r = results[spec.name]
        m = dict(r["metrics"], reference_pipeline=reference, prompt_set=prompt_set, dinov2_model=args.dinov2_model,
                 clip_model=args.clip_model, pickscore_model=args.pickscore_model)
        base = ref["metrics"] if ref else None
        m["diversity"] = (m["diversity_raw"] / base["diversity_raw"]
                          if base and m["diversity_raw"] is not None and base["diversity_raw"] else None)
        if video:
            m["motion_magnitude"] = (m["motion_magnitude_raw"] / base["motion_magnitude_raw"]
                                     if base and base["motion_magnitude_raw"] else None)
        if ref is None or spec.name == reference:
            m.update(dict.fromkeys(GENERAL_TEACHER_KEYS))
        else:
            m["fd_dinov2_to_teacher"] = frechet_distance(r["feats"]["dinov2"].numpy(), ref["feats"]["dinov2"].numpy())
            m["fd_clip_to_teacher"] = frechet_distance(r["feats"]["clip"].numpy(), ref["feats"]["clip"].numpy())
        keys = mode.metric_keys
        report[spec.name] = {k: m.get(k) for k in keys} | {k: v for k, v in m.items() if k not in keys}
    return report


def general_note(report: dict, reference: str | None, device: str | None = None) -> str:
    done = [r for r in report.values() if "error" not in r]
    if not done:
        return "Every pipeline failed."
    r = done[0]
    video = "num_videos" in r or "subject_consistency" in r
    unit = "clips" if video else "samples"
    per_prompt, total = (_mean(r.get(k)) for k in ("num_images_per_prompt", "num_videos" if video else "num_images"))
    lines = [f"Prompt set: {r.get('prompt_set')}; {per_prompt:g} {unit} per prompt ({total:g} in all), the same seed "
             "per (prompt, sample) for every pipeline."]
    if reference and reference in report and "error" not in report[reference]:
        lines.append(f"FD to teacher: Frechet distance between the features of each pipeline's {unit} and "
                     f"`{reference}`'s{' (every frame)' if video else ''}, in DINOv2 (`{r.get('dinov2_model')}`) and "
                     f"CLIP image (`{r.get('clip_model')}`) features; sampling noise alone makes it positive, so "
                     "compare pipelines at the same sample counts (a second seed of the teacher measures that "
                     f"floor). Diversity: mean pairwise DINOv2 distance among one prompt's {unit}, relative to "
                     f"`{reference}`.")
    else:
        lines.append(f"The reference pipeline `{reference}` failed, so there are no distances to it.")
    lines.append(f"CLIP score: 100 * max(cos, 0) of image and prompt embeddings (`{r.get('clip_model')}`)"
                 + (f"; PickScore: `{r.get('pickscore_model')}`" if r.get("pickscore_model") else "; PickScore off")
                 + ".")
    if video:
        lines.append("Subject consistency: VBench's (mean DINOv2 cosine of each frame to the previous and to the "
                     "first); motion: mean absolute difference of consecutive frames, relative to the reference (a "
                     "frozen clip has perfect consistency and zero motion).")
    lines.append("s / " + ("video" if video else "image") + ": measured in this run after a warm-up call"
                 + (f" on {device}" if device else "") + "; peak GiB: CUDA peak allocated memory while sampling.")
    return "\n".join(lines)


def general_markdown(report: dict, reference: str, device: str | None = None) -> str:
    video = any("subject_consistency" in r for r in report.values())
    mode = GENERAL_VIDEO if video else GENERAL_IMAGE
    lines = _header(mode) + _rows(report, reference, mode=mode)
    return "\n".join(lines) + "\n\n" + general_note(report, reference, device) + "\n"


def save_general_samples(output_dir: str, names: list[str], prompts: list[str], video: bool,
                         max_prompts: int = 8) -> None:
    """``samples.png``: rows = pipelines, columns = the first prompts, each pipeline's sample 0 (video: first,
    middle and last frame); video also ``samples.gif``, the clips animated side by side."""
    from diffusers.utils import export_to_gif, make_image_grid

    from dmdx.training.plumbing import video_strip

    cols = list(range(min(max_prompts if not video else 4, len(prompts))))
    tiles = []
    for name in names:
        folder = os.path.join(output_dir, SAMPLES_DIR, name)
        records = read_metadata(folder)
        for p in cols:
            tiles.append(load_sample(folder, records[(p, 0)], video))
    side = 128 if video else 256

    def fit(im):
        scale = side / max(im.size)
        return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))

    def labelled(grid):  # the pipeline's name left of its row, the prompt above its column
        from PIL import Image, ImageDraw

        left, top = 160, 24
        out = Image.new("RGB", (grid.width + left, grid.height + top), "white")
        out.paste(grid, (left, top))
        draw = ImageDraw.Draw(out)
        for r, name in enumerate(names):
            draw.text((6, top + (r + 0.5) * grid.height / len(names)), name[:24], fill="black")
        width = grid.width / len(cols)
        for c, p in enumerate(cols):
            text = prompts[p] if len(prompts[p]) <= width // 7 else prompts[p][:int(width // 7) - 3] + "..."
            draw.text((left + c * width + 4, 6), text, fill="black")
        return out

    if not video:
        labelled(make_image_grid([fit(t) for t in tiles], rows=len(names), cols=len(cols))).save(
            os.path.join(output_dir, "samples.png"))
        return
    clips = [[fit(f) for f in clip] for clip in tiles]
    still = [make_image_grid([c[0], c[len(c) // 2], c[-1]], rows=1, cols=3) for c in clips]
    labelled(make_image_grid(still, rows=len(names), cols=len(cols))).save(os.path.join(output_dir, "samples.png"))
    strip = video_strip(clips, lambda frames: make_image_grid(frames, rows=len(names), cols=len(cols)))
    export_to_gif(strip, os.path.join(output_dir, "samples.gif"), fps=8)


def main_general(args) -> dict | None:
    """Generate (sharded over ``accelerate launch`` processes, resuming what is on disk), then on the main process
    score every pipeline's samples from disk and write report.json, report.md and samples.png."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from dmdx.training.errors import UsageError

    try:
        prompts, source = load_prompt_set(args)
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or args.device == "cpu")
        os.makedirs(args.output_dir, exist_ok=True)
        prepare_output(args, prompts, source, state)
    except UsageError as err:  # as argparse reports a bad flag: the message, status 2, nothing loaded
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    video = args.video
    errors = {}
    for spec in args.specs:
        try:
            generate_samples(spec, prompts, args, state, video)
        except Exception as err:  # one pipeline's failure must not cost the others
            record_failure(errors, spec.name, err)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    device = torch.device(args.device) if args.device else state.device
    expected = len(prompts) * args.num_images_per_prompt
    records = {}
    for spec in args.specs:
        folder = os.path.join(args.output_dir, SAMPLES_DIR, spec.name)
        records[spec.name] = merge_metadata(folder)
        if spec.name not in errors and len(records[spec.name]) < expected:
            errors[spec.name] = (f"RuntimeError: {expected - len(records[spec.name])} of {expected} samples are "
                                 "missing (failed on another process?); run again to resume.")
    models = MetricModels(args, device)
    real = reference_image_features(args.reference_images, models) if args.reference_images else None
    results = {}
    for spec in args.specs:
        if spec.name in errors:
            continue
        try:
            folder = os.path.join(args.output_dir, SAMPLES_DIR, spec.name)
            feats = sample_features(folder, records[spec.name], prompts, models, video)
            results[spec.name] = {"feats": feats,
                                  "metrics": general_metrics(spec, feats, records[spec.name], args, real, video)}
        except Exception as err:  # noqa: BLE001 (as above)
            record_failure(errors, spec.name, err)
    report = general_report(args.specs, results, errors, args.reference, args, source, video)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = general_markdown(report, args.reference, device_name)
    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(table)
    done = [s.name for s in args.specs if s.name in results]
    if done:
        save_general_samples(args.output_dir, done, prompts, video)
    print(table)
    print(f"Wrote report.json, report.md{', samples.png' if done else ''}{', samples.gif' if done and video else ''}"
          f" to {args.output_dir}")
    if errors:
        raise SystemExit(f"{len(errors)} of {len(args.specs)} pipelines failed ({', '.join(errors)}); report.json "
                         "holds the others and marks these with 'error'.")
    return report


def main(argv=None):
    args = parse_args(argv)
    if args.aggregate is not None:
        return write_aggregate(args.aggregate, args.output_dir)
    if args.general:
        return main_general(args)
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device(args.device)
    classifier = load_classifier(args.classifier_dir, device=device)
    if args.video:
        report, table, errors, any_done = main_video(args, classifier, device)
    else:
        report, table, errors, any_done = main_image(args, classifier, device)
    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(table)
    print(table)
    samples = " and samples.png" + (", samples.gif" if args.video else "")
    print(f"Wrote report.json, report.md{samples if any_done else ''} to {args.output_dir}")
    if errors:
        raise SystemExit(f"{len(errors)} of {len(args.specs)} pipelines failed ({', '.join(errors)}); report.json "
                         "holds the others and marks these with 'error'.")
    return report


if __name__ == "__main__":
    main()
