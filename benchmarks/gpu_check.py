"""GPU check: the real-size ADM iterations on a lent GPU, timed and measured against the memory plan.

    python benchmarks/gpu_check.py                          # a CUDA machine; about 8 minutes on one H100 / H200
    python benchmarks/gpu_check.py --device cpu --tiny      # the smoke test tests/test_memory_plan.py runs

Cases (``--cases``): ``sdxl_b1`` / ``sdxl_b2``: SDXL at 1024 px in bf16, batch 1 and 2, the README's stage-3 recipe
(full generator, fake score LoRA 64, gradient checkpointing, EMA; torch AdamW instead of 8-bit Adam) without
``--gradient_checkpointing_frozen_passes``; ``sdxl_b2_frozen_gc`` with it (as recipes/sdxl/dmdx.sh runs it);
``sd3m_lora``: SD3-Medium at 1024 px in bf16, the recipe's LoRA 64 / 64 four-step student, batch 2, and
``sd3m_lora_frozen_gc`` the same with the flag: each pair gives the flag's saving and its cost in time on one card.
The teachers are the real-size denoisers and VAEs built from the published configs (``memory_plan.SDXL_UNET`` /
``SD3_MEDIUM``) with random weights, saved as pipeline folders with 1-layer text encoders of the real hidden sizes
(CLIP-L 768, CLIP-G 1280, T5 4096 with 256 tokens); prompts are encoded once (``--precompute_text_embeddings``), so
no text encoder stays loaded. Each case runs what ``dmdx.training.loop.distill`` runs: the teacher adapter
(``SDXLTeacher`` / ``SD3Teacher``), ``build_models``, ``PromptSource``, ``build_discriminator``, ``prepare_models``,
then ``train_iteration`` (warm-up, then timed). It prints seconds per iteration, the peak
(``torch.cuda.max_memory_allocated`` above what was allocated before the case; on the CPU the resident-set
high-water mark) and that peak over the plan's prediction for the same setup (``memory_plan.predict``, its
activations from the committed ``benchmarks/results/memory_plan.json``).
Writes memory_plan_gpu_check.json (``--out``). Without CUDA (and without ``--device cpu``) it stops with a message.

The GPU machine has no network and no diffusers: bring diffusers (and its wheels) as docs/results.md "On a GPU" says.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_plan as mp  # noqa: E402

PROMPTS = ["a photo of a cat", "a lighthouse at dusk, oil painting", "a red bicycle", "a bowl of fruit"]
CASES = {  # frozen_checkpointing: --gradient_checkpointing_frozen_passes (SDXL stage 3's recipe sets it)
    "sdxl_b1": {"teacher": "sdxl", "batch": 1, "plan_key": "sdxl", "frozen_checkpointing": False},
    "sdxl_b2": {"teacher": "sdxl", "batch": 2, "plan_key": "sdxl", "frozen_checkpointing": False},
    "sdxl_b2_frozen_gc": {"teacher": "sdxl", "batch": 2, "plan_key": "sdxl", "frozen_checkpointing": True},
    "sd3m_lora": {"teacher": "sd3", "batch": 2, "plan_key": "sd3-medium", "frozen_checkpointing": False},
    "sd3m_lora_frozen_gc": {"teacher": "sd3", "batch": 2, "plan_key": "sd3-medium", "frozen_checkpointing": True},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="Tiny teachers (tiny_components) at 32 px: a smoke test.")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plan", default=os.path.join(mp.ROOT, "benchmarks", "results", "memory_plan.json"),
                   help="The memory plan whose activation measurements predict each case.")
    p.add_argument("--out", default=os.path.join(mp.ROOT, "benchmarks", "results"))
    return p.parse_args(argv)


# ---- teachers: real-size denoisers from the published configs, random weights ---------------------------------------
def real_components(teacher: str, device: str) -> dict:
    """The pipeline's components: the real denoiser and VAE, 1-layer text encoders of the real widths."""
    import diffusers as d
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from dmdx.pipelines.tiny_components import byte_clip_tokenizer, clip_text_config, t5_tokenizer

    def clip(hidden: int, projection: bool):
        config = clip_text_config(hidden, hidden, num_layers=1, max_positions=77)
        config.num_attention_heads = hidden // 64
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    sd3 = teacher == "sd3"
    with torch.device(device):
        vae = d.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16 if sd3 else 4, layers_per_block=2,
                              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
                              **({"scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
                                  "use_post_quant_conv": False} if sd3 else {"scaling_factor": 0.13025,
                                                                             "force_upcast": True}))
        denoiser = (d.SD3Transformer2DModel(**mp.SD3_MEDIUM) if sd3 else d.UNet2DConditionModel(**mp.SDXL_UNET))
        common = {"vae": vae, "text_encoder": clip(768, sd3), "tokenizer": byte_clip_tokenizer(77),
                  "text_encoder_2": clip(1280, True), "image_encoder": None, "feature_extractor": None,
                  "tokenizer_2": byte_clip_tokenizer(77, "<|endoftext|>" if sd3 else "!")}
        if sd3:
            t5 = T5EncoderModel(T5Config(vocab_size=3 + 2 * 94 + 1, d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                         num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=8)).eval()
            return {**common, "transformer": denoiser, "scheduler": d.FlowMatchEulerDiscreteScheduler(shift=3.0),
                    "text_encoder_3": t5, "tokenizer_3": t5_tokenizer(256)}
    scheduler = d.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1)
    return {**common, "unet": denoiser, "scheduler": scheduler}


