"""EMA of the weights: Lightning's `EMAWeightAveraging`, with one fix for evaluating checkpoints."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(EMAWeightAveraging):
    """theta_ema <- decay theta_ema + (1 - decay) theta after every optimizer step. Validation swaps the
    EMA weights in; checkpoints store them as `state_dict` (the raw weights as `current_model_state`),
    and training ends with the EMA weights in the module.

    Lightning restores `current_model_state` whenever the callback has an averaged model, including
    `trainer.test(ckpt_path=...)` after fit, which would test the raw weights. Outside fit the
    checkpoint's `state_dict` (the EMA weights) is what gets evaluated here."""

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 update_starting_at_epoch: int | None = None, use_buffers: bool = True, device=None):
        if not 0 < decay < 1:
            raise ValueError(f"callbacks.ema.decay={decay}: must be in (0, 1)")
        # the multi-tensor update (one torch._foreach_lerp_ over all weights) instead of Lightning's per-tensor one
        WeightAveraging.__init__(self, device=device, use_buffers=use_buffers, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
