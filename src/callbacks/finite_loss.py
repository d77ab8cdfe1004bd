"""Stop at the first NaN/inf training loss, before it reaches the weights or any checkpoint."""

from __future__ import annotations

import lightning as L
import torch


class FiniteLossGuard(L.Callback):
    """Raises `FloatingPointError` (naming the step and the last good checkpoint) when the training
    loss is not finite on any process, before its backward pass: the optimizer never applies it,
    and checkpoints already written stay the last good state to resume from."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):  # any process
            return
        ckpt = trainer.checkpoint_callback
        last = (ckpt.last_model_path or ckpt.best_model_path) if ckpt else ""
        raise FloatingPointError(
            f"training loss is {loss.detach().float().flatten()[0].item()} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}); stopped before the update. Last good checkpoint: "
            f"{last or 'none written yet'}" + (f" (resume: ckpt_path={last}, e.g. with a lower algo.lr)" if last else "")
        )
