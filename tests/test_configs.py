"""Every config composes and instantiates; typos fail at once naming the key and the choices."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch

from tests.conftest import CONF


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml") if not p.stem.startswith("_"))  # _x: included parts


DIFFUSION_ALGOS = {"ddpm"}
DIFFUSION_DATA = {"digits", "toy2d", "images"}


@pytest.fixture
def image_dir(tmp_path):
    from PIL import Image

    d = tmp_path / "images"
    d.mkdir()
    for i in range(10):
        Image.new("RGB", (40, 40), (25 * i, 0, 255 - 25 * i)).save(d / f"{i}.png")
    return d


@pytest.mark.parametrize("algo", options("algo"))
def test_algo_configs_instantiate(cfg_factory, algo):
    if algo in DIFFUSION_ALGOS:
        cfg = cfg_factory(f"algo={algo}", quick=False)
        module = hydra.utils.instantiate(cfg.algo, net=hydra.utils.instantiate(cfg.model.net))
        assert isinstance(module, L.LightningModule) and cfg.optimized_metric == "val/fd"
        return
    cfg = cfg_factory(f"algo={algo}")
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    module = hydra.utils.instantiate(cfg.algo, net=hydra.utils.instantiate(cfg.model.net), tokenizer=tok)
    assert isinstance(module, L.LightningModule)
    assert cfg.optimized_metric.startswith("val/")


@pytest.mark.parametrize("data", options("data"))
def test_data_configs_instantiate(cfg_factory, data, sft_jsonl, pref_jsonl, prompts_jsonl, unpaired_jsonl, image_dir):
    if data in DIFFUSION_DATA:
        cfg = cfg_factory("algo=ddpm", f"data={data}", *([f"data.path={image_dir}"] if data == "images" else []), quick=False)
        dm = hydra.utils.instantiate(cfg.data)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        net = hydra.utils.instantiate(cfg.model.net)  # the denoiser this data selects fits its shape
        out = net(batch, torch.zeros(len(batch)))
        assert (out.sample if hasattr(out, "sample") else out).shape == batch.shape
        assert len(dm.splits["val"]) > 0 and cfg.optimized_metric == f"val/{cfg.data.metric}"
        return
    extra = {"jsonl_sft": [f"data.source.train={sft_jsonl}"], "jsonl_pref": [f"data.source.train={pref_jsonl}", "algo=dpo"],
             "jsonl_prompts": [f"data.source.train={prompts_jsonl}", "algo=rlvr"],
             "jsonl_unpaired": [f"data.source.train={unpaired_jsonl}", "algo=kto"]}.get(data, [])
    cfg = cfg_factory(*[o for o in extra], f"data={data}", quick=False)
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tok)
    dm.setup("fit")
    assert len(dm.examples["train"]) > 0 and len(dm.examples["val"]) > 0


def _equal(completion: str, answer: str) -> float:
    return float(completion.strip() == answer)


@pytest.mark.parametrize("reward", [r for r in options("reward") if r != "model"])  # model: tests/test_rlhf.py
def test_reward_configs_instantiate_and_score(cfg_factory, reward):
    extra = ["reward.fn._target_=tests.test_configs._equal"] if reward == "custom" else []
    cfg = cfg_factory("algo=rlvr", f"reward={reward}", *extra)
    verifier = hydra.utils.instantiate(cfg.algo.reward)
    answer = "12"
    if reward == "reasoning_gym":  # it scores with a generator's entry: one of data=reasoning_gym's answers
        data = hydra.utils.instantiate(cfg_factory("algo=rlvr", "data=reasoning_gym", quick=False).data.source)
        answer = data.rows("val")[0][1]["answer"]
    assert verifier(str(answer), answer) == 1.0 and verifier(str(int(answer) + 1), answer) == 0.0


def test_custom_reward_without_a_function_names_the_key(cfg_factory):
    from genlight.utils import check_required

    with pytest.raises(Exception, match=r"reward\.fn\._target_"):
        check_required(cfg_factory("algo=rlvr", "reward=custom"))


@pytest.mark.parametrize("model", options("model"))
def test_model_configs_instantiate(cfg_factory, model, hf_dir):
    if model in {"unet", "mlp2d"} or model.startswith("denoiser_"):
        data = "toy2d" if model in ("mlp2d", "denoiser_toy2d") else "digits"
        cfg = cfg_factory("algo=ddpm", f"data={data}", f"model={model}", quick=False)
        net = hydra.utils.instantiate(cfg.model.net)
        x = torch.randn(3, 2) if data == "toy2d" else torch.randn(3, 1, 8, 8)
        out = net(x, torch.tensor([0, 10, 999]))
        assert (out.sample if hasattr(out, "sample") else out).shape == x.shape
        return
    cfg = cfg_factory(f"model={model}", *([f"model.pretrained={hf_dir}"] if model == "hf" else []))
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    net = hydra.utils.instantiate(cfg.model.net)(tokenizer=tok)
    assert net.get_input_embeddings().num_embeddings == len(tok)


def test_model_hf_takes_config_keys_an_experiment_sets(cfg_factory, hf_dir):
    """experiment=guess_the_number sets model.net.max_position_embeddings for the from-scratch default; with model=hf
    the same key changes the checkpoint's config (it was a TypeError), and a key the config lacks is named."""
    cfg = cfg_factory("model=hf", f"model.pretrained={hf_dir}", "+model.net.max_position_embeddings=896")
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    assert hydra.utils.instantiate(cfg.model.net)(tokenizer=tok).config.max_position_embeddings == 896
    cfg = cfg_factory("model=hf", f"model.pretrained={hf_dir}", "+model.net.max_positions=896")
    with pytest.raises(ValueError, match="model.net.max_positions=896: the checkpoint's config .* no key"):
        hydra.utils.instantiate(cfg.model.net)(tokenizer=tok)


