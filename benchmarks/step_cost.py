"""What one training iteration of the ADM / DMD2 scripts costs: time against its network passes, memory against what
the run must hold, and the memory plan (shared teacher, frozen modules in bf16, gradient checkpointing, LoRA).

    python benchmarks/step_cost.py --script sdxl --size tiny                      # CPU, a minute or two
    python benchmarks/step_cost.py --script sdxl --size tiny --memory_plan
    python benchmarks/step_cost.py --script sd3 --size full --mixed_precision bf16 --resolution 1024  # a GPU

The iteration timed is the script's own: ``distill_scripts/train_adm_{sdxl,sd3}.py`` is imported and its
``build_models`` / optimizer set-up / ``train_iteration`` run unchanged (one iteration = one generator update; ``adm``
at 1:1 fake-score updates, ``dmd`` at DMD2's 5:1). The parts are then timed alone by calling the same built models:
text encoding (SDXL encodes each batch), the generator without gradients (fake-score inputs; backward simulation),
the generator forward/backward, the fake score forward/backward (its own update), the teacher forward with CFG
(conditional and unconditional halves in one batch, as the scripts do), the fake score with frozen weights and a
gradient through its input (ADM's generator loss) or without gradients (DMD2), the discriminator (teacher backbone
features + heads) with a gradient through its input, the discriminator update (backbone without autograd on real
and fake, heads forward/backward), and each optimizer step (gradient clipping + AdamW). ``iteration / sum of parts``
= measured iteration / sum over parts of (median time x how often the iteration does it).

Teachers: ``--size tiny`` saves ``dmdx.pipelines.tiny_components`` pipelines to a temporary folder (``small``: a 24
M-parameter UNet / 6-block MMDiT from the same module, for the CPU memory plan); ``--size full`` builds the real-
size SDXL UNet / SD3-Medium transformer (and real-size VAE) from their published config values with random weights
(``--reduced_denoiser`` keeps every other width real but shrinks the denoiser: a smoke test on a CPU). Their text
encoders are 1-layer stand-ins with the real hidden sizes (frozen, and for SD3 precomputed, so they only produce
inputs of the right shapes); say so when quoting memory. ``--teacher_dir`` benchmarks any existing pipeline folder
instead.

Each configuration runs in its own process (peak memory must not carry over): CPU peak = the process's resident-set
high-water mark (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs`` once the libraries are
imported) minus the resident set at that moment; CUDA peak = ``torch.cuda.max_memory_allocated``. Writes
``step_cost_<script>_<size>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from dmdx.training import frozen_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS_DIR = os.path.join(ROOT, "distill_scripts")
SCRIPT_MODULES = {"sdxl": "train_adm_sdxl", "sd3": "train_adm_sd3"}
PROMPTS = ["a handwritten digit zero", "a handwritten digit three", "a handwritten digit seven", "a handwritten digit"]
MB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--script", default="sdxl", choices=["sdxl", "sd3"])
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "full"],
                   help="tiny: the tests' models (1 M parameters); small: a 24 M-parameter SDXL UNet / 6-block MMDiT "
                        "(CPU memory plan); full: SDXL / SD3-Medium real size (a GPU).")
    p.add_argument("--teacher_dir", default=None,
                   help="Benchmark this pipeline folder; if it does not exist, build the --size teacher there and keep "
                        "it (reuse it across runs, e.g. a batch-size sweep at full size).")
    p.add_argument("--reduced_denoiser", action="store_true",
                   help="--size full only, a smoke test of the real-size path on a small machine: real text-encoder, "
                        "VAE and conditioning widths, but a 1-block MMDiT / a UNet with channels 64/128/256.")
    p.add_argument("--distribution_loss", default="both", choices=["adm", "dmd", "both"])
    p.add_argument("--resolution", type=int, default=None, help="Pixels (default: 32 tiny/small, 1024 full).")
    p.add_argument("--batch_size", type=int, default=None, help="Per device (default: 2 tiny, 1 full).")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Default: no on CPU, bf16 on CUDA.")
    p.add_argument("--fake_score_lora_rank", type=int, default=None, help="Default: the script's default.")
    p.add_argument("--lora_rank", type=int, default=None, help="Generator LoRA rank (default: the script's).")
    p.add_argument("--discriminator_head_channels", type=int, default=None, help="Default: the script's.")
    p.add_argument("--repeats", type=int, default=3, help="Timed iterations (and timings of each part).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed iterations first.")
    p.add_argument("--memory_plan", action="store_true",
                   help="Also run ADM with --mixed_precision bf16, --gradient_checkpointing and the other fake-score "
                        "kind (LoRA r=8 / full), each in its own process, for the memory-plan table.")
    p.add_argument("--no_paired", action="store_true",
                   help="Skip the process that builds ADM and DMD2 side by side and alternates their iterations "
                        "(automatically skipped for --size full: two sets of real-size models do not fit).")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads in every worker.")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: JSON spec of one configuration
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.resolution is None:
        args.resolution = 1024 if args.size == "full" else 32
    if args.batch_size is None:
        args.batch_size = 1 if args.size == "full" else 2
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device.startswith("cuda") else "no"
    if args.reduced_denoiser and args.size != "full":
        p.error("--reduced_denoiser is for --size full.")
    if min(args.repeats, args.batch_size, args.resolution) < 1 or args.warmup < 0:
        p.error("--repeats, --batch_size and --resolution must be >= 1, --warmup >= 0.")
    return args


# ------------------------------------------------------------------------------------------------------------------
# Teachers
# ------------------------------------------------------------------------------------------------------------------
def build_teacher(script: str, size: str, resolution: int, path: str, reduced: bool = False) -> dict:
    """Save a teacher pipeline folder at ``path``; returns what was built (parameter counts, stand-ins)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from dmdx.pipelines import tiny_components as tc

    if size in ("tiny", "small"):
        small = size == "small"
        if script == "sdxl":
            kw = {"block_out_channels": (64, 128, 256), "layers_per_block": 2, "text_hidden": 64} if small else {}
            comps = tc.sdxl_components(sample_size=resolution // 2, **kw)
            pipe = StableDiffusionXLPipeline(**comps)
        else:
            kw = {"num_layers": 6, "attention_head_dim": 32, "num_attention_heads": 8, "text_hidden": 64} if small \
                else {}
            comps = tc.sd3_components(sample_size=resolution // 2, **kw)
            pipe = StableDiffusion3Pipeline(**comps)
        note = f"dmdx.pipelines.tiny_components{' (small configuration)' if small else ''}, random weights"
    else:
        comps = full_sdxl_components(reduced) if script == "sdxl" else full_sd3_components(reduced)
        pipe = (StableDiffusionXLPipeline if script == "sdxl" else StableDiffusion3Pipeline)(**comps)
        note = ("real-size denoiser and VAE from the published configs (random weights); text encoders are 1-layer "
                "stand-ins with the real hidden sizes")
        if reduced:
            note = ("REDUCED denoiser (smoke test: real conditioning widths, " + ("1 MMDiT block" if script == "sd3"
                    else "UNet channels 64/128/256") + "); VAE from the published config; 1-layer text encoders")
    denoiser = pipe.unet if script == "sdxl" else pipe.transformer
    info = {"teacher": note, "denoiser_class": type(denoiser).__name__,
            "denoiser_parameters": sum(p.numel() for p in denoiser.parameters())}
    if size == "full":  # random weights: store them in bf16 (half the disk and load time; the scripts cast on load)
        pipe.to(torch.bfloat16)
    pipe.save_pretrained(path)
    del pipe, comps, denoiser
    gc.collect()
    return info


def _stand_in_clip(hidden: int, projection: int, with_projection: bool):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dmdx.pipelines.tiny_components import clip_text_config

    config = clip_text_config(hidden, projection, num_layers=1, max_positions=77)
    config.num_attention_heads = hidden // 64
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def full_sdxl_components(reduced: bool = False) -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0's UNet and VAE configs (random weights); 1-layer CLIP stand-ins with
    the real widths (768 and 1280, projection 1280) and byte-level tokenizers of length 77."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from dmdx.pipelines.tiny_components import byte_clip_tokenizer

    size = {"layers_per_block": 2, "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
            "transformer_layers_per_block": (1, 2, 10)}
    if reduced:
        size = {"layers_per_block": 1, "block_out_channels": (64, 128, 256), "attention_head_dim": (1, 2, 4),
                "transformer_layers_per_block": (1, 1, 1)}
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, **size,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
        sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon",
                                       timestep_spacing="leading", steps_offset=1)
    return {"unet": unet, "vae": vae, "scheduler": scheduler,
            "text_encoder": _stand_in_clip(768, 768, False), "tokenizer": byte_clip_tokenizer(77),
            "text_encoder_2": _stand_in_clip(1280, 1280, True), "tokenizer_2": byte_clip_tokenizer(77, "!"),
            "image_encoder": None, "feature_extractor": None}


def full_sd3_components(reduced: bool = False) -> dict:
    """stabilityai/stable-diffusion-3-medium-diffusers' transformer and VAE configs (random weights); 1-layer stand-ins
    for CLIP-L (768), CLIP-G (1280) and T5-XXL (4096 wide, 256 tokens)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    from dmdx.pipelines.tiny_components import byte_clip_tokenizer, t5_tokenizer

    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=1 if reduced else 24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=192)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
        sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
        use_post_quant_conv=False)
    t5 = T5EncoderModel(T5Config(vocab_size=3 + 2 * 94 + 1, d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                 num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=8)).eval()
    return {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
            "text_encoder": _stand_in_clip(768, 768, True), "tokenizer": byte_clip_tokenizer(77),
            "text_encoder_2": _stand_in_clip(1280, 1280, True), "tokenizer_2": byte_clip_tokenizer(77),
            "text_encoder_3": t5, "tokenizer_3": t5_tokenizer(256), "image_encoder": None, "feature_extractor": None}


# ------------------------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class MemoryMeter:
    """Peak memory since ``reset()``: CUDA max allocated, or the CPU resident-set high-water mark above the resident
    set at reset time."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.base = 0

    def reset(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = 0
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            except OSError:
                pass
            self.base = _proc_status_kb("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_status_kb("VmHWM") * 1024 - self.base


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def held_bytes(modules: dict, optimizers: dict) -> dict:
    """Bytes the run must hold, from the built modules: every distinct parameter tensor once (weights), a gradient
    for each trainable one, and the optimizers' states as they are allocated (AdamW: two moments)."""
    seen, frozen, trainable, grads = set(), 0, 0, 0
    for module in modules.values():
        if module is None:
            continue
        for p in module.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            size = p.numel() * p.element_size()
            if getattr(p, "_dmdx_trainable", p.requires_grad):
                trainable += size
                grads += size
            else:
                frozen += size
    states = 0
    for opt in optimizers.values():
        for group in opt.param_groups:
            for p in group["params"]:
                # AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype (counted even before the first step)
                states += 2 * p.numel() * p.element_size()
    return {"weights_frozen": frozen, "weights_trainable": trainable, "gradients": grads,
            "optimizer_states": states, "total": frozen + trainable + grads + states}


def _count(module, trainable: bool | None = None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters()
               if trainable is None or getattr(p, "_dmdx_trainable", p.requires_grad) == trainable)


def optimizer_step_part(acc, module, optimizer, max_grad_norm):
    """A part: clip + AdamW step + zero_grad of ``module`` (the gradients are filled before timing)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def fill():
        for p in params:
            p.grad = torch.full_like(p, 1e-8)

    def step():
        acc.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return fill, step


# ------------------------------------------------------------------------------------------------------------------
# One configuration (a worker process)
# ------------------------------------------------------------------------------------------------------------------
def script_argv(spec: dict, teacher: str, prompts_file: str, output_dir: str) -> list[str]:
    argv = ["--pretrained_model_name_or_path", teacher, "--prompts_file", prompts_file, "--output_dir", output_dir,
            "--resolution", str(spec["resolution"]), "--train_batch_size", str(spec["batch_size"]),
            "--distribution_loss", spec["distribution_loss"], "--mixed_precision", spec["mixed_precision"],
            "--max_train_steps", "1000"]
    if spec["gradient_checkpointing"]:
        argv.append("--gradient_checkpointing")
    for flag in ("fake_score_lora_rank", "lora_rank", "discriminator_head_channels"):
        if spec.get(flag) is not None:
            argv += [f"--{flag}", str(spec[flag])]
    if spec["script"] == "sd3":  # text embeddings once (the recipes' setting); tiny tokenizers hold 32 tokens
        argv.append("--precompute_text_embeddings")
        if spec["size"] != "full":
            argv += ["--max_sequence_length", "32"]
    return argv


def _setup(mod, spec: dict, accelerator, tmp: str, loss: str):
    """The script's own models, optimizers and ``train_iteration`` for ``loss``; returns (parts, iterate)."""
    os.makedirs(tmp, exist_ok=True)
    prompts_file = os.path.join(tmp, "prompts.txt")
    with open(prompts_file, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    spec = {**spec, "distribution_loss": loss}
    args = mod.parse_args(script_argv(spec, spec["teacher_dir"], prompts_file, os.path.join(tmp, "out")))
    if spec["script"] == "sdxl":
        args.num_processes = 1
        models = mod.build_models(args, accelerator)
        mod.create_optimizers(args, models)
        mod.prepare(accelerator, models)
        state = SdxlParts(mod, args, accelerator, models, PROMPTS)
        return state, lambda step: mod.train_iteration(args, accelerator, models, PROMPTS, step)
    models = mod.build_models(args, accelerator, mod.inspect_teacher(args), _weight_dtype(args.mixed_precision))
    source = mod.build_prompt_source(args, models, PROMPTS, accelerator.device)
    opt = mod.prepare_training(args, accelerator, models)
    state = Sd3Parts(mod, args, accelerator, models, opt, source)
    return state, lambda step: mod.train_iteration(models, opt, args, accelerator, source, step)


def _worker_setup(spec: dict):
    if spec.get("num_threads"):
        torch.set_num_threads(spec["num_threads"])
    if SCRIPTS_DIR not in sys.path:
        sys.path.insert(0, SCRIPTS_DIR)
    mod = importlib.import_module(SCRIPT_MODULES[spec["script"]])
    import diffusers  # noqa: F401  (import cost outside the memory baseline)
    import transformers  # noqa: F401
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=spec["mixed_precision"], cpu=not spec["device"].startswith("cuda"))
    torch.manual_seed(0)
    return mod, accelerator, tempfile.mkdtemp(prefix="step_cost_")


def run_paired_worker(spec: dict) -> dict:
    """ADM and DMD2 built side by side in one process, their iterations timed alternately: the update-cost ratio
    is then immune to the machine's load drifting between processes."""
    mod, accelerator, tmp = _worker_setup(spec)
    runs = {loss: _setup(mod, spec, accelerator, os.path.join(tmp, loss), loss) for loss in ("adm", "dmd")}
    for _, iterate in runs.values():
        for step in range(spec["warmup"]):
            iterate(step)
    times = {loss: [] for loss in runs}
    for r in range(spec["repeats"]):
        order = ["adm", "dmd"] if r % 2 == 0 else ["dmd", "adm"]
        for loss in order:
            times[loss].append(timed(lambda it=runs[loss][1], st=spec["warmup"] + r: it(st), spec["device"]))
    return {"iteration_seconds": times,
            "adm_over_dmd_median_of_pairs": statistics.median(a / d for a, d in zip(times["adm"], times["dmd"])),
            "adm_over_dmd_ratio_of_medians": statistics.median(times["adm"]) / statistics.median(times["dmd"])}


def run_worker(spec: dict) -> dict:
    if spec.get("paired"):
        return run_paired_worker(spec)
    mod, accelerator, tmp = _worker_setup(spec)
    device = spec["device"]
    meter = MemoryMeter(device)
    meter.reset()
    state, iterate = _setup(mod, spec, accelerator, tmp, spec["distribution_loss"])
    args = state.args

    step = 0
    for _ in range(spec["warmup"]):
        iterate(step)
        step += 1
    peak = meter.peak()  # build + first iteration(s): optimizer states and every activation have been allocated
    held = held_bytes(state.modules(), state.optimizers())

    iteration_times, iteration_sums, part_times, last_logs = [], [], {name: [] for name in state.parts}, {}
    step_indices = []
    for fn in state.parts.values():  # warm-up of each part
        fn()
    for r in range(spec["repeats"]):
        seconds, logs = _time_iteration(iterate, step, device)
        step += 1
        iteration_times.append(seconds)
        last_logs = logs
        step_indices.append(logs.get("student_step_index", 0.0))
        names = list(state.parts) if r % 2 == 0 else list(reversed(state.parts))
        for name in names:
            part_times[name].append(state.time_part(name))
        counts = state.counts(logs)
        iteration_sums.append(sum(counts[n] * part_times[n][-1] for n in counts))
    if not device.startswith("cuda"):
        peak = max(peak, meter.peak())  # the timed iterations (parts allocate no more than an iteration)

    medians = {name: statistics.median(v) for name, v in part_times.items()}
    counts = state.counts(last_logs)
    result = {
        "spec": {k: v for k, v in spec.items() if k != "teacher_dir"},
        "script_args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} "
                                                                                   f"threads)",
        "parameters": state.parameter_counts(),
        "bytes_held": held,
        "teacher_second_copy_bytes": sum(p.numel() * p.element_size() for p in state.teacher.parameters()),
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.startswith("cuda") else "cpu RSS high-water "
                                                                                          "above baseline",
        "peak_over_held": peak / held["total"] if held["total"] else float("nan"),
        "iteration_seconds": iteration_times,
        "iteration_seconds_median": statistics.median(iteration_times),
        "parts_seconds_median": medians,
        "part_counts_last_iteration": counts,
        "sum_of_parts_seconds": iteration_sums,
        "student_step_index_per_iteration": step_indices,  # SD3: generator passes of backward simulation
        # per repeat: that iteration against its own parts (measured right after it), then the median
        "iteration_over_sum_of_parts": statistics.median(i / s for i, s in zip(iteration_times, iteration_sums)),
        "last_iteration_logs": {k: float(v) for k, v in last_logs.items()},
    }
    # DMD2's 5:1 and ADM's 1:1 generator updates predicted from this process's parts (the same noise for both)
    # (SD3: at the expected number of backward-simulation passes, (K - 1) / 2 for a K-step student)
    expected = {"student_step_index": (args.num_student_steps - 1) / 2}
    result["predicted_update_seconds"] = {loss: sum(c * medians[n] for n, c in state.counts(expected, loss).items()
                                                    if n in medians)
                                          for loss in state.predictable_losses()}
    return result


def _time_iteration(iterate, step, device):
    logs = {}

    def run():
        logs.update(iterate(step))

    return timed(run, device), logs


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


class _Parts:
    """Each network pass of an iteration as a closure over the script's built models, and how often an iteration
    makes it."""

    parts: dict
    device: str

    def time_part(self, name: str) -> float:
        fill = self.fills.get(name)
        if fill is not None:
            fill()
        return timed(self.parts[name], self.device)

    def predictable_losses(self) -> list[str]:
        return ["adm", "dmd"] if "discriminator_fwd_bwd_input_grad" in self.parts else ["dmd"]


class SdxlParts(_Parts):
    def __init__(self, mod, args, acc, models, prompts):
        self.mod, self.args, self.acc, self.m = mod, args, acc, models
        self.device = str(acc.device)
        self.teacher = models.teacher
        st = self.st = mod._Step(args, acc, models, prompts)
        m = models
        fake_plain = acc.unwrap_model(m.fake_score)
        heads_plain = acc.unwrap_model(m.heads) if m.heads is not None else None
        b = args.train_batch_size
        with torch.no_grad(), acc.autocast():
            cond, uncond = st.batch()
            x0 = st.generate(m.generator, cond)
            t, s = st.noise_level(b)
            x_t = m.teacher_schedule.add_noise(x0, torch.randn_like(x0), t)
            x_s = x_t.clone()

        def autocast(fn):
            def run():
                with acc.autocast():
                    fn()
                for module in (m.generator, m.fake_score, m.heads):
                    if module is not None:
                        module.zero_grad(set_to_none=True)
            return run

        def gen_nograd():
            with torch.no_grad():
                st.generate(m.generator, cond)

        def gen_fwd_bwd():
            st.generate(m.generator, cond).float().mean().backward()

        def fake_fwd_bwd():
            mod.unet_output(m.fake_score, x_t, t, cond).mean().backward()

        def teacher_cfg():
            st.real_x0(x_t, t, cond, uncond)

        def fake_input_grad():
            with frozen_parameters(fake_plain):
                st.fake_x0(fake_plain, x_t.detach().requires_grad_(True), t, cond).sum().backward()

        def fake_nograd():
            with torch.no_grad():
                st.fake_x0(fake_plain, x_t, t, cond)

        self.parts = {"text_encode": autocast(st.batch), "generator_forward_nograd": autocast(gen_nograd),
                      "generator_fwd_bwd": autocast(gen_fwd_bwd), "fake_score_fwd_bwd": autocast(fake_fwd_bwd),
                      "teacher_cfg_forward": autocast(teacher_cfg),
                      "fake_score_forward_nograd": autocast(fake_nograd)}
        self.fills = {}
        if m.heads is not None:
            def d_input_grad():
                with frozen_parameters(heads_plain):
                    st.discriminate(heads_plain, x_s.detach().requires_grad_(True), s, cond,
                                    backbone_grad=True).float().mean().backward()

            def d_update():
                logits = st.discriminate(m.heads, torch.cat([x_s, x_s]), torch.cat([s, s]), cond.cat(cond),
                                         backbone_grad=False)
                logits.float().mean().backward()

            self.parts.update({"fake_score_fwd_bwd_input_grad": autocast(fake_input_grad),
                               "discriminator_fwd_bwd_input_grad": autocast(d_input_grad),
                               "discriminator_update_fwd_bwd": autocast(d_update)})
        for name, module in (("generator", m.generator), ("fake_score", m.fake_score), ("discriminator", m.heads)):
            if module is not None:
                fill, step = optimizer_step_part(acc, module, m.optimizers[name], args.max_grad_norm)
                self.parts[f"optimizer_{name}"] = step
                self.fills[f"optimizer_{name}"] = fill

    def counts(self, logs: dict, loss: str | None = None) -> dict:
        loss = loss or self.args.distribution_loss
        ratio = self.args.fake_score_update_ratio if loss == self.args.distribution_loss else (
            5 if loss == "dmd" else 1)
        c = {"text_encode": ratio + 1, "generator_forward_nograd": ratio, "fake_score_fwd_bwd": ratio,
             "optimizer_fake_score": ratio, "generator_fwd_bwd": 1, "teacher_cfg_forward": 1,
             "optimizer_generator": 1}
        if loss == "dmd":
            c["fake_score_forward_nograd"] = 1
        else:
            d = self.args.discriminator_update_ratio
            # further D updates (ratio > 1) draw fresh predictions: text, G, teacher and fake score without grads
            c.update({"fake_score_fwd_bwd_input_grad": 1, "discriminator_fwd_bwd_input_grad": 1,
                      "discriminator_update_fwd_bwd": d, "optimizer_discriminator": d})
            if d > 1:
                for name in ("text_encode", "generator_forward_nograd", "teacher_cfg_forward",
                             "fake_score_forward_nograd"):
                    c[name] = c.get(name, 0) + d - 1
        return c

    def modules(self) -> dict:
        m = self.m
        return {"teacher": m.teacher, "generator": m.generator, "fake_score": m.fake_score, "heads": m.heads,
                "vae": m.vae, **{f"text_encoder_{i}": e for i, e in enumerate(m.text_encoders)}}

    def optimizers(self) -> dict:
        return self.m.optimizers

    def parameter_counts(self) -> dict:
        m = self.m
        return {"teacher": _count(m.teacher), "generator_trainable": _count(m.generator, True),
                "fake_score_trainable": _count(m.fake_score, True), "discriminator_heads": _count(m.heads),
                "vae": _count(m.vae), "text_encoders": sum(_count(e) for e in m.text_encoders)}


class Sd3Parts(_Parts):
    def __init__(self, mod, args, acc, models, opt, source):
        from dmdx.training import apply_cfg, tokens_to_map

        self.mod, self.args, self.acc, self.m, self.opt = mod, args, acc, models, opt
        self.device = str(acc.device)
        self.teacher = models.teacher
        m, schedule, wd = models, models.schedule, models.weight_dtype
        g_dtype, f_dtype = mod._param_dtype(opt.generator), mod._param_dtype(opt.fake_score)
        fake_plain, heads_plain = acc.unwrap_model(opt.fake_score), acc.unwrap_model(opt.heads)
        device = acc.device
        batch = mod.sample_batch(models, args, 0, 0, 0, source, device)
        cond, uncond = mod.text_for(source, models, batch["prompt_idx"], args, device)
        b = batch["z"].shape[0]
        ts = models.timesteps.to(device)
        t_k = ts[0].expand(b)
        t, s = batch["t"][-1], batch["s"][-1]
        gen_x0 = lambda x, tt: schedule.to_x0_noise(mod._call(opt.generator, x, tt, cond, g_dtype), x, tt)[0]
        with torch.no_grad(), acc.autocast():
            x0 = gen_x0(batch["z"], t_k)
            x_t = schedule.add_noise(x0, batch["eps"][-1], t)

        def autocast(fn):
            def run():
                with acc.autocast():
                    fn()
                for module in (opt.generator, opt.fake_score, opt.heads):
                    module.zero_grad(set_to_none=True)
            return run

        def gen_nograd():
            with torch.no_grad():
                gen_x0(batch["z"], t_k)

        def gen_fwd_bwd():
            gen_x0(batch["z"], t_k).mean().backward()

        def fake_fwd_bwd():
            mod._call(opt.fake_score, x_t, t, cond, f_dtype).mean().backward()

        def teacher_cfg():
            with torch.no_grad():
                both = (torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]]))
                out_c, out_u = mod._call(m.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), both, wd).chunk(2)
                schedule.to_x0_noise(apply_cfg(out_c, out_u, args.guidance_scale), x_t, t)

        def fake_input_grad():
            with frozen_parameters(fake_plain):
                x = x_t.detach().requires_grad_(True)
                schedule.to_x0_noise(mod._call(fake_plain, x, t, cond, f_dtype), x, t)[0].sum().backward()

        def fake_nograd():
            with torch.no_grad():
                mod._call(fake_plain, x_t, t, cond, f_dtype)

        def features(x, ss, c):
            feats = m.features(lambda: mod._call(m.teacher, x, ss, c, wd))
            return [tokens_to_map(f, m.grid, m.grid) for f in feats]

        def d_input_grad():
            with frozen_parameters(heads_plain):
                x = x_t.detach().requires_grad_(True)
                heads_plain(features(x, s, cond)).float().mean().backward()

        def d_update():
            with torch.no_grad():
                feats = features(torch.cat([x_t, x_t]), torch.cat([s, s]), tuple(torch.cat([c, c]) for c in cond))
            opt.heads(feats).float().mean().backward()

        self.parts = {"generator_forward_nograd": autocast(gen_nograd), "generator_fwd_bwd": autocast(gen_fwd_bwd),
                      "fake_score_fwd_bwd": autocast(fake_fwd_bwd), "teacher_cfg_forward": autocast(teacher_cfg),
                      "fake_score_forward_nograd": autocast(fake_nograd),
                      "fake_score_fwd_bwd_input_grad": autocast(fake_input_grad),
                      "discriminator_fwd_bwd_input_grad": autocast(d_input_grad),
                      "discriminator_update_fwd_bwd": autocast(d_update)}
        self.fills = {}
        for name, module, optimizer in (("generator", opt.generator, opt.generator_optimizer),
                                        ("fake_score", opt.fake_score, opt.fake_optimizer),
                                        ("discriminator", opt.heads, opt.discriminator_optimizer)):
            fill, step = optimizer_step_part(acc, module, optimizer, args.max_grad_norm)
            self.parts[f"optimizer_{name}"] = step
            self.fills[f"optimizer_{name}"] = fill

    def counts(self, logs: dict, loss: str | None = None) -> dict:
        loss = loss or self.args.distribution_loss
        ratio = self.args.fake_score_update_ratio if loss == self.args.distribution_loss else (
            5 if loss == "dmd" else 1)
        k = logs.get("student_step_index", 0.0)  # backward simulation: k student steps without gradients
        c = {"generator_forward_nograd": k, "generator_fwd_bwd": 1, "fake_score_fwd_bwd": ratio,
             "optimizer_fake_score": ratio, "teacher_cfg_forward": 1, "optimizer_generator": 1}
        if loss == "dmd":
            c["fake_score_forward_nograd"] = 1
        else:
            d = self.args.discriminator_update_ratio
            c.update({"fake_score_fwd_bwd_input_grad": 1, "discriminator_fwd_bwd_input_grad": 1,
                      "discriminator_update_fwd_bwd": d, "optimizer_discriminator": d})
        return c

    def predictable_losses(self) -> list[str]:
        return ["adm", "dmd"]

    def modules(self) -> dict:
        return {"teacher": self.m.teacher, "generator": self.opt.generator, "fake_score": self.opt.fake_score,
                "heads": self.opt.heads}

    def optimizers(self) -> dict:
        return {"generator": self.opt.generator_optimizer, "fake_score": self.opt.fake_optimizer,
                "discriminator": self.opt.discriminator_optimizer}

    def parameter_counts(self) -> dict:
        o = self.opt
        return {"teacher": _count(self.m.teacher), "generator_trainable": _count(o.generator, True),
                "generator_frozen_base": _count(o.generator, False),
                "fake_score_trainable": _count(o.fake_score, True),
                "fake_score_frozen_base": _count(o.fake_score, False),
                "discriminator_heads": _count(o.heads), "text_encoders": 0}


