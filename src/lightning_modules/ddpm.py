"""Diffusion models: training and DDPM (stochastic) / DDIM (deterministic) sampling.

Two forward processes, each a small class with the same operations (the marginal and its SNR, the training
pair, x0 from the network's output, one DDPM step, one DDIM step, the prior, the network's time input). Steps are integers k in {0, ..., T};
k = 0 is clean data. Sampling with n <= T steps visits k = T, ..., 0 on an evenly spaced grid.

  ve  Nakkiran et al. 2024, "Step-by-step Diffusion" (the lecture):
      x_{t+dt} = x_t + N(0, sigma^2 dt) on t = k/T in [0, 1], so x_t = x_0 + N(0, sigma^2 t).
  vp  Ho et al. 2020, "Denoising Diffusion Probabilistic Models":
      z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps, so z_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
      The deterministic sampler is Song et al. 2020, "Denoising Diffusion Implicit Models" (eta = 0).
  flow  Nakkiran et al.'s flow matching with the linear pointwise flow (Lipman et al. 2023, Liu et al. 2023's
      rectified flow): x_t = (1 - t) x_0 + t eps on continuous t in [0, 1]; the network regresses the
      velocity eps - x_0, and sampling integrates dx/dt = v(x, t) from t = 1 to 0 (Euler: DDIM for this flow;
      Heun, second order), on a grid shifted by `shift` as SD3 / diffusers'.

The network is a library one (src/models/diffusion.py); everything here is the diffusion math.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import nn

from src.models.diffusion import net_from_spec, net_spec, with_class_embeddings
from src.optim import adamw_cosine

TARGETS = ("eps", "x0", "v", "x_prev", "velocity")
WEIGHTINGS = ("none", "min_snr")
SAMPLERS = ("ddpm", "ddim", "dpmpp", "euler", "heun")
FLOW_SAMPLERS = ("euler", "heun")
T_SAMPLINGS = ("uniform", "logit_normal")
# our vp targets as diffusers schedulers' prediction_type
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def per_example(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-example (B,) or scalar tensor against x (B, ...)."""
    v = v.to(x.dtype)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v


def _randn(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=g, device=g.device if g is not None else x.device).to(x.device, x.dtype)


def uniform_steps(num_steps: int, n: int, g: torch.Generator | None) -> torch.Tensor:
    """n training steps k uniform on the grid {1, ..., T} (the discrete processes)."""
    return torch.randint(1, num_steps + 1, (n,), generator=g)


class VEProcess(nn.Module):
    """The lecture's process: x_t = x_{t-dt} + N(0, sigma^2 dt), dt = 1/T, t = k dt."""

    name = "ve"

    def __init__(self, num_steps: int = 1000, sigma: float = 4.0):
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"algo.process.sigma={sigma}: must be > 0")
        self.T, self.sigma = num_steps, sigma

    def sample_k(self, n: int, g) -> torch.Tensor:
        return uniform_steps(self.T, n, g)

    def std(self, k: torch.Tensor) -> torch.Tensor:
        # sigma_t = sigma sqrt(t): the std of x_t given x_0
        return self.sigma * (k.double() / self.T).sqrt().float()

    def marginal(self, x0, k, eps):
        # x_t = x_0 + sigma_t eps
        return x0 + per_example(self.std(k), x0) * eps

    def snr(self, k: torch.Tensor) -> torch.Tensor:
        # signal-to-noise ratio of x_t = x_0 + sigma_t eps: 1 / sigma_t^2 (per unit of data variance)
        return 1.0 / self.std(k).double().pow(2)

    def training_pair(self, x0, k, target, g):
        """The lecture's recipe, steps 3-4: x_{t-dt} = x_0 + N(0, sigma^2 (t - dt)), x_t = x_{t-dt} + N(0, sigma^2 dt).
        Returns (x_t, regression target)."""
        x_prev = self.marginal(x0, k - 1, _randn(x0, g))
        x_t = x_prev + self.sigma * math.sqrt(1 / self.T) * _randn(x0, g)
        if target == "x_prev":
            return x_t, x_prev
        if target == "x0":
            return x_t, x0
        return x_t, (x_t - x0) / per_example(self.std(k), x0)  # eps: the total noise, x_t = x_0 + sigma_t eps

    def predict_x0(self, out, x_t, k, target):
        if target == "x0":
            return out
        if target == "eps":
            return x_t - per_example(self.std(k), x_t) * out
        # x_prev: the network outputs the increment mu - x_t. E[x_{t-dt} | x_t, x_0] = x_t + (dt/t)(x_0 - x_t)
        # (a Brownian bridge), so x0 = x_t + (t/dt)(mu - x_t) with t/dt = k.
        return x_t + per_example(k, x_t) * out

    def mean(self, x, x0, k, s):
        # mu_s(x_t) = E[x_s | x_t, x0] = x_t + ((t - s)/t)(x0 - x_t)
        return x + ((k - s) / k) * (x0 - x)

    def ddpm_step(self, x, x0, k: int, s: int, noise):
        # the lecture (Nakkiran et al. Alg. 2): x_{t-dt} = mu(x_t) + N(0, sigma^2 dt), at every step including
        # the last; dt = (k - s)/T on a coarser grid. It is the reverse kernel to first order in dt: use the full
        # grid (or ddim) for coarse sampling.
        return self.mean(x, x0, k, s) + self.sigma * math.sqrt((k - s) / self.T) * noise

    def ddim_step(self, x, x0, k: int, s: int):
        # Nakkiran et al. (DDIM): x <- x + lambda (mu(x) - x), lambda = sigma_t / (sigma_s + sigma_t)
        sk, ss = self.sigma * math.sqrt(k / self.T), self.sigma * math.sqrt(s / self.T)
        return x + sk / (ss + sk) * (self.mean(x, x0, k, s) - x)

    def prior(self, shape, g, device):
        # x_1 ~ N(0, sigma^2) (the data's own spread is small next to sigma)
        return self.sigma * torch.randn(shape, generator=g, device=g.device if g is not None else device).to(device)

    def net_time(self, k: torch.Tensor) -> torch.Tensor:
        return k.float()  # t * T: the same scale as vp's step index for the sinusoidal embedding


