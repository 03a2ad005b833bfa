"""Evaluate text-to-image pipelines trained on the digits: quality, prompt adherence, mode coverage, diversity, cost.

Every pipeline is loaded with stock ``DiffusionPipeline.from_pretrained`` and called as a user would call it
(its own scheduler and VAE, ``output_type="pt"``). For each prompt ("a handwritten digit zero" ... "nine", and the
class-free "a handwritten digit") it generates ``--num_images_per_prompt`` samples with fixed seeds (the same
seeds for every pipeline) and scores them with the digit classifier trained on the real digits
(``distill_scripts/digits/digit_classifier.py``):

* ``digit_fid``: Frechet distance between classifier features (64-d penultimate layer) of the samples of the ten
  class prompts and of the 360 held-out real digits (lower is better; small sample sizes bias it upwards, so compare
  pipelines at the same ``--num_images_per_prompt``; report.md also lists real train digits as a floor);
* ``prompt_accuracy``: share of class-prompt samples the classifier assigns to the prompted digit;
* ``mode_entropy``: normalised entropy of the predicted classes of the class-free prompt's samples (1.0 = uniform
  over the ten digits) and ``modes_covered``: digits holding >= 5% of those samples;
* ``diversity``: mean pairwise feature distance between samples of one prompt, averaged over prompts, relative to
  the first pipeline given (the teacher); ``diversity_raw`` is the absolute value;
* ``nfe``: network evaluations per image (steps, doubled with CFG), and ``seconds_per_image`` measured in this run
  after a warm-up call, so all pipelines are timed on the same hardware under the same load.

Usage:

    python distill_scripts/evaluate.py \
        --pipeline teacher=distill_scripts/digits/assets/digits-sdxl-teacher:25:5.0 \
        --pipeline dmdx=demo_output/student:1:0 --output_dir eval_output

or ``--spec spec.json`` holding ``[{"name": ..., "path": ..., "num_inference_steps": ..., "guidance_scale": ...}]``.
Writes ``report.json`` (one entry per pipeline name), ``report.md`` (a Markdown table) and ``samples.png``
(rows: pipelines, columns: prompts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits"))
from digit_classifier import ASSETS_DIR, load_classifier  # noqa: E402
from digits_data import CLASS_FREE_PROMPT, evaluation_prompts, load_digits_split  # noqa: E402

MODE_SHARE = 0.05
METRIC_KEYS = ("digit_fid", "prompt_accuracy", "mode_entropy", "modes_covered", "diversity", "nfe",
               "seconds_per_image")


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Digit-FID, prompt accuracy, mode coverage, diversity and speed "
                                                 "of digits pipelines.")
    parser.add_argument("--pipeline", action="append", type=parse_pipeline_arg, default=[],
                        metavar="NAME=PATH:STEPS:GUIDANCE",
                        help="A pipeline folder with its step count and guidance scale (repeatable; the first is "
                             "the reference for relative diversity).")
    parser.add_argument("--spec", default=None, help="JSON file: a list of {name, path, num_inference_steps, "
                                                     "guidance_scale} (appended after --pipeline entries).")
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
    args.num_class_free_images = args.num_class_free_images or args.num_images_per_prompt
    if min(args.num_images_per_prompt, args.num_class_free_images) < 2:
        parser.error("--num_images_per_prompt and --num_class_free_images must be >= 2 (diversity needs pairs).")
    args.specs = specs
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


# ---- metrics ----------------------------------------------------------------------------------------------------
def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples)."""
    from scipy import linalg

    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def mean_pairwise_distance(feats: torch.Tensor) -> float:
    d = torch.cdist(feats.double(), feats.double())
    n = feats.shape[0]
    return float(d.sum() / (n * (n - 1)))