# ------------------------------------------------------------------------------------------------------------------
# The driver: one process per configuration, then tables
# ------------------------------------------------------------------------------------------------------------------
def launch_worker(spec: dict, tmp: str) -> dict:
    spec_path = os.path.join(tmp, f"spec_{spec['name']}.json")
    out_path = os.path.join(tmp, f"result_{spec['name']}.json")
    with open(spec_path, "w") as f:
        json.dump({**spec, "result_path": out_path}, f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_path], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"worker {spec['name']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        if spec["name"].startswith("plan_"):  # e.g. out of memory: a row of the plan, not the end of the run
            oom = "out of memory" in proc.stderr.lower()
            print(f"  {spec['name']}: FAILED{' (out of memory)' if oom else ''}; see the JSON", flush=True)
            return {"spec": {k: v for k, v in spec.items() if k != "teacher_dir"}, "error": message,
                    "out_of_memory": oom}
        raise RuntimeError(message)
    with open(out_path) as f:
        result = json.load(f)
    result["worker_wall_seconds"] = time.perf_counter() - start
    if spec.get("paired"):
        print(f"  {spec['name']}: ADM / DMD2 iteration time, alternating in one process: "
              f"{result['adm_over_dmd_median_of_pairs']:.2f} ({result['worker_wall_seconds']:.0f} s)", flush=True)
        return result
    print(f"  {spec['name']}: {result['iteration_seconds_median']:.3f} s/iteration, iteration/sum of parts "
          f"{result['iteration_over_sum_of_parts']:.2f}, peak {result['peak_memory_bytes'] / MB:.0f} MB vs held "
          f"{result['bytes_held']['total'] / MB:.0f} MB ({result['worker_wall_seconds']:.0f} s)", flush=True)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        with open(args.worker) as f:
            spec = json.load(f)
        result = run_worker(spec)
        with open(spec["result_path"], "w") as f:
            json.dump(result, f, indent=2)
        return result

    tmp = tempfile.mkdtemp(prefix="step_cost_")
    teacher_info = {"teacher": args.teacher_dir}
    teacher_dir = args.teacher_dir
    if teacher_dir is None or not os.path.isdir(teacher_dir):
        teacher_dir = teacher_dir or os.path.join(tmp, "teacher")
        print(f"Building the {args.size} {args.script} teacher in {teacher_dir} ...", flush=True)
        teacher_info = build_teacher(args.script, args.size, args.resolution, teacher_dir, args.reduced_denoiser)
    base = {"script": args.script, "size": args.size, "teacher_dir": teacher_dir, "resolution": args.resolution,
            "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
            "gradient_checkpointing": args.gradient_checkpointing, "fake_score_lora_rank": args.fake_score_lora_rank,
            "lora_rank": args.lora_rank, "discriminator_head_channels": args.discriminator_head_channels,
            "repeats": args.repeats, "warmup": args.warmup, "device": args.device, "num_threads": args.num_threads}
    losses = ["adm", "dmd"] if args.distribution_loss == "both" else [args.distribution_loss]
    specs = [{**base, "name": loss, "distribution_loss": loss} for loss in losses]
    if args.memory_plan:
        adm = {**base, "distribution_loss": "adm"}
        # the scripts' defaults: SDXL full fake score; SD3 the generator's LoRA rank (64 unless --lora_rank)
        default_fake_rank = 0 if args.script == "sdxl" else (64 if args.lora_rank is None else args.lora_rank)
        fake_rank = args.fake_score_lora_rank if args.fake_score_lora_rank is not None else default_fake_rank
        specs += [{**adm, "name": "plan_bf16", "mixed_precision": "bf16"}] if args.mixed_precision != "bf16" else [
            {**adm, "name": "plan_fp32", "mixed_precision": "no"}]
        specs.append({**adm, "name": "plan_gc", "gradient_checkpointing": not args.gradient_checkpointing})
        specs.append({**adm, "name": "plan_fake_lora" if fake_rank == 0 else "plan_fake_full",
                      "fake_score_lora_rank": 8 if fake_rank == 0 else 0})
    results = {}
    if len(losses) == 2 and not args.no_paired and args.size != "full":
        specs.append({**base, "name": "paired", "paired": True, "distribution_loss": "adm"})
    for spec in specs:
        results[spec["name"]] = launch_worker(spec, tmp)
    paired = results.pop("paired", None)

    summary = summarize(args, teacher_info, results, paired)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"step_cost_{args.script}_{args.size}")
    with open(stem + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    table = markdown(summary)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"Wrote {stem}.json and {stem}.md")
    return summary


