#!/usr/bin/env python
"""Exact-teacher benchmark: ADM vs DMD2 on a Gaussian mixture whose denoiser is known in closed form.

The data are a mixture of isotropic Gaussians (modes on a ring or a square grid in the first two coordinates of
``--dim`` dimensions, common per-mode std, optional mode weights). Under ``x_t = alpha_t x0 + sigma_t noise`` the
noised distribution is again a mixture, so the teacher's ``E[x0 | x_t]`` is exact: a perfect, guidance-free teacher.
The schedule is a rectified flow (``NoiseSchedule("flow", 1000, "flow")``).

One-step MLP students ``G(z) -> x0`` are trained from the same initialisation, for the same number of generator
updates, with
  * ADM (docs/method.md#adm): an MLP fake score trained by denoising on detached generator samples; from one ``x_t`` the
    teacher and the fake score each take one PF-ODE step to ``t - dt``; an MLP discriminator on that step (and
    optionally on ``x_t``) is trained with the hinge loss; the generator minimises ``-D(fake step)`` with gradients
    through the fake score's input;
  * DMD (DMD2's distribution-matching gradient, no GAN term, no regression term).
All losses and the prediction-type algebra come from ``dmdx.training``.

Writes ``OUT/mixture.json`` (per method: modes covered, off-mode fraction, energy distance to the true mixture,
and the settings) and ``OUT/mixture.png`` (scatter plots). Example:

    python benchmarks/mixture.py --modes 8 --layout ring --init good --out benchmarks/results/run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from fractions import Fraction

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dmdx.training import (
    NoiseSchedule,
    adm_latent_predictions,
    discriminator_diagnostics,
    dmd_loss,
    fake_score_denoising_loss,
    frozen_parameters,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    uniform_timesteps,
)

T_TRAIN = 1000
T_BANDS = ((0.0, 1 / 3, "low"), (1 / 3, 2 / 3, "mid"), (2 / 3, 1.0 + 1e-9, "high"))  # noise bands, as t / T


def fraction(value: str) -> float:
    """A float given as ``0.125`` or ``1/8``."""
    try:
        out = float(Fraction(value))
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"not a number or fraction: {value!r}") from err
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("mixture")
    g.add_argument("--modes", type=int, default=8, help="number of mixture modes K")
    g.add_argument("--layout", choices=["ring", "grid"], default="ring",
                   help="modes on a ring of radius --radius, or a square grid spanning [-radius, radius]^2")
    g.add_argument("--weights", type=str, default=None, help="comma-separated mode weights w1,...,wK (default equal)")
    g.add_argument("--dim", type=int, default=2, help="data dimension D (modes live in the first two coordinates)")
    g.add_argument("--radius", type=float, default=2.0)
    g.add_argument("--mode_std", type=float, default=0.15, help="std of every mode")
    g = p.add_argument_group("training")
    g.add_argument("--methods", type=str, default="adm,dmd", help="comma-separated subset of adm,dmd")
    g.add_argument("--steps", type=int, default=3000, help="generator updates per method")
    g.add_argument("--batch_size", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--init", choices=["poor", "good"], default="good",
                   help="poor: randomly initialised generator (outputs collapsed near the origin); good: the "
                        "generator is first regressed briefly onto teacher ODE pairs (noise -> x0), like ADP")
    g.add_argument("--init_steps", type=int, default=300, help="regression steps of --init good")
    g.add_argument("--fake_score_warmup_steps", type=int, default=300,
                   help="denoising steps of the fake score on the initial generator before either method starts")
    g.add_argument("--generator_lr", type=float, default=2e-4)
    g.add_argument("--fake_score_lr", type=float, default=1e-3)
    g.add_argument("--discriminator_lr", type=float, default=1e-3)
    g.add_argument("--fake_score_update_ratio", type=int, default=1,
                   help="fake-score (and discriminator) updates per generator update (TTUR)")
    g.add_argument("--ema_decay", type=float, default=0.99, help="EMA of the generator; 0 disables it")
    g.add_argument("--hidden", type=int, default=128, help="width of every MLP")
    g = p.add_argument_group("ADM")
    g.add_argument("--ode_step_dt", type=fraction, default=1 / 64,
                   help="ODE step of the two latent predictions, as a fraction of T (paper: 1/64)")
    g.add_argument("--discriminator_warmup_steps", type=int, default=0,
                   help="iterations at the start of ADM in which only the fake score and discriminator train")
    g.add_argument("--discriminator_input", choices=["sample", "step_difference"], default="sample",
                   help="sample: D sees x_{t-dt} (the paper); step_difference: D sees (x_{t-dt} - x_t) * T / dt, "
                        "which removes the x_t component the two predictions share")
    g.add_argument("--discriminator_condition_on_xt", action="store_true",
                   help="also feed x_t to the discriminator")
    g.add_argument("--discriminator_zero_init", action="store_true",
                   help="zero-initialise D's output layer (as DiscriminatorHeads do), so its first generator "
                        "gradients are zero instead of random")
    g = p.add_argument_group("DMD")
    g.add_argument("--dmd_t_min", type=float, default=0.02, help="DMD noise levels U[t_min, t_max] (fractions of T)")
    g.add_argument("--dmd_t_max", type=float, default=0.98)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=str, default="mixture_output")
    g.add_argument("--num_eval_samples", type=int, default=4000)
    g.add_argument("--log_every", type=int, default=250)
    g.add_argument("--num_threads", type=int, default=1, help="torch CPU threads")
    g.add_argument("--no_plot", action="store_true")
    args = p.parse_args(argv)

    if args.modes < 1:
        p.error("--modes must be >= 1")
    if args.layout == "grid" and round(math.sqrt(args.modes)) ** 2 != args.modes:
        p.error(f"--layout grid needs a square number of modes, got {args.modes}")
    if args.dim < 2:
        p.error("--dim must be >= 2")
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            p.error(f"--weights must be comma-separated numbers, got {args.weights!r}")
        if len(weights) != args.modes or min(weights) <= 0:
            p.error(f"--weights needs {args.modes} positive numbers, got {args.weights!r}")
        args.weights = weights
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in ("adm", "dmd") for m in methods):
        p.error(f"--methods must be a comma-separated subset of adm,dmd, got {args.methods!r}")
    args.methods = methods
    if not 0 < args.ode_step_dt < 1:
        p.error("--ode_step_dt must be in (0, 1) (a fraction of T)")
    if not 0 <= args.dmd_t_min < args.dmd_t_max <= 1:
        p.error("need 0 <= --dmd_t_min < --dmd_t_max <= 1")
    if args.fake_score_update_ratio < 1:
        p.error("--fake_score_update_ratio must be >= 1")
    if not 0 <= args.ema_decay < 1:
        p.error("--ema_decay must be in [0, 1)")
    return args


# ---- the mixture and its exact denoiser --------------------------------------------------------------------------
class GaussianMixture:
    def __init__(self, means: torch.Tensor, weights: torch.Tensor, std: float):
        self.means = means.double()  # (K, D)
        self.weights = (weights / weights.sum()).double()
        self.std = float(std)

    @classmethod
    def build(cls, modes: int, layout: str, dim: int, radius: float, std: float, weights=None):
        if layout == "ring":
            angle = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
            xy = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        else:
            side = round(math.sqrt(modes))
            axis = torch.linspace(-radius, radius, side, dtype=torch.float64) if side > 1 else torch.zeros(1)
            xy = torch.cartesian_prod(axis, axis)
        means = torch.zeros(modes, dim, dtype=torch.float64)
        means[:, :2] = xy
        w = torch.ones(modes) if weights is None else torch.tensor(weights)
        return cls(means, w, std)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        return (self.means[k] + self.std * noise).float()

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """Exact ``E[x0 | x_t]``: x_t | k ~ N(alpha mu_k, (alpha^2 s^2 + sigma^2) I)."""
        x = x_t.double()
        alpha, sigma = schedule.alpha_sigma(t, ndim=2, dtype=torch.float64)  # (B, 1)
        var = alpha**2 * self.std**2 + sigma**2
        diff = x[:, None, :] - alpha[:, :, None] * self.means[None]  # (B, K, D)
        logits = self.weights.log()[None] - 0.5 * (diff**2).sum(-1) / var
        resp = logits.softmax(dim=1)  # (B, K)
        post_means = self.means[None] + (alpha * self.std**2 / var)[:, :, None] * diff
        return (resp[:, :, None] * post_means).sum(1).to(x_t.dtype)

    def on_mode_radius(self) -> float:
        """Distance beyond which a point counts as off every mode: 3 std in 2-D, and the same tail mass
        (1 - e^-4.5 inside) in D dimensions."""
        from scipy.stats import chi2

        return self.std * math.sqrt(chi2.ppf(1 - math.exp(-4.5), self.means.shape[1]))


# ---- networks ----------------------------------------------------------------------------------------------------
def time_features(t: torch.Tensor) -> torch.Tensor:
    u = (t.float() / T_TRAIN)[:, None]
    freqs = math.pi * torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    return torch.cat([u, torch.sin(u * freqs), torch.cos(u * freqs)], dim=1)


NUM_TIME_FEATURES = 11


def mlp(in_dim: int, out_dim: int, hidden: int, layers: int = 3) -> nn.Sequential:
    mods, d = [], in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


class Generator(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = mlp(dim, dim, hidden)

    def forward(self, z):
        return self.net(z)


class ScoreNet(nn.Module):
    """(x_t, t) -> raw model output in the schedule's prediction type."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = mlp(dim + NUM_TIME_FEATURES, dim, hidden)

    def forward(self, x_t, t):
        return self.net(torch.cat([x_t, time_features(t)], dim=1))


