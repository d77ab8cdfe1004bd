"""2-D point clouds for diffusion: moons, swiss_roll (scikit-learn's generators) and gaussians8.
Train, val and test are independent draws (different seeds); points are scaled to roughly unit spread."""

from __future__ import annotations

import math

import numpy as np
import torch

from genlight.datamodules.tensors import TensorSplitsDataModule


def _moons(n, rng):
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.05, random_state=rng)
    return (x - [0.5, 0.25]) / [0.87, 0.5]


def _swiss_roll(n, rng):
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=0.25, random_state=rng)
    return x[:, [0, 2]] / 7.5


def _gaussians8(n, rng):
    angles = 2 * math.pi * rng.randint(0, 8, n) / 8
    centers = np.stack([np.cos(angles), np.sin(angles)], 1) * 1.5
    return centers + 0.1 * rng.standard_normal((n, 2))


DATASETS = {"moons": _moons, "swiss_roll": _swiss_roll, "gaussians8": _gaussians8}


def toy2d(name: str, n: int, seed: int) -> torch.Tensor:
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r}: no such 2-D dataset; choose one of {sorted(DATASETS)}")
    return torch.tensor(DATASETS[name](n, np.random.RandomState(seed)), dtype=torch.float32)


class Toy2DDataModule(TensorSplitsDataModule):
    def __init__(
        self,
        name: str = "moons",
        n_train: int = 20000,
        n_val: int = 2000,
        n_test: int = 2000,
        metric: str = "energy_distance",
        batch_size: int = 256,
        eval_batch_size: int = 2000,
        data_seed: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if name not in DATASETS:  # fail at construction, before any training
            raise ValueError(f"data.name={name!r}: no such 2-D dataset; choose one of {sorted(DATASETS)}")
        self.save_hyperparameters(logger=False)
        self.metric = metric

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if not self.splits:
            self.splits = {s: toy2d(hp.name, n, hp.data_seed + i) for i, (s, n) in
                           enumerate((("train", hp.n_train), ("val", hp.n_val), ("test", hp.n_test)))}
