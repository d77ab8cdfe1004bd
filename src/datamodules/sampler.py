"""The training-data order, and resuming it exactly, at an epoch boundary or in the middle of one.

`EpochShuffle` draws each epoch's order from (seed, epoch) alone. The train loader is a
`ResumableLoader`: a DataLoader with `state_dict` / `load_state_dict`, which is how Lightning
recognises a resumable loader. Lightning stores its state (the current epoch's order) in the
checkpoint and hands it back before the first batch of a resumed fit; the loader then continues
with the batch after the last one the checkpoint had processed (a SIGTERM, a kill between
checkpoints, `val_check_interval` inside an epoch) instead of starting the epoch over.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Sampler


class EpochShuffle(Sampler[int]):
    """A shuffle that is a function of (seed, epoch) alone (Lightning calls `set_epoch`). Indices in
    `exclude` (a set that may grow during training, e.g. RLVR's retired prompts) are skipped from the
    next epoch on. `order` is the current epoch's order, as drawn at its start. The length is the
    full `n` whatever is excluded, so that Lightning counts the same batches per epoch in a resumed run
    as in the original one (an epoch with exclusions just ends early; under several processes the kept
    indices fill the excluded slots instead, since the distributed sampler needs all n)."""

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
        if len(self.order) < self.n and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Lightning's distributed sampler splits a list of fixed length n among the processes: fill the
            # excluded slots by cycling the kept indices (every process holds the same excluded set)
            if not self.order:
                raise RuntimeError("every train example is excluded (RLVR: all prompts retired); nothing to sample")
            self.order = (self.order * (self.n // len(self.order) + 1))[: self.n]
        return iter(self.order)

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """The train DataLoader over an `EpochShuffle` (`shuffle`), stateful as Lightning checks it.

    `batches_done()` tells, when Lightning restores the state, how many batches of the saved epoch
    the checkpoint had processed (the fit loop's progress; the loader itself cannot know, since
    Lightning prefetches). Both are __init__ arguments kept as attributes of the same name, so the
    loader survives Lightning re-creating it (e.g. to add a DistributedSampler under DDP)."""

    def __init__(self, *args, shuffle_order: EpochShuffle | None = None,
                 batches_done: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.shuffle_order, self.batches_done = shuffle_order, batches_done

    def state_dict(self) -> dict:
        s = self.shuffle_order
        return {"epoch": s.epoch, "epoch_order": s.order} if s is not None and s.order is not None else {}

    def load_state_dict(self, state: dict) -> None:
        done = self.batches_done() * self.batch_size if self.batches_done else 0
        if self.shuffle_order is not None and "epoch_order" in state and done > 0:
            self.shuffle_order.resume(state["epoch"], state["epoch_order"], done)


class ResumableTrainData:
    """Mixin for a LightningDataModule: `train_loader(...)` builds its resumable train loader."""

    def train_loader(self, data, seed: int, batch_size: int, exclude: set[int] | None = None, **kwargs) -> ResumableLoader:
        order = EpochShuffle(len(data), seed, exclude)
        return ResumableLoader(data, batch_size=batch_size, sampler=order, shuffle_order=order,
                               batches_done=self._resumed_batches, **kwargs)

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