def summarize(args, teacher_info: dict, results: dict, paired: dict | None = None) -> dict:
    summary = {"command": "python benchmarks/step_cost.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "",
               "script": args.script, "size": args.size, "resolution": args.resolution,
               "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
               "gradient_checkpointing": args.gradient_checkpointing, "teacher": teacher_info,
               "device": next(iter(results.values()))["device"], "runs": results,
               "targets": {"iteration_over_sum_of_parts_max": 1.15, "adm_over_dmd_update_cost_max": 1.0}}
    if "adm" in results and "dmd" in results:
        adm, dmd = results["adm"], results["dmd"]
        summary["adm_over_dmd_update_cost_measured"] = (adm["iteration_seconds_median"]
                                                        / dmd["iteration_seconds_median"])
        pred = adm["predicted_update_seconds"]
        summary["adm_over_dmd_update_cost_from_parts"] = pred["adm"] / pred["dmd"]
    if paired:
        summary["paired_iterations"] = paired
        summary["adm_over_dmd_update_cost_paired"] = paired["adm_over_dmd_median_of_pairs"]
    plan = {k: v for k, v in results.items() if k.startswith("plan_")}
    if plan and "adm" in results:
        ref = results["adm"]
        rows = [{"variant": describe(ref), "peak_memory_bytes": ref["peak_memory_bytes"],
                 "bytes_held": ref["bytes_held"]["total"], "peak_vs_reference": 1.0, "held_vs_reference": 1.0,
                 "iteration_seconds": ref["iteration_seconds_median"]}]
        second = ref["teacher_second_copy_bytes"]
        rows.append({"variant": "counterfactual: a second frozen teacher for D (not built; its bytes from the "
                                "parameter count)", "peak_memory_bytes": ref["peak_memory_bytes"] + second,
                     "bytes_held": ref["bytes_held"]["total"] + second,
                     "peak_vs_reference": (ref["peak_memory_bytes"] + second) / ref["peak_memory_bytes"],
                     "held_vs_reference": (ref["bytes_held"]["total"] + second) / ref["bytes_held"]["total"],
                     "iteration_seconds": None})
        for run in plan.values():
            if "error" in run:
                rows.append({"variant": describe(run), "peak_memory_bytes": None, "bytes_held": None,
                             "peak_vs_reference": None, "held_vs_reference": None, "iteration_seconds": None,
                             "error": "out of memory" if run["out_of_memory"] else "failed"})
                continue
            rows.append({"variant": describe(run), "peak_memory_bytes": run["peak_memory_bytes"],
                         "bytes_held": run["bytes_held"]["total"],
                         "peak_vs_reference": run["peak_memory_bytes"] / ref["peak_memory_bytes"],
                         "held_vs_reference": run["bytes_held"]["total"] / ref["bytes_held"]["total"],
                         "iteration_seconds": run["iteration_seconds_median"]})
        summary["memory_plan"] = rows
    return summary


