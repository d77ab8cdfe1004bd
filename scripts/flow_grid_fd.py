"""FD of flow-matching digits models sampled on the two flow grids (algo.flow_grid=even | diffusers) at about 10 and
20 network evaluations (NFE), with Euler (NFE = steps) and Heun (NFE = 2 steps - 1: its last step is Euler).

    python train.py -m algo=ddpm algo.process.name=flow seed=0,1,2 logger=csv test=false \
        hydra.sweep.dir=logs/train/multiruns/flow_grid_fd
    python scripts/flow_grid_fd.py logs/train/multiruns/flow_grid_fd/{0,1,2}

Each run directory holds checkpoints/last.ckpt (EMA weights). Every model is sampled on both grids from the same
noise (one sampling seed, `--n` samples), and scored with the project's digits FD (val/fd: the shipped classifier's
features, against the 500 held-out digits). The table gives the median over the runs (training seeds) and their
min-max; the paired lines give, per run, diffusers' FD minus even's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from genlight.datamodules.images import digits_split  # noqa: E402
from genlight.diffusion.processes import FLOW_GRIDS  # noqa: E402
from genlight.lightning_modules.ddpm import DDPMModule  # noqa: E402
from genlight.metrics import sample_metric  # noqa: E402

SAMPLERS = (("euler", 10), ("euler", 20), ("heun", 5), ("heun", 10))  # NFE 10, 20, 9, 19


def nfe(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def fd_of(module: DDPMModule, grid: str, sampler: str, steps: int, n: int, seed: int, heldout: torch.Tensor) -> float:
    module.process.flow_grid = grid  # the checkpoint's process, sampled on the other grid: training is the same
    x = module.sample(n, sampler, steps, torch.Generator().manual_seed(seed))
    fd = sample_metric("fd", (1, 8, 8))
    fd.update(heldout, real=True)
    fd.update(x, real=False)
    return fd.compute().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (each with checkpoints/last.ckpt), one per training seed")
    ap.add_argument("--n", type=int, default=1000, help="samples per FD (val/fd uses 1000)")
    ap.add_argument("--seed", type=int, default=0, help="the sampling seed (the same noise for both grids)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}")
    heldout = digits_split()["val"]
    fds: dict[tuple[str, str, int], list[float]] = {}
    for run in args.runs:
        ckpt = Path(run) / "checkpoints" / "last.ckpt"
        module = DDPMModule.from_checkpoint(str(ckpt))
        hp = module.hparams
        if module.process.name != "flow":
            raise SystemExit(f"{ckpt}: process={module.process.name!r}, not a flow model (algo.process.name=flow)")
        print(f"{run}: seed {hp.seed}, shift {hp.shift}, target {hp.target}, trained on grid {hp.get('flow_grid', 'even')}")
        for sampler, steps in SAMPLERS:
            row = {grid: fd_of(module, grid, sampler, steps, args.n, args.seed, heldout) for grid in FLOW_GRIDS}
            for grid, value in row.items():
                fds.setdefault((grid, sampler, steps), []).append(value)
            print(f"  {sampler}-{steps} ({nfe(sampler, steps)} NFE): "
                  + ", ".join(f"{g} {v:.2f}" for g, v in row.items())
                  + f"; diffusers - even {row['diffusers'] - row['even']:+.2f}", flush=True)

    print(f"\nFD, median (min-max) over {len(args.runs)} training seeds; {args.n} samples, sampling seed {args.seed}")
    print("| sampler | NFE | " + " | ".join(f"flow_grid={g}" for g in FLOW_GRIDS) + " |")
    print("|---|---|" + "---|" * len(FLOW_GRIDS))
    for sampler, steps in SAMPLERS:
        cells = []
        for grid in FLOW_GRIDS:
            v = fds[(grid, sampler, steps)]
            cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
        print(f"| {sampler} | {nfe(sampler, steps)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