@pytest.mark.parametrize("group", ["logger", "callbacks", "trainer"])
def test_logger_callback_trainer_configs_instantiate(cfg_factory, group):
    from genlight.utils import instantiate_callbacks, instantiate_loggers

    for option in options(group):
        cfg = cfg_factory(f"{group}={option}")
        callbacks = instantiate_callbacks(cfg.callbacks)
        loggers = instantiate_loggers(cfg.logger)
        if option in ("gpu", "deepspeed"):
            continue  # need a GPU (deepspeed also its package) to build; composed above
        if option == "fsdp":  # FSDP2; runs on 2 CPU processes in tests/test_fsdp.py (the script re-launches)
            from lightning.pytorch.strategies import ModelParallelStrategy

            strategy = hydra.utils.instantiate(cfg.trainer.strategy)
            assert isinstance(strategy, ModelParallelStrategy) and strategy._data_parallel_size == cfg.trainer.devices
            continue
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        assert isinstance(trainer, L.Trainer)


# what each preset must change in the composed config (key: (value without it, value with it))
PRESETS = {
    "experiment/sft_arith3": {"data.source.digits": (2, 3), "data.source.ops": (["+"], ["+", "-"]),
                              "trainer.max_steps": (1500, 6000), "data.source.n_train": (8000, 50000)},
    "experiment/rlhf": {"algo._target_": ("genlight.lightning_modules.sft.SFTModule", "genlight.lightning_modules.rlvr.RLVRModule"),
                        "reward._target_": (None, "genlight.rewards.RewardModel"), "reward.normalize": (None, True),
                        "algo.kl_in": (None, "reward"), "algo.beta": (None, 0.05)},
    "experiment/gsm8k": {"algo._target_": ("genlight.lightning_modules.sft.SFTModule", "genlight.lightning_modules.rlvr.RLVRModule"),
                         "data.source.train": (None, "openai/gsm8k"), "data.answer_pattern": (None, "#### (.*)"),
                         "reward._target_": (None, "genlight.rewards.MathVerify"), "model.lora.r": (None, 16),
                         "trainer.accelerator": ("auto", "gpu"), "data.chat": (None, True)},
    "experiment/rg_arithmetic": {"algo._target_": ("genlight.lightning_modules.sft.SFTModule",
                                                   "genlight.lightning_modules.rlvr.RLVRModule"),
                                 "data.source.tasks.0.name": (None, "basic_arithmetic"),
                                 "reward._target_": (None, "genlight.datamodules.reasoning_gym.ReasoningGymScore")},
    "experiment/rg_spell_backward": {"algo._target_": ("genlight.lightning_modules.sft.SFTModule",
                                                       "genlight.lightning_modules.rlvr.RLVRModule"),
                                     "data.source.tasks.0.name": (None, "spell_backward"),
                                     "trainer.max_steps": (1500, 300),
                                     "reward._target_": (None, "genlight.datamodules.reasoning_gym.ReasoningGymScore")},
    "experiment/calculator_tool": {"algo._target_": ("genlight.lightning_modules.sft.SFTModule",
                                                     "genlight.lightning_modules.rlvr.RLVRModule"),
                                   "algo.env.environment._target_": (None, "genlight.envs.calculator.Calculator"),
                                   "data.source._target_": ("genlight.datamodules.arithmetic.ArithmeticTask",
                                                            "genlight.envs.calculator.CalculatorTask"),
                                   "data.source.ops": (["+"], ["*"]), "algo.max_new_tokens": (8, 96)},
    "experiment/guess_the_number": {"algo.env.environment.env_id": (None, "GuessTheNumber-v0-raw"),
                                     "data.source._target_": ("genlight.datamodules.arithmetic.ArithmeticTask",
                                                              "genlight.envs.textarena.GameSeeds"),
                                     "model.net.max_position_embeddings": (256, 896), "algo.max_new_tokens": (8, 72)},
    "experiment/scalerl": {"algo._target_": ("genlight.lightning_modules.sft.SFTModule", "genlight.lightning_modules.rlvr.RLVRModule"),
                           "trainer.max_steps": (1500, 600), "trainer.val_check_interval": (250, 25),
                           "data.source.ops": (["+"], ["+", "*"])},
    "debug/fdr": {"trainer.fast_dev_run": (None, True), "logger": (["wandb"], []),
                  "callbacks": (["finite_loss", "hf_export", "lr_monitor", "model_checkpoint", "rich_progress_bar",
                                 "wandb_axes"], [])},
}


