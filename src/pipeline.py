"""The run itself, for the entry points (`genlight.cli`: genlight-train / -eval / -sample, the checkout's train.py,
eval.py, sample.py; lightning-hydra-template's `src/train.py`, `src/eval.py`): `build` makes a run's objects from its
config (data, the algorithm's module after its warm start, loggers, callbacks, trainer), `train` fits and tests,
`evaluate` scores a checkpoint or an HF export, `sample` draws from a diffusion checkpoint. Nothing here
knows an algorithm: each checks its own config (`check_config`) and names its warm start (`warm_start._target_`)."""

from __future__ import annotations

import logging

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from genlight.callbacks import HFExport, ValidateAtEnd
from genlight.utils import (
    LogHyperparameters,
    check_required,
    finish_loggers,
    fixed_mmap_threshold,
    has_split,
    hyperparameters,
    instantiate_callbacks,
    instantiate_loggers,
    quiet_known_noise,
    register_resolvers,
    resolve_ckpt_path,
)
from genlight.utils.loggers import FinishWandbInWorker, forks_workers, prepare_for_workers

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
    if ev.get("num_samples") and getattr(module, "env", None) is not None:
        raise ValueError("eval.num_samples: test-time compute samples single completions, and this is a multi-turn "
                         "(env=) run whose answers come from episodes; its pass@k over episodes is what eval.py "
                         "reports without eval.num_samples (algo.val_num_samples episodes per prompt)")
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

    from genlight.test_time import curves_at_k, plot_curves

    ev = cfg.eval
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    reward_model = None
    if ev.scorer == "reward_model" and ev.get("reward_model"):
        from genlight.rewards import RewardModel

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


def sample(cfg: DictConfig):
    """Samples of a trained diffusion checkpoint (`ckpt`) as a PNG grid or a 2-D scatter plot at `out`, and as a
    tensor (.pt, in the data's scale: [-1, 1] images) beside it; returns the PNG's path."""
    import time
    from pathlib import Path

    import torch

    from genlight.lightning_modules.ddpm import DDPMModule
    from genlight.utils.images import picture

    if not Path(cfg.ckpt).is_file():
        raise FileNotFoundError(f"ckpt={cfg.ckpt}: no such file")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module = DDPMModule.from_checkpoint(cfg.ckpt).to(device)
    module.hparams.sample_batch_size = cfg.batch_size
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    x = module.sample(cfg.n, sampler=cfg.sampler, steps=cfg.steps, generator=g, labels=cfg.get("label"),
                      guidance_scale=cfg.get("guidance"))
    dt = time.perf_counter() - t0
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture(x, f"{cfg.sampler}-{cfg.steps or module.process.T}, {Path(cfg.ckpt).name}").save(out)
    torch.save(x.cpu(), out.with_suffix(".pt"))
    log.info("%d samples (%s, %s steps) in %.1f s (%.1f ms each): %s", cfg.n, cfg.sampler,
             cfg.steps or module.process.T, dt, 1000 * dt / cfg.n, out)
    return out
