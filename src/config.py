"""The configs shipped in the package (`pkg://genlight.conf`, the checkout's conf/) from Python, for a project of
your own:

    cfg = genlight.compose(["algo=dpo", "trainer.max_steps=100"])    # what `genlight-train algo=dpo ...` composes
    genlight.pipeline.train(cfg)                                      # and runs (a script, a notebook)

    trainer = L.Trainer(**genlight.trainer_defaults(module, max_steps=100))   # a plain Trainer, the recipe's settings

`trainer_defaults` is what train.py gives the Trainer beyond the module: the algorithm's trainer settings (gradient
clipping, validation interval, steps, a validation before training where the recipe has one) and its callbacks
(validation of the final weights, the finite-loss guard, EMA for diffusion, the ScaleRL fit, TR-DPO's refresh), all
read from the same YAML files train.py composes: one source of truth.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from genlight.resolvers import register_resolvers

CONFIG_MODULE = "genlight.conf"
# the callbacks of a train.py run that belong to its outputs and its logging, not to the algorithm: trainer_defaults
# leaves them to the user (Lightning's own checkpointing and progress bar apply)
RUN_CALLBACKS = ("model_checkpoint", "lr_monitor", "rich_progress_bar", "hf_export", "wandb_axes")


def _compose(name: str, overrides: list[str]) -> DictConfig:
    """The shipped config `name` with `overrides` (Hydra's compose API), leaving any Hydra state the caller has (an
    `@hydra.main` app of the user's) as it was."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    register_resolvers()
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return hydra_compose(name, overrides=list(overrides), return_hydra_config=True)
    finally:
        restore_gh_from_backup(backup)


def compose(overrides: list[str] = (), name: str = "train", output_dir: str | Path | None = None) -> DictConfig:
    """The config `genlight-train` (`name="eval"`: genlight-eval) composes from these command-line `overrides`, ready
    for `genlight.pipeline.train(cfg)` / `evaluate(cfg)` outside `@hydra.main`: its run directory is `output_dir`
    (default: a new `<paths.log_dir>/<task_name>/runs/<time>/`, `paths.log_dir` being `<working directory>/logs`).
    Sets Hydra's runtime config (the `${hydra:...}` interpolations read it): for scripts and notebooks, not inside
    another Hydra app (there, compose `pkg://genlight.conf` in your own config: docs/plugin.md)."""
    from hydra.core.hydra_config import HydraConfig

    cfg = _compose(name, list(overrides))
    if output_dir is None:
        log_dir = Path(OmegaConf.select(cfg, "paths.log_dir", default=None) or Path.cwd() / "logs")
        output_dir = log_dir / str(cfg.get("task_name", name)) / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    output_dir = Path(output_dir).absolute()
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    return cfg


def algorithm_name(module) -> str:
    """The conf/algo/ name of a module (an instance or a class): the YAML whose `_target_` is its class (dpo, not
    tr_dpo: the file named after the module's own)."""
    from importlib.resources import files

    cls = module if isinstance(module, type) else type(module)
    target = f"{cls.__module__}.{cls.__qualname__}"
    found = sorted(p.name[:-5] for p in files(CONFIG_MODULE).joinpath("algo").iterdir()
                   if p.name.endswith(".yaml") and f"_target_: {target}\n" in p.read_text())
    if not found:
        raise ValueError(f"{target}: no conf/algo/*.yaml trains it (trainer_defaults takes an algorithm of genlight's, "
                         "or its name: trainer_defaults('dpo'))")
    return min(found, key=len)  # dpo before tr_dpo


def algorithm_config(algo: str | object) -> DictConfig:
    """The composed config of algorithm `algo` (a conf/algo/ name, a module or its class) with the embedded defaults
    (data, model), as `genlight-train algo=<name>` composes it; not resolved (paths need a Hydra run)."""
    name = algo if isinstance(algo, str) else algorithm_name(algo)
    return _compose("train", [f"algo={name}", "logger=none"])


def trainer_defaults(algo: str | object, callbacks: list = (), **trainer_kwargs) -> dict:
    """Keyword arguments for `lightning.Trainer` that train the recipe train.py trains for `algo` (a conf/algo/ name,
    a module or its class): its `trainer:` settings (conf/trainer/default.yaml and the algorithm's YAML:
    `gradient_clip_val`, `max_steps`, `val_check_interval`, `num_sanity_val_steps`, ...) and its algorithm callbacks
    (`ValidateAtEnd`, `FiniteLossGuard`, and the algorithm's own: EMA, the ScaleRL fit, TR-DPO's refresh), then
    `callbacks` and `trainer_kwargs` of your own (which win: `max_steps=100`). Without the run's outputs: no
    checkpoint directory, HF export or W&B (Lightning's defaults; add your own loggers and checkpoints)."""
    import hydra

    from genlight.callbacks import ValidateAtEnd

    cfg = algorithm_config(algo)
    root = trainer_kwargs.get("default_root_dir") or str(Path.cwd())
    with open_dict(cfg):  # the interpolations that would need a Hydra run: the run's directory
        cfg.paths.output_dir = root
    settings = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                if k not in ("_target_", "default_root_dir")}
    recipe = [hydra.utils.instantiate(c) for k, c in cfg.callbacks.items()
              if k not in RUN_CALLBACKS and isinstance(c, DictConfig) and "_target_" in c]
    return {**settings, "callbacks": [*recipe, ValidateAtEnd(), *callbacks], **trainer_kwargs}
