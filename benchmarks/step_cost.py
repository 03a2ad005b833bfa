"""What one iteration of the ADM / DMD2 loop costs: time against its network passes, memory against what the run
must hold, and the memory plan (shared teacher, frozen modules in bf16, gradient checkpointing, LoRA).

    python benchmarks/step_cost.py --script sdxl --size tiny                      # CPU, about a minute
    python benchmarks/step_cost.py --script sdxl --size tiny --memory_plan
    python benchmarks/step_cost.py --script sd3 --size small --distribution_loss adm --text_cache
    python benchmarks/step_cost.py --script sd3 --size full --mixed_precision bf16 --resolution 1024  # a GPU

The iteration is ``dmdx.training.loop.train_iteration``, unchanged, through the teacher adapter of ``--script``,
set up as ``distill`` sets it up (``build_models``, text encoders, ``PromptSource``, ``build_discriminator``,
``prepare_models``) from the scripts' flags (``distillation_parser`` + ``RECIPES``; ``--diagnostics_steps 0``).
One iteration = one generator update: ``adm`` at 1:1 fake-score updates, ``dmd`` at DMD2's 5:1. Each network pass is
also timed alone on the same models under the same autocast (``Run.parts``): text encoding (prompts encoded batch by
batch, the scripts' default), the generator without gradients (fake-score inputs, backward simulation) and with
forward/backward, the fake score's own update, the teacher with CFG (both halves in one batch), the fake score
frozen with a gradient through its input (ADM) or without gradients (DMD2), the discriminator (teacher backbone
features + heads) with a gradient through its input, the discriminator update (backbone without autograd on real +
fake, heads forward/backward), and each optimizer step (clip, AdamW, LR schedule).
How often an iteration makes each pass is counted, not assumed: during the iteration ``adapter.predict``,
``adapter.encode_prompts`` and the optimizers' ``step`` are wrapped, and each denoiser call is filed by its model's
role and gradient mode (``Run.part_of``; a teacher call inside D's feature extraction is D's). ``iteration / sum of
parts`` = the iteration's seconds / sum over passes of (seconds alone x calls in that iteration), median over
repeats; losses, noise, schedule algebra and logging are what its excess over 1 measures.

Teachers: ``--size tiny|small`` saves ``dmdx.pipelines.tiny_components`` pipelines (small: a 24 M-parameter UNet /
6-block MMDiT); ``full`` the real-size SDXL UNet / SD3-Medium transformer and VAE from the published configs, random
weights, 1-layer text encoders with the real widths (``--reduced_denoiser``: a small denoiser, a CPU smoke test of
that path); ``--teacher_dir`` any pipeline folder (built there first if missing). Each configuration runs in its own
process. Peak memory: CUDA ``max_memory_allocated``, or the CPU resident-set high-water mark (VmHWM, reset through
``/proc/self/clear_refs`` after the imports) above the resident set then. Writes step_cost_<script>_<size>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a handwritten digit zero", "a handwritten digit three", "a handwritten digit seven", "a handwritten digit"]
MB = 2**20
# The entry scripts' recipe defaults (their parser.set_defaults, and SD3's own flags), mirrored here because nothing
# imports an entry script; tests/test_step_cost.py checks that the two agree.
RECIPES = {
    "sdxl": {"num_student_steps": 1, "guidance_scale": 8.0, "generator_lr": 5e-7, "discriminator_lr": 1e-5,
             "fake_score_lora_rank": 0},
    "sd3": {"num_student_steps": 4, "guidance_scale": 7.0, "lora_rank": 64, "generator_lr": 1e-5,
            "discriminator_lr": 2e-5, "max_sequence_length": 256, "drop_t5": False, "shift_terminal": 0.25},
}
PASSED_THROUGH = ("fake_score_lora_rank", "lora_rank", "discriminator_head_channels")  # script flags, if given


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--script", default="sdxl", choices=sorted(RECIPES), help="Whose recipe and teacher adapter.")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "full"])
    p.add_argument("--teacher_dir", default=None, help="A pipeline folder (built there and kept if missing).")
    p.add_argument("--reduced_denoiser", action="store_true", help="--size full with a small denoiser (smoke test).")
    p.add_argument("--distribution_loss", default="both", choices=["adm", "dmd", "both"])
    p.add_argument("--resolution", type=int, default=None, help="Pixels (default: 32 tiny/small, 1024 full).")
    p.add_argument("--batch_size", type=int, default=None, help="Per device (default: 2 tiny/small, 1 full).")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--precompute_text_embeddings", action="store_true")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="Default: bf16 on CUDA.")
    for flag in PASSED_THROUGH:
        p.add_argument(f"--{flag}", type=int, default=None, help="Default: the script's.")
    p.add_argument("--repeats", type=int, default=3, help="Timed iterations (and timings of each pass).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed iterations first.")
    p.add_argument("--memory_plan", action="store_true", help="Also ADM with the other precision (bf16 / no), the "
                   "other gradient checkpointing, the other fake-score kind (LoRA r=8 / full), each in its process.")
    p.add_argument("--text_cache", action="store_true", help="Also ADM fed by the text-embedding cache (built "
                   "first, outside the measured process; no text encoder loaded), in its own process: iteration time "
                   "and peak memory with / without it as ratios.")
    p.add_argument("--no_paired", action="store_true", help="Skip ADM and DMD2 alternated in one process (always "
                   "skipped at --size full: two sets of real-size models do not fit).")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads in every worker.")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: JSON spec of one configuration
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.resolution = args.resolution or (1024 if args.size == "full" else 32)
    args.batch_size = args.batch_size or (1 if args.size == "full" else 2)
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    if args.reduced_denoiser and args.size != "full":
        p.error("--reduced_denoiser is for --size full.")
    if min(args.repeats, args.batch_size, args.resolution) < 1 or args.warmup < 0:
        p.error("--repeats, --batch_size and --resolution must be >= 1, --warmup >= 0.")
    return args


# ---- teachers ----------------------------------------------------------------------------------------------------
def build_teacher(script: str, size: str, resolution: int, path: str, reduced: bool = False) -> dict:
    """Save a teacher pipeline folder at ``path``; returns what was built."""
    import diffusers

    from dmdx.pipelines import tiny_components as tc

    cls = getattr(diffusers, {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}[script])
    if size != "full":
        small = {"sdxl": {"block_out_channels": (64, 128, 256), "layers_per_block": 2, "text_hidden": 64},
                 "sd3": {"num_layers": 6, "attention_head_dim": 32, "num_attention_heads": 8, "text_hidden": 64}}
        make = tc.sdxl_components if script == "sdxl" else tc.sd3_components
        pipe = cls(**make(sample_size=resolution // 2, **(small[script] if size == "small" else {})))
        note = f"dmdx.pipelines.tiny_components{' (small configuration)' if size == 'small' else ''}, random weights"
    else:
        pipe = cls(**full_components(script, reduced)).to(torch.bfloat16)  # random weights: half the disk and load
        note = ("real-size denoiser and VAE from the published configs (random weights); text encoders are 1-layer "
                "stand-ins with the real hidden sizes")
        if reduced:
            shrunk = "1 MMDiT block" if script == "sd3" else "UNet channels 64/128/256"
            note = (f"REDUCED denoiser (smoke test: real conditioning widths, {shrunk}); VAE from the published "
                    "config; 1-layer text encoders")
    denoiser = pipe.unet if script == "sdxl" else pipe.transformer
    pipe.save_pretrained(path)
    return {"teacher": note, "denoiser_class": type(denoiser).__name__,
            "denoiser_parameters": sum(p.numel() for p in denoiser.parameters())}


def full_components(script: str, reduced: bool) -> dict:
    """SDXL-base's UNet / SD3-Medium's transformer and their VAEs from the published configs (random weights);
    1-layer stand-ins for the text encoders with the real widths: CLIP-L 768, CLIP-G 1280, T5-XXL 4096 (256 tokens)."""
    import diffusers as d
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from dmdx.pipelines.tiny_components import byte_clip_tokenizer, clip_text_config, t5_tokenizer

    def clip(hidden: int, projection: bool):
        config = clip_text_config(hidden, hidden, num_layers=1, max_positions=77)
        config.num_attention_heads = hidden // 64
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    sd3 = script == "sd3"
    vae = d.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16 if sd3 else 4, layers_per_block=2,
                          block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
                          **({"scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
                              "use_post_quant_conv": False} if sd3 else {"scaling_factor": 0.13025,
                                                                         "force_upcast": True}))
    common = {"vae": vae, "text_encoder": clip(768, sd3), "tokenizer": byte_clip_tokenizer(77),
              "text_encoder_2": clip(1280, True), "image_encoder": None, "feature_extractor": None,
              "tokenizer_2": byte_clip_tokenizer(77, "<|endoftext|>" if sd3 else "!")}
    if sd3:
        t5 = T5EncoderModel(T5Config(vocab_size=3 + 2 * 94 + 1, d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                     num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=8)).eval()
        transformer = d.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=1 if reduced else 24,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192)
        return {**common, "transformer": transformer, "scheduler": d.FlowMatchEulerDiscreteScheduler(shift=3.0),
                "text_encoder_3": t5, "tokenizer_3": t5_tokenizer(256)}
    size = ({"layers_per_block": 1, "block_out_channels": (64, 128, 256), "attention_head_dim": (1, 2, 4),
             "transformer_layers_per_block": (1, 1, 1)} if reduced else
            {"layers_per_block": 2, "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
             "transformer_layers_per_block": (1, 2, 10)})
    unet = d.UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, **size, cross_attention_dim=2048, use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
    scheduler = d.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1)
    return {**common, "unet": unet, "scheduler": scheduler}


# ---- one configuration, set up as the loop sets it up ------------------------------------------------------------
def loop_args(spec: dict, tmp: str) -> argparse.Namespace:
    """The flags an entry script would parse for this configuration (its recipe defaults from ``RECIPES``)."""
    from dmdx.training.cli import distillation_parser, finish_distillation_args

    with open(prompts_file := os.path.join(tmp, "prompts.txt"), "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    parser = distillation_parser("step cost")
    parser.set_defaults(**RECIPES[spec["script"]])
    argv = ["--pretrained_model_name_or_path", spec["teacher_dir"], "--prompts_file", prompts_file, "--output_dir",
            os.path.join(tmp, "out"), "--resolution", str(spec["resolution"]), "--train_batch_size",
            str(spec["batch_size"]), "--distribution_loss", spec["distribution_loss"], "--mixed_precision",
            spec["mixed_precision"], "--diagnostics_steps", "0"]
    argv += [f"--{flag}" for flag in ("gradient_checkpointing", "precompute_text_embeddings") if spec[flag]]
    argv += [x for flag in PASSED_THROUGH if spec[flag] is not None for x in (f"--{flag}", str(spec[flag]))]
    if spec.get("text_embeddings_cache"):
        argv += ["--text_embeddings_cache", spec["text_embeddings_cache"]]
    args = finish_distillation_args(parser, parser.parse_args(argv))
    if hasattr(args, "max_sequence_length") and spec["size"] != "full":
        args.max_sequence_length = 32  # the tiny tokenizers hold 32 tokens
    return args


class Run:
    """One configuration as ``distill`` builds it; ``iterate`` runs ``train_iteration`` and counts the passes it
    makes; ``parts`` holds each pass alone (name -> (fill gradients or None, the pass))."""

    def __init__(self, spec: dict, accelerator, tmp: str):
        from dmdx.pipelines.teachers import ADAPTERS
        from dmdx.training.loop import PromptSource, build_discriminator, build_models, open_text_cache, prepare_models

        os.makedirs(tmp, exist_ok=True)
        self.args, self.acc, device = (args := loop_args(spec, tmp)), accelerator, accelerator.device
        cls = ADAPTERS[spec["script"]]  # constructed as the entry script does, its own flags from args
        own = {k: getattr(args, k) for k in inspect.signature(cls.__init__).parameters if k in RECIPES[spec["script"]]}
        self.adapter = cls(args.pretrained_model_name_or_path, resolution=args.resolution, revision=args.revision,
                           variant=args.variant, cache_dir=args.cache_dir, **own)
        cache = None
        if args.text_embeddings_cache:  # read only: built by the driver, so no encoder load counts in the peak
            cache = open_text_cache(self.adapter, args, PROMPTS)
            if not cache.covers(PROMPTS):
                raise RuntimeError(f"{args.text_embeddings_cache} does not hold the benchmark's prompts")
        m = self.models = build_models(self.adapter, args, accelerator, None)
        if cache is None:
            self.adapter.load_text_encoders(device, m.weight_dtype, denoiser=m.teacher_base)
        self.source = PromptSource(self.adapter, PROMPTS, device, args.precompute_text_embeddings, cache=cache)
        if args.precompute_text_embeddings:
            self.adapter.free_text_encoders()
        if args.distribution_loss == "adm":
            build_discriminator(self.adapter, args, m, self.source.negative, device)
        prepare_models(args, accelerator, m)
        self.blocks = m.features.module_names if m.features is not None else None
        self.counts, self.in_discriminator = collections.Counter(), False
        self.predict, self.encode = self.adapter.predict, self.adapter.encode_prompts
        self.parts = self._parts()  # on the unwrapped methods: uncounted

        # Count what the iteration calls: denoiser passes by role (model identity) and gradient mode, text
        # encodings, optimizer steps; the teacher passes inside D's feature extraction are marked as D's.
        roles = {id(obj): role for role in ("generator", "fake_score", "teacher")
                 for obj in (getattr(m, role), accelerator.unwrap_model(getattr(m, role)))}

        def counted(fn, part=None):
            def call(*a):
                self.counts[part or self.part_of(roles, *a)] += 1
                return fn(*a)
            return call

        self.adapter.predict, self.adapter.encode_prompts = counted(self.predict), counted(self.encode, "text_encode")
        for name, optimizer in m.optimizers.items():
            optimizer.step = counted(optimizer.step, f"optimizer_{name}")
        if m.features is not None:
            features = m.features

            def marked(run_backbone):
                self.in_discriminator = True
                try:
                    return features(run_backbone)
                finally:
                    self.in_discriminator = False

            m.features = marked

    def part_of(self, roles: dict, model, x, *_) -> str:
        role, grad = roles[id(model)], torch.is_grad_enabled()
        if role == "teacher":
            if not self.in_discriminator:
                return "teacher_cfg_forward"
            return "discriminator_fwd_bwd_input_grad" if grad and x.requires_grad else "discriminator_update_fwd_bwd"
        trains = grad and any(p.requires_grad for p in model.parameters())
        if role == "generator":
            return "generator_fwd_bwd" if trains else "generator_forward_nograd"
        return ("fake_score_fwd_bwd" if trains else "fake_score_fwd_bwd_input_grad" if grad and x.requires_grad
                else "fake_score_forward_nograd")

    def iterate(self, step: int) -> tuple[float, dict, dict]:
        """One ``train_iteration``: (seconds, its logs, the passes it made)."""
        from dmdx.training.loop import train_iteration

        self.counts.clear()
        logs = {}
        seconds = timed(lambda: logs.update(train_iteration(self.models, self.adapter, self.args, self.acc,
                                                            self.source, step)), self.acc.device)
        return seconds, logs, dict(self.counts)

    def _parts(self) -> dict:
        """Each pass as the loop makes it, on one fixed batch, under the loop's autocast."""
        from dmdx.training import frozen_parameters
        from dmdx.training.conditioning import cat_conditioning

        m, a, acc, predict, device = self.models, self.args, self.acc, self.predict, self.acc.device
        gen, fake, heads = m.generator, m.fake_score, m.discriminator_heads
        fake0, heads0 = acc.unwrap_model(fake), heads if heads is None else acc.unwrap_model(heads)  # frozen passes
        b, T = a.train_batch_size, m.teacher_schedule.T
        cond, uncond = self.source.batch(torch.arange(b) % self.source.count)
        z, t_k = torch.randn((b, *m.latent_shape), device=device), m.student_timesteps[:1].to(device).expand(b)
        t = torch.full((b,), 0.5 * T, device=device)
        s, two, both = t - a.ode_step_dt * T, lambda x: torch.cat([x, x]), cat_conditioning(cond, uncond)
        gen_x0 = lambda model: m.student_schedule.to_x0_noise(predict(model, z, t_k, cond), z, t_k)[0]  # noqa: E731
        with torch.no_grad(), acc.autocast():
            x_t = m.teacher_schedule.add_noise(gen_x0(gen), torch.randn_like(z), t)
        x_in = lambda: x_t.detach().requires_grad_(True)  # noqa: E731

        def d_update():
            with torch.no_grad():
                feats = m.features(lambda: predict(m.teacher, two(x_t), two(s), cat_conditioning(cond, cond)))
            heads(feats).float().mean().backward()

        passes = {  # name: (the pass, modules frozen around it, without autograd)
            "text_encode": (lambda: self.encode((PROMPTS * b)[:b], device), (), True),
            "generator_forward_nograd": (lambda: gen_x0(acc.unwrap_model(gen)), (), True),
            "generator_fwd_bwd": (lambda: gen_x0(gen).mean().backward(), (), False),
            "fake_score_fwd_bwd": (lambda: predict(fake, x_t, t, cond).mean().backward(), (), False),
            "teacher_cfg_forward": (lambda: predict(m.teacher, two(x_t), two(t), both), (), True),
            "fake_score_fwd_bwd_input_grad": (lambda: predict(fake0, x_in(), t, cond).sum().backward(), (fake0,),
                                              False),
            "fake_score_forward_nograd": (lambda: predict(fake0, x_t, t, cond), (), True),
            "discriminator_fwd_bwd_input_grad": (lambda: heads0(m.features(lambda: predict(
                m.teacher, x_in(), s, cond))).float().mean().backward(), (heads0,), False),
            "discriminator_update_fwd_bwd": (d_update, (), False),
        }
        if not self.adapter.text_modules:  # precomputed: no text encoder left to time
            del passes["text_encode"]
        if heads is None:
            del passes["discriminator_fwd_bwd_input_grad"], passes["discriminator_update_fwd_bwd"]

        def run(fn, frozen, nograd):
            def part():
                with acc.autocast(), frozen_parameters(*frozen), torch.set_grad_enabled(not nograd):
                    fn()
            return part

        parts = {name: (None, run(*spec)) for name, spec in passes.items()}
        for name, optimizer in m.optimizers.items():  # as plumbing.accumulated_update ends: clip, step, LR, zero
            params = [p for p in {"generator": gen, "fake_score": fake}.get(name, heads).parameters()
                      if p.requires_grad]

            def fill(params=params):
                for p in params:
                    p.grad = torch.full_like(p, 1e-8)

            def step(params=params, optimizer=optimizer, lr=m.lr_schedulers[name]):
                acc.clip_grad_norm_(params, a.max_grad_norm)
                optimizer.step()
                lr.step()
                optimizer.zero_grad(set_to_none=True)

            parts[f"optimizer_{name}"] = (fill, step)
        return parts

    def time_part(self, name: str) -> float:
        fill, run = self.parts[name]
        if fill is not None:
            fill()
        seconds = timed(run, self.acc.device)
        for module in (self.models.generator, self.models.fake_score, self.models.discriminator_heads):
            if module is not None:
                module.zero_grad(set_to_none=True)
        return seconds

    def held(self) -> tuple[dict, dict]:
        """(bytes held, parameter counts): every distinct parameter once (frozen or trainable weights), a gradient
        per trainable one, the optimizers' AdamW moments (two per parameter, in its dtype, allocated or not)."""
        m, seen, held, counts = self.models, set(), collections.Counter(), collections.Counter()
        text = [v for value in self.adapter.text_modules.values()  # modules, lists of them, or a text-only pipeline
                for v in (value if isinstance(value, list) else getattr(value, "components", {0: value}).values())
                if isinstance(v, torch.nn.Module) and v is not m.teacher_base]
        roles = [("generator", m.generator), ("fake_score", m.fake_score), ("discriminator_heads",  # (a LoRA role's
                 m.discriminator_heads), ("teacher", m.teacher_base)] + [("text_encoders", e) for e in text]  # first)
        for role, module in roles:
            for p in module.parameters() if module is not None else ():
                if p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    size = p.numel() * p.element_size()
                    held["weights_trainable" if p.requires_grad else "weights_frozen"] += size
                    held["gradients"] += size * p.requires_grad
                    counts[f"{role}_{'trainable' if p.requires_grad else 'frozen'}"] += p.numel()
        held["optimizer_states"] = sum(2 * p.numel() * p.element_size() for opt in m.optimizers.values()
                                       for g in opt.param_groups for p in g["params"])
        held = {k: held[k] for k in ("weights_frozen", "weights_trainable", "gradients", "optimizer_states")}
        return {**held, "total": sum(held.values())}, dict(counts)


