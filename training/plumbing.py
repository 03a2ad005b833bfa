"""accelerate plumbing shared by the training loops: the accelerator, optimizers and LR schedules, one accumulated
optimizer update, resume, logs, validation grids, the training-config file, rank checksums, and the guard that
turns bad user input into a message and exit status 2 (no traceback)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from .checkpointing import PROVENANCE_NAME
from .errors import UsageError

logger = logging.getLogger("dmdx")

TRAINING_CONFIG_NAME = "training_config.json"  # the one name every consumer reads (benchmarks, evaluate, tests)
TRAIN_LOG_NAME = "train_log.jsonl"


RUN_FILES = ("training_config.json", "model_index.json", TRAIN_LOG_NAME, "pytorch_lora_weights.safetensors")


def exit_on_usage_error(main: Callable, *args):
    """Run ``main(*args)``. Bad input (:class:`UsageError`, a missing file) prints ``error: ...`` and exits 2; a
    failed write (full disk, permissions) or a non-finite loss prints its message and exits 1. No traceback: the
    message says what happened and what was kept."""
    from .checkpointing import NonFiniteLossError

    try:
        return main(*args)
    except (UsageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (OSError, NonFiniteLossError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


def check_output_dir(args) -> None:
    """Never overwrite a finished or foreign run: an ``--output_dir`` that holds a run (its config, log, export or
    checkpoints) needs ``--resume_from_checkpoint`` to continue it or ``--overwrite_output_dir`` to replace it."""
    folder = args.output_dir
    if not os.path.isdir(folder) or args.resume_from_checkpoint or getattr(args, "overwrite_output_dir", False):
        return
    held = sorted(n for n in os.listdir(folder) if n in RUN_FILES or re.match(r"^checkpoint-\d+$", n))
    if held:
        raise UsageError(f"--output_dir {folder!r} already holds a run ({', '.join(held[:4])}): pass "
                         "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to write over it, or "
                         "choose another --output_dir.")


def clean_leftovers(output_dir: str) -> None:
    """Remove what an interrupted run left half-written: export and LoRA staging folders, unfinished checkpoints."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and (name.startswith((".export-", ".lora-")) or re.match(r"^checkpoint-\d+\.tmp$",
                                                                                       name)):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by an interrupted run", path)


def weights_fingerprint(path: str, subfolder: str) -> str:
    """Identifies a local component's weights without reading them all: names, sizes, and the first 64 KiB and last
    1 MiB of every weight file (two trained checkpoints of one architecture differ there). A Hub id is its name."""
    folder = os.path.join(path, subfolder)
    if not os.path.isdir(folder):
        return f"hub:{path}/{subfolder}"
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if not name.endswith((".safetensors", ".bin", ".json")):
            continue
        full = os.path.join(folder, name)
        size = os.path.getsize(full)
        digest.update(f"{name}:{size}".encode())
        with open(full, "rb") as f:
            digest.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()[:16]


def check_provenance(checkpoint: str, expected: dict, max_train_steps: int) -> str:
    """Before anything loads: the checkpoint a resume picked must come from this kind of run (script, teacher,
    generator start, LoRA ranks, student schedule) and not lie beyond ``--max_train_steps``. Returns the run id
    to continue (the checkpoint's)."""
    from .checkpointing import checkpoint_step, read_provenance

    step = checkpoint_step(checkpoint)
    if step > max_train_steps:
        raise UsageError(f"--resume_from_checkpoint picked {checkpoint} (step {step}), beyond --max_train_steps "
                         f"{max_train_steps}: raise --max_train_steps or name an earlier checkpoint.")
    found = read_provenance(checkpoint)
    if found is None:
        raise UsageError(f"--resume_from_checkpoint {checkpoint} has no {PROVENANCE_NAME}: it was not written by "
                         "this toolkit's scripts (or by an older version); resume it with the version that made it.")
    differ = {k: (found.get(k), v) for k, v in expected.items() if k not in ("run_id", "step") and found.get(k) != v}
    if differ:
        detail = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in differ.items())
        raise UsageError(f"--resume_from_checkpoint {checkpoint} was made by another run: {detail}. Resume with the "
                         "same teacher and flags, or start a new --output_dir.")
    return found.get("run_id") or expected["run_id"]


