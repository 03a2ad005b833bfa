"""The one ADM / DMD2 distillation loop, used by every teacher through its adapter (``dmdx.pipelines.teachers``).

One iteration = one generator update (docs/method.md#adm):
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
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .cli import load_prompts
from .conditioning import cat_conditioning, select_conditioning
from .errors import UsageError
from .finish import finish_and_export, validate
from .lora import LoraView, add_lora_adapter
from .plumbing import (
    ShardedEMAState,
    accumulated_update,
    broadcast_main_weights,
    check_output_dir,
    check_provenance,
    clean_leftovers,
    empty_denoiser,
    fsdp_wrap_classes_of,
    host_memory_mib,
    iteration_seed,
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
    """``--text_embeddings_cache``; ``--precompute_text_embeddings`` alone means a cache in the output folder."""
    folder = getattr(args, "text_embeddings_cache", None)
    if folder is None and getattr(args, "precompute_text_embeddings", False):
        folder = os.path.join(args.output_dir, "text_embeddings")
    return folder


def open_text_cache(adapter, args, prompts: list[str]):
    """Before anything loads: the run's text-embedding cache (None without one; a fingerprint mismatch raises) and
    the prompts it lacks. Where the text encoders will be needed (no cache, or one that lacks prompts) their
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
    return cache, todo


def fill_text_cache(adapter, cache, prompts: list[str], device, dtype, *, rank: int, world: int, barrier,
                    shard_size: int = 256) -> None:
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

    teacher: Any
    teacher_base: Any
    generator: Any
    fake_score: Any
    discriminator_heads: Any  # None for dmd
    features: Any  # BackboneFeatures on D's backbone (None for dmd)
    teacher_schedule: Any
    student_schedule: Any
    student_scheduler: Any
    student_timesteps: torch.Tensor
    renoise: str
    latent_shape: tuple
    weight_dtype: torch.dtype
    ema: Any = None
    discriminator_backbone: Any = None  # None: the teacher itself; else its fp32 copy (--discriminator_precision)
    optimizers: dict = field(default_factory=dict)
    lr_schedulers: dict = field(default_factory=dict)


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
    if getattr(args, "discriminator_precision", "mixed") == "fp32" and models.weight_dtype != torch.float32:
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
                                                    num_downsamples=getattr(args, "discriminator_head_depth", 3),
                                                    output=getattr(args, "discriminator_head_output", "pooled"),
                                                    fp32=models.discriminator_backbone is not None)
    models.discriminator_heads.to(device)
    models.discriminator_heads.train()


def discriminator_features(models: DistillationModels, adapter, x, s, cond) -> list:
    """The frozen backbone's block features that D's heads read, at (x, s). The fp32 copy runs with autocast off: the
    two ODE-step outputs D compares differ by well under 1% of their magnitude, which bf16's 8-bit mantissa rounds
    away (docs/results.md#remedies)."""
    if models.discriminator_backbone is None:
        return models.features(lambda: adapter.predict(models.teacher, x, s, cond))
    with torch.autocast(x.device.type, enabled=False):
        return models.features(lambda: adapter.predict(models.discriminator_backbone, x.float(), s.float(), cond))


