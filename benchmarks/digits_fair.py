"""ADM against DMD2 like for like on a digits teacher: one tuning grid for both, the same compute budget, several
seeds, judged against the teacher's own samples, with quality-against-compute curves.

    python benchmarks/digits_fair.py --teacher sd3 --output_dir fair_sd3
    python benchmarks/digits_fair.py --teacher sdxl --generator demo_output/adp --output_dir fair_sdxl
    python benchmarks/digits_fair.py --teacher cogvideox --guidance_scales 2 5 --output_dir fair_cogvideox

1. Tuning: every cell of the grid (``--generator_lrs`` x ``--fake_score_ratios``, fake-score updates per generator
   update, x ``--guidance_scales`` when given, the real score's guidance in training) for both methods at the first
   of ``--seeds``. Each run is the real entry script (``train_adm_sd3.py`` / ``train_adm_sdxl.py`` /
   ``train_adm_cogvideox.py``), started from the same generator, and stopped by SIGTERM once its ``train_log.jsonl``
   shows ``--budget_s`` CPU seconds of training (one thread; CPU seconds, not wall time, so that other jobs on a shared
   machine do not tilt the budget). The loop checkpoints the step it is on and exits, as on a preemption; a
   checkpoint every ``--checkpointing_steps`` gives the curve.
2. Seeds: the best cell of each method (lowest FID to the teacher at the end of its budget, seed 1 of stage 1) again
   with the other seeds.
3. Scoring: every checkpoint's generator is exported as a stock pipeline with the student's scheduler; evaluate.py
   scores them (one call per stage) against the teacher (``--teacher_steps`` with the demo's CFG) as the reference:
   FID to the teacher in the digit classifier's feature space first, the class-histogram gap to the teacher, then
   real-data digit-FID and prompt accuracy.
``--max_updates`` stops each run at a number of generator updates instead (one value, or one per seed): on a
shared machine CPU seconds are not comparable with a grid measured on an idle one, update counts are. With
``--methods adm --adm_flags "..."`` one ADM variant runs against the published cells (docs/adm_probe.md).
Writes ``<output_dir>/fair.json`` and ``fair.md`` (grid table, mean ± sd over seeds at the end of the budget, curve
points), ``fair.png`` (FID to teacher against CPU seconds and against generator updates). Finished runs are reused.

Fixed for ADM in every cell (not tuned here): for the image teachers the paper's method, ``--ode_step_dt`` 1/64,
discriminator lr 1e-4, ``--discriminator_warmup_steps`` 20 (counted in its budget), 64-channel heads; for the video
teacher the video demo's ADM settings (dt = T/8 from t >= T/8, D warm-up 50 steps, 16-channel heads). No EMA (the
curve is the weights being trained). Diagnostics off (``--diagnostics_steps 0``: they would cost ADM budget).

CPU seconds still grow with contention (shared caches and memory bandwidth; on this 2-core VM an ADM update of the
SD3 demo recipe took 2.5-4.8 CPU s at load 5 against 0.9 s of wall time when idle), so ``budget.json`` keeps the
wall time too and the curves are also drawn against generator updates.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "distill_scripts")
DIGITS = os.path.join(SCRIPTS, "digits")
sys.path.insert(0, DIGITS)
from digits_data import CLASS_FREE_PROMPT, class_prompts  # noqa: E402
from moving_digits import video_prompts  # noqa: E402

ADM_FIXED = ["--ode_step_dt", str(1 / 64), "--discriminator_lr", "1e-4", "--discriminator_warmup_steps", "20",
             "--discriminator_head_channels", "64"]
# Per teacher: the entry script, the student's steps, the teacher's sampling CFG (also the real score's guidance in
# training unless --guidance_scales is given), extra flags, ADM's fixed flags, and whether it takes video prompts.
TEACHERS = {
    "sd3": {"script": "train_adm_sd3.py", "steps": 4, "guidance_scale": 5.0,
            "flags": ["--lora_rank", "0", "--min_timestep_percent", "0.02"], "adm_fixed": ADM_FIXED, "video": False},
    "sdxl": {"script": "train_adm_sdxl.py", "steps": 1, "guidance_scale": 3.0, "flags": [], "adm_fixed": ADM_FIXED,
             "video": False},
    "cogvideox": {"script": "train_adm_cogvideox.py", "steps": 8, "guidance_scale": 5.0, "flags": ["--lora_rank", "0"],
                  "adm_fixed": ["--ode_step_dt", str(1 / 8), "--min_timestep_percent", str(1 / 8),
                                "--discriminator_lr", "1e-4", "--discriminator_warmup_steps", "50",
                                "--discriminator_head_channels", "16"], "video": True},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="sd3", choices=sorted(TEACHERS))
    p.add_argument("--teacher_dir", default=None, help="Default: the committed digits teacher.")
    p.add_argument("--generator", default=None,
                   help="The start of both methods (sdxl: an ADP student, e.g. make demo's demo_output/adp; "
                        "sd3: the teacher).")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--generator_lrs", type=float, nargs="+", default=[2e-6, 1e-5])
    p.add_argument("--fake_score_ratios", type=int, nargs="+", default=[1, 5])
    p.add_argument("--guidance_scales", type=float, nargs="+", default=None,
                   help="The real score's guidance scale in training as a grid axis (run names gain _g<scale>); "
                        "default: the teacher's sampling CFG, not a grid axis.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget_s", type=float, default=120.0, help="CPU seconds of training per run.")
    p.add_argument("--checkpointing_steps", type=int, default=25)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--fake_score_lr", type=float, default=1e-4)
    p.add_argument("--teacher_steps", type=int, default=25)
    p.add_argument("--num_images_per_prompt", type=int, default=30)
    p.add_argument("--num_class_free_images", type=int, default=100)
    p.add_argument("--score_only", action="store_true", help="Skip training; score the runs already there.")
    p.add_argument("--methods", nargs="+", default=["adm", "dmd"], choices=["adm", "dmd"])
    p.add_argument("--max_updates", type=int, nargs="+", default=None,
                   help="Stop each run after this many generator updates instead of --budget_s CPU seconds: one "
                        "value for every run, or one per --seeds entry (e.g. the update counts a published grid's "
                        "runs reached in their budget).")
    p.add_argument("--compare_to", default=None, metavar="FAIR_JSON",
                   help="A published fair.json (e.g. benchmarks/results/digits_fair_sd3.json): its best cells are "
                        "listed beside this run's, per seed.")
    p.add_argument("--merge", nargs="+", default=None, metavar="FAIR_JSON",
                   help="Combine finished fair.json files of one grid run per method (e.g. --methods adm and --methods "
                        "dmd side by side, one per core) into --output_dir; their references must be the same "
                        "samples (equal teacher and start scores). Trains and scores nothing.")
    p.add_argument("--adm_flags", default="",
                   help="Extra flags for every ADM run, e.g. \"--discriminator_head_output per_position "
                        "--discriminator_head_depth 1\".")
    args = p.parse_args(argv)
    args.teacher_dir = args.teacher_dir or os.path.join(DIGITS, "assets", f"digits-{args.teacher}-teacher")
    args.generator = args.generator or args.teacher_dir
    for flag in ("teacher_dir", "generator"):
        if not os.path.isfile(os.path.join(getattr(args, flag), "model_index.json")):
            p.error(f"--{flag} {getattr(args, flag)!r} is not a pipeline folder.")
    if args.budget_s <= 0 or args.checkpointing_steps < 1:
        p.error("--budget_s must be > 0 and --checkpointing_steps >= 1.")
    if args.max_updates is not None:
        if len(args.max_updates) not in (1, len(args.seeds)):
            p.error(f"--max_updates takes one value or one per seed ({len(args.seeds)}), got {len(args.max_updates)}.")
        if min(args.max_updates) <= 20 and "adm" in args.methods:
            p.error("--max_updates must exceed ADM's 20 discriminator warm-up steps.")
    args.adm_flags = args.adm_flags.split()
    return args


def update_limit(args, seed: int) -> int | None:
    """The update count a run of ``seed`` stops at (None: the CPU budget stops it)."""
    if args.max_updates is None:
        return None
    return args.max_updates[0] if len(args.max_updates) == 1 else args.max_updates[args.seeds.index(seed)]


def cell_name(method: str, lr: float, ratio: int, guidance: float | None = None) -> str:
    """A grid cell's name; the guidance scale only where it is a grid axis (older results keep their names)."""
    return f"{method}_lr{lr:g}_r{ratio}" + ("" if guidance is None else f"_g{guidance:g}")