class Discriminator(nn.Module):
    """(ODE-step prediction at s, s[, x_t]) -> one logit per sample."""

    def __init__(self, dim: int, hidden: int, condition_on_xt: bool):
        super().__init__()
        self.condition_on_xt = condition_on_xt
        self.net = mlp(dim * (2 if condition_on_xt else 1) + NUM_TIME_FEATURES, 1, hidden)

    def forward(self, x_s, s, x_t=None):
        inputs = [x_s, time_features(s)] + ([x_t] if self.condition_on_xt else [])
        return self.net(torch.cat(inputs, dim=1)).squeeze(-1)


# ---- metrics -----------------------------------------------------------------------------------------------------
def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def mixture_metrics(samples: torch.Tensor, mixture: GaussianMixture, reference: torch.Tensor) -> dict:
    samples = samples.double()
    dist = torch.cdist(samples, mixture.means)  # (N, K)
    nearest_dist, nearest = dist.min(dim=1)
    on_mode = nearest_dist <= mixture.on_mode_radius()
    counts = torch.bincount(nearest[on_mode], minlength=len(mixture.means)).double()
    fair_share = mixture.weights * len(samples)
    covered = counts >= 0.25 * fair_share
    return {
        "modes_covered": int(covered.sum()),
        "num_modes": len(mixture.means),
        "off_mode_fraction": float(1 - on_mode.double().mean()),
        "energy_distance": energy_distance(samples, reference),
        "mode_fractions": [round(float(c), 4) for c in counts / len(samples)],
    }


