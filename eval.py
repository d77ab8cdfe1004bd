"""Evaluate a trained model: `python eval.py ckpt_path=<Lightning checkpoint> [algo=... data=... model=...]`, or an
HF export with `python eval.py model=hf model.pretrained=<dir> algo=...`, on the test split (`eval.split=val`: the
val split). Logged like training (W&B / CSV) and printed as a table.

This file only composes, as train.py does: the run is `genlight.pipeline.evaluate` (the objects come from
`genlight.pipeline.build`); the metrics are each algorithm's own test / val metrics.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from genlight.pipeline import evaluate
from genlight.utils import extras


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