def normalised_entropy(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return max(0.0, float(-(p * p.log()).sum() / math.log(len(counts))))


@torch.no_grad()
def score_samples(classifier, images_by_prompt: list[torch.Tensor], real_feats: torch.Tensor) -> dict:
    """Metrics of one pipeline's samples (images in [0, 1], one tensor per evaluation prompt)."""
    feats, preds = [], []
    for images in images_by_prompt:
        x = images.float() * 2 - 1
        f = classifier.features(x)
        feats.append(f.cpu())
        preds.append(classifier.head(f).argmax(1).cpu())
    class_feats = torch.cat(feats[:10])
    accuracy = [float((p == k).float().mean()) for k, p in enumerate(preds[:10])]
    counts = torch.bincount(preds[10], minlength=10)
    return {
        "digit_fid": frechet_distance(class_feats.double().numpy(), real_feats.double().numpy()),
        "prompt_accuracy": float(np.mean(accuracy)),
        "per_class_accuracy": [round(a, 4) for a in accuracy],
        "mode_entropy": normalised_entropy(counts),
        "modes_covered": int((counts.double() / counts.sum() >= MODE_SHARE).sum()),
        "class_free_class_counts": counts.tolist(),
        "diversity_raw": float(np.mean([mean_pairwise_distance(f) for f in feats])),
    }


# ---- generation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(pipe, spec: PipelineSpec, prompt: str, num_images: int, batch_size: int, seed: int, device):
    out = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        gen = torch.Generator(device="cpu").manual_seed(seed + start)
        result = pipe(prompt, num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                      num_images_per_prompt=n, generator=gen, output_type="pt")
        out.append(result.images.float().clamp(0, 1).cpu())
    return torch.cat(out)


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


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


def markdown_table(report: dict, reference: dict) -> str:
    lines = [
        "| pipeline | steps | guidance | NFE | digit-FID ↓ | prompt acc. ↑ | mode entropy ↑ | modes covered | "
        "diversity (rel.) | s / image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report.items():
        lines.append(
            f"| {name} | {r['num_inference_steps']} | {r['guidance_scale']:g} | {r['nfe']} | {r['digit_fid']:.2f} | "
            f"{r['prompt_accuracy']:.3f} | {r['mode_entropy']:.3f} | {r['modes_covered']}/10 | "
            f"{r['diversity']:.3f} | {r['seconds_per_image']:.4f} |")
    lines.append(
        f"| real digits (train split, reference) | - | - | - | {reference['digit_fid']:.2f} | - | "
        f"{reference['mode_entropy']:.3f} | {reference['modes_covered']}/10 | {reference['diversity']:.3f} | - |")
    first = next(iter(report.values()))
    n, n_free = first["num_images_per_prompt"], first["num_class_free_images"]
    return ("\n".join(lines) + f"\n\n{n} samples per class prompt, {n_free} for the class-free prompt (mode entropy, "
            f"modes covered: classes with >= {MODE_SHARE:.0%} of them); digit-FID against the 360 held-out real digits "
            "(classifier features); diversity relative to the first row.\n")


def main(argv=None):
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device(args.device)
    classifier = load_classifier(args.classifier_dir, device=device)
    prompts = evaluation_prompts()
    n = args.num_images_per_prompt

    with torch.no_grad():
        held_images, _ = load_digits_split("held_out")
        real_feats = classifier.features(held_images.to(device)).cpu()
        # floor of the metric at this sample size: real train digits scored like a pipeline
        train_images, train_labels = load_digits_split("train")
        gen = torch.Generator().manual_seed(args.seed)
        ref_by_prompt = []
        for k in range(10):
            idx = torch.nonzero(train_labels == k).flatten()
            ref_by_prompt.append(train_images[idx[torch.randperm(len(idx), generator=gen)[:n]]].add(1).div(2))
        n_free = args.num_class_free_images
        ref_by_prompt.append(train_images[torch.randperm(len(train_images), generator=gen)[:n_free]].add(1).div(2))
    reference = score_samples(classifier, [x.to(device) for x in ref_by_prompt], real_feats)

    report, samples = {}, {}
    for spec in args.specs:
        pipe = DiffusionPipeline.from_pretrained(spec.path).to(device)
        pipe.set_progress_bar_config(disable=True)
        generate(pipe, spec, prompts[0], 1, 1, args.seed, device)  # warm-up (not timed)
        images_by_prompt, seconds = [], 0.0
        for i, prompt in enumerate(tqdm(prompts, desc=f"{spec.name} ({spec.nfe} NFE)")):
            synchronize(device)
            start = time.perf_counter()
            num = n_free if prompt == CLASS_FREE_PROMPT else n
            images_by_prompt.append(generate(pipe, spec, prompt, num, args.batch_size, args.seed * 10000 + 1000 * i,
                                             device))
            synchronize(device)
            seconds += time.perf_counter() - start
        metrics = score_samples(classifier, [x.to(device) for x in images_by_prompt], real_feats)
        metrics.update(
            pipeline_class=type(pipe).__name__, scheduler_class=type(pipe.scheduler).__name__, path=spec.path,
            num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale, nfe=spec.nfe,
            seconds_per_image=seconds / sum(len(x) for x in images_by_prompt), num_images_per_prompt=n,
            num_class_free_images=n_free,
            resolution=list(images_by_prompt[0].shape[-2:]),
        )
        report[spec.name] = metrics
        samples[spec.name] = images_by_prompt
        print(f"{spec.name}: digit_fid {metrics['digit_fid']:.2f}, prompt_accuracy {metrics['prompt_accuracy']:.3f}, "
              f"mode_entropy {metrics['mode_entropy']:.3f}, modes_covered {metrics['modes_covered']}, "
              f"{metrics['seconds_per_image']:.4f} s/image", flush=True)
        del pipe

    base = next(iter(report.values()))["diversity_raw"]
    for r in report.values():
        r["diversity"] = r["diversity_raw"] / base if base > 0 else float("nan")
    reference["diversity"] = reference["diversity_raw"] / base if base > 0 else float("nan")
    report = {name: {k: r[k] for k in METRIC_KEYS} | {k: v for k, v in r.items() if k not in METRIC_KEYS}
              for name, r in report.items()}

    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(report, reference)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(table)
    save_grid(os.path.join(args.output_dir, "samples.png"), list(report), args.specs, samples,
              args.grid_images_per_cell)
    print(table)
    print(f"Wrote report.json, report.md and samples.png to {args.output_dir}")
    return report


if __name__ == "__main__":
    main()
