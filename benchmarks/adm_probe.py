"""ADM's discriminator on a frozen generator: does it carry each sample's direction, or only the batch's?

    python benchmarks/adm_probe.py --output_dir probe_sd3          # the SD3 digits teacher as the 4-step init

For each head variant (``--variants``, e.g. ``pooled:3`` = the paper's heads, 3 downsamplings; ``per_position:1``
= a logit per position of a 1-downsampling head's map), the models are built exactly as ``train_adm_sd3.py`` builds
them (the script's own argument parser with the published digits grid's best ADM cell, the teacher adapter,
``loop.build_models`` / ``build_discriminator`` / ``prepare_models``). The generator and the fake score stay frozen
at the 4-step init (both the teacher: the pairs D sees at the start of training). ``--pool_batches`` batches of
(x_real, x_fake) pairs are drawn as ``loop.train_iteration`` draws them, the frozen backbone's features of each pair
are kept, and only the heads train on them (hinge loss, the run's optimizer) until the hinge loss stops falling (the
mean over a window of ``--window`` updates falls by less than ``--plateau_tol`` from the window before) or
``--max_updates``. Then, on ``--eval_batches`` held-out batches (the same for every variant), through the loop's
``discriminator_logits`` with the gradient through the backbone:

- ``d_accuracy`` (sign accuracy) and ``d_pair_order`` (D(x_real_i) > D(x_fake_i)), as the loop logs them;
- ``alignment_adm``: the cosine, per sample, between the direction the generator is pushed at D's fake input,
  dD(x_fake_i)/dx, and that sample's one-step gap x_real_i - x_fake_i, both with their batch means removed,
  averaged over samples (``diagnostics.sample_specific_alignment``); ``alignment_adm_shuffled`` pairs each sample's
  direction with another sample's gap (the level a direction carrying no per-sample information reaches);
- ``alignment_dmd``: the same for DMD2's generator direction on the same samples (-d dmd_loss / dx0), the
  reference (the ODE-step gap is the two x0 predictions' difference times a per-sample factor, so it reads near 1);
  ``adm_common_fraction``: the share of D's per-sample gradients common to the batch.
Finally ``--cost_iterations`` full ADM iterations (the grid's cell) are timed with each variant's heads (CPU s).
Writes ``<output_dir>/adm_probe.json`` and ``adm_probe.md`` (docs/adm_probe.md reads them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_fair import ADM_FIXED, DIGITS, SCRIPTS, TEACHERS  # noqa: E402  (the published grid's fixed settings)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher_dir", default=os.path.join(DIGITS, "assets", "digits-sd3-teacher"),
                   help="An SD3 pipeline folder (default: the committed SD3 digits teacher).")
    p.add_argument("--prompts_file", default=None, help="Default: the digits prompts (as digits_fair.py).")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--variants", nargs="+", default=["pooled:3", "pooled:1", "per_position:1"],
                   help="head_output:head_depth[:block,block] per variant (blocks: --discriminator_blocks).")
    p.add_argument("--max_updates", type=int, default=3000)
    p.add_argument("--min_updates", type=int, default=400)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--plateau_tol", type=float, default=0.005,
                   help="Stop once a window's mean hinge loss is not lower than the previous window's by this "
                        "fraction.")
    p.add_argument("--discriminator_lr", type=float, default=1e-4, help="The published grid's (ADM fixed).")
    p.add_argument("--pool_batches", type=int, default=64, help="Batches of pairs D trains on.")
    p.add_argument("--eval_batches", type=int, default=8, help="Held-out batches the measures are taken on.")
    p.add_argument("--cost_iterations", type=int, default=3,
                   help="Full ADM iterations timed per variant at the end (CPU s per update; 0 = skip).")
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("max_updates", "window", "eval_batches", "pool_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1.")
    if args.cost_iterations < 0 or not args.discriminator_lr > 0:
        p.error("--cost_iterations must be >= 0 and --discriminator_lr > 0.")
    if args.train_batch_size < 2:
        p.error("--train_batch_size must be >= 2 (batch means are removed).")
    if not os.path.isfile(os.path.join(args.teacher_dir, "model_index.json")):
        p.error(f"--teacher_dir {args.teacher_dir!r} is not a pipeline folder.")
    args.variants = [parse_variant(p, v) for v in args.variants]
    return args


def parse_variant(p, spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("pooled", "per_position") or not parts[1].isdigit():
        p.error(f"--variants entry {spec!r} is not head_output:head_depth[:blocks] (e.g. per_position:1).")
    flags = ["--discriminator_head_output", parts[0], "--discriminator_head_depth", parts[1]]
    if len(parts) == 3:
        flags += ["--discriminator_blocks", parts[2]]
    return {"name": spec, "flags": flags}


def script_args(args, variant: dict, output_dir: str, prompts_file: str):
    """The variant's arguments through train_adm_sd3.py's own parser, with the published grid's best ADM cell
    (generator lr 2e-6, 5 fake-score updates per generator update) and its fixed ADM settings."""
    spec = importlib.util.spec_from_file_location("train_adm_sd3", os.path.join(SCRIPTS, "train_adm_sd3.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    sd3 = TEACHERS["sd3"]
    return script.parse_args([
        "--pretrained_model_name_or_path", args.teacher_dir, "--prompts_file", prompts_file, "--output_dir",
        output_dir, "--overwrite_output_dir", "--resolution", str(args.resolution), "--seed", str(args.seed),
        "--num_student_steps", str(sd3["steps"]), "--guidance_scale", str(sd3["guidance_scale"]),
        "--mixed_precision", "no", "--lr_scheduler", "constant", "--train_batch_size", str(args.train_batch_size),
        "--generator_lr", "2e-6", "--fake_score_lr", "1e-4", "--fake_score_update_ratio", "5",
        "--distribution_loss", "adm", "--diagnostics_steps", "0", "--report_to", "none", *sd3["flags"],
        *ADM_FIXED, "--discriminator_lr", str(args.discriminator_lr), "--max_train_steps", "1000",
        *variant["flags"]])


def build(args, variant: dict, workdir: str, prompts_file: str):
    """Adapter, accelerator, models, D and optimizers as ``loop.distill`` builds them."""
    from accelerate.utils import set_seed

    from dmdx.pipelines.teachers import SD3Teacher
    from dmdx.training.loop import PromptSource, build_discriminator, build_models, prepare_models
    from dmdx.training.plumbing import make_accelerator

    run_args = script_args(args, variant, workdir, prompts_file)
    adapter = SD3Teacher(run_args.pretrained_model_name_or_path, resolution=run_args.resolution,
                         max_sequence_length=run_args.max_sequence_length, drop_t5=run_args.drop_t5,
                         shift_terminal=run_args.shift_terminal)
    accelerator = make_accelerator(run_args, "adm-probe")
    set_seed(run_args.seed)  # as loop.distill, before the models (D's heads draw their initial weights)
    models = build_models(adapter, run_args, accelerator, None)
    adapter.load_text_encoders(accelerator.device, models.weight_dtype, denoiser=models.teacher_base)
    with open(prompts_file) as f:
        prompts = [line.strip() for line in f if line.strip()]
    source = PromptSource(adapter, prompts, accelerator.device, precompute=True)
    adapter.free_text_encoders()
    build_discriminator(adapter, run_args, models, source.negative, accelerator.device)
    prepare_models(run_args, accelerator, models)
    return run_args, adapter, accelerator, models, source


def plateaued(losses: list[float], window: int, tol: float) -> bool:
    """The last window's mean hinge loss is not lower than the window before by ``tol`` (relative)."""
    if len(losses) < 2 * window:
        return False
    last = sum(losses[-window:]) / window
    before = sum(losses[-2 * window:-window]) / window
    return last > before * (1 - tol)


