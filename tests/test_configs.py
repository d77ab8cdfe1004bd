"""Every config composes and instantiates; typos fail at once naming the key and the choices."""

from __future__ import annotations

import shutil
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch

from tests.conftest import CONF
from tests.helpers import REQUIRED, ROOT


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
    cfg = cfg_factory(f"algo={algo}", *REQUIRED.get(algo, []))
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
        if option in ("gpu", "deepspeed"):  # need a GPU (deepspeed also its package) to build: checked without
            _check_gpu_trainer(cfg.trainer)
            continue
        if option == "fsdp":  # FSDP2; runs on 2 CPU processes in tests/test_fsdp.py (the script re-launches)
            from lightning.pytorch.strategies import ModelParallelStrategy

            strategy = hydra.utils.instantiate(cfg.trainer.strategy)
            assert isinstance(strategy, ModelParallelStrategy) and strategy._data_parallel_size == cfg.trainer.devices
            continue
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        assert isinstance(trainer, L.Trainer)


def _check_gpu_trainer(cfg) -> None:
    """A GPU trainer config on a CPU machine: its keys are Trainer arguments, its accelerator a registered one, and,
    with the accelerator set to cpu, Lightning builds it with its precision; a strategy's keys are its arguments."""
    import inspect

    from lightning.pytorch.accelerators import AcceleratorRegistry
    from omegaconf import OmegaConf

    trainer_args = inspect.signature(L.Trainer).parameters
    assert set(cfg) - {"_target_"} <= set(trainer_args), set(cfg) - set(trainer_args)
    assert cfg.accelerator in AcceleratorRegistry
    if "strategy" in cfg:
        strategy = hydra.utils.get_class(cfg.strategy._target_)
        assert set(cfg.strategy) - {"_target_"} <= set(inspect.signature(strategy).parameters)
        return
    cpu = {**OmegaConf.to_container(cfg), "accelerator": "cpu", "default_root_dir": None}
    trainer = hydra.utils.instantiate(cpu, logger=False)
    assert trainer.precision == cfg.precision == "bf16-mixed"


