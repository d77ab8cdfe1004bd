"""Explicit W&B step axes and summaries (`define_metric`) for every metric family we log.

Lightning's WandbLogger writes `trainer/global_step` into every row; this callback says, per prefix,
that it is the x-axis (optimizer steps), that RL counters (`*/samples`, `*/compute_flops`) are axes
too (RLVR logs them beside its train and val metrics, so W&B can plot reward and pass@1 against
samples and compute), and which summary a run's table shows for each metric (min for losses and
distances, max for accuracies and pass rates, last otherwise).
"""

from __future__ import annotations

import lightning as L

STEP = "trainer/global_step"
PREFIXES = ("train/*", "val/*", "test/*", "perf/*", "scalerl/*", "ref/*", "lr-*")
AXES = ("train/samples", "train/compute_flops", "val/samples", "val/compute_flops")
MIN = ("loss", "fd", "energy_distance", "kl")
MAX = ("exact_match", "accuracies", "accuracy", "pass@", "majority", "pass_rate", "reward/mean", "token_accuracy")


def summary_for(name: str) -> str:
    leaf = name.split("/", 1)[-1]
    if any(k in leaf for k in MIN):
        return "min"
    if any(k in leaf for k in MAX):
        return "max"
    return "last"


class WandbAxes(L.Callback):
    def __init__(self, step_metric: str = STEP):
        self.step_metric = step_metric
        self._seen: set[str] = set()

    def _runs(self, trainer):
        from lightning.pytorch.loggers import WandbLogger

        return [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)] if trainer.is_global_zero else []

    def on_fit_start(self, trainer, pl_module) -> None:
        for run in self._runs(trainer):
            run.define_metric(self.step_metric)
            for axis in AXES:
                run.define_metric(axis, step_metric=self.step_metric, summary="max")
            for prefix in PREFIXES:
                run.define_metric(prefix, step_metric=self.step_metric)

    def _summaries(self, trainer) -> None:
        runs = self._runs(trainer)
        if not runs:
            return
        for name in trainer.callback_metrics:
            if name not in self._seen and not name.endswith(("samples", "compute_flops")):
                self._seen.add(name)
                for run in runs:
                    run.define_metric(name, step_metric=self.step_metric, summary=summary_for(name))

    def on_validation_end(self, trainer, pl_module) -> None:
        self._summaries(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._summaries(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._summaries(trainer)
