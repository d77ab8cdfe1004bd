"""Shared fixtures: configs composed in-process with Hydra's compose API (as lightning-hydra-template
does), small enough to train in seconds on 2 CPU cores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import genlight

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A quick configuration for tests: few steps, small splits, no checkpoints unless a test asks.
QUICK = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "data.source.n_train=64",
    "data.source.n_val=16",
    "data.source.n_test=16",
    "data.batch_size=16",
    "extras.print_config=false",
    "logger=none",
]


def make_cfg(tmp_path: Path, overrides: list[str] = (), quick: bool = True, name: str = "train") -> DictConfig:
    """Compose conf/<name>.yaml (train or eval) with overrides, as `genlight.compose` does for users; its output dir
    (and log dir) is `tmp_path`."""
    cfg = genlight.compose((QUICK if quick else []) + list(overrides), name=name, output_dir=tmp_path)
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path)
    return cfg


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(*overrides: str, quick: bool = True, name: str = "train") -> DictConfig:
        return make_cfg(tmp_path, list(overrides), quick, name)

    yield factory
    GlobalHydra.instance().clear()
    import wandb

    if wandb.run is not None:
        wandb.finish()


@pytest.fixture(scope="session")
def shared_warm_start(tmp_path_factory) -> list[str]:
    """Overrides under which the slow learning tests whose recipes start from the same SFT warm start (DPO and the
    reward model: target 0.85 on the default task) train it once: the same data, and a warm-start cache."""
    cache = tmp_path_factory.mktemp("warm_start_cache")
    return ["data.source.n_val=256", "data.source.n_test=256", f"warm_start.cache_dir={cache}"]


@pytest.fixture(scope="session")
def tokenizer():
    from genlight.models import char_tokenizer

    return char_tokenizer()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama + tokenizer saved as an ordinary HF directory."""
    from genlight.models import tiny_llama

    d = tmp_path_factory.mktemp("hf")
    tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture
def sft_jsonl(tmp_path) -> Path:
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(40)]
    rows += [{"messages": [{"role": "user", "content": f"{a}*2"}, {"role": "assistant", "content": str(2 * a)}]} for a in range(10)]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture
def pref_jsonl(tmp_path) -> Path:
    rows = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(40)]
    return write_jsonl(tmp_path / "pref.jsonl", rows)


@pytest.fixture
def unpaired_jsonl(tmp_path) -> Path:
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a + (a % 2)), "label": a % 2 == 0} for a in range(40)]
    return write_jsonl(tmp_path / "unpaired.jsonl", rows)


@pytest.fixture
def prompts_jsonl(tmp_path) -> Path:
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(40)]
    rows += [{"messages": [{"role": "user", "content": f"{a}*2"}], "answer": 2 * a} for a in range(10)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)
