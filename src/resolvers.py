"""The OmegaConf resolvers the shipped configs use (conf/paths, conf/hydra, conf/logger/wandb.yaml). Registered by
`genlight.cli` and `genlight.pipeline` at import, before Hydra composes; a script of your own with `@hydra.main` over
`pkg://genlight.conf` calls `register_resolvers()` first. Imports OmegaConf only (W&B, Hydra and Lightning lazily)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is set (env or `wandb login`) or WANDB_MODE=online."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return netrc.netrc().authenticators(host) is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def _multirun_config():
    """Hydra's runtime config when this job is part of a multirun (-m), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if hc.mode == RunMode.MULTIRUN else None


def sweep_group() -> str | None:
    """W&B `group` of a multirun's jobs: the sweep directory's name (one group per sweep)."""
    hc = _multirun_config()
    return f"{hc.job.name}-{Path(hc.sweep.dir).name}" if hc else None


def sweep_name() -> str | None:
    """W&B run name of a multirun job: its own overrides (e.g. `algo.beta=0.1,algo=dpo`)."""
    hc = _multirun_config()
    return (hc.job.override_dirname or f"job{hc.job.num}") if hc else None


def writable_dir(path: str, key: str = "paths.log_dir") -> str:
    """`path` itself, after checking that it can be written (it, or the nearest folder above it that exists): runs
    write there, and a folder that cannot be written stops the run before any work, naming it and the key."""
    p = Path(path).absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not existing.is_dir() else "cannot be written"
        raise PermissionError(
            f"{key}={path}: runs are written there, and {existing} {what}. Run from a directory you can write (runs go "
            f"to <working directory>/logs), or set {key}=<a writable directory>")
    return path


def register_resolvers() -> None:
    for name, fn in (("wandb_offline", wandb_offline), ("sweep_group", sweep_group), ("sweep_name", sweep_name),
                     ("writable_dir", writable_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
