"""The embedded default (`make demo`): DMDX and DMD2 distillation of a real (tiny) SDXL- or SD3-architecture digits
teacher, end to end with the project's real scripts, then a measured comparison.

    python distill_scripts/demo.py [--output_dir demo_output] [--quick] [--teacher {sdxl,sd3,cogvideox}]

Stages with ``--teacher sdxl`` (the default; each one a subprocess, exactly the command a user would type; all of
them are written to ``<output_dir>/commands.sh``):

  0. the teacher: the committed ``distill_scripts/digits/assets/digits-sdxl-teacher`` (trained on scikit-learn's
     real handwritten digits by ``digits/train_digits_teacher.py``), trained here if it is missing;
  1. ``collect_ode_pairs.py``: the teacher's deterministic 25-step CFG samples (noise, latent) for ADP;
  2. ``train_adp_sdxl.py``: Adversarial Distillation Pre-training of the one-step student (DMDX stage 1);
  3. ``train_adm_sdxl.py --distribution_loss adm`` from the ADP student: DMDX stage 2 -> ``<output_dir>/student``;
  4. ``train_adm_sdxl.py --distribution_loss dmd`` from the same ADP student with a matched training-time budget:
     the DMD2 baseline -> ``<output_dir>/dmd2``;
  5. ``evaluate.py``: teacher (25 steps, CFG = 50 NFE), the ADP student both distillations start from (1 step,
     shown so that what ADM/DMD add is visible), DMD2 (1 step) and DMDX (1 step) through stock diffusers ->
     ``report.json``, ``report.md``, ``samples.png``. The students are judged first by their distance to the
     teacher's own samples (same prompts and seeds), then against the real digits.

With ``--teacher sd3`` (the paper's SD3 recipe: four steps, ADM alone): 0. the committed
``digits-sd3-teacher``; 1. ``train_adm_sd3.py --distribution_loss adm`` from the teacher -> ``student``;
2. ``train_adm_sd3.py --distribution_loss dmd`` (DMD2, same training time) -> ``dmd2``; 3. ``evaluate.py`` on the
teacher (25 steps, CFG), the students' initialisation (the teacher at 4 steps without CFG), DMD2 and DMDX (4 steps).

With ``--teacher cogvideox`` (the paper's video recipe: eight steps, ADM alone): 0. the committed
``digits-cogvideox-teacher``, a CogVideoX-architecture text-to-video model of real digits moving across the frame
("a handwritten digit seven moving left", ``digits/moving_digits.py``); 1. ``train_adm_cogvideox.py
--distribution_loss adm`` from the teacher -> ``student``; 2. the same with ``dmd`` -> ``dmd2``; 3. ``evaluate.py``
on the teacher (50 steps, CFG), the students' initialisation (the teacher at 8 steps without CFG), DMD2 and DMDX
(8 steps): per-frame distance to the teacher and digit-FID, prompt and motion-direction accuracy, temporal
consistency, s / video, and ``samples.gif``.

Both distillation stages sample a few digit prompts after their last update (``--validation_prompts``), the
samples and widget examples of the model card each student exports; once evaluated, the two cards are rendered again
with the report's comparison table (``dmdx.pipelines.model_card.refresh_model_card``, also in ``commands.sh``), so
``<output_dir>/student/README.md`` is the Hub card of a finished student.

Everything runs offline on CPU. A rerun into the same folder reuses finished stages when the recipe is unchanged
(``--overwrite`` starts afresh). ``--quick`` runs the same stages with tiny budgets (a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DIGITS = os.path.join(HERE, "digits")
COMMITTED_TEACHERS = {arch: os.path.join(DIGITS, "assets", f"digits-{arch}-teacher")
                      for arch in ("sdxl", "sd3", "cogvideox")}

sys.path.insert(0, DIGITS)
from digits_data import CLASS_FREE_PROMPT, digit_prompt, evaluation_prompts  # noqa: E402
from moving_digits import video_prompt, video_prompts  # noqa: E402

# The students' validation prompts: sampled once, at the last update (a few pipeline calls), for the samples and
# widget examples of their model cards. Not part of the recipe: validation changes no training value.
VALIDATION_PROMPTS = [digit_prompt(k) for k in (3, 5, 7)] + [CLASS_FREE_PROMPT]
VIDEO_VALIDATION_PROMPTS = [video_prompt(3, "left"), video_prompt(5, "up"), video_prompt(7, "right")]

# The recipes. The SDXL and SD3 students use the best cell of each method in the like-for-like grid
# (benchmarks/digits_fair.py: generator lr x fake-score updates per generator update, both methods, 200 CPU s each,
# judged by FID to the teacher; docs/results.md "like for like"), at its batch size (16), with ADM's fixed flags
# there (dt = T/64, D lr 1e-4, 20 D warm-up updates, 64-channel heads). Step counts are the updates each cell made in
# its 200 CPU s, so both methods train for about the same time; EMA (0.99) is added to both.
# Measured times are written to report.json and report.md.
ADM_GRID_FIXED = {"fake_score_lr": 1e-4, "discriminator_lr": 1e-4, "discriminator_warmup_steps": 20,
                  "ode_step_dt": 1 / 64, "discriminator_head_channels": 64, "ema_decay": 0.99}
SDXL_DEFAULT = {
    "teacher_guidance_scale": 3.0, "teacher_steps": 25,
    "num_pairs": 2000, "pairs_batch_size": 250,
    "adp": {"max_train_steps": 600, "train_batch_size": 64, "generator_lr": 2e-4, "discriminator_lr": 2e-4,
            "velocity_mse_weight": 1.0, "ema_decay": 0.99},
    # grid: ADM lr 2e-6, 5:1 (3.21 +- 0.61 FID to teacher, 247-265 updates); DMD2 lr 2e-6, 5:1 (1.24 +- 0.01, 258-265)
    "adm": {"max_train_steps": 250, "train_batch_size": 16, "generator_lr": 2e-6, "fake_score_update_ratio": 5,
            **ADM_GRID_FIXED},
    "dmd": {"max_train_steps": 250, "train_batch_size": 16, "generator_lr": 2e-6, "fake_score_lr": 1e-4,
            "fake_score_update_ratio": 5, "ema_decay": 0.99},
    "eval_images_per_prompt": 50, "eval_class_free_images": 200,
}
# SD3 (the paper's SD3 recipe: ADM alone, 4 steps, no ADP stage): the students start from the teacher and are
# fully fine-tuned (--lora_rank 0; the tiny MMDiT has no capacity to spare for a low-rank update).
SD3_DEFAULT = {
    "teacher_guidance_scale": 5.0, "teacher_steps": 25, "num_student_steps": 4,
    # grid: ADM lr 2e-6, 5:1 (73.55 +- 3.21 FID to teacher from a start at 73.92; 60-79 updates, each ~3x the cost
    # of a DMD2 1:1 update); DMD2 lr 2e-5, 1:1 (15.50 +- 0.52, 247-264 updates)
    "adm": {"max_train_steps": 80, "train_batch_size": 16, "generator_lr": 2e-6, "fake_score_update_ratio": 5,
            **ADM_GRID_FIXED},
    "dmd": {"max_train_steps": 250, "train_batch_size": 16, "generator_lr": 2e-5, "fake_score_lr": 1e-4,
            "fake_score_update_ratio": 1, "ema_decay": 0.99},
    "eval_images_per_prompt": 50, "eval_class_free_images": 200,
}
# CogVideoX (the paper's video recipe: ADM alone, 8 steps, full fine-tuning): both students start from the teacher.
# Each method runs its best cell of the like-for-like grid on this teacher (benchmarks/results/digits_fair_cogvideox.md:
# generator lr x fake-score updates per generator update x the real score's guidance scale, 150 CPU seconds a run,
# 3 seeds), at about the updates it reached in that budget, without EMA (the grid judged the trained weights). ADM keeps
# the fixed settings the grid ran it with: dt = T/8 from t >= T/8, 50 warm-up iterations that train only the fake
# score and D, 16-channel heads. A stage's guidance_scale is the real score's CFG in training; the teacher is judged at
# teacher_guidance_scale.
COGVIDEOX_DEFAULT = {
    "teacher_guidance_scale": 5.0, "teacher_steps": 50, "num_student_steps": 8,
    "adm": {"max_train_steps": 75, "train_batch_size": 16, "generator_lr": 5e-6, "fake_score_lr": 1e-4,
            "fake_score_update_ratio": 5, "guidance_scale": 2.0, "discriminator_lr": 1e-4,
            "discriminator_warmup_steps": 50, "ode_step_dt": 1 / 8, "min_timestep_percent": 1 / 8,
            "discriminator_head_channels": 16, "use_ema": False},
    "dmd": {"max_train_steps": 205, "train_batch_size": 16, "generator_lr": 2e-5, "fake_score_lr": 1e-4,
            "fake_score_update_ratio": 1, "guidance_scale": 2.0, "use_ema": False},
    "eval_images_per_prompt": 6, "eval_class_free_images": 6,
}
# --quick: the same recipe with tiny budgets (a smoke run of every stage, not a result)
QUICK_BUDGETS = {
    "num_pairs": 32, "pairs_batch_size": 32,
    "adp": {"max_train_steps": 4, "train_batch_size": 8},
    "adm": {"max_train_steps": 3, "train_batch_size": 4, "discriminator_warmup_steps": 1},
    "dmd": {"max_train_steps": 2, "train_batch_size": 4},
    "eval_images_per_prompt": 4, "eval_class_free_images": 10,
}


def with_budgets(recipe: dict, budgets: dict) -> dict:
    """``recipe`` with the entries of ``budgets`` that it has replaced (one level of nesting per stage)."""
    out = {}
    for key, value in recipe.items():
        if key not in budgets:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = {**value, **budgets[key]}
        else:
            out[key] = budgets[key]
    return out


SDXL_RECIPES = {"default": SDXL_DEFAULT, "quick": with_budgets(SDXL_DEFAULT, QUICK_BUDGETS)}
SD3_RECIPES = {"default": SD3_DEFAULT, "quick": with_budgets(SD3_DEFAULT, QUICK_BUDGETS)}
COGVIDEOX_RECIPES = {"default": COGVIDEOX_DEFAULT,
                     "quick": with_budgets(COGVIDEOX_DEFAULT, {**QUICK_BUDGETS, "eval_images_per_prompt": 2,
                                                               "eval_class_free_images": 2, "teacher_steps": 4})}
RECIPES = {"sdxl": SDXL_RECIPES, "sd3": SD3_RECIPES, "cogvideox": COGVIDEOX_RECIPES}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Run DMDX and DMD2 on the embedded digits teacher and compare them.")
    parser.add_argument("--output_dir", default=None, help="Default: demo_output (sdxl), demo_output_sd3 (sd3).")
    parser.add_argument("--teacher", default="sdxl", choices=["sdxl", "sd3", "cogvideox"],
                        help="Teacher architecture: sdxl (one-step DMDX: ADP then ADM), sd3 (four-step ADM) or "
                             "cogvideox (eight-step video ADM).")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets: a smoke run of every stage.")
    parser.add_argument("--overwrite", action="store_true", help="Delete --output_dir first.")
    parser.add_argument("--num_threads", type=int, default=1,
                        help="Threads per process (OMP_NUM_THREADS); 1 is fastest for these tiny models on a "
                             "shared 2-core machine.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = "demo_output" if args.teacher == "sdxl" else f"demo_output_{args.teacher}"
    return args


class Runner:
    """Runs the stages as subprocesses, records commands and wall times, and reuses finished stages."""

    def __init__(self, args, recipe_name: str):
        self.args = args
        self.out = os.path.abspath(args.output_dir)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        OMP_NUM_THREADS=str(args.num_threads), MKL_NUM_THREADS=str(args.num_threads),
                        ACCELERATE_USE_CPU=os.environ.get("ACCELERATE_USE_CPU", "true"), PYTHONWARNINGS="ignore")
        self.timings_path = os.path.join(self.out, "timings.json")
        self.timings = json.load(open(self.timings_path)) if os.path.isfile(self.timings_path) else {}
        self.commands = []
        self.recipe_name = recipe_name

    def python(self, script, *args):
        return [sys.executable, script, *map(str, args)]

    def accelerate(self, script, *args):
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(HERE, script), *map(str, args)]

    def stage(self, index: int, total: int, name: str, cmd: list[str], done_marker: str | None = None):
        self.commands.append(cmd)
        if done_marker is not None and os.path.exists(done_marker) and name in self.timings:
            print(f"\n[{index}/{total}] {name}: reusing {os.path.dirname(done_marker)}", flush=True)
            return
        print(f"\n[{index}/{total}] {name}\n$ {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(cmd, env=self.env, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(f"Stage '{name}' failed (exit code {result.returncode}); see the output above. "
                             f"Finished stages are kept in {self.out} and reused by a rerun.")
        self.timings[name] = round(time.perf_counter() - start, 1)
        with open(self.timings_path, "w") as f:
            json.dump(self.timings, f, indent=2)
        print(f"[{index}/{total}] {name}: {self.timings[name]:.1f} s", flush=True)

    def write_commands(self):
        with open(os.path.join(self.out, "commands.sh"), "w") as f:
            f.write(f"#!/bin/sh\n# The commands this demo ran (recipe: {self.recipe_name}).\nset -e\n")
            f.write("export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false "
                    f"OMP_NUM_THREADS={self.args.num_threads} ACCELERATE_USE_CPU=true\n")
            for cmd in self.commands:
                f.write(shlex.join(cmd) + "\n")


def flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += [f"--{key}", repr(value) if isinstance(value, float) else str(value)]
    return out


def validation(stage: dict, prompts: list[str] = VALIDATION_PROMPTS) -> list[str]:
    """The validation flags of a distillation stage: the card's samples, drawn once, after the last update."""
    return ["--validation_prompts", *prompts, "--validation_steps", str(stage["max_train_steps"])]


