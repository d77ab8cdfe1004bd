"""genlight as a plugin: imported from another project, its modules built with their documented defaults (which are the
YAML recipe), a plain Trainer given the recipe's settings, the contracts of `net`, the data kind and the denoiser
checked, and the wheel installed and used from a directory with its own `src/` package."""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from genlight.rl.recipe import Recipe
from tests.helpers import ALGORITHMS, REQUIRED, REQUIRED_ARGS, ROOT


def test_import_genlight_is_light_and_lists_its_api():
    code = ("import sys, genlight; heavy = [m for m in ('lightning', 'torch', 'transformers', 'wandb', 'vllm', "
            "'textarena', 'hydra') if m in sys.modules]; print(heavy); print(len(genlight.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    heavy, n = out.splitlines()
    assert heavy == "[]", f"import genlight loaded {heavy}"
    import genlight

    assert int(n) == len(genlight.__all__) >= 30
    for name in ("SFTModule", "DPOModule", "KTOModule", "RewardModelModule", "RLVRModule", "DistillModule", "DDPMModule",
                 "LMDataModule", "ReferenceRefresh", "dpo_loss", "trainer_defaults", "compose"):
        assert name in genlight.__all__
        assert getattr(genlight, name).__module__.startswith("genlight."), name
    with pytest.raises(AttributeError, match="no attribute 'DPOModel'"):
        genlight.DPOModel  # noqa: B018


# --------------------------------------------------------------------------- the Python defaults are the recipe
# keys the YAML wires from another group (the model's reference, the data's classes, RLVR's reward / rollout / env):
# they hold what those groups give, not a recipe value
WIRED = {"ref_pretrained", "num_classes", "reward", "rollout", "env", "teacher"}
NOT_IN_YAML = {"net", "tokenizer", "lora", "gradient_checkpointing"}  # the model= group's, not the algorithm's


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _instantiate_pair(cfg_factory, algo: str):
    """The module as the YAML builds it (no overrides) and as Python builds it from the same network, no argument."""
    cfg = cfg_factory(f"algo={algo}", *REQUIRED.get(algo, []), quick=False)
    cls = hydra.utils.get_class(cfg.algo._target_)
    tok = hydra.utils.instantiate(cfg.model.tokenizer) if "tokenizer" in cfg.model else None

    def net():
        with torch.random.fork_rng():
            return hydra.utils.instantiate(cfg.model.net)

    shared = {"tokenizer": tok} if tok is not None else {}
    from_yaml = hydra.utils.instantiate(cfg.algo, net=net(), **shared, _convert_="all")
    from_python = cls(net=net(), **shared, **REQUIRED_ARGS.get(algo, {}))
    return cfg, cls, from_yaml, from_python


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_the_python_defaults_are_the_yaml_recipe(cfg_factory, algo):
    cfg, cls, from_yaml, from_python = _instantiate_pair(cfg_factory, algo)
    yaml_algo = cfg.algo
    params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
              if p.kind is not p.VAR_KEYWORD and k not in ("self", "recipe")}
    if "recipe" in inspect.signature(cls.__init__).parameters:  # its fields are keyword options (RLVRModule's)
        params |= {f.name: f.default for f in dataclasses.fields(Recipe)}
    knobs = [k for k in params if k not in NOT_IN_YAML]
    missing = [k for k in knobs if k not in yaml_algo]
    assert not missing, f"conf/algo/{algo}.yaml does not show these constructor arguments: {missing}"
    unknown = [k for k in yaml_algo if k != "_target_" and k not in params]
    assert not unknown, f"conf/algo/{algo}.yaml sets keys {cls.__name__} does not take: {unknown}"
    differ = {}
    for k in knobs:
        if k in WIRED:
            continue
        yaml_value = OmegaConf.to_container(yaml_algo, resolve=True)[k]
        if _plain(params[k]) != yaml_value:
            differ[k] = (params[k], yaml_value)
    assert not differ, f"{cls.__name__}'s defaults differ from conf/algo/{algo}.yaml (python, yaml): {differ}"
    # and what each builds holds the same hyper-parameters (including what the module derives from them)
    hy = {k: _plain(v) for k, v in from_yaml.hparams.items() if k not in WIRED}
    hp = {k: _plain(v) for k, v in from_python.hparams.items() if k not in WIRED}
    assert hy == hp


