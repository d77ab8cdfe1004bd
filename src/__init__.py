"""genlight: post-training and diffusion algorithms as Lightning modules, configured by Hydra."""

import os
from pathlib import Path

# `conf/paths` resolves `${oc.env:PROJECT_ROOT}`; set it once, for train.py, tests and notebooks alike.
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
