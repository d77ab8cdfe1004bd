"""Train the digits CNN whose features define the FD metric, on the train split only, and save its
weights to src/assets/digits_classifier.pt. Deterministic; about 10 s on 2 CPU cores.

    python scripts/train_digits_classifier.py [--out PATH] [--epochs N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from genlight.datamodules.images import digits_split
from genlight.models.digits_classifier import WEIGHTS, DigitsClassifier


def train(epochs: int = 60, seed: int = 0) -> tuple[DigitsClassifier, float]:
    torch.manual_seed(seed)
    d = digits_split()
    x, y = d["train"], d["train_labels"]
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            # light augmentation: one-pixel shifts
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(d["val"]).argmax(1) == d["val_labels"]).float().mean().item()
    return net, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    net, acc = train(args.epochs)
    torch.save(net.state_dict(), args.out)
    print(f"held-out accuracy {acc:.4f}; saved {args.out}")


if __name__ == "__main__":
    main()
