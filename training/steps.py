"""The three steps of one ADM / DMD2 iteration (docs/method.md#adm), as ``dmdx.training.loop.train_iteration`` runs
them: :func:`fake_score_step`, :func:`generator_step`, :func:`discriminator_step`.

They share an :class:`Iteration` (the run's models and flags, this iteration's RNG and logs, the passes every step
makes: the student's, the teacher's and the fake score's x0, D's logits, one micro-batch) and pass
:class:`MicroBatch` es between them. Where ADM and DMD2 differ, the :class:`DistributionLoss` chosen once by
``--distribution_loss`` (:func:`distribution_loss`) answers: the generator's loss, which frozen passes recompute
their blocks, whether there is a discriminator to update. Choices where the paper is silent are documented in
docs/method.md#choices and marked "Choice:" here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpointing import check_finite
from .conditioning import cat_conditioning
from .diagnostics import band_discriminator_diagnostics, generator_gradient_diagnostics, prediction_gap
from .freezing import checkpointed_passes, frozen_parameters
from .losses import (
    adm_latent_predictions,
    dmd_loss,
    fake_score_denoising_loss,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    ode_step_target,
)
from .parametrization import apply_cfg
from .plumbing import accumulated_update, iteration_seed
from .remedies import (
    approximate_r1_penalty,
    r1_penalty,
    sample_renoise_level,
    shape_generator_gradient,
    shared_renoise,
)
from .samplers import adm_noise_levels, backward_simulate

if TYPE_CHECKING:
    from .loop import DistillationModels, PromptSource

Tensor = torch.Tensor


@dataclass
class MicroBatch:
    """One micro-batch: prompts, the student's input ``x_k`` at step ``k`` of its schedule (timestep ``t_k``), the
    noise level ``t`` and the ODE step's end ``s``; after the generator's step also the two ODE-step outputs D
    compares (detached), which D's first update reuses."""

    cond: dict
    uncond: dict
    x_k: Tensor
    t_k: Tensor
    k: int
    t: Tensor
    s: Tensor
    x_real: Tensor | None = None
    x_fake: Tensor | None = None


