"""Train any algorithm: `python train.py algo=sft|... [data=...] [model=...] [key=value ...]`.

This file only composes: data, model, algorithm, callbacks, loggers and trainer all come from the Hydra config
(conf/); the run is `genlight.pipeline.train`, the algorithms live in src/lightning_modules/, one file each. An
installed genlight has the same entry point as `genlight-train` (`genlight.cli.train`); here runs go under the
checkout's logs/, from whichever directory it is started.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
from genlight.cli import train  # noqa: E402

if __name__ == "__main__":
    train()