def test_the_defaults_check_can_fail(cfg_factory):
    """The comparison above sees a planted difference: a YAML value the Python default does not share."""
    cfg, cls, from_yaml, from_python = _instantiate_pair(cfg_factory, "dpo")
    assert from_yaml.hparams.beta == from_python.hparams.beta == 0.5
    planted = hydra.utils.instantiate(cfg.algo, net=from_yaml.model, tokenizer=from_yaml.tokenizer, beta=0.1)
    assert dict(planted.hparams) != dict(from_python.hparams)


# --------------------------------------------------------------------------- the recipe's Trainer
@pytest.mark.parametrize("algo", ["dpo", "rlvr", "ddpm", "tr_dpo"])
def test_trainer_defaults_are_what_train_py_gives_the_trainer(cfg_factory, algo):
    import genlight
    from genlight.callbacks import EMA, FiniteLossGuard, ReferenceRefresh, ScaleRLCurve, ValidateAtEnd

    cfg = cfg_factory(f"algo={algo}", quick=False)
    kw = genlight.trainer_defaults(algo)
    for key in ("gradient_clip_val", "max_steps", "val_check_interval", "num_sanity_val_steps", "precision"):
        assert kw[key] == cfg.trainer[key], key
    kinds = {type(c) for c in kw["callbacks"]}
    assert {FiniteLossGuard, ValidateAtEnd} <= kinds
    assert (EMA in kinds) == (algo == "ddpm") and (ScaleRLCurve in kinds) == (algo == "rlvr")
    assert (ReferenceRefresh in kinds) == (algo == "tr_dpo")
    if algo == "tr_dpo":
        (rr,) = [c for c in kw["callbacks"] if isinstance(c, ReferenceRefresh)]
        assert rr.tau == cfg.callbacks.reference_refresh.tau
    mine = FiniteLossGuard()
    kw = genlight.trainer_defaults(algo, callbacks=[mine], max_steps=7, gradient_clip_val=None)
    assert kw["max_steps"] == 7 and kw["gradient_clip_val"] is None and kw["callbacks"][-1] is mine


def test_trainer_defaults_finds_the_algorithm_of_a_module():
    from genlight.config import algorithm_name
    from genlight.lightning_modules.dpo import DPOModule
    from genlight.lightning_modules.rlvr import RLVRModule

    assert algorithm_name(DPOModule) == "dpo" and algorithm_name(RLVRModule) == "rlvr"

    class Mine(DPOModule):
        pass

    with pytest.raises(ValueError, match="no conf/algo/.*yaml trains it"):
        algorithm_name(Mine)


# --------------------------------------------------------------------------- contracts
def test_net_is_a_model_a_directory_or_a_factory(tokenizer, hf_dir):
    from genlight import DPOModule, SFTModule, tiny_llama

    small = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model = tiny_llama(tokenizer, **small)
    assert SFTModule(net=model, tokenizer=tokenizer).model is model
    from_dir = SFTModule(net=str(hf_dir))  # the directory's own tokenizer
    assert from_dir.model.config.hidden_size == 32 and len(from_dir.tokenizer) == len(tokenizer)
    factory = DPOModule(net=lambda tokenizer: tiny_llama(tokenizer, **small), tokenizer=tokenizer)
    assert factory.model.config.num_hidden_layers == 1 and factory.ref_model is not None
    with pytest.raises(TypeError, match="net: a int"):
        SFTModule(net=3, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="returned a dict, not a model"):
        SFTModule(net=lambda tokenizer: {}, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="not a transformers model"):
        SFTModule(net=torch.nn.Linear(2, 2), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer: required"):
        SFTModule(net=model)
    from genlight.models.tokenizer import char_tokenizer

    with pytest.raises(ValueError, match=f"embedding has 6 rows and the tokenizer {len(tokenizer)} tokens"):
        SFTModule(net=tiny_llama(char_tokenizer("ab"), **small), tokenizer=tokenizer)


def _fit(module, datamodule, steps: int = 1):
    import lightning as L

    L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(module, datamodule)


def test_a_datamodule_of_another_kind_is_refused_naming_both(tokenizer):
    from genlight import ArithmeticTask, DPOModule, KTOModule, LMDataModule, tiny_llama

    small = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    task = ArithmeticTask(n_train=32, n_val=8, n_test=8)
    with pytest.raises(ValueError, match=r"DPOModule trains on data.kind='preference' rows.*gives data.kind='sft'"):
        _fit(DPOModule(net=lambda tokenizer: tiny_llama(tokenizer, **small), tokenizer=tokenizer),
             LMDataModule(task, tokenizer, kind="sft", batch_size=4))
    with pytest.raises(ValueError, match=r"KTOModule trains on data.kind='genlight.lightning_modules.kto.UNPAIRED'"):
        _fit(KTOModule(net=lambda tokenizer: tiny_llama(tokenizer, **small), tokenizer=tokenizer),
             LMDataModule(task, tokenizer, kind="preference", batch_size=4))
    # the right kind trains (and the kind a module declares is what its YAML sets)
    _fit(DPOModule(net=lambda tokenizer: tiny_llama(tokenizer, **small), tokenizer=tokenizer),
         LMDataModule(task, tokenizer, kind=DPOModule.DATA_KIND, batch_size=4))


@pytest.mark.parametrize("algo", [a for a in ALGORITHMS if a != "ddpm"])
def test_each_module_declares_the_kind_its_yaml_sets(algo):
    cfg = OmegaConf.load(ROOT / "conf" / "algo" / f"{algo}.yaml")
    if "algo" not in cfg:  # tr_dpo: dpo's
        cfg = OmegaConf.load(ROOT / "conf" / "algo" / "dpo.yaml")
    cls = hydra.utils.get_class(cfg.algo._target_)
    assert cls.DATA_KIND == cfg.data.kind


def test_a_batch_without_the_kinds_keys_is_refused_naming_them(tokenizer):
    """A DataModule of one's own (no `kind`) whose batches are SFT's, given to DPO: its first batch stops the run."""
    import lightning as L

    from genlight import ArithmeticTask, DPOModule, LMDataModule, tiny_llama

    inner = LMDataModule(ArithmeticTask(n_train=32, n_val=8, n_test=8), tokenizer, kind="sft", batch_size=4)

    class Mine(L.LightningDataModule):
        def setup(self, stage=None):
            inner.setup(stage)

        def train_dataloader(self):
            return inner.train_dataloader()

        def val_dataloader(self):
            return inner.val_dataloader()

    module = DPOModule(net=lambda tokenizer: tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                                                        intermediate_size=64), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"DPOModule: a train batch lacks \['margins'\].*docs/plugin.md"):
        _fit(module, Mine())


