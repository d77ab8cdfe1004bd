"""In-memory tensor data (images, 2-D points): train/val/test tensors in `self.splits`, batched as
stacked tensors, the train order resumable mid-epoch (src/datamodules/sampler.py)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from genlight.datamodules.sampler import ResumableTrainData


def _stack(rows: list[tuple[torch.Tensor, ...]]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A batch: the stacked data, or (data, labels) when the split holds labels too."""
    cols = tuple(torch.stack(c) for c in zip(*rows))
    return cols[0] if len(cols) == 1 else cols


class TensorSplitsDataModule(ResumableTrainData, L.LightningDataModule):
    """Subclasses fill `self.splits` in `setup` and save `batch_size`, `eval_batch_size` and `seed`
    (optionally `num_workers`) as hyper-parameters."""

    def __init__(self):
        super().__init__()
        self.splits: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}  # data, or (data, labels)

    def has_split(self, split: str) -> bool:
        self.setup()
        return split in self.splits

    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        if not self.has_split(split):
            raise ValueError(f"this data has no {split} split (data.test_fraction=0?): eval.py eval.split=val scores "
                             "the val split, named val/")
        data = self.splits[split]
        ds = TensorDataset(*(data if isinstance(data, tuple) else (data,)))
        kw = dict(num_workers=hp.get("num_workers", 0), collate_fn=_stack)
        if train:
            return self.train_loader(ds, hp.seed, hp.batch_size, drop_last=len(ds) >= hp.batch_size, **kw)
        return DataLoader(ds, batch_size=hp.eval_batch_size, **kw)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