def vp_betas(num_steps: int, schedule: str, beta_start: float, beta_end: float) -> torch.Tensor:
    if schedule == "linear":  # Ho et al.: beta_1 = 1e-4 ... beta_T = 0.02 for T = 1000
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/T + s)/(1 + s) pi/2), beta <= 0.999
        f = lambda t: math.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_steps)], dtype=torch.float64)
    raise ValueError(f"algo.process.schedule={schedule!r}: must be 'linear' or 'cosine'")


class VPProcess(nn.Module):
    """Ho et al.'s variance-preserving process, z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps."""

    name = "vp"

    def __init__(self, num_steps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        self.T = num_steps
        betas = vp_betas(num_steps, schedule, beta_start, beta_end)
        # abar[k] = prod_{i <= k} (1 - beta_i), with abar[0] = 1 (clean data)
        self.register_buffer("abar", torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]),
                             persistent=False)

    def sample_k(self, n: int, g) -> torch.Tensor:
        return uniform_steps(self.T, n, g)

    def _abar(self, k, x):
        return per_example(self.abar.to(x.device)[k], x)

    def marginal(self, x0, k, eps):
        # Ho eq. 4: z_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        alpha_prod_t = self._abar(k, x0)
        return alpha_prod_t.sqrt() * x0 + (1 - alpha_prod_t).sqrt() * eps

    def snr(self, k: torch.Tensor) -> torch.Tensor:
        # SNR_t = abar_t / (1 - abar_t)
        alpha_prod_t = self.abar.to(k.device)[k]
        return alpha_prod_t / (1 - alpha_prod_t)

    def training_pair(self, x0, k, target, g):
        eps = _randn(x0, g)
        x_t = self.marginal(x0, k, eps)
        if target == "v":  # Salimans & Ho 2022: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
            alpha_prod_t = self._abar(k, x0)
            return x_t, alpha_prod_t.sqrt() * eps - (1 - alpha_prod_t).sqrt() * x0
        return x_t, (eps if target == "eps" else x0)

    def predict_x0(self, out, x_t, k, target):
        if target == "x0":
            return out
        alpha_prod_t = self._abar(k, x_t)
        if target == "v":  # x_0 = sqrt(abar_t) z_t - sqrt(1 - abar_t) v
            return alpha_prod_t.sqrt() * x_t - (1 - alpha_prod_t).sqrt() * out
        return (x_t - (1 - alpha_prod_t).sqrt() * out) / alpha_prod_t.sqrt()  # invert eq. 4 with eps_theta

    def ddpm_step(self, x, x0, k: int, s: int, noise):
        # Ho eqs. 6-7 (the posterior q(z_s | z_t, x_0)), for any s < t: with abar_{t|s} = abar_t / abar_s,
        # mean = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x0 + sqrt(abar_{t|s}) (1 - abar_s) / (1 - abar_t) z_t,
        # var = (1 - abar_s) / (1 - abar_t) beta_{t|s}   (sigma_t^2 = beta-tilde_t)
        alpha_prod_t, alpha_prod_s = self.abar[k].item(), self.abar[s].item()
        alpha_t_given_s = alpha_prod_t / alpha_prod_s  # abar_{t|s}; beta_{t|s} = 1 - abar_{t|s}
        mean = (math.sqrt(alpha_prod_s) * (1 - alpha_t_given_s) / (1 - alpha_prod_t) * x0
                + math.sqrt(alpha_t_given_s) * (1 - alpha_prod_s) / (1 - alpha_prod_t) * x)
        return mean + math.sqrt((1 - alpha_prod_s) / (1 - alpha_prod_t) * (1 - alpha_t_given_s)) * noise

    def ddim_step(self, x, x0, k: int, s: int):
        # Song et al. eq. 12 with eta = 0: z_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps_hat
        alpha_prod_t, alpha_prod_s = self.abar[k].item(), self.abar[s].item()
        eps = (x - math.sqrt(alpha_prod_t) * x0) / math.sqrt(1 - alpha_prod_t)
        return math.sqrt(alpha_prod_s) * x0 + math.sqrt(1 - alpha_prod_s) * eps

    def prior(self, shape, g, device):
        return torch.randn(shape, generator=g, device=g.device if g is not None else device).to(device)

    def net_time(self, k: torch.Tensor) -> torch.Tensor:
        return k - 1  # diffusers' 0-based timestep index