# ---- training ----------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, args, mixture: GaussianMixture, schedule: NoiseSchedule):
        self.args, self.mixture, self.schedule = args, mixture, schedule
        self.dim = args.dim
        gen = torch.Generator().manual_seed(20_000 + args.seed)
        self.eval_z = torch.randn(1000, args.dim, generator=gen)
        self.eval_reference = mixture.sample(1000, generator=gen)

    def teacher_denoise(self, x_t, t):
        return self.mixture.denoise(x_t, t, self.schedule)

    def x0_of(self, score: nn.Module):
        """The fake score as a denoiser callable ``(x_t, t) -> x0`` (prediction-type algebra in dmdx.training)."""
        return lambda x_t, t: self.schedule.to_x0_noise(score(x_t, t), x_t, t)[0]

    def z(self, n=None):
        return torch.randn(n or self.args.batch_size, self.dim)

    def fake_score_step(self, G, F, opt_F):
        with torch.no_grad():
            x0 = G(self.z())
        t = uniform_timesteps(len(x0), 0.0, T_TRAIN)
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        loss = fake_score_denoising_loss(F(x_t, t), x0, noise, t, self.schedule).mean()
        opt_F.zero_grad(set_to_none=True)
        loss.backward()
        opt_F.step()
        return loss.item()

    def initialise(self):
        """Networks shared by both methods: G (pre-fit for --init good), the fake score warmed up on G, D fresh."""
        a = self.args
        G, F = Generator(self.dim, a.hidden), ScoreNet(self.dim, a.hidden)
        D = Discriminator(self.dim, a.hidden, a.discriminator_condition_on_xt)
        if a.discriminator_zero_init:
            nn.init.zeros_(D.net[-1].weight)
            nn.init.zeros_(D.net[-1].bias)
        info = {}
        if a.init == "good":
            # Teacher ODE pairs (noise -> x0) with 64 Euler steps of the exact teacher, then a brief regression.
            z = self.z(8192)
            x = z.clone()
            grid = torch.linspace(T_TRAIN, 0, 65)
            with torch.no_grad():
                for t_cur, t_next in zip(grid[:-1], grid[1:]):
                    t, s = t_cur.expand(len(x)), t_next.expand(len(x))
                    x = self.schedule.ode_step(x, self.teacher_denoise(x, t), t, s)
            opt = torch.optim.Adam(G.parameters(), lr=1e-3)
            for _ in range(a.init_steps):
                idx = torch.randint(0, len(z), (a.batch_size,))
                loss = ((G(z[idx]) - x[idx]) ** 2).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            info["init_regression_loss"] = loss.item()
        opt_F = torch.optim.AdamW(F.parameters(), lr=a.fake_score_lr, weight_decay=0.0)
        for _ in range(a.fake_score_warmup_steps):
            f_loss = self.fake_score_step(G, F, opt_F)
        if a.fake_score_warmup_steps:
            info["fake_score_warmup_loss"] = f_loss
        return G, F, D, info

    def train(self, method: str, G: nn.Module, F: nn.Module, D: nn.Module, seed: int):
        a, sch = self.args, self.schedule
        torch.manual_seed(seed)
        opt_G = torch.optim.AdamW(G.parameters(), lr=a.generator_lr, betas=(0.5, 0.999), weight_decay=0.0)
        opt_F = torch.optim.AdamW(F.parameters(), lr=a.fake_score_lr, weight_decay=0.0)
        opt_D = torch.optim.AdamW(D.parameters(), lr=a.discriminator_lr, betas=(0.5, 0.999), weight_decay=0.0)
        ema = None
        if a.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(G.parameters(), decay=a.ema_decay, use_ema_warmup=False)
        dt = a.ode_step_dt * T_TRAIN
        fake_x0 = self.x0_of(F)
        warmup = a.discriminator_warmup_steps if method == "adm" else 0
        history, window = [], []
        pbar = tqdm(range(warmup + a.steps), desc=method, mininterval=2.0, disable=None)
        for it in pbar:
            # 1. fake score: ordinary denoising on detached generator samples (TTUR ratio).
            for _ in range(a.fake_score_update_ratio):
                f_loss = self.fake_score_step(G, F, opt_F)
            logs = {"fake_score_loss": f_loss}
            if method == "adm":
                # 2. discriminator: hinge on the teacher's vs the fake score's ODE step from the same x_t.
                for _ in range(a.fake_score_update_ratio):
                    with torch.no_grad():
                        x0 = G(self.z())
                        t = uniform_timesteps(len(x0), dt, T_TRAIN)
                        s = t - dt
                        x_t = sch.add_noise(x0, torch.randn_like(x0), t)
                        x_real, x_fake = adm_latent_predictions(x_t, t, s, self.teacher_denoise, fake_x0, sch)
                    logit_real = self.discriminate(D, x_real, x_t, s, dt)
                    logit_fake = self.discriminate(D, x_fake, x_t, s, dt)
                    d_loss = hinge_discriminator_loss(logit_real, logit_fake).mean()
                    opt_D.zero_grad(set_to_none=True)
                    d_loss.backward()
                    opt_D.step()
                logs.update(d_loss=d_loss.item(), **discriminator_diagnostics(logit_real, logit_fake))
                for lo, hi, name in T_BANDS:
                    band = (t >= lo * T_TRAIN) & (t < hi * T_TRAIN)
                    if band.any():
                        d = discriminator_diagnostics(logit_real[band], logit_fake[band])
                        logs[f"logit_gap_{name}"], logs[f"d_accuracy_{name}"] = d["logit_gap"], d["d_accuracy"]
                if it < warmup:
                    window.append(logs)
                    continue
                # 3. generator: fool D with the fake score's ODE step; gradient flows through the fake score's
                #    input (x_t) and D to G, with the fake score's and D's parameters frozen.
                x0 = G(self.z())
                t = uniform_timesteps(len(x0), dt, T_TRAIN)
                s = t - dt
                x_t = sch.add_noise(x0, torch.randn_like(x0), t)
                with frozen_parameters(F, D):
                    x_fake = sch.ode_step(x_t, fake_x0(x_t, t), t, s)
                    g_loss = generator_adversarial_loss(self.discriminate(D, x_fake, x_t, s, dt)).mean()
            else:
                # 2. generator: DMD2's normalised distribution-matching gradient, teacher vs fake score.
                x0 = G(self.z())
                t = uniform_timesteps(len(x0), a.dmd_t_min * T_TRAIN, a.dmd_t_max * T_TRAIN)
                with torch.no_grad():
                    x_t = sch.add_noise(x0, torch.randn_like(x0), t)
                    x0_real, x0_fake = self.teacher_denoise(x_t, t), fake_x0(x_t, t)
                g_loss = dmd_loss(x0, x0_real, x0_fake).mean()
            opt_G.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_G.step()
            opt_D.zero_grad(set_to_none=True)  # nothing should have reached D or F; keep them clean regardless
            opt_F.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(G.parameters())
            logs["generator_loss"] = g_loss.item()
            window.append(logs)
            if (it + 1) % a.log_every == 0 or it + 1 == warmup + a.steps:
                mean = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
                mean["iteration"] = it + 1
                if it >= warmup:  # coverage of the raw generator so far (a quick look, on 1,000 samples)
                    with torch.no_grad():
                        quick = mixture_metrics(G(self.eval_z), self.mixture, self.eval_reference)
                    mean.update({k: quick[k] for k in ("modes_covered", "off_mode_fraction", "energy_distance")})
                history.append(mean)
                pbar.set_postfix({k: f"{v:.3g}" for k, v in mean.items()
                                  if k in ("d_accuracy", "modes_covered", "off_mode_fraction")})
                window = []
        G_ema = None
        if ema is not None:
            G_ema = copy.deepcopy(G)
            ema.copy_to(G_ema.parameters())
        return G, G_ema, history

    def discriminate(self, D, x_s, x_t, s, dt):
        inp = x_s if self.args.discriminator_input == "sample" else (x_s - x_t) * (T_TRAIN / dt)
        return D(inp, s, x_t)