def run_name(method: str, lr: float, ratio: int, seed: int, guidance: float | None = None) -> str:
    return f"{cell_name(method, lr, ratio, guidance)}_s{seed}"


def read_log(folder: str) -> list[dict]:
    path = os.path.join(folder, "train_log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_command(args, prompts_file: str, method: str, lr: float, ratio: int, guidance: float | None, seed: int,
                  out: str) -> list[str]:
    """The entry script's command line for one run of the grid."""
    teacher = TEACHERS[args.teacher]
    cmd = [sys.executable, os.path.join(SCRIPTS, teacher["script"]), "--pretrained_model_name_or_path",
           args.teacher_dir, "--prompts_file", prompts_file, "--output_dir", out, "--overwrite_output_dir",
           "--resolution", "16", "--seed", str(seed), "--num_student_steps", str(teacher["steps"]),
           "--guidance_scale", str(teacher["guidance_scale"] if guidance is None else guidance),
           "--mixed_precision", "no", "--lr_scheduler", "constant", "--train_batch_size", str(args.train_batch_size),
           "--generator_lr", str(lr), "--fake_score_lr", str(args.fake_score_lr), "--fake_score_update_ratio",
           str(ratio), "--distribution_loss", method, "--max_train_steps", str(update_limit(args, seed) or 100000),
           "--checkpointing_steps", str(args.checkpointing_steps), "--diagnostics_steps", "0", *teacher["flags"],
           *(teacher["adm_fixed"] + args.adm_flags if method == "adm" else [])]
    if os.path.abspath(args.generator) != os.path.abspath(args.teacher_dir):
        cmd += ["--pretrained_generator_name_or_path", args.generator]
    return cmd


