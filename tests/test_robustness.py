"""Failures never cost good state: a NaN loss stops the run before the update with the last good
checkpoint intact; a crash while saving leaves the previous checkpoint as it was."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.test_rlvr import _train_with


class PoisonAt(L.Callback):
    """Turns one weight into NaN right before optimizer step `step` (a diverging run)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.model.parameters()).view(-1)[0] = float("nan")


def test_nan_loss_stops_before_the_update_with_the_last_good_checkpoint(cfg_factory, tmp_path):
    cfg = cfg_factory("algo=sft", "trainer.max_steps=8", "trainer.val_check_interval=2", "test=false")
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 5 .*last\.ckpt"):
        _train_with(cfg, PoisonAt(5))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert 0 < state["global_step"] <= 5, "the last checkpoint predates the NaN"
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    io, path = TorchCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()

    class Crash(RuntimeError):
        pass

    import fsspec.implementations.local as local

    def crash(self, data):  # the disk write dies half-way
        raise Crash("killed while writing")

    monkeypatch.setattr(local.LocalFileOpener, "write", crash)
    with pytest.raises(Crash):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good and torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a partial file was left behind"
