"""Draw samples from a trained diffusion checkpoint and write a PNG grid (or 2-D scatter plot):

    python sample.py ckpt=logs/train/runs/<run>/checkpoints/last.ckpt sampler=ddim steps=50 n=64
    python sample.py ckpt=... label=3 guidance=2.0     # a class-conditional model: one class, guided

The samples themselves are saved beside the PNG as a tensor (.pt), in the data's scale ([-1, 1] images). The run is
`genlight.pipeline.sample`; installed: `genlight-sample`.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
from genlight.cli import sample  # noqa: E402

if __name__ == "__main__":
    sample()