@dataclass
class Iteration:
    """What the three steps of one iteration share. :meth:`start` seeds torch with (seed, step, rank) first, so a
    resumed run draws exactly what the uninterrupted run drew."""

    models: DistillationModels
    adapter: Any  # the teacher adapter (``dmdx.pipelines.teachers``): the only thing that knows the architecture
    args: Any
    accelerator: Any
    prompts: PromptSource
    step: int
    loss: DistributionLoss
    k_stream: torch.Generator | None
    generator_plain: nn.Module  # the frozen-parameter passes' modules (see start)
    fake_frozen: nn.Module
    heads_frozen: nn.Module | None
    logs: dict[str, float] = field(default_factory=dict)
    probe: dict = field(default_factory=dict)  # the generator's output gradient and what it was taken at

    @classmethod
    def start(cls, models: DistillationModels, adapter, args, accelerator, prompts: PromptSource,
              step: int) -> Iteration:
        torch.manual_seed(iteration_seed(args.seed, step, accelerator.process_index))
        # With several processes every rank draws the same student step k per micro-batch (from rank 0's seed):
        # under FSDP each generator forward of the backward simulation is a collective (all-gather), so the ranks
        # must run equally many; DDP draws the same k too, so a DDP and an FSDP run of one seed compute the same.
        k_stream = (torch.Generator().manual_seed(iteration_seed(args.seed, step, 0))
                    if accelerator.num_processes > 1 else None)
        loss = distribution_loss(args)
        # A pass with a network's parameters frozen (gradient only through its input) uses the unwrapped module so
        # DDP's reducer is not armed; FSDP2 shards in place, the object itself works.
        plain = (lambda mod: mod) if accelerator.distributed_type.name == "FSDP" else accelerator.unwrap_model
        return cls(models, adapter, args, accelerator, prompts, step, loss, k_stream, plain(models.generator),
                   plain(models.fake_score), plain(models.discriminator_heads) if loss.has_discriminator else None)

    # ---- what every step asks ----------------------------------------------------------------------------------
    @property
    def k_micro(self) -> int:
        return self.args.gradient_accumulation_steps

    @property
    def train_generator(self) -> bool:
        """False during D's warm-up (``--discriminator_warmup_steps``)."""
        return self.step >= self.args.discriminator_warmup_steps

    @property
    def diagnose(self) -> bool:
        every = self.args.diagnostics_steps
        return bool(every) and self.train_generator and self.step % every == 0

    @property
    def T(self) -> float:
        return self.models.teacher_schedule.T

    def add_log(self, key: str, value: float) -> None:
        self.logs[key] = self.logs.get(key, 0.0) + value

    # ---- the passes --------------------------------------------------------------------------------------------
    def gen_x0(self, model, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        """The student's x0, in its own parametrisation (its shipped scheduler's)."""
        return self.models.student_schedule.to_x0_noise(self.adapter.predict(model, x, t, cond), x, t)[0]

    def real_x0(self, x: Tensor, t: Tensor, cond: dict, uncond: dict) -> Tensor:
        """The teacher with CFG: the real score (never needs gradients)."""
        m = self.models
        with torch.no_grad():
            out = self.adapter.predict(m.teacher, torch.cat([x, x]), torch.cat([t, t]), cat_conditioning(cond, uncond))
            out_cond, out_uncond = out.chunk(2)
            return m.teacher_schedule.to_x0_noise(apply_cfg(out_cond, out_uncond, self.args.guidance_scale), x, t)[0]

    def fake_x0(self, model, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        """Choice: the fake score without CFG (DMD2's convention)."""
        return self.models.teacher_schedule.to_x0_noise(self.adapter.predict(model, x, t, cond), x, t)[0]

    def discriminate(self, heads, x: Tensor, s: Tensor, cond: dict, backbone_grad: bool) -> Tensor:
        return discriminator_logits(self.models, self.adapter, heads, x, s, cond, backbone_grad)

    def draw(self) -> MicroBatch:
        """A micro-batch: prompts, the student's input at a random step k of its schedule (backward simulation of
        its first k steps without gradients) and the noise levels t, s."""
        m, args, batch = self.models, self.args, self.args.train_batch_size
        device = self.accelerator.device
        ts = m.student_timesteps.to(device)
        cond, uncond = self.prompts.batch(torch.randint(self.prompts.count, (batch,)))
        z = torch.randn((batch, *m.latent_shape), device=device)
        k = int(torch.randint(len(ts), (), generator=self.k_stream)) if len(ts) > 1 else 0
        x_k = backward_simulate(lambda x, t: self.gen_x0(self.generator_plain, x, t, cond), z, ts, k,
                                m.student_schedule, m.renoise) if k else z
        shift = m.teacher_schedule.shift if args.timestep_sampling == "shifted" else None
        t = adm_noise_levels(torch.rand(batch, device=device), args.min_timestep_percent,
                             args.max_timestep_percent, self.T, shift)
        s = ode_step_target(t, args.ode_step_dt, self.T, args.ode_step_mode)  # Choice: dt applied after any shift
        return MicroBatch(cond, uncond, x_k, ts[k].expand(batch), k, t, s)

    def ode_predictions(self, b: MicroBatch, x_t: Tensor, fake_model) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x_real, x_fake: one PF-ODE step t -> s from the same x_t with the teacher (CFG) and the fake score; and
        the two x0 predictions they stepped with (for the recorded DMD loss)."""
        x0 = {}

        def real(x, t):
            x0["real"] = self.real_x0(x.detach(), t, b.cond, b.uncond)
            return x0["real"]

        def fake(x, t):
            x0["fake"] = self.fake_x0(fake_model, x, t, b.cond)
            return x0["fake"]

        x_real, x_fake = adm_latent_predictions(x_t, b.t, b.s, real, fake, self.models.teacher_schedule)
        return x_real, x_fake, x0["real"], x0["fake"]

    def discriminator_inputs(self, x_real: Tensor, x_fake: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What D sees: the two ODE-step outputs at s, or (--discriminator_renoise shared) both re-noised with the
        same fresh noise to a higher level."""
        if self.args.discriminator_renoise == "none":
            return x_real, x_fake, s
        level = sample_renoise_level(s, self.T, self.args.discriminator_renoise_min)
        x_real, x_fake = shared_renoise(x_real, x_fake, self.models.teacher_schedule, s, level,
                                        torch.randn_like(x_real))
        return x_real, x_fake, level


# ----------------------------------------------------------------------------------------------------------------
# The distribution loss: ADM or DMD2, chosen once
# ----------------------------------------------------------------------------------------------------------------
class DistributionLoss:
    """What ``--distribution_loss`` changes in an iteration (the fake score's step is the same for both)."""

    name: str
    has_discriminator: bool

    def generator_loss(self, it: Iteration, b: MicroBatch, x0: Tensor, eps: Tensor,
                       first: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's loss on one micro-batch (``x0``: the generator's output, with its graph) and the terms
        logged; ``first``: the iteration's first micro-batch (the one diagnostics look at)."""
        raise NotImplementedError

    def frozen_passes(self, it: Iteration) -> AbstractContextManager:
        """Around the generator's update: which frozen passes recompute their blocks in the backward."""
        return nullcontext()

    def method(self, generator_path: str | None) -> str:
        """The method's name on the model card and in training_config.json."""
        return self.name


class ADM(DistributionLoss):
    """The paper's loss: D on one PF-ODE step of the teacher vs the fake score (docs/method.md#adm)."""

    name, has_discriminator = "adm", True

    def generator_loss(self, it, b, x0, eps, first):
        x_t = it.models.teacher_schedule.add_noise(x0, eps, b.t)  # gradient flows to G through x_t
        x_real, x_fake, x0_real, x0_fake = it.ode_predictions(b, x_t, it.fake_frozen)
        _, d_fake, d_level = it.discriminator_inputs(x_real, x_fake, b.s)
        logits_fake = it.discriminate(it.heads_frozen, d_fake, d_level, b.cond, backbone_grad=True)
        loss = generator_adversarial_loss(logits_fake).mean()
        b.x_real, b.x_fake = x_real.detach(), x_fake.detach()
        with torch.no_grad():  # recorded, not optimised (the paper's Fig. 3): the DMD loss of these samples
            recorded = dmd_loss(x0.detach(), x0_real, x0_fake.detach()).mean()
            if first:
                it.probe.update(x0_real=x0_real, x0_fake=x0_fake.detach())
                gap = prediction_gap(x_real.detach(), x_fake.detach(), x0.detach())
                it.logs.update({k: v for k, v in gap.items() if v == v})  # relative: needs a batch of 2+
        return loss, {"loss_generator": loss, "dmd_loss_recorded": recorded}

    def frozen_passes(self, it):
        """--gradient_checkpointing_frozen_passes: the fake score's ODE step and D's backbone pass recompute their
        blocks in the backward instead of keeping them (no effect on passes without gradients: the real score,
        D's update)."""
        if not it.args.gradient_checkpointing_frozen_passes:
            return nullcontext()
        m = it.models
        backbone = m.teacher if m.discriminator_backbone is None else m.discriminator_backbone
        return checkpointed_passes(it.fake_frozen, backbone)

    def method(self, generator_path):
        return "dmdx" if generator_path else "adm"  # DMDX = ADP, then ADM from its student


class DMD(DistributionLoss):
    """DMD2's loss on the teacher's and the fake score's x0 predictions; no discriminator."""

    name, has_discriminator = "dmd", False

    def generator_loss(self, it, b, x0, eps, first):
        x_t = it.models.teacher_schedule.add_noise(x0.detach(), eps, b.t)  # gradient only through x0 in the loss
        with torch.no_grad():
            x0_real, x0_fake = it.real_x0(x_t, b.t, b.cond, b.uncond), it.fake_x0(it.fake_frozen, x_t, b.t, b.cond)
        loss = dmd_loss(x0, x0_real, x0_fake).mean()
        return loss, {"loss_generator": loss}


DISTRIBUTION_LOSSES: dict[str, DistributionLoss] = {"adm": ADM(), "dmd": DMD()}


def distribution_loss(args) -> DistributionLoss:
    """The loss ``--distribution_loss`` names."""
    return DISTRIBUTION_LOSSES[args.distribution_loss]


# ----------------------------------------------------------------------------------------------------------------
# 1. Fake score
# ----------------------------------------------------------------------------------------------------------------
def fake_score_losses(it: Iteration):
    """The fake score's denoising loss on detached generator samples, per micro-batch (each draws its own)."""
    m = it.models
    for _ in range(it.k_micro):
        b = it.draw()
        with torch.no_grad():
            x0 = it.gen_x0(it.generator_plain, b.x_k, b.t_k, b.cond)
        eps = torch.randn_like(x0)
        x_t = m.teacher_schedule.add_noise(x0, eps, b.t)
        out = it.adapter.predict(m.fake_score, x_t, b.t, b.cond)
        loss = fake_score_denoising_loss(out, x0, eps, b.t, m.teacher_schedule).mean()
        yield loss, {"loss_fake_score": loss}


def fake_score_step(it: Iteration) -> None:
    """``--fake_score_update_ratio`` updates of the fake score (docs/method.md#fake-score-update)."""
    m, ratio = it.models, it.args.fake_score_update_ratio
    for _ in range(ratio):
        accumulated_update(it.accelerator, it.args, m.fake_score, m.optimizers["fake_score"],
                           m.lr_schedulers["fake_score"], fake_score_losses(it), it.logs, "fake_score", 1 / ratio)


# ----------------------------------------------------------------------------------------------------------------
# 2. Generator
# ----------------------------------------------------------------------------------------------------------------
def generator_losses(it: Iteration, saved: list[MicroBatch]):
    """The generator's loss per micro-batch (the distribution loss's), with the probe of its output gradient and
    ``--generator_gradient``'s hook; each micro-batch is appended to ``saved`` for D's first update."""
    mode = it.args.generator_gradient
    for i in range(it.k_micro):
        b = it.draw()
        with torch.set_grad_enabled(it.train_generator):
            x0 = it.gen_x0(it.models.generator, b.x_k, b.t_k, b.cond)
        eps = torch.randn_like(x0)
        it.add_log("student_step_index", b.k / it.k_micro)
        if it.diagnose and i == 0 and x0.requires_grad:  # the generator's output gradient, per sample
            it.probe.update(x_k=b.x_k, t_k=b.t_k, cond=b.cond, x0=x0.detach())
            x0.register_hook(lambda g: it.probe.__setitem__("grad", g.detach().float()))
        if mode != "none" and x0.requires_grad:  # after the probe: it sees the raw one
            x0.register_hook(lambda g: shape_generator_gradient(g, mode))
        loss, terms = it.loss.generator_loss(it, b, x0, eps, first=i == 0)
        if it.loss.has_discriminator:
            saved.append(b)
        yield loss, terms


def generator_step(it: Iteration) -> list[MicroBatch]:
    """One generator update (docs/method.md#generator-update; during D's warm-up: the same predictions for D, no
    update), then the gradient diagnostics; returns the micro-batches with their ODE-step outputs for D's first
    update."""
    m, args, accelerator = it.models, it.args, it.accelerator
    saved: list[MicroBatch] = []
    # gradient flows through the fake score's and D's inputs to G only
    with frozen_parameters(it.fake_frozen, it.heads_frozen), it.loss.frozen_passes(it):
        if it.train_generator:
            accumulated_update(accelerator, args, m.generator, m.optimizers["generator"],
                               m.lr_schedulers["generator"], generator_losses(it, saved), it.logs, "generator")
            if m.ema is not None:
                m.ema.step(accelerator.unwrap_model(m.generator).parameters())
        else:
            with torch.no_grad():
                for _, terms in generator_losses(it, saved):
                    check_finite(terms, accelerator)
                    for key, value in terms.items():
                        it.add_log(key, value.float().item() / it.k_micro)
    probe = it.probe
    if it.diagnose and "grad" in probe:
        with torch.no_grad():
            x0_after = it.gen_x0(it.generator_plain, probe["x_k"], probe["t_k"], probe["cond"])
        it.logs.update(generator_gradient_diagnostics(probe["grad"], probe["x0"], x0_after, probe.get("x0_real"),
                                                      probe.get("x0_fake")))
    return saved


# ----------------------------------------------------------------------------------------------------------------
# 3. Discriminator (ADM)
# ----------------------------------------------------------------------------------------------------------------
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


def slope_penalty(it: Iteration, x_at: Tensor, logits_at: Tensor, level: Tensor, cond: dict) -> Tensor:
    """||dD/dx||^2 at ``x_at`` per sample: FastGen's finite difference, or exact (a double backward)."""
    args, heads = it.args, it.models.discriminator_heads
    if args.discriminator_r1 == "approximate":
        x_moved = x_at + args.discriminator_r1_alpha * torch.randn_like(x_at)
        return approximate_r1_penalty(logits_at, it.discriminate(heads, x_moved, level, cond, backbone_grad=False))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x_in = x_at.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # a double backward: fused attention kernels have none
        return r1_penalty(it.discriminate(heads, x_in, level, cond, backbone_grad=True), x_in)


def pair_logits(it: Iteration, b: MicroBatch) -> tuple[Tensor, Tensor, dict]:
    """D on real and fake (batched through the backbone, which needs no autograd here), and the penalties on D's
    slope asked for: R1 at the real inputs, R2 at the fake ones ({name: (weight, per sample)})."""
    args = it.args
    x_real, x_fake, level = it.discriminator_inputs(b.x_real, b.x_fake, b.s)
    x, s, cond = torch.cat([x_real, x_fake]), torch.cat([level, level]), cat_conditioning(b.cond, b.cond)
    logits_real, logits_fake = it.discriminate(it.models.discriminator_heads, x, s, cond, backbone_grad=False).chunk(2)
    penalties = {}
    for name, weight, x_at, logits_at in (("loss_r1", args.discriminator_r1_weight, x_real, logits_real),
                                          ("loss_r2", args.discriminator_r2_weight, x_fake, logits_fake)):
        if weight > 0:
            penalties[name] = (weight, slope_penalty(it, x_at, logits_at, level, b.cond))
    return logits_real, logits_fake, penalties


def discriminator_losses(it: Iteration, saved: list[MicroBatch], fresh: bool, diag: list):
    """D's hinge loss (plus the penalties) per micro-batch: on the generator step's predictions, or (``fresh``)
    on freshly drawn ones. Appends (logits_real, logits_fake, t) to ``diag``."""
    m = it.models
    for i in range(it.k_micro):
        if fresh:
            b = it.draw()
            with torch.no_grad():
                x0 = it.gen_x0(it.generator_plain, b.x_k, b.t_k, b.cond)
                x_t = m.teacher_schedule.add_noise(x0, torch.randn_like(x0), b.t)
                b.x_real, b.x_fake, _, _ = it.ode_predictions(b, x_t, it.fake_frozen)
        else:
            b = saved[i]
        logits_real, logits_fake, penalties = pair_logits(it, b)
        loss = hinge_discriminator_loss(logits_real, logits_fake).mean()
        diag.append((logits_real.detach(), logits_fake.detach(), b.t))
        terms = {"loss_discriminator": loss, **{k: p.mean() for k, (_, p) in penalties.items()}}
        yield loss + sum(w * terms[k] for k, (w, _) in penalties.items()), terms


def discriminator_step(it: Iteration, saved: list[MicroBatch]) -> None:
    """``--discriminator_update_ratio`` updates of D's heads (docs/method.md#discriminator-update; the first on the
    generator step's predictions), then
    D's accuracy and logit gap per noise band: at dt = T/64 its signal may sit at low noise only."""
    m, args, ratio = it.models, it.args, it.args.discriminator_update_ratio
    diag = []
    for r in range(ratio):
        diag.clear()
        accumulated_update(it.accelerator, args, m.discriminator_heads, m.optimizers["discriminator"],
                           m.lr_schedulers["discriminator"], discriminator_losses(it, saved, r > 0, diag), it.logs,
                           "discriminator", 1 / ratio)
    logits_real, logits_fake, t = (torch.cat(x) for x in zip(*diag))
    band = band_discriminator_diagnostics(logits_real, logits_fake, t, it.T)
    it.logs.update({k: v for k, v in band.items() if v == v})  # a band no sample fell in is left out
    it.logs["logits_real"], it.logs["logits_fake"] = logits_real.mean().item(), logits_fake.mean().item()
