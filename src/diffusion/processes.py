"""Forward processes: how data becomes noise, and what a denoiser's output says about the clean data.

Each process is one class with the same operations: the marginal and its SNR, the training pair, x0 from the
network's output, the sampling grid, the prior, the network's time input, and the reverse steps that are the
process's own math (the DDPM posterior, the DDIM map). Steps are k in {0, ..., T} (a float in [0, T] for the
flow); k = 0 is clean data. Samplers (samplers.py) walk a grid of k from T to 0 with these steps.

  ve  Nakkiran et al. 2024, "Step-by-step Diffusion" (the lecture):
      x_{t+dt} = x_t + N(0, sigma^2 dt) on t = k/T in [0, 1], so x_t = x_0 + N(0, sigma^2 t).
  vp  Ho et al. 2020, "Denoising Diffusion Probabilistic Models":
      z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps, so z_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
      The deterministic step is Song et al. 2020, "Denoising Diffusion Implicit Models" (eta = 0).
  flow  Nakkiran et al.'s flow matching with the linear pointwise flow (Lipman et al. 2023, Liu et al. 2023's
      rectified flow): x_t = (1 - t) x_0 + t eps on continuous t in [0, 1]; the network regresses the velocity
      eps - x_0, and sampling integrates dx/dt = v(x, t) from t = 1 to 0 on an even grid in t, or diffusers'
      FlowMatchEulerDiscreteScheduler's grid (`flow_grid`), shifted as SD3 / diffusers'.

A new process: one class here with `name`, `targets` and the operations, added to `PROCESSES`.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from torch import nn

# what a network may predict, for the error that names a target a process lacks
TARGETS = {
    "eps": "the noise",
    "x0": "the clean data",
    "v": "Salimans & Ho's velocity sqrt(abar) eps - sqrt(1 - abar) x0",
    "x_prev": "the lecture's x_{t-dt}",
    "velocity": "the flow's velocity eps - x0",
}
T_SAMPLINGS = ("uniform", "logit_normal")
FLOW_GRIDS = ("even", "diffusers")


def per_example(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-example (B,) or scalar tensor against x (B, ...)."""
    v = v.to(x.dtype)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v


def randn_like(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped as x, drawn from g (on g's device) so that a seed fixes it on any device."""
    return torch.randn(x.shape, generator=g, device=g.device if g is not None else x.device).to(x.device, x.dtype)


def trailing_grid(num_steps: int, steps: int) -> list[int]:
    """k = T, ..., 0 in `steps` evenly spaced jumps ('trailing' spacing: the first step starts at T)."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps={steps}: must be between 1 and the training grid's {num_steps}")
    return np.round(np.linspace(num_steps, 0, steps + 1)).astype(int).tolist()


class Process(nn.Module):
    """What every process offers; the discrete ones train on k uniform on {1, ..., T}."""

    name: str
    targets: tuple[str, ...]  # what its network may predict; the first is the default
    default_sampler: str
    loss_weightings: tuple[str, ...] = ("none", "min_snr")

    def __init__(self, num_steps: int):
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"algo.process.num_steps={num_steps}: must be >= 1")
        self.T = num_steps

    def sample_k(self, n: int, g) -> torch.Tensor:
        """n training steps k uniform on the grid {1, ..., T}."""
        return torch.randint(1, self.T + 1, (n,), generator=g)

    def grid(self, steps: int) -> list:
        """The `steps` + 1 points k = T, ..., 0 that a sampler visits."""
        return trailing_grid(self.T, steps)

    def prior(self, shape, g, device) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=g.device if g is not None else device).to(device)

    def check_target(self, target: str) -> None:
        if target not in TARGETS:
            raise ValueError(f"algo.target={target!r}: must be one of {list(TARGETS)}")
        if target not in self.targets:
            raise ValueError(f"algo.target={target!r} ({TARGETS[target]}) is not defined for process={self.name!r}, "
                             f"which predicts {' | '.join(self.targets)}")

    def diffusers_scheduler(self, target: str, clip_x0):
        """The diffusers scheduler with this process's schedule, for an exported pipeline (None: diffusers has none)."""
        return None


class VEProcess(Process):
    """The lecture's process: x_t = x_{t-dt} + N(0, sigma^2 dt), dt = 1/T, t = k dt."""

    name = "ve"
    targets = ("eps", "x0", "x_prev")
    default_sampler = "ddim"

    def __init__(self, num_steps: int = 1000, sigma: float = 4.0):
        super().__init__(num_steps)
        if sigma <= 0:
            raise ValueError(f"algo.process.sigma={sigma}: must be > 0")
        self.sigma = sigma

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
        x_prev = self.marginal(x0, k - 1, randn_like(x0, g))
        x_t = x_prev + self.sigma * math.sqrt(1 / self.T) * randn_like(x0, g)
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
        return self.sigma * super().prior(shape, g, device)

    def net_time(self, k: torch.Tensor) -> torch.Tensor:
        return k.float()  # t * T: the same scale as vp's step index for the sinusoidal embedding


def vp_betas(num_steps: int, schedule: str, beta_start: float, beta_end: float) -> torch.Tensor:
    if schedule == "linear":  # Ho et al.: beta_1 = 1e-4 ... beta_T = 0.02 for T = 1000
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/T + s)/(1 + s) pi/2), beta <= 0.999
        f = lambda t: math.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_steps)], dtype=torch.float64)
    raise ValueError(f"algo.process.schedule={schedule!r}: must be 'linear' or 'cosine'")


