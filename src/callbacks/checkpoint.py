"""Lightning's ModelCheckpoint, also saving when the job is told to stop (SIGTERM, e.g. a SLURM
preemption or `kill`, and Ctrl-C): Lightning finishes the running step, raises, and this writes the
checkpoint (and `last.ckpt`) at that step, so `ckpt_path=...` continues exactly from there, mid-epoch
included (src/datamodules/sampler.py). Other exceptions (a NaN loss, bad data) leave the last good
checkpoint as it was.

`last.ckpt` is the state at every validation. (Lightning 2.6 writes it only when a top-k checkpoint was saved at
that step, so after a validation whose monitored metric did not improve, `last.ckpt` and `ckpt_path=last` were an
older state than the run's.)"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class Checkpoint(ModelCheckpoint):
    def __init__(self, *args, save_on_signal: bool = True, **kwargs):
        super().__init__(*args, save_on_exception=save_on_signal, **kwargs)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and self._last_global_step_saved != trainer.global_step
                and not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            super().on_exception(trainer, pl_module, exception)