def discriminator_logits(models: DistillationModels, adapter, heads, x, s, cond, backbone_grad: bool) -> torch.Tensor:
    """D(x, s) = heads(the frozen backbone's block features at (x, s)), fp32 logits. ``backbone_grad``: let the
    gradient flow through the backbone to ``x`` (the generator's loss, exact R1 / R2). With the fp32 backbone copy the
    heads were built with ``fp32=True``: they keep autocast off themselves."""
    with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
        feats = discriminator_features(models, adapter, x, s, cond)
    return heads(feats).float()


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
    """One ADM (or DMD2) iteration = one generator update; returns every loss term and diagnostic (floats)."""
    from . import (
        adm_latent_predictions,
        adm_noise_levels,
        apply_cfg,
        backward_simulate,
        dmd_loss,
        fake_score_denoising_loss,
        frozen_parameters,
        generator_adversarial_loss,
        hinge_discriminator_loss,
    )
    from .checkpointing import check_finite
    from .diagnostics import band_discriminator_diagnostics, generator_gradient_diagnostics, prediction_gap
    from .freezing import checkpointed_passes
    from .remedies import (
        approximate_r1_penalty,
        ode_step_target,
        r1_penalty,
        sample_renoise_level,
        shape_generator_gradient,
        shared_renoise,
    )

    torch.manual_seed(iteration_seed(args.seed, step, accelerator.process_index))
    # With several processes every rank draws the same student step k per micro-batch (from rank 0's seed): under
    # FSDP each generator forward of the backward simulation is a collective (all-gather), so the ranks must run
    # equally many; DDP draws the same k too, so a DDP and an FSDP run of one seed compute the same thing.
    k_stream = (torch.Generator().manual_seed(iteration_seed(args.seed, step, 0)) if accelerator.num_processes > 1
                else None)
    m, device, logs = models, accelerator.device, {}
    adm = args.distribution_loss == "adm"
    k_micro, batch = args.gradient_accumulation_steps, args.train_batch_size
    train_generator = step >= args.discriminator_warmup_steps
    diagnose = bool(args.diagnostics_steps) and train_generator and step % args.diagnostics_steps == 0
    T = m.teacher_schedule.T
    shift = m.teacher_schedule.shift if args.timestep_sampling == "shifted" else None
    ts = m.student_timesteps.to(device)
    # A pass with a network's parameters frozen (gradient only through its input) uses the unwrapped module so
    # DDP's reducer is not armed; FSDP2 shards in place, the object itself works.
    plain = (lambda mod: mod) if accelerator.distributed_type.name == "FSDP" else accelerator.unwrap_model
    generator_plain, fake_frozen = plain(m.generator), plain(m.fake_score)
    heads_frozen = plain(m.discriminator_heads) if adm else None

    def gen_x0(model, x, t, cond):  # the student's parametrisation: its shipped scheduler's
        return m.student_schedule.to_x0_noise(adapter.predict(model, x, t, cond), x, t)[0]

    def real_x0(x, t, cond, uncond):  # the teacher with CFG: the real score (never needs gradients)
        with torch.no_grad():
            out = adapter.predict(m.teacher, torch.cat([x, x]), torch.cat([t, t]), cat_conditioning(cond, uncond))
            out_cond, out_uncond = out.chunk(2)
            return m.teacher_schedule.to_x0_noise(apply_cfg(out_cond, out_uncond, args.guidance_scale), x, t)[0]

    def fake_x0(model, x, t, cond):  # Choice: the fake score without CFG (DMD2's convention)
        return m.teacher_schedule.to_x0_noise(adapter.predict(model, x, t, cond), x, t)[0]

    def discriminate(heads, x, s, cond, backbone_grad: bool):
        return discriminator_logits(m, adapter, heads, x, s, cond, backbone_grad)

    def draw():
        """A micro-batch: prompts, the student's input at a random step k of its schedule (backward simulation of
        its first k steps without gradients) and the noise levels t, s."""
        cond, uncond = prompt_source.batch(torch.randint(prompt_source.count, (batch,)))
        z = torch.randn((batch, *m.latent_shape), device=device)
        k = int(torch.randint(len(ts), (), generator=k_stream)) if len(ts) > 1 else 0
        x_k = backward_simulate(lambda x, t: gen_x0(generator_plain, x, t, cond), z, ts, k, m.student_schedule,
                                m.renoise) if k else z
        t = adm_noise_levels(torch.rand(batch, device=device), args.min_timestep_percent,
                             args.max_timestep_percent, T, shift)
        s = ode_step_target(t, args.ode_step_dt, T, args.ode_step_mode)  # Choice: dt applied after any shift
        return {"cond": cond, "uncond": uncond, "x_k": x_k, "t_k": ts[k].expand(batch), "k": k, "t": t, "s": s}

    def ode_predictions(b, x0, x_t, fake_model):
        """x_real, x_fake: one PF-ODE step t -> s from the same x_t with the teacher (CFG) and the fake score."""
        cache = {}

        def real(x, tt):
            cache["real"] = real_x0(x.detach(), tt, b["cond"], b["uncond"])
            return cache["real"]

        def fake(x, tt):
            cache["fake"] = fake_x0(fake_model, x, tt, b["cond"])
            return cache["fake"]

        x_real, x_fake = adm_latent_predictions(x_t, b["t"], b["s"], real, fake, m.teacher_schedule)
        return x_real, x_fake, cache  # the x0 predictions, for the recorded DMD loss

    def discriminator_inputs(x_real, x_fake, s):
        """What D sees: the two ODE-step outputs at s, or (--discriminator_renoise shared) both re-noised with the
        same fresh noise to a higher level."""
        if args.discriminator_renoise == "none":
            return x_real, x_fake, s
        level = sample_renoise_level(s, T, args.discriminator_renoise_min)
        x_real, x_fake = shared_renoise(x_real, x_fake, m.teacher_schedule, s, level, torch.randn_like(x_real))
        return x_real, x_fake, level

    with accelerator.autocast():
        # 1. Fake score: denoising loss on detached generator samples (each update draws its own batch).
        def fake_losses():
            for _ in range(k_micro):
                b = draw()
                with torch.no_grad():
                    x0 = gen_x0(generator_plain, b["x_k"], b["t_k"], b["cond"])
                eps = torch.randn_like(x0)
                x_t = m.teacher_schedule.add_noise(x0, eps, b["t"])
                out = adapter.predict(m.fake_score, x_t, b["t"], b["cond"])
                loss = fake_score_denoising_loss(out, x0, eps, b["t"], m.teacher_schedule).mean()
                yield loss, {"loss_fake_score": loss}

        for _ in range(args.fake_score_update_ratio):
            accumulated_update(accelerator, args, m.fake_score, m.optimizers["fake_score"],
                               m.lr_schedulers["fake_score"], fake_losses(), logs, "fake_score",
                               1 / args.fake_score_update_ratio)

        # 2. Generator. The detached predictions of each micro-batch are kept for D's first update (step 3).
        saved, probe = [], {}

        def generator_losses():
            for i in range(k_micro):
                b = draw()
                with torch.set_grad_enabled(train_generator):
                    x0 = gen_x0(m.generator, b["x_k"], b["t_k"], b["cond"])
                eps = torch.randn_like(x0)
                logs["student_step_index"] = logs.get("student_step_index", 0.0) + b["k"] / k_micro
                if diagnose and i == 0 and x0.requires_grad:  # the generator's output gradient, per sample
                    probe.update(x_k=b["x_k"], t_k=b["t_k"], cond=b["cond"], x0=x0.detach())
                    x0.register_hook(lambda g: probe.__setitem__("grad", g.detach().float()))
                if args.generator_gradient != "none" and x0.requires_grad:  # after the probe: it sees the raw one
                    x0.register_hook(lambda g: shape_generator_gradient(g, args.generator_gradient))
                if not adm:  # DMD2: x_t from sg(x0), gradient only through x0 in the loss
                    x_t = m.teacher_schedule.add_noise(x0.detach(), eps, b["t"])
                    with torch.no_grad():
                        x0_real, x0_fake = real_x0(x_t, b["t"], b["cond"], b["uncond"]), fake_x0(
                            fake_frozen, x_t, b["t"], b["cond"])
                    loss = dmd_loss(x0, x0_real, x0_fake).mean()
                    yield loss, {"loss_generator": loss}
                    continue
                x_t = m.teacher_schedule.add_noise(x0, eps, b["t"])  # gradient flows to G through x_t
                x_real, x_fake, cache = ode_predictions(b, x0, x_t, fake_frozen)
                _, d_fake, d_level = discriminator_inputs(x_real, x_fake, b["s"])
                logits_fake = discriminate(heads_frozen, d_fake, d_level, b["cond"], backbone_grad=True)
                loss = generator_adversarial_loss(logits_fake).mean()
                saved.append({**b, "x_real": x_real.detach(), "x_fake": x_fake.detach()})
                with torch.no_grad():  # recorded, not optimised (the paper's Fig. 3): the DMD loss of these samples
                    recorded = dmd_loss(x0.detach(), cache["real"], cache["fake"].detach()).mean()
                    if i == 0:
                        probe.update(x0_real=cache["real"], x0_fake=cache["fake"].detach())
                        gap = prediction_gap(x_real.detach(), x_fake.detach(), x0.detach())
                        logs.update({k: v for k, v in gap.items() if v == v})  # relative: needs a batch of 2+
                yield loss, {"loss_generator": loss, "dmd_loss_recorded": recorded}

        # --gradient_checkpointing_frozen_passes: the fake score's ODE step and D's backbone pass recompute their blocks
        # in the backward instead of keeping them (no effect on passes without gradients: the real score, D's update)
        backbone = m.teacher if m.discriminator_backbone is None else m.discriminator_backbone
        recompute = (checkpointed_passes(fake_frozen, backbone)
                     if adm and getattr(args, "gradient_checkpointing_frozen_passes", False) else nullcontext())
        with frozen_parameters(fake_frozen, heads_frozen), recompute:  # gradient flows through their inputs to G only
            if train_generator:
                accumulated_update(accelerator, args, m.generator, m.optimizers["generator"],
                                   m.lr_schedulers["generator"], generator_losses(), logs, "generator")
                if m.ema is not None:
                    m.ema.step(accelerator.unwrap_model(m.generator).parameters())
            else:  # D warm-up: the same predictions for D, no generator update
                with torch.no_grad():
                    for _, terms in generator_losses():
                        check_finite(terms, accelerator)
                        for key, value in terms.items():
                            logs[key] = logs.get(key, 0.0) + value.float().item() / k_micro
        if diagnose and "grad" in probe:
            with torch.no_grad():
                x0_after = gen_x0(generator_plain, probe["x_k"], probe["t_k"], probe["cond"])
            logs.update(generator_gradient_diagnostics(probe["grad"], probe["x0"], x0_after, probe.get("x0_real"),
                                                       probe.get("x0_fake")))

        # 3. Discriminator heads: hinge loss on x_real (teacher step) vs x_fake (fake-score step); the backbone runs
        #    without autograd. The first update reuses step 2's predictions; further updates draw fresh ones.
        if adm:
            diag = []

            def pair_logits(b):
                """D on real and fake (batched through the backbone, which needs no autograd here), and the penalties
                on D's slope asked for: R1 at the real inputs, R2 at the fake ones ({name: (weight, per sample)})."""
                x_real, x_fake, level = discriminator_inputs(b["x_real"], b["x_fake"], b["s"])
                x, s, cond = torch.cat([x_real, x_fake]), torch.cat([level, level]), cat_conditioning(b["cond"],
                                                                                                     b["cond"])
                logits_real, logits_fake = discriminate(m.discriminator_heads, x, s, cond, backbone_grad=False).chunk(2)
                penalties = {}
                for name, weight, x_at, logits_at in (("loss_r1", args.discriminator_r1_weight, x_real, logits_real),
                                                      ("loss_r2", args.discriminator_r2_weight, x_fake, logits_fake)):
                    if weight > 0:
                        penalties[name] = (weight, slope_penalty(x_at, logits_at, level, b["cond"]))
                return logits_real, logits_fake, penalties

            def slope_penalty(x_at, logits_at, level, cond):
                """||dD/dx||^2 at ``x_at`` per sample: FastGen's finite difference, or exact (a double backward)."""
                if args.discriminator_r1 == "approximate":
                    x_moved = x_at + args.discriminator_r1_alpha * torch.randn_like(x_at)
                    return approximate_r1_penalty(logits_at, discriminate(m.discriminator_heads, x_moved, level, cond,
                                                                          backbone_grad=False))
                from torch.nn.attention import SDPBackend, sdpa_kernel

                x_in = x_at.detach().requires_grad_(True)
                with sdpa_kernel(SDPBackend.MATH):  # a double backward: fused attention kernels have none
                    return r1_penalty(discriminate(m.discriminator_heads, x_in, level, cond, backbone_grad=True), x_in)

            def discriminator_losses(fresh: bool):
                for i in range(k_micro):
                    if fresh:
                        b = draw()
                        with torch.no_grad():
                            x0 = gen_x0(generator_plain, b["x_k"], b["t_k"], b["cond"])
                            x_t = m.teacher_schedule.add_noise(x0, torch.randn_like(x0), b["t"])
                            b["x_real"], b["x_fake"], _ = ode_predictions(b, x0, x_t, fake_frozen)
                    else:
                        b = saved[i]
                    logits_real, logits_fake, penalties = pair_logits(b)
                    loss = hinge_discriminator_loss(logits_real, logits_fake).mean()
                    diag.append((logits_real.detach(), logits_fake.detach(), b["t"]))
                    terms = {"loss_discriminator": loss, **{k: p.mean() for k, (_, p) in penalties.items()}}
                    yield loss + sum(w * terms[k] for k, (w, _) in penalties.items()), terms

            for r in range(args.discriminator_update_ratio):
                diag.clear()
                accumulated_update(accelerator, args, m.discriminator_heads, m.optimizers["discriminator"],
                                   m.lr_schedulers["discriminator"], discriminator_losses(fresh=r > 0), logs,
                                   "discriminator", 1 / args.discriminator_update_ratio)
            logits_real, logits_fake, t = (torch.cat(x) for x in zip(*diag))
            # D's accuracy and logit gap per noise band: at dt = T/64 its signal may sit at low noise only
            band = band_discriminator_diagnostics(logits_real, logits_fake, t, T)
            logs.update({k: v for k, v in band.items() if v == v})  # a band no sample fell in is left out
            logs["logits_real"], logs["logits_fake"] = logits_real.mean().item(), logits_fake.mean().item()

    for name, scheduler in m.lr_schedulers.items():
        logs[f"lr_{name}"] = scheduler.get_last_lr()[0]
    logs["generator_frozen"] = float(not train_generator)
    return logs


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def method_name(args) -> str:
    if args.distribution_loss == "dmd":
        return "dmd"
    return "dmdx" if args.pretrained_generator_name_or_path else "adm"


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
    if args.distribution_loss == "adm":
        adapter.discriminator_blocks(args.discriminator_blocks)
    adapter.latent_shape(args.resolution)
    scheduler = adapter.student_scheduler(args.num_student_steps, generator_path)
    check_student_scheduler(adapter, scheduler, generator_path)
    if args.timestep_sampling == "shifted" and adapter.teacher_schedule().kind != "flow":
        raise UsageError("--timestep_sampling shifted needs a flow (rectified-flow) teacher; "
                         f"{adapter.pipeline_class}'s schedule is {adapter.teacher_schedule().kind}.")
    prompts = load_prompts(args)
    cache_prompts = prompts + list(args.validation_prompts or [])
    cache, _ = open_text_cache(adapter, args, cache_prompts)
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
    if args.distribution_loss == "adm":
        build_discriminator(adapter, args, models, source.negative, device)
    vae = adapter.load_vae(device) if args.validation_prompts else None
    prepare_models(args, accelerator, models)
    method = method_name(args)
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
            if args.distribution_loss == "adm" else None,
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