def refresh_cards(run, out: str, report_path: str, students: dict[str, str]):
    """The students' model cards rendered again with the evaluation (``{folder: report row}``); the call is
    recorded in commands.sh."""
    from dmdx.pipelines.model_card import refresh_model_card

    for folder, row in students.items():
        path = os.path.join(out, folder)
        refresh_model_card(path, evaluation_report=report_path, evaluation_name=row)
        run.commands.append([sys.executable, "-c", "from dmdx.pipelines.model_card import refresh_model_card; "
                             f"refresh_model_card({json.dumps(path)}, evaluation_report={json.dumps(report_path)}, "
                             f"evaluation_name={json.dumps(row)})"])
        print(f"model card: {os.path.join(path, 'README.md')} (with the {row!r} row of report.json)", flush=True)


# train_digits_teacher.py flags beyond its defaults for a teacher trained here (digits/README.md). The committed
# video teacher's denoiser was trained in two runs (3000 steps, then 3000 continuing them) on an earlier run's VAE;
# a missing one is trained in one.
TEACHER_TRAINING_FLAGS = {"cogvideox": ("--vae_batch_size", 16, "--vae_train_steps", 600, "--train_batch_size", 32,
                                        "--max_train_steps", 6000, "--num_validation_images", 5, "--text_vocabulary",
                                        "words", "--train_text_encoder", "--clip_offsets", "centre")}


