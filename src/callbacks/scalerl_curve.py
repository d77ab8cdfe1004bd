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


def _kept(compute, reward, skip_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    c, r = np.asarray(compute, dtype=np.float64), np.asarray(reward, dtype=np.float64)
    keep = (c > 0) & (c >= skip_fraction * c.max())
    return c[keep], r[keep]


def fit_sigmoid(compute, reward, r0: float, skip_fraction: float = 0.1) -> tuple[float, float, float]:
    """Least-squares (A, B, C_mid) of the ScaleRL sigmoid through (compute, reward), R_0 fixed.

    Compute is rescaled by its maximum for the fit (C_mid is returned in the input's units).
    Raises ValueError with fewer than 3 points left after skipping.
    """
    import warnings

    from scipy.optimize import OptimizeWarning, curve_fit

    c, r = _kept(compute, reward, skip_fraction)
    if len(c) < 3:
        raise ValueError(f"the ScaleRL fit needs >= 3 points after skipping the first {skip_fraction:.0%}, got {len(c)}")
    scale = c.max()
    x = c / scale
    hi = max(1.0, float(r.max()))  # pass rates: A <= 1 (other rewards: the largest seen)
    a0 = float(np.clip(r.max() + 0.05, min(r0, hi) + 1e-6, hi))
    p0 = (a0, 1.0, float(np.median(x)))
    lower = (min(r0, float(r.min())) - 1e-6, 1e-3, 1e-6)
    upper = (hi, 20.0, 1e4)
    with warnings.catch_warnings():  # the covariance (unused: the errors are the bootstrap's) of repeated points
        warnings.simplefilter("ignore", OptimizeWarning)
        (a, b, c_mid), _ = curve_fit(
            lambda xx, a, b, cm: sigmoid_curve(xx, r0, a, b, cm), x, r, p0=p0, bounds=(lower, upper), maxfev=20000
        )
    return float(a), float(b), float(c_mid * scale)


def bootstrap_fit(compute, reward, r0: float, skip_fraction: float = 0.1, n_boot: int = 200, seed: int = 0) -> dict:
    """The fit (`fit_sigmoid`) and its uncertainty: `n_boot` refits on the kept points resampled with replacement
    (a resample with fewer than 3 distinct points, or a refit that fails, is dropped). Returns A, B, C_mid, their
    standard errors (`*_se`: half the 16-84 percentile range of the refits, the standard deviation of a normal
    spread) and the refits (`samples`, (n, 3)). A percentile range, not the refits' standard deviation: on a curve
    that has levelled off, a few resamples that happen to miss the plateau's level look still rising, and their
    refits run to the bound A = 1; those few would set a standard deviation (0.14 against 0.02 on a measured plateau
    with 6 of 100 such refits)."""
    a, b, c_mid = fit_sigmoid(compute, reward, r0, skip_fraction)
    c, r = _kept(compute, reward, skip_fraction)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(c), len(c))
        if len(np.unique(idx)) < 3:
            continue
        try:
            samples.append(fit_sigmoid(c[idx], r[idx], r0, 0.0))
        except (ValueError, RuntimeError):
            continue
    samples = np.array(samples).reshape(-1, 3)
    se = np.diff(np.percentile(samples, [16, 84], axis=0), axis=0)[0] / 2 if len(samples) > 1 else np.full(3, np.nan)
    return {"A": a, "B": b, "C_mid": c_mid, "A_se": float(se[0]), "B_se": float(se[1]), "C_mid_se": float(se[2]),
            "samples": samples}


def predictive_check(compute, reward, r0: float, fraction: float = 0.5, skip_fraction: float = 0.1) -> dict:
    """Fit on the points whose compute is at most `fraction` of the last point's (the early skip applies to those),
    predict the pass rate at the last point's compute, and compare: error = predicted - observed. Raises ValueError
    when the early part has fewer than 3 points to fit."""
    c, r = np.asarray(compute, dtype=np.float64), np.asarray(reward, dtype=np.float64)
    if not 0 < fraction < 1:
        raise ValueError(f"callbacks.scalerl_curve.predict_fraction={fraction}: must be in (0, 1)")
    early = c <= fraction * c.max()
    a, b, c_mid = fit_sigmoid(c[early], r[early], r0, skip_fraction)
    predicted = float(sigmoid_curve(c.max(), r0, a, b, c_mid))
    observed = float(r[np.argmax(c)])
    return {"predicted": predicted, "observed": observed, "error": predicted - observed, "A": a, "B": b,
            "C_mid": c_mid, "fit_compute": float(c[early].max())}


