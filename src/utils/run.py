"""Helpers for train.py, in the manner of lightning-hydra-template's `src/utils`."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from genlight.resolvers import register_resolvers  # noqa: F401  (re-exported: genlight.utils.register_resolvers)

log = logging.getLogger(__name__)


class DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def fixed_mmap_threshold(nbytes: int = 4 << 20) -> bool:
    """glibc: serve every allocation of `nbytes` or more with its own mmap, returned to the system when freed.

    glibc's default threshold moves up to the size of the largest block freed (up to 32 MiB), after which blocks of
    a few MiB (a decoding step's logits at a 150k vocabulary) come from the heap, which then only grows: measured,
    one RLVR step's peak grew by 25% from 16 to 256 samples at a fixed micro-batch, and by 1% with the threshold
    fixed. The environment's MALLOC_MMAP_THRESHOLD_ wins when set; elsewhere than glibc (macOS) nothing is done.
    Returns whether the threshold was set."""
    import ctypes
    import ctypes.util

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD; fixing it also stops its adjustment
    except (OSError, AttributeError):
        return False


def quiet_known_noise() -> None:
    """Silence what every run would print and no user can act on, each by its message and origin
    (never all warnings): Lightning's own use of a torch API that torch deprecates, Lightning's
    advertisement for its cloud logger, and DataLoader worker advice for in-memory data. (Lightning's warning of
    modules in eval mode at the start of training stays on: `LMModule.on_fit_start` keeps the frozen copies out of
    it, so it names a module that would train in eval mode.)"""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
                            module=r"lightning\.pytorch\.utilities\._pytree")
    warnings.filterwarnings("ignore", message=r".*does not have many workers", module=r"lightning\.pytorch")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropMessage) for f in rank_zero.filters):
        rank_zero.addFilter(DropMessage("💡 Tip: For seamless cloud logging"))


def extras(cfg: DictConfig) -> None:
    """Optional niceties before the run: silence known-noise warnings, print the config tree."""
    ex = cfg.get("extras") or {}
    if ex.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if ex.get("print_config"):
        import rich.syntax
        import rich.tree

        tree = rich.tree.Tree("CONFIG", guide_style="dim")
        for key in ex.get("print_order", []) + [k for k in cfg if k not in ex.get("print_order", [])]:
            if key == "hydra" or key not in cfg:
                continue
            node = cfg[key]
            text = OmegaConf.to_yaml(node, resolve=False) if isinstance(node, DictConfig) else str(node)
            tree.add(key, guide_style="dim").add(rich.syntax.Syntax(text, "yaml"))
        rich.print(tree)


def missing_keys(cfg: DictConfig) -> list[str]:
    """The keys whose value is mandatory (`???`) and not given, sorted (Hydra's own settings aside)."""

    def walk(node, prefix: str):
        for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            full = f"{prefix}{key}"
            if full == "hydra":
                continue
            if OmegaConf.is_missing(node, key):
                yield full
            elif not OmegaConf.is_interpolation(node, key) and OmegaConf.is_config(child := node[key]):
                yield from walk(child, f"{full}.")

    return sorted(walk(cfg, ""))


def check_required(cfg: DictConfig) -> None:
    """Fail before any work if a mandatory value (`???`) was not given, naming its key."""
    missing = missing_keys(cfg)
    if missing:
        raise ValueError(
            f"missing mandatory config value(s): {', '.join(missing)}; set them on the command line, "
            f"e.g. `python train.py ... {missing[0]}=...`"
        )


def instantiate_callbacks(cfg: DictConfig | None, has_logger: bool = True, progress_bar: bool = True) -> list[L.Callback]:
    callbacks = [hydra.utils.instantiate(c) for c in (cfg or {}).values() if isinstance(c, DictConfig) and "_target_" in c]
    if not has_logger:  # with logger=none, a learning-rate monitor has nowhere to write (Lightning raises)
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    if not progress_bar:  # trainer.enable_progress_bar=false wins over the configured bar (Lightning raises)
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    return callbacks


def instantiate_loggers(cfg: DictConfig | None) -> list:
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer a module is attached to, or None (a module used on its own: sample.py, tests)."""
    try:
        return module.trainer
    except RuntimeError:  # Lightning: "... is not attached to a `Trainer`"
        return None


def hyperparameters(cfg: DictConfig, module: L.LightningModule) -> dict:
    """The full resolved config (less Hydra's own node) plus parameter counts. An `algo` key left null for the
    module to choose (`algo.loss_agg: null`: the loss type's own) holds the value the module chose (its `hparams`),
    so that runs with different effective settings differ in hparams.yaml and the W&B config."""
    hp = OmegaConf.to_container(cfg, resolve=True)
    hp.pop("hydra", None)
    algo, chosen = hp.get("algo"), getattr(module, "hparams", {})
    if isinstance(algo, dict):
        algo.update({k: chosen[k] for k, v in algo.items() if v is None and chosen.get(k) is not None})
    hp["model/params/total"] = sum(p.numel() for p in module.parameters())
    hp["model/params/trainable"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return hp


class LogHyperparameters(L.Callback):
    """Sends `hyperparameters(...)` (and metrics known before the run) to every logger when fit (or a test-only run) starts: inside the worker
    processes, so that with fork-launched strategies (`ddp_fork`) no logger is opened in the parent
    (a W&B run opened before the fork is unusable in the children)."""

    def __init__(self, hparams: dict, metrics: dict | None = None):
        self.hparams, self.metrics, self.done = hparams, metrics or {}, False

    def _log(self, trainer: L.Trainer) -> None:
        if not self.done:
            for logger in trainer.loggers:
                logger.log_hyperparams(self.hparams)
                if self.metrics and not trainer.testing:  # e.g. the warm start's quality, at step 0
                    logger.log_metrics(self.metrics, step=0)
            self.done = True

    def on_fit_start(self, trainer, pl_module) -> None:
        self._log(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        self._log(trainer)


def finish_loggers(trainer: L.Trainer | None) -> list[str]:
    """Close W&B (Lightning never calls `wandb.finish()`); return where each W&B run was written."""
    where = []
    wandb = sys.modules.get("wandb")  # a W&B run exists only where wandb was imported: never import it here
    if wandb is not None and wandb.run is not None:
        run_dir, offline, url = Path(wandb.run.dir).parent, wandb.run.offline, wandb.run.url
        wandb.finish()
        if offline:
            where.append(f"{run_dir} (offline: view with `wandb leet {run_dir}`, upload with `wandb sync {run_dir}`)")
        else:
            where.append(f"{url} (local files: {run_dir})")
    return where


def has_split(datamodule, split: str) -> bool:
    """Whether the data module has this split (one without `has_split` has all three)."""
    return datamodule.has_split(split) if hasattr(datamodule, "has_split") else True


def get_metric_value(metrics: dict, name: str | None) -> float | None:
    """The value sweepers optimise (`optimized_metric`); a clear error if it was never logged."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(
            f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}. "
            "Set optimized_metric to one of these."
        )
    value = metrics[name]
    return float(value.item() if hasattr(value, "item") else value)


def load_checkpoint(path: str | Path, key: str = "ckpt_path", map_location: str = "cpu") -> dict:
    """A Lightning checkpoint file, loaded with torch's weights-only unpickler: tensors and plain containers, never
    code (a shared checkpoint cannot run anything when loaded). One that holds other Python objects is refused,
    naming the file; ours never do (hyper-parameters are plain containers)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{key}={path}: refused: the file holds Python objects that weights-only loading does not allow, which "
            f"could run code when unpickled ({reason}). Checkpoints written by this project never do; load a file "
            "you trust elsewhere with torch.load(..., weights_only=False) if you must.") from None


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path`: a checkpoint file, or `last`: the newest `last.ckpt` among this task's earlier runs
    (`<log_dir>/<task_name>/{runs,multiruns}/...`). A path that does not exist is an error, not a fresh start."""
    path = cfg.get("ckpt_path")
    if not path:
        return None
    if str(path) == "last":
        base = Path(cfg.paths.log_dir) / cfg.get("task_name", "train")
        found = [p for p in base.glob("**/checkpoints/last.ckpt") if Path(cfg.paths.output_dir) not in p.parents]
        if not found:
            raise FileNotFoundError(f"ckpt_path=last: no checkpoints/last.ckpt under {base}")
        latest = max(found, key=lambda p: p.stat().st_mtime)
        log.info("ckpt_path=last: resuming %s", latest)
        return str(latest)
    if not Path(path).exists():  # a file, or a sharded (FSDP2) checkpoint directory
        raise FileNotFoundError(f"ckpt_path={path}: no such checkpoint file")
    if Path(path).is_file():
        load_checkpoint(path)  # before any work: a file that would need unsafe unpickling stops here
    return str(path)
