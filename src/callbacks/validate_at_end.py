"""Validate the final weights when the last training step is not a validation step.

A run shorter than `trainer.val_check_interval` (a debugging run, `trainer.max_steps=50`) would
otherwise end fit without a validation: no best checkpoint, no `optimized_metric` for sweepers, no
W&B summary. Lightning validates when training is asked to stop (`trainer.should_stop`, as early
stopping and `max_time` do); this asks for it at the last step that `max_steps` / `max_epochs`
allow. A last step that is a validation step anyway validates once, as before.
"""

from __future__ import annotations

import lightning as L


class ValidateAtEnd(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # not an optimizer step
        last_step = 0 < trainer.max_steps <= trainer.global_step
        max_epochs = trainer.max_epochs
        last_epoch = (
            max_epochs is not None and max_epochs > 0 and trainer.current_epoch >= max_epochs - 1
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )
        if last_step or last_epoch:
            trainer.should_stop = True