def eval_batch(models, adapter, run_args, accelerator, source, seed: int) -> dict:
    """One batch drawn as ``train_iteration`` draws it (prompts, the student's input at a random step by backward
    simulation, t and s = t - dt), with the two ODE-step outputs and both x0 predictions."""
    from dmdx.training import (
        adm_latent_predictions,
        adm_noise_levels,
        apply_cfg,
        backward_simulate,
        ode_step_target,
    )
    from dmdx.training.conditioning import cat_conditioning

    m, device, batch = models, accelerator.device, run_args.train_batch_size
    torch.manual_seed(seed)
    T, ts = m.teacher_schedule.T, m.student_timesteps.to(device)
    cond, uncond = source.batch(torch.randint(source.count, (batch,)))
    generator, fake = accelerator.unwrap_model(m.generator), accelerator.unwrap_model(m.fake_score)

    def gen_x0(x, t):
        return m.student_schedule.to_x0_noise(adapter.predict(generator, x, t, cond), x, t)[0]

    def real_x0(x, t):
        out = adapter.predict(m.teacher, torch.cat([x, x]), torch.cat([t, t]), cat_conditioning(cond, uncond))
        out_cond, out_uncond = out.chunk(2)
        return m.teacher_schedule.to_x0_noise(apply_cfg(out_cond, out_uncond, run_args.guidance_scale), x, t)[0]

    def fake_x0(x, t):
        return m.teacher_schedule.to_x0_noise(adapter.predict(fake, x, t, cond), x, t)[0]

    with torch.no_grad():
        z = torch.randn((batch, *m.latent_shape), device=device)
        k = int(torch.randint(len(ts), ()))
        x_k = backward_simulate(gen_x0, z, ts, k, m.student_schedule, m.renoise) if k else z
        x0 = gen_x0(x_k, ts[k].expand(batch))
        t = adm_noise_levels(torch.rand(batch, device=device), run_args.min_timestep_percent,
                             run_args.max_timestep_percent, T, None)
        s = ode_step_target(t, run_args.ode_step_dt, T, run_args.ode_step_mode)
        x_t = m.teacher_schedule.add_noise(x0, torch.randn_like(x0), t)
        cache = {}
        x_real, x_fake = adm_latent_predictions(
            x_t, t, s, lambda x, tt: cache.setdefault("real", real_x0(x, tt)),
            lambda x, tt: cache.setdefault("fake", fake_x0(x, tt)), m.teacher_schedule)
    return {"cond": cond, "x0": x0, "t": t, "s": s, "x_real": x_real, "x_fake": x_fake,
            "x0_real": cache["real"], "x0_fake": cache["fake"]}