# what each preset is: the groups it picks (its defaults list) and EVERY key it then changes, with its value: the
# composed preset differs from those groups' composition in exactly these keys (a key added to a preset's file, or a
# default that moves under it, fails until this table says so)
PRESETS = {
    "experiment/sft_arith3": (["algo=sft", "data=arithmetic"], {
        "data.source.digits": 3, "data.source.ops": ["+", "-"], "data.source.n_train": 50000, "data.source.n_val": 1000,
        "data.source.n_test": 2000, "trainer.max_steps": 6000, "trainer.val_check_interval": 500,
        "tags": ["sft", "arithmetic", "3digit"]}),
    "experiment/rlhf": (["algo=rlvr", "reward=model"], {
        "reward.normalize": True, "algo.beta": 0.05, "algo.kl_in": "reward", "algo.retire_threshold": None,
        "algo.truncated_reward": "min", "tags": ["rlhf", "reward_model"]}),
    "experiment/gsm8k": (["algo=rlvr", "data=jsonl_prompts", "model=hf", "reward=math_verify", "rollout=vllm",
                          "trainer=gpu"], {
        "data.source.train": "openai/gsm8k", "data.source.test": "openai/gsm8k", "data.source.name": "main",
        "data.source.val_fraction": 0.02, "data.columns.prompt": "question", "data.answer_pattern": "#### (.*)",
        "data.chat": True,
        "data.system_prompt": "Please reason step by step, and put your final answer within \\boxed{}.",
        "data.eval_batch_size": 256, "model.lora.r": 16, "model.gradient_checkpointing": True,
        "rollout.max_model_len": 1024, "rollout.dtype": "bfloat16", "rollout.enforce_eager": False,
        "rollout.gpu_memory_utilization": 0.35, "rollout.sleep_mode": True, "algo.max_new_tokens": 512,
        "algo.generation_lag": 1, "algo.lr": 2e-5, "algo.warmup_steps": 10, "algo.micro_batch_size": 32,
        "algo.val_num_samples": 4, "trainer.max_steps": 500, "trainer.num_sanity_val_steps": 0}),
    "experiment/rg_arithmetic": (["algo=rlvr", "data=reasoning_gym", "reward=reasoning_gym"], {
        "data.source.n_train": 6000, "data.max_length": 48, "algo.max_new_tokens": 6, "warm_start.val_every": 25,
        "tags": ["rlvr", "reasoning_gym", "basic_arithmetic"]}),
    "experiment/rg_spell_backward": (["algo=rlvr", "data=reasoning_gym", "reward=reasoning_gym"], {
        "data.source.tasks": [{"name": "spell_backward", "config": {"min_word_len": 3, "max_word_len": 5}}],
        "data.max_length": 88, "algo.max_new_tokens": 6, "trainer.max_steps": 300,
        "tags": ["rlvr", "reasoning_gym", "spell_backward"]}),
    "experiment/calculator_tool": (["algo=rlvr", "data=calculator", "env=calculator", "reward=exact"], {
        "algo.max_new_tokens": 96, "algo.val_num_samples": 4, "algo.generation_lag": 0, "data.batch_size": 32,
        "data.source.n_val": 100, "data.source.n_test": 200, "warm_start.target": 0.95, "warm_start.max_steps": 1000,
        "warm_start.batch_size": 32, "warm_start.val_every": 25,
        "warm_start.cache_dir": "${paths.log_dir}/warm_start_cache",
        "trainer.max_steps": 40, "trainer.val_check_interval": 10, "tags": ["rlvr", "multi_turn", "calculator"]}),
    "experiment/guess_the_number": (["algo=rlvr", "data=games", "env=textarena"], {
        "model.tokenizer.words": ["<|tools|>move(action)\n", "<|user|>", "<|assistant|>", "<|tool|>",
                                  '<tool_call>{"name": "move", "arguments": {"action": "[', ']"}}</tool_call>',
                                  "Guess the number in 1..10 with move, e.g. [5].", "The target number is ", "higher",
                                  "lower", "Congratulations! You guessed the correct number.",
                                  "The turn limit has been reached. Guess: ", ", Target: ",
                                  "You attempted an invalid move. Reason: Invalid move. Player 0 has already guessed "
                                  "the number. Please resubmit a valid move and remember to follow the game rules to "
                                  "avoid penalties."],
        "algo.lr": 3e-4, "algo.val_num_samples": 4, "algo.generation_lag": 0, "algo.retire_threshold": None,
        "env.environment.instructions": "Guess the number in 1..10 with move, e.g. [5].",
        "env.environment.max_number": 10, "env.environment.max_turns": 5, "env.environment.turn_bonus": 1.0,
        "env.max_turns": 6, "env.max_tokens": 96,
        "data.batch_size": 32, "data.max_length": 128, "warm_start.target": 1.0,
        "warm_start.val_every": 500, "warm_start.batch_size": 32,
        "warm_start.cache_dir": "${paths.log_dir}/warm_start_cache", "trainer.max_steps": 200,
        "trainer.val_check_interval": 25, "tags": ["rlvr", "multi_turn", "textarena"]}),
    "experiment/scalerl": (["algo=rlvr"], {
        "data.source.ops": ["+", "*"], "warm_start.cache_dir": "${paths.log_dir}/warm_start_cache", "algo.lr": 5e-5,
        "trainer.max_steps": 600, "trainer.val_check_interval": 25, "test": False, "tags": ["rlvr", "scalerl"]}),
    "debug/fdr": (["logger=none", "callbacks=none"], {"trainer.fast_dev_run": True, "extras.print_config": False}),
}