def prepare_teacher(run, args, out: str, total: int) -> tuple[str, str]:
    """Stage 0: the committed teacher (trained here if missing) and the prompts file; returns their paths."""
    teacher = COMMITTED_TEACHERS[args.teacher]
    if not os.path.isfile(os.path.join(teacher, "model_index.json")):
        teacher = os.path.join(out, "teacher")
        cmd = run.python(os.path.join(DIGITS, "train_digits_teacher.py"), "--architecture", args.teacher,
                         "--output_dir", teacher, "--num_threads", args.num_threads)
        cmd += list(TEACHER_TRAINING_FLAGS.get(args.teacher, ()))
        if args.quick:
            cmd += ["--vae_train_steps", 20, "--max_train_steps", 20, "--num_validation_images", 2]
        run.stage(0, total, "teacher", list(map(str, cmd)), os.path.join(teacher, "model_index.json"))
    else:
        print(f"[0/{total}] teacher: using the committed {os.path.relpath(teacher, REPO)}", flush=True)
    prompts_file = os.path.join(out, "prompts.txt")
    with open(prompts_file, "w") as f:
        if args.teacher == "cogvideox":  # every digit moving every way
            f.write("\n".join(prompt for prompt, _, _ in video_prompts()) + "\n")
        else:  # the class-free prompt twice: about the share it had in the teacher's data
            f.write("\n".join(evaluation_prompts() + [CLASS_FREE_PROMPT]) + "\n")
    return teacher, prompts_file


