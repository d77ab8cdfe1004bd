"""Export the trained policy and its tokenizer as an ordinary Hugging Face directory at the end of fit.

The export loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` (and
vLLM), and is how one algorithm hands its model to the next: `model=hf model.pretrained=<dir>`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L


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
    """At the end of fit, the module's `export_pretrained(dirpath)`: the LM algorithms write the policy
    and tokenizer (with LoRA: merged, and the adapter in `adapter/`), DDPM a diffusers pipeline."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every process calls the export (sharded weights are gathered collectively); rank 0 writes
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        pl_module.export_pretrained(self.dirpath)  # train.py logs where it is, once, at the end