def _value(cfg, key):
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, key)
    if key in ("logger", "callbacks"):  # a group: the names of what it instantiates
        return sorted(k for k in node if node[k] is not None)
    return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node


@pytest.mark.parametrize("name", options("experiment") + [f"debug/{d}" for d in options("debug")])
def test_experiment_and_debug_presets_change_what_they_say(name):
    """Each preset changes exactly the keys it is for, from the plain defaults."""
    from tests.conftest import make_cfg

    group, _, option = name.rpartition("/")
    name = f"{group or 'experiment'}/{option}"
    assert name in PRESETS, f"add {name} to PRESETS with what it changes"
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        plain = make_cfg(Path(d), quick=False)
        preset = make_cfg(Path(d), [f"{group or 'experiment'}={option}"], quick=False)
    for key, (before, after) in PRESETS[name].items():
        assert _value(plain, key) == before, f"{key}: the default moved; update PRESETS"
        assert _value(preset, key) == after, f"{name} should set {key} to {after}"


def test_scalerl_rows_share_their_warm_starts_through_the_cache(cfg_factory, tmp_path):
    """experiment=scalerl keeps each seed's warm start under the log dir, so every row of the ablation (its algorithm
    options differ) finds the same key."""
    from genlight.lightning_modules.sft import warm_start_key

    base = cfg_factory("experiment=scalerl", quick=False)
    assert base.warm_start.cache_dir == str(tmp_path / "warm_start_cache")
    for row in ("algo.loss_type=gspo", "algo.generation_lag=0", "algo.zero_variance_filter=false",
                "data.batch_size=128"):
        assert warm_start_key(cfg_factory("experiment=scalerl", row, quick=False)) == warm_start_key(base), row


def test_hf_model_requires_a_path(cfg_factory):
    from genlight.pipeline import train

    with pytest.raises(ValueError, match="missing mandatory config value.*model.pretrained"):
        train(cfg_factory("model=hf"))
