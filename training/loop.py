"""The one ADM / DMD2 distillation loop, used by every teacher through its adapter (``dmdx.pipelines.teachers``).

One iteration = one generator update (docs/method.md#adm), in three steps (``dmdx.training.steps``):
  1. fake score: ordinary denoising loss on detached generator samples, ``--fake_score_update_ratio`` updates;
  2. generator: x0 = G(x_k, t_k) at one of the student's own timesteps (its input by backward simulation of its
     earlier steps, as DMD2 does); x_t = add_noise(x0, eps, t); one PF-ODE step t -> s = t - dt from the same x_t
     with the teacher (with CFG) and with the fake score (parameters frozen, gradient through its input):
     x_real, x_fake; loss = -D(x_fake, s). ``--distribution_loss dmd``: DMD2's loss on the two x0 predictions;
  3. discriminator D = the frozen teacher (the same object as the real score) + trainable heads on chosen blocks:
     hinge loss, real = x_real, fake = x_fake (``--discriminator_update_ratio`` updates).
Choices where the paper is silent are documented in docs/method.md#choices and marked "Choice:" here.

What is random in an iteration is drawn after seeding torch with (seed, step, rank): a resumed run draws exactly
what the uninterrupted run drew, whatever the RNG state, and every rank draws differently.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .cli import load_prompts
from .conditioning import select_conditioning
from .errors import UsageError
from .finish import finish_and_export, validate
from .lora import LoraView, add_lora_adapter
from .parametrization import NoiseSchedule
from .plumbing import (
    ShardedEMAState,
    broadcast_main_weights,
    check_output_dir,
    check_provenance,
    clean_leftovers,
    empty_denoiser,
    fsdp_wrap_classes_of,
    host_memory_mib,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    parameter_checksum,
    resume,
    tracker_config,
    training_loop,
    weight_dtype_of,
    weights_fingerprint,
    write_training_config,
)
from .steps import (
    Iteration,
    discriminator_features,
    discriminator_step,
    distribution_loss,
    fake_score_step,
    generator_step,
)
from .text_cache import DEFAULT_SHARD_SIZE

if TYPE_CHECKING:
    from diffusers import SchedulerMixin
    from diffusers.training_utils import EMAModel
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

    from .discriminator import BackboneFeatures, DiscriminatorHeads

logger = logging.getLogger("dmdx")


class PromptSource:
    """Training prompts as conditioning: read from the text-embedding cache (``cache``, a
    :class:`~dmdx.training.text_cache.TextEmbeddingCache` that holds them; no text encoder in memory), or encoded
    batch by batch by the adapter's loaded text encoders, or (``precompute``, the old in-memory way kept for the
    benchmarks) all encoded once and kept on the CPU; the empty prompt's conditioning (CFG's unconditional half)
    either way."""

    def __init__(self, adapter, prompts: list[str], device, precompute: bool = False, cache=None):
        self.adapter, self.prompts, self.device, self.cache = adapter, prompts, device, cache
        if cache is not None:
            self.negative = self._complete(cache.negative(device), 1)
            self.embeds = None
            return
        self.negative = adapter.negative_conditioning(device)
        self.embeds = ({k: v.cpu() for k, v in adapter.encode_prompts(prompts, device).items()}
                       if precompute else None)

    def _complete(self, cond: dict, n: int) -> dict:
        """Cached conditioning plus what does not depend on the text (SDXL's time ids)."""
        return {**cond, **self.adapter.fixed_conditioning(n, self.device)}

    @property
    def count(self) -> int:
        return len(self.prompts)

    def conditioning(self, prompts: list[str]) -> dict:
        """Any prompts' conditioning (e.g. the validation prompts), from the cache or the text encoders."""
        if self.cache is not None:
            return self._complete(self.cache.conditioning(prompts, self.device), len(prompts))
        return self.adapter.encode_prompts(prompts, self.device)

    def batch(self, idx: torch.Tensor) -> tuple[dict, dict]:
        if self.embeds is not None:
            cond = select_conditioning(self.embeds, idx, self.device)
        else:
            cond = self.conditioning([self.prompts[i] for i in idx.tolist()])
        n = idx.shape[0]
        return cond, {k: v.expand(n, *v.shape[1:]) for k, v in self.negative.items()}


def text_cache_folder(args) -> str | None:
    """``--text_embeddings_cache``; ``--precompute_text_embeddings`` alone means a cache in the output folder (ODE-pair
    collection's flags have no such shorthand)."""
    folder = args.text_embeddings_cache
    if folder is None and getattr(args, "precompute_text_embeddings", False):
        folder = os.path.join(args.output_dir, "text_embeddings")
    return folder


def open_text_cache(adapter, args, prompts: list[str]):
    """Before anything loads: the run's text-embedding cache (None without one; a fingerprint mismatch raises).
    Where the text encoders will be needed (no cache, or one that lacks prompts) their
    tokenizers are loaded now, so a missing package stops the run before any weights load."""
    from .text_cache import TextEmbeddingCache

    folder = text_cache_folder(args)
    cache = TextEmbeddingCache(folder, adapter.text_fingerprint()) if folder else None
    todo = prompts if cache is None else cache.missing(prompts)
    if cache is None or todo or not cache.has_negative:
        adapter.check_tokenizers()
    if cache is not None and todo:
        adapter.check_prompts(todo, "prompts to encode")
    absent = adapter.absent_text_encoders()
    if absent:
        logger.warning("%s holds no %s: the student is exported with them as null components (load them from the "
                       "teacher, docs/gpus.md)", adapter.path, ", ".join(absent))
    return cache


def fill_text_cache(adapter, cache, prompts: list[str], device, dtype, *, rank: int, world: int, barrier,
                    shard_size: int = DEFAULT_SHARD_SIZE) -> None:
    """Encode what ``cache`` lacks of ``prompts`` (and the empty prompt) with the adapter's text encoders, each rank
    its own shards, then free the encoders; every rank calls it. No denoiser is loaded yet: the encoders have the
    device to themselves."""
    logger.info("text-embedding cache %s: holds %d prompts, %d of this run's to encode%s", cache.folder,
                cache.num_prompts, len(cache.missing(prompts)), "" if cache.has_negative else " (and the empty one)")
    if cache.covers(prompts):
        return
    try:
        adapter.load_text_encoders(device, dtype)
    except (OSError, ValueError, ImportError) as e:
        missing = cache.missing(prompts)
        what = f"{len(missing)} prompts (e.g. {missing[0][:60]!r})" if missing else "the empty prompt"
        raise UsageError(f"{cache.what} {cache.folder!r} lacks {what}, and the text encoders to encode them could "
                         f"not be loaded from {adapter.path!r}: {str(e).splitlines()[0]}") from e
    fixed = set(adapter.fixed_conditioning(1, "cpu"))
    text_only = lambda cond: {k: v for k, v in cond.items() if k not in fixed}
    encoded = cache.build(prompts, lambda batch: text_only(adapter.encode_prompts(batch, device)),
                          lambda: text_only(adapter.negative_conditioning(device)), rank=rank, world=world,
                          barrier=barrier, shard_size=shard_size, info={"encoder_dtype": str(dtype).removeprefix(
                              "torch.")})
    logger.info("process %d encoded %d prompts into %s", rank, encoded, cache.folder)
    adapter.free_text_encoders()


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DistillationModels:
    """The roles of one run. ``teacher`` is the frozen real score and the discriminator's backbone; when LoRA roles
    share its weights it is a :class:`LoraView` with every adapter off and ``teacher_base`` the module itself."""

    teacher: nn.Module  # the denoiser (a diffusers ModelMixin), or a LoraView of it
    teacher_base: nn.Module
    generator: nn.Module  # a full fp32 copy or a LoraView; after prepare_models, as accelerate wrapped it
    fake_score: nn.Module
    discriminator_heads: DiscriminatorHeads | None  # None for dmd
    features: BackboneFeatures | None  # on D's backbone (None for dmd)
    teacher_schedule: NoiseSchedule
    student_schedule: NoiseSchedule
    student_scheduler: SchedulerMixin
    student_timesteps: torch.Tensor
    renoise: str
    latent_shape: tuple[int, ...]
    weight_dtype: torch.dtype
    ema: EMAModel | None = None
    discriminator_backbone: nn.Module | None = None  # None: the teacher; else its fp32 copy (--discriminator_precision)
    optimizers: dict[str, Optimizer] = field(default_factory=dict)
    lr_schedulers: dict[str, LRScheduler] = field(default_factory=dict)


def build_models(adapter, args, accelerator, generator_path: str | None) -> DistillationModels:
    """Teacher (frozen, mixed-precision dtype), generator and fake score (full fp32 copies, or LoRA adapters; LoRA
    adapters on the teacher's own weights share that one module), EMA, the student's scheduler and schedule."""
    from . import renoise_mode, schedule_from_scheduler_config, student_timesteps

    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    sharded = accelerator.distributed_type.name == "FSDP"  # prepare() shards and moves full models itself
    # FSDP: only the main process reads the trainable networks' weights; the others hold them on the meta device
    # until prepare_models broadcasts the main process's copy into every rank's shards (host RAM: docs/memory.md)
    read_weights = not sharded or accelerator.is_main_process
    teacher = adapter.load_denoiser(weight_dtype).requires_grad_(False).eval().to(device)
    bases = {}  # LoRA bases: the teacher for roles that start from it, a frozen copy of another generator otherwise

    def trainable(role: str, rank: int, alpha: int, path: str | None, seed_offset: int):
        if rank > 0:
            base = teacher if path is None else bases.get(path)
            if base is None:
                base = bases[path] = adapter.load_denoiser(weight_dtype, path=path).requires_grad_(False).eval()
                base.to(device)
            add_lora_adapter(base, role, rank, alpha, adapter.lora_target_modules, args.seed + seed_offset)
            if args.gradient_checkpointing:
                base.enable_gradient_checkpointing()
            return base
        model = adapter.load_denoiser(torch.float32, path=path) if read_weights else empty_denoiser(adapter, path)
        model.requires_grad_(True).train()
        if not sharded:
            model.to(device)
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    generator = trainable("generator", args.lora_rank, args.lora_alpha, generator_path, 0)
    fake_score = trainable("fake_score", args.fake_score_lora_rank, args.fake_score_lora_rank, None, 1)
    held = sum(p.numel() * p.element_size() for rank, m in ((args.lora_rank, generator),
                                                             (args.fake_score_lora_rank, fake_score))
               if rank == 0 for p in m.parameters() if not p.is_meta)  # the fully trained networks' copies
    logger.info("process %d: %.1f MiB of trainable weights read into memory before sharding", accelerator.process_index,
                held / 2**20)
    # views after every adapter exists (peft's add_adapter re-freezes the adapters added before)
    if args.lora_rank > 0:
        generator = LoraView(generator, "generator", args.gradient_checkpointing)
    if args.fake_score_lora_rank > 0:
        fake_score = LoraView(fake_score, "fake_score", args.gradient_checkpointing)
    for view in (generator, fake_score):
        if isinstance(view, LoraView):
            view.adapter.requires_grad_(True)
    shared = any(isinstance(v, LoraView) and v.base is teacher for v in (generator, fake_score))
    if args.enable_xformers_memory_efficient_attention:
        if not torch.cuda.is_available():
            raise UsageError("--enable_xformers_memory_efficient_attention needs xformers and a CUDA device.")
        for module in {id(m): m for m in (teacher, generator, fake_score, *bases.values())
                       if not isinstance(m, LoraView)}.values():
            module.enable_xformers_memory_efficient_attention()

    ema = None
    if args.use_ema and not sharded:  # under FSDP: prepare_models keeps an EMA of the sharded weights
        from diffusers.training_utils import EMAModel

        ema = EMAModel(generator.parameters(), decay=args.ema_decay, model_cls=type(generator),
                       model_config=generator.config)
        ema.to(device)

    # The student's schedule: one source of truth, the scheduler it ships with (docs/method.md#schedule).
    scheduler = adapter.student_scheduler(args.num_student_steps, generator_path)
    teacher_schedule = adapter.teacher_schedule()
    return DistillationModels(
        teacher=LoraView(teacher, None) if shared else teacher, teacher_base=teacher, generator=generator,
        fake_score=fake_score, discriminator_heads=None, features=None, teacher_schedule=teacher_schedule,
        student_schedule=schedule_from_scheduler_config(scheduler), student_scheduler=scheduler,
        student_timesteps=student_timesteps(scheduler, args.num_student_steps), renoise=renoise_mode(scheduler),
        latent_shape=adapter.latent_shape(args.resolution), weight_dtype=weight_dtype, ema=ema)


def build_discriminator(adapter, args, models: DistillationModels, negative: dict, device) -> None:
    """D's heads on the teacher's chosen blocks; their shapes from one dry run of the teacher. With
    ``--discriminator_precision fp32`` under mixed precision, D's backbone is an fp32 copy of the teacher."""
    from . import BackboneFeatures, DiscriminatorHeads

    backbone, models.discriminator_backbone = models.teacher_base, None
    if args.discriminator_precision == "fp32" and models.weight_dtype != torch.float32:
        backbone = models.discriminator_backbone = (
            adapter.load_denoiser(torch.float32).requires_grad_(False).eval().to(device))
        if args.gradient_checkpointing:  # the generator's gradient and exact R1 / R2 go back through it
            backbone.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            backbone.enable_xformers_memory_efficient_attention()
    blocks = adapter.discriminator_blocks(args.discriminator_blocks)
    models.features = BackboneFeatures(backbone, blocks, select=adapter.feature_selector(models.latent_shape))
    x = torch.zeros((1, *models.latent_shape), device=device)
    t = torch.full((1,), models.teacher_schedule.T / 2, device=device)
    with torch.no_grad():
        feats = discriminator_features(models, adapter, x, t, negative)
    models.discriminator_heads = DiscriminatorHeads([tuple(f.shape[1:]) for f in feats],
                                                    hidden_channels=args.discriminator_head_channels,
                                                    num_downsamples=args.discriminator_head_depth,
                                                    output=args.discriminator_head_output,
                                                    fp32=models.discriminator_backbone is not None)
    models.discriminator_heads.to(device)
    models.discriminator_heads.train()


def prepare_models(args, accelerator, models: DistillationModels) -> None:
    """Optimizers and LR schedules per trainable network; accelerate.prepare network by network (the checkpoint
    holds them as model.safetensors = generator, model_1 = fake score, model_2 = discriminator heads)."""
    specs = [("generator", "generator", args.generator_lr, 1),
             ("fake_score", "fake_score", args.fake_score_lr, args.fake_score_update_ratio)]
    if models.discriminator_heads is not None:
        specs.append(("discriminator", "discriminator_heads", args.discriminator_lr, args.discriminator_update_ratio))
    sharded = accelerator.distributed_type.name == "FSDP"
    for name, attr, lr, ratio in specs:
        module = getattr(models, attr)
        optimizer = make_optimizer(args, module, lr)
        scheduler = make_lr_scheduler(args, optimizer, ratio, accelerator.num_processes)
        broadcast = sharded and attr != "discriminator_heads"  # the denoisers: read by the main process only
        if broadcast:
            trained = [n for n, p in module.named_parameters() if p.requires_grad]
            full_state = module.state_dict() if accelerator.is_main_process else {}
        with fsdp_wrap_classes_of(accelerator, module):
            module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
        if broadcast:
            broadcast_main_weights(module, full_state, optimizer, trained)
            del full_state
        setattr(models, attr, module)
        models.optimizers[name], models.lr_schedulers[name] = optimizer, scheduler
    if args.use_ema and models.ema is None:  # FSDP: an EMA of the generator's shards (1/n of a copy per process)
        from diffusers.training_utils import EMAModel

        models.ema = EMAModel(models.generator.parameters(), decay=args.ema_decay)
    logger.info("process %d: peak host memory %.0f MiB after preparing the models", accelerator.process_index,
                host_memory_mib())
    if models.ema is not None:
        accelerator.register_for_checkpointing(ShardedEMAState(models.ema) if sharded else models.ema)


# ----------------------------------------------------------------------------------------------------------------
# One iteration
# ----------------------------------------------------------------------------------------------------------------
def train_iteration(models: DistillationModels, adapter, args, accelerator, prompt_source: PromptSource,
                    step: int) -> dict[str, float]:
    """One ADM (or DMD2) iteration = one generator update (docs/method.md#adm); returns every loss term and
    diagnostic (floats). The steps are ``dmdx.training.steps``; what they share is an :class:`Iteration`."""
    it = Iteration.start(models, adapter, args, accelerator, prompt_source, step)  # seeds torch: (seed, step, rank)
    with accelerator.autocast():
        # 1. Fake score: its denoising loss on detached generator samples (docs/method.md#fake-score-update).
        fake_score_step(it)
        # 2. Generator: x0 = G(x_k, t_k) at a student step k (docs/method.md#backward-simulation); ADM: -D(x_fake, s)
        #    after one PF-ODE step t -> s = t - dt (docs/method.md#generator-update, #ode-step); DMD2: its loss on
        #    the two x0 predictions (docs/method.md#dmd2). During D's warm-up: the same passes, no update.
        saved = generator_step(it)
        # 3. Discriminator (ADM): hinge loss on x_real vs x_fake (docs/method.md#discriminator-update); the first
        #    update reuses step 2's predictions, further ones draw fresh ones.
        if it.loss.has_discriminator:
            discriminator_step(it, saved)
    for name, scheduler in models.lr_schedulers.items():
        it.logs[f"lr_{name}"] = scheduler.get_last_lr()[0]
    it.logs["generator_frozen"] = float(not it.train_generator)
    return it.logs


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def distill(adapter, args, tracker_project: str) -> None:
    """The whole run: checks, models, the loop with checkpoints / validation / logs, then the export of a stock
    pipeline with the student's scheduler, its model card and (optionally) the upload."""
    from accelerate.utils import set_seed

    from . import student_timesteps
    from .checkpointing import find_resume_checkpoint

    # 0. Everything that can be checked from flags and configs, before any weights load or anything is written.
    check_output_dir(args)
    generator_path = args.pretrained_generator_name_or_path
    if generator_path:
        adapter.for_path(generator_path, "--pretrained_generator_name_or_path")
    objective = distribution_loss(args)  # ADM or DMD2, chosen once
    if objective.has_discriminator:
        adapter.discriminator_blocks(args.discriminator_blocks)
    adapter.latent_shape(args.resolution)
    scheduler = adapter.student_scheduler(args.num_student_steps, generator_path)
    check_student_scheduler(adapter, scheduler, generator_path)
    if args.timestep_sampling == "shifted" and adapter.teacher_schedule().kind != "flow":
        raise UsageError("--timestep_sampling shifted needs a flow (rectified-flow) teacher; "
                         f"{adapter.pipeline_class}'s schedule is {adapter.teacher_schedule().kind}.")
    prompts = load_prompts(args)
    cache_prompts = prompts + list(args.validation_prompts or [])
    cache = open_text_cache(adapter, args, cache_prompts)
    if cache is None:
        adapter.check_prompts(prompts, "training prompts")
        if args.validation_prompts:
            adapter.check_prompts(list(args.validation_prompts), "validation prompts")
    provenance = run_provenance(adapter, args, tracker_project, generator_path,
                                student_timesteps(scheduler, args.num_student_steps))
    checkpoint = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint:
        provenance["run_id"] = check_provenance(checkpoint, provenance, args.max_train_steps)

    accelerator = make_accelerator(args, tracker_project)
    if accelerator.distributed_type.name == "FSDP" and (args.lora_rank or args.fake_score_lora_rank):
        raise UsageError("FSDP with LoRA roles is not supported (the roles share one frozen base that FSDP would "
                         "shard per role): use DDP for LoRA runs (recipes/sd3_medium) and FSDP for full fine-tuning.")
    set_seed(args.seed)
    device = accelerator.device
    if accelerator.is_main_process:
        clean_leftovers(args.output_dir)

    # 1. The text-embedding cache (encoders loaded only if it lacks prompts, and freed before the denoisers load);
    #    models, conditioning, D, optimizers.
    if cache is not None:
        fill_text_cache(adapter, cache, cache_prompts, device, weight_dtype_of(accelerator),
                        rank=accelerator.process_index, world=accelerator.num_processes,
                        barrier=accelerator.wait_for_everyone, shard_size=args.text_embeddings_shard_size)
    models = build_models(adapter, args, accelerator, generator_path)
    if cache is None:
        adapter.load_text_encoders(device, models.weight_dtype, denoiser=models.teacher_base)
    source = PromptSource(adapter, prompts, device, cache=cache)
    val_cond = source.conditioning(list(args.validation_prompts)) if args.validation_prompts else None
    if objective.has_discriminator:
        build_discriminator(adapter, args, models, source.negative, device)
    vae = adapter.load_vae(device) if args.validation_prompts else None
    prepare_models(args, accelerator, models)
    method = objective.method(generator_path)
    fields = {**student_schedule_fields(models, method), "run_id": provenance["run_id"]}
    if not checkpoint:
        fields["generator_initial_checksum"] = parameter_checksum(models.generator)
    logger.info("%s distillation: %d prompts, batch %d x %d processes, %d steps; student %s %s, timesteps %s; "
                "generator %s, fake score %s; %s", args.distribution_loss.upper(), len(prompts),
                args.train_batch_size, accelerator.num_processes, args.max_train_steps, fields["student_scheduler"],
                fields["student_prediction_type"], fields["student_timesteps"], _kind(args.lora_rank),
                _kind(args.fake_score_lora_rank),
                f"discriminator on {models.features.module_names}" if models.features else "no discriminator (dmd)")
    if accelerator.is_main_process:
        config = write_training_config(args.output_dir, args, **fields)
        fields["generator_initial_checksum"] = config.get("generator_initial_checksum")  # a resume: the first start's
        accelerator.init_trackers(tracker_project, config=tracker_config(args))

    # 2. Resume (models, optimizers, LR schedules, EMA; the step from the folder name). 3. Train.
    step = resume(accelerator, args, checkpoint)
    everyone_validates = accelerator.distributed_type.name == "FSDP"  # sharded forwards need every rank
    validate_fn = None
    if args.validation_prompts:
        def validate_fn(at: int):
            if accelerator.is_main_process or everyone_validates:
                return validate(models, adapter, args, accelerator, at, val_cond, vae)

    samples = training_loop(accelerator, args, step,
                            lambda at: train_iteration(models, adapter, args, accelerator, source, at),
                            validate_fn, provenance, "generator updates")

    # 4. Export (the EMA weights when kept): a stock pipeline with the student's scheduler, card, upload.
    finish_and_export(adapter, args, accelerator, models, method=method, generator_path=generator_path,
                      samples=samples, fields=fields)


def check_student_scheduler(adapter, scheduler, generator_path: str | None) -> None:
    """A generator folder that ships its teacher's own many-step scheduler is not a student (e.g. a copy of the
    teacher): distilling from it would ship the teacher's sampler under a student's name."""
    if not generator_path or os.path.abspath(generator_path) == os.path.abspath(adapter.path):
        return
    teacher_config = {k: v for k, v in adapter.scheduler_config().items() if not k.startswith("_")}
    if type(scheduler).__name__ == adapter.scheduler_config().get("_class_name") and all(
            scheduler.config.get(k) == v for k, v in teacher_config.items()):
        raise UsageError(f"--pretrained_generator_name_or_path {generator_path!r} ships the teacher's own "
                         f"{type(scheduler).__name__}: it is not a few-step student (a copy of the teacher?). Omit the "
                         "flag to start the generator from the teacher, or point it at an ADP output.")


def run_provenance(adapter, args, script: str, generator_path: str | None, timesteps) -> dict:
    """What a checkpoint of this run must match to be resumed by it."""
    return {"script": script, "distribution_loss": args.distribution_loss,
            "teacher": f"{adapter.pipeline_class}:{weights_fingerprint(adapter.path, adapter.denoiser_name)}",
            "generator": weights_fingerprint(generator_path, adapter.denoiser_name) if generator_path else None,
            "lora_rank": args.lora_rank, "fake_score_lora_rank": args.fake_score_lora_rank,
            "student_timesteps": [float(t) for t in timesteps], "resolution": args.resolution,
            # per-position heads hold other parameters: named only then, so pooled runs' checkpoints still match
            "discriminator": [args.discriminator_blocks, args.discriminator_head_channels,
                              args.discriminator_head_depth]
            + (["per_position"] if args.discriminator_head_output == "per_position" else [])
            if distribution_loss(args).has_discriminator else None,
            **adapter.provenance_fields(), "run_id": uuid.uuid4().hex}


def student_schedule_fields(models: DistillationModels, method: str) -> dict:
    """What the run trained for: the shipped scheduler's timesteps (and sigmas) == what the exported pipeline runs."""
    scheduler = models.student_scheduler
    sigmas = getattr(scheduler, "sigmas", None)
    return {"method": method, "num_student_steps": len(models.student_timesteps),
            "student_timesteps": [float(t) for t in models.student_timesteps],
            "student_sigmas": sigmas.float().tolist() if isinstance(sigmas, torch.Tensor) else None,
            "student_scheduler": type(scheduler).__name__, "student_scheduler_config": dict(scheduler.config),
            "student_prediction_type": models.student_schedule.prediction_type, "renoise_mode": models.renoise,
            "discriminator_blocks": models.features.module_names if models.features else None}


def _kind(rank: int) -> str:
    return f"LoRA r={rank}" if rank else "full"