def train(args, prompts_file: str, method: str, lr: float, ratio: int, guidance: float | None, seed: int) -> str:
    """One budgeted run of the real script; returns its folder (reused when it already finished)."""
    name = run_name(method, lr, ratio, seed, guidance)
    out = os.path.join(args.output_dir, "runs", name)
    done = os.path.join(out, "budget.json")
    if os.path.isfile(done):
        return out
    cmd = train_command(args, prompts_file, method, lr, ratio, guidance, seed, out)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    if os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    os.makedirs(out)
    limit = update_limit(args, seed)
    print(f"[fair] {name}: "
          + (f"{limit} updates" if limit else f"{args.budget_s:.0f} CPU s"), flush=True)
    start = time.time()
    with open(os.path.join(out, "stderr.txt"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
        sent = False
        while proc.poll() is None:
            time.sleep(1.0)
            log = read_log(out)
            if not limit and not sent and log and log[-1]["cpu_time"] - log[0]["cpu_time"] >= args.budget_s:
                proc.send_signal(signal.SIGTERM)  # the loop checkpoints this step and exits 128 + 15
                sent = True
    if proc.returncode not in (0, 128 + signal.SIGTERM):
        raise SystemExit(f"{cmd[1]} failed ({proc.returncode}); see {out}/stderr.txt")
    log = read_log(out)
    with open(done, "w") as f:
        json.dump({"cmd": cmd, "wall_s": time.time() - start, "steps": log[-1]["step"],
                   "cpu_s": log[-1]["cpu_time"] - log[0]["cpu_time"]}, f)
    return out


def checkpoints(out: str) -> list[tuple[int, str]]:
    found = [(int(n.split("-")[1]), os.path.join(out, n)) for n in os.listdir(out)
             if n.startswith("checkpoint-") and n.split("-")[1].isdigit()]
    return sorted(found)


def export_checkpoints(args, runs: list[str]) -> list[dict]:
    """Every checkpoint's generator as a stock pipeline (the student's scheduler); returns evaluate.py specs."""
    import torch
    from safetensors.torch import load_file

    from dmdx.pipelines.teachers import adapter_for

    adapter = adapter_for(args.teacher_dir, resolution=16)
    scheduler = adapter.student_scheduler(TEACHERS[args.teacher]["steps"], args.generator)
    specs = []
    for out in runs:
        for step, ckpt in checkpoints(out):
            folder = os.path.join(out, "pipelines", f"step-{step:06d}")
            if not os.path.isfile(os.path.join(folder, "model_index.json")):
                denoiser = adapter.load_denoiser(torch.float32, path=args.generator)
                denoiser.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors")))  # model = generator
                os.makedirs(folder, exist_ok=True)
                adapter.export(folder, denoiser, scheduler, torch.float32)
            specs.append({"name": f"{os.path.basename(out)}@{step}", "path": folder,
                          "num_inference_steps": TEACHERS[args.teacher]["steps"], "guidance_scale": 0.0})
    return specs


def score(args, runs: list[str], stage: str) -> dict:
    specs = [{"name": "teacher", "path": args.teacher_dir, "num_inference_steps": args.teacher_steps,
              "guidance_scale": TEACHERS[args.teacher]["guidance_scale"]},
             {"name": "start", "path": args.generator, "num_inference_steps": TEACHERS[args.teacher]["steps"],
              "guidance_scale": 0.0}]
    specs += export_checkpoints(args, runs)
    spec_file = os.path.join(args.output_dir, f"eval_spec_{stage}.json")
    with open(spec_file, "w") as f:
        json.dump(specs, f)
    eval_dir = os.path.join(args.output_dir, f"eval_{stage}")
    report = os.path.join(eval_dir, "report.json")
    if not os.path.isfile(report) or os.path.getmtime(report) < os.path.getmtime(spec_file):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        subprocess.run([sys.executable, os.path.join(SCRIPTS, "evaluate.py"), "--spec", spec_file, "--reference",
                        "teacher", "--num_images_per_prompt", str(args.num_images_per_prompt),
                        "--num_class_free_images", str(args.num_class_free_images), "--grid_images_per_cell", "1",
                        "--output_dir", eval_dir], check=True, env=env, cwd=ROOT)
    with open(report) as f:
        return json.load(f)


KEYS = ("fid_to_teacher", "class_hist_tv_to_teacher", "digit_fid", "prompt_accuracy", "direction_accuracy")


def curve(report: dict, out: str) -> list[dict]:
    """(generator updates, CPU seconds, metrics) at every checkpoint of one run."""
    entries = read_log(out)
    log, t0 = {entry["step"]: entry for entry in entries}, entries[0]["cpu_time"]
    rows = []
    for step, _ in checkpoints(out):
        metrics = report.get(f"{os.path.basename(out)}@{step}", {})
        rows.append({"step": step, "cpu_s": round(log[step]["cpu_time"] - t0, 1),
                     **{k: metrics.get(k) for k in KEYS}})
    return rows


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    if None in values:  # a metric this teacher's judge does not have (direction for images)
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(args, report: dict, grid_runs: dict, seed_runs: dict) -> dict:
    curves = {name: curve(report, out) for name, out in {**grid_runs, **seed_runs}.items()}
    grid = [{"run": name, **curves[name][-1]} for name in grid_runs]
    best = {}
    for method in args.methods:
        cells = [(curves[n][-1]["fid_to_teacher"], n) for n in grid_runs if n.startswith(method)]
        best[method] = min(cells)[1].rsplit("_s", 1)[0]
    finals = {}
    for method, cell in best.items():
        names = [n for n in curves if n.rsplit("_s", 1)[0] == cell]
        finals[method] = {"cell": cell, "seeds": len(names),
                          **{k: mean_sd([curves[n][-1][k] for n in names]) for k in KEYS},
                          "cpu_s": mean_sd([curves[n][-1]["cpu_s"] for n in names]),
                          "updates": mean_sd([curves[n][-1]["step"] for n in names])}
    ref = {name: {k: report.get(name, {}).get(k) for k in KEYS} for name in ("teacher", "start")}
    return {"teacher": args.teacher, "budget_cpu_s": None if args.max_updates else args.budget_s,
            "max_updates": args.max_updates, "adm_flags": args.adm_flags, "grid_lrs": args.generator_lrs,
            "grid_ratios": args.fake_score_ratios, "grid_guidance_scales": args.guidance_scales,
            "teacher_guidance_scale": TEACHERS[args.teacher]["guidance_scale"], "seeds": args.seeds,
            "adm_fixed": TEACHERS[args.teacher]["adm_fixed"],
            "reference": ref, "grid": grid, "best": finals, "curves": curves}


def published_cells(path: str) -> dict:
    """The best cells of a published fair.json: mean ± sd and each seed's last checkpoint (updates, FID to teacher),
    with the checkpoint where the generator had not moved yet (the end of D's warm-up) as the start."""
    with open(path) as f:
        published = json.load(f)
    out = {"source": os.path.relpath(os.path.abspath(path), ROOT), "cells": {}}
    for method, row in published["best"].items():
        runs = {n: rows for n, rows in published["curves"].items() if n.rsplit("_s", 1)[0] == row["cell"]}
        out["cells"][method] = {**row, "per_seed": {n: {"step": rows[-1]["step"],
                                                        "fid_to_teacher": rows[-1]["fid_to_teacher"]}
                                                    for n, rows in sorted(runs.items())}}
    return out


def markdown(result: dict) -> str:
    def f(v, nd=2):
        return "n/a" if v is None else f"{v:.{nd}f}"

    def mean_sd_cells(row: dict) -> str:  # results written before a key existed lack it
        return " | ".join(f"{f(row.get(k, (None, None))[0])} ± {f(row.get(k, (None, None))[1])}" for k in KEYS)

    lines = [f"# ADM vs DMD2 like for like: {result['teacher']} digits teacher",
             "", (f"Budget {result['budget_cpu_s']:.0f} CPU seconds of training per run (one thread)."
                  if result.get("budget_cpu_s") else f"Budget: {result['max_updates']} generator updates per run "
                  f"(per seed {result['seeds']}).") + " Grid: generator "
             f"lr {result['grid_lrs']} x fake-score updates per generator update {result['grid_ratios']}"
             + (f" x real-score guidance {result['grid_guidance_scales']}" if result.get("grid_guidance_scales")
                else f" (real-score guidance {result.get('teacher_guidance_scale', 'the teacher CFG')})") + ", "
             f"{' and '.join(result['best'])}, seed {result['seeds'][0]}; then the best cell of each method at seeds "
             f"{result['seeds']}. "
             f"ADM fixed: `{' '.join(result['adm_fixed'] + result.get('adm_flags', []))}`.", "",
             "## Best cell per method, end of budget (mean ± sd over seeds)", "",
             "| method | cell | seeds | FID to teacher | class-hist TV to teacher | digit-FID (real) | prompt acc. | "
             "direction acc. | generator updates |", "|---|---|---|---|---|---|---|---|---|"]
    for method, row in result["best"].items():
        lines.append(f"| {'DMDX (ADM)' if method == 'adm' else 'DMD2'} | `{row['cell']}` | {row['seeds']} | "
                     + mean_sd_cells(row) + f" | {row['updates'][0]:.0f} |")
    for name, row in result["reference"].items():
        lines.append(f"| {name} | | | " + " | ".join(f(row.get(k)) for k in KEYS) + " | |")
    if result.get("published"):
        lines += ["", f"## Against the published cells (`{result['published']['source']}`)", "",
                  "| method | cell | seeds | FID to teacher | class-hist TV to teacher | digit-FID (real) | "
                  "prompt acc. | direction acc. | generator updates | FID to teacher per seed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        rows = [(f"this run: {'DMDX (ADM)' if m == 'adm' else 'DMD2'}", r, {
            n: {"step": c[-1]["step"], "fid_to_teacher": c[-1]["fid_to_teacher"]}
            for n, c in sorted(result["curves"].items()) if n.rsplit("_s", 1)[0] == r["cell"]})
            for m, r in result["best"].items()]
        rows += [(f"published: {'DMDX (ADM)' if m == 'adm' else 'DMD2'}", r, r["per_seed"])
                 for m, r in result["published"]["cells"].items()]
        for label, row, seeds in rows:
            lines.append(f"| {label} | `{row['cell']}` | {row['seeds']} | "
                         + mean_sd_cells(row) + f" | {row['updates'][0]:.0f} | "
                         + ", ".join(f"{f(v['fid_to_teacher'])} @{v['step']}" for v in seeds.values()) + " |")
    lines += ["", "## Tuning grid (first seed, end of budget)", "",
              "| run | updates | CPU s | FID to teacher | class-hist TV | digit-FID | prompt acc. | direction acc. |",
              "|---|---|---|---|---|---|---|---|"]
    for row in result["grid"]:
        lines.append(f"| `{row['run']}` | {row['step']} | {row['cpu_s']} | {f(row['fid_to_teacher'])} | "
                     f"{f(row['class_hist_tv_to_teacher'])} | {f(row['digit_fid'])} | {f(row['prompt_accuracy'])} | "
                     f"{f(row.get('direction_accuracy'))} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colours = {"adm": "tab:red", "dmd": "tab:blue"}
    if not result["curves"]:
        return
    for name, rows in result["curves"].items():
        method = name.split("_")[0]
        best = name.rsplit("_s", 1)[0] == result["best"][method]["cell"]
        for ax, x in zip(axes, ("cpu_s", "step")):
            ax.plot([r[x] for r in rows], [r["fid_to_teacher"] for r in rows], color=colours[method],
                    alpha=0.9 if best else 0.25, lw=1.5 if best else 0.8,
                    label=("DMDX (ADM) " if method == "adm" else "DMD2 ") + result["best"][method]["cell"]
                    if best and name.endswith(f"_s{result['seeds'][0]}") else None)
    for ax, label in zip(axes, ("CPU seconds of training", "generator updates")):
        ax.axhline(result["reference"]["start"]["fid_to_teacher"], color="grey", ls="--", lw=0.8, label="start")
        ax.set_xlabel(label)
        ax.set_ylabel("FID to teacher (classifier features)")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['teacher']} digits: ADM vs DMD2 (bold: best cell, all seeds; faint: rest of grid)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge_results(paths: list[str]) -> dict:
    """One result from per-method results of the same grid, scored against the same reference samples."""
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    merged = dict(results[0], best={}, grid=[], curves={})
    for path, result in zip(paths, results):
        if result["reference"] != results[0]["reference"]:
            raise SystemExit(f"--merge: {path} was scored against other reference samples than {paths[0]} "
                             f"({result['reference']} vs {results[0]['reference']}).")
        if set(result["best"]) & set(merged["best"]):
            raise SystemExit(f"--merge: {path} repeats a method of an earlier file ({sorted(result['best'])}).")
        merged["best"].update(result["best"])
        merged["grid"] += result["grid"]
        merged["curves"].update(result["curves"])
    return merged


