"""Evaluate a trained model: `python eval.py ckpt_path=<Lightning checkpoint> [algo=... data=... model=...]`, or an
HF export with `python eval.py model=hf model.pretrained=<dir> algo=...`, on the test split (`eval.split=val`: the
val split). Logged like training (W&B / CSV) and printed as a table.

This file only composes, as train.py does (the objects come from `train.build`); the metrics are each algorithm's
own test / val metrics.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import src  # noqa: F401  (sets PROJECT_ROOT for conf/paths)
from src.utils import (
    check_required,
    extras,
    finish_loggers,
    fixed_mmap_threshold,
    has_split,
    resolve_ckpt_path,
)
from train import build

fixed_mmap_threshold()


def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Score the checkpoint (or HF export) on the configured split; return (metrics, objects)."""
    check_required(cfg)
    ckpt_path = resolve_ckpt_path(cfg)  # weights-only: loading it runs no code
    split = cfg.get("eval", {}).get("split", "test")
    if split not in ("test", "val"):
        raise ValueError(f"eval.split={split!r}: must be 'test' or 'val'")
    if not ckpt_path and "pretrained" not in cfg.model:
        raise ValueError("eval.py scores a trained model: pass ckpt_path=<Lightning checkpoint> or model=hf "
                         "model.pretrained=<HF export>; without either it would score a freshly initialised model")
    ev = cfg.get("eval", {})
    if ev.get("num_samples") and "tokenizer" not in cfg.model:
        raise ValueError("eval.num_samples: test-time compute samples completions: it is for language models (SFT, "
                         "DPO, RLVR checkpoints)")
    objects = build(cfg, warm_start=False)
    trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
    if not has_split(datamodule, split):
        raise ValueError(f"eval.split={split}: the data has no {split} split (data.source.{split} is not set); pass "
                         f"one (data.source.{split}=FILE), or eval.split=val: metrics named val/, from the split the "
                         "best checkpoint was chosen on")
    run = trainer.test if split == "test" else trainer.validate
    try:
        run(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
        if ev.get("num_samples"):
            metrics |= test_time_compute(cfg, trainer, module, datamodule, split)
    finally:
        finish_loggers(trainer)
    if trainer.is_global_zero:
        print_table(metrics, f"{split} split: {ckpt_path or cfg.model.pretrained}")
    return metrics, objects


def test_time_compute(cfg: DictConfig, trainer, module, datamodule, split: str) -> dict:
    """n samples per prompt of the split: pass@k, majority@k, best-of-k for k = 1 .. n (src/test_time.py), logged to
    the run's loggers and plotted (W&B and <run>/test_time_compute.png; the curves in <run>/test_time_compute.json)."""
    import json
    from pathlib import Path

    from lightning.pytorch.loggers import WandbLogger

    from src.test_time import curves_at_k, plot_curves

    ev = cfg.eval
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    reward_model = None
    if ev.scorer == "reward_model" and ev.get("reward_model"):
        from src.rewards import RewardModel

        reward_model = RewardModel(ev.reward_model).to(module.device)
    verifier = hydra.utils.instantiate(ev.verifier) if ev.get("verifier") else None  # None: the checkpoint's own
    curves = curves_at_k(module, loader, ev.num_samples, ev.temperature, verifier,
                         ev.scorer, max_batch_size=ev.max_batch_size, seed=cfg.seed, reward_model=reward_model)
    metrics = {f"{split}/ttc/{name}@{k}": v for name, vs in (("pass", curves["pass"]), ("majority", curves["majority"]),
                                                               ("best_of", curves["best"]))
               for k, v in enumerate(vs, 1)}
    png = Path(cfg.paths.output_dir) / "test_time_compute.png"
    plot_curves(curves, f"{split}: {ev.num_samples} samples per prompt, temperature {ev.temperature}", png)
    (png.parent / "test_time_compute.json").write_text(json.dumps({"num_samples": ev.num_samples, "temperature":
                                                                   ev.temperature, "scorer": ev.scorer, **curves}))
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()  # the test loop has finalized the loggers: CSV writes these rows only when asked
        if isinstance(logger, WandbLogger):
            logger.log_image(key=f"{split}/ttc/curves", images=[str(png)], step=trainer.global_step)
    return metrics


def print_table(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in sorted(metrics):
        table.add_row(k, f"{metrics[k]:.4f}")
    Console().print(table)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
