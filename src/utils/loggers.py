"""Loggers that survive fork-launched strategies (`trainer.strategy=ddp_fork`, as in sweeps and tests).

With `ddp_fork`, `trainer.fit` and `trainer.test` each run in freshly forked worker processes, and
whatever a logger opened in one is gone in the next. Lightning's CSVLogger then writes the test
rows into a file whose header it no longer knows (and a new writer deletes the old file); a W&B
run opened in the parent is unusable in the children. `prepare_for_workers` fixes, in the parent,
what both phases must share (the CSV version, the W&B run id), our CSVLogger appends to its own
metrics file, and `FinishWandbInWorker` closes the W&B run at the end of each worker phase.
"""

from __future__ import annotations

import csv
import os
import sys

import lightning as L
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # keep an existing metrics.csv of this version (an earlier phase of the same run) and its columns
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class CSVLogger(_CSVLogger):
    """Lightning's CSVLogger; a second writer of the same version (fit, then test, in separate worker
    processes) appends to the metrics file instead of replacing it. Our runs get fresh directories, so
    nothing older is ever appended to."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger with its run id fixed when it is built (a W&B id unless `id` is given, resumable),
    so that fit and test in separate worker processes (`ddp_fork`) write to one run; and without the
    `anonymous` argument that Lightning always passes to `wandb.init` (as None), which W&B deprecates and warns
    about on every run. `_wandb_init` is Lightning's private record of wandb.init's arguments: pinned by
    tests/test_library_contracts.py."""

    def __init__(self, *args, id: str | None = None, **kwargs):
        from wandb.sdk.lib.runid import generate_id

        kwargs.setdefault("resume", "allow")
        super().__init__(*args, id=id or generate_id(), **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def forks_workers(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)


def prepare_for_workers(trainer: L.Trainer) -> None:
    """Before fit/test fork workers: fix the CSV version in the parent, so both phases write to one CSV file; a
    W&B logger must have its run id already (ours does), so both phases write to one W&B run."""
    for logger in trainer.loggers:
        if isinstance(logger, _WandbLogger) and logger.version is None:
            raise ValueError("a W&B logger without a run id under a fork-launched strategy would open two runs: use "
                             "genlight.utils.loggers.WandbLogger (logger=wandb) or give it an id")
        if isinstance(logger, _CSVLogger):
            _ = logger.version  # computed once, here


class FinishWandbInWorker(L.Callback):
    """Closes the W&B run at the end of each phase in a forked worker (its atexit hooks never run)."""

    def __init__(self):
        self.parent = os.getpid()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a W&B run exists only where wandb was imported (logger=wandb): never import it here, so a run without W&B
        # (logger=none / csv, or wandb not installed) never loads it
        wandb = sys.modules.get("wandb")
        if wandb is not None and os.getpid() != self.parent and wandb.run is not None:
            wandb.finish()
