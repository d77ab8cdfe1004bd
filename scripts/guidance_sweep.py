"""Classifier-free guidance on digits: FD and class accuracy of a class-conditional checkpoint at several
guidance scales (the quality/diversity trade-off), and a grid with one row per class.

    python scripts/guidance_sweep.py CKPT [--scales 0,1,3] [--n 1000] [--seeds 3] [--grid docs/cfg_digits.png]

Every class in turn is asked for (n/10 samples each), DDIM-50; FD against the 500 held-out digits in the shipped
classifier's features, and class accuracy = the share of samples that classifier assigns to the class asked for;
mean ± sd over sampling seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.datamodules.images import digits_split  # noqa: E402
from src.lightning_modules.ddpm import DDPMModule, class_accuracy  # noqa: E402
from src.metrics import sample_metric  # noqa: E402
from src.utils.images import to_pil_grid  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--scales", default="0,1,3")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--grid", default=None, help="PNG: one row per class, 8 samples for each scale side by side")
    args = ap.parse_args()
    module = DDPMModule.from_checkpoint(args.ckpt)
    if module.null_class is None:
        sys.exit(f"{args.ckpt}: not a class-conditional model (train with algo.class_conditional=true)")
    heldout = digits_split()["val"]
    labels = torch.arange(args.n) % module.null_class
    rows = []
    for w in (float(s) for s in args.scales.split(",")):
        fds, accs = [], []
        for seed in range(args.seeds):
            x = module.sample(args.n, "ddim", 50, torch.Generator().manual_seed(seed), labels=labels, guidance_scale=w)
            fd = sample_metric("fd", (1, 8, 8))
            fd.update(heldout, real=True)
            fd.update(x, real=False)
            fds.append(fd.compute().item())
            accs.append(class_accuracy(x, labels).item())
        rows.append((w, fds, accs))
        print(f"w = {w:g}: FD {statistics.mean(fds):.2f} ± {statistics.stdev(fds) if len(fds) > 1 else 0:.2f}, "
              f"class accuracy {statistics.mean(accs):.3f} ± {statistics.stdev(accs) if len(accs) > 1 else 0:.3f}",
              flush=True)
    if args.grid:
        k = module.null_class
        per_class = torch.arange(k).repeat_interleave(8)  # 8 samples of each class, one class per row
        grids = [module.sample(len(per_class), "ddim", 50, torch.Generator().manual_seed(0), labels=per_class,
                               guidance_scale=w).view(k, 8, 1, 8, 8) for w, _, _ in rows]
        side_by_side = torch.cat(grids, dim=1).flatten(0, 1)  # rows: classes; columns: 8 per scale
        to_pil_grid(side_by_side, cols=8 * len(grids)).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