def training_loop(accelerator, args, step: int, iterate: Callable[[int], dict], validate: Callable | None,
                  provenance: dict, desc: str):
    """Iterate from ``step`` to ``--max_train_steps``: log every step, checkpoint every ``--checkpointing_steps``
    and at the end, validate every ``--validation_steps`` and at the end; on SIGTERM/SIGINT checkpoint the step
    just finished and exit non-zero. Returns the last validation's result."""
    from tqdm.auto import tqdm

    from .checkpointing import save_checkpoint

    progress = tqdm(range(args.max_train_steps), initial=step, desc=desc, disable=not accelerator.is_local_main_process)
    result = None
    with StopSignals() as stop:
        while step < args.max_train_steps:
            logs = iterate(step)
            step += 1
            progress.update(1)
            progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss") or k == "d_accuracy"})
            log_step(accelerator, args.output_dir, logs, step)
            last, signum = step == args.max_train_steps, stop.requested(accelerator)
            if step % args.checkpointing_steps == 0 or last or signum:
                save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, provenance)
            if signum:
                progress.close()
                accelerator.end_training()
                StopSignals.exit(signum, args.output_dir, step)
            if validate is not None and (step % args.validation_steps == 0 or last):
                result = validate(step) or result
    progress.close()
    return result


def iteration_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one iteration on one rank: what an iteration draws depends on (seed, step, rank) only, so a
    resumed run draws what the uninterrupted one drew."""
    return (seed * 1_000_003 + step * 7919 + rank * 131) % (2**63 - 1)


def parameter_checksum(module) -> float:
    """A cheap fingerprint of a model's trainable weights (did training move them at all?)."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in module.parameters() if p.requires_grad))


class StopSignals:
    """SIGTERM (what schedulers send before preemption) and SIGINT (Ctrl-C): the loop finishes its current step,
    writes a checkpoint and exits non-zero (128 + signal). A second SIGINT stops at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received %s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, accelerator) -> int:
        """The signal every rank must stop for (0: none); agreed across processes, so all save together."""
        value = torch.tensor([float(self.received or 0)], device=accelerator.device)
        if accelerator.num_processes > 1:
            value = accelerator.reduce(value, reduction="max")
        return int(value.item())

    @staticmethod
    def exit(signum: int, output_dir: str, step: int) -> None:
        print(f"Stopped by {signal.Signals(signum).name} after step {step}: saved {output_dir}/checkpoint-{step}. "
              "Continue with the same command plus --resume_from_checkpoint latest.", file=sys.stderr)
        sys.exit(128 + signum)


def make_accelerator(args, project_name: str):
    """An Accelerator with the run's precision, trackers and logging folder; seeds, TF32, logging set up."""
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a CUDA device (CPU autocast has no fp16); use bf16 or no.")
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.distributed_type.name == "DEEPSPEED":
        raise UsageError("DeepSpeed is not supported: three trainable networks need three engines that accelerate "
                         "does not drive. Use the FSDP config (recipes/sd35_large/accelerate_fsdp.yaml).")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(args, module, lr: float):
    params = [p for p in module.parameters() if p.requires_grad]
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
               eps=args.adam_epsilon)


def make_lr_scheduler(args, optimizer, updates_per_step: int, num_processes: int):
    """diffusers' LR schedule; accelerate's prepared scheduler steps once per process per call, hence the factor."""
    from diffusers.optimization import get_scheduler

    n = updates_per_step * num_processes
    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * n,
                         num_training_steps=args.max_train_steps * n)


