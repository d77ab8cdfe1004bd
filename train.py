"""Train any algorithm: `python train.py algo=sft|... [data=...] [model=...] [key=value ...]`.

This file only composes: data, model, algorithm, callbacks, loggers and trainer all come from the
Hydra config (conf/); the run is `genlight.pipeline.train`, the algorithms live in src/lightning_modules/, one file each.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from genlight.pipeline import build, train  # noqa: F401  (build: for programmatic use, as train)
from genlight.utils import extras, get_metric_value


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    extras(cfg)
    metrics, _ = train(cfg)
    return get_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
