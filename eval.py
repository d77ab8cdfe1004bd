"""Evaluate a trained model: `python eval.py ckpt_path=<Lightning checkpoint> [algo=... data=... model=...]`, or an
HF export with `python eval.py model=hf model.pretrained=<dir> algo=...`, on the test split (`eval.split=val`: the
val split). Logged like training (W&B / CSV) and printed as a table.

This file only composes, as train.py does: the run is `genlight.pipeline.evaluate` (the objects come from
`genlight.pipeline.build`); the metrics are each algorithm's own test / val metrics. Installed: `genlight-eval`.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
from genlight.cli import evaluate  # noqa: E402

if __name__ == "__main__":
    evaluate()