class FlowProcess(nn.Module):
    """Flow matching with the linear pointwise flow x_t = (1 - t) x_0 + t eps, t in [0, 1] (continuous).

    Steps k = t T are floats here (the network reads t T, as SD3's timesteps = sigma * 1000). The velocity of the
    pointwise flow is dx_t/dt = eps - x_0; the network regresses it (`velocity`), or eps or x_0, equivalently:
    x_0 = x_t - t v, eps = x_t + (1 - t) v. Sampling integrates the marginal flow dx/dt = E[eps - x_0 | x_t]
    from t = 1 (x_1 ~ N(0, I)) to 0."""

    name = "flow"

    def __init__(self, num_steps: int = 1000, t_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, shift: float = 1.0):
        super().__init__()
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"algo.t_sampling={t_sampling!r}: must be one of {list(T_SAMPLINGS)}")
        if shift <= 0:
            raise ValueError(f"algo.shift={shift}: must be > 0 (1: no shift)")
        if logit_std <= 0:
            raise ValueError(f"algo.process.logit_std={logit_std}: must be > 0")
        self.T, self.t_sampling, self.shift = num_steps, t_sampling, shift
        self.logit_mean, self.logit_std = logit_mean, logit_std

    def t(self, k, x: torch.Tensor | None = None):
        t = k / self.T
        return per_example(t, x) if x is not None and torch.is_tensor(t) else t

    def sample_k(self, n: int, g) -> torch.Tensor:
        """t uniform on [0, 1), or logit-normal (SD3, Esser et al. 2024: sigmoid of N(m, s^2), more weight on the
        middle of the path), as k = t T."""
        if self.t_sampling == "uniform":
            t = torch.rand(n, generator=g)
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=g))
        return t * self.T

    def marginal(self, x0, k, eps):
        t = self.t(k, x0)
        return (1 - t) * x0 + t * eps

    def snr(self, k: torch.Tensor) -> torch.Tensor:
        t = k.double() / self.T
        return ((1 - t) / t) ** 2

    def training_pair(self, x0, k, target, g):
        eps = _randn(x0, g)
        x_t = self.marginal(x0, k, eps)
        return x_t, {"velocity": eps - x0, "eps": eps, "x0": x0}[target]

    def predict_x0(self, out, x_t, k, target):
        t = self.t(k if torch.is_tensor(k) else torch.tensor(float(k)), x_t)
        if target == "velocity":
            return x_t - t * out
        if target == "eps":  # x_t = (1 - t) x0 + t eps
            return (x_t - t * out) / (1 - t).clamp(min=1e-4)
        return out

    def velocity(self, x, x0, k: float) -> torch.Tensor:
        """The velocity (x_t - x_0) / t of the straight path through x_t and x_0 (= eps - x_0)."""
        return (x - x0) / (k / self.T)

    def ddim_step(self, x, x0, k: float, s: float):
        # Euler on dx/dt = v from t to s: x_s = x_t + (s - t) v. For this flow it is DDIM: x_s = (1 - s) x0 + s eps_hat
        return x + (s - k) / self.T * self.velocity(x, x0, k)

    def grid(self, steps: int) -> list[float]:
        """k = t T on t = 1 -> 0 in `steps` even steps, shifted (SD3 / diffusers: t <- shift t / (1 + (shift - 1) t),
        shift > 1 spends more of the steps at high noise)."""
        if steps < 1:
            raise ValueError(f"steps={steps}: must be >= 1")
        t = np.linspace(1.0, 0.0, steps + 1)
        t = self.shift * t / (1 + (self.shift - 1) * t)
        return (t * self.T).tolist()

    def prior(self, shape, g, device):
        return torch.randn(shape, generator=g, device=g.device if g is not None else device).to(device)

    def net_time(self, k: torch.Tensor) -> torch.Tensor:
        return k.float()  # t * T


