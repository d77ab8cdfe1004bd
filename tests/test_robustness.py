"""Failures never cost good state: a NaN loss stops the run before the update with the last good
checkpoint intact; a checkpoint that would run code when loaded is refused before anything runs."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.helpers import train_with


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
        train_with(cfg, PoisonAt(5))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert 0 < state["global_step"] <= 5, "the last checkpoint predates the NaN"
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())



class _Payload:
    """Unpickling this runs code: it writes a marker file (what a malicious shared checkpoint would do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_file_and_nothing_runs(cfg_factory, tmp_path):
    from genlight.lightning_modules.ddpm import DDPMModule
    from genlight.pipeline import train

    marker = tmp_path / "ran"
    bad = tmp_path / "shared.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Payload(marker)}, "net_spec": {}}, bad)
    with pytest.raises(ValueError, match=rf"ckpt_path={bad}: refused: .*weights-only"):
        train(cfg_factory("algo=sft", f"ckpt_path={bad}"))
    with pytest.raises(ValueError, match=rf"ckpt={bad}: refused"):  # sample.py's loader
        DDPMModule.from_checkpoint(str(bad))
    assert not marker.exists(), "unpickling ran the payload"
    torch.load(bad, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