def measure(models, adapter, run_args, accelerator, source, batches: int, seed: int) -> dict:
    """D's sign accuracy, pair order, hinge loss, and the sample-specific alignment of ADM's and DMD's generator
    directions with each sample's one-step gap, pooled over ``batches`` held-out batches."""
    from dmdx.training import dmd_loss, hinge_discriminator_loss
    from dmdx.training.diagnostics import (
        band_discriminator_diagnostics,
        batch_coherence,
        sample_specific_alignment,
    )
    from dmdx.training.steps import discriminator_logits

    heads = models.discriminator_heads
    rows = {}
    for i in range(batches):
        b = eval_batch(models, adapter, run_args, accelerator, source, seed + i)
        x_fake = b["x_fake"].detach().clone().requires_grad_(True)
        logits_fake = discriminator_logits(models, adapter, heads, x_fake, b["s"], b["cond"], backbone_grad=True)
        per_sample = logits_fake.reshape(logits_fake.shape[0], -1).mean(dim=1)
        (adm_dir,) = torch.autograd.grad(per_sample.sum(), x_fake)  # the generator minimises -D: it moves along +
        with torch.no_grad():
            logits_real = discriminator_logits(models, adapter, heads, b["x_real"], b["s"], b["cond"], False)
        x0 = b["x0"].float().clone().requires_grad_(True)
        (dmd_grad,) = torch.autograd.grad(dmd_loss(x0, b["x0_real"], b["x0_fake"]).sum(), x0)
        gap = b["x_real"] - b["x_fake"]
        adm = sample_specific_alignment(adm_dir, gap)
        dmd = sample_specific_alignment(-dmd_grad, gap)
        band = band_discriminator_diagnostics(logits_real, logits_fake.detach(), b["t"], models.teacher_schedule.T)
        one = {"d_accuracy": band["d_accuracy"], "d_pair_order": band["d_pair_order"],
               "hinge_loss": hinge_discriminator_loss(logits_real, logits_fake.detach()).mean().item(),
               "alignment_adm": adm["alignment"], "alignment_adm_raw": adm["alignment_raw"],
               "alignment_adm_shuffled": adm["alignment_shuffled"], "adm_common_fraction": adm["common_fraction"],
               "adm_coherence": batch_coherence(adm_dir),
               "alignment_dmd": dmd["alignment"], "alignment_dmd_raw": dmd["alignment_raw"],
               "alignment_dmd_shuffled": dmd["alignment_shuffled"], "dmd_common_fraction": dmd["common_fraction"],
               "gap_rel": (gap.norm() / (b["x_fake"] - b["x_fake"].mean(0)).norm()).item()}
        for key, value in one.items():
            rows.setdefault(key, []).append(value)
    return {key: sum(v) / len(v) for key, v in rows.items()}


