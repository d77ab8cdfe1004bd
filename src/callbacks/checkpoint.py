"""Lightning's ModelCheckpoint, also saving when the job is told to stop (SIGTERM, e.g. a SLURM
preemption or `kill`, and Ctrl-C): Lightning finishes the running step, raises, and this writes the
checkpoint (and `last.ckpt`) at that step, so `ckpt_path=...` continues exactly from there, mid-epoch
included (src/datamodules/sampler.py). Other exceptions (a NaN loss, bad data) leave the last good
checkpoint as it was."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class Checkpoint(ModelCheckpoint):
    def __init__(self, *args, save_on_signal: bool = True, **kwargs):
        super().__init__(*args, save_on_exception=save_on_signal, **kwargs)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            super().on_exception(trainer, pl_module, exception)