class ScaleRLCurve(L.Callback):
    DASHBOARD = [("ScaleRL curve", [
        ("media", "sigmoid fit of pass rate against compute", ["scalerl/curve"]),
        ("line", "fit: asymptote A, efficiency B, C_mid", "trainer/global_step", ["scalerl/A", "scalerl/B"]),
    ])]

    """Records (cumulative training compute, val pass rate) at each validation and fits the ScaleRL
    sigmoid; logs `scalerl/A`, `scalerl/B`, `scalerl/C_mid`, their bootstrap standard errors (`scalerl/A_se`, ...:
    `n_bootstrap` refits) and a plot with its extrapolation and the refits' 5-95% band. At the end of training, the
    predictive check (`predict_fraction` of the compute: `scalerl/predicted_final`, `scalerl/observed_final`,
    `scalerl/prediction_error`); all of it also in `<dirpath>/scalerl_fit.json`.

    The module must expose `compute` (cumulative FLOPs) and `last_val` (its latest val metrics). R_0 is a full
    validation before training: Lightning's sanity check, which this callback widens to every val batch when
    `trainer.num_sanity_val_steps` would run fewer (0 skipped it and the fit never ran; 1 gave R_0 on one batch). A
    run that still has no R_0 (resumed from a checkpoint without one) says so once and fits nothing.
    """

    def __init__(self, metric: str = "val/pass@1", skip_fraction: float = 0.1, min_points: int = 4,
                 extrapolate: float = 4.0, dirpath: str | None = None, n_bootstrap: int = 100,
                 predict_fraction: float | None = 0.5):
        self.metric, self.skip_fraction, self.min_points = metric, skip_fraction, min_points
        self.extrapolate, self.dirpath = extrapolate, dirpath
        self.n_bootstrap, self.predict_fraction = n_bootstrap, predict_fraction
        self.points: list[tuple[float, float]] = []
        self.fit: tuple[float, float, float] | None = None
        self.result: dict = {}
        self.samples = np.empty((0, 3))  # the last fit's bootstrap refits (A, B, C_mid)
        self._warned = False

    def state_dict(self) -> dict:
        return {"points": list(self.points)}

    def load_state_dict(self, state: dict) -> None:
        self.points = [tuple(p) for p in state.get("points", [])]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """R_0 needs the full val set before training: the sanity check runs all of it (unless R_0 is already here)."""
        if ((self.points and self.points[0][0] == 0.0) or trainer.num_sanity_val_steps == float("inf")
                or trainer.limit_val_batches == 0):
            return
        log.info("ScaleRL curve: R_0 is a full validation before training; trainer.num_sanity_val_steps=%s would run %s, "
                 "so the sanity check runs every val batch (remove callbacks.scalerl_curve to skip both)",
                 trainer.num_sanity_val_steps, "none" if trainer.num_sanity_val_steps == 0 else "a part")
        trainer.num_sanity_val_steps = float("inf")  # Lightning's value for -1: every batch

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
        if self.points[0][0] != 0.0:
            if not self._warned:
                log.warning("ScaleRL curve: no validation before training (R_0) was recorded, so the sigmoid is not "
                            "fitted and no scalerl/* is logged: run from the start with trainer.num_sanity_val_steps=-1 "
                            "(a resumed run keeps the R_0 of the checkpoint it resumes from)")
                self._warned = True
            return
        if len(self.points) < self.min_points:
            return
        r0 = self.points[0][1]
        try:
            fit = bootstrap_fit(*zip(*self.points), r0=r0, skip_fraction=self.skip_fraction, n_boot=self.n_bootstrap)
        except (ValueError, RuntimeError) as e:  # too few points, or no convergence yet
            log.debug("ScaleRL fit skipped: %s", e)
            return
        self.fit = (fit["A"], fit["B"], fit["C_mid"])
        self.samples = fit.pop("samples")
        self.result = {**fit, "R0": r0}
        metrics = {f"scalerl/{k}": v for k, v in self.result.items() if np.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            self._plot(trainer, r0)
            self._write()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The predictive check: the fit on the first `predict_fraction` of the compute against the last point."""
        if not self.predict_fraction or self.fit is None:
            return
        try:
            check = predictive_check(*zip(*self.points), r0=self.points[0][1], fraction=self.predict_fraction,
                                     skip_fraction=self.skip_fraction)
        except (ValueError, RuntimeError) as e:
            log.info("ScaleRL predictive check skipped: %s", e)
            return
        self.result["prediction"] = check
        metrics = {"scalerl/predicted_final": check["predicted"], "scalerl/observed_final": check["observed"],
                   "scalerl/prediction_error": check["error"]}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info("ScaleRL: the fit on the first %.0f%% of the compute predicts %.3f at the end; measured %.3f (error %+.3f)",
                 100 * self.predict_fraction, check["predicted"], check["observed"], check["error"])
        if trainer.is_global_zero:
            self._write()

    def _write(self) -> None:
        if self.dirpath:
            import json

            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
            out = {**self.result, "points": self.points, "skip_fraction": self.skip_fraction}
            (Path(self.dirpath) / "scalerl_fit.json").write_text(json.dumps(out, indent=1, default=float))

    def _plot(self, trainer: L.Trainer, r0: float) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        a, b, c_mid = self.fit
        c, r = np.array(self.points[1:]).T
        grid = np.geomspace(c.min(), c.max() * self.extrapolate, 200)
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        ax.scatter(c, r, s=14, label="val", zorder=3)
        if len(self.samples) > 1:  # the bootstrap refits' 5-95% band, extrapolated
            curves = np.array([sigmoid_curve(grid, r0, *p) for p in self.samples])
            ax.fill_between(grid, *np.percentile(curves, [5, 95], axis=0), color="gray", alpha=0.25,
                            label="bootstrap 5-95%")
        ax.plot(grid, sigmoid_curve(grid, r0, a, b, c_mid), "k--", lw=1,
                label=f"fit: A={a:.3f}±{self.result.get('A_se', float('nan')):.3f}, B={b:.2f}, C_mid={c_mid:.2e}")
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