def evaluate_stage(run, index: int, total: int, args, recipe: dict, out: str, pipelines: list[str]):
    """The last stage: ``evaluate.py`` on ``NAME=PATH:STEPS:GUIDANCE`` pipelines through stock diffusers."""
    cmd = [os.path.join(HERE, "evaluate.py")]
    for spec in pipelines:
        cmd += ["--pipeline", spec]
    run.stage(index, total, "evaluate", run.python(
        *cmd, "--num_images_per_prompt", recipe["eval_images_per_prompt"],
        "--num_class_free_images", recipe["eval_class_free_images"], "--reference", "teacher", "--seed", args.seed,
        "--output_dir", out))


def run_sdxl(run, args, recipe: dict, out: str):
    """One-step DMDX: ODE pairs -> ADP -> ADM (and DMD2 from the same ADP student) -> evaluation."""
    total = 6
    g = recipe["teacher_guidance_scale"]
    teacher, prompts_file = prepare_teacher(run, args, out, total)

    # 1. teacher ODE pairs (25-step deterministic DDIM with CFG)
    pairs = os.path.join(out, "ode_pairs")
    run.stage(1, total, "collect_ode_pairs", run.accelerate(
        "collect_ode_pairs.py", "--pretrained_model_name_or_path", teacher, "--prompts_file", prompts_file,
        "--resolution", 16, "--num_pairs", recipe["num_pairs"], "--shard_size", recipe["num_pairs"],
        "--batch_size", recipe["pairs_batch_size"], "--num_inference_steps", recipe["teacher_steps"],
        "--guidance_scale", g, "--save_dtype", "float32", "--seed", args.seed, "--output_dir", pairs),
        os.path.join(pairs, "shard-00000.safetensors"))

    common = ["--pretrained_model_name_or_path", teacher, "--resolution", 16, "--seed", args.seed,
              "--lr_scheduler", "constant", "--use_ema", "--checkpointing_steps", 10**9]
    # 2. ADP (DMDX stage 1). No SAM checkpoint can be downloaded here: latent discriminator only, plus the
    #    ODE-pair velocity regression that speeds up this short run.
    adp = os.path.join(out, "adp")
    run.stage(2, total, "adp", run.accelerate(
        "train_adp_sdxl.py", *common, "--ode_pairs_dir", pairs, "--pixel_discriminator_model", "none",
        *flags(recipe["adp"]), "--output_dir", adp), os.path.join(adp, "model_index.json"))

    # 3. ADM from the ADP student (DMDX stage 2) -> student/
    student = os.path.join(out, "student")
    run.stage(3, total, "adm", run.accelerate(
        "train_adm_sdxl.py", *common, "--pretrained_generator_name_or_path", adp, "--prompts_file", prompts_file,
        "--distribution_loss", "adm", "--guidance_scale", g, *flags(recipe["adm"]),
        *validation(recipe["adm"]), "--output_dir", student),
        os.path.join(student, "model_index.json"))

    # 4. DMD2 baseline from the same ADP student, about the same training time
    dmd2 = os.path.join(out, "dmd2")
    run.stage(4, total, "dmd", run.accelerate(
        "train_adm_sdxl.py", *common, "--pretrained_generator_name_or_path", adp, "--prompts_file", prompts_file,
        "--distribution_loss", "dmd", "--guidance_scale", g, *flags(recipe["dmd"]),
        *validation(recipe["dmd"]), "--output_dir", dmd2),
        os.path.join(dmd2, "model_index.json"))

    # 5. evaluation through stock diffusers
    steps = recipe["teacher_steps"]
    evaluate_stage(run, 5, total, args, recipe, out, [f"teacher={teacher}:{steps}:{g}", f"adp={adp}:1:0",
                                                      f"dmd2={dmd2}:1:0", f"dmdx={student}:1:0"])
    t = run.timings
    training = {"teacher": None, "adp": {"adp_seconds": t.get("adp"), "distillation_seconds": 0.0},
                "dmd2": {"adp_seconds": t.get("adp"), "distillation_seconds": t.get("dmd")},
                "dmdx": {"adp_seconds": t.get("adp"), "distillation_seconds": t.get("adm")}}
    return training, student


