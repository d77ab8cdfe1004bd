"""Exact resume for every algorithm: a run stopped by SIGTERM in the middle of an epoch, or killed
between checkpoints, and resumed from its checkpoint logs the same losses afterwards as a run that
was never interrupted (CPU, fixed seeds), and ends with the same weights."""

from __future__ import annotations

import os
import signal
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tests.helpers import DQUICK, RLVR_RUN, train_with

# (overrides, total steps, batches per epoch); every run has 2+ epochs and validates inside epochs
ALGOS = {
    "sft": (["algo=sft", "trainer.val_check_interval=3"], 10, 4),
    # LoRA: the adapters and their optimizer state come back (the frozen base is in the checkpoint too)
    "sft_lora": (["algo=sft", "model.lora.r=4", "model.lora.dropout=0.0", "trainer.val_check_interval=3"], 10, 4),
    "tr_dpo": (["algo=tr_dpo", "warm_start.max_steps=0", "callbacks.reference_refresh.tau=3", "callbacks.reference_refresh.alpha=0.5", "trainer.val_check_interval=3"], 10, 4),
    # in micro-batches of 3 samples (groups of 4 split across them)
    "rlvr": ([o for o in RLVR_RUN if not o.startswith("trainer.val_check_interval")] + ["trainer.val_check_interval=3",
                                                                                       "algo.micro_batch_size=3"], 10, 4),
    "ddpm": (DQUICK + ["data=toy2d", "data.n_train=1024", "data.n_val=100", "data.n_test=100", "data.batch_size=256",
                       "trainer.val_check_interval=3", "algo.val_num_samples=50", "algo.test_num_samples=50"], 10, 4),
    # flow matching: continuous logit-normal t, Heun validation samples
    "ddpm_flow": (DQUICK + ["data=toy2d", "data.n_train=1024", "data.n_val=100", "data.n_test=100", "data.batch_size=256",
                            "trainer.val_check_interval=3", "algo.val_num_samples=50", "algo.test_num_samples=50",
                            "algo.process.name=flow", "algo.t_sampling=logit_normal", "algo.val_sampler=heun",
                            "algo.val_steps=5"], 10, 4),
}


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


def _cfg(cfg_factory, tmp_path, name, overrides, *extra):
    quick = "algo=ddpm" not in overrides  # the LM quick settings name LM data keys
    cfg = cfg_factory(*overrides, *extra, "test=false", quick=quick)
    cfg.paths.output_dir = str(tmp_path / name)
    cfg.callbacks.model_checkpoint.dirpath = str(tmp_path / name / "checkpoints")
    return cfg


def _weights(objs):
    return {k: v.detach().clone() for k, v in objs["module"].state_dict().items()}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_sigterm_mid_epoch_and_kill_between_checkpoints_resume_exactly(cfg_factory, tmp_path, algo):
    check_resume_exactly(cfg_factory, tmp_path, algo, *ALGOS[algo])


def check_resume_exactly(cfg_factory, tmp_path, algo, overrides, total, per_epoch):
    """SIGTERM mid-epoch and a kill between checkpoints: both resumed runs repeat the uninterrupted one."""
    straight = Losses()
    _, full = train_with(_cfg(cfg_factory, tmp_path, "full", overrides, f"trainer.max_steps={total}"), straight)
    assert len(straight.by_step) == total

    # SIGTERM after step 7: mid-epoch (epoch 2 has done 3 of its 4 batches), no validation at that step
    stop = 7
    assert stop % per_epoch and stop % 3
    with pytest.raises(SIGTERMException):
        train_with(_cfg(cfg_factory, tmp_path, "term", overrides, f"trainer.max_steps={total}"), Sigterm(stop))
    ckpt = tmp_path / "term" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == stop, "SIGTERM writes a checkpoint at that step"
    (loader_state,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the train loader's own state
    assert loader_state["epoch"] == 1 and sorted(loader_state["epoch_order"]) == sorted(set(loader_state["epoch_order"]))
    after = Losses()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, resumed = train_with(_cfg(cfg_factory, tmp_path, "term2", overrides, f"trainer.max_steps={total}",
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
            assert a.state_dict() == b.state_dict() and a.refreshes == 3

    # killed after step 5: the last checkpoint is the step-3 validation's (mid-epoch); steps 4-5 are redone
    with pytest.raises(_Killed):
        train_with(_cfg(cfg_factory, tmp_path, "kill", overrides, f"trainer.max_steps={total}"), Vanish(5))
    ckpt = tmp_path / "kill" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    after = Losses()
    train_with(_cfg(cfg_factory, tmp_path, "kill2", overrides, f"trainer.max_steps={total}", f"ckpt_path={ckpt}"), after)
    assert sorted(after.by_step) == list(range(4, total + 1))
    for step, loss in after.by_step.items():
        assert loss == pytest.approx(straight.by_step[step], rel=1e-5, abs=1e-7), f"{algo}: loss differs at step {step}"


def test_ckpt_path_last_and_missing_checkpoint(cfg_factory, tmp_path):
    from src.utils import resolve_ckpt_path

    cfg = cfg_factory("ckpt_path=last")
    cfg.paths.log_dir = str(tmp_path / "logs")
    cfg.paths.output_dir = str(tmp_path / "logs" / "train" / "runs" / "now")  # this run's own dir is skipped
    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no checkpoints/last.ckpt under"):
        resolve_ckpt_path(cfg)
    for i, run in enumerate(["a", "b"]):
        p = tmp_path / "logs" / "train" / "runs" / run / "checkpoints" / "last.ckpt"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
    assert resolve_ckpt_path(cfg).endswith("runs/b/checkpoints/last.ckpt")
    cfg.ckpt_path = str(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*nope.ckpt: no such checkpoint file"):
        resolve_ckpt_path(cfg)