def _flat(node: dict, prefix: str = "") -> dict:
    """A composed config as {dotted key: value} (lists are values; empty mappings are left out)."""
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _composed(conf: Path, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train", overrides=overrides), resolve=False)
    GlobalHydra.instance().clear()
    return _flat(cfg)


def preset_changes(name: str, conf: Path = ROOT / "conf") -> tuple[list[str], dict]:
    """The groups a preset's file picks, and every key the preset changes from their composition, with its value."""
    import yaml

    picked = [f"{k.removeprefix('override /')}={v}" for d in yaml.safe_load((conf / f"{name}.yaml").read_text())
              ["defaults"] if isinstance(d, dict) for k, v in d.items()]
    base, preset = _composed(conf, picked), _composed(conf, [name.replace("/", "=")])
    return picked, {k: preset.get(k, "<absent>") for k in base.keys() | preset.keys()
                    if base.get(k, "<absent>") != preset.get(k, "<absent>")}


@pytest.mark.parametrize("name", options("experiment") + [f"debug/{d}" for d in options("debug")])
def test_experiment_and_debug_presets_change_what_they_say(name):
    """Each preset picks the groups it names and changes exactly the keys PRESETS lists, to the values it lists."""
    group, _, option = name.rpartition("/")
    name = f"{group or 'experiment'}/{option}"
    assert name in PRESETS, f"add {name} to PRESETS with the groups it picks and every key it changes"
    picked, changed = preset_changes(name)
    assert picked == PRESETS[name][0], f"{name} picks {picked}"
    assert changed == PRESETS[name][1], f"{name} changes {sorted(set(changed) ^ set(PRESETS[name][1]))} unlike PRESETS"


def test_the_preset_check_sees_a_key_added_to_a_preset(tmp_path):
    """The issue's planted bug: algo.lr and algo.generation_lag added to experiment/rlhf.yaml (in a copy of conf/)
    show in the preset's changes, so the check above would fail on them."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    path = conf / "experiment" / "rlhf.yaml"
    path.write_text(path.read_text().replace("\nalgo:\n", "\nalgo:\n  lr: 1.0e-2\n  generation_lag: 0\n"))
    _, changed = preset_changes("experiment/rlhf", conf)
    assert changed == {**PRESETS["experiment/rlhf"][1], "algo.lr": 1e-2, "algo.generation_lag": 0}


def test_scalerl_rows_share_their_warm_starts_through_the_cache(cfg_factory, tmp_path):
    """experiment=scalerl keeps each seed's warm start under the log dir, so every row of the ablation (its algorithm
    options differ) finds the same key."""
    from genlight.lightning_modules.sft import warm_start_key

    base = cfg_factory("experiment=scalerl", quick=False)
    assert base.warm_start.cache_dir == str(tmp_path / "warm_start_cache")
    for row in ("loss=gspo", "algo.advantage=rloo", "algo.generation_lag=0", "algo.zero_variance_filter=false",
                "data.batch_size=128"):
        assert warm_start_key(cfg_factory("experiment=scalerl", row, quick=False)) == warm_start_key(base), row


def test_a_games_scoring_options_keep_its_warm_start_key_and_its_rules_change_it(cfg_factory):
    """The game preset's demonstrations follow the game's rules, not its reward: a turn bonus or partial credit finds
    the cached warm start; another range of numbers or an instruction does not."""
    from genlight.lightning_modules.sft import warm_start_key

    base = warm_start_key(cfg_factory("experiment=guess_the_number", quick=False))
    for row in ("env.environment.turn_bonus=0", "env.environment.partial_credit=true"):
        assert warm_start_key(cfg_factory("experiment=guess_the_number", row, quick=False)) == base, row
    for row in ("env.environment.max_number=12", "env.environment.instructions=Guess.", "data.source.n_train=1000"):
        assert warm_start_key(cfg_factory("experiment=guess_the_number", row, quick=False)) != base, row


def test_hf_model_requires_a_path(cfg_factory):
    from genlight.pipeline import train

    with pytest.raises(ValueError, match="missing mandatory config value.*model.pretrained"):
        train(cfg_factory("model=hf"))