def test_a_denoiser_must_give_its_shape_and_rebuild_from_its_config(tmp_path, caplog):
    from genlight import DDPMModule, mlp2d

    class Bare(torch.nn.Module):
        def forward(self, x, t):
            return x

    with pytest.raises(ValueError, match="Bare has no `config`"):
        DDPMModule(net=Bare())

    class NoShape(Bare):
        config = {"hidden": 3}

    with pytest.raises(ValueError, match=r"neither `sample_size` and `in_channels` \(images\) nor `dim`.*\['hidden'\]"):
        DDPMModule(net=NoShape())

    class NoRebuild(Bare):
        config = {"dim": 2}

    DDPMModule(net=NoRebuild())  # trains and samples; its checkpoints could not be loaded: said
    assert "NoRebuild has no `from_config`" in caplog.text and "cannot rebuild it" in caplog.text
    with pytest.raises(TypeError, match="net: a float"):
        DDPMModule(net=1.5)
    net = mlp2d(hidden=16, depth=1)
    net.save_pretrained(tmp_path / "net")
    for given in (net, lambda: mlp2d(hidden=16, depth=1), str(tmp_path / "net")):
        m = DDPMModule(net=given, process={"name": "flow"})
        assert m.sample_shape == (2,) and m.process.name == "flow" and m.process.T == 1000
    loaded = DDPMModule(net=str(tmp_path / "net")).net
    assert loaded.training, "a saved network loads in eval mode; the module trains it in train mode"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_a_log_dir_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    from genlight.resolvers import writable_dir

    (tmp_path / "afile").write_text("")
    with pytest.raises(PermissionError, match=r"paths.log_dir=.*afile/logs: .*afile is not a directory"):
        writable_dir(str(tmp_path / "afile" / "logs"))
    assert writable_dir(str(tmp_path / "new" / "logs")) == str(tmp_path / "new" / "logs")  # created later by Hydra
    monkeypatch.setattr(os, "access", lambda *a: False)
    with pytest.raises(PermissionError, match=f"{tmp_path} cannot be written. Run from a directory you can write"):
        writable_dir(str(tmp_path / "logs"))