def tiny_components(teacher: str) -> dict:
    from dmdx.pipelines.tiny_components import sd3_components, sdxl_components

    if teacher == "sd3":
        parts = sd3_components(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=16,
                               num_attention_heads=2)
        return {k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}
    return sdxl_components(sample_size=16)


def save_teacher(teacher: str, path: str, device: str, tiny: bool) -> None:
    import diffusers

    cls = getattr(diffusers, "StableDiffusion3Pipeline" if teacher == "sd3" else "StableDiffusionXLPipeline")
    pipe = cls(**(tiny_components(teacher) if tiny else real_components(teacher, device)))
    if not tiny:
        pipe.to(torch.bfloat16)  # random weights: half the disk and the loading time
    pipe.save_pretrained(path)
    del pipe
    gc.collect()


# ---- one case, set up as distill sets it up --------------------------------------------------------------------------
def case_args(case: dict, teacher_dir: str, tmp: str, tiny: bool):
    prompts = os.path.join(tmp, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    argv = ["--pretrained_model_name_or_path", teacher_dir, "--prompts_file", prompts, "--output_dir",
            os.path.join(tmp, "out"), "--resolution", "32" if tiny else "1024", "--train_batch_size",
            str(case["batch"]), "--mixed_precision", "bf16", "--gradient_checkpointing", "--precompute_text_embeddings",
            "--discriminator_warmup_steps", "0", "--diagnostics_steps", "0", "--allow_tf32"]
    if case["teacher"] == "sdxl":  # README stage 3: full generator, fake score LoRA 64, EMA (8-bit Adam left out)
        script, argv = "train_adm_sdxl", argv + ["--fake_score_lora_rank", "64", "--use_ema"]
    else:  # recipes/sd3_medium: LoRA 64 / 64, four steps (the script's defaults), T5's 256 tokens
        script, argv = "train_adm_sd3", argv + ["--lora_rank", "64", "--fake_score_lora_rank", "64",
                                                "--max_sequence_length", "32" if tiny else "256"]
    if case["frozen_checkpointing"]:
        argv.append("--gradient_checkpointing_frozen_passes")
    if tiny:
        argv += ["--discriminator_head_channels", "32"]
    return mp.script_args(script, argv)


def make_adapter(case: dict, args):
    from dmdx.pipelines.teachers import SD3Teacher, SDXLTeacher

    if case["teacher"] == "sdxl":
        return SDXLTeacher(args.pretrained_model_name_or_path, resolution=args.resolution)
    return SD3Teacher(args.pretrained_model_name_or_path, resolution=args.resolution,
                      max_sequence_length=args.max_sequence_length, drop_t5=args.drop_t5,
                      shift_terminal=args.shift_terminal)


class Meter:
    """Peak memory of what happens after ``start``: CUDA max_memory_allocated, or the CPU resident-set high-water."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = mp.reset_peak()

    def peak(self) -> int:
        return (torch.cuda.max_memory_allocated() if self.cuda else mp._status("VmHWM")) - self.base

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def run_case(name: str, case: dict, teacher_dir: str, opts, plan: dict) -> dict:
    from accelerate import Accelerator

    from dmdx.training.loop import PromptSource, build_discriminator, build_models, prepare_models, train_iteration

    meter = Meter(opts.device)
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        args = case_args(case, teacher_dir, tmp, opts.tiny)
        accelerator = Accelerator(mixed_precision="bf16", cpu=opts.device == "cpu")
        meter.start()
        start = time.perf_counter()
        adapter = make_adapter(case, args)
        models = build_models(adapter, args, accelerator, None)
        adapter.load_text_encoders(accelerator.device, models.weight_dtype, denoiser=models.teacher_base)
        source = PromptSource(adapter, PROMPTS, accelerator.device, True)
        adapter.free_text_encoders()
        build_discriminator(adapter, args, models, source.negative, accelerator.device)
        prepare_models(args, accelerator, models)
        setup_seconds = time.perf_counter() - start
        seconds = []
        for step in range(opts.warmup + opts.repeats):
            meter.sync()
            start = time.perf_counter()
            logs = train_iteration(models, adapter, args, accelerator, source, step)
            meter.sync()
            seconds.append(time.perf_counter() - start)
        peak = meter.peak()
        reserved = torch.cuda.max_memory_reserved() if meter.cuda else None
        text_tokens = int(source.embeds["prompt_embeds"].shape[1])
        prediction = predict_case(case, adapter, args, text_tokens, plan, foreach=meter.cuda)
        del models, source, adapter
        gc.collect()
    timed = sorted(seconds[opts.warmup:])
    result = {"case": name, **case, "resolution": args.resolution, "setup_seconds": setup_seconds,
              "iteration_seconds": seconds[opts.warmup:], "seconds_per_iteration": timed[len(timed) // 2],
              "peak_bytes": peak, "max_memory_reserved": reserved, "text_tokens": text_tokens,
              "losses": {k: float(v) for k, v in logs.items() if k.startswith("loss")}, "plan": prediction,
              "peak_over_plan": peak / prediction["total"]}
    print(f"  {name}: {result['seconds_per_iteration']:.3f} s/iteration, peak {peak / mp.GiB:.2f} GiB, plan "
          f"{prediction['total'] / mp.GiB:.2f} GiB ({'with' if prediction['activations_from'] else 'without'} "
          f"activations), peak / plan {result['peak_over_plan']:.2f} (setup {setup_seconds:.0f} s)", flush=True)
    return result


def predict_case(case: dict, adapter, args, text_tokens: int, plan: dict, foreach: bool) -> dict:
    """The memory plan of this very setup (the built teacher's config, its batch, ranks, EMA; no text encoders)."""
    family = "unet" if case["teacher"] == "sdxl" else "sd3"
    config = {k: v for k, v in adapter.denoiser_config.items() if not k.startswith("_")}
    rank = args.fake_score_lora_rank or args.lora_rank
    spec = {"class": adapter.denoiser_class, "config": config, "family": family, "text_encoders": [],
            "source": args.pretrained_model_name_or_path, "frames": None, "lora_rank": rank,
            "units": ("BasicTransformerBlock", "ResnetBlock2D") if family == "unet" else ("JointTransformerBlock",),
            "lora_targets": adapter.lora_target_modules, "text_tokens": text_tokens if family != "unet" else 77,
            "resolution": (args.resolution * 8 // adapter.vae_factor(),) * 2}  # latent_geometry's factor 8
    facts = mp.architecture_facts(case["plan_key"], spec, head_channels=args.discriminator_head_channels)
    measured = plan.get("models", {}).get(case["plan_key"], {}).get("activation_measurement")
    activations = mp.activations_per_sample(facts, measured) if measured and not plan.get("tiny") else None
    frozen = args.gradient_checkpointing_frozen_passes
    if activations is not None and frozen and "d_backbone_gc" not in activations:
        activations = None  # a plan from before the flag: it cannot predict this case's activations
    s = mp.setup_from(facts, args.lora_rank, args.fake_score_lora_rank, batch=args.train_batch_size,
                      gradient_checkpointing=args.gradient_checkpointing, ema=args.use_ema, activations=activations,
                      text_encoders=False, frozen_checkpointing=frozen)
    return {**mp.predict(s, foreach=foreach), "activations_from": plan.get("source") if activations else None}


def main(argv=None):
    opts = parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here. This check runs the real-size SDXL / SD3-Medium iterations on a GPU; "
              "on a CPU only its smoke test runs: python benchmarks/gpu_check.py --device cpu --tiny",
              file=sys.stderr)
        sys.exit(2)
    plan = {"tiny": opts.tiny}
    if os.path.isfile(opts.plan):
        with open(opts.plan) as f:
            plan.update(json.load(f), source=opts.plan)
    elif not opts.tiny:
        print(f"gpu_check: {opts.plan} not found; the plan's predictions will leave activations out.", flush=True)
    device_name = torch.cuda.get_device_name() if opts.device == "cuda" else "cpu"
    print(f"gpu_check on {device_name}: cases {', '.join(opts.cases)}", flush=True)
    start, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="gpu_check_teachers_") as tmp:
        built = {}
        for name in opts.cases:
            case = CASES[name]
            teacher_dir = built.get(case["teacher"])
            if teacher_dir is None:
                t0 = time.perf_counter()
                teacher_dir = built[case["teacher"]] = os.path.join(tmp, case["teacher"])
                save_teacher(case["teacher"], teacher_dir, opts.device, opts.tiny)
                print(f"  built the {'tiny' if opts.tiny else 'real-size'} {case['teacher']} teacher "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            results.append(run_case(name, case, teacher_dir, opts, plan))
    summary = {"command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]), "device": device_name,
               "tiny": opts.tiny, "total_seconds": time.perf_counter() - start, "cases": results}
    lines = ["| case | frozen-pass ckpt | s / iteration | peak GiB | plan GiB | peak / plan |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} (batch {r['batch']}, {r['resolution']} px) | "
              f"{'on' if r['frozen_checkpointing'] else 'off'} | {r['seconds_per_iteration']:.3f} | "
              f"{r['peak_bytes'] / mp.GiB:.2f} | {r['plan']['total'] / mp.GiB:.2f} | {r['peak_over_plan']:.2f} |"
              for r in results]
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, "memory_plan_gpu_check.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(lines) + f"\n{summary['total_seconds']:.0f} s in all; wrote {path}")
    return summary


if __name__ == "__main__":
    main()
