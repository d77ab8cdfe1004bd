"""EMA of the weights: Lightning's `EMAWeightAveraging`, with one fix for evaluating checkpoints."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


def ema_decay(decay: float, n: int, warmup: bool) -> float:
    """The decay of the EMA update after n earlier updates. With warm-up (diffusers' `EMAModel`, Tarvainen &
    Valpola's ramp): min(decay, (1 + n) / (10 + n)), so the first updates follow the fast-moving weights
    (2/11, 3/12, ...) instead of averaging in the random initialisation for ~1/(1 - decay) steps."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def ema_multi_avg_fn(decay: float, warmup: bool):
    """AveragedModel's multi-tensor update with `ema_decay`; n is AveragedModel's own update counter (a buffer:
    it is checkpointed, so the ramp continues where it stopped on resume)."""

    @torch.no_grad()
    def update(ema_params, params, n_averaged) -> None:
        d = ema_decay(decay, int(n_averaged), warmup)
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1 - d)  # one fused update over all weights
        else:
            for e, p in zip(ema_params, params):
                e.copy_(e * d + p * (1 - d))

    return update


class EMA(EMAWeightAveraging):
    """theta_ema <- d theta_ema + (1 - d) theta after every optimizer step, d = `ema_decay` (with warm-up by
    default). Validation swaps the
    EMA weights in; checkpoints store them as `state_dict` (the raw weights as `current_model_state`),
    and training ends with the EMA weights in the module.

    Lightning restores `current_model_state` whenever the callback has an averaged model, including
    `trainer.test(ckpt_path=...)` after fit, which would test the raw weights. Outside fit the
    checkpoint's `state_dict` (the EMA weights) is what gets evaluated here."""

    def __init__(self, decay: float = 0.999, warmup: bool = True, update_every_n_steps: int = 1,
                 update_starting_at_step: int | None = None, update_starting_at_epoch: int | None = None,
                 use_buffers: bool = True, device=None):
        if not 0 < decay < 1:
            raise ValueError(f"callbacks.ema.decay={decay}: must be in (0, 1)")
        # the multi-tensor update (one torch._foreach_lerp_ over all weights) instead of Lightning's per-tensor one
        WeightAveraging.__init__(self, device=device, use_buffers=use_buffers, multi_avg_fn=ema_multi_avg_fn(decay, warmup))
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
