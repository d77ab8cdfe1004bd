"""Train any algorithm: `python train.py algo=sft|... [data=...] [model=...] [key=value ...]`.

This file only composes: data, model, algorithm, callbacks, loggers and trainer all come from the
Hydra config (conf/); the algorithms live in src/lightning_modules/, one file each.
"""

from __future__ import annotations

import logging

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

import src  # noqa: F401  (sets PROJECT_ROOT for conf/paths)
from src.callbacks import HFExport, ValidateAtEnd
from src.utils import (
    LogHyperparameters,
    check_required,
    extras,
    finish_loggers,
    fixed_mmap_threshold,
    get_metric_value,
    has_split,
    hyperparameters,
    instantiate_callbacks,
    instantiate_loggers,
    quiet_known_noise,
    register_resolvers,
    resolve_ckpt_path,
)
from src.utils.loggers import FinishWandbInWorker, forks_workers, prepare_for_workers

log = logging.getLogger(__name__)
register_resolvers()
quiet_known_noise()
fixed_mmap_threshold()  # host memory that returns to the system (src/utils/run.py)


def build(cfg: DictConfig, extra_callbacks: list[L.Callback] = (), warm_start: bool = True) -> dict:
    """The run's objects from its config: data, the algorithm's module (after the warm start its config asks for,
    when `warm_start`), loggers, callbacks and the trainer. Shared by train.py and eval.py. Nothing here knows an
    algorithm: each checks its own config (`check_config`) and names its warm start (`warm_start._target_`)."""
    algo_cls = hydra.utils.get_class(cfg.algo._target_)
    if hasattr(algo_cls, "check_config"):  # what the algorithm needs (an engine installed, a file) fails at once
        algo_cls.check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    # Language models share one tokenizer between the data and the policy.
    shared = {}
    if "tokenizer" in cfg.model:
        shared["tokenizer"] = hydra.utils.instantiate(cfg.model.tokenizer)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, **shared)
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = instantiate_callbacks(
        cfg.get("callbacks"), has_logger=bool(loggers), progress_bar=cfg.trainer.get("enable_progress_bar", True)
    )
    ws = cfg.get("warm_start")  # a warm start the algorithm's config asks for (conf/warm_start/), run before it
    net, start = (hydra.utils.instantiate(ws)(cfg, shared.get("tokenizer")) if warm_start and ws and "_target_" in ws
                  else (None, {}))
    policy_options = {k: OmegaConf.to_object(cfg.model[k]) if OmegaConf.is_config(cfg.model[k]) else cfg.model[k]
                      for k in ("lora", "gradient_checkpointing") if k in cfg.model}  # LM models
    # plain Python containers in the module's hyper-parameters (sharded checkpoints load them weights-only)
    module: L.LightningModule = hydra.utils.instantiate(
        cfg.algo, net=net or hydra.utils.instantiate(cfg.model.net), **shared, **policy_options, _convert_="all")
    if loggers:
        callbacks.append(LogHyperparameters(hyperparameters(cfg, module), metrics=start))
    callbacks += [*extra_callbacks, ValidateAtEnd(), FinishWandbInWorker()]  # the final weights are always validated
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if forks_workers(trainer):  # ddp_fork: fit and test run in separate worker processes
        prepare_for_workers(trainer)
    return {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer, "callbacks": callbacks,
            "shared": shared}


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] = ()) -> tuple[dict, dict]:
    """Fit (and test) the configured algorithm; return (metrics, objects). `extra_callbacks` join the
    configured ones (for programmatic use: recorders, fault injection in tests)."""
    check_required(cfg)
    ckpt_path = resolve_ckpt_path(cfg)  # before any work: a wrong path fails at once
    if not cfg.get("train") and cfg.get("test") and not ckpt_path:
        raise ValueError("train=false evaluates a checkpoint: pass ckpt_path=<Lightning checkpoint> (or ckpt_path=last); "
                         "without one it would score a freshly initialised model (or use eval.py)")
    objects = build(cfg, extra_callbacks)
    datamodule, module, trainer = objects["datamodule"], objects["module"], objects["trainer"]
    callbacks, shared = objects.pop("callbacks"), objects.pop("shared")

    try:
        if cfg.get("train"):
            # weights-only (torch's safe unpickler): loading a checkpoint runs no code (`load_checkpoint`)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = dict(trainer.callback_metrics)
        if cfg.get("test") and not has_split(datamodule, "test"):
            log.warning("test=true, but the data has no test split (data.source.test is not set): no test/ metrics "
                        "(they would come from the val split, which chose the best checkpoint)")
        elif cfg.get("test"):  # the best checkpoint of this fit, or with train=false the one given
            if cfg.get("train"):
                ckpt = (trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else "") or None
            else:
                ckpt = ckpt_path
            trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
            metrics.update(trainer.callback_metrics)
    finally:
        runs = finish_loggers(trainer)

    if trainer.is_global_zero:
        out = cfg.paths.output_dir
        log.info("Run directory: %s", out)
        if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path:
            log.info("Best checkpoint: %s", trainer.checkpoint_callback.best_model_path)
        for cb in callbacks:
            if isinstance(cb, HFExport) and "tokenizer" in shared:  # a causal LM the next algorithm can start from
                log.info("Hugging Face export: %s  (use: model=hf model.pretrained=%s)", cb.dirpath, cb.dirpath)
            elif isinstance(cb, HFExport):
                log.info("Hugging Face export: %s", cb.dirpath)
        for r in runs:
            log.info("W&B run: %s", r)
    return metrics, objects


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    extras(cfg)
    metrics, _ = train(cfg)
    return get_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
