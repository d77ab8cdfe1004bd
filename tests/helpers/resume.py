"""Exact resume, checked the same way for every algorithm (tests/test_resume.py) and engine (tests/test_vllm.py): a
run stopped by SIGTERM mid-epoch, and one killed between checkpoints, resumed from their checkpoints log the losses of
a run never interrupted and end with its weights."""

from __future__ import annotations

import os
import signal
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tests.helpers import train_with

TOTAL, PER_EPOCH = 10, 4  # every run has 2+ epochs and validates inside epochs (every 3 steps)


class Losses(L.Callback):
    def __init__(self):
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.by_step[trainer.global_step] = float(loss)


class Sigterm(L.Callback):
    """Sends this process SIGTERM after optimizer step n, as `kill` or a SLURM preemption would."""

    def __init__(self, n: int):
        self.n = n

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.n:
            os.kill(os.getpid(), signal.SIGTERM)


class Vanish(L.Callback):
    """Ends fit abruptly after step n with nothing saved (a SIGKILL between checkpoints)."""

    def __init__(self, n: int):
        self.n = n

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.n:
            raise _Killed


class _Killed(Exception):
    pass


def _cfg(cfg_factory, tmp_path, name, overrides, quick, *extra):
    cfg = cfg_factory(*overrides, "trainer.val_check_interval=3", *extra, "test=false", quick=quick)
    cfg.paths.output_dir = str(tmp_path / name)
    cfg.callbacks.model_checkpoint.dirpath = str(tmp_path / name / "checkpoints")
    return cfg


def _weights(objs):
    return {k: v.detach().clone() for k, v in objs["module"].state_dict().items()}


def check_resume_exactly(cfg_factory, tmp_path, algo, overrides, quick, total, per_epoch):
    """SIGTERM mid-epoch and a kill between checkpoints: both resumed runs repeat the uninterrupted one."""
    straight = Losses()
    _, full = train_with(_cfg(cfg_factory, tmp_path, "full", overrides, quick, f"trainer.max_steps={total}"), straight)
    assert len(straight.by_step) == total

    # SIGTERM after step 7: mid-epoch (epoch 2 has done 3 of its 4 batches), no validation at that step
    stop = 7
    assert stop % per_epoch and stop % 3
    with pytest.raises(SIGTERMException):
        train_with(_cfg(cfg_factory, tmp_path, "term", overrides, quick, f"trainer.max_steps={total}"), Sigterm(stop))
    ckpt = tmp_path / "term" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == stop, "SIGTERM writes a checkpoint at that step"
    (loader_state,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the train loader's own state
    assert loader_state["epoch"] == 1 and sorted(loader_state["epoch_order"]) == sorted(set(loader_state["epoch_order"]))
    after = Losses()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, resumed = train_with(_cfg(cfg_factory, tmp_path, "term2", overrides, quick, f"trainer.max_steps={total}",
                                     f"ckpt_path={ckpt}"), after)
    assert not [w for w in caught if "not resumable" in str(w.message)], "Lightning thinks the loader is not resumable"
    assert sorted(after.by_step) == list(range(stop + 1, total + 1))
    for step, loss in after.by_step.items():
        assert loss == pytest.approx(straight.by_step[step], rel=1e-5, abs=1e-7), f"{algo}: loss differs at step {step}"
    want = _weights(full)  # DDPM: the EMA weights (copied into the module at the end of fit)
    for k, v in _weights(resumed).items():
        assert torch.allclose(want[k], v, atol=1e-6), f"{algo}: {k} differs after the SIGTERM resume"
    for a, b in zip(full["trainer"].callbacks, resumed["trainer"].callbacks):
        if type(a).__name__ == "ReferenceRefresh":  # TR-DPO's refresh counter comes back too
            # a refresh starts the step after every tau-th: steps tau + 1, 2 tau + 1, ... up to total
            assert a.state_dict() == b.state_dict() and a.refreshes == (total - 1) // a.tau

    # killed after step 5: the last checkpoint is the step-3 validation's (mid-epoch); steps 4-5 are redone
    with pytest.raises(_Killed):
        train_with(_cfg(cfg_factory, tmp_path, "kill", overrides, quick, f"trainer.max_steps={total}"), Vanish(5))
    ckpt = tmp_path / "kill" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    after = Losses()
    train_with(_cfg(cfg_factory, tmp_path, "kill2", overrides, quick, f"trainer.max_steps={total}", f"ckpt_path={ckpt}"), after)
    assert sorted(after.by_step) == list(range(4, total + 1))
    for step, loss in after.by_step.items():
        assert loss == pytest.approx(straight.by_step[step], rel=1e-5, abs=1e-7), f"{algo}: loss differs at step {step}"
