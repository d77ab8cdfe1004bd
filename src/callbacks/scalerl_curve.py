"""The ScaleRL compute-performance curve (Khatri et al. 2025, eq. 1):

    R_C = R_0 + (A - R_0) / (1 + (C_mid / C)^B)

R_C: validation pass rate after training compute C; R_0: the pass rate before RL; A: the
asymptotic pass rate; B > 0: the scaling exponent (compute efficiency); C_mid: the compute at
which half of the gain A - R_0 is reached. As in the paper, the earliest points (the first
`skip_fraction` of the compute so far) are left out of the fit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np

log = logging.getLogger(__name__)


def sigmoid_curve(c, r0: float, a: float, b: float, c_mid: float):
    """R_C = R_0 + (A - R_0) / (1 + (C_mid / C)^B)."""
    c = np.asarray(c, dtype=np.float64)
    return r0 + (a - r0) / (1.0 + (c_mid / c) ** b)


def fit_sigmoid(compute, reward, r0: float, skip_fraction: float = 0.1) -> tuple[float, float, float]:
    """Least-squares (A, B, C_mid) of the ScaleRL sigmoid through (compute, reward), R_0 fixed.

    Compute is rescaled by its maximum for the fit (C_mid is returned in the input's units).
    Raises ValueError with fewer than 3 points left after skipping.
    """
    from scipy.optimize import curve_fit

    c, r = np.asarray(compute, dtype=np.float64), np.asarray(reward, dtype=np.float64)
    keep = (c > 0) & (c >= skip_fraction * c.max())
    c, r = c[keep], r[keep]
    if len(c) < 3:
        raise ValueError(f"the ScaleRL fit needs >= 3 points after skipping the first {skip_fraction:.0%}, got {len(c)}")
    scale = c.max()
    x = c / scale
    hi = max(1.0, float(r.max()))  # pass rates: A <= 1 (other rewards: the largest seen)
    a0 = float(np.clip(r.max() + 0.05, min(r0, hi) + 1e-6, hi))
    p0 = (a0, 1.0, float(np.median(x)))
    lower = (min(r0, float(r.min())) - 1e-6, 1e-3, 1e-6)
    upper = (hi, 20.0, 1e4)
    (a, b, c_mid), _ = curve_fit(
        lambda xx, a, b, cm: sigmoid_curve(xx, r0, a, b, cm), x, r, p0=p0, bounds=(lower, upper), maxfev=20000
    )
    return float(a), float(b), float(c_mid * scale)


class ScaleRLCurve(L.Callback):
    DASHBOARD = [("ScaleRL curve", [
        ("media", "sigmoid fit of pass rate against compute", ["scalerl/curve"]),
        ("line", "fit: asymptote A, efficiency B, C_mid", "trainer/global_step", ["scalerl/A", "scalerl/B"]),
    ])]

    """Records (cumulative training compute, val pass rate) at each validation and fits the ScaleRL
    sigmoid; logs `scalerl/A`, `scalerl/B`, `scalerl/C_mid` and a plot with its extrapolation.

    The module must expose `compute` (cumulative FLOPs) and `last_val` (its latest val metrics);
    the validation before training (sanity check over the full val set) gives R_0.
    """

    def __init__(self, metric: str = "val/pass@1", skip_fraction: float = 0.1, min_points: int = 4,
                 extrapolate: float = 4.0, dirpath: str | None = None):
        self.metric, self.skip_fraction, self.min_points = metric, skip_fraction, min_points
        self.extrapolate, self.dirpath = extrapolate, dirpath
        self.points: list[tuple[float, float]] = []
        self.fit: tuple[float, float, float] | None = None

    def state_dict(self) -> dict:
        return {"points": list(self.points)}

    def load_state_dict(self, state: dict) -> None:
        self.points = [tuple(p) for p in state.get("points", [])]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = getattr(pl_module, "last_val", {}).get(self.metric)
        if value is None:
            return
        c = float(getattr(pl_module, "compute", 0.0))
        if self.points and c <= self.points[-1][0]:
            if c == 0.0 and self.points[0][0] == 0.0:
                self.points[0] = (0.0, value)  # a repeated pre-training validation
            return
        self.points.append((c, value))
        if len(self.points) < self.min_points or self.points[0][0] != 0.0:
            return
        r0 = self.points[0][1]
        try:
            self.fit = fit_sigmoid(*zip(*self.points), r0=r0, skip_fraction=self.skip_fraction)
        except (ValueError, RuntimeError) as e:  # too few points, or no convergence yet
            log.debug("ScaleRL fit skipped: %s", e)
            return
        a, b, c_mid = self.fit
        metrics = {"scalerl/A": a, "scalerl/B": b, "scalerl/C_mid": c_mid, "scalerl/R0": r0}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            self._plot(trainer, r0)

    def _plot(self, trainer: L.Trainer, r0: float) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        a, b, c_mid = self.fit
        c, r = np.array(self.points[1:]).T
        grid = np.geomspace(c.min(), c.max() * self.extrapolate, 200)
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        ax.scatter(c, r, s=14, label="val", zorder=3)
        ax.plot(grid, sigmoid_curve(grid, r0, a, b, c_mid), "k--", lw=1,
                label=f"fit: A={a:.3f}, B={b:.2f}, C_mid={c_mid:.2e}")
        ax.axhline(a, color="gray", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_ylabel(self.metric)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        if self.dirpath:
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
            fig.savefig(Path(self.dirpath) / "scalerl_curve.png")
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                fig.canvas.draw()
                image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # uint8 for W&B
                logger.log_image(key="scalerl/curve", images=[image], step=trainer.global_step)
        plt.close(fig)