def describe(run: dict) -> str:
    spec = run["spec"]
    fake = run["script_args"]["fake_score_lora_rank"] if "script_args" in run else spec["fake_score_lora_rank"]
    if fake is None:  # the script's default
        fake = 0 if spec["script"] == "sdxl" else (64 if spec.get("lora_rank") is None else spec["lora_rank"])
    return (f"frozen modules {'fp32' if spec['mixed_precision'] == 'no' else spec['mixed_precision']}, gradient "
            f"checkpointing {'on' if spec['gradient_checkpointing'] else 'off'}, fake score "
            f"{'full' if fake == 0 else f'LoRA r={fake}'}, teacher shared as D backbone")


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def markdown(summary: dict) -> str:
    lines = [f"### Step cost: {summary['script']} ({summary['size']}), {summary['resolution']} px, batch "
             f"{summary['batch_size']}, mixed precision {summary['mixed_precision']}, gradient checkpointing "
             f"{'on' if summary['gradient_checkpointing'] else 'off'}; {summary['device']}", "",
             f"Teacher: {summary['teacher'].get('teacher')}"
             + (f" ({summary['teacher']['denoiser_class']}, {summary['teacher']['denoiser_parameters'] / 1e6:.1f} M "
                f"parameters)" if "denoiser_parameters" in summary["teacher"] else ""), "",
             "| loss (fake:G updates) | s / iteration | sum of parts (s) | iteration / sum of parts | peak memory (MB) "
             "| held: weights + grads + Adam (MB) | peak / held |",
             "|---|---|---|---|---|---|---|"]
    for name, run in summary["runs"].items():
        if name.startswith("plan_"):
            continue
        ratio = run["script_args"].get("fake_score_update_ratio")
        k = run.get("student_step_index_per_iteration") or [0]
        k = f", mean k={statistics.mean(k):.1f}" if any(k) else ""
        lines.append(f"| {name} ({ratio}:1{k}) | {run['iteration_seconds_median']:.4f} | "
                     f"{statistics.median(run['sum_of_parts_seconds']):.4f} | "
                     f"{run['iteration_over_sum_of_parts']:.2f} | {run['peak_memory_bytes'] / MB:.1f} | "
                     f"{run['bytes_held']['total'] / MB:.1f} | {run['peak_over_held']:.2f} |")
    if "adm_over_dmd_update_cost_measured" in summary:
        paired = summary.get("adm_over_dmd_update_cost_paired")
        lines += ["", "ADM generator update (1:1) vs DMD2 generator update (5:1): "
                  + (f"**{paired:.2f}x** (both built in one process, iterations alternated, median of "
                     f"{len(summary['paired_iterations']['iteration_seconds']['adm'])} pairs); " if paired else "")
                  + f"{summary['adm_over_dmd_update_cost_measured']:.2f}x from the two runs above (separate "
                  f"processes); {summary['adm_over_dmd_update_cost_from_parts']:.2f}x predicted from the ADM run's "
                  f"own parts. Target <= 1.00."]
    for name, run in summary["runs"].items():
        if name.startswith("plan_"):
            continue
        lines += ["", f"Parts of the {name} iteration (median seconds x count per iteration):", "",
                  "| part | s | count | s x count |", "|---|---|---|---|"]
        counts = run["part_counts_last_iteration"]
        for part, seconds in run["parts_seconds_median"].items():
            if part in counts:
                lines.append(f"| {part} | {seconds:.4f} | {_fmt(float(counts[part]), 3)} | "
                             f"{seconds * counts[part]:.4f} |")
    if "memory_plan" in summary:
        lines += ["", "Memory plan (ADM; each row its own process; ratios against the first row):", "",
                  "| configuration | peak memory (MB) | peak vs first | held (MB) | held vs first | s / iteration |",
                  "|---|---|---|---|---|---|"]
        for row in summary["memory_plan"]:
            if row.get("error"):
                lines.append(f"| {row['variant']} | {row['error']} | - | - | - | - |")
                continue
            lines.append(f"| {row['variant']} | {row['peak_memory_bytes'] / MB:.1f} | {row['peak_vs_reference']:.2f}"
                         f" | {row['bytes_held'] / MB:.1f} | {row['held_vs_reference']:.2f} | "
                         f"{_fmt(row['iteration_seconds'], 3)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