def plot(path, panels, mixture, limit):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), dpi=80)
    for ax, (title, pts) in zip(np.atleast_1d(axes), panels):
        pts = pts[:2000].numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="tab:blue", rasterized=True)
        m = mixture.means.numpy()
        ax.scatter(m[:, 0], m[:, 1], s=12, marker="x", color="tab:red", linewidths=0.8)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    mixture = GaussianMixture.build(args.modes, args.layout, args.dim, args.radius, args.mode_std, args.weights)
    schedule = NoiseSchedule("flow", T_TRAIN, "flow")
    trainer = Trainer(args, mixture, schedule)

    start = time.time()
    G0, F0, D0, init_info = trainer.initialise()
    print(f"initialisation ({args.init}) done in {time.time() - start:.1f}s: {init_info}")

    eval_gen = torch.Generator().manual_seed(10_000 + args.seed)
    reference = mixture.sample(args.num_eval_samples, generator=eval_gen)
    teacher = mixture.sample(args.num_eval_samples, generator=eval_gen)
    z_eval = torch.randn(args.num_eval_samples, args.dim, generator=eval_gen)
    results = {"teacher": mixture_metrics(teacher, mixture, reference)}
    with torch.no_grad():
        init_samples = G0(z_eval)
    results["init"] = mixture_metrics(init_samples, mixture, reference)
    panels = [("teacher", teacher), (f"init ({args.init})", init_samples)]
    histories = {}
    for method in args.methods:
        t0 = time.time()
        G, G_ema, history = trainer.train(method, copy.deepcopy(G0), copy.deepcopy(F0), copy.deepcopy(D0),
                                          seed=args.seed + 1)
        histories[method] = history
        with torch.no_grad():
            for name, net in ((method, G), (f"{method}_ema", G_ema)):
                if net is None:
                    continue
                samples = net(z_eval)
                results[name] = mixture_metrics(samples, mixture, reference)
                results[name]["train_seconds"] = round(time.time() - t0, 1)
                r = results[name]
                panels.append((f"{name}: {r['modes_covered']}/{r['num_modes']} modes, "
                               f"off {r['off_mode_fraction']:.2f}", samples))
        print(f"{method}: {time.time() - t0:.1f}s; last log: {history[-1] if history else {}}")

    for name, r in results.items():
        print(f"{name:>8}: modes {r['modes_covered']:>2}/{r['num_modes']}  off-mode {r['off_mode_fraction']:.3f}  "
              f"energy {r['energy_distance']:.4f}")
    settings = {k: v for k, v in vars(args).items()}
    out = {"settings": settings, "results": results, "init_info": init_info, "history": histories,
           "on_mode_radius": mixture.on_mode_radius(), "means": mixture.means.tolist(),
           "weights": mixture.weights.tolist(), "seconds": round(time.time() - start, 1)}
    with open(os.path.join(args.out, "mixture.json"), "w") as f:
        json.dump(out, f, indent=1)
    if not args.no_plot:
        plot(os.path.join(args.out, "mixture.png"), panels, mixture, args.radius * 1.6)
    print(f"wrote {args.out}/mixture.json in {time.time() - start:.1f}s")
    return out


if __name__ == "__main__":
    main()