# our vp targets as diffusers schedulers' prediction_type
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


class VPProcess(Process):
    """Ho et al.'s variance-preserving process, z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps."""

    name = "vp"
    targets = ("eps", "x0", "v")
    default_sampler = "ddim"

    def __init__(self, num_steps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02):
        super().__init__(num_steps)
        self.schedule, self.beta_start, self.beta_end = schedule, beta_start, beta_end
        betas = vp_betas(num_steps, schedule, beta_start, beta_end)
        # abar[k] = prod_{i <= k} (1 - beta_i), with abar[0] = 1 (clean data)
        self.register_buffer("abar", torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]),
                             persistent=False)

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
        eps = randn_like(x0, g)
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

    def net_time(self, k: torch.Tensor) -> torch.Tensor:
        return k - 1  # diffusers' 0-based timestep index

    def diffusers_scheduler(self, target: str, clip_x0):
        from diffusers import DDPMScheduler

        return DDPMScheduler(
            num_train_timesteps=self.T,
            beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[self.schedule],
            beta_start=self.beta_start, beta_end=self.beta_end,
            prediction_type=DIFFUSERS_PREDICTION[target],
            clip_sample=clip_x0 is not None, clip_sample_range=1.0 if clip_x0 in (None, "auto") else float(clip_x0),
            timestep_spacing="trailing",
        )


