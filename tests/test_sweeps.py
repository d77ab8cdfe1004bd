"""Sweeps: every W&B sweep YAML names real config keys and the algorithm's optimized metric, and each
of its values composes; multirun jobs are named and grouped in W&B by their sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from tests.conftest import CONF, ROOT
from tests.helpers import ALGORITHMS, DQUICK

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def test_every_algorithm_has_a_sweep():
    algos = {p.stem for p in (Path(CONF) / "algo").glob("*.yaml")}
    assert algos <= {p.stem for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_yaml_is_valid_against_the_config(cfg_factory, path):
    spec = yaml.safe_load(path.read_text())
    assert {"program", "method", "metric", "parameters", "command"} <= set(spec), path
    assert spec["method"] in ("grid", "random", "bayes")
    assert (ROOT / spec["program"]).is_file()
    assert "${program}" in spec["command"] and "${args_no_hyphens}" in spec["command"]
    fixed = [c for c in spec["command"] if "=" in c and not c.startswith("$")]
    assert f"algo={path.stem}" in fixed, "the sweep must pick its algorithm"
    quick = "algo=ddpm" not in fixed  # the LM quick settings name LM data keys
    cfg = cfg_factory(*fixed, quick=quick)
    assert spec["metric"]["name"] == cfg.optimized_metric
    assert spec["metric"]["goal"] == {"max": "maximize", "min": "minimize"}[cfg.monitor_mode]
    for key, dist in spec["parameters"].items():
        node, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, node) if node else cfg
        group = not node and (Path(CONF) / key).is_dir()  # a config group (loss=grpo): its values compose below
        assert group or (parent is not None and leaf in parent), f"{path.name}: {key} is not a config key"
        values = dist.get("values") or [dist["min"], dist["max"]]
        for v in values:  # each value composes as the agent would pass it (key=value)
            cfg_factory(*fixed, f"{key}={v}", quick=quick)


def test_multirun_jobs_are_named_by_overrides_and_grouped_by_sweep(cfg_factory, tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = cfg_factory("logger=wandb", "algo=dpo")
    assert cfg.logger.wandb.group is None and cfg.logger.wandb.name is None  # a single run
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "multiruns" / "2026-11-25_10-00-00")
        cfg.hydra.job.override_dirname = "algo.beta=0.1,algo=dpo"
    HydraConfig().set_config(cfg)
    assert cfg.logger.wandb.group == f"{cfg.hydra.job.name}-2026-11-25_10-00-00"
    assert cfg.logger.wandb.name == "algo.beta=0.1,algo=dpo"


SEARCHES = sorted((Path(CONF) / "hparams_search").glob("*.yaml"))


def test_every_algorithm_has_an_optuna_search():
    algos = {p.stem for p in (Path(CONF) / "algo").glob("*.yaml")}
    assert {f"{a}_optuna" for a in algos} <= {p.stem for p in SEARCHES}


@pytest.mark.parametrize("path", SEARCHES, ids=lambda p: p.stem)
def test_optuna_search_params_are_config_keys(cfg_factory, path):
    import re

    quick = not path.stem.startswith("ddpm")
    cfg = cfg_factory(f"hparams_search={path.stem}", quick=quick)
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == f"{cfg.monitor_mode}imize" and sweeper.storage is None
    assert cfg.algo._target_ == cfg_factory(f"algo={path.stem.removesuffix('_optuna')}", quick=quick).algo._target_
    for key, spec in sweeper.params.items():
        node, _, leaf = key.rpartition(".")
        group = not node and (Path(CONF) / key).is_dir()  # a config group (loss=grpo): its values compose below
        assert group or leaf in OmegaConf.select(cfg, node), f"{path.name}: {key} is not a config key"
        choice = re.fullmatch(r"choice\((.*)\)", spec)
        for v in (choice.group(1).split(",") if choice else []):
            cfg_factory(f"hparams_search={path.stem}", f"{key}={v.strip()}", quick=quick)


def test_optuna_multirun_runs_trials_and_reports_the_best(tmp_path):
    from tests.helpers import run_cli as run

    r = run("-m", "hparams_search=sft_optuna", "hydra.sweeper.n_trials=2", "debug=fdr", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "Best parameters" in out and "algo.lr" in out
    assert len([p for p in (tmp_path / "train" / "multiruns").glob("*/*") if p.is_dir()]) == 2


def test_submitit_local_launcher_runs_two_jobs(tmp_path):
    """The submitit launcher (what hydra/launcher=slurm uses on a cluster), locally: 2 jobs."""
    from tests.helpers import run_cli as run

    r = run("-m", "hydra/launcher=submitit_local", "algo.lr=1e-3,3e-4", "debug=fdr", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    sweep = next((tmp_path / "train" / "multiruns").glob("*"))
    assert (sweep / ".submitit").is_dir(), "jobs did not go through submitit"
    for job in ("0", "1"):
        assert (sweep / job / "train.log").is_file()


def test_slurm_launcher_config_composes(cfg_factory):
    cfg = cfg_factory("hydra/launcher=slurm")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.timeout_min == 240


# ---------------------------------------------------------------------------------------------- dashboards
def _dashboard():
    import sys

    sys.path.insert(0, str(ROOT / "sweeps"))
    import dashboard

    return dashboard


def test_dashboard_specs_build_offline_for_every_algorithm():
    """sweeps/dashboard.py builds each W&B workspace spec with wandb-workspaces, no network."""
    dashboard = _dashboard()
    assert set(dashboard.ALGOS) == {p.stem for p in (Path(CONF) / "algo").glob("*.yaml")}
    for algo in dashboard.ALGOS:
        spec = json.loads(dashboard.build(algo, "me", "genlight")._to_model().model_dump_json())
        text = json.dumps(spec)
        assert spec["display_name"] == f"genlight: {algo}"
        assert dashboard.panels(algo), f"{algo}: its module declares no DASHBOARD"
        for section, _ in dashboard.panels(algo):
            assert f'"name": "{section}"' in text, section
        for key in dashboard.metrics(algo):
            assert key in text, f"{algo}: the spec lost {key}"
    with pytest.raises(ValueError, match="--algo 'gan'"):
        dashboard.build("gan", "me", "p")


# short runs that log every kind of metric of each algorithm (DDPM: digits for FD, 2-D data for energy distance)
_DIGITS = [*DQUICK, "trainer.max_steps=4", "trainer.val_check_interval=2", "algo.val_num_samples=40",
           "algo.test_num_samples=40", "algo.val_steps=5", "algo.test_steps=5"]
# what a run needs beyond its short run (tests/helpers `short_run`) to log every metric its panels show: RLVR the KL
# and the sigmoid fit; DDPM a second run on digits (FD) beside its short run on 2-D points (energy distance)
DASHBOARD_EXTRA = {
    "rlvr": ["trainer.max_steps=10", "trainer.val_check_interval=2", "algo.log_completions_every_n_steps=1",
             "algo.warmup_steps=0", "callbacks.scalerl_curve.skip_fraction=0", "algo.beta=0.05"],
}
ALSO = {"ddpm": [(_DIGITS, False)]}


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_dashboard_metric_reaches_wandb(cfg_factory, tmp_path, algo):
    """Each metric a panel shows is one that a real run of that algorithm sends to W&B (read back from the
    offline run), so a renamed metric breaks this test rather than an empty panel."""
    from tests.helpers import short_run, train_with, wandb_history

    logged = set()
    base, lm = short_run(algo)
    for i, (overrides, quick) in enumerate([(base + DASHBOARD_EXTRA.get(algo, []), lm), *ALSO.get(algo, [])]):
        cfg = cfg_factory(*overrides, "logger=wandb", "test=false", quick=quick)
        cfg.paths.output_dir = str(tmp_path / str(i))
        train_with(cfg)
        (run,) = (tmp_path / str(i) / "wandb").glob("offline-run-*")
        # media and tables arrive as `key._type`, `key.path`, ...; learning rates as `lr-AdamW/pg1`
        logged |= {k.split(".")[0] for row in wandb_history(run) for k in row}
    logged |= {k.rsplit("/pg", 1)[0] for k in logged if k.startswith("lr-")}
    missing = sorted(_dashboard().metrics(algo) - logged)
    assert not missing, f"{algo}: dashboard panels show metrics no run logged: {missing}"


def test_wandb_axes_summaries():
    from genlight.callbacks.wandb_axes import summary_for

    assert summary_for("val/fd") == "min" and summary_for("train/loss") == "min"
    assert summary_for("val/pass@1") == "max" and summary_for("val/rewards/accuracies") == "max"
    assert summary_for("train/rho/mean") == "last"


def test_wandb_sweeps_are_generated_from_the_optuna_searches(tmp_path):
    """One source per search space: sweeps/*.yaml are exactly what sweeps/generate.py makes of
    conf/hparams_search/*_optuna.yaml, and the translation keeps each distribution."""
    import sys

    sys.path.insert(0, str(ROOT / "sweeps"))
    import generate

    for path in generate.main(tmp_path):
        assert path.read_text() == (ROOT / "sweeps" / path.name).read_text(), (
            f"sweeps/{path.name} is stale: run `python sweeps/generate.py`")
    assert generate.wandb_parameter("tag(log, interval(1e-5, 2e-4))") == {
        "distribution": "log_uniform_values", "min": 1e-5, "max": 2e-4}
    assert generate.wandb_parameter("interval(0.1, 1.0)") == {"distribution": "uniform", "min": 0.1, "max": 1.0}
    assert generate.wandb_parameter("choice(sigmoid, ipo)") == {"values": ["sigmoid", "ipo"]}
    assert generate.wandb_parameter("range(2, 6, 2)") == {"values": [2, 4, 6]}
    with pytest.raises(ValueError, match="cannot translate"):
        generate.wandb_parameter("weird(1)")