# The teachers whose students start from the teacher itself (no ADP stage): the entry script, and its size and
# validation flags. CogVideoX takes its frames, size and T5 length from the teacher transformer's own config (9
# frames of 16x16, 48 tokens): the script's defaults.
FROM_TEACHER = {"sd3": ("train_adm_sd3.py", ["--resolution", 16], VALIDATION_PROMPTS),
                "cogvideox": ("train_adm_cogvideox.py", [], VIDEO_VALIDATION_PROMPTS)}


def run_from_teacher(run, args, recipe: dict, out: str):
    """Few-step ADM (DMDX's SD3 and CogVideoX recipes: 4 / 8 steps, no ADP) and the DMD2 baseline, both from the
    teacher, then the evaluation (``init``: the teacher at the students' step count without CFG)."""
    total = 4
    g, k = recipe["teacher_guidance_scale"], recipe["num_student_steps"]
    script, size, prompts = FROM_TEACHER[args.teacher]
    teacher, prompts_file = prepare_teacher(run, args, out, total)
    common = ["--pretrained_model_name_or_path", teacher, "--prompts_file", prompts_file, *size,
              "--seed", args.seed, "--num_student_steps", k, "--lora_rank", 0,
              "--lr_scheduler", "constant", "--checkpointing_steps", 10**9, "--mixed_precision", "no"]
    # 1. ADM (DMDX) -> student/; 2. DMD2 from the same teacher, about the same training time -> dmd2/
    student, dmd2 = os.path.join(out, "student"), os.path.join(out, "dmd2")
    for index, (method, folder) in enumerate((("adm", student), ("dmd", dmd2)), start=1):
        # a stage's own guidance_scale (the real score's CFG in training) and use_ema override the defaults
        options = {"guidance_scale": g, **recipe[method]}
        ema = ["--use_ema"] if options.pop("use_ema", True) else []
        run.stage(index, total, method, run.accelerate(
            script, *common, *ema, "--distribution_loss", method, *flags(options),
            *validation(recipe[method], prompts), "--output_dir", folder), os.path.join(folder, "model_index.json"))
    # 3. evaluation through stock diffusers
    steps = recipe["teacher_steps"]
    evaluate_stage(run, 3, total, args, recipe, out, [f"teacher={teacher}:{steps}:{g}", f"init={teacher}:{k}:0",
                                                      f"dmd2={dmd2}:{k}:0", f"dmdx={student}:{k}:0"])
    t = run.timings
    training = {"teacher": None, "init": None, "dmd2": {"distillation_seconds": t.get("dmd")},
                "dmdx": {"distillation_seconds": t.get("adm")}}
    return training, student