# ---- a worker process: one configuration, or ADM and DMD2 alternated ---------------------------------------------
def timed(fn, device) -> float:
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":")), 0)


def run_worker(spec: dict) -> dict:
    if spec.get("num_threads"):
        torch.set_num_threads(spec["num_threads"])
    import diffusers  # noqa: F401  (import cost outside the memory baseline)
    import peft  # noqa: F401
    from accelerate import Accelerator

    cuda, tmp = spec["device"].startswith("cuda"), tempfile.mkdtemp(prefix="step_cost_")
    accelerator = Accelerator(mixed_precision=spec["mixed_precision"], cpu=not cuda)
    torch.manual_seed(0)
    if spec.get("paired"):  # ADM and DMD2 side by side, iterations alternated: immune to the load drifting
        runs = {loss: Run({**spec, "distribution_loss": loss}, accelerator, os.path.join(tmp, loss))
                for loss in ("adm", "dmd")}
        for run in runs.values():
            for step in range(spec["warmup"]):
                run.iterate(step)
        times = {loss: [] for loss in runs}
        for r in range(spec["repeats"]):
            for loss in (["adm", "dmd"] if r % 2 == 0 else ["dmd", "adm"]):
                times[loss].append(runs[loss].iterate(spec["warmup"] + r)[0])
        return {"iteration_seconds": times,
                "adm_over_dmd_median_of_pairs": statistics.median(a / d for a, d in zip(times["adm"], times["dmd"])),
                "adm_over_dmd_ratio_of_medians": statistics.median(times["adm"]) / statistics.median(times["dmd"])}

    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    base = 0 if cuda else rss("VmRSS")
    peak = lambda: torch.cuda.max_memory_allocated() if cuda else rss("VmHWM") - base  # noqa: E731
    run = Run(spec, accelerator, tmp)
    for step in range(spec["warmup"]):
        run.iterate(step)
    peak_bytes = peak()  # build + first iteration(s): optimizer states and every activation allocated
    held, parameters = run.held()
    for name in run.parts:  # warm-up of each pass
        run.time_part(name)
    seconds, sums, part_times, counts, ks, logs = [], [], collections.defaultdict(list), [], [], {}
    for r in range(spec["repeats"]):
        s, logs, c = run.iterate(spec["warmup"] + r)
        if set(c) - set(run.parts):
            raise RuntimeError(f"the iteration made passes not timed alone: {sorted(set(c) - set(run.parts))}")
        for name in (list(run.parts) if r % 2 == 0 else list(reversed(run.parts))):
            part_times[name].append(run.time_part(name))
        seconds.append(s)
        counts.append(c)
        ks.append(logs.get("student_step_index", 0.0))  # the generator update's k (backward-simulation passes)
        sums.append(sum(n * part_times[p][-1] for p, n in c.items()))
    peak_bytes = peak_bytes if cuda else max(peak_bytes, peak())  # passes allocate no more than an iteration
    return {
        "spec": {k: v for k, v in spec.items() if k != "teacher_dir"},
        "run_args": {k: v for k, v in vars(run.args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "adapter": type(run.adapter).__name__, "discriminator_blocks": run.blocks,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "parameters": parameters, "bytes_held": held,
        # a second frozen teacher for D (not built) would hold exactly the teacher's frozen weights once more
        "teacher_second_copy_bytes": sum(p.numel() * p.element_size() for p in run.models.teacher_base.parameters()
                                         if not p.requires_grad),
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "cpu RSS high-water above baseline",
        "peak_over_held": peak_bytes / held["total"],
        "iteration_seconds": seconds, "iteration_seconds_median": statistics.median(seconds),
        "parts_seconds_median": {name: statistics.median(v) for name, v in part_times.items()},
        "part_counts_per_iteration": counts,
        "part_counts_mean": {p: statistics.mean(c.get(p, 0) for c in counts) for p in run.parts
                             if any(p in c for c in counts)},
        "sum_of_parts_seconds": sums, "student_step_index_per_iteration": ks,
        # per repeat: that iteration against its own passes (timed right after it), then the median
        "iteration_over_sum_of_parts": statistics.median(i / s for i, s in zip(seconds, sums)),
        "last_iteration_logs": {k: float(v) for k, v in logs.items()},
    }


# ---- the driver: one process per configuration, then the tables --------------------------------------------------
def launch_worker(spec: dict, tmp: str) -> dict:
    spec_path, out_path = (os.path.join(tmp, f"{kind}_{spec['name']}.json") for kind in ("spec", "result"))
    with open(spec_path, "w") as f:
        json.dump({**spec, "result_path": out_path}, f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_path], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"worker {spec['name']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        if not spec["name"].startswith("plan_"):
            raise RuntimeError(message)
        oom = "out of memory" in proc.stderr.lower()  # a row of the plan, not the end of the run
        print(f"  {spec['name']}: FAILED{' (out of memory)' if oom else ''}; see the JSON", flush=True)
        return {"spec": {k: v for k, v in spec.items() if k != "teacher_dir"}, "error": message, "out_of_memory": oom}
    with open(out_path) as f:
        result = {**json.load(f), "worker_wall_seconds": time.perf_counter() - start}
    print(f"  {spec['name']}: " + (f"ADM / DMD2 alternated in one process {result['adm_over_dmd_median_of_pairs']:.2f}"
          if spec.get("paired") else f"{result['iteration_seconds_median']:.3f} s/iteration, iteration/sum of parts "
          f"{result['iteration_over_sum_of_parts']:.2f}, peak {result['peak_memory_bytes'] / MB:.0f} MB vs held "
          f"{result['bytes_held']['total'] / MB:.0f} MB") + f" ({result['worker_wall_seconds']:.0f} s)", flush=True)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        with open(args.worker) as f:
            spec = json.load(f)
        with open(spec["result_path"], "w") as f:
            json.dump(run_worker(spec), f, indent=2)
        return None
    tmp = tempfile.mkdtemp(prefix="step_cost_")
    teacher_info, teacher_dir = {"teacher": args.teacher_dir}, args.teacher_dir
    if teacher_dir is None or not os.path.isdir(teacher_dir):
        teacher_dir = teacher_dir or os.path.join(tmp, "teacher")
        print(f"Building the {args.size} {args.script} teacher in {teacher_dir} ...", flush=True)
        teacher_info = build_teacher(args.script, args.size, args.resolution, teacher_dir, args.reduced_denoiser)
    base = {k: getattr(args, k) for k in ("script", "size", "resolution", "batch_size", "mixed_precision",
                                          "gradient_checkpointing", "precompute_text_embeddings", "repeats", "warmup",
                                          "device", "num_threads", *PASSED_THROUGH)}
    base["teacher_dir"] = teacher_dir
    losses = ["adm", "dmd"] if args.distribution_loss == "both" else [args.distribution_loss]
    specs = [{**base, "name": loss, "distribution_loss": loss} for loss in losses]
    if args.memory_plan:
        adm = {**base, "distribution_loss": "adm"}
        fake_rank = loop_args(adm, tmp).fake_score_lora_rank  # the recipe's, or the flag's
        specs += [{**adm, "name": "plan_bf16", "mixed_precision": "bf16"} if args.mixed_precision != "bf16" else
                  {**adm, "name": "plan_fp32", "mixed_precision": "no"},
                  {**adm, "name": "plan_gc", "gradient_checkpointing": not args.gradient_checkpointing},
                  {**adm, "name": "plan_fake_lora" if fake_rank == 0 else "plan_fake_full",
                   "fake_score_lora_rank": 8 if fake_rank == 0 else 0}]
    if args.text_cache:
        spec = {**base, "name": "adm_text_cache", "distribution_loss": "adm",
                "text_embeddings_cache": os.path.join(tmp, "text_embeddings")}
        build_text_cache(spec, tmp)
        specs.append(spec)
        if "adm" not in losses:
            specs.append({**base, "name": "adm", "distribution_loss": "adm"})
    if len(losses) == 2 and not args.no_paired and args.size != "full":
        specs.append({**base, "name": "paired", "paired": True, "distribution_loss": "adm"})
    results = {spec["name"]: launch_worker(spec, tmp) for spec in specs}
    summary = summarize(args, teacher_info, results, results.pop("paired", None))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"step_cost_{args.script}_{args.size}")
    with open(stem + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(table := markdown(summary))
    print(f"{table}Wrote {stem}.json and {stem}.md")
    return summary


def build_text_cache(spec: dict, tmp: str) -> None:
    """The benchmark prompts' text-embedding cache, built as a run builds it (one process), before the measured
    worker starts."""
    from accelerate import Accelerator

    from dmdx.pipelines.teachers import ADAPTERS
    from dmdx.training.loop import fill_text_cache, open_text_cache
    from dmdx.training.plumbing import weight_dtype_of

    os.makedirs(folder := os.path.join(tmp, "cache_args"), exist_ok=True)
    args = loop_args(spec, folder)
    cls = ADAPTERS[spec["script"]]
    own = {k: getattr(args, k) for k in inspect.signature(cls.__init__).parameters if k in RECIPES[spec["script"]]}
    adapter = cls(args.pretrained_model_name_or_path, resolution=args.resolution, **own)
    accelerator = Accelerator(mixed_precision=spec["mixed_precision"], cpu=not spec["device"].startswith("cuda"))
    cache = open_text_cache(adapter, args, PROMPTS)
    fill_text_cache(adapter, cache, PROMPTS, accelerator.device, weight_dtype_of(accelerator), rank=0, world=1,
                    barrier=lambda: None)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def summarize(args, teacher_info: dict, results: dict, paired: dict | None) -> dict:
    summary = {"command": "python benchmarks/step_cost.py " + " ".join(sys.argv[1:]), "script": args.script,
               "size": args.size, "resolution": args.resolution, "batch_size": args.batch_size,
               "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
               "teacher": teacher_info, "device": next(iter(results.values()))["device"], "runs": results,
               "targets": {"iteration_over_sum_of_parts_max": 1.15, "adm_over_dmd_update_cost_max": 1.0}}
    if "adm" in results and "dmd" in results:
        adm, dmd = results["adm"], results["dmd"]
        summary["adm_over_dmd_update_cost_measured"] = adm["iteration_seconds_median"] / dmd["iteration_seconds_median"]
        # the passes each run made (mean over its repeats), priced with the ADM process's timings of them
        price = lambda run: sum(n * adm["parts_seconds_median"][p] for p, n in run["part_counts_mean"].items())  # noqa
        summary["adm_over_dmd_update_cost_from_parts"] = price(adm) / price(dmd)
    if paired:
        summary["paired_iterations"] = paired
        summary["adm_over_dmd_update_cost_paired"] = paired["adm_over_dmd_median_of_pairs"]
    if "adm_text_cache" in results and "adm" in results:
        cached, plain = results["adm_text_cache"], results["adm"]
        summary["text_cache"] = {
            "what": "ADM fed by the text-embedding cache (no text encoder loaded) / ADM encoding each batch with the "
                    "text encoders loaded (the scripts' default without a cache); separate processes",
            "iteration_seconds_ratio": cached["iteration_seconds_median"] / plain["iteration_seconds_median"],
            "peak_memory_ratio": cached["peak_memory_bytes"] / plain["peak_memory_bytes"],
            "bytes_held_ratio": cached["bytes_held"]["total"] / plain["bytes_held"]["total"],
            "text_encode_seconds_alone": plain["parts_seconds_median"].get("text_encode"),
            "text_encodes_per_iteration": plain["part_counts_mean"].get("text_encode"),
            # drift-free: both runs' passes priced with the plain run's timings of them (the two processes ran at
            # different times on a shared machine; their own timings of the same pass differ by the load)
            "iteration_seconds_ratio_from_parts": sum(
                n * plain["parts_seconds_median"][p] for p, n in cached["part_counts_mean"].items()) / sum(
                n * plain["parts_seconds_median"][p] for p, n in plain["part_counts_mean"].items())}
    plan = [run for name, run in results.items() if name.startswith("plan_")]
    if plan and "adm" in results:
        ref = results["adm"]
        peak0, held0, second = ref["peak_memory_bytes"], ref["bytes_held"]["total"], ref["teacher_second_copy_bytes"]

        def row(variant, peak=None, held=None, seconds=None, error=None):
            return {"variant": variant, "peak_memory_bytes": peak, "bytes_held": held, "iteration_seconds": seconds,
                    "peak_vs_reference": peak and peak / peak0, "held_vs_reference": held and held / held0,
                    **({"error": error} if error else {})}

        summary["memory_plan"] = [
            row(describe(ref), peak0, held0, ref["iteration_seconds_median"]),
            row("counterfactual: a second frozen teacher for D (not built; its bytes from the parameter count)",
                peak0 + second, held0 + second)] + [
            row(describe(run), error="out of memory" if run["out_of_memory"] else "failed") if "error" in run else
            row(describe(run), run["peak_memory_bytes"], run["bytes_held"]["total"], run["iteration_seconds_median"])
            for run in plan]
    return summary


def describe(run: dict) -> str:
    spec, fake = run["spec"], run.get("run_args", run["spec"])["fake_score_lora_rank"]
    fake = "?" if fake is None else "full" if fake == 0 else f"LoRA r={fake}"
    return (f"frozen modules {'fp32' if spec['mixed_precision'] == 'no' else spec['mixed_precision']}, gradient "
            f"checkpointing {'on' if spec['gradient_checkpointing'] else 'off'}, fake score {fake}, teacher shared "
            "as D backbone")


def markdown(summary: dict) -> str:
    runs = {k: v for k, v in summary["runs"].items() if not k.startswith("plan_")}
    teacher, first = summary["teacher"], next(iter(runs.values()))
    flags = "".join(f", --{f} {first['spec'][f]}" for f in PASSED_THROUGH if first["spec"].get(f) is not None)
    size = (f" ({teacher['denoiser_class']}, {teacher['denoiser_parameters'] / 1e6:.1f} M parameters)"
            if "denoiser_parameters" in teacher else "")
    lines = [f"### Step cost: {summary['script']} ({summary['size']}{flags}), {summary['resolution']} px, batch "
             f"{summary['batch_size']}, mixed precision {summary['mixed_precision']}, gradient checkpointing "
             f"{'on' if summary['gradient_checkpointing'] else 'off'}; {summary['device']}", "",
             f"Teacher: {teacher['teacher']}{size}. Iteration: `dmdx.training.loop.train_iteration` through "
             f"`{first['adapter']}`.", "",
             "| loss (fake:G updates) | s / iteration | sum of parts (s) | iteration / sum of parts | peak memory (MB) "
             "| held: weights + grads + Adam (MB) | peak / held |", "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        k = run["student_step_index_per_iteration"]
        k = f", mean k={statistics.mean(k):.1f}" if any(k) else ""
        lines.append(f"| {name} ({run['run_args']['fake_score_update_ratio']}:1{k}) | "
                     f"{run['iteration_seconds_median']:.4f} | {statistics.median(run['sum_of_parts_seconds']):.4f} | "
                     f"{run['iteration_over_sum_of_parts']:.2f} | {run['peak_memory_bytes'] / MB:.1f} | "
                     f"{run['bytes_held']['total'] / MB:.1f} | {run['peak_over_held']:.2f} |")
    if "adm_over_dmd_update_cost_measured" in summary:
        paired = summary.get("adm_over_dmd_update_cost_paired")
        lines += ["", "ADM generator update (1:1) vs DMD2 generator update (5:1): " + (
            f"**{paired:.2f}x** (both built in one process, iterations alternated, median of "
            f"{len(summary['paired_iterations']['iteration_seconds']['adm'])} pairs); " if paired else "")
            + f"{summary['adm_over_dmd_update_cost_measured']:.2f}x from the two runs above (separate processes); "
            f"{summary['adm_over_dmd_update_cost_from_parts']:.2f}x from the passes each run made, priced with the "
            "ADM run's timings of them. Target <= 1.00."]
    for name, run in runs.items():
        lines += ["", f"Passes of the {name} iteration (median seconds alone x calls counted per iteration, mean of "
                      f"{len(run['iteration_seconds'])}):", "", "| part | s | count | s x count |", "|---|---|---|---|"]
        lines += [f"| {part} | {sec:.4f} | {run['part_counts_mean'][part]:.3g} | "
                  f"{sec * run['part_counts_mean'][part]:.4f} |" for part, sec in run["parts_seconds_median"].items()
                  if run["part_counts_mean"].get(part)]
    if "text_cache" in summary:
        tc = summary["text_cache"]
        lines += ["", f"Text-embedding cache: ADM reading it (no text encoder loaded) / ADM encoding every batch: "
                      f"iteration time **{tc['iteration_seconds_ratio_from_parts']:.3f}x** from the passes each "
                      "run made, priced with the encoding run's timings of them "
                      f"({tc['iteration_seconds_ratio']:.2f}x measured, separate processes: machine load included); "
                      f"peak memory **{tc['peak_memory_ratio']:.2f}x**, weights + grads + Adam held "
                      f"{tc['bytes_held_ratio']:.3f}x. The run without the cache encodes "
                      f"{tc['text_encodes_per_iteration']:.3g} batches per iteration at "
                      f"{tc['text_encode_seconds_alone']:.4f} s each."]
    if "memory_plan" in summary:
        lines += ["", "Memory plan (ADM; each row its own process; ratios against the first row):", "",
                  "| configuration | peak memory (MB) | peak vs first | held (MB) | held vs first | s / iteration |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['error']} | - | - | - | - |" if r.get("error") else
                  f"| {r['variant']} | {r['peak_memory_bytes'] / MB:.1f} | {r['peak_vs_reference']:.2f} | "
                  f"{r['bytes_held'] / MB:.1f} | {r['held_vs_reference']:.2f} | "
                  + (f"{r['iteration_seconds']:.3g} |" if r["iteration_seconds"] is not None else "- |")
                  for r in summary["memory_plan"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
