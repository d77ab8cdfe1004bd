"""Samplers: walk a process's grid from k = T to 0, one class each, in the shape of diffusers' schedulers.

    sampler.set_timesteps(steps)          # the grid; resets any multistep state
    for k in sampler.timesteps:           # the steps at which to evaluate the network
        x0_hat = denoiser(x, k)           # E[x0 | x_k] from the network (guided, clipped if `clip_x0`)
        x = sampler.step(x0_hat, k, x, generator)

Every sampler takes the network's estimate of x0 (any target converts to it exactly, see
`Process.predict_x0`), so a sampler never knows what the network predicts. A sampler lists the processes it
reverses in `processes`; a new sampler is one class here, added to `SAMPLERS`.

  ddpm   the stochastic reverse process: Ho et al. 2020, eqs. 6-7 (vp); Nakkiran et al. Alg. 2 (ve)
  ddim   the deterministic map: Song et al. 2020, eq. 12 with eta = 0 (vp); Nakkiran et al.'s lambda update (ve)
  dpmpp  DPM-Solver++(2M) (Lu et al. 2022) on the vp process's probability-flow ODE, as diffusers' solver
  euler  Euler on the flow's ODE dx/dt = v (for the linear flow, DDIM)
  heun   Heun's second-order method on the flow's ODE (Karras et al. 2022, Alg. 1)
"""

from __future__ import annotations

import torch

from genlight.diffusion.processes import (
    DIFFUSERS_PREDICTION,
    FlowProcess,
    Process,
    VEProcess,
    VPProcess,
    randn_like,
)


class Sampler:
    name: str
    summary: str = ""  # what it is, for an error message (else its docstring's first line)
    processes: tuple[type[Process], ...]  # the processes it reverses
    clip_x0 = True  # whether the denoiser's x0 estimate is clipped to the data range before each step

    def __init__(self, process: Process):
        self.process = process

    def set_timesteps(self, steps: int) -> None:
        self.grid = self.process.grid(steps)
        self.timesteps = self.grid[:-1]
        self.step_index = 0

    def step(self, x0: torch.Tensor, k, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x at the next grid point s < k, from x at k and the estimate of x0 there."""
        s = self.grid[self.step_index + 1]
        self.step_index += 1
        return self.transition(x0, k, s, x, generator)

    def transition(self, x0, k, s, x, generator):
        raise NotImplementedError


class DDPM(Sampler):
    """Ancestral sampling: x_s drawn from the process's reverse kernel p(x_s | x_k, x0_hat)."""

    name = "ddpm"
    summary = "ancestral sampling from the reverse kernel"
    processes = (VPProcess, VEProcess)

    def transition(self, x0, k, s, x, generator):
        return self.process.ddpm_step(x, x0, k, s, randn_like(x, generator))


class DDIM(Sampler):
    """The deterministic map that keeps the process's marginals (eta = 0)."""

    name = "ddim"
    summary = "the deterministic map that keeps the marginals"
    processes = (VPProcess, VEProcess)

    def transition(self, x0, k, s, x, generator):
        return self.process.ddim_step(x, x0, k, s)


class Euler(Sampler):
    """Euler on the flow's ODE: x_s = x_k + (s - k)/T v(x_k, k), v = (x_k - x0_hat) / t."""

    name = "euler"
    summary = "Euler on the flow's ODE"
    processes = (FlowProcess,)

    def transition(self, x0, k, s, x, generator):
        return self.process.ddim_step(x, x0, k, s)


class Heun(Sampler):
    """Heun's method (Karras et al. 2022, Alg. 1): an Euler step to s, the velocity there, and the step redone
    with the mean of the two velocities; the last step, to t = 0, stays Euler. Two network evaluations a step but
    the last, so `timesteps` holds each intermediate point twice (as diffusers' HeunDiscreteScheduler)."""

    name = "heun"
    summary = "Heun's second-order method on the flow's ODE"
    processes = (FlowProcess,)

    def set_timesteps(self, steps: int) -> None:
        super().set_timesteps(steps)
        self.timesteps = [self.grid[0]] + [k for k in self.grid[1:-1] for _ in range(2)]
        self.first = None  # (x_k, v_k, k, s) between the two stages of a step

    def step(self, x0, k, x, generator=None):
        p = self.process
        if self.first is None:  # stage 1 at k: Euler to s
            s = self.grid[self.step_index + 1]
            v_k = p.velocity(x, x0, k)
            x_euler = x + (s - k) / p.T * v_k
            if s > 0:
                self.first = (x, v_k, k, s)
            else:
                self.step_index += 1
            return x_euler
        x_k, v_k, k0, s = self.first  # stage 2 at s, on the Euler point: the trapezoid
        self.first = None
        self.step_index += 1
        return x_k + (s - k0) / p.T * (v_k + p.velocity(x, x0, s)) / 2


class DPMSolver(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022), diffusers' `DPMSolverMultistepScheduler` on this vp process's betas,
    'trailing' steps to sigma = 0: `steps` network evaluations. It is a data-prediction solver, so it takes x0_hat
    as diffusers' prediction_type='sample' (the same update as from eps or v). x0 is not clipped (the solver
    works on its own x0 estimates; diffusers offers only dynamic thresholding)."""

    name = "dpmpp"
    summary = "DPM-Solver++(2M) on the vp probability-flow ODE"
    processes = (VPProcess,)
    clip_x0 = False

    def set_timesteps(self, steps: int) -> None:
        from diffusers import DPMSolverMultistepScheduler

        abar = self.process.abar
        self.scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=self.process.T, trained_betas=(1 - abar[1:] / abar[:-1]).tolist(),
            prediction_type=DIFFUSERS_PREDICTION["x0"], algorithm_type="dpmsolver++", solver_order=2,
            timestep_spacing="trailing")
        self.scheduler.set_timesteps(steps)
        self.timesteps = [int(tau) + 1 for tau in self.scheduler.timesteps]  # diffusers' 0-based tau is our k - 1

    def step(self, x0, k, x, generator=None):
        return self.scheduler.step(x0, k - 1, x).prev_sample


SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (DDPM, DDIM, DPMSolver, Euler, Heun)}


def samplers_for(process: Process) -> list[str]:
    return [name for name, cls in SAMPLERS.items() if isinstance(process, cls.processes)]


def check_sampler(name: str, process: Process, key: str = "sampler") -> type[Sampler]:
    """The sampler class `name`, if it reverses `process`; else an error naming `key` and the ones that do."""
    if name not in SAMPLERS:
        raise ValueError(f"{key}={name!r}: must be one of {list(SAMPLERS)}")
    cls = SAMPLERS[name]
    if not isinstance(process, cls.processes):
        doc = cls.summary or (cls.__doc__ or "").strip().splitlines()[0]
        raise ValueError(f"{key}={name!r} on process={process.name!r}: {name} reverses process="
                         f"{' | '.join(c.name for c in cls.processes)} ({doc}); process={process.name!r} samples "
                         f"with {' | '.join(samplers_for(process))}")
    return cls


def make_sampler(name: str, process: Process, key: str = "sampler") -> Sampler:
    return check_sampler(name, process, key)(process)