def make_process(name: str, num_steps: int, **kw) -> nn.Module:
    if num_steps < 1:
        raise ValueError(f"algo.process.num_steps={num_steps}: must be >= 1")
    if name == "ve":
        return VEProcess(num_steps, sigma=kw.get("sigma", 4.0))
    if name == "vp":
        return VPProcess(num_steps, kw.get("schedule", "linear"), kw.get("beta_start", 1e-4), kw.get("beta_end", 0.02))
    if name == "flow":
        return FlowProcess(num_steps, kw.get("t_sampling", "uniform"), kw.get("logit_mean", 0.0),
                           kw.get("logit_std", 1.0), kw.get("shift", 1.0))
    raise ValueError(f"algo.process.name={name!r}: must be 've', 'vp' or 'flow'")


def class_accuracy(samples: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The share of 1x8x8 digit samples that the shipped digits classifier assigns to the label asked for."""
    from src.models.digits_classifier import DigitsFeatures

    clf = DigitsFeatures().net.to(samples.device)
    return (clf(samples.float()).argmax(-1) == labels).float().mean()


def sampling_grid(num_steps: int, steps: int) -> list[int]:
    """k = T, ..., 0 in `steps` evenly spaced jumps ('trailing' spacing: the first step starts at T)."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps={steps}: must be between 1 and the training grid's {num_steps}")
    return np.round(np.linspace(num_steps, 0, steps + 1)).astype(int).tolist()