def accumulated_update(accelerator, args, module, optimizer, lr_scheduler, micro_losses: Iterable, logs: dict,
                       name: str, log_weight: float = 1.0) -> None:
    """One optimizer update of ``module`` over ``--gradient_accumulation_steps`` micro-batches. ``micro_losses``
    yields each micro-batch's ``(loss, terms)``; every term is checked for NaN/inf (stop, naming it) before its
    backward. Terms are added to ``logs`` averaged over micro-batches, times ``log_weight``."""
    from .checkpointing import check_finite

    k = args.gradient_accumulation_steps
    # Start clean: a pass in which this network was frozen must leave no gradient behind.
    optimizer.zero_grad(set_to_none=True)
    micro_losses = iter(micro_losses)
    unwrapped = accelerator.unwrap_model(module)
    for i in range(k):
        # DDP decides in the forward whether the backward syncs: draw the micro-batch's loss inside no_sync
        with accelerator.no_sync(module) if i < k - 1 else contextlib.nullcontext():
            loss, terms = next(micro_losses)
            check_finite(terms, accelerator)
            if hasattr(unwrapped, "activate"):  # a LoRA view: checkpointed blocks recompute with its adapter on
                unwrapped.activate()
            accelerator.backward(loss / k)
        for key, value in terms.items():
            logs[key] = logs.get(key, 0.0) + value.detach().float().item() * log_weight / k
    params = [p for p in module.parameters() if p.requires_grad]
    if accelerator.distributed_type.name == "FSDP":
        # accelerate 1.15's clip_grad_norm_ looks for the prepared model by comparing parameter lists with `==`; with
        # two prepared models of equal parameter count (generator, fake score) that compares DTensors elementwise and
        # raises. For FSDP2 it ends in torch's clip_grad_norm_ anyway, which reduces DTensor gradients across ranks.
        accelerator.unscale_gradients()
        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    else:
        norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
    logs[f"grad_norm_{name}"] = float(norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def resume(accelerator, args, checkpoint: str | None) -> int:
    """Load ``checkpoint`` (models, optimizers, LR schedulers, EMA, RNG) and return its step; cut the train log
    back to that step so no step appears twice. 0 for a fresh run (``checkpoint`` None)."""
    from .checkpointing import checkpoint_step

    if not checkpoint:
        if args.resume_from_checkpoint:
            logger.info("no checkpoint to resume from in %s: starting a new run", args.output_dir)
        return 0
    try:
        accelerator.load_state(checkpoint)
    except RuntimeError as e:  # a state_dict mismatch the provenance check did not foresee
        raise UsageError(f"--resume_from_checkpoint {checkpoint} does not match this run's models: "
                         f"{str(e).splitlines()[0]}") from e
    step = checkpoint_step(checkpoint)
    logger.info("resumed from %s at step %d", checkpoint, step)
    if accelerator.is_main_process:
        path = os.path.join(args.output_dir, TRAIN_LOG_NAME)
        if os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            write_atomic(path, "".join(kept))
    return step


def log_step(accelerator, output_dir: str, logs: dict, step: int) -> None:
    """Trackers, and every term as a JSON line in ``train_log.jsonl`` for quick inspection; the line also holds the
    wall-clock ``time`` it was written and the process's ``cpu_time`` (CPU seconds: unlike wall time, not inflated
    by other jobs on a shared machine; benchmarks/digits_fair.py matches budgets with it)."""
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, TRAIN_LOG_NAME), "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3),
                                "cpu_time": round(time.process_time(), 3), **logs}) + "\n")


def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_training_config(output_dir: str, args, **fields) -> dict:
    """``training_config.json``: every flag (no token) plus what the run derived (the student's schedule, the
    method, ...); fields already in the file (e.g. written at the start) are kept unless given again."""
    path = os.path.join(output_dir, TRAINING_CONFIG_NAME)
    config = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    config.update({k: v for k, v in vars(args).items() if k != "hub_token"})
    config.update(fields)
    write_atomic(path, json.dumps(config, indent=2, default=str))
    return config


def tracker_config(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


def rank_checksums(accelerator, module) -> list:
    """Checksums of a model's trainable weights on every process (DDP must keep the ranks identical)."""
    with torch.no_grad():
        params = [p.detach().double() for p in accelerator.unwrap_model(module).parameters() if p.requires_grad]
        local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)]).reshape(1, 2)
    checksums = accelerator.gather(local.to(accelerator.device)).cpu().tolist()
    if accelerator.is_main_process and any(c != checksums[0] for c in checksums):
        logger.warning("generator weights differ between ranks: %s", checksums)
    return checksums


def video_strip(clips: Sequence, make_grid) -> list:
    """The frames of a GIF strip of several clips: frame t is ``make_grid`` of every clip's frame t, side by side
    (a shorter clip holds its last frame)."""
    length = max(len(clip) for clip in clips)
    return [make_grid([clip[min(t, len(clip) - 1)] for clip in clips]) for t in range(length)]


def save_validation(accelerator, images: list, prompts: list[str], path: str, step: int, fps: int = 8) -> str:
    """A one-row grid (``diffusers.utils.make_image_grid``) saved at ``path`` and logged to the trackers. Video
    samples (each a list of frames) become a GIF strip (``export_to_gif``: frame t shows every prompt's frame t),
    logged with tensorboard's ``add_video`` (which needs moviepy) and as a ``wandb.Video``."""
    import numpy as np
    from diffusers.utils import export_to_gif, make_image_grid

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    video = isinstance(images[0], (list, tuple))
    if video:
        strip = video_strip(images, lambda frames: make_image_grid(frames, rows=1, cols=len(frames)))
        export_to_gif(strip, path, fps=fps)
    else:
        make_image_grid(images, rows=1, cols=len(images)).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard" and video:  # (N, T, C, H, W) uint8
            clips = np.stack([np.stack([np.asarray(frame.convert("RGB")) for frame in clip]) for clip in images])
            tracker.writer.add_video("validation", clips.transpose(0, 1, 4, 2, 3), step, fps=fps)
        elif tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step,
                                      dataformats="NHWC")
        elif tracker.name == "wandb" and video:
            import wandb

            tracker.log({"validation": wandb.Video(path, caption=" | ".join(prompts))}, step=step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, prompts)]}, step=step)
    logger.info("validation %s: %s", "strip" if video else "grid", path)
    return path


