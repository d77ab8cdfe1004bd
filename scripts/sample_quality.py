"""Sample quality of a digits checkpoint: FD (DDIM-50, and DDPM-1000 with --ddpm) against the 500 held-out
digits in the shipped classifier's features, mean ± sd over sampling seeds. For a class-conditional model,
at each guidance scale (the quality/diversity trade-off) with class accuracy (the share of samples that
classifier assigns to the class asked for; every class in turn, n/10 each), and a grid with one row per class.

    python scripts/sample_quality.py CKPT [--n 1000] [--seeds 3] [--ddpm]
    python scripts/sample_quality.py CKPT --scales 0,1,3 --grid docs/cfg_digits.png     # conditional
    python scripts/sample_quality.py CKPT --samplers ddim:10,dpmpp:10,ddpm:1000         # few-step samplers (vp)
    python scripts/sample_quality.py CKPT --samplers euler:10,heun:5                    # a flow checkpoint
    python scripts/sample_quality.py CKPT --points moons --samplers euler:10            # 2-D: energy distance

Each line reports the network evaluations (NFE) of the sampler: its steps, and 2 steps - 1 for heun.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlight.datamodules.images import digits_split  # noqa: E402
from genlight.lightning_modules.ddpm import DDPMModule  # noqa: E402
from genlight.metrics import (
    class_accuracy,  # noqa: E402
    sample_metric,  # noqa: E402
)
from genlight.utils.images import to_pil_grid  # noqa: E402


def _mean_sd(v: list[float], digits: int = 2) -> str:
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v) if len(v) > 1 else 0:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--scales", default="0,1,3")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ddpm", action="store_true", help="also DDPM-1000 (slow on CPU)")
    ap.add_argument("--grid", default=None, help="PNG: one row per class, 8 samples for each scale side by side")
    ap.add_argument("--samplers", default=None, help="sampler:steps,... (default ddim:50, + ddpm:1000 with --ddpm)")
    ap.add_argument("--points", default=None, help="a 2-D model's data name: energy distance to 1000 fresh points")
    args = ap.parse_args()
    module = DDPMModule.from_checkpoint(args.ckpt)
    conditional = module.null_class is not None
    if args.points:
        from genlight.datamodules.toy2d import toy2d

        heldout, metric, shape, name = toy2d(args.points, 1000, seed=12345), "energy_distance", (2,), "energy distance"
    else:
        heldout, metric, shape, name = digits_split()["val"], "fd", (1, 8, 8), "FD"
    labels = torch.arange(args.n) % module.null_class if conditional else None
    if args.samplers:
        samplers = [(sp, int(st)) for sp, _, st in (item.partition(":") for item in args.samplers.split(","))]
    else:
        samplers = [("ddim", 50)] + ([("ddpm", 1000)] if args.ddpm else [])
    rows = []
    for w in (float(s) for s in args.scales.split(",")) if conditional else [0.0]:
        for sampler, steps in samplers:
            fds, accs = [], []
            for seed in range(args.seeds):
                x = module.sample(args.n, sampler, steps, torch.Generator().manual_seed(seed), labels=labels,
                                  guidance_scale=w if conditional else None)
                fd = sample_metric(metric, shape)
                fd.update(heldout, real=True)
                fd.update(x, real=False)
                fds.append(fd.compute().item())
                if conditional:
                    accs.append(class_accuracy(x, labels).item())
            rows.append((w, fds, accs))
            nfe = 2 * steps - 1 if sampler == "heun" else steps
            digits = 4 if args.points else 2
            line = (f"{sampler.upper()}-{steps} ({nfe} NFE)" + (f", w = {w:g}" if conditional else "")
                    + f": {name} {_mean_sd(fds, digits)}")
            print(line + (f", class accuracy {_mean_sd(accs, 3)}" if accs else ""), flush=True)
    if args.grid and conditional:
        k = module.null_class
        per_class = torch.arange(k).repeat_interleave(8)  # 8 samples of each class, one class per row
        grids = [module.sample(len(per_class), "ddim", 50, torch.Generator().manual_seed(0), labels=per_class,
                               guidance_scale=w).view(k, 8, 1, 8, 8) for w in dict.fromkeys(w for w, _, _ in rows)]
        side_by_side = torch.cat(grids, dim=1).flatten(0, 1)  # rows: classes; columns: 8 per scale
        to_pil_grid(side_by_side, cols=8 * len(grids)).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
