"""Evaluate text-to-image pipelines trained on the digits: distance to the teacher, quality, prompt adherence, mode
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
from dataclasses import dataclass

import numpy as np
import torch

from dmdx.pipelines.metrics import frechet_distance, mean_pairwise_distance

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


# text-to-video pipelines, scored on the moving digits (model_index.json's _class_name)
VIDEO_PIPELINES = ("CogVideoXPipeline",)
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
    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f).get("_class_name", "")


@dataclass
class PipelineSpec:
    name: str
    path: str
    num_inference_steps: int
    guidance_scale: float

    @property
    def nfe(self) -> int:
        return self.num_inference_steps * (2 if self.guidance_scale > 1.0 else 1)


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Distance to the teacher, digit-FID, prompt accuracy, mode coverage, "
                                                 "diversity and speed of digits pipelines.")
    parser.add_argument("--pipeline", action="append", type=parse_pipeline_arg, default=[],
                        metavar="NAME=PATH:STEPS:GUIDANCE",
                        help="A pipeline folder with its step count and guidance scale (repeatable).")
    parser.add_argument("--spec", default=None, help="JSON file: a list of {name, path, num_inference_steps, "
                                                     "guidance_scale} (appended after --pipeline entries).")
    parser.add_argument("--reference", default=None, metavar="NAME",
                        help="The pipeline whose samples the teacher-referenced distances and relative diversity "
                             "are measured against (default: the one named 'teacher', else the first).")
    parser.add_argument("--aggregate", nargs="+", default=None, metavar="REPORT_JSON",
                        help="Instead of evaluating: combine several report.json files (e.g. one per training seed) "
                             "into mean ± sd per metric, written to --output_dir.")
    parser.add_argument("--output_dir", default="eval_output")
    parser.add_argument("--num_images_per_prompt", type=int, default=50)
    parser.add_argument("--num_class_free_images", type=int, default=None,
                        help="Samples of the class-free prompt (mode coverage is noisy with few; default: "
                             "--num_images_per_prompt).")
    parser.add_argument("--batch_size", type=int, default=100, help="Images per pipeline call.")
    parser.add_argument("--grid_images_per_cell", type=int, default=4, choices=[1, 4, 9],
                        help="Samples shown per (pipeline, prompt) cell of samples.png.")
    parser.add_argument("--classifier_dir", default=ASSETS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    args = parser.parse_args(argv)
    specs = list(args.pipeline)
    if args.spec:
        with open(args.spec) as f:
            specs += [PipelineSpec(d["name"], d["path"], int(d["num_inference_steps"]), float(d["guidance_scale"]))
                      for d in json.load(f)]
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
    for s in specs:
        if not os.path.isfile(os.path.join(s.path, "model_index.json")):
            parser.error(f"{s.name}: {s.path!r} is not a diffusers pipeline folder (no model_index.json).")
        if s.num_inference_steps < 1:
            parser.error(f"{s.name}: num_inference_steps must be >= 1.")
    kinds = {s.name: pipeline_class_name(s.path) in VIDEO_PIPELINES for s in specs}
    if len(set(kinds.values())) > 1:
        parser.error(f"Mixed image and video pipelines ({', '.join(n for n, v in kinds.items() if v)} are video); "
                     "evaluate them in separate runs.")
    args.video = any(kinds.values())
    try:
        args.reference = select_reference(names, args.reference)
    except ValueError as err:
        parser.error(str(err))
    args.num_class_free_images = args.num_class_free_images or args.num_images_per_prompt
    if min(args.num_images_per_prompt, args.num_class_free_images) < 2:
        parser.error("--num_images_per_prompt and --num_class_free_images must be >= 2 (diversity needs pairs).")
    args.specs = specs
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
        keys = list(dict.fromkeys([k for k in METRIC_KEYS + VIDEO_METRIC_KEYS if any(k in row for row in ok)]
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


def run_pipelines(specs: list[PipelineSpec], evaluate_one) -> tuple[dict, dict]:
    """``evaluate_one(spec)`` for every spec; a failure is recorded (``{name: message}``) and the rest still run,
    so hours of finished evaluation are never lost to the last pipeline."""
    results, errors = {}, {}
    for spec in specs:
        try:
            results[spec.name] = evaluate_one(spec)
        except Exception as err:  # any failure of one pipeline must not cost the others
            traceback.print_exc()
            errors[spec.name] = f"{type(err).__name__}: {err}"
            print(f"{spec.name}: FAILED ({errors[spec.name]}); continuing with the others.", file=sys.stderr,
                  flush=True)
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
            report[spec.name] = {"error": errors[spec.name], "path": spec.path,
                                 "num_inference_steps": spec.num_inference_steps,
                                 "guidance_scale": spec.guidance_scale, "nfe": spec.nfe}
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
    mode = VIDEO if any("direction_accuracy" in r for r in aggregate.values()) else IMAGE
    lines = _header(mode)
    for name, r in aggregate.items():
        if not r["num_runs"]:
            failed = f"| {name} | - | - | - | failed in all {r['failed_runs']} runs |"
            lines.append(failed + " - |" * (len(mode.columns) - 1))
            continue
        label = f"{name} ({r['failed_runs']} of {r['failed_runs'] + r['num_runs']} runs failed)"
        lines += _rows({name: r}, reference, {name: label} if r["failed_runs"] else None, mode)
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

    from dmdx.pipelines.model_card import video_strip

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


def main(argv=None):
    args = parse_args(argv)
    if args.aggregate is not None:
        return write_aggregate(args.aggregate, args.output_dir)
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
