"""The private members of Lightning, W&B and transformers that we still use, each pinned by a test that fails
when the library changes it (the README names the tested version range). Each has no public equivalent:

- Lightning's WandbLogger `_wandb_init` (the arguments it passes to `wandb.init`): our WandbLogger drops the
  `anonymous=None` that W&B deprecates.
- Lightning's CSV `ExperimentWriter._check_log_dir_exists`: our CSVLogger's second writer (test after fit in
  other worker processes) appends instead of deleting the fit's rows.
- Lightning's `_MultiProcessingLauncher`: whether fit and test run in forked / spawned worker processes.
- Lightning's `ModelCheckpoint` internals (`_save_last_checkpoint`, `_monitor_candidates`, ...): our Checkpoint
  writes `last.ckpt` at every validation; pinned by tests/test_train.py
  `test_last_checkpoint_is_the_latest_validation_even_when_the_metric_did_not_improve`.
- transformers' `config._attn_implementation`: the packed tree mask is additive (eager) or boolean (sdpa).
- transformers' `_no_split_modules`: the blocks FSDP2 shards by (accelerate reads it the same way).
- `torch._foreach_lerp_`: the EMA's one fused update (torch's own optimizers use the foreach ops).
"""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch


def test_our_wandb_logger_fixes_its_run_id_and_drops_anonymous(tmp_path, monkeypatch):
    """The id is fixed before any run opens (both worker phases share it), and wandb.init gets no `anonymous`."""
    from genlight.utils.loggers import WandbLogger, prepare_for_workers

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="p", save_dir=str(tmp_path), offline=True)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["resume"] == "allow"
    run_id = logger.version
    assert run_id and logger._wandb_init["id"] == run_id
    prepare_for_workers(SimpleNamespace(loggers=[logger]))
    assert logger.experiment.id == run_id  # the run that opens is the one named before
    logger.experiment.finish()
    assert WandbLogger(project="p", save_dir=str(tmp_path), offline=True, id="abc").version == "abc"


def test_a_lightning_wandb_logger_without_an_id_is_refused_before_forking(tmp_path):
    from lightning.pytorch.loggers import WandbLogger as LightningWandb

    from genlight.utils.loggers import prepare_for_workers

    with pytest.raises(ValueError, match="without a run id under a fork-launched strategy"):
        prepare_for_workers(SimpleNamespace(loggers=[LightningWandb(save_dir=str(tmp_path), offline=True)]))


def test_a_second_csv_writer_of_the_same_version_appends(tmp_path):
    """fit's rows survive test's writer (another process in ddp_fork), and the columns are the union."""
    from genlight.utils.loggers import CSVLogger

    first = CSVLogger(str(tmp_path), name="run", version=0)
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    second = CSVLogger(str(tmp_path), name="run", version=0)
    second.log_metrics({"test/loss": 2.0}, step=1)
    second.save()
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["train/loss"], r["test/loss"]) for r in rows] == [("1.0", ""), ("", "2.0")]


@pytest.mark.parametrize("strategy, forks", [("ddp_fork", True), ("ddp_spawn", True), ("ddp", False), ("auto", False)])
def test_forks_workers_knows_the_multiprocessing_launcher(strategy, forks):
    from genlight.utils.loggers import forks_workers

    devices = 1 if strategy == "auto" else 2
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    assert forks_workers(trainer) is forks


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_transformers_records_the_attention_implementation_and_block_classes(attn):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from genlight.models.logps import tree_mask

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    assert set(model._no_split_modules) == {"LlamaDecoderLayer"}
    seg, branch = torch.tensor([[0, 0, 0]]), torch.tensor([[0, 1, 2]])
    mask = tree_mask(seg, branch, model.config._attn_implementation)
    assert mask.dtype == (torch.float32 if attn == "eager" else torch.bool)


def test_foreach_lerp_equals_per_tensor_lerp():
    a, b = [torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(2, 2)]
    want = [x.lerp(y, 0.1) for x, y in zip(a, b)]
    torch._foreach_lerp_(a, b, 0.1)
    assert all(torch.allclose(x, y) for x, y in zip(a, want))
