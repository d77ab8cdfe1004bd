"""EMA of the weights: Lightning's `EMAWeightAveraging`, with one fix for evaluating checkpoints."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMA(EMAWeightAveraging):
    """theta_ema <- decay theta_ema + (1 - decay) theta after every optimizer step. Validation swaps the
    EMA weights in; checkpoints store them as `state_dict` (the raw weights as `current_model_state`),
    and training ends with the EMA weights in the module.

    Lightning restores `current_model_state` whenever the callback has an averaged model, including
    `trainer.test(ckpt_path=...)` after fit, which would test the raw weights. Outside fit the
    checkpoint's `state_dict` (the EMA weights) is what gets evaluated here."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