class DDPMModule(L.LightningModule):
    DASHBOARD = [  # the W&B workspace's sections (sweeps/dashboard.py)
        ("Training", [
            ("line", "denoising loss", "trainer/global_step", ["train/loss", "val/loss"]),
            ("line", "learning rate", "trainer/global_step", ["lr-AdamW"]),
        ]),
        ("Sample quality", [
            ("line", "Frechet distance to held-out digits (lower is better)", "trainer/global_step", ["val/fd"]),
            ("line", "energy distance to held-out points (2-D data)", "trainer/global_step", ["val/energy_distance"]),
            ("media", "samples (EMA weights)", ["val/samples"]),
        ]),
    ]

    def __init__(
        self,
        net: nn.Module,
        process: dict,
        target: str | None = None,
        clip_x0: float | str | None = "auto",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        val_sampler: str | None = None,
        val_steps: int = 50,
        val_num_samples: int = 1000,
        test_sampler: str | None = None,
        test_steps: int = 50,
        test_num_samples: int = 1000,
        sample_batch_size: int = 1000,
        num_logged_samples: int = 64,
        loss_weighting: Literal["none", "min_snr"] = "none",
        snr_gamma: float = 5.0,
        class_conditional: bool = False,
        num_classes: int | None = None,
        cond_drop_prob: float = 0.1,
        guidance_scale: float = 0.0,
        t_sampling: str = "uniform",
        shift: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        # null: the process's own (vp / ve: predict eps, sample with ddim; flow: predict velocity, sample with euler)
        flow = process.get("name") == "flow"
        target = target or ("velocity" if flow else "eps")
        val_sampler = val_sampler or ("euler" if flow else "ddim")
        test_sampler = test_sampler or ("euler" if flow else "ddim")
        if target not in TARGETS:
            raise ValueError(f"algo.target={target!r}: must be one of {list(TARGETS)}")
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(f"algo.loss_weighting={loss_weighting!r}: must be one of {list(WEIGHTINGS)}")
        if loss_weighting == "min_snr" and (snr_gamma <= 0 or target == "x_prev"):
            raise ValueError(f"algo.loss_weighting=min_snr: needs algo.snr_gamma > 0 (got {snr_gamma}) and a target "
                             f"eps, x0 or v (got {target!r})")
        if not 0 <= cond_drop_prob < 1:
            raise ValueError(f"algo.cond_drop_prob={cond_drop_prob}: must be in [0, 1)")
        if guidance_scale < 0:
            raise ValueError(f"algo.guidance_scale={guidance_scale}: must be >= 0 (0: conditional, no guidance)")
        if class_conditional and not num_classes:
            raise ValueError("algo.class_conditional=true needs labelled data, and data.num_classes is not set "
                             "(digits: 10; an image folder: one sub-folder per class, data.num_classes=K)")
        if guidance_scale > 0 and not class_conditional:
            raise ValueError(f"algo.guidance_scale={guidance_scale} needs a class-conditional model: "
                             "train with algo.class_conditional=true")
        for key, value in (("val_sampler", val_sampler), ("test_sampler", test_sampler)):
            if value not in SAMPLERS:
                raise ValueError(f"algo.{key}={value!r}: must be one of {list(SAMPLERS)}")
        self.save_hyperparameters(ignore=["net"], logger=False)
        if not flow and (t_sampling != "uniform" or shift != 1.0):
            raise ValueError(f"algo.t_sampling={t_sampling!r}, algo.shift={shift}: they shape process=flow's time; "
                             f"process={process.get('name')!r} trains on its uniform step grid")
        self.process = make_process(**process, **({"t_sampling": t_sampling, "shift": shift} if flow else {}))
        if target == "velocity" and not flow:
            raise ValueError(f"algo.target=velocity is the flow's (eps - x0); process={self.process.name!r} predicts "
                             "eps, x0, or v (vp) / x_prev (ve)")
        if flow and target not in ("velocity", "eps", "x0"):
            raise ValueError(f"algo.target={target!r} with process=flow: predict velocity (or eps, x0)")
        if flow and loss_weighting != "none":
            raise ValueError("algo.loss_weighting=min_snr is for vp / ve; process=flow shapes its time with "
                             "algo.t_sampling")
        for key, value in (("val_sampler", val_sampler), ("test_sampler", test_sampler)):
            self.check_sampler(value, f"algo.{key}")
        if target == "x_prev" and self.process.name != "ve":
            raise ValueError("algo.target=x_prev is the lecture's ve target; process=vp predicts eps, x0 or v")
        if target == "v" and self.process.name != "vp":
            raise ValueError("algo.target=v (Salimans & Ho's velocity) is defined for process=vp; ve predicts eps, x0 "
                             "or x_prev")
        for key, value in (("val_steps", val_steps), ("test_steps", test_steps)):
            if not 1 <= value <= self.process.T:
                raise ValueError(f"algo.{key}={value}: must be between 1 and algo.process.num_steps={self.process.T}")
        # classifier-free guidance: one extra class embedding, index num_classes, is the null label
        self.null_class = num_classes if class_conditional else None
        self.net = with_class_embeddings(net, num_classes + 1) if class_conditional else net
        # the sample metric (data.metric), built in setup; in a dict so that it is no submodule (kept out of EMA,
        # parameters and checkpoints)
        self._eval: dict = {"metric": None}
        self._samples: dict[str, torch.Tensor] = {}
        self._class_accuracy: dict[str, torch.Tensor] = {}

    def check_sampler(self, sampler: str, key: str = "sampler") -> None:
        """ddpm / ddim sample vp and ve; euler / heun integrate the flow's ODE."""
        if sampler not in SAMPLERS:
            raise ValueError(f"{key}={sampler!r}: must be one of {list(SAMPLERS)}")
        flow = self.process.name == "flow"
        if flow != (sampler in FLOW_SAMPLERS):
            raise ValueError(f"{key}={sampler!r} on process={self.process.name!r}: " + (
                "a flow is sampled by euler or heun (euler is DDIM for this flow)" if flow
                else "euler / heun integrate a flow (process=flow); vp and ve sample with ddpm or ddim"))
        if sampler == "dpmpp" and self.process.name != "vp":
            raise ValueError(f"{key}=dpmpp (DPM-Solver++) solves the vp process's ODE; process={self.process.name!r} "
                             "samples with ddpm or ddim")

    # ------------------------------------------------------------------ network
    def denoise(self, x: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network's raw output at step k (eps, x0, v or the x_prev increment, per `target`); class-conditional
        models take `labels` (the null class `null_class` for the unconditional output)."""
        k = k.expand(x.shape[0]) if k.dim() == 0 else k
        kw = {"class_labels": labels} if labels is not None else {}
        out = self.net(x, self.process.net_time(k).to(x.device), **kw)
        return out.sample if hasattr(out, "sample") else out

    def guided(self, x: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None, w: float) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): (1 + w) out(x, c) - w out(x, null); both in one batch.
        The same combination of eps, x0 or v predictions, since x0_hat is affine in the output."""
        if labels is None or w == 0:
            return self.denoise(x, k, labels)
        null = torch.full_like(labels, self.null_class)
        k2 = k.repeat(2) if k.dim() else k
        cond, uncond = self.denoise(torch.cat([x, x]), k2, torch.cat([labels, null])).chunk(2)
        return (1 + w) * cond - w * uncond

    def x0_hat(self, x: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None = None, w: float = 0.0) -> torch.Tensor:
        x0 = self.process.predict_x0(self.guided(x, k, labels, w), x, k, self.hparams.target)
        c = self.hparams.clip_x0
        if c == "auto":  # our image data lies in [-1, 1]; points are not clipped
            c = 1.0 if x0.dim() > 2 else None
        return x0.clamp(-c, c) if c is not None else x0  # Ho et al. clip x0 to the data range

    # ------------------------------------------------------------------ training
    def _rng(self, stage: str, step: int) -> torch.Generator:
        """Noise is a function of (seed, stage, step, rank): a resumed run draws what an unbroken one would."""
        salt = {"train": 0, "val": 1, "test": 2, "sample": 3}[stage]
        seed = (self.hparams.seed * 1_000_003 + step * 101 + salt) * 64 + self.global_rank
        return torch.Generator(device="cpu").manual_seed(seed % 2**63)

    def loss_weight(self, k: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma (Hang et al. 2023): the x0-space weight min(SNR_t, gamma), expressed for the target the
        network predicts: eps min(SNR, gamma) / SNR, v min(SNR, gamma) / (SNR + 1), x0 min(SNR, gamma)."""
        if self.hparams.loss_weighting == "none":
            return None
        snr = self.process.snr(k)
        clipped = snr.clamp(max=self.hparams.snr_gamma)
        w = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.hparams.target]
        return w.float()

    def split(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0, labels): labels only for a class-conditional model (the data then yields them)."""
        x0, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if self.null_class is not None and labels is None:
            raise ValueError("algo.class_conditional=true but the data yields no labels")
        return x0, (labels if self.null_class is not None else None)

    def loss(self, x0: torch.Tensor, g: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Pick t uniformly from the grid, build (x_t, target), squared loss on predicting the target (per
        example, weighted by `loss_weight`); a conditional model sees the null class with `cond_drop_prob`."""
        k = self.process.sample_k(x0.shape[0], g).to(x0.device)
        x_t, y = self.process.training_pair(x0, k, self.hparams.target, g)
        if labels is not None:  # label dropout: the same network learns the unconditional model
            drop = torch.rand(labels.shape, generator=g).to(labels.device) < self.hparams.cond_drop_prob
            labels = labels.masked_fill(drop, self.null_class)
        out = self.denoise(x_t, k, labels)
        pred = x_t + out if self.hparams.target == "x_prev" else out  # x_prev: mu(x_t) = x_t + net(x_t, t)
        err = (pred - y).pow(2).flatten(1).mean(1)
        w = self.loss_weight(k)
        return (err * w).mean() if w is not None else err.mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x0, labels = self.split(batch)
        loss = self.loss(x0, self._rng("train", self.global_step), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        sampler: str = "ddpm",
        steps: int | None = None,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        shape: tuple[int, ...] | None = None,
        labels: torch.Tensor | int | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """n samples by simulating the reverse process from x_T ~ prior on `steps` grid points (default: all T).
        A class-conditional model draws class `labels` (one int, or (n,); default: every class in turn) with
        guidance w = `guidance_scale` (default: algo.guidance_scale)."""
        self.check_sampler(sampler)
        labels, w = self.sample_labels(n, labels, guidance_scale)
        flow = self.process.name == "flow"
        grid = (self.process.grid if flow else partial(sampling_grid, self.process.T))(steps or self.process.T)
        shape = shape or self.sample_shape
        out = []
        bs = self.hparams.sample_batch_size
        for i in range(0, n, bs):
            m = min(bs, n - i)
            c = labels[i : i + m].to(self.device) if labels is not None else None
            x = x_T[i : i + m].to(self.device) if x_T is not None else self.process.prior((m, *shape), generator, self.device)
            if sampler == "dpmpp":
                out.append(self.dpm_solver_sample(x, steps or self.process.T, c, w))
                continue
            for k, s in zip(grid[:-1], grid[1:]):
                x0 = self.x0_hat(x, torch.tensor(k, device=self.device), c, w)
                if sampler == "ddpm":
                    x = self.process.ddpm_step(x, x0, k, s, _randn(x, generator))
                elif sampler == "heun" and s > 0:  # Heun (Karras et al. 2022, Alg. 1): Euler, then the trapezoid
                    x_euler = self.process.ddim_step(x, x0, k, s)
                    x0_s = self.x0_hat(x_euler, torch.tensor(s, device=self.device), c, w)
                    v = (self.process.velocity(x, x0, k) + self.process.velocity(x_euler, x0_s, s)) / 2
                    x = x + (s - k) / self.process.T * v
                else:  # ddim; euler (and heun's last step to t = 0, as Karras et al.)
                    x = self.process.ddim_step(x, x0, k, s)
            out.append(x)
        return torch.cat(out)

    def dpm_solver_sample(self, x: torch.Tensor, steps: int, labels: torch.Tensor | None, w: float) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022), diffusers' `DPMSolverMultistepScheduler` on this vp process's betas and
        prediction type, 'trailing' steps to sigma = 0: `steps` network evaluations. x0 is not clipped (the solver
        works on its own x0 estimates; diffusers offers only dynamic thresholding)."""
        from diffusers import DPMSolverMultistepScheduler

        abar = self.process.abar
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=self.process.T, trained_betas=(1 - abar[1:] / abar[:-1]).tolist(),
            prediction_type=DIFFUSERS_PREDICTION[self.hparams.target],
            algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing")
        sched.set_timesteps(steps)
        for tau in sched.timesteps:  # diffusers' 0-based index tau is our step k = tau + 1
            out = self.guided(x, torch.tensor(int(tau) + 1, device=self.device), labels, w)
            x = sched.step(out, tau, x).prev_sample
        return x

    def sample_labels(self, n: int, labels, guidance_scale) -> tuple[torch.Tensor | None, float]:
        """The (n,) class labels to draw and the guidance scale, checked against what the model was trained for."""
        w = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        if self.null_class is None:
            if labels is not None or w:
                raise ValueError(f"label={labels}, guidance={w}: this model is unconditional (trained without "
                                 "algo.class_conditional=true); sample it without a label or guidance")
            return None, 0.0
        if w < 0:
            raise ValueError(f"guidance={w}: must be >= 0")
        if labels is None:
            return torch.arange(n) % self.null_class, w  # every class in turn
        labels = torch.full((n,), labels) if isinstance(labels, int) else torch.as_tensor(labels).long()
        bad = labels[(labels < 0) | (labels >= self.null_class)]
        if bad.numel():
            raise ValueError(f"label={bad[0].item()}: outside the model's classes 0..{self.null_class - 1}")
        if labels.shape != (n,):
            raise ValueError(f"labels: {tuple(labels.shape)} for {n} samples")
        return labels, w

    @property
    def sample_shape(self) -> tuple[int, ...]:
        cfg = self.net.config
        if "sample_size" in cfg:
            size = cfg["sample_size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            return (cfg["in_channels"], *size)
        return (cfg["dim"],)

    # ------------------------------------------------------------------ evaluation
    @property
    def _metric(self):
        return self._eval["metric"]

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self._metric is None and dm is not None:
            from src.metrics import sample_metric

            self._eval["metric"] = sample_metric(getattr(dm, "metric", "loss"), self.sample_shape)

    def _eval_start(self, stage: str) -> None:
        hp = self.hparams
        n = hp[f"{stage}_num_samples"]
        if n <= 0 or (self._metric is None and self._trainer is not None and self.trainer.sanity_checking):
            return
        if self._metric is None:  # no sample metric for this data: samples for the picture only
            n = min(n, hp.num_logged_samples)
        # test: the same noise whoever evaluates the checkpoint (the test after fit, eval.py), so its score is a
        # function of its weights; val: varies with the step
        g = self._rng(stage, self.global_step if stage == "val" else 0)
        labels, _ = self.sample_labels(n, None, None)  # a conditional model: every class in turn
        self._samples[stage] = self.sample(n, hp[f"{stage}_sampler"], hp[f"{stage}_steps"], generator=g, labels=labels)
        if self._metric is None:
            return
        self._metric.to(self.device)
        self._metric.reset()
        self._metric.update(self._samples[stage], real=False)
        if labels is not None and self._metric.name == "fd":  # digits: did the sampler draw the asked class?
            self._class_accuracy[stage] = class_accuracy(self._samples[stage], labels.to(self.device))

    def on_validation_epoch_start(self) -> None:
        # runs after the EMA callback swapped in the averaged weights, so samples come from the EMA model
        self._eval_start("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        x0, labels = self.split(batch)
        loss = self.loss(x0, self._rng(stage, batch_idx), labels)  # fixed noise per batch: comparable across evaluations
        self.log(f"{stage}/loss", loss, batch_size=x0.shape[0])
        if stage in self._samples and self._metric is not None:
            self._metric.update(x0, real=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def _eval_end(self, stage: str) -> None:
        samples = self._samples.pop(stage, None)
        if samples is None:
            return
        hp = self.hparams
        tag = f"{hp[f'{stage}_sampler']}{hp[f'{stage}_steps']}"
        if self._metric is not None:
            name = self._metric.name
            value = self._metric.compute().float()
            self.log(f"{stage}/{name}", value, prog_bar=True)
            self.log(f"{stage}/{name}_{tag}", value)  # the same figure, the sampler and step count in its name
        if stage in self._class_accuracy:
            self.log(f"{stage}/class_accuracy", self._class_accuracy.pop(stage))
        from src.utils.images import log_samples

        shown = samples if samples.dim() == 2 else samples[: hp.num_logged_samples]  # 2-D: the whole cloud
        log_samples(self, f"{stage}/samples", shown, caption=f"{tag}, step {self.global_step}")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ------------------------------------------------------------------ optimisation / checkpoints
    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": list(self.net.parameters()), "weight_decay": hp.weight_decay}]
        return adamw_cosine(self, groups, hp.lr, hp.betas, hp.warmup_steps, hp.min_lr_ratio)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["net_spec"] = net_spec(self.net)  # rebuild the network without the Hydra config (sample.py)

    def diffusers_scheduler(self):
        """The diffusers scheduler with this vp process's schedule (None for ve, which diffusers lacks)."""
        if self.process.name != "vp":
            return None
        from diffusers import DDPMScheduler

        p = self.hparams.process
        c = self.hparams.clip_x0
        return DDPMScheduler(
            num_train_timesteps=self.process.T,
            beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[p.get("schedule", "linear")],
            beta_start=p.get("beta_start", 1e-4), beta_end=p.get("beta_end", 0.02),
            prediction_type=DIFFUSERS_PREDICTION[self.hparams.target],
            clip_sample=c is not None, clip_sample_range=1.0 if c in (None, "auto") else float(c),
            timestep_spacing="trailing",
        )

    def export_pretrained(self, path) -> None:
        """The (EMA) network as a diffusers directory; a vp UNet as a `DDPMPipeline` (unet + scheduler). Rank 0
        writes (every process calls it at the end of fit)."""
        from diffusers import DDPMPipeline, UNet2DModel

        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        sched = self.diffusers_scheduler()
        if sched is not None and isinstance(self.net, UNet2DModel):
            DDPMPipeline(unet=self.net, scheduler=sched).save_pretrained(path)
        else:
            self.net.save_pretrained(path)

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str = "cpu") -> DDPMModule:
        """The module from one of our checkpoints; its weights are the EMA ones when EMA was on."""
        from src.utils.run import load_checkpoint

        ckpt = load_checkpoint(path, "ckpt", map_location)  # weights-only: loading runs no code
        if "net_spec" not in ckpt:
            raise ValueError(f"{path}: not a DDPMModule checkpoint (no 'net_spec' key)")
        module = cls(net=net_from_spec(ckpt["net_spec"]), **ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
        return module.eval()