def draw_pool(models, adapter, run_args, accelerator, source, batches: int, seed: int) -> list[dict]:
    """``batches`` batches of (x_real, x_fake, s, cond) pairs: the frozen generator and fake score make the same
    pairs for every variant, so they are drawn once."""
    keep = ("cond", "t", "s", "x_real", "x_fake")
    return [{k: v for k, v in eval_batch(models, adapter, run_args, accelerator, source, seed + i).items() if k in keep}
            for i in range(batches)]


@torch.no_grad()
def pool_features(models, adapter, pool: list[dict]) -> list[dict]:
    """The frozen backbone's block features of every pooled pair (the heads are all that trains)."""
    from dmdx.training.conditioning import cat_conditioning
    from dmdx.training.steps import discriminator_features

    out = []
    for b in pool:
        x, s = torch.cat([b["x_real"], b["x_fake"]]), torch.cat([b["s"], b["s"]])
        feats = discriminator_features(models, adapter, x, s, cat_conditioning(b["cond"], b["cond"]))
        out.append({"real": [f.chunk(2)[0] for f in feats], "fake": [f.chunk(2)[1] for f in feats]})
    return out


def train_heads(args, run_args, models, features: list[dict]) -> tuple[list[float], str, float]:
    """The heads alone on the pooled features (hinge loss, the run's optimizer and gradient clipping), a random
    pooled batch per update, until the hinge loss plateaus. Returns the per-update losses, why it stopped and the
    CPU seconds per update."""
    from dmdx.training import hinge_discriminator_loss

    heads, optimizer = models.discriminator_heads, models.optimizers["discriminator"]
    rng = torch.Generator().manual_seed(args.seed)
    losses, stopped, cpu0 = [], "max_updates", time.process_time()
    for update in range(args.max_updates):
        b = features[int(torch.randint(len(features), (), generator=rng))]
        logits_real, logits_fake = heads(b["real"]).float(), heads(b["fake"]).float()
        loss = hinge_discriminator_loss(logits_real, logits_fake).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), run_args.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if update + 1 >= args.min_updates and plateaued(losses, args.window, args.plateau_tol):
            stopped = "plateau"
            break
    return losses, stopped, (time.process_time() - cpu0) / len(losses)


def adm_update_cost(run_args, adapter, accelerator, models, source, iterations: int) -> float:
    """CPU seconds per full ADM iteration of the published grid's best cell (5 fake-score updates, one generator
    update, one D update) with this variant's heads: the first iteration is not counted (allocations)."""
    from dmdx.training.loop import train_iteration

    run_args.discriminator_warmup_steps, run_args.fake_score_update_ratio = 0, 5
    run_args.discriminator_update_ratio = 1
    train_iteration(models, adapter, run_args, accelerator, source, 0)
    cpu0 = time.process_time()
    for step in range(1, iterations + 1):
        train_iteration(models, adapter, run_args, accelerator, source, step)
    return (time.process_time() - cpu0) / iterations