def write_result(args, result: dict) -> None:
    with open(os.path.join(args.output_dir, "fair.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.output_dir, "fair.md"), "w") as f:
        f.write(markdown(result))
    plot(result, os.path.join(args.output_dir, "fair.png"))
    print(markdown(result))


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.merge:
        write_result(args, merge_results(args.merge))
        return
    prompts_file = os.path.join(args.output_dir, "prompts.txt")
    with open(prompts_file, "w") as f:  # as the demo: every digit moving every way / the class-free prompt twice
        prompts = ([prompt for prompt, _, _ in video_prompts()] if TEACHERS[args.teacher]["video"]
                   else class_prompts() + [CLASS_FREE_PROMPT] * 2)
        f.write("\n".join(prompts) + "\n")
    first, others = args.seeds[0], args.seeds[1:]
    guidances = args.guidance_scales or [None]
    cells = {cell_name(*c): c for c in ((m, lr, r, g) for m in args.methods for lr in args.generator_lrs
                                        for r in args.fake_score_ratios for g in guidances)}
    grid_runs = {run_name(*c[:3], first, c[3]): os.path.join(args.output_dir, "runs", run_name(*c[:3], first, c[3]))
                 for c in cells.values()}
    one_cell = len(cells) == len(args.methods)  # no tuning: every seed, one scoring
    if not args.score_only:
        for c in cells.values():
            for seed in [first] + (others if one_cell else []):
                train(args, prompts_file, *c, seed)
    everything = [os.path.join(args.output_dir, "runs", run_name(*c[:3], seed, c[3])) for c in cells.values()
                  for seed in args.seeds]
    report = score(args, everything if one_cell else list(grid_runs.values()), "grid")
    best = summarise(args, report, grid_runs, {})["best"]
    seed_runs = {}
    for method in args.methods:
        _, lr, ratio, guidance = cells[best[method]["cell"]]
        for seed in others:
            name = run_name(method, lr, ratio, seed, guidance)
            seed_runs[name] = os.path.join(args.output_dir, "runs", name)
            if not args.score_only:
                train(args, prompts_file, method, lr, ratio, guidance, seed)
    if seed_runs and not one_cell:  # the other seeds in their own evaluate.py call (the teacher's samples are the same)
        report = {**score(args, list(seed_runs.values()), "seeds"), **report}
    result = summarise(args, report, grid_runs, seed_runs)
    if args.compare_to:
        result["published"] = published_cells(args.compare_to)
    write_result(args, result)


if __name__ == "__main__":
    main()