def summary_table(report: dict) -> str:
    """The closing table: distance to the teacher's samples first (what judges a distillation), then real-data
    FID and prompt accuracy (a student can beat its teacher there by departing from it)."""
    columns = (("FID to teacher", "fid_to_teacher", ".2f"), ("class-hist TV", "class_hist_tv_to_teacher", ".3f"),
               ("mode-hist TV", "mode_hist_tv_to_teacher", ".3f"), ("digit-FID (real)", "digit_fid", ".2f"),
               ("prompt acc.", "prompt_accuracy", ".3f"))
    if any("direction_accuracy" in r for r in report.values()):
        columns = columns[:2] + (("direction TV", "direction_hist_tv_to_teacher", ".3f"),) + columns[3:] + (
            ("direction acc.", "direction_accuracy", ".3f"), ("temporal cons.", "temporal_consistency", ".3f"))
    width = max(len(name) for name in report) + 2
    teacher_keys = [key for _, key, _ in columns[:3]]
    lines = [f"{'pipeline':<{width}}{'NFE':>4}" + "".join(f"{h:>18}" for h, _, _ in columns)]
    for name, r in report.items():
        if "error" in r:
            lines.append(f"{name:<{width}}failed: {r['error']}")
            continue
        cells = ["(reference)" if name == r.get("reference_pipeline") and key in teacher_keys
                 else "-" if r.get(key) is None else format(r[key], fmt) for _, key, fmt in columns]
        lines.append(f"{name:<{width}}{r['nfe']:>4}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    recipe_name = "quick" if args.quick else "default"
    recipe = RECIPES[args.teacher][recipe_name]
    out = os.path.abspath(args.output_dir)
    if args.overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    recipe_path = os.path.join(out, "recipe.json")
    stored = {"recipe": recipe_name, "teacher": args.teacher, "seed": args.seed, **recipe}
    if os.path.isfile(recipe_path):
        with open(recipe_path) as f:
            if json.load(f) != json.loads(json.dumps(stored)):
                raise SystemExit(f"{out} holds a run with another recipe; use --overwrite or another --output_dir.")
    with open(recipe_path, "w") as f:
        json.dump(stored, f, indent=2)

    run = Runner(args, recipe_name)
    start = time.perf_counter()
    stages = run_sdxl if args.teacher == "sdxl" else run_from_teacher
    training, student = stages(run, args, recipe, out)

    # training cost per pipeline, next to the metrics
    t = run.timings
    report_path = os.path.join(out, "report.json")
    with open(report_path) as f:
        report = json.load(f)
    for name, cost in training.items():
        report[name]["training_cost"] = cost
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    refresh_cards(run, out, report_path, {"student": "dmdx", "dmd2": "dmd2"})
    run.write_commands()
    with open(os.path.join(out, "report.md"), "a") as f:
        stages_text = (f"ODE pairs {t.get('collect_ode_pairs')} s, ADP {t.get('adp')} s (shared init), "
                       if args.teacher == "sdxl" else "")
        f.write(f"\nTeacher `{args.teacher}`, recipe `{recipe_name}`; training wall time on this machine: {stages_text}"
                f"ADM (DMDX) {t.get('adm')} s, DMD2 {t.get('dmd')} s. "
                f"Whole demo: {time.perf_counter() - start:.0f} s this run.\n")
    print(f"\n{summary_table(report)}\nDone in {time.perf_counter() - start:.0f} s. See {out}/report.md, "
          f"samples.png; the student is {student}.")


if __name__ == "__main__":
    main()
