"""The training-data order, and resuming it exactly, at an epoch boundary or in the middle of one.

`EpochShuffle` draws each epoch's order from (seed, epoch) alone. `ResumableTrainData` (a mixin for
our DataModules) puts the current epoch's order into the checkpoint (Lightning saves a DataModule's
`state_dict()`); when fit restarts from a checkpoint taken mid-epoch (a SIGTERM, a kill between
checkpoints, `val_check_interval` inside an epoch), the new train loader continues with the batch
after the last one the checkpoint had processed, instead of starting the epoch over.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """A shuffle that is a function of (seed, epoch) alone (Lightning calls `set_epoch`). Indices in
    `exclude` (a set that may grow during training, e.g. RLVR's retired prompts) are skipped from the
    next epoch on. `order` is the current epoch's order, as drawn at its start. The length is the
    full `n` whatever is excluded, so that Lightning counts the same batches per epoch in a resumed run
    as in the original one (an epoch with exclusions just ends early)."""

    def __init__(self, n: int, seed: int, exclude: set[int] | None = None):
        self.n, self.seed, self.epoch = n, seed, 0
        self.exclude = exclude if exclude is not None else set()
        self.order: list[int] | None = None
        self._resume: tuple[int, list[int], int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, order: list[int], done: int) -> None:
        """If the next iteration is of `epoch`, it yields `order[done:]`: the rest of an interrupted epoch
        (nothing if it had ended)."""
        self._resume = (epoch, list(order), done)

    def __iter__(self):
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch:
            self.order = resume[1]
            return iter(self.order[resume[2]:])
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        self.order = [i for i in order if i not in self.exclude] if self.exclude else order
        return iter(self.order)

    def __len__(self) -> int:
        return self.n


class ResumableTrainData:
    """Mixin for a LightningDataModule whose train loader samples with `train_sampler(...)`."""

    _train_sampler: EpochShuffle | None = None
    _saved: dict | None = None

    def train_sampler(self, n: int, seed: int, batch_size: int, exclude: set[int] | None = None) -> EpochShuffle:
        sampler = EpochShuffle(n, seed, exclude)
        done = self._resumed_batches() * batch_size
        if self._saved and done > 0:
            sampler.resume(self._saved["epoch"], self._saved["epoch_order"], done)
        self._saved = None
        self._train_sampler = sampler
        return sampler

    def _resumed_batches(self) -> int:
        """Batches of the current epoch that the restored checkpoint had processed (0 unless fit restarts)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done and trainer.world_size > 1:
            rank_zero_warn("mid-epoch resume under DDP restarts the epoch's data order (exact on one process)")
            return 0
        return done

    def state_dict(self) -> dict:
        s = self._train_sampler
        return {"epoch": s.epoch, "epoch_order": s.order} if s is not None and s.order is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._saved = state if "epoch_order" in state else None