def run_variant(args, variant: dict, prompts_file: str, cache: dict) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        run_args, adapter, accelerator, models, source = build(args, variant, workdir, prompts_file)
        if "pool" not in cache:
            cache["pool"] = draw_pool(models, adapter, run_args, accelerator, source, args.pool_batches, 1000)
        blocks = models.features.module_names
        features = pool_features(models, adapter, cache["pool"])
        eval_seed = 10_000 + args.seed  # held out: other seeds than the pool's
        before = measure(models, adapter, run_args, accelerator, source, args.eval_batches, eval_seed)
        losses, stopped, cpu_per_update = train_heads(args, run_args, models, features)
        after = measure(models, adapter, run_args, accelerator, source, args.eval_batches, eval_seed)
        cost = (adm_update_cost(run_args, adapter, accelerator, models, source, args.cost_iterations)
                if args.cost_iterations else None)
        head_params = sum(p.numel() for p in models.discriminator_heads.parameters())
    windows = [sum(losses[i:i + args.window]) / len(losses[i:i + args.window])
               for i in range(0, len(losses), args.window)]
    return {"variant": variant["name"], "flags": variant["flags"], "blocks": blocks, "head_parameters": head_params,
            "d_updates": len(losses), "stopped": stopped, "hinge_windows": windows,
            "train_hinge_final": windows[-1], "cpu_s_per_head_update": cpu_per_update,
            "cpu_s_per_adm_iteration": cost, "before": before, "after": after}


COLUMNS = [("d_accuracy", "sign acc."), ("d_pair_order", "pair order"), ("hinge_loss", "hinge"),
           ("alignment_adm", "ADM align."), ("alignment_adm_shuffled", "ADM align. (shuffled)"),
           ("alignment_adm_raw", "ADM cos (raw)"), ("adm_common_fraction", "ADM common share"),
           ("alignment_dmd", "DMD align."), ("alignment_dmd_shuffled", "DMD align. (shuffled)")]


def markdown(result: dict) -> str:
    def f(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    lines = ["# ADM discriminator probe: a frozen generator, only D's heads trained", "",
             f"Teacher `{result['teacher']}` (the 4-step generator and the fake score: the teacher, frozen), batch "
             f"{result['train_batch_size']}, D lr {result['discriminator_lr']:g}, heads trained on "
             f"{result['pool_batches']} batches of pairs until the hinge loss plateaus (window {result['window']} "
             f"updates, tolerance {result['plateau_tol']}, at most {result['max_updates']}); measured on "
             f"{result['eval_batches']} held-out batches (the same for every variant). Alignment: the per-sample "
             "cosine between a generator direction and the sample's one-step gap x_real - x_fake, batch means removed "
             "(0: no per-sample information; shuffled: against another sample's gap).", "",
             "| variant | D updates | stopped | CPU s / ADM iteration | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for row in result["variants"]:
        for when in ("before", "after"):
            lines.append(f"| `{row['variant']}` {when} | {row['d_updates'] if when == 'after' else 0} | "
                         f"{row['stopped'] if when == 'after' else ''} | "
                         f"{f(row['cpu_s_per_adm_iteration']) if when == 'after' else ''} | "
                         + " | ".join(f(row[when][k]) for k, _ in COLUMNS) + " |")
    lines += ["", f"Training hinge loss (on the pooled pairs) per window of {result['window']} updates:", ""]
    for row in result["variants"]:
        lines.append(f"- `{row['variant']}`: " + ", ".join(f"{v:.3f}" for v in row["hinge_windows"]))
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.output_dir, exist_ok=True)
    prompts_file = args.prompts_file
    if prompts_file is None:
        sys.path.insert(0, DIGITS)
        from digits_data import CLASS_FREE_PROMPT, class_prompts

        prompts_file = os.path.join(args.output_dir, "prompts.txt")
        with open(prompts_file, "w") as f:  # as digits_fair.py: the class-free prompt twice
            f.write("\n".join(class_prompts() + [CLASS_FREE_PROMPT] * 2) + "\n")
    rows, cache = [], {}
    for variant in args.variants:
        print(f"[probe] {variant['name']}", flush=True)
        rows.append(run_variant(args, variant, prompts_file, cache))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "hinge_windows"}), flush=True)
    result = {"teacher": os.path.relpath(args.teacher_dir, ROOT) if args.teacher_dir.startswith(ROOT)
              else args.teacher_dir, "train_batch_size": args.train_batch_size,
              "discriminator_lr": args.discriminator_lr, "window": args.window,
              "plateau_tol": args.plateau_tol, "max_updates": args.max_updates, "pool_batches": args.pool_batches,
              "eval_batches": args.eval_batches, "seed": args.seed, "adm_fixed": ADM_FIXED, "variants": rows}
    with open(os.path.join(args.output_dir, "adm_probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.output_dir, "adm_probe.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