# --------------------------------------------------------------------------- from outside the checkout
USER_SCRIPT = textwrap.dedent('''
    import sys
    import lightning as L
    import torch
    import genlight
    from genlight import (ArithmeticTask, DPOModule, LMDataModule, ReferenceRefresh, char_tokenizer, dpo_loss,
                          tiny_llama)
    from src.models.lm import MINE  # the project's own src/, beside genlight

    assert genlight.__file__.startswith(sys.argv[1]), genlight.__file__
    tok = char_tokenizer()
    module = DPOModule(net=lambda tokenizer: tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                                                        intermediate_size=64), tokenizer=tok)
    data = LMDataModule(ArithmeticTask(n_train=64, n_val=16, n_test=16), tok, kind=DPOModule.DATA_KIND, batch_size=8)
    refresh = ReferenceRefresh(tau=2)
    trainer = L.Trainer(**genlight.trainer_defaults(module, max_steps=5, val_check_interval=5, logger=False,
                                                    enable_checkpointing=False, enable_progress_bar=False,
                                                    callbacks=[refresh]))
    trainer.fit(module, data)
    losses, _, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
                            beta=0.5)
    print("STEPS", trainer.global_step, "REFRESHES", refresh.refreshes, "CLIP", trainer.gradient_clip_val,
          "LOSS", round(float(losses[0]), 6), "MINE", MINE)
''')

USER_CONFIG = textwrap.dedent('''
    defaults:
      - train
      - override algo: dpo
      - override data: my_pairs
      - _self_
    hydra:
      searchpath:
        - pkg://genlight.conf
    trainer:
      max_steps: 3
''')

USER_APP = textwrap.dedent('''
    import hydra
    import genlight  # the resolvers the shipped configs use

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def main(cfg):
        print("COMPOSED", cfg.algo._target_, cfg.algo.beta, cfg.data.kind, cfg.data.source.n_train, cfg.trainer.max_steps)

    main()
''')


def test_the_wheel_works_from_a_project_with_its_own_src(tmp_path):
    """The built wheel, installed into a directory ahead of the checkout on the path, used from a project that has its
    own `src/` package: a plain Trainer trains DPO with TR-DPO's refresh, `dpo_loss` alone, `genlight-train`, a user
    config composing `pkg://genlight.conf`, and genlight-train where logs cannot be written."""
    py = Path(sys.executable)
    wheels, target, project = tmp_path / "wheels", tmp_path / "site", tmp_path / "project"
    source = tmp_path / "source"  # built from a copy: setuptools leaves build/ and *.egg-info where it builds
    for part in ("src", "conf", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, source / part, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / part).is_dir() else {}))
    subprocess.run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source],
                   check=True, capture_output=True)
    (wheel,) = wheels.glob("genlight-*.whl")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", target, wheel],
                   check=True, capture_output=True)
    assert not (target / "src").exists(), "the wheel installs no top-level src"
    assert (target / "genlight" / "conf" / "algo" / "dpo.yaml").is_file()
    (project / "src" / "models").mkdir(parents=True)
    (project / "src" / "__init__.py").write_text("")
    (project / "src" / "models" / "__init__.py").write_text("")
    (project / "src" / "models" / "lm.py").write_text("MINE = 'mine'\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}, "PYTHONPATH": f"{target}:{project}",
           "WANDB_MODE": "offline", "OMP_WAIT_POLICY": "PASSIVE"}

    def run(*cmd, cwd=project, check=True):
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
        assert not check or r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    (project / "my_script.py").write_text(USER_SCRIPT)
    out = run(py, "my_script.py", target).stdout
    # -log sigma(0.5 * ((-1 + 2) - (-3 + 2))) = -log sigma(1) = 0.313262
    assert "STEPS 5 REFRESHES 2 CLIP 1.0 LOSS 0.313262 MINE mine" in out, out

    cli = target / "bin" / "genlight-train"
    run(py, cli, "algo=dpo", "warm_start.max_steps=0", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "data.source.n_train=32", "data.source.n_val=8", "data.source.n_test=8", "data.batch_size=8", "logger=csv",
        "extras.print_config=false", "trainer.enable_progress_bar=false")
    (run_dir,) = (project / "logs" / "train" / "runs").iterdir()  # under the working directory, not the package
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "hf" / "config.json").is_file()
    assert not (target / "genlight" / "logs").exists()

    (project / "conf" / "data").mkdir(parents=True)
    (project / "conf" / "config.yaml").write_text(USER_CONFIG)
    (project / "conf" / "data" / "my_pairs.yaml").write_text(
        "defaults:\n  - arithmetic\n  - _self_\nsource:\n  n_train: 64\n")
    (project / "my_app.py").write_text(USER_APP)
    assert "COMPOSED genlight.lightning_modules.dpo.DPOModule 0.5 preference 64 3" in run(py, "my_app.py").stdout

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "logs").write_text("a file where the runs would go")
    r = run(py, cli, "algo=sft", cwd=blocked, check=False)
    assert r.returncode != 0 and f"paths.log_dir={blocked}/logs: runs are written there" in r.stderr + r.stdout