class FlowProcess(Process):
    """Flow matching with the linear pointwise flow x_t = (1 - t) x_0 + t eps, t in [0, 1] (continuous).

    Steps k = t T are floats here (the network reads t T, as SD3's timesteps = sigma * 1000). The velocity of the
    pointwise flow is dx_t/dt = eps - x_0; the network regresses it (`velocity`) or x_0, which give each other
    exactly at every t: x_0 = x_t - t v. Sampling integrates the marginal flow dx/dt = E[eps - x_0 | x_t]
    from t = 1 (x_1 ~ N(0, I)) to 0.

    eps is refused: sampling starts at t = 1, where x_t = eps, so an eps prediction says nothing of x_0 there and
    x_0 = (x_t - t eps)/(1 - t) divides by zero; near t = 1 it multiplies the network's error by 1/(1 - t)."""

    name = "flow"
    targets = ("velocity", "x0")
    default_sampler = "euler"
    loss_weightings = ("none",)  # the flow shapes its time with t_sampling instead

    def __init__(self, num_steps: int = 1000, t_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, shift: float = 1.0, flow_grid: str = "even"):
        super().__init__(num_steps)
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"algo.t_sampling={t_sampling!r}: must be one of {list(T_SAMPLINGS)}")
        if shift <= 0:
            raise ValueError(f"algo.shift={shift}: must be > 0 (1: no shift)")
        if logit_std <= 0:
            raise ValueError(f"algo.process.logit_std={logit_std}: must be > 0")
        if flow_grid not in FLOW_GRIDS:
            raise ValueError(f"algo.flow_grid={flow_grid!r}: must be one of {list(FLOW_GRIDS)}")
        self.t_sampling, self.shift, self.flow_grid = t_sampling, shift, flow_grid
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
        eps = randn_like(x0, g)
        x_t = self.marginal(x0, k, eps)
        return x_t, {"velocity": eps - x0, "x0": x0}[target]

    def check_target(self, target: str) -> None:
        if target == "eps":
            raise ValueError("algo.target='eps' with algo.process.name=flow: sampling starts at t = 1, where x_t = eps, "
                             "so an eps prediction carries no information on x0 there, and x0 = (x_t - t eps)/(1 - t) "
                             "divides by zero (near t = 1 it multiplies the network's error by 1/(1 - t)); use "
                             "algo.target=velocity or algo.target=x0")
        super().check_target(target)

    def predict_x0(self, out, x_t, k, target):
        if target == "x0":
            return out
        if target != "velocity":
            self.check_target(target)  # raises, naming why
        t = self.t(k if torch.is_tensor(k) else torch.tensor(float(k)), x_t)
        return x_t - t * out  # x_t = x_0 + t (eps - x_0)

    def velocity(self, x, x0, k: float) -> torch.Tensor:
        """The velocity (x_t - x_0) / t of the straight path through x_t and x_0 (= eps - x_0)."""
        return (x - x0) / (k / self.T)

    def ddim_step(self, x, x0, k: float, s: float):
        # Euler on dx/dt = v from t to s: x_s = x_t + (s - t) v. For this flow it is DDIM: x_s = (1 - s) x0 + s eps_hat
        return x + (s - k) / self.T * self.velocity(x, x0, k)

    def shifted(self, t):
        # SD3 / diffusers: t <- shift t / (1 + (shift - 1) t); shift > 1 spends more of the steps at high noise
        return self.shift * t / (1 + (self.shift - 1) * t)

    def grid(self, steps: int) -> list[float]:
        """k = t T from t = 1 to 0 in `steps` steps, shifted. `flow_grid`:
          even       t even on [1, 0], then shifted: the last step starts at shifted(1/steps) (0.25 at 10 steps,
                     shift 3).
          diffusers  FlowMatchEulerDiscreteScheduler.set_timesteps (default settings): `steps` points even from its
                     training grid's largest sigma, shifted(1), to its smallest, shifted(1/T), both in float32 as
                     diffusers builds them; these shifted again, then t = 0 appended. The last step starts at
                     shifted(shifted(1/T)) (0.0089 at 10 steps, shift 3, T = 1000): one step from near-clean data."""
        if steps < 1:  # continuous time: any number of steps
            raise ValueError(f"steps={steps}: must be >= 1")
        if self.flow_grid == "even":
            return (self.shifted(np.linspace(1.0, 0.0, steps + 1)) * self.T).tolist()
        t_max, t_min = self.shifted(torch.tensor([float(self.T), 1.0]) / self.T).tolist()  # diffusers' __init__
        t = np.linspace(t_max * self.T, t_min * self.T, steps) / self.T
        return (np.append(self.shifted(t), 0.0) * self.T).tolist()

    def net_time(self, k: torch.Tensor) -> torch.Tensor:
        return k.float()  # t * T


PROCESSES: dict[str, type[Process]] = {cls.name: cls for cls in (VEProcess, VPProcess, FlowProcess)}


def process_class(name: str) -> type[Process]:
    if name not in PROCESSES:
        raise ValueError(f"algo.process.name={name!r}: must be one of {list(PROCESSES)}")
    return PROCESSES[name]


def make_process(name: str, num_steps: int, **options) -> Process:
    """The process `name` with the options its constructor takes; an option that shapes another process (a
    non-default `shift` on vp) stops, naming the processes that take it. The YAML's other processes' keys
    (`sigma` under vp) are ignored."""
    cls = process_class(name)
    accepted = inspect.signature(cls).parameters
    for key in ("t_sampling", "shift", "flow_grid"):  # algo-level keys (algo.shift), not under algo.process
        if key in options and key not in accepted:
            owners = [n for n, c in PROCESSES.items() if key in inspect.signature(c).parameters]
            default = inspect.signature(PROCESSES[owners[0]]).parameters[key].default
            if options[key] != default:
                raise ValueError(f"algo.{key}={options[key]!r}: it shapes the time of process={' | '.join(owners)}; "
                                 f"process={name!r} trains on its uniform step grid")
    return cls(num_steps, **{k: v for k, v in options.items() if k in accepted})