@contextlib.contextmanager
def ema_weights(ema, module):
    """Inside: ``module`` holds the EMA weights (validation); afterwards its training weights are back."""
    from .freezing import reshard_fsdp

    if ema is None:
        yield
        return
    reshard_fsdp(module)  # FSDP: swap the sharded weights, and gather them afresh before and after the swap
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    try:
        yield
    finally:
        reshard_fsdp(module)
        ema.restore(module.parameters())


@contextlib.contextmanager
def fsdp_wrap_classes_of(accelerator, module):
    """Under FSDP, around ``accelerator.prepare(module, ...)``: the config's ``fsdp_transformer_layer_cls_to_wrap``
    (e.g. ``JointTransformerBlock``) applies to the denoisers; a network that has none of those blocks (the
    discriminator heads) becomes one FSDP unit instead of making accelerate raise "Could not find the transformer
    layer class ... in the model". No-op otherwise."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    if accelerator.distributed_type.name != "FSDP" or not names:
        yield
        return
    classes = {type(m).__name__ for m in module.modules()}
    plugin.transformer_cls_names_to_wrap = [n for n in names if n in classes]
    try:
        yield
    finally:
        plugin.transformer_cls_names_to_wrap = names


class ShardedEMAState:
    """What a checkpoint holds for an EMA of FSDP2-sharded (DTensor) weights. accelerate writes a registered
    object's ``state_dict`` from the main process only, so the shards are gathered into full CPU tensors (every rank
    takes part, one tensor at a time); on load every rank takes back its own shard. The file is the one an unsharded
    run writes (``custom_checkpoint_0.pkl``: full tensors)."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        state = self.ema.state_dict()
        return {**state, "shadow_params": [p.full_tensor().cpu() for p in state["shadow_params"]]}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.tensor import distribute_tensor

        state = dict(state)
        full, like = state.pop("shadow_params"), self.ema.shadow_params
        self.ema.load_state_dict(state)
        self.ema.shadow_params = [distribute_tensor(f.to(p.device, p.dtype), p.device_mesh, p.placements)
                                  for f, p in zip(full, like)]


# ---- FSDP: the trainable networks' weights read once (the main process), broadcast into every rank's shards ----------
def empty_denoiser(adapter, path: str | None):
    """The denoiser of ``path`` (the teacher's when None) with its parameters on the meta device (no memory) and its
    buffers (position tables) computed for real: what a process other than the main one holds of a trainable network
    under FSDP until :func:`broadcast_main_weights` fills its shards."""
    import diffusers
    from accelerate import init_empty_weights

    source = adapter if path is None else adapter.for_path(path, "--pretrained_generator_name_or_path")
    config = source.denoiser_config
    with init_empty_weights(include_buffers=False):
        return getattr(diffusers, adapter.denoiser_class).from_config(config)


def broadcast_main_weights(module, full_state: dict, optimizer, trained_names: list[str]) -> None:
    """After ``accelerator.prepare`` sharded ``module`` (FSDP2): the main process's full weights (``full_state``, its
    state dict read before ``prepare``; ``{}`` elsewhere) are broadcast one tensor at a time into every rank's shards
    (torch's ``set_model_state_dict(broadcast_from_rank0=True)``; on the other ranks the meta parameters are replaced).
    Then the optimizer is pointed at the sharded parameters by name: accelerate maps old to new parameters by
    ``data_ptr``, which is 0 for every meta parameter, so on those ranks its mapping gives every slot one parameter.

    Not accelerate's ``fsdp_cpu_ram_efficient_loading``: its broadcast reads ``device_mesh`` off every state-dict entry
    and stops at the first persistent buffer, which diffusers' denoisers have (SD3's ``pos_embed.pos_embed``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, full_state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    params = dict(module.named_parameters())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
    if len(inner.param_groups) != 1:
        raise RuntimeError("expected one parameter group per network (make_optimizer)")
    inner.param_groups[0]["params"] = [params[n] for n in trained_names]
    meta = [n for n, p in params.items() if (p.to_local() if hasattr(p, "to_local") else p).is_meta]
    if meta:
        raise RuntimeError(f"FSDP: parameters still on the meta device after the broadcast: {meta[:5]}")


def host_memory_mib() -> float:
    """This process's peak resident set so far (Linux ``ru_maxrss``, KiB), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
