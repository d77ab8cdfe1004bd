"""Export the trained policy and its tokenizer as an ordinary Hugging Face directory at the end of fit.

The export loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` (and
vLLM), and is how one algorithm hands its model to the next: `model=hf model.pretrained=<dir>`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_progress():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class HFExport(L.Callback):
    def __init__(self, dirpath: str, safe_serialization: bool = True):
        self.dirpath = Path(dirpath)
        self.safe_serialization = safe_serialization

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        if hasattr(pl_module, "export_pretrained"):  # e.g. DDPMModule: a diffusers pipeline directory
            pl_module.export_pretrained(self.dirpath)
            log.info("Hugging Face export: %s", self.dirpath)
            return
        with quiet_progress():  # no "Writing model shards" bar for a one-shard model in our logs
            pl_module.model.save_pretrained(self.dirpath, safe_serialization=self.safe_serialization)
        pl_module.tokenizer.save_pretrained(self.dirpath)
        log.info("Hugging Face export: %s", self.dirpath)
