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
    def __init__(self):
        self.seen_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen_step = trainer.global_step  # a resumed run starts at its checkpoint's step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # an optimizer step (automatic or manual optimization) is a batch after which global_step moved
        if trainer.global_step == self.seen_step:
            return  # a batch accumulated into the next step
        self.seen_step = trainer.global_step
        last_step = 0 < trainer.max_steps <= trainer.global_step
        max_epochs = trainer.max_epochs
        last_epoch = (
            max_epochs is not None and max_epochs > 0 and trainer.current_epoch >= max_epochs - 1
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )
        if last_step or last_epoch:
            trainer.should_stop = True
