"""The feature network for the digits Frechet distance: a small CNN trained on the train split of
scikit-learn's digits (scripts/train_digits_classifier.py; the weights ship in src/assets/). Its
64-d penultimate layer plays Inception's role in FID; `sample_metric("fd")` hands it to torchmetrics'
`FrechetInceptionDistance(feature=...)`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier.pt"


class DigitsClassifier(nn.Module):
    num_features = 64  # read by torchmetrics' FID

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 4 x 4
            nn.Flatten(), nn.Linear(512, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitsFeatures(nn.Module):
    """(N, 1, 8, 8) images in [-1, 1] -> (N, 64) features; frozen."""

    num_features = DigitsClassifier.num_features

    def __init__(self, path: str | Path = WEIGHTS):
        super().__init__()
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: digits classifier weights missing; run scripts/train_digits_classifier.py")
        self.net = DigitsClassifier()
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # always in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (1, 8, 8):
            raise ValueError(f"the digits FD features need (N, 1, 8, 8) images, got {tuple(x.shape)}")
        return self.net.features(x.float())
