"""A run without W&B: nothing imports wandb unless a W&B run can exist (a bare CUDA image has no wandb)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_wandb_import_when_no_wandb_run_can_exist():
    """The teardown callback (in a forked worker) and finish_loggers look at W&B only if it was imported: a run
    with logger=none / csv never loads wandb (it is installed here)."""
    code = ("import sys\n"
            "from genlight.utils.loggers import FinishWandbInWorker\n"
            "from genlight.utils.run import finish_loggers\n"
            "cb = FinishWandbInWorker()\n"
            "cb.parent = -1  # as in a forked worker\n"
            "cb.teardown(None, None, 'fit')\n"
            "assert finish_loggers(None) == []\n"
            "print('wandb loaded:', 'wandb' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wandb loaded: False" in r.stdout


# wandb made unimportable, as where it is not installed: the path finder no longer finds it
NO_WANDB = """
import sys
from importlib.machinery import PathFinder

class NoWandb(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "wandb" else PathFinder.find_spec(name, path, target)

sys.meta_path = [NoWandb if f is PathFinder else f for f in sys.meta_path]
try:
    import wandb  # noqa: F401
    sys.exit("wandb still importable")
except ModuleNotFoundError:
    pass
"""


def test_training_without_wandb_installed(tmp_path):
    """A short logger=none training where wandb cannot be imported ends normally (the teardown imported it
    unconditionally and crashed after training)."""
    code = NO_WANDB + (
        "import runpy\n"
        f"sys.argv = ['train.py', 'algo=sft', 'logger=none', 'trainer.max_steps=2', 'test=false',"
        " 'callbacks.hf_export=null', 'callbacks.model_checkpoint=null', 'trainer.num_sanity_val_steps=0',"
        " '+trainer.limit_val_batches=0', 'optimized_metric=null', 'trainer.enable_progress_bar=false',"
        " 'data.source.n_train=64', 'data.source.n_val=16', 'data.source.n_test=16', 'extras.print_config=false',"
        f" 'hydra.run.dir={tmp_path}']\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
        "print('finished; wandb loaded:', 'wandb' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished; wandb loaded: False" in r.stdout
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in r.stdout + r.stderr
