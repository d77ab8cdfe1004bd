"""The command-line entry points, for an installed genlight and for the checkout alike:

    genlight-train  algo=dpo trainer.max_steps=100     # = python train.py ...  (genlight.pipeline.train)
    genlight-eval   ckpt_path=... algo=dpo             # = python eval.py ...   (genlight.pipeline.evaluate)
    genlight-sample ckpt=... sampler=ddim steps=50     # = python sample.py ... (genlight.pipeline.sample)

Each composes the configs shipped in the package (`pkg://genlight.conf`, the checkout's conf/), so the same
arguments work from any directory. Runs are written under `paths.log_dir`: `<working directory>/logs`, or under the
checkout when its train.py / eval.py / sample.py run them (they set PROJECT_ROOT). Hydra takes the arguments: `--help`,
`-m` (multirun), `--cfg job`, `hydra.searchpath=[file://my_conf]` to add a directory of your own groups.
"""

from __future__ import annotations

from omegaconf import DictConfig

from genlight.resolvers import register_resolvers

CONFIGS = "pkg://genlight.conf"
register_resolvers()  # before Hydra composes: the paths, W&B and sweep interpolations


def _main(config_name: str):
    import hydra

    return hydra.main(version_base="1.3", config_path=CONFIGS, config_name=config_name)


@_main("train")
def train(cfg: DictConfig) -> float | None:
    """Fit (and test) the configured algorithm; return `optimized_metric` (for Hydra's sweepers)."""
    from genlight.pipeline import train as run
    from genlight.utils import extras, get_metric_value

    extras(cfg)
    metrics, _ = run(cfg)
    return get_metric_value(metrics, cfg.get("optimized_metric"))


@_main("eval")
def evaluate(cfg: DictConfig) -> None:
    """Score a checkpoint or an HF export on the test (or val) split."""
    from genlight.pipeline import evaluate as run
    from genlight.utils import extras

    extras(cfg)
    run(cfg)


@_main("sample")
def sample(cfg: DictConfig) -> None:
    """Draw samples from a diffusion checkpoint into a PNG grid (or a 2-D scatter plot)."""
    from genlight.pipeline import sample as run

    run(cfg)
